"""/cancel and the page's job progress across replicas: two services on ONE real PostgreSQL.

Behind a round-robin proxy a user's /cancel, and the page's polls, land on any replica, not
necessarily the one working on the job. Here replica B receives them while replica A holds
the jobs, and the ledger is all they share:

- Telegram: two real PTB Applications (each with its fake Bot API) on one ledger; Ann's
  drawing job and her waiting one are on A, her /cancel reaches B. B names both; A stops
  them a moment later, telling Ann in its own status messages; the waiting one is released
  at 0 and never drawn, the drawing one is charged only what the upstream reports (nothing:
  its call hangs until the client gives up).
- Discord: Alice's jobs drawn by service A, her /cancel through replica B's real command
  tree: the same, B's ephemeral answer naming both.
- A replica that died with a drawing and a waiting job: /cancel on B names them, and B,
  taking them over once their lease ends, ends them cancelled at 0 instead of drawing them.
- The web page: two web doors on one ledger. A poll sent to B follows a job A runs (its
  stage, then its result, downloadable from B); B's Cancel stops A's drawing and waiting
  page jobs, and B's polls then show how they ended. Another user's handle is unknown to B.
  A page job whose replica died before it could say how it ended reads as ended on B (after
  a short grace, in which the replica running it may still be about to say).

The fake image API is a real HTTP server on 127.0.0.1 (tests/fake_api.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import pytest
from telegram import Update

from bots.telegram.app import ADAPTER_KEY
from bots.web.texts import text
from core.config import Settings
from core.errors import Cancelled
from core.requester import Requester
from core.runtime import open_service
from core.service import _request_dict
from core.store import JobRecord, JobSpec, JobStage, JobStatus
from core.types import Progress
from tests import discord_payloads
from tests.discord_fake import FakeCdn
from tests.fake_api import FakeImageAPI
from tests.pg_server import PgServer
from tests.telegram_fake import TOKEN, FakeBotApi, Updates
from tests.test_discord import running_bot
from tests.test_telegram import ANN, Harness, msg, running
from tests.test_web_replicas import Replica, bearer, sign_in
from tests.test_web_replicas import replica as replica  # noqa: F401 - a fixture

# The image API's hang outlasts the client's patience: a drawing job's call ends in a
# timeout, which the upstream never bills.
TIMEOUT = 6.0


async def settled(job_of: Callable[[], Awaitable[JobRecord | None]]) -> JobRecord:
    """Wait until a job is no longer reserved (a cancelled draw settles when its call ends)."""
    for _ in range(400):
        job = await job_of()
        if job is not None and job.status is not JobStatus.RESERVED:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"still reserved: {job}")


@pytest.fixture
def pg_settings(
    settings: Callable[..., Settings], pg_server: PgServer
) -> Callable[..., Settings]:
    """Return a factory of Telegram settings, every one on the same fresh PostgreSQL database."""
    url = pg_server.create_database()

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": url,
            "telegram_bot_token": TOKEN,
            "progress_interval": 0.05,
            "rate_limit_per_minute": 0,
            "max_jobs_per_user": 1,
            "request_timeout": TIMEOUT,
        }
        return settings(**{**values, **overrides})

    return make


async def put(at: Harness, raw: dict[str, Any]) -> None:
    """Hand an update to a running replica's Application, as the webhook would."""
    await at.app.update_queue.put(Update.de_json(raw, at.app.bot))


def ann_texts(at: Harness) -> list[str]:
    return [str(c.params["text"]) for c in at.api.of("sendMessage", "editMessageText")
            if c.params["chat_id"] == ANN["id"]]


async def test_cancel_received_by_b_stops_the_jobs_a_holds(
    pg_settings: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    updates = Updates()
    u = updates
    fake_api.inject("hang", seconds=60)
    async with running(pg_settings(), FakeBotApi(), fake_api, updates) as a, \
            running(pg_settings(), FakeBotApi(), fake_api, updates) as b:
        await a.app.start()
        await b.app.start()
        try:
            await put(a, u.update(u.message(ANN, u.private(ANN), text="/img low a hanging cat")))
            await a.api.wait_for(lambda: fake_api.api_requests)  # drawing on A
            await put(a, u.update(u.message(ANN, u.private(ANN), text="/img low a waiting cat")))
            queued = msg("en", "progress.queued", position=1)
            await a.api.wait_for(lambda: queued in ann_texts(a))  # waiting on A

            await put(b, u.update(u.message(ANN, u.private(ANN), text="/cancel")))
            lines = "\n".join([
                msg("en", "cancel.line_running_later", job_id=1, prompt="a hanging cat"),
                msg("en", "cancel.line_waiting_later", job_id=2, prompt="a waiting cat"),
            ])
            answer = msg("en", "cancel.done", count=2, jobs=lines)
            await b.api.wait_for(lambda: ann_texts(b))
            # B names both at once, as stopping a moment later: A holds them.
            assert ann_texts(b) == [answer]

            # A stops both, and tells Ann in its own status messages.
            told = [msg("en", "job.cancelled"), msg("en", "job.cancelled_running", job_id=1)]
            await a.api.wait_for(lambda: all(t in ann_texts(a) for t in told), within=20)
            drawing = await settled(lambda: a.service.ledger.get_job(1))
            waiting = await settled(lambda: a.service.ledger.get_job(2))
        finally:
            await b.app.stop()
            await a.app.stop()
    # The waiting job was released at 0 and never drawn.
    assert (waiting.status, waiting.stage, waiting.error_code) == (
        JobStatus.FAILED, JobStage.CANCELLED, "cancelled")
    assert (waiting.charged, waiting.attempts) == (0, 0)
    # The drawing one stopped being waited for; its call then timed out, which the upstream
    # never bills: charged nothing (had it answered, its usage would be what it pays).
    assert (drawing.status, drawing.stage, drawing.error_code) == (
        JobStatus.FAILED, JobStage.CANCELLED, "cancelled")
    assert drawing.usage is None and drawing.charged == 0
    assert len(fake_api.api_requests) == 1
    assert a.api.of("sendPhoto") == [] and b.api.of("sendPhoto") == []


async def test_discord_cancel_on_b_stops_the_jobs_a_holds(
    pg_settings: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    settings = pg_settings(telegram_bot_token="")
    fake_api.inject("hang", seconds=60)
    alice = Requester("discord", "501", None, "alice", "en")  # the payloads' default user
    async with open_service(settings) as a, running_bot(settings, FakeCdn()) as b:
        drawing = asyncio.create_task(a.draw(alice, "low a hanging cat"))
        queued = asyncio.Event()

        async def progress(event: Progress) -> None:
            if event.kind == "queued":
                queued.set()

        for _ in range(200):
            if fake_api.api_requests:
                break
            await asyncio.sleep(0.05)
        waiting = asyncio.create_task(a.draw(alice, "low a waiting cat", (), progress))
        await asyncio.wait_for(queued.wait(), 10)

        # /cancel reaches B, which holds nothing: it names A's jobs, stopping a moment later.
        (call,) = await b.feed(discord_payloads.slash("cancel", []))
        lines = "\n".join([
            msg("en", "cancel.line_running_later", job_id=1, prompt="a hanging cat"),
            msg("en", "cancel.line_waiting_later", job_id=2, prompt="a waiting cat"),
        ])
        assert call.kind == "callback" and call.ephemeral
        assert call.content == msg("en", "cancel.done", count=2, jobs=lines)
        with pytest.raises(Cancelled) as stopped:
            await drawing
        assert stopped.value.key == "job.cancelled_running"
        with pytest.raises(Cancelled) as left:
            await waiting
        assert left.value.key == "job.cancelled"
        jobs = [await settled(lambda i=i: a.ledger.get_job(i)) for i in (1, 2)]
    assert [(job.stage, job.error_code, job.charged) for job in jobs] == [
        (JobStage.CANCELLED, "cancelled", 0)] * 2
    assert len(fake_api.api_requests) == 1


async def test_jobs_a_dead_replica_held_end_cancelled_never_drawn(
    pg_settings: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    updates = Updates()
    u = updates
    async with running(pg_settings(job_lease=1), FakeBotApi(), fake_api, updates) as b:
        service = b.service
        request, estimate = service.parse("low a kite")
        origin = {"via": "telegram", "chat": str(ANN["id"]), "reply_to": "77", "thread": "",
                  "group": ""}
        spec = JobSpec("low a kite", request.model, request.size, request.quality, 1, 0,
                       json.dumps({"request": _request_dict(request), "reference_refs": [],
                                   "origin": origin}))
        ann = Requester("telegram", str(ANN["id"]), None, "Ann", "en")
        # What replica A left when it died: one job drawing, one waiting, both leased to it.
        drawing = await service.ledger.reserve(ann, spec, estimate)
        assert await service.ledger.mark_started(drawing)
        waiting = await service.ledger.reserve(ann, spec, estimate)
        assert await service.ledger.renew_leases("a:dead", [drawing, waiting], 1) == {
            drawing, waiting}

        await b.send(u.update(u.message(ANN, u.private(ANN), text="/cancel")))
        lines = "\n".join([
            msg("en", "cancel.line_running_later", job_id=drawing, prompt="a kite"),
            msg("en", "cancel.line_waiting_later", job_id=waiting, prompt="a kite"),
        ])
        assert ann_texts(b) == [msg("en", "cancel.done", count=2, jobs=lines)]

        # B carries on Telegram jobs a dead process left; these it ends instead.
        b.app.bot_data[ADAPTER_KEY].start_durable()
        carry = asyncio.create_task(service.take_over())
        try:
            jobs = [await settled(lambda i=i: service.ledger.get_job(i))
                    for i in (drawing, waiting)]
        finally:
            carry.cancel()
            await asyncio.gather(carry, return_exceptions=True)
    for job in jobs:
        assert (job.status, job.stage, job.error_code, job.charged) == (
            JobStatus.FAILED, JobStage.CANCELLED, "cancelled", 0)
        assert job.lease_owner == service.owner
    # The draw A lost when it died may have been billed upstream: recorded, never charged.
    assert [job.lost_credits for job in jobs] == [estimate, 0]
    assert fake_api.api_requests == []
    assert ann_texts(b) == [msg("en", "cancel.done", count=2, jobs=lines)]  # no "resumed"


async def page_job(http: httpx.AsyncClient, at: Replica, token: str, command: str) -> str:
    """Start a page job on one replica; return its handle."""
    answer = await http.post(f"{at.url}/web/api/jobs", headers=bearer(token),
                             data={"command": command})
    assert answer.status_code == 202, answer.text
    return str(answer.json()["handle"])


async def poll(http: httpx.AsyncClient, at: Replica, token: str, handle: str,
               until: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Poll a page job on one replica, as the page does, until `until`; return every answer."""
    answers: list[dict[str, Any]] = []
    for _ in range(600):
        answer = await http.get(f"{at.url}/web/api/jobs/{handle}", headers=bearer(token))
        assert answer.status_code == 200, answer.text
        answers.append(answer.json())
        if until(answers[-1]):
            return answers
        await asyncio.sleep(0.05)
    raise AssertionError(f"never reached: {answers[-1]}")


def ended(state: dict[str, Any]) -> bool:
    return state["state"] in ("done", "refused", "failed")


async def test_the_page_polled_and_cancelled_on_b_follows_the_jobs_a_runs(
    replica: Callable[..., Any], pg_server: PgServer, fake_api: FakeImageAPI
) -> None:
    url = pg_server.create_database()
    async with replica(database_url=url, max_jobs_per_user=1,
                       request_timeout=TIMEOUT) as a, \
            replica(database_url=url, max_jobs_per_user=1, request_timeout=TIMEOUT) as b, \
            httpx.AsyncClient() as http:
        _, key = await a.service.ledger.create_api_key("web:ann", "page")
        _, other_key = await a.service.ledger.create_api_key("web:bob", "page")
        token = await sign_in(http, a, key)
        bob = await sign_in(http, b, other_key)

        # A job drawn on A, followed from B: its stage, then its result.
        fake_api.inject("slow", seconds=1.5)
        handle = await page_job(http, a, token, "low a slow fox")
        seen = await poll(http, b, token, handle, ended)
        assert "drawing" in [state["state"] for state in seen]
        drawing = next(state for state in seen if state["state"] == "drawing")
        assert drawing["handle"] == handle and drawing["drawing_for"] is not None
        assert drawing["preview"] is None  # previews stay with the replica drawing it
        done = seen[-1]
        assert done["state"] == "done"
        assert done == (await http.get(f"{a.url}/web/api/jobs/{handle}",
                                       headers=bearer(token))).json()
        [image] = done["result"]["images"]
        original = await http.get(f"{b.url}{image['url']}")
        assert original.status_code == 200 and original.headers["content-type"] == "image/png"
        job = await b.service.ledger.get_job(done["result"]["job_id"])
        assert job is not None and job.stage is JobStage.DELIVERED
        # A drew it (a job done within half a lease may never have needed a lease written);
        # B only answered.
        assert job.lease_owner in (None, a.service.owner)
        # Another user's handle reads as unknown on either replica, and cannot cancel.
        for at in (a, b):
            other = await http.get(f"{at.url}/web/api/jobs/{handle}", headers=bearer(bob))
            assert other.status_code == 404
            refused = await http.post(f"{at.url}/web/api/jobs/{handle}/cancel",
                                      headers=bearer(bob))
            assert refused.status_code == 404

        # A draws one job (its call hangs) while another waits; Cancel is pressed on B.
        fake_api.inject("hang", seconds=60)
        hanging = await page_job(http, a, token, "low a hanging fox")
        await poll(http, b, token, hanging, lambda state: state["state"] == "drawing")
        queued = await page_job(http, a, token, "low a waiting fox")
        waiting = await poll(http, b, token, queued, lambda state: state["state"] == "queued")
        assert waiting[-1]["position"] == 0 and waiting[-1]["status"] == "⏳ In the queue"
        pressed = await http.post(f"{b.url}/web/api/jobs/{hanging}/cancel",
                                  headers=bearer(token))
        assert pressed.status_code == 200
        hanging_job = await b.service.job_by_source(f"web:page:{hanging}")
        waiting_job = await b.service.job_by_source(f"web:page:{queued}")
        assert hanging_job is not None and waiting_job is not None
        lines = "\n".join([
            msg("en", "cancel.line_running_later", job_id=hanging_job.id,
                prompt="a hanging fox"),
            msg("en", "cancel.line_waiting_later", job_id=waiting_job.id,
                prompt="a waiting fox"),
        ])
        assert pressed.json()["message"] == msg("en", "cancel.done", count=2, jobs=lines)

        # B's polls show how A ended them.
        stopped = (await poll(http, b, token, hanging, ended))[-1]
        assert (stopped["state"], stopped["message"]) == (
            "refused", msg("en", "job.cancelled_running", job_id=hanging_job.id))
        left = (await poll(http, b, token, queued, ended))[-1]
        assert (left["state"], left["message"]) == ("refused", msg("en", "job.cancelled"))
        for job_id in (hanging_job.id, waiting_job.id):
            job = await settled(lambda i=job_id: b.service.ledger.get_job(i))
            assert (job.stage, job.error_code, job.charged) == (
                JobStage.CANCELLED, "cancelled", 0)
    assert len(fake_api.api_requests) == 2  # the fox, and the hanging call; never the waiting


async def test_a_page_job_whose_replica_died_reads_as_ended_on_another(
    replica: Callable[..., Any], pg_server: PgServer
) -> None:
    url = pg_server.create_database()
    async with replica(database_url=url) as b, httpx.AsyncClient() as http:
        _, key = await b.service.ledger.create_api_key("web:ann", "page")
        token = await sign_in(http, b, key)
        # What a replica that died left of a page job: its start, and its job, which the
        # replica that took it over ended (web jobs are not carried on).
        await b.service.coordination.stage("web:page:h-dead", "start", "web:ann")
        request, estimate = b.service.parse("low a lost fox")
        spec = JobSpec("low a lost fox", request.model, request.size, request.quality, 1, 0,
                       json.dumps({"request": _request_dict(request)}),
                       source_ref="web:page:h-dead")
        ann = Requester("web", "ann", None, "Ann", "en")
        job_id = await b.service.ledger.reserve(ann, spec, estimate)
        assert await b.service.ledger.fail(job_id, "interrupted")
        # Just ended: the replica running it may still be about to say how; keep polling.
        [state] = await poll(http, b, token, "h-dead", lambda state: True)
        assert state["state"] == "queued"
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("UPDATE jobs SET finished_at = '2000-01-01T00:00:00.000000+00:00'")
        finally:
            await conn.close()
        [state] = await poll(http, b, token, "h-dead", lambda state: True)
        assert (state["state"], state["message"]) == (
            "failed", text("en", "web.job_ended_elsewhere", job_id=job_id))
