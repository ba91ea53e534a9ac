"""Discord gateway shards split across replicas through the ledger's named leases.

Every shard must be connected exactly once over all `imgbot run` processes. A process
holds the lease `discord:shard:<id>` for each shard it connects, renewed every third of
JOB_LEASE; a process that dies stops renewing and another takes its shards once the
lease ends. Two ways to say who connects what:

- fixed (`DISCORD_SHARD_IDS` with `DISCORD_SHARD_COUNT`): this process holds exactly
  those shards; the leases only catch a second process configured with the same ones
  (it refuses to start, like a second Telegram poller);
- automatic (`DISCORD_SHARD_IDS` empty): every process taking part holds the lease
  `discord:member:<owner>`; the live members, sorted by name, share the shards evenly
  (the first `count % members` get one more), each takes free shards up to its share and
  lets go of those above it, so a replica that joins gets its share from the others and
  one that dies leaves its shards to them. One process alone holds them all.

The shard count is the same for all: `DISCORD_SHARD_COUNT`, else the count the live
leases carry (what the first replica chose), else Discord's advice (GET /gateway/bot).

`balance_shards` is the one round of automatic assignment, over the coordination API
alone (no gateway), so it is tested with two services on one ledger.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from core.service import Coordination
from core.store import NamedLease

log = logging.getLogger(__name__)

SHARD_LEASE = "discord:shard:"
MEMBER_LEASE = "discord:member:"


class ShardsTaken(Exception):
    """Another live process holds a shard this one was told to connect."""


class ShardCountMismatch(Exception):
    """DISCORD_SHARD_COUNT differs from the count the running replicas use."""


def shard_lease(shard_id: int) -> str:
    """Return the lease name of one shard."""
    return f"{SHARD_LEASE}{shard_id}"


def shard_role(shard_ids: Iterable[int]) -> str:
    """Return the role a process with these shards shows (`imgbot doctor`)."""
    ids = sorted(shard_ids)
    return f"discord:shards:{','.join(map(str, ids)) if ids else 'none'}"


def _info(count: int) -> str:
    return json.dumps({"count": count})


def _live(leases: Iterable[NamedLease], now: float) -> list[NamedLease]:
    return [lease for lease in leases if lease.until.timestamp() > now]


def _shard_of(lease: NamedLease) -> int | None:
    tail = lease.name.removeprefix(SHARD_LEASE)
    return int(tail) if tail.isdigit() else None


async def agreed_count(coordination: Coordination) -> int | None:
    """Return the shard count the live shard leases carry, if any hold one."""
    for lease in _live(await coordination.leases(SHARD_LEASE), time.time()):
        try:
            count = int(json.loads(lease.info or "{}").get("count") or 0)
        except (ValueError, AttributeError):
            continue
        if count > 0:
            return count
    return None


def fair_share(owner: str, members: Iterable[str], count: int) -> int:
    """Return how many of `count` shards `owner` should hold among `members`."""
    names = sorted(set(members) | {owner})
    base, extra = divmod(count, len(names))
    return base + (1 if names.index(owner) < extra else 0)


@dataclass(frozen=True)
class Balance:
    """What one round of assignment decided for this process."""

    held: frozenset[int]
    gained: frozenset[int]  # taken this round: connect them
    lost: frozenset[int]  # given up or taken by another: disconnected already


async def balance_shards(
    coordination: Coordination,
    owner: str,
    count: int,
    held: Iterable[int],
    seconds: float,
    disconnect: Callable[[int], Awaitable[None]],
) -> Balance:
    """Renew this process's shards, give up those above its share (`disconnect` runs
    before the lease is dropped, so no shard is ever connected twice) and take free ones
    up to it; return the shards it holds now."""
    now = time.time()
    await coordination.hold_lease(f"{MEMBER_LEASE}{owner}", owner, seconds, _info(count))
    members = [
        lease.owner for lease in _live(await coordination.leases(MEMBER_LEASE), now)
    ]
    share = fair_share(owner, members, count)
    kept: set[int] = set()
    lost: set[int] = set()
    for shard in sorted(set(held)):
        if shard < count and await coordination.hold_lease(
            shard_lease(shard), owner, seconds, _info(count)
        ):
            kept.add(shard)
        else:
            # Another process took it while we could not renew: it is theirs now.
            log.warning("Discord shard %d is no longer held here; disconnecting it", shard)
            await disconnect(shard)
            lost.add(shard)
    while len(kept) > share:
        shard = max(kept)
        await disconnect(shard)
        await coordination.drop_lease(shard_lease(shard), owner)
        kept.discard(shard)
        lost.add(shard)
        log.info("Discord shard %d handed to another replica (share here: %d)", shard, share)
    gained: set[int] = set()
    if len(kept) < share:
        taken = {
            shard
            for lease in _live(await coordination.leases(SHARD_LEASE), now)
            if lease.owner != owner and (shard := _shard_of(lease)) is not None
        }
        for shard in range(count):
            if len(kept) >= share:
                break
            if shard in kept or shard in taken:
                continue
            if await coordination.hold_lease(shard_lease(shard), owner, seconds, _info(count)):
                kept.add(shard)
                gained.add(shard)
    return Balance(frozenset(kept), frozenset(gained), frozenset(lost))


async def hold_fixed_shards(
    coordination: Coordination,
    owner: str,
    count: int,
    shard_ids: Iterable[int],
    seconds: float,
) -> None:
    """Take or renew the leases of the shards this process was told to connect; raise
    ShardsTaken naming the process that holds one of them."""
    for shard in sorted(set(shard_ids)):
        if not await coordination.hold_lease(shard_lease(shard), owner, seconds, _info(count)):
            holders = [
                lease.owner for lease in await coordination.leases(shard_lease(shard))
                if lease.name == shard_lease(shard)
            ]
            raise ShardsTaken(
                f"Discord shard {shard} is already connected by another imgbot process "
                f"({', '.join(holders) or 'unknown'}); give each replica its own "
                "DISCORD_SHARD_IDS, or leave them empty to share the shards automatically"
            )


async def release_shards(coordination: Coordination, owner: str, shard_ids: Iterable[int]) -> None:
    """Give up this process's shard leases and its membership (a clean stop)."""
    for shard in sorted(set(shard_ids)):
        await coordination.drop_lease(shard_lease(shard), owner)
    await coordination.drop_lease(f"{MEMBER_LEASE}{owner}", owner)
