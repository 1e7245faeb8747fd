"""The WhatsApp channel against the real aiohttp app, real Redis and a fake Graph API, with signed notifications."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from bot_fixtures import bot_engine, make_bot_settings, open_stack, redis_state  # noqa: F401
from fake_whatsapp import (
    ACCESS_TOKEN,
    APP_SECRET,
    PHONE_NUMBER_ID,
    VERIFY_TOKEN,
    FakeGraph,
    check_message,
    document_message,
    encode,
    image_message,
    messages_payload,
    sign_whatsapp,
    status_payload,
    text_message,
)
from image_factories import make_png
from PIL import Image

from bot import replies
from bot.replies import ProductCard
from bot.webhooks import MAX_BODY_BYTES, drain
from bot.whatsapp import card_caption, parse_events, upload_payload

USER = "15551234567"
ADMIN = "15550001111"  # listed in bot_fixtures.ADMIN_IDS


@dataclass
class Harness:
    client: TestClient
    app: web.Application
    fake: FakeGraph
    stack: Any

    async def post(self, payload: Any = None, *, raw: bytes | None = None, signature: str | None = "sign"
                   ) -> tuple[int, str]:
        body = raw if raw is not None else encode(payload)
        headers = {"Content-Type": "application/json"}
        if signature == "sign":
            headers["X-Hub-Signature-256"] = sign_whatsapp(body)
        elif signature is not None:
            headers["X-Hub-Signature-256"] = signature
        resp = await self.client.post("/webhooks/whatsapp", data=body, headers=headers)
        return resp.status, await resp.text()

    async def settle(self) -> None:
        await drain(self.app)

    def product_url(self, product_id: str) -> str:
        return self.stack.engine.searcher.product(product_id).url

    def photo(self, media_id: str, product_id: str) -> None:
        self.fake.media[media_id] = (self.stack.engine.image_bytes(product_id), "image/jpeg")


@pytest.fixture
async def fake() -> AsyncIterator[FakeGraph]:
    server = await FakeGraph().start()
    yield server
    await server.stop()


@pytest.fixture
async def wa(bot_engine, redis_state, fake) -> AsyncIterator[Harness]:  # noqa: F811
    from bot.web import make_app

    settings = make_bot_settings(
        bot_engine.settings,
        whatsapp_access_token=ACCESS_TOKEN,
        whatsapp_app_secret=APP_SECRET,
        whatsapp_verify_token=VERIFY_TOKEN,
        whatsapp_phone_number_id=PHONE_NUMBER_ID,
        whatsapp_api_base_url=fake.base_url,
    )
    stack = await open_stack(settings, redis_state, bot_engine)
    app = make_app(settings, stack.core, stack.search, stack.state)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    yield Harness(client, app, fake, stack)
    await client.close()
    await stack.admin.close()
    await stack.search.close()


def texts(fake: FakeGraph) -> list[str]:
    return [m["text"]["body"] for m in fake.sent if m["type"] == "text"]


# --- verification -----------------------------------------------------------------------------------------


async def test_the_verification_challenge_is_echoed_for_the_right_token(wa):
    resp = await wa.client.get("/webhooks/whatsapp", params={
        "hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1158201444"})
    assert resp.status == 200 and await resp.text() == "1158201444"


@pytest.mark.parametrize("params", [
    {"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "1"},
    {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN + "x", "hub.challenge": "1"},
    {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "1"},
    {"hub.mode": "subscribe", "hub.challenge": "1"},
    {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN},
    {},
])
async def test_a_wrong_verification_request_is_403(wa, params):
    resp = await wa.client.get("/webhooks/whatsapp", params=params)
    assert resp.status == 403
    assert await resp.text() != "1"


# --- happy path ---------------------------------------------------------------------------------------------


async def test_an_image_is_answered_with_one_image_message_per_product(wa):
    wa.photo("7001", "demo-003")
    status, _ = await wa.post(messages_payload(USER, image_message(USER, "wamid.A1", "7001")))
    assert status == 200
    top_k = wa.stack.settings.engine.top_k
    intro, *images = await wa.fake.wait_sent(1 + top_k)
    await wa.settle()

    assert intro["type"] == "interactive" and intro["to"] == USER
    assert intro["interactive"]["body"]["text"] == "Here is what I found:"
    titles = [b["reply"]["title"] for b in intro["interactive"]["action"]["buttons"]]
    assert titles == [replies.SHOW_MORE_LABEL, "More like #1"]
    assert [m["type"] for m in images] == ["image"] * top_k
    assert wa.product_url("demo-003") in images[0]["image"]["caption"]
    assert all(m["image"]["caption"].split("\n")[-1].startswith("https://") for m in images)
    # local catalog images are uploaded (JPEG) and sent by id
    assert [u["mime"] for u in wa.fake.uploads] == ["image/jpeg"] * top_k
    assert [m["image"]["id"] for m in images] == [u["id"] for u in wa.fake.uploads]
    assert wa.fake.unauthorized == 0 and len(wa.fake.sent) == 1 + top_k


async def test_uploaded_images_are_reused_for_the_next_answer(wa):
    wa.photo("7002", "demo-005")
    await wa.post(messages_payload(USER, image_message(USER, "wamid.B1", "7002")))
    await wa.settle()
    uploads = len(wa.fake.uploads)
    await wa.post(messages_payload(USER, image_message(USER, "wamid.B2", "7002")))
    await wa.settle()
    assert len(wa.fake.uploads) == uploads
    assert len(wa.fake.sent) == 2 * (1 + wa.stack.settings.engine.top_k)


async def test_uploaded_media_ids_are_shared_through_redis_with_another_process(wa, tmp_path):
    from bot.state import WA_MEDIA_TTL_S, State
    from bot.web import make_app

    wa.photo("7011", "demo-006")
    await wa.post(messages_payload(USER, image_message(USER, "wamid.S1", "7011")))
    await wa.settle()
    uploaded = {u["id"] for u in wa.fake.uploads}
    assert len(uploaded) == wa.stack.settings.engine.top_k
    keys = await wa.stack.state.client.keys(f"vsearch:wamedia:{PHONE_NUMBER_ID}:*")
    assert len(keys) == len(uploaded) and 0 < await wa.stack.state.client.ttl(keys[0]) <= WA_MEDIA_TTL_S
    # Another serving process: its own Redis connection (joining the same server), core and channel.
    state = await State.open(None, tmp_path / "redis-home")
    stack = await open_stack(wa.stack.settings, state, wa.stack.engine)
    app = make_app(stack.settings, stack.core, stack.search, state)
    other = Harness(TestClient(TestServer(app, host="127.0.0.1")), app, wa.fake, stack)
    await other.client.start_server()
    try:
        await other.post(messages_payload(USER, image_message(USER, "wamid.S2", "7011")))
        await other.settle()
    finally:
        await other.client.close()
        await stack.admin.close()
        await stack.search.close()
        await state.close()
    second = [m["image"]["id"] for m in wa.fake.sent[1 + len(uploaded):] if m["type"] == "image"]
    assert len(wa.fake.uploads) == len(uploaded) and set(second) == uploaded


async def test_with_redis_down_media_ids_are_kept_in_memory(wa):
    await wa.stack.state.client.ping()
    wa.stack.state.embedded.stop()
    wa.photo("7012", "demo-007")
    for message_id in ("wamid.T1", "wamid.T2"):
        await wa.post(messages_payload(USER, image_message(USER, message_id, "7012")))
        await wa.settle()
    top_k = wa.stack.settings.engine.top_k
    assert len(wa.fake.uploads) == top_k  # the second answer reused the first one's uploads
    assert sum(m["type"] == "image" for m in wa.fake.sent) == 2 * top_k


async def test_an_image_sent_as_a_document_is_searched_and_other_documents_get_the_hint(wa):
    wa.fake.media["7003"] = (make_png(80, 60), "image/png")
    await wa.post(messages_payload(USER, document_message(USER, "wamid.C1", "7003", "image/png"),
                                   document_message(USER, "wamid.C2", "7004", "application/pdf")))
    await wa.settle()
    assert replies.PHOTO_HINT in texts(wa.fake)
    assert sum(m["type"] == "image" for m in wa.fake.sent) == wa.stack.settings.engine.top_k


async def test_show_more_and_more_like_taps_page_through_the_results(wa):
    wa.photo("7005", "demo-009")
    await wa.post(messages_payload(USER, image_message(USER, "wamid.D1", "7005")))
    top_k = wa.stack.settings.engine.top_k
    intro, *first = await wa.fake.wait_sent(1 + top_k)
    more, like = intro["interactive"]["action"]["buttons"]

    tap = {"from": USER, "id": "wamid.D2", "timestamp": "1", "type": "interactive",
           "context": {"from": PHONE_NUMBER_ID, "id": "wamid.OUT1"},
           "interactive": {"type": "button_reply", "button_reply": more["reply"]}}
    await wa.post(messages_payload(USER, tap))
    await wa.settle()
    page2 = wa.fake.sent[1 + top_k:]
    assert page2[0]["interactive"]["body"]["text"].startswith(f"More results ({top_k + 1}-")
    captions = {m["image"]["caption"] for m in page2 if m["type"] == "image"}
    assert len(captions) == top_k and not captions & {m["image"]["caption"] for m in first}

    await wa.post(messages_payload(USER, tap))  # the same tap redelivered: answered once
    await wa.post(messages_payload(USER, tap | {"id": "wamid.D3",
                                                "interactive": {"type": "button_reply",
                                                                "button_reply": like["reply"]}}))
    await wa.settle()
    similar = wa.fake.sent[2 * (1 + top_k):]
    assert similar[0]["interactive"]["body"]["text"] == "Products like #1:"
    assert len(similar) == 1 + top_k


# --- what is ignored, deduplicated or refused ------------------------------------------------------------


async def test_status_callbacks_are_ignored(wa):
    for status in ("sent", "delivered", "read", "failed"):
        code, _ = await wa.post(status_payload(USER, status=status))
        assert code == 200
    await wa.settle()
    assert wa.fake.sent == []


async def test_unknown_objects_and_fields_get_200_and_nothing_else(wa):
    assert (await wa.post({"object": "instagram", "entry": "whatever"}))[0] == 200
    other_field = {"object": "whatsapp_business_account",
                   "entry": [{"id": "1", "changes": [{"field": "account_update", "value": {"x": 1}}]}]}
    assert (await wa.post(other_field))[0] == 200
    reaction = {"from": USER, "id": "wamid.R1", "timestamp": "1", "type": "reaction",
                "reaction": {"message_id": "wamid.OUT1", "emoji": "\U0001f44d"}}
    assert (await wa.post(messages_payload(USER, reaction)))[0] == 200
    await wa.settle()
    assert wa.fake.sent == []


async def test_the_same_message_delivered_twice_is_answered_once(wa):
    wa.photo("7006", "demo-002")
    payload = messages_payload(USER, image_message(USER, "wamid.E1", "7006"))
    await wa.post(payload)
    await wa.settle()
    sent = len(wa.fake.sent)
    await wa.post(payload)
    await wa.settle()
    assert len(wa.fake.sent) == sent == 1 + wa.stack.settings.engine.top_k


async def test_a_batch_of_messages_is_answered_message_by_message(wa):
    await wa.post(messages_payload(USER, text_message(USER, "wamid.F1", "hi"),
                                   text_message("15559998888", "wamid.F2", "hello")))
    await wa.settle()
    assert sorted(m["to"] for m in wa.fake.sent) == ["15551234567", "15559998888"]
    assert texts(wa.fake) == [replies.PHOTO_HINT] * 2


@pytest.mark.parametrize("failure", ["unknown media", "download 500", "download 403"])
async def test_a_failing_media_download_gets_a_polite_error(wa, failure):
    if failure != "unknown media":
        wa.photo("7007", "demo-002")
        wa.fake.download_status = int(failure.split()[1])
    await wa.post(messages_payload(USER, image_message(USER, "wamid.G1", "7007")))
    (answer,) = await wa.fake.wait_sent(1)
    await wa.settle()
    assert answer["text"]["body"] == replies.DOWNLOAD_FAILED and len(wa.fake.sent) == 1


async def test_a_5xx_on_send_is_retried(wa):
    wa.fake.fail_next = 2
    await wa.post(messages_payload(USER, text_message(USER, "wamid.H1", "hello")))
    (answer,) = await wa.fake.wait_sent(1)
    assert answer["text"]["body"] == replies.PHOTO_HINT


@pytest.mark.parametrize("signature", [None, "", "sha256=", "sha256=" + "0" * 64,
                                       sign_whatsapp(b"{}"), sign_whatsapp(b"x")[7:]])
async def test_forged_or_missing_signature_is_403_and_nothing_happens(wa, signature):
    wa.photo("7008", "demo-002")
    payload = messages_payload(USER, image_message(USER, "wamid.I1", "7008"))
    status, text = await wa.post(payload, signature=signature)
    await wa.settle()
    assert status == 403 and "Traceback" not in text
    assert wa.fake.sent == [] and wa.fake.uploads == [] and wa.fake.unauthorized == 0
    body = encode(payload)
    status, _ = await wa.post(raw=body, signature=sign_whatsapp(body, "another-app-secret"))
    assert status == 403


async def test_an_oversized_body_is_413(wa):
    status, _ = await wa.post(messages_payload(USER, text_message(USER, "wamid.J1", "x" * MAX_BODY_BYTES)))
    assert status == 413
    await wa.settle()
    assert wa.fake.sent == []


def _msg(**changes: Any) -> bytes:
    message = text_message(USER, "wamid.K1", "hi") | changes
    return encode(messages_payload(USER, message))


@pytest.mark.parametrize("body", [
    b"",
    b"{\"object\": ",
    b"null",
    encode({"entry": []}),  # no object
    encode({"object": "whatsapp_business_account"}),  # no entry
    encode({"object": "whatsapp_business_account", "entry": {"id": 1}}),
    encode({"object": "whatsapp_business_account", "entry": [{"id": "1"}]}),
    encode({"object": "whatsapp_business_account", "entry": [{"changes": [{"field": "messages"}]}]}),
    encode({"object": "whatsapp_business_account", "entry": [{"changes": [{"field": "messages",
                                                                           "value": {"messages": {}}}]}]}),
    _msg(**{"from": 15551234567}),
    _msg(id=None),
    _msg(type=["text"]),
    _msg(text="hi"),
    _msg(type="image", image={"mime_type": "image/jpeg"}),
    _msg(type="image", image={"id": "../../etc/passwd"}),
])
async def test_malformed_signed_bodies_are_400_without_a_traceback(wa, body):
    status, text = await wa.post(raw=body)
    await wa.settle()
    assert status == 400, text
    assert "Traceback" not in text and len(text) < 300
    assert wa.fake.sent == []


# --- admin words ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["/reindex", "reindex", "Status", "stats"])
async def test_admin_words_from_a_non_admin_are_refused(wa, word):
    await wa.post(messages_payload(USER, text_message(USER, "wamid.L1", word)))
    (answer,) = await wa.fake.wait_sent(1)
    assert answer["text"]["body"] == replies.NOT_ADMIN
    assert not wa.stack.admin.running_here


async def test_stats_from_an_admin_counts_the_searches(wa):
    wa.photo("7009", "demo-004")
    await wa.post(messages_payload(ADMIN, image_message(ADMIN, "wamid.M1", "7009")))
    await wa.settle()
    sent = len(wa.fake.sent)
    await wa.post(messages_payload(ADMIN, text_message(ADMIN, "wamid.M2", "stats")))
    await wa.settle()
    (answer,) = wa.fake.sent[sent:]
    assert answer["to"] == ADMIN
    assert "whatsapp / ok: 1" in answer["text"]["body"]


# --- pure pieces ---------------------------------------------------------------------------------------


def test_parse_events_walks_every_entry_change_and_message():
    body = messages_payload(USER, text_message(USER, "wamid.1", "a"), image_message(USER, "wamid.2", "55"))
    body["entry"].append(status_payload(USER)["entry"][0])
    body["entry"].append(messages_payload("4912345", text_message("4912345", "wamid.3", "b"))["entry"][0])
    events = parse_events(body)
    assert [(type(e).__name__, e.message_id) for e in events] == [("Text", "wamid.1"), ("Image", "wamid.2"),
                                                                 ("Text", "wamid.3")]


def test_captions_keep_the_url_whole_within_1024_characters():
    url = "https://shop.example/p/" + "x" * 100
    long = ProductCard(rank=1, product_id="p", title="T" * 2000, price_text="1.00 EUR", url=url,
                       image_url=None, image_path=None, caption="1. " + "T" * 2000 + "\n1.00 EUR\n" + url)
    caption = card_caption(long)
    assert len(caption) <= 1024 and caption.endswith("\n" + url)
    message = {"messaging_product": "whatsapp", "to": USER, "type": "image", "image": {"id": "1", "caption": caption}}
    assert check_message(message) is None


def test_upload_payload_passes_jpeg_through_and_reencodes_webp(tmp_path: Path):
    jpg = tmp_path / "a.jpg"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(jpg)
    assert upload_payload(jpg) == (jpg.read_bytes(), "image/jpeg", "a.jpg")
    webp = tmp_path / "b.webp"
    Image.new("RGB", (40, 30), (10, 200, 10)).save(webp)
    data, mime, name = upload_payload(webp)
    assert mime == "image/jpeg" and name == "b.jpg" and data[:3] == b"\xff\xd8\xff"


async def test_no_secret_reaches_the_logs(wa, caplog):
    caplog.set_level("DEBUG")
    wa.photo("7010", "demo-006")
    wa.fake.fail_next = 1
    await wa.post(messages_payload(USER, image_message(USER, "wamid.N1", "7010")))
    await wa.post(messages_payload(USER, image_message(USER, "wamid.N2", "404404")))
    await wa.post(messages_payload(USER, text_message(USER, "wamid.N3", "hi")), signature="sha256=00")
    await wa.client.get("/webhooks/whatsapp", params={"hub.mode": "subscribe", "hub.verify_token": "guess",
                                                      "hub.challenge": "5"})
    await wa.settle()
    assert "retry" in caplog.text  # the 5xx was logged...
    for secret in (ACCESS_TOKEN, APP_SECRET, VERIFY_TOKEN):
        assert secret not in caplog.text  # ...without any secret
