"""A pytest plugin that fails any test letting a secret out (`-p tests.secret_guard`).

For every test, from its first fixture to its last teardown, it watches:

- every log record of every logger — a handler on the root logger, and the root at DEBUG
  for the test, so `httpx`, `telegram`, `discord` and our own modules all
  speak. The per-library levels are the ones `bots.logs.setup_logging` gives them at
  LOG_LEVEL=DEBUG (httpx and httpcore at WARNING; discord and telegram at INFO), so
  the guard sees what
  the most talkative production configuration could print. A record is checked as the
  production handler would print it, but WITHOUT its list of configured secrets: only the
  scrubber's shape rules (a token inside a `/bot<token>/` URL, a `Bearer` value) may hide a
  secret — python-telegram-bot logs its API URL, token included, at DEBUG. The one
  exception is `SCRUBBED_SITES`: third-party lines known to carry a secret that only the
  configured-secret list hides. Any other appearance of a secret in a record fails;
- what the test printed: pytest's captured stdout/stderr, and whatever `capsys`/`capfd`
  hand to the test;
- the captured output of every subprocess it ran (`subprocess` and `asyncio`
  `communicate`, which `subprocess.run(capture_output=True)` uses too).

A secret is one of `KNOWN_SECRETS` (the keys and tokens the test harnesses use; any case)
or anything shaped like an API key, a Telegram bot token or a Discord bot token
(`SECRET_SHAPES`). A leak fails the test in the phase it happened in, naming where it was
seen, with the secret itself masked.
"""

from __future__ import annotations

import asyncio.subprocess
import logging
import re
import subprocess
import traceback
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest
from _pytest.capture import CaptureFixture

from bots.logs import SecretScrubber

# The secrets of the test harnesses (tests/test_secrets.py checks these stay in step).
TEST_API_KEY = "sk-test-7f3a9c1e5b2d-DO-NOT-LEAK-4e6a8c0e"  # tests/conftest.py TEST_KEY
TELEGRAM_TEST_TOKEN = "123456789:AAFakeTokenForTests_DoNotLeak_0123456789"  # telegram_fake
TELEGRAM_DOCS_TOKEN = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"  # test_cli, test_logs
WEBHOOK_TEST_SECRET = "hook-secret-5b0d2c7e"  # tests/test_webhook.py
LEAKY_TEST_KEY = "sk-leaky-api-key-0123456789"  # tests/test_logs.py
# A Discord bot token in the real shape; tests/test_secrets.py runs the bot with it.
DISCORD_TEST_TOKEN = "MTEwMDAwMDAwMDAwMDAwMDAwMQ.GfAkE0.discord-test-token-DO-NOT-LEAK-0123"
# The throwaway PostgreSQL server's password: it must never reach a message or a log.
from tests.pg_server import PASSWORD as PG_TEST_PASSWORD  # noqa: E402

KNOWN_SECRETS = (
    PG_TEST_PASSWORD,
    TEST_API_KEY,
    TELEGRAM_TEST_TOKEN,
    TELEGRAM_DOCS_TOKEN,
    WEBHOOK_TEST_SECRET,
    LEAKY_TEST_KEY,
    DISCORD_TEST_TOKEN,
)
SECRET_SHAPES = {
    "an API key": re.compile(r"\b(?:sk|hk)-[A-Za-z0-9_-]{20,}"),
    "a Telegram bot token": re.compile(r"\b\d{5,}:[A-Za-z0-9_-]{30,}"),
    "a Discord bot token": re.compile(
        r"\b[MNO][A-Za-z0-9_-]{23,27}\.[A-Za-z0-9_-]{6}\.[A-Za-z0-9_-]{27,}"
    ),
}
# Shaped like a secret, known to be none (none so far: keep this list short and explained).
NOT_SECRETS: frozenset[str] = frozenset()
# What bots.logs.setup_logging sets at LOG_LEVEL=DEBUG.
PRODUCTION_LEVELS = {
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
    "aiosqlite": logging.WARNING,
    "discord": logging.INFO,
    "telegram": logging.INFO,
}

# The production scrubber with no configured secrets: its shape rules only.
SHAPE_SCRUBBER = SecretScrubber(())
# python-telegram-bot logs every call's parameters at DEBUG, setWebhook's secret_token among
# them; in production only the configured-secret list masks it. Each site: (logger, start
# of the printed message). Keep this list short: every entry is a secret in a raw record.
SCRUBBED_SITES = (("telegram.ext.ExtBot", "Calling Bot API endpoint `setWebhook`"),)
FULL_SCRUBBER = SecretScrubber(KNOWN_SECRETS)

_KNOWN = re.compile("|".join(re.escape(s) for s in KNOWN_SECRETS), re.IGNORECASE)
_FINDINGS = pytest.StashKey[list[str]]()
_REPORTED = pytest.StashKey[int]()


class SecretLeak(AssertionError):
    """A secret showed up where anyone could read it."""


def mask(secret: str) -> str:
    """Return a secret shortened enough to name it without repeating it."""
    return secret[:6] + "…" if len(secret) > 8 else "***"


def find_secrets(text: str) -> list[str]:
    """Return a masked description of every secret in `text`."""
    if not text:
        return []
    found = [f"known secret {mask(m.group(0))}" for m in _KNOWN.finditer(text)]
    for what, shape in SECRET_SHAPES.items():
        for m in shape.finditer(text):
            value = m.group(0)
            if value not in NOT_SECRETS and not _KNOWN.fullmatch(value):
                found.append(f"{what} {mask(value)}")
    return found


def record_text(record: logging.LogRecord) -> str:
    """Return everything a formatter could print of a record: message, traceback, stack."""
    try:
        parts = [record.getMessage()]
    except Exception:  # noqa: BLE001 - a broken format string still shows its pieces
        parts = [str(record.msg), repr(record.args)]
    if record.exc_info and record.exc_info[1] is not None:
        parts.append("".join(traceback.format_exception(record.exc_info[1])))
    elif record.exc_text:
        parts.append(record.exc_text)
    if record.stack_info:
        parts.append(record.stack_info)
    return "\n".join(parts)


class SecretWatch(logging.Handler):
    """A logging handler that notes every record carrying a secret."""

    def __init__(self, findings: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.findings = findings

    def emit(self, record: logging.LogRecord) -> None:
        text = record_text(record)
        known_site = any(
            record.name == name and text.startswith(start) for name, start in SCRUBBED_SITES
        )
        scrubber = FULL_SCRUBBER if known_site else SHAPE_SCRUBBER
        for leak in find_secrets(scrubber.scrub(text)):
            self.findings.append(f"log record of {record.name!r} ({record.levelname}): {leak}")


def check_output(findings: list[str], where: str, output: str | bytes | None) -> None:
    """Note the secrets in some output (text or bytes)."""
    if isinstance(output, bytes):
        output = output.decode("utf-8", "replace")
    for leak in find_secrets(output or ""):
        findings.append(f"{where}: {leak}")


def raise_if_leaked(findings: list[str], already: int = 0) -> None:
    """Raise SecretLeak naming the findings after the first `already` ones."""
    new = findings[already:]
    if new:
        lines = "\n  ".join(dict.fromkeys(new))
        raise SecretLeak(f"secret_guard: a secret was let out\n  {lines}")


def _wrap_communicate(
    original: Callable[..., Any], findings: list[str], where: str
) -> Callable[..., Any]:
    def communicate(self: Any, *args: Any, **kwargs: Any) -> Any:
        out, err = original(self, *args, **kwargs)
        check_output(findings, f"{where} stdout", out)
        check_output(findings, f"{where} stderr", err)
        return out, err

    return communicate


def _wrap_async_communicate(original: Callable[..., Any], findings: list[str]) -> Any:
    async def communicate(self: Any, *args: Any, **kwargs: Any) -> Any:
        out, err = await original(self, *args, **kwargs)
        check_output(findings, "asyncio subprocess stdout", out)
        check_output(findings, "asyncio subprocess stderr", err)
        return out, err

    return communicate


def _wrap_readouterr(original: Callable[..., Any], findings: list[str]) -> Any:
    def readouterr(self: Any) -> Any:
        captured = original(self)
        check_output(findings, "captured stdout", captured.out)
        check_output(findings, "captured stderr", captured.err)
        return captured

    return readouterr


@pytest.fixture(autouse=True)
def secret_guard(request: pytest.FixtureRequest) -> Iterator[SecretWatch]:
    """Watch the test's logs, output and subprocess output for secrets."""
    findings = request.node.stash.setdefault(_FINDINGS, [])
    watch = SecretWatch(findings)
    root = logging.getLogger()
    saved = {name: logging.getLogger(name).level for name in PRODUCTION_LEVELS}
    root_level = root.level
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            subprocess.Popen,
            "communicate",
            _wrap_communicate(subprocess.Popen.communicate, findings, "subprocess"),
        )
        patch.setattr(
            asyncio.subprocess.Process,
            "communicate",
            _wrap_async_communicate(asyncio.subprocess.Process.communicate, findings),
        )
        patch.setattr(
            CaptureFixture, "readouterr", _wrap_readouterr(CaptureFixture.readouterr, findings)
        )
        root.addHandler(watch)
        root.setLevel(logging.DEBUG)
        for name, level in PRODUCTION_LEVELS.items():
            logging.getLogger(name).setLevel(level)
        try:
            yield watch
        finally:
            root.removeHandler(watch)
            root.setLevel(root_level)
            for name, level in saved.items():
                logging.getLogger(name).setLevel(level)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Fail the phase of a test in which a secret was let out."""
    report = yield
    findings = item.stash.get(_FINDINGS, None)
    if findings is None:
        return report
    for title, content in report.sections:
        if title in (f"Captured stdout {report.when}", f"Captured stderr {report.when}"):
            check_output(findings, title.lower(), content)
    already = item.stash.get(_REPORTED, 0)
    item.stash[_REPORTED] = len(findings)
    try:
        raise_if_leaked(findings, already)
    except SecretLeak as leak:
        if report.passed:
            report.outcome = "failed"
            report.longrepr = str(leak)
        elif report.failed:
            report.sections.append(("secret_guard", str(leak)))
    return report
