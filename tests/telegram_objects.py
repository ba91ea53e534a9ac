"""The Bot API objects both Telegram fakes answer with (messages, photos, documents).

`tests.telegram_fake` (in-process, at PTB's request seam) and `tests.fake_botapi` (a real
HTTP server) mix this in; each keeps `bot_id`, `username`, `files` and `_ids`.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable
from typing import Any, Protocol

from PIL import Image


class SentFile(Protocol):
    """What a fake received as an upload."""

    data: bytes
    filename: str
    mime: str


class BotObjects:
    """Build the objects the Bot API returns for what the bot sent."""

    bot_id: int
    username: str
    files: dict[str, bytes]
    paid_charges: dict[str, int]
    _ids: int

    def bot_user(self) -> dict[str, Any]:
        """Return the bot's User object."""
        return {
            "id": self.bot_id,
            "is_bot": True,
            "first_name": "Img Bot",
            "username": self.username,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }

    def _payments(self, method: str, params: dict[str, Any]) -> tuple[bool, Any]:
        """Answer the Stars payment methods as Telegram does: (handled, result).

        sendInvoice checks what Telegram checks for digital goods (XTR, one price); a
        refund of a charge the fake never saw paid, or refunded already, is refused with
        Telegram's words. `paid_charges` is filled by the test (it plays the payer).
        """
        if method == "sendInvoice":
            prices = params.get("prices") or []
            if params.get("currency") != "XTR" or len(prices) != 1:
                raise ValueError("Bad Request: STARS_INVOICE_INVALID")
            invoice = {
                "title": params["title"],
                "description": params["description"],
                "start_parameter": "",
                "currency": params["currency"],
                "total_amount": int(prices[0]["amount"]),
            }
            return True, self._message(params, invoice=invoice)
        if method == "answerPreCheckoutQuery":
            return True, True
        if method == "refundStarPayment":
            charge = str(params.get("telegram_payment_charge_id"))
            paid: dict[str, int] = self.paid_charges
            refunded: set[str] = self.__dict__.setdefault("refunded_charges", set())
            if paid.get(charge) != int(params.get("user_id", 0)):
                raise ValueError("Bad Request: CHARGE_NOT_FOUND")
            if charge in refunded:
                raise ValueError("Bad Request: CHARGE_ALREADY_REFUNDED")
            refunded.add(charge)
            return True, True
        return False, None

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def _chat_id(self, params: dict[str, Any]) -> int:
        return int(params["chat_id"])

    def _message(self, params: dict[str, Any], **content: Any) -> dict[str, Any]:
        chat_id = self._chat_id(params)
        chat: dict[str, Any] = (
            {"id": chat_id, "type": "private", "first_name": "User"}
            if chat_id > 0
            else {"id": chat_id, "type": "supergroup", "title": "Group"}
        )
        message: dict[str, Any] = {
            "message_id": self._next_id(),
            "date": int(time.time()),
            "chat": chat,
            "from": self.bot_user(),
            **content,
        }
        if params.get("message_thread_id"):
            message["message_thread_id"] = params["message_thread_id"]
        if params.get("reply_markup"):
            message["reply_markup"] = params["reply_markup"]
        reply = params.get("reply_parameters")
        if isinstance(reply, dict) and reply.get("message_id"):
            message["reply_to_message"] = {
                "message_id": reply["message_id"],
                "date": int(time.time()),
                "chat": chat,
            }
        return message

    def _photo(self, upload: SentFile) -> list[dict[str, Any]]:
        n = self._next_id()
        file_id = f"sent-photo-{n}"
        self.files[file_id] = upload.data
        with Image.open(io.BytesIO(upload.data)) as image:
            width, height = image.size
        scale = 90 / max(width, height)
        return [
            {
                "file_id": f"{file_id}-thumb",
                "file_unique_id": f"u-thumb-{n}",
                "width": max(1, int(width * scale)),
                "height": max(1, int(height * scale)),
                "file_size": 1000,
            },
            {
                "file_id": file_id,
                "file_unique_id": f"u-photo-{n}",
                "width": width,
                "height": height,
                "file_size": len(upload.data),
            },
        ]

    def _document(self, upload: SentFile) -> dict[str, Any]:
        n = self._next_id()
        file_id = f"sent-doc-{n}"
        self.files[file_id] = upload.data
        return {
            "file_id": file_id,
            "file_unique_id": f"u-doc-{n}",
            "file_name": upload.filename,
            "mime_type": upload.mime,
            "file_size": len(upload.data),
        }

    def _media_group(
        self, params: dict[str, Any], items: Iterable[tuple[dict[str, Any], SentFile]]
    ) -> list[dict[str, Any]]:
        group = f"mg-{self._next_id()}"
        sent = []
        for item, upload in items:
            content: dict[str, Any] = {"media_group_id": group}
            if item.get("caption"):
                content["caption"] = item["caption"]
            if item["type"] == "photo":
                content["photo"] = self._photo(upload)
            else:
                content["document"] = self._document(upload)
            sent.append(self._message(params, **content))
        return sent

    def _edited(self, params: dict[str, Any], **content: Any) -> dict[str, Any]:
        """Return a message the bot edited (same id, an edit date)."""
        return self._message(params, **content) | {
            "message_id": int(params["message_id"]),
            "edit_date": int(time.time()),
        }

    def _edited_media(self, params: dict[str, Any], upload: SentFile) -> dict[str, Any]:
        """Return a message whose photo or document editMessageMedia replaced."""
        media = params["media"]
        content: dict[str, Any] = (
            {"photo": self._photo(upload)}
            if media["type"] == "photo"
            else {"document": self._document(upload)}
        )
        if media.get("caption"):
            content["caption"] = media["caption"]
        return self._edited(params, **content)

