"""Every Prometheus metric edgecatch exports, defined once.

Metrics are created lazily (`get_metrics()` on first use, never at import): BentoML sets
`PROMETHEUS_MULTIPROC_DIR` only after it has imported the service module, and a metric created
before that would live in a private registry nobody scrapes. Tests build `Metrics(CollectorRegistry())`
and read values with `registry.get_sample_value(...)`.
"""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics", "get_metrics", "CONFIDENCE_BUCKETS"]

CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
DETECTION_COUNT_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)
UPLOAD_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


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
        self.limited = Counter(
            "edgecatch_limited", "Policy matches refused because a limit was reached", ["policy"], **kw)
        self.feedback = Counter(
            "edgecatch_feedback", "Feedback events by verdict", ["verdict"], **kw)
        self.policy_reloads = Counter(
            "edgecatch_policy_reloads", "Policy file reloads by outcome", ["outcome"], **kw)
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
        self.upload_seconds = Histogram(
            "edgecatch_upload_seconds", "Time to deliver one sample", ["sink"],
            buckets=UPLOAD_SECONDS_BUCKETS, **kw)


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
