# ruff: noqa: F811 - pytest fixtures imported from tests/test_store.py are taken as arguments
"""Personal API keys in the store: the same contract on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest

from core.store.keys import TOUCH_EVERY_S, looks_like_key
from tests.pg_server import pg_server, pg_url  # noqa: F401 - fixtures
from tests.test_store import Clock, Target, clock, target  # noqa: F401 - fixtures


async def test_a_key_is_shown_once_and_kept_only_as_a_hash(target: Target, clock: Clock) -> None:
    async with await target.open(clock) as ledger:
        key_id, plaintext = await ledger.create_api_key("telegram:42", "laptop")
        assert looks_like_key(plaintext) and len(plaintext) == 3 + 43
        assert await ledger.api_key_user(plaintext) == "telegram:42"
    rows = await target.fetch("SELECT id, key_hash, user_key, name FROM api_keys")
    digest = hashlib.sha256(plaintext.encode()).hexdigest()
    assert rows == [(key_id, digest, "telegram:42", "laptop")]
    # The plaintext is nowhere in the database.
    dump = repr(await target.fetch("SELECT * FROM api_keys"))
    assert plaintext not in dump and plaintext[3:] not in dump


async def test_unknown_malformed_and_revoked_keys_open_nothing(
    target: Target, clock: Clock
) -> None:
    async with await target.open(clock) as ledger:
        first, key = await ledger.create_api_key("web:alice")
        second, other = await ledger.create_api_key("web:alice", "second")
        assert key != other
        for bad in ("", "ik-", "sk-" + key[3:], key[:-1], key + "x", key.upper(), "ik-" + "A" * 43):
            assert await ledger.api_key_user(bad) is None, bad
        assert await ledger.revoke_api_key(first) is True
        assert await ledger.api_key_user(key) is None  # at once: nothing is cached
        assert await ledger.api_key_user(other) == "web:alice"
        assert await ledger.revoke_api_key(first) is False  # already revoked
        assert await ledger.revoke_api_key(999) is False
        assert await ledger.revoke_api_key(-1) is False


async def test_listing_and_last_use(target: Target, clock: Clock) -> None:
    async with await target.open(clock) as ledger:
        a, key_a = await ledger.create_api_key("telegram:1", "a")
        clock.advance(seconds=1)
        b, _ = await ledger.create_api_key("discord:2", "b")
        assert [k.id for k in await ledger.list_api_keys()] == [a, b]
        mine = await ledger.list_api_keys("telegram:1")
        assert [(k.id, k.name, k.active, k.last_used_at) for k in mine] == [(a, "a", True, None)]
        assert mine[0].created_at == clock.now - timedelta(seconds=1)
        assert await ledger.list_api_keys("web:nobody") == []

        assert await ledger.api_key_user(key_a) == "telegram:1"
        first_use = clock.now
        clock.advance(seconds=5)
        # A second use within TOUCH_EVERY_S writes nothing: last_used_at stays.
        assert await ledger.api_key_user(key_a) == "telegram:1"
        (used,) = await ledger.list_api_keys("telegram:1")
        assert used.last_used_at == first_use and TOUCH_EVERY_S >= 60

        await ledger.revoke_api_key(b)
        (revoked,) = await ledger.list_api_keys("discord:2")
        assert not revoked.active and revoked.revoked_at == clock.now


async def test_a_key_needs_a_platform_user_key(target: Target, clock: Clock) -> None:
    async with await target.open(clock) as ledger:
        with pytest.raises(ValueError):
            await ledger.create_api_key("alice")


async def test_a_ledger_holding_only_keys_is_not_an_empty_copy_target(
    target: Target, clock: Clock
) -> None:
    # Copied key ids would collide with it halfway through a copy: refuse it up front.
    async with await target.open(clock) as ledger:
        assert await ledger.is_empty()
        await ledger.create_api_key("web:alice")
        assert not await ledger.is_empty()
