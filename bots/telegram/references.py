"""Telegram receiving side: which messages are /img commands, and their reference images.

References come, in this order, from the album the command belongs to (every item, in the
order the user sent them) or else the command message's own photo / image file, then from
the message it replies to. A reply to one of this bot's own results uses the job's stored
original (not Telegram's recompressed photo), so a person can refine an image step by step.

Album items arrive as separate updates that share a `media_group_id`, with no end marker and
the caption on any one item: `AlbumCollector` gathers them until the chat has been quiet for
`settings.album_debounce` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field

from telegram import Bot, Message
from telegram.error import TelegramError

from bots.telegram.reply import BUTTONS
from core.config import Settings
from core.errors import BadReferenceError
from core.service import ImageService
from core.types import IncomingImage

log = logging.getLogger(__name__)

OFFICIAL_API = "https://api.telegram.org"
# Bots may download at most 20 MB through the official Bot API server (getFile).
OFFICIAL_DOWNLOAD_LIMIT = 20 * 1024 * 1024
IMG_COMMAND = "img"
_COMMAND_WORD = re.compile(r"^/([A-Za-z0-9_]+)(?:@([A-Za-z0-9_]+))?(?=\s|$)")


@dataclass(frozen=True)
class Attachment:
    """One image file a message carries, before it is downloaded."""

    file_id: str
    file_size: int | None
    filename: str | None


def command_text(message: Message, bot_username: str, command: str = IMG_COMMAND) -> str | None:
    """Return the text after `/command` when the message (text or caption) is one for this bot."""
    body = message.text if message.text is not None else message.caption
    if not body:
        return None
    match = _COMMAND_WORD.match(body)
    if match is None or match.group(1).lower() != command:
        return None
    target = match.group(2)
    if target and target.lower() != bot_username.lower():
        return None
    return body[match.end() :].strip()


def attachment_of(message: Message) -> Attachment | None:
    """Return the image a message carries: its largest photo size, or an image document."""
    if message.photo:
        largest = max(message.photo, key=lambda p: (p.width * p.height, p.file_size or 0))
        return Attachment(largest.file_id, largest.file_size, f"{largest.file_unique_id}.jpg")
    doc = message.document
    if doc is not None and (doc.mime_type or "").startswith("image/"):
        return Attachment(doc.file_id, doc.file_size, doc.file_name)
    return None


def other_file_of(message: Message) -> str | None:
    """Name the file a message carries that is not an image (a PDF, a video…), else None."""
    if attachment_of(message) is not None:
        return None
    doc = message.document
    if doc is not None:
        return doc.file_name or doc.mime_type or "?"
    for kind in ("video", "animation", "audio", "voice", "video_note"):
        media = getattr(message, kind, None)
        if media is not None:
            return getattr(media, "file_name", None) or kind
    return None


def check_no_other_files(message: Message) -> None:
    """Refuse a command whose message (or the one it answers) carries a file that is no image.

    Drawing from the text alone would silently charge for a job the user did not ask for.
    """
    for carrier in (message, message.reply_to_message):
        if carrier is None:
            continue
        name = other_file_of(carrier)
        if name is not None:
            raise BadReferenceError("tg.not_image", detail=f"file={name!r}", name=name)


def result_job_id(message: Message | None, bot_id: int) -> int | None:
    """Return the job id behind one of this bot's result messages (from its buttons)."""
    if message is None or message.from_user is None or message.from_user.id != bot_id:
        return None
    markup = message.reply_markup
    if markup is None:
        return None
    for row in markup.inline_keyboard:
        for button in row:
            pressed = BUTTONS.decode(str(button.callback_data or ""))
            if pressed is not None:
                return pressed[0]
    return None


def download_limit(settings: Settings) -> int:
    """Return the largest reference file the bot will try to download."""
    if settings.telegram_api_base_url.rstrip("/") == OFFICIAL_API:
        return min(OFFICIAL_DOWNLOAD_LIMIT, settings.max_reference_bytes)
    # A self-hosted Bot API server lifts Telegram's limit; ours still applies.
    return settings.max_reference_bytes


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f}".rstrip("0").rstrip(".")


class ReferenceFetcher:
    """Download reference images through the Bot API (getFile + the file URL)."""

    def __init__(self, bot: Bot, settings: Settings) -> None:
        self._bot = bot
        self._limit = download_limit(settings)

    def check_size(self, attachment: Attachment) -> None:
        """Refuse a file Telegram says is too large, before downloading anything."""
        if attachment.file_size is not None and attachment.file_size > self._limit:
            raise BadReferenceError(
                "tg.file_too_big",
                detail=f"file_size={attachment.file_size}",
                size_mb=_megabytes(attachment.file_size),
                limit_mb=_megabytes(self._limit),
            )

    async def fetch(self, file_id: str, filename: str | None = None) -> IncomingImage:
        """Download one file by its file_id."""
        try:
            tg_file = await self._bot.get_file(file_id)
            if tg_file.file_size is not None and tg_file.file_size > self._limit:
                self.check_size(Attachment(file_id, tg_file.file_size, filename))
            data = bytes(await tg_file.download_as_bytearray())
        except TelegramError as err:
            raise BadReferenceError(
                "tg.download_failed", detail=f"{type(err).__name__}: {err.message}"
            ) from err
        name = filename or (posixpath.basename(tg_file.file_path) if tg_file.file_path else None)
        return IncomingImage(data=data, filename=name, ref=file_id)

    async def fetch_ref(self, ref: str) -> IncomingImage:
        """Download a stored reference (a file_id), for buttons after a restart."""
        return await self.fetch(ref)


async def collect_references(
    message: Message,
    album: Sequence[Message],
    *,
    bot_id: int,
    service: ImageService,
    fetcher: ReferenceFetcher,
) -> list[IncomingImage]:
    """Download the references of an /img command, in order, each file once."""
    planned: list[Attachment] = []
    own = sorted(album, key=lambda m: m.message_id) if album else [message]
    for item in own:
        attachment = attachment_of(item)
        if attachment is not None:
            planned.append(attachment)
    replied = message.reply_to_message
    if replied is not None:
        planned += await _replied_attachments(replied, bot_id, service)
    seen: set[str] = set()
    unique = []
    for attachment in planned:
        if attachment.file_id not in seen:
            seen.add(attachment.file_id)
            unique.append(attachment)
    # Check every size first, so one oversized file is reported before any download.
    for attachment in unique:
        fetcher.check_size(attachment)
    return [await fetcher.fetch(a.file_id, a.filename) for a in unique]


async def _replied_attachments(
    replied: Message, bot_id: int, service: ImageService
) -> list[Attachment]:
    job_id = result_job_id(replied, bot_id)
    if job_id is not None:
        job = await service.job(job_id)
        if job is not None and job.result_refs:
            # The stored refs are the lossless originals; the photo may be a preview.
            refs = job.result_refs if attachment_of(replied) is None else job.result_refs[:1]
            return [Attachment(ref, None, None) for ref in refs]
    attachment = attachment_of(replied)
    return [attachment] if attachment is not None else []


# A finished album is remembered this long, so an item Telegram delivers after the quiet
# period is answered instead of vanishing.
ALBUM_MEMORY = 300.0
# Finished albums remembered at most, so memory stays bounded.
KEEP_ALBUMS = 10000


@dataclass
class _Album:
    items: list[Message] = field(default_factory=list)
    command: Message | None = None
    text: str = ""
    last_seen: float = 0.0


@dataclass
class _Finished:
    """An album whose quiet period is over: whether it ran a job, and its items."""

    items: list[Message]
    ran: bool
    at: float


AlbumReady = Callable[[Message, str, list[Message]], Awaitable[None]]
AlbumLate = Callable[[Message], Awaitable[None]]


class AlbumCollector:
    """Gather the items of an album; run `on_ready` once for an album that holds /img.

    An item arriving after its album's quiet period is not silently dropped: if the album
    ran a job, `on_late` answers it (it was not used); if the album had no command and this
    item carries it, the album runs with every item remembered.
    """

    def __init__(
        self,
        debounce: float,
        spawn: Callable[[Coroutine[object, object, None]], object],
        on_ready: AlbumReady,
        on_late: AlbumLate | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._debounce = debounce
        self._spawn = spawn
        self._on_ready = on_ready
        self._on_late = on_late
        self._clock = clock
        self._albums: dict[tuple[int, str], _Album] = {}
        self._finished: dict[tuple[int, str], _Finished] = {}

    def add(self, message: Message, text: str | None) -> None:
        """Take one album item; `text` is the /img text when this item carries the command."""
        assert message.media_group_id is not None
        key = (message.chat_id, message.media_group_id)
        if key not in self._albums and self._late(key, message, text):
            return
        album = self._albums.get(key)
        is_new = album is None
        if album is None:
            album = self._albums[key] = _Album()
        album.items.append(message)
        album.last_seen = self._clock()
        if text is not None and album.command is None:
            album.command, album.text = message, text
        if is_new:
            self._spawn(self._wait_quiet(key))

    async def _wait_quiet(self, key: tuple[int, str]) -> None:
        album = self._albums[key]
        try:
            while True:
                quiet_for = self._clock() - album.last_seen
                if quiet_for >= self._debounce:
                    break
                await asyncio.sleep(self._debounce - quiet_for)
        finally:
            self._albums.pop(key, None)
            self._remember(key, _Finished(album.items, album.command is not None, self._clock()))
        if album.command is not None:
            await self._on_ready(album.command, album.text, album.items)

    def _remember(self, key: tuple[int, str], finished: _Finished) -> None:
        now = self._clock()
        if len(self._finished) >= KEEP_ALBUMS:
            self._finished = {
                k: f for k, f in self._finished.items() if now - f.at < ALBUM_MEMORY
            }
        self._finished[key] = finished

    def _late(self, key: tuple[int, str], message: Message, text: str | None) -> bool:
        """Handle an item of an album already finished; say whether it was one."""
        finished = self._finished.get(key)
        if finished is None or self._clock() - finished.at >= ALBUM_MEMORY:
            self._finished.pop(key, None)
            return False
        finished.items.append(message)
        if finished.ran:
            if self._on_late is not None:
                self._spawn(self._on_late(message))
            return True
        if text is not None:
            # The command came last: the album runs now, with every item it had.
            finished.ran = True
            self._spawn(self._on_ready(message, text, list(finished.items)))
        return True
