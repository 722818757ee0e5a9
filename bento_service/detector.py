"""The example detector: OpenCV's classic detectors, whose weights ship inside the
``opencv-python-headless`` wheel (no download at run time).

Classes (ids are stable whatever subset is enabled):

===  ==========  ==========================================================
id   class       model
===  ==========  ==========================================================
0    person      HOG + linear SVM people detector
                 (``cv2.HOGDescriptor_getDefaultPeopleDetector()``, 64x128 window)
1    face        Haar cascade ``haarcascade_frontalface_default.xml``
2    cat_face    Haar cascade ``haarcascade_frontalcatface.xml`` (off by default)
===  ==========  ==========================================================

Input: an RGB ``uint8`` numpy array ``H x W x 3`` (grey ``H x W`` and RGBA are accepted too).
Output: a list of plain dicts, best first::

    {"class": "face", "class_id": 1, "confidence": 0.95, "box": [x1, y1, x2, y2]}

with the box in pixels of the *input* image (float, x2/y2 exclusive, clipped to the image).

Confidence mapping (monotonic, documented so that confidence policies mean something)
------------------------------------------------------------------------------------
Both detectors produce an unbounded raw score; we map it to [0, 1] with a logistic
``confidence = 1 / (1 + exp(-(raw - midpoint) / scale))``, strictly increasing in ``raw``:

* ``person``: raw = the SVM margin of the HOG window (``hitThreshold=0`` keeps margins > 0).
  midpoint 0.75, scale 0.35. On the realistic but person-free images shipped by scikit-image
  and scikit-learn the spurious windows have margins with median ~0.5 and 90th percentile
  ~0.75, so they map to <= 0.5; margins >= 1.5, typical of clearly visible pedestrians,
  map to ~0.9 (0.895 at 1.5). Margin 0 -> 0.10, 1.0 -> 0.67.
* ``face`` / ``cat_face``: raw = the cascade's level weight from
  ``detectMultiScale3(..., outputRejectLevels=True)`` (sum of the last stage's weak
  classifiers), after OpenCV's own neighbour grouping (``minNeighbors=4``).
  midpoint 4.0, scale 1.2. Observed: the astronaut's real face ~7.4 -> 0.95; look-alikes
  (coin heads, moon craters) 2.8-5.0 -> 0.26-0.69.

Detections under ``min_confidence`` are dropped; then per-class greedy non-maximum
suppression (IoU > ``nms_iou`` with a better box of the same class is removed).

Speed: images are downscaled (never upscaled) so the longer side is at most ``max_side``
(512 by default) before detection; boxes are scaled back.  Person+face on a 512-pixel image
on this 2-core machine: ~110 ms mean with OpenCV's 2 threads, ~170 ms with one thread (HOG ~30 ms,
the face cascade the rest; textured images such as grass or gravel are slowest, up to ~330 ms
single-threaded).  ``python -m bento_service.sample_images`` measures it again.

Thread safety: OpenCV's ``CascadeClassifier`` must not be used from two threads at once, so
each thread gets its own detector objects (created lazily, ~15 ms).  A ``Detector`` instance
can therefore be shared by a threaded server.
"""

from __future__ import annotations

import io
import math
import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

import cv2
import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_CLASSES",
    "Detector",
    "decode_image",
    "to_rgb",
    "person_confidence",
    "cascade_confidence",
    "nms",
]

CLASS_NAMES: tuple[str, ...] = ("person", "face", "cat_face")
DEFAULT_CLASSES: tuple[str, ...] = ("person", "face")

# Logistic constants (see module docstring for how they were chosen).
PERSON_MIDPOINT, PERSON_SCALE = 0.75, 0.35
CASCADE_MIDPOINT, CASCADE_SCALE = 4.0, 1.2

_CASCADE_FILES = {
    "face": "haarcascade_frontalface_default.xml",
    "cat_face": "haarcascade_frontalcatface.xml",
}


def _logistic(x: float, midpoint: float, scale: float) -> float:
    z = (x - midpoint) / scale
    # numerically safe logistic
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def person_confidence(margin: float) -> float:
    """HOG SVM margin -> confidence in [0, 1] (strictly increasing)."""
    return _logistic(float(margin), PERSON_MIDPOINT, PERSON_SCALE)


def cascade_confidence(level_weight: float) -> float:
    """Haar cascade level weight -> confidence in [0, 1] (strictly increasing)."""
    return _logistic(float(level_weight), CASCADE_MIDPOINT, CASCADE_SCALE)


def decode_image(data: bytes) -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, WebP, ...) to RGB uint8 HxWx3.

    EXIF orientation is applied, so the pixels are the way a viewer shows the image.
    Raises ``ValueError`` for bytes Pillow cannot decode.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:  # PIL's decode errors
        raise ValueError(f"cannot decode image: {exc}") from exc


def to_rgb(image) -> np.ndarray:
    """Normalise a PIL image or numpy array (grey, RGB, RGBA; bool/uint8) to RGB uint8 HxWx3."""
    if isinstance(image, Image.Image):
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxW, HxWx3 or HxWx4 image, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression. ``boxes`` is ``n x 4`` xyxy. Returns kept indices, best first."""
    if len(boxes) == 0:
        return []
    boxes = np.asarray(boxes, dtype=np.float64)
    x1, y1, x2, y2 = boxes.T
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        xx1 = np.maximum(x1[i], x1[rest])
        yy1 = np.maximum(y1[i], y1[rest])
        xx2 = np.minimum(x2[i], x2[rest])
        yy2 = np.minimum(y2[i], y2[rest])
        inter = np.maximum(xx2 - xx1, 0) * np.maximum(yy2 - yy1, 0)
        union = areas[i] + areas[rest] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
        order = rest[iou <= iou_threshold]
    return keep


@dataclass(frozen=True)
class _RawDet:
    class_id: int
    raw: float
    confidence: float
    box: tuple[float, float, float, float]  # xyxy in detection-image pixels


class Detector:
    """Callable detector: ``Detector()(rgb_uint8_hwc) -> list[dict]``."""

    def __init__(
        self,
        classes: Iterable[str] = DEFAULT_CLASSES,
        *,
        max_side: int = 512,
        min_confidence: float = 0.05,
        nms_iou: float = 0.45,
        hog_win_stride: int = 8,
        hog_scale: float = 1.05,
        cascade_scale_factor: float = 1.1,
        cascade_min_neighbors: int = 4,
        cascade_min_size: int = 24,
    ) -> None:
        classes = tuple(classes)
        unknown = [c for c in classes if c not in CLASS_NAMES]
        if unknown:
            raise ValueError(f"unknown classes {unknown}; known: {list(CLASS_NAMES)}")
        if not classes:
            raise ValueError("at least one class must be enabled")
        self.classes = classes
        self.class_names = CLASS_NAMES
        self.max_side = int(max_side)
        self.min_confidence = float(min_confidence)
        self.nms_iou = float(nms_iou)
        self.hog_win_stride = int(hog_win_stride)
        self.hog_scale = float(hog_scale)
        self.cascade_scale_factor = float(cascade_scale_factor)
        self.cascade_min_neighbors = int(cascade_min_neighbors)
        self.cascade_min_size = int(cascade_min_size)
        self._local = threading.local()
        self._models()  # load eagerly in the constructing thread: fail fast if weights are missing

    # -- per-thread OpenCV objects -------------------------------------------------------
    def _models(self) -> dict:
        models = getattr(self._local, "models", None)
        if models is None:
            models = {}
            if "person" in self.classes:
                hog = cv2.HOGDescriptor()
                hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
                models["person"] = hog
            for name, fname in _CASCADE_FILES.items():
                if name in self.classes:
                    path = cv2.data.haarcascades + fname
                    casc = cv2.CascadeClassifier(path)
                    if casc.empty():
                        raise RuntimeError(f"cannot load OpenCV cascade {path}")
                    models[name] = casc
            self._local.models = models
        return models

    # -- public API ----------------------------------------------------------------------
    def __call__(self, image) -> list[dict]:
        return self.detect(image)

    def detect(self, image) -> list[dict]:
        """Detect in one image (RGB uint8 HxWx3 numpy array, or anything ``to_rgb`` accepts)."""
        rgb = to_rgb(image)
        h, w = rgb.shape[:2]
        if h == 0 or w == 0:
            return []
        scale = min(1.0, self.max_side / max(h, w))
        if scale < 1.0:
            small = cv2.resize(
                rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
            )
        else:
            small = rgb
        raws = self._detect_raw(small)
        out: list[dict] = []
        for d in raws:
            x1, y1, x2, y2 = (v / scale for v in d.box)
            out.append(
                {
                    "class": CLASS_NAMES[d.class_id],
                    "class_id": d.class_id,
                    "confidence": round(d.confidence, 6),
                    "box": [
                        round(min(max(x1, 0.0), w), 2),
                        round(min(max(y1, 0.0), h), 2),
                        round(min(max(x2, 0.0), w), 2),
                        round(min(max(y2, 0.0), h), 2),
                    ],
                }
            )
        out.sort(key=lambda d: -d["confidence"])
        return out

    def detect_batch(self, images: Sequence) -> list[list[dict]]:
        return [self.detect(im) for im in images]

    def _detect_raw(self, rgb: np.ndarray) -> list[_RawDet]:
        models = self._models()
        found: list[_RawDet] = []
        if "person" in models:
            found += self._nms(self._hog(models["person"], rgb))
        if any(c in models for c in _CASCADE_FILES):
            grey = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
            for name in _CASCADE_FILES:
                if name in models:
                    found += self._nms(self._cascade(models[name], grey, CLASS_NAMES.index(name)))
        return found

    def _hog(self, hog, rgb: np.ndarray) -> list[_RawDet]:
        h, w = rgb.shape[:2]
        if h < 128 or w < 64:  # smaller than the 64x128 detection window
            return []
        s = self.hog_win_stride
        rects, weights = hog.detectMultiScale(
            rgb, hitThreshold=0.0, winStride=(s, s), padding=(8, 8), scale=self.hog_scale, groupThreshold=0
        )
        dets = []
        for (x, y, bw, bh), m in zip(np.asarray(rects).reshape(-1, 4), np.ravel(weights)):
            c = person_confidence(m)
            if c >= self.min_confidence:
                dets.append(_RawDet(0, float(m), c, (float(x), float(y), float(x + bw), float(y + bh))))
        return dets

    def _cascade(self, casc, grey: np.ndarray, class_id: int) -> list[_RawDet]:
        m = self.cascade_min_size
        if grey.shape[0] < m or grey.shape[1] < m:
            return []
        rects, _levels, weights = casc.detectMultiScale3(
            grey,
            scaleFactor=self.cascade_scale_factor,
            minNeighbors=self.cascade_min_neighbors,
            minSize=(m, m),
            outputRejectLevels=True,
        )
        dets = []
        for (x, y, bw, bh), lw in zip(np.asarray(rects).reshape(-1, 4), np.ravel(weights)):
            c = cascade_confidence(lw)
            if c >= self.min_confidence:
                dets.append(_RawDet(class_id, float(lw), c, (float(x), float(y), float(x + bw), float(y + bh))))
        return dets

    def _nms(self, dets: list[_RawDet]) -> list[_RawDet]:
        if len(dets) <= 1:
            return dets
        keep = nms(np.array([d.box for d in dets]), np.array([d.raw for d in dets]), self.nms_iou)
        return [dets[i] for i in keep]


_default: Detector | None = None
_default_lock = threading.Lock()


def default_detector() -> Detector:
    """A process-wide ``Detector()`` with default settings (created on first use)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Detector()
    return _default
