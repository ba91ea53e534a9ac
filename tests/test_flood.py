"""The Telegram flood limiter on its own: per chat, per group, overall, status, 429.

The "network" is a coroutine that records when each call started and finished (the
limiter's contract is only with that callback). Time runs scaled (`Timebase`), so a
Telegram minute takes a fraction of a second; every figure below is in limiter seconds.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from telegram.error import RetryAfter

from bots.telegram import flood as telegram_flood
from bots.telegram.flood import STATUS, FloodLimiter, FloodSkipped, Timebase, is_group
from tests.fake_botapi import FakeBotApiServer
from tests.telegram_fake import TOKEN

pytestmark = pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")

GROUP = -1001234567890


@dataclass
class Network:
    """Stands in for Telegram: each call takes `duration` and is logged (start, end)."""

    timebase: Timebase
    duration: float = 0.0
    log: list[tuple[str, object, float, float]] = field(default_factory=list)
    refuse: list[float] = field(default_factory=list)  # retry_after of the next calls

    async def call(self, endpoint: str, chat_id: object) -> bool:
        start = self.timebase.now()
        await self.timebase.sleep(self.duration)
        if self.refuse:
            raise RetryAfter(int(self.refuse.pop(0)))
        self.log.append((endpoint, chat_id, start, self.timebase.now()))
        return True


def limiter(scale: float = 400, **options: Any) -> tuple[FloodLimiter, Network]:
    timebase = Timebase(scale=scale)
    return FloodLimiter(timebase=timebase, **options), Network(timebase)


async def send(
    lim: FloodLimiter,
    net: Network,
    chat_id: object,
    endpoint: str = "sendMessage",
    priority: str | None = None,
    **data: Any,
) -> bool:
    return await lim.process_request(
        net.call, (endpoint, chat_id), {}, endpoint, {"chat_id": chat_id, **data}, priority
    )


def starts(net: Network) -> list[float]:
    return sorted(start for _, _, start, _ in net.log)


async def test_one_chat_gets_one_message_a_second_counted_from_the_end_of_an_upload() -> None:
    lim, net = limiter()
    net.duration = 0.4  # a slow upload: the next message counts from when it finished
    await asyncio.gather(*(send(lim, net, 7, "sendPhoto") for _ in range(4)))
    log = sorted(net.log, key=lambda entry: entry[2])
    for (_, _, _, end), (_, _, start, _) in zip(log, log[1:], strict=False):
        assert start >= end + 1.0
    assert len(log) == 4


async def test_a_group_gets_at_most_20_messages_a_minute() -> None:
    lim, net = limiter(scale=1000)
    await asyncio.gather(*(send(lim, net, GROUP) for _ in range(23)))
    times = starts(net)
    assert len(times) == 23
    assert all(b - a >= 1.0 for a, b in zip(times, times[1:], strict=False))
    # Any 21 consecutive messages span more than a minute.
    assert all(times[i + 20] - times[i] >= 60.0 for i in range(len(times) - 20))
    assert times[20] >= times[0] + 60.0  # the 21st waited for the first to leave the minute


async def test_all_chats_together_get_at_most_30_messages_a_second() -> None:
    lim, net = limiter()
    await asyncio.gather(*(send(lim, net, 100 + i) for i in range(75)))
    times = starts(net)
    assert len(times) == 75
    assert all(times[i + 30] - times[i] >= 1.0 for i in range(len(times) - 30))


async def test_a_media_group_counts_each_item() -> None:
    lim, net = limiter(scale=1000)
    for _ in range(2):
        await send(lim, net, GROUP, "sendMediaGroup", media=[1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    await send(lim, net, GROUP)  # the minute holds 20 already
    assert net.log[2][2] - net.log[0][3] >= 60.0


async def test_status_is_skipped_while_a_result_waits_and_results_wait_their_turn() -> None:
    lim, net = limiter(scale=5)
    await send(lim, net, 5, "sendPhoto")
    # The chat spent its second: a status now is skipped at once, a result waits.
    with pytest.raises(FloodSkipped):
        await send(lim, net, 5, priority=STATUS)
    result = asyncio.create_task(send(lim, net, 5, "sendPhoto"))
    await asyncio.sleep(0)
    assert lim.backlog(5) == 1 and not result.done()
    await result
    assert net.log[1][2] >= net.log[0][3] + 1.0
    with pytest.raises(FloodSkipped):
        await send(lim, net, 5, priority=STATUS)  # the result just used the second
    await net.timebase.sleep(1.05)
    assert await send(lim, net, 5, "editMessageText", priority=STATUS)
    assert [endpoint for endpoint, *_ in net.log] == ["sendPhoto", "sendPhoto", "editMessageText"]
    assert lim.skipped == 2


async def test_status_uses_only_half_of_a_groups_minute() -> None:
    lim, net = limiter(scale=100)
    for _ in range(10):
        assert await send(lim, net, GROUP, priority=STATUS)
        await net.timebase.sleep(1.05)
    with pytest.raises(FloodSkipped):
        await send(lim, net, GROUP, priority=STATUS)
    assert await send(lim, net, GROUP, "sendPhoto")  # results still have the other half


async def test_status_uses_only_part_of_the_overall_second() -> None:
    lim, net = limiter(scale=2)
    sent = 0
    for chat in range(1, 31):
        try:
            await send(lim, net, chat, priority=STATUS)
            sent += 1
        except FloodSkipped:
            pass
    assert sent == 20  # 30 a second overall, 10 kept for results


async def test_a_429_blocks_the_chat_for_retry_after() -> None:
    lim, net = limiter(scale=20)
    net.refuse.append(3)
    with pytest.raises(RetryAfter):
        await send(lim, net, 9, "sendPhoto")
    refused_at = net.timebase.now()
    with pytest.raises(FloodSkipped):
        await send(lim, net, 9, priority=STATUS)
    await send(lim, net, 10)  # other chats are not blocked
    await send(lim, net, 9, "sendPhoto")
    other, retried = net.log
    assert other[1] == 10 and other[2] < refused_at + 3
    assert retried[1] == 9 and retried[2] >= refused_at + 3


async def test_one_chat_action_covers_the_chat_and_never_delays_a_result() -> None:
    lim, net = limiter(scale=20)
    assert await send(lim, net, GROUP, "sendChatAction", priority=STATUS)
    with pytest.raises(FloodSkipped):  # another job's action in the same chat: redundant
        await send(lim, net, GROUP, "sendChatAction", priority=STATUS)
    assert await send(lim, net, GROUP, "sendChatAction", priority=STATUS, message_thread_id=4)
    await net.timebase.sleep(4.1)
    assert await send(lim, net, GROUP, "sendChatAction", priority=STATUS)
    assert [e for e, *_ in net.log] == ["sendChatAction"] * 3


async def test_calls_that_send_no_message_are_not_held() -> None:
    lim, net = limiter(scale=1)  # real seconds: a held call would take one
    await send(lim, net, 5, "sendPhoto")
    await send(lim, net, 5, "deleteMessage", message_id=1)
    await send(lim, net, 5, "getFile")
    await lim.process_request(
        net.call, ("answerCallbackQuery", None), {}, "answerCallbackQuery", {}, None
    )
    assert net.log[-1][2] - net.log[0][3] < 0.5


async def test_idle_chats_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telegram_flood, "KEEP_CHATS", 3)
    lim, net = limiter(scale=1000)
    for chat in range(5):
        await send(lim, net, chat)
    assert lim.chats_tracked == 5  # pruned at most once a minute
    await net.timebase.sleep(61)
    await send(lim, net, GROUP)
    assert lim.chats_tracked == 1


def test_groups_are_negative_ids_or_usernames() -> None:
    assert is_group(-100123) and is_group("-100123") and is_group("@channel")
    assert not is_group(42) and not is_group("42")


def test_the_fake_bot_api_refuses_floods_like_telegram() -> None:
    # The load tests rely on this oracle: a bot that ignored the limits would see 429s.
    # Time almost stands still here (a wall-clock second is 10 ms of Telegram time).
    with FakeBotApiServer(TOKEN, timebase=Timebase(scale=0.01), flood=True) as tg:
        url = f"{tg.base_url}/bot{TOKEN}"
        with httpx.Client() as client:

            def say(chat: int) -> httpx.Response:
                return client.post(f"{url}/sendMessage", data={"chat_id": chat, "text": "hi"})

            assert say(7).status_code == 200
            refused = say(7)  # the same chat within a second
            assert refused.status_code == 429
            assert refused.json()["parameters"]["retry_after"] >= 1
            gone = client.post(f"{url}/deleteMessage", data={"chat_id": 7, "message_id": 1})
            assert gone.status_code == 200  # deleting is not sending
            assert [say(100 + i).status_code for i in range(30)] == [200] * 29 + [429]
        assert len(tg.flood_refusals) == 2


def test_replicas_share_the_rates_and_take_a_gone_ones_share_only_after_a_minute() -> None:
    class Clock(Timebase):
        def __init__(self) -> None:
            super().__init__()
            self.at = 1000.0

        def now(self) -> float:
            return self.at

    clock = Clock()
    limiter = FloodLimiter(timebase=clock)
    limiter.share_with(3)
    assert limiter._overall.limit == 7 and limiter._group_per_minute == 6
    assert limiter._interval == pytest.approx(3.0)
    # One replica gone: its sends still count in Telegram's windows for a minute.
    limiter.share_with(2)
    assert limiter.replicas == 3
    clock.at += 59
    limiter.share_with(2)
    assert limiter.replicas == 3
    clock.at += 2
    limiter.share_with(2)
    assert limiter.replicas == 2 and limiter._overall.limit == 11
    limiter.share_with(4)  # more replicas: a smaller share at once
    assert limiter.replicas == 4 and limiter._group_per_minute == 5


def test_with_turns_in_the_ledger_a_chat_keeps_telegrams_spacing_not_n_times_it() -> None:
    # Three replicas: the overall and group rates are shared out (with a quarter spare), but a
    # chat's one message a second is kept by turns in the ledger (held the spacing after each
    # send), so each process must not also wait three seconds between a chat's messages.
    class Clock(Timebase):
        at = 1000.0

        def now(self) -> float:
            return self.at

    class Turns:
        async def take(self, chat: str) -> bool:
            return True

        async def done(self, chat: str, spacing: float) -> None:
            pass

    clock = Clock()
    alone, gated = FloodLimiter(timebase=clock), FloodLimiter(timebase=clock)
    gated.gate = Turns()
    for limiter in (alone, gated):
        limiter.share_with(3)
        limiter._chat(42).last_done = clock.at
    clock.at += 1.05
    assert alone._delay(alone._chat(42), 1, clock.now()) == pytest.approx(1.95)
    assert gated._delay(gated._chat(42), 1, clock.now()) == 0.0


async def test_a_chats_turn_is_kept_while_a_long_upload_is_on_the_wire_and_then_let_go(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two replicas' limiters on one real ledger. A's upload outlasts the turn's hold several
    # times: its turn is renewed while the call runs, so B cannot send to the chat meanwhile;
    # once A's call ends (plus the chat's spacing), B has the turn. A process killed mid-call
    # renews nothing, and its turn ends TURN_HOLD after its last renewal.
    from types import SimpleNamespace

    from bots.telegram import app as telegram_app
    from bots.telegram.app import LedgerGate
    from core.store import Limits, open_store

    monkeypatch.setattr(telegram_app, "TURN_HOLD", 0.3)
    monkeypatch.setattr(telegram_flood, "TURN_RENEW", 0.05)
    store = await open_store(f"sqlite:///{tmp_path}/imgbot.db", Limits())
    try:
        a, b = FloodLimiter(per_chat_interval=0.1), FloodLimiter(per_chat_interval=0.1)
        a.gate = LedgerGate(SimpleNamespace(coordination=store, owner="a:1"))  # type: ignore[arg-type]
        b.gate = LedgerGate(SimpleNamespace(coordination=store, owner="b:1"))  # type: ignore[arg-type]
        uploading = asyncio.Event()

        async def upload() -> str:
            uploading.set()
            await asyncio.sleep(1.0)  # more than three holds
            return "sent"

        sending = asyncio.create_task(
            a.process_request(upload, (), {}, "sendPhoto", {"chat_id": 42}, None)
        )
        await uploading.wait()
        await asyncio.sleep(0.6)  # two holds past the first: held only if renewed
        assert not await b.gate.take("42")
        assert await sending == "sent"
        await asyncio.sleep(0.2)  # the spacing after A's message
        assert await b.gate.take("42")
    finally:
        await store.close()


async def test_a_sender_cancelled_while_its_turn_ends_does_not_keep_the_chat_locked() -> None:
    # The ledger is slow to end a chat's turn and the caller gives up meanwhile (a job cancelled,
    # a shutdown): the chat's next message must still go.
    ending = asyncio.Event()

    class SlowTurns:
        async def take(self, chat: str) -> bool:
            return True

        async def done(self, chat: str, spacing: float) -> None:
            ending.set()
            await asyncio.sleep(30)

    flood = FloodLimiter(per_chat_interval=0.0)
    flood.gate = SlowTurns()

    async def call() -> str:
        return "sent"

    first = asyncio.create_task(
        flood.process_request(call, (), {}, "sendMessage", {"chat_id": 7}, None)
    )
    await asyncio.wait_for(ending.wait(), 5)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    flood.gate = None  # the next one needs no turn: only the chat's lock is in question
    assert await asyncio.wait_for(
        flood.process_request(call, (), {}, "sendMessage", {"chat_id": 7}, None), 5
    ) == "sent"
