"""End-to-end tests of the Telegram adapter: the real PTB Application over real update JSON.

Fakes only at the network seams: `tests.telegram_fake.FakeBotApi` stands in for the Bot API
(every call recorded, files downloadable through getFile), `tests.fake_api` for the image
API (a real HTTP server on 127.0.0.1). The ledger is a real SQLite file in tmp_path.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from telegram import Update
from telegram.ext import Application

from bots.telegram import reply as telegram_reply
from bots.telegram.app import ADAPTER_KEY, build_application, run_telegram
from bots.telegram.flood import FloodLimiter, Timebase
from bots.telegram.reply import Plan, StatusMessage, Where, plan_delivery
from bots.telegram.texts import MESSAGES as TELEGRAM_MESSAGES
from bots.telegram.texts import text
from core.config import Settings
from core.images import GeneratedImage
from core.messages import MESSAGES
from core.pricing import format_credits
from core.reports import render_help
from core.runtime import open_service
from core.service import ImageService, Progress
from core.store import JobRecord
from tests.fake_api import FakeImageAPI
from tests.telegram_fake import (
    CHANNEL_BOT,
    GROUP_ANONYMOUS_BOT,
    TOKEN,
    ApiCall,
    FakeBotApi,
    Updates,
    image_bytes,
)

ADMIN_ID = 42
ANN = Updates.user(1001, "Ann", "en")
BOB = Updates.user(1002, "Bob", "en")
LI = Updates.user(1003, "Li", "zh-hans")
# The flood limiter runs 1000 times faster here (its own tests: tests/test_flood.py).
FAST = Timebase(scale=1000)


@dataclass
class Harness:
    """A running adapter: the Application, the fake Bot API, the service, the image API."""

    app: Application
    api: FakeBotApi
    service: ImageService
    images: FakeImageAPI
    updates: Updates

    async def send(self, raw: dict[str, Any]) -> None:
        """Feed one raw update through the real Application."""
        await self.app.process_update(Update.de_json(raw, self.app.bot))

    async def job(self, job_id: int) -> JobRecord:
        """Return a ledger row."""
        job = await self.service.ledger.get_job(job_id)
        assert job is not None
        return job

    async def jobs(self) -> list[JobRecord]:
        """Return every ledger row, oldest first."""
        found = []
        job_id = 1
        while (job := await self.service.ledger.get_job(job_id)) is not None:
            found.append(job)
            job_id += 1
        return found

    def texts(self) -> list[str]:
        """Return every text the bot sent or edited in, in order."""
        return [str(c.params["text"]) for c in self.api.of("sendMessage", "editMessageText")]


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every end-to-end Telegram test runs on both stores: a SQLite file, and a fresh
    database on the tests' real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/imgbot.db"
    server = request.getfixturevalue("pg_server")
    return str(server.create_database())


@pytest.fixture
def make_settings(
    settings: Callable[..., Settings], database_url: str
) -> Callable[..., Settings]:
    """Return a factory of settings for the Telegram tests (on either store)."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database_url,
            "telegram_bot_token": TOKEN,
            "album_debounce": 0.2,
            "progress_interval": 0.05,
            "admins": f"telegram:{ADMIN_ID}",
            "rate_limit_per_minute": 0,
        }
        values.update(overrides)
        return settings(**values)

    return make


@asynccontextmanager
async def running(
    settings: Settings, api: FakeBotApi, images: FakeImageAPI, updates: Updates
) -> AsyncIterator[Harness]:
    """Open the service and the Application the way the entry point does."""
    async with open_service(settings) as service:
        app = build_application(
            settings,
            service,
            request=api,
            get_updates_request=api,
            rate_limiter=FloodLimiter(timebase=FAST),
        )
        async with app:
            yield Harness(app, api, service, images, updates)
            await app.bot_data[ADAPTER_KEY].drain(5)


@pytest.fixture
async def tg(
    make_settings: Callable[..., Settings], fake_api: FakeImageAPI
) -> AsyncIterator[Harness]:
    """Yield a running adapter with default test settings."""
    async with running(make_settings(), FakeBotApi(), fake_api, Updates()) as harness:
        yield harness


def msg(lang: str, key: str, **params: Any) -> str:
    """Render a message, insisting the key exists (a missing key renders error.internal)."""
    assert key in MESSAGES or key in TELEGRAM_MESSAGES, f"message key {key!r} is missing"
    return text(lang, key, **params)


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def format_of(data: bytes) -> str | None:
    with Image.open(io.BytesIO(data)) as im:
        return im.format


def edit_images(images: FakeImageAPI) -> list[list[tuple[int, int]]]:
    """Return, per /v1/images/edits call, the sizes of its image[] parts in order."""
    return [
        [size_of(p.data) for p in r.files if p.name == "image[]"]
        for r in images.api_requests
        if r.path == "/v1/images/edits"
    ]


def job_id_of(call: ApiCall) -> int:
    keyboard = call.params["reply_markup"]["inline_keyboard"]
    return int(keyboard[0][0]["callback_data"].split(":")[1])


# --- receiving ---------------------------------------------------------------------------
async def test_private_text_command_sends_photo_with_cost(tg: Harness) -> None:
    u = tg.updates
    await tg.send(u.update(u.message(ANN, u.private(ANN), text="/img 16:9 low a cat")))

    [photo] = tg.api.of("sendPhoto")
    assert size_of(photo.files["photo"].data) == (1280, 720)
    assert photo.params["chat_id"] == ANN["id"]
    assert tg.images.api_requests[-1].path == "/v1/images/generations"
    assert tg.images.api_requests[-1].json["size"] == "1280x720"

    [job] = await tg.jobs()
    assert job.status == "succeeded"
    assert job.user_key == f"telegram:{ANN['id']}"
    assert job.chat_key is None
    assert job.actual_credits and job.actual_credits > 0
    cost = format_credits(job.actual_credits, tg.service.prices, "en")
    assert cost in photo.params["caption"]
    assert msg("en", "caption.cost", cost=cost) in photo.params["caption"]
    assert len(photo.params["caption"]) <= 1024
    assert job.result_refs == (photo.result["photo"][-1]["file_id"],)
    keyboard = photo.params["reply_markup"]["inline_keyboard"]
    assert [b["callback_data"] for b in keyboard[0]] == [
        f"j:{job.id}:again",
        f"j:{job.id}:4k",
        f"j:{job.id}:vary",
    ]
    # Working: the chat action, one status message, removed when the result arrived.
    assert {c.params["action"] for c in tg.api.of("sendChatAction")} == {"upload_photo"}
    [status] = [c for c in tg.api.of("sendMessage")]
    assert tg.api.of("deleteMessage")[-1].params["message_id"] == status.result["message_id"]


async def test_supergroup_command_addressed_to_this_bot(tg: Harness) -> None:
    u = tg.updates
    group = u.supergroup()
    command = u.message(ANN, group, text="/img@ThisBot low a red fox")
    await tg.send(u.update(command))

    [photo] = tg.api.of("sendPhoto")
    assert photo.params["chat_id"] == group["id"]
    assert photo.params["reply_parameters"]["message_id"] == command["message_id"]
    [job] = await tg.jobs()
    assert job.chat_key == f"telegram:{group['id']}"
    assert "red fox" in job.command_text


async def test_command_for_another_bot_is_ignored(tg: Harness) -> None:
    u = tg.updates
    group = u.supergroup()
    await tg.send(u.update(u.message(ANN, group, text="/img@OtherBot a cat")))
    photo = u.photo_sizes("p-other", 800, 600)
    await tg.send(u.update(u.message(ANN, group, caption="/img@OtherBot a cat", photo=photo)))

    assert [c.method for c in tg.api.calls if c.method != "getMe"] == []
    assert tg.images.api_requests == []
    assert await tg.jobs() == []


async def test_photo_with_caption_is_the_reference(tg: Harness) -> None:
    u = tg.updates
    tg.api.store("p-cat", image_bytes(1280, 960))
    tg.api.store("p-cat-thumb", image_bytes(90, 67))
    photo = u.photo_sizes("p-cat", 1280, 960)
    await tg.send(
        u.update(u.message(ANN, u.private(ANN), caption="/img low make it night", photo=photo))
    )

    assert edit_images(tg.images) == [[(1280, 960)]]
    assert tg.api.downloads == ["p-cat"]  # the largest size, not the thumbnail
    [job] = await tg.jobs()
    assert job.reference_count == 1 and job.status == "succeeded"
    assert tg.api.of("sendPhoto")


async def test_image_document_with_caption(tg: Harness) -> None:
    u = tg.updates
    tg.api.store("d-logo", image_bytes(1024, 1024, "PNG"))
    doc = u.document("d-logo", "logo.png", "image/png")
    await tg.send(
        u.update(u.message(ANN, u.private(ANN), caption="/img low make it blue", document=doc))
    )

    [edit] = [r for r in tg.images.api_requests if r.path == "/v1/images/edits"]
    [part] = [p for p in edit.files if p.name == "image[]"]
    assert part.content_type == "image/png" and size_of(part.data) == (1024, 1024)
    assert tg.api.of("sendPhoto")


async def test_album_with_caption_on_second_item(tg: Harness) -> None:
    u = tg.updates
    chat = u.private(ANN)
    sizes = [(800, 600), (1024, 768), (640, 640)]
    for i, (w, h) in enumerate(sizes):
        tg.api.store(f"alb-{i}", image_bytes(w, h))
    for i, (w, h) in enumerate(sizes):
        caption = "/img low put them in one picture" if i == 1 else None
        item = u.message(
            ANN,
            chat,
            caption=caption,
            photo=u.photo_sizes(f"alb-{i}", w, h),
            media_group_id="album-1",
        )
        await tg.send(u.update(item))

    await tg.api.wait_for(lambda: tg.api.of("sendPhoto"))
    assert edit_images(tg.images) == [sizes]
    [job] = await tg.jobs()
    assert job.reference_count == 3


async def test_an_album_item_after_the_quiet_period_is_answered_not_dropped(
    tg: Harness,
) -> None:
    u = tg.updates
    chat = u.private(LI)
    for i in range(3):
        tg.api.store(f"late-{i}", image_bytes(400, 300))
    for i in range(2):
        caption = "/img low 把它们放在一起" if i == 0 else None
        item = u.message(
            LI, chat, caption=caption, photo=u.photo_sizes(f"late-{i}", 400, 300),
            media_group_id="album-late",
        )
        await tg.send(u.update(item))
    [photo] = await tg.api.wait_for(lambda: tg.api.of("sendPhoto"))
    # The caption says how many references the job used.
    assert msg("zh", "caption.references", count=2) in photo.params["caption"]

    late = u.message(
        LI, chat, photo=u.photo_sizes("late-2", 400, 300), media_group_id="album-late"
    )
    await tg.send(u.update(late))
    await tg.api.wait_for(lambda: msg("zh", "tg.album_late") in tg.texts())
    answer = [c for c in tg.api.of("sendMessage") if c.params["text"] == msg("zh", "tg.album_late")]
    assert answer[0].params["reply_parameters"]["message_id"] == late["message_id"]
    assert "late-2" not in tg.api.downloads
    [job] = await tg.jobs()
    assert job.reference_count == 2


async def test_an_album_whose_command_item_comes_late_uses_every_item(tg: Harness) -> None:
    u = tg.updates
    chat = u.private(ANN)
    for i in range(2):
        tg.api.store(f"tail-{i}", image_bytes(500, 500))
    first = u.message(ANN, chat, photo=u.photo_sizes("tail-0", 500, 500), media_group_id="tail")
    await tg.send(u.update(first))
    await tg.app.bot_data[ADAPTER_KEY].drain(5)  # the quiet period passes without a command
    second = u.message(
        ANN, chat, caption="/img low both", photo=u.photo_sizes("tail-1", 500, 500),
        media_group_id="tail",
    )
    await tg.send(u.update(second))
    await tg.api.wait_for(lambda: tg.api.of("sendPhoto"))
    [job] = await tg.jobs()
    assert job.reference_count == 2


async def test_album_without_command_is_ignored(tg: Harness) -> None:
    u = tg.updates
    chat = u.private(ANN)
    for i in range(2):
        tg.api.store(f"quiet-{i}", image_bytes(300, 300))
        item = u.message(
            ANN, chat, photo=u.photo_sizes(f"quiet-{i}", 300, 300), media_group_id="album-quiet"
        )
        await tg.send(u.update(item))
    await tg.app.bot_data[ADAPTER_KEY].drain(5)  # the album's quiet period is over
    assert tg.api.downloads == [] and await tg.jobs() == []


async def test_reply_to_a_photo(tg: Harness) -> None:
    u = tg.updates
    chat = u.supergroup()
    tg.api.store("p-bob", image_bytes(1200, 800))
    original = u.message(BOB, chat, photo=u.photo_sizes("p-bob", 1200, 800))
    await tg.send(
        u.update(u.message(ANN, chat, text="/img@ThisBot low add a hat", reply_to=original))
    )

    assert edit_images(tg.images) == [[(1200, 800)]]
    [job] = await tg.jobs()
    assert job.user_key == f"telegram:{ANN['id']}"


async def test_reply_to_own_result_edits_that_result(tg: Harness) -> None:
    u = tg.updates
    chat = u.private(ANN)
    await tg.send(u.update(u.message(ANN, chat, text="/img 16:9 low a lighthouse")))
    [first] = tg.api.of("sendPhoto")

    await tg.send(
        u.update(u.message(ANN, chat, text="/img low make it night", reply_to=first.result))
    )

    assert edit_images(tg.images) == [[(1280, 720)]]
    assert first.result["photo"][-1]["file_id"] in tg.api.downloads
    jobs = await tg.jobs()
    assert [j.status for j in jobs] == ["succeeded", "succeeded"]
    assert jobs[1].reference_count == 1


async def test_a_file_that_is_no_image_is_refused_not_drawn_from_words(tg: Harness) -> None:
    u = tg.updates
    tg.api.store("d-pdf", b"%PDF-1.4 not an image")
    pdf = u.document("d-pdf", "report.pdf", "application/pdf")
    await tg.send(
        u.update(u.message(ANN, u.private(ANN), caption="/img low make it blue", document=pdf))
    )
    await tg.send(
        u.update(u.message(LI, u.private(LI), caption="/img low 改成蓝色", document=pdf))
    )
    original = u.message(BOB, u.supergroup(), document=pdf)
    await tg.send(
        u.update(u.message(BOB, u.supergroup(), text="/img@ThisBot low blue", reply_to=original))
    )

    assert tg.texts() == [
        msg("en", "tg.not_image", name="report.pdf"),
        msg("zh", "tg.not_image", name="report.pdf"),
        msg("en", "tg.not_image", name="report.pdf"),
    ]
    assert tg.images.api_requests == [] and await tg.jobs() == []
    assert tg.api.downloads == []


async def test_a_refinement_keeps_the_options_of_the_result_it_answers(tg: Harness) -> None:
    u = tg.updates
    chat = u.private(ANN)
    await tg.send(u.update(u.message(ANN, chat, text="/img 16:9 low webp a lighthouse")))
    [first] = tg.api.of("sendPhoto")
    await tg.send(u.update(u.message(ANN, chat, text="/img make it night", reply_to=first.result)))
    await tg.send(
        u.update(u.message(ANN, chat, text="/img medium 2K make it snow", reply_to=first.result))
    )

    source, night, snow = await tg.jobs()
    assert (night.quality, night.size) == ("low", "1280x720")  # not auto quality and size
    assert night.estimated_credits < 2000  # auto would be priced as high: about 12,000
    assert '"output_format": "webp"' in night.request_json
    assert (snow.quality, snow.size) == ("medium", "2048x1152")  # the new words win; 16:9 kept
    assert night.command_text.endswith("make it night")
    # "again" on the refinement replays what it drew, from its stored command.
    night_result = tg.api.of("sendPhoto")[1]
    await tg.send(u.callback(ANN, night_result.result, f"j:{night.id}:again"))
    again = (await tg.jobs())[-1]
    assert (again.quality, again.size) == ("low", "1280x720")


async def test_file_over_download_limit_gets_clear_message(tg: Harness) -> None:
    u = tg.updates
    doc = u.document("d-huge", "huge.png", "image/png", size=25 * 1024 * 1024)
    await tg.send(
        u.update(u.message(ANN, u.private(ANN), caption="/img make it blue", document=doc))
    )

    assert tg.api.of("getFile") == []
    assert tg.texts()[-1] == msg("en", "tg.file_too_big", size_mb="25", limit_mb="20")
    assert tg.images.api_requests == []


async def test_self_hosted_api_server_lifts_the_download_limit(
    make_settings: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    settings = make_settings(telegram_api_base_url="http://127.0.0.1:8081")
    api = FakeBotApi()
    api.store("d-big", image_bytes(1024, 1024, "PNG"))
    api.file_sizes["d-big"] = 25 * 1024 * 1024  # what Telegram reports; under our 50 MB cap
    async with running(settings, api, fake_api, Updates()) as tg:
        assert tg.app.bot.base_url == f"http://127.0.0.1:8081/bot{TOKEN}"
        assert tg.app.bot.base_file_url == f"http://127.0.0.1:8081/file/bot{TOKEN}"
        u = tg.updates
        doc = u.document("d-big", "big.png", "image/png", size=25 * 1024 * 1024)
        await tg.send(
            u.update(u.message(ANN, u.private(ANN), caption="/img low sharpen", document=doc))
        )
        assert api.downloads == ["d-big"]
        assert edit_images(fake_api) == [[(1024, 1024)]]


async def test_strangers_are_refused_aloud_in_private_and_silently_in_groups(
    make_settings: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    settings = make_settings(allowed_users=f"telegram:{ANN['id']}")
    async with running(settings, FakeBotApi(), fake_api, Updates()) as tg:
        u = tg.updates
        await tg.send(u.update(u.message(BOB, u.supergroup(), text="/img@ThisBot a cat")))
        assert tg.api.of("sendMessage", "editMessageText", "sendPhoto") == []
        await tg.send(u.update(u.message(BOB, u.private(BOB), text="/img a cat")))
        assert tg.texts() == [msg("en", "access.not_allowed")]
        assert fake_api.api_requests == [] and await tg.jobs() == []


async def test_channels_and_anonymous_admins_are_their_own_users(tg: Harness) -> None:
    # Telegram shows every channel and every anonymous admin as the same placeholder user;
    # the sender_chat is who actually spoke.
    u = tg.updates
    admin = Updates.user(ADMIN_ID, "Boss", "en")
    group, other_group = u.supergroup(), u.supergroup(-1005550000001, "Other")
    channel = u.channel()
    await tg.send(u.update(u.message(admin, u.private(admin), text=f"/block {channel['id']}")))
    await tg.send(
        u.update(u.message(CHANNEL_BOT, group, text="/img@ThisBot low a cat", sender_chat=channel))
    )
    for chat in (group, other_group):
        await tg.send(
            u.update(
                u.message(GROUP_ANONYMOUS_BOT, chat, text="/img@ThisBot low a dog", sender_chat=chat)
            )
        )
    await tg.send(u.update(u.message(CHANNEL_BOT, group, text="/balance", sender_chat=channel)))

    jobs = await tg.jobs()
    assert [j.user_key for j in jobs] == [f"telegram:{group['id']}", f"telegram:{other_group['id']}"]
    assert [j.display_name for j in jobs] == ["Artists", "Other"]
    assert len(tg.api.of("sendPhoto")) == 2  # the blocked channel drew nothing
    report = await tg.service.ledger.spend_report(f"telegram:{group['id']}")
    assert len(report.last_jobs) == 1  # each group's anonymous admins have their own budget


# --- replying ----------------------------------------------------------------------------
async def test_two_images_go_as_an_album(tg: Harness) -> None:
    u = tg.updates
    await tg.send(u.update(u.message(ANN, u.private(ANN), text="/img low x2 two cats")))

    [group] = tg.api.of("sendMediaGroup")
    assert [m["type"] for m in group.params["media"]] == ["photo", "photo"]
    assert group.params["media"][0].get("caption")
    assert not group.params["media"][1].get("caption")
    assert len(group.files) == 2
    buttons = tg.api.of("sendMessage")[-1]
    [job] = await tg.jobs()
    assert job_id_of(buttons) == job.id
    assert len(job.result_refs) == 2
    assert tg.api.of("sendPhoto") == []


async def test_4k_result_comes_as_preview_and_original(tg: Harness) -> None:
    u = tg.updates
    await tg.send(u.update(u.message(ANN, u.private(ANN), text="/img 16:9 4K low a wide valley")))

    [photo] = tg.api.of("sendPhoto")
    [doc] = tg.api.of("sendDocument")
    preview, original = photo.files["photo"].data, doc.files["document"].data
    assert format_of(preview) == "JPEG" and max(size_of(preview)) <= 2560
    assert size_of(original) == (3840, 2160) and format_of(original) == "PNG"
    assert photo.params["caption"] and "reply_markup" in photo.params
    assert doc.params["reply_parameters"]["message_id"] == photo.result["message_id"]
    [job] = await tg.jobs()
    assert job.result_refs == (doc.result["document"]["file_id"],)


async def test_file_option_sends_a_document(tg: Harness) -> None:
    u = tg.updates
    await tg.send(u.update(u.message(ANN, u.private(ANN), text="/img low file a cat")))

    assert tg.api.of("sendPhoto") == []
    [doc] = tg.api.of("sendDocument")
    assert size_of(doc.files["document"].data) == (1024, 1024)
    assert doc.params["caption"] and doc.params["disable_content_type_detection"] is True


async def test_button_after_restart_charges_the_presser(
    make_settings: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    settings, api, updates = make_settings(), FakeBotApi(), Updates()
    api.store("p-ref", image_bytes(1024, 1024))
    async with running(settings, api, fake_api, updates) as tg:
        u = tg.updates
        photo = u.photo_sizes("p-ref", 1024, 1024)
        caption = "/img@ThisBot low a cat in a hat"
        await tg.send(u.update(u.message(ANN, u.supergroup(), caption=caption, photo=photo)))
        [result] = api.of("sendPhoto")
        job_id = job_id_of(result)

    # A new process: new service, new Application, the same database and Telegram.
    async with running(settings, api, fake_api, updates) as tg:
        u = tg.updates
        await tg.send(u.callback(BOB, result.result, f"j:{job_id}:again"))
        await tg.send(u.callback(BOB, result.result, f"j:{job_id}:vary"))

        assert len(api.of("answerCallbackQuery")) == 2
        first, again, vary = await tg.jobs()
        assert first.user_key == f"telegram:{ANN['id']}"
        assert again.user_key == vary.user_key == f"telegram:{BOB['id']}"
        assert again.status == vary.status == "succeeded"
        assert again.actual_credits and vary.actual_credits
        assert again.command_text == first.command_text
        # again: the original reference, fetched by its file_id; vary: the first result.
        assert edit_images(fake_api) == [[(1024, 1024)], [(1024, 1024)], [(1024, 1024)]]
        assert api.downloads.count("p-ref") == 2
        assert first.result_refs[0] in api.downloads
        presses = api.of("sendPhoto")[1:]
        assert [p.params["reply_parameters"]["message_id"] for p in presses] == [
            result.result["message_id"]
        ] * 2


async def test_forged_button_data_serves_no_other_chat(tg: Harness) -> None:
    # A modified client can send any callback data from any message of the bot's.
    u = tg.updates
    tg.api.store("p-secret", image_bytes(1024, 1024))
    photo = u.photo_sizes("p-secret", 1024, 1024)
    await tg.send(
        u.update(u.message(ANN, u.private(ANN), caption="/img low my secret", photo=photo))
    )
    [result] = tg.api.of("sendPhoto")
    job_id = job_id_of(result)
    await tg.send(u.update(u.message(BOB, u.private(BOB), text="/help")))
    bobs_message = tg.api.of("sendMessage")[-1].result
    await tg.send(u.update(u.message(BOB, u.supergroup(), text="/img@ThisBot low a dog")))
    group_result = tg.api.of("sendPhoto")[-1].result
    downloads = list(tg.api.downloads)

    await tg.send(u.callback(BOB, bobs_message, f"j:{job_id}:vary"))
    await tg.send(u.callback(BOB, group_result, f"j:{job_id}:again"))

    answers = tg.api.of("answerCallbackQuery")
    assert [a.params.get("text") for a in answers] == [msg("en", "tg.not_here")] * 2
    assert len(await tg.jobs()) == 2 and len(tg.images.api_requests) == 2
    assert tg.api.downloads == downloads
    assert "secret" not in " ".join(tg.texts())


async def test_a_burst_of_presses_makes_one_job(tg: Harness) -> None:
    u = tg.updates
    await tg.send(u.update(u.message(ANN, u.private(ANN), text="/img low a kite")))
    [result] = tg.api.of("sendPhoto")
    press = f"j:{job_id_of(result)}:again"
    await asyncio.gather(*(tg.send(u.callback(ANN, result.result, press)) for _ in range(3)))

    assert len(await tg.jobs()) == 2 and len(tg.api.of("sendPhoto")) == 2
    answers = [a.params.get("text") for a in tg.api.of("answerCallbackQuery")]
    assert sorted(answers, key=str) == [msg("en", "tg.press_repeated")] * 2 + [None]
    await tg.send(u.callback(ANN, result.result, f"j:{job_id_of(result)}:vary"))
    assert len(await tg.jobs()) == 3  # another button is another job


def confirm_data(call: ApiCall) -> tuple[str, str]:
    """Return the Draw and Cancel callback data of a confirmation question."""
    draw, cancel = call.params["reply_markup"]["inline_keyboard"][0]
    return draw["callback_data"], cancel["callback_data"]


async def test_an_expensive_job_waits_for_its_requesters_draw(
    make_settings: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    settings, api, updates = make_settings(), FakeBotApi(), Updates()
    async with running(settings, api, fake_api, updates) as tg:
        u = tg.updates
        group = u.supergroup()
        # auto quality is priced as high: about 20,000 credits, over CONFIRM_ABOVE (10,000).
        await tg.send(u.update(u.message(ANN, group, text="/img@ThisBot a cat")))
        [question] = api.of("sendMessage")
        assert await tg.jobs() == [] and fake_api.api_requests == []
        _, estimate = tg.service.parse("a cat")
        cost = format_credits(estimate, tg.service.prices, "en")
        assert question.params["text"] == msg("en", "tg.confirm", cost=cost, minutes=10)
        draw, cancel = confirm_data(question)

        await tg.send(u.callback(BOB, question.result, draw))  # not Bob's to answer
        await tg.send(u.callback(ANN, question.result, cancel))
        answers = [a.params.get("text") for a in api.of("answerCallbackQuery")]
        assert answers == [msg("en", "tg.confirm.not_yours"), None]
        assert api.of("editMessageText")[-1].params["text"] == msg("en", "tg.confirm.cancelled")
        await tg.send(u.callback(ANN, question.result, draw))  # answered already
        assert api.of("answerCallbackQuery")[-1].params["text"] == msg("en", "tg.confirm.expired")
        assert await tg.jobs() == []

        await tg.send(u.update(u.message(ANN, group, text="/img@ThisBot a dog")))
        second = api.of("sendMessage")[-1]
        await tg.send(u.callback(ANN, second.result, confirm_data(second)[0]))
        [job] = await tg.jobs()
        assert job.user_key == "telegram:1001" and job.status == "succeeded"
        [photo] = api.of("sendPhoto")
        assert photo.params["reply_parameters"]["message_id"] != second.result["message_id"]
        four_k = photo.params["reply_markup"]["inline_keyboard"][0][1]["text"]
        _, four_k_estimate = tg.service.parse("a dog", force_tier="4K")
        assert four_k == msg("en", "tg.button.4k_cost", cost=f"{round(four_k_estimate):,}")

        await tg.send(u.update(u.message(ANN, group, text="/img@ThisBot a bird")))
        third = api.of("sendMessage")[-1]

    async with running(settings, api, fake_api, updates) as tg:  # a restart forgets questions
        await tg.send(tg.updates.callback(ANN, third.result, confirm_data(third)[0]))
        assert api.of("answerCallbackQuery")[-1].params["text"] == msg("en", "tg.confirm.expired")
        assert len(await tg.jobs()) == 1


async def test_4k_button_redraws_at_4k(tg: Harness) -> None:
    u = tg.updates
    await tg.send(u.update(u.message(ANN, u.private(ANN), text="/img 16:9 low a harbour")))
    [result] = tg.api.of("sendPhoto")
    await tg.send(u.callback(ANN, result.result, f"j:{job_id_of(result)}:4k"))

    assert tg.images.api_requests[-1].json["size"] == "3840x2160"
    assert size_of(tg.api.of("sendDocument")[-1].files["document"].data) == (3840, 2160)


async def test_upstream_error_is_a_clear_reply_and_charges_nothing(tg: Harness) -> None:
    u = tg.updates
    tg.images.inject("server_error")
    await tg.send(u.update(u.message(ANN, u.private(ANN), text="/img low a cat")))

    [job] = await tg.jobs()
    assert job.status == "failed" and job.actual_credits == 0
    assert job.error_code
    said = tg.texts()[-1]
    assert said == msg("en", f"upstream.{job.error_code}")
    assert "Traceback" not in " ".join(tg.texts())
    assert tg.api.of("sendPhoto") == []


async def test_a_failed_job_is_told_even_when_telegram_fails_the_first_tries(
    make_settings: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    # The upstream fails the job while Telegram answers 502 to the status message and to the
    # next two messages: the user still hears why (a later try), not "Drawing…" for ever.
    api = FakeBotApi()
    settings = make_settings(delivery_retry_delay=0.01, previews="off")
    async with running(settings, api, fake_api, Updates()) as tg:
        u = tg.updates
        fake_api.inject("server_error")
        for _ in range(3):
            api.fail_next("sendMessage", 502, "Bad Gateway")
        await tg.send(u.update(u.message(ANN, u.private(ANN), text="/img low a cat")))
        await tg.app.bot_data[ADAPTER_KEY].drain(5)
        [job] = await tg.jobs()
        assert job.status == "failed"
        told = msg("en", f"upstream.{job.error_code}")
        answered = [c for c in api.of("sendMessage", "editMessageText")
                    if c.params.get("text") == told]
        # Failed calls have no result: two refused, then the one Telegram took.
        assert [c.result is not None for c in answered] == [False, False, True]


async def test_prompt_error_is_answered_in_private_chat(tg: Harness) -> None:
    u = tg.updates
    await tg.send(u.update(u.message(ANN, u.private(ANN), text="/img")))
    assert tg.texts(), "a private chat never gets silence"
    assert tg.images.api_requests == []


async def test_help_and_balance_in_chinese(tg: Harness) -> None:
    u = tg.updates
    chat = u.private(LI)
    await tg.send(u.update(u.message(LI, chat, text="/img low 一只猫")))
    await tg.send(u.update(u.message(LI, chat, text="/help")))
    await tg.send(u.update(u.message(LI, chat, text="/balance")))

    caption = tg.api.of("sendPhoto")[0].params["caption"]
    [job] = await tg.jobs()
    assert (
        msg(
            "zh",
            "caption.cost",
            cost=format_credits(job.actual_credits or 0, tg.service.prices, "zh"),
        )
        in caption
    )
    *_, help_reply, balance_reply = tg.api.of("sendMessage")
    assert "help.text" in MESSAGES
    assert help_reply.params["text"] == render_help("zh")[:4096]
    assert msg("zh", "balance.header") in balance_reply.params["text"]
    assert f"#{job.id}" in balance_reply.params["text"]


async def test_group_captions_show_the_cost_only_and_numbers_share_one_style(
    tg: Harness,
) -> None:
    u = tg.updates
    await tg.send(u.update(u.message(ANN, u.supergroup(), text="/img@ThisBot medium a cat")))
    await tg.send(u.update(u.message(ANN, u.private(ANN), text="/img medium a dog")))
    group_caption, private_caption = (c.params["caption"] for c in tg.api.of("sendPhoto"))
    first, second = await tg.jobs()

    today = msg("en", "spend.today", spent="X").split("X")[0]
    assert today not in group_caption  # the group does not see Ann's own spend
    assert today in private_caption
    assert first.actual_credits and first.actual_credits >= 1000
    cost = f"{round(first.actual_credits):,}"
    assert "," in cost and msg("en", "price.credits", credits=cost, yuan="")[:-1] in group_caption
    spent = f"{round(first.actual_credits + (second.actual_credits or 0)):,}"
    assert msg("en", "spend.today", spent=spent) in private_caption


async def test_chinese_reports_have_no_english_left(tg: Harness) -> None:
    u = tg.updates
    li_admin = Updates.user(ADMIN_ID, "老板", "zh-hans")
    await tg.send(u.update(u.message(LI, u.supergroup(), text="/img@ThisBot low 一只猫")))
    for command in ("/top", "/chats", "/sizes"):
        await tg.send(u.update(u.message(li_admin, u.private(li_admin), text=command)))
    top, chats, sizes = tg.texts()[-3:]
    assert "jobs" not in top and "个任务" in top
    assert "jobs" not in chats and "个任务" in chats
    assert "ratio" not in sizes and "比例" in sizes


async def test_sizes_and_start(tg: Harness) -> None:
    u = tg.updates
    await tg.send(u.update(u.message(ANN, u.private(ANN), text="/sizes")))
    await tg.send(u.update(u.message(ANN, u.private(ANN), text="/start")))
    sizes, start = tg.api.of("sendMessage")
    assert sizes.params["parse_mode"] == "HTML" and "3840x2160" in sizes.params["text"]
    assert start.params["text"].startswith(msg("en", "tg.start"))


async def test_admin_commands_are_refused_to_others(tg: Harness) -> None:
    u = tg.updates
    admin = Updates.user(ADMIN_ID, "Boss", "en")
    await tg.send(u.update(u.message(ANN, u.private(ANN), text="/img low a cat")))
    [job] = await tg.jobs()

    await tg.send(u.update(u.message(ANN, u.private(ANN), text=f"/refund {job.id}")))
    assert tg.texts()[-1] == msg("en", "access.admin_only")
    assert (await tg.job(job.id)).status == "succeeded"

    await tg.send(u.update(u.message(admin, u.private(admin), text=f"/refund {job.id}")))
    assert (await tg.job(job.id)).status == "refunded"
    assert f"#{job.id}" in tg.texts()[-1] and job.user_key in tg.texts()[-1]


async def test_admin_ids_are_checked_and_usernames_resolve_once_seen(tg: Harness) -> None:
    u = tg.updates
    admin = Updates.user(ADMIN_ID, "Boss", "en")
    chat = u.private(admin)

    async def admin_says(command: str) -> str:
        await tg.send(u.update(u.message(admin, chat, text=command)))
        return tg.texts()[-1]

    # Unknown or malformed ids are an error, never a new key in the ledger.
    said = await admin_says("/limit @user501 daily=5000")
    assert said == msg("en", "admin.unknown_username", name="@user501")
    assert await tg.service.ledger.get_user("telegram:@user501") is None
    said = await admin_says("/block telegram:@user501")
    assert said == msg("en", "admin.id_not_number", word="telegram:@user501", platform="telegram")
    said = await admin_says("/limit twitter:5 daily=1")
    assert said == msg(
        "en", "admin.id_unknown_platform", word="twitter:5", known="telegram, discord, cli, web"
    )
    # Once the bot has seen @user501, the name resolves to their id.
    user501 = {**Updates.user(501, "Five", "en"), "username": "User501"}
    await tg.send(u.update(u.message(user501, u.private(user501), text="/help")))
    said = await admin_says("/limit @user501 daily=5000")
    assert "telegram:501" in said
    assert (await tg.service.ledger.get_user("telegram:501")).daily_limit == 5000
    # Replying to someone's message aims the command at them.
    group = u.supergroup()
    bobs = u.message(BOB, group, text="hello")
    await tg.send(u.update(bobs))
    await tg.send(u.update(u.message(admin, group, text="/limit daily=700", reply_to=bobs)))
    said = tg.texts()[-1]
    assert f"telegram:{BOB['id']}" in said
    assert (await tg.service.ledger.get_user(f"telegram:{BOB['id']}")).daily_limit == 700


async def test_cancel_without_waiting_jobs(tg: Harness) -> None:
    u = tg.updates
    await tg.send(u.update(u.message(ANN, u.private(ANN), text="/cancel")))
    assert tg.texts() == [msg("en", "cancel.none")]


async def test_slow_job_does_not_block_another_user(tg: Harness) -> None:
    u = tg.updates
    tg.images.inject("slow", seconds=0.6)
    await tg.app.start()
    try:
        await tg.app.update_queue.put(
            Update.de_json(
                u.update(u.message(ANN, u.private(ANN), text="/img low slow cat")), tg.app.bot
            )
        )
        await tg.api.wait_for(lambda: tg.images.api_requests)  # Ann's call took the slow answer
        await tg.app.update_queue.put(
            Update.de_json(
                u.update(u.message(BOB, u.private(BOB), text="/img low fast dog")), tg.app.bot
            )
        )
        await tg.api.wait_for(lambda: len(tg.api.of("sendPhoto")) == 2)
    finally:
        await tg.app.stop()
    first, second = tg.api.of("sendPhoto")
    assert (first.params["chat_id"], second.params["chat_id"]) == (BOB["id"], ANN["id"])
    jobs = await tg.jobs()
    assert {j.user_key: j.status for j in jobs} == {
        f"telegram:{ANN['id']}": "succeeded",
        f"telegram:{BOB['id']}": "succeeded",
    }


async def test_waiting_job_shows_its_place_and_can_be_cancelled(
    make_settings: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    settings = make_settings(max_jobs_in_flight=1)
    async with running(settings, FakeBotApi(), fake_api, Updates()) as tg:
        u = tg.updates
        fake_api.inject("slow", seconds=0.6)
        await tg.app.start()
        try:
            put = tg.app.update_queue.put
            await put(
                Update.de_json(
                    u.update(u.message(ANN, u.private(ANN), text="/img low a")), tg.app.bot
                )
            )
            await tg.api.wait_for(lambda: fake_api.api_requests)
            await put(
                Update.de_json(
                    u.update(u.message(BOB, u.private(BOB), text="/img low b")), tg.app.bot
                )
            )
            queued = msg("en", "progress.queued", position=1)
            await tg.api.wait_for(lambda: queued in tg.texts())
            await put(
                Update.de_json(u.update(u.message(BOB, u.private(BOB), text="/cancel")), tg.app.bot)
            )
            await tg.api.wait_for(lambda: len(tg.api.of("sendPhoto")) == 1)
            await tg.api.wait_for(lambda: msg("en", "job.cancelled") in tg.texts())
        finally:
            await tg.app.stop()
        bob_texts = [
            c.params["text"]
            for c in tg.api.of("sendMessage", "editMessageText")
            if c.params["chat_id"] == BOB["id"]
        ]
        assert bob_texts[0] == queued  # one status message: Bob's place in the queue
        line = msg("en", "cancel.line_waiting", job_id=2, prompt="b")
        assert msg("en", "cancel.done", count=1, jobs=line) in bob_texts
        assert tg.api.of("sendPhoto")[0].params["chat_id"] == ANN["id"]
        ann, bob = await tg.jobs()
        assert ann.status == "succeeded"
        assert bob.status == "failed" and bob.actual_credits == 0


async def test_cancel_stops_the_running_job_and_charges_what_the_upstream_reports(
    tg: Harness,
) -> None:
    u = tg.updates
    tg.images.inject("slow", seconds=1.5)
    put = tg.app.update_queue.put
    await tg.app.start()
    try:
        await put(Update.de_json(u.update(u.message(ANN, u.private(ANN), text="/img low a slow cat")), tg.app.bot))
        await tg.api.wait_for(lambda: tg.images.api_requests)  # the upstream call is on its way
        await put(Update.de_json(u.update(u.message(ANN, u.private(ANN), text="/cancel")), tg.app.bot))
        told = msg("en", "job.cancelled_running", job_id=1)
        await tg.api.wait_for(lambda: told in tg.texts())
        # Told at once, while the upstream call still runs: the job is not settled yet.
        assert (await tg.job(1)).status == "reserved"
        line = msg("en", "cancel.line_running", job_id=1, prompt="a slow cat")
        assert msg("en", "cancel.done", count=1, jobs=line) in tg.texts()
        job = None
        for _ in range(400):  # the call ends in the background, then the job is settled
            job = await tg.job(1)
            if job.status != "reserved":
                break
            await asyncio.sleep(0.01)
        assert job is not None and job.status == "failed" and job.error_code == "cancelled"
        assert job.usage is not None
        assert job.actual_credits == pytest.approx(tg.service.prices.credits(job.usage, job.model))
        assert job.actual_credits > 0
        # The queue slot is free again: the next job draws.
        await put(Update.de_json(u.update(u.message(ANN, u.private(ANN), text="/img low a dog")), tg.app.bot))
        await tg.api.wait_for(lambda: tg.api.of("sendPhoto"))
    finally:
        await tg.app.stop()
    [photo] = tg.api.of("sendPhoto")
    assert job_id_of(photo) == 2  # the cancelled job delivered nothing


async def test_every_waiting_job_gets_its_own_status_with_its_place(tg: Harness) -> None:
    u = tg.updates
    tg.images.inject("slow", seconds=0.4)
    chat = u.private(ANN)
    commands = [u.message(ANN, chat, text=f"/img low job {i}") for i in range(3)]
    await tg.app.start()
    try:
        for command in commands:
            await tg.app.update_queue.put(Update.de_json(u.update(command), tg.app.bot))
        await tg.api.wait_for(lambda: len(tg.api.of("sendPhoto")) == 3, within=15)
    finally:
        await tg.app.stop()

    def first_status(command: dict[str, Any]) -> str:
        replies = [
            c
            for c in tg.api.of("sendMessage")
            if (c.params.get("reply_parameters") or {}).get("message_id") == command["message_id"]
        ]
        assert replies, f"no status message for {command['text']}"
        return str(replies[0].params["text"])

    shown = [first_status(c) for c in commands]
    queued = [msg("en", "progress.queued", position=p) for p in (1, 2)]
    # One job draws at a time per user: the first draws, the others show their places.
    drawing = [t for t in shown if t.startswith(msg("en", "progress.started"))]
    assert len(drawing) == 1 and sorted(t for t in shown if t not in drawing) == queued


async def test_run_telegram_polls_registers_commands_and_stops(
    make_settings: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    settings, api, u = make_settings(), FakeBotApi(), Updates()
    api.pending_updates.append(u.update(u.message(ANN, u.private(ANN), text="/img low a kite")))
    stop = asyncio.Event()
    async with open_service(settings) as service:
        bot = asyncio.create_task(
            run_telegram(
                settings,
                service,
                stop,
                request=api,
                get_updates_request=api,
                rate_limiter=FloodLimiter(timebase=FAST),
            )
        )
        await api.wait_for(lambda: api.of("sendPhoto") or bot.done())
        stop.set()
        await asyncio.wait_for(bot, 10)
        assert bot.exception() is None
        [job] = [j for j in [await service.ledger.get_job(1)] if j]
        assert job.status == "succeeded"
    commands = api.of("setMyCommands")
    languages = [c.params.get("language_code") for c in commands if "scope" not in c.params]
    assert languages == [None, "zh"]
    zh = next(c for c in commands if c.params.get("language_code") == "zh")
    assert [c["command"] for c in zh.params["commands"]][0] == "img"
    assert zh.params["commands"][0]["description"] == msg("zh", "tg.cmd.img")
    admin_scoped = [c for c in commands if "scope" in c.params]
    assert {c.params["scope"]["chat_id"] for c in admin_scoped} == {ADMIN_ID}
    assert any(c["command"] == "refund" for c in admin_scoped[0].params["commands"])


@pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")
async def test_flood_limits_are_waited_out(tg: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    u = tg.updates
    monkeypatch.setattr(telegram_reply, "RETRY_AFTER_CAP", 0.01)  # keep the test fast
    flood = {"parameters": {"retry_after": 1}}
    tg.api.fail_next("sendMessage", 429, "Too Many Requests: retry after 1", **flood)
    tg.api.fail_next("sendPhoto", 429, "Too Many Requests: retry after 1", **flood)
    await tg.send(u.update(u.message(ANN, u.private(ANN), text="/img low a cat")))

    assert [c.result is not None for c in tg.api.of("sendPhoto")] == [False, True]
    [job] = await tg.jobs()
    assert job.status == "succeeded" and len(job.result_refs) == 1


async def test_errors_are_logged_without_the_token(
    tg: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    u = tg.updates
    tg.api.fail_next(
        "sendMessage", 400, f"Bad Request: chat not found (via /bot{TOKEN}/sendMessage)"
    )
    with caplog.at_level(logging.WARNING, logger="bots.telegram.handlers"):
        await tg.send(u.update(u.message(ANN, u.private(ANN), text="/help")))
    assert "chat not found" in caplog.text.lower()
    assert TOKEN not in caplog.text


# --- pieces ------------------------------------------------------------------------------
def _image(width: int, height: int, size: int = 1000) -> GeneratedImage:
    return GeneratedImage(data=b"x" * size, mime="image/png", width=width, height=height)


@pytest.mark.parametrize(
    ("image", "as_file", "policy", "expected"),
    [
        (_image(1024, 1024), False, "auto", Plan("original", False)),
        (_image(3840, 2160), False, "auto", Plan("preview", True)),
        (_image(3840, 2160), False, "never", Plan("original", False)),
        (_image(1024, 1024), False, "always", Plan("original", True)),
        (_image(1024, 1024), True, "auto", Plan(None, True)),
        (_image(1024, 1024, 11 * 1024 * 1024), False, "never", Plan("preview", True)),
        (_image(3000, 140), False, "auto", Plan("preview", True)),  # aspect over 20
    ],
)
def test_plan_delivery(image: GeneratedImage, as_file: bool, policy: Any, expected: Plan) -> None:
    assert (
        plan_delivery(image, as_file=as_file, send_original=policy, transparent=False) == expected
    )


@asynccontextmanager
async def status_in_a_chat() -> AsyncIterator[tuple[StatusMessage, FakeBotApi, list[float]]]:
    """Yield a status message of Ann's chat on a fake Bot API, with its clock in our hand."""
    api = FakeBotApi()
    now = [100.0]
    async with (
        Application.builder().token(TOKEN).request(api).get_updates_request(api).build() as app
    ):
        yield StatusMessage(app.bot, Where(ANN["id"], 7), "en", clock=lambda: now[0]), api, now


async def test_status_message_edits_sparingly() -> None:
    async with status_in_a_chat() as (status, api, now):
        await status.show(Progress("queued", position=2))
        now[0] += 1
        await status.show(Progress("queued", position=1))  # too soon: held back
        assert [c.method for c in api.of("sendMessage", "editMessageText")] == ["sendMessage"]
        now[0] += 3
        await status.show(Progress("started"))
        await status.show(Progress("started"))  # unchanged: no edit
        edits = api.of("editMessageText")
        assert [c.params["text"] for c in edits] == [msg("en", "progress.started")]
        await status.close()
        assert api.of("deleteMessage")[-1].params["message_id"] == status_id(api)


async def test_a_status_showing_a_preview_keeps_saying_which_as_the_clock_ticks() -> None:
    # A tick of the clock after a preview must not caption that preview "Drawing… 3 s" as if
    # none were showing.
    async with status_in_a_chat() as (status, api, now):
        await status.show(Progress("started"))
        now[0] += 5
        preview = GeneratedImage(data=image_bytes(256, 256, "PNG"), mime="image/png",
                                 width=256, height=256)
        await status.show(Progress("partial", elapsed=1, image=preview, index=0))
        assert len(api.of("sendPhoto")) == 1  # the status became the preview
        now[0] += 5
        await status.show(Progress("working", elapsed=6))
        shown = [c.params.get("caption") or c.params.get("text")
                 for c in api.of("sendPhoto", "editMessageCaption", "editMessageText")]
        assert shown[-1] == msg("en", "progress.partial", seconds="6", number=1), shown
        await status.close()


def status_id(api: FakeBotApi) -> int:
    return int(api.of("sendMessage")[0].result["message_id"])


async def test_a_redelivered_update_draws_and_charges_once(
    make_settings: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    # Telegram sends an update again when the process that fetched it died before
    # confirming it; the restarted bot must recognise the message it already handled.
    u = Updates()
    update = u.update(u.message(ANN, u.private(ANN), text="/img low a lantern"))
    async with running(make_settings(), FakeBotApi(), fake_api, u) as first:
        await first.send(update)
        assert len(first.api.of("sendPhoto")) == 1
    async with running(make_settings(), FakeBotApi(), fake_api, u) as second:
        await second.send(update)
        assert second.api.of("sendPhoto") == [] and second.api.of("sendMessage") == []
        [job] = await second.jobs()
        assert job.status == "succeeded"
    assert len(fake_api.api_requests) == 1  # one upstream call, one charge


async def test_jobs_a_dead_process_left_are_carried_on_and_delivered_once(
    make_settings: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    from core.requester import Requester
    from core.service import _request_dict
    from core.store import JobSpec, JobStage

    settings = make_settings(job_lease=1)
    group = -1001234567890
    api, stop = FakeBotApi(), asyncio.Event()
    async with open_service(settings) as service:
        # What a killed process left: Ann's job was drawing (its answer lost with it), Li's
        # still waited in a group; neither is leased by anyone alive.
        request, estimate = service.parse("low a kite")

        def spec(chat: int, reply_to: int, group_chat: bool) -> JobSpec:
            origin = {"via": "telegram", "chat": str(chat), "reply_to": str(reply_to),
                      "thread": "", "group": "1" if group_chat else ""}
            body = {"request": _request_dict(request), "reference_refs": [], "origin": origin}
            return JobSpec("low a kite", request.model, request.size, request.quality, 1, 0,
                           json.dumps(body))

        ann = Requester("telegram", str(ANN["id"]), None, "Ann", "en")
        li = Requester("telegram", str(LI["id"]), str(group), "Li", "zh-hans", is_group=True)
        drawing = await service.ledger.reserve(ann, spec(ANN["id"], 77, False), estimate)
        await service.ledger.mark_started(drawing)
        waiting = await service.ledger.reserve(li, spec(group, 88, True), estimate)

        bot = asyncio.create_task(
            run_telegram(
                settings, service, stop, request=api, get_updates_request=api,
                rate_limiter=FloodLimiter(timebase=FAST),
            )
        )
        alerts: list[str] = []

        async def to_admins(message: str) -> None:
            alerts.append(message)

        service.alert_senders.append(to_admins)
        carry = asyncio.create_task(service.take_over())
        await api.wait_for(lambda: len(api.of("sendPhoto")) >= 2 or bot.done(), within=20)

        async def delivered() -> bool:
            jobs = [await service.ledger.get_job(job_id) for job_id in (drawing, waiting)]
            return all(job is not None and job.stage is JobStage.DELIVERED for job in jobs)

        for _ in range(100):
            if await delivered():
                break
            await asyncio.sleep(0.05)
        jobs = {job_id: await service.ledger.get_job(job_id) for job_id in (drawing, waiting)}
        stop.set()
        await asyncio.wait_for(bot, 10)
        carry.cancel()
    photos = {c.params["chat_id"]: c for c in api.of("sendPhoto")}
    assert set(photos) == {ANN["id"], group}
    # Each answers the message the job came from, in its chat, and says it resumed.
    assert photos[ANN["id"]].params["reply_parameters"]["message_id"] == 77
    assert photos[group].params["reply_parameters"]["message_id"] == 88
    notices = [(c.params["chat_id"], c.params["text"]) for c in api.of("sendMessage")]
    assert (ANN["id"], msg("en", "job.resumed", job_id=drawing)) in notices
    assert (group, msg("zh", "job.resumed", job_id=waiting)) in notices
    ann_job, li_job = jobs[drawing], jobs[waiting]
    assert ann_job is not None and li_job is not None
    for job in (ann_job, li_job):
        assert (job.status, job.stage) == ("succeeded", JobStage.DELIVERED)
        assert 0 < job.charged <= estimate  # charged once, what the upstream reported
    # Ann's first draw died with its process: possibly billed upstream, recorded, not charged.
    assert (ann_job.attempts, ann_job.lost_credits) == (2, estimate)
    assert (li_job.attempts, li_job.lost_credits) == (1, 0)
    # The operator hears that a draw was lost (it may have been billed upstream).
    [lost] = [a for a in alerts if "cut off while drawing" in a]
    assert f"#{drawing}" in lost and f"#{waiting}" not in lost
    assert len(fake_api.api_requests) == 2


# --- /key: a personal web API key, in a private chat only (issue 15) -------------------


async def test_key_in_a_private_chat_opens_the_web_api_as_that_user(
    make_settings: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    settings = make_settings(web_public_url="https://img.example.org/")
    async with running(settings, FakeBotApi(), fake_api, Updates()) as tg:
        u = tg.updates
        await tg.send(u.update(u.message(ANN, u.private(ANN), text="/key")))
        [answer] = tg.api.of("sendMessage")
        assert answer.params["parse_mode"] == "HTML"
        said = str(answer.params["text"])
        key = said.split("<code>", 1)[1].split("</code>", 1)[0]
        assert key.startswith("ik-")
        assert "<code>https://img.example.org/v1</code>" in said
        assert "only this once" in said
        assert await tg.service.api_key_user(key) == f"telegram:{ANN['id']}"
        # Only its hash is kept: the listing never holds the text.
        [record] = await tg.service.ledger.list_api_keys(f"telegram:{ANN['id']}")
        assert key not in repr(record)

        await tg.send(u.update(u.message(ANN, u.private(ANN), text="/key revoke")))
        assert tg.texts()[-1] == msg("en", "tg.key.revoked", count=1)
        assert await tg.service.api_key_user(key) is None
        await tg.send(u.update(u.message(ANN, u.private(ANN), text="/key revoke")))
        assert tg.texts()[-1] == msg("en", "tg.key.none")


async def test_key_in_chinese_names_the_local_address_when_no_public_url(tg: Harness) -> None:
    u = tg.updates
    await tg.send(u.update(u.message(LI, u.private(LI), text="/key")))
    said = tg.texts()[-1]
    assert "只显示这一次" in said
    assert "<code>http://127.0.0.1:8080/v1</code>" in said
    key = said.split("<code>", 1)[1].split("</code>", 1)[0]
    assert await tg.service.api_key_user(key) == f"telegram:{LI['id']}"


async def test_key_in_a_group_says_private_only_and_posts_no_key(tg: Harness) -> None:
    u = tg.updates
    group = u.supergroup()
    await tg.send(u.update(u.message(ANN, group, text="/key@ThisBot")))
    await tg.send(
        u.update(u.message(GROUP_ANONYMOUS_BOT, group, text="/key", sender_chat=group))
    )
    assert tg.texts() == [msg("en", "tg.key.private_only")] * 2
    assert all("ik-" not in t for t in tg.texts())
    assert await tg.service.ledger.list_api_keys() == []


async def test_key_is_refused_to_strangers_and_blocked_users(
    make_settings: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    settings = make_settings(allowed_users=f"telegram:{ANN['id']},telegram:{BOB['id']}")
    async with running(settings, FakeBotApi(), fake_api, Updates()) as tg:
        u = tg.updates
        admin = Updates.user(ADMIN_ID, "Boss", "en")
        await tg.send(u.update(u.message(LI, u.private(LI), text="/key")))
        assert tg.texts()[-1] == msg("zh", "access.not_allowed")
        await tg.send(u.update(u.message(admin, u.private(admin), text=f"/block {BOB['id']}")))
        await tg.send(u.update(u.message(BOB, u.private(BOB), text="/key")))
        assert tg.texts()[-1] == msg("en", "access.blocked")
        assert await tg.service.ledger.list_api_keys() == []
        await tg.send(u.update(u.message(ANN, u.private(ANN), text="/key")))
        assert "ik-" in tg.texts()[-1]


async def test_key_is_in_the_command_list(tg: Harness) -> None:
    from bots.telegram.app import register_commands

    await register_commands(tg.app, tg.service.settings)
    for call in tg.api.of("setMyCommands"):
        names = [c["command"] for c in call.params["commands"]]
        assert "key" in names
    zh = next(c for c in tg.api.of("setMyCommands") if c.params.get("language_code") == "zh")
    assert {"command": "key", "description": msg("zh", "tg.cmd.key")} in zh.params["commands"]


# --- /web: the web page as a Mini App (issue 15) ------------------------------------------


async def test_web_in_a_private_chat_answers_with_a_mini_app_button(
    make_settings: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    settings = make_settings(web_public_url="https://img.example.org/")
    async with running(settings, FakeBotApi(), fake_api, Updates()) as tg:
        u = tg.updates
        await tg.send(u.update(u.message(LI, u.private(LI), text="/web")))
        [answer] = tg.api.of("sendMessage")
        assert answer.params["text"] == msg("zh", "tg.web.open")
        [[button]] = answer.params["reply_markup"]["inline_keyboard"]
        assert button == {"text": msg("zh", "tg.web.button"),
                          "web_app": {"url": "https://img.example.org/"}}


async def test_web_says_what_is_missing_elsewhere(
    make_settings: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    # Telegram opens Mini Apps at https addresses only, and from private chats only.
    for overrides, expected in (({}, "tg.web.needs_https"),
                                ({"web_port": 0, "web_public_url": "https://x.org"}, "tg.web.off")):
        async with running(make_settings(**overrides), FakeBotApi(), fake_api, Updates()) as tg:
            u = tg.updates
            await tg.send(u.update(u.message(ANN, u.private(ANN), text="/web")))
            await tg.send(u.update(u.message(ANN, u.supergroup(), text="/web@ThisBot")))
            assert tg.texts() == [msg("en", expected), msg("en", "tg.web.private_only")]
            assert all("reply_markup" not in c.params for c in tg.api.of("sendMessage"))


async def test_web_is_refused_to_strangers_and_listed_among_the_commands(
    make_settings: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    settings = make_settings(web_public_url="https://img.example.org",
                             allowed_users=f"telegram:{ANN['id']}")
    async with running(settings, FakeBotApi(), fake_api, Updates()) as tg:
        u = tg.updates
        await tg.send(u.update(u.message(BOB, u.private(BOB), text="/web")))
        assert tg.texts() == [msg("en", "access.not_allowed")]
        from bots.telegram.app import register_commands

        await register_commands(tg.app, tg.service.settings)
        zh = next(c for c in tg.api.of("setMyCommands") if c.params.get("language_code") == "zh")
        assert {"command": "web", "description": msg("zh", "tg.cmd.web")} in zh.params["commands"]
