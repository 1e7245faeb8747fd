"""ChatCore over a real index and a real Redis: photos, paging, "More like", text, admin refusals, failures."""

from __future__ import annotations

import image_factories as f

from bot import replies
from bot.core import parse_command
from bot.replies import decode_callback, encode_callback
from bot.state import RATE_CAPACITY

pytest_plugins = ["bot_fixtures"]


def photo(data: bytes):
    async def get() -> bytes:
        return data

    return get


async def test_photo_gets_top_k_cards_with_urls(bot_stack):
    core, engine = bot_stack.core, bot_stack.engine
    reply = await core.on_photo("telegram", "500", "m1", photo(engine.image_bytes("demo-007")))
    assert reply is not None and not reply.is_error
    assert len(reply.cards) == 3 and [c.rank for c in reply.cards] == [1, 2, 3]
    assert reply.cards[0].product_id == "demo-007"
    for card in reply.cards:
        product = engine.searcher.product(card.product_id)
        assert card.url == product.url and card.url in card.caption
        assert card.image_path is not None and card.image_path.is_file()
        assert card.price_text and card.price_text.endswith("EUR")
    assert reply.page_token and reply.next_offset == 3
    assert decode_callback(encode_callback("more", reply.page_token, reply.next_offset)) is not None
    assert await bot_stack.state.counters() == {"telegram:ok": 1}


async def test_duplicate_delivery_is_answered_once(bot_stack):
    data = bot_stack.engine.image_bytes("demo-001")
    assert await bot_stack.core.on_photo("viber", "u1", "same-token", photo(data)) is not None
    assert await bot_stack.core.on_photo("viber", "u1", "same-token", photo(data)) is None
    assert await bot_stack.core.on_text("viber", "u1", "text-1", "hello") is not None
    assert await bot_stack.core.on_text("viber", "u1", "text-1", "hello") is None


async def test_show_more_pages_and_is_bound_to_the_user(bot_stack):
    core = bot_stack.core
    first = await core.on_photo("telegram", "600", "m1", photo(bot_stack.engine.image_bytes("demo-002")))
    seen = [c.product_id for c in first.cards]
    offset, pages = first.next_offset, 1
    while offset is not None:
        page = await core.on_more("telegram", "600", first.page_token, offset)
        assert not page.is_error and page.cards[0].rank == offset + 1
        seen += [c.product_id for c in page.cards]
        offset, pages = page.next_offset, pages + 1
    assert pages == 5 and len(seen) == 15 and len(set(seen)) == 15  # list of 5 x top_k, no repeats
    assert all(c.url in c.caption for c in page.cards)
    # Another user (or channel) replaying the token gets the polite "expired" answer, not the results.
    stolen = await core.on_more("telegram", "601", first.page_token, 3)
    assert stolen.is_error and stolen.text == replies.PAGE_EXPIRED and not stolen.cards
    assert (await core.on_more("viber", "600", first.page_token, 3)).text == replies.PAGE_EXPIRED
    assert (await core.on_similar("telegram", "601", first.page_token, 1)).text == replies.PAGE_EXPIRED
    assert (await core.on_more("telegram", "600", "forgedToken1", 3)).text == replies.PAGE_EXPIRED


async def test_more_like_a_result(bot_stack):
    core = bot_stack.core
    first = await core.on_photo("whatsapp", "15550002222", "w1", photo(bot_stack.engine.image_bytes("demo-003")))
    like = await core.on_similar("whatsapp", "15550002222", first.page_token, 1)
    assert not like.is_error and len(like.cards) == 3
    assert first.cards[0].product_id not in [c.product_id for c in like.cards]
    assert like.page_token and like.page_token != first.page_token
    assert (await core.on_more("whatsapp", "15550002222", like.page_token, 3)).cards
    assert (await core.on_similar("whatsapp", "15550002222", first.page_token, 99)).is_error


async def test_rate_limit_answers_politely(bot_stack):
    core, data = bot_stack.core, f.make_jpeg()
    answers = [await core.on_photo("telegram", "700", f"r{i}", photo(data)) for i in range(RATE_CAPACITY + 1)]
    assert answers[-1].is_error and answers[-1].text == replies.RATE_LIMITED
    assert not any(a.text == replies.RATE_LIMITED for a in answers[:-1])


async def test_bad_photo_and_failed_download_get_friendly_errors(bot_stack):
    core = bot_stack.core
    bad = await core.on_photo("telegram", "800", "b1", photo(b"GIF89a but not really"))
    assert bad.is_error and "could not use that picture" in bad.text and not bad.cards

    async def broken() -> bytes:
        raise ConnectionResetError("media server hung up")

    failed = await core.on_photo("viber", "800", "b2", broken)
    assert failed.is_error and failed.text == replies.DOWNLOAD_FAILED
    counters = await bot_stack.state.counters()
    assert counters["telegram:bad_image"] == 1 and counters["viber:download_failed"] == 1


async def test_text_help_and_hint(bot_stack):
    core = bot_stack.core
    assert (await core.on_text("telegram", "1", "t1", "/start")).text == replies.HELP_TEXT
    assert (await core.on_text("telegram", "1", "t2", "/help@shop_bot")).text == replies.HELP_TEXT
    assert (await core.on_text("viber", "1", "t3", "do you have red shoes?")).text == replies.PHOTO_HINT
    assert parse_command("  /Reindex now") == "reindex" and parse_command("status") == "status"
    assert parse_command("reindexing") is None


async def test_admin_commands_are_refused_to_others_and_per_channel(bot_stack):
    core = bot_stack.core
    for channel, user in [("telegram", "999"), ("viber", "1001"), ("whatsapp", "1001")]:
        for command in ("/reindex", "/status", "/stats", "reindex"):
            reply = await core.on_text(channel, user, f"{channel}{user}{command}", command)
            assert reply.is_error and reply.text == replies.NOT_ADMIN
    # "telegram:1001" is an admin on Telegram only: the same id on Viber is nobody.
    assert core.is_admin("telegram", "1001") and not core.is_admin("viber", "1001")
    assert not bot_stack.admin.running_here


async def test_status_and_stats_for_an_admin(bot_stack):
    core = bot_stack.core
    await core.on_photo("telegram", "5", "s1", photo(bot_stack.engine.image_bytes("demo-004")))
    status = await core.on_text("telegram", "1001", "s2", "/status")
    assert bot_stack.engine.version in status.text and "Products: 16" in status.text
    assert "Redis: ok" in status.text and "not running" in status.text
    stats = await core.on_text("whatsapp", "15550001111", "s3", "stats")
    assert "telegram / ok: 1" in stats.text


async def test_engine_failure_gives_an_error_reply_and_others_go_on(bot_stack, monkeypatch):
    core = bot_stack.core

    async def exploding(image_bytes, top_k):
        raise RuntimeError("engine fault")

    monkeypatch.setattr(bot_stack.search, "search", exploding)
    reply = await core.on_photo("telegram", "11", "e1", photo(f.make_jpeg()))
    assert reply.is_error and reply.text == replies.SEARCH_FAILED and "engine fault" not in reply.text
    monkeypatch.undo()
    ok = await core.on_photo("telegram", "12", "e2", photo(bot_stack.engine.image_bytes("demo-005")))
    assert not ok.is_error and ok.cards[0].product_id == "demo-005"


async def test_redis_down_still_answers_photos(bot_stack):
    await bot_stack.state.client.set("vsearch:probe", "1")
    bot_stack.state.embedded.stop()
    reply = await bot_stack.core.on_photo("telegram", "13", "d1", photo(bot_stack.engine.image_bytes("demo-006")))
    assert not reply.is_error and reply.cards[0].product_id == "demo-006"
    assert reply.page_token is None and reply.next_offset is None  # no paging without Redis
    assert all(c.url in c.caption for c in reply.cards)
