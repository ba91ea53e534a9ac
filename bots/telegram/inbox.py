"""A durable inbox for Telegram webhook mode: no update answered 2xx is lost with a replica.

Telegram sends an update again only until some process answers 2xx. PTB's webhook server
answers 2xx once it has put the update in the Application's queue — in memory, gone with a
killed process. `InboxQueue` is that queue, made durable: its `put` (awaited by the webhook
server before it answers) first keeps the update in the store (`stage`, group "tg:inbox")
and takes its lease (`tg:inbox:<update id>`); a failed write answers 500, so Telegram sends
the update again. The process that holds an update's lease handles it and renews the lease
while it works (an /img update holds it until its job has been reserved and answered); when
the handlers are done (`finished`, the last handler group) the update is unstaged and marked
done. Every replica sweeps the inbox: an update whose lease ran out (its process died) is
taken and handled by a live one. An update Telegram sends again is recognised by its id:
while it is held by a live process, or after it was done, it is not handled twice. Handling
again after a crash is safe: a job records the message it came from under a unique key, so
a second handling neither draws nor charges again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from telegram import Bot, Update

from core.service import Coordination

log = logging.getLogger(__name__)

GROUP = "tg:inbox"
# How long a handled update id is remembered: Telegram gives up redelivering within a day.
DONE_FOR = 24 * 3600.0


def _key(update_id: int) -> str:
    return f"{update_id:015d}"


class InboxQueue(asyncio.Queue[Any]):
    """The Application's update queue, kept in the store until each update is handled."""

    def __init__(self, store: Coordination, owner: str, lease: float) -> None:
        super().__init__()
        self._store = store
        self._owner = owner
        self._lease = lease
        self.held: set[int] = set()
        self.bot: Bot | None = None
        # Other leases renewed with the updates' (an album owner's).
        self.also_renew: list[Callable[[], Awaitable[None]]] = []

    async def put(self, item: Any) -> None:
        """Keep an update from the webhook, then queue it (unless another process has it)."""
        if not isinstance(item, Update):
            await super().put(item)  # PTB's own sentinels
            return
        update_id = item.update_id
        if await self._store.is_marked(f"tg:update:{update_id}"):
            log.info("update %s was handled already; not again", update_id)
            return
        await self._store.stage(GROUP, _key(update_id), json.dumps(item.to_dict()))
        if not await self._store.hold_lease(f"{GROUP}:{update_id}", self._owner, self._lease):
            log.info("update %s is being handled by another replica", update_id)
            return
        self.held.add(update_id)
        await super().put(item)

    async def finished(self, update_id: int) -> None:
        """The handlers are done with an update: forget it, and remember it was handled."""
        self.held.discard(update_id)
        await self._store.mark_once(f"tg:update:{update_id}", DONE_FOR)
        await self._store.unstage(GROUP, _key(update_id))
        await self._store.drop_lease(f"{GROUP}:{update_id}", self._owner)

    async def keep(self) -> None:
        """Until cancelled: renew the leases of the updates being handled here, and take
        over the updates a dead process left in the inbox."""
        # Leases are renewed every third of theirs; a dead process's updates are looked
        # for more often, so they are handled again soon after its leases end.
        renew_every = max(0.2, self._lease / 3)
        every = max(0.2, min(1.0, self._lease / 10))
        renewed = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every)
            try:
                if loop.time() - renewed >= renew_every - every / 2:
                    renewed = loop.time()
                    for update_id in sorted(self.held):
                        await self._store.hold_lease(
                            f"{GROUP}:{update_id}", self._owner, self._lease
                        )
                    for renew in list(self.also_renew):
                        await renew()
                await self._sweep()
            except Exception as err:  # noqa: BLE001 - tried again next round
                log.warning("telegram inbox: %s", err)

    async def _sweep(self) -> None:
        # Only updates kept for longer than a lease can have lost their process: a fresh
        # one is being handled by the process that received it.
        settled = datetime.now(UTC) - timedelta(seconds=self._lease)
        for key, at, payload in await self._store.staged(GROUP):
            update_id = int(key)
            if update_id in self.held or self.bot is None or at > settled:
                continue
            if await self._store.is_marked(f"tg:update:{update_id}"):
                await self._store.unstage(GROUP, key)
                continue
            if not await self._store.hold_lease(f"{GROUP}:{update_id}", self._owner, self._lease):
                continue  # a live process has it
            update = Update.de_json(json.loads(payload), self.bot)
            if update is None:
                await self._store.unstage(GROUP, key)
                continue
            log.info("update %s was left by a stopped replica; handling it here", update_id)
            self.held.add(update_id)
            await super().put(update)
