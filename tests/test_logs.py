"""Logging: secrets are scrubbed from messages, arguments and tracebacks; JSON lines."""

from __future__ import annotations

import io
import json
import logging

from bots.logs import setup_logging
from core.config import Settings

KEY = "sk-leaky-api-key-0123456789"
TOKEN = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"


def _settings(**extra: object) -> Settings:
    return Settings(openai_api_key=KEY, telegram_bot_token=TOKEN, **extra)


def test_known_secrets_and_token_urls_are_scrubbed() -> None:
    out = io.StringIO()
    handler = setup_logging(_settings(), stream=out)
    try:
        log = logging.getLogger("imgbot.test")
        log.warning("calling https://api.telegram.org/bot%s/getMe", TOKEN)
        log.warning("header Authorization: Bearer %s", KEY)
        log.warning("unknown token https://x/file/bot987654321:ABCDEFGHIJKLMNOPQRSTUVWXYZ/a.jpg")
        try:
            raise RuntimeError(f"failed with {KEY}")
        except RuntimeError:
            log.exception("boom")
    finally:
        logging.getLogger().removeHandler(handler)
    text = out.getvalue()
    assert KEY not in text and TOKEN not in text
    assert "ABCDEFGHIJKLMNOPQRSTUVWXYZ" not in text
    assert text.count("***") >= 4
    assert "RuntimeError" in text  # the traceback is kept, only the secret is masked


def test_json_lines() -> None:
    out = io.StringIO()
    handler = setup_logging(_settings(log_json=True), stream=out)
    try:
        logging.getLogger("imgbot.test").info("job done credits=%d", 773)
    finally:
        logging.getLogger().removeHandler(handler)
    record = json.loads(out.getvalue().strip())
    assert record["message"] == "job done credits=773" and record["level"] == "INFO"


def test_httpx_urls_not_logged_at_info() -> None:
    handler = setup_logging(_settings(), stream=io.StringIO())
    try:
        assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING
    finally:
        logging.getLogger().removeHandler(handler)


def test_one_scrubber_masks_a_token_in_any_case() -> None:
    # PTB rewrites the case of some error texts; the Telegram handlers and Discord's trace
    # logging both scrub through this one helper.
    from bots.logs import SecretScrubber, scrub_secrets

    shouted = f"Conflict: https://api.telegram.org/BOT{TOKEN.upper()}/getUpdates"
    assert TOKEN.upper() not in SecretScrubber([TOKEN]).scrub(shouted)
    assert scrub_secrets(f"token {TOKEN.lower()} in a trace", TOKEN) == "token *** in a trace"
    assert scrub_secrets("nothing secret", "") == "nothing secret"


def test_the_database_password_is_scrubbed_too() -> None:
    password = "db-pass-7f3a91c2"  # noqa: S105 - a test value
    out = io.StringIO()
    handler = setup_logging(
        _settings(database_url=f"postgresql://imgbot:{password}@db.example:5432/imgbot"),
        stream=out,
    )
    try:
        logging.getLogger("imgbot.test").error("asyncpg said: bad login for %s", password)
    finally:
        logging.getLogger().removeHandler(handler)
    text = out.getvalue()
    assert password not in text and "bad login for ***" in text
