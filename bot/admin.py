"""Admin work: /reindex in the background under a Redis lock, /status, and the index switch across processes."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot import replies
from bot.config import BotSettings
from bot.replies import Reply
from bot.search_client import SearchClient
from bot.state import REINDEX_LOCK_TTL_S, State

if TYPE_CHECKING:
    from bot.core import ProgressSink

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 3.0
POINTER_CHECK_EVERY_S = 2.0


class ReindexAborted(Exception):
    """Raised inside the build (from its progress callback) when the server shuts down."""


def catalog_to_rebuild(settings: BotSettings) -> str | None:
    """VSEARCH_CATALOG, else the catalog the current index was built from."""
    if settings.engine.catalog:
        return settings.engine.catalog
    from engine.index import IndexStore

    store = IndexStore(settings.engine.index_dir)
    if store.current_version() is None:
        return None
    try:
        return store.read_manifest().catalog_path or None
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Admin:
    """Runs one reindex at a time (a Redis lock, plus a local guard when Redis is down)."""

    def __init__(self, settings: BotSettings, state: State, search: SearchClient, extractor: Any = None,
                 progress_every_s: float = PROGRESS_EVERY_S) -> None:
        self.settings = settings
        self.progress_every_s = progress_every_s
        self.state = state
        self.search = search
        self.extractor = extractor  # reuse the serving model when given, instead of loading a second copy
        self.task: asyncio.Task[None] | None = None
        self.last_report: Any = None
        self.last_error: str | None = None
        self._abort = False

    @property
    def running_here(self) -> bool:
        return self.task is not None and not self.task.done()

    async def start_reindex(self, progress: ProgressSink | None) -> Reply:
        catalog = await asyncio.to_thread(catalog_to_rebuild, self.settings)
        if catalog is None:
            return Reply(text=replies.NO_CATALOG, is_error=True)
        if self.running_here:
            return Reply(text=replies.REINDEX_RUNNING, is_error=True)
        token = await self.state.acquire_reindex_lock()
        if token is None:
            if self.state.healthy:
                return Reply(text=replies.REINDEX_RUNNING, is_error=True)
            log.warning("Redis is down: starting the reindex under the local guard only")
        self._abort = False
        self.task = asyncio.get_running_loop().create_task(self._run(catalog, token, progress), name="vsearch-reindex")
        return Reply(text=replies.reindex_started_text(catalog))

    async def wait(self) -> None:
        """Wait for the running reindex (if any) to end."""
        if self.task is not None:
            await asyncio.wait({self.task})

    async def close(self) -> None:
        """Abort a running build at its next progress step; the current index stays."""
        self._abort = True
        await self.wait()

    async def status_text(self) -> str:
        redis_ok = await self.state.ping()
        running = self.running_here or await self.state.reindex_running()
        reindex = None
        if running:
            reindex = await self.state.reindex_progress() or "running"
        return replies.status_text(self.search.index_version, self.search.product_count, redis_ok, reindex)

    async def _run(self, catalog: str, token: str | None, sink: ProgressSink | None) -> None:
        from indexer.build import build_index

        latest: list[Any] = [None]

        def on_progress(p: Any) -> None:  # called from the build thread
            if self._abort:
                raise ReindexAborted("the server is shutting down")
            latest[0] = p

        started = time.monotonic()
        build = asyncio.ensure_future(asyncio.to_thread(
            build_index, Path(catalog), self.settings.engine, extractor=self.extractor, progress=on_progress))
        shown = None
        try:
            while not build.done():
                await asyncio.wait({build}, timeout=self.progress_every_s)
                p = latest[0]
                if p is not None and p is not shown and not build.done():
                    shown = p
                    text = replies.progress_text(p.done, p.total, p.images_per_s)
                    await self._tell(sink, text)
                    await self.state.set_reindex_progress(text)
                if token is not None:
                    await self.state.refresh_reindex_lock(token, REINDEX_LOCK_TTL_S)
            report = build.result()
            self.last_report = report
            self.last_error = None
            await self.search.reload_if_changed()
            await self.state.publish_index_switch(report.version)
            log.info("reindex done: version %s, %d products, %d images, %d failures",
                     report.version, report.products, report.images_indexed, report.images_failed)
            await self._tell(sink, replies.reindex_done_text(
                report.version, report.products, report.images_indexed, report.images_failed,
                getattr(report, "seconds", time.monotonic() - started)))
        except Exception as exc:  # noqa: BLE001 - a failed build is reported; the current index keeps serving
            self.last_error = str(exc)
            log.error("reindex failed: %s: %s", type(exc).__name__, exc)
            await self._tell(sink, replies.reindex_failed_text(str(exc)))
        finally:
            await self.state.set_reindex_progress(None)
            if token is not None:
                await self.state.release_reindex_lock(token)

    @staticmethod
    async def _tell(sink: ProgressSink | None, text: str) -> None:
        if sink is None:
            return
        try:
            await sink.update(text)
        except Exception as exc:  # noqa: BLE001 - a lost progress message must not stop the build
            log.warning("progress update failed: %s", type(exc).__name__)


class IndexWatcher:
    """Switch this process to a new index within seconds: Redis pub/sub, plus a pointer check as fallback."""

    def __init__(self, state: State, search: SearchClient, every_s: float = POINTER_CHECK_EVERY_S) -> None:
        self.state = state
        self.search = search
        self.every_s = every_s
        self._tasks: list[asyncio.Task[None]] = []
        self._last_problem: str | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen(), name="vsearch-index-pubsub"),
            loop.create_task(self._poll(), name="vsearch-index-poll"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        self._tasks = []

    async def _reload(self, why: str) -> None:
        try:
            if await self.search.reload_if_changed():
                log.info("switched to index %s (%s)", self.search.index_version, why)
            self._last_problem = None
        except Exception as exc:  # noqa: BLE001 - keep serving the old version; say why once, not every 2 s
            if str(exc) != self._last_problem:
                log.warning("could not switch index (%s): %s", why, exc)
            self._last_problem = str(exc)

    async def _listen(self) -> None:
        async for _version in self.state.index_switches():
            await self._reload("pub/sub")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            await self._reload("pointer check")
