"""Discord across replicas: gateway shards shared through the ledger, command sync once.

Two real services on one real ledger (PostgreSQL, as replicas run; the sync test also on
the SQLite file) and the real bot and command tree, with fakes only at Discord's network
seams (REST, and the gateway's shard connections).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import discord
import pytest

from bots.discord.app import ImgBot, ShardKeeper, choose_shard_count, sync_commands
from bots.discord.shards import (
    ShardCountMismatch,
    ShardsTaken,
    balance_shards,
    fair_share,
    hold_fixed_shards,
    shard_lease,
)
from core.config import Settings
from core.runtime import open_service
from core.service import ImageService
from tests import discord_payloads as p
from tests.discord_fake import FakeCdn
from tests.test_discord import make_settings, running_bot


async def _holders(service: ImageService) -> dict[int, str]:
    """Return each live shard lease's holder, by shard."""
    return {
        int(lease.name.rsplit(":", 1)[1]): lease.owner
        for lease in await service.coordination.leases("discord:shard:")
        if lease.until.timestamp() > time.time()
    }


class Gateway:
    """The shard connections of two processes: connecting a shard held elsewhere fails."""

    def __init__(self) -> None:
        self.connected: dict[int, str] = {}

    def disconnect_for(self, owner: str, service: ImageService) -> Callable[[int], Any]:
        async def disconnect(shard: int) -> None:
            # Called before the lease is given up: nobody else can hold it yet.
            assert (await _holders(service)).get(shard) == owner
            assert self.connected.pop(shard) == owner

        return disconnect

    def connect(self, owner: str, shards: frozenset[int]) -> None:
        for shard in shards:
            assert shard not in self.connected, f"shard {shard} connected twice"
            self.connected[shard] = owner


def test_fair_share_splits_evenly_and_deterministically() -> None:
    assert [fair_share(o, ["b", "a", "c"], 4) for o in "abc"] == [2, 1, 1]
    assert fair_share("a", [], 3) == 3
    assert sum(fair_share(o, ["a", "b"], 1) for o in "ab") == 1


async def test_shards_split_across_two_replicas_and_are_taken_over(
    settings: Callable[..., Settings], pg_url: str
) -> None:
    config = settings(database_url=pg_url)
    lease = 1.5
    gateway = Gateway()
    async with open_service(config) as a, open_service(config) as b:
        held = {a.owner: frozenset[int](), b.owner: frozenset[int]()}

        async def round_of(service: ImageService) -> None:
            result = await balance_shards(
                service.coordination, service.owner, 4, held[service.owner], lease,
                gateway.disconnect_for(service.owner, service),
            )
            gateway.connect(service.owner, result.gained)
            held[service.owner] = result.held

        await round_of(a)  # alone: every shard
        assert held[a.owner] == {0, 1, 2, 3}
        await round_of(b)  # joins: nothing free yet
        assert held[b.owner] == set()
        await round_of(a)  # sees b: hands over its share above two
        await round_of(b)
        assert len(held[a.owner]) == len(held[b.owner]) == 2
        assert held[a.owner] | held[b.owner] == {0, 1, 2, 3}
        for _ in range(3):  # steady: nothing moves
            await round_of(a)
            await round_of(b)
        assert sorted(gateway.connected) == [0, 1, 2, 3]
        assert gateway.connected == await _holders(a)

        # b stops renewing (killed): once its leases end, a takes its shards back.
        gone = held[b.owner]
        for shard in gone:
            gateway.connected.pop(shard)
        await round_of(a)
        assert held[a.owner].isdisjoint(gone)  # still b's until the lease ends
        await asyncio.sleep(lease + 0.3)
        await round_of(a)
        assert held[a.owner] == {0, 1, 2, 3}
        assert set((await _holders(a)).values()) == {a.owner}


async def test_fixed_shards_refuse_a_second_process_with_the_same_ids(
    settings: Callable[..., Settings], pg_url: str
) -> None:
    config = settings(database_url=pg_url)
    async with open_service(config) as a, open_service(config) as b:
        await hold_fixed_shards(a.coordination, a.owner, 4, [0, 1], 30)
        await hold_fixed_shards(b.coordination, b.owner, 4, [2, 3], 30)
        with pytest.raises(ShardsTaken) as info:
            await hold_fixed_shards(b.coordination, b.owner, 4, [1], 30)
        assert "shard 1" in str(info.value) and a.owner in str(info.value)
        assert await _holders(a) == {0: a.owner, 1: a.owner, 2: b.owner, 3: b.owner}
        # An automatic replica beside them takes nothing that is held.
        result = await balance_shards(b.coordination, "c", 4, [], 30, _never)
        assert result.held == set()


async def _never(shard: int) -> None:
    raise AssertionError(f"shard {shard} should not be disconnected")


async def test_the_shard_count_is_agreed_through_the_ledger(
    settings: Callable[..., Settings], pg_url: str
) -> None:
    async with open_service(settings(database_url=pg_url)) as a:
        await hold_fixed_shards(a.coordination, a.owner, 3, [0], 30)
        # Another replica with DISCORD_SHARD_COUNT=0 follows the running ones.
        follower = settings(database_url=pg_url)
        bot = ImgBot(follower, a)
        assert await choose_shard_count(bot, follower, a) == 3
        other = settings(database_url=pg_url, discord_shard_count=5)
        with pytest.raises(ShardCountMismatch, match="DISCORD_SHARD_COUNT=5"):
            await choose_shard_count(ImgBot(other, a), other, a)


class ShardLauncher:
    """The gateway seam: records which shards the bot connects."""

    def __init__(self) -> None:
        self.launched: list[int] = []

    async def launch_shard(self, gateway: Any, shard_id: int, *, initial: bool = False) -> None:
        self.launched.append(shard_id)


async def test_the_bot_connects_only_its_shards_and_shows_them_as_its_role(
    settings: Callable[..., Settings], pg_url: str
) -> None:
    config = settings(database_url=pg_url, job_lease=1.5)
    async with open_service(config) as a, open_service(config) as b:
        # b holds shard 1 of 2 already; a's bot takes the free one and connects it alone.
        await hold_fixed_shards(b.coordination, b.owner, 2, [1], 30)
        async with ImgBot(config, a) as bot:
            fake = ShardLauncher()
            bot.launch_shard = fake.launch_shard  # type: ignore[method-assign]
            keeper = ShardKeeper(bot, config, a, 2)
            await keeper.start()
            assert keeper.held == {0} and bot.shard_ids == [0]
            assert "discord:shards:0/2" in a.roles
            await bot.launch_shards()
            assert fake.launched == [0]
            # b stops; its shard comes free and is connected here, the role says so.
            await b.coordination.drop_lease(shard_lease(1), b.owner)
            await keeper.balance()
            await asyncio.sleep(0)
            assert fake.launched == [0, 1] and bot.shard_ids == [0, 1]
            assert "discord:shards:0,1/2" in a.roles and "discord:shards:0/2" not in a.roles
            await keeper.release()
            assert await _holders(a) == {}
            assert not any(role.startswith("discord:") for role in a.roles)


async def test_commands_sync_once_per_deploy(
    settings: Callable[..., Settings], tmp_path: Path
) -> None:
    config = make_settings(settings, tmp_path, discord_guild_ids=str(p.GUILD_ID))
    async with running_bot(config, FakeCdn()) as first:
        # A failed sync is not remembered: the next start tries again.
        first.rest.refuse_commands = 403
        assert await sync_commands(first.bot, config, first.service)
        first.rest.refuse_commands = None
        assert await sync_commands(first.bot, config, first.service)
        assert len(first.rest.calls) == 3  # refused, then the guild and the emptied global set
    # The second replica (another process on the same ledger) finds the mark and skips.
    async with running_bot(config, FakeCdn()) as second:
        assert not await sync_commands(second.bot, config, second.service)
        assert second.rest.calls == []
        # Its tree still answers in that server (the guild copy is made locally).
        assert second.bot.tree.get_command("img", guild=discord.Object(id=p.GUILD_ID)) is not None
    # Other guilds are another deploy: synced again.
    moved = make_settings(settings, tmp_path, discord_guild_ids=f"{p.GUILD_ID},42")
    async with running_bot(moved, FakeCdn()) as third:
        assert await sync_commands(third.bot, moved, third.service)
        assert len(third.rest.calls) == 3


async def test_replicas_take_turns_to_identify_through_the_ledger(
    settings: Callable[..., Settings], tmp_path: Path
) -> None:
    # Discord takes one IDENTIFY per 5 s from all of a bot's connections: two replicas (here
    # two processes' stores on one ledger, with the ledger's clock in the test's hand) must
    # not both identify within those 5 s, and a second shard of one process waits as well.
    from datetime import UTC, datetime, timedelta
    from types import SimpleNamespace

    from bots.discord import app as discord_app
    from core.store import Limits, open_store

    now = [datetime(2026, 11, 29, 12, 0, tzinfo=UTC)]
    config = settings(database_url=f"sqlite:///{tmp_path}/imgbot.db")
    stores = [await open_store(config.store_url, Limits.from_settings(config),
                               clock=lambda: now[0]) for _ in range(2)]
    monkey = pytest.MonkeyPatch()
    monkey.setattr(discord_app, "IDENTIFY_POLL", 0.01)
    try:
        def replica(n: int) -> Any:
            service = SimpleNamespace(owner=f"host-{n}:1", coordination=stores[n])
            return SimpleNamespace(service=service, _identifies=0, is_closed=lambda: False)

        a, b = replica(0), replica(1)
        hook = ImgBot.before_identify_hook
        await asyncio.wait_for(hook(a, 0, initial=True), 5)  # the first goes at once
        waiting = [asyncio.create_task(hook(b, 1, initial=True)),
                   asyncio.create_task(hook(a, 2))]
        await asyncio.sleep(0.3)
        assert not any(t.done() for t in waiting)  # 5 s not passed on the ledger's clock
        now[0] += timedelta(seconds=discord_app.IDENTIFY_EVERY + 0.1)
        done, pending = await asyncio.wait(waiting, timeout=5,
                                           return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1 and len(pending) == 1  # one turn, one of them
        await asyncio.sleep(0.3)
        assert not pending.pop().done()
        now[0] += timedelta(seconds=discord_app.IDENTIFY_EVERY + 0.1)
        await asyncio.wait_for(asyncio.gather(*waiting), 5)
    finally:
        monkey.undo()
        for store in stores:
            await store.close()
