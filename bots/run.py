"""`imgbot run`: every bot whose token is set, and the web API, in one event loop, sharing one
service."""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from core.config import Settings
from core.runtime import open_service
from core.service import ImageService

log = logging.getLogger(__name__)

HEARTBEAT_EVERY = 30.0
HEARTBEAT_STALE = 120.0


def heartbeat_path(settings: Settings) -> Path:
    """Return the file the running bot touches, in the data folder."""
    return settings.data_path / "imgbot.heartbeat"


def health(settings: Settings) -> int:
    """Exit 0 when a running bot touched its heartbeat file recently (Docker HEALTHCHECK)."""
    try:
        age = time.time() - heartbeat_path(settings).stat().st_mtime
    except OSError:
        print("unhealthy: no heartbeat file (is `imgbot run` running?)", file=sys.stderr)
        return 1
    if age > HEARTBEAT_STALE:
        print(f"unhealthy: last heartbeat {age:.0f}s ago", file=sys.stderr)
        return 1
    print(f"healthy: last heartbeat {age:.0f}s ago")
    return 0


async def _beat(path: Path) -> None:
    # Beside a SQLite ledger the folder exists; with PostgreSQL it may not yet.
    await asyncio.to_thread(path.parent.mkdir, mode=0o700, parents=True, exist_ok=True)
    while True:
        await asyncio.to_thread(path.touch)
        await asyncio.sleep(HEARTBEAT_EVERY)

NO_TOKEN = """No bot token is set and the web API is off (WEB_PORT=0): nothing to run.

Fill in at least one of these in .env (copy .env.example to .env first):
  TELEGRAM_BOT_TOKEN=123456:ABC…   from @BotFather in Telegram
  DISCORD_BOT_TOKEN=…              from https://discord.com/developers/applications
and the image API:
  OPENAI_API_KEY=sk-…
  OPENAI_BASE_URL=https://api.openai.com/v1   (or your OpenAI-compatible proxy)
Then run `imgbot doctor` to check everything, and `imgbot run` again."""


RunFrontEnd = Callable[[Settings, ImageService, asyncio.Event], Awaitable[None]]


@dataclass(frozen=True)
class FrontEnd:
    """One front end: its name, when it is on, and where its `run(settings, service, stop)` is."""

    name: str
    enabled: Callable[[Settings], bool]
    module: str  # imported only when enabled: a front end's library loads only if used
    run: str

    def load(self) -> RunFrontEnd:
        """Import the front end and return its run function."""
        return cast(RunFrontEnd, getattr(importlib.import_module(self.module), self.run))


# Every front end `imgbot run` can start, each a package under bots/ of the same shape.
FRONT_ENDS = (
    FrontEnd(
        "telegram",
        lambda s: bool(s.telegram_bot_token.get_secret_value()),
        "bots.telegram.app",
        "run_telegram",
    ),
    FrontEnd(
        "discord",
        lambda s: bool(s.discord_bot_token.get_secret_value()),
        "bots.discord.app",
        "run_discord",
    ),
    # The OpenAI-compatible API; on by default, so with no bot token it runs alone.
    FrontEnd("web", lambda s: s.web_port > 0, "bots.web.app", "run_web"),
)


def run_bots(settings: Settings) -> int:
    """Start the configured bots and block until SIGTERM/SIGINT; return the exit code."""
    if not any(front.enabled(settings) for front in FRONT_ENDS):
        print(NO_TOKEN, file=sys.stderr)
        return 2
    if not settings.openai_api_key.get_secret_value():
        print("OPENAI_API_KEY is empty: set it in .env (see .env.example).", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        pass
    return 0


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the bots until `stop` is set or a signal arrives; drain jobs; close cleanly."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread / not supported
            pass
    for warning in settings.id_warnings():
        log.warning("settings: %s (this entry matches nobody)", warning)
    async with open_service(settings) as service:
        runners = [
            (front.name, front.load()(settings, service, stop))
            for front in FRONT_ENDS
            if front.enabled(settings)
        ]
        tasks = {asyncio.create_task(coro, name=name): name for name, coro in runners}
        log.info("imgbot running: %s", ", ".join(tasks.values()))
        beat = asyncio.create_task(_beat(heartbeat_path(settings)))
        # Wake on the signal itself, not when a bot has finished draining: the service must
        # cancel waiting jobs at once, or they would start during the grace period.
        stopping = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait({*tasks, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stopping}:
                if task.exception() is not None and not stop.is_set():
                    log.error("%s bot stopped: %r", tasks[task], task.exception())
        finally:
            stopping.cancel()
            # One bot failing (or a signal) stops them all; each stops receiving first,
            # then the service drains, then the bots close, then the service closes.
            stop.set()
            beat.cancel()
            await service.shutdown(settings.shutdown_grace)
            await asyncio.gather(*tasks, return_exceptions=True)
        log.info("imgbot stopped; %d job(s) still in flight", service.jobs_in_flight)
