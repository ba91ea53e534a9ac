"""Pricing: exact credits from usage, estimates before a call, display."""

from __future__ import annotations

import pytest

from core.config import Settings
from core.pricing import (
    FIXED_OUTPUT_TOKENS,
    PriceTable,
    Usage,
    estimate_credits,
    estimate_input_image_tokens,
    estimate_output_tokens,
    estimate_text_tokens,
    format_credits,
    max_output_tokens,
    usage_problem,
    whole_credits,
)
from core.prompt import ImageRequest, PromptDefaults, parse_command
from core.sizes import ratio_size

TABLE = PriceTable()
# One credit-per-token factor of the seed: USD/M × 7.1 CNY/USD × 10,000 credits/CNY / 1e6.
K = 7.1 * 10_000 / 1_000_000

# The response shapes of the facts file.
USAGE_SEED = {
    "input_tokens": 6,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 6},
    "output_tokens": 275,
    "total_tokens": 281,
}
USAGE_WITH_OUTPUT_DETAILS = {
    "input_tokens": 250,
    "input_tokens_details": {"image_tokens": 194, "text_tokens": 56},
    "output_tokens": 4170,
    "output_tokens_details": {"image_tokens": 4160, "text_tokens": 10},
    "total_tokens": 4420,
}


def request(text: str, **kw: object) -> ImageRequest:
    return parse_command(text, PromptDefaults(max_n=10), **kw)  # type: ignore[arg-type]


# --- Usage.from_api ---------------------------------------------------------------------------


def test_usage_from_the_seed_shape() -> None:
    usage = Usage.from_api(USAGE_SEED)
    assert usage == Usage(
        text_input_tokens=6,
        image_input_tokens=0,
        image_output_tokens=275,
        text_output_tokens=0,
        total_tokens=281,
    )


def test_usage_with_output_details() -> None:
    usage = Usage.from_api(USAGE_WITH_OUTPUT_DETAILS)
    assert usage == Usage(56, 194, 4160, 10, 4420)
    assert usage is not None and usage.to_dict()["text_output_tokens"] == 10


def test_usage_without_input_details_counts_all_input_as_text() -> None:
    usage = Usage.from_api({"input_tokens": 9, "output_tokens": 272})
    assert usage == Usage(9, 0, 272, 0, 281)


@pytest.mark.parametrize("bad", [None, [], "usage"])
def test_no_usage_object_is_none(bad: object) -> None:
    assert Usage.from_api(bad) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "raw",
    [
        {"input_tokens": "many", "output_tokens": 272},
        {"input_tokens": 9, "output_tokens": -272},
        {"input_tokens": 9, "output_tokens": float("inf")},
        {"input_tokens": 9, "output_tokens": 2.5},
        {"input_tokens": 9, "output_tokens": [1]},
        {"input_tokens": 9, "output_tokens": True},
    ],
)
def test_usage_that_is_no_whole_count_is_kept_but_invalid(raw: dict[str, object]) -> None:
    usage = Usage.from_api(raw)
    assert usage is not None and not usage.is_valid()
    assert usage_problem(usage, "gpt-image-2", 1) == "a token count is not a whole number >= 0"


def test_usage_beyond_what_the_model_can_produce_is_a_problem() -> None:
    plausible = Usage.from_api({"input_tokens": 50, "output_tokens": 8 * 272})  # 8x a low 1K
    assert plausible is not None and usage_problem(plausible, "gpt-image-2", 1) is None
    absurd = Usage.from_api({"input_tokens": 50, "output_tokens": 10**12})
    assert absurd is not None and absurd.is_valid()
    assert usage_problem(absurd, "gpt-image-2", 1) == "more output tokens than the model can produce"
    assert usage_problem(absurd, "gpt-image-1", 10) is not None
    assert max_output_tokens("gpt-image-2", 2) == 2 * max_output_tokens("gpt-image-2", 1)
    huge_input = Usage(text_input_tokens=2_000_000)
    assert usage_problem(huge_input, "gpt-image-2", 1) == "more input tokens than any request can hold"


# --- exact credits ----------------------------------------------------------------------------


def test_exact_credits_follow_the_seed_formula() -> None:
    usage = Usage.from_api(USAGE_SEED)
    assert usage is not None
    expected = (6 * 5 + 0 * 10 + 275 * 40) * 7.1 * 10_000 / 1_000_000
    assert TABLE.credits(usage, "gpt-image-2") == pytest.approx(expected)
    assert expected == pytest.approx(783.13)


def test_exact_credits_price_text_output_at_the_image_output_rate() -> None:
    usage = Usage.from_api(USAGE_WITH_OUTPUT_DETAILS)
    assert usage is not None
    expected = (56 * 5 + 194 * 10 + (4160 + 10) * 40) * K
    assert TABLE.credits(usage, "gpt-image-1") == pytest.approx(expected)


def test_price_table_from_settings_with_a_per_model_price() -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]  # a developer's .env must not change this
        price_text_input=4,
        price_image_input=8,
        price_image_output=30,
        cny_per_usd=7.0,
        credits_per_cny=1000,
        model_prices={"gpt-image-1.5": (5, 8, 32)},
    )
    table = PriceTable.from_settings(settings)
    usage = Usage(text_input_tokens=100, image_input_tokens=200, image_output_tokens=1000)
    factor = 7.0 * 1000 / 1_000_000
    assert table.credits(usage, "gpt-image-2") == pytest.approx((400 + 1600 + 30_000) * factor)
    assert table.credits(usage, "gpt-image-1.5") == pytest.approx((500 + 1600 + 32_000) * factor)
    assert table.prices("gpt-image-1.5") == (5.0, 8.0, 32.0)
    assert table.prices("gpt-image-1") == (4.0, 8.0, 30.0)


def test_default_settings_give_the_seed_prices() -> None:
    table = PriceTable.from_settings(Settings(_env_file=None))  # type: ignore[call-arg]
    assert table == PriceTable()
    hash(table)  # frozen and hashable


# --- output tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-image-1", "gpt-image-1.5"])
def test_output_tokens_of_the_published_table(model: str) -> None:
    assert estimate_output_tokens(model, 1024, 1024, "low") == 272
    assert estimate_output_tokens(model, 1024, 1024, "medium") == 1056
    assert estimate_output_tokens(model, 1024, 1024, "high") == 4160
    assert estimate_output_tokens(model, 1024, 1536, "low") == 408
    assert estimate_output_tokens(model, 1024, 1536, "medium") == 1584
    assert estimate_output_tokens(model, 1024, 1536, "high") == 6240
    assert estimate_output_tokens(model, 1536, 1024, "low") == 400
    assert estimate_output_tokens(model, 1536, 1024, "medium") == 1568
    assert estimate_output_tokens(model, 1536, 1024, "high") == 6208
    assert estimate_output_tokens(model, 1536, 1024, "auto") == 6208


def test_gpt_image_2_formula_reproduces_openai_calculator() -> None:
    assert estimate_output_tokens("gpt-image-2", 1024, 1024, "high") == 7024
    assert estimate_output_tokens("gpt-image-2", 1536, 1024, "high") == 5488
    assert estimate_output_tokens("gpt-image-2", 1024, 1024, "auto") == 7024
    low = estimate_output_tokens("gpt-image-2", 1024, 1024, "low")
    medium = estimate_output_tokens("gpt-image-2", 1024, 1024, "medium")
    assert 0 < low < medium < 7024
    # Bigger images cost more at the same quality.
    assert estimate_output_tokens("gpt-image-2", 3840, 2160, "high") > 7024


# --- estimates --------------------------------------------------------------------------------


def test_seed_check_low_and_medium() -> None:
    low = estimate_credits(request("gpt-image-1 1:1 low a cat"), TABLE)
    medium = estimate_credits(request("gpt-image-1 1:1 medium a cat"), TABLE)
    assert whole_credits(low) == 773
    assert low == pytest.approx(800, rel=0.05)
    assert medium == pytest.approx(3000, rel=0.01)


def test_estimate_is_output_times_n_plus_prompt() -> None:
    r = request("gpt-image-2 16:9 2K high x3 a white siamese cat")
    out = estimate_output_tokens("gpt-image-2", 2048, 1152, "high")
    text_in = estimate_text_tokens("a white siamese cat")
    assert estimate_credits(r, TABLE) == pytest.approx((out * 3 * 40 + text_in * 5) * K)


def test_prompt_text_estimate_errs_high() -> None:
    assert estimate_text_tokens("a white siamese cat") >= 5  # ~5 real tokens
    assert estimate_text_tokens("一只白色暹罗猫") >= 7  # about one per character


def test_auto_size_on_fixed_models_is_the_dearest_of_three() -> None:
    r = request("gpt-image-1 high a cat", has_references=True)
    assert r.size == "auto"
    expected_out = max(FIXED_OUTPUT_TOKENS[s]["high"] for s in FIXED_OUTPUT_TOKENS)
    assert expected_out == 6240
    assert estimate_credits(r, TABLE) == pytest.approx(
        (estimate_text_tokens("a cat") * 5 + expected_out * 40) * K
    )


def test_auto_size_on_gpt_image_2_considers_the_reference_aspect() -> None:
    r = request("high a cat", has_references=True)
    refs = [(3000, 1000)]
    candidates = [(1024, 1024), (1536, 1024), (1024, 1536), ratio_size(3000, 1000, "1K")]
    out = max(estimate_output_tokens("gpt-image-2", w, h, "high") for w, h in candidates)
    text_in = estimate_text_tokens("a cat") + 32
    image_in = estimate_input_image_tokens("gpt-image-2", 3000, 1000)
    assert estimate_credits(r, TABLE, reference_sizes=refs) == pytest.approx(
        (text_in * 5 + image_in * 10 + out * 40) * K
    )
    no_refs = request("auto high a cat")
    assert estimate_credits(no_refs, TABLE) == pytest.approx(
        (estimate_text_tokens("a cat") * 5 + 7024 * 40) * K
    )


def test_reference_images_add_input() -> None:
    r = request("gpt-image-1 1:1 low a cat")
    bare = estimate_credits(r, TABLE)
    one = estimate_credits(r, TABLE, reference_sizes=[(1024, 1024)])
    two = estimate_credits(r, TABLE, reference_sizes=[(1024, 1024), (4000, 3000)])
    assert bare < one < two
    # gpt-image-1 billed 194 image tokens for a 1024x1024 input (one 512-px tile).
    assert estimate_input_image_tokens("gpt-image-1", 1024, 1024) == 194
    assert one - bare == pytest.approx((194 * 10 + 32 * 5) * K)


def test_reference_estimate_for_gpt_image_2_is_not_below_gpt_image_1() -> None:
    for w, h in [(1024, 1024), (100, 100), (4000, 1000), (3000, 4000), (0, 0), (513, 2049)]:
        assert estimate_input_image_tokens("gpt-image-2", w, h) >= estimate_input_image_tokens(
            "gpt-image-1", w, h
        )


# --- display ----------------------------------------------------------------------------------


def test_format_credits_in_both_languages() -> None:
    assert format_credits(773.19, TABLE, "en") == "773 credits ≈ ¥0.077"
    assert format_credits(773.19, TABLE, "zh-hans") == "773 积分 ≈ ¥0.077"
    assert format_credits(2999.75, TABLE, "en") == "3,000 credits ≈ ¥0.300"
    assert format_credits(0.5, TABLE, "en") == "1 credits ≈ ¥0.000"
    assert whole_credits(772.5) == 773
    assert whole_credits(772.49) == 772
