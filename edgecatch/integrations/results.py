"""Reading a Python API's result into the normal form (detections or class scores).

The BentoML decorator is told what the API returns: `"detections"` (a list of boxes), `"scores"`
(class → probability), or a callable adapter for anything else. Detections may be dicts, pydantic
models, dataclasses or any object with attributes; the usual names are understood:

    class:      class | class_name | label | name
    confidence: confidence | score | probability | prob
    box:        box | bbox | xyxy     ([x1, y1, x2, y2] in pixels)   or x1, y1, x2, y2 fields
    class id:   class_id | label_id | category_id   (optional)

A result that cannot be read raises `ResultFormatError`; the integration counts it
(`edgecatch_unparsed_total{reason="result"}`) and returns the API's result untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Union

from edgecatch.observation import Classification, Detection

__all__ = ["Prediction", "ResultAdapter", "ResultFormatError", "read_detections", "read_scores", "resolve_adapter"]

Prediction = Union[tuple[Detection, ...], Classification]
ResultAdapter = Callable[[Any], Prediction]

_CLASS = ("class", "class_name", "label", "name")
_CONFIDENCE = ("confidence", "score", "probability", "prob")
_BOX = ("box", "bbox", "xyxy")
_CLASS_ID = ("class_id", "label_id", "category_id")


class ResultFormatError(ValueError):
    """The API's result is not in a shape edgecatch can read."""


def _get(item: Any, names: tuple[str, ...]) -> Any:
    if isinstance(item, Mapping):
        for name in names:
            if name in item:
                return item[name]
        return None
    for name in names:
        value = getattr(item, name, None)
        if value is not None:
            return value
    return None


def _box(item: Any) -> tuple[float, float, float, float]:
    box = _get(item, _BOX)
    if box is None:
        corners = [_get(item, (name,)) for name in ("x1", "y1", "x2", "y2")]
        if any(c is None for c in corners):
            raise ResultFormatError(f"a detection has no box (looked for {', '.join(_BOX)} or x1..y2)")
        box = corners
    else:
        if not isinstance(box, (list, tuple)) and hasattr(box, "tolist"):  # numpy, torch
            box = box.tolist()
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise ResultFormatError(f"a box must be [x1, y1, x2, y2], got {box!r:.80}")
    try:
        return (float(box[0]), float(box[1]), float(box[2]), float(box[3]))
    except (TypeError, ValueError):
        raise ResultFormatError(f"box coordinates must be numbers, got {box!r:.80}") from None


def read_detections(result: Any) -> tuple[Detection, ...]:
    """A list of detections (dicts or objects) into the normal form."""
    if isinstance(result, Mapping):
        for key in ("detections", "predictions", "boxes"):
            if key in result:
                result = result[key]
                break
        else:
            raise ResultFormatError("expected a list of detections, got a mapping without 'detections'")
    elif not isinstance(result, (list, tuple)) and hasattr(result, "detections"):
        result = result.detections
    if not isinstance(result, Iterable) or isinstance(result, (str, bytes)):
        raise ResultFormatError(f"expected a list of detections, got {type(result).__name__}")
    detections = []
    for item in result:
        if type(item) is dict and "class" in item and "confidence" in item and "box" in item:
            # The common shape, read directly (this runs on the request path).
            box = item["box"]
            try:
                if len(box) == 4:
                    class_id = item.get("class_id")
                    detections.append(Detection(
                        str(item["class"]), float(item["confidence"]),
                        (float(box[0]), float(box[1]), float(box[2]), float(box[3])),
                        int(class_id) if class_id is not None else -1))
                    continue
            except (TypeError, ValueError):
                pass  # fall through to the general reader and its error messages
        name = _get(item, _CLASS)
        confidence = _get(item, _CONFIDENCE)
        if name is None or confidence is None:
            raise ResultFormatError("a detection needs a class (class/label/name) and a confidence (confidence/score)")
        try:
            confidence = float(confidence)
        except (TypeError, ValueError):
            raise ResultFormatError(f"confidence must be a number, got {confidence!r:.40}") from None
        class_id = _get(item, _CLASS_ID)
        detections.append(Detection(str(name), confidence, _box(item), int(class_id) if class_id is not None else -1))
    return tuple(detections)


def read_scores(result: Any) -> Classification:
    """Class scores — `{"cat": 0.9, ...}` or a list of `{class, confidence}` — into the normal form."""
    if not isinstance(result, Mapping) and hasattr(result, "model_dump"):
        result = result.model_dump()
    if isinstance(result, Mapping):
        if "scores" in result and isinstance(result["scores"], Mapping):
            result = result["scores"]
        try:
            return Classification.from_scores({str(k): float(v) for k, v in result.items()})
        except (TypeError, ValueError):
            raise ResultFormatError("class scores must map class names to numbers") from None
    if isinstance(result, (list, tuple)):
        scores = {}
        for item in result:
            name, confidence = _get(item, _CLASS), _get(item, _CONFIDENCE)
            if name is None or confidence is None:
                raise ResultFormatError("each class score needs a class and a confidence")
            scores[str(name)] = float(confidence)
        return Classification.from_scores(scores)
    raise ResultFormatError(f"expected class scores, got {type(result).__name__}")


def resolve_adapter(result: Literal["detections", "scores"] | ResultAdapter) -> ResultAdapter:
    if callable(result):
        return result
    if result == "detections":
        return read_detections
    if result == "scores":
        return read_scores
    raise ValueError(f"result must be 'detections', 'scores' or a callable, not {result!r}")
