"""Durable jobs as operators meet them: real `imgbot run` processes killed at each moment.

Each test starts `python -m bots.cli run` (tests.test_process's starter: the fake Bot API
and the fake image API on 127.0.0.1, a ledger on a SQLite file or a real PostgreSQL, there
each process with a DATA_DIR of its own, as on two machines), puts
jobs in a given state, kills the process with SIGKILL, starts another 0.5 s later, and
checks from the ledger and the fakes that every accepted job was delivered exactly once to
its chat, each user was told, each charged once (what the upstream reported for the draw
that was delivered), a lost draw is recorded beside the charge, and the running totals
equal the sum of the jobs.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from core.config import Settings
from core.messages import text
from core.pricing import PriceTable, Usage
from core.store import Limits, open_store
from tests.fake_api import FakeImageAPI
from tests.fake_botapi import FakeBotApiServer
from tests.pg_server import pg_server, pg_url  # noqa: F401 - fixtures
from tests.telegram_fake import Updates
from tests.test_process import ANN, BOB, CAT, ROOT, assert_no_secrets, servers, start  # noqa: F401

# Short leases so a takeover comes within a second or two of the restart.
FAST = {
    "MAX_JOBS_IN_FLIGHT": "1", "JOB_LEASE": "1", "DELIVERY_RETRY_DELAY": "0.2", "PREVIEWS": "off"
}


def ledger_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """Return the DATABASE_URL of a fresh ledger on the backend."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/data/imgbot.db"
    return str(request.getfixturevalue("pg_url"))


def job_rows(url: str) -> list[dict[str, Any]]:
    """Return every job row, and check the running totals equal the jobs' charges."""

    async def read() -> tuple[list[dict[str, Any]], dict[str, float]]:
        store = await open_store(url, Limits())
        try:
            async with store.snapshot() as reader:
                rows = await reader.rows("jobs", limit=1000)
                totals = await reader.user_totals()
            return rows, totals
        finally:
            await store.close()

    rows, totals = asyncio.run(read())
    by_user: dict[str, float] = {}
    for row in rows:
        by_user[row["user_key"]] = by_user.get(row["user_key"], 0.0) + charged(row)
    assert totals == pytest.approx(by_user)
    return rows


def jobs_of(url: str) -> dict[str, dict[str, Any]]:
    """Return every job row by command text (see job_rows)."""
    return {row["command_text"]: row for row in job_rows(url)}


def charged(row: dict[str, Any]) -> float:
    """What a job counts against limits (the one definition: core.store.records)."""
    if row["status"] in ("reserved", "unsettled"):
        return float(row["estimated_credits"])
    if row["status"] == "refunded":
        return 0.0
    return float(row["actual_credits"] or 0.0)


def exact(row: dict[str, Any]) -> float:
    """Return what a job's recorded usage costs by the price table."""
    usage = Usage(**json.loads(row["usage_json"]))
    return PriceTable.from_settings(Settings(_env_file=None)).credits(usage, row["model"])


def photos_to(tg: FakeBotApiServer, who: dict[str, Any]) -> list[Any]:
    return [c for c in tg.of("sendPhoto", ok=True) if c.chat_id == who["id"]]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.parametrize("moment", ["drawing_and_queued", "uploading"])
def test_kill_9_at_any_moment_then_restart_delivers_every_job_once(
    tmp_path: Path,
    servers: tuple[FakeBotApiServer, FakeImageAPI],  # noqa: F811
    start: Any,  # noqa: F811
    backend: str,
    moment: str,
    request: pytest.FixtureRequest,
) -> None:
    tg, images = servers
    url = ledger_url(backend, tmp_path, request)
    u = Updates()
    # On PostgreSQL, as replicas on two machines: each process a DATA_DIR of its own, no
    # folder shared (drawn results are kept in the ledger). SQLite is one machine's file.
    machines = [tmp_path / "machine-1", tmp_path / "machine-2"]
    own = [{"DATA_DIR": str(folder)} if backend == "postgresql" else {} for folder in machines]
    first = start(DATABASE_URL=url, **FAST, **own[0])
    commands = {"low a lamp": ANN, "low a bell": BOB, "low a cat": CAT}
    if moment == "drawing_and_queued":
        # Ann's job hangs upstream (drawing); Bob's and Cat's wait behind it (queued).
        images.inject("hang", seconds=60)
    else:
        # Ann's image is drawn and settled; its upload hangs in Telegram when the kill comes.
        tg.inject("sendPhoto", status=0, delay=60)
    tg.push(u.update(u.message(ANN, u.private(ANN), text="/img low a lamp")))
    tg.wait_for(lambda: images.api_requests)
    if moment == "uploading":
        tg.wait_for(lambda: tg.of("sendPhoto"))
    for command, who in list(commands.items())[1:]:
        tg.push(u.update(u.message(who, u.private(who), text=f"/img {command}")))
    tg.wait_for(lambda: sorted(jobs_of(url)) == sorted(commands))
    tg.wait_for(lambda: all(tg.texts(who["id"]) for who in (BOB, CAT)))

    assert first.stop(signal.SIGKILL, within=10) == -signal.SIGKILL
    before = jobs_of(url)  # as the dead process left it
    time.sleep(0.5)
    second = start(DATABASE_URL=url, **FAST, **own[1])
    for who in commands.values():
        tg.wait_for(lambda who=who: photos_to(tg, who), within=30)
    tg.wait_for(lambda: all(r["stage"] == "delivered" for r in jobs_of(url).values()))
    after = jobs_of(url)
    assert second.stop(signal.SIGTERM, within=20) == 0

    assert sorted(after) == sorted(commands)  # nothing lost, nothing added
    for command, who in commands.items():
        job = after[command]
        assert (job["status"], job["stage"]) == ("succeeded", "delivered")
        # Charged once: exactly the usage of the draw that was delivered.
        assert job["actual_credits"] == pytest.approx(exact(job))
        assert len(photos_to(tg, who)) == 1
        # Told that the job goes on after the restart.
        assert text("en", "job.resumed", job_id=job["id"]) in tg.texts(who["id"])
    lamp = after["low a lamp"]
    if moment == "drawing_and_queued":
        assert before["low a lamp"]["stage"] == "drawing"
        assert {before[c]["stage"] for c in ("low a bell", "low a cat")} == {"queued"}
        # Ann's first draw died with the process: drawn again once, the lost one recorded
        # (it may have been billed upstream) and never charged to her.
        assert (lamp["attempts"], lamp["lost_credits"]) == (2, lamp["estimated_credits"])
    else:
        assert before["low a lamp"]["stage"] == "drawn"
        # Delivered from the kept copy: not drawn again, nothing lost.
        assert (lamp["attempts"], lamp["lost_credits"]) == (1, 0)
    if backend == "postgresql":  # the copy was in the ledger: no process kept a file
        assert not any((folder / "results").exists() for folder in machines)
    for command in ("low a bell", "low a cat"):
        job = after[command]
        if before[command]["stage"] in ("queued", "drawn"):  # nothing lost
            assert (job["attempts"], job["lost_credits"]) == (1, 0)
        else:  # it had started drawing when the kill came: drawn again once
            assert before[command]["stage"] == "drawing"
            assert (job["attempts"], job["lost_credits"]) == (2, job["estimated_credits"])
    # One upstream call per delivered image, plus at most one per lost draw (a draw is
    # "started" just before its call is sent): no job ran twice otherwise.
    lost = sum(job["attempts"] - 1 for job in after.values())
    assert 3 <= len(images.api_requests) <= 3 + lost
    assert_no_secrets(first.output(), second.output())


def test_a_read_only_ledger_at_settle_keeps_the_image_until_it_can_charge_it_once(
    tmp_path: Path,
    servers: tuple[FakeBotApiServer, FakeImageAPI],  # noqa: F811
    start: Any,  # noqa: F811
    pg_url: str,  # noqa: F811
) -> None:
    """The database turns read-only (a failover to a replica, a full disk) while a job is
    drawing: the answer is kept, health turns unhealthy, nothing is handed out uncharged;
    once the database takes writes the job is charged once and delivered once."""
    tg, images = servers
    bot = start(DATABASE_URL=pg_url, **FAST)
    u = Updates()
    images.inject("slow", seconds=1.5)
    tg.push(u.update(u.message(ANN, u.private(ANN), text="/img low a lamp")))
    tg.wait_for(lambda: images.api_requests)
    _read_only(pg_url, True)
    try:
        tg.wait_for(lambda: "could not be written" in bot.output(), within=30)
        tg.wait_for(lambda: "unhealthy" in _health(tmp_path, pg_url), within=10)
        assert "ledger cannot be written" in _health(tmp_path, pg_url)
        assert tg.of("sendPhoto") == []  # nothing handed out before it is charged
        time.sleep(1.0)
    finally:
        _read_only(pg_url, False)
    [photo] = tg.wait_for(lambda: tg.of("sendPhoto", ok=True), within=60)
    assert photo.chat_id == ANN["id"]
    tg.wait_for(lambda: jobs_of(pg_url)["low a lamp"]["stage"] == "delivered")
    job = jobs_of(pg_url)["low a lamp"]
    assert job["status"] == "succeeded" and job["actual_credits"] == pytest.approx(exact(job))
    assert len(images.api_requests) == 1 and len(tg.of("sendPhoto")) == 1
    tg.wait_for(lambda: "healthy" in _health(tmp_path, pg_url) and "unhealthy" not in _health(
        tmp_path, pg_url), within=40)
    assert bot.stop(signal.SIGTERM, within=20) == 0
    assert_no_secrets(bot.output())


def _read_only(url: str, on: bool) -> None:
    """Make the database read-only for every new session (or writable again), and end the
    sessions open now so the bot's next connections get it."""
    import asyncpg

    async def switch() -> None:
        conn = await asyncpg.connect(url)
        try:
            name = await conn.fetchval("SELECT current_database()")
            await conn.execute("SET default_transaction_read_only = off")
            value = "on" if on else "off"
            await conn.execute(
                f'ALTER DATABASE "{name}" SET default_transaction_read_only = {value}'
            )
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
        finally:
            await conn.close()

    asyncio.run(switch())


def _health(tmp_path: Path, url: str) -> str:
    """Run `imgbot health` beside the bot (same folder, same ledger); return what it said."""
    result = subprocess.run(
        [sys.executable, "-m", "bots.cli", "health"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.stdout + result.stderr


def test_terminal_commands_beside_a_live_bot_change_none_of_its_jobs(
    tmp_path: Path,
    servers: tuple[FakeBotApiServer, FakeImageAPI],  # noqa: F811
    start: Any,  # noqa: F811
) -> None:
    tg, images = servers
    url = f"sqlite:///{tmp_path}/data/imgbot.db"
    bot = start(**FAST)
    u = Updates()
    images.inject("slow", seconds=10)  # a long job: drawing while the commands run
    tg.push(u.update(u.message(ANN, u.private(ANN), text="/img low a lamp")))
    tg.push(u.update(u.message(BOB, u.private(BOB), text="/img low a bell")))
    tg.wait_for(lambda: images.api_requests and len(jobs_of(url)) == 2)
    time.sleep(1.5)  # past one lease: only renewals keep these jobs the bot's
    before = jobs_of(url)
    assert {r["stage"] for r in before.values()} == {"drawing", "queued"}
    env = {"DATABASE_URL": url, "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": images.base_url}
    for command in (["admin", "top"], ["admin", "unsettled"], ["usage"], ["doctor"],
                    ["usage", "--flagged"], ["backup", str(tmp_path / "bk")]):
        out = _cli(tmp_path, env, *command)
        assert "Traceback" not in out, (command, out)
    after = jobs_of(url)
    for command, row in before.items():
        now = after[command]
        # Same owner, nothing lost, nothing failed: no command resolved, released or took
        # a job (the bot itself may have moved it on meanwhile).
        assert now["lease_owner"] == row["lease_owner"] is not None
        assert now["lost_credits"] == 0 and now["error_code"] is None
        assert now["status"] in ("reserved", "succeeded")
    for who in (ANN, BOB):
        tg.wait_for(lambda who=who: photos_to(tg, who), within=30)
    tg.wait_for(lambda: all(r["stage"] == "delivered" for r in jobs_of(url).values()))
    draws = [r for r in images.api_requests if r.path.startswith("/v1/images/")]
    assert len(draws) == 2  # each drawn once (doctor only asked for the model list)
    assert bot.stop(signal.SIGTERM, within=20) == 0


def test_a_telegram_upload_failing_5xx_is_tried_again_and_one_failing_for_good_is_undelivered(
    tmp_path: Path,
    servers: tuple[FakeBotApiServer, FakeImageAPI],  # noqa: F811
    start: Any,  # noqa: F811
) -> None:
    tg, images = servers
    url = f"sqlite:///{tmp_path}/data/imgbot.db"
    admin = 7001
    bot = start(**FAST, ADMINS=f"telegram:{admin}")
    u = Updates()
    tg.inject("sendPhoto", status=502, times=3)
    tg.push(u.update(u.message(ANN, u.private(ANN), text="/img low a lamp")))
    [photo] = tg.wait_for(lambda: photos_to(tg, ANN), within=30)
    assert len(tg.of("sendPhoto")) == 4  # three 502s, then the one that went through
    tg.wait_for(lambda: jobs_of(url)["low a lamp"]["stage"] == "delivered")
    lamp = jobs_of(url)["low a lamp"]
    assert json.loads(lamp["result_refs"]) == [photo.result["photo"][-1]["file_id"]]

    tg.inject("sendPhoto", status=502, times=-1)
    tg.inject("sendDocument", status=502, times=-1)
    tg.push(u.update(u.message(BOB, u.private(BOB), text="/img low a bell")))
    tg.wait_for(
        lambda: jobs_of(url).get("low a bell", {}).get("stage") == "undelivered", within=30
    )
    bell = jobs_of(url)["low a bell"]
    # Drawn and charged (the upstream billed it); undelivered, so an admin can refund it.
    assert bell["status"] == "succeeded" and bell["actual_credits"] == pytest.approx(exact(bell))
    assert len([c for c in tg.of("sendPhoto") if c.chat_id == BOB["id"]]) == 5
    told = text("en", "job.undelivered", job_id=bell["id"])
    tg.wait_for(lambda: told in tg.texts(BOB["id"]))
    tg.wait_for(lambda: any(f"job {bell['id']}" in t for t in tg.texts(admin)))
    assert f"ALERT undelivered: job {bell['id']}" in bot.output()
    tg.clear_faults()
    assert bot.stop(signal.SIGTERM, within=20) == 0


def _cli(tmp_path: Path, env: dict[str, str], *args: str) -> str:
    """Run one `imgbot` terminal command in the bot's folder; return what it printed."""
    result = subprocess.run(
        [sys.executable, "-m", "bots.cli", *args],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.stdout + result.stderr
