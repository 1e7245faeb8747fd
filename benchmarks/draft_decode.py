"""Time decoding a 4000x3000 JPEG with and without `draft_size` (README: Images)."""

from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image

from engine.images import load_image


def main() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((4000, 3000), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    data = buf.getvalue()
    for draft in (None, 1024, 512):
        times = []
        for _ in range(15):
            start = time.perf_counter()
            out = load_image(data, draft_size=draft)
            times.append(time.perf_counter() - start)
        print(f"draft_size {draft}: best {min(times) * 1000:.0f} ms, decoded {out.size[0]}x{out.size[1]}")


if __name__ == "__main__":
    main()
