"""Moving a whole ledger from one store to another (`imgbot db copy`, PostgreSQL backups).

The source is read from one consistent snapshot while its bot may go on writing; the target
must be empty. Rows keep their ids (job ids live on in buttons and admin commands, key ids
in `imgbot keys revoke`); personal API keys move as their hashes, so every key still works
and stays revoked if it was. The target's own triggers rebuild the running totals. The
kept results of the jobs still waiting to be delivered travel too, a few at a time (each
may be tens of megabytes), so such a job is delivered from the copy; other kept results
stay behind (see `interface.COPY_TABLES`). Afterwards the row counts (users, API keys,
chats, jobs, results to deliver) and every user's total are compared between the snapshot
and the target, and the report says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from core.store.interface import COPY_TABLES, SnapshotReader, Store, StoreError, iterate_rows

# Credits are floats: sums taken in another order may differ in the last bits.
_TOLERANCE = 1e-6
# Kept results read per page: a result may be several images of megabytes each.
RESULTS_PER_PAGE = 4


@dataclass(frozen=True)
class CopyReport:
    """What a copy moved, and whether the target matches the snapshot it came from."""

    counts: dict[str, int]
    users_compared: int
    mismatches: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Say whether every count and every user's total matched."""
        return not self.mismatches

    def summary(self) -> str:
        """Return one line for the operator."""
        moved = ", ".join(f"{count} {table}" for table, count in self.counts.items())
        if self.ok:
            return f"copied {moved}; row counts and {self.users_compared} users' totals match"
        return f"copied {moved}; MISMATCH: " + "; ".join(self.mismatches[:5])


async def copy_store(source: Store, target: Store, *, batch: int = 1000) -> CopyReport:
    """Copy every user, API key, chat and job of `source` (and the results its drawn jobs
    wait to deliver) into the empty `target`, then verify."""
    if not await target.is_empty():
        raise StoreError(f"{target.describe()} already holds a ledger; copy only into an empty one")
    async with source.snapshot() as reader:
        counts = await reader.counts()
        totals = await reader.user_totals()
        for table, key in COPY_TABLES:
            async for page in iterate_rows(reader, table, key, batch=batch):
                await target.load_rows(table, page)
        await _copy_results_to_deliver(reader, target)
    async with target.snapshot() as check:
        copied = await check.counts()
        copied_totals = await check.user_totals()
    mismatches = [
        f"{table}: {counts[table]} in the source, {copied.get(table, 0)} copied"
        for table in counts
        if counts[table] != copied.get(table, 0)
    ]
    for user, total in sorted(totals.items()):
        there = copied_totals.get(user)
        if there is None or not math.isclose(total, there, rel_tol=1e-12, abs_tol=_TOLERANCE):
            mismatches.append(f"{user}: {total} in the source, {there} copied")
    return CopyReport(counts, len(totals), tuple(mismatches))


async def _copy_results_to_deliver(reader: SnapshotReader, target: Store) -> None:
    """Copy the kept results of the drawn jobs, as they were saved."""
    after = 0
    while page := await reader.results_to_deliver(after=after, limit=RESULTS_PER_PAGE):
        for result in page:
            await target.keep_result(
                result.job_id, result.images, revised_prompt=result.revised_prompt,
                elapsed=result.elapsed, saved_at=result.saved_at,
            )
        after = page[-1].job_id
