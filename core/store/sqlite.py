"""The embedded store: one SQLite file, through aiosqlite.

Connections: one for writes, one for reads (WAL lets readers run beside the writer and
see only committed data). aiosqlite runs each statement on the connection's own thread, a
round trip ("hop") of its own, so the statements are designed to need as few as possible:

- `reserve` is one `INSERT … SELECT … WHERE <every limit fits> RETURNING id`: the limit
  check and the write are a single statement, hence atomic, and a single hop. Only the
  first job of a user this process has not written yet (or whose name changed) takes a
  short transaction that also writes the user and chat rows.
- `settle`, `fail`, `mark_started`, limits and languages are single statements too.

Single statements run in autocommit mode and are pipelined: many callers' statements queue
on the connection's thread and run back to back. A write statement takes SQLite's write
lock before it reads anything (like BEGIN IMMEDIATE), so no reader is ever upgraded into
"database is locked", and other connections or processes wait under the busy timeout.
The few multi-statement writes (refund, block, recovery, migrations) run as
`BEGIN IMMEDIATE … COMMIT` while new single statements wait at a gate, so nothing else
ever lands inside their transaction. Every write runs to its end even if its caller is
cancelled (a reservation whose caller is gone is released at once).

Durability: WAL with `synchronous = NORMAL` — a commit is safe against a crash or kill of
the process (the WAL is in the OS's hands) and the file is never corrupted; a power loss or
OS crash may lose the last transactions before the next checkpoint, the right trade for
spend records (FULL would fsync on every commit, ~1–10 ms each on real disks).

Files: the folder is created 0700 and the database 0600 (SQLite gives its -wal and -shm the
database's mode): a ledger holds every prompt, user id and name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from core.errors import (
    DuplicateJob,
    JobNotFound,
    LimitExceeded,
    QueueFull,
    RateLimited,
    UserError,
)
from core.pricing import Usage
from core.requester import Requester
from core.store.export import jobs_csv
from core.store.interface import COPY_TABLES, SnapshotReader, Store, StoreError
from core.store.keys import (
    ApiKeyRecord,
    api_key_from_mapping,
    key_hash,
    looks_like_key,
    new_key,
    throttle_of,
)
from core.store.records import (
    EPSILON,
    MICRO,
    STAGED_KEEP,
    ChatRecord,
    ChatTotal,
    DailyUsage,
    JobRecord,
    JobSpec,
    JobStage,
    JobStatus,
    KeptResult,
    Limits,
    NamedLease,
    OutcomeCount,
    PrepaidSpend,
    PurchaseRecord,
    PurchaseTotals,
    Spender,
    SpendReport,
    UserRecord,
    as_utc,
    balance_refusal,
    chat_from_mapping,
    check_credits,
    check_grant,
    day_start,
    effective_limit,
    is_row_id,
    iso,
    job_from_mapping,
    kept_result_from_rows,
    lease_from_mapping,
    month_start,
    nearest_rank,
    purchase_from_mapping,
    purchase_refusal,
    rate_refusal,
    remaining,
    split_key,
    to_micro,
    usage_json,
    user_from_mapping,
    username_key,
    utc_now,
)
from core.store.sqlite_schema import LATEST_VERSION, MIGRATIONS, SCHEMA_VERSION_DDL
from core.store.web import (
    SESSIONS_PER_USER,
    FileToKeep,
    KeptFileData,
    KeptFileInfo,
    WebSession,
    check_session,
    file_rows,
    new_token,
    session_from_mapping,
    token_hash,
)
from core.types import GeneratedImage

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 30.0
_T = TypeVar("_T")
# Users and chats this process has written, so a reservation can skip rewriting them.
_KNOWN_CAP = 50_000

# Whole statements as constants: values always go in as parameters, never into the text.
_SELECT_JOB = "SELECT * FROM jobs WHERE id = ?"
_SELECT_UNSETTLED = "SELECT * FROM jobs WHERE status = 'unsettled' ORDER BY created_at, id"
_SELECT_LAST_JOBS = "SELECT * FROM jobs WHERE user_key = ? ORDER BY id DESC LIMIT ?"
_SELECT_EXPORT = (
    "SELECT * FROM jobs"
    " WHERE (? IS NULL OR created_at >= ?) AND (? IS NULL OR user_key = ?) ORDER BY id"
)
# What a reservation is checked against: the limits in force and the four running totals.
_LIMITS_CTE = (
    "WITH v AS (SELECT"
    " COALESCE((SELECT daily_limit FROM users WHERE user_key = :user_key), :d_user_daily)"
    "   AS ud_limit,"
    " COALESCE((SELECT monthly_limit FROM users WHERE user_key = :user_key), :d_user_monthly)"
    "   AS um_limit,"
    " CASE WHEN :chat_key IS NULL THEN 0 ELSE"
    "  COALESCE((SELECT daily_limit FROM chats WHERE chat_key = :chat_key), :d_chat_daily)"
    " END AS cd_limit,"
    " :d_global_daily AS gd_limit,"
    " COALESCE((SELECT micro_credits FROM spend_totals"
    "   WHERE scope = 'user_daily' AND key = :user_key AND period = :day), 0) AS ud,"
    " COALESCE((SELECT micro_credits FROM spend_totals"
    "   WHERE scope = 'user_monthly' AND key = :user_key AND period = :month), 0) AS um,"
    " COALESCE((SELECT micro_credits FROM spend_totals"
    "   WHERE scope = 'chat_daily' AND key = :chat_key AND period = :day), 0) AS cd,"
    " COALESCE((SELECT micro_credits FROM spend_totals"
    "   WHERE scope = 'global_daily' AND key = '' AND period = :day), 0) AS gd,"
    " COALESCE((SELECT micro_credits FROM balances WHERE user_key = :user_key), 0) AS bal)"
)
_SELECT_LIMITS = _LIMITS_CTE + " SELECT * FROM v"  # noqa: S608 - constant text
# The check and the write in one statement: the job is inserted only if every limit fits.
_RESERVE = (
    _LIMITS_CTE  # noqa: S608 - constant text
    + " INSERT INTO jobs (user_key, chat_key, platform, display_name, command_text,"
    " request_json, model, size, quality, n, reference_count, status,"
    " estimated_credits, created_at, source_ref, prepaid)"
    " SELECT :user_key, :chat_key, :platform, :display_name, :command_text, :request_json,"
    " :model, :size, :quality, :n, :reference_count, 'reserved', :estimate, :now, :source_ref,"
    " :prepaid"
    " FROM v WHERE"
    # A prepaid job also fits the balance, in the same statement (never below zero).
    " (:prepaid = 0 OR :estimate <= MAX(0.0, bal / 1000000.0) + :eps) AND"
    " (ud_limit <= 0 OR :estimate <= MAX(0.0, ud_limit - ud / 1000000.0) + :eps)"
    " AND (um_limit <= 0 OR :estimate <= MAX(0.0, um_limit - um / 1000000.0) + :eps)"
    " AND (cd_limit <= 0 OR :estimate <= MAX(0.0, cd_limit - cd / 1000000.0) + :eps)"
    " AND (gd_limit <= 0 OR :estimate <= MAX(0.0, gd_limit - gd / 1000000.0) + :eps)"
    " AND (:max_open <= 0 OR (SELECT COUNT(*) FROM jobs WHERE user_key = :user_key"
    "      AND stage IN ('queued', 'drawing')) < :max_open)"
    " AND (:per_minute <= 0 OR (SELECT COUNT(*) FROM jobs WHERE user_key = :user_key"
    "      AND created_at > :minute_ago) < :per_minute)"
    " RETURNING id"
)
# Why a reservation found no room other than a limit: the same counts the statement took.
_ROOM = (
    "SELECT (SELECT COUNT(*) FROM jobs WHERE user_key = :user_key"
    "        AND stage IN ('queued', 'drawing')) AS open,"
    " (SELECT COUNT(*) FROM jobs WHERE user_key = :user_key AND created_at > :minute_ago)"
    "   AS recent,"
    " (SELECT MIN(created_at) FROM jobs WHERE user_key = :user_key AND created_at > :minute_ago)"
    "   AS oldest"
)
_MARK_ONCE = (
    "INSERT INTO marks (key, until) VALUES (?, ?)"
    " ON CONFLICT (key) DO UPDATE SET until = excluded.until WHERE marks.until <= ?"
    " RETURNING key"
)
_HOLD_LEASE = (
    "INSERT INTO named_leases (name, owner, until, info) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, until = excluded.until,"
    " info = excluded.info"
    " WHERE named_leases.owner = excluded.owner OR named_leases.until <= ?"
    " RETURNING owner"
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
_ENSURE_USER = (
    "INSERT INTO users (user_key, platform, user_id, created_at, updated_at)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_key) DO NOTHING"
)
# The status guard in the WHERE makes a second settle or fail a no-op.
# The status guard in the WHERE makes a second settle or fail a no-op. The charge is never
# above the reservation; what the usage said beyond it is kept, and flagged.
_FINISH_JOB = (
    "UPDATE jobs SET status = :status, actual_credits = MIN(:credits, estimated_credits),"
    " reported_credits = CASE WHEN :credits > estimated_credits THEN :credits END,"
    " usage_flag = CASE WHEN :credits > estimated_credits"
    "   THEN COALESCE(:flag, 'over_estimate') ELSE :flag END,"
    " usage_json = :usage, error_code = :error_code, finished_at = :now"
    " WHERE id = :id AND status = 'reserved' RETURNING id"
)
_REFUND = (
    "UPDATE jobs SET status = 'refunded', refunded_by = ?, refunded_at = ?"
    " WHERE id = ? AND (status IN ('succeeded', 'unsettled')"
    "                   OR (status = 'failed' AND COALESCE(actual_credits, 0) > 0))"
    " RETURNING *"
)
# Leases: only an open job, held by this owner or by no one, is renewed (or released).
_RENEW_LEASES = (
    "UPDATE jobs SET lease_owner = ?, lease_until = ?"
    " WHERE id IN (SELECT value FROM json_each(?))"
    " AND stage IN ('queued', 'drawing', 'drawn')"
    " AND (lease_owner IS NULL OR lease_owner = ?) RETURNING id"
)
# A takeover: open jobs whose lease ran out (or, never leased, born over a lease ago). A
# drawing job's attempt is lost: its estimate goes to lost_credits and it is queued again.
_CLAIM_EXPIRED = (
    "UPDATE jobs SET lease_owner = :owner, lease_until = :until,"
    " lost_credits = lost_credits"
    "   + CASE WHEN stage = 'drawing' THEN estimated_credits ELSE 0 END,"
    " stage = CASE WHEN stage = 'drawing' THEN 'queued' ELSE stage END"
    " WHERE id IN (SELECT id FROM jobs"
    "   WHERE stage IN ('queued', 'drawing', 'drawn')"
    "   AND platform IN (SELECT value FROM json_each(:platforms))"
    "   AND (lease_owner IS NULL OR lease_owner <> :owner)"
    "   AND id NOT IN (SELECT value FROM json_each(:exclude))"
    "   AND ((lease_until IS NOT NULL AND lease_until <= :now)"
    "        OR (lease_until IS NULL AND created_at <= :born_before))"
    "   ORDER BY id LIMIT :limit)"
    " RETURNING *"
)
_FINISH_DELIVERY = (
    "UPDATE jobs SET stage = ?, delivered_at = ?, result_refs = COALESCE(?, result_refs)"
    " WHERE id = ? AND stage = 'drawn' AND (lease_owner IS NULL OR lease_owner = ?)"
    " RETURNING id"
)
_SELECT_OPEN = "SELECT * FROM jobs WHERE stage IN ('queued', 'drawing', 'drawn') ORDER BY id"
# /cancel across processes: a user's open jobs are asked once (jobs_user_open finds them),
# and a holder reads which of its jobs were asked.
_REQUEST_CANCEL = (
    "UPDATE jobs SET cancel_requested_at = ? WHERE user_key = ?"
    " AND stage IN ('queued', 'drawing') AND cancel_requested_at IS NULL RETURNING *"
)
_CANCEL_REQUESTED = (
    "SELECT id FROM jobs WHERE id IN (SELECT value FROM json_each(?))"
    " AND stage IN ('queued', 'drawing') AND cancel_requested_at IS NOT NULL"
)
# A start only with room among every process's drawing jobs (the writer runs it alone).
_TRY_START = (
    "UPDATE jobs SET started_at = :now WHERE id = :id AND status = 'reserved'"
    " AND (:per_user <= 0 OR (SELECT COUNT(*) FROM jobs AS d WHERE d.stage = 'drawing'"
    "      AND d.user_key = jobs.user_key) < :per_user)"
    " AND (:global_cap <= 0 OR (SELECT COUNT(*) FROM jobs AS d WHERE d.stage = 'drawing')"
    "      < :global_cap)"
    " RETURNING id"
)
_SELECT_BALANCE = "SELECT micro_credits FROM balances WHERE user_key = ?"
# The web door's state (core/store/web.py).
_OPEN_SESSION = (
    "INSERT INTO web_sessions (token_hash, user_key, how, display_name, language, key_hash,"
    " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
# A user's live sessions past the cap, and their expired ones, end: the oldest first.
_TRIM_SESSIONS = (
    "DELETE FROM web_sessions WHERE user_key = ? AND id NOT IN (SELECT id FROM web_sessions"
    " WHERE user_key = ? AND expires_at > ? ORDER BY id DESC LIMIT ?)"
)
# A key session's key counts only while it is active and still its user's.
_SELECT_SESSION = (
    "SELECT s.user_key, s.how, s.display_name, s.language, s.expires_at, s.key_hash,"
    " k.id AS key_id, k.id IS NOT NULL AS key_live"
    " FROM web_sessions AS s LEFT JOIN api_keys AS k ON k.key_hash = s.key_hash"
    " AND k.revoked_at IS NULL AND k.user_key = s.user_key"
    " WHERE s.token_hash = ? AND s.expires_at > ?"
)
# The kept files that, newest first, would pass the cap with the incoming bytes.
_FILES_OVER_CAP = (
    "DELETE FROM web_files WHERE id IN (SELECT id FROM (SELECT id,"
    " SUM(size) OVER (ORDER BY id DESC) AS newer FROM web_files) WHERE newer + ? > ?)"
)
_KEEP_FILE = (
    "INSERT INTO web_files (name, job_id, n, user_key, mime, width, height, size, kept_at,"
    " expires_at, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_JOB_FILES = (
    "SELECT job_id, name, mime, width, height FROM web_files"
    " WHERE job_id IN (SELECT value FROM json_each(?)) AND user_key = ? AND expires_at > ?"
    " ORDER BY job_id, n"
)
_NOTE_USERNAME = (
    "INSERT INTO usernames (name_key, user_key, seen_at) VALUES (?, ?, ?)"
    " ON CONFLICT (name_key) DO UPDATE SET user_key = excluded.user_key,"
    " seen_at = excluded.seen_at RETURNING 1"
)
# Kept results (core/results.py): a result and its images in order, in one statement (one
# read: never half of a result being replaced).
_KEPT_RESULT = (
    "SELECT r.revised_prompt, r.elapsed, r.saved_at, i.mime, i.width, i.height, i.data"
    " FROM kept_results AS r JOIN kept_result_images AS i ON i.job_id = r.job_id"
    " WHERE r.job_id = ? ORDER BY i.n"
)
_KEEP_RESULT = (
    "INSERT INTO kept_results (job_id, revised_prompt, elapsed, saved_at) VALUES (?, ?, ?, ?)"
)
_KEEP_RESULT_IMAGE = (
    "INSERT INTO kept_result_images (job_id, n, mime, width, height, data)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)
# Images first: they refer to their result.
_DROP_RESULT = (
    "DELETE FROM kept_result_images WHERE job_id = ?",
    "DELETE FROM kept_results WHERE job_id = ?",
)
# The results a copy carries: those of the jobs still waiting to be delivered.
_RESULTS_TO_DELIVER = (
    "SELECT r.job_id FROM kept_results AS r JOIN jobs AS j ON j.id = r.job_id"
    " WHERE j.stage = 'drawn' AND r.job_id > ? ORDER BY r.job_id LIMIT ?"
)
_COUNT_RESULTS_TO_DELIVER = (
    "SELECT COUNT(*) FROM kept_results AS r JOIN jobs AS j ON j.id = r.job_id"
    " WHERE j.stage = 'drawn'"
)
# Its trigger moves the balance in the same statement.
_INSERT_ENTRY = (
    "INSERT INTO credit_entries (user_key, kind, micro_credits, purchase_id, granted_by, note,"
    " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
# The dashboard's aggregations. A period is [since, until); until NULL = open-ended.
_PERIOD = "created_at >= :since AND (:until IS NULL OR created_at < :until)"

# Usage is JSON text; counts the upstream gave unreadable are stored as -1: they count 0.
_TOKENS = (
    " SUM(CASE WHEN json_valid(usage_json) THEN"
    " MAX(COALESCE(json_extract(usage_json, '$.text_input_tokens'), 0), 0) ELSE 0 END)"
    " AS text_in,"
    " SUM(CASE WHEN json_valid(usage_json) THEN"
    " MAX(COALESCE(json_extract(usage_json, '$.image_input_tokens'), 0), 0) ELSE 0 END)"
    " AS image_in,"
    " SUM(CASE WHEN json_valid(usage_json) THEN"
    " MAX(COALESCE(json_extract(usage_json, '$.image_output_tokens'), 0), 0) ELSE 0 END)"
    " AS image_out"
)


_DAILY_USAGE = (
    "SELECT substr(created_at, 1, 10) AS day, model, SUM(charged) AS credits,"  # noqa: S608
    f" COUNT(*) AS jobs, {_TOKENS}"
    f" FROM jobs WHERE {_PERIOD} GROUP BY day, model ORDER BY day, model"
)
_OUTCOMES = (
    "SELECT stage, status, COALESCE(error_code, '') AS code, COUNT(*) AS jobs,"  # noqa: S608
    f" SUM(charged) AS credits FROM jobs WHERE {_PERIOD}"
    " GROUP BY stage, status, code ORDER BY jobs DESC, stage, status, code"
)
_PURCHASE_TOTALS = (
    "SELECT COUNT(*) AS purchases,"  # noqa: S608 - constant text
    " COALESCE(SUM(CASE WHEN currency = 'XTR' THEN amount END), 0) AS stars,"
    " COALESCE(SUM(credits), 0) AS credits,"
    " COALESCE(SUM(CASE WHEN status = 'refunded' THEN 1 ELSE 0 END), 0) AS refunds,"
    " COALESCE(SUM(CASE WHEN status = 'refunded' AND currency = 'XTR' THEN amount END), 0)"
    " AS refunded_stars,"
    " COALESCE(SUM(refunded_credits), 0) AS refunded_credits"
    f" FROM purchases WHERE {_PERIOD}"
)
# Settled: succeeded, or failed with a charge; held: still reserved or unsettled.
_SETTLED = "(status = 'succeeded' OR (status = 'failed' AND charged_micro > 0))"
_PREPAID_SPEND = (
    f"SELECT COALESCE(SUM(CASE WHEN {_SETTLED} THEN 1 ELSE 0 END), 0) AS jobs,"  # noqa: S608
    f" COALESCE(SUM(CASE WHEN {_SETTLED} THEN charged ELSE 0 END), 0) AS credits,"
    f" COALESCE(SUM(CASE WHEN {_SETTLED}"
    " THEN COALESCE(reported_credits, actual_credits, 0) ELSE 0 END), 0) AS upstream,"
    " COALESCE(SUM(CASE WHEN status IN ('reserved', 'unsettled') THEN charged ELSE 0 END), 0)"
    " AS held"
    f" FROM jobs WHERE prepaid <> 0 AND {_PERIOD}"
)
_DRAWN = (
    "FROM jobs WHERE stage IN ('drawn', 'delivered', 'undelivered')"
    f" AND started_at IS NOT NULL AND finished_at IS NOT NULL AND {_PERIOD}"
)
_DRAWN_COUNT = f"SELECT COUNT(*) {_DRAWN}"  # noqa: S608 - constant text
_DRAW_TIME_AT = (
    "SELECT (julianday(finished_at) - julianday(started_at)) * 86400.0 AS seconds"  # noqa: S608
    f" {_DRAWN} ORDER BY seconds, id LIMIT 1 OFFSET :offset"
)
_LIST_JOBS = (
    f"SELECT * FROM jobs WHERE {_PERIOD}"  # noqa: S608 - constant text
    " AND (:user_key IS NULL OR user_key = :user_key)"
    " AND (:chat_key IS NULL OR chat_key = :chat_key)"
    " ORDER BY id DESC LIMIT :limit"
)
_SELECT_UNDELIVERED = (
    "SELECT * FROM jobs WHERE stage = 'undelivered' AND status <> 'refunded'"
    " ORDER BY id LIMIT ?"
)
_USERS_WITH_OVERRIDES = (
    "SELECT * FROM users WHERE daily_limit IS NOT NULL OR monthly_limit IS NOT NULL"
    " OR blocked <> 0 ORDER BY user_key"
)
_CHATS_WITH_OVERRIDES = (
    "SELECT * FROM chats WHERE daily_limit IS NOT NULL OR blocked <> 0 ORDER BY chat_key"
)
# Generated columns are computed, never copied.
_GENERATED = frozenset({"charged", "charged_micro"})


@contextmanager
def _as_store_error() -> Iterator[None]:
    """No driver type leaves the store: a database error becomes a StoreError (its text
    kept: it names no secret; the original stays attached as the cause)."""
    try:
        yield
    except sqlite3.Error as err:
        raise StoreError(f"database error: {err}") from err


def _is_locked(err: sqlite3.OperationalError) -> bool:
    text = str(err).lower()
    return "locked" in text or "busy" in text


def _prepare_files(target: str) -> None:
    """Create the folder (0700) and the file (0600) before SQLite does, or tighten them."""
    path = Path(target)
    folder = path.parent
    try:
        if not folder.exists():
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    except OSError as err:
        raise StoreError(f"DATABASE_URL: cannot create {target}: {err.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_IMODE(mode) & 0o077 and stat.S_ISREG(mode):
            with suppress(OSError):  # not ours to change: leave it
                os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


async def _connect(target: str, *, read_only: bool = False) -> aiosqlite.Connection:
    uri = target != ":memory:" and read_only
    where = f"file:{Path(target).as_posix()}?mode=ro" if uri else target
    conn = await aiosqlite.connect(where, timeout=BUSY_TIMEOUT_S, isolation_level=None, uri=uri)
    try:
        conn.row_factory = sqlite3.Row
        if not read_only:
            await _enable_wal(conn)
            await conn.execute("PRAGMA synchronous = NORMAL")
            await conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        await conn.close()
        raise
    return conn


async def _enable_wal(conn: aiosqlite.Connection) -> None:
    # Switching a fresh file to WAL needs a moment of exclusive access, and SQLite reports
    # "database is locked" at once (no busy handler) while another process does the same.
    delay = 0.01
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BUSY_TIMEOUT_S
    while True:
        try:
            rows = await conn.execute_fetchall("PRAGMA journal_mode")
            if rows and str(rows[0][0]).lower() == "wal":
                return
            await conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as err:
            if not _is_locked(err) or loop.time() > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)


WRITER_TASK_NAME = "imgbot-store-writer"
# Single statements that share one transaction at most: bounds how long a batch holds
# SQLite's write lock.
_MAX_BATCH = 128


class _Call:
    """One write waiting for the writer: a single statement, or a function of the connection."""

    __slots__ = ("fn", "future", "params", "sql")

    def __init__(
        self,
        future: asyncio.Future[Any],
        sql: str = "",
        params: Any = (),
        fn: Callable[[aiosqlite.Connection], Awaitable[Any]] | None = None,
    ) -> None:
        self.future = future
        self.sql = sql
        self.params = params
        self.fn = fn


def _settle_future(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class _Writer:
    """The write connection and the one task that writes on it (group commit).

    Callers queue their writes; the writer takes every single statement waiting (up to
    _MAX_BATCH), runs them back to back inside one `BEGIN IMMEDIATE … COMMIT`, and only
    then tells each caller its outcome. A statement that fails (a constraint) fails alone:
    SQLite undoes just that statement. If the transaction itself fails (the write lock not
    had within the busy timeout, a failed COMMIT, an I/O error that rolled everything
    back), every call of the batch gets that error, since none of them was committed.
    A multi-statement write (a function of the connection) runs in a transaction of its
    own, rolled back whole if it raises. Once queued, a write runs to its end even if its
    caller is cancelled. One commit, one WAL append and one wake-up per batch rather than
    per statement is what lets aiosqlite's one-hop-per-statement design keep up.
    """

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn
        self._queue: list[_Call] = []
        self._wake = asyncio.Event()
        self._closing = False
        # Named, so a test that waits for "every task" can tell this idle worker apart.
        self._task = asyncio.get_running_loop().create_task(self._run(), name=WRITER_TASK_NAME)

    def _submit(self, call: _Call) -> asyncio.Future[Any]:
        if self._closing:
            raise RuntimeError("the ledger is closed")
        self._queue.append(call)
        self._wake.set()
        return call.future

    def single(self, sql: str, params: Any = ()) -> asyncio.Future[list[sqlite3.Row]]:
        """Queue one write statement; its future holds the rows it returned."""
        future: asyncio.Future[list[sqlite3.Row]] = asyncio.get_running_loop().create_future()
        return self._submit(_Call(future, sql, params))

    def transaction(
        self, fn: Callable[[aiosqlite.Connection], Awaitable[_T]]
    ) -> asyncio.Future[_T]:
        """Queue `fn(conn)` to run inside BEGIN IMMEDIATE … COMMIT, rolled back if it raises."""
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        return self._submit(_Call(future, fn=fn))

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            first = self._queue[0]
            if first.fn is not None:
                self._queue.pop(0)
                await self._run_function(first)
                continue
            batch: list[_Call] = []
            while self._queue and self._queue[0].fn is None and len(batch) < _MAX_BATCH:
                batch.append(self._queue.pop(0))
            await self._run_batch(batch)

    async def _rollback(self) -> None:
        with suppress(sqlite3.Error, ValueError):
            if self.conn.in_transaction:
                await self.conn.execute("ROLLBACK")

    async def _run_batch(self, batch: list[_Call]) -> None:
        if len(batch) == 1:
            # A lone write needs no explicit transaction: one statement is atomic on its own
            # and, as a write, takes the write lock before it reads. One hop, not three: what
            # a quiet bot's every job pays.
            call = batch[0]
            sql, params = call.sql, call.params  # a constant statement, through `single`
            try:
                rows = await self.conn.execute_fetchall(sql, params)
            except Exception as err:  # noqa: BLE001 - handed to its caller
                await self._rollback()
                _settle_future(call.future, False, err)
                return
            _settle_future(call.future, True, list(rows))
            return
        try:
            await self.conn.execute("BEGIN IMMEDIATE")
            # Pipelined: every statement is queued on the connection's thread at once. (Each
            # `sql` came through `single`, whose callers pass constant statements only.)
            statements = [(call.sql, call.params) for call in batch]
            outcomes = await asyncio.gather(
                *(self.conn.execute_fetchall(sql, params) for sql, params in statements),
                return_exceptions=True,
            )
            if not self.conn.in_transaction:
                raise sqlite3.OperationalError("the transaction was rolled back by SQLite")
            await self.conn.execute("COMMIT")
        except Exception as err:  # noqa: BLE001 - handed to every caller of the batch
            await self._rollback()
            for call in batch:
                _settle_future(call.future, False, err)
            return
        for call, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                _settle_future(call.future, False, outcome)
            else:
                _settle_future(call.future, True, list(outcome))

    async def _run_function(self, call: _Call) -> None:
        assert call.fn is not None
        try:
            await self.conn.execute("BEGIN IMMEDIATE")
            result = await call.fn(self.conn)
            await self.conn.execute("COMMIT")
        except Exception as err:  # noqa: BLE001 - handed to the caller
            await self._rollback()
            _settle_future(call.future, False, err)
            return
        _settle_future(call.future, True, result)

    async def close(self) -> None:
        """Finish every write already queued, then stop the writer."""
        self._closing = True
        self._wake.set()
        await asyncio.shield(self._task)


async def _fetchone(conn: aiosqlite.Connection, sql: str, params: Any = ()) -> sqlite3.Row | None:
    rows = await conn.execute_fetchall(sql, params)
    return next(iter(rows), None)


async def _migrate(conn: aiosqlite.Connection, applied_at: str) -> None:
    """Apply every migration newer than the database, each recorded in schema_version."""
    await conn.execute(SCHEMA_VERSION_DDL)
    row = await _fetchone(conn, "SELECT MAX(version) FROM schema_version")
    current = int(row[0]) if row is not None and row[0] is not None else 0
    if current > LATEST_VERSION:
        raise StoreError(
            f"ledger schema version {current} is newer than this imgbot "
            f"({LATEST_VERSION}); upgrade imgbot"
        )
    for migration in MIGRATIONS:
        if migration.version <= current:
            continue
        for statement in migration.statements:
            await conn.execute(statement)
        await conn.execute(
            "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
            (migration.version, migration.description, applied_at),
        )


class _SqliteSnapshot(SnapshotReader):
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def rows(
        self, table: str, *, after: Any = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        key = dict(COPY_TABLES)[table]  # KeyError for anything but a copied table
        sql = (
            f"SELECT * FROM {table} WHERE (? IS NULL OR {key} > ?)"  # noqa: S608 - fixed names
            f" ORDER BY {key} LIMIT ?"
        )
        rows = await self._conn.execute_fetchall(sql, (after, after, limit))
        return [{k: row[k] for k in row.keys() if k not in _GENERATED} for row in rows]

    async def counts(self) -> dict[str, int]:
        counts = {}
        for table, _ in COPY_TABLES:
            sql = f"SELECT COUNT(*) FROM {table}"  # noqa: S608 - a name from COPY_TABLES
            row = await _fetchone(self._conn, sql)
            counts[table] = int(row[0]) if row is not None else 0
        row = await _fetchone(self._conn, _COUNT_RESULTS_TO_DELIVER)
        counts["kept_results"] = int(row[0]) if row is not None else 0
        return counts

    async def results_to_deliver(self, *, after: int = 0, limit: int = 4) -> list[KeptResult]:
        ids = await self._conn.execute_fetchall(_RESULTS_TO_DELIVER, (after, limit))
        found = []
        for (job_id,) in ids:
            rows = await self._conn.execute_fetchall(_KEPT_RESULT, (job_id,))
            result = kept_result_from_rows(job_id, list(rows))
            if result is not None:
                found.append(result)
        return found

    async def user_totals(self) -> dict[str, float]:
        rows = await self._conn.execute_fetchall(
            "SELECT user_key, SUM(charged) FROM jobs GROUP BY user_key"
        )
        return {row[0]: float(row[1] or 0.0) for row in rows}


class SqliteStore(Store):
    """Spend, reservations, limits and reports over one SQLite file."""

    kind = "sqlite"

    def __init__(
        self,
        target: str,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        limits: Limits,
        clock: Callable[[], datetime],
    ) -> None:
        self._target = target
        self._writer: _Writer | None = _Writer(writer)
        self._reader = reader
        self._read_lock = asyncio.Lock()  # multi-statement reads share one snapshot
        self._limits = limits
        self._clock = clock
        # user_key -> (display name, language) as last written; chat keys written.
        self._known_users: dict[str, tuple[str, str | None]] = {}
        self._known_chats: set[str] = set()

    # --- life ---------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        limits: Limits,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> SqliteStore:
        """Open (creating the folder and file if needed) and migrate the ledger at `path`."""
        target = os.fspath(path)
        memory = target == ":memory:"
        try:
            if not memory:
                _prepare_files(target)
            writer = await _connect(target)
        except sqlite3.Error as err:
            raise StoreError(f"DATABASE_URL: cannot open sqlite:///{target}: {err}") from None
        reader = writer
        store: SqliteStore | None = None
        try:
            store = cls(target, writer, reader, limits, clock or utc_now)
            applied_at = store._now_iso()
            await store._transaction(lambda conn: _migrate(conn, applied_at))
            if not memory:
                store._reader = await _connect(target, read_only=True)
        except BaseException as err:
            if store is not None:
                await store.close()
            else:
                await writer.close()
            if isinstance(err, sqlite3.Error):
                raise StoreError(f"DATABASE_URL: cannot use sqlite:///{target}: {err}") from None
            raise
        return store

    async def close(self) -> None:
        """Close the connections once the calls already made have finished; safe twice."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        await writer.close()
        if self._reader is not writer.conn:
            await self._reader.close()
        await writer.conn.close()

    @property
    def limits(self) -> Limits:
        """Return the default limits this store enforces."""
        return self._limits

    def describe(self) -> str:
        """Return where the store is."""
        return f"sqlite:///{self._target}"

    @property
    def path(self) -> str:
        """Return the database file's path."""
        return self._target

    async def schema_version(self) -> int:
        """Return the schema version of the open database."""
        row = await self._read_one("SELECT MAX(version) FROM schema_version")
        return int(row[0]) if row is not None and row[0] is not None else 0

    async def check_writable(self) -> None:
        """Take the write lock and let it go, proving the file accepts writes."""

        async def touch(conn: aiosqlite.Connection) -> None:
            await conn.execute("UPDATE schema_version SET version = version WHERE 0")

        await self._transaction(touch)

    # --- plumbing -----------------------------------------------------------------------

    def _require(self) -> _Writer:
        if self._writer is None:
            raise RuntimeError("the ledger is closed")
        return self._writer

    async def _single(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        # shield: once queued, a write runs to its end even if the caller is cancelled.
        with _as_store_error():
            return await asyncio.shield(self._require().single(sql, params))

    async def _transaction(self, fn: Callable[[aiosqlite.Connection], Awaitable[_T]]) -> _T:
        with _as_store_error():
            return await asyncio.shield(self._require().transaction(fn))

    async def _read_all(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        self._require()
        with _as_store_error():
            return list(await self._reader.execute_fetchall(sql, params))

    async def _read_one(self, sql: str, params: Any = ()) -> sqlite3.Row | None:
        rows = await self._read_all(sql, params)
        return rows[0] if rows else None

    def _now(self) -> datetime:
        return as_utc(self._clock())

    def _now_iso(self) -> str:
        return iso(self._now())

    # --- reservations -------------------------------------------------------------------

    async def reserve(self, requester: Requester, spec: JobSpec, estimate: float) -> int:
        """Check `estimate` against every limit and reserve it as a new job; return its id."""
        check_credits("estimate", estimate)
        if spec.n < 1 or spec.reference_count < 0:
            raise ValueError("n must be >= 1 and reference_count >= 0")
        now_iso = self._now_iso()
        params = self._reserve_params(requester, spec, float(estimate), now_iso)
        writer = self._require()
        for _ in range(3):
            if self._rows_known(requester):
                task = writer.single(_RESERVE, params)
            else:
                task = writer.transaction(self._reserve_with_rows(requester, params, now_iso))
            try:
                rows = await asyncio.shield(task)
            except asyncio.CancelledError:
                task.add_done_callback(self._release_orphan)
                raise
            except sqlite3.IntegrityError as err:
                await self._raise_duplicate(spec, err)
                raise StoreError(f"database error: {err}") from err
            except sqlite3.Error as err:
                raise StoreError(f"database error: {err}") from err
            if rows:
                self._remember_rows(requester)
                return int(rows[0][0])
            # A message seen before is a duplicate, whatever the limits say now.
            await self._raise_duplicate(spec, None)
            no_room = await self._no_room(params)
            if no_room is not None:
                raise no_room
            # Refused: say which limit, from the same figures the statement checked.
            refusal = await self._refusal(params)
            if refusal is not None:
                raise refusal
            # Room was freed between the statement and the look: try again.
        raise await self._refusal(params, force=True) or RuntimeError("reservation refused")

    def _reserve_params(
        self, requester: Requester, spec: JobSpec, estimate: float, now_iso: str
    ) -> dict[str, Any]:
        defaults = self._limits
        return {
            "user_key": requester.user_key,
            "chat_key": requester.chat_key,
            "platform": requester.platform,
            "display_name": requester.display_name,
            "command_text": spec.command_text,
            "request_json": spec.request_json,
            "model": spec.model,
            "size": spec.size,
            "quality": spec.quality,
            "n": spec.n,
            "reference_count": spec.reference_count,
            "estimate": estimate,
            "now": now_iso,
            "source_ref": spec.source_ref,
            "max_open": int(spec.max_open),
            "per_minute": int(spec.per_minute),
            "minute_ago": iso(datetime.fromisoformat(now_iso) - timedelta(seconds=60)),
            "prepaid": int(spec.prepaid),
            "day": now_iso[:10],
            "month": now_iso[:7],
            "d_user_daily": float(defaults.user_daily),
            "d_user_monthly": float(defaults.user_monthly),
            "d_chat_daily": float(defaults.chat_daily),
            "d_global_daily": float(defaults.global_daily),
            "eps": EPSILON,
        }

    def _rows_known(self, requester: Requester) -> bool:
        # True when this process already wrote the user (with this name and language) and
        # the chat, so the reservation needs no upsert of either.
        known = self._known_users.get(requester.user_key)
        if known is None:
            return False
        name, lang = known
        if requester.display_name and requester.display_name != name:
            return False
        if lang is None and requester.language is not None:
            return False
        return requester.chat_key is None or requester.chat_key in self._known_chats

    def _remember_rows(self, requester: Requester) -> None:
        if len(self._known_users) > _KNOWN_CAP:
            self._known_users.clear()
            self._known_chats.clear()
        name = requester.display_name
        known = self._known_users.get(requester.user_key)
        if not name and known is not None:
            name = known[0]
        self._known_users[requester.user_key] = (name, requester.language)
        if requester.chat_key is not None:
            self._known_chats.add(requester.chat_key)

    def _reserve_with_rows(
        self, requester: Requester, params: dict[str, Any], now_iso: str
    ) -> Callable[[aiosqlite.Connection], Awaitable[list[sqlite3.Row]]]:
        async def run(conn: aiosqlite.Connection) -> list[sqlite3.Row]:
            # The reservation first: a refusal writes nothing at all.
            fits = await conn.execute_fetchall(_SELECT_LIMITS, params)
            if not fits or not self._fits(next(iter(fits)), params):
                return []
            await conn.execute(
                _UPSERT_USER,
                (
                    requester.user_key,
                    requester.platform,
                    requester.user_id,
                    requester.display_name,
                    requester.language,
                    now_iso,
                    now_iso,
                ),
            )
            if requester.chat_key is not None:
                await conn.execute(
                    _INSERT_CHAT,
                    (requester.chat_key, requester.platform, requester.chat_id, now_iso, now_iso),
                )
            return list(await conn.execute_fetchall(_RESERVE, params))

        return run

    @staticmethod
    def _checks(
        row: sqlite3.Row, has_chat: bool, prepaid: bool = False
    ) -> list[tuple[str, float, float]]:
        """(scope, limit, what is left) of each check; a limit <= 0 is off. A prepaid job's
        balance is a check that is always on (its "limit" is the balance itself)."""
        checks = [
            ("user_daily", float(row["ud_limit"]), row["ud"]),
            ("user_monthly", float(row["um_limit"]), row["um"]),
        ]
        if has_chat:
            checks.append(("chat_daily", float(row["cd_limit"]), row["cd"]))
        checks.append(("global_daily", float(row["gd_limit"]), row["gd"]))
        found = [(scope, limit, max(0.0, limit - micro / MICRO)) for scope, limit, micro in checks]
        if prepaid:
            left = max(0.0, row["bal"] / MICRO)
            found.append(("balance", math.inf, left))
        return found

    def _fits(self, row: sqlite3.Row, params: dict[str, Any]) -> bool:
        estimate = params["estimate"]
        checks = self._checks(row, params["chat_key"] is not None, bool(params["prepaid"]))
        return all(limit <= 0 or estimate <= left + EPSILON for _, limit, left in checks)

    async def _refusal(
        self, params: dict[str, Any], *, force: bool = False
    ) -> LimitExceeded | None:
        row = await self._read_one(_SELECT_LIMITS, params)
        if row is None:
            return None
        estimate = params["estimate"]
        # Refuse on the tightest limit, so "what is left" is what would really fit.
        tightest: tuple[str, float, float] | None = None
        checks = self._checks(row, params["chat_key"] is not None, bool(params["prepaid"]))
        for scope, limit, left in checks:
            if limit > 0 and (tightest is None or left < tightest[2]):
                tightest = (scope, limit, left)
        if tightest is None or (estimate <= tightest[2] + EPSILON and not force):
            return None
        scope, limit, left = tightest
        if scope == "balance":
            return balance_refusal(params["user_key"], estimate, left)
        return LimitExceeded(
            f"limit.{scope}",
            scope=scope,
            asked=estimate,
            remaining=left,
            limit=limit,
            detail=f"{params['user_key']} asked {estimate} with {left} of {limit} left",
        )

    async def _no_room(self, params: dict[str, Any]) -> QueueFull | RateLimited | None:
        """The user's queue or minute is full (checked before the limits, as the statement
        does not say which condition failed)."""
        if params["max_open"] <= 0 and params["per_minute"] <= 0:
            return None
        row = await self._read_one(_ROOM, params)
        if row is None:
            return None
        if 0 < params["max_open"] <= row["open"]:
            return QueueFull(waiting=int(row["open"]))
        if 0 < params["per_minute"] <= row["recent"] and row["oldest"]:
            return rate_refusal(params["per_minute"], row["oldest"], params["now"])
        return None

    async def _raise_duplicate(self, spec: JobSpec, err: sqlite3.IntegrityError | None) -> None:
        if spec.source_ref is None:
            return
        row = await self._read_one("SELECT id FROM jobs WHERE source_ref = ?", (spec.source_ref,))
        if row is not None:
            raise DuplicateJob(job_id=int(row[0]), silent=True) from err

    def _release_orphan(self, task: asyncio.Future[list[sqlite3.Row]]) -> None:
        # The caller of `reserve` was cancelled while its job was being written: no one will
        # draw or settle it, so give the room back now rather than at the next start-up.
        if task.cancelled() or task.exception() is not None or self._writer is None:
            return
        rows = task.result()
        if not rows:
            return
        release = self._writer.single(
            _FINISH_JOB,
            self._finish_params(int(rows[0][0]), JobStatus.FAILED, 0.0, None, "cancelled", None),
        )
        release.add_done_callback(_log_release_failure)

    async def mark_started(self, job_id: int) -> bool:
        """Record that a reserved job started drawing; False if it is not reserved."""
        rows = await self._single(
            "UPDATE jobs SET started_at = ? WHERE id = ? AND status = 'reserved' RETURNING id",
            (self._now_iso(), job_id),
        )
        return bool(rows)

    async def try_start(self, job_id: int, per_user: int, global_cap: int) -> bool | None:
        """Start a reserved job if there is room (see Store.try_start)."""
        if not is_row_id(job_id):
            self._require()
            return None
        rows = await self._single(
            _TRY_START,
            {"id": job_id, "now": self._now_iso(), "per_user": int(per_user),
             "global_cap": int(global_cap)},
        )
        if rows:
            return True
        job = await self.get_job(job_id)
        return False if job is not None and job.status is JobStatus.RESERVED else None

    async def settle(
        self, job_id: int, credits: float, usage: Usage | None, *, flag: str | None = None
    ) -> bool:
        """Replace a reservation with its cost (at most the reservation); see Store.settle."""
        check_credits("credits", credits)
        return await self._finish(job_id, JobStatus.SUCCEEDED, credits, usage, None, flag)

    async def fail(
        self,
        job_id: int,
        error_code: str,
        credits: float = 0.0,
        usage: Usage | None = None,
        *,
        flag: str | None = None,
    ) -> bool:
        """Mark a reserved job failed at `credits` (0 releases it); False if not reserved."""
        check_credits("credits", credits)
        return await self._finish(job_id, JobStatus.FAILED, credits, usage, error_code, flag)

    async def _finish(
        self,
        job_id: int,
        status: JobStatus,
        credits: float,
        usage: Usage | None,
        error_code: str | None,
        flag: str | None = None,
    ) -> bool:
        if not is_row_id(job_id):
            self._require()
            return False
        return bool(
            await self._single(
                _FINISH_JOB, self._finish_params(job_id, status, credits, usage, error_code, flag)
            )
        )

    def _finish_params(
        self,
        job_id: int,
        status: JobStatus,
        credits: float,
        usage: Usage | None,
        error_code: str | None,
        flag: str | None,
    ) -> dict[str, Any]:
        return {
            "status": status.value,
            "credits": float(credits),
            "flag": flag,
            "usage": usage_json(usage),
            "error_code": error_code,
            "now": self._now_iso(),
            "id": job_id,
        }

    async def mark_unsettled(self, job_id: int) -> bool:
        """Mark a reserved job whose cost is unknown `unsettled`; False if not reserved."""
        rows = await self._single(
            "UPDATE jobs SET status = 'unsettled' WHERE id = ? AND status = 'reserved'"
            " RETURNING id",
            (job_id,),
        )
        return bool(rows)

    # --- replicas: marks and named leases --------------------------------------------------

    async def mark_once(self, key: str, seconds: float) -> bool:
        """Mark `key` done for `seconds`; False when it is marked already (see Store)."""
        now = self._now()
        rows = await self._single(
            _MARK_ONCE, (key, iso(now + timedelta(seconds=seconds)), iso(now))
        )
        return bool(rows)

    async def is_marked(self, key: str) -> bool:
        """Say whether `key` is marked (and not expired)."""
        row = await self._read_one(
            "SELECT 1 FROM marks WHERE key = ? AND until > ?", (key, self._now_iso())
        )
        return row is not None

    async def stage(self, group: str, key: str, payload: str) -> None:
        """Keep one part of `group` (see Store.stage)."""
        await self._single(
            "INSERT INTO staged (grp, key, at, payload) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (grp, key) DO NOTHING RETURNING key",
            (group, key, self._now_iso(), payload),
        )

    async def staged(self, group: str) -> list[tuple[str, datetime, str]]:
        """Return the parts of `group`, oldest first."""
        rows = await self._read_all(
            "SELECT key, at, payload FROM staged WHERE grp = ? ORDER BY at, key", (group,)
        )
        return [(row[0], datetime.fromisoformat(row[1]), row[2]) for row in rows]

    async def unstage(self, group: str, key: str | None = None) -> None:
        """Forget the parts of `group` (or only the part `key`)."""
        await self._single(
            "DELETE FROM staged WHERE grp = ? AND (? IS NULL OR key = ?) RETURNING key",
            (group, key, key),
        )

    async def take_mark(self, key: str) -> bool:
        """Remove `key`'s mark if it is live; True for the one caller that removed it."""
        rows = await self._single(
            "DELETE FROM marks WHERE key = ? AND until > ? RETURNING key", (key, self._now_iso())
        )
        return bool(rows)

    async def prune_expired(self) -> int:
        """Forget expired marks, staged parts, page sessions and kept files; count them."""
        now_iso = self._now_iso()
        staged_before = iso(self._now() - timedelta(seconds=STAGED_KEEP))
        gone = 0
        for sql, param in (
            ("DELETE FROM marks WHERE until <= ? RETURNING 1", now_iso),
            ("DELETE FROM staged WHERE at <= ? RETURNING 1", staged_before),
            ("DELETE FROM web_sessions WHERE expires_at <= ? RETURNING 1", now_iso),
            ("DELETE FROM web_files WHERE expires_at <= ? RETURNING 1", now_iso),
        ):
            gone += len(await self._single(sql, (param,)))
        return gone

    async def hold_lease(self, name: str, owner: str, seconds: float, info: str = "") -> bool:
        """Take or keep the named lease for `seconds`; False while another owner holds it."""
        now = self._now()
        rows = await self._single(
            _HOLD_LEASE, (name, owner, iso(now + timedelta(seconds=seconds)), info, iso(now))
        )
        return bool(rows)

    async def drop_lease(self, name: str, owner: str) -> None:
        """Give the named lease up, if `owner` holds it."""
        await self._single(
            "DELETE FROM named_leases WHERE name = ? AND owner = ? RETURNING name", (name, owner)
        )

    async def leases(self, prefix: str = "") -> list[NamedLease]:
        """List the named leases whose name starts with `prefix`, live or expired."""
        rows = await self._read_all(
            "SELECT * FROM named_leases WHERE substr(name, 1, ?) = ? ORDER BY name",
            (len(prefix), prefix),
        )
        return [lease_from_mapping(row) for row in rows]

    # --- durable jobs -------------------------------------------------------------------

    async def renew_leases(self, owner: str, job_ids: Sequence[int], seconds: float) -> set[int]:
        """Lease those open jobs to `owner` for `seconds` more; return the ids it holds."""
        ids = [int(i) for i in job_ids if is_row_id(i)]
        if not ids:
            self._require()
            return set()
        until = iso(self._now() + timedelta(seconds=seconds))
        rows = await self._single(_RENEW_LEASES, (owner, until, json.dumps(ids), owner))
        return {int(row[0]) for row in rows}

    async def release_leases(self, owner: str, job_ids: Sequence[int]) -> int:
        """End `owner`'s leases on those open jobs now; return how many."""
        ids = [int(i) for i in job_ids if is_row_id(i)]
        if not ids:
            self._require()
            return 0
        rows = await self._single(
            _RENEW_LEASES, (owner, self._now_iso(), json.dumps(ids), owner)
        )
        return len(rows)

    async def claim_expired(
        self,
        owner: str,
        seconds: float,
        platforms: Sequence[str],
        limit: int = 20,
        *,
        exclude: Sequence[int] = (),
    ) -> list[JobRecord]:
        """Take over open jobs whose lease expired (see Store.claim_expired)."""
        now = self._now()
        params = {
            "owner": owner,
            "until": iso(now + timedelta(seconds=seconds)),
            "now": iso(now),
            "born_before": iso(now - timedelta(seconds=seconds)),
            "platforms": json.dumps(list(platforms)),
            "limit": max(1, int(limit)),
            "exclude": json.dumps([int(i) for i in exclude]),
        }
        rows = await self._single(_CLAIM_EXPIRED, params)
        return sorted((job_from_mapping(row) for row in rows), key=lambda job: job.id)

    async def finish_delivery(
        self, job_id: int, owner: str, delivered: bool, result_refs: Sequence[str] = ()
    ) -> bool:
        """Move a drawn job to delivered / undelivered (see Store.finish_delivery)."""
        if not is_row_id(job_id):
            self._require()
            return False
        stage = JobStage.DELIVERED if delivered else JobStage.UNDELIVERED
        refs = json.dumps([str(ref) for ref in result_refs]) if result_refs else None
        rows = await self._single(
            _FINISH_DELIVERY, (stage.value, self._now_iso(), refs, job_id, owner)
        )
        return bool(rows)

    async def request_cancel(self, user_key: str) -> list[JobRecord]:
        """Ask for the user's queued and drawing jobs to be stopped (see Store)."""
        rows = await self._single(_REQUEST_CANCEL, (self._now_iso(), user_key))
        return sorted((job_from_mapping(row) for row in rows), key=lambda job: job.id)

    async def cancel_requested(self, job_ids: Sequence[int]) -> set[int]:
        """Return those of the jobs, still queued or drawing, that /cancel asked to stop."""
        ids = [int(i) for i in job_ids if is_row_id(i)]
        if not ids:
            self._require()
            return set()
        rows = await self._read_all(_CANCEL_REQUESTED, (json.dumps(ids),))
        return {int(row[0]) for row in rows}

    async def open_jobs(self) -> list[JobRecord]:
        """List the jobs still being worked on, oldest first."""
        return [job_from_mapping(row) for row in await self._read_all(_SELECT_OPEN)]

    async def list_unsettled(self) -> list[JobRecord]:
        """List the jobs whose cost is unknown, oldest first, for admins."""
        return [job_from_mapping(row) for row in await self._read_all(_SELECT_UNSETTLED)]

    async def refund(self, job_id: int, by: str) -> JobRecord:
        """Refund a succeeded, unsettled or charged failed job; return the refunded record."""
        if is_row_id(job_id):
            rows = await self._single(_REFUND, (by, self._now_iso(), job_id))
            if rows:
                return job_from_mapping(rows[0])
        job = await self.get_job(job_id)
        if job is None:
            raise JobNotFound(job_id=job_id, detail=f"refund of missing job {job_id}")
        raise UserError(
            "refund.not_refundable",
            job_id=job_id,
            status=job.status.value,
            detail=f"job {job_id} is {job.status.value}",
        )

    async def get_job(self, job_id: int) -> JobRecord | None:
        """Return one job, or None."""
        self._require()
        if not is_row_id(job_id):
            return None
        row = await self._read_one(_SELECT_JOB, (job_id,))
        return job_from_mapping(row) if row is not None else None

    async def job_by_source(self, source_ref: str) -> JobRecord | None:
        """Return the job `source_ref` made, or None."""
        row = await self._read_one("SELECT * FROM jobs WHERE source_ref = ?", (source_ref,))
        return job_from_mapping(row) if row is not None else None

    async def set_result_refs(self, job_id: int, refs: Sequence[str]) -> None:
        """Remember the platform file refs of a job's images (for "vary" buttons)."""
        refs_json = json.dumps([str(ref) for ref in refs])
        rows = []
        if is_row_id(job_id):
            rows = await self._single(
                "UPDATE jobs SET result_refs = ? WHERE id = ? RETURNING id", (refs_json, job_id)
            )
        if not rows:
            raise JobNotFound(job_id=job_id, detail=f"result refs for missing job {job_id}")

    # --- users and chats ----------------------------------------------------------------

    async def get_user(self, user_key: str) -> UserRecord | None:
        """Return one user, or None."""
        row = await self._read_one("SELECT * FROM users WHERE user_key = ?", (user_key,))
        return user_from_mapping(row) if row is not None else None

    async def get_chat(self, chat_key: str) -> ChatRecord | None:
        """Return one chat, or None."""
        row = await self._read_one("SELECT * FROM chats WHERE chat_key = ?", (chat_key,))
        return chat_from_mapping(row) if row is not None else None

    async def set_user_limits(
        self, user_key: str, daily: float | None, monthly: float | None
    ) -> None:
        """Override a user's daily and monthly limits (None = back to the default)."""
        check_credits("daily", daily, allow_none=True)
        check_credits("monthly", monthly, allow_none=True)
        platform, user_id = split_key(user_key)
        now = self._now_iso()
        await self._single(
            "INSERT INTO users (user_key, platform, user_id, daily_limit, monthly_limit,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (user_key) DO UPDATE SET daily_limit = excluded.daily_limit,"
            " monthly_limit = excluded.monthly_limit, updated_at = excluded.updated_at",
            (user_key, platform, user_id, daily, monthly, now, now),
        )

    async def set_chat_limit(self, chat_key: str, daily: float | None) -> None:
        """Override a chat's daily limit (None = back to the default)."""
        check_credits("daily", daily, allow_none=True)
        platform, chat_id = split_key(chat_key)
        now = self._now_iso()
        await self._single(
            "INSERT INTO chats (chat_key, platform, chat_id, daily_limit, created_at,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (chat_key) DO UPDATE SET daily_limit = excluded.daily_limit,"
            " updated_at = excluded.updated_at",
            (chat_key, platform, chat_id, daily, now, now),
        )

    async def set_blocked(self, key: str, blocked: bool) -> None:
        """Block or unblock a user key or a chat key.

        A key already known as a user and/or a chat is updated where it is known. A key not
        seen yet is blocked as both, since a bare `platform:id` does not say which it is.
        """
        platform, ident = split_key(key)
        now = self._now_iso()

        async def write_on(conn: aiosqlite.Connection) -> None:
            users = await conn.execute_fetchall(
                "UPDATE users SET blocked = ?, updated_at = ? WHERE user_key = ? RETURNING 1",
                (int(blocked), now, key),
            )
            chats = await conn.execute_fetchall(
                "UPDATE chats SET blocked = ?, updated_at = ? WHERE chat_key = ? RETURNING 1",
                (int(blocked), now, key),
            )
            if not users and not chats and blocked:
                await conn.execute(
                    "INSERT INTO users (user_key, platform, user_id, blocked, created_at,"
                    " updated_at) VALUES (?, ?, ?, 1, ?, ?)",
                    (key, platform, ident, now, now),
                )
                await conn.execute(
                    "INSERT INTO chats (chat_key, platform, chat_id, blocked, created_at,"
                    " updated_at) VALUES (?, ?, ?, 1, ?, ?)",
                    (key, platform, ident, now, now),
                )

        await self._transaction(write_on)
        self._known_users.pop(key, None)

    async def is_blocked(self, user_key: str, chat_key: str | None) -> bool:
        """Say whether the user or the chat is blocked."""
        row = await self._read_one(
            "SELECT EXISTS (SELECT 1 FROM users WHERE user_key = ? AND blocked)"
            " OR EXISTS (SELECT 1 FROM chats WHERE chat_key = ? AND blocked)",
            (user_key, chat_key),
        )
        return bool(row[0]) if row is not None else False

    async def set_language(self, user_key: str, lang: str | None) -> None:
        """Set the language a user chose (None = follow the platform again)."""
        platform, user_id = split_key(user_key)
        now = self._now_iso()
        await self._single(
            "INSERT INTO users (user_key, platform, user_id, language, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user_key) DO UPDATE SET"
            " language = excluded.language, updated_at = excluded.updated_at",
            (user_key, platform, user_id, lang, now, now),
        )
        # The next reservation writes the user again, so the platform's language returns.
        self._known_users.pop(user_key, None)

    # --- reports ------------------------------------------------------------------------

    @asynccontextmanager
    async def _read_snapshot(self) -> AsyncIterator[aiosqlite.Connection]:
        # Several SELECTs that must agree: one read transaction on the reader connection.
        self._require()
        async with self._read_lock:
            if self._reader is self._require().conn:  # :memory: has one connection
                yield self._reader
                return
            await self._reader.execute("BEGIN")
            try:
                yield self._reader
            finally:
                with suppress(sqlite3.Error):
                    await self._reader.execute("COMMIT")

    async def spend_report(self, user_key: str, *, last: int = 5) -> SpendReport:
        """Report a user's spend today, this month and all time against their limits."""
        now = self._now()
        today_from, month_from = iso(day_start(now)), iso(month_start(now))
        # Two statements, no read transaction: what a job's caption costs is two hops. Exact
        # sums over the jobs themselves: a report shows what was charged to the last bit,
        # where the running totals (for limits) count micro-credits.
        head = await self._read_one(
            "SELECT"
            " (SELECT SUM(charged) FROM jobs WHERE user_key = ? AND created_at >= ?),"
            " (SELECT SUM(charged) FROM jobs WHERE user_key = ? AND created_at >= ?),"
            " (SELECT SUM(charged) FROM jobs WHERE user_key = ?),"
            " u.user_key AS known, u.display_name, u.daily_limit, u.monthly_limit"
            " FROM (SELECT 1) LEFT JOIN users AS u ON u.user_key = ?",
            (user_key, today_from, user_key, month_from, user_key, user_key),
        )
        rows = await self._read_all(_SELECT_LAST_JOBS, (user_key, last))
        sums = tuple(head)[:3] if head is not None else None
        user = head if head is not None and head["known"] is not None else None
        today, month, total = (
            float(value) if value is not None else 0.0 for value in (sums or (None,) * 3)
        )
        daily = self._limits.user_daily
        monthly = self._limits.user_monthly
        name = ""
        if user is not None:
            name = user["display_name"]
            daily = effective_limit(daily, user["daily_limit"])
            monthly = effective_limit(monthly, user["monthly_limit"])
        return SpendReport(
            user_key=user_key,
            display_name=name,
            today=today,
            month=month,
            all_time=total,
            daily_limit=daily,
            monthly_limit=monthly,
            daily_remaining=remaining(daily, today),
            monthly_remaining=remaining(monthly, month),
            last_jobs=tuple(job_from_mapping(row) for row in rows),
        )

    async def top_spenders(
        self, since: datetime, limit: int = 10, *, until: datetime | None = None
    ) -> list[Spender]:
        """List the users who spent most since `since` (and before `until`, if given)."""
        since_iso = iso(since)
        until_iso = iso(until) if until is not None else None
        rows = await self._read_all(
            "SELECT j.user_key, COALESCE(u.display_name, '') AS name,"
            " SUM(j.charged) AS credits, COUNT(*) AS jobs"
            " FROM jobs AS j LEFT JOIN users AS u ON u.user_key = j.user_key"
            " WHERE j.created_at >= ? AND (? IS NULL OR j.created_at < ?)"
            " GROUP BY j.user_key ORDER BY credits DESC, jobs DESC, j.user_key LIMIT ?",
            (since_iso, until_iso, until_iso, limit),
        )
        return [Spender(r["user_key"], r["name"], float(r["credits"]), r["jobs"]) for r in rows]

    async def chat_totals(
        self, since: datetime, *, until: datetime | None = None
    ) -> list[ChatTotal]:
        """List spend per chat since `since` (and before `until`), largest first."""
        since_iso = iso(since)
        until_iso = iso(until) if until is not None else None
        rows = await self._read_all(
            "SELECT chat_key, SUM(charged) AS credits, COUNT(*) AS jobs FROM jobs"
            " WHERE chat_key IS NOT NULL AND created_at >= ? AND (? IS NULL OR created_at < ?)"
            " GROUP BY chat_key ORDER BY credits DESC, jobs DESC, chat_key",
            (since_iso, until_iso, until_iso),
        )
        return [ChatTotal(r["chat_key"], float(r["credits"]), r["jobs"]) for r in rows]

    async def export_csv(self, since: datetime | None = None, user_key: str | None = None) -> str:
        """Return the jobs (since a time, of one user) as CSV: a header, then one row each."""
        since_iso = iso(since) if since is not None else None
        rows = await self._read_all(_SELECT_EXPORT, (since_iso, since_iso, user_key, user_key))
        # Building a large export is CPU work: keep it off the event loop.
        return await asyncio.to_thread(lambda: jobs_csv(job_from_mapping(row) for row in rows))

    async def flagged_jobs(self, since: datetime) -> list[JobRecord]:
        """List the jobs created since `since` whose charge is flagged, newest first."""
        rows = await self._read_all(
            "SELECT * FROM jobs WHERE usage_flag IS NOT NULL AND created_at >= ?"
            " ORDER BY created_at DESC, id DESC LIMIT 200",
            (iso(since),),
        )
        return [job_from_mapping(row) for row in rows]

    async def global_spent_today(self) -> float:
        """Return what the whole bot has spent (and reserved) today, UTC."""
        row = await self._read_one(
            "SELECT micro_credits FROM spend_totals"
            " WHERE scope = 'global_daily' AND key = '' AND period = ?",
            (self._now_iso()[:10],),
        )
        return row[0] / MICRO if row is not None else 0.0

    # --- the dashboard's aggregations -----------------------------------------------------

    async def daily_usage(
        self, since: datetime, *, until: datetime | None = None
    ) -> list[DailyUsage]:
        """Sum charges, jobs and reported tokens per UTC day and model, oldest day first."""
        rows = await self._read_all(_DAILY_USAGE, _period(since, until))
        return [
            DailyUsage(r["day"], r["model"], float(r["credits"]), int(r["jobs"]),
                       int(r["text_in"]), int(r["image_in"]), int(r["image_out"]))
            for r in rows
        ]

    async def outcome_counts(
        self, since: datetime, *, until: datetime | None = None
    ) -> list[OutcomeCount]:
        """Count the jobs created in [since, until) per stage, status and error code."""
        rows = await self._read_all(_OUTCOMES, _period(since, until))
        return [
            OutcomeCount(r["stage"], r["status"], r["code"], int(r["jobs"]), float(r["credits"]))
            for r in rows
        ]

    async def draw_time_quantiles(
        self,
        since: datetime,
        quantiles: Sequence[float],
        *,
        until: datetime | None = None,
    ) -> list[float | None]:
        """Return the draw times at those quantiles (nearest rank); None each when none."""
        period = _period(since, until)
        async with self._read_snapshot() as conn:
            [[count]] = await conn.execute_fetchall(_DRAWN_COUNT, period)
            if not count:
                return [None for _ in quantiles]
            found: list[float | None] = []
            for quantile in quantiles:
                offset = nearest_rank(quantile, count) - 1
                [[seconds]] = await conn.execute_fetchall(
                    _DRAW_TIME_AT, {**period, "offset": offset})
                found.append(float(seconds))
            return found

    async def list_jobs(
        self,
        since: datetime,
        *,
        until: datetime | None = None,
        user_key: str | None = None,
        chat_key: str | None = None,
        limit: int = 100,
    ) -> list[JobRecord]:
        """List the jobs created in [since, until) (of one user, of one chat), newest first."""
        params = {**_period(since, until), "user_key": user_key, "chat_key": chat_key,
                  "limit": limit}
        return [job_from_mapping(row) for row in await self._read_all(_LIST_JOBS, params)]

    async def list_undelivered(self, limit: int = 200) -> list[JobRecord]:
        """List the undelivered jobs not refunded yet, oldest first."""
        rows = await self._read_all(_SELECT_UNDELIVERED, (limit,))
        return [job_from_mapping(row) for row in rows]

    async def users_with_overrides(self) -> list[UserRecord]:
        """List the users with a limit of their own or blocked, by user key."""
        return [user_from_mapping(row) for row in await self._read_all(_USERS_WITH_OVERRIDES)]

    async def chats_with_overrides(self) -> list[ChatRecord]:
        """List the chats with a limit of their own or blocked, by chat key."""
        return [chat_from_mapping(row) for row in await self._read_all(_CHATS_WITH_OVERRIDES)]

    # --- personal API keys ---------------------------------------------------------------

    async def create_api_key(self, user_key: str, name: str = "") -> tuple[int, str]:
        """Make a key for a user; return its id and its plaintext (shown once, never kept)."""
        split_key(user_key)
        plaintext = new_key()
        rows = await self._single(
            "INSERT INTO api_keys (key_hash, user_key, name, created_at) VALUES (?, ?, ?, ?)"
            " RETURNING id",
            (key_hash(plaintext), user_key, name, self._now_iso()),
        )
        return int(rows[0][0]), plaintext

    async def api_key_user(self, plaintext: str) -> str | None:
        """Return the user_key of an active key, or None; touch last_used_at now and then."""
        if not looks_like_key(plaintext):
            return None
        row = await self._read_one(
            "SELECT id, user_key FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL",
            (key_hash(plaintext),),
        )
        if row is None:
            return None
        if throttle_of(self).due(int(row[0])):
            await self._single(
                "UPDATE api_keys SET last_used_at = ? WHERE id = ?", (self._now_iso(), row[0])
            )
        return str(row[1])

    async def list_api_keys(self, user_key: str | None = None) -> list[ApiKeyRecord]:
        """List the keys (of one user), oldest first, revoked ones included."""
        rows = await self._read_all(
            "SELECT * FROM api_keys WHERE (? IS NULL OR user_key = ?) ORDER BY id",
            (user_key, user_key),
        )
        return [api_key_from_mapping(row) for row in rows]

    async def revoke_api_key(self, key_id: int) -> bool:
        """Revoke a key; False when there is no such active key."""
        if not is_row_id(key_id):
            return False
        rows = await self._single(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL RETURNING id",
            (self._now_iso(), key_id),
        )
        return bool(rows)

    # --- the web door: page sessions and kept result files -------------------------------

    async def open_session(
        self,
        user_key: str,
        how: str,
        seconds: float,
        *,
        display_name: str = "",
        language: str | None = None,
        api_key: str | None = None,
    ) -> str:
        """Open a page session for `seconds`; return its token (only its hash is kept)."""
        check_session(how, seconds)
        split_key(user_key)
        token = new_token()
        now = self._now()
        row = (token_hash(token), user_key, how, display_name, language,
               key_hash(api_key) if api_key is not None else None, iso(now),
               iso(now + timedelta(seconds=seconds)))

        async def write_on(conn: aiosqlite.Connection) -> None:
            await conn.execute(_OPEN_SESSION, row)
            await conn.execute(_TRIM_SESSIONS, (user_key, user_key, iso(now), SESSIONS_PER_USER))

        await self._transaction(write_on)
        return token

    async def get_session(self, token: str) -> WebSession | None:
        """Return the session of a token while it lives (see Store.get_session)."""
        if not token:
            self._require()
            return None
        row = await self._read_one(_SELECT_SESSION, (token_hash(token), self._now_iso()))
        if row is None:
            return None
        if row["key_id"] is not None and throttle_of(self).due(int(row["key_id"])):
            await self._single(
                "UPDATE api_keys SET last_used_at = ? WHERE id = ?",
                (self._now_iso(), row["key_id"]),
            )
        return session_from_mapping(row)

    async def close_session(self, token: str) -> None:
        """End a session (sign out); an unknown token is ignored."""
        await self._single(
            "DELETE FROM web_sessions WHERE token_hash = ? RETURNING 1", (token_hash(token),)
        )

    async def keep_files(
        self,
        job_id: int,
        user_key: str,
        files: Sequence[FileToKeep],
        seconds: float,
        cap_bytes: int,
    ) -> None:
        """Keep a job's result images for `seconds` (see Store.keep_files)."""
        if not files:
            return
        now = self._now()
        now_iso = iso(now)
        incoming = sum(len(f.data) for f in files)
        rows = file_rows(job_id, user_key, files, now_iso, iso(now + timedelta(seconds=seconds)))

        async def write_on(conn: aiosqlite.Connection) -> None:
            await conn.execute("DELETE FROM web_files WHERE expires_at <= ?", (now_iso,))
            await conn.execute(_FILES_OVER_CAP, (incoming, cap_bytes))
            await conn.executemany(_KEEP_FILE, rows)

        await self._transaction(write_on)

    async def kept_file(self, name: str) -> KeptFileData | None:
        """Return a kept image's bytes, or None (unknown or expired)."""
        row = await self._read_one(
            "SELECT data, mime, expires_at FROM web_files WHERE name = ? AND expires_at > ?",
            (name, self._now_iso()),
        )
        if row is None:
            return None
        return KeptFileData(bytes(row[0]), row[1], datetime.fromisoformat(row[2]))

    async def job_files(
        self, job_ids: Sequence[int], user_key: str
    ) -> dict[int, list[KeptFileInfo]]:
        """Return the images still kept of those jobs that are `user_key`'s, in order."""
        ids = [int(i) for i in job_ids if is_row_id(i)]
        rows = await self._read_all(_JOB_FILES, (json.dumps(ids), user_key, self._now_iso()))
        found: dict[int, list[KeptFileInfo]] = {}
        for row in rows:
            found.setdefault(int(row[0]), []).append(
                KeptFileInfo(row[1], row[2], int(row[3]), int(row[4]))
            )
        return found

    # --- kept results (core/results.py) -------------------------------------------------

    async def keep_result(
        self,
        job_id: int,
        images: Sequence[GeneratedImage],
        *,
        revised_prompt: str | None,
        elapsed: float,
        saved_at: datetime | None = None,
    ) -> None:
        """Keep a job's result images in one transaction (see Store.keep_result)."""
        stamp = iso(as_utc(saved_at)) if saved_at is not None else self._now_iso()
        rows = [(job_id, n, image.mime, image.width, image.height, image.data)
                for n, image in enumerate(images)]

        async def write_on(conn: aiosqlite.Connection) -> None:
            for sql in _DROP_RESULT:
                await conn.execute(sql, (job_id,))
            await conn.execute(_KEEP_RESULT, (job_id, revised_prompt, float(elapsed), stamp))
            await conn.executemany(_KEEP_RESULT_IMAGE, rows)

        await self._transaction(write_on)

    async def kept_result(self, job_id: int) -> KeptResult | None:
        """Return a job's kept result, its images in order; None when none is kept."""
        if not is_row_id(job_id):
            return None
        return kept_result_from_rows(job_id, await self._read_all(_KEPT_RESULT, (job_id,)))

    async def drop_result(self, job_id: int) -> None:
        """Forget a job's kept result, if any."""
        if not is_row_id(job_id):
            return

        async def drop_on(conn: aiosqlite.Connection) -> None:
            for sql in _DROP_RESULT:
                await conn.execute(sql, (job_id,))

        await self._transaction(drop_on)

    async def kept_results(self) -> list[tuple[int, datetime]]:
        """List the kept results as (job id, when saved), by job id."""
        rows = await self._read_all("SELECT job_id, saved_at FROM kept_results ORDER BY job_id")
        return [(int(row[0]), datetime.fromisoformat(row[1])) for row in rows]

    # --- the @username directory ---------------------------------------------------------

    async def note_username(self, platform: str, username: str, user_key: str) -> None:
        """Record that `@username` on `platform` is now the user `user_key`."""
        split_key(user_key)
        await self._single(
            _NOTE_USERNAME, (username_key(platform, username), user_key, self._now_iso())
        )

    async def find_username(self, platform: str, username: str) -> str | None:
        """Return the user key `@username` on `platform` was last seen as."""
        row = await self._read_one(
            "SELECT user_key FROM usernames WHERE name_key = ?",
            (username_key(platform, username),),
        )
        return str(row[0]) if row is not None else None

    # --- prepaid credits ---------------------------------------------------------------

    async def balance(self, user_key: str) -> float:
        """Return a user's credit balance (open reservations already taken off)."""
        row = await self._read_one(_SELECT_BALANCE, (user_key,))
        return row[0] / MICRO if row is not None else 0.0

    async def grant_credits(self, user_key: str, credits: float, by: str, note: str = "") -> float:
        """Add `credits` (> 0) to a user's balance; return the new balance."""
        check_grant(credits)
        split_key(user_key)
        await self._single(
            _INSERT_ENTRY, (user_key, "grant", to_micro(credits), None, by, note, self._now_iso())
        )
        return await self.balance(user_key)

    async def revoke_credits(
        self, user_key: str, credits: float | None, by: str
    ) -> tuple[float, float]:
        """Take up to `credits` (None: all) off a balance, never below zero."""
        if credits is not None:
            check_grant(credits)
        split_key(user_key)
        asked = to_micro(credits) if credits is not None else None
        # One statement under the write lock: the balance it reads is the one it changes.
        rows = await self._single(
            "INSERT INTO credit_entries (user_key, kind, micro_credits, granted_by, created_at)"
            " SELECT :user_key, 'revoke', -MIN(COALESCE(:asked, b.micro_credits), b.micro_credits),"
            " :by, :now FROM balances AS b WHERE b.user_key = :user_key AND b.micro_credits > 0"
            " RETURNING micro_credits",
            {"user_key": user_key, "asked": asked, "by": by, "now": self._now_iso()},
        )
        taken = -rows[0][0] / MICRO if rows else 0.0
        return taken, await self.balance(user_key)

    async def grant_welcome(self, user_key: str, credits: float) -> bool:
        """Give a user the welcome grant, once ever; False when they already had it."""
        check_grant(credits)
        split_key(user_key)
        rows = await self._single(
            _INSERT_ENTRY + " ON CONFLICT DO NOTHING RETURNING id",
            (user_key, "welcome", to_micro(credits), None, "", "", self._now_iso()),
        )
        return bool(rows)

    async def record_purchase(
        self,
        user_key: str,
        *,
        provider: str,
        charge_id: str,
        provider_charge_id: str,
        pack: str,
        amount: int,
        currency: str,
        credits: float,
    ) -> tuple[PurchaseRecord, bool]:
        """Record a paid pack and add its credits, once per `charge_id`."""
        check_grant(credits)
        split_key(user_key)
        if not charge_id:
            raise ValueError("a purchase needs its charge id")
        now = self._now_iso()

        async def record(conn: aiosqlite.Connection) -> tuple[sqlite3.Row, bool]:
            rows = await conn.execute_fetchall(
                "INSERT INTO purchases (user_key, provider, charge_id, provider_charge_id,"
                " pack, amount, currency, credits, status, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'paid', ?)"
                " ON CONFLICT (charge_id) DO NOTHING RETURNING *",
                (user_key, provider, charge_id, provider_charge_id, pack, int(amount), currency,
                 float(credits), now),
            )
            if not rows:
                old = await _fetchone(
                    conn, "SELECT * FROM purchases WHERE charge_id = ?", (charge_id,)
                )
                assert old is not None
                return old, False
            row = next(iter(rows))
            await conn.execute(
                _INSERT_ENTRY,
                (user_key, "purchase", to_micro(credits), row["id"], provider, pack, now),
            )
            return row, True

        row, created = await self._transaction(record)
        return purchase_from_mapping(row), created

    async def get_purchase(self, purchase_id: int) -> PurchaseRecord | None:
        """Return one purchase, or None."""
        if not is_row_id(purchase_id):
            return None
        row = await self._read_one("SELECT * FROM purchases WHERE id = ?", (purchase_id,))
        return purchase_from_mapping(row) if row is not None else None

    async def list_purchases(
        self, user_key: str | None = None, limit: int = 20
    ) -> list[PurchaseRecord]:
        """List purchases (of one user), newest first."""
        rows = await self._read_all(
            "SELECT * FROM purchases WHERE (? IS NULL OR user_key = ?) ORDER BY id DESC LIMIT ?",
            (user_key, user_key, max(1, int(limit))),
        )
        return [purchase_from_mapping(row) for row in rows]

    async def refund_purchase(self, purchase_id: int, by: str) -> PurchaseRecord:
        """Mark a paid purchase refunded and take its unspent credits back."""
        now = self._now_iso()

        async def refund(conn: aiosqlite.Connection) -> sqlite3.Row | None:
            found = await _fetchone(
                conn,
                "SELECT p.*, COALESCE(b.micro_credits, 0) AS bal FROM purchases AS p"
                " LEFT JOIN balances AS b ON b.user_key = p.user_key"
                " WHERE p.id = ? AND p.status = 'paid'",
                (purchase_id,),
            )
            if found is None:
                return None
            taken = max(0, min(to_micro(found["credits"]), found["bal"]))
            if taken:
                await conn.execute(
                    _INSERT_ENTRY,
                    (found["user_key"], "purchase_refund", -taken, purchase_id, by, "", now),
                )
            return await _fetchone(
                conn,
                "UPDATE purchases SET status = 'refunded', refunded_at = ?, refunded_by = ?,"
                " refunded_credits = ? WHERE id = ? RETURNING *",
                (now, by, taken / MICRO, purchase_id),
            )

        row = await self._transaction(refund) if is_row_id(purchase_id) else None
        if row is not None:
            return purchase_from_mapping(row)
        raise purchase_refusal(await self.get_purchase(purchase_id), purchase_id)

    async def purchase_totals(
        self, since: datetime, *, until: datetime | None = None
    ) -> PurchaseTotals:
        """Sum the purchases recorded in [since, until) (refunded ones counted apart too)."""
        row = await self._read_one(_PURCHASE_TOTALS, _period(since, until))
        assert row is not None
        return _purchase_totals(row)

    async def prepaid_spend(
        self, since: datetime, *, until: datetime | None = None
    ) -> PrepaidSpend:
        """Sum what the prepaid jobs created in [since, until) spent and hold."""
        row = await self._read_one(_PREPAID_SPEND, _period(since, until))
        assert row is not None
        return _prepaid_spend(row)

    # --- copies -------------------------------------------------------------------------

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[SnapshotReader]:
        """One read transaction on a connection of its own: writers go on meanwhile."""
        self._require()
        if self._target == ":memory:":
            async with self._read_snapshot() as conn:
                yield _SqliteSnapshot(conn)
            return
        conn = await _connect(self._target, read_only=True)
        try:
            await conn.execute("BEGIN")
            # The snapshot starts at the first read, not at BEGIN: take it now.
            await conn.execute_fetchall("SELECT COUNT(*) FROM schema_version")
            yield _SqliteSnapshot(conn)
        finally:
            with suppress(sqlite3.Error):
                await conn.execute("COMMIT")
            await conn.close()

    async def is_empty(self) -> bool:
        """Say whether the store holds none of the copied tables' rows."""
        row = await self._read_one(
            "SELECT NOT EXISTS (SELECT 1 FROM users) AND NOT EXISTS (SELECT 1 FROM api_keys)"
            " AND NOT EXISTS (SELECT 1 FROM chats) AND NOT EXISTS (SELECT 1 FROM jobs)"
            " AND NOT EXISTS (SELECT 1 FROM purchases)"
            " AND NOT EXISTS (SELECT 1 FROM credit_entries)"
            " AND NOT EXISTS (SELECT 1 FROM usernames)"
        )
        return bool(row[0]) if row is not None else True

    async def load_rows(self, table: str, rows: Sequence[dict[str, Any]]) -> None:
        """Insert raw rows read by a SnapshotReader, keeping ids; totals follow by themselves."""
        if table not in dict(COPY_TABLES):
            raise ValueError(f"not a copied table: {table}")
        if not rows:
            return
        columns = [name for name in rows[0] if name not in _GENERATED]
        for name in columns:
            if not name.isidentifier():
                raise ValueError(f"not a column name: {name!r}")
        sql = (
            f"INSERT INTO {table} ({', '.join(columns)})"  # noqa: S608 - checked names
            f" VALUES ({', '.join('?' for _ in columns)})"
        )
        values = [tuple(row[name] for name in columns) for row in rows]

        async def load(conn: aiosqlite.Connection) -> None:
            await conn.executemany(sql, values)

        await self._transaction(load)


def _purchase_totals(row: Any) -> PurchaseTotals:
    return PurchaseTotals(int(row["purchases"]), int(row["stars"]), float(row["credits"]),
                          int(row["refunds"]), int(row["refunded_stars"]),
                          float(row["refunded_credits"]))


def _prepaid_spend(row: Any) -> PrepaidSpend:
    return PrepaidSpend(int(row["jobs"]), float(row["credits"]), float(row["upstream"]),
                        float(row["held"]))


def _period(since: datetime, until: datetime | None) -> dict[str, str | None]:
    return {"since": iso(since), "until": iso(until) if until is not None else None}


def _log_release_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not release a cancelled reservation: %r", task.exception())
