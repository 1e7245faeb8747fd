"""The Telegram channel end to end: the real python-telegram-bot Application against a fake Bot API on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import ClientSession, web
from fake_telegram import (
    TOKEN,
    Call,
    FakeTelegram,
    buttons,
    callback_update,
    command_update,
    document_update,
    photo_update,
    text_update,
)
from PIL import Image

from bot import replies
from bot.replies import image_cache_key
from bot.telegram import SECRET_HEADER, RetryPolicy, TelegramChannel, pick_photo, split_text
from engine.errors import VsearchError

if TYPE_CHECKING:
    from bot_fixtures import BotStack

pytest_plugins = ["bot_fixtures"]

ADMIN_CHAT = 1001  # "telegram:1001" is an admin in bot_fixtures.ADMIN_IDS
FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2)


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    server = FakeTelegram()
    await server.start()
    yield server
    await server.close()


@contextlib.asynccontextmanager
async def running_channel(stack: BotStack, fake: FakeTelegram, **changes: Any) -> AsyncIterator[TelegramChannel]:
    settings = dataclasses.replace(
        stack.settings,
        telegram_bot_token=TOKEN,
        telegram_api_base_url=fake.base_url,
        telegram_file_base_url=fake.file_base_url,
        **changes,
    )
    channel = TelegramChannel(settings, stack.core, stack.state, retry=FAST_RETRY, poll_timeout=1.0)
    await channel.start()
    try:
        yield channel
    finally:
        await channel.stop()


@pytest.fixture
async def bot(bot_stack, fake) -> AsyncIterator[tuple[FakeTelegram, BotStack]]:
    """A polling bot over the session index (top_k 3)."""
    async with running_channel(bot_stack, fake):
        yield fake, bot_stack


async def answer(fake: FakeTelegram, chat_id: int, count: int = 1) -> Call:
    """The `count`-th message with buttons sent to the chat (the message that ends a product answer)."""
    for _ in range(200):
        with_buttons = [c for c in fake.sent_to(chat_id) if c.method == "sendMessage" and c.params.get("reply_markup")]
        if len(with_buttons) >= count:
            return with_buttons[count - 1]
        await fake.wait_for("sendMessage", chat_id=chat_id, count=len(fake.calls_of("sendMessage", chat_id)) + 1)
    raise AssertionError("no answer with buttons")


async def wait_until(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def texts_to(fake: FakeTelegram, chat_id: int, count: int = 1) -> list[str]:
    calls = await fake.wait_for("sendMessage", count=count, chat_id=chat_id)
    return [c.params["text"] for c in calls]


def url_buttons(call: Call) -> list[str]:
    return [b["url"] for b in buttons(call) if "url" in b]


def callback_buttons(call: Call) -> dict[str, str]:
    return {b["text"]: b["callback_data"] for b in buttons(call) if "callback_data" in b}


def product_url(stack: BotStack, product_id: str) -> str:
    return stack.engine.searcher.product(product_id).url


def as_png(jpeg: bytes) -> bytes:
    out = io.BytesIO()
    with Image.open(io.BytesIO(jpeg)) as image:
        image.save(out, "PNG")
    return out.getvalue()


# -- photos in, products out --------------------------------------------------------------------------


async def test_photo_is_answered_with_an_album_and_one_link_button_per_product(bot):
    fake, stack = bot
    chat = 501
    fake.enqueue(photo_update(fake, chat, stack.engine.image_bytes("demo-003")))

    done = await answer(fake, chat)

    urls = url_buttons(done)
    assert len(urls) == 3  # top_k
    assert urls[0] == product_url(stack, "demo-003")  # the product whose photo was sent comes first
    album = fake.calls_of("sendMediaGroup", chat)
    assert len(album) == 1 and album[0].at < done.at
    media = album[0].params["media"]
    assert [m["type"] for m in media] == ["photo"] * 3
    titles = [stack.engine.searcher.product(u.rsplit("/", 1)[1]).title for u in urls]
    for item, title in zip(media, titles, strict=True):
        assert title in item["caption"] and "EUR" in item["caption"]
    # local product images were uploaded as real image files
    assert len(album[0].files) == 3
    for upload in album[0].files.values():
        with Image.open(io.BytesIO(upload.data)) as image:
            assert image.format == "JPEG"
    # "More like #1" and "Show more" carry callbacks the core can decode
    actions = callback_buttons(done)
    assert set(actions) == {"More like #1", replies.SHOW_MORE_LABEL}
    assert replies.decode_callback(actions["More like #1"])[0::2] == ("like", 1)
    assert replies.decode_callback(actions[replies.SHOW_MORE_LABEL])[0::2] == ("more", 3)
    # the upload_photo action came first, and the largest photo size was the one downloaded
    first_action = fake.calls_of("sendChatAction", chat)[0]
    assert first_action.params["action"] == "upload_photo"
    (get_file,) = fake.calls_of("getFile")
    assert first_action.at <= get_file.at
    assert fake.file_data(get_file.params["file_id"]) == stack.engine.image_bytes("demo-003")


async def test_local_product_image_is_uploaded_once_then_sent_by_file_id(bot):
    fake, stack = bot
    chat = 502
    photo = stack.engine.image_bytes("demo-005")
    fake.enqueue(photo_update(fake, chat, photo))
    first = await answer(fake, chat)
    fake.enqueue(photo_update(fake, chat, photo))  # a new message with the same photo
    second = await answer(fake, chat, count=2)

    assert url_buttons(first) == url_buttons(second)
    albums = fake.calls_of("sendMediaGroup", chat)
    assert len(albums) == 2
    assert len(albums[0].files) == 3
    assert albums[1].files == {}  # nothing uploaded again
    file_ids = [m["media"] for m in albums[1].params["media"]]
    assert all(fake.was_issued(f) for f in file_ids), file_ids
    assert len(set(file_ids)) == 3


async def test_stale_cached_file_id_is_uploaded_again(bot):
    fake, stack = bot
    chat = 519
    photo = stack.engine.image_bytes("demo-012")
    fake.enqueue(photo_update(fake, chat, photo))
    first = await answer(fake, chat)
    top = stack.search.product(url_buttons(first)[0].rsplit("/", 1)[1])
    key = image_cache_key(stack.search.local_image_path(top))
    await stack.state.set_telegram_file_id(key, "STALE-file-id")  # e.g. the file_id of another bot token

    fake.enqueue(photo_update(fake, chat, photo))
    second = await answer(fake, chat, count=2)

    assert url_buttons(second) == url_buttons(first)
    albums = [c for c in fake.calls if c.method == "sendMediaGroup"]
    assert [c.status for c in albums] == [200, 400, 200]
    assert len(albums[2].files) == 3  # the cached pictures were uploaded again ...
    fresh = await stack.state.telegram_file_id(key)
    assert fresh != "STALE-file-id" and fake.was_issued(fresh)  # ... and their new file_ids remembered


async def test_remote_image_is_passed_as_a_url_and_a_single_card_as_a_photo(bot_stack, fake):
    chat = 520
    card = replies.ProductCard(
        rank=1, product_id="p1", title="Trail Runner", price_text="89.00 EUR",
        url="https://shop.example/p/p1", image_url="https://cdn.shop.example/p1.jpg", image_path=None,
        caption=replies.card_caption(1, "Trail Runner", "89.00 EUR", "https://shop.example/p/p1"),
    )
    async with running_channel(bot_stack, fake) as channel:
        await channel.send_reply(chat, replies.Reply(text="Here is what I found:", cards=(card,)))

    (photo,) = fake.calls_of("sendPhoto", chat)
    assert photo.params["photo"] == "https://cdn.shop.example/p1.jpg" and photo.files == {}
    assert "Trail Runner" in photo.params["caption"] and "89.00 EUR" in photo.params["caption"]
    assert fake.calls_of("sendMediaGroup", chat) == []
    (links,) = fake.calls_of("sendMessage", chat)
    assert url_buttons(links) == ["https://shop.example/p/p1"]
    assert callback_buttons(links) == {}  # nothing stored to page through


async def test_image_sent_as_a_document_is_searched(bot):
    fake, stack = bot
    chat = 503
    fake.enqueue(document_update(fake, chat, as_png(stack.engine.image_bytes("demo-007")), "image/png", "shoe.png"))

    done = await answer(fake, chat)

    assert url_buttons(done)[0] == product_url(stack, "demo-007")
    assert fake.calls_of("sendChatAction", chat)[0].params["action"] == "upload_photo"


async def test_animation_is_not_taken_for_an_image_document(bot):
    fake, stack = bot
    chat = 504
    gif = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 0, 0)).save(gif, "GIF")
    fake.enqueue(document_update(fake, chat, gif.getvalue(), "image/gif", "funny.gif", animation=True))

    assert await texts_to(fake, chat) == [replies.PHOTO_HINT]
    assert fake.calls_of("getFile") == []


# -- text, commands ---------------------------------------------------------------------------------


async def test_text_gets_a_hint_and_start_and_help_explain_the_bot(bot):
    fake, _ = bot
    chat = 505
    fake.enqueue(text_update(chat, "hello, do you have red boots?"))
    assert await texts_to(fake, chat) == [replies.PHOTO_HINT]
    fake.enqueue(command_update(chat, "/start"))
    fake.enqueue(command_update(chat, "/help@vsearch_test_bot"))
    texts = await texts_to(fake, chat, count=3)
    assert texts[1:] == [replies.HELP_TEXT, replies.HELP_TEXT]
    assert all(not c.params.get("reply_markup") for c in fake.calls_of("sendMessage", chat))


async def test_corrupt_photo_gets_a_friendly_reason_and_the_bot_carries_on(bot):
    fake, stack = bot
    chat = 506
    fake.enqueue(photo_update(fake, chat, b"\xff\xd8\xff\xe0 this is not really a JPEG" * 20))
    (text,) = await texts_to(fake, chat)
    assert text.startswith("I could not use that picture") and "JPEG or PNG" in text

    fake.enqueue(photo_update(fake, chat, stack.engine.image_bytes("demo-002")))
    done = await answer(fake, chat)
    assert url_buttons(done)[0] == product_url(stack, "demo-002")


# -- callbacks --------------------------------------------------------------------------------------


async def test_show_more_pages_further_down_the_same_list(bot):
    fake, stack = bot
    chat = 507
    fake.enqueue(photo_update(fake, chat, stack.engine.image_bytes("demo-004")))
    first = await answer(fake, chat)

    fake.enqueue(callback_update(chat, callback_buttons(first)[replies.SHOW_MORE_LABEL]))
    second = await answer(fake, chat, count=2)

    assert len(fake.calls_of("answerCallbackQuery")) == 1
    assert second.params["text"] == "More results (4-6):"
    assert len(url_buttons(second)) == 3
    assert not set(url_buttons(first)) & set(url_buttons(second))
    assert "More like #4" in callback_buttons(second)
    assert len(fake.calls_of("sendMediaGroup", chat)) == 2


async def test_last_page_with_one_product_is_sent_as_a_single_photo(bot):
    fake, stack = bot
    chat = 521
    fake.enqueue(photo_update(fake, chat, stack.engine.image_bytes("demo-013")))
    first = await answer(fake, chat)
    _, token, _ = replies.decode_callback(callback_buttons(first)[replies.SHOW_MORE_LABEL])
    last = stack.core.list_size - 1  # offset of the last stored result

    fake.enqueue(callback_update(chat, replies.encode_callback("more", token, last)))
    final = await answer(fake, chat, count=2)

    assert len(url_buttons(final)) == 1
    assert replies.SHOW_MORE_LABEL not in callback_buttons(final)
    (photo,) = fake.calls_of("sendPhoto", chat)
    assert photo.params["caption"].startswith(f"{last + 1}. ")


async def test_more_like_first_result_searches_from_that_product(bot):
    fake, stack = bot
    chat = 508
    fake.enqueue(photo_update(fake, chat, stack.engine.image_bytes("demo-006")))
    first = await answer(fake, chat)

    fake.enqueue(callback_update(chat, callback_buttons(first)["More like #1"]))
    similar = await answer(fake, chat, count=2)

    assert fake.calls_of("answerCallbackQuery")
    assert similar.params["text"] == "Products like #1:"
    urls = url_buttons(similar)
    assert len(urls) == 3 and product_url(stack, "demo-006") not in urls


async def test_another_user_cannot_open_someone_elses_results(bot):
    fake, stack = bot
    owner, intruder = 509, 510
    fake.enqueue(photo_update(fake, owner, stack.engine.image_bytes("demo-008")))
    first = await answer(fake, owner)
    data = callback_buttons(first)[replies.SHOW_MORE_LABEL]

    fake.enqueue(callback_update(intruder, data))
    (text,) = await texts_to(fake, intruder)

    assert text == replies.PAGE_EXPIRED
    assert fake.calls_of("answerCallbackQuery")
    assert fake.calls_of("sendMediaGroup", intruder) == [] and fake.calls_of("sendPhoto", intruder) == []


async def test_forged_callback_data_is_answered_and_ignored(bot):
    fake, _ = bot
    chat = 511
    fake.enqueue(callback_update(chat, "more:../../etc:1"))
    (call,) = await fake.wait_for("answerCallbackQuery")
    assert call.params.get("text") == replies.PAGE_EXPIRED
    await asyncio.sleep(0.3)
    assert fake.sent_to(chat) == []


# -- platform faults --------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")  # raised inside PTB's RetryAfter
async def test_flood_control_retry_after_is_honoured_and_the_answer_arrives(bot):
    fake, stack = bot
    chat = 512
    fake.flood("sendMediaGroup", retry_after=1)
    fake.enqueue(photo_update(fake, chat, stack.engine.image_bytes("demo-009")))

    done = await answer(fake, chat)

    tries = [c for c in fake.calls if c.method == "sendMediaGroup"]
    assert [c.status for c in tries] == [429, 200]
    assert tries[1].at - tries[0].at >= 1.0
    assert url_buttons(done)[0] == product_url(stack, "demo-009")


async def test_server_errors_are_retried_with_backoff(bot):
    fake, _ = bot
    chat = 513
    fake.fail_next("sendMessage", 502, "Bad Gateway", times=2)
    fake.enqueue(text_update(chat, "hi"))

    assert await texts_to(fake, chat) == [replies.PHOTO_HINT]
    assert [c.status for c in fake.calls if c.method == "sendMessage"] == [502, 502, 200]


async def test_final_errors_are_not_retried(bot):
    fake, _ = bot
    chat = 522
    fake.fail_next("sendMessage", 400, "Bad Request: chat not found")
    fake.enqueue(text_update(chat, "hi"))
    fake.enqueue(text_update(chat, "hi again"))

    await fake.wait_for("sendMessage", chat_id=chat)  # the second message is answered
    await asyncio.sleep(0.5)
    assert [c.status for c in fake.calls if c.method == "sendMessage"] == [400, 200]


async def test_blocked_user_is_not_retried_and_logged_once(bot, caplog):
    fake, _ = bot
    chat = 514
    fake.block(chat)
    caplog.set_level(logging.WARNING, logger="bot.telegram")
    fake.enqueue(text_update(chat, "hi"))
    fake.enqueue(text_update(chat, "hello?"))

    await wait_until(lambda: len([c for c in fake.calls if c.method == "sendMessage"]) >= 2)
    await asyncio.sleep(0.5)  # a retry, if any, would come within this time (backoff <= 0.2 s)

    sends = [c for c in fake.calls if c.method == "sendMessage"]
    assert [c.status for c in sends] == [403, 403]  # one try per message, no retry
    assert len([r for r in caplog.records if "refuses messages" in r.getMessage()]) == 1


async def test_graceful_stop_answers_the_photo_in_flight(bot_stack, fake):
    chat = 515
    async with running_channel(bot_stack, fake):
        fake.enqueue(photo_update(fake, chat, bot_stack.engine.image_bytes("demo-010")))
        await fake.wait_for("getFile")
    # stop() returned: the answer must already be out
    assert [c for c in fake.sent_to(chat) if c.params.get("reply_markup")]


# -- admin ------------------------------------------------------------------------------------------


def renamed_catalog(folder: Path) -> Path:
    """A fresh demo catalog whose products live at other ids and URLs, so answers show which index served."""
    from indexer.demo import make_demo_catalog

    return make_demo_catalog(
        folder, products=28, image_size=200, id_prefix="new", url_template="https://new-shop.example/p/{id}"
    )


@pytest.fixture
async def writable_stack(tmp_path, demo_catalog, extractor, redis_state) -> AsyncIterator[BotStack]:
    """A stack over its own index (so /reindex may replace it), rebuilding from a renamed catalog."""
    from bot_fixtures import build_engine, make_bot_settings, open_stack

    engine = await asyncio.to_thread(build_engine, demo_catalog, tmp_path / "data", extractor)
    new_catalog = renamed_catalog(tmp_path / "new-catalog")
    settings = make_bot_settings(dataclasses.replace(engine.settings, catalog=str(new_catalog)))
    stack = await open_stack(settings, redis_state, engine)
    stack.admin.progress_every_s = 0.05  # show every build step, not one per 3 s
    yield stack
    await stack.admin.close()
    await stack.search.close()


async def test_admin_reindex_shows_progress_and_switches_the_index(writable_stack, fake):
    stack = writable_stack
    old_version = stack.search.index_version
    async with running_channel(stack, fake):
        fake.enqueue(command_update(ADMIN_CHAT, "/reindex"))
        started = await texts_to(fake, ADMIN_CHAT)
        assert started[0].startswith("Reindex started from")

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            edits = fake.calls_of("editMessageText", ADMIN_CHAT)
            if edits and edits[-1].params["text"].startswith("Reindex finished"):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"no summary; sent: {[c.params.get('text') for c in fake.sent_to(ADMIN_CHAT)]}")

        progress = [c for c in fake.calls_of("sendMessage", ADMIN_CHAT) if c.params["text"].startswith("Reindexing:")]
        assert len(progress) == 1  # one progress message, then edits of it
        edits = fake.calls_of("editMessageText", ADMIN_CHAT)
        message_ids = {c.params["message_id"] for c in edits}
        assert len(message_ids) == 1
        assert "products" in edits[-1].params["text"] and "images indexed" in edits[-1].params["text"]
        assert stack.search.index_version != old_version

        new_photo = (Path(stack.settings.engine.catalog).parent / "images" / "new-003-1.jpg").read_bytes()
        fake.enqueue(photo_update(fake, ADMIN_CHAT + 1, new_photo))
        done = await answer(fake, ADMIN_CHAT + 1)
        assert url_buttons(done)[0] == "https://new-shop.example/p/new-003"
        assert all(u.startswith("https://new-shop.example/") for u in url_buttons(done))


async def test_reindex_by_someone_else_is_refused_and_nothing_runs(bot):
    fake, stack = bot
    chat = 1002
    version = stack.search.index_version
    for command in ("/reindex", "/status", "/stats"):
        fake.enqueue(command_update(chat, command))
    texts = await texts_to(fake, chat, count=3)

    assert texts == [replies.NOT_ADMIN] * 3
    assert stack.admin.task is None
    assert not await stack.state.reindex_running()
    assert stack.search.index_version == version


async def test_admin_status_and_stats(bot):
    fake, stack = bot
    fake.enqueue(command_update(ADMIN_CHAT, "/status"))
    (status,) = await texts_to(fake, ADMIN_CHAT)
    assert stack.search.index_version in status and "Products: 16" in status


# -- webhook mode -----------------------------------------------------------------------------------


@pytest.fixture
async def webhook_bot(bot_stack, fake) -> AsyncIterator[tuple[FakeTelegram, str]]:
    from bot_fixtures import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}/hooks/telegram-7f3a"
    app = web.Application()
    async with running_channel(bot_stack, fake, telegram_webhook_url=url, telegram_webhook_secret="s3cret_Token-1") as channel:
        channel.register_routes(app)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            yield fake, url
        finally:
            await runner.cleanup()


async def test_webhook_with_the_right_secret_is_answered(webhook_bot, bot_stack):
    fake, url = webhook_bot
    assert fake.webhook_url == url and fake.webhook_secret == "s3cret_Token-1"
    assert fake.calls_of("setWebhook")[0].params["allowed_updates"] == ["message", "callback_query"]

    response = await fake.deliver_webhook(text_update(516, "hi"))
    assert response.status == 200
    assert await texts_to(fake, 516) == [replies.PHOTO_HINT]

    response = await fake.deliver_webhook(photo_update(fake, 516, bot_stack.engine.image_bytes("demo-011")))
    assert response.status == 200
    done = await answer(fake, 516)
    assert url_buttons(done)[0] == product_url(bot_stack, "demo-011")


async def test_webhook_with_a_wrong_or_missing_secret_is_rejected(webhook_bot):
    fake, url = webhook_bot
    for secret in ("s3cret_Token-2", None, ""):
        response = await fake.deliver_webhook(text_update(517, "hi"), secret=secret)
        assert response.status == 403
    async with ClientSession() as session:
        headers = {SECRET_HEADER: "s3cret_Token-1", "Content-Type": "application/json"}
        async with session.post(url, data=b"{not json", headers=headers) as resp:
            assert resp.status == 400
        async with session.post(url, data=b"x" * 1_100_000, headers=headers) as resp:
            assert resp.status == 413
    await asyncio.sleep(0.3)
    assert fake.sent_to(517) == []


async def test_webhook_redelivery_is_answered_once(webhook_bot):
    fake, _ = webhook_bot
    update = text_update(518, "hi")
    update["update_id"] = 777
    for _ in range(2):
        assert (await fake.deliver_webhook(update)).status == 200
    await texts_to(fake, 518)
    await asyncio.sleep(0.3)
    assert len(fake.calls_of("sendMessage", 518)) == 1


async def test_a_wrong_token_or_webhook_url_stops_start_up_with_a_hint(bot_stack, fake):
    settings = dataclasses.replace(
        bot_stack.settings, telegram_bot_token="999:WRONG", telegram_api_base_url=fake.base_url,
        telegram_file_base_url=fake.file_base_url,
    )
    with pytest.raises(VsearchError, match="TELEGRAM_BOT_TOKEN"):
        await TelegramChannel(settings, bot_stack.core, bot_stack.state).start()

    with pytest.raises(VsearchError, match="TELEGRAM_WEBHOOK_URL"):
        async with running_channel(bot_stack, fake, telegram_webhook_url="http://shop.example:8080/tg"):
            pass
    assert fake.webhook_url == ""


# -- pure helpers -----------------------------------------------------------------------------------


def test_pick_photo_takes_the_largest_downloadable_size():
    from telegram import PhotoSize

    sizes = [
        PhotoSize("b", "ub", 1280, 960, file_size=200_000),
        PhotoSize("huge", "uh", 5000, 5000, file_size=30 * 1024 * 1024),
        PhotoSize("a", "ua", 90, 68, file_size=2_000),
    ]
    assert pick_photo(sizes).file_id == "b"


def test_split_text_keeps_messages_under_the_limit():
    text = "\n".join(f"line {i} " + "x" * 50 for i in range(200))
    parts = split_text(text, limit=500)
    assert all(len(p) <= 500 for p in parts)
    assert "\n".join(parts) == text
