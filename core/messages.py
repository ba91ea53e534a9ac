"""The wording of core texts — core errors, notices, reports, help — in English and Chinese.

`text(lang, key, **params)` renders one. `lang` may be a raw platform code (Telegram's
`language_code`, Discord's `locale`); `language_of` folds it to "en" or "zh". A front end's
own wording (its buttons, command menu, platform refusals) lives in its `texts` module,
whose `text` renders its keys with `render` and falls back to this one for shared keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LANGUAGES = ("en", "zh")
_default_language = "en"


def set_default_language(lang: str) -> None:
    """Set the language used when a user's is unknown (from settings, once)."""
    global _default_language
    _default_language = language_of(lang)


def language_of(code: str | None) -> str:
    """Fold a platform language code into one of LANGUAGES."""
    if not code:
        return _default_language
    low = code.strip().lower()
    if low.startswith("zh"):
        return "zh"
    if low.startswith("en"):
        return "en"
    return _default_language if _default_language in LANGUAGES else "en"


def text(lang: str | None, key: str, **params: Any) -> str:
    """Render message `key` in the user's language with its parameters."""
    return render(MESSAGES.get(key) or MESSAGES["error.internal"], lang, **params)


def render(entry: Mapping[str, str], lang: str | None, **params: Any) -> str:
    """Render one entry of a message table (`{"en": …, "zh": …}`) in the user's language."""
    template = entry[language_of(lang)]
    try:
        return template.format(**params)
    except (KeyError, IndexError, ValueError):
        return template


# key: {"en": …, "zh": …}; `{name}` placeholders are filled from params.
MESSAGES: dict[str, dict[str, str]] = {
    "error.internal": {
        "en": "Something went wrong on our side. Please try again later.",
        "zh": "服务内部出错，请稍后再试。",
    },
    # --- prompt & sizes ------------------------------------------------------------
    # Parse errors: each says what was wrong and shows a correct example.
    "prompt.empty": {
        "en": "There is nothing to draw: write the picture after the options.\nExample: /img 16:9 2K high a white siamese cat",
        "zh": "没有要画的内容：请在选项后面写上画面描述。\n示例：/img 16:9 2K high 一只白色暹罗猫",
    },
    "prompt.too_long": {
        "en": "The prompt is {length} characters long; the limit is {limit}. Shorten it.\nExample: /img 16:9 a white siamese cat on a windowsill",
        "zh": "描述有 {length} 个字符，超过了 {limit} 的上限，请缩短。\n示例：/img 16:9 窗台上的一只白色暹罗猫",
    },
    "prompt.ratio_invalid": {
        "en": "{ratio} is not a ratio I can draw: both sides must be whole numbers above 0.\nExample: /img 16:9 a white siamese cat",
        "zh": "{ratio} 不是可用的比例：两边都必须是大于 0 的整数。\n示例：/img 16:9 一只白色暹罗猫",
    },
    "prompt.ratio_too_wide": {
        "en": "{ratio} is too stretched: the longest side may be at most 3 times the shortest (3:1 or 1:3).\nExample: /img 3:1 a mountain panorama",
        "zh": "{ratio} 太细长了：长边最多是短边的 3 倍（3:1 或 1:3）。\n示例：/img 3:1 山脉全景",
    },
    "prompt.ratio_twice": {
        "en": "Two different ratios were given ({first} and {second}); give just one.\nExample: /img 16:9 a white siamese cat",
        "zh": "给了两个不同的比例（{first} 和 {second}），请只保留一个。\n示例：/img 16:9 一只白色暹罗猫",
    },
    "prompt.option_twice": {
        "en": "{first} and {second} ask for two different {what}s; give just one.\nExample: /img 2K high a white siamese cat",
        "zh": "{first} 和 {second} 互相冲突，请只保留一个。\n示例：/img 2K high 一只白色暹罗猫",
    },
    "prompt.size_and_ratio": {
        "en": "Give either a size ({size}) or a ratio ({ratio}), not both.\nExample: /img 1536x1024 a white siamese cat  or  /img 3:2 a white siamese cat",
        "zh": "尺寸（{size}）和比例（{ratio}）只能给一个。\n示例：/img 1536x1024 一只白色暹罗猫  或  /img 3:2 一只白色暹罗猫",
    },
    "prompt.size_and_tier": {
        "en": "Give either a size ({size}) or a tier ({tier}), not both: a ratio with a tier picks the size for you.\nExample: /img 16:9 2K a white siamese cat  or  /img 2048x1152 a white siamese cat",
        "zh": "尺寸（{size}）和清晰度档位（{tier}）只能给一个：比例加档位会自动选好尺寸。\n示例：/img 16:9 2K 一只白色暹罗猫  或  /img 2048x1152 一只白色暹罗猫",
    },
    "prompt.size_step": {
        "en": "{size} cannot be drawn: both width and height must be multiples of 16. Try {good}.\nExample: /img {good} a white siamese cat",
        "zh": "无法绘制 {size}：宽和高都必须是 16 的倍数。可以试试 {good}。\n示例：/img {good} 一只白色暹罗猫",
    },
    "prompt.size_edge": {
        "en": "{size} cannot be drawn: the longest edge may be at most {max_edge} pixels. Try {good}.\nExample: /img {good} a white siamese cat",
        "zh": "无法绘制 {size}：最长边不能超过 {max_edge} 像素。可以试试 {good}。\n示例：/img {good} 一只白色暹罗猫",
    },
    "prompt.size_aspect": {
        "en": "{size} cannot be drawn: the longest edge may be at most 3 times the shortest (3:1). Try {good}.\nExample: /img {good} a mountain panorama",
        "zh": "无法绘制 {size}：长边最多是短边的 3 倍（3:1）。可以试试 {good}。\n示例：/img {good} 山脉全景",
    },
    "prompt.size_small": {
        "en": "{size} cannot be drawn: it has {pixels} pixels and the minimum is {min_pixels}. Try {good}.\nExample: /img {good} a white siamese cat",
        "zh": "无法绘制 {size}：它只有 {pixels} 像素，最少需要 {min_pixels}。可以试试 {good}。\n示例：/img {good} 一只白色暹罗猫",
    },
    "prompt.size_large": {
        "en": "{size} cannot be drawn: it has {pixels} pixels and the maximum is {max_pixels}. Try {good}.\nExample: /img {good} a white siamese cat",
        "zh": "无法绘制 {size}：它有 {pixels} 像素，最多只能 {max_pixels}。可以试试 {good}。\n示例：/img {good} 一只白色暹罗猫",
    },
    "prompt.size_fixed": {
        "en": "{model} cannot draw {size}: it draws only 1024x1024, 1536x1024 or 1024x1536. Use a ratio, or gpt-image-2 for other sizes.\nExample: /img {model} 1536x1024 a white siamese cat",
        "zh": "{model} 不能画 {size}：它只支持 1024x1024、1536x1024 和 1024x1536。请用比例，或换 gpt-image-2 画其他尺寸。\n示例：/img {model} 1536x1024 一只白色暹罗猫",
    },
    "prompt.count_range": {
        "en": "{value}: you can ask for 1 to {max} images at a time.\nExample: /img x2 a white siamese cat",
        "zh": "{value}：每次可以画 1 到 {max} 张。\n示例：/img x2 一只白色暹罗猫",
    },
    "prompt.unknown_model": {
        "en": "{model} is not a model I know. Known models: {models}.\nExample: /img gpt-image-1.5 a white siamese cat",
        "zh": "不认识模型 {model}。可用的模型：{models}。\n示例：/img gpt-image-1.5 一只白色暹罗猫",
    },
    "prompt.unknown_flag": {
        "en": "{flag} is not an option I know (known: {flags}). To draw text that starts with --, put -- before the prompt.\nExample: /img --ar 16:9 a white siamese cat  or  /img -- {flag} …",
        "zh": "不认识选项 {flag}（可用：{flags}）。如果这是画面描述的一部分，请在描述前加 --。\n示例：/img --ar 16:9 一只白色暹罗猫  或  /img -- {flag} …",
    },
    "prompt.flag_value": {
        "en": "{flag} needs a value it can use (got “{value}”).\nExample: /img {example} a white siamese cat",
        "zh": "{flag} 后面需要一个有效的值（收到的是“{value}”）。\n示例：/img {example} 一只白色暹罗猫",
    },
    "prompt.flag_missing": {
        "en": "{flag} needs a value after it.\nExample: /img {example} a white siamese cat",
        "zh": "{flag} 后面需要跟一个值。\n示例：/img {example} 一只白色暹罗猫",
    },
    "prompt.transparent_jpeg": {
        "en": "A transparent background needs png or webp; {format} has no transparency.\nExample: /img transparent png a cat sticker",
        "zh": "透明背景需要 png 或 webp 格式，{format} 不支持透明。\n示例：/img transparent png 一张猫咪贴纸",
    },
    "prompt.fidelity_model": {
        "en": "{model} does not take --fidelity (it always keeps the reference at high fidelity). Only {models} do; drop --fidelity or name one of them.\nExample: /img gpt-image-1.5 --fidelity high make it winter  (with a photo attached)",
        "zh": "{model} 不支持 --fidelity（它总是以高保真度参考原图）。只有 {models} 支持；请去掉 --fidelity，或指定其中一个模型。\n示例：/img gpt-image-1.5 --fidelity high 改成冬天  （附上照片）",
    },
    "prompt.fidelity_needs_reference": {
        "en": "--fidelity says how closely to follow a reference image, and there is none. Attach a photo (or reply to one), or drop --fidelity.\nExample: /img gpt-image-1.5 --fidelity high make it winter  (with a photo attached)",
        "zh": "--fidelity 表示对参考图的忠实程度，但这里没有参考图。请附上照片（或回复一张照片），或去掉 --fidelity。\n示例：/img gpt-image-1.5 --fidelity high 改成冬天  （附上照片）",
    },
    "prompt.compression_format": {
        "en": "{value}: compression applies to jpeg and webp only; name one of them (png is always lossless).\nExample: /img jpeg --compression 80 a white siamese cat",
        "zh": "{value}：压缩率只适用于 jpeg 和 webp，请同时指定其中一种格式（png 总是无损的）。\n示例：/img jpeg --compression 80 一只白色暹罗猫",
    },
    "prompt.compression_range": {
        "en": "{value}: compression is a whole number from 0 to 100 (100 = best quality, the default).\nExample: /img webp --compression 80 a white siamese cat",
        "zh": "{value}：压缩率是 0 到 100 的整数（100 为最高画质，默认值）。\n示例：/img webp --compression 80 一只白色暹罗猫",
    },
    # Notices: how a request was adapted.
    "size.approximate": {
        "en": "{ratio} has no exact size on the 16-pixel grid; drawing {size}, the nearest.",
        "zh": "{ratio} 无法精确对齐到 16 像素网格，改用最接近的 {size}。",
    },
    "size.model_max": {
        "en": "{model} draws at most 1536x1024, so {tier} is not available; drawing {size}.",
        "zh": "{model} 最大只能画 1536x1024，不支持 {tier}；改为 {size}。",
    },
    "size.model_aspect": {
        "en": "{model} has no {ratio} size; drawing {size}, the nearest it has.",
        "zh": "{model} 没有 {ratio} 的尺寸，改用最接近的 {size}。",
    },
    "size.aspect_clamped": {
        "en": "The reference is {given}, more stretched than 3:1; drawing at {ratio}.",
        "zh": "参考图为 {given}，比例超过 3:1；按 {ratio} 绘制。",
    },
    "size.tier_ignored": {
        "en": "The size is auto (the API picks it, following any reference image), so {tier} was not applied.",
        "zh": "尺寸为 auto（由接口决定，有参考图时跟随参考图），因此未使用 {tier}。",
    },
    "sizes.header": {
        "en": "Sizes gpt-image-2 draws for each ratio and tier:",
        "zh": "gpt-image-2 在各比例和档位下的尺寸：",
    },
    "sizes.ratio": {"en": "ratio", "zh": "比例"},
    "sizes.footer": {
        "en": "Example: /img 16:9 2K a white siamese cat. Other ratios from 1:3 to 3:1 work too, or an exact size like 1536x864. gpt-image-1 and gpt-image-1.5 draw only 1024x1024, 1536x1024 and 1024x1536.",
        "zh": "示例：/img 16:9 2K 一只白色暹罗猫。也支持 1:3 到 3:1 之间的其他比例，或直接写尺寸如 1536x864。gpt-image-1 和 gpt-image-1.5 只能画 1024x1024、1536x1024 和 1024x1536。",
    },
    # Pricing display.
    "price.credits": {
        "en": "{credits} credits ≈ ¥{yuan}",
        "zh": "{credits} 积分 ≈ ¥{yuan}",
    },
    "prompt.invalid": {
        "en": "I could not read that command.\nExample: /img 16:9 2K high a white siamese cat",
        "zh": "无法识别这条命令。\n示例：/img 16:9 2K high 一只白色暹罗猫",
    },
    # --- references & image client ---------------------------------------------------
    "ref.too_many": {
        "en": "Too many reference images: {count}. At most {limit} can be used at once.",
        "zh": "参考图太多：{count} 张。一次最多只能用 {limit} 张。",
    },
    "ref.too_big": {
        "en": "Reference image {index} is {size_mb} MB; each may be at most {limit_mb} MB.",
        "zh": "第 {index} 张参考图有 {size_mb} MB，每张最多 {limit_mb} MB。",
    },
    "ref.not_image": {
        "en": "Reference {index} is not an image I can read. Send PNG, JPEG or WebP "
        "(GIF, BMP and TIFF are converted).",
        "zh": "第 {index} 个参考文件不是可识别的图片。请发送 PNG、JPEG 或 WebP"
        "（GIF、BMP、TIFF 会自动转换）。",
    },
    "ref.corrupt": {
        "en": "Reference image {index} is damaged or incomplete (cut off). Please send it again.",
        "zh": "第 {index} 张参考图已损坏或不完整（被截断），请重新发送。",
    },
    "ref.too_many_pixels": {
        "en": "Reference image {index} has too many pixels; the limit is {limit_mp} megapixels. "
        "Please send a smaller version.",
        "zh": "第 {index} 张参考图像素过多，上限为 {limit_mp} 百万像素，请发送缩小后的版本。",
    },
    "ref.download_too_large": {
        "en": "Reference image {index} is too large to download (limit {limit_mb} MB).",
        "zh": "第 {index} 张参考图太大，无法下载（上限 {limit_mb} MB）。",
    },
    "ref.download_failed": {
        "en": "Reference image {index} could not be downloaded. Please send it again.",
        "zh": "第 {index} 张参考图下载失败，请重新发送。",
    },
    "ref.mask_not_image": {
        "en": "The mask is not an image I can read. Send a PNG with transparency where the "
        "picture should change.",
        "zh": "蒙版不是可识别的图片。请发送在需要修改处透明的 PNG。",
    },
    "ref.mask_size": {
        "en": "The mask is {size}; it must be the size of the first image ({expected}).",
        "zh": "蒙版尺寸为 {size}，必须与第一张图片相同（{expected}）。",
    },
    "ref.mask_without_image": {
        "en": "A mask needs an image to apply to: send the image too.",
        "zh": "蒙版需要配合图片使用：请同时发送图片。",
    },
    "ref.invalid": {
        "en": "That reference image cannot be used.",
        "zh": "这张参考图无法使用。",
    },
    # --- upstream ----------------------------------------------------------------------
    "upstream.moderation": {
        "en": "The image service's safety system refused this prompt or image. "
        "Please rephrase it and try again.",
        "zh": "绘图服务的安全系统拒绝了这条提示词或图片，请换个说法再试。",
    },
    "upstream.auth": {
        "en": "The image service refused the bot's API key. The bot operator needs to check "
        "OPENAI_API_KEY.",
        "zh": "绘图服务拒绝了机器人的 API 密钥，需要管理员检查 OPENAI_API_KEY。",
    },
    "upstream.misconfigured": {
        "en": "The image service does not know this address or model. The bot operator needs "
        "to check OPENAI_BASE_URL and the model name.",
        "zh": "绘图服务不认识这个地址或模型，需要管理员检查 OPENAI_BASE_URL 和模型名称。",
    },
    "upstream.unknown_parameter": {
        "en": "The image service does not accept the parameter '{param}'. The bot operator "
        "needs to fix the settings (the official API needs RESPONSE_FORMAT=none).",
        "zh": "绘图服务不接受参数“{param}”，需要管理员修改设置"
        "（官方 API 需要 RESPONSE_FORMAT=none）。",
    },
    "upstream.balance": {
        "en": "The image service account is out of balance. The bot operator needs to top it up.",
        "zh": "绘图服务账户余额不足，需要管理员充值。",
    },
    "upstream.rate_limited": {
        "en": "The image service is rate limiting us right now. Please try again in a minute.",
        "zh": "绘图服务当前限流，请一分钟后再试。",
    },
    "upstream.unavailable": {
        "en": "The image service is unavailable right now (server error or no connection). "
        "Please try again later.",
        "zh": "绘图服务暂时不可用（服务器出错或无法连接），请稍后再试。",
    },
    "upstream.timeout": {
        "en": "The image service did not answer in time ({seconds} s). Please try again, "
        "perhaps with a smaller size or lower quality.",
        "zh": "绘图服务未在时限内（{seconds} 秒）返回结果。请重试，或换较小尺寸、较低画质。",
    },
    "upstream.rejected": {
        "en": "The image service refused the request ({ref}). Nothing was charged. "
        "Please change the options or the prompt and try again.",
        "zh": "绘图服务拒绝了这个请求（{ref}），未扣费。请修改选项或提示词后重试。",
    },
    "upstream.malformed": {
        "en": "The image service sent an answer that could not be read.",
        "zh": "绘图服务返回的结果无法读取。",
    },
    "upstream.corrupt_image": {
        "en": "The image service sent a damaged image (cut short or corrupt), so there is "
        "nothing to show. The service billed the call, so it is charged. Please try again.",
        "zh": "绘图服务返回的图片已损坏（不完整或数据错误），无法显示。该服务已对此次调用计费，"
        "因此本次照常扣费。请重试。",
    },
    "upstream.no_image": {
        "en": "The image service answered without any image.",
        "zh": "绘图服务的回复里没有图片。",
    },
    "upstream.download_failed": {
        "en": "The image was drawn, but it could not be downloaded from the image service.",
        "zh": "图片已生成，但无法从绘图服务下载。",
    },
    "upstream.error": {
        "en": "The image service failed. Nothing was charged. Please try again.",
        "zh": "绘图服务出错，未扣费，请重试。",
    },
    # --- ledger & service ------------------------------------------------------------
    "limit.user_daily": {
        "en": "This request needs {asked:,.0f} credits, but only {remaining:,.0f} of your "
        "daily limit of {limit:,.0f} are left today (UTC).",
        "zh": "本次请求需要 {asked:,.0f} 积分，但你今日（UTC）额度 {limit:,.0f} 仅剩 "
        "{remaining:,.0f}。",
    },
    "limit.user_monthly": {
        "en": "This request needs {asked:,.0f} credits, but only {remaining:,.0f} of your "
        "monthly limit of {limit:,.0f} are left this month (UTC).",
        "zh": "本次请求需要 {asked:,.0f} 积分，但你本月（UTC）额度 {limit:,.0f} 仅剩 "
        "{remaining:,.0f}。",
    },
    "limit.chat_daily": {
        "en": "This request needs {asked:,.0f} credits, but only {remaining:,.0f} of this "
        "chat's daily limit of {limit:,.0f} are left today (UTC).",
        "zh": "本次请求需要 {asked:,.0f} 积分，但本群今日（UTC）额度 {limit:,.0f} 仅剩 "
        "{remaining:,.0f}。",
    },
    "limit.global_daily": {
        "en": "This request needs {asked:,.0f} credits, but only {remaining:,.0f} of the "
        "bot's daily budget of {limit:,.0f} are left today (UTC).",
        "zh": "本次请求需要 {asked:,.0f} 积分，但机器人今日（UTC）总预算 {limit:,.0f} 仅剩 "
        "{remaining:,.0f}。",
    },
    "limit.balance": {
        "en": "This request needs {asked:,.0f} credits, but your balance is {remaining:,.0f}. "
        "Top up with /buy (Telegram) or ask the bot's operator for credits.",
        "zh": "本次请求需要 {asked:,.0f} 积分，但你的余额只有 {remaining:,.0f}。"
        "可用 /buy 充值（Telegram），或向机器人运营者申请积分。",
    },
    "purchase.not_found": {
        "en": "Purchase #{purchase_id} was not found.",
        "zh": "找不到购买记录 #{purchase_id}。",
    },
    "purchase.already_refunded": {
        "en": "Purchase #{purchase_id} was already refunded.",
        "zh": "购买记录 #{purchase_id} 已经退款。",
    },
    "purchase.no_refunder": {
        "en": "Purchase #{purchase_id} was paid with Telegram Stars: refund it from the "
        "running Telegram bot (refund purchase {purchase_id}), which can reach Telegram.",
        "zh": "购买记录 #{purchase_id} 以 Telegram Stars 支付：请在运行中的 Telegram 机器人里退款"
        "（refund purchase {purchase_id}），它才能连到 Telegram。",
    },
    "purchase.refund_failed": {
        "en": "Telegram refused the refund of purchase #{purchase_id} ({reason}); nothing "
        "was changed.",
        "zh": "Telegram 拒绝了购买记录 #{purchase_id} 的退款（{reason}）；未做任何更改。",
    },
    "purchase.refunded": {
        "en": "Purchase #{purchase_id} refunded: {stars} stars back to {user}; "
        "{taken:,.0f} credits taken back ({spent:,.0f} were already spent).",
        "zh": "购买记录 #{purchase_id} 已退款：{stars} 星已退还给 {user}；收回 {taken:,.0f} 积分"
        "（已用掉 {spent:,.0f}）。",
    },
    "purchase.status.paid": {"en": "paid", "zh": "已支付"},
    "purchase.status.refunded": {"en": "refunded", "zh": "已退款"},
    "pay.unknown_payload": {
        "en": "This payment does not match any pack of ours. The operator was told; "
        "use /paysupport.",
        "zh": "这笔付款与我们的任何套餐都不符，已通知运营者；请使用 /paysupport。",
    },
    "job.not_found": {
        "en": "Job #{job_id} was not found.",
        "zh": "找不到任务 #{job_id}。",
    },
    "refund.not_refundable": {
        "en": "Job #{job_id} cannot be refunded (status: {status}); only succeeded, "
        "unsettled or charged failed jobs can be.",
        "zh": "任务 #{job_id} 无法退款（状态：{status}）；只有成功、未结算或已扣费的失败任务可以退款。",
    },
    "refund.done": {
        "en": "Job #{job_id} refunded: {credits:,.0f} credits given back to {user}.",
        "zh": "任务 #{job_id} 已退款：{credits:,.0f} 积分已退还给 {user}。",
    },
    # --- pipeline, help, captions, admin (lead) ---------------------------------------
    "access.denied": {
        "en": "You are not allowed to use this bot here.",
        "zh": "你无权在此使用本机器人。",
    },
    "access.not_allowed": {
        "en": "This bot is private: you are not on its list of users. Ask the operator to add you.",
        "zh": "这是私有机器人，你不在允许名单中。请联系管理员添加。",
    },
    "access.chat_not_allowed": {
        "en": "This bot is not enabled in this chat. Ask the operator to allow it.",
        "zh": "本群/服务器未启用此机器人，请联系管理员开通。",
    },
    "access.blocked": {
        "en": "You have been blocked from using this bot.",
        "zh": "你已被禁止使用本机器人。",
    },
    "access.own_chat_only": {
        "en": "As a server manager you can only change this server's own limit.",
        "zh": "作为服务器管理者，你只能修改本服务器的限额。",
    },
    "access.chatlimit_ceiling": {
        "en": "A server's admins can only lower its daily limit: the bot's operator allows "
        "at most {limit:,.0f} credits a day. Choose a number from 1 to {limit:,.0f}, or "
        "`default` for the operator's limit.",
        "zh": "服务器管理者只能调低本服务器的每日额度：机器人运营者允许的上限是每天 "
        "{limit:,.0f} 积分。请填 1 到 {limit:,.0f} 之间的数，或填 default 恢复运营者的额度。",
    },
    "access.admin_only": {
        "en": "Only admins can use that command.",
        "zh": "只有管理员可以使用该命令。",
    },
    "rate.limited": {
        "en": "Slow down: at most {per_minute} requests a minute. Try again in {seconds} s.",
        "zh": "请求太频繁：每分钟最多 {per_minute} 次，请 {seconds} 秒后再试。",
    },
    "queue.full": {
        "en": "You already have {waiting} jobs waiting. Wait for them to finish, or /cancel.",
        "zh": "你已有 {waiting} 个任务在排队，请等待完成或发送 /cancel 取消。",
    },
    "job.cancelled": {
        "en": "Your waiting job was cancelled. Nothing was charged.",
        "zh": "你排队中的任务已取消，未扣费。",
    },
    "job.cancelled_running": {
        "en": "Your job #{job_id} was cancelled while drawing. It is charged only what the image service bills for it, if anything.",
        "zh": "你正在绘制的任务 #{job_id} 已取消，只按图片服务实际计费的部分扣费（如有）。",
    },
    "job.shutting_down": {
        "en": "The bot is restarting; your job was not run and nothing was charged. Please send it again in a minute.",
        "zh": "机器人正在重启，任务未执行、未扣费。请稍后重新发送。",
    },
    "job.resumes_after_restart": {
        "en": "The bot is restarting. Your job #{job_id} is kept and continues right after the restart; you pay for it once.",
        "zh": "机器人正在重启。你的任务 #{job_id} 已保留，重启后立即继续；只计费一次。",
    },
    "job.resumed": {
        "en": "The bot restarted; continuing your job #{job_id}…",
        "zh": "机器人已重启，正在继续你的任务 #{job_id}…",
    },
    "job.interrupted_released": {
        "en": "The bot restarted twice while drawing your job #{job_id}, so it was stopped. Nothing was charged; please send it again.",
        "zh": "绘制你的任务 #{job_id} 时机器人两次重启，任务已停止。未扣费，请重新发送。",
    },
    "job.references_gone": {
        "en": "The bot restarted and could not fetch the images of your job #{job_id} again. Nothing was charged; please send it again.",
        "zh": "机器人重启后无法重新获取任务 #{job_id} 的参考图。未扣费，请重新发送。",
    },
    "job.undelivered": {
        "en": "Your image (job #{job_id}) was drawn but could not be delivered after several tries. It is marked undelivered; an admin can refund it.",
        "zh": "你的图片（任务 #{job_id}）已生成，但多次尝试后仍无法发送。已标记为未送达，管理员可退款。",
    },
    "job.result_lost": {
        "en": "Your image (job #{job_id}) was drawn, but its kept copy was lost in a restart. It is marked undelivered; an admin can refund it.",
        "zh": "你的图片（任务 #{job_id}）已生成，但保存的副本在重启中丢失。已标记为未送达，管理员可退款。",
    },
    "job.taken_over": {
        "en": "Job #{job_id} is carried on by another process of the bot.",
        "zh": "任务 #{job_id} 由机器人的另一个进程继续处理。",
    },
    "job.duplicate": {
        "en": "That message was already handled (job #{job_id}).",
        "zh": "该消息已处理过（任务 #{job_id}）。",
    },
    "job.no_result": {
        "en": "Job #{job_id} has no image to vary.",
        "zh": "任务 #{job_id} 没有可用于变体的图片。",
    },
    "limit.exceeded": {
        "en": "This request would go over your spending limit.",
        "zh": "此请求将超出你的消费限额。",
    },
    "limit.try": {
        "en": "This would fit: {suggestion}",
        "zh": "可以试试：{suggestion}",
    },
    "cancel.done": {
        "en": "Cancelled {count} job(s):\n{jobs}",
        "zh": "已取消 {count} 个任务：\n{jobs}",
    },
    "cancel.line_waiting": {
        "en": "#{job_id} “{prompt}” — was waiting, nothing charged",
        "zh": "#{job_id}「{prompt}」— 排队中，未扣费",
    },
    "cancel.line_running": {
        "en": "#{job_id} “{prompt}” — was drawing; charged only what the image service bills for it, if anything",
        "zh": "#{job_id}「{prompt}」— 正在绘制；只按图片服务实际计费的部分扣费（如有）",
    },
    "cancel.line_waiting_later": {
        "en": "#{job_id} “{prompt}” — was waiting; stops in a moment, nothing charged",
        "zh": "#{job_id}「{prompt}」— 排队中；稍后停止，未扣费",
    },
    "cancel.line_running_later": {
        "en": "#{job_id} “{prompt}” — was drawing; stops in a moment, charged only what the image service bills for it, if anything",
        "zh": "#{job_id}「{prompt}」— 正在绘制；稍后停止，只按图片服务实际计费的部分扣费（如有）",
    },
    "cancel.none": {
        "en": "You have no waiting or running jobs.",
        "zh": "你没有排队中或正在绘制的任务。",
    },
    "progress.queued": {
        "en": "⏳ In the queue: #{position}",
        "zh": "⏳ 排队中：第 {position} 位",
    },
    "progress.started": {
        "en": "🎨 Drawing…",
        "zh": "🎨 正在绘制…",
    },
    "progress.working": {
        "en": "🎨 Drawing… {seconds} s",
        "zh": "🎨 正在绘制… {seconds} 秒",
    },
    "progress.partial": {
        "en": "🎨 Drawing… {seconds} s — preview {number}",
        "zh": "🎨 正在绘制… {seconds} 秒 — 预览 {number}",
    },
    "caption.cost": {
        "en": "Cost: {cost}",
        "zh": "本次消耗：{cost}",
    },
    "caption.references": {
        "en": "References used: {count}",
        "zh": "使用的参考图：{count} 张",
    },
    "caption.job": {
        "en": "Job #{job_id} · {seconds} s",
        "zh": "任务 #{job_id} · {seconds} 秒",
    },
    "spend.balance": {
        "en": "Balance: {balance} credits",
        "zh": "余额：{balance} 积分",
    },
    "spend.today": {
        "en": "Today: {spent} credits",
        "zh": "今日：{spent} 积分",
    },
    "spend.today_of": {
        "en": "Today: {spent} / {limit} credits",
        "zh": "今日：{spent} / {limit} 积分",
    },
    "spend.month_of": {
        "en": "Month: {spent} / {limit}",
        "zh": "本月：{spent} / {limit}",
    },
    "status.reserved": {"en": "running", "zh": "进行中"},
    "status.succeeded": {"en": "done", "zh": "完成"},
    "status.failed": {"en": "failed", "zh": "失败"},
    "status.unsettled": {"en": "unsettled", "zh": "未结算"},
    "status.refunded": {"en": "refunded", "zh": "已退款"},
    "job.line": {
        "en": "#{job_id} {when} {status} {size} {quality} — {cost}",
        "zh": "#{job_id} {when} {status} {size} {quality} — {cost}",
    },
    "balance.header": {"en": "Your spend", "zh": "你的消费"},
    "balance.today": {
        "en": "Today: {spent} / {limit} credits",
        "zh": "今日：{spent} / {limit} 积分",
    },
    "balance.month": {
        "en": "This month: {spent} / {limit} credits",
        "zh": "本月：{spent} / {limit} 积分",
    },
    "balance.all_time": {"en": "All time: {spent} credits", "zh": "累计：{spent} 积分"},
    "balance.last_jobs": {"en": "Last jobs:", "zh": "最近任务："},
    "balance.unlimited": {"en": "no limit", "zh": "不限"},
    "balance.credits": {
        "en": "Credit balance: {balance} credits",
        "zh": "积分余额：{balance} 积分",
    },
    "balance.default_limit": {"en": "default", "zh": "默认"},
    "help.text": {
        "en": (
            "Draw an image: /img [options] prompt\n"
            "\n"
            "Options (any order, before the prompt):\n"
            "• ratio: 1:1 16:9 9:16 4:3 3:4 3:2 2:3 5:4 4:5 21:9 (any W:H up to 3:1), auto\n"
            "• resolution: 1K 2K 4K\n"
            "• quality: low medium high auto\n"
            "• size: 1536x1024 (edges multiples of 16, at most 3840)\n"
            "• count: x2 or n=2\n"
            "• model: gpt-image-2 gpt-image-1.5 gpt-image-1\n"
            "• format: png jpeg webp, transparent; file = send the original file\n"
            "• --compression 0-100 (jpeg/webp), --moderation low|auto, --fidelity high|low (edits, gpt-image-1.5/1)\n"
            "• Midjourney style works too: --ar 16:9 --q high --n 2\n"
            "• -- ends the options (for a prompt that starts with an option word)\n"
            "\n"
            "Examples:\n"
            "/img a white siamese cat\n"
            "/img 16:9 2K high a white siamese cat on a windowsill\n"
            "/img 9:16 low x2 a neon city at night\n"
            "/img 1536x1024 gpt-image-1.5 a watercolor fox\n"
            "Attach photos (or reply to one) to edit them: /img make it winter\n"
            "\n"
            "Costs: low is cheap, high and 4K cost much more; /balance shows your spend, /sizes the size table."
        ),
        "zh": (
            "画图：/img [选项] 描述\n"
            "\n"
            "选项（任意顺序，写在描述前）：\n"
            "• 比例：1:1 16:9 9:16 4:3 3:4 3:2 2:3 5:4 4:5 21:9（任意 W:H，最多 3:1），auto\n"
            "• 分辨率：1K 2K 4K\n"
            "• 画质：low medium high auto（或 低 中 高）\n"
            "• 尺寸：1536x1024（边长为 16 的倍数，最大 3840）\n"
            "• 数量：x2 或 n=2\n"
            "• 模型：gpt-image-2 gpt-image-1.5 gpt-image-1\n"
            "• 格式：png jpeg webp，transparent 透明背景；file = 发送原图文件\n"
            "• --compression 0-100（jpeg/webp 压缩率），--moderation low|auto（审核强度），--fidelity high|low（编辑时对参考图的忠实度，gpt-image-1.5/1）\n"
            "• 也支持 Midjourney 写法：--ar 16:9 --q high --n 2\n"
            "• -- 表示选项结束（描述以选项词开头时使用）\n"
            "\n"
            "示例：\n"
            "/img 一只白色暹罗猫\n"
            "/img 16:9 2K high 窗台上的白色暹罗猫\n"
            "/img 9:16 低 x2 夜晚的霓虹城市\n"
            "/img 1536x1024 gpt-image-1.5 水彩风格的狐狸\n"
            "附上图片（或回复一张图片）即可改图：/img 改成冬天\n"
            "\n"
            "费用：low 便宜，high 和 4K 贵得多；/balance 查看消费，/sizes 查看尺寸表。"
        ),
    },
    "admin.usage": {
        "en": (
            "Admin commands:\n"
            "limit <user> daily=N monthly=N (N or default; 0 = no limit)\n"
            "chatlimit <chat> daily=N\n"
            "refund <job id> · refund purchase <purchase id>\n"
            "grant <user> <credits> · revoke <user> [credits] · purchases [user]\n"
            "block <user|chat> · unblock <user|chat>\n"
            "top [days] · chats [days] · unsettled\n"
            "A bare id means this platform; platform:id names any."
        ),
        "zh": (
            "管理命令：\n"
            "limit <用户> daily=N monthly=N（N 或 default；0 = 不限）\n"
            "chatlimit <群> daily=N\n"
            "refund <任务号> · refund purchase <购买号>\n"
            "grant <用户> <积分> · revoke <用户> [积分] · purchases [用户]\n"
            "block <用户|群> · unblock <用户|群>\n"
            "top [天数] · chats [天数] · unsettled\n"
            "只写 id 表示当前平台；platform:id 可指定任意平台。"
        ),
    },
    "admin.id_no_platform": {
        "en": "“{word}” names no platform. Write it as telegram:{word} or discord:{word}, as @username, or reply to the person's message.",
        "zh": "“{word}”没有写平台。请写成 telegram:{word} 或 discord:{word}、@用户名，或回复该用户的消息。",
    },
    "admin.id_unknown_platform": {
        "en": "“{word}” names an unknown platform; known: {known}.",
        "zh": "“{word}”的平台未知；可用：{known}。",
    },
    "admin.id_not_number": {
        "en": "“{word}” is not a {platform} id: {platform} ids are numbers (telegram:123456). Name a user by @username or reply to their message.",
        "zh": "“{word}”不是有效的 {platform} ID：{platform} 的 ID 是数字（如 telegram:123456）。也可用 @用户名，或回复其消息。",
    },
    "admin.id_not_name": {
        "en": "“{word}” is not a {platform} user name (letters, digits, _ . -).",
        "zh": "“{word}”不是有效的 {platform} 用户名（字母、数字、_ . -）。",
    },
    "admin.unknown_username": {
        "en": "I have not seen {name} yet, so I cannot tell who that is. Use their id (telegram:123456) or reply to one of their messages.",
        "zh": "还没见过 {name}，无法确定是谁。请使用其 ID（如 telegram:123456），或回复其消息。",
    },
    "admin.bad_amount": {
        "en": "'{value}' is not an amount of credits (a number ≥ 0, or default).",
        "zh": "“{value}” 不是有效的积分数（应为 ≥ 0 的数字或 default）。",
    },
    "admin.limit_set": {
        "en": "Limits of {who}: daily {daily}, monthly {monthly}.",
        "zh": "{who} 的限额：每日 {daily}，每月 {monthly}。",
    },
    "admin.chatlimit_set": {
        "en": "Daily limit of {who}: {daily}.",
        "zh": "{who} 的每日限额：{daily}。",
    },
    "admin.granted": {
        "en": "{credits:,.0f} credits granted to {who}; balance {balance:,.0f}.",
        "zh": "已给 {who} 增加 {credits:,.0f} 积分；余额 {balance:,.0f}。",
    },
    "admin.revoked": {
        "en": "{credits:,.0f} credits taken from {who}; balance {balance:,.0f}.",
        "zh": "已从 {who} 收回 {credits:,.0f} 积分；余额 {balance:,.0f}。",
    },
    "admin.purchases_header": {
        "en": "Purchases (newest first; refund purchase <id> gives one back):",
        "zh": "购买记录（新的在前；refund purchase <编号> 可退款）：",
    },
    "admin.purchase_line": {
        "en": "#{purchase_id} {when} {user} — {stars} stars → {credits:,.0f} credits, {status}",
        "zh": "#{purchase_id} {when} {user} — {stars} 星 → {credits:,.0f} 积分，{status}",
    },
    "admin.blocked": {"en": "{who} is blocked.", "zh": "已禁止 {who}。"},
    "admin.unblocked": {"en": "{who} is unblocked.", "zh": "已解除禁止 {who}。"},
    "admin.nothing": {"en": "Nothing to show.", "zh": "没有记录。"},
    "admin.top_header": {
        "en": "Top spenders, last {days} days:",
        "zh": "最近 {days} 天消费排行：",
    },
    "admin.top_line": {
        "en": "{rank}. {who} ({user}) — {cost}, {jobs:,} jobs",
        "zh": "{rank}. {who}（{user}）— {cost}，{jobs:,} 个任务",
    },
    "admin.chats_line": {
        "en": "{chat} — {cost}, {jobs:,} jobs",
        "zh": "{chat} — {cost}，{jobs:,} 个任务",
    },
    "admin.chats_header": {
        "en": "Spend per chat, last {days} days:",
        "zh": "最近 {days} 天各群消费：",
    },
    "admin.unsettled_header": {
        "en": "Unsettled jobs (counted at their estimate; refund <id> to release):",
        "zh": "未结算任务（按预估计费；refund <任务号> 可退还）：",
    },
}
