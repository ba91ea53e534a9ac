"""The pieces of the Discord adapter; `bots.discord.app` wires them into one bot."""
