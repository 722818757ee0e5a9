"""The edgecatch Grafana dashboard, generated with grafana-foundation-sdk.

    python ops/grafana/dashboard.py > ops/grafana/edgecatch-dashboard.json

Edit this file, not the JSON (a test checks that the committed JSON is what this prints). Every
query is PromQL over the metrics in `edgecatch/metrics.py`; tests/ops/test_live_prometheus.py runs
each one against a real Prometheus scraping a running service and fails on any that returns nothing.
Variables: `datasource` (any Prometheus), `model`, `policy`, and `class` (one confidence heatmap per
class, repeated).
"""

from __future__ import annotations

import json
import sys

from grafana_foundation_sdk.builders import bargauge, dashboard, heatmap, prometheus, stat, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common, dashboard as dashboard_models
from grafana_foundation_sdk.models import heatmap as heatmap_models
from grafana_foundation_sdk.models import prometheus as prometheus_models

UID = "edgecatch-overview"
DATASOURCE = dashboard_models.DataSourceRef(type_val="prometheus", uid="${datasource}")
MODEL = 'model=~"$model"'
POLICY = 'policy=~"$policy"'
RATE = "$__rate_interval"
LAST_VALUE = common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False)


def query(expr: str, legend: str = "", ref: str = "A") -> prometheus.Dataquery:
    return (prometheus.Dataquery().expr(expr).legend_format(legend or "__auto").ref_id(ref)
            .datasource(DATASOURCE))


def queries(*pairs: tuple[str, str]) -> list[prometheus.Dataquery]:
    return [query(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(pairs)]


def series(title: str, description: str, unit: str, *pairs: tuple[str, str], width: int = 8,
           stack: bool = False) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
             .targets(queries(*pairs)).span(width).height(8).min(0)
             .legend(common_builders.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                     .placement(common.LegendPlacement.BOTTOM).show_legend(True))
             .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                      .sort(common.SortOrder.DESCENDING)))
    if stack:
        panel = panel.stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
    return panel


def single(title: str, description: str, unit: str, expr: str, legend: str = "", width: int = 4,
           red_above: float | None = None) -> stat.Panel:
    panel = (stat.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
             .targets(queries((expr, legend))).span(width).height(4).reduce_options(LAST_VALUE))
    if red_above is not None:
        panel = panel.thresholds(dashboard.ThresholdsConfig().mode(dashboard_models.ThresholdsMode.ABSOLUTE).steps([
            dashboard_models.Threshold(value=None, color="green"),
            dashboard_models.Threshold(value=red_above, color="red")]))
    return panel


def traffic_row(board: dashboard.Dashboard) -> dashboard.Dashboard:
    board = board.with_row(dashboard.Row("Traffic & confidence"))
    board = board.with_panel(series(
        "Predictions per second", "Predictions observed, by model (feedback events not included).", "reqps",
        (f"sum by (model) (rate(edgecatch_predictions_total{{{MODEL}}}[{RATE}]))", "{{model}}"), width=6))
    board = board.with_panel(series(
        "Mean confidence, now and a day before",
        "Mean confidence of every detection (or top class) by model; dashed: the same time yesterday. "
        "Alert EdgecatchConfidenceDrop fires when the last hour is 0.1 below the same hour a day before.",
        "percentunit",
        (f"sum by (model) (rate(edgecatch_prediction_confidence_sum{{{MODEL}}}[{RATE}]))"
         f" / sum by (model) (rate(edgecatch_prediction_confidence_count{{{MODEL}}}[{RATE}]))", "{{model}}"),
        (f"sum by (model) (rate(edgecatch_prediction_confidence_sum{{{MODEL}}}[{RATE}] offset 1d))"
         f" / sum by (model) (rate(edgecatch_prediction_confidence_count{{{MODEL}}}[{RATE}] offset 1d))",
         "{{model}} a day before"), width=6).max(1)
        .override_by_query("B", [dashboard_models.DynamicConfigValue(
            id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]})]))
    board = board.with_panel(series(
        "Detections per prediction", "Mean number of detections per prediction, by model.", "short",
        (f"sum by (model) (rate(edgecatch_detections_sum{{{MODEL}}}[{RATE}]))"
         f" / sum by (model) (rate(edgecatch_detections_count{{{MODEL}}}[{RATE}]))", "{{model}}"), width=6))
    board = board.with_panel(series(
        "Served but not observed", "Requests or responses edgecatch could not read, by reason (api_error: "
        "the API itself failed; result/image: an unexpected shape). Served unchanged either way.", "reqps",
        (f"sum by (reason) (rate(edgecatch_unparsed_total[{RATE}]))", "{{reason}}"), width=6))
    board = board.with_panel(
        heatmap.Panel().title("Confidence of $class").description(
            "How many detections (or top classes) fell in each confidence bucket, per time slice, for "
            "the selected models. Classes beyond metrics.max_class_labels per model are folded into "
            "'other'.")
        .datasource(DATASOURCE)
        .targets([query(f'sum by (le) (increase(edgecatch_prediction_confidence_bucket{{{MODEL}, class=~"$class"}}[{RATE}]))',
                        "{{le}}").format(prometheus_models.PromQueryFormat.HEATMAP)])
        .calculate(False)
        .rows_frame(heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.LE))
        .color(heatmap.HeatmapColorOptions().mode(heatmap_models.HeatmapColorMode.SCHEME).scheme("Oranges")
               .fill("dark-orange").steps(64)
               .scale(heatmap_models.HeatmapColorScale.EXPONENTIAL).exponent(0.5))
        .y_axis(heatmap.YAxisConfig().unit("short").decimals(2)).show_tooltip().show_y_histogram()
        .repeat("class").repeat_direction("h").span(8).height(8))
    return board


def sampling_row(board: dashboard.Dashboard) -> dashboard.Dashboard:
    board = board.with_row(dashboard.Row("Sampling"))
    board = board.with_panel(series(
        "Samples per second, by policy", "Predictions selected for labeling, by the policy that selected them.",
        "reqps", (f"sum by (policy) (rate(edgecatch_samples_total{{{MODEL}, {POLICY}}}[{RATE}]))", "{{policy}}"),
        stack=True))
    board = board.with_panel(series(
        "Sampled / observed", "Share of predictions selected, by model (feedback samples included).",
        "percentunit",
        (f"sum by (model) (rate(edgecatch_samples_total{{{MODEL}}}[{RATE}]))"
         f" / sum by (model) (rate(edgecatch_predictions_total{{{MODEL}}}[{RATE}]))", "{{model}}")))
    board = board.with_panel(series(
        "Matched, selected and limited", "Per policy: how often its conditions held (before sampling and "
        "limits), how often it selected, and how often its budget (or the global one) refused.", "reqps",
        (f"sum by (policy) (rate(edgecatch_policy_matches_total{{{MODEL}, {POLICY}}}[{RATE}]))", "{{policy}} matched"),
        (f"sum by (policy) (rate(edgecatch_samples_total{{{MODEL}, {POLICY}}}[{RATE}]))", "{{policy}} selected"),
        (f"sum by (policy) (rate(edgecatch_limited_total{{{POLICY}}}[{RATE}]))", "{{policy}} limited")))
    board = board.with_panel(
        bargauge.Panel().title("Samples in the selected range, by policy (the labeling cost)")
        .description("Samples each policy selected over the dashboard's time range.")
        .datasource(DATASOURCE).unit("short").span(12).height(8).reduce_options(LAST_VALUE)
        .orientation(common.VizOrientation.HORIZONTAL)
        .targets([query(f"sum by (policy) (increase(edgecatch_samples_total{{{MODEL}, {POLICY}}}[$__range]))",
                        "{{policy}}").instant()]))
    board = board.with_panel(series(
        "Policy reloads", "Hot reloads of the policy file by outcome; a failure keeps the last good policies.",
        "short", (f"sum by (outcome) (increase(edgecatch_policy_reloads_total[{RATE}]))", "{{outcome}}"), width=6))
    board = board.with_panel(single(
        "Policy file invalid", "1 while the policy file on disk failed to load (the last good policies are "
        "in use): alert EdgecatchPolicyReloadFailed.", "bool", "max(edgecatch_policy_reload_failing)",
        width=3, red_above=1))
    board = board.with_panel(single(
        "Shared limiter answers", "0 while the Redis limiter is unreachable (decisions then follow "
        "fail_open / fail_closed); always 1 with in-process budgets.", "bool",
        "min(edgecatch_limiter_available)", width=3))
    return board


def delivery_row(board: dashboard.Dashboard) -> dashboard.Dashboard:
    board = board.with_row(dashboard.Row("Delivery"))
    board = board.with_panel(series(
        "Spool backlog (samples)", "Samples waiting in the spool, by instance.", "short",
        ("max by (instance) (edgecatch_spool_items)", "{{instance}}"), width=6))
    board = board.with_panel(series(
        "Spool backlog (bytes)", "Bytes waiting in the spool, by instance.", "bytes",
        ("max by (instance) (edgecatch_spool_bytes)", "{{instance}}"), width=6))
    board = board.with_panel(series(
        "Oldest waiting sample", "Age of the oldest sample in the spool (nothing when it is empty).", "s",
        ("time() - max by (instance) (edgecatch_spool_oldest_sample_timestamp_seconds > 0)", "{{instance}}"),
        width=6))
    board = board.with_panel(single(
        "Sink paused (API key refused)", "1 while a sink is paused after a 401/403: alert "
        "EdgecatchUploadAuthFailure.", "bool", "max by (sink) (edgecatch_sink_paused)", "{{sink}}",
        width=6, red_above=1))
    board = board.with_panel(series(
        "Uploads by outcome", "Upload attempts per second by sink and outcome.", "reqps",
        (f"sum by (sink, outcome) (rate(edgecatch_uploads_total[{RATE}]))", "{{sink}} {{outcome}}"), stack=True))
    board = board.with_panel(series(
        "Upload failures by reason", "Failed attempts by what went wrong (no_answer, http_5xx, http_429, "
        "http_401/403, http_4xx, bad_answer, unexpected).", "reqps",
        (f"sum by (sink, reason) (rate(edgecatch_upload_failures_total[{RATE}]))", "{{sink}} {{reason}}")))
    board = board.with_panel(series(
        "Upload latency", "Time to deliver one sample (image and annotation), quantiles by sink.", "s",
        *[(f"histogram_quantile({q}, sum by (le, sink) (rate(edgecatch_upload_seconds_bucket[{RATE}])))",
           f"p{round(q * 100)} {{{{sink}}}}") for q in (0.5, 0.9, 0.99)]))
    board = board.with_panel(series(
        "Dead letters", "Samples moved to the dead-letter folder, by sink and reason (rejected, "
        "too_many_attempts): `edgecatch spool retry-dead-letters` after a fix.", "short",
        (f"sum by (sink, reason) (increase(edgecatch_dead_letters_total[{RATE}]))", "{{sink}} {{reason}}")))
    board = board.with_panel(series(
        "Dropped samples", "Selected samples dropped, by reason (spool_full, queue_full, bad_image, ...): "
        "alert EdgecatchSamplesDropped.", "short",
        (f"sum by (reason) (increase(edgecatch_dropped_total[{RATE}]))", "{{reason}}")))
    board = board.with_panel(series(
        "Quarantined spool entries", "Torn or corrupt spool entries moved aside.", "short",
        (f"sum(increase(edgecatch_spool_quarantined_total[{RATE}]))", "quarantined")))
    return board


def feedback_row(board: dashboard.Dashboard) -> dashboard.Dashboard:
    board = board.with_row(dashboard.Row("Feedback"))
    board = board.with_panel(series(
        "Feedback by verdict", "Verdicts per second (silent: no verdict while the prediction could be "
        "recalled).", "reqps",
        (f"sum by (verdict) (rate(edgecatch_feedback_total[{RATE}]))", "{{verdict}}"), width=12, stack=True))
    board = board.with_panel(series(
        "Share of explicit verdicts that say 'incorrect'", "incorrect / (incorrect + correct).", "percentunit",
        (f'sum(rate(edgecatch_feedback_total{{verdict="incorrect"}}[{RATE}]))'
         f' / sum(rate(edgecatch_feedback_total{{verdict=~"incorrect|correct"}}[{RATE}]))', "incorrect"),
        width=12).max(1))
    return board


def variable(name: str, label: str, query_text: str) -> dashboard.QueryVariable:
    return (dashboard.QueryVariable(name).id(name).label(label).datasource(DATASOURCE)
            .query(query_text)
            .refresh(dashboard_models.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dashboard_models.VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*")
            .current(dashboard_models.VariableOption(selected=True, text="All", value="$__all")))


def build() -> dashboard_models.Dashboard:
    board = (
        dashboard.Dashboard("edgecatch").uid(UID).tags(["edgecatch"])
        .description("What edgecatch sees and samples, and whether delivery keeps up. Generated by "
                     "ops/grafana/dashboard.py.")
        .time("now-6h", "now").refresh("1m").timezone("browser").editable()
        .tooltip(dashboard_models.DashboardCursorSync.CROSSHAIR)
        .with_variable(dashboard.DatasourceVariable("datasource").id("datasource").label("Data source").type("prometheus"))
        .with_variable(variable("model", "Model", "label_values(edgecatch_predictions_total, model)"))
        .with_variable(variable("policy", "Policy", "label_values(edgecatch_samples_total, policy)"))
        .with_variable(variable("class", "Class", 'label_values(edgecatch_prediction_confidence_bucket{model=~"$model"}, class)'))
    )
    for row in (traffic_row, sampling_row, delivery_row, feedback_row):
        board = row(board)
    built = board.build()
    # Stable ids in reading order (Grafana links to a panel by id: ?viewPanel=N).
    for number, panel in enumerate(built.panels or [], start=1):
        panel.id_val = number
    return built


def render() -> str:
    return json.dumps(build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
