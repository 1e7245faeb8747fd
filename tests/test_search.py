"""Searcher end to end: a phone-photo-like copy of a catalog image finds its own product."""

from __future__ import annotations

import io
import random
import threading

import pytest
from PIL import Image

from engine.augment import clean_crop
from engine.errors import ImageRejected, IndexNotReady
from engine.search import Searcher
from indexer.build import build_index


@pytest.fixture(scope="module")
def searcher(demo_catalog, extractor, tmp_path_factory):
    from engine.settings import EngineSettings

    settings = EngineSettings(
        data_dir=tmp_path_factory.mktemp("data"), weights="random", image_size=extractor.image_size
    )
    build_index(demo_catalog, settings, extractor=extractor)
    return Searcher(settings, extractor=extractor)


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


PRODUCTS = ["demo-002", "demo-006", "demo-011", "demo-015"]


def test_transformed_catalog_image_finds_its_own_product_first(searcher, demo_catalog):
    rng = random.Random(7)
    for pid in PRODUCTS:
        original = Image.open(demo_catalog.parent / "images" / f"{pid}-1.jpg")
        query = clean_crop(original, rng)  # cropped, recoloured, re-encoded
        result = searcher.search(jpeg_bytes(query), 5)
        assert len(result.matches) == 5
        assert len({m.product.id for m in result.matches}) == 5  # a product never appears twice
        assert result.matches[0].product.id == pid


def test_exact_catalog_image_scores_one(searcher, demo_catalog):
    data = (demo_catalog.parent / "images" / "demo-005-1.jpg").read_bytes()
    best = searcher.search(data, 3).matches[0]
    assert best.product.id == "demo-005" and best.score == pytest.approx(1.0, abs=1e-3)
    assert best.product.url.endswith("/demo-005")


def test_multi_image_product_counts_once_with_its_best_image(searcher, demo_catalog):
    data = (demo_catalog.parent / "images" / "demo-001-2.jpg").read_bytes()  # the mirrored second photo
    result = searcher.search(data, 16)
    ids = [m.product.id for m in result.matches]
    assert ids[0] == "demo-001" and ids.count("demo-001") == 1 and len(ids) == 16
    assert result.matches[0].image.endswith("demo-001-2.jpg")


def test_similar_excludes_the_product_itself(searcher):
    result = searcher.similar("demo-003", 4)
    assert len(result.matches) == 4 and "demo-003" not in {m.product.id for m in result.matches}
    with pytest.raises(KeyError):
        searcher.similar("no-such-product", 4)


def test_bad_query_image_raises_the_typed_error(searcher):
    with pytest.raises(ImageRejected) as info:
        searcher.search(b"GIF89a but not really", 3)
    assert info.value.reason in ("truncated", "corrupt", "not_an_image")


def test_no_index_yet(engine_settings, extractor):
    with pytest.raises(IndexNotReady, match="vsearch index"):
        Searcher(engine_settings, extractor=extractor).search(b"x", 3)


def test_concurrent_searches_agree(searcher, demo_catalog):
    data = (demo_catalog.parent / "images" / "demo-009-1.jpg").read_bytes()
    expected = [m.product.id for m in searcher.search(data, 5).matches]
    results: list[list[str]] = []

    def run() -> None:
        results.append([m.product.id for m in searcher.search(data, 5).matches])

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 4


def test_category_vote_puts_the_photos_likely_category_first(searcher, demo_catalog):
    import dataclasses
    from collections import Counter

    from engine.ranking import RERANK_NEIGHBOURS, RERANK_POOL

    data = (demo_catalog.parent / "images" / "demo-004-1.jpg").read_bytes()
    voted = Searcher(dataclasses.replace(searcher.settings, category_boost=float("inf")), extractor=searcher.extractor)
    plain = searcher.search(data, RERANK_POOL).matches
    reranked = voted.search(data, 8).matches
    share = Counter(m.product.category for m in plain[:RERANK_NEIGHBOURS])
    # categories in vote order, each one's products by their (unchanged) similarity
    keys = [(-share[m.product.category], -m.score) for m in reranked]
    assert keys == sorted(keys)
    assert {m.product.id: m.score for m in reranked}.items() <= {m.product.id: m.score for m in plain}.items()
    assert len({m.product.category for m in plain[:RERANK_NEIGHBOURS]}) >= 2  # the vote had a choice to make


def test_more_like_this_puts_the_products_own_category_first(searcher):
    import dataclasses

    from engine.ranking import RERANK_POOL

    def similar(boost: float, top_k: int):
        settings = dataclasses.replace(searcher.settings, category_boost=boost)
        return Searcher(settings, extractor=searcher.extractor).similar("demo-004", top_k).matches

    own = searcher.product("demo-004").category
    plain = similar(0.0, RERANK_POOL)
    first = similar(float("inf"), 8)
    # the product's own category first, then the others; within each, by (unchanged) similarity
    keys = [(m.product.category != own, -m.score) for m in first]
    assert keys == sorted(keys)
    assert {m.product.id: m.score for m in first}.items() <= {m.product.id: m.score for m in plain}.items()
    # from the wider pool: every product of its category among the top RERANK_POOL, some beyond the plain top 8
    same = [m.product.id for m in plain if m.product.category == own]
    assert [m.product.id for m in first[: len(same)]] == same
    assert set(same) - {m.product.id for m in plain[:8]}
    assert "demo-004" not in {m.product.id for m in first}


def test_category_boost_setting_validates():
    from engine.errors import SettingsError
    from engine.settings import DEFAULT_CATEGORY_BOOST, EngineSettings

    assert EngineSettings.from_env({}).category_boost == DEFAULT_CATEGORY_BOOST
    assert EngineSettings.from_env({"VSEARCH_CATEGORY_BOOST": "0.25"}).category_boost == 0.25
    assert EngineSettings.from_env({"VSEARCH_CATEGORY_BOOST": "inf"}).category_boost == float("inf")
    for bad in ("-0.1", "nan", "lots"):
        with pytest.raises(SettingsError, match="VSEARCH_CATEGORY_BOOST"):
            EngineSettings.from_env({"VSEARCH_CATEGORY_BOOST": bad})
