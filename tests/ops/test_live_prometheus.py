"""A real Prometheus on 127.0.0.1 scrapes a real `bentoml serve` of the example service, with the
alert rules loaded, and every PromQL expression of the dashboard and of the rules returns data.

The scenario makes every expression meaningful, not only parseable: traffic (with a prediction the
API itself fails on), feedback, a capped policy (limited), a healthy Upload API (uploads, latency),
then one answering 500 (transient failures, dead letters after max_attempts), then one answering
401 (sink paused, the backlog grows, the spool overflows: drops), a broken policy file (reload
failure), and a stuck two-hour-old spool entry held by this test process (backlog age).
The comparison with a day before (`offset 1d`) cannot have history here: its present-time parts are
queried live, the comparison itself is unit-tested by promtool on synthetic history
(ops/prometheus/alerts_test.yml).
"""

from __future__ import annotations

import io
import math
import os
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from edgecatch.delivery.sample import SampleDetection, SampleRecord
from edgecatch.delivery.spool import Spool
from edgecatch.metrics import Metrics
from tests.bento_plugin.harness import free_port, start_bento, stop_bento, wait_for, write_config
from tests.process_groups import stop_group
from tests.sidecar.processes import SidecarProcess
from tests.upload_api_server import UploadApiServer

from .promql import RULES, dashboard_queries, for_api, label_values_label, rules

POLICY = textwrap.dedent("""
    version: 1
    batch: "ops-test-{date}"
    policies:
      - name: user-says-wrong
        feedback: incorrect
      - name: user-says-right
        feedback: correct
      - name: capped            # selects the first 3, then counts as limited
        random: 1.0
        limits: {per_hour: 3}
      - name: everything
        random: 1.0
""")

#: Alerts whose expression compares with the past: the parts queried live (each must appear in the
#: expression); promtool covers the comparison.
LIVE_PARTS = {
    "EdgecatchConfidenceDrop": ["job_model:edgecatch_prediction_confidence:mean1h",
                                "job_model:edgecatch_prediction_confidence_count:rate1h"],
}
MAX_ITEMS = 12
STUCK_AGE_SECONDS = 7200.0


# -- Prometheus ---------------------------------------------------------------------------------


class _NoTriton:
    """Addresses where no Triton listens: the sidecar serves its admin port (metrics) without one."""

    def __init__(self) -> None:
        self.http = f"127.0.0.1:{free_port()}"
        self.grpc = f"127.0.0.1:{free_port()}"


class Prometheus:
    def __init__(self, url: str, process: subprocess.Popen, log_path: Path) -> None:
        self.url = url
        self.process = process
        self.log_path = log_path

    def query(self, expr: str) -> list[dict]:
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body = answer.json()
        assert answer.status_code == 200 and body["status"] == "success", f"{expr}: {answer.text}"
        assert body["data"]["resultType"] == "vector", expr
        return body["data"]["result"]

    def stop(self) -> None:
        stop_group(self.process, grace=20)


def start_prometheus(workdir: Path, targets: dict[str, str]) -> Prometheus:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: install Debian's prometheus package (.ci/run does)")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                           for job, target in targets.items()],
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    prometheus = Prometheus(f"http://127.0.0.1:{port}", process, log_path)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited:\n{log_path.read_text()[-3000:]}")
        try:
            return httpx.get(f"{prometheus.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    if not wait_for(ready, timeout=60):
        prometheus.stop()
        raise RuntimeError(f"prometheus did not become ready:\n{log_path.read_text()[-3000:]}")
    return prometheus


# -- the scenario -------------------------------------------------------------------------------


def unique_jpegs():
    """The shipped test images, each made unique by one pixel (the Upload API stores identical
    images once, as duplicates)."""
    from PIL import Image

    from bento_service.sample_images import sample_jpegs

    images = sample_jpegs(include_sklearn=False)
    counter = 0
    while True:
        for name in ("astronaut", "coffee", "chelsea", "motorcycle"):
            counter += 1
            image = Image.open(io.BytesIO(images[name])).convert("RGB")
            image.putpixel((0, 0), (counter % 256, (counter // 256) % 256, 255))
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=90)
            yield name, out.getvalue()


def stuck_entry(spool_dir: Path):
    """A sample spooled two hours ago and held (flock) by this process, as a stuck delivery would:
    the service sees it waiting and cannot take it."""
    spool = Spool(spool_dir, max_bytes=10**9, max_items=10**6, metrics=Metrics(CollectorRegistry())).open()
    created = time.time() - STUCK_AGE_SECONDS
    sample_id = f"{int(created * 1000):012x}0000{os.urandom(8).hex()}"
    record = SampleRecord(sample_id=sample_id, created=created, model="people-detector", width=8, height=8,
                          task="detection", policy="everything",
                          detections=(SampleDetection("person", 0, 0.5, (0.0, 0.0, 4.0, 4.0)),))
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="JPEG")
    assert spool.put(record, out.getvalue())
    claim = spool.claim()
    assert claim is not None and claim.sample_id == sample_id
    return claim


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ops-live")
    upload_api = UploadApiServer().up()
    config_path, policy_path = write_config(
        workdir, POLICY,
        delivery={"max_items": MAX_ITEMS, "overflow": "drop_newest", "concurrency": 1, "poll_seconds": 0.2,
                  "retry": {"initial_seconds": 0.05, "max_seconds": 0.2, "max_attempts": 3,
                            "auth_pause_seconds": 600},
                  "sink": {"type": "roboflow", "base_url": upload_api.url, "dataset": upload_api.dataset,
                           "api_key_env": "TEST_ROBOFLOW_KEY"}})
    held = stuck_entry(workdir / "spool")
    sidecar_dir = workdir / "sidecar"
    sidecar_dir.mkdir()
    (sidecar_dir / "policy.yaml").write_text(POLICY)
    sidecar = SidecarProcess(sidecar_dir, _NoTriton(), policies=sidecar_dir / "policy.yaml",
                             sink={"type": "directory", "path": str(sidecar_dir / "dataset")})
    server = prometheus = None
    try:
        server = start_bento("bento_service.service:DetectionService", workdir, config_path, policy_path,
                             env={"TEST_ROBOFLOW_KEY": upload_api.api_key}, workers=1)
        sidecar.start()
        prometheus = start_prometheus(workdir, {"edgecatch-bento": server.url.removeprefix("http://"),
                                                "edgecatch-sidecar": f"127.0.0.1:{sidecar.admin_port}"})
        # Traffic only once Prometheus has scraped both: rates need a sample from before.
        assert wait_for(lambda: len(prometheus.query("up == 1")) == 2, timeout=60)
        images = unique_jpegs()

        def detect(client: httpx.Client) -> httpx.Response:
            name, data = next(images)
            response = client.post("/detect", files={"image": (f"{name}.jpg", data, "image/jpeg")})
            assert response.status_code == 200, response.text
            return response

        def metric(name: str, **labels: str) -> float:
            return server.metric(name, labels)

        with server.client() as client:
            # 1. A healthy Upload API: predictions, feedback both ways, deliveries.
            ids = [detect(client).headers["x-edgecatch-inference-id"] for _ in range(4)]
            for inference_id, verdict in zip(ids, ("incorrect", "correct")):
                answer = client.post("/edgecatch/feedback", json={"inference_id": inference_id, "verdict": verdict})
                assert answer.status_code == 202, answer.text
            # An upload that is a JPEG only in its header: the API itself fails (served as is, counted).
            _, whole = next(images)
            assert client.post("/detect", files={"image": ("cut.jpg", whole[:2000], "image/jpeg")}).status_code >= 400
            assert wait_for(lambda: metric("edgecatch_uploads_total", outcome="delivered")
                            + metric("edgecatch_uploads_total", outcome="duplicate") >= 6, timeout=60)
            assert metric("edgecatch_unparsed_total", reason="api_error") >= 1

            # 2. The Upload API fails (500) for everyone: retries, and nothing goes to dead/ (an
            #    outage is not the samples' fault); then it rejects some (400): those are dead letters.
            upload_api.fault("500")
            for _ in range(5):
                detect(client)
            assert wait_for(lambda: metric("edgecatch_upload_failures_total", reason="http_5xx") >= 20, timeout=60)
            assert metric("edgecatch_dead_letters_total", reason="too_many_attempts") == 0
            upload_api.clear()
            upload_api.fault("400", times=3)
            assert wait_for(lambda: metric("edgecatch_dead_letters_total", reason="rejected") >= 1, timeout=60)

            # 3. The key is refused (401): the sink pauses, the backlog grows until the spool is full
            #    (drops); meanwhile someone saves a broken policy file.
            upload_api.clear()
            upload_api.fault("401")
            policy_path.write_text(POLICY + "\n  - name: broken\n    confidence_below: high\n")
            for _ in range(MAX_ITEMS + 2):
                detect(client)
            assert wait_for(lambda: metric("edgecatch_sink_paused") == 1, timeout=30)
            assert wait_for(lambda: metric("edgecatch_dropped_total", reason="spool_full") >= 1, timeout=30)
            assert wait_for(lambda: metric("edgecatch_policy_reload_failing") == 1, timeout=30)
            assert metric("edgecatch_limited_total", policy="capped") >= 1

        # Prometheus has evaluated the rules on what it scraped: the alerts that should be pending are.
        expected = {rule["alert"] for rule in rules() if "alert" in rule} - set(LIVE_PARTS)

        def pending() -> set[str]:
            return {r["metric"]["alertname"] for r in prometheus.query("ALERTS")}

        started = time.monotonic()
        wait_for(lambda: expected <= pending(), timeout=90, interval=1.0)
        print(f"alerts active after {time.monotonic() - started:.1f} s: {sorted(pending())}")
        yield prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        if server is not None:
            stop_bento(server)
        sidecar.stop()
        held.release()
        upload_api.down()


def has_data(result: list[dict]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


# -- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("where, expr", dashboard_queries(), ids=[w for w, _ in dashboard_queries()])
def test_dashboard_query_returns_data(live, where, expr):
    query = for_api(expr, rate_interval="5m", dashboard_range="1h")
    if " offset 1d" in query:  # no history a day back here: the present-time part
        query = query.replace(" offset 1d", "")
    result = live.query(query)
    label = label_values_label(expr)
    if label is not None:  # a variable: it has values
        assert any(sample["metric"].get(label) for sample in result), f"{where}: no values for {label}"
    else:
        assert has_data(result), f"{where}: {query} returned {result}"


@pytest.mark.parametrize("rule", rules(), ids=[r.get("alert") or r["record"] for r in rules()])
def test_rule_expression_returns_data(live, rule):
    if "record" in rule:
        assert has_data(live.query(rule["expr"])), rule["record"]
        assert has_data(live.query(rule["record"])), f"{rule['record']} was not recorded"
        return
    parts = LIVE_PARTS.get(rule["alert"])
    if parts is None:
        assert has_data(live.query(rule["expr"])), f"{rule['alert']}: {rule['expr']}"
        return
    for part in parts:
        assert part in rule["expr"], f"{rule['alert']}: {part} is not in its expression"
        assert has_data(live.query(part)), f"{rule['alert']}: {part}"


def test_alerts_are_active_in_the_live_prometheus(live):
    """Prometheus loaded the rule file and evaluates it: each alert whose condition the scenario made
    true is pending (its `for` is minutes long) or firing."""
    active = {r["metric"]["alertname"]: r["metric"]["alertstate"] for r in live.query("ALERTS")}
    expected = {rule["alert"] for rule in rules() if "alert" in rule} - set(LIVE_PARTS)
    assert expected <= set(active), f"not active: {expected - set(active)}"
    assert "EdgecatchConfidenceDrop" not in active  # nothing to compare with


def test_an_expression_without_data_is_caught(live):
    """The checks can fail: a well-formed query on a label value nobody exports returns nothing."""
    assert not has_data(live.query('edgecatch_dropped_total{reason="no_such_reason"}'))


def test_the_sidecars_admin_port_is_scraped_too(live):
    """The sidecar's admin port is a scrape target like the BentoML service (no Triton behind it
    here: its traffic is the sidecar tests' business), exporting edgecatch's metrics from the start."""
    assert has_data(live.query('up{job="edgecatch-sidecar"} == 1'))
    for expr in ('edgecatch_spool_items{job="edgecatch-sidecar"}',
                 'edgecatch_limiter_available{job="edgecatch-sidecar"} == 1',
                 'edgecatch_dropped_total{job="edgecatch-sidecar", reason="spool_full"}',
                 'edgecatch_policy_reload_failing{job="edgecatch-sidecar"} == 0'):
        assert has_data(live.query(expr)), expr


@pytest.mark.parametrize("expr, label, values", [
    ("edgecatch_upload_failures_total > 0", "reason", {"http_5xx", "http_4xx", "http_401"}),
    ("edgecatch_uploads_total > 0", "outcome", {"delivered", "transient_error", "rejected", "auth_error"}),
    ("edgecatch_dead_letters_total > 0", "reason", {"rejected"}),
    ("edgecatch_dropped_total > 0", "reason", {"spool_full"}),
    ("edgecatch_feedback_total > 0", "verdict", {"incorrect", "correct"}),
    ("edgecatch_samples_total > 0", "policy", {"user-says-wrong", "user-says-right", "capped", "everything"}),
    ("edgecatch_limited_total > 0", "policy", {"capped"}),
    ("edgecatch_unparsed_total > 0", "reason", {"api_error"}),
    ("edgecatch_policy_reloads_total > 0", "outcome", {"failure"}),
    ('edgecatch_upload_seconds_count{job="edgecatch-bento"} > 0', "sink", {"roboflow"}),
])
def test_what_happened_reached_prometheus_with_its_labels(live, expr, label, values):
    """Not only data: the scenario's events, counted under the label values they belong to."""
    seen = {sample["metric"].get(label) for sample in live.query(expr)}
    assert values <= seen, f"{expr}: {values - seen} missing from {seen}"
