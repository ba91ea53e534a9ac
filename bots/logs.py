"""Logging, configured once in the entry point: plain or JSON lines, secrets scrubbed."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from urllib.parse import urlsplit

from core.config import Settings

# Telegram URLs carry the token as /bot<token>/; scrub that shape even for unknown tokens.
_BOT_URL = re.compile(r"(/(?:file/)?bot)\d+:[A-Za-z0-9_-]{20,}", re.IGNORECASE)
_BEARER = re.compile(r"(Bearer\s+)[^\s'\"]+", re.IGNORECASE)


class SecretScrubber(logging.Filter):
    """Replace every known secret in a record's message and traceback with '***'."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        known = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)
        # Any case: some libraries rewrite the case of their error texts (PTB does).
        self._secrets = (
            re.compile("|".join(map(re.escape, known)), re.IGNORECASE) if known else None
        )

    def scrub(self, value: str) -> str:
        """Return the text with every secret, and every bot-token URL, masked."""
        if self._secrets is not None:
            value = self._secrets.sub("***", value)
        value = _BOT_URL.sub(r"\1***", value)
        return _BEARER.sub(r"\1***", value)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.scrub(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True


def scrub_secrets(value: str, *secrets: str) -> str:
    """Return the text with the given secrets (any case) and bot-token URLs masked."""
    return SecretScrubber(secrets).scrub(value)


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_text:
            data["exception"] = record.exc_text
        return json.dumps(data, ensure_ascii=False)


def secrets_of(settings: Settings) -> list[str]:
    """Return every secret value in the settings (the database password included)."""
    found = [
        settings.openai_api_key.get_secret_value(),
        settings.telegram_bot_token.get_secret_value(),
        settings.telegram_webhook_secret.get_secret_value(),
        settings.discord_bot_token.get_secret_value(),
    ]
    password = database_password(settings.database_url)
    return [*found, password] if password else found


def database_password(url: str) -> str:
    """Return the password in a PostgreSQL DATABASE_URL, or '' (SQLite has none)."""
    try:
        return urlsplit(url).password or ""
    except ValueError:
        return ""


def setup_logging(settings: Settings, *, level: str | None = None, stream=None) -> logging.Handler:
    """Install one handler on the root logger; return it."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(SecretScrubber(secrets_of(settings)))
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level or settings.log_level)
    # httpx logs every URL at INFO, and Telegram's URLs contain the bot token.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # aiosqlite logs every statement with its values at DEBUG: prompts and names.
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
    # At DEBUG the Telegram library logs the bot URL (token inside) and call parameters.
    for noisy in ("discord", "telegram"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
    return handler
