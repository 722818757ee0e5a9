"""The Grafana dashboard: the committed JSON is what the generator prints, and it is a dashboard
Grafana imports as is (no Grafana server here: the structure is checked instead)."""

from __future__ import annotations

import re
import subprocess
import sys

from prometheus_client import CollectorRegistry

from edgecatch.metrics import Metrics

from .promql import DASHBOARD, REPO, dashboard_queries, load_dashboard

GRAFANA_BUILTINS = {"__rate_interval", "__range", "__interval", "__all"}


def test_committed_json_is_what_the_generator_prints():
    printed = subprocess.run([sys.executable, str(REPO / "ops" / "grafana" / "dashboard.py")],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    assert printed == DASHBOARD.read_text(), (
        "ops/grafana/edgecatch-dashboard.json is stale: python ops/grafana/dashboard.py > "
        "ops/grafana/edgecatch-dashboard.json")


def test_dashboard_has_what_grafana_needs_to_import_it():
    board = load_dashboard()
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", board["uid"])
    assert board["title"] == "edgecatch"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("model", "policy", "class"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert variables[name]["query"].startswith("label_values(")
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids)
    rows = [panel["title"] for panel in board["panels"] if panel["type"] == "row"]
    assert rows == ["Traffic & confidence", "Sampling", "Delivery", "Feedback"]
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert isinstance(panel["options"], dict), panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip(), panel["title"]


def test_confidence_heatmap_is_repeated_per_class_from_the_histogram_buckets():
    heatmaps = [panel for panel in load_dashboard()["panels"] if panel["type"] == "heatmap"]
    assert len(heatmaps) == 1
    panel = heatmaps[0]
    assert panel["repeat"] == "class" and panel["options"]["calculate"] is False
    target, = panel["targets"]
    assert target["format"] == "heatmap" and "edgecatch_prediction_confidence_bucket" in target["expr"]
    assert "sum by (le)" in target["expr"]


def test_every_variable_is_defined_and_every_metric_exists():
    board = load_dashboard()
    defined = {v["name"] for v in board["templating"]["list"]} | GRAFANA_BUILTINS
    registry = CollectorRegistry()
    Metrics(registry)
    exported = set()
    for family in registry.collect():
        exported.add(family.name)
        exported.update(f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_sum", "_count"))
    for where, expr in dashboard_queries(board):
        for name in re.findall(r"\$\{?(\w+)", expr):
            assert name in defined, f"{where}: ${name} is not a variable"
        for metric in re.findall(r"\bedgecatch_\w+", expr):
            assert metric in exported, f"{where}: {metric} is not an edgecatch metric"
