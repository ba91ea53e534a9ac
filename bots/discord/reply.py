"""The runner's Reply on Discord, and every way an interaction is answered.

`DiscordReply` shows one job in one interaction. Discord wants a first answer within 3 s,
and a refusal must be private: `carry` lets the runner check the job (access, prompt,
limits, queue) for up to 2 s, so a refusal is the interaction's first, ephemeral answer
and nothing public comes before it. The job is admitted when the service reports its first
progress (it then holds its reservation): only then, or when the 2 s are up, does the
reply defer publicly, show progress in that answer (with previews: each partial image
attached to it, replacing the last, as a small JPEG), and deliver the images (fitted to the
upload limit, `core.imaging`), an embed with the cost and the replay buttons. Before the
15-minute token runs out the answer says the result will come in the channel; a late
result or failure is posted there, mentioning the user.

Discord quirk for private answers after a public defer: the first followup replaces the
"thinking" message and ignores `ephemeral`. So a private error after a public defer first
settles the deferred message with a neutral line (never the error itself), then sends the
ephemeral followup, then deletes the public message.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
import traceback
from collections.abc import Awaitable

import aiohttp
import discord
from discord import app_commands

from bots.discord.buttons import result_view
from bots.discord.texts import lang_of, text
from bots.logs import scrub_secrets
from core.errors import AccessDenied, DeliveryFailed, ImgbotError, UpstreamError
from core.imaging import FittedImage, fit_under, preview_jpeg, upload_share
from core.pricing import PriceTable
from core.reports import render_caption
from core.service import DrawOutcome
from core.types import GeneratedImage, Progress

log = logging.getLogger(__name__)

CONTENT_LIMIT = 2000
EMBED_TITLE_LIMIT = 256
EMBED_TEXT_LIMIT = 4096
# Discord wants the first answer within 3 s of sending the interaction: a job gets this
# long to pass its checks (or be refused privately) before the public "thinking" answer.
ADMIT_WINDOW = 2.0
ACK_DEADLINE = 2.5
# Stop editing a little before Discord's 15-minute interaction token runs out.
TOKEN_MARGIN = 60.0
# Below this, a call made with the token may arrive after it expired.
TOKEN_GONE = 5.0
_PUBLIC_DEFER = "imgbot_public_defer"
_SETTLED = "imgbot_settled"
_FLUSH_WAIT = 10.0
# Previews go out small: they only show the picture forming.
PARTIAL_MAX_SIDE = 1024
PARTIAL_JPEG_QUALITY = 80


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
    await tell_privately(interaction, error_message(interaction, error))


async def tell_privately(interaction: discord.Interaction, message: str | None) -> None:
    """Answer only the user (None: acknowledge and show nobody anything); never raise."""
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
        return error.user_message(lang, text)
    if isinstance(error, ImgbotError):
        return error.user_message(lang, text)
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
    """Show a job's progress in the deferred answer: latest state wins, never blocks the job.

    A preview (a partial event's image) is attached to the answer as a small JPEG, replacing
    the one before; the result's own edit then replaces it.
    """

    def __init__(self, interaction: discord.Interaction, lang: str) -> None:
        self._interaction = interaction
        self._lang = lang
        self._started = time.monotonic()
        self._latest: str | None = None
        self._shown: str | None = None
        self._image: GeneratedImage | None = None  # the latest preview
        self._number: int | None = None  # its number (1…)
        self._image_shown: GeneratedImage | None = None
        self._task: asyncio.Task[None] | None = None

    async def __call__(self, event: Progress) -> None:
        """Take one progress event from the service."""
        if event.kind == "done" or not token_alive(self._interaction):
            return
        seconds = f"{time.monotonic() - self._started:.0f}"
        key, number = f"progress.{event.kind}", event.index + 1
        if event.kind == "partial" and event.image is not None:
            self._image, self._number = event.image, number
        elif event.kind == "working" and self._number is not None:
            # The answer shows a preview: the clock's tick keeps saying which.
            key, number = "progress.partial", self._number
        self._latest = text(
            self._lang, key, position=event.position, seconds=seconds, number=number
        )
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        # Edits go one at a time; while one is on the wire, newer states just replace _latest.
        while self._latest is not None and (
            self._latest != self._shown or self._image is not self._image_shown
        ):
            content, image = self._latest, self._image
            extra: dict[str, object] = {}
            try:
                if image is not None and image is not self._image_shown:
                    jpeg = await preview_jpeg(
                        image.data, max_side=PARTIAL_MAX_SIDE, quality=PARTIAL_JPEG_QUALITY
                    )
                    extra["attachments"] = [discord.File(io.BytesIO(jpeg), "preview.jpg")]
                if self._latest is None:
                    return  # closed while the preview was being made
                await self._interaction.edit_original_response(content=content, **extra)
            except Exception as err:  # noqa: BLE001 - a courtesy; its URL holds the token
                # Progress is a courtesy: a failed edit must not fail the job, and what went
                # wrong is named by type only (an upload error's text quotes the URL).
                log.debug("progress edit failed: %s", type(err).__name__)
                return
            self._shown, self._image_shown = content, image
            mark_settled(self._interaction)

    async def close(self) -> None:
        """Let a progress edit on the wire finish, so it cannot land after the result."""
        self._latest = None
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), _FLUSH_WAIT)
            except TimeoutError:
                self._task.cancel()


class DiscordReply:
    """Show one job in an interaction: a private refusal, or a public answer that ends in the result."""

    def __init__(self, interaction: discord.Interaction, prices: PriceTable) -> None:
        self.interaction = interaction
        self._prices = prices
        self._lang = lang_of(interaction)
        # Set by the first progress event: the job passed every check and holds its reservation.
        self.admitted = asyncio.Event()
        self._held: Progress | None = None
        self._progress: ProgressMessage | None = None
        self._handover: asyncio.Task[None] | None = None
        # Discord did not take the acknowledgement: the only way back is the channel.
        self._in_channel = False
        # One answer at a time: the public defer and a refusal must not race for the first.
        self._answering = asyncio.Lock()

    async def carry(self, work: Awaitable[None]) -> None:
        """Run the runner's work for this interaction; defer publicly once it is admitted."""
        job = asyncio.ensure_future(work)
        try:
            waiter = asyncio.ensure_future(self.admitted.wait())
            try:
                await asyncio.wait(
                    {job, waiter}, timeout=_ack_budget(self.interaction),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                waiter.cancel()
            if not job.done():
                async with self._answering:
                    await self._go_public()
            await job
        finally:
            if not job.done():
                job.cancel()
            await self._end_progress()

    # --- the runner's Reply ------------------------------------------------------------
    async def progress(self, event: Progress) -> None:
        """Hold the job's progress until the answer is public, then show it there."""
        self.admitted.set()
        if self._progress is None:
            self._held = event
            return
        await self._progress(event)

    async def result(self, outcome: DrawOutcome, four_k_credits: float | None) -> list[str]:
        """Send the images, the cost embed and the buttons; return the attachment URLs."""
        async with self._answering:
            await self._go_public()
            await self._end_progress()
            try:
                message = await self._send_result(outcome)
            except (discord.HTTPException, aiohttp.ClientError, OSError, TimeoutError) as err:
                log.warning("could not send the result of job %d: %s", outcome.job_id, _what(err))
                raise DeliveryFailed(
                    f"Discord answered {_what(err)}", retryable=_passing(err)
                ) from None
            except Exception as err:  # noqa: BLE001 - logged here, without the interaction token
                with contextlib.suppress(DeliveryFailed):
                    await self._say(error_message(self.interaction, err))
                return []
        return [attachment.url for attachment in message.attachments]

    async def refusal(self, message: str | None, error: ImgbotError | None = None) -> None:
        """Say privately why the job did not run, or acknowledge quietly (None)."""
        if isinstance(error, UpstreamError):
            log.warning("upstream error %s (status %s): %s", error.code, error.status, error.detail)
        async with self._answering:
            await self._end_progress()
            await self._say(message)

    async def failure(self, message: str) -> None:
        """Say privately that something went wrong on our side."""
        async with self._answering:
            await self._end_progress()
            await self._say(message)

    # --- answering ---------------------------------------------------------------------
    async def _go_public(self) -> None:
        """Acknowledge with a public "thinking" answer (once), and start showing progress."""
        interaction = self.interaction
        if self._in_channel or interaction.response.is_done():
            return
        try:
            await defer_public(interaction)
        except (discord.HTTPException, aiohttp.ClientError, OSError) as err:
            # Too late to acknowledge (a stalled loop, a slow network). The job holds its
            # reservation and may be drawing: finish it and answer in the channel.
            log.warning("interaction %s not acknowledged: %s", interaction.id, err)
            self._in_channel = True
            return
        self._progress = ProgressMessage(interaction, self._lang)
        self._handover = asyncio.create_task(_hand_over(interaction, self._progress))
        held, self._held = self._held, None
        if held is not None:
            await self._progress(held)

    async def _end_progress(self) -> None:
        """Stop progress edits; let a hand-over already due finish first (it comes before us)."""
        handover, self._handover = self._handover, None
        if handover is not None and not handover.done():
            if token_alive(self.interaction):
                handover.cancel()
            else:
                with contextlib.suppress(Exception):
                    await handover
        if self._progress is not None:
            await self._progress.close()

    async def _say(self, message: str | None) -> None:
        interaction = self.interaction
        late = interaction.response.is_done() and not token_usable(interaction)
        if message is None:
            await tell_privately(interaction, None)
            return
        try:
            if not (self._in_channel or late):
                await answer_private(interaction, message)
                return
            # The token is gone, and with it every private way back: say it in the channel.
            channel = interaction.channel
            if not isinstance(channel, discord.abc.Messageable):
                return
            content = text(self._lang, "discord.late_failed", mention=interaction.user.mention)
            await channel.send(content=clip(f"{content}\n{message}"))
        except (discord.HTTPException, aiohttp.ClientError, OSError, TimeoutError) as err:
            # A 5xx or a lost connection may pass: the runner says it again.
            if _passing(err):
                raise DeliveryFailed(f"Discord answered {_what(err)}", retryable=True) from None
            log.warning("could not tell user %s why a job ended: %s", interaction.user.id, err)

    async def _send_result(self, outcome: DrawOutcome) -> discord.Message:
        interaction = self.interaction
        lang = outcome.lang
        files, embed, view = await result_parts(outcome, self._prices, interaction.filesize_limit)
        if token_alive(interaction) and not self._in_channel:
            message = await interaction.edit_original_response(
                content=None, embed=embed, attachments=files, view=view
            )
            mark_settled(interaction)
            return message
        # The 15-minute token is gone (or was never usable): post in the channel, naming the user.
        channel = interaction.channel
        if not isinstance(channel, discord.abc.Messageable):
            raise discord.ClientException("no channel to deliver a late result to")
        content = text(lang, "discord.late", mention=interaction.user.mention)
        return await channel.send(content=content, embed=embed, files=files, view=view)



async def result_parts(
    outcome: DrawOutcome, prices: PriceTable, limit: int
) -> tuple[list[discord.File], discord.Embed, discord.ui.View]:
    """Return a result's files (fitted under the upload limit), its embed and its buttons."""
    lang = outcome.lang
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
    caption = render_caption(outcome, prices, limit=EMBED_TEXT_LIMIT)
    description = "\n".join([caption, *notes]) if notes else caption
    embed = discord.Embed(
        title=clip(outcome.request.prompt, EMBED_TITLE_LIMIT) or None,
        description=clip(description, EMBED_TEXT_LIMIT),
        colour=discord.Colour.blurple(),
    )
    return files, embed, result_view(outcome.job_id, lang)


def _what(err: BaseException) -> str:
    """Name a failed Discord call's problem for a log line: its status, or the error's kind."""
    return str(getattr(err, "status", None) or type(err).__name__)


def _passing(err: BaseException) -> bool:
    """Say whether a failed Discord call may work later (5xx, network), not a 4xx."""
    if isinstance(err, discord.HTTPException):
        return err.status >= 500 or err.status == 429
    return isinstance(err, (aiohttp.ClientError, OSError, TimeoutError))


# --- a job carried on after a restart ------------------------------------------------------
# Discord's upload limit when no interaction says otherwise (a server may allow more).
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
# An interaction token works for 15 minutes; after that the channel is the way back.
TOKEN_LIFE = 15 * 60.0


def address_of(interaction: discord.Interaction) -> dict[str, str]:
    """Return where a job's answers go, kept with it so any worker can deliver it.

    The interaction token (valid 15 minutes) lets a worker that takes the job over answer
    in the same interaction; the ledger keeping it is private (0600 / database access).
    """
    address = {"via": "discord", "user": str(interaction.user.id)}
    if interaction.channel_id:
        address["channel"] = str(interaction.channel_id)
    if interaction.application_id and interaction.token:
        address["app"] = str(interaction.application_id)
        address["token"] = interaction.token
        address["token_at"] = f"{interaction.created_at.timestamp():.0f}"
    return address


class ResumedReply:
    """Answer a job another process left: in its interaction while the token lives, else
    in its channel (or the user's DMs), naming the user."""

    def __init__(
        self, client: discord.Client, address: dict[str, str], user_id: int, lang: str,
        prices: PriceTable,
    ) -> None:
        self._client = client
        self._address = address
        self._user = user_id
        self._lang = lang
        self._prices = prices

    def _token_fresh(self) -> bool:
        try:
            born = float(self._address.get("token_at", "0"))
        except ValueError:
            return False
        left = TOKEN_LIFE - (time.time() - born)
        return bool(self._address.get("token")) and left > TOKEN_MARGIN

    async def _destination(self) -> discord.abc.Messageable:
        channel = self._address.get("channel", "")
        if channel.isdigit():
            return self._client.get_partial_messageable(int(channel))
        return await self._client.create_dm(discord.Object(id=self._user))

    def _mention(self) -> discord.AllowedMentions:
        return discord.AllowedMentions(
            everyone=False, roles=False, users=[discord.Object(id=self._user)]
        )

    async def say(self, message: str) -> None:
        """Post a line in the job's channel, naming the user (best effort)."""
        try:
            destination = await self._destination()
            await destination.send(
                content=clip(f"<@{self._user}> {message}"), allowed_mentions=self._mention()
            )
        except (discord.HTTPException, aiohttp.ClientError, OSError, TimeoutError,
                ValueError) as err:
            if not isinstance(err, ValueError) and _passing(err):
                raise DeliveryFailed(f"Discord answered {_what(err)}", retryable=True) from None
            log.info("could not post in a resumed job's channel: %s", type(err).__name__)

    async def progress(self, event: Progress) -> None:
        """Progress of a resumed job is not shown (the resume notice said it goes on)."""

    async def result(self, outcome: DrawOutcome, four_k_credits: float | None) -> list[str]:
        """Send the images: a followup in the interaction, or a channel message."""
        try:
            message = None
            if self._token_fresh():
                try:
                    message = await self._follow_up(outcome)
                except discord.HTTPException as err:
                    # 404 Unknown Webhook: the process that took the interaction died
                    # before Discord had its acknowledgement, so the interaction cannot be
                    # answered (the user saw it fail); 401: the token is no longer valid.
                    if err.status not in (401, 404):
                        raise
                    log.info("job %d: its interaction cannot be answered (HTTP %s); posting"
                             " in its channel", outcome.job_id, err.status)
            if message is None:
                message = await self._post(outcome)
        except (discord.HTTPException, aiohttp.ClientError, OSError, TimeoutError) as err:
            raise DeliveryFailed(f"Discord answered {_what(err)}", retryable=_passing(err)) from None
        return [attachment.url for attachment in message.attachments]

    async def _follow_up(self, outcome: DrawOutcome) -> discord.Message:
        """Send the result as a followup in the job's interaction."""
        files, embed, view = await result_parts(outcome, self._prices, DEFAULT_UPLOAD_LIMIT)
        # As discord.py's own Interaction.followup builds it: the interaction's webhook, on
        # the client's connection state (for the buttons).
        webhook = discord.Webhook.from_state(
            data={"id": self._address["app"], "type": 3, "token": self._address["token"]},
            state=self._client._connection,  # noqa: SLF001 - as discord.py does
        )
        return await webhook.send(embed=embed, files=files, view=view, wait=True)

    async def _post(self, outcome: DrawOutcome) -> discord.Message:
        """Post the result in the job's channel (or the user's DMs), naming the user."""
        files, embed, view = await result_parts(outcome, self._prices, DEFAULT_UPLOAD_LIMIT)
        destination = await self._destination()
        content = text(self._lang, "discord.late", mention=f"<@{self._user}>")
        return await destination.send(
            content=content, embed=embed, files=files, view=view,
            allowed_mentions=self._mention(),
        )

    async def refusal(self, message: str | None, error: ImgbotError | None = None) -> None:
        """Say why the resumed job ended (nothing for a silent end)."""
        if message:
            await self.say(message)

    async def failure(self, message: str) -> None:
        """Say the resumed job failed on our side."""
        await self.say(message)


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


def _ack_budget(interaction: discord.Interaction) -> float:
    """Return how long the first answer may wait: Discord allows 3 s from sending it."""
    age = (discord.utils.utcnow() - interaction.created_at).total_seconds()
    # A clock behind Discord's makes the age negative: then the window from now counts.
    return max(0.0, min(ADMIT_WINDOW, ACK_DEADLINE - age))


def _mib(size: int) -> str:
    # Discord's "10 MB" upload limit is 10 MiB; say it the way Discord does.
    return f"{size / (1024 * 1024):.1f}".rstrip("0").rstrip(".")


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
