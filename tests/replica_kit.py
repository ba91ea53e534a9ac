"""Replicas for tests and the benchmark: `imgbot run` processes in webhook mode behind a
small round-robin forwarder on 127.0.0.1 (the operator's reverse proxy in miniature)."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.conftest import TEST_KEY
from tests.fake_api import FakeImageAPI
from tests.fake_botapi import FakeBotApiServer, FloodRules
from tests.telegram_fake import TOKEN
from tests.test_process import ROOT, SETTING_NAMES, BotProcess


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RoundRobin:
    """A reverse proxy in miniature: each POST goes to the next replica that answers."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self.sent: Counter[int] = Counter()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, answer = proxy.forward(self.path, body, dict(self.headers))
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def forward(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        for _ in range(len(self.ports)):
            with self._lock:
                port = self.ports[next(self._turn) % len(self.ports)]
            try:
                answer = httpx.post(
                    f"http://127.0.0.1:{port}{path}",
                    content=body,
                    headers={k: v for k, v in headers.items() if k.lower().startswith(
                        ("content-type", "x-telegram"))},
                    timeout=10,
                )
            except httpx.HTTPError:
                continue  # that replica is down: the next one
            with self._lock:
                self.sent[port] += 1
            return answer.status_code, answer.content
        return 502, b"no replica answered"

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def fakes() -> Iterator[tuple[FakeBotApiServer, FakeImageAPI]]:
    with FakeBotApiServer(TOKEN, flood=FloodRules()) as tg, FakeImageAPI(key=TEST_KEY) as images:
        yield tg, images


def start_replica(
    tmp_path: Path, tg: FakeBotApiServer, images: FakeImageAPI, url: str, hook: str, n: int,
    **settings: str,
) -> BotProcess:
    """Start `imgbot run` number n in webhook mode; `settings` override the defaults."""
    listen_port = free_port()
    bot = spawn_replica(tmp_path, n, {
        "TELEGRAM_BOT_TOKEN": TOKEN,
        "TELEGRAM_API_BASE_URL": tg.base_url,
        "TELEGRAM_WEBHOOK_URL": hook,
        "TELEGRAM_WEBHOOK_LISTEN": "127.0.0.1",
        "TELEGRAM_WEBHOOK_PORT": str(listen_port),
        "OPENAI_BASE_URL": images.base_url,
        "OPENAI_API_KEY": TEST_KEY,
        "DATABASE_URL": url,
        "DATA_DIR": str(tmp_path / "data"),
        "RATE_LIMIT_PER_MINUTE": "0",
        "MAX_QUEUED_PER_USER": "20",
        "JOB_LEASE": "2",
        "ALBUM_DEBOUNCE": "0.8",
        "PREVIEWS": "off",
        "PROGRESS_INTERVAL": "5",
        "LOG_LEVEL": "INFO",
        "WEB_PORT": "0",
        **settings,
    })
    bot.port = listen_port  # type: ignore[attr-defined]
    return bot


def spawn_replica(
    tmp_path: Path, n: int, settings: dict[str, str], command: tuple[str, ...] = ("bots.cli", "run")
) -> BotProcess:
    """Start replica number n (`python -m <command>` in tmp_path, logging to replica-n.log)
    with `settings` and none of this environment's own imgbot settings."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in SETTING_NAMES}
    env.update({"PYTHONPATH": str(ROOT), **settings})
    log = tmp_path / f"replica-{n}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", *command], cwd=tmp_path, env=env,
            stdout=out, stderr=subprocess.STDOUT,
        )
    return BotProcess(proc, log)


