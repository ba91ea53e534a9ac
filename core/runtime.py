"""Wiring: one `async with` that owns the HTTP client, the ledger and the service."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from core.config import Settings
from core.images import ImageClient
from core.messages import set_default_language
from core.service import ImageService
from core.store import Limits, open_store

log = logging.getLogger(__name__)

# The task that renews this process's leases for as long as the service is open.
LEASES_TASK_NAME = "imgbot:leases"


def make_http_client(settings: Settings) -> httpx.AsyncClient:
    """Create the one HTTP client for the image API."""
    timeout = httpx.Timeout(settings.request_timeout, connect=settings.connect_timeout)
    limits = httpx.Limits(max_connections=max(16, settings.max_jobs_in_flight * 2))
    return httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=False)


@asynccontextmanager
async def open_service(settings: Settings) -> AsyncIterator[ImageService]:
    """Open the HTTP client and the ledger, keep this process's leases, yield the service."""
    set_default_language(settings.default_language)
    async with make_http_client(settings) as http:
        ledger = await open_store(
            settings.store_url,
            Limits.from_settings(settings),
            pool_size=settings.database_pool_size,
        )
        try:
            # Nothing another process left is touched here: its jobs are taken over only
            # by `imgbot run` (ImageService.take_over) once their lease has expired.
            service = ImageService(settings, ledger, ImageClient(http, settings))
            leases = asyncio.create_task(service.keep_leases(), name=LEASES_TASK_NAME)
            try:
                yield service
            finally:
                # Never close the ledger under a job: cancelled ones still settle in the
                # background (the entry point has normally drained already; this is a no-op).
                await service.shutdown(settings.shutdown_grace)
                leases.cancel()
                await asyncio.gather(leases, return_exceptions=True)
                await service.release_held()
        finally:
            await ledger.close()
