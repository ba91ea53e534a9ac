"""`imgbot backup PATH`: a consistent copy of the ledger, safe while the bot writes to it.

SQLite: the ledger runs in WAL mode, so recent commits live in `imgbot.db-wal` until a
checkpoint moves them into `imgbot.db`; copying the files is not a backup (the `.db` alone
misses those commits, and a `.db` and `-wal` copied a moment apart can pair pages from
different points in time). SQLite's online backup API reads one snapshot under a read
transaction, so writers go on and the copy is exactly the database as of one commit.
This module and the migrations are the only places that use `sqlite3` directly: aiosqlite
has no call for the backup API.

PostgreSQL: the whole ledger is read in one REPEATABLE READ transaction (one snapshot) and
written into a new SQLite file — a portable, self-contained backup that
`imgbot db copy backup.db postgresql://…` restores. (`pg_dump` works too, for operators who
prefer it.)

Either way the copy is written beside PATH as a 0600 file, checked with
`PRAGMA integrity_check`, switched to a single self-contained file (no -wal), then renamed
into place, so PATH is never a half-written file, and never the live database.

A backup holds no web sign-ins and no kept result files (as `imgbot db copy` moves none):
restoring one must not bring back a page session signed out since, or a sign-in code spent
since, and the files are an hour's cache of up to URL_CACHE_BYTES. Of the results kept in
the ledger (KEEP_RESULTS=ledger) it holds those of the jobs still waiting to be delivered,
which a restored backup delivers; the others are kept only for RESULT_RETENTION_HOURS. The
SQLite copy has the rest deleted (and its space given back) before it is checked.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from core.store import Limits, StoreError, StoreURL, open_store
from core.store.copy import copy_store
from core.store.web import LINK_MARK_PREFIX

BUSY_TIMEOUT_S = 30.0
_SIDE_FILES = ("-wal", "-shm", "-journal")


class BackupError(Exception):
    """The backup could not be made; the message says why."""


@dataclass(frozen=True)
class BackupReport:
    """What a finished backup holds."""

    path: Path
    jobs: int
    size: int


def _target_file(source_name: str, target: str | os.PathLike[str]) -> Path:
    dest = Path(target).expanduser()
    # An existing folder, or a path written as one ("backups/"), takes the copy inside.
    if dest.is_dir() or os.fspath(target).endswith(("/", os.sep)):
        dest = dest / source_name
    return dest


def _refuse_live(src_path: Path, dest: Path) -> None:
    """Refuse a target that is the live database or one of its side files."""
    live = src_path.resolve()
    candidates = {live, *(live.with_name(live.name + side) for side in _SIDE_FILES)}
    if dest.resolve() in candidates or (dest.exists() and dest.samefile(src_path)):
        raise BackupError(f"{dest}: that is the live database; choose another path")


def _prepare_part(dest: Path) -> Path:
    if not dest.parent.exists():
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    part.unlink(missing_ok=True)
    # 0600 from the start: a backup holds every prompt, user id and name.
    os.close(os.open(part, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    return part


def _forget_web_state(copy: sqlite3.Connection) -> None:
    """Delete the web door's sessions, sign-in codes and kept files from a copy, and the
    kept results no job waits for."""
    tables = {row[0] for row in copy.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "web_sessions" not in tables:
        return  # a ledger from before schema 10 has none
    with copy:
        copy.execute("DELETE FROM web_sessions")
        copy.execute("DELETE FROM marks WHERE substr(key, 1, ?) = ?",
                     (len(LINK_MARK_PREFIX), LINK_MARK_PREFIX))
        images = copy.execute("DELETE FROM web_files").rowcount
        if "kept_results" in tables:  # schema 11 on
            images += _forget_delivered_results(copy)
    if images:
        copy.execute("VACUUM")  # megabytes of images: give the space back


def _forget_delivered_results(copy: sqlite3.Connection) -> int:
    """Delete the kept results of jobs that are not waiting to be delivered; count images."""
    images = copy.execute(
        "DELETE FROM kept_result_images WHERE job_id NOT IN"
        " (SELECT id FROM jobs WHERE stage = 'drawn')"
    ).rowcount
    copy.execute(
        "DELETE FROM kept_results WHERE job_id NOT IN (SELECT id FROM jobs WHERE stage = 'drawn')"
    )
    return images


def _check_and_seal(part: Path) -> int:
    """Check the copy, make it one self-contained file, and return its job count."""
    copy = sqlite3.connect(part)
    try:
        copy.execute("PRAGMA journal_mode = DELETE")
        _forget_web_state(copy)
        problems = [row[0] for row in copy.execute("PRAGMA integrity_check")]
        if problems != ["ok"]:
            raise BackupError(f"the copy failed its integrity check: {problems[:3]}")
        return int(copy.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
    finally:
        copy.close()


def backup_database(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> BackupReport:
    """Copy the SQLite database at `source` to `target` as one consistent, checked file."""
    src_path = Path(source)
    if not src_path.is_file():
        raise BackupError(f"{src_path}: no database there (check DATABASE_URL)")
    # The folder is expanded to a file name before the live-file check, never after.
    dest = _target_file(src_path.name, target)
    _refuse_live(src_path, dest)
    part = _prepare_part(dest)
    # mode=rw: never create a database where there was none.
    src = sqlite3.connect(f"file:{src_path}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_S)
    try:
        copy = sqlite3.connect(part)
        try:
            # pages=-1: the whole database in one step, from one read snapshot.
            src.backup(copy, pages=-1)
        finally:
            copy.close()
        jobs = _check_and_seal(part)
    except sqlite3.Error as err:
        part.unlink(missing_ok=True)
        raise BackupError(f"backup failed: {err}") from err
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    finally:
        src.close()
    os.replace(part, dest)
    return BackupReport(dest, jobs, dest.stat().st_size)


async def backup_store(where: StoreURL, target: str | os.PathLike[str]) -> BackupReport:
    """Back up the store DATABASE_URL names into a SQLite file at `target`."""
    if where.kind == "sqlite":
        return await asyncio.to_thread(backup_database, where.path, target)
    dest = _target_file("imgbot-backup.db", target)
    part = await asyncio.to_thread(_prepare_part, dest)
    try:
        source = await open_store(where, Limits(), pool_size=2)
        try:
            copy = await open_store(f"sqlite:///{part}", Limits())
            try:
                report = await copy_store(source, copy)
            finally:
                await copy.close()
        finally:
            await source.close()
        if not report.ok:
            raise BackupError("the copy does not match the ledger: " + report.summary())
        jobs = await asyncio.to_thread(_check_and_seal, part)
    except StoreError as err:
        part.unlink(missing_ok=True)
        raise BackupError(str(err)) from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return BackupReport(dest, jobs, dest.stat().st_size)
