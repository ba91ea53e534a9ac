"""Operating the store as an operator does: `imgbot backup`, `imgbot db copy`, `db upgrade`,
`doctor`, and one clear line for a bad DATABASE_URL — real processes, real files, a real
PostgreSQL server."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from core.pricing import Usage
from core.requester import Requester
from core.store import JobSpec, Limits, Store, open_store
from core.store.web import FileToKeep
from core.types import GeneratedImage
from tests.pg_server import PASSWORD, PgServer, pg_server, pg_url  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SPEC = JobSpec("low a cat", "gpt-image-2", "1024x1024", "low", 1, 0, "{}")
USAGE = Usage(text_input_tokens=12, image_output_tokens=196)


def imgbot(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the imgbot command as an operator would, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "bots.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": "sk-test", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


async def fill(store: Store, jobs: int, *, users: int = 7) -> None:
    """Jobs in every state, for several users in a few chats; some with odd float costs."""
    for i in range(jobs):
        who = Requester("telegram", str(i % users), str(-(i % 3)) if i % 2 else None, f"U{i % users}")
        job = await store.reserve(who, SPEC, 560.0 + i % 5)
        kind = i % 6
        if kind in (0, 1, 2):
            await store.settle(job, 557.0 + (i % 3) / 7, USAGE)
        elif kind == 3:
            await store.fail(job, "moderation", 12.5, USAGE)
        elif kind == 4:
            await store.mark_started(job)
            await store.mark_unsettled(job)
            if i % 12 == 4:
                await store.refund(job, by="cli:root")
        # kind 5 stays reserved
    await store.set_user_limits("telegram:1", 9e9, None)
    await store.set_chat_limit("telegram:-1", 7e9)
    await store.set_blocked("telegram:6", True)


async def summary(store: Store) -> tuple[dict[str, int], dict[str, float], list[object]]:
    """What must survive a copy; credits to 1e-6 (float sums in another order differ in the
    last bits)."""
    async with store.snapshot() as reader:
        counts = await reader.counts()
        totals = {user: round(total, 6) for user, total in (await reader.user_totals()).items()}
    since = datetime(2000, 1, 1, tzinfo=UTC)
    extras = [
        [(s.user_key, s.display_name, round(s.credits, 6), s.jobs) for s in await store.top_spenders(since, 50)],
        [(c.chat_key, round(c.credits, 6), c.jobs) for c in await store.chat_totals(since)],
        await store.get_user("telegram:1"),
        await store.get_chat("telegram:-1"),
        await store.is_blocked("telegram:6", None),
        [j.id for j in await store.list_unsettled()],
        await store.list_api_keys(),
    ]
    return counts, totals, extras


async def make_keys(store: Store) -> tuple[str, str]:
    """Three personal keys, the middle one revoked; return the live and the revoked key."""
    await store.create_api_key("telegram:1", "laptop")
    revoked_id, revoked = await store.create_api_key("telegram:1", "old")
    _, live = await store.create_api_key("web:alice", "script")
    assert await store.revoke_api_key(revoked_id)
    return live, revoked


async def assert_keys_work(url: str, live: str, revoked: str) -> None:
    """The copied keys open what they did, and a new key gets an id above the copied ones."""
    store = await open_store(url, Limits())
    try:
        assert await store.api_key_user(live) == "web:alice"
        assert await store.api_key_user(revoked) is None
        keys = await store.list_api_keys()
        assert [(k.user_key, k.name, k.active) for k in keys][:3] == [
            ("telegram:1", "laptop", True),
            ("telegram:1", "old", False),
            ("web:alice", "script", True),
        ]
        new_id, new = await store.create_api_key("web:new")
        assert new_id > max(k.id for k in keys)
        assert await store.api_key_user(new) == "web:new"
    finally:
        await store.close()


# --- backups ---------------------------------------------------------------------------------


async def test_a_backup_into_the_live_databases_folder_never_replaces_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    live = data / "imgbot.db"
    store = await open_store(f"sqlite:///{live}", Limits())
    try:
        await fill(store, 30)
        before = await summary(store)
    finally:
        await store.close()
    env = {"DATABASE_URL": f"sqlite:///{live}"}
    # Round 1's defect: the folder was expanded to a file name after the live-file check.
    for target in (str(data), str(data) + "/", "data", str(live), f"{live}-wal"):
        done = imgbot("backup", target, cwd=tmp_path, **env)
        assert done.returncode == 1, (target, done.stdout, done.stderr)
        assert "live database" in done.stderr and "Traceback" not in done.stderr
    store = await open_store(f"sqlite:///{live}", Limits())
    try:
        assert await summary(store) == before
    finally:
        await store.close()
    assert not list(data.glob("*.part"))


async def test_ledger_and_backup_files_are_private(tmp_path: Path) -> None:
    live = tmp_path / "fresh" / "imgbot.db"
    store = await open_store(f"sqlite:///{live}", Limits())
    try:
        await fill(store, 5)
    finally:
        await store.close()
    assert stat.S_IMODE(live.stat().st_mode) == 0o600
    assert stat.S_IMODE(live.parent.stat().st_mode) == 0o700
    done = imgbot("backup", "backups/", cwd=tmp_path, DATABASE_URL=f"sqlite:///{live}")
    assert done.returncode == 0, done.stderr
    copy = tmp_path / "backups" / "imgbot.db"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert stat.S_IMODE(copy.parent.stat().st_mode) == 0o700


async def test_a_backup_keeps_the_usernames_and_results_to_deliver_but_no_sign_in_or_kept_file(
    tmp_path: Path,
) -> None:
    live = tmp_path / "data" / "imgbot.db"
    who = Requester("telegram", "1", None, "Ann")
    picture = GeneratedImage(os.urandom(1_000_000), "image/png", 1, 1)
    store = await open_store(f"sqlite:///{live}", Limits())
    try:
        await fill(store, 12)
        await store.note_username("telegram", "Ann", "telegram:1")
        token = await store.open_session("telegram:1", "telegram", 3600)
        code = await store.new_link_code(3600)
        await store.mark_once("tg:update:5", 3600)
        images = [FileToKeep(f"{n}.png", os.urandom(1_000_000), "image/png", 1, 1)
                  for n in range(3)]
        await store.keep_files(1, "telegram:1", images, 3600, 10**9)
        # KEEP_RESULTS=ledger: one result still to deliver, one delivered (kept a while).
        waiting, delivered = [await store.reserve(who, SPEC, 600) for _ in range(2)]
        for job in (waiting, delivered):
            await store.settle(job, 500, USAGE)
            await store.keep_result(job, (picture,) * 2, revised_prompt=None, elapsed=1.0)
        assert await store.finish_delivery(delivered, "", True)
    finally:
        await store.close()
    done = imgbot("backup", "backups/", cwd=tmp_path, DATABASE_URL=f"sqlite:///{live}")
    assert done.returncode == 0, done.stderr
    copy = tmp_path / "backups" / "imgbot.db"
    # The 3 MB of kept files and the delivered job's 2 MB are gone and their space given
    # back; the 2 MB a drawn job waits for stay.
    assert 2_000_000 < copy.stat().st_size < 3_000_000 < 7_000_000 < live.stat().st_size
    with sqlite3.connect(copy) as db:
        for table in ("web_sessions", "web_files"):
            assert db.execute(f"SELECT COUNT(*) FROM {table}").fetchone() == (0,)  # noqa: S608
        assert db.execute("SELECT key FROM marks").fetchall() == [("tg:update:5",)]
    restored = await open_store(f"sqlite:///{copy}", Limits())
    try:
        assert await restored.find_username("telegram", "ann") == "telegram:1"
        assert await restored.get_session(token) is None
        assert not await restored.spend_link_code(code)
        assert await restored.kept_file("0.png") is None
        # The drawn job is delivered from the restored backup.
        kept = await restored.kept_result(waiting)
        assert kept is not None and kept.images == (picture, picture)
        assert await restored.kept_result(delivered) is None
    finally:
        await restored.close()
    store = await open_store(f"sqlite:///{live}", Limits())  # the live ledger keeps them
    try:
        assert await store.get_session(token) is not None
        assert await store.kept_file("0.png") is not None
        assert await store.kept_result(delivered) is not None
    finally:
        await store.close()


async def test_a_postgresql_backup_is_one_consistent_sqlite_file_that_restores(
    tmp_path: Path, pg_server: PgServer  # noqa: F811
) -> None:
    source_url = pg_server.create_database()
    store = await open_store(source_url, Limits())
    stop = asyncio.Event()
    try:
        await fill(store, 60)
        live, revoked = await make_keys(store)

        async def writer() -> int:
            written = 0
            while not stop.is_set():
                await fill(store, 6)
                written += 6
            return written

        task = asyncio.create_task(writer())
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bots.cli",
            "backup",
            str(tmp_path / "pg-backup.db"),
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": "x", "DATABASE_URL": source_url},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        stop.set()
        written = await task
        assert process.returncode == 0, err.decode()
        assert "backup written" in out.decode() and PASSWORD not in out.decode() + err.decode()
    finally:
        stop.set()
        await store.close()
    backup = tmp_path / "pg-backup.db"
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    with sqlite3.connect(backup) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        jobs = db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        assert db.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0] == 3
    assert 60 <= jobs <= 60 + written
    # Restore it into a fresh PostgreSQL database: the same ledger as the snapshot.
    restored_url = pg_server.create_database()
    done = imgbot("db", "copy", f"sqlite:///{backup}", restored_url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "match" in done.stdout and PASSWORD not in done.stdout
    snapshot = await open_store(f"sqlite:///{backup}", Limits())
    restored = await open_store(restored_url, Limits())
    try:
        assert await summary(snapshot) == await summary(restored)
    finally:
        await snapshot.close()
        await restored.close()
    await assert_keys_work(restored_url, live, revoked)


# --- db copy ---------------------------------------------------------------------------------


async def test_db_copy_moves_a_busy_sqlite_ledger_to_postgresql_and_back(
    tmp_path: Path, pg_server: PgServer  # noqa: F811
) -> None:
    live = tmp_path / "data" / "imgbot.db"
    store = await open_store(f"sqlite:///{live}", Limits(user_daily=10**9))
    await fill(store, 300)
    key, revoked = await make_keys(store)
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            await fill(store, 6)

    task = asyncio.create_task(writer())
    target = pg_server.create_database()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bots.cli", "db", "copy", f"sqlite:///{live}", target,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": "x"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
    finally:
        stop.set()
        await task
        await store.close()
    assert process.returncode == 0, err.decode()
    assert "row counts and" in out.decode() and "match" in out.decode()
    assert " 3 api_keys," in out.decode()
    assert PASSWORD not in out.decode() + err.decode()
    copied = await open_store(target, Limits())
    try:
        counts, totals, _ = await summary(copied)
        assert counts["jobs"] >= 300
        # The next job gets an id above every copied one (the identity moved on).
        async with copied.snapshot() as reader:
            top = max(int(r["id"]) for r in await reader.rows("jobs", limit=100_000))
        new = await copied.reserve(Requester("telegram", "new"), SPEC, 1.0)
        assert new > top
        await copied.fail(new, "cancelled")
    finally:
        await copied.close()
    await assert_keys_work(target, key, revoked)
    # ...and back into a new SQLite file: the same ledger again.
    back = tmp_path / "back" / "imgbot.db"
    done = imgbot("db", "copy", target, f"sqlite:///{back}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    a = await open_store(target, Limits())
    b = await open_store(f"sqlite:///{back}", Limits())
    try:
        assert await summary(a) == await summary(b)
    finally:
        await a.close()
        await b.close()
    # Four keys now (one made in PostgreSQL); SQLite's AUTOINCREMENT counter followed them.
    await assert_keys_work(f"sqlite:///{back}", key, revoked)
    # A target that already holds a ledger is refused, and left as it was.
    done = imgbot("db", "copy", f"sqlite:///{live}", f"sqlite:///{back}", cwd=tmp_path)
    assert done.returncode == 2 and "empty" in done.stderr and "Traceback" not in done.stderr


# --- one clear line ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["usage"], ["admin", "top"], ["gen", "a cat"], ["run"], ["db", "upgrade"]])
def test_a_wrong_password_gives_one_line_from_every_command(
    tmp_path: Path, pg_server: PgServer, command: list[str]  # noqa: F811
) -> None:
    url = pg_server.create_database()
    wrong = url.replace(f":{PASSWORD}@", ":not-the-password@")
    assert wrong != url
    done = imgbot(*command, cwd=tmp_path, DATABASE_URL=wrong, TELEGRAM_BOT_TOKEN="1:x")
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "DATABASE_URL" in lines[0], done.stderr
    assert "not-the-password" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    "url",
    ["mysql://x/y", "sqlite:///", "postgresql://", "postgres://u:pw@host:notaport/db"],
)
def test_a_malformed_database_url_gives_one_line(tmp_path: Path, url: str) -> None:
    done = imgbot("usage", cwd=tmp_path, DATABASE_URL=url)
    assert done.returncode == 2
    assert "DATABASE_URL" in done.stderr and "Traceback" not in done.stderr
    assert ":pw@" not in done.stderr


def test_doctor_checks_either_store(tmp_path: Path, pg_server: PgServer) -> None:  # noqa: F811
    url = pg_server.create_database()
    for database_url, kind in ((url, "postgresql"), (f"sqlite:///{tmp_path}/d/x.db", "sqlite")):
        done = imgbot("doctor", cwd=tmp_path, DATABASE_URL=database_url)
        line = next(line for line in done.stdout.splitlines() if "database" in line)
        assert "ok" in line and f"({kind})" in line and "schema v" in line, done.stdout
        assert PASSWORD not in done.stdout + done.stderr
    wrong = url.replace(f":{PASSWORD}@", ":nope@")
    done = imgbot("doctor", cwd=tmp_path, DATABASE_URL=wrong)
    line = next(line for line in done.stdout.splitlines() if "database" in line)
    assert "ok" not in line.split(":")[1][:4] and "nope" not in done.stdout
