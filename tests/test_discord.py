"""The Discord adapter end to end: raw INTERACTION_CREATE payloads through the real bot.

A real `commands.Bot` with its real command tree, a real service on a real SQLite file and
the fake image API over real HTTP; fakes only where Discord's network is (the interaction
webhook adapter and the CDN download).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
from discord.webhook.async_ import async_context
from PIL import Image

from bots.discord.app import build_bot, sync_commands
from bots.discord.texts import CommandTranslator, text
from core.admin import ADMIN_COMMANDS
from core.config import Settings
from core.imaging import fit_image, upload_share
from core.pricing import format_credits
from core.runtime import LEASES_TASK_NAME, open_service
from core.service import ImageService
from core.store import JobStage, JobStatus
from core.store.sqlite import WRITER_TASK_NAME
from tests import discord_payloads as p
from tests.conftest import TEST_KEY
from tests.discord_fake import FakeCdn, FakeDiscord, FakeRest, SentCall, http_error
from tests.fake_api import FakeImageAPI

WAIT = 20.0


@dataclass
class Harness:
    """One running bot: its service, the fake Discord, and a way to feed it payloads."""

    bot: discord.ext.commands.Bot
    service: ImageService
    discord: FakeDiscord
    cdn: FakeCdn
    rest: FakeRest

    async def feed(self, payload: dict[str, Any]) -> list[SentCall]:
        """Deliver one interaction, wait until the bot is done with it, return its calls."""
        self.bot._connection.parse_interaction_create(payload)  # type: ignore[arg-type]
        await _settle()
        return self.discord.of(payload["token"])


async def _settle() -> None:
    """Wait until every task the bot started has finished (a modal's own timer aside)."""
    me = asyncio.current_task()
    async with asyncio.timeout(WAIT):
        while True:
            others = [
                t
                for t in asyncio.all_tasks()
                if t is not me
                and not t.done()
                and "timeout_task" not in repr(t.get_coro())
                # the store's idle writer, and the loop renewing this process's leases
                and t.get_name() not in (WRITER_TASK_NAME, LEASES_TASK_NAME)
            ]
            if not others:
                return
            await asyncio.wait(others, timeout=0.05)


@asynccontextmanager
async def running_bot(settings: Settings, cdn: FakeCdn) -> AsyncIterator[Harness]:
    """Open the service, build the bot, and put the fakes at Discord's seams."""
    fake = FakeDiscord(cdn)
    async with open_service(settings) as service:
        bot = build_bot(settings, service)
        await bot._async_setup_hook()
        # What `login` learns from GET /users/@me and the application, without a network.
        bot._connection.user = discord.ClientUser(
            state=bot._connection, data={**p.user(p.APP_ID, "imgbot"), "bot": True}
        )
        bot._connection.application_id = p.APP_ID
        await bot.setup_hook()
        rest = FakeRest(cdn)
        bot.http.get_from_cdn = cdn.get_from_cdn  # type: ignore[method-assign]
        bot.http.request = rest.request  # type: ignore[method-assign]
        token = async_context.set(fake)
        try:
            yield Harness(bot, service, fake, cdn, rest)
        finally:
            async_context.reset(token)
            await bot.close()


def png(width: int, height: int, colour: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    """Return a PNG of one colour."""
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="PNG")
    return out.getvalue()


def image_size(data: bytes) -> tuple[int, int]:
    """Return (width, height) of an image."""
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def job_id_of(call: SentCall) -> int:
    """Return the job id carried by the result's buttons."""
    match = re.fullmatch(r"imgbot:job:(\d+):again", call.custom_ids[0])
    assert match, call.custom_ids
    return int(match.group(1))


def is_preview(call: SentCall) -> bool:
    """Say whether an edit of the answer showed a preview (the fake API streams them)."""
    return [f.filename for f in call.files] == ["preview.jpg"]


def result_of(calls: list[SentCall]) -> SentCall:
    """Return the edit that delivered the images."""
    results = [c for c in calls if c.kind == "edit_original" and c.files and not is_preview(c)]
    assert len(results) == 1, [(c.kind, c.json) for c in calls]
    return results[0]


def make_settings(settings: Callable[..., Settings], tmp_path: Path, **extra: Any) -> Settings:
    """Return settings on a SQLite file in tmp_path, with quick progress ticks."""
    return settings(database_url=f"sqlite:///{tmp_path}/imgbot.db", progress_interval=0.05, **extra)


# --- /img -------------------------------------------------------------------------------


async def test_img_with_two_attachments_edits_and_shows_the_cost(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    cdn = FakeCdn()
    first, second = png(640, 480, (200, 0, 0)), png(480, 640, (0, 200, 0))
    atts = [
        p.attachment(901, cdn.add(first, "cat.png"), "cat.png", len(first), 640, 480),
        p.attachment(902, cdn.add(second, "hat.png"), "hat.png", len(second), 480, 640),
    ]
    payload = p.slash(
        "img",
        [
            p.option("prompt", "put the hat on the cat"),
            p.option("image1", "901", 11),
            p.option("image2", "902", 11),
        ],
        attachments=atts,
    )
    async with running_bot(make_settings(settings, tmp_path), cdn) as h:
        calls = await h.feed(payload)

        # Deferred at once, publicly, with "thinking".
        assert calls[0].kind == "callback" and calls[0].json == {"type": 5}
        # Both attachments were downloaded and reached /v1/images/edits as image[] parts.
        assert cdn.fetched[:2] == [atts[0]["url"], atts[1]["url"]]
        sent = fake_api.api_requests[-1]
        assert sent.path == "/v1/images/edits"
        assert [part.name for part in sent.files] == ["image[]", "image[]"]
        assert [part.data for part in sent.files] == [first, second]
        assert sent.fields["prompt"] == "put the hat on the cat"

        result = result_of(calls)
        job = await h.service.ledger.get_job(job_id_of(result))
        assert job is not None and job.status is JobStatus.SUCCEEDED
        assert job.user_key == f"discord:{501}" and job.chat_key == f"discord:{p.GUILD_ID}"
        assert job.reference_count == 2 and job.actual_credits and job.actual_credits > 0
        # The image as a file, the embed with the cost of this request, three buttons.
        assert [f.filename for f in result.files] == [f"imgbot-{job.id}-1.png"]
        description = result.embeds[0]["description"]
        assert format_credits(job.actual_credits, h.service.prices, "en") in description
        assert result.custom_ids == [f"imgbot:job:{job.id}:{a}" for a in ("again", "4k", "vary")]
        # The attachment URLs Discord gave back are kept for "vary".
        assert job.result_refs == tuple(a["url"] for a in result.answer["attachments"])  # type: ignore[index]
        assert not [c for c in calls if c.ephemeral]


async def test_command_language_in_the_prompt_and_options_build_the_size(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    cdn = FakeCdn()
    async with running_bot(make_settings(settings, tmp_path), cdn) as h:
        calls = await h.feed(p.slash("img", [p.option("prompt", "16:9 2K high a cat")]))
        sent = fake_api.api_requests[-1]
        assert sent.path == "/v1/images/generations"
        assert (sent.json or {})["size"] == "2048x1152"
        assert (sent.json or {})["quality"] == "high"
        assert image_size(result_of(calls).files[0].data) == (2048, 1152)

        options = [
            p.option("prompt", "a tall tower"),
            p.option("ratio", "9:16"),
            p.option("resolution", "2K"),
            p.option("quality", "auto"),
            p.option("count", 2, 4),
        ]
        calls = await h.feed(p.slash("img", options, locale="zh-CN"))
        sent = fake_api.api_requests[-1]
        assert (sent.json or {})["size"] == "1152x2048"
        assert (sent.json or {})["n"] == 2 and (sent.json or {})["quality"] == "auto"
        assert (sent.json or {})["prompt"] == "a tall tower"
        result = result_of(calls)
        assert len(result.files) == 2
        job = await h.service.ledger.get_job(job_id_of(result))
        assert job is not None
        # In the user's locale: the cost line is rendered in Chinese.
        zh_cost = format_credits(job.actual_credits or 0, h.service.prices, "zh")
        assert zh_cost in result.embeds[0]["description"]
        assert text("zh", "discord.button.vary") in str(result.json)


async def test_progress_shows_the_queue_position_then_drawing(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    fake_api.delay = 0.3
    config = make_settings(settings, tmp_path, max_jobs_in_flight=1)
    async with running_bot(config, FakeCdn()) as h:
        first = p.slash("img", [p.option("prompt", "a bird")], user_id=601)
        second = p.slash("img", [p.option("prompt", "a fish")], user_id=602)
        # Two people at once with room for one job: one of them waits its turn.
        h.bot._connection.parse_interaction_create(first)  # type: ignore[arg-type]
        h.bot._connection.parse_interaction_create(second)  # type: ignore[arg-type]
        await _settle()
        shown = {
            payload["token"]: [c.content for c in h.discord.of(payload["token"], "edit_original")]
            for payload in (first, second)
        }
        queued = text("en", "progress.queued", position=1)
        waited = [token for token, edits in shown.items() if queued in edits]
        assert len(waited) == 1, shown
        edits = shown[waited[0]]
        drawing = text("en", "progress.started")
        assert any(e and e.startswith(drawing) for e in edits[edits.index(queued) + 1 :])
        for token in shown:
            assert result_of(h.discord.of(token)).files


# --- the message menu and its modal ---------------------------------------------------------


def _text_input_ids(modal: dict[str, Any]) -> list[str]:
    found: list[str] = []

    def walk(component: dict[str, Any]) -> None:
        if component.get("type") == 4:
            found.append(component["custom_id"])
        for child in component.get("components", []):
            walk(child)
        if "component" in component:
            walk(component["component"])

    for component in modal["components"]:
        walk(component)
    return found


async def test_edit_with_imgbot_menu_opens_a_modal_and_edits_the_images(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    cdn = FakeCdn()
    photo, linked = png(600, 400, (90, 90, 0)), png(300, 300, (0, 90, 90))
    photo_url = cdn.add(photo, "photo.png")
    linked_url = cdn.add(linked, "linked.png", host="https://media.discordapp.net")
    target = p.message(
        "look at this",
        attachments=[p.attachment(911, photo_url, "photo.png", len(photo), 600, 400)],
        embeds=[
            {
                "type": "image",
                "url": "https://example.com/linked.png",
                "thumbnail": {"url": "https://example.com/linked.png", "proxy_url": linked_url},
            }
        ],
    )
    async with running_bot(make_settings(settings, tmp_path), cdn) as h:
        calls = await h.feed(p.message_menu("Edit with imgbot", target, locale="en-GB"))
        assert [c.kind for c in calls] == ["callback"]
        assert calls[0].json and calls[0].json["type"] == 9  # a modal
        modal = calls[0].json["data"]
        assert modal["title"] == text("en", "discord.modal.title")
        prompt_id, options_id = _text_input_ids(modal)
        # Nothing is drawn or downloaded until the form comes back.
        assert fake_api.api_requests == [] and cdn.fetched == []

        submit = p.modal_submit(modal, {prompt_id: "make it night", options_id: "16:9 low"})
        calls = await h.feed(submit)
        assert calls[0].json == {"type": 5}
        sent = fake_api.api_requests[-1]
        assert sent.path == "/v1/images/edits"
        assert [part.data for part in sent.files] == [photo, linked]
        assert sent.fields["prompt"] == "make it night"
        assert sent.fields["size"] == "1280x720" and sent.fields["quality"] == "low"
        job = await h.service.ledger.get_job(job_id_of(result_of(calls)))
        assert job is not None and job.reference_count == 2
        assert job.status is JobStatus.SUCCEEDED


async def test_an_edit_form_is_answered_after_a_restart(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    cdn = FakeCdn()
    photo = png(400, 300, (120, 30, 30))
    att = p.attachment(951, cdn.add(photo, "photo.png"), "photo.png", len(photo), 400, 300)
    target = p.message("", attachments=[att])
    config = make_settings(settings, tmp_path)
    async with running_bot(config, cdn) as h:
        (opened,) = await h.feed(p.message_menu("Edit with imgbot", target))
    assert opened.json is not None
    modal = opened.json["data"]
    assert modal["custom_id"] == f"imgbot:edit:{p.CHANNEL_ID}:{target['id']}"
    prompt_id, options_id = _text_input_ids(modal)
    typed = {prompt_id: "make it snow", options_id: "low"}

    # A new process: nothing of the form was kept, the message is fetched again.
    async with running_bot(config, cdn) as h:
        h.rest.messages[(str(p.CHANNEL_ID), target["id"])] = target
        calls = await h.feed(p.modal_submit(modal, typed))
        assert [c.method for c in h.rest.calls] == ["GET"]
        assert result_of(calls).files
        sent = fake_api.api_requests[-1]
        assert [part.data for part in sent.files] == [photo]
        assert sent.fields["prompt"] == "make it snow" and sent.fields["quality"] == "low"

    # Without the Message Content intent Discord returns a user's message without its
    # attachments: the user is told privately, and gets back what they typed.
    async with running_bot(config, cdn) as h:
        h.rest.messages[(str(p.CHANNEL_ID), target["id"])] = {**target, "attachments": []}
        calls = await h.feed(p.modal_submit(modal, typed))
        (only,) = calls
        assert only.kind == "callback" and only.ephemeral
        assert only.content == text("en", "discord.edit_gone", prompt="low make it snow")
    assert len(fake_api.api_requests) == 1


async def test_a_forged_edit_form_reaches_no_other_channel(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    cdn = FakeCdn()
    photo = png(64, 64)
    other_channel = str(p.CHANNEL_ID + 1)
    secret = p.message("", attachments=[p.attachment(961, cdn.add(photo, "s.png"), "s.png", 99, 64, 64)])
    forged_ids = [
        f"imgbot:edit:{other_channel}:{secret['id']}",  # a message of another channel
        f"imgbot:edit:{p.CHANNEL_ID}:{secret['id']}:x",
        "imgbot:edit:../../users/@me:1",
    ]
    async with running_bot(make_settings(settings, tmp_path), cdn) as h:
        h.rest.messages[(other_channel, secret["id"])] = {**secret, "channel_id": other_channel}
        for custom_id in forged_ids:
            modal = {
                "custom_id": custom_id,
                "components": [
                    {"type": 1, "components": [{"type": 4, "custom_id": "prompt"}]}
                ],
            }
            calls = await h.feed(p.modal_submit(modal, {"prompt": "show me"}))
            (only,) = calls
            assert only.ephemeral and only.content == text(
                "en", "discord.edit_gone", prompt="show me"
            )
        assert h.rest.calls == [] and cdn.fetched == [] and fake_api.api_requests == []


async def test_edit_menu_takes_linked_and_forwarded_images_from_discord_only(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    cdn = FakeCdn()
    linked, forwarded, forwarded_link = png(320, 240), png(200, 300), png(256, 256)
    linked_url = cdn.add(linked, "a.png", host="https://images-ext-1.discordapp.net/external/x")
    snap_url = cdn.add(forwarded, "fwd.png")
    snap_link = cdn.add(forwarded_link, "b.png", host="https://images-ext-2.discordapp.net/e/y")
    evil = cdn.add(png(64, 64), "evil.png", host="https://images-ext-1.discordapp.net.evil.example")

    def image_embed(original: str, proxy: str) -> dict[str, Any]:
        return {"type": "image", "url": original, "thumbnail": {"url": original, "proxy_url": proxy}}

    # A link to an image, as Discord shows it: an image embed with its own proxied copy.
    linking = p.message(
        "https://example.com/a.png",
        embeds=[
            image_embed("https://example.com/a.png", linked_url),
            image_embed("https://example.com/evil.png", evil),
        ],
    )
    # A forwarded message: the images are in the snapshot, not on the message itself.
    forward = p.forwarded(
        attachments=[p.attachment(941, snap_url, "fwd.png", len(forwarded), 200, 300)],
        embeds=[image_embed("https://example.com/b.png", snap_link)],
    )
    async with running_bot(make_settings(settings, tmp_path), cdn) as h:
        for target, expected in ((linking, [linked]), (forward, [forwarded, forwarded_link])):
            (opened,) = await h.feed(p.message_menu("Edit with imgbot", target))
            assert opened.json and opened.json["type"] == 9, opened.json
            modal = opened.json["data"]
            prompt_id, _ = _text_input_ids(modal)
            calls = await h.feed(p.modal_submit(modal, {prompt_id: "make it night"}))
            assert result_of(calls).files
            assert [part.data for part in fake_api.api_requests[-1].files] == expected
        # The look-alike host was never asked for anything.
        assert evil not in cdn.fetched


async def test_edit_menu_on_a_message_without_images_says_so_privately(
    settings: Callable[..., Settings], tmp_path: Path
) -> None:
    async with running_bot(make_settings(settings, tmp_path), FakeCdn()) as h:
        calls = await h.feed(p.message_menu("Edit with imgbot", p.message("just words")))
        assert len(calls) == 1 and calls[0].json
        assert calls[0].json["type"] == 4
        assert calls[0].json["data"]["content"] == text("en", "discord.no_images")
        assert calls[0].json["data"]["flags"] & 64


# --- buttons after a restart -------------------------------------------------------------------


async def test_buttons_work_after_a_restart_and_the_presser_pays(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    cdn = FakeCdn()
    config = make_settings(settings, tmp_path)
    async with running_bot(config, cdn) as h:
        result = result_of(await h.feed(p.slash("img", [p.option("prompt", "a red fox")])))
        first_job = job_id_of(result)
        alice_before = (await h.service.ledger.spend_report("discord:501")).all_time
    drawn = result.files[0].data
    shown = result.answer
    assert shown is not None

    # A new process: a new bot and a new service on the same database file.
    async with running_bot(config, cdn) as h:
        vary = f"imgbot:job:{first_job}:vary"
        calls = await h.feed(p.button_press(vary, shown, user_id=502, username="bob"))
        assert calls[0].json == {"type": 5}
        sent = fake_api.api_requests[-1]
        # "vary" uses the delivered image itself, fetched back from Discord's CDN.
        assert sent.path == "/v1/images/edits" and [f.data for f in sent.files] == [drawn]
        assert sent.fields["prompt"] == "a red fox"
        vary_job = await h.service.ledger.get_job(job_id_of(result_of(calls)))
        assert vary_job is not None and vary_job.user_key == "discord:502"
        assert vary_job.status is JobStatus.SUCCEEDED and vary_job.reference_count == 1

        calls = await h.feed(
            p.button_press(f"imgbot:job:{first_job}:again", shown, user_id=502, username="bob")
        )
        assert fake_api.api_requests[-1].path == "/v1/images/generations"
        again_job = await h.service.ledger.get_job(job_id_of(result_of(calls)))
        assert again_job is not None and again_job.user_key == "discord:502"

        bob = await h.service.ledger.spend_report("discord:502")
        alice = await h.service.ledger.spend_report("discord:501")
        assert bob.all_time == (vary_job.actual_credits or 0) + (again_job.actual_credits or 0)
        assert bob.all_time > 0 and alice.all_time == alice_before


async def test_a_button_pressed_twice_in_a_row_starts_one_job(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    async with running_bot(make_settings(settings, tmp_path), FakeCdn()) as h:
        result = result_of(await h.feed(p.slash("img", [p.option("prompt", "a red fox")])))
        again = f"imgbot:job:{job_id_of(result)}:again"
        # A nervous double click: two interactions for one button, a moment apart.
        presses = [p.button_press(again, result.answer) for _ in range(2)]
        for press in presses:
            h.bot._connection.parse_interaction_create(press)  # type: ignore[arg-type]
        await _settle()
        answers = [h.discord.of(press["token"]) for press in presses]
        drawn = [calls for calls in answers if any(c.files for c in calls)]
        told = [calls for calls in answers if not any(c.files for c in calls)]
        assert len(drawn) == 1 and len(told) == 1
        result_of(drawn[0])
        (private,) = told[0]
        assert private.kind == "callback" and private.ephemeral
        assert private.content == text("en", "discord.press_repeated")
        assert len(fake_api.api_requests) == 2  # the first job and one replay: paid once
        # Someone else pressing the same button gets a job of their own.
        result_of(await h.feed(p.button_press(again, result.answer, user_id=502, username="bob")))
        assert len(fake_api.api_requests) == 3


async def test_vary_re_signs_an_expired_attachment_url(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    cdn = FakeCdn()
    async with running_bot(make_settings(settings, tmp_path), cdn) as h:
        result = result_of(await h.feed(p.slash("img", [p.option("prompt", "a boat")])))
        assert result.answer is not None
        (old_url,) = (a["url"] for a in result.answer["attachments"])
        # A day later Discord no longer serves the stored URL, but re-signs it on request.
        data = cdn.files.pop(old_url)
        h.rest.refreshed[old_url] = cdn.add(data, "boat.png")
        job = job_id_of(result)
        calls = await h.feed(p.button_press(f"imgbot:job:{job}:vary", result.answer))
        assert [c.path for c in h.rest.calls] == ["/attachments/refresh-urls"]
        assert h.rest.calls[0].json == {"attachment_urls": [old_url]}
        assert [f.data for f in fake_api.api_requests[-1].files] == [data]
        assert result_of(calls).files


async def test_a_button_of_an_unknown_job_answers_privately(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    async with running_bot(make_settings(settings, tmp_path), FakeCdn()) as h:
        shown = p.message("")
        shown["components"] = [
            {
                "type": 1,
                "components": [
                    {"type": 2, "style": 1, "label": "Again", "custom_id": "imgbot:job:4242:again"}
                ],
            }
        ]
        calls = await h.feed(p.button_press("imgbot:job:4242:again", shown))
        # The first and only answer, private: nothing public was posted first.
        (private,) = calls
        assert private.kind == "callback" and private.json and private.json["type"] == 4
        assert private.ephemeral
        assert private.json["data"]["content"] == text("en", "job.not_found", job_id=4242)
        assert fake_api.api_requests == []


# --- limits and errors -----------------------------------------------------------------------


async def test_an_oversized_result_is_reencoded_to_fit_with_a_note(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    async with running_bot(make_settings(settings, tmp_path), FakeCdn()) as h:
        # Learn how big the originals are, then ask again where one upload holds only one.
        originals = result_of(await h.feed(p.slash("img", [p.option("prompt", "x2 a lake")])))
        limit = max(len(f.data) for f in originals.files)
        assert sum(len(f.data) for f in originals.files) > limit
        calls = await h.feed(p.slash("img", [p.option("prompt", "x2 a lake")], size_limit=limit))
        result = result_of(calls)
        assert [f.filename.rsplit(".", 1)[1] for f in result.files] == ["jpg", "jpg"]
        assert sum(len(f.data) for f in result.files) <= limit
        assert Image.open(io.BytesIO(result.files[0].data)).format == "JPEG"
        note = result.embeds[0]["description"]
        assert "JPEG" in note and text("en", "discord.fit.reencoded").split("{")[0] in note


def test_fit_image_keeps_full_size_when_quality_alone_is_enough() -> None:
    noise = Image.frombytes("RGB", (256, 256), os.urandom(256 * 256 * 3))
    out = io.BytesIO()
    noise.save(out, format="PNG")
    data = out.getvalue()
    fitted = fit_image(data, "image/png", 256, 256, len(data) - 1)
    assert fitted is not None and fitted.reencoded and fitted.mime == "image/jpeg"
    assert (fitted.width, fitted.height) == (256, 256) and len(fitted.data) < len(data)
    untouched = fit_image(data, "image/png", 256, 256, len(data))
    assert untouched is not None and not untouched.reencoded and untouched.data == data


def test_images_of_one_message_share_the_upload_limit() -> None:
    limit = 10 * 1024 * 1024
    assert upload_share(limit, [3_000_000, 3_000_000]) == 3_000_000  # both fit: kept
    share = upload_share(limit, [9_000_000, 9_000_000, 1_000_000])
    assert 3 * share <= limit and share > limit // 3 - 100_000


async def test_an_upstream_error_is_private_in_the_users_language_and_costs_nothing(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    fake_api.inject("server_error")
    async with running_bot(make_settings(settings, tmp_path), FakeCdn()) as h:
        calls = await h.feed(p.slash("img", [p.option("prompt", "a storm")], locale="zh-CN"))
        followups = [c for c in calls if c.kind == "followup"]
        assert len(followups) == 1 and followups[0].ephemeral
        report = await h.service.ledger.spend_report("discord:501")
        (job,) = report.last_jobs
        assert job.status is JobStatus.FAILED and job.charged == 0
        assert job.error_code
        # The message is the core's, in Chinese; the public "thinking" answer is removed.
        assert followups[0].content and followups[0].content != text("en", "error.internal")
        assert re.search(r"[\u4e00-\u9fff]", followups[0].content)
        assert calls[-1].kind == "delete_original"
        assert not [c for c in calls if c.files]


async def test_a_failed_job_is_told_even_when_discord_fails_the_first_tries(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    # The upstream fails the job, and Discord answers 502 to the first two private answers:
    # the runner says it again, and the user hears why.
    fake_api.inject("server_error")
    config = make_settings(settings, tmp_path, delivery_retry_delay=0.01, previews="off")
    async with running_bot(config, FakeCdn()) as h:
        failures = iter(range(2))

        def flaky(kind: str) -> BaseException | None:
            if kind != "followup":
                return None
            return next(
                (http_error(discord.DiscordServerError, 502, "Bad Gateway", "") for _ in failures),
                None,
            )

        h.discord.fail_kinds = flaky  # type: ignore[assignment]
        calls = await h.feed(p.slash("img", [p.option("prompt", "a storm")]))
        (job,) = (await h.service.ledger.spend_report("discord:501")).last_jobs
        assert job.status is JobStatus.FAILED
        told = [c for c in calls if c.kind == "followup"]
        assert len(told) == 3 and told[-1].ephemeral
        assert told[-1].content == text("en", f"upstream.{job.error_code}")


async def test_strangers_in_a_server_get_silence_and_nothing_is_downloaded(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    cdn = FakeCdn()
    ref = png(300, 300)
    att = p.attachment(921, cdn.add(ref, "ref.png"), "ref.png", len(ref), 300, 300)
    config = make_settings(settings, tmp_path, allowed_users=["discord:1"])
    async with running_bot(config, cdn) as h:
        options = [p.option("prompt", "a cat"), p.option("image1", "921", 11)]
        calls = await h.feed(p.slash("img", options, attachments=[att]))
        # Acknowledged privately (Discord demands an answer), then removed: nobody saw a thing.
        assert [c.kind for c in calls] == ["callback", "delete_original"]
        assert calls[0].ephemeral
        assert cdn.fetched == [] and fake_api.api_requests == []


async def test_a_prompt_error_is_answered_privately_without_a_job(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    async with running_bot(make_settings(settings, tmp_path), FakeCdn()) as h:
        options = [p.option("prompt", "16:9 a cat"), p.option("ratio", "1:1")]
        calls = await h.feed(p.slash("img", options))
        # The refusal is the first and only answer, private; nothing public came before it.
        (only,) = calls
        assert only.kind == "callback" and only.json and only.json["type"] == 4
        assert only.ephemeral and "(1:1 and 16:9)" in only.json["data"]["content"]
        assert fake_api.api_requests == []
        assert (await h.service.ledger.spend_report("discord:501")).last_jobs == ()


def _only_private_answer(calls: list[SentCall]) -> str:
    """Return the text of an interaction answered once, privately, before anything else."""
    (only,) = calls
    assert only.kind == "callback" and only.json and only.json["type"] == 4, only.json
    assert only.ephemeral
    return str(only.json["data"]["content"])


async def test_a_limit_refusal_is_the_private_first_answer(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    cdn = FakeCdn()
    ref = png(300, 300)
    att = p.attachment(931, cdn.add(ref, "ref.png"), "ref.png", len(ref), 300, 300)
    config = make_settings(settings, tmp_path, user_daily_limit=100)
    async with running_bot(config, cdn) as h:
        options = [p.option("prompt", "high a cat"), p.option("image1", "931", 11)]
        answer = _only_private_answer(await h.feed(p.slash("img", options, attachments=[att])))
        assert answer.startswith(text("en", "limit.user_daily").split("{")[0])
        assert fake_api.api_requests == []
        assert (await h.service.ledger.spend_report("discord:501")).last_jobs == ()


async def test_a_blocked_user_is_refused_privately_before_anything_public(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    config = make_settings(settings, tmp_path, silent_refusals_in_groups=False)
    async with running_bot(config, FakeCdn()) as h:
        await h.service.ledger.set_blocked("discord:501", True)
        answer = _only_private_answer(await h.feed(p.slash("img", [p.option("prompt", "a cat")])))
        assert answer == text("en", "access.blocked")
        assert fake_api.api_requests == []


async def test_a_result_after_the_token_expired_is_posted_in_the_channel(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    async with running_bot(make_settings(settings, tmp_path), FakeCdn()) as h:
        # Created 14½ minutes ago: the 15-minute token is about to expire.
        calls = await h.feed(p.slash("img", [p.option("prompt", "a late owl")], age=870))
        # No progress edits on a dying token; its last edit says where the result will go,
        # so "thinking…" is not left behind.
        assert [c.kind for c in calls] == ["callback", "edit_original"]
        assert calls[1].content == text("en", "discord.late_pending")
        (post,) = h.rest.calls
        assert post.method == "POST" and post.url.endswith(f"/channels/{p.CHANNEL_ID}/messages")
        assert post.json["content"] == text("en", "discord.late", mention="<@501>")
        assert len(post.files) == 1 and post.json["embeds"]
        (job,) = (await h.service.ledger.spend_report("discord:501")).last_jobs
        assert job.status is JobStatus.SUCCEEDED and len(job.result_refs) == 1


async def test_a_failure_after_the_token_expired_is_told_in_the_channel(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    fake_api.inject("invalid_value")
    async with running_bot(make_settings(settings, tmp_path), FakeCdn()) as h:
        # Three seconds of token left: nothing private can reach the user any more.
        calls = await h.feed(p.slash("img", [p.option("prompt", "a late owl")], age=897))
        assert [c.kind for c in calls] == ["callback", "edit_original"]
        assert calls[1].content == text("en", "discord.late_pending")
        (post,) = h.rest.calls
        assert post.url.endswith(f"/channels/{p.CHANNEL_ID}/messages")
        refusal = text("en", "upstream.rejected", ref="HTTP 400, invalid_value")
        mention = text("en", "discord.late_failed", mention="<@501>")
        assert post.json["content"] == f"{mention}\n{refusal}"


async def test_a_job_whose_acknowledgement_came_too_late_ends_in_the_channel(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    async with running_bot(make_settings(settings, tmp_path), FakeCdn()) as h:
        # Admitted (reserved, perhaps drawing) but Discord no longer takes the defer.
        h.discord.fail_callback_type = 5
        calls = await h.feed(p.slash("img", [p.option("prompt", "a slow owl")]))
        assert [c.kind for c in calls] == ["callback"]
        (post,) = h.rest.calls
        assert post.json["content"] == text("en", "discord.late", mention="<@501>")
        assert len(post.files) == 1
        (job,) = (await h.service.ledger.spend_report("discord:501")).last_jobs
        assert job.status is JobStatus.SUCCEEDED


async def test_a_refused_upload_tells_the_user_their_job_number(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    async with running_bot(make_settings(settings, tmp_path), FakeCdn()) as h:
        h.discord.fail_uploads = lambda route: http_error(
            discord.HTTPException, 413, "Payload Too Large", "Request entity too large"
        )
        calls = await h.feed(p.slash("img", [p.option("prompt", "a hill")]))
        (job,) = (await h.service.ledger.spend_report("discord:501")).last_jobs
        # Drawn and paid for upstream, so it stays charged; a 413 will not pass, so it is
        # undelivered at once (refundable) and the user learns the job to ask about.
        assert job.status is JobStatus.SUCCEEDED and job.stage is JobStage.UNDELIVERED
        assert len(result_uploads(calls)) == 1  # a 4xx is not tried again
        (private,) = [c for c in calls if c.kind == "followup"]
        assert private.ephemeral
        assert private.content == text("en", "job.undelivered", job_id=job.id)


def result_uploads(calls: list[SentCall]) -> list[SentCall]:
    """Return the calls that carried a result's images (not a live preview's)."""
    return [c for c in calls if any(f.filename.startswith("imgbot-") for f in c.files)]


async def test_an_upload_failing_with_5xx_is_tried_again_until_it_goes_through(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    # No live previews: their edits carry files too, and only the result's upload fails here.
    config = make_settings(
        settings, tmp_path, delivery_retry_delay=0.01, delivery_attempts=5, previews="off"
    )
    async with running_bot(config, FakeCdn()) as h:
        failures = iter(range(3))

        def flaky(route: Any) -> BaseException | None:
            return next(
                (http_error(discord.DiscordServerError, 502, "Bad Gateway", "") for _ in failures),
                None,
            )

        h.discord.fail_uploads = flaky  # type: ignore[assignment]
        calls = await h.feed(p.slash("img", [p.option("prompt", "a hill")]))
        (job,) = (await h.service.ledger.spend_report("discord:501")).last_jobs
        assert (job.status, job.stage) == (JobStatus.SUCCEEDED, JobStage.DELIVERED)
        assert len(result_uploads(calls)) == 4  # three 502s, then the one that went through
        assert len(fake_api.api_requests) == 1  # drawn once, charged once
        assert job.result_refs  # the delivered attachment is remembered for "vary"

        # Failing for good: undelivered after DELIVERY_ATTEMPTS tries, user told, admins
        # alerted (in the log at ERROR, and to the admins' chats).
        h.discord.fail_uploads = lambda route: http_error(
            discord.DiscordServerError, 503, "Unavailable", ""
        )
        alerts: list[str] = []

        async def to_admins(message: str) -> None:
            alerts.append(message)

        h.service.alert_senders.append(to_admins)
        calls = await h.feed(p.slash("img", [p.option("prompt", "a dale")]))
        job = (await h.service.ledger.spend_report("discord:501")).last_jobs[0]
        assert job.stage is JobStage.UNDELIVERED and job.status is JobStatus.SUCCEEDED
        assert len(result_uploads(calls)) == 5
        (private,) = [c for c in calls if c.kind == "followup"]
        assert private.content == text("en", "job.undelivered", job_id=job.id)
        assert len(alerts) == 1 and f"job {job.id}" in alerts[0]


async def test_an_unexpected_failure_is_logged_without_the_interaction_token(
    settings: Callable[..., Settings],
    fake_api: FakeImageAPI,
    tmp_path: Path,
    caplog: Any,
) -> None:
    async with running_bot(make_settings(settings, tmp_path), FakeCdn()) as h:
        h.discord.fail_uploads = lambda route: RuntimeError(f"lost connection to {route.url}")
        payload = p.slash("img", [p.option("prompt", "a hill")])
        with caplog.at_level(logging.ERROR, logger="bots.discord.reply"):
            calls = await h.feed(payload)
        (private,) = [c for c in calls if c.kind == "followup"]
        assert private.ephemeral and private.content == text("en", "error.internal")
        assert "lost connection" in caplog.text and "RuntimeError" in caplog.text
        assert payload["token"] not in caplog.text


# --- admin and the small commands -----------------------------------------------------------


async def test_admin_commands_refuse_members_and_serve_server_managers(
    settings: Callable[..., Settings], tmp_path: Path
) -> None:
    config = make_settings(settings, tmp_path, admins=["discord:900"])
    async with running_bot(config, FakeCdn()) as h:
        block = p.subcommand("block", [p.option("target", "<@503>")])
        calls = await h.feed(p.slash("admin", [block], user_id=502, username="bob"))
        (answer,) = [c for c in calls if c.kind == "followup"]
        assert answer.ephemeral and answer.content == text("en", "access.admin_only")
        assert not await h.service.ledger.is_blocked("discord:503", None)

        # A server manager administers only their own server: no global block …
        calls = await h.feed(
            p.slash("admin", [block], user_id=504, username="mod", permissions=p.MANAGE_GUILD)
        )
        (answer,) = [c for c in calls if c.kind == "followup"]
        assert answer.ephemeral and answer.content == text("en", "access.admin_only")
        assert not await h.service.ledger.is_blocked("discord:503", None)
        # … but this server's daily limit, yes; another server's, no.
        own = p.subcommand("chatlimit", [p.option("daily", "5000")])
        calls = await h.feed(
            p.slash("admin", [own], user_id=504, username="mod", permissions=p.MANAGE_GUILD)
        )
        chat = await h.service.ledger.get_chat(f"discord:{p.GUILD_ID}")
        assert chat is not None and chat.daily_limit == 5000
        other = p.subcommand("chatlimit", [p.option("daily", "1"), p.option("server", "77")])
        calls = await h.feed(
            p.slash("admin", [other], user_id=504, username="mod", permissions=p.MANAGE_GUILD)
        )
        (answer,) = [c for c in calls if c.kind == "followup"]
        assert answer.content == text("en", "access.own_chat_only")
        assert await h.service.ledger.get_chat("discord:77") is None

        # A configured admin, in a DM with the bot, may block anyone.
        calls = await h.feed(p.slash("admin", [block], user_id=900, username="boss", guild=False))
        assert await h.service.ledger.is_blocked("discord:503", None)
        unblock = p.subcommand("unblock", [p.option("target", "503")])
        calls = await h.feed(p.slash("admin", [unblock], user_id=900, username="boss", guild=False))
        assert not await h.service.ledger.is_blocked("discord:503", None)


def _private_reply(calls: list[SentCall]) -> str | None:
    (answer,) = [c for c in calls if c.kind == "followup"]
    assert answer.ephemeral
    return answer.content


async def test_operators_and_server_managers_get_what_discord_shows_them(
    settings: Callable[..., Settings], tmp_path: Path
) -> None:
    config = make_settings(settings, tmp_path, admins=["discord:900"], chat_daily_limit=10000)
    chat_key = f"discord:{p.GUILD_ID}"
    manager = {"user_id": 504, "username": "mod", "permissions": p.MANAGE_GUILD}
    async with running_bot(config, FakeCdn()) as h:
        # An operator sees /admin in any server, without any server permission, and it works.
        block = p.subcommand("block", [p.option("target", "<@503>")])
        await h.feed(p.slash("admin", [block], user_id=900, username="boss"))
        assert await h.service.ledger.is_blocked("discord:503", None)

        # A server manager: /server sets this server's limit below the operator's …
        def server(name: str, *options: dict[str, Any]) -> dict[str, Any]:
            return p.slash("server", [p.subcommand(name, list(options))], **manager)

        await h.feed(server("chatlimit", p.option("daily", "5000")))
        chat = await h.service.ledger.get_chat(chat_key)
        assert chat is not None and chat.daily_limit == 5000
        # … but can never lift it: not unlimited, not above CHAT_DAILY_LIMIT.
        ceiling = text("en", "access.chatlimit_ceiling", limit=10000)
        for lifted in ("0", "20000"):
            reply = _private_reply(await h.feed(server("chatlimit", p.option("daily", lifted))))
            assert reply == ceiling, lifted
        chat = await h.service.ledger.get_chat(chat_key)
        assert chat is not None and chat.daily_limit == 5000
        await h.feed(server("chatlimit", p.option("daily", "default")))
        chat = await h.service.ledger.get_chat(chat_key)
        assert chat is not None and chat.daily_limit is None
        reply = _private_reply(await h.feed(server("chats")))
        assert reply == text("en", "admin.nothing") or chat_key in (reply or "")

        # The operator may give the server anything, unlimited included.
        options = [p.option("daily", "0"), p.option("server", str(p.GUILD_ID))]
        unlimited = p.subcommand("chatlimit", options)
        await h.feed(p.slash("admin", [unlimited], user_id=900, username="boss"))
        chat = await h.service.ledger.get_chat(chat_key)
        assert chat is not None and chat.daily_limit == 0


async def test_help_sizes_and_balance_answer_privately(
    settings: Callable[..., Settings], tmp_path: Path
) -> None:
    async with running_bot(make_settings(settings, tmp_path), FakeCdn()) as h:
        for name in ("help", "sizes", "balance"):
            (call,) = await h.feed(p.slash(name, [], locale="zh-CN"))
            assert call.kind == "callback" and call.json and call.json["type"] == 4
            assert call.json["data"]["flags"] & 64 and call.json["data"]["content"]
        sizes = h.discord.calls[-2].json["data"]["content"]  # type: ignore[index]
        assert "2048x1152" in sizes


async def test_commands_are_localised_in_chinese(
    settings: Callable[..., Settings], tmp_path: Path
) -> None:
    async with running_bot(make_settings(settings, tmp_path), FakeCdn()) as h:
        translator = CommandTranslator()
        img = h.bot.tree.get_command("img")
        assert img is not None
        data = await img.get_translated_payload(h.bot.tree, translator)
        assert data["name_localizations"]["zh-CN"] == text("zh", "discord.cmd.img")
        assert data["description_localizations"]["zh-CN"] == text("zh", "discord.cmd.img.desc")
        assert [o["name"] for o in data["options"]][:2] == ["prompt", "ratio"]
        attachment_options = [o for o in data["options"] if o["type"] == 11]
        assert len(attachment_options) == 4
        menu = h.bot.tree.get_command("Edit with imgbot", type=discord.AppCommandType.message)
        assert menu is not None
        menu_data = await menu.get_translated_payload(h.bot.tree, translator)
        assert menu_data["name_localizations"]["zh-CN"] == text("zh", "discord.menu.edit")


async def test_commands_sync_to_the_configured_guild(
    settings: Callable[..., Settings], tmp_path: Path
) -> None:
    config = make_settings(settings, tmp_path, discord_guild_ids=str(p.GUILD_ID))
    async with running_bot(config, FakeCdn()) as h:
        await sync_commands(h.bot, config)
        call, global_call = h.rest.calls
        assert call.method == "PUT"
        assert call.url.endswith(f"/applications/{p.APP_ID}/guilds/{p.GUILD_ID}/commands")
        # The global set is emptied, or a server would list every command twice.
        assert global_call.method == "PUT" and global_call.json == []
        assert global_call.url.endswith(f"/applications/{p.APP_ID}/commands")
        names = {c["name"] for c in call.json}
        assert {"img", "help", "sizes", "balance", "cancel", "admin", "Edit with imgbot"} <= names
        img = next(c for c in call.json if c["name"] == "img")
        assert img["name_localizations"]["zh-CN"] == text("zh", "discord.cmd.img")
        # /admin is for the operators (ADMINS), whom Discord cannot single out: shown to all;
        # /server only to members with Manage Server, and only in servers.
        admin = next(c for c in call.json if c["name"] == "admin")
        assert admin["default_member_permissions"] is None
        assert len(admin["options"]) == len(ADMIN_COMMANDS)
        server = next(c for c in call.json if c["name"] == "server")
        assert int(server["default_member_permissions"]) == p.MANAGE_GUILD
        assert server["contexts"] == [0]
        assert {o["name"] for o in server["options"]} == {"chatlimit", "chats"}


async def test_a_failed_sync_is_logged_and_the_bot_carries_on(
    settings: Callable[..., Settings], tmp_path: Path, caplog: Any
) -> None:
    config = make_settings(settings, tmp_path, discord_guild_ids="42,not-a-guild")
    async with running_bot(config, FakeCdn()) as h:
        h.rest.refuse_commands = 403
        with caplog.at_level(logging.ERROR, logger="bots.discord.app"):
            await sync_commands(h.bot, config)
        assert [c.url.rsplit("/", 3)[-3:] for c in h.rest.calls] == [["guilds", "42", "commands"]]
        assert "not-a-guild" in caplog.text and "applications.commands" in caplog.text


async def test_an_upstream_refusal_shows_our_words_and_no_key(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    # A proxy that quotes keys in its refusals: ours reversed, and someone's without a prefix.
    bare_key = "Xq7TmR2vLp9WzN4bKc6YhJ8sDf3GaE5uQo1iVn0MtZrPyBxC"
    reversed_key = TEST_KEY[::-1]
    fake_api.inject(
        "status", status=400, code="invalid_value", message=f"bad key {reversed_key} {bare_key}"
    )
    async with running_bot(make_settings(settings, tmp_path), FakeCdn()) as h:
        calls = await h.feed(p.slash("img", [p.option("prompt", "a storm")]))
    shown = [str(c.json) for c in calls]
    assert not any(reversed_key in s or bare_key in s or "bad key" in s for s in shown)
    private = [c for c in calls if c.ephemeral]
    expected = text("en", "upstream.rejected", ref="HTTP 400, invalid_value")
    assert private and expected in str(private[-1].json)


async def test_the_count_option_offers_one_to_max_n(
    settings: Callable[..., Settings], tmp_path: Path
) -> None:
    for max_n in (4, 2):
        config = make_settings(settings, tmp_path, max_n=max_n, default_n=1)
        async with running_bot(config, FakeCdn()) as h:
            await sync_commands(h.bot, config)
            (call,) = h.rest.calls
            img = next(c for c in call.json if c["name"] == "img")
            count = next(o for o in img["options"] if o["name"] == "count")
            assert (count["min_value"], count["max_value"]) == (1, max_n)


def test_only_discord_cdn_and_media_proxy_urls_are_fetched() -> None:
    from bots.discord.drawing import is_discord_media

    assert is_discord_media("https://cdn.discordapp.com/attachments/1/2/a.png?ex=1")
    assert is_discord_media("https://media.discordapp.net/attachments/1/2/a.png")
    assert is_discord_media("https://images-ext-1.discordapp.net/external/abc/https/x.png")
    for url in (
        "http://cdn.discordapp.com/attachments/1/2/a.png",  # not https
        "https://cdn.discordapp.com:8443/a.png",
        "https://cdn.discordapp.com@evil.example/a.png",  # the host is evil.example
        "https://user@cdn.discordapp.com/a.png",
        "https://images-ext-1.discordapp.net.evil.example/a.png",
        "https://images-ext-x.discordapp.net/a.png",
        "https://example.com/a.png",
        "file:///etc/passwd",
    ):
        assert not is_discord_media(url), url


def uploads(h: Harness) -> int:
    """Return how many calls carrying files the bot made, to interactions and channels."""
    return len([c for c in h.discord.calls if c.files]) + len([c for c in h.rest.calls if c.files])


async def test_jobs_a_dead_process_left_are_carried_on_where_they_were_asked(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    from core.requester import Requester
    from core.store import JobSpec

    config = make_settings(settings, tmp_path, job_lease=1)
    # A job drawn through the bot records where its answers go.
    async with running_bot(config, FakeCdn()) as h:
        result = result_of(await h.feed(p.slash("img", [p.option("prompt", "low a kite")])))
        job = await h.service.ledger.get_job(job_id_of(result))
        assert job is not None
        origin = json.loads(job.request_json)["origin"]
        assert (origin["via"], origin["channel"], origin["user"]) == (
            "discord", str(p.CHANNEL_ID), "501"
        )
        assert origin["token"] and origin["app"]
        stored = json.loads(job.request_json)

    # What a killed process left: Ann's job was drawing in a server channel, its token
    # still fresh; Li's waited, asked in DMs long ago (its token is dead).
    fresh = {**stored, "origin": {**origin, "token": "tok-ann", "token_at": f"{time.time():.0f}"}}
    old = {**stored, "origin": {"via": "discord", "user": "502", "token": "tok-li",
                                "app": origin["app"], "token_at": "1000"}}
    ann = Requester("discord", "501", str(p.GUILD_ID), "Ann", "en-US", is_group=True)
    li = Requester("discord", "502", None, "Li", "zh-CN")
    async with running_bot(config, FakeCdn()) as h:
        ledger = h.service.ledger
        estimate = job.estimated_credits
        drawing = await ledger.reserve(
            ann, JobSpec("low a kite", job.model, job.size, job.quality, 1, 0, json.dumps(fresh)),
            estimate,
        )
        await ledger.mark_started(drawing)
        waiting = await ledger.reserve(
            li, JobSpec("low a kite", job.model, job.size, job.quality, 1, 0, json.dumps(old)),
            estimate,
        )
        h.bot.start_durable()  # type: ignore[attr-defined]
        carry = asyncio.create_task(h.service.take_over())
        try:
            async with asyncio.timeout(WAIT):
                while uploads(h) < 2:  # noqa: ASYNC110 - polling the fakes' records
                    await asyncio.sleep(0.05)
        finally:
            carry.cancel()
        await _settle()
        # Ann's answer comes in her interaction (a followup on the fresh token).
        (followup,) = [c for c in h.discord.of("tok-ann") if c.files]
        assert followup.kind == "followup" and followup.embeds
        # Li's token is dead: her result comes in her DMs, naming her.
        dm = [c for c in h.rest.calls if c.path == "/channels/{channel_id}/messages"]
        li_result = [c for c in dm if c.files]
        assert len(li_result) == 1
        assert li_result[0].json["content"] == text("zh", "discord.late", mention="<@502>")
        notices = [c.json["content"] for c in dm if not c.files]
        assert f"<@501> {text('en', 'job.resumed', job_id=drawing)}" in notices
        assert f"<@502> {text('zh', 'job.resumed', job_id=waiting)}" in notices
        for job_id, lost in ((drawing, estimate), (waiting, 0)):
            done = await ledger.get_job(job_id)
            assert done is not None and done.stage is JobStage.DELIVERED
            assert done.lost_credits == lost and 0 < done.charged <= estimate


async def test_a_job_left_before_its_interaction_was_acknowledged_ends_in_the_channel(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    from core.requester import Requester
    from core.store import JobSpec

    config = make_settings(settings, tmp_path, job_lease=1)
    async with running_bot(config, FakeCdn()) as h:
        result = result_of(await h.feed(p.slash("img", [p.option("prompt", "low a kite")])))
        job = await h.service.ledger.get_job(job_id_of(result))
        assert job is not None
        stored = json.loads(job.request_json)
    # A process reserved Ann's job and died before Discord had its acknowledgement: her
    # token is young, but Discord knows no webhook for an interaction never answered.
    origin = {**stored["origin"], "token": "tok-gone", "token_at": f"{time.time():.0f}"}
    ann = Requester("discord", "501", str(p.GUILD_ID), "Ann", "en-US", is_group=True)
    async with running_bot(config, FakeCdn()) as h:
        h.discord.unacknowledged.add("tok-gone")
        left = await h.service.ledger.reserve(
            ann,
            JobSpec("low a kite", job.model, job.size, job.quality, 1, 0,
                    json.dumps({**stored, "origin": origin})),
            job.estimated_credits,
        )
        h.bot.start_durable()  # type: ignore[attr-defined]
        carry = asyncio.create_task(h.service.take_over())
        try:
            async with asyncio.timeout(WAIT):
                while not [c for c in h.rest.calls if c.files]:  # noqa: ASYNC110 - polling the fakes
                    await asyncio.sleep(0.05)
        finally:
            carry.cancel()
        await _settle()
        # The followup was refused; the result went to her channel, naming her, once.
        (tried,) = [c for c in h.discord.of("tok-gone") if c.files]
        assert tried.kind == "followup"
        (posted,) = [c for c in h.rest.calls if c.files]
        assert posted.url.endswith(f"/channels/{p.CHANNEL_ID}/messages")
        assert posted.json["content"] == text("en", "discord.late", mention="<@501>")
        done = await h.service.ledger.get_job(left)
        assert done is not None and done.stage is JobStage.DELIVERED
        (kept,) = done.result_refs  # where the image is on Discord, for "vary"
        assert h.cdn.files[kept] == posted.files[0].data


# --- /key: a personal web API key, only ever in an ephemeral answer (issue 15) -----------


def _key_in(answer: str) -> str:
    match = re.search(r"```\n(ik-\S+)\n```", answer)
    assert match, answer
    return match.group(1)


async def test_key_in_a_server_is_ephemeral_and_opens_the_web_api(
    settings: Callable[..., Settings], tmp_path: Path
) -> None:
    config = make_settings(settings, tmp_path, web_public_url="https://img.example.org")
    async with running_bot(config, FakeCdn()) as h:
        calls = await h.feed(p.slash("key", []))
        answer = _only_private_answer(calls)  # the one answer, ephemeral (flag 64)
        assert calls[0].json["data"]["flags"] & 64  # type: ignore[index]
        key = _key_in(answer)
        assert "`https://img.example.org/v1`" in answer and "only this once" in answer
        assert await h.service.api_key_user(key) == "discord:501"
        # Nothing public anywhere: no channel message, no follow-up.
        assert [c for c in h.discord.calls if not c.ephemeral] == []
        assert h.rest.calls == []

        revoked = _only_private_answer(
            await h.feed(p.slash("key", [p.option("action", "revoke")]))
        )
        assert revoked == text("en", "discord.key.revoked", count=1)
        assert await h.service.api_key_user(key) is None


async def test_key_in_a_dm_in_chinese(settings: Callable[..., Settings], tmp_path: Path) -> None:
    async with running_bot(make_settings(settings, tmp_path), FakeCdn()) as h:
        answer = _only_private_answer(
            await h.feed(p.slash("key", [], guild=False, user_id=777, locale="zh-CN"))
        )
        assert "只显示这一次" in answer and "`http://127.0.0.1:8080/v1`" in answer
        assert await h.service.api_key_user(_key_in(answer)) == "discord:777"


async def test_key_is_refused_privately_to_strangers_and_blocked_users(
    settings: Callable[..., Settings], tmp_path: Path
) -> None:
    # Silent refusals in servers do not apply: the answer is ephemeral anyway, and a
    # /key with no answer at all would leave the user guessing.
    config = make_settings(settings, tmp_path, allowed_users=["discord:501", "discord:502"])
    async with running_bot(config, FakeCdn()) as h:
        stranger = _only_private_answer(await h.feed(p.slash("key", [], user_id=503)))
        assert stranger == text("en", "access.not_allowed")
        await h.service.ledger.set_blocked("discord:502", True)
        blocked = _only_private_answer(await h.feed(p.slash("key", [], user_id=502)))
        assert blocked == text("en", "access.blocked")
        assert await h.service.ledger.list_api_keys() == []


async def test_key_is_synced_and_localised(
    settings: Callable[..., Settings], tmp_path: Path
) -> None:
    config = make_settings(settings, tmp_path, discord_guild_ids=str(p.GUILD_ID))
    async with running_bot(config, FakeCdn()) as h:
        await sync_commands(h.bot, config)
        call = h.rest.calls[0]
        key = next(c for c in call.json if c["name"] == "key")
        assert key["name_localizations"]["zh-CN"] == text("zh", "discord.cmd.key")
        [action] = key["options"]
        assert action["name"] == "action" and not action.get("required")
        assert [c["value"] for c in action["choices"]] == ["new", "revoke"]
