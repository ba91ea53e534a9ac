"""Localised command names and descriptions (en + zh-CN) and the user's language.

Every string shown in Discord's command UI is a `locale_str` whose `key` extra names a
`core.messages` entry: the English text is the default, and `CommandTranslator` supplies
the Chinese one for Discord's Chinese locales when the commands are synced.
"""

from __future__ import annotations

import discord
from discord import app_commands

from core.messages import language_of, text

# Discord's locales that read Simplified or Traditional Chinese; both get our zh texts.
_CHINESE_LOCALES = frozenset({discord.Locale.chinese, discord.Locale.taiwan_chinese})


def loc(key: str) -> app_commands.locale_str:
    """Return a translatable string: English from `core.messages`, keyed for translation."""
    return app_commands.locale_str(text("en", key), key=key)


def lang_of(interaction: discord.Interaction) -> str:
    """Return "en" or "zh" for the user who caused an interaction."""
    return language_of(str(interaction.locale))


class CommandTranslator(app_commands.Translator):
    """Translate keyed command strings into Chinese for Discord's Chinese locales."""

    async def translate(
        self,
        string: app_commands.locale_str,
        locale: discord.Locale,
        context: app_commands.TranslationContextTypes,
    ) -> str | None:
        """Return the Chinese text of a keyed string, or None to keep the English one."""
        key = string.extras.get("key")
        if key is None or locale not in _CHINESE_LOCALES:
            return None
        return text("zh", key)
