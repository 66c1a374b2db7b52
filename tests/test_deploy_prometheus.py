"""deploy/prometheus and the dashboard against a real Prometheus scraping a real stylize-server.

Prometheus is Debian's package (`make tools`, a step of `make test`, installs it where it is missing),
started on a free 127.0.0.1 port with a 1 s scrape interval and the project's alerting rules. One small job
and one bad request go through the server; then every metric name that the dashboard and the alerting rules
use must return data through Prometheus's HTTP API, every dashboard query must parse and return data, every
rule must evaluate without error, and the prometheus-adapter rule behind the autoscaler must yield a per-pod
series.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from stylize.v1 import stylize_pb2, stylize_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "stylize.json"
ADAPTER_VALUES = PROMETHEUS_DIR / "adapter-values.yaml"
ENSURE_TOOLS = ROOT / "deploy" / "tools" / "ensure-tools.sh"

# stylize-server exports these only where NVML sees a GPU (server/metrics.py: NvmlCollector).
GPU_ONLY_METRICS = frozenset(
    {"stylize_gpu_memory_used_bytes", "stylize_gpu_memory_total_bytes", "stylize_gpu_utilization_ratio"}
)
# The labels Kubernetes' scrape (ServiceMonitor) gives every series; the test's scrape sets them statically.
POD = "stylize-test-0"
NAMESPACE = "stylize"
# Grafana's template variables, replaced as Grafana would before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$pod": ".*"}
PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}
)
STARTUP_TIMEOUT = 30.0
SCRAPE_TIMEOUT = 30.0


# ---------------------------------------------------------------- what the dashboard and rules query


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, labels, numbers."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        before = expr[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == ".":  # the exponent of 5e-4
            continue
        if expr[match.end() :].lstrip().startswith("(") or match.group() in PROMQL_KEYWORDS:
            continue
        names.add(match.group())
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [*dashboard["panels"], *(p for row in dashboard["panels"] for p in row.get("panels", []))]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def dashboard_variable_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = set()
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else ""
        found |= {m for m in re.findall(r"label_values\((\w+)", text)}
    return found


def rule_expressions() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


USED_METRICS = sorted(
    set().union(*map(metric_names, dashboard_queries() + rule_expressions())) | dashboard_variable_metrics()
)


def test_metric_names_are_found_in_the_queries() -> None:
    """The extraction the data test relies on finds the names it should, and nothing that is not a metric."""
    assert metric_names('sum by (le, pod) (rate(a_bucket{pod=~"$pod"}[5m])) / b > 5e-4 or up == 0') == {
        "a_bucket",
        "b",
        "up",
    }
    assert {"stylize_jobs_total", "stylize_queue_depth", "grpc_server_handled_total", "up"} <= set(
        USED_METRICS
    )
    assert all(name == "up" or name.startswith(("stylize_", "grpc_server_")) for name in USED_METRICS)


# ---------------------------------------------------------------- promtool


@pytest.fixture(scope="module")
def promtool() -> str:
    return ensure_tool("promtool")


def ensure_tool(name: str) -> str:
    result = subprocess.run(
        ["bash", str(ENSURE_TOOLS), "--find", name], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr  # `make tools` installs it
    return result.stdout.strip().splitlines()[-1]


def test_promtool_check_rules(promtool: str) -> None:
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests(promtool: str, tmp_path: Path) -> None:
    """deploy/prometheus/rules_test.yml: each alert fires on the series it is meant for, with the expected
    summary, and only then. promtool compares all annotations: the plain-text description and runbook of
    each alert are taken from rules.yml (they have no template to check)."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    static = {
        rule["alert"]: {key: rule["annotations"][key] for key in ("description", "runbook")}
        for group in groups
        for rule in group["rules"]
    }
    assert all("{{" not in text for texts in static.values() for text in texts.values())
    unit_tests = yaml.safe_load((PROMETHEUS_DIR / "rules_test.yml").read_text())
    unit_tests["rule_files"] = [str(RULES)]
    for case in unit_tests["tests"]:
        for check in case["alert_rule_test"]:
            for alert in check["exp_alerts"]:
                alert["exp_annotations"] = {**static[check["alertname"]], **alert["exp_annotations"]}
    completed = tmp_path / "rules_test.yml"
    completed.write_text(yaml.safe_dump(unit_tests))
    result = subprocess.run([promtool, "test", "rules", str(completed)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_for_severity_and_runbook() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    assert {a["alert"] for a in alerts} >= {
        "StylizeNotReady",
        "StylizeParityFailed",
        "StylizeQueueWaitHigh",
        "StylizeGrpcErrorRateHigh",
        "StylizeGpuMemoryNearFull",
        "StylizeBrokerDown",
    }
    for alert in alerts:
        assert re.fullmatch(r"\d+[smh]", alert["for"]), alert["alert"]
        assert alert["labels"]["severity"] in ("critical", "warning"), alert["alert"]
        assert {"summary", "description", "runbook"} <= alert["annotations"].keys(), alert["alert"]


# ---------------------------------------------------------------- a real Prometheus


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/PATH; returns `data`, raises AssertionError with Prometheus's error otherwise."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            body = json.load(error)
        assert body["status"] == "success", f"{params}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def wait_for(self, expr: str, timeout: float = SCRAPE_TIMEOUT) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result:
                return result
            time.sleep(0.25)
        raise AssertionError(
            f"no data for {expr} within {timeout:.0f} s\n{self.log_path.read_text()[-3000:]}"
        )


def prometheus_config(metrics_port: int) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "stylize",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{metrics_port}"],
                        "labels": {"pod": POD, "namespace": NAMESPACE},
                    }
                ],
            }
        ],
    }


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = ensure_tool("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(server.metrics_port)))
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    running = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_ready(running)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(workdir / "data", ignore_errors=True)


def wait_ready(prometheus: Prometheus) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if prometheus.process.poll() is not None:
            raise AssertionError(f"prometheus exited: {prometheus.log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(
        f"prometheus not ready in {STARTUP_TIMEOUT:.0f} s: {prometheus.log_path.read_text()}"
    )


def png(color: tuple[int, int, int], size: int = 32) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (size, size), color)
    image.putpixel((size // 2, size // 2), (255 - color[0], 255 - color[1], 255 - color[2]))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def send_bad_request(stub: stylize_pb2_grpc.StyleTransferStub) -> None:
    """A request the server rejects: a non-OK gRPC code to count."""
    bad = stylize_pb2.StylizeRequest(
        content_image=b"not an image", styles=[stylize_pb2.StyleImage(image=png((20, 60, 220)))]
    )
    with pytest.raises(grpc.RpcError) as rejected:
        list(stub.Stylize(bad, timeout=30))
    assert rejected.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def run_small_job(stub: stylize_pb2_grpc.StyleTransferStub) -> None:
    request = stylize_pb2.StylizeRequest(
        content_image=png((200, 120, 40)),
        styles=[stylize_pb2.StyleImage(image=png((20, 60, 220)))],
        # Two Adam steps at 32 px: a job's content does not matter here, only that it runs and is counted.
        options=stylize_pb2.StyleOptions(
            size=32, min_size=32, iterations=2, initial_iterations=2, optimizer=stylize_pb2.OPTIMIZER_ADAM
        ),
        preview=stylize_pb2.PreviewOptions(every=1),
    )
    events = list(stub.Stylize(request, timeout=120))
    assert events[-1].WhichOneof("event") == "completed"


def exported_total(metrics_url: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples with these labels (whatever others they have), straight from the
    server's /metrics (the session's server has served other tests too)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    samples = [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]
    assert samples, f"{name}{labels} is not exported"
    return sum(sample.value for sample in samples)


def wait_for_scrapes_after(prometheus: Prometheus, moment: float, scrapes: int) -> None:
    prometheus.wait_for(f'timestamp(up{{job="stylize"}}) > {moment + scrapes}')


@pytest.fixture(scope="module")
def scraped(prometheus: Prometheus, server) -> Prometheus:
    """Prometheus once every series the queries use has been scraped before and after it changed, so
    rate() and histogram quantiles have an increase to show. Label sets appear on first use: a first bad
    request creates the Stylize RPC's series before the measured job and the second bad request."""
    with grpc.insecure_channel(server.address) as channel:
        stub = stylize_pb2_grpc.StyleTransferStub(channel)
        prometheus.wait_for('up{job="stylize"} == 1')
        send_bad_request(stub)
        wait_for_scrapes_after(prometheus, time.time(), 1)
        run_small_job(stub)
        send_bad_request(stub)
    finished = time.time()
    succeeded = exported_total(server.metrics_url, "stylize_jobs_total", status="succeeded")
    prometheus.wait_for(f'sum(stylize_jobs_total{{status="succeeded", pod="{POD}"}}) >= {succeeded}')
    wait_for_scrapes_after(prometheus, finished, 2)
    return prometheus


@pytest.mark.parametrize("name", USED_METRICS)
def test_metric_used_by_dashboard_or_alerts_has_data(scraped: Prometheus, name: str) -> None:
    series = scraped.query(f'{{__name__="{name}", pod="{POD}"}}')
    if name in GPU_ONLY_METRICS and not series:
        pytest.skip(f"{name}: stylize-server exports GPU gauges only where NVML sees a GPU; none here")
    assert series, f"{name}: no data in Prometheus"


@pytest.mark.parametrize("expr", dashboard_queries())
def test_dashboard_query_parses_and_returns_data(scraped: Prometheus, expr: str) -> None:
    result = scraped.query(grafana_to_promql(expr))  # a parse error fails inside query()
    if metric_names(expr) <= GPU_ONLY_METRICS and not result:
        pytest.skip("GPU panel: stylize-server exports GPU gauges only where NVML sees a GPU; none here")
    assert result, f"no data: {grafana_to_promql(expr)}"
    values = [float(sample["value"][1]) for sample in result]
    assert not all(math.isnan(value) for value in values), f"only NaN: {grafana_to_promql(expr)}"


def test_a_broken_query_is_reported(scraped: Prometheus) -> None:
    """Prometheus's query API does reject what does not parse (so the test above means something)."""
    with pytest.raises(AssertionError, match="bad_data"):
        scraped.query("sum by (le (rate(stylize_jobs_total[1m]))")


def test_alert_rules_load_and_evaluate_without_error(scraped: Prometheus) -> None:
    deadline = time.monotonic() + SCRAPE_TIMEOUT
    while True:
        rules = [rule for group in scraped.api("rules")["groups"] for rule in group["rules"]]
        if rules and all(rule["health"] != "unknown" for rule in rules):
            break
        assert time.monotonic() < deadline, "rules were not evaluated"
        time.sleep(0.5)
    assert {rule["name"] for rule in rules} == {
        rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    }
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
    firing = {alert["labels"]["alertname"] for alert in scraped.api("alerts")["alerts"]}
    # A healthy server: parity passed, serving, no errors beyond the one bad request.
    assert not firing & {"StylizeNotReady", "StylizeParityFailed", "StylizeGpuMemoryNearFull"}


def adapter_rule(kind: str, metric: str) -> dict[str, Any]:
    """The prometheus-adapter rule of adapter-values.yaml's `rules.<kind>` that serves `metric`."""
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"].get(kind) or []
    (rule,) = [rule for rule in rules if rule["name"]["as"] == metric]
    return rule


def adapter_query(rule: dict[str, Any], series: str, label_matchers: str, group_by: str) -> str:
    """The rule's metricsQuery with its template filled in as the adapter does."""
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", label_matchers)
        .replace("<<.GroupBy>>", group_by)
    )


def test_adapter_values_use_the_charts_keys() -> None:
    """The chart reads rules.custom and rules.external (it writes the latter as the adapter's
    externalRules); anything else in `rules` is silently ignored."""
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]
    assert set(rules) <= {"default", "custom", "external", "existing", "resource"}, set(rules)
    assert rules["default"] is False
    assert adapter_rule("custom", "stylize_queue_depth")
    assert adapter_rule("external", "stylize_fleet_queue_depth")


def test_adapter_external_rule_counts_the_fleet_queue_once(promtool: str, tmp_path: Path) -> None:
    """Every replica reports the same fleet-wide queue: the external metric is that figure (the largest
    report when they differ for a moment), not its sum over the replicas, and only for the HPA's namespace.
    Evaluated by promtool on three replicas reporting 6 waiting jobs (one lagging at 5)."""
    rule = adapter_rule("external", "stylize_fleet_queue_depth")
    assert rule["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    assert "pod" not in rule["resources"]["overrides"]
    # External metrics: the adapter adds the HPA's namespace to the matchers and fills in no GroupBy.
    query = adapter_query(rule, "stylize_fleet_queue_depth", f'namespace="{NAMESPACE}"', "")
    series = {"a": "6x10", "b": "6x10", "c": "5x10"}
    unit_test = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    *(
                        {
                            "series": f'stylize_fleet_queue_depth{{namespace="{NAMESPACE}", pod="{pod}"}}',
                            "values": v,
                        }
                        for pod, v in series.items()
                    ),
                    {"series": 'stylize_fleet_queue_depth{namespace="other", pod="x"}', "values": "50x10"},
                ],
                "promql_expr_test": [
                    {"expr": query, "eval_time": "5m", "exp_samples": [{"labels": "{}", "value": 6}]},
                ],
            }
        ],
    }
    path = tmp_path / "adapter_test.yml"
    path.write_text(yaml.safe_dump(unit_test))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, f"{query}\n{result.stdout}{result.stderr}"


def test_adapter_rule_yields_queue_depth_per_pod(scraped: Prometheus) -> None:
    """The prometheus-adapter rule behind the HPA, with its template filled in as the adapter would."""
    rule = adapter_rule("custom", "stylize_queue_depth")
    series = scraped.query(rule["seriesQuery"])
    assert series and {s["metric"]["pod"] for s in series} == {POD}
    name = series[0]["metric"]["__name__"]
    (result,) = scraped.query(adapter_query(rule, name, f'namespace="{NAMESPACE}",pod=~"{POD}"', "pod"))
    assert result["metric"] == {"pod": POD}
    assert float(result["value"][1]) >= 0


def test_adapter_external_rule_yields_one_fleet_figure(scraped: Prometheus) -> None:
    """The external rule behind the fleet overlay's HPA, against the real server's series."""
    rule = adapter_rule("external", "stylize_fleet_queue_depth")
    series = scraped.query(rule["seriesQuery"])
    assert series and {s["metric"]["pod"] for s in series} == {POD}
    name = series[0]["metric"]["__name__"]
    (result,) = scraped.query(adapter_query(rule, name, f'namespace="{NAMESPACE}"', ""))
    assert result["metric"] == {}
    assert float(result["value"][1]) >= 0
