"""Telegram flood control: outgoing messages kept within the Bot API's documented rates.

Telegram answers 429 (`retry_after`) to a bot that sends more than about one message a
second to one chat, 20 a minute to one group, or 30 a second overall. `FloodLimiter` sits
at PTB's rate-limiter seam (`ApplicationBuilder.rate_limiter`), so every Bot API call of the
Application passes through it:

- Results, error replies and command answers wait for budget, each chat in arrival order.
- Status messages and chat actions (sent with `rate_limit_args=STATUS`) are best effort:
  when the chat's budget is tight they are skipped (`FloodSkipped`), never queued, so they
  cannot delay a result. They may use only part of a group's minute and of the overall
  second, and never go while a result waits for the same chat.
- A message counts from the moment the call to Telegram *finished*, so the spacing holds
  where Telegram measures it whatever the upload took; calls in flight hold their slot.
- A 429 blocks its chat for `retry_after` (the caller still retries, see
  `bots.telegram.reply.with_flood_retry`).

Time comes from a `Timebase`, so tests run the limiter (and the fake Bot API) scaled.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import time
import warnings
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from telegram.error import RetryAfter, TelegramError
from telegram.ext import BaseRateLimiter
from telegram.warnings import PTBDeprecationWarning

# rate_limit_args of a best-effort call (status message, chat action).
STATUS = "status"
# The documented limits (docs/platforms.md).
PER_CHAT_INTERVAL = 1.0
GROUP_PER_MINUTE = 20
OVERALL_PER_SECOND = 30
# Share of a budget that status messages must leave free for results.
GROUP_STATUS_RESERVE = 10
OVERALL_STATUS_RESERVE = 10
# One chat action shows for 5 s and covers every job of the chat: send at most this often.
CHAT_ACTION_EVERY = 4.0
RETRY_AFTER_CAP = 60.0
# How often a chat's turn (replicas) is held longer while its call is on the wire.
TURN_RENEW = 1.0
# How often a sender re-checks when a budget is held by calls still in flight.
POLL = 0.05
# Chats remembered before idle ones are forgotten (a bot may see many chats over months).
KEEP_CHATS = 1000

# Methods that put (or change) a message in a chat; sendMediaGroup counts each item.
MESSAGE_METHODS = frozenset(
    {
        "sendMessage",
        "sendPhoto",
        "sendDocument",
        "sendMediaGroup",
        "sendAnimation",
        "sendVideo",
        "sendSticker",
        "copyMessage",
        "forwardMessage",
        "editMessageText",
        "editMessageCaption",
        "editMessageMedia",
        "editMessageReplyMarkup",
    }
)

Callback = Callable[..., Coroutine[Any, Any, Any]]


# The part of Telegram's overall rate replicas share out (arrivals bunch up: see share_with).
SHARED_OVERALL = 0.75


class ChatGate(Protocol):
    """Turns to send to a chat, shared by the processes sending for one bot."""

    async def take(self, chat: str) -> bool:
        """Take the chat's turn now if no other process holds it."""

    async def done(self, chat: str, spacing: float) -> None:
        """The message went: keep the turn `spacing` seconds more, then let it go."""


class FloodSkipped(TelegramError):
    """A best-effort call was not sent: the chat's flood budget is kept for results."""


@dataclass(frozen=True)
class Timebase:
    """Seconds for the limiter; `scale` > 1 runs them faster than the wall clock (tests)."""

    scale: float = 1.0

    def now(self) -> float:
        """Return the current time in (scaled) seconds."""
        return time.monotonic() * self.scale

    async def sleep(self, seconds: float) -> None:
        """Sleep for (scaled) seconds."""
        await asyncio.sleep(max(0.0, seconds) / self.scale)


def message_cost(endpoint: str, data: dict[str, Any]) -> int:
    """Return how many messages a Bot API call sends or changes (0: not a message)."""
    if endpoint not in MESSAGE_METHODS:
        return 0
    if endpoint == "sendMediaGroup":
        return max(1, len(data.get("media") or ()))
    return 1


def is_group(chat_id: object) -> bool:
    """Say whether a chat id names a group, supergroup or channel (they are negative)."""
    if isinstance(chat_id, str):
        return not chat_id.lstrip("-").isdigit() or chat_id.startswith("-")
    return isinstance(chat_id, int) and chat_id < 0


def retry_seconds(err: RetryAfter) -> float:
    """Return a 429's retry_after in seconds, whatever PTB's representation."""
    # PTB 22 returns int seconds (with a deprecation warning) or a timedelta (PTB_TIMEDELTA=1).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = err.retry_after
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return float(value)


@dataclass(eq=False)
class _Slot:
    """Messages taken from a budget: in flight (`at` None) or sent at `at`."""

    cost: int
    at: float | None = None


@dataclass
class _Window:
    """At most `limit` messages in any `period` seconds."""

    limit: int
    period: float
    slots: list[_Slot] = field(default_factory=list)

    def _prune(self, now: float) -> None:
        self.slots = [s for s in self.slots if s.at is None or s.at > now - self.period]

    def used(self, now: float) -> int:
        """Return the messages counted now (in flight or sent within the period)."""
        self._prune(now)
        return sum(s.cost for s in self.slots)

    def delay(self, now: float, cost: int) -> float | None:
        """Return seconds until `cost` more fit (None: only a call in flight can free room)."""
        cost = min(cost, self.limit)
        excess = self.used(now) + cost - self.limit
        if excess <= 0:
            return 0.0
        freed = 0
        for slot in sorted((s for s in self.slots if s.at is not None), key=lambda s: s.at or 0):
            freed += slot.cost
            if freed >= excess:
                assert slot.at is not None
                return slot.at + self.period - now
        return None

    def take(self, cost: int) -> _Slot:
        """Count `cost` messages as in flight."""
        slot = _Slot(min(cost, self.limit))
        self.slots.append(slot)
        return slot


@dataclass
class _Chat:
    group: bool
    window: _Window | None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    queued: int = 0  # senders waiting for (or holding) this chat's turn
    last_done: float = -math.inf
    blocked_until: float = -math.inf
    last_action: dict[object, float] = field(default_factory=dict)


class FloodLimiter(BaseRateLimiter[str]):
    """PTB rate limiter that keeps within Telegram's flood limits, results before status."""

    def __init__(
        self,
        *,
        timebase: Timebase | None = None,
        per_chat_interval: float = PER_CHAT_INTERVAL,
        group_per_minute: int = GROUP_PER_MINUTE,
        overall_per_second: int = OVERALL_PER_SECOND,
        group_status_reserve: int = GROUP_STATUS_RESERVE,
        overall_status_reserve: int = OVERALL_STATUS_RESERVE,
        chat_action_every: float = CHAT_ACTION_EVERY,
        retry_after_cap: float = RETRY_AFTER_CAP,
    ) -> None:
        self.timebase = timebase or Timebase()
        self._interval = per_chat_interval
        self._group_per_minute = group_per_minute
        self._group_reserve = group_status_reserve
        self._overall = _Window(overall_per_second, 1.0)
        self._overall_reserve = overall_status_reserve
        self._action_every = chat_action_every
        self._retry_cap = retry_after_cap
        self._chats: dict[str, _Chat] = {}
        self._pruned_at = -math.inf
        self.skipped = 0  # best-effort calls not sent, for logs and tests
        # Replicas share one bot's budget: each sends at most its share of every rate.
        self._base = (per_chat_interval, group_per_minute, group_status_reserve,
                      overall_per_second, overall_status_reserve)
        self.replicas = 1
        self._fewer_since: float | None = None
        # Replicas: the one-message-a-second spacing per chat cannot be shared out by rates
        # (two processes may pick the same second), so a gate in the ledger takes turns.
        self.gate: ChatGate | None = None

    def share_with(self, replicas: int) -> None:
        """Keep to 1/`replicas` of every rate: N processes sending for one bot then stay
        within Telegram's limits together, with no traffic between them (the count comes
        from their heartbeats in the ledger; a dead one counts until its heartbeat ends,
        which errs on the slow side)."""
        n = max(1, int(replicas))
        if n == self.replicas:
            self._fewer_since = None
            return
        if n < self.replicas:
            # One gone: what it sent still counts in Telegram's windows (a group's is a
            # minute), so the others take its share only once that has passed.
            now = self.timebase.now()
            if self._fewer_since is None:
                self._fewer_since = now
            if now - self._fewer_since < 60.0:
                return
        self._fewer_since = None
        self.replicas = n
        interval, group, group_reserve, overall, overall_reserve = self._base
        self._interval = interval * n
        self._group_per_minute = max(1, group // n)
        self._group_reserve = group_reserve // n
        # Each process counts its own sends by its own clock; Telegram counts arrivals. Apart,
        # N shares can land bunched up, so replicas leave a quarter of the overall rate spare.
        self._overall.limit = max(1, overall // n if n == 1 else int(overall * SHARED_OVERALL) // n)
        self._overall_reserve = overall_reserve // n
        for chat in self._chats.values():
            if chat.window is not None:
                chat.window.limit = self._group_per_minute

    async def initialize(self) -> None:
        """Nothing to set up."""

    async def shutdown(self) -> None:
        """Nothing to release."""

    # --- budget -------------------------------------------------------------------------
    def _chat(self, chat_id: object) -> _Chat:
        key = str(chat_id)
        chat = self._chats.get(key)
        if chat is None:
            self._forget_idle()
            group = is_group(chat_id)
            window = _Window(self._group_per_minute, 60.0) if group else None
            chat = self._chats[key] = _Chat(group, window)
        return chat

    def _forget_idle(self) -> None:
        now = self.timebase.now()
        if len(self._chats) < KEEP_CHATS or now - self._pruned_at < 60.0:
            return
        self._pruned_at = now
        for key, chat in list(self._chats.items()):
            # Idle: nobody waiting or sending, and nothing it did still counts.
            quiet = max(chat.last_done, chat.blocked_until, *chat.last_action.values()) < now - 60
            if quiet and not chat.queued and not chat.lock.locked():
                del self._chats[key]

    def _delay(self, chat: _Chat, cost: int, now: float) -> float | None:
        """Seconds until `cost` messages may go to `chat` (None: wait for a call in flight)."""
        # With turns in the ledger the chat's spacing is already kept across processes (a
        # turn is held the spacing after each message): 1/N of it here as well would make
        # every chat N times slower than Telegram allows.
        spacing = self._base[0] if self.gate is not None else self._interval
        waits = [chat.blocked_until - now, chat.last_done + spacing - now]
        for window in (chat.window, self._overall):
            if window is None:
                continue
            wait = window.delay(now, cost)
            if wait is None:
                return None
            waits.append(wait)
        return max(0.0, *waits)

    def _status_fits(self, chat: _Chat, cost: int, now: float) -> bool:
        if chat.queued or chat.lock.locked() or self._delay(chat, cost, now) != 0.0:
            return False
        if chat.window is not None and (
            chat.window.used(now) + cost > chat.window.limit - self._group_reserve
        ):
            return False
        return self._overall.used(now) + cost <= self._overall.limit - self._overall_reserve

    @property
    def chats_tracked(self) -> int:
        """Return how many chats the limiter remembers."""
        return len(self._chats)

    def backlog(self, chat_id: object) -> int:
        """Return how many senders wait for a chat's turn."""
        chat = self._chats.get(str(chat_id))
        return chat.queued if chat is not None else 0

    # --- the seam -----------------------------------------------------------------------
    async def process_request(
        self,
        callback: Callback,
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: str | None,
    ) -> Any:
        """Send one Bot API call when the flood budget allows (or skip a best-effort one)."""
        chat_id = data.get("chat_id")
        if chat_id is None:
            return await callback(*args, **kwargs)
        chat = self._chat(chat_id)
        if endpoint == "sendChatAction":
            return await self._chat_action(chat, data, callback, args, kwargs)
        cost = message_cost(endpoint, data)
        if cost == 0:
            return await self._send(chat, callback, args, kwargs)
        if rate_limit_args == STATUS:
            if not self._status_fits(chat, cost, self.timebase.now()):
                self.skipped += 1
                raise FloodSkipped(f"{endpoint} skipped: chat {chat_id} is busy")
            await chat.lock.acquire()  # free: _status_fits saw it unlocked with no waiters
        else:
            chat.queued += 1
            try:
                await chat.lock.acquire()
                try:
                    await self._wait_for_budget(chat, cost)
                except BaseException:
                    chat.lock.release()
                    raise
            finally:
                chat.queued -= 1
        gated = False
        sent = asyncio.Event()
        keeping: asyncio.Task[None] | None = None
        try:
            if self.gate is not None:
                gated = await self._take_turn(str(chat_id), best_effort=rate_limit_args == STATUS)
                if not gated:
                    self.skipped += 1
                    raise FloodSkipped(f"{endpoint} skipped: another replica has chat {chat_id}")
                keeping = asyncio.create_task(self._keep_turn(str(chat_id), sent))
            return await self._send(chat, callback, args, kwargs, cost)
        finally:
            sent.set()
            try:
                if keeping is not None:
                    # A renewal on its way is let finish: written after the turn's end, it
                    # would hold the chat the whole TURN_HOLD instead of the spacing.
                    with contextlib.suppress(Exception):
                        await asyncio.shield(keeping)
                if gated and self.gate is not None:
                    await self._end_turn(str(chat_id))
            finally:
                # Even when the caller is cancelled meanwhile: the chat's next sender waits
                # on this lock.
                chat.lock.release()

    async def _keep_turn(self, chat: str, sent: asyncio.Event) -> None:
        """While a call is on the wire, hold the chat's turn a little longer each second: a
        long upload keeps it, and a process killed mid-call lets it go within seconds."""
        assert self.gate is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sent.wait(), TURN_RENEW)
            if sent.is_set():
                return
            try:
                await self.gate.take(chat)
            except Exception:  # noqa: BLE001 - a ledger in trouble: it ends with its lease
                pass

    async def _take_turn(self, chat: str, *, best_effort: bool) -> bool:
        """Wait until this process has the chat's turn (a best-effort call does not wait)."""
        assert self.gate is not None
        while True:
            try:
                if await self.gate.take(chat):
                    return True
            except Exception:  # noqa: BLE001 - a ledger in trouble must not stop results
                return True
            if best_effort:
                return False
            await asyncio.sleep(POLL * 2)

    async def _end_turn(self, chat: str) -> None:
        assert self.gate is not None
        try:
            await self.gate.done(chat, self._base[0] * 1.1)
        except Exception:  # noqa: BLE001 - the turn then ends with its lease
            pass

    async def _wait_for_budget(self, chat: _Chat, cost: int) -> None:
        while True:
            wait = self._delay(chat, cost, self.timebase.now())
            if wait == 0.0:
                return
            await self.timebase.sleep(POLL if wait is None else wait)

    async def _send(
        self, chat: _Chat, callback: Callback, args: Any, kwargs: dict[str, Any], cost: int = 0
    ) -> Any:
        slots = []
        if cost:
            slots.append(self._overall.take(cost))
            if chat.window is not None:
                slots.append(chat.window.take(cost))
        try:
            return await callback(*args, **kwargs)
        except RetryAfter as err:
            pause = min(retry_seconds(err), self._retry_cap)
            chat.blocked_until = max(chat.blocked_until, self.timebase.now() + pause)
            raise
        finally:
            if cost:
                done = self.timebase.now()
                chat.last_done = done
                for slot in slots:
                    slot.at = done

    async def _chat_action(
        self,
        chat: _Chat,
        data: dict[str, Any],
        callback: Callback,
        args: Any,
        kwargs: dict[str, Any],
    ) -> Any:
        # One action covers the whole chat (topic); a result waiting matters more.
        now = self.timebase.now()
        topic = data.get("message_thread_id")
        last = chat.last_action.get(topic, -math.inf)
        if now < chat.blocked_until or chat.queued or now - last < self._action_every:
            self.skipped += 1
            raise FloodSkipped("sendChatAction skipped")
        chat.last_action[topic] = now
        return await self._send(chat, callback, args, kwargs)
