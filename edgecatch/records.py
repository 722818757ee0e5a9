"""Predictions as JSON records: the format of `edgecatch replay` files.

One JSON object per line:
    {"timestamp": "2026-11-20T08:00:00Z", "model": "people-detector", "model_version": "1",
     "image": {"width": 640, "height": 480},
     "detections": [{"class": "person", "class_id": 0, "confidence": 0.82, "box": [10, 20, 110, 220]}],
     "inference_id": "...", "feedback": "incorrect"}
A classification gives `"classification": {"cat": 0.7, "dog": 0.3}` instead of `detections`.
`timestamp` is seconds since the epoch or an ISO 8601 time (UTC unless it says otherwise).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgecatch.observation import Classification, Detection, Observation, Verdict

__all__ = ["DetectionRecord", "PredictionRecord"]

# Seconds since the epoch up to 9999-12-31T23:59:59Z: a millisecond timestamp (a common mistake)
# is refused with the line it is on, not found when a sample's batch name is made from it.
MAX_EPOCH_SECONDS = 253_402_300_799.0
EpochSeconds = Annotated[float, Field(ge=0.0, le=MAX_EPOCH_SECONDS, allow_inf_nan=False)]


class _Record(BaseModel):
    # NaN or infinite boxes and scores would reach labels files and manifests (`nan`, bare `NaN`
    # that strict JSON parsers refuse): refused like any other bad value.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class ImageSize(_Record):
    width: Annotated[int, Field(ge=0)]
    height: Annotated[int, Field(ge=0)]


class DetectionRecord(_Record):
    class_name: str = Field(alias="class", min_length=1, max_length=200)
    class_id: int = -1
    confidence: Annotated[float, Field(ge=0.0, le=1.0)]
    box: tuple[float, float, float, float] = Field(description="x1, y1, x2, y2 in pixels")

    @model_validator(mode="after")
    def _ordered_corners(self) -> DetectionRecord:
        x1, y1, x2, y2 = self.box
        if x2 < x1 or y2 < y1:
            raise ValueError(f"box {list(self.box)} is not x1, y1, x2, y2 with x1 <= x2 and y1 <= y2")
        return self

    def to_detection(self) -> Detection:
        return Detection(self.class_name, self.confidence, self.box, self.class_id)


class PredictionRecord(_Record):
    timestamp: datetime | EpochSeconds
    model: str = Field(min_length=1)
    model_version: str = ""
    image: ImageSize | None = None
    detections: list[DetectionRecord] | None = None
    classification: dict[str, Annotated[float, Field(ge=0.0, le=1.0)]] | None = None
    feedback: Verdict | None = None
    inference_id: str = ""

    @field_validator("timestamp", mode="before")
    @classmethod
    def _seconds_or_iso_time(cls, value: Any) -> Any:
        # A number is seconds (the datetime branch would take -5 or 1e15 as a time, and true as 1).
        if isinstance(value, bool):
            raise ValueError("expected seconds since the epoch or an ISO 8601 time, got a boolean")
        if isinstance(value, (int, float)):
            if not 0.0 <= value <= MAX_EPOCH_SECONDS:  # also NaN
                hint = ("milliseconds? divide by 1000" if MAX_EPOCH_SECONDS < value <= MAX_EPOCH_SECONDS * 1000
                        else f"from 0 to {MAX_EPOCH_SECONDS:.0f}")
                raise ValueError(f"{value!r} is not seconds since the epoch ({hint})")
            return float(value)
        return value

    @model_validator(mode="after")
    def _one_kind_of_prediction(self) -> PredictionRecord:
        if (self.detections is None) == (self.classification is None):
            raise ValueError("give exactly one of 'detections' (a list, may be empty) and 'classification'")
        return self

    @property
    def epoch_seconds(self) -> float:
        if isinstance(self.timestamp, datetime):
            stamp = self.timestamp
            if stamp.tzinfo is None:
                stamp = stamp.replace(tzinfo=timezone.utc)
            return stamp.timestamp()
        return float(self.timestamp)

    def to_observation(self) -> Observation:
        return Observation(
            model=self.model,
            model_version=self.model_version,
            image_width=self.image.width if self.image else 0,
            image_height=self.image.height if self.image else 0,
            detections=tuple(d.to_detection() for d in self.detections or ()),
            classification=(
                Classification.from_scores(self.classification) if self.classification is not None else None),
            feedback=self.feedback,
            inference_id=self.inference_id,
            timestamp=self.epoch_seconds,
        )
