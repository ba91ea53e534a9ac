"""Telegram Stars: `/buy` packs of credits, the invoice, the pre-checkout answer, the
payment, its refund, and `/paysupport` (Telegram requires a bot that sells to answer it).

Digital goods are paid in Stars (currency XTR, an empty provider token, exactly one price).
The invoice's payload names the pack as sent (`pack:<stars>:<credits>`); the pre-checkout
query is answered at once (Telegram waits 10 s) after checking that the pack is still on
offer at that price; the `successful_payment` message is credited by the core once per
`telegram_payment_charge_id` (a redelivered update credits nothing more). The charge is
kept, so an admin's `refund purchase <id>` calls refundStarPayment and takes the credits
back as far as they are unspent.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Protocol

from telegram import (
    Chat,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    LabeledPrice,
    Update,
    User,
)
from telegram.error import TelegramError
from telegram.ext import (
    Application,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    PreCheckoutQueryHandler,
    filters,
)

from bots.telegram.texts import text
from core.errors import AccessDenied, ImgbotError, UserError
from core.messages import language_of
from core.pricing import format_credits
from core.requester import Requester
from core.service import ImageService
from core.store import PurchaseRecord

log = logging.getLogger(__name__)

CURRENCY = "XTR"
PROVIDER = "telegram_stars"
BUY_DATA = re.compile(r"^b:(\d{1,5})$")
# Telegram's answer when the charge was refunded already (by an earlier try whose answer
# was lost): the stars are back with the user, so the ledger may record the refund.
ALREADY_REFUNDED = "CHARGE_ALREADY_REFUNDED"


def pack_payload(stars: int, credits: float) -> str:
    """Return the invoice payload naming a pack as offered (≤ 128 bytes)."""
    return f"pack:{stars}:{credits:.0f}"


class PaymentsHost(Protocol):
    """What payments use of the Telegram adapter (bots.telegram.handlers)."""

    service: ImageService
    app: Application
    _scrub: Callable[[str], str]

    def requester_of(self, user: User, chat: Chat, sender_chat: Chat | None = None) -> Requester:
        """Describe who sent a message in a chat."""
        ...

    def _requester(self, update: Update) -> Requester | None: ...

    async def _answer(
        self, update: Update, answer: str, *, parse_mode: str | None = None
    ) -> None: ...


class StarPayments:
    """The buying and refunding side of one Telegram adapter."""

    def __init__(self, adapter: PaymentsHost) -> None:
        self.adapter = adapter
        self.service = adapter.service
        self.bot = adapter.app.bot

    def register(self) -> None:
        """Add the payment handlers (before the catch-all button handler)."""
        app = self.adapter.app
        new_message = filters.UpdateType.MESSAGE
        app.add_handler(CallbackQueryHandler(self.on_buy_button, pattern=BUY_DATA))
        app.add_handler(PreCheckoutQueryHandler(self.on_pre_checkout))
        app.add_handler(MessageHandler(filters.SUCCESSFUL_PAYMENT, self.on_successful_payment))
        app.add_handler(CommandHandler("buy", self.cmd_buy, filters=new_message))
        app.add_handler(CommandHandler("paysupport", self.cmd_paysupport, filters=new_message))

    def offers(self) -> list[tuple[int, float]]:
        """Return the packs on offer now, cheapest first."""
        return sorted(self.service.settings.star_packs.items())

    # --- /buy -------------------------------------------------------------------------
    async def cmd_buy(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Offer the packs as buttons, or send the invoice of `/buy <stars>`."""
        requester = self.adapter._requester(update)
        message = update.effective_message
        if requester is None or message is None:
            return
        lang = language_of(requester.language)
        if not self.service.settings.prepaid or not self.offers():
            await self.adapter._answer(update, text(lang, "tg.buy.closed"))
            return
        try:
            await self.service.check_access(requester)
        except AccessDenied as err:
            if not err.silent:
                await self.adapter._answer(update, err.user_message(lang, text))
            return
        args = list(context.args or [])
        if args:
            stars = int(args[0]) if args[0].isdigit() and len(args[0]) <= 5 else 0
            if self.service.star_pack(stars) is None:
                await self.adapter._answer(update, text(lang, "tg.buy.no_such_pack"))
                return
            await self.send_invoice(message.chat.id, stars, lang)
            return
        prices = self.service.prices
        buttons = [
            [InlineKeyboardButton(
                text(lang, "tg.buy.button", stars=stars,
                     credits=format_credits(credits, prices, lang)),
                callback_data=f"b:{stars}",
            )]
            for stars, credits in self.offers()
        ]
        await message.reply_text(
            text(lang, "tg.buy.offer"), reply_markup=InlineKeyboardMarkup(buttons), do_quote=True
        )

    async def on_buy_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Send the invoice of the pack a /buy button names."""
        query = update.callback_query
        if query is None or query.message is None:
            return
        lang = language_of(query.from_user.language_code)
        # PTB hands an empty `data` to every pattern: check it here.
        match = BUY_DATA.fullmatch(query.data or "")
        stars = int(match.group(1)) if match else 0
        if self.service.star_pack(stars) is None or not self.service.settings.prepaid:
            await self._answer_query(query, text(lang, "tg.buy.no_such_pack"))
            return
        await self._answer_query(query)
        await self.send_invoice(query.message.chat.id, stars, lang)

    async def send_invoice(self, chat_id: int, stars: int, lang: str) -> None:
        """Send the invoice of one pack: XTR, an empty provider token, one price."""
        credits = self.service.star_pack(stars)
        assert credits is not None
        amount = format_credits(credits, self.service.prices, lang)
        await self.bot.send_invoice(
            chat_id,
            title=text(lang, "tg.buy.title", credits=amount),
            description=text(lang, "tg.buy.description", credits=amount, stars=stars),
            payload=pack_payload(stars, credits),
            currency=CURRENCY,
            prices=[LabeledPrice(text(lang, "tg.buy.title", credits=amount), stars)],
            provider_token="",
        )

    # --- paying -----------------------------------------------------------------------
    async def on_pre_checkout(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Say yes only to a pack still on offer at the price invoiced (within 10 s)."""
        query = update.pre_checkout_query
        if query is None:
            return
        lang = language_of(query.from_user.language_code)
        problem = self._pack_problem(query.invoice_payload, query.total_amount, query.currency)
        if problem is None:
            requester = self.adapter.requester_of(query.from_user, _private(query.from_user))
            try:
                if await self.service.is_blocked(requester):
                    problem = "access.blocked"
            except Exception as err:  # noqa: BLE001 - a slow or broken ledger must not
                log.warning("pre-checkout: block check failed: %s", err)  # hold the payer
        try:
            if problem is None:
                await query.answer(ok=True)
            else:
                log.info("pre-checkout %s refused: %s", query.id, problem)
                await query.answer(ok=False, error_message=text(lang, problem))
        except TelegramError as err:
            log.warning("pre-checkout %s not answered: %s", query.id, self.adapter._scrub(str(err)))

    def _pack_problem(self, payload: str, total: int, currency: str) -> str | None:
        if not self.service.settings.prepaid:
            return "tg.buy.closed"
        parts = payload.split(":")
        if currency != CURRENCY or len(parts) != 3 or parts[0] != "pack":
            return "tg.buy.no_such_pack"
        stars = int(parts[1]) if parts[1].isdigit() else 0
        credits = self.service.star_pack(stars)
        if credits is None or total != stars or pack_payload(stars, credits) != payload:
            return "tg.buy.no_such_pack"  # removed or repriced since the invoice
        return None

    async def on_successful_payment(
        self, update: Update, context: ContextTypes.DEFAULT_TYPE
    ) -> None:
        """Credit a paid pack once per charge id, and thank the payer."""
        message = update.effective_message
        if message is None or message.successful_payment is None or message.from_user is None:
            return
        paid = message.successful_payment
        requester = self.adapter.requester_of(message.from_user, _private(message.from_user))
        lang = language_of(requester.language)
        try:
            purchase, created = await self.service.record_purchase(
                requester,
                charge_id=paid.telegram_payment_charge_id,
                provider_charge_id=paid.provider_payment_charge_id or "",
                payload=paid.invoice_payload,
                stars=paid.total_amount,
                currency=paid.currency,
            )
        except ImgbotError as err:
            await self.service.alert(
                "payment_unknown",
                f"{requester.user_key} paid {paid.total_amount} {paid.currency} with a payload"
                f" that matches no pack (charge {paid.telegram_payment_charge_id}): nothing was"
                " credited. Grant the credits by hand, or refund with refundStarPayment.",
            )
            await self.adapter._answer(update, err.user_message(lang, text))
            return
        if not created:
            return  # a redelivered update: credited already, and thanked already
        balance = await self.service.credit_balance(requester)
        prices = self.service.prices
        await self.adapter._answer(update, text(
            lang, "tg.buy.thanks", purchase_id=purchase.id,
            credits=format_credits(purchase.credits, prices, lang),
            balance=format_credits(balance, prices, lang),
        ))

    async def refund(self, purchase: PurchaseRecord) -> None:
        """Give a purchase's stars back (the core's refunder for telegram_stars)."""
        try:
            await self.bot.refund_star_payment(int(purchase.user_id), purchase.charge_id)
        except TelegramError as err:
            if ALREADY_REFUNDED in str(err).upper():
                log.info("purchase %d: refunded on Telegram already", purchase.id)
                return
            raise UserError(
                "purchase.refund_failed", purchase_id=purchase.id,
                reason=self.adapter._scrub(str(err))[:200],
            ) from None

    # --- /paysupport --------------------------------------------------------------------
    async def cmd_paysupport(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Explain how to get help with a payment, listing the user's purchases."""
        requester = self.adapter._requester(update)
        if requester is None:
            return
        lang = language_of(requester.language)
        lines = [text(lang, "tg.paysupport")]
        for p in await self.service.purchases_of(requester):
            status = text(lang, f"purchase.status.{p.status.value}")
            lines.append(text(
                lang, "tg.paysupport.line", purchase_id=p.id, stars=p.amount,
                credits=format_credits(p.credits, self.service.prices, lang), status=status,
                when=p.created_at.strftime("%Y-%m-%d"),
            ))
        await self.adapter._answer(update, "\n".join(lines))

    async def _answer_query(self, query: object, notice: str | None = None) -> None:
        try:
            await query.answer(notice)  # type: ignore[attr-defined]
        except TelegramError as err:
            log.debug("callback query not answered: %s", err)


def _private(user: User) -> Chat:
    """The private chat with a user (payments are the payer's own, wherever they paid)."""
    return Chat(user.id, Chat.PRIVATE)
