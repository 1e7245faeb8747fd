"""Whole-search latency of trained weights against the untrained engine, interleaved in one run.

Run: .venv/bin/python benchmarks/search_latency.py --split RUN/split.json --weights RUN/weights.pth [--runs 30]
        [--size 224] [--feature-block 4]
Builds four indexes of the split's first 150 test products (random weights with the engine's defaults,
224 px; the trained weights at --size px, GeM of conv block --feature-block, with localisation off, crop, mask) and times `Searcher.search` of one cluttered 1280x960
JPEG against each in turn, so that load bursts hit all four alike. Prints p50, p95 and p50 / untrained.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from engine.augment import EVAL_PARAMS, photo_like  # noqa: E402
from engine.images import load_image_file  # noqa: E402
from engine.search import Searcher  # noqa: E402
from engine.settings import EngineSettings  # noqa: E402
from engine.train import read_train_catalog, write_val_catalog  # noqa: E402
from indexer.build import build_index  # noqa: E402


def latency_photo(catalog_csv: Path, seed: int = 0) -> bytes:
    """The timed query: the catalog's first image as a cluttered 1280x960 phone-like JPEG (eval presets)."""
    first = read_train_catalog(catalog_csv, None).images[0].source
    photo = photo_like(load_image_file(first).resize((1280, 960)), EVAL_PARAMS.rng(seed, "latency"))
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--size", type=int, default=224, help="image size of the trained engine (px)")
    parser.add_argument("--feature-block", type=int, choices=(4, 5), default=5,
                        help="conv block the trained engine pools (VSEARCH_FEATURE_BLOCK)")
    args = parser.parse_args()
    split = json.loads(Path(args.split).read_text(encoding="utf-8"))
    catalog = read_train_catalog(Path(split["catalog"]), None)
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = write_val_catalog(catalog, (split.get("test") or split["eval"])[:150], Path(tmp) / "catalog.csv")
        data = latency_photo(csv_path)
        trained = {"weights": args.weights, "pooling": "gem", "whitening": True, "index_dims": 0,
                   "image_size": args.size, "feature_block": args.feature_block}
        configs = {
            "untrained (random, engine defaults)": {"weights": "random", "image_size": 224},
            f"trained, {args.size} px, block {args.feature_block}, localisation off": {**trained, "localize": "off"},
            f"trained, {args.size} px, block {args.feature_block}, localisation crop": {**trained, "localize": "crop"},
            f"trained, {args.size} px, block {args.feature_block}, localisation mask": {**trained, "localize": "mask"},
        }
        searchers = {}
        for i, (name, options) in enumerate(configs.items()):
            settings = EngineSettings(data_dir=Path(tmp) / str(i), **options)
            build_index(csv_path, settings)
            searchers[name] = Searcher(settings)
            for _ in range(2):
                searchers[name].search(data, 5)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in searchers}
        for _ in range(args.runs):
            for name, searcher in searchers.items():
                start = time.perf_counter()
                searcher.search(data, 5)
                times[name].append(time.perf_counter() - start)
    base = float(np.median(next(iter(times.values()))))
    print("| engine | p50 ms | p95 ms | p50 vs untrained |\n|---|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {np.median(values) * 1000:.1f} | {np.percentile(values, 95) * 1000:.1f} | "
              f"{np.median(values) / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
