"""ChatCore: what every channel shares: dedupe, rate limit, search, paging, admin commands, friendly errors."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from bot import replies
from bot.config import BotSettings
from bot.metrics import Metrics
from bot.replies import DownloadFailed, Reply
from bot.search_client import SearchClient
from bot.state import State
from engine.errors import ImageRejected, IndexNotReady, ReindexRequired
from engine.types import Match, SearchResult

if TYPE_CHECKING:
    from bot.admin import Admin

log = logging.getLogger(__name__)

ADMIN_COMMANDS = ("reindex", "status", "stats")
MAX_RESULTS = 50  # the stored result list "Show more" pages through


class ProgressSink(Protocol):
    async def update(self, text: str) -> None: ...


def parse_command(text: str) -> str | None:
    """"/Reindex@shop_bot now" -> "reindex"; plain words count too (Viber/WhatsApp have no commands)."""
    words = text.strip().split()
    if not words:
        return None
    word = words[0].lower().lstrip("/").split("@", 1)[0]
    return word if word in ("start", "help", *ADMIN_COMMANDS) else None


class ChatCore:
    def __init__(
        self,
        settings: BotSettings,
        state: State,
        search: SearchClient,
        admin: Admin,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.state = state
        self.search = search
        self.admin = admin
        self.metrics = metrics or Metrics()

    @property
    def top_k(self) -> int:
        return self.settings.engine.top_k

    def is_admin(self, channel: str, user_id: str) -> bool:
        return f"{channel}:{user_id}" in self.settings.admin_ids

    async def on_photo(
        self, channel: str, user_id: str, message_id: str, get_bytes: Callable[[], Awaitable[bytes]]
    ) -> Reply | None:
        """None means a duplicate delivery: send nothing."""
        if not await self.state.first_delivery(channel, message_id):
            await self._count(channel, "duplicate")
            return None
        if not await self.state.allow_photo(channel, user_id):
            await self._count(channel, "rate_limited")
            return Reply(text=replies.RATE_LIMITED, is_error=True)
        started = time.perf_counter()
        try:
            data = await get_bytes()
        except ImageRejected as exc:
            await self._count(channel, "bad_image")
            return Reply(text=replies.friendly_error(exc), is_error=True)
        except Exception as exc:  # noqa: BLE001 - any download failure becomes one polite sentence
            log.warning("%s photo download failed: %s", channel, type(exc).__name__)
            await self._count(channel, "download_failed")
            return Reply(text=replies.friendly_error(DownloadFailed(str(exc))), is_error=True)
        try:
            result = await self.search.search(data, self.list_size)
        except Exception as exc:  # noqa: BLE001
            return await self._search_error(channel, exc)
        self.metrics.observe_latency(channel, time.perf_counter() - started)
        await self._count(channel, "ok" if result.matches else "no_results")
        return await self._first_page(channel, user_id, result)

    async def on_text(
        self, channel: str, user_id: str, message_id: str, text: str, progress: ProgressSink | None = None
    ) -> Reply | None:
        if not await self.state.first_delivery(channel, message_id):
            return None
        command = parse_command(text or "")
        if command in ("start", "help"):
            return Reply(text=replies.HELP_TEXT)
        if command is None:
            return Reply(text=replies.photo_hint())
        if not self.is_admin(channel, user_id):
            log.info("refused /%s from a non-admin %s user", command, channel)
            return Reply(text=replies.NOT_ADMIN, is_error=True)
        if command == "reindex":
            return await self.admin.start_reindex(progress)
        if command == "status":
            return Reply(text=await self.admin.status_text())
        return Reply(text=replies.stats_text(await self.state.counters()))

    async def on_more(self, channel: str, user_id: str, page_token: str, offset: int) -> Reply:
        entries = await self.state.load_page(channel, user_id, page_token)
        if entries is None:
            return Reply(text=replies.PAGE_EXPIRED, is_error=True)
        if offset >= len(entries):
            return Reply(text=replies.NO_MORE)
        return self._page(entries, page_token, offset, replies.results_text(offset + 1, min(self.top_k, len(entries) - offset)))

    async def on_similar(self, channel: str, user_id: str, page_token: str, rank: int) -> Reply:
        entries = await self.state.load_page(channel, user_id, page_token)
        if entries is None or not 1 <= rank <= len(entries):
            return Reply(text=replies.PAGE_EXPIRED, is_error=True)
        product_id = entries[rank - 1]["id"]
        try:
            result = await self.search.similar(product_id, self.list_size + 1)
        except KeyError:
            return Reply(text=replies.UNKNOWN_PRODUCT, is_error=True)
        except Exception as exc:  # noqa: BLE001
            return await self._search_error(channel, exc)
        await self._count(channel, "similar")
        matches = [m for m in result.matches if m.product.id != product_id][: self.list_size]
        result = SearchResult(matches=matches, took_ms=result.took_ms, index_version=result.index_version)
        return await self._first_page(channel, user_id, result, similar_to=rank)

    async def search_for_api(self, image_bytes: bytes, top_k: int, channel: str = "web") -> SearchResult:
        """The HTTP API's search: counted and timed like chat searches; engine errors are raised to the caller."""
        started = time.perf_counter()
        try:
            result = await self.search.search(image_bytes, top_k)
        except Exception as exc:
            await self._search_error(channel, exc)
            raise
        self.metrics.observe_latency(channel, time.perf_counter() - started)
        await self._count(channel, "ok" if result.matches else "no_results")
        return result

    # -- helpers --
    @property
    def list_size(self) -> int:
        return min(MAX_RESULTS, self.top_k * 5)

    async def _first_page(self, channel: str, user_id: str, result: SearchResult, similar_to: int | None = None) -> Reply:
        entries = [{"id": m.product.id, "score": round(m.score, 4), "image": m.image} for m in result.matches]
        token = await self.state.save_page(channel, user_id, entries) if entries else None
        cards = [self._card(i + 1, m) for i, m in enumerate(result.matches[: self.top_k])]
        next_offset = self.top_k if token and len(entries) > self.top_k else None
        text = replies.results_text(1, len(cards), similar_to)
        return Reply(text=text, cards=tuple(cards), page_token=token, next_offset=next_offset)

    def _card(self, rank: int, match: Match) -> replies.ProductCard:
        """Every channel's card: a local image gets a public URL when VSEARCH_PUBLIC_URL is set."""
        return replies.make_card(rank, match, self.search.local_image_path(match.product), self.settings.public_url)

    def _page(self, entries: list[dict[str, Any]], token: str, offset: int, text: str) -> Reply:
        cards = []
        for rank, entry in enumerate(entries[offset : offset + self.top_k], start=offset + 1):
            product = self.search.product(entry["id"])
            if product is None:  # gone from the catalog since the search (a reindex ran)
                continue
            match = Match(product=product, score=float(entry.get("score", 0.0)), image=entry.get("image") or product.image)
            cards.append(self._card(rank, match))
        if not cards:
            return Reply(text=replies.PAGE_EXPIRED, is_error=True)
        nxt = offset + self.top_k
        return Reply(text=text, cards=tuple(cards), page_token=token, next_offset=nxt if nxt < len(entries) else None)

    async def _search_error(self, channel: str, exc: BaseException) -> Reply:
        if isinstance(exc, ImageRejected):
            outcome = "bad_image"
        elif isinstance(exc, IndexNotReady | ReindexRequired):
            outcome = "index_not_ready"
        else:
            outcome = "error"
            self.metrics.count_error(type(exc).__name__)
            log.error("search failed on %s: %s: %s", channel, type(exc).__name__, exc)
        await self._count(channel, outcome)
        return Reply(text=replies.friendly_error(exc), is_error=True)

    async def _count(self, channel: str, outcome: str) -> None:
        self.metrics.count_query(channel, outcome)
        await self.state.count_query(channel, outcome)
