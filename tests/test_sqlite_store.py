"""What is about SQLite itself: the file, WAL, its modes, upgrades of old files, locks held
by other connections and processes. The store's contract, for both backends, is in
tests/test_store.py."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import stat
import sys
from collections import defaultdict
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import core.store.sqlite as ledger_module
from core.errors import LimitExceeded
from core.pricing import Usage
from core.store import ChatTotal, JobStatus, Limits, StoreError
from core.store.sqlite import SqliteStore as Ledger
from core.store.sqlite_schema import LATEST_VERSION, MIGRATIONS, SCHEMA_VERSION_DDL
from tests.test_store import (
    ROOT,
    SPEC,
    START,
    Clock,
    assert_totals_match_jobs,
    charged,
    sqlite_target,
    who,
)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "imgbot.db"


async def open_ledger(path: Path, clock: Clock, **limits: float) -> Ledger:
    return await Ledger.open(path, Limits(**limits), clock=clock)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the file -------------------------------------------------------------------------------


async def test_open_creates_folder_uses_wal_and_closes_twice(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "deep" / "er" / "imgbot.db"
    async with await open_ledger(path, clock) as ledger:
        assert await ledger.schema_version() == LATEST_VERSION
        await ledger.close()
        await ledger.close()
        with pytest.raises(RuntimeError):
            await ledger.get_job(1)
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        versions = [row[0] for row in raw.execute("SELECT version FROM schema_version")]
    assert versions == [m.version for m in MIGRATIONS]
    assert len(MIGRATIONS) >= 2
    # Opening again applies nothing twice.
    async with await open_ledger(path, clock) as ledger:
        assert await ledger.schema_version() == LATEST_VERSION


async def test_a_new_ledger_is_private_and_an_open_one_is_tightened(
    tmp_path: Path, clock: Clock
) -> None:
    folder = tmp_path / "data"
    path = folder / "imgbot.db"
    async with await open_ledger(path, clock) as ledger:
        await ledger.reserve(who("1"), SPEC, 10)
        # A ledger holds every prompt, user id and name: only its owner may read it.
        assert mode_of(folder) == 0o700
        assert mode_of(path) == 0o600
        for side in ("-wal", "-shm"):  # SQLite gives them the database's mode
            assert mode_of(Path(f"{path}{side}")) == 0o600, side
    # A file left readable by others (an old release, a copy by hand) is tightened.
    path.chmod(0o644)
    folder.chmod(0o755)
    async with await open_ledger(path, clock) as ledger:
        assert mode_of(path) == 0o600
        assert (await ledger.spend_report("telegram:1")).today == 10  # nothing lost
        assert mode_of(folder) == 0o755  # an existing folder is the operator's
    # An empty file made beforehand (e.g. by `touch`) becomes a private ledger too.
    other = tmp_path / "touched.db"
    other.touch(mode=0o644)
    other.chmod(0o644)
    async with await open_ledger(other, clock) as ledger:
        assert await ledger.schema_version() == LATEST_VERSION
    assert mode_of(other) == 0o600


# --- upgrades -------------------------------------------------------------------------------


def build_v1_database(path: Path) -> None:
    """Make a database exactly as a release with only the first migration left it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = sqlite3.connect(path)
    with raw:
        raw.execute(SCHEMA_VERSION_DDL)
        for statement in MIGRATIONS[0].statements:
            raw.execute(statement)
        raw.execute(
            "INSERT INTO schema_version VALUES (1, 'users, chats and jobs', ?)",
            (START.isoformat(),),
        )
        t = (START - timedelta(hours=2)).isoformat(timespec="microseconds")
        raw.execute(
            "INSERT INTO users VALUES ('telegram:1', 'telegram', '1', 'Old Ann', 'zh', 500, NULL,"
            " 0, ?, ?)",
            (t, t),
        )
        raw.execute(
            "INSERT INTO chats VALUES ('telegram:-9', 'telegram', '-9', 'Old group', NULL, 1, ?, ?)",
            (t, t),
        )
        job = (
            "INSERT INTO jobs (user_key, chat_key, platform, display_name, command_text,"
            " request_json, model, size, quality, n, reference_count, status,"
            " estimated_credits, actual_credits, usage_json, created_at, started_at)"
            " VALUES ('telegram:1', 'telegram:-9', 'telegram', 'Old Ann', '/img a', '{}',"
            " 'gpt-image-1', '1024x1024', 'low', 1, 0, ?, ?, ?, ?, ?, ?)"
        )
        raw.execute(job, ("succeeded", 300.0, 120.0, '{"image_output_tokens": 272}', t, t))
        raw.execute(job, ("reserved", 250.0, None, None, t, t))
    raw.close()


async def test_upgrade_from_v1_keeps_rows(db_path: Path, clock: Clock) -> None:
    build_v1_database(db_path)
    async with await open_ledger(db_path, clock) as ledger:
        assert await ledger.schema_version() == LATEST_VERSION
        old = await ledger.get_job(1)
        assert old is not None
        assert (old.status, old.actual_credits, old.result_refs) == (JobStatus.SUCCEEDED, 120, ())
        assert old.usage == Usage(image_output_tokens=272)
        assert old.refunded_by is None
        user = await ledger.get_user("telegram:1")
        assert user is not None
        assert (user.display_name, user.language, user.daily_limit) == ("Old Ann", "zh", 500)
        assert await ledger.is_blocked("telegram:2", "telegram:-9")
        # Old rows take part in the new code: limits, reports, result refs, refunds.
        report = await ledger.spend_report("telegram:1")
        assert report.today == pytest.approx(120 + 250)
        assert report.daily_remaining == pytest.approx(500 - 370)
        await ledger.set_result_refs(1, ["file-a", "file-b"])
        assert (await ledger.get_job(1)).result_refs == ("file-a", "file-b")  # type: ignore[union-attr]
        # An old reservation has no lease: a live worker takes it over.
        [taken] = await ledger.claim_expired("w", 3600, ["telegram"])
        assert (taken.id, taken.lease_owner) == (2, "w")
        assert await ledger.mark_unsettled(2)
        refunded = await ledger.refund(2, by="telegram:admin")
        assert refunded.refunded_credits == 250
        new_id = await ledger.reserve(who("1"), SPEC, 100)
        assert new_id == 3
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 3
        assert raw.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 1
    await assert_totals_match_jobs(sqlite_target(db_path))


def build_v2_database(path: Path) -> None:
    """Make a database as the release before running totals left it, with jobs of every kind."""
    build_v1_database(path)
    raw = sqlite3.connect(path)
    with raw:
        for statement in MIGRATIONS[1].statements:
            raw.execute(statement)
        raw.execute(
            "INSERT INTO schema_version VALUES (2, ?, ?)",
            (MIGRATIONS[1].description, START.isoformat()),
        )
        t = (START - timedelta(hours=1)).isoformat(timespec="microseconds")
        raw.execute(
            "INSERT INTO users VALUES ('telegram:2', 'telegram', '2', 'Bo', NULL, NULL, NULL,"
            " 0, ?, ?)",
            (t, t),
        )
        job = (
            "INSERT INTO jobs (user_key, chat_key, platform, display_name, command_text,"
            " request_json, model, size, quality, n, reference_count, status,"
            " estimated_credits, actual_credits, created_at, refunded_by)"
            " VALUES (?, ?, 'telegram', '', '/img b', '{}', 'gpt-image-2', '1024x1024',"
            " 'high', 1, 0, ?, ?, ?, ?, ?)"
        )
        yesterday, last_month = START - timedelta(days=1), datetime(2025, 2, 20, tzinfo=UTC)
        for user, chat, status, estimated, actual, when, by in [
            ("telegram:2", "telegram:-9", "succeeded", 500.0, 400.0, yesterday, None),
            ("telegram:2", "telegram:-9", "unsettled", 700.0, None, START, None),
            ("telegram:2", "telegram:-9", "refunded", 300.0, 300.0, START, "telegram:admin"),
            ("telegram:2", None, "failed", 90.0, None, START, None),
            ("telegram:2", None, "failed", 90.0, 33.333333, START, None),
            ("telegram:1", None, "succeeded", 1000.0, 999.5, last_month, None),
        ]:
            created = when.isoformat(timespec="microseconds")
            raw.execute(job, (user, chat, status, estimated, actual, created, by))
    raw.close()


async def test_upgrade_from_v2_backfills_the_running_totals(db_path: Path, clock: Clock) -> None:
    build_v2_database(db_path)
    async with await open_ledger(db_path, clock, chat_daily=1100, global_daily=10_000) as ledger:
        assert await ledger.schema_version() == LATEST_VERSION == 12
        await assert_totals_match_jobs(sqlite_target(db_path))
        # Today: Ann 120 + 250 in chat -9; Bo 700 (unsettled) in -9, 33.333333 outside it.
        assert await ledger.global_spent_today() == pytest.approx(370 + 700 + 33.333333)
        report = await ledger.spend_report("telegram:2")
        assert (report.today, report.month) == pytest.approx((733.333333, 1133.333333))
        # The backfilled totals are what the limits now check.
        with pytest.raises(LimitExceeded) as info:
            await ledger.reserve(who("3", "-9"), SPEC, 31)
        assert info.value.params["scope"] == "chat_daily"
        assert info.value.params["remaining"] == pytest.approx(1100 - 1070)
        with pytest.raises(LimitExceeded) as info:
            await ledger.reserve(who("1"), SPEC, 131)  # Ann's own override: 500 a day
        assert (info.value.params["scope"], info.value.params["remaining"]) == (
            "user_daily",
            pytest.approx(130),
        )
        await ledger.refund(4, by="telegram:admin")  # Bo's unsettled 700
        await ledger.reserve(who("3", "-9"), SPEC, 31)
    await assert_totals_match_jobs(sqlite_target(db_path))
    with sqlite3.connect(db_path) as raw:
        view = dict(raw.execute("SELECT id, charged FROM job_charges").fetchall())
        rows = raw.execute("SELECT id, status, estimated_credits, actual_credits FROM jobs")
        assert view == {i: charged(status, est, act) for i, status, est, act in rows}


# Users, chats and jobs as a running bot of the current release leaves them.
V4_USERS = [
    # user_key, display_name, language, daily_limit, monthly_limit, blocked
    ("telegram:1", "Ann", "zh", 500.0, None, 0),
    ("telegram:2", "Bo", None, None, 3000.0, 0),
    ("telegram:3", "Cy", "en-US", None, None, 1),
    ("discord:4", "Di", "de", 0.0, 0.0, 0),
]
V4_CHATS = [
    # chat_key, title, daily_limit, blocked
    ("telegram:-9", "Group", 5000.0, 0),
    ("telegram:-10", "Blocked group", None, 1),
    ("discord:-11", "Guild", 0.0, 0),
]
# status, share of the estimate actually charged (None: NULL), error code
V4_OUTCOMES = [
    ("reserved", None, None),
    ("succeeded", 0.6, None),
    ("failed", None, "unavailable"),
    ("failed", 0.0, "timeout"),
    ("failed", 0.25, "moderation"),
    ("unsettled", None, None),
    ("refunded", 0.5, None),  # refunded after it succeeded
    ("refunded", None, None),  # refunded while unsettled
]
# Last month, yesterday and today (START's day), at different hours.
V4_TIMES = [
    datetime(2025, 2, 28, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2025, 3, 14, 8, 30, tzinfo=UTC),
    START - timedelta(hours=2),
]


def build_v4_database(path: Path) -> list[dict[str, Any]]:
    """Make a database exactly as the schema-4 release leaves it; return the jobs made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    jobs: list[dict[str, Any]] = []
    with closing(sqlite3.connect(path, isolation_level=None)) as raw:
        raw.execute("PRAGMA journal_mode = WAL")
        raw.execute("PRAGMA foreign_keys = ON")
        raw.execute("BEGIN IMMEDIATE")
        raw.execute(SCHEMA_VERSION_DDL)
        for migration in MIGRATIONS:
            if migration.version > 4:
                break
            for statement in migration.statements:
                raw.execute(statement)
            raw.execute(
                "INSERT INTO schema_version VALUES (?, ?, ?)",
                (migration.version, migration.description, "2025-01-01T00:00:00.000000+00:00"),
            )
        t0 = "2025-01-02T00:00:00.000000+00:00"
        for key, name, lang, daily, monthly, blocked in V4_USERS:
            platform, user_id = key.split(":")
            raw.execute(
                "INSERT INTO users VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, platform, user_id, name, lang, daily, monthly, blocked, t0, t0),
            )
        for key, title, daily, blocked in V4_CHATS:
            platform, chat_id = key.split(":")
            raw.execute(
                "INSERT INTO chats VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, platform, chat_id, title, daily, blocked, t0, t0),
            )
        chats_of = {"telegram": ["telegram:-9", "telegram:-10", None], "discord": ["discord:-11"]}
        number = 0
        for when in V4_TIMES:
            for user_key, name, *_ in V4_USERS:
                for status, share, error in V4_OUTCOMES:
                    number += 1
                    platform = user_key.split(":")[0]
                    options = chats_of[platform] + [None]
                    chat_key = options[(number + number // 8) % len(options)]
                    estimate = round(5 + 1.37 * number, 6) + 0.1  # awkward floats
                    actual = None if share is None else estimate * share
                    created = (when + timedelta(seconds=number)).isoformat(timespec="microseconds")
                    started = created if status != "reserved" or number % 2 else None
                    finished = created if status not in ("reserved", "unsettled") else None
                    job = {
                        "user_key": user_key,
                        "chat_key": chat_key,
                        "platform": platform,
                        "display_name": name,
                        "command_text": f"/img job {number}",
                        "request_json": json.dumps({"prompt": f"job {number}"}),
                        "model": "gpt-image-2",
                        "size": "1024x1024",
                        "quality": "high",
                        "n": 1 + number % 4,
                        "reference_count": number % 3,
                        "status": status,
                        "estimated_credits": estimate,
                        "actual_credits": actual,
                        "usage_json": json.dumps({"image_output_tokens": 272 + number})
                        if actual
                        else None,
                        "error_code": error,
                        "created_at": created,
                        "started_at": started,
                        "finished_at": finished,
                        "result_refs": json.dumps([f"file-{number}"])
                        if status == "succeeded"
                        else "[]",
                        "refunded_by": "telegram:admin" if status == "refunded" else None,
                        "refunded_at": created if status == "refunded" else None,
                        "source_ref": f"{platform}:msg:{number}" if number % 3 else None,
                    }
                    columns = ", ".join(job)
                    marks = ", ".join("?" for _ in job)
                    cursor = raw.execute(
                        f"INSERT INTO jobs ({columns}) VALUES ({marks})",  # noqa: S608
                        tuple(job.values()),
                    )
                    jobs.append({"id": cursor.lastrowid, **job})
        raw.execute("COMMIT")
    return jobs


def table_rows(path: Path, table: str, columns: list[str]) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path)) as raw:
        names = ", ".join(columns)
        return raw.execute(f"SELECT {names} FROM {table} ORDER BY 1, 2, 3").fetchall()  # noqa: S608


def table_columns(path: Path, table: str) -> list[str]:
    with closing(sqlite3.connect(path)) as raw:
        return [row[1] for row in raw.execute(f"PRAGMA table_xinfo({table})")]


async def test_upgrade_from_the_current_release_loses_nothing(db_path: Path, clock: Clock) -> None:
    jobs = build_v4_database(db_path)
    tables = ("schema_version", "users", "chats", "jobs", "spend_totals")
    columns = {table: table_columns(db_path, table) for table in tables}
    before = {table: table_rows(db_path, table, columns[table]) for table in tables}
    assert len(before["jobs"]) == len(jobs) == 3 * 4 * 8
    assert len(before["spend_totals"]) > 20  # the triggers filled them
    await assert_totals_match_jobs(sqlite_target(db_path))

    limits = dict(user_daily=5000, user_monthly=20_000, chat_daily=2000, global_daily=100_000)
    async with await open_ledger(db_path, clock, **limits) as ledger:
        assert await ledger.schema_version() == LATEST_VERSION
        # Not a row, a column value or a credit changed or went missing.
        for table in tables:
            after = table_rows(db_path, table, columns[table])
            if table == "schema_version":
                after = after[: len(before[table])]
            assert after == before[table], table

        # Spend, worked out here from the jobs as inserted.
        def spent(keep: Any) -> float:
            return sum(
                charged(j["status"], j["estimated_credits"], j["actual_credits"])
                for j in jobs
                if keep(j)
            )

        today, month = START.date().isoformat(), START.isoformat()[:7]
        for key, name, lang, daily, monthly, blocked in V4_USERS:
            user = await ledger.get_user(key)
            assert user is not None
            assert (user.display_name, user.language, user.daily_limit, user.monthly_limit) == (
                name,
                lang,
                daily,
                monthly,
            )
            assert user.blocked is bool(blocked)
            mine = [j for j in jobs if j["user_key"] == key]
            report = await ledger.spend_report(key, last=1000)
            assert report.today == pytest.approx(
                spent(lambda j, k=key: j["user_key"] == k and j["created_at"][:10] == today)
            )
            assert report.month == pytest.approx(
                spent(lambda j, k=key: j["user_key"] == k and j["created_at"][:7] == month)
            )
            assert report.all_time == pytest.approx(spent(lambda j, k=key: j["user_key"] == k))
            assert report.daily_limit == (limits["user_daily"] if daily is None else daily)
            assert report.monthly_limit == (limits["user_monthly"] if monthly is None else monthly)
            assert [job.id for job in report.last_jobs] == [j["id"] for j in reversed(mine)]
            for old, record in zip(reversed(mine), report.last_jobs, strict=True):
                for field in ("id", "user_key", "chat_key", "platform", "display_name"):
                    assert getattr(record, field) == old[field], field
                for field in ("command_text", "request_json", "n", "reference_count"):
                    assert getattr(record, field) == old[field], field
                for field in ("estimated_credits", "actual_credits", "error_code"):
                    assert getattr(record, field) == old[field], field
                assert (record.refunded_by, record.source_ref) == (
                    old["refunded_by"],
                    old["source_ref"],
                )
                assert record.status is JobStatus(old["status"])
                assert record.created_at == datetime.fromisoformat(old["created_at"])
                assert record.result_refs == tuple(json.loads(old["result_refs"]))
                usage = json.loads(old["usage_json"]) if old["usage_json"] else None
                assert record.usage == (Usage(**usage) if usage else None)
        for key, title, daily, blocked in V4_CHATS:
            chat = await ledger.get_chat(key)
            assert chat is not None
            assert (chat.title, chat.daily_limit, chat.blocked) == (title, daily, bool(blocked))
        assert await ledger.is_blocked("telegram:3", None)
        assert await ledger.is_blocked("telegram:1", "telegram:-10")
        assert not await ledger.is_blocked("telegram:1", "telegram:-9")
        assert not await ledger.is_blocked("discord:4", "discord:-11")

        since = datetime(2025, 3, 1, tzinfo=UTC)
        expected_chats: dict[str, list[float]] = defaultdict(list)
        for j in jobs:
            if j["chat_key"] and j["created_at"] >= since.isoformat():
                cost = charged(j["status"], j["estimated_credits"], j["actual_credits"])
                expected_chats[j["chat_key"]].append(cost)
        assert await ledger.chat_totals(since) == [
            ChatTotal(key, pytest.approx(sum(costs)), len(costs))  # type: ignore[arg-type]
            for key, costs in sorted(expected_chats.items(), key=lambda kv: -sum(kv[1]))
        ]
        spenders = await ledger.top_spenders(datetime(2025, 1, 1, tzinfo=UTC))
        assert {s.user_key: (s.credits, s.jobs) for s in spenders} == {
            key: (pytest.approx(spent(lambda j, k=key: j["user_key"] == k)), 24)
            for key, *_ in V4_USERS
        }
        assert await ledger.global_spent_today() == pytest.approx(
            spent(lambda j: j["created_at"][:10] == today), abs=1e-6 * len(jobs)
        )
        exported = (await ledger.export_csv()).splitlines()
        assert len(exported) == 1 + len(jobs)
        unsettled = [j["id"] for j in jobs if j["status"] == "unsettled"]
        assert [job.id for job in await ledger.list_unsettled()] == unsettled

        # The old totals and overrides are what the limits check now.
        ann_today = spent(lambda j: j["user_key"] == "telegram:1" and j["created_at"][:10] == today)
        assert 0 < ann_today < 500
        with pytest.raises(LimitExceeded) as info:
            await ledger.reserve(who("1", name="Ann"), SPEC, 500 - ann_today + 1)
        assert info.value.params["scope"] == "user_daily"
        assert info.value.params["remaining"] == pytest.approx(500 - ann_today, abs=1e-5)
        group_today = spent(
            lambda j: j["chat_key"] == "telegram:-9" and j["created_at"][:10] == today
        )
        assert 0 < group_today < 2000
        with pytest.raises(LimitExceeded) as info:
            await ledger.reserve(who("5", "-9"), SPEC, 5000 - group_today + 1)
        assert (info.value.params["scope"], info.value.params["limit"]) == ("chat_daily", 5000)
        assert info.value.params["remaining"] == pytest.approx(5000 - group_today, abs=1e-5)
        # Old jobs go on in the new code: an old unsettled job refunds, a new one reserves.
        assert (await ledger.refund(unsettled[-1], by="cli:root")).status is JobStatus.REFUNDED
        new_id = await ledger.reserve(who("2", name="Bo"), SPEC, 1)
        assert new_id == len(jobs) + 1
    await assert_totals_match_jobs(sqlite_target(db_path))


async def test_refuses_a_newer_schema(db_path: Path, clock: Clock) -> None:
    async with await open_ledger(db_path, clock):
        pass
    with sqlite3.connect(db_path) as raw:
        raw.execute("INSERT INTO schema_version VALUES (999, 'future', '')")
    with pytest.raises(StoreError, match="newer"):
        await open_ledger(db_path, clock)


# --- the writer and other connections --------------------------------------------------------


async def test_a_failed_transaction_is_undone_whole_and_swallows_no_other_write(
    db_path: Path, clock: Clock
) -> None:
    async with await open_ledger(db_path, clock) as ledger:
        job = await ledger.reserve(who("1"), SPEC, 10)
        await ledger.set_language("telegram:a", "en")
        entered = asyncio.Event()
        go_on = asyncio.Event()

        async def rename_then_fail(conn: Any) -> None:
            await conn.execute("UPDATE users SET display_name = 'x' WHERE user_key = 'telegram:a'")
            entered.set()
            await go_on.wait()
            raise ValueError("undo me")

        # A multi-statement write is open; single writes made meanwhile must not land in
        # its transaction (its rollback would silently lose them).
        failing = asyncio.ensure_future(ledger._transaction(rename_then_fail))
        await entered.wait()
        settle = asyncio.ensure_future(ledger.settle(job, 7, None))
        other = asyncio.ensure_future(ledger.reserve(who("2"), SPEC, 20))
        await asyncio.sleep(0.05)
        assert not settle.done()  # waits at the gate
        go_on.set()
        with pytest.raises(ValueError, match="undo me"):
            await failing
        assert await settle is True
        second = await other
        assert (await ledger.get_user("telegram:a")).display_name == ""  # type: ignore[union-attr]
        assert (await ledger.get_job(job)).actual_credits == 7  # type: ignore[union-attr]
        assert (await ledger.get_job(second)).estimated_credits == 20  # type: ignore[union-attr]
    await assert_totals_match_jobs(sqlite_target(db_path))


async def test_a_write_lock_held_too_long_elsewhere_fails_cleanly(
    db_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_module, "BUSY_TIMEOUT_S", 0.2)
    async with await open_ledger(db_path, clock) as ledger:
        kept = await ledger.reserve(who("1"), SPEC, 10)
        other = sqlite3.connect(db_path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # another process holds the write lock too long
            outcomes = await asyncio.gather(
                *(ledger.reserve(who("2"), SPEC, 10) for _ in range(5)),
                ledger.settle(kept, 5, None),
                return_exceptions=True,
            )
            # No driver type leaves the store: a StoreError that says what happened.
            assert all(isinstance(o, StoreError) for o in outcomes), outcomes
            assert all("locked" in str(o) for o in outcomes)
            # Readers are never blocked by a writer (WAL).
            assert (await ledger.get_job(kept)).status is JobStatus.RESERVED  # type: ignore[union-attr]
        finally:
            other.execute("ROLLBACK")
            other.close()
        # Nothing of the failed writes was written, and the ledger goes on.
        assert await ledger.settle(kept, 5, None)
        assert (await ledger.spend_report("telegram:2")).all_time == 0
        await ledger.reserve(who("2"), SPEC, 10)
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 2


async def test_a_writer_elsewhere_is_waited_for(db_path: Path, clock: Clock) -> None:
    async with await open_ledger(db_path, clock) as ledger:
        other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        release = asyncio.get_running_loop().call_later(0.3, other.execute, "COMMIT")
        try:
            # Waits under the busy timeout: no "database is locked".
            ids = await asyncio.gather(*(ledger.reserve(who("1"), SPEC, 10) for _ in range(5)))
        finally:
            release.cancel()
            if other.in_transaction:
                other.execute("ROLLBACK")
            other.close()
        assert sorted(ids) == list(range(1, 6))


# --- many processes opening one new file at once ----------------------------------------------

OPENER_CHILD = """
import asyncio, json, os, sys, time
from core.requester import Requester
from core.store import JobSpec, Limits, open_store

URL, GO, NAME, COUNT = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
SPEC = JobSpec("/img a", "gpt-image-2", "1024x1024", "low", 1, 0, "{}")

async def one(i):
    try:
        store = await open_store(URL, Limits(user_daily=100))
        try:
            job_id = await store.reserve(Requester("telegram", f"{NAME}-{i}"), SPEC, 1.0)
            seen = await store.get_job(job_id)
            return {"job": job_id, "seen": seen is not None,
                    "version": await store.schema_version()}
        finally:
            await store.close()
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}

async def main():
    results = await asyncio.gather(*(one(i) for i in range(COUNT)))
    print(json.dumps(results), flush=True)

print("ready", flush=True)
while not os.path.exists(GO):
    time.sleep(0.001)
asyncio.run(main())
"""


async def test_80_concurrent_opens_of_a_new_file_never_find_it_locked(tmp_path: Path) -> None:
    # The first open of a file switches it to WAL, which needs a moment of exclusive access;
    # SQLite answers "database is locked" at once (no busy wait) to anyone else meanwhile.
    path = tmp_path / "data" / "imgbot.db"
    go = tmp_path / "go"
    processes, per_process = 8, 10
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            OPENER_CHILD,
            f"sqlite:///{path}",
            str(go),
            f"p{n}",
            str(per_process),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for n in range(processes)
    ]
    try:
        for child in children:  # every one imported and waiting: then all start at once
            assert child.stdout is not None
            line = await asyncio.wait_for(child.stdout.readline(), 30)
            assert line.strip() == b"ready", line
        assert not path.exists()
        go.touch()
        outputs = await asyncio.wait_for(
            asyncio.gather(*(child.communicate() for child in children)), 60
        )
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()
    results: list[dict[str, Any]] = []
    for child, (out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err.decode()
        results += json.loads(out)
    errors = [r["error"] for r in results if "error" in r]
    assert not [e for e in errors if "locked" in e.lower()], errors
    assert errors == []
    assert len(results) == processes * per_process
    assert all(r["seen"] and r["version"] == LATEST_VERSION for r in results)
    assert len({r["job"] for r in results}) == processes * per_process
    # One set of migrations, every job written once, totals in step.
    with closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        versions = [v for (v,) in raw.execute("SELECT version FROM schema_version")]
        assert raw.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == processes * per_process
    assert versions == [m.version for m in MIGRATIONS]
    await assert_totals_match_jobs(sqlite_target(path))
