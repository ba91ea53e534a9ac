"""The store: everything imgbot keeps about money, as one interface with two backends.

The service, the admin actions, the reports and the front ends see only `Store` and the
records of `core.store.records`; no driver type (sqlite3, aiosqlite, asyncpg) leaves this
package. Each backend keeps the same promises, tested by one contract suite against both
(tests/test_store.py):

- `reserve` checks an estimate against every limit that applies (the user's daily and
  monthly, the chat's daily, the global daily) and records the job in one atomic step, so
  concurrent reservations, from one process or many, can never overspend.
- `settle` / `fail` / `mark_unsettled` act only on a `reserved` job: a second call is a no-op
  that returns False, so nothing is charged twice.
- Prepaid credits (BILLING=prepaid): a job whose spec says `prepaid` is also checked
  against the user's balance in that same atomic step, and counts against it as against a
  limit (reserved at its estimate, settled at its charge, given back by a refund), so a
  balance never goes below zero, across processes too. A balance is the sum of the user's
  `credit_entries` (grants, revocations, welcome, purchases, purchase refunds) minus what
  their prepaid jobs count; `balances` keeps it as a running total, by triggers.
- Running totals per limit scope and period are kept in whole micro-credits in the same
  statement that changes a job, so a total always equals the sum over its jobs.
- Times come from the store's clock (injectable for tests) and are stored as fixed-width
  UTC ISO-8601 text on both backends, so periods are text prefixes and a ledger copies from
  one backend to the other without conversion.
"""

from __future__ import annotations

import abc
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from types import TracebackType
from typing import Any, Self

from core.pricing import Usage
from core.requester import Requester
from core.store.keys import ApiKeyRecord
from core.store.records import (
    ChatRecord,
    ChatTotal,
    DailyUsage,
    JobRecord,
    JobSpec,
    KeptResult,
    Limits,
    NamedLease,
    OutcomeCount,
    PrepaidSpend,
    PurchaseRecord,
    PurchaseTotals,
    Spender,
    SpendReport,
    UserRecord,
)
from core.store.web import (
    FileToKeep,
    KeptFileData,
    KeptFileInfo,
    WebSession,
    link_mark,
    new_token,
)
from core.types import GeneratedImage

# The tables a ledger copy moves, in the order that keeps references valid, with the
# column each is paged by. `spend_totals` is not copied: the target rebuilds it.
# `api_keys` (hashes only) must travel too, or a copy or a restored backup silently
# locks every web API user out.
# `balances` is not copied either: the target's triggers rebuild it from `credit_entries`
# and the prepaid jobs (the two things a balance is made of), and `purchases` travels so
# that a payment already credited is never credited again after a copy. `usernames` travels
# (admins name users by them). The web door's sessions and kept files do not: a copy or a
# restored backup must not bring back a session signed out since, and kept files are an
# hour's cache (core/store/web.py). Kept results travel only for the jobs still waiting to
# be delivered (`SnapshotReader.results_to_deliver`): without its result, a drawn job of a
# restored backup could never be delivered; a delivered job's result is only kept for a
# while (RESULT_RETENTION_HOURS), and would make every backup that much bigger.
COPY_TABLES: tuple[tuple[str, str], ...] = (
    ("users", "user_key"),
    ("api_keys", "id"),
    ("chats", "chat_key"),
    ("jobs", "id"),
    ("purchases", "id"),
    ("credit_entries", "id"),
    ("usernames", "name_key"),
)


class StoreError(Exception):
    """The store cannot be reached or used; the message says why, never with a password."""


# What a write raises when the store could not take it (a full disk, a read-only file, a
# lost server): the PostgreSQL backend says StoreError, the SQLite backend hands up
# sqlite3's own errors, a file system may raise OSError. A caller holding a drawn result
# tries again on these; anything else is a bug and is not retried.
STORE_FAILURES: tuple[type[Exception], ...] = (StoreError, sqlite3.Error, OSError)


class SnapshotReader(abc.ABC):
    """Reads whole tables from one consistent snapshot of a store (for copies and backups)."""

    @abc.abstractmethod
    async def rows(
        self, table: str, *, after: Any = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Return up to `limit` raw rows of `table` whose key (see COPY_TABLES) is > `after`."""

    @abc.abstractmethod
    async def counts(self) -> dict[str, int]:
        """Return the number of rows of each copied table, and (as `kept_results`) of the
        results `results_to_deliver` reads."""

    @abc.abstractmethod
    async def user_totals(self) -> dict[str, float]:
        """Return what each user's jobs count in all (the sum of their charges)."""

    @abc.abstractmethod
    async def results_to_deliver(self, *, after: int = 0, limit: int = 4) -> list[KeptResult]:
        """Return up to `limit` kept results of drawn jobs (waiting to be delivered) whose
        job id is > `after`, by job id. Few at a time: each may be tens of megabytes."""


class Store(abc.ABC):
    """Spend, reservations, limits and reports; one instance per process, safe to share."""

    kind: str = ""  # "sqlite" or "postgresql"

    # --- life -------------------------------------------------------------------------

    @abc.abstractmethod
    async def close(self) -> None:
        """Close once the calls already made have finished; safe twice."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    @abc.abstractmethod
    def limits(self) -> Limits:
        """Return the default limits this store enforces."""

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """Return the schema version of the open database."""

    @abc.abstractmethod
    async def check_writable(self) -> None:
        """Prove the database accepts writes (takes the write lock and lets it go)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Return where the store is, for messages: never with a password."""

    # --- jobs -------------------------------------------------------------------------

    @abc.abstractmethod
    async def reserve(self, requester: Requester, spec: JobSpec, estimate: float) -> int:
        """Check `estimate` against every limit and reserve it as a new job; return its id.

        Raises LimitExceeded (naming the tightest limit and what is left) or DuplicateJob
        (`spec.source_ref` already made a job). A caller cancelled while the job was being
        written does not leave it behind: the reservation is released at once.
        """

    @abc.abstractmethod
    async def mark_started(self, job_id: int) -> bool:
        """Record that a reserved job started drawing; False if it is not reserved."""

    @abc.abstractmethod
    async def try_start(self, job_id: int, per_user: int, global_cap: int) -> bool | None:
        """Start a reserved job if there is room among every process's drawing jobs: fewer
        than `per_user` of its user's and fewer than `global_cap` in all (0 = no cap).

        True: started (as mark_started). False: no room now (try again later). None: the job
        is not reserved. The check and the start are one step across processes.
        """

    @abc.abstractmethod
    async def settle(
        self, job_id: int, credits: float, usage: Usage | None, *, flag: str | None = None
    ) -> bool:
        """Replace a reservation with its cost; False (no-op) if it is not reserved.

        The charge is `min(credits, estimated_credits)`: never above the reservation, so
        usage above the estimate can never push a limit over. When `credits` is above it,
        it is kept as `reported_credits` and the job flagged `flag or 'over_estimate'` (an
        estimator miss the operator absorbed); `flag` also marks a charge that is not the
        usage's (e.g. 'usage_invalid').
        """

    @abc.abstractmethod
    async def fail(
        self,
        job_id: int,
        error_code: str,
        credits: float = 0.0,
        usage: Usage | None = None,
        *,
        flag: str | None = None,
    ) -> bool:
        """Mark a reserved job failed at `credits` (0 releases it; capped and flagged as in
        `settle`); False if not reserved."""

    @abc.abstractmethod
    async def mark_unsettled(self, job_id: int) -> bool:
        """Mark a reserved job whose cost is unknown `unsettled`; False if not reserved."""

    # --- replicas: things done once, roles one process holds ---------------------------

    @abc.abstractmethod
    async def mark_once(self, key: str, seconds: float) -> bool:
        """Mark `key` done for `seconds`; True for the first caller, False while it is
        marked. One statement: of callers racing on a key, from any process, one wins."""

    @abc.abstractmethod
    async def is_marked(self, key: str) -> bool:
        """Say whether `key` is marked (and not expired)."""

    @abc.abstractmethod
    async def take_mark(self, key: str) -> bool:
        """Remove `key`'s mark if it is live; True for the one caller that removed it."""

    @abc.abstractmethod
    async def prune_expired(self) -> int:
        """Forget what has expired: marks, staged parts, page sessions and kept files;
        return how many rows went."""

    @abc.abstractmethod
    async def stage(self, group: str, key: str, payload: str) -> None:
        """Keep one part of `group` (again: kept once), stamped with the store's time."""

    @abc.abstractmethod
    async def staged(self, group: str) -> list[tuple[str, datetime, str]]:
        """Return the parts of `group` as (key, when staged, payload), oldest first."""

    @abc.abstractmethod
    async def unstage(self, group: str, key: str | None = None) -> None:
        """Forget the parts of `group` (or only the part `key`)."""

    @abc.abstractmethod
    async def hold_lease(self, name: str, owner: str, seconds: float, info: str = "") -> bool:
        """Take the named lease, or keep it, until now + `seconds`; False while another
        owner holds it unexpired. `info` says what the holder does (for doctor)."""

    @abc.abstractmethod
    async def drop_lease(self, name: str, owner: str) -> None:
        """Give the named lease up, if `owner` holds it."""

    @abc.abstractmethod
    async def leases(self, prefix: str = "") -> list[NamedLease]:
        """List the named leases whose name starts with `prefix`, live or expired."""

    # --- durable jobs: leases and takeover (see JobStage) ------------------------------

    @abc.abstractmethod
    async def renew_leases(self, owner: str, job_ids: Sequence[int], seconds: float) -> set[int]:
        """Lease those open jobs to `owner` until now + `seconds`; return the ids it holds.

        A job another worker took over (its lease had expired), or one that ended, is left
        alone and missing from the answer: its old owner must stop working on it.
        """

    @abc.abstractmethod
    async def release_leases(self, owner: str, job_ids: Sequence[int]) -> int:
        """End `owner`'s leases on those open jobs now (a clean shutdown), so the next live
        worker takes them over at once; return how many were released."""

    @abc.abstractmethod
    async def claim_expired(
        self,
        owner: str,
        seconds: float,
        platforms: Sequence[str],
        limit: int = 20,
        *,
        exclude: Sequence[int] = (),
    ) -> list[JobRecord]:
        """Take over open jobs of those platforms whose lease has expired; return them.

        Never a job `owner` leases itself, nor one in `exclude` (the jobs the claimer is
        working on: a live process whose renewals failed for a while still has them).

        A job never leased counts as leased for `seconds` from its creation. Each claimed
        job is leased to `owner` for `seconds`. A job that was `drawing` lost its attempt
        (its worker died; the upstream may have billed it): its estimate is added to
        `lost_credits`, never to the user's charge, and it is `queued` again. One
        transaction; two workers never claim the same job.
        """

    @abc.abstractmethod
    async def finish_delivery(
        self, job_id: int, owner: str, delivered: bool, result_refs: Sequence[str] = ()
    ) -> bool:
        """Move a `drawn` job leased by `owner` (or by no one) to delivered / undelivered;
        False when it is not drawn or another worker holds it (and nothing is written).

        `result_refs`, when given, are stored in the same write (as `set_result_refs`)."""

    @abc.abstractmethod
    async def request_cancel(self, user_key: str) -> list[JobRecord]:
        """Ask whoever works on them to stop the user's queued and drawing jobs; return the
        ones asked now, oldest first (a job asked before is left as it is, and not returned).

        For /cancel across processes: the process holding a job finds the request with
        `cancel_requested` and stops the job as its own /cancel would; a job taken over
        with a request (`JobRecord.cancel_requested_at`) is ended, never drawn.
        """

    @abc.abstractmethod
    async def cancel_requested(self, job_ids: Sequence[int]) -> set[int]:
        """Return those of the jobs, still queued or drawing, that /cancel asked to stop."""

    @abc.abstractmethod
    async def open_jobs(self) -> list[JobRecord]:
        """List the jobs still being worked on (queued, drawing, drawn), oldest first."""

    @abc.abstractmethod
    async def list_unsettled(self) -> list[JobRecord]:
        """List the jobs whose cost is unknown, oldest first, for admins."""

    @abc.abstractmethod
    async def refund(self, job_id: int, by: str) -> JobRecord:
        """Refund a succeeded, unsettled or charged failed job; return the refunded record."""

    @abc.abstractmethod
    async def get_job(self, job_id: int) -> JobRecord | None:
        """Return one job, or None (also for ids no job can have)."""

    @abc.abstractmethod
    async def job_by_source(self, source_ref: str) -> JobRecord | None:
        """Return the job `source_ref` (a platform message, a page job's handle) made, or
        None."""

    @abc.abstractmethod
    async def set_result_refs(self, job_id: int, refs: Sequence[str]) -> None:
        """Remember the platform file refs of a job's images (for "vary" buttons)."""

    # --- users and chats --------------------------------------------------------------

    @abc.abstractmethod
    async def get_user(self, user_key: str) -> UserRecord | None:
        """Return one user, or None."""

    @abc.abstractmethod
    async def get_chat(self, chat_key: str) -> ChatRecord | None:
        """Return one chat, or None."""

    @abc.abstractmethod
    async def set_user_limits(
        self, user_key: str, daily: float | None, monthly: float | None
    ) -> None:
        """Override a user's daily and monthly limits (None = back to the default)."""

    @abc.abstractmethod
    async def set_chat_limit(self, chat_key: str, daily: float | None) -> None:
        """Override a chat's daily limit (None = back to the default)."""

    @abc.abstractmethod
    async def set_blocked(self, key: str, blocked: bool) -> None:
        """Block or unblock a user key or a chat key (an unknown key: both)."""

    @abc.abstractmethod
    async def is_blocked(self, user_key: str, chat_key: str | None) -> bool:
        """Say whether the user or the chat is blocked."""

    @abc.abstractmethod
    async def set_language(self, user_key: str, lang: str | None) -> None:
        """Set the language a user chose (None = follow the platform again)."""

    # --- reports ----------------------------------------------------------------------

    @abc.abstractmethod
    async def spend_report(self, user_key: str, *, last: int = 5) -> SpendReport:
        """Report a user's spend today, this month and all time against their limits."""

    @abc.abstractmethod
    async def top_spenders(
        self, since: datetime, limit: int = 10, *, until: datetime | None = None
    ) -> list[Spender]:
        """List the users who spent most since `since` (and before `until`, if given)."""

    @abc.abstractmethod
    async def chat_totals(
        self, since: datetime, *, until: datetime | None = None
    ) -> list[ChatTotal]:
        """List spend per chat since `since` (and before `until`), largest first."""

    @abc.abstractmethod
    async def export_csv(self, since: datetime | None = None, user_key: str | None = None) -> str:
        """Return the jobs (since a time, of one user) as CSV: a header, then one row each."""

    @abc.abstractmethod
    async def flagged_jobs(self, since: datetime) -> list[JobRecord]:
        """List the jobs created since `since` whose charge is flagged, newest first (≤ 200)."""

    @abc.abstractmethod
    async def global_spent_today(self) -> float:
        """Return what the whole bot has spent (and reserved) today, UTC."""

    # --- the dashboard's read-only aggregations (bots/web/admin.py through core.dashboard) --

    @abc.abstractmethod
    async def daily_usage(
        self, since: datetime, *, until: datetime | None = None
    ) -> list[DailyUsage]:
        """Sum charges, jobs and reported tokens per UTC day and model, oldest day first
        (models by name within a day), over the jobs created in [since, until)."""

    @abc.abstractmethod
    async def outcome_counts(
        self, since: datetime, *, until: datetime | None = None
    ) -> list[OutcomeCount]:
        """Count the jobs created in [since, until) per stage, status and error code
        (most jobs first, then by stage, status and code)."""

    @abc.abstractmethod
    async def draw_time_quantiles(
        self,
        since: datetime,
        quantiles: Sequence[float],
        *,
        until: datetime | None = None,
    ) -> list[float | None]:
        """Return the draw times (seconds from started_at to finished_at) at those
        quantiles (0 < q <= 1, nearest rank) over the jobs created in [since, until) whose
        drawing succeeded (stage drawn, delivered or undelivered); None each when none."""

    @abc.abstractmethod
    async def list_jobs(
        self,
        since: datetime,
        *,
        until: datetime | None = None,
        user_key: str | None = None,
        chat_key: str | None = None,
        limit: int = 100,
    ) -> list[JobRecord]:
        """List the jobs created in [since, until) (of one user, of one chat), newest first."""

    @abc.abstractmethod
    async def list_undelivered(self, limit: int = 200) -> list[JobRecord]:
        """List the undelivered jobs not refunded yet, oldest first (up to `limit`)."""

    @abc.abstractmethod
    async def users_with_overrides(self) -> list[UserRecord]:
        """List the users with a limit of their own or blocked, by user key."""

    @abc.abstractmethod
    async def chats_with_overrides(self) -> list[ChatRecord]:
        """List the chats with a limit of their own or blocked, by chat key."""

    # --- personal API keys (core/store/keys.py: shape, hashing) ------------------------

    @abc.abstractmethod
    async def create_api_key(self, user_key: str, name: str = "") -> tuple[int, str]:
        """Make a key for a user; return its id and its plaintext (shown once, never kept)."""

    @abc.abstractmethod
    async def api_key_user(self, plaintext: str) -> str | None:
        """Return the user_key of an active key, or None (unknown, malformed or revoked).

        A revocation counts from the next call (no cache). `last_used_at` is written at
        most once a minute per key and process (`keys.TOUCH_EVERY_S`), not per call.
        """

    @abc.abstractmethod
    async def list_api_keys(self, user_key: str | None = None) -> list[ApiKeyRecord]:
        """List the keys (of one user), oldest first, revoked ones included."""

    @abc.abstractmethod
    async def revoke_api_key(self, key_id: int) -> bool:
        """Revoke a key; False when there is no such active key."""

    # --- the web door: page sessions and kept result files (core/store/web.py) ---------

    @abc.abstractmethod
    async def open_session(
        self,
        user_key: str,
        how: str,
        seconds: float,
        *,
        display_name: str = "",
        language: str | None = None,
        api_key: str | None = None,
    ) -> str:
        """Open a page session for `seconds`; return its token (only its hash is kept).

        `how` is one of web.SESSION_KINDS; a key session (`api_key`, the plaintext it was
        opened with) keeps the key's hash, never the key. A user's sessions beyond
        web.SESSIONS_PER_USER end, oldest first.
        """

    @abc.abstractmethod
    async def get_session(self, token: str) -> WebSession | None:
        """Return the session of a token while it lives (None: unknown, ended, expired).

        A key session comes back with `key_revoked` once its key is revoked; a live key's
        `last_used_at` is touched as by `api_key_user`.
        """

    @abc.abstractmethod
    async def close_session(self, token: str) -> None:
        """End a session (sign out); an unknown token is ignored."""

    async def new_link_code(self, seconds: float) -> str:
        """Make a one-time sign-in code good for `seconds`; return it (only its hash is kept,
        as a mark: see core/store/web.py)."""
        code = new_token()
        await self.mark_once(link_mark(code), seconds)
        return code

    async def spend_link_code(self, code: str) -> bool:
        """Spend a sign-in code: True once while it is fresh, from any process; then False."""
        if not code:
            return False
        return await self.take_mark(link_mark(code))

    @abc.abstractmethod
    async def keep_files(
        self,
        job_id: int,
        user_key: str,
        files: Sequence[FileToKeep],
        seconds: float,
        cap_bytes: int,
    ) -> None:
        """Keep a job's result images for `seconds`, in their order, for any process to serve.

        Expired files go first; then, while the files kept and these would pass
        `cap_bytes` in all, the oldest kept files go (these are always kept).
        """

    @abc.abstractmethod
    async def kept_file(self, name: str) -> KeptFileData | None:
        """Return a kept image's bytes, or None (unknown or expired)."""

    @abc.abstractmethod
    async def job_files(
        self, job_ids: Sequence[int], user_key: str
    ) -> dict[int, list[KeptFileInfo]]:
        """Return the images still kept of those jobs that are `user_key`'s, each job's in
        order (jobs with none, or another user's, are left out)."""

    # --- kept results: a drawn job's images until delivery (core/results.py) -----------

    @abc.abstractmethod
    async def keep_result(
        self,
        job_id: int,
        images: Sequence[GeneratedImage],
        *,
        revised_prompt: str | None,
        elapsed: float,
        saved_at: datetime | None = None,
    ) -> None:
        """Keep a job's result images (replacing any kept before) in one transaction, so a
        reader finds all of it or none; stamped `saved_at` (default: the store's time).

        Kept until `drop_result`: never dropped to make room, so a drawn job's result is
        there for whichever process delivers it.
        """

    @abc.abstractmethod
    async def kept_result(self, job_id: int) -> KeptResult | None:
        """Return a job's kept result, its images in order; None when none is kept."""

    @abc.abstractmethod
    async def drop_result(self, job_id: int) -> None:
        """Forget a job's kept result, if any."""

    @abc.abstractmethod
    async def kept_results(self) -> list[tuple[int, datetime]]:
        """List the kept results as (job id, when saved), by job id, without their bytes."""

    # --- the @username directory ---------------------------------------------------------

    @abc.abstractmethod
    async def note_username(self, platform: str, username: str, user_key: str) -> None:
        """Record that `@username` (any case) on `platform` is now the user `user_key`."""

    @abc.abstractmethod
    async def find_username(self, platform: str, username: str) -> str | None:
        """Return the user key `@username` (any case) on `platform` was last seen as."""

    # --- prepaid credits (BILLING=prepaid) --------------------------------------------

    @abc.abstractmethod
    async def balance(self, user_key: str) -> float:
        """Return a user's credit balance (open reservations already taken off)."""

    @abc.abstractmethod
    async def grant_credits(self, user_key: str, credits: float, by: str, note: str = "") -> float:
        """Add `credits` (> 0) to a user's balance; return the new balance."""

    @abc.abstractmethod
    async def revoke_credits(
        self, user_key: str, credits: float | None, by: str
    ) -> tuple[float, float]:
        """Take up to `credits` (None: all) off a balance, never below zero, in one atomic
        step; return (what was taken, the new balance)."""

    @abc.abstractmethod
    async def grant_welcome(self, user_key: str, credits: float) -> bool:
        """Give a user the welcome grant, once ever; False when they already had it."""

    @abc.abstractmethod
    async def record_purchase(
        self,
        user_key: str,
        *,
        provider: str,
        charge_id: str,
        provider_charge_id: str,
        pack: str,
        amount: int,
        currency: str,
        credits: float,
    ) -> tuple[PurchaseRecord, bool]:
        """Record a paid pack and add its credits, once per `charge_id` (one transaction).

        Returns the purchase and True; for a charge already recorded (a redelivered
        payment), the recorded purchase and False, and nothing is credited.
        """

    @abc.abstractmethod
    async def get_purchase(self, purchase_id: int) -> PurchaseRecord | None:
        """Return one purchase, or None."""

    @abc.abstractmethod
    async def list_purchases(
        self, user_key: str | None = None, limit: int = 20
    ) -> list[PurchaseRecord]:
        """List purchases (of one user), newest first."""

    @abc.abstractmethod
    async def refund_purchase(self, purchase_id: int, by: str) -> PurchaseRecord:
        """Mark a paid purchase refunded and take its credits off the balance, as far as
        they are unspent (never below zero), in one transaction; return it with
        `refunded_credits`. JobNotFound-like UserError when missing or already refunded."""

    @abc.abstractmethod
    async def purchase_totals(
        self, since: datetime, *, until: datetime | None = None
    ) -> PurchaseTotals:
        """Sum the purchases recorded in [since, until): how many, the stars paid (XTR),
        the credits granted, and of those how many are refunded, their stars and the
        credits the refunds took back (read-only, for the dashboard)."""

    @abc.abstractmethod
    async def prepaid_spend(
        self, since: datetime, *, until: datetime | None = None
    ) -> PrepaidSpend:
        """Sum what the prepaid jobs created in [since, until) spent of the balances: the
        settled ones' count, charge and upstream cost in credits (COALESCE(reported,
        actual)), and what open or unsettled ones hold (read-only, for the dashboard)."""

    # --- copies -----------------------------------------------------------------------

    @abc.abstractmethod
    def snapshot(self) -> AbstractAsyncContextManager[SnapshotReader]:
        """Open one consistent read snapshot of the whole store (writers go on meanwhile)."""

    @abc.abstractmethod
    async def is_empty(self) -> bool:
        """Say whether the store holds none of the copied tables' rows (a copy's target must)."""

    @abc.abstractmethod
    async def load_rows(self, table: str, rows: Sequence[dict[str, Any]]) -> None:
        """Insert raw rows read by a SnapshotReader, keeping ids; totals follow by themselves."""


async def iterate_rows(
    reader: SnapshotReader, table: str, key: str, *, batch: int = 1000
) -> AsyncIterator[list[dict[str, Any]]]:
    """Yield a table's rows in pages, in key order."""
    after: Any = None
    while True:
        page = await reader.rows(table, after=after, limit=batch)
        if not page:
            return
        yield page
        after = page[-1][key]
