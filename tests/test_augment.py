"""Photo-like augmentations: determinism, sizes, the product mask, clutter, and speed (printed only)."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from engine.augment import (
    BACKGROUNDS,
    EVAL_PARAMS,
    TRAIN_PARAMS,
    AugmentParams,
    clean_crop,
    foreground_mask,
    make_background,
    photo_like,
)
from indexer.demo import draw_shoe

RED = (210, 30, 30)


def product_shot(size=(300, 240)) -> tuple[Image.Image, np.ndarray]:
    """A red shape (ellipse + rectangle) on white, and its true mask."""
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    w, h = size
    draw.ellipse((0.2 * w, 0.3 * h, 0.7 * w, 0.75 * h), fill=RED)
    draw.rectangle((0.5 * w, 0.45 * h, 0.8 * w, 0.7 * h), fill=RED)
    truth = np.asarray(img)[..., 1] < 128
    return img, truth


def corner_patches(img: Image.Image, size: int = 8) -> np.ndarray:
    a = np.asarray(img, dtype=np.float32)
    return np.stack(
        [a[:size, :size], a[:size, -size:], a[-size:, :size], a[-size:, -size:]]
    ).mean(axis=(1, 2))  # (4, 3) mean colour per corner


def is_red(img: Image.Image) -> np.ndarray:
    a = np.asarray(img).astype(int)
    return (a[..., 0] > 110) & (a[..., 0] - a[..., 1] > 60) & (a[..., 0] - a[..., 2] > 60)


def test_same_seed_same_bytes_other_seed_other_bytes():
    img = draw_shoe("sneaker", (40, 130, 70), seed=3, size=200)
    for clutter in (True, False):
        a = photo_like(img, random.Random(7), clutter=clutter)
        b = photo_like(img, random.Random(7), clutter=clutter)
        c = photo_like(img, random.Random(8), clutter=clutter)
        assert a.tobytes() == b.tobytes()
        assert a.tobytes() != c.tobytes()
    assert clean_crop(img, random.Random(1)).tobytes() == clean_crop(img, random.Random(1)).tobytes()
    # per-image generators from a preset do not depend on call order, and presets differ
    assert EVAL_PARAMS.rng(0, "p1#1").random() == EVAL_PARAMS.rng(0, "p1#1").random()
    assert EVAL_PARAMS.rng(0, "p1#1").random() != TRAIN_PARAMS.rng(0, "p1#1").random()


@pytest.mark.parametrize("size", [(400, 400), (136, 102), (97, 301)])
def test_outputs_are_rgb_of_the_input_size(size):
    img, _ = product_shot(size)
    for out in (photo_like(img, random.Random(1)), photo_like(img, random.Random(2), clutter=False),
                clean_crop(img, random.Random(3))):
        assert out.mode == "RGB"
        assert out.size == size
    # greyscale or RGBA input is accepted too
    assert photo_like(img.convert("L"), random.Random(1)).mode == "RGB"


def test_foreground_mask_finds_a_drawn_shape():
    img, truth = product_shot()
    mask = foreground_mask(img)
    assert mask.dtype == bool and mask.shape == truth.shape
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95


def test_foreground_mask_fills_white_panels_and_handles_grey_backgrounds():
    # A white "sneaker" panel outlined in black on white: the enclosed white must count as product.
    img = Image.new("RGB", (200, 150), (255, 255, 255))
    ImageDraw.Draw(img).rectangle((40, 40, 160, 110), fill=(252, 252, 252), outline=(0, 0, 0), width=3)
    mask = foreground_mask(img)
    assert mask[75, 100]  # the centre of the white panel
    assert not mask[10, 10] and not mask[140, 190]
    # The same shape on a grey studio background: the background colour comes from the border.
    grey = Image.new("RGB", (200, 150), (200, 200, 200))
    ImageDraw.Draw(grey).ellipse((50, 40, 150, 110), fill=(20, 60, 200))
    mask = foreground_mask(grey)
    assert mask[75, 100] and not mask[5, 5]
    # A photo with no plain background: everything is "product".
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8))
    assert foreground_mask(noise).all()


def test_clutter_replaces_the_white_background_and_keeps_the_product():
    img, truth = product_shot((240, 240))
    cluttered_corners = 0
    for seed in range(10):
        out = photo_like(img, random.Random(seed))
        corners = corner_patches(out)
        if (np.abs(corners - 255).max(axis=1) > 30).sum() >= 3:
            cluttered_corners += 1
        # the product fills 50-90% of the canvas side and the crop keeps it: plenty of red remains
        assert is_red(out).mean() > 0.12, f"seed {seed}: product mostly lost"
    assert cluttered_corners >= 8
    # without clutter the background stays one flat colour (jittered white)
    for seed in range(5):
        corners = corner_patches(photo_like(img, random.Random(seed), clutter=False))
        assert np.ptp(corners, axis=0).max() < 25
        assert is_red(photo_like(img, random.Random(seed), clutter=False)).mean() > 0.5 * truth.mean()


def test_clean_crop_is_mild():
    img, truth = product_shot((240, 240))
    for seed in range(5):
        out = clean_crop(img, random.Random(seed))
        corners = corner_patches(out)
        assert corners.min() > 200  # still a white background
        assert is_red(out).mean() >= truth.mean()  # the crop enlarges the product, never cuts much


def test_every_background_kind_is_deterministic():
    for kind in BACKGROUNDS:
        a = make_background((64, 48), kind, random.Random(1), np.random.default_rng(1))
        b = make_background((64, 48), kind, random.Random(1), np.random.default_rng(1))
        assert a.size == (64, 48) and a.mode == "RGB"
        assert a.tobytes() == b.tobytes()
    with pytest.raises(ValueError, match="unknown background"):
        make_background((10, 10), "marble", random.Random(1), np.random.default_rng(1))


def test_params_are_validated():
    with pytest.raises(ValueError, match="crop_area"):
        AugmentParams(name="x", crop_area=(0.9, 0.6))
    with pytest.raises(ValueError, match="jpeg_quality"):
        AugmentParams(name="x", jpeg_quality=(0, 40))
    with pytest.raises(ValueError, match="backgrounds"):
        AugmentParams(name="x", backgrounds=("marble",))


def test_speed_is_reported():
    img = draw_shoe("boot", (190, 140, 90), seed=1, size=400)
    photo_like(img, random.Random(0))  # warm-up
    started = time.perf_counter()
    for seed in range(10):
        photo_like(img, random.Random(seed))
    per_image = (time.perf_counter() - started) / 10 * 1000
    print(f"\nphoto_like on 400x400: {per_image:.1f} ms per image")
    assert per_image < 2000  # only catches a pathological slowdown; the machine is shared
