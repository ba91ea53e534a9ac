"""Reference images: what passes unchanged, what is converted to PNG, what is refused."""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from PIL import Image

from core.config import Settings
from core.errors import BadReferenceError
from core.images import ImageClient, ReferenceImage, prepare_references
from core.prompt import ImageRequest
from tests.conftest import TLS
from tests.fake_api import FakeImageAPI

MB = 1_000_000


def encode(im: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **options)
    return out.getvalue()


def noise(size: tuple[int, int]) -> Image.Image:
    # Seeded random pixels: incompressible, so byte sizes and cut points mean something.
    return Image.frombytes("RGB", size, random.Random(7).randbytes(size[0] * size[1] * 3))


def frames(fmt: str) -> bytes:
    red = Image.new("RGB", (40, 30), (255, 0, 0))
    blue = Image.new("RGB", (40, 30), (0, 0, 255))
    return encode(red, fmt, save_all=True, append_images=[blue], duration=100, loop=0)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims a huge size: the classic decompression bomb shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


async def one(data: bytes, name: str | None = "ref.png", **kwargs: Any) -> ReferenceImage:
    (ref,) = await prepare_references([(data, name)], max_bytes=kwargs.pop("max_bytes", 50 * MB))
    return ref


def opened(ref: ReferenceImage) -> Image.Image:
    im = Image.open(io.BytesIO(ref.data))
    im.load()
    return im


# --- plain images pass as they are -------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mode", "mime", "ext"),
    [
        ("PNG", "RGB", "image/png", "png"),
        ("PNG", "RGBA", "image/png", "png"),
        ("PNG", "L", "image/png", "png"),
        ("JPEG", "RGB", "image/jpeg", "jpg"),
        ("JPEG", "L", "image/jpeg", "jpg"),
        ("WEBP", "RGB", "image/webp", "webp"),
        ("WEBP", "RGBA", "image/webp", "webp"),
    ],
)
async def test_plain_png_jpeg_webp_pass_unchanged(fmt: str, mode: str, mime: str, ext: str) -> None:
    data = encode(Image.new(mode, (64, 32)), fmt)
    ref = await one(data, "holiday photo.final")
    assert ref.data == data
    assert (ref.mime, ref.filename) == (mime, f"holiday_photo.{ext}")
    assert (ref.width, ref.height) == (64, 32)


async def test_the_real_format_wins_over_the_filename() -> None:
    data = encode(Image.new("RGB", (20, 10)), "JPEG")
    ref = await one(data, "looks-like.png")
    assert (ref.mime, ref.filename) == ("image/jpeg", "looks-like.jpg")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (None, "image-1.png"),
        ("../../etc/passwd.png", "passwd.png"),
        ("猫.png", "image-1.png"),
        ("C:\\Users\\me\\cat.png", "cat.png"),
    ],
)
async def test_filenames_are_safe(name: str | None, expected: str) -> None:
    ref = await one(encode(Image.new("RGB", (8, 8)), "PNG"), name)
    assert ref.filename == expected


async def test_an_exif_rotated_photo_reports_the_size_it_is_shown_at() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    data = encode(Image.new("RGB", (80, 40)), "JPEG", exif=exif)
    ref = await one(data)
    assert ref.data == data
    assert (ref.width, ref.height) == (40, 80)


# --- other images become PNG ------------------------------------------------------------------


async def test_animated_gif_becomes_its_first_frame_as_png() -> None:
    ref = await one(frames("GIF"), "dance.gif")
    assert (ref.mime, ref.filename, ref.width, ref.height) == ("image/png", "dance.png", 40, 30)
    im = opened(ref)
    assert im.format == "PNG" and not getattr(im, "is_animated", False)
    assert im.convert("RGB").getpixel((5, 5)) == (255, 0, 0)


async def test_animated_webp_becomes_its_first_frame_as_png() -> None:
    ref = await one(frames("WEBP"), "loop.webp")
    assert (ref.mime, ref.filename) == ("image/png", "loop.png")
    r, g, b = opened(ref).convert("RGB").getpixel((5, 5))
    assert r > 200 and b < 60


async def test_animated_png_becomes_a_static_png() -> None:
    ref = await one(frames("PNG"), "anim.png")
    im = opened(ref)
    assert ref.data != frames("PNG")
    assert not getattr(im, "is_animated", False)


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "GIF"])
async def test_bmp_tiff_gif_become_png_with_the_same_pixels(fmt: str) -> None:
    source = Image.new("RGB", (33, 17), (12, 200, 77))
    ref = await one(encode(source, fmt), f"scan.{fmt.lower()}")
    assert (ref.mime, ref.filename, ref.width, ref.height) == ("image/png", "scan.png", 33, 17)
    im = opened(ref)
    assert im.format == "PNG"
    if fmt != "GIF":  # GIF is palette-reduced, the others are exact
        assert im.convert("RGB").getpixel((3, 3)) == (12, 200, 77)


async def test_cmyk_jpeg_becomes_rgb_png() -> None:
    data = encode(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG")
    ref = await one(data, "print.jpg")
    im = opened(ref)
    assert (ref.mime, im.format, im.mode) == ("image/png", "PNG", "RGB")
    r, g, b = im.getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60  # cyan-free, magenta+yellow = red


async def test_16_bit_png_becomes_8_bit_with_values_scaled() -> None:
    im16 = Image.new("I;16", (4, 2))
    im16.putpixel((0, 0), 65535)
    im16.putpixel((1, 0), 32768)
    data = encode(im16, "PNG")
    assert data[24] == 16  # really a 16-bit PNG
    ref = await one(data, "depth.png")
    assert ref.data != data
    im = opened(ref)
    assert im.mode == "L"
    assert (im.getpixel((0, 0)), im.getpixel((1, 0)), im.getpixel((2, 0))) == (255, 128, 0)


@pytest.mark.parametrize(("mode", "expected"), [("P", "RGB"), ("LA", "RGBA"), ("1", "L")])
async def test_odd_modes_become_plain_png(mode: str, expected: str) -> None:
    ref = await one(encode(Image.new(mode, (16, 16)), "PNG"))
    assert opened(ref).mode == expected


# --- refused, each with its own clear message --------------------------------------------------


async def refused(files: list[tuple[bytes, str | None]], **kwargs: Any) -> BadReferenceError:
    with pytest.raises(BadReferenceError) as caught:
        await prepare_references(files, max_bytes=kwargs.pop("max_bytes", 50 * MB), **kwargs)
    err = caught.value
    for lang in ("en", "zh"):
        message = err.user_message(lang)
        assert message and "{" not in message
    return err


@pytest.mark.parametrize(
    "data",
    [b"%PDF-1.7 not an image at all", b"", b"\x89PNG but not really", "名字".encode() * 50],
)
async def test_a_non_image_renamed_png_is_refused(data: bytes) -> None:
    err = await refused([(data, "innocent.png")])
    assert err.key == "ref.not_image"
    assert "PNG, JPEG or WebP" in err.user_message("en")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
async def test_a_truncated_file_is_refused_as_corrupt(fmt: str) -> None:
    data = encode(noise((256, 256)), fmt)
    err = await refused(
        [(encode(Image.new("RGB", (4, 4)), "PNG"), "ok.png"), (data[: len(data) // 2], "cut")]
    )
    assert err.key == "ref.corrupt"
    assert err.params["index"] == 2
    assert "Reference image 2" in err.user_message("en")


@pytest.mark.parametrize(
    "size",
    [
        (8000, 7000),  # 56 MP: over our cap, under Pillow's warning
        (10000, 10000),  # 100 MP: Pillow warns
        (30000, 30000),  # 900 MP: Pillow refuses
    ],
)
async def test_a_decompression_bomb_is_refused(size: tuple[int, int]) -> None:
    err = await refused([(png_header_only(*size), "bomb.png")])
    assert err.key == "ref.too_many_pixels"
    assert "50 megapixels" in err.user_message("en")


async def test_a_file_over_the_byte_cap_is_refused() -> None:
    data = encode(noise((300, 300)), "PNG")
    err = await refused([(data, "big.png")], max_bytes=100_000)
    assert err.key == "ref.too_big"
    assert "0.1 MB" in err.user_message("en")


async def test_seventeen_images_are_refused_and_sixteen_pass() -> None:
    tiny = encode(Image.new("RGB", (8, 8)), "PNG")
    err = await refused([(tiny, f"{i}.png") for i in range(17)])
    assert err.key == "ref.too_many"
    assert "17" in err.user_message("en") and "16" in err.user_message("en")
    assert len(await prepare_references([(tiny, None)] * 16, max_bytes=MB)) == 16


# --- converted references are what the API accepts --------------------------------------------


async def test_converted_references_are_accepted_by_the_api(
    fake_api: FakeImageAPI, settings: Callable[..., Settings]
) -> None:
    files = [
        (frames("GIF"), "a.gif"),
        (encode(Image.new("RGB", (30, 30)), "BMP"), "b.bmp"),
        (encode(Image.new("CMYK", (30, 30)), "JPEG"), "c.jpg"),
        (encode(Image.new("I;16", (30, 30)), "PNG"), "d.png"),
        (frames("WEBP"), "e.webp"),
    ]
    refs = await prepare_references(files, max_bytes=MB)
    request = ImageRequest(prompt="mix them", model="gpt-image-2", size="auto", quality="low")
    async with httpx.AsyncClient(verify=TLS) as http:
        result = await ImageClient(http, settings()).draw(request, refs)
    assert len(result.images) == 1
    sent = fake_api.api_requests[0].files
    assert [p.content_type for p in sent] == ["image/png"] * 5
    assert [p.filename for p in sent] == ["a.png", "b.png", "c.png", "d.png", "e.png"]
