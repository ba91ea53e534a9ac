"""`imgbot run`: every bot whose token is set, and the web API, in one event loop, sharing one
service."""

from __future__ import annotations

import asyncio
import contextlib
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
# How often the processes on the ledger are counted (a read), between heartbeats.
COUNT_EVERY = 1.0
HEARTBEAT_STALE = 120.0


def heartbeat_path(settings: Settings) -> Path:
    """Return the file the running bot touches, in the data folder."""
    return settings.data_path / "imgbot.heartbeat"


def health(settings: Settings) -> int:
    """Exit 0 when a running bot wrote its heartbeat recently and its ledger takes writes
    (Docker HEALTHCHECK)."""
    path = heartbeat_path(settings)
    try:
        age = time.time() - path.stat().st_mtime
        state = path.read_text("utf-8", "replace").strip()
    except OSError:
        print("unhealthy: no heartbeat file (is `imgbot run` running?)", file=sys.stderr)
        return 1
    if age > HEARTBEAT_STALE:
        print(f"unhealthy: last heartbeat {age:.0f}s ago", file=sys.stderr)
        return 1
    if state.startswith(STORE_DOWN):
        problem = state.removeprefix(STORE_DOWN).strip()
        print(f"unhealthy: the ledger cannot be written ({problem})", file=sys.stderr)
        return 1
    print(f"healthy: last heartbeat {age:.0f}s ago")
    return 0


STORE_DOWN = "store:"


async def _beat(path: Path, service: ImageService | None = None) -> None:
    # Beside a SQLite ledger the folder exists; with PostgreSQL it may not yet.
    await asyncio.to_thread(path.parent.mkdir, mode=0o700, parents=True, exist_ok=True)
    while True:
        state = "ok"
        if service is not None:
            service.health_changed.clear()
            if not service.store_healthy:
                await service.check_store()  # notices recovery even with no jobs coming in
            if not service.store_healthy:
                state = f"{STORE_DOWN} {service.store_problem}"
        try:
            # On a full disk this write may fail too: the file then goes stale, which
            # reads as unhealthy as well.
            await asyncio.to_thread(path.write_text, state + "\n", "utf-8")
        except OSError as err:
            log.warning("could not write the heartbeat: %s", err)
        if service is not None and service.store_healthy:
            try:
                # The ledger's own heartbeat: replicas count each other (doctor lists them).
                await service.beat(_beat_every(service))
            except Exception as err:  # noqa: BLE001 - the store's health reports it
                log.warning("could not write the replica heartbeat: %s", err)
        if service is None:
            await asyncio.sleep(HEARTBEAT_EVERY)
            continue
        # The next beat comes at once when the ledger's health flips (cleared before the
        # state was read, so a flip meanwhile is not missed).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(service.health_changed.wait(), _beat_every(service))


async def _count_replicas(service: ImageService) -> None:
    # The one place the processes are counted, every second whatever the heartbeats'
    # interval: a replica that starts beats once before its front ends do, and the others
    # take their smaller share of Telegram's rates within this second.
    while True:
        await asyncio.sleep(COUNT_EVERY)
        if not service.store_healthy:
            continue
        try:
            await service.count_replicas()
        except Exception as err:  # noqa: BLE001 - the beat reports the store's trouble
            log.debug("could not count the replicas: %s", err)


def _beat_every(service: ImageService) -> float:
    # As often as jobs' leases are renewed, at most every HEARTBEAT_EVERY: replicas learn
    # of each other (and of one gone) about as fast as they take over its jobs.
    settings = getattr(service, "settings", None)
    lease = getattr(settings, "job_lease", HEARTBEAT_EVERY)
    return max(0.5, min(HEARTBEAT_EVERY, float(lease)))


async def _clean_results(service: ImageService) -> None:
    while True:
        try:
            removed = await service.clean_results()
            if removed:
                log.info("removed %d kept result(s) past their retention", removed)
        except Exception as err:  # noqa: BLE001 - tried again in an hour
            log.warning("could not clean kept results: %s", err)
        await asyncio.sleep(3600)


NO_TOKEN = """No bot token is set and the web API is off (WEB_PORT=0): nothing to run.

Fill in at least one of these in .env (copy .env.example to .env first):
  TELEGRAM_BOT_TOKEN=123456:ABC…   from @BotFather in Telegram
  DISCORD_BOT_TOKEN=…              from https://discord.com/developers/applications
and the image API:
  OPENAI_API_KEY=sk-…
  OPENAI_BASE_URL=https://api.openai.com/v1   (or your OpenAI-compatible proxy)
Then run `imgbot doctor` to check everything, and `imgbot run` again."""


RunFrontEnd = Callable[[Settings, ImageService, asyncio.Event], Awaitable[None]]
# Why a front end could not run, in one line without secrets, and whether to try again.
DescribeFailure = Callable[[BaseException, Settings], tuple[str, bool]]

EXIT_FRONT_END_FAILED = 1
RETRY_DELAY_CAP = 30.0
# A front end that ran this long before failing counts as started: its retries start over.
RAN_FOR = 60.0


class FrontEndFailed(Exception):
    """A front end could not start (or stopped by itself); `reason` is safe to log."""

    def __init__(self, name: str, reason: str, attempts: int, *, had_run: bool = False) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason
        self.attempts = attempts
        self.had_run = had_run  # it ran a while before failing: it did start


@dataclass(frozen=True)
class FrontEnd:
    """One front end: its name, when it is on, and where its `run(settings, service, stop)` is."""

    name: str
    enabled: Callable[[Settings], bool]
    module: str  # imported only when enabled: a front end's library loads only if used
    run: str
    describe: str = "startup_failure"  # (exception, settings) -> (one line, transient?)

    def load(self) -> RunFrontEnd:
        """Import the front end and return its run function."""
        return cast(RunFrontEnd, getattr(importlib.import_module(self.module), self.run))

    def load_describe(self) -> DescribeFailure:
        """Import the front end and return how it words its failures."""
        return cast(DescribeFailure, getattr(importlib.import_module(self.module), self.describe))


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
        return asyncio.run(serve(settings))
    except KeyboardInterrupt:
        return 0


async def supervise(
    front: FrontEnd, settings: Settings, service: ImageService, stop: asyncio.Event
) -> None:
    """Run one front end until `stop`; retry it while its platform cannot be reached.

    Raises FrontEndFailed when it cannot start (a refused token at once; an unreachable
    platform after STARTUP_RETRIES retries, 1, 2, 4… s apart) or when it ends by itself.
    """
    run, describe = front.load(), front.load_describe()
    retries = 0
    while True:
        began = time.monotonic()
        try:
            await run(settings, service, stop)
        except Exception as exc:  # noqa: BLE001 - every end of a front end is judged here
            if stop.is_set():
                log.warning("%s stopped with an error while stopping: %r", front.name, exc)
                return
            reason, transient = describe(exc, settings)
        else:
            if stop.is_set():
                return
            reason, transient = "it stopped by itself", False
        had_run = time.monotonic() - began > RAN_FOR
        if had_run:
            retries = 0  # it had been running: a new outage gets its retries afresh
        if not transient or retries >= settings.startup_retries:
            raise FrontEndFailed(front.name, reason, retries + 1, had_run=had_run)
        delay = min(2.0**retries, RETRY_DELAY_CAP)
        retries += 1
        log.warning(
            "%s: %s; retrying in %.0fs (retry %d of %d)",
            front.name, reason, delay, retries, settings.startup_retries,
        )
        try:
            await asyncio.wait_for(stop.wait(), delay)
            return  # stopped while waiting to retry
        except TimeoutError:
            pass


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> int:
    """Run the bots until `stop` is set or a signal arrives; drain jobs; close cleanly.

    Return the exit code: 0 after a stop asked for (a signal, `stop`), 1 when a front end
    could not start or ended by itself. One front end failing stops them all: a bot half up
    looks healthy to its supervisor while one platform is dead, so it exits for a restart.
    """
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
        # Count the replicas before any front end sends: a process restarting into a busy
        # set of replicas would otherwise use the whole of the bot's flood budget until its
        # first beat.
        try:
            await service.beat(_beat_every(service))
            await service.count_replicas()
        except Exception as err:  # noqa: BLE001 - the beat loop tries again and reports it
            log.warning("could not write the replica heartbeat: %s", err)
        tasks = {
            asyncio.create_task(supervise(front, settings, service, stop), name=front.name): (
                front.name
            )
            for front in FRONT_ENDS
            if front.enabled(settings)
        }
        code = 0
        log.info("imgbot running: %s", ", ".join(tasks.values()))
        beat = asyncio.create_task(_beat(heartbeat_path(settings), service))
        counting = asyncio.create_task(_count_replicas(service), name="imgbot:count-replicas")
        # Jobs dead processes left (their lease expired) are carried on here, and kept
        # results past RESULT_RETENTION_HOURS are cleaned.
        carry = asyncio.create_task(service.take_over(), name="imgbot:take-over")
        clean = asyncio.create_task(_clean_results(service), name="imgbot:clean-results")
        # Wake on the signal itself, not when a bot has finished draining: the service must
        # cancel waiting jobs at once, or they would start during the grace period.
        stopping = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait({*tasks, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stopping}:
                failure = task.exception()
                if isinstance(failure, FrontEndFailed):
                    what = "stopped" if failure.had_run else "failed to start"
                    tries = f" after {failure.attempts} attempts" if failure.attempts > 1 else ""
                    log.error("%s front end %s%s: %s; stopping imgbot (exit 1)",
                              failure.name, what, tries, failure.reason)
                    code = EXIT_FRONT_END_FAILED
                elif failure is not None:
                    log.error("%s front end failed: %r; stopping imgbot (exit 1)",
                              tasks[task], failure)
                    code = EXIT_FRONT_END_FAILED
        finally:
            stopping.cancel()
            # One bot failing (or a signal) stops them all; each stops receiving first,
            # then the service drains, then the bots close, then the service closes.
            stop.set()
            beat.cancel()
            counting.cancel()
            carry.cancel()
            clean.cancel()
            await service.shutdown(settings.shutdown_grace)
            await asyncio.gather(*tasks, return_exceptions=True)
        log.info("imgbot stopped; %d job(s) still in flight", service.jobs_in_flight)
    return code
