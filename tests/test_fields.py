"""The request fields beyond size and quality: output_compression, moderation, input_fidelity.

Read from the command language (and kept by a refinement where they still apply), checked
against the format and the model with a clear refusal in both languages, and sent to the
API only where it takes them (fidelity only on edits): the fake API refuses anything else,
as the real one does.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from core.config import Settings
from core.errors import PromptError
from core.images import ImageClient, prepare_references
from core.messages import text
from core.prompt import PromptDefaults, parse_command, refine_command
from tests.fake_api import FakeImageAPI
from tests.test_streaming import png

DEFAULTS = PromptDefaults()


def refused(command: str, *, refs: bool = False) -> PromptError:
    with pytest.raises(PromptError) as caught:
        parse_command(command, DEFAULTS, has_references=refs)
    return caught.value


def test_fields_are_read_in_every_spelling() -> None:
    request = parse_command("jpeg --compression 80 --moderation low a cat", DEFAULTS)
    assert (request.output_format, request.output_compression, request.moderation) == (
        "jpeg", 80, "low"
    )
    same = parse_command("webp compression=0 moderation=auto a cat", DEFAULTS)
    assert (same.output_compression, same.moderation) == (0, "auto")
    tail = parse_command("webp a cat --compression 55 --moderation low", DEFAULTS)
    assert (tail.prompt, tail.output_compression, tail.moderation) == ("a cat", 55, "low")
    edit = parse_command("gpt-image-1.5 --fidelity high make it winter", DEFAULTS,
                         has_references=True)
    assert edit.input_fidelity == "high"
    plain = parse_command("a cat", DEFAULTS)
    assert (plain.output_compression, plain.moderation, plain.input_fidelity) == (None,) * 3


@pytest.mark.parametrize(
    ("command", "refs", "key"),
    [
        ("--compression 80 a cat", False, "prompt.compression_format"),
        ("png --compression 80 a cat", False, "prompt.compression_format"),
        ("jpeg --compression 101 a cat", False, "prompt.compression_range"),
        ("jpeg --compression -3 a cat", False, "prompt.compression_range"),
        ("jpeg --compression high a cat", False, "prompt.compression_range"),
        ("--moderation none a cat", False, "prompt.flag_value"),
        ("--fidelity high make it winter", True, "prompt.fidelity_model"),  # gpt-image-2
        ("gpt-image-1 --fidelity medium make it winter", True, "prompt.flag_value"),
        ("gpt-image-1.5 --fidelity high a cat", False, "prompt.fidelity_needs_reference"),
        ("jpeg --compression 80 --compression 70 a cat", False, "prompt.option_twice"),
    ],
)
def test_what_cannot_be_sent_is_refused_clearly_in_both_languages(
    command: str, refs: bool, key: str
) -> None:
    err = refused(command, refs=refs)
    assert err.key == key
    english, chinese = err.user_message("en"), err.user_message("zh")
    assert english != chinese and "Example" in english and "示例" in chinese
    assert english != text("en", "error.internal")


def test_a_refinement_keeps_the_fields_where_they_still_apply() -> None:
    source = {
        "model": "gpt-image-1.5", "output_format": "webp", "output_compression": 60,
        "moderation": "low", "input_fidelity": "high",
    }
    kept = refine_command("make it night", source, DEFAULTS)
    request = parse_command(kept, DEFAULTS, has_references=True)
    assert (request.output_compression, request.moderation, request.input_fidelity) == (
        60, "low", "high"
    )
    # A png or a gpt-image-2 refinement drops what would now be refused.
    changed = refine_command("gpt-image-2 png make it night", source, DEFAULTS)
    request = parse_command(changed, DEFAULTS, has_references=True)
    assert (request.output_compression, request.input_fidelity, request.moderation) == (
        None, None, "low"
    )
    # Named again: the new value wins.
    renamed = refine_command("--compression 90 make it night", source, DEFAULTS)
    assert parse_command(renamed, DEFAULTS, has_references=True).output_compression == 90


async def test_the_client_sends_them_where_the_api_takes_them(
    fake_api: FakeImageAPI, settings: Callable[..., Settings], http: httpx.AsyncClient
) -> None:
    client = ImageClient(http, settings())
    generation = parse_command("jpeg --compression 70 --moderation low a cat", DEFAULTS)
    result = await client.draw(generation)
    assert result.images[0].mime == "image/jpeg"
    sent = fake_api.api_requests[-1].json
    assert sent is not None
    assert (sent["output_compression"], sent["moderation"]) == (70, "low")
    assert "input_fidelity" not in sent

    refs = await prepare_references([(png((1024, 1024)), "cat.png")], max_bytes=10_000_000)
    edit = parse_command("gpt-image-1.5 --fidelity high webp compression=40 make it winter",
                         DEFAULTS, has_references=True)
    await client.draw(edit, refs)
    fields = fake_api.api_requests[-1].fields
    assert (fields["input_fidelity"], fields["output_compression"]) == ("high", "40")
    assert fields["output_format"] == "webp"
