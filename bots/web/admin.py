"""The operators' dashboard (`/admin`): cards, charts and tables of the ledger, and the
admin actions — for admins only.

    GET  /admin                                  the dashboard (static/admin.html)
    GET  /web/api/admin/overview?days=&chart=    cards, chart data and tables of a period
    GET  /web/api/admin/users/{user}/jobs?days=  one user's jobs (the drill-down)
    GET  /web/api/admin/jobs/{id}/images/{n}     a small JPEG of a kept result image
    POST /web/api/admin/action                   {"command", "args"}: limit, chatlimit,
                                                 refund, block, unblock (core.admin)
    GET  /web/api/admin/export?days=             the period's jobs as CSV

Who may: a page session (`bots.web.sessions`) whose requester the service calls an admin —
an `ADMINS` user signed in with a personal key or from the Telegram Mini App, or the
operator's one-time link (`web:operator`). A key is an admin's when its user is in
`ADMINS` (`imgbot keys create web:ops` with `ADMINS=web:ops` gives a dashboard-only key).
Everyone else gets 403, and nothing of the ledger.

Every call carries the session token as `Authorization: Bearer …`, never a cookie, so
another site cannot make a browser act here (no CSRF). The page itself is a static shell
with no data in it. Actions are `core.admin.run_admin`, the chats' very commands, run as the
signed-in admin: the log records who did what, and a refund keeps `refunded_by` too. All
reading is `core.dashboard`.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from bots.web.api import ApiError
from bots.web.page import HEADERS, STATIC, WebPage, _error, _json, _lang
from bots.web.texts import text
from core import dashboard
from core.admin import CHANGING_COMMANDS, run_admin
from core.errors import AccessDenied, ImgbotError
from core.pricing import format_credits
from core.service import ImageService, prompt_of
from core.store import JobRecord
from core.types import Requester

log = logging.getLogger(__name__)

MAX_ARGS = 4
MAX_ARG_CHARS = 100


class AdminPage:
    """The dashboard's routes, on the page's sessions."""

    def __init__(self, page: WebPage) -> None:
        self.page = page
        self.service: ImageService = page.service

    def routes(self) -> list[BaseRoute]:
        """Return the dashboard's routes."""
        return [
            Route("/admin", self.index, methods=["GET"]),
            Route("/web/api/admin/overview", self.overview, methods=["GET"]),
            Route("/web/api/admin/users/{user_key}/jobs", self.user_jobs, methods=["GET"]),
            Route("/web/api/admin/jobs/{job_id}/images/{index}", self.image, methods=["GET"]),
            Route("/web/api/admin/action", self.action, methods=["POST"]),
            Route("/web/api/admin/export", self.export, methods=["GET"]),
        ]

    async def index(self, request: Request) -> Response:
        html = (STATIC / "admin.html").read_bytes()
        return Response(html, media_type="text/html; charset=utf-8", headers=HEADERS)

    async def _admin(self, request: Request, lang: str) -> Requester:
        requester = await self.page.requester_of(request, lang)
        if not self.service.is_admin(requester):
            log.info("dashboard: %s is not an admin (refused %s)", requester.user_key,
                     request.url.path)
            raise _error(403, lang, "web.admin_only", "admin_only")
        return requester

    # --- reading --------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        lang = _lang(request)
        try:
            await self._admin(request, lang)
            days = _choice(request, "days", dashboard.PERIODS, 7, lang)
            chart = _choice(request, "chart", dashboard.CHART_PERIODS, 30, lang)
            seen = await dashboard.overview(self.service, days, chart)
            kept = await dashboard.kept_job_ids(self.service)
            cards = seen.cards
            settings = self.service.settings
            return JSONResponse({
                "days": seen.days,
                "since": seen.since.isoformat(),
                "chart_days": seen.chart_days,
                "cards": {
                    "spent_today": round(cards.spent_today, 2),
                    "spent_today_text": self._credits(cards.spent_today, lang),
                    "spent_month": round(cards.spent_month, 2),
                    "spent_month_text": self._credits(cards.spent_month, lang),
                    "global_daily_limit": cards.global_daily_limit,
                    "global_daily_limit_text": (self._credits(cards.global_daily_limit, lang)
                                                if cards.global_daily_limit else ""),
                    "jobs": cards.jobs, "delivered": cards.delivered, "failed": cards.failed,
                    "undelivered": cards.undelivered, "cancelled": cards.cancelled,
                    "open": cards.open, "success_rate": cards.success_rate,
                    "median_s": cards.median_s, "p95_s": cards.p95_s,
                    "balance_errors_24h": cards.balance_errors_24h,
                },
                "daily": [
                    {"day": row.day, "model": row.model, "credits": round(row.credits, 2),
                     "jobs": row.jobs, "text_in": row.text_input_tokens,
                     "image_in": row.image_input_tokens, "image_out": row.image_output_tokens}
                    for row in seen.daily
                ],
                "outcomes": [{"kind": o.kind, "code": o.code, "jobs": o.jobs}
                             for o in seen.outcomes],
                "misses": [
                    {"id": job.id, "user": job.user_key, "created_at": job.created_at.isoformat(),
                     "reserved": round(job.estimated_credits, 2),
                     "reported": (round(job.reported_credits, 2)
                                  if job.reported_credits is not None else None),
                     "flag": job.usage_flag or ""}
                    for job in seen.misses
                ],
                "top_users": [
                    {"user": row.user_key, "name": row.display_name,
                     "credits": round(row.credits, 2), "cost": self._credits(row.credits, lang),
                     "jobs": row.jobs}
                    for row in seen.top_users
                ],
                "top_chats": [
                    {"chat": row.chat_key, "credits": round(row.credits, 2),
                     "cost": self._credits(row.credits, lang), "jobs": row.jobs}
                    for row in seen.top_chats
                ],
                "open_jobs": [self._job(job, lang, kept) for job in seen.open_jobs],
                "unsettled": [self._job(job, lang, kept) for job in seen.unsettled],
                "undelivered": [self._job(job, lang, kept) for job in seen.undelivered],
                "users": [
                    {"user": u.user_key, "name": u.display_name, "daily": u.daily_limit,
                     "monthly": u.monthly_limit, "blocked": u.blocked}
                    for u in seen.users
                ],
                "chats": [
                    {"chat": c.chat_key, "title": c.title, "daily": c.daily_limit,
                     "blocked": c.blocked}
                    for c in seen.chats
                ],
                "defaults": {
                    "user_daily": settings.user_daily_limit,
                    "user_monthly": settings.user_monthly_limit,
                    "chat_daily": settings.chat_daily_limit,
                },
                # Null (the section hidden) for a limits-mode bot with no purchases.
                "purchases": self._purchases(
                    await dashboard.purchases(self.service, seen.since), lang),
            })
        except ApiError as err:
            return err.response()

    async def user_jobs(self, request: Request) -> Response:
        lang = _lang(request)
        try:
            await self._admin(request, lang)
            days = _choice(request, "days", dashboard.PERIODS, 7, lang)
            user_key = request.path_params["user_key"]
            if ":" not in user_key or len(user_key) > 200:
                raise _error(400, lang, "web.bad_request", "bad_request")
            jobs = await dashboard.user_jobs(self.service, user_key, days)
            kept = await dashboard.kept_job_ids(self.service)
            return JSONResponse({"user": user_key, "days": days,
                                 "jobs": [self._job(job, lang, kept) for job in jobs]})
        except ApiError as err:
            return err.response()

    async def image(self, request: Request) -> Response:
        lang = _lang(request)
        try:
            await self._admin(request, lang)
            raw_id, raw_index = request.path_params["job_id"], request.path_params["index"]
            if not (raw_id.isascii() and raw_id.isdigit() and len(raw_id) < 19
                    and raw_index.isascii() and raw_index.isdigit() and len(raw_index) < 3):
                raise _error(404, lang, "web.job_unknown", "not_found")
            data = await dashboard.thumbnail(self.service, int(raw_id), int(raw_index))
            if data is None:
                raise _error(404, lang, "web.job_unknown", "not_found")
            return Response(data, media_type="image/jpeg",
                            headers={"Cache-Control": "private, no-store"})
        except ApiError as err:
            return err.response()

    async def export(self, request: Request) -> Response:
        lang = _lang(request)
        try:
            requester = await self._admin(request, lang)
            days = _choice(request, "days", dashboard.PERIODS, 7, lang)
            body = await dashboard.export_csv(self.service, days)
            log.info("dashboard: %s exported %d day(s) as CSV", requester.user_key, days)
            name = f"imgbot-jobs-{datetime.now().strftime('%Y%m%d')}-{days}d.csv"
            return Response(body, media_type="text/csv; charset=utf-8", headers={
                "Content-Disposition": f'attachment; filename="{name}"',
                "Cache-Control": "private, no-store",
            })
        except ApiError as err:
            return err.response()

    # --- acting ---------------------------------------------------------------------------

    async def action(self, request: Request) -> Response:
        lang = _lang(request)
        try:
            requester = await self._admin(request, lang)
            body = await _json(request, lang)
            command, args = body.get("command"), body.get("args")
            if (command not in CHANGING_COMMANDS or not isinstance(args, list)
                    or len(args) > MAX_ARGS
                    or not all(isinstance(a, str) and 0 < len(a) <= MAX_ARG_CHARS
                               for a in args)):
                raise _error(400, lang, "web.bad_request", "bad_request")
            try:
                message = await run_admin(self.service, requester, command,
                                          [a.strip() for a in args])
            except ImgbotError as err:
                status = 403 if isinstance(err, AccessDenied) else 400
                raise ApiError(status, err.user_message(lang, text), code=err.code) from None
            except ValueError:  # a key the store cannot take (core.ids checked the shape)
                raise _error(400, lang, "web.bad_request", "bad_request") from None
            return JSONResponse({"message": message})
        except ApiError as err:
            return err.response()

    # --- shapes ---------------------------------------------------------------------------

    def _credits(self, credits: float, lang: str) -> str:
        return format_credits(credits, self.service.prices, lang)

    def _purchases(self, seen: dashboard.Purchases | None, lang: str) -> dict[str, Any] | None:
        if seen is None:
            return None
        totals, spend = seen.totals, seen.spend
        return {
            "purchases": totals.purchases, "refunds": totals.refunds,
            "stars": totals.stars, "refunded_stars": totals.refunded_stars,
            "stars_net": seen.stars_net,
            "credits": round(totals.credits, 2),
            "credits_text": self._credits(totals.credits, lang),
            "refunded_credits": round(totals.refunded_credits, 2),
            "refunded_credits_text": self._credits(totals.refunded_credits, lang),
            "credits_net_text": self._credits(seen.credits_net, lang),
            "spent_jobs": spend.jobs,
            "spent": round(spend.credits, 2),
            "spent_text": self._credits(spend.credits, lang),
            "held": round(spend.held, 2),
            "held_text": self._credits(spend.held, lang),
            "upstream_credits": round(spend.upstream_credits, 2),
            "upstream_cny": round(seen.upstream_cny, 4),
            "upstream_usd": round(seen.upstream_usd, 4),
        }

    def _job(self, job: JobRecord, lang: str, kept: set[int]) -> dict[str, Any]:
        shown = job.actual_credits if job.actual_credits is not None else job.estimated_credits
        return {
            "id": job.id,
            "user": job.user_key,
            "name": job.display_name,
            "chat": job.chat_key or "",
            "platform": job.platform,
            "created_at": job.created_at.isoformat(),
            "prompt": prompt_of(job),
            "size": job.size,
            "quality": job.quality,
            "model": job.model,
            "n": job.n,
            "status": job.status.value,
            "status_text": text(lang, f"status.{job.status.value}"),
            "stage": job.stage.value,
            "outcome": dashboard.outcome_kind(job.stage.value),
            "error": job.error_code or "",
            "credits": round(job.charged, 2),
            "cost": self._credits(shown or 0.0, lang),
            "estimated": round(job.estimated_credits, 2),
            "reported": (round(job.reported_credits, 2)
                         if job.reported_credits is not None else None),
            "flag": job.usage_flag or "",
            "refundable": dashboard.refundable(job),
            "refunded_by": job.refunded_by or "",
            "images": job.n if job.id in kept else 0,
        }


def _choice(request: Request, name: str, allowed: tuple[int, ...], default: int,
            lang: str) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or int(raw) not in allowed:
        raise _error(400, lang, "web.bad_request", "bad_request")
    return int(raw)
