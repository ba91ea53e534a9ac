"""Previews: the image client's stream against the fake API, its fallbacks, and the service.

The fake image API answers `stream: true` with real server-sent events over HTTP (partials
of the asked size, then the completed event with usage). The client must show each partial,
take the completed event as the result and its usage as the bill, and degrade on its own:
a refusal, a plain JSON answer, a dropped stream — each remembered per (API root, model).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from PIL import Image

from core.config import Settings
from core.errors import ContentPolicyError
from core.images import GeneratedImage, ImageClient, _EventReader
from core.pricing import PARTIAL_IMAGE_TOKENS, estimate_credits
from core.prompt import ImageRequest
from core.requester import Requester
from core.service import ImageService, Progress
from core.types import Usage
from tests.fake_api import PARTIAL_TOKENS, FakeImageAPI

SettingsFactory = Callable[..., Settings]
VIEWER = Requester("telegram", "7", None, "Viewer", "en", previews=True)
API_USER = Requester("web", "alice", None, "alice", "en")


def request(**changes: Any) -> ImageRequest:
    values: dict[str, Any] = {
        "prompt": "a red fox in the snow",
        "model": "gpt-image-2",
        "size": "1280x720",
        "quality": "low",
        "n": 1,
        "partial_images": 2,
    }
    values.update(changes)
    return ImageRequest(**values)


def png(size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (1, 2, 3)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def pixel(data: bytes) -> tuple[int, ...]:
    with Image.open(io.BytesIO(data)) as im:
        return tuple(im.convert("RGB").getpixel((0, 0)))


class Previews:
    """An on_partial callback that keeps what it was shown."""

    def __init__(self) -> None:
        self.shown: list[tuple[int, GeneratedImage]] = []

    async def __call__(self, image: GeneratedImage, index: int) -> None:
        self.shown.append((index, image))


@pytest.fixture
async def client(
    settings: SettingsFactory, http: httpx.AsyncClient
) -> AsyncIterator[ImageClient]:
    yield ImageClient(http, settings())


# --- the stream ------------------------------------------------------------------------------


async def test_partials_arrive_in_order_then_the_completed_event_is_the_result(
    client: ImageClient, fake_api: FakeImageAPI
) -> None:
    previews = Previews()
    result = await client.draw(request(partial_images=3), on_partial=previews)

    assert [i for i, _ in previews.shown] == [0, 1, 2]
    for _, image in previews.shown:
        assert (image.mime, image.width, image.height) == ("image/png", 1280, 720)
    # The partials really are the fake's previews (darker than the result, brighter each time).
    levels = [pixel(image.data)[0] for _, image in previews.shown]
    assert levels == sorted(levels) and levels[-1] < pixel(result.images[0].data)[0]
    [image] = result.images
    assert (image.width, image.height) == (1280, 720)
    (sent,) = fake_api.api_requests
    assert sent.json is not None
    assert sent.json["stream"] is True and sent.json["partial_images"] == 3
    # The bill is the completed event's usage: 106 tokens for the image, 100 per partial.
    assert result.usage is not None
    assert result.usage.image_output_tokens == 106 + 3 * PARTIAL_TOKENS
    assert client.streams("gpt-image-2")


async def test_an_edit_streams_as_multipart_and_reads_image_edit_events(
    client: ImageClient, fake_api: FakeImageAPI
) -> None:
    from core.images import prepare_references

    refs = await prepare_references([(png((1024, 1024)), "cat.png")], max_bytes=10_000_000)
    previews = Previews()
    result = await client.draw(
        request(size="1024x1024", partial_images=1), refs, on_partial=previews
    )

    (sent,) = fake_api.api_requests
    assert sent.path == "/v1/images/edits"
    assert sent.fields["stream"] == "true" and sent.fields["partial_images"] == "1"
    assert [i for i, _ in previews.shown] == [0]
    assert result.images[0].width == 1024


async def test_without_a_callback_or_previews_nothing_is_streamed(
    client: ImageClient, fake_api: FakeImageAPI
) -> None:
    await client.draw(request())  # no on_partial: a front end that shows none
    await client.draw(request(partial_images=0), on_partial=Previews())
    for sent in fake_api.api_requests:
        assert sent.json is not None
        assert "stream" not in sent.json and "partial_images" not in sent.json


async def test_partials_are_asked_only_for_single_images_with_previews_on(
    settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    on = ImageClient(http, settings(preview_count=3))
    assert on.partials_for(request(partial_images=0)) == 3
    assert on.partials_for(request(n=2)) == 0
    off = ImageClient(http, settings(previews="off"))
    assert off.partials_for(request()) == 0
    assert settings(previews=False).previews == "off"
    assert settings(previews="ON").previews == "on"


# --- fallbacks ---------------------------------------------------------------------------------


async def test_a_refused_stream_falls_back_at_once_and_is_remembered(
    client: ImageClient, fake_api: FakeImageAPI, caplog: pytest.LogCaptureFixture
) -> None:
    fake_api.stream_support = "refuse"
    previews = Previews()
    with caplog.at_level(logging.WARNING, logger="core.images"):
        result = await client.draw(request(), on_partial=previews)

    first, second = fake_api.api_requests
    assert first.json is not None and first.json["stream"] is True
    assert second.json is not None and "stream" not in second.json
    assert previews.shown == []
    # Nothing drawn twice: the refusal came before any image, the usage is the normal call's.
    assert result.usage is not None and result.usage.image_output_tokens == 106
    assert "no previews for gpt-image-2" in caplog.text
    # Remembered: no more previews asked for this model, and no more failed attempts.
    assert client.partials_for(request()) == 0
    assert client.partials_for(request(model="gpt-image-1.5", size="1024x1024")) == 2
    fake_api.reset()
    await client.draw(request(), on_partial=previews)
    (only,) = fake_api.api_requests
    assert only.json is not None and "stream" not in only.json


async def test_a_plain_json_answer_to_a_stream_is_the_result_and_is_remembered(
    client: ImageClient, fake_api: FakeImageAPI
) -> None:
    fake_api.inject("stream_json")
    previews = Previews()
    result = await client.draw(request(), on_partial=previews)

    (only,) = fake_api.api_requests  # taken as it came: not drawn (or billed) again
    assert only.json is not None and only.json["stream"] is True
    assert previews.shown == []
    assert result.images[0].width == 1280
    assert result.usage is not None and result.usage.image_output_tokens == 106
    assert not client.streams("gpt-image-2")


async def test_a_dropped_stream_goes_on_as_a_normal_call_and_is_remembered(
    client: ImageClient, fake_api: FakeImageAPI
) -> None:
    fake_api.inject("stream_drop", after=1)
    previews = Previews()
    result = await client.draw(request(partial_images=3), on_partial=previews)

    first, second = fake_api.api_requests
    assert first.json is not None and first.json["stream"] is True
    assert second.json is not None and "stream" not in second.json
    assert [i for i, _ in previews.shown] == [0]  # shown before the stream broke
    assert result.images[0].width == 1280
    assert result.usage is not None and result.usage.image_output_tokens == 106
    assert client.partials_for(request()) == 0


async def test_an_error_event_in_the_stream_is_that_error_not_a_fallback(
    client: ImageClient, fake_api: FakeImageAPI
) -> None:
    error = {
        "type": "error",
        "error": {"code": "moderation_blocked", "message": "Rejected by the safety system."},
    }
    body = f"event: error\ndata: {json.dumps(error)}\n\n".encode()
    fake_api.inject("stream_body", body=body)
    with pytest.raises(ContentPolicyError):
        await client.draw(request(), on_partial=Previews())
    assert client.streams("gpt-image-2")  # the model streams; this prompt was refused


async def test_a_broken_preview_is_skipped_and_a_failing_callback_never_fails_the_job(
    client: ImageClient, fake_api: FakeImageAPI
) -> None:
    good = base64.b64encode(png((1280, 720))).decode()
    broken = base64.b64encode(png((1280, 720))[:200]).decode()
    events = [
        ("image_generation.partial_image", {"b64_json": broken, "partial_image_index": 0}),
        ("image_generation.partial_image", {"b64_json": good, "partial_image_index": 1}),
        ("image_generation.completed", {"b64_json": good, "usage": {"output_tokens": 306}}),
    ]
    body = b"".join(
        f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()
        for name, data in events
    )
    seen: list[int] = []

    async def failing(image: GeneratedImage, index: int) -> None:
        seen.append(index)
        raise RuntimeError("the chat is gone")

    fake_api.inject("stream_body", body=body)
    result = await client.draw(request(), on_partial=failing)
    assert seen == [1]
    assert result.usage == Usage(image_output_tokens=306, total_tokens=306)


async def test_waiting_streams_do_not_hold_the_readers_other_answers_need(
    settings: SettingsFactory, http: httpx.AsyncClient, fake_api: FakeImageAPI
) -> None:
    # Eight streams each wait ~1 s between events; a plain call meanwhile must not queue
    # behind them (only the read of an event holds one of the client's reading places).
    fake_api.delay = 1.2
    client = ImageClient(http, settings())
    streams = [
        asyncio.ensure_future(client.draw(request(partial_images=3), on_partial=Previews()))
        for _ in range(8)
    ]
    await asyncio.sleep(0.5)
    fake_api.delay = 0.0
    started = asyncio.get_running_loop().time()
    await client.draw(request(partial_images=0))
    waited = asyncio.get_running_loop().time() - started
    assert not any(s.done() for s in streams) and waited < 0.6
    await asyncio.gather(*streams)


# --- the event reader ---------------------------------------------------------------------------


def _events(body: bytes, cut: int) -> list[tuple[str, Any]]:
    reader = _EventReader(10_000_000)
    found = []
    for start in range(0, len(body), cut):
        found += reader.feed(body[start : start + cut])
    assert not reader.mid_event
    return [(name, json.loads(answer.text) if answer.text else None) for name, answer in found]


@pytest.mark.parametrize("cut", [1, 2, 3, 7, 64, 10_000])
def test_the_event_reader_reads_any_cut_of_every_line_ending(cut: int) -> None:
    b64 = base64.b64encode(png()).decode()
    body = (
        b": a comment, then a keep-alive\r\n\r\n"
        b"id: 1\r\nevent: first\r\ndata: {\"a\": 1,\r\ndata:  \"b\": 2}\r\n\r\n"
        b"event: second\rdata:{\"b64_json\": \"" + b64.encode() + b"\"}\r\r"
        b"data\n\n"
        b"event: third\ndata: {\"c\": [1,\ndata: 2]}\n\n"
        b"data: {\"unfinished\": tr"
    )
    events = _events(body[: body.rindex(b"data: {\"unf")], cut)
    assert [name for name, _ in events] == ["first", "second", "", "third"]
    assert events[0][1] == {"a": 1, "b": 2}
    assert events[3][1] == {"c": [1, 2]}
    reader = _EventReader(10_000_000)
    done = reader.feed(body)
    assert reader.mid_event  # the last event never ended: not handed on
    assert len(done) == 4


def test_the_event_reader_decodes_a_long_data_line_on_the_way_in() -> None:
    image = png((640, 480), (9, 9, 9))
    line = json.dumps({"type": "x.completed", "b64_json": base64.b64encode(image).decode()})
    reader = _EventReader(10_000_000)
    done = []
    body = f"data: {line}\n\n".encode()
    for start in range(0, len(body), 4096):
        done += reader.feed(body[start : start + 4096])
    [(_, answer)] = done
    payload = json.loads(answer.text)
    assert len(answer.text) < 200  # the base64 never piled up as text
    assert b"".join(answer.decoded_for(payload["b64_json"]) or []) == image


# --- the service ----------------------------------------------------------------------------------


@pytest.fixture
async def service(make_service: Callable[..., Any]) -> AsyncIterator[ImageService]:
    async with make_service(rate_limit_per_minute=0, preview_count=3) as svc:
        yield svc


async def test_the_job_shows_partials_and_is_charged_the_completed_usage(
    service: ImageService, fake_api: FakeImageAPI
) -> None:
    events: list[Progress] = []

    async def progress(event: Progress) -> None:
        events.append(event)

    outcome = await service.draw(VIEWER, "16:9 low a red fox", (), progress)

    partials = [e for e in events if e.kind == "partial"]
    assert [e.index for e in partials] == [0, 1, 2]
    assert all(e.job_id == outcome.job_id and e.image is not None for e in partials)
    assert events[-1].kind == "done"
    job = await service.ledger.get_job(outcome.job_id)
    assert job is not None and job.usage is not None
    assert job.usage.image_output_tokens == 106 + 3 * PARTIAL_TOKENS
    expected = service.prices.credits(job.usage, "gpt-image-2")
    assert job.actual_credits == pytest.approx(expected)
    # The estimate reserved the previews' tokens too.
    plain, _ = service.parse("16:9 low a red fox")
    without = estimate_credits(plain, service.prices)
    per_token = service.prices.credits_for_tokens("gpt-image-2", image_out=1)
    assert job.estimated_credits == pytest.approx(
        without + 3 * PARTIAL_IMAGE_TOKENS * per_token
    )
    assert job.actual_credits <= job.estimated_credits


async def test_a_refused_stream_costs_nothing_extra_and_later_jobs_do_not_try(
    service: ImageService, fake_api: FakeImageAPI
) -> None:
    fake_api.stream_support = "refuse"
    events: list[Progress] = []

    async def progress(event: Progress) -> None:
        events.append(event)

    first = await service.draw(VIEWER, "16:9 low a red fox", (), progress)
    second = await service.draw(VIEWER, "16:9 low a red fox", (), progress)

    calls = [r.json for r in fake_api.api_requests]
    assert [c is not None and "stream" in c for c in calls] == [True, False, False]
    for outcome in (first, second):
        job = await service.ledger.get_job(outcome.job_id)
        assert job is not None and job.usage is not None
        assert job.usage.image_output_tokens == 106  # no preview tokens billed
        assert job.actual_credits == pytest.approx(service.prices.credits(job.usage, "gpt-image-2"))
    assert not [e for e in events if e.kind == "partial"]
    job2 = await service.ledger.get_job(second.job_id)
    plain, _ = service.parse("16:9 low a red fox")
    assert job2 is not None
    assert job2.estimated_credits == pytest.approx(estimate_credits(plain, service.prices))


async def test_a_requester_that_shows_no_previews_never_streams(
    service: ImageService, fake_api: FakeImageAPI
) -> None:
    events: list[Progress] = []

    async def progress(event: Progress) -> None:
        events.append(event)

    await service.draw(API_USER, "16:9 low a red fox", (), progress)
    (sent,) = fake_api.api_requests
    assert sent.json is not None and "stream" not in sent.json
    assert not [e for e in events if e.kind == "partial"]


# --- usage as relays send it -------------------------------------------------------------------


def test_usage_variants_relays_really_send() -> None:
    images_api = {"input_tokens": 10, "output_tokens": 300, "total_tokens": 310}
    assert Usage.from_api(images_api) == Usage(10, 0, 300, 0, 310)
    detailed = {
        "input_tokens": 10,
        "input_tokens_details": {"text_tokens": 4, "image_tokens": 6},
        "output_tokens": 300,
        "output_tokens_details": {"image_tokens": 280, "text_tokens": 20},
    }
    assert Usage.from_api(detailed) == Usage(4, 6, 280, 20, 310)
    # Output the details do not account for is still billed (as text output).
    partial = {"input_tokens": 10, "output_tokens": 300, "output_tokens_details": {"image_tokens": 250}}
    assert Usage.from_api(partial) == Usage(10, 0, 250, 50, 310)
    chat = {
        "prompt_tokens": 12,
        "completion_tokens": 400,
        "total_tokens": 412,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    assert Usage.from_api(chat) == Usage(12, 0, 400, 0, 412)
    chat_images = {
        "prompt_tokens": 12,
        "completion_tokens": 400,
        "prompt_tokens_details": {"text_tokens": 5, "image_tokens": 7},
        "completion_tokens_details": {"image_tokens": 390, "text_tokens": 10},
    }
    assert Usage.from_api(chat_images) == Usage(5, 7, 390, 10, 412)
    hostile = {"prompt_tokens": -5, "completion_tokens": "lots"}
    parsed = Usage.from_api(hostile)
    assert parsed is not None and not parsed.is_valid()
    assert Usage.from_api({"prompt_tokens": 3, "input_tokens": 2}) == Usage(2, 0, 0, 0, 2)


async def test_usage_only_on_the_completed_event_is_read_there(
    client: ImageClient, fake_api: FakeImageAPI
) -> None:
    fake_api.usage_rewrite = lambda usage: {
        "prompt_tokens": usage["input_tokens"],
        "completion_tokens": usage["output_tokens"],
    }
    result = await client.draw(request(), on_partial=Previews())
    assert result.usage is not None
    assert result.usage.image_output_tokens == 106 + 2 * PARTIAL_TOKENS


# --- a url result's PNG checked while it downloads -----------------------------------------------


@pytest.mark.parametrize("cut", [1, 5, 8, 13, 4096, 1 << 20])
def test_the_png_walker_proves_what_the_whole_file_check_proves(cut: int) -> None:
    from core.images import _png_whole, _PngChunks

    data = png((300, 200), (40, 90, 160))
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF
    cases = {"whole": data, "damaged": bytes(damaged), "cut": data[:-20], "jpeg": b"\xff\xd8"}
    for name, body in cases.items():
        walker = _PngChunks()
        for start in range(0, len(body), cut):
            walker.feed(body[start : start + cut])
        try:
            _png_whole(body)
            sound = body.startswith(b"\x89PNG")
        except OSError:
            sound = False
        assert walker.whole == sound == (name == "whole"), name


async def test_a_url_result_is_checked_on_the_way_in(
    settings: SettingsFactory, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import core.images

    whole_file_checks: list[int] = []
    real = core.images._png_whole
    monkeypatch.setattr(
        core.images, "_png_whole", lambda data: (whole_file_checks.append(1), real(data))
    )
    with FakeImageAPI(key=settings().openai_api_key.get_secret_value(), mode="url") as api:
        client = ImageClient(http, settings(openai_base_url=api.base_url, response_format="url"))
        result = await client.draw(request(partial_images=0))
        assert result.images[0].width == 1280
        assert whole_file_checks == []  # proven while it arrived, not again afterwards
        await client.draw(request(partial_images=0, output_format="jpeg"))
        api.mode = "b64"
        await ImageClient(http, settings(openai_base_url=api.base_url)).draw(
            request(partial_images=0)
        )
        assert whole_file_checks == [1]  # a base64 PNG still gets the whole-file check
