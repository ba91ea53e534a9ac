"""The spend ledger: jobs, reservations, limits and reports, in one SQLite file.

Every image job is priced before it runs and written here as `reserved` in the same
transaction that checks every spend limit, so concurrent requests — from one process or
several sharing the file — can never overspend. The job is then settled at its exact cost,
failed (releasing the reservation, or charging what the upstream reported), or, if the
process died mid-job, marked `unsettled` at start-up and left for an admin to refund.

What a job counts against a limit, by status (the generated column `jobs.charged`, the one
definition; the `job_charges` view and every report read it):

    reserved, unsettled     estimated_credits   (the upstream may have billed)
    succeeded, failed       actual_credits      (0 when NULL)
    refunded                0

Days and months are UTC: "today" starts at 00:00 UTC and "this month" on the 1st at
00:00 UTC; a job belongs to the day it was reserved (`created_at`). Times are stored as
fixed-width UTC ISO-8601 text, so they compare as strings. A limit of 0 means unlimited,
for the defaults and for per-user / per-chat overrides alike; NULL override = the default.

Running totals: `spend_totals` holds, per limit scope (user day, user month, chat day,
global day) and period, the sum of `jobs.charged` in whole micro-credits. Triggers on
`jobs` keep it in the same statement that inserts or changes a job, so a limit check is
four primary-key lookups however many jobs the day holds, and no code path can forget to
update it. Integer micro-credits add up exactly in any order, so a total always equals
the sum over its jobs; reports (`spend_report`, top spenders, chat totals) still sum the
jobs themselves, to the last bit of a float.

Concurrency and speed: one sqlite3 connection per `Ledger`, used by one dedicated thread
(a single-worker executor); every public method is one synchronous function run there, so
its statements cost no event-loop round trips. aiosqlite, used before, runs each
statement as its own hop to its thread and back (~0.1 ms here), so a transaction spanned
several hops and held an `asyncio.Lock` across them: ~10 hops per reserve + settle kept the
ledger under 500 pairs/s, and aiosqlite has no public call that runs a function on its
thread. Calls that queue up while the thread is busy run as one batch (group commit, see
`_ConnectionThread`): one transaction, each call in its own savepoint, one COMMIT and one
wake-up of the event loop for all; a caller hears its result only after that COMMIT.
Calls cannot interleave, since each is a single function. Once queued, a call runs to its
end even if its caller is cancelled (a reservation whose caller is gone is released at
once). Between connections and processes: WAL journal, a busy timeout, and every write
transaction `BEGIN IMMEDIATE` (the write lock is taken before anything is read, so no
reader can be upgraded into a "database is locked").

Durability: WAL with `synchronous = NORMAL` — a commit is safe against a crash or kill of
the process (the WAL is in the OS's hands), and the file is never corrupted; a power loss
or OS crash may lose the last transactions before the next checkpoint. For spend records
that is the right trade: FULL would fsync on every commit, ~1–10 ms each on real disks.

The schema is built by numbered `MIGRATIONS`, applied at start-up and recorded in the
`schema_version` table; a database made by an older release is upgraded in place.
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
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from core.errors import DuplicateJob, JobNotFound, LimitExceeded, UserError
from core.pricing import Usage

if TYPE_CHECKING:
    from types import TracebackType

    from core.config import Settings
    from core.requester import Requester

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000
# Float sums of credits drift in the last bits; a request that fits exactly must not be refused.
_EPSILON = 1e-6
# Running totals count whole micro-credits (see migration 3).
_MICRO = 1_000_000

_T = TypeVar("_T")


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
            # What a job counts, until migration 3 made it the column jobs.charged.
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
    Migration(
        3,
        "jobs.charged, and running spend totals per limit scope and period",
        (
            # The one definition of what a job counts against a limit (see the docstring);
            # the view, the totals and the reports all read it from here.
            """ALTER TABLE jobs ADD COLUMN charged REAL GENERATED ALWAYS AS (
                   CASE status
                       WHEN 'reserved' THEN estimated_credits
                       WHEN 'unsettled' THEN estimated_credits
                       WHEN 'refunded' THEN 0.0
                       ELSE COALESCE(actual_credits, 0.0)
                   END) VIRTUAL""",
            # Totals are kept in whole micro-credits: integer sums are exact whatever the
            # order of the additions, so a total never drifts from the sum of its jobs.
            "ALTER TABLE jobs ADD COLUMN charged_micro INTEGER GENERATED ALWAYS AS"
            " (CAST(ROUND(charged * 1000000) AS INTEGER)) VIRTUAL",
            "DROP VIEW job_charges",
            "CREATE VIEW job_charges AS"
            " SELECT id, user_key, chat_key, created_at, status, charged FROM jobs",
            # scope: the limit it serves; key: user_key, chat_key or '' (global); period:
            # the UTC day (YYYY-MM-DD) or month (YYYY-MM) of the jobs' created_at.
            """CREATE TABLE spend_totals (
                scope TEXT NOT NULL CHECK (scope IN
                    ('user_daily', 'user_monthly', 'chat_daily', 'global_daily')),
                key TEXT NOT NULL,
                period TEXT NOT NULL,
                micro_credits INTEGER NOT NULL,
                PRIMARY KEY (scope, key, period)
            ) WITHOUT ROWID""",
            "INSERT INTO spend_totals (scope, key, period, micro_credits)"
            " SELECT 'user_daily', user_key, substr(created_at, 1, 10), SUM(charged_micro)"
            " FROM jobs GROUP BY 2, 3",
            "INSERT INTO spend_totals (scope, key, period, micro_credits)"
            " SELECT 'user_monthly', user_key, substr(created_at, 1, 7), SUM(charged_micro)"
            " FROM jobs GROUP BY 2, 3",
            "INSERT INTO spend_totals (scope, key, period, micro_credits)"
            " SELECT 'chat_daily', chat_key, substr(created_at, 1, 10), SUM(charged_micro)"
            " FROM jobs WHERE chat_key IS NOT NULL GROUP BY 2, 3",
            "INSERT INTO spend_totals (scope, key, period, micro_credits)"
            " SELECT 'global_daily', '', substr(created_at, 1, 10), SUM(charged_micro)"
            " FROM jobs GROUP BY 3",
            # Triggers keep the totals in the very statement that changes a job, so no code
            # path (nor a hand-written INSERT) can forget them. A job's owner and day never
            # change, so an update only moves its charge within the same rows.
            """CREATE TRIGGER jobs_keys_fixed
               BEFORE UPDATE OF user_key, chat_key, created_at ON jobs
               WHEN NEW.user_key IS NOT OLD.user_key OR NEW.chat_key IS NOT OLD.chat_key
                    OR NEW.created_at IS NOT OLD.created_at
               BEGIN
                   SELECT RAISE(ABORT, 'the user, chat and time of a job never change');
               END""",
            """CREATE TRIGGER jobs_totals_insert AFTER INSERT ON jobs
               BEGIN
                   INSERT INTO spend_totals (scope, key, period, micro_credits) VALUES
                       ('user_daily', NEW.user_key, substr(NEW.created_at, 1, 10),
                        NEW.charged_micro),
                       ('user_monthly', NEW.user_key, substr(NEW.created_at, 1, 7),
                        NEW.charged_micro),
                       ('global_daily', '', substr(NEW.created_at, 1, 10), NEW.charged_micro)
                   ON CONFLICT DO UPDATE SET micro_credits = micro_credits + excluded.micro_credits;
                   INSERT INTO spend_totals (scope, key, period, micro_credits)
                   SELECT 'chat_daily', NEW.chat_key, substr(NEW.created_at, 1, 10),
                          NEW.charged_micro
                   WHERE NEW.chat_key IS NOT NULL
                   ON CONFLICT DO UPDATE SET micro_credits = micro_credits + excluded.micro_credits;
               END""",
            """CREATE TRIGGER jobs_totals_update
               AFTER UPDATE OF status, estimated_credits, actual_credits ON jobs
               WHEN NEW.charged_micro IS NOT OLD.charged_micro
               BEGIN
                   UPDATE spend_totals
                   SET micro_credits = micro_credits + NEW.charged_micro - OLD.charged_micro
                   WHERE (scope = 'user_daily' AND key = NEW.user_key
                          AND period = substr(NEW.created_at, 1, 10))
                      OR (scope = 'user_monthly' AND key = NEW.user_key
                          AND period = substr(NEW.created_at, 1, 7))
                      OR (scope = 'chat_daily' AND key = NEW.chat_key
                          AND period = substr(NEW.created_at, 1, 10))
                      OR (scope = 'global_daily' AND key = ''
                          AND period = substr(NEW.created_at, 1, 10));
               END""",
            """CREATE TRIGGER jobs_totals_delete AFTER DELETE ON jobs
               BEGIN
                   UPDATE spend_totals SET micro_credits = micro_credits - OLD.charged_micro
                   WHERE (scope = 'user_daily' AND key = OLD.user_key
                          AND period = substr(OLD.created_at, 1, 10))
                      OR (scope = 'user_monthly' AND key = OLD.user_key
                          AND period = substr(OLD.created_at, 1, 7))
                      OR (scope = 'chat_daily' AND key = OLD.chat_key
                          AND period = substr(OLD.created_at, 1, 10))
                      OR (scope = 'global_daily' AND key = ''
                          AND period = substr(OLD.created_at, 1, 10));
               END""",
        ),
    ),
    Migration(
        4,
        "jobs.source_ref: the platform message a job came from, unique",
        (
            # Telegram hands an update out again when the process died before confirming it;
            # the message it came from must not start (and charge) a second job.
            "ALTER TABLE jobs ADD COLUMN source_ref TEXT",
            "CREATE UNIQUE INDEX jobs_source_ref ON jobs (source_ref)"
            " WHERE source_ref IS NOT NULL",
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
    source_ref: str | None = None  # the platform message or button press it came from


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
# All a reservation reads, in one statement: the user's row as we know it (to skip an
# upsert that would change nothing), the chat's, and the four running totals it checks.
_SELECT_FOR_RESERVE = (
    "SELECT u.user_key AS user_known, u.display_name, u.language,"
    " u.daily_limit, u.monthly_limit,"
    " c.chat_key AS chat_known, c.daily_limit AS chat_daily,"
    " (SELECT micro_credits FROM spend_totals"
    "   WHERE scope = 'user_daily' AND key = ? AND period = ?) AS user_daily,"
    " (SELECT micro_credits FROM spend_totals"
    "   WHERE scope = 'user_monthly' AND key = ? AND period = ?) AS user_monthly,"
    " (SELECT micro_credits FROM spend_totals"
    "   WHERE scope = 'chat_daily' AND key = ? AND period = ?) AS chat_daily_total,"
    " (SELECT micro_credits FROM spend_totals"
    "   WHERE scope = 'global_daily' AND key = '' AND period = ?) AS global_daily"
    " FROM (SELECT 1)"
    " LEFT JOIN users AS u ON u.user_key = ?"
    " LEFT JOIN chats AS c ON c.chat_key = ?"
)
_UPSERT_USER = (
    "INSERT INTO users (user_key, platform, user_id, display_name, language,"
    " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (user_key) DO UPDATE SET"
    # An empty name from the platform keeps the one we know; a language the user chose
    # (set_language) is not overwritten by the platform's.
    "  display_name = CASE WHEN excluded.display_name = '' THEN display_name"
    "                      ELSE excluded.display_name END,"
    "  language = COALESCE(language, excluded.language),"
    "  updated_at = excluded.updated_at"
)
_INSERT_CHAT = (
    "INSERT INTO chats (chat_key, platform, chat_id, created_at, updated_at)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (chat_key) DO NOTHING"
)
_INSERT_JOB = (
    "INSERT INTO jobs (user_key, chat_key, platform, display_name, command_text,"
    " request_json, model, size, quality, n, reference_count, status,"
    " estimated_credits, created_at, source_ref)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'reserved', ?, ?, ?)"
)
# The status guard in the WHERE makes a second settle or fail a no-op.
_FINISH_JOB = (
    "UPDATE jobs SET status = ?, actual_credits = ?, usage_json = ?,"
    " error_code = ?, finished_at = ? WHERE id = ? AND status = 'reserved'"
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


def _limit(default: float, override: float | None) -> float:
    return default if override is None else override


def _remaining(limit: float, spent: float) -> float | None:
    return None if limit <= 0 else max(0.0, limit - spent)


def _user_row_differs(row: sqlite3.Row, requester: Requester) -> bool:
    # True when the user upsert would change more than `updated_at`.
    if row["user_known"] is None:
        return True
    if requester.display_name and requester.display_name != row["display_name"]:
        return True
    return row["language"] is None and requester.language is not None


class LedgerConnection(sqlite3.Connection):
    """The ledger's sqlite3 connection: its own class, so the statements it runs can be watched."""


def _connect(target: str) -> LedgerConnection:
    # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves.
    conn = sqlite3.connect(
        target,
        timeout=BUSY_TIMEOUT_MS / 1000,
        isolation_level=None,
        factory=LedgerConnection,
    )
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _fetchone(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
    row: sqlite3.Row | None = conn.execute(sql, params).fetchone()
    return row


def _fetchall(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
    return conn.execute(sql, params).fetchall()


def _rollback_quietly(conn: sqlite3.Connection) -> None:
    # "no transaction is active" just means there was nothing left to undo.
    with suppress(sqlite3.OperationalError):
        conn.execute("ROLLBACK")


@dataclass(frozen=True)
class _Call:
    """One ledger call waiting for the connection's thread."""

    fn: Callable[[sqlite3.Connection], Any]
    write: bool
    future: asyncio.Future[Any]


# Calls that share one transaction at most: bounds how long a batch holds the write lock.
_MAX_BATCH = 64


def _run_batch(conn: sqlite3.Connection, calls: Sequence[_Call]) -> list[tuple[bool, Any]]:
    """Run calls of one kind in one transaction, each in its own savepoint; return outcomes.

    A call that raises is rolled back to its savepoint alone, so a refusal writes nothing and
    the others still commit. If the transaction itself fails (BEGIN after the busy timeout,
    a failed COMMIT, an I/O error that made SQLite roll everything back), every call of the
    batch gets that error: none of them was committed.
    """
    outcomes: list[tuple[bool, Any]] = []
    try:
        if conn.in_transaction:  # a failed ROLLBACK could have left one open
            _rollback_quietly(conn)
        if calls[0].write:
            # IMMEDIATE takes the write lock before anything is read (waiting under the busy
            # timeout), so no reader is ever upgraded into "database is locked".
            conn.execute("BEGIN IMMEDIATE")
        else:
            # One snapshot for the whole batch (WAL): several SELECTs agree with each other.
            conn.execute("BEGIN")
        for call in calls:
            conn.execute("SAVEPOINT ledger_call")
            try:
                outcomes.append((True, call.fn(conn)))
            except Exception as err:
                if not conn.in_transaction:
                    raise  # SQLite rolled back the whole transaction
                conn.execute("ROLLBACK TO ledger_call")
                outcomes.append((False, err))
            conn.execute("RELEASE ledger_call")
        conn.execute("COMMIT")
    except BaseException as err:
        _rollback_quietly(conn)
        return [(False, err)] * len(calls)
    return outcomes


def _deliver(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in results:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class _ConnectionThread:
    """One sqlite3 connection and the single thread that runs every call on it.

    Calls queue up while the thread is busy; the thread then takes all of them and runs
    them in order, consecutive writes (or reads) sharing one transaction, each call in its
    own savepoint — group commit: one COMMIT, and one wake-up of the event loop, for the
    whole batch, where each was a COMMIT and two thread hops of its own. A caller's future
    is resolved only after the COMMIT that holds its work.
    """

    def __init__(self, executor: ThreadPoolExecutor, conn: LedgerConnection) -> None:
        self._executor = executor
        # Used only on the executor's thread (sqlite3's same-thread check enforces it).
        self._conn = conn
        self._closed = False
        self._mutex = threading.Lock()
        self._pending: list[_Call] = []
        self._drain_queued = False

    @classmethod
    async def start(cls, target: str) -> _ConnectionThread:
        """Start the thread and open the connection on it."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgbot-ledger")
        try:
            conn = await asyncio.wrap_future(executor.submit(_connect, target))
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(executor, conn)

    def submit(self, fn: Callable[[sqlite3.Connection], _T], *, write: bool) -> asyncio.Future[_T]:
        """Queue `fn(conn)` on the thread; return the future of its result."""
        if self._closed:
            raise RuntimeError("the ledger is closed")
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        with self._mutex:
            self._pending.append(_Call(fn, write, future))
            if self._drain_queued:
                return future  # the drain already queued takes this call too
            self._drain_queued = True
        self._executor.submit(self._drain)
        return future

    def _drain(self) -> None:
        # On the connection's thread: take every call queued so far and run them.
        with self._mutex:
            calls, self._pending = self._pending, []
            self._drain_queued = False
        results: list[tuple[asyncio.Future[Any], bool, Any]] = []
        for _, group in itertools.groupby(calls, key=lambda call: call.write):
            kind = list(group)
            for start in range(0, len(kind), _MAX_BATCH):
                batch = kind[start : start + _MAX_BATCH]
                outcomes = _run_batch(self._conn, batch)
                results += [
                    (call.future, ok, value)
                    for call, (ok, value) in zip(batch, outcomes, strict=True)
                ]
        for loop in {future.get_loop() for future, _, _ in results}:
            mine = [result for result in results if result[0].get_loop() is loop]
            with suppress(RuntimeError):  # that event loop is closed: no one is waiting
                loop.call_soon_threadsafe(_deliver, mine)

    async def close(self) -> None:
        """Let the queued calls finish, close the connection and end the thread."""
        if self._closed:
            return
        self._closed = True
        try:
            # FIFO: every drain queued before this runs first.
            await asyncio.shield(asyncio.wrap_future(self._executor.submit(self._conn.close)))
        finally:
            self._executor.shutdown(wait=False)


def _migrate(conn: sqlite3.Connection, applied_at: str) -> None:
    """Apply every migration newer than the database, each recorded in schema_version."""
    conn.execute(SCHEMA_VERSION_DDL)
    row = _fetchone(conn, "SELECT MAX(version) FROM schema_version")
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
            conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
            (migration.version, migration.description, applied_at),
        )


def _log_release_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("could not release a cancelled reservation: %r", future.exception())


class Ledger:
    """Spend, reservations, limits and reports over one SQLite file."""

    def __init__(
        self, db: _ConnectionThread, limits: Limits, clock: Callable[[], datetime]
    ) -> None:
        self._db: _ConnectionThread | None = db
        self._limits = limits
        self._clock = clock

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
        ledger = cls(await _ConnectionThread.start(target), limits, clock or _utc_now)
        applied_at = ledger._now_iso()
        try:
            await ledger._write(lambda conn: _migrate(conn, applied_at))
        except BaseException:
            await ledger.close()
            raise
        return ledger

    async def close(self) -> None:
        """Close the connection once the calls already made have finished; safe twice."""
        db, self._db = self._db, None
        if db is not None:
            await db.close()

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

        def read(conn: sqlite3.Connection) -> int:
            row = _fetchone(conn, "SELECT MAX(version) FROM schema_version")
            return int(row[0]) if row is not None and row[0] is not None else 0

        return await self._read(read)

    async def check_writable(self) -> None:
        """Take the write lock and let it go, proving the file accepts writes."""

        def touch(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE schema_version SET version = version WHERE 0")

        await self._write(touch)

    # --- calls on the connection's thread -------------------------------------------------

    def _require(self) -> _ConnectionThread:
        if self._db is None:
            raise RuntimeError("the ledger is closed")
        return self._db

    async def _write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        return await self._call(fn, write=True)

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        return await self._call(fn, write=False)

    async def _call(self, fn: Callable[[sqlite3.Connection], _T], *, write: bool) -> _T:
        # Once queued, a call runs to its end: cancelling the caller only stops the waiting,
        # so nothing is ever left half done (and shield retrieves an outcome no one awaits).
        return await asyncio.shield(self._require().submit(fn, write=write))

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
        now_iso = self._now_iso()
        # The periods of the running totals: the same prefixes the triggers take of
        # created_at (fixed-width UTC text).
        day, month = now_iso[:10], now_iso[:7]
        defaults = self._limits

        def reserve_on(conn: sqlite3.Connection) -> int:
            if spec.source_ref is not None:
                seen = _fetchone(
                    conn, "SELECT id FROM jobs WHERE source_ref = ?", (spec.source_ref,)
                )
                if seen is not None:
                    raise DuplicateJob(job_id=int(seen["id"]), silent=True)
            row = _fetchone(
                conn,
                _SELECT_FOR_RESERVE,
                (user_key, day, user_key, month, chat_key, day, day, user_key, chat_key),
            )
            assert row is not None
            # (scope, limit, micro-credits it already counts)
            checks = [
                ("user_daily", _limit(defaults.user_daily, row["daily_limit"]), row["user_daily"]),
                (
                    "user_monthly",
                    _limit(defaults.user_monthly, row["monthly_limit"]),
                    row["user_monthly"],
                ),
            ]
            if chat_key is not None:
                checks.append(
                    (
                        "chat_daily",
                        _limit(defaults.chat_daily, row["chat_daily"]),
                        row["chat_daily_total"],
                    )
                )
            checks.append(("global_daily", defaults.global_daily, row["global_daily"]))
            # Refuse on the tightest limit, so "what is left" is what would really fit.
            tightest: tuple[str, float, float] | None = None
            for scope, limit, micro in checks:
                if limit <= 0:
                    continue
                remaining = max(0.0, limit - (micro or 0) / _MICRO)
                if tightest is None or remaining < tightest[2]:
                    tightest = (scope, limit, remaining)
            if tightest is not None and estimate > tightest[2] + _EPSILON:
                scope, limit, remaining = tightest
                # Raised before any write; the rollback leaves nothing behind.
                raise LimitExceeded(
                    f"limit.{scope}",
                    scope=scope,
                    asked=estimate,
                    remaining=remaining,
                    limit=limit,
                    detail=f"{user_key} asked {estimate} with {remaining} of {limit} left",
                )
            if _user_row_differs(row, requester):
                conn.execute(
                    _UPSERT_USER,
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
            if chat_key is not None and row["chat_known"] is None:
                conn.execute(
                    _INSERT_CHAT,
                    (chat_key, requester.platform, requester.chat_id, now_iso, now_iso),
                )
            job_id = conn.execute(
                _INSERT_JOB,
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
                    spec.source_ref,
                ),
            ).lastrowid
            assert job_id is not None
            return job_id

        future = self._require().submit(reserve_on, write=True)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(self._release_orphan)
            raise

    def _release_orphan(self, future: asyncio.Future[int]) -> None:
        # The caller of `reserve` was cancelled while its job was being written: no one will
        # draw or settle it, so give the room back now rather than at the next start-up.
        if future.cancelled() or future.exception() is not None or self._db is None:
            return
        release = self._db.submit(
            self._finish_on(future.result(), JobStatus.FAILED, 0.0, None, "cancelled"),
            write=True,
        )
        release.add_done_callback(_log_release_failure)

    async def mark_started(self, job_id: int) -> bool:
        """Record that a reserved job started drawing; False if it is not reserved."""
        now_iso = self._now_iso()

        def start_on(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute(
                    "UPDATE jobs SET started_at = ? WHERE id = ? AND status = 'reserved'",
                    (now_iso, job_id),
                ).rowcount
                > 0
            )

        return await self._write(start_on)

    async def settle(self, job_id: int, credits: float, usage: Usage | None) -> bool:
        """Replace a reservation with its exact cost; False (no-op) if it is not reserved."""
        _check_credits("credits", credits)
        return await self._write(self._finish_on(job_id, JobStatus.SUCCEEDED, credits, usage, None))

    async def fail(
        self, job_id: int, error_code: str, credits: float = 0.0, usage: Usage | None = None
    ) -> bool:
        """Mark a reserved job failed at `credits` (0 releases it); False if not reserved."""
        _check_credits("credits", credits)
        return await self._write(
            self._finish_on(job_id, JobStatus.FAILED, credits, usage, error_code)
        )

    def _finish_on(
        self,
        job_id: int,
        status: JobStatus,
        credits: float,
        usage: Usage | None,
        error_code: str | None,
    ) -> Callable[[sqlite3.Connection], bool]:
        params = (status.value, float(credits), _usage_json(usage), error_code, self._now_iso())

        def finish_on(conn: sqlite3.Connection) -> bool:
            return conn.execute(_FINISH_JOB, (*params, job_id)).rowcount > 0

        return finish_on

    async def mark_unsettled(self, job_id: int) -> bool:
        """Mark a reserved job whose cost is unknown `unsettled`; False if not reserved."""

        def mark_on(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute(
                    "UPDATE jobs SET status = 'unsettled' WHERE id = ? AND status = 'reserved'",
                    (job_id,),
                ).rowcount
                > 0
            )

        return await self._write(mark_on)

    async def list_stale(self, older_than_seconds: float) -> list[JobRecord]:
        """List the reserved jobs older than that: what `recover_stale` would resolve."""
        cutoff = _iso(self._now() - timedelta(seconds=older_than_seconds))

        def read(conn: sqlite3.Connection) -> list[JobRecord]:
            rows = _fetchall(
                conn,
                "SELECT * FROM jobs WHERE status = 'reserved' AND created_at < ? ORDER BY id",
                (cutoff,),
            )
            return [_job_from_row(row) for row in rows]

        return await self._read(read)

    async def recover_stale(self, older_than_seconds: float) -> list[int]:
        """Resolve reserved jobs older than that, left behind by a dead process.

        A job that had started may have been billed upstream: it becomes `unsettled`,
        counted at its estimate until an admin refunds it; its id is returned. A job that
        never started (it was still queued) cannot have been billed: it is released as
        `failed` with error `interrupted` and costs nothing.
        """
        now = self._now()
        cutoff = _iso(now - timedelta(seconds=older_than_seconds))
        now_iso = _iso(now)

        def recover_on(conn: sqlite3.Connection) -> list[int]:
            rows = _fetchall(
                conn,
                "SELECT id FROM jobs WHERE status = 'reserved' AND created_at < ?"
                " AND started_at IS NOT NULL ORDER BY id",
                (cutoff,),
            )
            conn.execute(
                "UPDATE jobs SET status = 'unsettled' WHERE status = 'reserved'"
                " AND created_at < ? AND started_at IS NOT NULL",
                (cutoff,),
            )
            conn.execute(
                "UPDATE jobs SET status = 'failed', actual_credits = 0,"
                " error_code = 'interrupted', finished_at = ?"
                " WHERE status = 'reserved' AND created_at < ? AND started_at IS NULL",
                (now_iso, cutoff),
            )
            return [int(row["id"]) for row in rows]

        return await self._write(recover_on)

    async def list_unsettled(self) -> list[JobRecord]:
        """List the jobs whose cost is unknown, oldest first, for admins."""

        def read(conn: sqlite3.Connection) -> list[JobRecord]:
            return [_job_from_row(row) for row in _fetchall(conn, _SELECT_UNSETTLED)]

        return await self._read(read)

    async def refund(self, job_id: int, by: str) -> JobRecord:
        """Refund a succeeded, unsettled or charged failed job; return the refunded record."""
        now_iso = self._now_iso()

        def refund_on(conn: sqlite3.Connection) -> JobRecord:
            row = _fetchone(conn, _SELECT_JOB, (job_id,)) if _is_row_id(job_id) else None
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
            conn.execute(
                "UPDATE jobs SET status = 'refunded', refunded_by = ?, refunded_at = ?"
                " WHERE id = ?",
                (by, now_iso, job_id),
            )
            row = _fetchone(conn, _SELECT_JOB, (job_id,))
            assert row is not None
            return _job_from_row(row)

        return await self._write(refund_on)

    async def get_job(self, job_id: int) -> JobRecord | None:
        """Return one job, or None."""
        if not _is_row_id(job_id):
            self._require()
            return None

        def read(conn: sqlite3.Connection) -> JobRecord | None:
            row = _fetchone(conn, _SELECT_JOB, (job_id,))
            return _job_from_row(row) if row is not None else None

        return await self._read(read)

    async def set_result_refs(self, job_id: int, refs: list[str]) -> None:
        """Remember the platform file refs of a job's images (for "vary" buttons)."""
        refs_json = json.dumps([str(ref) for ref in refs])

        def write_on(conn: sqlite3.Connection) -> None:
            changed = conn.execute(
                "UPDATE jobs SET result_refs = ? WHERE id = ?", (refs_json, job_id)
            ).rowcount
            if changed == 0:
                raise JobNotFound(job_id=job_id, detail=f"result refs for missing job {job_id}")

        await self._write(write_on)

    # --- users and chats ----------------------------------------------------------------

    async def get_user(self, user_key: str) -> UserRecord | None:
        """Return one user, or None."""

        def read(conn: sqlite3.Connection) -> UserRecord | None:
            row = _fetchone(conn, "SELECT * FROM users WHERE user_key = ?", (user_key,))
            return _user_from_row(row) if row is not None else None

        return await self._read(read)

    async def get_chat(self, chat_key: str) -> ChatRecord | None:
        """Return one chat, or None."""

        def read(conn: sqlite3.Connection) -> ChatRecord | None:
            row = _fetchone(conn, "SELECT * FROM chats WHERE chat_key = ?", (chat_key,))
            return _chat_from_row(row) if row is not None else None

        return await self._read(read)

    @staticmethod
    def _ensure_user(conn: sqlite3.Connection, user_key: str, now: str) -> None:
        platform, user_id = _split_key(user_key)
        conn.execute(
            "INSERT INTO users (user_key, platform, user_id, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_key) DO NOTHING",
            (user_key, platform, user_id, now, now),
        )

    @staticmethod
    def _ensure_chat(conn: sqlite3.Connection, chat_key: str, now: str) -> None:
        platform, chat_id = _split_key(chat_key)
        conn.execute(
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
        _split_key(user_key)
        now = self._now_iso()

        def write_on(conn: sqlite3.Connection) -> None:
            self._ensure_user(conn, user_key, now)
            conn.execute(
                "UPDATE users SET daily_limit = ?, monthly_limit = ?, updated_at = ?"
                " WHERE user_key = ?",
                (daily, monthly, now, user_key),
            )

        await self._write(write_on)

    async def set_chat_limit(self, chat_key: str, daily: float | None) -> None:
        """Override a chat's daily limit (None = back to the default)."""
        _check_credits("daily", daily, allow_none=True)
        _split_key(chat_key)
        now = self._now_iso()

        def write_on(conn: sqlite3.Connection) -> None:
            self._ensure_chat(conn, chat_key, now)
            conn.execute(
                "UPDATE chats SET daily_limit = ?, updated_at = ? WHERE chat_key = ?",
                (daily, now, chat_key),
            )

        await self._write(write_on)

    async def set_blocked(self, key: str, blocked: bool) -> None:
        """Block or unblock a user key or a chat key.

        A key already known as a user and/or a chat is updated where it is known. A key not
        seen yet is blocked as both, since a bare `platform:id` does not say which it is.
        """
        _split_key(key)
        now = self._now_iso()

        def write_on(conn: sqlite3.Connection) -> None:
            changed = conn.execute(
                "UPDATE users SET blocked = ?, updated_at = ? WHERE user_key = ?",
                (int(blocked), now, key),
            ).rowcount
            changed += conn.execute(
                "UPDATE chats SET blocked = ?, updated_at = ? WHERE chat_key = ?",
                (int(blocked), now, key),
            ).rowcount
            if changed == 0 and blocked:
                self._ensure_user(conn, key, now)
                self._ensure_chat(conn, key, now)
                conn.execute("UPDATE users SET blocked = 1 WHERE user_key = ?", (key,))
                conn.execute("UPDATE chats SET blocked = 1 WHERE chat_key = ?", (key,))

        await self._write(write_on)

    async def is_blocked(self, user_key: str, chat_key: str | None) -> bool:
        """Say whether the user or the chat is blocked."""

        # Asked before every job; one SELECT is its own consistent snapshot.
        def read(conn: sqlite3.Connection) -> bool:
            row = _fetchone(
                conn,
                "SELECT EXISTS (SELECT 1 FROM users WHERE user_key = ? AND blocked)"
                " OR EXISTS (SELECT 1 FROM chats WHERE chat_key = ? AND blocked)",
                (user_key, chat_key),
            )
            return bool(row[0]) if row is not None else False

        return await self._read(read)

    async def set_language(self, user_key: str, lang: str | None) -> None:
        """Set the language a user chose (None = follow the platform again)."""
        _split_key(user_key)
        now = self._now_iso()

        def write_on(conn: sqlite3.Connection) -> None:
            self._ensure_user(conn, user_key, now)
            conn.execute(
                "UPDATE users SET language = ?, updated_at = ? WHERE user_key = ?",
                (lang, now, user_key),
            )

        await self._write(write_on)

    # --- reports ------------------------------------------------------------------------

    async def spend_report(self, user_key: str, *, last: int = 5) -> SpendReport:
        """Report a user's spend today, this month and all time against their limits."""
        now = self._now()
        day_start, month_start = self._day_start(now), self._month_start(now)

        def read(
            conn: sqlite3.Connection,
        ) -> tuple[sqlite3.Row | None, sqlite3.Row | None, list[sqlite3.Row]]:
            user = _fetchone(
                conn,
                "SELECT display_name, daily_limit, monthly_limit FROM users WHERE user_key = ?",
                (user_key,),
            )
            # Exact sums over the jobs themselves: a report shows what was charged to the
            # last bit, where the running totals (for limits) count micro-credits.
            sums = _fetchone(
                conn,
                "SELECT"
                " (SELECT SUM(charged) FROM jobs WHERE user_key = ? AND created_at >= ?),"
                " (SELECT SUM(charged) FROM jobs WHERE user_key = ? AND created_at >= ?),"
                " (SELECT SUM(charged) FROM jobs WHERE user_key = ?)",
                (user_key, day_start, user_key, month_start, user_key),
            )
            rows = _fetchall(conn, _SELECT_LAST_JOBS, (user_key, last))
            return user, sums, rows

        user, sums, rows = await self._read(read)
        today, month, total = (
            float(value) if value is not None else 0.0 for value in (sums or (None,) * 3)
        )
        daily = self._limits.user_daily
        monthly = self._limits.user_monthly
        name = ""
        if user is not None:
            name = user["display_name"]
            daily = _limit(daily, user["daily_limit"])
            monthly = _limit(monthly, user["monthly_limit"])
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
        since_iso = _iso(since)
        until_iso = _iso(until) if until is not None else None

        def read(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            return _fetchall(
                conn,
                "SELECT j.user_key, COALESCE(u.display_name, '') AS name,"
                " SUM(j.charged) AS credits, COUNT(*) AS jobs"
                " FROM jobs AS j LEFT JOIN users AS u ON u.user_key = j.user_key"
                " WHERE j.created_at >= ? AND (? IS NULL OR j.created_at < ?)"
                " GROUP BY j.user_key ORDER BY credits DESC, jobs DESC, j.user_key LIMIT ?",
                (since_iso, until_iso, until_iso, limit),
            )

        rows = await self._read(read)
        return [Spender(r["user_key"], r["name"], float(r["credits"]), r["jobs"]) for r in rows]

    async def chat_totals(
        self, since: datetime, *, until: datetime | None = None
    ) -> list[ChatTotal]:
        """List spend per chat since `since` (and before `until`), largest first."""
        since_iso = _iso(since)
        until_iso = _iso(until) if until is not None else None

        def read(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            return _fetchall(
                conn,
                "SELECT chat_key, SUM(charged) AS credits, COUNT(*) AS jobs FROM jobs"
                " WHERE chat_key IS NOT NULL AND created_at >= ? AND (? IS NULL OR created_at < ?)"
                " GROUP BY chat_key ORDER BY credits DESC, jobs DESC, chat_key",
                (since_iso, until_iso, until_iso),
            )

        rows = await self._read(read)
        return [ChatTotal(r["chat_key"], float(r["credits"]), r["jobs"]) for r in rows]

    async def export_csv(self, since: datetime | None = None, user_key: str | None = None) -> str:
        """Return the jobs (since a time, of one user) as CSV: a header, then one row each."""
        since_iso = _iso(since) if since is not None else None

        # Built on the connection's thread: a large export stays off the event loop.
        def export(conn: sqlite3.Connection) -> str:
            rows = _fetchall(conn, _SELECT_EXPORT, (since_iso, since_iso, user_key, user_key))
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(CSV_COLUMNS)
            for row in rows:
                writer.writerow(_csv_row(_job_from_row(row)))
            return out.getvalue()

        return await self._read(export)

    async def global_spent_today(self) -> float:
        """Return what the whole bot has spent (and reserved) today, UTC."""
        day = self._now_iso()[:10]

        def read(conn: sqlite3.Connection) -> float:
            row = _fetchone(
                conn,
                "SELECT micro_credits FROM spend_totals"
                " WHERE scope = 'global_daily' AND key = '' AND period = ?",
                (day,),
            )
            return row[0] / _MICRO if row is not None else 0.0

        return await self._read(read)


def _csv_row(job: JobRecord) -> tuple[Any, ...]:
    usage = job.usage or Usage()
    return (
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
