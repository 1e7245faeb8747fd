"""A fake Telegram Bot API server on 127.0.0.1 that speaks the real HTTP protocol, records calls and injects faults."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from PIL import Image

TOKEN = "123456789:TEST-fake-token_abcdefghijklmnop"
BOT_ID = 123456789
BOT_USERNAME = "vsearch_test_bot"
BLOCKED = "Forbidden: bot was blocked by the user"
NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup are exactly "
    "the same as a current content and reply markup of the message"
)
# Form fields whose values python-telegram-bot JSON-encodes (strings are sent as they are).
_JSON_FIELDS = frozenset(
    {
        "chat_id", "message_id", "reply_markup", "media", "offset", "limit", "timeout", "allowed_updates",
        "show_alert", "cache_time", "drop_pending_updates", "max_connections", "commands",
        "reply_to_message_id", "disable_notification", "reply_parameters", "link_preview_options",
    }
)
_SEND_METHODS = frozenset(
    {"sendMessage", "sendPhoto", "sendMediaGroup", "sendChatAction", "editMessageText", "sendDocument"}
)


@dataclass(frozen=True)
class Upload:
    name: str  # multipart part name ("photo" or the attach:// name)
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Call:
    method: str
    params: dict[str, Any]
    files: dict[str, Upload]
    at: float  # time.monotonic() when the request arrived
    status: int = 200  # what the fake answered


@dataclass
class _Failure:
    status: int
    description: str
    retry_after: int | None
    times: int


@dataclass
class _StoredFile:
    file_id: str
    unique_id: str
    path: str
    data: bytes


@dataclass
class FakeTelegram:
    """Start with `await fake.start()`; point python-telegram-bot at `base_url` / `file_base_url`."""

    token: str = TOKEN
    calls: list[Call] = field(default_factory=list)
    webhook_url: str = ""
    webhook_secret: str | None = None

    def __post_init__(self) -> None:
        self._updates: deque[dict[str, Any]] = deque()
        self._update_ids = itertools.count(1000)
        self._message_ids = itertools.count(1)
        self._file_ids = itertools.count(1)
        self._files: dict[str, _StoredFile] = {}
        self._files_by_path: dict[str, _StoredFile] = {}
        self._failures: dict[str, deque[_Failure]] = defaultdict(deque)
        self._blocked: set[int] = set()
        self._messages: dict[tuple[int, int], dict[str, Any]] = {}
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=60 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._api)
        app.router.add_get("/file/bot{token}/{path:.+}", self._download)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def file_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    # -- test controls -----------------------------------------------------------------------------

    def enqueue(self, update: dict[str, Any]) -> int:
        """Queue an update for getUpdates; assigns `update_id` when missing. Returns it."""
        update = dict(update)
        update.setdefault("update_id", next(self._update_ids))
        self._updates.append(update)
        self._notify()
        return update["update_id"]

    def add_file(self, data: bytes, suffix: str = "jpg", folder: str = "photos") -> str:
        """Store a downloadable file (as if a user had sent it); returns its file_id."""
        n = next(self._file_ids)
        stored = _StoredFile(f"FILE{n:05d}-in", f"U{n:05d}", f"{folder}/file_{n}.{suffix}", data)
        self._files[stored.file_id] = stored
        self._files_by_path[stored.path] = stored
        return stored.file_id

    def fail_next(self, method: str, status: int, description: str, retry_after: int | None = None, times: int = 1) -> None:
        """The next `times` calls of `method` get this error instead of running."""
        self._failures[method].append(_Failure(status, description, retry_after, times))

    def flood(self, method: str, retry_after: int, times: int = 1) -> None:
        self.fail_next(method, 429, f"Too Many Requests: retry after {retry_after}", retry_after, times)

    def block(self, chat_id: int) -> None:
        """Every send to this chat answers 403, as when the user has blocked the bot."""
        self._blocked.add(chat_id)

    def calls_of(self, method: str, chat_id: int | None = None, ok_only: bool = True) -> list[Call]:
        return [
            c
            for c in self.calls
            if c.method == method
            and (chat_id is None or c.params.get("chat_id") == chat_id)
            and (not ok_only or c.status == 200)
        ]

    def sent_to(self, chat_id: int) -> list[Call]:
        """Successful sends and edits for one chat, in order (chat actions left out)."""
        return [
            c
            for c in self.calls
            if c.method in _SEND_METHODS - {"sendChatAction"} and c.params.get("chat_id") == chat_id and c.status == 200
        ]

    async def wait_for(self, method: str, count: int = 1, chat_id: int | None = None, timeout: float = 20.0) -> list[Call]:
        """Wait until `method` was answered successfully `count` times (for that chat); returns those calls."""

        def ready() -> bool:
            return len(self.calls_of(method, chat_id)) >= count

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout)
            except TimeoutError:
                seen = [(c.method, c.status) for c in self.calls[-15:]]
                raise AssertionError(f"{method} x{count} not called within {timeout}s; last calls: {seen}") from None
        return self.calls_of(method, chat_id)

    async def deliver_webhook(self, update: dict[str, Any], secret: str | None = "<registered>") -> aiohttp.ClientResponse:
        """POST an update to the registered webhook URL, as Telegram does; returns the (read) response."""
        if not self.webhook_url:
            raise AssertionError("setWebhook was not called")
        update = dict(update)
        update.setdefault("update_id", next(self._update_ids))
        headers = {"Content-Type": "application/json"}
        token = self.webhook_secret if secret == "<registered>" else secret
        if token is not None:
            headers["X-Telegram-Bot-Api-Secret-Token"] = token
        async with aiohttp.ClientSession() as session, session.post(self.webhook_url, data=json.dumps(update), headers=headers) as resp:
            await resp.read()
            return resp

    # -- HTTP handlers -----------------------------------------------------------------------------

    def _notify(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(notify())

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if request.match_info["token"] != self.token:
            return _error(401, "Unauthorized")
        params, files = await _read_params(request)
        failure = self._take_failure(method)
        status, body = (failure[0], failure[1]) if failure else await self._dispatch(method, params, files)
        if method != "getUpdates":
            self.calls.append(Call(method, params, files, time.monotonic(), status))
            self._notify()
        return web.json_response(body, status=status)

    def _take_failure(self, method: str) -> tuple[int, dict[str, Any]] | None:
        queue = self._failures.get(method)
        if not queue:
            return None
        failure = queue[0]
        failure.times -= 1
        if failure.times <= 0:
            queue.popleft()
        body: dict[str, Any] = {"ok": False, "error_code": failure.status, "description": failure.description}
        if failure.retry_after is not None:
            body["parameters"] = {"retry_after": failure.retry_after}
        return failure.status, body

    async def _dispatch(self, method: str, params: dict[str, Any], files: dict[str, Upload]) -> tuple[int, dict[str, Any]]:
        chat_id = params.get("chat_id")
        if method in _SEND_METHODS and chat_id in self._blocked:
            return 403, {"ok": False, "error_code": 403, "description": BLOCKED}
        handler = getattr(self, f"_m_{method}", None)
        if handler is None:
            return 404, {"ok": False, "error_code": 404, "description": "Not Found: method not found"}
        try:
            result = await handler(params, files)
        except _BadRequest as exc:
            return 400, {"ok": False, "error_code": 400, "description": f"Bad Request: {exc}"}
        return 200, {"ok": True, "result": result}

    async def _download(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return _error(401, "Unauthorized")
        stored = self._files_by_path.get(request.match_info["path"])
        if stored is None:
            return _error(404, "Not Found")
        self.calls.append(Call("download", {"file_path": stored.path}, {}, time.monotonic()))
        self._notify()
        return web.Response(body=stored.data, content_type="application/octet-stream")

    # -- Bot API methods ---------------------------------------------------------------------------

    async def _m_getMe(self, params: dict[str, Any], files: dict[str, Upload]) -> dict[str, Any]:
        return {
            "id": BOT_ID, "is_bot": True, "first_name": "vsearch test", "username": BOT_USERNAME,
            "can_join_groups": True, "can_read_all_group_messages": False, "supports_inline_queries": False,
        }

    async def _m_getUpdates(self, params: dict[str, Any], files: dict[str, Upload]) -> list[dict[str, Any]]:
        offset = int(params.get("offset") or 0)
        limit = int(params.get("limit") or 100)
        timeout = float(params.get("timeout") or 0)
        while self._updates and self._updates[0]["update_id"] < offset:
            self._updates.popleft()  # confirmed by the offset

        def pending() -> list[dict[str, Any]]:
            return [u for u in self._updates if u["update_id"] >= offset][:limit]

        if not pending() and timeout > 0:
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait_for(lambda: bool(pending())), timeout)
        return pending()

    async def _m_deleteWebhook(self, params: dict[str, Any], files: dict[str, Upload]) -> bool:
        self.webhook_url, self.webhook_secret = "", None
        if params.get("drop_pending_updates"):
            self._updates.clear()
        return True

    async def _m_setWebhook(self, params: dict[str, Any], files: dict[str, Upload]) -> bool:
        url = str(params.get("url", ""))
        if url and not url.startswith(("https://", "http://127.0.0.1")):
            raise _BadRequest("bad webhook: An HTTPS URL must be provided for webhook")
        self.webhook_url, self.webhook_secret = url, params.get("secret_token")
        return True

    async def _m_getWebhookInfo(self, params: dict[str, Any], files: dict[str, Upload]) -> dict[str, Any]:
        return {"url": self.webhook_url, "has_custom_certificate": False, "pending_update_count": len(self._updates)}

    async def _m_setMyCommands(self, params: dict[str, Any], files: dict[str, Upload]) -> bool:
        return True

    async def _m_getFile(self, params: dict[str, Any], files: dict[str, Upload]) -> dict[str, Any]:
        stored = self._files.get(str(params.get("file_id")))
        if stored is None:
            raise _BadRequest("invalid file_id")
        if len(stored.data) > 20 * 1024 * 1024:
            raise _BadRequest("file is too big")
        return {"file_id": stored.file_id, "file_unique_id": stored.unique_id, "file_size": len(stored.data), "file_path": stored.path}

    async def _m_sendChatAction(self, params: dict[str, Any], files: dict[str, Upload]) -> bool:
        if params.get("action") not in ("typing", "upload_photo", "upload_document", "find_location"):
            raise _BadRequest("wrong parameter action in request")
        return True

    async def _m_sendMessage(self, params: dict[str, Any], files: dict[str, Upload]) -> dict[str, Any]:
        text = params.get("text")
        if not text:
            raise _BadRequest("message text is empty")
        if len(text) > 4096:
            raise _BadRequest("message is too long")
        _check_markup(params.get("reply_markup"))
        message = self._message(params["chat_id"], text=text)
        if params.get("reply_markup"):
            message["reply_markup"] = params["reply_markup"]
        return message

    async def _m_editMessageText(self, params: dict[str, Any], files: dict[str, Upload]) -> dict[str, Any]:
        key = (params.get("chat_id"), params.get("message_id"))
        message = self._messages.get(key)  # type: ignore[arg-type]
        if message is None:
            raise _BadRequest("message to edit not found")
        if message.get("text") == params.get("text"):
            raise _BadRequest(NOT_MODIFIED.removeprefix("Bad Request: "))
        message["text"] = params.get("text")
        message["edit_date"] = int(time.time())
        return message

    async def _m_answerCallbackQuery(self, params: dict[str, Any], files: dict[str, Upload]) -> bool:
        if not params.get("callback_query_id"):
            raise _BadRequest("query is too old and response timeout expired or query ID is invalid")
        if len(params.get("text") or "") > 200:
            raise _BadRequest("MESSAGE_TOO_LONG")
        return True

    async def _m_sendPhoto(self, params: dict[str, Any], files: dict[str, Upload]) -> dict[str, Any]:
        caption = params.get("caption") or ""
        if len(caption) > 1024:
            raise _BadRequest("message caption is too long")
        _check_markup(params.get("reply_markup"))
        photo = self._photo_sizes(params.get("photo"), files, "photo")
        message = self._message(params["chat_id"], photo=photo, caption=caption or None)
        return message

    async def _m_sendMediaGroup(self, params: dict[str, Any], files: dict[str, Upload]) -> list[dict[str, Any]]:
        media = params.get("media")
        if not isinstance(media, list) or not 2 <= len(media) <= 10:
            raise _BadRequest("wrong number of media in the album (must be 2-10)")
        if "reply_markup" in params:
            raise _BadRequest("an album cannot have an inline keyboard")
        group_id = str(next(self._message_ids) * 1000)
        messages = []
        for item in media:
            if not isinstance(item, dict) or item.get("type") != "photo":
                raise _BadRequest("unsupported media type in the album")
            caption = item.get("caption") or ""
            if len(caption) > 1024:
                raise _BadRequest("message caption is too long")
            photo = self._photo_sizes(item.get("media"), files, None)
            message = self._message(params["chat_id"], photo=photo, caption=caption or None)
            message["media_group_id"] = group_id
            messages.append(message)
        return messages

    # -- helpers -----------------------------------------------------------------------------------

    def _message(self, chat_id: int, **content: Any) -> dict[str, Any]:
        message_id = next(self._message_ids)
        message: dict[str, Any] = {
            "message_id": message_id,
            "date": int(time.time()),
            "chat": {"id": chat_id, "type": "private"},
            "from": {"id": BOT_ID, "is_bot": True, "first_name": "vsearch test", "username": BOT_USERNAME},
        }
        message.update({k: v for k, v in content.items() if v is not None})
        self._messages[(chat_id, message_id)] = message
        return message

    def _photo_sizes(self, media: Any, files: dict[str, Upload], field_name: str | None) -> list[dict[str, Any]]:
        """Resolve an uploaded file, a known file_id or a URL into the PhotoSize list Telegram returns."""
        if media is None and field_name is not None and field_name in files:
            data = files[field_name].data
        elif isinstance(media, str) and media.startswith("attach://"):
            upload = files.get(media.removeprefix("attach://"))
            if upload is None:
                raise _BadRequest(f"file {media} not found in the request")
            data = upload.data
        elif isinstance(media, str) and media.startswith(("http://", "https://")):
            data = b""  # Telegram would fetch it; the fake only records it
        elif isinstance(media, str) and media in self._files:
            return [{"file_id": media, "file_unique_id": self._files[media].unique_id, "width": 320, "height": 320}]
        else:
            raise _BadRequest("wrong file identifier/HTTP URL specified")
        if data:
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image.verify()
            except Exception:
                raise _BadRequest("IMAGE_PROCESS_FAILED") from None
        n = next(self._file_ids)
        small = _StoredFile(f"FILE{n:05d}-s", f"U{n:05d}s", f"photos/out_{n}_s.jpg", data)
        large = _StoredFile(f"FILE{n:05d}-x", f"U{n:05d}x", f"photos/out_{n}_x.jpg", data)
        for stored in (small, large):
            self._files[stored.file_id] = stored
            self._files_by_path[stored.path] = stored
        return [
            {"file_id": small.file_id, "file_unique_id": small.unique_id, "width": 90, "height": 90, "file_size": 1000},
            {"file_id": large.file_id, "file_unique_id": large.unique_id, "width": 320, "height": 320, "file_size": len(data) or 5000},
        ]

    def file_data(self, file_id: str) -> bytes:
        return self._files[file_id].data

    def was_issued(self, file_id: str) -> bool:
        """Whether this file_id came back from one of the fake's own send answers."""
        return file_id in self._files and "-in" not in file_id


class _BadRequest(Exception):
    pass


def _error(status: int, description: str) -> web.Response:
    return web.json_response({"ok": False, "error_code": status, "description": description}, status=status)


def _check_markup(markup: Any) -> None:
    if markup is None:
        return
    rows = markup.get("inline_keyboard") if isinstance(markup, dict) else None
    if not isinstance(rows, list):
        raise _BadRequest("can't parse reply keyboard markup JSON object")
    for row in rows:
        for button in row:
            if not button.get("text"):
                raise _BadRequest("text buttons are unallowed in the inline keyboard")
            if "url" in button and not str(button["url"]).startswith(("http://", "https://", "tg://")):
                raise _BadRequest("inline keyboard button URL is invalid")
            data = button.get("callback_data")
            if data is not None and not 1 <= len(data.encode()) <= 64:
                raise _BadRequest("BUTTON_DATA_INVALID")
            if "url" not in button and data is None:
                raise _BadRequest("inline keyboard button must have url or callback_data")


async def _read_params(request: web.Request) -> tuple[dict[str, Any], dict[str, Upload]]:
    """Decode a Bot API request the way Telegram does: query string, urlencoded form, multipart or JSON."""
    raw: dict[str, Any] = dict(request.query)
    files: dict[str, Upload] = {}
    if request.content_type == "application/json":
        body = await request.json()
        return {**raw, **body}, files
    if request.method == "POST":
        form = await request.post()
        for name, value in form.items():
            if isinstance(value, web.FileField):
                files[name] = Upload(name, value.filename, value.content_type, value.file.read())
            else:
                raw[name] = value
    params: dict[str, Any] = {}
    for name, value in raw.items():
        if name in _JSON_FIELDS and isinstance(value, str):
            try:
                params[name] = json.loads(value)
                continue
            except ValueError:
                pass
        params[name] = value
    return params, files


# -- Update builders ---------------------------------------------------------------------------------

_update_ids = itertools.count(1)
_message_ids = itertools.count(50_000)


def user(user_id: int, first_name: str = "Ann") -> dict[str, Any]:
    return {"id": user_id, "is_bot": False, "first_name": first_name, "language_code": "en"}


def _message_base(chat_id: int, user_id: int | None = None) -> dict[str, Any]:
    uid = chat_id if user_id is None else user_id
    return {
        "message_id": next(_message_ids),
        "date": int(time.time()),
        "chat": {"id": chat_id, "type": "private", "first_name": "Ann"},
        "from": user(uid),
    }


def text_update(chat_id: int, text: str, user_id: int | None = None) -> dict[str, Any]:
    message = _message_base(chat_id, user_id)
    message["text"] = text
    if text.startswith("/"):
        command = text.split()[0]
        message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(command)}]
    return {"message": message}


def command_update(chat_id: int, command: str, user_id: int | None = None) -> dict[str, Any]:
    return text_update(chat_id, command if command.startswith("/") else f"/{command}", user_id)


def photo_sizes(fake: FakeTelegram, image_bytes: bytes) -> list[dict[str, Any]]:
    """Store the photo as Telegram does (a thumbnail, a medium and the full size) and list its PhotoSizes.

    The list is deliberately not ordered by size: clients must pick the largest themselves.
    """
    with Image.open(io.BytesIO(image_bytes)) as image:
        image.load()
        width, height = image.size
        sizes = []
        for side in (90, 320):
            thumb = image.convert("RGB")
            thumb.thumbnail((side, side))
            out = io.BytesIO()
            thumb.save(out, "JPEG", quality=80)
            sizes.append((thumb.size, out.getvalue()))
    sizes.append(((width, height), image_bytes))
    entries = []
    for (w, h), data in sizes:
        file_id = fake.add_file(data)
        entries.append({"file_id": file_id, "file_unique_id": "u" + file_id, "width": w, "height": h, "file_size": len(data)})
    return [entries[1], entries[2], entries[0]]


def photo_update(fake: FakeTelegram, chat_id: int, image_bytes: bytes, user_id: int | None = None) -> dict[str, Any]:
    """A compressed photo message. For bytes that are not an image, one size is stored as they are."""
    message = _message_base(chat_id, user_id)
    try:
        message["photo"] = photo_sizes(fake, image_bytes)
    except Exception:  # a corrupt "photo": Telegram would not make thumbnails either
        file_id = fake.add_file(image_bytes)
        message["photo"] = [{"file_id": file_id, "file_unique_id": "u" + file_id, "width": 800, "height": 600, "file_size": len(image_bytes)}]
    return {"message": message}


def document_update(
    fake: FakeTelegram, chat_id: int, data: bytes, mime_type: str = "image/jpeg", file_name: str = "shoe.jpg",
    user_id: int | None = None, animation: bool = False,
) -> dict[str, Any]:
    """A file sent "as a document" (original bytes). `animation=True` makes it a GIF animation message."""
    message = _message_base(chat_id, user_id)
    file_id = fake.add_file(data, suffix=file_name.rsplit(".", 1)[-1], folder="documents")
    document = {"file_id": file_id, "file_unique_id": "u" + file_id, "file_name": file_name, "mime_type": mime_type, "file_size": len(data)}
    message["document"] = document
    if animation:
        message["animation"] = {**document, "width": 100, "height": 100, "duration": 1}
    return {"message": message}


def callback_update(chat_id: int, data: str, user_id: int | None = None, message_id: int = 1) -> dict[str, Any]:
    uid = chat_id if user_id is None else user_id
    return {
        "callback_query": {
            "id": f"cbq{next(_update_ids)}",
            "from": user(uid),
            "chat_instance": f"ci{chat_id}",
            "data": data,
            "message": {
                "message_id": message_id,
                "date": int(time.time()),
                "chat": {"id": chat_id, "type": "private", "first_name": "Ann"},
                "from": {"id": BOT_ID, "is_bot": True, "first_name": "vsearch test", "username": BOT_USERNAME},
                "text": "Here is what I found:",
            },
        }
    }


def buttons(call: Call) -> list[dict[str, Any]]:
    """All inline buttons of a sendMessage/sendPhoto call, flattened."""
    markup = call.params.get("reply_markup") or {}
    return [button for row in markup.get("inline_keyboard", []) for button in row]
