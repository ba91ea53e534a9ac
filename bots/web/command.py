"""The page's prompt box and its pickers, kept in step through the core's own parser.

The text is the truth: the pickers (ratio, tier, quality, count, model) show what
`ImageService.parse` reads from it, and a picker that changes rewrites the text's options
(`rewrite`). Nothing here knows the command language's words or any price: which options a
text asked for is found by comparing its parse with the parse of its bare prompt, and every
text this module writes is parsed again before it is handed back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import PromptError
from core.prompt import clean_text
from core.service import ImageService
from core.types import ImageRequest

# What the page's pickers set.
PICKED = ("ratio", "tier", "quality", "n", "model")
# Stands in for a prompt not typed yet, so the options and the estimate still show.
_FILLER = "x"

Sizes = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class Reading:
    """What a text asks for: the request (its prompt "" if none yet) and its estimate."""

    request: ImageRequest
    estimate: float
    prompt_missing: bool

    def fields(self) -> dict[str, Any]:
        """Return what the page shows: the pickers' values and the size it comes to."""
        r = self.request
        return {
            "prompt": r.prompt,
            "ratio": r.ratio or "",
            "tier": r.tier or "",
            "quality": r.quality,
            "n": r.n,
            "model": r.model,
            "size": r.size,
            "output_format": r.output_format or "",
            "background": r.background or "",
        }


def read(service: ImageService, text: str, sizes: Sizes = (), *, previews: bool = False) -> Reading:
    """Parse a text for the page; an empty prompt is not an error here (PromptError else).

    `previews`: the job will ask for them, so the estimate counts their tokens.
    """
    text = clean_text(text)
    try:
        request, estimate = service.parse(text, reference_sizes=sizes, previews=previews)
        return Reading(request, estimate, False)
    except PromptError as err:
        if err.key != "prompt.empty":
            raise
    # Only options so far: read them with a stand-in prompt after an explicit end.
    ended = "--" in text.split()
    request, estimate = service.parse(
        f"{text} {_FILLER}" if ended else f"{text} -- {_FILLER}", reference_sizes=sizes,
        previews=previews,
    )
    return Reading(request.with_changes(prompt=""), estimate, True)


def rewrite(
    service: ImageService, text: str, changes: Mapping[str, Any], sizes: Sizes = ()
) -> str:
    """Return the text with the pickers' `changes` applied ("" removes an option).

    The options come out in one plain form (`16:9 2K high x2 gpt-image-1.5 a cat`); the
    prompt is kept as it was read. Raises PromptError when the result would not parse.
    """
    reading = read(service, text, sizes)
    asked = _asked(service, reading.request, sizes)
    defaults = service.defaults
    for name, raw in changes.items():
        if name not in PICKED:
            raise ValueError(f"not a picker: {name}")
        value = str(raw).strip()
        if name in ("ratio", "tier"):
            asked.pop("size", None)  # an exact size excludes both
        default = {"quality": defaults.quality, "n": str(defaults.n),
                   "model": defaults.model}.get(name)
        if not value or value == default:
            asked.pop(name, None)
        else:
            asked[name] = value
    words = _words(asked)
    prompt = reading.request.prompt
    if reading.prompt_missing:
        candidate = " ".join(words) + " " if words else ""
        read(service, candidate, sizes)  # refuses an impossible choice (a 5:1 ratio)
        return candidate
    candidate = " ".join([*words, prompt])
    try:
        same = service.parse(candidate, reference_sizes=sizes)[0].prompt == prompt
    except PromptError:
        same = False
    if not same:  # the prompt starts with an option word ("high noon"): end the options
        candidate = " ".join([*words, "--", prompt])
        service.parse(candidate, reference_sizes=sizes)
    return candidate


def _asked(service: ImageService, request: ImageRequest, sizes: Sizes) -> dict[str, str]:
    """Find the options a request was asked with: what differs from its bare prompt's."""
    bare, _ = service.parse(f"-- {_FILLER}", reference_sizes=sizes)
    same_model, _ = service.parse(f"--model {request.model} -- {_FILLER}", reference_sizes=sizes)
    asked: dict[str, str] = {}
    if request.ratio:
        asked["ratio"] = request.ratio
    if request.tier:
        asked["tier"] = request.tier
    if not request.ratio and not request.tier and request.size != same_model.size:
        asked["size"] = request.size
    if request.quality != bare.quality:
        asked["quality"] = request.quality
    if request.n != bare.n:
        asked["n"] = str(request.n)
    if request.model != bare.model:
        asked["model"] = request.model
    if request.output_format:
        asked["format"] = request.output_format
    if request.background:
        asked["background"] = request.background
    if request.as_file:
        asked["file"] = "file"
    return asked


def _words(asked: Mapping[str, str]) -> list[str]:
    words = [asked[k] for k in ("ratio", "tier", "size") if k in asked]
    if "quality" in asked:
        # A bare `auto` is the ratio: quality auto needs its flag.
        words.append("--q auto" if asked["quality"] == "auto" else asked["quality"])
    if "n" in asked:
        words.append(f"x{asked['n']}")
    words += [asked[k] for k in ("model", "format", "background", "file") if k in asked]
    return words
