"""The ledger's store: one interface (`Store`), two backends (SQLite, PostgreSQL).

`open_store(url, limits)` opens the backend DATABASE_URL names, applies its migrations and
returns a `Store`. Module map:

- `records`   the values every caller sees (jobs, users, chats, reports, limits)
- `interface` the `Store` contract and its errors
- `url`       DATABASE_URL parsing and password redaction
- `export`    CSV export
- `sqlite`, `sqlite_schema`       the embedded default, on aiosqlite
- `postgres`, `postgres_schema`   PostgreSQL, on asyncpg
- `keys`      personal API keys: their shape and hashing
- `web`       the web door's sessions, sign-in codes and kept files: hashing and records
- `copy`      moving a whole ledger between stores (`imgbot db copy`)
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from core.store.interface import STORE_FAILURES, SnapshotReader, Store, StoreError
from core.store.keys import ApiKeyRecord
from core.store.records import (
    ChatRecord,
    ChatTotal,
    DailyUsage,
    JobRecord,
    JobSpec,
    JobStage,
    JobStatus,
    Limits,
    NamedLease,
    OutcomeCount,
    PrepaidSpend,
    PurchaseRecord,
    PurchaseStatus,
    PurchaseTotals,
    Spender,
    SpendReport,
    UserRecord,
)
from core.store.url import StoreURL, parse_database_url

__all__ = [
    "ApiKeyRecord",
    "ChatRecord",
    "ChatTotal",
    "DailyUsage",
    "JobRecord",
    "JobSpec",
    "JobStage",
    "JobStatus",
    "Limits",
    "NamedLease",
    "PrepaidSpend",
    "PurchaseRecord",
    "PurchaseStatus",
    "PurchaseTotals",
    "OutcomeCount",
    "SnapshotReader",
    "SpendReport",
    "Spender",
    "Store",
    "STORE_FAILURES",
    "StoreError",
    "StoreURL",
    "UserRecord",
    "open_store",
    "parse_database_url",
]


async def open_store(
    url: str | StoreURL,
    limits: Limits,
    *,
    clock: Callable[[], datetime] | None = None,
    pool_size: int = 10,
) -> Store:
    """Open (creating and migrating when needed) the store DATABASE_URL names."""
    where = parse_database_url(url) if isinstance(url, str) else url
    if where.kind == "sqlite":
        from core.store.sqlite import SqliteStore

        return await SqliteStore.open(where.path, limits, clock=clock)
    from core.store.postgres import PostgresStore

    return await PostgresStore.open(where.dsn, limits, clock=clock, pool_size=pool_size)
