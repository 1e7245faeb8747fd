"""Property-based fuzzing of engine.images.load_image: mutated real images may only ever raise ImageRejected."""

from __future__ import annotations

import contextlib
import resource
import struct
import time
import zlib
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.errors import ImageRejected
from engine.images import load_image

try:  # tests/ may be a package (tests/__init__.py) or a plain folder on sys.path; work with both
    from tests import image_factories as f
except ModuleNotFoundError:
    import image_factories as f

MAX_SECONDS = 2.0
MAX_EXTRA_MB = 600  # biggest legal decode here is ~36 MP: RGBA (144 MB) + RGB copies, far below this

# Pillow and libtiff warn about the damage they see; the damage is the point here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")

# Dimension values that stress header parsers: zero, tiny, around PIL/format limits, our caps, overflow.
DIMENSIONS = [0, 1, 2, 255, 256, 4095, 4096, 6000, 16383, 16384, 30000, 30001, 65535, 2**31 - 1, 2**32 - 1]


@cache
def seeds() -> dict[str, bytes]:
    """Small valid images of every fuzzed kind, built once in memory."""
    shoe = f.shoe_like_image(11, (24, 16))
    rgba = shoe.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((24, 16)))
    return {
        "jpeg": f.encode(shoe, "JPEG", quality=80),
        "jpeg-progressive": f.encode(shoe, "JPEG", quality=80, progressive=True),
        "jpeg-exif": f.encode(shoe, "JPEG", quality=80, exif=f.exif_with_orientation(6)),
        "png": f.encode(shoe, "PNG"),
        "png-rgba": f.encode(rgba, "PNG"),
        "png-palette": f.make_palette_png_with_transparency(24, 16),
        "png-16bit": f.make_png_16bit_grey([0, 1000, 40000, 65535], height=3),
        "gif": f.make_animated_gif([f.RED, f.GREEN], 24, 16),
        "webp-lossy": f.encode(shoe, "WEBP", quality=70),
        "webp-lossless": f.encode(rgba, "WEBP", lossless=True),
        "bmp": f.encode(shoe, "BMP"),
        "tiff": f.encode(shoe, "TIFF", compression="tiff_lzw"),
        "heif": f.encode(shoe, "HEIF", quality=60),
    }


def set_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the first SOFn frame header's height/width."""
    pos = 2
    while pos + 9 < len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2, 0xC3) or 0xC5 <= marker <= 0xCF and marker not in (0xC8, 0xCC):
            dims = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
            return data[: pos + 5] + dims + data[pos + 9 :]
        pos += 2 + length
    return data


def set_gif_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the logical screen size and the first frame's size."""
    dims = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    out = data[:6] + dims + data[10:]
    frame = out.find(b"\x2c", 13)
    if frame > 0 and frame + 9 <= len(out):
        out = out[: frame + 5] + dims + out[frame + 9 :]
    return out


def set_webp_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the VP8 (lossy) frame size or the VP8L (lossless) packed size."""
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30:
        dims = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)
        return data[:26] + dims + data[30:]
    if chunk == b"VP8L" and len(data) >= 25:
        packed = ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14) | (data[24] >> 4 << 28)
        return data[:21] + struct.pack("<I", packed) + data[25:]
    return data


def set_size(data: bytes, width: int, height: int) -> bytes:
    if data.startswith(b"\x89PNG"):
        return f.set_png_size(data, width, height)
    if data.startswith(b"\xff\xd8"):
        return set_jpeg_size(data, width, height)
    if data.startswith(b"GIF"):
        return set_gif_size(data, width, height)
    if data.startswith(b"RIFF"):
        return set_webp_size(data, width, height)
    return data


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute every chunk CRC so mutations reach the decoder instead of the CRC check."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    out, pos = bytearray(data[:8]), 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(data):
            break
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : end]
        out += data[pos : pos + 8] + payload + struct.pack(">I", zlib.crc32(kind + payload))
        pos = end + 4
    return bytes(out + data[pos:])


def mutate(data: bytes, op: tuple) -> bytes:
    kind, *args = op
    n = max(len(data), 1)
    if kind == "flip":
        pos, bit = args[0] % n, args[1]
        return data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1 :] if data else data
    if kind == "truncate":
        return data[: args[0] % n]
    if kind == "insert":
        pos = args[0] % n
        return data[:pos] + args[1] + data[pos:]
    if kind == "delete":
        pos = args[0] % n
        return data[:pos] + data[pos + args[1] :]
    if kind == "overwrite":
        pos = args[0] % n
        return data[:pos] + args[1] + data[pos + len(args[1]) :]
    if kind == "splice":
        other = seeds()[args[0]]
        return data[: args[1] % n] + other[args[2] % max(len(other), 1) :]
    if kind == "size":
        return set_size(data, args[0], args[1])
    if kind == "fix_crcs":
        return fix_png_crcs(data)
    raise AssertionError(kind)


positions = st.integers(min_value=0, max_value=1 << 16)
mutations = st.one_of(
    st.tuples(st.just("flip"), positions, st.integers(0, 7)),
    st.tuples(st.just("truncate"), positions),
    st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), positions, st.integers(1, 256)),
    st.tuples(st.just("overwrite"), positions, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("splice"), st.sampled_from(sorted(seeds())), positions, positions),
    st.tuples(st.just("size"), st.sampled_from(DIMENSIONS), st.sampled_from(DIMENSIONS)),
    st.tuples(st.just("fix_crcs")),
)


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith(field + ":")).split()[1])


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0) so each example's own peak can be read."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@settings(
    max_examples=500,
    derandomize=True,  # the same examples every run: stable in CI
    database=None,
    deadline=None,  # timing is asserted explicitly below, on the decode alone
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(seed=st.sampled_from(sorted(seeds())), ops=st.lists(mutations, min_size=1, max_size=4))
def test_mutated_images_only_raise_image_rejected_quickly_and_in_bounded_memory(seed, ops):
    data = seeds()[seed]
    for op in ops:
        data = mutate(data, op)
    per_example_peak = reset_peak_rss()
    rss_before = rss_kb("VmRSS") if per_example_peak else 0
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        img = load_image(data)
    except ImageRejected as err:
        assert err.reason in ImageRejected.REASONS
        assert err.message
    else:
        assert img.mode == "RGB"
        assert img.width * img.height > 0
    elapsed = time.perf_counter() - start
    assert elapsed < MAX_SECONDS, f"{seed} {ops}: took {elapsed:.2f} s"
    if per_example_peak:
        extra_mb = (rss_kb("VmHWM") - rss_before) / 1024
    else:  # without a resettable peak only growth of the lifetime peak can be seen
        extra_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before) / 1024
    assert extra_mb < MAX_EXTRA_MB, f"{seed} {ops}: peak memory grew by {extra_mb:.0f} MB"


@settings(max_examples=100, derandomize=True, database=None, deadline=None)
@given(prefix=st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP",
                               b"BM", b"II*\x00", b"MM\x00*", b"\x00\x00\x00\x18ftypheic"]),
       body=st.binary(max_size=512))
def test_garbage_behind_a_valid_magic_number_is_rejected(prefix, body):
    start = time.perf_counter()
    with contextlib.suppress(ImageRejected):
        load_image(prefix + body)
    assert time.perf_counter() - start < MAX_SECONDS
