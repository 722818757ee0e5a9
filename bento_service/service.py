"""The example BentoML service: the OpenCV detector (bento_service/detector.py) behind one API.

    bentoml serve bento_service.service:DetectionService --host 127.0.0.1 --port 3000
    curl -F image=@photo.jpg http://127.0.0.1:3000/detect

``detect`` takes an image (multipart upload; JPEG/PNG/...) and returns a JSON list of
detections, best first: ``{"class", "class_id", "confidence" in [0, 1], "box": [x1, y1, x2, y2]}``
with the box in pixels of the uploaded image (EXIF orientation applied).

Environment: DETECTOR_WORKERS (1), DETECTOR_CLASSES ("person,face"; also "cat_face"),
DETECTOR_OPENCV_THREADS (OpenCV's default: all cores).

Note: BentoML opens the upload lazily with ``PIL.Image.open(upload.file)``; bytes that are not an
image fail in BentoML's input validation (HTTP 500, before ``detect`` runs).  The encoded bytes
stay readable through ``image.fp`` (seek(0)/read()) until the image is loaded: PIL sets ``fp`` to
None on ``load()``.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

from typing_extensions import TypedDict

import bentoml
from PIL.Image import Image
from pydantic import Field

from edgecatch.integrations import bentoml as edgecatch

# `bentoml serve bento_service.service:...` imports this module as part of the bento_service
# package; `bentoml serve service:...` from inside bento_service/ imports it top-level.
try:
    from .detector import CLASS_NAMES, Detector, to_rgb
except ImportError:  # pragma: no cover - top-level import
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from detector import CLASS_NAMES, Detector, to_rgb

# A TypedDict (not a pydantic model) because a detection's key is "class", a Python keyword:
# the detector's dicts are returned as they are and the OpenAPI schema still lists every field.
Detection = TypedDict(
    "Detection",
    {
        "class": Annotated[str, Field(description=f"class name, one of {list(CLASS_NAMES)}")],
        "class_id": Annotated[int, Field(description="index of the class in CLASS_NAMES")],
        "confidence": Annotated[float, Field(ge=0.0, le=1.0, description="monotonic in the raw detector score")],
        "box": Annotated[
            list[float],
            Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in pixels of the input image"),
        ],
    },
)


# edgecatch, line 1 of 2: POST /edgecatch/feedback, and delivery started/stopped with the service.
@bentoml.asgi_app(edgecatch.app, path="/edgecatch")
@bentoml.service(
    name="edgecatch-detector",
    workers=int(os.environ.get("DETECTOR_WORKERS", "1")),
    traffic={"timeout": 30},
)
class DetectionService:
    def __init__(self) -> None:
        # OpenCV uses every core by default; with several workers, DETECTOR_OPENCV_THREADS=1
        # avoids oversubscription (measured on 2 cores: about the same throughput either way).
        if os.environ.get("DETECTOR_OPENCV_THREADS"):
            import cv2

            cv2.setNumThreads(int(os.environ["DETECTOR_OPENCV_THREADS"]))
        classes = os.environ.get("DETECTOR_CLASSES", "person,face").split(",")
        self.detector = Detector([c.strip() for c in classes if c.strip()])

    @bentoml.api
    # edgecatch, line 2 of 2: observe every prediction (the API and its schema are unchanged).
    @edgecatch.observe(image="image", result="detections", model="people-detector")
    def detect(self, image: Image) -> list[Detection]:
        """Detect people and faces in one image."""
        return self.detector(to_rgb(image))
