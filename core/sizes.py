"""Sizes: the ratio × tier table, model-aware size resolution and the size rules (pure).

gpt-image-2 takes any `WxH` that obeys every rule: both edges multiples of 16, the longest
edge ≤ 3840, long:short ≤ 3:1, and 655,360 ≤ pixels ≤ 8,294,400. gpt-image-1 and
gpt-image-1.5 take only 1024x1024, 1536x1024, 1024x1536 (or `auto`).

How a ratio p:q becomes a gpt-image-2 size at a tier
----------------------------------------------------
The ten named ratios come straight from the seed's table (`SEED_TABLE`). Every other
ratio (and a reference image's aspect) follows one rule, which reproduces all 30 table
entries by itself (a test checks that):

1. The tier sets a target long edge T for the aspect R = long/short:
   - 1K: T = max(1024, √(655,360·R)) — a long edge of 1024, raised only when that would
     fall below the pixel minimum (why 16:9 1K is 1280x720, not 1024x576);
   - 2K: T = 2048;
   - 4K: T = min(3840, √(8,294,400·R)) — the largest size the rules allow at that aspect.
   The table is long-edge based, not area based: 5:4 1K is 1040x832 (0.87 MP), which an
   "area ≈ 1024²" rule would have made 1120x896.
2. If a size with exactly the aspect p:q obeys every rule with a long edge within
   T/1.25 … T·1.25 (the tier's band), the one whose long edge is nearest T wins (ties: the
   larger). Exactness is worth a wider band: the table itself takes 1280x720 for 16:9 1K.
3. Otherwise (e.g. 100:37 at 2K, or a reference of 1170x2532), the winner is the size with
   the aspect nearest p:q among those that obey every rule with a long edge within 48 px
   (three steps of 16) of T; ties go to the long edge nearest T, then the larger. The narrow
   window keeps the size at the tier instead of wandering to whatever edge happens to round
   best.

gpt-image-1/1.5 map a ratio to the nearest of their three sizes (nearest aspect), with a
notice when that differs from what was asked.

Without a ratio: with reference images the size is `auto` (the API follows the reference),
or the first reference's aspect at the tier when a tier was asked; without references, the
default tier at 1:1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from core.errors import PromptError

TIERS = ("1K", "2K", "4K")
EDGE_STEP = 16
MAX_EDGE = 3840
MAX_ASPECT = 3
MIN_PIXELS = 655_360
MAX_PIXELS = 8_294_400

FIXED_SIZE_MODELS = frozenset({"gpt-image-1", "gpt-image-1.5"})
FIXED_SIZES: tuple[tuple[int, int], ...] = ((1024, 1024), (1536, 1024), (1024, 1536))

# The seed's table, exactly (ratio → tier → (width, height)).
SEED_TABLE: dict[str, dict[str, tuple[int, int]]] = {
    "1:1": {"1K": (1024, 1024), "2K": (2048, 2048), "4K": (2880, 2880)},
    "16:9": {"1K": (1280, 720), "2K": (2048, 1152), "4K": (3840, 2160)},
    "9:16": {"1K": (720, 1280), "2K": (1152, 2048), "4K": (2160, 3840)},
    "5:4": {"1K": (1040, 832), "2K": (2080, 1664), "4K": (3200, 2560)},
    "4:5": {"1K": (832, 1040), "2K": (1664, 2080), "4K": (2560, 3200)},
    "4:3": {"1K": (1024, 768), "2K": (2048, 1536), "4K": (3264, 2448)},
    "3:4": {"1K": (768, 1024), "2K": (1536, 2048), "4K": (2448, 3264)},
    "3:2": {"1K": (1008, 672), "2K": (2064, 1376), "4K": (3504, 2336)},
    "2:3": {"1K": (672, 1008), "2K": (1376, 2064), "4K": (2336, 3504)},
    "21:9": {"1K": (1344, 576), "2K": (2016, 864), "4K": (3808, 1632)},
}
NAMED_RATIOS = tuple(SEED_TABLE)
# Named ratios by their reduced form, so 32:18 finds 16:9 and 7:3 finds 21:9.
_NAMED_BY_REDUCED: dict[tuple[int, int], str] = {}
for _name in NAMED_RATIOS:
    _p, _q = (int(part) for part in _name.split(":"))
    _g = math.gcd(_p, _q)
    _NAMED_BY_REDUCED[(_p // _g, _q // _g)] = _name

_BAND = 1.25  # how far an exact size's long edge may stray from the tier's target
_NEAR = 48  # how far an approximate size's long edge may stray from it


@dataclass(frozen=True)
class SizeChoice:
    """A resolved size (`WxH` or `auto`) and what the user should be told about it."""

    size: str
    notes: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = field(default=())


def format_size(width: int, height: int) -> str:
    """Return `WxH`."""
    return f"{width}x{height}"


def reduce_ratio(width: int, height: int) -> tuple[int, int]:
    """Return the ratio width:height in lowest terms."""
    g = math.gcd(width, height) or 1
    return width // g, height // g


def _broken_rule(width: int, height: int) -> str | None:
    """Name the first gpt-image-2 rule the size breaks, most fundamental first."""
    if width <= 0 or height <= 0:
        return "small"
    if max(width, height) > MAX_EDGE:
        return "edge"
    if max(width, height) > MAX_ASPECT * min(width, height):
        return "aspect"
    if width * height < MIN_PIXELS:
        return "small"
    if width * height > MAX_PIXELS:
        return "large"
    if width % EDGE_STEP or height % EDGE_STEP:
        return "step"
    return None


def size_rules_ok(width: int, height: int) -> bool:
    """Say whether gpt-image-2 accepts width x height."""
    return _broken_rule(width, height) is None


def _aspect_error(width: int, height: int, p: int, q: int) -> Fraction:
    # max/min of w·q and h·p: 1 when exact, and symmetric for wide and tall misses.
    a, b = width * q, height * p
    return Fraction(max(a, b), min(a, b))


def _tier_target(p: int, q: int, tier: str) -> float:
    aspect = max(p, q) / min(p, q)
    if tier == "1K":
        return max(1024.0, math.sqrt(MIN_PIXELS * aspect))
    if tier == "2K":
        return 2048.0
    if tier == "4K":
        return min(float(MAX_EDGE), math.sqrt(MAX_PIXELS * aspect))
    raise ValueError(f"unknown tier {tier!r}; expected one of {', '.join(TIERS)}")


def _candidates(p: int, q: int, low: float, high: float) -> Iterable[tuple[int, int]]:
    landscape = p >= q
    long_part, short_part = (p, q) if landscape else (q, p)
    first = max(EDGE_STEP, math.ceil(low / EDGE_STEP) * EDGE_STEP)
    last = min(MAX_EDGE, math.floor(high / EDGE_STEP) * EDGE_STEP)
    for long_edge in range(first, last + 1, EDGE_STEP):
        floor16 = (long_edge * short_part // long_part) // EDGE_STEP * EDGE_STEP
        for short_edge in (floor16, floor16 + EDGE_STEP):
            if short_edge > 0:
                yield (long_edge, short_edge) if landscape else (short_edge, long_edge)


def _best_in_band(
    p: int, q: int, target: float, low: float, high: float, *, exact_only: bool = False
) -> tuple[int, int] | None:
    best: tuple[int, int] | None = None
    best_key: tuple[Fraction, float, int] | None = None
    for w, h in _candidates(p, q, low, high):
        if not size_rules_ok(w, h):
            continue
        error = _aspect_error(w, h, p, q)
        if exact_only and error != 1:
            continue
        key = (error, abs(max(w, h) - target), -(w * h))
        if best_key is None or key < best_key:
            best, best_key = (w, h), key
    return best


def clamp_ratio(p: int, q: int) -> tuple[int, int]:
    """Return p:q reduced, clamped to 3:1 … 1:3."""
    if p <= 0 or q <= 0:
        return 1, 1
    if p > MAX_ASPECT * q:
        return MAX_ASPECT, 1
    if q > MAX_ASPECT * p:
        return 1, MAX_ASPECT
    return reduce_ratio(p, q)


def check_ratio(p: int, q: int, text: str | None = None) -> None:
    """Refuse, with a PromptError, a ratio with a zero side or beyond 3:1."""
    shown = text or _ratio_text(p, q)
    if p <= 0 or q <= 0:
        raise PromptError("prompt.ratio_invalid", ratio=shown)
    if max(p, q) > MAX_ASPECT * min(p, q):
        raise PromptError("prompt.ratio_too_wide", ratio=shown)


def ratio_size(p: int, q: int, tier: str) -> tuple[int, int]:
    """Return the gpt-image-2 size for ratio p:q (clamped to 1:3 … 3:1) at a tier."""
    p, q = clamp_ratio(p, q)
    target = _tier_target(p, q, tier)
    exact = _best_in_band(p, q, target, target / _BAND, target * _BAND, exact_only=True)
    if exact is not None:
        return exact
    for low, high in ((target - _NEAR, target + _NEAR), (target / _BAND, target * _BAND)):
        near = _best_in_band(p, q, target, low, high)
        if near is not None:
            return near
    # Unreachable for ratios within 3:1 (a test sweeps them), but never return a bad size.
    fallback = _best_in_band(p, q, target, EDGE_STEP, MAX_EDGE)
    return fallback if fallback is not None else (1024, 1024)


def table_size(p: int, q: int, tier: str) -> tuple[int, int]:
    """Return the seed table's size for a named ratio, else the rule's size (gpt-image-2)."""
    named = _NAMED_BY_REDUCED.get(reduce_ratio(p, q)) if p > 0 and q > 0 else None
    if named is not None:
        return SEED_TABLE[named][tier]
    return ratio_size(p, q, tier)


def nearest_fixed_size(p: int, q: int) -> tuple[int, int]:
    """Return the gpt-image-1/1.5 size whose aspect is nearest p:q."""
    if p <= 0 or q <= 0:
        return FIXED_SIZES[0]
    return min(FIXED_SIZES, key=lambda wh: _aspect_error(wh[0], wh[1], p, q))


def suggest_size(width: int, height: int) -> tuple[int, int]:
    """Return a gpt-image-2 size near width x height that obeys every rule."""
    if width <= 0 or height <= 0:
        return 1024, 1024
    p, q = clamp_ratio(width, height)
    aspect = p / q
    area = min(max(width * height, MIN_PIXELS), MAX_PIXELS)
    ideal_w, ideal_h = math.sqrt(area * aspect), math.sqrt(area / aspect)
    shrink = min(1.0, MAX_EDGE / max(ideal_w, ideal_h))
    ideal_w, ideal_h = ideal_w * shrink, ideal_h * shrink
    options = []
    for w in _around16(ideal_w):
        for h in _around16(ideal_h):
            if size_rules_ok(w, h):
                options.append(((_aspect_error(w, h, p, q), abs(w * h - area)), (w, h)))
    if options:
        return min(options)[1]
    return ratio_size(p, q, "1K")


def _around16(value: float) -> tuple[int, ...]:
    base = int(value) // EDGE_STEP * EDGE_STEP
    return tuple(
        v for v in (base - EDGE_STEP, base, base + EDGE_STEP, base + 2 * EDGE_STEP) if v > 0
    )


def check_size(model: str, width: int, height: int) -> None:
    """Refuse, with a PromptError naming the rule, a size the model would refuse."""
    size = format_size(width, height)
    if model in FIXED_SIZE_MODELS:
        if (width, height) not in FIXED_SIZES:
            raise PromptError("prompt.size_fixed", model=model, size=size)
        return
    rule = _broken_rule(width, height)
    if rule is None:
        return
    good = format_size(*suggest_size(width, height))
    raise PromptError(
        f"prompt.size_{rule}",
        size=size,
        good=good,
        pixels=f"{max(width, 0) * max(height, 0):,}",
        min_pixels=f"{MIN_PIXELS:,}",
        max_pixels=f"{MAX_PIXELS:,}",
        max_edge=MAX_EDGE,
    )


def _note(key: str, **params: Any) -> tuple[str, tuple[tuple[str, Any], ...]]:
    return key, tuple(params.items())


def _ratio_text(p: int, q: int) -> str:
    return f"{p}:{q}"


def resolve_size(
    model: str,
    *,
    ratio: tuple[int, int] | str | None = None,
    tier: str | None = None,
    default_tier: str = "1K",
    size: tuple[int, int] | None = None,
    reference_size: tuple[int, int] | None = None,
    has_references: bool = False,
) -> SizeChoice:
    """Turn what was asked (ratio, tier, explicit size, references) into a size the model takes.

    `ratio` is (p, q), "auto" or None; `tier` is the tier asked (None = not asked, so
    `default_tier` applies); `size` is an explicit (w, h). An explicit size together with
    a tier means "this aspect at that tier" (the 4K button on an explicit-size request).
    Raises PromptError for an explicit size the model refuses.
    """
    if tier is not None and tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}")
    notes: list[tuple[str, tuple[tuple[str, Any], ...]]] = []
    asked_ratio: tuple[int, int] | None = None  # what the user typed, for notices
    if size is not None:
        if tier is None:
            check_size(model, *size)
            return SizeChoice(format_size(*size))
        aspect = size
    elif ratio == "auto" or (ratio is None and has_references):
        if tier is None:
            return SizeChoice("auto")
        if reference_size is None:
            return SizeChoice("auto", (_note("size.tier_ignored", tier=tier),))
        aspect = reference_size
    elif isinstance(ratio, tuple):
        check_ratio(*ratio)
        aspect = ratio
        asked_ratio = reduce_ratio(*ratio)
    else:
        aspect = (1, 1)
    w0, h0 = aspect
    if w0 <= 0 or h0 <= 0:
        w0, h0 = 1, 1
    p, q = clamp_ratio(w0, h0)
    if asked_ratio is None and (p, q) != reduce_ratio(w0, h0):
        notes.append(
            _note("size.aspect_clamped", given=format_size(w0, h0), ratio=_ratio_text(p, q))
        )
    use_tier = tier or default_tier
    if model in FIXED_SIZE_MODELS:
        w, h = nearest_fixed_size(p, q)
        chosen = format_size(w, h)
        if tier is not None and tier != "1K":
            notes.append(_note("size.model_max", model=model, tier=tier, size=chosen))
        if asked_ratio is not None and reduce_ratio(w, h) != (p, q):
            notes.append(
                _note("size.model_aspect", model=model, ratio=_ratio_text(p, q), size=chosen)
            )
        return SizeChoice(chosen, tuple(notes))
    w, h = table_size(p, q, use_tier)
    if asked_ratio is not None and reduce_ratio(w, h) != (p, q):
        notes.append(_note("size.approximate", ratio=_ratio_text(p, q), size=format_size(w, h)))
    return SizeChoice(format_size(w, h), tuple(notes))


def size_table_rows(model: str = "gpt-image-2") -> list[tuple[str, tuple[str, str, str]]]:
    """Return (ratio, (1K, 2K, 4K)) rows of what each named ratio draws, for /sizes."""
    rows: list[tuple[str, tuple[str, str, str]]] = []
    for name in NAMED_RATIOS:
        p, q = (int(part) for part in name.split(":"))
        if model in FIXED_SIZE_MODELS:
            fixed = format_size(*nearest_fixed_size(p, q))
            rows.append((name, (fixed, fixed, fixed)))
        else:
            one, two, four = (format_size(*SEED_TABLE[name][t]) for t in TIERS)
            rows.append((name, (one, two, four)))
    return rows
