"""The `imgbot` command: run, gen, parse, usage, admin, keys, doctor, backup, db."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bots.logs import setup_logging
from core.config import Settings, SettingsError, load_settings
from core.errors import Cancelled, ImgbotError, PromptError
from core.messages import language_of
from core.pricing import PriceTable, estimate_credits, format_credits
from core.prompt import PromptDefaults, parse_command
from core.requester import Requester
from core.runner import JobRunner
from core.service import DrawOutcome
from core.store import StoreError
from core.types import IncomingImage, Progress

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
CANCELLED_LINE = "cancelled (Ctrl-C): the image service had not answered; nothing was charged"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def check_output_folder(out: Path) -> str | None:
    """Make sure `-o` is a folder the images can be saved in; return why not (None: ok).

    Checked before anything is drawn or charged: a folder that exists or can be created,
    and can be written. `-o` is always a folder: an existing file, or a name that looks
    like an image file, is refused rather than drawn for and lost.
    """
    if out.exists() and not out.is_dir():
        return f"-o {out}: this is a file, not a folder; -o names the folder the images are saved in"
    if not out.exists() and out.suffix.lower() in IMAGE_SUFFIXES:
        return (
            f"-o {out}: looks like a file name; -o names the folder the images are saved in "
            f"(they are named imgbot-<time>-<job>-<n>{out.suffix.lower()})"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        return f"-o {out}: cannot save images there ({err.strerror or err})"
    return None


def _cli_requester(settings: Settings) -> Requester:
    user = os.environ.get("USER") or getpass.getuser() or "local"
    return Requester(
        platform="cli",
        user_id=user,
        display_name=user,
        language=os.environ.get("LANG", settings.default_language)[:2],
        is_admin=True,
    )


def cmd_parse(settings: Settings, args: argparse.Namespace) -> int:
    """Print the parsed request as JSON; call nothing."""
    text = " ".join(args.text)
    if args.model:
        text = f"{args.model} {text}"
    lang = language_of(os.environ.get("LANG"))
    try:
        request = parse_command(text, PromptDefaults.from_settings(settings))
    except PromptError as err:
        print(err.user_message(lang), file=sys.stderr)
        return 2
    prices = PriceTable.from_settings(settings)
    estimate = estimate_credits(request, prices)
    out = {
        "model": request.model,
        "prompt": request.prompt,
        "size": request.size,
        "quality": request.quality,
        "n": request.n,
        "output_format": request.output_format,
        "background": request.background,
        "estimated_credits": round(estimate),
        "estimated_cost": format_credits(estimate, prices, lang),
        "notes": [n.render(lang) for n in request.notices],
    }
    print(json.dumps(out, ensure_ascii=False, indent=2))
    return 0


async def _gen(settings: Settings, args: argparse.Namespace) -> int:
    from core.runtime import open_service

    # Previews are asked for (and paid) only when they are to be saved.
    requester = dataclasses.replace(_cli_requester(settings), previews=args.partials)
    lang = language_of(requester.language)
    refs = []
    for path in args.image or []:
        p = Path(path)
        try:
            refs.append(IncomingImage(await asyncio.to_thread(p.read_bytes), p.name))
        except OSError as err:
            print(f"{p}: {err.strerror}", file=sys.stderr)
            return 2
    out_dir = Path(args.output)
    problem = await asyncio.to_thread(check_output_folder, out_dir)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    reply = TerminalReply(out_dir, lang, sys.stderr.isatty())
    async with open_service(settings) as service:
        reply.prices = service.prices
        interrupted = asyncio.Event()
        service.client = StoppableClient(service.client, interrupted)
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()

        def on_sigint() -> None:
            if interrupted.is_set() and main is not None:
                main.cancel()  # a second Ctrl-C: stop now, whatever the ledger says
                return
            reply.interrupted = True
            interrupted.set()

        loop.add_signal_handler(signal.SIGINT, on_sigint)
        ticker = asyncio.create_task(reply.tick()) if reply.tty else None

        async def references() -> list[IncomingImage]:
            return refs

        try:
            await JobRunner(service).run(requester, " ".join(args.text), references, reply)
        finally:
            if ticker is not None:
                ticker.cancel()
            loop.remove_signal_handler(signal.SIGINT)
    # 130 only when Ctrl-C cancelled the job; a result or a failure that came first stands.
    return reply.exit_code


class StoppableClient:
    """The image client, with Ctrl-C: a call still waiting for its answer ends, cancelled.

    The upstream never answered, so the job is released as failed (`cancelled`) and
    nothing is charged; an answer that came first is kept, charged and saved as usual.
    """

    def __init__(self, client: Any, stop: asyncio.Event) -> None:
        self._client = client
        self._stop = stop

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def draw(self, request: Any, references: Sequence[Any] = (), **options: Any) -> Any:
        """Draw through the real client unless Ctrl-C comes first."""
        if self._stop.is_set():
            raise Cancelled("job.cancelled")
        call = asyncio.ensure_future(self._client.draw(request, references, **options))
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({call, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not call.done():
                call.cancel()
                try:
                    await call
                except BaseException:  # noqa: BLE001 - the abandoned call's end does not matter
                    pass
        if not call.cancelled():
            return call.result()
        raise Cancelled("job.cancelled")


class TerminalReply:
    """The runner's Reply in a terminal: progress on stderr, images saved, paths printed."""

    def __init__(self, out_dir: Path, lang: str, tty: bool) -> None:
        self.out_dir = out_dir
        self.lang = lang
        self.tty = tty
        self.prices: PriceTable | None = None
        self.exit_code = 0
        self.interrupted = False  # Ctrl-C was pressed
        self._started = time.monotonic()
        self._stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        self.partials: list[Path] = []  # previews saved (gen --partials)

    async def tick(self) -> None:
        """Show the elapsed time every second while the job runs."""
        while True:
            await asyncio.sleep(1)
            await self.progress(Progress("working"))

    async def progress(self, event: Progress) -> None:
        """Show where the job is, on one terminal line; save previews as they come."""
        if event.kind == "partial" and event.image is not None:
            await self._save_partial(event)
        if not self.tty:
            return
        if event.kind == "queued":
            sys.stderr.write(f"\rqueued #{event.position}   ")
        elif event.kind in ("started", "working"):
            sys.stderr.write(f"\rdrawing… {time.monotonic() - self._started:.0f}s   ")
        elif event.kind == "done":
            sys.stderr.write("\r" + " " * 30 + "\r")
        sys.stderr.flush()

    async def _save_partial(self, event: Progress) -> None:
        assert event.image is not None
        ext = EXTENSIONS.get(event.image.mime, "png")
        name = f"imgbot-{self._stamp}-{event.job_id}-preview{event.index + 1}.{ext}"
        path = self.out_dir / name
        await asyncio.to_thread(path.write_bytes, event.image.data)
        self.partials.append(path)
        if self.tty:
            sys.stderr.write("\r" + " " * 30 + "\r")
        print(f"{path}  {event.image.width}x{event.image.height}  preview {event.index + 1}",
              flush=True)

    async def result(self, outcome: DrawOutcome, four_k_credits: float | None) -> list[str]:
        """Save the images and print their paths, the notices, the cost and the time."""
        await asyncio.to_thread(self.out_dir.mkdir, parents=True, exist_ok=True)
        stamp = self._stamp
        for i, image in enumerate(outcome.images, 1):
            ext = EXTENSIONS.get(image.mime, "png")
            path = self.out_dir / f"imgbot-{stamp}-{outcome.job_id}-{i}.{ext}"
            await asyncio.to_thread(path.write_bytes, image.data)
            print(f"{path}  {image.width}x{image.height}")
        for notice in outcome.request.notices:
            print(notice.render(self.lang))
        assert self.prices is not None
        print(f"cost: {format_credits(outcome.credits, self.prices, self.lang)}  "
              f"time: {outcome.elapsed:.1f}s  job: #{outcome.job_id}")
        return []  # files on disk are no handle a later "vary" could fetch

    async def refusal(self, message: str | None, error: ImgbotError | None = None) -> None:
        """Print why nothing was drawn; exit 1 for an upstream failure, else 2."""
        if self.tty:
            sys.stderr.write("\r")
        if self.interrupted and isinstance(error, Cancelled):
            print(CANCELLED_LINE, file=sys.stderr)
            self.exit_code = EXIT_INTERRUPTED
            return
        if message:
            print(message, file=sys.stderr)
        if error is not None:
            self.exit_code = 1 if error.key.startswith("upstream") else 2

    async def failure(self, message: str) -> None:
        """Print that something went wrong on our side."""
        print(message, file=sys.stderr)
        self.exit_code = 1


async def _usage(settings: Settings, args: argparse.Namespace) -> int:
    from core.pricing import PriceTable
    from core.reports import render_balance
    from core.store import Limits, open_store

    lang = language_of(os.environ.get("LANG"))
    since = None
    if args.since:
        try:
            since = datetime.fromisoformat(args.since).replace(tzinfo=UTC)
        except ValueError:
            print("--since: expected a date like 2026-11-01", file=sys.stderr)
            return 2
    ledger = await open_store(settings.store_url, Limits.from_settings(settings), pool_size=2)
    try:
        if args.csv:
            sys.stdout.write(await ledger.export_csv(since=since, user_key=args.user))
            return 0
        prices = PriceTable.from_settings(settings)
        if args.user:
            print(render_balance(await ledger.spend_report(args.user), prices, lang))
            return 0
        if args.flagged:
            return await _print_flagged(ledger, since, prices, lang)
        since = since or datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        rows = await ledger.top_spenders(since, 50)
        print(f"spend since {since:%Y-%m-%d %H:%M} UTC")
        if not rows:
            print("(no jobs)")
        for user_key, display, credits, jobs in rows:
            print(f"{user_key:<28} {display[:20]:<20} {format_credits(credits, prices, lang):>28} {jobs:>5} jobs")
        return 0
    finally:
        await ledger.close()


async def _print_flagged(ledger: Any, since: datetime | None, prices: Any, lang: str) -> int:
    """List jobs whose charge is not simply their usage: estimator misses the operator
    absorbed (usage above the reservation) and usage that could not be a bill."""
    since = since or datetime.now(UTC) - timedelta(days=30)
    jobs = await ledger.flagged_jobs(since)
    print(f"flagged charges since {since:%Y-%m-%d} UTC")
    if not jobs:
        print("(none)")
    absorbed = 0.0
    for job in jobs:
        charged = format_credits(job.charged, prices, lang)
        said = "" if job.reported_credits is None else f", usage said {job.reported_credits:,.0f}"
        print(f"#{job.id} {job.created_at:%Y-%m-%d %H:%M} {job.user_key} {job.usage_flag}: "
              f"charged {charged} (reserved {job.estimated_credits:,.0f}{said})")
        if job.reported_credits is not None and job.actual_credits is not None:
            absorbed += job.reported_credits - job.actual_credits
    if absorbed:
        print(f"absorbed above the estimates: {absorbed:,.0f} credits")
    return 0


async def _admin(settings: Settings, args: argparse.Namespace) -> int:
    from core.admin import run_admin
    from core.runtime import open_service

    requester = _cli_requester(settings)
    lang = language_of(requester.language)
    async with open_service(settings) as service:
        try:
            print(await run_admin(service, requester, args.action, args.args))
        except ImgbotError as err:
            print(err.user_message(lang), file=sys.stderr)
            return 2
    return 0


def cmd_backup(settings: Settings, args: argparse.Namespace) -> int:
    """Copy the ledger to a file, consistently, even while the bot runs (both backends)."""
    from bots.backup import BackupError, backup_store

    try:
        report = asyncio.run(backup_store(settings.store_url, args.path))
    except BackupError as err:
        print(str(err), file=sys.stderr)
        return 1
    print(f"backup written: {report.path} ({report.jobs} jobs, integrity ok)")
    return 0


async def _db(settings: Settings, args: argparse.Namespace) -> int:
    from core.store import Limits, open_store
    from core.store.copy import copy_store

    if args.action == "upgrade":
        store = await open_store(settings.store_url, Limits(), pool_size=2)
        try:
            print(f"{store.describe()}: schema v{await store.schema_version()}, up to date")
        finally:
            await store.close()
        return 0
    source = await open_store(args.source, Limits(), pool_size=2)
    try:
        target = await open_store(args.target, Limits(), pool_size=4)
        try:
            report = await copy_store(source, target)
        finally:
            await target.close()
    finally:
        await source.close()
    print(f"{source.describe()} -> {target.describe()}: {report.summary()}")
    return 0 if report.ok else 1


async def _keys(settings: Settings, args: argparse.Namespace) -> int:
    """Make, list and revoke personal API keys (a key is printed once, only when made)."""
    from core.ids import key_problem
    from core.store import Limits, open_store

    lang = language_of(os.environ.get("LANG"))
    for word in (getattr(args, "user", None),):
        problem = key_problem(word) if word else None
        if problem is not None:
            print(problem.user_message(lang), file=sys.stderr)
            return 2
    ledger = await open_store(settings.store_url, Limits.from_settings(settings), pool_size=2)
    try:
        if args.action == "create":
            key_id, plaintext = await ledger.create_api_key(args.user, args.name or "")
            print(plaintext)
            print(f"key #{key_id} for {args.user}: shown once, keep it safe "
                  "(only its hash is stored)", file=sys.stderr)
            return 0
        if args.action == "list":
            keys = await ledger.list_api_keys(args.user)
            if not keys:
                print("(no keys)")
            for k in keys:
                state = "active" if k.active else f"revoked {k.revoked_at:%Y-%m-%d %H:%M}"
                used = f"{k.last_used_at:%Y-%m-%d %H:%M}" if k.last_used_at else "never"
                print(f"#{k.id:<5} {k.user_key:<28} {k.name[:20]:<20} "
                      f"made {k.created_at:%Y-%m-%d} used {used} {state}")
            return 0
        if await ledger.revoke_api_key(args.id):
            print(f"key #{args.id} revoked")
            return 0
        print(f"no active key #{args.id}", file=sys.stderr)
        return 1
    finally:
        await ledger.close()


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgbot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="start every bot whose token is set")
    p = sub.add_parser("parse", help="show how a command is read, and its estimated cost")
    p.add_argument("text", nargs="+")
    p.add_argument("--model")
    g = sub.add_parser("gen", help="draw from the terminal")
    g.add_argument("text", nargs="+")
    g.add_argument("-i", "--image", action="append", help="reference image (repeatable)")
    g.add_argument("-o", "--output", default=".", help="folder for the images")
    g.add_argument(
        "--partials",
        action="store_true",
        help="also save the previews the image API streams while drawing (PREVIEWS=on; "
        "each costs ~100 output tokens)",
    )
    u = sub.add_parser("usage", help="spend reports from the ledger")
    u.add_argument("--user", help="platform:id")
    u.add_argument("--since", help="YYYY-MM-DD (UTC)")
    u.add_argument("--csv", action="store_true", help="export jobs as CSV")
    u.add_argument(
        "--flagged",
        action="store_true",
        help="jobs charged other than their usage: estimator misses, unusable usage",
    )
    a = sub.add_parser("admin", help="limits, refunds, blocks: limit|chatlimit|refund|block|unblock|top|chats|unsettled")
    a.add_argument("action")
    a.add_argument("args", nargs="*")
    sub.add_parser("doctor", help="check settings, API key, bot tokens and the database")
    sub.add_parser("health", help="exit 0 when a running bot is alive (for Docker)")
    b = sub.add_parser(
        "backup", help="copy the ledger to PATH safely, even while the bot runs (never cp the .db)"
    )
    b.add_argument("path", help="file (or folder) for the copy")
    d = sub.add_parser("db", help="the ledger's store: upgrade | copy SRC_URL DST_URL")
    dsub = d.add_subparsers(dest="action", required=True)
    dsub.add_parser("upgrade", help="apply the schema migrations to DATABASE_URL")
    c = dsub.add_parser(
        "copy", help="copy a whole ledger into an empty one (SQLite <-> PostgreSQL), then verify"
    )
    c.add_argument("source", help="sqlite:///path or postgresql://… to copy from")
    c.add_argument("target", help="an empty ledger to copy into")
    k = sub.add_parser("keys", help="personal API keys: create USER [--name N] | list | revoke ID")
    ksub = k.add_subparsers(dest="action", required=True)
    kc = ksub.add_parser("create", help="make a key for USER (telegram:42, web:alice); shown once")
    kc.add_argument("user", help="platform:id of the ledger user the key draws as")
    kc.add_argument("--name", default="", help="a label, e.g. the machine it is for")
    kl = ksub.add_parser("list", help="list keys (never their plaintext)")
    kl.add_argument("--user", help="platform:id")
    kr = ksub.add_parser("revoke", help="revoke a key by its id (refused from the next request)")
    kr.add_argument("id", type=int)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the imgbot command line."""
    args = _build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as err:
        print(str(err), file=sys.stderr)
        return 2
    # Only the bots log job lines by default; terminal commands print their own results.
    quiet = args.command != "run" and "LOG_LEVEL" not in os.environ
    setup_logging(settings, level="WARNING" if quiet else None)
    try:
        return _dispatch(settings, args)
    except (StoreError, SettingsError) as err:
        # One clear line (naming the setting, never a password), not a traceback.
        print(str(err), file=sys.stderr)
        return 2


def _dispatch(settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "parse":
        return cmd_parse(settings, args)
    if args.command == "gen":
        try:
            return asyncio.run(_gen(settings, args))
        except (KeyboardInterrupt, asyncio.CancelledError):
            # Ctrl-C before the job was reserved, or a second Ctrl-C: no traceback.
            print("cancelled (Ctrl-C)", file=sys.stderr)
            return EXIT_INTERRUPTED
    if args.command == "usage":
        return asyncio.run(_usage(settings, args))
    if args.command == "admin":
        return asyncio.run(_admin(settings, args))
    if args.command == "run":
        from bots.run import run_bots

        return run_bots(settings)
    if args.command == "health":
        from bots.run import health

        return health(settings)
    if args.command == "backup":
        return cmd_backup(settings, args)
    if args.command == "keys":
        return asyncio.run(_keys(settings, args))
    if args.command == "db":
        return asyncio.run(_db(settings, args))
    if args.command == "doctor":
        from bots.doctor import doctor

        return asyncio.run(doctor(settings))
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
