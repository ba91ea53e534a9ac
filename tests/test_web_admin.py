"""The operators' dashboard (`/admin`) in a real headless Chromium, against the real web door.

As in tests/test_web_page.py (whose fixtures these tests share): uvicorn on 127.0.0.1 in the
test's event loop, the real service on a SQLite ledger, Debian's Chromium through Playwright.
The ledger is seeded beforehand through the store itself (with a clock set back for the
past days) and a kept result is written where the service keeps results; the charts' bars
are then read back out of the SVG and compared with what was seeded. Screenshots are saved
under test-artifacts/web/ (IMGBOT_TEST_ARTIFACTS).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, expect

from core.messages import text as core_text
from core.pricing import Usage, format_credits
from core.requester import Requester
from core.results import FileResults
from core.store import JobSpec, JobStatus, Limits, open_store
from core.types import GeneratedImage
from tests import test_web_page
from tests.test_web_page import BOT_TOKEN, EXPECT_MS, Site, Tab, init_data, open_tab, png, sign_in

# The page tests' fixtures: the running web door and Debian's Chromium.
site = test_web_page.site
browser = test_web_page.browser

SPEC = JobSpec(
    command_text="/img 1:1 high a white cat", model="gpt-image-2", size="1024x1024",
    quality="high", n=1, reference_count=0,
    request_json=json.dumps({"request": {"prompt": "a white cat"}}),
)
ADMIN = "web:boss"


def spec(prompt: str, model: str = "gpt-image-2") -> JobSpec:
    return replace(SPEC, model=model, command_text=f"/img {prompt}",
                   request_json=json.dumps({"request": {"prompt": prompt}}))


def person(uid: str, name: str, chat: str | None = None) -> Requester:
    return Requester("telegram", uid, chat, display_name=name, is_group=bool(chat))


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Seeded:
    """What was put in the ledger, worked out here independently of the store's sums."""

    ids: dict[str, int] = field(default_factory=dict)
    # (model, UTC day) -> credits charged; (series, day) -> tokens
    spend: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    tokens: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    today: str = ""


async def seed(folder: Path) -> Seeded:
    """Fill the ledger the site will open, and keep one job's result as the service would."""
    clock = Clock()
    real_now = clock.now
    seeded = Seeded(today=real_now.strftime("%Y-%m-%d"))
    ann, bob = person("1001", "Ann"), person("1002", "Bob")
    ann_group, cy, dan = person("1001", "Ann", "-100"), person("1003", "Cy"), person("1004", "Dan")
    async with await open_store(f"sqlite:///{folder}/ledger.db", Limits(), clock=clock) as ledger:

        async def drawn(who: Requester, job: JobSpec, estimate: float, cost: float,
                        usage: Usage | None, seconds: float, delivered: bool = True) -> int:
            start = clock.now
            job_id = await ledger.reserve(who, job, estimate)
            await ledger.mark_started(job_id)
            clock.now = start + timedelta(seconds=seconds)
            await ledger.settle(job_id, cost, usage)
            await ledger.finish_delivery(job_id, "seed", delivered)
            clock.now = start
            day = start.strftime("%Y-%m-%d")
            seeded.spend[(job.model, day)] += min(cost, estimate)
            if usage is not None:
                seeded.tokens[("text in", day)] += usage.text_input_tokens
                seeded.tokens[("image in", day)] += usage.image_input_tokens
                seeded.tokens[("image out", day)] += usage.image_output_tokens
            return job_id

        for days_ago in range(1, 10):
            clock.now = real_now - timedelta(days=days_ago)
            await drawn(ann, spec(f"a fox {days_ago}"), 5000, 1000 * days_ago,
                        Usage(10, 0, 1000, 0, 1010), 2)
            if days_ago % 2 == 0:
                await drawn(bob, spec("a boat", "gpt-image-1.5"), 500, 500,
                            Usage(5, 50, 500, 0, 555), 4)
        clock.now = real_now - timedelta(days=60)
        seeded.ids["old"] = await drawn(cy, spec("an old map", "gpt-image-1"), 800, 777, None, 3)

        clock.now = real_now
        seeded.ids["kept"] = await drawn(ann_group, spec("a red lighthouse"), 500, 300,
                                         Usage(20, 100, 2000, 0, 2120), 3)
        seeded.ids["undelivered"] = await drawn(bob, spec("a lost parcel", "gpt-image-1.5"),
                                                400, 400, None, 5, delivered=False)
        seeded.ids["balance"] = await ledger.reserve(bob, spec("a broke bank"), 900)
        await ledger.fail(seeded.ids["balance"], "balance")
        seeded.ids["cancelled"] = await ledger.reserve(ann, spec("a change of mind"), 300)
        await ledger.mark_started(seeded.ids["cancelled"])
        await ledger.fail(seeded.ids["cancelled"], "cancelled")
        # The usage said 260 for a reservation of 200: charged 200, a miss the operator took.
        seeded.ids["miss"] = await drawn(cy, spec("a costly sunset"), 200, 260, None, 1)
        seeded.ids["unsettled"] = await ledger.reserve(cy, spec("a broken call"), 600)
        await ledger.mark_started(seeded.ids["unsettled"])
        await ledger.mark_unsettled(seeded.ids["unsettled"])
        seeded.spend[("gpt-image-2", seeded.today)] += 600
        seeded.ids["queued"] = await ledger.reserve(dan, spec("a waiting line"), 700)
        seeded.spend[("gpt-image-2", seeded.today)] += 700

        await ledger.set_user_limits("telegram:1002", 5000, None)
        await ledger.set_blocked("telegram:1005", True)
        await ledger.set_chat_limit("telegram:-100", 8000)

    image = GeneratedImage(png(300, 200, (220, 40, 40)), "image/png", 300, 200)
    await FileResults(folder / "results").save(seeded.ids["kept"], (image,), revised_prompt=None,
                                               elapsed=3.0)
    return seeded


TODAY_SPEND = 300 + 400 + 200 + 600 + 700  # charged and reserved today (the global total)


async def rects(tab: Tab, chart: str) -> dict[tuple[str, str], float]:
    """Read a chart's bars back out of its SVG: (series, label) -> value."""
    found = await tab.page.evaluate(
        """(id) => [...document.querySelectorAll(`#${id} rect`)].map((r) =>
             [r.getAttribute("data-series"), r.getAttribute("data-label"),
              Number(r.getAttribute("data-value"))])""", chart)
    return {(series, label): value for series, label, value in found}


async def open_dashboard(browser: Browser, s: Site, key: str, *, locale: str = "en-US") -> Tab:
    tab = await open_tab(browser, s.url + "/", locale=locale)
    await sign_in(tab, key)
    await expect(tab.page.locator("#dashboard-link")).to_be_visible()
    await tab.page.click("#dashboard-link")
    await expect(tab.page.locator("#dash")).to_be_visible(timeout=EXPECT_MS)
    return tab


async def choose_period(tab: Tab, days: str, jobs: str) -> None:
    await tab.page.select_option("#period", days)
    await expect(tab.page.locator("#card-jobs .v")).to_have_text(jobs, timeout=EXPECT_MS)


# --- the charts and cards ----------------------------------------------------------------------


async def test_the_dashboard_draws_the_seeded_ledger(
    site: Any, browser: Browser, tmp_path: Path
) -> None:
    seeded = await seed(tmp_path)
    async with site(admins=ADMIN, global_daily_limit=2500) as s:
        _, key = await s.service.ledger.create_api_key(ADMIN, "dashboard")
        tab = await open_dashboard(browser, s, key)
        await choose_period(tab, "1", "7")
        page = tab.page
        en = "en"

        def credits(value: float) -> str:
            return format_credits(value, s.service.prices, en)

        await expect(page.locator("#card-today .v")).to_have_text(credits(TODAY_SPEND))
        await expect(page.locator("#card-today .h")).to_have_text(
            f"{round(TODAY_SPEND / 2500 * 100)}% of the global daily limit {credits(2500)}")
        await expect(page.locator("#card-today")).to_have_class(re.compile(r"\balarm\b"))
        await expect(page.locator("#card-jobs .h")).to_have_text(
            "2 delivered · 2 failed · 1 cancelled · 1 undelivered · 1 open")
        # delivered / (delivered + failed + undelivered) = 2 / 5
        await expect(page.locator("#card-success .v")).to_have_text("40.0%")
        # Drawn today in 3, 5 and 1 s: the median is 3, the 95th percentile 5.
        await expect(page.locator("#card-time .v")).to_have_text("3.0 s · 5.0 s")
        await expect(page.locator("#card-balance .v")).to_have_text("1")
        await expect(page.locator("#card-balance")).to_have_class(re.compile(r"\balarm\b"))
        month = sum(v for (_, day), v in seeded.spend.items() if day[:7] == seeded.today[:7])
        await expect(page.locator("#card-month .v")).to_have_text(credits(month))

        # Outcomes: each bar is a kind (and a failure's code) with its count.
        outcomes = {label: value for (_, label), value in (await rects(tab, "chart-outcomes")).items()}
        assert outcomes == {"delivered": 2, "failed: balance": 1, "failed": 1, "undelivered": 1,
                            "cancelled": 1, "open": 1}

        # Daily spend by model over 30 days: every seeded bar, and nothing else.
        expected_30 = {(model, day): value for (model, day), value in seeded.spend.items()
                       if value and day >= (datetime.now(UTC) - timedelta(days=29)).strftime("%F")}
        assert await rects(tab, "chart-spend") == pytest.approx(expected_30)
        await expect(page.locator("#legend-spend")).to_have_text(
            re.compile(r"gpt-image-1\.5.*gpt-image-2"))
        tokens = {k: v for k, v in seeded.tokens.items() if v}
        assert await rects(tab, "chart-tokens") == tokens
        # The estimator's miss: reserved 200, the usage said 260.
        miss = f"#{seeded.ids['miss']}"
        assert await rects(tab, "chart-misses") == {("reserved", miss): 200,
                                                    ("reported", miss): 260}
        await expect(page.locator("#misses-summary")).to_contain_text("60 credits absorbed")
        await tab.shot("admin-today")

        # 90 days bring the 60-day-old job (another model) into the chart.
        await page.select_option("#chart-days", "90")
        legend = page.locator("#legend-spend li")
        await expect(legend).to_have_text(["gpt-image-1", "gpt-image-1.5", "gpt-image-2"])
        bars = await rects(tab, "chart-spend")
        assert bars == pytest.approx({k: v for k, v in seeded.spend.items() if v})
        await choose_period(tab, "30", str(7 + 9 + 4))
        await tab.shot("admin-90-days")

        # Tables: top users of the period, open reservations, unsettled, undelivered.
        await expect(page.locator("#top-users tbody tr").first).to_have_attribute(
            "data-user", "telegram:1001")
        await expect(page.locator("#open-jobs tbody tr")).to_have_attribute(
            "data-job", str(seeded.ids["queued"]))
        await expect(page.locator("#unsettled tbody tr")).to_have_attribute(
            "data-job", str(seeded.ids["unsettled"]))
        await expect(page.locator("#undelivered tbody tr")).to_have_attribute(
            "data-job", str(seeded.ids["undelivered"]))
        await expect(page.locator("#top-chats tbody tr")).to_have_attribute(
            "data-chat", "telegram:-100")
        await expect(page.locator("#user-limits tbody tr")).to_have_count(2)
        await expect(page.locator("#chat-limits tbody tr[data-chat='telegram:-100']")).to_contain_text(
            "8,000")
        assert await page.locator("#purchases").is_hidden()
        tab.assert_only_local(s)


# --- refunds, once ---------------------------------------------------------------------------


async def test_a_refund_from_the_dashboard_changes_the_ledger_once(
    site: Any, browser: Browser, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    seeded = await seed(tmp_path)
    job_id = seeded.ids["undelivered"]
    async with site() as s:
        # The operator's one-time link (the web door runs alone) is an admin's session.
        [link] = re.findall(r"(http://\S+/#signin=\S+)", capsys.readouterr().out)
        tab = await open_tab(browser, link)
        await expect(tab.page.locator("#dashboard-link")).to_be_visible(timeout=EXPECT_MS)
        await tab.page.click("#dashboard-link")
        await expect(tab.page.locator("#dash")).to_be_visible(timeout=EXPECT_MS)
        before = await s.service.spend_report(person("1002", "Bob"))

        row = tab.page.locator(f"#undelivered tr[data-job='{job_id}']")
        button = row.locator("button[data-refund]")
        await button.click()  # arms
        await expect(button).to_have_text(f"Refund #{job_id}?")
        assert (await s.service.job(job_id)).status is JobStatus.SUCCEEDED  # type: ignore[union-attr]
        await button.click()
        done = core_text("en", "refund.done", job_id=job_id, credits=400, user="telegram:1002")
        await expect(tab.page.locator("#action-message")).to_have_text(done, timeout=EXPECT_MS)
        await expect(row).to_have_count(0)
        await tab.shot("admin-refunded")

        job = await s.service.job(job_id)
        assert job is not None and job.status is JobStatus.REFUNDED
        assert job.refunded_by == "web:operator"
        after = await s.service.spend_report(person("1002", "Bob"))
        assert after.today == pytest.approx(before.today - 400)

        # The same refund again (a second tab, a replayed request): refused, nothing changes.
        token = await tab.page.evaluate("() => localStorage.getItem('imgbot.session')")
        async with httpx.AsyncClient(base_url=s.url) as http:
            again = await http.post("/web/api/admin/action",
                                    headers={"Authorization": f"Bearer {token}"},
                                    json={"command": "refund", "args": [str(job_id)]})
        assert again.status_code == 400
        assert again.json()["error"]["message"] == core_text(
            "en", "refund.not_refundable", job_id=job_id, status="refunded")
        assert await s.service.job(job_id) == job
        assert (await s.service.spend_report(person("1002", "Bob"))).today == after.today
        tab.assert_only_local(s)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert logged.count(f"admin action by web:operator: refund {job_id}") == 1
    assert f"admin action by web:operator refused (not_refundable): refund {job_id}" in logged
    assert token not in logged


# --- who may ------------------------------------------------------------------------------------


async def test_non_admins_get_403_and_nothing_of_the_ledger(
    site: Any, browser: Browser, tmp_path: Path
) -> None:
    seeded = await seed(tmp_path)
    job_id = seeded.ids["undelivered"]
    async with site(admins=ADMIN) as s:
        tab = await open_tab(browser, s.url + "/")
        await sign_in(tab, s.key)  # web:alice, not an admin
        assert await tab.page.locator("#dashboard-link").is_hidden()
        await tab.page.goto(s.url + "/admin")
        await expect(tab.page.locator("#gate-message")).to_have_text(
            "The dashboard is for the bot's admins only (ADMINS, or the operator's sign-in link).")
        assert await tab.page.locator("#dash").is_hidden()
        await tab.shot("admin-refused")
        token = await tab.page.evaluate("() => localStorage.getItem('imgbot.session')")

        calls = [
            ("GET", "/web/api/admin/overview", None),
            ("GET", "/web/api/admin/overview?days=90&chart=90", None),
            ("GET", "/web/api/admin/users/telegram:1001/jobs", None),
            ("GET", f"/web/api/admin/jobs/{seeded.ids['kept']}/images/0", None),
            ("GET", "/web/api/admin/export?days=30", None),
            ("POST", "/web/api/admin/action", {"command": "refund", "args": [str(job_id)]}),
            ("POST", "/web/api/admin/action", {"command": "block", "args": ["telegram:1001"]}),
        ]
        async with httpx.AsyncClient(base_url=s.url) as http:
            for method, path, body in calls:
                alice = await http.request(method, path, json=body,
                                           headers={"Authorization": f"Bearer {token}"})
                assert alice.status_code == 403, (path, alice.text)
                assert alice.json()["error"]["code"] == "admin_only"
                assert "telegram:1001" not in alice.text and "lighthouse" not in alice.text
                nobody = await http.request(method, path, json=body)
                assert nobody.status_code == 401, path
                # A cookie is no credential here: only the Authorization header is.
                cookie = await http.request(method, path, json=body,
                                            headers={"Cookie": f"session={token}"})
                assert cookie.status_code == 401, path
            # A Telegram Mini App user in ADMINS is an admin; one who is not, is not.
            boss = await http.post("/web/api/session/telegram",
                                   json={"init_data": init_data({"id": 1001, "first_name": "A"})})
        assert boss.status_code == 404  # no bot token on this site: the Mini App is off
        job = await s.service.job(job_id)
        assert job is not None and job.status is JobStatus.SUCCEEDED
        assert not await s.service.ledger.is_blocked("telegram:1001", None)

    async with site(admins="telegram:1001", telegram_bot_token=BOT_TOKEN) as s:
        async with httpx.AsyncClient(base_url=s.url) as http:

            async def mini_app(uid: int) -> dict[str, str]:
                answer = await http.post("/web/api/session/telegram", json={
                    "init_data": init_data({"id": uid, "first_name": "T"})})
                assert answer.status_code == 200, answer.text
                return {"Authorization": f"Bearer {answer.json()['token']}"}

            admin = await http.get("/web/api/admin/overview?days=90", headers=await mini_app(1001))
            assert admin.status_code == 200
            assert admin.json()["cards"]["jobs"] == 7 + 9 + 4 + 1
            other = await http.get("/web/api/admin/overview", headers=await mini_app(1002))
            assert other.status_code == 403
            bad = await http.get("/web/api/admin/overview?days=5", headers=await mini_app(1001))
            assert bad.status_code == 400


# --- drill-down, limits and blocks, CSV -----------------------------------------------------------


async def test_drill_down_limits_blocks_and_csv_export(
    site: Any, browser: Browser, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    seeded = await seed(tmp_path)
    async with site(admins=ADMIN) as s:
        _, key = await s.service.ledger.create_api_key(ADMIN, "dashboard")
        tab = await open_dashboard(browser, s, key)
        page = tab.page
        await choose_period(tab, "1", "7")

        # One user's jobs, newest first, with the thumbnail of the result still kept.
        await page.click("#top-users tr[data-user='telegram:1001']")
        await expect(page.locator("#drill")).to_be_visible()
        await expect(page.locator("#drill-title")).to_have_text("Jobs of telegram:1001 (today)")
        rows = page.locator("#drill-jobs tbody tr")
        await expect(rows).to_have_count(2)
        kept = page.locator(f"#drill-jobs tr[data-job='{seeded.ids['kept']}']")
        await expect(kept).to_contain_text("a red lighthouse")
        await expect(kept).to_contain_text("1024x1024 · high · gpt-image-2")
        await expect(kept).to_contain_text(format_credits(300, s.service.prices, "en"))
        await expect(kept).to_contain_text("delivered")
        thumb = kept.locator(f"img[data-thumb='{seeded.ids['kept']}-0']")
        await expect(thumb).to_be_visible()
        size = await thumb.evaluate("(img) => [img.naturalWidth, img.naturalHeight]")
        assert size == [256, 171]  # a small JPEG of the 300x200 original
        assert (await thumb.get_attribute("src") or "").startswith("blob:")
        gone = page.locator(f"#drill-jobs tr[data-job='{seeded.ids['cancelled']}']")
        await expect(gone).to_contain_text("cancelled: cancelled")
        await expect(gone).to_contain_text("not kept")
        await tab.shot("admin-drill-down")

        # Limits and blocks through the form: the same admin commands as in the chats.
        await page.fill("#limit-key", "telegram:1004")
        await page.fill("#limit-daily", "1234")
        await page.click("#limit-save")
        said = core_text("en", "admin.limit_set", who="telegram:1004", daily="1,234",
                         monthly=core_text("en", "balance.default_limit"))
        await expect(page.locator("#action-message")).to_have_text(said)
        dan = await s.service.ledger.get_user("telegram:1004")
        assert dan is not None and (dan.daily_limit, dan.monthly_limit) == (1234, None)
        await expect(page.locator("#user-limits tr[data-user='telegram:1004']")).to_contain_text(
            "1,234")
        await page.click("#limit-block")
        await expect(page.locator("#action-message")).to_have_text("telegram:1004 is blocked.")
        assert await s.service.ledger.is_blocked("telegram:1004", None)
        await page.click("#limit-unblock")
        await expect(page.locator("#action-message")).to_have_text("telegram:1004 is unblocked.")
        assert not await s.service.ledger.is_blocked("telegram:1004", None)
        # Editing a row fills the form; a chat takes a daily limit only.
        await page.click("#chat-limits tr[data-chat='telegram:-100'] button")
        assert await page.input_value("#limit-key") == "telegram:-100"
        assert await page.locator("#limit-monthly-box").is_hidden()
        await page.fill("#limit-daily", "0")
        await page.click("#limit-save")
        await expect(page.locator("#action-message")).to_have_text(core_text(
            "en", "admin.chatlimit_set", who="telegram:-100",
            daily=core_text("en", "balance.unlimited")))
        chat = await s.service.ledger.get_chat("telegram:-100")
        assert chat is not None and chat.daily_limit == 0
        # What the core refuses is said in its words, and changes nothing.
        await page.select_option("#limit-kind", "user")
        await page.fill("#limit-key", "telegram:1004")
        await page.fill("#limit-daily", "lots")
        await page.click("#limit-save")
        await expect(page.locator("#action-error")).to_have_text(
            core_text("en", "admin.bad_amount", value="lots"))
        assert (await s.service.ledger.get_user("telegram:1004")).daily_limit == 1234  # type: ignore[union-attr]

        # The period's CSV, fetched with the session and saved by the browser.
        async with page.expect_download() as downloading:
            await page.click("#export")
        download = await downloading.value
        assert re.fullmatch(r"imgbot-jobs-\d{8}-1d\.csv", download.suggested_filename)
        body = (await asyncio.to_thread(Path(await download.path()).read_text, "utf-8"))
        records = list(csv.DictReader(io.StringIO(body)))
        today_ids = {v for k, v in seeded.ids.items() if k != "old"}
        assert {int(r["id"]) for r in records} == today_ids
        tab.assert_only_local(s)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for line in ("admin action by web:boss: limit telegram:1004 daily=1234 monthly=default",
                 "admin action by web:boss: block telegram:1004",
                 "admin action by web:boss: unblock telegram:1004",
                 "admin action by web:boss: chatlimit telegram:-100 daily=0",
                 "admin action by web:boss refused (bad_amount): limit telegram:1004 daily=lots",
                 "dashboard: web:boss exported 1 day(s) as CSV"):
        assert line in logged, line
    assert key not in logged


async def test_the_dashboard_in_chinese(site: Any, browser: Browser, tmp_path: Path) -> None:
    await seed(tmp_path)
    async with site(admins=ADMIN) as s:
        _, key = await s.service.ledger.create_api_key(ADMIN, "dashboard")
        tab = await open_dashboard(browser, s, key, locale="zh-CN")
        page = tab.page
        await choose_period(tab, "1", "7")
        await expect(page.locator("h2").first).to_have_text("按模型的每日花费")
        await expect(page.locator("#card-success .k")).to_have_text("成功率")
        await expect(page.locator("#card-jobs .h")).to_have_text(
            "2 已送达 · 2 失败 · 1 已取消 · 1 未送达 · 1 进行中")
        outcomes = {label for (_, label) in await rects(tab, "chart-outcomes")}
        assert "失败: balance" in outcomes and "未送达" in outcomes
        await expect(page.locator("#card-today .v")).to_have_text(
            format_credits(TODAY_SPEND, s.service.prices, "zh"))
        await page.fill("#limit-key", "telegram:1004")
        await page.click("#limit-block")
        await expect(page.locator("#action-message")).to_have_text(
            core_text("zh", "admin.blocked", who="telegram:1004"))
        await tab.shot("admin-zh")
        tab.assert_only_local(s)


# --- purchases (Telegram Stars) and what prepaid jobs spent ---------------------------------------


async def test_the_purchases_section_shows_stars_credits_and_upstream_cost(
    site: Any, browser: Browser, tmp_path: Path
) -> None:
    prepaid = replace(spec("a paid fox"), prepaid=True)
    async with await open_store(f"sqlite:///{tmp_path}/ledger.db", Limits()) as ledger:
        stars = dict(provider="telegram_stars", provider_charge_id="", currency="XTR")
        await ledger.record_purchase("telegram:1001", charge_id="stxA", pack="pack:50:20000",
                                     amount=50, credits=20_000, **stars)
        refunded, _ = await ledger.record_purchase(
            "telegram:1002", charge_id="stxB", pack="pack:100:45000", amount=100,
            credits=45_000, **stars)
        await ledger.refund_purchase(refunded.id, by="telegram:42")  # unspent: all taken back
        # A prepaid job: reserved 15,000, the usage said 12,000.
        job = await ledger.reserve(person("1001", "Ann"), prepaid, 15_000)
        await ledger.mark_started(job)
        await ledger.settle(job, 12_000, Usage(10, 0, 1000, 0, 1010))
        # One still drawing holds 3,000 of the balance.
        await ledger.reserve(person("1001", "Ann"), prepaid, 3000)
    async with site(admins=ADMIN, billing="prepaid") as s:
        _, key = await s.service.ledger.create_api_key(ADMIN, "dashboard")
        tab = await open_dashboard(browser, s, key)
        page = tab.page
        prices = s.service.prices

        def credits(value: float) -> str:
            return format_credits(value, prices, "en")

        section = page.locator("#purchases")
        await expect(section).to_be_visible()
        await expect(section.locator("h2")).to_have_text("Purchases")
        await expect(page.locator("#buy-count .v")).to_have_text("2")
        await expect(page.locator("#buy-count .h")).to_have_text("1 refunded")
        await expect(page.locator("#buy-stars .v")).to_have_text("150")
        await expect(page.locator("#buy-stars .h")).to_have_text("100 refunded · 50 kept")
        await expect(page.locator("#buy-credits .v")).to_have_text(credits(65_000))
        await expect(page.locator("#buy-credits .h")).to_have_text(
            f"{credits(45_000)} taken back by refunds")
        await expect(page.locator("#buy-spent .v")).to_have_text(credits(12_000))
        await expect(page.locator("#buy-spent .h")).to_have_text(
            f"1 jobs settled · {credits(3000)} still held")
        # Credits are priced from the upstream's cost: 12,000 credits are ¥1.20 at the
        # default 10,000 credits a yuan, and that over 7.1 yuan a dollar.
        yuan = 12_000 / prices.credits_per_cny
        usd = yuan / prices.cny_per_usd
        await expect(page.locator("#buy-upstream .v")).to_have_text(f"¥{yuan:,.2f} · ${usd:,.2f}")
        assert f"{yuan:.2f}" == "1.20" and f"{usd:.2f}" == "0.17"
        await tab.shot("admin-purchases")

        # The same in Chinese.
        zh = await open_dashboard(browser, s, key, locale="zh-CN")
        await expect(zh.page.locator("#purchases h2")).to_have_text("购买")
        await expect(zh.page.locator("#buy-stars .k")).to_have_text("收入 Stars")
        await expect(zh.page.locator("#buy-stars .h")).to_have_text("100 已退款 · 50 留存")
        await expect(zh.page.locator("#buy-spent .v")).to_have_text(
            format_credits(12_000, prices, "zh"))
        tab.assert_only_local(s)
        zh.assert_only_local(s)
