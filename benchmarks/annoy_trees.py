"""Annoy settings side by side: recall@10 and CPU time per query, each query run against every setting in turn.

Run: .venv/bin/python benchmarks/annoy_trees.py [--whitened] [--vectors 100000] 50:8500 100:7500 ...
Each argument is N_TREES:SEARCH_K. The vectors are `vsearch bench`'s synthetic ones (the same seed, count and
dims, so the same recall as its row 4); --whitened whitens them first as the engine's index is whitened.
This machine's speed drifts by 1.5-2x within minutes, so the settings are not timed one after another:
every query goes to each index in turn (one pass to warm up, one timed), and the times are the thread's
CPU time, so that a comparison holds within one run even where the absolute figures do not.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from engine.bench import (  # noqa: E402
    DIMS,
    RECALL_AT,
    BenchConfig,
    build_annoy,
    exact_top,
    percentile,
    searcher_request,
    synthetic_vectors,
)
from engine.pooling import Whitening  # noqa: E402
from engine.settings import EngineSettings  # noqa: E402


def setting(raw: str) -> tuple[int, int]:
    trees, _, search_k = raw.partition(":")
    try:
        return int(trees), int(search_k)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N_TREES:SEARCH_K such as 100:7500, got {raw!r}") from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+", type=setting, help="N_TREES:SEARCH_K")
    parser.add_argument("--vectors", type=int, default=BenchConfig.vectors)
    parser.add_argument("--queries", type=int, default=BenchConfig.recall_queries)
    parser.add_argument("--whitened", action="store_true", help="whiten the vectors as the engine's index is")
    args = parser.parse_args()

    data, _ = synthetic_vectors(args.vectors + args.queries, DIMS)
    items, queries = data[: args.vectors], data[args.vectors :]
    if args.whitened:
        whitening = Whitening.fit(items)
        items, queries = whitening.apply(items), whitening.apply(queries)
    truth, _ = exact_top(items, queries, RECALL_AT)
    ask, _ = searcher_request(EngineSettings().top_k)  # the neighbours the searcher asks Annoy for
    indexes = {}
    for trees in sorted({t for t, _ in args.settings}):
        start = time.perf_counter()
        indexes[trees] = build_annoy(items, trees)
        print(f"{trees} trees: built in {time.perf_counter() - start:.1f} s", flush=True)
    times: dict[tuple[int, int], list[float]] = {s: [] for s in args.settings}
    hits: dict[tuple[int, int], list[float]] = {s: [] for s in args.settings}
    for timed in (False, True):
        for vec, true_ids in zip(queries.tolist(), truth, strict=True):
            for trees, search_k in args.settings:
                start = time.thread_time()
                ids = indexes[trees].get_nns_by_vector(vec, ask, search_k=search_k, include_distances=True)[0]
                if timed:
                    times[(trees, search_k)].append(time.thread_time() - start)
                    hits[(trees, search_k)].append(len(set(ids[:RECALL_AT]) & set(true_ids.tolist())) / RECALL_AT)
    kind = "whitened" if args.whitened else "plain"
    print(f"\n{args.vectors} {kind} vectors, {DIMS} dims, {args.queries} queries, {ask} neighbours asked\n")
    print("| n_trees | search_k | recall@10 | CPU p50 ms | CPU p95 ms |")
    print("|---|---|---|---|---|")
    for trees, search_k in args.settings:
        t = times[(trees, search_k)]
        print(f"| {trees} | {search_k} | {np.mean(hits[(trees, search_k)]):.3f} | {percentile(t, 50) * 1000:.2f} "
              f"| {percentile(t, 95) * 1000:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
