"""The policy language, as pydantic models.

These models are the single definition of what a policy document may contain: the engine compiles
them, `edgecatch validate` reports their errors, and `policies/schema.json` is exported from them
(`edgecatch schema > policies/schema.json`; a test fails when that file is stale).

Every model forbids unknown keys: a typo such as `confidence_bellow` must fail loudly rather than
silently turn a policy into "always".
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from pydantic_core import PydanticCustomError

from edgecatch.observation import Verdict

__all__ = [
    "BATCH_PLACEHOLDERS",
    "Condition",
    "DetectionCount",
    "ImageSettings",
    "Limits",
    "Policy",
    "PolicyDocument",
]

# Numbers are strict: YAML's `yes` or "0.5" in quotes is a mistake to report, not a value to coerce.
Probability = Annotated[float, Field(ge=0.0, le=1.0, strict=True)]
Count = Annotated[int, Field(ge=0, strict=True)]
PositiveCount = Annotated[int, Field(ge=1, strict=True)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")]
Tag = Annotated[str, StringConstraints(min_length=1, max_length=100, strip_whitespace=True)]

BATCH_PLACEHOLDERS = ("date", "week", "month", "model")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Limits(_Strict):
    """Rolling-window budgets: at most N selections in any window of that length."""

    per_minute: Count | None = None
    per_hour: Count | None = None
    per_day: Count | None = None

    def windows(self) -> tuple[tuple[float, int], ...]:
        """(window length in seconds, budget) for every limit that is set."""
        pairs = ((60.0, self.per_minute), (3600.0, self.per_hour), (86400.0, self.per_day))
        return tuple((seconds, budget) for seconds, budget in pairs if budget is not None)


class ImageSettings(_Strict):
    """How a selected image is prepared before it is spooled (in the background)."""

    max_size: Annotated[int, Field(ge=32, le=16384, strict=True)] = Field(
        1280, description="Longest side in pixels; larger images are scaled down, keeping the aspect ratio.")
    jpeg_quality: Annotated[int, Field(ge=1, le=100, strict=True)] = 90


class DetectionCount(_Strict):
    """Bounds on the number of detections (of the listed classes, or of all classes)."""

    min: Count | None = None
    max: Count | None = None

    @model_validator(mode="after")
    def _bounds(self) -> DetectionCount:
        if self.min is None and self.max is None:
            raise ValueError("give at least one of min, max")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class Condition(_Strict):
    """A block of conditions that must all hold (AND). Blocks nest with any_of / all_of / not."""

    random: Probability | None = Field(
        None, description="Holds with this probability, drawn independently per prediction.")
    every_nth: PositiveCount | None = Field(
        None, description="Holds for every Nth prediction that reaches it, counted per policy and model.")
    classes: Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(min_length=1)] | None = Field(
        None, description="Detections: only these classes count. Classification: the top class is one of these.")
    confidence_below: Probability | None = None
    confidence_above: Probability | None = None
    confidence_between: tuple[Probability, Probability] | None = Field(
        None, description="Inclusive range [low, high].")
    min_matches: PositiveCount | None = Field(
        None, description="Detections: how many must pass the class and confidence filters (default 1).")
    detections: DetectionCount | None = None
    margin_below: Probability | None = Field(
        None, description="Classification: top-1 minus top-2 probability is below this.")
    entropy_above: Annotated[float, Field(ge=0.0, strict=True)] | None = Field(
        None, description="Classification: entropy of the class distribution in bits is above this.")
    any_of: list[Condition] | None = None
    all_of: list[Condition] | None = None
    not_: Condition | None = Field(None, alias="not")

    @field_validator("confidence_between")
    @classmethod
    def _ordered_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and value[0] > value[1]:
            raise ValueError(f"low ({value[0]}) is greater than high ({value[1]})")
        return value

    @field_validator("any_of", "all_of")
    @classmethod
    def _not_empty(cls, value: list[Condition] | None) -> list[Condition] | None:
        if value is not None and not value:
            raise ValueError("needs at least one condition block")
        if value is not None and any(not block.has_conditions() for block in value):
            raise ValueError("a condition block needs at least one condition (an empty one always holds)")
        return value

    @field_validator("not_")
    @classmethod
    def _not_has_conditions(cls, value: Condition | None) -> Condition | None:
        if value is not None and not value.has_conditions():
            raise ValueError("a condition block needs at least one condition (an empty one always holds)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _spelled_as_in_files(cls, data: Any) -> Any:
        # populate_by_name lets code build blocks with not_=...; in a file the key is `not`.
        if isinstance(data, dict) and "not_" in data:
            raise PydanticCustomError("python_name", "unknown key 'not_' (did you mean 'not'?)")
        return data

    def has_conditions(self) -> bool:
        return any(
            getattr(self, name) is not None
            for name in Condition.model_fields
            if name not in ("min_matches",)
        )


class Policy(Condition):
    """A named rule: when its conditions hold, the prediction may be selected."""

    name: Name
    description: str | None = None
    models: Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(min_length=1)] | None = Field(
        None, description="Glob patterns on the model name (default: every model).")
    feedback: Verdict | None = Field(
        None, description="Match only feedback events with this verdict (other policies never match them).")
    sample: Probability = Field(1.0, description="Keep this fraction of the matches.")
    limits: Limits | None = None
    tags: list[Tag] = Field(default_factory=list)
    enabled: Annotated[bool, Field(strict=True)] = True

    @model_validator(mode="after")
    def _has_a_condition(self) -> Policy:
        if self.feedback is None and not self.has_conditions():
            raise ValueError(
                "a policy needs at least one condition (random: 1.0 selects everything on purpose)")
        return self


class PolicyDocument(_Strict):
    """A policy file: document-wide settings and the ordered list of policies."""

    version: Literal[1] = Field(description="The policy language version; always 1 for now.")
    batch: str = Field(
        "edgecatch-{date}",
        description="Labeling batch name; placeholders {date} {week} {month} {model}.")
    tags: list[Tag] = Field(default_factory=list, description="Tags put on every sample.")
    image: ImageSettings = Field(default_factory=ImageSettings)
    limits: Limits | None = Field(None, description="Global budget shared by all policies.")
    policies: list[Policy]

    @field_validator("version", mode="before")
    @classmethod
    def _version_is_the_number_1(cls, value: Any) -> Any:
        if type(value) is not int:  # true, 1.0 or "1" would pass as 1: a mistake to report
            raise PydanticCustomError("literal_error", "Input should be 1")
        return value

    @field_validator("batch")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        for placeholder in re.findall(r"{([^{}]*)}", value):
            if placeholder not in BATCH_PLACEHOLDERS:
                known = ", ".join("{%s}" % p for p in BATCH_PLACEHOLDERS)
                raise ValueError(f"unknown placeholder {{{placeholder}}}; known: {known}")
        return value

    @classmethod
    def raw_errors(cls, data: Any) -> list[dict[str, Any]]:
        """Every duplicate policy name, from the raw document (see `edgecatch.policies.load`): the
        list's own validator below runs only when every policy in it is valid, and stops at one."""
        policies = data.get("policies") if isinstance(data, dict) else None
        names = [p.get("name") if isinstance(p, dict) else None for p in policies] if isinstance(policies, list) else []
        return [{"type": "duplicate_name", "loc": ("policies", index, "name"),
                 "msg": f"duplicate policy name {name!r} (first used by policies[{first}])"}
                for index, name, first in _duplicate_names(names)]

    @field_validator("policies")
    @classmethod
    def _unique_names(cls, value: list[Policy]) -> list[Policy]:
        for index, name, first in _duplicate_names([policy.name for policy in value]):
            # `index` in the context lets the loader point at the duplicate's own line.
            raise PydanticCustomError(
                "duplicate_name", "duplicate policy name {name} (first used by policies[{first}])",
                {"name": repr(name), "first": first, "index": index})
        return value


def _duplicate_names(names: list[Any]) -> list[tuple[int, str, int]]:
    """(index, name, index of its first use) for each repeated name; non-strings are skipped."""
    first_index: dict[str, int] = {}
    repeated = []
    for index, name in enumerate(names):
        if not isinstance(name, str):
            continue
        if name in first_index:
            repeated.append((index, name, first_index[name]))
        else:
            first_index[name] = index
    return repeated
