"""A fake Telegram Bot API at PTB's request seam, and builders of raw update JSON.

`FakeBotApi` is a `telegram.request.BaseRequest`: the real `Application` and `Bot` run on
top of it, and every call — method, parameters, multipart files — is recorded and answered
like the Bot API would (messages with fresh ids, photos and documents with file ids whose
bytes can be downloaded again through getFile and the /file/bot URL). It plays "Telegram's
servers": keep one across an Application restart.

`Updates` builds the update dicts Telegram sends: private and supergroup chats, commands
with `bot_command` entities, photos with captions, image documents, albums, replies and
callback queries.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from telegram.request import BaseRequest, RequestData

from tests.telegram_objects import BotObjects

TOKEN = "123456789:AAFakeTokenForTests_DoNotLeak_0123456789"
BOT_ID = 123456789
BOT_USERNAME = "ThisBot"
# Telegram's shared placeholder senders (docs/platforms.md).
CHANNEL_BOT = {"id": 136817688, "is_bot": True, "first_name": "Channel", "username": "Channel_Bot"}
GROUP_ANONYMOUS_BOT = {
    "id": 1087968824,
    "is_bot": True,
    "first_name": "Group",
    "username": "GroupAnonymousBot",
}


@dataclass
class UploadedFile:
    """One file part of a multipart call."""

    name: str
    filename: str | None
    data: bytes
    mime: str | None

    @property
    def size(self) -> tuple[int, int]:
        """Return the image's (width, height)."""
        with Image.open(io.BytesIO(self.data)) as im:
            return im.size

    @property
    def format(self) -> str | None:
        """Return the image format Pillow sees (PNG, JPEG, …)."""
        with Image.open(io.BytesIO(self.data)) as im:
            return im.format


@dataclass
class ApiCall:
    """One recorded Bot API call."""

    method: str
    params: dict[str, Any]
    files: dict[str, UploadedFile] = field(default_factory=dict)
    result: Any = None


def image_bytes(
    width: int, height: int, fmt: str = "JPEG", colour: tuple[int, int, int] = (90, 120, 200)
) -> bytes:
    """Return a real image of the given size."""
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, fmt)
    return out.getvalue()


class FakeBotApi(BotObjects, BaseRequest):
    """Records every Bot API call and answers it like Telegram would."""

    def __init__(self, *, bot_id: int = BOT_ID, username: str = BOT_USERNAME) -> None:
        self.bot_id = bot_id
        self.username = username
        self.calls: list[ApiCall] = []
        self.files: dict[str, bytes] = {}
        self.file_sizes: dict[str, int] = {}  # what getFile claims, if not the real size
        self.downloads: list[str] = []
        self.pending_updates: list[dict[str, Any]] = []  # handed out by getUpdates
        # Stars charges paid to this bot: telegram_payment_charge_id -> payer's user id.
        self.paid_charges: dict[str, int] = {}
        self._failures: dict[str, list[tuple[int, str, dict[str, Any]]]] = {}
        self._ids = 1000

    # --- BaseRequest ------------------------------------------------------------------
    @property
    def read_timeout(self) -> float | None:
        return 5.0

    async def initialize(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        read_timeout: Any = None,
        write_timeout: Any = None,
        connect_timeout: Any = None,
        pool_timeout: Any = None,
    ) -> tuple[int, bytes]:
        if "/file/bot" in url:
            file_id = url.rsplit("/", 1)[1]
            self.downloads.append(file_id)
            if file_id not in self.files:
                return 404, b"Not Found"
            return 200, self.files[file_id]
        api_method = url.rsplit("/", 1)[1]
        params = dict(request_data.parameters) if request_data else {}
        if api_method == "getUpdates":
            # Long polling: hand out what is pending, else wait a little like Telegram does.
            updates, self.pending_updates = self.pending_updates, []
            if not updates:
                await asyncio.sleep(0.02)
            return 200, json.dumps({"ok": True, "result": updates}).encode()
        files = {}
        if request_data is not None:
            for name, (filename, content, mime) in request_data.multipart_data.items():
                data = content if isinstance(content, bytes) else content.read()
                files[name] = UploadedFile(name, filename, data, mime)
        call = ApiCall(api_method, params, files)
        self.calls.append(call)
        failure = self._take_failure(api_method)
        if failure is not None:
            status, description, extra = failure
            body = {"ok": False, "error_code": status, "description": description, **extra}
            return status, json.dumps(body).encode()
        try:
            call.result = self._answer(api_method, params, files)
        except _NotFound as err:
            body = {"ok": False, "error_code": 400, "description": f"Bad Request: {err}"}
            return 400, json.dumps(body).encode()
        return 200, json.dumps({"ok": True, "result": call.result}).encode()

    # --- control ----------------------------------------------------------------------
    def fail_next(self, method: str, status: int, description: str, **extra: Any) -> None:
        """Make the next call of `method` fail (e.g. 429 with parameters.retry_after)."""
        self._failures.setdefault(method, []).append((status, description, extra))

    def _take_failure(self, method: str) -> tuple[int, str, dict[str, Any]] | None:
        pending = self._failures.get(method)
        return pending.pop(0) if pending else None

    def of(self, *methods: str) -> list[ApiCall]:
        """Return the recorded calls of some methods, in order."""
        return [c for c in self.calls if c.method in methods]

    async def wait_for(self, check: Callable[[], Any], within: float = 10.0) -> Any:
        """Wait until `check()` is truthy (things happen in background tasks); return it."""
        deadline = time.monotonic() + within
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"gave up waiting; calls so far: {[c.method for c in self.calls]}"
                )
            await asyncio.sleep(0.01)

    def store(self, file_id: str, data: bytes) -> str:
        """Put a file on "Telegram's servers" (as if a user had uploaded it)."""
        self.files[file_id] = data
        return file_id

    # --- answers ----------------------------------------------------------------------
    def _answer(self, method: str, params: dict[str, Any], files: dict[str, UploadedFile]) -> Any:
        if method == "getMe":
            return self.bot_user()
        try:
            handled, result = self._payments(method, params)
        except ValueError as err:
            raise _NotFound(str(err).removeprefix("Bad Request: ")) from None
        if handled:
            return result
        if method in (
            "deleteMessage",
            "sendChatAction",
            "answerCallbackQuery",
            "setMyCommands",
            "deleteWebhook",
            "setWebhook",
        ):
            return True
        if method == "sendMessage":
            return self._message(params, text=params["text"])
        if method == "editMessageText":
            return self._message(params, text=params["text"]) | {
                "message_id": int(params["message_id"]),
                "edit_date": int(time.time()),
            }
        if method == "getFile":
            file_id = str(params["file_id"])
            if file_id not in self.files:
                raise _NotFound("invalid file_id")
            return {
                "file_id": file_id,
                "file_unique_id": f"u-{file_id}",
                "file_size": self.file_sizes.get(file_id, len(self.files[file_id])),
                "file_path": f"files/{file_id}",
            }
        if method == "editMessageMedia":
            name = str(params["media"]["media"]).removeprefix("attach://")
            if name not in files:
                raise _NotFound("wrong file identifier/HTTP URL specified")
            return self._edited_media(params, files[name])
        if method == "editMessageCaption":
            return self._edited(params, caption=params.get("caption") or "")
        if method == "sendPhoto":
            caption = {"caption": params["caption"]} if params.get("caption") else {}
            return self._message(params, photo=self._photo(files["photo"]), **caption)
        if method == "sendDocument":
            caption = {"caption": params["caption"]} if params.get("caption") else {}
            return self._message(params, document=self._document(files["document"]), **caption)
        if method == "sendMediaGroup":
            return self._media_group(
                params,
                [(i, files[str(i["media"]).removeprefix("attach://")]) for i in params["media"]],
            )
        raise _NotFound(f"method {method} not faked")


class _NotFound(Exception):
    pass


class Updates:
    """Build raw Telegram update dicts, with fresh update and message ids."""

    def __init__(self, bot_username: str = BOT_USERNAME) -> None:
        self.bot_username = bot_username
        self._update_id = 5000
        self._message_id = 100

    def _next_update(self) -> int:
        self._update_id += 1
        return self._update_id

    def _next_message(self) -> int:
        self._message_id += 1
        return self._message_id

    @staticmethod
    def user(user_id: int, name: str = "Ann", language_code: str | None = "en") -> dict[str, Any]:
        """Return a User."""
        user: dict[str, Any] = {"id": user_id, "is_bot": False, "first_name": name}
        if language_code:
            user["language_code"] = language_code
        return user

    @staticmethod
    def private(user: dict[str, Any]) -> dict[str, Any]:
        """Return the private Chat with a user."""
        return {"id": user["id"], "type": "private", "first_name": user["first_name"]}

    @staticmethod
    def channel(chat_id: int = -1009876543210, title: str = "Ann's channel") -> dict[str, Any]:
        """Return a channel Chat (as a message's sender_chat)."""
        return {"id": chat_id, "type": "channel", "title": title}

    @staticmethod
    def supergroup(chat_id: int = -1001234567890, title: str = "Artists") -> dict[str, Any]:
        """Return a supergroup Chat."""
        return {"id": chat_id, "type": "supergroup", "title": title}

    def message(
        self,
        user: dict[str, Any],
        chat: dict[str, Any],
        *,
        text: str | None = None,
        caption: str | None = None,
        photo: list[dict[str, Any]] | None = None,
        document: dict[str, Any] | None = None,
        media_group_id: str | None = None,
        reply_to: dict[str, Any] | None = None,
        sender_chat: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Return a Message; a leading /command gets its bot_command entity.

        `sender_chat`: sent "as a channel" or by an anonymous admin; `user` is then
        Telegram's placeholder (`CHANNEL_BOT`, `GROUP_ANONYMOUS_BOT`).
        """
        message: dict[str, Any] = {
            "message_id": self._next_message(),
            "date": int(time.time()),
            "chat": chat,
            "from": user,
        }
        if text is not None:
            message["text"] = text
            if entity := _command_entity(text):
                message["entities"] = [entity]
        if caption is not None:
            message["caption"] = caption
            if entity := _command_entity(caption):
                message["caption_entities"] = [entity]
        if photo is not None:
            message["photo"] = photo
        if document is not None:
            message["document"] = document
        if media_group_id is not None:
            message["media_group_id"] = media_group_id
        if reply_to is not None:
            message["reply_to_message"] = reply_to
        if sender_chat is not None:
            message["sender_chat"] = sender_chat
        return message

    @staticmethod
    def photo_sizes(
        file_id: str, width: int, height: int, size: int = 50_000
    ) -> list[dict[str, Any]]:
        """Return the PhotoSize list of a photo: a thumbnail, then the full size."""
        return [
            {
                "file_id": f"{file_id}-thumb",
                "file_unique_id": f"u-{file_id}-t",
                "width": 90,
                "height": max(1, 90 * height // width),
                "file_size": 1500,
            },
            {
                "file_id": file_id,
                "file_unique_id": f"u-{file_id}",
                "width": width,
                "height": height,
                "file_size": size,
            },
        ]

    @staticmethod
    def document(file_id: str, file_name: str, mime: str, size: int = 50_000) -> dict[str, Any]:
        """Return a Document."""
        return {
            "file_id": file_id,
            "file_unique_id": f"u-{file_id}",
            "file_name": file_name,
            "mime_type": mime,
            "file_size": size,
        }

    def update(self, message: dict[str, Any]) -> dict[str, Any]:
        """Wrap a message into an Update."""
        return {"update_id": self._next_update(), "message": message}

    def pre_checkout(
        self, user: dict[str, Any], payload: str, total: int, currency: str = "XTR"
    ) -> dict[str, Any]:
        """Return an Update for a buyer confirming an invoice's payment."""
        return {
            "update_id": self._next_update(),
            "pre_checkout_query": {
                "id": f"pcq-{self._update_id}",
                "from": user,
                "currency": currency,
                "total_amount": total,
                "invoice_payload": payload,
            },
        }

    def paid(
        self, user: dict[str, Any], payload: str, total: int, charge_id: str
    ) -> dict[str, Any]:
        """Return a Message carrying a successful Stars payment, in the payer's chat."""
        message = self.message(user, self.private(user))
        message["successful_payment"] = {
            "currency": "XTR",
            "total_amount": total,
            "invoice_payload": payload,
            "telegram_payment_charge_id": charge_id,
            "provider_payment_charge_id": "",
        }
        return message

    def callback(self, user: dict[str, Any], message: dict[str, Any], data: str) -> dict[str, Any]:
        """Return an Update for a press on an inline button of `message`."""
        return {
            "update_id": self._next_update(),
            "callback_query": {
                "id": f"cq-{self._update_id}",
                "from": user,
                "chat_instance": "ci-1",
                "data": data,
                "message": message,
            },
        }


def _command_entity(text: str) -> dict[str, Any] | None:
    if not text.startswith("/"):
        return None
    word = text.split(maxsplit=1)[0]
    return {"type": "bot_command", "offset": 0, "length": len(word.encode("utf-16-le")) // 2}
