"""Telegram's own wording, in English and Chinese: its command menu, buttons, questions and
the refusals only Telegram gives (files it cannot download, non-image captions).

`text(lang, key, **params)` renders a `tg.*` key from here and any other key from
`core.messages` (core errors, progress, captions), so the adapter needs one lookup.
"""

from __future__ import annotations

from typing import Any

from core.messages import render
from core.messages import text as core_text


def text(lang: str | None, key: str, **params: Any) -> str:
    """Render message `key` (Telegram's own, else core's) in the user's language."""
    entry = MESSAGES.get(key)
    return core_text(lang, key, **params) if entry is None else render(entry, lang, **params)


# key: {"en": …, "zh": …}; `{name}` placeholders are filled from params.
MESSAGES: dict[str, dict[str, str]] = {
    "tg.start": {
        "en": "Hi! I draw images with gpt-image. Write /img and what you want to see.",
        "zh": "你好！我用 gpt-image 画图。发送 /img 加上你想要的画面即可。",
    },
    "tg.file_too_big": {
        "en": "That file is {size_mb} MB; I can download at most {limit_mb} MB. Send it as a photo or a smaller file.",
        "zh": "该文件大小为 {size_mb} MB，机器人最多只能下载 {limit_mb} MB。请以图片方式发送，或换一个更小的文件。",
    },
    "tg.not_image": {
        "en": "“{name}” is not an image, so I cannot draw from it. Nothing was drawn or charged. "
        "Send a photo or an image file (PNG, JPEG, WebP) with /img, or /img alone for a picture "
        "from words.",
        "zh": "“{name}”不是图片，无法用来画图。未绘制、未扣费。请发送图片或图片文件"
        "（PNG、JPEG、WebP）并附上 /img，或只发 /img 加描述文字来画图。",
    },
    "tg.download_failed": {
        "en": "I could not download that image from Telegram. Please send it again.",
        "zh": "无法从 Telegram 下载这张图片，请重新发送。",
    },
    "tg.confirm": {
        "en": "This will cost about {cost}. Draw it? (The question stays open {minutes} minutes.)",
        "zh": "这次大约花费 {cost}。确定要画吗？（{minutes} 分钟内有效）",
    },
    "tg.confirm.draw": {"en": "✅ Draw", "zh": "✅ 画"},
    "tg.album_late": {
        "en": "This photo arrived too late for its album and was not used. Send the album again to use every photo.",
        "zh": "这张图片到达太晚，未用于该相册的任务。请重新发送整个相册以使用全部图片。",
    },
    "tg.confirm.cancel": {"en": "✖ Cancel", "zh": "✖ 取消"},
    "tg.confirm.cancelled": {
        "en": "Cancelled. Nothing was drawn or charged.",
        "zh": "已取消，未绘制、未扣费。",
    },
    "tg.confirm.expired": {
        "en": "This question has expired (or the bot restarted). Send the command again.",
        "zh": "此确认已过期（或机器人已重启），请重新发送命令。",
    },
    "tg.confirm.not_yours": {
        "en": "Only the person who asked can answer this.",
        "zh": "只有发出请求的人才能确认。",
    },
    "tg.button.4k_cost": {"en": "🔍 4K · ≈{cost}", "zh": "🔍 4K · 约{cost}"},
    "tg.not_here": {
        "en": "This button is not available here.",
        "zh": "此按钮在这里不可用。",
    },
    "tg.press_repeated": {
        "en": "Already on it: one press is enough.",
        "zh": "已在处理，按一次就够了。",
    },
    "tg.buttons": {
        "en": "Job #{job_id}: more like this?",
        "zh": "任务 #{job_id}：再来一些？",
    },
    "tg.button.again": {"en": "🔁 Again", "zh": "🔁 再来一张"},
    "tg.button.4k": {"en": "🔍 4K", "zh": "🔍 4K"},
    "tg.button.vary": {"en": "🎲 Vary", "zh": "🎲 变体"},
    "tg.cmd.img": {"en": "Draw an image: /img [options] prompt", "zh": "画图：/img [选项] 描述"},
    "tg.cmd.help": {"en": "How to write /img", "zh": "/img 的写法"},
    "tg.cmd.sizes": {"en": "Ratios and sizes", "zh": "比例与尺寸表"},
    "tg.cmd.balance": {"en": "Your spend and limits", "zh": "你的消费与限额"},
    "tg.cmd.cancel": {"en": "Cancel your waiting and running jobs", "zh": "取消排队中和正在绘制的任务"},
    "tg.cmd.key": {
        "en": "Your personal web API key (private chat only)",
        "zh": "你的个人网页 API 密钥（仅限私聊）",
    },
    "tg.cmd.start": {"en": "Start", "zh": "开始"},
    "tg.cmd.buy": {"en": "Buy credits with Telegram Stars", "zh": "用 Telegram Stars 购买积分"},
    "tg.cmd.paysupport": {"en": "Help with a payment", "zh": "付款帮助"},
    "tg.buy.closed": {
        "en": "Credits are not for sale here.",
        "zh": "这里不出售积分。",
    },
    "tg.buy.no_such_pack": {
        "en": "That pack is not on offer (any more). Send /buy to see the packs there are.",
        "zh": "该套餐不存在（或已下架）。发送 /buy 查看现有套餐。",
    },
    "tg.buy.offer": {
        "en": "Choose a pack of credits (paid in Telegram Stars):",
        "zh": "选择积分套餐（以 Telegram Stars 支付）：",
    },
    "tg.buy.button": {"en": "⭐ {stars} → {credits}", "zh": "⭐ {stars} → {credits}"},
    "tg.buy.title": {"en": "{credits}", "zh": "{credits}"},
    "tg.buy.description": {
        "en": "{credits} for drawing images with imgbot, for {stars} Telegram Stars.",
        "zh": "用于 imgbot 画图的 {credits}，价格 {stars} Telegram Stars。",
    },
    "tg.buy.thanks": {
        "en": "Thank you! {credits} added (purchase #{purchase_id}). Your balance: {balance}.",
        "zh": "谢谢！已到账 {credits}（购买号 #{purchase_id}）。当前余额：{balance}。",
    },
    "tg.paysupport": {
        "en": "Payment help: write what went wrong here, with the purchase number; the bot's "
        "operator answers and can refund a purchase (credits still unspent are taken back). "
        "Your purchases:",
        "zh": "付款帮助：请在此写明问题和购买号；机器人运营者会回复，并可退款"
        "（尚未用掉的积分会被收回）。你的购买记录：",
    },
    "tg.paysupport.line": {
        "en": "#{purchase_id} {when} — {stars} stars → {credits}, {status}",
        "zh": "#{purchase_id} {when} — {stars} 星 → {credits}，{status}",
    },
    # /key: the created answer is HTML (the key in <code> to copy with one tap).
    "tg.key.created": {
        "en": "Your personal API key (#{key_id}). It is shown only this once: I keep only a "
        "fingerprint of it, so copy it now.\n\n<code>{api_key}</code>\n\n"
        "Use it with any OpenAI client: base URL <code>{base_url}</code> and this key as "
        "the API key. It draws as you, with your limits and spend. Lost it? /key makes "
        "another; /key revoke turns off all of yours.",
        "zh": "你的个人 API 密钥（#{key_id}）。它只显示这一次：机器人只保存它的指纹，请现在复制。"
        "\n\n<code>{api_key}</code>\n\n"
        "可用于任何 OpenAI 客户端：base URL 为 <code>{base_url}</code>，API key 填上面的密钥。"
        "它以你的身份画图，使用你的限额与消费。丢失了？发送 /key 再生成一个；/key revoke 停用你的全部密钥。",
    },
    "tg.key.private_only": {
        "en": "/key only works in a private chat with me, so your key is never shown to "
        "others. Open a chat with me and send /key there.",
        "zh": "/key 只能在与我的私聊中使用，以免密钥被他人看到。请私聊我并在那里发送 /key。",
    },
    "tg.key.revoked": {
        "en": "Revoked {count} key(s): the API refuses them from the next request.",
        "zh": "已停用 {count} 个密钥：API 从下一次请求起拒绝它们。",
    },
    "tg.key.none": {
        "en": "You have no active API key. /key makes one.",
        "zh": "你没有有效的 API 密钥。发送 /key 生成一个。",
    },
    "tg.cmd.web": {
        "en": "Open the web page (draw, references, masks, history)",
        "zh": "打开网页（画图、参考图、遮罩、历史）",
    },
    "tg.web.open": {
        "en": "The web page draws as you, with your limits and spend: the command language, "
        "pickers, references with a mask, and your history. No key needed.",
        "zh": "网页以你的身份画图，使用你的限额与消费：命令语法、选项、参考图与遮罩，以及你的历史记录。无需密钥。",
    },
    "tg.web.button": {"en": "🖼 Open imgbot", "zh": "🖼 打开 imgbot"},
    "tg.web.private_only": {
        "en": "/web only works in a private chat with me. Open a chat with me and send /web there.",
        "zh": "/web 只能在与我的私聊中使用。请私聊我并在那里发送 /web。",
    },
    "tg.web.needs_https": {
        "en": "The web page cannot open inside Telegram yet: Telegram needs an https address. "
        "The operator sets WEB_PUBLIC_URL to the page's https address (behind a proxy).",
        "zh": "网页暂时无法在 Telegram 中打开：Telegram 要求 https 地址。"
        "请运营者将 WEB_PUBLIC_URL 设置为网页的 https 地址（通过反向代理）。",
    },
    "tg.web.off": {
        "en": "The web page is turned off on this bot (WEB_PORT=0).",
        "zh": "此机器人已关闭网页（WEB_PORT=0）。",
    },
    "tg.cmd.limit": {"en": "Admin: set a user's limits", "zh": "管理：设置用户限额"},
    "tg.cmd.chatlimit": {"en": "Admin: set a chat's daily limit", "zh": "管理：设置群每日限额"},
    "tg.cmd.refund": {"en": "Admin: refund a job", "zh": "管理：退还任务"},
    "tg.cmd.block": {"en": "Admin: block a user or chat", "zh": "管理：禁止用户或群"},
    "tg.cmd.unblock": {"en": "Admin: unblock a user or chat", "zh": "管理：解除禁止"},
    "tg.cmd.top": {"en": "Admin: top spenders", "zh": "管理：消费排行"},
    "tg.cmd.chats": {"en": "Admin: spend per chat", "zh": "管理：各群消费"},
    "tg.cmd.unsettled": {"en": "Admin: unsettled jobs", "zh": "管理：未结算任务"},
    "tg.cmd.grant": {"en": "Admin: give a user credits", "zh": "管理：给用户积分"},
    "tg.cmd.revoke": {"en": "Admin: take a user's credits", "zh": "管理：收回用户积分"},
    "tg.cmd.purchases": {"en": "Admin: Stars purchases", "zh": "管理：Stars 购买记录"},
}
