"""The web door: an OpenAI-compatible images API (`api`) served by uvicorn (`app`)."""
