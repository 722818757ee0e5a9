"""The policy engine: a policy document compiled into plain closures.

`PolicySet.evaluate(observation)` runs on the request path of a model server, so it is pure, in
memory and allocation-light: each condition block is compiled once into a list of small functions
that return a short reason when they hold and None when they do not.

Semantics (the README's policy reference says the same for ops):
- The conditions of a block all hold together (AND); `any_of`, `all_of` and `not` compose blocks.
- Detections: `classes` restricts which detections count, `confidence_*` keeps those in range, and
  the block holds when at least `min_matches` (default 1) remain. `classes` alone means "at least
  `min_matches` detections of these classes", unless the block counts detections with
  `detections: {min, max}`, which counts detections of the listed classes (all when none are listed).
  Nested blocks inherit `classes` and `min_matches` from the block around them.
- Classification: confidence conditions look at the top class's probability, `classes` at its name;
  `margin_below` and `entropy_above` apply to classifications only, `detections` to detections only.
- Within a block, content conditions are checked first, then `every_nth`, then `random`: so
  `every_nth` counts the predictions for which the rest of its block holds.
- Policies are tried in order; the first that holds, passes its `sample` draw and has budget selects.
"""

from __future__ import annotations

import fnmatch
import os
import random
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from edgecatch.observation import Observation
from edgecatch.policies.decision import NOT_SELECTED, Decision
from edgecatch.policies.limits import Limiter, MemoryLimiter, Windows
from edgecatch.policies.schema import Condition, ImageSettings, Policy, PolicyDocument

__all__ = ["EngineState", "ForkSafeRandom", "PolicySet", "describe_conditions"]

Check = Callable[[Observation], "str | None"]


class ForkSafeRandom(random.Random):
    """A random source seeded from the OS, and seeded anew in a forked child.

    Replicas must not draw the same numbers: a worker forked from a parent that already made its
    random source would otherwise repeat the parent's (and its siblings') draws exactly.
    """

    def __init__(self) -> None:
        super().__init__()  # no seed: os.urandom
        _fork_reseeded.add(self)


_fork_reseeded: weakref.WeakSet[ForkSafeRandom] = weakref.WeakSet()
_fork_states: weakref.WeakSet[EngineState] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for rng in list(_fork_reseeded):
        rng.seed()
    for state in list(_fork_states):
        # A lock held by another thread at the fork would stay held forever in the child; and the
        # counters start again at a new random phase, so forked siblings do not count in step.
        state.counters_lock = threading.Lock()
        state.counters.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(eq=False)
class EngineState:
    """What outlives a policy reload: budgets already spent, every_nth counters, the random source.

    Each every_nth counter starts at a phase drawn from `rng`, so replicas that each keep every nth
    prediction do not all keep the same ones (round-robin traffic would otherwise collect n
    consecutive predictions, then none).
    """

    limiter: Limiter = field(default_factory=MemoryLimiter)
    rng: random.Random = field(default_factory=ForkSafeRandom)
    counters: dict[tuple[str, str, str], int] = field(default_factory=dict)
    counters_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        _fork_states.add(self)


@dataclass(frozen=True, slots=True)
class _CompiledPolicy:
    name: str
    applies_to_model: Callable[[str], bool]
    feedback: str | None
    checks: tuple[Check, ...]
    sample: float
    windows: Windows
    tags: tuple[str, ...]


def _fmt(value: float) -> str:
    return f"{value:g}"


class PolicySet:
    """A validated policy document, ready to evaluate observations."""

    def __init__(
        self,
        document: PolicyDocument,
        *,
        state: EngineState | None = None,
        clock: Callable[[], float] = time.time,
        source: str = "<policies>",
    ) -> None:
        self.document = document
        self.source = source
        self.state = state or EngineState()
        self._clock = clock
        self._random = self.state.rng.random
        self._global_windows: Windows = document.limits.windows() if document.limits else ()
        self._policies = tuple(self._compile_policy(p) for p in document.policies if p.enabled)
        # Feedback policies see only feedback events with their verdict, the others only
        # predictions: each kind of event walks just its own policies, in document order.
        self._policies_for: dict[str | None, tuple[_CompiledPolicy, ...]] = {}
        for policy in self._policies:
            self._policies_for[policy.feedback] = (*self._policies_for.get(policy.feedback, ()), policy)
        self._tags_cache: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._batch_cache: dict[tuple[int, str], str] = {}

    @property
    def image(self) -> ImageSettings:
        return self.document.image

    @property
    def policy_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self._policies)

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, observation: Observation, now: float | None = None) -> Decision:
        """Decide whether to keep this prediction. Pure in-memory work; charges limits when selecting."""
        if now is None:
            now = self._clock()
        matched: list[str] | None = None
        reasons: dict[str, str] = {}
        # Policies that held and passed their sample draw, in order, with their place in `matched`:
        # the limiter tries them all in one call (one round trip for a shared limiter).
        candidates: list[tuple[int, _CompiledPolicy]] = []
        sampled_out: list[tuple[int, str]] = []
        settled = False  # a candidate without limits of its own: no later policy could select
        model = observation.model
        verdict = observation.feedback.value if observation.feedback is not None else None
        for policy in self._policies_for.get(verdict, ()):
            if not policy.applies_to_model(model):
                continue
            reason = self._holds(policy.checks, observation)
            if reason is None:
                continue
            if verdict is not None:  # the verdict is the first reason a feedback policy holds
                reason = f"verdict {verdict}" if not policy.checks else f"verdict {verdict}; {reason}"
            if matched is None:
                matched = []
            matched.append(policy.name)
            reasons[policy.name] = reason
            if settled:
                continue
            if policy.sample < 1.0 and self._random() >= policy.sample:
                sampled_out.append((len(matched), policy.name))
                continue
            candidates.append((len(matched), policy))
            settled = not policy.windows
        if matched is None:
            return NOT_SELECTED
        selected: str | None = None
        limited: tuple[str, ...] = ()
        if candidates:
            if len(candidates) == 1:  # the common case, without building a list
                only = candidates[0][1]
                index = 0 if self.state.limiter.acquire(only.name, only.windows, self._global_windows, now) else -1
            else:
                index = self.state.limiter.acquire_first(
                    [(policy.name, policy.windows) for _, policy in candidates], self._global_windows, now)
            if index >= 0:
                place, chosen = candidates[index]
                selected = chosen.name
                if index:
                    limited = tuple(policy.name for _, policy in candidates[:index])
                if sampled_out:  # policies after the selected one only explain: their draws do not count
                    sampled_out = [entry for entry in sampled_out if entry[0] < place]
            else:
                limited = tuple(policy.name for _, policy in candidates)
        return Decision(
            selected=selected is not None,
            policy=selected,
            matched=tuple(matched),
            limited=limited,
            sampled_out=tuple(name for _, name in sampled_out) if sampled_out else (),
            tags=self._tags(matched),
            reasons=reasons,
            batch=self._batch(model, now) if selected is not None else "",
        )

    @staticmethod
    def _holds(checks: tuple[Check, ...], observation: Observation) -> str | None:
        reasons = []
        for check in checks:
            reason = check(observation)
            if reason is None:
                return None
            reasons.append(reason)
        return "; ".join(reasons) if len(reasons) > 1 else reasons[0] if reasons else "always"

    def _tags(self, matched: list[str]) -> tuple[str, ...]:
        key = tuple(matched)
        tags = self._tags_cache.get(key)
        if tags is None:
            merged = dict.fromkeys(self.document.tags)
            for policy in self._policies:
                if policy.name in matched:
                    merged.update(dict.fromkeys(policy.tags))
            tags = tuple(merged)
            if len(self._tags_cache) < 1024:  # combinations of matching policies: few in practice
                self._tags_cache[key] = tags
        return tags

    def _batch(self, model: str, now: float) -> str:
        key = (int(now // 86400), model)
        batch = self._batch_cache.get(key)
        if batch is None:
            if len(self._batch_cache) > 1024:
                self._batch_cache.clear()
            day = datetime.fromtimestamp(now, tz=timezone.utc)
            iso = day.isocalendar()
            values = {
                "date": day.strftime("%Y-%m-%d"),
                "week": f"{iso.year}-W{iso.week:02d}",
                "month": day.strftime("%Y-%m"),
                "model": model,
            }
            batch = self.document.batch
            for name, value in values.items():
                batch = batch.replace("{%s}" % name, value)
            self._batch_cache[key] = batch
        return batch

    # -- compilation --------------------------------------------------------------------------

    def _compile_policy(self, policy: Policy) -> _CompiledPolicy:
        return _CompiledPolicy(
            name=policy.name,
            applies_to_model=_model_matcher(policy.models),
            feedback=policy.feedback.value if policy.feedback is not None else None,
            checks=tuple(self._compile_block(policy, policy.name, "", None, None)),
            sample=policy.sample,
            windows=policy.limits.windows() if policy.limits else (),
            tags=tuple(policy.tags),
        )

    def _compile_block(
        self,
        block: Condition,
        policy: str,
        path: str,
        outer_classes: list[str] | None,
        outer_min_matches: int | None,
    ) -> list[Check]:
        classes = block.classes if block.classes is not None else outer_classes
        min_matches = block.min_matches if block.min_matches is not None else outer_min_matches
        checks: list[Check] = []

        has_confidence = (
            block.confidence_below is not None
            or block.confidence_above is not None
            or block.confidence_between is not None
        )
        if has_confidence or block.min_matches is not None or (
            block.classes is not None and block.detections is None
        ):
            checks.append(_match_check(block, classes, min_matches or 1))
        if block.detections is not None:
            checks.append(_count_check(block.detections.min, block.detections.max, classes))
        if block.margin_below is not None:
            checks.append(_margin_check(block.margin_below))
        if block.entropy_above is not None:
            checks.append(_entropy_check(block.entropy_above))
        for index, sub in enumerate(block.all_of or ()):
            sub_checks = self._compile_block(sub, policy, f"{path}.all_of[{index}]", classes, min_matches)
            checks.append(_all_check(sub_checks))
        if block.any_of is not None:
            options = [
                self._compile_block(sub, policy, f"{path}.any_of[{index}]", classes, min_matches)
                for index, sub in enumerate(block.any_of)
            ]
            checks.append(_any_check(options))
        if block.not_ is not None:
            inner = self._compile_block(block.not_, policy, f"{path}.not", classes, min_matches)
            checks.append(_not_check(inner, describe_conditions(block.not_)))
        # Counting and chance come last so that every_nth counts only predictions the rest accepts.
        if block.every_nth is not None:
            checks.append(self._every_nth_check(block.every_nth, policy, path))
        if block.random is not None:
            checks.append(self._random_check(block.random))
        return checks

    def _every_nth_check(self, n: int, policy: str, path: str) -> Check:
        state = self.state
        reason = f"every {n}th prediction"
        phase = self.state.rng.randrange

        def check(obs: Observation) -> str | None:
            key = (policy, path, obs.model)
            # Looked up on each call: a fork replaces the lock and clears the counters.
            counters = state.counters
            with state.counters_lock:
                count = counters.get(key)
                # A new counter starts at a random phase: the first selection is one of the first n.
                count = (phase(n) if count is None else count) + 1
                counters[key] = count
            return reason if count % n == 0 else None

        return check

    def _random_check(self, probability: float) -> Check:
        draw = self._random
        reason = f"random {_fmt(probability)}"

        def check(obs: Observation) -> str | None:
            return reason if draw() < probability else None

        return check


def _model_matcher(patterns: list[str] | None) -> Callable[[str], bool]:
    if not patterns:
        return lambda model: True
    cache: dict[str, bool] = {}

    def applies(model: str) -> bool:
        hit = cache.get(model)
        if hit is None:
            hit = any(fnmatch.fnmatchcase(model, pattern) for pattern in patterns)
            if len(cache) < 4096:  # model names are few; never let a stream of odd names grow this
                cache[model] = hit
        return hit

    return applies


def _confidence_test(block: Condition) -> tuple[Callable[[float], bool] | None, str]:
    """A predicate on one confidence value for the block's confidence_* conditions, and its text."""
    parts: list[Callable[[float], bool]] = []
    text: list[str] = []
    if block.confidence_below is not None:
        below = block.confidence_below
        parts.append(lambda c: c < below)
        text.append(f"confidence < {_fmt(below)}")
    if block.confidence_above is not None:
        above = block.confidence_above
        parts.append(lambda c: c > above)
        text.append(f"confidence > {_fmt(above)}")
    if block.confidence_between is not None:
        low, high = block.confidence_between
        parts.append(lambda c: low <= c <= high)
        text.append(f"confidence in [{_fmt(low)}, {_fmt(high)}]")
    if not parts:
        return None, ""
    if len(parts) == 1:
        return parts[0], text[0]
    return (lambda c: all(p(c) for p in parts)), " and ".join(text)


def _match_check(block: Condition, classes: list[str] | None, min_matches: int) -> Check:
    in_range, range_text = _confidence_test(block)
    class_set = frozenset(classes) if classes is not None else None
    what = "/".join(classes) if classes else "any class"

    def check(obs: Observation) -> str | None:
        classification = obs.classification
        if classification is not None:
            if not classification.ranked:
                return None
            top, confidence = classification.ranked[0]
            if class_set is not None and top not in class_set:
                return None
            if in_range is not None and not in_range(confidence):
                return None
            return f"top class {top} at {confidence:.2f}" + (f" ({range_text})" if range_text else "")
        count = 0
        for detection in obs.detections:
            if class_set is not None and detection.class_name not in class_set:
                continue
            if in_range is not None and not in_range(detection.confidence):
                continue
            count += 1
        if count < min_matches:
            return None
        return f"{count} detection{'s' if count != 1 else ''} of {what}" + (
            f" with {range_text}" if range_text else "")

    return check


def _count_check(minimum: int | None, maximum: int | None, classes: list[str] | None) -> Check:
    class_set = frozenset(classes) if classes is not None else None
    what = "/".join(classes) if classes else "any class"

    def check(obs: Observation) -> str | None:
        if obs.classification is not None:
            return None
        if class_set is None:
            count = len(obs.detections)
        else:
            count = sum(1 for d in obs.detections if d.class_name in class_set)
        if minimum is not None and count < minimum:
            return None
        if maximum is not None and count > maximum:
            return None
        return f"{count} detection{'s' if count != 1 else ''} of {what}"

    return check


def _margin_check(limit: float) -> Check:
    def check(obs: Observation) -> str | None:
        classification = obs.classification
        if classification is None or not classification.ranked:
            return None
        margin = classification.margin
        return f"margin {margin:.2f} < {_fmt(limit)}" if margin < limit else None

    return check


def _entropy_check(limit: float) -> Check:
    def check(obs: Observation) -> str | None:
        classification = obs.classification
        if classification is None or not classification.ranked:
            return None
        entropy = classification.entropy
        return f"entropy {entropy:.2f} bits > {_fmt(limit)}" if entropy > limit else None

    return check


def describe_conditions(block: Condition, braces: bool = True) -> str:
    """A compact YAML flow rendering of a block's conditions, e.g. `{classes: [person]}`."""
    fields = block.model_dump(include=set(Condition.model_fields), exclude_none=True, by_alias=True)
    text = ", ".join(f"{key}: {_flow(value)}" for key, value in fields.items())
    return "{" + text + "}" if braces else text


def _flow(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items() if v is not None) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, float):
        return _fmt(value)
    return str(value)


def _all_check(checks: list[Check]) -> Check:
    compiled = tuple(checks)

    def check(obs: Observation) -> str | None:
        return PolicySet._holds(compiled, obs)

    return check


def _any_check(options: list[list[Check]]) -> Check:
    compiled = [tuple(option) for option in options]

    def check(obs: Observation) -> str | None:
        for option in compiled:
            reason = PolicySet._holds(option, obs)
            if reason is not None:
                return reason
        return None

    return check


def _not_check(checks: list[Check], description: str) -> Check:
    compiled = tuple(checks)
    reason_text = f"not {description}"

    def check(obs: Observation) -> str | None:
        return reason_text if PolicySet._holds(compiled, obs) is None else None

    return check
