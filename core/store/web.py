"""What the store keeps for the web door, so that any replica (and the next start) answers
like the one that made it: page sessions, one-time sign-in codes and kept result files.

- A **session** is found by the SHA-256 of its token; the token itself exists only in the
  browser and in the answer that opened it (as a personal key exists only when it is made,
  see `core.store.keys`: 256 random bits, so a fast unsalted hash is safe and indexable).
  A key session keeps the hash of the key it was opened with, never the key: each call
  finds the key by that hash, so revoking the key ends the session at once, on every
  replica.
- A **sign-in code** (the operator's one-time link) is a mark (`marks`) named by the
  code's hash: spending it deletes the mark, and of two replicas spending one code at once
  only one deletes it.
- A **kept file** is a result image (an API `url` answer, or the page's original) kept for
  an hour as a blob under an unguessable name. The name is kept in clear: it guards only
  the bytes stored beside it, which anyone able to read the table can read anyway, and the
  page's history must list a job's names to offer them. When the kept files pass the cap
  in all, the oldest go first.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

# What `how` a session was opened with says: a personal key, the Telegram Mini App's signed
# initData, or the operator's one-time link (which makes the session the operator's).
SESSION_KINDS = ("key", "telegram", "link")
# A user's live sessions at most: opening one more ends their oldest. Bounds the rows
# anyone who may sign in can make, without letting one user end another's sessions.
SESSIONS_PER_USER = 20
LINK_MARK_PREFIX = "web:link:"


def token_hash(token: str) -> str:
    """Return what the store keeps of a session token or sign-in code (SHA-256, hex)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """Return a fresh session token or sign-in code (32 random bytes, url-safe)."""
    return secrets.token_urlsafe(32)


def link_mark(code: str) -> str:
    """Return the mark that stands for an unspent sign-in code."""
    return LINK_MARK_PREFIX + token_hash(code)


@dataclass(frozen=True)
class WebSession:
    """A live page session as the store has it (never its token).

    `key_revoked`: a key session whose key was revoked since (or was made another user's):
    the caller ends it and says why.
    """

    user_key: str
    how: str
    display_name: str
    language: str | None
    expires_at: datetime
    key_revoked: bool = False


@dataclass(frozen=True)
class FileToKeep:
    """One result image to keep: its name under /v1/files/, its bytes and what it is."""

    name: str
    data: bytes
    mime: str
    width: int
    height: int


@dataclass(frozen=True)
class KeptFileInfo:
    """A kept image as the page's history lists it (without its bytes)."""

    name: str
    mime: str
    width: int
    height: int


@dataclass(frozen=True)
class KeptFileData:
    """A kept image's bytes, and until when it is kept."""

    data: bytes
    mime: str
    expires_at: datetime


def session_from_mapping(row: object) -> WebSession:
    """Build a WebSession from a web_sessions row joined with its key's state."""
    get = row.__getitem__  # type: ignore[attr-defined]
    return WebSession(
        user_key=get("user_key"),
        how=get("how"),
        display_name=get("display_name"),
        language=get("language"),
        expires_at=datetime.fromisoformat(get("expires_at")),
        key_revoked=get("key_hash") is not None and not get("key_live"),
    )


def check_session(how: str, seconds: float) -> None:
    """Refuse a session of an unknown kind or with no time to live."""
    if how not in SESSION_KINDS:
        raise ValueError(f"a session is opened with one of {SESSION_KINDS}, not {how!r}")
    if not seconds > 0:
        raise ValueError("a session needs a time to live > 0")


def file_rows(
    job_id: int, user_key: str, files: Sequence[FileToKeep], now_iso: str, until_iso: str
) -> list[tuple[object, ...]]:
    """Return the `web_files` rows of a job's kept images, in their order (both backends):
    name, job, index, user, mime, width, height, size, kept at, kept until, bytes."""
    return [
        (f.name, job_id, n, user_key, f.mime, f.width, f.height, len(f.data), now_iso, until_iso,
         f.data)
        for n, f in enumerate(files)
    ]
