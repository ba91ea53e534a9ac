"""Every user-facing text, in English and Chinese.

`text(lang, key, **params)` renders one. `lang` may be a raw platform code (Telegram's
`language_code`, Discord's `locale`); `language_of` folds it to "en" or "zh".
"""

from __future__ import annotations

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
    entry = MESSAGES.get(key)
    if entry is None:
        entry = MESSAGES["error.internal"]
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
    "prompt.invalid": {
        "en": "I could not read that command.\nExample: /img 16:9 2K high a white siamese cat",
        "zh": "无法识别这条命令。\n示例：/img 16:9 2K high 一只白色暹罗猫",
    },
    # --- references & image client ---------------------------------------------------
    "ref.invalid": {
        "en": "That reference image cannot be used.",
        "zh": "这张参考图无法使用。",
    },
    # --- upstream ----------------------------------------------------------------------
    "upstream.error": {
        "en": "The image service failed. Nothing was charged. Please try again.",
        "zh": "绘图服务出错，未扣费，请重试。",
    },
    # --- ledger & service ------------------------------------------------------------
}
