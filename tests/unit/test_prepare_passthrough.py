"""Preparation keeps an upright JPEG that already fits, and re-encodes everything else."""

from __future__ import annotations

import io

from PIL import Image

from edgecatch.delivery.prepare import prepare_image


def encode(image: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


def test_fitting_upright_jpeg_is_kept_byte_for_byte():
    data = encode(Image.new("RGB", (640, 480), (10, 200, 30)), quality=75)
    prepared, _ = prepare_image(data, max_size=1280, jpeg_quality=90)
    assert prepared.data == data and (prepared.width, prepared.height) == (640, 480)


def test_too_large_rotated_or_png_images_are_prepared():
    big = encode(Image.new("RGB", (2000, 1000)))
    prepared, _ = prepare_image(big, max_size=1280, jpeg_quality=90)
    assert (prepared.width, prepared.height) == (1280, 640) and prepared.data != big

    rotated = Image.new("RGB", (64, 32))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90° to display
    data = encode(rotated, exif=exif)
    prepared, _ = prepare_image(data, max_size=1280, jpeg_quality=90)
    assert (prepared.width, prepared.height) == (32, 64)

    png = encode(Image.new("RGB", (50, 40)), fmt="PNG")
    prepared, _ = prepare_image(png, max_size=1280, jpeg_quality=90)
    assert prepared.data[:3] == b"\xff\xd8\xff" and (prepared.width, prepared.height) == (50, 40)
