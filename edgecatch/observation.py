"""One prediction in one normal form, whatever served it.

The BentoML decorator reads Python objects and the Triton sidecar reads tensors; both produce an
`Observation`, which is all the policy engine and the delivery pipeline ever see. Plain frozen
dataclasses with slots: they are built on the request path, so they must be cheap, and they are
queued for the background, so they must not change after the fact.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

__all__ = [
    "Box",
    "Classification",
    "Detection",
    "Observation",
    "Verdict",
]

Box = tuple[float, float, float, float]
"""A box in pixels of the original image: x1, y1, x2, y2 (top-left, bottom-right)."""


class Verdict(str, enum.Enum):
    """A user's verdict on an earlier prediction (a feedback event)."""

    INCORRECT = "incorrect"
    CORRECT = "correct"
    #: No verdict arrived while the prediction could still be recalled: an implicit affirmation.
    SILENT = "silent"


@dataclass(frozen=True, slots=True)
class Detection:
    class_name: str
    confidence: float
    box: Box
    class_id: int = -1


@dataclass(frozen=True, slots=True)
class Classification:
    """Class probabilities, kept sorted from the most to the least likely class."""

    ranked: tuple[tuple[str, float], ...]

    @classmethod
    def from_scores(cls, scores: dict[str, float]) -> Classification:
        return cls(tuple(sorted(scores.items(), key=lambda item: item[1], reverse=True)))

    @property
    def top_class(self) -> str | None:
        return self.ranked[0][0] if self.ranked else None

    @property
    def top_confidence(self) -> float:
        return self.ranked[0][1] if self.ranked else 0.0

    @property
    def margin(self) -> float:
        """Top-1 minus top-2 probability (1.0 when there is a single class)."""
        if not self.ranked:
            return 0.0
        if len(self.ranked) == 1:
            return 1.0
        return self.ranked[0][1] - self.ranked[1][1]

    @property
    def entropy(self) -> float:
        """Shannon entropy in bits of the (renormalised) distribution."""
        total = sum(p for _, p in self.ranked if p > 0)
        if total <= 0:
            return 0.0
        return -sum((p / total) * math.log2(p / total) for _, p in self.ranked if p > 0)

    def as_dict(self) -> dict[str, float]:
        return dict(self.ranked)


@dataclass(frozen=True, slots=True)
class Observation:
    """What a model saw and said for one image (one item of a batch).

    Exactly one of `detections` and `classification` describes the prediction; a detector that found
    nothing has `detections=()`. A feedback event is the recalled observation with `feedback` set.
    """

    model: str
    model_version: str = ""
    image_width: int = 0
    image_height: int = 0
    detections: tuple[Detection, ...] = ()
    classification: Classification | None = None
    feedback: Verdict | None = None
    #: Free text a user sent with a verdict, and the labels they say are right (normal form too).
    feedback_note: str = ""
    corrected: tuple[Detection, ...] | Classification | None = None
    inference_id: str = ""
    #: Seconds since the epoch when the prediction was made (or the feedback arrived).
    timestamp: float = 0.0
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_classification(self) -> bool:
        return self.classification is not None
