"""A real, throwaway PostgreSQL server for the tests, and the pytest fixtures that start it.

`PgServer.start()` runs Debian's server binaries (`/usr/lib/postgresql/<newest>/bin`, else
`initdb` found on PATH) on a fresh cluster in a temporary folder: password authentication
(scram-sha-256) for the user `imgbot` with `PASSWORD`, listening only on 127.0.0.1 on a free
port, its unix socket in the same folder, durability off for speed (a test cluster never
outlives its session). Each `create_database()` makes a fresh empty database and returns its
`postgresql://imgbot:PASSWORD@127.0.0.1:PORT/NAME` URL. `stop()` kills the server
(`pg_ctl stop -m immediate`) and removes the folder.

initdb refuses to run as root: when the tests run as root (as here and in CI), initdb and
pg_ctl run as the `postgres` system user (`runuser -u postgres --`), which is created when
it does not exist, and the folder is made over to it.

Fixtures (session-scoped server, one fresh database per test):

    pg_server   the running PgServer; FAILS (never skips) when no server binaries exist
    pg_url      the URL of a fresh empty database on it
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

USER = "imgbot"
# Not shaped like an API key or a bot token; tests check it never shows in a message.
PASSWORD = "pg-test-pw-4d1c9e7b0a"
HOST = "127.0.0.1"
SYSTEM_USER = "postgres"
START_TIMEOUT = 60

# Settings for a cluster that only lives for one test session.
SERVER_SETTINGS = {
    "listen_addresses": f"'{HOST}'",
    "max_connections": "300",
    "shared_buffers": "64MB",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_wal_size": "1GB",
    "log_min_messages": "warning",
    "logging_collector": "off",
}


class ServerBinariesMissing(RuntimeError):
    """No PostgreSQL server binaries (initdb, pg_ctl) on this machine."""


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.name)) or (0,)


def find_bin_dir() -> Path:
    """Return the folder of the newest initdb and pg_ctl: Debian's first, then PATH."""
    debian = [
        bindir
        for bindir in (path / "bin" for path in Path("/usr/lib/postgresql").glob("*"))
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file()
    ]
    if debian:
        return max(debian, key=lambda bindir: _version_key(bindir.parent))
    found = shutil.which("initdb")
    if found:
        bindir = Path(found).resolve().parent
        if (bindir / "pg_ctl").is_file():
            return bindir
    raise ServerBinariesMissing(
        "no PostgreSQL server binaries: initdb and pg_ctl are neither in "
        "/usr/lib/postgresql/*/bin nor on PATH. Install them, e.g. "
        "`apt-get install -y postgresql` (.ci/run does this)"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _world_traversable(folder: Path) -> bool:
    # The postgres user must be able to reach the cluster's folder through every parent.
    for part in [folder, *folder.parents]:
        if not part.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def _ensure_system_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SYSTEM_USER,
            ],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(SYSTEM_USER)


class PgServer:
    """One throwaway PostgreSQL cluster; see the module docstring."""

    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir or find_bin_dir()
        self.host = HOST
        self.port = 0
        self.user = USER
        self.password = PASSWORD
        self.root: Path | None = None
        self._as_root = os.geteuid() == 0
        self._owner: pwd.struct_passwd | None = None
        self._names = itertools.count(1)
        self._lock = threading.Lock()
        self._running = False

    # --- life ---------------------------------------------------------------------------

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self._as_root:
            command = ["runuser", "-u", SYSTEM_USER, "--", *command]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=START_TIMEOUT, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
            )
        return done

    def _make_root(self) -> Path:
        base = Path(tempfile.gettempdir())
        if self._as_root and not _world_traversable(base):
            base = Path("/tmp")  # noqa: S108 - the postgres user must reach the folder
        root = Path(tempfile.mkdtemp(prefix="imgbot-pg-", dir=base))
        if self._as_root:
            self._owner = _ensure_system_user()
            os.chown(root, self._owner.pw_uid, self._owner.pw_gid)
        return root

    def _write_owned(self, path: Path, text: str, mode: int = 0o600) -> None:
        path.write_text(text)
        path.chmod(mode)
        if self._owner is not None:
            os.chown(path, self._owner.pw_uid, self._owner.pw_gid)

    def start(self) -> PgServer:
        """Create the cluster and start the server; return self."""
        self.root = self._make_root()
        data = self.root / "data"
        pwfile = self.root / "pwfile"
        self._write_owned(pwfile, PASSWORD + "\n")
        self._run(
            "initdb",
            "-D",
            str(data),
            "-U",
            USER,
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        pwfile.unlink()
        last_error: Exception | None = None
        for _ in range(5):  # a free port can be taken between the probe and the start
            self.port = _free_port()
            settings = {
                **SERVER_SETTINGS,
                "port": str(self.port),
                "unix_socket_directories": f"'{self.root}'",
            }
            conf = "".join(f"{name} = {value}\n" for name, value in settings.items())
            self._write_owned(data / "postgresql.auto.conf", conf)
            try:
                self._run(
                    "pg_ctl",
                    "-D",
                    str(data),
                    "-l",
                    str(self.root / "server.log"),
                    "-w",
                    "-t",
                    str(START_TIMEOUT),
                    "start",
                )
            except RuntimeError as err:
                last_error = err
                continue
            self._running = True
            return self
        raise RuntimeError(f"the test PostgreSQL server did not start: {last_error}\n{self.log()}")

    def log(self) -> str:
        """Return the server's log so far (for failure messages)."""
        if self.root is None:
            return ""
        with contextlib.suppress(OSError):
            return (self.root / "server.log").read_text(errors="replace")
        return ""

    def stop(self) -> None:
        """Kill the server and remove its folder; safe twice."""
        if self.root is None:
            return
        if self._running:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
            self._running = False
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- databases ----------------------------------------------------------------------

    def dsn(self, dbname: str, *, password: str | None = None) -> str:
        """Return the URL of database `dbname` (with another password, if given)."""
        secret = PASSWORD if password is None else password
        return f"postgresql://{USER}:{secret}@{HOST}:{self.port}/{dbname}"

    def create_database(self) -> str:
        """Create a fresh empty database; return its URL. Callable from sync or async code."""
        with self._lock:
            name = f"imgbot_test_{os.getpid()}_{next(self._names)}"
        outcome: list[BaseException] = []

        def create() -> None:
            async def run() -> None:
                conn = await asyncpg.connect(self.dsn("postgres"))
                try:
                    await conn.execute(f'CREATE DATABASE "{name}"')
                finally:
                    await conn.close()

            try:
                asyncio.run(run())
            except BaseException as err:  # handed to the calling thread
                outcome.append(err)

        # Its own thread and event loop: the caller may be inside a running loop.
        worker = threading.Thread(target=create, name="pg-create-database")
        worker.start()
        worker.join()
        if outcome:
            raise outcome[0]
        return self.dsn(name)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """Start one throwaway PostgreSQL server for the session; fail when there is none."""
    try:
        server = PgServer()
    except ServerBinariesMissing as err:
        pytest.fail(str(err), pytrace=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """Return the URL of a fresh empty database on the test server."""
    return pg_server.create_database()
