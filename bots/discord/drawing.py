"""Drawing for an interaction: the references it names, and the runner that draws them.

The slash command, the context-menu form and the result buttons all come through
`DiscordDrawing`: it builds the `Requester`, a way to fetch the references (from Discord's
CDN and media proxy only, within MAX_REFERENCE_BYTES) and a `DiscordReply`, and hands
them to the core's `JobRunner`, which checks, draws and answers through the reply.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp
import discord
from discord.http import Route

from bots.discord.reply import DiscordReply, address_of, tell_privately
from bots.discord.requester import requester_of
from bots.discord.texts import lang_of, text
from core.config import Settings
from core.errors import BadReferenceError
from core.presses import PRESS_WINDOW, PressWindow
from core.prompt import clean_text
from core.replay import ReplayAction
from core.runner import JobRunner
from core.service import ImageService
from core.types import IncomingImage

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT = 60.0
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


class DiscordDrawing:
    """Turn interactions into runs of the core's job runner, answered by a `DiscordReply`."""

    def __init__(
        self, http: discord.http.HTTPClient, service: ImageService, settings: Settings
    ) -> None:
        self._http = http
        self.service = service
        self.settings = settings
        self.jobs = JobRunner(service, texts=text)
        self.presses = PressWindow()

    async def draw(
        self, interaction: discord.Interaction, command_text: str, images: Sequence[RemoteImage]
    ) -> None:
        """Run one /img command (or context-menu edit) and answer the interaction."""
        requester = requester_of(interaction, self.settings)

        async def references() -> list[IncomingImage]:
            # The runner checked access; refuse typos too before downloading anything. The
            # sizes only steer the aspect, never whether the command parses.
            self.service.parse(clean_text(command_text), reference_sizes=[(1, 1)] * len(images))
            return [await self.download(image, index) for index, image in enumerate(images, 1)]

        reply = DiscordReply(interaction, self.service.prices)
        await reply.carry(
            self.jobs.run(
                requester, command_text, references, reply, origin=address_of(interaction)
            )
        )

    async def replay(
        self, interaction: discord.Interaction, job_id: int, action: ReplayAction
    ) -> None:
        """Replay a stored job for whoever pressed its button; they pay. A burst of
        presses of one button by one person is one job (the others are told privately)."""
        requester = requester_of(interaction, self.settings)
        key = (requester.user_key, interaction.channel_id, job_id, action)
        if not await self.first_press(key):
            await tell_privately(interaction, text(lang_of(interaction), "discord.press_repeated"))
            return
        reply = DiscordReply(interaction, self.service.prices)
        await reply.carry(
            self.jobs.replay(
                requester, job_id, action, self.fetch, reply, origin=address_of(interaction)
            )
        )

    async def first_press(self, key: tuple[object, ...]) -> bool:
        """Say whether a button press is the first of a burst, across replicas too.

        A server's presses come on its one shard, but a shard moves between replicas
        (one joins, one dies), so the ledger's mark decides; memory spares it the write.
        """
        if not self.presses.first(key):
            return False
        mark = "discord:press:" + ":".join(str(part) for part in key)
        return await self.service.coordination.mark_once(mark, PRESS_WINDOW)

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
