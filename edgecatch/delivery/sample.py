"""A selected sample as it waits in the spool: the prepared image's description and its pre-labels.

`SampleRecord` is what the spool stores (as JSON) next to the image bytes. It is built in the
background from an `Observation` and a `Decision` after the image was prepared, so its boxes are
already in the pixels of the prepared (resized, oriented) image. Everything in it comes from the
model and the policies; sample ids are generated here and are the only thing used in file names.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["SampleDetection", "SampleRecord", "new_sample_id", "is_sample_id"]

_SAMPLE_ID = re.compile(r"^[0-9a-f]{32}$")
_id_lock = threading.Lock()
_last_ms = 0
_counter = 0


def new_sample_id(now: float | None = None) -> str:
    """A 32-hex-digit id that sorts by creation time (milliseconds, then a counter, then randomness).

    The spool delivers oldest first by sorting file names, so ids must sort in creation order within
    a process; across processes, ties inside one millisecond are ordered arbitrarily, which is fine.
    """
    global _last_ms, _counter
    ms = int((time.time() if now is None else now) * 1000)
    with _id_lock:
        if ms <= _last_ms:
            ms = _last_ms
            _counter += 1
        else:
            _last_ms, _counter = ms, 0
        counter = _counter
    return f"{ms:012x}{counter & 0xFFFF:04x}{os.urandom(8).hex()}"


def is_sample_id(text: str) -> bool:
    return bool(_SAMPLE_ID.match(text))


@dataclass(frozen=True, slots=True)
class SampleDetection:
    class_name: str
    class_id: int
    confidence: float
    #: x1, y1, x2, y2 in pixels of the prepared image.
    box: tuple[float, float, float, float]


@dataclass(frozen=True, slots=True)
class SampleRecord:
    sample_id: str
    created: float
    model: str
    width: int
    height: int
    task: Literal["detection", "classification"]
    model_version: str = ""
    inference_id: str = ""
    policy: str = ""
    tags: tuple[str, ...] = ()
    batch: str = ""
    reasons: dict[str, str] = field(default_factory=dict)
    image_format: Literal["jpeg", "png"] = "jpeg"
    detections: tuple[SampleDetection, ...] = ()
    #: (class, probability) from the most to the least likely; empty for detections.
    classification: tuple[tuple[str, float], ...] = ()
    feedback: str = ""
    #: What the user wrote with a verdict, and the labels they say are right (prepared image's pixels).
    feedback_note: str = ""
    corrected: tuple[SampleDetection, ...] = ()
    corrected_classification: tuple[tuple[str, float], ...] = ()
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def image_name(self) -> str:
        return f"{self.sample_id}.{'jpg' if self.image_format == 'jpeg' else 'png'}"

    @property
    def top_class(self) -> str | None:
        return self.classification[0][0] if self.classification else None

    def metadata(self) -> dict[str, Any]:
        """What travels with the image (Upload API `metadata`, the directory sink's manifest)."""
        meta: dict[str, Any] = {
            "sample_id": self.sample_id,
            "model": self.model,
            "model_version": self.model_version,
            "policy": self.policy,
            "tags": list(self.tags),
            "inference_id": self.inference_id,
            "created": self.created,
        }
        if self.policy in self.reasons:
            meta["reason"] = self.reasons[self.policy]
        if self.feedback:
            meta["feedback"] = self.feedback
        if self.feedback_note:
            meta["feedback_note"] = self.feedback_note
        if self.corrected:
            meta["corrected"] = [{"class": d.class_name, "class_id": d.class_id, "box": list(d.box)}
                                 for d in self.corrected]
        if self.corrected_classification:
            meta["corrected_classification"] = dict(self.corrected_classification)
        if self.extra:
            meta["extra"] = dict(self.extra)
        return meta

    def to_json(self) -> bytes:
        data = asdict(self)
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> SampleRecord:
        data = json.loads(raw)
        if not isinstance(data, dict) or not is_sample_id(str(data.get("sample_id", ""))):
            raise ValueError("not a sample record")
        data["tags"] = tuple(data.get("tags", ()))
        data["detections"] = tuple(
            SampleDetection(d["class_name"], int(d["class_id"]), float(d["confidence"]),
                            tuple(float(v) for v in d["box"]))  # type: ignore[arg-type]
            for d in data.get("detections", ()))
        data["classification"] = tuple((str(name), float(p)) for name, p in data.get("classification", ()))
        data["corrected"] = tuple(
            SampleDetection(d["class_name"], int(d["class_id"]), float(d["confidence"]),
                            tuple(float(v) for v in d["box"]))  # type: ignore[arg-type]
            for d in data.get("corrected", ()))
        data["corrected_classification"] = tuple(
            (str(name), float(p)) for name, p in data.get("corrected_classification", ()))
        return cls(**data)
