"""A fake Discord on 127.0.0.1 for real `imgbot run` processes: REST, interaction webhooks,
the CDN and the gateway, served by one aiohttp server on a thread of its own.

The bot reaches it through `tests.discord_replica`, which points discord.py's REST base,
gateway and CDN downloads here; nothing else about the bot changes. The fake keeps the
rules of Discord that a bot must live with:

- gateway: HELLO, heartbeats acknowledged, IDENTIFY with the bot token and `[shard, count]`
  answered by READY (a wrong token closes 4004, a wrong count 4010). An interaction goes to
  the session of the shard that owns its server, `(guild_id >> 22) % count` (DMs: shard
  0), and fails when no session holds that shard. A session identifying for a shard that
  another live session holds is recorded in `double_connects` (each shard must be connected
  exactly once);
- interactions: one first answer (the callback), within 3 s of the event (404 "Unknown
  interaction" after, 400 "already acknowledged" a second time); edits and followups only
  once it came (404 "Unknown Webhook" before) and while the token lives, 15 minutes from
  the interaction's snowflake (401 "Invalid Webhook Token" after);
- REST: the bot token on every call; messages only in known channels (the servers'
  channels, and DMs opened for users); uploaded files are served back from the CDN.

Everything the bot sends is recorded in `calls`, files included, with Discord's status
(`of()` lists those Discord took). `hold()` makes Discord
slow for a moment: callbacks and uploads wait, unrecorded, until `release()`; one whose
sender died meanwhile is dropped, as Discord never saw it finish.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import discord
from aiohttp import BodyPartReader, WSMsgType, web

from tests.discord_fake import SentFile
from tests.discord_payloads import APP_ID, new_snowflake, user

CDN_HOSTS = ("https://cdn.discordapp.com/", "https://media.discordapp.net/")
ACK_WINDOW = 3.0  # seconds Discord waits for an interaction's first answer
TOKEN_LIFE = 15 * 60.0
HEARTBEAT_MS = 5000
EPHEMERAL = 64

_WEBHOOK = re.compile(r"webhooks/(?P<app>\d+)/(?P<token>[^/]+)(?P<rest>/messages/[^/]+)?")
_CALLBACK = re.compile(r"interactions/(?P<id>\d+)/(?P<token>[^/]+)/callback")
_CHANNEL_MESSAGES = re.compile(r"channels/(?P<channel>\d+)/messages")
_SYNC = re.compile(r"applications/\d+(/guilds/(?P<guild>\d+))?/commands")


def shard_of(payload: dict[str, Any], count: int) -> int:
    """Return the shard Discord sends an interaction to (DMs go to shard 0)."""
    guild = payload.get("guild_id")
    return (int(guild) >> 22) % count if guild else 0


@dataclass
class Call:
    """One call the bot made: to an interaction (by token) or to the REST API."""

    # callback | edit_original | get_original | delete_original | followup | edit_followup
    # | channel_message | open_dm | sync | login | other
    kind: str
    path: str
    token: str = ""  # the interaction's, for callbacks, edits and followups
    channel: str = ""  # for channel messages
    json: Any = None
    files: list[SentFile] = field(default_factory=list)
    answer: dict[str, Any] | None = None  # the message Discord answered with, if any
    status: int = 200  # Discord's answer; a refused call changed nothing
    at: float = field(default_factory=time.time)

    @property
    def content(self) -> str | None:
        """Return the text sent (an interaction response's too)."""
        body = self.json if isinstance(self.json, dict) else {}
        if self.kind == "callback":
            body = body.get("data") or {}
        return body.get("content")

    @property
    def ephemeral(self) -> bool:
        """Say whether the message was sent with the ephemeral flag."""
        body = self.json if isinstance(self.json, dict) else {}
        flags = body.get("flags") or (body.get("data") or {}).get("flags")
        return bool(int(flags or 0) & EPHEMERAL)


@dataclass
class _Interaction:
    channel: str
    dispatched: float
    created: float  # the snowflake's time: the token's 15 minutes count from it
    acked: bool = False
    original: dict[str, Any] | None = None


@dataclass
class _Session:
    ws: web.WebSocketResponse
    seq: int = 1


class FakeDiscordServer:
    """Discord's REST API, interaction webhooks, CDN and gateway for one bot."""

    def __init__(self, token: str, shard_count: int) -> None:
        self.token = token
        self.shard_count = shard_count
        self.calls: list[Call] = []
        self.identified: list[int] = []  # shard ids, in the order sessions identified
        self.double_connects: list[int] = []
        self._sessions: dict[int, list[_Session]] = {}
        self._interactions: dict[str, _Interaction] = {}
        self._channels: set[str] = set()
        self._dms: dict[str, str] = {}  # user id → DM channel id
        self._files: dict[str, bytes] = {}  # CDN path → bytes
        self._lock = threading.Lock()
        self._open: asyncio.Event  # set while calls go through (made on the server's loop)
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # --- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> FakeDiscordServer:
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(started,), name="fake-discord", daemon=True
        )
        self._thread.start()
        if not started.wait(10) or not self.port:
            raise RuntimeError("the fake Discord did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        loop = self._loop
        if loop is not None and self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _serve(self, started: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._open = asyncio.Event()
        self._open.set()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway/", self._gateway)
        app.router.add_get("/cdn/{path:.*}", self._cdn)
        app.router.add_route("*", "/api/v10/{path:.*}", self._api)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        started.set()
        loop.run_forever()
        loop.close()

    @property
    def url(self) -> str:
        """Return the root URL the bot is pointed at (tests.discord_replica)."""
        return f"http://127.0.0.1:{self.port}"

    # --- what the test does as Discord and its users ------------------------------------
    def add_channel(self, channel_id: int) -> None:
        """Make a server channel the bot may post in."""
        with self._lock:
            self._channels.add(str(channel_id))

    def dm_channel(self, user_id: int) -> int:
        """Return the DM channel of a user with the bot (made on first use)."""
        with self._lock:
            return int(self._dm_of(str(user_id)))

    def dispatch(self, payload: dict[str, Any]) -> bool:
        """Send an interaction to the session of its shard; False: no session holds it
        (the user sees "This interaction failed")."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(self._dispatch(payload), self._loop)
        return future.result(10)

    def answered(self, token: str) -> bool:
        """Say whether the bot gave an interaction its first answer in time."""
        with self._lock:
            found = self._interactions.get(token)
            return found is not None and found.acked

    def hold(self) -> None:
        """Make callbacks and uploads wait (unrecorded) until `release`.

        Returns once the server's loop took it: every upload recorded before is in `calls`.
        """
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._set_held(True), self._loop).result(10)

    def release(self) -> None:
        """Let held callbacks and uploads through (those whose sender is gone are dropped)."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._set_held(False), self._loop).result(10)

    async def _set_held(self, held: bool) -> None:
        if held:
            self._open.clear()
        else:
            self._open.set()

    def connected(self) -> dict[int, int]:
        """Return how many live sessions hold each shard."""
        with self._lock:
            counts = {
                shard: sum(not s.ws.closed for s in sessions)
                for shard, sessions in self._sessions.items()
            }
        return {shard: n for shard, n in counts.items() if n}

    def of(self, kind: str | None = None) -> list[Call]:
        """Return the calls Discord took so far (of one kind)."""
        with self._lock:
            return [c for c in self.calls if c.status < 300 and kind in (None, c.kind)]

    # --- gateway ------------------------------------------------------------------------
    async def _dispatch(self, payload: dict[str, Any]) -> bool:
        shard = shard_of(payload, self.shard_count)
        with self._lock:
            live = [s for s in self._sessions.get(shard, []) if not s.ws.closed]
            if not live:
                return False
            session = live[-1]
            session.seq += 1
            created = discord.utils.snowflake_time(int(payload["id"])).timestamp()
            self._interactions[payload["token"]] = _Interaction(
                str(payload["channel_id"]), time.time(), created
            )
            event = {"op": 0, "t": "INTERACTION_CREATE", "s": session.seq, "d": payload}
        try:
            await session.ws.send_str(json.dumps(event))
        except (ConnectionError, RuntimeError):
            return False
        return True

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": HEARTBEAT_MS}}))
        async for message in ws:
            if message.type is not WSMsgType.TEXT:
                continue
            frame = json.loads(message.data)
            if frame.get("op") == 1:  # heartbeat
                await ws.send_str(json.dumps({"op": 11}))
            elif frame.get("op") == 2:  # identify
                await self._identify(ws, frame.get("d") or {})
            elif frame.get("op") == 6:  # resume: this fake keeps no sessions to resume
                await ws.send_str(json.dumps({"op": 9, "d": False}))
        return ws

    async def _identify(self, ws: web.WebSocketResponse, data: dict[str, Any]) -> None:
        if data.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return
        shard, count = data.get("shard") or [0, 1]
        if count != self.shard_count or not 0 <= shard < count:
            await ws.close(code=4010, message=b"Invalid shard.")
            return
        with self._lock:
            live = [s for s in self._sessions.get(shard, []) if not s.ws.closed]
            if live:
                self.double_connects.append(shard)
            self._sessions[shard] = [*live, _Session(ws)]
            self.identified.append(shard)
        ready = {
            "v": 10,
            "user": {**user(APP_ID, "imgbot"), "bot": True},
            "guilds": [],
            "session_id": f"session-{next(self._ids)}",
            "resume_gateway_url": f"ws://127.0.0.1:{self.port}/gateway/",
            "shard": [shard, count],
            "application": {"id": str(APP_ID), "flags": 0},
        }
        await ws.send_str(json.dumps({"op": 0, "t": "READY", "s": 1, "d": ready}))

    # --- CDN ----------------------------------------------------------------------------
    async def _cdn(self, request: web.Request) -> web.Response:
        with self._lock:
            data = self._files.get(request.match_info["path"])
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="image/png")

    # --- REST and webhooks --------------------------------------------------------------
    async def _api(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        body, files = await _read_body(request)
        webhook = _WEBHOOK.fullmatch(path)
        callback = _CALLBACK.fullmatch(path)
        if (callback is not None or files) and not await self._through(request):
            return _error(499, 0, "the sender is gone")
        if callback is not None:
            return self._callback(path, callback["id"], callback["token"], body or {})
        if webhook is not None:
            return self._webhook(request.method, path, webhook, body, files)
        if request.headers.get("Authorization") != f"Bot {self.token}":
            return _error(401, 0, "401: Unauthorized")
        return self._rest(request.method, path, body, files)

    async def _through(self, request: web.Request) -> bool:
        """Wait while held; say whether the sender is still there to be answered."""
        await self._open.wait()
        transport = request.transport
        return transport is not None and not transport.is_closing()

    def _callback(
        self, path: str, interaction_id: str, token: str, body: dict[str, Any]
    ) -> web.Response:
        with self._lock:
            found = self._interactions.get(token)
            if found is None or time.time() - found.dispatched > ACK_WINDOW:
                return self._refuse(Call("callback", path, token=token, json=body),
                                    404, 10062, "Unknown interaction")
            if found.acked:
                return self._refuse(Call("callback", path, token=token, json=body),
                                    400, 40060, "Interaction has already been acknowledged.")
            found.acked = True
            kind = body.get("type")
            flags = int((body.get("data") or {}).get("flags") or 0)
            if kind in (4, 5):
                found.original = self._new_message(
                    found.channel, (body.get("data") or {}), [], flags
                )
            self.calls.append(Call("callback", path, token=token, json=body))
        answer = {
            "interaction": {
                "id": interaction_id,
                "type": 2,
                "response_message_loading": kind == 5,
                "response_message_ephemeral": bool(flags & EPHEMERAL),
            },
            "resource": {"type": kind},
        }
        return _json(answer)

    def _webhook(
        self, method: str, path: str, match: re.Match[str], body: Any, files: list[SentFile]
    ) -> web.Response:
        token, rest = match["token"], match["rest"] or ""
        original = rest == "/messages/@original"
        with self._lock:
            kind = {
                ("PATCH", True): "edit_original",
                ("GET", True): "get_original",
                ("DELETE", True): "delete_original",
                ("POST", False): "followup",
                ("PATCH", False): "edit_followup",
            }.get((method, original), "other")
            call = Call(kind, path, token=token, json=body, files=files)
            found = self._interactions.get(token)
            if match["app"] != str(APP_ID) or found is None or not found.acked:
                return self._refuse(call, 404, 10015, "Unknown Webhook")
            if time.time() - found.created > TOKEN_LIFE:
                return self._refuse(call, 401, 50027, "Invalid Webhook Token")
            self.calls.append(call)
            if kind == "delete_original":
                found.original = None
                return web.Response(status=204)
            if kind == "get_original":
                return _json(found.original) if found.original else _error(404, 10008, "Unknown Message")
            channel = found.channel
            if kind == "edit_original":
                message = found.original or self._new_message(channel, {}, [], 0)
                found.original = message
                self._update(message, body or {}, files)
            else:
                flags = int((body or {}).get("flags") or 0)
                message = self._new_message(channel, body or {}, files, flags)
            call.answer = json.loads(json.dumps(message))
            return _json(call.answer)

    def _rest(self, method: str, path: str, body: Any, files: list[SentFile]) -> web.Response:
        if method == "GET" and path == "users/@me":
            return self._record(Call("login", path), {**user(APP_ID, "imgbot"), "bot": True})
        if method == "GET" and path == "oauth2/applications/@me":
            return _json(_application())
        if method == "PUT" and (sync := _SYNC.fullmatch(path)) is not None:
            commands = [
                {"description": "", **c, "id": str(new_snowflake()),
                 "application_id": str(APP_ID), "version": "1"}
                for c in body or []
            ]
            return self._record(Call("sync", path, channel=sync["guild"] or "", json=body), commands)
        if method == "POST" and path == "users/@me/channels":
            with self._lock:
                channel = self._dm_of(str((body or {}).get("recipient_id")))
            recipients = [user(int((body or {}).get("recipient_id") or 0), "someone")]
            return self._record(
                Call("open_dm", path, json=body), {"id": channel, "type": 1, "recipients": recipients}
            )
        if method == "POST" and (posted := _CHANNEL_MESSAGES.fullmatch(path)) is not None:
            with self._lock:
                channel = posted["channel"]
                call = Call("channel_message", path, channel=channel, json=body, files=files)
                if channel not in self._channels:
                    return self._refuse(call, 404, 10003, "Unknown Channel")
                message = self._new_message(channel, body or {}, files, 0)
                call.answer = json.loads(json.dumps(message))
                self.calls.append(call)
            return _json(call.answer)
        if method == "POST" and path == "attachments/refresh-urls":
            return _json({"refreshed_urls": []})
        self._record(Call("other", f"{method} {path}", json=body), None)
        return _error(404, 0, f"404: Not Found ({method} {path})")

    def _refuse(self, call: Call, status: int, code: int, message: str) -> web.Response:
        """Record a call Discord refused (under the lock) and answer with the error."""
        call.status = status
        self.calls.append(call)
        return _error(status, code, message)

    def _record(self, call: Call, answer: Any) -> web.Response:
        with self._lock:
            self.calls.append(call)
        return _json(answer)

    # --- messages (under the lock) ------------------------------------------------------
    def _dm_of(self, user_id: str) -> str:
        if user_id not in self._dms:
            channel = str(new_snowflake())
            self._dms[user_id] = channel
            self._channels.add(channel)
        return self._dms[user_id]

    def _new_message(
        self, channel: str, body: dict[str, Any], files: list[SentFile], flags: int
    ) -> dict[str, Any]:
        message: dict[str, Any] = {
            "id": str(new_snowflake()),
            "channel_id": channel,
            "type": 0,
            "content": "",
            "author": {**user(APP_ID, "imgbot"), "bot": True},
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
        self._update(message, body, files)
        return message

    def _update(self, message: dict[str, Any], body: dict[str, Any], files: list[SentFile]) -> None:
        for key in ("content", "embeds", "components"):
            if key in body:
                message[key] = body[key] if body[key] is not None else ([] if key != "content" else "")
        if files or "attachments" in body:
            message["attachments"] = [self._upload(message["channel_id"], f) for f in files]

    def _upload(self, channel: str, file: SentFile) -> dict[str, Any]:
        attachment_id = str(new_snowflake())
        path = f"attachments/{channel}/{attachment_id}/{file.filename}"
        self._files[path] = file.data
        url = f"{CDN_HOSTS[0]}{path}?ex=1&is=1&hm=ab"
        return {
            "id": attachment_id,
            "filename": file.filename,
            "size": len(file.data),
            "url": url,
            "proxy_url": url.replace(CDN_HOSTS[0], CDN_HOSTS[1]),
        }


async def _read_body(request: web.Request) -> tuple[Any, list[SentFile]]:
    if request.content_type == "multipart/form-data":
        body: Any = None
        files: list[SentFile] = []
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "payload_json":
                body = json.loads(await part.text())
            elif part.filename:
                files.append(SentFile(part.filename, bytes(await part.read())))
        return body, files
    raw = await request.read()
    return (json.loads(raw) if raw else None), []


def _json(data: Any) -> web.Response:
    # Exactly "application/json": discord.py reads JSON only under that content type.
    return web.Response(
        body=json.dumps(data).encode(), headers={"Content-Type": "application/json"}
    )


def _error(status: int, code: int, message: str) -> web.Response:
    response = _json({"message": message, "code": code})
    response.set_status(status)
    return response


def _application() -> dict[str, Any]:
    return {
        "id": str(APP_ID),
        "name": "imgbot",
        "description": "",
        "icon": None,
        "bot_public": True,
        "bot_require_code_grant": False,
        "owner": user(900, "owner"),
        "verify_key": "0" * 64,
        "flags": 0,
    }
