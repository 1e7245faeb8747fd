"""The eval runner on generated catalogs, with a pixel-based stand-in extractor and with the real one."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.evaluate import METRICS, SEED_BASELINE, run_eval, sample_products, split_products
from engine.pooling import POOLINGS
from indexer.demo import COLOURS, STYLES, draw_shoe

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
METHOD_NAMES = [p + suffix for p in POOLINGS for suffix in ("", "+white")] + [SEED_BASELINE]


class PixelExtractor:
    """Stands in for FeatureExtractor: 'conv maps' are a fixed random mix of 8x8 downsampled pixels."""

    weights_id = "fake:pixels"
    precision = "fp32"
    image_size = 32

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.mix = rng.normal(size=(512, 3)).astype(np.float32)
        self.bias = rng.normal(scale=0.2, size=(512, 1, 1)).astype(np.float32)
        self.images_seen = 0

    def conv_maps(self, images) -> torch.Tensor:
        self.images_seen += len(images)
        pixels = np.stack(
            [np.asarray(im.convert("RGB").resize((8, 8), Image.Resampling.BILINEAR), np.float32) / 255 for im in images]
        )
        maps = np.einsum("nhwc,kc->nkhw", pixels - 0.5, self.mix) + self.bias
        return torch.from_numpy(np.maximum(maps, 0).astype(np.float32))


def write_catalog(folder: Path, products: int = 12, two_views: int = 4, size: int = 160) -> Path:
    """A catalog in the shared datasets' layout (product_id, no url); the first `two_views` have 2 images."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS.values())
    rows = []
    for n in range(products):
        style = STYLES[n % len(STYLES)]
        colour = colours[(n // len(STYLES) + n) % len(colours)]
        pid = f"p{n:02d}"
        for view in range(2 if n < two_views else 1):
            name = f"images/{pid}-{view + 1}.jpg"
            draw_shoe(style, colour, seed=n, size=size, mirror=view == 1).save(folder / name, quality=90)
            rows.append([pid, f"Shoe {n}", style, "men" if n % 2 else "women", name])
    path = folder / "catalog.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["product_id", "title", "category", "subcategory", "image"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    return write_catalog(tmp_path_factory.mktemp("evalcat"))


@pytest.fixture(scope="module")
def report_and_extractor(catalog):
    extractor = PixelExtractor()
    return run_eval(catalog, extractor=extractor, progress=False), extractor


def test_report_structure_and_ranges(report_and_extractor):
    report, extractor = report_and_extractor
    assert [m.method for m in report.methods] == METHOD_NAMES
    assert report.products == 12 and report.images == 16
    # 4 products x 2 images are same-product queries; every image is a cluttered, plain photo, clean and
    # category query
    assert report.queries == {"same": 8, "category": 16, "photo": 16, "plain": 16, "clean": 16}
    for m in report.methods:
        assert set(m.metrics) == set(METRICS)
        for name, value in m.metrics.items():
            assert value is not None, f"{m.method} {name}"
            assert 0.0 <= value <= 1.0
        assert m.metrics["same_r1"] <= m.metrics["same_r5"]
        assert m.metrics["photo_r1"] <= m.metrics["photo_r5"]
    baseline = report.methods[-1]
    assert baseline.distance == "euclidean" and baseline.dims == 512 * 4 * 4  # 8x8 maps, 2x2 max-pooled
    assert all(m.distance == "cosine" and m.dims == 512 for m in report.methods[:-1])
    # conv maps are computed once per catalog image and once per query image: 16 + 3 x 16
    assert extractor.images_seen == 64
    assert report.weights_id == "fake:pixels" and report.image_size == 32
    assert any("product_id" in note for note in report.notes)


def test_ids_stay_aligned(report_and_extractor):
    # Misaligned ids would give chance level (1/12 at rank 1). The second view of a product is its mirror
    # image, which global pooling cannot tell apart from the first: same-product R@1 must be perfect.
    report, _ = report_and_extractor
    by_name = {m.method: m for m in report.methods}
    for name in ("max", "avg", "gem", "rmac"):
        assert by_name[name].metrics["same_r1"] == 1.0
        assert by_name[name].metrics["clean_r5"] >= 0.75
    # The flattened (spatial) baseline sees the mirroring, but clean crops stay close to their source.
    assert by_name[SEED_BASELINE].metrics["clean_r1"] >= 0.75


def test_markdown_and_json(report_and_extractor):
    report, _ = report_and_extractor
    text = report.to_markdown()
    for name in METHOD_NAMES:
        assert f"| {name} |" in text
    assert "fake:pixels" in text and "same mAP@10 (n=8)" in text and "cluttered R@5 (n=16)" in text
    assert "photo-like R@5 (n=16)" in text
    data = json.loads(report.to_json())
    assert data["best"] == report.best_pooling().method
    assert len(data["methods"]) == len(METHOD_NAMES)
    assert data["queries"]["photo"] == 16


def test_best_pooling_is_a_pooling_with_the_top_photo_recall(report_and_extractor):
    report, _ = report_and_extractor
    best = report.best_pooling()
    assert best.pooling in POOLINGS
    top = max(m.metrics["photo_r5"] for m in report.methods if m.pooling is not None)
    assert best.metrics["photo_r5"] == top


def test_same_seed_same_numbers(catalog, report_and_extractor):
    first, _ = report_and_extractor
    again = run_eval(catalog, extractor=PixelExtractor(), poolings=("gem",), whitening=(False,), progress=False)
    gem = next(m for m in first.methods if m.method == "gem")
    assert again.methods[0].metrics == gem.metrics


def test_catalog_without_multi_image_products_reports_na(tmp_path):
    path = write_catalog(tmp_path, products=5, two_views=0, size=96)
    report = run_eval(
        path, extractor=PixelExtractor(), poolings=("avg",), whitening=(False,), include_seed_baseline=False,
        queries=("clean",), category_field="subcategory", progress=False,
    )
    [only] = report.methods
    assert only.metrics["same_r1"] is None and only.metrics["same_map10"] is None
    assert only.metrics["photo_r5"] is None  # photo queries were not asked for
    assert only.metrics["clean_r5"] is not None and only.metrics["category_p5"] is not None
    assert report.queries["same"] == 0
    assert any("same-product: n/a" in note for note in report.notes)
    assert "| avg | 512 | n/a | n/a | n/a |" in report.to_markdown()


def test_single_category_is_na(tmp_path):
    path = write_catalog(tmp_path, products=4, two_views=1, size=96)
    rows = list(csv.reader(path.open()))
    for row in rows[1:]:
        row[2] = "casual_shoes"
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    report = run_eval(path, extractor=PixelExtractor(), poolings=("max",), whitening=(False,), queries=(),
                      progress=False)
    assert all(m.metrics["category_p5"] is None for m in report.methods)
    assert any("category P@5: n/a" in note for note in report.notes)


def test_unreadable_images_are_skipped(tmp_path):
    path = write_catalog(tmp_path, products=4, two_views=1, size=96)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"this is not an image")
    with path.open("a", newline="") as fh:
        csv.writer(fh).writerows([["p90", "Broken", "boot", "men", "images/broken.jpg"],
                                  ["p91", "Missing", "boot", "men", "images/missing.jpg"]])
    report = run_eval(path, extractor=PixelExtractor(), poolings=("gem",), whitening=(False,), queries=(),
                      progress=False)
    assert report.images == 5 and report.products == 4
    assert len(report.skipped) == 2
    assert any("broken.jpg" in s for s in report.skipped) and any("missing.jpg" in s for s in report.skipped)


def test_limit_and_split(catalog):
    limited = run_eval(catalog, extractor=PixelExtractor(), limit=5, poolings=("gem",), whitening=(False,),
                       queries=(), progress=False)
    assert limited.products == 5 and limited.limit == 5
    ids = [f"p{n:02d}" for n in range(12)]
    train, held = split_products(ids, 0.25, seed=0)
    split = run_eval(catalog, extractor=PixelExtractor(), split=0.25, poolings=("gem",), whitening=(True,),
                     queries=("clean",), progress=False)
    assert split.split == {"train_products": 9, "eval_products": 3}
    assert split.products == 3
    assert split.images == sum(2 if int(p[1:]) < 4 else 1 for p in held)
    assert split.queries["clean"] == split.images
    assert "whitening fitted on train" in split.to_markdown()
    with pytest.raises(ValueError, match="overlap"):
        run_eval(catalog, extractor=PixelExtractor(), split=(["p00", "p01"], ["p01"]), progress=False)
    with pytest.raises(ValueError, match="eval fraction"):
        run_eval(catalog, extractor=PixelExtractor(), split=1.5, progress=False)


def test_split_products_is_disjoint_and_deterministic():
    ids = [f"prod-{n}" for n in range(50)]
    train, held = split_products(ids, eval_fraction=0.2, seed=3)
    assert len(held) == 10 and len(train) == 40
    assert not set(train) & set(held) and set(train) | set(held) == set(ids)
    assert split_products(ids, 0.2, 3) == (train, held)
    shuffled = list(reversed(ids)) + ids[:5]  # order and repeats do not change who goes where
    assert set(split_products(shuffled, 0.2, 3)[1]) == set(held)
    assert set(split_products(ids, 0.2, 4)[1]) != set(held)
    assert train == [p for p in ids if p in set(train)]  # first-seen order kept
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_products(ids, 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        split_products(["only"], 0.5)


def test_sample_products_is_seeded():
    ids = [f"x{n}" for n in range(30)]
    assert sample_products(ids, 10, 1) == sample_products(ids, 10, 1)
    assert len(sample_products(ids, 10, 1)) == 10
    assert sample_products(ids, None, 1) == ids and sample_products(ids, 99, 1) == ids


def test_bad_arguments_fail_clearly(catalog):
    with pytest.raises(ValueError, match="poolings"):
        run_eval(catalog, extractor=PixelExtractor(), poolings=("sum",), progress=False)
    with pytest.raises(ValueError, match="query kinds"):
        run_eval(catalog, extractor=PixelExtractor(), queries=("video",), progress=False)


def test_real_extractor_with_random_weights(tmp_path, extractor):
    path = write_catalog(tmp_path, products=6, two_views=2, size=128)  # 8 images
    report = run_eval(path, extractor=extractor, poolings=("gem", "max"), progress=False)
    assert [m.method for m in report.methods] == ["gem", "gem+white", "max", "max+white", SEED_BASELINE]
    assert report.weights_id == extractor.weights_id and report.images == 8
    for m in report.methods:
        assert all(0.0 <= v <= 1.0 for v in m.metrics.values() if v is not None)
        assert m.metrics["same_r5"] is not None and m.metrics["photo_r5"] is not None


@pytest.mark.dataset
def test_shared_multiview_dataset(tmp_path):
    catalog = SHARED_DATASETS / "shoes_multiview" / "catalog.csv"
    if not catalog.is_file():
        pytest.skip(f"{catalog} is absent (the shared datasets are not on this machine)")
    report = run_eval(catalog, extractor=PixelExtractor(), limit=8, poolings=("gem",), whitening=(False, True),
                      category_field="subcategory", queries=("photo",), progress=False)
    assert report.products == 8 and report.queries["same"] > 0
    assert report.skipped == []
    for m in report.methods:
        assert all(0.0 <= v <= 1.0 for v in m.metrics.values() if v is not None)


def test_alpha_query_expansion_pulls_a_query_towards_its_neighbours():
    from engine.ranking import alpha_query_expansion

    index = np.eye(4, dtype=np.float32)
    query = np.array([[0.8, 0.6, 0.0, 0.0]], dtype=np.float32)
    expanded = alpha_query_expansion(query, index, neighbours=1, alpha=1.0)
    assert np.isclose(np.linalg.norm(expanded), 1.0)
    assert expanded[0, 0] > query[0, 0] and expanded[0, 1] < query[0, 1]  # towards its nearest item
    assert expanded[0, 2] == 0 and expanded[0, 3] == 0


def test_query_expansion_adds_an_aqe_twin_of_each_cosine_method(catalog):
    report = run_eval(catalog, extractor=PixelExtractor(), poolings=("gem",), whitening=(False,),
                      query_expansion=True, queries=("clean",), progress=False)
    names = [m.method for m in report.methods]
    assert names == ["gem", SEED_BASELINE, "gem+aqe"]
    twin = report.methods[-1]
    assert twin.metrics["clean_r5"] is not None and twin.metrics["same_r1"] is not None


def test_category_vote_twins_rerank_and_a_zero_boost_changes_nothing(catalog):
    report = run_eval(catalog, extractor=PixelExtractor(), poolings=("gem",), whitening=(False,),
                      category_boosts=(0.0, 0.1, float("inf")), queries=("clean",), progress=False,
                      include_seed_baseline=False)
    by_name = {m.method: m.metrics for m in report.methods}
    assert list(by_name) == ["gem", "gem+cat0", "gem+cat0.1", "gem+catinf"]
    # boost 0 goes through the re-ranking path (wider pool, best image per product) and must rank as the plain one
    assert by_name["gem+cat0"] == by_name["gem"]
    for metrics in by_name.values():
        assert metrics["category_p5"] is not None and metrics["clean_r5"] is not None


def test_category_vote_rerank_by_hand():
    from engine.ranking import ProductHit, category_vote_rerank

    category = {"a": "boots", "b": "shoes", "c": "shoes", "d": "shoes", "e": None}
    hits = [ProductHit("a", 0.90, 0), ProductHit("b", 0.89, 1), ProductHit("c", 0.88, 2),
            ProductHit("e", 0.85, 3), ProductHit("d", 0.70, 4)]
    order = lambda boost: [h.product_id for h in category_vote_rerank(hits, category.get, boost, neighbours=3)]  # noqa: E731
    # the top 3 vote shoes 2/3, boots 1/3; boost 0.5 of the spread 0.2: b 0.957, c 0.947, a 0.933, e 0.85 (no
    # category), d 0.767
    assert order(0.5) == ["b", "c", "a", "e", "d"]
    assert order(0.05) == ["a", "b", "c", "e", "d"]  # a's lead of 0.01 over b outweighs 0.05 * 0.2 / 3
    assert order(float("inf")) == ["b", "c", "d", "a", "e"]  # categories in vote order, then the uncategorised
    assert order(0.0) == ["a", "b", "c", "e", "d"]
    assert [h.product_id for h in category_vote_rerank(hits, lambda _: None, 1.0, neighbours=3)] == ["a", "b", "c", "e", "d"]
    with pytest.raises(ValueError):
        category_vote_rerank(hits, category.get, 0.1, neighbours=0)


def test_category_rerank_with_a_known_category():
    from engine.ranking import ProductHit, category_rerank

    category = {"a": "boots", "b": "shoes", "c": "shoes", "d": None}
    hits = [ProductHit("a", 0.9, 0), ProductHit("b", 0.8, 1), ProductHit("d", 0.75, 2), ProductHit("c", 0.5, 3)]
    order = lambda boost: [h.product_id for h in category_rerank(hits, category.get, {"shoes": 1.0}, boost)]  # noqa: E731
    # spread 0.4: at 0.5 shoes gain 0.2: b 1.0, a 0.9, d 0.75 (no category), c 0.7
    assert order(0.5) == ["b", "a", "d", "c"]
    assert order(float("inf")) == ["b", "c", "a", "d"]
    assert order(0.0) == ["a", "b", "d", "c"]
    assert [h.product_id for h in category_rerank(hits, category.get, {}, 1.0)] == ["a", "b", "d", "c"]
    assert category_rerank([], category.get, {"shoes": 1.0}, 1.0) == []
    with pytest.raises(ValueError):
        category_rerank(hits, category.get, {"shoes": 1.0}, -0.5)
