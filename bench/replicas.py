"""The replica benchmark (issue 14): jobs/s with 1, 2 and 3 `imgbot run` processes behind one
Telegram webhook on one PostgreSQL, and how long a replica killed with SIGKILL leaves its jobs
waiting before another delivers them.

Real: the `imgbot run` processes (Telegram webhook mode, `tests/replica_kit.py`), the
round-robin forwarder in front of them (the operator's reverse proxy in miniature) and a
durable PostgreSQL server (fsync on, as in production; started by `bench.run`). Fake, on
127.0.0.1, in this process: the Bot API (`tests/fake_botapi.py`, without flood rules: the
bot keeps Telegram's limits itself, and a refusal would only add its retry wait to the
numbers) and the image API (`tests/fake_api.py`, every call answered after the same fixed
delay, small flat-colour PNGs, so the bot's own work per job is what the processes spend).

The load is people, not a firehose: `users` users in private chats, each sending `/img`,
waiting for the photo, and sending the next, `jobs_per_user` times (each update POSTed with
the webhook's secret header, sent again until some replica answers 2xx, as Telegram does).
A person never has two jobs open, so a dead replica's open jobs belong to as many people,
each waiting for one job: that is what "JOB_LEASE + one job" promises them.

Jobs/s run from the first update POSTed to the last job `delivered` in the ledger (its
`delivered_at`). Beside it: the most image calls the fake API answered at once (what
MAX_JOBS_IN_FLIGHT caps), where a job's time went (POSTed → reserved → started → drawn →
delivered, from the ledger's times), each process's CPU time, and every job checked
delivered (none lost, none twice in the ledger). Workloads: `WORKLOADS`; `MAX_JOBS_IN_FLIGHT` and `MAX_JOBS_PER_USER` hold
for the whole fleet (the ledger counts every process's drawing jobs), so one of them keeps
the cap at 4 to show that, and the others raise it to the user count so it never binds.

Takeover (`TAKEOVER`): 3 replicas under that load; replica 0 gets SIGKILL once `kill_at` of
the jobs are delivered. Its jobs are the open ones (queued, drawing, drawn) right after the
kill that the ledger shows leased to it (`lease_owner` holds its pid), and the open ones
with no lease yet whose update it accepted (a job is leased at its owner's next renewal,
every third of JOB_LEASE, so a young job has none; a dead replica's such jobs are taken
over once they are JOB_LEASE old). The time reported runs from the kill to the last of
them delivered by another replica; the target is JOB_LEASE plus one job (the median time
from start to delivery of the run's other jobs). Beside it, the time to the answer of the
last request in flight at the kill (updates the dead replica had accepted but not yet
turned into jobs included: another replica takes those over too).
"""

from __future__ import annotations

import json
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

# Open jobs: what a dead replica can leave behind.
OPEN_STAGES = ("queued", "drawing", "drawn")
# Methods a result goes out with, as a reply to the command (a photo, or a document for a
# large file). PREVIEWS is off in the replicas, so no status photo is replaced in place.
RESULT_METHODS = ("sendPhoto", "sendDocument")


@dataclass(frozen=True)
class FleetPlan:
    """One workload and the replicas' settings for it (the same for every N)."""

    users: int = 40
    jobs_per_user: int = 3
    delay: float = 1.0  # seconds the fake image API takes for every image
    max_in_flight: int = 40  # MAX_JOBS_IN_FLIGHT, a cap for the whole fleet
    lease: float = 5.0  # JOB_LEASE
    runs: int = 3  # rounds of 1, 2 and 3 replicas; or, with `kill_at`, runs with a kill
    kill_at: float = 0.0  # > 0: kill replica 0 once this share of the jobs is delivered
    replicas: tuple[int, ...] = (1, 2, 3)

    @property
    def jobs(self) -> int:
        """Jobs in one run."""
        return self.users * self.jobs_per_user

    def describe(self) -> dict[str, Any]:
        """Return the plan as the report shows it."""
        return {"users": self.users, "jobs_per_user": self.jobs_per_user, "jobs": self.jobs,
                "upstream_delay_s": self.delay, "max_jobs_in_flight": self.max_in_flight,
                "max_jobs_per_user": 1, "job_lease_s": self.lease, "runs": self.runs,
                **({"kill_at": self.kill_at} if self.kill_at else {})}


# The workloads. Every user waits for a picture before asking again (MAX_JOBS_PER_USER 1).
# "upstream 1 s": MAX_JOBS_IN_FLIGHT at the user count, so the setting never binds and what
# the fleet can do shows. "upstream 3 s": the same, slower than the N-second spacing the
# replicas keep per chat. "cap 4": MAX_JOBS_IN_FLIGHT 4, which holds for the whole fleet.
WORKLOADS = {
    "upstream 1 s": FleetPlan(delay=1.0),
    "upstream 3 s": FleetPlan(delay=3.0, runs=2),
    "cap 4, upstream 1 s": FleetPlan(users=20, delay=1.0, max_in_flight=4, runs=2),
}
# The takeover: 3 replicas under the first workload's load, twice as long, one killed.
TAKEOVER = FleetPlan(jobs_per_user=6, delay=1.0, runs=3, kill_at=0.35, replicas=(3,))


def as_time(value: str | None) -> float | None:
    """Return a ledger timestamp (UTC ISO text) as seconds since the epoch."""
    return None if not value else datetime.fromisoformat(value).timestamp()


class Ledger:
    """Plain reads of the fleet's PostgreSQL database (not through the store: the bench must
    not take part in what it measures)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
        """Run one read in a fresh connection and loop; return its rows."""
        import asyncio

        import asyncpg

        async def read() -> list[dict[str, Any]]:
            conn = await asyncpg.connect(self.url)
            try:
                return [dict(row) for row in await conn.fetch(query, *args)]
            finally:
                await conn.close()

        return asyncio.run(read())

    def jobs(self) -> list[dict[str, Any]]:
        """Return every job with its stage, owner and times."""
        return self.fetch(
            "SELECT id, command_text, status, stage, attempts, lease_owner, created_at,"
            " started_at, finished_at, delivered_at FROM jobs ORDER BY id"
        )

    def owners(self) -> list[str]:
        """Return the owners of the live replicas' heartbeats."""
        rows = self.fetch("SELECT owner FROM named_leases WHERE name LIKE 'replica:%'")
        return [row["owner"] for row in rows]


def counting_image_api() -> Any:
    """Return the fake image API (`tests.fake_api.FakeImageAPI`) counting the calls it is
    answering at once: what MAX_JOBS_IN_FLIGHT caps. (The ledger cannot show it exactly: a
    process frees a job's place when the image is in, and the settle that ends its
    `drawing` stage commits a moment later.)"""
    from tests.conftest import TEST_KEY
    from tests.fake_api import FakeImageAPI

    class CountingImageAPI(FakeImageAPI):
        """FakeImageAPI with a count of the calls inside their fixed delay."""

        def __init__(self) -> None:
            super().__init__(key=TEST_KEY)
            self.answering = 0
            self.peak = 0
            self._count = threading.Lock()

        def _wait(self, seconds: float) -> bool:
            with self._count:
                self.answering += 1
                self.peak = max(self.peak, self.answering)
            try:
                return super()._wait(seconds)
            finally:
                with self._count:
                    self.answering -= 1

    return CountingImageAPI()


class Answers:
    """Watches the fake Bot API for results and tells each waiting user when theirs came.

    A result goes to the user's chat as a reply to their command, so the reply's message id
    says which request it answers; a repeat (a result sent twice) is counted, not mistaken
    for the next one's.
    """

    def __init__(self, tg: Any) -> None:
        self._tg = tg
        self._seen = 0
        self.at: dict[int, float] = {}  # message id of the command → first answer (time.time)
        self.repeats: dict[int, int] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bench-answers", daemon=True)

    def _watch(self) -> None:
        # Only the calls since the last look (the list only grows): scanning all of them
        # every 10 ms would cost this process more CPU than the replicas spend.
        while not self._stop.wait(0.01):
            fresh = self._tg.calls[self._seen:]
            if not fresh:
                continue
            self._seen += len(fresh)
            now = time.time()
            with self._cond:
                for call in fresh:
                    if call.method not in RESULT_METHODS or call.status != 200:
                        continue
                    answered = reply_target(call.params)
                    if answered is None:
                        continue
                    if answered in self.at:
                        self.repeats[answered] = self.repeats.get(answered, 0) + 1
                    else:
                        self.at[answered] = now
                self._cond.notify_all()

    def wait(self, message_id: int, within: float) -> float | None:
        """Wait for the answer to a command; return when it came, None after `within`."""
        deadline = time.monotonic() + within
        with self._cond:
            while message_id not in self.at:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self.at[message_id]

    def __enter__(self) -> Answers:
        self._seen = len(self._tg.calls)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def reply_target(params: dict[str, Any]) -> int | None:
    """Return the message id a Bot API call replies to, if any."""
    raw = params.get("reply_parameters")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return None
    if isinstance(raw, dict) and isinstance(raw.get("message_id"), int):
        return int(raw["message_id"])
    old = params.get("reply_to_message_id")
    return int(old) if isinstance(old, int | str) and str(old).isdigit() else None


@dataclass
class Request:
    """One /img as a user sent it: when it was first POSTed, when its photo came."""

    user: int
    number: int
    message_id: int
    update: dict[str, Any]
    posted: float = 0.0
    answered: float | None = None


def forwarder(ports: list[int]) -> Any:
    """Return the tests' round-robin forwarder (`tests.replica_kit.RoundRobin`), sending
    through one pooled HTTP client: a fresh client per update (`httpx.post`) costs ~20 ms
    of this process's CPU, as much as a replica spends on the job."""
    from tests.replica_kit import RoundRobin

    class PooledRoundRobin(RoundRobin):
        """RoundRobin with keep-alive connections to the replicas, as a proxy keeps them."""

        def __init__(self, ports: list[int]) -> None:
            super().__init__(ports)
            self.http = httpx.Client(timeout=10)
            # update_id → the replicas that answered it 2xx (and so keep it and run it).
            self.accepted: dict[int, set[int]] = {}

        def forward(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
            """Send to the next replica that answers (a dead one is skipped)."""
            passed = {k: v for k, v in headers.items()
                      if k.lower().startswith(("content-type", "x-telegram"))}
            for _ in range(len(self.ports)):
                with self._lock:
                    port = self.ports[next(self._turn) % len(self.ports)]
                try:
                    answer = self.http.post(f"http://127.0.0.1:{port}{path}", content=body,
                                            headers=passed)
                except httpx.HTTPError:
                    continue  # that replica is down: the next one
                with self._lock:
                    self.sent[port] += 1
                    if answer.status_code // 100 == 2:
                        update = json.loads(body).get("update_id")
                        self.accepted.setdefault(update, set()).add(port)
                return answer.status_code, answer.content
            return 502, b"no replica answered"

        def close(self) -> None:
            super().close()
            self.http.close()

    return PooledRoundRobin(ports)


class Fleet:
    """N `imgbot run` replicas in webhook mode behind one round-robin forwarder, on one fresh
    database; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, tg: Any, images: Any, url: str, folder: Path, n: int,
                 plan: FleetPlan) -> None:
        self.tg, self.images, self.url, self.folder, self.n = tg, images, url, folder, n
        self.plan = plan
        self.proxy = forwarder([])
        self.http = httpx.Client(timeout=15)  # Telegram's side: one pool for every update
        self.hook = f"{self.proxy.url}/tg/hook"
        self.bots: list[Any] = []
        self.headers: dict[str, str] = {}

    def __enter__(self) -> Fleet:
        from bots.telegram.app import webhook_secret
        from core.config import Settings
        from tests.replica_kit import start_replica
        from tests.telegram_fake import TOKEN

        try:
            hooks_before = len(self.tg.of("setWebhook"))
            for i in range(self.n):
                self.bots.append(start_replica(
                    self.folder, self.tg, self.images, self.url, self.hook, i,
                    MAX_JOBS_IN_FLIGHT=str(self.plan.max_in_flight),
                    MAX_JOBS_PER_USER="1",
                    JOB_LEASE=str(self.plan.lease),
                ))
            self.proxy.ports = [bot.port for bot in self.bots]
            self._wait(lambda: len(self.tg.of("setWebhook")) >= hooks_before + self.n, 60,
                       "every replica to set its webhook")
            self._wait(self._all_listening, 30, "every replica's webhook server")
            if self.n > 1:  # each must count the others before it shares caps and flood budget
                line = f"{self.n} imgbot process(es) share this ledger"
                self._wait(lambda: all(line in bot.output() for bot in self.bots), 60,
                           "every replica to see the others")
        except BaseException:
            self.__exit__()
            raise
        settings = Settings(_env_file=None, telegram_bot_token=TOKEN)  # type: ignore[call-arg]
        self.headers = {"X-Telegram-Bot-Api-Secret-Token": webhook_secret(settings),
                        "Content-Type": "application/json"}
        return self

    def _wait(self, check: Any, within: float, what: str) -> None:
        deadline = time.monotonic() + within
        while not check():
            for bot in self.bots:
                if bot.proc.poll() is not None:
                    raise RuntimeError(f"a replica exited while starting:\n{bot.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"gave up waiting for {what}")
            time.sleep(0.05)

    def _all_listening(self) -> bool:
        import socket

        for bot in self.bots:
            try:
                with socket.create_connection(("127.0.0.1", bot.port), timeout=0.2):
                    pass
            except OSError:
                return False
        return True

    def post(self, update: dict[str, Any], port: int | None = None) -> bool:
        """POST an update as Telegram does: again until some replica answers 2xx."""
        target = self.hook if port is None else f"http://127.0.0.1:{port}/tg/hook"
        body = json.dumps(update)
        for _ in range(120):
            try:
                answer = self.http.post(target, content=body, headers=self.headers)
            except httpx.HTTPError:
                time.sleep(0.1)
                continue
            if answer.status_code // 100 == 2:
                return True
            time.sleep(0.25)
        return False

    def cpu_seconds(self) -> dict[int, float]:
        """Return the CPU time (user + system) each live replica has used so far, by index."""
        import psutil

        used: dict[int, float] = {}
        for i, bot in enumerate(self.bots):
            if bot.proc.poll() is None:
                times = psutil.Process(bot.proc.pid).cpu_times()
                used[i] = float(times.user + times.system)
        return used

    def __exit__(self, *exc: object) -> None:
        import subprocess

        for bot in self.bots:
            if bot.proc.poll() is None:
                bot.proc.send_signal(signal.SIGTERM)
        for bot in self.bots:
            try:
                bot.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                bot.proc.kill()
                bot.proc.wait()
        self.proxy.close()
        self.http.close()


def median(values: list[float]) -> float | None:
    """Return the median, or None of nothing."""
    return round(statistics.median(values), 3) if values else None


@contextmanager
def cpu_of_bench() -> Iterator[dict[str, float]]:
    """Measure the CPU time of this process (the fakes, the forwarder, the users)."""
    import psutil

    me = psutil.Process()
    box: dict[str, float] = {}
    before = me.cpu_times()
    try:
        yield box
    finally:
        after = me.cpu_times()
        box["seconds"] = round(after.user + after.system - before.user - before.system, 2)


def fleet_run(
    images: Any, server: Any, tmp: Path, n: int, plan: FleetPlan, label: str
) -> dict[str, Any]:
    """Run the workload once on `n` fresh replicas, a fresh database and a fresh fake Bot
    API (killing replica 0 mid-load if the plan says so)."""
    from tests.fake_botapi import FakeBotApiServer
    from tests.telegram_fake import TOKEN

    # Without flood rules: the bot keeps Telegram's limits itself.
    with FakeBotApiServer(TOKEN) as tg:
        return _fleet_run(tg, images, server, tmp, n, plan, label)


def _fleet_run(
    tg: Any, images: Any, server: Any, tmp: Path, n: int, plan: FleetPlan, label: str
) -> dict[str, Any]:
    import os

    from tests.telegram_fake import Updates

    kill = plan.kill_at > 0
    url = server.create_database()
    ledger = Ledger(url)
    folder = tmp / label
    folder.mkdir(mode=0o700)
    u = Updates()
    out: dict[str, Any] = {"replicas": n, "load_before": [round(x, 2) for x in os.getloadavg()]}
    with Fleet(tg, images, url, folder, n, plan) as fleet, Answers(tg) as answers:
        # One job on each replica first: imports, pools and the ledger's pages warm.
        warm = []
        for i, bot in enumerate(fleet.bots):
            user = Updates.user(690_000 + i, f"W{i}")
            update = u.update(u.message(user, u.private(user), text=f"/img low warm {i}"))
            if not fleet.post(update, port=bot.port):
                raise RuntimeError(f"replica {i} did not take the warm-up update")
            warm.append(update["message"]["message_id"])
        if any(answers.wait(mid, 60) is None for mid in warm):
            raise RuntimeError("a warm-up job got no answer")

        people = [Updates.user(700_000 + i, f"U{i}") for i in range(plan.users)]
        requests: list[list[Request]] = []
        for i, person in enumerate(people):
            mine = []
            for k in range(plan.jobs_per_user):
                update = u.update(u.message(person, u.private(person),
                                            text=f"/img low load u{i} n{k}"))
                mine.append(Request(i, k, update["message"]["message_id"], update))
            requests.append(mine)
        every = [r for mine in requests for r in mine]
        failures: list[str] = []

        def person(mine: list[Request]) -> None:
            """Ask, wait for the photo, ask again."""
            for request in mine:
                request.posted = time.time()
                if not fleet.post(request.update):
                    failures.append(f"update of u{request.user} n{request.number} refused")
                    return
                request.answered = answers.wait(request.message_id, 240)
                if request.answered is None:
                    failures.append(f"no answer to u{request.user} n{request.number}")
                    return

        victim_owner = ""
        if kill:
            pid = f":{fleet.bots[0].proc.pid}:"
            victim_owner = next(o for o in ledger.owners() if pid in o)
        cpu_before = fleet.cpu_seconds()
        threads = [threading.Thread(target=person, args=(mine,), daemon=True)
                   for mine in requests]
        images.peak = 0
        with cpu_of_bench() as bench_cpu:
            for thread in threads:
                thread.start()
            if kill:
                out["takeover"] = kill_one(fleet, ledger, answers, every, victim_owner,
                                           round(plan.kill_at * plan.jobs), threads)
            for thread in threads:
                thread.join()
        cpu_after = fleet.cpu_seconds()
        sent = dict(fleet.proxy.sent)
        ports = [bot.port for bot in fleet.bots]
        # The photo reaches Telegram a moment before its replica records the delivery.
        deadline = time.monotonic() + 30
        while True:
            rows = [row for row in ledger.jobs() if " load " in row["command_text"]]
            if failures or time.monotonic() > deadline or (
                len(rows) == plan.jobs and all(r["stage"] == "delivered" for r in rows)
            ):
                break
            time.sleep(0.1)
        if failures:
            raise RuntimeError(f"replicas run {label}: {failures[:5]}\n"
                               + explain(failures, rows, tg, requests, fleet.bots))
    return out | summarise(rows, every, answers, plan, cpu_before, cpu_after,
                           [sent.get(port, 0) for port in ports], bench_cpu["seconds"],
                           out.get("takeover"), images.peak)


def explain(failures: list[str], rows: list[dict[str, Any]], tg: Any,
            requests: list[list[Request]], bots: list[Any]) -> str:
    """Say what the ledger and the fake Bot API know of the requests that got no answer."""
    lines = []
    for failure in failures[:5]:
        user, number = failure.split()[-2:]
        job = next((row for row in rows if row["command_text"].endswith(f"{user} {number}")),
                   None)
        request = requests[int(user[1:])][int(number[1:])]
        chat = 700_000 + request.user
        calls = [(c.method, c.status, reply_target(c.params)) for c in tg.calls
                 if c.chat_id == chat]
        lines.append(f"{failure}: message {request.message_id}; job {job}; calls {calls}")
        if job is not None:
            said = [line for bot in bots for line in bot.output().splitlines()
                    if f"job {job['id']}" in line or f"#{job['id']}" in line]
            lines.append("  its replicas' log lines: " + " | ".join(said[-20:]))
    for i, bot in enumerate(bots):
        lines.append(f"  replica {i} log, last lines: " + " | ".join(
            bot.output().splitlines()[-15:]))
    return "\n".join(lines)


def kill_one(
    fleet: Fleet, ledger: Ledger, answers: Answers, every: list[Request], owner: str,
    after: int, threads: list[threading.Thread],
) -> dict[str, Any]:
    """SIGKILL replica 0 once `after` results are in; return the jobs it left open.

    Its jobs are the open ones leased to it, and the open ones not leased yet whose update
    it accepted: a job gets its lease at its owner's next renewal (every third of
    JOB_LEASE), so a job younger than that has none, and a dead replica's such jobs are
    taken over once they are JOB_LEASE old.
    """
    while sum(r.message_id in answers.at for r in every) < after:
        if not any(thread.is_alive() for thread in threads):
            raise RuntimeError("the load ended before the kill")
        time.sleep(0.01)
    victim = fleet.bots[0]
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    killed_at = time.time()
    rows = ledger.fetch(
        "SELECT id, command_text, stage, lease_owner FROM jobs"
        " WHERE stage = ANY($1::text[]) AND command_text LIKE '% load %'", list(OPEN_STAGES),
    )
    by_text = {f"u{r.user} n{r.number}": r for r in every}
    accepted = fleet.proxy.accepted
    left: dict[int, str] = {}
    unleased = 0
    for row in rows:
        update = by_text[" ".join(row["command_text"].split()[-2:])].update["update_id"]
        if row["lease_owner"] == owner:
            left[row["id"]] = row["stage"]
        elif row["lease_owner"] is None and accepted.get(update) == {victim.port}:
            left[row["id"]] = row["stage"]
            unleased += 1
    return {"killed_at": killed_at, "owner_jobs": left, "not_leased_yet": unleased}


def summarise(
    rows: list[dict[str, Any]], every: list[Request], answers: Answers, plan: FleetPlan,
    cpu_before: dict[int, float], cpu_after: dict[int, float], sent: list[int],
    bench_cpu: float, takeover: dict[str, Any] | None, drawing_peak: int,
) -> dict[str, Any]:
    """Turn one run's ledger rows and answer times into its numbers, checking every job."""
    stages: dict[str, int] = {}
    for row in rows:
        stages[row["stage"]] = stages.get(row["stage"], 0) + 1
    if len(rows) != plan.jobs or stages != {"delivered": plan.jobs}:
        raise RuntimeError(f"not every job delivered once: {len(rows)} jobs, {stages}")
    first = min(r.posted for r in every)
    delivered = {row["id"]: as_time(row["delivered_at"]) or 0.0 for row in rows}
    last = max(delivered.values())
    window = last - first
    one_job = [delivered[row["id"]] - (as_time(row["started_at"]) or 0.0) for row in rows]
    waited = [r.answered - r.posted for r in every if r.answered is not None]
    cpu = {i: round(cpu_after[i] - cpu_before[i], 2) for i in cpu_after if i in cpu_before}
    by_text = {f"u{r.user} n{r.number}": r for r in every}
    phases: dict[str, list[float]] = {
        "posted_to_reserved": [], "reserved_to_started": [], "drawing": [],
        "drawn_to_delivered": [], "delivered_to_seen": [],
    }
    for row in rows:
        request = by_text[" ".join(row["command_text"].split()[-2:])]
        moments = [request.posted, *(as_time(row[k]) or 0.0 for k in (
            "created_at", "started_at", "finished_at", "delivered_at")), request.answered or 0]
        for name, a, b in zip(phases, moments, moments[1:], strict=False):
            phases[name].append(b - a)
    out: dict[str, Any] = {
        "jobs": len(rows),
        "seconds": round(window, 3),
        "jobs_per_s": round(len(rows) / window, 2),
        "max_drawing_at_once": drawing_peak,  # upstream calls answered at once, most
        "one_job_s": median(one_job),
        "answer_s": median(waited),
        "answer_p90_s": round(statistics.quantiles(waited, n=10)[-1], 3),
        # Where a job's time goes: median and p90 of each step, in seconds.
        "phases_s": {name: [median(v), round(statistics.quantiles(v, n=10)[-1], 3)]
                     for name, v in phases.items()},
        "updates_per_replica": sent,
        "replica_cpu_s": cpu,
        "replica_cpu_per_s": {i: round(c / window, 2) for i, c in cpu.items()},
        "bench_cpu_per_s": round(bench_cpu / window, 2),
        "redrawn": sum(1 for row in rows if (row["attempts"] or 0) > 1),
        "results_sent_twice": sum(answers.repeats.get(r.message_id, 0) for r in every),
    }
    if takeover is None:
        return out
    killed_at = takeover["killed_at"]
    owned = takeover["owner_jobs"]
    left = {stage: sum(1 for s in owned.values() if s == stage) for stage in OPEN_STAGES}
    others = [t for job_id, t in zip(delivered, one_job, strict=True) if job_id not in owned]
    after = [r.answered - killed_at for r in every
             if r.posted < killed_at and r.answered is not None and r.answered > killed_at]
    out["takeover"] = {
        "killed_after_s": round(killed_at - first, 3),
        "its_open_jobs": left,
        "of_them_not_leased_yet": takeover["not_leased_yet"],
        "seconds_to_last": round(max((delivered[j] for j in owned), default=killed_at)
                                 - killed_at, 3),
        "each_s": sorted(round(delivered[j] - killed_at, 2) for j in owned),
        "redrawn": sum(1 for row in rows if row["id"] in owned and (row["attempts"] or 0) > 1),
        "one_job_s": median(others),
        "lease_s": plan.lease,
        "in_flight_at_kill_last_answer_s": round(max(after), 3) if after else None,
    }
    out["takeover"]["target_s"] = round(plan.lease + (out["takeover"]["one_job_s"] or 0), 3)
    return out


def measure(server: Any, tmp: Path, rounds: int | None = None) -> dict[str, Any]:
    """Run every workload in rounds of 1, 2 and 3 replicas (interleaved, so drift and the
    neighbours' load hit all alike), then the takeover runs; medians and ranges.

    `rounds` overrides each plan's run count (the bench's --quick: 1).
    """
    out: dict[str, Any] = {}
    with counting_image_api() as images:
        for name, plan in [*WORKLOADS.items(), ("takeover", TAKEOVER)]:
            images.reset()
            images.inject("slow", times=10**7, seconds=plan.delay)
            done: dict[int, list[dict[str, Any]]] = {n: [] for n in plan.replicas}
            failed: list[dict[str, Any]] = []
            for rnd in range(rounds or plan.runs):
                for n in plan.replicas:
                    label = f"{name.replace(' ', '_').replace(',', '')}-r{rnd}-n{n}"
                    try:
                        row = fleet_run(images, server, tmp, n, plan, label)
                    except RuntimeError as err:
                        # A job lost or stuck is a finding, not a number: kept with what
                        # the ledger, the fake Bot API and the logs said, and the run left
                        # out of the medians (the target "every job delivered" fails).
                        failed.append({"replicas": n, "round": rnd + 1, "error": str(err)})
                        print(f"  {name}, {n} replicas, run {rnd + 1}: FAILED {err}",
                              flush=True, file=sys.stderr)
                        continue
                    done[n].append(row | {"round": rnd + 1})
                    said = (f"last of its jobs {row['takeover']['seconds_to_last']} s after"
                            if "takeover" in row else f"{row['jobs_per_s']} jobs/s")
                    print(f"  {name}, {n} replicas, run {rnd + 1}: {said}", flush=True,
                          file=sys.stderr)
            out[name] = report(plan, done) | {"failed_runs": failed}
    return out


def spread(values: list[float]) -> dict[str, Any]:
    """Return the median and the range of some runs' values."""
    return {"median": round(statistics.median(values), 3), "min": min(values),
            "max": max(values), "runs": values}


def report(plan: FleetPlan, runs: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """Collect one workload's runs: per N the median jobs/s and its range, the 3/1 ratio;
    for the takeover, the time to the last of the dead replica's jobs against the target."""
    out: dict[str, Any] = {"plan": plan.describe()}
    for n, done in runs.items():
        if not done:
            continue
        out[f"{n} replicas"] = {
            "jobs_per_s": spread([r["jobs_per_s"] for r in done]),
            "answer_s": spread([r["answer_s"] for r in done]),
            "one_job_s": spread([r["one_job_s"] for r in done]),
            "max_drawing_at_once": max(r["max_drawing_at_once"] for r in done),
            "replica_cpu_per_s": spread([round(sum(r["replica_cpu_per_s"].values()), 2)
                                         for r in done]),
            "each_run": done,
        }
    if runs.get(1) and runs.get(3):
        one = {r["round"]: r["jobs_per_s"] for r in runs[1]}
        pairs = [r["jobs_per_s"] / one[r["round"]] for r in runs[3] if r["round"] in one]
        out["ratio_3_to_1"] = {
            "of_medians": round(out["3 replicas"]["jobs_per_s"]["median"]
                                / out["1 replicas"]["jobs_per_s"]["median"], 3),
            "per_round": [round(p, 3) for p in pairs],
        }
    taken = [r["takeover"] for done in runs.values() for r in done if "takeover" in r]
    if taken:
        out["takeover"] = {
            "seconds_to_last": spread([t["seconds_to_last"] for t in taken]),
            "target_s": spread([t["target_s"] for t in taken]),
            "in_flight_at_kill_last_answer_s": spread(
                [t["in_flight_at_kill_last_answer_s"] or 0.0 for t in taken]),
            "met_every_run": all(t["seconds_to_last"] <= t["target_s"] for t in taken),
        }
    return out
