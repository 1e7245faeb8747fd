"""Tests of engine.bench: `vsearch bench --quick` end to end, and its pure measuring helpers."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from engine import bench
from vsearch_cli.main import build_parser
from vsearch_cli.main import main as cli_main

EXPECTED_METRICS = (
    "matmul_fp32_gflops",
    "matmul_bf16_gflops",
    "model_gflop_per_image",
    "model_images_per_s",
    "model_best_batch",
    "pipeline_images",
    "pipeline_images_per_s",
    "pipeline_ratio",
    "query_p50_ms",
    "query_p95_ms",
    "model_batch1_p50_ms",
    "query_to_model_ratio",
    "exact_query_ms",
    "annoy_recall_at_10",
    "annoy_p50_ms",
    "annoy_p95_ms",
    "annoy_cpu_p50_ms",
    "annoy_n_trees",
    "annoy_search_k",
    "annoy_build_s",
    "annoy_dims",
    "peak_rss_mb",
    "peak_rss_demo_mb",
    "limit_matmul_gflops",
    "limit_images_per_s",
    "model_fraction_of_limit",
    "localize_p50_ms",
    "localize_overhead",
    "mask_pool_extra_ms",
    "mask_pool_overhead",
)


@pytest.mark.slow
def test_quick_bench_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VSEARCH_WEIGHTS", "random")
    monkeypatch.setenv("VSEARCH_IMAGE_SIZE", "64")
    monkeypatch.setenv("VSEARCH_DATA_DIR", str(tmp_path / "untouched"))
    out = tmp_path / "bench.json"

    # --rss-python names the peak-RSS process's interpreter (for a virtualenv with another torch build).
    assert cli_main(["bench", "--quick", "--json", str(out), "--rss-python", sys.executable]) == 0

    report = json.loads(out.read_text(encoding="utf-8"))
    metrics = report["metrics"]
    # Masked pooling's cost is a difference of two timed passes: at the quick run's 64 px it is within the
    # noise of a busy machine and may come out below zero, so only its presence is asserted.
    differences = {"mask_pool_extra_ms", "mask_pool_overhead"}
    for name in EXPECTED_METRICS:
        assert name in metrics, name
        assert math.isfinite(metrics[name]) and (name in differences or metrics[name] > 0), (name, metrics[name])
    quick = bench.BenchConfig.quick_config()
    assert metrics["pipeline_images"] == quick.images
    trials = report["details"]["pipeline_trials"]
    assert len(trials) == quick.pipeline_trials and metrics["pipeline_ratio"] == trials[0]["ratio"]
    # 2000 vectors with search_k 5000 is an exhaustive search: anything short of ~1 means a counting bug.
    assert metrics["annoy_recall_at_10"] >= 0.9
    assert metrics["annoy_whitened_recall_at_10"] >= 0.9  # the default engine whitens: measured too
    assert metrics["annoy_dims"] == bench.DIMS  # the engine's index dims (VSEARCH_INDEX_DIMS)
    assert metrics["model_best_batch"] in quick.batch_sizes
    # The limit comes from the matmuls timed between the model's calls, not from the ones timed at the start.
    assert metrics["limit_images_per_s"] == pytest.approx(metrics["limit_matmul_gflops"] / metrics["model_gflop_per_image"])
    assert report["details"]["limit_matmul"].endswith("calls between the model's")
    assert set(report["details"]["model_by_batch"]) == {str(b) for b in quick.batch_sizes}
    assert report["details"]["rss_index"].startswith(f"{quick.vectors} images")
    assert report["details"]["rss_torch"] == report["details"]["rss_this_python_torch"] == torch.__version__
    assert metrics["peak_rss_this_python_mb"] > 0  # with --rss-python, this interpreter is measured too
    stages = report["details"]["rss_stages_mb"]
    assert list(stages) == ["import torch", "import engine", "model loaded", "index loaded",
                            "after 1st query", "after queries"]
    assert metrics["peak_rss_mb"] >= max(stages.values())  # VmHWM is the high-water mark of VmRSS
    breakdown = report["details"]["rss_breakdown_mb"]
    assert breakdown["RssAnon"] > 0 and breakdown["RssFile"] > 0
    assert breakdown["RssAnon"] + breakdown["RssFile"] <= stages["after queries"] + 1
    assert report["environment"]["image_size"] == 64
    assert len(report["goals"]) == 6 and all(g["result"] for g in report["goals"])
    assert report["details"]["localize_head"].startswith("untrained stand-in")
    finding = report["goals"][2]  # judged on the default way of finding the product: masked pooling
    assert finding["result"].startswith("masked pooling (the default, VSEARCH_LOCALIZE=mask")
    assert finding["met"] == (metrics["mask_pool_overhead"] <= bench.LOCALIZE_OVERHEAD_GOAL)
    table = capsys.readouterr().out
    assert "| # | measure | result | goal | met |" in table
    assert table.count("\n| ") >= 7  # header row + 6 goal rows
    assert not (tmp_path / "untouched").exists()  # the bench builds everything in its own temp folder


def test_median_trial_is_the_middle_ratio_not_the_best():
    trials = [{"ratio": 1.12, "n": 0}, {"ratio": 0.69, "n": 1}, {"ratio": 0.87, "n": 2}]
    assert bench.median_trial(trials)["n"] == 2
    assert bench.median_trial(trials[:1])["n"] == 0


def test_bench_refuses_too_few_vectors(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", "--vectors", "5"])
    assert exc.value.code == 2
    assert "at least 100" in capsys.readouterr().err


def test_products_for_images_gives_the_fewest_products_covering_n():
    for n in range(1, 300):
        products = bench.products_for_images(n)
        images = products + (products + 3) // 4  # make_demo_catalog: every fourth product has two photos
        fewer = products - 1
        assert images >= n
        assert fewer == 0 or fewer + (fewer + 3) // 4 < n


def test_exact_top_matches_a_full_sort():
    rng = np.random.default_rng(1)
    items = rng.standard_normal((500, 16)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries = items[:7] + 0.01
    top, sims = bench.exact_top(items, queries, 10)
    np.testing.assert_array_equal(top, np.argsort(-sims, axis=1)[:, :10])
    assert top[:, 0].tolist() == list(range(7))


def test_synthetic_vectors_are_unit_and_clustered_by_product():
    x, owner = bench.synthetic_vectors(3000, bench.DIMS, seed=3)
    assert x.shape == (3000, bench.DIMS) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    by_owner: dict[int, list[int]] = {}
    for i, o in enumerate(owner.tolist()):
        by_owner.setdefault(o, []).append(i)
    same = [v[:2] for v in by_owner.values() if len(v) >= 2][:200]
    same_cos = np.mean([x[a] @ x[b] for a, b in same])
    any_cos = float(np.mean(x[:200] @ x[200:400].T))
    assert same_cos > 0.8 and 0.3 < any_cos < 0.6  # photos of one product vs unrelated images


def test_conv_gflop_counts_multiply_adds_twice():
    from torchvision.models.vgg import cfgs, make_layers

    # VGG16's conv part at 224px: 15.35 G multiply-adds, i.e. 30.7 GFLOP.
    assert bench.conv_gflop(make_layers(cfgs["D"]), 224) == pytest.approx(30.69, abs=0.01)


def test_searcher_request_mirrors_the_searcher():
    from engine.search import MIN_SEARCH_K, MIN_SEARCH_K_WHITENED, SEARCH_K_PER_ITEM, annoy_search_k

    n, search_k = bench.searcher_request(5)
    assert n == 20
    assert search_k == max(MIN_SEARCH_K, SEARCH_K_PER_ITEM * 20) == annoy_search_k(20, whitened=False)
    # Whitened indexes (the engine's default) are searched wider: Annoy handles their flat spectrum badly.
    assert bench.searcher_request(5, whitened=True) == (20, MIN_SEARCH_K_WHITENED) and search_k < MIN_SEARCH_K_WHITENED
    assert annoy_search_k(1000, whitened=True) == SEARCH_K_PER_ITEM * 1000


def test_percentile_and_timed_calls():
    assert bench.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    calls = []
    times = bench.timed_calls(lambda: calls.append(1), seconds=0.0, min_calls=3)
    assert len(times) == len(calls) == 3 and all(t >= 0 for t in times)


def test_bench_measures_annoy_at_the_engines_index_dims():
    from engine.settings import EngineSettings

    default = EngineSettings()
    assert bench.DIMS == bench.index_dims(default) == default.index_dims == 256
    assert bench.index_dims(EngineSettings(index_dims=0)) == bench.POOLED_DIMS  # 0 keeps all
    assert bench.index_dims(EngineSettings(index_dims=1000)) == bench.POOLED_DIMS
    assert bench.index_dims(EngineSettings(whitening=False)) == bench.POOLED_DIMS  # no whitening, no reduction
    assert "256 of 512" in bench.index_dims_note(default)
