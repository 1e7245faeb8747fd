"""Generators of test images in memory (valid, odd and hostile), shared by the image and search tests."""

from __future__ import annotations

import io
import random
import struct
import zlib
from functools import cache

from PIL import Image, ImageDraw

Color = tuple[int, int, int]
RED: Color = (220, 30, 30)
GREEN: Color = (30, 180, 60)
BLUE: Color = (30, 60, 200)
WHITE: Color = (255, 255, 255)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    """Save `img` in Pillow format `fmt` ("JPEG", "PNG", "HEIF", ...) and return the bytes."""
    if fmt.upper() in ("HEIF", "HEIC"):
        import pillow_heif

        pillow_heif.register_heif_opener()
        fmt = "HEIF"
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def solid(width: int, height: int, color: Color | int | tuple[int, ...] = RED, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (width, height), color)


def make_jpeg(width: int = 64, height: int = 48, color: Color = RED, *, quality: int = 90,
              progressive: bool = False, orientation: int | None = None) -> bytes:
    params: dict[str, object] = {"quality": quality, "progressive": progressive}
    if orientation is not None:
        params["exif"] = exif_with_orientation(orientation)
    return encode(solid(width, height, color), "JPEG", **params)


def make_png(width: int = 64, height: int = 48, color: Color | int | tuple[int, ...] = RED,
             mode: str = "RGB") -> bytes:
    return encode(solid(width, height, color, mode), "PNG")


def make_webp(width: int = 64, height: int = 48, color: Color = RED, *, lossless: bool = False) -> bytes:
    return encode(solid(width, height, color), "WEBP", lossless=lossless, quality=90)


def make_gif(width: int = 64, height: int = 48, color: Color = RED) -> bytes:
    return encode(solid(width, height, color), "GIF")


def make_bmp(width: int = 64, height: int = 48, color: Color = RED) -> bytes:
    return encode(solid(width, height, color), "BMP")


def make_tiff(width: int = 64, height: int = 48, color: Color = RED, *, compression: str | None = None) -> bytes:
    params = {"compression": compression} if compression else {}
    return encode(solid(width, height, color), "TIFF", **params)


def make_heif(width: int = 64, height: int = 48, color: Color = RED) -> bytes:
    return encode(solid(width, height, color), "HEIF", quality=90)


def make_animated_gif(colors: list[Color], width: int = 40, height: int = 30) -> bytes:
    """A GIF with one solid frame per colour (first frame = colors[0])."""
    frames = [solid(width, height, c) for c in colors]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def make_cmyk_jpeg(width: int = 64, height: int = 48, cmyk: tuple[int, int, int, int] = (0, 255, 255, 0)) -> bytes:
    """A CMYK JPEG (Pillow writes the Adobe APP14 marker); the default ink is pure red."""
    return encode(solid(width, height, cmyk, "CMYK"), "JPEG", quality=95)


def make_png_16bit_grey(values: list[int], height: int = 4) -> bytes:
    """A 16-bit greyscale PNG whose columns take `values` (0..65535) in order."""
    img = Image.new("I;16", (len(values), height))
    for x, v in enumerate(values):
        for y in range(height):
            img.putpixel((x, y), v)
    return encode(img, "PNG")


def make_rgba_png_half_transparent(width: int = 40, height: int = 20, color: Color = RED) -> bytes:
    """Left half opaque `color`, right half fully transparent black."""
    img = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    img.paste((*color, 255), (0, 0, width // 2, height))
    return encode(img, "PNG")


def make_palette_png_with_transparency(width: int = 40, height: int = 20, color: Color = BLUE) -> bytes:
    """A "P" PNG: palette index 0 is transparent black (right half), index 1 is `color` (left half)."""
    img = Image.new("P", (width, height), 0)
    img.putpalette([0, 0, 0, *color] + [0, 0, 0] * 254)
    img.paste(1, (0, 0, width // 2, height))
    return encode(img, "PNG", transparency=0)


def exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def make_marked_jpeg(width: int = 80, height: int = 40, orientation: int = 6) -> bytes:
    """White JPEG with a red block in the stored top-left corner and an EXIF orientation tag."""
    img = solid(width, height, WHITE)
    img.paste(RED, (0, 0, width // 4, height // 4))
    return encode(img, "JPEG", quality=95, exif=exif_with_orientation(orientation))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def set_png_size(png: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR width/height of a PNG (values masked to 32 bits) with a correct CRC."""
    if png[12:16] != b"IHDR" or len(png) < 33:
        return png
    ihdr = struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF) + png[24:29]
    return png[:8] + png_chunk(b"IHDR", ihdr) + png[33:]


@cache
def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid 1-bit greyscale PNG of zeros: a few tens of KB that would decode to width*height pixels."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def shoe_like_image(seed: int, size: tuple[int, int] = (224, 224)) -> Image.Image:
    """A simple coloured shoe-ish silhouette (sole, upper, laces) on white; deterministic per seed."""
    rng = random.Random(seed)
    w, h = size
    img = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(img)
    upper: Color = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    grey = rng.randrange(40, 256)
    sole: Color = (grey, grey, grey)
    left, right = w * rng.uniform(0.05, 0.15), w * rng.uniform(0.85, 0.95)
    sole_top, sole_bottom = h * rng.uniform(0.62, 0.7), h * rng.uniform(0.74, 0.82)
    ankle = left + (right - left) * rng.uniform(0.15, 0.35)
    heel_top = h * rng.uniform(0.2, 0.35)
    toe_top = h * rng.uniform(0.45, 0.55)
    draw.polygon(
        [(left, sole_top), (left, heel_top), (ankle + w * 0.12, heel_top),
         (ankle + w * 0.25, toe_top), (right, toe_top + h * 0.05), (right, sole_top)],
        fill=upper,
    )
    draw.rectangle([left, sole_top, right, sole_bottom], fill=sole)
    for i in range(rng.randint(2, 5)):
        x = ankle + w * (0.14 + 0.035 * i)
        draw.line([(x, heel_top + h * (0.05 + 0.04 * i)), (x + w * 0.03, heel_top + h * (0.08 + 0.04 * i))],
                  fill=WHITE, width=max(1, w // 100))
    return img


@cache
def make_large_jpeg(width: int = 4000, height: int = 3000, seed: int = 1, quality: int = 90) -> bytes:
    """A photo-sized JPEG with real structure (an upscaled shoe plus mild noise), for draft/timing tests."""
    base = shoe_like_image(seed, (width // 8, height // 8)).resize((width, height), Image.Resampling.BILINEAR)
    noise = Image.effect_noise((width, height), 12).convert("RGB")
    return encode(Image.blend(base, noise, 0.08), "JPEG", quality=quality)
