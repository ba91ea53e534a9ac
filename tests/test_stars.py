"""Prepaid credits bought with Telegram Stars, through the real PTB Application.

Fakes only at the network seams (tests.telegram_fake at PTB's request seam, tests.fake_api
for the image API); the ledger is a real SQLite file or a database on the tests' real
PostgreSQL server (`database_url`, both). The flow as Telegram runs it: /buy → a pack's
button → sendInvoice (XTR, empty provider token, one price) → the pre-checkout query,
answered after checking the pack → successful_payment → the balance; a redelivered payment,
a pack removed between the invoice and the pre-checkout, an admin's refund of a purchase.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bots.telegram.texts import text
from core.config import Settings
from core.pricing import format_credits
from tests.fake_api import FakeImageAPI
from tests.telegram_fake import FakeBotApi, Updates
from tests.test_telegram import (  # noqa: F401 - fixtures
    ADMIN_ID,
    ANN,
    BOB,
    Harness,
    database_url,
    make_settings,
    running,
)

ADMIN = Updates.user(ADMIN_ID, "Op", "en")
PACKS = "50:20000,250:110000"


def stars_settings(make_settings: Callable[..., Settings], **extra: Any) -> Settings:  # noqa: F811
    values: dict[str, Any] = {"billing": "prepaid", "star_packs": PACKS, "previews": "off"}
    return make_settings(**{**values, **extra})


async def command(h: Harness, user: dict[str, Any], line: str) -> str:
    """Send a command in the user's private chat; return the bot's last text."""
    u = h.updates
    await h.send(u.update(u.message(user, u.private(user), text=line)))
    return h.texts()[-1]


async def balance_of(h: Harness, user: dict[str, Any]) -> float:
    return await h.service.ledger.balance(f"telegram:{user['id']}")


async def test_buying_a_pack_credits_the_balance_once_and_pays_for_jobs(
    make_settings: Callable[..., Settings], fake_api: FakeImageAPI  # noqa: F811
) -> None:
    config = stars_settings(make_settings)
    api, updates = FakeBotApi(), Updates()
    async with running(config, api, fake_api, updates) as h:
        # Nothing yet: a job is refused on the balance, and says how to top up.
        refusal = await command(h, ANN, "/img low a cat")
        assert "/buy" in refusal and "balance" in refusal
        assert not fake_api.api_requests

        # /buy offers the packs as buttons.
        await command(h, ANN, "/buy")
        offer = api.of("sendMessage")[-1]
        assert offer.params["text"] == text("en", "tg.buy.offer")
        buttons = [row[0] for row in offer.params["reply_markup"]["inline_keyboard"]]
        assert [b["callback_data"] for b in buttons] == ["b:50", "b:250"]

        # A button sends the invoice: Stars, an empty provider token, one price.
        await h.send(updates.callback(ANN, offer.result, "b:50"))
        (invoice,) = api.of("sendInvoice")
        assert invoice.params["currency"] == "XTR"
        assert invoice.params["provider_token"] == ""
        assert [p["amount"] for p in invoice.params["prices"]] == [50]
        assert invoice.params["chat_id"] == ANN["id"]
        payload = invoice.params["payload"]
        assert payload == "pack:50:20000"

        # The pre-checkout query is answered yes: the pack is still on offer.
        await h.send(updates.pre_checkout(ANN, payload, 50))
        (answer,) = api.of("answerPreCheckoutQuery")
        assert answer.params["ok"] is True

        # Paid: credited, and thanked with the balance.
        api.paid_charges["stxANN1"] = ANN["id"]
        paid = updates.update(updates.paid(ANN, payload, 50, "stxANN1"))
        await h.send(paid)
        assert await balance_of(h, ANN) == 20_000
        thanks = h.texts()[-1]
        prices = h.service.prices
        assert thanks == text(
            "en", "tg.buy.thanks", purchase_id=1,
            credits=format_credits(20_000, prices, "en"),
            balance=format_credits(20_000, prices, "en"),
        )
        # Telegram delivers the same update again (the process died before confirming it):
        # nothing more is credited, and nothing more is said.
        sent = len(api.calls)
        await h.send(paid)
        assert await balance_of(h, ANN) == 20_000
        assert len(api.calls) == sent

        # Jobs are paid from the balance now; /balance shows it.
        await command(h, ANN, "/img low a cat")
        (job,) = [j for j in await h.jobs() if j.status == "succeeded"]
        assert job.prepaid and job.actual_credits
        assert await balance_of(h, ANN) == 20_000 - job.actual_credits
        shown = await command(h, ANN, "/balance")
        left = f"{20_000 - job.actual_credits:,.0f}"
        assert text("en", "balance.credits", balance=left) in shown
        assert text("en", "spend.balance", balance=left) in api.of("sendPhoto")[-1].params[
            "caption"
        ]

        # /paysupport answers, naming the purchase.
        support = await command(h, ANN, "/paysupport")
        assert support.startswith(text("en", "tg.paysupport")) and "#1 " in support

        # The admin refunds the purchase: the stars go back through refundStarPayment,
        # and the credits still unspent are taken back (never below zero).
        before = await balance_of(h, ANN)
        done = await command(h, ADMIN, "/refund purchase 1")
        (refund,) = api.of("refundStarPayment")
        assert refund.params == {"user_id": ANN["id"], "telegram_payment_charge_id": "stxANN1"}
        assert done == text(
            "en", "purchase.refunded", purchase_id=1, stars=50, user=f"telegram:{ANN['id']}",
            taken=before, spent=20_000 - before,
        )
        assert await balance_of(h, ANN) == 0
        # Once only: a second refund is refused before Telegram is called again.
        again = await command(h, ADMIN, "/refund purchase 1")
        assert again == text("en", "purchase.already_refunded", purchase_id=1)
        assert len(api.of("refundStarPayment")) == 1
        # Not an admin: refused.
        assert await command(h, BOB, "/refund purchase 1") == text("en", "access.admin_only")


async def test_a_pack_removed_between_invoice_and_pre_checkout_is_refused(
    make_settings: Callable[..., Settings], fake_api: FakeImageAPI  # noqa: F811
) -> None:
    api, updates = FakeBotApi(), Updates()
    async with running(stars_settings(make_settings), api, fake_api, updates) as h:
        await h.send(updates.update(updates.message(BOB, updates.private(BOB), text="/buy 250")))
        (invoice,) = api.of("sendInvoice")
        payload = invoice.params["payload"]
        assert (payload, invoice.params["prices"][0]["amount"]) == ("pack:250:110000", 250)
    # The operator drops the pack and restarts; the buyer pays the old invoice.
    async with running(
        stars_settings(make_settings, star_packs="50:20000"), api, fake_api, updates
    ) as h:
        await h.send(updates.pre_checkout(BOB, payload, 250))
        (answer,) = api.of("answerPreCheckoutQuery")
        assert answer.params["ok"] is False
        assert answer.params["error_message"] == text("en", "tg.buy.no_such_pack")
        # A pack repriced (same stars, other credits) or a forged total: refused too.
        await h.send(updates.pre_checkout(BOB, "pack:50:99999", 50))
        await h.send(updates.pre_checkout(BOB, "pack:50:20000", 1))
        assert [a.params["ok"] for a in api.of("answerPreCheckoutQuery")] == [False] * 3
        assert await command(h, BOB, "/buy 250") == text("en", "tg.buy.no_such_pack")
        assert await balance_of(h, BOB) == 0


async def test_without_prepaid_billing_nothing_is_for_sale(
    make_settings: Callable[..., Settings], fake_api: FakeImageAPI  # noqa: F811
) -> None:
    api, updates = FakeBotApi(), Updates()
    config = make_settings(star_packs=PACKS)  # BILLING=limits
    async with running(config, api, fake_api, updates) as h:
        assert await command(h, ANN, "/buy") == text("en", "tg.buy.closed")
        await h.send(updates.pre_checkout(ANN, "pack:50:20000", 50))
        (answer,) = api.of("answerPreCheckoutQuery")
        assert answer.params["ok"] is False
        assert not api.of("sendInvoice")


async def test_grants_welcome_and_revocations_by_admin_command(
    make_settings: Callable[..., Settings], fake_api: FakeImageAPI  # noqa: F811
) -> None:
    api, updates = FakeBotApi(), Updates()
    config = stars_settings(make_settings, welcome_credits=1500)
    async with running(config, api, fake_api, updates) as h:
        # The welcome grant, once: /balance shows it, a second look gives nothing more.
        shown = await command(h, BOB, "/balance")
        assert text("en", "balance.credits", balance="1,500") in shown
        await command(h, BOB, "/balance")
        assert await balance_of(h, BOB) == 1500
        bob = f"telegram:{BOB['id']}"
        assert await command(h, ADMIN, f"/grant {BOB['id']} 2500") == text(
            "en", "admin.granted", who=bob, credits=2500, balance=4000
        )
        assert await command(h, ADMIN, f"/revoke {BOB['id']} 1000") == text(
            "en", "admin.revoked", who=bob, credits=1000, balance=3000
        )
        assert await command(h, ADMIN, f"/revoke {BOB['id']}") == text(
            "en", "admin.revoked", who=bob, credits=3000, balance=0
        )
        assert await command(h, ADMIN, f"/grant {BOB['id']} -5") == text(
            "en", "admin.bad_amount", value="-5"
        )
        assert await command(h, BOB, f"/grant {BOB['id']} 100") == text("en", "access.admin_only")
        assert await balance_of(h, BOB) == 0
