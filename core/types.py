"""The frozen value types every layer shares, in one place.

    ImageRequest (+ Notice)    one parsed /img command
    Usage                      token counts of one API answer
    ReferenceImage             a checked reference, ready to upload
    GeneratedImage, ImageResult  what the image API drew
    IncomingImage              a reference as a front end received it
    Progress                   one progress event of a job
    Requester                  who asks, from which chat, on which platform

They import nothing of ours but `core.messages` (a notice renders itself), so `errors`,
`pricing`, `prompt`, `sizes`, `images`, the store and the runner can all use them without
importing each other.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from core.messages import text as render_text

KNOWN_MODELS = ("gpt-image-2", "gpt-image-1.5", "gpt-image-1")
ProgressKind = Literal["queued", "started", "working", "partial", "done"]


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
    output_compression: int | None = None  # 0..100, jpeg/webp only; None = the API's (100)
    input_fidelity: str | None = None  # high | low (edits, models that take it); None = low
    moderation: str | None = None  # low | auto; None = the API's (auto)
    # Previews asked of the API while it draws (0: none). Set by the service, not parsed:
    # it depends on the front end, the PREVIEWS setting and what the endpoint supports.
    partial_images: int = 0

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
class Usage:
    """Token counts of one API answer."""

    text_input_tokens: int = 0
    image_input_tokens: int = 0
    image_output_tokens: int = 0
    text_output_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_api(cls, usage: dict[str, Any] | None) -> Usage | None:
        """Read the API's `usage` object; None when absent or not an object.

        A count that is there but is no whole number (1.5, 1e999, "many", a list) reads as
        -1, so the answer is known to carry unusable usage (`usage_problem` flags it) rather
        than none at all.
        """
        if not isinstance(usage, dict):
            return None
        if "input_tokens" not in usage and "output_tokens" not in usage and (
            "prompt_tokens" in usage or "completion_tokens" in usage
        ):
            usage = _from_chat_style(usage)
        inp = usage.get("input_tokens_details")
        out = usage.get("output_tokens_details")
        inp = inp if isinstance(inp, dict) else {}
        out = out if isinstance(out, dict) else {}
        input_tokens = _count(usage.get("input_tokens"))
        output_tokens = _count(usage.get("output_tokens"))
        image_in = _count(inp.get("image_tokens"))
        if "text_tokens" in inp:
            text_in = _count(inp.get("text_tokens"))
        else:
            text_in = input_tokens - image_in if min(input_tokens, image_in) >= 0 else -1
        if "image_tokens" in out:
            image_out = _count(out.get("image_tokens"))
            if "text_tokens" in out:
                text_out = _count(out.get("text_tokens"))
            elif min(output_tokens, image_out) >= 0:
                # Output the details do not name (reasoning, say) is still output: billed.
                text_out = max(output_tokens - image_out, 0)
            else:
                text_out = -1
        else:
            image_out, text_out = output_tokens, 0
        if usage.get("total_tokens") is not None:
            total = _count(usage.get("total_tokens"))
        else:
            total = input_tokens + output_tokens if min(input_tokens, output_tokens) >= 0 else -1
        return cls(text_in, image_in, image_out, text_out, total)

    def is_valid(self) -> bool:
        """Say whether every count is a whole number >= 0."""
        return all(
            isinstance(value, int) and value >= 0 for value in self.to_dict().values()
        )

    def to_dict(self) -> dict[str, int]:
        """Return the counts as a plain dict (for the ledger)."""
        return {
            "text_input_tokens": self.text_input_tokens,
            "image_input_tokens": self.image_input_tokens,
            "image_output_tokens": self.image_output_tokens,
            "text_output_tokens": self.text_output_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True)
class ReferenceImage:
    """One checked reference image, ready to upload as an `image[]` part."""

    data: bytes
    filename: str
    mime: str  # image/png | image/jpeg | image/webp
    width: int
    height: int


@dataclass(frozen=True)
class GeneratedImage:
    """One image the API drew."""

    data: bytes
    mime: str
    width: int
    height: int


@dataclass(frozen=True)
class ImageResult:
    """What one call returned."""

    images: tuple[GeneratedImage, ...]
    usage: Usage | None
    elapsed: float
    revised_prompt: str | None = None


@dataclass(frozen=True)
class Progress:
    """One progress event of a job.

    A `partial` event carries a preview of the image being drawn (`image`, decoded and
    checked), its 0-based `index` among the previews, and the job it belongs to.
    """

    kind: ProgressKind
    position: int = 0
    elapsed: float = 0.0
    image: GeneratedImage | None = None
    index: int = 0
    job_id: int = 0


ProgressCallback = Callable[[Progress], Awaitable[None]]


@dataclass(frozen=True)
class IncomingImage:
    """A reference image as an adapter received it; `ref` is an opaque platform handle."""

    data: bytes
    filename: str | None = None
    ref: str | None = None


@dataclass(frozen=True)
class Requester:
    """A person asking from one chat on one platform."""

    platform: str  # "telegram", "discord", "cli"
    user_id: str
    chat_id: str | None = None  # None for a private chat / DM / terminal
    display_name: str = ""
    language: str | None = None  # raw platform language code ("zh-hans", "en-US", …)
    is_admin: bool = False  # a configured bot admin: every admin action, everywhere
    is_group: bool = False
    # Administers this chat on its platform (Discord: Manage Server). May set this chat's
    # limit and see its spend, nothing that reaches beyond it.
    is_chat_admin: bool = False
    # The front end shows previews while the image is drawn (partial `Progress` events);
    # only then are they asked of the API, since each one costs output tokens.
    previews: bool = False

    @property
    def user_key(self) -> str:
        """Return the ledger key of the user, `platform:user_id`."""
        return f"{self.platform}:{self.user_id}"

    @property
    def chat_key(self) -> str | None:
        """Return the ledger key of the chat, `platform:chat_id`, or None."""
        return f"{self.platform}:{self.chat_id}" if self.chat_id is not None else None


def _from_chat_style(usage: dict[str, Any]) -> dict[str, Any]:
    """Rename a chat-style usage (`prompt_tokens`, `completion_tokens`, their `_details`)
    into the images API's names; detail counts keep their meaning."""
    renamed: dict[str, Any] = {
        "input_tokens": usage.get("prompt_tokens"),
        "output_tokens": usage.get("completion_tokens"),
        "total_tokens": usage.get("total_tokens"),
    }
    prompt = usage.get("prompt_tokens_details")
    completion = usage.get("completion_tokens_details")
    if isinstance(prompt, dict) and ("image_tokens" in prompt or "text_tokens" in prompt):
        renamed["input_tokens_details"] = prompt
    if isinstance(completion, dict) and "image_tokens" in completion:
        # Without image_tokens (only reasoning or audio counts) every completion token is
        # taken as image output: the dearest reading, never a low bill.
        renamed["output_tokens_details"] = completion
    return renamed


def _count(value: Any) -> int:
    """Read one token count: None/absent is 0; anything but a whole number >= 0 is -1."""
    if value is None:
        return 0
    if isinstance(value, bool):
        return -1
    if isinstance(value, int):
        return value if value >= 0 else -1
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and value >= 0:
            return int(value)
        return -1
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return -1
