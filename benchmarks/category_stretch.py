"""Choosing the learned whitening's category stretch, on validation products only.

Run: .venv/bin/python benchmarks/category_stretch.py --split RUN/split.json --weights RUN/weights.pth \
        --categories /tmp/combined/categories_unseen.csv [--stretch 0,0.5,1,2,3] [--seeds 0,1] [--size 160]
The learned whitening beside the weights must be one fitted without a stretch (`benchmarks/learned_whitening.py
--category-stretch 0`). Its category directions are found as `vsearch train` finds them (up to --products
training products of each category of the split's catalog, seeded), then for each stretch the projection is
measured as `benchmarks/train_eval.py --products val` measures it (masked pooling where the weights have a mask
head, GeM of the model card's conv block, the learned whitening centred on the evaluated catalog): the
split's validation products (clean, photo-like and cluttered recall, one run per query seed), category
precision@5 on the 500 category products `--products val` uses, same-product recall on shoes_multiview.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train_eval import DATASETS, VAL_CATEGORY_PRODUCTS, VAL_CATEGORY_SEED, choice_categories  # noqa: E402

from engine.evaluate import EvalReport, run_eval  # noqa: E402
from engine.features import FeatureExtractor  # noqa: E402
from engine.learned_whitening import find_category_directions, matching_learned_whitening  # noqa: E402
from engine.pooling import stretch_directions  # noqa: E402
from engine.settings import card_index_settings  # noqa: E402
from engine.train import (  # noqa: E402
    TrainConfig,
    category_sample,
    product_categories,
    read_train_catalog,
    write_val_catalog,
)


def metric(report: EvalReport, name: str) -> float:
    return next(m for m in report.methods if m.method == "gem+lwhite").metrics[name]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", required=True, type=Path, help="split.json written by vsearch train")
    parser.add_argument("--weights", required=True, help="weights.pth with an unstretched learned whitening beside it")
    parser.add_argument("--categories", required=True, type=Path, help="category catalog (products not trained on)")
    parser.add_argument("--categories-limit", type=int, default=1000, help="train_eval.py's reported sample size")
    parser.add_argument("--stretch", default="0,0.5,1,2,3", help="comma list of stretches to measure")
    parser.add_argument("--seeds", default="0,1", help="query augmentation seeds of the validation products")
    parser.add_argument("--products", type=int, default=TrainConfig.whitening_products,
                        help="training products per category the directions are found on")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    split = json.loads(args.split.read_text(encoding="utf-8"))
    catalog = read_train_catalog(Path(split["catalog"]), None)
    if catalog.sha256 != split["catalog_sha256"]:
        print("the catalog changed since the split was written", file=sys.stderr)
        return 2
    block = int(card_index_settings(args.weights).get("VSEARCH_FEATURE_BLOCK", 4))
    extractor = FeatureExtractor(args.weights, "auto", image_size=args.size, threads=args.threads, localize="auto",
                                 feature_block=block)
    learned, why = matching_learned_whitening(args.weights, extractor, "gem")
    if learned is None or learned.info.category_stretch:
        print(f"no unstretched learned whitening fits these settings ({why or 'stretched or missing'}): run "
              "benchmarks/learned_whitening.py --category-stretch 0 first", file=sys.stderr)
        return 2

    train_products = [p for p in split["train"] if p in catalog.products]
    source_of = {p: catalog.products[p].image for p in train_products}
    category_of = product_categories(catalog, train_products, TrainConfig.category_field)
    labelled = [(source_of[p], c) for p, c in category_sample(train_products, category_of, args.products, split["seed"])]
    found = find_category_directions(extractor, learned.projection, labelled)
    if found is None:
        print("the training products have fewer than 2 categories to stretch", file=sys.stderr)
        return 2
    print(f"directions: {found.directions.shape[1]} from {found.products} products of {', '.join(found.categories)}")

    val_csv = write_val_catalog(catalog, split["val"], args.split.with_name("val_catalog.csv"))
    choice_csv = choice_categories(args.categories, args.categories_limit, args.split.with_name("categories_choice.csv"))
    seeds = [int(s) for s in args.seeds.split(",")]
    print("| stretch | category P@5 | clean R@5 | photo-like R@5 | cluttered R@1 | cluttered R@5 | same-product R@1 / R@5 |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for stretch in (float(s) for s in args.stretch.split(",")):
        common = {"extractor": extractor, "poolings": ("gem",), "whitening": (True,), "progress": False,
                  "learned_whitening": stretch_directions(learned.projection, found.directions, stretch),
                  "localize": extractor.localizes, "include_seed_baseline": False}
        category = run_eval(choice_csv, column_map={"id": "product_id"}, limit=VAL_CATEGORY_PRODUCTS,
                            seed=VAL_CATEGORY_SEED, queries=(), **common)
        same = run_eval(DATASETS / "shoes_multiview/catalog.csv", column_map={"id": "product_id"}, queries=(),
                        **common)
        val = [run_eval(val_csv, seed=seed, **common) for seed in seeds]

        per_seed = {name: ", ".join(f"{metric(report, name):.3f}" for report in val)
                    for name in ("clean_r5", "plain_r5", "photo_r1", "photo_r5")}
        print(f"| {stretch:g} | {metric(category, 'category_p5'):.3f} | {per_seed['clean_r5']} | "
              f"{per_seed['plain_r5']} | {per_seed['photo_r1']} | {per_seed['photo_r5']} | {metric(same, 'same_r1'):.3f} / "
              f"{metric(same, 'same_r5'):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
