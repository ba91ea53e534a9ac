"""Upstream faults through the whole pipeline: the user's message and the ledger's rows.

Rules: no charge without usage; the exact charge with usage; nothing left reserved; other
users' jobs go on; a fault that could have billed is never retried.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.config import Settings
from core.errors import UpstreamError
from core.requester import Requester
from core.runtime import open_service
from core.store import JobStatus
from tests.fake_api import FakeImageAPI

VICTIM = Requester("telegram", "1", "-100", "Victim", "en", is_group=True)
BYSTANDER = Requester("telegram", "2", "-100", "Bystander", "zh", is_group=True)

# fault → (error key, charged from usage?, calls the fake must see with max_retries=2)
FAULTS: dict[str, tuple[dict[str, Any], str, bool, int]] = {
    "unauthorized": ({}, "upstream.auth", False, 1),
    "insufficient_balance": ({}, "upstream.balance", False, 1),
    "insufficient_quota": ({}, "upstream.balance", False, 1),
    "rate_limit": ({"times": 3, "retry_after": 0}, "upstream.rate_limited", False, 3),
    "server_error": ({}, "upstream.unavailable", False, 1),
    "unavailable": ({"times": 3}, "upstream.unavailable", False, 3),
    "hang": ({"seconds": 3}, "upstream.timeout", False, 1),
    "trickle": ({"interval": 0.3, "chunk": 8}, "upstream.timeout", False, 1),
    "truncated_json": ({}, "upstream.malformed", False, 1),
    "invalid_json": ({}, "upstream.malformed", False, 1),
    "empty_data": ({}, "upstream.no_image", True, 1),
    "bad_base64": ({}, "upstream.malformed", True, 1),
    "truncated": ({}, "upstream.corrupt_image", True, 1),
    "url_404": ({}, "upstream.download_failed", True, 1),
    "url_too_large": ({}, "upstream.download_failed", True, 1),
    "moderation_blocked": ({}, "upstream.moderation", False, 1),
    "drop": ({}, "upstream.unavailable", False, 1),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_fault_is_told_and_booked(
    fault: str, settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    params, key, charged, calls = FAULTS[fault]
    params = dict(params)
    times = params.pop("times", 1)
    mode = "url" if fault.startswith("url_") else "b64"
    fake_api.mode = mode
    s = settings(
        database_url=f"sqlite:///{tmp_path}/ledger.db",
        request_timeout=1.0,
        rate_limit_per_minute=0,
        response_format="url" if mode == "url" else "none",
        max_download_bytes=1024 * 1024,
    )
    async with open_service(s) as service:
        service.client._sleep = _no_sleep  # type: ignore[attr-defined]
        fake_api.inject(fault, times=times, **params)
        with pytest.raises(UpstreamError) as info:
            await service.draw(VICTIM, "low a cat")
        err = info.value
        # The user's message is clear, in both languages, and is this fault's own.
        assert err.key == key
        assert err.user_message("en") and err.user_message("zh") != err.user_message("en")
        assert "Traceback" not in err.user_message("en")
        # Retries happen only where the call cannot have billed.
        api_calls = [r for r in fake_api.requests if r.path.startswith("/v1/images")]
        assert len(api_calls) == calls
        report = await service.ledger.spend_report(VICTIM.user_key)
        job = report.last_jobs[0]
        assert job.status == JobStatus.FAILED and job.error_code == err.code
        if charged:
            assert err.usage is not None
            assert job.actual_credits == pytest.approx(service.prices.credits(err.usage, "gpt-image-2"))
        else:
            assert report.today == 0
        # Nothing is left reserved, and the next job of another user goes through.
        outcome = await service.draw(BYSTANDER, "low a dog")
        assert outcome.images
        assert not [j for j in (await service.ledger.spend_report(BYSTANDER.user_key)).last_jobs
                    if j.status == JobStatus.RESERVED]


async def _no_sleep(_seconds: float) -> None:
    await asyncio.sleep(0)


async def test_one_users_hang_does_not_stop_others(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    s = settings(database_url=f"sqlite:///{tmp_path}/ledger.db", request_timeout=2.0)
    async with open_service(s) as service:
        fake_api.inject("hang", seconds=3)
        stuck = asyncio.create_task(service.draw(VICTIM, "low stuck"))
        await asyncio.sleep(0.2)
        outcome = await asyncio.wait_for(service.draw(BYSTANDER, "low free"), 1.5)
        assert outcome.images and not stuck.done()
        with pytest.raises(UpstreamError):
            await stuck
