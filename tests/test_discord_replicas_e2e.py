"""Discord on two replicas, end to end: two real `imgbot run` processes on one real
PostgreSQL share the four gateway shards of one bot, two each, against a fake Discord
(`tests.discord_server`: REST, interaction webhooks, CDN and gateway on 127.0.0.1).

The test plays Discord and its users. Slash commands arrive on the shard that owns their
server (DMs on shard 0), in four servers and in DMs, a few with a token near its end
(their results go to the channel); result buttons are pressed, "again" twice in a row; one
user asks for more than the daily limit allows, in every server at once. Mid-load the
replica holding shard 0 is killed with SIGKILL while Discord is slow to answer: one
interaction it had taken was never acknowledged, and other jobs of it were waiting or
drawing. Users whose interaction failed ask again, as people do.

Afterwards: every job in the ledger was delivered exactly once (one upload of its image,
in its interaction or its channel), charged once at the price of its recorded usage, and
the running totals equal the jobs; the fleet never drew more than MAX_JOBS_IN_FLIGHT at
once, nor let the heavy user spend past the daily limit; the dead replica's jobs were
carried on by the other, each user told, through the interaction's webhook or, for a token
too old or never acknowledged, in the channel; a double press started one job; the survivor
holds all four shards, each connected once, and no shard was ever connected twice; the
commands were synced once; no log holds a secret.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bots.discord.texts import text
from core.config import Settings
from core.pricing import PriceTable, estimate_credits
from core.prompt import PromptDefaults, parse_command
from core.store import Limits, NamedLease, open_store
from tests import discord_payloads as p
from tests.conftest import TEST_KEY
from tests.discord_server import ACK_WINDOW, Call, FakeDiscordServer
from tests.fake_api import FakeImageAPI
from tests.pg_server import PASSWORD as PG_PASSWORD
from tests.pg_server import pg_server, pg_url  # noqa: F401 - fixtures
from tests.replica_kit import spawn_replica
from tests.secret_guard import DISCORD_TEST_TOKEN as TOKEN
from tests.test_durable import exact, jobs_of
from tests.test_process import BotProcess

SHARDS = 4
LEASE = "2"  # JOB_LEASE: a dead replica's shards and jobs are taken over within seconds
IN_FLIGHT = 3  # MAX_JOBS_IN_FLIGHT, for the whole fleet
DRAW_SECONDS = 0.4
USERS = 20
HEAVY_ASKS = 9
ALLOWANCE = 6.5  # USER_DAILY_LIMIT, in "low" jobs
AGED = 870.0  # an interaction this old has 30 s of token left: its result goes to the channel
FINAL = ("delivered", "undelivered", "failed", "cancelled")


def guild(shard: int) -> int:
    """Return a server id that Discord routes to `shard` ((id >> 22) % 4)."""
    return ((1_400_000_000_000 + shard) << 22) + 5


def channel(shard: int) -> int:
    """Return the channel of the server on `shard`."""
    return guild(shard) + 1


@dataclass(frozen=True)
class Person:
    """A user of the bot, at home in a server (by its shard) or in DMs (None)."""

    id: int
    name: str
    shard: int | None

    def place(self, fake: FakeDiscordServer, shard: int | None = None) -> dict[str, Any]:
        """Return where an interaction of this user comes from (another server: `shard`)."""
        shard = self.shard if shard is None else shard
        if shard is None:
            return {"guild": False, "channel_id": fake.dm_channel(self.id)}
        return {"guild_id": guild(shard), "channel_id": channel(shard)}


PEOPLE = [Person(8000 + i, f"user{i}", None if i % 5 == 0 else i % SHARDS) for i in range(USERS)]
LATE = Person(8100, "late", 1)  # sends the interaction the dying replica never acknowledges
HEAVY = Person(8200, "heavy", 3)  # asks for more than the daily limit allows


class CountingImageAPI(FakeImageAPI):
    """The fake image API, counting the draws it serves at once."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.drawing = 0
        self.peak = 0
        self._counting = threading.Lock()

    def _handle_post(self, h: Any) -> None:
        with self._counting:
            self.drawing += 1
            self.peak = max(self.peak, self.drawing)
        try:
            super()._handle_post(h)
        finally:
            with self._counting:
                self.drawing -= 1


@pytest.fixture
def discord_fake() -> Iterator[FakeDiscordServer]:
    with FakeDiscordServer(TOKEN, SHARDS) as fake:
        for shard in range(SHARDS):
            fake.add_channel(channel(shard))
        yield fake


@pytest.fixture
def images() -> Iterator[CountingImageAPI]:
    with CountingImageAPI(key=TEST_KEY, delay=DRAW_SECONDS) as api:
        yield api


def low_estimate() -> float:
    """Return what one "low" job reserves (the daily limit is counted in them)."""
    config = Settings(_env_file=None)  # type: ignore[call-arg]
    request = parse_command("low thing", PromptDefaults.from_settings(config))
    return estimate_credits(request, PriceTable.from_settings(config))


def start_replica(
    tmp_path: Path, n: int, fake: FakeDiscordServer, images: FakeImageAPI, url: str
) -> BotProcess:
    """Start `imgbot run` number n (Discord only) against the fake Discord."""
    data = tmp_path / f"replica-{n}"
    data.mkdir(mode=0o700)
    # Each replica its own DATA_DIR (heartbeat), no folder shared: results are kept in the
    # ledger, as deployed.
    return spawn_replica(tmp_path, n, {
        "DISCORD_FAKE_URL": fake.url,
        "DISCORD_BOT_TOKEN": TOKEN,
        "DISCORD_SHARD_COUNT": str(SHARDS),
        "OPENAI_BASE_URL": images.base_url,
        "OPENAI_API_KEY": TEST_KEY,
        "DATABASE_URL": url,
        "DATA_DIR": str(data),
        "JOB_LEASE": LEASE,
        "MAX_JOBS_IN_FLIGHT": str(IN_FLIGHT),
        "MAX_JOBS_PER_USER": "1",
        "MAX_QUEUED_PER_USER": "12",
        "RATE_LIMIT_PER_MINUTE": "0",
        "USER_DAILY_LIMIT": f"{ALLOWANCE * low_estimate():.2f}",
        "DELIVERY_RETRY_DELAY": "0.2",
        "PREVIEWS": "off",
        "PROGRESS_INTERVAL": "5",
        "LOG_LEVEL": "INFO",
        "WEB_PORT": "0",
    }, ("tests.discord_replica",))


# --- the ledger, as the test reads it -----------------------------------------------------


@dataclass(frozen=True)
class Ledger:
    """The jobs (with where each was asked) and the live named leases, read at once."""

    jobs: list[dict[str, Any]]
    leases: list[NamedLease]

    def by_token(self) -> dict[str, dict[str, Any]]:
        """Return the jobs by the interaction they came from."""
        return {origin(job)["token"]: job for job in self.jobs}

    def owner_of(self, bot: BotProcess) -> str:
        """Return the ledger name of a replica (its heartbeat names its pid)."""
        (owner,) = {
            lease.owner for lease in self.leases
            if lease.name.startswith("replica:") and lease.owner.split(":")[-2] == str(bot.proc.pid)
        }
        return owner

    def shards(self) -> dict[int, str]:
        """Return each shard's holder."""
        return {
            int(lease.name.rsplit(":", 1)[1]): lease.owner
            for lease in self.leases if lease.name.startswith("discord:shard:")
        }


def read_ledger(url: str) -> Ledger:
    async def read() -> Ledger:
        store = await open_store(url, Limits())
        try:
            async with store.snapshot() as reader:
                jobs = await reader.rows("jobs", limit=1000)
            now = time.time()
            leases = [lease for lease in await store.leases("") if lease.until.timestamp() > now]
            return Ledger(jobs, leases)
        finally:
            await store.close()

    return asyncio.run(read())


def origin(job: dict[str, Any]) -> dict[str, str]:
    """Return where a job's answers go (its interaction token, channel, user)."""
    return json.loads(job["request_json"])["origin"]


def shard_of_job(job: dict[str, Any]) -> int:
    """Return the shard the job's interaction came on (DMs: shard 0)."""
    place = int(origin(job)["channel"])
    return next((shard for shard in range(SHARDS) if channel(shard) == place), 0)


def taken_by(job: dict[str, Any], owner: str, shards: set[int]) -> bool:
    """Say whether an open job is held by `owner`, whose replica holds `shards`.

    A job reserved less than a third of JOB_LEASE ago has no lease owner yet (the first
    renewal writes it): it belongs to the replica whose shard its interaction came on.
    """
    if job["stage"] in FINAL:
        return False
    if job["lease_owner"] is None:
        return shard_of_job(job) in shards
    return bool(job["lease_owner"] == owner)


def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s")
        time.sleep(0.1)


# --- what the users do -------------------------------------------------------------------


def ask(fake: FakeDiscordServer, make: Callable[[], dict[str, Any]]) -> list[str]:
    """Send an interaction as a user does: again after "This interaction failed" (no
    shard connected for it, or no answer within 3 s); return the tokens of every try."""
    tokens: list[str] = []
    for _ in range(80):
        payload = make()
        tokens.append(payload["token"])
        if fake.dispatch(payload):
            deadline = time.monotonic() + ACK_WINDOW + 0.5
            while time.monotonic() < deadline:
                if fake.answered(payload["token"]):
                    return tokens
                time.sleep(0.05)
        time.sleep(0.25)
    raise AssertionError(f"no answer to {len(tokens)} tries")


def img(fake: FakeDiscordServer, person: Person, prompt: str, **place: Any) -> list[str]:
    """Ask for `/img prompt` as `person` (in their place unless told), again until answered."""
    where = {**person.place(fake), **place}
    return ask(fake, lambda: p.slash(
        "img", [p.option("prompt", prompt)], user_id=person.id, username=person.name, **where
    ))


def job_files(call: Call) -> set[int]:
    """Return the jobs whose result images a call uploaded."""
    return {
        int(match.group(1)) for f in call.files
        if (match := re.fullmatch(r"imgbot-(\d+)-\d+\.\w+", f.filename))
    }


def deliveries(fake: FakeDiscordServer) -> dict[int, list[Call]]:
    """Return, by job, the calls that delivered its image."""
    found: dict[int, list[Call]] = {}
    for call in fake.of():
        for job_id in job_files(call):
            found.setdefault(job_id, []).append(call)
    return found


def press(
    fake: FakeDiscordServer, person: Person, result: Call, action: str, times: int
) -> list[str]:
    """Press a result's button `times` in a row (no waiting between); return the tokens."""
    message = result.answer or {}
    (job_id,) = job_files(result)
    payloads = [
        p.button_press(
            f"imgbot:job:{job_id}:{action}", message, user_id=person.id, username=person.name,
            **person.place(fake),
        )
        for _ in range(times)
    ]
    for payload in payloads:
        assert fake.dispatch(payload)
    tokens = [payload["token"] for payload in payloads]
    wait_for(lambda: all(fake.answered(t) for t in tokens), 10, "presses answered")
    return tokens


# --- the steps ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    """The two replicas once they share the shards: the one to die and the one to stay."""

    victim: BotProcess
    survivor: BotProcess
    victim_owner: str
    survivor_owner: str
    victim_shards: frozenset[int]


def start_fleet(
    tmp_path: Path, fake: FakeDiscordServer, images: FakeImageAPI, url: str,
    replicas: list[BotProcess],
) -> Fleet:
    """Start one replica (it takes every shard and syncs the commands), then a second
    (two shards are handed over to it); return them once each counts the other."""
    replicas.append(start_replica(tmp_path, 0, fake, images, url))
    wait_for(lambda: sorted(fake.connected()) == [0, 1, 2, 3], 30, "every shard connected")
    replicas.append(start_replica(tmp_path, 1, fake, images, url))

    def split() -> bool:
        holders = Counter(read_ledger(url).shards().values())
        return sorted(holders.values()) == [2, 2] and fake.connected() == dict.fromkeys(
            range(SHARDS), 1
        )

    wait_for(split, 30, "shards split two and two")
    # The fleet's caps need each replica to count the other before the load.
    wait_for(lambda: all("2 imgbot process(es) share this ledger" in bot.output()
                         for bot in replicas), 20, "replicas see each other")
    ledger = read_ledger(url)
    owners = {bot.proc.pid: ledger.owner_of(bot) for bot in replicas}
    # The one holding shard 0 dies: it takes the DMs with it.
    victim = next(bot for bot in replicas if owners[bot.proc.pid] == ledger.shards()[0])
    survivor = next(bot for bot in replicas if bot is not victim)
    shards = frozenset(s for s, owner in ledger.shards().items() if owner == owners[victim.proc.pid])
    return Fleet(victim, survivor, owners[victim.proc.pid], owners[survivor.proc.pid], shards)


def first_results(
    pool: ThreadPoolExecutor, fake: FakeDiscordServer, url: str
) -> tuple[dict[str, list[str]], dict[Person, Call]]:
    """Round one: every user asks once, in their server or DMs; return the tokens by
    command, and each user's delivered result once all are delivered."""
    futures = {
        f"low thing {i}-1": pool.submit(img, fake, person, f"low thing {i}-1")
        for i, person in enumerate(PEOPLE)
    }
    asked = {command: future.result() for command, future in futures.items()}

    def delivered() -> dict[Person, Call] | None:
        jobs = read_ledger(url).by_token()
        uploads = deliveries(fake)
        results = {}
        for i, person in enumerate(PEOPLE):
            done = [jobs[t] for t in asked[f"low thing {i}-1"]
                    if jobs.get(t, {}).get("stage") == "delivered"]
            if not done:
                return None
            (results[person],) = uploads[done[0]["id"]]
        return results

    wait_for(lambda: delivered() is not None, 40, "round one delivered")
    return asked, delivered() or {}


def second_round(pool: ThreadPoolExecutor, fake: FakeDiscordServer) -> dict[str, Any]:
    """Round two, not waited for: everyone asks again (two with a token near its end),
    and the heavy user asks nine times at once, in every server (so on both replicas)."""
    futures = {}
    for i, person in enumerate(PEOPLE):
        futures[f"low thing {i}-2"] = pool.submit(
            img, fake, person, f"low thing {i}-2", **({"age": AGED} if i in (3, 6) else {})
        )
    for n in range(HEAVY_ASKS):
        futures[f"low heavy {n}"] = pool.submit(
            img, fake, HEAVY, f"low heavy {n}", **HEAVY.place(fake, n % SHARDS)
        )
    return futures


@dataclass(frozen=True)
class Death:
    """What the killed replica left: its open jobs, and the interaction it took but
    Discord never had its acknowledgement of."""

    left: list[dict[str, Any]]
    unanswered: str


def kill_mid_load(fake: FakeDiscordServer, url: str, fleet: Fleet) -> Death:
    """Once the victim has jobs waiting or drawing, make Discord slow, let the victim take
    one more interaction (its acknowledgement is held), and kill it with SIGKILL."""

    def busy() -> bool:
        return sum(
            job["lease_owner"] == fleet.victim_owner and job["stage"] in ("queued", "drawing")
            for job in read_ledger(url).jobs
        ) >= 2

    wait_for(busy, 20, "the victim has jobs waiting or drawing")
    fake.hold()
    unanswered = p.slash("img", [p.option("prompt", "low never acknowledged")],
                         user_id=LATE.id, username=LATE.name, **LATE.place(fake))
    assert fake.dispatch(unanswered)
    wait_for(lambda: unanswered["token"] in read_ledger(url).by_token(), 10,
             "the unacknowledged job reserved")
    # Every upload Discord took is in the ledger before the kill, so each delivery below
    # is one (Discord took no upload of a dead process without the process knowing).
    uploaded = set(deliveries(fake))
    wait_for(lambda: all(
        job["stage"] in FINAL for job in read_ledger(url).jobs if job["id"] in uploaded
    ), 10, "uploads recorded")
    fleet.victim.proc.send_signal(signal.SIGKILL)
    fleet.victim.proc.wait()
    left = [job for job in read_ledger(url).jobs
            if taken_by(job, fleet.victim_owner, fleet.victim_shards)]
    fake.release()
    return Death(left, unanswered["token"])


# --- the checks ---------------------------------------------------------------------------


def check_each_job_delivered_and_charged_once(
    fake: FakeDiscordServer, images: FakeImageAPI, url: str, jobs: dict[int, dict[str, Any]]
) -> None:
    """One upload of its image per job, where it was asked; charged at its usage's price;
    the running totals equal the jobs; each draw a job's, or a lost draw's."""
    jobs_of(url)  # checks the running totals equal the jobs' charges
    uploads = deliveries(fake)
    unsent = {
        job_id: (job["command_text"], job["stage"], job["attempts"],
                 [(c.kind, c.status) for c in list(fake.calls) if c.token == origin(job)["token"]])
        for job_id, job in jobs.items() if job_id not in uploads
    }
    assert not unsent
    assert set(uploads) == set(jobs)
    for job_id, job in jobs.items():
        assert (job["stage"], job["status"]) == ("delivered", "succeeded"), job
        assert job["actual_credits"] == pytest.approx(exact(job)), job_id
        (call,) = uploads[job_id]
        place = origin(job)
        if call.kind == "channel_message":
            assert call.channel == place["channel"]
            assert call.content == text("en", "discord.late", mention=f"<@{place['user']}>")
        else:
            assert call.kind in ("edit_original", "followup") and call.token == place["token"]
    draws = [r for r in images.api_requests if r.path.startswith("/v1/images/")]
    lost = sum(job["attempts"] - 1 for job in jobs.values())
    assert len(jobs) <= len(draws) <= len(jobs) + lost


def check_presses(
    fake: FakeDiscordServer, by_token: dict[str, dict[str, Any]],
    doubles: list[list[str]], varies: list[list[str]],
) -> None:
    """A double press is one job, the other press told privately; "vary" drew from the
    delivered image (fetched back from the CDN)."""
    for tokens in doubles:
        made = [t for t in tokens if t in by_token]
        assert len(made) == 1, tokens
        (other,) = set(tokens) - set(made)
        (answer,) = [c for c in fake.of("callback") if c.token == other]
        assert answer.ephemeral and answer.content == text("en", "discord.press_repeated")
    for (token,) in varies:
        assert by_token[token]["reference_count"] == 1


def check_caps(
    fake: FakeDiscordServer, images: CountingImageAPI, asked: dict[str, list[str]],
    jobs: dict[int, dict[str, Any]], by_token: dict[str, dict[str, Any]],
) -> None:
    """The heavy user never spent past the daily limit across both replicas, the asks
    over it refused privately as the first answer; the fleet drew at most
    MAX_JOBS_IN_FLIGHT at once."""
    heavy = f"discord:{HEAVY.id}"
    spent = sum(job["actual_credits"] for job in jobs.values() if job["user_key"] == heavy)
    assert spent <= ALLOWANCE * low_estimate() + 1e-6
    refused = [t for command, tokens in asked.items() if command.startswith("low heavy")
               for t in tokens if t not in by_token and fake.answered(t)]
    assert refused
    for token in refused:
        (answer,) = [c for c in fake.of("callback") if c.token == token]
        assert answer.ephemeral and (answer.json or {}).get("type") == 4
    assert images.peak <= IN_FLIGHT


def check_taken_over(fake: FakeDiscordServer, death: Death) -> None:
    """Each job the dead replica left was carried on by the survivor, its user told:
    through the interaction's webhook while that works, else in the channel (a token too
    old, or an interaction Discord never had an acknowledgement of: Unknown Webhook)."""
    assert death.unanswered in {origin(job)["token"] for job in death.left}
    assert not fake.answered(death.unanswered)
    uploads = deliveries(fake)
    notices = [c.content for c in fake.of("channel_message") if not c.files]
    ways = set()
    for job in death.left:
        place = origin(job)
        assert f"<@{place['user']}> {text('en', 'job.resumed', job_id=job['id'])}" in notices
        (call,) = uploads[job["id"]]
        fresh = time.time() - float(place["token_at"]) < 14 * 60
        webhook = fresh and fake.answered(place["token"])
        assert call.kind == ("followup" if webhook else "channel_message"), job["id"]
        ways.add(call.kind)
    assert ways == {"followup", "channel_message"}


# --- the test -----------------------------------------------------------------------------


def test_two_discord_replicas_with_two_shards_each_behave_as_one_bot(
    tmp_path: Path,
    discord_fake: FakeDiscordServer,
    images: CountingImageAPI,
    pg_url: str,  # noqa: F811
) -> None:
    fake = discord_fake
    replicas: list[BotProcess] = []
    try:
        fleet = start_fleet(tmp_path, fake, images, pg_url, replicas)
        with ThreadPoolExecutor(max_workers=40) as pool:
            asked, results = first_results(pool, fake, pg_url)
            # "again" pressed twice in a row by six users, "vary" once by two.
            in_servers = [person for person in PEOPLE if person.shard is not None]
            doubles = [press(fake, who, results[who], "again", 2) for who in in_servers[:6]]
            varies = [press(fake, who, results[who], "vary", 1) for who in in_servers[6:8]]
            later = second_round(pool, fake)
            death = kill_mid_load(fake, pg_url, fleet)
            # Right after the death, interactions on its shards fail (Discord has no
            # session for them) until the survivor takes the shards over and answers.
            for i in range(SHARDS):
                later[f"low thing {i}-3"] = pool.submit(img, fake, PEOPLE[i], f"low thing {i}-3")
            asked.update({command: future.result() for command, future in later.items()})

        wait_for(lambda: all(job["stage"] in FINAL for job in read_ledger(pg_url).jobs), 60,
                 "every job ended")
        ledger = read_ledger(pg_url)
        jobs = {job["id"]: job for job in ledger.jobs}
        by_token = ledger.by_token()
        check_each_job_delivered_and_charged_once(fake, images, pg_url, jobs)
        # Each command asked has its job (a retry after a failed interaction may have
        # made one more: the user asked twice, and each was delivered once).
        for command, tokens in asked.items():
            assert command.startswith("low heavy") or any(t in by_token for t in tokens), command
        check_presses(fake, by_token, doubles, varies)
        check_caps(fake, images, asked, jobs, by_token)
        check_taken_over(fake, death)
        for i in range(SHARDS):
            if PEOPLE[i].shard in (None, *fleet.victim_shards):  # DMs come on shard 0
                assert len(asked[f"low thing {i}-3"]) > 1  # the first try failed

        # The survivor holds all four shards, each connected once; no shard was ever
        # connected by two sessions at once; the commands were synced once.
        every = dict.fromkeys(range(SHARDS), fleet.survivor_owner)
        wait_for(lambda: read_ledger(pg_url).shards() == every
                 and fake.connected() == dict.fromkeys(range(SHARDS), 1),
                 10, "the survivor holds every shard")
        assert fake.double_connects == []
        assert Counter(fake.identified) == dict.fromkeys(range(SHARDS), 2)
        assert len(fake.of("sync")) == 1

        assert fleet.survivor.stop(signal.SIGTERM, within=30) == 0
        sent = [t for tokens in [*asked.values(), *doubles, *varies] for t in tokens]
        for bot in replicas:
            log = bot.output()
            for secret in (TOKEN, TEST_KEY, PG_PASSWORD, death.unanswered, *sent):
                assert secret not in log
    finally:
        for number, bot in enumerate(replicas):
            if bot.proc.poll() is None:
                bot.proc.kill()
                bot.proc.wait()
            # Shown by pytest only when the test failed.
            print(f"--- replica {number} (exit {bot.proc.returncode}) ---")
            print("\n".join(bot.output().splitlines()[-120:]))
