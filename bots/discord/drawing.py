"""Running a draw for an interaction: check, defer, fetch references, draw, deliver.

The slash command, the context-menu form and the result buttons all come through
`DrawRunner`. It lets the job pass its checks (access, prompt, limits, queue) for up to
2 s, so a refusal is the interaction's private first answer; once the job is admitted it
defers publicly, shows progress in the deferred answer, and delivers the images (fitted
to the upload limit), an embed with the cost, and the replay buttons. A job outliving
the 15-minute token ends in the channel, mentioning the user.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp
import discord
from discord.http import Route

from bots.discord.buttons import result_view
from bots.discord.replies import (
    TOKEN_MARGIN,
    ProgressMessage,
    clip,
    defer_public,
    error_message,
    mark_settled,
    report_error,
    token_alive,
    token_left,
    token_usable,
)
from bots.discord.requester import requester_of
from bots.discord.texts import lang_of
from core.config import Settings
from core.errors import BadReferenceError, ImgbotError
from core.imaging import FittedImage, fit_under, upload_share
from core.messages import text
from core.prompt import clean_text
from core.replay import ReplayAction
from core.reports import render_caption
from core.service import DrawOutcome, ImageService
from core.types import IncomingImage, Progress, ProgressCallback

if TYPE_CHECKING:
    from core.store import JobRecord

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT = 60.0
# Discord wants the first answer within 3 s of sending the interaction: a job gets this
# long to pass its checks (or be refused privately) before the public "thinking" answer.
ADMIT_WINDOW = 2.0
ACK_DEADLINE = 2.5
EMBED_TITLE_LIMIT = 256
EMBED_TEXT_LIMIT = 4096
_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
_ATTACHMENT_HOSTS = frozenset({"cdn.discordapp.com", "media.discordapp.net"})
# Discord's proxy for images linked from elsewhere (embeds' proxy_url): images-ext-1, -2, …
_MEDIA_PROXY = re.compile(r"images-ext-[0-9]{1,3}\.discordapp\.net")


def is_discord_media(url: str) -> bool:
    """Say whether a URL is on Discord's CDN or media proxy, the only places we fetch from."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "https" or parts.port not in (None, 443) or parts.username:
        return False
    return host in _ATTACHMENT_HOSTS or bool(_MEDIA_PROXY.fullmatch(host))


@dataclass(frozen=True)
class RemoteImage:
    """An image on Discord's CDN to use as a reference; size is known for attachments."""

    url: str
    filename: str | None = None
    size: int | None = None


def image_of_attachment(attachment: discord.Attachment) -> RemoteImage:
    """Describe an attachment as a reference to download."""
    return RemoteImage(attachment.url, attachment.filename, attachment.size)


def images_of_message(message: discord.Message) -> list[RemoteImage]:
    """Return the images of a message and of the messages it forwards, in order.

    Each contributes its image attachments, then its embeds' images: a linked image
    comes as an "image" embed whose picture is the thumbnail, proxied by Discord.
    """
    found: list[RemoteImage] = []
    sources: list[discord.Message | discord.MessageSnapshot] = [message]
    sources += message.message_snapshots
    for source in sources:
        for attachment in source.attachments:
            content_type = attachment.content_type or ""
            suffix = PurePosixPath(attachment.filename.lower()).suffix
            if content_type.startswith("image/") or suffix in _IMAGE_SUFFIXES:
                found.append(image_of_attachment(attachment))
        for embed in source.embeds:
            media = [embed.image, embed.thumbnail] if embed.type == "image" else [embed.image]
            for item in media:
                # Discord's copy, never the original host: we only ever fetch from Discord.
                for url in (getattr(item, "proxy_url", None), getattr(item, "url", None)):
                    if url and is_discord_media(url):
                        found.append(RemoteImage(url, _filename_of(url)))
                        break
    unique: dict[str, RemoteImage] = {}
    for image in found:
        unique.setdefault(image.url, image)
    return list(unique.values())


def _filename_of(url: str) -> str | None:
    name = PurePosixPath(urlsplit(url).path).name
    return name or None


def _mb(size: int) -> str:
    # Decimal megabytes, as the core words its own reference limits.
    return f"{size / 1_000_000:.1f}".rstrip("0").rstrip(".")


def _mib(size: int) -> str:
    # Discord's "10 MB" upload limit is 10 MiB; say it the way Discord does.
    return f"{size / (1024 * 1024):.1f}".rstrip("0").rstrip(".")


Job = Callable[[ProgressCallback], Awaitable[DrawOutcome]]


class DrawRunner:
    """Carry interactions through the core's draw pipeline and back."""

    def __init__(
        self, http: discord.http.HTTPClient, service: ImageService, settings: Settings
    ) -> None:
        self._http = http
        self.service = service
        self.settings = settings
        self._running: set[asyncio.Task[object]] = set()

    # --- entry points ------------------------------------------------------------------
    async def draw(
        self, interaction: discord.Interaction, command_text: str, images: Sequence[RemoteImage]
    ) -> None:
        """Run one /img command (or context-menu edit) and answer the interaction."""
        requester = requester_of(interaction, self.settings)

        async def job(progress: ProgressCallback) -> DrawOutcome:
            # Refuse strangers and typos before downloading anything on their behalf. The
            # sizes only steer the aspect, never whether the command parses.
            await self.service.check_access(requester)
            self.service.parse(clean_text(command_text), reference_sizes=[(1, 1)] * len(images))
            refs = [await self.download(image, index) for index, image in enumerate(images, 1)]
            return await self.service.draw(
                requester, command_text, refs, progress, origin=origin_of(interaction)
            )

        await self._run(interaction, job)

    async def replay(
        self, interaction: discord.Interaction, job_id: int, action: ReplayAction
    ) -> None:
        """Replay a stored job for whoever pressed its button; they pay."""
        requester = requester_of(interaction, self.settings)

        async def job(progress: ProgressCallback) -> DrawOutcome:
            await self.service.check_access(requester)
            return await self.service.replay(
                requester,
                job_id,
                action,
                self.fetch,
                progress,
                origin=origin_of(interaction),
            )

        await self._run(interaction, job)

    async def wait_idle(self, seconds: float) -> None:
        """Wait up to `seconds` for the draws being answered to finish."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=seconds)

    async def _run(self, interaction: discord.Interaction, job: Job) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._running.add(task)
        gate = _ProgressGate()
        work = asyncio.create_task(job(gate), name=f"imgbot:discord:{interaction.id}")
        try:
            # The job is checked (access, prompt, limits, queue) before anything public is
            # shown: a refusal within Discord's 3 s is the private first answer, nothing else.
            await _first_of(work, gate.admitted, _ack_budget(interaction))
            if work.done() and not work.cancelled() and work.exception() is not None:
                await report_error(interaction, work.exception())  # type: ignore[arg-type]
                return
            try:
                await defer_public(interaction)
            except (discord.HTTPException, aiohttp.ClientError, OSError) as err:
                # Too late to acknowledge (a stalled loop, a slow network). The job holds its
                # reservation and may be drawing: finish it and answer in the channel.
                log.warning("interaction %s not acknowledged: %s", interaction.id, err)
                await self._finish_in_channel(interaction, work)
                return
            progress = ProgressMessage(interaction, lang_of(interaction))
            handover = asyncio.create_task(_hand_over(interaction, progress))
            try:
                if not work.done():
                    await gate.open(progress)
                outcome = await work
            finally:
                if token_alive(interaction):
                    handover.cancel()
                await progress.close()
            await self.deliver(interaction, outcome)
        except Exception as err:  # noqa: BLE001 - every failure is answered in one place
            if interaction.response.is_done() and not token_usable(interaction):
                await self._fail_late(interaction, err)
            else:
                await report_error(interaction, err)
        finally:
            if not work.done():
                work.cancel()
            if task is not None:
                self._running.discard(task)

    async def _finish_in_channel(
        self, interaction: discord.Interaction, work: asyncio.Task[DrawOutcome]
    ) -> None:
        try:
            await self.deliver(interaction, await work, in_channel=True)
        except Exception as err:  # noqa: BLE001 - every failure is answered in one place
            await self._fail_late(interaction, err)

    async def _fail_late(self, interaction: discord.Interaction, error: BaseException) -> None:
        # The token is gone, and with it every private way back: say it in the channel.
        message = error_message(interaction, error)
        channel = interaction.channel
        if message is None or not isinstance(channel, discord.abc.Messageable):
            return
        content = text(
            lang_of(interaction), "discord.late_failed", mention=interaction.user.mention
        )
        try:
            await channel.send(content=clip(f"{content}\n{message}"))
        except (discord.HTTPException, aiohttp.ClientError, OSError) as err:
            log.warning("could not tell user %s about a late failure: %s", interaction.user.id, err)

    # --- references --------------------------------------------------------------------
    async def download(self, image: RemoteImage, index: int) -> IncomingImage:
        """Download one reference image from Discord's CDN."""
        limit = self.settings.max_reference_bytes
        if image.size is not None and image.size > limit:
            # Refuse before downloading: attachments can be far larger than any reference.
            raise BadReferenceError(
                "ref.too_big", index=index, size_mb=_mb(image.size), limit_mb=_mb(limit)
            )
        data = await self._get(image.url, index)
        return IncomingImage(data, image.filename or _filename_of(image.url), image.url)

    async def fetch(self, ref: str) -> IncomingImage:
        """Download a stored reference (an attachment URL) for a replay."""
        return IncomingImage(await self._get(ref, 1), _filename_of(ref), ref)

    async def _get(self, url: str, index: int) -> bytes:
        if not is_discord_media(url):
            # Stored references come from our own ledger, but nothing else is fetched anyway.
            raise BadReferenceError("ref.download_failed", index=index, detail="not Discord's")
        try:
            try:
                async with asyncio.timeout(DOWNLOAD_TIMEOUT):
                    return await self._http.get_from_cdn(url)
            except (discord.NotFound, discord.Forbidden):
                # Attachment URLs are signed and expire; Discord re-signs them on request.
                fresh = await self._refresh(url)
                if fresh is None:
                    raise
                async with asyncio.timeout(DOWNLOAD_TIMEOUT):
                    return await self._http.get_from_cdn(fresh)
        except (discord.HTTPException, aiohttp.ClientError, TimeoutError) as err:
            raise BadReferenceError(
                "ref.download_failed", index=index, detail=f"{type(err).__name__}"
            ) from err

    async def _refresh(self, url: str) -> str | None:
        if urlsplit(url).hostname not in _ATTACHMENT_HOSTS:
            return None
        route = Route("POST", "/attachments/refresh-urls")
        try:
            data = await self._http.request(route, json={"attachment_urls": [url]})
        except discord.HTTPException as err:
            log.debug("could not refresh an attachment URL: %s", err.status)
            return None
        for item in (data or {}).get("refreshed_urls", []):
            if item.get("original") == url and item.get("refreshed"):
                return str(item["refreshed"])
        return None

    # --- the result ----------------------------------------------------------------------
    async def deliver(
        self, interaction: discord.Interaction, outcome: DrawOutcome, *, in_channel: bool = False
    ) -> None:
        """Send the images, the cost embed and the buttons; remember the files for "vary"."""
        lang = outcome.lang
        limit = interaction.filesize_limit
        share = upload_share(limit, [len(image.data) for image in outcome.images])
        files: list[discord.File] = []
        notes: list[str] = []
        for index, image in enumerate(outcome.images, 1):
            fitted = await fit_under(image.data, image.mime, image.width, image.height, limit=share)
            if fitted is None:
                notes.append(text(lang, "discord.fit.failed", index=index, limit_mb=_mib(limit)))
                continue
            if fitted.reencoded:
                notes.append(_fit_note(lang, index, fitted, limit))
            name = f"imgbot-{outcome.job_id}-{index}.{fitted.extension}"
            files.append(discord.File(io.BytesIO(fitted.data), filename=name))
        embed = self._embed(outcome, notes)
        view = result_view(outcome.job_id, lang)
        try:
            if token_alive(interaction) and not in_channel:
                message = await interaction.edit_original_response(
                    content=None, embed=embed, attachments=files, view=view
                )
                mark_settled(interaction)
            else:
                message = await self._deliver_late(interaction, lang, embed, files, view)
        except (discord.HTTPException, aiohttp.ClientError, OSError) as err:
            status = getattr(err, "status", None) or type(err).__name__
            log.error("could not send the result of job %d: %s", outcome.job_id, status)
            raise ImgbotError("discord.send_failed", job_id=outcome.job_id) from err
        refs = [attachment.url for attachment in message.attachments]
        if refs:
            try:
                await self.service.record_result_refs(outcome.job_id, refs)
            except Exception:  # noqa: BLE001 - the user has the result; only "vary" loses out
                log.exception("could not store the result files of job %d", outcome.job_id)

    async def _deliver_late(
        self,
        interaction: discord.Interaction,
        lang: str,
        embed: discord.Embed,
        files: list[discord.File],
        view: discord.ui.View,
    ) -> discord.Message:
        # The 15-minute token is gone: post in the channel instead, naming the user.
        channel = interaction.channel
        if not isinstance(channel, discord.abc.Messageable):
            raise discord.ClientException("no channel to deliver a late result to")
        content = text(lang, "discord.late", mention=interaction.user.mention)
        return await channel.send(content=content, embed=embed, files=files, view=view)

    def _embed(self, outcome: DrawOutcome, notes: Sequence[str]) -> discord.Embed:
        caption = render_caption(outcome, self.service.prices, limit=EMBED_TEXT_LIMIT)
        description = "\n".join([caption, *notes]) if notes else caption
        embed = discord.Embed(
            title=clip(outcome.request.prompt, EMBED_TITLE_LIMIT) or None,
            description=clip(description, EMBED_TEXT_LIMIT),
            colour=discord.Colour.blurple(),
        )
        return embed


async def _hand_over(interaction: discord.Interaction, progress: ProgressMessage) -> None:
    """Before the token runs out, leave the public answer saying where the result will be."""
    await asyncio.sleep(max(0.0, token_left(interaction) - TOKEN_MARGIN))
    await progress.close()
    try:
        content = text(lang_of(interaction), "discord.late_pending")
        await interaction.edit_original_response(content=content)
    except (discord.HTTPException, aiohttp.ClientError, OSError) as err:
        log.debug("could not hand the answer over to the channel: %s", type(err).__name__)
        return
    mark_settled(interaction)


def origin_of(interaction: discord.Interaction) -> dict[str, str]:
    """Return where a job came from, kept with it to reach the user after a crash."""
    return {"channel": str(interaction.channel_id)} if interaction.channel_id else {}


def channel_of(job: JobRecord) -> int | None:
    """Return the channel a stored job came from, when it was recorded."""
    try:
        channel = json.loads(job.request_json or "{}").get("origin", {}).get("channel")
    except (ValueError, AttributeError):
        return None
    return int(channel) if isinstance(channel, str) and channel.isdigit() else None


def _ack_budget(interaction: discord.Interaction) -> float:
    """Return how long the first answer may wait: Discord allows 3 s from sending it."""
    age = (discord.utils.utcnow() - interaction.created_at).total_seconds()
    # A clock behind Discord's makes the age negative: then the window from now counts.
    return max(0.0, min(ADMIT_WINDOW, ACK_DEADLINE - age))


async def _first_of(work: asyncio.Task[DrawOutcome], event: asyncio.Event, seconds: float) -> None:
    """Wait until the job is admitted or over, or `seconds` pass."""
    waiter = asyncio.create_task(event.wait())
    try:
        await asyncio.wait({work, waiter}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


class _ProgressGate:
    """Hold a job's progress until the interaction is acknowledged, then pass it on.

    The first event means the job passed every check and holds its reservation.
    """

    def __init__(self) -> None:
        self.admitted = asyncio.Event()
        self._target: ProgressCallback | None = None
        self._held: Progress | None = None

    async def __call__(self, event: Progress) -> None:
        """Take one progress event from the service."""
        self.admitted.set()
        if self._target is None:
            self._held = event
            return
        await self._target(event)

    async def open(self, target: ProgressCallback) -> None:
        """Pass on the latest held event and every later one to `target`."""
        self._target = target
        held, self._held = self._held, None
        if held is not None:
            await target(held)


def _fit_note(lang: str, index: int, fitted: FittedImage, limit: int) -> str:
    return text(
        lang,
        "discord.fit.reencoded",
        index=index,
        size_mb=_mib(fitted.original_size),
        limit_mb=_mib(limit),
        format=fitted.format_name,
        new_mb=_mib(len(fitted.data)),
        size=f"{fitted.width}x{fitted.height}",
    )
