"""Admin actions, platform-free: limits, refunds, blocks, top spenders, unsettled jobs.

Every bot and the terminal run the same words:
    limit <user> [daily=N|default] [monthly=N|default]
    chatlimit <chat> daily=N|default
    refund <job id> · refund purchase <purchase id>
    grant <user> <credits> · revoke <user> [credits] · purchases [user]
    block <user or chat> / unblock <user or chat>
    top [days]
    chats [days]
    unsettled
A bare id means "on the admin's own platform" (the terminal has none: it names
`platform:id`); `platform:id` names any; `@username` names a user the bot has seen. Ids are
checked per platform (`core.ids`): a malformed or unknown one is an error, never a new key.

Every command that changes something (limits, refunds, blocks) is logged with who ran it
and how it ended: the audit trail is the log (`core.admin` at INFO), whatever the door —
a chat, the terminal or the web dashboard. A refund is also kept in the ledger
(`refunded_by`).

Configured admins (`ADMINS`) may do everything. A chat admin (Discord: Manage Server) may
only run `chatlimit` and `chats` for their own chat: their power ends at their server, and
under the operator's `CHAT_DAILY_LIMIT`, which they may lower but never lift.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from core.errors import AccessDenied, ImgbotError, PromptError
from core.messages import language_of, text
from core.pricing import format_credits
from core.reports import render_job_line
from core.requester import Requester
from core.service import ImageService

log = logging.getLogger(__name__)

ADMIN_COMMANDS = (
    "limit", "chatlimit", "refund", "block", "unblock", "top", "chats", "unsettled",
    "grant", "revoke", "purchases",
)
CHAT_ADMIN_COMMANDS = ("chatlimit", "chats")
# Commands that change the ledger: each run is recorded with who ran it.
CHANGING_COMMANDS = ("limit", "chatlimit", "refund", "block", "unblock", "grant", "revoke")
# Commands about one user, which a reply to that user's message may aim.
TARGETED_COMMANDS = ("limit", "block", "unblock", "grant", "revoke", "purchases")
_JOB_ID = re.compile(r"#?[0-9]{1,19}")


async def _key(service: ImageService, word: str, requester: Requester) -> str:
    # The requester's own chat (the default of a server manager's chatlimit) came from the
    # platform itself; anything an admin typed is checked.
    if word in (requester.chat_key, requester.user_key):
        return word
    return await service.directory.resolve(word, requester.platform)


def _own_word(word: str, platform: str) -> str:
    return word if ":" in word else f"{platform}:{word}"


def _amount_arg(value: str) -> float | None:
    if value.lower() in ("default", "none", "-"):
        return None
    try:
        amount = float(value)
    except ValueError:
        raise PromptError("admin.bad_amount", value=value) from None
    # float() also reads "nan", "inf" and "1e999"; none of them is a limit.
    if not math.isfinite(amount) or amount < 0:
        raise PromptError("admin.bad_amount", value=value)
    return amount


def _is_amount(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def _credits_arg(value: str) -> float:
    amount = _amount_arg(value)
    if amount is None or amount <= 0 or amount >= 1e12:
        raise PromptError("admin.bad_amount", value=value)
    return amount


def _keyword_args(args: Sequence[str], allowed: Sequence[str]) -> dict[str, float | None]:
    found: dict[str, float | None] = {}
    for arg in args:
        name, sep, value = arg.partition("=")
        if not sep or name.lower() not in allowed:
            raise PromptError("admin.usage")
        found[name.lower()] = _amount_arg(value)
    if not found:
        raise PromptError("admin.usage")
    return found


def _check_below_operator(service: ImageService, args: Sequence[str]) -> None:
    """Refuse a chat admin a daily limit above the operator's CHAT_DAILY_LIMIT (or none)."""
    ceiling = service.settings.chat_daily_limit
    daily = _keyword_args(args, ("daily",))["daily"]
    # None = back to the operator's setting; 0 = unlimited, which only an operator may give.
    if ceiling > 0 and daily is not None and (daily == 0 or daily > ceiling):
        raise AccessDenied("access.chatlimit_ceiling", limit=ceiling)


def _days(args: Sequence[str]) -> int:
    if not args:
        return 7
    try:
        days = int(args[0])
    except ValueError:
        raise PromptError("admin.usage") from None
    if days < 1 or days > 3650:
        raise PromptError("admin.usage")
    return days


async def run_admin(
    service: ImageService,
    requester: Requester,
    name: str,
    args: Sequence[str],
    *,
    target: str | None = None,
) -> str:
    """Run one admin command for an admin and return the reply text.

    `target` is the user key of the person whose message the command answers (a reply):
    `limit`, `block` and `unblock` then act on them when no user is named.
    """
    if name.lower() not in CHANGING_COMMANDS:
        return await _run_admin(service, requester, name, args, target=target)
    # What was typed is clipped and kept on one line: it goes into the log as it came.
    words = " ".join([name.lower(), *args] + ([f"(reply to {target})"] if target else []))
    words = words.replace("\n", " ")[:200]
    try:
        reply = await _run_admin(service, requester, name, args, target=target)
    except ImgbotError as err:
        log.info("admin action by %s refused (%s): %s", requester.user_key, err.code, words)
        raise
    log.info("admin action by %s: %s", requester.user_key, words)
    return reply


async def _run_admin(
    service: ImageService,
    requester: Requester,
    name: str,
    args: Sequence[str],
    *,
    target: str | None,
) -> str:
    lang = language_of(requester.language)
    ledger = service.ledger
    name = name.lower()
    platform = requester.platform
    if target is not None and name in TARGETED_COMMANDS and (
        not args
        or "=" in args[0]
        # As a reply, `grant N` and `revoke N` name only the amount.
        or (name in ("grant", "revoke") and len(args) == 1 and _is_amount(args[0]))
    ):
        args = [target, *args]
    own_chat_only = not service.is_admin(requester)
    if own_chat_only:
        if not (requester.is_chat_admin and requester.chat_key and name in CHAT_ADMIN_COMMANDS):
            service.require_admin(requester)  # raises access.admin_only
        if name == "chatlimit":
            # Any other chat, well-formed or not, is beyond a manager's reach.
            if args and "=" not in args[0] and _own_word(args[0], platform) != requester.chat_key:
                raise AccessDenied("access.own_chat_only")
            if not args or "=" in args[0]:
                args = [str(requester.chat_key), *args]
            _check_below_operator(service, args[1:])
    if name == "limit":
        if not args:
            raise PromptError("admin.usage")
        user_key = await _key(service, args[0], requester)
        values = _keyword_args(args[1:], ("daily", "monthly"))
        current = await ledger.get_user(user_key)
        daily = values["daily"] if "daily" in values else (current.daily_limit if current else None)
        monthly = (
            values["monthly"] if "monthly" in values else (current.monthly_limit if current else None)
        )
        await ledger.set_user_limits(user_key, daily, monthly)
        return text(lang, "admin.limit_set", who=user_key, daily=_limit(lang, daily), monthly=_limit(lang, monthly))
    if name == "chatlimit":
        if not args:
            raise PromptError("admin.usage")
        chat_key = await _key(service, args[0], requester)
        values = _keyword_args(args[1:], ("daily",))
        await ledger.set_chat_limit(chat_key, values["daily"])
        return text(lang, "admin.chatlimit_set", who=chat_key, daily=_limit(lang, values["daily"]))
    if name == "refund" and args and args[0].lower() == "purchase":
        if len(args) != 2 or not _JOB_ID.fullmatch(args[1]):
            raise PromptError("admin.usage")
        purchase = await service.refund_purchase(int(args[1].lstrip("#")), by=requester.user_key)
        return text(
            lang, "purchase.refunded", purchase_id=purchase.id, stars=purchase.amount,
            user=purchase.user_key, taken=purchase.refunded_credits or 0.0,
            spent=purchase.credits - (purchase.refunded_credits or 0.0),
        )
    if name == "grant":
        if len(args) != 2:
            raise PromptError("admin.usage")
        user_key = await _key(service, args[0], requester)
        amount = _credits_arg(args[1])
        balance = await ledger.grant_credits(user_key, amount, by=requester.user_key)
        return text(lang, "admin.granted", who=user_key, credits=amount, balance=balance)
    if name == "revoke":
        if len(args) not in (1, 2):
            raise PromptError("admin.usage")
        user_key = await _key(service, args[0], requester)
        amount = _credits_arg(args[1]) if len(args) == 2 else None
        taken, balance = await ledger.revoke_credits(user_key, amount, by=requester.user_key)
        return text(lang, "admin.revoked", who=user_key, credits=taken, balance=balance)
    if name == "purchases":
        if len(args) > 1:
            raise PromptError("admin.usage")
        user_key = await _key(service, args[0], requester) if args else None
        purchases = await ledger.list_purchases(user_key, 20)
        if not purchases:
            return text(lang, "admin.nothing")
        lines = [text(lang, "admin.purchases_header")]
        for p in purchases:
            status = text(lang, f"purchase.status.{p.status.value}")
            lines.append(text(
                lang, "admin.purchase_line", purchase_id=p.id, when=p.created_at.strftime(
                    "%Y-%m-%d %H:%M"), user=p.user_key, stars=p.amount, credits=p.credits,
                status=status,
            ))
        return "\n".join(lines)
    if name == "refund":
        # ASCII digits only, and few: "²".isdigit() is true, and int() of 5,000 digits raises.
        if len(args) != 1 or not _JOB_ID.fullmatch(args[0]):
            raise PromptError("admin.usage")
        job = await ledger.refund(int(args[0].lstrip("#")), by=requester.user_key)
        return text(lang, "refund.done", job_id=job.id, credits=job.refunded_credits, user=job.user_key)
    if name in ("block", "unblock"):
        if len(args) != 1:
            raise PromptError("admin.usage")
        key = await _key(service, args[0], requester)
        await ledger.set_blocked(key, name == "block")
        return text(lang, f"admin.{name}ed", who=key)
    if name == "top":
        since = datetime.now(UTC) - timedelta(days=_days(args))
        rows = await ledger.top_spenders(since, 10)
        if not rows:
            return text(lang, "admin.nothing")
        lines = [text(lang, "admin.top_header", days=_days(args))]
        for i, (user_key, display, credits, jobs) in enumerate(rows, 1):
            cost = format_credits(credits, service.prices, lang)
            who = display or user_key
            line = text(lang, "admin.top_line", rank=i, who=who, user=user_key, cost=cost, jobs=jobs)
            lines.append(line)
        return "\n".join(lines)
    if name == "chats":
        since = datetime.now(UTC) - timedelta(days=_days(args))
        rows = await ledger.chat_totals(since)
        if own_chat_only:
            rows = [row for row in rows if row[0] == requester.chat_key]
        if not rows:
            return text(lang, "admin.nothing")
        lines = [text(lang, "admin.chats_header", days=_days(args))]
        for chat_key, credits, jobs in rows:
            cost = format_credits(credits, service.prices, lang)
            lines.append(text(lang, "admin.chats_line", chat=chat_key, cost=cost, jobs=jobs))
        return "\n".join(lines)
    if name == "unsettled":
        jobs = await ledger.list_unsettled()
        if not jobs:
            return text(lang, "admin.nothing")
        lines = [text(lang, "admin.unsettled_header")]
        lines += [f"{render_job_line(j, service.prices, lang)} — {j.user_key}" for j in jobs]
        return "\n".join(lines)
    raise PromptError("admin.usage")


def _limit(lang: str, value: float | None) -> str:
    if value is None:
        return text(lang, "balance.default_limit")
    return f"{value:,.0f}" if value else text(lang, "balance.unlimited")


__all__ = ["ADMIN_COMMANDS", "ImgbotError", "run_admin"]
