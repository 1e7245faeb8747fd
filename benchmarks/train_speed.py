"""Measure `vsearch train` throughput levers on this machine: precision, layout, threads, loader workers.

Run: .venv/bin/python benchmarks/train_speed.py CATALOG [--size 112] [--batch 32] [--steps 4] [--threads 1,2]
    [--precisions bf16,fp32] [--sections model,augment,loader] [--map id=product_id]
Prints one markdown row per configuration with images/s (two augmented views per product count as two
images, as `vsearch train`'s progress bar counts them) and the load average, since the numbers mean little
on a busy machine. The model step is `vsearch train`'s own (`train_step`: both views, the mask head and its
loss, AdamW), on random tensors.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine.localize import MaskHead  # noqa: E402
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


def training_model(size: int, channels_last: bool = True) -> tuple[Embedder, torch.optim.Optimizer]:
    """`vsearch train`'s model from random init: VGG16-BN, mask head, loss on block 5, index on block 4."""
    features, _, _ = build_features("random", "vgg16_bn", 0)
    model = Embedder(features, MaskHead(image_size=size), 5, 4).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.AdamW(model.parameters(), 1e-3)


def model_rate(size: int, batch: int, steps: int, precision: str, channels_last: bool) -> float:
    model, optimizer = training_model(size, channels_last)
    a, b = torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)
    masks = torch.rand(2 * batch, size // 4, size // 4)
    train_step(model, optimizer, a, b, masks, 0.1, precision)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, a, b, masks, 0.1, precision)
    return 2 * batch * steps / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("catalog")
    parser.add_argument("--map", action="append", default=[])
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", default="1,2", help="torch thread counts to time, comma-separated")
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--sections", default="model,augment,loader")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    thread_counts = [int(t) for t in args.threads.split(",")]
    print(f"size {args.size}, batch {args.batch} products (x2 views), {os.cpu_count()} cores, load {load()}")
    print("| config | images/s | load 1/5/15 min |")
    print("|---|---|---|", flush=True)
    if "model" in sections:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for precision in args.precisions.split(","):
                for cl in (True, False):
                    ips = model_rate(args.size, args.batch, args.steps, precision, cl)
                    row(f"model step, {threads} thread(s), {precision}, channels_last={cl}", ips)
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
            model, optimizer = training_model(args.size)

            def step(batch: tuple[torch.Tensor, ...]) -> None:
                a, b, mask_a, mask_b, _ = batch
                train_step(model, optimizer, a, b, torch.cat([mask_a, mask_b]), 0.1, "bf16")

            for threads in thread_counts:
                torch.set_num_threads(threads)
                for workers in (0, 1):
                    batches = iter(loader(dataset, args.batch, workers, 0, 1))
                    step(next(batches))  # warm-up
                    start, steps = time.perf_counter(), 0
                    for batch in batches:
                        step(batch)
                        steps += 1
                    rate = 2 * args.batch * steps / (time.perf_counter() - start)
                    row(f"augment + train, bf16, {threads} thread(s), workers={workers}", rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
