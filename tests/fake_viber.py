"""A fake Viber REST Bot API on 127.0.0.1: records send_message calls, checks documented limits, serves media."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from typing import Any

from aiohttp import web
from fake_server import LoopbackServer

VIBER_TOKEN = "445da6az1s345z78-dazcczb2542zv51a-e0vc5fva17480im9"


def sign_viber(body: bytes, token: str = VIBER_TOKEN) -> str:
    """X-Viber-Content-Signature as Viber computes it: hex HMAC-SHA256 of the raw body keyed with the token."""
    return hmac.new(token.encode(), body, hashlib.sha256).hexdigest()


def encode(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def sender(user_id: str, name: str = "Jo") -> dict[str, Any]:
    return {"id": user_id, "name": name, "avatar": None, "country": "DE", "language": "en", "api_version": 10}


def picture_event(user_id: str, token: int, media_url: str) -> dict[str, Any]:
    return {
        "event": "message",
        "timestamp": 1457764197627,
        "chat_hostname": "SN-376_",
        "message_token": token,
        "sender": sender(user_id),
        "message": {"type": "picture", "text": "", "media": media_url, "thumbnail": media_url, "file_name": "a.jpg",
                    "size": 1234},
        "silent": False,
    }


def text_event(user_id: str, token: int, text: str) -> dict[str, Any]:
    return {
        "event": "message",
        "timestamp": 1457764197627,
        "message_token": token,
        "sender": sender(user_id),
        "message": {"type": "text", "text": text},
    }


def conversation_started_event(user_id: str) -> dict[str, Any]:
    return {
        "event": "conversation_started",
        "timestamp": 1457764197627,
        "message_token": 4912661846655238145,
        "type": "open",
        "context": "",
        "user": sender(user_id),
        "subscribed": False,
    }


WEBHOOK_EVENT = {"event": "webhook", "timestamp": 1457764197627, "chat_hostname": "SN-372_", "message_token": 241256543215}


class FakeViber(LoopbackServer):
    """`base_url` plays VIBER_API_BASE_URL; `sent` holds every accepted send_message body in order."""

    def __init__(self, token: str = VIBER_TOKEN) -> None:
        super().__init__()
        self.token = token
        self.refused: list[dict[str, Any]] = []
        self.refuse_rich_media = False
        self.fail_next = 0  # answer this many send_message calls with 503
        self.calls = 0
        self.media: dict[str, bytes] = {}
        self.media_hits = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/pa"

    def media_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/media/{name}"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/pa/send_message", self._send_message)
        app.router.add_get("/media/{name}", self._media)

    async def _media(self, request: web.Request) -> web.Response:
        self.media_hits += 1
        data = self.media.get(request.match_info["name"])
        if data is None:
            return web.Response(status=404, text="no such media")
        return web.Response(body=data, content_type="image/jpeg")

    async def _send_message(self, request: web.Request) -> web.Response:
        self.calls += 1
        if request.headers.get("X-Viber-Auth-Token") != self.token:
            return web.json_response({"status": 2, "status_message": "invalidAuthToken"})
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=503, text="busy")
        raw = await request.read()
        if len(raw) > 30 * 1024:
            return web.json_response({"status": 3, "status_message": "badData: body over 30 KB"})
        body = json.loads(raw)
        problem = check_message(body)
        if problem is None and body.get("type") == "rich_media" and self.refuse_rich_media:
            problem = "rich media refused by this fake"
        if problem is not None:
            self.refused.append(body)
            self._changed.set()
            return web.json_response({"status": 3, "status_message": f"badData: {problem}"})
        self.sent.append(body)
        self._changed.set()
        return web.json_response(
            {"status": 0, "status_message": "ok", "message_token": 5741311803571721087, "billing_status": 1}
        )


def check_message(body: dict[str, Any]) -> str | None:
    """The first documented send_message rule `body` breaks, or None (Viber answers status 3 to such bodies)."""
    if not isinstance(body.get("receiver"), str) or not body["receiver"]:
        return "receiver missing"
    kind = body.get("type")
    if kind == "text":
        text = body.get("text")
        return None if isinstance(text, str) and 0 < len(text) <= 7000 else "text missing or over 7000"
    if kind == "picture":
        media = body.get("media")
        if not isinstance(media, str) or not media.startswith(("http://", "https://")):
            return "picture media is not a URL"
        return None if len(body.get("text", "")) <= 768 else "picture text over 768"
    if kind == "url":
        media = body.get("media")
        return None if isinstance(media, str) and 0 < len(media) <= 2000 else "url media missing or over 2000"
    if kind == "rich_media":
        return check_rich_media(body.get("rich_media"))
    return f"unsupported type {kind!r}"


def check_rich_media(rich: Any) -> str | None:
    if not isinstance(rich, dict) or rich.get("Type") != "rich_media":
        return "rich_media.Type missing"
    cols = rich.get("ButtonsGroupColumns", 6)
    rows = rich.get("ButtonsGroupRows", 7)
    if not (isinstance(cols, int) and 1 <= cols <= 6 and isinstance(rows, int) and 1 <= rows <= 7):
        return "ButtonsGroupColumns must be 1-6 and ButtonsGroupRows 1-7"
    buttons = rich.get("Buttons")
    if not isinstance(buttons, list) or not buttons:
        return "Buttons missing"
    area = 0
    for button in buttons:
        c, r = button.get("Columns", 6), button.get("Rows", 1)
        if not (1 <= c <= cols and 1 <= r <= rows):
            return "a button is larger than its group"
        if len(button.get("Text", "")) > 250:
            return "button Text over 250"
        if button.get("ActionType") == "open-url" and not str(button.get("ActionBody", "")).startswith("http"):
            return "open-url button without a URL"
        area += c * r
    if math.ceil(area / (cols * rows)) > 6:
        return "more than 6 cards"
    return None
