"""The prepacked conv stack (engine.prepack): same outputs and block taps as the eager stack, and a safe fallback."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from engine import prepack
from engine.features import FeatureExtractor, check_image, fold_batch_norm
from engine.localize import block_outputs, up_to_block
from engine.weights import random_features

# Packing needs oneDNN (in every x86 and arm64 torch wheel); a build without it runs the eager stack.
pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


def eager_stack(dtype: torch.dtype) -> torch.nn.Sequential:
    stack = fold_batch_norm(random_features("vgg16_bn")[:-1].eval()).eval()
    return stack.to(memory_format=torch.channels_last).to(dtype)


def batch(n: int, side: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(n * side))
    return x.contiguous(memory_format=torch.channels_last).to(dtype)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_stack_gives_the_eager_blocks_at_any_shape(dtype):
    eager = eager_stack(dtype)
    packed = prepack.pack_conv_stack(eager, image_size=64)
    assert sum(isinstance(m, prepack.PackedConv2d) for m in packed) == 13  # every conv, its ReLU fused
    assert not any(isinstance(m, (torch.nn.Conv2d, torch.nn.ReLU)) for m in packed)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in packed) == 4  # the block boundaries stay
    # Packed for 4 images of 64 px; a batch of another size and side gives the same results.
    for x in (batch(4, 64, dtype), batch(1, 96, dtype)):
        with torch.inference_mode():
            want, got = block_outputs(eager, x), block_outputs(packed, x)
            assert [t.shape for t in got] == [t.shape for t in want]
            assert all(cosine(a, b) > 0.9999 for a, b in zip(want, got, strict=True))
            assert torch.equal(up_to_block(packed, 4)(x), got[3])
            assert got[-1].dtype == dtype and float(got[-1].min()) >= 0  # the fused ReLU ran


def test_extractor_runs_packed_and_embeds_as_the_eager_stack(monkeypatch):
    packed = FeatureExtractor("random", "auto", image_size=64)
    monkeypatch.setattr("engine.features.packed_or_eager", lambda features, size, check: features)
    eager = FeatureExtractor("random", "auto", image_size=64)
    assert packed.prepacked and not eager.prepacked
    images = [check_image(200), check_image(120).rotate(90)]
    a, b = packed.embed(images, "gem"), eager.embed(images, "gem")
    assert a.dtype == np.float32 and float(np.min(np.sum(a * b, axis=1))) > 0.9999


def test_falls_back_to_the_eager_stack_when_packing_fails_or_drifts(monkeypatch, caplog):
    eager = eager_stack(torch.float32)
    x = batch(1, 64, torch.float32)

    def refuse(*args, **kwargs):
        raise RuntimeError("mkldnn_reorder_conv2d_weight: not supported on this CPU")

    monkeypatch.setattr(prepack, "pack_conv_stack", refuse)
    with caplog.at_level(logging.WARNING, logger="engine.prepack"):
        assert prepack.packed_or_eager(eager, 64, x) is eager
    assert "not available here" in caplog.text and "not supported on this CPU" in caplog.text
    monkeypatch.undo()

    monkeypatch.setattr(prepack, "MIN_COSINE", 1.5)  # no stack can pass: the check decides
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine.prepack"):
        assert prepack.packed_or_eager(eager, 64, x) is eager
    assert "drift" in caplog.text
    monkeypatch.undo()
    assert prepack.packed_or_eager(eager, 64, x) is not eager


def test_a_block_silent_in_both_stacks_is_no_drift():
    # Trained weights can leave the last block all zero on the small check image (seen with the GPU run's
    # weights at 64 px): that says nothing about packing, and must not cost the packed stack.
    eager = eager_stack(torch.float32)
    last_conv = [m for m in eager if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last_conv.bias.fill_(-1e4)  # its ReLU outputs zero on any input
    x = batch(1, 64, torch.float32)
    with torch.inference_mode():
        assert not bool(eager(x).any())
    assert prepack.packed_or_eager(eager, 64, x) is not eager
    zero, one = torch.zeros(8), torch.ones(8)
    assert prepack.block_agreement([one, zero], [one, zero]) == pytest.approx(1.0)
    assert prepack.block_agreement([one, zero], [one, one]) == 0.0  # silent in one stack only: drift
    assert prepack.block_agreement([one, one], [one, -one]) == pytest.approx(-1.0)
