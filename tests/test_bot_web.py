"""The HTTP app on 127.0.0.1: /api/search (multipart and raw), errors, images, /healthz, /metrics, no secrets."""

from __future__ import annotations

import dataclasses
import logging

import aiohttp
import image_factories as f
from aiohttp.test_utils import TestClient, TestServer
from bot_fixtures import make_bot_settings, open_stack

from bot.serve import install_log_redaction
from bot.state import RATE_CAPACITY
from bot.web import MAX_UPLOAD_BYTES, make_app

pytest_plugins = ["bot_fixtures"]

SECRETS = {
    "telegram_bot_token": "777000:SECRETtelegramTOKEN",
    "telegram_webhook_secret": "SECRETwebhookTOKEN",
    "viber_auth_token": "SECRETviberTOKEN",
    "whatsapp_access_token": "SECRETwaACCESS",
    "whatsapp_app_secret": "SECRETwaAPP",
    "whatsapp_verify_token": "SECRETwaVERIFY",
    "whatsapp_phone_number_id": "123456",
}


def form(data: bytes, name: str = "image") -> aiohttp.FormData:
    body = aiohttp.FormData()
    body.add_field(name, data, filename="shoe.jpg", content_type="image/jpeg")
    return body


async def test_search_multipart(bot_app):
    engine = bot_app.stack.engine
    resp = await bot_app.post("/api/search", data=form(engine.image_bytes("demo-008")))
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"results", "took_ms", "index_version"}
    assert body["index_version"] == engine.version and body["took_ms"] >= 0
    assert len(body["results"]) == 3 and body["results"][0]["id"] == "demo-008"
    first = body["results"][0]
    assert first["url"] == "https://demo-shop.example/products/demo-008" and first["title"] and first["price"]
    assert first["image_url"] == "/images/demo-008/0"
    image = await bot_app.get(first["image_url"])
    assert image.status == 200 and await image.read() == engine.image_bytes("demo-008")


async def test_search_raw_body_and_top_k(bot_app):
    data = bot_app.stack.engine.image_bytes("demo-009")
    resp = await bot_app.post("/api/search?top_k=6", data=data, headers={"Content-Type": "image/jpeg"})
    assert resp.status == 200
    body = await resp.json()
    assert len(body["results"]) == 6 and body["results"][0]["id"] == "demo-009"
    bad_k = await bot_app.post("/api/search?top_k=0", data=data)
    assert bad_k.status == 400 and (await bad_k.json())["error"] == "bad_top_k"


async def test_bad_images_are_400_with_a_json_reason(bot_app):
    for payload, reason in [(b"hello, not an image", "not_an_image"), (b"", "empty"),
                            (f.make_jpeg(200, 200)[:300], "truncated")]:
        resp = await bot_app.post("/api/search", data=payload, headers={"Content-Type": "application/octet-stream"})
        assert resp.status == 400, reason
        body = await resp.json()
        assert body["error"] == reason and body["message"] and "Traceback" not in body["message"]
    missing = await bot_app.post("/api/search", data=form(f.make_jpeg(), name="photo"))
    assert missing.status == 400 and (await missing.json())["error"] == "no_image"


async def test_oversized_upload_is_413(bot_app):
    big = b"\xff\xd8\xff" + b"\0" * (MAX_UPLOAD_BYTES + 10)
    raw = await bot_app.post("/api/search", data=big, headers={"Content-Type": "image/jpeg"})
    assert raw.status == 413 and (await raw.json())["error"] == "too_large"
    multi = await bot_app.post("/api/search", data=form(big))
    assert multi.status == 413


async def test_api_search_is_rate_limited_per_client_address(bot_app):
    # RATE_CAPACITY searches (cheap bad images: each is a search all the same) empty this address's bucket.
    for _ in range(RATE_CAPACITY):
        resp = await bot_app.post("/api/search", data=b"not an image")
        assert resp.status == 400
    limited = await bot_app.post("/api/search", data=form(bot_app.stack.engine.image_bytes("demo-007")))
    assert limited.status == 429
    body = await limited.json()
    assert set(body) == {"error", "message", "hint"} and body["error"] == "rate_limited"
    retry_after = int(limited.headers["Retry-After"])
    assert 1 <= retry_after <= 60 // RATE_CAPACITY and f"{retry_after} s" in body["hint"]
    # Another client address (a connection from 127.0.0.2) has its own bucket and gets answers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as other:
        resp = await other.post(bot_app.make_url("/api/search"), data=form(bot_app.stack.engine.image_bytes("demo-007")))
        assert resp.status == 200 and (await resp.json())["results"][0]["id"] == "demo-007"
    assert await bot_app.stack.state.client.exists("vsearch:rate:web:127.0.0.2")
    assert 'vsearch_queries_total{channel="web",outcome="rate_limited"} 1' in await (await bot_app.get("/metrics")).text()


async def test_image_route_serves_only_catalog_images(bot_app):
    for path in ["/images/demo-001/1", "/images/no-such/0", "/images/..%2F..%2Fetc%2Fpasswd/0",
                 "/images/../../etc/passwd", "/static/../config.py"]:
        resp = await bot_app.get(path)
        assert resp.status == 404, path


async def test_page_healthz_and_metrics(bot_app):
    page = await bot_app.get("/")
    assert page.status == 200 and "Find shoes by photo" in await page.text()
    assert (await bot_app.get("/static/app.js")).status == 200
    await bot_app.post("/api/search", data=form(bot_app.stack.engine.image_bytes("demo-010")))
    await bot_app.post("/api/search", data=b"nope")
    health = await (await bot_app.get("/healthz")).json()
    assert health == {"status": "ok", "index_version": bot_app.stack.engine.version, "products": 16, "redis": True}
    resp = await bot_app.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await resp.text()
    assert 'vsearch_queries_total{channel="web",outcome="ok"} 1' in text
    assert 'vsearch_queries_total{channel="web",outcome="bad_image"} 1' in text
    assert 'vsearch_search_latency_seconds_count{channel="web"} 1' in text
    assert 'vsearch_search_latency_seconds_bucket{channel="web",le="+Inf"} 1' in text
    assert "vsearch_index_products 16" in text and "vsearch_redis_up 1" in text


async def test_no_index_yet_is_503_and_degraded(tmp_path, extractor, redis_state, bot_engine):
    from engine.search import Searcher

    settings = dataclasses.replace(bot_engine.settings, data_dir=tmp_path / "empty")
    searcher = Searcher(settings, extractor)
    stack = await open_stack(make_bot_settings(settings), redis_state, bot_engine, searcher=searcher)
    client = TestClient(TestServer(make_app(stack.settings, stack.core, stack.search, stack.state, channels=False),
                                   host="127.0.0.1"))
    await client.start_server()
    try:
        resp = await client.post("/api/search", data=f.make_jpeg())
        assert resp.status == 503 and (await resp.json())["error"] == "index_not_ready"
        health = await (await client.get("/healthz")).json()
        assert health["status"] == "degraded" and health["index_version"] is None and health["products"] == 0
    finally:
        await client.close()
        await stack.search.close()


async def test_redis_down_is_degraded_but_searches_work(bot_app):
    await bot_app.stack.state.client.ping()
    bot_app.stack.state.embedded.stop()
    health = await (await bot_app.get("/healthz")).json()
    assert health["status"] == "degraded" and health["redis"] is False
    resp = await bot_app.post("/api/search", data=form(bot_app.stack.engine.image_bytes("demo-011")))
    assert resp.status == 200 and (await resp.json())["results"][0]["id"] == "demo-011"
    for _ in range(RATE_CAPACITY + 1):  # the rate limit fails open: never a 429 while Redis is down
        assert (await bot_app.post("/api/search", data=b"not an image")).status == 400
    assert "vsearch_redis_up 0" in await (await bot_app.get("/metrics")).text()


async def test_secrets_never_in_healthz_metrics_or_logs(bot_stack, caplog):
    settings = dataclasses.replace(bot_stack.settings, **SECRETS)
    undo = install_log_redaction(settings.secrets())
    caplog.set_level(logging.DEBUG)
    client = TestClient(TestServer(make_app(settings, bot_stack.core, bot_stack.search, bot_stack.state,
                                            channels=False), host="127.0.0.1"))
    await client.start_server()
    try:
        await client.post("/api/search", data=b"not an image")
        await client.post("/api/search", data=form(bot_stack.engine.image_bytes("demo-012")))
        bodies = [await (await client.get(p)).text() for p in ("/healthz", "/metrics", "/")]
        log = logging.getLogger("bot.test")
        log.warning("calling https://api.telegram.org/bot%s/sendMessage", SECRETS["telegram_bot_token"])
        try:
            raise RuntimeError(f"viber refused token {SECRETS['viber_auth_token']}")
        except RuntimeError:
            log.exception("send failed")
    finally:
        await client.close()
        undo()
    captured = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert "[redacted]" in captured
    for secret in settings.secrets():
        assert all(secret not in body for body in bodies), secret
        assert secret not in captured, secret


def test_client_address_trusts_x_forwarded_for_only_from_trusted_proxies():
    import ipaddress
    from unittest.mock import Mock

    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from bot.config import BotSettings
    from bot.web import SETTINGS, client_address

    def address(peer: str, forwarded: str | None, trusted: tuple[str, ...]) -> str:
        app = web.Application()
        app[SETTINGS] = BotSettings(trusted_proxies=tuple(ipaddress.ip_network(t) for t in trusted))
        transport = Mock()
        transport.get_extra_info.return_value = (peer, 40000)
        headers = {"X-Forwarded-For": forwarded} if forwarded else {}
        return client_address(make_mocked_request("POST", "/api/search", headers=headers, app=app, transport=transport))

    # No trusted proxy: the header is whatever the client wrote, so it is ignored.
    assert address("203.0.113.7", "198.51.100.1", ()) == "203.0.113.7"
    # From the trusted proxy: the nearest address that is not a trusted proxy.
    assert address("10.0.0.2", "198.51.100.1", ("10.0.0.0/8",)) == "198.51.100.1"
    assert address("10.0.0.2", "1.2.3.4, 198.51.100.1, 10.0.0.3", ("10.0.0.0/8",)) == "198.51.100.1"
    # A client that is not the proxy cannot pick its bucket with the header.
    assert address("203.0.113.7", "198.51.100.1", ("10.0.0.0/8",)) == "203.0.113.7"
    # Only trusted hops in the header: the peer.
    assert address("10.0.0.2", "10.0.0.9", ("10.0.0.0/8",)) == "10.0.0.2"
