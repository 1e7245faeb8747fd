"""WhatsApp and VSEARCH_PUBLIC_URL: a local image is sent by its public link only when WhatsApp takes the file as is."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from bot.whatsapp import UPLOAD_MAX_BYTES, link_as_is


def test_only_small_jpeg_and_png_files_are_sent_by_link(tmp_path: Path):
    jpg, png, webp = tmp_path / "a.jpg", tmp_path / "b.PNG", tmp_path / "c.webp"
    for path, fmt in ((jpg, "JPEG"), (png, "PNG"), (webp, "WEBP")):
        Image.new("RGB", (40, 30), (200, 10, 10)).save(path, format=fmt)
    assert link_as_is(jpg) and link_as_is(png)
    assert not link_as_is(webp)  # uploaded re-encoded as JPEG instead
    big = tmp_path / "big.jpg"
    big.write_bytes(jpg.read_bytes() + b"\0" * UPLOAD_MAX_BYTES)
    assert not link_as_is(big) and not link_as_is(tmp_path / "missing.jpg")
