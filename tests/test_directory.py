"""The @username directory on a real SQLite ledger: names resolve for admins, and a name is
written only when it is new, someone else's now, or last written long ago."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.directory import REWRITE_AFTER_S, UserDirectory
from core.errors import PromptError
from core.store import Limits, open_store
from tests.test_store import Clock


class Ticks:
    """The directory's monotonic clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def seen(store_path: Path) -> list[tuple[str, str, str]]:
    store = await open_store(f"sqlite:///{store_path}", Limits())
    try:
        async with store.snapshot() as reader:
            rows = await reader.rows("usernames")
        return [(row["name_key"], row["user_key"], row["seen_at"]) for row in rows]
    finally:
        await store.close()


async def test_a_name_is_written_only_when_it_changes_or_is_old(tmp_path: Path) -> None:
    path = tmp_path / "imgbot.db"
    clock, ticks = Clock(), Ticks()
    store = await open_store(f"sqlite:///{path}", Limits(), clock=clock)
    directory = UserDirectory(store, clock=ticks)
    try:
        await directory.note("telegram", "Bob", "telegram:501")
        first = clock.now.isoformat(timespec="microseconds")
        assert await seen(path) == [("telegram:bob", "telegram:501", first)]
        # Every later message of Bob's costs no write (seen_at stays the first one's)...
        for _ in range(50):
            clock.advance(seconds=1)
            ticks.now += 1
            await directory.note("telegram", "BOB", "telegram:501")
        assert await seen(path) == [("telegram:bob", "telegram:501", first)]
        # ...until the name is someone else's,
        await directory.note("telegram", "bob", "telegram:502")
        moved = clock.now.isoformat(timespec="microseconds")
        assert await seen(path) == [("telegram:bob", "telegram:502", moved)]
        # or was written long ago (another replica may have given it away since).
        clock.advance(hours=2)
        ticks.now += REWRITE_AFTER_S
        await directory.note("telegram", "bob", "telegram:502")
        again = clock.now.isoformat(timespec="microseconds")
        assert again != moved and await seen(path) == [("telegram:bob", "telegram:502", again)]
        await directory.note("telegram", None, "telegram:503")  # no username: nothing
        assert len(await seen(path)) == 1
    finally:
        await store.close()


async def test_admin_words_resolve_through_the_ledger(tmp_path: Path) -> None:
    path = tmp_path / "imgbot.db"
    writer = await open_store(f"sqlite:///{path}", Limits())
    reader = await open_store(f"sqlite:///{path}", Limits())  # another process
    try:
        await UserDirectory(writer).note("telegram", "Ann_1", "telegram:42")
        directory = UserDirectory(reader)
        assert await directory.resolve("@ann_1", "telegram") == "telegram:42"
        assert await directory.resolve("42", "telegram") == "telegram:42"
        assert await directory.resolve("discord:7", "telegram") == "discord:7"
        with pytest.raises(PromptError) as info:
            await directory.resolve("@ann_1", "discord")  # names are per platform
        assert info.value.key == "admin.unknown_username"
        with pytest.raises(PromptError) as info:
            await directory.resolve("telegram:@ann_1", "telegram")
        assert info.value.key == "admin.id_not_number"
    finally:
        await writer.close()
        await reader.close()
