"""CSV export of jobs for accounting: the same columns and text from either backend."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import Any

from core.pricing import Usage
from core.store.records import JobRecord, iso

CSV_COLUMNS = (
    "id",
    "created_at",
    "started_at",
    "finished_at",
    "status",
    "user_key",
    "chat_key",
    "platform",
    "display_name",
    "command_text",
    "model",
    "size",
    "quality",
    "n",
    "reference_count",
    "estimated_credits",
    "actual_credits",
    "charged_credits",
    "error_code",
    "text_input_tokens",
    "image_input_tokens",
    "image_output_tokens",
    "text_output_tokens",
    "total_tokens",
    "refunded_by",
    "refunded_at",
    "reported_credits",
    "usage_flag",
    # Durable jobs: where the work ended, how many draws started, and what lost draws (a
    # worker that died while drawing) were estimated at: possibly billed upstream, never
    # charged to the user — for reconciling with the upstream's bill.
    "stage",
    "attempts",
    "lost_credits",
)


def csv_text(value: str | None) -> str:
    """Return user text safe for a spreadsheet cell."""
    # Free text from users goes to admins' spreadsheets: keep it from running as a formula.
    if value and value[0] in "=+-@\t\r":
        return "'" + value
    return value or ""


def csv_row(job: JobRecord) -> tuple[Any, ...]:
    """Return one job as a CSV row in CSV_COLUMNS order."""
    usage = job.usage or Usage()
    return (
        job.id,
        iso(job.created_at),
        iso(job.started_at) if job.started_at else "",
        iso(job.finished_at) if job.finished_at else "",
        job.status.value,
        job.user_key,
        job.chat_key or "",
        job.platform,
        csv_text(job.display_name),
        csv_text(job.command_text),
        job.model,
        job.size,
        job.quality,
        job.n,
        job.reference_count,
        job.estimated_credits,
        "" if job.actual_credits is None else job.actual_credits,
        job.charged,
        job.error_code or "",
        usage.text_input_tokens if job.usage else "",
        usage.image_input_tokens if job.usage else "",
        usage.image_output_tokens if job.usage else "",
        usage.text_output_tokens if job.usage else "",
        usage.total_tokens if job.usage else "",
        job.refunded_by or "",
        iso(job.refunded_at) if job.refunded_at else "",
        "" if job.reported_credits is None else job.reported_credits,
        job.usage_flag or "",
        job.stage.value,
        job.attempts,
        job.lost_credits,
    )


def jobs_csv(jobs: Iterable[JobRecord]) -> str:
    """Return jobs as CSV text: a header, then one row each."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for job in jobs:
        writer.writerow(csv_row(job))
    return out.getvalue()
