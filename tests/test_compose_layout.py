"""The replicas' layout of docker-compose.replicas.yml, run without Docker: PostgreSQL, two
`imgbot run` processes with the compose file's settings, and Caddy (Debian's package) with
the compose file's deploy/Caddyfile in front of them.

There is no Docker daemon here (nor images to pull), so the containers are the one thing
not run: the processes are started with the environment the compose file gives its replicas
(its `${…}` values replaced by this machine's: the test's PostgreSQL, the fakes, 127.0.0.1
ports), and Caddy is started from the Caddyfile the proxy container mounts, with the two
replicas' addresses in IMGBOT_REPLICAS (in compose: their service names, the default).
Checked: Telegram's webhook is set at the proxy's /telegram, updates POSTed there are drawn
and delivered once whichever replica gets them, an update without the secret is refused, and
with one replica killed (-9) Caddy hands every update to the other and nothing is lost.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import yaml

from bots.telegram.app import webhook_secret
from core.config import Settings
from tests.fake_api import FakeImageAPI
from tests.fake_botapi import FakeBotApiServer
from tests.pg_server import pg_server, pg_url  # noqa: F401 - fixtures
from tests.replica_kit import fakes, free_port, start_replica  # noqa: F401 - fixture
from tests.telegram_fake import TOKEN, Updates
from tests.test_process import BotProcess
from tests.test_replicas import Telegram, _listening, _wait_delivered

ROOT = Path(__file__).resolve().parent.parent


def compose_replica_env() -> dict[str, str]:
    """Return the environment docker-compose.replicas.yml gives its replicas (both alike)."""
    compose = yaml.safe_load((ROOT / "docker-compose.replicas.yml").read_text())
    first, second = (compose["services"][name]["environment"] for name in ("imgbot-1", "imgbot-2"))
    assert first == second
    return {str(k): str(v) for k, v in first.items()}


@contextmanager
def caddy(tmp_path: Path, port: int, replicas: list[int]) -> Iterator[str]:
    """Run Caddy with deploy/Caddyfile as the proxy container does, on 127.0.0.1:`port`, in
    front of the replicas' webhook ports; yield its URL."""
    binary = shutil.which("caddy")
    assert binary, "caddy is a test dependency: apt-get install caddy (.ci/run does)"
    home = tmp_path / "caddy"
    home.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"), "XDG_CONFIG_HOME": str(home / "config"),
        "IMGBOT_DOMAIN": f"http://127.0.0.1:{port}",
        "IMGBOT_REPLICAS": " ".join(f"127.0.0.1:{p}" for p in replicas),
    }
    adapted = subprocess.run(
        [binary, "adapt", "--config", str(ROOT / "deploy" / "Caddyfile")],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )
    config = json.loads(adapted.stdout)
    # Servers started by tests listen on 127.0.0.1 only (Caddy would take every interface),
    # and the admin endpoint gets a port of its own; the routes are the Caddyfile's.
    for server in config["apps"]["http"]["servers"].values():
        assert server["listen"] == [f":{port}"], server["listen"]
        server["listen"] = [f"127.0.0.1:{port}"]
    config["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    path = home / "caddy.json"
    path.write_text(json.dumps(config))
    log = (home / "caddy.log").open("wb")
    proc = subprocess.Popen([binary, "run", "--config", str(path)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (home / "caddy.log").read_text()
            try:
                httpx.get(f"{url}/", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, (home / "caddy.log").read_text()
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_the_replicas_compose_layout_runs_behind_its_caddyfile(
    tmp_path: Path, fakes: tuple[FakeBotApiServer, FakeImageAPI], pg_url: str,  # noqa: F811
) -> None:
    tg, images = fakes
    env = compose_replica_env()
    # What the compose file wires together: the webhook at the proxy's /telegram (the path
    # the Caddyfile hands on), the port the Caddyfile's default replica list names, results
    # kept in the ledger, shards shared out by the replicas.
    webhook = urlsplit(re.sub(r"\$\{IMGBOT_DOMAIN[^}]*\}", "bot.example.com",
                              env["TELEGRAM_WEBHOOK_URL"]))
    assert webhook.scheme == "https" and webhook.path == "/telegram"
    caddyfile = (ROOT / "deploy" / "Caddyfile").read_text()
    assert f"imgbot-1:{env['TELEGRAM_WEBHOOK_PORT']}" in caddyfile
    assert env["DATABASE_URL"].startswith("postgresql://")
    port = free_port()
    hook = f"http://127.0.0.1:{port}{webhook.path}"
    kept = {k: env[k] for k in ("KEEP_RESULTS", "DISCORD_SHARD_IDS")}
    replicas: list[BotProcess] = []
    try:
        for n in range(2):
            replicas.append(start_replica(
                tmp_path, tg, images, pg_url, hook, n,
                DATA_DIR=str(tmp_path / f"imgbot-{n + 1}-data"), JOB_LEASE="3", **kept,
            ))
        for bot in replicas:
            tg.wait_for(lambda bot=bot: _listening(bot), within=30)
        with caddy(tmp_path, port, [bot.port for bot in replicas]) as proxy:  # type: ignore[attr-defined]
            assert {c.params.get("url") for c in tg.of("setWebhook")} == {f"{proxy}/telegram"}
            secret = webhook_secret(Settings(_env_file=None, telegram_bot_token=TOKEN))
            u = Updates()
            users = [Updates.user(6100 + i, f"C{i}") for i in range(10)]

            def ask(i: int, what: str) -> dict[str, Any]:
                return u.update(u.message(users[i], u.private(users[i]), text=f"/img low {what}"))

            # Only Telegram (which knows the secret) can post jobs through the proxy.
            forged = ask(0, "a forged job")
            assert httpx.post(hook, json=forged, timeout=15).status_code == 403
            telegram = Telegram(hook, secret)
            first = [ask(i, f"a lamp {i}-{k}") for i in range(10) for k in range(2)]
            telegram.send_all(first + first[::5])  # some sent twice, as Telegram resends
            assert telegram.undelivered == []
            _wait_delivered(tg, pg_url, len(first))
            handled = [bot.output().count("job platform=telegram") for bot in replicas]
            assert all(handled), handled  # round-robin: both replicas drew

            # One replica dies; Caddy hands every update to the other; nothing is lost.
            replicas[0].proc.kill()
            replicas[0].proc.wait()
            second = [ask(i, f"a bell {i}") for i in range(10)]
            telegram.send_all(second)
            assert telegram.undelivered == []
            rows = _wait_delivered(tg, pg_url, len(first) + len(second))
            for row in rows:
                sent = [c for c in tg.of("sendPhoto", ok=True)
                        if f"j:{row['id']}:" in json.dumps(c.params)]
                assert len(sent) == 1, (row["id"], row["command_text"])
            assert replicas[1].stop(signal.SIGTERM, within=60) == 0
    finally:
        for bot in replicas:
            if bot.proc.poll() is None:
                bot.proc.kill()
                bot.proc.wait()

