"""Telegram Mini App sign-in: checking the `initData` Telegram hands a page it opens.

Telegram's documented scheme (Bot API, "Validating data received via the Mini App"):

    secret   = HMAC_SHA256(key="WebAppData", msg=bot_token)
    expected = hex(HMAC_SHA256(key=secret, msg=data_check_string))

where `data_check_string` is every received field but `hash`, sorted by name, each as
`name=value`, joined by "\\n". The data is refused when `hash` differs, when `auth_date` is
older than `MAX_AGE_S` (a copied initData must not open a session forever) or in the future,
and when it does not name a user. Only the bot token can sign; nothing here logs it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl

# How old a signed initData may be when it is used to sign in. Telegram signs it when the
# Mini App opens; the page exchanges it for a session at once, so an hour is plenty.
MAX_AGE_S = 3600
# Clocks differ a little: an auth_date this far ahead of ours is still taken.
CLOCK_SKEW_S = 60
# Telegram's initData is well under a kilobyte; anything far larger is not from it.
MAX_INIT_DATA_CHARS = 8192


class InitDataRefused(Exception):
    """The initData is not Telegram's, too old, or says nothing usable; `key` names why."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key  # web.tg_bad | web.tg_expired


@dataclass(frozen=True)
class MiniAppUser:
    """The Telegram user a verified initData names."""

    id: int
    first_name: str = ""
    last_name: str = ""
    username: str = ""
    language_code: str | None = None

    @property
    def display_name(self) -> str:
        """Return the name to record, as the bot would (full name, else @username, else id)."""
        full = " ".join(part for part in (self.first_name, self.last_name) if part)
        return full or self.username or str(self.id)


def data_check_string(fields: dict[str, str]) -> str:
    """Return the text Telegram signs: every field but `hash`, sorted, `k=v` per line."""
    return "\n".join(f"{k}={fields[k]}" for k in sorted(fields) if k != "hash")


def expected_hash(fields: dict[str, str], bot_token: str) -> str:
    """Return the hex signature Telegram puts in `hash` for these fields."""
    secret = hmac.new(b"WebAppData", bot_token.encode(), hashlib.sha256).digest()
    return hmac.new(secret, data_check_string(fields).encode(), hashlib.sha256).hexdigest()


def verify_init_data(
    init_data: str, bot_token: str, *, max_age: float = MAX_AGE_S, now: float | None = None
) -> MiniAppUser:
    """Return the user a Telegram-signed initData names, or raise InitDataRefused."""
    if not bot_token or not init_data or len(init_data) > MAX_INIT_DATA_CHARS:
        raise InitDataRefused("web.tg_bad")
    try:
        pairs = parse_qsl(init_data, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise InitDataRefused("web.tg_bad") from None
    fields = dict(pairs)
    if len(fields) != len(pairs):  # a field twice: not what Telegram sends
        raise InitDataRefused("web.tg_bad")
    given = fields.get("hash", "")
    if not hmac.compare_digest(given.encode(), expected_hash(fields, bot_token).encode()):
        raise InitDataRefused("web.tg_bad")
    # Signed by Telegram from here on: what is wrong now is its age or its content.
    try:
        auth_date = int(fields.get("auth_date", ""))
    except ValueError:
        raise InitDataRefused("web.tg_bad") from None
    now = time.time() if now is None else now
    if auth_date > now + CLOCK_SKEW_S:
        raise InitDataRefused("web.tg_bad")
    if now - auth_date > max_age:
        raise InitDataRefused("web.tg_expired")
    try:
        user = json.loads(fields.get("user", ""))
        user_id = user["id"]
    except (ValueError, TypeError, KeyError):
        raise InitDataRefused("web.tg_bad") from None
    if not isinstance(user_id, int) or isinstance(user_id, bool) or user_id <= 0:
        raise InitDataRefused("web.tg_bad")

    def part(name: str) -> str:
        value = user.get(name)
        return value if isinstance(value, str) else ""

    return MiniAppUser(
        id=user_id,
        first_name=part("first_name"),
        last_name=part("last_name"),
        username=part("username"),
        language_code=part("language_code") or None,
    )
