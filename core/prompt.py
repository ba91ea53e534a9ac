"""The /img command language → an immutable `ImageRequest` (pure).

CONTRACT (filled in by the prompt/sizes work):
    parse_command(text, defaults, *, reference_size=None, has_references=False,
                  force_tier=None) -> ImageRequest   # or raises PromptError
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from core.messages import text as render_text


@dataclass(frozen=True)
class Notice:
    """Something the user should know about how their request was read (a message key)."""

    key: str
    params: tuple[tuple[str, Any], ...] = ()

    def render(self, lang: str | None) -> str:
        """Render the notice in the user's language."""
        return render_text(lang, self.key, **dict(self.params))


@dataclass(frozen=True)
class ImageRequest:
    """One parsed /img command, ready to price and send."""

    prompt: str
    model: str
    size: str  # "WxH" or "auto"
    quality: str  # low | medium | high | auto
    n: int = 1
    output_format: str | None = None  # png | jpeg | webp; None = the API's default (png)
    background: str | None = None  # transparent | opaque | None
    ratio: str | None = None  # the ratio as asked ("16:9", "auto"), None if not given
    tier: str | None = None  # "1K" | "2K" | "4K" if asked, else None
    as_file: bool = False  # deliver the lossless original as a file
    notices: tuple[Notice, ...] = field(default=())

    @property
    def dimensions(self) -> tuple[int, int] | None:
        """Return (width, height), or None when the size is auto."""
        if self.size == "auto":
            return None
        w, h = self.size.split("x")
        return int(w), int(h)

    def with_changes(self, **changes: Any) -> ImageRequest:
        """Return a copy with some fields changed."""
        return replace(self, **changes)


@dataclass(frozen=True)
class PromptDefaults:
    """What the settings say when a command does not."""

    model: str = "gpt-image-2"
    tier: str = "1K"
    quality: str = "auto"
    n: int = 1
    max_n: int = 4
    aliases: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_settings(cls, settings: Any) -> PromptDefaults:
        """Take the defaults from a `core.config.Settings`."""
        return cls(
            model=settings.resolve_model(settings.default_model) or "gpt-image-2",
            tier=settings.default_tier,
            quality=settings.default_quality,
            n=settings.default_n,
            max_n=settings.max_n,
            aliases=tuple(sorted(settings.model_aliases.items())),
        )
