"""The conv stack with its weights reordered once for oneDNN ("prepacked"), each ReLU fused into its conv.

Eager PyTorch hands oneDNN the plain weights on every call, and oneDNN reorders all 14.7M of them into its
blocked layout each time. Reordering once at load time makes the VGG16 conv stack 1.2-1.5x as fast on a
CPU with AMX (batch 1 and 4, one thread, bf16, 112-224 px; `benchmarks/model_levers.py --sections prepack`), with the same
outputs up to float rounding. Tensors stay dense (channels_last) between layers, so the taps of the mask
head (`engine.localize.block_outputs`) and the pooling see what they saw before.

Inference only: the packed weights are not parameters and cannot be trained or saved.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.localize import block_outputs

log = logging.getLogger(__name__)

# Each block's output of the packed stack must match the eager one at least this well on the check image.
MIN_COSINE = 0.9999


class PackedConv2d(nn.Module):
    """A Conv2d (and the ReLU after it, where `relu`) run by oneDNN with weights packed once."""

    def __init__(self, conv: nn.Conv2d, relu: bool, input_shape: list[int]) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.groups = conv.kernel_size, conv.groups
        self.padding, self.stride, self.dilation = list(conv.padding), list(conv.stride), list(conv.dilation)
        self.relu = relu
        weight = conv.weight.detach()
        # Plain attributes, not parameters or buffers: module utilities (.to, state_dict) do not handle
        # oneDNN's opaque tensors.
        self.packed_weight = torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.to_mkldnn(), self.padding, self.stride, self.dilation, self.groups, input_shape
        )
        self.bias = None if conv.bias is None else conv.bias.detach().to(weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.packed_weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
            "relu" if self.relu else "none", [], "",
        )


def pack_conv_stack(features: nn.Sequential, image_size: int, batch: int = 4) -> nn.Sequential:
    """A copy of a conv stack (batch norm already folded) with each Conv2d, and the ReLU right after it, as
    one PackedConv2d; other layers (the max-pools) are kept. `image_size` and `batch` only tell oneDNN which
    input shape to pack for; any other shape gives the same results."""
    layers: list[nn.Module] = []
    modules = list(features)
    side, i = image_size, 0
    while i < len(modules):
        module = modules[i]
        if isinstance(module, nn.Conv2d):
            relu = i + 1 < len(modules) and isinstance(modules[i + 1], nn.ReLU)
            layers.append(PackedConv2d(module, relu, [batch, module.in_channels, side, side]))
            i += 2 if relu else 1
            continue
        if isinstance(module, nn.MaxPool2d):
            side //= 2
        layers.append(module)
        i += 1
    return nn.Sequential(*layers).eval()


def block_agreement(want: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """The lowest cosine between matching outputs of two computations of the same stack (packed and eager, or
    bf16 and fp32); an output that is zero in both agrees (1.0): trained weights can leave the last block
    silent on a small synthetic image, which says nothing about how the two compute."""
    cosines = []
    for a, b in zip(want, got, strict=True):
        a, b = a.float().flatten(), b.float().flatten()
        silent = not bool(a.any()) and not bool(b.any())
        cosines.append(1.0 if silent else float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
    return min(cosines)


def packed_or_eager(features: nn.Sequential, image_size: int, check_batch: torch.Tensor) -> nn.Sequential:
    """The packed stack where this torch build runs it and each of its conv blocks gives the eager stack's
    output on `check_batch` (already in the stack's dtype and layout); else the eager stack, with a warning."""
    if not torch.backends.mkldnn.is_available():
        return features
    try:
        packed = pack_conv_stack(features, image_size)
        with torch.inference_mode():
            cosine = block_agreement(block_outputs(features, check_batch), block_outputs(packed, check_batch))
    except (RuntimeError, AttributeError, TypeError) as exc:  # an op missing or refusing this build or CPU
        log.warning("prepacked convolutions are not available here (%s); running the eager model", exc)
        return features
    if cosine < MIN_COSINE:
        log.warning("prepacked convolutions drift from the eager model (cosine %.6f); running the eager model", cosine)
        return features
    return packed
