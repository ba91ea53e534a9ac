"""The pipeline end to end: real fake API over HTTP, real SQLite ledger file."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from core.admin import run_admin
from core.errors import (
    AccessDenied,
    Cancelled,
    JobTakenOver,
    LimitExceeded,
    PromptError,
    QueueFull,
    RateLimited,
    UpstreamCorruptImage,
    UpstreamMalformed,
    UpstreamUnavailable,
)
from core.messages import text
from core.reports import render_balance, render_caption, render_help, render_sizes
from core.requester import Requester
from core.runtime import LEASES_TASK_NAME
from core.service import ImageService, IncomingImage, Progress
from core.store import JobStage, JobStatus
from tests.fake_api import MISSING, FakeImageAPI
from tests.pg_server import pg_server, pg_url  # noqa: F401 - fixtures

ALICE = Requester("telegram", "1", "-100", "Alice", "en", is_group=True)
BOB = Requester("telegram", "2", "-100", "Bob", "zh-hans", is_group=True)
ADMIN = Requester("telegram", "99", None, "Root", "en")


def _formula(usage: dict[str, Any]) -> float:
    """The seed's formula, written out independently of core.pricing."""
    details = usage.get("input_tokens_details") or {}
    out = usage.get("output_tokens_details") or {}
    image_out = out.get("image_tokens", usage["output_tokens"])
    return (
        (details.get("text_tokens", 0) * 5 + details.get("image_tokens", 0) * 10 + image_out * 40)
        * 7.1
        * 10000
        / 1_000_000
    )


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def make_service(make_service: Callable[..., Any]) -> Callable[..., Any]:
    """Services on one SQLite file, with an admin and no rate limit."""

    def make(**overrides: Any) -> Any:
        return make_service(**{"admins": ["telegram:99"], "rate_limit_per_minute": 0, "max_queued_per_user": 10, **overrides})

    return make


@pytest.fixture
async def service(make_service: Callable[..., Any]) -> AsyncIterator[ImageService]:
    async with make_service() as svc:
        yield svc


async def test_success_charges_exactly_the_formula(
    service: ImageService, fake_api: FakeImageAPI
) -> None:
    events: list[Progress] = []

    async def progress(event: Progress) -> None:
        events.append(event)

    outcome = await service.draw(ALICE, "16:9 low a white siamese cat", (), progress)
    assert [(i.width, i.height) for i in outcome.images] == [(1280, 720)]
    sent = fake_api.api_requests[-1]
    assert sent.path == "/v1/images/generations" and sent.json["size"] == "1280x720"
    job = await service.ledger.get_job(outcome.job_id)
    assert job is not None and job.status == JobStatus.SUCCEEDED
    assert job.usage is not None
    usage_dict = {
        "input_tokens": job.usage.text_input_tokens + job.usage.image_input_tokens,
        "input_tokens_details": {
            "text_tokens": job.usage.text_input_tokens,
            "image_tokens": job.usage.image_input_tokens,
        },
        "output_tokens": job.usage.image_output_tokens,
    }
    assert job.actual_credits == pytest.approx(_formula(usage_dict))
    assert outcome.credits == pytest.approx(job.actual_credits)
    assert outcome.spend.today == pytest.approx(job.actual_credits)
    assert events[0].kind == "started" and events[-1].kind == "done"
    caption = render_caption(outcome, service.prices)
    assert "1280x720 · low · gpt-image-2" in caption and "credits ≈ ¥" in caption


async def test_auto_quality_reserved_high_settles_real(service: ImageService) -> None:
    request, estimate = service.parse("a fox")
    assert request.quality == "auto"
    _, high_estimate = service.parse("high a fox")
    assert estimate == pytest.approx(high_estimate)
    outcome = await service.draw(ALICE, "a fox")
    job = await service.ledger.get_job(outcome.job_id)
    assert job is not None and job.estimated_credits == pytest.approx(estimate)
    assert job.actual_credits is not None and job.actual_credits < job.estimated_credits


async def test_failure_without_usage_costs_nothing(
    service: ImageService, fake_api: FakeImageAPI
) -> None:
    fake_api.inject("server_error")
    with pytest.raises(UpstreamUnavailable) as info:
        await service.draw(ALICE, "low a cat")
    assert info.value.user_message("en") != info.value.user_message("zh")
    report = await service.ledger.spend_report(ALICE.user_key)
    assert report.today == 0
    assert report.last_jobs[0].status == JobStatus.FAILED
    assert report.last_jobs[0].error_code == info.value.code


async def test_failure_with_usage_is_charged_exactly(
    service: ImageService, fake_api: FakeImageAPI
) -> None:
    fake_api.inject("bad_base64")
    with pytest.raises(UpstreamMalformed) as info:
        await service.draw(ALICE, "low a cat")
    assert info.value.usage is not None
    report = await service.ledger.spend_report(ALICE.user_key)
    assert report.today == pytest.approx(service.prices.credits(info.value.usage, "gpt-image-2"))
    assert report.today > 0


async def test_prompt_error_reserves_nothing(service: ImageService) -> None:
    with pytest.raises(PromptError):
        await service.draw(ALICE, "5:1 a very wide cat")
    report = await service.ledger.spend_report(ALICE.user_key)
    assert report.last_jobs == ()


async def test_references_go_to_edits(service: ImageService, fake_api: FakeImageAPI) -> None:
    refs = [IncomingImage(_png(600, 400), "a.png", "ref-a"), IncomingImage(_png(64, 64), "b.png")]
    outcome = await service.draw(ALICE, "2K make it night", refs)
    sent = fake_api.api_requests[-1]
    assert sent.path == "/v1/images/edits"
    assert [p.name for p in sent.files] == ["image[]", "image[]"]
    assert outcome.request.size != "auto" and outcome.reference_count == 2
    w, h = outcome.request.dimensions or (0, 0)
    assert abs(w / h - 1.5) < 0.05  # the first reference's aspect at 2K
    job = await service.ledger.get_job(outcome.job_id)
    assert job is not None and job.reference_count == 2
    assert json.loads(job.request_json)["reference_refs"] == ["ref-a", None]


async def test_limit_refusal_says_what_fits(make_service: Callable[..., Any]) -> None:
    async with make_service(user_daily_limit=1500) as service:
        with pytest.raises(LimitExceeded) as info:
            await service.draw(ALICE, "4K high a castle")
        en, zh = info.value.user_message("en"), info.value.user_message("zh")
        assert info.value.params["suggestion"]
        assert info.value.params["suggestion"] in en and info.value.params["suggestion"] in zh
        assert "1,500" in en or "1500" in en
        # The suggestion really fits.
        await service.draw(ALICE, info.value.params["suggestion"] + " a castle")


async def test_rate_limit_message(make_service: Callable[..., Any]) -> None:
    async with make_service(rate_limit_per_minute=2) as service:
        await service.draw(ALICE, "low a")
        await service.draw(ALICE, "low b")
        with pytest.raises(RateLimited) as info:
            await service.draw(ALICE, "low c")
        assert "2" in info.value.user_message("en") and "每分钟" in info.value.user_message("zh")
        await service.draw(BOB, "low d")  # others are not limited


async def test_queue_position_and_cancel(
    make_service: Callable[..., Any], fake_api: FakeImageAPI
) -> None:
    async with make_service(max_jobs_in_flight=1) as service:
        fake_api.inject("slow", seconds=1.0)
        first = asyncio.create_task(service.draw(ALICE, "low slow one"))
        await asyncio.sleep(0.3)
        positions: list[int] = []
        queued = asyncio.Event()

        async def progress(event: Progress) -> None:
            if event.kind == "queued":
                positions.append(event.position)
                queued.set()

        second = asyncio.create_task(service.draw(BOB, "low waiting", (), progress))
        await asyncio.wait_for(queued.wait(), 2)
        assert positions == [1]
        assert await service.cancel(BOB)
        with pytest.raises(Cancelled) as info:
            await second
        assert "未扣费" in info.value.user_message("zh")
        await first
        report = await service.ledger.spend_report(BOB.user_key)
        assert report.today == 0 and report.last_jobs[0].status == JobStatus.FAILED


async def test_access_rules(make_service: Callable[..., Any]) -> None:
    async with make_service(allowed_users=["telegram:1"]) as service:
        await service.draw(ALICE, "low ok")
        with pytest.raises(AccessDenied) as info:
            await service.draw(BOB, "low nope")
        assert info.value.params["silent"] is True  # a stranger in a group: say nothing
        private = Requester("telegram", "2", None, "Bob", "en")
        with pytest.raises(AccessDenied) as info:
            await service.draw(private, "low nope")
        assert info.value.params["silent"] is False
        await run_admin(service, ADMIN, "block", ["1"])
        with pytest.raises(AccessDenied) as info:
            await service.draw(ALICE, "low blocked")
        assert info.value.key == "access.blocked"
        await run_admin(service, ADMIN, "unblock", ["1"])
        await service.draw(ALICE, "low again ok")


async def test_admin_commands(service: ImageService) -> None:
    outcome = await service.draw(ALICE, "low a cat")
    with pytest.raises(AccessDenied):
        await run_admin(service, ALICE, "refund", [str(outcome.job_id)])
    reply = await run_admin(service, ADMIN, "limit", ["1", "daily=5000", "monthly=90000"])
    assert "5,000" in reply and "90,000" in reply
    user = await service.ledger.get_user(ALICE.user_key)
    assert user is not None and user.daily_limit == 5000 and user.monthly_limit == 90000
    top = await run_admin(service, ADMIN, "top", [])
    assert "Alice" in top
    assert "-100" in await run_admin(service, ADMIN, "chats", ["1"])
    reply = await run_admin(service, ADMIN, "refund", [str(outcome.job_id)])
    assert f"#{outcome.job_id}" in reply
    assert (await service.ledger.spend_report(ALICE.user_key)).today == 0
    with pytest.raises(PromptError):
        await run_admin(service, ADMIN, "limit", ["1", "daily=lots"])
    assert await run_admin(service, ADMIN, "unsettled", []) == text("en", "admin.nothing")


async def test_job_killed_mid_flight_becomes_unsettled(
    make_service: Callable[..., Any], fake_api: FakeImageAPI
) -> None:
    async with make_service() as service:
        fake_api.inject("hang", seconds=3)
        started = asyncio.Event()

        async def progress(event: Progress) -> None:
            if event.kind == "started":
                started.set()

        task = asyncio.create_task(service.draw(ALICE, "low hanging", (), progress))
        await asyncio.wait_for(started.wait(), 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        jobs = await service.ledger.list_unsettled()
        assert len(jobs) == 1 and jobs[0].status == JobStatus.UNSETTLED
        report = await service.ledger.spend_report(ALICE.user_key)
        assert report.today == pytest.approx(jobs[0].estimated_credits)
        listing = await run_admin(service, ADMIN, "unsettled", [])
        assert f"#{jobs[0].id}" in listing
        await run_admin(service, ADMIN, "refund", [str(jobs[0].id)])
        assert (await service.ledger.spend_report(ALICE.user_key)).today == 0


async def test_shutdown_cancels_waiting_and_finishes_running(
    make_service: Callable[..., Any], fake_api: FakeImageAPI
) -> None:
    async with make_service(max_jobs_in_flight=1) as service:
        fake_api.inject("slow", seconds=0.6)
        running = asyncio.create_task(service.draw(ALICE, "low running"))
        await asyncio.sleep(0.2)
        waiting = asyncio.create_task(service.draw(BOB, "low waiting"))
        await asyncio.sleep(0.1)
        await service.shutdown(grace=5)
        outcome = await running
        assert outcome.images
        with pytest.raises(Cancelled) as info:
            await waiting
        assert info.value.key == "job.shutting_down"
        with pytest.raises(Cancelled):
            await service.draw(ALICE, "low after shutdown")
        bob = await service.ledger.spend_report(BOB.user_key)
        assert bob.today == 0


async def test_replay_after_restart(make_service: Callable[..., Any]) -> None:
    async with make_service() as service:
        outcome = await service.draw(ALICE, "16:9 low a lighthouse")
        result = outcome.images[0]
        await service.ledger.set_result_refs(outcome.job_id, ["file-1"])
    fetched: list[str] = []

    async def fetch(ref: str) -> IncomingImage:
        fetched.append(ref)
        return IncomingImage(result.data, "result.png", ref)

    async with make_service() as service:  # a new process on the same ledger file
        again = await service.replay(BOB, outcome.job_id, "again", fetch)
        assert again.request.size == "1280x720"
        big = await service.replay(BOB, outcome.job_id, "4k", fetch)
        assert big.request.size == "3840x2160"
        vary = await service.replay(BOB, outcome.job_id, "vary", fetch)
        assert vary.reference_count == 1 and fetched == ["file-1"]
        bob = await service.ledger.spend_report(BOB.user_key)
        assert len(bob.last_jobs) == 3  # the presser paid
        alice = await service.ledger.spend_report(ALICE.user_key)
        assert len(alice.last_jobs) == 1


async def test_many_users_under_limits(make_service: Callable[..., Any]) -> None:
    users = [Requester("discord", str(i), "guild", f"u{i}", "en", is_group=True) for i in range(12)]
    async with make_service(
        user_daily_limit=2500, chat_daily_limit=20000, global_daily_limit=25000
    ) as service:
        _, cost = service.parse("low x")

        async def one(user: Requester, i: int) -> str:
            try:
                await service.draw(user, f"low job {i}")
                return "ok"
            except LimitExceeded as err:
                return err.key

        results = await asyncio.gather(*(one(users[i % 12], i) for i in range(60)))
        assert "ok" in results and any(r.startswith("limit.") for r in results)
        assert not any(r not in ("ok",) and not r.startswith("limit.") for r in results)
        total = 0.0
        for user in users:
            report = await service.ledger.spend_report(user.user_key)
            assert report.today <= 2500 + 1e-6
            total += report.today
        assert total <= 20000 + 1e-6
        assert cost > 0


def test_texts_in_both_languages() -> None:
    assert "/img 16:9 2K high" in render_help("en")
    assert "示例" in render_help("zh-hans")
    sizes = render_sizes("en")
    assert "2048x1152" in sizes and "3808x1632" in sizes


async def test_balance_text(service: ImageService) -> None:
    await service.draw(ALICE, "low a cat")
    text_en = render_balance(await service.ledger.spend_report(ALICE.user_key), service.prices, "en")
    assert "Today" in text_en and "#1" in text_en
    text_zh = render_balance(await service.ledger.spend_report(ALICE.user_key), service.prices, "zh")
    assert "今日" in text_zh



async def test_chat_admin_power_ends_at_their_chat(service: ImageService) -> None:
    manager = Requester("discord", "7", "guild-1", "Mod", "en", is_group=True, is_chat_admin=True)
    for name, args in (("block", ["8"]), ("refund", ["1"]), ("top", []), ("limit", ["8", "daily=1"])):
        with pytest.raises(AccessDenied) as info:
            await run_admin(service, manager, name, args)
        assert info.value.key == "access.admin_only"
    await run_admin(service, manager, "chatlimit", ["daily=300"])
    chat = await service.ledger.get_chat("discord:guild-1")
    assert chat is not None and chat.daily_limit == 300
    with pytest.raises(AccessDenied) as info:
        await run_admin(service, manager, "chatlimit", ["guild-2", "daily=1"])
    assert info.value.key == "access.own_chat_only"
    # Allowlists are not bypassed by managing a server.
    assert not service.is_admin(manager)


async def test_queued_per_user_holds_for_requests_arriving_together(
    make_service: Callable[..., Any], fake_api: FakeImageAPI
) -> None:
    # 20 requests from one user at once: the room check and the place in the queue used
    # to be an await apart (the reservation), so every request saw an empty queue.
    fake_api.delay = 0.3
    async with make_service(max_jobs_per_user=1, max_queued_per_user=3) as service:
        results = await asyncio.gather(
            *(service.draw(ALICE, f"low cat {i}") for i in range(20)), return_exceptions=True
        )
        drawn = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, QueueFull)]
        assert len(drawn) == 1 + 3 and len(refused) == 16, results
        assert "waiting" in refused[0].user_message("en")
        # Nothing reserved or charged for the refused ones.
        report = await service.ledger.spend_report(ALICE.user_key, last=30)
        assert len(report.last_jobs) == 4
        assert report.today == pytest.approx(sum(o.credits for o in drawn))
        assert len(fake_api.api_requests) == 4


async def test_truncated_result_image_fails_before_drawn_and_is_charged_its_usage(
    service: ImageService, fake_api: FakeImageAPI
) -> None:
    # A PNG cut in half has a good header: only a full decode finds it, and it must be
    # found before the job counts as drawn, not at delivery.
    fake_api.inject("truncated")
    _, estimate = service.parse("low a cat")
    with pytest.raises(UpstreamCorruptImage) as info:
        await service.draw(ALICE, "low a cat")
    err = info.value
    assert err.key == "upstream.corrupt_image" and err.usage is not None
    assert "damaged" in err.user_message("en") and err.user_message("zh") != err.user_message("en")
    job = (await service.ledger.spend_report(ALICE.user_key)).last_jobs[0]
    assert job.status == JobStatus.FAILED and job.error_code == "corrupt_image"
    # The upstream billed it: charged what its usage says, never above the reservation.
    charged = service.prices.credits(err.usage, "gpt-image-2")
    assert job.actual_credits == pytest.approx(min(charged, estimate)) and charged > 0


async def test_truncated_result_image_without_usage_is_charged_the_reservation(
    service: ImageService, fake_api: FakeImageAPI
) -> None:
    fake_api.usage_rewrite = lambda usage: MISSING
    fake_api.inject("truncated")
    _, estimate = service.parse("low a cat")
    with pytest.raises(UpstreamCorruptImage):
        await service.draw(ALICE, "low a cat")
    job = (await service.ledger.spend_report(ALICE.user_key)).last_jobs[0]
    assert job.status == JobStatus.FAILED and job.error_code == "corrupt_image"
    assert job.actual_credits == pytest.approx(estimate)
    assert job.usage_flag == "usage_missing"


class _UnwritableLedger:
    """Makes the service's real SQLite ledger refuse every write while `broken` is set.

    As root, chmod cannot make the file read-only, so the writes raise what SQLite raises
    on a full disk; reads and, once repaired, writes go to the real ledger.
    """

    WRITES = ("reserve", "mark_started", "settle", "fail", "mark_unsettled", "check_writable")

    def __init__(self, ledger: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.broken = False
        for name in self.WRITES:
            monkeypatch.setattr(ledger, name, self._guard(getattr(ledger, name)))

    def _guard(self, real: Callable[..., Any]) -> Callable[..., Any]:
        async def write(*args: Any, **kwargs: Any) -> Any:
            if self.broken:
                raise sqlite3.OperationalError("database or disk is full")
            return await real(*args, **kwargs)

        return write


async def test_store_health_turns_false_while_writes_fail_and_recovers(
    service: ImageService, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = _UnwritableLedger(service.ledger, monkeypatch)
    await service.draw(ALICE, "low a cat")
    assert service.store_healthy
    # The answer arrives, the settle cannot be written: the service must say so, and keep
    # the drawn image, trying the charge again until the disk is freed.
    original_settle = service.ledger.settle
    tries: list[int] = []

    async def settle_on_full_disk(*args: Any, **kwargs: Any) -> Any:
        if not tries:
            ledger.broken = True  # the disk fills up just as the first image is charged
        tries.append(1)
        return await original_settle(*args, **kwargs)

    monkeypatch.setattr(service.ledger, "settle", settle_on_full_disk)
    dog = asyncio.create_task(service.draw(ALICE, "low a dog"))
    for _ in range(500):
        if not service.store_healthy:
            break
        await asyncio.sleep(0.01)
    assert not service.store_healthy and "disk is full" in service.store_problem
    # Still failing: a probe keeps it unhealthy, and so does a refused reservation.
    assert not await service.check_store()
    with pytest.raises(sqlite3.OperationalError):
        await service.draw(ALICE, "low a bird")
    assert not service.store_healthy and not dog.done()
    # The disk is freed: a probe (the heartbeat's, with no job coming) turns it healthy,
    # and the held image is charged once and handed out.
    ledger.broken = False
    assert await service.check_store()
    assert service.store_healthy and service.store_problem == ""
    outcome = await asyncio.wait_for(dog, 30)
    assert len(tries) >= 2 and outcome.images
    job = await service.ledger.get_job(outcome.job_id)
    assert job is not None and job.status is JobStatus.SUCCEEDED
    assert job.actual_credits == pytest.approx(outcome.credits)
    # And a failure followed by a successful write recovers without a probe.
    ledger.broken = True
    with pytest.raises(sqlite3.OperationalError):
        await service.draw(ALICE, "low a fish")
    assert not service.store_healthy
    ledger.broken = False
    await service.draw(ALICE, "low a fox")
    assert service.store_healthy


@pytest.mark.parametrize("keep", ["files", "ledger"])
async def test_result_is_kept_before_the_job_is_marked_drawn(
    make_service: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, keep: str
) -> None:
    # The settle moves the job to `drawn`: a process killed right after it commits must
    # leave a result the next process can deliver, so the copy has to be complete by then.
    async with make_service(keep_results=keep) as service:
        original_settle = service.ledger.settle
        seen: list[Any] = []

        async def settle(job_id: int, *args: Any, **kwargs: Any) -> Any:
            seen.append(await service.results.load(job_id))
            return await original_settle(job_id, *args, **kwargs)

        original_save = service.results.save

        async def slow_save(*args: Any, **kwargs: Any) -> Any:  # a big image, a slow disk
            await asyncio.sleep(0.3)
            return await original_save(*args, **kwargs)

        monkeypatch.setattr(service.ledger, "settle", settle)
        monkeypatch.setattr(service.results, "save", slow_save)
        outcome = await service.draw(ALICE, "low a cat")
        assert len(seen) == 1 and seen[0] is not None
        assert seen[0].images == outcome.images


async def test_a_result_the_ledger_cannot_take_yet_is_kept_before_the_charge(
    make_service: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # KEEP_RESULTS=ledger and the disk fills up just as the result is saved: the ledger
    # cannot take the charge either, so the service waits for both, the result first.
    async with make_service(keep_results="ledger") as service:
        original_keep, original_settle = service.ledger.keep_result, service.ledger.settle
        saves: list[bool] = []
        seen: list[Any] = []

        async def keep_on_full_disk(*args: Any, **kwargs: Any) -> Any:
            saves.append(service.store_healthy)
            if len(saves) == 1:
                raise sqlite3.OperationalError("database or disk is full")
            return await original_keep(*args, **kwargs)

        async def settle(job_id: int, *args: Any, **kwargs: Any) -> Any:
            seen.append(await service.results.load(job_id))
            return await original_settle(job_id, *args, **kwargs)

        monkeypatch.setattr(service.ledger, "keep_result", keep_on_full_disk)
        monkeypatch.setattr(service.ledger, "settle", settle)
        outcome = await service.draw(ALICE, "low a cat")
        assert saves == [True, False]  # tried again, the store reported unwritable meanwhile
        assert len(seen) == 1 and seen[0] is not None and seen[0].images == outcome.images
        assert service.store_healthy


async def test_a_delivered_result_the_ledger_cannot_drop_yet_is_dropped_by_the_clean_up(
    make_service: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_service(keep_results="ledger", result_retention_hours=0) as service:
        outcome = await service.draw(ALICE, "low a cat")
        original_drop = service.ledger.drop_result

        async def drop_on_full_disk(job_id: int) -> None:
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(service.ledger, "drop_result", drop_on_full_disk)
        await service.finish_delivery(outcome.job_id, delivered=True)  # no error: delivered
        job = await service.job(outcome.job_id)
        assert job is not None and job.stage is JobStage.DELIVERED
        assert await service.results.load(outcome.job_id) is not None
        monkeypatch.setattr(service.ledger, "drop_result", original_drop)
        assert await service.clean_results() == 1
        assert await service.results.kept() == []


@pytest.mark.parametrize(("keep", "shared"), [("auto", True), ("ledger", True), ("files", False)])
async def test_a_drawn_result_in_the_ledger_is_delivered_by_a_process_without_its_data_dir(
    make_service: Callable[..., Any], tmp_path: Path, pg_url: str, keep: str, shared: bool,  # noqa: F811
) -> None:
    # Two replicas on different machines: one PostgreSQL, each its own DATA_DIR. The first
    # draws a job and dies before delivering it; the second takes the job over.
    first_dir, second_dir = tmp_path / "machine-1", tmp_path / "machine-2"
    async with make_service(database_url=pg_url, data_dir=str(first_dir),
                            keep_results=keep) as first:
        outcome = await first.draw(ALICE, "low a cat")
        left = await first.job(outcome.job_id)
        assert left is not None and left.stage is JobStage.DRAWN
        async with make_service(database_url=pg_url, data_dir=str(second_dir),
                                keep_results=keep) as second:
            kept = await second.kept_outcome(left)
    if not shared:  # files stay on the machine that drew them
        assert kept is None
        assert (first_dir / "results" / str(outcome.job_id) / "result.json").is_file()
        return
    assert kept is not None
    assert kept.images == outcome.images  # byte for byte
    assert (kept.job_id, kept.request, kept.credits) == (outcome.job_id, outcome.request,
                                                         outcome.credits)
    # Nothing was written to either machine's folder.
    assert not (first_dir / "results").exists() and not (second_dir / "results").exists()


async def test_results_in_the_ledger_are_cleaned_only_once_their_job_has_ended(
    make_service: Callable[..., Any], tmp_path: Path, pg_url: str,  # noqa: F811
) -> None:
    async with make_service(database_url=pg_url, data_dir=str(tmp_path / "one"),
                            result_retention_hours=0) as first:
        waiting = await first.draw(ALICE, "low a cat")
        lost = await first.draw(BOB, "low a dog")
        delivered = await first.draw(BOB, "low a fox")
        await first.finish_delivery(lost.job_id, delivered=False)  # ended: undelivered
        await first.finish_delivery(delivered.job_id, delivered=True)  # removed at once
        assert [job for job, _ in await first.results.kept()] == [waiting.job_id,
                                                                  lost.job_id]
        # Another replica cleans: the drawn job's result stays (it is not its own to hold,
        # but its job is not over); the undelivered job's goes.
        async with make_service(database_url=pg_url, data_dir=str(tmp_path / "two"),
                                result_retention_hours=0) as second:
            assert await second.clean_results() == 1
            assert [job for job, _ in await second.results.kept()] == [waiting.job_id]
            assert await second.results.load(waiting.job_id) is not None


async def test_a_failure_that_cannot_be_written_is_written_once_the_store_recovers(
    service: ImageService, fake_api: FakeImageAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The upstream fails with usage (billed) just as the disk fills up: the job must not
    # stay `drawing` and held here for good; its failure is written once the disk is freed.
    ledger = _UnwritableLedger(service.ledger, monkeypatch)
    original_fail = service.ledger.fail
    tries: list[int] = []

    async def fail_on_full_disk(*args: Any, **kwargs: Any) -> Any:
        if not tries:
            ledger.broken = True
        tries.append(1)
        return await original_fail(*args, **kwargs)

    monkeypatch.setattr(service.ledger, "fail", fail_on_full_disk)
    fake_api.inject("bad_base64")
    cat = asyncio.create_task(service.draw(ALICE, "low a cat"))
    for _ in range(500):
        if not service.store_healthy:
            break
        await asyncio.sleep(0.01)
    assert not service.store_healthy and not cat.done()
    ledger.broken = False
    with pytest.raises(UpstreamMalformed) as info:
        await asyncio.wait_for(cat, 30)
    assert len(tries) >= 2 and service.store_healthy
    report = await service.ledger.spend_report(ALICE.user_key)
    job = report.last_jobs[0]
    assert (job.status, job.error_code) == (JobStatus.FAILED, info.value.code)
    assert report.today == pytest.approx(service.prices.credits(info.value.usage, "gpt-image-2"))
    assert job.id not in service.held


async def test_a_job_taken_over_while_drawing_is_let_go_of_not_charged_twice(
    make_service: Callable[..., Any], fake_api: FakeImageAPI
) -> None:
    # A process stalls longer than its lease (its renewals stop), another process takes
    # its drawing job over and draws it again. When the first one's answer finally comes,
    # it must not charge, keep or deliver it: the job is the other's now.
    async with make_service(job_lease=1) as slow, make_service(job_lease=1) as other:
        for task in asyncio.all_tasks():
            if task.get_name() == LEASES_TASK_NAME:
                task.cancel()  # both stop renewing: the stalled one is what matters
        fake_api.inject("slow", seconds=2.5)
        drawing = asyncio.create_task(slow.draw(ALICE, "low a cat"))
        await asyncio.sleep(1.6)  # the lease ran out meanwhile
        claimed = await other.ledger.claim_expired(other.owner, 1, ["telegram"])
        assert [job.stage for job in claimed] == [JobStage.QUEUED]  # was drawing: lost
        with pytest.raises(JobTakenOver):
            await drawing
        job = await other.ledger.get_job(claimed[0].id)
        assert job is not None
        assert (job.status, job.stage, job.lease_owner) == (
            JobStatus.RESERVED, JobStage.QUEUED, other.owner
        )
        assert job.actual_credits is None and job.lost_credits == job.estimated_credits
        assert claimed[0].id not in slow.held


async def test_a_chat_job_arriving_while_stopping_is_kept_for_another_process(
    make_service: Callable[..., Any],
) -> None:
    # A rolling restart: the proxy still hands this process an update after SIGTERM. A chat
    # job (its front end can carry jobs on) is reserved and left queued, for another process
    # to claim and deliver; refusing it would lose it, its update being marked handled.
    async with make_service(job_lease=1) as stopping, make_service(job_lease=1) as other:
        for service in (stopping, other):
            service.add_resumer("telegram", lambda job: None)
        # The front end stops first (it takes no more jobs over), then the service: the
        # update was already in the Application's queue and is handled after both.
        stopping.drop_resumer("telegram")
        await stopping.shutdown(0)
        origin = {"via": "telegram", "chat": "1"}
        with pytest.raises(Cancelled) as told:
            await stopping.draw(ALICE, "low a cat", origin=origin, source_ref="tg:1:77")
        assert told.value.key == "job.resumes_after_restart"
        job_id = told.value.params["job_id"]
        job = await other.ledger.get_job(job_id)
        assert job is not None and (job.status, job.stage) == (JobStatus.RESERVED, JobStage.QUEUED)
        # A web or terminal job cannot be carried on: refused, nothing reserved.
        with pytest.raises(Cancelled) as refused:
            await stopping.draw(BOB, "low a dog")
        assert refused.value.key == "job.shutting_down"
        await asyncio.sleep(1.1)  # a lease old: the other process takes it over
        claimed = await other.ledger.claim_expired(other.owner, 1, ["telegram"])
        assert [job.id for job in claimed] == [job_id]
