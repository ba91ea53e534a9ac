"""What is particular to the PostgreSQL backend, against a real throwaway server.

The generic ledger behaviour runs against both backends in tests/test_store.py; here:
migrations and concurrent opens (and the upgrade of a version 4 database), reservations
from two pools and from three OS processes against one limit, errors that must name
DATABASE_URL without the password, a cancelled reservation, lost connections, a read-only
database, a copy between two databases, and group commit: calls made at once share a
commit and keep their order, a call the database refuses fails alone, a batch cut off
fails every call in it, and batches from two pools never deadlock.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from core.errors import DuplicateJob, LimitExceeded
from core.pricing import Usage
from core.requester import Requester
from core.store import JobSpec, JobStatus, Limits, StoreError
from core.store.interface import COPY_TABLES, iterate_rows
from core.store.postgres import PostgresStore
from core.store.postgres_schema import LATEST_VERSION, MIGRATIONS, SCHEMA_VERSION_DDL
from core.store.web import FileToKeep
from tests.pg_server import PASSWORD, PgServer, pg_server, pg_url  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[1]
START = datetime(2025, 3, 15, 12, 0, tzinfo=UTC)
DAY = START.isoformat()[:10]
SPEC = JobSpec(
    command_text="/img 1:1 high a white cat",
    model="gpt-image-2",
    size="1024x1024",
    quality="high",
    n=1,
    reference_count=0,
    request_json='{"prompt": "a white cat"}',
)


def clock() -> datetime:
    return START


def who(uid: str, chat: str | None = None, *, name: str = "") -> Requester:
    return Requester("telegram", uid, chat, display_name=name or f"user {uid}", is_group=bool(chat))


async def open_store(url: str, **limits: float) -> PostgresStore:
    return await PostgresStore.open(url, Limits(**limits), clock=clock)


async def fetch(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await conn.fetch(sql, *params)]
    finally:
        await conn.close()


async def assert_totals_match_jobs(url: str) -> None:
    """The running totals equal the jobs' charges, worked out here from the raw rows."""
    totals = {
        (scope, key, period): micro
        for scope, key, period, micro in await fetch(
            url, "SELECT scope, key, period, micro_credits FROM spend_totals"
        )
    }
    micro: dict[tuple[str, str, str], int] = defaultdict(int)
    for user_key, chat_key, status, estimated, actual, created in await fetch(
        url,
        "SELECT user_key, chat_key, status, estimated_credits, actual_credits, created_at"
        " FROM jobs",
    ):
        if status in ("reserved", "unsettled"):
            cost = estimated
        elif status == "refunded":
            cost = 0.0
        else:
            cost = actual or 0.0
        day, month = created[:10], created[:7]
        keys = [("user_daily", user_key, day), ("user_monthly", user_key, month)]
        keys += [("global_daily", "", day)] + ([("chat_daily", chat_key, day)] if chat_key else [])
        for key in keys:
            micro[key] += int(cost * 1_000_000 + 0.5)
    for key in set(totals) | set(micro):
        assert totals.get(key, 0) == micro[key], key


# --- opening ------------------------------------------------------------------------------


async def test_migrations_create_the_latest_version_and_a_second_open_changes_nothing(
    pg_url: str,  # noqa: F811
) -> None:
    # Three processes' worth of opens at once on an empty database: one migrates, the
    # others wait on the advisory lock and find the work done.
    stores = await asyncio.gather(*(open_store(pg_url) for _ in range(3)))
    for store in stores:
        assert store.kind == "postgresql"
        assert await store.schema_version() == LATEST_VERSION == 12
        await store.close()
    rows = await fetch(pg_url, "SELECT version, description FROM schema_version")
    assert [version for version, _ in rows] == [4, 5, 6, 7, 8, 9, 10, 11, 12]
    tables = {
        name
        for (name,) in await fetch(
            pg_url,
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
        )
    }
    assert {"users", "chats", "jobs", "spend_totals", "schema_version", "job_charges"} <= tables
    async with await open_store(pg_url) as store:
        assert await store.schema_version() == LATEST_VERSION
        await store.check_writable()
    assert len(await fetch(pg_url, "SELECT * FROM schema_version")) == len(MIGRATIONS)


async def test_a_newer_schema_is_refused(pg_url: str) -> None:  # noqa: F811
    async with await open_store(pg_url):
        pass
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("INSERT INTO schema_version VALUES (99, 'future', 'x')")
    finally:
        await conn.close()
    with pytest.raises(StoreError, match="newer than this imgbot") as info:
        await open_store(pg_url)
    assert "DATABASE_URL" in str(info.value) and PASSWORD not in str(info.value)


async def test_open_errors_name_database_url_and_never_the_password(
    pg_server: PgServer,  # noqa: F811
) -> None:
    url = pg_server.create_database()
    wrong = "wrong-pw-83c1f0"
    cases = {
        "password": pg_server.dsn(url.rsplit("/", 1)[1], password=wrong),
        "database": pg_server.dsn("no_such_database"),
        "unreachable": f"postgresql://imgbot:{PASSWORD}@127.0.0.1:1/imgbot",
    }
    messages = {}
    for case, dsn in cases.items():
        with pytest.raises(StoreError) as info:
            await PostgresStore.open(dsn, Limits())
        err = info.value
        message = str(err)
        messages[case] = message
        assert "DATABASE_URL" in message and "imgbot:***@127.0.0.1" in message, message
        assert "\n" not in message
        assert wrong not in message and PASSWORD not in message, message
        # Nothing of the driver's error is chained onto it.
        assert err.__cause__ is None and err.__suppress_context__
    assert "refused the user name or password" in messages["password"]
    assert "'no_such_database' does not exist" in messages["database"]
    assert "cannot reach the PostgreSQL server at 127.0.0.1:1" in messages["unreachable"]


async def test_describe_hides_the_password(pg_url: str) -> None:  # noqa: F811
    async with await open_store(pg_url) as store:
        assert store.describe() == pg_url.replace(PASSWORD, "***")
        assert PASSWORD not in repr(store)


# --- concurrency --------------------------------------------------------------------------


async def test_two_pools_reserving_at_once_never_overspend(pg_url: str) -> None:  # noqa: F811
    # Two stores, each with its own pool, as two processes would have: 20 users x 10
    # reservations of 30 against a daily limit of 150 (exactly 5 fit each), in 4 chats whose
    # limit (2,000) and the global one (10,000) are never the tightest.
    limits = dict(user_daily=150, chat_daily=2000, global_daily=10_000)
    first, second = await open_store(pg_url, **limits), await open_store(pg_url, **limits)
    try:
        calls = [
            (first if attempt % 2 else second).reserve(who(str(user), str(-(user % 4))), SPEC, 30)
            for attempt in range(10)
            for user in range(20)
        ]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        granted = [o for o in outcomes if isinstance(o, int)]
        refused = [o for o in outcomes if isinstance(o, LimitExceeded)]
        assert len(granted) + len(refused) == 200, outcomes
        assert len(granted) == 100 and len(set(granted)) == 100
        assert {err.params["scope"] for err in refused} == {"user_daily"}
        assert {err.params["remaining"] for err in refused} == {0.0}
        # Settled below their estimate (20 of 30), each user's jobs leave 50 of room: again
        # exactly 5 of 6 new reservations of 10 fit, from either pool.
        await asyncio.gather(
            *(
                (first, second)[job_id % 2].settle(job_id, 20, Usage(total_tokens=9))
                for job_id in granted
            )
        )
        calls = [
            (first if attempt % 2 else second).reserve(who(str(user), str(-(user % 4))), SPEC, 10)
            for attempt in range(6)
            for user in range(20)
        ]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert sum(isinstance(o, int) for o in outcomes) == 100, outcomes
        assert sum(isinstance(o, LimitExceeded) for o in outcomes) == 20
    finally:
        await first.close()
        await second.close()
    per_user = await fetch(
        pg_url, "SELECT user_key, SUM(charged) FROM jobs GROUP BY user_key ORDER BY 1"
    )
    assert len(per_user) == 20
    assert [spent for _, spent in per_user] == [150.0] * 20
    await assert_totals_match_jobs(pg_url)


CHILD = """
import asyncio, json, os, sys
from datetime import UTC, datetime
from core.errors import LimitExceeded
from core.requester import Requester
from core.store.postgres import PostgresStore
from core.store.records import JobSpec, Limits

SPEC = JobSpec("/img x", "gpt-image-2", "1024x1024", "low", 1, 0, "{}")
NOW = datetime(2025, 3, 15, 12, 0, tzinfo=UTC)


async def main() -> None:
    store = await PostgresStore.open(
        os.environ["IMGBOT_TEST_DSN"], Limits(user_daily=100), clock=lambda: NOW
    )
    # Opened: say so, and wait for the word to start all together.
    print("ready", flush=True)
    sys.stdin.readline()
    granted, refused = [], 0

    async def one(index: int) -> None:
        nonlocal refused
        try:
            job_id = await store.reserve(Requester("telegram", "7", "-1"), SPEC, 1.0)
        except LimitExceeded:
            refused += 1
            return
        granted.append(job_id)
        if index % 2:
            await store.settle(job_id, 1.0, None)

    await asyncio.gather(*(one(index) for index in range(60)))
    await store.close()
    print(json.dumps({"granted": granted, "refused": refused}))


asyncio.run(main())
"""


async def test_three_processes_reserving_at_once_never_overspend(
    pg_url: str,  # noqa: F811
) -> None:
    async with await open_store(pg_url):
        pass  # migrated before the race, so the children only reserve
    env = {**os.environ, "IMGBOT_TEST_DSN": pg_url}
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(3)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            line = await asyncio.wait_for(child.stdout.readline(), 60)
            assert line == b"ready\n", line
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")
        outputs = await asyncio.wait_for(
            asyncio.gather(*(child.communicate() for child in children)), 120
        )
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()
    results = []
    for child, (out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err.decode()
        results.append(json.loads(out))
    granted = [job_id for result in results for job_id in result["granted"]]
    # 180 asked for 1 credit each against a limit of 100: exactly 100 fit, across processes.
    assert len(granted) == len(set(granted)) == 100
    assert sum(result["refused"] for result in results) == 80
    # The processes really raced: more than one got some. (Not necessarily all three: with
    # group commit one process's batch may take all the room left.)
    assert sum(bool(result["granted"]) for result in results) >= 2
    assert await fetch(pg_url, "SELECT COUNT(*), SUM(charged) FROM jobs") == [(100, 100.0)]
    assert await fetch(
        pg_url,
        "SELECT micro_credits FROM spend_totals WHERE scope = 'user_daily' AND key = $1",
        "telegram:7",
    ) == [(100_000_000,)]
    await assert_totals_match_jobs(pg_url)


async def test_a_duplicate_source_from_another_pool_is_one_job(pg_url: str) -> None:  # noqa: F811
    spec = replace(SPEC, source_ref="telegram:-100:42")
    first, second = await open_store(pg_url), await open_store(pg_url)
    try:
        outcomes = await asyncio.gather(
            *(store.reserve(who("1"), spec, 10) for store in (first, second) * 5),
            return_exceptions=True,
        )
    finally:
        await first.close()
        await second.close()
    ids = [o for o in outcomes if isinstance(o, int)]
    duplicates = [o for o in outcomes if isinstance(o, DuplicateJob)]
    assert len(ids) == 1 and len(duplicates) == 9, outcomes
    assert {d.params["job_id"] for d in duplicates} == set(ids)
    assert all(d.params["silent"] for d in duplicates)
    assert await fetch(pg_url, "SELECT COUNT(*) FROM jobs") == [(1,)]


# --- cancellation and lost connections ------------------------------------------------------


@pytest.fixture
async def held_user_lock(pg_url: str) -> AsyncIterator[asyncpg.Connection]:  # noqa: F811
    """A connection in a transaction holding the running total a reservation of telegram:1
    today must update (an uncommitted row of it): the reservation waits until it ends."""
    async with await open_store(pg_url):
        pass
    conn = await asyncpg.connect(pg_url)
    await conn.execute("BEGIN")
    await conn.execute(
        "INSERT INTO spend_totals (scope, key, period, micro_credits)"
        " VALUES ('user_daily', 'telegram:1', $1, 0)",
        DAY,
    )
    try:
        yield conn
    finally:
        if not conn.is_closed():
            if conn.is_in_transaction():
                await conn.execute("ROLLBACK")
            await conn.close()


async def wait_for_waiting_backend(conn: asyncpg.Connection) -> int:
    """Return the pid of the store's backend once it waits for a lock."""
    for _ in range(500):
        pid = await conn.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'imgbot' AND wait_event_type = 'Lock' LIMIT 1"
        )
        if pid is not None:
            return int(pid)
        await asyncio.sleep(0.01)
    raise AssertionError("the store never waited for the lock")


async def test_a_cancelled_reservation_is_released_not_left_counted(
    pg_url: str,  # noqa: F811
    held_user_lock: asyncpg.Connection,
) -> None:
    store = await open_store(pg_url, user_daily=100)
    task = asyncio.create_task(store.reserve(who("1"), SPEC, 60))
    await wait_for_waiting_backend(held_user_lock)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The reservation goes on once the lock is free, writes its job, and gives it back.
    await held_user_lock.execute("COMMIT")
    await store.close()  # waits for the release
    assert await fetch(pg_url, "SELECT status, error_code, charged FROM jobs") == [
        ("failed", "cancelled", 0.0)
    ]
    await assert_totals_match_jobs(pg_url)
    async with await open_store(pg_url, user_daily=100) as store:
        assert (await store.spend_report("telegram:1")).today == 0
        await store.reserve(who("1"), SPEC, 100)  # all the room is there


async def test_dropped_connections_are_replaced_before_anything_is_sent(
    pg_url: str,  # noqa: F811
) -> None:
    async with await open_store(pg_url, user_daily=100) as store:
        job_id = await store.reserve(who("1"), SPEC, 10)
        # The server ends every session of the store (as a restart or a failover would).
        killed = await fetch(
            pg_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'imgbot'",
        )
        assert killed and all(ok for (ok,) in killed)
        await asyncio.sleep(0.2)  # the store's connections see the end of their sockets
        assert (await store.get_job(job_id)).status is JobStatus.RESERVED  # type: ignore[union-attr]
        assert await store.settle(job_id, 8, None)
        assert (await store.spend_report("telegram:1")).today == 8


async def test_a_write_cut_off_midway_is_reported_unknown_not_retried(
    pg_url: str,  # noqa: F811
    held_user_lock: asyncpg.Connection,
) -> None:
    async with await open_store(pg_url, user_daily=100) as store:
        task = asyncio.create_task(store.reserve(who("1"), SPEC, 10))
        pid = await wait_for_waiting_backend(held_user_lock)
        # The connection dies while the reservation is on the server: it was sent, and
        # whether it committed cannot be known from here, so it must not run twice.
        await held_user_lock.execute("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises(StoreError, match="unknown") as info:
            await task
        assert PASSWORD not in str(info.value)
        await held_user_lock.execute("COMMIT")
        assert await fetch(pg_url, "SELECT COUNT(*) FROM jobs") == [(0,)]
        # The store carries on with a new connection.
        assert await store.reserve(who("1"), SPEC, 10) > 0


async def test_a_read_only_database_opens_but_is_not_writable(
    pg_server: PgServer,  # noqa: F811
) -> None:
    url = pg_server.create_database()
    async with await open_store(url) as store:
        await store.check_writable()
    name = url.rsplit("/", 1)[1]
    await fetch(
        pg_server.dsn("postgres"), f'ALTER DATABASE "{name}" SET default_transaction_read_only = on'
    )
    async with await open_store(url) as store:
        assert await store.schema_version() == LATEST_VERSION
        with pytest.raises(StoreError, match="does not accept writes") as info:
            await store.check_writable()
        assert "DATABASE_URL" in str(info.value) and PASSWORD not in str(info.value)


# --- copies -------------------------------------------------------------------------------


async def fill(store: PostgresStore) -> None:
    """Users, chats and jobs in every state, with overrides, flags and a source ref; API keys,
    one revoked and one for a user who has not drawn yet."""
    await store.create_api_key("telegram:1", "laptop")
    revoked, _ = await store.create_api_key("telegram:1", "old")
    await store.revoke_api_key(revoked)
    await store.create_api_key("web:alice")
    await store.set_user_limits("telegram:1", 500, None)
    await store.set_chat_limit("telegram:-5", 900)
    await store.set_language("telegram:2", "zh")
    await store.set_blocked("telegram:666", True)
    done = await store.reserve(who("1", "-5", name="Ann"), SPEC, 40)
    await store.mark_started(done)
    await store.settle(done, 38.5, Usage(image_output_tokens=272, total_tokens=300))
    await store.set_result_refs(done, ["file-1", "file-2"])
    over = await store.reserve(who("1", "-5"), SPEC, 10)
    await store.settle(over, 12.5, Usage(total_tokens=12))  # charged 10, flagged
    await store.fail(await store.reserve(who("2"), SPEC, 5), "bad_usage", 1, flag="usage_invalid")
    charged_failure = await store.reserve(who("2", "-5"), SPEC, 20)
    await store.fail(charged_failure, "timeout", 3.25, Usage(total_tokens=9))
    await store.fail(await store.reserve(who("2"), SPEC, 20), "moderation")
    unsettled = await store.reserve(who("3", "-6"), SPEC, 12.5)
    await store.mark_unsettled(unsettled)
    refunded = await store.reserve(who("3"), SPEC, 7)
    await store.settle(refunded, 7, None)
    await store.refund(refunded, "telegram:1")
    await store.reserve(who("4", "-6"), replace(SPEC, source_ref="telegram:-6:77"), 5)
    # Prepaid credits: a grant, a purchase, a job paid from the balance.
    await store.grant_credits("telegram:4", 1000, by="telegram:1")
    await store.record_purchase(
        "telegram:4", provider="telegram_stars", charge_id="stx-1", provider_charge_id="p-1",
        pack="pack:50:20000", amount=50, currency="XTR", credits=20_000,
    )
    paid = await store.reserve(who("4"), replace(SPEC, prepaid=True), 300)
    await store.settle(paid, 250.25, None)
    # Names admins may use; and the web door's sign-ins and kept files, which no copy moves.
    await store.note_username("telegram", "Ann", "telegram:1")
    await store.note_username("discord", "ann.b", "discord:77")
    await store.open_session("telegram:1", "telegram", 3600)
    await store.new_link_code(3600)
    await store.keep_files(done, "telegram:1", [FileToKeep("x.png", b"png", "image/png", 1, 1)],
                           3600, 1000)


async def test_a_copy_between_two_databases_keeps_ids_and_totals(
    pg_server: PgServer,  # noqa: F811
) -> None:
    source_url, target_url = pg_server.create_database(), pg_server.create_database()
    source, target = await open_store(source_url), await open_store(target_url)
    try:
        await fill(source)
        # Ids with a gap, as refused duplicates and rolled-back writes leave.
        await fetch(source_url, "SELECT setval(pg_get_serial_sequence('jobs', 'id'), 40)")
        await source.reserve(who("5"), SPEC, 1)
        await fetch(source_url, "SELECT setval(pg_get_serial_sequence('api_keys', 'id'), 20)")
        gap_key, plaintext = await source.create_api_key("web:bob", "after a gap")
        assert gap_key == 21
        assert await target.is_empty()
        async with source.snapshot() as reader:
            counts = await reader.counts()
            user_totals = await reader.user_totals()
            for table, key in COPY_TABLES:
                async for page in iterate_rows(reader, table, key, batch=3):
                    assert "charged" not in page[0] and "charged_micro" not in page[0]
                    await target.load_rows(table, page)
        assert not await target.is_empty()
        async with target.snapshot() as reader:
            assert await reader.counts() == counts == {
                "users": 6,
                "api_keys": 4,
                "chats": 3,
                "jobs": 10,
                "purchases": 1,
                "credit_entries": 2,
                "usernames": 2,
                "kept_results": 0,  # fill keeps none (tests/test_store.py copies some)
            }
            assert await reader.user_totals() == user_totals
        for table, key in COPY_TABLES:
            query = f"SELECT * FROM {table} ORDER BY {key}"  # noqa: S608 - fixed names
            assert await fetch(target_url, query) == await fetch(source_url, query), table
        totals = "SELECT * FROM spend_totals WHERE micro_credits <> 0 ORDER BY 1, 2, 3"
        assert await fetch(target_url, totals) == await fetch(source_url, totals)
        # Balances are rebuilt from the copied entries and prepaid jobs, not copied.
        assert await target.balance("telegram:4") == await source.balance("telegram:4") == 20_749.75
        # A payment copied is a payment known: delivered again, it credits nothing.
        _, created = await target.record_purchase(
            "telegram:4", provider="telegram_stars", charge_id="stx-1", provider_charge_id="p-1",
            pack="pack:50:20000", amount=50, currency="XTR", credits=20_000,
        )
        assert not created
        await assert_totals_match_jobs(target_url)
        for (job_id,) in await fetch(source_url, "SELECT id FROM jobs"):
            assert await target.get_job(job_id) == await source.get_job(job_id)
        # New jobs in the copy get ids above every copied one.
        assert await target.reserve(who("1"), SPEC, 1) == 42
        # Keys still open their accounts, a revoked one stays shut, new keys come after.
        assert await target.list_api_keys() == await source.list_api_keys()
        assert await target.api_key_user(plaintext) == "web:bob"
        assert [k.active for k in await target.list_api_keys("telegram:1")] == [True, False]
        assert (await target.create_api_key("web:bob"))[0] == 22
        flagged = {(j.usage_flag, j.reported_credits) for j in await target.flagged_jobs(START)}
        assert flagged == {("over_estimate", 12.5), ("usage_invalid", None)}
        assert await target.is_blocked("telegram:666", None)
        assert await target.find_username("telegram", "ann") == "telegram:1"
        for table in ("web_sessions", "web_files", "marks"):
            assert await fetch(target_url, f"SELECT * FROM {table}") == [], table  # noqa: S608
    finally:
        await source.close()
        await target.close()


async def test_rows_from_sqlite_load_as_they_are(pg_url: str) -> None:  # noqa: F811
    # SQLite hands back an int for a whole REAL and 0/1 for flags; a copy takes them as is.
    async with await open_store(pg_url, user_daily=10) as store:
        now = START.isoformat(timespec="microseconds")
        await store.load_rows(
            "users",
            [
                dict(
                    user_key="telegram:9",
                    platform="telegram",
                    user_id="9",
                    display_name="Zoe",
                    language=None,
                    daily_limit=25,
                    monthly_limit=None,
                    blocked=0,
                    created_at=now,
                    updated_at=now,
                ),
            ],
        )
        await store.load_rows(
            "jobs",
            [
                dict(
                    id=7,
                    user_key="telegram:9",
                    chat_key=None,
                    platform="telegram",
                    display_name="Zoe",
                    command_text="/img",
                    request_json="{}",
                    model="gpt-image-2",
                    size="1024x1024",
                    quality="low",
                    n=1,
                    reference_count=0,
                    status="succeeded",
                    estimated_credits=5,
                    actual_credits=4,
                    usage_json=None,
                    error_code=None,
                    created_at=now,
                    started_at=None,
                    finished_at=now,
                    result_refs="[]",
                    refunded_by=None,
                    refunded_at=None,
                    source_ref=None,
                ),
            ],
        )
        user = await store.get_user("telegram:9")
        assert user is not None and user.daily_limit == 25.0 and not user.blocked
        report = await store.spend_report("telegram:9")
        assert (report.today, report.daily_remaining) == (4.0, 21.0)
        assert await store.reserve(who("9"), SPEC, 21) == 8
        with pytest.raises(ValueError, match="not a table"):
            await store.load_rows("spend_totals", [{"scope": "x"}])


def test_the_copy_statements_list_the_copied_columns_in_order() -> None:
    from core.store import postgres

    def columns(sql: str) -> list[str]:
        listed = sql.split("SELECT ", 1)[1].split(" FROM ")[0] if "SELECT" in sql else sql
        if sql.startswith("INSERT"):
            listed = sql.split("(", 1)[1].split(")")[0]
        return [name.strip() for name in listed.split(",")]

    for table, page, load in (
        ("users", postgres._PAGE_USERS, postgres._LOAD_USERS),
        ("api_keys", postgres._PAGE_API_KEYS, postgres._LOAD_API_KEYS),
        ("chats", postgres._PAGE_CHATS, postgres._LOAD_CHATS),
        ("jobs", postgres._PAGE_JOBS, postgres._LOAD_JOBS),
        ("purchases", postgres._PAGE_PURCHASES, postgres._LOAD_PURCHASES),
        ("credit_entries", postgres._PAGE_CREDIT_ENTRIES, postgres._LOAD_CREDIT_ENTRIES),
        ("usernames", postgres._PAGE_USERNAMES, postgres._LOAD_USERNAMES),
    ):
        names = [name for name, _ in postgres._COPY_COLUMNS[table]]
        assert columns(page) == names == columns(load), table
    assert list(postgres._COPY_COLUMNS) == [table for table, _ in COPY_TABLES]


async def test_rows_carry_every_column_but_the_generated_ones(pg_url: str) -> None:  # noqa: F811
    async with await open_store(pg_url) as store:
        await fill(store)
        async with store.snapshot() as reader:
            for table, _ in COPY_TABLES:
                (row, *_) = await reader.rows(table, limit=1)
                stored = await fetch(
                    pg_url,
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_name = $1 AND is_generated = 'NEVER' ORDER BY ordinal_position",
                    table,
                )
                assert list(row) == [name for (name,) in stored], table


# --- group commit ---------------------------------------------------------------------------


async def xmins(url: str) -> int:
    """How many transactions wrote the jobs' current rows."""
    return len(await fetch(url, "SELECT DISTINCT xmin::text FROM jobs"))


async def test_calls_made_at_once_share_one_commit_and_keep_their_order(
    pg_url: str,  # noqa: F811
) -> None:
    async with await open_store(pg_url, user_daily=150, chat_daily=10_000) as store:
        # The first call goes alone; the others queue meanwhile and go in one batch,
        # checked in the order they were made: exactly the first five of user 1 fit.
        calls = [store.reserve(who("1", "-1"), SPEC, 30) for _ in range(10)]
        calls += [store.reserve(who(str(user), str(-(user % 3))), SPEC, 1) for user in range(2, 50)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(o, int) for o in outcomes[:5]), outcomes
        assert all(isinstance(o, LimitExceeded) for o in outcomes[5:10]), outcomes
        assert all(isinstance(o, int) for o in outcomes[10:]), outcomes
        granted = [o for o in outcomes if isinstance(o, int)]
        assert granted == sorted(granted)
        assert await xmins(pg_url) <= 3
        # Starts, settles and fails of many jobs at once: a few commits, not one each.
        started = await asyncio.gather(*(store.mark_started(j) for j in granted))
        assert all(started)
        finished = await asyncio.gather(
            *(
                store.settle(j, 0.5, None) if k % 2 else store.fail(j, "timeout")
                for k, j in enumerate(granted)
            )
        )
        assert all(finished)
        assert await xmins(pg_url) <= 6
        # Calls on one job keep their order: the second start waits for the settle.
        job_id = await store.reserve(who("2"), SPEC, 10)
        assert await asyncio.gather(
            store.mark_started(job_id),
            store.settle(job_id, 4, None),
            store.mark_started(job_id),
            store.fail(job_id, "late"),
        ) == [True, True, False, False]
        job = await store.get_job(job_id)
        assert job is not None and job.status is JobStatus.SUCCEEDED and job.started_at
    await assert_totals_match_jobs(pg_url)


async def test_a_call_the_database_refuses_fails_alone(pg_url: str) -> None:  # noqa: F811
    # A NUL character is no text PostgreSQL can store: the batch it is in is refused whole,
    # then written call by call, and only that call fails.
    bad = replace(SPEC, command_text="/img a \x00 cat")
    async with await open_store(pg_url, user_daily=100) as store:
        first = await store.reserve(who("1"), SPEC, 10)
        outcomes = await asyncio.gather(
            store.settle(first, 5, None),
            *(store.reserve(who(str(k)), bad if k == 3 else SPEC, 10) for k in range(6)),
            return_exceptions=True,
        )
        assert outcomes[0] is True
        assert isinstance(outcomes[4], StoreError), outcomes
        assert "database error" in str(outcomes[4]) and PASSWORD not in str(outcomes[4])
        others = outcomes[1:4] + outcomes[5:]
        assert all(isinstance(o, int) for o in others), outcomes
    assert await fetch(pg_url, "SELECT COUNT(*) FROM jobs") == [(6,)]
    await assert_totals_match_jobs(pg_url)


async def test_a_batch_cut_off_midway_fails_every_call_as_unknown(
    pg_url: str,  # noqa: F811
    held_user_lock: asyncpg.Connection,
) -> None:
    async with await open_store(pg_url, user_daily=100) as store:
        first = asyncio.create_task(store.reserve(who("1"), SPEC, 10))
        pid = await wait_for_waiting_backend(held_user_lock)
        # Queued while the first batch waits: they go together in the next one.
        rest = [asyncio.create_task(store.reserve(who(str(k)), SPEC, 10)) for k in range(1, 6)]
        await asyncio.sleep(0.05)
        await held_user_lock.execute("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises(StoreError, match="unknown"):
            await first
        for _ in range(500):
            second = await wait_for_waiting_backend(held_user_lock)
            if second != pid:
                break
            await asyncio.sleep(0.01)
        assert second != pid
        await held_user_lock.execute("SELECT pg_terminate_backend($1)", second)
        outcomes = await asyncio.gather(*rest, return_exceptions=True)
        assert all(isinstance(o, StoreError) and "unknown" in str(o) for o in outcomes), outcomes
        await held_user_lock.execute("COMMIT")
        assert await fetch(pg_url, "SELECT COUNT(*) FROM jobs") == [(0,)]
        assert await store.reserve(who("1"), SPEC, 10) > 0


async def test_two_pools_writing_many_users_and_chats_never_deadlock(
    pg_url: str,  # noqa: F811
) -> None:
    # Batches from two pools (two processes' worth) touch many users' and chats' totals, in
    # every order: each batch locks them in the one order first, so none waits in a cycle
    # (the server would detect it, and count it, before the store retried).
    limits = dict(user_daily=10_000, chat_daily=50_000, global_daily=1_000_000)
    stores = [await open_store(pg_url, **limits), await open_store(pg_url, **limits)]

    async def user(k: int) -> None:
        for round_ in range(6):
            store = stores[(k + round_) % 2]
            job_id = await store.reserve(who(str(k % 23), str(-(k * 7 % 5))), SPEC, 10)
            if round_ % 3 == 2:
                await store.fail(job_id, "timeout", 2)
            else:
                await store.settle(job_id, 9.5, None)

    try:
        await asyncio.gather(*(user(k) for k in range(120)))
    finally:
        for store in stores:
            await store.close()
    assert await fetch(pg_url, "SELECT COUNT(*) FROM jobs") == [(720,)]
    await assert_totals_match_jobs(pg_url)
    await asyncio.sleep(0.5)  # closed sessions report their statistics
    assert await fetch(
        pg_url, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    ) == [(0,)]


# --- schema 5 -------------------------------------------------------------------------------


async def test_a_version_4_database_is_upgraded_in_place(pg_url: str) -> None:  # noqa: F811
    conn = await asyncpg.connect(pg_url)
    try:
        async with conn.transaction():
            await conn.execute(SCHEMA_VERSION_DDL)
            for statement in MIGRATIONS[0].statements:
                await conn.execute(statement)
            await conn.execute("INSERT INTO schema_version VALUES (4, 'baseline', 'x')")
        # A job reserved before the upgrade (its trigger counts it in the totals).
        now = START.isoformat(timespec="microseconds")
        await conn.execute(
            "INSERT INTO users (user_key, platform, user_id, display_name, created_at,"
            " updated_at) VALUES ('telegram:1', 'telegram', '1', 'Ann', $1, $1)",
            now,
        )
        old_job = await conn.fetchval(
            "INSERT INTO jobs (user_key, platform, display_name, command_text, request_json,"
            " model, size, quality, n, reference_count, status, estimated_credits, created_at)"
            " VALUES ('telegram:1', 'telegram', 'Ann', '/img', '{}', 'gpt-image-2',"
            " '1024x1024', 'low', 1, 0, 'reserved', 40, $1) RETURNING id",
            now,
        )
    finally:
        await conn.close()
    async with await open_store(pg_url, user_daily=100) as store:
        assert await store.schema_version() == LATEST_VERSION
        job = await store.get_job(old_job)
        assert job is not None and job.reported_credits is None and job.usage_flag is None
        # Usage above the estimate: charged the estimate, the rest kept and flagged.
        assert await store.settle(old_job, 55, Usage(total_tokens=3))
        job = await store.get_job(old_job)
        assert job is not None
        assert (job.actual_credits, job.reported_credits, job.usage_flag) == (
            40,
            55,
            "over_estimate",
        )
        assert [j.id for j in await store.flagged_jobs(START)] == [old_job]
        assert (await store.spend_report("telegram:1")).today == 40
    columns = await fetch(
        pg_url,
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_name = 'jobs' AND column_name IN ('reported_credits', 'usage_flag')"
        " ORDER BY 1",
    )
    assert columns == [("reported_credits", "double precision"), ("usage_flag", "text")]
    assert await fetch(
        pg_url,
        "SELECT indexdef LIKE '%WHERE (usage_flag IS NOT NULL)' FROM pg_indexes"
        " WHERE indexname = 'jobs_flagged_created'",
    ) == [(True,)]
    await assert_totals_match_jobs(pg_url)
