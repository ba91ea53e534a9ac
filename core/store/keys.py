"""Personal API keys: what a key looks like, how it is stored, and the record callers see.

A key is `ik-` + 43 url-safe characters (32 random bytes from `secrets`), shown once when
it is made. The store keeps only `key_hash`, the SHA-256 of the whole key in hex. A fast
hash is right here, unlike for passwords: a slow, salted hash (bcrypt, argon2) protects
low-entropy secrets against guessing, but a key carries 256 random bits, so nobody can
guess one from its hash however fast the hash is; and an unsalted hash can be looked up
by an index (one read per request), where a salted one would mean trying every row.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

KEY_PREFIX = "ik-"
_KEY_SHAPE = re.compile(r"ik-[A-Za-z0-9_-]{43}")
# `last_used_at` is written at most this often per key and process: a write per request
# would put every API call through the ledger's write lock for a date nobody needs to the
# second (it is for "is this key still used?").
TOUCH_EVERY_S = 60.0


@dataclass(frozen=True)
class ApiKeyRecord:
    """One personal key as listed; never its plaintext, which exists only when made."""

    id: int
    user_key: str
    name: str
    created_at: datetime
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None

    @property
    def active(self) -> bool:
        """Say whether the key still opens the API."""
        return self.revoked_at is None


class TouchThrottle:
    """Says when a key's `last_used_at` is due to be written again (in this process)."""

    _CAP = 10_000

    def __init__(self) -> None:
        self._last: dict[int, float] = {}

    def due(self, key_id: int) -> bool:
        """Say whether to write now, and if so remember that it was."""
        now = time.monotonic()
        last = self._last.get(key_id)
        if last is not None and now - last < TOUCH_EVERY_S:
            return False
        if len(self._last) >= self._CAP:
            self._last.clear()  # forgetting only means one write more per key
        self._last[key_id] = now
        return True


def throttle_of(store: object) -> TouchThrottle:
    """Return a store's throttle, made on first use (one per store instance)."""
    found = store.__dict__.get("_api_key_touches")
    if found is None:
        found = store.__dict__["_api_key_touches"] = TouchThrottle()
    return found


def new_key() -> str:
    """Return a fresh plaintext key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(plaintext: str) -> str:
    """Return what the store keeps of a key (see the module docstring)."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def looks_like_key(plaintext: str) -> bool:
    """Say whether a text has a key's shape (anything else is refused without a lookup)."""
    return bool(_KEY_SHAPE.fullmatch(plaintext))


def api_key_from_mapping(row: object) -> ApiKeyRecord:
    """Build an ApiKeyRecord from an api_keys row (sqlite3.Row or asyncpg.Record)."""
    from core.store.records import parse_time

    get = row.__getitem__  # type: ignore[attr-defined]
    created = parse_time(get("created_at"))
    assert created is not None
    return ApiKeyRecord(
        id=int(get("id")),
        user_key=get("user_key"),
        name=get("name"),
        created_at=created,
        revoked_at=parse_time(get("revoked_at")),
        last_used_at=parse_time(get("last_used_at")),
    )
