"""A fair job queue with a global and a per-user limit on jobs in flight, and a rate limiter.

Waiting jobs are served first come, first served, except that a job whose user already has
`per_user` jobs running is passed over (it does not block the jobs behind it). A waiting
job can be cancelled by its owner; shutting the queue down cancels every waiting job.

`admit` checks the user's room and takes the place in one step, with no await between, so
requests arriving together cannot all see the same empty queue; the caller then reserves
(an await), names the ticket's job and waits with `acquire`, or gives the place back with
`withdraw` if the reservation was refused. Within one process only: across processes the
store makes the same checks with the reservation (the user's open jobs and minute) and the
start (`Store.try_start`: the in-flight caps).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from core.errors import Cancelled, QueueFull, RateLimited


@dataclass(eq=False)
class Ticket:
    """One job's place in the queue."""

    user_key: str
    # None while admitted and not yet reserved (see FairQueue.admit): not a job yet, so
    # /cancel and shutdown leave it to its draw, which fails it once reserved.
    job_id: int | None
    granted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    moved: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_reason: str | None = None
    queued: bool = False  # in the queue already: waiting, or holding a slot


class FairQueue:
    """Grant slots to waiting jobs fairly, within the global and per-user limits."""

    def __init__(self, global_limit: int, per_user_limit: int, max_waiting_per_user: int) -> None:
        self._global_limit = global_limit
        self._per_user_limit = per_user_limit
        self._max_waiting_per_user = max_waiting_per_user
        self._waiting: list[Ticket] = []
        self._running: Counter[str] = Counter()
        self._closed = False

    @property
    def running(self) -> int:
        """Return how many jobs hold a slot."""
        return sum(self._running.values())

    @property
    def waiting(self) -> int:
        """Return how many jobs wait."""
        return len(self._waiting)

    def position(self, ticket: Ticket) -> int:
        """Return the 1-based place of a waiting ticket (0 once it runs)."""
        try:
            return self._waiting.index(ticket) + 1
        except ValueError:
            return 0

    def check_room(self, user_key: str) -> None:
        """Refuse a new job if the user already has too many waiting."""
        if self._closed:
            raise Cancelled("job.shutting_down")
        mine = sum(1 for t in self._waiting if t.user_key == user_key)
        if mine >= self._max_waiting_per_user:
            raise QueueFull(waiting=mine)

    def admit(self, user_key: str, *, force: bool = False) -> Ticket:
        """Check the user's room and take a place in the queue at once (no await between).

        The ticket may be granted a slot at once; its holder must `acquire` it (after
        setting `job_id`) or `withdraw` it. `force` skips the room check (a job accepted
        before, taken over from a dead process), not a closed queue.
        """
        if force:
            if self._closed:
                raise Cancelled("job.shutting_down")
        else:
            self.check_room(user_key)
        ticket = Ticket(user_key=user_key, job_id=None)
        self._enqueue(ticket)
        return ticket

    def withdraw(self, ticket: Ticket) -> None:
        """Give back an admitted ticket that will not run (its reservation was refused)."""
        if ticket in self._waiting:
            self._waiting.remove(ticket)
            self._notify_moved()
        elif ticket.granted.done() and not ticket.granted.cancelled():
            if ticket.granted.exception() is None:  # also marks a cancellation as seen
                self.release(ticket)

    async def acquire(
        self, ticket: Ticket, on_position: Callable[[int], Awaitable[None]] | None = None
    ) -> None:
        """Wait for a slot; report the queue position whenever it changes."""
        if not ticket.queued:
            if self._closed:
                raise Cancelled("job.shutting_down")
            self._enqueue(ticket)
        last = 0
        try:
            while not ticket.granted.done():
                pos = self.position(ticket)
                if pos and pos != last and on_position is not None:
                    last = pos
                    await on_position(pos)
                if ticket.granted.done():
                    break
                ticket.moved.clear()
                waiter = asyncio.ensure_future(ticket.moved.wait())
                try:
                    await asyncio.wait({waiter, ticket.granted}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
            ticket.granted.result()
        except BaseException:
            if ticket in self._waiting:
                self._waiting.remove(ticket)
                self._notify_moved()
            elif ticket.granted.done() and not ticket.granted.cancelled() and ticket.granted.exception() is None:
                self.release(ticket)
            raise

    def _enqueue(self, ticket: Ticket) -> None:
        ticket.queued = True
        self._waiting.append(ticket)
        self._pump()

    def release(self, ticket: Ticket) -> None:
        """Give a ticket's slot back and wake the next eligible job."""
        if self._running[ticket.user_key] > 0:
            self._running[ticket.user_key] -= 1
            if not self._running[ticket.user_key]:
                del self._running[ticket.user_key]
        self._pump()

    def cancel(self, user_key: str, job_id: int | None = None) -> list[int]:
        """Cancel the user's waiting jobs (or one of them); return the cancelled job ids."""
        hit = [
            t for t in self._waiting
            if t.user_key == user_key
            and t.job_id is not None
            and (job_id is None or t.job_id == job_id)
        ]
        for t in hit:
            self._waiting.remove(t)
            if not t.granted.done():
                t.granted.set_exception(Cancelled("job.cancelled"))
        if hit:
            self._notify_moved()
        return [t.job_id for t in hit if t.job_id is not None]

    def close(self) -> list[int]:
        """Stop taking jobs and cancel every waiting one; return their job ids."""
        self._closed = True
        hit = list(self._waiting)
        self._waiting.clear()
        for t in hit:
            if not t.granted.done():
                t.granted.set_exception(Cancelled("job.shutting_down"))
        return [t.job_id for t in hit if t.job_id is not None]

    def _pump(self) -> None:
        granted_any = False
        for t in list(self._waiting):
            if self.running >= self._global_limit:
                break
            if self._running[t.user_key] >= self._per_user_limit:
                continue
            self._waiting.remove(t)
            self._running[t.user_key] += 1
            if not t.granted.done():
                t.granted.set_result(None)
            granted_any = True
        if granted_any:
            self._notify_moved()

    def _notify_moved(self) -> None:
        for t in self._waiting:
            t.moved.set()


class RateLimiter:
    """Allow each user at most `per_minute` requests in any sliding minute."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_minute = per_minute
        self._clock = clock
        self._seen: dict[str, deque[float]] = {}

    def hit(self, user_key: str) -> None:
        """Count one request, or raise RateLimited saying when to try again."""
        if self._per_minute <= 0:
            return
        now = self._clock()
        window = self._seen.setdefault(user_key, deque())
        while window and now - window[0] >= 60:
            window.popleft()
        if len(window) >= self._per_minute:
            wait = max(1, int(60 - (now - window[0]) + 0.999))
            raise RateLimited(per_minute=self._per_minute, seconds=wait)
        window.append(now)
        if len(self._seen) > 10000:  # forget idle users so memory stays bounded
            for key in [k for k, w in self._seen.items() if not w or now - w[-1] >= 60]:
                del self._seen[key]
