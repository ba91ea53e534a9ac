"""The Telegram handlers (python-telegram-bot 22): commands, albums, buttons, confirmations.

The adapter turns updates into a Requester, the command and a `TelegramReply`, and hands
them to the core job runner (`core.runner`); it holds no business rules. Receiving
(commands in captions, albums, replies): `references`. Replying (status, chat action,
photos / files / albums, buttons): `reply`. Wiring and running: `app`.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import re
import secrets
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace

from telegram import (
    CallbackQuery,
    Chat,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    Update,
    User,
    WebAppInfo,
)
from telegram.constants import ChatMemberStatus, ChatType, ParseMode
from telegram.error import TelegramError
from telegram.ext import (
    Application,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    TypeHandler,
    filters,
)

from bots.logs import SecretScrubber
from bots.telegram.albums import SharedAlbums
from bots.telegram.inbox import InboxQueue
from bots.telegram.payments import PROVIDER, StarPayments
from bots.telegram.references import (
    IMG_COMMAND,
    AlbumCollector,
    ReferenceFetcher,
    check_no_other_files,
    collect_references,
    command_text,
    result_job_id,
)
from bots.telegram.reply import (
    BUTTONS,
    TelegramReply,
    Where,
    address_of,
    where_from_address,
    where_of,
    with_flood_retry,
)
from bots.telegram.texts import text
from core.admin import ADMIN_COMMANDS, run_admin
from core.config import Settings
from core.errors import ImgbotError
from core.messages import language_of
from core.presses import PRESS_WINDOW, PressWindow
from core.pricing import format_credits
from core.reports import (
    render_balance,
    render_cancelled,
    render_help,
    render_sizes,
)
from core.requester import Requester
from core.runner import JobRunner, finish_or_cancel
from core.service import ImageService, job_visible_to
from core.store import JobRecord
from core.types import IncomingImage

log = logging.getLogger(__name__)

ADAPTER_KEY = "imgbot.telegram"
PLATFORM = "telegram"
USER_COMMANDS = (
    "img", "help", "sizes", "balance", "buy", "paysupport", "cancel", "key", "web", "start"
)
TEXT_LIMIT = 4096

# How long a Draw / Cancel question stays answerable (it lives in memory only).
CONFIRM_TTL = 600.0
Resume = Callable[[TelegramReply], Awaitable[None]]
CONFIRM_DATA = re.compile(r"^c:([A-Za-z0-9_-]{1,32}):(draw|cancel)$")


@dataclass(frozen=True)
class PendingJob:
    """An expensive /img waiting for its requester's Draw or Cancel."""

    requester: Requester
    resume: Resume  # starts the job with a Reply (from core.runner)
    where: Where
    created: float
    anonymous: bool = False


# The handler group that runs after all others (bots.telegram.inbox).
LAST_GROUP = 1_000_000

class _AlbumItem(filters.MessageFilter):
    """An image (photo or image file) that belongs to an album."""

    def filter(self, message: Message) -> bool:
        if message.media_group_id is None:
            return False
        doc = message.document
        return bool(message.photo) or (
            doc is not None and (doc.mime_type or "").startswith("image/")
        )


class TelegramAdapter:
    """The handlers of one Application, bound to the service."""

    def __init__(self, settings: Settings, service: ImageService, app: Application) -> None:
        self.settings = settings
        self.service = service
        self.app = app
        self.fetcher = ReferenceFetcher(app.bot, settings)
        # Webhook mode may run as several replicas on one ledger: updates, button presses
        # and albums are then coordinated through the store (polling is one process).
        self.shared = bool(settings.telegram_webhook_url)
        self.inbox: InboxQueue | None = None  # webhook mode: set by build_application
        self.albums: AlbumCollector | SharedAlbums = (
            SharedAlbums(
                service.coordination, app.bot, settings.album_debounce, self._spawn,
                self._album_ready, self._album_item_late,
                owner=service.owner, lease=settings.job_lease,
            )
            if self.shared
            else AlbumCollector(
                settings.album_debounce, self._spawn, self._album_ready, self._album_item_late
            )
        )
        self.runner = JobRunner(service, texts=text)
        self._jobs: set[asyncio.Task[object]] = set()
        self.presses = PressWindow()
        self.pending: dict[str, PendingJob] = {}
        # Error texts of the Bot API carry the token in URLs: mask it before logging.
        self._scrub = SecretScrubber([settings.telegram_bot_token.get_secret_value()]).scrub
        self.payments = StarPayments(self)

    def register(self) -> None:
        """Add every handler and the error handler to the Application."""
        new_message = filters.UpdateType.MESSAGE
        app = self.app
        if self.inbox is not None:
            # After every other handler: the update is done (see bots.telegram.inbox).
            app.add_handler(TypeHandler(Update, self.update_done), group=LAST_GROUP)
        # Before every other handler, in its own group: learn who is @who for admins.
        app.add_handler(TypeHandler(Update, self.note_usernames), group=-1)
        # Every press is answered (Telegram spins the button until then), even a stale or
        # forged one; on_button ignores data it does not know.
        self.payments.register()
        # An admin's `refund purchase` (on any front end of this process) goes through us.
        self.service.payment_refunders[PROVIDER] = self.payments.refund
        app.add_handler(CallbackQueryHandler(self.on_confirm, pattern=r"^c:"))
        app.add_handler(CallbackQueryHandler(self.on_button))
        app.add_handler(MessageHandler(new_message & _AlbumItem(), self.on_album_item))
        app.add_handler(CommandHandler(IMG_COMMAND, self.cmd_img, filters=new_message))
        # CommandHandler does not look at captions: "/img …" under a photo or file.
        caption_img = filters.CaptionRegex(rf"^/{IMG_COMMAND}(@\w+)?(\s|$)")
        app.add_handler(MessageHandler(new_message & caption_img, self.cmd_img))
        app.add_handler(CommandHandler("start", self.cmd_start, filters=new_message))
        app.add_handler(CommandHandler("help", self.cmd_help, filters=new_message))
        app.add_handler(CommandHandler("sizes", self.cmd_sizes, filters=new_message))
        app.add_handler(CommandHandler("balance", self.cmd_balance, filters=new_message))
        app.add_handler(CommandHandler("cancel", self.cmd_cancel, filters=new_message))
        app.add_handler(CommandHandler("key", self.cmd_key, filters=new_message))
        app.add_handler(CommandHandler("web", self.cmd_web, filters=new_message))
        app.add_handler(CommandHandler(list(ADMIN_COMMANDS), self.cmd_admin, filters=new_message))
        app.add_error_handler(self.on_error)

    # --- who asks --------------------------------------------------------------------
    def requester_of(self, user: User, chat: Chat, sender_chat: Chat | None = None) -> Requester:
        """Describe who sent a message in a chat as a core Requester.

        A message sent "as a channel" or by an anonymous group admin comes from one of
        Telegram's shared placeholder users (Channel_Bot, GroupAnonymousBot); the real
        sender is `sender_chat`, so that chat is the identity: its own budget and blocks.
        """
        is_group = chat.type in (ChatType.GROUP, ChatType.SUPERGROUP, ChatType.CHANNEL)
        if sender_chat is not None:
            user_id = str(sender_chat.id)
            display_name = sender_chat.title or sender_chat.username or user_id
            language = None  # a chat has no language; the default applies
        else:
            user_id = str(user.id)
            display_name = user.full_name or user.username or user_id
            language = user.language_code
        return Requester(
            platform=PLATFORM,
            user_id=user_id,
            chat_id=str(chat.id) if chat.type != ChatType.PRIVATE else None,
            display_name=display_name,
            language=language,
            is_group=is_group,
            previews=True,  # the status message shows them (bots.telegram.reply)
        )

    def requester_of_message(self, message: Message) -> Requester | None:
        """Describe the sender of a message (None: a message with no sender at all)."""
        if message.from_user is None and message.sender_chat is None:
            return None
        user = message.from_user
        if user is None:  # only sender_chat: take the chat as the user as well
            assert message.sender_chat is not None
            user = User(message.sender_chat.id, message.sender_chat.title or "", False)
        return self.requester_of(user, message.chat, message.sender_chat)

    async def note_usernames(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Remember the @username of whoever wrote, so admins may name them."""
        message = update.effective_message
        if message is None or update.callback_query is not None:
            return
        for carrier in (message, message.reply_to_message):
            if carrier is None:
                continue
            requester = self.requester_of_message(carrier)
            sender = carrier.sender_chat or carrier.from_user
            if requester is not None and sender is not None:
                await self.service.directory.note(PLATFORM, sender.username, requester.user_key)

    # --- /img -------------------------------------------------------------------------
    async def cmd_img(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Draw: /img as a text message or as the caption of a photo or image file."""
        message = update.effective_message
        if message is None:
            return
        prompt = command_text(message, context.bot.username)
        if prompt is None:  # /img@OtherBot
            return
        await self._img(message, prompt, ())

    async def on_album_item(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Collect an album item; the album runs once complete if one item holds /img."""
        message = update.effective_message
        if message is None:
            return
        text_ = command_text(message, context.bot.username)
        if isinstance(self.albums, SharedAlbums):
            # Held in the webhook inbox until this process is done with it (an owner runs
            # the album first): a replica dying meanwhile leaves it for another.
            await self.albums.add_now(message, text_)
        else:
            self.albums.add(message, text_)

    async def _album_ready(self, message: Message, prompt: str, items: list[Message]) -> None:
        # This runs in our own task, outside PTB's error handling: log failures here.
        try:
            await self._img(message, prompt, items)
        except Exception as err:  # noqa: BLE001 - the user was told; this is for the log
            self._log_failure(f"album {message.media_group_id}", err)

    async def _album_item_late(self, message: Message) -> None:
        # Telegram delivered this item after its album had been drawn: say it was not used.
        requester = self.requester_of_message(message)
        lang = language_of(requester.language if requester else None)
        try:
            await with_flood_retry(
                lambda: message.reply_text(text(lang, "tg.album_late"), do_quote=True)
            )
        except TelegramError as err:
            log.info("late album item not answered: %s", self._scrub(str(err)))

    async def _img(self, message: Message, prompt: str, album: Sequence[Message]) -> None:
        requester = self.requester_of_message(message)
        if requester is None:
            return
        where = where_of(message)

        async def references() -> list[IncomingImage]:
            check_no_other_files(message)
            return await collect_references(
                message, album, bot_id=self.app.bot.id, service=self.service, fetcher=self.fetcher
            )

        async def confirm(estimate: float, resume: Resume) -> None:
            pending = PendingJob(
                requester, resume, where, time.monotonic(), anonymous=message.sender_chat is not None
            )
            await self._ask_to_confirm(pending, estimate)

        await self.runner.run(
            requester,
            prompt,
            references,
            self.reply_for(requester, where),
            # A reply to one of our results refines it: keep its options (low, 16:9…).
            refines=result_job_id(message.reply_to_message, self.app.bot.id)
            if message.reply_to_message is not None
            else None,
            confirm=confirm,
            # The message names the job: a redelivered update (Telegram sends again what a
            # killed process fetched but never confirmed) must not draw and charge twice.
            source_ref=f"telegram:{message.chat.id}:{message.message_id}",
            origin=address_of(where, group=requester.is_group),
        )

    def reply_for(self, requester: Requester, where: Where) -> TelegramReply:
        """Return the Reply that shows one job of a requester in a chat."""
        return TelegramReply(
            self.app.bot,
            where,
            language_of(requester.language),
            prices=self.service.prices,
            is_group=requester.is_group,
            send_original=self.settings.telegram_send_original,
            scrub=self._scrub,
        )

    # --- confirming an expensive job ---------------------------------------------------
    async def _ask_to_confirm(self, pending: PendingJob, estimate: float) -> None:
        lang = language_of(pending.requester.language)
        now = pending.created
        for token, other in list(self.pending.items()):  # one question per user, none stale
            expired = now - other.created > CONFIRM_TTL
            if expired or other.requester.user_key == pending.requester.user_key:
                del self.pending[token]
        token = secrets.token_urlsafe(8)
        self.pending[token] = pending
        cost = format_credits(estimate, self.service.prices, lang)
        keyboard = InlineKeyboardMarkup(
            [
                [
                    InlineKeyboardButton(
                        text(lang, "tg.confirm.draw"), callback_data=f"c:{token}:draw"
                    ),
                    InlineKeyboardButton(
                        text(lang, "tg.confirm.cancel"), callback_data=f"c:{token}:cancel"
                    ),
                ]
            ]
        )
        where = pending.where
        question = text(lang, "tg.confirm", cost=cost, minutes=int(CONFIRM_TTL // 60))
        await with_flood_retry(
            lambda: self.app.bot.send_message(
                where.chat_id,
                question,
                reply_markup=keyboard,
                reply_parameters=where.reply(),
                message_thread_id=where.thread_id,
            )
        )

    async def on_confirm(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Draw (or drop) a job that waited for its requester's Draw / Cancel."""
        query = update.callback_query
        if query is None:
            return
        match = CONFIRM_DATA.match(query.data or "")
        if match is None or query.message is None:
            await self._answer_query(query)
            return
        token, action = match.group(1), match.group(2)
        chat = query.message.chat
        presser = self.requester_of(query.from_user, chat)
        lang = language_of(presser.language)
        pending = self.pending.get(token)
        if pending is None or time.monotonic() - pending.created > CONFIRM_TTL:
            # Gone with a restart, answered already, or too old.
            self.pending.pop(token, None)
            await self._answer_query(query, text(lang, "tg.confirm.expired"))
            await self._edit_quietly(query, text(lang, "tg.confirm.expired"))
            return
        if not await self._may_confirm(pending, presser, chat.id):
            await self._answer_query(query, text(lang, "tg.confirm.not_yours"))
            return
        del self.pending[token]  # before any pause: a second press finds nothing
        await self._answer_query(query)
        lang = language_of(pending.requester.language)
        if action == "cancel":
            await self._edit_quietly(query, text(lang, "tg.confirm.cancelled"))
            return
        await self._delete_quietly(query)
        await pending.resume(self.reply_for(pending.requester, pending.where))

    async def _may_confirm(self, pending: PendingJob, presser: Requester, chat_id: int) -> bool:
        if presser.user_key == pending.requester.user_key:
            return True
        if not pending.anonymous:
            return False
        # Sent as a channel or by an anonymous admin: nobody presses as that chat, so an
        # admin of this chat may answer for it.
        try:
            member = await self.app.bot.get_chat_member(chat_id, int(presser.user_id))
        except TelegramError as err:
            log.debug("chat member not checked: %s", err)
            return False
        return member.status in (ChatMemberStatus.OWNER, ChatMemberStatus.ADMINISTRATOR)

    async def _edit_quietly(self, query: CallbackQuery, new_text: str) -> None:
        try:
            await query.edit_message_text(new_text, reply_markup=None)
        except TelegramError as err:
            log.debug("confirmation not edited: %s", err)

    async def _delete_quietly(self, query: CallbackQuery) -> None:
        try:
            await query.delete_message()
        except TelegramError as err:
            log.debug("confirmation not deleted: %s", err)

    # --- buttons ----------------------------------------------------------------------
    async def on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Replay a job from a result's button; whoever presses pays."""
        query = update.callback_query
        if query is None:
            return
        pressed = BUTTONS.decode(query.data)
        if pressed is None or query.message is None:
            await self._answer_query(query)
            return
        job_id, action = pressed
        message = query.message
        requester = self.requester_of(query.from_user, message.chat)
        lang = language_of(requester.language)
        # A burst of taps on one button is one job (checked and recorded without a pause).
        if not await self.first_press((requester.user_key, message.chat.id, job_id, action)):
            await self._answer_query(query, text(lang, "tg.press_repeated"))
            return
        # Callback data comes back as the client sends it: check the job belongs here.
        job = await self.service.job(job_id)
        if job is not None and not job_visible_to(job, requester):
            await self._answer_query(query, text(lang, "tg.not_here"))
            return
        await self._answer_query(query)
        where = where_of(message) if isinstance(message, Message) else Where(message.chat.id)
        await self.runner.replay(
            requester,
            job_id,
            action,
            self.fetcher.fetch_ref,
            self.reply_for(requester, where),
            source_ref=f"telegram:button:{query.id}",
            origin=address_of(where, group=requester.is_group),
        )

    async def _answer_query(self, query: CallbackQuery, notice: str | None = None) -> None:
        # Every press is answered (Telegram spins the button until then).
        try:
            await query.answer(notice)
        except TelegramError as err:
            log.debug("callback query not answered: %s", err)

    # --- other commands ---------------------------------------------------------------
    async def cmd_start(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Greet and teach the command language."""
        lang = self._lang(update)
        await self._answer(update, text(lang, "tg.start") + "\n\n" + render_help(lang))

    async def cmd_help(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Teach the command language, in the user's language."""
        await self._answer(update, render_help(self._lang(update)))

    async def cmd_sizes(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Show the ratio × tier size table in monospace."""
        table = render_sizes(self._lang(update))
        await self._answer(update, f"<pre>{html.escape(table)}</pre>", parse_mode=ParseMode.HTML)

    async def cmd_balance(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Show the user's spend against their limits, and their last jobs."""
        requester = self._requester(update)
        if requester is None:
            return
        lang = language_of(requester.language)

        async def reply() -> str:
            report = await self.service.spend_report(requester)
            return render_balance(report, self.service.prices, lang)

        await self._guarded(update, lang, reply)

    async def cmd_cancel(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Cancel the user's waiting and running jobs, naming them."""
        requester = self._requester(update)
        if requester is None:
            return
        lang = language_of(requester.language)
        await self._answer(update, render_cancelled(await self.service.cancel(requester), lang))

    async def cmd_key(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Make a personal web API key (`/key [name]`) or revoke yours (`/key revoke`).

        Only in a private chat: a key is a password, and a group would show it to everyone,
        so there it only says where to ask. The key is shown once; the store keeps a hash.
        """
        requester = self._requester(update)
        message = update.effective_message
        if requester is None or message is None:
            return
        lang = language_of(requester.language)
        if message.chat.type != ChatType.PRIVATE or message.sender_chat is not None:
            await self._answer(update, text(lang, "tg.key.private_only"))
            return
        args = list(context.args or [])
        try:
            if args and args[0].lower() == "revoke":
                count = await self.service.revoke_api_keys(requester)
                answer = text(lang, "tg.key.revoked" if count else "tg.key.none", count=count)
                await self._answer(update, answer)
                return
            made = await self.service.create_api_key(requester, " ".join(args) or "telegram")
        except ImgbotError as err:
            await self._answer(update, err.user_message(lang, text))
            return
        answer = text(
            lang,
            "tg.key.created",
            api_key=html.escape(made.key),
            base_url=html.escape(made.base_url),
            key_id=made.id,
        )
        await self._answer(update, answer, parse_mode=ParseMode.HTML)

    async def cmd_web(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Open the web page as a Mini App: a button that signs the user in, no key needed.

        Telegram opens Mini Apps from buttons in private chats only, and only at an https
        address: elsewhere, or without WEB_PUBLIC_URL on https, it says what is missing.
        """
        requester = self._requester(update)
        message = update.effective_message
        if requester is None or message is None:
            return
        lang = language_of(requester.language)
        if message.chat.type != ChatType.PRIVATE or message.sender_chat is not None:
            await self._answer(update, text(lang, "tg.web.private_only"))
            return
        root = self.settings.web_public_url.rstrip("/")
        if self.settings.web_port == 0 or not root.lower().startswith("https://"):
            key = "tg.web.off" if self.settings.web_port == 0 else "tg.web.needs_https"
            await self._answer(update, text(lang, key))
            return
        try:
            await self.service.check_access(requester)
        except ImgbotError as err:
            await self._answer(update, err.user_message(lang, text))
            return
        button = InlineKeyboardButton(text(lang, "tg.web.button"), web_app=WebAppInfo(root + "/"))
        await with_flood_retry(lambda: message.reply_text(
            text(lang, "tg.web.open"), reply_markup=InlineKeyboardMarkup([[button]]),
            do_quote=True,
        ))

    async def cmd_admin(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Run an admin command (limits, refunds, blocks, reports); others are refused."""
        requester = self._requester(update)
        message = update.effective_message
        if requester is None or message is None or not message.text:
            return
        name = message.text.split(maxsplit=1)[0].lstrip("/").split("@", 1)[0].lower()
        lang = language_of(requester.language)

        # A reply to someone's message aims the command at them: /limit daily=5000.
        replied = message.reply_to_message
        target = None
        if replied is not None and (replied.from_user is None or replied.from_user.id != self.app.bot.id):
            sender = self.requester_of_message(replied)
            target = sender.user_key if sender is not None else None

        async def reply() -> str:
            return await run_admin(
                self.service, requester, name, list(context.args or []), target=target
            )

        await self._guarded(update, lang, reply)

    # --- helpers ---------------------------------------------------------------------
    def _requester(self, update: Update) -> Requester | None:
        message = update.effective_message
        if message is not None and update.callback_query is None:
            return self.requester_of_message(message)
        user, chat = update.effective_user, update.effective_chat
        if user is None or chat is None:
            return None
        return self.requester_of(user, chat)

    def _lang(self, update: Update) -> str:
        user = update.effective_user
        return language_of(user.language_code if user else None)

    async def _guarded(
        self, update: Update, lang: str, reply: Callable[[], Awaitable[str]]
    ) -> None:
        try:
            answer = await reply()
        except ImgbotError as err:
            answer = err.user_message(lang, text)
        except Exception:
            await self._answer(update, text(lang, "error.internal"))
            raise
        await self._answer(update, answer)

    async def _answer(self, update: Update, answer: str, *, parse_mode: str | None = None) -> None:
        message = update.effective_message
        if message is None:
            return
        for start in range(0, max(len(answer), 1), TEXT_LIMIT):
            chunk = answer[start : start + TEXT_LIMIT]
            await with_flood_retry(
                lambda chunk=chunk: message.reply_text(chunk, parse_mode=parse_mode, do_quote=True)
            )

    async def update_done(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Every handler is done with an update: take it out of the durable inbox."""
        if self.inbox is not None:
            try:
                await self.inbox.finished(update.update_id)
            except Exception as err:  # noqa: BLE001 - handled again later, harmlessly
                log.warning("update %s not marked done: %s", update.update_id, err)

    async def first_press(self, key: tuple[object, ...]) -> bool:
        """Say whether a button press is the first of a burst, across replicas too."""
        if not self.presses.first(key):
            return False
        if not self.shared:
            return True
        mark = "tg:press:" + ":".join(str(part) for part in key)
        return await self.service.coordination.mark_once(mark, PRESS_WINDOW)

    def start_durable(self) -> None:
        """Carry on Telegram jobs a dead process left, and send operator alerts to the
        Telegram admins (ADMINS entries `telegram:<id>`)."""
        self.service.add_resumer("telegram", self.resume)
        self.service.alert_senders.append(self.alert_admins)

    def stop_durable(self) -> None:
        """Take no more jobs over (the bot is stopping)."""
        self.service.drop_resumer("telegram")
        self.service.payment_refunders.pop(PROVIDER, None)
        if self.alert_admins in self.service.alert_senders:
            self.service.alert_senders.remove(self.alert_admins)

    def resume(self, job: JobRecord) -> None:
        """Deliver or draw again, in its chat, a job another process left."""
        self._spawn(self._resume(job))

    async def _resume(self, job: JobRecord) -> None:
        try:
            origin = json.loads(job.request_json or "{}").get("origin") or {}
        except ValueError:
            origin = {}
        where = where_from_address(origin, int(job.chat_id or job.user_id))
        requester = await self.service.requester_of(job)
        lang = language_of(requester.language)
        try:
            await with_flood_retry(
                lambda: self.app.bot.send_message(
                    where.chat_id,
                    text(lang, "job.resumed", job_id=job.id),
                    reply_parameters=where.reply(),
                    message_thread_id=where.thread_id,
                )
            )
        except TelegramError as err:
            log.info("job %d: resume notice not sent: %s", job.id, self._scrub(str(err)))
        reply = self.reply_for(replace(requester, chat_id=job.chat_id), where)
        if origin.get("group"):
            reply.is_group = True
        await self.runner.resume(job, reply, self.fetcher.fetch_ref)

    async def alert_admins(self, message: str) -> None:
        """Send an operator alert to the Telegram chats of ALERT_CHATS, else to every
        Telegram admin's private chat."""
        for chat_id in self.settings.alert_targets(PLATFORM):
            if not chat_id.lstrip("-").isdigit():
                continue
            try:
                await with_flood_retry(
                    lambda c=int(chat_id): self.app.bot.send_message(c, f"⚠️ imgbot: {message}")
                )
            except TelegramError as err:
                log.warning("alert to telegram:%s not sent: %s", chat_id, self._scrub(str(err)))

    def _spawn(self, coroutine: Coroutine[object, object, None]) -> object:
        # Our own task set rather than app.create_task: `drain` waits for these on shutdown.
        task = asyncio.create_task(coroutine, name="imgbot:album")
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return task

    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Log what no handler caught, without the bot token."""
        err = context.error
        update_id = update.update_id if isinstance(update, Update) else "-"
        if isinstance(err, TelegramError):
            log.warning("update %s: Telegram API error: %s", update_id, self._scrub(str(err)))
            return
        self._log_failure(f"update {update_id}", err)

    def _log_failure(self, what: str, err: BaseException | None) -> None:
        trace = "".join(traceback.format_exception(err)) if err is not None else "no exception"
        log.error("%s failed:\n%s", what, self._scrub(trace))

    async def drain(self, grace: float) -> None:
        """Let running jobs (and albums still gathering) finish for up to `grace` seconds."""
        await self.runner.drain(grace)
        await finish_or_cancel(set(self._jobs), grace)
