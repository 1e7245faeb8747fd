"""The one safe image loader: bytes or a file in, a fully decoded RGB `PIL.Image` out, or `ImageRejected`."""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import stat
from typing import Final

from PIL import Image, ImageOps

from engine.errors import ImageRejected

try:
    import pillow_heif
except ImportError:  # pragma: no cover - pillow-heif is a pinned dependency
    pillow_heif = None
else:
    # Thumbnails, depth and auxiliary images are never used; skipping them makes HEIC parsing cheaper.
    pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)

MAX_IMAGE_BYTES: Final = 20 * 1024 * 1024
MAX_PIXELS: Final = 40_000_000
MAX_SIDE: Final = 30_000
# Real progressive JPEGs have about 10 scans (a few dozen at most); thousands of tiny scans make
# libjpeg re-walk the whole image each time, which is a known way to make a small file decode for minutes.
MAX_JPEG_SCANS: Final = 200

# Our format name -> Pillow's plugin id. Pillow is only ever asked to try the one plugin that matches the
# magic bytes, so exotic plugins (EPS via Ghostscript, ...) are never reached with untrusted input.
_PIL_FORMATS: Final = {
    "jpeg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "gif": "GIF",
    "bmp": "BMP",
    "tiff": "TIFF",
    "heif": "HEIF",
}
Image.init()
_DECODABLE: frozenset[str] = frozenset(name for name, pil in _PIL_FORMATS.items() if pil in Image.OPEN)

_ALPHA_MODES: Final = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_HEIF_BRANDS: Final = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1", b"mif2"}
)
_AVIF_BRANDS: Final = frozenset({b"avif", b"avis"})
_VIDEO_BRANDS: Final = frozenset(
    {b"isom", b"iso2", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"avc1", b"qt  ", b"M4V ", b"M4A ",
     b"3gp4", b"3gp5", b"3gp6", b"3g2a", b"dash"}
)
_BMP_HEADER_SIZES: Final = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
_LUT_16_TO_8: Final = [(v * 255 + 32767) // 65535 for v in range(65536)]  # rounded v / 257


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / (1024 * 1024):.3g} MB" if n_bytes >= 100 * 1024 else f"{n_bytes} bytes"


def _send_hint(max_bytes: int) -> str:
    return f"Send a JPEG, PNG, WebP or HEIC photo under {_mb(max_bytes)}."


def sniff_format(data: bytes) -> str | None:
    """Name a supported format ("jpeg", "png", "webp", "gif", "bmp", "tiff", "heif") from magic bytes."""
    head = bytes(data[:32])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith(b"BM") and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "bmp"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "tiff"
    if head[4:8] == b"ftyp" and _ftyp_kind(data) == "heif":
        return "heif"
    return None


def _ftyp_kind(data: bytes) -> str | None:
    """Classify an ISO-BMFF file ("....ftyp") as "heif", "avif", "video" or None from its brands."""
    box_size = int.from_bytes(data[0:4], "big")
    major = bytes(data[8:12])
    compatible = bytes(data[16 : min(max(box_size, 16), 256)])
    brands = [major] + [compatible[i : i + 4] for i in range(0, len(compatible) - 3, 4)]
    if major in _AVIF_BRANDS or (b"avif" in brands and not any(b[:3] in (b"hei", b"hev") for b in brands)):
        return "avif"
    if any(b in _HEIF_BRANDS for b in brands):
        return "heif"
    if any(b in _VIDEO_BRANDS for b in brands):
        return "video"
    return None


def _sniff_unsupported(data: bytes) -> str | None:
    """Name a recognised file type that we deliberately do not decode, for a precise message."""
    head = bytes(data[:1024])
    if head[4:8] == b"ftyp":
        kind = _ftyp_kind(data)
        if kind == "avif":
            return "AVIF"
        if kind == "video":
            return "Video"
    if head.startswith(b"%PDF"):
        return "PDF"
    if head.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")):
        return "PostScript/EPS"
    if head.startswith(b"8BPS"):
        return "Photoshop (PSD)"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "JPEG 2000"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "JPEG XL"
    if head.startswith((b"\x00\x00\x01\x00", b"\x00\x00\x02\x00")) and len(head) > 6 and head[4] > 0:
        return "Icon (ICO)"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<svg", b"<?xml", b"<!doctype svg")) and b"<svg" in text:
        return "SVG"
    return None


def load_image(
    data: bytes,
    *,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode untrusted image bytes into a fully loaded RGB image, or raise `ImageRejected`.

    EXIF orientation is applied, alpha is flattened on white and high bit depths are scaled to 8 bits.
    With `draft_size`, JPEGs are decoded at the smallest 1/2, 1/4 or 1/8 scale whose sides stay
    >= draft_size (sides already below it are left alone).
    Pillow's own bomb guard (2 x `Image.MAX_IMAGE_PIXELS`, about 179 MP) still applies above `max_pixels`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"load_image needs bytes, not {type(data).__name__}")
    _check_options(max_bytes, max_pixels, draft_size)
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    hint = _send_hint(max_bytes)
    if size == 0:
        raise ImageRejected("empty", "The image is empty (0 bytes).", "Send the photo again.")
    if size > max_bytes:
        raise ImageRejected("too_large", f"The image is {_mb(size)}, over the {_mb(max_bytes)} limit.", hint)
    data = bytes(data)  # no copy for bytes; detaches bytearray/memoryview from the caller's buffer
    fmt = sniff_format(data)
    if fmt is None:
        other = _sniff_unsupported(data)
        if other is not None:
            raise ImageRejected("unsupported_format", f"{other} files are not supported.", hint)
        raise ImageRejected("not_an_image", "This file is not an image we can read.", hint)
    if fmt not in _DECODABLE:
        raise ImageRejected("unsupported_format", f"{fmt.upper()} images are not supported here.", hint)
    if fmt == "jpeg" and data.count(b"\xff\xda") > MAX_JPEG_SCANS:
        raise ImageRejected("corrupt", "The JPEG has an abnormal structure and cannot be decoded safely.",
                            "Send the photo again, or send a screenshot of it.")
    try:
        return _decode(data, fmt, max_pixels, draft_size)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_many_pixels", f"The image has more pixels than the {max_pixels / 1e6:g} "
                            "megapixel limit.", "Send a smaller photo; a normal phone photo works.") from exc
    except Exception as exc:  # Pillow and its C decoders raise many types; all mean "cannot decode"
        if _looks_truncated(fmt, data, exc):
            raise ImageRejected("truncated", "The image file is incomplete (it was cut off).",
                                "Send the photo again.") from exc
        raise ImageRejected("corrupt", "The image file is damaged and cannot be decoded.",
                            "Send the photo again, or send a screenshot of it.") from exc


def load_image_file(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Like `load_image` for a file; the size is checked before reading.

    A path that cannot be opened (missing, a directory, no permission) raises the usual `OSError`
    (e.g. `FileNotFoundError`): that is an operator problem, not a bad image. A FIFO or device is
    refused as "not_an_image" without waiting on it.
    """
    _check_options(max_bytes, max_pixels, draft_size)
    # O_NONBLOCK: opening a FIFO must not wait for a writer; it changes nothing for regular files.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", os.fspath(path))
        if not stat.S_ISREG(info.st_mode):
            raise ImageRejected("not_an_image", f"{os.fspath(path)!r} is not a regular file.",
                                _send_hint(max_bytes))
        if info.st_size > max_bytes:
            raise ImageRejected("too_large", f"The image is {_mb(info.st_size)}, over the {_mb(max_bytes)} "
                                "limit.", _send_hint(max_bytes))
        with open(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)  # one byte past the cap, in case the file grew since fstat
    finally:
        os.close(fd)
    return load_image(data, max_bytes=max_bytes, max_pixels=max_pixels, draft_size=draft_size)


def _check_options(max_bytes: int, max_pixels: int, draft_size: int | None) -> None:
    if max_bytes <= 0 or max_pixels <= 0:
        raise ValueError("max_bytes and max_pixels must be positive")
    if draft_size is not None and draft_size <= 0:
        raise ValueError("draft_size must be positive or None")


def _decode(data: bytes, fmt: str, max_pixels: int, draft_size: int | None) -> Image.Image:
    with Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]]) as img:
        _check_pixels(img.size, max_pixels)
        if draft_size is not None and img.format in ("JPEG", "MPO"):
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        _apply_orientation(img)
        rgb = _to_rgb(img)
        # The returned image must not be the file object that `with` is about to close.
        return img.copy() if rgb is img else rgb


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageRejected("corrupt", "The image says it has no pixels.", "Send the photo again.")
    if width > MAX_SIDE or height > MAX_SIDE or width * height > max_pixels:
        raise ImageRejected(
            "too_many_pixels",
            f"The image is {width}x{height} pixels; the limit is {max_pixels / 1e6:g} megapixels "
            f"and {MAX_SIDE} pixels per side.",
            "Send a smaller photo; a normal phone photo works.",
        )


def _apply_orientation(img: Image.Image) -> None:
    # Broken EXIF must not cost us a photo whose pixels decoded fine.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(img, in_place=True)


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _high_depth_to_l(img).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, (0, 0), rgba)
        return flat
    if mode == "RGB":
        return img
    return img.convert("RGB")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer and float grey images to 8-bit "L" instead of clipping them.

    Integers within 0..65535 are read as 16-bit (65535 -> 255); floats within 0..1 as unit range and
    within 0..255 as 8-bit; anything else is stretched from its own minimum to maximum.
    """
    if img.mode != "F":
        img = img.convert("I")
    low, high = img.getextrema()
    if img.mode == "I" and low >= 0 and high <= 65535:
        return img.point(_LUT_16_TO_8, "L")
    if not (math.isfinite(low) and math.isfinite(high)):
        scale, offset = 1.0, 0.5
    elif img.mode == "F" and low >= 0 and high <= 1:
        scale, offset = 255.0, 0.5
    elif img.mode == "F" and low >= 0 and high <= 255:
        scale, offset = 1.0, 0.5
    elif high > low:
        scale = 255.0 / (high - low)
        offset = 0.5 - low * scale
    else:
        scale, offset = 0.0, 0.0 if low < 0 else 255.0
    return img.point(lambda v: v * scale + offset).convert("L")


def _looks_truncated(fmt: str, data: bytes, exc: BaseException) -> bool:
    """Tell a file that was cut short from one that is damaged, after decoding it failed."""
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return True
    if fmt == "jpeg":  # the end-of-image marker must follow the last start-of-scan
        last_scan = data.rfind(b"\xff\xda")
        return last_scan < 0 or data.rfind(b"\xff\xd9") < last_scan
    if fmt == "png":
        return data.rfind(b"IEND") < 0
    if fmt == "gif":
        return not data.rstrip(b"\x00").endswith(b";")
    if fmt == "webp":
        return int.from_bytes(data[4:8], "little") + 8 > len(data)
    return False
