"""Operator alerts: each kind, caused for real (the fake image API's faults, a database
turned read-only, real spend against GLOBAL_DAILY_LIMIT), reaches the admins' chats once per
period through the real PTB Application and discord.py tree (fakes only at the network
seams), and is logged every time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bots.telegram.app import ADAPTER_KEY
from core.config import Settings
from tests import discord_payloads as p
from tests.discord_fake import FakeCdn
from tests.fake_api import FakeImageAPI
from tests.pg_server import PgServer
from tests.telegram_fake import FakeBotApi, Updates
from tests.test_discord import make_settings as discord_settings
from tests.test_discord import running_bot
from tests.test_telegram import (  # noqa: F401 - fixtures
    ADMIN_ID,
    ANN,
    Harness,
    database_url,
    make_settings,
    running,
)

ALERT_CHAT = -100777


def alerts_to(api: FakeBotApi, chat_id: int) -> list[str]:
    """Return the alert texts the bot sent to a chat."""
    return [
        str(c.params["text"]) for c in api.of("sendMessage")
        if c.params["chat_id"] == chat_id and str(c.params["text"]).startswith("⚠️ imgbot:")
    ]


async def draw(h: Harness, prompt: str = "low a cat") -> None:
    u = h.updates
    await h.send(u.update(u.message(ANN, u.private(ANN), text=f"/img {prompt}")))


async def settled(h: Harness) -> None:
    """Let the alerts raised in the background go out."""
    for _ in range(3):
        await asyncio.gather(*h.service._alerting)
        await asyncio.sleep(0.01)


async def test_upstream_alerts_reach_the_alert_chat_once_per_period(
    make_settings: Callable[..., Settings],  # noqa: F811
    fake_api: FakeImageAPI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_settings(
        alert_chats=f"telegram:{ALERT_CHAT}", alert_failure_run=3, previews="off"
    )
    api = FakeBotApi()
    async with running(config, api, fake_api, Updates()) as h:
        h.app.bot_data[ADAPTER_KEY].start_durable()  # as `imgbot run` does
        # The key is revoked: three jobs fail with 401.
        fake_api.inject("unauthorized", times=3)
        with caplog.at_level(logging.ERROR, logger="core.service"):
            for _ in range(3):
                await draw(h)
            await settled(h)
        sent = alerts_to(api, ALERT_CHAT)
        key_alerts = [t for t in sent if "refused our key (HTTP 401)" in t]
        assert len(key_alerts) == 1 and "OPENAI_API_KEY" in key_alerts[0]
        # Three in a row: the run alert, once.
        runs = [t for t in sent if "image calls in a row failed" in t]
        assert len(runs) == 1 and runs[0].startswith("⚠️ imgbot: 3 image calls in a row")
        # The log has every one of them; the admin's own chat nothing (ALERT_CHATS is set).
        assert caplog.text.count("ALERT upstream_auth") == 3
        assert not alerts_to(api, ADMIN_ID)

        # Out of balance (402): its own alert, once, saying what to do.
        fake_api.inject("insufficient_balance", times=2)
        await draw(h)
        await draw(h)
        await settled(h)
        balance = [t for t in alerts_to(api, ALERT_CHAT) if "out of balance" in t]
        assert len(balance) == 1 and "top" in balance[0]

        # A success ends the run; the period over, a revoked key is told again.
        await draw(h)
        h.service.alert_every = 0.05
        await asyncio.sleep(0.1)
        fake_api.inject("forbidden")
        await draw(h)
        await settled(h)
        key_alerts = [t for t in alerts_to(api, ALERT_CHAT) if "refused our key" in t]
        assert len(key_alerts) == 2 and "HTTP 403" in key_alerts[1]
        # The moderation refusing a prompt is not the upstream failing.
        h.service.alert_every = 600
        before = len(alerts_to(api, ALERT_CHAT))
        fake_api.inject("moderation_blocked", times=4)
        for _ in range(4):
            await draw(h)
        await settled(h)
        assert len(alerts_to(api, ALERT_CHAT)) == before


async def test_the_global_daily_limit_alerts_at_80_and_100_percent_once_a_day(
    make_settings: Callable[..., Settings], fake_api: FakeImageAPI  # noqa: F811
) -> None:
    api = FakeBotApi()
    probe = make_settings(previews="off")
    async with running(probe, FakeBotApi(), fake_api, Updates()) as h:
        _, estimate = h.service.parse("low a cat")
    # 85 % of the budget on the first reservation; admins' DMs (no ALERT_CHATS).
    config = make_settings(previews="off", global_daily_limit=estimate / 0.85)
    async with running(config, api, fake_api, Updates()) as h:
        h.app.bot_data[ADAPTER_KEY].start_durable()
        await draw(h)
        await settled(h)
        (alert,) = alerts_to(api, ADMIN_ID)
        assert "reached 85% of GLOBAL_DAILY_LIMIT" in alert
        await draw(h)  # still above 80 %: not told again today
        await settled(h)
        assert len(alerts_to(api, ADMIN_ID)) == 1
    # A budget the next reservation fills exactly: 100 %, once, however many are refused.
    spent = await _global_spent(config)
    config = make_settings(previews="off", global_daily_limit=spent + estimate)
    async with running(config, api, fake_api, Updates()) as h:
        h.app.bot_data[ADAPTER_KEY].start_durable()
        mark = len(alerts_to(api, ADMIN_ID))
        for _ in range(3):
            await draw(h)
        await settled(h)
        new = alerts_to(api, ADMIN_ID)[mark:]
        assert len(new) == 1 and "reached 100% of GLOBAL_DAILY_LIMIT" in new[0]


async def _global_spent(config: Settings) -> float:
    from core.store import Limits, open_store

    async with await open_store(config.database_url, Limits()) as store:
        return await store.global_spent_today()


async def test_a_ledger_that_stops_taking_writes_alerts_once(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, pg_server: PgServer
) -> None:
    url = pg_server.create_database()
    config = settings(
        database_url=url, telegram_bot_token="123456789:AAFakeTokenForTests_DoNotLeak_0123456789",
        admins=f"telegram:{ADMIN_ID}", alert_chats=f"telegram:{ALERT_CHAT}",
        rate_limit_per_minute=0, previews="off", progress_interval=0.05,
    )
    api = FakeBotApi()
    async with running(config, api, fake_api, Updates()) as h:
        h.app.bot_data[ADAPTER_KEY].start_durable()
        await draw(h)  # the pool has its connections open and working
        await _read_only(url, True)  # a failover to a read-only replica, say
        try:
            for _ in range(3):
                await draw(h)
            await settled(h)
        finally:
            await _read_only(url, False)
        (alert,) = [t for t in alerts_to(api, ALERT_CHAT) if "cannot be written" in t]
        assert "PostgreSQL" in alert and "pg-test-pw" not in alert  # no password
        assert not h.service.store_healthy


async def _read_only(url: str, on: bool) -> None:
    """Make the database read-only for new sessions (or writable again); end the open ones."""
    conn = await asyncpg.connect(url)
    try:
        name = await conn.fetchval("SELECT current_database()")
        await conn.execute("SET default_transaction_read_only = off")
        value = "on" if on else "off"
        await conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {value}')
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
    finally:
        await conn.close()


@pytest.mark.parametrize("alert_chats", ["discord:4242", ""])
async def test_discord_alerts_go_to_the_alert_channel_or_the_admins_dms(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path, alert_chats: str
) -> None:
    config = discord_settings(
        settings, tmp_path, admins="discord:900", alert_chats=alert_chats, previews="off",
        rate_limit_per_minute=0,
    )
    async with running_bot(config, FakeCdn()) as h:
        h.bot.start_durable()
        fake_api.inject("unauthorized", times=2)
        for _ in range(2):
            await h.feed(p.slash("img", [p.option("prompt", "low a hill")]))
        await asyncio.gather(*h.service._alerting)
        posts = [
            c for c in h.rest.calls
            if c.method == "POST" and c.path == "/channels/{channel_id}/messages"
            and "refused our key" in str((c.json or {}).get("content"))
        ]
        assert len(posts) == 1
        dms = [c for c in h.rest.calls if c.path == "/users/@me/channels"]
        if alert_chats:
            assert posts[0].url.endswith("/channels/4242/messages") and not dms
        else:
            assert [str(c.json["recipient_id"]) for c in dms] == ["900"]


async def test_replicas_on_one_ledger_send_each_alert_once(
    make_service: Callable[..., Any],
) -> None:
    # Three processes see the same trouble (the upstream key revoked): the admins get one
    # message for the period, not one per process; each process still logs it.
    async with make_service() as a, make_service() as b, make_service() as c:
        sent: list[str] = []

        async def send(message: str) -> None:
            sent.append(message)

        for service in (a, b, c):
            service.alert_senders.append(send)
        await asyncio.gather(*(s.alert("upstream_auth", "key revoked") for s in (a, b, c)))
        assert sent == ["key revoked"]
        # Another kind is its own.
        await b.alert("undelivered", "job 7 undelivered")
        assert sent == ["key revoked", "job 7 undelivered"]
