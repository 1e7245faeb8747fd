"""Hostile input for both webhooks (hypothesis against a live app), and the shared webhook pieces in bot/webhooks.py."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from bot_fixtures import bot_engine, free_port, make_bot_settings, open_stack  # noqa: F401
from fake_viber import (
    VIBER_TOKEN,
    FakeViber,
    conversation_started_event,
    picture_event,
    sign_viber,
    text_event,
)
from fake_whatsapp import (
    ACCESS_TOKEN,
    APP_SECRET,
    PHONE_NUMBER_ID,
    VERIFY_TOKEN,
    FakeGraph,
    document_message,
    image_message,
    messages_payload,
    sign_whatsapp,
    status_payload,
)
from fake_whatsapp import text_message as wa_text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.webhooks import ApiError, RetryPolicy, ThrottledProgress, call_api, drain, signature_ok

# --- a live app in its own thread (hypothesis drives it with plain blocking requests) --------------------


class _Failures(logging.Handler):
    """Collects the log lines of background webhook work that died."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@dataclass
class Live:
    port: int
    app: web.Application
    viber: FakeViber
    graph: FakeGraph
    failures: _Failures
    loop: asyncio.AbstractEventLoop

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **headers})
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def settle(self) -> None:
        asyncio.run_coroutine_threadsafe(drain(self.app, timeout=60), self.loop).result(90)


@pytest.fixture(scope="module")
def live(bot_engine, tmp_path_factory) -> Iterator[Live]:  # noqa: F811
    from bot.state import State
    from bot.web import make_app

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="props-app", daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(120)

    async def start() -> tuple[Any, ...]:
        viber, graph = await FakeViber().start(), await FakeGraph().start()
        state = await State.open(None, tmp_path_factory.mktemp("props-redis"))
        bot_settings = make_bot_settings(
            bot_engine.settings, viber_auth_token=VIBER_TOKEN, viber_api_base_url=viber.base_url,
            whatsapp_access_token=ACCESS_TOKEN, whatsapp_app_secret=APP_SECRET,
            whatsapp_verify_token=VERIFY_TOKEN, whatsapp_phone_number_id=PHONE_NUMBER_ID,
            whatsapp_api_base_url=graph.base_url)
        stack = await open_stack(bot_settings, state, bot_engine)
        app = make_app(bot_settings, stack.core, stack.search, stack.state)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return viber, graph, state, stack, app, runner, port

    viber, graph, state, stack, app, runner, port = run(start())
    viber.media["shoe.jpg"] = bot_engine.image_bytes("demo-001")
    graph.media["7001"] = (bot_engine.image_bytes("demo-002"), "image/jpeg")
    failures = _Failures()
    logging.getLogger("bot").addHandler(failures)
    try:
        yield Live(port, app, viber, graph, failures, loop)
    finally:
        logging.getLogger("bot").removeHandler(failures)

        async def stop() -> None:
            await runner.cleanup()
            await stack.admin.close()
            await stack.search.close()
            await state.close()
            await viber.stop()
            await graph.stop()

        run(stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# --- strategies -------------------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12)
ids = st.text(min_size=1, max_size=12) | json_values
media_urls = st.sampled_from([
    "http://127.0.0.1:1/a.jpg", "https://10.0.0.1/a.jpg", "https://169.254.169.254/x", "file:///etc/passwd",
    "ftp://127.0.0.1/a.jpg", "http://[::1]:1/a.jpg", "https://localhost/a.jpg", "http://", "https://%%%/",
]) | st.text(max_size=30)
words = st.sampled_from(["hi", "/start", "help", "status", "/reindex", "stats", "more:AAAAAAAAAAAA:3",
                         "like:AAAAAAAAAAAA:1", "more:x:99999", ""]) | st.text(max_size=40)

MEDIA = "@MEDIA@"  # replaced by the fake's URL of a real photo when the body is posted


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


@st.composite
def mutated(draw: Any, bases: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A well-formed payload with up to three fields deleted or replaced by arbitrary JSON."""
    body = draw(bases)
    for _ in range(draw(st.integers(0, 3))):
        paths = list(_paths(body))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return body


user_ids = st.text(st.characters(min_codepoint=48, max_codepoint=122), min_size=1, max_size=12)
tokens = st.integers(1, 2**62)
viber_bases = st.one_of(
    st.builds(picture_event, user_ids, tokens, st.just(MEDIA) | media_urls),
    st.builds(text_event, user_ids, tokens, words),
    st.builds(conversation_started_event, user_ids),
    st.builds(lambda event, token: {"event": event, "timestamp": 1, "message_token": token, "user_id": "u"},
              st.sampled_from(["webhook", "seen", "delivered", "failed", "subscribed", "unsubscribed", "new"]),
              tokens),
)
viber_bodies = mutated(viber_bases)

wa_ids = st.from_regex(r"\A[0-9]{6,15}\Z")
wamids = st.from_regex(r"\Awamid\.[A-Za-z0-9]{4,20}\Z")
wa_single = st.one_of(
    st.builds(image_message, wa_ids, wamids, st.sampled_from(["7001", "404404", "x-1"])),
    st.builds(document_message, wa_ids, wamids, st.sampled_from(["7001", "9"]),
              st.sampled_from(["image/jpeg", "application/pdf", ""])),
    st.builds(wa_text, wa_ids, wamids, words),
    st.builds(lambda wa_id, mid, data: {"from": wa_id, "id": mid, "type": "interactive", "timestamp": "1",
                                        "interactive": {"type": "button_reply",
                                                        "button_reply": {"id": data, "title": "Show more"}}},
              wa_ids, wamids, words),
    st.builds(lambda wa_id, mid, kind: {"from": wa_id, "id": mid, "type": kind, "timestamp": "1", kind: {}},
              wa_ids, wamids, st.sampled_from(["reaction", "sticker", "audio", "location", "unsupported"])),
)
wa_bases = st.one_of(
    st.builds(lambda messages: messages_payload(messages[0]["from"], *messages), st.lists(wa_single, min_size=1,
                                                                                          max_size=3)),
    st.builds(status_payload, wa_ids, wamids, st.sampled_from(["sent", "delivered", "read", "failed"])),
)
wa_bodies = mutated(wa_bases)


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


raw_bodies = st.binary(max_size=64) | st.text(max_size=64).map(str.encode)
PROPS = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def assert_handled(status: int, text: str) -> None:
    assert status < 500, text
    assert "Traceback" not in text and 'File "' not in text


@PROPS
@given(body=viber_bodies.map(dumps) | json_values.map(dumps) | raw_bodies)
def test_signed_viber_callbacks_never_get_a_5xx(live, body):
    body = body.replace(MEDIA.encode(), live.viber.media_url("shoe.jpg").encode())
    status, text = live.post("/webhooks/viber", body, {"X-Viber-Content-Signature": sign_viber(body)})
    assert_handled(status, text)
    assert status in (200, 400)


@PROPS
@given(body=wa_bodies.map(dumps) | json_values.map(dumps) | raw_bodies)
def test_signed_whatsapp_notifications_never_get_a_5xx(live, body):
    status, text = live.post("/webhooks/whatsapp", body, {"X-Hub-Signature-256": sign_whatsapp(body)})
    assert_handled(status, text)
    assert status in (200, 400)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=viber_bodies.map(dumps) | raw_bodies, signature=st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=80))
def test_unsigned_bodies_are_always_403(live, body, signature):
    for path, header, good in (("/webhooks/viber", "X-Viber-Content-Signature", sign_viber(body)),
                               ("/webhooks/whatsapp", "X-Hub-Signature-256", sign_whatsapp(body))):
        headers = {} if signature.strip() in ("", good) else {header: signature.strip()}
        status, text = live.post(path, body, headers)
        assert status == 403, text


def test_zz_background_work_survived_the_fuzzing(live):
    """Runs after the properties above: the work they spawned ended without crashing."""
    live.settle()
    crashed = [line for line in live.failures.lines if " failed: " in line]
    assert crashed == []
    assert live.viber.sent or live.graph.sent  # the fuzzing did reach the core and got answers out


# --- bot/webhooks.py pieces -------------------------------------------------------------------------------


def test_signature_ok_is_exact():
    body = b'{"a": 1}'
    good = sign_viber(body, "tok")
    assert signature_ok("tok", body, good)
    assert signature_ok("tok", body, good.upper())  # hex case does not matter
    assert signature_ok("tok", body, "sha256=" + good, prefix="sha256=")
    for bad in (None, "", good[:-1], good + "0", "sha256=" + good, "\u00e9" * 64):
        assert not signature_ok("tok", body, bad)
    assert not signature_ok(None, body, good) and not signature_ok("", body, sign_viber(body, ""))


class _Api:
    """A tiny API on 127.0.0.1 that answers from a script of (status, headers) and counts the calls."""

    def __init__(self, script: list[tuple[int, dict[str, str]]]) -> None:
        self.script = script
        self.calls = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> _Api:
        async def handler(request: web.Request) -> web.Response:
            status, headers = self.script[min(self.calls, len(self.script) - 1)]
            self.calls += 1
            return web.json_response({"status": status}, status=status, headers=headers)

        app = web.Application()
        app.router.add_post("/api", handler)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/api"  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, timeout=5)


async def _call(api: _Api) -> Any:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        return await call_api(session, "POST", api.url, "test call", headers={}, json_body={"x": 1}, policy=FAST)


async def test_call_api_retries_5xx_and_429_then_succeeds():
    async with _Api([(503, {}), (429, {"Retry-After": "0"}), (502, {}), (200, {})]) as api:
        assert await _call(api) == {"status": 200}
        assert api.calls == 4


@pytest.mark.parametrize("status", [400, 401, 403, 404])
async def test_call_api_does_not_retry_other_4xx(status):
    async with _Api([(status, {})]) as api:
        with pytest.raises(ApiError) as err:
            await _call(api)
        assert api.calls == 1 and err.value.status == status


async def test_call_api_gives_up_after_the_attempts_allowed():
    async with _Api([(500, {})]) as api:
        with pytest.raises(ApiError) as err:
            await _call(api)
        assert api.calls == FAST.attempts and err.value.status == 500


async def test_call_api_retries_a_dead_port_and_says_so():
    import aiohttp

    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        with pytest.raises(ApiError) as err:
            await call_api(session, "POST", f"http://127.0.0.1:{free_port()}/x", "dead call", headers={},
                           policy=FAST)
    assert err.value.status is None and "dead call failed" in str(err.value)
    assert time.monotonic() - started < 5


def test_backoff_grows_with_jitter_and_respects_retry_after():
    policy = RetryPolicy(base_delay=1.0, max_delay=8.0)
    for attempt, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 8.0)):
        delays = {policy.delay(attempt) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays) and len(delays) > 1
    assert policy.delay(1, retry_after=3.0) == 3.0
    assert policy.delay(1, retry_after=100.0) == 8.0


async def test_throttled_progress_sends_the_first_and_the_last_and_holds_the_middle():
    app = web.Application()
    from bot.webhooks import WEBHOOK_TASKS

    app[WEBHOOK_TASKS] = set()
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    progress = ThrottledProgress(app, send, interval=0.3)
    for text in ("10%", "20%", "30%", "done"):
        await progress.update(text)
    assert sent == ["10%"]
    await drain(app)
    assert sent == ["10%", "done"]
