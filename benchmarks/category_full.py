"""Category precision@5 on every category product outside the validation sample, and on disjoint parts of it.

Run: .venv/bin/python benchmarks/category_full.py --categories /tmp/combined/categories_unseen.csv \
        --choice RUN/categories_choice.csv --weights random RUN/weights.pth [--size 160] [--parts 3]
        [--category-boost B] [--shape-weight W]
`benchmarks/train_eval.py` reports category precision on a seeded sample of 1,000 products (the index holds
those 1,000); `--products val` chose settings on 500 others (a seeded sample of `categories_choice.csv`, which
`train_eval.py --products val` writes beside the split). This script leaves those 500 out and measures the
rest: once with all of them in one index, and once per part (seeded shuffle, `--parts` disjoint parts of
about the reported sample's size), so the spread between parts shows the noise of a 1,000-product figure.
Each weights spec is measured as the engine uses it: at --size px, GeM of the model card's conv block, masked
pooling where the weights carry a mask head; rows gem (no whitening), gem+white (PCA whitening fitted on the
evaluated products) and gem+lwhite (the learned whitening beside the weights, where there is one); with
--category-boost B, each of them also re-ranked by the category vote of its top products ("+catB", as
`Searcher.search` does with VSEARCH_CATEGORY_BOOST=B), and with --shape-weight W and masked pooling also with
the voters chosen by silhouette too ("+catB+shapeW", VSEARCH_SHAPE_WEIGHT=W).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train_eval import read_catalog_rows, validation_category_products, write_catalog  # noqa: E402 (same folder)

from engine.evaluate import run_eval  # noqa: E402
from engine.features import FeatureExtractor  # noqa: E402
from engine.learned_whitening import matching_learned_whitening  # noqa: E402
from engine.settings import card_index_settings  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--categories", type=Path, required=True, help="category catalog (products not trained on)")
    parser.add_argument("--choice", type=Path, required=True, help="categories_choice.csv written by train_eval.py")
    parser.add_argument("--weights", nargs="+", required=True, help="weights specs (anything VSEARCH_WEIGHTS takes)")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--parts", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--category-boost", type=float, default=0.0, help="also re-ranked by the category vote")
    parser.add_argument("--shape-weight", type=float, default=0.0,
                        help="with --category-boost: also with the voters chosen by silhouette too (masked pooling)")
    args = parser.parse_args()
    methods = ["gem", "gem+white", "gem+lwhite"]
    boosts = (args.category_boost,) if args.category_boost else ()
    shapes = (args.shape_weight,) if args.shape_weight and boosts else ()
    methods += [f"{m}+cat{b:g}" for b in boosts for m in methods] + [
        f"{m}+cat{b:g}+shape{w:g}" for b in boosts for w in shapes for m in methods]

    rows = read_catalog_rows(args.categories)
    validation = validation_category_products([r["product_id"] for r in read_catalog_rows(args.choice)])
    measured = [r for r in rows if r["product_id"] not in validation]
    random.Random(7).shuffle(measured)
    share = len(measured) // args.parts
    with tempfile.TemporaryDirectory() as tmp:
        catalogs = {"all": write_catalog(measured, Path(tmp) / "all.csv")}
        for i in range(args.parts):
            catalogs[f"part {i + 1}"] = write_catalog(measured[i * share : (i + 1) * share], Path(tmp) / f"part{i}.csv")
        print(f"{len(rows)} products, {len(validation)} validation products left out, {len(measured)} measured; "
              f"{args.parts} parts of {share}", flush=True)
        print("| weights | products | " + " | ".join(methods) + " |")
        print("|---|---|" + "---|" * len(methods), flush=True)
        for spec in args.weights:
            block = int(card_index_settings(spec).get("VSEARCH_FEATURE_BLOCK", 5))
            extractor = FeatureExtractor(spec, "auto", image_size=args.size, threads=args.threads, localize="auto",
                                         feature_block=block)
            learned = matching_learned_whitening(spec, extractor, "gem")[0]
            for name, catalog in catalogs.items():
                report = run_eval(catalog, extractor=extractor, column_map={"id": "product_id"}, queries=(),
                                  poolings=("gem",), whitening=(False, True), include_seed_baseline=False,
                                  learned_whitening=learned.projection if learned else None,
                                  localize=extractor.localizes, category_boosts=boosts, shape_weights=shapes,
                                  progress=False)
                p5 = {m.method: m.metrics["category_p5"] for m in report.methods}
                cells = [f"{p5[m]:.3f}" if m in p5 else "-" for m in methods]
                print(f"| {extractor.weights_id} | {name}: {report.products} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
