"""Admin /reindex through ChatCore: progress, one at a time, live switch in this and other processes, failures."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest
from bot_fixtures import build_engine, make_bot_settings, open_stack

from bot import replies
from bot.admin import Admin, IndexWatcher, catalog_to_rebuild
from bot.search_client import InProcessSearchClient

pytest_plugins = ["bot_fixtures"]


class RecordingSink:
    def __init__(self) -> None:
        self.texts: list[str] = []

    async def update(self, text: str) -> None:
        self.texts.append(text)


class SlowExtractor:
    """The real extractor, slowed down per batch so the build lasts long enough to report progress."""

    def __init__(self, extractor, delay: float) -> None:
        self._extractor = extractor
        self._delay = delay

    def embed_arrays_with_shapes(self, arrays, pooling, **kwargs):
        time.sleep(self._delay)
        return self._extractor.embed_arrays_with_shapes(arrays, pooling, **kwargs)

    def __getattr__(self, name):
        return getattr(self._extractor, name)


def renamed_catalog(folder: Path, products: int, image_size: int) -> Path:
    """A demo catalog whose products are called new-NNN (so answers show which version served them)."""
    from indexer.demo import make_demo_catalog

    return make_demo_catalog(
        folder, products, image_size, id_prefix="new", url_template="https://new-shop.example/products/{id}"
    )


@pytest.fixture
async def reindex_stack(tmp_path, extractor, redis_state):
    """Its own data dir (index of 6 demo products) with VSEARCH_CATALOG pointing at 10 new-NNN products."""
    from indexer.demo import make_demo_catalog

    engine = await asyncio.to_thread(build_engine, make_demo_catalog(tmp_path / "a", products=6, image_size=160),
                                     tmp_path / "data", extractor)
    new_catalog = renamed_catalog(tmp_path / "b", products=10, image_size=176)
    settings = make_bot_settings(dataclasses.replace(engine.settings, catalog=str(new_catalog)))
    stack = await open_stack(settings, redis_state, engine)
    stack.admin.progress_every_s = 0.05
    stack.admin.extractor = SlowExtractor(extractor, delay=0.3)
    yield stack
    await stack.admin.close()
    await stack.search.close()


def photo(data: bytes):
    async def get() -> bytes:
        return data

    return get


async def test_admin_reindex_reports_progress_and_switches(reindex_stack, monkeypatch):
    s = reindex_stack
    monkeypatch.setattr("indexer.build.BATCH_SIZE", 4)  # several slow batches -> progress between them
    old_version = s.search.index_version
    sink = RecordingSink()
    started = await s.core.on_text("telegram", "1001", "r1", "/reindex", progress=sink)
    assert not started.is_error and "Reindex started" in started.text
    assert str(s.settings.engine.catalog) in started.text

    # A second request (another admin, another channel) is told one is running; so is another process.
    again = await s.core.on_text("whatsapp", "15550001111", "r2", "reindex")
    assert again.is_error and again.text == replies.REINDEX_RUNNING
    other_process = Admin(s.settings, s.state, s.search)
    assert (await other_process.start_reindex(None)).text == replies.REINDEX_RUNNING
    status = await s.core.on_text("telegram", "1001", "r3", "/status")
    assert "Reindex: not running" not in status.text

    # Searching goes on meanwhile, from the old version.
    during = await s.core.on_photo("telegram", "77", "p1", photo(s.engine.image_bytes("demo-002")))
    assert during.cards[0].product_id == "demo-002"

    await asyncio.wait_for(s.admin.wait(), timeout=120)
    progress = [t for t in sink.texts if t.startswith("Reindexing:")]
    assert progress, sink.texts
    assert "%" in progress[0] and "images/s" in progress[0]
    assert "Reindex finished" in sink.texts[-1] and "10 products" in sink.texts[-1]
    assert "0 failures" in sink.texts[-1]

    assert s.search.index_version not in (None, old_version)
    after = await s.core.on_photo("telegram", "77", "p2", photo(s.engine.image_bytes("demo-002")))
    assert after.cards and all(c.product_id.startswith("new-") for c in after.cards)
    assert all("/products/new-" in c.url for c in after.cards)
    assert not await s.state.reindex_running()
    assert await s.state.reindex_progress() is None


async def test_non_admin_reindex_runs_nothing(reindex_stack):
    s = reindex_stack
    version = s.search.index_version
    reply = await s.core.on_text("telegram", "999", "x1", "/reindex", progress=RecordingSink())
    assert reply.is_error and reply.text == replies.NOT_ADMIN
    assert s.admin.task is None and not await s.state.reindex_running()
    assert s.search.index_version == version


async def test_failed_reindex_keeps_the_index_and_frees_the_lock(reindex_stack, tmp_path):
    s = reindex_stack
    version = s.search.index_version
    s.admin.settings = dataclasses.replace(
        s.settings, engine=dataclasses.replace(s.settings.engine, catalog=str(tmp_path / "missing.csv")))
    sink = RecordingSink()
    await s.core.on_text("telegram", "1001", "f1", "/reindex", progress=sink)
    await asyncio.wait_for(s.admin.wait(), timeout=60)
    assert sink.texts and sink.texts[-1].startswith("Reindex failed") and "current index stays" in sink.texts[-1]
    assert s.search.index_version == version
    assert not await s.state.reindex_running()
    ok = await s.core.on_photo("telegram", "78", "p3", photo(s.engine.image_bytes("demo-001")))
    assert ok.cards[0].product_id == "demo-001"


async def test_catalog_defaults_to_the_current_index(reindex_stack, tmp_path):
    s = reindex_stack
    plain = dataclasses.replace(s.settings, engine=dataclasses.replace(s.settings.engine, catalog=None))
    assert catalog_to_rebuild(plain) == str(s.engine.catalog)
    empty = dataclasses.replace(plain, engine=dataclasses.replace(plain.engine, data_dir=tmp_path / "none"))
    assert catalog_to_rebuild(empty) is None
    admin = Admin(empty, s.state, s.search)
    assert (await admin.start_reindex(None)).text == replies.NO_CATALOG


async def test_other_processes_switch_within_5_seconds(reindex_stack, extractor):
    """A second serving process (own Searcher, same data dir and Redis) follows /reindex and a shell build."""
    from engine.search import Searcher
    from indexer.build import build_index

    s = reindex_stack
    other = InProcessSearchClient(await asyncio.to_thread(Searcher, s.engine.settings, extractor))
    watcher = IndexWatcher(s.state, other)
    watcher.start()
    try:
        assert other.index_version == s.search.index_version
        s.admin.extractor = extractor
        await s.core.on_text("telegram", "1001", "w1", "/reindex")
        await asyncio.wait_for(s.admin.wait(), timeout=120)
        new_version = s.search.index_version
        switched_at = time.monotonic()
        while other.index_version != new_version and time.monotonic() - switched_at < 5:
            await asyncio.sleep(0.05)
        assert other.index_version == new_version

        # `vsearch index` from the shell publishes nothing: the pointer check catches it.
        report = await asyncio.to_thread(build_index, s.engine.catalog, s.engine.settings, extractor=extractor)
        built_at = time.monotonic()
        while other.index_version != report.version and time.monotonic() - built_at < 5:
            await asyncio.sleep(0.05)
        assert other.index_version == report.version
    finally:
        await watcher.stop()
        await other.close()
