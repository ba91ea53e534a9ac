"""The imgbot benchmark: what the bot adds on top of the image API, and how it scales."""
