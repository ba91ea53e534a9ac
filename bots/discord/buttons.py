"""The "again", "4K" and "vary" buttons under a result, alive across restarts.

Their custom ids (`imgbot:job:<id>:<action>`) carry everything needed: the job is looked
up in the ledger when one is pressed, so a restarted bot answers buttons it never saw.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import discord

from bots.discord.texts import text
from core.replay import ACTIONS, ReplayAction, ReplayCodec

# The replay buttons' custom ids on Discord: `imgbot:job:<job id>:<action>`.
BUTTONS = ReplayCodec("imgbot:job:")


class Replayer(Protocol):
    """What a pressed button needs: something that replays a job (the bot's `DiscordDrawing`)."""

    async def replay(
        self, interaction: discord.Interaction, job_id: int, action: ReplayAction
    ) -> None:
        """Replay a stored job for whoever pressed its button."""

_STYLES = {
    "again": discord.ButtonStyle.primary,
    "4k": discord.ButtonStyle.secondary,
    "vary": discord.ButtonStyle.secondary,
}


class JobButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=BUTTONS.pattern,
):
    """One replay button of a stored job; whoever presses it pays."""

    def __init__(self, job_id: int, action: ReplayAction, label: str | None = None) -> None:
        super().__init__(
            discord.ui.Button(
                label=label or action,
                style=_STYLES[action],
                custom_id=BUTTONS.encode(job_id, action),
            )
        )
        self.job_id = job_id
        self.action = action

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction,
        item: discord.ui.Button[Any],
        match: Any,
    ) -> JobButton:
        """Rebuild the button from its custom id (after a restart too)."""
        pressed = BUTTONS.decode(item.custom_id)
        assert pressed is not None  # discord.py matched the same pattern
        return cls(*pressed, item.label)

    async def callback(self, interaction: discord.Interaction) -> None:
        """Replay the job for the person who pressed the button."""
        runner = cast(Replayer, interaction.client.imgbot_drawing)  # type: ignore[attr-defined]
        await runner.replay(interaction, self.job_id, self.action)


def result_view(job_id: int, lang: str) -> discord.ui.View:
    """Return the buttons to put under a job's result, labelled in the user's language."""
    view = discord.ui.View(timeout=None)
    for action in ACTIONS:
        view.add_item(JobButton(job_id, action, text(lang, f"discord.button.{action}")))
    return view
