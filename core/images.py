"""The image API client (httpx): generations and multi-image edits.

CONTRACT (filled in by the client work):
    await prepare_references(files, max_bytes=...) -> list[ReferenceImage]
    ImageClient(http, settings); await client.draw(request, references=()) -> ImageResult
"""

from __future__ import annotations

from dataclasses import dataclass

from core.pricing import Usage


@dataclass(frozen=True)
class ReferenceImage:
    """One checked reference image, ready to upload as an `image[]` part."""

    data: bytes
    filename: str
    mime: str  # image/png | image/jpeg | image/webp
    width: int
    height: int


@dataclass(frozen=True)
class GeneratedImage:
    """One image the API drew."""

    data: bytes
    mime: str
    width: int
    height: int


@dataclass(frozen=True)
class ImageResult:
    """What one call returned."""

    images: tuple[GeneratedImage, ...]
    usage: Usage | None
    elapsed: float
    revised_prompt: str | None = None
