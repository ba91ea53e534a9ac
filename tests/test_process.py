"""`imgbot run` as an operator runs it: a real process, signals, crashes, restarts, backups.

`python -m bots.cli run` starts in tmp_path (no `.env` there) with a fake token, the fake
Bot API server (`tests.fake_botapi`, real HTTP) as TELEGRAM_API_BASE_URL and the fake image
API as OPENAI_BASE_URL; the ledger is a SQLite file the test reads directly.

- SIGTERM with a job drawing and one waiting: the result is still delivered, the waiting
  user is told their job continues after the restart, the process exits 0 within the grace,
  and the next start delivers the waiting job.
- SIGKILL with a job drawing and two waiting, then a restart (slow group, `--slow`): every
  accepted command still has its row, the restarted process takes the jobs over once their
  lease ends (the drawing one is drawn again, its lost draw recorded; the queued ones run),
  each is delivered and charged once, and a button on a result from before the kill works.
- Backups: `imgbot backup` (SQLite online backup) taken while the ledger is written is whole
  and consistent; copying the raw files is not (shown step by step).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core.config import Settings
from core.messages import text
from core.pricing import PriceTable, Usage
from core.requester import Requester
from core.store import JobSpec, Limits, Store, open_store
from tests.conftest import TEST_KEY
from tests.fake_api import FakeImageAPI
from tests.fake_botapi import FakeBotApiServer
from tests.pg_server import PASSWORD as PG_PASSWORD
from tests.telegram_fake import TOKEN, Updates

ROOT = Path(__file__).resolve().parent.parent
ANN = Updates.user(2001, "Ann", "en")
BOB = Updates.user(2002, "Bob", "en")
CAT = Updates.user(2003, "Cat", "en")
DAN = Updates.user(2004, "Dan", "en")
EVE = Updates.user(2005, "Eve", "en")
GROUP = Updates.supergroup(-1005550001111, "Studio")
SETTING_NAMES = {name.upper() for name in Settings.model_fields}


@dataclass
class BotProcess:
    """A running `imgbot run`, its output going to a file."""

    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        """Return everything the process wrote so far."""
        return self.log.read_text("utf-8", "replace")

    def stop(self, sig: signal.Signals, within: float) -> int:
        """Send a signal and return the exit code (fail if it takes longer than `within`)."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=within)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"no exit {within}s after {sig.name}:\n{self.output()}") from None


@pytest.fixture
def servers() -> Iterator[tuple[FakeBotApiServer, FakeImageAPI]]:
    """Yield the fake Bot API server and the fake image API, both on 127.0.0.1."""
    with FakeBotApiServer(TOKEN) as tg, FakeImageAPI(key=TEST_KEY) as images:
        yield tg, images


@pytest.fixture
def start(tmp_path: Path, servers: tuple[FakeBotApiServer, FakeImageAPI]) -> Iterator[Any]:
    """Return a starter of `imgbot run` processes; any left running are killed at the end."""
    tg, images = servers
    started: list[BotProcess] = []

    def run(**settings: str) -> BotProcess:
        # Nothing of the developer's environment may configure the bot under test.
        env = {k: v for k, v in os.environ.items() if k.upper() not in SETTING_NAMES}
        env.update(
            {
                "PYTHONPATH": str(ROOT),
                "TELEGRAM_BOT_TOKEN": TOKEN,
                "TELEGRAM_API_BASE_URL": tg.base_url,
                "OPENAI_BASE_URL": images.base_url,
                "OPENAI_API_KEY": TEST_KEY,
                "DATABASE_URL": f"sqlite:///{tmp_path}/data/imgbot.db",
                "RATE_LIMIT_PER_MINUTE": "0",
                "PROGRESS_INTERVAL": "0.5",
                "REQUEST_TIMEOUT": "60",
                "LOG_LEVEL": "INFO",
                "WEB_PORT": "0",
                **settings,
            }
        )
        log = tmp_path / f"bot-{len(started) + 1}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bots.cli", "run"],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        bot = BotProcess(proc, log)
        started.append(bot)
        polls = len(tg.of("deleteWebhook"))
        tg.wait_for(lambda: len(tg.of("deleteWebhook")) > polls or proc.poll() is not None, 20)
        assert proc.poll() is None, bot.output()
        return bot

    assert not (tmp_path / ".env").exists()
    yield run
    for number, bot in enumerate(started, 1):
        if bot.proc.poll() is None:
            bot.proc.kill()
            bot.proc.wait()
        # Shown by pytest only when the test failed: what each process logged.
        print(f"--- imgbot run #{number} (exit {bot.proc.returncode}) ---")
        print("\n".join(bot.output().splitlines()[-150:]))


def rows(tmp_path: Path) -> dict[str, sqlite3.Row]:
    """Return the jobs by their command text (the bot may be running: WAL readers are fine)."""
    with sqlite3.connect(tmp_path / "data" / "imgbot.db", timeout=10) as db:
        db.row_factory = sqlite3.Row
        found = db.execute(
            "SELECT j.*, c.charged FROM jobs j JOIN job_charges c ON c.id = j.id ORDER BY j.id"
        ).fetchall()
    return {row["command_text"]: row for row in found}


def exact_credits(row: sqlite3.Row) -> float:
    """Return what a job's recorded usage costs by the price table."""
    usage = Usage(**json.loads(row["usage_json"]))
    return PriceTable.from_settings(Settings(_env_file=None)).credits(usage, row["model"])


def assert_no_secrets(*outputs: str) -> None:
    for output in outputs:
        assert TOKEN not in output and TEST_KEY not in output


def test_sigterm_delivers_the_running_job_and_keeps_the_waiting_one_for_the_next_start(
    tmp_path: Path, servers: tuple[FakeBotApiServer, FakeImageAPI], start: Any
) -> None:
    tg, images = servers
    u = Updates()
    bot = start(MAX_JOBS_IN_FLIGHT="1", SHUTDOWN_GRACE="20")
    images.inject("slow", seconds=1.5)
    tg.push(u.update(u.message(ANN, u.private(ANN), text="/img low a slow cat")))
    tg.wait_for(lambda: images.api_requests)  # Ann's job is drawing
    tg.push(u.update(u.message(BOB, u.private(BOB), text="/img low a dog")))
    queued = text("en", "progress.queued", position=1)
    tg.wait_for(lambda: queued in tg.texts(BOB["id"]))

    assert bot.stop(signal.SIGTERM, within=20) == 0

    [photo] = tg.of("sendPhoto", ok=True)
    assert photo.chat_id == ANN["id"]
    assert len(images.api_requests) == 1  # Bob's job never reached the upstream
    jobs = rows(tmp_path)
    ann, bob = jobs["low a slow cat"], jobs["low a dog"]
    assert tg.texts(BOB["id"])[-1] == text("en", "job.resumes_after_restart", job_id=bob["id"])
    assert (ann["status"], ann["stage"]) == ("succeeded", "delivered")
    assert ann["actual_credits"] == pytest.approx(exact_credits(ann))
    assert json.loads(ann["result_refs"]) == [photo.result["photo"][-1]["file_id"]]
    # Bob's job stays accepted: queued, its lease handed back, counted at its estimate.
    assert (bob["status"], bob["stage"], bob["charged"]) == (
        "reserved", "queued", bob["estimated_credits"]
    )
    # A clean stop checkpoints the WAL: the .db file alone now holds everything.
    wal = tmp_path / "data" / "imgbot.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    output = bot.output()
    assert "imgbot stopped; 0 job(s) still in flight" in output
    assert "1 open job(s) left for the next start" in output

    # The next start carries it on at once (no lease to wait for) and Bob gets his image.
    again = start(MAX_JOBS_IN_FLIGHT="1", SHUTDOWN_GRACE="20")
    tg.wait_for(lambda: [c for c in tg.of("sendPhoto", ok=True) if c.chat_id == BOB["id"]])
    tg.wait_for(lambda: rows(tmp_path)["low a dog"]["stage"] == "delivered")
    bob = rows(tmp_path)["low a dog"]
    assert bob["status"] == "succeeded" and bob["lost_credits"] == 0
    assert bob["actual_credits"] == pytest.approx(exact_credits(bob))
    assert text("en", "job.resumed", job_id=bob["id"]) in tg.texts(BOB["id"])
    assert len(images.api_requests) == 2  # each job drawn once
    assert again.stop(signal.SIGTERM, within=20) == 0
    assert_no_secrets(output, again.output())


def test_run_on_postgresql_draws_charges_and_stops_cleanly(
    tmp_path: Path, servers: tuple[FakeBotApiServer, FakeImageAPI], start: Any, pg_server: Any
) -> None:
    # DATABASE_URL=postgresql://… imgbot run, end to end: a private and a group job drawn,
    # delivered and charged exactly in the PostgreSQL ledger, a clean stop, and no password
    # anywhere in the output.
    tg, images = servers
    u = Updates()
    url = pg_server.create_database()
    bot = start(DATABASE_URL=url, DATABASE_POOL_SIZE="3")
    tg.push(u.update(u.message(ANN, u.private(ANN), text="/img low a pg cat")))
    tg.push(u.update(u.message(DAN, GROUP, text="/img@ThisBot low a pg kite")))
    tg.wait_for(lambda: len(tg.of("sendPhoto", ok=True)) == 2, 30)
    assert bot.stop(signal.SIGTERM, within=20) == 0

    async def read() -> list[Any]:
        store = await open_store(url, Limits())
        try:
            report = await store.spend_report(f"telegram:{ANN['id']}")
            return [*report.last_jobs, *(await store.spend_report(f"telegram:{DAN['id']}")).last_jobs]
        finally:
            await store.close()

    jobs = {job.command_text: job for job in asyncio.run(read())}
    assert set(jobs) == {"low a pg cat", "low a pg kite"}
    for job in jobs.values():
        assert job.status.value == "succeeded" and job.usage is not None
        usage = job.usage
        expected = PriceTable.from_settings(Settings(_env_file=None)).credits(usage, job.model)
        assert job.actual_credits == pytest.approx(expected)
    assert jobs["low a pg kite"].chat_key == f"telegram:{GROUP['id']}"
    output = bot.output()
    assert "imgbot stopped; 0 job(s) still in flight" in output
    assert PG_PASSWORD not in output
    assert_no_secrets(output)


@pytest.mark.slow
def test_sigkill_then_restart_loses_nothing_and_old_buttons_work(
    tmp_path: Path, servers: tuple[FakeBotApiServer, FakeImageAPI], start: Any
) -> None:
    tg, images = servers
    u = Updates()
    settings = {"MAX_JOBS_IN_FLIGHT": "1", "JOB_LEASE": "1"}
    first = start(**settings)
    # A result from before the crash, in a group.
    dan_command = u.message(DAN, GROUP, text="/img@ThisBot low a red kite")
    tg.push(u.update(dan_command))
    [dan_photo] = tg.wait_for(lambda: tg.of("sendPhoto", ok=True))
    # Ann's job hangs upstream; Bob's and Cat's wait in the queue.
    images.inject("hang", seconds=60)
    tg.push(u.update(u.message(ANN, u.private(ANN), text="/img low a hanging lamp")))
    tg.wait_for(lambda: len(images.api_requests) == 2)
    tg.push(u.update(u.message(BOB, u.private(BOB), text="/img low a bell")))
    last = u.update(u.message(CAT, u.private(CAT), text="/img low a cat"))
    tg.push(last)
    tg.wait_for(lambda: tg.texts(BOB["id"]) and tg.texts(CAT["id"]))
    # Telegram hands an update out again until a later getUpdates confirms it; wait for that,
    # so the kill tests the bot and not Telegram's at-least-once delivery.
    tg.wait_for(lambda: tg.confirmed > last["update_id"])
    accepted = ["low a red kite", "low a hanging lamp", "low a bell", "low a cat"]
    tg.wait_for(lambda: sorted(rows(tmp_path)) == sorted(accepted))

    assert first.stop(signal.SIGKILL, within=10) == -signal.SIGKILL
    before = rows(tmp_path)
    assert [r["stage"] for r in before.values()] == ["delivered", "drawing", "queued", "queued"]
    time.sleep(0.5)

    second = start(**settings)
    # The dead process's jobs are taken over once their lease ends: Ann's is drawn again
    # (her first draw is recorded as lost), Bob's and Cat's run; each is delivered.
    for who in (ANN, BOB, CAT):
        tg.wait_for(
            lambda who=who: [c for c in tg.of("sendPhoto", ok=True) if c.chat_id == who["id"]],
            within=30,
        )
    tg.wait_for(lambda: all(r["stage"] == "delivered" for r in rows(tmp_path).values()))
    after = rows(tmp_path)
    assert list(after) == accepted  # nothing lost, nothing added
    dan = after["low a red kite"]
    assert dict(dan) == dict(before["low a red kite"])
    lamp = after["low a hanging lamp"]
    assert (lamp["status"], lamp["attempts"], lamp["lost_credits"]) == (
        "succeeded", 2, lamp["estimated_credits"]
    )
    for command in accepted[1:]:
        job = after[command]
        assert job["status"] == "succeeded"
        assert job["actual_credits"] == pytest.approx(exact_credits(job))
    for command, who in zip(accepted[1:], (ANN, BOB, CAT), strict=True):
        assert text("en", "job.resumed", job_id=after[command]["id"]) in tg.texts(who["id"])

    # Eve presses "vary" under Dan's result from before the crash: it still works.
    tg.push(u.callback(EVE, dan_photo.result, f"j:{dan['id']}:vary"))
    tg.wait_for(lambda: len(tg.of("sendPhoto", ok=True)) == 5)
    vary = tg.of("sendPhoto", ok=True)[-1]
    assert tg.of("answerCallbackQuery", ok=True)
    assert vary.chat_id == GROUP["id"]
    assert vary.params["reply_parameters"]["message_id"] == dan_photo.result["message_id"]
    assert json.loads(dan["result_refs"])[0] in tg.downloads  # refetched by its file_id
    assert second.stop(signal.SIGTERM, within=20) == 0

    final = sqlite3.connect(tmp_path / "data" / "imgbot.db")
    final.row_factory = sqlite3.Row
    jobs = final.execute("SELECT * FROM jobs ORDER BY id").fetchall()
    assert [(j["id"], j["status"]) for j in jobs] == [(i, "succeeded") for i in range(1, 6)]
    eve = jobs[4]
    assert eve["user_key"] == f"telegram:{EVE['id']}" and eve["command_text"] == "low a red kite"
    assert eve["actual_credits"] == pytest.approx(exact_credits(eve))
    # Dan's, Ann's twice (the first cut off), Bob's, Cat's, Eve's: no job ran twice otherwise.
    assert len(images.api_requests) == 6
    assert_no_secrets(first.output(), second.output())


# --- backups ------------------------------------------------------------------------------
def problems(path: Path) -> list[str]:
    """Return what is wrong with a copy of the ledger (empty: whole and consistent)."""
    found: list[str] = []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        check = [r[0] for r in db.execute("PRAGMA integrity_check")]
        if check != ["ok"]:
            return [f"integrity: {check[:3]}"]
        found += [f"foreign key: {tuple(r)}" for r in db.execute("PRAGMA foreign_key_check")]
        seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'jobs'").fetchone()
        top = db.execute("SELECT MAX(id) FROM jobs").fetchone()[0]
        if (seq[0] if seq else None) != top:
            found.append(f"sqlite_sequence {seq[0] if seq else None} != max(id) {top}")
        for job in db.execute("SELECT * FROM jobs"):
            if job["status"] == "succeeded" and (
                job["actual_credits"] is None or not job["usage_json"] or not job["finished_at"]
            ):
                found.append(f"job {job['id']} succeeded without its charge")
            if job["status"] not in ("reserved", "succeeded"):
                found.append(f"job {job['id']} is {job['status']}")
        spent = db.execute(
            "SELECT user_key, SUM(charged) AS total FROM job_charges GROUP BY user_key"
        ).fetchall()
        found += [f"{r['user_key']} over its limit" for r in spent if r["total"] > LIMIT]
    except sqlite3.DatabaseError as err:
        found.append(f"unreadable: {err}")
    finally:
        db.close()
    return found


LIMIT = 50_000.0
SPEC = JobSpec("low a cat", "gpt-image-2", "1024x1024", "low", 1, 0, "{}")
USAGE = Usage(text_input_tokens=12, image_output_tokens=196)


async def open_ledger(path: Path) -> Store:
    return await open_store(f"sqlite:///{path}", Limits(user_daily=LIMIT))


async def write_jobs(ledger: Store, count: int, *, first_user: int = 0, users: int = 7) -> None:
    """Reserve and settle `count` jobs (two transactions each) across several users."""
    for i in range(count):
        who = Requester("telegram", str(first_user + i % users), "-42", f"User {i % users}")
        job_id = await ledger.reserve(who, SPEC, 560.0)
        await ledger.settle(job_id, 557.0 + i % 3, USAGE)


def checkpoint(path: Path) -> None:
    """Move everything from the -wal into the .db and empty the -wal (what SQLite does now
    and then on its own while the bot runs)."""
    with sqlite3.connect(path) as db:
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0


async def test_backup_while_the_ledger_is_written_is_whole_and_consistent(
    tmp_path: Path,
) -> None:
    live = tmp_path / "data" / "imgbot.db"
    ledger = await open_ledger(live)
    stop = asyncio.Event()

    async def writer() -> int:
        written = 0
        while not stop.is_set():
            await write_jobs(ledger, 5, first_user=written)
            written += 5
        return written

    task = asyncio.create_task(writer())
    try:
        counts = []
        for n in range(4):
            await asyncio.sleep(0.05)
            if n == 0:  # the command an operator runs, while the bot writes
                command = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bots.cli",
                    "backup",
                    str(tmp_path / "b" / "0.db"),
                    cwd=tmp_path,
                    env={
                        **os.environ,
                        "PYTHONPATH": str(ROOT),
                        "DATABASE_URL": f"sqlite:///{live}",
                    },
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                out, err = await command.communicate()
                assert command.returncode == 0, err.decode()
                assert "backup written" in out.decode()
            else:
                from bots.backup import backup_database

                await asyncio.to_thread(backup_database, live, tmp_path / "b" / f"{n}.db")
            copy = tmp_path / "b" / f"{n}.db"
            assert problems(copy) == []
            with sqlite3.connect(copy) as db:
                assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
                counts.append(db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
            assert not await asyncio.to_thread(Path(f"{copy}-wal").exists)  # one file, no -wal
    finally:
        stop.set()
        written = await task
        await ledger.close()
    assert counts == sorted(counts) and counts[-1] > 0  # snapshots of a growing ledger
    assert counts[-1] < written  # the writer really went on during the backups
    assert not list((tmp_path / "b").glob("*.part"))


async def test_copying_the_raw_files_of_a_running_ledger_is_not_a_backup(tmp_path: Path) -> None:
    live = tmp_path / "data" / "imgbot.db"
    wal = Path(f"{live}-wal")
    ledger = await open_ledger(live)
    try:
        await write_jobs(ledger, 10)
        checkpoint(live)

        # 1. The .db file alone misses every commit still in the -wal.
        await write_jobs(ledger, 10)
        shutil.copy(live, tmp_path / "db-only.db")
        assert problems(tmp_path / "db-only.db") == []
        with sqlite3.connect(tmp_path / "db-only.db") as db:
            assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 10  # not 20

        # 2. The .db and the -wal copied together, with nothing written in between: whole.
        shutil.copy(live, tmp_path / "pair.db")
        shutil.copy(wal, tmp_path / "pair.db-wal")
        assert problems(tmp_path / "pair.db") == []

        # 3. The .db copied, then SQLite checkpoints and the bot writes on, then the -wal is
        #    copied: a torn pair. SQLite opens it without a word, but the rows disagree.
        checkpoint(live)
        shutil.copy(live, tmp_path / "torn.db")
        newcomer = Requester("telegram", "999", "-42", "Newcomer")
        job_id = await ledger.reserve(newcomer, SPEC, 560.0)  # a new user and a new job
        checkpoint(live)  # ...moved into the .db after the copy was taken
        await ledger.settle(job_id, 557.0, USAGE)  # ...and the job's page changes again
        shutil.copy(wal, tmp_path / "torn.db-wal")
        torn = problems(tmp_path / "torn.db")
        assert torn, "the torn copy looked consistent"

        # The online backup of the same moment is whole.
        from bots.backup import backup_database

        backup_database(live, tmp_path / "backup.db")
        assert problems(tmp_path / "backup.db") == []
    finally:
        await ledger.close()


def test_backup_refuses_to_overwrite_the_live_database(tmp_path: Path) -> None:
    from bots.backup import BackupError, backup_database

    live = tmp_path / "imgbot.db"
    asyncio.run(_touch_ledger(live))
    with pytest.raises(BackupError, match="live database"):
        backup_database(live, live)
    with pytest.raises(BackupError, match="no database"):
        backup_database(tmp_path / "missing.db", tmp_path / "copy.db")
    assert not (tmp_path / "missing.db").exists()
    (tmp_path / "folder").mkdir()
    report = backup_database(live, tmp_path / "folder")
    assert report.path == tmp_path / "folder" / "imgbot.db" and problems(report.path) == []


async def _touch_ledger(path: Path) -> None:
    ledger = await open_ledger(path)
    await ledger.close()


def _run_until_exit(tmp_path: Path, within: float, **settings: str) -> tuple[int, str]:
    """Run `imgbot run` with these settings until it exits by itself; return (code, output)."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in SETTING_NAMES}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "OPENAI_API_KEY": TEST_KEY,
            "DATABASE_URL": f"sqlite:///{tmp_path}/data/imgbot.db",
            "LOG_LEVEL": "INFO",
            "WEB_PORT": "0",  # the web door is on by default; these tests are about Telegram
            **settings,
        }
    )
    proc = subprocess.run(
        [sys.executable, "-m", "bots.cli", "run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=within,
    )
    return proc.returncode, proc.stdout.decode("utf-8", "replace")


WRONG_TOKEN = "987654321:WRONGwrongWRONGwrongWRONGwrong12345"


def test_run_exits_1_when_the_bot_api_refuses_the_token(
    tmp_path: Path, servers: tuple[FakeBotApiServer, FakeImageAPI]
) -> None:
    # A token the Bot API refuses (401 on getMe) is fatal: exit 1 at once, so systemd's
    # Restart=on-failure sees it; one line names the front end and why, never the token.
    tg, images = servers
    code, output = _run_until_exit(
        tmp_path,
        30,
        TELEGRAM_BOT_TOKEN=WRONG_TOKEN,
        TELEGRAM_API_BASE_URL=tg.base_url,
        OPENAI_BASE_URL=images.base_url,
    )
    assert code == 1, output
    [line] = [x for x in output.splitlines() if "failed to start" in x]
    assert "telegram" in line and "TELEGRAM_BOT_TOKEN" in line and "refused" in line
    assert "retrying" not in output  # a refused token is not retried
    assert WRONG_TOKEN not in output and "Traceback" not in output
    assert_no_secrets(output)


def test_run_exits_1_when_telegram_stays_unreachable(
    tmp_path: Path, servers: tuple[FakeBotApiServer, FakeImageAPI]
) -> None:
    # Nothing listens at the Bot API's address: retried STARTUP_RETRIES times, then exit 1.
    _, images = servers
    code, output = _run_until_exit(
        tmp_path,
        30,
        TELEGRAM_BOT_TOKEN=TOKEN,
        TELEGRAM_API_BASE_URL="http://127.0.0.1:9",
        OPENAI_BASE_URL=images.base_url,
        STARTUP_RETRIES="2",
    )
    assert code == 1, output
    assert output.count("retrying in") == 2
    [line] = [x for x in output.splitlines() if "failed to start" in x]
    assert "telegram" in line and "unreachable" in line and "3 attempts" in line
    assert "Traceback" not in output
    assert_no_secrets(output)


def test_run_comes_up_when_the_bot_api_answers_after_a_retry(
    tmp_path: Path, servers: tuple[FakeBotApiServer, FakeImageAPI]
) -> None:
    # The Bot API is down at start-up and back before the retries run out: the bot runs,
    # and a later SIGTERM is still a clean stop (exit 0).
    import socket

    _, images = servers
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    late = FakeBotApiServer(TOKEN)
    env = {k: v for k, v in os.environ.items() if k.upper() not in SETTING_NAMES}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "OPENAI_API_KEY": TEST_KEY,
            "OPENAI_BASE_URL": images.base_url,
            "DATABASE_URL": f"sqlite:///{tmp_path}/data/imgbot.db",
            "TELEGRAM_BOT_TOKEN": TOKEN,
            "TELEGRAM_API_BASE_URL": f"http://127.0.0.1:{port}",
            "STARTUP_RETRIES": "5",
            "LOG_LEVEL": "INFO",
        }
    )
    log = tmp_path / "bot.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bots.cli", "run"],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    bot = BotProcess(proc, log)
    try:
        deadline = time.monotonic() + 20
        while "retrying in" not in bot.output():
            assert proc.poll() is None and time.monotonic() < deadline, bot.output()
            time.sleep(0.05)
        late.port = port  # type: ignore[attr-defined]
        _start_on(late, port)
        late.wait_for(lambda: late.of("deleteWebhook"), 20)
        assert proc.poll() is None, bot.output()
        assert bot.stop(signal.SIGTERM, within=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        late.stop()
    assert "failed to start" not in bot.output()


def _start_on(api: FakeBotApiServer, port: int) -> None:
    """Start a fake Bot API on a given port (the one the bot was told, down until now)."""
    import threading
    from http.server import ThreadingHTTPServer

    from tests.fake_botapi import _Handler

    server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    server.daemon_threads = True
    server.api = api  # type: ignore[attr-defined]
    api._server = server
    api._thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    api._thread.start()
