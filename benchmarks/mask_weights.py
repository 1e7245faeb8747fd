"""Masked pooling (VSEARCH_LOCALIZE=mask): ways of weighing the conv cells by the head's mask, on held-out products.

Run: .venv/bin/python benchmarks/mask_weights.py --split RUN/split.json --weights RUN/weights.pth \
        [--products val|test] [--size 160] [--feature-block 4] [--seeds 0,1,2,3] [--variants hard,squared,...]
Each variant is a `weigh` rule of `engine.localize.product_weights` (the engine's masked pooling otherwise: catalog
images framed on their product, every image pooled over the weighted cells, GeM + whitening fitted on the
evaluated catalog) and is measured with the eval code on cluttered, photo-like and clean queries, for each
seed of the query augmentations. Variants (p: a cell's product probability, the head's mask averaged over it):
- hard T: 1 where p >= T, else 0;
- linear: p;  squared: p² (the engine's);  squared-cut: p² where p >= 0.5, else 0.
A mask is trusted as the engine trusts it (its share of p >= 0.5 between 3% and 97%), else every cell weighs 1.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from masked_run import add_run_arguments, held_out_catalog, masked_engine  # noqa: E402 (same folder)

import engine.localize as localize  # noqa: E402
from engine.evaluate import run_eval  # noqa: E402

WeightFn = Callable[[torch.Tensor], torch.Tensor]  # cell probabilities -> cell weights
VARIANTS: dict[str, WeightFn] = {
    "hard 0.5": lambda p: (p >= 0.5).float(),
    "hard 0.7": lambda p: (p >= 0.7).float(),
    "linear": lambda p: p,
    "squared": lambda p: p**2,
    "squared-cut": lambda p: p**2 * (p >= 0.5).float(),
}
KINDS = ("photo", "plain", "clean")  # cluttered photo-like, photo-like, clean (engine.evaluate)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, seeds="0,1,2,3")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose among {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]

    csv_path, count = held_out_catalog(args)
    extractor = masked_engine(args)
    engine_rule = localize.product_weights
    results: dict[str, dict[int, dict[str, float]]] = {}
    try:
        for name in variants:
            localize.product_weights = functools.partial(engine_rule, weigh=VARIANTS[name])
            for seed in seeds:
                start = time.perf_counter()
                report = run_eval(csv_path, extractor=extractor, seed=seed, poolings=("gem",), whitening=(True,),
                                  include_seed_baseline=False, queries=KINDS, localize=True, progress=False)
                metrics = report.methods[0].metrics
                results.setdefault(name, {})[seed] = {k: float(v) for k, v in metrics.items()
                                                      if v is not None and k.startswith(KINDS)}
                print(f"{name} seed {seed}: cluttered R@1 {metrics['photo_r1']:.3f} R@5 {metrics['photo_r5']:.3f}, "
                      f"photo-like R@1 {metrics['plain_r1']:.3f} ({time.perf_counter() - start:.0f} s)",
                      file=sys.stderr, flush=True)
    finally:
        localize.product_weights = engine_rule

    columns = ["photo_r1", "photo_r5", "plain_r1", "plain_r5", "clean_r1", "clean_r5"]
    print(f"{count} {args.products} products, GeM + whitening, block {args.feature_block}, {args.size} px; "
          f"mean over seeds {seeds} (each seed's figure in brackets)\n")
    print("| variant | cluttered R@1 | cluttered R@5 | photo-like R@1 | photo-like R@5 | clean R@1 | clean R@5 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, by_seed in results.items():
        cells = []
        for col in columns:
            values = [by_seed[s][col] for s in seeds]
            cells.append(f"{statistics.mean(values):.3f} ({' '.join(f'{v:.3f}' for v in values)})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
