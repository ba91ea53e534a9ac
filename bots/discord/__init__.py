"""The pieces of the Discord adapter; `bots.discord_bot` wires them into one bot."""
