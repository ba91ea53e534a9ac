"""Previews on Telegram, end to end: the real PTB Application, the fake Bot API at PTB's
request seam, the fake image API streaming real server-sent events over HTTP.

The status message becomes a photo, each partial replaces its picture (editMessageMedia),
and the result takes that message's place with its caption and buttons; an upstream that
does not stream changes nothing for the user and costs nothing extra.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from PIL import Image

from bots.telegram import reply as telegram_reply
from core.config import Settings
from tests.fake_api import PARTIAL_TOKENS, FakeImageAPI
from tests.telegram_fake import FakeBotApi, Updates
from tests.test_telegram import (  # noqa: F401 - fixtures used by name
    ANN,
    Harness,
    database_url,
    make_settings,
    msg,
    running,
    size_of,
)


@pytest.fixture(autouse=True)
def quick_status(monkeypatch: pytest.MonkeyPatch) -> None:
    """Status edits 20 times a second instead of every 3 s, so a test sees each preview."""
    monkeypatch.setattr(telegram_reply, "STATUS_MIN_INTERVAL", 0.05)


@pytest.fixture
async def tg(
    make_settings: Callable[..., Settings],  # noqa: F811 - the fixture imported above
    fake_api: FakeImageAPI,
) -> AsyncIterator[Harness]:
    fake_api.delay = 1.2  # 3 partials at 0.3, 0.6, 0.9 s, the image at 1.2 s
    settings = make_settings(preview_count=3)
    async with running(settings, FakeBotApi(), fake_api, Updates()) as harness:
        yield harness


def red(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB").getpixel((0, 0))[0]


async def draw(tg: Harness, command: str = "/img 16:9 low a red fox") -> None:
    u = tg.updates
    await tg.send(u.update(u.message(ANN, u.private(ANN), text=command)))
    await tg.api.wait_for(lambda: any(
        c.params.get("reply_markup") for c in tg.api.of("editMessageMedia", "sendPhoto")
    ))


async def test_partials_are_shown_in_the_status_photo_then_the_result_takes_its_place(
    tg: Harness,
) -> None:
    await draw(tg)

    # The status starts as text, becomes a photo at the first preview (a reply to the
    # command), and that photo's picture is replaced by the later previews and the result.
    [status_text] = tg.api.of("sendMessage")
    [status_photo] = tg.api.of("sendPhoto")
    photo_id = status_photo.result["message_id"]
    assert msg("en", "progress.partial", seconds="0", number=1).split("—")[1] in (
        status_photo.params["caption"]
    )
    assert status_photo.params["reply_parameters"]["message_id"] == (
        status_text.params["reply_parameters"]["message_id"]
    )
    deleted = [c.params["message_id"] for c in tg.api.of("deleteMessage")]
    assert status_text.result["message_id"] in deleted and photo_id not in deleted
    edits = tg.api.of("editMessageMedia")
    assert all(int(e.params["message_id"]) == photo_id for e in edits)
    *previews, result = edits
    assert len(previews) >= 1  # the 2nd and 3rd previews (one may be skipped: latest wins)
    # Previews are small JPEGs; the result is the real image with its caption and buttons.
    first_preview = status_photo.files["photo"].data
    assert status_photo.files["photo"].format == "JPEG"
    shown = [first_preview] + [p.files[_attached(p)].data for p in previews]
    levels = [red(data) for data in shown]
    assert levels == sorted(levels) and len(set(levels)) == len(levels)
    image = result.files[_attached(result)]
    assert size_of(image.data) == (1280, 720)
    assert red(image.data) > levels[-1]
    assert result.params["media"]["caption"].startswith("1280x720")
    keyboard = result.params["reply_markup"]["inline_keyboard"]
    [job] = await tg.jobs()
    assert keyboard[0][0]["callback_data"] == f"j:{job.id}:again"
    # "vary" uses the result's file, not a preview's.
    assert job.result_refs == (result.result["photo"][-1]["file_id"],)
    # The bill is the completed event's usage (the image plus 100 tokens per preview).
    assert job.usage is not None
    assert job.usage.image_output_tokens == 106 + 3 * PARTIAL_TOKENS
    assert job.actual_credits == pytest.approx(tg.service.prices.credits(job.usage, job.model))


def _attached(call: Any) -> str:
    return str(call.params["media"]["media"]).removeprefix("attach://")


async def test_an_upstream_that_refuses_streams_changes_nothing_for_the_user(
    tg: Harness, fake_api: FakeImageAPI
) -> None:
    fake_api.stream_support = "refuse"
    await draw(tg)
    await draw(tg, "/img 16:9 low a second fox")

    # No preview anywhere: results come as before, as new photos; the status is deleted.
    assert tg.api.of("editMessageMedia") == []
    photos = tg.api.of("sendPhoto")
    assert len(photos) == 2 and all(p.params.get("reply_markup") for p in photos)
    sent = [r.json for r in fake_api.api_requests]
    assert [bool(s and s.get("stream")) for s in sent] == [True, False, False]
    jobs = await tg.jobs()
    for job in jobs:
        assert job.usage is not None and job.usage.image_output_tokens == 106
        assert job.actual_credits == pytest.approx(
            tg.service.prices.credits(job.usage, job.model)
        )
    # The second job knew: it reserved no preview tokens.
    assert jobs[1].estimated_credits < jobs[0].estimated_credits


async def test_a_dropped_stream_still_delivers_and_removes_the_preview(
    tg: Harness, fake_api: FakeImageAPI
) -> None:
    fake_api.inject("stream_drop", after=2)
    await draw(tg)

    # The previews shown before the drop are replaced by the result of the normal call.
    [status_photo] = tg.api.of("sendPhoto")
    result = tg.api.of("editMessageMedia")[-1]
    assert int(result.params["message_id"]) == status_photo.result["message_id"]
    assert result.params.get("reply_markup")
    [job] = await tg.jobs()
    assert job.status == "succeeded" and job.usage is not None
    assert job.usage.image_output_tokens == 106  # the normal call's usage
    assert not tg.service.client.streams("gpt-image-2")


async def test_an_album_result_replaces_the_preview_with_the_album(
    tg: Harness, fake_api: FakeImageAPI
) -> None:
    # Previews are for single images: x2 streams nothing, and the result is an album.
    u = tg.updates
    await tg.send(u.update(u.message(ANN, u.private(ANN), text="/img x2 low two foxes")))
    await tg.api.wait_for(lambda: tg.api.of("sendMediaGroup"))
    assert tg.api.of("sendPhoto") == [] and tg.api.of("editMessageMedia") == []
    assert fake_api.api_requests[-1].json is not None
    assert "stream" not in fake_api.api_requests[-1].json


async def test_a_file_result_goes_beside_and_the_preview_photo_is_removed(
    tg: Harness,
) -> None:
    await tg.send(tg.updates.update(
        tg.updates.message(ANN, tg.updates.private(ANN), text="/img file low a fox")
    ))
    await tg.api.wait_for(lambda: tg.api.of("sendDocument"))
    [status_photo] = tg.api.of("sendPhoto")
    await tg.api.wait_for(lambda: status_photo.result["message_id"] in [
        c.params["message_id"] for c in tg.api.of("deleteMessage")
    ])
    assert tg.api.of("editMessageMedia") == [] or all(
        not e.params.get("reply_markup") for e in tg.api.of("editMessageMedia")
    )
    [doc] = tg.api.of("sendDocument")
    assert doc.params.get("reply_markup")
