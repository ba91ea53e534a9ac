"""The page's sign-ins: sessions, and the operator's one-time sign-in link.

A session is opened three ways: with a personal key (`POST /web/api/session`), with a
Telegram Mini App's signed initData, or with the one-time code of the link `imgbot run`
prints when the web door runs alone. The page then sends the session's token as
`Authorization: Bearer …` (never in a URL, never in a cookie, so no other site can make the
browser use it). A key session keeps its key in this process's memory and checks it again on
every call: revoking the key ends the session at once.

Sessions and link codes live in this process's memory, like the API's url results: a restart
signs everyone out (the page then asks again; a Mini App signs in again by itself), and
replicas do not share them. Only SHA-256 digests of tokens and codes are kept as keys.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from core.types import Requester

KEY_SESSION_TTL_S = 7 * 24 * 3600
MINIAPP_SESSION_TTL_S = 24 * 3600
LINK_SESSION_TTL_S = 24 * 3600
LINK_CODE_TTL_S = 3600
MAX_SESSIONS = 10_000


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Session:
    """Who a page session draws as, and how it was opened."""

    requester: Requester
    how: str  # "key" | "telegram" | "link"
    expires: float
    key: str | None = None  # the personal key of a key session, checked again on each call


class Sessions:
    """Open, find and end page sessions; make and spend one-time sign-in codes."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._codes: dict[str, float] = {}

    def open(self, requester: Requester, how: str, ttl: float, key: str | None = None) -> str:
        """Open a session; return its token (the page's credential, shown only to it)."""
        self._expire()
        token = secrets.token_urlsafe(32)
        self._sessions[_digest(token)] = Session(requester, how, self._clock() + ttl, key)
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)  # the oldest goes first
        return token

    def get(self, token: str) -> Session | None:
        """Return the live session of a token, or None."""
        if not token:
            return None
        found = self._sessions.get(_digest(token))
        if found is None or found.expires <= self._clock():
            return None
        return found

    def close(self, token: str) -> None:
        """End a session (sign out); unknown tokens are ignored."""
        self._sessions.pop(_digest(token), None)

    def new_link_code(self) -> str:
        """Make a one-time sign-in code, good for LINK_CODE_TTL_S."""
        code = secrets.token_urlsafe(24)
        self._codes[_digest(code)] = self._clock() + LINK_CODE_TTL_S
        return code

    def spend_link_code(self, code: str) -> bool:
        """Use a one-time code: True once, if it is known and fresh; False ever after."""
        until = self._codes.pop(_digest(code), None) if code else None
        return until is not None and until > self._clock()

    def _expire(self) -> None:
        now = self._clock()
        for digest in [d for d, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[digest]
        for digest in [d for d, until in self._codes.items() if until <= now]:
            del self._codes[digest]
