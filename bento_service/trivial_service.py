"""A BentoML service with the example service's API that returns fixed detections without
looking at the image: for benchmarks, where edgecatch's own cost is all that shows.

    bentoml serve bento_service.trivial_service:TrivialDetectionService --host 127.0.0.1 --port 3001
"""

from __future__ import annotations

import copy
import os

import bentoml
from PIL.Image import Image

from edgecatch.integrations import bentoml as edgecatch

try:
    from .service import Detection
except ImportError:  # pragma: no cover - `bentoml serve trivial_service:...` from inside bento_service/
    from service import Detection

FIXED: list[dict] = [
    {"class": "person", "class_id": 0, "confidence": 0.91, "box": [10.0, 20.0, 110.0, 260.0]},
    {"class": "face", "class_id": 1, "confidence": 0.55, "box": [40.0, 30.0, 90.0, 80.0]},
    {"class": "person", "class_id": 0, "confidence": 0.12, "box": [200.0, 100.0, 260.0, 228.0]},
]


@bentoml.asgi_app(edgecatch.app, path="/edgecatch")
@bentoml.service(
    name="edgecatch-trivial-detector",
    workers=int(os.environ.get("DETECTOR_WORKERS", "1")),
    traffic={"timeout": 30},
)
class TrivialDetectionService:
    @bentoml.api
    @edgecatch.observe(image="image", result="detections", model="trivial-detector")
    def detect(self, image: Image) -> list[Detection]:
        """Return the same three detections for every image."""
        return copy.deepcopy(FIXED)
