"""The web door's OpenAI-compatible API, driven by the official `openai` SDK.

The real server (uvicorn, `bots.web.app.run_web`) runs on 127.0.0.1 in the test's event
loop, on the real service and a SQLite ledger, relaying to the fake upstream.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from bots.web.api import _json_with_images
from bots.web.app import listening_socket, run_web
from core.service import ImageService
from tests.fake_api import FakeImageAPI


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def png(width: int = 64, height: int = 64, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), (200, 30, 30, 0) if mode == "RGBA" else (200, 30, 30)).save(
        out, format="PNG"
    )
    return out.getvalue()


@dataclass
class Door:
    base_url: str
    key: str
    user_key: str
    service: ImageService
    upstream: FakeImageAPI

    def client(self, key: str | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1", api_key=key or self.key, max_retries=0
        )


@pytest.fixture
def door(
    make_service: Callable[..., Any], fake_api: FakeImageAPI
) -> Callable[..., Any]:
    """Return a factory: `async with door(**settings) as d` runs the server."""

    class Running:
        def __init__(self, **overrides: Any) -> None:
            self.port = free_port()
            self.overrides = {"web_port": self.port, "rate_limit_per_minute": 0, **overrides}

        async def __aenter__(self) -> Door:
            self._ctx = make_service(**self.overrides)
            service = await self._ctx.__aenter__()
            self.stop = asyncio.Event()
            self.task = asyncio.create_task(run_web(service.settings, service, self.stop))
            for _ in range(100):
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.1):
                        break
                except OSError:
                    await asyncio.sleep(0.02)
            _, key = await service.ledger.create_api_key("telegram:42", "test")
            return Door(f"http://127.0.0.1:{self.port}", key, "telegram:42", service, fake_api)

        async def __aexit__(self, *exc: object) -> None:
            self.stop.set()
            await asyncio.wait_for(self.task, 30)
            await self._ctx.__aexit__(*exc)

    return Running


async def spent(d: Door) -> float:
    report = await d.service.ledger.spend_report(d.user_key)
    return report.today


# --- drawing ------------------------------------------------------------------------------


async def test_generate_b64_records_the_spend_under_the_keys_user(door: Any) -> None:
    async with door() as d:
        raw = await d.client().images.with_raw_response.generate(
            model="gpt-image-2", prompt="a red fox", size="1024x1024", quality="low"
        )
        result = raw.parse()
        credits = float(raw.headers["x-imgbot-credits"])
        assert credits > 0 and result.created > 0 and len(result.data) == 1
        image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json or "")))
        assert image.size == (1024, 1024)
        assert result.usage is not None and result.usage.output_tokens > 0
        job = await d.service.job(int(raw.headers["x-imgbot-job"]))
        assert job is not None and job.user_key == "telegram:42" and job.status.value == "succeeded"
        # A key of a Telegram user: still a web job, which no bot resumes after a crash.
        assert json.loads(job.request_json)["origin"] == {"via": "web"}
        assert await spent(d) == pytest.approx(credits, abs=0.01)
        sent = d.upstream.api_requests[-1].json or {}
        assert sent["prompt"] == "a red fox" and sent["quality"] == "low"


async def test_generate_two_as_urls(door: Any) -> None:
    async with door() as d:
        result = await d.client().images.generate(
            prompt="two foxes", n=2, size="1536x1024", quality="low", response_format="url"
        )
        assert len(result.data) == 2
        async with httpx.AsyncClient() as http:
            for item in result.data:
                assert item.url and item.url.startswith(d.base_url + "/v1/files/")
                got = await http.get(item.url)
                assert got.status_code == 200 and got.headers["content-type"] == "image/png"
                assert Image.open(io.BytesIO(got.content)).size == (1536, 1024)
            # The address is the secret: a guessed one, or a changed one, gives nothing.
            forged = result.data[0].url[:-10] + "AAAAAA.png"
            assert (await http.get(forged)).status_code == 404
            assert (await http.get(d.base_url + "/v1/files/1.png")).status_code == 404
        assert d.upstream.api_requests[-1].json["n"] == 2


async def test_a_url_answer_the_ledger_cannot_keep_is_undelivered_and_refundable(
    door: Any, tmp_path: Path
) -> None:
    async with door(delivery_attempts=2, delivery_retry_delay=0) as d:
        # The ledger refuses the images (as a full disk would), and only them.
        with closing(sqlite3.connect(tmp_path / "ledger.db")) as raw, raw:
            raw.execute("CREATE TRIGGER refuse_files BEFORE INSERT ON web_files"
                        " BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        with pytest.raises(openai.InternalServerError) as caught:
            await d.client().images.generate(prompt="a fox", size="1024x1024", quality="low",
                                             response_format="url")
        assert "could not be delivered" in caught.value.message
        [job] = (await d.service.ledger.spend_report(d.user_key, last=1)).last_jobs
        # Drawn and charged (the upstream billed it), recorded undelivered: refundable.
        assert (job.status.value, job.stage.value) == ("succeeded", "undelivered")
        assert len([r for r in d.upstream.api_requests if r.path.endswith("generations")]) == 1
        # b64 answers keep nothing, and go on.
        result = await d.client().images.generate(prompt="a fox", size="1024x1024",
                                                  quality="low")
        assert result.data[0].b64_json


async def test_edit_with_two_references_and_a_mask(door: Any) -> None:
    async with door() as d:
        result = await d.client().images.edit(
            image=[("a.png", png(), "image/png"), ("b.png", png(48, 32), "image/png")],
            mask=("mask.png", png(mode="RGBA"), "image/png"),
            prompt="make it winter",
            quality="low",
        )
        assert len(result.data) == 1 and result.data[0].b64_json
        sent = d.upstream.api_requests[-1]
        assert [p.name for p in sent.files] == ["image[]", "image[]", "mask"]
        assert sent.fields["prompt"] == "make it winter"
        job = (await d.service.ledger.spend_report(d.user_key)).last_jobs[0]
        assert job.reference_count == 2


async def test_models_are_listed_for_a_key_holder(door: Any) -> None:
    async with door() as d:
        models = [m.id async for m in d.client().models.list()]
        assert {"gpt-image-2", "gpt-image-1.5", "gpt-image-1"} <= set(models)


# --- errors -------------------------------------------------------------------------------


async def test_bad_size_and_prompt_are_400_in_openais_shape(door: Any) -> None:
    async with door() as d:
        with pytest.raises(openai.BadRequestError) as info:
            await d.client().images.generate(prompt="a cat", size="1000x1000")
        assert info.value.status_code == 400
        body = info.value.body
        assert isinstance(body, dict) and body["param"] == "size" and "16" in body["message"]
        with pytest.raises(openai.BadRequestError) as info:
            await d.client().images.generate(prompt="   ")
        assert info.value.body["param"] == "prompt"
        with pytest.raises(openai.BadRequestError) as info:
            await d.client().images.generate(prompt="a cat", output_compression=50)
        assert info.value.body["param"] == "output_compression"
        with pytest.raises(openai.BadRequestError):
            await d.client().images.generate(prompt="a cat", model="dall-e-3")
        assert d.upstream.api_requests == [] and await spent(d) == 0


async def test_a_bad_or_revoked_key_is_401(door: Any) -> None:
    async with door() as d:
        with pytest.raises(openai.AuthenticationError):
            await d.client("ik-" + "x" * 43).images.generate(prompt="a cat")
        with pytest.raises(openai.AuthenticationError):
            await d.client("sk-not-ours").models.list()
        key_id, key = await d.service.ledger.create_api_key("web:alice", "soon revoked")
        await d.client(key).images.generate(prompt="a cat", quality="low")
        assert await d.service.ledger.revoke_api_key(key_id)
        with pytest.raises(openai.AuthenticationError) as info:
            await d.client(key).images.generate(prompt="a cat", quality="low")
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
        assert len(d.upstream.api_requests) == 1


async def test_over_a_spend_limit_is_402_and_too_fast_is_429(door: Any) -> None:
    async with door(user_daily_limit=1000, rate_limit_per_minute=2) as d:
        with pytest.raises(openai.APIStatusError) as info:
            await d.client().images.generate(prompt="a cat", quality="high", size="2048x2048")
        assert info.value.status_code == 402
        assert info.value.body["code"] == "limit_exceeded" and "low" in info.value.body["message"]
        await d.client().images.generate(prompt="a cat", quality="low")
        with pytest.raises(openai.RateLimitError) as rate:
            await d.client().images.generate(prompt="a cat", quality="low")
        assert rate.value.status_code == 429 and rate.value.response.headers["retry-after"]


async def test_upstream_failures_are_502_and_504_and_cost_nothing(door: Any) -> None:
    async with door(request_timeout=0.5) as d:
        d.upstream.inject("server_error")
        with pytest.raises(openai.APIStatusError) as info:
            await d.client().images.generate(prompt="a cat", quality="low")
        assert info.value.status_code == 502 and "Traceback" not in str(info.value.body)
        d.upstream.inject("hang", seconds=3)
        with pytest.raises(openai.APIStatusError) as info:
            await d.client().images.generate(prompt="a cat", quality="low")
        assert info.value.status_code == 504
        assert await spent(d) == 0


# --- hostile ------------------------------------------------------------------------------


async def test_an_oversized_body_is_refused_before_it_is_read(door: Any) -> None:
    async with door(web_max_body_bytes=100_000) as d:
        headers = {"Authorization": f"Bearer {d.key}"}
        async with httpx.AsyncClient(base_url=d.base_url, headers=headers) as http:
            # Announced: refused at once, before the body is sent.
            big = await http.post("/v1/images/edits", content=b"x" * 300_000,
                                  headers={"Content-Type": "multipart/form-data; boundary=b"})
            assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"

            # Not announced (chunked): cut off at the cap while arriving.
            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(100):
                    yield b"y" * 10_000

            cut = await http.post("/v1/images/generations", content=chunks())
            assert cut.status_code == 413
        assert d.upstream.api_requests == []


async def test_seventeen_references_and_a_bad_mask_are_refused(door: Any) -> None:
    async with door() as d:
        with pytest.raises(openai.BadRequestError) as info:
            await d.client().images.edit(
                image=[(f"{i}.png", png(), "image/png") for i in range(17)], prompt="a collage"
            )
        assert "17" in info.value.body["message"] and info.value.body["param"] == "image"
        with pytest.raises(openai.BadRequestError) as info:
            await d.client().images.edit(
                image=("a.png", png(), "image/png"),
                mask=("mask.png", b"%PDF-1.4 not an image", "image/png"),
                prompt="make it winter",
            )
        assert info.value.body["param"] == "mask"
        with pytest.raises(openai.BadRequestError) as info:
            await d.client().images.edit(
                image=("a.png", png(), "image/png"),
                mask=("mask.png", png(32, 32, "RGBA"), "image/png"),
                prompt="make it winter",
            )
        assert info.value.body["param"] == "mask" and "64x64" in info.value.body["message"]
        assert d.upstream.api_requests == [] and await spent(d) == 0


async def test_compression_moderation_and_fidelity_reach_the_upstream(door: Any) -> None:
    async with door() as d:
        await d.client().images.generate(
            prompt="a cat", quality="low", output_format="webp", output_compression=40,
            moderation="low",
        )
        sent = d.upstream.api_requests[-1].json or {}
        assert (sent["output_format"], sent["output_compression"], sent["moderation"]) == (
            "webp", 40, "low"
        )
        await d.client().images.edit(
            image=("a.png", png(1024, 1024), "image/png"), prompt="make it winter",
            model="gpt-image-1.5", quality="low", input_fidelity="high",
        )
        fields = d.upstream.api_requests[-1].fields
        assert fields["input_fidelity"] == "high"
        # Refused with the reason, before any upstream call: fidelity on gpt-image-2,
        # compression out of range, compression for png.
        calls = len(d.upstream.api_requests)
        with pytest.raises(openai.BadRequestError) as info:
            await d.client().images.edit(
                image=("a.png", png(1024, 1024), "image/png"), prompt="x", input_fidelity="high"
            )
        assert info.value.body["param"] == "input_fidelity"
        assert "gpt-image-2" in info.value.body["message"]
        with pytest.raises(openai.BadRequestError) as info:
            await d.client().images.generate(
                prompt="a cat", output_format="jpeg", output_compression=150
            )
        assert info.value.body["param"] == "output_compression"
        with pytest.raises(openai.BadRequestError) as info:
            await d.client().images.generate(prompt="a cat", moderation="none")  # type: ignore[arg-type]
        assert info.value.body["param"] == "moderation"
        assert len(d.upstream.api_requests) == calls
        # A key's requests never stream (and never pay for previews).
        assert all("stream" not in (r.json or r.fields) for r in d.upstream.api_requests)


async def test_the_door_answers_without_waiting_for_delayed_acks() -> None:
    """The listening socket makes connections with Nagle off, as uvicorn gets them (the
    loop's create_server on our socket): with it on, every answer sent as headers then body
    waited ~40 ms for the client's delayed ACK."""
    sock = listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = writer.get_extra_info("socket")
        accepted.set_result(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connect, sock=sock)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(accepted, 5) != 0
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    # A taken port is this front end's error, saying what to set.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(OSError, match="set WEB_PORT"):
            listening_socket("127.0.0.1", taken.getsockname()[1])


def test_the_answers_json_carries_each_images_base64_in_its_place() -> None:
    images = [b"\x89PNG first", b"second \x00\xff" * 100]
    slot = "\u0000slot\u0000"
    body = {"created": 1, "data": [{"b64_json": slot, "revised_prompt": 'a "fox" \u00e9'},
                                   {"b64_json": slot}], "usage": {"total_tokens": 5}}
    parsed = json.loads(_json_with_images(body, slot, images))
    assert [base64.b64decode(d["b64_json"]) for d in parsed["data"]] == images
    assert parsed["data"][0]["revised_prompt"] == 'a "fox" \u00e9'
    assert parsed["usage"] == {"total_tokens": 5} and parsed["created"] == 1
    with pytest.raises(RuntimeError):
        _json_with_images(body, slot, images[:1])
