"""`vsearch serve`: wires settings, Redis, the engine, the HTTP app and the chat channels, and stops them in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from bot.admin import Admin, IndexWatcher
from bot.config import BotSettings
from bot.core import ChatCore
from bot.metrics import Metrics
from bot.search_client import InProcessSearchClient
from bot.state import State
from bot.web import make_app
from engine.errors import SettingsError, VsearchError

log = logging.getLogger(__name__)
REDACTED = "[redacted]"


# -- secrets never reach a log line ------------------------------------------------------------------


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def install_log_redaction(secrets: Iterable[str]) -> Callable[[], None]:
    """Redact `secrets` from every log record made from now on (message, args and traceback); returns an undo."""
    values = sorted({s for s in secrets if s}, key=len, reverse=True)
    previous = logging.getLogRecordFactory()
    if not values:
        return lambda: None

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed log call must not break logging
            message = str(record.msg)
        record.msg, record.args = redact(message, values), None
        if record.exc_info and record.exc_info[0] is not None:
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_text = redact(text, values)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, values)
        return record

    logging.setLogRecordFactory(factory)

    def undo() -> None:
        logging.setLogRecordFactory(previous)

    return undo


# -- start and stop ----------------------------------------------------------------------------------


@dataclass
class Running:
    """What serve() started, for orderly shutdown (and for tests)."""

    settings: BotSettings
    state: State
    search: InProcessSearchClient
    admin: Admin
    core: ChatCore
    watcher: IndexWatcher
    runner: web.AppRunner
    app: web.Application
    url: str
    telegram: Any = None
    messages: list[str] = field(default_factory=list)


def say(running_messages: list[str], text: str) -> None:
    running_messages.append(text)
    print(text, flush=True)


async def ensure_index(settings: BotSettings, out: list[str], extractor: Any) -> None:
    """Index VSEARCH_CATALOG, or a generated demo catalog, when the data dir has no index yet."""
    from engine.index import IndexStore
    from indexer.build import build_index

    if IndexStore(settings.engine.index_dir).current_version() is not None:
        return
    catalog = settings.engine.catalog
    if catalog is None:
        from indexer.demo import make_demo_catalog

        folder = settings.engine.data_dir / "demo-catalog"
        catalog = str(await asyncio.to_thread(make_demo_catalog, folder))
        say(out, f"No VSEARCH_CATALOG set: generated a demo catalog at {catalog}")
    say(out, f"No index yet: indexing {catalog} (this runs once) ...")
    report = await asyncio.to_thread(build_index, Path(catalog), settings.engine, extractor=extractor)
    say(out, f"Indexed {report.products} products ({report.images_indexed} images, "
             f"{report.images_failed} failed) in {report.seconds:.0f} s: version {report.version}")


def warm_up(extractor: Any, batch: int, pooling: str) -> None:
    from engine.features import check_image

    extractor.embed([check_image(extractor.image_size)] * batch, pooling)


async def start(settings: BotSettings) -> Running:
    """Start everything; the HTTP server listens when this returns."""
    out: list[str] = []
    state = await State.open(settings.redis_url, settings.engine.data_dir)
    redis_where = "external Redis (REDIS_URL)" if settings.redis_url else f"embedded Redis at {state.embedded.socket_path}"
    say(out, f"Redis: {redis_where} ({'ok' if state.healthy else 'unreachable, degraded mode'})")
    try:
        from engine.features import FeatureExtractor
        from engine.search import Searcher

        engine = settings.engine
        extractor = await asyncio.to_thread(FeatureExtractor.from_settings, engine)
        say(out, f"Model: VGG16 ({extractor.weights_id}, {extractor.precision}, {engine.image_size} px, conv block "
                 f"{extractor.feature_block}, finding the product: {extractor.localization or 'off'})")
        await ensure_index(settings, out, extractor)
        searcher = await asyncio.to_thread(Searcher, engine, extractor)
        say(out, f"Index: version {searcher.index_version}, {searcher.product_count} products "
                 f"(data dir {engine.data_dir.resolve()})")
    except BaseException:
        await state.close()
        raise

    metrics = Metrics()
    search = InProcessSearchClient(searcher)
    # One full batch before serving: the allocator reaches its working size now, not under load.
    await asyncio.to_thread(warm_up, extractor, search.max_batch, engine.pooling)
    admin = Admin(settings, state, search, extractor=extractor)
    core = ChatCore(settings, state, search, admin, metrics)
    app = make_app(settings, core, search, state)
    telegram = None
    if settings.telegram_enabled:
        from bot.telegram import TelegramChannel

        telegram = TelegramChannel(settings, core, state)
        if settings.telegram_webhook_url:
            telegram.register_routes(app)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=30.0, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.http_host, settings.http_port).start()
    except BaseException:
        await runner.cleanup()
        await search.close()
        await state.close()
        raise
    url = f"http://{settings.http_host}:{settings.http_port}"
    watcher = IndexWatcher(state, search)
    watcher.start()
    running = Running(settings, state, search, admin, core, watcher, runner, app, url, telegram, out)
    say(out, f"Web page and HTTP API: {url}/ (POST {url}/api/search, {url}/healthz, {url}/metrics)")
    if telegram is not None:
        try:
            await telegram.start()
        except BaseException:
            running.telegram = None  # a failed start cleans up its own Application
            await stop(running)
            raise
        mode = f"webhook {settings.telegram_webhook_url}" if settings.telegram_webhook_url else "long polling"
        say(out, f"Telegram bot: on ({mode})")
    else:
        say(out, "Telegram bot: off (set TELEGRAM_BOT_TOKEN to turn it on)")
    say(out, f"Viber: {'on at ' + url + '/webhooks/viber' if settings.viber_enabled else 'off (set VIBER_AUTH_TOKEN)'}")
    say(out, "WhatsApp: " + (f"on at {url}/webhooks/whatsapp" if settings.whatsapp_enabled
                             else "off (set WHATSAPP_ACCESS_TOKEN, _APP_SECRET, _VERIFY_TOKEN, _PHONE_NUMBER_ID)"))
    admins = ", ".join(sorted(settings.admin_ids)) or "none (set VSEARCH_ADMIN_IDS)"
    say(out, f"Admins: {admins}. Stop with Ctrl-C.")
    return running


async def stop(running: Running) -> None:
    """Stop taking updates, finish the searches in flight and answer them, then release everything."""
    log.info("stopping: no new updates; finishing the searches in flight")
    if running.telegram is not None:
        try:
            await running.telegram.stop()
        except Exception as exc:  # noqa: BLE001 - keep shutting the rest down
            log.error("telegram stop failed: %s", exc)
    await running.watcher.stop()
    await running.admin.close()
    # Stops listening, waits for requests in flight and the webhook work they spawned (on_shutdown).
    await running.runner.cleanup()
    await running.search.close()
    await running.state.close()
    log.info("stopped")


async def serve(settings: BotSettings, stop_event: asyncio.Event | None = None) -> int:
    """Run until SIGINT/SIGTERM (or `stop_event`); exit status 0 after a graceful stop."""
    undo = install_log_redaction(settings.secrets())
    stop_event = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop_event.set)
    try:
        running = await start(settings)
        try:
            await stop_event.wait()
            print("Stopping: finishing the searches in flight ...", flush=True)
        finally:
            await stop(running)
        print("Stopped.", flush=True)
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        undo()


def main() -> int:
    """Sync entry for `vsearch serve`: 0 after a graceful stop, 2 for bad settings, 1 when start-up fails."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # its INFO lines carry Bot API URLs
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        settings = BotSettings.from_env()
    except SettingsError as exc:
        print(f"vsearch serve: bad setting {exc}", file=sys.stderr)
        print("Fix the variable in the environment or in .env, then start again.", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(settings))
    except VsearchError as exc:
        print(f"vsearch serve: {redact(str(exc), settings.secrets())}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"vsearch serve: {redact(str(exc), settings.secrets())} "
              f"(is port {settings.http_port} in use? set VSEARCH_HTTP_PORT)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
