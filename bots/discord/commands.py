"""The user commands: /img, the "Edit with imgbot" message menu and its modal, /help,
/sizes, /balance and /cancel.

Options become command-language words in front of the prompt, and the core parses the
whole text, so `/img prompt:16:9 2K high a cat` and `/img ratio:16:9 … prompt:a cat` mean
the same; no size or price logic lives here.
"""

from __future__ import annotations

import dataclasses

import discord
from discord import app_commands
from discord.ext import commands

from bots.discord.drawing import DrawRunner, RemoteImage, image_of_attachment, images_of_message
from bots.discord.replies import clip, report_error
from bots.discord.requester import requester_of
from bots.discord.texts import lang_of, loc
from core.config import KNOWN_MODELS
from core.messages import text
from core.reports import render_balance, render_help, render_sizes
from core.service import ImageService
from core.sizes import NAMED_RATIOS, TIERS

QUALITIES = ("low", "medium", "high", "auto")
PROMPT_LIMIT = 4000
OPTIONS_LIMIT = 200

RATIO_CHOICES = [app_commands.Choice(name=r, value=r) for r in NAMED_RATIOS] + [
    app_commands.Choice(name=loc("discord.choice.ratio_auto"), value="auto")
]
TIER_CHOICES = [app_commands.Choice(name=t, value=t) for t in TIERS]
QUALITY_CHOICES = [
    app_commands.Choice(name=loc(f"discord.choice.quality_{q}"), value=q) for q in QUALITIES
]
MODEL_CHOICES = [app_commands.Choice(name=m, value=m) for m in KNOWN_MODELS]


def command_text(prompt: str, *options: str | None) -> str:
    """Join chosen options and the prompt into one line of the command language."""
    return " ".join([*(o.strip() for o in options if o and o.strip()), prompt.strip()]).strip()


class EditModal(discord.ui.Modal):
    """Ask for the prompt (and option words) to edit a message's images with."""

    def __init__(self, runner: DrawRunner, images: list[RemoteImage], lang: str) -> None:
        super().__init__(title=clip(text(lang, "discord.modal.title"), 45), timeout=600)
        self._runner = runner
        self._images = images
        self.prompt: discord.ui.TextInput[EditModal] = discord.ui.TextInput(
            label=clip(text(lang, "discord.modal.prompt"), 45),
            style=discord.TextStyle.paragraph,
            placeholder=clip(text(lang, "discord.modal.prompt_hint"), 100),
            max_length=PROMPT_LIMIT,
        )
        self.options: discord.ui.TextInput[EditModal] = discord.ui.TextInput(
            label=clip(text(lang, "discord.modal.options"), 45),
            placeholder=clip(text(lang, "discord.modal.options_hint"), 100),
            required=False,
            max_length=OPTIONS_LIMIT,
        )
        self.add_item(self.prompt)
        self.add_item(self.options)

    async def on_submit(self, interaction: discord.Interaction) -> None:  # type: ignore[override]
        """Draw with the message's images as references."""
        await self._runner.draw(
            interaction, command_text(self.prompt.value, self.options.value), self._images
        )

    async def on_error(  # type: ignore[override]
        self, interaction: discord.Interaction, error: Exception
    ) -> None:
        """Answer a failure like any other."""
        await report_error(interaction, error)


class UserCommands(commands.Cog):
    """The commands everyone may use."""

    def __init__(self, bot: commands.Bot, runner: DrawRunner, service: ImageService) -> None:
        self.bot = bot
        self.runner = runner
        self.service = service
        self.edit_menu = app_commands.ContextMenu(
            name=loc("discord.menu.edit"), callback=self.edit_with_imgbot
        )
        # Offer exactly the counts this bot draws (1..MAX_N, a setting): the decorator's
        # range is fixed when the class is made, so this instance's copy of /img gets its own.
        # discord.py has no public setter; each cog instance holds its own copy of _params.
        params = self.img._params  # noqa: SLF001
        params["count"] = dataclasses.replace(params["count"], max_value=runner.settings.max_n)

    async def cog_load(self) -> None:
        """Register the message menu, which cannot live on a cog by itself."""
        self.bot.tree.add_command(self.edit_menu)

    async def cog_unload(self) -> None:
        """Remove the message menu."""
        self.bot.tree.remove_command(self.edit_menu.name, type=self.edit_menu.type)

    @app_commands.command(name=loc("discord.cmd.img"), description=loc("discord.cmd.img.desc"))
    @app_commands.rename(
        prompt=loc("discord.opt.prompt"),
        ratio=loc("discord.opt.ratio"),
        resolution=loc("discord.opt.resolution"),
        quality=loc("discord.opt.quality"),
        count=loc("discord.opt.count"),
        model=loc("discord.opt.model"),
        image1=loc("discord.opt.image1"),
        image2=loc("discord.opt.image2"),
        image3=loc("discord.opt.image3"),
        image4=loc("discord.opt.image4"),
    )
    @app_commands.describe(
        prompt=loc("discord.opt.prompt.desc"),
        ratio=loc("discord.opt.ratio.desc"),
        resolution=loc("discord.opt.resolution.desc"),
        quality=loc("discord.opt.quality.desc"),
        count=loc("discord.opt.count.desc"),
        model=loc("discord.opt.model.desc"),
        image1=loc("discord.opt.image.desc"),
        image2=loc("discord.opt.image.desc"),
        image3=loc("discord.opt.image.desc"),
        image4=loc("discord.opt.image.desc"),
    )
    @app_commands.choices(
        ratio=RATIO_CHOICES, resolution=TIER_CHOICES, quality=QUALITY_CHOICES, model=MODEL_CHOICES
    )
    async def img(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, PROMPT_LIMIT],
        ratio: str | None = None,
        resolution: str | None = None,
        quality: str | None = None,
        count: app_commands.Range[int, 1, 10] | None = None,  # capped at MAX_N in __init__
        model: str | None = None,
        image1: discord.Attachment | None = None,
        image2: discord.Attachment | None = None,
        image3: discord.Attachment | None = None,
        image4: discord.Attachment | None = None,
    ) -> None:
        """Draw an image, or edit the attached ones."""
        attachments = [a for a in (image1, image2, image3, image4) if a is not None]
        # Flag forms are unambiguous in front of any prompt ("auto" alone would be a ratio).
        line = command_text(
            prompt,
            f"--model {model}" if model else None,
            f"--ar {ratio}" if ratio else None,
            f"--tier {resolution}" if resolution else None,
            f"--q {quality}" if quality else None,
            f"--n {count}" if count else None,
        )
        await self.runner.draw(interaction, line, [image_of_attachment(a) for a in attachments])

    async def edit_with_imgbot(
        self, interaction: discord.Interaction, message: discord.Message
    ) -> None:
        """Open the edit form for a message's images."""
        lang = lang_of(interaction)
        images = images_of_message(message)
        if not images:
            await interaction.response.send_message(text(lang, "discord.no_images"), ephemeral=True)
            return
        await interaction.response.send_modal(EditModal(self.runner, images, lang))

    @app_commands.command(name=loc("discord.cmd.help"), description=loc("discord.cmd.help.desc"))
    async def help(self, interaction: discord.Interaction) -> None:
        """Explain the command language."""
        await interaction.response.send_message(
            clip(render_help(lang_of(interaction))), ephemeral=True
        )

    @app_commands.command(name=loc("discord.cmd.sizes"), description=loc("discord.cmd.sizes.desc"))
    async def sizes(self, interaction: discord.Interaction) -> None:
        """Show the ratio × resolution table."""
        table = render_sizes(lang_of(interaction))
        await interaction.response.send_message(clip(f"```\n{table}\n```"), ephemeral=True)

    @app_commands.command(
        name=loc("discord.cmd.balance"), description=loc("discord.cmd.balance.desc")
    )
    async def balance(self, interaction: discord.Interaction) -> None:
        """Show what the user spent, their limits and last jobs."""
        requester = requester_of(interaction, self.runner.settings)
        report = await self.service.ledger.spend_report(requester.user_key)
        reply = render_balance(report, self.service.prices, lang_of(interaction))
        await interaction.response.send_message(clip(reply), ephemeral=True)

    @app_commands.command(
        name=loc("discord.cmd.cancel"), description=loc("discord.cmd.cancel.desc")
    )
    async def cancel(self, interaction: discord.Interaction) -> None:
        """Cancel the user's waiting jobs."""
        requester = requester_of(interaction, self.runner.settings)
        cancelled = self.service.cancel(requester)
        lang = lang_of(interaction)
        if cancelled:
            ids = ", ".join(f"#{job_id}" for job_id in cancelled)
            reply = text(lang, "cancel.done", count=len(cancelled), jobs=ids)
        else:
            reply = text(lang, "cancel.none")
        await interaction.response.send_message(reply, ephemeral=True)
