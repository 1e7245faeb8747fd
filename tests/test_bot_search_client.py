"""InProcessSearchClient: one model thread, concurrent queries batched, bad photos and engine failures isolated."""

from __future__ import annotations

import asyncio
import threading

import image_factories as f
import pytest

from bot.search_client import InProcessSearchClient, SearchClosed
from engine.errors import ImageRejected

pytest_plugins = ["bot_fixtures"]


class RecordingSearcher:
    """The real searcher, recording each model call (batch size, thread); optionally failing on a marker image."""

    def __init__(self, searcher, poison_size: tuple[int, int] | None = None) -> None:
        self.searcher = searcher
        self.calls: list[tuple[int, str]] = []
        self.poison_size = poison_size

    def search_images(self, images, top_k):
        self.calls.append((len(images), threading.current_thread().name))
        if self.poison_size and any(img.size == self.poison_size for img in images):
            raise RuntimeError("engine blew up on this photo")
        return self.searcher.search_images(images, top_k)

    def __getattr__(self, name):
        return getattr(self.searcher, name)


async def test_concurrent_queries_share_model_calls(bot_engine):
    recorder = RecordingSearcher(bot_engine.searcher)
    client = InProcessSearchClient(recorder, max_batch=8, max_wait_ms=50)
    try:
        photos = [bot_engine.image_bytes(f"demo-{n:03d}") for n in range(1, 9)]
        results = await asyncio.gather(*(client.search(p, 3) for p in photos))
    finally:
        await client.close()
    assert len(recorder.calls) < len(photos), recorder.calls
    assert sum(size for size, _ in recorder.calls) == len(photos)
    assert all(name.startswith("vsearch-model") for _, name in recorder.calls)
    assert all(len(r.matches) == 3 for r in results)
    # Each photo of the catalog finds its own product first (same image, same vector).
    assert [r.matches[0].product.id for r in results] == [f"demo-{n:03d}" for n in range(1, 9)]
    assert all(r.index_version == bot_engine.version for r in results)


async def test_a_bad_photo_fails_only_itself(bot_engine):
    recorder = RecordingSearcher(bot_engine.searcher)
    client = InProcessSearchClient(recorder, max_batch=8, max_wait_ms=50)
    good = bot_engine.image_bytes("demo-002")
    try:
        outcomes = await asyncio.gather(
            client.search(good, 3), client.search(b"this is not an image", 3),
            client.search(f.make_jpeg()[:40], 3), client.search(good, 5), return_exceptions=True)
    finally:
        await client.close()
    assert outcomes[0].matches[0].product.id == "demo-002" and len(outcomes[0].matches) == 3
    assert isinstance(outcomes[1], ImageRejected) and outcomes[1].reason == "not_an_image"
    assert isinstance(outcomes[2], ImageRejected)
    assert len(outcomes[3].matches) == 5  # per-query top_k inside one batch


async def test_an_engine_failure_on_one_photo_spares_the_others(bot_engine):
    recorder = RecordingSearcher(bot_engine.searcher, poison_size=(77, 55))
    client = InProcessSearchClient(recorder, max_batch=8, max_wait_ms=50)
    good = bot_engine.image_bytes("demo-003")
    try:
        outcomes = await asyncio.gather(client.search(good, 3), client.search(f.make_png(77, 55), 3),
                                        client.search(good, 3), return_exceptions=True)
    finally:
        await client.close()
    assert isinstance(outcomes[1], RuntimeError)
    assert outcomes[0].matches[0].product.id == "demo-003" and outcomes[2].matches[0].product.id == "demo-003"


async def test_similar_and_unknown_product(bot_engine):
    client = InProcessSearchClient(bot_engine.searcher)
    try:
        result = await client.similar("demo-004", 4)
        assert len(result.matches) == 4 and "demo-004" not in [m.product.id for m in result.matches]
        with pytest.raises(KeyError):
            await client.similar("no-such-product", 3)
    finally:
        await client.close()


async def test_close_finishes_queued_work_then_refuses(bot_engine):
    client = InProcessSearchClient(bot_engine.searcher, max_batch=2, max_wait_ms=1)
    photo = bot_engine.image_bytes("demo-005")
    tasks = [asyncio.create_task(client.search(photo, 3)) for _ in range(5)]
    await asyncio.sleep(0)  # queued, not yet answered
    await client.close()
    assert all(t.done() and t.result().matches[0].product.id == "demo-005" for t in tasks)
    with pytest.raises(SearchClosed):
        await client.search(photo, 3)


async def test_the_event_loop_stays_free_during_a_search(bot_engine):
    client = InProcessSearchClient(bot_engine.searcher)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await asyncio.gather(*(client.search(bot_engine.image_bytes("demo-006"), 3) for _ in range(4)))
    finally:
        task.cancel()
        await client.close()
    assert ticks >= 3
