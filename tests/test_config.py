"""Settings: defaults, validation messages, masking, and .env.example in step with them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.config import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no .env here
    s = load_settings()
    assert s.default_model == "gpt-image-2" and s.default_tier == "1K" and s.max_n == 4
    assert s.database_path == "./data/imgbot.db"


def test_lists_from_comma_separated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADMINS", "telegram:1, discord:2")
    monkeypatch.setenv("DISCORD_GUILD_IDS", "")
    s = load_settings()
    assert s.admins == ["telegram:1", "discord:2"]
    assert s.discord_guild_ids == []
    assert s.is_admin("telegram", "1") and not s.is_admin("telegram", "2")


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        ("OPENAI_BASE_URL", "api.openai.com", "OPENAI_BASE_URL"),
        ("USER_DAILY_LIMIT", "-5", "USER_DAILY_LIMIT"),
        ("DEFAULT_MODEL", "dall-e-3", "DEFAULT_MODEL"),
        ("MAX_N", "eleven", "MAX_N"),
    ],
)
def test_wrong_values_name_the_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: str, value: str, named: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert named in str(info.value)


def test_secrets_masked_everywhere() -> None:
    s = Settings(openai_api_key="sk-SECRET-1234567", telegram_bot_token="123:TOKENVALUE")
    for shown in (repr(s), str(s), s.model_dump_json()):
        assert "sk-SECRET-1234567" not in shown and "TOKENVALUE" not in shown


def test_env_example_lists_exactly_the_settings() -> None:
    text = (ROOT / ".env.example").read_text()
    names = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", text, re.MULTILINE))
    assert names == {name.upper() for name in Settings.model_fields}


def test_env_example_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text((ROOT / ".env.example").read_text())
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert s.openai_base_url == "https://api.openai.com/v1"
    assert s.admins == [] and s.model_aliases == {}


def test_readme_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    shown = set(re.findall(r"^\| `([A-Z_][A-Z0-9_]*)` \|", readme, re.MULTILINE))
    assert shown == {name.upper() for name in Settings.model_fields}


def test_discord_shards(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    s = load_settings(discord_shard_count=4, discord_shard_ids=" 0, 2")
    assert (s.discord_shard_count, s.discord_shard_ids) == (4, [0, 2])
    s = load_settings()
    assert (s.discord_shard_count, s.discord_shard_ids) == (0, [])  # automatic


@pytest.mark.parametrize(
    ("count", "ids", "says"),
    [
        ("0", "0,1", "needs DISCORD_SHARD_COUNT"),
        ("4", "0,4", "4 outside 0-3"),
        ("4", "1,1", "named twice"),
        ("4", "one", "DISCORD_SHARD_IDS"),
        ("-1", "", "DISCORD_SHARD_COUNT"),
    ],
)
def test_wrong_discord_shards_are_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, count: str, ids: str, says: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISCORD_SHARD_COUNT", count)
    monkeypatch.setenv("DISCORD_SHARD_IDS", ids)
    with pytest.raises(SettingsError, match=says):
        load_settings()
