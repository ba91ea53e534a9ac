"""The store's contract: one suite, run against both backends (SQLite and PostgreSQL).

Every test here takes the `target` fixture, parametrized over ["sqlite", "postgresql"]: a
fresh SQLite file in tmp_path, or a fresh database on the throwaway PostgreSQL server of
tests/pg_server.py. Tests open stores through `open_store` (`target.open`) and check the
database behind them with raw SQL (`target.fetch`), independently of the store's own sums.
What is about SQLite itself (files, WAL, locks, upgrades of old files) is in
tests/test_sqlite_store.py.
"""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import json
import logging
import math
import os
import random
import re
import sqlite3
import subprocess
import sys
from collections import defaultdict
from collections.abc import Awaitable, Callable
from contextlib import closing, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from core.errors import JobNotFound, LimitExceeded, QueueFull, RateLimited, UserError
from core.messages import text
from core.pricing import Usage
from core.requester import Requester
from core.store import (
    ChatTotal,
    DailyUsage,
    JobSpec,
    JobStage,
    JobStatus,
    Limits,
    OutcomeCount,
    PrepaidSpend,
    PurchaseTotals,
    Spender,
    Store,
    StoreError,
    open_store,
)
from core.store.copy import copy_store
from core.store.export import CSV_COLUMNS
from core.store.keys import key_hash
from core.store.records import iso as iso_of
from core.store.sqlite_schema import LATEST_VERSION
from core.store.web import SESSIONS_PER_USER, FileToKeep, KeptFileInfo, token_hash
from core.types import GeneratedImage
from tests.pg_server import PASSWORD, PgServer, pg_server, pg_url  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[1]
START = datetime(2025, 3, 15, 12, 0, tzinfo=UTC)
SPEC = JobSpec(
    command_text="/img 1:1 high a white cat",
    model="gpt-image-2",
    size="1024x1024",
    quality="high",
    n=1,
    reference_count=0,
    request_json='{"prompt": "a white cat"}',
)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def who(uid: str, chat: str | None = None, *, name: str = "", lang: str | None = None) -> Requester:
    return Requester(
        "telegram",
        uid,
        chat,
        display_name=name or f"user {uid}",
        language=lang,
        is_group=bool(chat),
    )


def postgres_sql(sql: str) -> str:
    """Turn `?` placeholders into PostgreSQL's `$1, $2, …`."""
    numbers = itertools.count(1)
    return re.sub(r"\?", lambda _: f"${next(numbers)}", sql)


@dataclass(frozen=True)
class Target:
    """One backend's fresh database: open stores on it, and read it behind their back."""

    kind: str  # "sqlite" or "postgresql"
    url: str
    path: Path | None = None  # the SQLite file

    async def open(self, clock: Callable[[], datetime], **limits: float) -> Store:
        """Open a store on this database with that clock and `Limits(**limits)`."""
        return await open_store(self.url, Limits(**limits), clock=clock)

    async def fetch(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run a raw SELECT (`?` placeholders) on its own short-lived connection."""
        if self.path is not None:
            with closing(sqlite3.connect(self.path)) as raw:
                return [tuple(row) for row in raw.execute(sql, params)]
        conn = await asyncpg.connect(self.url)
        try:
            return [tuple(row) for row in await conn.fetch(postgres_sql(sql), *params)]
        finally:
            await conn.close()

    async def execute(self, sql: str, *params: Any) -> None:
        """Run one raw write statement (`?` placeholders), committed on its own."""
        if self.path is not None:
            with closing(sqlite3.connect(self.path)) as raw, raw:
                raw.execute(sql, params)
            return
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute(postgres_sql(sql), *params)
        finally:
            await conn.close()


def sqlite_target(path: Path) -> Target:
    return Target("sqlite", f"sqlite:///{path}", path)


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    """A fresh, empty database of each backend."""
    if request.param == "sqlite":
        return sqlite_target(tmp_path / "data" / "imgbot.db")
    server: PgServer = request.getfixturevalue("pg_server")
    return Target("postgresql", server.create_database())


@pytest.fixture
def clock() -> Clock:
    return Clock()


def charged(status: str, estimated: float, actual: float | None) -> float:
    if status in ("reserved", "unsettled"):
        return estimated
    if status == "refunded":
        return 0.0
    return actual or 0.0


def micro_of(cost: float) -> int:
    """Whole micro-credits of a charge, rounded half up as SQLite's ROUND does."""
    return int(cost * 1_000_000 + 0.5)


async def assert_totals_match_jobs(target: Target) -> None:
    """Check the running totals against the jobs, worked out here from the raw rows."""
    totals = {
        (scope, key, period): micro
        for scope, key, period, micro in await target.fetch(
            "SELECT scope, key, period, micro_credits FROM spend_totals"
        )
    }
    rows = await target.fetch(
        "SELECT user_key, chat_key, status, estimated_credits, actual_credits, created_at FROM jobs"
    )
    micro: dict[tuple[str, str, str], int] = defaultdict(int)
    credits: dict[tuple[str, str, str], float] = defaultdict(float)
    jobs: dict[tuple[str, str, str], int] = defaultdict(int)
    for user_key, chat_key, status, estimated, actual, created in rows:
        cost = charged(status, estimated, actual)
        day, month = created[:10], created[:7]
        keys = [("user_daily", user_key, day), ("user_monthly", user_key, month)]
        keys += [("global_daily", "", day)] + ([("chat_daily", chat_key, day)] if chat_key else [])
        for key in keys:
            micro[key] += micro_of(cost)
            credits[key] += cost
            jobs[key] += 1
    for key in set(totals) | set(micro):
        assert totals.get(key, 0) == micro[key], key
        # ...and so within half a micro-credit per job of the float sum of what they cost.
        slack = 0.5e-6 * jobs[key] + 1e-9
        assert totals.get(key, 0) / 1e6 == pytest.approx(credits[key], abs=slack), key


# --- opening --------------------------------------------------------------------------------


async def test_open_migrates_once_and_closes_twice(target: Target, clock: Clock) -> None:
    async with await target.open(clock) as ledger:
        assert ledger.kind == target.kind
        assert await ledger.schema_version() == LATEST_VERSION
        assert PASSWORD not in ledger.describe() and PASSWORD not in repr(ledger)
        await ledger.check_writable()
        assert await ledger.is_empty()
        await ledger.close()
        await ledger.close()
        with pytest.raises(RuntimeError):
            await ledger.get_job(1)
        with pytest.raises(RuntimeError):
            await ledger.reserve(who("1"), SPEC, 1)
    versions = [v for (v,) in await target.fetch("SELECT version FROM schema_version")]
    # Opening again applies nothing twice.
    async with await target.open(clock) as ledger:
        assert await ledger.schema_version() == LATEST_VERSION
    again = [v for (v,) in await target.fetch("SELECT version FROM schema_version")]
    assert sorted(again) == sorted(versions) and len(set(again)) == len(again)
    assert max(again) == LATEST_VERSION


async def test_refuses_a_newer_schema(target: Target, clock: Clock) -> None:
    async with await target.open(clock):
        pass
    await target.execute("INSERT INTO schema_version VALUES (999, 'future', '')")
    with pytest.raises(StoreError, match="newer"):
        await target.open(clock)


# --- reserve, settle, fail ------------------------------------------------------------------


async def test_reserve_records_the_job_and_its_requester(target: Target, clock: Clock) -> None:
    async with await target.open(clock) as ledger:
        job_id = await ledger.reserve(who("7", "-100", name="Ann", lang="en-US"), SPEC, 1234.5)
        job = await ledger.get_job(job_id)
        assert job is not None
        assert job.status is JobStatus.RESERVED
        assert (job.user_key, job.user_id, job.chat_key, job.chat_id) == (
            "telegram:7",
            "7",
            "telegram:-100",
            "-100",
        )
        assert (job.platform, job.display_name, job.command_text) == (
            "telegram",
            "Ann",
            SPEC.command_text,
        )
        assert (job.model, job.size, job.quality, job.n, job.reference_count) == (
            "gpt-image-2",
            "1024x1024",
            "high",
            1,
            0,
        )
        assert json.loads(job.request_json) == {"prompt": "a white cat"}
        assert job.estimated_credits == 1234.5 and job.actual_credits is None
        assert job.created_at == START and job.started_at is None
        assert job.charged == 1234.5
        clock.advance(seconds=3)
        assert await ledger.mark_started(job_id)
        assert (await ledger.get_job(job_id)).started_at == START + timedelta(seconds=3)  # type: ignore[union-attr]
        user = await ledger.get_user("telegram:7")
        assert user is not None
        assert (user.display_name, user.language, user.blocked) == ("Ann", "en-US", False)
        chat = await ledger.get_chat("telegram:-100")
        assert chat is not None and chat.daily_limit is None
        # A later request updates the name; an empty name keeps the known one.
        await ledger.reserve(who("7", name="Ann B."), SPEC, 1)
        await ledger.reserve(Requester("telegram", "7"), SPEC, 1)
        assert (await ledger.get_user("telegram:7")).display_name == "Ann B."  # type: ignore[union-attr]
        assert await ledger.get_job(999) is None
        with pytest.raises(ValueError):
            await ledger.reserve(who("7"), SPEC, -1)
        with pytest.raises(ValueError):
            await ledger.reserve(who("7"), SPEC, float("nan"))


async def test_settle_replaces_the_estimate_with_exact_credits(
    target: Target, clock: Clock
) -> None:
    usage = Usage(text_input_tokens=6, image_output_tokens=272, total_tokens=278)
    async with await target.open(clock, user_daily=5000) as ledger:
        job_id = await ledger.reserve(who("1"), SPEC, 3000)
        assert (await ledger.spend_report("telegram:1")).today == 3000
        clock.advance(seconds=40)
        assert await ledger.settle(job_id, 772.48, usage) is True
        job = await ledger.get_job(job_id)
        assert job is not None
        assert (job.status, job.actual_credits, job.usage) == (JobStatus.SUCCEEDED, 772.48, usage)
        assert job.finished_at == START + timedelta(seconds=40)
        report = await ledger.spend_report("telegram:1")
        assert report.today == pytest.approx(772.48)
        assert report.daily_remaining == pytest.approx(5000 - 772.48)
        # A second settle or a late fail never charges twice nor changes the row.
        assert await ledger.settle(job_id, 9999, None) is False
        assert await ledger.fail(job_id, "timeout") is False
        assert await ledger.mark_started(job_id) is False
        assert await ledger.get_job(job_id) == job
        assert await ledger.settle(424242, 1, None) is False


async def test_a_charge_is_never_above_its_reservation_and_a_miss_is_kept(
    target: Target, clock: Clock
) -> None:
    usage = Usage(text_input_tokens=6, image_output_tokens=9999, total_tokens=10005)
    async with await target.open(clock, user_daily=1000) as ledger:
        over = await ledger.reserve(who("1"), SPEC, 100)
        failed = await ledger.reserve(who("1"), SPEC, 200)
        invalid = await ledger.reserve(who("1"), SPEC, 50)
        exact = await ledger.reserve(who("1"), SPEC, 70)
        clock.advance(seconds=1)
        # The upstream reports 8x the estimate: the reservation is all that is charged.
        assert await ledger.settle(over, 800, usage) is True
        assert await ledger.fail(failed, "moderation", 300.5, usage) is True
        assert await ledger.settle(invalid, 50, None, flag="usage_invalid") is True
        assert await ledger.settle(exact, 70, usage) is True
        jobs = {j: await ledger.get_job(j) for j in (over, failed, invalid, exact)}
        found = {
            j: (job.actual_credits, job.reported_credits, job.usage_flag)
            for j, job in jobs.items()
            if job is not None
        }
        assert found == {
            over: (100, 800, "over_estimate"),
            failed: (200, 300.5, "over_estimate"),
            invalid: (50, None, "usage_invalid"),
            exact: (70, None, None),
        }
        assert (await ledger.spend_report("telegram:1")).today == 420
        flagged = await ledger.flagged_jobs(START)
        assert {job.id for job in flagged} == {over, failed, invalid}
        assert [job.id for job in flagged] == sorted((j.id for j in flagged), reverse=True)
        assert await ledger.flagged_jobs(START + timedelta(days=1)) == []
        rows = list(csv.DictReader(io.StringIO(await ledger.export_csv())))
        by_id = {int(row["id"]): row for row in rows}
        assert (by_id[over]["charged_credits"], by_id[over]["reported_credits"]) == ("100.0", "800.0")
        assert by_id[over]["usage_flag"] == "over_estimate" and by_id[exact]["usage_flag"] == ""
    await assert_totals_match_jobs(target)


async def test_usage_above_the_estimate_from_many_jobs_never_passes_a_limit(
    target: Target, clock: Clock
) -> None:
    async with await target.open(clock, user_daily=1000, global_daily=1500) as ledger:

        async def job(i: int) -> int | None:
            try:
                job_id = await ledger.reserve(who(str(i % 3), "-7"), SPEC, 10)
            except LimitExceeded:
                return None
            await asyncio.sleep(0)
            await ledger.settle(job_id, 80 + i % 7, None)  # 8x and more over the estimate
            return job_id

        granted = [j for j in await asyncio.gather(*(job(i) for i in range(300))) if j]
        assert len(granted) == 150  # the global limit, 1500 / 10, and no more
        assert await ledger.global_spent_today() == pytest.approx(1500)
        for user in ("0", "1", "2"):
            assert (await ledger.spend_report(f"telegram:{user}")).today <= 1000
    await assert_totals_match_jobs(target)
    await assert_totals_within_limits(target, user_daily=1000, global_daily=1500)


async def test_fail_without_usage_costs_nothing_and_with_usage_charges(
    target: Target, clock: Clock
) -> None:
    async with await target.open(clock, user_daily=1000) as ledger:
        first = await ledger.reserve(who("1"), SPEC, 900)
        with pytest.raises(LimitExceeded):
            await ledger.reserve(who("1"), SPEC, 900)
        assert await ledger.fail(first, "unavailable") is True
        job = await ledger.get_job(first)
        assert job is not None
        assert (job.status, job.actual_credits, job.error_code, job.usage, job.charged) == (
            JobStatus.FAILED,
            0,
            "unavailable",
            None,
            0,
        )
        assert (await ledger.spend_report("telegram:1")).today == 0
        # The released room is usable again.
        second = await ledger.reserve(who("1"), SPEC, 900)
        assert await ledger.fail(second, "moderation", 120.0, Usage(text_input_tokens=50)) is True
        assert (await ledger.spend_report("telegram:1")).today == 120
        assert await ledger.fail(second, "again") is False
        assert (await ledger.get_job(second)).error_code == "moderation"  # type: ignore[union-attr]


# --- limits -------------------------------------------------------------------------------


async def test_refusal_names_the_scope_and_what_is_left(target: Target, clock: Clock) -> None:
    limits = dict(user_daily=1000, user_monthly=1500, chat_daily=2000, global_daily=3000)
    async with await target.open(clock, **limits) as ledger:
        await ledger.settle(await ledger.reserve(who("1"), SPEC, 700), 600, None)
        with pytest.raises(LimitExceeded) as info:
            await ledger.reserve(who("1"), SPEC, 500)
        err = info.value
        assert err.key == "limit.user_daily"
        assert err.params == {"scope": "user_daily", "asked": 500, "remaining": 400, "limit": 1000}
        assert "500" in err.user_message("en") and "400" in err.user_message("en")
        assert "400" in err.user_message("zh") and "积分" in err.user_message("zh")
        # Exactly what is left still fits, despite float sums.
        await ledger.settle(await ledger.reserve(who("1"), SPEC, 400), 400, None)

        # Next day the daily room is back, but the month has 500 left.
        clock.advance(days=1)
        with pytest.raises(LimitExceeded) as info:
            await ledger.reserve(who("1"), SPEC, 600)
        assert info.value.params["scope"] == "user_monthly"
        assert info.value.params["remaining"] == pytest.approx(500)

        # The chat fills up from several users.
        for uid in ("2", "3"):
            await ledger.reserve(who(uid, "-5"), SPEC, 900)
        with pytest.raises(LimitExceeded) as info:
            await ledger.reserve(who("4", "-5"), SPEC, 300)
        assert (info.value.key, info.value.params["remaining"]) == ("limit.chat_daily", 200)
        # Outside that chat user 4 may still draw, until the whole bot's budget is spent.
        await ledger.reserve(who("4"), SPEC, 900)
        with pytest.raises(LimitExceeded) as info:
            await ledger.reserve(who("5", "-6"), SPEC, 301)
        assert info.value.params == {
            "scope": "global_daily",
            "asked": 301,
            "remaining": 300,
            "limit": 3000,
        }
        assert await ledger.global_spent_today() == 2700
        # A refusal writes nothing, not even the new user's row.
        assert await ledger.get_user("telegram:5") is None
        assert await ledger.get_chat("telegram:-6") is None


async def test_refusal_reports_the_tightest_limit(target: Target, clock: Clock) -> None:
    async with await target.open(clock, user_daily=5000, global_daily=1000) as ledger:
        await ledger.reserve(who("9"), SPEC, 800)
        with pytest.raises(LimitExceeded) as info:
            await ledger.reserve(who("1"), SPEC, 6000)
        # Both limits are exceeded; what would really fit is the global 200.
        assert (info.value.params["scope"], info.value.params["remaining"]) == ("global_daily", 200)


async def test_day_and_month_are_utc(target: Target) -> None:
    clock = Clock(datetime(2025, 1, 31, 23, 59, tzinfo=UTC))
    async with await target.open(clock, user_daily=1000, user_monthly=1500) as ledger:
        await ledger.settle(await ledger.reserve(who("1"), SPEC, 1000), 1000, None)
        with pytest.raises(LimitExceeded):
            await ledger.reserve(who("1"), SPEC, 1)
        # 07:30 on the 1st in UTC+8 is still 23:30 on the 31st in UTC: the same day.
        clock.now = datetime(2025, 2, 1, 7, 30, tzinfo=timezone(timedelta(hours=8)))
        with pytest.raises(LimitExceeded):
            await ledger.reserve(who("1"), SPEC, 1)
        clock.now = datetime(2025, 2, 1, 0, 1, tzinfo=UTC)
        report = await ledger.spend_report("telegram:1")
        assert (report.today, report.month, report.all_time) == (0, 0, 1000)
        await ledger.settle(await ledger.reserve(who("1"), SPEC, 1000), 1000, None)
        clock.now = datetime(2025, 2, 2, 8, 0, tzinfo=UTC)
        report = await ledger.spend_report("telegram:1")
        assert (report.today, report.month, report.all_time) == (0, 1000, 2000)
        assert report.monthly_remaining == 500
        with pytest.raises(LimitExceeded) as info:
            await ledger.reserve(who("1"), SPEC, 600)
        assert info.value.params["scope"] == "user_monthly"


async def test_overrides_and_defaults(target: Target, clock: Clock) -> None:
    async with await target.open(clock, user_daily=1000, chat_daily=1500) as ledger:
        # Setting limits creates the row of a user never seen.
        await ledger.set_user_limits("telegram:1", 5000, 20000)
        user = await ledger.get_user("telegram:1")
        assert user is not None
        assert (user.platform, user.user_id, user.daily_limit, user.monthly_limit) == (
            "telegram",
            "1",
            5000,
            20000,
        )
        await ledger.reserve(who("1"), SPEC, 3000)
        report = await ledger.spend_report("telegram:1")
        assert (report.daily_limit, report.monthly_limit, report.daily_remaining) == (
            5000,
            20000,
            2000,
        )
        # Back to the default: 3000 already exceeds the default 1000.
        await ledger.set_user_limits("telegram:1", None, None)
        with pytest.raises(LimitExceeded) as info:
            await ledger.reserve(who("1"), SPEC, 1)
        assert info.value.params["limit"] == 1000 and info.value.params["remaining"] == 0
        report = await ledger.spend_report("telegram:1")
        assert (report.daily_limit, report.monthly_limit, report.monthly_remaining) == (
            1000,
            0,
            None,
        )
        # An override of 0 is unlimited, like the defaults.
        await ledger.set_user_limits("telegram:1", 0, None)
        await ledger.reserve(who("1"), SPEC, 50_000)

        await ledger.set_chat_limit("telegram:-7", 10_000)
        await ledger.set_user_limits("telegram:2", 0, None)
        await ledger.reserve(who("2", "-7"), SPEC, 8000)
        await ledger.set_chat_limit("telegram:-7", None)
        with pytest.raises(LimitExceeded) as info:
            await ledger.reserve(who("2", "-7"), SPEC, 1)
        assert info.value.params["scope"] == "chat_daily"
        assert (await ledger.get_chat("telegram:-7")).daily_limit is None  # type: ignore[union-attr]

        with pytest.raises(ValueError):
            await ledger.set_user_limits("no-platform", 1, 1)
        with pytest.raises(ValueError):
            await ledger.set_chat_limit("telegram:-7", -5)


async def test_blocked_flags(target: Target, clock: Clock) -> None:
    async with await target.open(clock) as ledger:
        await ledger.reserve(who("1", "-50"), SPEC, 1)
        assert not await ledger.is_blocked("telegram:1", "telegram:-50")
        await ledger.set_blocked("telegram:1", True)
        assert await ledger.is_blocked("telegram:1", None)
        assert await ledger.is_blocked("telegram:1", "telegram:-50")
        assert not await ledger.is_blocked("telegram:2", "telegram:-50")
        assert (await ledger.get_user("telegram:1")).blocked  # type: ignore[union-attr]
        await ledger.set_blocked("telegram:-50", True)
        assert await ledger.is_blocked("telegram:2", "telegram:-50")
        assert not await ledger.is_blocked("telegram:2", None)
        await ledger.set_blocked("telegram:1", False)
        await ledger.set_blocked("telegram:-50", False)
        assert not await ledger.is_blocked("telegram:1", "telegram:-50")
        # A key never seen is blocked whichever it turns out to be.
        await ledger.set_blocked("discord:42", True)
        assert await ledger.is_blocked("discord:42", None)
        assert await ledger.is_blocked("discord:1", "discord:42")


async def test_a_chosen_language_sticks(target: Target, clock: Clock) -> None:
    async with await target.open(clock) as ledger:
        await ledger.reserve(who("1", lang="en-GB"), SPEC, 1)
        await ledger.set_language("telegram:1", "zh")
        await ledger.reserve(who("1", lang="en-US"), SPEC, 1)
        assert (await ledger.get_user("telegram:1")).language == "zh"  # type: ignore[union-attr]
        await ledger.set_language("telegram:3", "en")
        assert (await ledger.get_user("telegram:3")).language == "en"  # type: ignore[union-attr]
        # A language the platform tells us later fills one we did not know.
        await ledger.reserve(who("4"), SPEC, 1)
        await ledger.reserve(who("4", lang="de"), SPEC, 1)
        assert (await ledger.get_user("telegram:4")).language == "de"  # type: ignore[union-attr]


# --- a process killed mid-job ---------------------------------------------------------------

KILLED_CHILD = """
import asyncio, os, signal, sys
from datetime import datetime
from core.store import JobSpec, Limits, open_store
from core.requester import Requester

async def main():
    now = datetime.fromisoformat(sys.argv[2])
    ledger = await open_store(sys.argv[1], Limits(user_daily=10000), clock=lambda: now)
    spec = JobSpec("/img 4K high x4 a city", "gpt-image-2", "3840x2160", "high", 4, 0, "{}")
    job_id = await ledger.reserve(Requester("telegram", "1", "-9", "Ann"), spec, 8000)
    await ledger.mark_started(job_id)
    print(job_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # dies mid-draw, nothing closed or settled

asyncio.run(main())
"""


async def test_a_killed_workers_job_is_taken_over_once_after_its_lease(
    target: Target, clock: Clock
) -> None:
    child = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", KILLED_CHILD, target.url, START.isoformat()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -9, child.stderr
    job_id = int(child.stdout.strip())

    clock.advance(seconds=20)
    async with await target.open(clock, user_daily=10000) as ledger:
        job = await ledger.get_job(job_id)
        assert job is not None and (job.stage, job.attempts) == (JobStage.DRAWING, 1)
        # Never leased by its dead worker: it counts as leased for a lease from its birth.
        assert await ledger.claim_expired("b", 30, ["telegram"]) == []
        clock.advance(seconds=11)
        assert await ledger.claim_expired("b", 30, ["discord"]) == []  # not b's platform
        [taken] = await ledger.claim_expired("b", 30, ["telegram"])
        # Its attempt is lost (the upstream may have billed it): recorded, never charged;
        # queued again, leased to b, still reserved at its estimate.
        assert (taken.id, taken.stage, taken.lease_owner) == (job_id, JobStage.QUEUED, "b")
        assert taken.lost_credits == 8000 and taken.attempts == 1
        assert taken.status is JobStatus.RESERVED
        assert taken.lease_until == clock.now + timedelta(seconds=30)
        # Nobody else gets it while b's lease runs, however often they ask.
        assert await ledger.claim_expired("c", 30, ["telegram"]) == []
        assert await ledger.renew_leases("c", [job_id], 30) == set()
        assert await ledger.renew_leases("b", [job_id], 30) == {job_id}
        report = await ledger.spend_report("telegram:1")
        assert (report.today, report.daily_remaining) == (8000, 2000)
        with pytest.raises(LimitExceeded) as info:
            await ledger.reserve(who("1"), SPEC, 3000)
        assert info.value.params["remaining"] == 2000

        # b draws it again and settles it: the user pays once, the lost attempt stays.
        assert await ledger.mark_started(job_id)
        again = await ledger.get_job(job_id)
        assert again is not None and (again.stage, again.attempts) == (JobStage.DRAWING, 2)
        assert await ledger.settle(job_id, 500, None)
        assert await ledger.settle(job_id, 100, None) is False
        drawn = await ledger.get_job(job_id)
        assert drawn is not None and drawn.stage is JobStage.DRAWN
        assert (drawn.charged, drawn.lost_credits) == (500, 8000)
        assert await ledger.finish_delivery(job_id, "c", True, ["not-c"]) is False  # not c's
        assert await ledger.finish_delivery(job_id, "b", True, ["AgAD1", "AgAD2"])
        assert await ledger.finish_delivery(job_id, "b", False, ["again"]) is False  # once
        done = await ledger.get_job(job_id)
        assert done is not None and done.stage is JobStage.DELIVERED
        # The delivery's file refs went in the same write; refused writes wrote none.
        assert done.result_refs == ("AgAD1", "AgAD2")
        assert done.delivered_at == clock.now
        assert await ledger.open_jobs() == []
        report = await ledger.spend_report("telegram:1")
        assert (report.today, report.daily_remaining) == (500, 9500)
    await assert_totals_match_jobs(target)


async def test_stages_follow_every_ending_and_released_leases_are_taken_at_once(
    target: Target, clock: Clock
) -> None:
    async with await target.open(clock) as ledger:
        ids = [await ledger.reserve(who("1"), SPEC, 10) for _ in range(5)]
        assert await ledger.renew_leases("a", ids, 30) == set(ids)
        assert [job.id for job in await ledger.open_jobs()] == ids
        await ledger.fail(ids[0], "cancelled")
        await ledger.fail(ids[1], "moderation_blocked")
        await ledger.mark_started(ids[2])
        await ledger.mark_unsettled(ids[2])
        await ledger.mark_started(ids[3])
        stages = [(await ledger.get_job(i)).stage for i in ids]  # type: ignore[union-attr]
        assert stages == [
            JobStage.CANCELLED, JobStage.FAILED, JobStage.FAILED, JobStage.DRAWING,
            JobStage.QUEUED,
        ]
        # Ended jobs are not leased any more; a clean shutdown hands the rest over at once.
        assert await ledger.renew_leases("a", ids, 30) == {ids[3], ids[4]}
        assert await ledger.claim_expired("b", 30, ["telegram"]) == []
        assert await ledger.release_leases("a", ids) == 2
        taken = await ledger.claim_expired("b", 30, ["telegram"], limit=1)
        assert [job.id for job in taken] == [ids[3]]
        assert taken[0].lost_credits == 10 and taken[0].stage is JobStage.QUEUED
        [last] = await ledger.claim_expired("b", 30, ["telegram"])
        assert (last.id, last.lost_credits) == (ids[4], 0)
        # a comes back too late: it holds nothing any more.
        assert await ledger.renew_leases("a", ids, 30) == set()
        # A live worker never takes over its own jobs, nor those it says it works on.
        mine = await ledger.reserve(who("1"), SPEC, 10)
        other = await ledger.reserve(who("1"), SPEC, 10)
        assert await ledger.renew_leases("b", [mine], 30) == {mine}
        assert await ledger.release_leases("b", [mine]) == 1
        clock.advance(seconds=31)
        assert mine not in [j.id for j in await ledger.claim_expired("b", 30, ["telegram"])]
        taken = [j.id for j in await ledger.claim_expired("c", 30, ["telegram"], exclude=[other])]
        assert mine in taken and other not in taken


async def test_a_cancel_request_reaches_the_holder_and_whoever_takes_the_job_over(
    target: Target, clock: Clock
) -> None:
    async with await target.open(clock) as ledger:
        waiting = await ledger.reserve(who("1"), SPEC, 10)
        drawing = await ledger.reserve(who("1", "-100"), SPEC, 10)  # the same user elsewhere
        drawn = await ledger.reserve(who("1"), SPEC, 10)
        others = await ledger.reserve(who("2"), SPEC, 10)
        await ledger.mark_started(drawing)
        await ledger.mark_started(drawn)
        await ledger.settle(drawn, 5, None)
        ids = [waiting, drawing, drawn, others]
        assert await ledger.renew_leases("a", ids, 30) == set(ids)
        assert await ledger.cancel_requested(ids) == set()

        # /cancel on any process asks for the user's queued and drawing jobs, once.
        asked = await ledger.request_cancel("telegram:1")
        assert [(job.id, job.stage) for job in asked] == [
            (waiting, JobStage.QUEUED), (drawing, JobStage.DRAWING)
        ]
        assert {job.cancel_requested_at for job in asked} == {clock.now}
        clock.advance(seconds=1)
        assert await ledger.request_cancel("telegram:1") == []
        first = await ledger.get_job(waiting)
        assert first is not None and first.cancel_requested_at == START
        # The holder reads which of its jobs were asked; an ended job is not any more.
        assert await ledger.cancel_requested([*ids, 10**9, -1]) == {waiting, drawing}
        assert await ledger.fail(waiting, "cancelled")
        assert await ledger.cancel_requested(ids) == {drawing}

        # A job whose holder died keeps its request for whoever takes it over.
        clock.advance(seconds=31)
        taken = await ledger.claim_expired("b", 30, ["telegram"])
        requested = {job.id: job.cancel_requested_at is not None for job in taken}
        assert requested == {drawing: True, drawn: False, others: False}
        assert [job.stage for job in taken if job.id == drawing] == [JobStage.QUEUED]

        # A page job is found again by the handle it was made with.
        page = await ledger.reserve(who("3"), replace(SPEC, source_ref="web:page:h1"), 10)
        found = await ledger.job_by_source("web:page:h1")
        assert found is not None and found.id == page
        assert await ledger.job_by_source("web:page:h2") is None


async def test_two_workers_claiming_at_once_never_share_a_job(
    target: Target, clock: Clock
) -> None:
    async with await target.open(clock) as ledger:
        ids = [await ledger.reserve(who(str(i % 3)), SPEC, 10) for i in range(30)]
        clock.advance(seconds=60)
        claims = await asyncio.gather(
            *(ledger.claim_expired(f"w{i}", 30, ["telegram"], limit=4) for i in range(10))
        )
        claimed = [job.id for batch in claims for job in batch]
        assert sorted(claimed) == sorted(set(claimed))
        assert set(claimed) <= set(ids) and len(claimed) == min(40, len(ids))
        owners = {job.id: job.lease_owner for batch in claims for job in batch}
        for job in await ledger.open_jobs():
            if job.id in owners:
                assert job.lease_owner == owners[job.id]


async def test_mark_unsettled_keeps_the_estimate(target: Target, clock: Clock) -> None:
    async with await target.open(clock) as ledger:
        job_id = await ledger.reserve(who("1"), SPEC, 600)
        assert await ledger.mark_unsettled(job_id) is True
        assert await ledger.mark_unsettled(job_id) is False
        assert await ledger.settle(job_id, 10, None) is False
        assert [job.id for job in await ledger.list_unsettled()] == [job_id]
        assert (await ledger.spend_report("telegram:1")).today == 600
        assert (await ledger.refund(job_id, by="cli:root")).refunded_credits == 600
        assert (await ledger.spend_report("telegram:1")).today == 0


async def test_refund_rules(target: Target, clock: Clock) -> None:
    async with await target.open(clock) as ledger:
        reserved = await ledger.reserve(who("1"), SPEC, 100)
        failed_free = await ledger.reserve(who("1"), SPEC, 100)
        failed_paid = await ledger.reserve(who("1"), SPEC, 100)
        succeeded = await ledger.reserve(who("1"), SPEC, 100)
        await ledger.fail(failed_free, "unavailable")
        await ledger.fail(failed_paid, "moderation", 40, Usage(text_input_tokens=10))
        await ledger.settle(succeeded, 70, None)
        assert (await ledger.spend_report("telegram:1")).today == 100 + 40 + 70
        for job_id in (reserved, failed_free):
            with pytest.raises(UserError) as info:
                await ledger.refund(job_id, by="cli:root")
            assert info.value.key == "refund.not_refundable"
            assert "refund" in info.value.user_message("en").lower()
            assert "退款" in info.value.user_message("zh")
        assert (await ledger.refund(failed_paid, by="cli:root")).refunded_credits == 40
        assert (await ledger.refund(succeeded, by="cli:root")).refunded_credits == 70
        assert (await ledger.spend_report("telegram:1")).today == 100
        with pytest.raises(JobNotFound) as missing:
            await ledger.refund(4040, by="cli:root")
        assert missing.value.params == {"job_id": 4040}
        assert "4040" in missing.value.user_message("en")
        assert "4040" in missing.value.user_message("zh")
        done = text("zh", "refund.done", job_id=4, credits=70.0, user="telegram:1")
        assert "70" in done and "telegram:1" in done


async def test_result_refs(target: Target, clock: Clock) -> None:
    async with await target.open(clock) as ledger:
        job_id = await ledger.reserve(who("1"), SPEC, 1)
        assert (await ledger.get_job(job_id)).result_refs == ()  # type: ignore[union-attr]
        await ledger.set_result_refs(job_id, ["AgAD1", "AgAD2"])
        assert (await ledger.get_job(job_id)).result_refs == ("AgAD1", "AgAD2")  # type: ignore[union-attr]
        with pytest.raises(JobNotFound):
            await ledger.set_result_refs(job_id + 1, ["x"])


# --- reports --------------------------------------------------------------------------------


async def test_reports_and_csv(target: Target, clock: Clock) -> None:
    async with await target.open(clock, user_daily=10_000) as ledger:
        # Last month: must not appear in reports "since the 1st".
        clock.now = datetime(2025, 2, 20, tzinfo=UTC)
        await ledger.settle(await ledger.reserve(who("3", name="Cy"), SPEC, 9000), 9000, None)
        clock.now = START
        usage = Usage(text_input_tokens=6, image_output_tokens=272, total_tokens=278)
        a1 = await ledger.reserve(who("1", "-10", name="Ann"), SPEC, 500)
        await ledger.settle(a1, 300, usage)
        a2 = await ledger.reserve(who("1", name="Ann"), SPEC, 400)  # still reserved
        b1 = await ledger.reserve(who("2", "-10", name="=cmd|' /C calc'!A0"), SPEC, 700)
        await ledger.settle(b1, 650, None)
        b2 = await ledger.reserve(who("2", "-20", name="=cmd|' /C calc'!A0"), SPEC, 900)
        await ledger.fail(b2, "unavailable")
        c1 = await ledger.reserve(who("3", "-20", name="Cy"), SPEC, 200)
        await ledger.settle(c1, 200, None)
        await ledger.refund(c1, by="telegram:99")

        since = datetime(2025, 3, 1, tzinfo=UTC)
        assert await ledger.top_spenders(since) == [
            Spender("telegram:1", "Ann", 700, 2),
            Spender("telegram:2", "=cmd|' /C calc'!A0", 650, 2),
            Spender("telegram:3", "Cy", 0, 1),
        ]
        top = await ledger.top_spenders(since, limit=1)
        assert top == [Spender("telegram:1", "Ann", 700, 2)]
        user_key, name, credits, jobs = top[0]
        assert (user_key, name, credits, jobs) == ("telegram:1", "Ann", 700, 2)
        everyone = await ledger.top_spenders(datetime(2025, 1, 1, tzinfo=UTC))
        assert everyone[0] == Spender("telegram:3", "Cy", 9000, 2)
        assert await ledger.top_spenders(since, until=datetime(2025, 3, 2, tzinfo=UTC)) == []
        assert await ledger.chat_totals(since) == [
            ChatTotal("telegram:-10", 950, 2),
            ChatTotal("telegram:-20", 0, 2),
        ]
        assert await ledger.global_spent_today() == 300 + 400 + 650

        report = await ledger.spend_report("telegram:1")
        assert (report.display_name, report.today, report.month, report.all_time) == (
            "Ann",
            700,
            700,
            700,
        )
        assert [job.id for job in report.last_jobs] == [a2, a1]
        many = await ledger.spend_report("telegram:3")
        assert (many.today, many.month, many.all_time) == (0, 0, 9000)
        nobody = await ledger.spend_report("telegram:404")
        assert (nobody.display_name, nobody.all_time, nobody.daily_remaining) == ("", 0, 10_000)
        assert nobody.last_jobs == ()

        rows = list(csv.reader(io.StringIO(await ledger.export_csv(since))))
        assert tuple(rows[0]) == CSV_COLUMNS
        records = [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]
        assert [int(r["id"]) for r in records] == [a1, a2, b1, b2, c1]
        first = records[0]
        assert (first["status"], first["user_key"], first["chat_key"], first["display_name"]) == (
            "succeeded",
            "telegram:1",
            "telegram:-10",
            "Ann",
        )
        assert (float(first["estimated_credits"]), float(first["actual_credits"])) == (500, 300)
        assert (first["image_output_tokens"], first["total_tokens"]) == ("272", "278")
        assert first["command_text"] == SPEC.command_text
        assert datetime.fromisoformat(first["created_at"]) == START
        assert records[1]["actual_credits"] == "" and float(records[1]["charged_credits"]) == 400
        # A display name that looks like a spreadsheet formula is kept from running as one.
        assert records[2]["display_name"] == "'=cmd|' /C calc'!A0"
        assert (records[3]["status"], records[3]["error_code"]) == ("failed", "unavailable")
        assert (records[4]["status"], records[4]["refunded_by"]) == ("refunded", "telegram:99")
        assert float(records[4]["charged_credits"]) == 0

        only_cy = list(csv.DictReader(io.StringIO(await ledger.export_csv(user_key="telegram:3"))))
        assert [r["status"] for r in only_cy] == ["succeeded", "refunded"]
        empty = await ledger.export_csv(since, user_key="telegram:404")
        assert empty.splitlines() == [",".join(CSV_COLUMNS)]


# --- the dashboard's aggregations ----------------------------------------------------------


async def test_dashboard_aggregations(target: Target, clock: Clock) -> None:
    day1, day2, day3 = (datetime(2025, 3, d, 10, tzinfo=UTC) for d in (10, 11, 12))
    older = replace(SPEC, model="gpt-image-1.5")
    ann, ann_group, bob, cy = who("1", name="Ann"), who("1", "-10"), who("2"), who("3")
    async with await target.open(clock) as ledger:

        async def drawn(requester: Requester, estimate: float, seconds: float, cost: float,
                        usage: Usage | None, *, spec: JobSpec = SPEC, delivered: bool = True,
                        flag: str | None = None) -> int:
            job = await ledger.reserve(requester, spec, estimate)
            await ledger.mark_started(job)
            clock.advance(seconds=seconds)
            await ledger.settle(job, cost, usage, flag=flag)
            await ledger.finish_delivery(job, "worker", delivered)
            return job

        clock.now = day1
        j1 = await drawn(ann_group, 500, 2, 300, Usage(10, 0, 1000, 0, 1010))
        # Usage above the reservation: charged 400, the miss kept; never delivered.
        j2 = await drawn(bob, 400, 5, 450, Usage(20, 300, 2000, 0, 2320), spec=older,
                         delivered=False)
        clock.now = day2
        # A count the upstream gave unreadable (-1) counts nothing.
        j3 = await drawn(ann_group, 600, 10, 600, Usage(-1, 0, 500, 0, 500), flag="usage_invalid")
        j4 = await ledger.reserve(bob, SPEC, 800)
        await ledger.fail(j4, "balance")
        j5 = await ledger.reserve(ann, SPEC, 300)
        await ledger.mark_started(j5)
        clock.advance(seconds=4)
        await ledger.fail(j5, "cancelled")
        j6 = await ledger.reserve(cy, SPEC, 700)  # still queued
        j7 = await drawn(ann, 100, 1, 100, Usage(5, 0, 100, 0, 105))
        await ledger.refund(j7, by="web:operator")
        clock.now = day3
        j8 = await drawn(cy, 50, 3, 50, None)

        since, until = datetime(2025, 3, 10, tzinfo=UTC), datetime(2025, 3, 12, tzinfo=UTC)
        assert await ledger.daily_usage(since, until=until) == [
            DailyUsage("2025-03-10", "gpt-image-1.5", 400, 1, 20, 300, 2000),
            DailyUsage("2025-03-10", "gpt-image-2", 300, 1, 10, 0, 1000),
            DailyUsage("2025-03-11", "gpt-image-2", 600 + 700, 5, 5, 0, 600),
        ]
        assert (await ledger.daily_usage(since))[-1] == DailyUsage(
            "2025-03-12", "gpt-image-2", 50, 1, 0, 0, 0)
        assert await ledger.daily_usage(day3 + timedelta(days=1)) == []

        assert await ledger.outcome_counts(since, until=until) == [
            OutcomeCount("delivered", "succeeded", "", 2, 900),
            OutcomeCount("cancelled", "failed", "cancelled", 1, 0),
            OutcomeCount("delivered", "refunded", "", 1, 0),
            OutcomeCount("failed", "failed", "balance", 1, 0),
            OutcomeCount("queued", "reserved", "", 1, 700),
            OutcomeCount("undelivered", "succeeded", "", 1, 400),
        ]
        assert await ledger.outcome_counts(day2, until=day2 + timedelta(hours=1)) == [
            OutcomeCount("cancelled", "failed", "cancelled", 1, 0),
            OutcomeCount("delivered", "refunded", "", 1, 0),
            OutcomeCount("delivered", "succeeded", "", 1, 600),
            OutcomeCount("failed", "failed", "balance", 1, 0),
            OutcomeCount("queued", "reserved", "", 1, 700),
        ]

        # Drawn: 2, 5, 10 and 1 s (the refunded job was drawn too); the cancelled one was not.
        times = await ledger.draw_time_quantiles(since, [0.5, 0.95, 1.0], until=until)
        assert times == [pytest.approx(2, abs=1e-3), pytest.approx(10, abs=1e-3),
                         pytest.approx(10, abs=1e-3)]
        assert await ledger.draw_time_quantiles(since, [0.5]) == [pytest.approx(3, abs=1e-3)]
        assert await ledger.draw_time_quantiles(day3 + timedelta(days=1), [0.5, 0.95]) == [
            None, None]
        with pytest.raises(ValueError):
            await ledger.draw_time_quantiles(since, [0])

        anns = await ledger.list_jobs(since, user_key="telegram:1")
        assert [job.id for job in anns] == [j7, j5, j3, j1]
        assert [j.id for j in await ledger.list_jobs(since, until=day2, user_key="telegram:1")
                ] == [j1]
        assert [j.id for j in await ledger.list_jobs(since, chat_key="telegram:-10")] == [j3, j1]
        assert [j.id for j in await ledger.list_jobs(since, limit=3)] == [j8, j7, j6]
        assert await ledger.list_jobs(since, user_key="telegram:404") == []
        assert anns[0].status is JobStatus.REFUNDED and anns[0].refunded_by == "web:operator"

        [undelivered] = await ledger.list_undelivered()
        assert (undelivered.id, undelivered.reported_credits) == (j2, 450)
        await ledger.refund(j2, by="telegram:99")
        assert await ledger.list_undelivered() == []
        assert j4 and j6 and j8  # every job above is counted where it belongs

        assert await ledger.users_with_overrides() == []
        assert await ledger.chats_with_overrides() == []
        await ledger.set_user_limits("telegram:2", 100, None)
        await ledger.set_blocked("telegram:3", True)
        await ledger.set_chat_limit("telegram:-10", 50)
        await ledger.set_blocked("telegram:-99", True)  # never seen: blocked as both
        await ledger.set_user_limits("telegram:1", None, None)  # back to the defaults
        users = await ledger.users_with_overrides()
        assert [(u.user_key, u.daily_limit, u.monthly_limit, u.blocked) for u in users] == [
            ("telegram:-99", None, None, True),
            ("telegram:2", 100, None, False),
            ("telegram:3", None, None, True),
        ]
        chats = await ledger.chats_with_overrides()
        assert [(c.chat_key, c.daily_limit, c.blocked) for c in chats] == [
            ("telegram:-10", 50, False),
            ("telegram:-99", None, True),
        ]


# --- concurrency ----------------------------------------------------------------------------


async def test_concurrent_reservations_never_overspend(target: Target, clock: Clock) -> None:
    limits = dict(user_daily=3000, user_monthly=6000, chat_daily=9000, global_daily=36_000)
    overrides_user = {"telegram:0": 1000, "telegram:19": 8000}
    overrides_chat = {"telegram:-1": 4000}
    users = [str(i) for i in range(20)]
    chats = ["-0", "-1", "-2", "-3"]

    # Earlier this month half the users spent 4000 already: their monthly limit binds first.
    clock.now = START - timedelta(days=10)
    # Two stores on one database: two connections (SQLite), two pools (PostgreSQL).
    first = await target.open(clock, **limits)
    second = await target.open(clock, **limits)
    try:
        for _ in range(2):
            for uid in users[:10]:
                await first.settle(await first.reserve(who(uid), SPEC, 2000), 2000, None)
            clock.advance(days=1)
        clock.now = START
        for key, daily in overrides_user.items():
            await first.set_user_limits(key, daily, None)
        for key, daily in overrides_chat.items():
            await second.set_chat_limit(key, daily)

        rng = random.Random(20250315)
        refusals: dict[str, int] = defaultdict(int)
        granted: list[int] = []

        async def one_request(i: int) -> None:
            ledger = (first, second)[i % 2]
            uid = users[i % len(users)]
            chat = rng.choice([*chats, None])
            estimate = float(rng.randrange(200, 1600))
            action = rng.choice(["settle", "settle", "fail", "fail_paid", "keep"])
            await asyncio.sleep(0)
            try:
                job_id = await ledger.reserve(who(uid, chat), SPEC, estimate)
            except LimitExceeded as err:
                refusals[err.params["scope"]] += 1
                assert 0 <= err.params["remaining"] < estimate
                assert err.params["asked"] == estimate
                return
            granted.append(job_id)
            await asyncio.sleep(0)
            other = (first, second)[(i + 1) % 2]  # settle through the other connection at times
            if action == "settle":
                assert await other.settle(job_id, estimate * 0.6, Usage(image_output_tokens=272))
            elif action == "fail":
                assert await ledger.fail(job_id, "unavailable")
            elif action == "fail_paid":
                assert await ledger.fail(job_id, "moderation", estimate * 0.25)
            report = await ledger.spend_report(f"telegram:{uid}")
            daily = overrides_user.get(f"telegram:{uid}", limits["user_daily"])
            assert report.today <= daily + 1e-6
            assert report.month <= limits["user_monthly"] + 1e-6

        await asyncio.gather(*(one_request(i) for i in range(200)))
    finally:
        await first.close()
        await second.close()

    # Check from the raw rows, independently of the ledger's own sums.
    rows = await target.fetch(
        "SELECT user_key, chat_key, status, estimated_credits, actual_credits, created_at FROM jobs"
    )
    day: dict[str, float] = defaultdict(float)
    month: dict[str, float] = defaultdict(float)
    chat_day: dict[str, float] = defaultdict(float)
    total_day = 0.0
    for user_key, chat_key, status, estimated, actual, created in rows:
        cost = charged(status, estimated, actual)
        month[user_key] += cost
        if datetime.fromisoformat(created) >= START.replace(hour=0):
            day[user_key] += cost
            total_day += cost
            if chat_key:
                chat_day[chat_key] += cost
    for user_key, spent in day.items():
        assert spent <= overrides_user.get(user_key, limits["user_daily"]) + 1e-6, user_key
    for user_key, spent in month.items():
        assert spent <= limits["user_monthly"] + 1e-6, user_key
    for chat_key, spent in chat_day.items():
        assert spent <= overrides_chat.get(chat_key, limits["chat_daily"]) + 1e-6, chat_key
    assert total_day <= limits["global_daily"] + 1e-6
    assert len(rows) == 20 + len(granted)
    assert len(granted) + sum(refusals.values()) == 200
    # The load really pressed on every kind of limit.
    assert set(refusals) == {"user_daily", "user_monthly", "chat_daily", "global_daily"}
    await assert_totals_match_jobs(target)


async def test_cancelled_calls_leave_the_ledger_usable(target: Target, clock: Clock) -> None:
    tasks = []
    async with await target.open(clock) as ledger:
        for steps in range(12):
            task = asyncio.create_task(ledger.reserve(who("1"), SPEC, 10))
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            tasks.append(task)
            job_id = await ledger.reserve(who("2"), SPEC, 10)
            assert await ledger.settle(job_id, 5, None)
        assert (await ledger.spend_report("telegram:2")).today == 12 * 5
        # A settle whose caller is cancelled still runs to its end.
        settled = await ledger.reserve(who("3"), SPEC, 10)
        settle = asyncio.create_task(ledger.settle(settled, 7, None))
        await asyncio.sleep(0)
        settle.cancel()
        await asyncio.gather(settle, return_exceptions=True)
    # A reservation whose caller was cancelled mid-call is released, not left counted until
    # the next start-up; one whose caller got its id stays reserved.
    kept = {task.result() for task in tasks if not task.cancelled()}
    rows = await target.fetch(
        "SELECT id, status, error_code, charged FROM jobs WHERE user_key = 'telegram:1'"
    )
    assert {job_id for job_id, status, _, _ in rows if status == "reserved"} == kept
    released = [row[1:] for row in rows if row[0] not in kept]
    assert released and set(released) == {("failed", "cancelled", 0)}
    assert await target.fetch("SELECT status, charged FROM jobs WHERE id = ?", settled) == [
        ("succeeded", 7)
    ]
    await assert_totals_match_jobs(target)


# --- running totals -------------------------------------------------------------------------

TOTALS_LIMITS = {
    "user_daily": 1200.0,
    "user_monthly": 6000.0,
    "chat_daily": 1500.0,
    "global_daily": 3000.0,
}


async def assert_totals_within_limits(target: Target, **limits: float) -> None:
    """Check every running total against its limit (TOTALS_LIMITS unless given)."""
    ceilings = {**TOTALS_LIMITS, **limits} if limits else TOTALS_LIMITS
    for scope, key, micro in await target.fetch(
        "SELECT scope, key, micro_credits FROM spend_totals"
    ):
        if ceilings.get(scope):
            assert micro / 1e6 <= ceilings[scope] + 1e-6, (scope, key)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_running_totals_always_equal_the_sum_of_jobs(target: Target, seed: int) -> None:
    rng = random.Random(seed)
    # Over the end of January, then of February: days and months roll over under the walk.
    clock = Clock(datetime(2025, 1, 30, 21, 0, tzinfo=UTC))
    users = [str(i) for i in range(5)]
    chats = ["-1", "-2", None]
    ids: list[int] = []
    refusals: set[str] = set()
    kinds = ["reserve", "settle", "fail", "fail_paid", "start", "unsettle", "refund", "claim"]
    weights = [6, 3, 2, 1, 1, 1, 1, 0.3]

    async with await target.open(clock, **TOTALS_LIMITS) as ledger:

        def plan(kind: str) -> Callable[[], Awaitable[None]]:
            """Draw one operation's random choices now, so a burst stays reproducible."""
            user, chat = rng.choice(users), rng.choice(chats)
            estimate = round(rng.uniform(0.5, 900), rng.choice([0, 2, 7]))
            job_id = rng.choice(ids) if ids else 0
            share = rng.random()  # of the estimate, for what an answer costs

            async def run() -> None:
                if kind == "reserve":
                    try:
                        ids.append(await ledger.reserve(who(user, chat), SPEC, estimate))
                    except LimitExceeded as err:
                        refusals.add(err.params["scope"])
                        assert err.params["remaining"] < estimate
                elif kind in ("settle", "fail_paid"):
                    job = await ledger.get_job(job_id)
                    if job is not None and kind == "settle":
                        await ledger.settle(job_id, job.estimated_credits * share, None)
                    elif job is not None:
                        await ledger.fail(job_id, "moderation", job.estimated_credits * share)
                elif kind == "fail":
                    await ledger.fail(job_id, "unavailable")
                elif kind == "start":
                    await ledger.mark_started(job_id)
                elif kind == "unsettle":
                    await ledger.mark_unsettled(job_id)
                elif kind == "refund":
                    with suppress(UserError):
                        await ledger.refund(job_id, by="telegram:admin")
                else:
                    await ledger.claim_expired("other", 3600, ["telegram"])

            return run

        for step in range(300):
            if step == 150:
                clock.now = datetime(2025, 2, 27, 20, 0, tzinfo=UTC)
            clock.advance(minutes=rng.choice([1, 5, 30, 90, 240]))
            if rng.random() < 0.1:
                # Several at once: batched together (SQLite), on several connections (PostgreSQL).
                burst = [plan(rng.choices(kinds, weights)[0]) for _ in range(8)]
                await asyncio.gather(*(run() for run in burst))
            else:
                await plan(rng.choices(kinds, weights)[0])()
            if step % 25 == 0:
                await assert_totals_match_jobs(target)
                await assert_totals_within_limits(target)
        # One job left waiting, whatever the walk's order resolved (a fresh day has room).
        clock.advance(days=1)
        await ledger.reserve(who("late", "-1"), SPEC, 1.5)
        await assert_totals_match_jobs(target)
        await assert_totals_within_limits(target)
        # The ledger's own answers agree with the totals too.
        today = clock.now.date().isoformat()
        row = await target.fetch(
            "SELECT micro_credits FROM spend_totals WHERE scope = 'global_daily' AND period = ?",
            today,
        )
        statuses = {status for (status,) in await target.fetch("SELECT DISTINCT status FROM jobs")}
        periods = {period for (period,) in await target.fetch("SELECT period FROM spend_totals")}
        assert await ledger.global_spent_today() == (row[0][0] / 1e6 if row else 0)
    # The walk went everywhere: every status, refusals by three limits, both month ends.
    assert statuses == {status.value for status in JobStatus}
    assert {"2025-01", "2025-02", "2025-03", "2025-01-31", "2025-02-01"} <= periods
    assert refusals >= {"user_daily", "chat_daily", "global_daily"}


def awkward_cost(rng: random.Random) -> float:
    """A cost whose float and micro-credit forms disagree: most round down to the micro."""
    pick = rng.random()
    if pick < 0.1:
        return rng.choice([0.1, 0.2, 0.3, 1 / 3, 2 / 3, 1e-7, 5e-7, 123.4567895, 0.0000015])
    # A whole number of micro-credits plus a third to a half of one: rounded down.
    return (rng.randrange(1, 50_000_000) + rng.choice([0.3, 1 / 3, 0.4, 0.45, 0.499])) / 1e6


async def test_totals_are_exact_over_10000_jobs(
    target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    # aiosqlite logs two DEBUG records per statement from its thread; at the level
    # production gives it (bots/logs.py) 20,000 calls take seconds instead of half a minute.
    caplog.set_level(logging.WARNING, logger="aiosqlite")
    rng = random.Random(10_000)
    # Two days at the end of January, two at the start of February.
    days = [datetime(2025, 1, d, 10, tzinfo=UTC) for d in (30, 31)]
    days += [datetime(2025, 2, d, 10, tzinfo=UTC) for d in (1, 2)]
    clock = Clock(days[0])
    users = [str(i) for i in range(20)]
    chats = ["-1", "-2", "-3", None]
    # Limits that are checked on every reservation but never bind.
    limits = dict(user_daily=1e6, user_monthly=1e7, chat_daily=1e7, global_daily=1e8)
    costs: dict[int, float] = {}
    owner: dict[int, tuple[str, str | None, str]] = {}

    async with await target.open(clock, **limits) as ledger:

        async def one(user: str, chat: str | None, cost: float, paid_failure: bool) -> None:
            job_id = await ledger.reserve(who(user, chat), SPEC, cost * 1.5)
            if paid_failure:
                assert await ledger.fail(job_id, "moderation", cost)
            else:
                assert await ledger.settle(job_id, cost, None)
            costs[job_id] = cost
            owner[job_id] = (f"telegram:{user}", chat and f"telegram:{chat}", clock.now.isoformat())

        for day in days:
            clock.now = day
            for _ in range(25):  # 100 at a time, 2,500 a day
                await asyncio.gather(
                    *(
                        one(rng.choice(users), rng.choice(chats), awkward_cost(rng), i % 10 == 0)
                        for i in range(100)
                    )
                )
        assert len(costs) == 10_000

        # Every charge is stored as the very float it was settled at.
        rows = await target.fetch("SELECT id, status, actual_credits, charged FROM jobs")
        assert len(rows) == 10_000
        for job_id, status, actual, charge in rows:
            assert status in ("succeeded", "failed")
            assert actual == costs[job_id] and charge == costs[job_id], job_id
        # Totals are exact sums of whole micro-credits, per scope, key and period.
        await assert_totals_match_jobs(target)
        expected: dict[tuple[str, str, str], int] = defaultdict(int)
        for job_id, cost in costs.items():
            user_key, chat_key, created = owner[job_id]
            for key in [
                ("user_daily", user_key, created[:10]),
                ("user_monthly", user_key, created[:7]),
                ("global_daily", "", created[:10]),
                *([("chat_daily", chat_key, created[:10])] if chat_key else []),
            ]:
                expected[key] += micro_of(cost)
        totals = {
            (scope, key, period): micro
            for scope, key, period, micro in await target.fetch(
                "SELECT scope, key, period, micro_credits FROM spend_totals"
            )
        }
        assert totals == expected
        assert sum(micro for (scope, _, _), micro in totals.items() if scope == "global_daily") == (
            sum(micro_of(cost) for cost in costs.values())
        )

        # Reports are float sums over the jobs themselves, not the rounded totals: with the
        # costs chosen above the two differ by far more than a float sum's error.
        everything = math.fsum(costs.values())
        rounded = sum(micro_of(cost) for cost in costs.values()) / 1e6
        assert abs(everything - rounded) > 1e-3
        clock.now = days[-1]
        today, month = days[-1].date().isoformat(), "2025-02"
        by_user: dict[str, list[float]] = defaultdict(list)
        by_user_today: dict[str, list[float]] = defaultdict(list)
        by_user_month: dict[str, list[float]] = defaultdict(list)
        by_chat: dict[str, list[float]] = defaultdict(list)
        for job_id, cost in costs.items():
            user_key, chat_key, created = owner[job_id]
            by_user[user_key].append(cost)
            if created[:10] == today:
                by_user_today[user_key].append(cost)
            if created[:7] == month:
                by_user_month[user_key].append(cost)
            if chat_key:
                by_chat[chat_key].append(cost)

        def exactly(values: list[float]) -> Any:
            # A float sum in any order is within n ulps of the exact one.
            return pytest.approx(math.fsum(values), rel=1e-12, abs=0)

        assert await ledger.global_spent_today() == expected[("global_daily", "", today)] / 1e6
        for user in users:
            key = f"telegram:{user}"
            report = await ledger.spend_report(key)
            assert report.today == exactly(by_user_today[key]), key
            assert report.month == exactly(by_user_month[key]), key
            assert report.all_time == exactly(by_user[key]), key
        since = datetime(2025, 1, 1, tzinfo=UTC)
        spenders = await ledger.top_spenders(since, limit=100)
        assert {s.user_key: s.jobs for s in spenders} == {k: len(v) for k, v in by_user.items()}
        for spender in spenders:
            assert spender.credits == exactly(by_user[spender.user_key]), spender
        chat_totals = await ledger.chat_totals(since)
        assert {t.chat_key: t.jobs for t in chat_totals} == {k: len(v) for k, v in by_chat.items()}
        for total in chat_totals:
            assert total.credits == exactly(by_chat[total.chat_key]), total
        exported = list(csv.DictReader(io.StringIO(await ledger.export_csv())))
        assert {int(r["id"]): float(r["charged_credits"]) for r in exported} == costs


async def test_a_jobs_owner_and_day_never_change(target: Target, clock: Clock) -> None:
    async with await target.open(clock) as ledger:
        job_id = await ledger.reserve(who("1", "-5"), SPEC, 100)
        await ledger.reserve(who("1", "-5"), SPEC, 50)
    select = "SELECT user_key, chat_key, created_at, charged FROM jobs WHERE id = ?"
    before = await target.fetch(select, job_id)
    totals = await target.fetch("SELECT * FROM spend_totals ORDER BY scope, key, period")
    for column, value in [
        ("created_at", "2020-01-01"),
        ("user_key", "telegram:2"),
        ("chat_key", "telegram:-6"),
        ("chat_key", None),
    ]:
        # The database itself refuses (a trigger), whoever writes: SQLite raises
        # IntegrityError; on PostgreSQL the error's class is the driver's.
        with pytest.raises(Exception, match="never change") as info:
            await target.execute(f"UPDATE jobs SET {column} = ? WHERE id = ?", value, job_id)  # noqa: S608
        if target.kind == "sqlite":
            assert isinstance(info.value, sqlite3.IntegrityError)
        # ...and nothing changed.
        assert await target.fetch(select, job_id) == before
        assert await target.fetch("SELECT * FROM spend_totals ORDER BY scope, key, period") == (
            totals
        )
    # Other changes are fine, and deleting a job (by hand) takes it out of the totals.
    await target.execute("UPDATE jobs SET command_text = 'x' WHERE id = ?", job_id)
    await target.execute("DELETE FROM jobs WHERE id = ?", job_id)
    await assert_totals_match_jobs(target)
    async with await target.open(clock) as ledger:
        assert (await ledger.spend_report("telegram:1")).today == 50
        assert await ledger.global_spent_today() == 50


async def test_refusals_and_grants_in_one_burst(target: Target, clock: Clock) -> None:
    async with await target.open(clock, user_daily=1000) as ledger:
        # 40 at once: batched together (SQLite), or racing on several connections
        # (PostgreSQL); each refusal is undone alone, and every grant counts for the next check.
        outcomes = await asyncio.gather(
            *(ledger.reserve(who("1", "-1"), SPEC, 100) for _ in range(40)),
            ledger.refund(999, by="cli:root"),
            ledger.reserve(who("2", "-1"), SPEC, 100),
            return_exceptions=True,
        )
        granted = [o for o in outcomes[:40] if isinstance(o, int)]
        refused = [o for o in outcomes[:40] if isinstance(o, LimitExceeded)]
        assert (len(granted), len(refused)) == (10, 30)
        assert all(err.params["remaining"] == 0 for err in refused)
        assert isinstance(outcomes[40], JobNotFound)
        assert isinstance(outcomes[41], int)
        assert (await ledger.spend_report("telegram:1")).today == 1000
        # The refusals wrote nothing: no job, and no row for a chat seen only in a refusal.
        with pytest.raises(LimitExceeded):
            await ledger.reserve(who("1", "-404"), SPEC, 1)
        assert await ledger.get_chat("telegram:-404") is None
    assert (await target.fetch("SELECT COUNT(*) FROM jobs"))[0][0] == 11
    await assert_totals_match_jobs(target)


async def test_close_waits_for_calls_already_made(target: Target, clock: Clock) -> None:
    ledger = await target.open(clock)
    tasks = [asyncio.create_task(ledger.reserve(who("1"), SPEC, 10)) for _ in range(20)]
    await asyncio.sleep(0)  # every call has been made
    await ledger.close()
    assert sorted(await asyncio.gather(*tasks)) == list(range(1, 21))
    with pytest.raises(RuntimeError, match="closed"):
        await ledger.reserve(who("1"), SPEC, 10)
    assert (await target.fetch("SELECT COUNT(*) FROM jobs WHERE status = 'reserved'")) == [(20,)]


async def test_one_source_message_makes_one_job(target: Target, clock: Clock) -> None:
    from dataclasses import replace

    from core.errors import DuplicateJob

    spec = replace(SPEC, source_ref="telegram:-100:42")
    async with await target.open(clock, user_daily=10000) as ledger:
        first = await ledger.reserve(who("1"), spec, 100)
        with pytest.raises(DuplicateJob) as info:
            await ledger.reserve(who("1"), spec, 100)
        assert info.value.params["job_id"] == first and info.value.params["silent"]
        other = await ledger.reserve(who("1"), replace(SPEC, source_ref="telegram:-100:43"), 100)
        assert other == first + 1
        await ledger.reserve(who("1"), SPEC, 100)  # no source: never a duplicate
        await ledger.reserve(who("1"), SPEC, 100)
        assert (await ledger.spend_report("telegram:1")).today == pytest.approx(400)
        assert (await ledger.get_job(first)).source_ref == "telegram:-100:42"  # type: ignore[union-attr]
        # The same message arriving twice at once still makes one job.
        twice = replace(SPEC, source_ref="telegram:-100:44")
        outcomes = await asyncio.gather(
            *(ledger.reserve(who("1"), twice, 100) for _ in range(5)), return_exceptions=True
        )
        made = [o for o in outcomes if isinstance(o, int)]
        assert len(made) == 1, outcomes
        assert all(
            isinstance(o, DuplicateJob) and o.params["job_id"] == made[0]
            for o in outcomes
            if not isinstance(o, int)
        ), outcomes
    assert (await target.fetch("SELECT COUNT(*) FROM jobs")) == [(5,)]


# --- replicas: marks, named leases, the user's room (issue 14) ---------------------------


async def test_a_mark_is_won_once_until_it_expires(target: Target, clock: Clock) -> None:
    async with await target.open(clock) as ledger:
        wins = await asyncio.gather(*(ledger.mark_once("tg:update:7", 60) for _ in range(20)))
        assert wins.count(True) == 1
        assert await ledger.mark_once("tg:update:8", 60)
        clock.advance(seconds=61)
        assert await ledger.mark_once("tg:update:7", 60)  # expired: a new mark
        assert await ledger.prune_expired() == 1  # update 8's
        assert not await ledger.mark_once("tg:update:7", 60)


async def test_a_named_lease_has_one_live_holder(target: Target, clock: Clock) -> None:
    async with await target.open(clock) as ledger:
        assert await ledger.hold_lease("telegram:poller", "a", 30, "polling")
        assert not await ledger.hold_lease("telegram:poller", "b", 30)
        assert await ledger.hold_lease("telegram:poller", "a", 30, "polling")  # renewed
        clock.advance(seconds=31)
        assert await ledger.hold_lease("telegram:poller", "b", 30, "polling")  # a is gone
        assert not await ledger.hold_lease("telegram:poller", "a", 30)
        await ledger.drop_lease("telegram:poller", "a")  # not a's: nothing happens
        [lease] = await ledger.leases("telegram:")
        assert (lease.owner, lease.info) == ("b", "polling")
        assert lease.until == clock.now + timedelta(seconds=30)
        await ledger.drop_lease("telegram:poller", "b")
        assert await ledger.leases("telegram:") == []
        assert await ledger.hold_lease("telegram:poller", "a", 30)


async def test_the_users_queue_and_minute_are_checked_with_the_reservation(
    target: Target, clock: Clock
) -> None:
    async with await target.open(clock) as ledger:
        roomy = replace(SPEC, max_open=3)
        # 10 at once from one user (as from three replicas): only 3 get a place.
        outcomes = await asyncio.gather(
            *(ledger.reserve(who("1"), roomy, 10) for _ in range(10)), return_exceptions=True
        )
        ids = [o for o in outcomes if isinstance(o, int)]
        refused = [o for o in outcomes if not isinstance(o, int)]
        assert len(ids) == 3 and all(isinstance(o, QueueFull) for o in refused)
        assert refused[0].params["waiting"] == 3
        assert isinstance(await ledger.reserve(who("2"), roomy, 10), int)  # others unaffected
        await ledger.fail(ids[0], "moderation_blocked")  # an ended job frees its place
        ids.append(await ledger.reserve(who("1"), roomy, 10))
        # Per minute: the jobs started in the last 60 s, ended or not.
        clock.advance(seconds=30)
        quick = replace(SPEC, per_minute=5)
        assert isinstance(await ledger.reserve(who("1"), quick, 10), int)  # the 5th this minute
        with pytest.raises(RateLimited) as info:
            await ledger.reserve(who("1"), quick, 10)
        assert info.value.params["per_minute"] == 5 and info.value.params["seconds"] == 30
        clock.advance(seconds=31)
        assert isinstance(await ledger.reserve(who("1"), quick, 10), int)
    await assert_totals_match_jobs(target)
# --- prepaid credits (BILLING=prepaid) -----------------------------------------------------

PREPAID = JobSpec(**{**SPEC.__dict__, "prepaid": True})


async def assert_balances_match(target: Target) -> dict[str, int]:
    """Check every balance against its credit entries and prepaid jobs, from the raw rows;
    none is below zero. Return the balances in micro-credits."""
    kept = dict(await target.fetch("SELECT user_key, micro_credits FROM balances"))
    worked: dict[str, int] = defaultdict(int)
    for user_key, micro in await target.fetch("SELECT user_key, micro_credits FROM credit_entries"):
        worked[user_key] += micro
    for user_key, status, estimated, actual in await target.fetch(
        "SELECT user_key, status, estimated_credits, actual_credits FROM jobs WHERE prepaid = 1"
    ):
        worked[user_key] -= micro_of(charged(status, estimated, actual))
    for user_key in set(kept) | set(worked):
        assert kept.get(user_key, 0) == worked[user_key], user_key
        assert worked[user_key] >= 0, user_key
    return kept


async def test_a_prepaid_job_reserves_from_the_balance_and_settles_as_any(
    target: Target, clock: Clock
) -> None:
    ledger = await target.open(clock, user_daily=900)
    try:
        # No credits: refused on the balance, which names what is left.
        with pytest.raises(LimitExceeded) as info:
            await ledger.reserve(who("1"), PREPAID, 100)
        assert info.value.params == {
            "scope": "balance", "asked": 100.0, "remaining": 0.0, "limit": 0.0
        }
        assert info.value.key == "limit.balance"
        assert await ledger.grant_welcome("telegram:1", 500)
        assert not await ledger.grant_welcome("telegram:1", 500)  # once ever
        assert await ledger.balance("telegram:1") == 500
        job = await ledger.reserve(who("1"), PREPAID, 300)
        assert await ledger.balance("telegram:1") == 200  # the reservation is taken off
        with pytest.raises(LimitExceeded) as info:
            await ledger.reserve(who("1"), PREPAID, 250)
        assert info.value.params["scope"] == "balance" and info.value.params["remaining"] == 200
        # Settled below the estimate: the rest comes back; above: never more than reserved.
        assert await ledger.settle(job, 120.5, None)
        assert await ledger.balance("telegram:1") == 379.5
        other = await ledger.reserve(who("1"), PREPAID, 300)
        assert await ledger.settle(other, 9999, None)
        assert await ledger.balance("telegram:1") == pytest.approx(79.5)
        # A failure releases; a refund gives the charge back.
        third = await ledger.reserve(who("1"), PREPAID, 79.5)
        assert await ledger.balance("telegram:1") == 0
        assert await ledger.fail(third, "unavailable")
        assert await ledger.balance("telegram:1") == pytest.approx(79.5)
        await ledger.refund(other, by="telegram:42")
        assert await ledger.balance("telegram:1") == pytest.approx(379.5)
        # Caps still apply on top: 120.5 of the user's 900 a day are used.
        assert await ledger.grant_credits("telegram:1", 10_000, by="telegram:42") == 10_379.5
        with pytest.raises(LimitExceeded) as info:
            await ledger.reserve(who("1"), PREPAID, 800)
        assert info.value.params["scope"] == "user_daily"
        assert info.value.params["remaining"] == 779.5
        # A job of the limits mode never touches a balance.
        free = await ledger.reserve(who("1"), SPEC, 100)
        await ledger.settle(free, 100, None)
        assert await ledger.balance("telegram:1") == 10_379.5
        # Revoking takes what is there and never more; open reservations are not free.
        open_job = await ledger.reserve(who("1"), PREPAID, 379.5)
        assert await ledger.revoke_credits("telegram:1", 4000, by="telegram:42") == (4000, 6000)
        assert await ledger.revoke_credits("telegram:1", None, by="telegram:42") == (6000, 0)
        assert await ledger.revoke_credits("telegram:1", 5, by="telegram:42") == (0, 0)
        assert await ledger.revoke_credits("telegram:9", None, by="telegram:42") == (0, 0)
        assert await ledger.fail(open_job, "cancelled")
        assert await ledger.balance("telegram:1") == 379.5
        for bad in (0, -1, math.inf, math.nan):
            with pytest.raises(ValueError):
                await ledger.grant_credits("telegram:1", bad, by="x")
        # How a job is paid never changes behind the ledger's back.
        with pytest.raises((sqlite3.IntegrityError, asyncpg.PostgresError)):
            await target.execute("UPDATE jobs SET prepaid = 0 WHERE id = ?", job)
    finally:
        await ledger.close()
    await assert_balances_match(target)
    await assert_totals_match_jobs(target)


async def test_100_concurrent_prepaid_jobs_never_take_a_balance_below_zero(
    target: Target, clock: Clock
) -> None:
    # Two stores on one database (two processes, as far as the database can tell).
    first = await target.open(clock, global_daily=60_000)
    second = await target.open(clock, global_daily=60_000)
    users = [str(i) for i in range(5)]
    try:
        for uid in users:
            await first.grant_credits(f"telegram:{uid}", 4000, by="telegram:42")
        rng = random.Random(16)
        refusals: dict[str, int] = defaultdict(int)
        granted: list[int] = []

        async def one_job(i: int) -> None:
            ledger = (first, second)[i % 2]
            uid = users[i % len(users)]
            estimate = float(rng.randrange(300, 1500))
            action = rng.choice(["settle", "settle_over", "fail", "keep"])
            await asyncio.sleep(0)
            try:
                job_id = await ledger.reserve(who(uid), PREPAID, estimate)
            except LimitExceeded as err:
                refusals[err.params["scope"]] += 1
                assert 0 <= err.params["remaining"] < estimate
                return
            granted.append(job_id)
            await asyncio.sleep(0)
            other = (first, second)[(i + 1) % 2]
            if action == "settle":
                assert await other.settle(job_id, estimate * 0.5, None)
            elif action == "settle_over":
                assert await other.settle(job_id, estimate * 3, None)
            elif action == "fail":
                assert await ledger.fail(job_id, "unavailable")
            assert await ledger.balance(f"telegram:{uid}") >= 0

        await asyncio.gather(*(one_job(i) for i in range(100)))
    finally:
        await first.close()
        await second.close()
    kept = await assert_balances_match(target)
    assert len(granted) + sum(refusals.values()) == 100
    assert refusals["balance"] > 0 and len(granted) > 20  # both really happened
    assert all(micro >= 0 for micro in kept.values())
    await assert_totals_match_jobs(target)


async def test_a_payment_credits_once_and_its_refund_takes_back_what_is_unspent(
    target: Target, clock: Clock
) -> None:
    first = await target.open(clock)
    second = await target.open(clock)
    paid = dict(
        provider="telegram_stars", charge_id="stxCHARGE1", provider_charge_id="",
        pack="pack:50:20000", amount=50, currency="XTR", credits=20_000,
    )
    try:
        # The same payment delivered many times, to two processes at once: credited once.
        outcomes = await asyncio.gather(
            *((first, second)[i % 2].record_purchase("telegram:7", **paid) for i in range(10))
        )
        assert sum(created for _, created in outcomes) == 1
        assert len({purchase.id for purchase, _ in outcomes}) == 1
        purchase = outcomes[0][0]
        assert (purchase.credits, purchase.amount, purchase.status.value) == (20_000, 50, "paid")
        assert await first.balance("telegram:7") == 20_000
        assert [p.id for p in await second.list_purchases("telegram:7")] == [purchase.id]
        assert await second.list_purchases("telegram:8") == []
        # 15,000 of it spent: a refund takes back the 5,000 left, never more.
        job = await first.reserve(who("7"), PREPAID, 15_000)
        await first.settle(job, 15_000, None)
        refunded = await second.refund_purchase(purchase.id, by="telegram:42")
        assert refunded.status.value == "refunded" and refunded.refunded_credits == 5000
        assert refunded.refunded_by == "telegram:42"
        assert await first.balance("telegram:7") == 0
        with pytest.raises(UserError) as info:
            await first.refund_purchase(purchase.id, by="telegram:42")
        assert info.value.key == "purchase.already_refunded"
        with pytest.raises(UserError) as info:
            await first.refund_purchase(999, by="telegram:42")
        assert info.value.key == "purchase.not_found"
        assert await first.get_purchase(999) is None and await first.get_purchase(-1) is None
        # Redelivered after the refund: still nothing more.
        again, created = await first.record_purchase("telegram:7", **paid)
        assert not created and again.status.value == "refunded"
        assert await first.balance("telegram:7") == 0
    finally:
        await first.close()
        await second.close()
    await assert_balances_match(target)


async def test_purchase_totals_and_prepaid_spend_over_a_period(
    target: Target, clock: Clock
) -> None:
    ledger = await target.open(clock)

    def pack(charge: str, stars: int, credits: float, currency: str = "XTR") -> dict[str, Any]:
        return dict(provider="telegram_stars", charge_id=charge, provider_charge_id="",
                    pack=f"pack:{stars}:{credits}", amount=stars, currency=currency,
                    credits=credits)

    try:
        empty = await ledger.purchase_totals(START - timedelta(days=30))
        assert empty == PurchaseTotals(0, 0, 0.0, 0, 0, 0.0)
        assert await ledger.prepaid_spend(START) == PrepaidSpend(0, 0.0, 0.0, 0.0)
        # Yesterday: a pack and a prepaid job, outside a period that starts today.
        clock.now = START - timedelta(days=1)
        await ledger.record_purchase("telegram:1", **pack("old", 10, 4000))
        old = await ledger.reserve(who("1"), PREPAID, 1000)
        await ledger.settle(old, 700, None)
        clock.now = START
        # Today: three packs (one redelivered: counted once), one refunded after some spending.
        first, _ = await ledger.record_purchase("telegram:1", **pack("a", 50, 20_000))
        await ledger.record_purchase("telegram:2", **pack("b", 100, 45_000.5))
        await ledger.record_purchase("telegram:2", **pack("b", 100, 45_000.5))
        await ledger.record_purchase("telegram:3", **pack("c", 25, 9_000))
        # Prepaid jobs: settled below, settled above the reservation (an estimator miss),
        # failed with a charge, failed free, refunded, still open, unsettled; and a job of
        # the limits mode, which counts nothing here.
        below = await ledger.reserve(who("1"), PREPAID, 3000)
        await ledger.settle(below, 2500, Usage(10, 0, 1000, 0, 1010))
        over = await ledger.reserve(who("2"), PREPAID, 2000)
        await ledger.settle(over, 2600, None)
        failed = await ledger.reserve(who("2"), PREPAID, 800)
        await ledger.fail(failed, "content_policy", credits=300)
        free = await ledger.reserve(who("2"), PREPAID, 800)
        await ledger.fail(free, "unavailable")
        refunded = await ledger.reserve(who("2"), PREPAID, 900)
        await ledger.settle(refunded, 900, None)
        await ledger.refund(refunded, by="telegram:42")
        await ledger.reserve(who("3"), PREPAID, 400)  # open
        broken = await ledger.reserve(who("3"), PREPAID, 600)
        await ledger.mark_started(broken)
        await ledger.mark_unsettled(broken)
        limits_mode = await ledger.reserve(who("1"), SPEC, 5000)
        await ledger.settle(limits_mode, 5000, None)
        # telegram:1 spent 2,500 of 24,000: the refund takes back 20,000 of pack "a".
        back = await ledger.refund_purchase(first.id, by="telegram:42")
        assert back.refunded_credits == 20_000

        today = await ledger.purchase_totals(START)
        assert today == PurchaseTotals(
            purchases=3, stars=175, credits=pytest.approx(74_000.5), refunds=1,
            refunded_stars=50, refunded_credits=pytest.approx(20_000),
        )
        spend = await ledger.prepaid_spend(START)
        # Settled: 2,500 + 2,000 (capped; the usage said 2,600) + 300.
        assert spend.jobs == 3
        assert spend.credits == pytest.approx(4800)
        assert spend.upstream_credits == pytest.approx(2500 + 2600 + 300)
        assert spend.held == pytest.approx(400 + 600)
        # A period of two days takes yesterday in; [yesterday, today) only yesterday.
        both = await ledger.purchase_totals(START - timedelta(days=1))
        assert (both.purchases, both.stars, both.credits) == (4, 185, pytest.approx(78_000.5))
        assert await ledger.prepaid_spend(START - timedelta(days=1), until=START) == (
            PrepaidSpend(1, pytest.approx(700), pytest.approx(700), 0.0))
        assert (await ledger.purchase_totals(START - timedelta(days=1), until=START)).purchases == 1
        # Other currencies are purchases and credits, but no stars.
        await ledger.record_purchase("telegram:4", **pack("usd", 199, 1000, currency="USD"))
        other = await ledger.purchase_totals(START)
        assert (other.purchases, other.stars) == (4, 175)
        assert await ledger.purchase_totals(START + timedelta(days=1)) == empty
    finally:
        await ledger.close()


async def test_a_start_needs_room_among_every_process_drawing_jobs(
    target: Target, clock: Clock
) -> None:
    async with await target.open(clock) as ledger:
        a1 = await ledger.reserve(who("1"), SPEC, 10)
        a2 = await ledger.reserve(who("1"), SPEC, 10)
        b1 = await ledger.reserve(who("2"), SPEC, 10)
        c1 = await ledger.reserve(who("3"), SPEC, 10)
        assert await ledger.try_start(a1, 1, 2) is True
        assert await ledger.try_start(a2, 1, 2) is False  # the user's one place is taken
        assert await ledger.try_start(b1, 1, 2) is True
        assert await ledger.try_start(c1, 1, 2) is False  # two drawing in all
        job = await ledger.get_job(a1)
        assert job is not None and job.stage is JobStage.DRAWING
        assert await ledger.settle(a1, 5, None)
        assert await ledger.try_start(a2, 1, 2) is True  # room again
        assert await ledger.try_start(a1, 1, 2) is None  # not reserved any more
        assert await ledger.try_start(c1, 0, 0) is True  # no caps: as mark_started
        # Many at once (as from several processes): never more than the cap start.
        many = [await ledger.reserve(who(str(10 + i)), SPEC, 10) for i in range(12)]
        for job_id in (a2, b1, c1):
            await ledger.fail(job_id, "moderation_blocked")
        outcomes = await asyncio.gather(*(ledger.try_start(i, 1, 3) for i in many))
        assert outcomes.count(True) == 3 and outcomes.count(False) == 9


# --- the web door's state and the @username directory, shared by replicas (issue 14) ---------


async def test_a_session_is_found_by_its_token_on_every_process_until_it_ends(
    target: Target, clock: Clock
) -> None:
    first, second = await target.open(clock), await target.open(clock)  # two replicas
    try:
        token = await first.open_session("telegram:42", "telegram", 3600, display_name="Ann",
                                         language="zh-hans")
        found = await second.get_session(token)
        assert found is not None
        assert (found.user_key, found.how, found.display_name, found.language) == (
            "telegram:42", "telegram", "Ann", "zh-hans")
        assert found.expires_at == clock.now + timedelta(hours=1) and not found.key_revoked
        # Only the token's SHA-256 is kept.
        rows = await target.fetch("SELECT * FROM web_sessions")
        assert len(rows) == 1 and token not in repr(rows)
        assert token_hash(token) in rows[0]
        assert await second.get_session(token + "x") is None
        assert await second.get_session("") is None
        # Signing out on one process ends it on the other.
        other = await first.open_session("telegram:42", "telegram", 3600)
        await second.close_session(token)
        assert await first.get_session(token) is None
        await second.close_session(token)  # again: nothing happens
        # Expiry is the query's: a second before its end it is found, at its end not.
        clock.advance(seconds=3599)
        assert await first.get_session(other) is not None
        clock.advance(seconds=1)
        assert await second.get_session(other) is None
        assert len(await target.fetch("SELECT * FROM web_sessions")) == 1
        assert await first.prune_expired() == 1
        assert await target.fetch("SELECT * FROM web_sessions") == []
        with pytest.raises(ValueError):
            await first.open_session("telegram:42", "cookie", 60)
        with pytest.raises(ValueError):
            await first.open_session("telegram:42", "key", 0)
    finally:
        await first.close()
        await second.close()


async def test_a_key_session_ends_at_once_when_its_key_is_revoked(
    target: Target, clock: Clock
) -> None:
    first, second = await target.open(clock), await target.open(clock)
    try:
        key_id, key = await first.create_api_key("web:alice", "laptop")
        token = await first.open_session("web:alice", "key", 7 * 86400, display_name="alice",
                                         api_key=key)
        [row] = await target.fetch("SELECT key_hash FROM web_sessions")
        assert row == (key_hash(key),)  # the key's hash, never the key
        assert key not in repr(await target.fetch("SELECT * FROM web_sessions"))
        found = await second.get_session(token)
        assert found is not None and not found.key_revoked
        # Using the page is using the key: last_used_at is touched (at most once a minute).
        [(last_used,)] = await target.fetch("SELECT last_used_at FROM api_keys")
        assert last_used == iso_of(clock.now)
        assert await second.revoke_api_key(key_id)
        found = await first.get_session(token)
        assert found is not None and found.key_revoked
        # A key that names another user than the session's does not hold it up either.
        _, bobs = await first.create_api_key("web:bob")
        forged = await first.open_session("web:alice", "key", 60, api_key=bobs)
        assert (await second.get_session(forged)).key_revoked  # type: ignore[union-attr]
        # Sessions opened another way carry no key.
        link = await first.open_session("web:operator", "link", 60)
        assert not (await second.get_session(link)).key_revoked  # type: ignore[union-attr]
    finally:
        await first.close()
        await second.close()


async def test_a_users_sessions_past_the_cap_end_oldest_first(
    target: Target, clock: Clock
) -> None:
    async with await target.open(clock) as ledger:
        tokens = [await ledger.open_session("telegram:1", "telegram", 60)
                  for _ in range(SESSIONS_PER_USER + 2)]
        bobs = await ledger.open_session("telegram:2", "telegram", 60)
        assert [await ledger.get_session(t) is not None for t in tokens] == (
            [False, False] + [True] * SESSIONS_PER_USER)
        assert await ledger.get_session(bobs) is not None  # another user's are untouched
        assert len(await target.fetch("SELECT * FROM web_sessions")) == SESSIONS_PER_USER + 1


async def test_a_sign_in_code_is_spent_once_from_any_process(
    target: Target, clock: Clock
) -> None:
    first, second = await target.open(clock), await target.open(clock)
    try:
        code = await first.new_link_code(3600)
        marks = await target.fetch("SELECT key FROM marks")
        assert marks == [(f"web:link:{token_hash(code)}",)]  # its hash, never the code
        spent = await asyncio.gather(*(store.spend_link_code(code)
                                       for store in (first, second) * 5))
        assert spent.count(True) == 1
        assert not await first.spend_link_code(code)
        assert not await second.spend_link_code("")
        assert not await second.spend_link_code("made-up")
        stale = await second.new_link_code(3600)
        clock.advance(seconds=3600)
        assert not await first.spend_link_code(stale)  # expired
        assert await first.prune_expired() == 1
    finally:
        await first.close()
        await second.close()


def kept(name: str, size: int, mime: str = "image/png") -> FileToKeep:
    return FileToKeep(name, bytes([len(name)]) * size, mime, 16, 9)


async def test_kept_files_are_served_everywhere_until_they_expire_oldest_first_past_the_cap(
    target: Target, clock: Clock
) -> None:
    first, second = await target.open(clock), await target.open(clock)
    try:
        await first.keep_files(7, "web:alice", [kept("a.png", 400), kept("bb.jpeg", 300,
                                                 "image/jpeg")], 3600, 1000)
        found = await second.kept_file("bb.jpeg")
        assert found is not None
        assert (found.data, found.mime) == (bytes([7]) * 300, "image/jpeg")
        assert found.expires_at == clock.now + timedelta(hours=1)
        assert await second.kept_file("nothing.png") is None
        listed = await second.job_files([7, 8, -1], "web:alice")
        assert listed == {7: [KeptFileInfo("a.png", "image/png", 16, 9),
                              KeptFileInfo("bb.jpeg", "image/jpeg", 16, 9)]}
        assert await second.job_files([7], "web:bob") == {}  # another user's job: nothing
        # Over the cap (1000 bytes in all), the oldest go first; a job's own are kept.
        clock.advance(seconds=60)
        await second.keep_files(8, "web:alice", [kept("c.png", 200)], 3600, 1000)
        assert await first.kept_file("a.png") is not None  # 900 bytes: fits
        await second.keep_files(9, "web:alice", [kept("dd.png", 250)], 3600, 1000)
        assert await first.kept_file("a.png") is None  # 1150 would not fit: a.png went
        assert await first.kept_file("bb.jpeg") is not None
        assert await first.job_files([7, 8, 9], "web:alice") == {
            7: [KeptFileInfo("bb.jpeg", "image/jpeg", 16, 9)],
            8: [KeptFileInfo("c.png", "image/png", 16, 9)],
            9: [KeptFileInfo("dd.png", "image/png", 16, 9)],
        }
        await first.keep_files(10, "web:bob", [kept("big.png", 1500)], 3600, 1000)
        assert await second.kept_file("big.png") is not None  # alone above the cap: kept
        assert [name for (name,) in await target.fetch("SELECT name FROM web_files")] == [
            "big.png"]
        # Expiry is the query's; the prune frees the rows.
        clock.advance(seconds=3600)
        assert await second.kept_file("big.png") is None
        assert await second.job_files([10], "web:bob") == {}
        assert await first.prune_expired() == 1
        assert await target.fetch("SELECT name FROM web_files") == []
    finally:
        await first.close()
        await second.close()


async def test_a_username_resolves_on_every_process_in_any_case(
    target: Target, clock: Clock
) -> None:
    first, second = await target.open(clock), await target.open(clock)
    try:
        assert await second.find_username("telegram", "bob") is None
        await first.note_username("telegram", "Bob_77", "telegram:501")
        assert await second.find_username("telegram", "bob_77") == "telegram:501"
        assert await second.find_username("telegram", "@BOB_77") == "telegram:501"
        assert await second.find_username("discord", "bob_77") is None  # per platform
        # A name taken by someone else later is theirs now.
        await second.note_username("telegram", "bob_77", "telegram:502")
        assert await first.find_username("telegram", "Bob_77") == "telegram:502"
        assert await target.fetch("SELECT name_key, user_key FROM usernames") == [
            ("telegram:bob_77", "telegram:502")]
        with pytest.raises(ValueError):
            await first.note_username("telegram", "", "telegram:1")
    finally:
        await first.close()
        await second.close()
    async with await target.open(clock) as again:  # a restart forgets no name
        assert await again.find_username("telegram", "bob_77") == "telegram:502"


# --- kept results: a drawn job's images until delivery (core/results.py) --------------------


def images_of(*sizes: int) -> tuple[GeneratedImage, ...]:
    """Images of random bytes (every byte value, no pattern a store could shorten)."""
    mimes = ("image/png", "image/jpeg", "image/webp")
    return tuple(GeneratedImage(os.urandom(size), mimes[n % 3], 16 + n, 9 + n)
                 for n, size in enumerate(sizes))


async def drawn_job(ledger: Store, uid: str = "1") -> int:
    """A job settled (drawn), waiting to be delivered."""
    job_id = await ledger.reserve(who(uid), SPEC, 100)
    await ledger.mark_started(job_id)
    await ledger.settle(job_id, 80, None)
    return job_id


async def test_a_kept_result_reads_back_byte_identical_from_any_process_until_dropped(
    target: Target, clock: Clock
) -> None:
    first, second = await target.open(clock), await target.open(clock)
    try:
        job, other = await drawn_job(first), await drawn_job(first, "2")
        images = images_of(3_000_000, 1, 70_000)  # a 4K-sized PNG, a byte, a preview
        await first.keep_result(job, images, revised_prompt="a cat, drawn", elapsed=12.5)
        found = await second.kept_result(job)
        assert found is not None
        assert found.images == images  # bytes, order, mime and size, as saved
        assert (found.job_id, found.revised_prompt, found.elapsed) == (job, "a cat, drawn", 12.5)
        assert found.saved_at == clock.now
        assert await second.kept_result(other) is None
        assert await second.kept_result(-1) is None and await second.kept_result(2**63) is None
        # Saved again (the job drawn again after a lost attempt): the new result replaces it.
        clock.advance(seconds=30)
        again = images_of(500)
        await second.keep_result(job, again, revised_prompt=None, elapsed=3.0)
        replaced = await first.kept_result(job)
        assert replaced is not None and replaced.images == again
        assert (replaced.revised_prompt, replaced.saved_at) == (None, clock.now)
        # Nothing is dropped to make room: every result stays until it is dropped. A copy
        # keeps the time a result was saved.
        await first.keep_result(other, images_of(2_000_000, 2_000_000), revised_prompt=None,
                                elapsed=1.0, saved_at=START + timedelta(seconds=60))
        assert await second.kept_results() == [(job, START + timedelta(seconds=30)),
                                               (other, START + timedelta(seconds=60))]
        assert (await second.kept_result(job)).images == again  # type: ignore[union-attr]
        await second.drop_result(job)
        await second.drop_result(job)  # twice: nothing left to drop
        await second.drop_result(-5)
        assert await first.kept_result(job) is None
        assert await first.kept_results() == [(other, START + timedelta(seconds=60))]
        assert await target.fetch("SELECT COUNT(*) FROM kept_result_images WHERE job_id = ?",
                                  job) == [(0,)]
    finally:
        await first.close()
        await second.close()
    async with await target.open(clock) as again_open:  # a restart keeps them
        kept_after = await again_open.kept_result(other)
        assert kept_after is not None and len(kept_after.images) == 2


async def test_a_result_is_kept_only_for_a_job_of_the_ledger(target: Target, clock: Clock) -> None:
    async with await target.open(clock) as ledger:
        with pytest.raises(StoreError):
            await ledger.keep_result(12345, images_of(10), revised_prompt=None, elapsed=1.0)
        assert await ledger.kept_results() == []


async def test_a_copy_carries_the_results_of_drawn_jobs_only(
    target: Target, clock: Clock, tmp_path: Path
) -> None:
    async with await target.open(clock) as source:
        waiting = [await drawn_job(source, str(n)) for n in range(6)]
        delivered = await drawn_job(source, "9")
        for job in [*waiting, delivered]:
            await source.keep_result(job, images_of(job * 1000, 10), revised_prompt=f"#{job}",
                                     elapsed=job / 2)
            clock.advance(seconds=1)
        assert await source.finish_delivery(delivered, "", True)
        async with await open_store(f"sqlite:///{tmp_path}/copy.db", Limits()) as copy:
            report = await copy_store(source, copy)
            assert report.ok, report.summary()
            assert report.counts["kept_results"] == len(waiting)
            assert [job for job, _ in await copy.kept_results()] == waiting
            for job in waiting:
                assert await copy.kept_result(job) == await source.kept_result(job)
            assert await copy.kept_result(delivered) is None
