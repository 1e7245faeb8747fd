"""Before/after table of a `vsearch train` run, on products the training never saw.

Run: .venv/bin/python benchmarks/train_eval.py --split RUN/split.json --weights random RUN/weights.pth \
        [--size 224] [--categories-limit 1000] [--json out.json]
For each weights spec (anything VSEARCH_WEIGHTS accepts) and size it measures, with GeM and no whitening:
- on the eval products of the split (catalog = those products only): clean, photo-like (no clutter) and
  cluttered photo-like recall@1/@5; clean and cluttered come from engine.evaluate.run_eval (the code of
  `vsearch eval`), photo-like without clutter is the same ranking code with `photo_like(clutter=False)`;
- category precision@5 on shoes_categories (a seeded sample of products; none of them is in the training
  catalog) and same-product recall on shoes_multiview (real second photos).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from engine.augment import EVAL_PARAMS, photo_like  # noqa: E402
from engine.evaluate import MAX_EVAL_SIDE, run_eval  # noqa: E402
from engine.features import FeatureExtractor  # noqa: E402
from engine.images import load_image, load_image_file  # noqa: E402
from engine.metrics import exact_knn, rank_products, recall_at_k  # noqa: E402
from engine.pooling import pool  # noqa: E402
from engine.train import read_train_catalog, write_val_catalog  # noqa: E402

DATASETS = Path("/work/shared/datasets")


def plain_photo_recall(catalog_csv: Path, extractor: FeatureExtractor, seed: int) -> dict[str, float]:
    """Photo-like queries without clutter against the catalog images (GeM, cosine, per product)."""
    catalog = read_train_catalog(catalog_csv, None)
    refs = list(catalog.images)
    images, queries, products = [], [], []
    position: dict[str, int] = {}
    for ref in refs:
        position[ref.product_id] = position.get(ref.product_id, 0) + 1
        img = load_image_file(ref.source, draft_size=MAX_EVAL_SIDE)
        img.thumbnail((MAX_EVAL_SIDE, MAX_EVAL_SIDE))
        rng = EVAL_PARAMS.rng(seed, f"plain:{ref.product_id}#{position[ref.product_id]}")
        images.append(img)
        queries.append(photo_like(img, rng, clutter=False, params=EVAL_PARAMS))
        products.append(ref.product_id)
    base = np.concatenate([pool(extractor.conv_maps(images[i : i + 16]), "gem") for i in range(0, len(images), 16)])
    q = np.concatenate([pool(extractor.conv_maps(queries[i : i + 16]), "gem") for i in range(0, len(queries), 16)])
    idx, _ = exact_knn(q, base, min(len(base), 60), "cosine")
    ranked = [rank_products(row.tolist(), products, 10) for row in idx]
    return {"plain_r1": recall_at_k(ranked, products, 1), "plain_r5": recall_at_k(ranked, products, 5)}


def latency_ms(extractor: FeatureExtractor, image_path: str, runs: int) -> float:
    """p50 of load + embed of one photo (batch 1): the model part of a search, which dominates it."""
    data = Path(image_path).read_bytes()
    times = []
    for _ in range(runs + 2):
        start = time.perf_counter()
        extractor.embed([load_image(data, draft_size=extractor.image_size)], "gem")
        times.append(time.perf_counter() - start)
    return float(np.median(times[2:]) * 1000)


def evaluate(spec: str, size: int, val_csv: Path, args: argparse.Namespace) -> dict[str, object]:
    extractor = FeatureExtractor(spec, "auto", image_size=size)
    if args.latency_only:
        first = read_train_catalog(val_csv, None).images[0].source
        return {"weights": spec, "weights_id": extractor.weights_id, "size": size,
                "p50_ms": latency_ms(extractor, first, args.latency), "load": [round(x, 2) for x in os.getloadavg()]}
    common = {"extractor": extractor, "poolings": ("gem",), "whitening": (False,), "progress": False}
    row: dict[str, object] = {"weights": spec, "weights_id": extractor.weights_id, "arch": extractor.arch,
                              "size": size, "precision": extractor.precision}
    start = time.perf_counter()
    shoes = run_eval(val_csv, include_seed_baseline=args.seed_baseline, seed=args.seed, **common)
    for method in shoes.methods:
        prefix = "" if method.pooling else "seed_"
        row.update({prefix + k: v for k, v in method.metrics.items() if k.startswith(("photo", "clean"))})
    row["eval_products"] = shoes.products
    row.update(plain_photo_recall(val_csv, extractor, args.seed))
    cats = run_eval(DATASETS / "shoes_categories/catalog.csv", column_map={"id": "product_id"},
                    limit=args.categories_limit, seed=args.seed, queries=(), include_seed_baseline=False, **common)
    row["category_p5"] = cats.methods[0].metrics["category_p5"]
    row["category_products"] = cats.products
    multi = run_eval(DATASETS / "shoes_multiview/catalog.csv", column_map={"id": "product_id"}, seed=args.seed,
                     queries=(), include_seed_baseline=False, **common)
    row.update({k: multi.methods[0].metrics[k] for k in ("same_r1", "same_r5", "same_map10")})
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["load"] = [round(x, 2) for x in os.getloadavg()]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", required=True, help="split.json written by vsearch train")
    parser.add_argument("--weights", nargs="+", required=True, help="weights specs: random, imagenet or .pth paths")
    parser.add_argument("--size", type=int, nargs="+", default=[224])
    parser.add_argument("--categories-limit", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seed-baseline", action="store_true", help="also the seed article's raw-feature method")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--latency-only", action="store_true", help="only the batch-1 embed p50 of each weights")
    parser.add_argument("--latency", type=int, default=30, help="runs for --latency-only")
    args = parser.parse_args()
    split = json.loads(Path(args.split).read_text(encoding="utf-8"))
    catalog = read_train_catalog(Path(split["catalog"]), None)
    if catalog.sha256 != split["catalog_sha256"]:
        print("the catalog changed since the split was written", file=sys.stderr)
        return 2
    assert not set(split["eval"]) & set(split["train"])
    val_csv = write_val_catalog(catalog, split["eval"], Path(args.split).with_name("eval_catalog.csv"))
    rows = []
    cols = ["p50_ms"] if args.latency_only else ["clean_r1", "clean_r5", "plain_r1", "plain_r5", "photo_r1", "photo_r5", "category_p5", "same_r1",
            "same_r5", "seconds"]
    print("| weights | size | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols), flush=True)
    for spec in args.weights:
        for size in args.size:
            row = evaluate(spec, size, val_csv, args)
            rows.append(row)
            cells = [f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c)) for c in cols]
            print(f"| {row['weights_id']} | {size} | " + " | ".join(cells) + " |", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
