"""The Discord adapter: slash commands, a message menu and buttons over `core.service`.

`build_bot(settings, service)` wires a `commands.AutoShardedBot` (no privileged intents;
every command is an application command on its tree; one tree error handler; edit forms
answered by custom id in `on_interaction`). `run_discord` logs in, syncs the commands (to
DISCORD_GUILD_IDS for fast testing, else globally; once per deploy when replicas share a
ledger), takes its gateway shards (`bots.discord.shards`: fixed, or shared through the
ledger's leases), carries on jobs a dead process left, runs until `stop` is set, lets
answers in flight finish, and closes. A process holding no shard still finishes jobs:
answers go through the interaction webhook, which needs no gateway. The caller owns the
service.

Pieces live in `bots.discord`: texts (wording, localisation), requester, reply (the
runner's Reply: progress, results, errors), drawing (references, the runner), buttons,
commands, admin, shards (who connects which gateway shard, through the ledger).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from typing import TYPE_CHECKING

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands
from discord.gateway import DiscordWebSocket

from bots.discord.admin import AdminCommands, ServerCommands
from bots.discord.buttons import JobButton
from bots.discord.commands import EDIT_FORM_PREFIX, UserCommands
from bots.discord.drawing import DiscordDrawing
from bots.discord.reply import ResumedReply, clip, report_error
from bots.discord.requester import PLATFORM
from bots.discord.shards import (
    ShardCountMismatch,
    ShardsTaken,
    agreed_count,
    balance_shards,
    hold_fixed_shards,
    release_shards,
    shard_role,
)
from bots.discord.texts import CommandTranslator, text
from core.config import Settings
from core.errors import DeliveryFailed
from core.messages import language_of
from core.service import ImageService
from core.store import JobRecord

if TYPE_CHECKING:
    from core.store import JobRecord

log = logging.getLogger(__name__)

# How long answers still in flight may take once we stop, beyond the service's own grace.
_CLOSE_SLACK = 10.0
# Discord takes one IDENTIFY per 5 s from all of a bot's connections (max_concurrency 1,
# every bot under 150,000 servers), whichever process they are in.
IDENTIFY_EVERY = 5.0
IDENTIFY_POLL = 0.25


class ImgBot(commands.AutoShardedBot):
    """The Discord client: commands on the tree, buttons as dynamic items, and the
    gateway shards this process holds (which may change while it runs)."""

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
        self._launched = False
        self._launching: dict[int, asyncio.Task[None]] = {}
        self._identifies = 0

    async def setup_hook(self) -> None:
        """Register commands, buttons and the translator; syncing is `run_discord`'s job."""
        await self.tree.set_translator(CommandTranslator())
        self.imgbot_commands = UserCommands(self, self.imgbot_drawing, self.service)
        await self.add_cog(self.imgbot_commands)
        await self.add_cog(AdminCommands(self.service, self.settings))
        await self.add_cog(ServerCommands(self.service, self.settings))
        self.add_dynamic_items(JobButton)
        self.tree.on_error = on_app_command_error

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """Wait for this bot's IDENTIFY turn, shared by every replica through the ledger
        (a lease held IDENTIFY_EVERY seconds), instead of discord.py's 5 s sleep in each
        process: replicas starting together would IDENTIFY together, and Discord answers
        that by invalidating the sessions."""
        self._identifies += 1
        owner = f"{self.service.owner}:identify:{shard_id}:{self._identifies}"
        while not self.is_closed():
            try:
                if await self.service.coordination.hold_lease(
                    "discord:identify", owner, IDENTIFY_EVERY, f"shard {shard_id}"
                ):
                    return
            except Exception as err:  # noqa: BLE001 - the ledger in trouble: keep to our own
                log.warning("discord: no IDENTIFY turn from the ledger (%s); waiting 5 s", err)
                await super().before_identify_hook(shard_id, initial=False)
                return
            await asyncio.sleep(IDENTIFY_POLL)

    async def launch_shards(self) -> None:
        """Connect the shards this process holds now (maybe none: then it only answers
        through interaction webhooks until a shard comes free)."""
        if self.is_closed():
            return
        if self.shard_count is None:  # nobody chose: Discord's advice, every shard here
            await super().launch_shards()
            return
        ids = sorted(self.shard_ids or [])
        self._connection.shard_count = self.shard_count
        self.shard_ids = self._connection.shard_ids = ids
        self._launched = True
        for shard_id in ids:
            await self.launch_shard(
                DiscordWebSocket.DEFAULT_GATEWAY, shard_id, initial=shard_id == ids[0]
            )

    def add_shard(self, shard_id: int) -> None:
        """Connect one more shard (its lease is held already)."""
        self.shard_ids = self._connection.shard_ids = sorted({*(self.shard_ids or []), shard_id})
        if not self._launched or self.is_closed():
            return  # launch_shards connects it
        task = asyncio.create_task(
            self.launch_shard(DiscordWebSocket.DEFAULT_GATEWAY, shard_id),
            name=f"imgbot:discord-shard-{shard_id}",
        )
        self._launching[shard_id] = task
        task.add_done_callback(lambda _: self._launching.pop(shard_id, None))

    async def drop_shard(self, shard_id: int) -> None:
        """Disconnect one shard (before its lease is given up)."""
        launching = self._launching.pop(shard_id, None)
        if launching is not None:
            launching.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await launching
        shard = self.get_shard(shard_id)
        if shard is not None:
            await shard.disconnect()
        self.shard_ids = self._connection.shard_ids = [
            i for i in self.shard_ids or [] if i != shard_id
        ]

    def start_durable(self) -> None:
        """Carry on Discord jobs a dead process left, and send operator alerts to the
        Discord admins (ADMINS entries `discord:<id>`) by direct message."""
        self.service.add_resumer(PLATFORM, self.resume)
        self.service.alert_senders.append(self.alert_admins)

    def stop_durable(self) -> None:
        """Take no more jobs over (the bot is stopping)."""
        self.service.drop_resumer(PLATFORM)
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
        with contextlib.suppress(DeliveryFailed):  # a notice only: the job goes on
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


# How long a sync is remembered: a deploy with the same commands never syncs again within
# it (a changed tree or guild list is a new mark, synced at once).
SYNC_MEMORY = 30 * 24 * 3600.0


def _sync_targets(settings: Settings) -> list[discord.Object | None]:
    targets: list[discord.Object | None] = []
    for guild_id in settings.discord_guild_ids:
        if guild_id.isdigit():
            targets.append(discord.Object(id=int(guild_id)))
        else:
            log.error("DISCORD_GUILD_IDS: %r is not a server id (a number); skipped", guild_id)
    if not settings.discord_guild_ids:
        targets.append(None)
    return targets


async def sync_mark(bot: commands.Bot, settings: Settings) -> str:
    """Return the ledger mark of one sync: a hash of the commands as Discord would get
    them (translations included), the application and the guild ids."""
    translator = bot.tree.translator
    payload = []
    for command in bot.tree.get_commands():
        if translator is not None:
            payload.append(await command.get_translated_payload(bot.tree, translator))
        else:
            payload.append(command.to_dict(bot.tree))
    shape = json.dumps(
        [bot.application_id, sorted(settings.discord_guild_ids), payload],
        sort_keys=True, default=str,
    )
    return f"discord:sync:{hashlib.sha256(shape.encode()).hexdigest()[:32]}"


async def sync_commands(
    bot: commands.Bot, settings: Settings, service: ImageService | None = None
) -> bool:
    """Sync the commands to the configured guilds (instant), or globally (up to an hour).

    Discord shows a server both its guild commands and the global ones, so after a
    successful guild sync the global set is emptied: each command shows once. (Going back
    from guilds to global cannot be cleaned up from here; the README says how.)

    With a service, the sync is done once per deploy: a replica that finds the ledger's
    mark for these very commands skips it; the mark is set only after every target took
    them (two replicas starting at once may both sync: the same PUT twice does no harm).
    Return whether Discord was asked.
    """
    targets = _sync_targets(settings)
    for guild in targets:
        if guild is not None:
            bot.tree.copy_global_to(guild=guild)
    mark = await sync_mark(bot, settings) if service is not None else ""
    if service is not None and await service.coordination.is_marked(mark):
        log.info("Discord commands already synced by a replica (same commands); skipped")
        return False
    synced_to_guild = False
    failed = False
    for guild in targets:
        where = f"server {guild.id}" if guild else "all servers (global)"
        try:
            synced = await bot.tree.sync(guild=guild)
        except discord.HTTPException as err:
            # Commands synced earlier keep working; say what to check and keep running.
            log.error(
                "could not sync Discord commands to %s (HTTP %s): is the bot in that server, "
                "invited with the applications.commands scope?",
                where,
                err.status,
            )
            failed = True
            continue
        synced_to_guild = synced_to_guild or guild is not None
        log.info("synced %d Discord commands to %s", len(synced), where)
    if synced_to_guild and bot.application_id is not None:
        try:
            await bot.http.bulk_upsert_global_commands(bot.application_id, payload=[])
        except discord.HTTPException as err:
            failed = True
            log.error("could not remove the global Discord commands (HTTP %s)", err.status)
        else:
            log.info("removed the global Discord commands (DISCORD_GUILD_IDS is set)")
    if service is not None and not failed:
        await service.coordination.mark_once(mark, SYNC_MEMORY)
    return True


# Gateway close codes that no retry can fix (bad token, intents, shard or API version).
_FATAL_CLOSE_CODES = frozenset({4004, 4010, 4011, 4012, 4013, 4014})


def startup_failure(exc: BaseException, settings: Settings) -> tuple[str, bool]:
    """Say in one line why the bot could not run (never the token); True: trying again may help."""
    if isinstance(exc, ShardsTaken | ShardCountMismatch):
        return str(exc), False
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


async def choose_shard_count(bot: commands.Bot, settings: Settings, service: ImageService) -> int:
    """Return the shard count every replica uses: DISCORD_SHARD_COUNT, else the one the
    live replicas already use, else Discord's advice; refuse a count the others do not use."""
    agreed = await agreed_count(service.coordination)
    configured = settings.discord_shard_count
    if configured and agreed is not None and agreed != configured:
        raise ShardCountMismatch(
            f"DISCORD_SHARD_COUNT={configured}, but the running replicas use {agreed} shards:"
            " give every replica the same count (stop them all to change it)"
        )
    if configured:
        return configured
    if agreed is not None:
        return agreed
    advised, _, _ = await bot.http.get_bot_gateway()
    return max(1, int(advised))


class ShardKeeper:
    """This process's gateway shards: taken at start, renewed, given up and taken over
    while it runs (see `bots.discord.shards`), shown as its role for `imgbot doctor`."""

    def __init__(self, bot: ImgBot, settings: Settings, service: ImageService, count: int) -> None:
        self.bot, self.settings, self.service, self.count = bot, settings, service, count
        self.fixed = sorted(settings.discord_shard_ids)
        self.held: frozenset[int] = frozenset()
        self.role = ""
        self.lease = settings.job_lease

    async def start(self) -> None:
        """Take this process's first shards (before the gateway connects)."""
        if self.fixed:
            deadline = time.monotonic() + self.lease * 2 + 1
            while True:
                try:
                    await hold_fixed_shards(
                        self.service.coordination, self.service.owner, self.count, self.fixed,
                        self.lease,
                    )
                    break
                except ShardsTaken:
                    # A process that just died still holds them until its lease ends.
                    if time.monotonic() > deadline:
                        raise
                    log.info("a Discord shard of DISCORD_SHARD_IDS is held; waiting for it")
                    await asyncio.sleep(max(0.2, self.lease / 3))
            self.held = frozenset(self.fixed)
        else:
            await self.balance()
        self.bot.shard_count = self.count
        self.bot.shard_ids = sorted(self.held)
        self._show()

    async def balance(self) -> None:
        """One round of automatic assignment; connect what it gained."""
        result = await balance_shards(
            self.service.coordination, self.service.owner, self.count, self.held, self.lease,
            self.bot.drop_shard,
        )
        self.held = result.held
        for shard_id in sorted(result.gained):
            self.bot.add_shard(shard_id)
        if result.gained or result.lost:
            log.info("Discord shards here: %s of %d", shard_role(self.held), self.count)
            self._show()

    async def keep(self) -> None:
        """Renew (and, when automatic, rebalance) every third of JOB_LEASE, until cancelled."""
        while True:
            await asyncio.sleep(max(0.2, self.lease / 3))
            try:
                if self.fixed:
                    await hold_fixed_shards(
                        self.service.coordination, self.service.owner, self.count, self.fixed,
                        self.lease,
                    )
                else:
                    await self.balance()
            except ShardsTaken as err:
                log.error("%s", err)
            except Exception as err:  # noqa: BLE001 - tried again next round
                log.warning("Discord shard leases not renewed: %s", err)

    async def release(self) -> None:
        """Give the shards up at once (a clean stop): the others take them next round."""
        self.service.roles.discard(self.role)
        try:
            await release_shards(self.service.coordination, self.service.owner, self.held)
        except Exception as err:  # noqa: BLE001 - they expire by themselves
            log.debug("Discord shard leases not released: %s", err)

    def _show(self) -> None:
        self.service.roles.discard(self.role)
        self.role = shard_role(self.held) + f"/{self.count}"
        self.service.roles.add(self.role)


async def run_discord(settings: Settings, service: ImageService, stop: asyncio.Event) -> None:
    """Run the Discord bot until `stop` is set; raise if it cannot log in or connect."""
    bot = ImgBot(settings, service)
    token = settings.discord_bot_token.get_secret_value()
    async with bot:
        await bot.login(token)
        await sync_commands(bot, settings, service)
        shards = ShardKeeper(bot, settings, service, await choose_shard_count(bot, settings, service))
        await shards.start()
        bot.start_durable()
        keeping = asyncio.create_task(shards.keep(), name="imgbot:discord-shards")
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
            keeping.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await keeping
            bot.stop_durable()
            await bot.close()
            await shards.release()
            connection.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await connection
    log.info("Discord bot stopped")
