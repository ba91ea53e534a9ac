"""Running the web door (the page and the API): uvicorn in the shared event loop, until the
stop event."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn

from bots.web.admin import AdminPage
from bots.web.api import WebApi
from bots.web.page import WebPage
from core.config import Settings
from core.service import ImageService

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `imgbot run` owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn
        pass


def address(settings: Settings) -> str:
    """Return the API's root as a client should be pointed at it (the bots' /key says it too)."""
    return settings.web_api_url


def page_address(settings: Settings) -> str:
    """Return the page's root as a browser on this machine (or the public) reaches it."""
    public = settings.web_public_url.rstrip("/")
    if public:
        return public
    host = settings.web_listen
    if host in ("0.0.0.0", "::", ""):  # every interface: this machine is one of them
        host = "127.0.0.1"
    return f"http://[{host}]:{settings.web_port}" if ":" in host else (
        f"http://{host}:{settings.web_port}")


def alone(settings: Settings) -> bool:
    """Say whether the web door runs with no bot beside it (then the operator gets a link)."""
    return not (settings.telegram_bot_token.get_secret_value()
                or settings.discord_bot_token.get_secret_value())


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind and listen on host:port for uvicorn; raise OSError saying what to set.

    Bound here, not by uvicorn (which exits the process when the port is taken): a busy port
    is an error of this front end, and the address is listening once we print it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP said outright: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose
    # proto says TCP, and an accepted socket takes the listener's. With proto 0 every answer
    # (headers, then body) waited ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        raise OSError(f"web door: cannot listen on {host}:{port}"
                      f" ({err.strerror}); set WEB_PORT (0 = off)") from err
    return sock


async def run_web(settings: Settings, service: ImageService, stop: asyncio.Event) -> None:
    """Serve the API on WEB_LISTEN:WEB_PORT until stop; answer requests in flight first."""
    api = WebApi(service)
    page = WebPage(service, api.files)
    config = uvicorn.Config(
        api.app([*page.routes(), *AdminPage(page).routes()]),
        host=settings.web_listen,
        port=settings.web_port,
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace) + 5,
    )
    server = _Server(config)
    sock = listening_socket(settings.web_listen, settings.web_port)
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="web door")
    where = address(settings)
    log.info("web door (page and OpenAI-compatible API) at %s", page_address(settings))
    print(f"imgbot web page at {page_address(settings)}/", flush=True)
    print(f"imgbot web API at {where} (personal keys: imgbot keys create USER)", flush=True)
    if alone(settings):
        # Printed, never logged: the operator's way in on a first run, good once.
        code = await page.sessions.new_link_code()
        print(f"Sign in to the page as the operator (this link works once, within an hour):\n"
              f"  {page_address(settings)}/#signin={code}", flush=True)
    try:
        await asyncio.wait({serving, asyncio.create_task(stop.wait())},
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Stop taking connections; requests in flight end as the service drains.
        server.should_exit = True
        await service.shutdown(settings.shutdown_grace)
        await page.close()
        await serving


def startup_failure(exc: BaseException, settings: Settings) -> tuple[str, bool]:
    """Say in one line why the web door could not run; True: trying again may help."""
    if isinstance(exc, OSError) and str(exc).startswith("web door:"):
        # A port in use may be freed by a process still stopping: worth a few retries.
        return str(exc).removeprefix("web door: "), True
    return f"{type(exc).__name__}: {exc}", False
