"""The streaming answer reader against the plain path, for any chunking of the answer.

`_AnswerReader` decodes `b64_json` strings while a 200 answer arrives. Whatever it does, the
answer it hands on must read exactly like the bytes received parsed whole (json.loads, then
base64 of each `b64_json`, with or without a `data:` header; `url` items downloaded): the
same images, usage and revised prompt, or the same error (class, message key, usage). The
bodies are built here — well-formed ones, and ones with escapes, whitespace, characters
outside base64, bad headers, control characters, invalid UTF-8, forged placeholders, cut
short, without images — and hypothesis cuts them into reads anywhere. Well-formed bodies are
also checked against an independent decode of what was put in, and must take the streaming
path (or the tests would pass by never streaming). Last, the same through real HTTP: the fake
API's `trickle` fault sends its answers a few bytes at a time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from core.config import Settings
from core.errors import UpstreamError, UpstreamMalformed, UpstreamRejected
from core.images import GeneratedImage, ImageClient, _a2b, _Answer, _AnswerReader
from core.pricing import Usage
from core.prompt import ImageRequest
from tests.conftest import TEST_KEY, TLS
from tests.fake_api import FakeImageAPI

CAP = 50 * 1024 * 1024


def _image(fmt: str, size: tuple[int, int], mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    colour = (30, 120, 200, 90)[: len(mode)]
    Image.new(mode, size, colour).save(out, format=fmt)
    return out.getvalue()


# (bytes, mime, width, height): tiny, so a body is a few hundred bytes and every cut matters.
IMAGES = (
    (_image("PNG", (8, 6)), "image/png", 8, 6),
    (_image("PNG", (5, 3), "RGBA"), "image/png", 5, 3),
    (_image("JPEG", (9, 7)), "image/jpeg", 9, 7),
    (_image("WEBP", (6, 6)), "image/webp", 6, 6),
)
USAGE = {
    "input_tokens": 12,
    "input_tokens_details": {"text_tokens": 12, "image_tokens": 0},
    "output_tokens": 196,
    "total_tokens": 208,
}
PROMPTS = (
    'a cat saying "b64_json": "QUJD"',
    "路灯下的猫 🐈",
    "back\\slash and\nnewline",
    "at dusk",
    "",
)
MALFORMED = (UpstreamMalformed, "upstream.malformed")


@dataclass(frozen=True)
class Outcome:
    """What reading an answer gave: images, usage and revised prompt, or an error."""

    images: tuple[GeneratedImage, ...] = ()
    usage: Usage | None = None
    revised: str | None = None
    error: tuple[type[UpstreamError], str] | None = None


@dataclass(frozen=True)
class Case:
    """An answer body (url items as `@@URLn@@`) and, where known, what it must read as."""

    body: bytes
    items: int
    expected: Outcome


# --- reading ----------------------------------------------------------------------------------


def _settings(base_url: str) -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None,
        openai_base_url=base_url,
        openai_api_key=TEST_KEY,
        response_format="none",
        request_timeout=5.0,
        connect_timeout=1.0,
        max_retries=0,
        database_url="sqlite:///:memory:",
    )


def streamed(pieces: Sequence[bytes]) -> _Answer:
    """Feed the reads to a streaming reader and return its answer."""
    reader = _AnswerReader(CAP)
    for piece in pieces:
        reader.feed(piece)
    return reader.finish()


def split(body: bytes, cuts: Sequence[int]) -> list[bytes]:
    """Cut the body at the given offsets (repeats give empty reads)."""
    edges = [0, *sorted(cuts), len(body)]
    return [body[a:b] for a, b in zip(edges, edges[1:], strict=False)]


async def read(client: ImageClient, answer: _Answer, asked: int) -> Outcome:
    """Read an answer the way `draw` does and say what came of it."""
    try:
        images, usage, revised = await client._read_answer(answer, asked)
    except UpstreamError as err:
        return Outcome(usage=err.usage, error=(type(err), err.key))
    return Outcome(images, usage, revised)


async def plain_and_streamed(
    base_url: str, body: bytes, asked: int, reads: Sequence[Sequence[bytes]]
) -> tuple[Outcome, list[Outcome]]:
    """Read the body whole (the plain path) and as each of the given sequences of reads."""
    async with httpx.AsyncClient(verify=TLS) as http:
        client = ImageClient(http, _settings(base_url))
        plain = await read(client, _Answer(body), asked)
        outcomes = []
        for pieces in reads:
            answer = streamed(pieces)
            if not answer.decoded:
                # Plain: the reads are not kept, so this is the answer rebuilt; byte for byte.
                assert answer.text == body
            outcomes.append(await read(client, answer, asked))
        return plain, outcomes


@pytest.fixture(scope="module")
def files() -> Iterator[tuple[FakeImageAPI, list[str]]]:
    """Yield a fake API serving IMAGES under /files/…, and their URLs."""
    with FakeImageAPI(key=TEST_KEY) as api:
        yield api, [api.serve_file(data, mime, mime.split("/")[1]) for data, mime, *_ in IMAGES]


def with_urls(body: bytes, urls: list[str]) -> bytes:
    for index, url in enumerate(urls):
        body = body.replace(f"@@URL{index}@@".encode(), url.encode())
    return body


# --- building answers -------------------------------------------------------------------------

# How one b64_json string is spoiled, and whether the plain path still reads it (True), or
# refuses the image (False), or cannot parse the JSON at all (None).
STRING_FAULTS: dict[str, bool | None] = {
    "none": True,
    "escape": True,  # a character written as \u00XX or \/: the same string once parsed
    "space": True,  # line-wrapped base64: the plain path drops whitespace
    "escaped_newline": True,
    "raw_control": None,  # a raw tab or newline inside a JSON string
    "bad_utf8": None,
    "not_base64": False,
    "inner_padding": False,
    "empty": False,
    "no_comma": False,  # data: header without its comma
    "upper_header": False,  # DATA:…, not a header, and ':' is not base64
    "long_header": True,  # a header past 256 characters is still a header to json + partition
    "not_image": False,
}
# Odd endings that binascii's strict mode may take or refuse: excess padding, or spare bits
# set in the last group (the same bytes). Their fate is whatever strict mode says.
ODD_ENDINGS = ("extra_padding", "spare_bits")
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _spare_bits(encoded: str) -> str:
    """Set a spare bit in a padded last group: other text, the same bytes."""
    if not encoded.endswith("="):
        return encoded
    last = len(encoded.rstrip("=")) - 1  # the character holding the spare bits
    bumped = ALPHABET[ALPHABET.index(encoded[last]) | 1]
    return encoded[:last] + bumped + encoded[last + 1 :]


def _strictly(encoded: str) -> bool:
    try:
        binascii.a2b_base64(encoded.encode(), strict_mode=True)
    except binascii.Error:
        return False
    return True


def _escape(char: str) -> str:
    return "\\/" if char == "/" else f"\\u{ord(char):04x}"


@st.composite
def b64_string(draw: st.DrawFn, image: bytes, mime: str) -> tuple[bytes, bool | None]:
    """Return the raw JSON text between the quotes of one b64_json value, and its fate."""
    fault = draw(st.sampled_from([*sorted(STRING_FAULTS), *ODD_ENDINGS]))
    data = b"hello, I am not an image" if fault == "not_image" else image
    encoded = base64.b64encode(data).decode()
    header = draw(st.sampled_from(["", f"data:{mime};base64,"]))
    if fault == "no_comma":
        header = f"data:{mime};base64"
    elif fault == "upper_header":
        header = f"DATA:{mime};base64,"
    elif fault == "long_header":
        header = f"data:{mime};{'x' * 300};base64,"
    text = header + encoded
    at = draw(st.integers(len(header), len(text) - 1))  # somewhere in the base64 part
    if header and draw(st.booleans()):
        anywhere = draw(st.integers(0, len(header) - 1))  # in the header
    else:
        anywhere = at
    if fault == "escape":
        text = text[:anywhere] + _escape(text[anywhere]) + text[anywhere + 1 :]
    elif fault == "space":
        text = text[:at] + draw(st.sampled_from([" ", "   "])) + text[at:]
    elif fault == "escaped_newline":
        text = text[:at] + draw(st.sampled_from(["\\n", "\\r\\n", "\\t"])) + text[at:]
    elif fault == "raw_control":
        text = text[:anywhere] + draw(st.sampled_from(["\n", "\t", "\x00"])) + text[anywhere:]
    elif fault == "not_base64":
        text = text[:at] + draw(st.sampled_from(["%", "-", "_", "é", "#", '\\"'])) + text[at:]
    elif fault == "inner_padding":
        cut = len(header) + 4 * draw(st.integers(1, max(1, (len(encoded) - 8) // 4)))
        text = text[:cut] + "==" + text[cut:]
    elif fault == "empty":
        text = draw(st.sampled_from(["", f"data:{mime};base64,"]))
    elif fault == "extra_padding":
        encoded += draw(st.sampled_from(["=", "==", "====", "=" * 9]))
        return (header + encoded).encode(), _strictly(encoded)
    elif fault == "spare_bits":
        encoded = _spare_bits(encoded)
        return (header + encoded).encode(), _strictly(encoded)
    raw = text.encode()
    if fault == "bad_utf8":
        raw = raw[:anywhere] + b"\xff" + raw[anywhere:]
    return raw, STRING_FAULTS[fault]


@st.composite
def answers(draw: st.DrawFn) -> Case:
    """Build an answer body: 1-3 items (b64 with or without header, or url), extras, faults."""
    strings: dict[str, bytes] = {}
    items: list[dict[str, Any]] = []
    expected: list[GeneratedImage] = []
    fates: list[bool | None] = []
    for index in range(draw(st.integers(1, 3))):
        which = draw(st.integers(0, len(IMAGES) - 1))
        data, mime, width, height = IMAGES[which]
        item: dict[str, Any] = {}
        if draw(st.booleans()):
            item["url"] = f"@@URL{which}@@"
            fates.append(True)
        else:
            raw, fate = draw(b64_string(data, mime))
            strings[f"@@S{index}@@"] = raw
            item["b64_json"] = f"@@S{index}@@"
            fates.append(fate)
        if draw(st.booleans()):
            item["revised_prompt"] = draw(st.sampled_from(PROMPTS))
        if draw(st.booleans()):  # odd neighbours: a b64_json that is not the image's
            item["meta"] = {"b64_json": draw(st.sampled_from(["QUJD", "%%%", "", "data:,"]))}
        items.append(item)
        expected.append(GeneratedImage(data, mime, width, height))
    if draw(st.integers(0, 5)) == 0:
        # An item the reader cannot see as one: its key is escaped, its value looks like one
        # of the reader's placeholders. Read plainly, it is not base64.
        items.append("@@FORGED@@")  # type: ignore[arg-type]
        strings['"@@FORGED@@"'] = b'{"b64\\u005fjson": "#imgbot-decoded-0"}'
        fates.append(False)

    payload: dict[str, Any] = {"created": 1776220106, "data": items}
    with_usage = draw(st.booleans())
    if with_usage:
        payload["usage"] = USAGE
    shape = draw(st.sampled_from(["answer", "answer", "answer", "empty_data", "error_object"]))
    if shape == "empty_data":
        payload["data"] = draw(st.sampled_from([[], None]))
    elif shape == "error_object":
        del payload["data"]
        payload["error"] = {"message": "Invalid size", "code": "invalid_value", "type": "x"}
    if draw(st.booleans()):
        payload["b64_json"] = "QUJD"  # a top-level extra that is base64 but no image
    text = json.dumps(
        payload,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, 1])),
        separators=draw(st.sampled_from([None, (",", ":"), (" , ", " : ")])),
    )
    body = text.encode()
    for name, raw in strings.items():
        body = body.replace(name.encode(), raw)
    truncate = draw(st.integers(0, 6)) == 0
    if truncate:
        body = body[: draw(st.integers(1, len(body) - 1))]

    usage = Usage.from_api(USAGE) if with_usage else None
    # The outcome follows from the spoils: a cut body first, then the answer's shape, then
    # the items' strings (JSON errors before image errors). `url` items resolve at test time.
    if truncate:
        outcome = Outcome(error=MALFORMED)
    elif shape == "empty_data":
        outcome = Outcome(usage=usage, error=(UpstreamMalformed, "upstream.no_image"))
    elif shape == "error_object":
        outcome = Outcome(error=(UpstreamRejected, "upstream.rejected"))
    elif None in fates:
        outcome = Outcome(error=MALFORMED)
    elif False in fates:
        outcome = Outcome(usage=usage, error=MALFORMED)
    else:
        revised = next((i["revised_prompt"] for i in items if i.get("revised_prompt")), None)
        outcome = Outcome(tuple(expected), usage, revised)
    return Case(body, len(items), outcome)


@st.composite
def cuts(draw: st.DrawFn, size: int) -> list[int]:
    """Where to cut a body of `size` bytes into reads."""
    style = draw(st.sampled_from(["anywhere", "anywhere", "every", "single"]))
    if style == "single":
        return list(range(1, size))
    if style == "every":
        step = draw(st.integers(1, 97))
        return list(range(step, size, step))
    return draw(st.lists(st.integers(0, size), max_size=24))


# --- properties -------------------------------------------------------------------------------


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=answers(), data=st.data())
def test_any_chunking_reads_exactly_like_the_plain_path(
    files: tuple[FakeImageAPI, list[str]], case: Case, data: st.DataObject
) -> None:
    api, urls = files
    body = with_urls(case.body, urls)
    reads = [split(body, data.draw(cuts(len(body)), label="cuts")) for _ in range(2)]

    plain, outcomes = asyncio.run(plain_and_streamed(api.base_url, body, case.items, reads))

    assert plain == case.expected
    for outcome in outcomes:
        assert outcome == plain


@st.composite
def clean_answers(draw: st.DrawFn) -> tuple[bytes, list[str]]:
    """Build a well-formed answer of b64_json images, and its base64 strings in order."""
    strings: list[str] = []
    items = []
    for _ in range(draw(st.integers(1, 3))):
        data, mime, *_ = draw(st.sampled_from(IMAGES))
        header = draw(st.sampled_from(["", f"data:{mime};base64,"]))
        strings.append(base64.b64encode(data).decode())
        item: dict[str, Any] = {"b64_json": header + strings[-1]}
        if draw(st.booleans()):
            item["revised_prompt"] = draw(st.sampled_from(PROMPTS))
        if draw(st.booleans()):
            item["meta"] = {"b64_json": "QUJD"}  # decoded too, and left alone
            strings.append("QUJD")
        items.append(item)
    payload = {"created": 1776220106, "data": items, "usage": USAGE}
    text = json.dumps(
        payload,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, 1])),
        separators=draw(st.sampled_from([None, (",", ":"), (" , ", " : ")])),
    )
    return text.encode(), strings


@settings(max_examples=80, deadline=None)
@given(answer=clean_answers(), data=st.data())
def test_ordinary_answers_take_the_streaming_path(
    answer: tuple[bytes, list[str]], data: st.DataObject
) -> None:
    body, strings = answer
    read = streamed(split(body, data.draw(cuts(len(body)), label="cuts")))

    assert [b"".join(pieces) for pieces in read.decoded] == [base64.b64decode(s) for s in strings]
    # What is left to parse is the JSON around the strings, not the base64 inside them.
    assert not any(s.encode() in read.text for s in strings if len(s) > 8)


BASE64ISH = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/" + "====-_ \n%"


@settings(max_examples=400)
@given(st.text(BASE64ISH, max_size=16).map(str.encode) | st.binary(max_size=12))
def test_base64_is_as_strict_as_binascii_strict_mode(text: bytes) -> None:
    # pybase64 (when installed) must accept and refuse exactly what binascii's strict mode
    # does, or the same answer would read differently from one install to the next.
    try:
        expected: bytes | None = binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error:
        expected = None
    try:
        got: bytes | None = _a2b(text)
    except binascii.Error:
        got = None
    assert got == expected


FALLBACK = textwrap.dedent(
    """
    import base64, binascii, json, sys
    sys.modules["pybase64"] = None  # not importable: the standard library must do
    import core.images as m

    assert m.pybase64 is None and m._B64_SLICE == 1024 * 1024
    data = bytes(range(256)) * 12_000  # 3 MB: several slices
    text = base64.b64encode(data)
    assert m._b64decode(text) == data
    wrapped = b"\\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    assert m._b64decode(wrapped) == data
    for bad in (text[:1000] + b"%" + text[1000:], text[:4] + b"==" + text[4:], text[:-1]):
        try:
            m._b64decode(bad)
        except binascii.Error:
            pass
        else:
            raise AssertionError(bad[:20])
    body = json.dumps({"data": [{"b64_json": "data:image/png;base64," + text.decode()}]})
    reader = m._AnswerReader(1 << 30)
    for i in range(0, len(body), 65536):
        reader.feed(body[i : i + 65536].encode())
    answer = reader.finish()
    assert b"".join(answer.decoded[0]) == data
    print("ok")
    """
)


def test_without_pybase64_the_standard_library_decodes_the_same() -> None:
    done = subprocess.run(  # noqa: S603 - our own interpreter on our own script
        [sys.executable, "-c", FALLBACK],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# --- named bodies, cut at every byte ------------------------------------------------------------

B64 = base64.b64encode(IMAGES[0][0]).decode()
PREFIXED = f"data:image/png;base64,{B64}"
GOOD = Outcome((GeneratedImage(*IMAGES[0]),), Usage.from_api(USAGE))
FAILED = replace(GOOD, images=(), error=MALFORMED)  # the image refused, the usage kept


def body_of(*items: object, raw: bytes = b"", **top: Any) -> bytes:
    """Return an answer of these items; the string "@@RAW@@" in it becomes `raw`, as is."""
    body = json.dumps({"created": 1, "data": list(items), "usage": USAGE, **top}).encode()
    return body.replace(b'"@@RAW@@"', raw)


NAMED: dict[str, tuple[bytes, Outcome]] = {
    "plain base64": (body_of({"b64_json": B64}), GOOD),
    "data: prefix": (body_of({"b64_json": PREFIXED}), GOOD),
    "escaped slash in the header": (
        body_of({"b64_json": "@@RAW@@"}, raw=b'"data:image\\/png;base64,' + B64.encode() + b'"'),
        GOOD,
    ),
    "escaped character in the base64": (
        body_of({"b64_json": "@@RAW@@"}, raw=f'"{B64[:9]}\\u{ord(B64[9]):04x}{B64[10:]}"'.encode()),
        GOOD,
    ),
    "line-wrapped base64": (
        body_of({"b64_json": "\n".join(B64[i : i + 16] for i in range(0, len(B64), 16))}),
        GOOD,
    ),
    "spaces in the base64": (body_of({"b64_json": f"{B64[:32]}  {B64[32:]}"}), GOOD),
    "invalid base64": (body_of({"b64_json": B64[:20] + "%" + B64[20:]}), FAILED),
    "padding in the middle": (body_of({"b64_json": "QUI=" + B64}), FAILED),
    "no comma after the header": (body_of({"b64_json": f"data:image/png;base64{B64}"}), FAILED),
    "empty string": (body_of({"b64_json": ""}), FAILED),
    "control character in the header": (
        body_of({"b64_json": "@@RAW@@"}, raw=f'"data:image/png;\tbase64,{B64}"'.encode()),
        Outcome(error=MALFORMED),
    ),
    "invalid UTF-8 in the header": (
        body_of({"b64_json": "@@RAW@@"}, raw=b'"data:image/\xff;base64,' + B64.encode() + b'"'),
        Outcome(error=MALFORMED),
    ),
    "forged placeholder under an escaped key": (
        body_of({"b64_json": B64}, "@@RAW@@", raw=b'{"b64\\u005fjson": "#imgbot-decoded-0"}'),
        FAILED,
    ),
    "revised prompt after the image": (
        body_of({"b64_json": B64, "revised_prompt": "a cat at dusk"}),
        replace(GOOD, revised="a cat at dusk"),
    ),
    "excess padding": (body_of({"b64_json": B64 + "="}), GOOD if _strictly(B64 + "=") else FAILED),
    "spare bits, then an escape in the next image": (
        body_of(
            {"b64_json": _spare_bits(B64)},
            {"b64_json": "@@RAW@@"},
            raw=f'"{B64[:9]}\\u{ord(B64[9]):04x}{B64[10:]}"'.encode(),
        ),
        replace(GOOD, images=GOOD.images * 2),
    ),
    "empty data": (
        body_of(),
        Outcome(usage=Usage.from_api(USAGE), error=(UpstreamMalformed, "upstream.no_image")),
    ),
    "cut short inside the string": (body_of({"b64_json": B64})[:60], Outcome(error=MALFORMED)),
    "extra fields": (
        body_of({"b64_json": B64, "extra": {"b64_json": "QUJD"}}, b64_json="", size="8x6"),
        GOOD,
    ),
}


@pytest.mark.parametrize("name", sorted(NAMED))
async def test_named_answers_read_alike_cut_at_every_byte(name: str) -> None:
    body, expected = NAMED[name]
    reads = [[body[i : i + 1] for i in range(len(body))]]
    reads += [[body[:cut], body[cut:]] for cut in range(len(body) + 1)]

    plain, outcomes = await plain_and_streamed("http://127.0.0.1:9", body, 2, reads)

    assert plain == expected
    for cut, outcome in enumerate(outcomes):
        assert outcome == plain, f"reads #{cut} of {name!r}"


# --- through real HTTP ------------------------------------------------------------------------


def ask(**changes: Any) -> ImageRequest:
    values: dict[str, Any] = {
        "prompt": "a lighthouse at dusk",
        "model": "gpt-image-2",
        "size": "1024x640",
        "quality": "low",
        "n": 1,
    }
    values.update(changes)
    return ImageRequest(**values)


async def answer_decoded_plainly(api: FakeImageAPI, request: ImageRequest) -> list[bytes]:
    """POST like the client, then json.loads and base64-decode each b64_json (or GET its url)."""
    async with httpx.AsyncClient(verify=TLS) as http:
        resp = await http.post(
            f"{api.base_url}/v1/images/generations",
            json={
                "model": request.model,
                "prompt": request.prompt,
                "n": request.n,
                "size": request.size,
                "quality": request.quality,
                "output_format": request.output_format or "png",
            },
            headers={"Authorization": f"Bearer {TEST_KEY}"},
        )
        images = []
        for item in json.loads(resp.content)["data"]:
            if "url" in item:
                images.append((await http.get(item["url"])).content)
                continue
            text = item["b64_json"]
            if text.startswith("data:"):
                text = text.partition(",")[2]
            images.append(base64.b64decode(text, validate=True))
        return images


@pytest.mark.parametrize(
    ("mode", "output_format", "n", "chunk"),
    [
        ("b64_prefixed", "png", 2, 61),
        ("b64", "webp", 1, 7),
        ("b64_prefixed", "jpeg", 1, 256),
        ("url", "png", 2, 5),
    ],
)
async def test_a_trickled_answer_over_http_gives_the_same_images(
    mode: str, output_format: str, n: int, chunk: int
) -> None:
    request = ask(n=n, output_format=output_format)
    with FakeImageAPI(key=TEST_KEY, mode=mode) as api:
        expected = await answer_decoded_plainly(api, request)
        async with httpx.AsyncClient(verify=TLS) as http:
            client = ImageClient(http, _settings(api.base_url))
            api.inject("trickle", chunk=chunk, interval=0.0005)
            trickled = await client.draw(request)
            whole = await client.draw(request)

    assert [image.data for image in trickled.images] == expected
    assert trickled.images == whole.images
    assert trickled.usage is not None
    assert trickled.usage == whole.usage
    assert {(i.width, i.height) for i in trickled.images} == {(1024, 640)}


class CraftedAPI(FakeImageAPI):
    """The fake API, answering a 200 with a body the test chose, a few bytes at a time."""

    body = b""

    def _answer(self, h: Any, job: Any, fault: str, params: dict[str, Any]) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(self.body)))
        h.end_headers()
        step = int(params.get("chunk", 16))
        for start in range(0, len(self.body), step):
            h.wfile.write(self.body[start : start + step])
            h.wfile.flush()
            if not self._wait(float(params.get("interval", 0.0))):
                return


async def test_named_answers_trickled_over_http_read_like_the_plain_path() -> None:
    with CraftedAPI(key=TEST_KEY) as api:
        async with httpx.AsyncClient(verify=TLS) as http:
            client = ImageClient(http, _settings(api.base_url))
            for name in sorted(NAMED):
                raw, expected = NAMED[name]
                api.body = raw
                api.inject("trickle", chunk=3, interval=0.0002)
                try:
                    result = await client.draw(ask())
                except UpstreamError as err:
                    got = Outcome(usage=err.usage, error=(type(err), err.key))
                else:
                    got = Outcome(result.images, result.usage, result.revised_prompt)
                assert got == expected, name
