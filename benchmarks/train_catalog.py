"""The training catalog of the README's training run: the shared shoes set plus a seeded sample of the
boots / sandals / shoes set, with absolute image paths; the rest of that set (never trained on) is written
as a second catalog for category precision on unseen products.

Run: .venv/bin/python benchmarks/train_catalog.py OUT_DIR [--categories 1200] [--seed 0] [--shoes-category NAME]
Writes OUT_DIR/train_catalog.csv and OUT_DIR/categories_unseen.csv.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path

DATASETS = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"
FIELDS = ["product_id", "title", "category", "image"]


def rows(dataset: Path, category: str | None = None) -> list[dict[str, str]]:
    """The dataset's rows; `category` replaces every row's category when given."""
    with (dataset / "catalog.csv").open(newline="", encoding="utf-8") as fh:
        return [{"product_id": r["product_id"], "title": r["title"], "category": category or r["category"],
                 "image": str((dataset / r["image"]).resolve())} for r in csv.DictReader(fh)]


def write(path: Path, items: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(items)
    print(f"{path}: {len({r['product_id'] for r in items})} products, {len(items)} images")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--categories", type=int, default=1200, help="boots/sandals/shoes products to train on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", type=Path, default=DATASETS)
    parser.add_argument("--shoes-category", default=None,
                        help="category of the shoes set's products (default: its own, casual_shoes); `shoes` labels "
                             "them as the boots / sandals / shoes set labels its shoes, as one shop would")
    args = parser.parse_args()
    shoes, cats = args.datasets / "shoes", args.datasets / "shoes_categories"
    if not (shoes / "catalog.csv").is_file() or not (cats / "catalog.csv").is_file():
        print(f"the shared datasets are not at {args.datasets}", file=sys.stderr)
        return 2
    category_rows = rows(cats)
    ids = sorted({r["product_id"] for r in category_rows})
    chosen = set(random.Random(f"train-catalog:{args.seed}").sample(ids, min(args.categories, len(ids))))
    args.out.mkdir(parents=True, exist_ok=True)
    trained = [r for r in category_rows if r["product_id"] in chosen]
    write(args.out / "train_catalog.csv", rows(shoes, args.shoes_category) + trained)
    write(args.out / "categories_unseen.csv", [r for r in category_rows if r["product_id"] not in chosen])
    return 0


if __name__ == "__main__":
    sys.exit(main())
