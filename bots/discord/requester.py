"""Who caused a Discord interaction, as a platform-free `Requester`."""

from __future__ import annotations

import discord

from core.config import Settings
from core.requester import Requester

PLATFORM = "discord"


def requester_of(interaction: discord.Interaction, settings: Settings) -> Requester:
    """Build the requester of an interaction; the chat is the server (None in DMs)."""
    user = interaction.user
    user_id = str(user.id)
    in_guild = interaction.guild_id is not None
    # Configured admins administer the bot everywhere; members with Manage Server only their
    # own server (core.admin scopes what a chat admin may do).
    manages = bool(in_guild and interaction.permissions.manage_guild)
    return Requester(
        platform=PLATFORM,
        user_id=user_id,
        chat_id=str(interaction.guild_id) if in_guild else None,
        display_name=user.display_name,
        language=str(interaction.locale),
        is_admin=settings.is_admin(PLATFORM, user_id),
        is_group=in_guild,
        is_chat_admin=manages,
        previews=True,  # the deferred answer shows them (bots.discord.reply)
    )
