"""The OpenAI-compatible images API, as a Starlette app on the shared job runner.

    POST /v1/images/generations   JSON, OpenAI's fields
    POST /v1/images/edits         multipart: `image` and/or repeated `image[]`, optional `mask`
    GET  /v1/models               the models we draw with
    GET  /v1/files/<token>.<ext>  url results (unguessable, expiring, served by any replica;
                                  see `ResultFiles`)

A request is authorised by a personal key (`Authorization: Bearer ik-…`, made with
`imgbot keys create`); the key's ledger user is the Requester, so spend, limits, blocks and
history are the same as in that user's chats. The fields are turned into the command
language (`--model X --size WxH --q high --n 2 -- prompt`) and the job goes through
`JobRunner.run` with a `WebReply`, like a chat's: same queue, limits, ledger and crash rules.
Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}` with a fitting status,
never a traceback. Bodies are capped (`WEB_MAX_BODY_BYTES`) while they arrive, before
anything is read whole.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from core.errors import (
    AccessDenied,
    BadReferenceError,
    Cancelled,
    ContentPolicyError,
    DeliveryFailed,
    ImgbotError,
    LimitExceeded,
    PromptError,
    QueueFull,
    RateLimited,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
)
from core.images import MAX_REFERENCES
from core.messages import language_of
from core.runner import JobRunner
from core.service import DrawOutcome, ImageService, WebState
from core.store import StoreError
from core.store.web import FileToKeep, KeptFileData, KeptFileInfo
from core.types import KNOWN_MODELS, GeneratedImage, IncomingImage, Progress, Requester

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# url results and the page's originals: kept in the ledger for an hour, at most this many
# bytes in all (past it, the oldest go first), so any replica serves them.
URL_TTL_S = 3600.0
URL_CACHE_BYTES = 512 * 1024 * 1024
# Where a job came through, kept with it: a web job's caller waits on this process, so after
# a crash no bot may carry it on (a key of `telegram:42` must not be resumed in that chat
# while the script that asked may already be retrying); the takeover ends it instead.
WEB_ORIGIN = {"via": "web"}
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}

_FIELDS = {
    "model", "prompt", "n", "size", "quality", "background", "output_format",
    "output_compression", "moderation", "input_fidelity", "response_format", "user",
    "stream", "partial_images",
}
_CHOICES = {
    "quality": ("low", "medium", "high", "auto"),
    "background": ("transparent", "opaque", "auto"),
    "output_format": ("png", "jpeg", "webp"),
    "response_format": ("b64_json", "url"),
    "moderation": ("low", "auto"),
    "input_fidelity": ("high", "low"),
}


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status, message, type, code, param
        )
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class BodyTooLarge(Exception):
    """The body went over WEB_MAX_BODY_BYTES while arriving."""


def _json_with_images(body: dict[str, Any], slot: str, images: Sequence[bytes]) -> bytes:
    """Return the answer's JSON with each image's base64 where `slot` stands.

    json.dumps of a 17 MB base64 string scans it for escapes and copies it twice; base64
    needs no escaping, so the text goes in as the bytes b64encode made.
    """
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    parts = text.split(json.dumps(slot).encode())
    if len(parts) != len(images) + 1:  # the slot is random: nothing else can hold it
        raise RuntimeError("answer: image slots do not match the images")
    out = [parts[0]]
    for image, rest in zip(images, parts[1:], strict=True):
        out += [b'"', base64.b64encode(image), b'"', rest]
    return b"".join(out)


def _too_large(cap: int) -> ApiError:
    return ApiError(413, f"Request body larger than {cap} bytes.", code="request_too_large")


class BodyCap:
    """ASGI middleware: refuse bodies above `cap` bytes before they are read whole.

    A Content-Length above the cap is answered at once, unread; a body without one (or one
    that lies) is counted as it arrives and cut off at the cap.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], cap: int) -> None:
        self.app, self.cap = app, cap

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.cap):
            await _too_large(self.cap).response()(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.cap:
                    raise BodyTooLarge
            return message

        await self.app(scope, counted, send)


class ResultFiles:
    """url results and the page's originals: kept in the ledger for URL_TTL_S under an
    unguessable name (32 random bytes), which any replica serves at /v1/files/<name>."""

    def __init__(self, state: WebState, ttl: float = URL_TTL_S, cap: int = URL_CACHE_BYTES) -> None:
        self._state = state
        self.ttl, self.cap = ttl, cap

    async def keep(
        self, job_id: int, user_key: str, images: Sequence[GeneratedImage]
    ) -> list[KeptFileInfo]:
        """Keep a job's images for its user (their history offers them); return their names.

        Part of delivering them (a Reply's `result`): when the ledger does not take them,
        DeliveryFailed (retryable) lets the runner try again, then record the job
        undelivered and refundable, as when a chat's upload fails.
        """
        files = [
            FileToKeep(f"{secrets.token_urlsafe(32)}.{EXTENSIONS.get(image.mime, 'png')}",
                       image.data, image.mime, image.width, image.height)
            for image in images
        ]
        try:
            await self._state.keep_files(job_id, user_key, files, self.ttl, self.cap)
        except StoreError as err:
            raise DeliveryFailed(f"the ledger did not keep the images: {err}",
                                 retryable=True) from err
        return [KeptFileInfo(f.name, f.mime, f.width, f.height) for f in files]

    async def of_jobs(
        self, job_ids: Sequence[int], user_key: str
    ) -> dict[int, list[KeptFileInfo]]:
        """Return the files still kept of those jobs that are that user's, by job."""
        return await self._state.job_files(job_ids, user_key)

    async def get(self, name: str) -> KeptFileData | None:
        """Return a kept image, or None (unknown or expired)."""
        return await self._state.kept_file(name)


class WebReply:
    """The runner's Reply for one HTTP request: it keeps what happened, the handler answers.

    With `files` (a `url` answer), delivering is keeping the images where every replica
    serves them.
    """

    def __init__(self, files: ResultFiles | None = None, user_key: str = "") -> None:
        self._files, self._user_key = files, user_key
        self.outcome: DrawOutcome | None = None
        self.kept: list[KeptFileInfo] = []
        self.error: ImgbotError | None = None
        self.message: str | None = None
        self.failed: str | None = None

    async def progress(self, event: Progress) -> None:
        """No progress over plain HTTP (the answer comes when the job ends)."""

    async def result(self, outcome: DrawOutcome, four_k_credits: float | None) -> Sequence[str]:
        if self._files is not None:
            self.kept = await self._files.keep(outcome.job_id, self._user_key, outcome.images)
        self.outcome = outcome
        return []  # nothing to "vary" from later: no platform handles

    async def refusal(self, message: str | None, error: ImgbotError | None = None) -> None:
        self.message, self.error = message, error

    async def failure(self, message: str) -> None:
        self.failed = message


@dataclass(frozen=True)
class _Asked:
    command: str
    response_format: str


def _error_for(err: ImgbotError, message: str) -> ApiError:
    """Map a core error to OpenAI's shape and a status."""
    code = err.code
    if isinstance(err, (PromptError, BadReferenceError)):
        return ApiError(400, message, code=code, param=_param_of(err.key))
    if isinstance(err, AccessDenied):
        return ApiError(403, message, type="permission_error", code=code)
    if isinstance(err, LimitExceeded):
        # 402, not 429: a spend limit does not lift by retrying soon (the SDK retries 429).
        return ApiError(402, message, type="insufficient_quota", code="limit_exceeded")
    if isinstance(err, (RateLimited, QueueFull)):
        return ApiError(429, message, type="rate_limit_error", code=code,
                        headers={"Retry-After": "10"})
    if isinstance(err, Cancelled):
        return ApiError(503, message, type="server_error", code=code)
    if isinstance(err, ContentPolicyError):
        return ApiError(400, message, type="image_generation_user_error", code="moderation_blocked")
    if isinstance(err, UpstreamTimeout):
        return ApiError(504, message, type="upstream_error", code=code)
    if isinstance(err, UpstreamRejected):
        return ApiError(400, message, code=code)
    if isinstance(err, UpstreamError):
        return ApiError(502, message, type="upstream_error", code=code)
    return ApiError(400, message, code=code)


def _param_of(key: str) -> str | None:
    for word, param in (("mask", "mask"), ("compression", "output_compression"),
                        ("fidelity", "input_fidelity"), ("ref.", "image"), ("size", "size"),
                        ("ratio", "size"),
                        ("count", "n"), ("model", "model"), ("quality", "quality"),
                        ("format", "output_format"), ("background", "background"),
                        ("empty", "prompt"), ("prompt", "prompt")):
        if word in key:
            return param
    return None


def _bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


def _command(service: ImageService, fields: dict[str, Any]) -> _Asked:
    """Turn OpenAI's fields into the command language, refusing what the core cannot do."""
    for name in fields:
        if name not in _FIELDS:
            raise _bad(name, f"Unknown parameter: '{name}'.", "unknown_parameter")
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _bad("prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter")
    words: list[str] = []
    model = fields.get("model")
    if model is not None:
        if not isinstance(model, str) or service.settings.resolve_model(model) is None:
            known = ", ".join(KNOWN_MODELS)
            raise _bad("model", f"Invalid value: '{model}'. Supported values are: {known}.")
        words += ["--model", model]
    for name in ("quality", "background", "output_format", "response_format", "moderation",
                 "input_fidelity"):
        value = fields.get(name)
        if value is not None and value not in _CHOICES[name]:
            allowed = ", ".join(f"'{c}'" for c in _CHOICES[name])
            raise _bad(name, f"Invalid value: '{value}'. Supported values are: {allowed}.")
    if fields.get("quality") is not None:
        words += ["--q", fields["quality"]]
    if fields.get("output_format") is not None:
        words += ["--format", fields["output_format"]]
    if fields.get("background") in ("transparent", "opaque"):
        words.append(fields["background"])
    if fields.get("moderation") is not None:
        words += ["--moderation", fields["moderation"]]
    if fields.get("input_fidelity") is not None:
        words += ["--fidelity", fields["input_fidelity"]]
    compression = fields.get("output_compression")
    if compression is not None:
        # JSON sends a number, multipart a string; both must be a whole number 0-100.
        text = str(compression).strip() if not isinstance(compression, (bool, float)) else ""
        if not text.isdigit() or int(text) > 100:
            raise _bad("output_compression",
                       "Invalid 'output_compression': expected an integer between 0 and 100.")
        words += ["--compression", text]
    if fields.get("partial_images") is not None:
        raise _bad("partial_images", "'partial_images' needs streaming, which this server "
                   "does not offer.", "unsupported_parameter")
    if fields.get("stream") not in (None, False, "false"):
        raise _bad("stream", "Streaming is not supported by this server.", "unsupported_parameter")
    n = fields.get("n")
    if n is not None:
        try:
            count = int(n)
        except (TypeError, ValueError):
            count = 0
        if isinstance(n, bool) or not 1 <= count <= 10:
            raise _bad("n", "Invalid 'n': expected an integer between 1 and 10.")
        words += ["--n", str(count)]
    size = fields.get("size")
    if size is not None:
        if not isinstance(size, str):
            raise _bad("size", f"Invalid size '{size}'.")
        words.append("auto" if size == "auto" else f"--size={size}")
    user = fields.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user", "'user' must be a string.")
    return _Asked(" ".join([*words, "--", prompt]), fields.get("response_format") or "b64_json")


class WebApi:
    """The routes, bound to one service and runner."""

    def __init__(self, service: ImageService, files: ResultFiles | None = None) -> None:
        self.service = service
        self.runner = JobRunner(service)
        self.files = files or ResultFiles(service.web_state)

    def routes(self) -> list[BaseRoute]:
        """Return the API's routes (under /v1)."""
        return [
            Route("/v1/images/generations", self.generations, methods=["POST"]),
            Route("/v1/images/edits", self.edits, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/files/{name}", self.file, methods=["GET"]),
        ]

    def app(self, extra: Sequence[BaseRoute] = ()) -> BodyCap:
        """Return the ASGI app (the API and `extra` routes), bodies capped by
        WEB_MAX_BODY_BYTES."""
        app = Starlette(routes=[*self.routes(), *extra], exception_handlers={
            404: self._not_found, 405: self._not_allowed, Exception: self._internal,
        })
        return BodyCap(app, self.service.settings.web_max_body_bytes)

    # --- routes ---------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        try:
            await self._user(request)
        except ApiError as err:
            return err.response()
        names = [*KNOWN_MODELS, *sorted(self.service.settings.model_aliases)]
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "imgbot"} for m in names]
        return JSONResponse({"object": "list", "data": data})

    async def file(self, request: Request) -> Response:
        found = await self.files.get(request.path_params["name"])
        if found is None:
            return ApiError(404, "No such file, or it expired.", code="not_found").response()
        left = max(0, int((found.expires_at - datetime.now(UTC)).total_seconds()))
        return Response(found.data, media_type=found.mime,
                        headers={"Cache-Control": f"private, max-age={left}"})

    async def generations(self, request: Request) -> Response:
        try:
            requester = await self._user(request)
            try:
                body = await request.body()
            except BodyTooLarge:
                raise _too_large(self.service.settings.web_max_body_bytes) from None
            try:
                fields = json.loads(body or b"null")
            except ValueError:
                raise ApiError(400, "The body is not valid JSON.", code="invalid_json") from None
            if not isinstance(fields, dict):
                raise ApiError(400, "The body must be a JSON object.", code="invalid_json")
            asked = _command(self.service, fields)
            return await self._draw(request, requester, asked, [], None)
        except ApiError as err:
            return err.response()

    async def edits(self, request: Request) -> Response:
        try:
            requester = await self._user(request)
            try:
                form = await request.form(max_files=4 * MAX_REFERENCES, max_fields=64)
            except BodyTooLarge:
                raise _too_large(self.service.settings.web_max_body_bytes) from None
            except Exception as err:  # noqa: BLE001 - a malformed multipart body
                raise ApiError(400, f"Could not read the multipart body: {err}",
                               code="invalid_multipart") from None
            try:
                fields: dict[str, Any] = {}
                images: list[IncomingImage] = []
                mask: IncomingImage | None = None
                for name, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        data = await value.read()
                        item = IncomingImage(data, value.filename or None)
                        if name in ("image", "image[]"):
                            images.append(item)
                        elif name == "mask" and mask is None:
                            mask = item
                        else:
                            raise _bad(name, f"Unknown file parameter '{name}'.",
                                       "unknown_parameter")
                    elif name in ("image", "image[]", "mask"):
                        raise _bad(name, f"'{name}' must be a file upload.")
                    else:
                        fields[name] = value
            finally:
                await form.close()
            if not images:
                raise _bad("image", "Missing required parameter: 'image'.",
                           "missing_required_parameter")
            asked = _command(self.service, fields)
            return await self._draw(request, requester, asked, images, mask)
        except ApiError as err:
            return err.response()

    # --- the job ------------------------------------------------------------------------

    async def _user(self, request: Request) -> Requester:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        user_key = None
        if scheme.lower() == "bearer" and token.strip():
            user_key = await self.service.api_key_user(token.strip())
        if user_key is None:
            raise ApiError(
                401,
                "Incorrect API key provided. Make one with `imgbot keys create USER`.",
                code="invalid_api_key",
            )
        platform, _, user_id = user_key.partition(":")
        lang = request.headers.get("accept-language", "").split(",")[0].strip() or None
        return Requester(platform, user_id, display_name=user_id, language=lang)

    async def _draw(
        self,
        request: Request,
        requester: Requester,
        asked: _Asked,
        images: list[IncomingImage],
        mask: IncomingImage | None,
    ) -> Response:
        files = self.files if asked.response_format == "url" else None
        reply = WebReply(files, requester.user_key)

        async def references() -> list[IncomingImage]:
            return images

        await self.runner.run(requester, asked.command, references, reply, mask=mask,
                              origin=WEB_ORIGIN)
        lang = language_of(requester.language)
        if reply.outcome is None:
            if reply.error is not None:
                raise _error_for(reply.error, reply.message or reply.error.user_message(lang))
            raise ApiError(500, reply.failed or "internal error", type="server_error",
                           code="internal_error")
        return await self._answer(request, reply.outcome, asked.response_format, reply.kept)

    async def _answer(
        self, request: Request, outcome: DrawOutcome, fmt: str, kept: Sequence[KeptFileInfo]
    ) -> Response:
        slot = f"\u0000{secrets.token_hex(16)}\u0000"  # where each base64 text goes
        if fmt == "url":
            data = [{"url": f"{self._root(request)}/v1/files/{f.name}"} for f in kept]
        else:
            data = [{"b64_json": slot} for _ in outcome.images]
        if outcome.revised_prompt:
            for item in data:
                item["revised_prompt"] = outcome.revised_prompt
        first = outcome.images[0] if outcome.images else None
        body: dict[str, Any] = {
            "created": int(time.time()),
            "data": data,
            "quality": outcome.request.quality,
            "output_format": outcome.request.output_format or "png",
            "background": outcome.request.background or "auto",
        }
        if first is not None:
            body["size"] = f"{first.width}x{first.height}"
        job = await self.service.job(outcome.job_id)
        if job is not None and job.usage is not None:
            u = job.usage
            body["usage"] = {
                "input_tokens": u.text_input_tokens + u.image_input_tokens,
                "input_tokens_details": {"text_tokens": u.text_input_tokens,
                                         "image_tokens": u.image_input_tokens},
                "output_tokens": u.image_output_tokens + u.text_output_tokens,
                "output_tokens_details": {"image_tokens": u.image_output_tokens,
                                          "text_tokens": u.text_output_tokens},
                "total_tokens": u.total_tokens,
            }
        headers = {"X-Imgbot-Credits": f"{outcome.credits:.2f}",
                   "X-Imgbot-Job": str(outcome.job_id)}
        images = [] if fmt == "url" else [image.data for image in outcome.images]
        # Megabytes of base64: encoded and joined in a worker thread, off the event loop.
        content = await asyncio.to_thread(_json_with_images, body, slot, images)
        return Response(content, media_type="application/json", headers=headers)

    def _root(self, request: Request) -> str:
        public = self.service.settings.web_public_url.rstrip("/")
        return public or str(request.base_url).rstrip("/")

    # --- errors -----------------------------------------------------------------------

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return ApiError(404, f"Unknown path: {request.url.path}", code="not_found").response()

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return ApiError(405, f"{request.method} is not allowed here.",
                        code="method_not_allowed").response()

    async def _internal(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, BodyTooLarge):
            return _too_large(self.service.settings.web_max_body_bytes).response()
        log.error("web API: %s %s failed: %r", request.method, request.url.path, exc)
        return ApiError(500, "internal error", type="server_error",
                        code="internal_error").response()
