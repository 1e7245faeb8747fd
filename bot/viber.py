"""Viber channel: the signed POST /webhooks/viber route, its events turned into ChatCore calls, replies as carousels."""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from bot import replies
from bot.config import BotSettings
from bot.core import ChatCore
from bot.replies import ProductCard, Reply
from bot.webhooks import (
    PayloadError,
    ThrottledProgress,
    call_api,
    fetch_media,
    field,
    id_field,
    install_shared,
    optional_field,
    parse_json_object,
    read_body,
    signature_ok,
    spawn,
)

log = logging.getLogger(__name__)

CHANNEL = "viber"
PATH = "/webhooks/viber"
SIGNATURE_HEADER = "X-Viber-Content-Signature"
SENDER_NAME = "Shoe finder"  # Viber requires sender.name (at most 28 characters) on every message
OPEN_LABEL = "Open in shop"
# Documented rich_media limits: at most 6 cards of ButtonsGroupColumns (1-6) x ButtonsGroupRows (1-7).
MAX_CARDS = 6
CARD_COLUMNS = 6
CARD_ROWS = 7
BUTTON_TEXT_MAX = 250
PICTURE_TEXT_MAX = 768
RICH_MEDIA_API_VERSION = 2
TOO_MANY_REQUESTS = 12  # send_message status: over 100 messages to this user in an hour without an answer
IMAGE_FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".heic", ".heif")


# --- inbound events (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class Picture:
    user_id: str
    message_id: str
    media_url: str


@dataclass(frozen=True)
class Text:
    user_id: str
    message_id: str
    text: str


@dataclass(frozen=True)
class OtherMessage:
    """A sticker, video, location, ...: answered with the hint to send a photo."""

    user_id: str
    message_id: str


@dataclass(frozen=True)
class Started:
    user_id: str


Event = Picture | Text | OtherMessage | Started


def parse_event(data: dict[str, Any]) -> Event | None:
    """The event a callback body carries, None for events the bot ignores; PayloadError when malformed."""
    event = field(data, "event", str, "body")
    if event == "conversation_started":
        user = field(data, "user", dict, "body")
        return Started(user_id=id_field(user, "id", "user"))
    if event != "message":
        return None  # webhook, subscribed, unsubscribed, delivered, seen, failed, and any future event
    sender = field(data, "sender", dict, "body")
    user_id = id_field(sender, "id", "sender")
    token = field(data, "message_token", (int, str), "body")
    message_id = str(token)
    message = field(data, "message", dict, "body")
    kind = field(message, "type", str, "message")
    if kind == "picture" or (kind == "file" and _image_file_name(message.get("file_name"))):
        media = field(message, "media", str, "message")
        if not media.lower().startswith(("https://", "http://")):
            raise PayloadError("message.media is not an http(s) URL")
        return Picture(user_id, message_id, media)
    if kind == "text":
        text = optional_field(message, "text", str, "message")
        return Text(user_id, message_id, text or "")
    return OtherMessage(user_id, message_id)


def _image_file_name(name: Any) -> bool:
    return isinstance(name, str) and name.lower().endswith(IMAGE_FILE_SUFFIXES)


# --- outbound messages (pure) ----------------------------------------------------------------------


def _base(receiver: str | None, kind: str) -> dict[str, Any]:
    message: dict[str, Any] = {"sender": {"name": SENDER_NAME}, "type": kind}
    if receiver is not None:
        message["receiver"] = receiver
    return message


def text_message(receiver: str | None, text: str, keyboard: dict[str, Any] | None = None) -> dict[str, Any]:
    message = _base(receiver, "text") | {"text": text[:7000]}
    if keyboard:
        message["keyboard"] = keyboard
    return message


def welcome_message() -> dict[str, Any]:
    """The conversation_started answer, sent back in the HTTP response body (no receiver)."""
    return text_message(None, replies.GREETING)


def more_keyboard(reply: Reply) -> dict[str, Any] | None:
    """A "Show more" keyboard button; its tap comes back as a text message carrying the callback data."""
    if reply.page_token is None or reply.next_offset is None:
        return None
    data = replies.encode_callback("more", reply.page_token, reply.next_offset)
    return {
        "Type": "keyboard",
        "DefaultHeight": False,
        "Buttons": [{"Columns": 6, "Rows": 1, "ActionType": "reply", "ActionBody": data,
                     "Text": replies.SHOW_MORE_LABEL}],
    }


def card_buttons(card: ProductCard, page_token: str | None) -> list[dict[str, Any]]:
    """One carousel card: image, title and price, an open-URL button (and "More like #N"); exactly CARD_ROWS rows."""
    title = html.escape(card.title[:150])
    price = f"<br>{html.escape(card.price_text)}" if card.price_text else ""
    text_rows = 2
    buttons: list[dict[str, Any]] = []
    if card.image_url:
        buttons.append({"Columns": CARD_COLUMNS, "Rows": 3, "ActionType": "open-url", "ActionBody": card.url,
                        "Image": card.image_url})
    else:
        text_rows += 3
    like = None
    if page_token is not None:
        like = {"Columns": CARD_COLUMNS, "Rows": 1, "ActionType": "reply",
                "ActionBody": replies.encode_callback("like", page_token, card.rank),
                "Text": replies.similar_label(card.rank)}
    else:
        text_rows += 1
    buttons.append({"Columns": CARD_COLUMNS, "Rows": text_rows, "ActionType": "open-url", "ActionBody": card.url,
                    "Text": f"<b>{card.rank}. {title}</b>{price}"[:BUTTON_TEXT_MAX],
                    "TextSize": "medium", "TextVAlign": "middle", "TextHAlign": "left"})
    buttons.append({"Columns": CARD_COLUMNS, "Rows": 1, "ActionType": "open-url", "ActionBody": card.url,
                    "Text": OPEN_LABEL, "TextSize": "large", "TextVAlign": "middle", "TextHAlign": "middle"})
    if like is not None:
        buttons.append(like)
    return buttons


def carousel_message(receiver: str, cards: tuple[ProductCard, ...], page_token: str | None,
                     keyboard: dict[str, Any] | None = None) -> dict[str, Any]:
    if not 1 <= len(cards) <= MAX_CARDS:
        raise ValueError(f"a carousel holds 1 to {MAX_CARDS} cards, not {len(cards)}")
    message = _base(receiver, "rich_media") | {
        "min_api_version": RICH_MEDIA_API_VERSION,
        "rich_media": {
            "Type": "rich_media",
            "ButtonsGroupColumns": CARD_COLUMNS,
            "ButtonsGroupRows": CARD_ROWS,
            "BgColor": "#FFFFFF",
            "Buttons": [b for card in cards for b in card_buttons(card, page_token)],
        },
    }
    if keyboard:
        message["keyboard"] = keyboard
    return message


def fallback_messages(receiver: str, card: ProductCard) -> list[dict[str, Any]]:
    """A card as plain messages: its picture with title and price, then its URL (or one text when no picture)."""
    if not card.image_url:
        return [text_message(receiver, card.caption)]
    picture = _base(receiver, "picture") | {"media": card.image_url,
                                            "text": card.short_caption[:PICTURE_TEXT_MAX]}
    return [picture, _base(receiver, "url") | {"media": card.url[:2000]}]


# --- the channel -----------------------------------------------------------------------------------


class ViberRefused(Exception):
    """send_message answered with a status other than 0 (the request itself went through)."""

    def __init__(self, status: Any, message: str) -> None:
        super().__init__(f"Viber refused the message: status {status} ({message})")
        self.status = status


class ViberChannel:
    def __init__(self, app: web.Application, settings: BotSettings, core: ChatCore,
                 session: aiohttp.ClientSession) -> None:
        if not settings.viber_auth_token:
            raise ValueError("the Viber channel needs VIBER_AUTH_TOKEN")
        self.app = app
        self.settings = settings
        self.core = core
        self.session = session
        self.token = settings.viber_auth_token
        self.send_url = f"{settings.viber_api_base_url}/send_message"
        self.progress_interval = 15.0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await read_body(request)
        if not signature_ok(self.token, body, request.headers.get(SIGNATURE_HEADER)):
            raise web.HTTPForbidden(text="Bad or missing X-Viber-Content-Signature.")
        data = parse_json_object(body)
        try:
            event = parse_event(data)
        except PayloadError as exc:
            raise web.HTTPBadRequest(text=f"Not a Viber callback: {exc}.") from None
        if isinstance(event, Started):
            return web.json_response(welcome_message())
        if event is not None:
            spawn(self.app, self.process(event), f"viber {type(event).__name__.lower()}")
        return web.Response(text="ok")

    async def process(self, event: Event) -> None:
        if isinstance(event, Picture):
            reply = await self.core.on_photo(CHANNEL, event.user_id, event.message_id,
                                             lambda: fetch_media(self.app, event.media_url, self.settings))
        elif isinstance(event, Text):
            reply = await self._on_text(event)
        elif isinstance(event, OtherMessage):
            reply = await self.core.on_text(CHANNEL, event.user_id, event.message_id, "")
        else:
            return
        if reply is not None:
            await self.send_reply(event.user_id, reply)

    async def _on_text(self, event: Text) -> Reply | None:
        callback = replies.decode_callback(event.text)
        if callback is not None:
            if not await self.core.state.first_delivery(CHANNEL, event.message_id):
                return None
            action, token, arg = callback
            if action == "more":
                return await self.core.on_more(CHANNEL, event.user_id, token, arg)
            return await self.core.on_similar(CHANNEL, event.user_id, token, arg)

        async def send_progress(text: str) -> None:
            await self.send(text_message(event.user_id, text))

        progress = ThrottledProgress(self.app, send_progress, self.progress_interval)
        return await self.core.on_text(CHANNEL, event.user_id, event.message_id, event.text, progress)

    async def send_reply(self, receiver: str, reply: Reply) -> None:
        keyboard = more_keyboard(reply)
        if not reply.cards:
            await self.send(text_message(receiver, reply.text or replies.photo_hint(), keyboard))
            return
        if reply.text:
            await self.send(text_message(receiver, reply.text))
        chunks = [reply.cards[i : i + MAX_CARDS] for i in range(0, len(reply.cards), MAX_CARDS)]
        for n, chunk in enumerate(chunks):
            last_keyboard = keyboard if n == len(chunks) - 1 else None
            try:
                await self.send(carousel_message(receiver, chunk, reply.page_token, last_keyboard))
            except ViberRefused as exc:
                if exc.status == TOO_MANY_REQUESTS:
                    raise  # plain messages would be refused as well
                log.info("carousel refused (status %s); sending plain messages", exc.status)
                await self._send_fallback(receiver, chunk, last_keyboard)

    async def _send_fallback(self, receiver: str, cards: tuple[ProductCard, ...],
                             keyboard: dict[str, Any] | None) -> None:
        for n, card in enumerate(cards):
            messages = fallback_messages(receiver, card)
            if keyboard and n == len(cards) - 1:
                messages[-1]["keyboard"] = keyboard
            try:
                for message in messages:
                    await self.send(message)
            except ViberRefused:  # e.g. a picture URL Viber will not take: the caption carries the link too
                await self.send(text_message(receiver, card.caption, keyboard if n == len(cards) - 1 else None))

    async def send(self, message: dict[str, Any]) -> dict[str, Any]:
        answer = await call_api(self.session, "POST", self.send_url, "Viber send_message",
                                headers={"X-Viber-Auth-Token": self.token}, json_body=message)
        status = answer.get("status") if isinstance(answer, dict) else None
        if status != 0:
            raise ViberRefused(status, str(answer.get("status_message", "")) if isinstance(answer, dict) else "")
        return answer


def register_routes(app: web.Application, settings: BotSettings, core: ChatCore,
                    http_session: aiohttp.ClientSession) -> ViberChannel:
    """Add POST /webhooks/viber to `app`; background work is tracked in webhooks.WEBHOOK_TASKS."""
    install_shared(app, settings)
    channel = ViberChannel(app, settings, core, http_session)
    app.router.add_post(PATH, channel.handle)
    return channel

