"""Usage → credits, and estimates before a call (pure).

    PriceTable.from_settings(settings); table.credits(usage, model) -> float
    estimate_output_tokens(model, width, height, quality) -> int
    estimate_credits(request, table, *, reference_sizes=()) -> float
    format_credits(credits, table, lang) -> "773 credits ≈ ¥0.077"

The seed's formula: credits = (text_in × p_text + image_in × p_image_in + image_out ×
p_image_out) × cny_per_usd × credits_per_cny / 1,000,000, prices in USD per million tokens
(5 / 10 / 40 by default; per model in settings). Text output tokens (a model that writes a
revised prompt may report some) have no price of their own in the seed or the settings:
they are charged at the image output price, the dearest rate, so a bill is never low.

Estimates (used to reserve credits before a call; the bill is settled from `usage`):
- output tokens per image: OpenAI's published table for gpt-image-1/1.5; for gpt-image-2 the
  community formula that reproduces OpenAI's calculator (1024² high = 7024). `auto` quality
  counts as high. `auto` size counts as the dearest size auto could pick: for gpt-image-1/1.5
  the dearest of their three sizes; for gpt-image-2 the dearest of 1024x1024, 1536x1024,
  1024x1536 and, with references, the first reference's aspect at 1K.
- prompt text: ⌈UTF-8 bytes / 3⌉ tokens — about one token per CJK character and a third
  more than the usual four characters per token of English, so it errs high.
- each reference image: gpt-image-1/1.5 bill 65 + 129 tokens per 512-px tile after fitting
  the image in 2048² and its short side to 512 (what their `usage` shows: 194 for a
  1024x1024 input), plus 32 text tokens per image that the edits endpoint adds. gpt-image-2
  has no published rule; we count the GPT-4o high-detail rule (short side 768, 85 + 170 per
  tile), which is larger than the gpt-image-1 count for every size, plus the same 32.
  A reference of unknown or broken size counts as the largest case.
- previews (`request.partial_images`): each costs about 100 image output tokens (OpenAI's
  figure); PARTIAL_IMAGE_TOKENS counts them a little higher, so a preview never makes the
  bill pass the reservation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.messages import text
from core.sizes import FIXED_SIZE_MODELS, FIXED_SIZES, ratio_size
from core.types import ImageRequest
from core.types import Usage as Usage  # the store reads it from here

# OpenAI's published output tokens per image for gpt-image-1 and gpt-image-1.5.
FIXED_OUTPUT_TOKENS: dict[tuple[int, int], dict[str, int]] = {
    (1024, 1024): {"low": 272, "medium": 1056, "high": 4160},
    (1024, 1536): {"low": 408, "medium": 1584, "high": 6240},
    (1536, 1024): {"low": 400, "medium": 1568, "high": 6208},
}
_GPT2_QUALITY_FACTOR = {"low": 16, "medium": 48, "high": 96}
_EDIT_TEXT_TOKENS_PER_IMAGE = 32
# "Each partial image costs about 100 extra image output tokens" (OpenAI), rounded up.
PARTIAL_IMAGE_TOKENS = 128


@dataclass(frozen=True)
class PriceTable:
    """Prices (USD per million tokens), the exchange rate and credits per yuan."""

    text_input: float = 5.0
    image_input: float = 10.0
    image_output: float = 40.0
    cny_per_usd: float = 7.1
    credits_per_cny: float = 10_000.0
    model_prices: tuple[tuple[str, tuple[float, float, float]], ...] = ()

    @classmethod
    def from_settings(cls, settings: Any) -> PriceTable:
        """Take the prices from a `core.config.Settings`."""
        per_model = getattr(settings, "model_prices", None) or {}
        return cls(
            text_input=float(settings.price_text_input),
            image_input=float(settings.price_image_input),
            image_output=float(settings.price_image_output),
            cny_per_usd=float(settings.cny_per_usd),
            credits_per_cny=float(settings.credits_per_cny),
            model_prices=tuple(
                sorted((m, (float(p[0]), float(p[1]), float(p[2]))) for m, p in per_model.items())
            ),
        )

    def prices(self, model: str) -> tuple[float, float, float]:
        """Return (text in, image in, image out) USD per million tokens for a model."""
        for name, prices in self.model_prices:
            if name == model:
                return prices
        return self.text_input, self.image_input, self.image_output

    def credits_for_tokens(
        self, model: str, *, text_in: float = 0, image_in: float = 0, image_out: float = 0
    ) -> float:
        """Return the credits that these token counts cost on a model."""
        p_text, p_image_in, p_image_out = self.prices(model)
        usd_millionths = text_in * p_text + image_in * p_image_in + image_out * p_image_out
        return usd_millionths * self.cny_per_usd * self.credits_per_cny / 1_000_000

    def credits(self, usage: Usage, model: str) -> float:
        """Return the exact credits of one answer from its `usage`."""
        return self.credits_for_tokens(
            model,
            text_in=usage.text_input_tokens,
            image_in=usage.image_input_tokens,
            # No text output price exists in the seed or settings: charge the dearest rate.
            image_out=usage.image_output_tokens + usage.text_output_tokens,
        )

    def yuan(self, credits: float) -> float:
        """Return what credits are worth in yuan."""
        return credits / self.credits_per_cny


def estimate_output_tokens(model: str, width: int, height: int, quality: str) -> int:
    """Return the output tokens one image of this size and quality is expected to cost."""
    quality = quality if quality in _GPT2_QUALITY_FACTOR else "high"  # auto → the dearest
    if model in FIXED_SIZE_MODELS:
        known = FIXED_OUTPUT_TOKENS.get((width, height))
        if known is not None:
            return known[quality]
        # Not a size these models draw; scale the square's count by area, rounding up.
        square = FIXED_OUTPUT_TOKENS[(1024, 1024)][quality]
        return math.ceil(square * max(width, 1) * max(height, 1) / (1024 * 1024))
    factor = _GPT2_QUALITY_FACTOR[quality]
    long_edge, short_edge = max(width, height, 1), max(min(width, height), 1)
    short_factor = (2 * factor * short_edge + long_edge) // (2 * long_edge)
    return (factor * short_factor * (2_000_000 + width * height) + 3_999_999) // 4_000_000


def estimate_text_tokens(prompt: str) -> int:
    """Return a deliberately high estimate of a prompt's text tokens."""
    return math.ceil(len(prompt.encode("utf-8", "replace")) / 3)


def estimate_input_image_tokens(model: str, width: int, height: int) -> int:
    """Return a conservative estimate of the input tokens of one reference image."""
    if model in FIXED_SIZE_MODELS:
        base, per_tile, short_side = 65, 129, 512
    else:
        base, per_tile, short_side = 85, 170, 768
    if width <= 0 or height <= 0:
        width, height = 2048, 2048 // 3  # unknown: the shape with the most tiles
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    scale = min(1.0, short_side / min(w, h))
    w, h = w * scale, h * scale
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    return base + per_tile * tiles


def _auto_sizes(model: str, reference_sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    sizes = list(FIXED_SIZES)
    if model not in FIXED_SIZE_MODELS and reference_sizes:
        w, h = reference_sizes[0]
        if w > 0 and h > 0:
            sizes.append(ratio_size(w, h, "1K"))
    return sizes


def estimate_credits(
    request: ImageRequest,
    table: PriceTable,
    *,
    reference_sizes: Sequence[tuple[int, int]] = (),
) -> float:
    """Return the credits a request is expected to cost at most (all images, all inputs)."""
    dims = request.dimensions
    sizes = [dims] if dims is not None else _auto_sizes(request.model, reference_sizes)
    per_image = max(estimate_output_tokens(request.model, w, h, request.quality) for w, h in sizes)
    text_in = estimate_text_tokens(request.prompt) + _EDIT_TEXT_TOKENS_PER_IMAGE * len(
        reference_sizes
    )
    image_in = sum(estimate_input_image_tokens(request.model, w, h) for w, h in reference_sizes)
    previews = PARTIAL_IMAGE_TOKENS * max(request.partial_images, 0) * request.n
    return table.credits_for_tokens(
        request.model,
        text_in=text_in,
        image_in=image_in,
        image_out=per_image * request.n + previews,
    )


def whole_credits(credits: float) -> int:
    """Round credits to a whole number, halves up."""
    return math.floor(credits + 0.5)


def format_credits(credits: float, table: PriceTable, lang: str | None) -> str:
    """Render credits with their worth in yuan, e.g. "25,440 credits ≈ ¥2.544"."""
    return text(
        lang,
        "price.credits",
        # One style for every amount shown (spend lines and limits use separators too).
        credits=f"{whole_credits(credits):,}",
        yuan=f"{table.yuan(credits):.3f}",
    )


# What no answer can plausibly hold: the dearest image a model draws (gpt-image-2's largest
# square, 8,294,400 pixels, at high), times the images asked for, times SLACK for what an
# estimator may miss. Usage beyond it (10^12 tokens, say) is not a bill but a broken relay.
_USAGE_SLACK = 4
_MAX_INPUT_TOKENS = 1_000_000


def max_output_tokens(model: str, n: int) -> int:
    """Return the most output tokens an answer of `n` images could plausibly report."""
    if model in FIXED_SIZE_MODELS:
        dearest = max(tokens["high"] for tokens in FIXED_OUTPUT_TOKENS.values())
    else:
        dearest = estimate_output_tokens(model, 2880, 2880, "high")
    return _USAGE_SLACK * dearest * max(n, 1)


def usage_problem(usage: Usage, model: str, n: int) -> str | None:
    """Say what makes reported usage unusable for billing, or None when it is plausible."""
    if not usage.is_valid():
        return "a token count is not a whole number >= 0"
    if usage.image_output_tokens + usage.text_output_tokens > max_output_tokens(model, n):
        return "more output tokens than the model can produce"
    if usage.text_input_tokens + usage.image_input_tokens > _MAX_INPUT_TOKENS:
        return "more input tokens than any request can hold"
    return None
