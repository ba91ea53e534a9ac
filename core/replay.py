"""The replay buttons under a result ("again", "4K", "vary") and their one id codec.

A button's data names the job and the action, behind a per-platform prefix that keeps each
platform's wire format (Telegram `j:<id>:<action>`, Discord `imgbot:job:<id>:<action>`).
The data is all a later press needs, even after a restart: the job is looked up then.
Pressed data is untrusted input (a client can send any); `decode` accepts only this shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, cast

ReplayAction = Literal["again", "4k", "vary"]
ACTIONS: tuple[ReplayAction, ...] = ("again", "4k", "vary")


@dataclass(frozen=True)
class ReplayCodec:
    """Encode and decode the data of replay buttons for one platform's prefix."""

    prefix: str
    # The most digits a job id may have here: what is longer is not our data at all.
    id_digits: int = 18

    @property
    def pattern(self) -> str:
        """Return the regular expression of the data, with groups `job_id` and `action`."""
        actions = "|".join(ACTIONS)
        job_id = rf"[0-9]{{1,{self.id_digits}}}"
        return rf"{re.escape(self.prefix)}(?P<job_id>{job_id}):(?P<action>{actions})"

    def encode(self, job_id: int, action: ReplayAction) -> str:
        """Return the data of one button."""
        return f"{self.prefix}{job_id}:{action}"

    def decode(self, data: str | None) -> tuple[int, ReplayAction] | None:
        """Return (job id, action) of a button's data, or None if it is not one of ours."""
        match = re.fullmatch(self.pattern, data or "")
        if match is None:
            return None
        return int(match["job_id"]), cast(ReplayAction, match["action"])
