"""The metrics ops rely on, read from a fresh registry: the backlog's age, failures by reason, and
label values exported at 0 before anything happens (so `increase()` sees the first event)."""

from __future__ import annotations

import os
import time

import pytest
from prometheus_client import CollectorRegistry

from edgecatch.delivery.spool import Spool
from edgecatch.metrics import DROP_REASONS, Metrics, upload_failure_reason
from edgecatch.observation import Detection, Observation
from tests.delivery.conftest import jpeg, make_record


def sample_id_at(seconds: float) -> str:
    """A sample id created at a given time (`new_sample_id` never goes back in time in a process)."""
    return f"{int(seconds * 1000):012x}0000{os.urandom(8).hex()}"


@pytest.mark.parametrize("status, message, reason", [
    (None, "upload: timeout (TimeoutError)", "no_answer"),
    (None, "unexpected KeyError", "unexpected"),
    (500, "", "http_5xx"), (502, "", "http_5xx"), (429, "", "http_429"), (401, "", "http_401"),
    (403, "", "http_403"), (400, "", "http_4xx"), (404, "", "http_4xx"), (200, "", "bad_answer"),
])
def test_upload_failure_reasons_are_a_bounded_set(status, message, reason):
    assert upload_failure_reason(status, message) == reason


def test_spool_exports_the_oldest_waiting_samples_creation_time(tmp_path):
    registry = CollectorRegistry()
    spool = Spool(tmp_path, max_bytes=10**9, max_items=10**6, metrics=Metrics(registry)).open()
    oldest = "edgecatch_spool_oldest_sample_timestamp_seconds"
    assert registry.get_sample_value(oldest) == 0  # empty
    first = make_record(sample_id=sample_id_at(1_700_000_000.0))
    second = make_record(sample_id=sample_id_at(1_700_000_100.0))
    spool.put(first, jpeg())
    spool.put(second, jpeg())
    assert registry.get_sample_value(oldest) == 1_700_000_000.0
    claim = spool.claim()
    assert claim is not None and claim.sample_id == first.sample_id
    claim.done()
    assert registry.get_sample_value(oldest) == 1_700_000_100.0
    # A restart finds the backlog's age in the folder.
    reopened_registry = CollectorRegistry()
    Spool(tmp_path, max_bytes=10**9, max_items=10**6, metrics=Metrics(reopened_registry)).open()
    assert reopened_registry.get_sample_value(oldest) == 1_700_000_100.0
    claim = spool.claim()
    claim.done()
    assert registry.get_sample_value(oldest) == 0


def test_known_label_values_exist_at_zero_before_any_event(tmp_path):
    from edgecatch.delivery import Delivery
    from edgecatch.delivery.config import DeliveryConfig

    registry = CollectorRegistry()
    Delivery(DeliveryConfig(spool_dir=tmp_path / "spool"), metrics=Metrics(registry))
    for reason in DROP_REASONS:
        assert registry.get_sample_value("edgecatch_dropped_total", {"reason": reason}) == 0, reason


class _NoDelivery:
    def submit(self, observation, image, decision, image_settings) -> bool:
        return True

    def start(self) -> None:
        pass

    def stop(self, timeout=None) -> None:
        pass

    def health(self) -> dict:
        return {}


TWO_POLICIES = """
version: 1
policies:
  - name: first
    confidence_below: 0.5
    limits: {per_hour: 1}
  - name: second
    confidence_below: 0.8
"""


def collector_with(tmp_path, policy: str):
    from edgecatch.collector import Collector
    from edgecatch.config import EdgecatchConfig

    path = tmp_path / "policies.yaml"
    path.write_text(policy)
    config = EdgecatchConfig.model_validate({"policies": str(path), "delivery": {"spool_dir": str(tmp_path / "spool")}})
    registry = CollectorRegistry()
    return Collector(config, metrics=Metrics(registry), delivery=_NoDelivery()), registry, path


def test_policy_matches_count_every_policy_that_held_selected_or_not(tmp_path):
    collector, registry, _ = collector_with(tmp_path, TWO_POLICIES)
    for _ in range(2):
        collector.observe(Observation(model="m", timestamp=time.time(),
                                      detections=(Detection("person", 0.3, (0, 0, 9, 9), 0),)), None)
    value = registry.get_sample_value
    for policy in ("first", "second"):
        assert value("edgecatch_policy_matches_total", {"model": "m", "policy": policy}) == 2
        assert value("edgecatch_samples_total", {"model": "m", "policy": policy}) == 1
    assert value("edgecatch_limited_total", {"policy": "first"}) == 1


def test_policy_reload_failing_holds_until_a_good_file_is_loaded(tmp_path):
    collector, registry, path = collector_with(tmp_path, TWO_POLICIES)
    value = registry.get_sample_value
    assert value("edgecatch_policy_reload_failing") == 0
    assert value("edgecatch_policy_reloads_total", {"outcome": "failure"}) == 0  # exported before any
    def edit(text: str, seconds_ago: int) -> None:  # an edit that has settled (the store waits for that)
        path.write_text(text)
        os.utime(path, (time.time() - seconds_ago, time.time() - seconds_ago))

    edit(TWO_POLICIES + "  - name: broken\n    confidence_below: high\n", 2)
    assert collector.policies.check() is False
    assert value("edgecatch_policy_reload_failing") == 1
    assert value("edgecatch_policy_reloads_total", {"outcome": "failure"}) == 1
    edit(TWO_POLICIES.replace("0.8", "0.7"), 1)
    assert collector.policies.check() is True
    assert value("edgecatch_policy_reload_failing") == 0
    assert value("edgecatch_policy_reloads_total", {"outcome": "success"}) == 1
    assert value("edgecatch_limiter_available") == 1  # in-process budgets always answer


def test_a_process_started_on_a_broken_file_says_so_from_its_first_scrape(tmp_path):
    """It starts with the last good policies saved by an earlier process of the same spool, and the
    reload alarm is on from the start, as in the processes that were already running."""
    collector_with(tmp_path, TWO_POLICIES)  # a first process: saves the good text
    collector, registry, path = collector_with(tmp_path, TWO_POLICIES + "  - name: broken\n    confidence_below: high\n")
    assert collector.policies.current.policy_names == ("first", "second")
    assert registry.get_sample_value("edgecatch_policy_reload_failing") == 1
    assert registry.get_sample_value("edgecatch_policy_reloads_total", {"outcome": "failure"}) == 1


TALLY_VS_DIRECT = r"""
import json, os, random, sys
from prometheus_client import CollectorRegistry, Counter, Histogram
from edgecatch.metrics import CONFIDENCE_BUCKETS, MetricTally

registry = CollectorRegistry()
made = {}
for way in ("direct", "tally"):
    made[way] = (Histogram(f"{way}_confidence", "h", ["cls"], buckets=CONFIDENCE_BUCKETS, registry=registry),
                 Counter(f"{way}_events", "c", ["kind"], registry=registry))
tally = MetricTally()
tally.buffered = True
rng = random.Random(7)
for i in range(2000):
    value = rng.choice([0.0, 0.1, 0.55, 0.95, 1.0, rng.random()])
    cls, kind = rng.choice("ab"), rng.choice("xyz")
    made["direct"][0].labels(cls).observe(value)
    made["direct"][1].labels(kind).inc()
    with tally.lock:
        tally.observe(made["tally"][0].labels(cls), value)
        tally.inc(made["tally"][1].labels(kind))
    if i % 700 == 0:
        tally.flush()
tally.flush()
tally.flush()  # nothing left: writes nothing
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    from prometheus_client import multiprocess
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
samples = {way: sorted((s.name.split("_", 1)[1], tuple(sorted(s.labels.items())), round(s.value, 9))
                       for family in registry.collect() if family.name.startswith(way)
                       for s in family.samples if not s.name.endswith("_created"))
           for way in ("direct", "tally")}
print(json.dumps(samples))
"""


@pytest.mark.parametrize("multiprocess", [False, True], ids=["single-process", "multiprocess"])
def test_tallied_metrics_equal_direct_observations(tmp_path, multiprocess):
    """What MetricTally writes in bulk is exactly what inc()/observe() would have, bucket by bucket,
    in both of prometheus-client's modes (BentoML workers use the multiprocess one)."""
    import json
    import subprocess
    import sys

    env = {**os.environ}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if multiprocess:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", TALLY_VS_DIRECT], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__)))).stdout
    samples = json.loads(out)
    assert samples["direct"] == samples["tally"]
    assert any(name == "confidence_bucket" for name, _, _ in samples["tally"])
    assert len(samples["tally"]) > 20


def test_tally_writes_through_until_buffered():
    from edgecatch.metrics import MetricTally

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    tally = MetricTally()
    with tally.lock:
        tally.inc(metrics.predictions.labels("m"))
        tally.observe(metrics.detections.labels("m"), 3)
    assert registry.get_sample_value("edgecatch_predictions_total", {"model": "m"}) == 1
    assert registry.get_sample_value("edgecatch_detections_bucket", {"model": "m", "le": "3.0"}) == 1
    tally.buffered = True
    with tally.lock:
        tally.inc(metrics.predictions.labels("m"), 2)
    assert registry.get_sample_value("edgecatch_predictions_total", {"model": "m"}) == 1
    tally.flush()
    assert registry.get_sample_value("edgecatch_predictions_total", {"model": "m"}) == 3


_KILLED_WORKER = """
import os, sys
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from edgecatch.metrics import Metrics, forget_dead_workers

def scrape():
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry.get_sample_value("edgecatch_policy_reload_failing"), \\
        registry.get_sample_value("edgecatch_sink_paused", {"sink": "roboflow"})

metrics = Metrics(CollectorRegistry())
metrics.policy_reload_failing.set(0)
pid = os.fork()
if pid == 0:  # a worker that saw a broken policy file and a refused key, then was killed
    metrics.policy_reload_failing.set(1)
    metrics.sink_paused.labels("roboflow").set(1)
    os._exit(0)  # no clean-up, as after kill -9
os.waitpid(pid, 0)
before = scrape()
forgotten = forget_dead_workers()
print(before, scrape(), forgotten == [pid])
"""


def test_the_gauges_of_a_killed_worker_are_forgotten(tmp_path):
    """BentoML runs Prometheus in multiprocess mode: a killed worker's live gauges would stay in
    every scrape (and their alerts firing) until the others drop its files."""
    import subprocess
    import sys

    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", _KILLED_WORKER], env=env, capture_output=True, text=True,
                         timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(1.0,", "1.0)", "(0.0,", "None)", "True"]
