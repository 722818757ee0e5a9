"""A test image for EXIF orientation: a red rectangle on grey, stored with an orientation tag."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps


def marked_exif_jpeg(size: tuple[int, int], orientation: int) -> tuple[bytes, tuple[int, int, int, int]]:
    """The JPEG, and the red rectangle's box in the *upright* image (what a model that applies the
    orientation when it decodes sees and reports)."""
    stored = Image.new("RGB", size, (128, 128, 128))
    stored.paste((255, 0, 0), (40, 60, 160, 150))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    data = buffer.getvalue()
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    red = np.argwhere(np.asarray(upright.convert("RGB"))[:, :, 0] > 200)
    (y1, x1), (y2, x2) = red.min(axis=0), red.max(axis=0) + 1
    return data, (int(x1), int(y1), int(x2), int(y2))
