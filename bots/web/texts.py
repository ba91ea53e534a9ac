"""The web door's own wording, in English and Chinese: what only the page's server says
(sign-in refusals, unknown jobs). The page's labels live with the page (static/app.js); core
errors, progress and captions come from `core.messages`.

`text(lang, key, **params)` renders a `web.*` key from here and any other key from core.
"""

from __future__ import annotations

from typing import Any

from core.messages import render
from core.messages import text as core_text


def text(lang: str | None, key: str, **params: Any) -> str:
    """Render message `key` (the web door's own, else core's) in the user's language."""
    entry = MESSAGES.get(key)
    return core_text(lang, key, **params) if entry is None else render(entry, lang, **params)


# key: {"en": …, "zh": …}; `{name}` placeholders are filled from params.
MESSAGES: dict[str, dict[str, str]] = {
    "web.key_missing": {
        "en": "Paste your personal key (it starts with ik-).",
        "zh": "请粘贴你的个人密钥（以 ik- 开头）。",
    },
    "web.key_invalid": {
        "en": "That key is not valid: it is unknown or was revoked. Get one with /key in a "
        "private chat with the Telegram bot, or ask the operator (imgbot keys create).",
        "zh": "该密钥无效：未知或已被停用。请在与 Telegram 机器人的私聊中发送 /key 获取，"
        "或请运营者生成（imgbot keys create）。",
    },
    "web.key_revoked": {
        "en": "Your key was revoked, so you are signed out. Sign in with another key.",
        "zh": "你的密钥已被停用，因此已退出登录。请用其他密钥登录。",
    },
    "web.signed_out": {
        "en": "You are signed out (the session was ended or expired). Sign in again.",
        "zh": "你已退出登录（会话已结束或已过期）。请重新登录。",
    },
    "web.tg_off": {
        "en": "Telegram sign-in is not set up on this server (no bot token).",
        "zh": "此服务器未设置 Telegram 登录（没有机器人令牌）。",
    },
    "web.tg_bad": {
        "en": "Telegram's sign-in data did not check out. Open the page again with the bot's "
        "/web button.",
        "zh": "Telegram 登录数据校验失败。请通过机器人的 /web 按钮重新打开页面。",
    },
    "web.tg_expired": {
        "en": "Telegram's sign-in data is too old. Open the page again with the bot's /web "
        "button.",
        "zh": "Telegram 登录数据已过期。请通过机器人的 /web 按钮重新打开页面。",
    },
    "web.link_invalid": {
        "en": "This sign-in link was already used or has expired. Restart imgbot for a new "
        "one, or sign in with a key (imgbot keys create).",
        "zh": "此登录链接已被使用或已过期。重启 imgbot 可获得新链接，或用密钥登录（imgbot keys create）。",
    },
    "web.job_unknown": {
        "en": "No such job.",
        "zh": "没有这个任务。",
    },
    "web.queued": {
        "en": "⏳ In the queue",
        "zh": "⏳ 排队中",
    },
    "web.job_ended_elsewhere": {
        "en": "Job #{job_id} ended without an answer here: the server running it stopped. "
        "Your history shows how it ended and what it cost.",
        "zh": "任务 #{job_id} 未能在此返回结果：运行它的服务器已停止。"
        "你的任务记录中可以看到它的结果和花费。",
    },
    "web.admin_only": {
        "en": "The dashboard is for the bot's admins only (ADMINS, or the operator's sign-in "
        "link).",
        "zh": "仪表盘仅供机器人的管理员使用（ADMINS，或运营者的登录链接）。",
    },
    "web.bad_request": {
        "en": "The page sent something this server cannot read. Reload the page.",
        "zh": "页面发送的内容无法识别，请刷新页面。",
    },
}
