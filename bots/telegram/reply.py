"""Telegram replying side: the status message, the chat action, and results the Telegram way.

While a job draws, one status message shows its place and time. With previews it becomes a
photo (a small JPEG of each partial, swapped in with editMessageMedia as best-effort calls
the flood limiter skips when the chat is busy), and a single-photo result then takes that
message's place, so the picture forms where it will stay.

A result goes out as a photo when it fits Telegram's photo rules, else (or when asked with
`file`) as a document carrying the lossless original; several images go out as an album.
Large results come as a JPEG preview photo plus the original file, per
`settings.telegram_send_original`. Every result carries the buttons "again", "4K", "vary",
whose callback data (`j:<job id>:<action>`) is all a later press needs, even after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from telegram import (
    Bot,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputFile,
    InputMediaDocument,
    InputMediaPhoto,
    Message,
    ReplyParameters,
)
from telegram.constants import ChatAction
from telegram.error import BadRequest, NetworkError, RetryAfter, TelegramError

from bots.telegram.flood import STATUS, FloodSkipped, retry_seconds
from bots.telegram.texts import text
from core.errors import DeliveryFailed, ImgbotError
from core.imaging import preview_jpeg
from core.pricing import PriceTable, whole_credits
from core.replay import ACTIONS, ReplayCodec
from core.reports import render_caption
from core.service import DrawOutcome
from core.types import GeneratedImage, Progress

log = logging.getLogger(__name__)

# Telegram's rules for sendPhoto (larger images must go as documents).
PHOTO_MAX_BYTES = 10 * 1024 * 1024
PHOTO_MAX_SIDE_SUM = 10000
PHOTO_MAX_ASPECT = 20
# Telegram recompresses photos to about 2560 px; above ~2.5 MP the original is worth sending.
ORIGINAL_ABOVE_PIXELS = 2_500_000
PREVIEW_MAX_SIDE = 2560
PREVIEW_JPEG_QUALITY = 88
# Flood limits: about one message a second per chat; status edits stay well below
# (and `bots.telegram.flood` skips them when a chat's budget is tight).
STATUS_MIN_INTERVAL = 3.0
# A status the flood limiter skipped is tried again this soon (a local check, no call).
STATUS_RETRY = 0.2
# A chat action shows for 5 seconds; renew it a little sooner.
CHAT_ACTION_EVERY = 4.5
# Previews go out small: they only show the picture forming, and upload fast.
PARTIAL_MAX_SIDE = 1280
PARTIAL_JPEG_QUALITY = 80
RETRY_AFTER_CAP = 60.0

_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}

SendOriginal = Literal["auto", "always", "never"]
T = TypeVar("T")


@dataclass(frozen=True)
class Where:
    """Where replies go: a chat, the message they answer, the forum topic."""

    chat_id: int
    reply_to: int | None = None
    thread_id: int | None = None

    def reply(self) -> ReplyParameters | None:
        """Return the reply parameters (sent even if the message was deleted)."""
        if self.reply_to is None:
            return None
        return ReplyParameters(message_id=self.reply_to, allow_sending_without_reply=True)


def address_of(where: Where, *, group: bool) -> dict[str, str]:
    """Return where a job's replies go, kept with the job so any worker can deliver it."""
    return {
        "via": "telegram",
        "chat": str(where.chat_id),
        "reply_to": "" if where.reply_to is None else str(where.reply_to),
        "thread": "" if where.thread_id is None else str(where.thread_id),
        "group": "1" if group else "",
    }


def where_from_address(origin: dict[str, object], fallback_chat: int) -> Where:
    """Read a kept address back (a job of an older release: its chat, no reply)."""

    def number(key: str) -> int | None:
        value = str(origin.get(key) or "")
        return int(value) if value.lstrip("-").isdigit() else None

    return Where(number("chat") or fallback_chat, number("reply_to"), number("thread"))


def where_of(message: Message) -> Where:
    """Return where to answer a message."""
    thread = message.message_thread_id if message.is_topic_message else None
    return Where(message.chat_id, message.message_id, thread)


def _passing(err: TelegramError) -> bool:
    """Say whether a failed Bot API call may work later (5xx, network, 429), not a 4xx."""
    return isinstance(err, (NetworkError, RetryAfter)) and not isinstance(err, BadRequest)


async def with_flood_retry(call: Callable[[], Awaitable[T]], attempts: int = 3) -> T:
    """Run a Bot API call, waiting out 429 answers (retry_after) a few times."""
    for attempt in range(attempts):
        try:
            return await call()
        except RetryAfter as err:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(min(retry_seconds(err), RETRY_AFTER_CAP))
    raise AssertionError("unreachable")


def best_effort(bot: Bot) -> dict[str, str]:
    """Return the keyword that marks a call skippable by the flood limiter (if the bot has one)."""
    # PTB refuses rate_limit_args on a bot without a rate limiter.
    return {"rate_limit_args": STATUS} if getattr(bot, "rate_limiter", None) else {}


# The replay buttons' data on Telegram: `j:<job id>:<action>` (≤ 64 bytes). A forged id of
# any length is answered "not found" rather than ignored.
BUTTONS = ReplayCodec("j:", id_digits=58)


def result_keyboard(job_id: int, lang: str, four_k_cost: str | None = None) -> InlineKeyboardMarkup:
    """Build the buttons under a result; the 4K one says what it costs when known."""

    def label(action: str) -> str:
        if action == "4k" and four_k_cost:
            return text(lang, "tg.button.4k_cost", cost=four_k_cost)
        return text(lang, f"tg.button.{action}")

    return InlineKeyboardMarkup(
        [
            [
                InlineKeyboardButton(label(action), callback_data=BUTTONS.encode(job_id, action))
                for action in ACTIONS
            ]
        ]
    )


class StatusMessage:
    """One status message per job: queue position, then elapsed time; edited sparingly.

    With previews it turns into a photo (sent anew: a text message cannot take media),
    whose picture each later preview replaces and whose caption carries the status.
    """

    def __init__(
        self,
        bot: Bot,
        where: Where,
        lang: str,
        *,
        min_interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bot = bot
        self._where = where
        self._lang = lang
        self._min_interval = STATUS_MIN_INTERVAL if min_interval is None else min_interval
        self._clock = clock
        self._message_id: int | None = None
        self._shown = ""
        self._wanted = ""
        self._last_edit = 0.0
        self._not_before = 0.0
        self._flush: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._is_photo = False
        self._photo_wanted: GeneratedImage | None = None
        self._photo_shown: GeneratedImage | None = None
        self._jpeg: tuple[GeneratedImage, bytes] | None = None
        self._photos_failed = False
        self._number: int | None = None  # the preview shown (or on its way), 1…
        self._taken: int | None = None  # the status photo a result took over
        self._pending: set[asyncio.Task[None]] = set()

    @property
    def message_id(self) -> int | None:
        """Return the id of the status message, once sent."""
        return self._message_id

    def text_for(self, event: Progress) -> str | None:
        """Return the status text of a progress event (None: nothing to show)."""
        if event.kind == "queued":
            return text(self._lang, "progress.queued", position=event.position)
        if event.kind == "started":
            return text(self._lang, "progress.started")
        if event.kind == "working" and self._number is None:
            return text(self._lang, "progress.working", seconds=f"{event.elapsed:.0f}")
        if event.kind in ("partial", "working"):
            # Once a preview shows, the clock's tick keeps saying which one it is.
            number = event.index + 1 if event.kind == "partial" else self._number
            return text(
                self._lang, "progress.partial", seconds=f"{event.elapsed:.0f}", number=number,
            )
        return None

    @property
    def is_photo(self) -> bool:
        """Say whether the status message is a photo (a preview was shown)."""
        return self._is_photo and self._message_id is not None

    async def show(self, event: Progress) -> None:
        """Show a progress event; never raises (status is best effort)."""
        wanted = self.text_for(event)
        if wanted is None or self._closed:
            return
        if event.kind == "partial" and event.image is not None and not self._photos_failed:
            self._photo_wanted = event.image  # the latest preview wins
            self._number = event.index + 1
        self._wanted = wanted
        await self._render()

    def show_soon(self, event: Progress) -> None:
        """Show a progress event in the background (a preview upload takes a while)."""
        if self._closed:
            return
        task = asyncio.create_task(self.show(event))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _render(self) -> None:
        async with self._lock:
            photo = self._photo_wanted if self._photo_wanted is not self._photo_shown else None
            if self._closed or (photo is None and self._wanted == self._shown):
                return
            now = self._clock()
            if self._message_id is None:
                earliest = self._not_before
            else:
                earliest = max(self._last_edit + self._min_interval, self._not_before)
            if earliest > now:
                self._schedule_flush(earliest - now)
                return
            if photo is not None:
                await self._show_photo(photo, now)
            elif self._message_id is None:
                await self._send_first(now)
            else:
                await self._edit(self._wanted, now)

    async def _preview(self, image: GeneratedImage) -> bytes:
        if self._jpeg is None or self._jpeg[0] is not image:
            data = await preview_jpeg(
                image.data, max_side=PARTIAL_MAX_SIDE, quality=PARTIAL_JPEG_QUALITY
            )
            self._jpeg = (image, data)
        return self._jpeg[1]

    async def _show_photo(self, image: GeneratedImage, now: float) -> None:
        """Put a preview in the status: a new photo message, or its picture swapped."""
        caption = self._wanted
        try:
            jpeg = await self._preview(image)
            if self.is_photo:
                assert self._message_id is not None
                await self._bot.edit_message_media(
                    InputMediaPhoto(jpeg, caption=caption, filename="preview.jpg"),
                    self._where.chat_id,
                    self._message_id,
                    **best_effort(self._bot),
                )
            else:
                sent = await self._bot.send_photo(
                    self._where.chat_id,
                    InputFile(jpeg, filename="preview.jpg"),
                    caption=caption,
                    reply_parameters=self._where.reply(),
                    message_thread_id=self._where.thread_id,
                    **best_effort(self._bot),
                )
                old, self._message_id, self._is_photo = self._message_id, sent.message_id, True
                if old is not None:
                    await self._delete(old)
        except RetryAfter as err:
            self._not_before = now + retry_seconds(err)
            self._schedule_flush(retry_seconds(err))
            return
        except FloodSkipped:
            self._schedule_flush(STATUS_RETRY)  # tried again soon, with the latest preview
            return
        except (TelegramError, OSError, ValueError) as err:
            # Previews are a courtesy: the status goes on as text, the result as usual.
            log.debug("preview not shown: %s", err)
            self._photos_failed = True
            self._photo_wanted = None
            if not self.is_photo:
                self._number = None  # no preview shows: the ticks say only the time
            if self._wanted != self._shown:
                self._schedule_flush(STATUS_RETRY)
            return
        self._photo_shown = image
        self._shown = caption
        self._last_edit = now

    async def _delete(self, message_id: int) -> None:
        try:
            await self._bot.delete_message(self._where.chat_id, message_id)
        except TelegramError as err:
            log.debug("status message not deleted: %s", err)

    async def _send_first(self, now: float) -> None:
        try:
            sent = await self._bot.send_message(
                self._where.chat_id,
                self._wanted,
                reply_parameters=self._where.reply(),
                message_thread_id=self._where.thread_id,
                **best_effort(self._bot),
            )
        except RetryAfter as err:
            self._not_before = now + retry_seconds(err)
            self._schedule_flush(retry_seconds(err))
            return
        except FloodSkipped:
            # The chat is busy with results. Try again soon: a waiting job may see no other
            # progress event for a long time, and every job must show its place.
            self._schedule_flush(STATUS_RETRY)
            return
        except TelegramError as err:
            # No status then (the result or the error still gets sent); do not retry each tick.
            log.debug("status message not sent: %s", err)
            self._closed = True
            return
        self._message_id = sent.message_id
        self._shown = self._wanted
        self._last_edit = now

    async def _edit(self, wanted: str, now: float) -> None:
        assert self._message_id is not None
        try:
            if self._is_photo:
                await self._bot.edit_message_caption(
                    self._where.chat_id,
                    self._message_id,
                    caption=wanted,
                    **best_effort(self._bot),
                )
            else:
                await self._bot.edit_message_text(
                    wanted, self._where.chat_id, self._message_id, **best_effort(self._bot)
                )
        except RetryAfter as err:
            self._not_before = now + retry_seconds(err)
            self._schedule_flush(retry_seconds(err))
            return
        except FloodSkipped:
            self._schedule_flush(STATUS_RETRY)  # the queue place must not stay stale
            return
        except TelegramError as err:
            log.debug("status message not edited: %s", err)
        self._shown = wanted
        self._last_edit = now

    def _schedule_flush(self, delay: float) -> None:
        if self._flush is None or self._flush.done():
            self._flush = asyncio.create_task(self._flush_later(delay))

    async def _flush_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._render()

    async def close(self) -> None:
        """Remove the status message (the result replaces it)."""
        self._stop()
        if self._message_id is None:
            return
        message_id, self._message_id = self._message_id, None
        await self._delete(message_id)

    async def take_photo(self) -> int | None:
        """Stop updating; return the id of the status photo for the result to take over.

        None when the status is not a photo. Once taken, `close` leaves that message alone
        (call `release` if the result did not take it after all).
        """
        self._stop()
        async with self._lock:  # an edit on the wire finishes first
            if not self.is_photo:
                return None
            message_id, self._message_id = self._message_id, None
            self._taken = message_id
            return message_id

    async def release(self) -> None:
        """Remove a status photo that `take_photo` handed out and the result did not use."""
        taken, self._taken = self._taken, None
        if taken is not None:
            await self._delete(taken)

    async def fail(self, message: str) -> None:
        """Replace the status with an error, or send the error as a reply to the command."""
        self._stop()
        if self._message_id is not None and self._is_photo:
            # A preview photo cannot become a text; the error goes as a reply of its own.
            await self.close()
        if self._message_id is not None:
            try:
                await self._bot.edit_message_text(message, self._where.chat_id, self._message_id)
                return
            except TelegramError as err:
                log.debug("status message not turned into the error: %s", err)
        await with_flood_retry(
            lambda: self._bot.send_message(
                self._where.chat_id,
                message,
                reply_parameters=self._where.reply(),
                message_thread_id=self._where.thread_id,
            )
        )

    async def discard(self) -> None:
        """Stop updating, and remove the status message if one was sent."""
        await self.close()

    def _stop(self) -> None:
        self._closed = True
        if self._flush is not None and not self._flush.done():
            self._flush.cancel()
        # Previews on their way are not cancelled: a photo cut off mid-upload may still
        # land in the chat, unknown to us. They see `_closed` and stop before sending.


class ChatActionLoop:
    """Keep "sending a photo…" visible in the chat while a job draws."""

    def __init__(self, bot: Bot, where: Where) -> None:
        self._bot = bot
        self._where = where
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start renewing the chat action (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self._bot.send_chat_action(
                    self._where.chat_id,
                    ChatAction.UPLOAD_PHOTO,
                    message_thread_id=self._where.thread_id,
                    **best_effort(self._bot),
                )
            except TelegramError as err:
                log.debug("chat action not sent: %s", err)
            await asyncio.sleep(CHAT_ACTION_EVERY)

    async def stop(self) -> None:
        """Stop renewing the chat action."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None


# --- delivery ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """How one image goes out: a photo (original or preview), and/or the original file."""

    photo: Literal["original", "preview"] | None
    document: bool


def fits_photo(image: GeneratedImage) -> bool:
    """Say whether Telegram accepts the image as a photo as it is."""
    w, h = image.width, image.height
    if len(image.data) > PHOTO_MAX_BYTES or w + h > PHOTO_MAX_SIDE_SUM or not w or not h:
        return False
    return max(w, h) / min(w, h) <= PHOTO_MAX_ASPECT


def plan_delivery(
    image: GeneratedImage, *, as_file: bool, send_original: SendOriginal, transparent: bool
) -> Plan:
    """Decide how to send one image."""
    if as_file:
        return Plan(photo=None, document=True)
    fits = fits_photo(image)
    big = image.width * image.height > ORIGINAL_ABOVE_PIXELS
    # Telegram flattens transparency in photos, so a transparent image also goes as a file.
    document = (
        transparent or not fits or send_original == "always" or (send_original == "auto" and big)
    )
    photo: Literal["original", "preview"] = (
        "original" if fits and not (document and big) else "preview"
    )
    return Plan(photo=photo, document=document)


def _filename(job_id: int, index: int, mime: str) -> str:
    return f"imgbot-{job_id}-{index}.{_EXTENSIONS.get(mime, 'png')}"


@dataclass(frozen=True)
class _Prepared:
    plan: Plan
    photo: bytes | None
    photo_name: str
    original: GeneratedImage
    original_name: str


async def _prepare(outcome: DrawOutcome, send_original: SendOriginal) -> list[_Prepared]:
    request = outcome.request
    prepared = []
    for i, image in enumerate(outcome.images, 1):
        plan = plan_delivery(
            image,
            as_file=request.as_file,
            send_original=send_original,
            transparent=request.background == "transparent",
        )
        photo: bytes | None = None
        photo_name = _filename(outcome.job_id, i, image.mime)
        if plan.photo == "original":
            photo = image.data
        elif plan.photo == "preview":
            photo = await preview_jpeg(
                image.data, max_side=PREVIEW_MAX_SIDE, quality=PREVIEW_JPEG_QUALITY
            )
            photo_name = f"imgbot-{outcome.job_id}-{i}-preview.jpg"
        prepared.append(
            _Prepared(plan, photo, photo_name, image, _filename(outcome.job_id, i, image.mime))
        )
    return prepared


async def deliver_result(
    bot: Bot,
    where: Where,
    outcome: DrawOutcome,
    caption: str,
    *,
    send_original: SendOriginal,
    four_k_cost: str | None = None,
    replace: int | None = None,
) -> tuple[list[str], bool]:
    """Send a finished job; return one file_id per image (the original where one was sent),
    and whether it took the place of message `replace` (a preview photo)."""
    prepared = await _prepare(outcome, send_original)
    keyboard = result_keyboard(outcome.job_id, outcome.lang, four_k_cost)
    if len(prepared) == 1:
        return await _deliver_one(bot, where, prepared[0], caption, keyboard, replace)
    return await _deliver_album(bot, where, prepared, caption, keyboard, outcome), False


async def _replace_photo(
    bot: Bot, where: Where, message_id: int, item: _Prepared, caption: str,
    keyboard: InlineKeyboardMarkup,
) -> Message | None:
    """Put the result's photo in the preview's place; None when Telegram will not."""
    try:
        edited = await with_flood_retry(
            lambda: bot.edit_message_media(
                InputMediaPhoto(item.photo, caption=caption, filename=item.photo_name),
                where.chat_id,
                message_id,
                reply_markup=keyboard,
            )
        )
    except BadRequest as err:
        log.info("result not put in the preview's place (%s); sending it anew", err.message)
        return None
    return edited if isinstance(edited, Message) else None


async def _deliver_one(
    bot: Bot,
    where: Where,
    item: _Prepared,
    caption: str,
    keyboard: InlineKeyboardMarkup,
    replace: int | None = None,
) -> tuple[list[str], bool]:
    if item.photo is not None:
        sent: Message | None = None
        if replace is not None:
            sent = await _replace_photo(bot, where, replace, item, caption, keyboard)
        replaced = sent is not None
        try:
            if sent is None:
                sent = await with_flood_retry(
                    lambda: bot.send_photo(
                        where.chat_id,
                        InputFile(item.photo, filename=item.photo_name),
                        caption=caption,
                        reply_markup=keyboard,
                        reply_parameters=where.reply(),
                        message_thread_id=where.thread_id,
                    )
                )
        except BadRequest as err:
            # Telegram has the last word on what a photo is; the file always gets through.
            log.warning("photo refused (%s); sending the file instead", err.message)
            item = _Prepared(Plan(None, True), None, "", item.original, item.original_name)
        else:
            ref = _largest_photo_id(sent)
            if not item.plan.document:
                return [ref], replaced
            doc = await _send_document(
                bot, Where(where.chat_id, sent.message_id, where.thread_id), item
            )
            return [_document_id(doc) or ref], replaced
    doc = await _send_document(bot, where, item, caption=caption, keyboard=keyboard)
    return [_document_id(doc) or ""], False


async def _send_document(
    bot: Bot,
    where: Where,
    item: _Prepared,
    *,
    caption: str | None = None,
    keyboard: InlineKeyboardMarkup | None = None,
) -> Message:
    return await with_flood_retry(
        lambda: bot.send_document(
            where.chat_id,
            InputFile(item.original.data, filename=item.original_name),
            caption=caption,
            reply_markup=keyboard,
            reply_parameters=where.reply(),
            message_thread_id=where.thread_id,
            # Keep the original a file: Telegram would otherwise turn a small image into a photo.
            disable_content_type_detection=True,
        )
    )


async def _deliver_album(
    bot: Bot,
    where: Where,
    items: Sequence[_Prepared],
    caption: str,
    keyboard: InlineKeyboardMarkup,
    outcome: DrawOutcome,
) -> list[str]:
    refs: list[str] = [""] * len(items)
    anchor_id: int | None = None
    caption_left: str | None = caption
    if all(item.photo is not None for item in items):
        # Raw bytes (not InputFile): each item then gets its own attach:// part.
        media = [InputMediaPhoto(item.photo, filename=item.photo_name) for item in items]
        sent = await with_flood_retry(
            lambda: bot.send_media_group(
                where.chat_id,
                media,
                caption=caption,
                reply_parameters=where.reply(),
                message_thread_id=where.thread_id,
            )
        )
        anchor_id = sent[0].message_id
        refs = [_largest_photo_id(m) for m in sent]
        caption_left = None
    documents = [i for i, item in enumerate(items) if item.plan.document or item.photo is None]
    if documents:
        target = Where(where.chat_id, anchor_id or where.reply_to, where.thread_id)
        sent_docs = await _send_documents(bot, target, [items[i] for i in documents], caption_left)
        for i, message in zip(documents, sent_docs, strict=True):
            refs[i] = _document_id(message) or refs[i]
        if anchor_id is None:
            anchor_id = sent_docs[0].message_id
    # An album cannot carry buttons; they go in a small message answering it.
    anchor = Where(where.chat_id, anchor_id or where.reply_to, where.thread_id)
    await with_flood_retry(
        lambda: bot.send_message(
            anchor.chat_id,
            text(outcome.lang, "tg.buttons", job_id=outcome.job_id),
            reply_markup=keyboard,
            reply_parameters=anchor.reply(),
            message_thread_id=anchor.thread_id,
        )
    )
    return refs


async def _send_documents(
    bot: Bot, where: Where, items: Sequence[_Prepared], caption: str | None
) -> list[Message]:
    if len(items) == 1:
        return [await _send_document(bot, where, items[0], caption=caption)]
    media = [
        InputMediaDocument(
            item.original.data,
            filename=item.original_name,
            disable_content_type_detection=True,
        )
        for item in items
    ]
    return list(
        await with_flood_retry(
            lambda: bot.send_media_group(
                where.chat_id,
                media,
                caption=caption,
                reply_parameters=where.reply(),
                message_thread_id=where.thread_id,
            )
        )
    )


def _largest_photo_id(message: Message) -> str:
    if not message.photo:
        return ""
    return max(message.photo, key=lambda p: (p.width * p.height, p.file_size or 0)).file_id


def _document_id(message: Message) -> str | None:
    return message.document.file_id if message.document is not None else None


# --- the runner's Reply on Telegram ----------------------------------------------------------
class TelegramReply:
    """Show one job in a chat: status message and chat action, then the result or a word."""

    def __init__(
        self,
        bot: Bot,
        where: Where,
        lang: str,
        *,
        prices: PriceTable,
        is_group: bool,
        send_original: SendOriginal,
        scrub: Callable[[str], str],
    ) -> None:
        self._bot = bot
        self._where = where
        self._lang = lang
        self._prices = prices
        self.is_group = is_group
        self._send_original = send_original
        self._scrub = scrub
        self.status = StatusMessage(bot, where, lang)
        self.action = ChatActionLoop(bot, where)

    async def progress(self, event: Progress) -> None:
        """Show the queue place, the drawing time or a preview; keep "sending a photo…" up."""
        if event.kind == "started":
            self.action.start()
        if event.kind == "partial":
            # Never hold the job (or the stream it reads) for an upload: the latest wins.
            self.status.show_soon(event)
            return
        await self.status.show(event)

    async def result(self, outcome: DrawOutcome, four_k_credits: float | None) -> list[str]:
        """Send the result with its caption and buttons; return the file ids sent."""
        await self.action.stop()
        # A group sees the caption: only this job's cost there, spend in private.
        caption = render_caption(outcome, self._prices, show_spend=not self.is_group)
        four_k = f"{whole_credits(four_k_credits):,}" if four_k_credits is not None else None
        # A preview photo is where the result goes (a single image; an album cannot).
        preview = await self.status.take_photo() if len(outcome.images) == 1 else None
        try:
            refs, replaced = await deliver_result(
                self._bot,
                self._where,
                outcome,
                caption,
                send_original=self._send_original,
                four_k_cost=four_k,
                replace=preview,
            )
        except TelegramError as err:
            # A 5xx, a time-out or a lost connection may pass: the runner tries again. A
            # 4xx (chat gone, bot blocked, file refused) will not.
            await self.status.release()
            raise DeliveryFailed(self._scrub(str(err)), retryable=_passing(err)) from None
        if not replaced:
            await self.status.release()
        await self.status.close()
        return refs

    async def refusal(self, message: str | None, error: ImgbotError | None = None) -> None:
        """Turn the status into the refusal, or remove it quietly."""
        await self.action.stop()
        if message is None:
            await self.status.discard()
        else:
            await self._tell(message)

    async def failure(self, message: str) -> None:
        """Say something went wrong, if Telegram lets us."""
        await self.action.stop()
        await self._tell(message)

    async def _tell(self, message: str) -> None:
        try:
            await self.status.fail(message)
        except TelegramError as err:
            # A 5xx, a time-out or a lost connection may pass: the runner says it again. A
            # 4xx (the chat is gone, the bot blocked) will not.
            detail = self._scrub(str(err))
            if _passing(err):
                raise DeliveryFailed(detail, retryable=True) from None
            log.info("could not tell chat %s why a job ended: %s", self._where.chat_id, detail)
