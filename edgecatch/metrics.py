"""Every Prometheus metric edgecatch exports, defined once.

Metrics are created lazily (`get_metrics()` on first use, never at import): BentoML sets
`PROMETHEUS_MULTIPROC_DIR` only after it has imported the service module, and a metric created
before that would live in a private registry nobody scrapes. Tests build `Metrics(CollectorRegistry())`
and read values with `registry.get_sample_value(...)`.

Conventions (Prometheus's): counters are declared without `_total` (the client appends it); units
are base units and in the name (`_seconds`, `_bytes`, `_timestamp_seconds`); a state is a 0/1 gauge;
every label takes a bounded set of values (class names beyond `metrics.max_class_labels` per model
fold into `other`, reasons and outcomes are fixed lists, models and policies come from config).
`edgecatch_prediction_confidence` is a probability in [0, 1], unitless like a `_ratio`, and keeps
the design note's name. Ops use them through ops/grafana and ops/prometheus (see README, Operations).
"""

from __future__ import annotations

import os
import re
import threading
from bisect import bisect_left
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics", "MetricTally", "get_metrics", "CONFIDENCE_BUCKETS", "DROP_REASONS", "UPLOAD_FAILURE_REASONS",
           "forget_dead_workers", "upload_failure_reason"]

CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
DETECTION_COUNT_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)
UPLOAD_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

#: Every reason a selected sample can be dropped for (`edgecatch_dropped_total{reason}`). Known label
#: values are exported at 0 from the start: `increase()` cannot see a counter's first increment if
#: its series only appears with it, and an alert on drops would miss the first one.
DROP_REASONS = ("queue_full", "not_running", "shutdown", "bad_image", "prepare_error", "spool_full",
                "spool_error", "image_gone")
#: ("image_gone": a silent event was selected after the recall buffer had reused its image's memory.)
#: `edgecatch_upload_failures_total{reason}`: what went wrong, in a bounded set of values.
UPLOAD_FAILURE_REASONS = ("no_answer", "http_5xx", "http_429", "http_401", "http_403", "http_4xx",
                          "bad_answer", "unexpected")


class Metrics:
    """The metric objects, registered in one registry."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        kw = {"registry": registry}
        # Traffic and what the model said.
        self.predictions = Counter(
            "edgecatch_predictions", "Predictions observed", ["model"], **kw)
        self.confidence = Histogram(
            "edgecatch_prediction_confidence",
            "Confidence of each detection (or the top class of a classification)",
            ["model", "class"], buckets=CONFIDENCE_BUCKETS, **kw)
        self.detections = Histogram(
            "edgecatch_detections", "Detections per prediction", ["model"],
            buckets=DETECTION_COUNT_BUCKETS, **kw)
        self.unparsed = Counter(
            "edgecatch_unparsed", "Requests or responses served but not observed", ["reason"], **kw)
        # Sampling.
        self.samples = Counter(
            "edgecatch_samples", "Predictions selected for labeling", ["model", "policy"], **kw)
        # What each policy would cost without sampling and limits: matches / samples per policy says
        # whether its `sample` rate or its limit is doing the cutting.
        self.policy_matches = Counter(
            "edgecatch_policy_matches", "Predictions (and feedback events) whose policy conditions held, "
            "selected or not", ["model", "policy"], **kw)
        self.limited = Counter(
            "edgecatch_limited", "Policy matches refused because a limit was reached", ["policy"], **kw)
        self.feedback = Counter(
            "edgecatch_feedback", "Feedback events by verdict", ["verdict"], **kw)
        self.policy_reloads = Counter(
            "edgecatch_policy_reloads", "Policy file reloads by outcome", ["outcome"], **kw)
        # The state behind a failed reload: the counter says it happened, this says it still holds.
        self.policy_reload_failing = Gauge(
            "edgecatch_policy_reload_failing", "1 while the policy file on disk is invalid and the last "
            "good policies are in use", multiprocess_mode="livemax", **kw)
        # Shared limits (the Redis limiter backend). Across workers the gauge aggregates by minimum:
        # one worker that cannot reach Redis is an outage.
        self.limiter_available = Gauge(
            "edgecatch_limiter_available", "1 while the shared limiter (Redis) answers, 0 during an outage",
            multiprocess_mode="livemin", **kw)
        self.limiter_outages = Counter(
            "edgecatch_limiter_outages", "Times the shared limiter became unreachable or too slow", **kw)
        self.limiter_unavailable = Counter(
            "edgecatch_limiter_unavailable", "Limit decisions taken without the shared limiter, by the "
            "declared behaviour (fail_open: local budgets, fail_closed: refused)", ["behaviour"], **kw)
        # Delivery.
        self.dropped = Counter(
            "edgecatch_dropped", "Selected samples dropped, by reason", ["reason"], **kw)
        # Every process sharing a spool directory sees (and reports) the whole directory, so across
        # BentoML workers the right aggregate is the maximum, not the sum.
        self.spool_items = Gauge(
            "edgecatch_spool_items", "Samples waiting in the spool", multiprocess_mode="livemax", **kw)
        self.spool_bytes = Gauge(
            "edgecatch_spool_bytes", "Bytes of samples waiting in the spool",
            multiprocess_mode="livemax", **kw)
        # A timestamp rather than an age: it stays right between updates (age = time() - value).
        # 0 while the spool is empty; across workers the maximum (those that see entries win).
        self.spool_oldest = Gauge(
            "edgecatch_spool_oldest_sample_timestamp_seconds", "Creation time (Unix seconds) of the "
            "oldest sample waiting in the spool, 0 when it is empty", multiprocess_mode="livemax", **kw)
        self.spool_quarantined = Counter(
            "edgecatch_spool_quarantined", "Torn or corrupt spool entries moved to the quarantine folder",
            **kw)
        self.dead_letters = Counter(
            "edgecatch_dead_letters", "Samples moved to the dead-letter folder, by sink and reason",
            ["sink", "reason"], **kw)
        self.sink_paused = Gauge(
            "edgecatch_sink_paused", "1 while a sink is paused because the destination refused the "
            "credentials (401/403): an alarm", ["sink"], multiprocess_mode="livemax", **kw)
        self.uploads = Counter(
            "edgecatch_uploads", "Upload attempts by sink and outcome", ["sink", "outcome"], **kw)
        self.upload_failures = Counter(
            "edgecatch_upload_failures", "Failed upload attempts by sink and what went wrong (no answer, "
            "HTTP status class, an answer that is not the API's)", ["sink", "reason"], **kw)
        self.upload_seconds = Histogram(
            "edgecatch_upload_seconds", "Time to deliver one sample", ["sink"],
            buckets=UPLOAD_SECONDS_BUCKETS, **kw)


class MetricTally:
    """Counter increments and histogram observations gathered on the request path, written in bulk.

    In Prometheus's multiprocess mode (BentoML workers) every `inc()`/`observe()` takes a lock and
    writes an mmap'd file; a prediction with three detections made 13 such writes, about 20 µs.
    Gathered here (plain dict updates under one lock) and written by `flush()` from a background
    loop, the same prediction costs 2-3 µs, and /metrics lags by at most the flush interval.
    Keys are labelled children of the metrics; histogram children are written bucket by bucket,
    exactly what `Histogram.observe` would have written (a test compares the two).

    Until `buffered` is set (by whoever runs the flushing loop) calls write through at once.
    """

    __slots__ = ("_lock", "_counts", "_observed", "buffered")

    def __init__(self) -> None:
        self.buffered = False
        self._lock = threading.Lock()
        self._counts: dict[Any, float] = {}
        #: histogram child -> [sum of observations, count per bucket...]
        self._observed: dict[Any, list[float]] = {}

    @property
    def lock(self) -> threading.Lock:
        """Held around a prediction's `inc`/`observe` calls: one acquisition, not one per call."""
        return self._lock

    def inc(self, child: Any, amount: float = 1.0) -> None:
        """A counter increment (call with `lock` held)."""
        if not self.buffered:
            child.inc(amount)
            return
        counts = self._counts
        counts[child] = counts.get(child, 0.0) + amount

    def observe(self, child: Any, value: float) -> None:
        """A histogram observation (call with `lock` held)."""
        if not self.buffered:
            child.observe(value)
            return
        state = self._observed.get(child)
        if state is None:
            state = self._observed[child] = [0.0] * (len(child._upper_bounds) + 1)
        state[0] += value
        state[1 + bisect_left(child._upper_bounds, value)] += 1

    def flush(self) -> None:
        """Write what was gathered since the last flush to the metrics (thread-safe)."""
        with self._lock:
            counts, self._counts = self._counts, {}
            observed, self._observed = self._observed, {}
        for child, amount in counts.items():
            child.inc(amount)
        for child, state in observed.items():
            child._sum.inc(state[0])
            for bucket, count in zip(child._buckets, state[1:]):
                if count:
                    bucket.inc(count)


def upload_failure_reason(status: int | None, message: str = "") -> str:
    """The bounded `reason` label of a failed attempt, from the HTTP status.

    No status: `no_answer` (refused, reset, timeout; a directory sink's I/O error), or `unexpected`
    (a bug in a sink, caught by the uploader).
    """
    if status is None:
        return "unexpected" if message.startswith("unexpected") else "no_answer"
    if status in (401, 403, 429):
        return f"http_{status}"
    if 500 <= status < 600:
        return "http_5xx"
    if 400 <= status < 500:
        return "http_4xx"
    return "bad_answer"  # a 2xx/3xx that is not the API's JSON


_lock = threading.Lock()
_metrics: Metrics | None = None


def get_metrics() -> Metrics:
    """The process-wide metrics in the default registry, created on first use."""
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = Metrics()
    return _metrics


_LIVE_GAUGE_FILE = re.compile(r"^gauge_live\w+_(\d+)\.db$")


def forget_dead_workers() -> list[int]:
    """In multiprocess mode, drop the live-mode gauge files of worker processes that no longer exist.

    A worker that exits cleanly is forgotten by its server, but one that is killed (OOM, kill -9)
    leaves its `gauge_live*_<pid>.db` behind and its last values in every scrape: a
    `policy_reload_failing` of 1 or a `sink_paused` of 1 would keep their alerts firing for good.
    The other workers call this now and then (prometheus_client's `mark_process_dead`). Returns the
    pids forgotten."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")
    if not folder:
        return []
    from prometheus_client import multiprocess

    from edgecatch.processes import process_alive

    try:
        names = os.listdir(folder)
    except OSError:
        return []
    pids = {int(match.group(1)) for match in map(_LIVE_GAUGE_FILE.match, names) if match}
    forgotten = []
    for pid in sorted(pids):
        if pid != os.getpid() and not process_alive(pid):
            try:
                multiprocess.mark_process_dead(pid, folder)
            except FileNotFoundError:  # another worker dropped them at the same moment
                pass
            forgotten.append(pid)
    return forgotten
