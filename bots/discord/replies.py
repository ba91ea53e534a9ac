"""Answering interactions: progress edits, private answers, and the one error path.

Refusals are checked before anything is shown (see `DrawRunner._run`), so most private
answers are the interaction's first, ephemeral response. Discord quirk for the rest: after
a public `defer(thinking=True)`, the first followup replaces the "thinking" message and
ignores `ephemeral`. So a private error after a public defer first settles the deferred
message with a neutral line (never the error itself), then sends the ephemeral followup,
then deletes the public message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback

import aiohttp
import discord
from discord import app_commands

from bots.discord.texts import lang_of
from bots.logs import scrub_secrets
from core.errors import AccessDenied, ImgbotError, UpstreamError
from core.messages import text
from core.service import Progress

log = logging.getLogger(__name__)

CONTENT_LIMIT = 2000
# Stop editing a little before Discord's 15-minute interaction token runs out.
TOKEN_MARGIN = 60.0
# Below this, a call made with the token may arrive after it expired.
TOKEN_GONE = 5.0
_PUBLIC_DEFER = "imgbot_public_defer"
_SETTLED = "imgbot_settled"
_FLUSH_WAIT = 10.0


def clip(message: str, limit: int = CONTENT_LIMIT) -> str:
    """Cut a text to a Discord length limit, marking the cut."""
    return message if len(message) <= limit else message[: limit - 1] + "…"


def token_left(interaction: discord.Interaction) -> float:
    """Return the seconds the interaction token has left."""
    return (interaction.expires_at - discord.utils.utcnow()).total_seconds()


def token_alive(interaction: discord.Interaction) -> bool:
    """Say whether the interaction token can still edit and follow up (with a margin)."""
    return token_left(interaction) > TOKEN_MARGIN


def token_usable(interaction: discord.Interaction) -> bool:
    """Say whether one more quick call can still go through the interaction token."""
    return token_left(interaction) > TOKEN_GONE


async def defer_public(interaction: discord.Interaction) -> None:
    """Acknowledge at once with a public "thinking" answer that we edit later."""
    await interaction.response.defer(thinking=True)
    interaction.extras[_PUBLIC_DEFER] = True


def mark_settled(interaction: discord.Interaction) -> None:
    """Note that the deferred answer has been edited, so followups are messages of their own."""
    interaction.extras[_SETTLED] = True


async def answer_private(interaction: discord.Interaction, message: str) -> None:
    """Tell only the user, whatever state the interaction is in."""
    message = clip(message)
    if not interaction.response.is_done():
        await interaction.response.send_message(message, ephemeral=True)
        return
    if not interaction.extras.get(_PUBLIC_DEFER):
        await interaction.followup.send(message, ephemeral=True)
        return
    if not interaction.extras.get(_SETTLED):
        neutral = text(lang_of(interaction), "discord.answered_privately")
        await interaction.edit_original_response(content=neutral)
        mark_settled(interaction)
    await interaction.followup.send(message, ephemeral=True)
    await _delete_original(interaction)


async def _delete_original(interaction: discord.Interaction) -> None:
    with contextlib.suppress(discord.HTTPException):
        await interaction.delete_original_response()


async def report_error(interaction: discord.Interaction, error: BaseException) -> None:
    """Tell the user about an error in their language (silent refusals: nothing); log the rest."""
    message = error_message(interaction, error)
    if message is None:
        try:
            await _acknowledge_silently(interaction)
        except (discord.HTTPException, aiohttp.ClientError, OSError) as err:
            log.debug("could not acknowledge a silent refusal: %s", type(err).__name__)
        return
    try:
        await answer_private(interaction, message)
    except (discord.HTTPException, aiohttp.ClientError, OSError) as err:
        # Most often the 15-minute token ran out; nothing else can reach the user privately.
        log.warning("could not tell user %s about an error: %s", interaction.user.id, err)


def error_message(interaction: discord.Interaction, error: BaseException) -> str | None:
    """Return what to tell the user about an error (None: a silent refusal); log the rest."""
    if isinstance(error, app_commands.CommandInvokeError):
        error = error.original
    lang = lang_of(interaction)
    if isinstance(error, AccessDenied) and error.params.get("silent"):
        return None
    if isinstance(error, UpstreamError):
        log.warning("upstream error %s (status %s): %s", error.code, error.status, error.detail)
        return error.user_message(lang)
    if isinstance(error, ImgbotError):
        return error.user_message(lang)
    if isinstance(error, app_commands.CheckFailure):
        return text(lang, "access.denied")
    # The interaction token is a credential for 15 minutes; it may sit in a URL in the trace.
    trace = scrub_secrets("".join(traceback.format_exception(error)), interaction.token)
    log.error(
        "unexpected error in interaction %s (%s) from user %s\n%s",
        interaction.id,
        _what(interaction),
        interaction.user.id if interaction.user else "-",
        trace,
    )
    return text(lang, "error.internal")


async def _acknowledge_silently(interaction: discord.Interaction) -> None:
    # Discord wants every interaction answered; a silent refusal shows nobody anything.
    if not interaction.response.is_done():
        if interaction.type is discord.InteractionType.component:
            await interaction.response.defer()  # "update the message": nothing changes
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
    await _delete_original(interaction)


def _what(interaction: discord.Interaction) -> str:
    if interaction.command is not None:
        return f"/{interaction.command.qualified_name}"
    return interaction.custom_id or interaction.type.name


class ProgressMessage:
    """Show a job's progress in the deferred answer: latest state wins, never blocks the job."""

    def __init__(self, interaction: discord.Interaction, lang: str) -> None:
        self._interaction = interaction
        self._lang = lang
        self._started = time.monotonic()
        self._latest: str | None = None
        self._shown: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def __call__(self, event: Progress) -> None:
        """Take one progress event from the service."""
        if event.kind == "done" or not token_alive(self._interaction):
            return
        seconds = f"{time.monotonic() - self._started:.0f}"
        key = f"progress.{event.kind}"
        self._latest = text(self._lang, key, position=event.position, seconds=seconds)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        # Edits go one at a time; while one is on the wire, newer states just replace _latest.
        while self._latest is not None and self._latest != self._shown:
            content = self._latest
            try:
                await self._interaction.edit_original_response(content=content)
            except (discord.HTTPException, aiohttp.ClientError, OSError) as err:
                # Progress is a courtesy: a failed edit must not fail the job.
                log.debug("progress edit failed: %s", type(err).__name__)
                return
            self._shown = content
            mark_settled(self._interaction)

    async def close(self) -> None:
        """Let a progress edit on the wire finish, so it cannot land after the result."""
        self._latest = None
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), _FLUSH_WAIT)
            except TimeoutError:
                self._task.cancel()
