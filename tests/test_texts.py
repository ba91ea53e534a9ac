"""Every wording table — core's and each front end's — is complete in both languages.

Core keeps the wording of core errors and shared texts; `tg.*` lives in
bots/telegram/texts.py, `discord.*` in bots/discord/texts.py and `web.*` in
bots/web/texts.py (the page's labels are in bots/web/static/app.js), and every key a module
names in its source exists where its `text` will look for it.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest

from bots.discord import texts as discord_texts
from bots.telegram import texts as telegram_texts
from bots.web import texts as web_texts
from core import messages

ROOT = Path(__file__).resolve().parent.parent
TABLES = {
    "core": messages.MESSAGES,
    "telegram": telegram_texts.MESSAGES,
    "discord": discord_texts.MESSAGES,
    "web": web_texts.MESSAGES,
}
PREFIX = {"telegram": "tg.", "discord": "discord.", "web": "web."}
# Chinese words these without the parameter ("{first} 和 {second} 互相冲突" needs no "what").
LEFT_OUT_IN_ZH = {"prompt.option_twice": {"what"}}


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


@pytest.mark.parametrize("table", TABLES)
def test_every_key_exists_in_both_languages_with_the_same_placeholders(table: str) -> None:
    for key, entry in TABLES[table].items():
        assert set(entry) == set(messages.LANGUAGES), (table, key)
        assert all(entry.values()), (table, key)
        left_out = LEFT_OUT_IN_ZH.get(key, set())
        assert _placeholders(entry["en"]) - left_out == _placeholders(entry["zh"]), (table, key)


def test_platform_wording_lives_in_its_front_end() -> None:
    core = messages.MESSAGES
    assert not [k for k in core if k.startswith(tuple(PREFIX.values()))]
    for table, prefix in PREFIX.items():
        assert all(key.startswith(prefix) for key in TABLES[table]), table
        assert not set(TABLES[table]) & set(core), table


def test_a_front_ends_text_falls_back_to_core() -> None:
    for module in (telegram_texts, discord_texts, web_texts):
        assert module.text("zh", "error.internal") == messages.text("zh", "error.internal")
        assert module.text("en", "progress.queued", position=2) == messages.text(
            "en", "progress.queued", position=2
        )
    assert telegram_texts.text("zh", "tg.button.again") == "🔁 再来一张"
    assert discord_texts.text("en", "discord.late", mention="@a") == "@a, your image is ready:"
    # Core alone does not know a front end's keys.
    assert messages.text("en", "tg.button.again") == messages.text("en", "error.internal")


@pytest.mark.parametrize("package", ["telegram", "discord", "web"])
def test_every_key_named_in_a_front_end_exists(package: str) -> None:
    known = set(messages.MESSAGES) | set(TABLES[package])
    prefix = re.escape(PREFIX[package])
    for path in (ROOT / "bots" / package).glob("*.py"):
        source = path.read_text(encoding="utf-8")
        for key in re.findall(rf'"({prefix}[a-z0-9_.]+)"', source):
            assert key in known, f"{path.name}: {key}"
        # f-string keys ("tg.button.{action}"): at least one entry carries the stem.
        for stem in re.findall(rf'f"({prefix}[a-z0-9_.]*)\{{', source):
            assert any(k.startswith(stem) for k in known), f"{path.name}: {stem}"
