"""Telegram adapter: python-telegram-bot updates in, ChatCore replies out as albums, URL buttons and callbacks."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web
from telegram import (
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputMediaPhoto,
    Message,
    PhotoSize,
    Update,
)
from telegram.constants import ChatAction
from telegram.error import (
    BadRequest,
    Conflict,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
)
from telegram.ext import (
    Application,
    ApplicationBuilder,
    BaseRateLimiter,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)
from telegram.warnings import PTBDeprecationWarning

from bot import replies
from bot.config import BotSettings
from bot.replies import DownloadFailed, ProductCard, Reply, image_cache_key
from bot.state import State
from bot.webhooks import parse_json_object, read_body
from engine.errors import ImageRejected, VsearchError

if TYPE_CHECKING:
    from bot.core import ChatCore

log = logging.getLogger(__name__)

CHANNEL = "telegram"
COMMANDS = ("start", "help", "reindex", "status", "stats")
ALLOWED_UPDATES = ["message", "callback_query"]
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
DEFAULT_WEBHOOK_PATH = "/webhooks/telegram"
MAX_DOWNLOAD_BYTES = 20 * 1024 * 1024  # getFile refuses bigger files
MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # sendPhoto limit for uploads
ALBUM_MAX = 10  # sendMediaGroup takes 2-10 items
CAPTION_MAX = 1024
TEXT_MAX = 4096
BUTTON_TEXT_MAX = 60
CHAT_ACTION_EVERY_S = 4.0  # an action shows for about 5 s
CONCURRENT_UPDATES = 64


@dataclass(frozen=True)
class RetryPolicy:
    """How Bot API calls are retried: flood waits are honoured, 5xx/timeouts back off with jitter, both bounded."""

    attempts: int = 4  # tries for 5xx and network errors, the first included
    base_delay: float = 0.5
    max_delay: float = 8.0
    flood_retries: int = 3  # 429s honoured per call
    max_retry_after: float = 60.0  # a longer flood wait is not waited out: the call fails

    def backoff(self, attempt: int) -> float:
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


def retry_after_seconds(exc: RetryAfter) -> float:
    with warnings.catch_warnings():  # PTB warns that the int form of retry_after is deprecated
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = exc.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class RetryingLimiter(BaseRateLimiter[None]):
    """PTB calls this around every Bot API request except getUpdates: the one place retries happen.

    403 (blocked), 400 and other final answers are raised at once; chat actions are best effort and never retried.
    """

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    async def initialize(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    async def process_request(
        self,
        callback: Callable[..., Coroutine[Any, Any, bool | dict[str, Any] | list[dict[str, Any]]]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: None,
    ) -> bool | dict[str, Any] | list[dict[str, Any]]:
        if endpoint == "sendChatAction":
            return await callback(*args, **kwargs)
        attempt = floods = 0
        while True:
            try:
                return await callback(*args, **kwargs)
            except RetryAfter as exc:
                wait = retry_after_seconds(exc)
                floods += 1
                if floods > self.policy.flood_retries or wait > self.policy.max_retry_after:
                    log.warning("Telegram %s: flood control asks for %.0f s; giving up", endpoint, wait)
                    raise
                log.warning("Telegram %s: flood control, retrying in %.1f s", endpoint, wait)
                await asyncio.sleep(wait + random.uniform(0.05, 0.25))
            except NetworkError as exc:  # 5xx, timeouts, connection errors; BadRequest is final
                if isinstance(exc, BadRequest):
                    raise
                attempt += 1
                if attempt >= self.policy.attempts:
                    log.warning("Telegram %s failed %d times (%s); giving up", endpoint, attempt, type(exc).__name__)
                    raise
                wait = self.policy.backoff(attempt)
                log.warning("Telegram %s: %s; retry %d in %.1f s", endpoint, type(exc).__name__, attempt, wait)
                await asyncio.sleep(wait)


def pick_photo(sizes: Sequence[PhotoSize]) -> PhotoSize:
    """The largest size Telegram lets a bot download (<= 20 MB); the list's order is not relied upon."""
    usable = [s for s in sizes if s.file_size is None or s.file_size <= MAX_DOWNLOAD_BYTES]
    if not usable:
        raise ImageRejected("too_large", "every size of the photo is over 20 MB", "Send a smaller photo.")
    return max(usable, key=lambda s: (s.width * s.height, s.file_size or 0))


def webhook_secret(settings: BotSettings) -> str:
    """TELEGRAM_WEBHOOK_SECRET, else one derived from the token (so every process computes the same one)."""
    if settings.telegram_webhook_secret:
        return settings.telegram_webhook_secret
    token = settings.telegram_bot_token or ""
    return hashlib.sha256(b"vsearch telegram webhook\0" + token.encode()).hexdigest()


def webhook_path(settings: BotSettings) -> str:
    path = urlsplit(settings.telegram_webhook_url or "").path
    return path if path and path != "/" else DEFAULT_WEBHOOK_PATH


def split_text(text: str, limit: int = TEXT_MAX) -> list[str]:
    """Cut a long text into messages at line breaks (a single over-long line is cut hard)."""
    parts: list[str] = []
    current = ""
    for line in text.split("\n"):
        while len(line) > limit:
            if current:
                parts.append(current)
                current = ""
            parts.append(line[:limit])
            line = line[limit:]
        candidate = f"{current}\n{line}" if current else line
        if len(candidate) > limit:
            parts.append(current)
            current = line
        else:
            current = candidate
    if current.strip():
        parts.append(current)
    return parts or [text[:limit]]


def button_text(card: ProductCard) -> str:
    text = card.short_caption.replace("\n", " · ")
    return text if len(text) <= BUTTON_TEXT_MAX else text[: BUTTON_TEXT_MAX - 1] + "…"


def keyboard(reply: Reply) -> InlineKeyboardMarkup:
    """One URL button per product, then "More like #N" and "Show more" when the result list is stored."""
    rows = [[InlineKeyboardButton(button_text(card), url=card.url)] for card in reply.cards]
    actions = []
    if reply.page_token and reply.cards:
        label = reply.similar_label or replies.similar_label(reply.cards[0].rank)
        data = replies.encode_callback("like", reply.page_token, reply.cards[0].rank)
        actions.append(InlineKeyboardButton(label, callback_data=data))
        if reply.next_offset is not None:
            data = replies.encode_callback("more", reply.page_token, reply.next_offset)
            actions.append(InlineKeyboardButton(replies.SHOW_MORE_LABEL, callback_data=data))
    if actions:
        rows.append(actions)
    return InlineKeyboardMarkup(rows)


def links_text(reply: Reply) -> str:
    """The answer with every product URL written out, for when URL buttons are refused."""
    return "\n\n".join([reply.text, *(card.caption for card in reply.cards)]).strip()


@dataclass(frozen=True)
class Picture:
    """One product image to send: a cached file_id or URL (`source` is str), or a local file's bytes."""

    card: ProductCard
    source: str | bytes
    filename: str | None = None
    cache_key: str | None = None  # where to remember the file_id Telegram gives an upload
    cached: bool = False  # `source` is a file_id from the cache (it may have gone stale)

    @property
    def caption(self) -> str:
        return self.card.short_caption[:CAPTION_MAX]

    def as_media(self) -> InputMediaPhoto:
        return InputMediaPhoto(media=self.source, caption=self.caption, filename=self.filename)


class ChatBlocked(Exception):
    """The user blocked the bot (403): stop sending to that chat."""


class TelegramProgress:
    """Reindex progress for an admin: the first update sends a message, later ones edit it."""

    def __init__(self, channel: TelegramChannel, chat_id: int) -> None:
        self.channel = channel
        self.chat_id = chat_id
        self.message_id: int | None = None
        self._last: str | None = None

    async def update(self, text: str) -> None:
        if text == self._last:
            return
        bot = self.channel.application.bot
        if self.message_id is None:
            message = await bot.send_message(self.chat_id, text[:TEXT_MAX])
            self.message_id = message.message_id
        else:
            try:
                await bot.edit_message_text(text[:TEXT_MAX], chat_id=self.chat_id, message_id=self.message_id)
            except BadRequest as exc:
                if "not modified" not in str(exc).lower():
                    raise
        self._last = text


class TelegramChannel:
    """Runs the PTB Application inside our own event loop: long polling, or webhook updates from our aiohttp app."""

    def __init__(
        self,
        settings: BotSettings,
        core: ChatCore,
        state: State,
        *,
        retry: RetryPolicy | None = None,
        poll_timeout: float = 10.0,
    ) -> None:
        if not settings.telegram_bot_token:
            raise ValueError("TelegramChannel needs TELEGRAM_BOT_TOKEN")
        self.settings = settings
        self.core = core
        self.state = state
        self.poll_timeout = poll_timeout
        self.webhook_mode = settings.telegram_webhook_url is not None
        self._secret = webhook_secret(settings)
        self._accepting = False
        self._blocked: set[int] = set()
        builder = (
            ApplicationBuilder()
            .token(settings.telegram_bot_token)
            .base_url(settings.telegram_api_base_url)
            .base_file_url(settings.telegram_file_base_url)
            .rate_limiter(RetryingLimiter(retry or RetryPolicy()))
            .concurrent_updates(CONCURRENT_UPDATES)
        )
        if self.webhook_mode:
            builder = builder.updater(None)
        self.application: Application = builder.build()  # type: ignore[type-arg]
        self.application.add_handler(CommandHandler(list(COMMANDS), self._on_command))
        photo_filter = filters.PHOTO | (filters.Document.IMAGE & ~filters.ANIMATION)
        self.application.add_handler(MessageHandler(photo_filter, self._on_photo))
        self.application.add_handler(CallbackQueryHandler(self._on_callback))
        self.application.add_handler(MessageHandler(filters.UpdateType.MESSAGE, self._on_other))
        self.application.add_error_handler(self._on_error)

    # -- lifecycle -------------------------------------------------------------------------------

    def register_routes(self, app: web.Application) -> None:
        """Webhook mode: add the POST route Telegram delivers to (the path of TELEGRAM_WEBHOOK_URL)."""
        if self.webhook_mode:
            app.router.add_post(webhook_path(self.settings), self._webhook)

    async def start(self) -> None:
        """Connect (getMe), then set the webhook or start polling; VsearchError with a hint when Telegram refuses."""
        # httpx logs every request URL at INFO, and Bot API URLs contain the token.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        app = self.application
        try:
            await app.initialize()  # getMe: a wrong token fails here
            if self.webhook_mode:
                await app.bot.set_webhook(
                    url=self.settings.telegram_webhook_url or "",
                    secret_token=self._secret,
                    allowed_updates=ALLOWED_UPDATES,
                )
            else:
                assert app.updater is not None
                await app.updater.start_polling(
                    timeout=self.poll_timeout, allowed_updates=ALLOWED_UPDATES, error_callback=_polling_error
                )
            await app.start()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await self.stop()
            if isinstance(exc, TelegramError):
                raise start_error(exc) from None
            raise
        self._accepting = True
        log.info("Telegram bot @%s started (%s)", app.bot.username, "webhook" if self.webhook_mode else "long polling")

    async def stop(self) -> None:
        """Stop taking updates, finish the ones in flight (their answers are sent), release everything."""
        self._accepting = False
        app = self.application
        if app.updater is not None and app.updater.running:
            await app.updater.stop()
        if app.running:
            await app.stop()
        await app.shutdown()

    async def _webhook(self, request: web.Request) -> web.Response:
        received = request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(received.encode("utf-8", "replace"), self._secret.encode()):
            return web.Response(status=403, text="Wrong or missing secret token.")
        if not self._accepting:
            return web.Response(status=503, text="The bot is not running; Telegram will deliver again.")
        data = parse_json_object(await read_body(request))
        try:
            update = Update.de_json(data, self.application.bot)
        except Exception:  # noqa: BLE001 - any shape PTB cannot read is the sender's fault
            raise web.HTTPBadRequest(text="Body is not a Telegram Update.") from None
        if not isinstance(update.update_id, int):
            raise web.HTTPBadRequest(text="update_id is missing.")
        if not await self.state.first_delivery(CHANNEL, f"update:{update.update_id}"):
            return web.Response(text="ok")  # Telegram delivered it again after a slow answer: queued already
        await self.application.update_queue.put(update)
        return web.Response(text="ok")

    # -- inbound ---------------------------------------------------------------------------------

    async def _on_photo(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message is None or message.from_user is None:
            return
        chat_id = message.chat_id
        self._blocked.discard(chat_id)
        get_bytes = self._photo_getter(message)
        async with self._uploading(chat_id):
            reply = await self.core.on_photo(CHANNEL, str(message.from_user.id), _message_key(message), get_bytes)
        await self.send_reply(chat_id, reply)

    async def _on_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message is None or message.from_user is None or not message.text:
            return
        self._blocked.discard(message.chat_id)
        command = f"/{command_name(message.text)}"
        progress = TelegramProgress(self, message.chat_id)
        reply = await self.core.on_text(CHANNEL, str(message.from_user.id), _message_key(message), command, progress)
        await self.send_reply(message.chat_id, reply)

    async def _on_other(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Text, unknown commands, stickers, voice...: the core answers with a hint to send a photo."""
        message = update.effective_message
        if message is None or message.from_user is None:
            return
        self._blocked.discard(message.chat_id)
        text = message.text or ""
        if command_name(text) in COMMANDS:
            return  # "/reindex@other_bot" in a group: addressed to another bot (ours matched CommandHandler)
        reply = await self.core.on_text(CHANNEL, str(message.from_user.id), _message_key(message), text)
        await self.send_reply(message.chat_id, reply)

    async def _on_callback(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        if query is None:
            return
        decoded = replies.decode_callback(query.data or "")
        chat_id = query.message.chat.id if query.message is not None else query.from_user.id
        try:  # always answered, so the client stops its spinner
            await query.answer(text=None if decoded else replies.PAGE_EXPIRED[:200])
        except TelegramError as exc:
            log.info("answerCallbackQuery failed: %s", type(exc).__name__)
        if decoded is None:
            return
        action, token, arg = decoded
        user_id = str(query.from_user.id)
        if action == "more":
            reply = await self.core.on_more(CHANNEL, user_id, token, arg)
        else:
            async with self._uploading(chat_id):
                reply = await self.core.on_similar(CHANNEL, user_id, token, arg)
        await self.send_reply(chat_id, reply)

    def _photo_getter(self, message: Message) -> Callable[[], Coroutine[Any, Any, bytes]]:
        bot = self.application.bot

        async def get_bytes() -> bytes:
            if message.photo:
                size = pick_photo(message.photo)
                file_id, declared = size.file_id, size.file_size
            else:
                assert message.document is not None
                file_id, declared = message.document.file_id, message.document.file_size
            if declared is not None and declared > MAX_DOWNLOAD_BYTES:
                raise ImageRejected("too_large", f"the file has {declared} bytes; bots can fetch 20 MB", "Send a smaller image.")
            try:
                tg_file = await bot.get_file(file_id)
                data = await tg_file.download_as_bytearray()
            except BadRequest as exc:
                if "too big" in str(exc).lower():
                    raise ImageRejected("too_large", "Telegram refused the file as too big", "Send a smaller image.") from None
                raise DownloadFailed(f"getFile refused: {exc}") from None
            except TelegramError as exc:
                raise DownloadFailed(f"download failed: {type(exc).__name__}") from None
            return bytes(data)

        return get_bytes

    @contextlib.asynccontextmanager
    async def _uploading(self, chat_id: int) -> AsyncIterator[None]:
        """Show "sending a photo..." now and every few seconds until the block ends."""
        bot = self.application.bot

        async def repeat() -> None:
            while True:
                await asyncio.sleep(CHAT_ACTION_EVERY_S)
                await bot.send_chat_action(chat_id, ChatAction.UPLOAD_PHOTO)

        try:
            await bot.send_chat_action(chat_id, ChatAction.UPLOAD_PHOTO)
        except TelegramError as exc:  # best effort; a real problem shows when the answer is sent
            log.debug("chat action failed: %s", type(exc).__name__)
        task = asyncio.get_running_loop().create_task(repeat())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TelegramError):
                await task

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        exc = context.error
        log.error("Telegram update failed: %s: %s", type(exc).__name__, exc)

    # -- outbound --------------------------------------------------------------------------------

    async def send_reply(self, chat_id: int, reply: Reply | None) -> None:
        """Send a core Reply to a chat: text, or product pictures followed by the link buttons."""
        if reply is None:  # a duplicate delivery, already answered
            return
        try:
            if reply.cards:
                await self._send_cards(chat_id, reply)
            else:
                for part in split_text(reply.text or replies.photo_hint()):
                    await self._call(chat_id, self.application.bot.send_message(chat_id, part))
        except ChatBlocked:
            return

    async def _send_cards(self, chat_id: int, reply: Reply) -> None:
        """Pictures first (albums of 2-10, a single photo alone), then the message that carries the buttons."""
        pictures = [p for p in [await self._picture(card) for card in reply.cards] if p is not None]
        for start in range(0, len(pictures), ALBUM_MAX):
            await self._send_pictures(chat_id, pictures[start : start + ALBUM_MAX])
        bot = self.application.bot
        try:
            await self._call(chat_id, bot.send_message(chat_id, reply.text[:TEXT_MAX] or links_text(reply)[:TEXT_MAX],
                                                       reply_markup=keyboard(reply)))
        except BadRequest as exc:  # e.g. a product URL Telegram will not take as a button
            log.warning("Telegram refused the product buttons (%s); sending the links as text", exc)
            parts = split_text(links_text(reply))
            for i, part in enumerate(parts):
                markup = _without_url_buttons(keyboard(reply)) if i == len(parts) - 1 else None
                await self._call(chat_id, bot.send_message(chat_id, part, reply_markup=markup))

    async def _picture(self, card: ProductCard, fresh: bool = False) -> Picture | None:
        if card.image_path is not None:
            key = image_cache_key(card.image_path)
            if key is None:
                return None
            if not fresh:
                file_id = await self.state.telegram_file_id(key)
                if file_id:
                    return Picture(card, file_id, cache_key=key, cached=True)
            try:
                data = await asyncio.to_thread(card.image_path.read_bytes)
            except OSError as exc:
                log.warning("product image %s unreadable: %s", card.image_path.name, type(exc).__name__)
                return None
            if len(data) > MAX_UPLOAD_BYTES:
                log.warning("product image %s is over 10 MB; not sent", card.image_path.name)
                return None
            return Picture(card, data, filename=card.image_path.name, cache_key=key)
        if card.image_url:
            return Picture(card, card.image_url)
        return None

    async def _send_pictures(self, chat_id: int, pictures: list[Picture]) -> None:
        if len(pictures) == 1:
            await self._send_single(chat_id, pictures[0])
            return
        messages = await self._album(chat_id, pictures)
        if messages is None and any(p.cached for p in pictures):
            # A stale cached file_id spoils the whole album: upload those files again.
            renewed = [await self._picture(p.card, fresh=True) if p.cached else p for p in pictures]
            pictures = [p for p in renewed if p is not None]
            messages = await self._album(chat_id, pictures) if len(pictures) > 1 else None
        if messages is None:  # say, a URL Telegram cannot fetch: one by one, skipping the refused ones
            for picture in pictures:
                await self._send_single(chat_id, picture)
            return
        for picture, message in zip(pictures, messages, strict=False):
            await self._remember(picture, message)

    async def _album(self, chat_id: int, pictures: list[Picture]) -> Sequence[Message] | None:
        try:
            return await self._call(chat_id, self.application.bot.send_media_group(chat_id, [p.as_media() for p in pictures]))
        except BadRequest as exc:
            log.warning("Telegram refused an album of %d pictures: %s", len(pictures), exc)
            return None

    async def _send_single(self, chat_id: int, picture: Picture) -> None:
        bot = self.application.bot
        for attempt in (picture, None):
            if attempt is None:  # the cached file_id was refused: upload the file again
                if not picture.cached:
                    return
                attempt = await self._picture(picture.card, fresh=True)
                if attempt is None:
                    return
            try:
                message = await self._call(
                    chat_id, bot.send_photo(chat_id, attempt.source, caption=attempt.caption, filename=attempt.filename)
                )
            except BadRequest as exc:
                log.warning("Telegram refused the picture of product %s: %s", picture.card.product_id, exc)
                continue
            await self._remember(attempt, message)
            return

    async def _remember(self, picture: Picture, message: Message) -> None:
        if picture.cache_key is None or picture.cached or not message.photo:
            return
        largest = max(message.photo, key=lambda s: s.width * s.height)
        await self.state.set_telegram_file_id(picture.cache_key, largest.file_id)

    async def _call(self, chat_id: int, request: Coroutine[Any, Any, Any]) -> Any:
        """Await one send; a 403 marks the chat blocked (logged once) and ends this answer."""
        try:
            return await request
        except Forbidden as exc:
            if chat_id not in self._blocked:
                self._blocked.add(chat_id)
                log.warning("Telegram chat %s refuses messages (%s); not retrying", chat_id, exc)
            raise ChatBlocked() from None


def start_error(exc: TelegramError) -> VsearchError:
    """Telegram's refusal at start-up, as an error that says which setting to check."""
    if isinstance(exc, InvalidToken):
        return VsearchError(f"Telegram rejected the bot token ({exc}).", "Copy TELEGRAM_BOT_TOKEN again from @BotFather.")
    if isinstance(exc, BadRequest):
        return VsearchError(
            f"Telegram refused the webhook: {exc}.",
            "TELEGRAM_WEBHOOK_URL must be a public https URL on port 443, 80, 88 or 8443.",
        )
    return VsearchError(
        f"Could not reach the Telegram Bot API ({type(exc).__name__}: {exc}).",
        "Check the network and TELEGRAM_API_BASE_URL, then start again.",
    )


def _polling_error(exc: TelegramError) -> None:
    if isinstance(exc, Conflict):
        log.error("Telegram polling conflict: another process polls with this token, or a webhook is set (%s)", exc)
    else:
        log.warning("Telegram polling failed (%s: %s); retrying", type(exc).__name__, exc)


def command_name(text: str) -> str | None:
    """"/Reindex@shop_bot now" -> "reindex"; None when the text is not a command."""
    words = text.split(maxsplit=1)
    if not words or not words[0].startswith("/") or len(words[0]) < 2:
        return None
    return words[0][1:].split("@", 1)[0].lower()


def _message_key(message: Message) -> str:
    """Telegram message ids count per chat, so the chat is part of the dedupe key."""
    return f"{message.chat_id}:{message.message_id}"


def _without_url_buttons(markup: InlineKeyboardMarkup) -> InlineKeyboardMarkup | None:
    rows = [[b for b in row if b.callback_data is not None] for row in markup.inline_keyboard]
    rows = [row for row in rows if row]
    return InlineKeyboardMarkup(rows) if rows else None
