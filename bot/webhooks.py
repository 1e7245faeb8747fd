"""Pieces shared by the Viber and WhatsApp webhooks: signatures, capped bodies, JSON, retrying API calls, tasks."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from bot.config import BotSettings
from bot.replies import DownloadFailed
from engine.errors import ImageRejected
from engine.images import MAX_IMAGE_BYTES
from indexer.fetch import FetchError, FetchSettings, fetch_bytes, open_session

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1_000_000
_READ_CHUNK = 64 * 1024

MEDIA_TIMEOUT_S = 20.0
MEDIA_RETRIES = 2

WEBHOOK_TASKS: web.AppKey[set[asyncio.Task[None]]] = web.AppKey("webhook_tasks", set)
MEDIA_SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("media_session", aiohttp.ClientSession)


class PayloadError(ValueError):
    """A signed webhook body that is not shaped as the platform documents it (answered 400)."""


class ApiError(Exception):
    """A platform API call failed for good (after the retries allowed for its status)."""

    def __init__(self, what: str, status: int | None, detail: str) -> None:
        super().__init__(f"{what} failed ({'status ' + str(status) if status else 'no answer'}): {detail}")
        self.status = status
        self.detail = detail


# --- inbound ---------------------------------------------------------------------------------------


def hmac_sha256_hex(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def signature_ok(secret: str | None, body: bytes, received: str | None, prefix: str = "") -> bool:
    """Constant-time check of `received` == prefix + hex HMAC-SHA256(secret, body); False when anything is missing."""
    if not secret or not received:
        return False
    expected = (prefix + hmac_sha256_hex(secret, body)).encode("ascii")
    return hmac.compare_digest(expected, received.strip().lower().encode("utf-8", "replace"))


async def read_body(request: web.Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The raw body, or 413 as soon as it is known to exceed `limit` bytes (declared or actually sent)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=declared, text="Body too large.")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(_READ_CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size, text="Body too large.")
        chunks.append(chunk)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or 400 with a one-line reason (never a traceback)."""
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise web.HTTPBadRequest(text="Body is not UTF-8 JSON.") from None
    except RecursionError:
        raise web.HTTPBadRequest(text="JSON is nested too deeply.") from None
    except ValueError:
        raise web.HTTPBadRequest(text="Body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="Body must be a JSON object.")
    return data


def field(data: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """`data[key]` checked to be of `kind` (bool never counts as int), else PayloadError naming the field."""
    if not isinstance(data, dict):
        raise PayloadError(f"{where} must be an object")
    value = data.get(key)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if value is None or (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise PayloadError(f"{where}.{key} is missing or not a {names}")
    return value


def id_field(data: Any, key: str, where: str) -> str:
    """A non-empty string id of at most 256 characters."""
    value = field(data, key, str, where)
    if not value.strip() or len(value) > 256:
        raise PayloadError(f"{where}.{key} is empty or too long")
    return value


def optional_field(data: dict[str, Any], key: str, kind: type, where: str) -> Any:
    return None if data.get(key) is None else field(data, key, kind, where)


# --- background work -------------------------------------------------------------------------------


def install_shared(app: web.Application, settings: BotSettings) -> None:
    """Give `app` what both webhook channels share (idempotent): the WEBHOOK_TASKS set with a shutdown hook
    that waits for it, and MEDIA_SESSION, an SSRF-guarded client session for downloading users' media."""
    if WEBHOOK_TASKS in app:
        return
    app[WEBHOOK_TASKS] = set()
    app.on_shutdown.append(_drain_on_shutdown)
    allow_hosts = settings.media_allow_hosts

    async def media_session(app: web.Application) -> AsyncIterator[None]:
        app[MEDIA_SESSION] = open_session(media_fetch_settings("https://x", allow_hosts))
        yield
        await app[MEDIA_SESSION].close()

    app.cleanup_ctx.append(media_session)


def media_fetch_settings(url: str, allow_hosts: frozenset[str]) -> FetchSettings:
    """Limits for one user media download; plain http only for an allow-listed host (tests, private CDNs)."""
    host = (urlsplit(url).hostname or "").lower()
    return FetchSettings(timeout_s=MEDIA_TIMEOUT_S, max_bytes=MAX_IMAGE_BYTES, retries=MEDIA_RETRIES,
                         allow_http=host in allow_hosts, allow_hosts=allow_hosts)


async def fetch_media(app: web.Application, url: str, settings: BotSettings,
                      headers: dict[str, str] | None = None) -> bytes:
    """A user's photo from a platform media URL, through the SSRF guard; DownloadFailed (or ImageRejected
    when it is too large) on failure, with the reason in the message but never the headers."""
    try:
        return await fetch_bytes(app[MEDIA_SESSION], url, media_fetch_settings(url, settings.media_allow_hosts),
                                 headers=headers)
    except FetchError as exc:
        if exc.reason == "too_large":
            raise ImageRejected("too_large", exc.message, exc.hint) from None
        raise DownloadFailed(exc.message) from None


def spawn(app: web.Application, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """Run `work` after the webhook has been answered; the task stays in WEBHOOK_TASKS until it ends."""
    tasks = app[WEBHOOK_TASKS]
    task = asyncio.create_task(_logged(work, name), name=name)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task


async def drain(app: web.Application, timeout: float = 30.0) -> None:
    """Wait for the webhook work in flight (graceful stop); what is still running after `timeout` is cancelled."""
    tasks = set(app.get(WEBHOOK_TASKS, ()))
    if not tasks:
        return
    _done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    if pending:
        log.warning("cancelled %d webhook task(s) still running after %.0f s", len(pending), timeout)
        await asyncio.gather(*pending, return_exceptions=True)


async def _drain_on_shutdown(app: web.Application) -> None:
    await drain(app)


async def _logged(work: Awaitable[None], name: str) -> None:
    try:
        await work
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # one bad message must not take anything else down
        log.error("%s failed: %s: %s", name, type(exc).__name__, exc)


class ThrottledProgress:
    """A ProgressSink for chats that cannot edit a message: the first update is sent at once, later ones at
    most every `interval` seconds; the latest held-back text (e.g. the final summary) is sent when it ends."""

    def __init__(self, app: web.Application, send_text: Callable[[str], Awaitable[None]], interval: float = 15.0):
        self.app = app
        self.send_text = send_text
        self.interval = interval
        self.sent: list[str] = []
        self._last_at: float | None = None
        self._pending: str | None = None
        self._timer: asyncio.Task[None] | None = None

    async def update(self, text: str) -> None:
        now = time.monotonic()
        if self._last_at is None or (now - self._last_at >= self.interval and self._timer is None):
            await self._send(text)
            return
        self._pending = text
        if self._timer is None:
            delay = max(0.0, self._last_at + self.interval - now)
            self._timer = spawn(self.app, self._flush_after(delay), "progress flush")

    async def _flush_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._timer = None
        text, self._pending = self._pending, None
        if text is not None:
            await self._send(text)

    async def _send(self, text: str) -> None:
        self._last_at = time.monotonic()
        self.sent.append(text)
        await self.send_text(text)


# --- outbound --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # tries in all, the first included
    base_delay: float = 0.5
    max_delay: float = 8.0
    timeout: float = 20.0  # seconds per try

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Exponential backoff with jitter before try `attempt + 1`; a server's Retry-After wins (capped)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_delay)
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


def retryable(status: int) -> bool:
    return status == 429 or status >= 500


async def call_api(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    what: str,
    *,
    headers: dict[str, str],
    json_body: Any = None,
    form: Callable[[], aiohttp.FormData] | None = None,
    policy: RetryPolicy = RetryPolicy(),
) -> Any:
    """One platform API call returning its decoded JSON; 5xx, 429 and network errors are retried with backoff.

    Other 4xx answers are final. `form` builds a fresh multipart body per try (a FormData is single-use).
    `what` names the call in errors and logs; URLs and headers are never logged (they may carry secrets).
    """
    last: ApiError | None = None
    for attempt in range(1, policy.attempts + 1):
        retry_after: float | None = None
        try:
            async with session.request(
                method,
                url,
                headers=headers,
                json=json_body,
                data=form() if form is not None else None,
                timeout=aiohttp.ClientTimeout(total=policy.timeout),
            ) as resp:
                raw = await resp.read()
                if resp.status < 400:
                    return _decode(raw, what, resp.status)
                last = ApiError(what, resp.status, raw[:200].decode("utf-8", "replace"))
                if not retryable(resp.status):
                    raise last
                retry_after = _retry_after(resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            last = ApiError(what, None, type(exc).__name__)
        if attempt < policy.attempts:
            wait = policy.delay(attempt, retry_after)
            log.warning("%s: %s; retry %d/%d in %.1f s", what, last, attempt, policy.attempts - 1, wait)
            await asyncio.sleep(wait)
    assert last is not None
    raise last


def _decode(raw: bytes, what: str, status: int) -> Any:
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        raise ApiError(what, status, "the answer is not JSON") from None


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
