"""The /img command language: options, prompt, errors, notices."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import PromptError
from core.messages import MESSAGES
from core.prompt import ImageRequest, PromptDefaults, parse_command, refine_command
from core.sizes import FIXED_SIZES, SEED_TABLE, TIERS
from tests.size_rules import obeys_every_rule

D = PromptDefaults()


def parse(text: str, defaults: PromptDefaults = D, **kw: object) -> ImageRequest:
    return parse_command(text, defaults, **kw)  # type: ignore[arg-type]


def refused(text: str, defaults: PromptDefaults = D, **kw: object) -> PromptError:
    with pytest.raises(PromptError) as caught:
        parse_command(text, defaults, **kw)  # type: ignore[arg-type]
    err = caught.value
    assert err.key in MESSAGES, err.key
    return err



# --- the examples of the issue --------------------------------------------------------------


def test_the_siamese_cat() -> None:
    r = parse("16:9 2K high a white siamese cat")
    assert (r.size, r.quality, r.prompt) == ("2048x1152", "high", "a white siamese cat")
    assert (r.ratio, r.tier, r.model, r.n) == ("16:9", "2K", "gpt-image-2", 1)
    assert r.notices == ()


@pytest.mark.parametrize(
    ("ratio", "tier"), [(ratio, tier) for ratio in SEED_TABLE for tier in TIERS]
)
def test_all_thirty_table_entries_come_out_exactly(ratio: str, tier: str) -> None:
    r = parse(f"{ratio} {tier} x")
    assert r.size == "{}x{}".format(*SEED_TABLE[ratio][tier])
    assert r.prompt == "x"
    assert r.notices == ()


def test_five_to_one_is_refused_naming_the_limit() -> None:
    err = refused("5:1 a long train")
    assert err.key == "prompt.ratio_too_wide"
    en, zh = err.user_message("en"), err.user_message("zh")
    assert "5:1" in en and "3:1" in en and "Example: /img 3:1" in en
    assert "5:1" in zh and "3:1" in zh and "示例" in zh


def test_4000x4000_is_refused_naming_the_edge_limit() -> None:
    err = refused("4000x4000 a cat")
    assert err.key == "prompt.size_edge"
    assert "3840" in err.user_message("en") and "4000x4000" in err.user_message("en")
    assert "3840" in err.user_message("zh")
    assert "Example: /img 2880x2880" in err.user_message("en")


def test_1000x1000_is_refused_as_not_a_multiple_of_16() -> None:
    err = refused("1000x1000 a cat")
    assert err.key == "prompt.size_step"
    assert "multiples of 16" in err.user_message("en")
    assert "16 的倍数" in err.user_message("zh")
    assert "Example: /img " in err.user_message("en")


@pytest.mark.parametrize("text", ["", "   ", "/img", "/img@ImgBot", "16:9 2K high", "--", "x2 --"])
def test_an_empty_prompt_is_refused(text: str) -> None:
    err = refused(text)
    assert err.key == "prompt.empty"
    assert "nothing to draw" in err.user_message("en")
    assert "没有要画的内容" in err.user_message("zh")
    assert "/img 16:9 2K high" in err.user_message("en")


def test_prompt_length_limit() -> None:
    assert len(parse("a" * 32000).prompt) == 32000
    err = refused("high " + "a" * 32001)
    assert err.key == "prompt.too_long"
    assert "32,001" in err.user_message("en") and "32,000" in err.user_message("zh")


# --- reading options ----------------------------------------------------------------------


def test_options_in_any_order_and_any_case() -> None:
    r = parse("HIGH 2k GPT-Image-1.5 3:2 X3 WEBP a dog")
    assert (r.quality, r.tier, r.model, r.ratio, r.n, r.output_format) == (
        "high",
        "2K",
        "gpt-image-1.5",
        "3:2",
        3,
        "webp",
    )
    assert r.prompt == "a dog"


def test_full_width_forms() -> None:
    r = parse("１６：９　２Ｋ　高　一只白色的猫")
    assert (r.size, r.quality, r.prompt) == ("2048x1152", "high", "一只白色的猫")
    assert parse("１０２４×１５３６ 猫").size == "1024x1536"
    assert parse("1024＊1536 猫").size == "1024x1536"
    assert parse("1024*1536 猫").size == "1024x1536"
    assert parse("１０２４ｘ１５３６ 猫").size == "1024x1536"
    assert parse("×2 猫").n == 2
    assert parse("ｘ２ 猫").n == 2
    assert parse("低 猫").quality == "low"
    assert parse("中 猫").quality == "medium"
    assert parse("自动 猫").quality == "auto"
    assert parse("／ｉｍｇ ２ｋ 猫").tier == "2K"


def test_prompt_is_kept_as_written() -> None:
    r = parse("/img 2K  Ｆｕｌｌ-width   stays,\n\tand so do  CAPITALS  ")
    assert r.prompt == "Ｆｕｌｌ-width   stays,\n\tand so do  CAPITALS"


def test_leading_command_is_stripped() -> None:
    assert parse("/img a cat").prompt == "a cat"
    assert parse("/img@Some_Bot 2K a cat").prompt == "a cat"
    assert parse("/IMG@SomeBot a cat").prompt == "a cat"
    assert parse("a /img cat").prompt == "a /img cat"


def test_double_dash_ends_options() -> None:
    r = parse("2K -- high noon at the saloon")
    assert (r.tier, r.prompt, r.quality) == ("2K", "high noon at the saloon", "auto")
    assert parse("-- 16:9 is a ratio").prompt == "16:9 is a ratio"
    # After --, even trailing Midjourney-looking text is the prompt.
    assert parse("-- a cat --ar 16:9").prompt == "a cat --ar 16:9"
    assert parse("-- a cat --ar 16:9").ratio is None


def test_first_non_option_starts_the_prompt() -> None:
    r = parse("2K a cat in high resolution 4K")
    assert r.tier == "2K"
    assert r.prompt == "a cat in high resolution 4K"
    assert parse("x a cat").prompt == "x a cat"
    assert parse("3 cats").prompt == "3 cats"


def test_quality_words() -> None:
    for word, quality in [("low", "low"), ("medium", "medium"), ("high", "high"), ("高", "high")]:
        assert parse(f"{word} a cat").quality == quality
    assert parse("--q auto a cat", PromptDefaults(quality="high")).quality == "auto"
    assert parse("a cat", PromptDefaults(quality="medium")).quality == "medium"


def test_counts() -> None:
    assert parse("x2 a cat").n == 2
    assert parse("n=3 a cat").n == 3
    assert parse("*4 a cat").n == 4
    assert parse("a cat").n == 1
    assert parse("a cat", PromptDefaults(n=2)).n == 2
    assert parse("x10 a cat", PromptDefaults(max_n=10)).n == 10


@pytest.mark.parametrize(("text", "cap"), [("x5 a cat", 4), ("x0 a cat", 4), ("n=11 a cat", 4)])
def test_counts_out_of_range_name_the_cap(text: str, cap: int) -> None:
    err = refused(text)
    assert err.key == "prompt.count_range"
    assert f"1 to {cap}" in err.user_message("en")
    assert f"1 到 {cap}" in err.user_message("zh")


def test_count_cap_is_at_most_ten() -> None:
    err = refused("x11 a cat", PromptDefaults(max_n=10))
    assert "1 to 10" in err.user_message("en")
    err = refused("x99999999999999999999 a cat", PromptDefaults(max_n=10))
    assert err.key == "prompt.count_range"


def test_models_and_aliases() -> None:
    assert parse("gpt-image-1 a cat").model == "gpt-image-1"
    aliased = PromptDefaults(aliases=(("v1", "gpt-image-1"), ("Fast", "gpt-image-1.5")))
    assert parse("v1 a cat", aliased).model == "gpt-image-1"
    assert parse("fast a cat", aliased).model == "gpt-image-1.5"
    assert parse("--model FAST a cat", aliased).model == "gpt-image-1.5"
    assert parse("a cat", PromptDefaults(model="gpt-image-1")).model == "gpt-image-1"
    err = refused("gpt-image-3 a cat")
    assert err.key == "prompt.unknown_model"
    assert "gpt-image-1.5" in err.user_message("en")
    assert refused("--model dalle a cat").key == "prompt.unknown_model"


def test_formats_background_and_file() -> None:
    assert parse("jpg a cat").output_format == "jpeg"
    assert parse("PNG a cat").output_format == "png"
    assert parse("a cat").output_format is None
    r = parse("transparent a sticker")
    assert (r.background, r.output_format) == ("transparent", "png")
    assert parse("transparent webp a sticker").output_format == "webp"
    assert parse("opaque a cat").background == "opaque"
    assert parse("file 4K a cat").as_file is True
    assert parse("a cat").as_file is False
    err = refused("transparent jpeg a sticker")
    assert err.key == "prompt.transparent_jpeg"
    assert "png" in err.user_message("en") and "透明" in err.user_message("zh")
    assert refused("transparent opaque a cat").key == "prompt.option_twice"


def test_midjourney_flags_leading() -> None:
    r = parse("--ar 16:9 --q high --n 2 --model gpt-image-1.5 a cat")
    assert (r.ratio, r.quality, r.n, r.model, r.size) == (
        "16:9",
        "high",
        2,
        "gpt-image-1.5",
        "1536x1024",
    )
    r = parse("--quality low --m gpt-image-1 --size 1024x1536 --format webp a cat")
    assert (r.quality, r.model, r.size, r.output_format) == (
        "low",
        "gpt-image-1",
        "1024x1536",
        "webp",
    )
    assert parse("--ar=21:9 --tier 4K a cat").size == "3808x1632"
    assert parse("--size auto a cat").size == "auto"
    assert parse("--ar＝16:9 n＝2 a cat").size == "1280x720"
    assert parse("--ar＝16:9 n＝2 a cat").n == 2


def test_midjourney_flags_trailing() -> None:
    r = parse("a cat on a mat --ar 16:9 --q high")
    assert (r.prompt, r.size, r.quality) == ("a cat on a mat", "1280x720", "high")
    r = parse("2K a cat --ar=3:2")
    assert (r.prompt, r.size) == ("a cat", "2064x1376")
    # Dashes inside the prompt that are not a trailing run of flags stay.
    assert parse("a cat -- dog").prompt == "a cat -- dog"
    assert parse("well --ar 16:9 said").prompt == "well --ar 16:9 said"


def test_phone_dashes_count_as_flags() -> None:
    r = parse("a cat —ar 16:9 –q high")
    assert (r.prompt, r.size, r.quality) == ("a cat", "1280x720", "high")
    assert parse("a cat — smiling —brightly").prompt == "a cat — smiling —brightly"


def test_many_dashes_in_a_long_prompt_stay_fast_and_intact() -> None:
    text = "a " + "--x y " * 5000 + "end"
    assert parse(text).prompt == text  # no trailing run of flags: all of it is the prompt


def test_unknown_flags_are_refused_with_the_escape() -> None:
    err = refused("a cat --no dogs")
    assert err.key == "prompt.unknown_flag"
    assert "--no" in err.user_message("en") and "-- --no" in err.user_message("en")
    assert refused("--stylize 100 a cat").key == "prompt.unknown_flag"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("--ar", "prompt.flag_missing"),
        ("a cat --ar", "prompt.flag_missing"),
        ("--ar --q high a cat", "prompt.flag_missing"),
        ("--q 2 a cat", "prompt.flag_value"),
        ("--n two a cat", "prompt.flag_value"),
        ("--ar wide a cat", "prompt.flag_value"),
        ("--size big a cat", "prompt.flag_value"),
        ("--format gif a cat", "prompt.flag_value"),
        ("n=abc a cat", "prompt.flag_value"),
    ],
)
def test_bad_flag_values(text: str, key: str) -> None:
    err = refused(text)
    assert err.key == key
    assert "Example: /img --" in err.user_message("en")
    assert "示例：/img --" in err.user_message("zh")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("16:9 4:3 a cat", "prompt.ratio_twice"),
        ("16:9 --ar 1:1 a cat", "prompt.ratio_twice"),
        ("auto 16:9 a cat", "prompt.ratio_twice"),
        ("1024x1024 16:9 a cat", "prompt.size_and_ratio"),
        ("--size 1024x1024 --ar 1:1 a cat", "prompt.size_and_ratio"),
        ("1024x1024 2K a cat", "prompt.size_and_tier"),
        ("2K 4K a cat", "prompt.option_twice"),
        ("low high a cat", "prompt.option_twice"),
        ("png webp a cat", "prompt.option_twice"),
        ("x2 n=3 a cat", "prompt.option_twice"),
        ("gpt-image-1 gpt-image-2 a cat", "prompt.option_twice"),
        ("0:5 a cat", "prompt.ratio_invalid"),
    ],
)
def test_contradictions_are_refused_not_guessed(text: str, key: str) -> None:
    err = refused(text)
    assert err.key == key
    assert "Example: /img" in err.user_message("en")
    assert "示例：/img" in err.user_message("zh")


def test_the_same_option_twice_is_harmless() -> None:
    assert parse("16:9 16:9 a cat").size == "1280x720"
    assert parse("high --q high a cat").quality == "high"


def test_other_ratios_are_computed() -> None:
    r = parse("2:1 2K a panorama")
    assert (r.ratio, r.size) == ("2:1", "2048x1024")
    r = parse("3:1 a panorama")
    assert r.size == "1440x480"
    r = parse("1:3 4K a tower")
    assert r.size == "1280x3840"
    assert parse("32:18 a cat").size == "1280x720"  # 16:9 in other words


def test_gpt_image_15_maps_and_tells() -> None:
    r = parse("gpt-image-1.5 16:9 2K a cat")
    assert r.size == "1536x1024"
    assert r.ratio == "16:9" and r.tier == "2K"
    rendered = [n.render("en") for n in r.notices]
    assert any("gpt-image-1.5 draws at most 1536x1024" in line for line in rendered)
    assert any("16:9" in line for line in rendered)
    assert all(n.render("zh") for n in r.notices)
    assert parse("gpt-image-1.5 9:16 a cat").size == "1024x1536"
    assert parse("gpt-image-1.5 1:1 a cat").notices == ()
    assert parse("gpt-image-1 a cat").size == "1024x1024"


def test_gpt_image_1_explicit_size_refused_before_any_call() -> None:
    err = refused("gpt-image-1 1280x720 a cat")
    assert err.key == "prompt.size_fixed"
    assert "1024x1536" in err.user_message("en")


def test_references() -> None:
    assert parse("a cat", has_references=True, reference_size=(1920, 1080)).size == "auto"
    assert parse("2K a cat", has_references=True, reference_size=(1920, 1080)).size == "2048x1152"
    assert parse("4K a cat", has_references=True, reference_size=(3000, 4000)).size == "2448x3264"
    assert parse("1:1 a cat", has_references=True, reference_size=(1920, 1080)).size == "1024x1024"
    assert parse("auto a cat", has_references=True).size == "auto"
    assert parse("a cat").size == "1024x1024"
    assert parse("a cat", PromptDefaults(tier="2K")).size == "2048x2048"
    unknown = parse("2K a cat", has_references=True)
    assert unknown.size == "auto"
    assert [n.key for n in unknown.notices] == ["size.tier_ignored"]


def test_force_tier() -> None:
    r = parse("16:9 a cat", force_tier="4K")
    assert (r.size, r.tier) == ("3840x2160", "4K")
    assert parse("16:9 1K a cat", force_tier="4k").size == "3840x2160"
    assert parse(
        "a cat", has_references=True, reference_size=(1024, 1536), force_tier="4K"
    ).size == ("2336x3504")
    assert parse("1536x1024 a cat", force_tier="4K").size == "3504x2336"
    with pytest.raises(ValueError):
        parse("a cat", force_tier="8K")


def test_request_is_immutable() -> None:
    r = parse("a cat")
    with pytest.raises(AttributeError):
        r.size = "auto"  # type: ignore[misc]


# --- fuzz ------------------------------------------------------------------------------------

VOCABULARY = [
    "16:9", "16：9", "5:1", "0:3", "7:5", "auto", "1k", "２Ｋ", "4K", "high", "低", "自动",
    "1024x1024", "1000x1000", "4000x4000", "1536×1024", "x2", "×3", "x0", "n=2", "n=x",
    "gpt-image-1", "gpt-image-1.5", "gpt-image-2", "gpt-image-9", "png", "jpg", "webp",
    "transparent", "opaque", "file", "--", "--ar", "--ar=3:2", "--q", "--n", "--m", "--size",
    "--format", "--tier", "--no", "--x=", "--ar＝16:9", "n＝2", "—ar", "–n", "/img", "/img@Bot",
    "cat", "猫", "", " ", "\n",
]  # fmt: skip


@st.composite
def commands(draw: st.DrawFn) -> str:
    words = draw(st.lists(st.sampled_from(VOCABULARY) | st.text(max_size=8), max_size=10))
    return " ".join(words)


@settings(max_examples=400, deadline=None)
@given(
    commands() | st.text(max_size=60),
    st.booleans(),
    st.none() | st.tuples(st.integers(-3, 10**6), st.integers(-3, 10**6)),
    st.none() | st.sampled_from(TIERS),
)
def test_fuzz_any_text_gives_a_request_or_a_prompt_error(
    text: str,
    has_references: bool,
    reference_size: tuple[int, int] | None,
    force_tier: str | None,
) -> None:
    try:
        r = parse_command(
            text,
            D,
            has_references=has_references,
            reference_size=reference_size,
            force_tier=force_tier,
        )
    except PromptError as err:
        assert err.key in MESSAGES
        for lang in ("en", "zh"):
            MESSAGES[err.key][lang].format(**err.params)  # every placeholder is filled
        return
    assert isinstance(r, ImageRequest)
    assert r.prompt and r.prompt == r.prompt.strip() and len(r.prompt) <= 32000
    assert 1 <= r.n <= D.max_n
    assert r.quality in ("low", "medium", "high", "auto")
    assert r.output_format in (None, "png", "jpeg", "webp")
    for notice in r.notices:
        assert notice.key in MESSAGES
        notice.render("zh")
    if r.size != "auto":
        w, h = r.dimensions or (0, 0)
        if r.model == "gpt-image-2":
            assert obeys_every_rule(w, h)
        else:
            assert (w, h) in FIXED_SIZES


SOURCE = {
    "model": "gpt-image-1.5",
    "quality": "low",
    "ratio": "16:9",
    "tier": "2K",
    "size": "1536x1024",
    "n": 2,
    "output_format": "png",
    "background": "transparent",
    "as_file": False,
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("make it night", "gpt-image-1.5 low 16:9 2K png transparent make it night"),
        ("high 1:1 at dusk", "gpt-image-1.5 2K png transparent high 1:1 at dusk"),
        ("1024x1024 gpt-image-1 a cat", "low png transparent 1024x1024 gpt-image-1 a cat"),
        ("x3 a cat", "gpt-image-1.5 low 16:9 2K png transparent x3 a cat"),
        ("16:9 3:2 a cat", "16:9 3:2 a cat"),  # malformed: refused as usual later
    ],
)
def test_a_refinement_keeps_the_options_it_does_not_name(text: str, expected: str) -> None:
    assert refine_command(text, SOURCE, PromptDefaults()) == expected
    if expected != text:
        request = parse_command(expected, PromptDefaults())
        assert request.n == (3 if "x3" in text else 1)  # the count is never inherited
