"""The /admin and /server command groups.

What Discord shows matches what works:
- `/admin` is for the bot's operators (`ADMINS`): every subcommand of `core.admin`. Discord cannot
  show a command to a list of users, so it carries no default permission and everyone
  sees it (server owners may hide it under Server Settings → Integrations); the core
  refuses anyone but an operator, except a server manager's own-server commands.
- `/server` is for members with Manage Server (Discord shows it only to them, in servers):
  this server's daily limit (`chatlimit`, only lower than the operator's) and its spend
  (`chats`).

Each subcommand turns its options into the words `core.admin.run_admin` takes; the core
checks who may do what, whatever Discord showed.
"""

from __future__ import annotations

import re

import discord
from discord import app_commands
from discord.ext import commands

from bots.discord.reply import clip
from bots.discord.requester import requester_of
from bots.discord.texts import loc
from core.admin import run_admin
from core.config import Settings
from core.service import ImageService

_MENTION = re.compile(r"<@!?(\d+)>")


async def run_privately(
    interaction: discord.Interaction,
    service: ImageService,
    settings: Settings,
    name: str,
    args: list[str],
) -> None:
    """Run one admin command and answer only the caller."""
    await interaction.response.defer(ephemeral=True, thinking=True)
    requester = requester_of(interaction, settings)
    reply = await run_admin(service, requester, name, args)
    await interaction.followup.send(clip(reply), ephemeral=True)


def _who(value: str) -> str:
    """Turn a mention into its id; keep plain ids and platform:id as they are."""
    value = value.strip()
    match = _MENTION.fullmatch(value)
    return match.group(1) if match else value


class AdminCommands(
    commands.GroupCog,
    group_name=loc("discord.cmd.admin"),
    group_description=loc("discord.cmd.admin.desc"),
):
    """The operators' subcommands; every one answers privately."""

    def __init__(self, service: ImageService, settings: Settings) -> None:
        self.service = service
        self.settings = settings
        super().__init__()

    async def _run(self, interaction: discord.Interaction, name: str, args: list[str]) -> None:
        await run_privately(interaction, self.service, self.settings, name, args)

    @app_commands.command(
        name=loc("discord.cmd.admin.limit"), description=loc("discord.cmd.admin.limit.desc")
    )
    @app_commands.rename(
        user=loc("discord.opt.user"),
        daily=loc("discord.opt.daily"),
        monthly=loc("discord.opt.monthly"),
    )
    @app_commands.describe(
        user=loc("discord.opt.user.desc"),
        daily=loc("discord.opt.amount.desc"),
        monthly=loc("discord.opt.amount.desc"),
    )
    async def limit(
        self,
        interaction: discord.Interaction,
        user: str,
        daily: str | None = None,
        monthly: str | None = None,
    ) -> None:
        """Set a user's daily and monthly limits."""
        args = [_who(user)]
        args += [f"daily={daily}"] if daily is not None else []
        args += [f"monthly={monthly}"] if monthly is not None else []
        await self._run(interaction, "limit", args)

    @app_commands.command(
        name=loc("discord.cmd.admin.chatlimit"), description=loc("discord.cmd.admin.chatlimit.desc")
    )
    @app_commands.rename(daily=loc("discord.opt.daily"), server=loc("discord.opt.server"))
    @app_commands.describe(
        daily=loc("discord.opt.amount.desc"), server=loc("discord.opt.server.desc")
    )
    async def chatlimit(
        self, interaction: discord.Interaction, daily: str, server: str | None = None
    ) -> None:
        """Set a server's daily limit (this server by default)."""
        where = _who(server) if server else str(interaction.guild_id or "")
        await self._run(interaction, "chatlimit", [where, f"daily={daily}"] if where else [])

    @app_commands.command(
        name=loc("discord.cmd.admin.refund"), description=loc("discord.cmd.admin.refund.desc")
    )
    @app_commands.rename(job=loc("discord.opt.job"))
    @app_commands.describe(job=loc("discord.opt.job.desc"))
    async def refund(
        self, interaction: discord.Interaction, job: app_commands.Range[int, 1]
    ) -> None:
        """Refund a job."""
        await self._run(interaction, "refund", [str(job)])

    @app_commands.command(
        name=loc("discord.cmd.admin.block"), description=loc("discord.cmd.admin.block.desc")
    )
    @app_commands.rename(target=loc("discord.opt.target"))
    @app_commands.describe(target=loc("discord.opt.target.desc"))
    async def block(self, interaction: discord.Interaction, target: str) -> None:
        """Block a user or a server."""
        await self._run(interaction, "block", [_who(target)])

    @app_commands.command(
        name=loc("discord.cmd.admin.unblock"), description=loc("discord.cmd.admin.unblock.desc")
    )
    @app_commands.rename(target=loc("discord.opt.target"))
    @app_commands.describe(target=loc("discord.opt.target.desc"))
    async def unblock(self, interaction: discord.Interaction, target: str) -> None:
        """Unblock a user or a server."""
        await self._run(interaction, "unblock", [_who(target)])

    @app_commands.command(
        name=loc("discord.cmd.admin.top"), description=loc("discord.cmd.admin.top.desc")
    )
    @app_commands.rename(days=loc("discord.opt.days"))
    @app_commands.describe(days=loc("discord.opt.days.desc"))
    async def top(
        self, interaction: discord.Interaction, days: app_commands.Range[int, 1, 3650] = 7
    ) -> None:
        """List the top spenders."""
        await self._run(interaction, "top", [str(days)])

    @app_commands.command(
        name=loc("discord.cmd.admin.chats"), description=loc("discord.cmd.admin.chats.desc")
    )
    @app_commands.rename(days=loc("discord.opt.days"))
    @app_commands.describe(days=loc("discord.opt.days.desc"))
    async def chats(
        self, interaction: discord.Interaction, days: app_commands.Range[int, 1, 3650] = 7
    ) -> None:
        """List spend per server and chat."""
        await self._run(interaction, "chats", [str(days)])

    @app_commands.command(
        name=loc("discord.cmd.admin.unsettled"), description=loc("discord.cmd.admin.unsettled.desc")
    )
    async def unsettled(self, interaction: discord.Interaction) -> None:
        """List jobs left unsettled by a crash."""
        await self._run(interaction, "unsettled", [])

    @app_commands.command(
        name=loc("discord.cmd.admin.grant"), description=loc("discord.cmd.admin.grant.desc")
    )
    @app_commands.rename(user=loc("discord.opt.user"), credits=loc("discord.opt.credits"))
    @app_commands.describe(
        user=loc("discord.opt.user.desc"), credits=loc("discord.opt.credits.desc")
    )
    async def grant(self, interaction: discord.Interaction, user: str, credits: str) -> None:
        """Give a user prepaid credits."""
        await self._run(interaction, "grant", [_who(user), credits])

    @app_commands.command(
        name=loc("discord.cmd.admin.revoke"), description=loc("discord.cmd.admin.revoke.desc")
    )
    @app_commands.rename(user=loc("discord.opt.user"), credits=loc("discord.opt.credits"))
    @app_commands.describe(
        user=loc("discord.opt.user.desc"), credits=loc("discord.opt.credits.desc")
    )
    async def revoke(
        self, interaction: discord.Interaction, user: str, credits: str | None = None
    ) -> None:
        """Take a user's prepaid credits (all of them without an amount)."""
        await self._run(interaction, "revoke", [_who(user), *([credits] if credits else [])])

    @app_commands.command(
        name=loc("discord.cmd.admin.purchases"),
        description=loc("discord.cmd.admin.purchases.desc"),
    )
    @app_commands.rename(user=loc("discord.opt.user"))
    @app_commands.describe(user=loc("discord.opt.user.desc"))
    async def purchases(self, interaction: discord.Interaction, user: str | None = None) -> None:
        """List Telegram Stars purchases (of one user)."""
        await self._run(interaction, "purchases", [_who(user)] if user else [])


@app_commands.default_permissions(manage_guild=True)
@app_commands.guild_only()
class ServerCommands(
    commands.GroupCog,
    group_name=loc("discord.cmd.server"),
    group_description=loc("discord.cmd.server.desc"),
):
    """What a server's managers may do about their own server; answers are private."""

    def __init__(self, service: ImageService, settings: Settings) -> None:
        self.service = service
        self.settings = settings
        super().__init__()

    @app_commands.command(
        name=loc("discord.cmd.admin.chatlimit"),
        description=loc("discord.cmd.server.chatlimit.desc"),
    )
    @app_commands.rename(daily=loc("discord.opt.daily"))
    @app_commands.describe(daily=loc("discord.opt.server_amount.desc"))
    async def chatlimit(self, interaction: discord.Interaction, daily: str) -> None:
        """Set this server's daily limit, up to the operator's."""
        where = str(interaction.guild_id or "")
        args = [where, f"daily={daily}"] if where else []
        await run_privately(interaction, self.service, self.settings, "chatlimit", args)

    @app_commands.command(
        name=loc("discord.cmd.admin.chats"), description=loc("discord.cmd.server.chats.desc")
    )
    @app_commands.rename(days=loc("discord.opt.days"))
    @app_commands.describe(days=loc("discord.opt.days.desc"))
    async def chats(
        self, interaction: discord.Interaction, days: app_commands.Range[int, 1, 3650] = 7
    ) -> None:
        """Show this server's spend."""
        await run_privately(interaction, self.service, self.settings, "chats", [str(days)])
