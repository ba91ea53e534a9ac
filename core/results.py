"""Kept results: a drawn job's images on disk until they are delivered (and a while after).

`DATA_DIR/results/<job id>/` holds the images (`0.png`, `1.png`, …) and `result.json`, a
manifest written last (through a temporary file and a rename), so a folder without a
manifest is an unfinished save and reads as nothing. Any process with the same data folder
can deliver a result another process drew (after a crash or a restart). Folders are 0700
and files 0600: results are private images. Files are not fsynced: a result survives the
process dying (the kernel has the pages), not the machine losing power before writeback —
then the job is found `drawn` without a result and ends `undelivered` (refundable).

Everything here is blocking file work; callers run it in a thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from core.types import GeneratedImage

log = logging.getLogger(__name__)

MANIFEST = "result.json"
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


@dataclass(frozen=True)
class KeptResult:
    """A result read back from disk."""

    job_id: int
    images: tuple[GeneratedImage, ...]
    revised_prompt: str | None
    elapsed: float
    saved_at: float  # epoch seconds


class ResultStore:
    """Save, load and clean kept results under one folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, job_id: int) -> Path:
        """Return the folder of one job's result."""
        return self.root / str(int(job_id))

    def save(
        self,
        job_id: int,
        images: tuple[GeneratedImage, ...],
        *,
        revised_prompt: str | None,
        elapsed: float,
    ) -> Path:
        """Write a result (images, then its manifest); return its folder. Blocking."""
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
        return folder

    def load(self, job_id: int) -> KeptResult | None:
        """Read a kept result back; None when it is missing, unfinished or damaged. Blocking."""
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
                saved_at=float(manifest.get("saved_at") or 0.0),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def remove(self, job_id: int) -> None:
        """Delete a job's kept result, if any. Blocking."""
        shutil.rmtree(self.folder(job_id), ignore_errors=True)

    def kept(self) -> list[tuple[int, float]]:
        """List the kept results as (job id, when saved), oldest folders too. Blocking."""
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
            found.append((int(entry.name), saved))
        return sorted(found)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
