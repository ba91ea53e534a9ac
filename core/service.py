"""The pipeline both bots and the terminal call: one command goes one way through the house.

parse → access check → rate limit → estimate → reserve → queue → draw → settle → result.

`ImageService.draw` returns a `DrawOutcome` to render, or raises a `core.errors.ImgbotError`
whose `user_message(lang)` is fit to show. It is platform-free: adapters hand it a
`Requester`, the command text and the raw bytes of reference images.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import Protocol, TypeVar

from core.config import Settings
from core.directory import UserDirectory
from core.errors import (
    AccessDenied,
    BadReferenceError,
    Cancelled,
    ImgbotError,
    JobNotFound,
    JobTakenOver,
    LimitExceeded,
    UpstreamAuthError,
    UpstreamBalanceError,
    UpstreamError,
    UserError,
)
from core.images import ImageClient, prepare_mask, prepare_references
from core.jobqueue import FairQueue, RateLimiter, Ticket
from core.messages import language_of
from core.pricing import PriceTable, estimate_credits, usage_problem
from core.prompt import PromptDefaults, clean_text, parse_command
from core.replay import ReplayAction as ReplayAction
from core.results import result_keeper
from core.sizes import TIERS
from core.store import (
    STORE_FAILURES,
    JobRecord,
    JobSpec,
    JobStage,
    NamedLease,
    PurchaseRecord,
    PurchaseStatus,
    SpendReport,
    Store,
)
from core.store.web import FileToKeep, KeptFileData, KeptFileInfo, WebSession
from core.types import (
    GeneratedImage,
    ImageRequest,
    ImageResult,
    IncomingImage,
    Progress,
    ProgressCallback,
    ReferenceImage,
    Requester,
    Usage,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")

QUALITIES = ("low", "medium", "high")
# A job is drawn at most this many times: a second lost draw stops it (released at 0).
MAX_DRAW_ATTEMPTS = 2
# How often a job with a slot here asks again for room among all processes (try_start).
START_RETRY = 0.5
# How often `take_over` forgets what expired: marks, old staged parts, page sessions and
# kept files (their reads check expiry themselves; this only frees the rows).
PRUNE_EVERY = 300.0
# One alert of a kind to the admins' chats per this many seconds (the log gets each).
ALERT_EVERY = 600.0
# How often a process working on jobs asks the ledger whether a /cancel received by another
# process asked it to stop one (a cheap read by primary key, only while it holds jobs).
CANCEL_CHECK = 1.0


@dataclass(frozen=True)
class DrawOutcome:
    """Everything an adapter needs to render a finished job."""

    job_id: int
    request: ImageRequest
    images: tuple[GeneratedImage, ...]
    credits: float
    estimated: float
    spend: SpendReport
    elapsed: float
    lang: str
    revised_prompt: str | None = None
    reference_count: int = 0
    # The job's command as the store keeps it (what a replay parses), so the runner can
    # price the 4K button without reading the job back ("" = not at hand: it reads it).
    command_text: str = ""


@dataclass(frozen=True)
class NewApiKey:
    """A personal API key just made: its text exists only here (the store keeps a hash)."""

    id: int
    key: str
    base_url: str  # where to point an OpenAI client (WEB_PUBLIC_URL or the local address)


@dataclass(frozen=True)
class CancelledJob:
    """A job /cancel stopped: waiting ones never ran; a running one is settled later.

    `later`: another process works on it; it was asked through the ledger and stops there
    by the same rules within about CANCEL_CHECK seconds (or, if that process stopped or died,
    when another takes it over).
    """

    job_id: int
    prompt: str
    running: bool = False
    later: bool = False


@dataclass
class _Inflight:
    task: asyncio.Task[object] | None
    job_id: int
    requester: Requester
    prompt: str = ""
    estimate: float = 0.0  # what was reserved: the most it may be charged
    drawing: bool = False
    # Set by /cancel while drawing: the job stops waiting for the upstream call, which
    # finishes in the background and is settled at what the upstream reports.
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    # Settled already, or its settlement handed to a background task: leave it alone.
    settled: bool = False
    # A job a later process can carry on (its front end resumes jobs): a shutdown stops
    # it (`stop`) and leaves it to the next start instead of failing it.
    resumable: bool = False
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    extras: dict[str, object] = field(default_factory=dict)




class Coordination(Protocol):
    """What front ends may use of the store to work as replicas: marks (a thing done
    once), staged parts (an album's items) and named leases (a role one process holds).
    Nothing here touches money or jobs."""

    async def mark_once(self, key: str, seconds: float) -> bool: ...
    async def is_marked(self, key: str) -> bool: ...
    async def stage(self, group: str, key: str, payload: str) -> None: ...
    async def staged(self, group: str) -> list[tuple[str, datetime, str]]: ...
    async def unstage(self, group: str, key: str | None = None) -> None: ...
    async def hold_lease(self, name: str, owner: str, seconds: float, info: str = "") -> bool: ...
    async def drop_lease(self, name: str, owner: str) -> None: ...
    async def leases(self, prefix: str = "") -> list[NamedLease]: ...


class WebState(Protocol):
    """What the web door keeps in the store so that every replica answers alike: page
    sessions, one-time sign-in codes and kept result files (core/store/web.py). Nothing
    here touches money or jobs."""

    async def open_session(
        self,
        user_key: str,
        how: str,
        seconds: float,
        *,
        display_name: str = "",
        language: str | None = None,
        api_key: str | None = None,
    ) -> str: ...
    async def get_session(self, token: str) -> WebSession | None: ...
    async def close_session(self, token: str) -> None: ...
    async def new_link_code(self, seconds: float) -> str: ...
    async def spend_link_code(self, code: str) -> bool: ...
    async def keep_files(
        self,
        job_id: int,
        user_key: str,
        files: Sequence[FileToKeep],
        seconds: float,
        cap_bytes: int,
    ) -> None: ...
    async def kept_file(self, name: str) -> KeptFileData | None: ...
    async def job_files(
        self, job_ids: Sequence[int], user_key: str
    ) -> dict[int, list[KeptFileInfo]]: ...


class ImageService:
    """The platform-free pipeline, with its queue, rate limiter and shutdown."""

    def __init__(
        self,
        settings: Settings,
        ledger: Store,
        client: ImageClient,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.client = client
        self.prices = PriceTable.from_settings(settings)
        self.defaults = PromptDefaults.from_settings(settings)
        self.queue = FairQueue(
            settings.max_jobs_in_flight, settings.max_jobs_per_user, settings.max_queued_per_user
        )
        self.rate = RateLimiter(settings.rate_limit_per_minute, clock=clock)
        self._clock = clock
        self._inflight: dict[int, _Inflight] = {}
        # Upstream calls of cancelled running jobs, finishing so they can be settled.
        self._settling: set[asyncio.Task[None]] = set()
        self._closing = False
        self._shutdown: asyncio.Future[None] | None = None
        # Usernames seen in chats, for admin commands naming `@user`: kept in the ledger,
        # so every replica (and the next start) knows them.
        self.directory = UserDirectory(ledger)
        # False from a failed ledger write (disk full, read-only file, database gone) until
        # the next write or `check_store` succeeds; the heartbeat reports it to health.
        self.store_healthy = True
        self.store_problem = ""
        # Set when store_healthy flips, so the heartbeat says so at once.
        self.health_changed = asyncio.Event()
        # Durable jobs: this process's name on the leases it holds, the open jobs it holds
        # them on (reserved here or taken over, until they end), where results are kept,
        # and how each front end carries on a job another process left (see `take_over`).
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.held: set[int] = set()
        # When each held job's lease was last known renewed (time.monotonic(), taken before
        # the write was sent): `still_mine` needs no round trip within half a lease of it.
        self._renewed: dict[int, float] = {}
        self.results = result_keeper(settings.keep_results, ledger, settings.data_path / "results")
        self.resumers: dict[str, Callable[[JobRecord], None]] = {}
        # Platforms whose front end ran here: their jobs can be carried on by any process
        # running it (the next start, or another replica), even after ours stopped.
        self._resumable: set[str] = set()
        # Replicas: how many `imgbot run` processes share this ledger (from their heartbeats,
        # this one included), who wants to know when that changes (a flood limiter sharing
        # Telegram's budget), and the roles this process plays (for doctor).
        self.replicas = 1
        self.replica_listeners: list[Callable[[int], None]] = []
        self.roles: set[str] = set()
        # Who hears about trouble besides the log (front ends add a way to message admins).
        self.alert_senders: list[Callable[[str], Awaitable[None]]] = []
        self._alerted: dict[str, float] = {}
        self.alert_every = ALERT_EVERY
        self._alerting: set[asyncio.Task[None]] = set()
        self._upstream_failures = 0  # image calls failed in a row (the upstream's fault)
        self._budget_told: set[str] = set()  # the global budget alerts raised (kind:day)
        # Prepaid credits: users given their welcome grant (the store keeps it once ever;
        # this only spares the write), and how each payment provider refunds a purchase
        # (the Telegram front end adds "telegram_stars": refundStarPayment).
        self._welcomed: set[str] = set()
        self.payment_refunders: dict[str, Callable[[PurchaseRecord], Awaitable[None]]] = {}

    @property
    def coordination(self) -> Coordination:
        """The store's replica coordination (marks, staged parts, named leases) for front
        ends; the ledger's money and jobs stay behind the service."""
        return self.ledger

    @property
    def web_state(self) -> WebState:
        """The web door's sessions, sign-in codes and kept files in the store, which every
        replica shares; the ledger's money and jobs stay behind the service."""
        return self.ledger

    # --- the store's health --------------------------------------------------------
    async def _write(self, call: Awaitable[_T]) -> _T:
        """Await one ledger write, and record whether the store took it."""
        try:
            result = await call
        except ImgbotError:
            self._store_ok()  # a refusal the store made on purpose (limits, duplicate)
            raise
        except Exception as err:
            self._store_failed(err)
            raise
        self._store_ok()
        return result

    def _store_ok(self) -> None:
        if not self.store_healthy:
            log.warning("the ledger takes writes again (%s)", self.ledger.describe())
            self.health_changed.set()
        self.store_healthy, self.store_problem = True, ""

    def _store_failed(self, err: Exception) -> None:
        problem = f"{type(err).__name__}: {err}"[:200]
        if self.store_healthy:
            log.error("the ledger cannot be written (%s): %s", self.ledger.describe(), problem)
            self.health_changed.set()
            self.alert_soon(
                "store",
                f"the ledger ({self.ledger.describe()}) cannot be written: {problem}. New jobs"
                " are refused until it can. Check the disk space and file permissions (SQLite)"
                " or that the database server is up and writable (PostgreSQL).",
            )
        self.store_healthy, self.store_problem = False, problem

    async def check_store(self) -> bool:
        """Probe whether the ledger takes writes, update `store_healthy`, and return it.

        For the heartbeat: with no job coming, nothing else would notice the store is back.
        """
        try:
            await self._write(self.ledger.check_writable())
        except Exception:  # noqa: BLE001 - recorded in store_problem; health reports it
            pass
        return self.store_healthy

    # --- access --------------------------------------------------------------------
    def is_admin(self, requester: Requester) -> bool:
        """Say whether the requester may use admin commands."""
        return requester.is_admin or self.settings.is_admin(requester.platform, requester.user_id)

    async def check_access(self, requester: Requester) -> None:
        """Raise AccessDenied unless the requester may draw here."""
        if self.is_admin(requester):
            return
        s = self.settings
        silent = requester.is_group and s.silent_refusals_in_groups
        if s.allowed_users and requester.user_key not in s.allowed_users:
            chat_ok = requester.chat_key is not None and requester.chat_key in s.allowed_chats
            if not chat_ok:
                raise AccessDenied("access.not_allowed", silent=silent)
        if s.allowed_chats and requester.user_key not in s.allowed_users:
            # A private chat is not on the chat list either: only listed users draw there.
            if requester.chat_key is None:
                raise AccessDenied("access.not_allowed", silent=silent)
            if requester.chat_key not in s.allowed_chats:
                raise AccessDenied("access.chat_not_allowed", silent=silent)
        if await self.ledger.is_blocked(requester.user_key, requester.chat_key):
            raise AccessDenied("access.blocked", silent=silent)

    def require_admin(self, requester: Requester) -> None:
        """Raise AccessDenied unless the requester is an admin."""
        if not self.is_admin(requester):
            raise AccessDenied("access.admin_only")

    # --- the pipeline --------------------------------------------------------------
    def parse(
        self,
        text: str,
        *,
        reference_sizes: Sequence[tuple[int, int]] = (),
        force_tier: str | None = None,
        previews: bool = False,
    ) -> tuple[ImageRequest, float]:
        """Parse a command and estimate its cost, calling nothing.

        `previews`: the front end shows them, so they are asked for where they can be
        (and their tokens estimated).
        """
        request = parse_command(
            text,
            self.defaults,
            reference_size=reference_sizes[0] if reference_sizes else None,
            has_references=bool(reference_sizes),
            force_tier=force_tier,
        )
        if previews:
            request = request.with_changes(partial_images=self.client.partials_for(request))
        estimate = estimate_credits(request, self.prices, reference_sizes=reference_sizes)
        return request, estimate

    async def estimate(
        self, text: str, references: Sequence[IncomingImage] = ()
    ) -> tuple[ImageRequest, float]:
        """Parse a command with its references and estimate its cost, calling nothing."""
        refs = await prepare_references(
            [(r.data, r.filename) for r in references],
            max_bytes=self.settings.max_reference_bytes,
        )
        return self.parse(clean_text(text), reference_sizes=[(r.width, r.height) for r in refs])

    async def draw(
        self,
        requester: Requester,
        text: str,
        references: Sequence[IncomingImage] = (),
        progress: ProgressCallback | None = None,
        *,
        force_tier: str | None = None,
        source_ref: str | None = None,
        origin: Mapping[str, str] | None = None,
        mask: IncomingImage | None = None,
    ) -> DrawOutcome:
        """Run one /img command end to end and return what to show.

        `mask` (an edit's, from the web API) applies to the first reference.

        `source_ref` names the platform message (or button press) the command came from;
        the ledger refuses a second job from the same one (`DuplicateJob`, silent).
        `origin` is what the adapter needs to reach the user later (a Discord channel id),
        kept in the job's request for the notice after a crash.
        """
        lang = language_of(requester.language)
        if self._closing and not self.can_resume(origin):
            raise Cancelled("job.shutting_down")
        # A chat job arriving while this process stops (a rolling restart: the proxy still
        # sends it updates) is reserved all the same and left queued for another process,
        # which carries it on; refusing it would lose it, its update being handled.
        # Platform JSON may carry lone surrogates or control characters; SQLite and the API
        # take neither, so the ledger stores (and a replay parses) the cleaned text.
        text = clean_text(text)
        requester = replace(requester, display_name=clean_text(requester.display_name))
        await self.check_access(requester)
        # Parse before counting the request, so a typo does not use up the user's minute.
        refs = await prepare_references(
            [(r.data, r.filename) for r in references],
            max_bytes=self.settings.max_reference_bytes,
        )
        mask_ref = await self._mask(mask, refs)
        request, estimate = self.parse(
            text,
            reference_sizes=[(r.width, r.height) for r in refs],
            force_tier=force_tier,
            previews=requester.previews and progress is not None,
        )
        self.rate.hit(requester.user_key)
        if self._closing:
            if not self.can_resume(origin):
                raise Cancelled("job.shutting_down")
            # Kept queued and unleased: another process (or the next start) claims it once
            # it is a lease old, and carries it on.
            job_id = await self._reserve(
                requester, text, request, refs, estimate, references, source_ref, origin
            )
            raise Cancelled("job.resumes_after_restart", job_id=job_id)
        # The room check and the place in the queue in one step, before the reservation's
        # await: checked first and queued after, requests arriving together all got in.
        ticket = self.queue.admit(requester.user_key)
        reserving = time.monotonic()
        try:
            job_id = await self._reserve(
                requester, text, request, refs, estimate, references, source_ref, origin
            )
        except BaseException:
            self.queue.withdraw(ticket)
            raise
        ticket.job_id = job_id
        self.held.add(job_id)
        self._renewed[job_id] = reserving  # a new job counts from its creation (see claims)
        return await self._run(
            requester, request, refs, estimate, job_id, ticket, progress, lang, mask_ref,
            resumable=self.can_resume(origin), command_text=text,
        )

    def add_resumer(self, platform: str, resume: Callable[[JobRecord], None]) -> None:
        """A front end carries on its platform's jobs that dead processes left."""
        self.resumers[platform] = resume
        self._resumable.add(platform)

    def drop_resumer(self, platform: str) -> None:
        """The front end is stopping: it takes no more jobs over. Its platform's jobs stay
        resumable: one arriving now (its update was already in the queue) is kept for the
        next process that runs the platform."""
        self.resumers.pop(platform, None)

    def can_resume(self, origin: Mapping[str, str] | None) -> bool:
        """Say whether a job from `origin` can be carried on by a later process (its front
        end ran here and registered a resumer); the web API's and the terminal's cannot."""
        return bool(origin) and str((origin or {}).get("via", "")) in self._resumable

    async def _reserve(
        self,
        requester: Requester,
        text: str,
        request: ImageRequest,
        refs: Sequence[ReferenceImage],
        estimate: float,
        references: Sequence[IncomingImage],
        source_ref: str | None,
        origin: Mapping[str, str] | None,
    ) -> int:
        spec = JobSpec(
            command_text=text,
            model=request.model,
            size=request.size,
            quality=request.quality,
            n=request.n,
            reference_count=len(refs),
            request_json=json.dumps(
                {
                    "request": _request_dict(request),
                    "reference_refs": [r.ref for r in references],
                    **({"origin": dict(origin)} if origin else {}),
                },
                ensure_ascii=False,
            ),
            source_ref=source_ref,
            # The same room checks as this process's queue and rate limiter, made by the
            # store with the reservation: they hold across every process on the ledger.
            max_open=self.settings.max_queued_per_user + self.settings.max_jobs_per_user,
            per_minute=self.settings.rate_limit_per_minute,
            prepaid=self.settings.prepaid,
        )
        if self.settings.prepaid:
            await self.welcome(requester.user_key)
        try:
            job_id = await self._write(self.ledger.reserve(requester, spec, estimate))
        except LimitExceeded as err:
            if err.params.get("scope") == "global_daily":
                await self._check_global_spend()
            raise self._with_suggestion(err, request, refs) from None
        await self._check_global_spend()
        return job_id

    async def _run(
        self,
        requester: Requester,
        request: ImageRequest,
        refs: Sequence[ReferenceImage],
        estimate: float,
        job_id: int,
        ticket: Ticket,
        progress: ProgressCallback | None,
        lang: str,
        mask_ref: ReferenceImage | None = None,
        *,
        resumable: bool = False,
        command_text: str = "",
    ) -> DrawOutcome:
        record = _Inflight(
            task=asyncio.current_task(),
            job_id=job_id,
            requester=requester,
            prompt=request.prompt,
            estimate=estimate,
            resumable=resumable,
        )
        self._inflight[job_id] = record
        started = self._clock()
        try:
            async def on_position(pos: int) -> None:
                if progress is not None:
                    await progress(Progress("queued", position=pos))

            try:
                if self._closing:  # shut down while reserving: the drain did not see it
                    self.queue.withdraw(ticket)
                    raise Cancelled("job.shutting_down")
                await self.queue.acquire(ticket, on_position)
            except Cancelled as err:
                record.settled = True  # the handlers below must not settle it again
                if err.key == "job.shutting_down" and resumable:
                    # Stays queued in the store: the next start carries it on.
                    raise Cancelled("job.resumes_after_restart", job_id=job_id) from None
                await self._write(self.ledger.fail(job_id, err.code))
                self.held.discard(job_id)
                raise
            try:
                await self._start_in_room(record)
                record.drawing = True
                if progress is not None:
                    await progress(Progress("started"))
                result = await self._draw_with_ticker(
                    request, refs, progress, record, ticket, mask_ref
                )
            finally:
                if not record.settled:
                    self.queue.release(ticket)
        except JobTakenOver:
            record.settled = True  # another process has it: nothing is written from here
            raise
        except Cancelled as err:
            if err.key == "job.resumes_after_restart":
                pass  # left open and leased: the next start takes it over
            elif not record.settled:  # else the background settlement owns the job
                await self._write(self.ledger.fail(job_id, "cancelled"))
                self.held.discard(job_id)
            raise
        except UpstreamError as err:
            self._note_upstream(err)
            credits, flag = self.charge_for(err.usage, request, estimate, billed=err.billed)
            await self._until_written(
                job_id, "the failure",
                partial(self.ledger.fail, job_id, err.code, credits, err.usage, flag=flag),
            )
            self.held.discard(job_id)
            charged = min(credits, estimate)
            self._log_job(requester, request, "failed", charged, self._clock() - started, err.code)
            raise
        except asyncio.CancelledError:
            # Shut down mid-job: if the call was in flight the upstream may have billed,
            # so the job stays counted at its estimate until an admin looks at it.
            if record.settled or record.resumable:
                pass  # its background settlement decides, or the next start carries it on
            elif record.drawing:
                await asyncio.shield(self._write(self.ledger.mark_unsettled(job_id)))
                self.held.discard(job_id)
            else:
                await asyncio.shield(self._write(self.ledger.fail(job_id, "cancelled")))
                self.held.discard(job_id)
            raise
        except ImgbotError as err:
            await self._until_written(
                job_id, "the failure", partial(self.ledger.fail, job_id, err.code)
            )
            self.held.discard(job_id)
            raise
        except Exception:
            await self._until_written(
                job_id, "the failure", partial(self.ledger.fail, job_id, "internal")
            )
            self.held.discard(job_id)
            raise
        finally:
            self._inflight.pop(job_id, None)

        self._note_upstream(None)
        # Another process may have taken the job over while this draw ran (its lease ran
        # out here): that one draws it again and has counted this draw as lost; this result
        # is not charged, kept or delivered.
        await self._fence(job_id)
        reported, flag = self.charge_for(result.usage, request, estimate, billed=True)
        # The result is kept before the charge is written (which moves the job to
        # `drawn`), so a process that dies from here on leaves a drawn job whose result the
        # next one delivers. (Writing both at once was faster, but a kill between the
        # commit and the manifest left a drawn job with nothing to deliver.)
        save = partial(self.results.save, job_id, result.images,
                       revised_prompt=result.revised_prompt, elapsed=result.elapsed)
        if self.results.in_ledger:
            await self._until_written(job_id, "the result", save)
        else:
            try:
                await save()
            except OSError as err:
                log.warning("job %d: result not kept on disk (%s); delivering it from memory",
                            job_id, err)
        await self._until_written(
            job_id, "the charge",
            partial(self.ledger.settle, job_id, reported, result.usage, flag=flag),
        )
        # The spend report is a read after the settle committed: it counts this job.
        spending = asyncio.ensure_future(self.spend_report(requester))
        spending.add_done_callback(_retrieved)
        try:
            credits = min(reported, estimate)  # never above the reservation (the store agrees)
            elapsed = self._clock() - started
            self._log_job(requester, request, "succeeded", credits, elapsed, "")
            if progress is not None:
                await progress(Progress("done", elapsed=elapsed))
            spend = await spending
        finally:
            spending.cancel()  # only if this job ends otherwise; a done future ignores it
        return DrawOutcome(
            job_id=job_id,
            request=request,
            images=result.images,
            credits=credits,
            estimated=estimate,
            spend=spend,
            elapsed=elapsed,
            lang=lang,
            revised_prompt=result.revised_prompt,
            reference_count=len(refs),
            command_text=command_text,
        )

    async def _draw_with_ticker(
        self,
        request: ImageRequest,
        refs: Sequence[ReferenceImage],
        progress: ProgressCallback | None,
        record: _Inflight,
        ticket: Ticket,
        mask: ReferenceImage | None = None,
    ) -> ImageResult:
        start = self._clock()
        with_mask: dict[str, object] = {"mask": mask} if mask is not None else {}
        if request.partial_images and progress is not None:

            async def on_partial(image: GeneratedImage, index: int) -> None:
                await progress(
                    Progress(
                        "partial", elapsed=self._clock() - start, image=image, index=index,
                        job_id=record.job_id,
                    )
                )

            with_mask["on_partial"] = on_partial
        call = asyncio.ensure_future(self.client.draw(request, refs, **with_mask))
        cancelled = asyncio.ensure_future(record.cancel.wait())
        stopped = asyncio.ensure_future(record.stop.wait())
        try:
            while True:
                done, _ = await asyncio.wait(
                    {call, cancelled, stopped},
                    timeout=self.settings.progress_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if call in done:
                    return call.result()
                if stopped in done:
                    # Shut down past the grace: the call is dropped (it may have billed:
                    # the next start records that) and the job drawn again after it.
                    raise Cancelled("job.resumes_after_restart", job_id=record.job_id)
                if cancelled in done:
                    # The call may already have been billed: let it finish, settle it at what
                    # the upstream reports, and tell the user now.
                    self._settle_cancelled_later(record, request, call, ticket)
                    raise Cancelled("job.cancelled_running", job_id=record.job_id)
                if progress is not None:
                    await progress(Progress("working", elapsed=self._clock() - start))
        finally:
            cancelled.cancel()
            stopped.cancel()
            if not call.done() and not record.settled:
                call.cancel()
                try:
                    await call
                except BaseException:  # noqa: BLE001 - the call's own outcome no longer matters
                    pass

    async def _mask(
        self, mask: IncomingImage | None, refs: Sequence[ReferenceImage]
    ) -> ReferenceImage | None:
        if mask is None:
            return None
        if not refs:
            raise BadReferenceError("ref.mask_without_image")
        return await prepare_mask(
            mask.data, mask.filename, refs[0], max_bytes=self.settings.max_reference_bytes
        )

    def charge_for(
        self, usage: Usage | None, request: ImageRequest, estimate: float, *, billed: bool
    ) -> tuple[float, str | None]:
        """What an answer costs, and why when that is not simply its usage.

        Plausible usage: its credits (the store charges at most the reservation and keeps
        what was above it as an estimator miss). Usage that is not whole numbers >= 0, or
        beyond what the model can produce: the reservation, flagged 'usage_invalid'. No
        usage: the reservation, flagged 'usage_missing', when the upstream billed (a
        result); nothing when it did not say (a failure).
        """
        if usage is None:
            return (estimate, "usage_missing") if billed else (0.0, None)
        problem = usage_problem(usage, request.model, request.n)
        if problem is None:
            credits = self.prices.credits(usage, request.model)
            if math.isfinite(credits) and credits >= 0:
                return credits, None
            problem = "its credits are not a finite number"
        log.warning(
            "unusable usage from the image API (%s): charged the reservation, flagged", problem
        )
        return estimate, "usage_invalid"

    def _settle_cancelled_later(
        self, record: _Inflight, request: ImageRequest, call: asyncio.Future[ImageResult],
        ticket: Ticket,
    ) -> None:
        record.settled = True

        async def settle() -> None:
            try:
                try:
                    result = await call
                    usage, billed = result.usage, False
                except UpstreamError as err:
                    usage, billed = err.usage, err.billed
                except asyncio.CancelledError:
                    # Shut down before the call ended: it may have billed, an admin decides.
                    await asyncio.shield(
                        self._write(self.ledger.mark_unsettled(record.job_id))
                    )
                    raise
                except Exception:  # noqa: BLE001 - any other end is an unbilled failure
                    usage, billed = None, False
                credits, flag = self.charge_for(usage, request, record.estimate, billed=billed)
                await self._write(
                    self.ledger.fail(record.job_id, "cancelled", credits, usage, flag=flag)
                )
                charged = min(credits, record.estimate)
                self._log_job(record.requester, request, "cancelled", charged, 0.0, "cancelled")
            finally:
                self.queue.release(ticket)
                self.held.discard(record.job_id)

        task = asyncio.ensure_future(settle())
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    def _with_suggestion(
        self, err: LimitExceeded, request: ImageRequest, refs: Sequence[ReferenceImage]
    ) -> LimitExceeded:
        remaining = float(err.params.get("remaining", 0))
        suggestion = self.cheaper_option(request, remaining, refs)
        params = {**err.params, "suggestion": suggestion or ""}
        return LimitExceeded(err.key, detail=err.detail, **params)

    def cheaper_option(
        self, request: ImageRequest, budget: float, refs: Sequence[ReferenceImage] = ()
    ) -> str | None:
        """Return the option words of the nearest cheaper request that fits the budget.

        Nearest means: keep the count, then the tier, then the quality as long as possible.
        """
        if budget <= 0:
            return None
        sizes = [(r.width, r.height) for r in refs]
        tier_now = request.tier if request.tier in TIERS else self.defaults.tier
        tiers = TIERS[: TIERS.index(tier_now) + 1][::-1]
        top = QUALITIES.index(request.quality) if request.quality in QUALITIES else 2
        qualities = QUALITIES[: top + 1][::-1]
        ratio = request.ratio if request.ratio and request.ratio != "auto" else None
        for n in range(request.n, 0, -1):
            for tier in tiers:
                for quality in qualities:
                    words = [w for w in (ratio, tier, quality, f"x{n}" if n > 1 else None) if w]
                    try:
                        _, cost = self.parse(
                            " ".join([*words, request.model, "--", request.prompt]),
                            reference_sizes=sizes,
                            previews=request.partial_images > 0,
                        )
                    except ImgbotError:
                        continue
                    if cost <= budget:
                        return " ".join(words)
        return None

    async def _start_in_room(self, record: _Inflight) -> None:
        """Start drawing once there is room across every process on the ledger.

        This process's queue gave the job a slot; the store checks the same caps
        (MAX_JOBS_PER_USER, MAX_JOBS_IN_FLIGHT) against every process's drawing jobs in the
        statement that starts it. Without room the job waits here, still queued.
        """
        settings = self.settings
        while True:
            if record.cancel.is_set():  # cancelled between its slot and its call
                raise Cancelled("job.cancelled")
            if record.stop.is_set():
                raise Cancelled("job.resumes_after_restart", job_id=record.job_id)
            await self._fence(record.job_id)
            # Always counted in the store, even when this process believes it is alone: a
            # replica that has just started has not yet seen the others' heartbeats.
            started = await self._write(
                self.ledger.try_start(
                    record.job_id, settings.max_jobs_per_user, settings.max_jobs_in_flight
                )
            )
            if started is None:  # no longer reserved (refunded or ended by an admin)
                raise Cancelled("job.cancelled")
            if started:
                return
            waits = [asyncio.ensure_future(e.wait()) for e in (record.cancel, record.stop)]
            try:
                await asyncio.wait(waits, timeout=START_RETRY)
            finally:
                for wait in waits:
                    wait.cancel()

    async def still_mine(self, job_id: int) -> bool:
        """Renew this process's lease on a job and say whether it still holds it.

        A process too slow to renew (stalled longer than JOB_LEASE) may find its job taken
        over by another one; each step with effects outside this process (starting the draw,
        charging, delivering) checks first, and the renewal keeps the job ours until the
        step is done. A job no longer held is let go of here.
        """
        lease = self.settings.job_lease
        asked = time.monotonic()
        if asked - self._renewed.get(job_id, -math.inf) < lease / 2:
            # Renewed (or reserved, or claimed) less than half a lease ago: nobody can take
            # it before the lease ends, so no round trip (the renewal loop keeps it so).
            return True
        held = await self._until_written(
            job_id, "the lease",
            partial(self.ledger.renew_leases, self.owner, [job_id], lease),
        )
        if job_id in held:
            self._renewed[job_id] = asked
            return True
        log.warning("job %d was taken over by another process; letting go of it here", job_id)
        self.held.discard(job_id)
        return False

    async def _fence(self, job_id: int) -> None:
        """Raise a silent JobTakenOver unless the job is still this process's."""
        if not await self.still_mine(job_id):
            raise JobTakenOver(job_id=job_id, silent=True)

    async def _until_written(
        self, job_id: int, what: str, write: Callable[[], Awaitable[_T]]
    ) -> _T:
        """Write a job's step (its lease check, its charge, its failure), trying again
        while the store cannot take it.

        Giving up would leave the job `drawing` and leased here for good, and throw a drawn
        result away because the ledger is full or read-only. Settle and fail act once, so a
        write that did commit before its error is not charged again by the next try. Only
        the store's failures are retried; a bug raises at once.
        """
        delay = 0.5
        while True:
            try:
                return await self._write(write())
            except STORE_FAILURES as err:
                log.warning("job %d: %s could not be written (%s); trying again in %.1fs",
                            job_id, what, err, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    # --- durable jobs: leases, takeovers, kept results ---------------------------------
    async def keep_leases(self) -> None:
        """Renew the leases of the jobs this process holds, and stop those a /cancel on
        another process asked to stop, until cancelled.

        Renewed every third of JOB_LEASE; a job another worker took over meanwhile (this
        process could not renew for a whole lease) is dropped from `held`. Cancel requests
        are read every CANCEL_CHECK seconds (or as often as the renewals, if that is more).
        """
        every = max(0.2, self.settings.job_lease / 3)
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(min(every, CANCEL_CHECK))
            ids = sorted(self.held)
            if not ids:
                continue
            if time.monotonic() - renewed >= every:
                renewed = time.monotonic()
                await self._renew(ids)
            await self._follow_cancels(sorted(self.held))

    async def _renew(self, ids: Sequence[int]) -> None:
        """Renew the leases on `ids`; let go of those another worker holds now."""
        asked = time.monotonic()
        try:
            kept = await self._write(
                self.ledger.renew_leases(self.owner, ids, self.settings.job_lease)
            )
        except Exception as err:  # noqa: BLE001 - the store's health reports it
            log.warning("leases not renewed: %s", err)
            return
        for job_id in kept:
            self._renewed[job_id] = asked
        for job_id in set(self._renewed) - self.held:
            del self._renewed[job_id]
        for job_id in set(ids) - kept:
            if job_id in self.held and job_id not in self._inflight:
                log.info("job %d is no longer held here (ended or taken over)", job_id)
                self.held.discard(job_id)

    async def take_over(self) -> None:
        """Carry on, until cancelled, the jobs dead processes left (their lease expired).

        Runs in `imgbot run`. Only platforms with a resumer here (their front end runs)
        and the web/terminal jobs (which nobody can carry on: their caller is gone) are
        claimed; start-up, terminal commands and reports never touch another's jobs.
        """
        # Often, so a dead process's jobs are claimed soon after their lease ends (the
        # claim is one indexed statement: cheap to repeat).
        every = max(0.2, min(1.0, self.settings.job_lease / 10))
        pruned = time.monotonic()
        while not self._closing:
            if time.monotonic() - pruned > PRUNE_EVERY:
                pruned = time.monotonic()
                try:
                    await self._write(self.ledger.prune_expired())
                except Exception as err:  # noqa: BLE001 - tried again later
                    log.warning("could not forget what expired in the ledger: %s", err)
            try:
                platforms = sorted({*self.resumers, "cli", "web"})
                claimed_at = time.monotonic()
                jobs = await self._write(
                    self.ledger.claim_expired(
                        self.owner, self.settings.job_lease, platforms, limit=10,
                        exclude=sorted(self.held),
                    )
                )
            except Exception as err:  # noqa: BLE001 - tried again on the next round
                log.warning("could not look for jobs to take over: %s", err)
                jobs = []
            # A job drawn before and queued again by this claim lost a draw.
            lost = [job for job in jobs if job.stage is JobStage.QUEUED and job.lost_credits > 0]
            if lost:
                self.alert_soon(
                    "lost_draws",
                    f"{len(lost)} job(s) were cut off while drawing by a process that died"
                    f" (#{', #'.join(str(job.id) for job in lost)}): they are drawn again here"
                    " and charged once; the lost draws may have been billed upstream"
                    f" ({sum(job.lost_credits for job in lost):.0f} credits estimated, kept as"
                    " lost_credits in `imgbot usage --csv`). Check why the process died.",
                    level=logging.WARNING,
                )
            for job in jobs:
                self.held.add(job.id)
                self._renewed[job.id] = claimed_at
                log.info("job %d taken over (%s, attempt %d, lost so far %.2f)",
                         job.id, job.stage.value, job.attempts, job.lost_credits)
                if job.cancel_requested_at is not None and job.stage is JobStage.QUEUED:
                    await self._end_cancelled(job)
                    continue
                resume = self.resumers.get(_via(job))
                if resume is not None and not self._closing:
                    resume(job)
                else:
                    await self._close_orphan(job)
            await asyncio.sleep(every)

    async def _end_cancelled(self, job: JobRecord) -> None:
        """End a taken-over job its user cancelled while its process stopped or died: at 0,
        never drawn (the /cancel answer already told the user it stops)."""
        await self._write(self.ledger.fail(job.id, "cancelled"))
        self.held.discard(job.id)
        log.info("job %d cancelled: its user asked while the process holding it stopped",
                 job.id)

    async def _close_orphan(self, job: JobRecord) -> None:
        """End a taken-over job nobody here can carry on (a web or terminal caller is gone)."""
        if job.stage is JobStage.DRAWN:
            await self.finish_delivery(job.id, delivered=False)
            await self.alert(
                "undelivered", f"job {job.id} ({job.user_key}) was drawn but its caller is"
                " gone: undelivered, refundable with /refund"
            )
        else:
            await self._write(self.ledger.fail(job.id, "interrupted"))
            self.held.discard(job.id)

    async def resume_draw(
        self,
        job: JobRecord,
        fetch: Callable[[str], Awaitable[IncomingImage]],
        progress: ProgressCallback | None = None,
    ) -> DrawOutcome:
        """Draw a taken-over queued job again, as it was asked; the user pays once.

        A job whose draw was already lost twice is stopped (released at 0): a prompt that
        kills its worker must not kill every worker in turn. References are fetched again
        from the platform; if they are gone the job is released at 0.
        """
        requester = await self.requester_of(job)
        lang = language_of(requester.language)
        if job.attempts >= MAX_DRAW_ATTEMPTS:
            await self._write(self.ledger.fail(job.id, "interrupted"))
            self.held.discard(job.id)
            raise Cancelled("job.interrupted_released", job_id=job.id)
        stored = json.loads(job.request_json or "{}")
        try:
            incoming = [await fetch(ref) for ref in stored.get("reference_refs") or [] if ref]
            refs = await prepare_references(
                [(r.data, r.filename) for r in incoming],
                max_bytes=self.settings.max_reference_bytes,
            )
            request = _request_from_dict(stored["request"])
        except Exception as err:  # noqa: BLE001 - whatever it was, the job cannot run
            log.warning("job %d cannot be drawn again: %s", job.id, err)
            await self._write(self.ledger.fail(job.id, "interrupted"))
            self.held.discard(job.id)
            raise Cancelled("job.references_gone", job_id=job.id) from None
        ticket = self.queue.admit(job.user_key, force=True)
        ticket.job_id = job.id
        return await self._run(
            requester, request, refs, job.estimated_credits, job.id, ticket, progress, lang,
            resumable=True, command_text=job.command_text,
        )

    async def kept_outcome(self, job: JobRecord) -> DrawOutcome | None:
        """Rebuild a drawn job's outcome from its kept result; None if it is gone."""
        kept = await self.results.load(job.id)
        if kept is None:
            return None
        requester = await self.requester_of(job)
        stored = json.loads(job.request_json or "{}")
        return DrawOutcome(
            job_id=job.id,
            request=_request_from_dict(stored["request"]),
            images=kept.images,
            credits=job.actual_credits or 0.0,
            estimated=job.estimated_credits,
            spend=await self.spend_report(requester),
            elapsed=kept.elapsed,
            lang=language_of(requester.language),
            revised_prompt=kept.revised_prompt,
            reference_count=job.reference_count,
            command_text=job.command_text,
        )

    async def requester_of(self, job: JobRecord) -> Requester:
        """The requester a stored job was asked by (language as the user last set it)."""
        user = await self.ledger.get_user(job.user_key)
        return Requester(
            platform=job.platform,
            user_id=job.user_id,
            chat_id=job.chat_id,
            display_name=job.display_name,
            language=user.language if user is not None else None,
        )

    async def finish_delivery(
        self, job_id: int, *, delivered: bool, result_refs: Sequence[str] = ()
    ) -> None:
        """Record that a drawn job reached its user (or never will); let its lease go.

        `result_refs` (where its files went on the platform, for "vary") go in the same
        write; if the job was no longer this process's to finish, they are stored alone.
        """
        refs = [r for r in result_refs if r]
        try:
            finished = await self._write(
                self.ledger.finish_delivery(job_id, self.owner, delivered, refs)
            )
            if refs and not finished:
                try:
                    await self.record_result_refs(job_id, refs)
                except Exception:  # noqa: BLE001 - the user has the result; only "vary" loses
                    log.exception("could not store the result files of job %d", job_id)
        finally:
            self.held.discard(job_id)
        if delivered and self.settings.result_retention_hours <= 0:
            try:
                await self.results.remove(job_id)
            except STORE_FAILURES as err:  # delivered all the same; clean_results retries
                log.warning("job %d: kept result not removed yet (%s)", job_id, err)

    async def clean_results(self) -> int:
        """Delete kept results older than RESULT_RETENTION_HOURS whose job has ended."""
        cutoff = time.time() - self.settings.result_retention_hours * 3600
        removed = 0
        for job_id, saved in await self.results.kept():
            if saved.timestamp() > cutoff or job_id in self.held:
                continue
            job = await self.ledger.get_job(job_id)
            if job is not None and job.stage in (JobStage.QUEUED, JobStage.DRAWING,
                                                 JobStage.DRAWN):
                continue
            await self.results.remove(job_id)
            removed += 1
        return removed

    async def release_held(self) -> None:
        """Hand this process's open jobs to the next live worker at once (a clean exit),
        and end its heartbeat in the ledger (the other replicas stop counting it)."""
        try:
            await self.ledger.drop_lease(f"replica:{self.owner}", self.owner)
        except Exception as err:  # noqa: BLE001 - it expires by itself
            log.debug("replica heartbeat not ended: %s", err)
        ids = sorted(self.held)
        if not ids:
            return
        try:
            count = await self.ledger.release_leases(self.owner, ids)
            log.info("shutdown: %d open job(s) left for the next start", count)
        except Exception as err:  # noqa: BLE001 - they are taken over when the lease ends
            log.warning("could not hand over %d open job(s) (%s); they are taken over when"
                        " their lease ends", len(ids), err)

    async def beat(self, every: float) -> None:
        """Say in the ledger that this process is alive (for `every` × 3 seconds), with its
        roles (the others count it: `count_replicas`)."""
        info = json.dumps({"roles": sorted(self.roles), "jobs": len(self.held)})
        await self._write(self.ledger.hold_lease(f"replica:{self.owner}", self.owner,
                                                 every * 3, info))

    async def count_replicas(self) -> int:
        """Count the live processes on the ledger (their heartbeats, this one's included)
        and tell the listeners. A read only: `imgbot run` does it every second, so a replica
        that just started is counted by the others before it sends much, whatever their
        heartbeats' interval."""
        now = time.time()
        live = [
            lease for lease in await self.ledger.leases("replica:")
            if lease.until.timestamp() > now
        ]
        count = max(1, len(live))
        if count != self.replicas:
            log.info("%d imgbot process(es) share this ledger", count)
            self.replicas = count
        # Every count, not only on a change: a listener may wait before it follows a drop.
        for listener in list(self.replica_listeners):
            listener(count)
        return count

    async def alert(self, kind: str, message: str, *, level: int = logging.ERROR) -> None:
        """Tell the operator: always in the log (ERROR, or `level` for news that is no
        failure), and to the admins' chats at most once per kind every ALERT_EVERY seconds
        — over all the processes on the ledger (a mark in the store), so three replicas
        that all see the upstream key revoked send one message, not three."""
        log.log(level, "ALERT %s: %s", kind, message)
        now = time.monotonic()
        if now - self._alerted.get(kind, -self.alert_every) < self.alert_every:
            return
        self._alerted[kind] = now
        if not self.alert_senders:
            return
        try:
            # One mark per kind and period (periods counted from the epoch, so every
            # process names the same one).
            period = int(time.time() // max(self.alert_every, 1e-3))
            first = await self.ledger.mark_once(f"alert:{kind}:{period}", self.alert_every)
        except Exception as err:  # noqa: BLE001 - e.g. the store alert: send it anyway
            log.debug("alert mark not written (%s); sending from this process", err)
            first = True
        if not first:
            return  # another process sent this kind within the period
        for send in list(self.alert_senders):
            try:
                await send(message)
            except Exception as err:  # noqa: BLE001 - an alert must not break the job
                log.warning("alert not sent: %s", err)

    def alert_soon(self, kind: str, message: str, *, level: int = logging.ERROR) -> None:
        """Raise an alert in the background: whatever noticed the trouble (a job's failure,
        a write) goes on without waiting for the admins' chats to answer."""
        task = asyncio.ensure_future(self.alert(kind, message, level=level))
        self._alerting.add(task)
        task.add_done_callback(self._alerting.discard)

    def _note_upstream(self, err: UpstreamError | None) -> None:
        """Count image calls that failed in a row, and raise the upstream's alerts."""
        if err is None:
            self._upstream_failures = 0
            return
        if isinstance(err, UpstreamAuthError) and err.status in (401, 403):
            self.alert_soon(
                "upstream_auth",
                f"the image API refused our key (HTTP {err.status}): every job fails until"
                " it is fixed. Check OPENAI_API_KEY (revoked or mistyped?) and OPENAI_BASE_URL,"
                " then restart imgbot.",
            )
        elif isinstance(err, UpstreamBalanceError):
            self.alert_soon(
                "upstream_balance",
                f"the image API account is out of balance or quota (HTTP {err.status or 402}):"
                " every job fails until it is topped up. Add funds at the provider of"
                " OPENAI_BASE_URL; no restart is needed.",
            )
        if err.key in ("upstream.moderation", "upstream.rejected"):
            return  # the request's fault, not the upstream's
        self._upstream_failures += 1
        if self._upstream_failures >= self.settings.alert_failure_run:
            self.alert_soon(
                "upstream_failures",
                f"{self._upstream_failures} image calls in a row failed (the last: {err.code})."
                " Check the provider's status page and OPENAI_BASE_URL; the log has each"
                " failure's detail.",
            )

    async def _check_global_spend(self) -> None:
        """Alert once a UTC day when the whole bot's spend reaches 80 % and 100 % of
        GLOBAL_DAILY_LIMIT (reservations count: they may be charged)."""
        limit = self.settings.global_daily_limit
        if limit <= 0:
            return
        try:
            spent = await self.ledger.global_spent_today()
        except Exception as err:  # noqa: BLE001 - an alert check must not fail a job
            log.warning("global spend not checked: %s", err)
            return
        day = time.strftime("%Y-%m-%d", time.gmtime())
        # Once a UTC day each, also in the log: a budget reached is news, not a failure
        # (WARNING), and every job after it would say it again.
        if spent >= limit - 1e-6:
            kind = f"global_100:{day}"
            message = (
                f"today's spend reached 100% of GLOBAL_DAILY_LIMIT ({spent:,.0f} of"
                f" {limit:,.0f} credits): new jobs are refused until 00:00 UTC. Raise"
                " GLOBAL_DAILY_LIMIT and restart if that is not what you want."
            )
        elif spent >= 0.8 * limit:
            kind = f"global_80:{day}"
            message = (
                f"today's spend reached {spent / limit:.0%} of GLOBAL_DAILY_LIMIT ({spent:,.0f}"
                f" of {limit:,.0f} credits); at 100% new jobs are refused until 00:00 UTC."
                " Check `top 1` for who is spending, or raise the limit."
            )
        else:
            return
        if kind in self._budget_told:
            return
        self._budget_told.add(kind)
        self.alert_soon(kind, message, level=logging.WARNING)

    # --- prepaid credits (BILLING=prepaid) --------------------------------------------
    async def welcome(self, user_key: str) -> None:
        """Give a user the welcome grant (WELCOME_CREDITS), once ever."""
        amount = self.settings.welcome_credits
        if amount <= 0 or user_key in self._welcomed:
            return
        if await self._write(self.ledger.grant_welcome(user_key, amount)):
            log.info("welcome grant of %.0f credits to %s", amount, user_key)
        self._welcomed.add(user_key)

    def star_pack(self, stars: int) -> float | None:
        """Return the credits a pack of `stars` buys now (None: no such pack)."""
        return self.settings.star_packs.get(stars)

    async def record_purchase(
        self, requester: Requester, *, charge_id: str, provider_charge_id: str, payload: str,
        stars: int, currency: str,
    ) -> tuple[PurchaseRecord, bool]:
        """Credit a Telegram Stars payment once per charge id; False for a redelivery.

        The credits are the invoice's (its payload names them): what the user agreed to pay
        for, even if the pack changed since.
        """
        parts = payload.split(":")
        if len(parts) != 3 or parts[0] != "pack" or parts[1] != str(stars) or currency != "XTR":
            # Not an invoice of ours as sent; paid all the same: keep it, credit nothing.
            log.error("payment %s with unknown payload %r (%s %s) from %s: not credited",
                      charge_id, payload[:64], stars, currency, requester.user_key)
            raise UserError("pay.unknown_payload")
        credits = float(parts[2])
        purchase, created = await self._write(
            self.ledger.record_purchase(
                requester.user_key, provider="telegram_stars", charge_id=charge_id,
                provider_charge_id=provider_charge_id, pack=payload, amount=stars,
                currency=currency, credits=credits,
            )
        )
        log.info("purchase %d: %s paid %d stars for %.0f credits%s", purchase.id,
                 requester.user_key, stars, credits, "" if created else " (already recorded)")
        return purchase, created

    async def credit_balance(self, requester: Requester) -> float:
        """Return the requester's credit balance."""
        return await self.ledger.balance(requester.user_key)

    async def purchases_of(self, requester: Requester) -> list[PurchaseRecord]:
        """Return the requester's last purchases, newest first."""
        return await self.ledger.list_purchases(requester.user_key, 10)

    async def is_blocked(self, requester: Requester) -> bool:
        """Say whether the requester (or their chat) is blocked."""
        return await self.ledger.is_blocked(requester.user_key, requester.chat_key)

    async def refund_purchase(self, purchase_id: int, by: str) -> PurchaseRecord:
        """Give a purchase's payment back (through its provider) and take its credits back
        as far as they are unspent; UserError when it cannot be."""
        purchase = await self.ledger.get_purchase(purchase_id)
        if purchase is None or purchase.status is PurchaseStatus.REFUNDED:
            # The store's own refusal says which.
            return await self._write(self.ledger.refund_purchase(purchase_id, by))
        refunder = self.payment_refunders.get(purchase.provider)
        if refunder is None:
            raise UserError("purchase.no_refunder", purchase_id=purchase_id)
        await refunder(purchase)  # raises when the provider refuses: nothing changes here
        refunded = await self._write(self.ledger.refund_purchase(purchase_id, by))
        log.info("purchase %d refunded by %s: %.0f credits taken back", purchase_id, by,
                 refunded.refunded_credits or 0.0)
        return refunded

    # --- cancellation and shutdown ---------------------------------------------------
    async def cancel(self, requester: Requester) -> list[CancelledJob]:
        """Cancel the requester's waiting jobs and stop their running ones; say which.

        A running job stops being waited for at once; its upstream call finishes in the
        background and the job is charged only what the upstream reports for it, if anything.
        The jobs this process works on stop now. Behind a load balancer the user's other jobs
        may be on other processes: they are asked to stop through the ledger, and stop there
        a moment later by the same rules (a job whose process stopped or died is ended by
        whoever takes it over, never drawn).
        """
        user_key = requester.user_key
        mine = sorted(job_id for job_id, record in self._inflight.items()
                      if record.requester.user_key == user_key)
        found = [job for job in map(self._stop_here, mine) if job is not None]
        try:
            asked = await self._write(self.ledger.request_cancel(user_key))
        except STORE_FAILURES as err:
            log.warning("/cancel of %s: the jobs other processes hold were not asked to stop"
                        " (%s)", user_key, err)
            return found
        # The ledger asks the jobs stopped here too (it still has them open while they end or
        # settle), so a second /cancel does not name them again; here they are named once.
        here = {job.job_id for job in found}
        return found + [
            CancelledJob(job.id, prompt_of(job), running=job.stage is JobStage.DRAWING,
                         later=True)
            for job in asked if job.id not in here
        ]

    def _stop_here(self, job_id: int) -> CancelledJob | None:
        """Cancel one job this process runs, as /cancel does; None if there is nothing to
        stop (it ended, is ending, or was cancelled already).

        A waiting job leaves the queue; one with a slot that waits for room among every
        process's jobs stops waiting (both fail at 0); a drawing one stops being waited for.
        """
        record = self._inflight.get(job_id)
        if record is None or record.settled or record.cancel.is_set():
            return None
        if self.queue.cancel(record.requester.user_key, job_id):
            return CancelledJob(job_id, record.prompt)
        record.cancel.set()
        return CancelledJob(job_id, record.prompt, running=record.drawing)

    async def _follow_cancels(self, job_ids: Sequence[int]) -> None:
        """Stop those of this process's jobs that a /cancel asked to stop through the ledger."""
        try:
            asked = await self.ledger.cancel_requested(job_ids)
        except Exception as err:  # noqa: BLE001 - asked again on the next round
            log.warning("could not read the cancel requests: %s", err)
            return
        for job_id in sorted(asked):
            stopped = self._stop_here(job_id)
            if stopped is not None:
                log.info("job %d cancelled (%s) at its user's request, made through the ledger",
                         job_id, "drawing" if stopped.running else "waiting")

    async def shutdown(self, grace: float) -> None:
        """Stop taking jobs, cancel waiting ones, let running ones finish up to `grace`.

        Safe to call from several places (each bot, the entry point): all share one drain.
        """
        if self._shutdown is None:
            self._shutdown = asyncio.ensure_future(self._drain(grace))
        await asyncio.shield(self._shutdown)

    async def _drain(self, grace: float) -> None:
        self._closing = True
        cancelled = self.queue.close()
        if cancelled:
            log.info("shutdown: cancelled %d waiting job(s)", len(cancelled))
        records = {r.task: r for r in self._inflight.values() if r.task is not None}
        if records:
            log.info("shutdown: waiting up to %.0fs for %d job(s)", grace, len(records))
            _, pending = await asyncio.wait(set(records), timeout=grace)
            for task in pending:
                # A job a later process can carry on is stopped and left to it (its user
                # told); any other is cancelled and resolved now.
                if records[task].resumable:
                    records[task].stop.set()
                else:
                    task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=10)
        await self._wait_settling(grace)

    async def _wait_settling(self, grace: float) -> None:
        # Cancelled running jobs still wait for their upstream call, to be settled from it.
        if not self._settling:
            return
        log.info("shutdown: settling %d cancelled job(s)", len(self._settling))
        _, pending = await asyncio.wait(set(self._settling), timeout=grace)
        for task in pending:
            task.cancel()  # left unsettled: the call may have billed
        if pending:
            await asyncio.wait(pending, timeout=10)

    @property
    def jobs_in_flight(self) -> int:
        """Return the number of jobs reserved and not yet finished."""
        return len(self._inflight)

    # --- buttons: replay a job after a restart -------------------------------------
    async def replay(
        self,
        requester: Requester,
        job_id: int,
        action: ReplayAction,
        fetch: Callable[[str], Awaitable[IncomingImage]],
        progress: ProgressCallback | None = None,
        *,
        source_ref: str | None = None,
        origin: Mapping[str, str] | None = None,
    ) -> DrawOutcome:
        """Rerun a stored job ("again", "4k") or vary its result ("vary"); the presser pays."""
        # Before any lookup or download: a stranger learns nothing and costs nothing.
        await self.check_access(requester)
        job = await self.ledger.get_job(job_id)
        if job is None or not job_visible_to(job, requester):
            # Callback data can be forged: a job's prompt and private references are
            # served only in the chat it was drawn in.
            raise JobNotFound(job_id=job_id)
        stored = json.loads(job.request_json or "{}")
        if action == "vary":
            if not job.result_refs:
                raise JobNotFound("job.no_result", job_id=job_id)
            refs = [await fetch(job.result_refs[0])]
        else:
            refs = [await fetch(ref) for ref in stored.get("reference_refs") or [] if ref]
        return await self.draw(
            requester,
            job.command_text,
            refs,
            progress,
            force_tier="4K" if action == "4k" else None,
            source_ref=source_ref,
            origin=origin,
        )

    async def job(self, job_id: int) -> JobRecord | None:
        """Return a stored job."""
        return await self.ledger.get_job(job_id)

    async def job_by_source(self, source_ref: str) -> JobRecord | None:
        """Return the stored job `source_ref` made (a page job's handle), from any process."""
        return await self.ledger.job_by_source(source_ref)

    async def record_result_refs(self, job_id: int, refs: Sequence[str]) -> None:
        """Remember where a job's delivered files are on its platform (for "vary")."""
        await self._write(self.ledger.set_result_refs(job_id, [r for r in refs if r]))

    async def spend_report(self, requester: Requester, *, last: int = 5) -> SpendReport:
        """Return the requester's spend against their limits, and their `last` jobs (with
        their credit balance when BILLING=prepaid)."""
        if self.settings.prepaid:
            try:
                await self.check_access(requester)
                await self.welcome(requester.user_key)
            except AccessDenied:
                pass  # no welcome for someone who may not draw
        report = await self.ledger.spend_report(requester.user_key, last=last)
        if not self.settings.prepaid:
            return report
        return replace(report, balance=await self.ledger.balance(requester.user_key))

    async def api_key_user(self, plaintext: str) -> str | None:
        """Return the user key a personal API key draws as (None: unknown or revoked)."""
        return await self.ledger.api_key_user(plaintext)

    # --- personal API keys, asked for in a chat (/key) ------------------------------
    @staticmethod
    def _as_api_user(requester: Requester) -> Requester:
        # A key draws as its user alone, outside any chat (bots/web/api.py builds that
        # requester): check access the way the API will, not as the chat asking.
        return replace(requester, chat_id=None, is_group=False, is_chat_admin=False)

    async def create_api_key(self, requester: Requester, name: str = "") -> NewApiKey:
        """Make a personal API key for the requester; its text is in the answer only.

        Refused (AccessDenied) like a job: blocked users, and users the access lists leave
        out of a private chat, get no key. The front end must show it privately.
        """
        await self.check_access(self._as_api_user(requester))
        key_id, plaintext = await self._write(
            self.ledger.create_api_key(requester.user_key, clean_text(name)[:64])
        )
        log.info("api key %d created for %s (from a chat)", key_id, requester.user_key)
        return NewApiKey(id=key_id, key=plaintext, base_url=self.settings.web_api_url)

    async def revoke_api_keys(self, requester: Requester) -> int:
        """Revoke every active personal key of the requester; return how many were."""
        await self.check_access(self._as_api_user(requester))
        revoked = 0
        for record in await self.ledger.list_api_keys(requester.user_key):
            if record.active and await self._write(self.ledger.revoke_api_key(record.id)):
                revoked += 1
        if revoked:
            log.info("%d api key(s) of %s revoked (from a chat)", revoked, requester.user_key)
        return revoked

    # --- logging -----------------------------------------------------------------------
    def _log_job(
        self,
        requester: Requester,
        request: ImageRequest,
        status: str,
        credits: float,
        seconds: float,
        error: str,
    ) -> None:
        log.info(
            "job platform=%s user=%s chat=%s size=%s quality=%s n=%d status=%s "
            "credits=%.1f seconds=%.1f%s",
            requester.platform,
            requester.user_id,
            requester.chat_id or "-",
            request.size,
            request.quality,
            request.n,
            status,
            credits,
            seconds,
            f" error={error}" if error else "",
        )


def _retrieved(future: asyncio.Future[object]) -> None:
    """Mark a side future's error as seen (its caller may have ended another way)."""
    if not future.cancelled():
        future.exception()


def job_visible_to(job: JobRecord, requester: Requester) -> bool:
    """Say whether a job may be shown or replayed for a requester: same chat, or own DM."""
    if job.chat_key is None:
        return requester.chat_key is None and job.user_key == requester.user_key
    return job.chat_key == requester.chat_key


def _via(job: JobRecord) -> str:
    """The front end a stored job came through (older rows: its platform)."""
    try:
        origin = json.loads(job.request_json or "{}").get("origin") or {}
    except (ValueError, AttributeError):
        origin = {}
    via = origin.get("via") if isinstance(origin, dict) else None
    return str(via) if via else job.platform


def prompt_of(job: JobRecord) -> str:
    """Return the prompt of a stored job (its command, for rows without a stored request)."""
    try:
        prompt = json.loads(job.request_json or "{}").get("request", {}).get("prompt")
    except (ValueError, AttributeError):
        prompt = None
    return prompt if isinstance(prompt, str) else job.command_text


def _request_from_dict(data: Mapping[str, object]) -> ImageRequest:
    """Rebuild a stored request (its notices, shown at the time, are not kept)."""
    names = {f for f in ImageRequest.__dataclass_fields__ if f != "notices"}
    return ImageRequest(**{k: v for k, v in data.items() if k in names})  # type: ignore[arg-type]


def _request_dict(request: ImageRequest) -> dict[str, object]:
    data = asdict(request)
    data["notices"] = [n.key for n in request.notices]
    return data
