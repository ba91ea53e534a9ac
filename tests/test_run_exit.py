"""`imgbot run`'s exit code when front ends fail: the policy of bots.run.serve, in process.

The real processes (a refused Telegram token, an unreachable Bot API) are in
tests/test_process.py; here two stand-in front ends show what happens to the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from bots import run as bots_run
from bots.run import FrontEnd, heartbeat_path, serve
from core.config import Settings
from core.service import ImageService
from tests.conftest import TEST_KEY

seen: dict[str, object] = {}


async def healthy(settings: Settings, service: ImageService, stop: asyncio.Event) -> None:
    seen["healthy_started"] = True
    await stop.wait()
    seen["healthy_stopped_cleanly"] = True


async def refused(settings: Settings, service: ImageService, stop: asyncio.Event) -> None:
    await asyncio.sleep(0.05)
    raise PermissionError("token refused")


def describe(exc: BaseException, settings: Settings) -> tuple[str, bool]:
    return f"refused ({exc})", False


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        _env_file=None,
        openai_api_key=TEST_KEY,
        openai_base_url="http://127.0.0.1:9",
        database_url=f"sqlite:///{tmp_path}/ledger.db",
        shutdown_grace=1,
    )


def _front(name: str, run: str) -> FrontEnd:
    return FrontEnd(name, lambda s: True, __name__, run, "describe")


async def test_one_front_end_failing_to_start_stops_the_others_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    seen.clear()
    monkeypatch.setattr(
        bots_run, "FRONT_ENDS", (_front("good", "healthy"), _front("bad", "refused"))
    )
    with caplog.at_level(logging.INFO, logger="bots.run"):
        code = await asyncio.wait_for(serve(_settings(tmp_path), asyncio.Event()), 20)
    assert code == 1
    assert seen == {"healthy_started": True, "healthy_stopped_cleanly": True}
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert line.startswith("bad front end failed to start: refused (token refused)")


async def test_a_stop_asked_for_exits_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen.clear()
    monkeypatch.setattr(bots_run, "FRONT_ENDS", (_front("good", "healthy"),))
    stop = asyncio.Event()
    running = asyncio.create_task(serve(_settings(tmp_path), stop))
    await asyncio.sleep(0.2)
    stop.set()
    assert await asyncio.wait_for(running, 20) == 0
    assert seen["healthy_stopped_cleanly"] is True


async def test_health_is_unhealthy_while_the_ledger_cannot_be_written(
    settings: Callable[..., Settings], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bots.run import _beat, health

    config = settings(database_url=f"sqlite:///{tmp_path}/imgbot.db")

    class Service:  # what the heartbeat reads of ImageService, and its probe
        store_healthy = False
        store_problem = "database or disk is full"
        probes = 0
        health_changed = asyncio.Event()

        async def check_store(self) -> bool:
            self.probes += 1
            return self.store_healthy

    service = Service()
    beat = asyncio.create_task(_beat(heartbeat_path(config), service))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.2)
        assert await asyncio.to_thread(health, config) == 1
        assert "ledger cannot be written (database or disk is full)" in capsys.readouterr().err
        assert service.probes >= 1  # the heartbeat probes the store itself, jobs or not
    finally:
        beat.cancel()
    service.store_healthy = True  # the disk was freed: the next beat says so
    beat = asyncio.create_task(_beat(heartbeat_path(config), service))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.2)
        assert await asyncio.to_thread(health, config) == 0
    finally:
        beat.cancel()


async def counts_replicas(settings: Settings, service: ImageService, stop: asyncio.Event) -> None:
    seen["replicas_at_start"] = service.replicas
    await stop.wait()


async def test_front_ends_start_knowing_how_many_replicas_share_the_ledger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process restarting among live replicas must take its share of the bot's flood budget
    # from its first message, not the whole of it until its first heartbeat.
    from core.store import Limits, open_store

    config = _settings(tmp_path)
    store = await open_store(config.store_url, Limits.from_settings(config))
    try:
        await store.hold_lease("replica:other-host:1", "other-host:1", 60.0, "{}")
    finally:
        await store.close()
    seen.clear()
    monkeypatch.setattr(bots_run, "FRONT_ENDS", (_front("counting", "counts_replicas"),))
    stop = asyncio.Event()
    running = asyncio.create_task(serve(config, stop))
    for _ in range(100):
        if "replicas_at_start" in seen:
            break
        await asyncio.sleep(0.05)
    stop.set()
    assert await asyncio.wait_for(running, 20) == 0
    assert seen["replicas_at_start"] == 2


async def watches_replicas(settings: Settings, service: ImageService, stop: asyncio.Event) -> None:
    seen["service"] = service
    await stop.wait()


async def test_a_replica_that_starts_later_is_counted_within_seconds_not_a_heartbeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Heartbeats come every 30 s (JOB_LEASE 30). A replica starting beside a running one
    # beats once and starts sending: the running one must take its smaller share of
    # Telegram's rates at once, not half a minute later (CI: 30 messages in one second).
    from core.store import Limits, open_store

    config = _settings(tmp_path)
    seen.clear()
    monkeypatch.setattr(bots_run, "FRONT_ENDS", (_front("watching", "watches_replicas"),))
    stop = asyncio.Event()
    running = asyncio.create_task(serve(config, stop))
    try:
        for _ in range(200):
            if "service" in seen:
                break
            await asyncio.sleep(0.05)
        service = seen["service"]
        assert isinstance(service, ImageService) and service.replicas == 1
        shares: list[int] = []
        service.replica_listeners.append(shares.append)
        store = await open_store(config.store_url, Limits.from_settings(config))
        try:
            await store.hold_lease("replica:other-host:7", "other-host:7", 90.0, "{}")
        finally:
            await store.close()
        for _ in range(100):
            if service.replicas == 2:
                break
            await asyncio.sleep(0.05)
        assert service.replicas == 2 and shares[-1] == 2
    finally:
        stop.set()
        assert await asyncio.wait_for(running, 20) == 0
