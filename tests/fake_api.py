"""A fake OpenAI-compatible image API: a real HTTP server on 127.0.0.1, for tests and bench.

    with FakeImageAPI(key="sk-test", mode="b64", delay=0.0) as api:
        settings = Settings(openai_base_url=api.base_url, openai_api_key="sk-test")
        api.inject("rate_limit", times=2, retry_after=1)
        ...
        api.api_requests[-1].json          # what the client sent (never the key)

It runs in a background thread (stdlib `ThreadingHTTPServer`), so it serves any event
loop and plain scripts alike. It behaves like the endpoints: checks the bearer key, the
model, the size rules per model, `n`, `quality`, the prompt length and the multipart
`image[]` parts; it answers with real images of the asked size and format, and a `usage`
computed like the real one (its own small copy of the token table and formula).

Modes (how answers come back when the request does not say):
    b64           plain base64 in `b64_json` (the official API's shape)
    b64_prefixed  `b64_json` with a `data:image/png;base64,` prefix (the seed's proxy)
    url           a `url` served by this server under /files/…
    official      like b64, and a sent `response_format` is refused (400 unknown_parameter)

Streaming: a request with `stream: true` (and `partial_images` 0-3) is answered with
server-sent events, as OpenAI does: `image_generation.partial_image` (edits:
`image_edit.partial_image`) events carrying `b64_json` images of the asked size and format
and their `partial_image_index`, then the `*.completed` event with the image and `usage`
(the usage counts 100 output tokens per partial, and is on that event only). With a `delay`,
the partials come at 1/(k+1), 2/(k+1)… of it and the completed event at its end
(3 partials: 25/50/75 %). `stream_support` says how this "relay" treats streaming for
every request: "sse" (the default), "refuse" (400 unknown_parameter on `stream`), "json"
(ignores it and answers plain JSON) or "drop" (sends one partial, then closes).

Faults (`inject(name, times=1, **params)`, taken in order by the next API calls):
    unauthorized, forbidden, not_found, insufficient_balance, insufficient_quota,
    rate_limit(retry_after=None), server_error, bad_gateway, unavailable, gateway_timeout,
    moderation_blocked, unknown_parameter, invalid_value,
    status(status=…, code=…, message=…, type=…, param=…, headers={…}),
    slow(seconds=1), hang(seconds=30), drop, trickle(interval=0.05, chunk=16),
    truncated_json, truncated_body, invalid_json, empty_data, bad_base64, not_image,
    truncated (each image a valid header and only the first half of its bytes), url_404, url_too_large(size=4 MB), url_not_image, url_bad_scheme,
    stream_refused (400 unknown_parameter, param stream), stream_json (a plain JSON answer
    to a stream request), stream_drop(after=1) (`after` partials, then the connection closes),
    stream_body(body=b"…") (these bytes as the event stream, for events of one's own).
"""

from __future__ import annotations

import base64
import io
import json
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

KNOWN_MODELS = ("gpt-image-2", "gpt-image-1.5", "gpt-image-1")
LEGACY_SIZES = ((1024, 1024), (1536, 1024), (1024, 1536))
QUALITIES = ("low", "medium", "high", "auto")
OUTPUT_FORMATS = {
    "png": ("PNG", "image/png"),
    "jpeg": ("JPEG", "image/jpeg"),
    "webp": ("WEBP", "image/webp"),
}
MODES = ("b64", "b64_prefixed", "url", "official")
STREAM_SUPPORT = ("sse", "refuse", "json", "drop")
PARTIAL_TOKENS = 100  # output tokens per partial image in the usage (OpenAI: "about 100")
ACCEPTED_MIMES = ("image/png", "image/jpeg", "image/webp")
MAX_PROMPT = 32000
MAX_IMAGES = 16
MAX_IMAGE_BYTES = 50 * 1024 * 1024

# Token counts per image for gpt-image-1/1.5 (OpenAI's published table).
LEGACY_TOKENS = {
    (1024, 1024): {"low": 272, "medium": 1056, "high": 4160},
    (1024, 1536): {"low": 408, "medium": 1584, "high": 6240},
    (1536, 1024): {"low": 400, "medium": 1568, "high": 6208},
}
GPT2_FACTOR = {"low": 16, "medium": 48, "high": 96}

_STATUS_FAULTS: dict[str, dict[str, Any]] = {
    "unauthorized": {
        "status": 401,
        "type": "invalid_request_error",
        "code": "invalid_api_key",
        "message": "Incorrect API key provided.",
    },
    "forbidden": {
        "status": 403,
        "type": "invalid_request_error",
        "code": "forbidden",
        "message": "You are not allowed to use this model.",
    },
    "not_found": {
        "status": 404,
        "type": "invalid_request_error",
        "code": None,
        "message": "Invalid URL (POST /v1/images/generations)",
    },
    "insufficient_balance": {
        "status": 402,
        "type": "insufficient_balance",
        "code": "insufficient_balance",
        "message": "余额不足 Insufficient account balance, please top up.",
    },
    "insufficient_quota": {
        "status": 429,
        "type": "insufficient_quota",
        "code": "insufficient_quota",
        "message": "You exceeded your current quota, please check your plan and billing details.",
    },
    "rate_limit": {
        "status": 429,
        "type": "requests",
        "code": "rate_limit_exceeded",
        "message": "Rate limit reached for images per minute.",
    },
    "server_error": {
        "status": 500,
        "type": "server_error",
        "code": None,
        "message": "The server had an error while processing your request.",
    },
    "bad_gateway": {"status": 502, "type": "server_error", "code": None, "message": "Bad gateway"},
    "unavailable": {
        "status": 503,
        "type": "server_error",
        "code": None,
        "message": "The engine is currently overloaded, please try again later.",
    },
    "gateway_timeout": {
        "status": 504,
        "type": "server_error",
        "code": None,
        "message": "Gateway timeout",
    },
    "moderation_blocked": {
        "status": 400,
        "type": "image_generation_user_error",
        "code": "moderation_blocked",
        "message": "Your request was rejected as a result of our safety "
        "system. Your request may contain content that is not allowed.",
    },
    "unknown_parameter": {
        "status": 400,
        "type": "invalid_request_error",
        "code": "unknown_parameter",
        "param": "response_format",
        "message": "Unknown parameter: 'response_format'.",
    },
    "invalid_value": {
        "status": 400,
        "type": "invalid_request_error",
        "code": "invalid_value",
        "param": "size",
        "message": "Invalid value for 'size'.",
    },
    "status": {"status": 418, "type": "test_error", "code": "test", "message": "Injected status"},
    "stream_refused": {
        "status": 400,
        "type": "invalid_request_error",
        "code": "unknown_parameter",
        "param": "stream",
        "message": "Unknown parameter: 'stream'.",
    },
}
_ANSWER_FAULTS = frozenset(
    {
        "slow",
        "hang",
        "drop",
        "trickle",
        "truncated",
        "truncated_json",
        "truncated_body",
        "invalid_json",
        "empty_data",
        "bad_base64",
        "not_image",
        "url_404",
        "url_too_large",
        "url_not_image",
        "url_bad_scheme",
        "stream_json",
        "stream_drop",
        "stream_body",
    }
)
FAULTS = tuple(_STATUS_FAULTS) + tuple(sorted(_ANSWER_FAULTS))


MISSING = object()  # a usage_rewrite's answer: no usage in the answer at all


@dataclass(frozen=True)
class Part:
    """One multipart part as received."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class RecordedRequest:
    """One request the fake received; the Authorization value is never kept."""

    method: str
    path: str
    content_type: str
    authorized: bool
    json: dict[str, Any] | None = None
    parts: list[Part] = field(default_factory=list)
    # time.monotonic() when the request came in, and when the fake began sending its answer
    # (the client cannot have the answer earlier): for checking how many ran at once.
    received: float = field(default_factory=time.monotonic)
    answered: float | None = None

    @property
    def fields(self) -> dict[str, str]:
        """Return the text fields of a multipart request."""
        return {p.name: p.data.decode("utf-8", "replace") for p in self.parts if p.filename is None}

    @property
    def files(self) -> list[Part]:
        """Return the file parts of a multipart request."""
        return [p for p in self.parts if p.filename is not None]


@dataclass(frozen=True)
class _Job:
    model: str
    prompt: str
    n: int
    size: tuple[int, int]
    quality: str
    output_format: str
    transparent: bool
    answer: str  # b64 | b64_prefixed | url
    references: tuple[tuple[int, int], ...]
    stream: bool = False
    partials: int = 0
    edit: bool = False


class _ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = (
            status,
            message,
            code,
            param,
            type,
        )


class FakeImageAPI:
    """A real HTTP server that behaves like the image endpoints, with faults on demand."""

    def __init__(
        self,
        key: str = "sk-fake-key",
        mode: str = "b64",
        delay: float = 0.0,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.key = key
        self.mode = mode
        self.delay = delay
        self.stream_support = "sse"  # see STREAM_SUPPORT
        # Rewrites the usage of every answer (relays report odd things); return MISSING to
        # leave `usage` out of the answer.
        self.usage_rewrite: Callable[[dict[str, Any]], Any] | None = None
        self._host, self._port = host, port
        self.requests: list[RecordedRequest] = []
        self._faults: deque[tuple[str, dict[str, Any]]] = deque()
        self._files: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self._big_files: dict[str, int] = {}
        self._images: dict[tuple[Any, ...], bytes] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> FakeImageAPI:
        """Start serving in a background thread."""
        self._stopping.clear()
        server = ThreadingHTTPServer((self._host, self._port), _Handler)
        server.daemon_threads = True
        server.api = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name="fake-image-api",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; hanging answers are released. Safe to call twice."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeImageAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """Return the port being served."""
        if self._server is None:
            raise RuntimeError("the fake image API is not running")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        """Return the root URL (without /v1), as a proxy's page gives it."""
        return f"http://{self._host}:{self.port}"

    # --- control and inspection --------------------------------------------------------

    def inject(self, fault: str, times: int = 1, **params: Any) -> None:
        """Make the next `times` API calls fail with `fault` (see FAULTS)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {', '.join(FAULTS)}")
        with self._lock:
            self._faults.extend([(fault, params)] * times)

    def reset(self) -> None:
        """Forget recorded requests and pending faults."""
        with self._lock:
            self.requests.clear()
            self._faults.clear()

    @property
    def api_requests(self) -> list[RecordedRequest]:
        """Return the recorded calls to /v1/images/* (not the file downloads)."""
        with self._lock:
            return [r for r in self.requests if r.path.startswith("/v1/")]

    # --- serving ----------------------------------------------------------------------

    def _wait(self, seconds: float) -> bool:
        """Sleep, but return False at once when the server stops."""
        return seconds <= 0 or not self._stopping.wait(seconds)

    def _handle_get(self, h: _Handler) -> None:
        path = h.path.split("?", 1)[0]
        with self._lock:
            self.requests.append(RecordedRequest("GET", path, "", self._authorized(h)))
            name = path.removeprefix("/files/")
            stored = self._files.get(name) if path.startswith("/files/") else None
            big = self._big_files.get(name)
        if path == "/v1/models":
            if not self._authorized(h):
                self._send_error(h, _ApiError(401, "Incorrect API key provided.", code="invalid_api_key"))
                return
            listing = {"object": "list", "data": [{"id": m, "object": "model"} for m in KNOWN_MODELS]}
            self._send(h, 200, json.dumps(listing).encode(), "application/json")
            return
        if big is not None:
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.send_header("Content-Length", str(big))
            h.end_headers()
            chunk = b"\x89PNG\r\n\x1a\n" + bytes(65528)
            sent = 0
            while sent < big and not self._stopping.is_set():
                piece = chunk[: big - sent]
                h.wfile.write(piece)
                sent += len(piece)
            return
        if stored is None:
            self._send_error(h, _ApiError(404, "File not found", code="not_found"))
            return
        data, mime = stored
        self._send(h, 200, data, mime)

    def _handle_post(self, h: _Handler) -> None:
        path = h.path.split("?", 1)[0]
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        ctype = h.headers.get("Content-Type", "")
        record = RecordedRequest("POST", path, ctype, self._authorized(h))
        try:
            if ctype.startswith("application/json"):
                record.json = json.loads(body or b"null")
            elif ctype.startswith("multipart/form-data"):
                record.parts = _parse_multipart(body, ctype)
        except (ValueError, UnicodeDecodeError):
            pass
        with self._lock:
            self.requests.append(record)
            fault = self._faults.popleft() if self._faults and path.startswith("/v1/") else None
        name, params = fault if fault else ("", {})
        asked_stream = _asks_stream(record)
        support = self.stream_support
        if asked_stream and support == "refuse" and not name:
            name, params = "stream_refused", {}
        # A stream's delay is spread over its events: the first slice here, the rest between.
        slices = _partials_asked(record) + 1 if asked_stream else 1
        if not self._wait(self.delay / slices):
            return
        if name in _STATUS_FAULTS:
            self._send_status_fault(h, name, params)
            return
        if name == "drop":
            return  # the server closes the connection without a word
        if name == "hang":
            self._wait(float(params.get("seconds", 30)))
            return
        if name == "slow" and not self._wait(float(params.get("seconds", 1))):
            return
        try:
            if not record.authorized:
                raise _ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
            if path == "/v1/images/generations":
                if record.json is None or not isinstance(record.json, dict):
                    raise _ApiError(400, "We could not parse the JSON body of your request.")
                job = self._job(record.json, [])
            elif path == "/v1/images/edits":
                if not ctype.startswith("multipart/form-data"):
                    raise _ApiError(400, "This fake accepts edits as multipart/form-data only.")
                job = self._job(record.fields, record.files)
            else:
                raise _ApiError(404, f"Invalid URL (POST {path})")
        except _ApiError as err:
            self._send_error(h, err)
            return
        if job.stream and support == "drop" and not name:
            name, params = "stream_drop", {}
        if job.stream and name != "stream_json" and (support != "json" or name):
            record.answered = time.monotonic()
            self._answer_stream(h, job, name, params, self.delay / slices)
            return
        if job.stream:
            # Answered as if `stream` were not there: no previews drawn, none billed.
            if not self._wait(self.delay - self.delay / slices):
                return
            job = replace(job, partials=0)
        record.answered = time.monotonic()
        self._answer(h, job, name, params)

    def _authorized(self, h: _Handler) -> bool:
        return h.headers.get("Authorization", "") == f"Bearer {self.key}"

    # --- validation ---------------------------------------------------------------------

    def _job(self, fields: dict[str, Any], files: list[Part]) -> _Job:
        known = {
            "model",
            "prompt",
            "n",
            "size",
            "quality",
            "response_format",
            "output_format",
            "output_compression",
            "background",
            "moderation",
            "user",
            "input_fidelity",
            "image",
            "image[]",
            "mask",
            "partial_images",
            "stream",
        }
        for name in fields:
            if name not in known:
                raise _ApiError(
                    400, f"Unknown parameter: '{name}'.", code="unknown_parameter", param=name
                )
        model = fields.get("model")
        if model not in KNOWN_MODELS:
            raise _ApiError(
                400,
                f"Invalid value: '{model}'. Supported values are: {', '.join(KNOWN_MODELS)}.",
                code="invalid_value",
                param="model",
            )
        prompt = fields.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise _ApiError(
                400,
                "Missing required parameter: 'prompt'.",
                code="missing_required_parameter",
                param="prompt",
            )
        if len(prompt) > MAX_PROMPT:
            raise _ApiError(
                400,
                f"Invalid 'prompt': string too long. Expected a string with "
                f"maximum length {MAX_PROMPT}, but got a string with length "
                f"{len(prompt)} instead.",
                code="string_above_max_length",
                param="prompt",
            )
        try:
            n = int(fields.get("n", 1))
        except (TypeError, ValueError):
            n = 0
        if not 1 <= n <= 10:
            raise _ApiError(
                400,
                "Invalid 'n': expected an integer between 1 and 10.",
                code="invalid_value",
                param="n",
            )
        quality = fields.get("quality", "auto")
        if quality not in QUALITIES:
            raise _ApiError(
                400,
                f"Invalid value: '{quality}'. Supported values are: "
                "'low', 'medium', 'high', and 'auto'.",
                code="invalid_value",
                param="quality",
            )
        output_format = fields.get("output_format") or "png"
        if output_format not in OUTPUT_FORMATS:
            raise _ApiError(
                400,
                f"Invalid value: '{output_format}'. Supported values are: "
                "'png', 'jpeg', and 'webp'.",
                code="invalid_value",
                param="output_format",
            )
        background = fields.get("background") or "auto"
        if background not in ("transparent", "opaque", "auto"):
            raise _ApiError(
                400, f"Invalid value: '{background}'.", code="invalid_value", param="background"
            )
        if background == "transparent" and output_format == "jpeg":
            raise _ApiError(
                400,
                "Transparent background requires output_format png or webp.",
                code="invalid_value",
                param="background",
            )
        answer = {"b64": "b64", "official": "b64"}.get(self.mode, self.mode)
        response_format = fields.get("response_format")
        if response_format is not None:
            if self.mode == "official":
                raise _ApiError(
                    400,
                    "Unknown parameter: 'response_format'.",
                    code="unknown_parameter",
                    param="response_format",
                )
            if response_format == "url":
                answer = "url"
            elif response_format == "b64_json":
                answer = "b64" if self.mode == "b64" else "b64_prefixed"
            else:
                raise _ApiError(
                    400,
                    f"Invalid value: '{response_format}'. Supported values "
                    "are: 'url' and 'b64_json'.",
                    code="invalid_value",
                    param="response_format",
                )
        masks = [part for part in files if part.name == "mask"]
        files = [part for part in files if part.name != "mask"]
        references = tuple(self._check_reference(i, part) for i, part in enumerate(files, 1))
        if masks:
            self._check_mask(masks, references)
        if "image" in fields or "image[]" in fields:
            raise _ApiError(
                400, "'image' must be a file upload.", code="invalid_value", param="image"
            )
        if len(references) > MAX_IMAGES:
            raise _ApiError(
                400, f"Too many images: at most {MAX_IMAGES}.", code="invalid_value", param="image"
            )
        size = self._size(model, str(fields.get("size", "auto")), references)
        stream = fields.get("stream") in (True, "true", "True")
        partials = 0
        if fields.get("stream") not in (None, False, "false", "False") and not stream:
            raise _ApiError(400, "Invalid value for 'stream'.", code="invalid_value", param="stream")
        if "partial_images" in fields:
            try:
                partials = int(fields["partial_images"])
            except (TypeError, ValueError):
                partials = -1
            if not 0 <= partials <= 3:
                raise _ApiError(
                    400,
                    "Invalid 'partial_images': expected an integer between 0 and 3.",
                    code="invalid_value",
                    param="partial_images",
                )
        if stream and n != 1:
            raise _ApiError(400, "Streaming draws one image (n=1).", code="invalid_value", param="n")
        compression = fields.get("output_compression")
        if compression is not None:
            try:
                level = int(compression)
            except (TypeError, ValueError):
                level = -1
            if not 0 <= level <= 100 or output_format not in ("jpeg", "webp"):
                raise _ApiError(
                    400,
                    "output_compression must be 0-100 and needs output_format jpeg or webp.",
                    code="invalid_value",
                    param="output_compression",
                )
        if fields.get("moderation") not in (None, "low", "auto"):
            raise _ApiError(400, "Invalid value for 'moderation'.", code="invalid_value",
                            param="moderation")
        fidelity = fields.get("input_fidelity")
        if fidelity is not None and (
            fidelity not in ("high", "low") or not references or model == "gpt-image-2"
        ):
            raise _ApiError(
                400,
                "input_fidelity is for edits with gpt-image-1 or gpt-image-1.5 (high or low).",
                code="invalid_value",
                param="input_fidelity",
            )
        return _Job(
            model,
            prompt,
            n,
            size,
            quality,
            output_format,
            background == "transparent",
            answer,
            references,
            stream,
            partials if stream else 0,
            bool(files) or "image" in fields,
        )

    def _check_reference(self, index: int, part: Part) -> tuple[int, int]:
        if part.name not in ("image", "image[]"):
            raise _ApiError(
                400,
                f"Unknown file parameter '{part.name}'.",
                code="unknown_parameter",
                param=part.name,
            )
        if not part.filename:
            raise _ApiError(
                400, "Image parts need a filename.", code="invalid_value", param="image"
            )
        if part.content_type not in ACCEPTED_MIMES:
            raise _ApiError(
                400,
                f"Invalid file 'image': unsupported mimetype "
                f"('{part.content_type}'). Supported file formats are 'image/jpeg', "
                "'image/png', and 'image/webp'.",
                code="unsupported_file_mimetype",
                param="image",
            )
        if len(part.data) > MAX_IMAGE_BYTES:
            raise _ApiError(
                400, "Image file too large (max 50 MB).", code="invalid_value", param="image"
            )
        try:
            with Image.open(io.BytesIO(part.data)) as im:
                fmt, size = im.format, im.size
        except Exception as err:  # noqa: BLE001 - whatever Pillow cannot read is refused
            raise _ApiError(
                400,
                f"Invalid image file or mode for image {index}, please check your image file.",
                code="invalid_image_file",
                param="image",
            ) from err
        if fmt not in ("PNG", "JPEG", "MPO", "WEBP"):
            raise _ApiError(
                400,
                f"Invalid image file or mode for image {index}, please check your image file.",
                code="invalid_image_file",
                param="image",
            )
        return size

    def _check_mask(self, masks: list[Part], refs: tuple[tuple[int, int], ...]) -> None:
        # As the real API: one PNG with an alpha channel, the size of the first image.
        try:
            with Image.open(io.BytesIO(masks[0].data)) as im:
                fmt, size, mode = im.format, im.size, im.mode
        except Exception as err:  # noqa: BLE001 - whatever Pillow cannot read is refused
            raise _ApiError(
                400, "Invalid mask image.", code="invalid_image_file", param="mask"
            ) from err
        if len(masks) > 1 or not refs or fmt != "PNG" or mode not in ("RGBA", "LA"):
            raise _ApiError(400, "Invalid mask image.", code="invalid_image_file", param="mask")
        if size != refs[0]:
            raise _ApiError(
                400,
                "Invalid mask: it must have the same dimensions as the image.",
                code="invalid_value",
                param="mask",
            )

    def _size(self, model: str, size: str, refs: tuple[tuple[int, int], ...]) -> tuple[int, int]:
        bad = _ApiError(
            400, f"Invalid size '{size}' for model {model}.", code="invalid_value", param="size"
        )
        if size == "auto":
            if not refs:
                return 1024, 1024
            w, h = refs[0]
            if model != "gpt-image-2":
                return min(LEGACY_SIZES, key=lambda s: abs(math.log((s[0] / s[1]) / (w / h))))
            ratio = min(max(w / h, 1 / 3), 3)
            scale = math.sqrt(1024 * 1024 / ratio)
            return _snap16(scale * ratio), _snap16(scale)
        try:
            w_text, h_text = size.lower().split("x")
            w, h = int(w_text), int(h_text)
        except ValueError:
            raise bad from None
        if model != "gpt-image-2":
            if (w, h) not in LEGACY_SIZES:
                raise _ApiError(
                    400,
                    f"Invalid value: '{size}'. Supported values are: "
                    "'1024x1024', '1024x1536', '1536x1024', and 'auto'.",
                    code="invalid_value",
                    param="size",
                )
            return w, h
        long, short = max(w, h), min(w, h)
        if (
            w % 16
            or h % 16
            or long > 3840
            or short <= 0
            or long > 3 * short
            or not 655_360 <= w * h <= 8_294_400
        ):
            raise bad
        return w, h

    # --- answers -------------------------------------------------------------------------

    def _usage(self, job: _Job) -> dict[str, Any]:
        text_tokens = max(1, len(job.prompt.split()))
        image_tokens = sum(_reference_tokens(w, h) for w, h in job.references)
        quality = "medium" if job.quality == "auto" else job.quality
        w, h = job.size
        if job.model == "gpt-image-2":
            f = GPT2_FACTOR[quality]
            long, short = max(w, h), min(w, h)
            s = (2 * f * short + long) // (2 * long)
            per_image = (f * s * (2_000_000 + w * h) + 3_999_999) // 4_000_000
        else:
            per_image = LEGACY_TOKENS[(w, h)][quality]
        output = per_image * job.n + PARTIAL_TOKENS * job.partials
        return {
            "input_tokens": text_tokens + image_tokens,
            "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": image_tokens},
            "output_tokens": output,
            "total_tokens": text_tokens + image_tokens + output,
        }

    def _image(self, job: _Job, index: int, partial: int | None = None) -> bytes:
        """Return image `index` of a job; `partial` k: its k-th preview (darker, same size)."""
        w, h = job.size
        key = (w, h, job.output_format, job.transparent, index % 4, partial)
        with self._lock:
            cached = self._images.get(key)
        if cached is not None:
            return cached
        colour = ((200, 60, 60), (60, 160, 90), (60, 90, 200), (220, 180, 40))[index % 4]
        if partial is not None:
            share = (partial + 1) / (job.partials + 1)
            colour = tuple(int(c * share) for c in colour)  # type: ignore[assignment]
        if job.transparent:
            im = Image.new("RGBA", (w, h), (*colour, 128))
        else:
            im = Image.new("RGB", (w, h), colour)
        fmt = OUTPUT_FORMATS[job.output_format][0]
        out = io.BytesIO()
        options: dict[str, Any] = {
            "PNG": {"compress_level": 1},
            "JPEG": {"quality": 80},
            "WEBP": {"quality": 80, "method": 0},
        }[fmt]
        im.save(out, format=fmt, **options)
        data = out.getvalue()
        with self._lock:
            self._images[key] = data
        return data

    def serve_file(self, data: bytes, mime: str = "image/png", ext: str = "png") -> str:
        """Serve `data` under /files/… and return its URL (e.g. a reference to download)."""
        name = f"{uuid.uuid4().hex}.{ext}"
        with self._lock:
            self._files[name] = (data, mime)
            while len(self._files) > 2000:  # the benchmark makes many; keep memory bounded
                self._files.popitem(last=False)
        return f"{self.base_url}/files/{name}"

    def serve_large_file(self, size: int) -> str:
        """Serve `size` bytes (a PNG signature, then zeros) streamed, and return the URL."""
        name = f"big-{uuid.uuid4().hex}.png"
        with self._lock:
            self._big_files[name] = size
        return f"{self.base_url}/files/{name}"

    def _answer(self, h: _Handler, job: _Job, fault: str, params: dict[str, Any]) -> None:
        usage = self._usage(job)
        rewrite = self.usage_rewrite
        if rewrite is not None:
            usage = rewrite(usage)
        mime = OUTPUT_FORMATS[job.output_format][1]
        ext = job.output_format
        items: list[dict[str, Any]] = []
        for i in range(job.n):
            data = self._image(job, i)
            item: dict[str, Any] = {}
            if fault == "bad_base64":
                item["b64_json"] = "%%% this is not base64 %%%"
            elif fault == "not_image":
                item["b64_json"] = base64.b64encode(b"hello, I am not an image").decode()
            elif fault == "truncated":
                item["b64_json"] = base64.b64encode(data[: len(data) // 2]).decode()
            elif fault == "url_404":
                item["url"] = f"{self.base_url}/files/missing-{uuid.uuid4().hex}.{ext}"
            elif fault == "url_too_large":
                item["url"] = self.serve_large_file(int(params.get("size", 4 * 1024 * 1024)))
            elif fault == "url_not_image":
                item["url"] = self.serve_file(
                    b"<html><body>Not found</body></html>", "text/html", "html"
                )
            elif fault == "url_bad_scheme":
                item["url"] = "file:///etc/passwd"
            elif job.answer == "url":
                item["url"] = self.serve_file(data, mime, ext)
            else:
                encoded = base64.b64encode(data).decode()
                item["b64_json"] = (
                    f"data:{mime};base64,{encoded}" if job.answer == "b64_prefixed" else encoded
                )
            if self.mode in ("b64_prefixed", "url"):
                item["revised_prompt"] = job.prompt  # the proxy echoes the prompt
            items.append(item)
        if fault == "empty_data":
            items = []
        payload = {
            "created": int(time.time()),
            "data": items,
            "usage": usage,  # dropped below when a rewrite said MISSING
            "size": f"{job.size[0]}x{job.size[1]}",
            "quality": "medium" if job.quality == "auto" else job.quality,
            "output_format": job.output_format,
            "background": "transparent" if job.transparent else "opaque",
        }
        if usage is MISSING:
            del payload["usage"]
        body = json.dumps(payload).encode()
        if fault == "truncated_json":
            self._send(h, 200, body[: len(body) // 2], "application/json")
        elif fault == "invalid_json":
            self._send(h, 200, b"<html><body>upstream error</body></html>", "application/json")
        elif fault == "truncated_body":
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
        elif fault == "trickle":
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            chunk, interval = int(params.get("chunk", 16)), float(params.get("interval", 0.05))
            for start in range(0, len(body), chunk):
                h.wfile.write(body[start : start + chunk])
                h.wfile.flush()
                if not self._wait(interval):
                    return
        else:
            self._send(h, 200, body, "application/json")

    def _answer_stream(
        self, h: _Handler, job: _Job, fault: str, params: dict[str, Any], pause: float
    ) -> None:
        """Answer with server-sent events: the partials, then the completed image."""
        usage = self._usage(job)
        rewrite = self.usage_rewrite
        if rewrite is not None:
            usage = rewrite(usage)
        prefix = "image_edit" if job.edit else "image_generation"
        common = {
            "created_at": int(time.time()),
            "size": f"{job.size[0]}x{job.size[1]}",
            "quality": "medium" if job.quality == "auto" else job.quality,
            "background": "transparent" if job.transparent else "opaque",
            "output_format": job.output_format,
        }
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream; charset=utf-8")
        h.send_header("Cache-Control", "no-cache")
        h.end_headers()
        if fault == "stream_body":
            h.wfile.write(bytes(params["body"]))
            return
        drop_after = int(params.get("after", 1)) if fault == "stream_drop" else None

        def send(kind: str, payload: dict[str, Any]) -> None:
            event = f"{prefix}.{kind}"
            body = json.dumps({"type": event, **payload})
            h.wfile.write(f"event: {event}\ndata: {body}\n\n".encode())
            h.wfile.flush()

        for k in range(job.partials):
            if drop_after is not None and k >= drop_after:
                return  # the connection closes: the stream ends without its completed event
            data = base64.b64encode(self._image(job, 0, partial=k)).decode()
            send("partial_image", {"b64_json": data, **common, "partial_image_index": k})
            if not self._wait(pause):
                return
        if drop_after is not None:
            return
        completed: dict[str, Any] = {
            "b64_json": base64.b64encode(self._image(job, 0)).decode(),
            **common,
            "usage": usage,
        }
        if usage is MISSING:
            del completed["usage"]
        send("completed", completed)

    def _send_status_fault(self, h: _Handler, name: str, params: dict[str, Any]) -> None:
        spec = {**_STATUS_FAULTS[name], **params}
        headers = dict(spec.get("headers") or {})
        if spec.get("retry_after") is not None:
            headers["Retry-After"] = str(spec["retry_after"])
        message = str(spec["message"])
        if spec.get("echo_key"):
            # Some proxies echo the key they were sent; the client must redact it.
            message += f" (key: {h.headers.get('Authorization', '').removeprefix('Bearer ')})"
        err = _ApiError(
            int(spec["status"]),
            message,
            code=spec.get("code"),
            param=spec.get("param"),
            type=str(spec.get("type")),
        )
        self._send_error(h, err, headers)

    def _send_error(
        self, h: _Handler, err: _ApiError, headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps(
            {
                "error": {
                    "message": err.message,
                    "type": err.type,
                    "param": err.param,
                    "code": err.code,
                }
            }
        ).encode()
        self._send(h, err.status, body, "application/json", headers)

    def _send(
        self,
        h: _Handler,
        status: int,
        body: bytes,
        ctype: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(body)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so a dropped connection is never a stale one.
    protocol_version = "HTTP/1.0"
    server_version = "FakeImageAPI/1.0"

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's naming
        self.server.api._handle_get(self)  # type: ignore[attr-defined]

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's naming
        self.server.api._handle_post(self)  # type: ignore[attr-defined]

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client went away (timeouts, cancelled calls): expected in tests

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


def _parse_multipart(body: bytes, ctype: str) -> list[Part]:
    boundary = ""
    for piece in ctype.split(";")[1:]:
        name, _, value = piece.strip().partition("=")
        if name.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        raise ValueError("multipart without a boundary")
    parts = []
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk.removeprefix(b"\r\n").removesuffix(b"\r\n")
        head, _, data = chunk.partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        disposition = _header_params(headers.get("content-disposition", ""))
        parts.append(
            Part(
                disposition.get("name", ""),
                disposition.get("filename"),
                headers.get("content-type"),
                data,
            )
        )
    return parts


def _header_params(value: str) -> dict[str, str]:
    params = {}
    for piece in value.split(";")[1:]:
        name, _, raw = piece.strip().partition("=")
        params[name.lower()] = raw.strip('"')
    return params


def _asks_stream(record: RecordedRequest) -> bool:
    fields = record.json if record.json is not None else record.fields
    return isinstance(fields, dict) and fields.get("stream") in (True, "true", "True")


def _partials_asked(record: RecordedRequest) -> int:
    fields = record.json if record.json is not None else record.fields
    try:
        return max(0, min(3, int(fields.get("partial_images", 0))))  # type: ignore[union-attr]
    except (TypeError, ValueError, AttributeError):
        return 0


def _snap16(value: float) -> int:
    return max(16, int(round(value / 16)) * 16)


def _reference_tokens(w: int, h: int) -> int:
    # Vision-style tiling: fit in 2048, shortest side to 768, 170 tokens per 512 tile + 85.
    scale = min(1.0, 2048 / max(w, h))
    w, h = w * scale, h * scale
    scale = min(1.0, 768 / min(w, h))
    w, h = w * scale, h * scale
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the fake image API until Ctrl-C.")
    parser.add_argument("--key", default="sk-fake-key")
    parser.add_argument("--mode", default="b64", choices=MODES)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--stream-support", default="sse", choices=STREAM_SUPPORT)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with FakeImageAPI(key=args.key, mode=args.mode, delay=args.delay, port=args.port) as api:
        api.stream_support = args.stream_support
        print(f"fake image API at {api.base_url} (key {args.key!r}, mode {args.mode})", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
