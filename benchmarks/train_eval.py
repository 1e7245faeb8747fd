"""Before/after table of a `vsearch train` run, on products the training never saw.

Run: .venv/bin/python benchmarks/train_eval.py --split RUN/split.json --weights random RUN/weights.pth \
        [--categories CATALOG] [--categories-limit 1000] [--latency 30] [--size 224] [--products test|val]
        [--localize both|on|crop|mask|off] [--white-dims 0,256] [--feature-block 4] [--category-boosts 0.1,inf]
        [--shape-weights 0.5,0.7] [--datasets ../shared/datasets] [--json out.json]
For each weights spec (anything VSEARCH_WEIGHTS accepts), at --size px, GeM pooling of conv block --feature-block
(default 5, the engine's; for trained weights as their model card gives), every configuration of
whitening (fitted on the evaluated catalog itself, as `vsearch index` does; "+lwhite": the learned whitening
beside the weights, where it fits these settings, centred on the evaluated catalog), alpha query expansion
(re-ranking, "+aqe"), optionally re-ranking by the category vote ("+catB", --category-boosts; with masked
pooling also with the voters chosen by silhouette too, "+catB+shapeW", --shape-weights) and, for weights with
a mask head, localisation on and off:
- on the split's test products (held out and never used to pick an epoch): clean, photo-like and
  cluttered photo-like recall@1/@5 (engine.evaluate.run_eval, the code of `vsearch eval`);
- category precision@5 on --categories (a seeded sample of products that were not in the training
  catalog) and same-product recall on shoes_multiview (real second photos);
- `--products val` measures the split's validation products instead, and category precision on 500 other
  products of --categories (outside the report's seeded sample): for choosing settings without looking
  at the products that are reported;
- `--weights thumbnail` is a control without any model: each image as an 8x8 grey thumbnail (its darkness,
  padded on white as the model's input), i.e. little more than the product's silhouette;
- whole-search latency: `Searcher.search` p50 of a 1280x960 cluttered phone-like JPEG against an index of
  the test products (decode, mask pass and clean-up where on, embedding, Annoy), batch 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.evaluate import SEED_BASELINE, run_eval, sample_products  # noqa: E402
from engine.features import IMAGENET_MEAN as MEAN  # noqa: E402
from engine.features import IMAGENET_STD as STD  # noqa: E402
from engine.features import FeatureExtractor, preprocess  # noqa: E402
from engine.learned_whitening import matching_learned_whitening  # noqa: E402
from engine.settings import EngineSettings, card_index_settings  # noqa: E402
from engine.train import read_train_catalog, write_val_catalog  # noqa: E402

DATASETS = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"
# --products val: category precision on this many products outside the report's sample, drawn with this seed.
VAL_CATEGORY_PRODUCTS, VAL_CATEGORY_SEED = 500, 1
REPORT_CATEGORY_PRODUCTS = 1000  # --categories-limit: the report's sample (seed 0)
QUERY_METRICS = ("clean_r1", "clean_r5", "plain_r1", "plain_r5", "photo_r1", "photo_r5")


def search_latency(spec: str, localize: str, catalog_csv: Path, runs: int, seed: int, size: int, block: int) -> float:
    """p50 ms of `Searcher.search` (whole search) for one cluttered 1280x960 JPEG, after two warm-ups."""
    from search_latency import latency_photo  # same folder: the same timed query (needs Annoy, so only here)

    from engine.search import Searcher
    from indexer.build import build_index

    with tempfile.TemporaryDirectory() as tmp:
        settings = EngineSettings(data_dir=Path(tmp), weights=spec, pooling="gem", whitening=False,
                                  localize=localize, image_size=size, feature_block=block)
        build_index(catalog_csv, settings)
        searcher = Searcher(settings)
        data = latency_photo(catalog_csv, seed)
        times = []
        for _ in range(runs + 2):
            start = time.perf_counter()
            searcher.search(data, 5)
            times.append(time.perf_counter() - start)
    return float(np.median(times[2:]) * 1000)


def read_catalog_rows(catalog: Path) -> list[dict[str, str]]:
    """A CSV catalog's rows, local image paths made absolute (relative ones are relative to its folder, as the
    catalog reader takes them), so that the rows can be written elsewhere."""
    with catalog.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if not row["image"].startswith(("http://", "https://")):
            row["image"] = str((catalog.parent / row["image"]).resolve())
    return rows


def outside_report(product_ids: Sequence[str], report_limit: int) -> set[str]:
    """The products outside the report's seeded sample (run_eval's limit, seed 0)."""
    reported = set(sample_products(product_ids, report_limit, 0))
    return {p for p in product_ids if p not in reported}


def validation_category_products(choice_ids: Sequence[str]) -> set[str]:
    """The category products `--products val` measures: run_eval's seeded draw from the choice catalog."""
    return set(sample_products(choice_ids, VAL_CATEGORY_PRODUCTS, VAL_CATEGORY_SEED))


def choice_categories(catalog: Path, report_limit: int, out: Path) -> Path:
    """The products of `catalog` outside the report's seeded sample, written to `out` with absolute image paths."""
    rows = read_catalog_rows(catalog)
    kept = outside_report([r["product_id"] for r in rows], report_limit)
    return write_catalog([r for r in rows if r["product_id"] in kept], out)


def write_catalog(rows: list[dict[str, str]], path: Path) -> Path:
    """`rows` as a CSV catalog, their keys as its header."""
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


class ThumbnailExtractor:
    """The control `--weights thumbnail`: an 8x8 grey thumbnail per image as a (64, 1, 1) map, no model.

    Darkness (1 - grey) so that the white padding and background are 0 and GeM of a 1x1 map keeps the values."""

    weights_id, precision, image_size, side = "thumbnail 8x8 grey", "none", 8, 8

    def conv_maps(self, images) -> torch.Tensor:
        normalised = np.stack([preprocess(im, self.side) for im in images])  # (N, 3, 8, 8), ImageNet-normalised
        grey = (normalised * STD[None, :, None, None] + MEAN[None, :, None, None]).mean(axis=1)  # 0..1, white = 1
        return torch.from_numpy((1.0 - grey).reshape(len(images), -1, 1, 1)).clamp(min=0).float()

    def localize(self, images):
        return list(images)

    def frame_catalog_image(self, image):
        return image


def feature_block(spec: str, requested: int | None) -> int:
    """--feature-block, else what the weights' model card gives, else the engine's 5."""
    return requested or int(card_index_settings(spec).get("VSEARCH_FEATURE_BLOCK", 5))


def evaluate(spec: str, localize: str, test_csv: Path, args: argparse.Namespace) -> list[dict[str, object]]:
    block = feature_block(spec, args.feature_block)
    extractor = ThumbnailExtractor() if spec == "thumbnail" else FeatureExtractor(
        spec, "auto", image_size=args.size, threads=args.threads or None, localize=localize, feature_block=block)
    on = getattr(extractor, "localizes", False)
    learned = None if spec == "thumbnail" else matching_learned_whitening(spec, extractor, "gem")[0]
    common = {"extractor": extractor, "poolings": ("gem",), "whitening": (False, True), "progress": False,
              "white_dims": args.white_dims, "learned_whitening": learned.projection if learned else None,
              "localize": on, "query_expansion": True, "category_boosts": args.category_boosts,
              "shape_weights": args.shape_weights, "seed": args.seed}
    start = time.perf_counter()
    test = run_eval(test_csv, include_seed_baseline=args.seed_baseline and not on, **common)
    cats = run_eval(args.categories, column_map={"id": "product_id"}, limit=args.categories_limit, queries=(),
                    include_seed_baseline=False, **{**common, "seed": args.categories_seed})
    multi = run_eval(args.datasets / "shoes_multiview/catalog.csv", column_map={"id": "product_id"}, queries=(),
                     include_seed_baseline=False, **common)
    seconds = round(time.perf_counter() - start, 1)
    latency = (search_latency(spec, localize, test_csv, args.latency, args.seed, args.size, block)
               if args.latency and spec != "thumbnail" else None)
    rows = []
    for method in test.methods:
        row: dict[str, object] = {"weights": spec, "weights_id": extractor.weights_id,
                                  "feature_block": None if spec == "thumbnail" else block,
                                  "localized": extractor.localization if on else False,
                                  "method": method.method, "test_products": test.products}
        row.update({k: method.metrics.get(k) for k in QUERY_METRICS})
        if method.method != SEED_BASELINE:
            row["category_p5"] = next(m for m in cats.methods if m.method == method.method).metrics["category_p5"]
            same = next(m for m in multi.methods if m.method == method.method).metrics
            row.update({k: same[k] for k in ("same_r1", "same_r5", "same_map10")})
            row["search_p50_ms"] = latency if method.method == "gem" else None
        row.update(category_products=cats.products, seconds=seconds, load=[round(x, 2) for x in os.getloadavg()])
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", required=True, help="split.json written by vsearch train")
    parser.add_argument("--weights", nargs="+", required=True,
                        help="weights specs: random, imagenet or .pth paths; thumbnail: the no-model control")
    parser.add_argument("--datasets", type=Path, default=DATASETS,
                        help="the shared datasets (shoes_multiview for same-product recall; default ../shared/datasets)")
    parser.add_argument("--categories", type=Path, default=None,
                        help="catalog for category precision@5 (products not in the training catalog; default "
                        "DATASETS/shoes_categories/catalog.csv)")
    parser.add_argument("--categories-limit", type=int, default=REPORT_CATEGORY_PRODUCTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seed-baseline", action="store_true", help="also the seed article's raw-feature method")
    parser.add_argument("--latency", type=int, default=30, help="timed searches per weights (0: skip)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for the quality passes (0: the engine's default; latency always uses it)")
    parser.add_argument("--size", type=int, default=224, help="image size of index and queries (px)")
    parser.add_argument("--localize", choices=("both", "on", "crop", "mask", "off"), default="both",
                        help="for weights with a mask head: measure localisation (on = crop, or mask), off or both "
                        "(off and crop)")
    parser.add_argument("--products", choices=("test", "val"), default="test",
                        help="val: the validation products and other category products, for choosing settings")
    parser.add_argument("--white-dims", default="0",
                        help="comma list of whitening dims to measure (0: all 512; e.g. 0,256,128 adds gem+white256...)")
    parser.add_argument("--feature-block", type=int, choices=(4, 5), default=None,
                        help="conv block to pool (default: the weights' model card, else 5)")
    parser.add_argument("--category-boosts", default="",
                        help="comma list of boosts B: each cosine method gets a '+catB' twin re-ranked by the "
                        "category vote of its top products (engine.ranking.category_vote_rerank; inf: categories first)")
    parser.add_argument("--shape-weights", default="",
                        help="comma list of weights W: with masked pooling, each '+catB' twin gets a '+catB+shapeW' "
                        "twin whose voters are chosen by silhouette too (engine.ranking.shape_voters)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    args.categories = args.categories or args.datasets / "shoes_categories/catalog.csv"
    args.categories_seed = 0
    args.white_dims = tuple(int(d) or None for d in args.white_dims.split(","))
    args.category_boosts = tuple(float(b) for b in args.category_boosts.split(",") if b)
    args.shape_weights = tuple(float(w) for w in args.shape_weights.split(",") if w)
    split = json.loads(Path(args.split).read_text(encoding="utf-8"))
    catalog = read_train_catalog(Path(split["catalog"]), None)
    if catalog.sha256 != split["catalog_sha256"]:
        print("the catalog changed since the split was written", file=sys.stderr)
        return 2
    test_ids = split.get("test") or split["eval"]
    assert not set(test_ids) & set(split["train"]) and not set(test_ids) & set(split.get("val", []))
    if args.products == "val":
        test_ids = split["val"]
        args.categories = choice_categories(args.categories, args.categories_limit,
                                            Path(args.split).with_name("categories_choice.csv"))
        args.categories_limit, args.categories_seed = VAL_CATEGORY_PRODUCTS, VAL_CATEGORY_SEED
    test_csv = write_val_catalog(catalog, test_ids, Path(args.split).with_name(f"{args.products}_catalog.csv"))
    cols = [*QUERY_METRICS, "category_p5", "same_r1", "same_r5", "search_p50_ms"]
    print("| weights | block | localised | method | " + " | ".join(cols) + " |")
    print("|---|---|---|---|" + "---|" * len(cols), flush=True)
    rows: list[dict[str, object]] = []
    for spec in args.weights:
        modes = ["off"]
        if spec != "thumbnail" and FeatureExtractor(spec, "fp32", image_size=64).localizes:
            modes = ["off", "crop"] if args.localize == "both" else [args.localize]
        for localize in modes:
            for row in evaluate(spec, localize, test_csv, args):
                rows.append(row)
                cells = [f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c)) for c in cols]
                print(f"| {row['weights_id']} | {row['feature_block']} | {row['localized']} | {row['method']} | "
                      + " | ".join(cells) + " |",
                      flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
