"""The ledger on PostgreSQL, with asyncpg: the same promises as the SQLite backend, for many
processes sharing one database.

Calls and round trips. Reservations, settles, fails and starts are group-committed, as in
the SQLite backend: each call joins a queue, and one writer takes every call queued
meanwhile (up to MAX_BATCH) and writes them all in ONE statement — a call of the plpgsql
function `imgbot_write_batch` (core.store.postgres_schema) with the calls as arrays — hence
one transaction, one commit and one WAL flush for the lot, in one round trip. With
synchronous_commit on, a commit waits for its flush (~1-10 ms on real disks) holding the
running totals' row locks, `global_daily` for every writer; one commit per call made every
process's writes queue behind each other's fsync. The function locks the job rows, then
every running total the batch touches, in the one lock order, then checks each reservation
against the totals (its predecessors in the batch counted) before writing it, so a refused
or duplicate reservation writes nothing and undoes nothing else; settles and fails are one
`UPDATE … FROM unnest(…)`. Each caller learns its outcome once the statement has returned,
that is after the commit; a batch that fails fails every call in it (a batch the database
refused as a whole, bad text say, is retried call by call so only the culprit fails). A
second call on a job already in the batch waits for the next one, so calls on one job keep
their order. Everything else (limits, refunds, recovery, reads) borrows a connection from
a small pool of asyncpg connections (`_Pool`, lighter than asyncpg's own) for its
statements and gives it back. `settle` and `fail` charge at most the reservation
(`least(credits, estimated_credits)`); usage above it is kept as `reported_credits` and
flagged (`usage_flag`). Triggers keep `spend_totals` in the statement that changes a job,
so concurrent writers in any number of processes never overspend.

Lost connections. A call that could not get a connection (refused, reset, the server
starting up or out of connection slots) is retried a few times with a short backoff, as is a
read whose connection broke, and a transaction the server rolled back (deadlock,
serialisation failure). A write whose connection broke after it was sent is never retried:
whether it committed is unknown, and the caller gets StoreError saying so.

Cancellation. A write runs to its end even if its caller is cancelled (as in the SQLite
backend): a queued call stays in its batch, and no statement is cut off with its outcome
unknown. A reservation whose caller is gone by then is released at once (failed /
`cancelled`, in the next batch). A read cut off mid-statement drops its connection.
`close()` waits for the calls already made, then closes the connections.

No asyncpg type leaves this module: rows become `core.store.records` values (or plain dicts
of str / int / float / None for copies), driver errors become StoreError, and messages name
DATABASE_URL with the password redacted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg

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
from core.store.postgres_schema import (
    SchemaTooNew,
    apply_migrations,
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
    remaining,
    split_key,
    to_micro,
    usage_json,
    user_from_mapping,
    username_key,
    utc_now,
)
from core.store.url import redact_dsn
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

_T = TypeVar("_T")

# Retries of a call that provably did not reach the database (or only read): 3 more
# attempts, 50, 100 and 200 ms apart.
RETRIES = 3
BACKOFF = 0.05
# At open, the server may still be starting: a little longer.
OPEN_RETRIES = 5
CONNECT_TIMEOUT = 10.0
# Opened at start-up; more as calls need them, up to pool_size.
POOL_MIN_SIZE = 2
# An idle connection older than this is closed, not reused: a firewall or the server may
# have dropped it silently, and a write on it would fail with an unknown outcome.
MAX_IDLE = 300.0

# Group commit: the most calls one batch (one statement, one commit) carries, and how many
# batches may be on their way at once, each on its own connection.
MAX_BATCH = 256
WRITERS = 1

# No connection could be made, or the server cannot take one now: nothing was sent.
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable, timed out (TimeoutError is an OSError)
    asyncpg.CannotConnectNowError,  # starting up, shutting down, in recovery
    asyncpg.TooManyConnectionsError,
    asyncpg.PostgresConnectionError,  # includes ConnectionDoesNotExistError
)
# The connection broke while a statement was on its way or running.
_LOST_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
)

# --- statements -----------------------------------------------------------------------------
# Whole statements as constants: values always go in as parameters, never into the text.

# Group commit: the calls queued meanwhile, in one statement (see _Batch and
# core.store.postgres_schema). The status guards make a second settle, fail or start a no-op.
_WRITE_BATCH = (
    "SELECT * FROM imgbot_write_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,"
    " $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31,"
    " $32, $33, $34, $35)"
)
_SELECT_JOB = "SELECT * FROM jobs WHERE id = $1"
_MARK_UNSETTLED = "UPDATE jobs SET status = 'unsettled' WHERE id = $1 AND status = 'reserved'"
# Leases and takeovers lock the job rows in id order (as imgbot_write_batch does), and
# a takeover skips rows another worker is claiming or finishing right now.
_SET_LEASES = (
    "UPDATE jobs AS j SET lease_owner = $1, lease_until = $2"
    " FROM (SELECT id FROM jobs WHERE id = ANY($3::bigint[])"
    "       AND stage IN ('queued', 'drawing', 'drawn')"
    "       AND (lease_owner IS NULL OR lease_owner = $1) ORDER BY id FOR UPDATE) AS l"
    " WHERE j.id = l.id RETURNING j.id"
)
_CLAIM_EXPIRED = (
    "UPDATE jobs AS j SET lease_owner = $1, lease_until = $2,"
    " lost_credits = j.lost_credits"
    "   + CASE WHEN j.stage = 'drawing' THEN j.estimated_credits ELSE 0 END,"
    " stage = CASE WHEN j.stage = 'drawing' THEN 'queued' ELSE j.stage END"
    " FROM (SELECT id FROM jobs"
    "       WHERE stage IN ('queued', 'drawing', 'drawn') AND platform = ANY($5::text[])"
    "       AND (lease_owner IS NULL OR lease_owner <> $1) AND id <> ALL($7::bigint[])"
    "       AND ((lease_until IS NOT NULL AND lease_until <= $3)"
    "            OR (lease_until IS NULL AND created_at <= $4))"
    "       ORDER BY id LIMIT $6 FOR UPDATE SKIP LOCKED) AS c"
    " WHERE j.id = c.id RETURNING j.*"
)
_FINISH_DELIVERY = (
    "UPDATE jobs SET stage = $1, delivered_at = $2, result_refs = COALESCE($5, result_refs)"
    " WHERE id = $3 AND stage = 'drawn' AND (lease_owner IS NULL OR lease_owner = $4)"
)
_SELECT_OPEN = "SELECT * FROM jobs WHERE stage IN ('queued', 'drawing', 'drawn') ORDER BY id"
# /cancel across processes: a user's open jobs are asked once, their rows locked in id order
# (as every statement that changes several jobs); a holder reads which of its jobs were asked.
_REQUEST_CANCEL = (
    "UPDATE jobs AS j SET cancel_requested_at = $2"
    " FROM (SELECT id FROM jobs WHERE user_key = $1 AND stage IN ('queued', 'drawing')"
    "       AND cancel_requested_at IS NULL ORDER BY id FOR UPDATE) AS c"
    " WHERE j.id = c.id RETURNING j.*"
)
_CANCEL_REQUESTED = (
    "SELECT id FROM jobs WHERE id = ANY($1::bigint[])"
    " AND stage IN ('queued', 'drawing') AND cancel_requested_at IS NOT NULL"
)
_SELECT_JOB_BY_SOURCE = "SELECT * FROM jobs WHERE source_ref = $1"
# Taken by every capped start (try_start), so its counts cannot change under it.
START_LOCK_KEY = 0x696D6762_5354  # "imgb" "ST"
_TRY_START = (
    "UPDATE jobs AS j SET started_at = $2 WHERE j.id = $1 AND j.status = 'reserved'"
    " AND ($3 <= 0 OR (SELECT count(*) FROM jobs AS d WHERE d.stage = 'drawing'"
    "      AND d.user_key = j.user_key) < $3)"
    " AND ($4 <= 0 OR (SELECT count(*) FROM jobs AS d WHERE d.stage = 'drawing') < $4)"
    " RETURNING j.id"
)
_MARK_ONCE = (
    "INSERT INTO marks AS m (key, until) VALUES ($1, $2)"
    " ON CONFLICT (key) DO UPDATE SET until = excluded.until WHERE m.until <= $3"
    " RETURNING key"
)
_HOLD_LEASE = (
    "INSERT INTO named_leases AS l (name, owner, until, info) VALUES ($1, $2, $3, $4)"
    " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, until = excluded.until,"
    " info = excluded.info WHERE l.owner = excluded.owner OR l.until <= $5"
    " RETURNING owner"
)
_SELECT_UNSETTLED = "SELECT * FROM jobs WHERE status = 'unsettled' ORDER BY created_at, id"
_REFUND = (
    "UPDATE jobs SET status = 'refunded', refunded_by = $2, refunded_at = $3"
    " WHERE id = $1 AND (status IN ('succeeded', 'unsettled')"
    " OR (status = 'failed' AND COALESCE(actual_credits, 0) > 0)) RETURNING *"
)
_SELECT_STATUS = "SELECT status FROM jobs WHERE id = $1"
_SET_RESULT_REFS = "UPDATE jobs SET result_refs = $1 WHERE id = $2"
_SELECT_USER = "SELECT * FROM users WHERE user_key = $1"
_SELECT_CHAT = "SELECT * FROM chats WHERE chat_key = $1"
# Setting a limit creates the row of a user (chat) never seen, as the SQLite backend does.
_SET_USER_LIMITS = (
    "INSERT INTO users AS u (user_key, platform, user_id, daily_limit, monthly_limit,"
    " created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6)"
    " ON CONFLICT (user_key) DO UPDATE SET daily_limit = excluded.daily_limit,"
    " monthly_limit = excluded.monthly_limit, updated_at = excluded.updated_at"
)
_SET_CHAT_LIMIT = (
    "INSERT INTO chats AS c (chat_key, platform, chat_id, daily_limit, created_at, updated_at)"
    " VALUES ($1, $2, $3, $4, $5, $5)"
    " ON CONFLICT (chat_key) DO UPDATE SET daily_limit = excluded.daily_limit,"
    " updated_at = excluded.updated_at"
)
_SET_LANGUAGE = (
    "INSERT INTO users AS u (user_key, platform, user_id, language, created_at, updated_at)"
    " VALUES ($1, $2, $3, $4, $5, $5)"
    " ON CONFLICT (user_key) DO UPDATE SET language = excluded.language,"
    " updated_at = excluded.updated_at"
)
_BLOCK_KNOWN = (
    "WITH u AS (UPDATE users SET blocked = $2, updated_at = $3 WHERE user_key = $1 RETURNING 1),"
    " c AS (UPDATE chats SET blocked = $2, updated_at = $3 WHERE chat_key = $1 RETURNING 1)"
    " SELECT (SELECT count(*) FROM u) + (SELECT count(*) FROM c)"
)
# A key not seen yet is blocked as both a user and a chat (a bare platform:id does not say).
_BLOCK_NEW_USER = (
    "INSERT INTO users (user_key, platform, user_id, blocked, created_at, updated_at)"
    " VALUES ($1, $2, $3, 1, $4, $4) ON CONFLICT (user_key) DO UPDATE SET blocked = 1"
)
_BLOCK_NEW_CHAT = (
    "INSERT INTO chats (chat_key, platform, chat_id, blocked, created_at, updated_at)"
    " VALUES ($1, $2, $3, 1, $4, $4) ON CONFLICT (chat_key) DO UPDATE SET blocked = 1"
)
_IS_BLOCKED = (
    "SELECT EXISTS (SELECT 1 FROM users WHERE user_key = $1 AND blocked <> 0)"
    " OR EXISTS (SELECT 1 FROM chats WHERE chat_key = $2 AND blocked <> 0)"
)
# Exact sums over the jobs themselves: a report shows what was charged to the last bit,
# where the running totals (for limits) count micro-credits.
_SPEND_SUMS = (
    "SELECT u.display_name, u.daily_limit, u.monthly_limit, u.user_key IS NOT NULL AS known,"
    " (SELECT SUM(charged) FROM jobs WHERE user_key = $1 AND created_at >= $2) AS today,"
    " (SELECT SUM(charged) FROM jobs WHERE user_key = $1 AND created_at >= $3) AS month,"
    " (SELECT SUM(charged) FROM jobs WHERE user_key = $1) AS all_time"
    " FROM (SELECT 1) AS one LEFT JOIN users AS u ON u.user_key = $1"
)
_SELECT_LAST_JOBS = "SELECT * FROM jobs WHERE user_key = $1 ORDER BY id DESC LIMIT $2"
_TOP_SPENDERS = (
    "SELECT j.user_key, COALESCE(u.display_name, '') AS name,"
    " SUM(j.charged) AS credits, COUNT(*) AS jobs"
    " FROM jobs AS j LEFT JOIN users AS u ON u.user_key = j.user_key"
    " WHERE j.created_at >= $1 AND ($2::text IS NULL OR j.created_at < $2)"
    " GROUP BY j.user_key, u.display_name"
    " ORDER BY credits DESC, jobs DESC, j.user_key LIMIT $3"
)
_CHAT_TOTALS = (
    "SELECT chat_key, SUM(charged) AS credits, COUNT(*) AS jobs FROM jobs"
    " WHERE chat_key IS NOT NULL AND created_at >= $1 AND ($2::text IS NULL OR created_at < $2)"
    " GROUP BY chat_key ORDER BY credits DESC, jobs DESC, chat_key"
)
# The dashboard's aggregations, as in SQLite. A period is [$1, $2); $2 NULL = open-ended.
_PERIOD = "created_at >= $1 AND ($2::text IS NULL OR created_at < $2)"

# Counts the upstream gave unreadable are stored as -1: they count 0.
_TOKENS = (
    " SUM(GREATEST(COALESCE((usage_json::jsonb ->> 'text_input_tokens')::bigint, 0), 0))"
    " AS text_in,"
    " SUM(GREATEST(COALESCE((usage_json::jsonb ->> 'image_input_tokens')::bigint, 0), 0))"
    " AS image_in,"
    " SUM(GREATEST(COALESCE((usage_json::jsonb ->> 'image_output_tokens')::bigint, 0), 0))"
    " AS image_out"
)


_DAILY_USAGE = (
    "SELECT substr(created_at, 1, 10) AS day, model, SUM(charged) AS credits,"  # noqa: S608
    f" COUNT(*) AS jobs, {_TOKENS}"
    f" FROM jobs WHERE {_PERIOD} GROUP BY 1, 2 ORDER BY 1, 2"
)
_OUTCOMES = (
    'SELECT stage, status, COALESCE(error_code, \'\') COLLATE "C" AS code,'  # noqa: S608
    f" COUNT(*) AS jobs, SUM(charged) AS credits FROM jobs WHERE {_PERIOD}"
    " GROUP BY 1, 2, 3 ORDER BY jobs DESC, stage, status, code"
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
    "SELECT EXTRACT(EPOCH FROM finished_at::timestamptz - started_at::timestamptz)"  # noqa: S608
    f" AS seconds {_DRAWN} ORDER BY seconds, id LIMIT 1 OFFSET $3"
)
_LIST_JOBS = (
    f"SELECT * FROM jobs WHERE {_PERIOD}"  # noqa: S608 - constant text
    " AND ($3::text IS NULL OR user_key = $3) AND ($4::text IS NULL OR chat_key = $4)"
    " ORDER BY id DESC LIMIT $5"
)
_SELECT_UNDELIVERED = (
    "SELECT * FROM jobs WHERE stage = 'undelivered' AND status <> 'refunded'"
    " ORDER BY id LIMIT $1"
)
_USERS_WITH_OVERRIDES = (
    "SELECT * FROM users WHERE daily_limit IS NOT NULL OR monthly_limit IS NOT NULL"
    " OR blocked <> 0 ORDER BY user_key"
)
_CHATS_WITH_OVERRIDES = (
    "SELECT * FROM chats WHERE daily_limit IS NOT NULL OR blocked <> 0 ORDER BY chat_key"
)
_SELECT_FLAGGED = (
    "SELECT * FROM jobs WHERE usage_flag IS NOT NULL AND created_at >= $1"
    " ORDER BY created_at DESC, id DESC LIMIT 200"
)
_SELECT_EXPORT = (
    "SELECT * FROM jobs WHERE ($1::text IS NULL OR created_at >= $1)"
    " AND ($2::text IS NULL OR user_key = $2) ORDER BY id"
)
_GLOBAL_TODAY = (
    "SELECT micro_credits FROM spend_totals"
    " WHERE scope = 'global_daily' AND key = '' AND period = $1"
)
_SCHEMA_VERSION = "SELECT MAX(version) FROM schema_version"
_SELECT_BALANCE = "SELECT micro_credits FROM balances WHERE user_key = $1"
_LOCK_BALANCE = "SELECT micro_credits FROM balances WHERE user_key = $1 FOR UPDATE"
# Its trigger moves the balance in the same statement.
_INSERT_ENTRY = (
    "INSERT INTO credit_entries (user_key, kind, micro_credits, purchase_id, granted_by, note,"
    " created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
)
# Fails on a read-only standby or a read-only default transaction; rolled back at once.
_TOUCH = ("UPDATE schema_version SET version = version WHERE false", "SELECT txid_current()")
_IS_EMPTY = (
    "SELECT NOT EXISTS (SELECT 1 FROM users) AND NOT EXISTS (SELECT 1 FROM api_keys)"
    " AND NOT EXISTS (SELECT 1 FROM chats) AND NOT EXISTS (SELECT 1 FROM jobs)"
    " AND NOT EXISTS (SELECT 1 FROM purchases) AND NOT EXISTS (SELECT 1 FROM credit_entries)"
    " AND NOT EXISTS (SELECT 1 FROM usernames)"
)
_COUNTS = (
    "SELECT (SELECT count(*) FROM users) AS users, (SELECT count(*) FROM api_keys) AS api_keys,"
    " (SELECT count(*) FROM chats) AS chats, (SELECT count(*) FROM jobs) AS jobs,"
    " (SELECT count(*) FROM purchases) AS purchases,"
    " (SELECT count(*) FROM credit_entries) AS credit_entries,"
    " (SELECT count(*) FROM usernames) AS usernames,"
    " (SELECT count(*) FROM kept_results AS r JOIN jobs AS j ON j.id = r.job_id"
    " WHERE j.stage = 'drawn') AS kept_results"
)
# The web door's state (core/store/web.py).
_OPEN_SESSION = (
    "INSERT INTO web_sessions (token_hash, user_key, how, display_name, language, key_hash,"
    " created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
)
# A user's live sessions past the cap, and their expired ones, end: the oldest first.
_TRIM_SESSIONS = (
    "DELETE FROM web_sessions WHERE user_key = $1 AND id NOT IN (SELECT id FROM web_sessions"
    " WHERE user_key = $1 AND expires_at > $2 ORDER BY id DESC LIMIT $3)"
)
# A key session's key counts only while it is active and still its user's.
_SELECT_SESSION = (
    "SELECT s.user_key, s.how, s.display_name, s.language, s.expires_at, s.key_hash,"
    " k.id AS key_id, k.id IS NOT NULL AS key_live"
    " FROM web_sessions AS s LEFT JOIN api_keys AS k ON k.key_hash = s.key_hash"
    " AND k.revoked_at IS NULL AND k.user_key = s.user_key"
    " WHERE s.token_hash = $1 AND s.expires_at > $2"
)
# Serialises keep_files across processes (the size cap's check and the insert); beside
# the migrations' lock key ("imgbot"), never equal to it.
_WEB_FILES_LOCK_KEY = 0x696D67626F7402
# The kept files that, newest first, would pass the cap with the incoming bytes.
_FILES_OVER_CAP = (
    "DELETE FROM web_files WHERE id IN (SELECT w.id FROM (SELECT id,"
    " sum(size) OVER (ORDER BY id DESC) AS newer FROM web_files) AS w WHERE w.newer + $1 > $2)"
)
_KEEP_FILE = (
    "INSERT INTO web_files (name, job_id, n, user_key, mime, width, height, size, kept_at,"
    " expires_at, data) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
)
_JOB_FILES = (
    "SELECT job_id, name, mime, width, height FROM web_files"
    " WHERE job_id = ANY($1::bigint[]) AND user_key = $2 AND expires_at > $3"
    " ORDER BY job_id, n"
)
_NOTE_USERNAME = (
    "INSERT INTO usernames (name_key, user_key, seen_at) VALUES ($1, $2, $3)"
    " ON CONFLICT (name_key) DO UPDATE SET user_key = excluded.user_key,"
    " seen_at = excluded.seen_at"
)
_USER_TOTALS = "SELECT user_key, SUM(charged) AS total FROM jobs GROUP BY user_key"
# Kept results (core/results.py): a result and its images in order, in one statement.
_KEPT_RESULT = (
    "SELECT r.revised_prompt, r.elapsed, r.saved_at, i.mime, i.width, i.height, i.data"
    " FROM kept_results AS r JOIN kept_result_images AS i ON i.job_id = r.job_id"
    " WHERE r.job_id = $1 ORDER BY i.n"
)
_KEEP_RESULT = (
    "INSERT INTO kept_results (job_id, revised_prompt, elapsed, saved_at) VALUES ($1, $2, $3, $4)"
)
_KEEP_RESULT_IMAGE = (
    "INSERT INTO kept_result_images (job_id, n, mime, width, height, data)"
    " VALUES ($1, $2, $3, $4, $5, $6)"
)
# Images first: they refer to their result.
_DROP_RESULT = (
    "DELETE FROM kept_result_images WHERE job_id = $1",
    "DELETE FROM kept_results WHERE job_id = $1",
)
# The results a copy carries: those of the jobs still waiting to be delivered.
_RESULTS_TO_DELIVER = (
    "SELECT r.job_id FROM kept_results AS r JOIN jobs AS j ON j.id = r.job_id"
    " WHERE j.stage = 'drawn' AND r.job_id > $1 ORDER BY r.job_id LIMIT $2"
)
# After a copy the identity must hand out ids above the copied ones (never backwards).
_MOVE_JOB_IDS = (
    "SELECT setval(s.seq, s.top) FROM (SELECT pg_get_serial_sequence('jobs', 'id')::regclass"
    " AS seq, (SELECT max(id) FROM jobs) AS top) AS s"
    " WHERE s.top > COALESCE(pg_sequence_last_value(s.seq), 0)"
)
_MOVE_PURCHASE_IDS = (
    "SELECT setval(s.seq, s.top) FROM (SELECT pg_get_serial_sequence('purchases', 'id')::regclass"
    " AS seq, (SELECT max(id) FROM purchases) AS top) AS s"
    " WHERE s.top > COALESCE(pg_sequence_last_value(s.seq), 0)"
)
_MOVE_ENTRY_IDS = (
    "SELECT setval(s.seq, s.top) FROM"
    " (SELECT pg_get_serial_sequence('credit_entries', 'id')::regclass"
    " AS seq, (SELECT max(id) FROM credit_entries) AS top) AS s"
    " WHERE s.top > COALESCE(pg_sequence_last_value(s.seq), 0)"
)
_MOVE_API_KEY_IDS = (
    "SELECT setval(s.seq, s.top) FROM (SELECT pg_get_serial_sequence('api_keys', 'id')::regclass"
    " AS seq, (SELECT max(id) FROM api_keys) AS top) AS s"
    " WHERE s.top > COALESCE(pg_sequence_last_value(s.seq), 0)"
)

# The raw columns a copy moves (every column but the generated charged / charged_micro), in
# the SQLite tables' order, and the type each is stored as.
_COPY_COLUMNS: dict[str, tuple[tuple[str, type], ...]] = {
    "users": (
        ("user_key", str),
        ("platform", str),
        ("user_id", str),
        ("display_name", str),
        ("language", str),
        ("daily_limit", float),
        ("monthly_limit", float),
        ("blocked", int),
        ("created_at", str),
        ("updated_at", str),
    ),
    "api_keys": (
        ("id", int),
        ("key_hash", str),
        ("user_key", str),
        ("name", str),
        ("created_at", str),
        ("revoked_at", str),
        ("last_used_at", str),
    ),
    "chats": (
        ("chat_key", str),
        ("platform", str),
        ("chat_id", str),
        ("title", str),
        ("daily_limit", float),
        ("blocked", int),
        ("created_at", str),
        ("updated_at", str),
    ),
    "jobs": (
        ("id", int),
        ("user_key", str),
        ("chat_key", str),
        ("platform", str),
        ("display_name", str),
        ("command_text", str),
        ("request_json", str),
        ("model", str),
        ("size", str),
        ("quality", str),
        ("n", int),
        ("reference_count", int),
        ("status", str),
        ("estimated_credits", float),
        ("actual_credits", float),
        ("usage_json", str),
        ("error_code", str),
        ("created_at", str),
        ("started_at", str),
        ("finished_at", str),
        ("result_refs", str),
        ("refunded_by", str),
        ("refunded_at", str),
        ("source_ref", str),
        ("reported_credits", float),
        ("usage_flag", str),
        ("stage", str),
        ("attempts", int),
        ("lost_credits", float),
        ("lease_owner", str),
        ("lease_until", str),
        ("delivered_at", str),
        ("prepaid", int),
        ("cancel_requested_at", str),
    ),
    "purchases": (
        ("id", int),
        ("user_key", str),
        ("provider", str),
        ("charge_id", str),
        ("provider_charge_id", str),
        ("pack", str),
        ("amount", int),
        ("currency", str),
        ("credits", float),
        ("status", str),
        ("created_at", str),
        ("refunded_at", str),
        ("refunded_by", str),
        ("refunded_credits", float),
    ),
    "credit_entries": (
        ("id", int),
        ("user_key", str),
        ("kind", str),
        ("micro_credits", int),
        ("purchase_id", int),
        ("granted_by", str),
        ("note", str),
        ("created_at", str),
    ),
    "usernames": (
        ("name_key", str),
        ("user_key", str),
        ("seen_at", str),
    ),
}
# Columns a later schema added: rows from a store without them load with NULL there (or,
# for the durable-job columns, what migration 7 gives an old row).
_LATE_COLUMNS = frozenset(
    {"reported_credits", "usage_flag", "stage", "attempts", "lost_credits", "lease_owner",
     "lease_until", "delivered_at", "prepaid", "cancel_requested_at"}
)
# One statement per copied table, written out (tests/test_postgres_store.py checks they list
# _COPY_COLUMNS, in order). Paging starts after '' or 0: every key is above those.
_PAGE_USERS = (
    "SELECT user_key, platform, user_id, display_name, language, daily_limit, monthly_limit,"
    " blocked, created_at, updated_at FROM users WHERE user_key > $1 ORDER BY user_key LIMIT $2"
)
_PAGE_API_KEYS = (
    "SELECT id, key_hash, user_key, name, created_at, revoked_at, last_used_at"
    " FROM api_keys WHERE id > $1 ORDER BY id LIMIT $2"
)
_PAGE_CHATS = (
    "SELECT chat_key, platform, chat_id, title, daily_limit, blocked, created_at, updated_at"
    " FROM chats WHERE chat_key > $1 ORDER BY chat_key LIMIT $2"
)
_PAGE_JOBS = (
    "SELECT id, user_key, chat_key, platform, display_name, command_text, request_json, model,"
    " size, quality, n, reference_count, status, estimated_credits, actual_credits, usage_json,"
    " error_code, created_at, started_at, finished_at, result_refs, refunded_by, refunded_at,"
    " source_ref, reported_credits, usage_flag, stage, attempts, lost_credits, lease_owner,"
    " lease_until, delivered_at, prepaid, cancel_requested_at FROM jobs WHERE id > $1"
    " ORDER BY id LIMIT $2"
)
_PAGE_PURCHASES = (
    "SELECT id, user_key, provider, charge_id, provider_charge_id, pack, amount, currency,"
    " credits, status, created_at, refunded_at, refunded_by, refunded_credits"
    " FROM purchases WHERE id > $1 ORDER BY id LIMIT $2"
)
_PAGE_CREDIT_ENTRIES = (
    "SELECT id, user_key, kind, micro_credits, purchase_id, granted_by, note, created_at"
    " FROM credit_entries WHERE id > $1 ORDER BY id LIMIT $2"
)
_PAGE_USERNAMES = (
    "SELECT name_key, user_key, seen_at FROM usernames WHERE name_key > $1"
    " ORDER BY name_key LIMIT $2"
)
_LOAD_USERS = (
    "INSERT INTO users (user_key, platform, user_id, display_name, language, daily_limit,"
    " monthly_limit, blocked, created_at, updated_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
)
_LOAD_API_KEYS = (
    "INSERT INTO api_keys (id, key_hash, user_key, name, created_at, revoked_at,"
    " last_used_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
)
_LOAD_CHATS = (
    "INSERT INTO chats (chat_key, platform, chat_id, title, daily_limit, blocked, created_at,"
    " updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
)
_LOAD_JOBS = (
    "INSERT INTO jobs (id, user_key, chat_key, platform, display_name, command_text,"
    " request_json, model, size, quality, n, reference_count, status, estimated_credits,"
    " actual_credits, usage_json, error_code, created_at, started_at, finished_at, result_refs,"
    " refunded_by, refunded_at, source_ref, reported_credits, usage_flag, stage, attempts,"
    " lost_credits, lease_owner, lease_until, delivered_at, prepaid, cancel_requested_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18,"
    " $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31, $32, $33, $34)"
)
_LOAD_PURCHASES = (
    "INSERT INTO purchases (id, user_key, provider, charge_id, provider_charge_id, pack, amount,"
    " currency, credits, status, created_at, refunded_at, refunded_by, refunded_credits)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
)
# Its trigger adds each entry to the target's balances.
_LOAD_CREDIT_ENTRIES = (
    "INSERT INTO credit_entries (id, user_key, kind, micro_credits, purchase_id, granted_by,"
    " note, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
)
_LOAD_USERNAMES = "INSERT INTO usernames (name_key, user_key, seen_at) VALUES ($1, $2, $3)"


def _with_stage(row: dict[str, Any]) -> dict[str, Any]:
    """A job row from a store older than the durable-job columns: as migration 7 reads it."""
    if row.get("stage") is not None:
        return row
    if row.get("status") == "reserved":
        stage = "drawing" if row.get("started_at") else "queued"
    elif row.get("status") in ("succeeded", "refunded"):
        stage = "delivered"
    else:
        stage = "cancelled" if "cancel" in str(row.get("error_code") or "") else "failed"
    started = 1 if row.get("started_at") else 0
    return {**row, "stage": stage, "attempts": row.get("attempts") or started,
            "lost_credits": row.get("lost_credits") or 0.0}


def _refusal(scope: str, limit: float, micro: int, user_key: str, estimate: float) -> LimitExceeded:
    """A refusal as imgbot_write_batch reports it: the tightest limit and what it counted."""
    if scope == "balance":
        return balance_refusal(user_key, estimate, max(0.0, micro / MICRO))
    left = max(0.0, limit - micro / MICRO)
    return LimitExceeded(
        f"limit.{scope}",
        scope=scope,
        asked=estimate,
        remaining=left,
        limit=limit,
        detail=f"{user_key} asked {estimate} with {left} of {limit} left",
    )


def _updated(status: str) -> int:
    # asyncpg returns the command tag, e.g. "UPDATE 1".
    return int(status.rsplit(" ", 1)[-1])


def _coerce(kind: type, value: Any) -> Any:
    # Raw rows from the other backend: SQLite may hand back an int for a REAL or a bool flag.
    if value is None:
        return None
    if kind is float:
        return float(value)
    if kind is int:
        return int(value)
    return value


def _plain(row: asyncpg.Record) -> dict[str, Any]:
    return dict(row.items())


def _host_of(dsn: str) -> str:
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        return f"{host}:{parts.port or 5432}"
    except ValueError:
        return "the server"


def _dbname_of(dsn: str) -> str:
    try:
        return urlsplit(dsn).path.lstrip("/") or "(default)"
    except ValueError:
        return "(unknown)"


def _open_error(dsn: str, err: BaseException) -> StoreError:
    """One line naming DATABASE_URL (redacted) and what to fix; never the driver's text
    when it could hold the URL."""
    where = f"DATABASE_URL {redact_dsn(dsn)}"
    if isinstance(
        err, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return StoreError(f"{where}: the server refused the user name or password")
    if isinstance(err, asyncpg.InvalidCatalogNameError):
        return StoreError(
            f"{where}: database {_dbname_of(dsn)!r} does not exist: create it or fix the name"
        )
    if isinstance(err, SchemaTooNew):
        return StoreError(f"{where}: {err}")
    if isinstance(err, asyncpg.TooManyConnectionsError):
        return StoreError(f"{where}: the server has no connection slots left")
    if isinstance(err, asyncpg.CannotConnectNowError):
        return StoreError(f"{where}: the server is not accepting connections now (starting up?)")
    if isinstance(err, OSError):
        reason = err.strerror or type(err).__name__
        return StoreError(
            f"{where}: cannot reach the PostgreSQL server at {_host_of(dsn)} ({reason})"
        )
    if isinstance(err, asyncpg.PostgresError):
        # Sent by the server, which never repeats a password back.
        return StoreError(f"{where}: {err.sqlstate} {str(err).splitlines()[0]}")
    if isinstance(err, asyncpg.ClientConfigurationError | ValueError):
        return StoreError(f"{where}: not a valid PostgreSQL URL")
    return StoreError(f"{where}: cannot connect ({type(err).__name__})")


def _failure(what: str, err: BaseException) -> str:
    # A server's message (never a password); for anything else only the kind of failure.
    if isinstance(err, asyncpg.PostgresError):
        first_line = (str(err).splitlines() or [""])[0]
        return f"{what}: {err.sqlstate} {first_line}".rstrip()
    return f"{what}: {type(err).__name__}"


class _Pool:
    """A small LIFO pool of asyncpg connections, up to `size`, opened as needed.

    asyncpg's own Pool costs about 40 µs of the event loop's time per borrow (a proxy, a
    holder, an inactivity timer armed and cancelled, and a reset query: one more round
    trip), a third of what a reserve + settle pair costs this process. Here a borrow is a
    list pop and a return a list push. A connection that broke, was left inside a
    transaction, or idled longer than MAX_IDLE is closed instead of reused; a waiter then
    opens a new one in its place.
    """

    def __init__(self, dsn: str, size: int) -> None:
        self.dsn = dsn
        self._size = size
        self._idle: list[tuple[asyncpg.Connection, float]] = []
        self._count = 0  # connections open, or being opened
        self._waiters: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self._closed = False

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(
            self.dsn,
            timeout=CONNECT_TIMEOUT,
            server_settings={"application_name": "imgbot"},
        )

    async def open(self, count: int) -> None:
        """Open `count` connections now (so a wrong URL fails at start-up)."""
        while len(self._idle) < count:
            self._count += 1
            try:
                conn = await self._connect()
            except BaseException:
                self._count -= 1
                raise
            self._idle.append((conn, time.monotonic()))

    async def acquire(self) -> asyncpg.Connection:
        """Borrow a connection: an idle one, a new one, or the next one given back."""
        while True:
            if self._closed:
                raise RuntimeError("the store is closed")
            now = time.monotonic()
            while self._idle:
                conn, since = self._idle.pop()
                if conn.is_closed() or now - since > MAX_IDLE:
                    self._drop(conn)
                    continue
                return conn
            if self._count < self._size:
                self._count += 1
                try:
                    return await self._connect()
                except BaseException:
                    self._count -= 1
                    self._wake(None)
                    raise
            waiter: asyncio.Future[asyncpg.Connection | None] = (
                asyncio.get_running_loop().create_future()
            )
            self._waiters.append(waiter)
            try:
                conn = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                    self.release(waiter.result())  # handed over just as we were cancelled
                raise
            if conn is not None:
                return conn
            # None: a connection was dropped; go round and open one in its place.

    def release(self, conn: asyncpg.Connection) -> None:
        """Give a connection back: to the next waiter, else to the idle list."""
        if conn.is_closed() or conn.is_in_transaction() or self._closed:
            self._drop(conn)
            return
        if not self._wake(conn):
            self._idle.append((conn, time.monotonic()))

    def _wake(self, conn: asyncpg.Connection | None) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def _drop(self, conn: asyncpg.Connection) -> None:
        conn.terminate()
        self._count -= 1
        self._wake(None)

    async def close(self) -> None:
        """Close the idle connections politely (call once none is borrowed)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            self._count -= 1
            try:
                await conn.close(timeout=CONNECT_TIMEOUT)
            except Exception:  # noqa: BLE001 - it goes either way
                conn.terminate()

    def terminate(self) -> None:
        """Close every idle connection at once."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            self._count -= 1
            conn.terminate()


async def _open_pool(dsn: str, pool_size: int) -> _Pool:
    pool = _Pool(dsn, pool_size)
    delay = BACKOFF * 2
    for attempt in range(OPEN_RETRIES + 1):
        try:
            await pool.open(min(POOL_MIN_SIZE, pool_size))
            return pool
        except (asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError) as err:
            # Transient: the server is starting, or busy. Anything else will not get better.
            if attempt == OPEN_RETRIES:
                pool.terminate()
                raise _open_error(dsn, err) from None
        except ConnectionRefusedError as err:
            if attempt == min(2, OPEN_RETRIES):
                pool.terminate()
                raise _open_error(dsn, err) from None
        except Exception as err:  # noqa: BLE001 - every cause becomes one redacted line
            pool.terminate()
            raise _open_error(dsn, err) from None
        await asyncio.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable")


# The kinds of call a batch carries (the `o_kind` imgbot_write_batch answers with), and how
# many values each passes.
_RESERVE_CALL, _FINISH_CALL, _START_CALL = "r", "f", "s"
_RESERVE_WIDTH, _FINISH_WIDTH, _START_WIDTH = 21, 7, 2


class _Call:
    """One reservation, settle / fail or start, waiting in the queue for its batch."""

    __slots__ = ("kind", "job_id", "params", "estimate", "future")

    def __init__(
        self, kind: str, job_id: int | None, params: tuple[Any, ...], *, estimate: float = 0.0
    ) -> None:
        self.kind = kind
        self.job_id = job_id  # the job a settle, fail or start changes
        self.params = params
        self.estimate = estimate  # a reservation's, as asked (for a refusal's message)
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()


class _BatchRefused(Exception):
    """The database (or the driver, before sending) would not take a batch: nothing of it
    was written."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(type(error).__name__)
        self.error = error


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """The calls' values, one list (one array parameter) per position."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]


def _log_release(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        # Recovery at the next start-up resolves the job.
        log.warning("could not release a cancelled reservation: %r", future.exception())


class _Snapshot(SnapshotReader):
    """Reads over one connection in a REPEATABLE READ, READ ONLY transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def rows(
        self, table: str, *, after: Any = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        try:
            if table == "users":
                records = await self._conn.fetch(_PAGE_USERS, after or "", limit)
            elif table == "api_keys":
                records = await self._conn.fetch(_PAGE_API_KEYS, after or 0, limit)
            elif table == "chats":
                records = await self._conn.fetch(_PAGE_CHATS, after or "", limit)
            elif table == "jobs":
                records = await self._conn.fetch(_PAGE_JOBS, after or 0, limit)
            elif table == "purchases":
                records = await self._conn.fetch(_PAGE_PURCHASES, after or 0, limit)
            elif table == "credit_entries":
                records = await self._conn.fetch(_PAGE_CREDIT_ENTRIES, after or 0, limit)
            elif table == "usernames":
                records = await self._conn.fetch(_PAGE_USERNAMES, after or "", limit)
            else:
                raise ValueError(f"not a table a copy moves: {table!r}")
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as err:
            raise StoreError(_failure(f"reading {table}", err)) from err
        return [_plain(record) for record in records]

    async def counts(self) -> dict[str, int]:
        try:
            row = await self._conn.fetchrow(_COUNTS)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as err:
            raise StoreError(_failure("counting rows", err)) from err
        assert row is not None
        return {table: int(row[table]) for table in (*dict(COPY_TABLES), "kept_results")}

    async def results_to_deliver(self, *, after: int = 0, limit: int = 4) -> list[KeptResult]:
        try:
            found = []
            for (job_id,) in await self._conn.fetch(_RESULTS_TO_DELIVER, after, limit):
                result = kept_result_from_rows(job_id, await self._conn.fetch(_KEPT_RESULT,
                                                                                job_id))
                if result is not None:
                    found.append(result)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as err:
            raise StoreError(_failure("reading kept results", err)) from err
        return found

    async def user_totals(self) -> dict[str, float]:
        try:
            records = await self._conn.fetch(_USER_TOTALS)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as err:
            raise StoreError(_failure("summing users' charges", err)) from err
        return {
            r["user_key"]: float(r["total"]) if r["total"] is not None else 0.0 for r in records
        }


class PostgresStore(Store):
    """Spend, reservations, limits and reports in one PostgreSQL database."""

    kind = "postgresql"

    def __init__(self, pool: _Pool, limits: Limits, clock: Callable[[], datetime]) -> None:
        self._pool = pool
        self._where = redact_dsn(pool.dsn)
        self._limits = limits
        self._clock = clock
        self._closed = False
        self._close_task: asyncio.Future[None] | None = None
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Calls running on after their caller left (reservations, releases): kept referenced.
        self._background: set[asyncio.Future[Any]] = set()
        # Group commit: reservations, settles, fails and starts waiting for a writer.
        self._queue: deque[_Call] = deque()
        self._writers = 0

    def __repr__(self) -> str:
        return f"PostgresStore({self._where!r})"

    # --- life -------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        dsn: str,
        limits: Limits,
        *,
        clock: Callable[[], datetime] | None = None,
        pool_size: int = 10,
    ) -> PostgresStore:
        """Connect (a pool of up to `pool_size`), migrate, and return the store.

        Any failure raises StoreError: one line naming DATABASE_URL, password redacted.
        """
        if pool_size < 1:
            raise ValueError("pool_size must be >= 1")
        pool = await _open_pool(dsn, pool_size)
        store = cls(pool, limits, clock or utc_now)
        try:
            conn = await pool.acquire()
            try:
                await apply_migrations(conn, store._now_iso())
            finally:
                pool.release(conn)
        except BaseException as err:
            pool.terminate()
            if isinstance(err, Exception):
                raise _open_error(dsn, err) from None
            raise
        return store

    async def close(self) -> None:
        """Close once the calls already made have finished; safe twice."""
        if self._close_task is None:
            self._closed = True
            self._close_task = asyncio.ensure_future(self._shut())
        await asyncio.shield(self._close_task)

    async def _shut(self) -> None:
        await self._idle.wait()
        await self._pool.close()

    @property
    def limits(self) -> Limits:
        """Return the default limits this store enforces."""
        return self._limits

    def describe(self) -> str:
        """Return the database URL with the password redacted."""
        return self._where

    async def schema_version(self) -> int:
        """Return the schema version of the open database."""
        value = await self._read(lambda conn: conn.fetchval(_SCHEMA_VERSION))
        return int(value or 0)

    async def check_writable(self) -> None:
        """Prove the database accepts writes: a write and a transaction id, rolled back."""

        async def touch(conn: asyncpg.Connection) -> None:
            transaction = conn.transaction()
            await transaction.start()
            try:
                for statement in _TOUCH:
                    await conn.execute(statement)
            finally:
                await transaction.rollback()

        try:
            await self._write(touch)
        except StoreError as err:
            raise StoreError(f"DATABASE_URL {self._where} does not accept writes: {err}") from None

    # --- calls ------------------------------------------------------------------------

    def _enter(self, *, closing_ok: bool = False) -> None:
        if self._closed and not closing_ok:
            raise RuntimeError("the store is closed")
        self._active += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    def _require(self) -> None:
        if self._closed:
            raise RuntimeError("the store is closed")

    def _keep(self, task: asyncio.Future[_T]) -> asyncio.Future[_T]:
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _read(self, fn: Callable[[asyncpg.Connection], Awaitable[_T]]) -> _T:
        self._enter()
        try:
            return await self._attempt(fn, write=False)
        finally:
            self._leave()

    async def _write(self, fn: Callable[[asyncpg.Connection], Awaitable[_T]]) -> _T:
        """Run a write that is not batched to its end even if the caller is cancelled.

        Cancelling the caller only stops the waiting (as in the SQLite backend), so no
        statement is cut off halfway with its outcome unknown.
        """
        self._enter()

        async def run() -> _T:
            try:
                return await self._attempt(fn, write=True)
            finally:
                self._leave()

        return await asyncio.shield(self._keep(asyncio.ensure_future(run())))

    async def _acquire(self) -> asyncpg.Connection:
        """Borrow a connection, retrying while none can be made (nothing was sent yet)."""
        delay = BACKOFF
        for attempt in range(RETRIES + 1):
            try:
                return await self._pool.acquire()
            except _CONNECT_ERRORS as err:
                if attempt == RETRIES:
                    # The driver's text may hold the URL: only the kind of failure.
                    raise StoreError(
                        f"cannot connect to DATABASE_URL {self._where}: {type(err).__name__}"
                    ) from None
            except (asyncpg.PostgresError, asyncpg.InterfaceError, ValueError) as err:
                # Refused for good (password changed, database dropped): say which, redacted.
                raise _open_error(self._pool.dsn, err) from None
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    async def _attempt(
        self, fn: Callable[[asyncpg.Connection], Awaitable[_T]], *, write: bool
    ) -> _T:
        """Run `fn` on a pooled connection, retrying what provably did not commit."""
        delay = BACKOFF
        for attempt in range(RETRIES + 1):
            last = attempt == RETRIES
            conn = await self._acquire()
            try:
                return await fn(conn)
            except asyncio.CancelledError:
                # A read cut off mid-statement: the connection's state is unknown.
                conn.terminate()
                raise
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as err:
                # The server rolled the whole transaction back: nothing was committed.
                if last:
                    raise StoreError(
                        _failure("the database gave up on a transaction", err)
                    ) from err
            except _LOST_ERRORS as err:
                if write:
                    raise StoreError(
                        f"lost the connection to DATABASE_URL {self._where} during a write;"
                        f" whether it was saved is unknown ({type(err).__name__})"
                    ) from err
                if last:
                    raise StoreError(
                        f"lost the connection to DATABASE_URL {self._where} ({type(err).__name__})"
                    ) from err
            except (asyncpg.PostgresError, asyncpg.InterfaceError) as err:
                raise StoreError(_failure("database error", err)) from err
            finally:
                self._pool.release(conn)
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    # --- time -------------------------------------------------------------------------

    def _now(self) -> datetime:
        return as_utc(self._clock())

    def _now_iso(self) -> str:
        return iso(self._now())

    # --- group commit -----------------------------------------------------------------

    def _submit(self, call: _Call, *, closing_ok: bool = False) -> None:
        """Queue a call for the next batch; start a writer if fewer than WRITERS run."""
        self._enter(closing_ok=closing_ok)
        self._queue.append(call)
        if self._writers < WRITERS:
            self._writers += 1
            self._keep(asyncio.ensure_future(self._drain()))

    async def _call(self, call: _Call) -> Any:
        """Queue a call and wait for its outcome, told once its batch has committed.

        Cancelling the caller only stops the waiting: the call is written with its batch
        all the same (no statement is cut off with its outcome unknown), and a reservation
        whose caller is gone by then is released at once.
        """
        self._submit(call)
        try:
            return await call.future
        except asyncio.CancelledError:
            future = call.future
            if future.done() and not future.cancelled() and future.exception() is None:
                # Done just as the caller was cancelled: its result reached no one.
                if call.kind == _RESERVE_CALL:
                    self._release_orphan(future.result())
            raise

    async def _drain(self) -> None:
        """Write batches until the queue is empty (the next call starts a writer again)."""
        try:
            while self._queue:
                await self._run_batch(self._take())
        finally:
            self._writers -= 1

    def _take(self) -> list[_Call]:
        """The oldest calls, up to MAX_BATCH, stopping before a second call on one job: it
        waits for the first's outcome (a start and a settle keep their order)."""
        batch: list[_Call] = []
        jobs: set[int] = set()
        queue = self._queue
        while queue and len(batch) < MAX_BATCH:
            job_id = queue[0].job_id
            if job_id is not None:
                if job_id in jobs:
                    break
                jobs.add(job_id)
            batch.append(queue.popleft())
        return batch

    def _batch_on(self, batch: list[_Call]) -> Callable[[asyncpg.Connection], Awaitable[Any]]:
        defaults = self._limits
        args = [
            *_columns([c.params for c in batch if c.kind == _RESERVE_CALL], _RESERVE_WIDTH),
            float(defaults.user_daily),
            float(defaults.user_monthly),
            float(defaults.chat_daily),
            float(defaults.global_daily),
            EPSILON,
            *_columns([c.params for c in batch if c.kind == _FINISH_CALL], _FINISH_WIDTH),
            *_columns([c.params for c in batch if c.kind == _START_CALL], _START_WIDTH),
        ]

        async def write_batch_on(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            try:
                return await conn.fetch(_WRITE_BATCH, *args)
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError, *_LOST_ERRORS):
                raise  # retried whole, or reported unknown, by _attempt
            except asyncpg.InterfaceError as err:
                # A value the driver cannot send (a number out of range): nothing was sent.
                raise _BatchRefused(err) from err
            except asyncpg.PostgresError as err:
                # Rolled back whole. A value the server will not store (class 22, data
                # exception: a NUL in a text) or a constraint (class 23) is one call's fault;
                # anything else (a timeout, a full disk) is the batch's.
                if (err.sqlstate or "")[:2] in ("22", "23"):
                    raise _BatchRefused(err) from err
                raise

        return write_batch_on

    async def _run_batch(self, batch: list[_Call]) -> None:
        """Write a batch in one statement and tell each caller its outcome after the commit."""
        try:
            rows = await self._attempt(self._batch_on(batch), write=True)
        except _BatchRefused as refused:
            if len(batch) > 1:
                # Nothing was written: the calls again one by one, so only the call the
                # database will not take (bad text, say) fails.
                for call in batch:
                    await self._run_batch([call])
                return
            self._fail(batch, StoreError(_failure("database error", refused.error)))
        except Exception as err:  # noqa: BLE001 - every call of the batch is told
            # The commit failed, or its outcome is unknown: so is every call's.
            failure = (
                err
                if isinstance(err, StoreError)
                else StoreError(f"writing to DATABASE_URL {self._where}: {type(err).__name__}")
            )
            self._fail(batch, failure)
        else:
            self._deliver(batch, rows)

    def _fail(self, batch: list[_Call], failure: StoreError) -> None:
        for call in batch:
            # One exception per caller (each raise writes its own traceback into it).
            error = StoreError(str(failure))
            error.__cause__ = failure.__cause__
            self._resolve(call, error)

    def _deliver(self, batch: list[_Call], rows: list[asyncpg.Record]) -> None:
        reserved: dict[int, asyncpg.Record] = {}
        changed: set[tuple[str, int]] = set()
        for row in rows:
            if row["o_kind"] == _RESERVE_CALL:
                reserved[row["o_index"]] = row
            else:
                changed.add((row["o_kind"], row["o_job_id"]))
        index = 0
        for call in batch:
            outcome: Any
            if call.kind == _RESERVE_CALL:
                index += 1
                row = reserved.get(index)
                if row is None:  # cannot happen: the function answers every reservation
                    outcome = StoreError("the database gave no outcome for a reservation")
                elif row["o_job_id"] is not None:
                    outcome = int(row["o_job_id"])
                elif row["o_duplicate_of"] is not None:
                    outcome = DuplicateJob(job_id=int(row["o_duplicate_of"]), silent=True)
                elif row["o_scope"] == "queue_full":
                    outcome = QueueFull(waiting=int(row["o_micro"]))
                elif row["o_scope"] == "rate_limited":
                    outcome = RateLimited(
                        per_minute=int(call.params[18]), seconds=int(row["o_limit"])
                    )
                else:
                    outcome = _refusal(
                        row["o_scope"],
                        float(row["o_limit"]),
                        int(row["o_micro"]),
                        call.params[0],
                        call.estimate,
                    )
            else:
                outcome = (call.kind, call.job_id) in changed
            self._resolve(call, outcome)

    def _resolve(self, call: _Call, outcome: Any) -> None:
        try:
            future = call.future
            if future.cancelled():
                # The caller is gone: a job reserved for no one is given back at once.
                if call.kind == _RESERVE_CALL and isinstance(outcome, int):
                    self._release_orphan(outcome)
            elif not future.done():
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
        finally:
            self._leave()

    def _release_orphan(self, job_id: int) -> None:
        # The caller of `reserve` was cancelled while its job was being written: no one will
        # draw or settle it, so give the room back now rather than at the next start-up.
        call = _Call(
            _FINISH_CALL, job_id, (job_id, "failed", 0.0, None, "cancelled", None, self._now_iso())
        )
        call.future.add_done_callback(_log_release)
        self._submit(call, closing_ok=True)

    # --- jobs -------------------------------------------------------------------------

    async def reserve(self, requester: Requester, spec: JobSpec, estimate: float) -> int:
        """Check `estimate` against every limit and reserve it as a new job; return its id."""
        check_credits("estimate", estimate)
        if spec.n < 1 or spec.reference_count < 0:
            raise ValueError("n must be >= 1 and reference_count >= 0")
        now_iso = self._now_iso()
        params = (
            requester.user_key,
            requester.chat_key,
            requester.platform,
            requester.user_id,
            requester.chat_id,
            requester.display_name,
            requester.language,
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
            int(spec.max_open),
            int(spec.per_minute),
            iso(datetime.fromisoformat(now_iso) - timedelta(seconds=60)),
            int(spec.prepaid),
        )
        return int(await self._call(_Call(_RESERVE_CALL, None, params, estimate=estimate)))

    async def _finish(
        self,
        job_id: int,
        status: JobStatus,
        credits: float,
        usage: Usage | None,
        error_code: str | None,
        flag: str | None,
    ) -> bool:
        check_credits("credits", credits)
        if not is_row_id(job_id):
            self._require()
            return False
        params = (
            job_id,
            status.value,
            float(credits),
            usage_json(usage),
            error_code,
            flag,
            self._now_iso(),
        )
        return bool(await self._call(_Call(_FINISH_CALL, job_id, params)))

    async def mark_started(self, job_id: int) -> bool:
        """Record that a reserved job started drawing; False if it is not reserved."""
        now_iso = self._now_iso()
        if not is_row_id(job_id):
            self._require()
            return False
        return bool(await self._call(_Call(_START_CALL, job_id, (job_id, now_iso))))

    async def try_start(self, job_id: int, per_user: int, global_cap: int) -> bool | None:
        """Start a reserved job if there is room (see Store.try_start).

        Starts with a cap are taken one at a time across processes (a transaction-level
        advisory lock), so two processes never both see the last free place.
        """
        self._require()
        if not is_row_id(job_id):
            return None
        now_iso = self._now_iso()

        async def start_on(conn: asyncpg.Connection) -> bool | None:
            async with conn.transaction():
                if per_user > 0 or global_cap > 0:
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", START_LOCK_KEY)
                started = await conn.fetchval(
                    _TRY_START, job_id, now_iso, int(per_user), int(global_cap)
                )
                if started is not None:
                    return True
                status = await conn.fetchval("SELECT status FROM jobs WHERE id = $1", job_id)
                return False if status == "reserved" else None

        return await self._write(start_on)

    async def settle(
        self, job_id: int, credits: float, usage: Usage | None, *, flag: str | None = None
    ) -> bool:
        """Replace a reservation with its cost, at most its estimate (usage above it is kept
        and flagged); False (no-op) if it is not reserved."""
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
        """Mark a reserved job failed at `credits` (0 releases it; capped and flagged as in
        `settle`); False if not reserved."""
        return await self._finish(job_id, JobStatus.FAILED, credits, usage, error_code, flag)

    async def mark_unsettled(self, job_id: int) -> bool:
        """Mark a reserved job whose cost is unknown `unsettled`; False if not reserved."""
        if not is_row_id(job_id):
            self._require()
            return False

        async def mark_on(conn: asyncpg.Connection) -> bool:
            return _updated(await conn.execute(_MARK_UNSETTLED, job_id)) > 0

        return await self._write(mark_on)

    # --- replicas: marks and named leases ---------------------------------------------

    async def mark_once(self, key: str, seconds: float) -> bool:
        """Mark `key` done for `seconds`; False when it is marked already (see Store)."""
        now = self._now()

        async def mark_on(conn: asyncpg.Connection) -> bool:
            found = await conn.fetchval(
                _MARK_ONCE, key, iso(now + timedelta(seconds=seconds)), iso(now)
            )
            return found is not None

        return await self._write(mark_on)

    async def is_marked(self, key: str) -> bool:
        """Say whether `key` is marked (and not expired)."""
        now_iso = self._now_iso()

        async def read(conn: asyncpg.Connection) -> bool:
            return bool(await conn.fetchval(
                "SELECT 1 FROM marks WHERE key = $1 AND until > $2", key, now_iso
            ))

        return await self._read(read)

    async def stage(self, group: str, key: str, payload: str) -> None:
        """Keep one part of `group` (see Store.stage)."""
        now_iso = self._now_iso()

        async def stage_on(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "INSERT INTO staged (grp, key, at, payload) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (grp, key) DO NOTHING",
                group, key, now_iso, payload,
            )

        await self._write(stage_on)

    async def staged(self, group: str) -> list[tuple[str, datetime, str]]:
        """Return the parts of `group`, oldest first."""

        async def read(conn: asyncpg.Connection) -> list[tuple[str, datetime, str]]:
            rows = await conn.fetch(
                "SELECT key, at, payload FROM staged WHERE grp = $1 ORDER BY at, key", group
            )
            return [(row[0], datetime.fromisoformat(row[1]), row[2]) for row in rows]

        return await self._read(read)

    async def unstage(self, group: str, key: str | None = None) -> None:
        """Forget the parts of `group` (or only the part `key`)."""

        async def unstage_on(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "DELETE FROM staged WHERE grp = $1 AND ($2::text IS NULL OR key = $2)",
                group, key,
            )

        await self._write(unstage_on)

    async def take_mark(self, key: str) -> bool:
        """Remove `key`'s mark if it is live; True for the one caller that removed it."""
        now_iso = self._now_iso()

        async def take_on(conn: asyncpg.Connection) -> bool:
            return _updated(await conn.execute(
                "DELETE FROM marks WHERE key = $1 AND until > $2", key, now_iso
            )) > 0

        return await self._write(take_on)

    async def prune_expired(self) -> int:
        """Forget expired marks, staged parts, page sessions and kept files; count them."""
        now_iso = self._now_iso()
        staged_before = iso(self._now() - timedelta(seconds=STAGED_KEEP))

        async def prune_on(conn: asyncpg.Connection) -> int:
            gone = _updated(await conn.execute("DELETE FROM marks WHERE until <= $1", now_iso))
            gone += _updated(await conn.execute("DELETE FROM staged WHERE at <= $1",
                                                staged_before))
            gone += _updated(await conn.execute(
                "DELETE FROM web_sessions WHERE expires_at <= $1", now_iso))
            gone += _updated(await conn.execute(
                "DELETE FROM web_files WHERE expires_at <= $1", now_iso))
            return gone

        return await self._write(prune_on)

    async def hold_lease(self, name: str, owner: str, seconds: float, info: str = "") -> bool:
        """Take or keep the named lease for `seconds`; False while another owner holds it."""
        now = self._now()

        async def hold_on(conn: asyncpg.Connection) -> bool:
            found = await conn.fetchval(
                _HOLD_LEASE, name, owner, iso(now + timedelta(seconds=seconds)), info, iso(now)
            )
            return found is not None

        return await self._write(hold_on)

    async def drop_lease(self, name: str, owner: str) -> None:
        """Give the named lease up, if `owner` holds it."""

        async def drop_on(conn: asyncpg.Connection) -> None:
            await conn.execute("DELETE FROM named_leases WHERE name = $1 AND owner = $2",
                               name, owner)

        await self._write(drop_on)

    async def leases(self, prefix: str = "") -> list[NamedLease]:
        """List the named leases whose name starts with `prefix`, live or expired."""

        async def read(conn: asyncpg.Connection) -> list[NamedLease]:
            rows = await conn.fetch(
                "SELECT * FROM named_leases WHERE left(name, $1) = $2 ORDER BY name",
                len(prefix), prefix,
            )
            return [lease_from_mapping(row) for row in rows]

        return await self._read(read)

    # --- durable jobs ---------------------------------------------------------------

    async def renew_leases(self, owner: str, job_ids: Sequence[int], seconds: float) -> set[int]:
        """Lease those open jobs to `owner` for `seconds` more; return the ids it holds."""
        return await self._set_leases(owner, job_ids, self._now() + timedelta(seconds=seconds))

    async def release_leases(self, owner: str, job_ids: Sequence[int]) -> int:
        """End `owner`'s leases on those open jobs now; return how many."""
        return len(await self._set_leases(owner, job_ids, self._now()))

    async def _set_leases(self, owner: str, job_ids: Sequence[int], until: datetime) -> set[int]:
        ids = sorted({int(i) for i in job_ids if is_row_id(i)})
        self._require()
        if not ids:
            return set()

        async def lease_on(conn: asyncpg.Connection) -> set[int]:
            rows = await conn.fetch(_SET_LEASES, owner, iso(until), ids)
            return {int(row[0]) for row in rows}

        return await self._write(lease_on)

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
        until = iso(now + timedelta(seconds=seconds))
        born_before = iso(now - timedelta(seconds=seconds))

        async def claim_on(conn: asyncpg.Connection) -> list[JobRecord]:
            rows = await conn.fetch(
                _CLAIM_EXPIRED, owner, until, iso(now), born_before, list(platforms),
                max(1, int(limit)), [int(i) for i in exclude],
            )
            return sorted((job_from_mapping(row) for row in rows), key=lambda job: job.id)

        return await self._write(claim_on)

    async def finish_delivery(
        self, job_id: int, owner: str, delivered: bool, result_refs: Sequence[str] = ()
    ) -> bool:
        """Move a drawn job to delivered / undelivered (see Store.finish_delivery)."""
        self._require()
        if not is_row_id(job_id):
            return False
        stage = JobStage.DELIVERED if delivered else JobStage.UNDELIVERED
        refs = json.dumps([str(ref) for ref in result_refs]) if result_refs else None

        async def finish_on(conn: asyncpg.Connection) -> bool:
            done = await conn.execute(
                _FINISH_DELIVERY, stage.value, self._now_iso(), job_id, owner, refs
            )
            return _updated(done) > 0

        return await self._write(finish_on)

    async def request_cancel(self, user_key: str) -> list[JobRecord]:
        """Ask for the user's queued and drawing jobs to be stopped (see Store)."""
        now_iso = self._now_iso()

        async def ask_on(conn: asyncpg.Connection) -> list[JobRecord]:
            rows = await conn.fetch(_REQUEST_CANCEL, user_key, now_iso)
            return sorted((job_from_mapping(row) for row in rows), key=lambda job: job.id)

        return await self._write(ask_on)

    async def cancel_requested(self, job_ids: Sequence[int]) -> set[int]:
        """Return those of the jobs, still queued or drawing, that /cancel asked to stop."""
        ids = sorted({int(i) for i in job_ids if is_row_id(i)})
        self._require()
        if not ids:
            return set()

        async def read(conn: asyncpg.Connection) -> set[int]:
            return {int(row[0]) for row in await conn.fetch(_CANCEL_REQUESTED, ids)}

        return await self._read(read)

    async def open_jobs(self) -> list[JobRecord]:
        """List the jobs still being worked on, oldest first."""

        async def read(conn: asyncpg.Connection) -> list[JobRecord]:
            return [job_from_mapping(row) for row in await conn.fetch(_SELECT_OPEN)]

        return await self._read(read)

    async def list_unsettled(self) -> list[JobRecord]:
        """List the jobs whose cost is unknown, oldest first, for admins."""

        async def read(conn: asyncpg.Connection) -> list[JobRecord]:
            return [job_from_mapping(row) for row in await conn.fetch(_SELECT_UNSETTLED)]

        return await self._read(read)

    async def refund(self, job_id: int, by: str) -> JobRecord:
        """Refund a succeeded, unsettled or charged failed job; return the refunded record."""
        now_iso = self._now_iso()
        if not is_row_id(job_id):
            self._require()
            raise JobNotFound(job_id=job_id, detail=f"refund of missing job {job_id}")

        async def refund_on(conn: asyncpg.Connection) -> JobRecord:
            row = await conn.fetchrow(_REFUND, job_id, by, now_iso)
            if row is not None:
                return job_from_mapping(row)
            status = await conn.fetchval(_SELECT_STATUS, job_id)
            if status is None:
                raise JobNotFound(job_id=job_id, detail=f"refund of missing job {job_id}")
            raise UserError(
                "refund.not_refundable",
                job_id=job_id,
                status=status,
                detail=f"job {job_id} is {status}",
            )

        return await self._write(refund_on)

    async def get_job(self, job_id: int) -> JobRecord | None:
        """Return one job, or None (also for ids no job can have)."""
        if not is_row_id(job_id):
            self._require()
            return None

        async def read(conn: asyncpg.Connection) -> JobRecord | None:
            row = await conn.fetchrow(_SELECT_JOB, job_id)
            return job_from_mapping(row) if row is not None else None

        return await self._read(read)

    async def job_by_source(self, source_ref: str) -> JobRecord | None:
        """Return the job `source_ref` made, or None."""

        async def read(conn: asyncpg.Connection) -> JobRecord | None:
            row = await conn.fetchrow(_SELECT_JOB_BY_SOURCE, source_ref)
            return job_from_mapping(row) if row is not None else None

        return await self._read(read)

    async def set_result_refs(self, job_id: int, refs: Sequence[str]) -> None:
        """Remember the platform file refs of a job's images (for "vary" buttons)."""
        refs_json = json.dumps([str(ref) for ref in refs])
        if not is_row_id(job_id):
            self._require()
            raise JobNotFound(job_id=job_id, detail=f"result refs for missing job {job_id}")

        async def write_on(conn: asyncpg.Connection) -> None:
            if _updated(await conn.execute(_SET_RESULT_REFS, refs_json, job_id)) == 0:
                raise JobNotFound(job_id=job_id, detail=f"result refs for missing job {job_id}")

        await self._write(write_on)

    # --- users and chats --------------------------------------------------------------

    async def get_user(self, user_key: str) -> UserRecord | None:
        """Return one user, or None."""

        async def read(conn: asyncpg.Connection) -> UserRecord | None:
            row = await conn.fetchrow(_SELECT_USER, user_key)
            return user_from_mapping(row) if row is not None else None

        return await self._read(read)

    async def get_chat(self, chat_key: str) -> ChatRecord | None:
        """Return one chat, or None."""

        async def read(conn: asyncpg.Connection) -> ChatRecord | None:
            row = await conn.fetchrow(_SELECT_CHAT, chat_key)
            return chat_from_mapping(row) if row is not None else None

        return await self._read(read)

    async def set_user_limits(
        self, user_key: str, daily: float | None, monthly: float | None
    ) -> None:
        """Override a user's daily and monthly limits (None = back to the default)."""
        check_credits("daily", daily, allow_none=True)
        check_credits("monthly", monthly, allow_none=True)
        platform, user_id = split_key(user_key)
        params = (
            user_key,
            platform,
            user_id,
            None if daily is None else float(daily),
            None if monthly is None else float(monthly),
            self._now_iso(),
        )

        async def write_on(conn: asyncpg.Connection) -> None:
            await conn.execute(_SET_USER_LIMITS, *params)

        await self._write(write_on)

    async def set_chat_limit(self, chat_key: str, daily: float | None) -> None:
        """Override a chat's daily limit (None = back to the default)."""
        check_credits("daily", daily, allow_none=True)
        platform, chat_id = split_key(chat_key)
        params = (
            chat_key,
            platform,
            chat_id,
            None if daily is None else float(daily),
            self._now_iso(),
        )

        async def write_on(conn: asyncpg.Connection) -> None:
            await conn.execute(_SET_CHAT_LIMIT, *params)

        await self._write(write_on)

    async def set_blocked(self, key: str, blocked: bool) -> None:
        """Block or unblock a user key or a chat key.

        A key already known as a user and/or a chat is updated where it is known. A key not
        seen yet is blocked as both, since a bare `platform:id` does not say which it is.
        """
        platform, ident = split_key(key)
        now = self._now_iso()
        flag = int(bool(blocked))

        async def write_on(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                changed = await conn.fetchval(_BLOCK_KNOWN, key, flag, now)
                if not changed and blocked:
                    await conn.execute(_BLOCK_NEW_USER, key, platform, ident, now)
                    await conn.execute(_BLOCK_NEW_CHAT, key, platform, ident, now)

        await self._write(write_on)

    async def is_blocked(self, user_key: str, chat_key: str | None) -> bool:
        """Say whether the user or the chat is blocked."""

        async def read(conn: asyncpg.Connection) -> bool:
            return bool(await conn.fetchval(_IS_BLOCKED, user_key, chat_key))

        return await self._read(read)

    async def set_language(self, user_key: str, lang: str | None) -> None:
        """Set the language a user chose (None = follow the platform again)."""
        platform, user_id = split_key(user_key)
        params = (user_key, platform, user_id, lang, self._now_iso())

        async def write_on(conn: asyncpg.Connection) -> None:
            await conn.execute(_SET_LANGUAGE, *params)

        await self._write(write_on)

    # --- reports ----------------------------------------------------------------------

    async def spend_report(self, user_key: str, *, last: int = 5) -> SpendReport:
        """Report a user's spend today, this month and all time against their limits."""
        now = self._now()
        since_day, since_month = iso(day_start(now)), iso(month_start(now))

        async def read(conn: asyncpg.Connection) -> tuple[dict[str, Any], list[JobRecord]]:
            # One snapshot for both statements, as one read transaction in SQLite.
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                sums = await conn.fetchrow(_SPEND_SUMS, user_key, since_day, since_month)
                # SQLite reads a negative LIMIT as no limit; PostgreSQL's no limit is NULL.
                rows = await conn.fetch(_SELECT_LAST_JOBS, user_key, last if last >= 0 else None)
            assert sums is not None
            return _plain(sums), [job_from_mapping(row) for row in rows]

        sums, jobs = await self._read(read)
        today, month, total = (
            float(sums[name]) if sums[name] is not None else 0.0
            for name in ("today", "month", "all_time")
        )
        daily = self._limits.user_daily
        monthly = self._limits.user_monthly
        name = ""
        if sums["known"]:
            name = sums["display_name"]
            daily = effective_limit(daily, sums["daily_limit"])
            monthly = effective_limit(monthly, sums["monthly_limit"])
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
            last_jobs=tuple(jobs),
        )

    async def top_spenders(
        self, since: datetime, limit: int = 10, *, until: datetime | None = None
    ) -> list[Spender]:
        """List the users who spent most since `since` (and before `until`, if given)."""
        since_iso = iso(since)
        until_iso = iso(until) if until is not None else None
        # SQLite reads a negative LIMIT as no limit; PostgreSQL's no limit is NULL.
        count = limit if limit >= 0 else None

        async def read(conn: asyncpg.Connection) -> list[Spender]:
            rows = await conn.fetch(_TOP_SPENDERS, since_iso, until_iso, count)
            return [
                Spender(r["user_key"], r["name"], float(r["credits"]), int(r["jobs"])) for r in rows
            ]

        return await self._read(read)

    async def chat_totals(
        self, since: datetime, *, until: datetime | None = None
    ) -> list[ChatTotal]:
        """List spend per chat since `since` (and before `until`), largest first."""
        since_iso = iso(since)
        until_iso = iso(until) if until is not None else None

        async def read(conn: asyncpg.Connection) -> list[ChatTotal]:
            rows = await conn.fetch(_CHAT_TOTALS, since_iso, until_iso)
            return [ChatTotal(r["chat_key"], float(r["credits"]), int(r["jobs"])) for r in rows]

        return await self._read(read)

    async def export_csv(self, since: datetime | None = None, user_key: str | None = None) -> str:
        """Return the jobs (since a time, of one user) as CSV: a header, then one row each."""
        since_iso = iso(since) if since is not None else None

        async def read(conn: asyncpg.Connection) -> list[JobRecord]:
            rows = await conn.fetch(_SELECT_EXPORT, since_iso, user_key)
            return [job_from_mapping(row) for row in rows]

        return jobs_csv(await self._read(read))

    async def flagged_jobs(self, since: datetime) -> list[JobRecord]:
        """List the jobs created since `since` whose charge is flagged, newest first (≤ 200)."""
        since_iso = iso(since)

        async def read(conn: asyncpg.Connection) -> list[JobRecord]:
            return [job_from_mapping(row) for row in await conn.fetch(_SELECT_FLAGGED, since_iso)]

        return await self._read(read)

    async def global_spent_today(self) -> float:
        """Return what the whole bot has spent (and reserved) today, UTC."""
        day = self._now_iso()[:10]

        async def read(conn: asyncpg.Connection) -> float:
            micro = await conn.fetchval(_GLOBAL_TODAY, day)
            return micro / MICRO if micro is not None else 0.0

        return await self._read(read)

    # --- prepaid credits -----------------------------------------------------------------

    async def balance(self, user_key: str) -> float:
        """Return a user's credit balance (open reservations already taken off)."""

        async def read(conn: asyncpg.Connection) -> float:
            micro = await conn.fetchval(_SELECT_BALANCE, user_key)
            return micro / MICRO if micro is not None else 0.0

        return await self._read(read)

    async def grant_credits(self, user_key: str, credits: float, by: str, note: str = "") -> float:
        """Add `credits` (> 0) to a user's balance; return the new balance."""
        check_grant(credits)
        split_key(user_key)
        now = self._now_iso()

        async def write_on(conn: asyncpg.Connection) -> float:
            await conn.execute(
                _INSERT_ENTRY, user_key, "grant", to_micro(credits), None, by, note, now
            )
            micro = await conn.fetchval(_SELECT_BALANCE, user_key)
            return micro / MICRO if micro is not None else 0.0

        return await self._write(write_on)

    async def revoke_credits(
        self, user_key: str, credits: float | None, by: str
    ) -> tuple[float, float]:
        """Take up to `credits` (None: all) off a balance, never below zero."""
        if credits is not None:
            check_grant(credits)
        split_key(user_key)
        asked = to_micro(credits) if credits is not None else None
        now = self._now_iso()

        async def write_on(conn: asyncpg.Connection) -> tuple[float, float]:
            async with conn.transaction():
                # The balance row locked: what is read is what is changed.
                micro = await conn.fetchval(_LOCK_BALANCE, user_key) or 0
                taken = max(0, min(micro, asked if asked is not None else micro))
                if taken:
                    await conn.execute(_INSERT_ENTRY, user_key, "revoke", -taken, None, by, "", now)
                return taken / MICRO, (micro - taken) / MICRO

        return await self._write(write_on)

    async def grant_welcome(self, user_key: str, credits: float) -> bool:
        """Give a user the welcome grant, once ever; False when they already had it."""
        check_grant(credits)
        split_key(user_key)
        now = self._now_iso()

        async def write_on(conn: asyncpg.Connection) -> bool:
            found = await conn.fetchval(
                _INSERT_ENTRY + " ON CONFLICT (user_key) WHERE kind = 'welcome' DO NOTHING"
                " RETURNING id",
                user_key, "welcome", to_micro(credits), None, "", "", now,
            )
            return found is not None

        return await self._write(write_on)

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

        async def write_on(conn: asyncpg.Connection) -> tuple[PurchaseRecord, bool]:
            async with conn.transaction():
                row = await conn.fetchrow(
                    "INSERT INTO purchases (user_key, provider, charge_id, provider_charge_id,"
                    " pack, amount, currency, credits, status, created_at)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'paid', $9)"
                    " ON CONFLICT (charge_id) DO NOTHING RETURNING *",
                    user_key, provider, charge_id, provider_charge_id, pack, int(amount),
                    currency, float(credits), now,
                )
                if row is None:
                    old = await conn.fetchrow(
                        "SELECT * FROM purchases WHERE charge_id = $1", charge_id
                    )
                    return purchase_from_mapping(old), False
                await conn.execute(
                    _INSERT_ENTRY, user_key, "purchase", to_micro(credits), row["id"], provider,
                    pack, now,
                )
                return purchase_from_mapping(row), True

        return await self._write(write_on)

    async def get_purchase(self, purchase_id: int) -> PurchaseRecord | None:
        """Return one purchase, or None."""
        if not is_row_id(purchase_id):
            self._require()
            return None

        async def read(conn: asyncpg.Connection) -> PurchaseRecord | None:
            row = await conn.fetchrow("SELECT * FROM purchases WHERE id = $1", purchase_id)
            return purchase_from_mapping(row) if row is not None else None

        return await self._read(read)

    async def list_purchases(
        self, user_key: str | None = None, limit: int = 20
    ) -> list[PurchaseRecord]:
        """List purchases (of one user), newest first."""

        async def read(conn: asyncpg.Connection) -> list[PurchaseRecord]:
            rows = await conn.fetch(
                "SELECT * FROM purchases WHERE ($1::text IS NULL OR user_key = $1)"
                " ORDER BY id DESC LIMIT $2",
                user_key, max(1, int(limit)),
            )
            return [purchase_from_mapping(row) for row in rows]

        return await self._read(read)

    async def refund_purchase(self, purchase_id: int, by: str) -> PurchaseRecord:
        """Mark a paid purchase refunded and take its unspent credits back."""
        now = self._now_iso()

        async def write_on(conn: asyncpg.Connection) -> PurchaseRecord | None:
            async with conn.transaction():
                found = await conn.fetchrow(
                    "SELECT * FROM purchases WHERE id = $1 AND status = 'paid' FOR UPDATE",
                    purchase_id,
                )
                if found is None:
                    return None
                micro = await conn.fetchval(_LOCK_BALANCE, found["user_key"]) or 0
                taken = max(0, min(to_micro(found["credits"]), micro))
                if taken:
                    await conn.execute(
                        _INSERT_ENTRY, found["user_key"], "purchase_refund", -taken,
                        purchase_id, by, "", now,
                    )
                row = await conn.fetchrow(
                    "UPDATE purchases SET status = 'refunded', refunded_at = $1,"
                    " refunded_by = $2, refunded_credits = $3 WHERE id = $4 RETURNING *",
                    now, by, taken / MICRO, purchase_id,
                )
                return purchase_from_mapping(row)

        refunded = await self._write(write_on) if is_row_id(purchase_id) else None
        if refunded is not None:
            return refunded
        raise purchase_refusal(await self.get_purchase(purchase_id), purchase_id)
    # --- the dashboard's aggregations ----------------------------------------------------

    async def daily_usage(
        self, since: datetime, *, until: datetime | None = None
    ) -> list[DailyUsage]:
        """Sum charges, jobs and reported tokens per UTC day and model, oldest day first."""
        period = _period(since, until)

        async def read(conn: asyncpg.Connection) -> list[DailyUsage]:
            return [
                DailyUsage(r["day"], r["model"], float(r["credits"]), int(r["jobs"]),
                           int(r["text_in"]), int(r["image_in"]), int(r["image_out"]))
                for r in await conn.fetch(_DAILY_USAGE, *period)
            ]

        return await self._read(read)

    async def outcome_counts(
        self, since: datetime, *, until: datetime | None = None
    ) -> list[OutcomeCount]:
        """Count the jobs created in [since, until) per stage, status and error code."""
        period = _period(since, until)

        async def read(conn: asyncpg.Connection) -> list[OutcomeCount]:
            return [
                OutcomeCount(r["stage"], r["status"], r["code"], int(r["jobs"]),
                             float(r["credits"]))
                for r in await conn.fetch(_OUTCOMES, *period)
            ]

        return await self._read(read)

    async def draw_time_quantiles(
        self,
        since: datetime,
        quantiles: Sequence[float],
        *,
        until: datetime | None = None,
    ) -> list[float | None]:
        """Return the draw times at those quantiles (nearest rank); None each when none."""
        period = _period(since, until)

        async def read(conn: asyncpg.Connection) -> list[float | None]:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                count = await conn.fetchval(_DRAWN_COUNT, *period)
                if not count:
                    return [None for _ in quantiles]
                found: list[float | None] = []
                for quantile in quantiles:
                    offset = nearest_rank(quantile, count) - 1
                    found.append(float(await conn.fetchval(_DRAW_TIME_AT, *period, offset)))
                return found

        return await self._read(read)

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
        period = _period(since, until)

        async def read(conn: asyncpg.Connection) -> list[JobRecord]:
            rows = await conn.fetch(_LIST_JOBS, *period, user_key, chat_key, limit)
            return [job_from_mapping(row) for row in rows]

        return await self._read(read)

    async def list_undelivered(self, limit: int = 200) -> list[JobRecord]:
        """List the undelivered jobs not refunded yet, oldest first."""

        async def read(conn: asyncpg.Connection) -> list[JobRecord]:
            return [job_from_mapping(row) for row in await conn.fetch(_SELECT_UNDELIVERED, limit)]

        return await self._read(read)

    async def users_with_overrides(self) -> list[UserRecord]:
        """List the users with a limit of their own or blocked, by user key."""

        async def read(conn: asyncpg.Connection) -> list[UserRecord]:
            return [user_from_mapping(row) for row in await conn.fetch(_USERS_WITH_OVERRIDES)]

        return await self._read(read)

    async def chats_with_overrides(self) -> list[ChatRecord]:
        """List the chats with a limit of their own or blocked, by chat key."""

        async def read(conn: asyncpg.Connection) -> list[ChatRecord]:
            return [chat_from_mapping(row) for row in await conn.fetch(_CHATS_WITH_OVERRIDES)]

        return await self._read(read)

    async def purchase_totals(
        self, since: datetime, *, until: datetime | None = None
    ) -> PurchaseTotals:
        """Sum the purchases recorded in [since, until) (refunded ones counted apart too)."""
        period = _period(since, until)

        async def read(conn: asyncpg.Connection) -> PurchaseTotals:
            r = await conn.fetchrow(_PURCHASE_TOTALS, *period)
            return PurchaseTotals(int(r["purchases"]), int(r["stars"]), float(r["credits"]),
                                  int(r["refunds"]), int(r["refunded_stars"]),
                                  float(r["refunded_credits"]))

        return await self._read(read)

    async def prepaid_spend(
        self, since: datetime, *, until: datetime | None = None
    ) -> PrepaidSpend:
        """Sum what the prepaid jobs created in [since, until) spent and hold."""
        period = _period(since, until)

        async def read(conn: asyncpg.Connection) -> PrepaidSpend:
            r = await conn.fetchrow(_PREPAID_SPEND, *period)
            return PrepaidSpend(int(r["jobs"]), float(r["credits"]), float(r["upstream"]),
                                float(r["held"]))

        return await self._read(read)

    # --- copies -----------------------------------------------------------------------

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[SnapshotReader]:
        """Open one consistent read snapshot of the whole store (writers go on meanwhile)."""
        self._enter()
        try:
            conn = await self._acquire()
            try:
                transaction = conn.transaction(isolation="repeatable_read", readonly=True)
                try:
                    await transaction.start()
                except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as err:
                    raise StoreError(_failure("opening a snapshot", err)) from err
                try:
                    yield _Snapshot(conn)
                finally:
                    # A connection still in the transaction (rollback failed) is not reused.
                    with suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                        await transaction.rollback()
            finally:
                self._pool.release(conn)
        finally:
            self._leave()

    # --- personal API keys (new methods only; see core/store/keys.py) ----------------------

    async def create_api_key(self, user_key: str, name: str = "") -> tuple[int, str]:
        """Make a key for a user; return its id and its plaintext (shown once, never kept)."""
        split_key(user_key)
        plaintext = new_key()
        params = (key_hash(plaintext), user_key, name, self._now_iso())

        async def write_on(conn: asyncpg.Connection) -> int:
            return int(await conn.fetchval(
                "INSERT INTO api_keys (key_hash, user_key, name, created_at)"
                " VALUES ($1, $2, $3, $4) RETURNING id",
                *params,
            ))

        return await self._write(write_on), plaintext

    async def api_key_user(self, plaintext: str) -> str | None:
        """Return the user_key of an active key, or None; touch last_used_at now and then."""
        if not looks_like_key(plaintext):
            return None
        digest = key_hash(plaintext)

        async def read(conn: asyncpg.Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(
                "SELECT id, user_key FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
                digest,
            )

        row = await self._read(read)
        if row is None:
            return None
        if throttle_of(self).due(int(row["id"])):
            now = self._now_iso()

            async def touch(conn: asyncpg.Connection) -> None:
                await conn.execute(
                    "UPDATE api_keys SET last_used_at = $1 WHERE id = $2", now, row["id"]
                )

            await self._write(touch)
        return str(row["user_key"])

    async def list_api_keys(self, user_key: str | None = None) -> list[ApiKeyRecord]:
        """List the keys (of one user), oldest first, revoked ones included."""

        async def read(conn: asyncpg.Connection) -> list[ApiKeyRecord]:
            rows = await conn.fetch(
                "SELECT * FROM api_keys WHERE ($1::text IS NULL OR user_key = $1) ORDER BY id",
                user_key,
            )
            return [api_key_from_mapping(row) for row in rows]

        return await self._read(read)

    async def revoke_api_key(self, key_id: int) -> bool:
        """Revoke a key; False when there is no such active key."""
        if not is_row_id(key_id):
            return False
        now = self._now_iso()

        async def write_on(conn: asyncpg.Connection) -> bool:
            found = await conn.fetchval(
                "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL"
                " RETURNING id",
                now,
                key_id,
            )
            return found is not None

        return await self._write(write_on)

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

        async def write_on(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                await conn.execute(_OPEN_SESSION, *row)
                await conn.execute(_TRIM_SESSIONS, user_key, iso(now), SESSIONS_PER_USER)

        await self._write(write_on)
        return token

    async def get_session(self, token: str) -> WebSession | None:
        """Return the session of a token while it lives (see Store.get_session)."""
        if not token:
            self._require()
            return None
        params = (token_hash(token), self._now_iso())

        async def read(conn: asyncpg.Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(_SELECT_SESSION, *params)

        row = await self._read(read)
        if row is None:
            return None
        if row["key_id"] is not None and throttle_of(self).due(int(row["key_id"])):
            now = self._now_iso()

            async def touch(conn: asyncpg.Connection) -> None:
                await conn.execute(
                    "UPDATE api_keys SET last_used_at = $1 WHERE id = $2", now, row["key_id"]
                )

            await self._write(touch)
        return session_from_mapping(row)

    async def close_session(self, token: str) -> None:
        """End a session (sign out); an unknown token is ignored."""
        digest = token_hash(token)

        async def write_on(conn: asyncpg.Connection) -> None:
            await conn.execute("DELETE FROM web_sessions WHERE token_hash = $1", digest)

        await self._write(write_on)

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

        async def write_on(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                # One keeper at a time across processes, so the cap holds exactly.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _WEB_FILES_LOCK_KEY)
                await conn.execute("DELETE FROM web_files WHERE expires_at <= $1", now_iso)
                await conn.execute(_FILES_OVER_CAP, incoming, cap_bytes)
                await conn.executemany(_KEEP_FILE, rows)

        await self._write(write_on)

    async def kept_file(self, name: str) -> KeptFileData | None:
        """Return a kept image's bytes, or None (unknown or expired)."""
        now_iso = self._now_iso()

        async def read(conn: asyncpg.Connection) -> KeptFileData | None:
            row = await conn.fetchrow(
                "SELECT data, mime, expires_at FROM web_files WHERE name = $1"
                " AND expires_at > $2",
                name, now_iso,
            )
            if row is None:
                return None
            return KeptFileData(bytes(row[0]), row[1], datetime.fromisoformat(row[2]))

        return await self._read(read)

    async def job_files(
        self, job_ids: Sequence[int], user_key: str
    ) -> dict[int, list[KeptFileInfo]]:
        """Return the images still kept of those jobs that are `user_key`'s, in order."""
        ids = [int(i) for i in job_ids if is_row_id(i)]
        now_iso = self._now_iso()

        async def read(conn: asyncpg.Connection) -> dict[int, list[KeptFileInfo]]:
            found: dict[int, list[KeptFileInfo]] = {}
            for row in await conn.fetch(_JOB_FILES, ids, user_key, now_iso):
                found.setdefault(int(row[0]), []).append(
                    KeptFileInfo(row[1], row[2], int(row[3]), int(row[4]))
                )
            return found

        return await self._read(read)

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

        async def write_on(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                for sql in _DROP_RESULT:
                    await conn.execute(sql, job_id)
                await conn.execute(_KEEP_RESULT, job_id, revised_prompt, float(elapsed), stamp)
                await conn.executemany(_KEEP_RESULT_IMAGE, rows)

        await self._write(write_on)

    async def kept_result(self, job_id: int) -> KeptResult | None:
        """Return a job's kept result, its images in order; None when none is kept."""
        if not is_row_id(job_id):
            return None

        async def read(conn: asyncpg.Connection) -> KeptResult | None:
            return kept_result_from_rows(job_id, await conn.fetch(_KEPT_RESULT, job_id))

        return await self._read(read)

    async def drop_result(self, job_id: int) -> None:
        """Forget a job's kept result, if any."""
        if not is_row_id(job_id):
            return

        async def drop_on(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                for sql in _DROP_RESULT:
                    await conn.execute(sql, job_id)

        await self._write(drop_on)

    async def kept_results(self) -> list[tuple[int, datetime]]:
        """List the kept results as (job id, when saved), by job id."""

        async def read(conn: asyncpg.Connection) -> list[tuple[int, datetime]]:
            rows = await conn.fetch("SELECT job_id, saved_at FROM kept_results ORDER BY job_id")
            return [(int(row[0]), datetime.fromisoformat(row[1])) for row in rows]

        return await self._read(read)

    # --- the @username directory ---------------------------------------------------------

    async def note_username(self, platform: str, username: str, user_key: str) -> None:
        """Record that `@username` on `platform` is now the user `user_key`."""
        split_key(user_key)
        params = (username_key(platform, username), user_key, self._now_iso())

        async def write_on(conn: asyncpg.Connection) -> None:
            await conn.execute(_NOTE_USERNAME, *params)

        await self._write(write_on)

    async def find_username(self, platform: str, username: str) -> str | None:
        """Return the user key `@username` on `platform` was last seen as."""
        name_key = username_key(platform, username)

        async def read(conn: asyncpg.Connection) -> str | None:
            found = await conn.fetchval(
                "SELECT user_key FROM usernames WHERE name_key = $1", name_key
            )
            return str(found) if found is not None else None

        return await self._read(read)

    async def is_empty(self) -> bool:
        """Say whether the store holds none of the copied tables' rows (a copy's target must)."""

        async def read(conn: asyncpg.Connection) -> bool:
            return bool(await conn.fetchval(_IS_EMPTY))

        return await self._read(read)

    async def load_rows(self, table: str, rows: Sequence[dict[str, Any]]) -> None:
        """Insert raw rows read by a SnapshotReader, keeping ids; totals follow by themselves."""
        if table not in _COPY_COLUMNS:
            raise ValueError(f"not a table a copy moves: {table!r}")
        columns = _COPY_COLUMNS[table]
        if not rows:
            self._require()
            return
        missing = [name for name, _ in columns if name not in rows[0] and name not in _LATE_COLUMNS]
        if missing:
            raise ValueError(f"{table} rows without {', '.join(missing)}")
        # Generated columns (charged, charged_micro), if a row carries them, are not copied:
        # the target computes them, and its triggers the running totals.
        if table == "jobs":
            # Jobs from a store older than migration 8 were never prepaid.
            rows = [{**_with_stage(row), "prepaid": row.get("prepaid") or 0} for row in rows]
        values = [tuple(_coerce(kind, row.get(name)) for name, kind in columns) for row in rows]

        async def write_on(conn: asyncpg.Connection) -> None:
            async with conn.transaction():
                if table == "users":
                    await conn.executemany(_LOAD_USERS, values)
                elif table == "api_keys":
                    await conn.executemany(_LOAD_API_KEYS, values)
                    await conn.execute(_MOVE_API_KEY_IDS)
                elif table == "chats":
                    await conn.executemany(_LOAD_CHATS, values)
                elif table == "purchases":
                    await conn.executemany(_LOAD_PURCHASES, values)
                    await conn.execute(_MOVE_PURCHASE_IDS)
                elif table == "credit_entries":
                    await conn.executemany(_LOAD_CREDIT_ENTRIES, values)
                    await conn.execute(_MOVE_ENTRY_IDS)
                elif table == "usernames":
                    await conn.executemany(_LOAD_USERNAMES, values)
                else:
                    await conn.executemany(_LOAD_JOBS, values)
                    await conn.execute(_MOVE_JOB_IDS)

        await self._write(write_on)


def _period(since: datetime, until: datetime | None) -> tuple[str, str | None]:
    return iso(since), iso(until) if until is not None else None
