"""The one interface channels use to reach the engine, and its in-process implementation with micro-batching."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from engine.errors import ImageRejected, IndexNotReady, ReindexRequired
from engine.types import Product, SearchResult

log = logging.getLogger(__name__)


class SearchClient(Protocol):
    async def search(self, image_bytes: bytes, top_k: int) -> SearchResult: ...
    async def similar(self, product_id: str, top_k: int) -> SearchResult: ...
    async def reload_if_changed(self) -> bool: ...
    def product(self, product_id: str) -> Product | None: ...
    def local_image_path(self, product: Product) -> Path | None: ...
    @property
    def index_version(self) -> str | None: ...
    @property
    def product_count(self) -> int: ...
    async def close(self) -> None: ...


class SearchClosed(RuntimeError):
    """The client is shutting down and takes no new queries."""


@dataclass
class _Pending:
    image_bytes: bytes
    top_k: int
    future: asyncio.Future[SearchResult]
    arrived: float = field(default_factory=time.perf_counter)


class InProcessSearchClient:
    """Runs the searcher in ONE worker thread; queries that arrive together go through the model as one batch."""

    def __init__(self, searcher: Any, *, max_batch: int = 8, max_wait_ms: float = 10.0) -> None:
        self.searcher = searcher
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.batches_run = 0  # model calls, for tests and metrics
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vsearch-model")
        self._worker: asyncio.Task[None] | None = None
        self._closing = False

    # -- the engine facts the channels need (cheap, thread-safe reads) --
    @property
    def index_version(self) -> str | None:
        return self.searcher.index_version

    @property
    def product_count(self) -> int:
        return self.searcher.product_count

    def product(self, product_id: str) -> Product | None:
        return self.searcher.product(product_id)

    def local_image_path(self, product: Product) -> Path | None:
        return self.searcher.local_image_path(product)

    async def reload_if_changed(self) -> bool:
        # Loading a new version reads files; keep it off both the event loop and the model thread.
        return await asyncio.to_thread(self.searcher.reload_if_changed)

    # -- queries --
    async def search(self, image_bytes: bytes, top_k: int) -> SearchResult:
        if self._closing:
            raise SearchClosed("the search service is shutting down")
        loop = asyncio.get_running_loop()
        if self._worker is None:
            self._worker = loop.create_task(self._run(), name="vsearch-batcher")
        pending = _Pending(image_bytes, top_k, loop.create_future())
        self._queue.put_nowait(pending)
        return await pending.future

    async def similar(self, product_id: str, top_k: int) -> SearchResult:
        if self._closing:
            raise SearchClosed("the search service is shutting down")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.searcher.similar, product_id, top_k)

    async def close(self) -> None:
        """Take no new queries, finish the queued ones, stop the worker thread."""
        self._closing = True
        if self._worker is not None:
            await self._queue.join()
            self._worker.cancel()
            await asyncio.wait({self._worker})
            self._worker = None
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                try:
                    batch.append(self._queue.get_nowait() if timeout <= 0 else
                                 await asyncio.wait_for(self._queue.get(), timeout))
                except (asyncio.QueueEmpty, TimeoutError):
                    break
            try:
                outcomes = await loop.run_in_executor(self._executor, self._search_batch, batch)
            except BaseException as exc:  # the executor itself failed (e.g. shut down): fail this batch only
                outcomes = [exc] * len(batch)
            for pending, outcome in zip(batch, outcomes, strict=True):
                if not pending.future.done():
                    if isinstance(outcome, BaseException):
                        pending.future.set_exception(outcome)
                    else:
                        took = (time.perf_counter() - pending.arrived) * 1000.0
                        pending.future.set_result(dataclasses.replace(outcome, took_ms=took))
                self._queue.task_done()

    def _search_batch(self, batch: list[_Pending]) -> list[SearchResult | BaseException]:
        """In the model thread: decode each photo on its own, then one model call for all decodable ones."""
        from engine.images import load_image

        outcomes: list[SearchResult | BaseException] = [ImageRejected("corrupt", "not decoded")] * len(batch)
        images, slots = [], []
        draft = getattr(self.searcher, "draft_size", None)  # decode JPEGs small
        for i, pending in enumerate(batch):
            try:
                images.append(load_image(pending.image_bytes, draft_size=draft))
                slots.append(i)
            except Exception as exc:  # noqa: BLE001 - each photo's failure stays with that photo
                outcomes[i] = exc
        if not images:
            return outcomes
        top_k = max(batch[i].top_k for i in slots)
        self.batches_run += 1
        try:
            results = self.searcher.search_images(images, top_k)
        except (IndexNotReady, ReindexRequired) as exc:
            for i in slots:
                outcomes[i] = exc
            return outcomes
        except Exception as exc:
            if len(images) == 1:
                log.exception("search failed for one photo")
                outcomes[slots[0]] = exc
                return outcomes
            # One photo may have poisoned the batch: retry each alone so only that one fails.
            log.warning("a batch of %d searches failed; retrying them one by one", len(images))
            results = []
            for image in images:
                try:
                    results.append(self.searcher.search_images([image], top_k)[0])
                except Exception as exc:  # noqa: BLE001
                    log.exception("search failed for one photo")
                    results.append(exc)
        for i, result in zip(slots, results, strict=True):
            if isinstance(result, SearchResult):
                outcomes[i] = dataclasses.replace(result, matches=list(result.matches[: batch[i].top_k]))
            else:
                outcomes[i] = result
        return outcomes
