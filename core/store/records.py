"""The store's records: what a job, a user, a chat and a report look like to the rest of imgbot.

These are plain frozen values with no database types in them; both backends build them
from their rows, and the service, the admin actions and the front ends read only these.

What a job counts against a limit, by status (the one definition, `JobRecord.charged`;
each backend computes the same in its schema):

    reserved, unsettled     estimated_credits   (the upstream may have billed)
    succeeded, failed       actual_credits      (0 when NULL)
    refunded                0

Days and months are UTC: "today" starts at 00:00 UTC and "this month" on the 1st at
00:00 UTC; a job belongs to the day it was reserved (`created_at`). A limit of 0 means
unlimited, for the defaults and for per-user / per-chat overrides alike; None = the default.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

from core.errors import LimitExceeded, RateLimited, UserError
from core.pricing import Usage
from core.types import GeneratedImage


class LimitSettings(Protocol):
    """What `Limits.from_settings` reads (core.config.Settings has it; the store does not
    import the settings module, which itself reads DATABASE_URL through the store)."""

    user_daily_limit: float
    user_monthly_limit: float
    chat_daily_limit: float
    global_daily_limit: float

# Float sums of credits drift in the last bits; a request that fits exactly must not be refused.
EPSILON = 1e-6
# Staged parts (Store.stage) are forgotten this long after they came (prune_expired).
STAGED_KEEP = 3600.0
# Running totals count whole micro-credits: integer sums are exact in any order.
MICRO = 1_000_000


class JobStatus(StrEnum):
    """Where a job is in its life."""

    RESERVED = "reserved"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNSETTLED = "unsettled"
    REFUNDED = "refunded"


class JobStage(StrEnum):
    """Where a job's work is (its money is `JobStatus`): one store transaction per step.

    queued → drawing → drawn → delivered, or failed / cancelled / undelivered. A job in an
    open stage (queued, drawing, drawn) is carried by the process that holds its lease;
    when the lease expires (the process died) another live worker takes it over.
    """

    QUEUED = "queued"
    DRAWING = "drawing"
    DRAWN = "drawn"
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNDELIVERED = "undelivered"


OPEN_STAGES = (JobStage.QUEUED.value, JobStage.DRAWING.value, JobStage.DRAWN.value)


# --- schema ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Default spend limits in credits; 0 = unlimited."""

    user_daily: float = 0
    user_monthly: float = 0
    chat_daily: float = 0
    global_daily: float = 0

    @classmethod
    def from_settings(cls, settings: LimitSettings) -> Limits:
        """Take the default limits from the settings."""
        return cls(
            user_daily=settings.user_daily_limit,
            user_monthly=settings.user_monthly_limit,
            chat_daily=settings.chat_daily_limit,
            global_daily=settings.global_daily_limit,
        )


@dataclass(frozen=True)
class JobSpec:
    """What a job asks for, as recorded in the ledger."""

    command_text: str
    model: str
    size: str
    quality: str
    n: int
    reference_count: int
    request_json: str  # the serialised ImageRequest, so a button can rebuild it after a restart
    source_ref: str | None = None  # the platform message or button press it came from
    # Room checks made in the same step as the reservation, across every process on the
    # ledger (0 = none): the user's open jobs (queued or drawing) must be fewer than
    # `max_open`, and the jobs they started in the last minute fewer than `per_minute`.
    max_open: int = 0
    per_minute: int = 0
    # BILLING=prepaid: the job is paid from the user's credit balance (checked with the
    # limits in the same atomic step; what it counts comes off the balance).
    prepaid: bool = False


@dataclass(frozen=True)
class JobRecord:
    """One row of the jobs table."""

    id: int
    user_key: str
    chat_key: str | None
    platform: str
    display_name: str
    command_text: str
    request_json: str
    model: str
    size: str
    quality: str
    n: int
    reference_count: int
    status: JobStatus
    estimated_credits: float
    actual_credits: float | None
    usage: Usage | None
    error_code: str | None
    result_refs: tuple[str, ...]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    refunded_by: str | None
    refunded_at: datetime | None
    source_ref: str | None = None  # the platform message or button press it came from
    # What the upstream's usage said, when it was above the reservation (which is all that
    # was charged): an estimator miss the operator absorbed.
    reported_credits: float | None = None
    # Why the charge is not simply the usage: 'over_estimate', or 'usage_invalid' (usage that
    # was negative, not whole, or beyond what the model can produce: charged the reservation).
    usage_flag: str | None = None
    # The work's step (see JobStage), how many draws started, and what lost draws (a worker
    # that died while drawing) were estimated at: possibly billed upstream, never charged.
    stage: JobStage = JobStage.QUEUED
    attempts: int = 0
    lost_credits: float = 0.0
    lease_owner: str | None = None
    lease_until: datetime | None = None
    delivered_at: datetime | None = None
    prepaid: bool = False
    # When /cancel (received by any process) asked whoever works on this job to stop it.
    cancel_requested_at: datetime | None = None

    @property
    def user_id(self) -> str:
        """Return the platform user id (the part of user_key after the platform)."""
        return self.user_key.split(":", 1)[1]

    @property
    def chat_id(self) -> str | None:
        """Return the platform chat id, or None for a private chat."""
        return self.chat_key.split(":", 1)[1] if self.chat_key else None

    @property
    def charged(self) -> float:
        """Return what this job counts against limits now."""
        if self.status in (JobStatus.RESERVED, JobStatus.UNSETTLED):
            return self.estimated_credits
        if self.status is JobStatus.REFUNDED:
            return 0.0
        return self.actual_credits or 0.0

    @property
    def refunded_credits(self) -> float:
        """Return what a refund gave back (0 unless refunded)."""
        if self.status is not JobStatus.REFUNDED:
            return 0.0
        # An unsettled job never got an actual cost; it was counted at its estimate.
        return self.actual_credits if self.actual_credits is not None else self.estimated_credits


@dataclass(frozen=True)
class UserRecord:
    """One row of the users table; limits None = the default."""

    user_key: str
    platform: str
    user_id: str
    display_name: str
    language: str | None
    daily_limit: float | None
    monthly_limit: float | None
    blocked: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class ChatRecord:
    """One row of the chats table; limit None = the default."""

    chat_key: str
    platform: str
    chat_id: str
    title: str
    daily_limit: float | None
    blocked: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class SpendReport:
    """A user's spend against their limits (limits 0 = unlimited, remaining None then)."""

    user_key: str
    display_name: str
    today: float
    month: float
    all_time: float
    daily_limit: float
    monthly_limit: float
    daily_remaining: float | None
    monthly_remaining: float | None
    last_jobs: tuple[JobRecord, ...]
    # The prepaid credit balance (BILLING=prepaid; None when the bot only caps spend).
    balance: float | None = None


class PurchaseStatus(StrEnum):
    """Where a bought pack of credits is."""

    PAID = "paid"
    REFUNDED = "refunded"


@dataclass(frozen=True)
class PurchaseRecord:
    """One pack of credits a user paid for (Telegram Stars: `charge_id` is the
    telegram_payment_charge_id, unique: a payment credits once)."""

    id: int
    user_key: str
    provider: str  # "telegram_stars"
    charge_id: str
    provider_charge_id: str
    pack: str  # the invoice payload, as sent
    amount: int  # in the currency's smallest unit: stars for XTR
    currency: str
    credits: float
    status: PurchaseStatus
    created_at: datetime
    refunded_at: datetime | None = None
    refunded_by: str | None = None
    refunded_credits: float | None = None  # what the refund took off the balance

    @property
    def user_id(self) -> str:
        """Return the platform user id of the buyer."""
        return self.user_key.split(":", 1)[1]


class Spender(NamedTuple):
    """One line of the top-spenders report."""

    user_key: str
    display_name: str
    credits: float
    jobs: int


class ChatTotal(NamedTuple):
    """One line of the per-chat totals report."""

    chat_key: str
    credits: float
    jobs: int


class DailyUsage(NamedTuple):
    """What one model was charged and used on one UTC day (the dashboard's daily charts).

    Tokens are the usage the upstream reported (counts it could not read count 0).
    """

    day: str  # YYYY-MM-DD, UTC, of the jobs' created_at
    model: str
    credits: float
    jobs: int
    text_input_tokens: int
    image_input_tokens: int
    image_output_tokens: int


class OutcomeCount(NamedTuple):
    """How many jobs ended (or stand) in one stage, status and error code, and their charge."""

    stage: str
    status: str
    error_code: str  # '' when the job has none
    jobs: int
    credits: float


class PurchaseTotals(NamedTuple):
    """The purchases recorded in a period (the dashboard's Purchases): refunded ones
    included in the first three, and counted again in the last three."""

    purchases: int
    stars: int  # the amount paid in Telegram Stars (currency XTR)
    credits: float  # credits the purchases granted
    refunds: int  # of those purchases, how many are refunded now
    refunded_stars: int
    refunded_credits: float  # credits the refunds took back (what was still unspent)


class PrepaidSpend(NamedTuple):
    """What prepaid jobs created in a period spent of their users' balances.

    `credits` is what the settled jobs (succeeded, or failed with a charge) took off the
    balances; `upstream_credits` is what the upstream's usage said those jobs cost (above
    the charge for an estimator miss), the operator's bill in credits; `held` is what open
    and unsettled prepaid jobs still hold at their estimate."""

    jobs: int  # settled prepaid jobs
    credits: float
    upstream_credits: float
    held: float


# --- helpers both backends share ----------------------------------------------------------


def utc_now() -> datetime:
    """Return the current time, UTC."""
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """Return `moment` in UTC; a naive datetime is taken as UTC, never as local time."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def iso(moment: datetime) -> str:
    """Return the fixed-width UTC ISO-8601 text times are stored as (they compare as text)."""
    return as_utc(moment).isoformat(timespec="microseconds")


def parse_time(value: str | None) -> datetime | None:
    """Read a stored time; None stays None."""
    return datetime.fromisoformat(value) if value else None


def day_start(now: datetime) -> datetime:
    """Return 00:00 UTC of `now`'s day."""
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def month_start(now: datetime) -> datetime:
    """Return 00:00 UTC of the 1st of `now`'s month."""
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def split_key(key: str) -> tuple[str, str]:
    """Split `platform:id`; a malformed key raises ValueError."""
    platform, sep, ident = key.partition(":")
    if not sep or not platform or not ident:
        raise ValueError(f"expected a key of the form platform:id, got {key!r}")
    return platform, ident


def username_key(platform: str, username: str) -> str:
    """Return the key a `@username` is kept under: `platform:name`, lowercased (Telegram
    and Discord names are the same name in any case)."""
    name = username.removeprefix("@").lower()
    if not platform or not name:
        raise ValueError("a username needs its platform and a name")
    return f"{platform}:{name}"


def check_credits(name: str, value: float | None, *, allow_none: bool = False) -> None:
    """Refuse a credit amount that is not a finite number >= 0."""
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{name} must be a number")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def usage_json(usage: Usage | None) -> str | None:
    """Return usage as the JSON text both backends store."""
    return json.dumps(usage.to_dict()) if usage is not None else None


def parse_usage(value: str | None) -> Usage | None:
    """Read stored usage; anything unreadable is None."""
    if not value:
        return None
    try:
        data = json.loads(value)
        return Usage(**{k: int(v) for k, v in data.items() if k in Usage.__dataclass_fields__})
    except (ValueError, TypeError, AttributeError):
        return None


def parse_refs(value: str | None) -> tuple[str, ...]:
    """Read stored result refs (a JSON list)."""
    if not value:
        return ()
    try:
        data = json.loads(value)
    except ValueError:
        return ()
    return tuple(str(ref) for ref in data) if isinstance(data, list) else ()


def is_row_id(job_id: int) -> bool:
    """Say whether `job_id` can be a job id (ids come from buttons and admin commands)."""
    return 0 < job_id < 2**63


def nearest_rank(quantile: float, count: int) -> int:
    """Return the 1-based rank of a quantile among `count` sorted values (nearest rank)."""
    if not 0 < quantile <= 1:
        raise ValueError(f"a quantile is in (0, 1], got {quantile!r}")
    # The small slack keeps 0.95 * 20 at rank 19 whatever the float rounding says.
    return min(count, max(1, math.ceil(quantile * count - 1e-9)))


def effective_limit(default: float, override: float | None) -> float:
    """Return the override when set, else the default."""
    return default if override is None else override


def remaining(limit: float, spent: float) -> float | None:
    """Return what is left under a limit; None when the limit is 0 (unlimited)."""
    return None if limit <= 0 else max(0.0, limit - spent)


def job_from_mapping(row: Any) -> JobRecord:
    """Build a JobRecord from a row that reads like a mapping of the jobs table's columns."""
    return JobRecord(
        id=int(row["id"]),
        user_key=row["user_key"],
        chat_key=row["chat_key"],
        platform=row["platform"],
        display_name=row["display_name"],
        command_text=row["command_text"],
        request_json=row["request_json"],
        model=row["model"],
        size=row["size"],
        quality=row["quality"],
        n=row["n"],
        reference_count=row["reference_count"],
        status=JobStatus(row["status"]),
        estimated_credits=row["estimated_credits"],
        actual_credits=row["actual_credits"],
        usage=parse_usage(row["usage_json"]),
        error_code=row["error_code"],
        result_refs=parse_refs(row["result_refs"]),
        created_at=datetime.fromisoformat(row["created_at"]),
        started_at=parse_time(row["started_at"]),
        finished_at=parse_time(row["finished_at"]),
        refunded_by=row["refunded_by"],
        refunded_at=parse_time(row["refunded_at"]),
        source_ref=row["source_ref"],
        reported_credits=_optional(row, "reported_credits"),
        usage_flag=_optional(row, "usage_flag"),
        stage=JobStage(_optional(row, "stage") or "queued"),
        attempts=int(_optional(row, "attempts") or 0),
        lost_credits=float(_optional(row, "lost_credits") or 0.0),
        lease_owner=_optional(row, "lease_owner"),
        lease_until=parse_time(_optional(row, "lease_until")),
        delivered_at=parse_time(_optional(row, "delivered_at")),
        prepaid=bool(_optional(row, "prepaid") or 0),
        cancel_requested_at=parse_time(_optional(row, "cancel_requested_at")),
    )


def purchase_from_mapping(row: Any) -> PurchaseRecord:
    """Build a PurchaseRecord from a purchases row."""
    return PurchaseRecord(
        id=int(row["id"]),
        user_key=row["user_key"],
        provider=row["provider"],
        charge_id=row["charge_id"],
        provider_charge_id=row["provider_charge_id"],
        pack=row["pack"],
        amount=int(row["amount"]),
        currency=row["currency"],
        credits=float(row["credits"]),
        status=PurchaseStatus(row["status"]),
        created_at=datetime.fromisoformat(row["created_at"]),
        refunded_at=parse_time(row["refunded_at"]),
        refunded_by=row["refunded_by"],
        refunded_credits=(
            float(row["refunded_credits"]) if row["refunded_credits"] is not None else None
        ),
    )


def balance_refusal(user_key: str, estimate: float, left: float) -> LimitExceeded:
    """A prepaid job the balance cannot pay for: LimitExceeded naming what is left."""
    return LimitExceeded(
        "limit.balance",
        scope="balance",
        asked=estimate,
        remaining=left,
        limit=left,
        detail=f"{user_key} asked {estimate} with a balance of {left}",
    )


def check_grant(credits: float) -> None:
    """Refuse an amount of credits to grant that is not a number above 0 (and sane)."""
    check_credits("credits", credits)
    if credits <= 0 or credits >= 1e12:
        raise ValueError(f"credits must be above 0 and below 1e12, got {credits!r}")


def purchase_refusal(purchase: PurchaseRecord | None, purchase_id: int) -> UserError:
    """Why a purchase cannot be refunded: missing, or refunded already."""
    if purchase is None:
        return UserError(
            "purchase.not_found", purchase_id=purchase_id,
            detail=f"refund of missing purchase {purchase_id}",
        )
    return UserError(
        "purchase.already_refunded", purchase_id=purchase_id,
        detail=f"purchase {purchase_id} is {purchase.status.value}",
    )


def to_micro(credits: float) -> int:
    """Return credits in whole micro-credits (how balances are kept)."""
    return int(round(credits * MICRO))


def _optional(row: Any, column: str) -> Any:
    # Columns added by a later schema: a row read before the upgrade has none.
    try:
        return row[column]
    except (KeyError, IndexError):
        return None


def user_from_mapping(row: Any) -> UserRecord:
    """Build a UserRecord from a users row."""
    return UserRecord(
        user_key=row["user_key"],
        platform=row["platform"],
        user_id=row["user_id"],
        display_name=row["display_name"],
        language=row["language"],
        daily_limit=row["daily_limit"],
        monthly_limit=row["monthly_limit"],
        blocked=bool(row["blocked"]),
        created_at=datetime.fromisoformat(row["created_at"]),
        updated_at=datetime.fromisoformat(row["updated_at"]),
    )


def chat_from_mapping(row: Any) -> ChatRecord:
    """Build a ChatRecord from a chats row."""
    return ChatRecord(
        chat_key=row["chat_key"],
        platform=row["platform"],
        chat_id=row["chat_id"],
        title=row["title"],
        daily_limit=row["daily_limit"],
        blocked=bool(row["blocked"]),
        created_at=datetime.fromisoformat(row["created_at"]),
        updated_at=datetime.fromisoformat(row["updated_at"]),
    )


@dataclass(frozen=True)
class NamedLease:
    """A role one live process holds (or a process's heartbeat): who, until when, doing what."""

    name: str
    owner: str
    until: datetime
    info: str = ""


def lease_from_mapping(row: Any) -> NamedLease:
    """Build a NamedLease from a row of named_leases."""
    return NamedLease(
        name=row["name"],
        owner=row["owner"],
        until=datetime.fromisoformat(row["until"]),
        info=row["info"] or "",
    )


@dataclass(frozen=True)
class KeptResult:
    """A drawn job's images, kept until they are delivered (see core.results)."""

    job_id: int
    images: tuple[GeneratedImage, ...]
    revised_prompt: str | None
    elapsed: float
    saved_at: datetime


def kept_result_from_rows(job_id: int, rows: Sequence[Any]) -> KeptResult | None:
    """Build a KeptResult from a result joined with its images in order (None for no rows).

    Each row has revised_prompt, elapsed, saved_at, mime, width, height and data.
    """
    if not rows:
        return None
    first = rows[0]
    return KeptResult(
        job_id=int(job_id),
        images=tuple(
            GeneratedImage(bytes(row["data"]), row["mime"], int(row["width"]), int(row["height"]))
            for row in rows
        ),
        revised_prompt=first["revised_prompt"],
        elapsed=float(first["elapsed"]),
        saved_at=datetime.fromisoformat(first["saved_at"]),
    )


def rate_refusal(per_minute: int, oldest: str, now: str) -> RateLimited:
    """The refusal for a user who started `per_minute` jobs in the last minute: try again
    when the oldest of them is a minute old."""
    age = (datetime.fromisoformat(now) - datetime.fromisoformat(oldest)).total_seconds()
    return RateLimited(per_minute=per_minute, seconds=max(1, math.ceil(60 - age)))
