"""The Discord adapter: slash commands, a message menu and buttons over `core.service`.

`build_bot(settings, service)` wires a `commands.Bot` (no privileged intents; every command
is an application command on its tree; one tree error handler; edit forms answered by
custom id in `on_interaction`). `run_discord` logs in, syncs the commands (to
DISCORD_GUILD_IDS for fast testing, else globally), tells users about jobs a crash cut
off, runs until `stop` is set, lets answers in flight finish, and closes. The caller owns
the service.

Pieces live in `bots.discord`: texts (wording, localisation), requester, reply (the
runner's Reply: progress, results, errors), drawing (references, the runner), buttons,
commands, admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from bots.discord.admin import AdminCommands, ServerCommands
from bots.discord.buttons import JobButton
from bots.discord.commands import EDIT_FORM_PREFIX, UserCommands
from bots.discord.drawing import DiscordDrawing
from bots.discord.reply import ResumedReply, clip, report_error
from bots.discord.requester import PLATFORM
from bots.discord.texts import CommandTranslator, text
from core.config import Settings
from core.messages import language_of
from core.service import ImageService
from core.store import JobRecord

if TYPE_CHECKING:
    from core.store import JobRecord

log = logging.getLogger(__name__)

# How long answers still in flight may take once we stop, beyond the service's own grace.
_CLOSE_SLACK = 10.0


class ImgBot(commands.Bot):
    """The Discord client: commands on the tree, buttons as dynamic items."""

    def __init__(self, settings: Settings, service: ImageService) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            help_command=None,
            intents=discord.Intents(guilds=True),
            allowed_mentions=discord.AllowedMentions(everyone=False, roles=False, users=True),
        )
        self.settings = settings
        self.service = service
        self.imgbot_drawing = DiscordDrawing(self.http, service, settings)
        self._resuming: set[asyncio.Task[None]] = set()

    async def setup_hook(self) -> None:
        """Register commands, buttons and the translator; syncing is `run_discord`'s job."""
        await self.tree.set_translator(CommandTranslator())
        self.imgbot_commands = UserCommands(self, self.imgbot_drawing, self.service)
        await self.add_cog(self.imgbot_commands)
        await self.add_cog(AdminCommands(self.service, self.settings))
        await self.add_cog(ServerCommands(self.service, self.settings))
        self.add_dynamic_items(JobButton)
        self.tree.on_error = on_app_command_error


    def start_durable(self) -> None:
        """Carry on Discord jobs a dead process left, and send operator alerts to the
        Discord admins (ADMINS entries `discord:<id>`) by direct message."""
        self.service.resumers[PLATFORM] = self.resume
        self.service.alert_senders.append(self.alert_admins)

    def stop_durable(self) -> None:
        """Take no more jobs over (the bot is stopping)."""
        self.service.resumers.pop(PLATFORM, None)
        if self.alert_admins in self.service.alert_senders:
            self.service.alert_senders.remove(self.alert_admins)

    def resume(self, job: JobRecord) -> None:
        """Deliver or draw again, where it was asked, a job another process left."""
        task = asyncio.create_task(self._resume(job), name=f"imgbot:resume-{job.id}")
        self._resuming.add(task)
        task.add_done_callback(self._resuming.discard)

    async def _resume(self, job: JobRecord) -> None:
        try:
            origin = json.loads(job.request_json or "{}").get("origin") or {}
        except ValueError:
            origin = {}
        address = {str(k): str(v) for k, v in origin.items()} if isinstance(origin, dict) else {}
        requester = await self.service.requester_of(job)
        lang = language_of(requester.language)
        reply = ResumedReply(self, address, int(job.user_id), lang, self.service.prices)
        await reply.say(text(lang, "job.resumed", job_id=job.id))
        await self.imgbot_drawing.jobs.resume(job, reply, self.imgbot_drawing.fetch)

    async def alert_admins(self, message: str) -> None:
        """Send an operator alert to the Discord channels of ALERT_CHATS, else to every
        Discord admin by direct message."""
        content = clip(f"⚠️ imgbot: {message}")
        channels = bool(self.settings.alert_chats)
        for target in self.settings.alert_targets(PLATFORM):
            if not target.isdigit():
                continue
            try:
                if channels:
                    await self.get_partial_messageable(int(target)).send(content=content)
                else:
                    channel = await self.create_dm(discord.Object(id=int(target)))
                    await channel.send(content=content)
            except (discord.HTTPException, aiohttp.ClientError, OSError) as err:
                log.warning("alert to discord:%s not sent: %s", target, type(err).__name__)

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        """Answer edit forms by their custom id; everything else has its own handler."""
        if interaction.type is not discord.InteractionType.modal_submit:
            return
        custom_id = str((interaction.data or {}).get("custom_id", ""))
        if not custom_id.startswith(EDIT_FORM_PREFIX):
            return
        try:
            await self.imgbot_commands.submit_edit(interaction)
        except Exception as err:  # noqa: BLE001 - answered like any other failure
            await report_error(interaction, err)


async def on_app_command_error(
    interaction: discord.Interaction, error: app_commands.AppCommandError
) -> None:
    """Answer every command failure privately in the user's language; log the unexpected."""
    await report_error(interaction, error)


def build_bot(settings: Settings, service: ImageService) -> commands.Bot:
    """Build the Discord bot around a running service (commands register in setup_hook)."""
    return ImgBot(settings, service)


async def sync_commands(bot: commands.Bot, settings: Settings) -> None:
    """Sync the commands to the configured guilds (instant), or globally (up to an hour).

    Discord shows a server both its guild commands and the global ones, so after a
    successful guild sync the global set is emptied: each command shows once. (Going back
    from guilds to global cannot be cleaned up from here; the README says how.)
    """
    targets: list[discord.Object | None] = []
    for guild_id in settings.discord_guild_ids:
        if guild_id.isdigit():
            targets.append(discord.Object(id=int(guild_id)))
        else:
            log.error("DISCORD_GUILD_IDS: %r is not a server id (a number); skipped", guild_id)
    if not settings.discord_guild_ids:
        targets.append(None)
    synced_to_guild = False
    for guild in targets:
        where = f"server {guild.id}" if guild else "all servers (global)"
        try:
            if guild is not None:
                bot.tree.copy_global_to(guild=guild)
            synced = await bot.tree.sync(guild=guild)
        except discord.HTTPException as err:
            # Commands synced earlier keep working; say what to check and keep running.
            log.error(
                "could not sync Discord commands to %s (HTTP %s): is the bot in that server, "
                "invited with the applications.commands scope?",
                where,
                err.status,
            )
            continue
        synced_to_guild = synced_to_guild or guild is not None
        log.info("synced %d Discord commands to %s", len(synced), where)
    if synced_to_guild and bot.application_id is not None:
        try:
            await bot.http.bulk_upsert_global_commands(bot.application_id, payload=[])
        except discord.HTTPException as err:
            log.error("could not remove the global Discord commands (HTTP %s)", err.status)
        else:
            log.info("removed the global Discord commands (DISCORD_GUILD_IDS is set)")


# Gateway close codes that no retry can fix (bad token, intents, shard or API version).
_FATAL_CLOSE_CODES = frozenset({4004, 4010, 4011, 4012, 4013, 4014})


def startup_failure(exc: BaseException, settings: Settings) -> tuple[str, bool]:
    """Say in one line why the bot could not run (never the token); True: trying again may help."""
    if isinstance(exc, discord.LoginFailure):
        return (
            "Discord refused DISCORD_BOT_TOKEN (401 Unauthorized): "
            "copy the bot's token again from the developer portal",
            False,
        )
    if isinstance(exc, discord.PrivilegedIntentsRequired):
        return "Discord refused a privileged intent this bot asked for", False
    if isinstance(exc, discord.ConnectionClosed):
        return f"Discord closed the gateway (code {exc.code}: {exc.reason})", (
            exc.code not in _FATAL_CLOSE_CODES
        )
    if isinstance(exc, discord.HTTPException):
        transient = exc.status >= 500 or exc.status == 429
        return f"Discord answered {exc.status} ({exc.text or exc.status})", transient
    if isinstance(exc, aiohttp.ClientError | OSError | TimeoutError | discord.GatewayNotFound):
        return f"Discord is unreachable ({type(exc).__name__}: {exc})", True
    return f"{type(exc).__name__}: {exc}", False


async def run_discord(settings: Settings, service: ImageService, stop: asyncio.Event) -> None:
    """Run the Discord bot until `stop` is set; raise if it cannot log in or connect."""
    bot = ImgBot(settings, service)
    token = settings.discord_bot_token.get_secret_value()
    async with bot:
        await bot.login(token)
        await sync_commands(bot, settings)
        bot.start_durable()
        connection = asyncio.create_task(bot.connect(reconnect=True), name="discord-gateway")
        stopping = asyncio.create_task(stop.wait(), name="discord-stop")
        try:
            await asyncio.wait({connection, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if connection.done():
                connection.result()  # a login or gateway failure surfaces here
                return
            log.info("Discord bot stopping; waiting for answers in flight")
            # The service drains its jobs meanwhile; their results still need this session.
            await bot.imgbot_drawing.jobs.drain(settings.shutdown_grace + _CLOSE_SLACK)
        finally:
            stopping.cancel()
            bot.stop_durable()
            await bot.close()
            connection.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await connection
    log.info("Discord bot stopped")
