"""Fetches image bytes from local paths and http(s) URLs with bounded concurrency, retries and size caps."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import random
import stat
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp

from engine.errors import VsearchError
from indexer.netguard import FetchRefused, check_url, guarded_connector, is_guarded, resolve_and_check

FETCH_REASONS = (
    "timeout",
    "connection",
    "http_status",
    "not_found",
    "too_large",
    "empty",
    "bad_content_type",
    "refused",
    "too_many_redirects",
    "read_error",
)
MAX_REDIRECTS = 5
MAX_RETRY_DELAY_S = 30.0
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
# A missing Content-Type and generic binary types are accepted: the image decoder checks the bytes anyway.
BINARY_TYPES = ("application/octet-stream", "binary/octet-stream")
CREDENTIAL_HEADERS = ("authorization", "cookie", "proxy-authorization")
USER_AGENT = "vsearch/0.1 (catalog image fetcher)"


@dataclass(frozen=True)
class FetchSettings:
    """Limits for fetching; `allow_hosts` holds trusted private hosts (names, IPs or CIDRs)."""

    concurrency: int = 8
    timeout_s: float = 20
    max_bytes: int = 20 * 1024 * 1024
    retries: int = 3
    backoff_s: float = 0.5
    allow_http: bool = False
    allow_hosts: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.timeout_s <= 0 or self.max_bytes < 1 or self.retries < 0 or self.backoff_s < 0:
            raise ValueError("timeout_s and max_bytes must be positive, retries and backoff_s not negative")


class FetchError(VsearchError):
    """An image that could not be fetched; `reason` is one of FETCH_REASONS, `status` the HTTP status."""

    def __init__(
        self, reason: str, message: str, hint: str = "", *, status: int | None = None, attempts: int = 1
    ) -> None:
        if reason not in FETCH_REASONS:
            raise ValueError(f"unknown FetchError reason {reason!r}")
        super().__init__(message, hint)
        self.reason = reason
        self.status = status
        self.attempts = attempts


class _Retry(Exception):
    """A failure worth another attempt (timeout, connection error, 5xx, 429)."""

    def __init__(self, error: FetchError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def is_url(source: str) -> bool:
    """True for sources fetched over the network (anything with a `scheme://`), False for local paths."""
    scheme, sep, _ = source.partition("://")
    return bool(sep) and scheme.isascii() and scheme.isalpha() and len(scheme) > 1


def open_session(settings: FetchSettings) -> aiohttp.ClientSession:
    """A client session whose connections pass the SSRF guard; use it with `fetch_bytes`."""
    return aiohttp.ClientSession(
        connector=guarded_connector(settings.allow_hosts, limit=settings.concurrency),
        headers={"User-Agent": USER_AGENT},
        timeout=aiohttp.ClientTimeout(total=settings.timeout_s),
        trust_env=False,
    )


async def fetch_bytes(
    session: aiohttp.ClientSession,
    url: str,
    settings: FetchSettings,
    *,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """Download one URL with retries; raises FetchError.

    Each attempt (all redirect hops and the body) must finish within `timeout_s`. Timeouts, connection
    errors, 5xx and 429 are retried up to `retries` times with exponential backoff and jitter (a
    Retry-After in seconds is honoured, up to 30 s); 404/410 give `not_found`, other non-2xx `http_status`,
    neither retried. Content-Type must be image/*, application/octet-stream, binary/octet-stream or
    absent (the image decoder checks the bytes anyway); anything else, e.g. text/html, gives
    `bad_content_type`. Bodies over `max_bytes` (by Content-Length or while streaming) give `too_large`.

    Every redirect hop is checked by the SSRF guard before connecting (at most 5 hops). Credential
    headers are dropped when a redirect leaves the original origin. Use a session from `open_session`;
    with any other session host names are resolved and checked before each request instead (weaker:
    the name could resolve differently when connecting).
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return await _fetch_once(session, url, settings, headers or {})
        except _Retry as retry:
            if attempt > settings.retries:
                err = retry.error
                tries = f" (after {attempt} attempts)" if attempt > 1 else ""
                raise FetchError(
                    err.reason, f"{err.message}{tries}", err.hint, status=err.status, attempts=attempt
                ) from None
            delay = settings.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            if retry.retry_after is not None:
                delay = max(delay, retry.retry_after)
            await asyncio.sleep(min(delay, MAX_RETRY_DELAY_S))


async def fetch_source(session: aiohttp.ClientSession, source: str, settings: FetchSettings) -> bytes:
    """Bytes of a catalog image source: an http(s) URL or a local file path; raises FetchError."""
    if is_url(source):
        return await fetch_bytes(session, source, settings)
    return await asyncio.to_thread(read_local, source, settings.max_bytes)


def read_local(path: str, max_bytes: int) -> bytes:
    """Read a local image file of at most `max_bytes`; raises FetchError."""
    hint = "Check the image paths in the catalog (relative paths start at the catalog's folder)."
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise FetchError("read_error", f"image {path} is not a regular file", hint)
        if info.st_size > max_bytes:
            raise FetchError("too_large", _too_large(path, max_bytes), "Use a smaller image.")
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise FetchError("not_found", f"image file {path} does not exist", hint) from None
    except OSError as exc:
        raise FetchError("read_error", f"image file {path} cannot be read: {exc.strerror or exc}", hint) from None
    if len(data) > max_bytes:
        raise FetchError("too_large", _too_large(path, max_bytes), "Use a smaller image.")
    if not data:
        raise FetchError("empty", f"image file {path} is empty", hint)
    return data


async def fetch_all(
    sources: Sequence[str],
    settings: FetchSettings,
    on_done: Callable[[int, bytes | FetchError], None] | None = None,
) -> list[bytes | FetchError]:
    """Fetch every source (URL or local path); result i belongs to sources[i].

    At most `settings.concurrency` sources are in flight. `on_done(i, result)` is called as each one
    finishes, in completion order. All bytes are kept in memory: for large catalogs use `iter_fetched`.
    """
    results: list[bytes | FetchError | None] = [None] * len(sources)

    async def deliver(index: int, result: bytes | FetchError) -> None:
        results[index] = result
        if on_done is not None:
            on_done(index, result)

    await _fetch_many(sources, settings, deliver)
    return results  # type: ignore[return-value]  # every slot is filled


def fetch_all_sync(
    sources: Sequence[str],
    settings: FetchSettings,
    on_done: Callable[[int, bytes | FetchError], None] | None = None,
) -> list[bytes | FetchError]:
    """`fetch_all` for synchronous callers (runs its own event loop; not from inside a running loop)."""
    return asyncio.run(fetch_all(sources, settings, on_done))


def iter_fetched(
    sources: Sequence[str], settings: FetchSettings, *, buffer: int | None = None
) -> Iterator[tuple[int, bytes | FetchError]]:
    """Yield `(index, bytes | FetchError)` as downloads complete, in any order.

    A background thread runs the event loop; at most `buffer` (default 2 x concurrency) finished results
    wait in the queue, so memory stays bounded while the caller decodes and embeds. Stopping the
    iteration early (break, exception) cancels the remaining downloads.
    """
    items = list(sources)
    if not items:
        return
    results: queue.Queue[object] = queue.Queue(maxsize=buffer or 2 * settings.concurrency)
    stop = threading.Event()
    running: dict[str, object] = {}

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    async def main() -> None:
        loop = asyncio.get_running_loop()
        running["loop"], running["task"] = loop, asyncio.current_task()
        with ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="vsearch-put") as pool:

            async def deliver(index: int, result: bytes | FetchError) -> None:
                if not await loop.run_in_executor(pool, put, (index, result)):
                    raise _Stopped

            with contextlib.suppress(_Stopped):
                await _fetch_many(items, settings, deliver)

    def run() -> None:
        try:
            asyncio.run(main())
        except asyncio.CancelledError:
            return
        except BaseException as exc:  # re-raised in the consuming thread
            put(_Failure(exc))

    thread = threading.Thread(target=run, name="vsearch-fetch", daemon=True)
    thread.start()
    try:
        for _ in range(len(items)):
            item = results.get()
            if isinstance(item, _Failure):
                raise item.exc
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        loop, task = running.get("loop"), running.get("task")
        if isinstance(loop, asyncio.AbstractEventLoop) and isinstance(task, asyncio.Task):
            with contextlib.suppress(RuntimeError):  # the loop already finished
                loop.call_soon_threadsafe(task.cancel)
        thread.join(timeout=10)


# --- internals ---------------------------------------------------------------------------------------


class _Stopped(Exception):
    pass


@dataclass
class _Failure:
    exc: BaseException


async def _fetch_many(
    sources: Sequence[str],
    settings: FetchSettings,
    deliver: Callable[[int, bytes | FetchError], Awaitable[None]],
) -> None:
    pending = iter(enumerate(sources))

    async def worker(session: aiohttp.ClientSession) -> None:
        for index, source in pending:  # the iterator is shared: each source is taken once
            try:
                result: bytes | FetchError = await fetch_source(session, source, settings)
            except FetchError as err:
                result = err
            await deliver(index, result)

    async with open_session(settings) as session:
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(settings.concurrency, len(sources))):
                    group.create_task(worker(session))
        except BaseExceptionGroup as errors:
            raise errors.exceptions[0] from None


async def _fetch_once(
    session: aiohttp.ClientSession, url: str, settings: FetchSettings, headers: Mapping[str, str]
) -> bytes:
    current, hdrs = url, dict(headers)
    try:
        async with asyncio.timeout(settings.timeout_s):
            for _ in range(MAX_REDIRECTS + 1):
                check_url(current, allow_http=settings.allow_http, allow_hosts=settings.allow_hosts)
                if not is_guarded(session.connector):
                    await resolve_and_check(
                        current, allow_http=settings.allow_http, allow_hosts=settings.allow_hosts
                    )
                async with session.get(current, headers=hdrs, allow_redirects=False) as resp:
                    location = resp.headers.get("Location")
                    if resp.status in REDIRECT_STATUSES and location:
                        target = urljoin(current, location)
                        if _origin(target) != _origin(current):
                            hdrs = {k: v for k, v in hdrs.items() if k.lower() not in CREDENTIAL_HEADERS}
                        current = target
                        continue
                    return await _read_response(resp, url, settings)
    except TimeoutError:
        raise _Retry(
            FetchError("timeout", f"{_short(url)} did not answer within {settings.timeout_s:g} s",
                       "Check that the image host is up, or raise the timeout.")
        ) from None
    except FetchRefused as exc:
        raise FetchError("refused", exc.message, exc.hint) from None
    except aiohttp.InvalidURL:
        raise FetchError("refused", f"{_short(url)} is not a valid URL", "Check the URL.") from None
    except aiohttp.ClientConnectorError as exc:
        refused = _refusal_inside(exc)
        if refused is not None:
            raise FetchError("refused", refused.message, refused.hint) from None
        raise _Retry(_connection_error(url, exc)) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise _Retry(_connection_error(url, exc)) from None
    raise FetchError(
        "too_many_redirects", f"{_short(url)} redirected more than {MAX_REDIRECTS} times", "Check the URL."
    )


async def _read_response(resp: aiohttp.ClientResponse, url: str, settings: FetchSettings) -> bytes:
    status = resp.status
    if status in (404, 410):
        raise FetchError("not_found", f"{_short(url)} was not found (HTTP {status})",
                         "Check the image URL in the catalog.", status=status)
    if status == 429 or status >= 500:
        raise _Retry(
            FetchError("http_status", f"{_short(url)} answered HTTP {status}",
                       "The image host is failing or rate limiting; try again later.", status=status),
            retry_after=_retry_after(resp.headers.get("Retry-After")),
        )
    if not 200 <= status < 300:
        raise FetchError("http_status", f"{_short(url)} answered HTTP {status}",
                         "Check the image URL in the catalog.", status=status)
    content_type = resp.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if content_type and not content_type.startswith("image/") and content_type not in BINARY_TYPES:
        raise FetchError("bad_content_type", f"{_short(url)} is {content_type}, not an image",
                         "Point the catalog at the image file itself, not at a web page.")
    if resp.content_length is not None and resp.content_length > settings.max_bytes:
        raise FetchError("too_large", _too_large(url, settings.max_bytes), "Use a smaller image.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > settings.max_bytes:
            raise FetchError("too_large", _too_large(url, settings.max_bytes), "Use a smaller image.")
        chunks.append(chunk)
    if size == 0:
        raise FetchError("empty", f"{_short(url)} returned no bytes", "Check the image URL in the catalog.")
    return b"".join(chunks)


def _refusal_inside(exc: BaseException) -> FetchRefused | None:
    """aiohttp may wrap the resolver's FetchRefused; find it in the cause chain."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, FetchRefused):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _connection_error(url: str, exc: BaseException) -> FetchError:
    detail = str(exc) or type(exc).__name__
    return FetchError("connection", f"cannot download {_short(url)}: {detail}",
                      "Check that the image host is reachable.")


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return min(float(value.strip()), MAX_RETRY_DELAY_S)
    return None


def _origin(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    return parts.scheme.lower(), parts.hostname, port


def _too_large(source: str, max_bytes: int) -> str:
    return f"{_short(source)} is larger than {max_bytes / 2**20:.1f} MiB"


def _short(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
