"""Platform-free texts built from data: captions, help, the size table, balances.

Adapters render these strings as they are; all wording lives in `core.messages`.
"""

from __future__ import annotations

from unicodedata import east_asian_width

from core.messages import language_of, text
from core.pricing import PriceTable, format_credits
from core.service import CancelledJob, DrawOutcome
from core.sizes import size_table_rows
from core.store import JobRecord, SpendReport

CAPTION_LIMIT = 1024
# A cancelled job is named by its id and the start of its prompt.
SHORT_PROMPT = 40


def _amount(credits: float) -> str:
    return f"{credits:,.0f}"


def render_spend_line(spend: SpendReport, lang: str) -> str:
    """Say what the user spent today (and this month) against their limits."""
    parts = []
    if spend.daily_limit:
        parts.append(
            text(lang, "spend.today_of", spent=_amount(spend.today), limit=_amount(spend.daily_limit))
        )
    else:
        parts.append(text(lang, "spend.today", spent=_amount(spend.today)))
    if spend.monthly_limit:
        parts.append(
            text(lang, "spend.month_of", spent=_amount(spend.month), limit=_amount(spend.monthly_limit))
        )
    if spend.balance is not None:
        parts.append(text(lang, "spend.balance", balance=_amount(spend.balance)))
    return " · ".join(parts)


def render_caption(
    outcome: DrawOutcome, prices: PriceTable, *, limit: int = CAPTION_LIMIT, show_spend: bool = True
) -> str:
    """Build the caption under a result: size, quality, model, cost, spend, notices.

    `show_spend=False` (a group sees the caption) leaves out the user's own spend.
    """
    lang = outcome.lang
    req = outcome.request
    first = outcome.images[0] if outcome.images else None
    size = f"{first.width}x{first.height}" if first else req.size
    head = f"{size} · {req.quality} · {req.model}"
    if req.n > 1:
        head += f" · ×{len(outcome.images)}"
    lines = [
        head,
        text(lang, "caption.cost", cost=format_credits(outcome.credits, prices, lang)),
        render_spend_line(outcome.spend, lang) if show_spend else "",
    ]
    if outcome.reference_count:
        lines.append(text(lang, "caption.references", count=outcome.reference_count))
    lines += [n.render(lang) for n in req.notices]
    lines.append(text(lang, "caption.job", job_id=outcome.job_id, seconds=f"{outcome.elapsed:.0f}"))
    caption = "\n".join(line for line in lines if line)
    return caption if len(caption) <= limit else caption[: limit - 1] + "…"


def render_help(lang: str | None) -> str:
    """Return the help text that teaches the command language."""
    return text(language_of(lang), "help.text")


def render_sizes(lang: str | None) -> str:
    """Return the ratio × tier table as monospace-friendly text."""
    lang = language_of(lang)
    rows = size_table_rows()
    head = text(lang, "sizes.ratio")
    # Pad by display width: a CJK character takes two columns in monospace.
    pad = " " * max(1, 8 - sum(2 if east_asian_width(c) in "WF" else 1 for c in head))
    lines = [text(lang, "sizes.header"), f"{head}{pad}1K          2K          4K"]
    for ratio, sizes in rows:
        lines.append(f"{ratio:<7} " + " ".join(f"{s:<11}" for s in sizes).rstrip())
    lines.append(text(lang, "sizes.footer"))
    return "\n".join(lines)


def render_job_line(job: JobRecord, prices: PriceTable, lang: str) -> str:
    """Describe one job in a line: id, status, size, cost."""
    credits = job.actual_credits if job.actual_credits is not None else job.estimated_credits
    return text(
        lang,
        "job.line",
        job_id=job.id,
        when=job.created_at.strftime("%Y-%m-%d %H:%M"),
        status=text(lang, f"status.{job.status}"),
        size=job.size,
        quality=job.quality,
        cost=format_credits(credits or 0.0, prices, lang),
    )


def render_balance(spend: SpendReport, prices: PriceTable, lang: str | None) -> str:
    """Return a user's spend today / this month / all time, limits and last jobs."""
    lang = language_of(lang)

    def limit_text(value: float) -> str:
        return _amount(value) if value else text(lang, "balance.unlimited")

    lines = [text(lang, "balance.header")]
    if spend.balance is not None:
        lines.append(text(lang, "balance.credits", balance=_amount(spend.balance)))
    lines += [
        text(lang, "balance.today", spent=_amount(spend.today), limit=limit_text(spend.daily_limit)),
        text(
            lang, "balance.month", spent=_amount(spend.month), limit=limit_text(spend.monthly_limit)
        ),
        text(lang, "balance.all_time", spent=_amount(spend.all_time)),
    ]
    if spend.last_jobs:
        lines.append(text(lang, "balance.last_jobs"))
        lines += [render_job_line(job, prices, lang) for job in spend.last_jobs]
    return "\n".join(lines)


def short_prompt(prompt: str, limit: int = SHORT_PROMPT) -> str:
    """Return the start of a prompt, to name a job in a line."""
    prompt = " ".join(prompt.split())
    return prompt if len(prompt) <= limit else prompt[: limit - 1] + "…"


# How /cancel names a job: (drawing?, stopped by another process a moment later?) → key.
CANCEL_LINES = {
    (False, False): "cancel.line_waiting",
    (True, False): "cancel.line_running",
    (False, True): "cancel.line_waiting_later",
    (True, True): "cancel.line_running_later",
}


def render_cancelled(jobs: list[CancelledJob], lang: str | None) -> str:
    """Say which jobs /cancel stopped, or asked another process to stop (ids and short
    prompts), or that there were none."""
    lang = language_of(lang)
    if not jobs:
        return text(lang, "cancel.none")
    lines = [
        text(
            lang,
            CANCEL_LINES[job.running, job.later],
            job_id=job.job_id,
            prompt=short_prompt(job.prompt),
        )
        for job in jobs
    ]
    return text(lang, "cancel.done", count=len(jobs), jobs="\n".join(lines))
