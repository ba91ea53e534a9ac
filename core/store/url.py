"""`DATABASE_URL`: which backend, and where, without ever echoing a password."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from core.store.interface import StoreError

SQLITE_PREFIX = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True)
class StoreURL:
    """A parsed DATABASE_URL: `path` for SQLite, `dsn` (secret) for PostgreSQL."""

    kind: Literal["sqlite", "postgresql"]
    path: str = ""
    dsn: str = ""

    def __repr__(self) -> str:
        return f"StoreURL({self.redacted()!r})"

    def redacted(self) -> str:
        """Return the URL with any password replaced by ***."""
        if self.kind == "sqlite":
            return SQLITE_PREFIX + self.path
        return redact_dsn(self.dsn)


def redact_dsn(dsn: str) -> str:
    """Return a PostgreSQL URL with its password (if any) replaced by ***."""
    try:
        parts = urlsplit(dsn)
        if parts.password is None:
            return dsn.split("?", 1)[0]
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        netloc = f"{parts.username or ''}:***@{host}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "postgresql://…"


def parse_database_url(url: str) -> StoreURL:
    """Read DATABASE_URL; a malformed one raises StoreError naming the setting."""
    url = url.strip()
    if url.startswith(SQLITE_PREFIX):
        path = url[len(SQLITE_PREFIX) :]
        if not path:
            raise StoreError("DATABASE_URL: expected sqlite:///path/to/file.db (no path given)")
        return StoreURL("sqlite", path=path)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in POSTGRES_SCHEMES:
        try:
            parts = urlsplit(url)
            _ = parts.port  # raises ValueError on a bad port
        except ValueError as err:
            raise StoreError(f"DATABASE_URL: not a valid PostgreSQL URL ({err})") from None
        if not parts.hostname and "host=" not in parts.query:
            raise StoreError("DATABASE_URL: expected postgresql://user:password@host:5432/database")
        # asyncpg takes both schemes; keep the operator's spelling.
        return StoreURL("postgresql", dsn=url)
    raise StoreError(
        "DATABASE_URL: expected sqlite:///path/to/file.db or "
        "postgresql://user:password@host:5432/database"
    )
