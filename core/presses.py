"""Button presses a user repeats within a few seconds count once (platform-free).

A nervous double or triple tap on "again" arrives as separate presses a fraction of a
second apart; each would start (and charge) its own job. `PressWindow.first(key)` says
whether a press is the first of its kind in the window; the key names the button and
the presser, e.g. (user_key, chat, job_id, action).

The window lives in memory: after a restart a press counts again, which is harmless (a
restart takes longer than the window).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

PRESS_WINDOW = 5.0
# Presses remembered before old ones are forgotten, so memory stays bounded.
KEEP_PRESSES = 10000


class PressWindow:
    """Remember presses for `window` seconds; only the first of a burst goes through."""

    def __init__(
        self, window: float = PRESS_WINDOW, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._window = window
        self._clock = clock
        self._seen: dict[Hashable, float] = {}

    def first(self, key: Hashable) -> bool:
        """Record a press; say whether it is the first of its key within the window."""
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last < self._window:
            return False  # the window counts from the first press: a burst is one job
        if len(self._seen) >= KEEP_PRESSES:
            self._seen = {k: t for k, t in self._seen.items() if now - t < self._window}
        self._seen[key] = now
        return True
