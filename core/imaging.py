"""Re-encoding results for a platform's upload rules, with Pillow, off the event loop.

    photo = await preview_jpeg(data, max_side=2560, quality=88)       # Telegram's preview
    fitted = await fit_under(data, mime, width, height, limit=share)  # Discord's upload limit

The coroutines run Pillow in a worker thread (`asyncio.to_thread`): decoding and encoding
megabytes would otherwise stall every other chat. The plain functions below them are the
same work, for tests and for callers already off the loop.

Fitting: an image within its byte budget goes out untouched. A larger one is re-encoded
as a high-quality JPEG (or WebP when it has transparency), first at full size with falling
quality, then scaled down, until it fits; the caller tells the user it happened.
"""

from __future__ import annotations

import asyncio
import io
import math
from dataclasses import dataclass

from PIL import Image

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
_QUALITIES = (92, 85)
# Each step down in scale aims a little under the limit, so one more encode usually fits.
_AIM = 0.9
_MAX_ROUNDS = 5
# Room left in an upload for the message JSON and the multipart framing around the files.
_FRAMING = 64 * 1024


@dataclass(frozen=True)
class FittedImage:
    """An image ready to upload, and whether it had to be re-encoded to fit."""

    data: bytes
    mime: str
    width: int
    height: int
    reencoded: bool
    original_size: int

    @property
    def extension(self) -> str:
        """Return the file extension of the image's format."""
        return EXTENSIONS.get(self.mime, "png")

    @property
    def format_name(self) -> str:
        """Return the name of the image's format as people know it."""
        return {"image/jpeg": "JPEG", "image/webp": "WebP"}.get(self.mime, "PNG")


async def preview_jpeg(data: bytes, *, max_side: int, quality: int) -> bytes:
    """Return a flattened JPEG preview no longer than `max_side` px (in a worker thread)."""
    return await asyncio.to_thread(make_preview, data, max_side=max_side, quality=quality)


async def fit_under(
    data: bytes, mime: str, width: int, height: int, *, limit: int
) -> FittedImage | None:
    """Return the image fitted under `limit` bytes (in a worker thread); None if it cannot."""
    return await asyncio.to_thread(fit_image, data, mime, width, height, limit)


def make_preview(data: bytes, *, max_side: int, quality: int) -> bytes:
    """Return a JPEG preview (≤ `max_side` px), transparency flattened onto white."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "P"):
            rgba = img.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            picture = flat
        else:
            picture = img.convert("RGB")
    picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=quality, optimize=True)
    return out.getvalue()


def upload_share(limit: int, sizes: list[int]) -> int:
    """Return the bytes each image may take so that one upload of them stays within `limit`.

    A platform that checks the whole request against the limit makes the images share it,
    less a margin for the JSON and multipart framing; when they all fit already, each may
    keep its own size.
    """
    budget = limit - min(_FRAMING, limit // 20)
    if sum(sizes) <= budget:
        return max(sizes, default=budget)
    return budget // max(1, len(sizes))


def fit_image(data: bytes, mime: str, width: int, height: int, limit: int) -> FittedImage | None:
    """Return the image as is when it fits `limit` bytes, else re-encoded to fit; None if it cannot."""
    if len(data) <= limit:
        return FittedImage(data, mime, width, height, False, len(data))
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        alpha = _has_transparency(im)
        frame = im.convert("RGBA" if alpha else "RGB")
    out_mime = "image/webp" if alpha else "image/jpeg"
    scale = 1.0
    for _ in range(_MAX_ROUNDS):
        scaled = frame if scale >= 1.0 else _resize(frame, scale)
        size = 0
        for quality in _QUALITIES:
            encoded = _encode(scaled, out_mime, quality)
            size = len(encoded)
            if size <= limit:
                return FittedImage(encoded, out_mime, scaled.width, scaled.height, True, len(data))
        # Bytes grow roughly with the pixel count: shrink both edges by the square root.
        scale *= min(0.9, math.sqrt(limit * _AIM / size))
        if frame.width * scale < 64 or frame.height * scale < 64:
            break
    return None


def _has_transparency(im: Image.Image) -> bool:
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        alpha = im.convert("RGBA").getchannel("A")
        return alpha.getextrema()[0] < 255
    return False


def _resize(frame: Image.Image, scale: float) -> Image.Image:
    size = (max(1, round(frame.width * scale)), max(1, round(frame.height * scale)))
    return frame.resize(size, Image.Resampling.LANCZOS)


def _encode(frame: Image.Image, mime: str, quality: int) -> bytes:
    out = io.BytesIO()
    if mime == "image/webp":
        frame.save(out, format="WEBP", quality=quality, method=4)
    else:
        frame.save(out, format="JPEG", quality=quality, subsampling=0)
    return out.getvalue()
