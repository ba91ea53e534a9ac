"""The spend ledger: jobs, reservations, limits and reports, in one SQLite file (aiosqlite).

Every image job is priced before it runs and written here as `reserved` in the same
transaction that checks every spend limit, so concurrent requests — from one process or
several sharing the file — can never overspend. The job is then settled at its exact cost,
failed (releasing the reservation, or charging what the upstream reported), or, if the
process died mid-job, marked `unsettled` at start-up and left for an admin to refund.

What a job counts against a limit, by status:

    reserved, unsettled     estimated_credits   (the upstream may have billed)
    succeeded, failed       actual_credits      (0 when NULL)
    refunded                0

Days and months are UTC: "today" starts at 00:00 UTC and "this month" on the 1st at
00:00 UTC; a job belongs to the day it was reserved (`created_at`). Times are stored as
fixed-width UTC ISO-8601 text, so they compare as strings. A limit of 0 means unlimited,
for the defaults and for per-user / per-chat overrides alike; NULL override = the default.

Concurrency: one connection per `Ledger`, WAL journal, a busy timeout, every write
transaction `BEGIN IMMEDIATE` (the write lock is taken before anything is read, so no
reader can be upgraded into a "database is locked"), and an `asyncio.Lock` so coroutines
sharing a `Ledger` never interleave inside a transaction.

The schema is built by numbered `MIGRATIONS`, applied at start-up and recorded in the
`schema_version` table; a database made by an older release is upgraded in place.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import aiosqlite

from core.errors import JobNotFound, LimitExceeded, UserError
from core.pricing import Usage

if TYPE_CHECKING:
    from types import TracebackType

    from core.config import Settings
    from core.requester import Requester

BUSY_TIMEOUT_MS = 30_000
# Float sums of credits drift in the last bits; a request that fits exactly must not be refused.
_EPSILON = 1e-6


class JobStatus(StrEnum):
    """Where a job is in its life."""

    RESERVED = "reserved"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNSETTLED = "unsettled"
    REFUNDED = "refunded"


# --- schema ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One numbered schema step; its statements run in a single transaction."""

    version: int
    description: str
    statements: tuple[str, ...]


SCHEMA_VERSION_DDL = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    " version INTEGER PRIMARY KEY,"
    " description TEXT NOT NULL,"
    " applied_at TEXT NOT NULL)"
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "users, chats and jobs",
        (
            """CREATE TABLE users (
                user_key TEXT PRIMARY KEY,
                platform TEXT NOT NULL,
                user_id TEXT NOT NULL,
                display_name TEXT NOT NULL DEFAULT '',
                language TEXT,
                daily_limit REAL,
                monthly_limit REAL,
                blocked INTEGER NOT NULL DEFAULT 0,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL
            )""",
            """CREATE TABLE chats (
                chat_key TEXT PRIMARY KEY,
                platform TEXT NOT NULL,
                chat_id TEXT NOT NULL,
                title TEXT NOT NULL DEFAULT '',
                daily_limit REAL,
                blocked INTEGER NOT NULL DEFAULT 0,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL
            )""",
            # AUTOINCREMENT: job ids live on in buttons and admin commands, never reuse one.
            """CREATE TABLE jobs (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                user_key TEXT NOT NULL REFERENCES users(user_key),
                chat_key TEXT REFERENCES chats(chat_key),
                platform TEXT NOT NULL,
                display_name TEXT NOT NULL DEFAULT '',
                command_text TEXT NOT NULL,
                request_json TEXT NOT NULL DEFAULT '{}',
                model TEXT NOT NULL,
                size TEXT NOT NULL,
                quality TEXT NOT NULL,
                n INTEGER NOT NULL,
                reference_count INTEGER NOT NULL DEFAULT 0,
                status TEXT NOT NULL CHECK (status IN
                    ('reserved', 'succeeded', 'failed', 'unsettled', 'refunded')),
                estimated_credits REAL NOT NULL,
                actual_credits REAL,
                usage_json TEXT,
                error_code TEXT,
                created_at TEXT NOT NULL,
                started_at TEXT,
                finished_at TEXT
            )""",
            "CREATE INDEX jobs_user_created ON jobs (user_key, created_at)",
            "CREATE INDEX jobs_chat_created ON jobs (chat_key, created_at)",
            "CREATE INDEX jobs_created ON jobs (created_at)",
        ),
    ),
    Migration(
        2,
        "result refs, refunds, status index, the job_charges view",
        (
            "ALTER TABLE jobs ADD COLUMN result_refs TEXT NOT NULL DEFAULT '[]'",
            "ALTER TABLE jobs ADD COLUMN refunded_by TEXT",
            "ALTER TABLE jobs ADD COLUMN refunded_at TEXT",
            "CREATE INDEX jobs_status_created ON jobs (status, created_at)",
            # The one place that says what a job counts against a limit (see the docstring).
            """CREATE VIEW job_charges AS
               SELECT id, user_key, chat_key, created_at, status,
                      CASE status
                          WHEN 'reserved' THEN estimated_credits
                          WHEN 'unsettled' THEN estimated_credits
                          WHEN 'refunded' THEN 0.0
                          ELSE COALESCE(actual_credits, 0.0)
                      END AS charged
               FROM jobs""",
        ),
    ),
)

LATEST_VERSION = MIGRATIONS[-1].version


# --- values ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Default spend limits in credits; 0 = unlimited."""

    user_daily: float = 0
    user_monthly: float = 0
    chat_daily: float = 0
    global_daily: float = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """Take the default limits from the settings."""
        return cls(
            user_daily=settings.user_daily_limit,
            user_monthly=settings.user_monthly_limit,
            chat_daily=settings.chat_daily_limit,
            global_daily=settings.global_daily_limit,
        )


@dataclass(frozen=True)
class JobSpec:
    """What a job asks for, as recorded in the ledger."""

    command_text: str
    model: str
    size: str
    quality: str
    n: int
    reference_count: int
    request_json: str  # the serialised ImageRequest, so a button can rebuild it after a restart


@dataclass(frozen=True)
class JobRecord:
    """One row of the jobs table."""

    id: int
    user_key: str
    chat_key: str | None
    platform: str
    display_name: str
    command_text: str
    request_json: str
    model: str
    size: str
    quality: str
    n: int
    reference_count: int
    status: JobStatus
    estimated_credits: float
    actual_credits: float | None
    usage: Usage | None
    error_code: str | None
    result_refs: tuple[str, ...]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    refunded_by: str | None
    refunded_at: datetime | None

    @property
    def user_id(self) -> str:
        """Return the platform user id (the part of user_key after the platform)."""
        return self.user_key.split(":", 1)[1]

    @property
    def chat_id(self) -> str | None:
        """Return the platform chat id, or None for a private chat."""
        return self.chat_key.split(":", 1)[1] if self.chat_key else None

    @property
    def charged(self) -> float:
        """Return what this job counts against limits now."""
        if self.status in (JobStatus.RESERVED, JobStatus.UNSETTLED):
            return self.estimated_credits
        if self.status is JobStatus.REFUNDED:
            return 0.0
        return self.actual_credits or 0.0

    @property
    def refunded_credits(self) -> float:
        """Return what a refund gave back (0 unless refunded)."""
        if self.status is not JobStatus.REFUNDED:
            return 0.0
        # An unsettled job never got an actual cost; it was counted at its estimate.
        return self.actual_credits if self.actual_credits is not None else self.estimated_credits


@dataclass(frozen=True)
class UserRecord:
    """One row of the users table; limits None = the default."""

    user_key: str
    platform: str
    user_id: str
    display_name: str
    language: str | None
    daily_limit: float | None
    monthly_limit: float | None
    blocked: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ChatRecord:
    """One row of the chats table; limit None = the default."""

    chat_key: str
    platform: str
    chat_id: str
    title: str
    daily_limit: float | None
    blocked: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class SpendReport:
    """A user's spend against their limits (limits 0 = unlimited, remaining None then)."""

    user_key: str
    display_name: str
    today: float
    month: float
    all_time: float
    daily_limit: float
    monthly_limit: float
    daily_remaining: float | None
    monthly_remaining: float | None
    last_jobs: tuple[JobRecord, ...]


class Spender(NamedTuple):
    """One line of the top-spenders report."""

    user_key: str
    display_name: str
    credits: float
    jobs: int


class ChatTotal(NamedTuple):
    """One line of the per-chat totals report."""

    chat_key: str
    credits: float
    jobs: int


CSV_COLUMNS = (
    "id",
    "created_at",
    "started_at",
    "finished_at",
    "status",
    "user_key",
    "chat_key",
    "platform",
    "display_name",
    "command_text",
    "model",
    "size",
    "quality",
    "n",
    "reference_count",
    "estimated_credits",
    "actual_credits",
    "charged_credits",
    "error_code",
    "text_input_tokens",
    "image_input_tokens",
    "image_output_tokens",
    "text_output_tokens",
    "total_tokens",
    "refunded_by",
    "refunded_at",
)

# Whole statements as constants: values always go in as parameters, never into the text.
_SELECT_JOB = "SELECT * FROM jobs WHERE id = ?"
_SELECT_UNSETTLED = "SELECT * FROM jobs WHERE status = 'unsettled' ORDER BY created_at, id"
_SELECT_LAST_JOBS = "SELECT * FROM jobs WHERE user_key = ? ORDER BY id DESC LIMIT ?"
_SELECT_EXPORT = (
    "SELECT * FROM jobs"
    " WHERE (? IS NULL OR created_at >= ?) AND (? IS NULL OR user_key = ?) ORDER BY id"
)


# --- the ledger -----------------------------------------------------------------------


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _as_utc(moment: datetime) -> datetime:
    # A naive datetime is taken as UTC, never as local time.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _iso(moment: datetime) -> str:
    return _as_utc(moment).isoformat(timespec="microseconds")


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _split_key(key: str) -> tuple[str, str]:
    platform, sep, ident = key.partition(":")
    if not sep or not platform or not ident:
        raise ValueError(f"expected a key of the form platform:id, got {key!r}")
    return platform, ident


def _check_credits(name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{name} must be a number")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _usage_json(usage: Usage | None) -> str | None:
    return json.dumps(usage.to_dict()) if usage is not None else None


def _parse_usage(value: str | None) -> Usage | None:
    if not value:
        return None
    try:
        data = json.loads(value)
        return Usage(**{k: int(v) for k, v in data.items() if k in Usage.__dataclass_fields__})
    except (ValueError, TypeError, AttributeError):
        return None


def _parse_refs(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    try:
        data = json.loads(value)
    except ValueError:
        return ()
    return tuple(str(ref) for ref in data) if isinstance(data, list) else ()


def _job_from_row(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        user_key=row["user_key"],
        chat_key=row["chat_key"],
        platform=row["platform"],
        display_name=row["display_name"],
        command_text=row["command_text"],
        request_json=row["request_json"],
        model=row["model"],
        size=row["size"],
        quality=row["quality"],
        n=row["n"],
        reference_count=row["reference_count"],
        status=JobStatus(row["status"]),
        estimated_credits=row["estimated_credits"],
        actual_credits=row["actual_credits"],
        usage=_parse_usage(row["usage_json"]),
        error_code=row["error_code"],
        result_refs=_parse_refs(row["result_refs"]),
        created_at=datetime.fromisoformat(row["created_at"]),
        started_at=_parse_time(row["started_at"]),
        finished_at=_parse_time(row["finished_at"]),
        refunded_by=row["refunded_by"],
        refunded_at=_parse_time(row["refunded_at"]),
    )


def _user_from_row(row: sqlite3.Row) -> UserRecord:
    return UserRecord(
        user_key=row["user_key"],
        platform=row["platform"],
        user_id=row["user_id"],
        display_name=row["display_name"],
        language=row["language"],
        daily_limit=row["daily_limit"],
        monthly_limit=row["monthly_limit"],
        blocked=bool(row["blocked"]),
        created_at=datetime.fromisoformat(row["created_at"]),
        updated_at=datetime.fromisoformat(row["updated_at"]),
    )


def _chat_from_row(row: sqlite3.Row) -> ChatRecord:
    return ChatRecord(
        chat_key=row["chat_key"],
        platform=row["platform"],
        chat_id=row["chat_id"],
        title=row["title"],
        daily_limit=row["daily_limit"],
        blocked=bool(row["blocked"]),
        created_at=datetime.fromisoformat(row["created_at"]),
        updated_at=datetime.fromisoformat(row["updated_at"]),
    )


def _csv_text(value: str | None) -> str:
    # Free text from users goes to admins' spreadsheets: keep it from running as a formula.
    if value and value[0] in "=+-@\t\r":
        return "'" + value
    return value or ""


def _is_row_id(job_id: int) -> bool:
    # Ids come from buttons and admin commands; SQLite cannot even bind one past 64 bits.
    return 0 < job_id < 2**63


def _remaining(limit: float, spent: float) -> float | None:
    return None if limit <= 0 else max(0.0, limit - spent)


async def _fetchone(
    conn: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()
) -> sqlite3.Row | None:
    # Every aiosqlite call is a hop to its thread and back (~0.1 ms); execute_fetchall is
    # one hop where execute + fetchone + close were three. Callers select one row.
    rows = await conn.execute_fetchall(sql, params)
    return next(iter(rows), None)


async def _fetchall(
    conn: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()
) -> Iterable[sqlite3.Row]:
    return await conn.execute_fetchall(sql, params)


async def _rollback_quietly(conn: aiosqlite.Connection) -> None:
    # "no transaction is active" just means there was nothing left to undo.
    with suppress(sqlite3.OperationalError):
        await conn.execute("ROLLBACK")


async def _sum_charged(conn: aiosqlite.Connection, sql: str, params: Sequence[Any]) -> float:
    row = await _fetchone(conn, sql, params)
    return float(row[0]) if row is not None and row[0] is not None else 0.0


class Ledger:
    """Spend, reservations, limits and reports over one SQLite file."""

    def __init__(
        self, conn: aiosqlite.Connection, limits: Limits, clock: Callable[[], datetime]
    ) -> None:
        self._conn: aiosqlite.Connection | None = conn
        self._limits = limits
        self._clock = clock
        self._lock = asyncio.Lock()

    # --- life ---------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        limits: Limits,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> Ledger:
        """Open (creating the folder and file if needed) and migrate the ledger at `path`."""
        target = os.fspath(path)
        if target != ":memory:":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
        conn = await aiosqlite.connect(target, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            conn.row_factory = sqlite3.Row
            await conn.execute("PRAGMA busy_timeout = 30000")  # = BUSY_TIMEOUT_MS
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA synchronous = NORMAL")
            await conn.execute("PRAGMA foreign_keys = ON")
            ledger = cls(conn, limits, clock or _utc_now)
            await ledger._migrate()
        except BaseException:
            await conn.close()
            raise
        return ledger

    async def close(self) -> None:
        """Close the connection; safe to call twice."""
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await conn.close()

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def limits(self) -> Limits:
        """Return the default limits this ledger enforces."""
        return self._limits

    async def schema_version(self) -> int:
        """Return the schema version of the open database."""
        async with self._read() as conn:
            row = await _fetchone(conn, "SELECT MAX(version) FROM schema_version")
        return int(row[0]) if row is not None and row[0] is not None else 0

    async def check_writable(self) -> None:
        """Take the write lock and let it go, proving the file accepts writes."""
        async with self._write() as conn:
            await conn.execute("UPDATE schema_version SET version = version WHERE 0")

    async def _migrate(self) -> None:
        async with self._write() as conn:
            await conn.execute(SCHEMA_VERSION_DDL)
            row = await _fetchone(conn, "SELECT MAX(version) FROM schema_version")
            current = int(row[0]) if row is not None and row[0] is not None else 0
            if current > LATEST_VERSION:
                raise RuntimeError(
                    f"ledger schema version {current} is newer than this imgbot "
                    f"({LATEST_VERSION}); upgrade imgbot"
                )
            for migration in MIGRATIONS:
                if migration.version <= current:
                    continue
                for statement in migration.statements:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_version (version, description, applied_at)"
                    " VALUES (?, ?, ?)",
                    (migration.version, migration.description, self._now_iso()),
                )

    # --- transactions -------------------------------------------------------------------

    def _require(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise RuntimeError("the ledger is closed")
        return self._conn

    @asynccontextmanager
    async def _transaction(self, begin: str) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            conn = self._require()
            if conn.in_transaction:
                await _rollback_quietly(conn)
            try:
                await conn.execute(begin)
                yield conn
                await conn.execute("COMMIT")
            except BaseException:
                # aiosqlite runs statements in order on its own thread, so even when this
                # task was cancelled mid-statement the ROLLBACK lands after that statement and
                # the connection is clean before the lock passes on.
                await asyncio.shield(_rollback_quietly(conn))
                raise

    def _write(self) -> AbstractAsyncContextManager[aiosqlite.Connection]:
        # IMMEDIATE takes the write lock up front, waiting under busy_timeout if needed.
        return self._transaction("BEGIN IMMEDIATE")

    def _read(self) -> AbstractAsyncContextManager[aiosqlite.Connection]:
        # A read transaction gives several SELECTs one consistent snapshot (WAL).
        return self._transaction("BEGIN")

    # --- time -----------------------------------------------------------------------------

    def _now(self) -> datetime:
        return _as_utc(self._clock())

    def _now_iso(self) -> str:
        return _iso(self._now())

    def _day_start(self, now: datetime) -> str:
        return _iso(now.replace(hour=0, minute=0, second=0, microsecond=0))

    def _month_start(self, now: datetime) -> str:
        return _iso(now.replace(day=1, hour=0, minute=0, second=0, microsecond=0))

    # --- reservations -------------------------------------------------------------------

    async def reserve(self, requester: Requester, spec: JobSpec, estimate: float) -> int:
        """Check `estimate` against every limit and reserve it as a new job; return its id."""
        _check_credits("estimate", estimate)
        if spec.n < 1 or spec.reference_count < 0:
            raise ValueError("n must be >= 1 and reference_count >= 0")
        user_key = requester.user_key
        chat_key = requester.chat_key
        now = self._now()
        now_iso = _iso(now)
        day_start = self._day_start(now)
        month_start = self._month_start(now)
        async with self._write() as conn:
            await conn.execute(
                "INSERT INTO users (user_key, platform, user_id, display_name, language,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (user_key) DO UPDATE SET"
                # An empty name from the platform keeps the one we know; a language the
                # user chose (set_language) is not overwritten by the platform's.
                "  display_name = CASE WHEN excluded.display_name = '' THEN display_name"
                "                      ELSE excluded.display_name END,"
                "  language = COALESCE(language, excluded.language),"
                "  updated_at = excluded.updated_at",
                (
                    user_key,
                    requester.platform,
                    requester.user_id,
                    requester.display_name,
                    requester.language,
                    now_iso,
                    now_iso,
                ),
            )
            if chat_key is not None:
                await conn.execute(
                    "INSERT INTO chats (chat_key, platform, chat_id, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (chat_key) DO NOTHING",
                    (chat_key, requester.platform, requester.chat_id, now_iso, now_iso),
                )
            user = await _fetchone(
                conn,
                "SELECT daily_limit, monthly_limit,"
                " (SELECT daily_limit FROM chats WHERE chat_key = ?) AS chat_daily"
                " FROM users WHERE user_key = ?",
                (chat_key, user_key),
            )
            assert user is not None
            # (scope, limit, SQL for what already counts, its parameters)
            checks: list[tuple[str, float, str, tuple[Any, ...]]] = []
            user_daily = user["daily_limit"]
            checks.append(
                (
                    "user_daily",
                    self._limits.user_daily if user_daily is None else user_daily,
                    "SELECT SUM(charged) FROM job_charges WHERE user_key = ? AND created_at >= ?",
                    (user_key, day_start),
                )
            )
            user_monthly = user["monthly_limit"]
            checks.append(
                (
                    "user_monthly",
                    self._limits.user_monthly if user_monthly is None else user_monthly,
                    "SELECT SUM(charged) FROM job_charges WHERE user_key = ? AND created_at >= ?",
                    (user_key, month_start),
                )
            )
            if chat_key is not None:
                chat_daily = user["chat_daily"]
                checks.append(
                    (
                        "chat_daily",
                        self._limits.chat_daily if chat_daily is None else chat_daily,
                        "SELECT SUM(charged) FROM job_charges"
                        " WHERE chat_key = ? AND created_at >= ?",
                        (chat_key, day_start),
                    )
                )
            checks.append(
                (
                    "global_daily",
                    self._limits.global_daily,
                    "SELECT SUM(charged) FROM job_charges WHERE created_at >= ?",
                    (day_start,),
                )
            )
            active = [check for check in checks if check[1] > 0]
            spent_row: Sequence[Any] = ()
            if active:
                # All sums in one statement: one thread hop instead of one per limit. The
                # text is joined from the constant queries above; values stay parameters.
                spent_row = await _fetchone(  # type: ignore[assignment]
                    conn,
                    "SELECT " + ", ".join(f"({sql})" for _, _, sql, _ in active),  # noqa: S608
                    [value for *_, params in active for value in params],
                )
            # Refuse on the tightest limit, so "what is left" is what would really fit.
            tightest: tuple[str, float, float] | None = None
            for (scope, limit, _, _), spent_sum in zip(active, spent_row, strict=True):
                spent = float(spent_sum) if spent_sum is not None else 0.0
                remaining = max(0.0, limit - spent)
                if tightest is None or remaining < tightest[2]:
                    tightest = (scope, limit, remaining)
            if tightest is not None and estimate > tightest[2] + _EPSILON:
                scope, limit, remaining = tightest
                # Raising rolls back the user/chat upserts too: a refusal writes nothing.
                raise LimitExceeded(
                    f"limit.{scope}",
                    scope=scope,
                    asked=estimate,
                    remaining=remaining,
                    limit=limit,
                    detail=f"{user_key} asked {estimate} with {remaining} of {limit} left",
                )
            # execute_insert: the row and its id in one hop (execute + close were two).
            inserted = await conn.execute_insert(
                "INSERT INTO jobs (user_key, chat_key, platform, display_name, command_text,"
                " request_json, model, size, quality, n, reference_count, status,"
                " estimated_credits, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'reserved', ?, ?)",
                (
                    user_key,
                    chat_key,
                    requester.platform,
                    requester.display_name,
                    spec.command_text,
                    spec.request_json,
                    spec.model,
                    spec.size,
                    spec.quality,
                    spec.n,
                    spec.reference_count,
                    float(estimate),
                    now_iso,
                ),
            )
            job_id = inserted[0] if inserted is not None else None
        assert job_id is not None
        return int(job_id)

    async def mark_started(self, job_id: int) -> bool:
        """Record that a reserved job started drawing; False if it is not reserved."""
        async with self._write() as conn:
            cursor = await conn.execute(
                "UPDATE jobs SET started_at = ? WHERE id = ? AND status = 'reserved'",
                (self._now_iso(), job_id),
            )
            changed = cursor.rowcount
            await cursor.close()
        return changed > 0

    async def settle(self, job_id: int, credits: float, usage: Usage | None) -> bool:
        """Replace a reservation with its exact cost; False (no-op) if it is not reserved."""
        _check_credits("credits", credits)
        return await self._finish(job_id, JobStatus.SUCCEEDED, credits, usage, None)

    async def fail(
        self, job_id: int, error_code: str, credits: float = 0.0, usage: Usage | None = None
    ) -> bool:
        """Mark a reserved job failed at `credits` (0 releases it); False if not reserved."""
        _check_credits("credits", credits)
        return await self._finish(job_id, JobStatus.FAILED, credits, usage, error_code)

    async def _finish(
        self,
        job_id: int,
        status: JobStatus,
        credits: float,
        usage: Usage | None,
        error_code: str | None,
    ) -> bool:
        async with self._write() as conn:
            # The status guard in the WHERE makes a second settle or fail a no-op.
            cursor = await conn.execute(
                "UPDATE jobs SET status = ?, actual_credits = ?, usage_json = ?,"
                " error_code = ?, finished_at = ? WHERE id = ? AND status = 'reserved'",
                (
                    status.value,
                    float(credits),
                    _usage_json(usage),
                    error_code,
                    self._now_iso(),
                    job_id,
                ),
            )
            changed = cursor.rowcount
            await cursor.close()
        return changed > 0

    async def mark_unsettled(self, job_id: int) -> bool:
        """Mark a reserved job whose cost is unknown `unsettled`; False if not reserved."""
        async with self._write() as conn:
            cursor = await conn.execute(
                "UPDATE jobs SET status = 'unsettled' WHERE id = ? AND status = 'reserved'",
                (job_id,),
            )
            changed = cursor.rowcount
            await cursor.close()
        return changed > 0

    async def recover_stale(self, older_than_seconds: float) -> list[int]:
        """Resolve reserved jobs older than that, left behind by a dead process.

        A job that had started may have been billed upstream: it becomes `unsettled`,
        counted at its estimate until an admin refunds it; its id is returned. A job that
        never started (it was still queued) cannot have been billed: it is released as
        `failed` with error `interrupted` and costs nothing.
        """
        cutoff = _iso(self._now() - timedelta(seconds=older_than_seconds))
        async with self._write() as conn:
            rows = await _fetchall(
                conn,
                "SELECT id FROM jobs WHERE status = 'reserved' AND created_at < ?"
                " AND started_at IS NOT NULL ORDER BY id",
                (cutoff,),
            )
            ids = [int(row["id"]) for row in rows]
            await conn.execute(
                "UPDATE jobs SET status = 'unsettled' WHERE status = 'reserved'"
                " AND created_at < ? AND started_at IS NOT NULL",
                (cutoff,),
            )
            await conn.execute(
                "UPDATE jobs SET status = 'failed', actual_credits = 0,"
                " error_code = 'interrupted', finished_at = ?"
                " WHERE status = 'reserved' AND created_at < ? AND started_at IS NULL",
                (self._now_iso(), cutoff),
            )
        return ids

    async def list_unsettled(self) -> list[JobRecord]:
        """List the jobs whose cost is unknown, oldest first, for admins."""
        async with self._read() as conn:
            rows = await _fetchall(conn, _SELECT_UNSETTLED)
        return [_job_from_row(row) for row in rows]

    async def refund(self, job_id: int, by: str) -> JobRecord:
        """Refund a succeeded, unsettled or charged failed job; return the refunded record."""
        async with self._write() as conn:
            row = await _fetchone(conn, _SELECT_JOB, (job_id,)) if _is_row_id(job_id) else None
            if row is None:
                raise JobNotFound(job_id=job_id, detail=f"refund of missing job {job_id}")
            job = _job_from_row(row)
            refundable = job.status in (JobStatus.SUCCEEDED, JobStatus.UNSETTLED) or (
                job.status is JobStatus.FAILED and (job.actual_credits or 0) > 0
            )
            if not refundable:
                raise UserError(
                    "refund.not_refundable",
                    job_id=job_id,
                    status=job.status.value,
                    detail=f"job {job_id} is {job.status.value}",
                )
            await conn.execute(
                "UPDATE jobs SET status = 'refunded', refunded_by = ?, refunded_at = ?"
                " WHERE id = ?",
                (by, self._now_iso(), job_id),
            )
            row = await _fetchone(conn, _SELECT_JOB, (job_id,))
        assert row is not None
        return _job_from_row(row)

    async def get_job(self, job_id: int) -> JobRecord | None:
        """Return one job, or None."""
        if not _is_row_id(job_id):
            return None
        async with self._read() as conn:
            row = await _fetchone(conn, _SELECT_JOB, (job_id,))
        return _job_from_row(row) if row is not None else None

    async def set_result_refs(self, job_id: int, refs: list[str]) -> None:
        """Remember the platform file refs of a job's images (for "vary" buttons)."""
        async with self._write() as conn:
            cursor = await conn.execute(
                "UPDATE jobs SET result_refs = ? WHERE id = ?",
                (json.dumps([str(ref) for ref in refs]), job_id),
            )
            changed = cursor.rowcount
            await cursor.close()
            if changed == 0:
                raise JobNotFound(job_id=job_id, detail=f"result refs for missing job {job_id}")

    # --- users and chats ----------------------------------------------------------------

    async def get_user(self, user_key: str) -> UserRecord | None:
        """Return one user, or None."""
        async with self._read() as conn:
            row = await _fetchone(conn, "SELECT * FROM users WHERE user_key = ?", (user_key,))
        return _user_from_row(row) if row is not None else None

    async def get_chat(self, chat_key: str) -> ChatRecord | None:
        """Return one chat, or None."""
        async with self._read() as conn:
            row = await _fetchone(conn, "SELECT * FROM chats WHERE chat_key = ?", (chat_key,))
        return _chat_from_row(row) if row is not None else None

    async def _ensure_user(self, conn: aiosqlite.Connection, user_key: str, now: str) -> None:
        platform, user_id = _split_key(user_key)
        await conn.execute(
            "INSERT INTO users (user_key, platform, user_id, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_key) DO NOTHING",
            (user_key, platform, user_id, now, now),
        )

    async def _ensure_chat(self, conn: aiosqlite.Connection, chat_key: str, now: str) -> None:
        platform, chat_id = _split_key(chat_key)
        await conn.execute(
            "INSERT INTO chats (chat_key, platform, chat_id, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (chat_key) DO NOTHING",
            (chat_key, platform, chat_id, now, now),
        )

    async def set_user_limits(
        self, user_key: str, daily: float | None, monthly: float | None
    ) -> None:
        """Override a user's daily and monthly limits (None = back to the default)."""
        _check_credits("daily", daily, allow_none=True)
        _check_credits("monthly", monthly, allow_none=True)
        now = self._now_iso()
        async with self._write() as conn:
            await self._ensure_user(conn, user_key, now)
            await conn.execute(
                "UPDATE users SET daily_limit = ?, monthly_limit = ?, updated_at = ?"
                " WHERE user_key = ?",
                (daily, monthly, now, user_key),
            )

    async def set_chat_limit(self, chat_key: str, daily: float | None) -> None:
        """Override a chat's daily limit (None = back to the default)."""
        _check_credits("daily", daily, allow_none=True)
        now = self._now_iso()
        async with self._write() as conn:
            await self._ensure_chat(conn, chat_key, now)
            await conn.execute(
                "UPDATE chats SET daily_limit = ?, updated_at = ? WHERE chat_key = ?",
                (daily, now, chat_key),
            )

    async def set_blocked(self, key: str, blocked: bool) -> None:
        """Block or unblock a user key or a chat key.

        A key already known as a user and/or a chat is updated where it is known. A key not
        seen yet is blocked as both, since a bare `platform:id` does not say which it is.
        """
        _split_key(key)
        now = self._now_iso()
        async with self._write() as conn:
            cursor = await conn.execute(
                "UPDATE users SET blocked = ?, updated_at = ? WHERE user_key = ?",
                (int(blocked), now, key),
            )
            changed = cursor.rowcount
            await cursor.close()
            cursor = await conn.execute(
                "UPDATE chats SET blocked = ?, updated_at = ? WHERE chat_key = ?",
                (int(blocked), now, key),
            )
            changed += cursor.rowcount
            await cursor.close()
            if changed == 0 and blocked:
                await self._ensure_user(conn, key, now)
                await self._ensure_chat(conn, key, now)
                await conn.execute("UPDATE users SET blocked = 1 WHERE user_key = ?", (key,))
                await conn.execute("UPDATE chats SET blocked = 1 WHERE chat_key = ?", (key,))

    async def is_blocked(self, user_key: str, chat_key: str | None) -> bool:
        """Say whether the user or the chat is blocked."""
        # Asked before every job. One SELECT is its own consistent snapshot, so it needs no
        # BEGIN/COMMIT (two more thread hops); the lock still keeps it out of others' work.
        async with self._lock:
            row = await _fetchone(
                self._require(),
                "SELECT EXISTS (SELECT 1 FROM users WHERE user_key = ? AND blocked)"
                " OR EXISTS (SELECT 1 FROM chats WHERE chat_key = ? AND blocked)",
                (user_key, chat_key),
            )
        return bool(row[0]) if row is not None else False

    async def set_language(self, user_key: str, lang: str | None) -> None:
        """Set the language a user chose (None = follow the platform again)."""
        now = self._now_iso()
        async with self._write() as conn:
            await self._ensure_user(conn, user_key, now)
            await conn.execute(
                "UPDATE users SET language = ?, updated_at = ? WHERE user_key = ?",
                (lang, now, user_key),
            )

    # --- reports ------------------------------------------------------------------------

    async def spend_report(self, user_key: str, *, last: int = 5) -> SpendReport:
        """Report a user's spend today, this month and all time against their limits."""
        now = self._now()
        async with self._read() as conn:
            user = await _fetchone(
                conn,
                "SELECT display_name, daily_limit, monthly_limit FROM users WHERE user_key = ?",
                (user_key,),
            )
            # The three sums in one statement: one thread hop instead of three (every job
            # ends with this report).
            sums = await _fetchone(
                conn,
                "SELECT"
                " (SELECT SUM(charged) FROM job_charges WHERE user_key = ? AND created_at >= ?),"
                " (SELECT SUM(charged) FROM job_charges WHERE user_key = ? AND created_at >= ?),"
                " (SELECT SUM(charged) FROM job_charges WHERE user_key = ?)",
                (user_key, self._day_start(now), user_key, self._month_start(now), user_key),
            )
            today, month, total = (
                float(value) if value is not None else 0.0 for value in (sums or (None,) * 3)
            )
            rows = await _fetchall(conn, _SELECT_LAST_JOBS, (user_key, last))
        daily = self._limits.user_daily
        monthly = self._limits.user_monthly
        name = ""
        if user is not None:
            name = user["display_name"]
            daily = daily if user["daily_limit"] is None else user["daily_limit"]
            monthly = monthly if user["monthly_limit"] is None else user["monthly_limit"]
        return SpendReport(
            user_key=user_key,
            display_name=name,
            today=today,
            month=month,
            all_time=total,
            daily_limit=daily,
            monthly_limit=monthly,
            daily_remaining=_remaining(daily, today),
            monthly_remaining=_remaining(monthly, month),
            last_jobs=tuple(_job_from_row(row) for row in rows),
        )

    async def top_spenders(
        self, since: datetime, limit: int = 10, *, until: datetime | None = None
    ) -> list[Spender]:
        """List the users who spent most since `since` (and before `until`, if given)."""
        until_iso = _iso(until) if until is not None else None
        async with self._read() as conn:
            rows = await _fetchall(
                conn,
                "SELECT c.user_key, COALESCE(u.display_name, '') AS name,"
                " SUM(c.charged) AS credits, COUNT(*) AS jobs"
                " FROM job_charges AS c LEFT JOIN users AS u ON u.user_key = c.user_key"
                " WHERE c.created_at >= ? AND (? IS NULL OR c.created_at < ?)"
                " GROUP BY c.user_key ORDER BY credits DESC, jobs DESC, c.user_key LIMIT ?",
                (_iso(since), until_iso, until_iso, limit),
            )
        return [Spender(r["user_key"], r["name"], float(r["credits"]), r["jobs"]) for r in rows]

    async def chat_totals(
        self, since: datetime, *, until: datetime | None = None
    ) -> list[ChatTotal]:
        """List spend per chat since `since` (and before `until`), largest first."""
        until_iso = _iso(until) if until is not None else None
        async with self._read() as conn:
            rows = await _fetchall(
                conn,
                "SELECT chat_key, SUM(charged) AS credits, COUNT(*) AS jobs FROM job_charges"
                " WHERE chat_key IS NOT NULL AND created_at >= ? AND (? IS NULL OR created_at < ?)"
                " GROUP BY chat_key ORDER BY credits DESC, jobs DESC, chat_key",
                (_iso(since), until_iso, until_iso),
            )
        return [ChatTotal(r["chat_key"], float(r["credits"]), r["jobs"]) for r in rows]

    async def export_csv(self, since: datetime | None = None, user_key: str | None = None) -> str:
        """Return the jobs (since a time, of one user) as CSV: a header, then one row each."""
        since_iso = _iso(since) if since is not None else None
        async with self._read() as conn:
            rows = await _fetchall(conn, _SELECT_EXPORT, (since_iso, since_iso, user_key, user_key))
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            job = _job_from_row(row)
            usage = job.usage or Usage()
            writer.writerow(
                (
                    job.id,
                    _iso(job.created_at),
                    _iso(job.started_at) if job.started_at else "",
                    _iso(job.finished_at) if job.finished_at else "",
                    job.status.value,
                    job.user_key,
                    job.chat_key or "",
                    job.platform,
                    _csv_text(job.display_name),
                    _csv_text(job.command_text),
                    job.model,
                    job.size,
                    job.quality,
                    job.n,
                    job.reference_count,
                    job.estimated_credits,
                    "" if job.actual_credits is None else job.actual_credits,
                    job.charged,
                    job.error_code or "",
                    usage.text_input_tokens if job.usage else "",
                    usage.image_input_tokens if job.usage else "",
                    usage.image_output_tokens if job.usage else "",
                    usage.text_output_tokens if job.usage else "",
                    usage.total_tokens if job.usage else "",
                    job.refunded_by or "",
                    _iso(job.refunded_at) if job.refunded_at else "",
                )
            )
        return out.getvalue()

    async def global_spent_today(self) -> float:
        """Return what the whole bot has spent (and reserved) today, UTC."""
        async with self._read() as conn:
            return await _sum_charged(
                conn,
                "SELECT SUM(charged) FROM job_charges WHERE created_at >= ?",
                (self._day_start(self._now()),),
            )
