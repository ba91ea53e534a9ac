"""Albums whose items land on different replicas (webhook mode behind a load balancer).

Telegram sends each item of an album as its own update; behind a round-robin proxy they
reach different `imgbot run` processes. `SharedAlbums` has the same `add` as the in-memory
`AlbumCollector` (polling, one process), but keeps the items in the store (`Store.stage`):
the first process to see an item of an album wins its mark (`Store.mark_once`) and, once no
item came for ALBUM_DEBOUNCE seconds (by the store's stamps), reads every item back and runs
the album once. An item arriving after that is answered as late, by whichever process gets it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime

from telegram import Bot, Message

from core.service import Coordination

log = logging.getLogger(__name__)

# How long an album's items and its "done" mark are kept (Telegram sends an album at once).
ALBUM_KEEP = 600.0
# How often the owner looks for new items while the album is still arriving.
LOOK_EVERY = 0.25

AlbumReady = Callable[[Message, str, list[Message]], Awaitable[None]]
AlbumLate = Callable[[Message], Awaitable[None]]


class SharedAlbums:
    """Gather album items in the store; one process runs each album once."""

    def __init__(
        self,
        store: Coordination,
        bot: Bot,
        debounce: float,
        spawn: Callable[[Coroutine[object, object, None]], object],
        on_ready: AlbumReady,
        on_late: AlbumLate | None = None,
        *,
        owner: str = "",
        lease: float = 30.0,
    ) -> None:
        self._store = store
        self._bot = bot
        self._debounce = debounce
        self._spawn = spawn
        self._on_ready = on_ready
        self._on_late = on_late
        self._owner = owner
        self._lease = lease
        # Albums this process is running: their owner leases are renewed by `renew`.
        self.owned: set[str] = set()

    def add(self, message: Message, text: str | None) -> None:
        """Take one album item in the background (see `add_now`)."""
        self._spawn(self.add_now(message, text))

    async def add_now(self, message: Message, text: str | None) -> None:
        """Take one album item; return when this process has nothing more to do for it.

        The process that takes an album's owner lease waits for its quiet period and runs
        it (awaiting the job); the webhook inbox keeps this item's update until then, so a
        dying owner's update is handled again by another replica, which becomes the owner
        (the job records its message: it is never drawn twice).
        """
        group = f"tg:album:{message.chat_id}:{message.media_group_id}"
        payload = json.dumps({"message": message.to_dict(), "text": text})
        await self._store.stage(group, f"{message.message_id:012d}", payload)
        if await self._store.is_marked(f"{group}:done"):
            # After the quiet period: an album that ran a job says this item was not used;
            # one that had no /img runs now if this item carries it, with every item.
            ran = await self._store.is_marked(f"{group}:ran")
            if ran or text is None:
                if ran and self._on_late is not None:
                    await self._on_late(message)
                return
        if not await self._store.hold_lease(f"{group}:owner", self._owner, self._lease):
            return  # another live process owns this album
        self.owned.add(group)
        try:
            await self._assemble(group)
        finally:
            self.owned.discard(group)
            await self._store.drop_lease(f"{group}:owner", self._owner)

    async def renew(self) -> None:
        """Renew the owner leases of the albums this process is running."""
        for group in sorted(self.owned):
            await self._store.hold_lease(f"{group}:owner", self._owner, self._lease)

    async def _assemble(self, group: str) -> None:
        while True:
            items = await self._store.staged(group)
            newest = max((at for _, at, _ in items), default=None)
            quiet = (datetime.now(UTC) - newest).total_seconds() if newest else self._debounce
            if quiet >= self._debounce:
                break
            await asyncio.sleep(min(LOOK_EVERY, self._debounce - quiet))
        # From here an item is late; then read everything that made it in time.
        await self._store.mark_once(f"{group}:done", ALBUM_KEEP)
        messages, command = await self._items(group)
        if command is None:
            log.info("album %s has no /img yet", group)
            return
        await self._store.mark_once(f"{group}:ran", ALBUM_KEEP)
        await self._on_ready(command[0], command[1], messages)

    async def _items(self, group: str) -> tuple[list[Message], tuple[Message, str] | None]:
        messages: list[Message] = []
        command: tuple[Message, str] | None = None
        for _, _, payload in sorted(await self._store.staged(group), key=lambda item: item[0]):
            data = json.loads(payload)
            message = Message.de_json(data["message"], self._bot)
            if message is None:
                continue
            messages.append(message)
            if data.get("text") is not None and command is None:
                command = (message, str(data["text"]))
        return messages, command
