"""The page (`/`) in a real headless Chromium, against the real web door.

The server is the real one (uvicorn, `bots.web.app.run_web`) on 127.0.0.1 in the test's event
loop, on the real service and a SQLite ledger, relaying to the fake image API. The browser is
Debian's Chromium driven by Playwright (`executable_path`; no browser download). Nothing of
ours is mocked. Screenshots are saved under test-artifacts/web/ (IMGBOT_TEST_ARTIFACTS).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import logging
import os
import re
import shutil
import socket
import time
import tomllib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import openai
import pytest
from PIL import Image
from playwright.async_api import Browser, Page, async_playwright, expect

from bots.web import command as commands
from bots.web.app import run_web
from bots.web.miniapp import InitDataRefused, verify_init_data
from core.errors import PromptError
from core.messages import text as core_text
from core.pricing import format_credits
from core.service import ImageService
from tests.fake_api import PARTIAL_TOKENS, FakeImageAPI
from tests.telegram_fake import TOKEN as BOT_TOKEN

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("IMGBOT_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "web"
# As root, in a container, on a machine whose network reaches nothing: no sandbox, no GPU,
# and none of Chromium's own background traffic (updates, sync, field trials).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--disable-quic",
]
ANN = {"id": 1001, "first_name": "Ann", "last_name": "Lee", "language_code": "en"}
EXPECT_MS = 10_000


def chromium_path() -> str:
    """Return Debian's Chromium (or IMGBOT_CHROMIUM); fail, never skip, when there is none."""
    for candidate in (os.environ.get("IMGBOT_CHROMIUM"), "chromium", "chromium-browser",
                      "/usr/lib/chromium/chromium"):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    pytest.fail("No Chromium for the browser tests: `apt-get install chromium` (bash .ci/run "
                "installs it), or set IMGBOT_CHROMIUM to a Chromium executable.")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def png(width: int, height: int, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="PNG")
    return out.getvalue()


def sign_init_data(fields: dict[str, str], token: str = BOT_TOKEN) -> dict[str, str]:
    """Sign like Telegram does (its documented scheme, written out here independently)."""
    check = "\n".join(f"{k}={v}" for k, v in sorted(fields.items()))
    secret = hmac.new(b"WebAppData", token.encode(), hashlib.sha256).digest()
    return {**fields, "hash": hmac.new(secret, check.encode(), hashlib.sha256).hexdigest()}


def init_data(user: dict[str, Any] = ANN, *, age: float = 5, token: str = BOT_TOKEN,
              tamper: dict[str, str] | None = None) -> str:
    fields = {
        "query_id": "AAHdF6IQAAAAAN0XohDhrOrc",
        "user": json.dumps(user, separators=(",", ":")),
        "auth_date": str(int(time.time() - age)),
    }
    signed = sign_init_data(fields, token)
    return urlencode({**signed, **(tamper or {})})


@dataclass
class Site:
    url: str
    key: str
    user_key: str
    service: ImageService
    upstream: FakeImageAPI


@pytest.fixture
def site(make_service: Callable[..., Any], fake_api: FakeImageAPI) -> Callable[..., Any]:
    """Return a factory: `async with site(**settings) as s` runs the web door."""

    class Running:
        def __init__(self, **overrides: Any) -> None:
            self.port = free_port()
            self.overrides = {"web_port": self.port, "rate_limit_per_minute": 0, **overrides}

        async def __aenter__(self) -> Site:
            self._ctx = make_service(**self.overrides)
            service = await self._ctx.__aenter__()
            self.stop = asyncio.Event()
            self.task = asyncio.create_task(run_web(service.settings, service, self.stop))
            for _ in range(200):
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.1):
                        break
                except OSError:
                    await asyncio.sleep(0.02)
            _, key = await service.ledger.create_api_key("web:alice", "page test")
            return Site(f"http://127.0.0.1:{self.port}", key, "web:alice", service, fake_api)

        async def __aexit__(self, *exc: object) -> None:
            self.stop.set()
            await asyncio.wait_for(self.task, 30)
            await self._ctx.__aexit__(*exc)

    return Running


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Tab:
    """One browser page and everything it asked the network for."""

    page: Page
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def assert_only_local(self, site: Site) -> None:
        assert self.requests, "the page made no request at all"
        outside = [u for u in self.requests
                   if not (u.startswith(site.url + "/") or u.startswith(("blob:", "data:")))]
        assert outside == [], f"the page reached outside 127.0.0.1: {outside}"
        assert self.errors == [], f"the page's script failed: {self.errors}"

    async def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def open_tab(browser: Browser, url: str, *, locale: str = "en-US") -> Tab:
    context = await browser.new_context(locale=locale, viewport={"width": 1100, "height": 1300})
    page = await context.new_page()
    tab = Tab(page)
    context.on("request", lambda r: tab.requests.append(r.url))
    page.on("pageerror", lambda e: tab.errors.append(str(e)))
    await page.goto(url)
    return tab


async def sign_in(tab: Tab, key: str) -> None:
    await tab.page.fill("#key-input", key)
    await tab.page.click("#signin-button")
    await expect(tab.page.locator("#studio")).to_be_visible(timeout=EXPECT_MS)


async def add_by_picker(page: Page, name: str, data: bytes) -> None:
    await page.set_input_files("#ref-input", files=[
        {"name": name, "mimeType": "image/png", "buffer": data}])


# Both build a real File in the page and hand it over the way the browser would: a paste
# event with the clipboard's data, a drop event with the dragged data.
_HAND_OVER = """async ([how, b64, name]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, { type: "image/png" }));
  if (how === "paste") {
    document.getElementById("command").dispatchEvent(
      new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true }));
  } else {
    document.getElementById("refs").dispatchEvent(
      new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true }));
  }
}"""


async def hand_over(page: Page, how: str, name: str, data: bytes) -> None:
    await page.evaluate(_HAND_OVER, [how, base64.b64encode(data).decode(), name])


def credits_text(site: Site, command: str, lang: str = "en",
                 sizes: tuple[tuple[int, int], ...] = ()) -> str:
    # The page's jobs ask for previews where they can be had, so its estimate counts them.
    _, estimate = site.service.parse(command, reference_sizes=sizes, previews=True)
    return format_credits(estimate, site.service.prices, lang)


# --- loading and signing in --------------------------------------------------------------


async def test_the_page_loads_with_nothing_from_outside_and_signs_in_with_a_key(
    site: Any, browser: Browser, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with site() as s:
        async with httpx.AsyncClient() as http:
            index = await http.get(s.url + "/")
        assert index.status_code == 200 and "text/html" in index.headers["content-type"]
        csp = index.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        assert re.findall(r"(?:src|href)=\"(https?:)?//", index.text) == []

        tab = await open_tab(browser, s.url + "/")
        await expect(tab.page.locator("#signin")).to_be_visible()
        await expect(tab.page.locator("h1")).to_have_text("Sign in")
        await sign_in(tab, s.key)
        await expect(tab.page.locator("#who")).to_have_text("alice")
        await expect(tab.page.locator("#history")).to_contain_text("No jobs yet.")
        # The key went in a POST body only; the browser keeps a session token, not the key.
        assert all(s.key not in url for url in tab.requests)
        stored = await tab.page.evaluate("() => JSON.stringify({...localStorage})")
        assert s.key not in stored and "imgbot.session" in stored
        # Reloading keeps the session; signing out ends it on the server too.
        token = await tab.page.evaluate("() => localStorage.getItem('imgbot.session')")
        await tab.page.reload()
        await expect(tab.page.locator("#studio")).to_be_visible()
        await tab.page.click("#sign-out")
        await expect(tab.page.locator("#signin")).to_be_visible()
        async with httpx.AsyncClient() as http:
            gone = await http.get(s.url + "/web/api/me",
                                  headers={"Authorization": f"Bearer {token}"})
        assert gone.status_code == 401
        await tab.shot("signed-out")
        tab.assert_only_local(s)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert s.key not in logged and token not in logged
    assert "web:alice signed in (key)" in logged


async def test_a_wrong_or_revoked_key_says_so_clearly(site: Any, browser: Browser) -> None:
    async with site() as s:
        tab = await open_tab(browser, s.url + "/")
        await tab.page.fill("#key-input", "ik-" + "x" * 43)
        await tab.page.click("#signin-button")
        error = tab.page.locator("#signin-error")
        await expect(error).to_contain_text("That key is not valid: it is unknown or was revoked")
        await expect(error).to_contain_text("/key")
        await expect(tab.page.locator("#studio")).to_be_hidden()
        await tab.shot("wrong-key")

        # Revoked while signed in: the next call signs the page out, saying why.
        key_id, key = await s.service.ledger.create_api_key("web:bob", "soon revoked")
        await sign_in(tab, key)
        # Let the calls the sign-in starts (history, estimate) finish first: one of them
        # answering after the revocation would sign out before the click.
        await tab.page.wait_for_load_state("networkidle")
        assert await s.service.ledger.revoke_api_key(key_id)
        await tab.page.click("#history-refresh")
        await expect(tab.page.locator("#signin-error")).to_contain_text("Your key was revoked")
        await expect(tab.page.locator("#studio")).to_be_hidden()
        tab.assert_only_local(s)


# --- the prompt box, the pickers and the estimate ---------------------------------------------


async def test_typing_a_command_moves_the_pickers_and_the_estimate(
    site: Any, browser: Browser
) -> None:
    async with site(max_n=4) as s:
        tab = await open_tab(browser, s.url + "/")
        page = tab.page
        await sign_in(tab, s.key)
        estimate = page.locator("#estimate")
        await page.locator("#command").press_sequentially("16:9 2K high a cat", delay=5)
        await expect(estimate).to_contain_text(credits_text(s, "16:9 2K high a cat"))
        await expect(estimate).to_contain_text("2048x1152")
        await expect(page.locator("#pick-ratio")).to_have_value("16:9")
        await expect(page.locator("#pick-tier")).to_have_value("2K")
        await expect(page.locator("#pick-quality")).to_have_value("high")
        await expect(page.locator("#pick-n")).to_have_value("1")
        await expect(page.locator("#pick-model")).to_have_value("gpt-image-2")

        # A picker rewrites the command's options, and the estimate follows.
        await page.select_option("#pick-tier", "4K")
        await expect(page.locator("#command")).to_have_value("16:9 4K high a cat")
        await expect(estimate).to_contain_text(credits_text(s, "16:9 4K high a cat"))
        await page.select_option("#pick-n", "2")
        await page.select_option("#pick-model", "gpt-image-1.5")
        await expect(page.locator("#command")).to_have_value("16:9 4K high x2 gpt-image-1.5 a cat")
        await page.select_option("#pick-quality", "low")
        await expect(page.locator("#command")).to_have_value("16:9 4K low x2 gpt-image-1.5 a cat")
        await expect(estimate).to_contain_text(
            credits_text(s, "16:9 4K low x2 gpt-image-1.5 a cat"))

        # Other spellings of the language are read too; a malformed one is refused as the
        # bots refuse it, and the pickers keep their last good reading.
        await page.fill("#command", "--ar 9:16 --q medium a fox")
        await expect(page.locator("#pick-ratio")).to_have_value("9:16")
        await expect(page.locator("#pick-quality")).to_have_value("medium")
        await page.fill("#command", "5:1 a fox")
        await expect(page.locator("#command-error")).to_contain_text("5:1")
        await expect(estimate).to_have_text("")
        await page.fill("#command", "21:9 ")
        await expect(page.locator("#pick-ratio")).to_have_value("21:9")
        await expect(estimate).to_contain_text("Write what to draw")
        await expect(page.locator("#command-error")).to_have_text("")
        await tab.shot("estimate")
        tab.assert_only_local(s)
        assert s.upstream.api_requests == []  # estimating calls nothing


# --- drawing ------------------------------------------------------------------------------


async def test_draw_with_picked_pasted_and_dropped_references_and_a_mask(
    site: Any, browser: Browser
) -> None:
    async with site() as s:
        tab = await open_tab(browser, s.url + "/")
        page = tab.page
        await sign_in(tab, s.key)
        await add_by_picker(page, "picked.png", png(64, 48, (10, 10, 200)))
        await hand_over(page, "paste", "pasted.png", png(80, 80, (10, 200, 10)))
        await hand_over(page, "drop", "dropped.png", png(40, 60, (200, 10, 10)))
        items = page.locator("#ref-list li")
        await expect(items).to_have_count(3)
        # Reordered by dragging and with the buttons: the pasted one first (the mask applies
        # to it), then picked, then dropped.
        async def order() -> list[str | None]:
            return [await img.get_attribute("alt") for img in await items.locator("img").all()]

        await items.nth(1).drag_to(items.nth(0))
        assert await order() == ["pasted.png", "picked.png", "dropped.png"]
        await items.nth(2).get_by_role("button", name="Move left").click()
        assert await order() == ["pasted.png", "dropped.png", "picked.png"]
        await items.nth(1).get_by_role("button", name="Move right").click()
        assert await order() == ["pasted.png", "picked.png", "dropped.png"]
        await page.click("#mask-toggle")
        canvas = page.locator("#mask-canvas")
        await expect(canvas).to_be_visible()
        box = await canvas.bounding_box()
        assert box is not None
        await page.mouse.move(box["x"] + 5, box["y"] + 5)
        await page.mouse.down()
        await page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2,
                              steps=5)
        await page.mouse.up()
        await expect(page.locator("#mask-state")).to_contain_text("mask will be sent")

        await page.fill("#command", "1:1 low make it winter")
        await expect(page.locator("#estimate")).to_contain_text(
            credits_text(s, "1:1 low make it winter", sizes=((80, 80), (64, 48), (40, 60))))
        s.upstream.inject("slow", seconds=1.5)
        await page.click("#draw")
        progress = page.locator("#progress")
        await expect(progress).to_contain_text("Drawing…", timeout=EXPECT_MS)
        await expect(page.locator("#cancel")).to_be_visible()
        await tab.shot("drawing")
        await expect(page.locator("#result")).to_be_visible(timeout=EXPECT_MS)
        await expect(progress).to_contain_text("Done in")

        [record] = (await s.service.ledger.spend_report(s.user_key)).last_jobs
        assert record.status.value == "succeeded" and record.reference_count == 3
        cost = format_credits(record.actual_credits or 0, s.service.prices, "en")
        await expect(page.locator("#result-meta")).to_have_text(
            f"1024x1024 · low · gpt-image-2 · cost {cost} · Job #{record.id}")
        shown = page.locator("#result-images img")
        await expect(shown).to_have_count(1)
        assert await shown.evaluate("img => img.naturalWidth") == 1024

        sent = s.upstream.api_requests[-1]
        assert sent.path.endswith("/images/edits")
        refs = [p for p in sent.files if p.name == "image[]"]
        assert [Image.open(io.BytesIO(p.data)).size for p in refs] == [(80, 80), (64, 48), (40, 60)]
        [mask_part] = [p for p in sent.files if p.name == "mask"]
        mask = Image.open(io.BytesIO(mask_part.data)).convert("RGBA")
        assert mask.size == (80, 80)
        alphas = {mask.getpixel((x, y))[3] for x in range(80) for y in range(80)}
        assert 0 in alphas and 255 in alphas  # painted: transparent (edit); else kept
        assert mask.getpixel((2, 2))[3] == 0 and mask.getpixel((79, 79))[3] == 255
        await tab.shot("result")
        tab.assert_only_local(s)


async def test_queue_position_then_the_result_and_the_history_with_its_original(
    site: Any, browser: Browser
) -> None:
    async with site(max_jobs_per_user=1) as s:
        tab = await open_tab(browser, s.url + "/")
        page = tab.page
        await sign_in(tab, s.key)
        # The same user draws from a script first: the page's job waits behind it.
        client = openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key=s.key, max_retries=0)
        s.upstream.inject("slow", seconds=2.5)
        first = asyncio.create_task(client.images.generate(prompt="a slow fox", quality="low"))
        for _ in range(200):
            if s.upstream.api_requests:
                break
            await asyncio.sleep(0.02)
        await page.fill("#command", "low a quick hare")
        await page.click("#draw")
        await expect(page.locator("#progress")).to_contain_text("In the queue: #1")
        await tab.shot("queued")
        await first
        await expect(page.locator("#result")).to_be_visible(timeout=EXPECT_MS)

        # The history lists both jobs; the page's has its original, the b64 answer none.
        history = page.locator("#history li")
        await expect(history).to_have_count(2)
        page_job, api_job = (await s.service.ledger.spend_report(s.user_key)).last_jobs
        mine = page.locator(f"#history li[data-job='{page_job.id}']")
        await expect(mine.locator("img.thumb")).to_have_count(1)
        await expect(mine).to_contain_text("a quick hare")
        await expect(page.locator(f"#history li[data-job='{api_job.id}']")).to_contain_text(
            "original not kept")
        await mine.locator("button").click()
        dialog = page.locator("#job-dialog")
        await expect(dialog).to_be_visible()
        await expect(dialog).to_contain_text(f"Job #{page_job.id}")
        await expect(dialog).to_contain_text("a quick hare")
        link = dialog.locator("a.download")
        await expect(link).to_have_count(1)
        href = await link.get_attribute("href")
        assert href and href.startswith("/v1/files/")
        async with page.expect_download() as waiting:
            await link.click()
        download = await waiting.value
        saved = await download.path()
        assert Image.open(saved).size == (1024, 1024)
        await tab.shot("history")
        await page.keyboard.press("Escape")
        await page.locator(f"#history li[data-job='{api_job.id}'] button").click()
        await expect(dialog).to_contain_text("original of this job is not kept")
        tab.assert_only_local(s)


async def test_a_refused_job_says_why_and_cancel_stops_a_running_one(
    site: Any, browser: Browser
) -> None:
    async with site(user_daily_limit=2000) as s:
        tab = await open_tab(browser, s.url + "/")
        page = tab.page
        await sign_in(tab, s.key)
        await page.fill("#command", "4K high a palace")
        await page.click("#draw")
        await expect(page.locator("#job-error")).to_contain_text("low", timeout=EXPECT_MS)
        assert s.upstream.api_requests == []

        s.upstream.inject("slow", seconds=5)
        await page.fill("#command", "low a cat")
        await page.click("#draw")
        await expect(page.locator("#progress")).to_contain_text("Drawing…", timeout=EXPECT_MS)
        await page.click("#cancel")
        [job] = (await s.service.ledger.spend_report(s.user_key)).last_jobs  # the 4K one
        # was refused before it became a job
        await expect(page.locator("#job-error")).to_have_text(
            core_text("en", "job.cancelled_running", job_id=job.id), timeout=EXPECT_MS)
        await expect(page.locator("#result")).to_be_hidden()
        await expect(page.locator("#draw")).to_be_enabled()
        tab.assert_only_local(s)


# --- previews -----------------------------------------------------------------------------

# Records every preview the page puts in the result's place (its number and picture), as the
# user would have seen them, and whether a preview was still there when the result came.
_WATCH_PREVIEWS = """() => {
  window.shownPreviews = [];
  new MutationObserver(() => {
    const img = document.getElementById("preview-image");
    const seen = window.shownPreviews;
    if (img && (!seen.length || seen[seen.length - 1].number !== img.dataset.number)) {
      seen.push({ number: img.dataset.number, src: img.src });
    }
  }).observe(document.getElementById("result-images"), { childList: true, subtree: true });
}"""


def jpeg_of(data_url: str) -> Image.Image:
    head, _, b64 = data_url.partition(",")
    assert head == "data:image/jpeg;base64"
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "JPEG"
    return image.convert("RGB")


async def test_previews_appear_in_place_then_the_result_replaces_them(
    site: Any, browser: Browser
) -> None:
    async with site(preview_count=3) as s, httpx.AsyncClient(base_url=s.url) as http:
        s.upstream.delay = 3.0  # 3 partials at 0.75, 1.5, 2.25 s, the image at 3 s
        tab = await open_tab(browser, s.url + "/")
        page = tab.page
        await sign_in(tab, s.key)
        await page.evaluate(_WATCH_PREVIEWS)
        await page.fill("#command", "16:9 low a red fox")
        # The estimate counts the three previews' tokens: what the job will reserve.
        await expect(page.locator("#estimate")).to_contain_text(
            credits_text(s, "16:9 low a red fox"))
        plain = s.service.parse("16:9 low a red fox")[1]
        assert s.service.parse("16:9 low a red fox", previews=True)[1] > plain

        handles: list[str] = []
        page.on("request", lambda r: handles.extend(
            re.findall(r"/web/api/jobs/([\w-]+)\?seen=", r.url)))
        await page.click("#draw")
        preview = page.locator("#preview-image")
        await expect(preview).to_be_visible(timeout=EXPECT_MS)
        await expect(page.locator("#progress")).to_contain_text("— preview")
        await expect(page.locator("#result-meta")).to_contain_text("still drawing")
        await tab.shot("preview")
        # Only the session's own job shows its preview: another user's session, or none,
        # gets "no such job" for the same handle.
        handle = handles[-1]
        _, bob_key = await s.service.ledger.create_api_key("web:bob", "other")
        bob = await _session(http, bob_key)
        for headers in (bob, {}):
            answer = await http.get(f"/web/api/jobs/{handle}", headers=headers)
            assert answer.status_code in (401, 404) and "data:image" not in answer.text
        # A poll that already saw the latest preview is not sent its picture again.
        token = await page.evaluate("() => localStorage.getItem('imgbot.session')")
        alice = {"Authorization": f"Bearer {token}"}
        again = (await http.get(f"/web/api/jobs/{handle}?seen=3", headers=alice)).json()
        if again["state"] != "done":
            assert again["preview_number"] >= 1 and again["preview"] is None

        result = page.locator("#result-images img")
        await expect(result).to_have_attribute("src", re.compile(r"^/v1/files/"),
                                               timeout=EXPECT_MS)
        await expect(preview).to_have_count(0)
        await expect(page.locator("#progress")).to_contain_text("Done in")
        assert await result.evaluate("img => img.naturalWidth") == 1280
        shown = await page.evaluate("() => window.shownPreviews")
        numbers = [int(p["number"]) for p in shown]
        assert numbers and numbers == sorted(set(numbers)) and numbers[-1] <= 3
        # Each is a small JPEG of the partial the upstream sent: darker the earlier it is.
        pictures = [jpeg_of(p["src"]) for p in shown]
        assert all(max(p.size) <= 640 for p in pictures)
        assert all(p.size[0] * 9 == p.size[1] * 16 for p in pictures)
        reds = [p.getpixel((10, 10))[0] for p in pictures]
        expected = [int(200 * n / 4) for n in numbers]  # the fake's partial k of 3: (k+1)/4
        assert all(abs(r - e) <= 6 for r, e in zip(reds, expected, strict=True)), reds
        await tab.shot("preview-replaced")

        sent = s.upstream.api_requests[-1]
        assert sent.json is not None and sent.json.get("stream") is True
        assert sent.json.get("partial_images") == 3
        [record] = (await s.service.ledger.spend_report(s.user_key)).last_jobs
        # The bill is the completed event's usage: the image plus 100 tokens per preview.
        assert record.usage is not None
        assert record.usage.image_output_tokens == 106 + 3 * PARTIAL_TOKENS
        assert record.actual_credits == pytest.approx(
            s.service.prices.credits(record.usage, record.model))
        cost = format_credits(record.actual_credits or 0, s.service.prices, "en")
        await expect(page.locator("#result-meta")).to_have_text(
            f"1280x720 · low · gpt-image-2 · cost {cost} · Job #{record.id}")
        # The job's poll no longer carries a preview once it is done.
        done = (await http.get(f"/web/api/jobs/{handle}", headers=alice)).json()
        assert done["state"] == "done" and done["preview"] is None
        tab.assert_only_local(s)


async def test_a_dropped_stream_still_ends_in_the_result_and_then_no_previews(
    site: Any, browser: Browser
) -> None:
    async with site(preview_count=3) as s:
        s.upstream.delay = 2.0
        s.upstream.inject("stream_drop", after=1)
        tab = await open_tab(browser, s.url + "/")
        page = tab.page
        await sign_in(tab, s.key)
        await page.evaluate(_WATCH_PREVIEWS)
        await page.fill("#command", "16:9 low a grey owl")
        await expect(page.locator("#estimate")).to_contain_text(credits_text(s, "16:9 low a grey owl"))
        await page.click("#draw")
        # The one preview sent before the drop shows until the normal call's result comes.
        await expect(page.locator("#preview-image")).to_be_visible(timeout=EXPECT_MS)
        await expect(page.locator("#result-images img")).to_have_attribute(
            "src", re.compile(r"^/v1/files/"), timeout=EXPECT_MS)
        await expect(page.locator("#preview-image")).to_have_count(0)
        assert [p["number"] for p in await page.evaluate("() => window.shownPreviews")] == ["1"]
        [record] = (await s.service.ledger.spend_report(s.user_key)).last_jobs
        assert record.status.value == "succeeded" and record.usage is not None
        assert record.usage.image_output_tokens == 106  # the normal call's usage
        assert not s.service.client.streams("gpt-image-2")

        # The upstream does not stream this model: the page's estimate counts no previews
        # now, and the next job shows none and asks for none.
        await page.fill("#command", "16:9 low a brown owl")
        plain = format_credits(s.service.parse("16:9 low a brown owl")[1], s.service.prices, "en")
        await expect(page.locator("#estimate")).to_contain_text(plain)
        await page.evaluate("() => { window.shownPreviews.length = 0; }")
        await page.click("#draw")
        await expect(page.locator("#history li")).to_have_count(2, timeout=EXPECT_MS)
        await expect(page.locator("#progress")).to_contain_text("Done in")
        assert await page.evaluate("() => window.shownPreviews") == []
        last = s.upstream.api_requests[-1]
        assert last.json is not None and "stream" not in last.json
        tab.assert_only_local(s)


# --- languages ------------------------------------------------------------------------------


async def test_chinese_when_the_browser_speaks_chinese(site: Any, browser: Browser) -> None:
    async with site() as s:
        tab = await open_tab(browser, s.url + "/", locale="zh-CN")
        page = tab.page
        await expect(page.locator("h1")).to_have_text("登录")
        await expect(page.locator("#signin-button")).to_have_text("登录")
        assert await page.evaluate("document.documentElement.lang") == "zh-CN"
        await page.fill("#key-input", "ik-" + "y" * 43)
        await page.click("#signin-button")
        await expect(page.locator("#signin-error")).to_contain_text("该密钥无效")
        await sign_in(tab, s.key)
        await expect(page.locator("#draw")).to_have_text("画图")
        await page.fill("#command", "16:9 高 一只猫")
        await expect(page.locator("#estimate")).to_contain_text(
            "预计花费：" + credits_text(s, "16:9 高 一只猫", "zh"))
        await expect(page.locator("#pick-quality")).to_have_value("high")
        await page.fill("#command", "5:1 一只猫")
        await expect(page.locator("#command-error")).to_contain_text("5:1")
        message = await page.locator("#command-error").text_content()
        assert message and re.search(r"[\u4e00-\u9fff]", message)  # the core's Chinese
        await tab.shot("chinese")
        tab.assert_only_local(s)


# --- the Telegram Mini App ------------------------------------------------------------------


def mini_app_url(site: Site, data: str) -> str:
    # How Telegram opens a Mini App: the signed initData, encoded once more, in the fragment.
    return f"{site.url}/#tgWebAppData={quote(data, safe='')}&tgWebAppVersion=8.0&tgWebAppPlatform=web"


async def test_mini_app_signs_in_with_telegram_signed_init_data(
    site: Any, browser: Browser
) -> None:
    async with site(telegram_bot_token=BOT_TOKEN) as s:
        data = init_data()
        tab = await open_tab(browser, mini_app_url(s, data))
        page = tab.page
        await expect(page.locator("#studio")).to_be_visible(timeout=EXPECT_MS)
        await expect(page.locator("#who")).to_have_text("Ann Lee")
        assert "tgWebAppData" not in page.url  # out of the address bar at once
        assert all("hash=" not in url for url in tab.requests)
        await page.fill("#command", "low a paper boat")
        await page.click("#draw")
        await expect(page.locator("#result")).to_be_visible(timeout=EXPECT_MS)
        [job] = (await s.service.ledger.spend_report("telegram:1001")).last_jobs
        assert job.platform == "telegram" and job.chat_key is None
        # Came through the web door: after a crash no Telegram bot carries it on.
        assert json.loads(job.request_json)["origin"] == {"via": "web"}
        await tab.shot("mini-app")
        tab.assert_only_local(s)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("tampered", "did not check out"),
        ("other bot", "did not check out"),
        ("expired", "too old"),
    ],
)
async def test_mini_app_refuses_init_data_tampered_signed_by_another_bot_or_old(
    site: Any, browser: Browser, case: str, expected: str
) -> None:
    async with site(telegram_bot_token=BOT_TOKEN) as s:
        if case == "tampered":  # signed for Ann, then made to say Bob
            data = init_data(tamper={"user": json.dumps({"id": 1002, "first_name": "Bob"})})
        elif case == "other bot":
            data = init_data(token="987654321:AAOtherBotTokenOtherBotToken_0123456")
        else:
            data = init_data(age=2 * 3600)
        tab = await open_tab(browser, mini_app_url(s, data))
        await expect(tab.page.locator("#signin-error")).to_contain_text(expected)
        await expect(tab.page.locator("#studio")).to_be_hidden()
        await tab.shot(f"mini-app-{case.replace(' ', '-')}")
        tab.assert_only_local(s)
        assert (await s.service.ledger.spend_report("telegram:1002")).last_jobs == ()


async def test_mini_app_sign_in_is_off_without_a_bot_token(site: Any) -> None:
    async with site() as s, httpx.AsyncClient(base_url=s.url) as http:
        answer = await http.post("/web/api/session/telegram", json={"init_data": init_data()})
        assert answer.status_code == 404
        assert "not set up" in answer.json()["error"]["message"]


async def test_mini_app_users_outside_the_access_list_are_refused(site: Any) -> None:
    async with site(telegram_bot_token=BOT_TOKEN, allowed_users="telegram:1002") as s:
        async with httpx.AsyncClient(base_url=s.url) as http:
            answer = await http.post("/web/api/session/telegram", json={"init_data": init_data()})
        assert answer.status_code == 403 and "token" not in answer.json()


# --- the operator's one-time link -------------------------------------------------------------


async def test_operator_link_printed_when_alone_signs_in_once(
    site: Any, browser: Browser, capsys: pytest.CaptureFixture[str]
) -> None:
    async with site() as s:
        printed = capsys.readouterr().out
        assert f"imgbot web page at {s.url}/" in printed
        [link] = re.findall(r"(http://\S+/#signin=\S+)", printed)
        code = link.split("#signin=", 1)[1]
        tab = await open_tab(browser, link)
        await expect(tab.page.locator("#studio")).to_be_visible(timeout=EXPECT_MS)
        await expect(tab.page.locator("#who")).to_have_text("operator (operator)")
        assert "signin" not in tab.page.url
        assert all(code not in url for url in tab.requests)
        await tab.page.fill("#command", "low a lighthouse")
        await tab.page.click("#draw")
        await expect(tab.page.locator("#result")).to_be_visible(timeout=EXPECT_MS)
        [job] = (await s.service.ledger.spend_report("web:operator")).last_jobs
        assert job.status.value == "succeeded"
        tab.assert_only_local(s)

        again = await open_tab(browser, link)
        await expect(again.page.locator("#signin-error")).to_contain_text("already used")
        await expect(again.page.locator("#studio")).to_be_hidden()


async def test_no_operator_link_when_a_bot_runs_beside_the_page(
    site: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async with site(telegram_bot_token=BOT_TOKEN):
        printed = capsys.readouterr().out
    assert "imgbot web page at" in printed and "#signin=" not in printed


# --- hostile calls, without a browser ---------------------------------------------------------


async def _session(http: httpx.AsyncClient, key: str) -> dict[str, str]:
    answer = await http.post("/web/api/session", json={"key": key})
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['token']}"}


async def _job(http: httpx.AsyncClient, headers: dict[str, str], files: list[Any],
               command: str = "low a cat") -> dict[str, Any]:
    answer = await http.post("/web/api/jobs", headers=headers, data={"command": command},
                             files=files)
    assert answer.status_code == 202, answer.text
    state = answer.json()
    while state["state"] not in ("done", "refused", "failed"):
        await asyncio.sleep(0.1)
        state = (await http.get(f"/web/api/jobs/{state['handle']}", headers=headers)).json()
    return dict(state)


async def test_another_users_jobs_are_unknown_to_the_page(site: Any) -> None:
    async with site() as s, httpx.AsyncClient(base_url=s.url) as http:
        alice = await _session(http, s.key)
        _, bob_key = await s.service.ledger.create_api_key("web:bob", "other")
        bob = await _session(http, bob_key)
        done = await _job(http, alice, [])
        assert done["state"] == "done"
        job_id, handle = done["result"]["job_id"], done["handle"]
        own = await http.get(f"/web/api/history/{job_id}", headers=alice)
        assert own.status_code == 200 and own.json()["images"]
        for path in (f"/web/api/history/{job_id}", f"/web/api/jobs/{handle}",
                     "/web/api/history/999999", "/web/api/history/-1",
                     "/web/api/history/99999999999999999999999"):
            answer = await http.get(path, headers=bob)
            assert answer.status_code == 404, path
            assert answer.json()["error"]["message"] == "No such job."
        cancel = await http.post(f"/web/api/jobs/{handle}/cancel", headers=bob)
        assert cancel.status_code == 404
        listed = (await http.get("/web/api/history", headers=bob)).json()
        assert listed["jobs"] == []
        # Without a session, or with a made-up one, nothing answers.
        for headers in ({}, {"Authorization": "Bearer made-up"},
                        {"Authorization": f"Bearer {s.key}"}):
            answer = await http.get("/web/api/history", headers=headers)
            assert answer.status_code == 401


async def test_hostile_jobs_are_refused_with_the_cores_words(site: Any) -> None:
    async with site(web_max_body_bytes=300_000) as s, httpx.AsyncClient(base_url=s.url) as http:
        me = await _session(http, s.key)
        many = [("image", (f"{i}.png", png(16, 16), "image/png")) for i in range(17)]
        state = await _job(http, me, many)
        assert state["state"] == "refused" and "17" in state["message"]
        bad_mask = [("image", ("a.png", png(32, 32), "image/png")),
                    ("mask", ("m.png", b"%PDF-1.4 not an image", "image/png"))]
        state = await _job(http, me, bad_mask)
        assert state["state"] == "refused" and "mask" in state["message"].lower()
        other_size = [("image", ("a.png", png(32, 32), "image/png")),
                      ("mask", ("m.png", png(16, 16), "image/png"))]
        state = await _job(http, me, other_size)
        assert state["state"] == "refused" and "32x32" in state["message"]
        big = await http.post("/web/api/jobs", headers=me, data={"command": "a cat"},
                              files=[("image", ("big.bmp", b"x" * 400_000, "image/bmp"))])
        assert big.status_code == 413
        huge = await http.post("/web/api/estimate", headers=me, json={"command": "a" * 400_000})
        assert huge.status_code == 413
        unknown = await http.post("/web/api/jobs", headers=me, data={"command": "a", "x": "1"})
        assert unknown.status_code == 400
        for body in ({"command": 5}, {"command": "a", "references": [[0, 1]]},
                     {"command": "a", "references": [[1, 1]] * 17},
                     {"command": "a", "set": {"price": "0"}}, [1, 2]):
            answer = await http.post("/web/api/estimate", headers=me, json=body)
            assert answer.status_code == 400, body
        assert s.upstream.api_requests == []
        assert (await s.service.ledger.spend_report(s.user_key)).today == 0


# --- the parts, on their own ------------------------------------------------------------------


def test_init_data_is_checked_as_telegram_documents() -> None:
    now = time.time()
    good = init_data()
    user = verify_init_data(good, BOT_TOKEN, now=now)
    assert (user.id, user.display_name, user.language_code) == (1001, "Ann Lee", "en")
    refusals = {
        "no hash": good.split("&hash=")[0],
        "wrong token": good,
        "a field twice": good + "&auth_date=1",
        "tampered": init_data(tamper={"auth_date": str(int(now))}),
        "no user": urlencode(sign_init_data({"auth_date": str(int(now))})),
        "from the future": init_data(age=-600),
        "garbage": "%%%",
        "empty": "",
    }
    for case, data in refusals.items():
        token = "1:other" if case == "wrong token" else BOT_TOKEN
        with pytest.raises(InitDataRefused) as info:
            verify_init_data(data, token, now=now)
        assert info.value.key == "web.tg_bad", case
    with pytest.raises(InitDataRefused) as info:
        verify_init_data(init_data(age=3601), BOT_TOKEN, now=now)
    assert info.value.key == "web.tg_expired"
    with pytest.raises(InitDataRefused):
        verify_init_data(good, "", now=now)  # no bot token: nothing can be checked


async def test_pickers_rewrite_the_command_through_the_parser(
    make_service: Callable[..., Any]
) -> None:
    async with make_service() as service:
        cases = [
            ("16:9 2K high a cat", {"tier": "4K"}, "16:9 4K high a cat"),
            ("a cat", {"ratio": "16:9"}, "16:9 a cat"),
            ("--ar 3:2 --q medium a fox", {"n": "2"}, "3:2 medium x2 a fox"),
            ("1536x1024 a cat", {"ratio": "16:9"}, "16:9 a cat"),  # a ratio replaces a size
            ("1536x1024 a cat", {"quality": "low"}, "1536x1024 low a cat"),
            ("", {"quality": "low"}, "low "),
            ("16:9", {"tier": "2K"}, "16:9 2K "),
            ("a cat --ar 16:9", {"model": "gpt-image-1.5"}, "16:9 gpt-image-1.5 a cat"),
            ("-- high noon", {"quality": "high"}, "high -- high noon"),
            ("high a cat", {"quality": "auto"}, "a cat"),  # back to the default: no word
            ("16:9 webp file a cat", {"ratio": ""}, "webp file a cat"),
        ]
        for text, changes, expected in cases:
            assert commands.rewrite(service, text, changes) == expected, (text, changes)
            commands.read(service, expected)  # what it writes, the parser reads
        with pytest.raises(PromptError):
            commands.rewrite(service, "a cat", {"ratio": "5:1"})
        with pytest.raises(ValueError):
            commands.rewrite(service, "a cat", {"price": "0"})
        reading = commands.read(service, "2K ", [(300, 200)])
        assert reading.prompt_missing and reading.fields()["size"] == "2064x1376"


def test_the_pages_files_ship_in_the_package() -> None:
    """Every file the page serves is matched by the package-data globs (so wheels have it)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["bots.web"]
    static = ROOT / "bots" / "web" / "static"
    served = [p.relative_to(static.parent).as_posix() for p in static.rglob("*") if p.is_file()]
    assert {"static/index.html", "static/app.js", "static/app.css"} <= set(served)
    assert [f for f in served if not any(fnmatch(f, g) for g in globs)] == []
    html = (static / "index.html").read_text()
    for asset in re.findall(r"(?:src|href)=\"/static/([^\"]+)\"", html):
        assert (static / asset).is_file(), asset
