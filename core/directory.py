"""The @username directory: which user each name seen in a chat belongs to, for admins.

An admin may name a user by `@username` (`/limit @bob daily=5000`). The bots note the name
of whoever writes; the names are kept in the ledger (`usernames`), so a name one replica saw
resolves on every other, and after a restart. A name is written only when it is new here,
now someone else's, or last written over REWRITE_AFTER_S ago (another replica may have
given it to someone else since): most messages cost no write at all.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from core.errors import PromptError
from core.ids import USERNAME, parse_key
from core.store import StoreError

log = logging.getLogger(__name__)

# Names remembered as written, at most (the oldest forgotten first: one write more each).
KEEP_WRITTEN = 50_000
REWRITE_AFTER_S = 3600.0


class UsernameStore(Protocol):
    """What the directory needs of the store."""

    async def note_username(self, platform: str, username: str, user_key: str) -> None: ...
    async def find_username(self, platform: str, username: str) -> str | None: ...


class UserDirectory:
    """Note the usernames seen on a platform and find whose they are."""

    def __init__(
        self, store: UsernameStore, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._store = store
        self._clock = clock
        # (platform, name) -> (user key, when written) as this process last wrote it.
        self._written: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    async def note(self, platform: str, username: str | None, user_key: str) -> None:
        """Record that `username` on `platform` is the user `user_key` (best effort: a
        name the ledger did not take is written again with the next message)."""
        if not username:
            return
        name = username.lower()
        now = self._clock()
        last = self._written.get((platform, name))
        if last is not None and last[0] == user_key and now - last[1] < REWRITE_AFTER_S:
            return
        try:
            await self._store.note_username(platform, name, user_key)
        except StoreError as err:  # a name must never stop a message's handling
            log.warning("could not note a username on %s: %s", platform, err)
            return
        self._written[(platform, name)] = (user_key, now)
        self._written.move_to_end((platform, name))
        while len(self._written) > KEEP_WRITTEN:
            self._written.popitem(last=False)

    async def find(self, platform: str, username: str) -> str | None:
        """Return the user key of `@username` on `platform`, if a bot has seen them."""
        return await self._store.find_username(platform, username.removeprefix("@"))

    async def resolve(self, word: str, platform: str) -> str:
        """Turn an admin's word for a user or chat into a checked key, or raise PromptError.

        `@name` is a user a bot has seen on the admin's platform; anything else is read by
        `core.ids.parse_key`.
        """
        username = USERNAME.fullmatch(word)
        if username is None:
            return parse_key(word, platform)
        found = await self.find(platform, username.group(1))
        if found is None:
            raise PromptError("admin.unknown_username", name=word)
        return found
