"""Fakes at Discord's network seams, for driving the real bot offline.

`FakeDiscord` is an `AsyncWebhookAdapter` (set with `async_context.set(...)`): it receives
every interaction response, followup, edit and delete the bot makes, records it with its
JSON and files, and answers like Discord (message payloads with CDN attachment URLs).
`FakeCdn` stands in for `HTTPClient.get_from_cdn`, serving files "uploaded" to Discord
and test images; it outlives a bot, as the real CDN outlives a restart.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import discord
from discord.http import Route
from discord.webhook.async_ import AsyncWebhookAdapter

from tests.discord_payloads import CHANNEL_ID, new_snowflake

CDN = "https://cdn.discordapp.com"


@dataclass(frozen=True)
class SentFile:
    """A file the bot uploaded."""

    filename: str
    data: bytes


@dataclass
class SentCall:
    """One call the bot made to an interaction endpoint."""

    # callback | edit_original | delete_original | get_original | followup | edit_followup
    kind: str
    token: str
    json: dict[str, Any] | None
    files: list[SentFile] = field(default_factory=list)
    answer: dict[str, Any] | None = None  # what the fake answered (a message payload)

    @property
    def content(self) -> str | None:
        """Return the message text sent, if any (an interaction response's too)."""
        body = self.json or {}
        if self.kind == "callback":
            body = body.get("data") or {}
        return body.get("content")

    @property
    def ephemeral(self) -> bool:
        """Say whether the message was sent with the ephemeral flag."""
        flags = (self.json or {}).get("flags") or (self.json or {}).get("data", {}).get("flags")
        return bool(int(flags or 0) & 64)

    @property
    def embeds(self) -> list[dict[str, Any]]:
        """Return the embeds sent."""
        return list((self.json or {}).get("embeds") or [])

    @property
    def custom_ids(self) -> list[str]:
        """Return the custom ids of the buttons sent."""
        ids = []
        for row in (self.json or {}).get("components") or []:
            ids += [c["custom_id"] for c in row.get("components", []) if "custom_id" in c]
        return ids


class _Response:
    """The bit of an aiohttp response that `discord.HTTPException` reads."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason


def http_error(
    kind: type[discord.HTTPException], status: int, reason: str, message: str
) -> discord.HTTPException:
    """Return the error discord.py raises for an HTTP answer of `status`."""
    return kind(_Response(status, reason), message)  # type: ignore[arg-type]


class FakeCdn:
    """Discord's CDN: files by URL; `get_from_cdn` replaces the bot's HTTP client method."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.fetched: list[str] = []
        self.ids = itertools.count(1)

    def add(self, data: bytes, filename: str, *, host: str = CDN) -> str:
        """Serve `data` and return its attachment URL."""
        url = f"{host}/attachments/{CHANNEL_ID}/{new_snowflake()}/{filename}?ex=1&is=1&hm=ab"
        self.files[url] = data
        return url

    async def get_from_cdn(self, url: str) -> bytes:
        """Return a served file, or raise NotFound like the real client."""
        self.fetched.append(url)
        try:
            return self.files[url]
        except KeyError:
            raise http_error(discord.NotFound, 404, "Not Found", "asset not found") from None


def new_message(content: str, flags: int) -> dict[str, Any]:
    """Return a message payload from the bot, as Discord answers when it creates one."""
    return {
        "id": str(new_snowflake()),
        "channel_id": str(CHANNEL_ID),
        "type": 20,
        "content": content,
        "author": {"id": "1", "username": "imgbot", "discriminator": "0", "avatar": None},
        "attachments": [],
        "embeds": [],
        "components": [],
        "mentions": [],
        "mention_roles": [],
        "mention_everyone": False,
        "pinned": False,
        "tts": False,
        "timestamp": discord.utils.utcnow().isoformat(),
        "edited_timestamp": None,
        "flags": flags,
    }


def attachment_payload(cdn: FakeCdn, file: SentFile) -> dict[str, Any]:
    """Put an uploaded file on the CDN and return its attachment object."""
    url = cdn.add(file.data, file.filename)
    return {
        "id": url.split("/")[-2],
        "filename": file.filename,
        "size": len(file.data),
        "url": url,
        "proxy_url": url.replace(CDN, "https://media.discordapp.net"),
    }


def _read_upload(
    multipart: list[dict[str, Any]] | None, payload: Any, files: Any
) -> tuple[Any, list[SentFile]]:
    body = payload
    for part in multipart or []:
        if part.get("name") == "payload_json":
            body = json.loads(part["value"])
    sent = []
    for file in files or []:
        file.reset()
        sent.append(SentFile(file.filename or "file", file.fp.read()))
    return body, sent


class FakeDiscord(AsyncWebhookAdapter):
    """Records what the bot sends to interaction webhooks and answers like Discord."""

    def __init__(self, cdn: FakeCdn) -> None:
        super().__init__()
        self.cdn = cdn
        self.calls: list[SentCall] = []
        self._originals: dict[str, dict[str, Any]] = {}
        # When set, a request carrying files raises what this returns, if anything (for the
        # failure tests).
        self.fail_uploads: Callable[[Route], BaseException | None] | None = None
        # When set, any request raises what this returns for its kind ("followup"…), if
        # anything (files or not).
        self.fail_kinds: Callable[[str], BaseException | None] | None = None
        # When set, an interaction response of this type fails (e.g. 5: a defer came too late).
        self.fail_callback_type: int | None = None
        # Interactions never acknowledged (their process died first): Discord answers 404
        # Unknown Webhook to any edit or followup with their token.
        self.unacknowledged: set[str] = set()

    def of(self, token: str, kind: str | None = None) -> list[SentCall]:
        """Return the calls made for one interaction token (of one kind)."""
        return [c for c in self.calls if c.token == token and (kind is None or c.kind == kind)]

    async def request(  # type: ignore[override]
        self,
        route: Route,
        session: Any,
        *,
        payload: dict[str, Any] | None = None,
        multipart: list[dict[str, Any]] | None = None,
        files: Any = None,
        **_: Any,
    ) -> Any:
        await asyncio.sleep(0)  # a real request yields to the loop
        token = route.webhook_token or ""
        body, sent = _read_upload(multipart, payload, files)
        kind = _kind(route)
        call = SentCall(kind, token, body, sent)
        self.calls.append(call)
        if sent and self.fail_uploads is not None:
            failure = self.fail_uploads(route)
            if failure is not None:  # None: this one goes through
                raise failure
        if self.fail_kinds is not None:
            failure = self.fail_kinds(kind)
            if failure is not None:
                raise failure
        if kind == "callback" and (body or {}).get("type") == self.fail_callback_type:
            raise http_error(discord.NotFound, 404, "Not Found", "Unknown interaction")
        if kind != "callback" and token in self.unacknowledged:
            raise http_error(discord.NotFound, 404, "Not Found", "Unknown Webhook")
        if kind == "callback":
            return self._callback(route, body or {})
        if kind == "delete_original":
            self._originals.pop(token, None)
            return None
        if kind == "get_original":
            return self._originals.get(token)
        call.answer = self._message(token, body or {}, sent, original=kind == "edit_original")
        return call.answer

    def _callback(self, route: Route, body: dict[str, Any]) -> dict[str, Any]:
        token = route.webhook_token or ""
        data = body.get("data") or {}
        flags = int(data.get("flags") or 0)
        if body.get("type") in (4, 5):
            self._originals[token] = new_message("", flags)
        return {
            "interaction": {
                "id": str(route.webhook_id),
                "type": 2,
                "response_message_loading": body.get("type") == 5,
                "response_message_ephemeral": bool(flags & 64),
            },
            "resource": {"type": body.get("type")},
        }

    def _message(
        self, token: str, body: dict[str, Any], files: list[SentFile], *, original: bool
    ) -> dict[str, Any]:
        message = self._originals.get(token) if original else None
        if message is None:
            message = new_message("", int(body.get("flags") or 0))
            if original:
                self._originals[token] = message
        for key in ("content", "embeds", "components"):
            if key in body:
                message[key] = (
                    body[key] if body[key] is not None else ([] if key != "content" else "")
                )
        if files or "attachments" in body:
            message["attachments"] = [attachment_payload(self.cdn, f) for f in files]
        return json.loads(json.dumps(message))


def _kind(route: Route) -> str:
    path, method = route.path, route.method
    if path.endswith("/callback"):
        return "callback"
    if path.endswith("/messages/@original"):
        return {"PATCH": "edit_original", "DELETE": "delete_original"}.get(method, "get_original")
    if path.endswith("/messages/{message_id}"):
        return "edit_followup"
    return "followup"


@dataclass
class RestCall:
    """One call the bot made to Discord's REST API."""

    method: str
    path: str
    url: str
    json: Any
    files: list[SentFile] = field(default_factory=list)


class FakeRest:
    """Discord's REST API as far as the adapter uses it; replaces `HTTPClient.request`."""

    def __init__(self, cdn: FakeCdn) -> None:
        self.cdn = cdn
        self.calls: list[RestCall] = []
        self.refreshed: dict[str, str] = {}  # expired URL → its re-signed URL
        self.refuse_commands: int | None = None  # an HTTP status to answer command syncs with
        # Messages the bot may fetch, by (channel id, message id): what GET returns for them.
        self.messages: dict[tuple[str, str], dict[str, Any]] = {}

    async def request(self, route: Route, **kwargs: Any) -> Any:
        """Answer one REST call."""
        await asyncio.sleep(0)
        body, sent = _read_upload(kwargs.get("form"), kwargs.get("json"), kwargs.get("files"))
        self.calls.append(RestCall(route.method, route.path, route.url, body, sent))
        if route.method == "POST" and route.path == "/channels/{channel_id}/messages":
            message = new_message(body.get("content") or "", 0)
            message.update({k: body[k] for k in ("embeds", "components") if k in body})
            message["attachments"] = [attachment_payload(self.cdn, f) for f in sent]
            return message
        if route.method == "GET" and route.path == "/channels/{channel_id}/messages/{message_id}":
            *_, channel_id, _, message_id = route.url.split("/")
            if (channel_id, message_id) in self.messages:
                return json.loads(json.dumps(self.messages[(channel_id, message_id)]))
        if route.method == "POST" and route.path == "/users/@me/channels":
            recipient = str((kwargs.get("json") or {}).get("recipient_id"))
            recipients = [{"id": recipient, "username": "someone", "discriminator": "0", "avatar": None}]
            return {"id": str(new_snowflake()), "type": 1, "recipients": recipients}
        if route.path == "/attachments/refresh-urls":
            urls = (kwargs.get("json") or {}).get("attachment_urls", [])
            return {
                "refreshed_urls": [
                    {"original": u, "refreshed": self.refreshed[u]}
                    for u in urls
                    if u in self.refreshed
                ]
            }
        if route.method == "PUT" and route.path.endswith("/commands"):
            if self.refuse_commands is not None:
                raise http_error(
                    discord.Forbidden, self.refuse_commands, "Forbidden", "Missing Access"
                )
            return []
        raise http_error(discord.NotFound, 404, "Not Found", f"no {route.method} {route.path}")
