"""Wiring: one `async with` that owns the HTTP client, the ledger and the service."""

from __future__ import annotations

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


def make_http_client(settings: Settings) -> httpx.AsyncClient:
    """Create the one HTTP client for the image API."""
    timeout = httpx.Timeout(settings.request_timeout, connect=settings.connect_timeout)
    limits = httpx.Limits(max_connections=max(16, settings.max_jobs_in_flight * 2))
    return httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=False)


@asynccontextmanager
async def open_service(settings: Settings) -> AsyncIterator[ImageService]:
    """Open the HTTP client and the ledger, resolve stale jobs, and yield the service."""
    set_default_language(settings.default_language)
    async with make_http_client(settings) as http:
        ledger = await open_store(
            settings.store_url,
            Limits.from_settings(settings),
            pool_size=settings.database_pool_size,
        )
        try:
            stale = await ledger.list_stale(settings.job_timeout)
            unsettled = await ledger.recover_stale(settings.job_timeout)
            if unsettled:
                log.warning(
                    "%d job(s) were left running by a previous process and are now unsettled: %s",
                    len(unsettled),
                    ", ".join(map(str, unsettled)),
                )
            if len(stale) > len(unsettled):
                log.info("%d queued job(s) of a previous process released", len(stale) - len(unsettled))
            service = ImageService(settings, ledger, ImageClient(http, settings))
            # The bots tell these users what became of their job once they are connected.
            service.interrupted = tuple(
                [job for j in stale if (job := await ledger.get_job(j.id)) is not None]
            )
            try:
                yield service
            finally:
                # Never close the ledger under a job: cancelled ones still settle in the
                # background (the entry point has normally drained already; this is a no-op).
                await service.shutdown(settings.shutdown_grace)
        finally:
            await ledger.close()
