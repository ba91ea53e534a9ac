"""The `imgbot` command, run as a user runs it: a subprocess against the fake API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import TEST_KEY
from tests.fake_api import FakeImageAPI

ROOT = Path(__file__).resolve().parent.parent
TG_TOKEN = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"


def _env(tmp_path: Path, api: FakeImageAPI | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_TOKEN")}
    env.update(
        {
            "OPENAI_API_KEY": TEST_KEY,
            "DATABASE_URL": f"sqlite:///{tmp_path}/ledger.db",
            "LANG": "en_US.UTF-8",
            "USER": "tester",
        }
    )
    if api is not None:
        env["OPENAI_BASE_URL"] = api.base_url
    env.update(extra)
    return env


def imgbot(tmp_path: Path, *args: str, api: FakeImageAPI | None = None, **extra: str):
    """Run `imgbot ARGS` in tmp_path (no .env there) and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "bots.cli", *args],
        cwd=tmp_path,
        env={**_env(tmp_path, api, **extra), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_parse_prints_the_request(tmp_path: Path) -> None:
    proc = imgbot(tmp_path, "parse", "16:9 2K high a white siamese cat")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["size"] == "2048x1152" and out["quality"] == "high"
    assert out["prompt"] == "a white siamese cat" and out["model"] == "gpt-image-2"
    assert out["estimated_credits"] > 0


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("5:1 a banner", "3:1"),
        ("4000x4000 a cat", "3840"),
        ("1000x1000 a cat", "multiples of 16"),
        ("16:9 2K", "nothing to draw"),
    ],
)
def test_parse_refuses_with_a_clear_message(tmp_path: Path, text: str, says: str) -> None:
    proc = imgbot(tmp_path, "parse", text)
    assert proc.returncode == 2
    assert says in proc.stderr and "Example" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_parse_with_model(tmp_path: Path) -> None:
    proc = imgbot(tmp_path, "parse", "--model", "gpt-image-1.5", "16:9 4K a cat")
    out = json.loads(proc.stdout)
    assert out["size"] == "1536x1024" and out["notes"]


@pytest.mark.parametrize("mode", ["b64", "b64_prefixed", "url", "official"])
def test_gen_writes_images_in_every_mode(tmp_path: Path, mode: str) -> None:
    fmt = {"b64": "b64_json", "b64_prefixed": "b64_json", "url": "url", "official": "none"}[mode]
    with FakeImageAPI(key=TEST_KEY, mode=mode) as api:
        proc = imgbot(
            tmp_path, "gen", "3:2 low a red fox", "-o", "out", api=api, RESPONSE_FORMAT=fmt
        )
    assert proc.returncode == 0, proc.stderr
    files = sorted((tmp_path / "out").iterdir())
    assert len(files) == 1
    with Image.open(files[0]) as image:
        assert image.size == (1008, 672)
    assert "1008x672" in proc.stdout and "credits ≈ ¥" in proc.stdout


def test_gen_with_references_and_cost_recorded(tmp_path: Path) -> None:
    ref = tmp_path / "ref.jpg"
    Image.new("RGB", (900, 600), (10, 120, 200)).save(ref, "JPEG")
    with FakeImageAPI(key=TEST_KEY) as api:
        proc = imgbot(tmp_path, "gen", "x2 low make it snow", "-i", str(ref), "-o", "o", api=api)
        sent = api.api_requests[-1]
    assert proc.returncode == 0, proc.stderr
    assert sent.path == "/v1/images/edits"
    assert [p.content_type for p in sent.files] == ["image/jpeg"]
    assert len(list((tmp_path / "o").iterdir())) == 2
    usage = imgbot(tmp_path, "usage", "--user", "cli:tester")
    assert usage.returncode == 0 and "All time" in usage.stdout
    csv = imgbot(tmp_path, "usage", "--csv")
    assert csv.stdout.count("\n") == 2 and "cli:tester" in csv.stdout


def test_gen_upstream_error_exits_1(tmp_path: Path) -> None:
    with FakeImageAPI(key=TEST_KEY) as api:
        api.inject("moderation_blocked")
        proc = imgbot(tmp_path, "gen", "low something", api=api)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and TEST_KEY not in proc.stderr + proc.stdout
    assert proc.stderr.strip()


def test_gen_unreachable_api(tmp_path: Path) -> None:
    proc = imgbot(
        tmp_path, "gen", "low a cat", OPENAI_BASE_URL="http://127.0.0.1:9", MAX_RETRIES="0"
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


def test_admin_from_terminal(tmp_path: Path) -> None:
    with FakeImageAPI(key=TEST_KEY) as api:
        assert imgbot(tmp_path, "gen", "low a cat", "-o", "o", api=api).returncode == 0
        proc = imgbot(tmp_path, "admin", "limit", "telegram:5", "daily=100", api=api)
        assert proc.returncode == 0 and "100" in proc.stdout
        proc = imgbot(tmp_path, "admin", "refund", "1", api=api)
        assert proc.returncode == 0 and "#1" in proc.stdout
        proc = imgbot(tmp_path, "admin", "refund", "1", api=api)
        assert proc.returncode == 2 and proc.stderr.strip()


def test_terminal_admin_ids_name_their_platform(tmp_path: Path) -> None:
    # In the terminal a bare id means no platform at all: it is refused, not made cli:12345.
    proc = imgbot(tmp_path, "admin", "limit", "12345", "daily=100")
    assert proc.returncode == 2 and "telegram:12345" in proc.stderr
    proc = imgbot(tmp_path, "admin", "block", "discord:abc")
    assert proc.returncode == 2 and "discord" in proc.stderr and "numbers" in proc.stderr


def test_admins_without_a_platform_stop_start_up(tmp_path: Path) -> None:
    proc = imgbot(tmp_path, "parse", "a cat", ADMINS="12345")
    assert proc.returncode == 2 and "ADMINS" in proc.stderr and "telegram:12345" in proc.stderr


def test_run_without_tokens_explains_itself(tmp_path: Path) -> None:
    proc = imgbot(tmp_path, "run", WEB_PORT="0")
    assert proc.returncode == 2
    assert "TELEGRAM_BOT_TOKEN" in proc.stderr and ".env" in proc.stderr


def test_bad_setting_stops_start_up(tmp_path: Path) -> None:
    proc = imgbot(tmp_path, "parse", "a cat", USER_DAILY_LIMIT="-1")
    assert proc.returncode == 2 and "USER_DAILY_LIMIT" in proc.stderr


@pytest.fixture
def bot_apis() -> Iterator[str]:
    """A tiny Bot API + Discord API stand-in on 127.0.0.1 that knows one token each."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path == f"/bot{TG_TOKEN}/getMe":
                body = {"ok": True, "result": {"id": 1, "is_bot": True, "username": "ImgTestBot"}}
                code = 200
            elif self.path == "/api/users/@me" and self.headers["Authorization"] == "Bot dc-ok":
                body, code = {"id": "2", "username": "imgbot-dc"}, 200
            else:
                body, code = {"ok": False, "description": "Unauthorized"}, 401
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_doctor_reports_each_check(tmp_path: Path, bot_apis: str) -> None:
    from bots.doctor import doctor
    from core.config import Settings

    lines: list[str] = []
    with FakeImageAPI(key=TEST_KEY) as api:
        good = Settings(
            _env_file=None,
            openai_base_url=api.base_url,
            openai_api_key=TEST_KEY,
            telegram_bot_token=TG_TOKEN,
            telegram_api_base_url=bot_apis,
            discord_bot_token="dc-ok",
            database_url=f"sqlite:///{tmp_path}/d/ledger.db",
        )
        assert await doctor(good, out=lines.append, discord_api=f"{bot_apis}/api") == 0
        report = "\n".join(lines)
        assert "image API: ok" in report and "@ImgTestBot" in report
        assert "discord: ok" in report and "database: ok" in report and "schema v" in report
        lines.clear()
        bad = good.model_copy(
            update={
                "openai_api_key": type(good.openai_api_key)("sk-wrong"),
                "telegram_bot_token": type(good.telegram_bot_token)("1:bad"),
            }
        )
        assert await doctor(bad, out=lines.append, discord_api=f"{bot_apis}/api") == 1
        report = "\n".join(lines)
        assert "image API: FAIL" in report and "OPENAI_API_KEY" in report
        assert "telegram: FAIL" in report and "TELEGRAM_BOT_TOKEN" in report
        assert TG_TOKEN not in report and TEST_KEY not in report
        lines.clear()
        # Allow-list entries that can match nobody are warned about.
        odd = good.model_copy(update={"allowed_users": ["12345", "telegram:@ann", "cli:tester"]})
        await doctor(odd, out=lines.append, discord_api=f"{bot_apis}/api")
        warnings = [line for line in lines if line.startswith("settings: WARN")]
        assert len(warnings) == 2 and all("ALLOWED_USERS" in w for w in warnings)
        assert "telegram:12345" in warnings[0] and "telegram:@ann" in warnings[1]


def _charged(tmp_path: Path) -> list[tuple[str, float]]:
    """Return every job's status and charge, straight from the ledger file."""
    import sqlite3

    db = tmp_path / "ledger.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT j.status, c.charged FROM jobs j JOIN job_charges c ON c.id = j.id"
        ).fetchall()


@pytest.mark.parametrize("name", ["cat.png", "notes.txt"])
def test_gen_refuses_an_existing_file_as_output_before_drawing(tmp_path: Path, name: str) -> None:
    # -o names a folder. An existing file there used to be drawn for, charged, and then the
    # image was lost to a traceback; now it is refused before anything is drawn.
    existing = tmp_path / name
    existing.write_bytes(b"keep me")
    with FakeImageAPI(key=TEST_KEY) as api:
        proc = imgbot(tmp_path, "gen", "low a red fox", "-o", name, api=api)
        calls = api.api_requests
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and name in proc.stderr and "folder" in proc.stderr
    assert calls == [] and _charged(tmp_path) == []
    assert existing.read_bytes() == b"keep me"


def test_gen_refuses_an_image_file_name_as_output_folder(tmp_path: Path) -> None:
    # `-o fox.png` would have made a folder called fox.png: refused, saying -o is a folder.
    with FakeImageAPI(key=TEST_KEY) as api:
        proc = imgbot(tmp_path, "gen", "low a red fox", "-o", "fox.png", api=api)
        calls = api.api_requests
    assert proc.returncode == 2 and "folder" in proc.stderr and "Traceback" not in proc.stderr
    assert calls == [] and not (tmp_path / "fox.png").exists()


def test_gen_refuses_an_output_folder_it_cannot_create(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("a file")
    with FakeImageAPI(key=TEST_KEY) as api:
        proc = imgbot(tmp_path, "gen", "low a red fox", "-o", "plain/out", api=api)
        calls = api.api_requests
    assert proc.returncode == 2 and "plain/out" in proc.stderr and "Traceback" not in proc.stderr
    assert calls == [] and _charged(tmp_path) == []


def test_gen_creates_a_missing_output_folder(tmp_path: Path) -> None:
    with FakeImageAPI(key=TEST_KEY) as api:
        proc = imgbot(tmp_path, "gen", "low a red fox", "-o", "a/b/c", api=api)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "a" / "b" / "c").iterdir())) == 1


def test_ctrl_c_during_gen_cancels_the_job_and_charges_nothing(tmp_path: Path) -> None:
    # A real `imgbot gen` process waiting for a slow upstream gets SIGINT (Ctrl-C): it stops
    # at once with a "cancelled" line and exit 130, and the ledger shows the job released
    # (failed, cancelled) at 0: the upstream never answered. It used to be left unsettled.
    import asyncio
    import signal
    import time

    from core.store import Limits, open_store

    async def first_job() -> Any:
        ledger = await open_store(f"sqlite:///{tmp_path}/ledger.db", Limits())
        try:
            return await ledger.get_job(1)
        finally:
            await ledger.close()

    with FakeImageAPI(key=TEST_KEY) as api:
        api.inject("slow", seconds=30)
        proc = subprocess.Popen(
            [sys.executable, "-m", "bots.cli", "gen", "low a slow fox", "-o", "out"],
            cwd=tmp_path,
            env={**_env(tmp_path, api), "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 20
            while not api.api_requests:  # the call is in flight: the upstream is "drawing"
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.05)
            time.sleep(0.3)
            sent = time.monotonic()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        took = time.monotonic() - sent
    assert proc.returncode == 130, err
    assert "cancelled" in err.lower() and "Traceback" not in err
    assert took < 10  # it did not wait for the slow answer
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    job = asyncio.run(first_job())
    assert job is not None and job.command_text == "low a slow fox"
    assert (job.status, job.error_code) == ("failed", "cancelled")
    assert job.charged == 0 and not job.actual_credits


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    made = imgbot(tmp_path, "keys", "create", "web:alice", "--name", "laptop")
    assert made.returncode == 0, made.stderr
    plaintext = made.stdout.strip()
    assert plaintext.startswith("ik-") and len(plaintext) == 46 and "shown once" in made.stderr
    listed = imgbot(tmp_path, "keys", "list", "--user", "web:alice")
    assert "#1" in listed.stdout and "laptop" in listed.stdout and "active" in listed.stdout
    assert plaintext not in listed.stdout and plaintext[3:] not in listed.stdout
    assert imgbot(tmp_path, "keys", "revoke", "1").returncode == 0
    again = imgbot(tmp_path, "keys", "revoke", "1")
    assert again.returncode == 1 and "no active key" in again.stderr
    assert "revoked" in imgbot(tmp_path, "keys", "list").stdout
    bad = imgbot(tmp_path, "keys", "create", "alice")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    bad = imgbot(tmp_path, "keys", "create", "web:al ice")
    assert bad.returncode == 2 and "web user name" in bad.stderr


def test_run_without_tokens_starts_the_web_door_alone(tmp_path: Path) -> None:
    import signal
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**_env(tmp_path, WEB_PORT=str(port)), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bots.cli", "run"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(4)]
        said = "".join(lines)
        assert f"web page at http://127.0.0.1:{port}/\n" in said, (
            said, proc.stderr.read() if proc.poll() else "")
        assert f"http://127.0.0.1:{port}/v1" in said
        # The operator's one-time sign-in link: it opens a session once, never twice.
        link = lines[3].strip()
        assert link.startswith(f"http://127.0.0.1:{port}/#signin="), said
        import httpx

        answer = httpx.get(f"http://127.0.0.1:{port}/v1/models")
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
        code = {"code": link.split("#signin=", 1)[1]}
        session = httpx.post(f"http://127.0.0.1:{port}/web/api/session/link", json=code)
        assert session.status_code == 200 and session.json()["me"]["admin"] is True
        again = httpx.post(f"http://127.0.0.1:{port}/web/api/session/link", json=code)
        assert again.status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_gen_saves_previews_only_with_partials(tmp_path: Path) -> None:
    with FakeImageAPI(key=TEST_KEY, delay=0.6) as api:
        plain = imgbot(tmp_path, "gen", "3:2 low a red fox", "-o", "plain", api=api)
        saved = imgbot(
            tmp_path, "gen", "3:2 low a red fox", "--partials", "-o", "with", api=api,
            PREVIEW_COUNT="3",
        )
        sent = [r.json or {} for r in api.api_requests]
    assert plain.returncode == 0 and saved.returncode == 0, saved.stderr
    # Without --partials nothing is streamed (nor paid for): one image, no preview.
    assert [bool(s.get("stream")) for s in sent] == [False, True]
    assert [f.name.endswith("-1.png") for f in (tmp_path / "plain").iterdir()] == [True]
    files = sorted(f.name for f in (tmp_path / "with").iterdir())
    previews = [f for f in files if "-preview" in f]
    assert [f.rsplit("-", 1)[1] for f in previews] == ["preview1.png", "preview2.png", "preview3.png"]
    assert len(files) == 4
    for name in previews:
        with Image.open(tmp_path / "with" / name) as image:
            assert image.size == (1008, 672)
    assert saved.stdout.count("  preview ") == 3 and "credits ≈ ¥" in saved.stdout


async def test_doctor_lists_processes_and_roles_and_counts_passing_leases(tmp_path: Path) -> None:
    # What an operator reads about replicas: each live process with its roles, the roles one
    # process may hold with their holder; the short leases of updates and albums being
    # handled are counted, not listed one by one.
    from bots.doctor import _replicas
    from core.store import Limits, open_store

    store = await open_store(f"sqlite:///{tmp_path}/ledger.db", Limits())
    try:
        info = json.dumps({"roles": ["telegram:webhook"], "jobs": 2})
        assert await store.hold_lease("replica:host-a:1", "host-a:1", 60, info)
        assert await store.hold_lease("replica:host-b:2", "host-b:2", 60, info)
        assert await store.hold_lease("discord:shard:0", "host-a:1", 60, "")
        for update_id in (5001, 5002):
            assert await store.hold_lease(f"tg:inbox:{update_id:015d}", "host-b:2", 60, "")
        assert await store.hold_lease("tg:album:-100:g1:owner", "host-a:1", 60, "")
        assert await store.hold_lease("tg:chat:4001", "host-a:1", 60, "")
        assert await store.hold_lease("discord:identify", "host-b:2:identify:0:1", 60, "")
        said = await _replicas(store)
    finally:
        await store.close()
    assert "2 process(es) running" in said
    assert "host-a:1 [telegram:webhook; 2 job(s)]" in said
    assert "roles held: discord:shard:0 → host-a:1" in said
    assert "tg:inbox" not in said and "tg:album" not in said and "tg:chat" not in said
    assert "being handled: 2 Telegram update(s), 1 album lease(s)" in said
    assert "turns: 1 Telegram chat(s) being sent to, Discord IDENTIFY taken" in said
    assert "discord:identify →" not in said
