"""The one job runner every front end uses: from a command to a delivered result or a word.

    runner = JobRunner(service)
    await runner.run(requester, command, fetch_references, reply, source_ref=…)
    await runner.replay(requester, job_id, action, fetch_ref, reply, source_ref=…)

A front end turns its platform event into a `Requester`, the command text, a way to fetch
the references, and a `Reply` of its own. The runner then, in this order: checks access
(before anything is downloaded for a stranger), fetches the references, applies a
refinement (a reply to an earlier result keeps its options), asks first when the estimate
is above `CONFIRM_ABOVE` (if the front end can ask), draws through the service's queue,
hands the result to the Reply and records where its files went (for "vary"). Every error
ends in one place: a core error becomes its message in the requester's language, or
silence for a silent refusal; anything else is logged and answered with a generic line.
The front end holds no rules and no core wording.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any, Protocol

from core.errors import DeliveryFailed, ImgbotError, Texts
from core.messages import language_of, text
from core.prompt import refine_command
from core.replay import ReplayAction
from core.service import DrawOutcome, ImageService, job_visible_to
from core.store import JobRecord, JobStage
from core.types import IncomingImage, Progress, Requester

log = logging.getLogger(__name__)

FetchReferences = Callable[[], Awaitable[Sequence[IncomingImage]]]
FetchRef = Callable[[str], Awaitable[IncomingImage]]


class Reply(Protocol):
    """How a front end shows one job: its progress, its result, or why there is none."""

    async def progress(self, event: Progress) -> None:
        """Show a progress event (queued at a place, drawing, elapsed); never raise."""

    async def result(self, outcome: DrawOutcome, four_k_credits: float | None) -> Sequence[str]:
        """Deliver the result; return the platform's handle of each image sent ("" if none).

        `four_k_credits` is what the 4K replay would cost, for its button (None: unknown).
        Raises DeliveryFailed when the platform would not take it; the runner tries again
        (DELIVERY_ATTEMPTS, backing off) while it says the problem may pass.
        """

    async def refusal(self, message: str | None, error: ImgbotError | None = None) -> None:
        """Say why the job did not run (a core error's message), or end quietly (None).

        `error` is the core error itself, for a front end's own bookkeeping (an exit code);
        its wording is `message`. Raises DeliveryFailed (retryable) when the platform had
        a passing problem: the runner says it again, like a result.
        """

    async def failure(self, message: str) -> None:
        """Say that something went wrong on our side (the details are in the log); raises
        DeliveryFailed like `refusal`."""


# Called with the estimate and a way to start the job later with another Reply.
Confirm = Callable[[float, Callable[[Reply], Awaitable[None]]], Awaitable[None]]


class JobRunner:
    """Carry jobs from any front end through the service and back to its Reply."""

    def __init__(self, service: ImageService, texts: Texts = text) -> None:
        """`texts` is the front end's `text`, so errors it raises with its own keys read right."""
        self.service = service
        self._texts = texts
        self._running: set[asyncio.Task[object]] = set()

    async def run(
        self,
        requester: Requester,
        command: str,
        references: FetchReferences,
        reply: Reply,
        *,
        refines: int | None = None,
        confirm: Confirm | None = None,
        source_ref: str | None = None,
        origin: Mapping[str, str] | None = None,
        mask: IncomingImage | None = None,
    ) -> None:
        """Run one /img command for a front end and answer through its Reply.

        `refines` is the job whose result the command answers: its options are kept unless
        the command names new ones. `confirm`, when given, is asked before a job estimated
        above `CONFIRM_ABOVE`; it gets a way to start the job later.
        """

        async def job() -> None:
            service = self.service
            # Before any download: a stranger learns nothing and costs nothing.
            await service.check_access(requester)
            refs = tuple(await references())
            wanted = await self._refined(command, refines, requester)
            threshold = service.settings.confirm_above
            if confirm is not None and threshold > 0:
                _, estimate = await service.estimate(wanted, refs)
                if estimate > threshold:

                    async def resume(later: Reply) -> None:
                        await self._guarded(requester, later, self._draw_job(
                            requester, wanted, refs, later, source_ref, origin, mask
                        ))

                    await confirm(estimate, resume)
                    await reply.refusal(None)  # the question replaces the status
                    return
            await self._draw_job(requester, wanted, refs, reply, source_ref, origin, mask)

        await self._guarded(requester, reply, job())

    async def replay(
        self,
        requester: Requester,
        job_id: int,
        action: ReplayAction,
        fetch_ref: FetchRef,
        reply: Reply,
        *,
        source_ref: str | None = None,
        origin: Mapping[str, str] | None = None,
    ) -> None:
        """Replay a stored job from its button ("again", "4k", "vary"); the presser pays."""

        async def job() -> None:
            outcome = await self.service.replay(
                requester,
                job_id,
                action,
                fetch_ref,
                reply.progress,
                source_ref=source_ref,
                origin=origin,
            )
            await self._deliver(outcome, reply)

        await self._guarded(requester, reply, job())

    async def _draw_job(
        self,
        requester: Requester,
        command: str,
        refs: Sequence[IncomingImage],
        reply: Reply,
        source_ref: str | None,
        origin: Mapping[str, str] | None,
        mask: IncomingImage | None = None,
    ) -> None:
        outcome = await self.service.draw(
            requester,
            command,
            refs,
            reply.progress,
            source_ref=source_ref,
            origin=origin,
            **({"mask": mask} if mask is not None else {}),
        )
        await self._deliver(outcome, reply)

    async def resume(
        self, job: JobRecord, reply: Reply, fetch_ref: FetchRef
    ) -> None:
        """Carry on a job a dead process left (taken over by `ImageService.take_over`).

        A drawn job is delivered from its kept result; a queued one (its draw may have
        been lost) is drawn again, at most once more, and delivered. The user pays once.
        """
        service = self.service
        requester = await service.requester_of(job)

        async def work() -> None:
            if job.stage is JobStage.DRAWN:
                outcome = await service.kept_outcome(job)
                if outcome is None:
                    await service.finish_delivery(job.id, delivered=False)
                    await service.alert(
                        "undelivered", f"job {job.id} ({job.user_key}): its kept result is"
                        " gone; undelivered, refundable with /refund"
                    )
                    lang = language_of(requester.language)
                    text_ = self._texts(lang, "job.result_lost", job_id=job.id)
                    await self._tell(partial(reply.failure, text_), job.user_key)
                    return
            else:
                outcome = await service.resume_draw(job, fetch_ref, reply.progress)
            await self._deliver(outcome, reply)

        await self._guarded(requester, reply, work())

    async def _deliver(self, outcome: DrawOutcome, reply: Reply) -> None:
        """Hand a drawn result over, trying again while the platform's trouble may pass;
        then record it delivered, or undelivered (refundable; user told, admins alerted)."""
        service = self.service
        four_k = await self.four_k_estimate(outcome)
        delay = service.settings.delivery_retry_delay
        attempts = service.settings.delivery_attempts
        for attempt in range(1, attempts + 1):
            if not await service.still_mine(outcome.job_id):
                return  # taken over (this process was too slow): the other one delivers it
            try:
                handles = await reply.result(outcome, four_k)
                break
            except DeliveryFailed as err:
                if err.retryable and attempt < attempts:
                    log.warning("job %d: delivery try %d of %d failed (%s); again in %.1fs",
                                outcome.job_id, attempt, attempts, err, delay)
                    await asyncio.sleep(delay)
                    delay *= 2
                    continue
                await service.finish_delivery(outcome.job_id, delivered=False)
                await service.alert(
                    "undelivered", f"job {outcome.job_id}: the result could not be delivered"
                    f" after {attempt} tries ({err}); undelivered, refundable with /refund"
                )
                told = self._texts(outcome.lang, "job.undelivered", job_id=outcome.job_id)
                await self._tell(partial(reply.failure, told), f"job {outcome.job_id}")
                return
        # Delivered, and where its files went (for "vary"), in one store write.
        await service.finish_delivery(outcome.job_id, delivered=True, result_refs=handles)

    async def _refined(self, command: str, refines: int | None, requester: Requester) -> str:
        if refines is None:
            return command
        job = await self.service.job(refines)
        if job is None or not job_visible_to(job, requester):
            return command  # a result from another chat refines nothing (and tells nothing)
        try:
            stored = json.loads(job.request_json or "{}").get("request")
        except (ValueError, AttributeError):
            return command
        if not isinstance(stored, dict):
            return command
        return refine_command(command, stored, self.service.defaults)

    async def four_k_estimate(self, outcome: DrawOutcome) -> float | None:
        """Estimate what the 4K replay of a result would cost (None: cannot say)."""
        command = outcome.command_text
        if not command:
            job = await self.service.job(outcome.job_id)
            if job is None:
                return None
            command = job.command_text
        first = outcome.images[0] if outcome.images else None
        # The references are not at hand; their aspect is what the result followed.
        sizes = [(first.width, first.height)] * outcome.reference_count if first else []
        try:
            _, estimate = self.service.parse(command, reference_sizes=sizes, force_tier="4K")
        except ImgbotError:
            return None
        return estimate

    async def _guarded(
        self, requester: Requester, reply: Reply, work: Awaitable[None]
    ) -> None:
        """Run a job's work; every way it can end is answered here, once."""
        lang = language_of(requester.language)
        task = asyncio.current_task()
        if task is not None:
            self._running.add(task)
        try:
            await work
        except ImgbotError as err:
            # A stranger in a group, or a message already handled: say nothing.
            message = None if err.params.get("silent") else err.user_message(lang, self._texts)
            await self._tell(partial(reply.refusal, message, err), requester.user_key)
        except Exception:
            log.exception("job of %s failed", requester.user_key)
            internal = self._texts(lang, "error.internal")
            await self._tell(partial(reply.failure, internal), requester.user_key)
        finally:
            if task is not None:
                self._running.discard(task)

    async def _tell(self, say: Callable[[], Awaitable[None]], whom: str) -> None:
        """Say why a job ended, trying again (as a result is) while the platform's trouble
        may pass: a user whose job failed must hear of it, not be left at "Drawing…"."""
        settings = self.service.settings
        delay = settings.delivery_retry_delay
        attempts = max(1, settings.delivery_attempts)
        for attempt in range(1, attempts + 1):
            try:
                await say()
                return
            except DeliveryFailed as err:
                if not err.retryable or attempt == attempts:
                    log.error("%s was not told why the job ended, after %d tries: %s",
                              whom, attempt, err)
                    return
                log.warning("%s: telling why the job ended failed (try %d of %d: %s);"
                            " again in %.1fs", whom, attempt, attempts, err, delay)
                await asyncio.sleep(delay)
                delay *= 2

    async def drain(self, grace: float) -> None:
        """Let the jobs being answered finish for up to `grace` seconds, then cancel them."""
        await finish_or_cancel(set(self._running), grace)


async def finish_or_cancel(tasks: set[asyncio.Task[Any]], grace: float) -> None:
    """Let `tasks` finish for up to `grace` seconds, then cancel the rest (and wait 5 s more
    for their cancellation to run)."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=grace)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
