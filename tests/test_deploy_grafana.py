"""The Grafana dashboard has the shape Grafana's dashboard model expects and shows what operators need.

Its PromQL is checked against a real Prometheus in tests/test_deploy_prometheus.py.
"""

from __future__ import annotations

import json
import re
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "stylize.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's built-in panel plugins this dashboard may use.
PANEL_TYPES = {"row", "timeseries", "stat", "table", "gauge", "bargauge", "heatmap", "text"}
GRID_COLUMNS = 24


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [*dashboard["panels"], *(p for row in dashboard["panels"] for p in row.get("panels", []))]


def queries(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def test_dashboard_header(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "stylize" and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["time"]["from"].startswith("now-")
    assert "id" not in dashboard or dashboard["id"] is None  # provisioning assigns ids


def test_templated_on_datasource_and_pod(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    pod = variables["pod"]
    assert pod["type"] == "query" and pod["datasource"] == DATASOURCE
    assert pod["query"]["query"].startswith("label_values(") and pod["query"]["query"].endswith(", pod)")
    assert pod["multi"] and pod["includeAll"] and pod["allValue"] == ".*"


def test_panels_have_unique_ids_and_a_known_type(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in panels(dashboard)]
    assert all(isinstance(i, int) for i in ids)
    assert len(ids) == len(set(ids))
    assert {p["type"] for p in panels(dashboard)} <= PANEL_TYPES


def test_panels_lie_on_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    boxes = []
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= grid.keys(), panel["title"]
        assert all(isinstance(grid[k], int) and grid[k] >= 0 for k in "hwxy"), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
        boxes.append((panel["title"], grid))
    for (name_a, a), (name_b, b) in combinations(boxes, 2):
        apart = (
            a["x"] + a["w"] <= b["x"]
            or b["x"] + b["w"] <= a["x"]
            or a["y"] + a["h"] <= b["y"]
            or b["y"] + b["h"] <= a["y"]
        )
        assert apart, f"{name_a!r} overlaps {name_b!r}"


def test_every_query_panel_uses_the_datasource_variable_and_the_pod_filter(dashboard: dict[str, Any]) -> None:
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]
            assert 'pod=~"$pod"' in target["expr"], f"{panel['title']}: {target['expr']}"


@pytest.mark.parametrize(
    ("what", "fragment"),
    [
        ("jobs per second by status", "sum by (status) (rate(stylize_jobs_total"),
        ("pixel-iterations per second", "rate(stylize_pixel_iterations_total"),
        ("queue depth", "stylize_queue_depth"),
        ("queue wait p50", "histogram_quantile(0.5, sum by (le) (rate(stylize_queue_wait_seconds_bucket"),
        ("queue wait p95", "histogram_quantile(0.95, sum by (le) (rate(stylize_queue_wait_seconds_bucket"),
        ("job duration p50", "histogram_quantile(0.5, sum by (le) (rate(stylize_job_duration_seconds_bucket"),
        (
            "job duration p95",
            "histogram_quantile(0.95, sum by (le) (rate(stylize_job_duration_seconds_bucket",
        ),
        ("GPU utilization per pod", "max by (pod, gpu) (stylize_gpu_utilization_ratio"),
        ("GPU memory per pod", "max by (pod, gpu) (stylize_gpu_memory_used_bytes"),
        ("parity error", "stylize_parity_relative_error"),
        ("gRPC error rate by code", "sum by (grpc_code) (rate(grpc_server_handled_total"),
        ("fleet queue depth, once", "max(stylize_fleet_queue_depth{"),
        (
            "workers busy",
            'sum(stylize_jobs_in_progress{pod=~"$pod"}) / sum(stylize_workers{pod=~"$pod"})',
        ),
        ("queue fill", 'stylize_queue_depth{pod=~"$pod"} / stylize_queue_capacity{pod=~"$pod"}'),
        ("watchers", "stylize_watchers{"),
        ("job time by phase, p95", "sum by (le, phase) (rate(stylize_job_phase_seconds_bucket"),
        ("job time by phase, mean", "sum by (phase) (rate(stylize_job_phase_seconds_sum"),
        (
            "time to first progress p50",
            "histogram_quantile(0.5, sum by (le) (rate(stylize_time_to_first_progress_seconds_bucket",
        ),
        (
            "time to first progress p95",
            "histogram_quantile(0.95, sum by (le) (rate(stylize_time_to_first_progress_seconds_bucket",
        ),
        ("job outcomes", "sum by (status, reason) (rate(stylize_jobs_total{"),
    ],
)
def test_shows(dashboard: dict[str, Any], what: str, fragment: str) -> None:
    assert any(fragment in expr for expr in queries(dashboard)), what


HEALTH_EXCLUDED = 'grpc_service!="grpc.health.v1.Health"'


def selectors(expr: str, prefix: str) -> list[tuple[str, str]]:
    """(metric, label matchers) of every selector of a metric whose name starts with `prefix`."""
    return re.findall(rf"\b({prefix}\w*)(?:\{{([^}}]*)\}})?", expr)


def test_request_error_and_latency_panels_leave_out_health_checks(dashboard: dict[str, Any]) -> None:
    """Kubernetes probes call grpc.health.v1.Health every few seconds: counted, they would swamp the
    request rate and the handling time, so every gRPC query excludes them."""
    grpc_selectors = [s for expr in queries(dashboard) for s in selectors(expr, "grpc_server_")]
    assert len(grpc_selectors) >= 3
    for metric, matchers in grpc_selectors:
        assert HEALTH_EXCLUDED in matchers, f"{metric}{{{matchers}}}"
    assert selectors('rate(grpc_server_started_total{pod=~"$pod"}[1m])', "grpc_server_") == [
        ("grpc_server_started_total", 'pod=~"$pod"')
    ]


def test_rates_are_taken_of_counters_by_their_exposed_names(dashboard: dict[str, Any]) -> None:
    """prometheus_client exposes a counter `stylize_jobs` as stylize_jobs_total, and histograms as _bucket,
    _sum and _count: rate() of any other name is of a gauge or of a series that does not exist."""
    rated = [name for expr in queries(dashboard) for name in re.findall(r"\brate\((\w+)", expr)]
    assert "stylize_jobs_total" in rated
    for name in rated:
        assert name.endswith(("_total", "_bucket", "_sum", "_count")), name


def test_the_fleet_queue_is_never_summed_over_replicas(dashboard: dict[str, Any]) -> None:
    """Every replica reports the same fleet-wide figure: a sum would count it once per replica."""
    uses = [expr for expr in queries(dashboard) if "stylize_fleet_queue_depth" in expr]
    assert uses
    for expr in uses:
        assert re.fullmatch(r'max\(stylize_fleet_queue_depth\{pod=~"\$pod"\}\)', expr), expr
