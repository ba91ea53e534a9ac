"""The image API client (httpx): generations and multi-image edits, and reference checks.

    prepare_references(files, max_bytes=…)      → checked `ReferenceImage`s, or BadReferenceError
    download_reference(http, url, max_bytes=…)  → the bytes of a reference file, capped
    ImageClient(http, settings).draw(request, references=(), on_partial=None)
                                                → `ImageResult`, or an UpstreamError
    api_root(base_url)                          → the API root ending in /v1

Previews: a request with `partial_images` > 0, drawn with an `on_partial` callback, asks
for a stream (`stream: true`, `partial_images`). The server-sent events are parsed as they
arrive (`_EventReader`; each event's base64 decoded on the way in, the body never held
whole); each `*.partial_image` goes to `on_partial`, and the `*.completed` event is the
result with its usage. Support differs by model and relay, so it degrades on its own: a
400 about `stream`/`partial_images` (before anything was drawn: costs nothing) is followed
at once by a normal call; a plain JSON answer is taken as the result; a stream that ends
before `completed` is followed by a normal call. Each time, the client remembers that this
API root does not stream this model (`partials_for` then says 0, so later jobs neither pay
for previews nor for a failed attempt) until the process restarts.

httpx errors are translated here and nowhere else (`raise … from err`). The API key goes
only into the Authorization header of calls to the configured API; it is redacted from
every `detail` and never logged.

Retries happen only where the request cannot have been billed: the connection was never
made (connect error or timeout, pool timeout), 429 (waiting `Retry-After` up to a cap) and
502/503/504 (a gateway answered for an upstream that did not). A 500, a dropped connection
or a read timeout may come after the image was drawn and billed, so they are not retried
(a read timeout only when `retry_read_timeout` is set).
"""

from __future__ import annotations

import asyncio
import binascii
import email.utils
import io
import json
import logging
import random
import re
import secrets
import struct
import time
import warnings
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import PurePath
from typing import Any

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from core.config import Settings
from core.errors import (
    BadReferenceError,
    ContentPolicyError,
    UpstreamAuthError,
    UpstreamBalanceError,
    UpstreamCorruptImage,
    UpstreamError,
    UpstreamMalformed,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from core.types import GeneratedImage as GeneratedImage
from core.types import ImageRequest, ImageResult, ReferenceImage, Usage

try:
    # SIMD base64: a 4K answer's 17 MB decodes in ~3 ms instead of binascii's ~75 ms here,
    # with the GIL released. Without it the standard library does the same work, slower.
    import pybase64
except ImportError:  # pragma: no cover - a declared dependency; the fallback is for odd installs
    pybase64 = None

log = logging.getLogger(__name__)

MAX_REFERENCES = 16
# Well below Pillow's own bomb threshold (~89 MP) and far above any real photo (a 200 MP
# phone mode excepted); the API itself downsizes references anyway.
MAX_REFERENCE_PIXELS = 50_000_000
# The formats we try to open at all: a short list keeps Pillow's guessers (TGA, …) from
# reading random bytes as an image.
_OPEN_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# Formats the API takes as they are; MPO is what Pillow calls a phone JPEG with extra frames.
_PASS_FORMATS = {
    "PNG": ("image/png", "png"),
    "JPEG": ("image/jpeg", "jpg"),
    "MPO": ("image/jpeg", "jpg"),
    "WEBP": ("image/webp", "webp"),
}
_PLAIN_MODES = frozenset({"RGB", "RGBA", "L"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ANSWER_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
# Big JSON answers are parsed in a worker thread; small ones are not worth the hop.
_THREAD_JSON_BYTES = 256 * 1024
# binascii decodes base64 in slices of this many characters (a multiple of 4): it holds the
# GIL for a whole call, and a 4K answer is 17 MB of text (~75 ms in one call), so the event
# loop only gets its turn between slices. pybase64 lets go of the GIL and takes it whole.
_B64_SLICE = 1024 * 1024
_B64_WHITESPACE = b" \t\r\n\v\f"
_EQUALS = ord("=")
# Where a base64 image string starts in an answer, and how many bytes to look back for it
# when it straddles two reads.
_B64_KEY = re.compile(rb'"b64_json"\s*:\s*"')
_KEY_OVERLAP = 64
# A `data:image/png;base64,` header longer than this is not one. Its bytes are taken as they
# are only when printable ASCII: anything else (a raw tab, invalid UTF-8) would make the
# answer invalid JSON, and the reader must not hide that by cutting the header out.
_DATA_HEADER_MAX = 256
_DATA_HEADER_CHARS = re.compile(rb"[\x20-\x7e]*")
# Stands in the JSON for a string decoded while it arrived, followed by a per-answer secret
# and the string's number: the upstream can write "#imgbot-decoded-0" itself (under a key
# the reader does not see, such as "b64\u005fjson"), but not the secret.
_PLACEHOLDER = "#imgbot-decoded-"
# Answers read and decoded at once by one client. Decoding is CPU work under the GIL: when
# 50 4K answers landed together, 50 readers each decoding a piece per loop turn made every
# turn ~50 ms long and held 50 bodies in memory (bench/: 8 readers gave a p99 loop stall of
# ~45 ms, 4 gave ~12 ms). The others wait with their bytes held back by TCP, not in memory;
# answers take a minute to draw and seconds to send, so they seldom land together.
_ANSWERS_AT_ONCE = 4

# Streaming: a 400 whose param or message names these is a refusal to stream, not a bad job.
_STREAM_PARAMS = frozenset({"stream", "partial_images"})
_STREAM_WORDS = re.compile(r"stream|partial_images|partial images", re.IGNORECASE)
# An SSE line's field name is short; a longer run without a colon is no field we read.
_SSE_FIELD_MAX = 64
_SSE_EVENT_MAX = 256

_BACKOFF_START = 0.5
_BACKOFF_MAX = 8.0
# A gateway answering for an upstream that did not (a 504 after a long wait is the one
# doubtful case; the project's rule counts it as not billed).
_RETRY_STATUSES = frozenset({502, 503, 504})
_BALANCE_CODES = frozenset(
    {"insufficient_quota", "insufficient_balance", "billing_hard_limit_reached", "quota_exceeded"}
)
_BALANCE_WORDS = re.compile(r"insufficient|\bbalance\b|quota|余额|额度|欠费", re.IGNORECASE)
_KEY_LIKE = re.compile(r"\b(sk|hk)-[A-Za-z0-9_\-]{8,}")
# What of an upstream error a user may see: its HTTP status and an error code shaped like
# OpenAI's (`invalid_value`, `moderation_blocked`), never the free text around them.
_SAFE_CODE = re.compile(r"[a-z0-9_.-]{1,64}")
# A code is words joined by `_`, `.` or `-`; one longer run of letters and digits is more
# likely a key or a token than a word.
_CODE_WORD = re.compile(r"[a-z0-9]+")
_CODE_WORD_MAX = 24

Sleep = Callable[[float], Awaitable[Any]]
# Takes one preview (decoded and checked) and its 0-based index; its errors are logged only.
PartialCallback = Callable[[GeneratedImage, int], Awaitable[None]]


# --- references -------------------------------------------------------------------------


async def prepare_references(
    files: Sequence[tuple[bytes, str | None]], *, max_bytes: int, max_count: int = MAX_REFERENCES
) -> list[ReferenceImage]:
    """Check reference images and convert odd ones to PNG; refuse bad ones before any call."""
    if len(files) > max_count:
        raise BadReferenceError("ref.too_many", count=len(files), limit=max_count)
    checked = []
    for index, (data, name) in enumerate(files, start=1):
        if len(data) > max_bytes:
            raise BadReferenceError(
                "ref.too_big", index=index, size_mb=_mb(len(data)), limit_mb=_mb(max_bytes)
            )
        checked.append(await asyncio.to_thread(_check_reference, data, name, index, max_bytes))
    return checked


async def download_reference(
    http: httpx.AsyncClient, url: str, *, max_bytes: int, deadline: float, index: int = 1
) -> bytes:
    """Download one reference file with a size cap and a deadline in seconds."""
    try:
        return await _download(http, url, max_bytes=max_bytes, deadline=deadline)
    except _DownloadTooLarge as err:
        raise BadReferenceError(
            "ref.download_too_large", detail=str(err), index=index, limit_mb=_mb(max_bytes)
        ) from err
    except _DownloadFailed as err:
        raise BadReferenceError("ref.download_failed", detail=str(err), index=index) from err


def _check_reference(data: bytes, name: str | None, index: int, max_bytes: int) -> ReferenceImage:
    limit_mp = MAX_REFERENCE_PIXELS // 1_000_000
    try:
        # Pillow warns (and only at twice its limit raises) on decompression bombs; we
        # want an error at once. Our own pixel cap below is the real guard either way.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_OPEN_FORMATS) as im:
                if im.width * im.height > MAX_REFERENCE_PIXELS:
                    raise BadReferenceError(
                        "ref.too_many_pixels",
                        detail=f"{im.width}x{im.height}",
                        index=index,
                        limit_mp=limit_mp,
                    )
                # A full decode is the only way to find a truncated or corrupt file.
                im.load()
                return _normalise(im, data, name, index, max_bytes)
    except BadReferenceError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadReferenceError(
            "ref.too_many_pixels", detail=str(err), index=index, limit_mp=limit_mp
        ) from err
    except UnidentifiedImageError as err:
        raise BadReferenceError("ref.not_image", detail=str(err), index=index) from err
    except Exception as err:  # noqa: BLE001 - hostile files make Pillow raise many kinds
        raise BadReferenceError(
            "ref.corrupt", detail=f"{type(err).__name__}: {err}", index=index
        ) from err


def _normalise(
    im: Image.Image, data: bytes, name: str | None, index: int, max_bytes: int
) -> ReferenceImage:
    stem = _safe_stem(name) or f"image-{index}"
    fmt = im.format or ""
    plain = (
        fmt in _PASS_FORMATS
        and im.mode in _PLAIN_MODES
        and (fmt == "MPO" or not getattr(im, "is_animated", False))
        and not (fmt == "PNG" and _png_bit_depth(data) == 16)
    )
    if plain:
        mime, ext = _PASS_FORMATS[fmt]
        width, height = im.size
        if im.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientation: shown rotated 90°
            width, height = height, width
        return ReferenceImage(data, f"{stem}.{ext}", mime, width, height)

    im.seek(0)  # animated: the first frame stands for the whole
    frame = ImageOps.exif_transpose(im)
    if frame.mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert("L") clips 16-bit values instead of scaling them.
        frame = frame.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    elif frame.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in frame.info:
        frame = frame.convert("RGBA")
    elif frame.mode in ("L", "1"):
        frame = frame.convert("L")
    else:
        frame = frame.convert("RGB")
    out = io.BytesIO()
    frame.save(out, format="PNG", compress_level=3)
    png = out.getvalue()
    if len(png) > max_bytes:
        raise BadReferenceError(
            "ref.too_big", index=index, size_mb=_mb(len(png)), limit_mb=_mb(max_bytes)
        )
    return ReferenceImage(png, f"{stem}.png", "image/png", frame.width, frame.height)


def _png_bit_depth(data: bytes) -> int:
    # IHDR is always the first chunk; its bit depth byte sits at offset 24.
    return data[24] if len(data) > 24 and data[12:16] == b"IHDR" else 0


def _safe_stem(name: str | None) -> str:
    if not name:
        return ""
    stem = PurePath(name.replace("\\", "/")).stem
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:60]


def _mb(size: int) -> str:
    return f"{size / 1_000_000:.1f}".rstrip("0").rstrip(".")


# --- downloads ---------------------------------------------------------------------------


class _DownloadFailed(Exception):
    """A download did not give a usable body (reason in the message)."""


class _DownloadTooLarge(_DownloadFailed):
    """A download went over its cap."""


async def _download(
    http: httpx.AsyncClient,
    url: str,
    *,
    max_bytes: int,
    deadline: float,
    png: _PngChunks | None = None,
) -> bytes:
    if not url.lower().startswith(("http://", "https://")):
        raise _DownloadFailed(f"refused scheme in {url[:60]!r}")
    try:
        # A deadline for the whole body: a server trickling bytes defeats per-read timeouts.
        async with asyncio.timeout(deadline):
            async with http.stream(
                "GET", url, timeout=httpx.Timeout(deadline), follow_redirects=True
            ) as resp:
                if resp.status_code != 200:
                    raise _DownloadFailed(f"HTTP {resp.status_code} from {_host(url)}")
                declared = resp.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise _DownloadTooLarge(f"{declared} bytes declared, cap {max_bytes}")
                return await _read_capped(resp, max_bytes, png)
    except TimeoutError as err:
        raise _DownloadFailed(f"no complete answer from {_host(url)} in {deadline:g}s") from err
    except httpx.HTTPError as err:
        raise _DownloadFailed(f"{type(err).__name__} from {_host(url)}") from err


def _host(url: str) -> str:
    try:
        return httpx.URL(url).host or "?"
    except httpx.InvalidURL:
        return "?"


# --- the client ---------------------------------------------------------------------------


def api_root(base_url: str) -> str:
    """Return the API root ending in /v1, whether the base URL had it or not."""
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else f"{base}/v1"


class _StreamRefused(Exception):
    """The upstream refused `stream`/`partial_images` before drawing anything."""


class _StreamDropped(Exception):
    """A stream ended (or broke) before its completed event; what was drawn is unknown."""


class _Retry(Exception):
    """An attempt failed in a way that cannot have billed; `delay` None = use the backoff."""

    def __init__(self, error: UpstreamError, delay: float | None = None) -> None:
        super().__init__(error.detail)
        self.error = error
        self.delay = delay


class ImageClient:
    """Draw images through an OpenAI-compatible image API."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        settings: Settings,
        *,
        sleep: Sleep = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._http = http
        self._settings = settings
        self._sleep = sleep
        self._jitter = jitter
        self._root = api_root(settings.openai_base_url)
        self._reading = asyncio.Semaphore(_ANSWERS_AT_ONCE)
        # (API root, model) pairs that do not stream: refused, ignored or broke a stream.
        self._no_stream: set[tuple[str, str]] = set()

    def __repr__(self) -> str:
        return f"ImageClient(root={self._root!r})"

    def _endpoint(self, has_references: bool) -> str:
        path = "edits" if has_references else "generations"
        return f"{self._root}/images/{path}"

    def _key(self) -> str:
        # A trailing newline from a pasted .env line is harmless; anything else odd would
        # make httpx refuse the header with the key quoted in its exception text.
        key = self._settings.openai_api_key.get_secret_value().strip()
        if not key or not key.isascii() or not key.isprintable() or " " in key:
            raise UpstreamAuthError(
                detail="OPENAI_API_KEY is empty or holds spaces or non-ASCII characters"
            )
        return key

    # --- previews -----------------------------------------------------------------------

    def partials_for(self, request: ImageRequest) -> int:
        """Return how many previews to ask for this request (0: none).

        Single images only, with PREVIEWS on, and not on a model this API root was found
        not to stream.
        """
        if self._settings.previews != "on" or request.n != 1:
            return 0
        if (self._root, request.model) in self._no_stream:
            return 0
        return self._settings.preview_count

    def streams(self, model: str) -> bool:
        """Say whether previews are still tried for a model on this API root."""
        return (self._root, model) not in self._no_stream

    def _stream_off(self, model: str, why: str) -> None:
        if (self._root, model) not in self._no_stream:
            log.warning(
                "image API %s: no previews for %s (%s); normal calls from now on",
                self._root, model, self._redact(why),
            )
        self._no_stream.add((self._root, model))

    # --- drawing ----------------------------------------------------------------------

    async def draw(
        self,
        request: ImageRequest,
        references: Sequence[ReferenceImage] = (),
        mask: ReferenceImage | None = None,
        *,
        on_partial: PartialCallback | None = None,
    ) -> ImageResult:
        """Draw the request (an edit when there are references) and return the images.

        `mask` (checked by `prepare_mask`) applies to the first reference. With
        `request.partial_images` and `on_partial`, previews are streamed to `on_partial`
        while the image is drawn (see the module docstring for the fallbacks).
        """
        started = time.monotonic()
        answer: _Answer | _Streamed | None = None
        if request.partial_images > 0 and on_partial is not None and self.streams(request.model):
            try:
                answer = await self._attempts(request, references, mask, on_partial)
            except _StreamRefused as err:
                self._stream_off(request.model, f"refused: {err}")
            except _StreamDropped as err:
                # Whatever the broken stream drew upstream has no usage we could read; the
                # job goes on as a normal call, as a relay that breaks streams needs.
                log.warning("image API stream dropped (%s); drawing without previews", err)
                self._stream_off(request.model, f"stream dropped: {err}")
            else:
                if isinstance(answer, _Answer):
                    self._stream_off(request.model, "answered without streaming")
        if answer is None:
            answer = await self._attempts(request, references, mask, None)
        if isinstance(answer, _Streamed):
            images, usage, revised = await self._read_completed(answer)
        else:
            images, usage, revised = await self._read_answer(answer, request.n)
        elapsed = time.monotonic() - started
        log.info(
            "image API: model=%s size=%s quality=%s n=%d refs=%d -> %d image(s) in %.1fs",
            request.model,
            request.size,
            request.quality,
            request.n,
            len(references),
            len(images),
            elapsed,
        )
        return ImageResult(images=images, usage=usage, elapsed=elapsed, revised_prompt=revised)

    async def _attempts(
        self,
        request: ImageRequest,
        references: Sequence[ReferenceImage],
        mask: ReferenceImage | None,
        on_partial: PartialCallback | None,
    ) -> _Answer | _Streamed:
        """Make the call, retrying what cannot have billed."""
        retries = self._settings.max_retries
        for attempt in range(retries + 1):
            try:
                return await self._post(request, references, mask, on_partial)
            except _Retry as retry:
                if attempt >= retries:
                    raise retry.error from retry.__cause__
                delay = retry.delay if retry.delay is not None else self._backoff(attempt)
                log.warning(
                    "image API attempt %d/%d failed (%s); retrying in %.1fs",
                    attempt + 1,
                    retries + 1,
                    retry.error.detail,
                    delay,
                )
                await self._sleep(delay)
        raise AssertionError("unreachable")

    # --- one attempt ------------------------------------------------------------------

    async def _post(
        self,
        request: ImageRequest,
        references: Sequence[ReferenceImage],
        mask: ReferenceImage | None = None,
        on_partial: PartialCallback | None = None,
    ) -> _Answer | _Streamed:
        settings = self._settings
        url = self._endpoint(bool(references))
        headers = {"Authorization": f"Bearer {self._key()}"}
        fields = self._fields(request, bool(references), on_partial is not None)
        if references:
            send: dict[str, Any] = {
                "data": {k: _form_value(v) for k, v in fields.items()},
                "files": [("image[]", (r.filename, r.data, r.mime)) for r in references],
            }
            if mask is not None:
                send["files"].append(("mask", (mask.filename, mask.data, mask.mime)))
        else:
            send = {"json": fields}
        timeout = httpx.Timeout(settings.request_timeout, connect=settings.connect_timeout)
        cap = settings.max_download_bytes * max(request.n, 1) * 2 + 1_000_000
        if on_partial is not None:
            # The previews come in the same answer (4 at most: 3 partials and the image).
            cap *= 4
        answered = streaming = False
        answer: _Answer | _Streamed
        try:
            # A deadline for the whole attempt: a server trickling bytes defeats read timeouts.
            async with asyncio.timeout(settings.request_timeout + settings.connect_timeout):
                async with self._http.stream(
                    "POST", url, headers=headers, timeout=timeout, **send
                ) as resp:
                    answered = True
                    if resp.status_code == 200 and on_partial is not None:
                        streaming = True
                        answer = await self._read_events(resp, cap, on_partial)
                    elif resp.status_code == 200:
                        async with self._reading:
                            answer = await _read_answer_stream(resp, cap)
                    else:
                        body = await _read_capped(resp, cap)
        except _DownloadTooLarge as err:
            raise UpstreamMalformed(detail=f"answer larger than {cap} bytes") from err
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as err:
            # The request never left: safe to try again.
            error_cls = (
                UpstreamUnavailable if isinstance(err, httpx.ConnectError) else UpstreamTimeout
            )
            raise _Retry(
                error_cls(
                    detail=self._redact(f"{type(err).__name__}: {err} ({url})"),
                    seconds=_secs(settings.connect_timeout),
                )
            ) from err
        except (TimeoutError, httpx.TimeoutException) as err:
            error = UpstreamTimeout(
                detail=f"no complete answer in time ({type(err).__name__}, {url})",
                seconds=_secs(settings.request_timeout),
            )
            if settings.retry_read_timeout:
                raise _Retry(error) from err
            raise error from err
        except (httpx.RemoteProtocolError, httpx.ReadError) as err:
            if streaming:
                raise _StreamDropped(self._redact(f"{type(err).__name__}: {err}")) from err
            if answered:
                raise UpstreamMalformed(detail=self._redact(f"answer cut short: {err}")) from err
            raise UpstreamUnavailable(
                detail=self._redact(f"connection dropped without an answer: {err}")
            ) from err
        except httpx.HTTPError as err:
            raise UpstreamUnavailable(
                detail=self._redact(f"{type(err).__name__}: {err} ({url})")
            ) from err

        if resp.status_code == 200:
            return answer
        if on_partial is not None and _refuses_stream(resp.status_code, body):
            message, code, _, param = _error_fields(body)
            raise _StreamRefused(
                f"HTTP {resp.status_code} code={code or '-'} param={param or '-'}: {message[:120]}"
            )
        raise self._status_error(resp.status_code, resp.headers, body)

    async def _read_events(
        self, resp: httpx.Response, cap: int, on_partial: PartialCallback
    ) -> _Answer | _Streamed:
        """Read a streamed answer: previews to `on_partial`, the completed event returned.

        An answer that is not a stream (it starts with `{`) is read as a normal one. Only
        the read of an event holds one of the `_ANSWERS_AT_ONCE` places, never the wait
        for the next one (which may take a minute while the upstream draws).
        """
        chunks = resp.aiter_bytes()
        first = b""
        async for chunk in chunks:
            if chunk.strip():
                first = chunk
                break
        if first.lstrip()[:1] in (b"{", b"["):
            async with self._reading:
                reader = _AnswerReader(cap)
                reader.feed(first)
                async for chunk in chunks:
                    reader.feed(chunk)
                return reader.finish()
        events = _EventReader(cap)
        pending = [first] if first else []
        held = False
        try:
            while True:
                if pending:
                    chunk = pending.pop()
                else:
                    chunk = await anext(chunks, None)  # type: ignore[arg-type]
                    if chunk is None:
                        break
                if not held:
                    await self._reading.acquire()
                    held = True
                done = events.feed(chunk)
                if not events.mid_event:
                    self._reading.release()
                    held = False
                for name, answer in done:
                    streamed = await self._event(name, answer, on_partial)
                    if streamed is not None:
                        return streamed
        finally:
            if held:
                self._reading.release()
        raise _StreamDropped("the stream ended before its completed event")

    async def _event(
        self, name: str, answer: _Answer, on_partial: PartialCallback
    ) -> _Streamed | None:
        """Handle one event: a preview, the completed image, or an error in the stream."""
        payload = await self._json(answer.text)
        if not isinstance(payload, dict):
            return None  # `[DONE]`, keep-alives and the like
        kind = payload.get("type")
        kind = kind if isinstance(kind, str) else name
        if kind.endswith(".completed"):
            return _Streamed(answer, payload)
        if kind.endswith(".partial_image"):
            await self._preview(answer, payload, on_partial)
            return None
        if kind == "error" or isinstance(payload.get("error"), (dict, str)):
            message, code, _, param = _error_object_fields(payload)
            detail = self._redact(f"error event in the stream code={code or '-'}: {message}")
            raise self._classify(400, code, message, param, detail)
        return None

    async def _preview(
        self, answer: _Answer, payload: dict[str, Any], on_partial: PartialCallback
    ) -> None:
        b64 = payload.get("b64_json")
        source = answer.decoded_for(b64)
        index = payload.get("partial_image_index")
        index = index if isinstance(index, int) and not isinstance(index, bool) else 0
        try:
            if source is None and not (isinstance(b64, str) and b64):
                raise ValueError("no b64_json")
            image = await asyncio.to_thread(_decode_image, source if source is not None else b64)
        except ValueError as err:
            log.info("image API preview %d not shown: %s", index, err)
            return
        try:
            await on_partial(image, index)
        except Exception:  # noqa: BLE001 - a preview must never fail the job
            log.exception("showing preview %d failed", index)

    async def _read_completed(
        self, streamed: _Streamed
    ) -> tuple[tuple[GeneratedImage, ...], Usage | None, str | None]:
        payload = streamed.payload
        usage = Usage.from_api(payload.get("usage"))
        image = await self._image_of(payload, streamed.answer, 1, usage)
        revised = payload.get("revised_prompt")
        return (image,), usage, revised if isinstance(revised, str) and revised else None

    async def _json(self, body: bytes) -> Any:
        try:
            if len(body) > _THREAD_JSON_BYTES:
                return await asyncio.to_thread(json.loads, body)
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None

    def _fields(self, request: ImageRequest, edit: bool, stream: bool) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "model": request.model,
            "prompt": request.prompt,
            "n": request.n,
            "size": request.size,
            "quality": request.quality,
        }
        if request.output_format is not None:
            fields["output_format"] = request.output_format
        if request.background is not None:
            fields["background"] = request.background
        if request.output_compression is not None:
            fields["output_compression"] = request.output_compression
        if request.moderation is not None:
            fields["moderation"] = request.moderation
        if request.input_fidelity is not None and edit:
            fields["input_fidelity"] = request.input_fidelity
        if self._settings.response_format != "none":
            fields["response_format"] = self._settings.response_format
        if stream:
            fields["stream"] = True
            fields["partial_images"] = request.partial_images
        return fields

    def _backoff(self, attempt: int) -> float:
        delay = min(_BACKOFF_START * 2**attempt, _BACKOFF_MAX)
        return delay * (1 - 0.25 * self._jitter())

    # --- errors -----------------------------------------------------------------------

    def _status_error(
        self, status: int, headers: httpx.Headers, body: bytes
    ) -> UpstreamError | _Retry:
        message, code, kind, param = _error_fields(body)
        detail = self._redact(
            f"HTTP {status} code={code or '-'} type={kind or '-'} param={param or '-'}: {message}"
        )
        if status in _RETRY_STATUSES or (status == 429 and not _is_balance(status, code, message)):
            wait = _retry_after(headers)
            if status == 429:
                error: UpstreamError = UpstreamRateLimited(detail=detail, status=status)
            else:
                error = UpstreamUnavailable(detail=detail, status=status)
            if wait is not None and wait > self._settings.retry_after_cap:
                return error
            return _Retry(error, wait)
        return self._classify(status, code, message, param, detail)

    def _classify(
        self, status: int, code: str, message: str, param: str, detail: str
    ) -> UpstreamError:
        ref = self._error_ref(status, code)
        if code == "moderation_blocked" or "safety system" in message.lower():
            return ContentPolicyError(detail=detail, status=status)
        if _is_balance(status, code, message):
            return UpstreamBalanceError(detail=detail, status=status)
        if status in (401, 403):
            return UpstreamAuthError(detail=detail, status=status)
        if code == "unknown_parameter":
            return UpstreamAuthError(
                "upstream.unknown_parameter",
                detail=detail,
                status=status,
                param=self._safe_code(param) or "?",
            )
        if status == 404 or 300 <= status < 400 or status == 405:
            return UpstreamAuthError("upstream.misconfigured", detail=detail, status=status)
        if status == 408:
            return UpstreamTimeout(
                detail=detail, status=status, seconds=_secs(self._settings.request_timeout)
            )
        if status >= 500:
            return UpstreamUnavailable(detail=detail, status=status)
        return UpstreamRejected(detail=detail, status=status, ref=ref)

    def _error_ref(self, status: int, code: str) -> str:
        """Return what a user may see of an upstream error: `HTTP 400, invalid_value`."""
        safe = self._safe_code(code)
        return f"HTTP {status}, {safe}" if safe else f"HTTP {status}"

    def _safe_code(self, code: str) -> str:
        """Return an upstream error code fit to show, or "" when it might be anything else."""
        if not _SAFE_CODE.fullmatch(code):
            return ""
        key = self._settings.openai_api_key.get_secret_value().strip().lower()
        for word in _CODE_WORD.findall(code):
            if len(word) > _CODE_WORD_MAX:
                return ""
            # Never a piece of our own key, read either way.
            if len(word) >= 8 and key and (word in key or word in key[::-1]):
                return ""
        return code

    def _redact(self, text: str) -> str:
        key = self._settings.openai_api_key.get_secret_value().strip()
        if key:
            # Some proxies echo the key reversed or without its `sk-` prefix.
            bare = key.split("-", 1)[1] if key.startswith(("sk-", "hk-")) else key
            for form in (key, key[::-1], bare, bare[::-1]):
                if len(form) >= 8:
                    text = re.sub(re.escape(form), "***", text, flags=re.IGNORECASE)
        return _KEY_LIKE.sub(lambda m: m.group(1) + "-***", text)

    # --- the answer -------------------------------------------------------------------

    async def _read_answer(
        self, answer: _Answer, asked: int
    ) -> tuple[tuple[GeneratedImage, ...], Usage | None, str | None]:
        body = answer.text
        try:
            if len(body) > _THREAD_JSON_BYTES:
                payload = await asyncio.to_thread(json.loads, body)
            else:
                payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise UpstreamMalformed(
                detail=self._redact(f"not JSON ({len(body)} bytes): {body[:120]!r}")
            ) from err
        if not isinstance(payload, dict):
            raise UpstreamMalformed(detail=f"JSON answer is a {type(payload).__name__}")
        usage = Usage.from_api(payload.get("usage"))
        data = payload.get("data")
        if not data and isinstance(payload.get("error"), (dict, str)):
            # Some proxies answer 200 with an error object.
            message, code, _, param = _error_object_fields(payload)
            detail = self._redact(f"HTTP 200 with error code={code or '-'}: {message}")
            raise self._classify(400, code, message, param, detail)
        if not isinstance(data, list) or not data:
            raise UpstreamMalformed(
                "upstream.no_image", detail=f"answer has no images (asked {asked})", usage=usage
            )

        images = []
        for position, item in enumerate(data, start=1):
            item = item if isinstance(item, dict) else {}
            images.append(await self._image_of(item, answer, position, usage))
        revised = next(
            (i["revised_prompt"] for i in data if isinstance(i, dict) and i.get("revised_prompt")),
            None,
        )
        return tuple(images), usage, revised if isinstance(revised, str) else None

    async def _image_of(
        self, item: dict[str, Any], answer: _Answer, position: int, usage: Usage | None
    ) -> GeneratedImage:
        """Decode and check one image of an answer (base64, decoded pieces or a url)."""
        b64 = item.get("b64_json")
        url = item.get("url")
        source: str | bytes | list[bytes] | _Checked
        decoded = answer.decoded_for(b64)
        if decoded is not None:
            raw, source = None, decoded
        elif isinstance(b64, str) and b64:
            raw, source = None, b64
        elif isinstance(url, str) and url:
            png = _PngChunks()
            raw = source = await self._fetch_result(url, usage, png)
            if png.whole:
                source = _Checked(raw)
        else:
            raise UpstreamMalformed(
                detail=f"image {position} has neither b64_json nor url", usage=usage
            )
        try:
            return await asyncio.to_thread(_decode_image, source)
        except _CorruptImage as err:
            raise UpstreamCorruptImage(detail=f"image {position}: {err}", usage=usage) from err
        except ValueError as err:
            where = "base64" if raw is None else f"download from {_host(url)}"
            key = "upstream.malformed" if raw is None else "upstream.download_failed"
            raise UpstreamMalformed(
                key, detail=f"image {position} ({where}): {err}", usage=usage
            ) from err

    async def _fetch_result(
        self, url: str, usage: Usage | None, png: _PngChunks | None = None
    ) -> bytes:
        settings = self._settings
        try:
            return await _download(
                self._http,
                url,
                max_bytes=settings.max_download_bytes,
                deadline=settings.request_timeout,
                png=png,
            )
        except _DownloadFailed as err:
            raise UpstreamMalformed(
                "upstream.download_failed", detail=self._redact(str(err)), usage=usage
            ) from err


async def _read_capped(
    resp: httpx.Response, cap: int, png: _PngChunks | None = None
) -> bytes:
    """Read a body up to `cap` bytes; `png` walks its chunks while the reads arrive."""
    # A list joined once copies the body once; a growing bytearray copied every read into
    # itself and then all of it again in bytes(): ~2 ms more on the event loop at 12 MB.
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > cap:
            raise _DownloadTooLarge(f"over {cap} bytes")
        if png is not None:
            png.feed(chunk)
    return b"".join(chunks)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _PngChunks:
    """Check a PNG's chunks (lengths and CRCs, through IEND) as its bytes arrive.

    The same proof as `_png_whole`, done read by read while a url result downloads, so the
    CRC work overlaps the network instead of following it (~3 ms for a 4K image). `whole`
    turns true once IEND's CRC matched; anything else (not a PNG, a bad CRC, a cut) leaves
    it false and the image gets the usual check after the download.
    """

    def __init__(self) -> None:
        self.whole = False
        self._stopped = False
        self._need = 8  # bytes wanted for the current header: signature, chunk head, CRC
        self._held = bytearray()
        self._state = "signature"  # signature | head | body | crc
        self._left = 0  # body bytes still to come
        self._crc = 0
        self._type = b""

    def feed(self, data: bytes) -> None:
        """Take the next read of the file."""
        view = memoryview(data)
        pos, size = 0, len(view)
        while pos < size and not self._stopped:
            if self._state == "body":
                take = min(self._left, size - pos)
                self._crc = zlib.crc32(view[pos : pos + take], self._crc)
                self._left -= take
                pos += take
                if self._left == 0:
                    self._state, self._need = "crc", 4
                continue
            take = min(self._need - len(self._held), size - pos)
            self._held += view[pos : pos + take]
            pos += take
            if len(self._held) == self._need:
                header, self._held = bytes(self._held), bytearray()
                self._header(header)

    def _header(self, header: bytes) -> None:
        if self._state == "signature":
            if header != _PNG_SIGNATURE:
                self._stopped = True  # not a PNG: the usual check decides
                return
            self._state, self._need = "head", 8
        elif self._state == "head":
            (self._left,) = struct.unpack(">I", header[:4])
            self._type = header[4:]
            self._crc = zlib.crc32(self._type)
            self._state = "body" if self._left else "crc"
            self._need = 4
        else:  # crc
            if struct.unpack(">I", header)[0] != self._crc:
                self._stopped = True
                return
            if self._type == b"IEND":
                self.whole, self._stopped = True, True
                return
            self._state, self._need = "head", 8


async def _read_answer_stream(resp: httpx.Response, cap: int) -> _Answer:
    reader = _AnswerReader(cap)
    async for chunk in resp.aiter_bytes():
        reader.feed(chunk)
    return reader.finish()


@dataclass(frozen=True)
class _Streamed:
    """A stream's completed event: its JSON (strings replaced) and the decoded image."""

    answer: _Answer
    payload: dict[str, Any]


def _form_value(value: object) -> str:
    """Return a multipart field's text (JSON's spelling for booleans: `stream=true`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _refuses_stream(status: int, body: bytes) -> bool:
    """Say whether an error answer refuses streaming (and not the job as asked)."""
    if status not in (400, 422):
        return False
    message, code, _, param = _error_fields(body)
    if code == "moderation_blocked" or _is_balance(status, code, message):
        return False
    return param in _STREAM_PARAMS or bool(_STREAM_WORDS.search(message))


class _EventReader:
    """Split server-sent events as they arrive; each event's data goes to an `_AnswerReader`.

    `feed(chunk)` returns the events the chunk completed, as (event name, `_Answer`). The
    bytes of a `data:` line are handed on where they lie (a whole read, not a copy, in the
    middle of a long line), so a completed event's base64 is decoded while it arrives and
    its text is never assembled. Lines end in LF, CRLF or CR (one may straddle two reads);
    several `data:` lines of one event are joined with LF; comments, `id:` and `retry:`
    are skipped; an event ends at a blank line.
    """

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._size = 0
        self._head = bytearray()  # a line's start, until its field name is known
        self._field: bytes | None = None  # the current line's field, once known
        self._skip_space = False  # a `data:` value's one leading space is still to come
        self._after_cr = False  # the last read ended in CR: an LF next is the same line end
        self._data: _AnswerReader | None = None
        self._name = bytearray()

    @property
    def mid_event(self) -> bool:
        """Say whether an event has started and not ended."""
        return self._data is not None or bool(self._head) or self._field is not None

    def feed(self, chunk: bytes) -> list[tuple[str, _Answer]]:
        """Take the next read; return the events it completed."""
        self._size += len(chunk)
        if self._size > self._cap:
            raise _DownloadTooLarge(f"over {self._cap} bytes")
        done: list[tuple[str, _Answer]] = []
        size = len(chunk)
        pos = 0
        if self._after_cr and chunk[:1] == b"\n":
            pos = 1
        self._after_cr = False
        has_cr = b"\r" in chunk
        while pos < size:
            end = chunk.find(b"\n", pos)
            if has_cr:
                cr = chunk.find(b"\r", pos)
                if cr >= 0 and (end < 0 or cr < end):
                    end = cr
            if end < 0:
                self._take(chunk, pos, size)
                break
            self._take(chunk, pos, end)
            self._end_line(done)
            pos = end + 1
            if chunk[end] == 0x0D:  # CR: an LF right after belongs to it
                if pos < size and chunk[pos] == 0x0A:
                    pos += 1
                elif pos == size:
                    self._after_cr = True
        return done

    def _take(self, chunk: bytes, start: int, end: int) -> None:
        """Take part of the current line."""
        if start == end:
            return
        if self._field is None:
            self._head += chunk[start:end]
            colon = self._head.find(b":")
            if colon < 0:
                if len(self._head) > _SSE_FIELD_MAX:
                    self._field, self._head = b"", bytearray()  # no field of ours: skip it
                return
            self._field = bytes(self._head[:colon])
            value = bytes(self._head[colon + 1 :])
            self._head = bytearray()
            if self._field == b"data":
                if self._data is None:
                    self._data = _AnswerReader(self._cap)
                else:
                    self._data.feed(b"\n")
            elif self._field == b"event":
                self._name = bytearray()
            self._skip_space = True
            self._value(value)
            return
        piece = chunk if start == 0 and end == len(chunk) else chunk[start:end]
        self._value(piece)

    def _value(self, piece: bytes) -> None:
        if self._skip_space and piece:
            self._skip_space = False
            if piece[:1] == b" ":
                piece = piece[1:]
        if not piece:
            return
        if self._field == b"data":
            assert self._data is not None
            self._data.feed(piece)
        elif self._field == b"event" and len(self._name) < _SSE_EVENT_MAX:
            self._name += piece[: _SSE_EVENT_MAX - len(self._name)]

    def _end_line(self, done: list[tuple[str, _Answer]]) -> None:
        if self._field is None and not self._head:  # a blank line: the event is complete
            if self._data is not None:
                name = self._name.decode("utf-8", "replace").strip()
                done.append((name, self._data.finish()))
            self._data, self._name = None, bytearray()
            return
        if self._field is None and bytes(self._head) == b"data":  # `data` alone: empty value
            if self._data is None:
                self._data = _AnswerReader(self._cap)
            else:
                self._data.feed(b"\n")
        self._field, self._head, self._skip_space = None, bytearray(), False


@dataclass(frozen=True)
class _Answer:
    """A 200 answer: its JSON text, and the pieces of each string decoded on the way in."""

    text: bytes
    decoded: tuple[list[bytes], ...] = ()
    marker: str = ""  # what starts this answer's placeholders; "" = none

    def decoded_for(self, value: object) -> list[bytes] | None:
        """Return the decoded pieces a placeholder stands for, or None if it is not one."""
        if not self.marker or not isinstance(value, str) or not value.startswith(self.marker):
            return None
        index = value.removeprefix(self.marker)
        if not index.isdigit() or int(index) >= len(self.decoded):
            return None
        return self.decoded[int(index)]


@dataclass
class _Taken:
    """One `b64_json` string decoded on the way in, and what it takes to rebuild its text."""

    at: int  # where its placeholder starts in the reader's JSON
    header: bytes = b""  # a `data:…,` header, as received
    # Decoded, read by read; joined once in a worker thread (bytes.join lets go of the GIL).
    # A BytesIO written read by read was worse: growing it copies it under the GIL, and in
    # bench/'s burst of 50 4K answers the loop's p99 stall went from ~10 ms to ~27 ms.
    pieces: list[bytes] = field(default_factory=list)
    tail: bytes | None = None  # the last group and its padding as received, once it has ended
    tail_size: int = 0  # how many of the decoded bytes the tail gave


class _AnswerReader:
    """Collect a JSON answer, decoding its `b64_json` strings while they arrive.

    A 4K answer is ~17 MB of base64 inside JSON. Parsed whole and then decoded, it cost
    ~70 ms of CPU after the last byte and held the text three times over. Decoded read by
    read (httpx reads ≤ 64 KiB), the work overlaps the transfer, the loop is never held for
    long, and the text is never assembled. Each decoded string is replaced in the JSON by a
    placeholder, so what is left to parse is a few hundred bytes.

    The reads themselves are not kept: holding 17 MB of them to the end cost ~10,000 fresh
    pages per answer (~35 ms on a VM) where reads dropped at once reuse the same memory. The
    answer as received can still be rebuilt exactly: base64 groups without padding encode
    back to the very same text, so only each header and each string's last group are kept
    as they came.

    Anything unusual inside a string — an escape, whitespace, a character outside base64, a
    `data:` header without a comma or with bytes other than printable ASCII, an empty
    string, an answer ending inside a string — turns the reader plain: the answer is then
    exactly the bytes received, parsed and decoded the ordinary way (json.loads,
    `_decode_image`), errors included.
    """

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._size = 0
        self._json = bytearray()  # the answer with each decoded string replaced
        self._scan_from = 0
        self._floor = 0  # the end of the last placeholder: key searches never look back past it
        self._marker = f"{_PLACEHOLDER}{secrets.token_hex(8)}-"
        self._strings: list[_Taken] = []
        self._in_string = False
        self._header_checked = False
        self._pending = b""  # string bytes held back: the last base64 group, or a header
        self._plain: list[bytes] | None = None  # the answer as received, once turned plain

    def feed(self, chunk: bytes) -> None:
        """Take the next read of the answer."""
        self._size += len(chunk)
        if self._size > self._cap:
            raise _DownloadTooLarge(f"over {self._cap} bytes")
        if self._plain is not None:
            self._plain.append(chunk)
            return
        pos = 0
        while pos < len(chunk) and self._plain is None:
            pos = self._string(chunk, pos) if self._in_string else self._outside(chunk, pos)

    def finish(self) -> _Answer:
        """Return the answer: decoded strings and the rest, or the plain bytes."""
        if self._plain is not None:
            return _Answer(b"".join(self._plain))
        if self._in_string:  # cut short inside a string
            return _Answer(self._received())
        if not self._strings:
            return _Answer(bytes(self._json))
        return _Answer(bytes(self._json), tuple(s.pieces for s in self._strings), self._marker)

    def _outside(self, chunk: bytes, pos: int) -> int:
        start = len(self._json)
        self._json += memoryview(chunk)[pos:]
        match = _B64_KEY.search(self._json, self._scan_from)
        if match is None:
            # Looking back past a placeholder would find its key again and take whatever
            # the next read starts with for that string.
            self._scan_from = max(self._floor, len(self._json) - _KEY_OVERLAP)
            return len(chunk)
        opened = match.end()  # just after the string's opening quote
        del match
        del self._json[opened:]
        self._json += f"{self._marker}{len(self._strings)}".encode()
        self._scan_from = self._floor = len(self._json)
        self._strings.append(_Taken(opened))
        self._in_string, self._header_checked, self._pending = True, False, b""
        return pos + max(0, opened - start)

    def _string(self, chunk: bytes, pos: int) -> int:
        # Nothing is changed until the read's part of the string has decoded: turning plain
        # rebuilds the answer from what was taken before it, then this read from `pos`.
        end = chunk.find(b'"', pos)
        ended = end >= 0
        stop = end if ended else len(chunk)
        if chunk.find(b"\\", pos, stop) >= 0:
            return self._go_plain(chunk, pos)
        taken = self._strings[-1]
        data: bytes | memoryview = memoryview(chunk)[pos:stop]
        pending, header = self._pending, None
        if not self._header_checked:
            text = pending + data
            if text.startswith(b"data:"):
                comma = text.find(b",", 0, _DATA_HEADER_MAX)
                if comma < 0:
                    if ended or len(text) >= _DATA_HEADER_MAX:
                        return self._go_plain(chunk, pos)
                    self._pending = text
                    return stop
                if not _DATA_HEADER_CHARS.fullmatch(text, 0, comma):
                    return self._go_plain(chunk, pos)
                header, data = text[: comma + 1], text[comma + 1 :]
            elif len(text) < 5 and not ended and b"data:".startswith(text):
                self._pending = text  # too short yet to tell whether a header starts
                return stop
            else:
                header, data = b"", text
            pending = b""
        # The group held back from the last read is completed from the front of this one,
        # and the rest is decoded where it lies: no copy of the read.
        fill = -len(pending) % 4
        head, rest = pending + data[:fill], data[fill:]
        tail: bytes | None = None
        if not ended:
            if not rest:
                if header is not None:
                    taken.header, self._header_checked = header, True
                self._pending = head
                return stop
            # Hold the last group back: only the string's end may carry padding.
            keep = len(rest) % 4 or 4
            pending, rest = bytes(rest[-keep:]), rest[:-keep]
        elif rest:
            # The tail (last group and padding) is kept as received, for a rebuild.
            window = bytes(rest[-8:])
            padding = len(window) - len(window.rstrip(b"="))
            whole = max(0, (len(rest) - padding - 1) // 4 * 4)
            tail, rest = bytes(rest[whole:]), rest[:whole]
        else:
            tail, head = head, b""
        # Whole groups must not end in padding (then they hold none: strict base64 allows
        # '=' only at the end); one decode of the whole string would refuse it there.
        if head.endswith(b"=") or (rest and rest[-1] == _EQUALS):
            return self._go_plain(chunk, pos)
        try:
            decoded = [_a2b(group) for group in (head, rest) if group]
            if tail is not None:
                decoded.append(_a2b(tail))
        except binascii.Error:
            return self._go_plain(chunk, pos)
        if ended and not any(taken.pieces) and not any(decoded):
            return self._go_plain(chunk, pos)  # an empty string: let the ordinary path judge it
        if header is not None:
            taken.header, self._header_checked = header, True
        taken.pieces += decoded
        self._pending = pending
        if not ended:
            return stop
        taken.tail, taken.tail_size = tail, len(decoded[-1])
        self._in_string = False
        return end  # the closing quote and what follows are JSON again

    def _received(self, rest: bytes | memoryview = b"") -> bytes:
        """Rebuild the bytes received so far, then `rest`, from the JSON and the strings."""
        parts: list[bytes | bytearray | memoryview] = []
        last = 0
        for index, taken in enumerate(self._strings):
            parts.append(self._json[last : taken.at])
            decoded = b"".join(taken.pieces)
            parts += (taken.header, _b2a(decoded[: len(decoded) - taken.tail_size]))
            # A string still open has its header, or its last partial group, still pending.
            parts.append(self._pending if taken.tail is None else taken.tail)
            last = taken.at + len(f"{self._marker}{index}")
        parts += (self._json[last:], rest)
        return b"".join(parts)

    def _go_plain(self, chunk: bytes, pos: int) -> int:
        self._plain = [self._received(memoryview(chunk)[pos:])]
        self._json = bytearray()
        self._strings = []
        return len(chunk)


class _CorruptImage(ValueError):
    """A result image whose header reads but whose pixels do not (truncated, corrupt)."""


@dataclass(frozen=True)
class _Checked:
    """A downloaded PNG whose every chunk `_PngChunks` already checked on the way in."""

    data: bytes


def _decode_image(source: str | bytes | list[bytes] | _Checked) -> GeneratedImage:
    """Turn base64 (data: prefix or not), raw bytes or decoded pieces into a checked image.

    The whole image is checked (`_check_whole`), in the same worker-thread hop as the
    base64: a header alone passes a file cut short, which then failed only at delivery,
    after the job was settled as drawn. A `_Checked` PNG was proven whole while it arrived.
    """
    checked = isinstance(source, _Checked)
    if isinstance(source, _Checked):
        data = source.data
    elif isinstance(source, list):
        data = b"".join(source)  # large joins let go of the GIL while they copy
    elif isinstance(source, str):
        text = source.strip()
        if text.startswith("data:"):
            text = text.partition(",")[2]
        try:
            data = _b64decode(text.encode("ascii"))
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"undecodable base64: {err}") from err
    else:
        data = source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=tuple(_ANSWER_FORMATS)) as im:
                image = GeneratedImage(data, _ANSWER_FORMATS[im.format or ""], im.width, im.height)
                if checked and im.format == "PNG":
                    return image
                try:
                    _check_whole(im, data)
                except Exception as err:  # noqa: BLE001 - Pillow raises many kinds here
                    raise _CorruptImage(
                        f"{im.format} {im.width}x{im.height} does not decode "
                        f"({len(data)} bytes): {type(err).__name__}: {err}"
                    ) from err
                return image
    except _CorruptImage:
        raise
    except Exception as err:  # noqa: BLE001 - anything Pillow cannot read is "not an image"
        raise ValueError(f"not a PNG/JPEG/WebP image ({len(data)} bytes)") from err


def _check_whole(im: Image.Image, data: bytes) -> None:
    """Prove every byte of an answer's image is there and sound, as cheaply as that can be.

    PNG: every chunk is walked and its CRC checked, through IEND; a file cut short or
    damaged anywhere fails, in ~3 ms for a 4K answer instead of the ~200 ms that inflating
    25 MB of pixels takes. JPEG: the
    whole entropy-coded stream is decoded at 1/8 scale (`draft`), which reads every byte
    but builds 1/64 of the pixels. WebP: decoded in full (libwebp has no cheaper way).
    """
    if im.format == "PNG":
        _png_whole(data)
        return
    if im.format == "JPEG":
        im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
    im.load()


def _png_whole(data: bytes) -> None:
    """Walk a PNG's chunks from the signature to IEND, checking each one's length and CRC."""
    view = memoryview(data)
    pos, size = 8, len(data)
    while True:
        if pos + 12 > size:
            raise OSError(f"PNG cut short at byte {pos} of {size}")
        (length,) = struct.unpack_from(">I", data, pos)
        end = pos + 8 + length
        if end + 4 > size:
            raise OSError(f"PNG chunk at byte {pos} runs past the end ({size} bytes)")
        (crc,) = struct.unpack_from(">I", data, end)
        if zlib.crc32(view[pos + 4 : end]) != crc:
            raise OSError(f"PNG chunk at byte {pos} fails its CRC")
        if view[pos + 4 : pos + 8] == b"IEND":
            return
        pos = end + 4


def _b64decode(text: bytes) -> bytes:
    """Decode strict base64, allowing whitespace (line-wrapped answers) between characters."""
    try:
        return _a2b_sliced(text)
    except binascii.Error:
        if not any(c in text for c in _B64_WHITESPACE):
            raise
    # Only wrapped base64 pays for this copy; a regex over 17 MB used to cost ~300 ms here.
    return _a2b_sliced(text.translate(None, _B64_WHITESPACE))


def _a2b_sliced(text: bytes) -> bytes:
    """Decode strict base64: pybase64 at once, or binascii slice by slice (GIL in between)."""
    if pybase64 is not None:
        try:
            return pybase64.b64decode(text, validate=True)
        except binascii.Error:
            pass  # binascii's strict mode judges every refusal, as in `_a2b`
    view = memoryview(text)
    parts = []
    for start in range(0, len(view), _B64_SLICE):
        piece = view[start : start + _B64_SLICE]
        if start + _B64_SLICE < len(view) and piece[-1] == ord("="):
            # Padding may only end the whole text; one decode of it all would refuse this too.
            raise binascii.Error("padding before the end")
        parts.append(binascii.a2b_base64(piece, strict_mode=True))
    return b"".join(parts)


def _b2a(data: bytes) -> bytes:
    """Encode base64 (standard alphabet, padded, one line)."""
    if pybase64 is not None:
        return pybase64.b64encode(data)
    return binascii.b2a_base64(data, newline=False)


def _a2b(text: bytes | memoryview) -> bytes:
    """Decode strict base64 (binascii's `strict_mode` rules), with pybase64 where installed."""
    if pybase64 is not None:
        try:
            return pybase64.b64decode(text, validate=True)
        except binascii.Error:
            # pybase64 refuses a few paddings binascii's strict mode takes (`AAAA=`);
            # binascii judges every refusal, so what is accepted never depends on the install.
            pass
    return binascii.a2b_base64(text, strict_mode=True)


def _error_fields(body: bytes) -> tuple[str, str, str, str]:
    """Return (message, code, type, param) from an error body, whatever its shape."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body[:300].decode("utf-8", "replace").strip(), "", "", ""
    return _error_object_fields(payload)


def _error_object_fields(payload: object) -> tuple[str, str, str, str]:
    """Return (message, code, type, param) from a parsed error answer."""
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(error, str):
        return error[:300], "", "", ""
    if not isinstance(error, dict):
        return str(error)[:300], "", "", ""
    return tuple(  # type: ignore[return-value]
        str(error.get(name) or "")[:300] for name in ("message", "code", "type", "param")
    )


def _is_balance(status: int, code: str, message: str) -> bool:
    if status == 402 or code in _BALANCE_CODES:
        return True
    return 400 <= status < 500 and bool(_BALANCE_WORDS.search(message))


def _retry_after(headers: httpx.Headers) -> float | None:
    """Return the wait the server asked for, in seconds, or None."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(float(ms) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def _secs(value: float) -> str:
    return f"{value:g}"


# --- masks (edits) -----------------------------------------------------------------------


async def prepare_mask(
    data: bytes, name: str | None, first: ReferenceImage, *, max_bytes: int
) -> ReferenceImage:
    """Check an edit's mask like a reference: an image, the first reference's size, as PNG
    with an alpha channel (what the API wants; one without alpha is given an opaque one)."""
    if len(data) > max_bytes:
        raise BadReferenceError(
            "ref.too_big", index="mask", size_mb=_mb(len(data)), limit_mb=_mb(max_bytes)
        )
    return await asyncio.to_thread(_check_mask, data, name, first, max_bytes)


def _check_mask(data: bytes, name: str | None, first: ReferenceImage, max_bytes: int) -> ReferenceImage:
    try:
        ref = _check_reference(data, name or "mask.png", 0, max_bytes)
    except BadReferenceError as err:
        raise BadReferenceError("ref.mask_not_image", detail=err.detail) from err
    if (ref.width, ref.height) != (first.width, first.height):
        raise BadReferenceError(
            "ref.mask_size",
            size=f"{ref.width}x{ref.height}",
            expected=f"{first.width}x{first.height}",
        )
    with Image.open(io.BytesIO(ref.data)) as im:
        if im.format == "PNG" and im.mode in ("RGBA", "LA"):
            return ReferenceImage(ref.data, "mask.png", "image/png", ref.width, ref.height)
        out = io.BytesIO()
        ImageOps.exif_transpose(im).convert("RGBA").save(out, format="PNG", compress_level=3)
    return ReferenceImage(out.getvalue(), "mask.png", "image/png", ref.width, ref.height)
