"""Access: allowlists, blocks and admin commands, enforced end to end on both platforms.

Rules (core.service.check_access): an admin may do everything; otherwise, when ALLOWED_USERS
or ALLOWED_CHATS is set, a user draws only if listed, or inside a listed chat — a private
chat or DM is on no chat list, so with only ALLOWED_CHATS set nobody draws in private (the
hole this file found: DMs used to pass). A blocked user or chat is refused. Refusals are
said aloud in private and kept silent in groups; nothing is downloaded, reserved or called
for a refused person, not even through a result's button. Admin commands from anyone but
a configured admin (or, for `chatlimit`/`chats` of their own server, a Discord server
manager) are refused and leave the ledger exactly as it was.

The last test proves that core/store/ builds no SQL from values (ruff's S608 too).
"""

from __future__ import annotations

import ast
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from bots.telegram.texts import text
from core.admin import ADMIN_COMMANDS, run_admin
from core.config import Settings
from core.errors import PromptError, UpstreamError
from core.requester import Requester
from core.runtime import open_service
from tests import discord_payloads as p
from tests.discord_fake import FakeCdn, SentCall
from tests.fake_api import FakeImageAPI
from tests.telegram_fake import TOKEN, FakeBotApi, Updates, image_bytes
from tests.test_discord import Harness as DiscordHarness
from tests.test_discord import job_id_of, png, result_of, running_bot
from tests.test_telegram import Harness, running

ROOT = Path(__file__).resolve().parent.parent
ANN = Updates.user(1001, "Ann", "en")
BOB = Updates.user(1002, "Bob", "en")
BOSS = Updates.user(42, "Boss", "en")
GROUP = Updates.supergroup(-1001111, "Listed")
OTHER_GROUP = Updates.supergroup(-1002222, "Elsewhere")


def ledger_dump(settings: Settings) -> list[str]:
    """Return every row of every table of the ledger file, as SQL."""
    with sqlite3.connect(settings.database_path) as conn:
        return list(conn.iterdump())


# --- Telegram ---------------------------------------------------------------------------------


@pytest.fixture
def tg_config(settings: Callable[..., Settings], tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": f"sqlite:///{tmp_path}/imgbot.db",
            "telegram_bot_token": TOKEN,
            "progress_interval": 0.05,
            "rate_limit_per_minute": 0,
            "admins": "telegram:42",
        }
        values.update(overrides)
        return settings(**values)

    return make


@asynccontextmanager
async def telegram(settings: Settings, images: FakeImageAPI) -> AsyncIterator[Harness]:
    api = FakeBotApi()
    api.store("ref-photo", image_bytes(640, 480))
    async with running(settings, api, images, Updates()) as harness:
        yield harness


async def draw_with_photo(tg: Harness, user: dict[str, Any], chat: dict[str, Any]) -> None:
    u = tg.updates
    photo = u.photo_sizes("ref-photo", 640, 480)
    mention = "@ThisBot" if chat["type"] != "private" else ""
    await tg.send(u.update(u.message(user, chat, caption=f"/img{mention} low a cat", photo=photo)))


def sent_since(tg: Harness, mark: int) -> list[str]:
    return [c.method for c in tg.api.calls[mark:]]


async def assert_refused(
    tg: Harness, user: dict[str, Any], chat: dict[str, Any], key: str | None
) -> None:
    """Draw as `user` in `chat`: refused with `key` (None: in silence); nothing else done."""
    mark, downloads, calls = len(tg.api.calls), len(tg.api.downloads), len(tg.images.api_requests)
    jobs = len(await tg.jobs())
    await draw_with_photo(tg, user, chat)
    if key is None:
        assert sent_since(tg, mark) == []
    else:
        assert sent_since(tg, mark) == ["sendMessage"]
        assert tg.texts()[-1] == text("en", key)
    assert len(tg.api.downloads) == downloads and len(tg.images.api_requests) == calls
    assert len(await tg.jobs()) == jobs


async def assert_drawn(tg: Harness, user: dict[str, Any], chat: dict[str, Any]) -> None:
    jobs = len(await tg.jobs())
    await draw_with_photo(tg, user, chat)
    found = await tg.jobs()
    assert len(found) == jobs + 1 and found[-1].status == "succeeded"
    assert found[-1].user_key == f"telegram:{user['id']}"


async def test_telegram_user_allowlist(
    tg_config: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    async with telegram(tg_config(allowed_users="telegram:1001"), fake_api) as tg:
        await assert_refused(tg, BOB, Updates.private(BOB), "access.not_allowed")
        await assert_refused(tg, BOB, GROUP, None)
        await assert_drawn(tg, ANN, GROUP)
        await assert_drawn(tg, ANN, Updates.private(ANN))
        await assert_drawn(tg, BOSS, Updates.private(BOSS))  # admins need no listing


async def test_telegram_chat_allowlist_keeps_private_chats_out(
    tg_config: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    async with telegram(tg_config(allowed_chats="telegram:-1001111"), fake_api) as tg:
        await assert_drawn(tg, BOB, GROUP)
        await assert_refused(tg, BOB, OTHER_GROUP, None)
        # A private chat is no listed chat: the operator's money is not open to all DMs.
        await assert_refused(tg, BOB, Updates.private(BOB), "access.not_allowed")


async def test_telegram_both_allowlists(
    tg_config: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    config = tg_config(allowed_users="telegram:1001", allowed_chats="telegram:-1001111")
    async with telegram(config, fake_api) as tg:
        await assert_drawn(tg, ANN, Updates.private(ANN))
        await assert_drawn(tg, ANN, OTHER_GROUP)  # a listed user draws anywhere
        await assert_drawn(tg, BOB, GROUP)  # anyone draws in a listed chat
        await assert_refused(tg, BOB, OTHER_GROUP, None)
        await assert_refused(tg, BOB, Updates.private(BOB), "access.not_allowed")


async def test_telegram_blocked_users_and_chats(
    tg_config: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    async with telegram(tg_config(), fake_api) as tg:
        u = tg.updates
        boss = Updates.private(BOSS)
        await tg.send(u.update(u.message(BOSS, boss, text="/block 1002")))
        assert tg.texts()[-1] == text("en", "admin.blocked", who="telegram:1002")
        await assert_refused(tg, BOB, Updates.private(BOB), "access.blocked")
        await assert_refused(tg, BOB, GROUP, None)
        await assert_drawn(tg, ANN, GROUP)

        await tg.send(u.update(u.message(BOSS, boss, text="/block -1001111")))
        await assert_refused(tg, ANN, GROUP, None)
        await assert_drawn(tg, ANN, OTHER_GROUP)

        await tg.send(u.update(u.message(BOSS, boss, text="/unblock 1002")))
        await tg.send(u.update(u.message(BOSS, boss, text="/unblock -1001111")))
        await assert_drawn(tg, BOB, GROUP)


async def test_telegram_a_refused_presser_of_a_button_costs_nothing(
    tg_config: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    async with telegram(tg_config(allowed_users="telegram:1001"), fake_api) as tg:
        u = tg.updates
        await draw_with_photo(tg, ANN, GROUP)
        [result] = tg.api.of("sendPhoto")
        job_id = result.params["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
        downloads, calls = len(tg.api.downloads), len(tg.images.api_requests)
        mark = len(tg.api.calls)
        await tg.send(u.callback(BOB, result.result, job_id))
        # The query is answered (no spinner), then silence: Bob is a stranger in a group.
        assert sent_since(tg, mark) == ["answerCallbackQuery"]
        # The same data from Bob's private chat is forged: the job is not his chat's.
        await tg.send(u.callback(BOB, {**result.result, "chat": Updates.private(BOB)}, job_id))
        answer = tg.api.of("answerCallbackQuery")[-1]
        assert answer.params["text"] == text("en", "tg.not_here")
        assert len(tg.api.downloads) == downloads and len(tg.images.api_requests) == calls
        assert len(await tg.jobs()) == 1


TELEGRAM_ADMIN_TRIES = [
    "/limit 1002 daily=999999 monthly=999999",
    "/limit 1001 daily=default",
    "/chatlimit -1001111 daily=0",
    "/chatlimit daily=5",
    "/refund 1",
    "/refund #1",
    "/block 1002",
    "/unblock 1003",
    "/top",
    "/top 3650",
    "/chats",
    "/unsettled",
    "/refund@ThisBot 1",
    "/refund purchase 1",
    "/LIMIT 1002 daily=1",
    "/grant 1002 500",
    "/revoke 1002",
    "/purchases",
]


async def test_telegram_a_non_admin_is_refused_every_admin_command(
    tg_config: Callable[..., Settings], fake_api: FakeImageAPI
) -> None:
    assert {t.split()[0].lstrip("/").split("@")[0].lower() for t in TELEGRAM_ADMIN_TRIES} == set(
        ADMIN_COMMANDS
    )
    # Ann is an admin on Discord only, which gives her nothing on Telegram.
    config = tg_config(admins="telegram:42,discord:1001")
    async with telegram(config, fake_api) as tg:
        u = tg.updates
        await assert_drawn(tg, ANN, GROUP)
        await tg.send(u.update(u.message(BOSS, Updates.private(BOSS), text="/block 1003")))
        before = ledger_dump(config)
        for chat in (Updates.private(ANN), GROUP):
            for command in TELEGRAM_ADMIN_TRIES:
                mark = len(tg.api.calls)
                await tg.send(u.update(u.message(ANN, chat, text=command)))
                assert sent_since(tg, mark) == ["sendMessage"], command
                assert tg.texts()[-1] == text("en", "access.admin_only"), command
        assert ledger_dump(config) == before


# --- Discord ----------------------------------------------------------------------------------

MEMBER, MANAGER, ADMIN = 502, 504, 900


def discord_config(settings: Callable[..., Settings], tmp_path: Path, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path}/imgbot.db",
        "progress_interval": 0.05,
        "rate_limit_per_minute": 0,
        "admins": ["discord:900", "telegram:502"],
    }
    values.update(extra)
    return settings(**values)


def admin_call(sub: str, options: list[dict[str, Any]], user_id: int, **kw: Any) -> dict[str, Any]:
    return p.slash("admin", [p.subcommand(sub, options)], user_id=user_id, username="u", **kw)


DISCORD_ADMIN_TRIES: list[tuple[str, list[dict[str, Any]]]] = [
    ("limit", [p.option("user", "<@503>"), p.option("daily", "999999"), p.option("monthly", "1")]),
    ("chatlimit", [p.option("daily", "0")]),
    ("chatlimit", [p.option("daily", "5"), p.option("server", "77")]),
    ("refund", [p.option("job", 1, 4)]),
    ("block", [p.option("target", "<@!503>")]),
    ("unblock", [p.option("target", "503")]),
    ("top", [p.option("days", 30, 4)]),
    ("chats", []),
    ("unsettled", []),
    ("grant", [p.option("user", "<@503>"), p.option("credits", "500")]),
    ("revoke", [p.option("user", "503")]),
    ("purchases", []),
]  # fmt: skip


def private_answer(calls: list[SentCall]) -> str | None:
    # A private answer: the first response itself, or a followup to a private "thinking".
    answers = [c for c in calls if c.content is not None]
    assert len(answers) == 1 and answers[0].ephemeral, [(c.kind, c.json) for c in calls]
    return answers[0].content


async def seed_discord(h: DiscordHarness) -> None:
    """One finished job and one blocked user, so refunds and unblocks have targets."""
    result_of(await h.feed(p.slash("img", [p.option("prompt", "low a cat")], user_id=503)))
    await h.feed(admin_call("block", [p.option("target", "504")], ADMIN, guild=False))


async def test_discord_a_member_is_refused_every_admin_command(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    assert {name for name, _ in DISCORD_ADMIN_TRIES} == set(ADMIN_COMMANDS)
    config = discord_config(settings, tmp_path)
    async with running_bot(config, FakeCdn()) as h:
        await seed_discord(h)
        before = ledger_dump(config)
        # A member of the server, the same person in a DM, and a Telegram admin's namesake.
        for guild in (True, False):
            for name, options in DISCORD_ADMIN_TRIES:
                calls = await h.feed(admin_call(name, options, MEMBER, guild=guild))
                assert private_answer(calls) == text("en", "access.admin_only"), name
        assert ledger_dump(config) == before


async def test_discord_a_server_manager_rules_only_their_own_server(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    config = discord_config(settings, tmp_path)
    async with running_bot(config, FakeCdn()) as h:
        await seed_discord(h)
        before = ledger_dump(config)
        for name, options in DISCORD_ADMIN_TRIES:
            if name == "chats" or (name == "chatlimit" and len(options) == 1):
                continue  # their own server's business: allowed
            call = admin_call(name, options, MANAGER, permissions=p.MANAGE_GUILD)
            answer = private_answer(await h.feed(call))
            expected = "access.own_chat_only" if name == "chatlimit" else "access.admin_only"
            assert answer == text("en", expected), name
        # In a DM there is no server to manage.
        dm = admin_call("chatlimit", [p.option("daily", "1")], MANAGER, guild=False)
        assert private_answer(await h.feed(dm)) == text("en", "access.admin_only")
        assert ledger_dump(config) == before

        answer = private_answer(await h.feed(admin_call("chats", [], MANAGER, permissions=32)))
        assert answer is not None and "discord:77" not in answer
        own = admin_call("chatlimit", [p.option("daily", "5")], MANAGER, permissions=32)
        private_answer(await h.feed(own))
        chat = await h.service.ledger.get_chat(f"discord:{p.GUILD_ID}")
        assert chat is not None and chat.daily_limit == 5


def img(user_id: int, *, guild: bool = True, **kw: Any) -> dict[str, Any]:
    return p.slash("img", [p.option("prompt", "low a cat")], user_id=user_id, guild=guild, **kw)


async def assert_discord_refused(
    h: DiscordHarness, payload: dict[str, Any], key: str | None
) -> None:
    calls = await h.feed(payload)
    if key is None:
        assert [c.kind for c in calls] == ["callback", "delete_original"]
    else:
        assert [c.content for c in calls if c.ephemeral] == [text("en", key)]
        assert not [c for c in calls if c.files]


async def test_discord_allowlists_and_blocks(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    config = discord_config(
        settings, tmp_path, allowed_users=["discord:501"], allowed_chats=[f"discord:{p.GUILD_ID}"]
    )
    async with running_bot(config, FakeCdn()) as h:
        result_of(await h.feed(img(501, guild=False)))  # listed user, in a DM
        result_of(await h.feed(img(MEMBER)))  # anyone, in the listed server
        await assert_discord_refused(h, img(MEMBER, guild=False), "access.not_allowed")
        assert len(fake_api.api_requests) == 2

        await h.feed(admin_call("block", [p.option("target", str(p.GUILD_ID))], ADMIN))
        await assert_discord_refused(h, img(MEMBER), None)
        result_of(await h.feed(img(501, guild=False)))  # the block is on the server
        await h.feed(admin_call("block", [p.option("target", "<@501>")], ADMIN))
        await assert_discord_refused(h, img(501, guild=False), "access.blocked")
        assert len(fake_api.api_requests) == 3


async def test_discord_a_refused_presser_of_a_button_costs_nothing(
    settings: Callable[..., Settings], fake_api: FakeImageAPI, tmp_path: Path
) -> None:
    cdn = FakeCdn()
    ref = png(300, 200)
    att = p.attachment(931, cdn.add(ref, "ref.png"), "ref.png", len(ref), 300, 200)
    options = [p.option("prompt", "low a cat"), p.option("image1", "931", 11)]
    config = discord_config(settings, tmp_path, allowed_users=["discord:501"])
    async with running_bot(config, cdn) as h:
        result = result_of(await h.feed(p.slash("img", options, attachments=[att])))
        job = job_id_of(result)
        fetched, calls = len(cdn.fetched), len(fake_api.api_requests)
        for action in ("again", "vary"):
            press = p.button_press(f"imgbot:job:{job}:{action}", result.answer, user_id=MEMBER)
            # Acknowledged as "update the message", with nothing changed: the result stays.
            answers = await h.feed(press)
            assert [(c.kind, (c.json or {}).get("type")) for c in answers] == [("callback", 6)]
        assert len(cdn.fetched) == fetched and len(fake_api.api_requests) == calls
        assert await h.service.ledger.get_job(job + 1) is None


# --- SQL only with parameters -------------------------------------------------------------------

_SQL_CALLS = {
    "execute",
    "executemany",
    "executescript",
    "execute_fetchall",
    "execute_insert",
    "fetch",
    "fetchrow",
    "fetchval",
    "single",
    "_single",
    "_read_all",
    "_read_one",
}
# The modules' own helpers that take SQL, and the index of that argument.
_SQL_HELPERS = {"_fetchone": 1, "_fetchall": 1, "_sum_charged": 1}
# Names that hold SQL inside the module: the helpers' own parameters (`sql`, `begin`: their
# callers are checked) and the loop over the migrations (`statement`: checked as literals).
_CARRIERS = {"sql", "begin", "statement"}


def _is_literal_sql(node: ast.expr, constants: dict[str, ast.expr]) -> bool:
    """Say whether an expression is SQL text made of string literals only."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _is_literal_sql(node.left, constants) and _is_literal_sql(node.right, constants)
    if isinstance(node, ast.Name):
        if node.id in _CARRIERS:
            return True
        value = constants.get(node.id)
        return value is not None and _is_literal_sql(value, constants)
    if isinstance(node, ast.JoinedStr):
        # An f-string may only splice SQL into SQL, never a value.
        return all(
            _is_literal_sql(part.value if isinstance(part, ast.FormattedValue) else part, constants)
            for part in node.values
        )
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "join"
        and isinstance(node.func.value, ast.Constant)
        and len(node.args) == 1
        and isinstance(node.args[0], (ast.GeneratorExp, ast.ListComp))
    ):
        return _is_literal_sql(node.args[0].elt, constants)
    # .format(), % and anything else may carry values into the SQL.
    return False


def _formatting(node: ast.AST) -> list[ast.AST]:
    """Return the f-strings, % operations and .format() calls inside a node."""
    return [
        n
        for n in ast.walk(node)
        if isinstance(n, ast.JoinedStr)
        or (isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mod))
        or (
            isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and n.func.attr == "format"
        )
    ]


def sql_built_from_values(source: str, known: dict[str, ast.expr] | None = None) -> list[str]:
    """Return 'line: code' for each SQL statement in `source` not made of literals only.

    `known`: constants of sibling modules (checked there) that this one imports.
    """
    tree = ast.parse(source)
    constants: dict[str, ast.expr] = dict(known or {})
    bad = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            if isinstance(node.targets[0], ast.Name):
                constants[node.targets[0].id] = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if node.target.id == "MIGRATIONS" and node.value is not None:
                bad += [f"{n.lineno}: {ast.unparse(n)[:120]}" for n in _formatting(node.value)]
    for call in ast.walk(tree):
        if not isinstance(call, ast.Call):
            continue
        func = call.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        index = 0 if name in _SQL_CALLS else _SQL_HELPERS.get(name)
        if index is None or len(call.args) <= index:
            continue
        if not _is_literal_sql(call.args[index], constants):
            bad.append(f"{call.lineno}: {ast.unparse(call)[:120]}")
    return bad


def test_the_store_builds_no_sql_from_values() -> None:
    modules = sorted((ROOT / "core" / "store").glob("*.py"))
    assert len(modules) >= 6
    schema = (ROOT / "core" / "store" / "sqlite_schema.py").read_text(encoding="utf-8")
    known = {
        node.targets[0].id: node.value
        for node in ast.parse(schema).body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }
    for module in modules:
        found = sql_built_from_values(module.read_text(encoding="utf-8"), known)
        assert found == [], module.name
    # The check is not blind: it finds each way a value gets into SQL.
    leaky = """
async def f(conn, name, job_id):
    await conn.execute(f"SELECT * FROM jobs WHERE user_key = '{name}'")
    await conn.execute("SELECT * FROM jobs WHERE id = %d" % job_id)
    await conn.execute("SELECT * FROM jobs WHERE id = {}".format(job_id))
    await conn.execute("SELECT * FROM jobs WHERE user_key = '" + name + "'")
    await _fetchone(conn, "SELECT " + name)
    await conn.executescript(QUERY)
    await conn.execute("SELECT " + ", ".join(f"({name})" for name in names))
    await conn.execute("SELECT " + ", ".join(f"({sql})" for sql in SAFE_PARTS))
    await conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,))
    await _fetchall(conn, SAFE, (name,))
QUERY = f"DROP TABLE {name}"
SAFE = "SELECT * FROM users" " WHERE user_key = ?"
MIGRATIONS: tuple = (Migration(9, "x", (f"ALTER TABLE {name}",)),)
"""
    found = [line.split(":")[0] for line in sql_built_from_values(leaky)]
    assert sorted(found, key=int) == ["3", "4", "5", "6", "7", "8", "9", "15"]


MARK = "x'); DROP TABLE jobs; --\u03a9"


async def test_no_value_ever_reaches_the_sql_text(
    settings: Callable[..., Settings],
    fake_api: FakeImageAPI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The dynamic half of the proof: every statement the ledger runs, with hostile values.
    import aiosqlite

    statements: list[str] = []
    for name in ("execute", "executemany", "executescript", "execute_fetchall"):
        original = getattr(aiosqlite.Connection, name)

        def recording(self: Any, sql: str, *args: Any, _original: Any = original, **kw: Any) -> Any:
            statements.append(sql)
            return _original(self, sql, *args, **kw)

        monkeypatch.setattr(aiosqlite.Connection, name, recording)
    config = settings(
        database_url=f"sqlite:///{tmp_path}/imgbot.db",
        admins=["cli:root"],
        rate_limit_per_minute=0,
        user_daily_limit=10**9,
        chat_daily_limit=10**9,
        global_daily_limit=10**9,
    )
    eve = Requester("telegram", MARK, MARK, MARK, "en", is_group=True)
    root = Requester("cli", "root", None, "root", "en")
    async with open_service(config) as service:
        outcome = await service.draw(eve, f"low a cat {MARK}")
        fake_api.inject("server_error")
        with pytest.raises(UpstreamError):
            await service.draw(eve, f"low a dog {MARK}")
        # A hostile id is refused before the ledger (core.ids); a well-formed one runs.
        for who in (MARK, f"telegram:{MARK}"):
            with pytest.raises(PromptError):
                await run_admin(service, root, "block", [who])
        for name, args in [
            ("refund", [str(outcome.job_id)]),
            ("limit", ["telegram:5", "daily=5", "monthly=default"]),
            ("chatlimit", ["telegram:-7", "daily=7"]),
            ("block", ["telegram:5"]),
            ("unblock", ["telegram:5"]),
            ("top", ["1"]),
            ("chats", ["1"]),
            ("unsettled", []),
        ]:
            await run_admin(service, root, name, args)
        await service.ledger.spend_report(eve.user_key)
        await service.ledger.export_csv(user_key=eve.user_key)
        assert (await service.ledger.get_user(eve.user_key)).display_name == MARK  # type: ignore[union-attr]
    assert len(statements) > 30
    # (The ledger's own migration 3 drops and recreates a view; the payload drops a table.)
    assert not [sql for sql in statements if MARK in sql or "DROP TABLE" in sql]
