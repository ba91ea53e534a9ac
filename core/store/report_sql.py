"""Report queries both backends run word for word, around each one's own period condition
(`created_at` between two bounds, written with that driver's placeholders)."""

from __future__ import annotations

from dataclasses import dataclass

USERS_WITH_OVERRIDES = (
    "SELECT * FROM users WHERE daily_limit IS NOT NULL OR monthly_limit IS NOT NULL"
    " OR blocked <> 0 ORDER BY user_key"
)
CHATS_WITH_OVERRIDES = (
    "SELECT * FROM chats WHERE daily_limit IS NOT NULL OR blocked <> 0 ORDER BY chat_key"
)
# Settled: succeeded, or failed with a charge; held: still reserved or unsettled.
_SETTLED = "(status = 'succeeded' OR (status = 'failed' AND charged_micro > 0))"


@dataclass(frozen=True)
class PeriodQueries:
    """The dashboard's queries over one period."""

    purchase_totals: str
    prepaid_spend: str
    drawn: str  # a FROM … WHERE clause: the jobs drawn in the period, with both times
    drawn_count: str


def period_queries(period: str) -> PeriodQueries:
    """Return the queries for a backend whose period condition is `period`."""
    drawn = (
        "FROM jobs WHERE stage IN ('drawn', 'delivered', 'undelivered')"
        f" AND started_at IS NOT NULL AND finished_at IS NOT NULL AND {period}"
    )
    return PeriodQueries(
        purchase_totals=(
            "SELECT COUNT(*) AS purchases,"  # noqa: S608 - constant text
            " COALESCE(SUM(CASE WHEN currency = 'XTR' THEN amount END), 0) AS stars,"
            " COALESCE(SUM(credits), 0) AS credits,"
            " COALESCE(SUM(CASE WHEN status = 'refunded' THEN 1 ELSE 0 END), 0) AS refunds,"
            " COALESCE(SUM(CASE WHEN status = 'refunded' AND currency = 'XTR' THEN amount END),"
            " 0) AS refunded_stars,"
            " COALESCE(SUM(refunded_credits), 0) AS refunded_credits"
            f" FROM purchases WHERE {period}"
        ),
        prepaid_spend=(
            f"SELECT COALESCE(SUM(CASE WHEN {_SETTLED} THEN 1 ELSE 0 END), 0) AS jobs,"  # noqa: S608
            f" COALESCE(SUM(CASE WHEN {_SETTLED} THEN charged ELSE 0 END), 0) AS credits,"
            f" COALESCE(SUM(CASE WHEN {_SETTLED}"
            " THEN COALESCE(reported_credits, actual_credits, 0) ELSE 0 END), 0) AS upstream,"
            " COALESCE(SUM(CASE WHEN status IN ('reserved', 'unsettled') THEN charged ELSE 0"
            " END), 0) AS held"
            f" FROM jobs WHERE prepaid <> 0 AND {period}"
        ),
        drawn=drawn,
        drawn_count=f"SELECT COUNT(*) {drawn}",  # noqa: S608 - constant text
    )
