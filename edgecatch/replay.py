"""Backtesting policies on recorded predictions: what would they have collected, and why?

The records' own timestamps drive the engine's clock, so rolling limits replay as they would have
acted live; `seed` makes `random` and `sample` draws repeatable.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from pydantic import ValidationError

from edgecatch.observation import Observation
from edgecatch.policies import Decision, EngineState, PolicyDocument, PolicySet
from edgecatch.policies.load import format_path
from edgecatch.records import PredictionRecord

__all__ = ["PolicyStats", "RecordError", "ReplayResult", "read_records", "replay"]


_CLOCK_SLACK_SECONDS = 1.0  # merged logs of replicas whose clocks differ a little are still in order


class RecordError(ValueError):
    """A bad line in a predictions file; the message names the file and the line."""


@dataclass
class PolicyStats:
    matches: int = 0
    selections: int = 0
    limited: int = 0
    sampled_out: int = 0


@dataclass
class ReplayResult:
    records: int = 0
    predictions: int = 0
    feedback_events: int = 0
    selected: int = 0
    first_timestamp: float | None = None
    last_timestamp: float | None = None
    policies: dict[str, PolicyStats] = field(default_factory=dict)

    @property
    def span_seconds(self) -> float:
        if self.first_timestamp is None or self.last_timestamp is None:
            return 0.0
        return self.last_timestamp - self.first_timestamp

    def per_day(self, count: int) -> float | None:
        """`count` extrapolated to a day at the recorded rate (None when the records span no time)."""
        span = self.span_seconds
        return count * 86400.0 / span if span > 0 else None


def read_records(path: Path, on_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[int, Observation]]:
    """(line number, observation) for every non-blank line; raises RecordError on the first bad one."""
    with path.open("rb") as stream:
        yield from _parse_lines(stream, str(path), on_bytes)


def _parse_lines(
    stream: IO[bytes], source: str, on_bytes: Callable[[int], None] | None
) -> Iterator[tuple[int, Observation]]:
    for number, raw in enumerate(stream, start=1):
        if on_bytes is not None:
            on_bytes(len(raw))
        if not raw.strip():
            continue
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RecordError(f"{source}:{number}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise RecordError(f"{source}:{number}: expected a JSON object, got {type(data).__name__}")
        try:
            record = PredictionRecord.model_validate(data)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = format_path(tuple(error["loc"]))
            message = error["msg"].removeprefix("Value error, ")
            more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            raise RecordError(f"{source}:{number}: {where + ': ' if where else ''}{message}{more}") from None
        yield number, record.to_observation()


def replay(
    document: PolicyDocument,
    records: Iterator[tuple[int, Observation]],
    *,
    seed: int | None = None,
    on_decision: Callable[[int, Observation, Decision], None] | None = None,
    source: str = "predictions",
) -> ReplayResult:
    """Run recorded predictions through the policies, in the order of their timestamps: the limits
    count selections in rolling windows of that clock, so a record earlier than the one before it
    (logs of several replicas concatenated) is an error, not a silently different result."""
    policies = PolicySet(document, state=EngineState(rng=random.Random(seed)))
    result = ReplayResult(policies={name: PolicyStats() for name in policies.policy_names})
    previous = (0, float("-inf"))
    for number, observation in records:
        now = observation.timestamp
        if now < previous[1] - _CLOCK_SLACK_SECONDS:
            raise RecordError(
                f"{source}:{number}: timestamp {now:.3f} is {previous[1] - now:.1f} s before line {previous[0]}'s: "
                "records must be in time order (sort them, e.g. jq -s -c 'sort_by(.timestamp)[]')")
        if now > previous[1]:
            previous = (number, now)
        result.records += 1
        if observation.feedback is None:
            result.predictions += 1
        else:
            result.feedback_events += 1
        if result.first_timestamp is None or now < result.first_timestamp:
            result.first_timestamp = now
        if result.last_timestamp is None or now > result.last_timestamp:
            result.last_timestamp = now
        decision = policies.evaluate(observation, now=now)
        for name in decision.matched:
            result.policies[name].matches += 1
        for name in decision.limited:
            result.policies[name].limited += 1
        for name in decision.sampled_out:
            result.policies[name].sampled_out += 1
        if decision.selected:
            result.selected += 1
            result.policies[decision.policy].selections += 1
        if on_decision is not None:
            on_decision(number, observation, decision)
    return result


def decision_record(number: int, observation: Observation, decision: Decision) -> str:
    """One line of `--decisions OUT.jsonl`."""
    out = {
        "line": number,
        "timestamp": observation.timestamp,
        "model": observation.model,
        "inference_id": observation.inference_id,
        "feedback": observation.feedback.value if observation.feedback else None,
    }
    out.update(asdict(decision))
    return json.dumps(out, separators=(",", ":"))
