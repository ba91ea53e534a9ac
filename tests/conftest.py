"""Shared fixtures: a running fake image API and settings pointing at it."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.config import Settings
from core.runtime import open_service
from tests.fake_api import FakeImageAPI
from tests.pg_server import pg_server, pg_url  # noqa: F401 - PostgreSQL fixtures for every module


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add --slow: also run the tests marked slow (load, crash)."""
    parser.addoption(
        "--slow", action="store_true", default=False, help="also run tests marked slow"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (not skip) the slow tests unless --slow is given."""
    if config.getoption("--slow"):
        return
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item.get_closest_marker("slow") is None]


# Built once: loading the CA bundle for every client would dominate the suite's time.
TLS = ssl.create_default_context()

# Distinctive, so a test can prove it never shows up in errors, reprs or logs.
TEST_KEY = "sk-test-7f3a9c1e5b2d-DO-NOT-LEAK-4e6a8c0e"


@pytest.fixture
def fake_api() -> Iterator[FakeImageAPI]:
    """Yield a running fake image API that expects TEST_KEY."""
    with FakeImageAPI(key=TEST_KEY) as api:
        yield api


@pytest.fixture
def settings(fake_api: FakeImageAPI) -> Callable[..., Settings]:
    """Return a factory of settings aimed at the fake API, with short test timeouts."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "openai_base_url": fake_api.base_url,
            "openai_api_key": TEST_KEY,
            "response_format": "none",
            "request_timeout": 5.0,
            "connect_timeout": 1.0,
            "max_retries": 2,
            "database_url": "sqlite:///:memory:",
        }
        values.update(overrides)
        # _env_file=None: a developer's .env must not leak into the tests.
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """Yield an HTTP client for the test, closed afterwards."""
    async with httpx.AsyncClient(verify=TLS) as client:
        yield client


@pytest.fixture
def make_service(settings: Callable[..., Settings], tmp_path: Path) -> Callable[..., Any]:
    """Return a factory of `open_service` contexts on one SQLite file in tmp_path."""

    def make(**overrides: Any) -> Any:
        values: dict[str, Any] = {
            "database_url": f"sqlite:///{tmp_path}/ledger.db",
            "progress_interval": 0.05,
        }
        values.update(overrides)
        return open_service(settings(**values))

    return make
