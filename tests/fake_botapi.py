"""A fake Telegram Bot API: a real HTTP server on 127.0.0.1, for subprocess and load tests.

    with FakeBotApiServer(TOKEN) as tg:                  # TELEGRAM_API_BASE_URL=tg.base_url
        tg.push(updates.update(updates.message(...)))   # served by getUpdates
        tg.wait_for(lambda: tg.of("sendPhoto"))         # or `await tg.until(...)` in a loop
        tg.calls[-1].params, .files, .at, .status       # every call, with its time

It speaks the Bot API over HTTP the way python-telegram-bot sends it (form fields, JSON-
encoded objects, multipart uploads): getMe, getUpdates (long poll, confirmed by `offset`
like Telegram: an update is served again until a later getUpdates confirms it),
deleteWebhook, setMyCommands, sendMessage, sendInvoice, answerPreCheckoutQuery,
refundStarPayment (tests.telegram_objects: Stars as Telegram answers them), editMessageText, editMessageCaption,
editMessageMedia, deleteMessage, sendChatAction, sendPhoto, sendDocument, sendMediaGroup, answerCallbackQuery, getFile, and file downloads
under /file/bot<token>/<file_path>. Uploaded photos and documents get file ids whose bytes
can be downloaded again, so buttons work across a bot restart.

With `flood=True` it enforces the documented flood limits the way Telegram does, answering
429 with `parameters.retry_after`: one message a second per chat, 20 a minute per group,
30 a second overall (`sendMediaGroup` counts each item; edits count; deletions and chat
actions do not). Its clock is a `Timebase`, so a test can run it scaled with the bot's.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote

from bots.telegram.flood import Timebase
from tests.telegram_objects import BotObjects

BOT_ID = 123456789
BOT_USERNAME = "ThisBot"
# Parameters PTB sends as plain strings (everything else arrives JSON-encoded).
TEXT_FIELDS = frozenset(
    {
        "text",
        "caption",
        "action",
        "parse_mode",
        "file_id",
        "callback_query_id",
        "language_code",
        "url",
        "secret_token",
        "description",
        "short_description",
        "name",
    }
)
# What the flood rules count as messages (an oracle of its own, not the bot's list).
COUNTED = frozenset(
    {
        "sendMessage",
        "sendPhoto",
        "sendDocument",
        "sendMediaGroup",
        "editMessageText",
        "editMessageCaption",
        "editMessageMedia",
    }
)


@dataclass
class Upload:
    """One file part of a multipart call."""

    name: str
    filename: str | None
    data: bytes
    mime: str | None


@dataclass
class Call:
    """One Bot API call as the server saw it."""

    method: str
    params: dict[str, Any]
    files: dict[str, Upload]
    at: float  # Timebase seconds, on arrival
    status: int = 200
    result: Any = None
    description: str = ""

    @property
    def chat_id(self) -> int | str | None:
        """Return the call's chat_id, if any."""
        return self.params.get("chat_id")

    @property
    def cost(self) -> int:
        """Return how many messages the call counts for under the flood rules."""
        if self.method not in COUNTED:
            return 0
        if self.method == "sendMediaGroup":
            return len(self.params.get("media") or ())
        return 1


@dataclass
class FloodRules:
    """Telegram's documented flood limits."""

    per_chat_interval: float = 1.0
    group_per_minute: int = 20
    overall_per_second: int = 30


@dataclass
class _Flood:
    rules: FloodRules
    last: dict[str, float] = field(default_factory=dict)
    group: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    overall: list[tuple[float, int]] = field(default_factory=list)

    def check(self, chat: str, group: bool, cost: int, now: float) -> float:
        """Return 0 and count the message, or the seconds to wait (nothing counted)."""
        rules = self.rules
        waits = [self.last.get(chat, -math.inf) + rules.per_chat_interval - now]
        self.overall = [(t, c) for t, c in self.overall if t > now - 1.0]
        if sum(c for _, c in self.overall) + cost > rules.overall_per_second:
            waits.append(self.overall[0][0] + 1.0 - now)
        window = self.group.setdefault(chat, [])
        if group:
            window[:] = [(t, c) for t, c in window if t > now - 60.0]
            if sum(c for _, c in window) + cost > rules.group_per_minute:
                waits.append(window[0][0] + 60.0 - now)
        wait = max(waits)
        if wait > 0:
            return wait
        self.last[chat] = now
        self.overall.append((now, cost))
        if group:
            window.append((now, cost))
        return 0.0


class FakeBotApiServer(BotObjects):
    """A Bot API server on 127.0.0.1 that records every call and answers like Telegram."""

    def __init__(
        self,
        token: str,
        *,
        bot_id: int = BOT_ID,
        username: str = BOT_USERNAME,
        timebase: Timebase | None = None,
        flood: bool | FloodRules = False,
        poll_timeout: float = 0.25,
    ) -> None:
        self.token = token
        self.bot_id = bot_id
        self.username = username
        self.timebase = timebase or Timebase()
        rules = flood if isinstance(flood, FloodRules) else FloodRules()
        self._flood = _Flood(rules) if flood else None
        self.poll_timeout = poll_timeout  # longest a getUpdates waits (seconds, wall clock)
        self.calls: list[Call] = []
        self.files: dict[str, bytes] = {}
        self.downloads: list[str] = []
        # Stars charges paid to this bot: telegram_payment_charge_id -> payer's user id.
        self.paid_charges: dict[str, int] = {}
        self.confirmed = 0  # highest offset a getUpdates sent (updates below it are gone)
        self._updates: list[dict[str, Any]] = []
        self._ids = 1000
        self._lock = threading.Condition()
        self._stopping = False
        self._faults: dict[str, list[tuple[int, float]]] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> FakeBotApiServer:
        """Serve in a background thread."""
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.api = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name="fake-bot-api",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (waiting long polls return at once). Safe to call twice."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeBotApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """Return the server root (TELEGRAM_API_BASE_URL)."""
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # --- control and inspection -------------------------------------------------------
    def push(self, *updates: dict[str, Any]) -> None:
        """Queue updates for getUpdates."""
        with self._lock:
            self._updates.extend(updates)
            self._updates.sort(key=lambda u: u["update_id"])  # Telegram serves them in order
            self._lock.notify_all()

    def store(self, file_id: str, data: bytes) -> str:
        """Put a file on the server (as if a user had uploaded it)."""
        with self._lock:
            self.files[file_id] = data
        return file_id

    def of(self, *methods: str, ok: bool | None = None) -> list[Call]:
        """Return the recorded calls of some methods, in order (ok: only 200s / only errors)."""
        with self._lock:
            calls = [c for c in self.calls if c.method in methods]
        if ok is None:
            return calls
        return [c for c in calls if (c.status == 200) == ok]

    def texts(self, chat_id: int | None = None) -> list[str]:
        """Return the texts sent or edited in (to one chat), in order."""
        return [
            str(c.params.get("text"))
            for c in self.of("sendMessage", "editMessageText", ok=True)
            if chat_id is None or c.chat_id == chat_id
        ]

    @property
    def flood_refusals(self) -> list[Call]:
        """Return the calls answered 429."""
        with self._lock:
            return [c for c in self.calls if c.status == 429]

    def wait_for(self, check: Callable[[], Any], within: float = 15.0) -> Any:
        """Block until `check()` is truthy (for tests driving a subprocess); return it."""
        deadline = time.monotonic() + within
        while not (value := check()):
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting; calls: {self._summary()}")
            time.sleep(0.02)
        return value

    async def until(self, check: Callable[[], Any], within: float = 15.0) -> Any:
        """Wait without blocking the event loop until `check()` is truthy; return it."""
        deadline = time.monotonic() + within
        while not (value := check()):
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting; calls: {self._summary()}")
            await asyncio.sleep(0.02)
        return value

    def inject(self, method: str, *, status: int = 502, times: int = 1, delay: float = 0.0) -> None:
        """Make the next `times` calls of `method` wait `delay` seconds, then fail with
        `status` (0: answer normally after the wait). times=-1: every call from now on."""
        with self._lock:
            self._faults[method] = [(status, delay)] * (10**6 if times < 0 else times)

    def clear_faults(self) -> None:
        """Answer every method normally again."""
        with self._lock:
            self._faults.clear()

    def _summary(self) -> list[str]:
        with self._lock:
            return [c.method for c in self.calls if c.method != "getUpdates"][-40:]

    # --- serving ----------------------------------------------------------------------
    def handle(self, path: str, body: bytes, ctype: str) -> tuple[int, bytes, str]:
        """Answer one HTTP request: (status, body, content type)."""
        prefix = f"/bot{self.token}/"
        file_prefix = f"/file/bot{self.token}/"
        if path.startswith(file_prefix):
            return self._download(path[len(file_prefix) :])
        if not path.startswith(prefix):
            return (
                _error(401, "Unauthorized")
                if path.startswith(("/bot", "/file/bot"))
                else (
                    404,
                    b"Not Found",
                    "text/plain",
                )
            )
        method = path[len(prefix) :]
        params, files = _parse_body(body, ctype)
        call = Call(method, params, files, self.timebase.now())
        if method == "getUpdates":
            return self._get_updates(call)
        with self._lock:
            self.calls.append(call)
            faults = self._faults.get(method)
            fault = faults.pop(0) if faults else None
        if fault is not None:
            status, delay = fault
            if delay:
                call.status = 0  # not answered (yet): a hung upload is no delivery
                time.sleep(delay)
                call.status = 200
            if status:
                call.status, call.description = status, "Bad Gateway"
                return _error(status, call.description)
        with self._lock:
            if self._flood is not None and call.cost and call.chat_id is not None:
                wait = self._flood.check(
                    str(call.chat_id), _is_group(call.chat_id), call.cost, call.at
                )
                if wait > 0:
                    retry = max(1, math.ceil(wait))
                    call.status, call.description = 429, f"Too Many Requests: retry after {retry}"
                    return _error(429, call.description, retry_after=retry)
            try:
                call.result = self._answer(method, params, files)
            except _BadRequest as err:
                call.status, call.description = 400, f"Bad Request: {err}"
                return _error(400, call.description)
        return 200, json.dumps({"ok": True, "result": call.result}).encode(), "application/json"

    def _download(self, file_path: str) -> tuple[int, bytes, str]:
        file_id = file_path.rsplit("/", 1)[-1]
        with self._lock:
            self.downloads.append(file_id)
            data = self.files.get(file_id)
        if data is None:
            return 404, b"Not Found", "text/plain"
        return 200, data, "application/octet-stream"

    def _get_updates(self, call: Call) -> tuple[int, bytes, str]:
        params = call.params
        offset = int(params.get("offset") or 0)
        limit = int(params.get("limit") or 100)
        timeout = min(float(params.get("timeout") or 0), self.poll_timeout)
        deadline = time.monotonic() + timeout
        with self._lock:
            self.calls.append(call)
            if offset:
                # Telegram forgets every update below the offset: they are confirmed.
                self.confirmed = max(self.confirmed, offset)
                self._updates = [u for u in self._updates if u["update_id"] >= offset]
            while not self._updates and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            batch = self._updates[:limit]
            call.result = batch
        return 200, json.dumps({"ok": True, "result": batch}).encode(), "application/json"

    # --- answers (called with the lock held) -----------------------------------------
    def _chat_id(self, params: dict[str, Any]) -> int:
        chat_id = params.get("chat_id")
        if not isinstance(chat_id, int):
            raise _BadRequest("chat not found")
        return chat_id

    def _upload(self, files: dict[str, Upload], value: Any) -> Upload:
        name = str(value).removeprefix("attach://")
        if name not in files:
            raise _BadRequest("wrong file identifier/HTTP URL specified")
        return files[name]

    def _answer(self, method: str, params: dict[str, Any], files: dict[str, Upload]) -> Any:
        if method == "getMe":
            return self.bot_user()
        try:
            handled, result = self._payments(method, params)
        except ValueError as err:
            raise _BadRequest(str(err).removeprefix("Bad Request: ")) from None
        if handled:
            return result
        if method in (
            "deleteWebhook", "setWebhook", "setMyCommands", "answerCallbackQuery", "sendChatAction"
        ):
            return True
        if method == "deleteMessage":
            return True
        if method == "sendMessage":
            if not str(params.get("text") or "").strip():
                raise _BadRequest("message text is empty")
            return self._message(params, text=params["text"])
        if method == "editMessageText":
            return self._message(params, text=params["text"]) | {
                "message_id": int(params["message_id"]),
                "edit_date": int(time.time()),
            }
        if method == "getFile":
            file_id = str(params.get("file_id"))
            if file_id not in self.files:
                raise _BadRequest("invalid file_id")
            return {
                "file_id": file_id,
                "file_unique_id": f"u-{file_id}",
                "file_size": len(self.files[file_id]),
                "file_path": f"files/{file_id}",
            }
        caption = {"caption": params["caption"]} if params.get("caption") else {}
        if method == "editMessageMedia":
            media = params.get("media") or {}
            return self._edited_media(params, self._upload(files, media.get("media")))
        if method == "editMessageCaption":
            return self._edited(params, **caption)
        if method == "sendPhoto":
            photo = self._photo(self._upload(files, params.get("photo", "photo")))
            return self._message(params, photo=photo, **caption)
        if method == "sendDocument":
            document = self._document(self._upload(files, params.get("document", "document")))
            return self._message(params, document=document, **caption)
        if method == "sendMediaGroup":
            media = params.get("media") or []
            sent = self._media_group(params, [(i, self._upload(files, i["media"])) for i in media])
            if not 2 <= len(sent) <= 10:
                raise _BadRequest("media group must have 2-10 items")
            return sent
        raise _BadRequest(f"method {method} is not faked")


class _BadRequest(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Telegram's servers
    disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms stall

    def _serve(self) -> None:
        api: FakeBotApiServer = self.server.api  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = unquote(self.path.split("?", 1)[0])  # PTB quotes file URLs (":" -> %3A)
        if "?" in self.path and not body:
            body = self.path.split("?", 1)[1].encode()
            ctype = "application/x-www-form-urlencoded"
        else:
            ctype = self.headers.get("Content-Type", "")
        status, data, content_type = api.handle(path, body, ctype)
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the client gave up (a long poll being stopped)

    do_GET = do_POST = _serve  # noqa: N815 - the names http.server calls

    def log_message(self, *args: object) -> None:
        pass


def _error(status: int, description: str, **parameters: Any) -> tuple[int, bytes, str]:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if parameters:
        body["parameters"] = parameters
    return status, json.dumps(body).encode(), "application/json"


def _is_group(chat_id: object) -> bool:
    return isinstance(chat_id, str) or (isinstance(chat_id, int) and chat_id < 0)


def _value(name: str, raw: str) -> Any:
    if name in TEXT_FIELDS:
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _parse_body(body: bytes, ctype: str) -> tuple[dict[str, Any], dict[str, Upload]]:
    if not body:
        return {}, {}
    if ctype.startswith("application/json"):
        return json.loads(body), {}
    if ctype.startswith("multipart/form-data"):
        message = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body
        )
        params: dict[str, Any] = {}
        files: dict[str, Upload] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            data = part.get_payload(decode=True) or b""
            filename = part.get_filename()
            if filename is None:
                params[str(name)] = _value(str(name), data.decode("utf-8"))
            else:
                files[str(name)] = Upload(str(name), filename, data, part.get_content_type())
        return params, files
    pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    return {name: _value(name, raw) for name, raw in pairs}, {}
