"""Who asks: the platform-free identity of a requester."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Requester:
    """A person asking from one chat on one platform."""

    platform: str  # "telegram", "discord", "cli"
    user_id: str
    chat_id: str | None = None  # None for a private chat / DM / terminal
    display_name: str = ""
    language: str | None = None  # raw platform language code ("zh-hans", "en-US", …)
    is_admin: bool = False  # a configured bot admin: every admin action, everywhere
    is_group: bool = False
    # Administers this chat on its platform (Discord: Manage Server). May set this chat's
    # limit and see its spend, nothing that reaches beyond it.
    is_chat_admin: bool = False

    @property
    def user_key(self) -> str:
        """Return the ledger key of the user, `platform:user_id`."""
        return f"{self.platform}:{self.user_id}"

    @property
    def chat_key(self) -> str | None:
        """Return the ledger key of the chat, `platform:chat_id`, or None."""
        return f"{self.platform}:{self.chat_id}" if self.chat_id is not None else None
