"""State over a real embedded Redis: dedupe, token bucket, pages bound to the user, locks, degraded mode and reconnect."""

from __future__ import annotations

import asyncio
import logging

from bot.state import PAGE_TTL_S, RATE_CAPACITY, WA_MEDIA_TTL_S, State

pytest_plugins = ["bot_fixtures"]


async def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await condition():
            return True
        await asyncio.sleep(0.1)
    return False


async def test_embedded_server_lives_under_the_data_dir(tmp_path):
    state = await State.open(None, tmp_path / "data")
    try:
        assert state.embedded is not None and state.embedded.process is not None
        assert (tmp_path / "data" / "redis" / "redis.conf").is_file()
        assert await state.ping() and state.healthy
        # A second process (here: a second State) joins the running server instead of starting another.
        other = await State.open(None, tmp_path / "data")
        assert other.embedded.process is None
        await state.client.set("vsearch:probe", "1")
        assert await other.client.get("vsearch:probe") == "1"
        await other.close()
    finally:
        await state.close()
    assert state.embedded.process is None


async def test_dedupe_answers_each_message_once(redis_state):
    assert await redis_state.first_delivery("viber", "m-1")
    assert not await redis_state.first_delivery("viber", "m-1")
    assert await redis_state.first_delivery("whatsapp", "m-1")  # ids are per channel
    ttl = await redis_state.client.ttl("vsearch:seen:viber:m-1")
    assert 23 * 3600 < ttl <= 24 * 3600


async def test_token_bucket_limits_each_user(redis_state):
    allowed = [await redis_state.allow_photo("telegram", "42") for _ in range(RATE_CAPACITY + 3)]
    assert allowed[:RATE_CAPACITY] == [True] * RATE_CAPACITY
    assert allowed[RATE_CAPACITY:] == [False] * 3
    assert 0 < await redis_state.rate_limit_wait("telegram", "42") <= 60 / RATE_CAPACITY  # seconds to the next token
    assert await redis_state.allow_photo("telegram", "43")  # another user has a full bucket
    # The limits are parameters (the HTTP API uses the same bucket per client address).
    assert [await redis_state.rate_limit_wait("web", "10.0.0.1", 2, 60.0) == 0 for _ in range(3)] == [True, True, False]
    assert await redis_state.client.ttl("vsearch:rate:telegram:42") > 0
    # Refill: pretend the last take was 30 s ago -> about 5 tokens back (10 a minute).
    ts = int(await redis_state.client.hget("vsearch:rate:telegram:42", "ts"))
    await redis_state.client.hset("vsearch:rate:telegram:42", "ts", str(ts - 30_000))
    refilled = [await redis_state.allow_photo("telegram", "42") for _ in range(8)]
    assert 4 <= sum(refilled) <= 6


async def test_pages_are_bound_to_channel_and_user(redis_state):
    entries = [{"id": "p1", "score": 0.9, "image": "a.jpg"}]
    token = await redis_state.save_page("telegram", "7", entries)
    assert token and len(token) >= 8
    assert await redis_state.load_page("telegram", "7", token) == entries
    assert await redis_state.load_page("telegram", "8", token) is None  # another user
    assert await redis_state.load_page("viber", "7", token) is None  # another channel
    assert await redis_state.load_page("telegram", "7", "forgedToken1") is None
    ttl = await redis_state.client.ttl(f"vsearch:page:telegram:7:{token}")
    assert PAGE_TTL_S - 60 < ttl <= PAGE_TTL_S


async def test_reindex_lock_one_at_a_time_with_ttl(redis_state):
    token = await redis_state.acquire_reindex_lock(ttl_s=30)
    assert token is not None
    assert await redis_state.acquire_reindex_lock(ttl_s=30) is None
    assert await redis_state.reindex_running()
    await redis_state.release_reindex_lock("not-the-owner")  # someone else's token releases nothing
    assert await redis_state.reindex_running()
    assert 0 < await redis_state.client.ttl("vsearch:reindex:lock") <= 30
    assert await redis_state.refresh_reindex_lock(token, 60)
    assert 30 < await redis_state.client.ttl("vsearch:reindex:lock") <= 60
    await redis_state.release_reindex_lock(token)
    assert not await redis_state.reindex_running()
    # A holder that died frees the lock when its TTL runs out.
    assert await redis_state.acquire_reindex_lock(ttl_s=1) is not None
    assert await wait_for(lambda: _not(redis_state.reindex_running()), timeout=5)
    assert await redis_state.acquire_reindex_lock(ttl_s=30) is not None


async def _not(awaitable) -> bool:
    return not await awaitable


async def test_progress_counters_and_file_ids(redis_state):
    await redis_state.set_reindex_progress("Reindexing: 50%")
    assert await redis_state.reindex_progress() == "Reindexing: 50%"
    await redis_state.set_reindex_progress(None)
    assert await redis_state.reindex_progress() is None
    await redis_state.count_query("telegram", "ok")
    await redis_state.count_query("telegram", "ok")
    await redis_state.count_query("web", "bad_image")
    assert await redis_state.counters() == {"telegram:ok": 2, "web:bad_image": 1}
    assert await redis_state.telegram_file_id("/img/a.jpg:123") is None
    await redis_state.set_telegram_file_id("/img/a.jpg:123", "AgACfileid")
    assert await redis_state.telegram_file_id("/img/a.jpg:123") == "AgACfileid"
    assert await redis_state.client.ttl("vsearch:tgfile:/img/a.jpg:123") > 0
    assert await redis_state.whatsapp_media_id("106", "/img/a.jpg|1|2") is None
    assert await redis_state.set_whatsapp_media_id("106", "/img/a.jpg|1|2", "upl1")
    assert await redis_state.whatsapp_media_id("106", "/img/a.jpg|1|2") == "upl1"
    assert await redis_state.whatsapp_media_id("107", "/img/a.jpg|1|2") is None  # per phone number id
    assert 6 * 24 * 3600 < await redis_state.client.ttl("vsearch:wamedia:106:/img/a.jpg|1|2") <= WA_MEDIA_TTL_S


async def test_index_switch_is_published_to_subscribers(redis_state):
    seen: list[str] = []

    async def listen():
        async for version in redis_state.index_switches():
            seen.append(version)
            return

    task = asyncio.create_task(listen())
    await asyncio.sleep(0.3)  # let it subscribe
    await redis_state.publish_index_switch("v2")
    await asyncio.wait_for(task, timeout=10)
    assert seen == ["v2"]


async def test_redis_outage_degrades_and_reconnects(redis_state, caplog):
    caplog.set_level(logging.WARNING, logger="bot.state")
    token = await redis_state.save_page("telegram", "1", [{"id": "x"}])
    assert token

    await asyncio.to_thread(redis_state.embedded.stop)  # the real server goes away
    # Every method answers without raising; the safe fallback in each case.
    assert await redis_state.first_delivery("telegram", "dup") is True
    assert await redis_state.first_delivery("telegram", "dup") is True  # no dedupe while down
    assert all([await redis_state.allow_photo("telegram", "1") for _ in range(RATE_CAPACITY + 2)])
    assert await redis_state.save_page("telegram", "1", [{"id": "y"}]) is None
    assert await redis_state.load_page("telegram", "1", token) is None
    assert await redis_state.acquire_reindex_lock() is None
    assert await redis_state.counters() == {}
    await redis_state.count_query("telegram", "ok")
    await redis_state.set_telegram_file_id("k", "v")
    assert await redis_state.telegram_file_id("k") is None
    assert await redis_state.set_whatsapp_media_id("106", "k", "m1") is False  # the caller keeps it in memory
    assert await redis_state.whatsapp_media_id("106", "k") is None
    assert not await redis_state.ping()
    assert redis_state.healthy is False
    assert any("failing open" in r.getMessage() for r in caplog.records)

    await asyncio.to_thread(redis_state.embedded.start)  # back, on the same socket
    assert await wait_for(lambda: _true(redis_state.healthy), timeout=10), "monitor did not notice Redis is back"
    assert await redis_state.first_delivery("telegram", "after") is True
    assert await redis_state.first_delivery("telegram", "after") is False
    assert any("reachable again" in r.getMessage() for r in caplog.records)


async def _true(value: bool) -> bool:
    return value


async def test_external_redis_url_that_is_closed_starts_degraded(tmp_path):
    state = await State.open("redis://127.0.0.1:1/0", tmp_path)
    try:
        assert state.embedded is None
        assert state.healthy is False
        assert await state.first_delivery("viber", "1") is True
    finally:
        await state.close()
