"""gpt-image-2's size rules, written out independently of core.sizes, for the tests."""

from __future__ import annotations


def obeys_every_rule(w: int, h: int) -> bool:
    """Say whether WxH obeys every gpt-image-2 size rule from the facts file."""
    return (
        w % 16 == 0
        and h % 16 == 0
        and max(w, h) <= 3840
        and max(w, h) <= 3 * min(w, h)
        and 655_360 <= w * h <= 8_294_400
    )
