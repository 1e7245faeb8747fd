"""The aiohttp app: web page, /api/search, /healthz, /metrics, product images, and the webhook routes of the adapters."""

from __future__ import annotations

import ipaddress
import logging
import math
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bot.config import BotSettings
from bot.core import ChatCore
from bot.metrics import Metrics
from bot.replies import image_path_url
from bot.search_client import SearchClient
from bot.state import RATE_CAPACITY, RATE_PER_MINUTE, State
from engine.errors import ImageRejected, IndexNotReady, ReindexRequired
from engine.images import MAX_IMAGE_BYTES

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = MAX_IMAGE_BYTES
_MULTIPART_OVERHEAD = 64 * 1024
_CHUNK = 64 * 1024
API_CHANNEL = "web"  # the HTTP API's name in metrics, /stats and its rate-limit buckets

CORE: web.AppKey[ChatCore] = web.AppKey("core", ChatCore)
SEARCH: web.AppKey[Any] = web.AppKey("search", object)
STATE: web.AppKey[State] = web.AppKey("state", State)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
SETTINGS: web.AppKey[BotSettings] = web.AppKey("settings", BotSettings)
HTTP_SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("http_session", aiohttp.ClientSession)
API_RATE: web.AppKey[tuple[int, float]] = web.AppKey("api_rate", tuple)


def make_app(
    settings: BotSettings,
    core: ChatCore,
    search: SearchClient,
    state: State,
    *,
    http_session: aiohttp.ClientSession | None = None,
    channels: bool = True,
    api_rate: tuple[int, float] = (RATE_CAPACITY, RATE_PER_MINUTE),
) -> web.Application:
    """The one HTTP app; with `channels`, the Viber/WhatsApp routes are added when their variables are set.

    `api_rate` is (capacity, searches per minute) of the token bucket each client address gets at /api/search.
    """
    app = web.Application(client_max_size=MAX_UPLOAD_BYTES + _MULTIPART_OVERHEAD)
    app[CORE] = core
    app[SEARCH] = search
    app[STATE] = state
    app[METRICS] = core.metrics
    app[SETTINGS] = settings
    app[API_RATE] = api_rate
    app.router.add_get("/", index_page)
    app.router.add_static("/static/", STATIC_DIR, show_index=False, follow_symlinks=False)
    app.router.add_post("/api/search", api_search)
    app.router.add_get("/images/{product_id}/{n}", product_image)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)

    if channels and (settings.viber_enabled or settings.whatsapp_enabled):
        session = http_session
        if session is None:
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

            async def close_session(app: web.Application) -> None:
                await session.close()

            app.on_cleanup.append(close_session)
        app[HTTP_SESSION] = session
        if settings.viber_enabled:
            from bot import viber

            viber.register_routes(app, settings, core, session)
        if settings.whatsapp_enabled:
            from bot import whatsapp

            whatsapp.register_routes(app, settings, core, session)
    return app


async def index_page(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def _error(status: int, code: str, message: str, hint: str = "") -> web.Response:
    return web.json_response({"error": code, "message": message, "hint": hint}, status=status)


async def _read_capped(stream: Any, limit: int) -> bytes | None:
    """Read a body part up to `limit` bytes; None when it is longer."""
    chunks, size = [], 0
    while True:
        chunk = await (stream.read_chunk(_CHUNK) if hasattr(stream, "read_chunk") else stream.read(_CHUNK))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)


async def _upload_bytes(request: web.Request) -> bytes | web.Response:
    too_large = _error(413, "too_large", f"The image is over the {MAX_UPLOAD_BYTES // (1024 * 1024)} MB limit.",
                       "Send a smaller photo.")
    if request.content_length is not None and request.content_length > MAX_UPLOAD_BYTES + _MULTIPART_OVERHEAD:
        return too_large
    if request.content_type.startswith("multipart/"):
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if isinstance(part, aiohttp.BodyPartReader) and part.name == "image":
                    data = await _read_capped(part, MAX_UPLOAD_BYTES)
                    return too_large if data is None else data
        except (ValueError, AssertionError, aiohttp.ClientPayloadError) as exc:
            return _error(400, "bad_request", f"The multipart body could not be read ({type(exc).__name__}).",
                          "Send the photo in a form field named 'image'.")
        return _error(400, "no_image", "No form field named 'image' was sent.",
                      "Send the photo as multipart field 'image', or as the raw request body.")
    data = await _read_capped(request.content, MAX_UPLOAD_BYTES)
    return too_large if data is None else data


def client_address(request: web.Request) -> str:
    """The client's address: the connection's peer, or, when the peer is a trusted reverse proxy
    (VSEARCH_TRUSTED_PROXIES), the last X-Forwarded-For address that is not itself a trusted proxy."""
    trusted = request.app[SETTINGS].trusted_proxies
    peer = request.remote or "unknown"

    def is_trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in trusted)

    if not trusted or not is_trusted(peer):
        return peer
    hops = [h.strip() for value in request.headers.getall("X-Forwarded-For", []) for h in value.split(",")]
    for hop in reversed([h for h in hops if h]):
        if not is_trusted(hop):
            return hop
    return peer


async def _rate_limited(request: web.Request) -> web.Response | None:
    """The chat channels' token bucket (State.rate_limit_wait), per client address; None when allowed."""
    capacity, per_minute = request.app[API_RATE]
    wait = await request.app[STATE].rate_limit_wait(API_CHANNEL, client_address(request), capacity, per_minute)
    if wait <= 0:
        return None
    core = request.app[CORE]
    core.metrics.count_query(API_CHANNEL, "rate_limited")
    await core.state.count_query(API_CHANNEL, "rate_limited")
    retry_after = max(1, math.ceil(wait))
    response = _error(429, "rate_limited",
                      f"Too many searches from your address: at most {per_minute:g} a minute.",
                      f"Try again in {retry_after} s.")
    response.headers["Retry-After"] = str(retry_after)
    return response


async def api_search(request: web.Request) -> web.Response:
    limited = await _rate_limited(request)
    if limited is not None:
        return limited
    core = request.app[CORE]
    top_k = core.top_k
    raw_k = request.query.get("top_k")
    if raw_k is not None:
        if not raw_k.isdigit() or not 1 <= int(raw_k) <= 50:
            return _error(400, "bad_top_k", "top_k must be a whole number from 1 to 50.")
        top_k = int(raw_k)
    try:
        data = await _upload_bytes(request)
    except web.HTTPRequestEntityTooLarge:
        return _error(413, "too_large", f"The image is over the {MAX_UPLOAD_BYTES // (1024 * 1024)} MB limit.",
                      "Send a smaller photo.")
    if isinstance(data, web.Response):
        return data
    try:
        result = await core.search_for_api(data, top_k)
    except ImageRejected as exc:
        status = 413 if exc.reason == "too_large" else 400
        return _error(status, exc.reason, exc.message, exc.hint)
    except (IndexNotReady, ReindexRequired) as exc:
        return _error(503, "index_not_ready", exc.message, exc.hint)
    except Exception as exc:  # noqa: BLE001 - logged by the core; the client gets no internals
        log.error("api search failed: %s", type(exc).__name__)
        return _error(500, "search_failed", "The search failed.", "Try again in a moment.")
    body = result.to_dict()
    search = request.app[SEARCH]
    for item, match in zip(body["results"], result.matches, strict=True):
        item["image_url"] = _image_url(search, match)
    return web.json_response(body)


def _image_url(search: Any, match: Any) -> str | None:
    product = match.product
    if search.local_image_path(product) is not None:
        return image_path_url(product.id)
    for candidate in (match.image, product.image):
        if isinstance(candidate, str) and candidate.startswith(("https://", "http://")):
            return candidate
    return None


async def product_image(request: web.Request) -> web.StreamResponse:
    """A catalog product's local image, looked up by product id: never a path from the request."""
    search = request.app[SEARCH]
    if request.match_info["n"] != "0":
        raise web.HTTPNotFound(text="No such image.")
    product = search.product(request.match_info["product_id"])
    path = search.local_image_path(product) if product is not None else None
    if path is None:
        raise web.HTTPNotFound(text="No such image.")
    return web.FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})


async def healthz(request: web.Request) -> web.Response:
    search = request.app[SEARCH]
    redis_ok = await request.app[STATE].ping()
    version = search.index_version
    status = "ok" if redis_ok and version is not None else "degraded"
    return web.json_response({
        "status": status,
        "index_version": version,
        "products": search.product_count,
        "redis": redis_ok,
    })


async def metrics(request: web.Request) -> web.Response:
    search = request.app[SEARCH]
    state = request.app[STATE]
    body = request.app[METRICS].render(search.product_count, search.index_version, state.healthy)
    return web.Response(body=body.encode("utf-8"), headers={
        "Content-Type": "text/plain; version=0.0.4; charset=utf-8", "X-Content-Type-Options": "nosniff"})
