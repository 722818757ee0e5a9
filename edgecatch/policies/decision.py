"""The outcome of evaluating one observation against a policy set."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Decision", "NOT_SELECTED"]


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether to keep a prediction, and why.

    `matched` lists every policy whose conditions held, in policy order; `reasons` has a short
    human-readable reason for each. `policy` is the one that selected the sample (the first that held,
    passed its `sample` draw and still had budget); `limited` those that held but were out of budget.
    `tags` are the document's tags plus those of every policy that held. `batch` is the rendered
    labeling-batch name (empty when not selected).
    """

    selected: bool
    policy: str | None = None
    matched: tuple[str, ...] = ()
    limited: tuple[str, ...] = ()
    sampled_out: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    reasons: dict[str, str] = field(default_factory=dict)
    batch: str = ""


NOT_SELECTED = Decision(selected=False)
