"""Reading API results (dicts, models, objects) into detections or class scores."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pydantic import BaseModel

from edgecatch.integrations.results import ResultFormatError, read_detections, read_scores, resolve_adapter


class Box(BaseModel):
    label: str
    score: float
    bbox: list[float]


@dataclass
class Corner:
    name: str
    confidence: float
    x1: float
    y1: float
    x2: float
    y2: float
    class_id: int = 4


def test_dicts_models_and_dataclasses():
    dets = read_detections([
        {"class": "person", "confidence": 0.9, "box": [1, 2, 3, 4], "class_id": 0},
        Box(label="face", score=0.5, bbox=[5, 6, 7, 8]),
        Corner("cat", 0.25, 1, 1, 2, 2),
    ])
    assert [(d.class_name, d.confidence, d.box, d.class_id) for d in dets] == [
        ("person", 0.9, (1.0, 2.0, 3.0, 4.0), 0),
        ("face", 0.5, (5.0, 6.0, 7.0, 8.0), -1),
        ("cat", 0.25, (1.0, 1.0, 2.0, 2.0), 4),
    ]


def test_wrapped_and_empty_results():
    assert read_detections({"detections": []}) == ()
    assert len(read_detections({"predictions": [{"class": "a", "score": 1, "bbox": [0, 0, 1, 1]}]})) == 1


def test_numpy_boxes():
    import numpy as np

    (d,) = read_detections([{"class": "a", "score": np.float32(0.5), "box": np.array([1, 2, 3, 4])}])
    assert d.box == (1.0, 2.0, 3.0, 4.0) and d.confidence == 0.5


@pytest.mark.parametrize("bad", [
    [{"confidence": 0.5, "box": [0, 0, 1, 1]}],
    [{"class": "a", "confidence": 0.5}],
    [{"class": "a", "confidence": 0.5, "box": [0, 0, 1]}],
    [{"class": "a", "confidence": "high", "box": [0, 0, 1, 1]}],
    "text",
    {"boxes_are": []},
    42,
])
def test_unreadable_results_raise(bad):
    with pytest.raises(ResultFormatError):
        read_detections(bad)


def test_scores():
    clf = read_scores({"cat": 0.2, "dog": 0.8})
    assert clf.top_class == "dog" and clf.margin == pytest.approx(0.6)
    assert read_scores([{"label": "a", "score": 0.7}, {"label": "b", "score": 0.3}]).top_class == "a"
    with pytest.raises(ResultFormatError):
        read_scores("cat")


def test_resolve_adapter():
    assert resolve_adapter("detections") is read_detections
    custom = lambda result: read_scores(result["probs"])  # noqa: E731
    assert resolve_adapter(custom) is custom
    with pytest.raises(ValueError):
        resolve_adapter("boxes")
