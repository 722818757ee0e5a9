"""A BentoML service with the API shapes the decorator must handle besides the example's:
async, batchable (one observation per item), class scores, custom result adapters, a numpy image
sent as JSON, a parameter named `context` that is not BentoML's; and a service without
`edgecatch.app` mounted (as an inner service behind `bentoml.depends` would be).

Served by the tests with `bentoml serve tests.bentoml.extra_service:ExtraShapes`.
"""

from __future__ import annotations

import asyncio

import bentoml
import numpy as np
from PIL.Image import Image
from pydantic import BaseModel

from edgecatch.integrations import bentoml as edgecatch
from edgecatch.observation import Classification, Detection


class Scores(BaseModel):
    label: str
    probabilities: dict[str, float]


def scores_adapter(result: Scores) -> Classification:
    return Classification.from_scores(result.probabilities)


def list_adapter(result: dict) -> list[Detection]:  # a list, not the documented tuple: accepted
    return [Detection(result["what"], result["score"], (0.0, 0.0, 8.0, 8.0))]


def broken_adapter(result: dict) -> Classification:
    raise KeyError("probabilities")


@bentoml.asgi_app(edgecatch.app, path="/edgecatch")
@bentoml.service(name="edgecatch-extra-shapes", workers=1)
class ExtraShapes:
    @bentoml.api
    @edgecatch.observe(image="image", result="detections", model="async-detector")
    async def detect_async(self, image: Image) -> list[dict]:
        await asyncio.sleep(0)
        width, height = image.size
        return [{"class": "cat", "class_id": 0, "confidence": 0.35, "box": [0.0, 0.0, width / 2, height / 2]}]

    @bentoml.api(batchable=True, max_batch_size=8, max_latency_ms=200)
    @edgecatch.observe(image="images", result="detections", model="batch-detector")
    def detect_batch(self, images: list[Image]) -> list[list[dict]]:
        return [[{"class": "dog", "class_id": 1, "confidence": 0.4, "box": [1.0, 2.0, 3.0, 4.0]}] for _ in images]

    @bentoml.api
    @edgecatch.observe(image="image", result="scores", model="classifier")
    def classify(self, image: Image) -> dict[str, float]:
        mean = float(np.asarray(image.convert("L")).mean()) / 255.0
        return {"bright": mean, "dark": 1.0 - mean}

    @bentoml.api
    @edgecatch.observe(image="image", result=scores_adapter, model="custom-classifier")
    def classify_custom(self, image: Image) -> Scores:
        return Scores(label="cat", probabilities={"cat": 0.52, "dog": 0.48})

    @bentoml.api
    @edgecatch.observe(image="image", result=list_adapter, model="list-adapter")
    def detect_listed(self, image: Image) -> dict:
        return {"what": "cat", "score": 0.3}

    @bentoml.api
    @edgecatch.observe(image="image", result=broken_adapter, model="broken-adapter")
    def detect_broken(self, image: Image) -> dict:
        return {"what": "cat"}

    @bentoml.api
    @edgecatch.observe(image="pixels", result="detections", model="array-detector")
    def detect_array(self, pixels: np.ndarray) -> list[dict]:  # JSON numbers: an int64 array
        height, width = pixels.shape[:2]
        return [{"class": "cat", "confidence": 0.3, "box": [0.0, 0.0, width / 2, height / 2]}]

    @bentoml.api
    @edgecatch.observe(image="image", result="detections", model="context-named")
    def detect_with_context(self, image: Image, context: str = "") -> list[dict]:
        return [{"class": context or "cat", "confidence": 0.3, "box": [0.0, 0.0, 4.0, 4.0]}]


@bentoml.service(name="edgecatch-unmounted", workers=1)
class Unmounted:
    """No `edgecatch.app`: delivery must start anyway, with the first request."""

    @bentoml.api
    @edgecatch.observe(image="image", result="detections", model="unmounted-detector")
    def detect(self, image: Image) -> list[dict]:
        return [{"class": "cat", "confidence": 0.3, "box": [0.0, 0.0, 4.0, 4.0]}]
