"""Raw INTERACTION_CREATE payloads as Discord sends them (API v10), for the offline tests."""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

import discord

APP_ID = 1100000000000000001
GUILD_ID = 1200000000000000001
CHANNEL_ID = 1300000000000000001
MANAGE_GUILD = 1 << 5
DEFAULT_LIMIT = 10 * 1024 * 1024

_counter = itertools.count(1)


def new_snowflake(age: float = 0.0) -> int:
    """Return a fresh snowflake from `age` seconds ago (now: the token is unexpired)."""
    moment = discord.utils.utcnow() - timedelta(seconds=age)
    return discord.utils.time_snowflake(moment) + next(_counter)


def user(user_id: int, name: str) -> dict[str, Any]:
    """Return a user object."""
    return {
        "id": str(user_id),
        "username": name,
        "global_name": name.title(),
        "discriminator": "0",
        "avatar": None,
    }


def _channel(guild: bool, guild_id: int, channel_id: int) -> dict[str, Any]:
    if not guild:
        return {"id": str(channel_id), "type": 1}
    return {
        "id": str(channel_id),
        "type": 0,
        "guild_id": str(guild_id),
        "name": "art",
        "position": 0,
        "permission_overwrites": [],
        "nsfw": False,
        "parent_id": None,
    }


def interaction(
    kind: int,
    data: dict[str, Any],
    *,
    user_id: int = 501,
    username: str = "alice",
    locale: str = "en-US",
    guild: bool = True,
    permissions: int = 0,
    size_limit: int = DEFAULT_LIMIT,
    message: dict[str, Any] | None = None,
    age: float = 0.0,
    guild_id: int = GUILD_ID,
    channel_id: int = CHANNEL_ID,
) -> dict[str, Any]:
    """Return an INTERACTION_CREATE payload of a type (2 command, 3 component, 5 modal),
    from a server channel (`guild_id`, `channel_id`) or, with guild=False, a DM channel."""
    payload: dict[str, Any] = {
        "id": str(new_snowflake(age)),
        "application_id": str(APP_ID),
        "type": kind,
        "token": f"token-{new_snowflake()}",
        "version": 1,
        "channel_id": str(channel_id),
        "channel": _channel(guild, guild_id, channel_id),
        "data": data,
        "locale": locale,
        "app_permissions": str((1 << 51) - 1),
        "attachment_size_limit": size_limit,
        "authorizing_integration_owners": {"0": str(guild_id)} if guild else {"1": str(user_id)},
        "context": 0 if guild else 1,
        "entitlements": [],
    }
    if guild:
        payload["guild_id"] = str(guild_id)
        payload["guild_locale"] = "en-US"
        payload["guild"] = {"id": str(guild_id), "locale": "en-US", "features": []}
        payload["member"] = {
            "user": user(user_id, username),
            "roles": [],
            "joined_at": "2025-01-01T00:00:00+00:00",
            "deaf": False,
            "mute": False,
            "flags": 0,
            "permissions": str(permissions),
        }
    else:
        payload["user"] = user(user_id, username)
    if message is not None:
        payload["message"] = message
    return payload


def attachment(
    att_id: int, url: str, filename: str, size: int, width: int, height: int
) -> dict[str, Any]:
    """Return an attachment object."""
    return {
        "id": str(att_id),
        "filename": filename,
        "size": size,
        "url": url,
        "proxy_url": url,
        "content_type": "image/png",
        "width": width,
        "height": height,
    }


def slash(
    name: str,
    options: list[dict[str, Any]],
    *,
    attachments: list[dict[str, Any]] = (),  # type: ignore[assignment]
    **kwargs: Any,
) -> dict[str, Any]:
    """Return a slash command interaction; attachment options refer to `attachments`."""
    data: dict[str, Any] = {"id": str(APP_ID + 7), "name": name, "type": 1, "options": options}
    if attachments:
        data["resolved"] = {"attachments": {a["id"]: a for a in attachments}}
    if kwargs.get("guild", True):
        data["guild_id"] = str(kwargs.get("guild_id", GUILD_ID))
    return interaction(2, data, **kwargs)


def option(name: str, value: Any, kind: int = 3) -> dict[str, Any]:
    """Return one option (3 string, 4 integer, 11 attachment)."""
    return {"name": name, "type": kind, "value": value}


def subcommand(name: str, options: list[dict[str, Any]] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    """Return a subcommand option."""
    return {"name": name, "type": 1, "options": list(options)}


def message(
    content: str,
    *,
    attachments: list[dict[str, Any]] = (),  # type: ignore[assignment]
    embeds: list[dict[str, Any]] = (),  # type: ignore[assignment]
    author: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Return a message object (the target of a message context menu)."""
    return {
        "id": str(new_snowflake()),
        "channel_id": str(CHANNEL_ID),
        "type": 0,
        "content": content,
        "author": author or user(777, "painter"),
        "attachments": list(attachments),
        "embeds": list(embeds),
        "components": [],
        "mentions": [],
        "mention_roles": [],
        "mention_everyone": False,
        "pinned": False,
        "tts": False,
        "timestamp": "2025-01-01T00:00:00+00:00",
        "edited_timestamp": None,
        "flags": 0,
    }


def forwarded(
    *,
    attachments: list[dict[str, Any]] = (),  # type: ignore[assignment]
    embeds: list[dict[str, Any]] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    """Return a forwarded message: empty itself, its content in `message_snapshots`."""
    outer = message("")
    outer["message_reference"] = {"type": 1, "channel_id": str(CHANNEL_ID), "message_id": "1"}
    outer["message_snapshots"] = [
        {
            "message": {
                "type": 0,
                "content": "",
                "embeds": list(embeds),
                "attachments": list(attachments),
                "timestamp": "2025-01-01T00:00:00+00:00",
                "edited_timestamp": None,
                "flags": 0,
                "mentions": [],
                "mention_roles": [],
            }
        }
    ]
    return outer


def message_menu(name: str, target: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Return a message context-menu interaction on `target`."""
    data = {
        "id": str(APP_ID + 8),
        "name": name,
        "type": 3,
        "target_id": target["id"],
        "resolved": {"messages": {target["id"]: target}},
        "guild_id": str(GUILD_ID),
    }
    return interaction(2, data, **kwargs)


def modal_submit(modal: dict[str, Any], values: dict[str, str], **kwargs: Any) -> dict[str, Any]:
    """Answer a modal the bot sent (its callback `data`), filling text inputs by custom id."""

    def fill(component: dict[str, Any]) -> dict[str, Any]:
        if component.get("type") == 4:
            return {
                "type": 4,
                "custom_id": component["custom_id"],
                "value": values.get(component["custom_id"], ""),
            }
        out = {k: v for k, v in component.items() if k in ("type", "id")}
        if "components" in component:
            out["components"] = [fill(c) for c in component["components"]]
        if "component" in component:
            out["component"] = fill(component["component"])
        return out

    data = {"custom_id": modal["custom_id"], "components": [fill(c) for c in modal["components"]]}
    return interaction(5, data, **kwargs)


def button_press(custom_id: str, on_message: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """Return a button press on a message the bot sent."""
    data = {"custom_id": custom_id, "component_type": 2}
    return interaction(3, data, message=on_message, **kwargs)
