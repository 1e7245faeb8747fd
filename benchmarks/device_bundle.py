"""Copy what a training sweep on the device machine needs into one folder of the repository, which is all that
machine receives: training catalogs with their images, the category catalog with the images of the products
`train_eval.py --products val` measures, and shoes_multiview. Image paths are written relative to the folder.

Run: .venv/bin/python benchmarks/device_bundle.py .gpu --train /tmp/combined/train_catalog.csv \
        [--train /tmp/combined_own/train_catalog.csv] --categories /tmp/combined/categories_unseen.csv
Writes .gpu/<folder of each training catalog>.csv (combined.csv, combined_own.csv), .gpu/categories_unseen.csv,
.gpu/datasets/shoes_multiview and .gpu/images. Ignore the folder (`echo /.gpu/ >> .git/info/exclude`), carry it,
and on the device machine run `vsearch train .gpu/combined.csv ...` and `benchmarks/train_eval.py ... --products
val --categories .gpu/categories_unseen.csv --datasets .gpu/datasets`. The category catalog keeps every row, but
only the validation sample's images travel: `--products test` does not work from the bundle.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train_eval import (  # noqa: E402
    DATASETS,
    REPORT_CATEGORY_PRODUCTS,
    outside_report,
    read_catalog_rows,
    validation_category_products,
    write_catalog,
)


def bundled_path(image: str, datasets: Path) -> str:
    """Where an image of the shared datasets lies in the bundle, relative to it."""
    try:
        return "images/" + Path(image).resolve().relative_to(datasets.resolve()).as_posix()
    except ValueError:
        raise SystemExit(f"{image} is not under {datasets}: the bundle only takes the shared datasets' images") from None


def copy_catalog(source: Path, out: Path, datasets: Path, copy_ids: set[str] | None = None) -> int:
    """`source` rewritten to `out` with bundled image paths; the images of `copy_ids` (all where None) copied."""
    rows = read_catalog_rows(source)
    copied = 0
    for row in rows:
        original, row["image"] = row["image"], bundled_path(row["image"], datasets)
        if copy_ids is None or row["product_id"] in copy_ids:
            target = out.parent / row["image"]
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                shutil.copyfile(original, target)
            copied += 1
    write_catalog(rows, out)
    return copied


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=Path, action="append", required=True, help="a training catalog (repeatable)")
    parser.add_argument("--categories", type=Path, required=True, help="the unseen category products' catalog")
    parser.add_argument("--datasets", type=Path, default=DATASETS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for train in args.train:
        out = args.out / f"{train.resolve().parent.name}.csv"
        print(f"{out}: {copy_catalog(train, out, args.datasets)} images")
    ids = [row["product_id"] for row in read_catalog_rows(args.categories)]
    choice = outside_report(ids, REPORT_CATEGORY_PRODUCTS)
    val = validation_category_products([p for p in ids if p in choice])
    out = args.out / "categories_unseen.csv"
    print(f"{out}: {copy_catalog(args.categories, out, args.datasets, val)} images (the validation sample)")
    shutil.copytree(args.datasets / "shoes_multiview", args.out / "datasets" / "shoes_multiview", dirs_exist_ok=True)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{args.out}: {size / 2**20:.1f} MiB in all (the device machine takes 64 MiB with the repository)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
