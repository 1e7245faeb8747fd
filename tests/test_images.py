"""Tests of engine.images: real decoding of every supported format and refusal of every bad input class."""

from __future__ import annotations

import io
import os
import random
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from engine import images
from engine.errors import ImageRejected
from engine.images import MAX_IMAGE_BYTES, load_image, load_image_file, sniff_format

try:  # tests/ may be a package (tests/__init__.py) or a plain folder on sys.path; work with both
    from tests import image_factories as f
except ModuleNotFoundError:
    import image_factories as f

SHOES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "shoes"  # ../shared/datasets/shoes


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tol: int) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def rejected(data: bytes, **kwargs: object) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        load_image(data, **kwargs)  # type: ignore[arg-type]
    err = info.value
    assert err.message and err.hint, "every rejection must say what happened and what to do"
    return err


# --- every supported format decodes for real ---------------------------------------------------------

ROUND_TRIPS = [  # (id, bytes factory, colour drawn, tolerance for lossy codecs)
    ("jpeg", lambda: f.make_jpeg(64, 48, f.RED), f.RED, 6),
    ("jpeg-progressive", lambda: f.make_jpeg(64, 48, f.GREEN, progressive=True), f.GREEN, 6),
    ("png", lambda: f.make_png(64, 48, f.BLUE), f.BLUE, 0),
    ("webp-lossy", lambda: f.make_webp(64, 48, f.RED), f.RED, 8),
    ("webp-lossless", lambda: f.make_webp(64, 48, f.GREEN, lossless=True), f.GREEN, 0),
    ("gif", lambda: f.make_gif(64, 48, f.BLUE), f.BLUE, 0),
    ("bmp", lambda: f.make_bmp(64, 48, f.RED), f.RED, 0),
    ("tiff", lambda: f.make_tiff(64, 48, f.GREEN), f.GREEN, 0),
    ("tiff-lzw", lambda: f.make_tiff(64, 48, f.BLUE, compression="tiff_lzw"), f.BLUE, 0),
    ("heif", lambda: f.make_heif(64, 48, f.RED), f.RED, 10),
]


@pytest.mark.parametrize(("name", "make", "colour", "tol"), ROUND_TRIPS, ids=[r[0] for r in ROUND_TRIPS])
def test_round_trip_every_supported_format(name, make, colour, tol):
    data = make()
    assert sniff_format(data) == name.split("-")[0]
    img = load_image(data)
    assert img.mode == "RGB"
    assert img.size == (64, 48)
    for xy in [(0, 0), (32, 24), (63, 47)]:
        assert close_to(img.getpixel(xy), colour, tol), (xy, img.getpixel(xy), colour)


def test_result_is_fully_loaded_and_detached_from_the_input():
    data = bytearray(f.make_png(20, 10, f.RED))
    img = load_image(data)
    data[:] = b"\x00" * len(data)  # the caller reusing its buffer must not affect the image
    assert img.getpixel((5, 5)) == f.RED
    assert getattr(img, "fp", None) is None  # a plain Image, no file object behind it
    img.putpixel((0, 0), (1, 2, 3))  # writable, i.e. a real in-memory image


def test_shoe_like_images_decode_with_their_colours():
    for seed in range(5):
        source = f.shoe_like_image(seed, (160, 120))
        img = load_image(f.encode(source, "PNG"))
        assert img.tobytes() == source.tobytes()
        assert img.getpixel((0, 0)) == f.WHITE
        assert len(img.getcolors(maxcolors=10_000) or []) >= 3  # background, upper, sole at least


def test_animated_gif_returns_the_first_frame():
    img = load_image(f.make_animated_gif([f.RED, f.GREEN, f.BLUE]))
    assert img.mode == "RGB"
    assert img.size == (40, 30)
    assert img.getpixel((20, 15)) == f.RED


def test_animated_webp_returns_the_first_frame():
    frames = [f.solid(30, 20, c) for c in (f.GREEN, f.RED)]
    data = f.encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=100)
    assert load_image(data).getpixel((10, 10)) == f.GREEN


def test_cmyk_jpeg_converts_to_red():
    data = f.make_cmyk_jpeg(cmyk=(0, 255, 255, 0))
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    img = load_image(data)
    assert img.mode == "RGB"
    assert close_to(img.getpixel((10, 10)), (255, 0, 0), 8)


def test_16_bit_grey_png_is_scaled_not_clipped():
    data = f.make_png_16bit_grey([65535, 32768, 16384, 257, 0])
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    img = load_image(data)
    row = [img.getpixel((x, 1)) for x in range(5)]
    assert row == [(255, 255, 255), (128, 128, 128), (64, 64, 64), (1, 1, 1), (0, 0, 0)]


def test_32_bit_and_float_modes_become_sensible_grey():
    int_img = Image.new("I", (3, 1))
    for x, v in enumerate((-1000, 0, 1000)):
        int_img.putpixel((x, 0), v)
    row = [load_image(f.encode(int_img, "TIFF")).getpixel((x, 0))[0] for x in range(3)]
    assert row == [0, 128, 255]  # outside 0..65535: stretched from min to max

    float_img = Image.new("F", (3, 1))
    for x, v in enumerate((0.0, 0.5, 1.0)):
        float_img.putpixel((x, 0), v)
    row = [load_image(f.encode(float_img, "TIFF")).getpixel((x, 0))[0] for x in range(3)]
    assert row == [0, 128, 255]  # unit range floats


def test_16_bit_rgb_png_keeps_its_colour():
    raw = b"\x00" + (65535).to_bytes(2, "big") + (32768).to_bytes(2, "big") + b"\x00\x00"
    ihdr = (1).to_bytes(4, "big") * 2 + bytes([16, 2, 0, 0, 0])
    png = (b"\x89PNG\r\n\x1a\n" + f.png_chunk(b"IHDR", ihdr) + f.png_chunk(b"IDAT", zlib.compress(raw))
           + f.png_chunk(b"IEND", b""))
    assert load_image(png).getpixel((0, 0)) == (255, 128, 0)


def test_rgba_transparent_area_is_flattened_on_white():
    img = load_image(f.make_rgba_png_half_transparent(40, 20, f.RED))
    assert img.mode == "RGB"
    assert img.getpixel((5, 10)) == f.RED
    assert img.getpixel((35, 10)) == f.WHITE  # transparent black became white, not black


def test_semi_transparent_pixels_are_blended_with_white():
    data = f.encode(Image.new("RGBA", (4, 4), (0, 0, 0, 128)), "PNG")
    assert close_to(load_image(data).getpixel((1, 1)), (127, 127, 127), 1)


def test_palette_png_with_transparency_is_flattened_on_white():
    data = f.make_palette_png_with_transparency(40, 20, f.BLUE)
    assert Image.open(io.BytesIO(data)).mode == "P"
    img = load_image(data)
    assert img.getpixel((5, 10)) == f.BLUE
    assert img.getpixel((35, 10)) == f.WHITE


def _with_transparent_background(mode: str) -> Image.Image:
    """4x4 image whose background value is declared transparent and whose (0, 0) pixel is red-ish."""
    if mode == "P":
        img = Image.new("P", (4, 4), 0)
        img.putpalette([0, 0, 0, *f.RED] + [0, 0, 0] * 254)
        img.putpixel((0, 0), 1)
    elif mode == "L":
        img = Image.new("L", (4, 4), 0)
        img.putpixel((0, 0), 200)
    else:
        img = Image.new("RGB", (4, 4), (1, 2, 3))
        img.putpixel((0, 0), f.RED)
    return img


@pytest.mark.parametrize(
    ("fmt", "mode", "transparency", "kept"),
    [("GIF", "P", 0, f.RED), ("PNG", "L", 0, (200, 200, 200)), ("PNG", "RGB", (1, 2, 3), f.RED)],
)
def test_declared_transparent_colour_becomes_white(fmt, mode, transparency, kept):
    img = load_image(f.encode(_with_transparent_background(mode), fmt, transparency=transparency))
    assert img.getpixel((2, 2)) == f.WHITE
    assert img.getpixel((0, 0)) == kept


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [("L", 200, (200, 200, 200)), ("1", 1, (255, 255, 255)), ("LA", (100, 255), (100, 100, 100)),
     ("LA", (0, 0), (255, 255, 255)), ("RGBA", (10, 20, 30, 255), (10, 20, 30))],
)
def test_other_modes_become_rgb(mode, value, expected):
    img = load_image(f.make_png(8, 8, value, mode=mode))
    assert img.mode == "RGB"
    assert img.getpixel((3, 3)) == expected


def test_exif_orientation_6_rotates_the_marked_corner_to_top_right():
    data = f.make_marked_jpeg(80, 40, orientation=6)
    img = load_image(data)
    assert img.size == (40, 80)  # width and height swapped
    assert close_to(img.getpixel((img.width - 3, 2)), f.RED, 40)  # stored top-left -> displayed top-right
    for corner in [(2, 2), (2, img.height - 3), (img.width - 3, img.height - 3)]:
        assert close_to(img.getpixel(corner), f.WHITE, 10), corner


def test_exif_orientation_3_rotates_the_marked_corner_to_bottom_right():
    img = load_image(f.make_marked_jpeg(80, 40, orientation=3))
    assert img.size == (80, 40)
    assert close_to(img.getpixel((77, 37)), f.RED, 40)
    assert close_to(img.getpixel((2, 2)), f.WHITE, 10)


def test_heif_orientation_is_applied_once():
    source = f.solid(80, 40, f.WHITE)
    source.paste(f.RED, (0, 0, 20, 10))
    img = load_image(f.encode(source, "HEIF", quality=95, exif=f.exif_with_orientation(6)))
    assert img.size == (40, 80)
    assert close_to(img.getpixel((img.width - 3, 2)), f.RED, 40)
    assert close_to(img.getpixel((2, 2)), f.WHITE, 10)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_does_not_cost_a_good_photo():
    data = f.encode(f.solid(30, 20, f.GREEN), "JPEG", quality=95, exif=b"Exif\x00\x00MM\x00*garbage")
    img = load_image(data)
    assert img.size == (30, 20)
    assert close_to(img.getpixel((5, 5)), f.GREEN, 6)


# --- draft decoding ----------------------------------------------------------------------------------

def test_draft_decodes_a_large_jpeg_smaller_but_never_below_draft_size():
    data = f.make_large_jpeg(4000, 3000)
    assert load_image(data).size == (4000, 3000)
    # Pillow picks the largest of 1/1, 1/2, 1/4, 1/8 that keeps both sides >= draft_size.
    assert load_image(data, draft_size=1500).size == (2000, 1500)
    assert load_image(data, draft_size=512).size == (1000, 750)
    assert load_image(data, draft_size=224).size == (500, 375)
    assert load_image(data, draft_size=100).size == (500, 375)  # 1/8 is the smallest scale
    assert load_image(data, draft_size=5000).size == (4000, 3000)  # never upscales or shrinks below


def test_draft_is_faster_on_a_large_jpeg():
    data = f.make_large_jpeg(4000, 3000)

    def best_of(n: int, **kw: object) -> float:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            load_image(data, **kw)  # type: ignore[arg-type]
            times.append(time.perf_counter() - start)
        return min(times)

    full, draft = best_of(3), best_of(3, draft_size=512)
    assert draft < full, (full, draft)  # typically ~3.5x faster; generous because the machine is shared


def test_draft_is_applied_before_orientation():
    big = f.solid(1600, 800, f.WHITE)
    big.paste(f.RED, (0, 0, 400, 200))
    data = f.encode(big, "JPEG", quality=90, exif=f.exif_with_orientation(6))
    img = load_image(data, draft_size=300)
    assert img.size == (400, 800)  # decoded at 1/2 (800 // 300 = 2), then rotated
    assert close_to(img.getpixel((img.width - 3, 2)), f.RED, 40)


def test_draft_size_is_ignored_for_non_jpeg():
    assert load_image(f.make_png(400, 300), draft_size=64).size == (400, 300)


# --- bad input, each class ---------------------------------------------------------------------------

def test_empty_input():
    assert rejected(b"").reason == "empty"


def test_text_named_jpg_is_not_an_image(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_text("Hello, this is definitely not a JPEG.\n" * 5)
    with pytest.raises(ImageRejected) as info:
        load_image_file(path)
    assert info.value.reason == "not_an_image"
    assert "JPEG, PNG, WebP or HEIC" in info.value.hint


def test_random_bytes_are_not_an_image():
    rng = random.Random(7)
    for _ in range(20):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000)))
        assert rejected(data).reason in ("not_an_image", "unsupported_format", "corrupt", "truncated")
    assert rejected(bytes(range(256)) * 4).reason == "not_an_image"


def test_truncated_jpeg():
    data = f.encode(f.shoe_like_image(1, (400, 300)), "JPEG", quality=90)
    for cut in (len(data) // 2, len(data) - 2, 120):
        assert rejected(data[:cut]).reason == "truncated", cut


def test_truncated_png():
    data = f.encode(f.shoe_like_image(2, (400, 300)), "PNG")
    for cut in (len(data) // 2, 45):
        assert rejected(data[:cut]).reason == "truncated", cut


def test_png_missing_only_its_end_chunk_still_decodes():
    data = f.encode(f.shoe_like_image(2, (100, 80)), "PNG")
    assert data.endswith(b"IEND\xaeB`\x82")
    assert load_image(data[:-12]).size == (100, 80)  # all pixel data is there


def test_corrupt_png_crc_and_jpeg_garbage():
    png = bytearray(f.make_png(40, 30))
    png[40] ^= 0xFF  # inside IDAT: CRC no longer matches
    assert rejected(bytes(png)).reason == "corrupt"
    jpeg = f.make_jpeg(40, 30)
    assert rejected(jpeg[:3] + b"\x00" * 200).reason in ("corrupt", "truncated")


def test_png_bomb_is_refused_fast_without_decoding():
    bomb = f.png_bomb(20_000, 20_000)
    assert len(bomb) < 100_000
    start = time.perf_counter()
    err = rejected(bomb)
    assert time.perf_counter() - start < 0.5
    assert err.reason == "too_many_pixels"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(("width", "height"), [(10_000, 10_000), (7000, 6000), (30_001, 10), (10, 30_001)])
def test_too_many_pixels_or_too_long_a_side(width, height):
    start = time.perf_counter()
    err = rejected(f.png_bomb(width, height))
    assert time.perf_counter() - start < 0.5
    assert err.reason == "too_many_pixels"
    if width * height < 179_000_000:
        assert f"{width}x{height}" in err.message


def test_max_pixels_is_configurable():
    data = f.make_png(100, 100)
    assert rejected(data, max_pixels=9_999).reason == "too_many_pixels"
    assert load_image(data, max_pixels=10_000).size == (100, 100)


def test_png_header_claiming_a_huge_size_is_refused():
    data = f.set_png_size(f.make_png(4, 4), 2**31 - 1, 2**31 - 1)
    assert rejected(data).reason == "too_many_pixels"
    assert rejected(f.set_png_size(f.make_png(4, 4), 0, 5)).reason == "corrupt"


def test_oversized_bytes_are_refused_before_decoding():
    data = f.make_png(10, 10)
    err = rejected(data, max_bytes=len(data) - 1)
    assert err.reason == "too_large"
    assert load_image(data, max_bytes=len(data)).size == (10, 10)
    big = b"\xff\xd8\xff" + b"\x00" * MAX_IMAGE_BYTES
    err = rejected(big)
    assert err.reason == "too_large"
    assert "20 MB" in err.hint
    assert rejected(memoryview(big)).reason == "too_large"  # checked before any copy


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10"/>', "SVG"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "SVG"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "PDF"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", "PostScript"),
        (b"8BPS\x00\x01" + b"\x00" * 40, "PSD"),
        (b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\x00" * 40, "Video"),
    ],
)
def test_recognised_but_unsupported_formats(data, what):
    err = rejected(data)
    assert err.reason == "unsupported_format"
    assert what in err.message


def test_avif_is_unsupported_even_though_pillow_could_read_it():
    err = rejected(f.encode(f.solid(16, 16), "AVIF"))
    assert err.reason == "unsupported_format"
    assert "AVIF" in err.message


def test_heif_without_the_plugin_is_unsupported(monkeypatch):
    data = f.make_heif(16, 16)
    monkeypatch.setattr(images, "_DECODABLE", images._DECODABLE - {"heif"})
    err = rejected(data)
    assert err.reason == "unsupported_format"
    assert "HEIF" in err.message


def test_eps_is_never_handed_to_pillow_even_with_a_jpeg_name(tmp_path):
    # Pillow would run Ghostscript on EPS; only the plugin matching the magic bytes is ever tried.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    path = tmp_path / "x.jpg"
    path.write_bytes(eps)
    with pytest.raises(ImageRejected) as info:
        load_image_file(path)
    assert info.value.reason == "unsupported_format"


def test_jpeg_with_an_absurd_number_of_scans_is_refused():
    data = f.make_jpeg(16, 16)
    comment = b"\xff\xda" * (images.MAX_JPEG_SCANS + 1)
    hostile = data[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + data[2:]
    assert rejected(hostile).reason == "corrupt"
    assert load_image(data).size == (16, 16)


def test_only_image_rejected_escapes_for_typed_nonsense():
    with pytest.raises(TypeError):
        load_image("not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        load_image(b"x", max_bytes=0)
    with pytest.raises(ValueError):
        load_image(b"x", draft_size=0)


# --- sniffing ----------------------------------------------------------------------------------------

def test_sniff_format():
    assert sniff_format(f.make_jpeg()) == "jpeg"
    assert sniff_format(f.make_png()) == "png"
    assert sniff_format(f.make_webp()) == "webp"
    assert sniff_format(f.make_gif()) == "gif"
    assert sniff_format(f.make_bmp()) == "bmp"
    assert sniff_format(f.make_tiff()) == "tiff"
    assert sniff_format(f.make_heif()) == "heif"
    assert sniff_format(b"") is None
    assert sniff_format(b"BMW sneakers are great, honestly") is None
    assert sniff_format(b"%PDF-1.4") is None
    assert sniff_format(f.encode(f.solid(8, 8), "AVIF")) is None


# --- files -------------------------------------------------------------------------------------------

def test_load_image_file_reads_a_real_file(tmp_path):
    path = tmp_path / "shoe.webp"
    path.write_bytes(f.encode(f.shoe_like_image(3, (120, 90)), "WEBP", quality=90))
    img = load_image_file(path)
    assert img.mode == "RGB"
    assert img.size == (120, 90)
    assert load_image_file(str(path)).size == (120, 90)


def test_load_image_file_missing_file_raises_file_not_found(tmp_path):
    # Documented choice: a path that cannot be opened is an operator error, not a bad image.
    with pytest.raises(FileNotFoundError):
        load_image_file(tmp_path / "nope.jpg")


def bytes_read_by_this_process() -> int:
    with open("/proc/self/io") as fh:
        return int(next(line for line in fh if line.startswith("rchar:")).split()[1])


def test_load_image_file_refuses_an_oversized_file_without_reading_it(tmp_path):
    if not Path("/proc/self/io").exists():
        pytest.skip("needs Linux /proc/self/io to count bytes read")
    path = tmp_path / "huge.jpg"
    with open(path, "wb") as fh:
        fh.write(f.make_jpeg(8, 8))
        fh.truncate(MAX_IMAGE_BYTES + 1)  # sparse: 20 MB on paper
    before = bytes_read_by_this_process()
    with pytest.raises(ImageRejected) as info:
        load_image_file(path)
    assert info.value.reason == "too_large"
    assert bytes_read_by_this_process() - before < 1024 * 1024


def test_load_image_file_refuses_devices_and_fifos_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # opening it for reading would wait forever for a writer
    targets = [fifo] + [Path("/dev/zero")] * Path("/dev/zero").exists()
    for target in targets:
        start = time.perf_counter()
        with pytest.raises(ImageRejected) as info:
            load_image_file(target)
        assert info.value.reason == "not_an_image", target
        assert time.perf_counter() - start < 1


def test_load_image_file_on_a_directory_raises_is_a_directory(tmp_path):
    with pytest.raises(IsADirectoryError):
        load_image_file(tmp_path)


def test_load_image_file_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(ImageRejected) as info:
        load_image_file(path)
    assert info.value.reason == "empty"


# --- concurrency and real photos ---------------------------------------------------------------------

def test_concurrent_loads_are_independent():
    inputs = [(f.make_jpeg(50, 40, c), c) for c in (f.RED, f.GREEN, f.BLUE)] + [(f.png_bomb(), None)]
    errors: list[BaseException] = []

    def work(data: bytes, colour: tuple[int, int, int] | None) -> None:
        try:
            for _ in range(20):
                if colour is None:
                    with pytest.raises(ImageRejected):
                        load_image(data)
                else:
                    assert close_to(load_image(data).getpixel((25, 20)), colour, 6)
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=args) for args in inputs * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors


@pytest.mark.dataset
def test_real_shoe_photos_decode():
    folder = SHOES / "images"
    if not folder.is_dir():
        pytest.skip(f"dataset not present at {folder}")
    paths = sorted(folder.rglob("*.jpg"))[:50]
    if len(paths) < 50:
        pytest.skip(f"only {len(paths)} JPEGs in {folder}, need 50")
    for path in paths:
        img = load_image_file(path)
        assert img.mode == "RGB", path
        assert min(img.size) >= 32, (path, img.size)
        low, high = img.convert("L").getextrema()
        assert high - low > 50, path  # a photo, not a blank
