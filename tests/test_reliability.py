"""Faults injected end to end: reindexes that die half-way, a full disk, Redis closed from the start, secrets in output."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import fake_telegram as tg
import fake_viber as vb
import fake_whatsapp as wa
import image_factories as f
import pytest
from annoy import AnnoyIndex
from bot_fixtures import build_engine, free_port, make_bot_settings, open_stack

from bot import replies
from bot import serve as serve_module
from engine.index import BUILDING_PREFIX, IndexStore
from engine.search import Searcher
from indexer.build import build_index

pytest_plugins = ["bot_fixtures"]

ROOT = Path(__file__).resolve().parents[1]

# Runs `vsearch index` with a hook that prints a marker, so the test can kill -9 it at a known point:
# "embedding": after the 2nd model batch (the build is half-way through its images);
# "written": after every file of the new version is written into its hidden folder, before the switch.
KILLABLE_INDEX = """
import sys, time
import indexer.build as build
mode, catalog = sys.argv[1], sys.argv[2]
if mode == "embedding":
    embed = build.FeatureExtractor.embed_arrays_with_shapes
    def slow_embed(self, arrays, pooling, **kwargs):
        out = embed(self, arrays, pooling, **kwargs)
        print("BATCH", flush=True)
        return out
    build.FeatureExtractor.embed_arrays_with_shapes = slow_embed
else:
    write_errors = build.write_errors_file
    def write_then_hang(errors, path):
        write_errors(errors, path)
        print("WRITTEN", path.parent, flush=True)
        time.sleep(300)
    build.write_errors_file = write_then_hang
from vsearch_cli.main import main
sys.exit(main(["index", catalog]))
"""


def demo(folder: Path, products: int, image_size: int = 256) -> Path:
    from indexer.demo import make_demo_catalog

    return make_demo_catalog(folder, products=products, image_size=image_size)


def query_bytes(catalog: Path, product: str = "demo-003") -> bytes:
    return (catalog.parent / "images" / f"{product}-1.jpg").read_bytes()


def kill_index_run(mode: str, catalog: Path, engine_settings, marker: str, count: int) -> None:
    """Start `vsearch index` in a subprocess and kill -9 it once `marker` was printed `count` times."""
    env = dict(os.environ, VSEARCH_DATA_DIR=str(engine_settings.data_dir), VSEARCH_WEIGHTS="random",
               VSEARCH_IMAGE_SIZE=str(engine_settings.image_size), VSEARCH_POOLING=engine_settings.pooling,
               PYTHONPATH=str(ROOT))
    env.pop("VSEARCH_CATALOG", None)
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE_INDEX, mode, str(catalog)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen = 0
    try:
        deadline = time.monotonic() + 180
        while seen < count and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            seen += line.startswith(marker)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert seen == count, f"the index run ended (status {proc.returncode}) before printing {marker} x{count}"
    assert proc.returncode == -signal.SIGKILL


# -- a reindex that dies half-way ---------------------------------------------------------------------


@pytest.mark.slow
def test_killed_index_run_leaves_the_current_index_serving(tmp_path, demo_catalog, engine_settings, extractor):
    """kill -9 of `vsearch index` mid-embedding and after writing (before the switch): nothing half-built is used."""
    first = build_index(demo_catalog, engine_settings, extractor=extractor)
    store = IndexStore(engine_settings.index_dir)
    searcher = Searcher(engine_settings, extractor)
    bigger = demo(tmp_path / "bigger", products=30, image_size=240)  # other bytes: none of it in the cache yet

    kill_index_run("embedding", bigger, engine_settings, "BATCH", 2)
    kill_index_run("written", bigger, engine_settings, "WRITTEN", 1)

    stale = list(engine_settings.index_dir.glob(f"{BUILDING_PREFIX}*"))
    assert len(stale) == 1 and (stale[0] / "manifest.json").is_file()  # complete-looking, never published
    assert store.current_version() == first.version
    assert store.versions() == [first.version]
    assert not searcher.reload_if_changed()
    assert searcher.search(query_bytes(demo_catalog), 3).matches[0].product.id == "demo-003"
    fresh = Searcher(engine_settings, extractor)
    assert fresh.index_version == first.version and fresh.product_count == 16

    # The next build works over the feature cache the killed runs wrote into (the second one had extracted
    # every image before it was killed), and readers switch to it.
    report = build_index(bigger, engine_settings, extractor=extractor)
    images = len(bigger.read_text(encoding="utf-8").splitlines()) - 1
    assert report.products == 30 and report.images_indexed == images
    assert report.extracted == 0 and report.cache_hits == images
    assert store.current_version() == report.version
    assert store.versions() == [first.version, report.version]
    assert searcher.reload_if_changed() and searcher.index_version == report.version
    assert searcher.search(query_bytes(bigger, "demo-027"), 3).matches[0].product.id == "demo-027"


def test_failing_images_mid_catalog_are_bad_rows_and_the_build_publishes(tmp_path, demo_catalog, engine_settings,
                                                                          extractor):
    folder = tmp_path / "cat"
    shutil.copytree(demo_catalog.parent, folder)
    images = folder / "images"
    whole = (images / "demo-005-1.jpg").read_bytes()
    (images / "demo-005-1.jpg").write_bytes(whole[: len(whole) // 2])  # truncated mid-scan
    (images / "demo-009-1.jpg").write_bytes(f.png_bomb())  # 20000x20000 header
    (images / "demo-010-1.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(3000))  # JPEG magic, then noise
    first = build_index(demo_catalog, engine_settings, extractor=extractor)

    report = build_index(folder / "catalog.csv", engine_settings, extractor=extractor)
    failed = {e.product_id for e in report.errors}
    assert {"demo-009", "demo-010"} <= failed and report.images_failed >= 2
    assert report.products >= 13 and report.images_indexed == 20 - report.images_failed
    store = IndexStore(engine_settings.index_dir)
    assert store.current_version() == report.version != first.version
    errors_csv = (engine_settings.index_dir / report.version / "errors.csv").read_text(encoding="utf-8")
    assert "demo-009" in errors_csv and "too_many_pixels" in errors_csv


class FullDiskAnnoy(AnnoyIndex):
    """Annoy whose save() fails as on a full disk, after part of the file made it to disk."""

    saves = 0

    def save(self, fn, prefault=False):
        FullDiskAnnoy.saves += 1
        Path(fn).write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), fn)


def test_write_error_keeps_current_and_removes_the_build_folder(demo_catalog, engine_settings, extractor, monkeypatch):
    first = build_index(demo_catalog, engine_settings, extractor=extractor)
    searcher = Searcher(engine_settings, extractor)
    monkeypatch.setattr("engine.index.AnnoyIndex", FullDiskAnnoy)
    with pytest.raises(OSError) as caught:
        build_index(demo_catalog, engine_settings, extractor=extractor)
    assert caught.value.errno == errno.ENOSPC and FullDiskAnnoy.saves == 1
    monkeypatch.undo()

    store = IndexStore(engine_settings.index_dir)
    assert store.current_version() == first.version and store.versions() == [first.version]
    assert not list(engine_settings.index_dir.glob(f"{BUILDING_PREFIX}*"))
    assert searcher.search(query_bytes(demo_catalog), 3).matches[0].product.id == "demo-003"
    assert build_index(demo_catalog, engine_settings, extractor=extractor).version == store.current_version()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """An 8 MB tmpfs (needs root / CAP_SYS_ADMIN; skipped otherwise)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); the write-error test covers it")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(folder: Path) -> Path:
    """Write zeros until the file system is full; returns the filler file."""
    filler = folder / "filler"
    try:
        with filler.open("wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    return filler


def test_full_disk_on_a_real_tmpfs(tiny_tmpfs, demo_catalog, engine_settings, extractor):
    settings = dataclasses.replace(engine_settings, data_dir=tiny_tmpfs / "data")
    first = build_index(demo_catalog, settings, extractor=extractor)
    searcher = Searcher(settings, extractor)
    filler = fill(tiny_tmpfs)
    store = IndexStore(settings.index_dir)

    # Without the cache the build gets as far as writing the new version; with it, opening the cache fails.
    with pytest.raises(OSError) as caught:
        build_index(demo_catalog, settings, extractor=extractor, use_cache=False)
    assert "No space left" in str(caught.value) or caught.value.errno == errno.ENOSPC
    with pytest.raises((OSError, sqlite3.Error), match="(?i)full|no space|disk i/o"):
        build_index(demo_catalog, settings, extractor=extractor)
    assert store.current_version() == first.version and store.versions() == [first.version]
    assert not list(settings.index_dir.glob(f"{BUILDING_PREFIX}*"))
    assert searcher.search(query_bytes(demo_catalog), 3).matches[0].product.id == "demo-003"

    filler.unlink()
    again = build_index(demo_catalog, settings, extractor=extractor)
    assert store.current_version() == again.version and searcher.reload_if_changed()


# -- the same through the chat /reindex path -------------------------------------------------------------


class RecordingSink:
    def __init__(self) -> None:
        self.texts: list[str] = []

    async def update(self, text: str) -> None:
        self.texts.append(text)


def photo(data: bytes):
    async def get() -> bytes:
        return data

    return get


@pytest.fixture
async def chat_stack(tmp_path, extractor, redis_state):
    engine = await asyncio.to_thread(build_engine, demo(tmp_path / "a", products=6, image_size=160),
                                     tmp_path / "data", extractor)
    settings = make_bot_settings(dataclasses.replace(engine.settings, catalog=str(demo(tmp_path / "b", 9, 160))))
    stack = await open_stack(settings, redis_state, engine)
    stack.admin.progress_every_s = 0.05
    yield stack
    await stack.admin.close()
    await stack.search.close()


async def reindex(stack, message_id: str) -> list[str]:
    sink = RecordingSink()
    started = await stack.core.on_text("telegram", "1001", message_id, "/reindex", progress=sink)
    assert not started.is_error, started.text
    await asyncio.wait_for(stack.admin.wait(), timeout=120)
    return sink.texts


async def test_chat_reindex_failing_on_a_full_disk_frees_the_lock(chat_stack, monkeypatch):
    s = chat_stack
    version = s.search.index_version

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("indexer.build.write_version_files", no_space)
    texts = await reindex(s, "r1")
    assert texts[-1].startswith("Reindex failed") and "No space left" in texts[-1]
    assert s.search.index_version == version
    assert not await s.state.reindex_running() and await s.state.reindex_progress() is None
    assert not list(s.engine.settings.index_dir.glob(f"{BUILDING_PREFIX}*"))
    during = await s.core.on_photo("telegram", "77", "p1", photo(s.engine.image_bytes("demo-002")))
    assert during.cards[0].product_id == "demo-002"

    monkeypatch.undo()
    texts = await reindex(s, "r2")
    assert "Reindex finished" in texts[-1] and "9 products" in texts[-1]
    assert s.search.index_version != version and s.search.product_count == 9
    assert not await s.state.reindex_running()


async def test_lock_of_a_dead_reindexer_expires_by_ttl(chat_stack):
    """A server killed mid-reindex never releases its lock: the TTL frees it and the next /reindex runs."""
    s = chat_stack
    assert await s.state.acquire_reindex_lock(ttl_s=1) is not None  # held by "a process that died"
    refused = await s.core.on_text("telegram", "1001", "d1", "/reindex")
    assert refused.is_error and refused.text == replies.REINDEX_RUNNING
    await asyncio.sleep(1.5)
    texts = await reindex(s, "d2")
    assert "Reindex finished" in texts[-1]


# -- vsearch serve with every channel on fake platforms ---------------------------------------------------


class Platforms:
    """Fake Telegram, Viber and WhatsApp (Graph) servers on 127.0.0.1 and `vsearch serve` settings pointing at them."""

    def __init__(self) -> None:
        self.telegram = tg.FakeTelegram()
        self.viber = vb.FakeViber()
        self.graph = wa.FakeGraph()

    async def start(self) -> None:
        await self.telegram.start()
        await self.viber.start()
        await self.graph.start()

    async def close(self) -> None:
        await self.telegram.close()
        await self.viber.stop()
        await self.graph.stop()

    def settings(self, engine, port: int, **changes):
        return make_bot_settings(
            engine, http_port=port,
            telegram_bot_token=tg.TOKEN, telegram_api_base_url=self.telegram.base_url,
            telegram_file_base_url=self.telegram.file_base_url,
            viber_auth_token=vb.VIBER_TOKEN, viber_api_base_url=self.viber.base_url,
            whatsapp_access_token=wa.ACCESS_TOKEN, whatsapp_app_secret=wa.APP_SECRET,
            whatsapp_verify_token=wa.VERIFY_TOKEN, whatsapp_phone_number_id=wa.PHONE_NUMBER_ID,
            whatsapp_api_base_url=self.graph.base_url, **changes,
        )


@pytest.fixture
async def platforms():
    p = Platforms()
    await p.start()
    yield p
    await p.close()


async def wait_http(url: str, server: asyncio.Task, http: aiohttp.ClientSession) -> dict:
    for _ in range(1200):
        if server.done():
            server.result()
        try:
            async with http.get(url + "/healthz") as resp:
                return await resp.json()
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.1)
    raise AssertionError("serve did not start")


async def post_signed(http, url: str, body: bytes, header: str, signature: str) -> int:
    async with http.post(url, data=body, headers={header: signature, "Content-Type": "application/json"}) as resp:
        await resp.read()
        return resp.status


async def until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def to(sent: list[dict], receiver_key: str, receiver: str, kind: str | None = None) -> list[dict]:
    return [m for m in sent if m.get(receiver_key) == receiver and (kind is None or m.get("type") == kind)]


async def one_photo_per_channel(p: Platforms, url: str, http: aiohttp.ClientSession, image: bytes, top_k: int) -> None:
    """A photo through Telegram (long polling), Viber and WhatsApp (signed webhooks); waits for the whole answers."""
    p.telegram.enqueue(tg.photo_update(p.telegram, 501, image))
    p.viber.media["photo.jpg"] = image
    body = vb.encode(vb.picture_event("viber-user=", 9001, p.viber.media_url("photo.jpg")))
    assert await post_signed(http, url + "/webhooks/viber", body, "X-Viber-Content-Signature", vb.sign_viber(body)) == 200
    p.graph.media["media-ok"] = (image, "image/jpeg")
    body = wa.encode(wa.messages_payload("15550009999", wa.image_message("15550009999", "wamid.ok", "media-ok")))
    assert await post_signed(http, url + "/webhooks/whatsapp", body, "X-Hub-Signature-256", wa.sign_whatsapp(body)) == 200
    await p.telegram.wait_for("sendMessage", chat_id=501, timeout=60)
    await until(lambda: to(p.viber.sent, "receiver", "viber-user=", "rich_media"), "the Viber carousel")
    await until(lambda: len(to(p.graph.sent, "to", "15550009999", "image")) >= top_k, "the WhatsApp images")


async def test_redis_closed_from_the_start_every_channel_answers_and_health_is_degraded(
        tmp_path, bot_engine, platforms, caplog):
    caplog.set_level(logging.WARNING)
    port = free_port()
    settings = platforms.settings(bot_engine.settings, port, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    stop = asyncio.Event()
    server = asyncio.create_task(serve_module.serve(settings, stop))
    url = f"http://127.0.0.1:{port}"
    image = bot_engine.image_bytes("demo-006")
    try:
        async with aiohttp.ClientSession() as http:
            health = await wait_http(url, server, http)
            assert health["status"] == "degraded" and health["redis"] is False and health["products"] == 16
            async with http.post(url + "/api/search", data=image) as resp:
                assert resp.status == 200 and (await resp.json())["results"][0]["id"] == "demo-006"
            await one_photo_per_channel(platforms, url, http, image, bot_engine.settings.top_k)
            assert "vsearch_redis_up 0" in await (await http.get(url + "/metrics")).text()
    finally:
        stop.set()
        assert await asyncio.wait_for(server, timeout=60) == 0
    telegram_answer = platforms.telegram.calls_of("sendMessage", 501)[-1]
    assert any("demo-006" in b.get("url", "") for b in tg.buttons(telegram_answer))
    assert "demo-006" in json.dumps(to(platforms.viber.sent, "receiver", "viber-user=", "rich_media")[0])
    assert "demo-006" in json.dumps(to(platforms.graph.sent, "to", "15550009999", "image")[0])
    assert any("Redis is unreachable" in r.getMessage() for r in caplog.records)


async def test_secrets_never_reach_logs_output_or_answers(tmp_path, bot_engine, platforms, caplog, capfd):
    """A real serve run with every channel, error paths included; every token and secret is grepped for."""
    caplog.set_level(logging.DEBUG)
    port = free_port()
    settings = platforms.settings(bot_engine.settings, port)
    secrets = settings.secrets()
    assert len(secrets) == 5  # telegram token, viber token, whatsapp access token, app secret, verify token
    stop = asyncio.Event()
    server = asyncio.create_task(serve_module.serve(settings, stop))
    url = f"http://127.0.0.1:{port}"
    bodies: list[str] = []
    p = platforms
    try:
        async with aiohttp.ClientSession() as http:
            await wait_http(url, server, http)
            await one_photo_per_channel(p, url, http, bot_engine.image_bytes("demo-004"), bot_engine.settings.top_k)
            # Error paths: a corrupt photo, a Telegram file that cannot be fetched, a Viber API that keeps
            # failing, a refused Graph media download, forged webhooks, a wrong verify token, a bad upload,
            # and an error logged with a URL that contains the bot token.
            p.telegram.enqueue(tg.photo_update(p.telegram, 502, b"not a picture at all"))
            update = tg.photo_update(p.telegram, 503, bot_engine.image_bytes("demo-001"))
            update["message"]["photo"] = [dict(size, file_id="FILE-UNKNOWN") for size in update["message"]["photo"]]
            p.telegram.enqueue(update)
            p.viber.fail_next = 10
            calls_before = p.viber.calls
            body = vb.encode(vb.text_event("viber-err=", 77, "hello"))
            await post_signed(http, url + "/webhooks/viber", body, "X-Viber-Content-Signature", vb.sign_viber(body))
            p.graph.download_status = 500
            p.graph.media["media-err"] = (b"x", "image/jpeg")
            body = wa.encode(wa.messages_payload("15550008888", wa.image_message("15550008888", "wamid.err", "media-err")))
            await post_signed(http, url + "/webhooks/whatsapp", body, "X-Hub-Signature-256", wa.sign_whatsapp(body))
            for path, header in (("/webhooks/viber", "X-Viber-Content-Signature"),
                                 ("/webhooks/whatsapp", "X-Hub-Signature-256")):
                async with http.post(url + path, data=b"{}", headers={header: "forged"}) as resp:
                    assert resp.status == 403
                    bodies.append(await resp.text())
            verify = {"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "123"}
            async with http.get(url + "/webhooks/whatsapp", params=verify) as resp:
                assert resp.status == 403
                bodies.append(await resp.text())
            async with http.post(url + "/api/search", data=b"GIF89a broken") as resp:
                assert resp.status == 400
                bodies.append(await resp.text())
            logging.getLogger("bot.telegram").error(
                "GET %s%s/getFile failed", settings.telegram_api_base_url, settings.telegram_bot_token)
            await p.telegram.wait_for("sendMessage", chat_id=502, timeout=60)
            await p.telegram.wait_for("sendMessage", chat_id=503, timeout=60)
            await until(lambda: to(p.graph.sent, "to", "15550008888"), "the WhatsApp download error reply")
            await until(lambda: p.viber.calls - calls_before >= 3, "the retried Viber sends")
            for path in ("/healthz", "/metrics", "/"):
                async with http.get(url + path) as resp:
                    bodies.append(await resp.text())
    finally:
        stop.set()
        assert await asyncio.wait_for(server, timeout=60) == 0
    assert replies.DOWNLOAD_FAILED in p.telegram.calls_of("sendMessage", 503)[-1].params["text"]
    assert replies.DOWNLOAD_FAILED in json.dumps(to(p.graph.sent, "to", "15550008888"))
    out, err = capfd.readouterr()
    captured = "\n".join([caplog.text, *(r.getMessage() for r in caplog.records), out, err, *bodies, repr(settings)])
    assert "[redacted]" in captured  # the token URL was logged, redacted
    assert "Telegram bot: on" in captured and "retry" in captured  # serve output and the retry warnings were grepped
    leaks = [s for s in secrets if s in captured]
    assert not leaks, f"secrets leaked: {[s[:6] + '...' for s in leaks]}"


@pytest.mark.slow
async def test_a_rejected_token_at_start_up_is_never_printed(tmp_path, demo_catalog):
    """python-telegram-bot puts the token in InvalidToken's message; `vsearch serve` must not print it."""
    fake = tg.FakeTelegram()  # accepts only tg.TOKEN
    await fake.start()
    wrong = "987654:SECRETwrongTOKENvalue"
    env = dict(os.environ, VSEARCH_DATA_DIR=str(tmp_path / "data"), VSEARCH_WEIGHTS="random", VSEARCH_IMAGE_SIZE="64",
               VSEARCH_CATALOG=str(demo_catalog), VSEARCH_HTTP_PORT=str(free_port()), PYTHONPATH=str(ROOT),
               TELEGRAM_BOT_TOKEN=wrong, TELEGRAM_API_BASE_URL=fake.base_url,
               TELEGRAM_FILE_BASE_URL=fake.file_base_url)
    for name in ("REDIS_URL", "VIBER_AUTH_TOKEN", "WHATSAPP_ACCESS_TOKEN", "TELEGRAM_WEBHOOK_URL"):
        env.pop(name, None)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys; from vsearch_cli.main import main; sys.exit(main(['serve']))",
            cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=240)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        await fake.close()
    text = out.decode(errors="replace")
    assert proc.returncode == 1, text
    assert "TELEGRAM_BOT_TOKEN" in text and "[redacted]" in text
    assert wrong not in text and "SECRETwrong" not in text
