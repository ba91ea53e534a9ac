"""Hostile and broken input: any text, file or update gets a request or a clear message.

Decisions this file pins down (the parser's side is also in `core.prompt`'s docstring):

- Text: line breaks become `\\n`, other whitespace controls a space; every other control
  character (NUL, ESC, DEL, C1) and any lone surrogate is dropped — never refused, since
  they come from copy-paste, and never sent: the API and SQLite get valid UTF-8 only.
  Invisible format characters (zero-width space/joiners, bidi marks, BOM) are ignored
  inside option words and trimmed from the ends of the prompt, but kept inside it (emoji
  ZWJ sequences, right-to-left text). A prompt with nothing visible is empty. A combining
  mark makes an option word text (`16:9\\u0301` starts the prompt). Huge numbers are refused
  quoting what was typed (a ratio's two huge sides are scaled together, so 2:1 stays 2:1);
  a quoted word is cut at 200 characters so every message fits a chat message. A command
  over 4 × 32,000 characters is refused before parsing. Admin arguments (job ids, amounts,
  keys) that are not plain ASCII numbers or `platform:id` get the usage message.
- References: refused ones (not an image, truncated, a bomb, too big, too many) raise a
  clear `BadReferenceError` before anything is reserved, called or counted against the
  rate limit; odd but real images (animated, CMYK, 16-bit) are converted to PNG.
- Telegram: edited messages are ignored (an edit must not draw — and charge — again; the
  bot does not even subscribe to them), as are channel posts, messages without a sender
  and messages without text. A forwarded album with /img draws for the forwarder. Every
  callback query is answered; a button of a missing job says so; a button of someone
  else's job draws for, and charges, the presser.
- Discord: a button of a missing job says so privately; a custom id that is not ours is
  left to discord.py (no answer: Discord itself shows "interaction failed"); a missing
  locale means English; a DM has no member and no server.
Nowhere a stack trace to the user, nowhere an ERROR log for any of these.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image

from bots.telegram.app import ADAPTER_KEY
from core.admin import run_admin
from core.config import Settings
from core.errors import BadReferenceError, ImgbotError, PromptError
from core.messages import MESSAGES, text
from core.prompt import (
    MAX_COMMAND_CHARS,
    MAX_PROMPT_CHARS,
    ImageRequest,
    PromptDefaults,
    clean_text,
    parse_command,
)
from core.requester import Requester
from core.service import ImageService, IncomingImage
from tests import discord_payloads as p
from tests.discord_fake import FakeCdn
from tests.fake_api import FakeImageAPI
from tests.telegram_fake import TOKEN, FakeBotApi, Updates, image_bytes
from tests.test_discord import job_id_of, result_of, running_bot
from tests.test_references import encode, frames, noise, png_header_only
from tests.test_telegram import Harness, running

D = PromptDefaults()
MB = 1_000_000
ALICE = Requester("telegram", "1", None, "Alice", "en")

# What must never reach the API or the ledger: C0 controls but tab and newline, CR, DEL,
# C1, lone surrogates.
FORBIDDEN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
INVISIBLE = "\u00ad\u180e\u200b\u200c\u200d\u200e\u200f\u202a\u202e\u2060\u2066\u2069\ufeff"


def assert_sane_prompt(prompt: str) -> None:
    """The prompt is what the API may get: valid UTF-8, no controls, visible, trimmed."""
    assert not FORBIDDEN.search(prompt), ascii(prompt)
    json.dumps(prompt, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    assert prompt and prompt == prompt.strip()
    assert prompt[0] not in INVISIBLE and prompt[-1] not in INVISIBLE
    assert any(not ch.isspace() and ch not in INVISIBLE for ch in prompt)
    assert len(prompt) <= MAX_PROMPT_CHARS


def assert_clear(err: ImgbotError, *shown: str) -> None:
    """The message exists in both languages, has every placeholder filled, quotes `shown`."""
    assert err.key in MESSAGES, err.key
    for lang in ("en", "zh"):
        message = err.user_message(lang)
        assert message and "Traceback" not in message
        # Every placeholder filled: text() hands back the bare template when one is missing.
        # (Looking for "{" in the message would trip over a "{" the user typed.)
        template = MESSAGES[err.key][lang]
        assert "{" not in template or message != template
        for part in shown:
            assert part in message


# --- the command language ------------------------------------------------------------------


ENGLAND = "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"
FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467"


@pytest.mark.parametrize(
    ("command", "prompt", "size"),
    [
        # Zero-width and bidi characters inside option words do not hide the option.
        ("16:9\u200b a cat", "a cat", "1280x720"),
        ("\u200b16:9 a cat", "a cat", "1280x720"),
        ("\ufeff16:9 2K a cat", "a cat", "2048x1152"),
        ("16\u200d:9 2\u200cK a cat", "a cat", "2048x1152"),
        ("--ar\u200b 16:9\u2060 a cat", "a cat", "1280x720"),
        ("\u200e16:9\u200f a cat", "a cat", "1280x720"),
        # Control characters are dropped or become plain whitespace.
        ("a\x00 cat", "a cat", "1024x1024"),
        ("a cat\x1b[31m in red\x07\x7f", "a cat[31m in red", "1024x1024"),
        ("line one\r\nline two\rline three", "line one\nline two\nline three", "1024x1024"),
        ("tabs\tstay", "tabs\tstay", "1024x1024"),
        ("a\x0bcat\x0cin\x1fa\x85hat", "a cat in a hat", "1024x1024"),
        ("a \ud800cat\udfff", "a cat", "1024x1024"),
        # Right-to-left text, emoji sequences, combining marks and tags are kept as written.
        ("16:9 \u05e9\u05dc\u05d5\u05dd \u200f\u05e2\u05d5\u05dc\u05dd", "\u05e9\u05dc\u05d5\u05dd \u200f\u05e2\u05d5\u05dc\u05dd", "1280x720"),
        ("\u202eevil\u202c", "evil", "1024x1024"),
        (f"a {FAMILY} family", f"a {FAMILY} family", "1024x1024"),
        (f"the flag {ENGLAND}", f"the flag {ENGLAND}", "1024x1024"),
        ("caf\u0065\u0301 au lait", "caf\u0065\u0301 au lait", "1024x1024"),
        ("\U0001f431\ufe0f cat", "\U0001f431\ufe0f cat", "1024x1024"),
        # A combining mark makes an option word text: it starts the prompt.
        ("16:9\u0301 a cat", "16:9\u0301 a cat", "1024x1024"),
        # The longest prompt there may be, in astral characters.
        ("\U0001f431" * MAX_PROMPT_CHARS, "\U0001f431" * MAX_PROMPT_CHARS, "1024x1024"),
    ],
)  # fmt: skip
def test_odd_characters_give_a_sane_request(command: str, prompt: str, size: str) -> None:
    request = parse_command(command, D)
    assert request.prompt == prompt
    assert request.size == size
    assert_sane_prompt(request.prompt)


@pytest.mark.parametrize(
    ("command", "key", "shown"),
    [
        ("x99999999999999999999 a cat", "prompt.count_range", "x99999999999999999999"),
        ("--n 99999999999999999999 a cat", "prompt.count_range", "99999999999999999999"),
        ("n=00000000000000000002000 a cat", "prompt.count_range", "n=00000000000000000002000"),
        ("99999999999x1 a cat", "prompt.size_edge", "99999999999x1"),
        ("1x99999999999 a cat", "prompt.size_edge", "1x99999999999"),
        ("99999999999999999999x99999999999999999999 a cat", "prompt.size_edge", "99999999999999999999x99999999999999999999"),
        ("99999999999:1 a cat", "prompt.ratio_too_wide", "99999999999:1"),
        ("0:99999999999 a cat", "prompt.ratio_invalid", "0:99999999999"),
        ("1:" + "9" * 5000 + " a cat", "prompt.ratio_too_wide", "1:999"),
        ("--" + "z" * 4000 + " a cat", "prompt.unknown_flag", "--zzz"),
        ("\x00\x01\x02\x1b", "prompt.empty", ""),
        ("16:9 \u200b\u200c \ufeff\u2060", "prompt.empty", ""),
        ("\u0301\u0302", "prompt.empty", ""),
        ("\ud800 \udfff", "prompt.empty", ""),
        ("a" * (MAX_PROMPT_CHARS + 1), "prompt.too_long", "32,001"),
        ("\U0001f431" * (MAX_PROMPT_CHARS + 1), "prompt.too_long", "32,001"),
        ("a " * MAX_COMMAND_CHARS, "prompt.too_long", "32,000"),
    ],
)  # fmt: skip
def test_hostile_commands_are_refused_clearly(command: str, key: str, shown: str) -> None:
    with pytest.raises(PromptError) as caught:
        parse_command(command, D)
    assert caught.value.key == key
    assert_clear(caught.value, shown)


@pytest.mark.parametrize(
    ("command", "same_as"),
    [
        # Huge sides are scaled down together: the shape survives, 2:1 stays 2:1.
        ("--ar 99999999999999999999:50000000000000000000 a cat", "2:1 a cat"),
        ("00000000000016:00000000000009 a cat", "16:9 a cat"),
        ("1600000000000:900000000000 a cat", "16:9 a cat"),
    ],
)
def test_huge_ratios_keep_their_shape(command: str, same_as: str) -> None:
    assert parse_command(command, D).size == parse_command(same_as, D).size


def test_a_quoted_word_is_clipped_so_the_message_fits_a_chat_message() -> None:
    with pytest.raises(PromptError) as caught:
        parse_command("--q " + "h" * 4000 + " a cat", D)
    for lang in ("en", "zh"):
        message = caught.value.user_message(lang)
        assert len(message) < 1000 and "hhh…" in message


def test_a_pasted_novel_is_refused_before_any_parsing() -> None:
    # Five million words would take seconds to tokenise; the cap refuses them at once.
    with pytest.raises(PromptError) as caught:
        parse_command("16:9 " + "word " * 1_000_000, D)
    assert caught.value.key == "prompt.too_long"
    assert caught.value.params["length"] == "5,000,005"


def test_clean_text_is_idempotent_and_keeps_what_is_visible() -> None:
    dirty = "a\x00b\r\nc\u200bd\ud800e\x85f\tg"
    once = clean_text(dirty)
    assert once == "ab\nc\u200bde f\tg"
    assert clean_text(once) == once


SPECIALS = [
    "\x00", "\x07", "\x1b", "\x7f", "\x85", "\x9f", "\r", "\r\n", "\t", "\x0b", "\u2028",
    "\u200b", "\u200c", "\u200d", "\u200e", "\u200f", "\u202e", "\u2066", "\ufeff", "\u00ad",
    "\ud800", "\udfff", "\udbff", "\u0301", "\ufe0f", FAMILY, ENGLAND, "\U000e0001",
    "\uffff", "\U0010ffff", "\u05e9", "\u0627", "\u3000", "\uff1a", "\uff12\uff2b",
]  # fmt: skip
WORDS = [
    "16:9", "16：9", "auto", "2K", "4k", "high", "低", "x2", "×3", "n=2", "1536x1024",
    "99999999999x1", "x99999999999999999999", "--ar", "--q", "--n", "--", "--size", "—ar",
    "gpt-image-1.5", "png", "transparent", "file", "/img", "/img@Bot", "cat", "猫",
]  # fmt: skip
ANY_CHAR = st.characters(exclude_categories=())  # every code point, surrogates included


@st.composite
def hostile_commands(draw: st.DrawFn) -> str:
    pieces = draw(
        st.lists(
            st.sampled_from(WORDS) | st.sampled_from(SPECIALS) | st.text(ANY_CHAR, max_size=6),
            max_size=12,
        )
    )
    gaps = draw(st.lists(st.sampled_from(["", " ", "\n", "\u200b"]), min_size=len(pieces)))
    return "".join(piece + gap for piece, gap in zip(pieces, gaps, strict=False))


@hypothesis_settings(max_examples=300, deadline=None)
@given(hostile_commands() | st.text(ANY_CHAR, max_size=80), st.booleans())
def test_fuzz_mixed_unicode_gives_a_sane_request_or_a_clear_error(
    command: str, has_references: bool
) -> None:
    try:
        request = parse_command(command, D, has_references=has_references)
    except PromptError as err:
        assert_clear(err)
        for value in err.params.values():  # what a message quotes is sendable too
            str(value).encode("utf-8")
        return
    assert isinstance(request, ImageRequest)
    assert_sane_prompt(request.prompt)
    assert 1 <= request.n <= D.max_n


BASES = ["16:9 2K high x2 png a cat", "--ar 3:2 --q low --n 3 a dog", "auto 4K 中 n=2 一只猫"]


@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(BASES), st.data())
def test_fuzz_invisible_characters_never_change_what_options_mean(base: str, data: Any) -> None:
    words = base.split(" ")
    prompt_from = next(i for i, w in enumerate(words) if w in ("a", "一只猫"))
    dirty = []
    for index, word in enumerate(words):
        if index < prompt_from:
            spots = data.draw(st.lists(st.integers(0, len(word)), max_size=3))
            for spot in sorted(spots, reverse=True):
                word = word[:spot] + data.draw(st.sampled_from(INVISIBLE)) + word[spot:]
        dirty.append(word)
    clean, noisy = parse_command(base, D), parse_command(" ".join(dirty), D)
    assert noisy == clean


# --- references through the whole pipeline --------------------------------------------------


@pytest.fixture
def make_service(make_service: Callable[..., Any]) -> Callable[..., Any]:
    """Services allowing one request a minute: a refusal that counted would fail the next draw."""

    def make(**overrides: Any) -> Any:
        return make_service(**{"rate_limit_per_minute": 1, **overrides})

    return make


@pytest.fixture
async def service(make_service: Callable[..., Any]) -> AsyncIterator[ImageService]:
    async with make_service() as svc:
        yield svc


@functools.cache
def big_photo() -> bytes:
    """A 30 MB PNG photo (3200x3200 noise, stored without compression)."""
    im = Image.frombytes("RGB", (3200, 3200), os.urandom(3200 * 3200 * 3))
    return encode(im, "PNG", compress_level=0)


def truncated_jpeg() -> bytes:
    data = encode(noise((256, 256)), "JPEG")
    return data[: len(data) // 2]


def tiny_png() -> bytes:
    return encode(Image.new("RGB", (16, 16), (1, 2, 3)), "PNG")


REFUSED: list[tuple[str, Callable[[], list[IncomingImage]], str, dict[str, Any]]] = [
    ("pdf renamed png", lambda: [IncomingImage(b"%PDF-1.7\n%\xe2\xe3", "cat.png")], "ref.not_image", {}),
    ("html renamed png", lambda: [IncomingImage(b"<html><script>x</script>", "cat.png")], "ref.not_image", {}),
    ("empty file", lambda: [IncomingImage(b"", "cat.png")], "ref.not_image", {}),
    ("truncated jpeg", lambda: [IncomingImage(truncated_jpeg(), "photo.jpg")], "ref.corrupt", {}),
    ("decompression bomb", lambda: [IncomingImage(png_header_only(30000, 30000), "bomb.png")], "ref.too_many_pixels", {}),
    ("60 MP under Pillow's radar", lambda: [IncomingImage(png_header_only(8000, 7500), "big.png")], "ref.too_many_pixels", {}),
    ("seventeen images", lambda: [IncomingImage(tiny_png(), f"{i}.png") for i in range(17)], "ref.too_many", {}),
    ("30 MB photo over a 25 MB cap", lambda: [IncomingImage(big_photo(), "huge.png")], "ref.too_big", {"max_reference_bytes": 25 * MB}),
    ("good then bad", lambda: [IncomingImage(tiny_png(), "ok.png"), IncomingImage(truncated_jpeg(), "bad.jpg")], "ref.corrupt", {}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("files", "key", "overrides"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED]
)
async def test_a_refused_reference_calls_nothing_books_nothing_counts_nothing(
    make_service: Callable[..., Any],
    fake_api: FakeImageAPI,
    files: Callable[[], list[IncomingImage]],
    key: str,
    overrides: dict[str, Any],
) -> None:
    async with make_service(**overrides) as service:
        with pytest.raises(BadReferenceError) as caught:
            await service.draw(ALICE, "low put them together", files())
        assert caught.value.key == key
        assert_clear(caught.value)
        assert fake_api.api_requests == []
        assert await service.ledger.get_job(1) is None
        assert (await service.ledger.spend_report(ALICE.user_key)).today == 0
        # The refusal did not use up the user's one request of this minute.
        outcome = await service.draw(ALICE, "low a cat")
        assert outcome.job_id == 1 and len(fake_api.api_requests) == 1


CONVERTED: list[tuple[str, Callable[[], bytes], str, tuple[int, int]]] = [
    ("animated gif", lambda: frames("GIF"), "dance.gif", (40, 30)),
    ("animated webp", lambda: frames("WEBP"), "loop.webp", (40, 30)),
    ("cmyk jpeg", lambda: encode(Image.new("CMYK", (48, 32), (0, 255, 255, 0)), "JPEG"), "print.jpg", (48, 32)),
    ("16-bit png", lambda: encode(Image.new("I;16", (32, 48), 40000), "PNG"), "depth.png", (32, 48)),
    ("png with a gif's name", lambda: frames("GIF"), "photo.png", (40, 30)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "name", "size"), [c[1:] for c in CONVERTED], ids=[c[0] for c in CONVERTED]
)
async def test_odd_real_images_are_converted_and_drawn(
    service: ImageService,
    fake_api: FakeImageAPI,
    make: Callable[[], bytes],
    name: str,
    size: tuple[int, int],
) -> None:
    outcome = await service.draw(ALICE, "low make it blue", [IncomingImage(make(), name)])
    assert outcome.reference_count == 1
    [sent] = fake_api.api_requests
    [part] = sent.files
    assert sent.path == "/v1/images/edits" and part.content_type == "image/png"
    assert part.filename is not None and part.filename.endswith(".png")
    with Image.open(io.BytesIO(part.data)) as im:
        assert im.format == "PNG" and im.mode in ("RGB", "RGBA", "L")
        assert im.size == size and not getattr(im, "is_animated", False)
    job = await service.ledger.get_job(outcome.job_id)
    assert job is not None and job.status == "succeeded" and job.reference_count == 1


async def test_a_30_mb_photo_under_the_cap_goes_up_unchanged(
    service: ImageService, fake_api: FakeImageAPI
) -> None:
    photo = big_photo()
    assert len(photo) > 30 * MB
    outcome = await service.draw(ALICE, "low sharpen it", [IncomingImage(photo, "huge.png")])
    [part] = fake_api.api_requests[0].files
    assert part.data == photo and part.content_type == "image/png"
    assert (await service.ledger.get_job(outcome.job_id)) is not None


async def test_hostile_text_reaches_the_api_and_the_ledger_clean(
    service: ImageService, fake_api: FakeImageAPI
) -> None:
    hebrew = "\u05e9\u05dc\u05d5\u05dd"
    command = f"16:9\u200b low\u200b a\x00 cat\ud800 {hebrew}\u200f {FAMILY}\x1b\u200b"
    who = Requester("telegram", "7", "-100", "Eve\ud800\x00", "en", is_group=True)
    outcome = await service.draw(who, command)
    sent = fake_api.api_requests[0].json or {}
    assert sent["prompt"] == f"a cat {hebrew}\u200f {FAMILY}"
    assert (sent["size"], sent["quality"]) == ("1280x720", "low")
    job = await service.ledger.get_job(outcome.job_id)
    assert job is not None and job.command_text == clean_text(command)
    assert not FORBIDDEN.search(job.command_text)
    user = await service.ledger.get_user(who.user_key)
    assert user is not None and user.display_name == "Eve"


# --- admin commands with hostile arguments ---------------------------------------------------

ROOT = Requester("cli", "root", None, "root", "en", is_admin=True)


@pytest.mark.parametrize(
    ("name", "args", "key"),
    [
        ("refund", ["²"], "admin.usage"),  # "²".isdigit() is true, int("²") raises
        ("refund", ["١٢"], "admin.usage"),
        ("refund", ["9" * 5000], "admin.usage"),  # int() of 5,000 digits raises
        ("refund", ["9" * 19], "job.not_found"),  # past SQLite's 64 bits
        ("refund", ["#0"], "job.not_found"),
        ("limit", ["telegram:1", "daily=nan"], "admin.bad_amount"),
        ("limit", ["telegram:1", "monthly=inf"], "admin.bad_amount"),
        ("limit", ["telegram:1", "daily=1e999"], "admin.bad_amount"),
        ("limit", ["telegram:1", "daily=-0.5"], "admin.bad_amount"),
        ("chatlimit", ["telegram:-1", "daily=NaN"], "admin.bad_amount"),
        ("block", [":"], "admin.id_unknown_platform"),
        ("block", ["telegram:"], "admin.id_not_number"),
        ("unblock", [":42"], "admin.id_unknown_platform"),
        ("block", ["telegram:@eve"], "admin.id_not_number"),
        ("block", ["@eve"], "admin.unknown_username"),
        ("top", ["9" * 5000], "admin.usage"),
        ("chats", ["-1"], "admin.usage"),
        ("limit", [], "admin.usage"),
        ("nonsense", [], "admin.usage"),
    ],
)
async def test_hostile_admin_arguments_get_a_clear_answer(
    service: ImageService, name: str, args: list[str], key: str
) -> None:
    with pytest.raises(ImgbotError) as caught:
        await run_admin(service, ROOT, name, args)
    assert caught.value.key == key
    assert_clear(caught.value)
    user = await service.ledger.get_user("telegram:1")
    assert user is None or (user.daily_limit is None and user.monthly_limit is None)


# --- Telegram updates -------------------------------------------------------------------------

ANN = Updates.user(1001, "Ann", "en")
BOB = Updates.user(1002, "Bob", None)


@pytest.fixture
def tg_settings(settings: Callable[..., Settings], tmp_path: Path) -> Settings:
    return settings(
        database_url=f"sqlite:///{tmp_path}/imgbot.db",
        telegram_bot_token=TOKEN,
        album_debounce=0.2,
        progress_interval=0.05,
        rate_limit_per_minute=0,
    )


@pytest.fixture
async def tg(tg_settings: Settings, fake_api: FakeImageAPI) -> AsyncIterator[Harness]:
    async with running(tg_settings, FakeBotApi(), fake_api, Updates()) as harness:
        yield harness


def only_get_me(tg: Harness) -> bool:
    return [c.method for c in tg.api.calls] == ["getMe"]


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> bool:
    return not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_edited_messages_and_channel_posts_are_ignored(
    tg: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    u = tg.updates
    command = u.message(ANN, u.private(ANN), text="/img low a cat")
    await tg.send({"update_id": 1, "edited_message": {**command, "edit_date": 1_700_000_000}})
    channel = {"id": -1009999, "type": "channel", "title": "News"}
    post = {k: v for k, v in u.message(ANN, channel, text="/img low a cat").items() if k != "from"}
    await tg.send({"update_id": 2, "channel_post": post})
    await tg.send({"update_id": 3, "edited_channel_post": {**post, "edit_date": 1_700_000_000}})
    assert only_get_me(tg) and tg.images.api_requests == [] and await tg.jobs() == []
    assert no_errors_logged(caplog)


@pytest.mark.parametrize("body", ["/img low a cat", "/balance", "/refund 1", "/cancel", "/help"])
async def test_a_message_without_a_sender_is_ignored(
    tg: Harness, caplog: pytest.LogCaptureFixture, body: str
) -> None:
    u = tg.updates
    message = u.message(ANN, u.supergroup(), text=body)
    del message["from"]
    await tg.send(u.update(message))
    assert tg.images.api_requests == [] and await tg.jobs() == []
    assert not tg.api.of("sendPhoto") and no_errors_logged(caplog)


async def test_messages_without_text_are_ignored(
    tg: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    u = tg.updates
    tg.api.store("p-1", image_bytes(640, 640))
    photo_only = u.message(ANN, u.private(ANN), photo=u.photo_sizes("p-1", 640, 640))
    sticker = u.message(ANN, u.private(ANN))
    sticker["sticker"] = {
        "file_id": "s-1", "file_unique_id": "us-1", "type": "regular",
        "width": 512, "height": 512, "is_animated": False, "is_video": False,
    }  # fmt: skip
    empty_caption = u.message(ANN, u.private(ANN), caption="", photo=u.photo_sizes("p-1", 640, 640))
    for message in (photo_only, sticker, empty_caption):
        await tg.send(u.update(message))
    assert only_get_me(tg) and tg.api.downloads == [] and await tg.jobs() == []
    assert no_errors_logged(caplog)


async def test_a_chat_of_an_unknown_type_is_served_as_a_group(tg: Harness) -> None:
    u = tg.updates
    odd = {"id": -4242, "type": "some_future_type"}
    await tg.send(u.update(u.message(BOB, odd, text="/img low a cat")))
    [job] = await tg.jobs()
    assert job.status == "succeeded"
    assert (job.user_key, job.chat_key) == ("telegram:1002", "telegram:-4242")
    assert len(tg.api.of("sendPhoto")) == 1


async def test_a_forwarded_album_with_img_draws_once_for_the_forwarder(tg: Harness) -> None:
    u = tg.updates
    chat = u.supergroup()
    items = []
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        tg.api.store(f"fw-{i}", image_bytes(640, 480, "JPEG", colour))
        caption = "/img low merge them" if i == 1 else None
        photo = u.photo_sizes(f"fw-{i}", 640, 480)
        item = u.message(ANN, chat, caption=caption, photo=photo, media_group_id="fw")
        item["forward_origin"] = {"type": "user", "date": 1_700_000_000, "sender_user": BOB}
        items.append(item)
    for item in items:
        await tg.send(u.update(item))
    await tg.api.wait_for(lambda: tg.api.of("sendPhoto"))
    [job] = await tg.jobs()
    assert job.user_key == "telegram:1001" and job.reference_count == 3
    [edit] = tg.images.api_requests
    assert edit.path == "/v1/images/edits" and len(edit.files) == 3


async def test_a_forwarded_album_without_img_is_ignored(tg: Harness) -> None:
    u = tg.updates
    tg.api.store("fw-x", image_bytes(640, 480))
    for _ in range(2):
        photo = u.photo_sizes("fw-x", 640, 480)
        item = u.message(ANN, u.supergroup(), photo=photo, media_group_id="fw2")
        item["forward_origin"] = {"type": "hidden_user", "date": 1, "sender_user_name": "X"}
        await tg.send(u.update(item))
    await tg.app.bot_data[ADAPTER_KEY].drain(5)
    assert only_get_me(tg) and await tg.jobs() == []


async def test_a_non_image_renamed_png_is_refused_before_any_call(tg: Harness) -> None:
    u = tg.updates
    tg.api.store("doc-1", b"%PDF-1.7 definitely not a picture")
    document = u.document("doc-1", "cat.png", "image/png", size=33)
    await tg.send(
        u.update(u.message(ANN, u.private(ANN), caption="/img low a cat", document=document))
    )
    assert tg.texts()[-1] == text("en", "ref.not_image", index=1)
    assert tg.images.api_requests == [] and await tg.jobs() == []


GARBAGE_DATA = [
    "garbage",
    "",
    "j:1:explode",
    "j:-1:again",
    "j:abc:again",
    "j:1:again:extra",
    "\u202ej:1:again",
    "x" * 64,
]


@pytest.mark.parametrize("data", GARBAGE_DATA)
async def test_a_callback_with_garbage_data_is_answered_and_does_nothing(
    tg: Harness, caplog: pytest.LogCaptureFixture, data: str
) -> None:
    # Telegram shows a spinner on the button until the query is answered.
    u = tg.updates
    shown = u.message(ANN, u.private(ANN), text="a result")
    await tg.send(u.callback(ANN, shown, data))
    assert [c.method for c in tg.api.calls] == ["getMe", "answerCallbackQuery"]
    assert await tg.jobs() == [] and no_errors_logged(caplog)


@pytest.mark.parametrize("job_id", ["99999", "0", "99999999999999999999999999999999"])
async def test_a_callback_for_a_missing_job_says_so(
    tg: Harness, caplog: pytest.LogCaptureFixture, job_id: str
) -> None:
    u = tg.updates
    shown = u.message(ANN, u.private(ANN), text="a result")
    await tg.send(u.callback(ANN, shown, f"j:{job_id}:again"))
    assert len(tg.api.of("answerCallbackQuery")) == 1
    assert tg.texts() == [text("en", "job.not_found", job_id=int(job_id))]
    assert await tg.jobs() == [] and tg.images.api_requests == []
    assert no_errors_logged(caplog)


async def test_a_callback_on_a_message_too_old_to_see_still_answers(tg: Harness) -> None:
    u = tg.updates
    await tg.send(u.update(u.message(ANN, u.private(ANN), text="/img low a cat")))
    [first] = await tg.jobs()
    # Older than 48 hours: Telegram sends an InaccessibleMessage (date 0).
    gone = {"message_id": 3, "date": 0, "chat": u.private(ANN)}
    await tg.send(u.callback(ANN, gone, f"j:{first.id}:again"))
    _, again = await tg.jobs()
    assert again.status == "succeeded" and again.user_key == "telegram:1001"
    assert int(tg.api.of("sendPhoto")[-1].params["chat_id"]) == ANN["id"]


async def test_a_callback_on_someone_elses_job_charges_the_presser(tg: Harness) -> None:
    u = tg.updates
    chat = u.supergroup()
    await tg.send(u.update(u.message(ANN, chat, text="/img@ThisBot low a cat")))
    [result] = tg.api.of("sendPhoto")
    job_id = int(
        result.params["reply_markup"]["inline_keyboard"][0][0]["callback_data"].split(":")[1]
    )
    ann_before = await tg.service.ledger.spend_report("telegram:1001")
    await tg.send(u.callback(BOB, result.result, f"j:{job_id}:again"))
    first, again = await tg.jobs()
    assert first.user_key == "telegram:1001" and again.user_key == "telegram:1002"
    assert again.chat_key == first.chat_key and again.actual_credits
    ann_after = await tg.service.ledger.spend_report("telegram:1001")
    assert ann_after.today == ann_before.today
    bob = await tg.service.ledger.spend_report("telegram:1002")
    assert bob.today == again.actual_credits


# --- Discord interactions ---------------------------------------------------------------------


def discord_settings(settings: Callable[..., Settings], tmp_path: Path, **extra: Any) -> Settings:
    return settings(database_url=f"sqlite:///{tmp_path}/imgbot.db", progress_interval=0.05, **extra)


def with_button(custom_id: str) -> dict[str, Any]:
    shown = p.message("")
    button = {"type": 2, "style": 1, "label": "Again", "custom_id": custom_id}
    shown["components"] = [{"type": 1, "components": [button]}]
    return shown


@pytest.mark.parametrize(
    "custom_id",
    [
        "garbage",
        "imgbot:job:abc:again",
        "imgbot:job:1:explode",
        "imgbot:job:1234567890123456789:again",
    ],
)
async def test_a_button_that_is_not_ours_is_left_alone(
    settings: Callable[..., Settings],
    fake_api: FakeImageAPI,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    custom_id: str,
) -> None:
    async with running_bot(discord_settings(settings, tmp_path), FakeCdn()) as h:
        calls = await h.feed(p.button_press(custom_id, with_button(custom_id)))
        assert calls == [] and fake_api.api_requests == []
        assert await h.service.ledger.get_job(1) is None
    assert no_errors_logged(caplog)


async def test_a_button_of_the_largest_missing_job_answers_privately(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    custom_id = "imgbot:job:999999999999999999:vary"
    async with running_bot(discord_settings(settings, tmp_path), FakeCdn()) as h:
        calls = await h.feed(p.button_press(custom_id, with_button(custom_id)))
        private = [c for c in calls if c.ephemeral]
        assert [c.content for c in private] == [
            text("en", "job.not_found", job_id=999999999999999999)
        ]
        assert fake_api.api_requests == [] and await h.service.ledger.get_job(1) is None


async def test_a_dm_without_locale_or_member_draws_in_english(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    payload = p.slash("img", [p.option("prompt", "low a cat")], guild=False)
    del payload["locale"]
    assert "member" not in payload and "guild_id" not in payload
    async with running_bot(discord_settings(settings, tmp_path), FakeCdn()) as h:
        calls = await h.feed(payload)
        job = await h.service.ledger.get_job(job_id_of(result_of(calls)))
        assert job is not None and job.status == "succeeded"
        assert (job.user_key, job.chat_key) == ("discord:501", None)
        assert "Cost" in result_of(calls).embeds[0]["description"]


async def test_interactions_with_missing_optional_fields_are_answered(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    async with running_bot(discord_settings(settings, tmp_path), FakeCdn()) as h:
        bare = p.slash("balance", [])
        for key in ("locale", "guild_locale", "guild", "app_permissions", "entitlements"):
            bare.pop(key, None)
        bare["member"].pop("permissions")
        (call,) = await h.feed(bare)
        assert call.json and call.json["data"]["content"].startswith(text("en", "balance.header"))

        odd_locale = p.slash("help", [], locale="tlh-KLINGON", guild=False)
        (call,) = await h.feed(odd_locale)
        assert call.json and call.json["data"]["content"] == text("en", "help.text")[:2000]

        empty = p.slash("img", [p.option("prompt", "16:9 \u200b\x00")], guild=False)
        calls = await h.feed(empty)
        assert [c.content for c in calls if c.ephemeral] == [text("en", "prompt.empty")]
        assert fake_api.api_requests == []


async def test_a_non_image_attachment_is_refused_privately_before_any_call(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    cdn = FakeCdn()
    fake = b"MZ\x90\x00 this is a program, not a picture"
    url = cdn.add(fake, "cat.png")
    att = p.attachment(901, url, "cat.png", len(fake), 640, 480)
    options = [p.option("prompt", "low a cat"), p.option("image1", "901", 11)]
    async with running_bot(discord_settings(settings, tmp_path), cdn) as h:
        calls = await h.feed(p.slash("img", options, attachments=[att]))
        private = [c.content for c in calls if c.ephemeral]
        assert private == [text("en", "ref.not_image", index=1)]
        assert fake_api.api_requests == [] and await h.service.ledger.get_job(1) is None
