"""A demo catalog drawn on the fly (no third-party images): stylised shoes in several styles and colours."""

from __future__ import annotations

import csv
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

STYLES = ("sneaker", "boot", "sandal", "loafer")
COLOURS = {
    "Red": (200, 40, 40),
    "Navy": (30, 40, 110),
    "Black": (25, 25, 25),
    "Tan": (190, 140, 90),
    "Green": (40, 130, 70),
    "Grey": (130, 130, 135),
    "Pink": (230, 130, 170),
    "Yellow": (230, 190, 40),
}
DEMO_URL = "https://demo-shop.example/products/{id}"


def draw_shoe(style: str, colour: tuple[int, int, int], seed: int, size: int = 400, mirror: bool = False) -> Image.Image:
    """One product shot: a shoe of `style` on a white background, varied by `seed`."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    s = size / 400
    dark = tuple(max(0, c - 60) for c in colour)
    light = tuple(min(255, c + 70) for c in colour)
    sole_colour = (240, 240, 235) if style == "sneaker" else (60, 45, 35)
    toe = rng.randint(40, 70)
    heel_h = {"boot": 200, "sneaker": 110, "loafer": 85, "sandal": 40}[style] + rng.randint(-10, 10)
    base = 280 + rng.randint(-10, 10)
    # sole
    d.rounded_rectangle([40 * s, base * s, 360 * s, (base + 28) * s], radius=12 * s, fill=sole_colour, outline=dark)
    if style == "sandal":
        for k in range(3):
            x = 110 + k * 80 + rng.randint(-8, 8)
            d.line([(x * s, base * s), ((x + 40) * s, (base - 70) * s)], fill=colour, width=int(18 * s))
        d.ellipse([250 * s, (base - 90) * s, 300 * s, (base - 40) * s], outline=colour, width=int(10 * s))
    else:
        top = base - heel_h
        upper = [
            (45 * s, base * s),
            (45 * s, top * s),
            (120 * s, (top - 5) * s),
            (170 * s, (base - 90 + rng.randint(-10, 10)) * s),
            ((360 - toe) * s, (base - 55) * s),
            (358 * s, (base - 20) * s),
            (355 * s, base * s),
        ]
        d.polygon(upper, fill=colour, outline=dark)
        if style == "sneaker":
            for k in range(4 + rng.randint(0, 2)):
                x = 150 + k * 22
                d.line([(x * s, (base - 95 + k * 9) * s), ((x + 18) * s, (base - 80 + k * 9) * s)], fill=(250, 250, 250), width=int(5 * s))
            d.arc([150 * s, (base - 70) * s, 300 * s, (base + 10) * s], 190, 330, fill=light, width=int(9 * s))
        elif style == "boot":
            d.rectangle([45 * s, top * s, 120 * s, (top + 25) * s], fill=dark)
            for k in range(5):
                d.ellipse([(95) * s, (top + 40 + k * 25) * s, (105) * s, (top + 50 + k * 25) * s], fill=light)
        else:  # loafer
            d.rectangle([200 * s, (base - 70) * s, 260 * s, (base - 58) * s], fill=dark)
    img = img.filter(ImageFilter.GaussianBlur(0.6))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else img


def make_demo_catalog(
    folder: Path,
    products: int = 24,
    image_size: int = 400,
    id_prefix: str = "demo",
    url_template: str = DEMO_URL,
) -> Path:
    """Write `products` demo products (every fourth with a second, mirrored photo) and a catalog.csv.

    Another `id_prefix`/`url_template` gives a second catalog whose answers are told apart from the first.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS.items())
    rows = []
    for n in range(products):
        style = STYLES[n % len(STYLES)]
        colour_name, colour = colours[(n // len(STYLES) + n) % len(colours)]
        pid = f"{id_prefix}-{n + 1:03d}"
        views = [False, True] if n % 4 == 0 else [False]
        for v, mirror in enumerate(views):
            name = f"images/{pid}-{v + 1}.jpg"
            draw_shoe(style, colour, seed=n, size=image_size, mirror=mirror).save(folder / name, quality=90)
            rows.append(
                {
                    "id": pid,
                    "title": f"{colour_name} {style.title()} #{n + 1}",
                    "url": url_template.format(id=pid),
                    "image": name,
                    "price": f"{29 + (n * 7) % 90}.90",
                    "currency": "EUR",
                    "category": style,
                    "brand": "Demo",
                }
            )
    path = folder / "catalog.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
