"""The Kubernetes manifests: rendered by real kustomize, validated offline and strictly against the schemas.

Built-in kinds are checked by kubernetes-validate (the Kubernetes OpenAPI schemas, strict: unknown fields
fail). The ServiceMonitor and the PrometheusRule are prometheus-operator CRDs that kubernetes-validate has no
schema for; they are checked against the pydantic models generated from the operator's CRDs
(cloudcoil-models-prometheus-operator), with unknown fields rejected by comparing the validated model's dump
with the input. The secure overlay's cert-manager Certificate (and the Issuers its README shows) are checked
against JSON schemas written here from cert-manager's v1 CRDs, for the fields these manifests use, with
unknown fields rejected.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.parse
from functools import cache
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from redisproc import RedisProcess
from serverproc import ServerProcess, wait_until

from stylize.server.auth import parse_token_file, token_digest
from stylize.server.config import ServerConfig, build_parser, parse_config
from stylize.server.jobs import CANCEL_WAIT_SECONDS
from stylize.server.main import STOP_GRACE_SECONDS
from stylize.v1 import stylize_pb2 as pb
from stylize.v1 import stylize_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAYS = {
    "base": DEPLOY / "k8s" / "base",
    "gpu": DEPLOY / "k8s" / "overlays" / "gpu",
    "fleet": DEPLOY / "k8s" / "overlays" / "fleet",
    "secure": DEPLOY / "k8s" / "overlays" / "secure",
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
    # The secure overlay adds its cert-manager Certificate and the token Secret.
    "secure": [*BASE_KINDS, "Certificate", "Secret"],
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


def kustomize(directory: Path) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    return kustomize(OVERLAYS[overlay])


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


# cert-manager.io/v1, written from cert-manager's CRDs for the fields these manifests use (types, enums,
# required fields; issuerRef limited to cert-manager's own Issuer and ClusterIssuer). Any other field fails:
# the API server would silently prune a misspelt one.
GO_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s|ms))+$"}
KEY_USAGES = [
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any", "server auth",
    "client auth", "code signing", "email protection", "s/mime", "ipsec end system", "ipsec tunnel",
    "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
]  # fmt: skip
CERT_MANAGER_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
CERTIFICATE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Certificate"},
        "metadata": CERT_MANAGER_METADATA,
        "spec": {
            "type": "object",
            "required": ["secretName", "issuerRef"],
            "additionalProperties": False,
            "properties": {
                "secretName": {"type": "string", "minLength": 1},
                "commonName": {"type": "string", "minLength": 1, "maxLength": 64},
                "dnsNames": {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                "isCA": {"type": "boolean"},
                "duration": GO_DURATION,
                "renewBefore": GO_DURATION,
                "revisionHistoryLimit": {"type": "integer", "minimum": 1},
                "usages": {"type": "array", "items": {"enum": KEY_USAGES}, "uniqueItems": True},
                "privateKey": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": {"type": "integer"},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                    },
                },
                "issuerRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                        "group": {"const": "cert-manager.io"},
                    },
                },
            },
        },
    },
}
ISSUER_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"enum": ["Issuer", "ClusterIssuer"]},
        "metadata": CERT_MANAGER_METADATA,
        "spec": {
            "type": "object",
            "minProperties": 1,
            "maxProperties": 1,
            "additionalProperties": False,
            "properties": {
                "selfSigned": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"crlDistributionPoints": {"type": "array", "items": {"type": "string"}}},
                },
                "ca": {
                    "type": "object",
                    "required": ["secretName"],
                    "additionalProperties": False,
                    "properties": {"secretName": {"type": "string", "minLength": 1}},
                },
            },
        },
    },
}
CERT_MANAGER_SCHEMAS = {
    "Certificate": CERTIFICATE_SCHEMA,
    "Issuer": ISSUER_SCHEMA,
    "ClusterIssuer": ISSUER_SCHEMA,
}
# What cert-manager uses where a Certificate sets no duration.
DEFAULT_CERTIFICATE_DURATION = datetime.timedelta(days=90)


def go_duration(text: str) -> datetime.timedelta:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)(ms|h|m|s)", text)
    assert "".join(number + unit for number, unit in parts) == text, f"not a Go duration: {text!r}"
    return datetime.timedelta(seconds=sum(float(number) * units[unit] for number, unit in parts))


def validate_cert_manager_object(document: dict[str, Any]) -> None:
    """A cert-manager object against the schema above, and what cert-manager's webhook checks besides."""
    jsonschema.Draft202012Validator(CERT_MANAGER_SCHEMAS[document["kind"]]).validate(document)
    if document["kind"] != "Certificate":
        return
    spec = document["spec"]
    duration = go_duration(spec["duration"]) if "duration" in spec else DEFAULT_CERTIFICATE_DURATION
    assert duration >= datetime.timedelta(hours=1), "cert-manager refuses a duration under an hour"
    if "renewBefore" in spec:
        assert go_duration(spec["renewBefore"]) < duration, "renewBefore must be shorter than the duration"
    key = spec.get("privateKey", {})
    sizes = {"RSA": {2048, 3072, 4096, 8192}, "ECDSA": {256, 384, 521}}.get(key.get("algorithm", "RSA"))
    if "size" in key:
        assert sizes is not None and key["size"] in sizes, f"no {key.get('algorithm')} key of {key['size']}"
    assert spec.get("dnsNames") or spec.get("commonName"), "a Certificate needs a name"


def validate(document: dict[str, Any]) -> None:
    if document["kind"] in OPERATOR_MODELS:
        validate_operator_object(document)
    elif document.get("apiVersion", "").startswith("cert-manager.io/"):
        validate_cert_manager_object(document)
    else:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_rendered_object_validates_strictly(overlay: str) -> None:
    objects = render(overlay)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(KINDS[overlay])
    for document in objects:
        assert document["metadata"].get("namespace", "stylize") == "stylize", document["metadata"]
        validate(document)


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
    certificate = one(render("secure"), "Certificate")
    for wrong in ({"renewbefore": "720h"}, {"renewBefore": "30d"}, {"issuerRef": {"nam": "stylize-ca"}}):
        with pytest.raises(jsonschema.ValidationError):
            validate({**certificate, "spec": {**certificate["spec"], **wrong}})
    with pytest.raises(AssertionError, match="shorter than the duration"):
        validate({**certificate, "spec": {**certificate["spec"], "renewBefore": "2160h"}})


def test_gpu_overlay_asks_for_one_gpu_per_replica() -> None:
    container = server_container(render("gpu"))
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(container)["STYLIZE_DEVICE"] == "cuda"
    assert "nvidia.com/gpu" not in server_container(render("base"))["resources"].get("limits", {})


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_probes_use_the_grpc_health_service(overlay: str) -> None:
    """On the gRPC port, or on the plaintext health-only port where the server has one."""
    container = server_container(render(overlay))
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    config = parse_config([], env_of(container))
    assert config.port == grpc_port
    probe_port = grpc_port if config.health_port is None else config.health_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == probe_port, probe
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
    # And all of them together, through the server's own parser (which also checks what goes together).
    parse_config([], environ)


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


# ---------------------------------------------------------------- the secure overlay

# The names cert-manager writes into a Certificate's Secret, and the flag each one is for.
CERTIFICATE_KEYS = {"tls_cert": "tls.crt", "tls_key": "tls.key", "tls_client_ca": "ca.crt"}
FILE_FIELDS = (*CERTIFICATE_KEYS, "token_file")
PLACEHOLDER_DIGEST = "0" * 64


def secure_config(objects: tuple[dict[str, Any], ...]) -> ServerConfig:
    return parse_config([], env_of(server_container(objects)))


def secret_data(secret: dict[str, Any]) -> dict[str, bytes]:
    data = {name: base64.b64decode(value) for name, value in secret.get("data", {}).items()}
    return {**data, **{name: value.encode() for name, value in secret.get("stringData", {}).items()}}


def mounted_secret_file(objects: tuple[dict[str, Any], ...], path: Path) -> tuple[dict[str, Any], str, str]:
    """The mount a file the server reads lies in, the Secret that volume shows and the key the file is.

    The kubelet updates a Secret's files in place only in a secret (or projected) volume mounted without
    subPath, and the file must be that Secret's key itself, straight under the mount."""
    pod = one(objects, "Deployment", "stylize")["spec"]["template"]["spec"]
    container = server_container(objects)
    mounts = [m for m in container["volumeMounts"] if path.is_relative_to(m["mountPath"])]
    assert len(mounts) == 1, f"{path}: in {len(mounts)} mounts"
    (mount,) = mounts
    assert mount.get("readOnly") is True, mount
    assert "subPath" not in mount and "subPathExpr" not in mount, (
        f"a subPath mount never sees updates: {mount}"
    )
    assert path.parent == Path(mount["mountPath"]), f"{path} is not straight under {mount['mountPath']}"
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    if "projected" in volume:
        owners = [
            source["secret"]
            for source in volume["projected"]["sources"]
            if "secret" in source
            and any(item["path"] == path.name for item in source["secret"].get("items", []))
        ]
        assert len(owners) == 1, f"{path.name}: projected from {len(owners)} secrets"
        (secret,) = owners
        (key,) = [item["key"] for item in secret["items"] if item["path"] == path.name]
        return mount, secret["name"], key
    assert "secret" in volume, f"{path}: volume {volume['name']} is not a Secret"
    secret = volume["secret"]
    assert secret.get("optional") is not True, "the server cannot start without its files"
    items = secret.get("items")
    if items is None:
        return mount, secret["secretName"], path.name
    (key,) = [item["key"] for item in items if item["path"] == path.name]
    return mount, secret["secretName"], key


def check_secure_files(objects: tuple[dict[str, Any], ...]) -> ServerConfig:
    """Every file the server is told to read comes from the Secret that must hold it: the certificate's
    from the Certificate's secretName (under the names cert-manager writes), the token file from the
    Secret the overlay renders, which has that key and a token file the server parses."""
    config = secure_config(objects)
    certificate = one(objects, "Certificate", "stylize-tls")
    for field in FILE_FIELDS:
        path = getattr(config, field)
        if path is None:
            continue
        _, secret_name, key = mounted_secret_file(objects, path)
        if field in CERTIFICATE_KEYS:
            assert secret_name == certificate["spec"]["secretName"], field
            assert key == CERTIFICATE_KEYS[field], field
        else:
            (secret,) = find(objects, "Secret", secret_name)
            parse_token_file(secret_data(secret)[key].decode(), key)
    return config


def test_secure_overlay_sets_tls_tokens_health_port_and_no_reflection() -> None:
    objects = render("secure")
    config = check_secure_files(objects)
    assert config.tls_cert is not None and config.tls_key is not None and config.token_file is not None
    assert config.tls_client_ca is None, "mutual TLS is the mtls Component's, off by default"
    assert config.health_port is not None
    assert config.reflection == "off"
    assert "health" in config.auth_exempt and "reflection" not in config.auth_exempt
    # /metrics stays reachable for the ServiceMonitor: bound to every address, on the metrics port.
    assert (config.metrics_host or config.host) == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in server_container(objects)["ports"]}
    assert config.metrics_port == ports["metrics"]


def test_secure_certificate_names_the_service_and_fills_the_mounted_secret() -> None:
    objects = render("secure")
    certificate = one(objects, "Certificate", "stylize-tls")
    spec = certificate["spec"]
    deployment = one(objects, "Deployment", "stylize")
    namespace = deployment["metadata"]["namespace"]
    assert certificate["metadata"]["namespace"] == namespace, "the Secret must be in the pods' namespace"
    service = one(objects, "Service", "stylize")
    assert [p["name"] for p in service["spec"]["ports"]] == ["grpc"]
    fqdn = f"{service['metadata']['name']}.{namespace}.svc.cluster.local"
    names = set(spec["dnsNames"])
    assert {f"{service['metadata']['name']}.{namespace}.svc", fqdn} <= names
    # Only the Service's own names: its short forms, its FQDN, the wildcard of its pods' records.
    short = fqdn.split(".")
    allowed = {".".join(short[:n]) for n in range(1, len(short) + 1)} | {f"*.{fqdn}"}
    assert names <= allowed, names - allowed
    assert spec["issuerRef"]["name"] and spec["issuerRef"]["kind"] in ("Issuer", "ClusterIssuer")
    assert go_duration(spec["renewBefore"]) >= datetime.timedelta(days=7)
    # A gRPC client refuses a server certificate whose extended key usage leaves out server auth.
    assert "server auth" in spec.get("usages", ["server auth"])
    tls_cert = secure_config(objects).tls_cert
    _, secret_name, _ = mounted_secret_file(objects, tls_cert)
    assert spec["secretName"] == secret_name
    assert find(objects, "Secret", secret_name) == [], "cert-manager owns the certificate's Secret"


def test_secure_probes_go_to_the_health_port_which_no_service_exposes() -> None:
    objects = render("secure")
    container = server_container(objects)
    config = secure_config(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["health"] == config.health_port
    assert len(set(ports.values())) == len(ports), ports
    base = server_container(render("base"))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == config.health_port, probe
        # Everything else as in the base: services, periods, thresholds.
        moved = {**base[probe], "grpc": {**base[probe]["grpc"], "port": config.health_port}}
        assert container[probe] == moved, probe
    assert container["readinessProbe"]["grpc"]["service"] == HEALTH_SERVICE
    assert container["startupProbe"]["grpc"]["service"] == HEALTH_SERVICE
    assert container["livenessProbe"]["grpc"]["service"] == ""
    for service in find(objects, "Service"):
        for port in service["spec"]["ports"]:
            assert port.get("targetPort") not in ("health", config.health_port), service["metadata"]["name"]
            assert port["port"] != config.health_port, service["metadata"]["name"]


def test_secure_overlay_changes_nothing_else_of_the_base() -> None:
    """Env only added, the rest of the pod as in the base (grace period, security context, resources),
    the metrics Service and the ServiceMonitor untouched."""
    secure, base = render("secure"), render("base")
    pod = one(secure, "Deployment")["spec"]["template"]["spec"]
    base_pod = one(base, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == base_pod["terminationGracePeriodSeconds"]
    container, base_container = server_container(secure), server_container(base)
    assert env_of(base_container).items() <= env_of(container).items()
    changed = {"env", "ports", "startupProbe", "readinessProbe", "livenessProbe", "volumeMounts"}
    assert {k: v for k, v in container.items() if k not in changed} == {
        k: v for k, v in base_container.items() if k not in changed
    }
    assert {k: v for k, v in pod.items() if k not in ("containers", "volumes")} == {
        k: v for k, v in base_pod.items() if k not in ("containers", "volumes")
    }
    assert [m for m in container["volumeMounts"] if m in base_container["volumeMounts"]] == base_container[
        "volumeMounts"
    ]
    assert [v for v in pod["volumes"] if v in base_pod["volumes"]] == base_pod["volumes"]
    for kind, name in (("Service", "stylize-metrics"), ("ServiceMonitor", "stylize"), ("Service", "stylize")):
        assert one(secure, kind, name) == one(base, kind, name), name
    secret_volumes = [v for v in pod["volumes"] if "secret" in v]
    assert secret_volumes and all(v["secret"]["defaultMode"] & 0o007 == 0 for v in secret_volumes), (
        "the key must not be world-readable"
    )


def test_secure_token_file_is_a_placeholder_that_admits_nobody() -> None:
    """The committed token file parses, lists only the all-zero digest (the SHA-256 of no token anyone
    knows), and is what the Secret carries, under a name without kustomize's hash suffix (so an update
    reaches the running pods' volume instead of rolling them)."""
    objects = render("secure")
    config = secure_config(objects)
    _, secret_name, key = mounted_secret_file(objects, config.token_file)
    assert secret_name == "stylize-tokens"
    (secret,) = find(objects, "Secret", secret_name)
    text = secret_data(secret)[key].decode()
    assert text == (OVERLAYS["secure"] / "tokens.json").read_text()
    by_digest, by_name = parse_token_file(text, key)
    assert list(by_digest) == [PLACEHOLDER_DIGEST] and by_name
    # Nothing in the overlay that could be a credential: no PEM keys or certificates, no other digest.
    for path in OVERLAYS["secure"].rglob("*"):
        if path.is_file():
            content = path.read_text()
            assert "-----BEGIN" not in content, path
            assert set(re.findall(r"\b[0-9a-f]{64}\b", content)) <= {PLACEHOLDER_DIGEST}, path


def render_secure_variant(tmp_path: Path, variant: str) -> tuple[dict[str, Any], ...]:
    """The secure overlay as its kustomization.yaml says to change it: mtls (uncomment `components:`), or
    gpu/fleet (../gpu or ../fleet instead of ../../base). Rendered from a copy in tmp_path."""
    copy = tmp_path / "secure"
    shutil.copytree(OVERLAYS["secure"], copy)
    kustomization = copy / "kustomization.yaml"
    text = kustomization.read_text()
    commented, enabled = "# components:\n#   - mtls\n", "components:\n  - mtls\n"
    assert text.count(commented) == 1 and text.count("  - ../../base\n") == 1
    if variant == "mtls":
        text = text.replace(commented, enabled)
    below = OVERLAYS["base" if variant == "mtls" else variant]
    kustomization.write_text(text.replace("  - ../../base\n", f"  - {os.path.relpath(below, copy)}\n"))
    return kustomize(copy)


@pytest.mark.parametrize("variant", ["mtls", "gpu", "fleet"])
def test_secure_overlay_variants_render_validate_and_parse(tmp_path: Path, variant: str) -> None:
    objects = render_secure_variant(tmp_path, variant)
    for document in objects:
        validate(document)
    config = check_secure_files(objects)
    assert config.reflection == "off" and config.health_port is not None and config.token_file is not None
    container = server_container(objects)
    if variant == "mtls":
        assert config.tls_client_ca is not None  # parse_config checked it goes with the certificate
        assert not config.tenant_from_client_cert, "commented out: tokens still name the tenant"
    elif variant == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    else:
        assert config.broker.startswith("redis://")
        assert one(objects, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["type"] == "External"


def readme_blocks(text: str) -> list[str]:
    """The fenced ```yaml blocks of a README, unindented."""
    blocks = re.findall(r"^( *)```yaml\n(.*?)^\1```", text, re.M | re.S)
    return [re.sub(rf"^{indent}", "", body, flags=re.M) for indent, body in blocks]


def test_secure_readme_matches_the_overlay() -> None:
    """The file table lists the overlay's files; the names and targets clients are told to use are the
    certificate's; the issuer and client certificate it shows are valid cert-manager objects that fit."""
    overlay = OVERLAYS["secure"]
    readme = (overlay / "README.md").read_text()
    listed = set(re.findall(r"^\| `([\w./-]+)` \|", readme, re.M))
    files = {str(path.relative_to(overlay)) for path in overlay.rglob("*") if path.is_file()}
    assert listed == files - {"README.md"}
    objects = render("secure")
    certificate = one(objects, "Certificate", "stylize-tls")
    names = set(certificate["spec"]["dnsNames"])
    grpc_port = one(objects, "Service", "stylize")["spec"]["ports"][0]["port"]
    server_names = re.findall(r"--tls-server-name (\S+)", readme)
    targets = re.findall(r"dns:///([\w.-]+):(\d+)", readme)
    assert server_names and targets
    assert set(server_names) <= names
    assert {(name, int(port)) for name, port in targets} <= {(name, grpc_port) for name in names}
    shown = [doc for block in readme_blocks(readme) for doc in yaml.safe_load_all(block) if doc]
    for document in shown:
        validate(document)
        assert document["metadata"].get("namespace") == certificate["metadata"]["namespace"]
    issuers = {(d["kind"], d["metadata"]["name"]) for d in shown if d["kind"] in ("Issuer", "ClusterIssuer")}
    issuer_ref = certificate["spec"]["issuerRef"]
    assert (issuer_ref["kind"], issuer_ref["name"]) in issuers, "the README's CA issuer is the one asked"
    (ca_issuer,) = [d for d in shown if d["kind"] == "Issuer" and d["metadata"]["name"] == issuer_ref["name"]]
    ca_certificates = [d for d in shown if d["kind"] == "Certificate" and d["spec"].get("isCA")]
    assert [c["spec"]["secretName"] for c in ca_certificates] == [ca_issuer["spec"]["ca"]["secretName"]]
    clients = [d for d in shown if d["kind"] == "Certificate" and not d["spec"].get("isCA")]
    assert clients and all("client auth" in c["spec"]["usages"] for c in clients)
    assert all(c["spec"]["issuerRef"] == issuer_ref for c in clients)


def test_secure_readme_digest_command_is_the_servers_digest() -> None:
    """`printf %s "$TOKEN" | sha256sum` as the README writes it gives the digest the server compares."""
    readme = (OVERLAYS["secure"] / "README.md").read_text()
    (command,) = re.findall(r"^ +(printf .*sha256sum)$", readme, re.M)
    token = secrets.token_hex(32)
    result = subprocess.run(
        ["bash", "-c", command],
        env={"TOKEN": token, "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == token_digest(token)


# --- the secure overlay's configuration on a real server, with its Secrets as the kubelet writes them


def write_secret_volume(directory: Path, files: dict[str, bytes]) -> None:
    """What the kubelet's atomic writer does to a secret volume: the files go into a new timestamped
    folder, `..data` is switched to it by one rename, each key is a symlink through `..data`, and the old
    folder is removed."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "..data"
    previous = data.resolve() if data.is_symlink() else None
    folder = directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
        (folder / name).chmod(0o440)
    staged = directory / "..data_tmp"
    staged.symlink_to(folder.name)
    os.replace(staged, data)
    for name in files:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")
    if previous is not None:
        shutil.rmtree(previous)


def issue_certificates(common_name: str, dns_names: list[str]) -> dict[str, bytes]:
    """A new CA and a server certificate it signs for `dns_names`: the Secret cert-manager's CA issuer
    writes (tls.crt, tls.key, ca.crt)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ca = (
        build(common_name, ca_key)
        .issuer_name(ca_name)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        build(dns_names[0], key)
        .issuer_name(ca_name)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name) for name in dns_names]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return {
        "tls.crt": server.public_bytes(pem),
        "tls.key": key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        "ca.crt": ca.public_bytes(pem),
    }


def token_file_for(*tokens: str) -> bytes:
    return json.dumps({"tenants": {"acme": {"token_sha256": [token_digest(t) for t in tokens]}}}).encode()


def test_secure_overlay_configuration_serves_tls_and_tokens_and_rotates_in_place(
    model_dir: Path, tmp_path: Path
) -> None:
    """A real server with the overlay's STYLIZE_* variables, its Secret files laid out as the kubelet
    does (under tmp_path instead of /): the probes' services answer SERVING in plaintext on the health
    port, which serves nothing else; the gRPC port takes TLS only and a known token; reflection is off.
    Then the kubelet's swap of both volumes: new connections get the new certificate and the new tokens,
    without a restart."""
    objects = render("secure")
    container = server_container(objects)
    environ = env_of(container)
    config = parse_config([], environ)
    dns_names = one(objects, "Certificate", "stylize-tls")["spec"]["dnsNames"]
    server_name = max(dns_names, key=lambda name: (not name.startswith("*"), len(name)))
    pod_root = tmp_path / "pod"

    def in_pod(path: Path) -> Path:
        return pod_root / path.relative_to("/")

    first, second = issue_certificates("ca-one", dns_names), issue_certificates("ca-two", dns_names)
    token, new_token = secrets.token_hex(32), secrets.token_hex(32)
    tls_dir, tokens_dir = in_pod(config.tls_cert).parent, in_pod(config.token_file).parent
    write_secret_volume(tls_dir, first)
    write_secret_volume(tokens_dir, {config.token_file.name: token_file_for(token)})
    secret_mounts = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in ("tls", "tokens")]
    env = {
        **{
            name: str(in_pod(Path(value))) if any(value.startswith(f"{m}/") for m in secret_mounts) else value
            for name, value in environ.items()
        },
        "STYLIZE_HEALTH_PORT": "0",  # a free one; the overlay's own port is checked above
        "STYLIZE_TRT_CACHE_DIR": str(tmp_path / "trt"),
    }
    assert env["STYLIZE_TLS_CERT"] == str(tls_dir / "tls.crt")

    def channel(port: int, ca: bytes | None = None) -> grpc.Channel:
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.ssl_target_name_override", server_name)]
        address = f"127.0.0.1:{port}"
        if ca is None:
            return grpc.insecure_channel(address, options=options[:1])
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca), options=options)

    def health(port: int, service: str, ca: bytes | None = None) -> str:
        with channel(port, ca) as ch:
            response = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def info(port: int, ca: bytes | None, bearer: str | None) -> grpc.StatusCode:
        metadata = [] if bearer is None else [("authorization", f"Bearer {bearer}")]
        with channel(port, ca) as ch:
            try:
                stylize_pb2_grpc.StyleTransferStub(ch).GetServerInfo(
                    pb.GetServerInfoRequest(), metadata=metadata, timeout=5
                )
            except grpc.RpcError as error:
                return error.code()
        return grpc.StatusCode.OK

    with ServerProcess(model_dir, "--device", "cpu", env=env, wait_for=None) as server:
        (health_port,) = map(
            int, re.findall(r"health \(plaintext, health service only\) on \S+:(\d+)", server.log())
        )
        probes = [
            container[p]["grpc"]["service"] for p in ("startupProbe", "readinessProbe", "livenessProbe")
        ]

        def probes_pass() -> bool:
            try:
                return all(health(health_port, service) == "SERVING" for service in probes)
            except grpc.RpcError:
                return False

        wait_until(probes_pass, timeout=120)
        assert info(health_port, None, token) == grpc.StatusCode.UNIMPLEMENTED, "health port: health only"
        with pytest.raises(grpc.RpcError) as plaintext:
            health(server.port, "")
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE, "the gRPC port must refuse plaintext"
        assert health(server.port, HEALTH_SERVICE, first["ca.crt"]) == "SERVING"  # exempt from tokens
        assert info(server.port, first["ca.crt"], None) == grpc.StatusCode.UNAUTHENTICATED
        assert info(server.port, first["ca.crt"], new_token) == grpc.StatusCode.UNAUTHENTICATED
        assert info(server.port, first["ca.crt"], token) == grpc.StatusCode.OK
        assert info(server.port, second["ca.crt"], token) == grpc.StatusCode.UNAVAILABLE
        with channel(server.port, first["ca.crt"]) as ch:
            replies = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=5,
            )
            with pytest.raises(grpc.RpcError) as reflection:
                list(replies)
        assert reflection.value.code() == grpc.StatusCode.UNIMPLEMENTED

        # cert-manager renews (a new key, here even a new CA) and the token Secret is edited; the kubelet
        # swaps the volumes' files.
        write_secret_volume(tls_dir, second)
        write_secret_volume(tokens_dir, {config.token_file.name: token_file_for(new_token)})
        wait_until(lambda: info(server.port, second["ca.crt"], new_token) == grpc.StatusCode.OK, timeout=10)
        assert info(server.port, first["ca.crt"], new_token) == grpc.StatusCode.UNAVAILABLE
        assert info(server.port, second["ca.crt"], token) == grpc.StatusCode.UNAUTHENTICATED
        log = server.log()
        assert "TLS certificate reloaded" in log and "reloaded: 1 tenant(s)" in log
        assert server.process.poll() is None
