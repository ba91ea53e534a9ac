"""Telegram wiring: build the PTB Application with our handlers, and run it until stop.

    app = build_application(settings, service)          # a real PTB Application
    await run_telegram(settings, service, stop_event)   # poll (or webhook) until stop is set

The handlers are `bots.telegram.handlers`; receiving (captions, albums, replies) is
`references`; replying (status, chat action, photos, buttons) is `reply`; flood limits
are `flood`. The job flow itself is core's (`core.runner`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

from telegram import BotCommand, BotCommandScopeChat, Update
from telegram.error import (
    BadRequest,
    Conflict,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
)
from telegram.ext import Application, BaseRateLimiter
from telegram.request import BaseRequest

from bots.telegram.albums import SharedAlbums
from bots.telegram.flood import FloodLimiter
from bots.telegram.handlers import ADAPTER_KEY, PLATFORM, USER_COMMANDS, TelegramAdapter
from bots.telegram.inbox import InboxQueue
from bots.telegram.texts import text
from core.admin import ADMIN_COMMANDS
from core.config import Settings, SettingsError
from core.service import ImageService

log = logging.getLogger(__name__)

# Pre-checkout queries must come too (Stars payments), or a buyer's payment never completes.
ALLOWED_UPDATES = [Update.MESSAGE, Update.CALLBACK_QUERY, Update.PRE_CHECKOUT_QUERY]
# Updates handled at once. PTB's default (256) let one busy group stall every chat: a group
# gets 20 messages a minute, so its waiting answers could hold all 256 slots for many minutes
# (tests/test_load.py measures this). Waiting handlers are cheap coroutines.
MAX_CONCURRENT_UPDATES = 4096


def build_application(
    settings: Settings,
    service: ImageService,
    *,
    request: BaseRequest | None = None,
    get_updates_request: BaseRequest | None = None,
    rate_limiter: BaseRateLimiter[str] | None = None,
) -> Application:
    """Build the Telegram Application with every handler, bound to the service."""
    token = settings.telegram_bot_token.get_secret_value()
    if not token:
        raise SettingsError("TELEGRAM_BOT_TOKEN: empty; get a token from @BotFather")
    base = settings.telegram_api_base_url.rstrip("/")
    builder = (
        Application.builder()
        .token(token)
        .base_url(f"{base}/bot")
        .base_file_url(f"{base}/file/bot")
        # Image jobs take tens of seconds, and answers in a group over its flood budget
        # wait their turn: never let them hold up other users or chats.
        .concurrent_updates(MAX_CONCURRENT_UPDATES)
        # Every call passes the flood limiter: Telegram's rates, results before status.
        .rate_limiter(rate_limiter or FloodLimiter())
    )
    if request is not None:
        builder = builder.request(request)
    else:
        pool = max(32, settings.max_jobs_in_flight * 4)
        builder = builder.connection_pool_size(pool).read_timeout(30).media_write_timeout(120)
    if get_updates_request is not None:
        builder = builder.get_updates_request(get_updates_request)
    inbox: InboxQueue | None = None
    if settings.telegram_webhook_url:
        # Replicas behind one webhook: an update answered 2xx is kept until handled.
        inbox = InboxQueue(service.coordination, service.owner, settings.job_lease)
        builder = builder.update_queue(inbox)
    app = builder.build()
    adapter = TelegramAdapter(settings, service, app)
    if inbox is not None:
        inbox.bot = app.bot
        adapter.inbox = inbox
        if isinstance(adapter.albums, SharedAlbums):
            inbox.also_renew.append(adapter.albums.renew)
    adapter.register()
    app.bot_data[ADAPTER_KEY] = adapter
    return app


def _commands(lang: str, names: Sequence[str]) -> list[BotCommand]:
    return [BotCommand(name, text(lang, f"tg.cmd.{name}")) for name in names]


async def register_commands(app: Application, settings: Settings) -> None:
    """Tell Telegram the command list, in English and Chinese (admins also see theirs)."""
    bot = app.bot
    try:
        await bot.set_my_commands(_commands("en", USER_COMMANDS))
        await bot.set_my_commands(_commands("zh", USER_COMMANDS), language_code="zh")
    except TelegramError as err:
        log.warning("could not register the command list: %s", err)
    every = (*USER_COMMANDS, *ADMIN_COMMANDS)
    for admin in settings.admins:
        platform, _, user_id = admin.partition(":")
        if platform != PLATFORM or not user_id.lstrip("-").isdigit():
            continue
        scope = BotCommandScopeChat(int(user_id))
        try:
            await bot.set_my_commands(_commands("en", every), scope=scope)
            await bot.set_my_commands(_commands("zh", every), scope=scope, language_code="zh")
        except TelegramError as err:
            # An admin who never opened the bot has no chat with it yet.
            log.info("admin command list not set for %s: %s", admin, err)


def _log_polling_error(err: TelegramError) -> None:
    log.warning("polling Telegram: %s", err)


async def run_telegram(
    settings: Settings,
    service: ImageService,
    stop: asyncio.Event,
    *,
    request: BaseRequest | None = None,
    get_updates_request: BaseRequest | None = None,
    rate_limiter: BaseRateLimiter[str] | None = None,
) -> None:
    """Run the Telegram bot (polling, or a webhook when TELEGRAM_WEBHOOK_URL is set) until stop."""
    app = build_application(
        settings,
        service,
        request=request,
        get_updates_request=get_updates_request,
        rate_limiter=rate_limiter,
    )
    adapter: TelegramAdapter = app.bot_data[ADAPTER_KEY]
    limiter = app.bot.rate_limiter
    share = limiter.share_with if isinstance(limiter, FloodLimiter) else None
    poller: asyncio.Task[None] | None = None
    async with app:
        await register_commands(app, settings)
        if not settings.telegram_webhook_url:
            # Long polling is one process per bot: two would take each other's updates.
            poller = await _hold_poller(app, settings, service, stop)
        await app.start()
        adapter.start_durable()
        if share is not None:
            share(service.replicas)
            service.replica_listeners.append(share)
            if settings.telegram_webhook_url and isinstance(limiter, FloodLimiter):
                limiter.gate = LedgerGate(service)
        role = "telegram:webhook" if settings.telegram_webhook_url else "telegram:polling"
        service.roles.add(role)
        inbox = (
            asyncio.create_task(adapter.inbox.keep(), name="imgbot:telegram-inbox")
            if adapter.inbox is not None
            else None
        )
        try:
            if settings.telegram_webhook_url:
                await _start_webhook(app, settings)
            else:
                await app.updater.start_polling(  # type: ignore[union-attr]
                    allowed_updates=ALLOWED_UPDATES, error_callback=_log_polling_error
                )
            log.info(
                "telegram bot @%s running (%s)",
                app.bot.username,
                "webhook" if settings.telegram_webhook_url else "polling",
            )
            await stop.wait()
        finally:
            # Stop receiving first; then the service cancels waiting jobs (their handlers
            # tell the users) and lets running ones finish; then our replies go out.
            if app.updater is not None and app.updater.running:
                await app.updater.stop()
            adapter.stop_durable()
            if inbox is not None:
                inbox.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await inbox
            service.roles.discard(role)
            if share is not None and share in service.replica_listeners:
                service.replica_listeners.remove(share)
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await poller
                with contextlib.suppress(Exception):
                    await service.coordination.drop_lease(_poller_name(app), service.owner)
            if stop.is_set():  # else it failed to start: `imgbot run` may try it again
                await service.shutdown(settings.shutdown_grace)
            await adapter.drain(settings.shutdown_grace)
            if app.running:
                await app.stop()


def startup_failure(exc: BaseException, settings: Settings) -> tuple[str, bool]:
    """Say in one line why the bot could not run (never the token); True: trying again may help."""
    if isinstance(exc, PollerTaken):
        return str(exc), False
    if isinstance(exc, InvalidToken):
        return (
            "the Bot API refused TELEGRAM_BOT_TOKEN (401 Unauthorized): "
            "check the token @BotFather gave you",
            False,
        )
    if isinstance(exc, BadRequest | Forbidden):
        return f"the Bot API refused a start-up call: {exc.message}", False
    if isinstance(exc, Conflict):
        return f"another process is using this bot token ({exc.message})", True
    if isinstance(exc, RetryAfter):
        return f"the Bot API asked to wait ({exc.message})", True
    if isinstance(exc, NetworkError):
        return (
            f"the Bot API at {settings.telegram_api_base_url} is unreachable ({exc.message})",
            True,
        )
    if isinstance(exc, SettingsError):
        return str(exc), False
    return f"{type(exc).__name__}: {exc}", False


class PollerTaken(Exception):
    """Another live imgbot process polls this bot already."""


def _poller_name(app: Application) -> str:
    return f"telegram:poller:{app.bot.id}"


async def _hold_poller(
    app: Application, settings: Settings, service: ImageService, stop: asyncio.Event
) -> asyncio.Task[None]:
    """Take the ledger's "poller" lease for this bot, or refuse to start.

    A process that died holding it (kill -9) lets go when its lease ends: wait that long
    (a restart at once comes up within JOB_LEASE). One still renewing it is alive: refuse.
    Return the task that renews the lease until cancelled.
    """
    name, owner, lease = _poller_name(app), service.owner, settings.job_lease
    deadline = time.monotonic() + lease * 2 + 1
    while not await service.coordination.hold_lease(name, owner, lease, "telegram polling"):
        if time.monotonic() > deadline:
            holders = [held.owner for held in await service.coordination.leases(name)]
            raise PollerTaken(
                f"another imgbot process ({', '.join(holders) or 'unknown'}) already polls"
                " this bot on the same ledger; run one process with polling, or set"
                " TELEGRAM_WEBHOOK_URL to run replicas"
            )
        log.info("another process held the Telegram poller lease; waiting for it to end")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.2, lease / 3))
        if stop.is_set():
            break

    async def renew() -> None:
        while True:
            await asyncio.sleep(max(0.2, lease / 3))
            try:
                if not await service.coordination.hold_lease(name, owner, lease, "telegram polling"):
                    log.error("another process took the Telegram poller lease")
            except Exception as err:  # noqa: BLE001 - tried again next round
                log.warning("poller lease not renewed: %s", err)

    return asyncio.create_task(renew(), name="imgbot:telegram-poller")


# Seconds a chat's turn is held while a call is on the wire, renewed every TURN_RENEW.
TURN_HOLD = 3.0


class LedgerGate:
    """Per-chat turns in the ledger (a named lease per chat), for replicas' flood limiter."""

    def __init__(self, service: ImageService) -> None:
        self._store = service.coordination
        self._owner = service.owner

    async def take(self, chat: str) -> bool:
        # Held while the call is on the wire (the limiter renews it every TURN_RENEW, so a
        # big upload keeps it); `done` then keeps it the spacing from its end. A process
        # killed mid-call leaves the chat blocked until this ends: a few seconds.
        return await self._store.hold_lease(f"tg:chat:{chat}", self._owner, TURN_HOLD)

    async def done(self, chat: str, spacing: float) -> None:
        await self._store.hold_lease(f"tg:chat:{chat}", self._owner, spacing)


def webhook_secret(settings: Settings) -> str:
    """The secret Telegram sends back with every update: TELEGRAM_WEBHOOK_SECRET, or one
    derived from the bot token, so every replica expects the same one without setting it."""
    configured = settings.telegram_webhook_secret.get_secret_value()
    if configured:
        return configured
    token = settings.telegram_bot_token.get_secret_value().encode()
    return hmac.new(token, b"imgbot-telegram-webhook", hashlib.sha256).hexdigest()


async def _start_webhook(app: Application, settings: Settings) -> None:
    try:
        import tornado  # noqa: F401 - PTB's webhook server needs it
    except ImportError:
        raise SettingsError(
            "TELEGRAM_WEBHOOK_URL: webhook mode needs `pip install 'python-telegram-bot[webhooks]'`"
        ) from None
    secret = webhook_secret(settings)
    path = urlsplit(settings.telegram_webhook_url).path.strip("/")
    await app.updater.start_webhook(  # type: ignore[union-attr]
        listen=settings.telegram_webhook_listen,
        port=settings.telegram_webhook_port,
        url_path=path,
        webhook_url=settings.telegram_webhook_url,
        secret_token=secret,
        allowed_updates=ALLOWED_UPDATES,
    )
