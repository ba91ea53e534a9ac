"""`imgbot backup PATH`: a consistent copy of the ledger, safe while the bot writes to it.

The ledger runs in WAL mode: recent commits live in `imgbot.db-wal` until a checkpoint moves
them into `imgbot.db`. Copying the files is therefore not a backup: the `.db` alone misses
those commits, and a `.db` and `-wal` copied a moment apart can pair pages from different
points in time (a torn copy that SQLite opens without complaint). SQLite's online backup
API reads one snapshot under a read transaction, so writers go on and the copy is exactly
the database as of one commit. The copy is written beside PATH, checked with
`PRAGMA integrity_check`, switched to a single self-contained file (no -wal), then renamed
into place, so PATH is never a half-written file.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

BUSY_TIMEOUT_S = 30.0


class BackupError(Exception):
    """The backup could not be made; the message says why."""


@dataclass(frozen=True)
class BackupReport:
    """What a finished backup holds."""

    path: Path
    jobs: int
    size: int


def backup_database(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> BackupReport:
    """Copy the SQLite database at `source` to `target` as one consistent, checked file."""
    src_path = Path(source)
    dest = Path(target)
    if not src_path.is_file():
        raise BackupError(f"{src_path}: no database there (check DATABASE_URL)")
    if dest.exists() and dest.resolve() == src_path.resolve():
        raise BackupError(f"{dest}: that is the live database; choose another path")
    if dest.is_dir():
        dest = dest / src_path.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    part.unlink(missing_ok=True)
    # mode=rw: never create a database where there was none.
    src = sqlite3.connect(f"file:{src_path}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_S)
    try:
        copy = sqlite3.connect(part)
        try:
            # pages=-1: the whole database in one step, from one read snapshot.
            src.backup(copy, pages=-1)
            copy.execute("PRAGMA journal_mode = DELETE")
            problems = [row[0] for row in copy.execute("PRAGMA integrity_check")]
            if problems != ["ok"]:
                raise BackupError(f"the copy failed its integrity check: {problems[:3]}")
            jobs = copy.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        finally:
            copy.close()
    except sqlite3.Error as err:
        part.unlink(missing_ok=True)
        raise BackupError(f"backup failed: {err}") from err
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    finally:
        src.close()
    os.replace(part, dest)
    return BackupReport(dest, int(jobs), dest.stat().st_size)
