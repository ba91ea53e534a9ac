"""Sizes: the seed's table, the gpt-image-2 rules, model-aware resolution."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import PromptError
from core.messages import MESSAGES, text
from core.sizes import (
    FIXED_SIZES,
    SEED_TABLE,
    TIERS,
    check_size,
    nearest_fixed_size,
    ratio_size,
    resolve_size,
    size_rules_ok,
    size_table_rows,
    suggest_size,
    table_size,
)
from tests.size_rules import obeys_every_rule

# The seed's table, copied by hand from docs/image-api.md (the spec the module must meet).
EXPECTED_TABLE = {
    "1:1": ("1024x1024", "2048x2048", "2880x2880"),
    "16:9": ("1280x720", "2048x1152", "3840x2160"),
    "9:16": ("720x1280", "1152x2048", "2160x3840"),
    "5:4": ("1040x832", "2080x1664", "3200x2560"),
    "4:5": ("832x1040", "1664x2080", "2560x3200"),
    "4:3": ("1024x768", "2048x1536", "3264x2448"),
    "3:4": ("768x1024", "1536x2048", "2448x3264"),
    "3:2": ("1008x672", "2064x1376", "3504x2336"),
    "2:3": ("672x1008", "1376x2064", "2336x3504"),
    "21:9": ("1344x576", "2016x864", "3808x1632"),
}
TABLE_CASES = [
    (ratio, tier, size)
    for ratio, sizes in EXPECTED_TABLE.items()
    for tier, size in zip(TIERS, sizes, strict=True)
]


def _wh(size: str) -> tuple[int, int]:
    w, h = size.split("x")
    return int(w), int(h)



def test_seed_table_is_exactly_the_facts() -> None:
    assert set(SEED_TABLE) == set(EXPECTED_TABLE)
    for ratio, sizes in EXPECTED_TABLE.items():
        assert {t: "{}x{}".format(*SEED_TABLE[ratio][t]) for t in TIERS} == dict(
            zip(TIERS, sizes, strict=True)
        )


@pytest.mark.parametrize(("ratio", "tier", "size"), TABLE_CASES)
def test_every_table_entry_obeys_the_rules_and_the_rule_reproduces_it(
    ratio: str, tier: str, size: str
) -> None:
    w, h = _wh(size)
    assert obeys_every_rule(w, h)
    assert size_rules_ok(w, h)
    p, q = (int(x) for x in ratio.split(":"))
    # The general rule for other ratios gives the table's own answer for the named ones.
    assert ratio_size(p, q, tier) == (w, h)
    assert table_size(p * 3, q * 3, tier) == (w, h)  # 48:27 is 16:9


@pytest.mark.parametrize(
    ("w", "h", "ok"),
    [
        (1024, 640, True),  # exactly the pixel minimum
        (1024, 624, False),  # below it
        (2880, 2880, True),  # exactly the pixel maximum
        (2896, 2880, False),  # above it
        (3840, 2160, True),
        (3856, 2160, False),  # edge over 3840
        (3840, 1280, True),  # exactly 3:1
        (3840, 1264, False),  # beyond 3:1
        (1008, 1008, True),
        (1000, 1000, False),  # not multiples of 16
        (0, 1024, False),
    ],
)
def test_size_rules_boundaries(w: int, h: int, ok: bool) -> None:
    assert size_rules_ok(w, h) is ok
    assert obeys_every_rule(w, h) is ok


@pytest.mark.parametrize(
    ("w", "h", "key", "en_word", "zh_word"),
    [
        (1000, 1000, "prompt.size_step", "multiples of 16", "16 的倍数"),
        (4000, 4000, "prompt.size_edge", "3840", "3840"),
        (3840, 1264, "prompt.size_aspect", "3 times", "3 倍"),
        (512, 512, "prompt.size_small", "655,360", "655,360"),
        (3200, 3200, "prompt.size_large", "8,294,400", "8,294,400"),
    ],
)
def test_check_size_names_the_broken_rule_and_a_good_size(
    w: int, h: int, key: str, en_word: str, zh_word: str
) -> None:
    with pytest.raises(PromptError) as caught:
        check_size("gpt-image-2", w, h)
    err = caught.value
    assert err.key == key
    en, zh = err.user_message("en"), err.user_message("zh")
    assert en_word in en and zh_word in zh
    assert f"{w}x{h}" in en and f"{w}x{h}" in zh
    good = _wh(err.params["good"])
    assert obeys_every_rule(*good)
    assert f"/img {err.params['good']}" in en  # a correct example


def test_fixed_models_take_only_their_three_sizes() -> None:
    for model in ("gpt-image-1", "gpt-image-1.5"):
        for w, h in FIXED_SIZES:
            check_size(model, w, h)
        with pytest.raises(PromptError) as caught:
            check_size(model, 2048, 2048)
        assert caught.value.key == "prompt.size_fixed"
        assert "1536x1024" in caught.value.user_message("en")
        assert model in caught.value.user_message("zh")


def test_nearest_fixed_size() -> None:
    assert nearest_fixed_size(1, 1) == (1024, 1024)
    assert nearest_fixed_size(16, 9) == (1536, 1024)
    assert nearest_fixed_size(9, 16) == (1024, 1536)
    assert nearest_fixed_size(5, 4) == (1536, 1024)  # 1.25 is nearer 1.5 than 1 (in log terms)
    assert nearest_fixed_size(6, 5) == (1024, 1024)


def test_other_ratios_follow_the_rule() -> None:
    assert ratio_size(2, 1, "1K") == (1152, 576)
    assert ratio_size(2, 1, "2K") == (2048, 1024)
    assert ratio_size(2, 1, "4K") == (3840, 1920)
    assert ratio_size(3, 1, "1K") == (1440, 480)  # 1024 wide would be under the pixel minimum
    assert ratio_size(1, 3, "4K") == (1280, 3840)
    assert ratio_size(7, 5, "2K") == (2016, 1440)


def test_resolve_named_ratio_default_and_asked_tier() -> None:
    assert resolve_size("gpt-image-2", ratio=(16, 9)).size == "1280x720"
    assert resolve_size("gpt-image-2", ratio=(16, 9), default_tier="2K").size == "2048x1152"
    assert resolve_size("gpt-image-2", ratio=(16, 9), tier="4K").size == "3840x2160"
    assert resolve_size("gpt-image-2").size == "1024x1024"
    assert resolve_size("gpt-image-2", default_tier="4K").size == "2880x2880"


def test_resolve_approximate_ratio_says_so() -> None:
    choice = resolve_size("gpt-image-2", ratio=(100, 37), tier="2K")
    w, h = _wh(choice.size)
    assert obeys_every_rule(w, h)
    assert abs(w / h - 100 / 37) / (100 / 37) < 0.01
    assert [key for key, _ in choice.notes] == ["size.approximate"]
    assert resolve_size("gpt-image-2", ratio=(7, 5), tier="2K").notes == ()


def test_resolve_explicit_size() -> None:
    assert resolve_size("gpt-image-2", size=(1536, 864)).size == "1536x864"
    with pytest.raises(PromptError):
        resolve_size("gpt-image-2", size=(1000, 1000))
    # An explicit size with a forced tier keeps its aspect at that tier (the 4K button).
    assert resolve_size("gpt-image-2", size=(1024, 1536), tier="4K").size == "2336x3504"


def test_resolve_ratio_beyond_limit_is_refused() -> None:
    with pytest.raises(PromptError) as caught:
        resolve_size("gpt-image-2", ratio=(5, 1))
    assert caught.value.key == "prompt.ratio_too_wide"


def test_references_without_ratio_or_tier_follow_the_reference() -> None:
    assert resolve_size("gpt-image-2", has_references=True, reference_size=(1920, 1080)).size == (
        "auto"
    )
    assert resolve_size("gpt-image-1", has_references=True).size == "auto"


def test_references_with_a_tier_use_the_first_reference_aspect() -> None:
    choice = resolve_size(
        "gpt-image-2", tier="2K", has_references=True, reference_size=(1920, 1080)
    )
    assert choice.size == "2048x1152"
    assert choice.notes == ()
    odd = resolve_size("gpt-image-2", tier="1K", has_references=True, reference_size=(1170, 2532))
    w, h = _wh(odd.size)
    assert obeys_every_rule(w, h) and h > w
    assert odd.notes == ()  # the user asked for no ratio: nothing to apologise for


def test_references_with_a_tier_but_unknown_size_stay_auto_and_say_so() -> None:
    choice = resolve_size("gpt-image-2", tier="2K", has_references=True)
    assert choice.size == "auto"
    assert [key for key, _ in choice.notes] == ["size.tier_ignored"]


def test_reference_beyond_three_to_one_is_clamped_with_a_notice() -> None:
    choice = resolve_size(
        "gpt-image-2", tier="1K", has_references=True, reference_size=(5000, 1000)
    )
    assert choice.size == "1440x480"
    assert [key for key, _ in choice.notes] == ["size.aspect_clamped"]


def test_ratio_auto_is_size_auto() -> None:
    assert resolve_size("gpt-image-2", ratio="auto").size == "auto"
    assert resolve_size("gpt-image-2", ratio="auto", tier="4K", reference_size=(1, 1)).size == (
        "2880x2880"
    )


def test_fixed_models_map_and_tell() -> None:
    choice = resolve_size("gpt-image-1.5", ratio=(16, 9), tier="4K")
    assert choice.size == "1536x1024"
    keys = [key for key, _ in choice.notes]
    assert keys == ["size.model_max", "size.model_aspect"]
    rendered = text("en", keys[0], **dict(choice.notes[0][1]))
    assert "gpt-image-1.5 draws at most 1536x1024" in rendered
    # Exactly what was asked: no notice.
    assert resolve_size("gpt-image-1", ratio=(3, 2), tier="1K").notes == ()
    assert resolve_size("gpt-image-1", ratio=(1, 1)).notes == ()
    # A default tier above 1K was not asked for: no notice either.
    assert resolve_size("gpt-image-1", ratio=(1, 1), default_tier="4K").notes == ()


def test_notice_keys_exist_in_both_languages() -> None:
    for key in (
        "size.approximate",
        "size.model_max",
        "size.model_aspect",
        "size.aspect_clamped",
        "size.tier_ignored",
        "sizes.header",
        "sizes.footer",
    ):
        assert set(MESSAGES[key]) == {"en", "zh"}


def test_size_table_rows() -> None:
    rows = size_table_rows("gpt-image-2")
    assert [ratio for ratio, _ in rows] == list(EXPECTED_TABLE)
    assert dict(rows) == EXPECTED_TABLE
    assert size_table_rows() == rows
    fixed = size_table_rows("gpt-image-1")
    assert len(fixed) == 10
    assert all(_wh(cell) in FIXED_SIZES for _, cells in fixed for cell in cells)


# --- properties ----------------------------------------------------------------------------

ratios = st.tuples(st.integers(1, 10_000), st.integers(1, 10_000)).filter(
    lambda pq: max(pq) <= 3 * min(pq)
)


@settings(max_examples=300, deadline=None)
@given(ratios, st.sampled_from(TIERS))
def test_every_ratio_size_obeys_every_rule_and_is_near_the_aspect(
    pq: tuple[int, int], tier: str
) -> None:
    p, q = pq
    choice = resolve_size("gpt-image-2", ratio=(p, q), tier=tier)
    w, h = _wh(choice.size)
    assert obeys_every_rule(w, h)
    assert abs((w * q) / (h * p) - 1) < 0.02


@settings(max_examples=300, deadline=None)
@given(
    st.tuples(st.integers(-5, 10**7), st.integers(-5, 10**7)),
    st.sampled_from(TIERS),
    st.sampled_from([None, (16, 9), "auto"]),
)
def test_every_size_for_any_referenceobeys_every_rule(
    reference: tuple[int, int], tier: str, ratio: tuple[int, int] | str | None
) -> None:
    for model in ("gpt-image-2", "gpt-image-1.5"):
        choice = resolve_size(
            model, ratio=ratio, tier=tier, has_references=True, reference_size=reference
        )
        assert choice.size != "auto"
        w, h = _wh(choice.size)
        if model == "gpt-image-2":
            assert obeys_every_rule(w, h)
        else:
            assert (w, h) in FIXED_SIZES


@settings(max_examples=300, deadline=None)
@given(st.integers(-10, 20_000), st.integers(-10, 20_000))
def test_suggested_sizes_obey_every_rule(w: int, h: int) -> None:
    assert obeys_every_rule(*suggest_size(w, h))
