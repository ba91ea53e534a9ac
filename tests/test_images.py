"""The image API client against the fake image API: modes, multipart, faults, retries, secrets."""

from __future__ import annotations

import email.utils
import io
import logging
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from PIL import Image

from core.config import Settings
from core.errors import (
    ContentPolicyError,
    UpstreamAuthError,
    UpstreamBalanceError,
    UpstreamCorruptImage,
    UpstreamError,
    UpstreamMalformed,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from core.images import (
    ImageClient,
    ReferenceImage,
    api_root,
    download_reference,
    prepare_references,
)
from core.messages import MESSAGES, text
from core.prompt import ImageRequest
from tests.conftest import TEST_KEY, TLS
from tests.fake_api import FakeImageAPI

SettingsFactory = Callable[..., Settings]


class Sleeps:
    """An injectable sleep that records the delays and returns at once."""

    def __init__(self, on_sleep: Callable[[], None] | None = None) -> None:
        self.delays: list[float] = []
        self._on_sleep = on_sleep

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self._on_sleep is not None:
            self._on_sleep()


def request(**changes: Any) -> ImageRequest:
    values: dict[str, Any] = {
        "prompt": "a white siamese cat",
        "model": "gpt-image-2",
        "size": "1024x1024",
        "quality": "low",
        "n": 1,
    }
    values.update(changes)
    return ImageRequest(**values)


def png_bytes(
    size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (10, 20, 30)
) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def jpeg_bytes(size: tuple[int, int] = (80, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 100, 50)).save(out, format="JPEG")
    return out.getvalue()


def decoded(data: bytes) -> tuple[str, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.format or "", im.size


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- generation and edits in every mode -------------------------------------------------------


async def test_generation_posts_json_and_returns_real_images_of_the_asked_size(
    fake_api: FakeImageAPI, settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    client = ImageClient(http, settings())
    result = await client.draw(request(size="1280x720", n=2, output_format="jpeg"))

    assert len(result.images) == 2
    for image in result.images:
        assert (image.mime, image.width, image.height) == ("image/jpeg", 1280, 720)
        assert decoded(image.data) == ("JPEG", (1280, 720))
    (sent,) = fake_api.api_requests
    assert sent.path == "/v1/images/generations"
    assert sent.authorized
    assert sent.json == {
        "model": "gpt-image-2",
        "prompt": "a white siamese cat",
        "n": 2,
        "size": "1280x720",
        "quality": "low",
        "output_format": "jpeg",
    }
    # gpt-image-2 low 1280x720 = 106 tokens per image; 4 words of prompt.
    assert result.usage is not None
    assert result.usage.image_output_tokens == 212
    assert result.usage.text_input_tokens == 4
    assert result.revised_prompt is None
    assert result.elapsed >= 0


async def test_legacy_model_usage_follows_the_published_table(
    settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    client = ImageClient(http, settings())
    result = await client.draw(request(model="gpt-image-1", size="1024x1536", quality="high"))
    assert (result.images[0].width, result.images[0].height) == (1024, 1536)
    assert result.usage is not None and result.usage.image_output_tokens == 6240


MODES = [
    ("b64", "none"),
    ("b64", "b64_json"),
    ("b64_prefixed", "b64_json"),
    ("b64_prefixed", "none"),
    ("url", "url"),
    ("url", "none"),
    ("official", "none"),
]


@pytest.mark.parametrize(("mode", "response_format"), MODES)
async def test_every_answer_mode_gives_images_for_generation_and_edit(
    fake_api: FakeImageAPI,
    settings: SettingsFactory,
    http: httpx.AsyncClient,
    mode: str,
    response_format: str,
) -> None:
    fake_api.mode = mode
    client = ImageClient(http, settings(response_format=response_format))
    refs = await prepare_references([(png_bytes((96, 64)), "ref.png")], max_bytes=10**6)

    drawn = await client.draw(request(size="1536x1024", output_format="webp"))
    edited = await client.draw(request(size="auto", quality="medium"), refs)

    assert [(i.mime, i.width, i.height) for i in drawn.images] == [("image/webp", 1536, 1024)]
    assert decoded(drawn.images[0].data) == ("WEBP", (1536, 1024))
    # auto with a reference follows its 3:2 aspect, snapped to multiples of 16.
    (image,) = edited.images
    assert image.mime == "image/png" and image.width % 16 == 0 and image.height % 16 == 0
    assert abs(image.width / image.height - 1.5) < 0.02
    assert edited.usage is not None and edited.usage.image_input_tokens > 0
    generation, edit = fake_api.api_requests
    assert ("response_format" in generation.json) is (response_format != "none")
    assert ("response_format" in edit.fields) is (response_format != "none")
    downloads = [r for r in fake_api.requests if r.method == "GET"]
    expects_url = response_format == "url" or (mode == "url" and response_format == "none")
    assert len(downloads) == (2 if expects_url else 0)
    assert all(not r.authorized for r in downloads)  # the key never goes to the file host


async def test_slow_answers_within_the_timeout_still_arrive(
    fake_api: FakeImageAPI, settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    fake_api.delay = 0.05
    fake_api.inject("slow", seconds=0.1)
    client = ImageClient(http, settings())
    assert len((await client.draw(request())).images) == 1
    assert len((await client.draw(request())).images) == 1


def test_fake_prefixed_mode_really_sends_the_data_prefix(fake_api: FakeImageAPI) -> None:
    fake_api.mode = "b64_prefixed"
    resp = httpx.post(
        f"{fake_api.base_url}/v1/images/generations",
        json={"model": "gpt-image-2", "prompt": "x", "size": "1024x1024"},
        headers={"Authorization": f"Bearer {TEST_KEY}"},
        verify=TLS,
    )
    assert resp.json()["data"][0]["b64_json"].startswith("data:image/png;base64,")


async def test_edit_sends_each_reference_as_an_image_array_part(
    fake_api: FakeImageAPI, settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    refs = await prepare_references(
        [(png_bytes(), "a.png"), (jpeg_bytes(), "b.jpeg")], max_bytes=10**6
    )
    client = ImageClient(http, settings())
    await client.draw(request(size="1024x1024", n=1), refs)
    await client.draw(request(background="transparent", output_format="webp"), refs)

    plain, transparent = fake_api.api_requests
    assert plain.path == "/v1/images/edits"
    assert [(p.name, p.filename, p.content_type, p.data) for p in plain.files] == [
        ("image[]", "a.png", "image/png", refs[0].data),
        ("image[]", "b.jpg", "image/jpeg", refs[1].data),
    ]
    assert plain.fields == {
        "model": "gpt-image-2",
        "prompt": "a white siamese cat",
        "n": "1",
        "size": "1024x1024",
        "quality": "low",
    }
    assert transparent.fields["background"] == "transparent"
    assert transparent.fields["output_format"] == "webp"


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
async def test_base_url_works_with_or_without_v1(
    fake_api: FakeImageAPI, settings: SettingsFactory, http: httpx.AsyncClient, suffix: str
) -> None:
    client = ImageClient(http, settings(openai_base_url=fake_api.base_url + suffix))
    result = await client.draw(request())
    assert len(result.images) == 1
    assert fake_api.api_requests[0].path == "/v1/images/generations"


async def test_a_wrong_base_path_is_a_configuration_error(
    fake_api: FakeImageAPI, settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    client = ImageClient(http, settings(openai_base_url=fake_api.base_url + "/api"))
    with pytest.raises(UpstreamAuthError) as caught:
        await client.draw(request())
    assert caught.value.key == "upstream.misconfigured"
    assert "OPENAI_BASE_URL" in caught.value.user_message("en")
    assert caught.value.status == 404


async def test_official_api_refusing_response_format_names_the_setting(
    fake_api: FakeImageAPI, settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    fake_api.mode = "official"
    client = ImageClient(http, settings(response_format="b64_json"))
    with pytest.raises(UpstreamAuthError) as caught:
        await client.draw(request())
    err = caught.value
    assert err.key == "upstream.unknown_parameter"
    assert "response_format" in err.user_message("en")
    assert "RESPONSE_FORMAT=none" in err.user_message("en")
    assert len(fake_api.api_requests) == 1


@pytest.mark.parametrize(
    ("data", "filename", "mime", "code"),
    [
        (b"GIF89a" + bytes(40), "a.gif", "image/gif", "unsupported_file_mimetype"),
        (png_bytes(), "a.png", "application/octet-stream", "unsupported_file_mimetype"),
    ],
)
async def test_parts_the_api_refuses_are_rejected_not_retried(
    fake_api: FakeImageAPI,
    settings: SettingsFactory,
    http: httpx.AsyncClient,
    data: bytes,
    filename: str,
    mime: str,
    code: str,
) -> None:
    client = ImageClient(http, settings())
    bad = ReferenceImage(data, filename, mime, 8, 8)
    with pytest.raises(UpstreamRejected) as caught:
        await client.draw(request(), [bad])
    assert f"code={code}" in caught.value.detail
    assert "mimetype" in caught.value.user_message("en")
    assert len(fake_api.api_requests) == 1


async def test_a_gif_sent_as_png_is_refused_as_an_invalid_image_file(
    fake_api: FakeImageAPI, settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    out = io.BytesIO()
    Image.new("P", (8, 8)).save(out, format="GIF")
    client = ImageClient(http, settings())
    with pytest.raises(UpstreamRejected) as caught:
        await client.draw(request(), [ReferenceImage(out.getvalue(), "a.png", "image/png", 8, 8)])
    assert "code=invalid_image_file" in caught.value.detail


# --- faults: each its own class and message -----------------------------------------------------

FAULTS: list[tuple[str, dict[str, Any], type[UpstreamError], str, int]] = [
    ("unauthorized", {}, UpstreamAuthError, "upstream.auth", 1),
    ("forbidden", {}, UpstreamAuthError, "upstream.auth", 1),
    ("not_found", {}, UpstreamAuthError, "upstream.misconfigured", 1),
    ("unknown_parameter", {}, UpstreamAuthError, "upstream.unknown_parameter", 1),
    ("insufficient_balance", {}, UpstreamBalanceError, "upstream.balance", 1),
    ("insufficient_quota", {}, UpstreamBalanceError, "upstream.balance", 1),
    (
        "status",
        {"status": 403, "message": "用户额度不足"},
        UpstreamBalanceError,
        "upstream.balance",
        1,
    ),
    ("moderation_blocked", {}, ContentPolicyError, "upstream.moderation", 1),
    ("invalid_value", {}, UpstreamRejected, "upstream.rejected", 1),
    ("server_error", {}, UpstreamUnavailable, "upstream.unavailable", 1),
    ("rate_limit", {"times": 3}, UpstreamRateLimited, "upstream.rate_limited", 3),
    ("rate_limit", {"times": 3, "retry_after": 0}, UpstreamRateLimited, "upstream.rate_limited", 3),
    ("bad_gateway", {"times": 3}, UpstreamUnavailable, "upstream.unavailable", 3),
    ("unavailable", {"times": 3}, UpstreamUnavailable, "upstream.unavailable", 3),
    ("gateway_timeout", {"times": 3}, UpstreamUnavailable, "upstream.unavailable", 3),
    ("hang", {}, UpstreamTimeout, "upstream.timeout", 1),
    ("trickle", {"interval": 0.05, "chunk": 8}, UpstreamTimeout, "upstream.timeout", 1),
    ("drop", {}, UpstreamUnavailable, "upstream.unavailable", 1),
    ("truncated_json", {}, UpstreamMalformed, "upstream.malformed", 1),
    ("truncated_body", {}, UpstreamMalformed, "upstream.malformed", 1),
    ("invalid_json", {}, UpstreamMalformed, "upstream.malformed", 1),
    ("empty_data", {}, UpstreamMalformed, "upstream.no_image", 1),
    ("bad_base64", {}, UpstreamMalformed, "upstream.malformed", 1),
    ("not_image", {}, UpstreamMalformed, "upstream.malformed", 1),
    ("truncated", {}, UpstreamCorruptImage, "upstream.corrupt_image", 1),
    ("url_404", {}, UpstreamMalformed, "upstream.download_failed", 1),
    ("url_too_large", {"size": 3_000_000}, UpstreamMalformed, "upstream.download_failed", 1),
    ("url_not_image", {}, UpstreamMalformed, "upstream.download_failed", 1),
    ("url_bad_scheme", {}, UpstreamMalformed, "upstream.download_failed", 1),
]


@pytest.mark.parametrize(
    ("fault", "params", "error_class", "key", "calls"),
    FAULTS,
    ids=[f"{f[0]}-{i}" for i, f in enumerate(FAULTS)],
)
async def test_each_fault_maps_to_its_error_and_message(
    fake_api: FakeImageAPI,
    settings: SettingsFactory,
    http: httpx.AsyncClient,
    fault: str,
    params: dict[str, Any],
    error_class: type[UpstreamError],
    key: str,
    calls: int,
) -> None:
    params = dict(params)
    fake_api.inject(fault, times=params.pop("times", 1), **params)
    # Short timeouts only where the fault waits them out; the rest keep room for a busy CI.
    timeouts = (
        {"request_timeout": 1.0, "connect_timeout": 2.0} if fault in ("hang", "trickle") else {}
    )
    sleeps = Sleeps()
    client = ImageClient(http, settings(max_download_bytes=1_000_000, **timeouts), sleep=sleeps)

    with pytest.raises(UpstreamError) as caught:
        await client.draw(request())

    err = caught.value
    assert type(err) is error_class
    assert err.key == key
    assert len(fake_api.api_requests) == calls
    assert len(sleeps.delays) == calls - 1
    for lang in ("en", "zh"):
        message = err.user_message(lang)
        assert message and "{" not in message
    assert err.detail  # the raw story is kept for the log
    if fault in ("empty_data", "bad_base64", "not_image", "truncated") or fault.startswith("url_"):
        # The answer said what it billed: the ledger can charge exactly.
        assert err.usage is not None and err.usage.image_output_tokens == 196  # 1024² low
    else:
        assert err.usage is None


def test_every_upstream_and_reference_message_is_distinct() -> None:
    keys = [k for k in MESSAGES if k.startswith(("upstream.", "ref."))]
    assert len(keys) >= 20
    for lang in ("en", "zh"):
        texts = [text(lang, k) for k in keys]
        assert len(set(texts)) == len(texts)


async def test_a_200_answer_carrying_an_error_object_is_classified(
    fake_api: FakeImageAPI, settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    fake_api.inject("status", status=200, code="moderation_blocked", message="blocked")
    client = ImageClient(http, settings())
    with pytest.raises(ContentPolicyError):
        await client.draw(request())


# --- retries -----------------------------------------------------------------------------------


async def test_429_is_retried_with_backoff_then_succeeds(
    fake_api: FakeImageAPI, settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    fake_api.inject("rate_limit")
    sleeps = Sleeps()
    client = ImageClient(http, settings(), sleep=sleeps)
    result = await client.draw(request())
    assert len(result.images) == 1
    assert len(fake_api.api_requests) == 2
    assert len(sleeps.delays) == 1 and 0.375 <= sleeps.delays[0] <= 0.5


async def test_retry_after_seconds_is_honoured(
    fake_api: FakeImageAPI, settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    fake_api.inject("rate_limit", retry_after=3)
    sleeps = Sleeps()
    client = ImageClient(http, settings(), sleep=sleeps)
    await client.draw(request())
    assert sleeps.delays == [3.0]


async def test_retry_after_as_a_date_is_honoured(
    fake_api: FakeImageAPI, settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    fake_api.inject("rate_limit", headers={"Retry-After": when})
    sleeps = Sleeps()
    client = ImageClient(http, settings(), sleep=sleeps)
    await client.draw(request())
    assert len(sleeps.delays) == 1 and 20 <= sleeps.delays[0] <= 31


async def test_retry_after_above_the_cap_fails_at_once(
    fake_api: FakeImageAPI, settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    fake_api.inject("rate_limit", retry_after=3600)
    sleeps = Sleeps()
    client = ImageClient(http, settings(retry_after_cap=120), sleep=sleeps)
    with pytest.raises(UpstreamRateLimited):
        await client.draw(request())
    assert sleeps.delays == []
    assert len(fake_api.api_requests) == 1


async def test_backoff_doubles_up_to_eight_seconds(
    fake_api: FakeImageAPI, settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    fake_api.inject("unavailable", times=6)
    sleeps = Sleeps()
    client = ImageClient(http, settings(max_retries=6), sleep=sleeps, jitter=lambda: 0.0)
    result = await client.draw(request())
    assert len(result.images) == 1
    assert sleeps.delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert len(fake_api.api_requests) == 7


async def test_503_is_retried_then_succeeds(
    fake_api: FakeImageAPI, settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    fake_api.inject("unavailable", times=2)
    sleeps = Sleeps()
    client = ImageClient(http, settings(max_retries=2), sleep=sleeps)
    assert len((await client.draw(request())).images) == 1
    assert len(fake_api.api_requests) == 3


async def test_retry_after_on_503_is_honoured(
    fake_api: FakeImageAPI, settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    fake_api.inject("unavailable", retry_after=2)
    sleeps = Sleeps()
    await ImageClient(http, settings(), sleep=sleeps).draw(request())
    assert sleeps.delays == [2.0]


async def test_500_is_not_retried(
    fake_api: FakeImageAPI, settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    fake_api.inject("server_error")
    sleeps = Sleeps()
    client = ImageClient(http, settings(max_retries=5), sleep=sleeps)
    with pytest.raises(UpstreamUnavailable):
        await client.draw(request())
    assert len(fake_api.api_requests) == 1 and sleeps.delays == []


async def test_read_timeout_is_not_retried_by_default(
    fake_api: FakeImageAPI, settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    fake_api.inject("hang")
    sleeps = Sleeps()
    client = ImageClient(http, settings(request_timeout=0.3, max_retries=5), sleep=sleeps)
    with pytest.raises(UpstreamTimeout) as caught:
        await client.draw(request())
    assert len(fake_api.api_requests) == 1 and sleeps.delays == []
    assert "0.3" in caught.value.user_message("en")


async def test_read_timeout_is_retried_when_the_operator_allows_it(
    fake_api: FakeImageAPI, settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    fake_api.inject("hang")
    sleeps = Sleeps()
    client = ImageClient(http, settings(request_timeout=0.3, retry_read_timeout=True), sleep=sleeps)
    assert len((await client.draw(request())).images) == 1
    assert len(fake_api.api_requests) == 2


async def test_connection_refused_is_retried_until_the_server_is_up(
    settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    port = free_port()
    late = FakeImageAPI(key=TEST_KEY, port=port)
    sleeps = Sleeps(on_sleep=late.start)  # the server comes up while the client waits
    client = ImageClient(http, settings(openai_base_url=f"http://127.0.0.1:{port}"), sleep=sleeps)
    try:
        result = await client.draw(request())
    finally:
        late.stop()
    assert len(result.images) == 1
    assert len(sleeps.delays) == 1
    assert len(late.api_requests) == 1


async def test_connection_refused_every_time_is_unavailable(
    settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    sleeps = Sleeps()
    url = f"http://127.0.0.1:{free_port()}"
    client = ImageClient(http, settings(openai_base_url=url, max_retries=3), sleep=sleeps)
    with pytest.raises(UpstreamUnavailable) as caught:
        await client.draw(request())
    assert len(sleeps.delays) == 3
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


# --- the key never leaks -------------------------------------------------------------------------


async def test_the_api_key_appears_in_no_error_repr_or_log(
    fake_api: FakeImageAPI,
    settings: SettingsFactory,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[UpstreamError] = []
    faults: list[tuple[str, dict[str, Any]]] = [
        ("unauthorized", {"echo_key": True}),
        ("invalid_value", {"echo_key": True}),
        ("rate_limit", {"times": 3, "echo_key": True}),
        ("server_error", {}),
        ("hang", {}),
        ("bad_base64", {}),
        ("url_404", {}),
        ("drop", {}),
    ]
    client = ImageClient(http, settings(request_timeout=0.3), sleep=Sleeps())
    for fault, params in faults:
        params = dict(params)
        fake_api.inject(fault, times=params.pop("times", 1), **params)
        with pytest.raises(UpstreamError) as caught:
            await client.draw(request())
        errors.append(caught.value)
    refused = ImageClient(
        http, settings(openai_base_url=f"http://127.0.0.1:{free_port()}"), sleep=Sleeps()
    )
    with pytest.raises(UpstreamError) as caught:
        await refused.draw(request())
    errors.append(caught.value)

    # The echoing proxy did send the key back: redaction, not luck, keeps it out.
    assert "***" in errors[0].detail
    for err in errors:
        shown = [
            str(err),
            repr(err),
            err.detail,
            err.user_message("en"),
            err.user_message("zh"),
            "".join(traceback.format_exception(err)),
        ]
        for item in shown:
            assert TEST_KEY not in item
    assert "retrying" in caplog.text
    assert TEST_KEY not in caplog.text
    assert TEST_KEY not in repr(client)
    assert TEST_KEY not in repr(settings())


async def test_a_pasted_key_with_a_trailing_newline_still_works(
    fake_api: FakeImageAPI, settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    client = ImageClient(http, settings(openai_api_key=TEST_KEY + "\n"))
    assert len((await client.draw(request())).images) == 1
    assert fake_api.api_requests[0].authorized


async def test_a_key_httpx_would_refuse_fails_before_any_call_without_showing_it(
    fake_api: FakeImageAPI, settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    bad_key = TEST_KEY + "\u00e9x"
    client = ImageClient(http, settings(openai_api_key=bad_key))
    with pytest.raises(UpstreamAuthError) as caught:
        await client.draw(request())
    assert "OPENAI_API_KEY" in caught.value.user_message("en")
    assert TEST_KEY not in "".join(traceback.format_exception(caught.value))
    assert fake_api.api_requests == []


# --- downloads --------------------------------------------------------------------------------


async def test_download_reference_with_a_cap(
    fake_api: FakeImageAPI, http: httpx.AsyncClient
) -> None:
    data = png_bytes()
    assert (
        await download_reference(http, fake_api.serve_file(data), max_bytes=10**6, deadline=5)
        == data
    )

    from core.errors import BadReferenceError

    with pytest.raises(BadReferenceError) as too_big:
        await download_reference(
            http, fake_api.serve_large_file(2_000_000), max_bytes=500_000, deadline=5, index=2
        )
    assert too_big.value.key == "ref.download_too_large"
    assert "2" in too_big.value.user_message("en") and "0.5 MB" in too_big.value.user_message("en")
    for url in (f"{fake_api.base_url}/files/missing.png", "file:///etc/passwd"):
        with pytest.raises(BadReferenceError) as failed:
            await download_reference(http, url, max_bytes=10**6, deadline=5)
        assert failed.value.key == "ref.download_failed"


# --- the fake checks what the real API checks ----------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "dall-e-9", "prompt": "x"}, 400, "invalid_value"),
        ({"model": "gpt-image-1.5", "prompt": "x", "size": "1280x720"}, 400, "invalid_value"),
        ({"model": "gpt-image-2", "prompt": "x", "size": "1000x1000"}, 400, "invalid_value"),
        ({"model": "gpt-image-2", "prompt": "x", "size": "4000x4000"}, 400, "invalid_value"),
        ({"model": "gpt-image-2", "prompt": "x", "size": "3840x1024"}, 400, "invalid_value"),
        ({"model": "gpt-image-2", "prompt": "x", "size": "512x512"}, 400, "invalid_value"),
        ({"model": "gpt-image-2", "prompt": "x", "n": 11}, 400, "invalid_value"),
        ({"model": "gpt-image-2", "prompt": "x", "quality": "ultra"}, 400, "invalid_value"),
        ({"model": "gpt-image-2", "prompt": "x" * 32001}, 400, "string_above_max_length"),
        ({"model": "gpt-image-2", "prompt": "x", "colour": "red"}, 400, "unknown_parameter"),
        ({"model": "gpt-image-1.5", "prompt": "x", "size": "1536x1024"}, 200, None),
        ({"model": "gpt-image-2", "prompt": "x", "size": "3840x2160", "n": 1}, 200, None),
    ],
)
def test_the_fake_enforces_the_api_rules(
    fake_api: FakeImageAPI, body: dict[str, Any], status: int, code: str | None
) -> None:
    resp = httpx.post(
        f"{fake_api.base_url}/v1/images/generations",
        json=body,
        headers={"Authorization": f"Bearer {TEST_KEY}"},
        timeout=10,
        verify=TLS,
    )
    assert resp.status_code == status
    if code:
        assert resp.json()["error"]["code"] == code


def test_the_fake_refuses_a_wrong_key_and_records_no_secret(fake_api: FakeImageAPI) -> None:
    resp = httpx.post(
        f"{fake_api.base_url}/v1/images/generations",
        json={"model": "gpt-image-2", "prompt": "x"},
        headers={"Authorization": "Bearer wrong"},
        verify=TLS,
    )
    assert resp.status_code == 401
    assert not fake_api.api_requests[0].authorized
    assert "wrong" not in repr(fake_api.requests)


@pytest.mark.parametrize(
    "base", ["https://api.openai.com/v1", "https://api.openai.com/v1/", "https://api.openai.com"]
)
def test_api_root_ends_in_v1_once(base: str) -> None:
    assert api_root(base) == "https://api.openai.com/v1"


# A key the way some proxies echo it: another account's key without its prefix (48
# characters, as OpenAI's were), and ours reversed.
BARE_KEY = "Xq7TmR2vLp9WzN4bKc6YhJ8sDf3GaE5uQo1iVn0MtZrPyBxC"
REVERSED_KEY = TEST_KEY[::-1]


@pytest.mark.parametrize(
    ("code", "shown"),
    [
        ("invalid_value", "HTTP 400, invalid_value"),
        (BARE_KEY.lower(), "HTTP 400"),  # shaped like a code, but one 48-letter "word"
        ("Invalid Value!", "HTTP 400"),
        (REVERSED_KEY[:20].lower().replace("-", "_"), "HTTP 400"),  # a piece of our key
    ],
)
async def test_a_refusal_shows_our_words_and_a_safe_code_never_the_upstream_text(
    fake_api: FakeImageAPI,
    settings: SettingsFactory,
    http: httpx.AsyncClient,
    code: str,
    shown: str,
) -> None:
    message = f"Bad request from key {REVERSED_KEY} / {BARE_KEY}: try sk-other-0123456789abcdef"
    fake_api.inject("status", status=400, code=code, message=message)
    client = ImageClient(http, settings())
    with pytest.raises(UpstreamRejected) as caught:
        await client.draw(request())
    for lang in ("en", "zh"):
        user_text = caught.value.user_message(lang)
        assert user_text == text(lang, "upstream.rejected", ref=shown)
    assert "Bad request" not in user_text and BARE_KEY not in user_text
    # The log keeps the upstream's story, without our key in any direction.
    detail = caught.value.detail
    assert "Bad request" in detail
    assert REVERSED_KEY not in detail and TEST_KEY not in detail and "sk-other" not in detail


async def test_an_unknown_parameter_is_named_only_when_it_looks_like_one(
    fake_api: FakeImageAPI, settings: SettingsFactory, http: httpx.AsyncClient
) -> None:
    client = ImageClient(http, settings())
    fake_api.inject("unknown_parameter", param="response_format")
    with pytest.raises(UpstreamAuthError) as caught:
        await client.draw(request())
    assert "'response_format'" in caught.value.user_message("en")
    fake_api.inject("unknown_parameter", param=f"{REVERSED_KEY} is not a parameter")
    with pytest.raises(UpstreamAuthError) as caught:
        await client.draw(request())
    assert caught.value.user_message("en") == text("en", "upstream.unknown_parameter", param="?")
