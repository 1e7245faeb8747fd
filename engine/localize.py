"""Finding the product in a shopper's photo: a mask head on the VGG16 conv blocks, and the clean-up it drives.

The head predicts, for every 4x4 pixel cell of a low-resolution pass, whether it shows the product.
`vsearch train` teaches it on catalog cut-outs pasted onto cluttered backgrounds (the paste gives the
mask for free). At query time the product's pixels are put on the catalog's plain white background and
cropped to, so the query looks like a catalog shot before it is embedded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from engine.augment import foreground_mask, mask_box

MASK_PREFIX = "mask_head."  # keys of the head in a weights file, beside the conv stack's
HEAD_WIDTH = 64
MASK_STRIDE = 4  # the head's output cell, in input pixels (the third conv block's resolution)
BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class CleanupParams:
    """How a predicted mask becomes a cleaned query; chosen by `benchmarks/localize_variants.py`."""

    threshold: float = 0.5  # probability above which a pixel is product
    min_area: float = 0.03  # a mask smaller than this share of the photo is not trusted: keep the photo
    max_area: float = 0.97  # nor one covering (almost) everything: nothing to remove
    margin: float = 0.10  # border around the crop, as a share of the product's longer side
    feather: float = 1.5  # edge softening, in pixels of the cleaned image
    mask_size: int | None = None  # side of the mask pass; None: the size the head was trained at


class MaskHead(nn.Module):
    """A small feature pyramid over the outputs of conv blocks 3, 4 and 5 -> one logit per 4x4 cell."""

    def __init__(self, channels: tuple[int, int, int] = (256, 512, 512), width: int = HEAD_WIDTH,
                 image_size: int = 112) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, kernel_size=1) for c in channels)
        self.smooth = nn.Sequential(nn.Conv2d(width, width, kernel_size=3, padding=1), nn.ReLU(inplace=True))
        self.out = nn.Conv2d(width, 1, kernel_size=1)
        # The resolution it was trained at: the query's mask pass runs at this size.
        self.register_buffer("image_size", torch.tensor(image_size, dtype=torch.int64))

    def forward(self, block3: torch.Tensor, block4: torch.Tensor, block5: torch.Tensor) -> torch.Tensor:
        top = self.lateral[2](block5)
        top = self.lateral[1](block4) + F.interpolate(top, size=block4.shape[-2:], mode="nearest")
        top = self.lateral[0](block3) + F.interpolate(top, size=block3.shape[-2:], mode="nearest")
        return self.out(self.smooth(top))  # (N, 1, H/4, W/4) logits


def block_outputs(features: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Run a VGG16 conv stack; the output of each conv block (the tensor entering each 2x2 max-pool).

    With the final max-pool dropped (as the engine runs it) the last element is the last block's output.
    """
    outputs = []
    for module in features:
        if isinstance(module, nn.MaxPool2d):
            outputs.append(x)
        x = module(x)
    if not isinstance(features[-1], nn.MaxPool2d):
        outputs.append(x)
    return outputs


def up_to_block(features: nn.Sequential, block: int) -> nn.Sequential:
    """The conv stack through conv block `block` (1-5), without that block's max-pool: its output is the map
    the index pools (block 5 by default; `VSEARCH_FEATURE_BLOCK`). Shares the modules of `features`."""
    pools = [i for i, module in enumerate(features) if isinstance(module, nn.MaxPool2d)]
    if block == len(pools) + 1 and not isinstance(features[-1], nn.MaxPool2d):
        return features
    if not 1 <= block <= len(pools):
        raise ValueError(f"a VGG16 conv stack has blocks 1-5, not {block}")
    return features[: pools[block - 1]]


def blocks_and_logits(
    features: nn.Sequential, head: MaskHead, x: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(every conv block's output, mask logits) from one pass: training pools two blocks and trains the head."""
    blocks = block_outputs(features, x)
    return blocks, head(*blocks[2:5])


def mask_logits(
    features: nn.Sequential, head: MaskHead, x: torch.Tensor, block: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """(conv block `block`'s maps, mask logits) from one pass: masked pooling uses both, the mask pass the logits."""
    blocks, logits = blocks_and_logits(features, head, x)
    return blocks[block - 1], logits


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(conv stack state, mask head state or None) of a weights file written by `vsearch train`."""
    head = {k[len(MASK_PREFIX) :]: v for k, v in state.items() if k.startswith(MASK_PREFIX)}
    rest = {k: v for k, v in state.items() if not k.startswith(MASK_PREFIX)}
    return rest, head or None


def load_head(state: dict[str, torch.Tensor]) -> MaskHead:
    head = MaskHead()
    head.load_state_dict(state, strict=True)
    return head.eval()


def fitted_size(width: int, height: int, side: int) -> tuple[int, int]:
    """Size of a width x height image fitted inside a side x side square, keeping its aspect."""
    scale = side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def mask_target(mask: Image.Image, size: int) -> np.ndarray:
    """A view's product mask ("L", the view's size) as the head sees it: fitted and padded like
    `engine.features.preprocess`, averaged over 4x4 cells: (size/4, size/4) floats in 0..1."""
    canvas = Image.new("L", (size, size), 0)
    new_w, new_h = fitted_size(mask.width, mask.height, size)
    canvas.paste(mask.resize((new_w, new_h), Image.Resampling.BILINEAR), ((size - new_w) // 2, (size - new_h) // 2))
    cells = size // MASK_STRIDE
    return np.asarray(canvas.resize((cells, cells), Image.Resampling.BOX), dtype=np.float32) / 255.0


def catalog_crop(image: Image.Image, margin: float = CleanupParams.margin) -> Image.Image:
    """A catalog image cropped to its product (found on the plain background) with the same margin as a
    cleaned query, so that both sides of a search frame the product alike."""
    box = mask_box(foreground_mask(image))
    if box is None:
        return image
    return image.crop(padded_box(box, margin, image.size))


def padded_box(box: tuple[int, int, int, int], margin: float, size: tuple[int, int]) -> tuple[int, int, int, int]:
    pad = round(margin * max(box[2] - box[0], box[3] - box[1]))
    return max(0, box[0] - pad), max(0, box[1] - pad), min(size[0], box[2] + pad), min(size[1], box[3] + pad)


def unpad(prob: np.ndarray, width: int, height: int) -> np.ndarray:
    """The part of a (S, S) map of a padded square canvas that covers a width x height image."""
    side = prob.shape[0]
    w, h = fitted_size(width, height, side)
    left, top = (side - w) // 2, (side - h) // 2
    return prob[top : top + h, left : left + w]


def clean_image(image: Image.Image, prob: np.ndarray, params: CleanupParams = CleanupParams()) -> Image.Image | None:
    """The product of `image` on white, cropped to it; None when the mask is not worth trusting.

    `prob` is the head's probability map over the padded square canvas of `image` (any resolution).
    """
    image = image.convert("RGB")
    region = unpad(np.asarray(prob, dtype=np.float32), image.width, image.height)
    alpha = Image.fromarray(np.clip(region * 255, 0, 255).astype(np.uint8)).resize(image.size, Image.Resampling.BILINEAR)
    hard = np.asarray(alpha) >= round(params.threshold * 255)
    area = float(hard.mean())
    if not params.min_area <= area <= params.max_area:
        return None
    box = padded_box(mask_box(hard), params.margin, image.size)
    # Crop first: the compositing then only touches the pixels that are kept.
    crop = image.crop(box)
    matte = Image.fromarray(hard[box[1] : box[3], box[0] : box[2]].astype(np.uint8) * 255)
    matte = matte.filter(ImageFilter.GaussianBlur(params.feather))
    return Image.composite(crop, Image.new("RGB", crop.size, BACKGROUND), matte)


def squared(prob: torch.Tensor) -> torch.Tensor:
    return prob**2


def product_weights(
    prob: torch.Tensor,
    size: tuple[int, int],
    params: CleanupParams = CleanupParams(),
    weigh: Callable[[torch.Tensor], torch.Tensor] = squared,
) -> torch.Tensor:
    """(N, 1, h, w) weights of the cells of an h x w conv map, from the head's (N, 1, S/4, S/4) probabilities:
    `weigh` of each cell's product probability, by default its square (near 1 on the product, near 0 on the
    background); all 1 for a photo whose mask is not trusted (see CleanupParams).

    Multiplying a conv map by them before pooling keeps mostly the product's cells: masked pooling, the cheap
    way of finding the product (`VSEARCH_LOCALIZE=mask`): no second pass, no crop. Squared probabilities beat
    a hard cut at `params.threshold` on the validation products (`benchmarks/mask_weights.py`; README: Training)."""
    prob = F.adaptive_avg_pool2d(prob.float(), size)
    share = (prob >= params.threshold).float().mean(dim=(1, 2, 3), keepdim=True)
    trusted = (share >= params.min_area) & (share <= params.max_area)
    return torch.where(trusted, weigh(prob), torch.ones_like(prob))


def masked_maps(
    features: nn.Sequential, head: MaskHead, batch: torch.Tensor, block: int, params: CleanupParams = CleanupParams()
) -> torch.Tensor:
    """Conv block `block`'s float32 maps weighted by `product_weights` (the background's cells near zero), from
    one pass that also runs the head (masked pooling); the caller sets inference mode and autocast."""
    return masked_maps_and_probs(features, head, batch, block, params)[0]


def masked_maps_and_probs(
    features: nn.Sequential, head: MaskHead, batch: torch.Tensor, block: int, params: CleanupParams = CleanupParams()
) -> tuple[torch.Tensor, np.ndarray]:
    """`masked_maps` and the head's (N, S/4, S/4) product probabilities it weighed them by, from the same pass."""
    maps, logits = mask_logits(features, head, batch, block)
    maps = maps.float()
    prob = torch.sigmoid(logits.float())
    return maps * product_weights(prob, (maps.shape[-2], maps.shape[-1]), params), prob[:, 0].cpu().numpy()


def predict_masks(features: nn.Sequential, head: MaskHead, batch: torch.Tensor) -> np.ndarray:
    """(N, S/4, S/4) product probabilities of a preprocessed batch; the caller sets inference mode and autocast."""
    return torch.sigmoid(mask_logits(features, head, batch)[1].float())[:, 0].cpu().numpy()


def clean_images(
    images: list[Image.Image], probs: np.ndarray, params: CleanupParams = CleanupParams()
) -> list[Image.Image]:
    """`clean_image` of each photo, or the photo itself where its mask is not trusted."""
    return [clean_image(im, prob, params) or im for im, prob in zip(images, probs, strict=True)]
