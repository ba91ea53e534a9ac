"""Secrets: no API key or bot token in a log line, an error, a reply, a repr, a file or output.

Every test of the suite runs under `tests.secret_guard` (a pytest plugin on by default);
this file proves the guard is on, that it catches each kind of leak (without leaving a
failing test behind), and adds the end-to-end checks the other suites lack: every upstream
fault through the pipeline with a proxy echoing the key, the ledger file on disk, `url`
results fetched without the key, the Discord token through discord.py's real HTTP client,
the webhook secret, and the terminal command at LOG_LEVEL=DEBUG.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import threading
import tomllib
import traceback
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import discord
import pytest

from bots.discord.app import build_bot, sync_commands
from bots.logs import secrets_of, setup_logging
from core.config import Settings, SettingsError, load_settings
from core.errors import UpstreamError
from core.messages import text as message_text
from core.requester import Requester
from core.runtime import open_service
from tests import secret_guard as guard
from tests.fake_api import FAULTS, FakeImageAPI
from tests.secret_guard import (
    DISCORD_TEST_TOKEN,
    KNOWN_SECRETS,
    TELEGRAM_TEST_TOKEN,
    TEST_API_KEY,
    WEBHOOK_TEST_SECRET,
    SecretLeak,
    SecretWatch,
    find_secrets,
    raise_if_leaked,
)

ROOT = Path(__file__).resolve().parent.parent
ALICE = Requester("telegram", "1", "-100", "Alice", "en", is_group=True)


# --- the guard is on, knows the harnesses' secrets, and can fail ------------------------------


def test_the_guard_knows_every_secret_the_harnesses_use() -> None:
    from tests import conftest, telegram_fake, test_cli, test_logs, test_webhook

    harness_secrets = {
        conftest.TEST_KEY,
        telegram_fake.TOKEN,
        test_cli.TG_TOKEN,
        test_logs.KEY,
        test_logs.TOKEN,
        test_webhook.SECRET,
    }
    assert harness_secrets <= set(KNOWN_SECRETS)
    for secret in KNOWN_SECRETS:
        assert find_secrets(f"... {secret} ...") and find_secrets(secret.upper())


def test_the_guard_is_on_for_every_test(request: pytest.FixtureRequest) -> None:
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
    assert "-p tests.secret_guard" in options["ini_options"]["addopts"]
    assert request.config.pluginmanager.has_plugin("tests.secret_guard")
    # Autouse in a plugin: every test of every file — Telegram, Discord, CLI — gets it.
    assert "secret_guard" in request.fixturenames
    root = logging.getLogger()
    assert root.level == logging.DEBUG
    assert any(isinstance(h, SecretWatch) for h in root.handlers)
    assert logging.getLogger("imgbot.anything").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("telegram").getEffectiveLevel() == logging.INFO
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
    # What test_cli's subprocess.run(capture_output=True) reads goes through the guard too.
    assert "_wrap_communicate" in subprocess.Popen.communicate.__qualname__


def test_the_guard_mirrors_the_production_library_levels() -> None:
    root = logging.getLogger()
    before = list(root.handlers)  # setup_logging replaces them all, the guard's included
    handler = setup_logging(Settings(_env_file=None), level="DEBUG", stream=io.StringIO())  # type: ignore[call-arg]
    try:
        for name, level in guard.PRODUCTION_LEVELS.items():
            assert logging.getLogger(name).level == level, name
    finally:
        root.removeHandler(handler)
        for old in before:
            root.addHandler(old)


@pytest.mark.parametrize(
    ("text", "found"),
    [
        (f"Authorization: Bearer {TEST_API_KEY}", 1),
        (f"https://api.telegram.org/bot{TELEGRAM_TEST_TOKEN}/getMe", 1),
        (json.dumps({"token": DISCORD_TEST_TOKEN}), 1),
        (TEST_API_KEY.upper(), 1),
        ("an unknown key sk-proj-AbCdEfGhIjKlMnOpQrStUv in a message", 1),
        ("an unknown token 987654321:ZYXWVUTSRQPONMLKJIHGFEDCBAzyxwvut", 1),
        ("Nzk0NTYxMjM0NTY3ODkwMTIz.GhIjKl.AbCdEfGhIjKlMnOpQrStUvWxYz0123456", 1),
        ("sk-short, desk-lamp-with-a-very-long-name-indeed, 12:34, 16:9", 0),
        ("job 42 failed: code=insufficient_quota 550e8400-e29b-41d4-a716-446655440000", 0),
    ],
)
def test_find_secrets(text: str, found: int) -> None:
    hits = find_secrets(text)
    assert len(hits) == found
    for hit in hits:  # the report names the secret without repeating it
        assert not any(secret in hit for secret in KNOWN_SECRETS) and "…" in hit


def isolated_logger(findings: list[str]) -> logging.Logger:
    """A logger that reaches only a fresh guard handler, not the real one of this test."""
    log = logging.getLogger(f"secret_guard_selftest.{len(findings)}.{id(findings)}")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    log.handlers = [SecretWatch(findings)]
    return log


def test_a_secret_in_a_log_record_is_caught() -> None:
    cases: list[Callable[[logging.Logger], None]] = [
        lambda log: log.debug("calling with key %s", TEST_API_KEY),
        lambda log: log.info("token=" + TELEGRAM_TEST_TOKEN),
        lambda log: log.warning("%r", {"discord": DISCORD_TEST_TOKEN}),
        lambda log: log.error("boom", exc_info=RuntimeError(f"failed with {TEST_API_KEY}")),
        lambda log: log.error("broken %s %s", WEBHOOK_TEST_SECRET),  # bad format, still seen
    ]
    for case in cases:
        findings: list[str] = []
        case(isolated_logger(findings))
        assert len(findings) == 1, findings
        with pytest.raises(SecretLeak, match="a secret was let out"):
            raise_if_leaked(findings)


def test_what_production_scrubbing_hides_by_shape_is_not_a_leak() -> None:
    findings: list[str] = []
    log = isolated_logger(findings)
    # python-telegram-bot at DEBUG: the bot URL (masked by shape, whatever the config) …
    log.debug("Set Bot API URL: https://api.telegram.org/bot%s", TELEGRAM_TEST_TOKEN)
    log.debug("header Authorization: Bearer %s", TEST_API_KEY)
    assert findings == []
    raise_if_leaked(findings)
    # … and the webhook secret only in the one PTB line the configured secrets mask.
    ptb = logging.getLogger("telegram.ext.ExtBot")
    record = ptb.makeRecord(
        ptb.name,
        logging.DEBUG,
        __file__,
        1,
        "Calling Bot API endpoint `%s` with parameters `%s`",
        ("setWebhook", {"secret_token": WEBHOOK_TEST_SECRET}),
        None,
    )
    SecretWatch(findings).handle(record)
    assert findings == []
    log.debug("Calling Bot API endpoint `setWebhook` with %s", WEBHOOK_TEST_SECRET)
    assert len(findings) == 1


def test_a_secret_in_output_or_subprocess_output_is_caught() -> None:
    findings: list[str] = []
    guard.check_output(findings, "stdout", f"token {TELEGRAM_TEST_TOKEN}".encode())

    def original(self: object, *args: object) -> tuple[bytes, str]:
        return b"clean", f"key {TEST_API_KEY}"

    out, err = guard._wrap_communicate(original, findings, "subprocess")(object())
    assert out == b"clean" and TEST_API_KEY in err  # passed through untouched …
    assert [f.split(":")[0] for f in findings] == ["stdout", "subprocess stderr"]  # … and noted
    with pytest.raises(SecretLeak):
        raise_if_leaked(findings)
    with pytest.raises(SecretLeak):
        raise_if_leaked(findings, already=1)
    raise_if_leaked(findings, already=2)  # nothing new since


INNER_TESTS = """
import logging, subprocess, sys
from tests.secret_guard import TEST_API_KEY, TELEGRAM_TEST_TOKEN

def test_logs_a_key():
    logging.getLogger("imgbot.inner").warning("using key %s", TEST_API_KEY)

def test_prints_a_token():
    print("token:", TELEGRAM_TEST_TOKEN)

def test_a_subprocess_prints_a_key():
    code = "import tests.secret_guard as g; print(g.TEST_API_KEY)"
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

def test_reads_a_token_through_capsys(capsys):
    print(TELEGRAM_TEST_TOKEN)
    assert capsys.readouterr().out

def test_clean():
    logging.getLogger("imgbot.inner").warning("nothing to see")
    print("hello")
"""


def test_the_plugin_fails_leaking_tests_in_a_real_pytest_run(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.secret_guard", "-p", "no:cacheprovider"]
        + ["--show-capture=no", "-o", f"pythonpath={ROOT}", "--rootdir", str(tmp_path)]
        + ["test_inner.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "400"},
    )
    # This very run's output went through the guard of this test too: no secret in it.
    assert "4 failed, 1 passed" in proc.stdout, proc.stdout + proc.stderr
    for name in (
        "logs_a_key",
        "prints_a_token",
        "a_subprocess_prints_a_key",
        "reads_a_token_through_capsys",
    ):
        assert f"FAILED test_inner.py::test_{name} - secret_guard: a secret was let out" in (
            proc.stdout
        )
    assert "known secret sk-tes…" in proc.stdout and "known secret 123456…" in proc.stdout


# --- settings, errors, ledger, downloads ------------------------------------------------------


def test_settings_never_show_a_secret() -> None:
    s = Settings(  # type: ignore[call-arg]
        _env_file=None,
        openai_api_key=TEST_API_KEY,
        telegram_bot_token=TELEGRAM_TEST_TOKEN,
        telegram_webhook_secret=WEBHOOK_TEST_SECRET,
        discord_bot_token=DISCORD_TEST_TOKEN,
    )
    shown = [repr(s), str(s), str(s.model_dump()), s.model_dump_json(), f"{s!r:>10}"]
    for text in shown:
        assert find_secrets(text) == [], text[:200]
    assert set(secrets_of(s)) == {
        TEST_API_KEY,
        TELEGRAM_TEST_TOKEN,
        WEBHOOK_TEST_SECRET,
        DISCORD_TEST_TOKEN,
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"max_n": 0},
        {"openai_base_url": f"ftp://{TEST_API_KEY}"},
        {"default_n": 9, "max_n": 2},
        {"telegram_webhook_port": 0, "database_url": "postgres://db"},
    ],
)
def test_a_settings_error_names_the_setting_not_the_secrets(bad: dict[str, Any]) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(
            _env_file=None,
            openai_api_key=TEST_API_KEY,
            telegram_bot_token=TELEGRAM_TEST_TOKEN,
            discord_bot_token=DISCORD_TEST_TOKEN,
            **bad,
        )
    shown = str(caught.value) + "".join(traceback.format_exception(caught.value))
    assert find_secrets(shown) == []


async def test_no_upstream_fault_shows_the_key_anywhere(
    settings: Callable[..., Settings],
    fake_api: FakeImageAPI,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    config = settings(
        database_url=f"sqlite:///{tmp_path}/ledger.db",
        request_timeout=0.5,
        max_retries=1,
        retry_after_cap=0.01,
        max_download_bytes=1_000_000,
        rate_limit_per_minute=0,
        progress_interval=0.05,
    )
    shown: list[str] = []
    failed = 0
    async with open_service(config) as service:
        for fault in FAULTS:
            extra: dict[str, Any] = {"status": 418} if fault == "status" else {}
            if fault in ("hang", "slow"):
                extra["seconds"] = 2
            # A proxy that echoes the key it was sent, in every error it can.
            fake_api.inject(fault, times=2, echo_key=True, **extra)
            try:
                outcome = await service.draw(ALICE, f"low a cat for {fault}")
            except UpstreamError as err:
                failed += 1
                shown += [
                    str(err),
                    repr(err),
                    err.detail,
                    *(err.user_message(x) for x in "en zh".split()),
                ]
                shown.append("".join(traceback.format_exception(err)))
            else:
                shown.append(repr(outcome))
            fake_api.reset()
        shown.append(await service.ledger.export_csv())
        shown.append(repr(service.client) + repr(service.settings))
    assert failed >= len(FAULTS) - 6  # slow/trickle may make it; most faults fail
    assert "***" in " ".join(shown)  # the echoed key was there, and was redacted
    for text in shown:
        assert find_secrets(text) == [], text[:300]
    assert find_secrets(caplog.text) == []
    # Nor on disk: the ledger file and its write-ahead log.
    assert TEST_API_KEY.encode() not in await asyncio.to_thread(ledger_bytes, tmp_path)


def ledger_bytes(folder: Path) -> bytes:
    """Return the ledger file and its WAL and shared-memory files, concatenated."""
    files = sorted(folder.glob("ledger.db*"))
    assert files
    return b"".join(path.read_bytes() for path in files)


async def test_url_results_are_fetched_without_the_key(
    settings: Callable[..., Settings], tmp_path: Path
) -> None:
    with FakeImageAPI(key=TEST_API_KEY, mode="url") as api:
        config = settings(
            openai_base_url=api.base_url,
            response_format="url",
            database_url=f"sqlite:///{tmp_path}/ledger.db",
        )
        async with open_service(config) as service:
            outcome = await service.draw(ALICE, "low x2 two cats")
        assert len(outcome.images) == 2
        posts = [r for r in api.requests if r.method == "POST"]
        downloads = [r for r in api.requests if r.method == "GET"]
        assert [r.authorized for r in posts] == [True]
        # The image host is whoever the answer names: it never gets the API key.
        assert len(downloads) == 2 and not any(r.authorized for r in downloads)


# --- Discord: the bot token through discord.py's own HTTP client -------------------------------

APP_ID = 1100000000000000001
GUILD_ID = 1200000000000000001


class _DiscordRest(BaseHTTPRequestHandler):
    """Discord's REST API for login and command sync, echoing the token where it fails."""

    seen: list[tuple[str, str, bool]]

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        auth = self.headers.get("Authorization", "")
        good = auth == f"Bot {DISCORD_TEST_TOKEN}"
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.server.seen.append((self.command, self.path, good))  # type: ignore[attr-defined]
        user = {"id": str(APP_ID), "username": "imgbot", "discriminator": "0", "avatar": None}
        if not good:
            self._send(401, {"message": "401: Unauthorized", "code": 0})
        elif self.path == "/api/v10/users/@me":
            self._send(200, {**user, "bot": True})
        elif self.path == "/api/v10/oauth2/applications/@me":
            app = {"id": str(APP_ID), "name": "imgbot", "description": "", "icon": None}
            app |= {"bot_public": True, "bot_require_code_grant": False, "verify_key": "00"}
            self._send(200, app | {"owner": user, "flags": 0})
        elif self.path.endswith(f"/guilds/{GUILD_ID}/commands"):
            self._send(403, {"message": f"Missing Access for {auth}", "code": 50001})
        elif self.path.endswith("/commands"):
            self._send(200, [])
        else:
            self._send(404, {"message": "404: Not Found", "code": 0})

    do_GET = do_PUT = do_POST = _handle  # noqa: N815 - the stdlib's naming

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


@pytest.fixture
def discord_rest(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, str, bool]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _DiscordRest)
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/api/v10"
    monkeypatch.setattr(discord.http.Route, "BASE", base)
    try:
        yield server.seen  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def test_the_discord_token_goes_only_into_the_authorization_header(
    settings: Callable[..., Settings],
    tmp_path: Path,
    discord_rest: list[tuple[str, str, bool]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    config = settings(
        database_url=f"sqlite:///{tmp_path}/ledger.db",
        discord_bot_token=DISCORD_TEST_TOKEN,
        discord_guild_ids=str(GUILD_ID),
    )
    async with open_service(config) as service:
        bot = build_bot(config, service)
        async with bot:
            await bot.login(config.discord_bot_token.get_secret_value())
            # The server refuses the guild sync, quoting the token back: we log the status only.
            await sync_commands(bot, config)
        assert "could not sync Discord commands" in caplog.text and "403" in caplog.text

        wrong = build_bot(config, service)
        async with wrong:
            with pytest.raises(discord.LoginFailure) as caught:
                await wrong.login(DISCORD_TEST_TOKEN[:-4] + "XXXX")
        shown = str(caught.value) + "".join(traceback.format_exception(caught.value))
        assert "Improper token" in shown
    assert [(m, p) for m, p, ok in discord_rest if ok][:2] == [
        ("GET", "/api/v10/users/@me"),
        ("GET", "/api/v10/oauth2/applications/@me"),
    ]
    assert find_secrets(shown) == []
    assert DISCORD_TEST_TOKEN not in caplog.text and find_secrets(caplog.text) == []


# --- the terminal, as a user runs it, at its most talkative -----------------------------------


def test_the_terminal_at_debug_level_shows_no_secret(tmp_path: Path) -> None:
    from tests.test_cli import imgbot

    with FakeImageAPI(key=TEST_API_KEY) as api:
        api.inject("rate_limit", times=1, echo_key=True, retry_after=0)
        ok = imgbot(tmp_path, "gen", "low a cat", "-o", "out", api=api, LOG_LEVEL="DEBUG")
        api.inject("unauthorized", echo_key=True)
        refused = imgbot(tmp_path, "gen", "low a dog", api=api, LOG_LEVEL="DEBUG")
    assert ok.returncode == 0 and refused.returncode == 1, ok.stderr + refused.stderr
    assert "retrying" in ok.stderr  # the log really was talking
    for output in (ok.stdout, ok.stderr, refused.stdout, refused.stderr):
        assert find_secrets(output) == [], output[-500:]


async def test_the_telegram_replies_to_an_echoing_proxy_show_no_key(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    from tests.telegram_fake import FakeBotApi, Updates
    from tests.test_telegram import running

    config = settings(
        database_url=f"sqlite:///{tmp_path}/imgbot.db",
        telegram_bot_token=TELEGRAM_TEST_TOKEN,
        rate_limit_per_minute=0,
        progress_interval=0.05,
    )
    async with running(config, FakeBotApi(), fake_api, Updates()) as tg:
        u = tg.updates
        ann = Updates.user(1001, "Ann", "en")
        for fault in ("unauthorized", "invalid_value", "insufficient_balance", "server_error"):
            fake_api.inject(fault, echo_key=True)
            await tg.send(u.update(u.message(ann, u.private(ann), text="/img low a cat")))
        failures = [t for t in tg.texts() if not t.startswith("🎨")]
        # Only our own words reach the chat: not even the redacted echo of the key.
        assert len(failures) == 4 and "key:" not in " ".join(failures)
        assert message_text("en", "upstream.rejected", ref="HTTP 400, invalid_value") in failures
        for call in tg.api.calls:
            assert find_secrets(json.dumps(call.params, default=str)) == []
