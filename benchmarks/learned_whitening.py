"""Fit the learned whitening of weights trained before `vsearch train` fitted it itself, as it does now.

Run: .venv/bin/python benchmarks/learned_whitening.py --split RUN/split.json --weights RUN/weights.pth [--products 300]
    [--category-stretch B]
The pairs come from --products of the split's training products (seeded, one catalog image each), embedded
with the settings of the weights' model card; the category directions from up to --products training products
of each category (column `category`), stretched by 1 + B (default: vsearch train's); writes RUN/weights.whitening.npz and the card's
`learned_whitening` entry (validation on the split's validation products with it and with PCA whitening),
exactly as `engine.train.train` does after its last epoch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.evaluate import sample_products  # noqa: E402
from engine.settings import card_index_settings  # noqa: E402
from engine.train import (  # noqa: E402
    TrainConfig,
    category_sample,
    fit_whitening,
    index_image_size,
    product_categories,
    read_train_catalog,
    write_val_catalog,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", required=True, type=Path, help="split.json written by vsearch train")
    parser.add_argument("--weights", required=True, type=Path, help="weights.pth with its model card beside it")
    parser.add_argument("--products", type=int, default=TrainConfig.whitening_products)
    parser.add_argument("--category-stretch", type=float, default=TrainConfig.category_stretch)
    args = parser.parse_args()
    split = json.loads(args.split.read_text(encoding="utf-8"))
    card_path = args.weights.with_suffix(".json")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    settings = card_index_settings(str(args.weights))
    catalog = read_train_catalog(Path(split["catalog"]), None)
    if catalog.sha256 != split["catalog_sha256"]:
        print("the catalog changed since the split was written", file=sys.stderr)
        return 2
    config = TrainConfig(catalog=Path(split["catalog"]), out=args.weights.parent, seed=split["seed"],
                         feature_block=int(settings.get("VSEARCH_FEATURE_BLOCK", 4)), whitening_products=args.products,
                         category_stretch=args.category_stretch)
    first_image: dict[str, str] = {}
    for image in catalog.images:
        first_image.setdefault(image.product_id, image.source)
    train_products = [p for p in split["train"] if p in first_image]
    products = sample_products(train_products, args.products, config.seed)
    labelled = category_sample(train_products, product_categories(catalog, train_products, config.category_field),
                               args.products, config.seed)
    val_catalog = write_val_catalog(catalog, split["val"], args.weights.with_name("val_catalog.csv"))
    size = int(settings.get("VSEARCH_IMAGE_SIZE", index_image_size(card["image_size"])))
    entry = fit_whitening(args.weights, products, labelled, first_image, val_catalog, size, config)
    card["learned_whitening"] = entry
    card_path.write_text(json.dumps(card, indent=2), encoding="utf-8")
    print(json.dumps(entry, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
