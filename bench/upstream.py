"""The benchmark's upstream: the test suite's fake image API, photo-sized, in its own process.

`tests/fake_api.py` draws flat colours, which PNG squeezes to about 16 KB at 1024x1024 and
110 KB at 3840x2160, a hundred times smaller than a real answer. `PhotoLikeAPI` answers
with images whose PNGs weigh what real ones do (smooth colour fields plus fine grain:
about 1.6 MB at 1024x1024 and 12.7 MB at 3840x2160), the same every run. Everything
else — validation, usage, answer shapes, the `/files/…` downloads — is the fake's own.

The server runs in a child process so that its work (base64-encoding and sending megabytes)
takes neither the benchmark's GIL nor its memory:

    with UpstreamProcess("b64_prefixed") as upstream:
        upstream.base_url  # http://127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import io
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/upstream.py` as well as `-m bench.upstream`
    sys.path.insert(0, str(ROOT))

from http.server import ThreadingHTTPServer  # noqa: E402

from tests.fake_api import FakeImageAPI, _Job  # noqa: E402

KEY = "sk-bench-key-0123456789"
WARM_SIZES = ((1024, 1024), (3840, 2160))


def photo_like_png(width: int, height: int, seed: int) -> bytes:
    """Return a PNG that compresses like a photo: a smooth colour field plus 2-bit grain."""
    rng = random.Random(seed)
    cells = (max(width // 32, 1), max(height // 32, 1))
    field = Image.frombytes("RGB", cells, rng.randbytes(cells[0] * cells[1] * 3))
    field = field.resize((width, height), Image.Resampling.BICUBIC)
    grain = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    grain = grain.point(lambda v: v & 3)
    out = io.BytesIO()
    # compress_level 1 like the stock fake: the bytes on the wire, not the server, matter here.
    ImageChops.add(field, grain).save(out, format="PNG", compress_level=1)
    return out.getvalue()


class PhotoLikeAPI(FakeImageAPI):
    """The fake image API, answering opaque PNGs with photo-sized payloads.

    `GET /bench/hold/N` makes the next N successful answers wait for each other and go out
    together, so N results really arrive, and decode, at once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gate: threading.Barrier | None = None

    def _handle_get(self, h: Any) -> None:
        if h.path.startswith("/bench/hold/"):
            parties = int(h.path.rsplit("/", 1)[1])
            self._gate = threading.Barrier(parties, action=self._open_gate, timeout=120)
            self._send(h, 200, b"{}", "application/json")
            return
        super()._handle_get(h)

    def _open_gate(self) -> None:
        self._gate = None  # one round only

    def _send(
        self, h: Any, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None
    ) -> None:
        gate = self._gate
        if gate is not None and h.command == "POST" and status == 200:
            try:
                gate.wait()
            except threading.BrokenBarrierError:
                pass  # a job went missing: send anyway rather than hang
        super()._send(h, status, body, ctype, headers)

    def _image(self, job: _Job, index: int, partial: int | None = None) -> bytes:
        if job.output_format != "png" or job.transparent:
            return super()._image(job, index, partial)
        w, h = job.size
        key = ("photo", w, h, index % 4, partial)
        with self._lock:
            cached = self._images.get(key)
        if cached is None:
            seed = w * 100_003 + h * 31 + index % 4 + (0 if partial is None else 7 + partial)
            cached = photo_like_png(w, h, seed=seed)
            with self._lock:
                self._images[key] = cached
        return cached

    def warm(self) -> None:
        """Draw the benchmark's images now, so no timed request pays for it."""
        for w, h in WARM_SIZES:
            self._image(_Job("gpt-image-2", "x", 1, (w, h), "auto", "png", False, "b64", ()), 0)


class UpstreamProcess:
    """A `PhotoLikeAPI` in a child process; it exits when we close its stdin."""

    def __init__(self, mode: str, delay: float = 0.0) -> None:
        self.mode = mode
        self.delay = delay
        self.base_url = ""
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> UpstreamProcess:
        """Start the child; return at once (call `wait_ready` before using it)."""
        self._proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "bench.upstream", "--mode", self.mode,
             "--delay", str(self.delay)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        return self

    def wait_ready(self) -> str:
        """Wait for the child's READY line and return its base URL."""
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()
        if not line.startswith("READY "):
            raise RuntimeError(f"upstream did not start: {line!r}")
        self.base_url = line.removeprefix("READY ")
        return self.base_url

    def stop(self) -> None:
        """Ask the child to exit and wait for it (kill it, by its pid, after 10 s)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> UpstreamProcess:
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main() -> None:
    """Serve until stdin closes (the parent exited or asked us to stop)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", default="b64_prefixed")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    # socketserver's listen backlog is 5: a burst of 50 connections would be reset, which a
    # real API never does. This process is ours alone, so raising it for the class is safe.
    ThreadingHTTPServer.request_queue_size = 256
    api = PhotoLikeAPI(key=KEY, mode=args.mode, delay=args.delay)
    api.warm()
    with api:
        print(f"READY {api.base_url}", flush=True)
        done = threading.Event()

        def wait_for_eof() -> None:
            sys.stdin.read()
            done.set()

        threading.Thread(target=wait_for_eof, daemon=True).start()
        done.wait()


if __name__ == "__main__":
    main()
