"""The /img command language → an immutable `ImageRequest` (pure).

    parse_command(text, defaults, *, reference_size=None, has_references=False,
                  force_tier=None) -> ImageRequest   # or raises PromptError

    /img [options…] prompt

Options are the leading tokens, in any order; the first token that is not an option starts
the prompt, and `--` ends the options explicitly (`/img -- high noon`). Option tokens are
read case-insensitively after NFKC folding, so full-width forms typed on Chinese keyboards
work (`16：9`, `２Ｋ`, `１０２４×１０２４`); the prompt itself is kept as written.

    ratio     16:9 (any W:H from 1:3 to 3:1), auto (the API chooses / follows the reference)
    tier      1K 2K 4K
    quality   low medium high (低 中 高), 自动 = auto
    size      1536x1024, 1536×1024, 1536*1024 (checked against the model's rules)
    count     x2 ×2 *2 n=2 (1..10, capped by the max_n setting)
    model     gpt-image-2 gpt-image-1.5 gpt-image-1, and the aliases in settings
    format    png jpeg jpg webp
    background transparent (png unless a format is given; not with jpeg), opaque
    file      deliver the lossless original as a file
    flags     --ar 16:9  --q high  --quality high  --n 2  --model X  --m X  --size WxH
              --format png  --tier 2K, also as --ar=16:9; key=value forms (q=high, ar=16:9…)
    fields    --compression 0-100 (jpeg/webp only), --moderation low|auto,
              --fidelity high|low (edits only, on the models that take it: FIDELITY_MODELS)

Midjourney habit: `--flag value` pairs at the END of the prompt are read as options too
(`a cat --ar 16:9 --q high`), unless `--` was used. An unknown `--flag` is refused rather
than drawn into the picture. A bare `auto` is the ratio; quality auto is `--q auto`/`自动`.

Anything malformed — or contradictory (two ratios, a size and a ratio, a size and a tier) —
raises `PromptError(key, **params)`; every such message says what was wrong and shows a
correct example.

Hostile or broken text (`clean_text`, applied first): line breaks become `\n`; other
whitespace control characters become spaces; every other control character (NUL, ESC, DEL,
C1) and any lone surrogate is dropped, so what reaches the API and the ledger is valid UTF-8
without terminal escapes. Invisible format characters (zero-width spaces and joiners, bidi
marks, BOM) are ignored inside option words (`16:9\u200b` is 16:9) and trimmed from the ends
of the prompt, but kept inside it (emoji ZWJ sequences, right-to-left text). A prompt with
nothing visible is empty. Combining marks are text: `16:9\u0301` starts the prompt.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from core.errors import PromptError
from core.sizes import TIERS, check_ratio, resolve_size
from core.types import KNOWN_MODELS, ImageRequest, Notice

MAX_PROMPT_CHARS = 32000
MAX_N = 10  # the API's own limit; settings may cap lower
# input_fidelity: gpt-image-1 and gpt-image-1.5 take high|low; gpt-image-2 always works at
# high fidelity and is to be sent none (OpenAI's spec: "for gpt-image-2, omit this parameter").
FIDELITY_MODELS = ("gpt-image-1.5", "gpt-image-1")
FIDELITY_WORDS = ("high", "low")
MODERATION_WORDS = ("low", "auto")
COMPRESSIBLE_FORMATS = ("jpeg", "webp")


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


QUALITY_WORDS = {
    "low": "low",
    "medium": "medium",
    "high": "high",
    "低": "low",
    "中": "medium",
    "高": "high",
    "自动": "auto",
}
FORMAT_WORDS = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}
# flag or key name → what it sets
FLAG_NAMES = {
    "ar": "ratio",
    "aspect": "ratio",
    "ratio": "ratio",
    "q": "quality",
    "quality": "quality",
    "n": "count",
    "model": "model",
    "m": "model",
    "size": "size",
    "format": "format",
    "tier": "tier",
    "fidelity": "fidelity",
    "input_fidelity": "fidelity",
    "compression": "compression",
    "output_compression": "compression",
    "moderation": "moderation",
}
_FLAG_EXAMPLES = {
    "ratio": "--ar 16:9",
    "quality": "--q high",
    "count": "--n 2",
    "model": "--model gpt-image-1.5",
    "size": "--size 1536x1024",
    "format": "--format webp",
    "tier": "--tier 2K",
    "fidelity": "--fidelity high",
    "compression": "jpeg --compression 80",
    "moderation": "--moderation low",
}
KNOWN_FLAGS = (
    "--ar, --q, --n, --model, --size, --format, --tier, --compression, --moderation, --fidelity"
)

_COMMAND = re.compile(r"/img(@\w+)?")
_RATIO = re.compile(r"([0-9]+):([0-9]+)")
_TIER = re.compile(r"([124])k")
_SIZE = re.compile(r"([0-9]+)[x×*]([0-9]+)")
_COUNT = re.compile(r"[x×*]([0-9]+)")
_DIGITS = re.compile(r"[0-9]+")
_FLAG = re.compile(r"--([a-z][a-z0-9_-]*)(?:=(.*))?", re.DOTALL)
_KEY_VALUE = re.compile(r"([a-z]+)=(.+)", re.DOTALL)
_MODEL_LIKE = re.compile(r"(gpt-image|dall-e)[-.\w]*")
_SATURATED = 10**9  # numbers longer than 9 digits are all "too big" (and int() stays cheap)
# Far beyond any prompt; refused before tokenising, so a pasted novel costs no CPU.
MAX_COMMAND_CHARS = 4 * MAX_PROMPT_CHARS
_LINE_BREAKS = re.compile(r"\r\n?")
_SPACE_CONTROLS = re.compile(r"[\x0b\x0c\x1c-\x1f\x85]")
# C0 except tab and newline, DEL, C1, and lone surrogates (unencodable as UTF-8).
_DROPPED = re.compile(r"[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\ud800-\udfff]")
# Invisible format characters: soft hyphen, Mongolian vowel separator, zero-width space /
# joiners, bidi marks, embeddings and isolates, word joiner and friends, BOM.
_INVISIBLE = "\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff"
_INVISIBLE_CHARS = re.compile(f"[{_INVISIBLE}]")
_EDGES = re.compile(f"^[\\s{_INVISIBLE}]+|[\\s{_INVISIBLE}]+$")
_VISIBLE = re.compile(f"[^\\s{_INVISIBLE}\\u0300-\\u036f\\ufe00-\\ufe0f]")


def clean_text(text: str) -> str:
    """Return command text safe to parse, send and store (see the module docstring)."""
    text = _LINE_BREAKS.sub("\n", text)
    text = _SPACE_CONTROLS.sub(" ", text)
    return _DROPPED.sub("", text)


def _fold(token: str) -> str:
    """Fold an option token: NFKC (full-width → ASCII), lower case, ratio sign → colon."""
    token = _INVISIBLE_CHARS.sub("", token)
    folded = unicodedata.normalize("NFKC", token).lower().replace("∶", ":")
    # Phones "smarten" -- into an em or en dash; undo that for the flags we know.
    if folded[:1] in ("—", "–") and folded[1:].split("=", 1)[0] in FLAG_NAMES:
        folded = "--" + folded[1:]
    return folded


def _number(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 9 else _SATURATED


def _ratio_numbers(first: str, second: str) -> tuple[int, int]:
    # Saturating each side alone would read 20000000000:10000000000 as 1:1; scale both
    # down together instead, which keeps the shape (and int() cheap).
    first, second = first.lstrip("0") or "0", second.lstrip("0") or "0"
    cut = max(len(first), len(second)) - 9
    if cut <= 0:
        return int(first), int(second)
    p, q = int(first[:-cut] or "0"), int(second[:-cut] or "0")
    # A side that vanished is tiny next to the other, not zero: still refused as too wide.
    return p or int(first != "0"), q or int(second != "0")


@dataclass
class _Asked:
    """What the options asked for, with each option as the user typed it (for messages)."""

    values: dict[str, Any] = field(default_factory=dict)
    shown: dict[str, str] = field(default_factory=dict)

    def set(self, what: str, value: Any, shown: str) -> None:
        if what in self.values and self.values[what] != value:
            key = "prompt.ratio_twice" if what == "ratio" else "prompt.option_twice"
            raise PromptError(key, first=self.shown[what], second=shown, what=what)
        self.values[what] = value
        self.shown[what] = shown

    def get(self, what: str) -> Any:
        return self.values.get(what)


class _Reader:
    """Reads option tokens against the defaults (model names and aliases, the count cap)."""

    def __init__(self, defaults: PromptDefaults) -> None:
        self.defaults = defaults
        self.models = {name: name for name in KNOWN_MODELS}
        for alias, target in defaults.aliases:
            if target in KNOWN_MODELS:
                self.models[_fold(alias)] = target
        self.cap = max(1, min(MAX_N, defaults.max_n))

    def count(self, digits: str, shown: str) -> int:
        n = _number(digits)
        if not 1 <= n <= self.cap:
            raise PromptError("prompt.count_range", value=shown, max=self.cap)
        return n

    def bare(self, folded: str, shown: str, asked: _Asked) -> bool:
        """Apply one bare option token; False when it is not an option (the prompt starts)."""
        if m := _RATIO.fullmatch(folded):
            p, q = _ratio_numbers(m[1], m[2])
            check_ratio(p, q, shown)
            asked.set("ratio", (p, q), f"{m[1]}:{m[2]}")
        elif folded == "auto":
            asked.set("ratio", "auto", "auto")
        elif m := _TIER.fullmatch(folded):
            asked.set("tier", f"{m[1]}K", shown)
        elif folded in QUALITY_WORDS:
            asked.set("quality", QUALITY_WORDS[folded], shown)
        elif m := _SIZE.fullmatch(folded):
            asked.set("size", (_number(m[1]), _number(m[2])), shown)
        elif m := _COUNT.fullmatch(folded):
            asked.set("count", self.count(m[1], shown), shown)
        elif folded in self.models:
            asked.set("model", self.models[folded], shown)
        elif _MODEL_LIKE.fullmatch(folded):
            raise PromptError("prompt.unknown_model", model=shown, models=", ".join(KNOWN_MODELS))
        elif folded in FORMAT_WORDS:
            asked.set("format", FORMAT_WORDS[folded], shown)
        elif folded in ("transparent", "opaque"):
            asked.set("background", folded, shown)
        elif folded == "file":
            asked.values["as_file"] = True
        else:
            return False
        return True

    def flag(
        self, name: str, value: str | None, shown: str, asked: _Asked, given: str | None = None
    ) -> None:
        """Apply one `--name value` flag or `name=value` pair (`given`: all of it as typed)."""
        what = FLAG_NAMES.get(name)
        if what is None:
            raise PromptError("prompt.unknown_flag", flag=shown, flags=KNOWN_FLAGS)
        example = _FLAG_EXAMPLES[what]
        if value is None or not value.strip():
            raise PromptError("prompt.flag_missing", flag=shown, example=example)
        folded = _fold(value.strip())
        given = given or f"{shown} {value.strip()}"
        if what == "ratio":
            ok = bool(_RATIO.fullmatch(folded)) or folded == "auto"
        elif what == "quality":
            ok = folded in QUALITY_WORDS or folded == "auto"
            if ok:
                asked.set("quality", QUALITY_WORDS.get(folded, "auto"), given)
                return
        elif what == "count":
            if _DIGITS.fullmatch(folded):
                asked.set("count", self.count(folded, given), given)
                return
            ok = False
        elif what == "model":
            ok = folded in self.models
            if not ok:
                raise PromptError(
                    "prompt.unknown_model", model=value.strip(), models=", ".join(KNOWN_MODELS)
                )
        elif what == "size":
            if folded == "auto":
                asked.set("ratio", "auto", given)
                return
            ok = bool(_SIZE.fullmatch(folded))
        elif what == "tier":
            ok = bool(_TIER.fullmatch(folded))
        elif what in ("fidelity", "moderation"):
            words = FIDELITY_WORDS if what == "fidelity" else MODERATION_WORDS
            if folded in words:
                asked.set(what, folded, given)
                return
            ok = False
        elif what == "compression":
            if not _DIGITS.fullmatch(folded) or _number(folded) > 100:
                raise PromptError("prompt.compression_range", value=given)
            asked.set("compression", _number(folded), given)
            return
        else:  # format
            ok = folded in FORMAT_WORDS
        if not ok:
            raise PromptError("prompt.flag_value", flag=shown, value=value.strip(), example=example)
        # The value has the shape of the bare option it names: reuse that reading.
        self.bare(folded, given, asked)


def _strip_command(tokens: list[tuple[str, str, int, int]]) -> list[tuple[str, str, int, int]]:
    if tokens and _COMMAND.fullmatch(tokens[0][1]):
        return tokens[1:]
    return tokens


def _tail_flags(
    tokens: list[tuple[str, str, int, int]], start: int
) -> tuple[int, list[tuple[str, str | None, str, str | None]]]:
    """Find the run of `--flag value` pairs that ends the prompt (after its first word).

    Return where the run begins and its (name, value, flag as typed, whole as typed) pairs.
    One backward pass: `runs[i]` says whether tokens[i:] read as such pairs, reading a
    flag's next token as its value unless that is a flag too (a missing value is kept, to
    be refused with a clear message).
    """
    count = len(tokens)
    flags = [_FLAG.fullmatch(folded) for _, folded, _, _ in tokens]
    runs = [False] * (count + 1)
    runs[count] = True
    for i in range(count - 1, start, -1):
        m = flags[i]
        if m is None:
            continue
        if m[2] is None and i + 1 < count and flags[i + 1] is None:
            runs[i] = runs[i + 2]
        else:
            runs[i] = runs[i + 1]
    begin = next((i for i in range(start + 1, count) if flags[i] and runs[i]), count)
    pairs: list[tuple[str, str | None, str, str | None]] = []
    i = begin
    while i < count:
        m = flags[i]
        assert m is not None
        raw = tokens[i][0]
        if m[2] is not None:
            pairs.append((m[1], m[2], "--" + m[1], raw))
            i += 1
        elif i + 1 < count and flags[i + 1] is None:
            pairs.append((m[1], tokens[i + 1][0], raw, None))
            i += 2
        else:
            pairs.append((m[1], None, raw, None))
            i += 1
    return begin, pairs


def parse_command(
    text: str,
    defaults: PromptDefaults,
    *,
    reference_size: tuple[int, int] | None = None,
    has_references: bool = False,
    force_tier: str | None = None,
) -> ImageRequest:
    """Parse `/img [options…] prompt` into an ImageRequest, or raise PromptError."""
    if force_tier is not None:
        force_tier = force_tier.strip().upper()
        if force_tier not in TIERS:
            raise ValueError(f"force_tier must be one of {', '.join(TIERS)}, not {force_tier!r}")
    prompt, asked = _read(text, defaults)
    return _build(prompt, asked, defaults, reference_size, has_references, force_tier)


def _read(text: str, defaults: PromptDefaults) -> tuple[str, _Asked]:
    """Split a command into its prompt and the options it asked for."""
    text = clean_text(text)
    if len(text) > MAX_COMMAND_CHARS:
        raise PromptError("prompt.too_long", length=f"{len(text):,}", limit=f"{MAX_PROMPT_CHARS:,}")
    reader = _Reader(defaults)
    asked = _Asked()
    tokens = [(m[0], _fold(m[0]), m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    tokens = _strip_command(tokens)

    explicit_end = False
    start = len(tokens)
    i = 0
    while i < len(tokens):
        raw, folded = tokens[i][0], tokens[i][1]
        if folded == "--":
            explicit_end = True
            start = i + 1
            break
        if m := _FLAG.fullmatch(folded):
            name = m[1]
            if m[2] is not None:
                reader.flag(name, m[2], "--" + name, asked, raw)
                i += 1
            else:
                has_value = i + 1 < len(tokens) and not tokens[i + 1][1].startswith("--")
                reader.flag(name, tokens[i + 1][0] if has_value else None, raw, asked)
                i += 2 if has_value else 1
            continue
        kv = _KEY_VALUE.fullmatch(folded)
        if kv and kv[1] in FLAG_NAMES:
            reader.flag(kv[1], kv[2], kv[1] + "=", asked, raw)
            i += 1
            continue
        if not reader.bare(folded, raw, asked):
            start = i
            break
        i += 1

    end = len(tokens)
    if not explicit_end and start < len(tokens):
        end, pairs = _tail_flags(tokens, start)
        for name, value, shown, given in pairs:
            reader.flag(name, value, shown, asked, given)

    prompt = _EDGES.sub("", text[tokens[start][2] : tokens[end - 1][3]]) if start < end else ""
    if not _VISIBLE.search(prompt):
        raise PromptError("prompt.empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PromptError(
            "prompt.too_long", length=f"{len(prompt):,}", limit=f"{MAX_PROMPT_CHARS:,}"
        )
    return prompt, asked


def refine_command(text: str, source: dict[str, Any], defaults: PromptDefaults) -> str:
    """Return a refinement's command: `text` plus the source job's options it does not name.

    `source` is the source job's stored request (`ImageRequest` fields). A refinement keeps
    the source's quality, model, format and background, and `file`; its ratio and tier (or
    its exact size) unless the text names a ratio, tier or size — a new ratio keeps the
    source's tier and a new tier its ratio. The count is not kept: a refinement draws one
    image unless it asks for more. Inherited words go first, so the stored command replays
    the same request. A malformed text is returned as it is, to be refused as usual.
    """
    try:
        _, asked = _read(text, defaults)
    except PromptError:
        return text
    named = set(asked.values)
    words: list[str] = []
    model = source.get("model")
    if "model" not in named and isinstance(model, str) and model in KNOWN_MODELS:
        words.append(model)
    quality = source.get("quality")
    if "quality" not in named and quality in ("low", "medium", "high"):
        words.append(str(quality))
    ratio, tier, size = source.get("ratio"), source.get("tier"), source.get("size")
    if "size" not in named:
        if "ratio" not in named and isinstance(ratio, str) and ratio:
            words.append(ratio)
        if "tier" not in named and isinstance(tier, str) and tier in TIERS:
            words.append(tier)
        same_model = "model" not in named or asked.get("model") == model
        exact = isinstance(size, str) and _SIZE.fullmatch(size) is not None
        if not ({"ratio", "tier"} & named) and not ratio and not tier and exact and same_model:
            words.append(str(size))  # asked as an exact size: keep it
    if "format" not in named and source.get("output_format") in FORMAT_WORDS:
        words.append(str(source["output_format"]))
    if "background" not in named and source.get("background") in ("transparent", "opaque"):
        words.append(str(source["background"]))
    if "as_file" not in named and source.get("as_file") is True:
        words.append("file")
    words += _kept_fields(asked, source)
    return " ".join([*words, text]) if words else text


def _kept_fields(asked: _Asked, source: dict[str, Any]) -> list[str]:
    """Return the words that keep a source job's compression, moderation and fidelity.

    Each is kept only where the refinement could still use it: compression while the format
    (named or kept) is jpeg or webp, fidelity while the model (named or kept) takes it.
    """
    words = []
    named = asked.values
    fmt = named.get("format", source.get("output_format"))
    compression = source.get("output_compression")
    if "compression" not in named and fmt in COMPRESSIBLE_FORMATS and isinstance(compression, int):
        if not isinstance(compression, bool) and 0 <= compression <= 100:
            words.append(f"compression={compression}")
    if "moderation" not in named and source.get("moderation") in MODERATION_WORDS:
        words.append(f"moderation={source['moderation']}")
    model = named.get("model", source.get("model"))
    fidelity = source.get("input_fidelity")
    if "fidelity" not in named and fidelity in FIDELITY_WORDS and model in FIDELITY_MODELS:
        words.append(f"fidelity={fidelity}")
    return words


def _build(
    prompt: str,
    asked: _Asked,
    defaults: PromptDefaults,
    reference_size: tuple[int, int] | None,
    has_references: bool,
    force_tier: str | None,
) -> ImageRequest:
    ratio, size, tier = asked.get("ratio"), asked.get("size"), asked.get("tier")
    if size is not None and ratio is not None:
        raise PromptError(
            "prompt.size_and_ratio", size=asked.shown["size"], ratio=asked.shown["ratio"]
        )
    if size is not None and tier is not None:
        raise PromptError(
            "prompt.size_and_tier", size=asked.shown["size"], tier=asked.shown["tier"]
        )
    tier = force_tier or tier
    model = asked.get("model") or defaults.model
    background = asked.get("background")
    output_format = asked.get("format")
    if background == "transparent":
        if output_format == "jpeg":
            raise PromptError("prompt.transparent_jpeg", format=asked.shown["format"])
        output_format = output_format or "png"
    compression = asked.get("compression")
    if compression is not None and output_format not in COMPRESSIBLE_FORMATS:
        raise PromptError("prompt.compression_format", value=asked.shown["compression"])
    fidelity = asked.get("fidelity")
    if fidelity is not None:
        if model not in FIDELITY_MODELS:
            raise PromptError(
                "prompt.fidelity_model", model=model, models=" / ".join(FIDELITY_MODELS)
            )
        if not has_references:
            raise PromptError("prompt.fidelity_needs_reference")
    try:
        choice = resolve_size(
            model,
            ratio=ratio,
            tier=tier,
            default_tier=defaults.tier,
            size=size,
            reference_size=reference_size,
            has_references=has_references,
        )
    except PromptError as err:
        if size is not None and _SATURATED in size and "size" in err.params:
            # A huge number was read as "too big"; quote the size as typed, not as read.
            err.params["size"] = asked.shown["size"]
        raise
    shown_ratio = None
    if ratio == "auto":
        shown_ratio = "auto"
    elif ratio is not None:
        shown_ratio = f"{ratio[0]}:{ratio[1]}"
    return ImageRequest(
        prompt=prompt,
        model=model,
        size=choice.size,
        quality=asked.get("quality") or defaults.quality,
        n=asked.get("count") or defaults.n,
        output_format=output_format,
        background=background,
        ratio=shown_ratio,
        tier=tier,
        as_file=bool(asked.get("as_file")),
        notices=tuple(Notice(key, params) for key, params in choice.notes),
        output_compression=compression,
        input_fidelity=fidelity,
        moderation=asked.get("moderation"),
    )
