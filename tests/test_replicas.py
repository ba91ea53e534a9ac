"""Replicas: three real `imgbot run` processes in webhook mode on one real PostgreSQL.

The test plays Telegram: it POSTs updates, with the secret header, to a small round-robin
forwarder on 127.0.0.1 that stands for the operator's reverse proxy, and sends an update
again when it got no 2xx (Telegram's at-least-once delivery). The fake Bot API checks
Telegram's flood rules and records every call. Over 200 jobs from 40 users: albums whose
items land on different replicas, updates delivered twice, users asking past their daily
limit, one replica killed with SIGKILL mid-load; then "again" pressed twice at once and
more jobs while every replica in turn is stopped and started again (a rolling restart).
Afterwards: every accepted job was drawn once (plus the lost draws the kill cut off) and
delivered once, nobody was charged twice or past their limit, the caps on jobs drawing at
once held across replicas, the running totals equal the jobs, and no flood limit was crossed.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from bots.telegram.app import webhook_secret
from bots.telegram.reply import BUTTONS
from bots.telegram.texts import text
from core.config import Settings
from core.pricing import PriceTable, estimate_credits
from core.prompt import PromptDefaults, parse_command
from tests.fake_api import FakeImageAPI
from tests.fake_botapi import FakeBotApiServer
from tests.pg_server import pg_server, pg_url  # noqa: F401 - fixtures
from tests.replica_kit import RoundRobin, fakes, start_replica  # noqa: F401 - fixture
from tests.telegram_fake import TOKEN, Updates, image_bytes
from tests.test_durable import exact, job_rows
from tests.test_process import BotProcess

GROUP = Updates.supergroup(-1005550002222, "Studio")


# --- the full run: 200+ jobs from 40 users, a kill, presses, a rolling restart -------------
USERS = 40
HEAVY = range(0, 5)  # ask 8 jobs each, where their daily limit lets 6 through (others 5)
ALBUM = range(37, 40)  # 3 jobs and an album each
PRESSERS = range(5, 15)  # press "again" twice at once on a result (two replicas)
SECOND_WAVE = range(15, 25)  # one more job each during the rolling restart
IN_FLIGHT = 6  # MAX_JOBS_IN_FLIGHT: a cap over all replicas, like the per-user one (1)


def _estimate(command: str) -> float:
    """What the bot reserves for a plain command (the defaults' price table)."""
    settings = Settings(_env_file=None)
    request = parse_command(command, PromptDefaults.from_settings(settings))
    return estimate_credits(request, PriceTable.from_settings(settings))


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    """Return how many of the (start, end) spans were open at one moment, at most."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, step in events:  # an end sorts before a start at the same instant
        running += step
        most = max(most, running)
    return most


def _who_drew(request: Any) -> str:
    """Return the user number a drawing request was for (from its prompt)."""
    prompt = (request.json or {}).get("prompt") or request.fields.get("prompt", "")
    return prompt.split()[2].split("-")[0] if "thing" in prompt else prompt.split()[-1]


def _again_button(call: Any) -> str:
    """Return the callback data of the "again" button under a sent result."""
    markup = call.params.get("reply_markup")
    markup = json.loads(markup) if isinstance(markup, str) else markup
    for row in markup["inline_keyboard"]:
        for button in row:
            pressed = BUTTONS.decode(button["callback_data"])
            if pressed is not None and pressed[1] == "again":
                return str(button["callback_data"])
    raise AssertionError(f"no again button in {markup}")


def test_200_jobs_40_users_a_kill_and_a_rolling_restart(
    tmp_path: Path, fakes: tuple[FakeBotApiServer, FakeImageAPI], pg_url: str,  # noqa: F811
) -> None:
    tg, images = fakes
    images.inject("slow", times=10**6, seconds=0.3)
    limit = 6.5 * _estimate("low a thing 10-10")
    settings = {
        "MAX_JOBS_IN_FLIGHT": str(IN_FLIGHT), "MAX_JOBS_PER_USER": "1",
        "USER_DAILY_LIMIT": f"{limit:.2f}",
        # Long enough that a live replica on this loaded 2-core machine keeps its leases
        # (one that lapses anyway lets go of its jobs: see ImageService.still_mine).
        "JOB_LEASE": "4",
    }
    replicas: list[BotProcess] = []
    proxy = RoundRobin([])
    hook = f"{proxy.url}/tg/hook"
    started = itertools.count()

    def start() -> BotProcess:
        bot = start_replica(tmp_path, tg, images, pg_url, hook, next(started), **settings)
        tg.wait_for(lambda: _listening(bot), within=30)
        return bot

    def route() -> None:
        proxy.ports = [bot.port for bot in replicas if bot.proc.poll() is None]  # type: ignore[attr-defined]

    try:
        replicas.extend(start() for _ in range(3))
        route()
        # Every replica set the webhook with the secret derived from the token, and an
        # update without it is refused (nobody but Telegram can post jobs).
        secrets_set = {c.params.get("secret_token") for c in tg.of("setWebhook")}
        assert secrets_set == {webhook_secret(Settings(_env_file=None, telegram_bot_token=TOKEN))}
        secret = secrets_set.pop()
        eve = Updates.user(4999, "Eve")
        forged = Updates().update(
            Updates().message(eve, Updates.private(eve), text="/img low a forged job")
        )
        assert httpx.post(hook, json=forged, timeout=15).status_code == 403
        telegram = Telegram(hook, secret)
        u = Updates()
        users = [Updates.user(4000 + i, f"V{i}", "en") for i in range(USERS)]
        asked: dict[int, list[str]] = {i: [] for i in range(USERS)}  # user → commands
        chats: dict[str, int] = {}  # command → chat

        def ask(i: int, command: str, *, in_group: bool = False) -> dict[str, Any]:
            chat = GROUP if in_group else u.private(users[i])
            asked[i].append(command)
            chats[command] = chat["id"]
            words = f"/img@ThisBot {command}" if in_group else f"/img {command}"
            return u.update(u.message(users[i], chat, text=words))

        albums = []
        for i in ALBUM:
            for j in range(3):
                tg.store(f"v{i}-{j}", image_bytes(400 + 10 * j, 300))
                command = f"low album {i}"
                albums.append(u.update(u.message(
                    users[i], u.private(users[i]), caption=f"/img {command}" if j == 1 else None,
                    photo=u.photo_sizes(f"v{i}-{j}", 400 + 10 * j, 300), media_group_id=f"v-{i}",
                )))
            asked[i].append(command)
            chats[command] = users[i]["id"]
        updates = []
        for i in range(USERS):
            count = 8 if i in HEAVY else 3 if i in ALBUM else 5
            for k in range(count):
                updates.append(ask(i, f"low a thing {i}-{k}", in_group=k == 0 and i in range(5, 11)))
        # Every tenth update arrives twice (Telegram resending after a slow answer); one
        # replica dies without a word halfway through.
        telegram.send_all(albums)
        telegram.send_all(updates + updates[::10], halfway=lambda: _kill(replicas[0]))
        assert len(updates) >= 200

        # Each heavy user's limit let 6 of 8 through; everyone else got all they asked.
        accepted = 6 * len(HEAVY) + sum(len(asked[i]) for i in range(USERS) if i not in HEAVY)
        rows = _wait_delivered(tg, pg_url, accepted)

        # The dead replica comes back; then ten users press "again" twice at once (the
        # presses land on different replicas), ten more ask once more, and meanwhile each
        # replica in turn is stopped (SIGTERM) and started again: a rolling restart.
        stopped = [replicas[0]]
        replicas[0] = start()
        route()
        presses = []
        for i in PRESSERS:
            (job,) = [r for r in rows if r["command_text"] == f"low a thing {i}-1"]  # private
            sent = next(c for c in tg.of("sendPhoto", ok=True)
                        if f"j:{job['id']}:" in json.dumps(c.params))
            data = _again_button(sent)
            presses += [u.callback(users[i], sent.result, data) for _ in range(2)]
        second = [ask(i, f"low a thing {i}-again") for i in SECOND_WAVE]
        sender = threading.Thread(target=telegram.send_all, args=(presses + second,))
        sender.start()
        for n in (1, 2):
            assert replicas[n].stop(signal.SIGTERM, within=60) == 0
            stopped.append(replicas[n])
            route()
            replicas[n] = start()
            route()
        sender.join()
        assert telegram.undelivered == []  # every update was taken by some replica
        rows = _wait_delivered(tg, pg_url, accepted + len(PRESSERS) + len(SECOND_WAVE))

        # Every job was delivered once, to its chat, charged exactly its recorded usage. A
        # drawn job whose upload the kill cut off may have reached Telegram before the kill:
        # the replica that takes it over cannot know, and sends it again (at most twice).
        retaken = {int(n) for bot in replicas + stopped for n in
                   re.findall(r"job (\d+) taken over \(drawn", bot.output())}
        for job in rows:
            assert job["status"] == "succeeded" and job["actual_credits"] == pytest.approx(
                exact(job)
            ), job["id"]
            sent = [c for c in tg.of("sendPhoto", ok=True)
                    if f"j:{job['id']}:" in json.dumps(c.params)]
            assert len(sent) == 1 or (job["id"] in retaken and len(sent) == 2), (
                job["id"], job["command_text"], len(sent))
        by_user = Counter(int(r["user_key"].split(":")[1]) - 4000 for r in rows)
        for i in range(USERS):
            wanted = 6 if i in HEAVY else len(asked[i]) + (i in PRESSERS)
            assert by_user[i] == wanted, (i, by_user[i], wanted)
        # No limit crossed: each user's charges stay within the daily limit; the heavy
        # users were told twice why.
        spent = Counter()
        for job in rows:
            spent[job["user_key"]] += job["actual_credits"]
        assert max(spent.values()) <= limit
        for i in HEAVY:
            refusals = [t for t in tg.texts(users[i]["id"]) if "daily limit" in t]
            mine = sorted((r["id"], r["command_text"]) for r in rows
                          if r["user_key"] == f"telegram:{users[i]['id']}")
            # Told at least once per refused ask (a refusal whose update was being handled
            # by the killed replica is told again by the one that takes the update over).
            assert len(refusals) >= 2, (tg.texts(users[i]["id"]), mine)
        # A press pressed twice drew once: one replay each (counted above), and the second
        # press was answered as a repeat (a press a stopping replica had not finished is
        # handled again by another, and answered as a repeat too: never drawn twice).
        repeats = [c for c in tg.of("answerCallbackQuery", ok=True)
                   if c.params.get("text") == text("en", "tg.press_repeated")]
        answers = [c.params for c in tg.of("answerCallbackQuery")]
        assert len(repeats) >= len(PRESSERS), answers
        # Albums whose items landed on three replicas became one job with three references.
        for i in ALBUM:
            (album,) = [r for r in rows if r["command_text"] == f"low album {i}"]
            assert album["reference_count"] == 3
        # The caps held across replicas: never more than IN_FLIGHT drawing at once in all,
        # never two of one user's.
        draws = [r for r in images.api_requests if r.path.startswith("/v1/images/")]
        spans = [(r.received, r.answered or time.monotonic()) for r in draws]
        assert _most_at_once(spans) <= IN_FLIGHT
        for who in {_who_drew(r) for r in draws}:
            mine = [(r.received, r.answered or time.monotonic()) for r in draws
                    if _who_drew(r) == who]
            assert _most_at_once(mine) <= 1, who
        # Each delivered image was drawn once, plus at most one lost draw per taken-over job.
        lost = sum(job["attempts"] - 1 for job in rows)
        assert len(rows) <= len(draws) <= len(rows) + lost
        # One bot's flood limits, over three replicas.
        def story(refused: Any) -> str:
            ok = tg.of(*{c.method for c in tg.calls}, ok=True)
            near = [(c.method, round(refused.at - c.at, 3)) for c in ok
                    if c.chat_id == refused.chat_id and 0 <= refused.at - c.at < 1.5]
            busy = sum(c.cost for c in ok if c.cost and 0 <= refused.at - c.at < 1.0)
            return f"{refused.method} to {refused.chat_id}: same chat before {near}; {busy} in 1 s"

        # Each process counts its sends by its own clock, and the fake stamps a call when one
        # of its threads gets to it: on a loaded machine (this test's 200 threads share the
        # fake's process) calls sent spaced can be stamped bunched up. So a refusal or two
        # in the thousand-odd messages is the fake's clock, not a replica over its share; a
        # replica ignoring its share would be refused by the dozen. Each refused call was
        # sent again after Telegram's retry_after: every job was delivered (above).
        messages = [c for c in tg.calls if c.cost]
        assert len(tg.flood_refusals) <= max(2, len(messages) // 200), [
            story(c) for c in tg.flood_refusals]
        for bot in replicas:
            assert bot.stop(signal.SIGTERM, within=60) == 0
    finally:
        for bot in replicas:
            if bot.proc.poll() is None:
                bot.proc.kill()
                bot.proc.wait()
        proxy.close()


def _listening(bot: BotProcess) -> bool:
    """Say whether a replica's webhook server takes connections (or the process died)."""
    assert bot.proc.poll() is None, bot.output()
    try:
        with socket.create_connection(("127.0.0.1", bot.port), timeout=1):  # type: ignore[attr-defined]
            return True
    except OSError:
        return False


def _kill(bot: BotProcess) -> None:
    bot.proc.send_signal(signal.SIGKILL)
    bot.proc.wait()


def _wait_delivered(tg: FakeBotApiServer, url: str, count: int) -> list[dict[str, Any]]:
    """Wait until `count` jobs are in the ledger and all of them delivered; return them."""

    def done() -> bool:
        rows = job_rows(url)
        return len(rows) >= count and all(r["stage"] == "delivered" for r in rows)

    try:
        tg.wait_for(done, within=180)
    except AssertionError:
        rows = job_rows(url)
        stuck = [(r["id"], r["command_text"], r["stage"], r["lease_owner"]) for r in rows
                 if r["stage"] != "delivered"]
        raise AssertionError(f"{len(rows)} of {count} jobs; not delivered: {stuck}") from None
    rows = job_rows(url)
    assert len(rows) == count, len(rows)  # none added (no double from resends or presses)
    return rows


class Telegram:
    """Telegram's side of a webhook: POST each update until some replica answers 2xx."""

    def __init__(self, hook: str, secret: str) -> None:
        self.hook = hook
        self.headers = {"X-Telegram-Bot-Api-Secret-Token": secret,
                        "Content-Type": "application/json"}
        self.undelivered: list[int] = []

    def send(self, update: dict[str, Any]) -> None:
        for _ in range(120):
            try:
                answer = httpx.post(self.hook, content=json.dumps(update),
                                    headers=self.headers, timeout=15)
            except httpx.HTTPError:
                time.sleep(0.25)
                continue
            if answer.status_code // 100 == 2:
                return
            time.sleep(0.25)
        self.undelivered.append(update["update_id"])

    def send_all(self, updates: list[dict[str, Any]], halfway: Any = None) -> None:
        """Send updates at once (a thread each); call `halfway` when half are on their way."""
        threads = [threading.Thread(target=self.send, args=(up,)) for up in updates]
        for n, thread in enumerate(threads):
            thread.start()
            if halfway is not None and n == len(threads) // 2:
                halfway()
        for thread in threads:
            thread.join()
