"""Index build, switch, prune, cache reuse and bad catalog rows, with the real model (random weights)."""

from __future__ import annotations

import csv
import json
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from engine.errors import BuildFailed, ReindexRequired
from engine.index import KEEP_VERSIONS, IndexStore
from engine.search import Searcher
from indexer.build import build_index


def test_build_writes_manifest_and_switches(demo_catalog, engine_settings, extractor):
    report = build_index(demo_catalog, engine_settings, extractor=extractor)
    store = IndexStore(engine_settings.index_dir)
    assert store.current_version() == report.version
    manifest = store.read_manifest()
    assert manifest.products == 16 and report.products == 16
    assert manifest.images == 20 == report.images_indexed  # every fourth product has a second photo
    assert manifest.weights == "random:seed0" and manifest.pooling == engine_settings.pooling
    # The whitening keeps VSEARCH_INDEX_DIMS principal directions (default 256) of the 512-dim pooled vector.
    assert manifest.dims == engine_settings.index_dims == 256 and manifest.image_size == engine_settings.image_size
    assert manifest.catalog_path == str(demo_catalog.absolute())
    assert len(manifest.catalog_sha256) == 64
    folder = engine_settings.index_dir / report.version
    assert {p.name for p in folder.iterdir()} >= {"manifest.json", "vectors.ann", "images.json", "products.json", "errors.csv"}


def test_reindex_unchanged_catalog_extracts_nothing(demo_catalog, engine_settings, extractor, tmp_path):
    first = build_index(demo_catalog, engine_settings, extractor=extractor)
    assert first.extracted == 20 and first.cache_hits == 0
    second = build_index(demo_catalog, engine_settings, extractor=extractor)
    assert second.extracted == 0 and second.cache_hits == 20
    # A changed catalog: one new image, only it goes through the model.
    folder = tmp_path / "changed"
    shutil.copytree(demo_catalog.parent, folder)
    from indexer.demo import draw_shoe

    draw_shoe("boot", (10, 200, 10), seed=99).save(folder / "images" / "new.jpg")
    with (folder / "catalog.csv").open("a", newline="") as fh:
        csv.writer(fh).writerow(["demo-new", "New Boot", "https://demo-shop.example/p/new", "images/new.jpg", "10", "EUR", "boot", "Demo"])
    third = build_index(folder / "catalog.csv", engine_settings, extractor=extractor)
    assert third.extracted == 1 and third.cache_hits == 20 and third.products == 17


def test_keeps_last_three_versions(demo_catalog, engine_settings, extractor):
    versions = [build_index(demo_catalog, engine_settings, extractor=extractor).version for _ in range(KEEP_VERSIONS + 2)]
    store = IndexStore(engine_settings.index_dir)
    assert store.versions() == versions[-KEEP_VERSIONS:]
    assert store.current_version() == versions[-1]
    assert not list(engine_settings.index_dir.glob(".building-*"))


def test_reader_during_switch_always_sees_a_whole_index(demo_catalog, engine_settings, extractor):
    build_index(demo_catalog, engine_settings, extractor=extractor)
    searcher = Searcher(engine_settings, extractor=extractor)
    query = (demo_catalog.parent / "images" / "demo-003-1.jpg").read_bytes()
    errors: list[BaseException] = []
    seen: set[str] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                searcher.reload_if_changed()
                result = searcher.search(query, 3)
                assert len(result.matches) == 3
                seen.add(result.index_version)
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
                errors.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(3):
            # Without the cache each build runs the model, so the reader gets turns in between.
            build_index(demo_catalog, engine_settings, extractor=extractor, use_cache=False)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    assert len(seen) >= 2  # the reader moved to a new version while builds were switching


def test_bad_rows_are_reported_and_good_rows_indexed(demo_catalog, engine_settings, extractor, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(demo_catalog.parent, folder)
    (folder / "images" / "text.jpg").write_text("this is not a picture")
    (folder / "images" / "empty.png").write_bytes(b"")
    good = (folder / "catalog.csv").read_text().splitlines()
    header, rows = good[0], good[1:5]
    bad = [
        "bad-1,Missing Url,,images/demo-001-1.jpg,10,EUR,x,y",  # line 6: no url
        "bad-2,Text As Jpg,https://s.example/2,images/text.jpg,10,EUR,x,y",  # line 7: not an image
        "bad-3,Empty,https://s.example/3,images/empty.png,10,EUR,x,y",  # line 8: 0 bytes
        "bad-4,Missing File,https://s.example/4,images/nope.jpg,10,EUR,x,y",  # line 9: no such file
        "bad-5,Ftp Url,ftp://s.example/5,images/demo-001-1.jpg,10,EUR,x,y",  # line 10: bad url
    ]
    (folder / "catalog.csv").write_text("\n".join([header, *rows, *bad]) + "\n")
    report = build_index(folder / "catalog.csv", engine_settings, extractor=extractor)
    assert report.products == 3 and report.images_indexed == 4  # demo-001 has two photos
    by_line = {e.line: e for e in report.errors}
    assert set(by_line) == {6, 7, 8, 9, 10}
    assert by_line[6].field == "url" and by_line[10].field == "url"
    assert "not_an_image" in by_line[7].reason and "empty" in by_line[8].reason
    errors_csv = (engine_settings.index_dir / report.version / "errors.csv").read_text()
    assert all(f"\n{line}," in errors_csv for line in by_line)


def test_no_indexable_image_fails_and_keeps_current(demo_catalog, engine_settings, extractor, tmp_path):
    first = build_index(demo_catalog, engine_settings, extractor=extractor)
    catalog = tmp_path / "broken.csv"
    catalog.write_text("id,title,url,image\np1,Shoe,https://s.example/p1,missing.jpg\n")
    with pytest.raises(BuildFailed):
        build_index(catalog, engine_settings, extractor=extractor)
    assert IndexStore(engine_settings.index_dir).current_version() == first.version


def test_query_against_index_of_other_pooling_asks_for_reindex(demo_catalog, engine_settings, extractor):
    build_index(demo_catalog, engine_settings, extractor=extractor)
    other = replace(engine_settings, pooling="max" if engine_settings.pooling != "max" else "avg")
    searcher = Searcher(other, extractor=extractor)
    with pytest.raises(ReindexRequired, match="vsearch index"):
        searcher.search(b"irrelevant", 3)


def test_conv_block_is_recorded_and_an_index_of_another_block_asks_for_reindex(demo_catalog, engine_settings):
    from engine.features import FeatureExtractor

    block4 = replace(engine_settings, feature_block=4)
    extractor4 = FeatureExtractor.from_settings(block4)
    assert extractor4.feature_block == 4
    build_index(demo_catalog, block4, extractor=extractor4)
    assert IndexStore(engine_settings.index_dir).read_manifest().feature_block == 4
    query = (demo_catalog.parent / "images" / "demo-003-1.jpg").read_bytes()
    assert Searcher(block4, extractor=extractor4).search(query, 3).matches[0].product.id == "demo-003"
    with pytest.raises(ReindexRequired, match="VSEARCH_FEATURE_BLOCK"):
        Searcher(engine_settings).search(query, 3)


def test_products_json_keeps_metadata(demo_catalog, engine_settings, extractor):
    report = build_index(demo_catalog, engine_settings, extractor=extractor)
    products = json.loads((engine_settings.index_dir / report.version / "products.json").read_text())
    first = products["demo-001"]
    assert first["url"] == "https://demo-shop.example/products/demo-001"
    assert first["price"] == "29.90" and first["currency"] == "EUR" and first["brand"] == "Demo"
    assert Path(first["image"]).is_file()


def test_prune_removes_folders_of_dead_builders_only(tmp_path):
    import os
    import subprocess

    store = IndexStore(tmp_path / "index")
    _, mine = store.start_build()  # this process is alive: kept
    child = subprocess.Popen(["true"])  # once reaped, its pid names no live process
    child.wait()
    _, dead = store.start_build()
    (dead / "builder.pid").write_text(str(child.pid))
    store.prune()
    assert mine.is_dir() and not dead.exists()
    assert os.getpid() == int((mine / "builder.pid").read_text())


def test_waiting_search_goes_before_background_batches():
    import time

    from engine.features import ModelLock

    lock = ModelLock()
    order: list[str] = []
    started = threading.Event()

    def run(name: str, background: bool, hold_s: float = 0.0) -> None:
        with lock.hold(background):
            order.append(name)
            started.set()
            time.sleep(hold_s)

    first = threading.Thread(target=run, args=("build-1", True, 0.3))
    first.start()
    started.wait()
    second = threading.Thread(target=run, args=("build-2", True))
    second.start()
    time.sleep(0.05)
    search = threading.Thread(target=run, args=("search", False))
    search.start()
    for t in (first, second, search):
        t.join(timeout=10)
    assert order == ["build-1", "search", "build-2"]
