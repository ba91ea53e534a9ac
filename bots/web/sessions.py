"""The page's sign-ins: sessions, and the operator's one-time sign-in link.

A session is opened three ways: with a personal key (`POST /web/api/session`), with a
Telegram Mini App's signed initData, or with the one-time code of the link `imgbot run`
prints when the web door runs alone. The page then sends the session's token as
`Authorization: Bearer …` (never in a URL, never in a cookie, so no other site can make the
browser use it).

Sessions and codes are kept in the ledger (`core/store/web.py`), as SHA-256 digests only:
a session opened through one replica works on every other and outlives a restart; signing
out ends it everywhere, and a code spent on one replica is refused by all. A key session
keeps its key's hash and is checked against the key on every call: revoking the key ends
the session at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.service import WebState
from core.types import Requester

KEY_SESSION_TTL_S = 7 * 24 * 3600
MINIAPP_SESSION_TTL_S = 24 * 3600
LINK_SESSION_TTL_S = 24 * 3600
LINK_CODE_TTL_S = 3600
# Whoever signs in with the operator's link: an admin of this web door.
OPERATOR = Requester("web", "operator", display_name="operator", is_admin=True)


@dataclass(frozen=True)
class Session:
    """Who a page session draws as, and how it was opened.

    `key_revoked`: a key session whose key was revoked since; it is ended on sight.
    """

    requester: Requester
    how: str  # "key" | "telegram" | "link"
    key_revoked: bool = False


class Sessions:
    """Open, find and end page sessions; make and spend one-time sign-in codes."""

    def __init__(self, state: WebState) -> None:
        self._state = state

    async def open(
        self, requester: Requester, how: str, ttl: float, key: str | None = None
    ) -> str:
        """Open a session; return its token (the page's credential, shown only to it)."""
        return await self._state.open_session(
            requester.user_key, how, ttl, display_name=requester.display_name,
            language=requester.language, api_key=key,
        )

    async def get(self, token: str) -> Session | None:
        """Return the live session of a token, or None."""
        found = await self._state.get_session(token)
        if found is None:
            return None
        if found.how == "link":
            return Session(OPERATOR, found.how)
        platform, _, user_id = found.user_key.partition(":")
        requester = Requester(platform, user_id, display_name=found.display_name,
                              language=found.language)
        return Session(requester, found.how, found.key_revoked)

    async def close(self, token: str) -> None:
        """End a session (sign out); unknown tokens are ignored."""
        if token:
            await self._state.close_session(token)

    async def new_link_code(self) -> str:
        """Make a one-time sign-in code, good for LINK_CODE_TTL_S."""
        return await self._state.new_link_code(LINK_CODE_TTL_S)

    async def spend_link_code(self, code: str) -> bool:
        """Use a one-time code: True once, if it is known and fresh; False ever after."""
        return await self._state.spend_link_code(code)
