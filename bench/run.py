"""The imgbot benchmark: what the bot adds on top of the upstream, and how it scales.

Run from the repository root (needs the `bench` extra: `pip install -e '.[bench]'`):

    .venv/bin/python -m bench.run            # about 2-3 minutes on 2 cores
    .venv/bin/python -m bench.run --quick    # fewer repetitions, for a smoke run

Everything runs against the fake image API (`bench/upstream.py`, photo-sized payloads) on
127.0.0.1 in a child process, upstream delay 0, with a real SQLite ledger in a temp dir.
It prints a table and writes `bench/results.json` (machine, versions, every number, and
which targets were met). Scenarios:

1. overhead   one job the durable way a front end runs it — JobRunner.run with a minimal
              in-memory Reply: access → reserve (queued) → start (drawing) → call → decode →
              the result kept (KEEP_RESULTS=auto: DATA_DIR/results/<id>/ on SQLite, the
              ledger on PostgreSQL) before the settle commits
              (drawn) → spend report → Reply.result → finish_delivery (delivered, with the
              file refs) — vs a bare httpx POST of the same request reading the same body
              (url mode: + the GET of the image), 1024x1024 and 3840x2160, b64_json with a
              data: prefix and url, on SQLite and on a durable PostgreSQL server (fsync on);
              interleaved, medians; every timed job is checked `delivered` with its result
              kept afterwards.
2. sdk        ImageClient.draw vs openai's AsyncOpenAI.images.generate + b64decode.
3+4. burst    50 jobs of 3840x2160 from 50 users at once through the pipeline, in a fresh
              child process: loop stalls seen by a 1 ms ticker, and peak RSS (VmHWM) vs the
              answers' bytes.
5. ledger     reserve+settle pairs per second, 100 concurrent tasks, 1 / 10 / 100 users:
              SQLite; PostgreSQL from one process on a throwaway durable server (fsync,
              synchronous_commit, full_page_writes on) and on the tests' fast settings;
              then 3 processes at once on one database, against a user daily limit the
              three together try to exceed, checked for overspend. PostgreSQL needs the
              server binaries and pytest (tests/pg_server.py): `pip install -e '.[test,bench]'`.
6. throughput jobs/s through the same durable path (1024x1024) with 1 / 10 / 100
              concurrent users, on SQLite and on the durable PostgreSQL server, next to bare
              httpx at the same concurrency (run right after each).
7. stream     previews: the server-sent-event reader against the JSON reader on the same
              4K answer (64 KiB reads, each decoding its base64 on the way in), and with a
              10 s upstream and 3 previews (25/50/75 %), the time to the first preview
              against the time to the result, through ImageClient.draw.
8. relay      what imgbot adds as an OpenAI-compatible relay: the official SDK
              (AsyncOpenAI.images.generate) against imgbot's /v1 (its web door in a child
              process, a personal key, SQLite, relaying to the fake upstream) vs the same
              SDK call straight at the fake upstream; 1024x1024 and 3840x2160, b64_json
              (+ b64decode) and url (+ the GET of the image); interleaved, medians; the
              relay process's CPU time per call beside it.
9. replicas   jobs/s with 1, 2 and 3 real `imgbot run` processes in Telegram webhook mode
              behind a round-robin forwarder, on the durable PostgreSQL server, the fake
              image API answering after a fixed delay, users in private chats each asking
              again when their photo came; the 3/1 ratio; then kill -9 of one of 3 under
              that load and the time to the last of its jobs delivered by another, against
              JOB_LEASE + one job (bench/replicas.py; ~10 min, not in the default run's
              2-3 minutes: select it with --only replicas).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import json
import os
import platform
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/run.py` as well as `python -m bench.run`
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.upstream import KEY, UpstreamProcess  # noqa: E402
from core.config import Settings  # noqa: E402
from core.images import ImageClient, api_root  # noqa: E402
from core.pricing import Usage  # noqa: E402
from core.prompt import ImageRequest, PromptDefaults, parse_command  # noqa: E402
from core.requester import Requester  # noqa: E402
from core.runner import JobRunner  # noqa: E402
from core.runtime import make_http_client, open_service  # noqa: E402
from core.service import ImageService  # noqa: E402
from core.store import JobSpec, JobStage, Limits, Store, open_store  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, photorealistic, warm light"
TEXTS = {
    "1024x1024": f"/img 1:1 1K -- {PROMPT}",
    "3840x2160": f"/img 16:9 4K -- {PROMPT}",
}
# Limits high enough never to refuse, but set, so every limit check really runs.
BIG_LIMIT = 1e12
MB = 1024 * 1024


@dataclass(frozen=True)
class Plan:
    """How many repetitions each scenario runs."""

    overhead_1k: int
    overhead_4k: int
    sdk_1k: int
    sdk_4k: int
    burst_jobs: int
    ledger_pairs: int
    ledger_prefill: int
    throughput_jobs: dict[int, int]
    relay_1k: int = 40
    relay_4k: int = 15
    replica_rounds: int | None = None  # None: each replica workload's own run count


FULL = Plan(60, 25, 60, 25, 50, 3000, 10_000, {1: 40, 10: 150, 100: 400}, 40, 15)
QUICK = Plan(10, 5, 10, 5, 50, 600, 10_000, {1: 10, 10: 40, 100: 100}, 8, 4, 1)
# Scenarios run only when named with --only: they take minutes, not seconds.
ON_REQUEST = {"replicas"}


# --- helpers ----------------------------------------------------------------------------


def bench_settings(
    base_url: str, db: Path | str, response_format: str, **extra: Any
) -> Settings:
    """Return settings for the fake upstream, with limits set and queue/rate caps raised.

    `db` is a SQLite file, or a DATABASE_URL (a PostgreSQL database).
    """
    values: dict[str, Any] = {
        "openai_base_url": base_url,
        "openai_api_key": KEY,
        "response_format": response_format,
        "database_url": f"sqlite:///{db}" if isinstance(db, Path) else db,
        "rate_limit_per_minute": 0,
        "max_jobs_in_flight": 8,
        "progress_interval": 300.0,
        "user_daily_limit": BIG_LIMIT,
        "user_monthly_limit": BIG_LIMIT,
        "global_daily_limit": BIG_LIMIT,
        "max_retries": 0,
    }
    values.update(extra)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@dataclass(frozen=True)
class Backend:
    """Where a pipeline scenario keeps its ledger: a SQLite file in the temp dir, or a fresh
    database on the bench's durable PostgreSQL server. Kept results go to a folder of the
    temp dir either way (DATA_DIR)."""

    name: str  # "sqlite" or "postgresql"
    server: Any = None  # tests.pg_server.PgServer, for "postgresql"

    def settings(
        self, base_url: str, tmp: Path, label: str, response_format: str, **extra: Any
    ) -> Settings:
        """Settings for one scenario run: its own ledger and its own data folder."""
        folder = tmp / f"{label}-{self.name}"
        folder.mkdir(mode=0o700, exist_ok=True)
        db: Path | str = (
            folder / "imgbot.db" if self.name == "sqlite" else self.server.create_database()
        )
        return bench_settings(base_url, db, response_format, data_dir=str(folder), **extra)


class BenchReply:
    """The least a front end does with a job (core.runner.Reply): keep the outcome, and hand
    back a platform handle per image as the Telegram and Discord replies do (so the runner
    records them, one more store write, as it does for the bots). A refusal or a failure is
    kept too and turned into an error by `pipeline_call`: the bench must not time a job that
    went wrong."""

    def __init__(self) -> None:
        self.outcome: Any = None
        self.problem = ""

    async def progress(self, event: Any) -> None:
        """Progress is shown nowhere."""

    async def result(self, outcome: Any, four_k_credits: float | None) -> list[str]:
        """Take the result: in memory, at once."""
        self.outcome = outcome
        return [f"bench-file-{outcome.job_id}-{i}" for i in range(len(outcome.images))]

    async def refusal(self, message: str | None, error: Any = None) -> None:
        """A refusal ends the bench."""
        self.problem = f"refused: {message!r} ({error!r})"

    async def failure(self, message: str) -> None:
        """So does a failure."""
        self.problem = f"failed: {message!r}"


async def no_references() -> list[Any]:
    """A command without reference images."""
    return []


async def check_durable(service: ImageService, job_ids: list[int]) -> dict[str, Any]:
    """Check that the timed jobs went the whole durable way: each is `delivered` in the store
    and its result was kept (retention keeps it after delivery)."""
    stages: dict[str, int] = {}
    kept = 0
    for job_id in job_ids:
        job = await service.job(job_id)
        assert job is not None, job_id
        stages[job.stage.value] = stages.get(job.stage.value, 0) + 1
        kept += await service.results.load(job_id) is not None
    if stages != {JobStage.DELIVERED.value: len(job_ids)} or kept != len(job_ids):
        raise RuntimeError(f"jobs not through the durable path: {stages}, {kept} kept")
    return {"jobs": len(job_ids), "delivered": len(job_ids), "results_kept": kept}


def api_fields(request: ImageRequest, response_format: str | None) -> dict[str, Any]:
    """Return the JSON body ImageClient sends for `request`."""
    fields: dict[str, Any] = {
        "model": request.model,
        "prompt": request.prompt,
        "n": request.n,
        "size": request.size,
        "quality": request.quality,
    }
    if response_format:
        fields["response_format"] = response_format
    return fields


async def bare_call(http: httpx.AsyncClient, base_url: str, fields: dict[str, Any]) -> int:
    """POST the request and read the answer (and, for a url answer, the image); return bytes."""
    resp = await http.post(
        f"{api_root(base_url)}/images/generations",
        json=fields,
        headers={"Authorization": f"Bearer {KEY}"},
    )
    resp.raise_for_status()
    size = len(resp.content)
    if fields.get("response_format") == "url":
        image = await http.get(json.loads(resp.content)["data"][0]["url"])
        image.raise_for_status()
        size += len(image.content)
    return size


def stats(samples: list[float]) -> dict[str, float]:
    """Return median, p10, p90 and count of timings, in milliseconds."""
    ms = sorted(s * 1000 for s in samples)
    deciles = statistics.quantiles(ms, n=10) if len(ms) >= 2 else [ms[0]] * 9
    return {
        "median_ms": round(statistics.median(ms), 3),
        "p10_ms": round(deciles[0], 3),
        "p90_ms": round(deciles[-1], 3),
        "n": len(ms),
    }


async def interleaved(
    calls: list[Callable[[], Awaitable[Any]]], reps: int, warmup: int = 2
) -> list[list[float]]:
    """Time the calls in turn, rotating who goes first, so drift and noise hit all alike."""
    for _ in range(warmup):
        for call in calls:
            await call()
    times: list[list[float]] = [[] for _ in calls]
    for i in range(reps):
        for k in range(len(calls)):
            which = (i + k) % len(calls)
            started = time.perf_counter()
            await calls[which]()
            times[which].append(time.perf_counter() - started)
    return times


async def bare_decode_call(http: httpx.AsyncClient, base_url: str, fields: dict[str, Any]) -> int:
    """The least any client must do for the image: POST, parse the JSON, decode the base64."""
    resp = await http.post(
        f"{api_root(base_url)}/images/generations",
        json=fields,
        headers={"Authorization": f"Bearer {KEY}"},
    )
    resp.raise_for_status()
    text = json.loads(resp.content)["data"][0]["b64_json"]
    return len(base64.b64decode(text.partition(",")[2] if text.startswith("data:") else text))


def rss_bytes() -> int:
    """Return this process's resident set size now."""
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int | None:
    """Return this process's peak RSS (VmHWM) since start or the last reset, if known."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class RssSampler:
    """A thread that samples RSS every few milliseconds (a cross-check of VmHWM)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.peak = 0
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, proc.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Ticker:
    """A task that wakes every 1 ms and records how late each wake-up was."""

    def __init__(self, watch: Callable[[], int] | None = None) -> None:
        self.ticks: list[tuple[float, float]] = []  # (when, how late)
        self.max_watched = 0
        self._watch = watch
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        previous = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            self.ticks.append((now, max(0.0, now - previous - 0.001)))
            previous = now
            if self._watch is not None:
                self.max_watched = max(self.max_watched, self._watch())

    def start(self) -> None:
        """Start ticking."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop ticking."""
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    def stalls(self, since: float = 0.0) -> dict[str, float]:
        """Return the stalls of ticks after `since`: max, p99, p50 (ms) and the tick count."""
        ms = sorted(late * 1000 for when, late in self.ticks if when >= since)
        return {
            "max_ms": round(ms[-1], 2),
            "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2),
            "p50_ms": round(ms[len(ms) // 2], 2),
            "ticks": len(ms),
        }


# --- 1. overhead per job ----------------------------------------------------------------


async def overhead(
    base_url: str, tmp: Path, plan: Plan, backends: list[Backend]
) -> dict[str, Any]:
    """Time the whole durable pipeline against a bare httpx call, per backend, size and
    answer mode."""
    out: dict[str, Any] = {}
    for backend in backends:
        for mode in ("b64_json", "url"):
            settings = backend.settings(base_url, tmp, f"overhead-{mode}", mode)
            async with (
                open_service(settings) as service,
                httpx.AsyncClient(timeout=600) as bare_http,
            ):
                runner = JobRunner(service)
                requester = Requester("bench", "overhead", display_name="Bench")
                for size, reps in (
                    ("1024x1024", plan.overhead_1k),
                    ("3840x2160", plan.overhead_4k),
                ):
                    text = TEXTS[size]
                    request, _ = service.parse(text)
                    assert request.size == size, request.size
                    fields = api_fields(request, mode)
                    answer_bytes = await bare_call(bare_http, base_url, fields)
                    jobs: list[int] = []
                    calls = [
                        partial(pipeline_call, runner, requester, text, jobs),
                        partial(bare_call, bare_http, base_url, fields),
                    ]
                    if mode == "b64_json":
                        calls.append(partial(bare_decode_call, bare_http, base_url, fields))
                    timings = await interleaved(calls, reps)
                    p, b = stats(timings[0]), stats(timings[1])
                    row: dict[str, Any] = {
                        "backend": backend.name,
                        "mode": mode,
                        "size": size,
                        "answer_bytes": answer_bytes,
                        "pipeline": p,
                        "bare": b,
                        "added_ms": round(p["median_ms"] - b["median_ms"], 2),
                        "ratio": round(p["median_ms"] / b["median_ms"], 3),
                        "durable": await check_durable(service, jobs),
                    }
                    if mode == "b64_json":
                        d = stats(timings[2])
                        row["bare_plus_decode"] = d
                        row["ratio_vs_bare_plus_decode"] = round(
                            p["median_ms"] / d["median_ms"], 3
                        )
                    out[f"{backend.name} {mode} {size}"] = row
    return out


async def pipeline_call(
    runner: JobRunner, requester: Requester, text: str, jobs: list[int] | None = None
) -> None:
    """Run one job the durable way a front end does: JobRunner.run (access, reserve, queue,
    start, draw, keep the result on disk while settling, spend report) → Reply.result →
    the delivery recorded (finish_delivery) and the platform handles stored."""
    reply = BenchReply()
    await runner.run(requester, text, no_references, reply)
    if reply.problem or reply.outcome is None:
        raise RuntimeError(f"the bench job did not succeed: {reply.problem or 'no result'}")
    assert reply.outcome.images[0].width > 0
    if jobs is not None:
        jobs.append(reply.outcome.job_id)


# --- 2. against the official SDK --------------------------------------------------------


async def versus_sdk(base_url: str, tmp: Path, plan: Plan) -> dict[str, Any]:
    """Time ImageClient.draw against AsyncOpenAI.images.generate (+ b64decode)."""
    try:
        from openai import AsyncOpenAI
    except ImportError:
        return {"skipped": "openai is not installed (pip install -e '.[bench]')"}
    settings = bench_settings(base_url, tmp / "sdk.db", "none")
    defaults = PromptDefaults.from_settings(settings)
    out: dict[str, Any] = {}
    sdk = AsyncOpenAI(api_key=KEY, base_url=f"{base_url}/v1", max_retries=0, timeout=600)
    try:
        async with make_http_client(settings) as http:
            client = ImageClient(http, settings)
            for size, reps in (("1024x1024", plan.sdk_1k), ("3840x2160", plan.sdk_4k)):
                request = parse_command(TEXTS[size], defaults)
                call_times: list[float] = []

                async def ours(request: ImageRequest = request) -> None:
                    result = await client.draw(request)
                    assert result.images[0].width > 0

                async def theirs(request: ImageRequest = request, into: list = call_times) -> None:
                    started = time.perf_counter()
                    answer = await sdk.images.generate(
                        model=request.model,
                        prompt=request.prompt,
                        size=request.size,  # type: ignore[arg-type]
                        quality=request.quality,  # type: ignore[arg-type]
                        n=request.n,
                    )
                    into.append(time.perf_counter() - started)
                    assert answer.data and answer.data[0].b64_json
                    assert base64.b64decode(answer.data[0].b64_json)

                mine, sdks = await interleaved([ours, theirs], reps)
                o, s = stats(mine), stats(sdks)
                out[size] = {
                    "ours": o,
                    "sdk_with_b64decode": s,
                    "sdk_call_only": stats(call_times[-reps:]),
                    "ratio": round(o["median_ms"] / s["median_ms"], 3),
                }
    finally:
        await sdk.close()
    return out


# --- 3 + 4. a burst of 4K jobs: loop stalls and memory (run in a fresh child process) ------


async def burst_child(base_url: str, jobs: int) -> dict[str, Any]:
    """Run `jobs` 3840x2160 jobs from as many users at once; measure stalls and peak RSS.

    The upstream holds the answers until all are ready and sends them together, so the
    results really arrive and decode at once; the stalls are counted from the first answer.
    """
    with tempfile.TemporaryDirectory(prefix="imgbot-bench-") as tmp:
        settings = bench_settings(
            base_url,
            Path(tmp) / "burst.db",
            "b64_json",
            max_jobs_in_flight=jobs,
            max_jobs_per_user=1,
        )
        text = TEXTS["3840x2160"]
        answered: list[float] = []

        async def on_response(response: httpx.Response) -> None:
            if response.request.method == "POST" and not answered:
                answered.append(time.perf_counter())

        # core.runtime.open_service's wiring, with a hook that notes when answers arrive.
        async with make_http_client(settings) as http, httpx.AsyncClient(timeout=60) as bare:
            http.event_hooks = {"request": [], "response": [on_response]}
            ledger = await open_store(settings.store_url, Limits.from_settings(settings))
            try:
                service = ImageService(settings, ledger, ImageClient(http, settings))
                request, _ = service.parse(text)
                answer_bytes = await bare_call(bare, base_url, api_fields(request, "b64_json"))
                # One job first: imports, the thread pool and the ledger's pages are warm.
                warm = await service.draw(Requester("bench", "warm"), text)
                image_bytes = len(warm.images[0].data)
                del warm
                idle = Ticker()
                idle.start()
                await asyncio.sleep(0.5)
                await idle.stop()
                answered.clear()
                (await bare.get(f"{base_url}/bench/hold/{jobs}")).raise_for_status()

                gc.collect()
                base_rss = rss_bytes()
                exact_peak = reset_peak_rss()
                ticker = Ticker(watch=lambda: service.jobs_in_flight)
                with RssSampler() as sampler:
                    ticker.start()
                    started = time.perf_counter()
                    outcomes = await asyncio.gather(
                        *(
                            service.draw(Requester("bench", f"user{i}", display_name=f"U{i}"), text)
                            for i in range(jobs)
                        )
                    )
                    finished = time.perf_counter()
                    await ticker.stop()
                hwm = peak_rss_bytes() if exact_peak else None
                peak = max(hwm or 0, sampler.peak)
                assert all(o.images[0].width == 3840 for o in outcomes)
                del outcomes
            finally:
                await ledger.close()
    payloads = answer_bytes * jobs
    budget = 3 * payloads + 100 * MB
    first = answered[0] if answered else started
    return {
        "jobs": jobs,
        "size": "3840x2160",
        "answer_bytes": answer_bytes,
        "image_bytes": image_bytes,
        "max_in_flight_seen": ticker.max_watched,
        "wait_for_answers_s": round(first - started, 2),
        "decode_window_s": round(finished - first, 2),
        "stalls": ticker.stalls(since=first),
        "stalls_whole_burst": ticker.stalls(),
        "idle_stalls": idle.stalls(),
        "rss_before_mb": round(base_rss / MB, 1),
        "peak_rss_mb": round(peak / MB, 1),
        "peak_source": "VmHWM" if hwm and hwm >= sampler.peak else "sampled every 2 ms",
        "payloads_mb": round(payloads / MB, 1),
        "budget_mb": round(budget / MB, 1),
        "peak_over_payloads": round(peak / payloads, 2),
    }


def burst(base_url: str, jobs: int) -> dict[str, Any]:
    """Run the burst in a fresh interpreter, so its peak RSS is its own."""
    done = subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "bench.run", "--child-burst", base_url, "--jobs", str(jobs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"burst child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- 5. the ledger ------------------------------------------------------------------------


LEDGER_SPEC = JobSpec(
    command_text=TEXTS["1024x1024"],
    model="gpt-image-2",
    size="1024x1024",
    quality="auto",
    n=1,
    reference_count=0,
    request_json=json.dumps({"request": {"prompt": PROMPT}, "reference_refs": []}),
)
LEDGER_USAGE = Usage(text_input_tokens=12, image_output_tokens=1372, total_tokens=1384)


async def ledger_worker(
    ledger: Store, people: list[Requester], work: Iterator[int], done: list[float]
) -> None:
    """Reserve and settle until the shared work runs out; note when each pair ended."""
    for k in work:
        job_id = await ledger.reserve(people[k % len(people)], LEDGER_SPEC, 100.0)
        await ledger.settle(job_id, 92.5, LEDGER_USAGE)
        done.append(time.perf_counter())


def prefill_jobs(path: Path, users: int, jobs: int) -> None:
    """Write `jobs` settled jobs of today straight into a migrated ledger file.

    The ledger's triggers count them in its running totals, as for any insert.
    """
    now = datetime.now(UTC).isoformat(timespec="microseconds")
    with closing(sqlite3.connect(path)) as db, db:
        db.executemany(
            "INSERT OR IGNORE INTO users (user_key, platform, user_id, created_at, updated_at)"
            " VALUES (?, 'bench', ?, ?, ?)",
            [(f"bench:u{i}", f"u{i}", now, now) for i in range(users)],
        )
        db.executemany(
            "INSERT INTO jobs (user_key, platform, command_text, model, size, quality, n,"
            " status, estimated_credits, actual_credits, created_at, finished_at)"
            " VALUES (?, 'bench', 't', 'gpt-image-2', '1024x1024', 'auto', 1, 'succeeded',"
            " 100.0, 92.5, ?, ?)",
            [(f"bench:u{i % users}", now, now) for i in range(jobs)],
        )


async def ledger_pairs(tmp: Path, plan: Plan, tasks: int = 100) -> dict[str, Any]:
    """Count reserve+settle pairs per second with `tasks` concurrent tasks, for 1/10/100 users,
    on SQLite, then on PostgreSQL (`ledger_postgres`).

    Every limit is set (user daily and monthly, global daily), so every check really runs.
    """
    limits = Limits(user_daily=BIG_LIMIT, user_monthly=BIG_LIMIT, global_daily=BIG_LIMIT)
    out: dict[str, Any] = {}
    runs = [(1, 0, plan.ledger_pairs), (10, 0, plan.ledger_pairs), (100, 0, plan.ledger_pairs)]
    runs.append((100, plan.ledger_prefill, plan.ledger_pairs // 3))
    for users, prefill, pairs in runs:
        path = tmp / f"ledger-{users}-{prefill}.db"
        await (await open_store(f"sqlite:///{path}", limits)).close()
        if prefill:
            prefill_jobs(path, users, prefill)
        ledger = await open_store(f"sqlite:///{path}", limits)
        try:
            people = [Requester("bench", f"u{i}", display_name=f"User {i}") for i in range(users)]
            warm: list[float] = []
            await ledger_worker(ledger, people, iter(range(20)), warm)
            work = iter(range(pairs))
            done: list[float] = []
            started = time.perf_counter()
            await asyncio.gather(*(ledger_worker(ledger, people, work, done) for _ in range(tasks)))
            seconds = time.perf_counter() - started
        finally:
            await ledger.close()
        quarter = max(len(done) // 4, 2)
        first = quarter / (done[quarter - 1] - started)
        last = quarter / (done[-1] - done[-quarter - 1])
        key = f"sqlite, {users} users" + (f", {prefill} jobs today already" if prefill else "")
        out[key] = {
            "backend": "sqlite",
            "tasks": tasks,
            "users": users,
            "jobs_before": prefill,
            "pairs": pairs,
            "seconds": round(seconds, 3),
            "pairs_per_s": round(pairs / seconds, 1),
            "first_quarter_pairs_per_s": round(first, 1),
            "last_quarter_pairs_per_s": round(last, 1),
        }
    try:
        out.update(await ledger_postgres(plan, tasks))
    except ImportError as err:  # tests/pg_server.py needs pytest
        out["postgresql"] = {"skipped": f"{err} (pip install -e '.[test,bench]')"}
    except RuntimeError as err:  # no server binaries, or it would not start
        out["postgresql"] = {"skipped": str(err).splitlines()[0]}
    return out


# --- 5b. the ledger on PostgreSQL ---------------------------------------------------------

# A production-like server: every commit flushed to disk (the test server's settings turn
# that off for speed).
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
# The 3-process run: each process makes `ledger_pairs` attempts for the same
# LEDGER_MP_USERS users, whose daily limit lets LEDGER_MP_SHARE of all attempts through:
# the three together try to exceed it, and the last fifth is refused.
LEDGER_MP_PROCESSES = 3
LEDGER_MP_USERS = 10
LEDGER_MP_SHARE = 0.8


@contextmanager
def postgres_server(settings: dict[str, str]) -> Iterator[Any]:
    """Start a throwaway PostgreSQL server (tests/pg_server.py, which needs pytest) with
    `settings` over the test server's own."""
    from tests import pg_server  # imports pytest: `pip install -e '.[test,bench]'`

    saved = pg_server.SERVER_SETTINGS
    pg_server.SERVER_SETTINGS = {**saved, **settings}
    try:
        server = pg_server.PgServer().start()
    finally:
        pg_server.SERVER_SETTINGS = saved
    try:
        yield server
    finally:
        server.stop()


async def ledger_run(
    url: str, users: int, pairs: int, tasks: int, limits: Limits
) -> dict[str, Any]:
    """Time `pairs` reserve+settle pairs with `tasks` concurrent tasks on a fresh ledger."""
    ledger = await open_store(url, limits)
    try:
        people = [Requester("bench", f"u{i}", display_name=f"User {i}") for i in range(users)]
        warm: list[float] = []
        await ledger_worker(ledger, people, iter(range(20)), warm)
        work = iter(range(pairs))
        done: list[float] = []
        started = time.perf_counter()
        await asyncio.gather(*(ledger_worker(ledger, people, work, done) for _ in range(tasks)))
        seconds = time.perf_counter() - started
    finally:
        await ledger.close()
    quarter = max(len(done) // 4, 2)
    return {
        "tasks": tasks,
        "users": users,
        "jobs_before": 0,
        "pairs": pairs,
        "seconds": round(seconds, 3),
        "pairs_per_s": round(pairs / seconds, 1),
        "first_quarter_pairs_per_s": round(quarter / (done[quarter - 1] - started), 1),
        "last_quarter_pairs_per_s": round(quarter / (done[-1] - done[-quarter - 1]), 1),
    }


def ledger_mp_limit(pairs_each: int) -> float:
    """The users' daily limit of the 3-process run: LEDGER_MP_SHARE of what they ask for."""
    asked = pairs_each * LEDGER_MP_PROCESSES / LEDGER_MP_USERS * 92.5
    return float(round(asked * LEDGER_MP_SHARE))


async def ledger_child(url: str, pairs: int) -> dict[str, Any]:
    """One of the processes of the 3-process run: 100 tasks reserving and settling for the
    same users as the others, until `pairs` attempts are made; refusals are counted."""
    from core.errors import LimitExceeded

    limit = ledger_mp_limit(pairs)
    limits = Limits(user_daily=limit, user_monthly=BIG_LIMIT, global_daily=BIG_LIMIT)
    ledger = await open_store(url, limits)
    people = [Requester("bench", f"u{i}") for i in range(LEDGER_MP_USERS)]
    granted = refused = 0

    async def worker(work: Iterator[int]) -> None:
        nonlocal granted, refused
        for k in work:
            try:
                job_id = await ledger.reserve(people[k % len(people)], LEDGER_SPEC, 100.0)
            except LimitExceeded:
                refused += 1
                continue
            await ledger.settle(job_id, 92.5, LEDGER_USAGE)
            granted += 1

    try:
        print("ready", flush=True)
        sys.stdin.readline()
        started = time.time()
        work = iter(range(pairs))
        await asyncio.gather(*(worker(work) for _ in range(100)))
        ended = time.time()
    finally:
        await ledger.close()
    return {"granted": granted, "refused": refused, "started": started, "ended": ended}


def ledger_processes(url: str, pairs_each: int) -> dict[str, Any]:
    """Run LEDGER_MP_PROCESSES processes at once against one database; check no overspend."""
    children = [
        subprocess.Popen(  # noqa: S603 - this interpreter, this script
            [sys.executable, "-m", "bench.run", "--child-ledger", url, "--jobs", str(pairs_each)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(LEDGER_MP_PROCESSES)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline()
            if line != "ready\n":
                raise RuntimeError(f"a ledger child did not start: {line!r}")
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        outs = [json.loads(child.communicate(timeout=600)[0]) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    if any(child.returncode for child in children):
        raise RuntimeError("a ledger child failed")
    return {"children": outs}


async def ledger_spend_check(url: str, limit: float) -> dict[str, Any]:
    """Sum what the 3-process run charged, per user, from the jobs and from the totals."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        charged = {
            r["user_key"]: (float(r["credits"]), int(r["micro"]), int(r["jobs"]))
            for r in await conn.fetch(
                "SELECT user_key, SUM(charged) AS credits, SUM(charged_micro) AS micro,"
                " COUNT(*) AS jobs FROM jobs GROUP BY user_key"
            )
        }
        totals = {
            (r["scope"], r["key"]): int(r["micro_credits"])
            for r in await conn.fetch("SELECT scope, key, micro_credits FROM spend_totals")
        }
    finally:
        await conn.close()
    over = {user: c for user, (c, _, _) in charged.items() if c > limit + 1e-9}
    mismatched = [
        user
        for user, (_, micro, _) in charged.items()
        if totals.get(("user_daily", user)) != micro or totals.get(("user_monthly", user)) != micro
    ]
    everything = sum(micro for _, micro, _ in charged.values())
    if totals.get(("global_daily", "")) != everything:
        mismatched.append("global")
    return {
        "max_user_spend": max((c for c, _, _ in charged.values()), default=0.0),
        "jobs": sum(n for _, _, n in charged.values()),
        "users_over_limit": sorted(over),
        "totals_mismatched": mismatched,
    }


async def ledger_postgres(plan: Plan, tasks: int = 100) -> dict[str, Any]:
    """Pairs/s on PostgreSQL: one process at 1/10/100 users on a durable server and on the
    test server's fast settings; then 3 processes at once on the durable one."""
    limits = Limits(user_daily=BIG_LIMIT, user_monthly=BIG_LIMIT, global_daily=BIG_LIMIT)
    out: dict[str, Any] = {}
    for label, settings in (("durable", DURABLE), ("fsync off", {})):
        with postgres_server(settings) as server:
            for users in (1, 10, 100):
                row = await ledger_run(
                    server.create_database(), users, plan.ledger_pairs, tasks, limits
                )
                out[f"postgresql {label}, {users} users"] = {
                    "backend": "postgresql",
                    "server": label,
                    **row,
                }
            if label != "durable":
                continue
            url = server.create_database()
            await (await open_store(url, limits)).close()  # migrated before the race
            pairs_each = plan.ledger_pairs
            started = time.perf_counter()
            run = await asyncio.to_thread(ledger_processes, url, pairs_each)
            seconds = time.perf_counter() - started
            check = await ledger_spend_check(url, ledger_mp_limit(pairs_each))
            children = run["children"]
            granted = sum(c["granted"] for c in children)
            window = max(c["ended"] for c in children) - min(c["started"] for c in children)
            out[f"postgresql {label}, {LEDGER_MP_PROCESSES} processes"] = {
                "backend": "postgresql",
                "server": label,
                "processes": LEDGER_MP_PROCESSES,
                "tasks": tasks,
                "users": LEDGER_MP_USERS,
                "user_daily_limit": ledger_mp_limit(pairs_each),
                "attempts": pairs_each * LEDGER_MP_PROCESSES,
                "pairs": granted,
                "refused": sum(c["refused"] for c in children),
                "granted_per_process": [c["granted"] for c in children],
                "seconds": round(window, 3),
                "seconds_with_start": round(seconds, 3),
                "pairs_per_s": round(granted / window, 1),
                "attempts_per_s": round(pairs_each * LEDGER_MP_PROCESSES / window, 1),
                **check,
                "overspend": bool(check["users_over_limit"] or check["totals_mismatched"]),
            }
    return out


# --- 6. throughput ----------------------------------------------------------------------


async def pipeline_user(
    runner: JobRunner, user: int, text: str, work: Iterator[int], jobs: list[int]
) -> None:
    """One user drawing job after job (never two at once) until the shared work runs out."""
    requester = Requester("bench", f"user{user}")
    for _ in work:
        await pipeline_call(runner, requester, text, jobs)


async def bare_user(
    http: httpx.AsyncClient, base_url: str, fields: dict[str, Any], work: Iterator[int]
) -> None:
    """One bare client calling after calling until the shared work runs out."""
    for _ in work:
        await bare_call(http, base_url, fields)


async def throughput(
    base_url: str, tmp: Path, plan: Plan, backends: list[Backend]
) -> dict[str, Any]:
    """Count 1024x1024 jobs per second through the durable pipeline (JobRunner to delivery)
    and bare, per backend and user count; bare right after each pipeline run."""
    out: dict[str, Any] = {}
    text = TEXTS["1024x1024"]
    for backend in backends:
        for users, total in plan.throughput_jobs.items():
            settings = backend.settings(
                base_url, tmp, f"throughput-{users}", "b64_json",
                max_jobs_in_flight=max(8, users),
            )
            async with open_service(settings) as service:
                runner = JobRunner(service)
                await pipeline_call(runner, Requester("bench", "warm"), text)
                fields = api_fields(service.parse(text)[0], "b64_json")
                work = iter(range(total))
                jobs: list[int] = []
                started = time.perf_counter()
                await asyncio.gather(
                    *(pipeline_user(runner, i, text, work, jobs) for i in range(users))
                )
                piped = time.perf_counter() - started
                durable = await check_durable(service, jobs)

            limits = httpx.Limits(max_connections=max(16, users * 2))
            async with httpx.AsyncClient(timeout=600, limits=limits) as http:
                await bare_call(http, base_url, fields)
                work = iter(range(total))
                started = time.perf_counter()
                await asyncio.gather(
                    *(bare_user(http, base_url, fields, work) for _ in range(users))
                )
                bared = time.perf_counter() - started
            out[f"{backend.name}, {users} users"] = {
                "backend": backend.name,
                "users": users,
                "jobs": total,
                "pipeline_jobs_per_s": round(total / piped, 1),
                "bare_jobs_per_s": round(total / bared, 1),
                "pipeline_over_bare": round(bared / piped, 3),
                "durable": durable,
            }
    return out


# --- the report -------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Return the versions of Python, SQLite and the libraries that matter here."""
    found = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version}
    for name in ("httpx", "aiosqlite", "Pillow", "pybase64", "openai", "psutil"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine() -> dict[str, Any]:
    """Return the core count and what the machine is."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    info: dict[str, Any] = {
        "cores": cores,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 1024**3, 1)
    except ImportError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def git_commit() -> str:
    """Return the checked-out commit, or '' outside a git tree."""
    try:
        done = subprocess.run(  # noqa: S603, S607 - read-only git query
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return ""
    return done.stdout.strip()


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Check every target; return one line per target with the value and whether it is met."""
    lines: list[dict[str, Any]] = []

    def add(name: str, value: float, target: str, met: bool) -> None:
        lines.append({"target": name, "value": value, "goal": target, "met": met})

    for key, row in results["overhead"].items():
        add(f"overhead {key} (pipeline/bare)", row["ratio"], "<= 1.10", row["ratio"] <= 1.10)
    for key, row in results.get("relay", {}).items():
        add(f"relay {key} (SDK via imgbot / SDK direct)", row["ratio"], "<= 1.10",
            row["ratio"] <= 1.10)
    if "stream" in results:
        ratio = results["stream"]["reader_4k"]["ratio"]
        add("stream reader 3840x2160 (events/JSON)", ratio, "<= 1.10", ratio <= 1.10)
    sdk = results["sdk"]
    for size in ("1024x1024", "3840x2160"):
        if size in sdk:
            ratio = sdk[size]["ratio"]
            add(f"client/SDK {size}", ratio, "<= 1.00", ratio <= 1.0)
    b = results["burst"]
    add("loop stall p99 (ms)", b["stalls"]["p99_ms"], "<= 20", b["stalls"]["p99_ms"] <= 20)
    add("loop stall max (ms)", b["stalls"]["max_ms"], "<= 100", b["stalls"]["max_ms"] <= 100)
    add(
        "peak RSS (MB), 50 x 4K in flight",
        b["peak_rss_mb"],
        f"<= {b['budget_mb']:.0f} (3 x {b['payloads_mb']:.0f} + 100)",
        b["peak_rss_mb"] <= b["budget_mb"],
    )
    fleet = results.get("replicas", {})
    if "skipped" not in fleet and fleet:
        failed = [f"{name}, {f['replicas']} replicas, round {f['round']}"
                  for name, work in fleet.items() for f in work.get("failed_runs", [])]
        runs = sum(len(row["each_run"]) for work in fleet.values()
                   for key, row in work.items() if key.endswith(" replicas"))
        add("replicas: every job of every run delivered",
            f"{runs} runs delivered all; failed: {failed or 'none'}", "no run fails",
            not failed)
    taken = fleet.get("takeover", {}).get("takeover")
    if taken:
        last, goal = taken["seconds_to_last"], taken["target_s"]
        add(
            "replicas: kill -9 of 1 of 3 under load, until the last of its jobs is delivered"
            " by another (s)",
            f"{last['median']} (runs {last['min']}–{last['max']})",
            f"<= JOB_LEASE + one job ({goal['median']}) in every run",
            taken["met_every_run"],
        )
    for key, row in results["ledger"].items():
        if "skipped" in row:
            add(f"ledger {key}", f"not measured: {row['skipped']}", "measured", False)
        elif "processes" in row:
            value = (
                f"{row['pairs_per_s']} pairs/s; most a user was charged {row['max_user_spend']}"
                f" of {row['user_daily_limit']}; totals "
                + ("match the jobs" if not row["totals_mismatched"] else "DO NOT match")
            )
            add(f"ledger {key}, one user daily limit", value, "no overspend", not row["overspend"])
        elif row.get("server", "durable") != "durable" or row["jobs_before"]:
            continue  # shows how it grows, or what fsync costs; the target is for a fresh day
        else:
            pairs = row["pairs_per_s"]
            add(f"ledger pairs/s, 100 tasks, {key}", pairs, ">= 2000", pairs >= 2000)
    return lines


def table(results: dict[str, Any]) -> str:
    """Render the results as a markdown table."""
    rows: list[tuple[str, str, str]] = []
    for key, row in results["overhead"].items():
        p, b = row["pipeline"], row["bare"]
        detail = (
            f"{p['median_ms']:.1f} ms vs {b['median_ms']:.1f} ms bare (+{row['added_ms']:.1f} ms)"
        )
        if "bare_plus_decode" in row:
            detail += (
                f"; bare + json + b64decode {row['bare_plus_decode']['median_ms']:.1f} ms"
                f" (ratio {row['ratio_vs_bare_plus_decode']:.3f})"
            )
        rows.append(
            (
                f"overhead {key} ({row['answer_bytes'] / MB:.1f} MB answer)",
                detail,
                f"**{row['ratio']:.3f}**",
            )
        )
    for size, row in results["sdk"].items():
        if size == "skipped":
            rows.append(("client vs SDK", row, "-"))
            continue
        rows.append(
            (
                f"ImageClient vs AsyncOpenAI {size}",
                f"{row['ours']['median_ms']:.1f} ms vs {row['sdk_with_b64decode']['median_ms']:.1f} ms"
                f" (SDK call alone {row['sdk_call_only']['median_ms']:.1f} ms)",
                f"**{row['ratio']:.3f}**",
            )
        )
    b = results["burst"]
    rows.append(
        (
            f"loop stalls, {b['jobs']} x 4K at once ({b['max_in_flight_seen']} in flight)",
            f"{b['stalls']['ticks']} ticks in the {b['decode_window_s']:.1f} s from the first "
            f"answer to the last result (idle loop: p99 {b['idle_stalls']['p99_ms']:.1f}, "
            f"max {b['idle_stalls']['max_ms']:.1f})",
            f"**p99 {b['stalls']['p99_ms']:.1f} / max {b['stalls']['max_ms']:.1f}**",
        )
    )
    rows.append(
        (
            f"peak RSS, {b['jobs']} x 4K in flight",
            f"{b['peak_rss_mb']:.0f} MB (before {b['rss_before_mb']:.0f} MB); answers "
            f"{b['payloads_mb']:.0f} MB; budget {b['budget_mb']:.0f} MB",
            f"**{b['peak_over_payloads']:.2f} x answers**",
        )
    )
    for key, row in results["ledger"].items():
        if "skipped" in row:
            rows.append((f"ledger {key}", row["skipped"], "-"))
            continue
        if "processes" in row:
            rows.append(
                (
                    f"ledger reserve+settle, {key} x 100 tasks, {row['users']} users",
                    f"{row['pairs']} pairs + {row['refused']} refused of {row['attempts']} in "
                    f"{row['seconds']:.2f} s ({row['granted_per_process']} a process); user "
                    f"daily limit {row['user_daily_limit']:.0f}, most charged "
                    f"{row['max_user_spend']:.1f}"
                    + ("" if not row["overspend"] else " — OVERSPENT or totals off"),
                    f"**{row['pairs_per_s']:.0f} pairs/s**",
                )
            )
            continue
        rows.append(
            (
                f"ledger reserve+settle, 100 tasks, {key}",
                f"{row['pairs']} pairs in {row['seconds']:.2f} s; first quarter "
                f"{row['first_quarter_pairs_per_s']:.0f}/s, last {row['last_quarter_pairs_per_s']:.0f}/s",
                f"**{row['pairs_per_s']:.0f} pairs/s**",
            )
        )
    for key, row in results["throughput"].items():
        rows.append(
            (
                f"throughput 1024x1024, {key}",
                f"{row['jobs']} jobs; bare httpx {row['bare_jobs_per_s']:.1f} jobs/s "
                f"(pipeline/bare {row['pipeline_over_bare']:.2f})",
                f"**{row['pipeline_jobs_per_s']:.1f} jobs/s**",
            )
        )
    if "stream" in results:
        r, p = results["stream"]["reader_4k"], results["stream"]["previews_10s"]
        rows.append(
            (
                f"stream reader 4K ({r['answer_bytes'] / MB:.1f} MB event)",
                f"{r['event_reader']['median_ms']:.1f} ms vs JSON reader "
                f"{r['json_reader']['median_ms']:.1f} ms",
                f"**{r['ratio']:.3f}**",
            )
        )
        rows.append(
            (
                f"previews, 10 s upstream, {p['size']}",
                f"previews at {p['previews_at_s']} s, result at {p['result_at_s']} s",
                f"**first preview at {p['first_preview_share']:.0%} of the wait**",
            )
        )
    for key, row in results.get("relay", {}).items():
        rows.append(
            (
                f"SDK via imgbot vs SDK direct, {key}",
                f"{row['via_imgbot']['median_ms']:.1f} ms vs {row['direct']['median_ms']:.1f} ms"
                f" (+{row['added_ms']:.1f} ms; imgbot's process: {row['relay_cpu_ms']:.1f} ms"
                " CPU a call)",
                f"**{row['ratio']:.3f}**",
            )
        )
    rows += replica_rows(results.get("replicas", {}))
    lines = ["| measure | detail | result |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
    lines += [
        f"| {t['target']} | {t['value']} | {t['goal']} | {'yes' if t['met'] else '**NO**'} |"
        for t in results["targets"]
    ]
    return "\n".join(lines)


def replica_rows(fleet: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Render the replica scenario's rows: jobs/s per workload and N, the 3/1 ratio, and
    the takeover."""
    if "skipped" in fleet:
        return [("replicas", fleet["skipped"], "-")]
    rows: list[tuple[str, str, str]] = []
    for name, work in fleet.items():
        plan = work["plan"]
        if "takeover" in work:
            t, run = work["takeover"], work["3 replicas"]
            last = t["seconds_to_last"]
            rows.append((
                f"replicas: kill -9 of 1 of 3, {plan['users']} users, upstream "
                f"{plan['upstream_delay_s']:g} s",
                f"until the last of its open jobs is delivered by another; JOB_LEASE "
                f"{plan['job_lease_s']:g} s + one job = {t['target_s']['median']} s; the last "
                f"request in flight at the kill answered after "
                f"{t['in_flight_at_kill_last_answer_s']['median']} s; "
                f"{run['jobs_per_s']['median']} jobs/s",
                f"**{last['median']} s** [{last['min']}–{last['max']}]",
            ))
            continue
        for n in (1, 2, 3):
            row = work.get(f"{n} replicas")
            if row is None:
                continue
            rate = row["jobs_per_s"]
            rows.append((
                f"replicas: {n}, {name}",
                f"{plan['jobs']} jobs, {plan['users']} users, MAX_JOBS_IN_FLIGHT "
                f"{plan['max_jobs_in_flight']}; answer {row['answer_s']['median']} s, one job "
                f"{row['one_job_s']['median']} s; at most {row['max_drawing_at_once']} drawing;"
                f" replicas' CPU {row['replica_cpu_per_s']['median']} cores",
                f"**{rate['median']} jobs/s** [{rate['min']}–{rate['max']}]",
            ))
        if "ratio_3_to_1" in work:
            ratio = work["ratio_3_to_1"]
            rows.append((
                f"replicas: 3 / 1, {name}",
                f"per round {ratio['per_round']}",
                f"**{ratio['of_medians']}**",
            ))
    return rows


# --- 7. previews --------------------------------------------------------------------------


def _read_all(reader: Any, body: bytes, read: int = 64 * 1024) -> Any:
    found = None
    for start in range(0, len(body), read):
        found = reader.feed(body[start : start + read])
    return found


async def streaming(plan: Plan) -> dict[str, Any]:
    """The event reader's cost at 4K against the JSON reader's, and previews' timing."""
    from bench.upstream import photo_like_png
    from core.images import _AnswerReader, _EventReader

    image = photo_like_png(3840, 2160, seed=1)
    b64 = base64.b64encode(image).decode()
    usage = {"input_tokens": 12, "output_tokens": 4000}
    plain = json.dumps({"created": 1, "data": [{"b64_json": b64}], "usage": usage}).encode()
    event = json.dumps({"type": "image_generation.completed", "b64_json": b64, "usage": usage})
    sse = f"event: image_generation.completed\ndata: {event}\n\n".encode()

    def json_path() -> None:
        reader = _AnswerReader(len(plain) + 1)
        _read_all(reader, plain)
        answer = reader.finish()
        payload = json.loads(answer.text)
        assert b"".join(answer.decoded_for(payload["data"][0]["b64_json"]) or []) == image

    def sse_path() -> None:
        reader = _EventReader(len(sse) + 1)
        done: list[Any] = []
        for start in range(0, len(sse), 64 * 1024):
            done += reader.feed(sse[start : start + 64 * 1024])
        [(_, answer)] = done
        payload = json.loads(answer.text)
        assert b"".join(answer.decoded_for(payload["b64_json"]) or []) == image

    reps = max(plan.overhead_4k, 10)
    times: dict[str, list[float]] = {"json": [], "sse": []}
    for _ in range(reps):
        for name, work in (("json", json_path), ("sse", sse_path)):
            gc.collect()
            started = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - started)
    j, e = stats(times["json"]), stats(times["sse"])
    out: dict[str, Any] = {
        "reader_4k": {
            "answer_bytes": len(sse),
            "json_reader": j,
            "event_reader": e,
            "ratio": round(e["median_ms"] / j["median_ms"], 3),
        }
    }
    # Time to the first preview against the time to the result, a 10 s upstream.
    with UpstreamProcess("b64", delay=10.0) as upstream:
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            openai_base_url=upstream.base_url,
            openai_api_key=KEY,
            preview_count=3,
        )
        async with httpx.AsyncClient(timeout=600) as http:
            client = ImageClient(http, settings)
            request = parse_command(TEXTS["1024x1024"], PromptDefaults()).with_changes(
                partial_images=3
            )
            started = time.perf_counter()
            seen: list[float] = []

            async def on_partial(image: Any, index: int) -> None:
                seen.append(round(time.perf_counter() - started, 2))

            result = await client.draw(request, on_partial=on_partial)
            total = round(time.perf_counter() - started, 2)
    out["previews_10s"] = {
        "size": request.size,
        "previews_at_s": seen,
        "result_at_s": total,
        "first_preview_share": round(seen[0] / total, 3) if seen else None,
        "image_output_tokens": result.usage.image_output_tokens if result.usage else None,
    }
    return out


# --- 8. the relay: the official SDK through imgbot's /v1 against the SDK direct ------------


async def relay_child(upstream_url: str, folder: str) -> None:
    """Serve imgbot's web door (API alone, no bot) on the upstream until stdin closes.

    Prints `READY <api root> <key>` once it listens: a personal key made for `web:bench`
    (written to our parent's pipe only, never logged).
    """
    from bots.web.app import run_web

    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    settings = bench_settings(
        upstream_url, Path(folder) / "relay.db", "none", data_dir=folder,
        web_listen="127.0.0.1", web_port=port, previews="off",
    )
    async with open_service(settings) as service:
        _, key = await service.ledger.create_api_key("web:bench", "bench relay")
        stop = asyncio.Event()
        serving = asyncio.create_task(run_web(settings, service, stop))
        for _ in range(500):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                    break
            except OSError:
                await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        print(f"READY http://127.0.0.1:{port} {key}", flush=True)
        await asyncio.to_thread(sys.stdin.read)  # until the parent closes our stdin
        loop.call_soon(stop.set)
        await serving


class RelayProcess:
    """imgbot's web door in a child process (`--child-relay`), as a deployment runs it."""

    def __init__(self, upstream_url: str, folder: Path) -> None:
        self._args = [sys.executable, "-m", "bench.run", "--child-relay", upstream_url,
                      "--folder", str(folder)]
        self._proc: subprocess.Popen[str] | None = None
        self.url = self.key = ""

    def __enter__(self) -> RelayProcess:
        self._proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            self._args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._proc.stdout is not None
        for line in self._proc.stdout:  # the web door prints its addresses first
            if line.startswith("READY "):
                self.url, self.key = line.split()[1:3]
                return self
        raise RuntimeError("the relay did not start")

    def cpu_seconds(self) -> float:
        """Return the CPU time (user + system) the relay process used so far."""
        import psutil

        assert self._proc is not None
        times = psutil.Process(self._proc.pid).cpu_times()
        return float(times.user + times.system)

    def __exit__(self, *exc: Any) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def relay(tmp: Path, plan: Plan) -> dict[str, Any]:
    """Time the SDK through imgbot's /v1 against the SDK straight at the upstream."""
    try:
        from openai import AsyncOpenAI
    except ImportError:
        return {"skipped": "openai is not installed (pip install -e '.[bench]')"}
    out: dict[str, Any] = {}
    folder = tmp / "relay"
    folder.mkdir(mode=0o700, exist_ok=True)
    with UpstreamProcess("b64") as upstream, RelayProcess(upstream.base_url, folder) as via:
        direct_sdk = AsyncOpenAI(api_key=KEY, base_url=f"{upstream.base_url}/v1",
                                 max_retries=0, timeout=600)
        via_sdk = AsyncOpenAI(api_key=via.key, base_url=f"{via.url}/v1", max_retries=0,
                              timeout=600)
        try:
            async with httpx.AsyncClient(timeout=600) as http:
                for size, reps in (("1024x1024", plan.relay_1k), ("3840x2160", plan.relay_4k)):
                    w, h = (int(v) for v in size.split("x"))
                    for fmt in ("b64_json", "url"):

                        async def call(sdk: Any, fmt: str = fmt, size: str = size,
                                       w: int = w, h: int = h) -> None:
                            answer = await sdk.images.generate(
                                model="gpt-image-2", prompt=PROMPT, size=size, quality="auto",
                                n=1, response_format=fmt,
                            )
                            item = answer.data[0]
                            if fmt == "url":
                                got = await http.get(item.url)
                                got.raise_for_status()
                                data = got.content
                            else:
                                data = base64.b64decode(item.b64_json)
                            # The same image both ways: a PNG of the asked size.
                            assert data[:8] == b"\x89PNG\r\n\x1a\n"
                            assert struct.unpack(">II", data[16:24]) == (w, h)

                        cpu = via.cpu_seconds()
                        warmup = 2
                        mine, theirs = await interleaved(
                            [partial(call, via_sdk), partial(call, direct_sdk)], reps, warmup
                        )
                        cpu = via.cpu_seconds() - cpu
                        v, d = stats(mine), stats(theirs)
                        out[f"{size} {fmt}"] = {
                            "via_imgbot": v,
                            "direct": d,
                            "added_ms": round(v["median_ms"] - d["median_ms"], 3),
                            "relay_cpu_ms": round(cpu * 1000 / (reps + warmup), 3),
                            "ratio": round(v["median_ms"] / d["median_ms"], 3),
                        }
        finally:
            await direct_sdk.close()
            await via_sdk.close()
    return out


# --- 9. replicas: jobs/s with 1, 2 and 3 processes, and a takeover after kill -9 ----------


def replica_fleet(tmp: Path, plan: Plan) -> dict[str, Any]:
    """Run bench/replicas.py on a durable PostgreSQL server (its own, as in production).

    A failure of the fleet (a job lost, a replica that would not start) is raised, not
    reported as skipped: only a missing pytest or missing server binaries skip it.
    """
    try:
        from bench import replicas
        from tests.pg_server import ServerBinariesMissing
    except ImportError as err:  # tests/replica_kit.py and tests/pg_server.py need pytest
        return {"skipped": f"{err} (pip install -e '.[test,bench]')"}
    folder = tmp / "replicas"
    folder.mkdir(mode=0o700)
    try:
        with postgres_server(DURABLE) as server:
            return replicas.measure(server, folder, plan.replica_rounds)
    except ServerBinariesMissing as err:
        return {"skipped": str(err).splitlines()[0]}


async def run_all(plan: Plan, only: set[str]) -> dict[str, Any]:
    """Run the scenarios against two upstream processes and collect the results."""
    results: dict[str, Any] = {
        "command": "python -m bench.run",
        "machine": machine(),
        "versions": versions(),
        "commit": git_commit(),
        "upstream": "bench/upstream.py: tests/fake_api.py with photo-sized PNGs, delay 0, "
        "own process",
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    prefixed, plain = UpstreamProcess("b64_prefixed"), UpstreamProcess("b64")
    prefixed.start()
    plain.start()
    try:
        url, plain_url = prefixed.wait_ready(), plain.wait_ready()
        with tempfile.TemporaryDirectory(prefix="imgbot-bench-") as tmpdir, ExitStack() as pg:
            tmp = Path(tmpdir)
            backends = [Backend("sqlite")]
            if not only or only & {"overhead", "throughput"}:
                # The pipeline rows on PostgreSQL too: one durable server (as in production),
                # started the way the ledger rows start theirs.
                try:
                    backends.append(Backend("postgresql", pg.enter_context(
                        postgres_server(DURABLE)
                    )))
                except (ImportError, RuntimeError) as err:
                    results["postgresql_skipped"] = str(err).splitlines()[0]
            steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                ("overhead", lambda: overhead(url, tmp, plan, backends)),
                ("sdk", lambda: versus_sdk(plain_url, tmp, plan)),
                ("burst", lambda: asyncio.to_thread(burst, url, plan.burst_jobs)),
                ("ledger", lambda: ledger_pairs(tmp, plan)),
                ("throughput", lambda: throughput(url, tmp, plan, backends)),
                ("stream", lambda: streaming(plan)),
                ("relay", lambda: relay(tmp, plan)),
                ("replicas", lambda: asyncio.to_thread(replica_fleet, tmp, plan)),
            ]
            for name, step in steps:
                if (only and name not in only) or (not only and name in ON_REQUEST):
                    continue
                started = time.perf_counter()
                print(f"… {name}", file=sys.stderr, flush=True)
                results[name] = await step()
                print(
                    f"  {name} done in {time.perf_counter() - started:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        prefixed.stop()
        plain.stop()
    return results


def merge_into(path: Path, results: dict[str, Any], only: set[str]) -> dict[str, Any]:
    """Return the results in `path` with the scenarios just run replaced, and the rerun noted."""
    merged = json.loads(path.read_text())
    for name in only:
        merged[name] = results[name]
    merged["versions"] = results["versions"]
    note = {key: results[key] for key in ("commit", "load_before", "load_after", "plan", "seconds")}
    merged.setdefault("reruns", []).append({"scenarios": sorted(only), **note})
    return merged


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON; exit 1 if a target is missed."""
    parser = argparse.ArgumentParser(description="imgbot benchmark (see bench/README.md)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument(
        "--only", default="",
        help="comma-separated scenarios: overhead,sdk,burst,ledger,throughput,stream,relay;"
        " replicas (~10 min) runs only when named"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --only: put the scenarios run into --out, keep the others, recheck targets",
    )
    parser.add_argument("--child-burst", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--child-ledger", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--child-relay", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=50, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child_burst:
        print(json.dumps(asyncio.run(burst_child(args.child_burst, args.jobs))))
        return 0
    if args.child_relay:
        asyncio.run(relay_child(args.child_relay, args.folder))
        return 0
    if args.child_ledger:
        print(json.dumps(asyncio.run(ledger_child(args.child_ledger, args.jobs))))
        return 0

    plan = QUICK if args.quick else FULL
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    started = time.perf_counter()
    results = asyncio.run(run_all(plan, only))
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    results["plan"] = "quick" if args.quick else "full"
    results["seconds"] = round(time.perf_counter() - started, 1)
    if only and not args.merge:
        print(json.dumps(results, indent=2))
        return 0
    if only:
        results = merge_into(Path(args.out), results, only)
    results["targets"] = targets(results)
    results["all_targets_met"] = all(t["met"] for t in results["targets"])
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    m, v = results["machine"], results["versions"]
    print(
        f"\nimgbot benchmark — {m['cores']} cores ({m.get('cpu', '?')}), Python {v['python']}, "
        f"httpx {v['httpx']}, aiosqlite {v['aiosqlite']}, Pillow {v['Pillow']}, "
        f"openai {v['openai']}; {results['seconds']:.0f} s; load average "
        f"{results['load_before'][0]:.2f} before, {results['load_after'][0]:.2f} after\n"
    )
    print(table(results))
    print(f"\nwritten: {args.out}")
    return 0 if results["all_targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
