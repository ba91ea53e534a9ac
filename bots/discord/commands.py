"""The user commands: /img, the "Edit with imgbot" message menu and its modal, /help,
/sizes, /balance, /cancel and /key.

Options become command-language words in front of the prompt, and the core parses the
whole text, so `/img prompt:16:9 2K high a cat` and `/img ratio:16:9 … prompt:a cat` mean
the same; no size or price logic lives here.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections import OrderedDict

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from bots.discord.drawing import DiscordDrawing, RemoteImage, image_of_attachment, images_of_message
from bots.discord.reply import clip
from bots.discord.requester import requester_of
from bots.discord.texts import lang_of, loc, text
from core.config import KNOWN_MODELS
from core.errors import ImgbotError
from core.prompt import FIDELITY_WORDS, MODERATION_WORDS
from core.reports import render_balance, render_cancelled, render_help, render_sizes
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
FORMAT_CHOICES = [app_commands.Choice(name=f, value=f) for f in ("png", "jpeg", "webp")]
MODERATION_CHOICES = [
    app_commands.Choice(name=loc(f"discord.choice.moderation_{m}"), value=m)
    for m in MODERATION_WORDS
]
FIDELITY_CHOICES = [
    app_commands.Choice(name=loc(f"discord.choice.fidelity_{f}"), value=f) for f in FIDELITY_WORDS
]
KEY_CHOICES = [
    app_commands.Choice(name=loc("discord.choice.key_new"), value="new"),
    app_commands.Choice(name=loc("discord.choice.key_revoke"), value="revoke"),
]

log = logging.getLogger(__name__)


def command_text(prompt: str, *options: str | None) -> str:
    """Join chosen options and the prompt into one line of the command language."""
    return " ".join([*(o.strip() for o in options if o and o.strip()), prompt.strip()]).strip()


EDIT_FORM_PREFIX = "imgbot:edit:"
EDIT_FORM_ID = re.compile(r"imgbot:edit:(?P<channel>[0-9]{1,20}):(?P<message>[0-9]{1,20})")
_PROMPT_FIELD = "prompt"
_OPTIONS_FIELD = "options"
# The images of messages whose form is open, as the menu saw them: without the Message
# Content intent a refetched message may come back without its attachments.
_RECENT_FORMS = 1000
_FORM_MEMORY = 24 * 3600.0


def edit_form(channel_id: int, message_id: int, lang: str) -> discord.ui.Modal:
    """Build the form asking how to edit a message's images.

    Everything needed to answer it is in its custom id, so a submit is handled by
    `UserCommands.submit_edit` however late it comes, restarts included; the form object
    itself is never kept (it is stopped before sending).
    """
    form = discord.ui.Modal(
        title=clip(text(lang, "discord.modal.title"), 45),
        timeout=None,
        custom_id=f"imgbot:edit:{channel_id}:{message_id}",
    )
    form.add_item(
        discord.ui.TextInput(
            label=clip(text(lang, "discord.modal.prompt"), 45),
            custom_id=_PROMPT_FIELD,
            style=discord.TextStyle.paragraph,
            placeholder=clip(text(lang, "discord.modal.prompt_hint"), 100),
            max_length=PROMPT_LIMIT,
        )
    )
    form.add_item(
        discord.ui.TextInput(
            label=clip(text(lang, "discord.modal.options"), 45),
            custom_id=_OPTIONS_FIELD,
            placeholder=clip(text(lang, "discord.modal.options_hint"), 100),
            required=False,
            max_length=OPTIONS_LIMIT,
        )
    )
    form.stop()
    return form


def form_values(data: object) -> dict[str, str]:
    """Return the text fields of a modal submission by custom id (untrusted input)."""
    found: dict[str, str] = {}

    def walk(node: object) -> None:
        if isinstance(node, list):
            for child in node:
                walk(child)
        elif isinstance(node, dict):
            if node.get("type") == 4 and isinstance(node.get("custom_id"), str):
                value = node.get("value")
                found[node["custom_id"]] = value if isinstance(value, str) else ""
            walk(node.get("components"))
            walk(node.get("component"))

    walk(data.get("components") if isinstance(data, dict) else None)
    return found


class _RecentForms:
    """The images behind recently opened forms: a bounded cache, never the only source."""

    def __init__(self) -> None:
        self._images: OrderedDict[tuple[int, int], tuple[float, list[RemoteImage]]] = (
            OrderedDict()
        )

    def remember(self, channel_id: int, message_id: int, images: list[RemoteImage]) -> None:
        """Keep the images of a message whose form was just opened."""
        self._images[(channel_id, message_id)] = (time.monotonic() + _FORM_MEMORY, images)
        self._images.move_to_end((channel_id, message_id))
        while len(self._images) > _RECENT_FORMS:
            self._images.popitem(last=False)

    def recall(self, channel_id: int, message_id: int) -> list[RemoteImage] | None:
        """Return the images kept for a message, if still fresh."""
        kept = self._images.get((channel_id, message_id))
        if kept is None or kept[0] < time.monotonic():
            return None
        return kept[1]


class UserCommands(commands.Cog):
    """The commands everyone may use."""

    def __init__(self, bot: commands.Bot, runner: DiscordDrawing, service: ImageService) -> None:
        self.bot = bot
        self.runner = runner
        self.service = service
        self.edit_menu = app_commands.ContextMenu(
            name=loc("discord.menu.edit"), callback=self.edit_with_imgbot
        )
        self.forms = _RecentForms()
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
        format=loc("discord.opt.format"),
        compression=loc("discord.opt.compression"),
        moderation=loc("discord.opt.moderation"),
        fidelity=loc("discord.opt.fidelity"),
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
        format=loc("discord.opt.format.desc"),
        compression=loc("discord.opt.compression.desc"),
        moderation=loc("discord.opt.moderation.desc"),
        fidelity=loc("discord.opt.fidelity.desc"),
        image1=loc("discord.opt.image.desc"),
        image2=loc("discord.opt.image.desc"),
        image3=loc("discord.opt.image.desc"),
        image4=loc("discord.opt.image.desc"),
    )
    @app_commands.choices(
        ratio=RATIO_CHOICES,
        resolution=TIER_CHOICES,
        quality=QUALITY_CHOICES,
        model=MODEL_CHOICES,
        format=FORMAT_CHOICES,
        moderation=MODERATION_CHOICES,
        fidelity=FIDELITY_CHOICES,
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
        format: str | None = None,  # noqa: A002 - the option's name as users see it
        compression: app_commands.Range[int, 0, 100] | None = None,
        moderation: str | None = None,
        fidelity: str | None = None,
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
            f"--format {format}" if format else None,
            f"--compression {compression}" if compression is not None else None,
            f"--moderation {moderation}" if moderation else None,
            f"--fidelity {fidelity}" if fidelity else None,
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
        self.forms.remember(message.channel.id, message.id, images)
        await interaction.response.send_modal(edit_form(message.channel.id, message.id, lang))

    async def submit_edit(self, interaction: discord.Interaction) -> None:
        """Answer an edit form, from its custom id alone: late, or after a restart, too."""
        lang = lang_of(interaction)
        data = interaction.data or {}
        match = EDIT_FORM_ID.fullmatch(str(data.get("custom_id", "")))
        values = form_values(data)
        prompt = values.get(_PROMPT_FIELD, "")[:PROMPT_LIMIT]
        options = values.get(_OPTIONS_FIELD, "")[:OPTIONS_LIMIT]
        channel_id = int(match["channel"]) if match else None
        images: list[RemoteImage] | None = None
        # The id is the client's to forge: only a message of the channel it is sent from.
        if match and channel_id == interaction.channel_id:
            message_id = int(match["message"])
            images = self.forms.recall(channel_id, message_id)
            if images is None:
                images = await self._images_of(channel_id, message_id)
        if not images:
            gone = text(lang, "discord.edit_gone", prompt=clip(command_text(prompt, options), 1500))
            await interaction.response.send_message(clip(gone), ephemeral=True)
            return
        await self.runner.draw(interaction, command_text(prompt, options), images)

    async def _images_of(self, channel_id: int, message_id: int) -> list[RemoteImage]:
        try:
            message = await self.bot.get_partial_messageable(channel_id).fetch_message(message_id)
        except (discord.HTTPException, aiohttp.ClientError) as err:
            log.info("edit form: message %s not fetched: %s", message_id, type(err).__name__)
            return []
        if message.channel.id != channel_id:
            return []
        return images_of_message(message)

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
        report = await self.service.spend_report(requester)
        reply = render_balance(report, self.service.prices, lang_of(interaction))
        await interaction.response.send_message(clip(reply), ephemeral=True)

    @app_commands.command(
        name=loc("discord.cmd.cancel"), description=loc("discord.cmd.cancel.desc")
    )
    async def cancel(self, interaction: discord.Interaction) -> None:
        """Cancel the user's waiting and running jobs, naming them."""
        requester = requester_of(interaction, self.runner.settings)
        stopped = await self.service.cancel(requester)
        reply = clip(render_cancelled(stopped, lang_of(interaction)))
        await interaction.response.send_message(reply, ephemeral=True)

    @app_commands.command(name=loc("discord.cmd.key"), description=loc("discord.cmd.key.desc"))
    @app_commands.rename(action=loc("discord.opt.action"))
    @app_commands.describe(action=loc("discord.opt.action.desc"))
    @app_commands.choices(action=KEY_CHOICES)
    async def key(self, interaction: discord.Interaction, action: str = "new") -> None:
        """Make a personal web API key, or revoke the user's keys: only ever ephemeral.

        A key is a password: every answer here, the key and any refusal, is seen by the
        user alone, in a server as in a DM. It is shown once; the store keeps a hash.
        """
        requester = requester_of(interaction, self.runner.settings)
        lang = lang_of(interaction)
        try:
            if action == "revoke":
                count = await self.service.revoke_api_keys(requester)
                reply = text(lang, "discord.key.revoked" if count else "discord.key.none", count=count)
            else:
                made = await self.service.create_api_key(requester, "discord")
                reply = text(
                    lang, "discord.key.created", api_key=made.key, base_url=made.base_url, key_id=made.id
                )
        except ImgbotError as err:
            reply = err.user_message(lang, text)
        await interaction.response.send_message(clip(reply), ephemeral=True)
