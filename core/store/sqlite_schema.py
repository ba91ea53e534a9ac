"""The SQLite schema: numbered migrations, applied at open and recorded in `schema_version`.

A database made by an older release is upgraded in place; one made by a newer release is
refused. Migration 3 adds `jobs.charged` (the one definition of what a job counts against a
limit) and `spend_totals`, the running totals per limit scope and period in whole
micro-credits, kept by triggers in the very statement that changes a job.
"""

from __future__ import annotations

from dataclasses import dataclass


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

# Migration 7 gives the jobs of an older release their stage (PostgreSQL's runs the same).
STAGE_BACKFILL = (
    "UPDATE jobs SET stage = CASE"
    " WHEN status = 'reserved' AND started_at IS NOT NULL THEN 'drawing'"
    " WHEN status = 'reserved' THEN 'queued'"
    " WHEN status IN ('succeeded', 'refunded') THEN 'delivered'"
    " WHEN status = 'failed' AND error_code LIKE '%cancel%' THEN 'cancelled'"
    " ELSE 'failed' END,"
    " attempts = CASE WHEN started_at IS NOT NULL THEN 1 ELSE 0 END"
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
            "CREATE UNIQUE INDEX jobs_source_ref ON jobs (source_ref) WHERE source_ref IS NOT NULL",
        ),
    ),
    Migration(
        5,
        "jobs.reported_credits and jobs.usage_flag: charges capped at the reservation",
        (
            # A job is never charged above its reservation; what the usage said beyond it
            # is kept here, and why a charge is not the usage's is flagged.
            "ALTER TABLE jobs ADD COLUMN reported_credits REAL",
            "ALTER TABLE jobs ADD COLUMN usage_flag TEXT",
            "CREATE INDEX jobs_flagged ON jobs (created_at) WHERE usage_flag IS NOT NULL",
        ),
    ),
    Migration(
        6,
        "api_keys: personal keys for the web API, kept as hashes",
        (
            # Only the key's SHA-256 is kept (see core/store/keys.py). No reference to
            # users: a key may be made for someone who has not drawn yet (web:alice).
            """CREATE TABLE api_keys (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                key_hash TEXT NOT NULL UNIQUE,
                user_key TEXT NOT NULL,
                name TEXT NOT NULL DEFAULT '',
                created_at TEXT NOT NULL,
                revoked_at TEXT,
                last_used_at TEXT
            )""",
            "CREATE INDEX api_keys_user ON api_keys (user_key, id)",
        ),
    ),
    Migration(
        7,
        "durable jobs: jobs.stage, attempts, lost_credits, lease_owner/lease_until, delivered_at",
        (
            "ALTER TABLE jobs ADD COLUMN stage TEXT NOT NULL DEFAULT 'queued'",
            "ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE jobs ADD COLUMN lost_credits REAL NOT NULL DEFAULT 0",
            "ALTER TABLE jobs ADD COLUMN lease_owner TEXT",
            "ALTER TABLE jobs ADD COLUMN lease_until TEXT",
            "ALTER TABLE jobs ADD COLUMN delivered_at TEXT",
            # Jobs of an older release: the finished ones were delivered (or not) long ago;
            # open reservations have no lease, so a live worker takes them over.
            STAGE_BACKFILL,
            "CREATE INDEX jobs_open ON jobs (id) WHERE stage IN ('queued', 'drawing', 'drawn')",
            # The stage follows the money in the same statement: a start makes it drawing
            # (one more attempt), a settle drawn, a failure failed or cancelled.
            """CREATE TRIGGER jobs_stage_started AFTER UPDATE OF started_at ON jobs
               WHEN NEW.started_at IS NOT OLD.started_at AND NEW.started_at IS NOT NULL
                    AND NEW.status = 'reserved'
               BEGIN
                   UPDATE jobs SET stage = 'drawing', attempts = attempts + 1 WHERE id = NEW.id;
               END""",
            """CREATE TRIGGER jobs_stage_finished AFTER UPDATE OF status ON jobs
               WHEN OLD.status = 'reserved' AND NEW.status <> 'reserved'
               BEGIN
                   UPDATE jobs SET stage = CASE NEW.status WHEN 'succeeded' THEN 'drawn'
                       WHEN 'failed' THEN CASE WHEN NEW.error_code LIKE '%cancel%'
                                          THEN 'cancelled' ELSE 'failed' END
                       ELSE 'failed' END
                   WHERE id = NEW.id;
               END""",
        ),
    ),
    Migration(
        9,
        "replicas: marks (things done once) and named leases (roles one process holds)",
        (
            # A mark says "done" until it expires: a Telegram update handled, a button
            # press counted, an album claimed. Checked and set in one statement.
            """CREATE TABLE marks (
                key TEXT PRIMARY KEY,
                until TEXT NOT NULL
            )""",
            "CREATE INDEX marks_until ON marks (until)",
            # A role one live process holds at a time (the Telegram poller, a Discord
            # shard) or a process's own heartbeat (replica:<owner>), with what it does.
            """CREATE TABLE named_leases (
                name TEXT PRIMARY KEY,
                owner TEXT NOT NULL,
                until TEXT NOT NULL,
                info TEXT NOT NULL DEFAULT ''
            )""",
            "CREATE INDEX jobs_user_open ON jobs (user_key) WHERE stage IN ('queued', 'drawing')",
            # Parts of one thing that arrive at different processes (a Telegram album's
            # items behind a load balancer), gathered here until one process takes them.
            """CREATE TABLE staged (
                grp TEXT NOT NULL,
                key TEXT NOT NULL,
                at TEXT NOT NULL,
                payload TEXT NOT NULL,
                PRIMARY KEY (grp, key)
            )""",
        ),
    ),
)

# Migration 8: prepaid credits (BILLING=prepaid). A balance is the user's credit entries
# minus what their prepaid jobs count; `balances` keeps it as a running total, by triggers in
# the statement that writes an entry or changes a prepaid job (as spend_totals), so a copy
# rebuilds it and no code path can forget it. Not copied.
CREDIT_KINDS = ("grant", "revoke", "welcome", "purchase", "purchase_refund")

MIGRATIONS = (
    *MIGRATIONS,
    Migration(
        8,
        "prepaid credits: jobs.prepaid, credit_entries, purchases, balances",
        (
            "ALTER TABLE jobs ADD COLUMN prepaid INTEGER NOT NULL DEFAULT 0",
            # Telegram's telegram_payment_charge_id is unique: a payment credits once.
            """CREATE TABLE purchases (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                user_key TEXT NOT NULL,
                provider TEXT NOT NULL,
                charge_id TEXT NOT NULL UNIQUE,
                provider_charge_id TEXT NOT NULL DEFAULT '',
                pack TEXT NOT NULL DEFAULT '',
                amount INTEGER NOT NULL,
                currency TEXT NOT NULL,
                credits REAL NOT NULL,
                status TEXT NOT NULL CHECK (status IN ('paid', 'refunded')),
                created_at TEXT NOT NULL,
                refunded_at TEXT,
                refunded_by TEXT,
                refunded_credits REAL
            )""",
            "CREATE INDEX purchases_user ON purchases (user_key, id)",
            f"""CREATE TABLE credit_entries (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                user_key TEXT NOT NULL,
                kind TEXT NOT NULL CHECK (kind IN {CREDIT_KINDS!r}),
                micro_credits INTEGER NOT NULL,
                purchase_id INTEGER REFERENCES purchases(id),
                granted_by TEXT NOT NULL DEFAULT '',
                note TEXT NOT NULL DEFAULT '',
                created_at TEXT NOT NULL
            )""",
            "CREATE INDEX credit_entries_user ON credit_entries (user_key, id)",
            # The welcome grant, once per user ever.
            "CREATE UNIQUE INDEX credit_entries_welcome ON credit_entries (user_key)"
            " WHERE kind = 'welcome'",
            """CREATE TABLE balances (
                user_key TEXT PRIMARY KEY,
                micro_credits INTEGER NOT NULL
            ) WITHOUT ROWID""",
            """CREATE TRIGGER credit_entries_balance AFTER INSERT ON credit_entries
               BEGIN
                   INSERT INTO balances (user_key, micro_credits)
                   VALUES (NEW.user_key, NEW.micro_credits)
                   ON CONFLICT DO UPDATE SET micro_credits = micro_credits + excluded.micro_credits;
               END""",
            """CREATE TRIGGER jobs_balance_insert AFTER INSERT ON jobs WHEN NEW.prepaid
               BEGIN
                   INSERT INTO balances (user_key, micro_credits)
                   VALUES (NEW.user_key, -NEW.charged_micro)
                   ON CONFLICT DO UPDATE SET micro_credits = micro_credits + excluded.micro_credits;
               END""",
            """CREATE TRIGGER jobs_balance_update
               AFTER UPDATE OF status, estimated_credits, actual_credits ON jobs
               WHEN NEW.prepaid AND NEW.charged_micro IS NOT OLD.charged_micro
               BEGIN
                   UPDATE balances
                   SET micro_credits = micro_credits - NEW.charged_micro + OLD.charged_micro
                   WHERE user_key = NEW.user_key;
               END""",
            """CREATE TRIGGER jobs_balance_delete AFTER DELETE ON jobs WHEN OLD.prepaid
               BEGIN
                   UPDATE balances SET micro_credits = micro_credits + OLD.charged_micro
                   WHERE user_key = OLD.user_key;
               END""",
            "CREATE TRIGGER jobs_prepaid_fixed BEFORE UPDATE OF prepaid ON jobs"
            " WHEN NEW.prepaid IS NOT OLD.prepaid"
            " BEGIN SELECT RAISE(ABORT, 'how a job is paid never changes'); END",
        ),
    ),
)

# Migration 10: what replicas must share for the web door and the admins' @usernames, kept in
# the ledger rather than in one process's memory (core/store/web.py). Neither table of the
# web door is copied by `imgbot db copy` nor kept in backups; `usernames` is.
WEB_STATE = Migration(
    10,
    "web door sessions and kept files, the @username directory",
    (
        # A session is found by its token's SHA-256; a key session keeps its key's hash.
        # `id` orders a user's sessions (the oldest end first past the per-user cap).
        """CREATE TABLE web_sessions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            token_hash TEXT NOT NULL UNIQUE,
            user_key TEXT NOT NULL,
            how TEXT NOT NULL CHECK (how IN ('key', 'telegram', 'link')),
            display_name TEXT NOT NULL DEFAULT '',
            language TEXT,
            key_hash TEXT,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL
        )""",
        "CREATE INDEX web_sessions_user ON web_sessions (user_key, id)",
        "CREATE INDEX web_sessions_expires ON web_sessions (expires_at)",
        # Result images served at /v1/files/<name>; `id` orders them oldest first for the
        # size cap. The bytes come last in the row: reading the other columns (the cap's
        # running sum, the history's list) never reads them.
        """CREATE TABLE web_files (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL UNIQUE,
            job_id INTEGER NOT NULL,
            n INTEGER NOT NULL,
            user_key TEXT NOT NULL,
            mime TEXT NOT NULL,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            size INTEGER NOT NULL,
            kept_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            data BLOB NOT NULL
        )""",
        "CREATE INDEX web_files_job ON web_files (job_id, n)",
        "CREATE INDEX web_files_expires ON web_files (expires_at)",
        # `platform:name` (lowercased) → the user who last wrote with that name.
        """CREATE TABLE usernames (
            name_key TEXT PRIMARY KEY,
            user_key TEXT NOT NULL,
            seen_at TEXT NOT NULL
        ) WITHOUT ROWID""",
    ),
)
MIGRATIONS = (*MIGRATIONS, WEB_STATE)

# Migration 11: kept results in the ledger (KEEP_RESULTS=ledger, the default on PostgreSQL;
# core/results.py), so a job a dead process drew is delivered by any other on the same
# database, with no folder shared between machines. A result is one row, its images one row
# each, written in one transaction; nothing evicts them but the retention clean-up.
KEPT_RESULTS = Migration(
    11,
    "kept results in the ledger",
    (
        """CREATE TABLE kept_results (
            job_id INTEGER PRIMARY KEY REFERENCES jobs(id),
            revised_prompt TEXT,
            elapsed REAL NOT NULL,
            saved_at TEXT NOT NULL
        )""",
        # A rowid table (not WITHOUT ROWID): its rows are megabytes of image each.
        """CREATE TABLE kept_result_images (
            job_id INTEGER NOT NULL REFERENCES kept_results(job_id),
            n INTEGER NOT NULL,
            mime TEXT NOT NULL,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (job_id, n)
        )""",
    ),
)
MIGRATIONS = (*MIGRATIONS, KEPT_RESULTS)

# Migration 12: /cancel across replicas. The process that receives /cancel stops the jobs it
# holds at once and marks the user's other open jobs here; whoever holds them (or takes them
# over) sees the mark and stops them as a /cancel of its own would.
CANCEL_REQUESTS = Migration(
    12,
    "jobs.cancel_requested_at: /cancel asks whoever holds a job to stop it",
    ("ALTER TABLE jobs ADD COLUMN cancel_requested_at TEXT",),
)
MIGRATIONS = (*MIGRATIONS, CANCEL_REQUESTS)

# Migrations are written where their code is; they run in version order.
MIGRATIONS = tuple(sorted(MIGRATIONS, key=lambda migration: migration.version))
LATEST_VERSION = MIGRATIONS[-1].version
