"""WhatsApp Cloud API channel: GET/POST /webhooks/whatsapp, messages turned into ChatCore calls, replies as images."""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from bot import replies
from bot.config import BotSettings
from bot.core import ChatCore
from bot.replies import DownloadFailed, ProductCard, Reply, image_cache_key
from bot.state import WA_MEDIA_TTL_S
from bot.webhooks import (
    ApiError,
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

CHANNEL = "whatsapp"
PATH = "/webhooks/whatsapp"
SIGNATURE_HEADER = "X-Hub-Signature-256"
CAPTION_MAX = 1024
TEXT_MAX = 4096
BUTTON_TITLE_MAX = 20
MAX_CHALLENGE = 256
UPLOAD_MAX_BYTES = 5 * 1024 * 1024  # WhatsApp takes JPEG/PNG images of at most 5 MB
UPLOAD_MAX_SIDE = 1600
UPLOAD_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}


# --- inbound (pure) --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    user_id: str
    message_id: str
    media_id: str


@dataclass(frozen=True)
class Text:
    user_id: str
    message_id: str
    text: str


@dataclass(frozen=True)
class ButtonTap:
    user_id: str
    message_id: str
    data: str


@dataclass(frozen=True)
class OtherMessage:
    """Audio, video, a sticker, a location, a non-image document...: answered with the hint to send a photo."""

    user_id: str
    message_id: str


Event = Image | Text | ButtonTap | OtherMessage
SILENT_TYPES = ("reaction", "system", "ephemeral", "unsupported", "request_welcome")


def parse_events(data: dict[str, Any]) -> list[Event]:
    """Every message in a notification (one body may batch several); statuses and other fields are skipped.

    PayloadError when a part the bot relies on is missing or has the wrong type.
    """
    if field(data, "object", str, "body") != "whatsapp_business_account":
        return []  # another product's notification: nothing for this bot
    events: list[Event] = []
    for entry in field(data, "entry", list, "body"):
        for change in field(entry, "changes", list, "entry"):
            if field(change, "field", str, "change") != "messages":
                continue
            value = field(change, "value", dict, "change")
            for message in optional_field(value, "messages", list, "value") or []:
                event = parse_message(message)
                if event is not None:
                    events.append(event)
    return events


def parse_message(message: Any) -> Event | None:
    user_id = id_field(message, "from", "message")
    message_id = id_field(message, "id", "message")
    kind = field(message, "type", str, "message")
    if kind == "image":
        media = field(message, "image", dict, "message")
        return Image(user_id, message_id, _media_id(media, "image"))
    if kind == "document":
        document = field(message, "document", dict, "message")
        mime = optional_field(document, "mime_type", str, "document") or ""
        if mime.lower().startswith("image/"):
            return Image(user_id, message_id, _media_id(document, "document"))
        return OtherMessage(user_id, message_id)
    if kind == "text":
        text = field(message, "text", dict, "message")
        return Text(user_id, message_id, field(text, "body", str, "text"))
    if kind == "interactive":
        interactive = field(message, "interactive", dict, "message")
        reply = interactive.get("button_reply") or interactive.get("list_reply")
        if isinstance(reply, dict) and isinstance(reply.get("id"), str):
            return ButtonTap(user_id, message_id, reply["id"])
        return OtherMessage(user_id, message_id)
    if kind in SILENT_TYPES:
        return None
    return OtherMessage(user_id, message_id)


def _media_id(media: dict[str, Any], where: str) -> str:
    media_id = field(media, "id", str, where)
    if not media_id or len(media_id) > 128 or not media_id.isascii() or not media_id.replace("-", "").isalnum():
        raise PayloadError(f"{where}.id is not a media id")
    return media_id


# --- outbound (pure) -------------------------------------------------------------------------------


def text_message(to: str, text: str) -> dict[str, Any]:
    return {"messaging_product": "whatsapp", "recipient_type": "individual", "to": to, "type": "text",
            "text": {"body": text[:TEXT_MAX], "preview_url": False}}


def image_message(to: str, caption: str, *, link: str | None = None, media_id: str | None = None) -> dict[str, Any]:
    if (link is None) == (media_id is None):
        raise ValueError("an image message needs exactly one of link and media_id")
    image: dict[str, str] = {"link": link} if link is not None else {"id": media_id}  # type: ignore[dict-item]
    image["caption"] = caption[:CAPTION_MAX]
    return {"messaging_product": "whatsapp", "recipient_type": "individual", "to": to, "type": "image",
            "image": image}


def card_caption(card: ProductCard) -> str:
    """Title, price and the product URL (WhatsApp images carry no buttons, so the link is in the caption)."""
    caption = card.caption if card.url in card.caption else f"{card.caption}\n{card.url}"
    if len(caption) > CAPTION_MAX:  # keep the URL whole: shorten the title part
        caption = f"{card.short_caption[: CAPTION_MAX - len(card.url) - 2]}\n{card.url}"
    return caption


def buttons_message(to: str, reply: Reply) -> dict[str, Any] | None:
    """The reply's text with "Show more" / "More like #1" reply buttons, or None when there is nothing to offer."""
    if reply.page_token is None or not reply.cards or not reply.text:
        return None
    buttons = []
    if reply.next_offset is not None:
        buttons.append(("more", reply.next_offset, replies.SHOW_MORE_LABEL))
    first = reply.cards[0].rank
    buttons.append(("like", first, replies.similar_label(first)))
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "interactive",
        "interactive": {
            "type": "button",
            "body": {"text": reply.text[:CAPTION_MAX]},
            "action": {"buttons": [
                {"type": "reply", "reply": {"id": replies.encode_callback(action, reply.page_token, arg),
                                            "title": title[:BUTTON_TITLE_MAX]}}
                for action, arg, title in buttons
            ]},
        },
    }


def link_as_is(path: Path) -> bool:
    """Whether WhatsApp can fetch this local image by its public link unchanged (JPEG/PNG up to 5 MB)."""
    try:
        return path.suffix.lower() in UPLOAD_TYPES and path.stat().st_size <= UPLOAD_MAX_BYTES
    except OSError:
        return False


def upload_payload(path: Path) -> tuple[bytes, str, str]:
    """(bytes, mime type, file name) WhatsApp accepts for a local image: JPEG/PNG up to 5 MB, else re-encoded."""
    data = path.read_bytes()
    mime = UPLOAD_TYPES.get(path.suffix.lower())
    if mime is not None and len(data) <= UPLOAD_MAX_BYTES:
        return data, mime, path.name
    from PIL import Image as PILImage

    with PILImage.open(io.BytesIO(data)) as img:
        img.draft("RGB", (UPLOAD_MAX_SIDE, UPLOAD_MAX_SIDE))
        rgb = img.convert("RGB")
        rgb.thumbnail((UPLOAD_MAX_SIDE, UPLOAD_MAX_SIDE))
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=85)
    return out.getvalue(), "image/jpeg", path.stem + ".jpg"


# --- the channel -----------------------------------------------------------------------------------


class WhatsAppChannel:
    def __init__(self, app: web.Application, settings: BotSettings, core: ChatCore,
                 session: aiohttp.ClientSession) -> None:
        missing = [name for name, value in (("WHATSAPP_ACCESS_TOKEN", settings.whatsapp_access_token),
                                            ("WHATSAPP_APP_SECRET", settings.whatsapp_app_secret),
                                            ("WHATSAPP_VERIFY_TOKEN", settings.whatsapp_verify_token),
                                            ("WHATSAPP_PHONE_NUMBER_ID", settings.whatsapp_phone_number_id))
                   if not value]
        if missing:
            raise ValueError(f"the WhatsApp channel needs {', '.join(missing)}")
        self.app = app
        self.settings = settings
        self.core = core
        self.session = session
        self.base = settings.whatsapp_api_base_url
        self.auth = {"Authorization": f"Bearer {settings.whatsapp_access_token}"}
        self.messages_url = f"{self.base}/{settings.whatsapp_phone_number_id}/messages"
        self.media_url = f"{self.base}/{settings.whatsapp_phone_number_id}/media"
        self.progress_interval = 15.0
        self.phone_number_id = str(settings.whatsapp_phone_number_id)
        # Media ids of uploaded local images live in Redis (shared by processes, kept across restarts); this dict
        # holds only those uploaded while Redis was down: image key -> (media id, expiry).
        self.media_ids: dict[str, tuple[str, float]] = {}
        self._upload_lock = asyncio.Lock()

    # -- routes --
    async def verify(self, request: web.Request) -> web.Response:
        query = request.query
        token = query.get("hub.verify_token", "")
        challenge = query.get("hub.challenge", "")
        expected = self.settings.whatsapp_verify_token or ""
        if (query.get("hub.mode") == "subscribe" and challenge and len(challenge) <= MAX_CHALLENGE
                and hmac.compare_digest(token.encode(), expected.encode())):
            return web.Response(text=challenge)
        raise web.HTTPForbidden(text="Verification failed: check WHATSAPP_VERIFY_TOKEN.")

    async def handle(self, request: web.Request) -> web.Response:
        body = await read_body(request)
        if not signature_ok(self.settings.whatsapp_app_secret, body, request.headers.get(SIGNATURE_HEADER),
                            prefix="sha256="):
            raise web.HTTPForbidden(text="Bad or missing X-Hub-Signature-256.")
        data = parse_json_object(body)
        try:
            events = parse_events(data)
        except PayloadError as exc:
            raise web.HTTPBadRequest(text=f"Not a WhatsApp notification: {exc}.") from None
        for event in events:
            spawn(self.app, self.process(event), f"whatsapp {type(event).__name__.lower()}")
        return web.Response(text="ok")

    # -- work --
    async def process(self, event: Event) -> None:
        if isinstance(event, Image):
            reply = await self.core.on_photo(CHANNEL, event.user_id, event.message_id,
                                             lambda: self.download(event.media_id))
        elif isinstance(event, ButtonTap):
            reply = await self._on_tap(event)
        elif isinstance(event, Text):
            reply = await self._on_text(event.user_id, event.message_id, event.text)
        else:
            reply = await self.core.on_text(CHANNEL, event.user_id, event.message_id, "")
        if reply is not None:
            await self.send_reply(event.user_id, reply)

    async def download(self, media_id: str) -> bytes:
        """The two Graph steps: the media id gives a short-lived URL, fetched with the same bearer token."""
        try:
            info = await call_api(self.session, "GET", f"{self.base}/{quote(media_id, safe='')}",
                                  "WhatsApp media lookup", headers=self.auth)
        except ApiError as exc:
            raise DownloadFailed(str(exc)) from None
        url = info.get("url") if isinstance(info, dict) else None
        if not isinstance(url, str) or not url:
            raise DownloadFailed("the media lookup gave no URL")
        return await fetch_media(self.app, url, self.settings, headers=self.auth)

    async def _on_tap(self, event: ButtonTap) -> Reply | None:
        callback = replies.decode_callback(event.data)
        if callback is None:
            return await self.core.on_text(CHANNEL, event.user_id, event.message_id, "")
        if not await self.core.state.first_delivery(CHANNEL, event.message_id):
            return None
        action, token, arg = callback
        if action == "more":
            return await self.core.on_more(CHANNEL, event.user_id, token, arg)
        return await self.core.on_similar(CHANNEL, event.user_id, token, arg)

    async def _on_text(self, user_id: str, message_id: str, text: str) -> Reply | None:
        async def send_progress(progress_text: str) -> None:
            await self.send(text_message(user_id, progress_text))

        progress = ThrottledProgress(self.app, send_progress, self.progress_interval)
        return await self.core.on_text(CHANNEL, user_id, message_id, text, progress)

    async def send_reply(self, to: str, reply: Reply) -> None:
        if not reply.cards:
            await self.send(text_message(to, reply.text or replies.photo_hint()))
            return
        intro = buttons_message(to, reply)
        if intro is not None:
            await self.send(intro)
        elif reply.text:
            await self.send(text_message(to, reply.text))
        for card in reply.cards:
            await self._send_card(to, card)

    async def _send_card(self, to: str, card: ProductCard) -> None:
        caption = card_caption(card)
        message = None
        try:
            if card.image_url and (card.image_path is None or link_as_is(card.image_path)):
                message = image_message(to, caption, link=card.image_url)  # remote, or served via VSEARCH_PUBLIC_URL
            elif card.image_path is not None:
                message = image_message(to, caption, media_id=await self.upload(card.image_path))
        except (ApiError, OSError, ValueError) as exc:
            log.warning("product image %s not uploaded (%s); sending the caption alone", card.product_id, exc)
        if message is not None:
            try:
                await self.send(message)
                return
            except ApiError as exc:
                if exc.status is None or exc.status >= 500:
                    raise
                log.warning("image message refused (%s); sending the caption alone", exc.status)
        await self.send(text_message(to, caption))

    async def upload(self, path: Path) -> str:
        """The media id of a local image: uploaded once, then reused from Redis (or memory while Redis is down)."""
        key = image_cache_key(path)
        if key is None:
            raise OSError(f"cannot read the catalog image {path}")
        cached_id = await self._cached_media_id(key)
        if cached_id:
            return cached_id
        async with self._upload_lock:
            cached_id = await self._cached_media_id(key)  # another task may have uploaded it meanwhile
            if cached_id:
                return cached_id
            data, mime, name = await asyncio.to_thread(upload_payload, path)

            def form() -> aiohttp.FormData:
                fd = aiohttp.FormData()
                fd.add_field("messaging_product", "whatsapp")
                fd.add_field("type", mime)
                fd.add_field("file", data, filename=name, content_type=mime)
                return fd

            answer = await call_api(self.session, "POST", self.media_url, "WhatsApp media upload",
                                    headers=self.auth, form=form)
            media_id = answer.get("id") if isinstance(answer, dict) else None
            if not isinstance(media_id, str) or not media_id:
                raise ApiError("WhatsApp media upload", None, "the answer has no media id")
            if not await self.core.state.set_whatsapp_media_id(self.phone_number_id, key, media_id):
                self.media_ids[key] = (media_id, time.time() + WA_MEDIA_TTL_S)  # degraded: this process only
            return media_id

    async def _cached_media_id(self, key: str) -> str | None:
        media_id = await self.core.state.whatsapp_media_id(self.phone_number_id, key)
        if media_id:
            return media_id
        cached = self.media_ids.get(key)
        return cached[0] if cached is not None and cached[1] > time.time() else None

    async def send(self, message: dict[str, Any]) -> Any:
        return await call_api(self.session, "POST", self.messages_url, "WhatsApp send message",
                              headers=self.auth, json_body=message)


def register_routes(app: web.Application, settings: BotSettings, core: ChatCore,
                    http_session: aiohttp.ClientSession) -> WhatsAppChannel:
    """Add GET and POST /webhooks/whatsapp to `app`; background work is tracked in webhooks.WEBHOOK_TASKS."""
    install_shared(app, settings)
    channel = WhatsAppChannel(app, settings, core, http_session)
    app.router.add_get(PATH, channel.verify)
    app.router.add_post(PATH, channel.handle)
    return channel
