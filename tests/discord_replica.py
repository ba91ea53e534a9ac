"""`imgbot run` with Discord's network moved to a fake on 127.0.0.1 (tests only).

`python -m tests.discord_replica` is the real entry point (`bots.cli run`: settings from
the environment, the service, the Discord front end with its shard keeper and takeovers)
with four of discord.py's network seams pointed at `tests.discord_server`, whose root URL
is in DISCORD_FAKE_URL:

- the REST base (interaction webhooks and callbacks use it too);
- the gateway (discord.py otherwise connects to wss://gateway.discord.gg);
- CDN downloads (attachment URLs stay Discord's, so the bot's own checks of where it may
  fetch from still apply; only the download goes to the fake);
- the five seconds each IDENTIFY turn lasts (`bots.discord.app.IDENTIFY_EVERY`, turns
  shared by the replicas through the ledger), which keep to Discord's identify rate limit:
  the fake gateway has none, so a fifth of a second does here.
"""

from __future__ import annotations

import os
import sys

import yarl
from discord.gateway import DiscordWebSocket
from discord.http import HTTPClient, Route

from tests.discord_server import CDN_HOSTS


def redirect(root: str) -> None:
    """Point discord.py's REST, gateway and CDN at the fake Discord at `root`."""
    Route.BASE = f"{root}/api/v10"
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(f"ws{root.removeprefix('http')}/gateway/")
    download = HTTPClient.get_from_cdn

    async def get_from_cdn(self: HTTPClient, url: str) -> bytes:
        for host in CDN_HOSTS:
            if url.startswith(host):
                url = f"{root}/cdn/{url.removeprefix(host).split('?', 1)[0]}"
        return await download(self, url)

    HTTPClient.get_from_cdn = get_from_cdn  # type: ignore[method-assign]
    from bots.discord import app

    app.IDENTIFY_EVERY = 0.2


def main() -> int:
    """Run `imgbot run` against the fake Discord."""
    redirect(os.environ.pop("DISCORD_FAKE_URL"))
    from bots.cli import main as imgbot

    return imgbot(["run"])


if __name__ == "__main__":
    sys.exit(main())
