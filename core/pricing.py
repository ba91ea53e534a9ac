"""Usage → credits, and estimates before a call (pure).

CONTRACT (filled in by the pricing work):
    PriceTable.from_settings(settings); table.credits(usage, model) -> float
    estimate_credits(request, table, *, reference_sizes=()) -> float
    format_credits(credits, table, lang) -> "773 credits ≈ ¥0.077"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
        """Read the API's `usage` object; None when absent or unreadable."""
        if not isinstance(usage, dict):
            return None
        try:
            inp = usage.get("input_tokens_details") or {}
            out = usage.get("output_tokens_details") or {}
            input_tokens = int(usage.get("input_tokens") or 0)
            output_tokens = int(usage.get("output_tokens") or 0)
            text_in = int(inp.get("text_tokens", input_tokens - int(inp.get("image_tokens") or 0)))
            image_in = int(inp.get("image_tokens") or 0)
            if "image_tokens" in out:
                image_out = int(out.get("image_tokens") or 0)
                text_out = int(out.get("text_tokens") or 0)
            else:
                image_out, text_out = output_tokens, 0
            total = int(usage.get("total_tokens") or input_tokens + output_tokens)
        except (TypeError, ValueError):
            return None
        return cls(text_in, image_in, image_out, text_out, total)

    def to_dict(self) -> dict[str, int]:
        """Return the counts as a plain dict (for the ledger)."""
        return {
            "text_input_tokens": self.text_input_tokens,
            "image_input_tokens": self.image_input_tokens,
            "image_output_tokens": self.image_output_tokens,
            "text_output_tokens": self.text_output_tokens,
            "total_tokens": self.total_tokens,
        }
