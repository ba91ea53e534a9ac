"""Discord's own wording (en + zh): command names and descriptions, buttons, the edit
form, upload and late-delivery notes; and the user's language.

`text(lang, key, **params)` renders a `discord.*` key from here and any other key from
`core.messages` (core errors, progress, captions). Every string shown in Discord's command
UI is a `locale_str` whose `key` extra names an entry: the English text is the default, and
`CommandTranslator` supplies the Chinese one for Discord's Chinese locales when the
commands are synced.
"""

from __future__ import annotations

from typing import Any

import discord
from discord import app_commands

from core.messages import language_of, render
from core.messages import text as core_text

# Discord's locales that read Simplified or Traditional Chinese; both get our zh texts.
_CHINESE_LOCALES = frozenset({discord.Locale.chinese, discord.Locale.taiwan_chinese})


def text(lang: str | None, key: str, **params: Any) -> str:
    """Render message `key` (Discord's own, else core's) in the user's language."""
    entry = MESSAGES.get(key)
    return core_text(lang, key, **params) if entry is None else render(entry, lang, **params)


def loc(key: str) -> app_commands.locale_str:
    """Return a translatable string: English from our texts, keyed for translation."""
    return app_commands.locale_str(text("en", key), key=key)


def lang_of(interaction: discord.Interaction) -> str:
    """Return "en" or "zh" for the user who caused an interaction."""
    return language_of(str(interaction.locale))


class CommandTranslator(app_commands.Translator):
    """Translate keyed command strings into Chinese for Discord's Chinese locales."""

    async def translate(
        self,
        string: app_commands.locale_str,
        locale: discord.Locale,
        context: app_commands.TranslationContextTypes,
    ) -> str | None:
        """Return the Chinese text of a keyed string, or None to keep the English one."""
        key = string.extras.get("key")
        if key is None or locale not in _CHINESE_LOCALES:
            return None
        return text("zh", key)


# key: {"en": …, "zh": …}; `{name}` placeholders are filled from params.
MESSAGES: dict[str, dict[str, str]] = {
    "discord.cmd.img": {"en": "img", "zh": "画图"},
    "discord.cmd.img.desc": {
        "en": "Draw an image, or edit attached ones (the prompt also takes 16:9 2K high …)",
        "zh": "画一张图，或编辑附带的图片（提示词里也可写 16:9 2K high …）",
    },
    "discord.opt.prompt": {"en": "prompt", "zh": "提示词"},
    "discord.opt.prompt.desc": {
        "en": "What to draw; may start with options, e.g. 16:9 2K high a white cat",
        "zh": "要画什么；开头可写选项，例如 16:9 2K high 一只白猫",
    },
    "discord.opt.ratio": {"en": "ratio", "zh": "比例"},
    "discord.opt.ratio.desc": {"en": "Aspect ratio", "zh": "宽高比"},
    "discord.opt.resolution": {"en": "resolution", "zh": "分辨率"},
    "discord.opt.resolution.desc": {"en": "Resolution tier: 1K, 2K or 4K", "zh": "分辨率档位：1K、2K 或 4K"},
    "discord.opt.quality": {"en": "quality", "zh": "质量"},
    "discord.opt.quality.desc": {"en": "Quality (higher costs more)", "zh": "质量（越高越贵）"},
    "discord.opt.count": {"en": "count", "zh": "数量"},
    "discord.opt.count.desc": {"en": "How many images", "zh": "生成几张"},
    "discord.opt.model": {"en": "model", "zh": "模型"},
    "discord.opt.model.desc": {"en": "Image model", "zh": "绘图模型"},
    "discord.opt.format": {"en": "format", "zh": "格式"},
    "discord.opt.format.desc": {"en": "Output format (png is lossless)", "zh": "输出格式（png 为无损）"},
    "discord.opt.compression": {"en": "compression", "zh": "压缩率"},
    "discord.opt.compression.desc": {
        "en": "jpeg/webp quality 0-100 (100 = best)",
        "zh": "jpeg/webp 压缩质量 0-100（100 最佳）",
    },
    "discord.opt.moderation": {"en": "moderation", "zh": "审核"},
    "discord.opt.moderation.desc": {
        "en": "Content filtering: low is less strict",
        "zh": "内容审核强度：low 较宽松",
    },
    "discord.opt.fidelity": {"en": "fidelity", "zh": "保真度"},
    "discord.opt.fidelity.desc": {
        "en": "How closely to keep the attached images (gpt-image-1.5/1)",
        "zh": "对附图的忠实程度（gpt-image-1.5/1）",
    },
    "discord.choice.moderation_low": {"en": "low (less strict)", "zh": "低（较宽松）"},
    "discord.choice.moderation_auto": {"en": "auto", "zh": "自动"},
    "discord.choice.fidelity_high": {"en": "high", "zh": "高"},
    "discord.choice.fidelity_low": {"en": "low", "zh": "低"},
    "discord.opt.image1": {"en": "image1", "zh": "图片1"},
    "discord.opt.image2": {"en": "image2", "zh": "图片2"},
    "discord.opt.image3": {"en": "image3", "zh": "图片3"},
    "discord.opt.image4": {"en": "image4", "zh": "图片4"},
    "discord.opt.image.desc": {
        "en": "A reference image to edit or draw from",
        "zh": "要编辑或参考的图片",
    },
    "discord.choice.ratio_auto": {
        "en": "auto (follow the reference image)",
        "zh": "自动（跟随参考图）",
    },
    "discord.choice.quality_low": {"en": "low", "zh": "低"},
    "discord.choice.quality_medium": {"en": "medium", "zh": "中"},
    "discord.choice.quality_high": {"en": "high", "zh": "高"},
    "discord.choice.quality_auto": {"en": "auto", "zh": "自动"},
    "discord.menu.edit": {"en": "Edit with imgbot", "zh": "用 imgbot 编辑"},
    "discord.modal.title": {"en": "Edit with imgbot", "zh": "用 imgbot 编辑"},
    "discord.modal.prompt": {"en": "Prompt", "zh": "提示词"},
    "discord.modal.prompt_hint": {
        "en": "What to change, e.g. make it a watercolour",
        "zh": "要怎么改，例如：改成水彩画风格",
    },
    "discord.modal.options": {"en": "Options (optional)", "zh": "选项（可选）"},
    "discord.modal.options_hint": {"en": "e.g. 16:9 2K high x2", "zh": "例如 16:9 2K high x2"},
    "discord.no_images": {
        "en": "That message has no images to edit.",
        "zh": "这条消息里没有可以编辑的图片。",
    },
    "discord.edit_gone": {
        "en": "This form can no longer find the message's images (deleted, or not readable "
        "by the bot since it restarted). Open Edit with imgbot on the message again. "
        "What you typed:\n{prompt}",
        "zh": "这个表单已找不到那条消息的图片（消息已删除，或机器人重启后无法读取）。"
        "请在消息上重新打开“用 imgbot 编辑”。你输入的内容：\n{prompt}",
    },
    "discord.cmd.help": {"en": "help", "zh": "帮助"},
    "discord.cmd.help.desc": {"en": "How to use imgbot", "zh": "imgbot 使用说明"},
    "discord.cmd.sizes": {"en": "sizes", "zh": "尺寸"},
    "discord.cmd.sizes.desc": {
        "en": "The sizes each ratio and resolution draws",
        "zh": "各比例与分辨率对应的尺寸",
    },
    "discord.cmd.balance": {"en": "balance", "zh": "余额"},
    "discord.cmd.balance.desc": {
        "en": "What you spent, your limits and your last jobs",
        "zh": "你的消费、额度和最近的任务",
    },
    "discord.cmd.cancel": {"en": "cancel", "zh": "取消"},
    "discord.cmd.cancel.desc": {"en": "Cancel your waiting and running jobs", "zh": "取消你排队中和正在绘制的任务"},
    "discord.cmd.key": {"en": "key", "zh": "密钥"},
    "discord.cmd.key.desc": {
        "en": "Your personal web API key (only you see the answer)",
        "zh": "你的个人网页 API 密钥（只有你能看到回复）",
    },
    "discord.opt.action": {"en": "action", "zh": "操作"},
    "discord.opt.action.desc": {
        "en": "Make a new key (default) or revoke all of yours",
        "zh": "生成新密钥（默认）或停用你的全部密钥",
    },
    "discord.choice.key_new": {"en": "new key", "zh": "生成新密钥"},
    "discord.choice.key_revoke": {"en": "revoke my keys", "zh": "停用我的密钥"},
    "discord.key.created": {
        "en": "Your personal API key (#{key_id}). It is shown only this once: I keep only a "
        "fingerprint of it, so copy it now.\n```\n{api_key}\n```\n"
        "Use it with any OpenAI client: base URL `{base_url}` and this key as the API key. "
        "It draws as you, with your limits and spend. Lost it? /key makes another; "
        "/key action:revoke turns off all of yours.",
        "zh": "你的个人 API 密钥（#{key_id}）。它只显示这一次：机器人只保存它的指纹，请现在复制。"
        "\n```\n{api_key}\n```\n"
        "可用于任何 OpenAI 客户端：base URL 为 `{base_url}`，API key 填上面的密钥。"
        "它以你的身份画图，使用你的限额与消费。丢失了？用 /key 再生成一个；"
        "/key 操作:停用我的密钥 可停用你的全部密钥。",
    },
    "discord.key.revoked": {
        "en": "Revoked {count} key(s): the API refuses them from the next request.",
        "zh": "已停用 {count} 个密钥：API 从下一次请求起拒绝它们。",
    },
    "discord.key.none": {
        "en": "You have no active API key. /key makes one.",
        "zh": "你没有有效的 API 密钥。用 /key 生成一个。",
    },
    "discord.cmd.admin": {"en": "admin", "zh": "管理"},
    "discord.cmd.admin.desc": {
        "en": "Bot operators only (ADMINS): limits, refunds, blocks, reports",
        "zh": "仅限机器人运营者（ADMINS）：额度、退款、封禁、报表",
    },
    "discord.cmd.server": {"en": "server", "zh": "本服务器"},
    "discord.cmd.server.desc": {
        "en": "Server managers: this server's daily limit and spend",
        "zh": "服务器管理者：本服务器的每日额度与消费",
    },
    "discord.cmd.server.chatlimit.desc": {
        "en": "Lower this server's daily limit (up to the bot operator's)",
        "zh": "调低本服务器的每日额度（不超过运营者的上限）",
    },
    "discord.cmd.server.chats.desc": {"en": "This server's spend", "zh": "本服务器的消费"},
    "discord.opt.server_amount.desc": {
        "en": "Credits a day, at most the operator's limit (default = the operator's limit)",
        "zh": "每日积分，不超过运营者的上限（default = 运营者的额度）",
    },
    "discord.cmd.admin.limit": {"en": "limit", "zh": "额度"},
    "discord.cmd.admin.limit.desc": {
        "en": "Set a user's daily/monthly limit in credits",
        "zh": "设置用户每日/每月额度（积分）",
    },
    "discord.cmd.admin.chatlimit": {"en": "chatlimit", "zh": "服务器额度"},
    "discord.cmd.admin.chatlimit.desc": {
        "en": "Set a server's daily limit in credits",
        "zh": "设置服务器每日额度（积分）",
    },
    "discord.cmd.admin.refund": {"en": "refund", "zh": "退款"},
    "discord.cmd.admin.refund.desc": {"en": "Refund a job", "zh": "为一个任务退款"},
    "discord.cmd.admin.block": {"en": "block", "zh": "封禁"},
    "discord.cmd.admin.block.desc": {"en": "Block a user or server", "zh": "封禁用户或服务器"},
    "discord.cmd.admin.unblock": {"en": "unblock", "zh": "解封"},
    "discord.cmd.admin.unblock.desc": {"en": "Unblock a user or server", "zh": "解封用户或服务器"},
    "discord.cmd.admin.top": {"en": "top", "zh": "排行"},
    "discord.cmd.admin.top.desc": {"en": "Top spenders", "zh": "消费排行"},
    "discord.cmd.admin.chats": {"en": "chats", "zh": "服务器统计"},
    "discord.cmd.admin.chats.desc": {"en": "Spend per server and chat", "zh": "各服务器/群的消费"},
    "discord.cmd.admin.unsettled": {"en": "unsettled", "zh": "未结算"},
    "discord.cmd.admin.unsettled.desc": {
        "en": "Jobs left unsettled by a crash",
        "zh": "因中断而未结算的任务",
    },
    "discord.opt.user": {"en": "user", "zh": "用户"},
    "discord.opt.user.desc": {
        "en": "User id, @mention or platform:id",
        "zh": "用户 id、@提及 或 platform:id",
    },
    "discord.opt.daily": {"en": "daily", "zh": "每日"},
    "discord.opt.monthly": {"en": "monthly", "zh": "每月"},
    "discord.opt.amount.desc": {
        "en": "Credits (0 = unlimited, default = the default limit)",
        "zh": "积分（0 = 不限，default = 默认额度）",
    },
    "discord.opt.server": {"en": "server", "zh": "服务器"},
    "discord.opt.server.desc": {
        "en": "Server id or platform:id (this server if empty)",
        "zh": "服务器 id 或 platform:id（留空为本服务器）",
    },
    "discord.cmd.admin.grant": {"en": "grant", "zh": "发放积分"},
    "discord.cmd.admin.grant.desc": {
        "en": "Give a user prepaid credits",
        "zh": "给用户发放预付积分",
    },
    "discord.cmd.admin.revoke": {"en": "revoke", "zh": "收回积分"},
    "discord.cmd.admin.revoke.desc": {
        "en": "Take a user's prepaid credits (all without an amount)",
        "zh": "收回用户的预付积分（不填数量则全部收回）",
    },
    "discord.cmd.admin.purchases": {"en": "purchases", "zh": "购买记录"},
    "discord.cmd.admin.purchases.desc": {
        "en": "Telegram Stars purchases",
        "zh": "Telegram Stars 购买记录",
    },
    "discord.opt.credits": {"en": "credits", "zh": "积分"},
    "discord.opt.credits.desc": {"en": "An amount of credits", "zh": "积分数量"},
    "discord.opt.job": {"en": "job", "zh": "任务"},
    "discord.opt.job.desc": {"en": "Job number", "zh": "任务编号"},
    "discord.opt.target": {"en": "target", "zh": "对象"},
    "discord.opt.target.desc": {
        "en": "User or server id, @mention or platform:id",
        "zh": "用户或服务器 id、@提及 或 platform:id",
    },
    "discord.opt.days": {"en": "days", "zh": "天数"},
    "discord.opt.days.desc": {"en": "Days to look back (7 by default)", "zh": "统计最近几天（默认 7）"},
    "discord.button.again": {"en": "Again", "zh": "再来一次"},
    "discord.button.4k": {"en": "4K", "zh": "4K"},
    "discord.button.vary": {"en": "Vary", "zh": "变体"},
    "discord.press_repeated": {
        "en": "Already on it: one press is enough.",
        "zh": "已在处理，按一次就够了。",
    },
    "discord.fit.reencoded": {
        "en": "Uploads here are limited to {limit_mb} MB per message, so image {index} "
        "({size_mb} MB as drawn) was sent as a high-quality {format} ({new_mb} MB, {size}).",
        "zh": "此处每条消息的上传上限为 {limit_mb} MB，第 {index} 张图（原图 {size_mb} MB）"
        "已转为高质量 {format} 发送（{new_mb} MB，{size}）。",
    },
    "discord.fit.failed": {
        "en": "Image {index} could not be made small enough for this channel's {limit_mb} MB limit.",
        "zh": "第 {index} 张图无法压缩到此处 {limit_mb} MB 的上传上限以内。",
    },
    "discord.late": {"en": "{mention}, your image is ready:", "zh": "{mention}，你的图片好了："},
    "discord.late_pending": {
        "en": "Still drawing: the result will be posted in this channel when it is ready.",
        "zh": "仍在绘制中：完成后会发到这个频道。",
    },
    "discord.late_failed": {
        "en": "{mention}, your image could not be finished:",
        "zh": "{mention}，你的图片没能完成：",
    },
    "discord.answered_privately": {
        "en": "The answer was sent to you privately.",
        "zh": "结果已私下发送给你。",
    },
}
