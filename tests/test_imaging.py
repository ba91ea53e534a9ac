"""core.imaging: one Pillow module for every front end, always off the event loop."""

from __future__ import annotations

import asyncio
import io
import threading

import pytest
from PIL import Image

from core import imaging


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    colour = (200, 30, 30, 0) if mode == "RGBA" else (200, 30, 30)
    Image.new(mode, size, colour).save(out, "PNG")
    return out.getvalue()


async def test_preview_is_a_small_flattened_jpeg() -> None:
    data = await imaging.preview_jpeg(_png((3000, 1500), "RGBA"), max_side=1000, quality=80)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG" and img.size == (1000, 500)
        assert img.getpixel((10, 10)) == pytest.approx((255, 255, 255), abs=3)  # white, not black


async def test_fit_under_keeps_what_fits_and_reencodes_what_does_not() -> None:
    data = _png((256, 256))
    kept = await imaging.fit_under(data, "image/png", 256, 256, limit=len(data))
    assert kept is not None and kept.data == data and not kept.reencoded
    noisy = Image.effect_noise((512, 512), 80).convert("RGB")
    out = io.BytesIO()
    noisy.save(out, "PNG")
    fitted = await imaging.fit_under(out.getvalue(), "image/png", 512, 512, limit=60_000)
    assert fitted is not None and fitted.reencoded and len(fitted.data) <= 60_000
    assert fitted.mime == "image/jpeg" and fitted.extension == "jpg"


async def test_pillow_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []
    preview, fit = imaging.make_preview, imaging.fit_image

    def record(work):  # wrap the real functions: only note which thread ran them
        def run(*args, **kwargs):
            threads.append(threading.get_ident())
            return work(*args, **kwargs)

        return run

    monkeypatch.setattr(imaging, "make_preview", record(preview))
    monkeypatch.setattr(imaging, "fit_image", record(fit))
    data = _png((64, 64))
    await imaging.preview_jpeg(data, max_side=32, quality=80)
    await imaging.fit_under(data, "image/png", 64, 64, limit=10)
    loop_thread = threading.get_ident()
    assert len(threads) == 2 and loop_thread not in threads
    assert asyncio.get_running_loop().is_running()
