"""Kept results: a drawn job's images, kept until they are delivered (and a while after).

The service saves a result before the charge that marks its job `drawn`, so a process
that dies from then on leaves a drawn job whose result the next one delivers; nothing
drops a result to make room; `ImageService.clean_results` removes it
RESULT_RETENTION_HOURS after its job ended. Two keepers do this, with one interface
(`ResultKeeper`), chosen by KEEP_RESULTS (`result_keeper`):

- `LedgerResults` (`ledger`; `auto` on PostgreSQL): in the ledger (`Store.keep_result`), a
  result and its images written in one transaction. Every process on the same database
  delivers a result another drew, on any machine, with no shared folder. Private as the
  ledger is: the database's own access control.
- `FileResults` (`files`; `auto` on SQLite): under `DATA_DIR/results/<job id>/`, the images
  (`0.png`, `1.png`, …) and `result.json`, a manifest written last (through a temporary
  file and a rename), so a folder without a manifest is an unfinished save and reads as
  nothing. Processes that share the folder deliver each other's results. Folders are 0700
  and files 0600: results are private images. Files are not fsynced: a result survives the
  process dying (the kernel has the pages), not the machine losing power before writeback —
  then the job is found `drawn` without a result and ends `undelivered` (refundable). The
  file work is blocking and runs in a thread.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from core.store import Store
from core.store.records import KeptResult
from core.types import GeneratedImage

MANIFEST = "result.json"
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


class ResultKeeper(Protocol):
    """Where drawn results wait for their delivery."""

    # In the ledger, a save the store cannot take now is waited for like the charge after
    # it (which that store could not take either); a file the disk refuses is not.
    in_ledger: bool

    async def save(
        self,
        job_id: int,
        images: Sequence[GeneratedImage],
        *,
        revised_prompt: str | None,
        elapsed: float,
    ) -> None:
        """Keep a job's result whole (replacing any kept before), or raise."""

    async def load(self, job_id: int) -> KeptResult | None:
        """Return a job's kept result; None when it is missing or unfinished."""

    async def remove(self, job_id: int) -> None:
        """Forget a job's kept result, if any."""

    async def kept(self) -> list[tuple[int, datetime]]:
        """List the kept results as (job id, when saved)."""


def result_keeper(choice: str, ledger: Store, folder: Path) -> ResultKeeper:
    """Return the keeper KEEP_RESULTS names (`auto`: the ledger on PostgreSQL, else files)."""
    if choice == "ledger" or (choice == "auto" and ledger.kind == "postgresql"):
        return LedgerResults(ledger)
    return FileResults(folder)


class LedgerResults:
    """Kept results in the ledger, for every process on the same database."""

    in_ledger = True

    def __init__(self, ledger: Store) -> None:
        self.ledger = ledger

    async def save(
        self,
        job_id: int,
        images: Sequence[GeneratedImage],
        *,
        revised_prompt: str | None,
        elapsed: float,
    ) -> None:
        """Keep a job's result in one transaction (a store failure raises)."""
        await self.ledger.keep_result(job_id, images, revised_prompt=revised_prompt,
                                      elapsed=elapsed)

    async def load(self, job_id: int) -> KeptResult | None:
        """Return a job's kept result; None when none is kept."""
        return await self.ledger.kept_result(job_id)

    async def remove(self, job_id: int) -> None:
        """Forget a job's kept result, if any."""
        await self.ledger.drop_result(job_id)

    async def kept(self) -> list[tuple[int, datetime]]:
        """List the kept results as (job id, when saved)."""
        return await self.ledger.kept_results()


class FileResults:
    """Kept results under one folder, for the processes that share it."""

    in_ledger = False

    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, job_id: int) -> Path:
        """Return the folder of one job's result."""
        return self.root / str(int(job_id))

    async def save(
        self,
        job_id: int,
        images: Sequence[GeneratedImage],
        *,
        revised_prompt: str | None,
        elapsed: float,
    ) -> None:
        """Write a result (images, then its manifest); OSError when the disk refuses."""
        await asyncio.to_thread(self._save, job_id, tuple(images), revised_prompt, elapsed)

    async def load(self, job_id: int) -> KeptResult | None:
        """Read a kept result back; None when it is missing, unfinished or damaged."""
        return await asyncio.to_thread(self._load, job_id)

    async def remove(self, job_id: int) -> None:
        """Delete a job's kept result, if any."""
        await asyncio.to_thread(shutil.rmtree, self.folder(job_id), ignore_errors=True)

    async def kept(self) -> list[tuple[int, datetime]]:
        """List the kept results as (job id, when saved), unfinished folders too."""
        return await asyncio.to_thread(self._kept)

    def _save(
        self,
        job_id: int,
        images: tuple[GeneratedImage, ...],
        revised_prompt: str | None,
        elapsed: float,
    ) -> None:
        folder = self.folder(job_id)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        entries = []
        for index, image in enumerate(images):
            name = f"{index}.{_EXTENSIONS.get(image.mime, 'bin')}"
            _write_private(folder / name, image.data)
            entries.append(
                {"file": name, "mime": image.mime, "width": image.width, "height": image.height,
                 "bytes": len(image.data)}
            )
        manifest = {
            "job_id": int(job_id),
            "images": entries,
            "revised_prompt": revised_prompt,
            "elapsed": float(elapsed),
            "saved_at": time.time(),
        }
        temporary = folder / f".{MANIFEST}.tmp"
        _write_private(temporary, json.dumps(manifest).encode("utf-8"))
        os.replace(temporary, folder / MANIFEST)

    def _load(self, job_id: int) -> KeptResult | None:
        folder = self.folder(job_id)
        try:
            manifest = json.loads((folder / MANIFEST).read_text("utf-8"))
            images = []
            for entry in manifest["images"]:
                name = str(entry["file"])
                if "/" in name or name.startswith("."):
                    return None
                data = (folder / name).read_bytes()
                if len(data) != int(entry["bytes"]):
                    return None
                images.append(
                    GeneratedImage(data, str(entry["mime"]), int(entry["width"]),
                                   int(entry["height"]))
                )
            if not images:
                return None
            return KeptResult(
                job_id=int(job_id),
                images=tuple(images),
                revised_prompt=manifest.get("revised_prompt"),
                elapsed=float(manifest.get("elapsed") or 0.0),
                saved_at=datetime.fromtimestamp(float(manifest.get("saved_at") or 0.0), UTC),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _kept(self) -> list[tuple[int, datetime]]:
        found = []
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return []
        for entry in entries:
            if not entry.name.isdigit() or not entry.is_dir():
                continue
            try:
                saved = (Path(entry.path) / MANIFEST).stat().st_mtime
            except OSError:
                try:
                    saved = entry.stat().st_mtime
                except OSError:
                    continue
            found.append((int(entry.name), datetime.fromtimestamp(saved, UTC)))
        return sorted(found)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
