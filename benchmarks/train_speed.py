"""Measure `vsearch train` throughput levers on this machine: precision, layout, threads, loader workers.

Run: .venv/bin/python benchmarks/train_speed.py CATALOG [--size 112] [--batch 32] [--steps 4] [--map id=product_id]
Prints one markdown row per configuration with images/s (two augmented views per product count as two
images) and the load average, since the numbers mean little on a busy machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine.train import (  # noqa: E402
    Embedder,
    ImageCache,
    PairDataset,
    build_features,
    loader,
    local_images,
    read_train_catalog,
    train_step,
)
from indexer.catalog import parse_column_map  # noqa: E402


def load() -> str:
    return "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def row(config: str, ips: float) -> None:
    print(f"| {config} | {ips:.1f} | {load()} |", flush=True)


def model_rate(size: int, batch: int, steps: int, precision: str, channels_last: bool) -> float:
    features, _, _ = build_features("random", "vgg16_bn", 0)
    model = Embedder(features).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    a, b = torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)
    train_step(model, optimizer, a, b, 0.1, precision)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, a, b, 0.1, precision)
    return 2 * batch * steps / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("catalog")
    parser.add_argument("--map", action="append", default=[])
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sections", default="model,augment,loader")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    print(f"size {args.size}, batch {args.batch} products (x2 views), {os.cpu_count()} cores, load {load()}")
    print("| config | images/s | load 1/5/15 min |")
    print("|---|---|---|", flush=True)
    if "model" in sections:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for precision in ("bf16", "fp32"):
                for cl in (True, False):
                    ips = model_rate(args.size, args.batch, args.steps, precision, cl)
                    row(f"model step, {threads} thread(s), {precision}, channels_last={cl}", ips)
        torch.set_num_threads(os.cpu_count() or 1)
    if "augment" in sections or "loader" in sections:
        catalog = read_train_catalog(Path(args.catalog), parse_column_map(args.map) or None)
        images = local_images(catalog)[: args.batch * (args.steps + 2)]
        cache = ImageCache(images, round(args.size * 1.5), 1 << 30, progress=False)
        dataset = PairDataset(cache, [[i] for i in range(len(images))], args.size, seed=0)
        if "augment" in sections:
            start = time.perf_counter()
            n = min(len(dataset), 64)
            for i in range(n):
                dataset[i]
            row("augmentation only, 1 process (views)", 2 * n / (time.perf_counter() - start))
        if "loader" in sections:
            features, _, _ = build_features("random", "vgg16_bn", 0)
            model = Embedder(features).to(memory_format=torch.channels_last).train()
            optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
            for workers in (0, 1, 2):
                batches = iter(loader(dataset, args.batch, workers, 0, 1))
                a, b = next(batches)
                train_step(model, optimizer, a, b, 0.1, "bf16")
                start, steps = time.perf_counter(), 0
                for a, b in batches:
                    train_step(model, optimizer, a, b, 0.1, "bf16")
                    steps += 1
                row(f"augment + train, bf16, workers={workers}", 2 * args.batch * steps / (time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
