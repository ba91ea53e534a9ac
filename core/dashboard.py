"""The operators' dashboard, platform-free: what the web door's `/admin` shows, read from the
ledger and the kept results. Nothing here writes: every action on the dashboard is an admin
command (`core.admin.run_admin`), the same the chats run.

Definitions the dashboard shows (the cards' hints say them too):
- spend: what jobs count against limits (`JobRecord.charged`: a refund gives it back);
  today's against GLOBAL_DAILY_LIMIT, from the running totals the limit itself reads;
- outcome: delivered = succeeded; failed by error code; cancelled; undelivered; open
  (queued, drawing, drawn) — from the job's stage;
- success rate: delivered / (delivered + failed + undelivered); a cancellation is the
  user's choice and counts on neither side;
- draw time: from the start of drawing to the charge (started_at → finished_at), over the
  jobs whose drawing succeeded; median and p95 by nearest rank;
- an estimator miss: a job the upstream's usage said cost more than its reservation (the
  operator absorbed the difference), or whose usage was unusable (charged the reservation).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from core.imaging import preview_jpeg
from core.service import ImageService
from core.store import (
    ChatRecord,
    ChatTotal,
    DailyUsage,
    JobRecord,
    JobStatus,
    OutcomeCount,
    PrepaidSpend,
    PurchaseTotals,
    Spender,
    UserRecord,
)

PERIODS = (1, 7, 30, 90)  # days the tables and cards may cover
CHART_PERIODS = (30, 90)  # days the daily charts may cover
QUANTILES = (0.5, 0.95)
BALANCE_WINDOW = timedelta(hours=24)
BALANCE_CODE = "balance"  # core.errors.UpstreamBalanceError's code (402, out of quota)
TOP_ROWS = 20
USER_JOBS = 100
THUMB_SIDE = 256
OPEN_STAGES = ("queued", "drawing", "drawn")


@dataclass(frozen=True)
class Cards:
    """The numbers at the top of the dashboard, over the chosen period (spend: today/month)."""

    spent_today: float
    spent_month: float
    global_daily_limit: float  # 0 = unlimited
    jobs: int
    delivered: int
    failed: int
    undelivered: int
    cancelled: int
    open: int
    median_s: float | None
    p95_s: float | None
    balance_errors_24h: int

    @property
    def success_rate(self) -> float | None:
        """Return delivered / (delivered + failed + undelivered); None when none ended."""
        ended = self.delivered + self.failed + self.undelivered
        return self.delivered / ended if ended else None


@dataclass(frozen=True)
class Outcome:
    """One bar of the outcomes chart: a kind (delivered, failed, cancelled, undelivered,
    open), the error code of a failure, and how many jobs."""

    kind: str
    code: str
    jobs: int


@dataclass(frozen=True)
class Overview:
    """Everything the dashboard's first screen shows, for one period."""

    days: int
    since: datetime
    chart_days: int
    cards: Cards
    daily: list[DailyUsage]
    outcomes: list[Outcome]
    misses: list[JobRecord]
    top_users: list[Spender]
    top_chats: list[ChatTotal]
    open_jobs: list[JobRecord]
    unsettled: list[JobRecord]
    undelivered: list[JobRecord]
    users: list[UserRecord]
    chats: list[ChatRecord]


def period_start(days: int, now: datetime | None = None) -> datetime:
    """Return the start of a period of `days` UTC days ending today (1 = since 00:00 UTC)."""
    now = now or datetime.now(UTC)
    today = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=days - 1)


def outcome_kind(stage: str) -> str:
    """Return the outcome a job's stage counts as."""
    if stage in OPEN_STAGES:
        return "open"
    return stage  # delivered, failed, cancelled, undelivered


def refundable(job: JobRecord) -> bool:
    """Say whether the ledger would refund this job (its rule, for the Refund button)."""
    return job.status in (JobStatus.SUCCEEDED, JobStatus.UNSETTLED) or (
        job.status is JobStatus.FAILED and (job.actual_credits or 0) > 0)


def outcomes_of(counts: Sequence[OutcomeCount]) -> list[Outcome]:
    """Fold the ledger's counts into the outcomes chart's bars, most jobs first."""
    bars: dict[tuple[str, str], int] = {}
    for row in counts:
        kind = outcome_kind(row.stage)
        code = row.error_code if kind == "failed" else ""
        bars[(kind, code)] = bars.get((kind, code), 0) + row.jobs
    return [Outcome(kind, code, jobs)
            for (kind, code), jobs in sorted(bars.items(), key=lambda kv: (-kv[1], kv[0]))]


async def overview(
    service: ImageService, days: int, chart_days: int, *, now: datetime | None = None
) -> Overview:
    """Read the dashboard for the last `days` days (charts: the last `chart_days`)."""
    if days not in PERIODS or chart_days not in CHART_PERIODS:
        raise ValueError(f"days must be one of {PERIODS}, chart days one of {CHART_PERIODS}")
    now = now or datetime.now(UTC)
    ledger = service.ledger
    since = period_start(days, now)
    month = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    (today, month_rows, counts, last_day, quantiles, daily, flagged, users, chats, open_jobs,
     unsettled, undelivered, overrides_u, overrides_c) = await asyncio.gather(
        ledger.global_spent_today(),
        ledger.daily_usage(month),
        ledger.outcome_counts(since),
        ledger.outcome_counts(now - BALANCE_WINDOW),
        ledger.draw_time_quantiles(since, QUANTILES),
        ledger.daily_usage(period_start(chart_days, now)),
        ledger.flagged_jobs(since),
        ledger.top_spenders(since, TOP_ROWS),
        ledger.chat_totals(since),
        ledger.open_jobs(),
        ledger.list_unsettled(),
        ledger.list_undelivered(),
        ledger.users_with_overrides(),
        ledger.chats_with_overrides(),
    )
    outcomes = outcomes_of(counts)

    def total(kind: str) -> int:
        return sum(o.jobs for o in outcomes if o.kind == kind)

    cards = Cards(
        spent_today=today,
        spent_month=sum(row.credits for row in month_rows),
        global_daily_limit=service.settings.global_daily_limit,
        jobs=sum(o.jobs for o in outcomes),
        delivered=total("delivered"),
        failed=total("failed"),
        undelivered=total("undelivered"),
        cancelled=total("cancelled"),
        open=total("open"),
        median_s=quantiles[0],
        p95_s=quantiles[1],
        balance_errors_24h=sum(r.jobs for r in last_day if r.error_code == BALANCE_CODE),
    )
    return Overview(
        days=days, since=since, chart_days=chart_days, cards=cards, daily=daily,
        outcomes=outcomes, misses=flagged, top_users=users, top_chats=chats[:TOP_ROWS],
        open_jobs=open_jobs, unsettled=unsettled, undelivered=undelivered,
        users=overrides_u, chats=overrides_c,
    )


@dataclass(frozen=True)
class Purchases:
    """The Purchases section over the period: what users paid (stars in), the credits it
    granted, refunds, and what prepaid jobs spent with the upstream's cost of it.

    Credits are priced from the upstream's cost (core.pricing: credits = USD × cny_per_usd ×
    credits_per_cny), so what was spent costs `upstream_credits / credits_per_cny` yuan:
    `upstream_credits` is what the usage said, above the charge for an estimator miss."""

    totals: PurchaseTotals
    spend: PrepaidSpend
    upstream_cny: float
    upstream_usd: float

    @property
    def stars_net(self) -> int:
        """Return the stars kept: paid minus refunded."""
        return self.totals.stars - self.totals.refunded_stars

    @property
    def credits_net(self) -> float:
        """Return the credits granted by purchases less what their refunds took back."""
        return self.totals.credits - self.totals.refunded_credits


async def purchases(service: ImageService, since: datetime) -> Purchases | None:
    """Return the period's purchases and prepaid spend; None (the section stays hidden)
    when the bot only caps spend (BILLING=limits) and the period has neither."""
    ledger = service.ledger
    totals, spend = await asyncio.gather(ledger.purchase_totals(since),
                                         ledger.prepaid_spend(since))
    if not service.settings.prepaid and not totals.purchases and not (spend.jobs or spend.held):
        return None
    prices = service.prices
    cny = prices.yuan(spend.upstream_credits)
    return Purchases(totals=totals, spend=spend, upstream_cny=cny,
                     upstream_usd=cny / prices.cny_per_usd)


async def user_jobs(service: ImageService, user_key: str, days: int) -> list[JobRecord]:
    """List one user's jobs over the last `days` days, newest first (at most USER_JOBS)."""
    if days not in PERIODS:
        raise ValueError(f"days must be one of {PERIODS}")
    return await service.ledger.list_jobs(period_start(days), user_key=user_key,
                                          limit=USER_JOBS)


async def kept_job_ids(service: ImageService) -> set[int]:
    """Return the ids of the jobs whose result is still kept."""
    return {job_id for job_id, _ in await service.results.kept()}


async def thumbnail(service: ImageService, job_id: int, index: int) -> bytes | None:
    """Return a small JPEG of one kept result image, or None when it is not kept."""
    kept = await service.results.load(job_id)
    if kept is None or not 0 <= index < len(kept.images):
        return None
    return await preview_jpeg(kept.images[index].data, max_side=THUMB_SIDE, quality=80)


async def export_csv(service: ImageService, days: int) -> str:
    """Return the period's jobs as the ledger's CSV."""
    if days not in PERIODS:
        raise ValueError(f"days must be one of {PERIODS}")
    return await service.ledger.export_csv(period_start(days))
