"""Money rules at the service: a job is never charged above its reservation, whatever the
upstream's usage says, and usage that cannot be a bill is charged the reservation and
flagged for admins — while the user still gets the image (real fake API over HTTP, real
SQLite store)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from core.errors import ImgbotError
from core.requester import Requester
from tests.fake_api import MISSING, FakeImageAPI

SINCE = datetime(2000, 1, 1, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[1]


def times(factor: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def rewrite(usage: dict[str, Any]) -> dict[str, Any]:
        return {**usage, "output_tokens": usage["output_tokens"] * factor,
                "total_tokens": usage["total_tokens"] * factor}
    return rewrite


async def test_usage_8x_the_estimate_under_100_concurrent_jobs_passes_no_limit(
    make_service: Callable[..., Any], fake_api: FakeImageAPI
) -> None:
    fake_api.usage_rewrite = times(8)
    limit = 20_000.0
    users = [Requester("telegram", str(i), "-100", f"U{i}") for i in range(4)]
    async with make_service(
        user_daily_limit=limit,
        chat_daily_limit=3 * limit,
        global_daily_limit=3 * limit,
        rate_limit_per_minute=0,
        max_jobs_per_user=100,
        max_queued_per_user=100,
        max_jobs_in_flight=100,
        confirm_above=0,
    ) as service:

        async def draw(i: int) -> Any:
            try:
                return await service.draw(users[i % 4], "low a cat")
            except ImgbotError as err:
                return err

        outcomes = await asyncio.gather(*(draw(i) for i in range(100)))
        drawn = [o for o in outcomes if not isinstance(o, ImgbotError)]
        assert drawn, outcomes[:3]
        for outcome in drawn:
            # Told and charged at most what was reserved, with the image delivered.
            assert outcome.credits <= outcome.estimated + 1e-9 and outcome.images
        for user in users:
            report = await service.ledger.spend_report(user.user_key)
            assert report.today <= limit + 1e-6
        assert await service.ledger.global_spent_today() <= 3 * limit + 1e-6
        flagged = await service.ledger.flagged_jobs(SINCE)
        assert len(flagged) == len(drawn)
        for job in flagged:
            assert job.usage_flag == "over_estimate"
            assert job.reported_credits is not None
            assert job.reported_credits > job.estimated_credits == job.actual_credits


@pytest.mark.parametrize(
    ("rewrite", "flag"),
    [
        (times(10**9), "usage_invalid"),  # 10^12-ish tokens: a broken relay, not a bill
        (lambda u: {**u, "output_tokens": -5}, "usage_invalid"),
        (lambda u: {**u, "output_tokens": float("inf")}, "usage_invalid"),  # 1e999 on the wire
        (
            lambda u: {**u, "input_tokens_details": {"text_tokens": "lots", "image_tokens": 0}},
            "usage_invalid",
        ),
        (lambda u: MISSING, "usage_missing"),
    ],
    ids=["absurd", "negative", "infinite", "text", "missing"],
)
async def test_unusable_usage_is_charged_the_reservation_flagged_and_delivered(
    make_service: Callable[..., Any],
    fake_api: FakeImageAPI,
    rewrite: Callable[[dict[str, Any]], Any],
    flag: str,
) -> None:
    fake_api.usage_rewrite = rewrite
    ann = Requester("telegram", "7", None, "Ann")
    async with make_service(user_daily_limit=50_000, confirm_above=0) as service:
        outcome = await service.draw(ann, "low a fox")
        assert outcome.images and outcome.images[0].data  # the user still gets the image
        assert outcome.credits == pytest.approx(outcome.estimated)
        job = await service.ledger.get_job(outcome.job_id)
        assert job is not None and job.status.value == "succeeded"
        assert job.actual_credits == pytest.approx(job.estimated_credits)
        assert job.usage_flag == flag
        assert [j.id for j in await service.ledger.flagged_jobs(SINCE)] == [job.id]
        # The totals stay exact and small: nothing overflowed.
        assert await service.ledger.global_spent_today() == pytest.approx(job.estimated_credits)


async def test_the_operator_sees_what_was_absorbed(
    make_service: Callable[..., Any], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    fake_api.usage_rewrite = times(8)
    ann = Requester("telegram", "7", None, "Ann")
    async with make_service(confirm_above=0) as service:
        outcome = await service.draw(ann, "low a heron")
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "bots.cli", "usage", "--flagged", "--since", "2000-01-01"],
        cwd=tmp_path,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OPENAI_API_KEY": "x",
            "DATABASE_URL": f"sqlite:///{tmp_path}/ledger.db",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"#{outcome.job_id} " in done.stdout and "over_estimate" in done.stdout
    assert "usage said" in done.stdout and "absorbed above the estimates" in done.stdout
