"""Seeded augmentations that turn a clean catalogue shot into something a shopper's phone might send."""

from __future__ import annotations

import colorsys
import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

BACKGROUNDS = ("flat", "gradient", "noise", "blobs", "stripes", "checker", "shapes")

Box = tuple[int, int, int, int]  # left, top, right, bottom (right/bottom exclusive)


@dataclass(frozen=True)
class AugmentParams:
    """Ranges for one augmentation preset; `name` also salts the per-image seeds (see `rng`)."""

    name: str
    crop_area: tuple[float, float] = (0.6, 0.9)  # fraction of the canvas area kept by the crop
    max_rotation: float = 15.0  # degrees, either way
    perspective: float = 0.08  # each corner moves inward by up to this fraction of the side
    brightness: tuple[float, float] = (0.7, 1.3)
    contrast: tuple[float, float] = (0.7, 1.3)
    saturation: tuple[float, float] = (0.7, 1.3)
    hue_shift: float = 0.03  # fraction of the colour circle, either way
    channel_gain: float = 0.08  # white-balance cast: each channel scaled by 1 +- this
    softness: tuple[float, float] = (1.0, 1.6)  # blur: the scene is composed this many times smaller, then enlarged
    noise_sigma: tuple[float, float] = (0.0, 5.0)  # sensor noise, in 0-255 units
    jpeg_quality: tuple[int, int] = (35, 45)
    product_scale: tuple[float, float] = (0.5, 0.9)  # product bounding box vs. canvas, cluttered shots
    shadow_probability: float = 0.6
    backgrounds: tuple[str, ...] = BACKGROUNDS
    clean_crop_area: tuple[float, float] = (0.8, 0.95)
    clean_jitter: float = 0.08  # brightness / contrast / saturation factor 1 +- this
    clean_jpeg_quality: tuple[int, int] = (80, 92)

    def __post_init__(self) -> None:
        for name in ("crop_area", "clean_crop_area", "product_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise ValueError(f"AugmentParams.{name} must satisfy 0 < low <= high <= 1, got {(low, high)}")
        for name in ("jpeg_quality", "clean_jpeg_quality"):
            low, high = getattr(self, name)
            if not 1 <= low <= high <= 95:
                raise ValueError(f"AugmentParams.{name} must lie in 1..95, got {(low, high)}")
        unknown = set(self.backgrounds) - set(BACKGROUNDS)
        if unknown or not self.backgrounds:
            raise ValueError(f"AugmentParams.backgrounds must be a non-empty subset of {BACKGROUNDS}")

    def rng(self, seed: int, key: str) -> random.Random:
        """A generator for one image: stable across runs and processes, independent of processing order."""
        return random.Random(f"{self.name}:{seed}:{key}")


EVAL_PARAMS = AugmentParams(name="eval")
TRAIN_PARAMS = AugmentParams(
    name="train",
    crop_area=(0.5, 0.95),
    max_rotation=20.0,
    perspective=0.1,
    brightness=(0.6, 1.4),
    contrast=(0.6, 1.4),
    saturation=(0.6, 1.4),
    jpeg_quality=(30, 90),
    product_scale=(0.4, 0.95),
)


def photo_like(
    img: Image.Image, rng: random.Random, *, clutter: bool = True, params: AugmentParams = EVAL_PARAMS
) -> Image.Image:
    """Crop, rotate, warp, recolour, blur and JPEG-compress `img`; with `clutter`, put the product on a busy background.

    The output has the input's size and is RGB. The same generator state gives the same bytes.
    """
    return photo_like_with_mask(img, rng, clutter=clutter, params=params)[0]


def photo_like_with_mask(
    img: Image.Image, rng: random.Random, *, clutter: bool = True, params: AugmentParams = EVAL_PARAMS
) -> tuple[Image.Image, Image.Image]:
    """`photo_like` and the product's soft mask in the output ("L", same size): the mask head's training target.

    The mask draws nothing from `rng`, so the photo is byte-identical to `photo_like`'s.
    """
    img = img.convert("RGB")
    size = img.size
    nprng = np.random.default_rng(rng.getrandbits(64))
    product, box = cut_out(img, foreground_mask(img))
    # The scene is composed at a reduced size and enlarged once at the end: that single resize is
    # the lens blur, and it makes everything before it cheaper.
    softness = rng.uniform(*params.softness)
    work = (max(1, round(size[0] / softness)), max(1, round(size[1] / softness)))

    if clutter:
        canvas = make_background(work, rng.choice(params.backgrounds), rng, nprng)
        scale = rng.uniform(*params.product_scale) * min(work[0] / product.width, work[1] / product.height)
        product = warp(resize_to(product, scale), rng, params)
        fit = min(1.0, work[0] / product.width, work[1] / product.height)
        if fit < 1.0:
            product = resize_to(product, fit)
        left = rng.randint(0, work[0] - product.width)
        top = rng.randint(0, work[1] - product.height)
    else:
        canvas = Image.new("RGB", work, background_colour(np.asarray(img)))
        product = warp(resize_to(product, 1 / softness), rng, params)
        left = round((box[0] + box[2]) / (2 * softness) - product.width / 2)
        top = round((box[1] + box[3]) / (2 * softness) - product.height / 2)
    product = product.convert("RGBA")
    alpha = product.getchannel("A")
    if clutter and rng.random() < params.shadow_probability:
        canvas = cast_shadow(canvas, alpha, (left, top), rng)
    canvas.paste(product.convert("RGB"), (left, top), alpha)
    mask = Image.new("L", work, 0)
    mask.paste(alpha, (left, top))

    placed = clip_box((left, top, left + product.width, top + product.height), work)
    crop = choose_crop(work, placed, params.crop_area, rng)
    canvas = canvas.resize(size, Image.Resampling.BILINEAR, box=crop)
    mask = mask.resize(size, Image.Resampling.BILINEAR, box=crop)
    canvas = jitter_colour(
        canvas, rng, params.brightness, params.contrast, params.saturation, params.hue_shift, params.channel_gain
    )
    canvas = add_noise(canvas, rng.uniform(*params.noise_sigma), nprng)
    return jpeg(canvas, rng.randint(*params.jpeg_quality)), mask


def clean_crop(img: Image.Image, rng: random.Random, *, params: AugmentParams = EVAL_PARAMS) -> Image.Image:
    """A mild variant of `photo_like`: a crop that keeps the product, slight colour change, light JPEG."""
    img = img.convert("RGB")
    box = mask_box(foreground_mask(img)) or (0, 0, img.width, img.height)
    out = img.crop(choose_crop(img.size, box, params.clean_crop_area, rng)).resize(img.size, Image.Resampling.BICUBIC)
    j = params.clean_jitter
    out = jitter_colour(out, rng, (1 - j, 1 + j), (1 - j, 1 + j), (1 - j, 1 + j))
    return jpeg(out, rng.randint(*params.clean_jpeg_quality))


def resize_to(img: Image.Image, scale: float) -> Image.Image:
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.BICUBIC)


def foreground_mask(img: Image.Image, *, threshold: int = 10) -> np.ndarray:
    """Boolean (H, W) mask of the product in a catalogue shot on a plain background.

    The background colour is the median of the border pixels (white for most shops, grey for some).
    Pixels further than `threshold` from it are foreground; a small opening drops JPEG specks, a closing
    joins thin gaps, and regions enclosed by foreground on all four sides (white panels of a white
    sneaker) are filled. A photo without a plain background gives an all-True mask.
    """
    img = img.convert("RGB")
    bg = background_colour(np.asarray(img))
    red, green, blue = ImageChops.difference(img, Image.new("RGB", img.size, bg)).split()
    diff = np.asarray(ImageChops.lighter(ImageChops.lighter(red, green), blue))
    border = np.concatenate([diff[0], diff[-1], diff[:, 0], diff[:, -1]])
    if np.mean(border <= threshold) < 0.6:
        return np.ones(diff.shape, dtype=bool)
    mask = dilate(erode(diff > threshold, 1), 1)
    mask = erode(dilate(mask, 2), 2)
    return fill_enclosed(mask)


def background_colour(arr: np.ndarray) -> tuple[int, int, int]:
    """Median colour of the outermost pixel ring of an (H, W, 3) uint8 array."""
    ring = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    r, g, b = np.median(ring, axis=0)
    return int(r), int(g), int(b)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2r+1) square, done separably with shifted ORs (much faster than PIL's MaxFilter)."""
    out = mask.copy()
    for axis in (0, 1):
        grown = out.copy()
        n = out.shape[axis]
        for shift in range(1, radius + 1):
            if shift >= n:
                break
            ahead = [slice(None)] * 2
            behind = [slice(None)] * 2
            ahead[axis], behind[axis] = slice(shift, None), slice(None, n - shift)
            grown[tuple(behind)] |= out[tuple(ahead)]
            grown[tuple(ahead)] |= out[tuple(behind)]
        out = grown
    return out


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a (2r+1) square; pixels beyond the border count as foreground."""
    return ~dilate(~mask, radius)


def fill_enclosed(mask: np.ndarray) -> np.ndarray:
    """Add the pixels that have foreground to their left, right, top and bottom (a cheap hole fill)."""
    height, width = mask.shape
    in_row, in_col = mask.any(axis=1), mask.any(axis=0)
    first_x = np.where(in_row, mask.argmax(axis=1), width)
    last_x = np.where(in_row, width - 1 - mask[:, ::-1].argmax(axis=1), -1)
    first_y = np.where(in_col, mask.argmax(axis=0), height)
    last_y = np.where(in_col, height - 1 - mask[::-1].argmax(axis=0), -1)
    xs, ys = np.arange(width), np.arange(height)[:, None]
    between_x = (xs >= first_x[:, None]) & (xs <= last_x[:, None])
    between_y = (ys >= first_y) & (ys <= last_y)
    return mask | (between_x & between_y)


def mask_box(mask: np.ndarray) -> Box | None:
    """Bounding box of the True pixels, or None when there are none."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def cut_out(img: Image.Image, mask: np.ndarray) -> tuple[Image.Image, Box]:
    """The product as a premultiplied-alpha ("RGBa") image cropped to its box, and that box.

    A mask covering almost nothing or almost everything means no usable cut-out: the whole picture is
    the product then.
    """
    box = mask_box(mask)
    if box is None or not 0.005 < mask.mean() < 0.95:
        box = (0, 0, img.width, img.height)
        alpha = Image.new("L", img.size, 255)
    else:
        alpha = Image.fromarray((mask * 255).astype(np.uint8))
    rgba = img.convert("RGBA")
    rgba.putalpha(alpha)
    rgba = rgba.crop(box)
    rgba.putalpha(rgba.getchannel("A").filter(ImageFilter.GaussianBlur(0.8)))
    return rgba.convert("RGBa"), box


def warp(product: Image.Image, rng: random.Random, params: AugmentParams) -> Image.Image:
    """Rotate and perspective-distort an "RGBa" image in one resampling; the canvas grows to fit."""
    w, h = product.size
    angle = math.radians(rng.uniform(-params.max_rotation, params.max_rotation))
    cos, sin = math.cos(angle), math.sin(angle)
    out_w = max(1, math.ceil(abs(w * cos) + abs(h * sin)))
    out_h = max(1, math.ceil(abs(w * sin) + abs(h * cos)))
    p = params.perspective
    src = [(0, 0), (w, 0), (w, h), (0, h)]
    dst = []
    for x, y in src:
        # Move each corner inward along the product's own axes, then rotate it about the centre.
        lx = x - w / 2 + (1 if x == 0 else -1) * rng.uniform(0, p) * w
        ly = y - h / 2 + (1 if y == 0 else -1) * rng.uniform(0, p) * h
        dst.append((out_w / 2 + lx * cos + ly * sin, out_h / 2 - lx * sin + ly * cos))
    coeffs = perspective_coefficients(dst, src)
    return product.transform(
        (out_w, out_h), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BILINEAR, fillcolor=(0, 0, 0, 0)
    )


def perspective_coefficients(
    dst: list[tuple[float, float]], src: list[tuple[float, float]]
) -> tuple[float, ...]:
    """The 8 PIL PERSPECTIVE coefficients that map output points `dst` to input points `src`."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    return tuple(float(c) for c in np.linalg.solve(np.array(rows, dtype=float), np.array(rhs, dtype=float)))


def clip_box(box: Box, size: tuple[int, int]) -> Box:
    left, top = max(0, box[0]), max(0, box[1])
    right, bottom = min(size[0], box[2]), min(size[1], box[3])
    if right <= left or bottom <= top:
        return 0, 0, size[0], size[1]
    return left, top, right, bottom


def choose_crop(size: tuple[int, int], keep: Box, area: tuple[float, float], rng: random.Random) -> Box:
    """A crop of `area` (fraction) of the canvas, aspect 3:4..4:3, placed to keep as much of `keep` as it can."""
    width, height = size
    fraction = rng.uniform(*area)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = min(width, max(1, round(math.sqrt(fraction * width * height * aspect))))
    ch = min(height, max(1, round(math.sqrt(fraction * width * height / aspect))))
    left = place(cw, width, keep[0], keep[2], rng)
    top = place(ch, height, keep[1], keep[3], rng)
    return left, top, left + cw, top + ch


def place(extent: int, total: int, lo: int, hi: int, rng: random.Random) -> int:
    """Start of a window of `extent` in [0, total) that covers [lo, hi), or stays inside it when too small."""
    if extent >= hi - lo:
        first, last = hi - extent, lo
    else:
        first, last = lo, hi - extent
    first, last = max(0, first), min(total - extent, last)
    if first > last:
        first = last = min(max(0, round((lo + hi - extent) / 2)), total - extent)
    return rng.randint(first, last)


def random_colour(rng: random.Random, saturation: tuple[float, float] = (0.0, 0.7)) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(0.2, 0.95))
    return round(r * 255), round(g * 255), round(b * 255)


def make_background(
    size: tuple[int, int], kind: str, rng: random.Random, nprng: np.random.Generator
) -> Image.Image:
    """A procedurally generated RGB background of one of the `BACKGROUNDS` kinds."""
    width, height = size
    a, b = np.array(random_colour(rng), np.float32), np.array(random_colour(rng), np.float32)
    if kind == "flat":
        return Image.new("RGB", size, tuple(int(c) for c in a))
    if kind in ("shapes", "blobs"):
        canvas = Image.new("RGB", size, tuple(int(c) for c in a))
        draw = ImageDraw.Draw(canvas)
        for _ in range(rng.randint(6, 20)):
            x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
            x1, y1 = x0 + rng.uniform(0.05, 0.5) * width, y0 + rng.uniform(0.05, 0.5) * height
            colour = random_colour(rng, (0.0, 0.9))
            shape = "ellipse" if kind == "blobs" else rng.choice(("rectangle", "ellipse", "polygon", "line"))
            if shape == "ellipse":
                draw.ellipse((x0, y0, x1, y1), fill=colour)
            elif shape == "rectangle":
                draw.rectangle((x0, y0, x1, y1), fill=colour)
            elif shape == "polygon":
                points = [(rng.uniform(x0, x1), rng.uniform(y0, y1)) for _ in range(rng.randint(3, 6))]
                draw.polygon(points, fill=colour)
            else:
                draw.line((x0, y0, x1, y1), fill=colour, width=max(1, round(rng.uniform(0.005, 0.03) * width)))
        if kind == "blobs":
            canvas = canvas.filter(ImageFilter.GaussianBlur(max(width, height) / rng.uniform(20, 60)))
        return canvas
    if kind == "noise":
        t = value_noise(size, nprng)
    else:
        theta = rng.uniform(0, math.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        u = xs * math.cos(theta) + ys * math.sin(theta)
        if kind == "gradient":
            t = (u - u.min()) / max(1e-6, float(u.max() - u.min()))
        elif kind == "stripes":
            period = rng.uniform(0.03, 0.2) * max(width, height)
            t = (np.sin(2 * math.pi * u / period) > rng.uniform(-0.5, 0.5)).astype(np.float32)
        elif kind == "checker":
            v = -xs * math.sin(theta) + ys * math.cos(theta)
            cell = rng.uniform(0.04, 0.2) * max(width, height)
            t = ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)
        else:
            raise ValueError(f"unknown background kind {kind!r}; use one of {BACKGROUNDS}")
    arr = a + (b - a) * t[..., None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def value_noise(size: tuple[int, int], nprng: np.random.Generator) -> np.ndarray:
    """Perlin-like smooth noise in [0, 1]: three octaves of random grids upsampled bicubically."""
    width, height = size
    total = np.zeros((height, width), np.float32)
    for cells, weight in ((3, 0.5), (7, 0.3), (17, 0.2)):
        grid = nprng.random((cells, cells), dtype=np.float32)
        total += weight * np.asarray(Image.fromarray(grid).resize(size, Image.Resampling.BICUBIC))
    return np.clip((total - total.min()) / max(1e-6, float(total.max() - total.min())), 0, 1)


def cast_shadow(
    canvas: Image.Image, alpha: Image.Image, position: tuple[int, int], rng: random.Random
) -> Image.Image:
    """Darken the canvas under a blurred, offset copy of the product's alpha."""
    shade = Image.new("L", canvas.size, 0)
    offset = max(1, round(0.03 * canvas.height))
    shade.paste(alpha, (position[0] + rng.randint(-offset, offset), position[1] + rng.randint(0, 2 * offset)))
    shade = shade.filter(ImageFilter.GaussianBlur(max(2.0, 0.02 * max(canvas.size))))
    darkness = rng.uniform(0.25, 0.55)
    shade = shade.point([round(v * darkness) for v in range(256)])
    return Image.composite(Image.new("RGB", canvas.size, (0, 0, 0)), canvas, shade)


def jitter_colour(
    img: Image.Image,
    rng: random.Random,
    brightness: tuple[float, float],
    contrast: tuple[float, float],
    saturation: tuple[float, float],
    hue_shift: float = 0.0,
    channel_gain: float = 0.0,
) -> Image.Image:
    """Brightness, contrast, saturation, hue rotation and a white-balance cast, applied as one colour matrix."""
    b = rng.uniform(*brightness)
    c = rng.uniform(*contrast)
    s = rng.uniform(*saturation)
    theta = 2 * math.pi * rng.uniform(-hue_shift, hue_shift)
    gains = np.array([1 + rng.uniform(-channel_gain, channel_gain) for _ in range(3)])
    mean = b * float(np.asarray(img.convert("L")).mean())
    # Saturation and hue rotation as in SVG's feColorMatrix; both keep greys grey.
    grey = np.outer(np.ones(3), [0.213, 0.715, 0.072])
    sat = s * np.eye(3) + (1 - s) * grey
    turn = np.array([[-0.213, -0.715, 0.928], [0.143, 0.140, -0.283], [-0.787, 0.715, 0.072]])
    hue = grey + math.cos(theta) * (np.eye(3) - grey) + math.sin(theta) * turn
    linear = np.diag(gains) @ hue @ sat * (c * b)
    offset = (1 - c) * mean * gains  # contrast pulls towards the mean grey
    matrix = np.concatenate([linear, offset[:, None]], axis=1)
    return img.convert("RGB", tuple(float(v) for v in matrix.ravel()))


def add_noise(img: Image.Image, sigma: float, nprng: np.random.Generator) -> Image.Image:
    """Add grey sensor grain of standard deviation `sigma`, drawn at half resolution (2x2 grains)."""
    if sigma <= 0:
        return img
    half = ((img.height + 1) // 2, (img.width + 1) // 2)
    grain = np.clip(128 + sigma * nprng.standard_normal(half, dtype=np.float32), 0, 255).astype(np.uint8)
    plane = Image.fromarray(grain).resize(img.size, Image.Resampling.NEAREST)
    return ImageChops.add(img, Image.merge("RGB", (plane, plane, plane)), 1.0, -128)


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    """Round-trip through JPEG at `quality`, like a chat app does."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")
