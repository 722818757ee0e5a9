"""A BentoML service with the API shapes the decorator must handle besides the example's:
async, batchable (one observation per item), class scores, and a custom result adapter.

Served by the tests with `bentoml serve tests.bentoml.extra_service:ExtraShapes`.
"""

from __future__ import annotations

import asyncio

import bentoml
import numpy as np
from PIL.Image import Image
from pydantic import BaseModel

from edgecatch.integrations import bentoml as edgecatch
from edgecatch.observation import Classification


class Scores(BaseModel):
    label: str
    probabilities: dict[str, float]


def scores_adapter(result: Scores) -> Classification:
    return Classification.from_scores(result.probabilities)


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
