"""Image fetching against a real aiohttp server on 127.0.0.1, and the SSRF guard."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import socket
import threading
from collections import Counter
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

from indexer.fetch import (
    FetchError,
    FetchSettings,
    fetch_all,
    fetch_all_sync,
    fetch_bytes,
    iter_fetched,
    open_session,
    read_local,
)
from indexer.netguard import FetchRefused, GuardedResolver, check_url, resolve_and_check


def _png(color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()
SETTINGS = FetchSettings(
    concurrency=4,
    timeout_s=5,
    max_bytes=1000,
    retries=2,
    backoff_s=0.01,
    allow_http=True,
    allow_hosts=frozenset({"127.0.0.1"}),
)


class Shop:
    """A tiny image host that counts requests per path and concurrent requests."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.active = 0
        self.max_active = 0
        self.headers: list[dict[str, str]] = []
        self.redirect_target = ""
        self.app = web.Application()
        self.app.router.add_get("/{name}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.hits[name] += 1
        self.headers.append(dict(request.headers))
        if name == "img.png":
            return web.Response(body=PNG, content_type="image/png")
        if name == "untyped":
            resp = web.Response(body=PNG)
            resp.headers.pop("Content-Type", None)
            return resp
        if name == "flaky":
            if self.hits[name] <= 2:
                return web.Response(status=500, text="oops")
            return web.Response(body=PNG, content_type="image/png")
        if name == "down":
            return web.Response(status=503, text="down")
        if name == "forbidden":
            return web.Response(status=403, text="no")
        if name == "slow":
            await asyncio.sleep(1.5)
            return web.Response(body=PNG, content_type="image/png")
        if name == "big":
            return web.Response(body=b"x" * 5000, content_type="image/jpeg")
        if name == "big-chunked":
            resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for _ in range(10):
                await resp.write(b"x" * 500)
            await resp.write_eof()
            return resp
        if name == "page":
            return web.Response(text="<html></html>", content_type="text/html")
        if name == "empty":
            return web.Response(body=b"", content_type="image/png")
        if name == "hop":
            raise web.HTTPFound("/img.png")
        if name == "loop":
            raise web.HTTPFound("/loop")
        if name == "away":
            raise web.HTTPFound(self.redirect_target)
        if name == "busy":
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            try:
                await asyncio.sleep(0.2)
            finally:
                self.active -= 1
            return web.Response(body=PNG, content_type="image/png")
        return web.Response(status=404, text="not here")


@pytest.fixture
async def shop():
    shop = Shop()
    server = TestServer(shop.app, host="127.0.0.1")
    await server.start_server()
    shop.base = f"http://127.0.0.1:{server.port}"  # type: ignore[attr-defined]
    yield shop
    await server.close()


async def _get(url: str, settings: FetchSettings = SETTINGS, **kwargs) -> bytes:
    async with open_session(settings) as session:
        return await fetch_bytes(session, url, settings, **kwargs)


async def _fails(url: str, settings: FetchSettings = SETTINGS) -> FetchError:
    with pytest.raises(FetchError) as info:
        await _get(url, settings)
    return info.value


async def test_image_is_downloaded(shop):
    assert await _get(f"{shop.base}/img.png") == PNG
    assert shop.hits["img.png"] == 1
    assert shop.headers[0]["User-Agent"].startswith("vsearch/")


async def test_missing_content_type_is_accepted(shop):
    assert await _get(f"{shop.base}/untyped") == PNG


async def test_404_is_not_retried(shop):
    err = await _fails(f"{shop.base}/nothing")
    assert (err.reason, err.status) == ("not_found", 404)
    assert shop.hits["nothing"] == 1


async def test_other_4xx_is_not_retried(shop):
    err = await _fails(f"{shop.base}/forbidden")
    assert (err.reason, err.status) == ("http_status", 403)
    assert shop.hits["forbidden"] == 1


async def test_500_then_200_is_retried(shop):
    assert await _get(f"{shop.base}/flaky") == PNG
    assert shop.hits["flaky"] == 3


async def test_persistent_5xx_gives_up_after_retries(shop):
    err = await _fails(f"{shop.base}/down")
    assert (err.reason, err.status, err.attempts) == ("http_status", 503, 3)
    assert shop.hits["down"] == 3
    assert "503" in str(err)


async def test_slow_response_times_out_after_retries(shop):
    settings = replace(SETTINGS, timeout_s=0.3, retries=1)
    err = await _fails(f"{shop.base}/slow", settings)
    assert err.reason == "timeout"
    assert err.attempts == 2
    assert shop.hits["slow"] == 2


@pytest.mark.parametrize("name", ["big", "big-chunked"])
async def test_oversized_body_is_too_large(shop, name):
    err = await _fails(f"{shop.base}/{name}")
    assert err.reason == "too_large"
    assert shop.hits[name] == 1


async def test_html_page_is_bad_content_type(shop):
    err = await _fails(f"{shop.base}/page")
    assert err.reason == "bad_content_type"
    assert "text/html" in str(err)


async def test_empty_body(shop):
    assert (await _fails(f"{shop.base}/empty")).reason == "empty"


async def test_redirect_to_allowed_host_is_followed(shop):
    assert await _get(f"{shop.base}/hop") == PNG
    assert shop.hits["hop"] == 1 and shop.hits["img.png"] == 1


async def test_redirect_loop_stops(shop):
    err = await _fails(f"{shop.base}/loop")
    assert err.reason == "too_many_redirects"
    assert shop.hits["loop"] == 6


@pytest.mark.parametrize(
    "target",
    ["http://127.0.0.2:{port}/img.png", "http://169.254.169.254/latest/meta-data/", "http://localhost:{port}/x"],
)
async def test_redirect_to_internal_address_is_refused_before_connecting(shop, target):
    port = shop.base.rsplit(":", 1)[1]
    shop.redirect_target = target.format(port=port)
    err = await _fails(f"{shop.base}/away")
    assert err.reason == "refused"
    assert shop.hits["away"] == 1
    assert sum(shop.hits.values()) == 1


async def test_redirect_to_other_origin_drops_credentials(shop):
    other = Shop()
    server = TestServer(other.app, host="127.0.0.1")
    await server.start_server()
    try:
        shop.redirect_target = f"http://127.0.0.1:{server.port}/img.png"
        got = await _get(f"{shop.base}/away", headers={"Authorization": "Bearer secret", "X-Keep": "1"})
    finally:
        await server.close()
    assert got == PNG
    assert shop.headers[0]["Authorization"] == "Bearer secret"
    assert "Authorization" not in other.headers[0]
    assert other.headers[0]["X-Keep"] == "1"


async def test_http_refused_unless_allowed(shop):
    err = await _fails(f"{shop.base}/img.png", replace(SETTINGS, allow_http=False))
    assert err.reason == "refused"
    assert "https" in str(err)
    assert shop.hits["img.png"] == 0


async def test_loopback_refused_unless_allow_listed(shop):
    err = await _fails(f"{shop.base}/img.png", replace(SETTINGS, allow_hosts=frozenset()))
    assert err.reason == "refused"
    assert shop.hits["img.png"] == 0


async def test_plain_session_still_checks_hosts(shop):
    async with aiohttp.ClientSession() as session:
        with pytest.raises(FetchError) as info:
            await fetch_bytes(session, f"{shop.base}/img.png", replace(SETTINGS, allow_hosts=frozenset()))
        assert info.value.reason == "refused"
        assert await fetch_bytes(session, f"{shop.base}/img.png", SETTINGS) == PNG


def _localhost_resolves() -> bool:
    try:
        return bool(socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM))
    except OSError:
        return False


@pytest.mark.skipif(not _localhost_resolves(), reason="'localhost' does not resolve on this machine")
async def test_guarded_resolver_refuses_names_of_internal_addresses():
    with pytest.raises(FetchRefused, match="loopback"):
        await GuardedResolver().resolve("localhost", 80)
    allowed = await GuardedResolver(["LocalHost"]).resolve("localhost", 80)
    assert all(ipaddress.ip_address(r["host"]).is_loopback for r in allowed)


@pytest.mark.skipif(not _localhost_resolves(), reason="'localhost' does not resolve on this machine")
async def test_guarded_session_refuses_internal_names_at_connect_time(shop):
    # Bypass check_url: the connector's resolver must refuse on its own.
    port = shop.base.rsplit(":", 1)[1]
    async with open_session(replace(SETTINGS, allow_hosts=frozenset())) as session:
        with pytest.raises((FetchRefused, aiohttp.ClientConnectorError)) as info:
            await session.get(f"http://localhost:{port}/img.png")
    assert "loopback" in str(info.value)
    assert sum(shop.hits.values()) == 0


async def test_concurrency_is_bounded(shop):
    settings = replace(SETTINGS, concurrency=3)
    results = await fetch_all([f"{shop.base}/busy"] * 12, settings)
    assert results == [PNG] * 12
    assert shop.hits["busy"] == 12
    assert 2 <= shop.max_active <= 3


async def test_fetch_all_mixes_local_files_and_urls(shop, tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    sources = [str(tmp_path / "a.png"), f"{shop.base}/img.png", str(tmp_path / "gone.png"), f"{shop.base}/page"]
    done: list[int] = []
    results = await fetch_all(sources, SETTINGS, on_done=lambda i, _: done.append(i))
    assert results[0] == PNG and results[1] == PNG
    assert isinstance(results[2], FetchError) and results[2].reason == "not_found"
    assert isinstance(results[3], FetchError) and results[3].reason == "bad_content_type"
    assert sorted(done) == [0, 1, 2, 3]


def test_read_local_limits(tmp_path):
    (tmp_path / "ok.png").write_bytes(PNG)
    (tmp_path / "big.jpg").write_bytes(b"x" * 2000)
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert read_local(str(tmp_path / "ok.png"), 1000) == PNG
    cases = {"big.jpg": "too_large", "empty.jpg": "empty", "missing.jpg": "not_found", "": "read_error"}
    for name, reason in cases.items():
        with pytest.raises(FetchError) as info:
            read_local(str(tmp_path / name), 1000)
        assert info.value.reason == reason, name


def test_fetch_all_sync_reads_local_files(tmp_path):
    paths = []
    for i, color in enumerate(["red", "green", "blue"]):
        path = tmp_path / f"{i}.png"
        path.write_bytes(_png(color))
        paths.append(str(path))
    assert fetch_all_sync(paths, SETTINGS) == [_png("red"), _png("green"), _png("blue")]


async def test_iter_fetched_yields_every_result(shop, tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    sources = [f"{shop.base}/img.png"] * 10 + [f"{shop.base}/nothing", str(tmp_path / "a.png")]
    got = await asyncio.to_thread(lambda: dict(iter_fetched(sources, SETTINGS, buffer=2)))
    assert sorted(got) == list(range(12))
    assert all(got[i] == PNG for i in range(10)) and got[11] == PNG
    assert isinstance(got[10], FetchError) and got[10].reason == "not_found"


async def test_iter_fetched_stops_its_thread_when_abandoned(shop):
    def first_only() -> None:
        for _ in iter_fetched([f"{shop.base}/busy"] * 40, replace(SETTINGS, concurrency=2), buffer=1):
            break

    await asyncio.to_thread(first_only)
    assert not any(t.name == "vsearch-fetch" for t in threading.enumerate())
    assert shop.hits["busy"] < 40


# --- pure guard checks (no connections) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/a.jpg",
        "https://127.1/a.jpg",
        "https://2130706433/a.jpg",
        "https://0x7f.0.0.1/a.jpg",
        "https://10.1.2.3/a.jpg",
        "https://172.16.0.1/a.jpg",
        "https://192.168.1.10/a.jpg",
        "https://100.64.0.1/a.jpg",
        "https://169.254.169.254/latest/meta-data/",
        "https://0.0.0.0/a.jpg",
        "https://224.0.0.1/a.jpg",
        "https://240.0.0.1/a.jpg",
        "https://255.255.255.255/a.jpg",
        "https://[::1]/a.jpg",
        "https://[::]/a.jpg",
        "https://[fe80::1]/a.jpg",
        "https://[fc00::1]/a.jpg",
        "https://[ff02::1]/a.jpg",
        "https://[::ffff:127.0.0.1]/a.jpg",
        "https://[::ffff:169.254.169.254]/a.jpg",
        "https://[2002:a00:1::]/a.jpg",
        "https://[64:ff9b::a9fe:a9fe]/a.jpg",
        "https://localhost/a.jpg",
        "https://shop.localhost/a.jpg",
    ],
)
def test_internal_addresses_are_refused(url):
    with pytest.raises(FetchRefused):
        check_url(url)


@pytest.mark.parametrize(
    "url",
    ["https://93.184.216.34/a.jpg", "https://[2606:4700::6810:84e5]/a.jpg", "https://cdn.shop.example/a.jpg"],
)
def test_public_addresses_and_names_pass_the_pure_check(url):
    check_url(url)


@pytest.mark.parametrize(
    "url", ["http://93.184.216.34/a.jpg", "ftp://93.184.216.34/a.jpg", "https:///a.jpg", "https://[::1/a", "data:,x"]
)
def test_bad_schemes_and_urls_are_refused(url):
    with pytest.raises(FetchRefused):
        check_url(url)


def test_allow_list_and_allow_http():
    check_url("http://93.184.216.34/a.jpg", allow_http=True)
    check_url("http://127.0.0.1:8080/a.jpg", allow_http=True, allow_hosts=frozenset({"127.0.0.1"}))
    check_url("https://10.2.3.4/a.jpg", allow_hosts=frozenset({"10.0.0.0/8"}))
    check_url("https://images.lan./a.jpg", allow_hosts=frozenset({"Images.LAN"}))
    check_url("https://[::1]:8443/a.jpg", allow_hosts=frozenset({"[0::1]"}))
    with pytest.raises(FetchRefused, match="https"):
        check_url("http://127.0.0.1/a.jpg", allow_hosts=frozenset({"127.0.0.1"}))
    with pytest.raises(FetchRefused):
        check_url("https://127.0.0.2/a.jpg", allow_hosts=frozenset({"127.0.0.1"}))


async def test_resolve_and_check_literals_without_dns():
    assert await resolve_and_check("https://93.184.216.34/a.jpg") == [ipaddress.ip_address("93.184.216.34")]
    with pytest.raises(FetchRefused):
        await resolve_and_check("https://[::ffff:10.0.0.1]/a.jpg")


def test_settings_are_validated():
    with pytest.raises(ValueError):
        FetchSettings(concurrency=0)
    with pytest.raises(ValueError):
        FetchError("bogus", "x")
