from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sample_jpegs() -> dict[str, bytes]:
    from bento_service.sample_images import sample_jpegs as load

    return load()


@pytest.fixture(scope="session")
def unique_jpeg(sample_jpegs):
    """A shipped image made unique by one pixel: the Upload API stores identical images once
    (as `duplicate`), so tests that follow single predictions must not resend the same pixels."""
    import io
    import itertools

    from PIL import Image

    counter = itertools.count(1)

    def make(name: str) -> bytes:
        n = next(counter)
        image = Image.open(io.BytesIO(sample_jpegs[name])).convert("RGB")
        image.putpixel((0, 0), (n % 256, (n // 256) % 256, 255))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=95)
        return out.getvalue()

    return make
