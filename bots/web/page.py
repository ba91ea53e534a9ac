"""The page (`/`): sign-in, the prompt box with its pickers and live estimate, jobs with
progress, and the user's history — served from the package, calling nothing outside.

    GET  /                          the page (static/index.html; assets under /static/)
    POST /web/api/session           sign in with a personal key        {"key"}
    POST /web/api/session/telegram  sign in from the Telegram Mini App  {"init_data"}
    POST /web/api/session/link      the operator's one-time link        {"code"}
    DELETE /web/api/session         sign out
    GET  /web/api/me                who is signed in, their spend, the pickers' choices
    POST /web/api/estimate          read a command (and apply a picker): options + estimate
    POST /web/api/jobs              start a job (multipart: command, image…, mask)
    GET  /web/api/jobs/{handle}     its progress (queue position, elapsed, the latest preview)
                                    and result; `?seen=N`: the preview only if newer than N
    POST /web/api/jobs/{handle}/cancel   stop the user's waiting and running jobs (/cancel)
    GET  /web/api/history[/{id}]    the user's own jobs, with the results still kept

Every call but sign-in carries the session token (`bots.web.sessions`) as a Bearer header.
A job goes through the same `JobRunner` as a chat's; the page polls its state, which a
`PageReply` keeps (the API's answer is synchronous, so progress needs a handle to ask
about). With PREVIEWS on and an upstream that streams, a page job asks for previews: each
partial becomes a small JPEG the poll hands out once, as a data URL (the page's own job only;
the next result or end drops it). Results are kept in the ledger with the API's url results
(an hour, `ResultFiles`), so any replica serves them: the history lists every job from the
ledger, and offers the original of the ones still kept. Errors use the API's JSON shape,
worded in the browser's language.

Behind a round-robin proxy a poll may reach another replica than the one running the job, so
a page job is also in the ledger: its handle names the job it makes (`source_ref`
`web:page:<handle>`), and two staged parts of the group of that name say who started it
("start", before the job is reserved) and how it ended ("end": the final answer, result
included). Another replica answers a poll from those and from the job's stage (waiting,
drawing, with the seconds since it started); the previews stay with the replica drawing it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from bots.web import command as commands
from bots.web.api import WEB_ORIGIN, ApiError, BodyTooLarge, ResultFiles
from bots.web.miniapp import InitDataRefused, verify_init_data
from bots.web.sessions import (
    KEY_SESSION_TTL_S,
    LINK_SESSION_TTL_S,
    MINIAPP_SESSION_TTL_S,
    OPERATOR,
    Session,
    Sessions,
)
from bots.web.texts import text
from core.errors import ImgbotError, PromptError
from core.images import MAX_REFERENCES
from core.imaging import preview_jpeg
from core.messages import language_of
from core.pricing import format_credits
from core.reports import render_cancelled, render_spend_line
from core.runner import JobRunner
from core.service import DrawOutcome, ImageService, prompt_of
from core.store import JobRecord, JobStage
from core.store.web import KeptFileInfo
from core.types import KNOWN_MODELS, GeneratedImage, IncomingImage, Progress, Requester

log = logging.getLogger(__name__)

STATIC = resources.files("bots.web") / "static"
# A job's first answer waits this long for a refusal, so a typo is answered at once.
FIRST_ANSWER_S = 2.0
HISTORY_SIZE = 60
JOB_KEEP_S = 3600.0
MAX_PAGE_JOBS = 2000
# A preview on the page: small enough to poll as a data URL, big enough to see it form.
PREVIEW_MAX_SIDE = 640
PREVIEW_JPEG_QUALITY = 70
# A page job in the ledger: the source_ref of the job its handle makes, and the group of its
# staged "start" (the user's key) and "end" (its final answer, as JSON).
PAGE_JOB_PREFIX = "web:page:"
# A page job the ledger has ended with no final answer staged yet still reads as running for
# this long: the replica running it writes the job's failure before it stages its words.
ANSWER_GRACE_S = 10.0

# The page calls only its own server; Telegram's web client may show it in a frame.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'self' https://web.telegram.org"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _error(status: int, lang: str, key: str, code: str, **params: Any) -> ApiError:
    return ApiError(status, text(lang, key, **params), code=code)


@dataclass
class PageJob:
    """One job started from the page: what its poll answers."""

    handle: str
    user_key: str
    lang: str = "en"
    created: float = field(default_factory=time.monotonic)
    state: str = "starting"  # starting | queued | drawing | done | refused | failed
    position: int = 0
    started: float | None = None
    finished: float | None = None
    message: str = ""
    result: dict[str, Any] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # The latest preview: its 1-based number (0: none yet) and a JPEG, dropped at the end.
    preview_number: int = 0
    preview_jpeg: bytes | None = None

    @property
    def over(self) -> bool:
        return self.state in ("done", "refused", "failed")

    def as_json(self, lang: str, seen: int = 0) -> dict[str, Any]:
        """Describe the job; the preview's picture only when newer than preview `seen`."""
        now = self.finished or time.monotonic()
        status = ""
        if self.state == "queued":
            status = (text(lang, "progress.queued", position=self.position) if self.position
                      else text(lang, "web.queued"))
        elif self.state == "drawing":
            status = text(lang, "progress.started")
        return {
            "handle": self.handle,
            "state": self.state,
            "position": self.position,
            "elapsed": round(now - self.created, 1),
            "drawing_for": round(now - self.started, 1) if self.started else None,
            "status": status,
            "message": self.message,
            "result": self.result,
            "preview_number": self.preview_number,
            "preview": (
                "data:image/jpeg;base64," + base64.b64encode(self.preview_jpeg).decode()
                if self.preview_jpeg is not None and self.preview_number > seen else None
            ),
        }


class PageReply:
    """The runner's Reply for a page job: it records, the poll reads."""

    def __init__(self, job: PageJob, page: WebPage) -> None:
        self.job, self.page = job, page
        self._previews: set[asyncio.Task[None]] = set()

    def _set(self, **changes: Any) -> None:
        for name, value in changes.items():
            setattr(self.job, name, value)
        self.job.changed.set()

    def _end(self, **changes: Any) -> None:
        for task in self._previews:
            task.cancel()  # a preview still being made must not show after the end
        self._set(**changes, preview_jpeg=None, finished=time.monotonic())

    async def progress(self, event: Progress) -> None:
        if event.kind == "queued":
            self._set(state="queued", position=event.position)
        elif event.kind in ("started", "working", "partial") and self.job.state != "drawing":
            self._set(state="drawing", started=time.monotonic())
        if event.kind == "partial" and event.image is not None and not self.job.over:
            # Made in the background: the upstream's stream goes on being read meanwhile.
            task = asyncio.create_task(self._preview(event.image, event.index + 1))
            self._previews.add(task)
            task.add_done_callback(self._previews.discard)

    async def _preview(self, image: GeneratedImage, number: int) -> None:
        try:
            jpeg = await preview_jpeg(
                image.data, max_side=PREVIEW_MAX_SIDE, quality=PREVIEW_JPEG_QUALITY
            )
        except Exception:  # noqa: BLE001 - a preview is best effort; the result still comes
            log.warning("page: preview %d of a job could not be made", number, exc_info=True)
            return
        if not self.job.over and number > self.job.preview_number:  # the latest wins
            self._set(preview_number=number, preview_jpeg=jpeg)

    async def result(self, outcome: DrawOutcome, four_k_credits: float | None) -> Sequence[str]:
        result = await self.page.keep_result(self.job.user_key, outcome)
        self._end(state="done", result=result)
        await self.page.share_end(self.job)
        return []  # no platform handles: "vary" has nothing to point at

    async def refusal(self, message: str | None, error: ImgbotError | None = None) -> None:
        self._end(state="refused", message=message or "")
        await self.page.share_end(self.job)

    async def failure(self, message: str) -> None:
        self._end(state="failed", message=message)
        await self.page.share_end(self.job)


class WebPage:
    """The page's routes, bound to one service, the API's kept files and the sessions."""

    def __init__(
        self, service: ImageService, files: ResultFiles, sessions: Sessions | None = None
    ) -> None:
        self.service = service
        self.files = files
        self.sessions = sessions or Sessions(service.web_state)
        self.runner = JobRunner(service, texts=text)
        self.jobs: OrderedDict[str, PageJob] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    def routes(self) -> list[BaseRoute]:
        """Return the page's routes."""
        return [
            Route("/", self.index, methods=["GET"]),
            Mount("/static", app=StaticFiles(directory=str(STATIC)), name="static"),
            Route("/web/api/session", self.sign_in_with_key, methods=["POST"]),
            Route("/web/api/session", self.sign_out, methods=["DELETE"]),
            Route("/web/api/session/telegram", self.sign_in_from_telegram, methods=["POST"]),
            Route("/web/api/session/link", self.sign_in_with_link, methods=["POST"]),
            Route("/web/api/me", self.me, methods=["GET"]),
            Route("/web/api/estimate", self.estimate, methods=["POST"]),
            Route("/web/api/jobs", self.start_job, methods=["POST"]),
            Route("/web/api/jobs/{handle}", self.job_state, methods=["GET"]),
            Route("/web/api/jobs/{handle}/cancel", self.cancel, methods=["POST"]),
            Route("/web/api/history", self.history, methods=["GET"]),
            Route("/web/api/history/{job_id}", self.history_job, methods=["GET"]),
        ]

    async def close(self) -> None:
        """Stop the page's jobs still running (after the service drained them)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    # --- the page itself ---------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        html = (STATIC / "index.html").read_bytes()
        return Response(html, media_type="text/html; charset=utf-8", headers=HEADERS)

    # --- sign-in -----------------------------------------------------------------------

    async def sign_in_with_key(self, request: Request) -> Response:
        lang = _lang(request)
        try:
            key = str((await _json(request, lang)).get("key") or "").strip()
            if not key:
                raise _error(400, lang, "web.key_missing", "missing_key")
            user_key = await self.service.api_key_user(key)
            if user_key is None:
                raise _error(401, lang, "web.key_invalid", "invalid_api_key")
            platform, _, user_id = user_key.partition(":")
            requester = Requester(platform, user_id, display_name=user_id, language=lang)
            return await self._open(requester, "key", KEY_SESSION_TTL_S, lang, key=key)
        except ApiError as err:
            return err.response()

    async def sign_in_from_telegram(self, request: Request) -> Response:
        lang = _lang(request)
        try:
            init_data = str((await _json(request, lang)).get("init_data") or "")
            token = self.service.settings.telegram_bot_token.get_secret_value()
            if not token:
                raise _error(404, lang, "web.tg_off", "telegram_off")
            try:
                user = verify_init_data(init_data, token)
            except InitDataRefused as err:
                raise _error(401, lang, err.key, "invalid_init_data") from None
            requester = Requester("telegram", str(user.id), display_name=user.display_name,
                                  language=user.language_code)
            return await self._open(requester, "telegram", MINIAPP_SESSION_TTL_S, lang)
        except ApiError as err:
            return err.response()

    async def sign_in_with_link(self, request: Request) -> Response:
        lang = _lang(request)
        try:
            code = str((await _json(request, lang)).get("code") or "")
            if not await self.sessions.spend_link_code(code):
                raise _error(401, lang, "web.link_invalid", "invalid_link")
            return await self._open(OPERATOR, "link", LINK_SESSION_TTL_S, lang)
        except ApiError as err:
            return err.response()

    async def _open(
        self, requester: Requester, how: str, ttl: float, lang: str, key: str | None = None
    ) -> Response:
        try:
            await self.service.check_access(requester)
        except ImgbotError as err:
            raise ApiError(403, err.user_message(lang, text), type="permission_error",
                           code=err.code) from None
        token = await self.sessions.open(requester, how, ttl, key=key)
        log.info("page: %s signed in (%s)", requester.user_key, how)
        return JSONResponse({"token": token, "me": await self._me(Session(requester, how), lang)})

    async def sign_out(self, request: Request) -> Response:
        await self.sessions.close(_bearer(request))
        return JSONResponse({"ok": True})

    async def _session(self, request: Request, lang: str) -> Session:
        token = _bearer(request)
        session = await self.sessions.get(token)
        if session is None:
            raise _error(401, lang, "web.signed_out", "signed_out")
        if session.key_revoked:
            # A revoked key ends its sessions from the next call, as it does in the API.
            await self.sessions.close(token)
            raise _error(401, lang, "web.key_revoked", "signed_out")
        return session

    async def requester_of(self, request: Request, lang: str) -> Requester:
        """Return who a call's session draws as (in the page's language); raise 401."""
        return await self._requester(request, lang)

    async def _requester(self, request: Request, lang: str) -> Requester:
        session = await self._session(request, lang)
        return replace(session.requester, language=lang)  # answers in the page's language

    # --- who, what it costs ------------------------------------------------------------

    async def me(self, request: Request) -> Response:
        lang = _lang(request)
        try:
            return JSONResponse(await self._me(await self._session(request, lang), lang))
        except ApiError as err:
            return err.response()

    async def _me(self, session: Session, lang: str) -> dict[str, Any]:
        requester = session.requester
        spend = await self.service.spend_report(requester, last=0)
        settings = self.service.settings
        return {
            "user": requester.user_key,
            "name": requester.display_name or requester.user_id,
            "admin": self.service.is_admin(requester),
            "how": session.how,
            "spend": render_spend_line(spend, lang),
            "models": list(KNOWN_MODELS),
            "max_n": max(1, min(10, settings.max_n)),
            "max_references": MAX_REFERENCES,
            "defaults": {
                "model": self.service.defaults.model,
                "quality": self.service.defaults.quality,
                "n": self.service.defaults.n,
                "tier": self.service.defaults.tier,
            },
        }

    async def estimate(self, request: Request) -> Response:
        lang = _lang(request)
        try:
            await self._session(request, lang)
            body = await _json(request, lang)
            command = body.get("command")
            changes = body.get("set") or {}
            sizes = _sizes(body.get("references"))
            if not isinstance(command, str) or sizes is None or not isinstance(changes, dict):
                raise _error(400, lang, "web.bad_request", "bad_request")
            try:
                if changes:
                    command = commands.rewrite(self.service, command, changes, sizes)
                reading = commands.read(self.service, command, sizes, previews=True)
            except PromptError as err:
                raise ApiError(400, err.user_message(lang, text), code=err.code,
                               param="command") from None
            except ValueError:
                raise _error(400, lang, "web.bad_request", "bad_request") from None
            return JSONResponse({
                "command": command,
                "fields": reading.fields(),
                "prompt_missing": reading.prompt_missing,
                "estimate": round(reading.estimate, 2),
                "estimate_text": format_credits(reading.estimate, self.service.prices, lang),
                "notices": [n.render(lang) for n in reading.request.notices],
            })
        except ApiError as err:
            return err.response()

    # --- jobs --------------------------------------------------------------------------

    async def start_job(self, request: Request) -> Response:
        lang = _lang(request)
        try:
            # The page shows previews in place of the result while it is drawn.
            requester = replace(await self._requester(request, lang), previews=True)
            command, images, mask = await self._read_job_form(request, lang)
            job = PageJob(secrets.token_urlsafe(16), requester.user_key, lang)
            self._remember(job)
            await self._share_start(job)
            reply = PageReply(job, self)

            async def references() -> list[IncomingImage]:
                return images

            async def run() -> None:
                await self.runner.run(requester, command, references, reply, mask=mask,
                                      origin=WEB_ORIGIN, source_ref=PAGE_JOB_PREFIX + job.handle)

            task = asyncio.create_task(run(), name=f"page job {job.handle}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            # A refusal (a typo, a limit) comes back in this answer; a job that waits or
            # draws is followed by polling.
            try:
                await asyncio.wait_for(job.changed.wait(), FIRST_ANSWER_S)
            except TimeoutError:
                pass
            return JSONResponse(job.as_json(lang), status_code=202)
        except ApiError as err:
            return err.response()

    async def _read_job_form(
        self, request: Request, lang: str
    ) -> tuple[str, list[IncomingImage], IncomingImage | None]:
        cap = self.service.settings.web_max_body_bytes
        try:
            form = await request.form(max_files=4 * MAX_REFERENCES, max_fields=16)
        except BodyTooLarge:
            raise ApiError(413, f"Request body larger than {cap} bytes.",
                           code="request_too_large") from None
        except Exception:  # noqa: BLE001 - a malformed multipart body
            raise _error(400, lang, "web.bad_request", "bad_request") from None
        try:
            command = ""
            images: list[IncomingImage] = []
            mask: IncomingImage | None = None
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    item = IncomingImage(await value.read(), value.filename or None)
                    if name == "image":
                        images.append(item)
                    elif name == "mask" and mask is None:
                        mask = item
                    else:
                        raise _error(400, lang, "web.bad_request", "bad_request")
                elif name == "command":
                    command = value
                else:
                    raise _error(400, lang, "web.bad_request", "bad_request")
        finally:
            await form.close()
        return command, images, mask

    def _remember(self, job: PageJob) -> None:
        now = time.monotonic()
        for handle in [h for h, j in self.jobs.items()
                       if j.over and j.finished is not None and now - j.finished > JOB_KEEP_S]:
            del self.jobs[handle]
        self.jobs[job.handle] = job
        while len(self.jobs) > MAX_PAGE_JOBS:
            self.jobs.popitem(last=False)

    async def keep_result(self, user_key: str, outcome: DrawOutcome) -> dict[str, Any]:
        """Keep a finished job's images for the page (and its history); describe it."""
        lang = outcome.lang
        kept = await self.files.keep(outcome.job_id, user_key, outcome.images)
        req = outcome.request
        first = outcome.images[0] if outcome.images else None
        return {
            "job_id": outcome.job_id,
            "images": [_file_json(f) for f in kept],
            "size": f"{first.width}x{first.height}" if first else req.size,
            "quality": req.quality,
            "model": req.model,
            "n": len(outcome.images),
            "credits": round(outcome.credits, 2),
            "cost": format_credits(outcome.credits, self.service.prices, lang),
            "spend": render_spend_line(outcome.spend, lang),
            "elapsed": round(outcome.elapsed, 1),
            "references": outcome.reference_count,
            "notices": [n.render(lang) for n in req.notices],
            "revised_prompt": outcome.revised_prompt or "",
        }

    async def share_end(self, job: PageJob) -> None:
        """Put a page job's final answer in the ledger, for a poll another replica gets."""
        answer = json.dumps(job.as_json(job.lang), ensure_ascii=False)
        await self._share(job, "end", answer)

    async def _share_start(self, job: PageJob) -> None:
        await self._share(job, "start", job.user_key)

    async def _share(self, job: PageJob, part: str, payload: str) -> None:
        try:
            await self.service.coordination.stage(PAGE_JOB_PREFIX + job.handle, part, payload)
        except Exception as err:  # noqa: BLE001 - this replica still answers its own polls
            log.warning("page: the %s of a job is not in the ledger (%s): only this replica"
                        " answers its polls", part, err)

    async def job_state(self, request: Request) -> Response:
        lang = _lang(request)
        try:
            requester = await self._requester(request, lang)
            handle = request.path_params["handle"]
            job = self._local_job(handle, requester.user_key)
            if job is not None:
                raw = request.query_params.get("seen", "0")
                seen = int(raw) if raw.isdigit() and len(raw) < 3 else 0
                return JSONResponse(job.as_json(lang, seen))
            answer = await self._job_elsewhere(handle, requester.user_key, lang)
            if answer is None:
                raise _error(404, lang, "web.job_unknown", "not_found")
            return JSONResponse(answer)
        except ApiError as err:
            return err.response()

    async def cancel(self, request: Request) -> Response:
        lang = _lang(request)
        try:
            requester = await self._requester(request, lang)
            handle = request.path_params["handle"]
            if (self._local_job(handle, requester.user_key) is None
                    and await self._job_elsewhere(handle, requester.user_key, lang) is None):
                raise _error(404, lang, "web.job_unknown", "not_found")
            stopped = await self.service.cancel(requester)
            return JSONResponse({"message": render_cancelled(stopped, lang)})
        except ApiError as err:
            return err.response()

    def _local_job(self, handle: str, user_key: str) -> PageJob | None:
        """Return the user's page job this replica runs (or ran), if it is one."""
        job = self.jobs.get(handle)
        return job if job is not None and job.user_key == user_key else None

    async def _job_elsewhere(
        self, handle: str, user_key: str, lang: str
    ) -> dict[str, Any] | None:
        """Describe a page job another replica runs (or ran), from the ledger; None when
        the user started no such job. No preview: those stay with the replica drawing it."""
        group = PAGE_JOB_PREFIX + handle
        parts = {key: (at, payload)
                 for key, at, payload in await self.service.coordination.staged(group)}
        start = parts.get("start")
        if start is None or start[1] != user_key:  # another user's handle reads as unknown
            return None
        if "end" in parts:
            ended: dict[str, Any] = json.loads(parts["end"][1])
            return ended
        job = await self.service.job_by_source(group)
        if job is not None and job.user_key != user_key:
            return None
        return _as_seen_in_ledger(handle, user_key, start[0], job, lang).as_json(lang)

    # --- history -----------------------------------------------------------------------

    async def history(self, request: Request) -> Response:
        lang = _lang(request)
        try:
            requester = await self._requester(request, lang)
            report = await self.service.spend_report(requester, last=HISTORY_SIZE)
            files = await self.files.of_jobs([job.id for job in report.last_jobs],
                                             requester.user_key)
            return JSONResponse({
                "spend": render_spend_line(report, lang),
                "jobs": [self._job_json(job, files.get(job.id, []), lang)
                         for job in report.last_jobs],
            })
        except ApiError as err:
            return err.response()

    async def history_job(self, request: Request) -> Response:
        lang = _lang(request)
        try:
            requester = await self._requester(request, lang)
            raw = request.path_params["job_id"]
            job = await self.service.job(int(raw)) if raw.isdigit() and len(raw) < 19 else None
            # Another user's job reads exactly like one that does not exist.
            if job is None or job.user_key != requester.user_key:
                raise _error(404, lang, "web.job_unknown", "not_found")
            files = await self.files.of_jobs([job.id], job.user_key)
            return JSONResponse(self._job_json(job, files.get(job.id, []), lang))
        except ApiError as err:
            return err.response()

    def _job_json(
        self, job: JobRecord, files: Sequence[KeptFileInfo], lang: str
    ) -> dict[str, Any]:
        credits = job.actual_credits if job.actual_credits is not None else job.estimated_credits
        return {
            "id": job.id,
            "created_at": job.created_at.isoformat(),
            "status": job.status.value,
            "status_text": text(lang, f"status.{job.status.value}"),
            "prompt": prompt_of(job),
            "command": job.command_text,
            "size": job.size,
            "quality": job.quality,
            "model": job.model,
            "n": job.n,
            "references": job.reference_count,
            "platform": job.platform,
            "cost": format_credits(credits or 0.0, self.service.prices, lang),
            "error": job.error_code or "",
            "images": [_file_json(f) for f in files],
        }


# --- small readers ----------------------------------------------------------------------


def _lang(request: Request) -> str:
    first = request.headers.get("accept-language", "").split(",")[0].split(";")[0].strip()
    return language_of(first or None)


def _bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def _json(request: Request, lang: str) -> dict[str, Any]:
    try:  # a body over the cap raises BodyTooLarge here: the app answers it with a 413
        body = json.loads(await request.body() or b"null")
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise _error(400, lang, "web.bad_request", "bad_request")
    return body


def _sizes(raw: Any) -> list[tuple[int, int]] | None:
    """Read the references' sizes the page measured ([[w, h], …]); None if malformed."""
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > MAX_REFERENCES:
        return None
    sizes = []
    for item in raw:
        if (not isinstance(item, list) or len(item) != 2
                or not all(isinstance(v, int) and 0 < v <= 100_000 for v in item)):
            return None
        sizes.append((item[0], item[1]))
    return sizes


def _file_json(kept: KeptFileInfo) -> dict[str, Any]:
    return {"url": f"/v1/files/{kept.name}", "name": kept.name, "width": kept.width,
            "height": kept.height, "mime": kept.mime}


def _as_seen_in_ledger(
    handle: str, user_key: str, started: datetime, job: JobRecord | None, lang: str
) -> PageJob:
    """Rebuild what a poll shows of a page job from the ledger: `started` is when its
    start was staged, `job` the job it made (None: not reserved yet)."""
    now, clock = datetime.now(UTC), time.monotonic()

    def ago(moment: datetime) -> float:
        return clock - max(0.0, (now - moment).total_seconds())

    seen = PageJob(handle, user_key, lang, created=ago(started))
    if job is None:
        return seen  # starting: the replica running it has not reserved it yet
    ended = job.finished_at or job.delivered_at
    if job.stage in (JobStage.QUEUED, JobStage.DRAWING, JobStage.DRAWN) or (
        ended is not None and (now - ended).total_seconds() < ANSWER_GRACE_S
    ):
        if job.stage is JobStage.QUEUED or job.started_at is None:
            seen.state = "queued"
        else:
            seen.state, seen.started = "drawing", ago(job.started_at)
        return seen
    # Ended long enough ago with no final answer staged: the replica running it stopped
    # before it could say (web jobs are not carried on); the history has how it ended.
    seen.state = "failed"
    seen.message = text(lang, "web.job_ended_elsewhere", job_id=job.id)
    seen.finished = ago(ended or now)
    return seen
