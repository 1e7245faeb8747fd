"""`vsearch bench`: model vs indexing throughput, query latency, Annoy recall, peak memory and the CPU's limit."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.settings import EngineSettings

POOLED_DIMS = 512  # VGG16's last conv block: the length of a pooled vector
RECALL_AT = 10
# Goals (README, "Performance").
PIPELINE_RATIO_GOAL = 0.85
QUERY_OVERHEAD_GOAL = 0.15
LOCALIZE_OVERHEAD_GOAL = 0.30  # issue 6: finding the product adds at most 30% to a search
RECALL_GOAL = 0.95
ANNOY_P50_GOAL_MS = 1.0
RSS_GOAL_MB = 700.0
LIMIT_FRACTION_GOAL = 0.7
# Synthetic vectors: a shared positive mean (CNN features are post-ReLU), 20 categories, products with
# ~2.5 photos each and per-photo noise; scales give cosines of ~0.45 for unrelated images, ~0.65 within a
# category and ~0.9 between photos of one product. Variance falls as 1/j over the dimensions, like the PCA
# spectrum of CNN features.
SYN_CATEGORIES = 20
SYN_IMAGES_PER_PRODUCT = 2.5
SYN_CATEGORY_SCALE, SYN_PRODUCT_SCALE, SYN_PHOTO_SCALE = 0.667, 0.745, 0.471
SWEEP_TREE_FACTORS = (1, 2)
SWEEP_SEARCH_K = (2000, 5000, 7500, 8500, 10000, 20000)


@dataclass(frozen=True)
class BenchConfig:
    images: int = 120  # demo catalog images indexed by the pipeline (in each trial)
    image_px: int = 400  # side of the demo catalog JPEGs
    query_px: tuple[int, int] = (1280, 960)  # query photos: Telegram's usual photo size
    vectors: int = 100_000
    recall_queries: int = 200
    latency_queries: int = 40
    pipeline_trials: int = 5  # index builds, each between two model-alone timings; the median ratio counts
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16, 32)
    seconds_per_batch: float = 2.5
    matmul_n: int = 2048
    sweep: bool | None = None  # None: sweep Annoy settings only when the engine's miss the goal
    quick: bool = False
    rss_python: str | None = None  # the interpreter of the peak-RSS process (None: this one)

    @classmethod
    def quick_config(cls) -> BenchConfig:
        return cls(
            images=10,
            image_px=128,
            query_px=(160, 120),
            vectors=2000,
            recall_queries=20,
            latency_queries=5,
            pipeline_trials=1,
            batch_sizes=(1, 2),
            seconds_per_batch=0.2,
            matmul_n=256,
            sweep=False,
            quick=True,
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchConfig:
        config = cls.quick_config() if args.quick else cls()
        changes: dict[str, Any] = {}
        if args.images is not None:
            changes["images"] = args.images
        if args.vectors is not None:
            changes["vectors"] = args.vectors
        if args.sweep is not None:
            changes["sweep"] = args.sweep
        if args.rss_python is not None:
            changes["rss_python"] = args.rss_python
        return dataclasses.replace(config, **changes)


@dataclass(frozen=True)
class GoalCheck:
    measure: str
    result: str
    goal: str
    met: bool


@dataclass
class BenchReport:
    environment: dict[str, Any]
    metrics: dict[str, float]  # every value measured and positive
    goals: list[GoalCheck]
    details: dict[str, Any] = field(default_factory=dict)
    advice: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_markdown(self) -> str:
        env = self.environment
        lines = [
            f"## vsearch bench: {env['cpu']}, {env['cores']} cores, torch {env['torch']} "
            f"({env['torch_threads']} threads)",
            "",
            f"Engine: weights {env['weights']}, precision {env['precision']} (native bf16: "
            f"{'yes' if env['native_bf16'] else 'no'}), input {env['image_size']}px, pooling {env['pooling']}. "
            f"Load average {env['load_before']} before, {env['load_after']} after ({env['seconds']:.0f} s run).",
            "",
            "| # | measure | result | goal | met |",
            "|---|---|---|---|---|",
        ]
        for i, g in enumerate(self.goals, 1):
            lines.append(f"| {i} | {g.measure} | {g.result} | {g.goal} | {'yes' if g.met else '**no**'} |")
        lines += ["", "Model alone by batch size (images/s): " + ", ".join(
            f"{b}: {r:.2f}" for b, r in self.details["model_by_batch"].items()
        ) + f" (the indexer runs batches of {self.details['index_batch_size']})"]
        lines.append(f"Synthetic vectors: {self.details['synthetic']}")
        lines.append(f"Resident memory of the peak-RSS process (torch {self.details['rss_torch']}) by stage (MB): " + ", ".join(
            f"{stage} {mb:.0f}" for stage, mb in self.details["rss_stages_mb"].items()
        ) + f"; peak {self.metrics['peak_rss_mb']:.0f}")
        sweep = self.details.get("annoy_sweep")
        if sweep:
            lines += [
                "",
                "| n_trees | search_k | recall@10 | p50 ms | p95 ms | CPU-time p50 ms | build s |",
                "|---|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {r['n_trees']} | {r['search_k']} | {r['recall']:.3f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} "
                f"| {r['cpu_p50_ms']:.2f} | {r['build_s']:.0f} |"
                for r in sweep
            ]
        if self.advice:
            lines += ["", *[f"- {a}" for a in self.advice]]
        return "\n".join(lines)


# -- small measuring helpers -----------------------------------------------------------------------


def _load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed_calls(fn: Callable[[], object], seconds: float, min_calls: int = 2, max_calls: int = 10_000) -> list[float]:
    """Seconds per call, calling fn for about `seconds` (at least min_calls times)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() - start < seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median_trial(trials: list[dict[str, float]]) -> dict[str, float]:
    """The trial whose "ratio" is the median (the upper middle one of an even count)."""
    return sorted(trials, key=lambda t: t["ratio"])[len(trials) // 2]


def conv_gflop(model, image_size: int) -> float:
    """FLOPs (2 per multiply-add) of the conv layers for one image; VGG16 at 224px: 30.7 GFLOP."""
    import torch

    from engine.prepack import PackedConv2d

    side, flops = image_size, 0
    for layer in model:
        if isinstance(layer, (torch.nn.Conv2d, PackedConv2d)):
            kh, kw = layer.kernel_size
            flops += 2 * side * side * layer.in_channels * layer.out_channels * kh * kw // layer.groups
        elif isinstance(layer, torch.nn.MaxPool2d):
            side //= 2
    return flops / 1e9


def matmul_call(n: int, dtype_name: str) -> Callable[[], object]:
    """One n x n matrix product in fp32 or bf16 per call (operands made once, seeded), warmed up."""
    import torch

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)

    def call() -> object:
        with torch.inference_mode():
            return torch.mm(a, b)

    call()
    return call


def matmul_gflops(n: int, dtype_name: str, seconds: float) -> float:
    times = timed_calls(matmul_call(n, dtype_name), seconds, min_calls=3)
    return 2 * n**3 / statistics.median(times) / 1e9


def index_dims(settings: EngineSettings) -> int:
    """Dims of the vectors the engine's Annoy index holds: what the whitening keeps, else the pooled vector's."""
    if settings.whitening and settings.index_dims:
        return min(settings.index_dims, POOLED_DIMS)
    return POOLED_DIMS


def index_dims_note(settings: EngineSettings) -> str:
    dims = index_dims(settings)
    if dims < POOLED_DIMS:
        return f"the engine's index dims: the whitening keeps {dims} of {POOLED_DIMS} (VSEARCH_INDEX_DIMS)"
    return f"the engine's index dims: all {POOLED_DIMS} of the pooled vector"


DIMS = index_dims(EngineSettings())  # at the default settings


def synthetic_vectors(n: int, dims: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, product index of each): a category/product/photo mixture of Gaussians, L2-normalised."""
    rng = np.random.default_rng(seed)
    scale = np.arange(1, dims + 1, dtype=np.float32) ** -0.5
    scale /= np.linalg.norm(scale)
    products = max(1, int(n / SYN_IMAGES_PER_PRODUCT))
    mean = np.abs(rng.standard_normal(dims, dtype=np.float32)) * scale
    categories = rng.standard_normal((SYN_CATEGORIES, dims), dtype=np.float32) * scale * SYN_CATEGORY_SCALE
    product_vecs = rng.standard_normal((products, dims), dtype=np.float32) * scale * SYN_PRODUCT_SCALE
    product_category = rng.integers(0, SYN_CATEGORIES, products)
    owner = np.concatenate([np.arange(min(products, n)), rng.integers(0, products, max(0, n - products))])
    rng.shuffle(owner)
    x = mean + categories[product_category[owner]] + product_vecs[owner]
    x += rng.standard_normal((n, dims), dtype=np.float32) * scale * SYN_PHOTO_SCALE
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), owner


def exact_top(items: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k ids by cosine (rows are unit vectors) and the similarity matrix."""
    sims = queries @ items.T
    part = np.argpartition(-sims, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1), sims


def searcher_request(top_k: int, whitened: bool = False) -> tuple[int, int]:
    """(n, search_k) that Searcher asks Annoy for at `top_k` products, mirroring Searcher._nearest."""
    from engine.search import annoy_search_k

    n = max(RECALL_AT, top_k * 4)
    return n, annoy_search_k(n, whitened)


def annoy_recall(annoy, queries: np.ndarray, truth: np.ndarray, n: int, search_k: int) -> dict[str, float]:
    """Recall@10 and query times: wall clock, and this thread's CPU time (what a quiet machine would see)."""
    recalls, times, cpu_times = [], [], []
    for vec, true_ids in zip(queries, truth, strict=True):
        c0, t0 = time.thread_time(), time.perf_counter()
        ids, _ = annoy.get_nns_by_vector(vec.tolist(), n, search_k=search_k, include_distances=True)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.thread_time() - c0)
        recalls.append(len(set(ids[:RECALL_AT]) & set(true_ids.tolist())) / RECALL_AT)
    return {
        "recall": float(np.mean(recalls)),
        "p50_ms": percentile(times, 50) * 1000,
        "p95_ms": percentile(times, 95) * 1000,
        "cpu_p50_ms": max(percentile(cpu_times, 50) * 1000, 1e-6),
    }


def build_annoy(items: np.ndarray, n_trees: int):
    """An in-memory Annoy index built as engine.index.write_version_files builds it."""
    from annoy import AnnoyIndex

    annoy = AnnoyIndex(items.shape[1], "angular")
    annoy.set_seed(42)
    for i, vec in enumerate(items):
        annoy.add_item(i, vec.tolist())
    annoy.build(n_trees, n_jobs=-1)
    return annoy


def products_for_images(images: int) -> int:
    """Demo catalog products giving at least `images` images (every fourth product has two)."""
    products = max(1, images * 4 // 5)
    while products + (products + 3) // 4 < images:
        products += 1
    return products


def query_photo(width: int, height: int, seed: int) -> bytes:
    from indexer.demo import COLOURS, STYLES, draw_shoe

    colour = list(COLOURS.values())[seed % len(COLOURS)]
    img = draw_shoe(STYLES[seed % len(STYLES)], colour, seed=1000 + seed, size=max(width, height))
    buf = io.BytesIO()
    img.resize((width, height)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


# -- the five measures -------------------------------------------------------------------------------


class Bench:
    def __init__(self, config: BenchConfig, settings: EngineSettings, workdir: Path, log: Callable[[str], None]):
        from engine.features import FeatureExtractor

        self.config = config
        self.settings = settings
        self.workdir = workdir
        self.log = log
        self.metrics: dict[str, float] = {}
        self.details: dict[str, Any] = {}
        self.advice: list[str] = []
        log(f"loading the model (weights {settings.weights}, precision {settings.precision})")
        self.extractor = FeatureExtractor.from_settings(settings)

    def cpu_limit(self) -> None:
        n, seconds = self.config.matmul_n, max(0.3, self.config.seconds_per_batch / 2)
        self.log(f"matmul {n}x{n} in fp32 and bf16")
        self.metrics["matmul_fp32_gflops"] = matmul_gflops(n, "fp32", seconds)
        self.metrics["matmul_bf16_gflops"] = matmul_gflops(n, "bf16", seconds)
        self.metrics["model_gflop_per_image"] = conv_gflop(self.extractor.model, self.extractor.image_size)

    def model_throughput(self) -> None:
        """Images/s at each batch size, timed round-robin (one call of each in turn) so load bursts hit all alike.

        The CPU's limit is timed in the same rounds (one matmul of the limit's precision per round): this
        machine's speed drifts within seconds, and a limit timed apart from the model swung the ratio from
        0.65 to 1.79 between runs."""
        from engine.features import cpu_has_native_bf16

        rng = np.random.default_rng(0)
        size, pooling = self.extractor.image_size, self.settings.pooling
        arrays = {b: [rng.standard_normal((3, size, size), dtype=np.float32) for _ in range(b)]
                  for b in self.config.batch_sizes}
        for batch in arrays.values():
            self.extractor.embed_arrays(batch, pooling)  # warm-up: oneDNN picks its kernels per shape
        limit_kind = "bf16" if cpu_has_native_bf16() else "fp32"
        matmul = matmul_call(self.config.matmul_n, limit_kind)
        times: dict[int, list[float]] = {b: [] for b in arrays}
        matmul_times: list[float] = []
        self.log(f"model alone at batch sizes {', '.join(map(str, arrays))}, each round with a {limit_kind} matmul "
                 f"(load {_load()})")
        while any(len(t) < 2 or sum(t) < self.config.seconds_per_batch for t in times.values()):
            for b, batch in arrays.items():
                t0 = time.perf_counter()
                self.extractor.embed_arrays(batch, pooling)
                times[b].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            matmul()
            matmul_times.append(time.perf_counter() - t0)
        rates = {b: b * len(t) / sum(t) for b, t in times.items()}
        best = max(rates, key=lambda b: rates[b])
        self.log(f"model alone: best {rates[best]:.2f} images/s at batch {best} (load {_load()})")
        self.details["model_by_batch"] = rates
        self.metrics["model_images_per_s"] = rates[best]
        self.metrics["model_best_batch"] = float(best)
        self.metrics["limit_matmul_gflops"] = 2 * self.config.matmul_n**3 / statistics.median(matmul_times) / 1e9
        self.details["limit_matmul"] = f"{limit_kind}, {len(matmul_times)} calls between the model's"

    def model_rate(self, batch: int, seconds: float) -> float:
        """Images/s of the model alone at `batch` over about `seconds`."""
        rng = np.random.default_rng(1)
        size = self.extractor.image_size
        arrays = [rng.standard_normal((3, size, size), dtype=np.float32) for _ in range(batch)]
        times = timed_calls(lambda: self.extractor.embed_arrays(arrays, self.settings.pooling), seconds)
        return batch * len(times) / sum(times)

    def pipeline(self) -> EngineSettings:
        from indexer.build import BATCH_SIZE as INDEX_BATCH_SIZE
        from indexer.build import build_index
        from indexer.demo import make_demo_catalog

        cfg = self.config
        products = products_for_images(cfg.images)
        self.log(f"drawing a demo catalog of {products} products ({cfg.image_px}px JPEG)")
        catalog = make_demo_catalog(self.workdir / "demo", products=products, image_size=cfg.image_px)
        settings = dataclasses.replace(self.settings, data_dir=self.workdir / "demo-data")
        # This machine's speed drifts within seconds: the model alone is timed right before and right after
        # each build, at its best batch size, and that build's ratio is taken against their mean. The builds
        # are repeated and the median trial reported (all of them in details), so one drift does not decide.
        best_batch = int(self.metrics["model_best_batch"])
        trials: list[dict[str, float]] = []
        model_rate = self.model_rate(best_batch, cfg.seconds_per_batch)
        for trial in range(cfg.pipeline_trials):
            self.log(f"indexing it, trial {trial + 1} of {cfg.pipeline_trials} (decode + model + Annoy, no feature cache)")
            start = time.perf_counter()
            report = build_index(catalog, settings, extractor=self.extractor, use_cache=False)
            pipeline_rate = report.images_indexed / (time.perf_counter() - start)
            after = self.model_rate(best_batch, cfg.seconds_per_batch)
            model_mean = (model_rate + after) / 2
            trials.append({"pipeline_images_per_s": pipeline_rate, "model_before": model_rate, "model_after": after,
                           "ratio": pipeline_rate / model_mean})
            self.log(f"pipeline: {pipeline_rate:.2f} images/s against {model_mean:.2f} = {pipeline_rate / model_mean:.3f} "
                     f"(load {_load()})")
            model_rate = after  # the next trial's "before"
        median = median_trial(trials)
        self.metrics["pipeline_images"] = float(report.images_indexed)
        self.metrics["pipeline_images_per_s"] = median["pipeline_images_per_s"]
        self.metrics["pipeline_model_images_per_s"] = (median["model_before"] + median["model_after"]) / 2
        self.metrics["pipeline_ratio"] = median["ratio"]
        self.details["pipeline_trials"] = trials
        self.details["index_batch_size"] = INDEX_BATCH_SIZE
        return settings

    def query_latency(self, settings: EngineSettings) -> None:
        from engine.images import load_image
        from engine.search import Searcher

        cfg, pooling = self.config, self.settings.pooling
        searcher = Searcher(settings, extractor=self.extractor)
        photos = [query_photo(*cfg.query_px, seed=i) for i in range(5)]
        arrays = [self.extractor.preprocess(load_image(p)) for p in photos]
        for p in photos[:2]:
            searcher.search(p, settings.top_k)
        self.log(f"{cfg.latency_queries} queries, each paired with a model-alone call at batch 1")
        model_times, query_times = [], []
        for i in range(cfg.latency_queries):
            t0 = time.perf_counter()
            self.extractor.embed_arrays([arrays[i % len(arrays)]], pooling)
            t1 = time.perf_counter()
            searcher.search(photos[i % len(photos)], settings.top_k)
            query_times.append(time.perf_counter() - t1)
            model_times.append(t1 - t0)
        self.metrics["query_p50_ms"] = percentile(query_times, 50) * 1000
        self.metrics["query_p95_ms"] = percentile(query_times, 95) * 1000
        self.metrics["model_batch1_p50_ms"] = percentile(model_times, 50) * 1000
        self.metrics["query_to_model_ratio"] = self.metrics["query_p50_ms"] / self.metrics["model_batch1_p50_ms"]

    def localisation(self) -> None:
        """Time of finding the product in a query photo against a whole search without it, both ways:
        "mask" (the default: block 5 and the head in the embedding pass, masked pooling) and "crop"
        (`VSEARCH_LOCALIZE=crop`: mask pass at the head's size + clean-up; the crop is then embedded instead of
        the photo).
        Weights without a mask head get an untrained one for the measurement: the cost is the same, the masks
        are not."""
        from engine.images import load_image
        from engine.localize import MaskHead

        ext, cfg = self.extractor, self.config
        stand_in = ext.mask_head is None
        engine_mode = ext.localization
        if stand_in:  # at half the index size, as `vsearch train` runs by default (112 for 224)
            ext.mask_head = MaskHead(image_size=max(32, ext.image_size // 2)).eval().to(ext.weights_dtype)
        try:
            ext.localization = "crop"
            # Decoded as a cropping search decodes them (twice the model size).
            photos = [load_image(query_photo(*cfg.query_px, seed=i), draft_size=ext.query_draft_size) for i in range(5)]
            ext.localize(photos[:1])  # warm-up
            times = []
            for i in range(cfg.latency_queries):
                t0 = time.perf_counter()
                ext.localize([photos[i % len(photos)]])
                times.append(time.perf_counter() - t0)
            # Masked pooling: the embedding pass with and without it, interleaved, on photos decoded as a search does.
            photos = [load_image(query_photo(*cfg.query_px, seed=i), draft_size=ext.image_size) for i in range(5)]
            passes: dict[str | None, list[float]] = {None: [], "mask": []}
            for i in range(cfg.latency_queries + 1):
                for mode, spent in passes.items():
                    ext.localization = mode
                    t0 = time.perf_counter()
                    ext.embed([photos[i % len(photos)]], self.settings.pooling)
                    if i:  # the first round warms up
                        spent.append(time.perf_counter() - t0)
        finally:
            ext.localization = engine_mode
            if stand_in:
                ext.mask_head = None
        localize_ms = percentile(times, 50) * 1000
        mask_ms = (percentile(passes["mask"], 50) - percentile(passes[None], 50)) * 1000
        # The measured searches already include what the engine's own mode costs.
        without = self.metrics["query_p50_ms"] - {"crop": localize_ms, "mask": mask_ms}.get(engine_mode or "", 0.0)
        self.metrics["localize_p50_ms"] = localize_ms
        self.metrics["localize_overhead"] = localize_ms / without
        self.metrics["mask_pool_extra_ms"] = mask_ms
        self.metrics["mask_pool_overhead"] = mask_ms / without
        self.details["localize_head"] = "untrained stand-in (weights without a mask head)" if stand_in else "trained"

    def annoy(self) -> EngineSettings:
        from engine.index import IndexStore, Manifest, write_version_files
        from engine.pooling import Whitening
        from engine.types import Product
        from indexer.build import annoy_trees

        cfg = self.config
        n, q, dims = cfg.vectors, cfg.recall_queries, index_dims(self.settings)
        self.log(f"synthetic vectors: {n} x {dims} + {q} queries ({index_dims_note(self.settings)})")
        data, owner = synthetic_vectors(n + q, dims)
        items, queries = data[:n], data[n:]
        t0 = time.perf_counter()
        truth, sims = exact_top(items, queries, RECALL_AT)
        self.metrics["exact_query_ms"] = (time.perf_counter() - t0) / q * 1000
        rows = np.arange(q)
        self.details["synthetic"] = (
            f"{n} items, {dims} dims ({index_dims_note(self.settings)}); {SYN_CATEGORIES} categories, ~{SYN_IMAGES_PER_PRODUCT} photos per product, "
            f"1/j variance spectrum, L2-normalised. Query-item cosine p50: nearest {np.median(sims[rows, truth[:, 0]]):.2f}, "
            f"10th {np.median(sims[rows, truth[:, -1]]):.2f}, any item {np.median(sims):.2f}"
        )
        del sims

        settings = dataclasses.replace(self.settings, data_dir=self.workdir / "vectors-data")
        store = IndexStore(settings.index_dir)
        version, folder = store.start_build()
        n_trees = annoy_trees(n)
        products = {
            f"p{i}": Product(
                id=f"p{i}", title=f"Synthetic shoe {i}", url=f"https://shop.example/p/{i}", image=f"images/p{i}-1.jpg",
                price="49.90", currency="EUR", category="shoes", brand="Synthetic",
            )
            for i in sorted(set(owner[:n].tolist()))
        }
        image_rows = [(f"p{o}", f"images/p{o}-{i}.jpg") for i, o in enumerate(owner[:n].tolist())]
        # The synthetic vectors stand for vectors already in the index's space; at reduced dims the index
        # carries a projection of the engine's shape (pooled 512 -> dims) so that photo queries (the RSS
        # measure) go through it as through the engine's whitening.
        projection = None
        if dims < POOLED_DIMS:
            projection = Whitening(np.zeros(POOLED_DIMS, np.float32), np.eye(POOLED_DIMS, dims, dtype=np.float32))
        manifest = Manifest(
            version=version, created="bench", weights=self.extractor.weights_id, arch=self.extractor.arch,
            pooling=self.settings.pooling, whitening=projection is not None, image_size=self.extractor.image_size,
            dims=dims,
            products=len(products), images=n, images_failed=0, catalog_path="synthetic", catalog_sha256="",
            n_trees=n_trees, build_seconds=0.0,
        )
        self.log(f"building the engine's Annoy index ({n_trees} trees, load {_load()})")
        t0 = time.perf_counter()
        write_version_files(folder, manifest, items, image_rows, products, projection)
        build_s = time.perf_counter() - t0
        store.publish(version, folder)
        loaded = store.load(version)
        ask, search_k = searcher_request(self.settings.top_k)
        annoy_recall(loaded.annoy, queries[: min(q, 20)], truth[: min(q, 20)], ask, search_k)  # fault pages in
        result = annoy_recall(loaded.annoy, queries, truth, ask, search_k)
        self.metrics.update(
            annoy_recall_at_10=result["recall"], annoy_p50_ms=result["p50_ms"], annoy_p95_ms=result["p95_ms"],
            annoy_cpu_p50_ms=result["cpu_p50_ms"],
            annoy_n_trees=float(n_trees), annoy_search_k=float(search_k), annoy_build_s=build_s,
            annoy_dims=float(dims),
        )
        self.log(f"recall@10 {result['recall']:.3f}, p50 {result['p50_ms']:.2f} ms (load {_load()})")
        met = result["recall"] >= RECALL_GOAL and result["p50_ms"] < ANNOY_P50_GOAL_MS
        if cfg.sweep or (cfg.sweep is None and not met):
            base = {"n_trees": n_trees, "search_k": search_k, "build_s": build_s, **result}
            self.sweep(items, queries, truth, loaded.annoy, ask, base)
        loaded.annoy.unload()
        if self.settings.whitening:
            self.whitened_annoy(items, queries, n_trees)
        return settings

    def whitened_annoy(self, items: np.ndarray, queries: np.ndarray, n_trees: int) -> None:
        """The same vectors PCA-whitened as the engine whitens its index: a flatter spectrum, which is
        harder for Annoy, so the searcher inspects more nodes there. Reported beside the goal, which is
        defined on the unwhitened vectors."""
        from engine.pooling import Whitening

        ask, search_k = searcher_request(self.settings.top_k, whitened=True)
        whitening = Whitening.fit(items)
        white_items, white_queries = whitening.apply(items), whitening.apply(queries)
        truth, _ = exact_top(white_items, white_queries, RECALL_AT)
        self.log(f"the same vectors whitened: building an Annoy index ({n_trees} trees)")
        annoy = build_annoy(white_items, n_trees)
        annoy_recall(annoy, white_queries[:20], truth[:20], ask, search_k)
        result = annoy_recall(annoy, white_queries, truth, ask, search_k)
        annoy.unload()
        self.metrics["annoy_whitened_recall_at_10"] = result["recall"]
        self.metrics["annoy_whitened_p50_ms"] = result["p50_ms"]
        self.metrics["annoy_whitened_search_k"] = float(search_k)
        self.log(f"whitened: recall@10 {result['recall']:.3f}, p50 {result['p50_ms']:.2f} ms")

    def sweep(self, items, queries, truth, base_annoy, ask: int, base: dict[str, float]) -> None:
        rows = [base]
        for factor in SWEEP_TREE_FACTORS:
            trees = int(base["n_trees"]) * factor
            if factor == 1:
                annoy, build_s = base_annoy, base["build_s"]
            else:
                self.log(f"sweep: building {trees} trees (load {_load()})")
                t0 = time.perf_counter()
                annoy = build_annoy(items, trees)
                build_s = time.perf_counter() - t0
            for search_k in SWEEP_SEARCH_K:
                if factor == 1 and search_k == base["search_k"]:
                    continue
                result = annoy_recall(annoy, queries, truth, ask, search_k)
                rows.append({"n_trees": trees, "search_k": search_k, "build_s": build_s, **result})
                self.log(f"sweep: {trees} trees, search_k {search_k}: recall {result['recall']:.3f}, "
                         f"p50 {result['p50_ms']:.2f} ms")
            if factor != 1:
                annoy.unload()
        rows.sort(key=lambda r: (r["n_trees"], r["search_k"]))
        self.details["annoy_sweep"] = rows
        good = [r for r in rows if r["recall"] >= RECALL_GOAL and r["p50_ms"] < ANNOY_P50_GOAL_MS]
        if good:
            best = min(good, key=lambda r: (r["p50_ms"], r["n_trees"]))
            self.advice.append(
                f"Annoy goal met with n_trees {best['n_trees']} and search_k {best['search_k']} (recall@10 "
                f"{best['recall']:.3f}, p50 {best['p50_ms']:.2f} ms): set annoy_trees() in indexer/build.py and "
                f"MIN_SEARCH_K / SEARCH_K_PER_ITEM in engine/search.py so that a {ask}-neighbour request gets "
                f"search_k {best['search_k']}."
            )
        else:
            on_cpu = [r for r in rows if r["recall"] >= RECALL_GOAL and r["cpu_p50_ms"] < ANNOY_P50_GOAL_MS]
            if on_cpu:
                best = min(on_cpu, key=lambda r: (r["cpu_p50_ms"], r["n_trees"]))
                self.advice.append(
                    f"Annoy: n_trees {best['n_trees']}, search_k {best['search_k']} reach recall@10 {best['recall']:.3f}"
                    f" at {best['cpu_p50_ms']:.2f} ms of CPU per query, but {best['p50_ms']:.2f} ms of wall time on "
                    f"this loaded machine (load {_load()}); rerun on a quiet one to confirm."
                )
            else:
                self.advice.append("No swept Annoy setting met recall@10 >= 0.95 with p50 < 1 ms; see the sweep table.")

    def peak_rss(self, settings: EngineSettings, which: str, python: str = sys.executable) -> dict[str, Any]:
        """Peak resident memory of a fresh `python` process holding the model and the index under `settings`."""
        from engine.errors import VsearchError

        photo = self.workdir / "query.jpg"
        photo.write_bytes(query_photo(*self.config.query_px, seed=7))
        spec = {
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()},
            "photo": str(photo),
            "queries": 10,
        }
        self.log(f"peak RSS: a fresh process ({python}) loads the model and the {which} index and runs 10 queries")
        out = subprocess.run(
            [python, "-c",
             "import sys; from engine.bench import rss_child; rss_child(sys.argv[1])", json.dumps(spec)],
            capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parent.parent,
        )
        if out.returncode != 0:
            raise VsearchError(
                f"The peak-RSS measuring process failed: {out.stderr.strip()[-1500:]}",
                "Run `vsearch query` on a photo to see whether the engine itself works here.",
            )
        return json.loads(out.stdout.strip().splitlines()[-1])

    def memory(self, vector_settings: EngineSettings, demo_settings: EngineSettings) -> None:
        """The goal's figures come from --rss-python where given (the deployment's torch build), else from
        this interpreter; with --rss-python, this interpreter's peak is measured too, for comparison."""
        python = self.config.rss_python or sys.executable
        if self.config.rss_python:
            here = self.peak_rss(vector_settings, f"{self.config.vectors}-vector")
            self.metrics["peak_rss_this_python_mb"] = here["peak_rss_mb"]
            self.details["rss_this_python_torch"] = here["torch"]
        big = self.peak_rss(vector_settings, f"{self.config.vectors}-vector", python)
        small = self.peak_rss(demo_settings, "demo", python)
        self.metrics["peak_rss_mb"] = big["peak_rss_mb"]
        self.metrics["peak_rss_demo_mb"] = small["peak_rss_mb"]
        self.metrics["rss_anon_mb"] = big["breakdown"].get("RssAnon", 0.0)
        self.metrics["rss_file_mb"] = big["breakdown"].get("RssFile", 0.0)
        self.details["rss_stages_mb"] = big["stages"]
        self.details["rss_breakdown_mb"] = big["breakdown"]
        self.details["rss_index"] = f"{big['images']} images, {big['products']} products"
        self.details["rss_torch"] = big["torch"]


def _memory_mb() -> tuple[float, float]:
    """(peak, current) resident set of this process in MB, from /proc/self/status.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork+exec, so a child
    started by a big parent would report the parent's size.
    """
    fields = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmHWM"], fields["VmRSS"]


def _rss_breakdown_mb() -> dict[str, float]:
    """Current resident set split into anonymous memory (heap, tensors) and file-backed pages (shared
    libraries such as torch's, and the memory-mapped Annoy index), from /proc/self/status."""
    fields = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def rss_child(spec_json: str) -> None:
    """Run in a fresh interpreter: model + Searcher over the given index, some queries; print memory stages."""
    spec = json.loads(spec_json)
    stages: dict[str, float] = {}
    import torch  # its share is reported on its own

    stages["import torch"] = _memory_mb()[1]
    from engine.features import FeatureExtractor
    from engine.search import Searcher

    stages["import engine"] = _memory_mb()[1]
    raw = spec["settings"]
    settings = EngineSettings(**{**raw, "data_dir": Path(raw["data_dir"])})
    extractor = FeatureExtractor.from_settings(settings)
    stages["model loaded"] = _memory_mb()[1]
    searcher = Searcher(settings, extractor=extractor)
    stages["index loaded"] = _memory_mb()[1]
    data = Path(spec["photo"]).read_bytes()
    searcher.search(data, settings.top_k)
    stages["after 1st query"] = _memory_mb()[1]
    for _ in range(spec["queries"] - 1):
        searcher.search(data, settings.top_k)
    peak, stages["after queries"] = _memory_mb()
    print(json.dumps({
        "peak_rss_mb": peak, "torch": torch.__version__, "stages": stages, "breakdown": _rss_breakdown_mb(),
        "images": searcher.manifest.images, "products": searcher.product_count,
    }))


def run(config: BenchConfig, settings: EngineSettings, log: Callable[[str], None]) -> BenchReport:
    import torch

    from engine.features import cpu_has_native_bf16

    start, load_before = time.perf_counter(), _load()
    with tempfile.TemporaryDirectory(prefix="vsearch-bench-") as tmp:
        bench = Bench(config, settings, Path(tmp), log)
        bench.cpu_limit()
        bench.model_throughput()
        demo_settings = bench.pipeline()
        bench.query_latency(demo_settings)
        bench.localisation()
        vector_settings = bench.annoy()
        bench.memory(vector_settings, demo_settings)
    m, ext = bench.metrics, bench.extractor
    native = cpu_has_native_bf16()
    m["limit_images_per_s"] = m["limit_matmul_gflops"] / m["model_gflop_per_image"]
    m["model_fraction_of_limit"] = m["model_images_per_s"] / m["limit_images_per_s"]
    environment = {
        "cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "weights": ext.weights_id, "precision": ext.precision,
        "native_bf16": native, "image_size": ext.image_size, "pooling": settings.pooling,
        "load_before": load_before, "load_after": _load(), "seconds": time.perf_counter() - start,
        "quick": config.quick,
    }
    return BenchReport(environment, m, goal_checks(m, config, native, bench.details), bench.details, bench.advice)


def goal_checks(m: dict[str, float], config: BenchConfig, native_bf16: bool, details: dict[str, Any]) -> list[GoalCheck]:
    from engine.features import DEFAULT_LOCALIZATION

    trials = [t["ratio"] for t in details["pipeline_trials"]]
    rss_torch = details.get("rss_torch", "?")
    overhead = m["query_to_model_ratio"] - 1
    localisations = {  # mode: (name, what it does, ms, share of a search without it)
        "mask": ("masked pooling", "the head in the embedding pass", m["mask_pool_extra_ms"], m["mask_pool_overhead"]),
        "crop": ("cropping", "mask pass + clean-up", m["localize_p50_ms"], m["localize_overhead"]),
    }
    limit_kind = "bf16" if native_bf16 else "fp32"
    qw, qh = config.query_px
    return [
        GoalCheck(
            "indexing pipeline vs model alone",
            f"{m['pipeline_images_per_s']:.2f} vs {m['pipeline_model_images_per_s']:.2f} images/s (model alone at "
            f"batch {m['model_best_batch']:.0f}, mean of a run right before and one right after) = "
            f"{m['pipeline_ratio']:.3f}, the median of {len(trials)} builds ({', '.join(f'{r:.3f}' for r in trials)}); "
            f"{m['pipeline_images']:.0f} demo JPEGs {config.image_px}px",
            f">= {PIPELINE_RATIO_GOAL}",
            m["pipeline_ratio"] >= PIPELINE_RATIO_GOAL,
        ),
        GoalCheck(
            f"query latency (decode + model + search, {qw}x{qh} JPEG)",
            f"p50 {m['query_p50_ms']:.1f} ms, p95 {m['query_p95_ms']:.1f} ms; model alone batch 1 p50 "
            f"{m['model_batch1_p50_ms']:.1f} ms: overhead {overhead:+.0%}",
            f"overhead <= {QUERY_OVERHEAD_GOAL:.0%}",
            overhead <= QUERY_OVERHEAD_GOAL,
        ),
        GoalCheck(
            "finding the product in the photo vs the search without it",
            "; ".join(f"{name} ({'the default, ' if mode == DEFAULT_LOCALIZATION else ''}VSEARCH_LOCALIZE={mode}: "
                      f"{how}): {ms:.1f} ms = {overhead:+.0%} of a search"
                      for mode, (name, how, ms, overhead) in localisations.items()),
            f"<= +{LOCALIZE_OVERHEAD_GOAL:.0%} for the default",
            localisations[DEFAULT_LOCALIZATION][3] <= LOCALIZE_OVERHEAD_GOAL,
        ),
        GoalCheck(
            f"Annoy recall@{RECALL_AT} vs brute force, {config.vectors} synthetic vectors",
            f"{m['annoy_recall_at_10']:.3f} at {m['annoy_dims']:.0f} dims, n_trees {m['annoy_n_trees']:.0f}, "
            f"search_k {m['annoy_search_k']:.0f};"
            f" p50 {m['annoy_p50_ms']:.2f} ms (CPU time {m['annoy_cpu_p50_ms']:.2f}), p95 {m['annoy_p95_ms']:.2f} ms (brute force {m['exact_query_ms']:.1f} "
            f"ms/query); build {m['annoy_build_s']:.0f} s"
            + (f". Whitened as the engine's index is (search_k {m['annoy_whitened_search_k']:.0f}): recall "
               f"{m['annoy_whitened_recall_at_10']:.3f}, p50 {m['annoy_whitened_p50_ms']:.2f} ms"
               if "annoy_whitened_recall_at_10" in m else ""),
            f">= {RECALL_GOAL}, p50 < {ANNOY_P50_GOAL_MS:g} ms",
            m["annoy_recall_at_10"] >= RECALL_GOAL and m["annoy_p50_ms"] < ANNOY_P50_GOAL_MS,
        ),
        GoalCheck(
            "peak RSS, model + Searcher + 10 queries, fresh process",
            f"{m['peak_rss_mb']:.0f} MB (torch {rss_torch}) over the {config.vectors}-vector index (after the "
            f"queries: anonymous "
            f"{m['rss_anon_mb']:.0f} MB, file-backed {m['rss_file_mb']:.0f} MB); {m['peak_rss_demo_mb']:.0f} MB over "
            f"the {m['pipeline_images']:.0f}-image demo index"
            + (f"; this interpreter's torch build: {m['peak_rss_this_python_mb']:.0f} MB"
               if "peak_rss_this_python_mb" in m else ""),
            f"< {RSS_GOAL_MB:.0f} MB",
            m["peak_rss_mb"] < RSS_GOAL_MB,
        ),
        GoalCheck(
            f"model vs this CPU's {limit_kind} limit",
            f"{m['model_images_per_s']:.2f} of {m['limit_images_per_s']:.2f} images/s = "
            f"{m['model_fraction_of_limit']:.2f} (matmul {config.matmul_n}, {limit_kind}, timed between the model's "
            f"calls: {m['limit_matmul_gflops']:.0f} GFLOP/s; timed apart at the start: fp32 "
            f"{m['matmul_fp32_gflops']:.0f}, bf16 {m['matmul_bf16_gflops']:.0f}; conv part "
            f"{m['model_gflop_per_image']:.1f} GFLOP/image)",
            f">= {LIMIT_FRACTION_GOAL}",
            m["model_fraction_of_limit"] >= LIMIT_FRACTION_GOAL,
        ),
    ]


# -- command line -------------------------------------------------------------------------------------


def _count(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is too small: give at least {minimum}")
        return value

    return parse


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds, not minutes): a smoke test")
    parser.add_argument("--images", type=_count(1), help="demo catalog images to index in each trial (default 120)")
    parser.add_argument("--vectors", type=_count(100), help="synthetic vectors for the Annoy recall test (default 100000)")
    parser.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    sweep = parser.add_mutually_exclusive_group()
    sweep.add_argument("--sweep", dest="sweep", action="store_true", default=None,
                       help="always try other Annoy n_trees/search_k (default: only when the goal is missed)")
    sweep.add_argument("--no-sweep", dest="sweep", action="store_false", help="never sweep Annoy settings")
    parser.add_argument("--rss-python", metavar="PYTHON",
                        help="measure peak RSS in a process of this interpreter, e.g. a virtualenv with the "
                        "CPU-only torch build the Docker image installs (default: this one)")


def run_bench(args: argparse.Namespace) -> int:
    config = BenchConfig.from_args(args)
    if args.json:
        target = Path(args.json)
        if not target.parent.is_dir():
            print(f"error: {target.parent} does not exist; give --json a path in an existing folder.", file=sys.stderr)
            return 2
    settings = EngineSettings.from_env()

    def log(message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)

    report = run(config, settings, log)
    print(report.to_markdown())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2), encoding="utf-8")
        log(f"wrote {args.json}")
    return 0
