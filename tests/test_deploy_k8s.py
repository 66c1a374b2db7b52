"""The Kubernetes manifests: rendered by real kustomize, validated offline and strictly against the schemas.

Built-in kinds are checked by kubernetes-validate (the Kubernetes OpenAPI schemas, strict: unknown fields
fail). The ServiceMonitor and the PrometheusRule are prometheus-operator CRDs that kubernetes-validate has no
schema for; they are checked against the pydantic models generated from the operator's CRDs
(cloudcoil-models-prometheus-operator), with unknown fields rejected by comparing the validated model's dump
with the input.
"""

from __future__ import annotations

import re
import subprocess
import urllib.parse
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor
from redisproc import RedisProcess
from serverproc import ServerProcess, wait_until

from stylize.server.config import build_parser
from stylize.server.jobs import CANCEL_WAIT_SECONDS
from stylize.server.main import STOP_GRACE_SECONDS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAYS = {
    "base": DEPLOY / "k8s" / "base",
    "gpu": DEPLOY / "k8s" / "overlays" / "gpu",
    "fleet": DEPLOY / "k8s" / "overlays" / "fleet",
}
BASE_KINDS = [
    "ConfigMap",
    "Deployment",
    "HorizontalPodAutoscaler",
    "Namespace",
    "PodDisruptionBudget",
    "PrometheusRule",
    "Service",
    "Service",
    "ServiceMonitor",
]
# What each overlay renders: the fleet overlay adds its Redis (redis.yaml).
KINDS = {
    "base": BASE_KINDS,
    "gpu": BASE_KINDS,
    "fleet": [*BASE_KINDS, "NetworkPolicy", "Service", "StatefulSet"],
}
RULES = DEPLOY / "prometheus" / "rules.yml"
ADAPTER_VALUES = DEPLOY / "prometheus" / "adapter-values.yaml"
ENSURE_TOOLS = DEPLOY / "tools" / "ensure-tools.sh"
# The oldest Kubernetes these manifests support: native gRPC probes are GA since 1.27, the preStop `sleep`
# action is on by default since 1.30.
KUBERNETES_VERSION = "1.30"
HEALTH_SERVICE = "stylize.v1.StyleTransfer"


@cache
def kubectl() -> str:
    result = subprocess.run(["bash", str(ENSURE_TOOLS), "--find", "kubectl"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr  # `make tools` installs it
    return result.stdout.strip().splitlines()[-1]


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(OVERLAYS[overlay])], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def find(objects: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def server_container(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    (container,) = one(objects, "Deployment", "stylize")["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container["env"]}


def unknown_fields(given: Any, accepted: Any, path: str = "") -> list[str]:
    """Paths present in `given` but dropped by the model (pydantic ignores unknown fields)."""
    if isinstance(given, dict):
        accepted = accepted if isinstance(accepted, dict) else {}
        return [
            item
            for key, value in given.items()
            for item in (
                [f"{path}.{key}"]
                if key not in accepted
                else unknown_fields(value, accepted[key], f"{path}.{key}")
            )
        ]
    if isinstance(given, list):
        accepted = accepted if isinstance(accepted, list) else []
        return [
            item
            for index, value in enumerate(given)
            for item in unknown_fields(
                value, accepted[index] if index < len(accepted) else None, f"{path}[{index}]"
            )
        ]
    return []


OPERATOR_MODELS = {"ServiceMonitor": ServiceMonitor, "PrometheusRule": PrometheusRule}


def validate_operator_object(document: dict[str, Any]) -> None:
    """A prometheus-operator object against the model generated from its CRD."""
    model_class = OPERATOR_MODELS[document["kind"]]
    model = model_class.model_validate(document)  # types, required fields, enums: raises on violation
    dumped = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert unknown_fields(document, dumped) == [], f"fields the {document['kind']} CRD does not define"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_rendered_object_validates_strictly(overlay: str) -> None:
    objects = render(overlay)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(KINDS[overlay])
    for document in objects:
        assert document["metadata"].get("namespace", "stylize") == "stylize", document["metadata"]
        if document["kind"] in OPERATOR_MODELS:
            validate_operator_object(document)
        else:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_strict_validation_rejects_an_unknown_field() -> None:
    """The validators used above do fail on a misspelt field (so their passing means something)."""
    deployment = dict(one(render("base"), "Deployment"))
    deployment["spec"] = {**deployment["spec"], "replica": 2}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    monitor = one(render("base"), "ServiceMonitor")
    endpoint = {**monitor["spec"]["endpoints"][0], "intervall": "15s"}
    with pytest.raises(AssertionError, match="does not define"):
        validate_operator_object({**monitor, "spec": {**monitor["spec"], "endpoints": [endpoint]}})
    rule = one(render("base"), "PrometheusRule")
    (group, *_) = rule["spec"]["groups"]
    misspelt = {**group, "rules": [{**group["rules"][0], "fro": "15m"}]}
    with pytest.raises(AssertionError, match="does not define"):
        validate_operator_object({**rule, "spec": {"groups": [misspelt]}})


def test_gpu_overlay_asks_for_one_gpu_per_replica() -> None:
    container = server_container(render("gpu"))
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(container)["STYLIZE_DEVICE"] == "cuda"
    assert "nvidia.com/gpu" not in server_container(render("base"))["resources"].get("limits", {})


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_probes_use_the_grpc_health_service(overlay: str) -> None:
    container = server_container(render(overlay))
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    assert env_of(container)["STYLIZE_PORT"] == str(grpc_port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe
    assert container["readinessProbe"]["grpc"]["service"] == HEALTH_SERVICE
    assert container["startupProbe"]["grpc"]["service"] == HEALTH_SERVICE
    startup = container["startupProbe"]
    # Model load, parity probe and a cold TensorRT engine build take minutes.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_termination_grace_outlasts_the_server_drain(overlay: str) -> None:
    pod = one(render(overlay), "Deployment")["spec"]["template"]["spec"]
    container = server_container(render(overlay))
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = float(env_of(container)["STYLIZE_GRACE_SECONDS"])
    # The worst case: preStop, the grace period, cancelled jobs stopping, streams delivering their status.
    worst = pre_stop + grace + CANCEL_WAIT_SECONDS + STOP_GRACE_SECONDS
    assert pod["terminationGracePeriodSeconds"] > worst
    # Draining reports NOT_SERVING: liveness must not give up before the grace period is over.
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > pod["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_env_names_and_values_are_accepted_by_the_server(overlay: str) -> None:
    """Each STYLIZE_* variable is a stylize-server flag and its value parses (a typo would be ignored)."""
    environ = env_of(server_container(render(overlay)))
    flags = {
        "STYLIZE_" + action.option_strings[0].lstrip("-").replace("-", "_").upper(): action
        for action in build_parser()._actions
        if action.option_strings and action.dest != "help"
    }
    for name, value in environ.items():
        assert name.startswith("STYLIZE_"), name
        assert name in flags, f"{name} is not a stylize-server flag"
        action = flags[name]
        parsed = action.type(value) if action.type else value
        assert action.choices is None or parsed in action.choices, f"{name}={value}"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_pod_runs_as_non_root_on_a_read_only_root_with_writable_caches(overlay: str) -> None:
    pod = one(render(overlay), "Deployment")["spec"]["template"]["spec"]
    container = server_container(render(overlay))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    writable = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in empty_dirs]
    trt_cache = Path(env_of(container)["STYLIZE_TRT_CACHE_DIR"])
    assert any(trt_cache.is_relative_to(path) for path in writable), (trt_cache, writable)
    assert "/tmp" in writable


def test_services_headless_for_grpc_and_normal_for_metrics() -> None:
    objects = render("base")
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    grpc_service = one(objects, "Service", "stylize")
    metrics_service = one(objects, "Service", "stylize-metrics")
    assert grpc_service["spec"]["clusterIP"] == "None"
    assert "clusterIP" not in metrics_service["spec"]
    for service in (grpc_service, metrics_service):
        assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [p["name"] for p in metrics_service["spec"]["ports"]] == ["metrics"]
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics_service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_pdb_and_hpa_target_the_deployment() -> None:
    objects = render("base")
    deployment = one(objects, "Deployment")
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert "replicas" not in deployment["spec"], "kubectl apply would reset the autoscaler's replica count"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "stylize"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in adapter_served("custom")


def test_dashboard_configmap_is_generated_from_the_dashboard_file() -> None:
    for overlay in OVERLAYS:
        configmap = one(render(overlay), "ConfigMap", "stylize-grafana-dashboard")
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert configmap["data"] == {"stylize.json": (DEPLOY / "grafana" / "stylize.json").read_text()}


def adapter_served(kind: str) -> list[str]:
    """The names prometheus-adapter serves from rules.custom or rules.external of adapter-values.yaml."""
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())
    return [rule["name"]["as"] for rule in adapter["rules"].get(kind) or []]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_prometheus_rule_carries_exactly_the_groups_of_rules_yml(overlay: str) -> None:
    """deploy/k8s/base/prometheusrule.yaml repeats deploy/prometheus/rules.yml for the Prometheus Operator:
    the two must not drift (edit rules.yml, then copy its groups under the PrometheusRule's spec)."""
    rule = one(render(overlay), "PrometheusRule", "stylize")
    assert rule["spec"] == {"groups": yaml.safe_load(RULES.read_text())["groups"]}


# ---------------------------------------------------------------- the fleet overlay


def redis_objects() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    objects = render("fleet")
    return (
        one(objects, "StatefulSet", "stylize-redis"),
        one(objects, "Service", "stylize-redis"),
        one(objects, "NetworkPolicy", "stylize-redis"),
    )


def redis_container() -> dict[str, Any]:
    (container,) = redis_objects()[0]["spec"]["template"]["spec"]["containers"]
    return container


def redis_option(container: dict[str, Any], name: str) -> str:
    """The value of `--name value` in redis-server's arguments."""
    words = [*container.get("command", []), *container.get("args", [])]
    assert words[0] == "redis-server", words
    assert words.count(f"--{name}") == 1, f"--{name} not set exactly once: {words}"
    return words[words.index(f"--{name}") + 1]


def bytes_of(quantity: str) -> int:
    """A Kubernetes quantity (1Gi, 512Mi) or a Redis memory size (768mb, 1gb) in bytes."""
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity).groups()
    factor = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "kb": 2**10, "mb": 2**20, "gb": 2**30}[unit]
    return int(number) * factor


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_fleet_server_uses_the_overlays_redis() -> None:
    """STYLIZE_BROKER names the Redis Service of redis.yaml, on its port, in the pods' own namespace."""
    statefulset, service, _ = redis_objects()
    broker = urllib.parse.urlsplit(env_of(server_container(render("fleet")))["STYLIZE_BROKER"])
    assert broker.scheme == "redis"
    assert broker.hostname in (service["metadata"]["name"], f"{service['metadata']['name']}.stylize")
    (port,) = service["spec"]["ports"]
    assert broker.port == port["port"]
    assert broker.path.lstrip("/").isdigit()
    container_ports = {p["name"]: p["containerPort"] for p in redis_container()["ports"]}
    assert container_ports[port["targetPort"]] == 6379
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert labels_match(service["spec"]["selector"], pod_labels)
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    # The base and the gpu overlay keep the in-process queue (the server's default).
    for overlay in ("base", "gpu"):
        assert "STYLIZE_BROKER" not in env_of(server_container(render(overlay)))


def test_fleet_redis_is_persistent_and_sized() -> None:
    statefulset, _, _ = redis_objects()
    container = redis_container()
    image, tag = container["image"].rsplit(":", 1)
    assert image in ("redis", "docker.io/library/redis")
    assert tuple(map(int, tag.split(".")[:2])) >= (7, 0), "the broker needs XAUTOCLAIM: Redis 7.0 or newer"
    assert redis_option(container, "appendonly") == "yes"
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == redis_option(container, "dir"), (
        "the AOF must go to the volume"
    )
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    # Redis refuses writes at maxmemory instead of being killed at the limit, and never evicts a job's keys.
    assert bytes_of(redis_option(container, "maxmemory")) <= 0.8 * bytes_of(resources["limits"]["memory"])
    assert redis_option(container, "maxmemory-policy") == "noeviction"
    assert statefulset["spec"]["replicas"] == 1


def test_fleet_redis_probes_ask_redis_cli_ping() -> None:
    container = redis_container()
    readiness = " ".join(container["readinessProbe"]["exec"]["command"])
    liveness = " ".join(container["livenessProbe"]["exec"]["command"])
    assert "redis-cli" in readiness and "ping" in readiness
    assert "redis-cli" in liveness and "ping" in liveness
    # redis-cli exits 0 on a LOADING answer: readiness must insist on PONG.
    assert "PONG" in readiness


def test_fleet_redis_runs_as_non_root_on_a_read_only_root() -> None:
    statefulset, _, _ = redis_objects()
    pod = statefulset["spec"]["template"]["spec"]
    container = redis_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_fleet_redis_admits_only_the_server_pods() -> None:
    """The NetworkPolicy selects the Redis pod and lets the stylize server pods in; the stylize Services,
    PDB and ServiceMonitor never select Redis."""
    objects = render("fleet")
    statefulset, _, policy = redis_objects()
    redis_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    server_labels = one(objects, "Deployment", "stylize")["spec"]["template"]["metadata"]["labels"]
    assert labels_match(policy["spec"]["podSelector"]["matchLabels"], redis_labels)
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert labels_match(peer["podSelector"]["matchLabels"], server_labels)
    assert not labels_match(peer["podSelector"]["matchLabels"], redis_labels)
    assert [p["port"] for p in rule["ports"]] == [p["name"] for p in redis_container()["ports"]]
    for service_name in ("stylize", "stylize-metrics"):
        assert not labels_match(one(objects, "Service", service_name)["spec"]["selector"], redis_labels)
    assert not labels_match(
        one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], redis_labels
    )


def test_fleet_hpa_scales_on_the_fleet_queue() -> None:
    """One External metric, stylize_fleet_queue_depth as prometheus-adapter serves it (max across the
    replicas), with an AverageValue target of 2: replicas = ceil(fleet waiting / 2)."""
    objects = render("fleet")
    hpa = one(objects, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == "stylize_fleet_queue_depth"
    assert metric["external"]["metric"]["name"] in adapter_served("external")
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "2"}
    base = one(render("base"), "HorizontalPodAutoscaler")
    assert {key: value for key, value in hpa["spec"].items() if key != "metrics"} == {
        key: value for key, value in base["spec"].items() if key != "metrics"
    }
    # The fleet's queue bound must let the waiting count reach what maxReplicas needs, or the HPA stops
    # short of its maximum while the queue refuses jobs.
    max_queue = int(env_of(server_container(objects))["STYLIZE_MAX_QUEUE"])
    assert hpa["spec"]["maxReplicas"] * int(metric["external"]["target"]["averageValue"]) <= max_queue


def test_fleet_readme_names_the_overlays_files() -> None:
    """The overlay's README table lists each of its manifests, and only files that exist."""
    overlay = OVERLAYS["fleet"]
    readme = (overlay / "README.md").read_text()
    listed = set(re.findall(r"^\| `([\w.-]+\.yaml)` \|", readme, re.M))
    assert listed == {path.name for path in overlay.glob("*.yaml")}


def test_a_broker_outage_fails_readiness_but_not_liveness(model_dir: Path) -> None:
    """The fleet's probes against a real server on a real Redis that goes away: readiness must take the
    pod out of the Service, liveness must not restart it (its running jobs keep computing and the pod
    serves again when Redis is back)."""
    container = server_container(render("fleet"))
    readiness = container["readinessProbe"]["grpc"]["service"]
    liveness = container["livenessProbe"]["grpc"]["service"]
    with RedisProcess() as redis_server:
        broker = {"STYLIZE_BROKER": redis_server.url}
        with ServerProcess(model_dir, "--device", "cpu", "--workers", "1", env=broker) as server:
            assert server.health(readiness) == server.health(liveness) == "SERVING"
            redis_server.stop()
            wait_until(lambda: server.health(readiness) == "NOT_SERVING", timeout=30)
            assert server.health(liveness) == "SERVING"
