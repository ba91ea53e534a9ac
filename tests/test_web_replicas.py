"""The web door across replicas and restarts: what one process made, another answers.

Two services, each with its own web door (uvicorn on 127.0.0.1), share ONE PostgreSQL
ledger, as two `imgbot run` replicas behind a round-robin proxy do: a session opened
through A works on B and signing out on A ends it on B; the operator's sign-in code spent
on A is refused by B; a `url` result A made (through the official SDK) is downloaded from
B, offered in B's history, and gone from both once expired; a @username A saw resolves in
an admin action run on B. Then a restart: a new service on the same SQLite file keeps the
sessions, the kept files and the names.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest

from bots.web.app import run_web
from core.service import ImageService
from tests.test_web_api import free_port

ADMIN = "telegram:1"


@dataclass
class Replica:
    url: str
    service: ImageService


@pytest.fixture
def replica(make_service: Callable[..., Any]) -> Callable[..., Any]:
    """Return `replica(**settings)`: an async context running one service and its web door."""

    @asynccontextmanager
    async def running(**overrides: Any) -> AsyncIterator[Replica]:
        port = free_port()
        async with make_service(web_port=port, rate_limit_per_minute=0, admins=ADMIN,
                                **overrides) as service:
            stop = asyncio.Event()
            task = asyncio.create_task(run_web(service.settings, service, stop))
            try:
                for _ in range(200):
                    try:
                        with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                            break
                    except OSError:
                        await asyncio.sleep(0.02)
                yield Replica(f"http://127.0.0.1:{port}", service)
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)

    return running


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def sign_in(http: httpx.AsyncClient, at: Replica, key: str) -> str:
    answer = await http.post(f"{at.url}/web/api/session", json={"key": key})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["token"])


async def me(http: httpx.AsyncClient, at: Replica, token: str) -> httpx.Response:
    return await http.get(f"{at.url}/web/api/me", headers=bearer(token))


async def printed_code(capsys: pytest.CaptureFixture[str]) -> str:
    """Return the sign-in code a replica printed (it prints just after it starts listening)."""
    out = ""
    for _ in range(500):
        out += capsys.readouterr().out
        if found := re.findall(r"/#signin=(\S+)", out):
            [code] = found
            return code
        await asyncio.sleep(0.02)
    raise AssertionError(f"no sign-in link printed: {out!r}")


async def test_two_replicas_on_one_ledger_answer_as_one_web_door(
    replica: Callable[..., Any], pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with replica(database_url=pg_url) as a:
        a_code = await printed_code(capsys)  # alone (no bot token): each replica prints a link
        async with replica(database_url=pg_url) as b, httpx.AsyncClient() as http:
            b_code = await printed_code(capsys)
            _, key = await a.service.ledger.create_api_key(ADMIN, "two replicas")

            # A session opened through A works on B (and on A).
            token = await sign_in(http, a, key)
            seen = await me(http, b, token)
            assert seen.status_code == 200 and seen.json()["user"] == ADMIN
            assert seen.json()["admin"] is True and seen.json()["how"] == "key"

            # A name replica A saw resolves in an admin action run on replica B.
            await a.service.directory.note("telegram", "Bob_501", "telegram:501")
            acted = await http.post(f"{b.url}/web/api/admin/action", headers=bearer(token),
                                    json={"command": "limit", "args": ["@bob_501", "daily=5000"]})
            assert acted.status_code == 200, acted.text
            assert "telegram:501" in acted.json()["message"]
            bob = await b.service.ledger.get_user("telegram:501")
            assert bob is not None and bob.daily_limit == 5000

            # A url result made by A is downloaded from B, and B's history offers it.
            client = openai.AsyncOpenAI(base_url=f"{a.url}/v1", api_key=key, max_retries=0)
            made = await client.images.with_raw_response.generate(
                prompt="a fox", size="1024x1024", quality="low", response_format="url")
            [item] = made.parse().data
            assert item.url is not None and item.url.startswith(f"{a.url}/v1/files/")
            from_a = await http.get(item.url)
            from_b = await http.get(item.url.replace(a.url, b.url))
            assert from_a.status_code == from_b.status_code == 200
            assert from_b.content == from_a.content and from_b.headers["content-type"] == "image/png"
            job_id = int(made.headers["x-imgbot-job"])
            history = await http.get(f"{b.url}/web/api/history/{job_id}", headers=bearer(token))
            [offered] = history.json()["images"]
            assert item.url.endswith(offered["url"])

            # Expired (its time moved past by hand): neither replica serves it any more.
            conn = await asyncpg.connect(pg_url)
            try:
                await conn.execute("UPDATE web_files SET expires_at = '2000-01-01T00:00:00'")
            finally:
                await conn.close()
            for at in (a, b):
                gone = await http.get(item.url.replace(a.url, at.url))
                assert gone.status_code == 404
            history = await http.get(f"{a.url}/web/api/history/{job_id}", headers=bearer(token))
            assert history.json()["images"] == []

            # Signing out on A ends the session on B.
            assert (await http.delete(f"{a.url}/web/api/session",
                                      headers=bearer(token))).status_code == 200
            refused = await me(http, b, token)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "signed_out"

            # The operator's code printed by A: spent on A, refused by B. B's own code works
            # on A, and the operator's session goes on at B.
            operator = await http.post(f"{a.url}/web/api/session/link", json={"code": a_code})
            assert operator.status_code == 200, operator.text
            again = await http.post(f"{b.url}/web/api/session/link", json={"code": a_code})
            assert again.status_code == 401
            crossed = await http.post(f"{a.url}/web/api/session/link", json={"code": b_code})
            assert crossed.status_code == 200
            seen = await me(http, b, crossed.json()["token"])
            assert seen.json()["user"] == "web:operator" and seen.json()["admin"] is True

            # Revoking the key on B ends a key session opened on A at A's next call.
            token = await sign_in(http, a, key)
            [record] = await b.service.ledger.list_api_keys(ADMIN)
            assert await b.service.ledger.revoke_api_key(record.id)
            refused = await me(http, a, token)
            assert refused.status_code == 401
            assert "revoked" in refused.json()["error"]["message"]


async def test_a_restart_keeps_sessions_kept_files_and_names(
    replica: Callable[..., Any], tmp_path: Path
) -> None:
    ledger = f"sqlite:///{tmp_path}/imgbot.db"
    async with replica(database_url=ledger) as before, httpx.AsyncClient() as http:
        _, key = await before.service.ledger.create_api_key(ADMIN, "restart")
        token = await sign_in(http, before, key)
        await before.service.directory.note("telegram", "Ann", "telegram:42")
        client = openai.AsyncOpenAI(base_url=f"{before.url}/v1", api_key=key, max_retries=0)
        result = await client.images.generate(prompt="a fox", size="1024x1024", quality="low",
                                               response_format="url")
        url = result.data[0].url
        assert url is not None
        drawn = (await http.get(url)).content
    async with replica(database_url=ledger) as after, httpx.AsyncClient() as http:
        seen = await me(http, after, token)
        assert seen.status_code == 200 and seen.json()["user"] == ADMIN
        kept = await http.get(url.replace(before.url, after.url))
        assert kept.status_code == 200 and kept.content == drawn
        acted = await http.post(f"{after.url}/web/api/admin/action", headers=bearer(token),
                                json={"command": "block", "args": ["@ANN"]})
        assert acted.status_code == 200, acted.text
        assert await after.service.ledger.is_blocked("telegram:42", None)
