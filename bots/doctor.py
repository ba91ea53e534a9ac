"""`imgbot doctor`: check settings, the API key, each bot token and the database.

Each check prints one line, `ok` or `FAIL` with what to fix. Exit code 0 when nothing failed.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from core.config import Settings
from core.images import api_root
from core.store import Limits, Store, StoreError, open_store

DISCORD_API = "https://discord.com/api/v10"


@dataclass(frozen=True)
class Check:
    """The outcome of one check."""

    name: str
    ok: bool
    message: str
    skipped: bool = False


async def check_api(settings: Settings, http: httpx.AsyncClient) -> Check:
    """Check that the image API answers and accepts the key (GET /v1/models)."""
    key = settings.openai_api_key.get_secret_value()
    if not key:
        return Check("image API", False, "OPENAI_API_KEY is empty: set it in .env")
    url = f"{api_root(settings.openai_base_url)}/models"
    try:
        resp = await http.get(url, headers={"Authorization": f"Bearer {key}"})
    except httpx.HTTPError as err:
        return Check(
            "image API",
            False,
            f"cannot reach {settings.openai_base_url} ({type(err).__name__}): check OPENAI_BASE_URL",
        )
    if resp.status_code in (401, 403):
        return Check("image API", False, "the key was refused (401/403): check OPENAI_API_KEY")
    if resp.status_code == 404:
        return Check(
            "image API",
            True,
            "reachable; it has no /v1/models, so the key could not be verified",
        )
    if resp.status_code >= 400:
        return Check("image API", False, f"answered HTTP {resp.status_code}: check OPENAI_BASE_URL")
    return Check("image API", True, f"key accepted by {settings.openai_base_url}")


async def check_telegram(settings: Settings, http: httpx.AsyncClient) -> Check:
    """Check the Telegram token with getMe."""
    token = settings.telegram_bot_token.get_secret_value()
    if not token:
        return Check("telegram", True, "TELEGRAM_BOT_TOKEN not set (Telegram bot off)", skipped=True)
    url = f"{settings.telegram_api_base_url}/bot{token}/getMe"
    try:
        resp = await http.get(url)
        data = resp.json()
    except (httpx.HTTPError, ValueError) as err:
        return Check(
            "telegram",
            False,
            f"cannot reach the Bot API ({type(err).__name__}): check TELEGRAM_API_BASE_URL",
        )
    if resp.status_code == 200 and data.get("ok"):
        return Check("telegram", True, f"token valid: @{data['result'].get('username', '?')}")
    return Check("telegram", False, "the token was refused: check TELEGRAM_BOT_TOKEN (@BotFather)")


async def check_discord(
    settings: Settings, http: httpx.AsyncClient, api: str = DISCORD_API
) -> Check:
    """Check the Discord token by asking who the bot is."""
    token = settings.discord_bot_token.get_secret_value()
    if not token:
        return Check("discord", True, "DISCORD_BOT_TOKEN not set (Discord bot off)", skipped=True)
    try:
        resp = await http.get(f"{api}/users/@me", headers={"Authorization": f"Bot {token}"})
    except httpx.HTTPError as err:
        return Check("discord", False, f"cannot reach Discord ({type(err).__name__})")
    if resp.status_code == 200:
        return Check("discord", True, f"token valid: {resp.json().get('username', '?')}")
    return Check("discord", False, "the token was refused: check DISCORD_BOT_TOKEN")


async def check_database(settings: Settings) -> Check:
    """Check that the configured store (SQLite or PostgreSQL) opens, migrates and takes a write."""
    where = settings.store_url
    name = where.redacted()  # never the password
    try:
        ledger = await open_store(where, Limits.from_settings(settings), pool_size=2)
    except StoreError as err:
        return Check("database", False, str(err))
    except Exception as err:  # noqa: BLE001 - any failure here is the finding
        return Check("database", False, f"cannot open {name}: {type(err).__name__}")
    try:
        version = await ledger.schema_version()
        await ledger.check_writable()
        running = await _replicas(ledger)
    except Exception as err:  # noqa: BLE001
        return Check("database", False, f"{name} is not writable: {type(err).__name__}: {err}")
    finally:
        await ledger.close()
    return Check("database", True, f"{name} ({where.kind}) writable, schema v{version}{running}")


async def _replicas(ledger: Store) -> str:
    """Describe the `imgbot run` processes the ledger sees alive (their heartbeats), the
    roles each plays, and who holds the roles only one may (a poller, Discord shards)."""
    now = time.time()
    alive = [lease for lease in await ledger.leases("replica:") if lease.until.timestamp() > now]
    if not alive:
        return "; no imgbot run process is using it"
    parts = []
    for lease in alive:
        try:
            info = json.loads(lease.info or "{}")
        except ValueError:
            info = {}
        roles = ", ".join(info.get("roles") or []) or "no front end"
        parts.append(f"{lease.owner} [{roles}; {info.get('jobs', 0)} job(s)]")
    live = [lease for lease in await ledger.leases("") if lease.until.timestamp() > now]
    # Updates and albums being handled, chats' send turns and the Discord IDENTIFY turn
    # hold short leases too: counted, not listed.
    passing = {"tg:inbox:": 0, "tg:album:": 0, "tg:chat:": 0, "discord:identify": 0}
    held = []
    for lease in live:
        prefix = next((p for p in passing if lease.name.startswith(p)), None)
        if prefix is not None:
            passing[prefix] += 1
        elif not lease.name.startswith("replica:"):
            held.append(f"{lease.name} → {lease.owner}")
    roles = f"; roles held: {', '.join(held)}" if held else ""
    busy = passing["tg:inbox:"] + passing["tg:album:"]
    handling = (
        f"; being handled: {passing['tg:inbox:']} Telegram update(s),"
        f" {passing['tg:album:']} album lease(s)" if busy else ""
    )
    if passing["tg:chat:"] or passing["discord:identify"]:
        handling += (f"; turns: {passing['tg:chat:']} Telegram chat(s) being sent to,"
                     f" Discord IDENTIFY {'taken' if passing['discord:identify'] else 'free'}")
    return f"; {len(alive)} process(es) running: {'; '.join(parts)}{roles}{handling}"


async def doctor(
    settings: Settings,
    *,
    out: Callable[[str], None] = print,
    transport: httpx.AsyncBaseTransport | None = None,
    discord_api: str = DISCORD_API,
) -> int:
    """Run every check and print one line each; return 0 when all passed."""
    out("settings: ok (loaded; secrets masked)")
    for warning in settings.id_warnings():
        out(f"settings: WARN - {warning}")
    async with httpx.AsyncClient(timeout=15, transport=transport) as http:
        checks = [
            await check_api(settings, http),
            await check_telegram(settings, http),
            await check_discord(settings, http, discord_api),
            await check_database(settings),
        ]
    for check in checks:
        status = "skip" if check.skipped else ("ok" if check.ok else "FAIL")
        out(f"{check.name}: {status} - {check.message}")
    failed = [c for c in checks if not c.ok]
    if not any(not c.skipped for c in checks if c.name in ("telegram", "discord")):
        out("note: no bot token is set; `imgbot run` needs TELEGRAM_BOT_TOKEN or DISCORD_BOT_TOKEN")
    sys.stdout.flush()
    return 1 if failed else 0
