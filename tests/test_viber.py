"""The Viber channel against the real aiohttp app, real Redis and a fake Viber API, with signed callbacks."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from bot_fixtures import bot_engine, free_port, make_bot_settings, open_stack, redis_state  # noqa: F401
from fake_viber import (
    VIBER_TOKEN,
    WEBHOOK_EVENT,
    FakeViber,
    check_message,
    conversation_started_event,
    encode,
    picture_event,
    sign_viber,
    text_event,
)

from bot import replies
from bot.replies import ProductCard, Reply
from bot.viber import MAX_CARDS, carousel_message, fallback_messages, more_keyboard, parse_event
from bot.webhooks import MAX_BODY_BYTES, PayloadError, drain

USER = "01234567890A="
ADMIN = "admin-viber="  # listed in bot_fixtures.ADMIN_IDS as viber:admin-viber=


@dataclass
class Harness:
    client: TestClient
    app: web.Application
    fake: FakeViber
    stack: Any

    async def post(self, payload: Any = None, *, raw: bytes | None = None, signature: str | None = "sign",
                   headers: dict[str, str] | None = None) -> tuple[int, str]:
        body = raw if raw is not None else encode(payload)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if signature == "sign":
            hdrs["X-Viber-Content-Signature"] = sign_viber(body)
        elif signature is not None:
            hdrs["X-Viber-Content-Signature"] = signature
        resp = await self.client.post("/webhooks/viber", data=body, headers=hdrs)
        return resp.status, await resp.text()

    async def settle(self) -> None:
        """Wait for the background work the webhook spawned."""
        await drain(self.app)

    def product_url(self, product_id: str) -> str:
        return self.stack.engine.searcher.product(product_id).url


@pytest.fixture
async def fake() -> AsyncIterator[FakeViber]:
    server = await FakeViber().start()
    yield server
    await server.stop()


async def start_harness(settings: Any, state: Any, engine: Any, fake: FakeViber, port: int | None = None) -> Harness:
    from bot.web import make_app

    stack = await open_stack(settings, state, engine)
    app = make_app(settings, stack.core, stack.search, stack.state)
    client = TestClient(TestServer(app, host="127.0.0.1", port=port))
    await client.start_server()
    return Harness(client, app, fake, stack)


async def close_harness(h: Harness) -> None:
    await h.client.close()
    await h.stack.admin.close()
    await h.stack.search.close()


@pytest.fixture
async def viber(bot_engine, redis_state, fake) -> AsyncIterator[Harness]:  # noqa: F811
    settings = make_bot_settings(bot_engine.settings, viber_auth_token=VIBER_TOKEN,
                                 viber_api_base_url=fake.base_url)
    h = await start_harness(settings, redis_state, bot_engine, fake)
    yield h
    await close_harness(h)


def sent_texts(fake: FakeViber) -> list[str]:
    return [m["text"] for m in fake.sent if m["type"] == "text"]


def carousel_urls(message: dict[str, Any]) -> list[str]:
    return [b["ActionBody"] for b in message["rich_media"]["Buttons"] if b["ActionType"] == "open-url"]


# --- happy path and paging ---------------------------------------------------------------------------


async def test_picture_is_answered_with_a_carousel_of_the_matching_products(viber):
    viber.fake.media["shoe.jpg"] = viber.stack.engine.image_bytes("demo-003")
    status, _ = await viber.post(picture_event(USER, 5001, viber.fake.media_url("shoe.jpg")))
    assert status == 200
    intro, carousel = await viber.fake.wait_sent(2)
    await viber.settle()

    assert intro == {"receiver": USER, "sender": intro["sender"], "type": "text", "text": "Here is what I found:"}
    assert carousel["type"] == "rich_media" and carousel["receiver"] == USER
    assert carousel["min_api_version"] >= 2
    urls = carousel_urls(carousel)
    assert urls[0] == viber.product_url("demo-003")  # the same photo finds its own product first
    assert len(set(urls)) == viber.stack.settings.engine.top_k
    assert viber.fake.refused == [] and len(viber.fake.sent) == 2
    # each card fills exactly one 6x7 block
    assert sum(b["Rows"] for b in carousel["rich_media"]["Buttons"]) == 7 * len(set(urls))
    # local catalog images and no VSEARCH_PUBLIC_URL: Viber could not fetch them, so the cards have no Image
    assert not any("Image" in b for b in carousel["rich_media"]["Buttons"])


async def test_with_a_public_url_local_images_are_shown_from_the_web_app(bot_engine, redis_state, fake):  # noqa: F811
    port = free_port()
    public = f"http://127.0.0.1:{port}"  # VSEARCH_PUBLIC_URL as seen from Viber's servers
    settings = make_bot_settings(bot_engine.settings, viber_auth_token=VIBER_TOKEN, viber_api_base_url=fake.base_url,
                                 public_url=public)
    h = await start_harness(settings, redis_state, bot_engine, fake, port=port)
    try:
        fake.media["shoe.jpg"] = bot_engine.image_bytes("demo-003")
        await h.post(picture_event(USER, 5101, fake.media_url("shoe.jpg")))
        _, carousel = await fake.wait_sent(2)
        await h.settle()
        images = [b["Image"] for b in carousel["rich_media"]["Buttons"] if "Image" in b]
        assert len(images) == settings.engine.top_k and images[0] == f"{public}/images/demo-003/0"
        # Each Image URL, fetched as Viber would, is that product's catalog photo.
        for url in images:
            product_id = url.split("/")[-2]
            resp = await h.client.session.get(url)
            assert resp.status == 200 and resp.content_type == "image/jpeg"
            assert await resp.read() == bot_engine.image_bytes(product_id)
        for missing in (f"{public}/images/demo-003/1", f"{public}/images/no-such/0"):
            assert (await h.client.session.get(missing)).status == 404
    finally:
        await close_harness(h)


async def test_show_more_and_more_like_buttons_page_through_the_same_results(viber):
    viber.fake.media["shoe.jpg"] = viber.stack.engine.image_bytes("demo-007")
    await viber.post(picture_event(USER, 5002, viber.fake.media_url("shoe.jpg")))
    _, carousel = await viber.fake.wait_sent(2)
    first_page = carousel_urls(carousel)
    more = carousel["keyboard"]["Buttons"][0]
    assert more["Text"] == replies.SHOW_MORE_LABEL and more["ActionType"] == "reply"

    # a keyboard tap comes back as a text message carrying the button's ActionBody
    await viber.post(text_event(USER, 5003, more["ActionBody"]))
    _, _, intro, page2 = await viber.fake.wait_sent(4)
    assert intro["text"].startswith("More results (4-6)")
    assert not set(carousel_urls(page2)) & set(first_page)

    like = next(b for b in carousel["rich_media"]["Buttons"] if b["ActionType"] == "reply")
    assert like["Text"] == "More like #1"
    await viber.post(text_event(USER, 5004, like["ActionBody"]))
    *_, intro3, similar = await viber.fake.wait_sent(6)
    assert intro3["text"] == "Products like #1:"
    assert viber.product_url("demo-007") not in carousel_urls(similar)


async def test_another_users_page_token_gets_the_expired_answer(viber):
    viber.fake.media["shoe.jpg"] = viber.stack.engine.image_bytes("demo-001")
    await viber.post(picture_event(USER, 5010, viber.fake.media_url("shoe.jpg")))
    _, carousel = await viber.fake.wait_sent(2)
    stolen = carousel["keyboard"]["Buttons"][0]["ActionBody"]
    await viber.post(text_event("someone-else=", 5011, stolen))
    *_, answer = await viber.fake.wait_sent(3)
    assert answer["receiver"] == "someone-else=" and answer["text"] == replies.PAGE_EXPIRED


async def test_carousel_refused_falls_back_to_plain_messages_with_every_link(viber):
    viber.fake.refuse_rich_media = True
    viber.fake.media["shoe.jpg"] = viber.stack.engine.image_bytes("demo-003")
    await viber.post(picture_event(USER, 5020, viber.fake.media_url("shoe.jpg")))
    await viber.settle()

    assert [m["type"] for m in viber.fake.refused] == ["rich_media"]
    texts = sent_texts(viber.fake)
    assert texts[0] == "Here is what I found:"
    assert viber.product_url("demo-003") in texts[1]
    assert len(texts) == 1 + viber.stack.settings.engine.top_k
    assert "keyboard" in viber.fake.sent[-1]  # "Show more" stays reachable


async def test_a_5xx_from_viber_is_retried(viber):
    viber.fake.fail_next = 1
    await viber.post(text_event(USER, 5030, "hello"))
    (answer,) = await viber.fake.wait_sent(1)
    assert answer["text"] == replies.PHOTO_HINT
    assert viber.fake.calls == 2


# --- events --------------------------------------------------------------------------------------------


async def test_webhook_callback_and_unknown_events_get_200_and_nothing_else(viber):
    assert (await viber.post(WEBHOOK_EVENT))[0] == 200
    for event in ("delivered", "seen", "subscribed", "unsubscribed", "failed", "brand_new_event"):
        status, _ = await viber.post({"event": event, "timestamp": 1, "user_id": USER, "message_token": 1})
        assert status == 200
    await viber.settle()
    assert viber.fake.calls == 0


async def test_conversation_started_is_greeted_in_the_response_body(viber):
    status, text = await viber.post(conversation_started_event(USER))
    assert status == 200
    welcome = json.loads(text)
    assert welcome["type"] == "text" and welcome["text"] == replies.GREETING
    assert "receiver" not in welcome and 0 < len(welcome["sender"]["name"]) <= 28


async def test_text_and_stickers_get_the_photo_hint(viber):
    await viber.post(text_event(USER, 5040, "do you have red boots?"))
    sticker = text_event(USER, 5041, "") | {"message": {"type": "sticker", "sticker_id": 46105}}
    await viber.post(sticker)
    await viber.settle()
    assert sent_texts(viber.fake) == [replies.PHOTO_HINT, replies.PHOTO_HINT]


async def test_the_same_message_delivered_twice_is_answered_once(viber):
    viber.fake.media["shoe.jpg"] = viber.stack.engine.image_bytes("demo-002")
    event = picture_event(USER, 5050, viber.fake.media_url("shoe.jpg"))
    assert (await viber.post(event))[0] == 200
    await viber.settle()
    assert (await viber.post(event))[0] == 200
    await viber.settle()
    assert len(viber.fake.sent) == 2  # one intro + one carousel
    assert viber.fake.media_hits == 1


async def test_a_failing_media_download_gets_a_polite_error(viber):
    await viber.post(picture_event(USER, 5060, viber.fake.media_url("missing.jpg")))
    (answer,) = await viber.fake.wait_sent(1)
    await viber.settle()
    assert answer["text"] == replies.DOWNLOAD_FAILED
    assert len(viber.fake.sent) == 1


async def test_a_picture_that_is_not_an_image_gets_the_reason(viber):
    viber.fake.media["fake.jpg"] = b"this is not a jpeg at all" * 10
    await viber.post(picture_event(USER, 5061, viber.fake.media_url("fake.jpg")))
    (answer,) = await viber.fake.wait_sent(1)
    assert answer["text"].startswith("I could not use that picture")


# --- signatures and hostile input -------------------------------------------------------------------------


@pytest.mark.parametrize("signature", [None, "", "0" * 64, sign_viber(b"another body"), "sha256=abc", "zz\u00e9"])
async def test_forged_or_missing_signature_is_403_and_nothing_happens(viber, signature):
    viber.fake.media["shoe.jpg"] = viber.stack.engine.image_bytes("demo-002")
    status, text = await viber.post(picture_event(USER, 5070, viber.fake.media_url("shoe.jpg")),
                                    signature=signature)
    await viber.settle()
    assert status == 403 and "Traceback" not in text
    assert viber.fake.calls == 0 and viber.fake.media_hits == 0
    # and the message id was not burnt: the genuine delivery is still answered
    await viber.post(picture_event(USER, 5070, viber.fake.media_url("shoe.jpg")))
    await viber.fake.wait_sent(2)


async def test_a_signature_made_with_another_token_is_refused(viber):
    body = encode(text_event(ADMIN, 5071, "status"))
    status, _ = await viber.post(raw=body, signature=sign_viber(body, "not-the-token"))
    await viber.settle()
    assert status == 403 and viber.fake.calls == 0


async def test_an_oversized_body_is_413_before_anything_else(viber):
    event = text_event(USER, 5080, "x" * (MAX_BODY_BYTES + 10))
    status, _ = await viber.post(event)
    assert status == 413
    status, _ = await viber.post(event, signature=None)  # unsigned and too large: still just 413
    assert status == 413

    async def chunks():  # no Content-Length: the cap applies to what is actually read
        for _ in range(20):
            yield b"x" * 65536

    resp = await viber.client.post("/webhooks/viber", data=chunks(),
                                   headers={"X-Viber-Content-Signature": "0" * 64})
    assert resp.status == 413
    await viber.settle()
    assert viber.fake.calls == 0


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"\xff\xfe\x00garbage",
        b"[1, 2, 3]",
        b"\"message\"",
        b"[" * 100_000 + b"]" * 100_000,
        encode({"timestamp": 1}),  # no event
        encode({"event": 7}),
        encode({"event": "message", "message_token": 1, "message": {"type": "text", "text": "hi"}}),  # no sender
        encode({"event": "message", "message_token": 1, "sender": {"id": 42}, "message": {"type": "text"}}),
        encode({"event": "message", "message_token": 1.5, "sender": {"id": "a"}, "message": {"type": "text"}}),
        encode({"event": "message", "message_token": 1, "sender": {"id": "a"}, "message": "hi"}),
        encode({"event": "message", "message_token": 1, "sender": {"id": "a"}, "message": {"type": "picture"}}),
        encode({"event": "message", "message_token": 1, "sender": {"id": "a"},
                "message": {"type": "picture", "media": "file:///etc/passwd"}}),
        encode({"event": "message", "message_token": True, "sender": {"id": "a"}, "message": {"type": "text"}}),
        encode({"event": "conversation_started", "user": "me"}),
    ],
)
async def test_malformed_signed_bodies_are_400_without_a_traceback(viber, body):
    status, text = await viber.post(raw=body)
    await viber.settle()
    assert status == 400, text
    assert "Traceback" not in text and len(text) < 300
    assert viber.fake.calls == 0


async def test_media_outside_the_allow_list_is_not_fetched(bot_engine, redis_state, fake):  # noqa: F811
    settings = make_bot_settings(bot_engine.settings, viber_auth_token=VIBER_TOKEN,
                                 viber_api_base_url=fake.base_url, media_allow_hosts=frozenset())
    h = await start_harness(settings, redis_state, bot_engine, fake)
    try:
        fake.media["shoe.jpg"] = bot_engine.image_bytes("demo-002")
        for n, url in enumerate([fake.media_url("shoe.jpg"), "https://169.254.169.254/latest/meta-data",
                                 "https://10.0.0.8/a.jpg", "https://localhost/a.jpg"]):
            await h.post(picture_event(USER, 5090 + n, url))
        answers = await fake.wait_sent(4)
        assert {a["text"] for a in answers} == {replies.DOWNLOAD_FAILED}
        assert fake.media_hits == 0
    finally:
        await close_harness(h)


# --- admin words ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["/reindex", "reindex", "status", "/stats"])
async def test_admin_words_from_a_non_admin_are_refused(viber, word):
    await viber.post(text_event(USER, 5100, word))
    (answer,) = await viber.fake.wait_sent(1)
    assert answer["text"] == replies.NOT_ADMIN
    assert not viber.stack.admin.running_here


async def test_status_from_an_admin_is_answered(viber):
    await viber.post(text_event(ADMIN, 5110, "status"))
    (answer,) = await viber.fake.wait_sent(1)
    assert answer["receiver"] == ADMIN
    assert f"Index version: {viber.stack.engine.version}" in answer["text"]


async def test_reindex_from_an_admin_reports_start_and_end(bot_engine, redis_state, fake, tmp_path,  # noqa: F811
                                                          demo_catalog):
    # A copy of the engine settings in a fresh data dir, so the session's index is not rebuilt.
    engine = dataclasses.replace(bot_engine.settings, data_dir=tmp_path / "data", catalog=str(demo_catalog))
    settings = make_bot_settings(engine, viber_auth_token=VIBER_TOKEN, viber_api_base_url=fake.base_url)
    h = await start_harness(settings, redis_state, bot_engine, fake)
    try:
        await h.post(text_event(ADMIN, 5120, "/reindex"))
        started = await fake.wait_sent(1)
        assert started[0]["text"].startswith("Reindex started")
        await h.stack.admin.wait()
        await h.settle()  # the held-back progress text (the summary) is flushed
        texts = sent_texts(fake)
        assert texts[-1].startswith("Reindex finished"), texts
        assert len(texts) <= 4  # start + throttled progress + summary, not one message per step
        assert Path(engine.index_dir).is_dir()
    finally:
        await close_harness(h)


# --- message building (pure) ---------------------------------------------------------------------------


def card(rank: int, *, image_url: str | None = "https://cdn.shop.example/p.jpg", title: str = "Runner") -> ProductCard:
    url = f"https://shop.example/p/{rank}"
    return ProductCard(rank=rank, product_id=f"p{rank}", title=title, price_text="49.90 EUR", url=url,
                       image_url=image_url, image_path=None, caption=f"{rank}. {title}\n49.90 EUR\n{url}")


def test_a_full_carousel_keeps_to_the_documented_limits():
    cards = tuple(card(i, title="<b>Very</b> long & fancy " * 20) for i in range(1, MAX_CARDS + 1))
    message = carousel_message(USER, cards, "Tok3nAbcdefgh", more_keyboard(
        Reply(text="x", cards=cards, page_token="Tok3nAbcdefgh", next_offset=6)))
    assert check_message(message) is None
    buttons = message["rich_media"]["Buttons"]
    assert [b["Image"] for b in buttons if "Image" in b] == ["https://cdn.shop.example/p.jpg"] * MAX_CARDS
    assert "<b>Very</b>" not in json.dumps(buttons)  # titles are escaped, not rendered as markup
    assert len(json.dumps(message)) < 30 * 1024
    with pytest.raises(ValueError):
        carousel_message(USER, cards + (card(7),), None)


def test_cards_without_image_or_token_still_fill_whole_blocks():
    message = carousel_message(USER, (card(1, image_url=None), card(2)), None)
    assert check_message(message) is None
    assert sum(b["Rows"] for b in message["rich_media"]["Buttons"]) == 14
    assert all(b["ActionType"] == "open-url" for b in message["rich_media"]["Buttons"])


def test_fallback_messages_carry_picture_and_link():
    picture, link = fallback_messages(USER, card(1))
    assert picture["type"] == "picture" and picture["media"] == "https://cdn.shop.example/p.jpg"
    assert link == {"receiver": USER, "sender": link["sender"], "type": "url", "media": "https://shop.example/p/1"}
    (text,) = fallback_messages(USER, card(2, image_url=None))
    assert "https://shop.example/p/2" in text["text"]
    assert all(check_message(m) is None for m in (picture, link, text))


def test_parse_event_reads_pictures_and_image_files_and_ignores_the_rest():
    assert parse_event(picture_event(USER, 7, "https://dl.viber.example/a.jpg")).media_url.endswith("a.jpg")
    as_file = text_event(USER, 8, "") | {"message": {"type": "file", "media": "https://x.example/f",
                                                     "file_name": "IMG_1.HEIC", "size": 10}}
    assert parse_event(as_file).message_id == "8"
    assert parse_event({"event": "seen", "message_token": 1}) is None
    with pytest.raises(PayloadError):
        parse_event({"event": "message", "sender": {"id": ""}, "message_token": 1, "message": {"type": "text"}})


async def test_no_secret_reaches_the_logs(viber, caplog):
    caplog.set_level("DEBUG")
    viber.fake.fail_next = 1
    viber.fake.refuse_rich_media = True
    viber.fake.media["shoe.jpg"] = viber.stack.engine.image_bytes("demo-004")
    await viber.post(picture_event(USER, 5200, viber.fake.media_url("shoe.jpg")))
    await viber.post(picture_event(USER, 5201, viber.fake.media_url("gone.jpg")))
    await viber.post(text_event(USER, 5202, "hi"), signature="00")
    await viber.settle()
    assert "retry" in caplog.text and "carousel refused" in caplog.text
    assert VIBER_TOKEN not in caplog.text
