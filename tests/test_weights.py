"""Weights: seeded random, files (full, features-only, with batch norm), missing ImageNet file."""

from __future__ import annotations

import pytest
import torch
from torchvision import models

from engine.errors import WeightsError
from engine.features import FeatureExtractor, check_image
from engine.weights import IMAGENET_FILE, load_weights


def test_random_weights_are_identical_on_every_load():
    a, b = load_weights("random"), load_weights("random")
    assert a.weights_id == "random:seed0"
    for pa, pb in zip(a.features.parameters(), b.features.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_full_and_features_only_files_load(tmp_path):
    full = models.vgg16(weights=None)
    # A full VGG16 state dict has "features.*" and "classifier.*" keys; a small classifier stand-in
    # keeps the file small while testing that the classifier is dropped.
    full_state = {f"features.{k}": v for k, v in full.features.state_dict().items()}
    full_state["classifier.6.weight"] = torch.zeros(10, 4)
    torch.save(full_state, tmp_path / "full.pth")
    torch.save(full.features.state_dict(), tmp_path / "features.pth")
    a = load_weights(str(tmp_path / "full.pth"))
    b = load_weights(str(tmp_path / "features.pth"))
    assert a.arch == b.arch == "vgg16"
    assert a.weights_id.startswith("file:full.pth:") and len(a.weights_id.split(":")[-1]) == 12
    assert torch.equal(a.features[0].weight, full.features[0].weight)
    assert torch.equal(b.features[28].weight, full.features[28].weight)


def test_batch_norm_variant_is_recognised(tmp_path):
    torch.save(models.vgg16_bn(weights=None).features.state_dict(), tmp_path / "bn.pth")
    assert load_weights(str(tmp_path / "bn.pth")).arch == "vgg16_bn"


def test_bad_weight_files_give_clear_errors(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="Cannot read weights file"):
        load_weights(str(tmp_path / "junk.pth"))
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="do not fit"):
        load_weights(str(tmp_path / "other.pth"))
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(str(tmp_path / "missing.pth"))


def test_missing_imagenet_file_names_the_file_to_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError) as info:
        load_weights("imagenet", progress=False)
    text = str(info.value)
    assert IMAGENET_FILE in text and str(tmp_path / "torch") in text and "VSEARCH_WEIGHTS=random" in text


def test_bf16_features_stay_close_to_fp32():
    fp32 = FeatureExtractor("random", "fp32", image_size=96)
    bf16 = FeatureExtractor("random", "bf16", image_size=96)
    img = check_image(200)
    a, b = fp32.embed([img], "gem")[0], bf16.embed([img], "gem")[0]
    assert float(a @ b) > 0.999
    assert fp32.precision == "fp32" and bf16.precision == "bf16"


@pytest.mark.parametrize("batch_norm", [False, True])
def test_conv_stack_matches_torchvision_layer_for_layer(batch_norm):
    from engine.weights import vgg16_features

    ours = vgg16_features(batch_norm=batch_norm)
    theirs = (models.vgg16_bn if batch_norm else models.vgg16)(weights=None).features
    assert [type(m) for m in ours] == [type(m) for m in theirs]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_bf16_extractor_stores_model_and_mask_head_in_bf16(tmp_path):
    """bf16 weights are converted once (autocast would re-cast them on every call); masks and vectors stay
    those of the fp32 extractor."""
    import numpy as np

    from engine.localize import MASK_PREFIX, MaskHead
    from engine.weights import random_features

    torch.manual_seed(0)
    state = dict(random_features("vgg16_bn").state_dict())
    state.update({MASK_PREFIX + k: v for k, v in MaskHead(image_size=64).state_dict().items()})
    torch.save(state, tmp_path / "trained.pth")
    fp32 = FeatureExtractor(str(tmp_path / "trained.pth"), "fp32", image_size=64, localize="on")
    bf16 = FeatureExtractor(str(tmp_path / "trained.pth"), "bf16", image_size=64, localize="on")
    assert fp32.weights_dtype == torch.float32 and bf16.weights_dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in bf16.mask_head.parameters())
    img = check_image(200)
    p32, p16 = fp32.mask_probabilities([img]), bf16.mask_probabilities([img])
    assert p16.dtype == np.float32 and p16.shape == p32.shape and np.abs(p32 - p16).max() < 0.05
    a, b = fp32.embed([img], "gem")[0], bf16.embed([img], "gem")[0]
    assert b.dtype == np.float32 and float(a @ b) > 0.999


@pytest.mark.parametrize("batch_norm", [False, True])
def test_up_to_block_stops_before_that_blocks_max_pool(batch_norm):
    from engine.localize import block_outputs, up_to_block
    from engine.weights import vgg16_features

    stack = vgg16_features(batch_norm=batch_norm).eval()
    four = up_to_block(stack, 4)
    assert isinstance(four[-1], torch.nn.ReLU) and isinstance(stack[len(four)], torch.nn.MaxPool2d)
    assert up_to_block(stack[:-1], 5) is not None and len(up_to_block(stack[:-1], 5)) == len(stack) - 1
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(four(x), block_outputs(stack, x)[3])
    with pytest.raises(ValueError, match="blocks 1-5"):
        up_to_block(stack, 6)


def test_feature_block_4_pools_the_finer_conv4_map():
    """VSEARCH_FEATURE_BLOCK=4: the index pools conv block 4's output (S/8 side), still 512 channels."""
    five = FeatureExtractor("random", "fp32", image_size=64)
    four = FeatureExtractor("random", "fp32", image_size=64, feature_block=4)
    img = check_image(200)
    assert tuple(five.conv_maps([img]).shape) == (1, 512, 4, 4)
    assert tuple(four.conv_maps([img]).shape) == (1, 512, 8, 8)
    a, b = five.embed([img], "gem")[0], four.embed([img], "gem")[0]
    assert a.shape == b.shape == (512,) and abs(float(b @ b) - 1) < 1e-5 and float(a @ b) < 0.999
