"""User and chat keys (`platform:id`): their form per platform, and how an admin writes them.

A key is `telegram:<number>` (chats are negative), `discord:<number>`, `cli:<name>` or
`web:<name>` (someone who uses only the web API, with a personal key).
Admin commands and the `ADMINS` / `ALLOWED_*` settings take keys; anything else is an error
with a message that says what was wrong, never a key that silently matches nobody.

An admin may also name a user by `@username`; `core.directory` looks those up in the ledger.
"""

from __future__ import annotations

import re

from core.errors import PromptError

NUMERIC = re.compile(r"-?[0-9]{1,20}")
SNOWFLAKE = re.compile(r"[0-9]{1,20}")
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# What an id looks like on each platform.
KEY_FORMS = {"telegram": NUMERIC, "discord": SNOWFLAKE, "cli": NAME, "web": NAME}
# The terminal has no users or chats of its own to mean by a bare id.
BARE_ID_PLATFORMS = ("telegram", "discord")
USERNAME = re.compile(r"@([A-Za-z0-9_]{1,64})")


def key_problem(key: str) -> PromptError | None:
    """Say what is wrong with a `platform:id` key (None: nothing), as an error to show."""
    platform, sep, ident = key.partition(":")
    if not sep:
        return PromptError("admin.id_no_platform", word=key)
    form = KEY_FORMS.get(platform)
    if form is None:
        return PromptError("admin.id_unknown_platform", word=key, known=", ".join(KEY_FORMS))
    if not form.fullmatch(ident):
        kind = "admin.id_not_name" if form is NAME else "admin.id_not_number"
        return PromptError(kind, word=key, platform=platform)
    return None


def describe_key_problem(key: str, lang: str = "en") -> str | None:
    """Say in words what is wrong with a key (None: nothing), for settings and doctor."""
    problem = key_problem(key)
    return problem.user_message(lang) if problem is not None else None


def parse_key(word: str, platform: str) -> str:
    """Turn an admin's word for a user or chat into a checked key, or raise PromptError.

    A bare id means "on the admin's own platform" (not in the terminal). `@name` is not a
    key: `core.directory.UserDirectory.resolve` finds whose it is first.
    """
    if ":" not in word and platform in BARE_ID_PLATFORMS:
        word = f"{platform}:{word}"
    problem = key_problem(word)
    if problem is not None:
        raise problem
    return word
