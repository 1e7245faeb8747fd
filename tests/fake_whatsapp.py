"""A fake WhatsApp Cloud (Graph) API on 127.0.0.1: media lookup and download, message and upload recording."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from aiohttp import web
from fake_server import LoopbackServer

ACCESS_TOKEN = "EAAGtestaccesstoken0123456789"
APP_SECRET = "0123456789abcdef0123456789abcdef"
VERIFY_TOKEN = "verify-me-please"
PHONE_NUMBER_ID = "106540352242922"
BUSINESS_ID = "102290129340398"
VERSION = "v21.0"


def sign_whatsapp(body: bytes, secret: str = APP_SECRET) -> str:
    """X-Hub-Signature-256 as Meta computes it: "sha256=" + hex HMAC-SHA256 of the raw body with the app secret."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def encode(payload: Any) -> bytes:
    # Meta signs an escaped-unicode serialisation; json.dumps' default ensure_ascii does the same.
    return json.dumps(payload).encode()


def envelope(value: dict[str, Any]) -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": BUSINESS_ID, "changes": [{"field": "messages", "value": value}]}],
    }


def _value(messages: list[dict[str, Any]], wa_id: str) -> dict[str, Any]:
    return {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
        "contacts": [{"profile": {"name": "Jo"}, "wa_id": wa_id}],
        "messages": messages,
    }


def image_message(wa_id: str, message_id: str, media_id: str, mime: str = "image/jpeg") -> dict[str, Any]:
    return {
        "from": wa_id,
        "id": message_id,
        "timestamp": "1749416383",
        "type": "image",
        "image": {"mime_type": mime, "sha256": "x" * 44, "id": media_id},
    }


def document_message(wa_id: str, message_id: str, media_id: str, mime: str) -> dict[str, Any]:
    return {
        "from": wa_id,
        "id": message_id,
        "timestamp": "1749416383",
        "type": "document",
        "document": {"filename": "shoe.jpg", "mime_type": mime, "sha256": "x" * 44, "id": media_id},
    }


def text_message(wa_id: str, message_id: str, text: str) -> dict[str, Any]:
    return {"from": wa_id, "id": message_id, "timestamp": "1749416383", "type": "text", "text": {"body": text}}


def messages_payload(wa_id: str, *messages: dict[str, Any]) -> dict[str, Any]:
    return envelope(_value(list(messages), wa_id))


def status_payload(wa_id: str, message_id: str = "wamid.OUT1", status: str = "delivered") -> dict[str, Any]:
    return envelope(
        {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
            "statuses": [
                {"id": message_id, "status": status, "timestamp": "1749416390", "recipient_id": wa_id,
                 "pricing": {"billable": True, "pricing_model": "CBP", "category": "service"}}
            ],
        }
    )


class FakeGraph(LoopbackServer):
    """`base_url` plays WHATSAPP_API_BASE_URL; `sent` holds accepted /messages bodies, `uploads` the media uploads."""

    def __init__(self, token: str = ACCESS_TOKEN, phone_id: str = PHONE_NUMBER_ID) -> None:
        super().__init__()
        self.token = token
        self.phone_id = phone_id
        self.media: dict[str, tuple[bytes, str]] = {}  # media id -> (bytes, mime type)
        self.uploads: list[dict[str, Any]] = []
        self.fail_next = 0  # answer this many /messages calls with 500
        self.download_status: int | None = None  # force this status on media downloads
        self.unauthorized = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{VERSION}"

    def routes(self, app: web.Application) -> None:
        app.router.add_get(f"/{VERSION}/{{media_id}}", self._media_info)
        app.router.add_get("/download/{media_id}", self._download)
        app.router.add_post(f"/{VERSION}/{{phone_id}}/messages", self._messages)
        app.router.add_post(f"/{VERSION}/{{phone_id}}/media", self._upload)

    def _authorized(self, request: web.Request) -> bool:
        ok = request.headers.get("Authorization") == f"Bearer {self.token}"
        if not ok:
            self.unauthorized += 1
        return ok

    @staticmethod
    def _error(status: int, message: str, code: int) -> web.Response:
        return web.json_response({"error": {"message": message, "type": "OAuthException", "code": code}}, status=status)

    async def _media_info(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Invalid OAuth access token.", 190)
        media_id = request.match_info["media_id"]
        if media_id not in self.media:
            return self._error(404, "Unsupported get request.", 100)
        data, mime = self.media[media_id]
        return web.json_response(
            {
                "messaging_product": "whatsapp",
                "url": f"http://127.0.0.1:{self.port}/download/{media_id}?ext=1&hash=abc",
                "mime_type": mime,
                "sha256": hashlib.sha256(data).hexdigest(),
                "file_size": len(data),
                "id": media_id,
            }
        )

    async def _download(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.Response(status=401, text="unauthorized")
        if self.download_status is not None:
            return web.Response(status=self.download_status, text="nope")
        data, mime = self.media.get(request.match_info["media_id"], (b"", ""))
        if not data:
            return web.Response(status=404, text="gone")
        return web.Response(body=data, content_type=mime)

    async def _messages(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Invalid OAuth access token.", 190)
        if request.match_info["phone_id"] != self.phone_id:
            return self._error(400, "Unsupported post request.", 100)
        if self.fail_next > 0:
            self.fail_next -= 1
            return self._error(500, "An unknown error occurred", 1)
        body = await request.json()
        problem = check_message(body)
        if problem is not None:
            return self._error(400, f"(#100) Invalid parameter: {problem}", 100)
        self.sent.append(body)
        self._changed.set()
        return web.json_response(
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": body["to"], "wa_id": body["to"]}],
                "messages": [{"id": f"wamid.OUT{len(self.sent)}"}],
            }
        )

    async def _upload(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, "Invalid OAuth access token.", 190)
        form = await request.post()
        upload = form.get("file")
        if form.get("messaging_product") != "whatsapp" or upload is None or not hasattr(upload, "file"):
            return self._error(400, "(#100) The parameter messaging_product and file are required.", 100)
        data = upload.file.read()
        mime = upload.content_type
        if mime not in ("image/jpeg", "image/png"):
            return self._error(400, f"(#100) Param file must be a file with one of the types; got {mime}", 100)
        media_id = f"upl{len(self.uploads) + 1}"
        self.uploads.append({"id": media_id, "size": len(data), "mime": mime, "type": form.get("type")})
        self.media[media_id] = (data, mime)
        return web.json_response({"id": media_id})


def check_message(body: dict[str, Any]) -> str | None:
    """The first documented rule a /messages body breaks, or None."""
    if body.get("messaging_product") != "whatsapp":
        return "messaging_product must be whatsapp"
    if not isinstance(body.get("to"), str) or not body["to"]:
        return "to"
    kind = body.get("type", "text")
    if kind == "text":
        text = body.get("text", {}).get("body")
        return None if isinstance(text, str) and 0 < len(text) <= 4096 else "text.body"
    if kind == "image":
        image = body.get("image", {})
        if ("id" in image) == ("link" in image):
            return "image needs exactly one of id and link"
        return None if len(image.get("caption", "")) <= 1024 else "image.caption over 1024"
    if kind == "interactive":
        interactive = body.get("interactive", {})
        buttons = interactive.get("action", {}).get("buttons", [])
        if interactive.get("type") != "button" or not 1 <= len(buttons) <= 3:
            return "interactive buttons"
        if any(len(b.get("reply", {}).get("title", "")) > 20 for b in buttons):
            return "button title over 20"
        return None if 0 < len(interactive.get("body", {}).get("text", "")) <= 1024 else "interactive.body.text"
    return f"type {kind!r}"
