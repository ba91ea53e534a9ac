"""Telegram webhook mode: the real PTB webhook server on 127.0.0.1, the secret token enforced."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from pathlib import Path

import httpx

from bots.telegram.app import run_telegram
from bots.telegram.flood import FloodLimiter, Timebase
from core.config import Settings
from core.runtime import open_service
from tests.fake_api import FakeImageAPI
from tests.telegram_fake import TOKEN, FakeBotApi, Updates

SECRET = "hook-secret-5b0d2c7e"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_webhook_accepts_telegram_and_refuses_strangers(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    port = _free_port()
    config = settings(
        database_url=f"sqlite:///{tmp_path}/imgbot.db",
        telegram_bot_token=TOKEN,
        telegram_webhook_url="https://bot.example.org/tg/hook",
        telegram_webhook_secret=SECRET,
        telegram_webhook_listen="127.0.0.1",
        telegram_webhook_port=port,
        rate_limit_per_minute=0,
    )
    api, u = FakeBotApi(), Updates()
    ann = Updates.user(1001, "Ann", "en")
    update = u.update(u.message(ann, u.private(ann), text="/img low a kite"))
    stop = asyncio.Event()
    async with open_service(config) as service:
        bot = asyncio.create_task(
            run_telegram(
                config, service, stop, request=api, get_updates_request=api,
                rate_limiter=FloodLimiter(timebase=Timebase(scale=1000)),
            )
        )
        await api.wait_for(lambda: api.of("setWebhook") or bot.done())
        [hook] = api.of("setWebhook")
        assert hook.params["url"] == "https://bot.example.org/tg/hook"
        assert hook.params["secret_token"] == SECRET
        url = f"http://127.0.0.1:{port}/tg/hook"
        body = json.dumps(update)
        async with httpx.AsyncClient() as http:
            for _ in range(50):  # the server binds just after setWebhook
                try:
                    wrong = await http.post(
                        url, content=body, headers={
                            "Content-Type": "application/json",
                            "X-Telegram-Bot-Api-Secret-Token": "guess",
                        },
                    )
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.05)
            assert wrong.status_code == 403
            right = await http.post(
                url, content=body, headers={
                    "Content-Type": "application/json",
                    "X-Telegram-Bot-Api-Secret-Token": SECRET,
                },
            )
            assert right.status_code == 200
        await api.wait_for(lambda: api.of("sendPhoto"))
        stop.set()
        await asyncio.wait_for(bot, 10)
        assert bot.exception() is None
        job = await service.ledger.get_job(1)
        assert job is not None and job.status == "succeeded"
        assert await service.ledger.get_job(2) is None  # the stranger's post drew nothing
