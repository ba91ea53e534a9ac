"""Previews on Discord, end to end: the real discord.py command tree, the fake Discord HTTP
seam, and the fake image API streaming real server-sent events.

The deferred public answer is edited with each partial (a small JPEG attachment), then the
result's edit replaces it with the image, the embed and the buttons. An upstream that does
not stream changes nothing for the user and costs nothing extra. The new request fields
reach the command language through /img's options.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from core.config import Settings
from core.store import JobStatus
from tests import discord_payloads as p
from tests.fake_api import PARTIAL_TOKENS, FakeImageAPI
from tests.test_discord import (
    FakeCdn,
    is_preview,
    job_id_of,
    make_settings,
    result_of,
    running_bot,
)


def red(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB").getpixel((0, 0))[0]


async def test_partials_are_edited_into_the_answer_then_the_result_replaces_them(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    # Previews at 1, 2, 3 s; the image at 4 s: room for at least one preview's edit before
    # the result even on a busy machine (later ones may be skipped for newer).
    fake_api.delay = 4.0
    config = make_settings(settings, tmp_path, preview_count=3)
    async with running_bot(config, FakeCdn()) as h:
        calls = await h.feed(p.slash("img", [p.option("prompt", "16:9 low a red fox")]))

        edits = [c for c in calls if c.kind == "edit_original"]
        previews = [c for c in edits if c.files and is_preview(c)]
        result = result_of(calls)
        assert 1 <= len(previews) <= 3 and edits.index(previews[-1]) < edits.index(result)
        levels = [red(c.files[0].data) for c in previews]
        assert levels == sorted(levels) and len(set(levels)) == len(levels)
        for call in previews:
            with Image.open(io.BytesIO(call.files[0].data)) as im:
                assert im.format == "JPEG" and max(im.size) <= 1024
            assert "preview" in (call.content or "")
        # The result's edit replaces the preview: its only attachment is the image.
        [image] = result.files
        assert image.filename.endswith("-1.png") and red(image.data) > levels[-1]
        assert (result.json or {}).get("content") is None
        job = await h.service.ledger.get_job(job_id_of(result))
        assert job is not None and job.status is JobStatus.SUCCEEDED
        assert job.usage is not None
        assert job.usage.image_output_tokens == 106 + 3 * PARTIAL_TOKENS
        assert job.actual_credits == h.service.prices.credits(job.usage, job.model)


async def test_an_upstream_that_answers_json_to_a_stream_changes_nothing(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    fake_api.stream_support = "json"
    async with running_bot(make_settings(settings, tmp_path), FakeCdn()) as h:
        first = await h.feed(p.slash("img", [p.option("prompt", "low a fox")]))
        second = await h.feed(p.slash("img", [p.option("prompt", "low another fox")]))
        for calls in (first, second):
            assert not [c for c in calls if c.files and is_preview(c)]
            result_of(calls)
        sent = [r.json or {} for r in fake_api.api_requests]
        assert [bool(s.get("stream")) for s in sent] == [True, False]
        for calls in (first, second):
            job = await h.service.ledger.get_job(job_id_of(result_of(calls)))
            assert job is not None and job.usage is not None
            assert job.usage.image_output_tokens == 196  # 1024x1024 low, no preview tokens
            assert job.actual_credits == h.service.prices.credits(job.usage, job.model)


async def test_img_options_carry_the_new_fields(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    async with running_bot(make_settings(settings, tmp_path), FakeCdn()) as h:
        options = [
            p.option("prompt", "a lighthouse"),
            p.option("quality", "low"),
            p.option("format", "webp"),
            p.option("compression", 55, 4),
            p.option("moderation", "low"),
        ]
        calls = await h.feed(p.slash("img", options))
        result = result_of(calls)
        assert result.files[0].filename.endswith(".webp")
        sent = fake_api.api_requests[-1].json or {}
        assert (sent["output_format"], sent["output_compression"], sent["moderation"]) == (
            "webp", 55, "low"
        )
        # Fidelity without a reference is refused privately, with the reason.
        refused = await h.feed(p.slash("img", [
            p.option("prompt", "a lighthouse"),
            p.option("model", "gpt-image-1.5"),
            p.option("fidelity", "high"),
        ]))
        [answer] = [c for c in refused if c.kind == "callback"]
        assert answer.ephemeral and "--fidelity" in (answer.content or "")


async def test_a_preview_keeps_its_words_when_the_clock_ticks_before_it_is_shown() -> None:
    # A tick of the clock that lands while a preview is being made must not caption that
    # preview "Drawing… N s" as if none were showing (seen once on a busy CI machine).
    import datetime as dt
    from types import SimpleNamespace

    import discord

    from bots.discord.reply import ProgressMessage
    from core.images import GeneratedImage
    from core.types import Progress
    from tests.telegram_fake import image_bytes

    edits: list[tuple[str | None, bool]] = []

    async def edit_original_response(content: str | None = None, **extra: Any) -> None:
        edits.append((content, bool(extra.get("attachments"))))

    interaction = SimpleNamespace(
        expires_at=discord.utils.utcnow() + dt.timedelta(minutes=15), extras={},
        edit_original_response=edit_original_response,
    )
    progress = ProgressMessage(interaction, "en")  # type: ignore[arg-type]
    preview = GeneratedImage(data=image_bytes(256, 256, "PNG"), mime="image/png",
                             width=256, height=256)
    await progress(Progress("partial", elapsed=1, image=preview, index=0))
    await progress(Progress("working", elapsed=2))  # before the flush ran
    for _ in range(500):
        if edits:
            break
        await asyncio.sleep(0.01)
    await progress.close()
    assert edits and edits[0][1]  # the first edit carries the preview
    for content, _ in edits:
        assert content is not None and "preview 1" in content, edits
