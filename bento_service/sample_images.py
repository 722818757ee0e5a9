"""Realistic test images that ship inside packages (scikit-image, scikit-learn): nothing is
downloaded.  For tests, the traffic script and benchmarks.

    python -m bento_service.sample_images        # run the detector on each, print what it finds

``sample_images()`` returns ``{name: RGB uint8 HxWx3}``; ``sample_jpegs()`` the same as JPEG bytes.
"""

from __future__ import annotations

import io
import time

import numpy as np

# scikit-image names that load offline (the others in skimage.data need a download)
SKIMAGE_NAMES = (
    "astronaut", "camera", "chelsea", "coffee", "rocket", "horse", "clock", "coins", "page",
    "text", "immunohistochemistry", "hubble_deep_field", "brick", "grass", "gravel", "moon",
    "retina", "colorwheel", "logo",
)  # fmt: skip


def _rgb(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def sample_images(include_sklearn: bool = True) -> dict[str, np.ndarray]:
    from skimage import data

    images = {name: _rgb(getattr(data, name)()) for name in SKIMAGE_NAMES}
    images["motorcycle"] = _rgb(data.stereo_motorcycle()[0])
    if include_sklearn:
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
        for path, img in zip(bunch.filenames, bunch.images):
            images[path.rsplit("/", 1)[-1].rsplit(".", 1)[0]] = _rgb(img)
    return images


def to_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def sample_jpegs(include_sklearn: bool = True, quality: int = 90) -> dict[str, bytes]:
    return {name: to_jpeg(img, quality) for name, img in sample_images(include_sklearn).items()}


def main() -> None:
    import cv2

    from bento_service.detector import Detector

    det = Detector()
    det(np.zeros((64, 64, 3), np.uint8))
    times = []
    for name, img in sample_images().items():
        h, w = img.shape[:2]
        s = 512 / max(h, w)
        img = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        t = time.perf_counter()
        dets = det(img)
        dt = time.perf_counter() - t
        times.append(dt)
        found = ", ".join(f"{d['class']} {d['confidence']:.2f}" for d in dets[:6]) or "-"
        more = f" (+{len(dets) - 6})" if len(dets) > 6 else ""
        print(f"{name:21s} {w}x{h} -> {img.shape[1]}x{img.shape[0]} {dt * 1e3:6.1f} ms  {found}{more}")
    print(f"mean {np.mean(times) * 1e3:.1f} ms, max {np.max(times) * 1e3:.1f} ms per image (longer side 512)")


if __name__ == "__main__":
    main()
