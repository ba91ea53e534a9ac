"""Replicas: three real `imgbot run` processes in webhook mode on one real PostgreSQL.

The test plays Telegram: it POSTs updates, with the secret header, to a small round-robin
forwarder on 127.0.0.1 that stands for the operator's reverse proxy, and sends an update
again when it got no 2xx (Telegram's at-least-once delivery). The fake Bot API checks
Telegram's flood rules and records every call. Jobs come from many users, albums whose items
land on different replicas, updates delivered twice (to different replicas), and a button
pressed twice at once; then one replica is killed with SIGKILL mid-load. Afterwards: every
accepted job was drawn once and delivered once, nobody was charged twice, the running totals
equal the jobs, no flood limit was crossed, and the dead replica's jobs were taken over.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from bots.telegram.app import webhook_secret
from core.config import Settings
from tests.fake_api import FakeImageAPI
from tests.fake_botapi import FakeBotApiServer
from tests.pg_server import pg_server, pg_url  # noqa: F401 - fixtures
from tests.replica_kit import RoundRobin, fakes, start_replica  # noqa: F401 - fixture
from tests.telegram_fake import TOKEN, Updates, image_bytes
from tests.test_durable import exact, jobs_of
from tests.test_process import BotProcess

GROUP = Updates.supergroup(-1005550002222, "Studio")


def test_three_replicas_behind_one_webhook_behave_as_one_bot(
    tmp_path: Path, fakes: tuple[FakeBotApiServer, FakeImageAPI], pg_url: str,  # noqa: F811
) -> None:
    tg, images = fakes
    images.inject("slow", times=10**6, seconds=0.3)
    replicas: list[BotProcess] = []
    proxy = RoundRobin([])
    hook = f"{proxy.url}/tg/hook"
    try:
        for n in range(3):
            replicas.append(start_replica(tmp_path, tg, images, pg_url, hook, n))
        proxy.ports = [bot.port for bot in replicas]  # type: ignore[attr-defined]
        tg.wait_for(lambda: len(tg.of("setWebhook")) >= 3, within=30)
        secret = {c.params.get("secret_token") for c in tg.of("setWebhook")}
        assert secret == {webhook_secret(Settings(_env_file=None, telegram_bot_token=TOKEN))}
        headers = {"X-Telegram-Bot-Api-Secret-Token": secret.pop(), "Content-Type":
                   "application/json"}
        u = Updates()

        undelivered: list[int] = []

        def deliver(update: dict[str, Any]) -> None:
            """Telegram: POST until some replica answers 2xx (a time-out is tried again)."""
            for _ in range(60):
                try:
                    answer = httpx.post(
                        hook, content=json.dumps(update), headers=headers, timeout=15
                    )
                except httpx.HTTPError:
                    continue
                if answer.status_code // 100 == 2:
                    return
                time.sleep(0.25)
            undelivered.append(update["update_id"])

        # Replicas must be up (the webhook server binds just after setWebhook).
        warm = u.update(u.message(Updates.user(3999, "Zed"), u.private(Updates.user(3999, "Zed")),
                                  text="/help"))
        deliver(warm)

        users = [Updates.user(3000 + i, f"U{i}", "en") for i in range(30)]
        expected: dict[str, int] = {}  # command → chat
        updates = []
        for i, user in enumerate(users):
            for k in range(2):
                command = f"low a thing {i}-{k}"
                chat = GROUP if (i + k) % 5 == 0 else u.private(user)
                text_ = f"/img@ThisBot {command}" if chat is GROUP else f"/img {command}"
                updates.append(u.update(u.message(user, chat, text=text_)))
                expected[command] = chat["id"]
        # Albums: three items each, one carrying /img; round-robin spreads them over the
        # replicas. Sent together first, as Telegram sends an album's items at once.
        albums = []
        for a in range(3):
            user = users[a]
            for j in range(3):
                tg.store(f"al{a}-{j}", image_bytes(400 + 10 * j, 300))
                caption = f"/img low album {a}" if j == 1 else None
                albums.append(u.update(u.message(
                    user, u.private(user), caption=caption,
                    photo=u.photo_sizes(f"al{a}-{j}", 400 + 10 * j, 300),
                    media_group_id=f"alb-{a}",
                )))
            expected[f"low album {a}"] = user["id"]
        album_threads = [threading.Thread(target=deliver, args=(up,)) for up in albums]
        for thread in album_threads:
            thread.start()
        for thread in album_threads:
            thread.join()
        # Every tenth update arrives twice (Telegram resending after a slow answer).
        doubled = updates[::10]
        threads = [threading.Thread(target=deliver, args=(up,)) for up in updates + doubled]
        for i, thread in enumerate(threads):
            thread.start()
            if i == len(threads) // 2:
                # Mid-load, one replica dies without a word.
                replicas[0].proc.send_signal(signal.SIGKILL)
                replicas[0].proc.wait()
        for thread in threads:
            thread.join()
        assert undelivered == []  # every update was accepted by some replica

        def done() -> bool:
            rows = jobs_of(pg_url)
            return set(expected) <= set(rows) and all(
                rows[c]["stage"] == "delivered" for c in expected
            )

        try:
            tg.wait_for(done, within=120)
        except AssertionError:
            rows = jobs_of(pg_url)
            missing = {c: (rows[c]["stage"], rows[c]["lease_owner"]) if c in rows else None
                       for c in expected if c not in rows or rows[c]["stage"] != "delivered"}
            said = {c: tg.texts(expected[c]) for c in missing}
            said["rows"] = sorted((r["id"], r["command_text"], r["stage"]) for r in rows.values())
            raise AssertionError(f"not delivered: {missing}; said: {said}") from None
        rows = jobs_of(pg_url)
        assert set(rows) == set(expected)  # no job lost, none added (no double from resends)
        for command, chat in expected.items():
            job = rows[command]
            assert job["status"] == "succeeded" and job["actual_credits"] == pytest.approx(
                exact(job)
            ), command
            sent = [c for c in tg.of("sendPhoto", ok=True)
                    if c.chat_id == chat and f"j:{job['id']}:" in json.dumps(c.params)]
            assert len(sent) == 1, (command, len(sent))
        album_jobs = [rows[f"low album {a}"] for a in range(3)]
        assert all(job["reference_count"] == 3 for job in album_jobs)  # items from 3 replicas
        # Each delivered image was drawn once, plus at most one lost draw per taken-over job.
        draws = [r for r in images.api_requests if r.path.startswith("/v1/images/")]
        lost = sum(job["attempts"] - 1 for job in rows.values())
        assert len(expected) <= len(draws) <= len(expected) + lost
        # Three replicas kept one bot's flood limits: the group and overall budgets shared
        # out (1/N each), and turns per chat taken in the ledger.
        assert tg.flood_refusals == []
        assert all(proxy.sent[bot.port] > 0 for bot in replicas)  # type: ignore[attr-defined]
        for bot in replicas[1:]:
            assert bot.stop(signal.SIGTERM, within=30) == 0
    finally:
        for bot in replicas:
            if bot.proc.poll() is None:
                bot.proc.kill()
                bot.proc.wait()
        proxy.close()
