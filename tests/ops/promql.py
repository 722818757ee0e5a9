"""The PromQL that ops will run: every expression of the dashboard and of the alert rules, and the
substitutions that turn a dashboard query into one Prometheus's HTTP API accepts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "ops" / "grafana" / "edgecatch-dashboard.json"
RULES = REPO / "ops" / "prometheus" / "alerts.yml"


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries(board: dict | None = None) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and every query variable."""
    board = board or load_dashboard()
    found = []
    for panel in board["panels"]:
        for target in panel.get("targets") or ():
            found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            found.append((f"variable {variable['name']}", variable["query"]))
    return found


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def for_api(expr: str, *, rate_interval: str = "1m", dashboard_range: str = "1h") -> str:
    """A dashboard expression as Prometheus's API takes it: Grafana's built-in intervals replaced, "All"
    for every variable (`.*`, as the dashboard's allValue), and `label_values(selector, label)` as the
    selector it asks about (the variable has values when that selector has series with the label)."""
    match = _LABEL_VALUES.match(expr.strip())
    if match:
        expr = match["selector"]
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__range", dashboard_range)
    return re.sub(r"\$(model|policy|class)\b", ".*", expr)


def label_values_label(expr: str) -> str | None:
    match = _LABEL_VALUES.match(expr.strip())
    return match["label"] if match else None
