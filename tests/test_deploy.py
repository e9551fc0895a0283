"""The Kubernetes manifests in deploy/, checked offline against schemas and the server itself.

- Plain Kubernetes objects (the kustomize overlays as rendered, the prometheus-adapter rules,
  KServe's HPA) validate strictly (unknown fields refused) against the Kubernetes OpenAPI
  schemas that kubernetes-validate ships, for each version in `KUBERNETES_VERSIONS`.
- KServe objects: every field KServe defines is checked against the field lists of KServe's
  own API types (`KSERVE_FIELDS`, copied from the kserve 0.21.0 Python SDK's generated models,
  which mirror the CRDs' OpenAPI schemas); the parts that are Kubernetes types (a predictor is a
  PodSpec, a model spec a Container, a runtime's containers Containers) are checked as a Pod by
  kubernetes-validate. The SDK itself cannot be a test dependency: it pins protobuf < 7.
- The ServiceMonitor against the subset of the Prometheus Operator's monitoring.coreos.com/v1
  schema that it uses (`SERVICE_MONITOR_SCHEMA`, field names from the operator's API reference).
- Every container command is parsed by the real `gradcam-server` parser, and ports, probes,
  mounts, the drain time and the autoscaling metric are checked against what it gives; the
  Deployment's command is then started as a process and probed as the kubelet would.

`render` is a small kustomize: resources, strategic-merge patches and image tags, the only
features the kustomizations here use (it refuses any other), so what is checked is what
`kubectl apply -k` applies; where kubectl is installed, its own `kubectl kustomize` output is
compared with it.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import jsonschema
import kubernetes_validate
import numpy as np
import onnx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families

from gradcam_proto import grpc_service_pb2 as pb
from gradcam_proto import grpc_service_pb2_grpc as pb_grpc
from gradcam_server.metrics import Metrics
from gradcam_server.server import ServerOptions, build_parser, parse_args

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kustomize"
OVERLAYS = ("gpu", "cpu")
KSERVE = DEPLOY / "kserve"
ADAPTER_RULES = DEPLOY / "prometheus-adapter" / "adapter-rules.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # gRPC probes are GA since 1.27


# -- loading and rendering -----------------------------------------------------------------------


def documents(path: Path) -> list[dict]:
    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


# Kubernetes' patchMergeKey for the lists the patches here touch; any other list is replaced.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
    "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name",
}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches", "images"}


def strategic_merge(base: object, patch: object, key: str | None = None) -> object:
    """Kubernetes' strategic merge for maps and the merge-keyed lists in MERGE_KEYS."""
    if isinstance(base, dict) and isinstance(patch, dict):
        assert not any(k.startswith("$") for k in patch), "patch directives are not rendered"
        merged = dict(base)
        for name, value in patch.items():
            if value is None:
                merged.pop(name, None)
            elif name in merged:
                merged[name] = strategic_merge(merged[name], value, name)
            else:
                merged[name] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        merge_key = MERGE_KEYS[key]
        merged = [copy.deepcopy(item) for item in base]
        for item in patch:
            index = next((i for i, old in enumerate(merged)
                          if old.get(merge_key) == item[merge_key]), None)
            if index is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[index] = strategic_merge(merged[index], item)
        return merged
    return copy.deepcopy(patch)


def identity(resource: dict) -> tuple[str, str, str]:
    return resource["apiVersion"], resource["kind"], resource["metadata"]["name"]


def render(folder: Path) -> list[dict]:
    """What `kubectl kustomize folder` prints, for the features the kustomizations here use."""
    kustomization = documents(folder / "kustomization.yaml")[0]
    unsupported = set(kustomization) - KUSTOMIZATION_KEYS
    assert not unsupported, f"{folder}: render() does not implement {sorted(unsupported)}"
    resources: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        resources += render(path) if path.is_dir() else documents(path)
    for patch_entry in kustomization.get("patches", []):
        assert set(patch_entry) == {"path"}, "only file patches are rendered"
        for patch in documents(folder / patch_entry["path"]):
            matches = [i for i, r in enumerate(resources) if identity(r) == identity(patch)]
            assert len(matches) == 1, f"patch {identity(patch)} matches {len(matches)} objects"
            resources[matches[0]] = strategic_merge(resources[matches[0]], patch)
    for image in kustomization.get("images", []):
        assert set(image) <= {"name", "newName", "newTag"}
        for container in all_containers(resources):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return resources


def all_containers(resources: list[dict]) -> list[dict]:
    return [c for r in resources if r["kind"] == "Deployment"
            for c in r["spec"]["template"]["spec"]["containers"]]


def one(resources: list[dict], kind: str, name: str | None = None) -> dict:
    found = [r for r in resources
             if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} objects of kind {kind} named {name}"
    return found[0]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(KUSTOMIZE / "overlays" / request.param)


def dockerfile_command() -> tuple[list[str], list[str]]:
    """The Dockerfile's ENTRYPOINT and CMD (exec form)."""
    text = DOCKERFILE.read_text()
    entrypoint = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    command = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert entrypoint and command, "the Dockerfile's ENTRYPOINT and CMD are JSON arrays"
    return json.loads(entrypoint.group(1)), json.loads(command.group(1))


def dockerfile_uid() -> int:
    return int(re.search(r"useradd [^\n]*--uid (\d+)", DOCKERFILE.read_text()).group(1))


def server_argv(container: dict) -> list[str]:
    """The command line the container runs: its command (else the image's ENTRYPOINT) + args."""
    entrypoint, _ = dockerfile_command()
    return [*container.get("command", entrypoint), *container.get("args", [])]


def parse_server(argv: list[str]) -> ServerOptions:
    """`argv` through the real parser; each flag must be one it defines, spelled out in full
    (argparse would accept an abbreviation)."""
    entrypoint, _ = dockerfile_command()
    assert argv[0] == entrypoint[0] == "gradcam-server"
    known = {option for action in build_parser()._actions for option in action.option_strings}
    flags = [word.split("=")[0] for word in argv[1:] if word.startswith("--")]
    assert set(flags) <= known, f"unknown flags {sorted(set(flags) - known)}"
    assert len(flags) == len(set(flags)), f"a flag given twice in {argv}"
    return parse_args(argv[1:])


def test_the_image_command_is_the_parsed_server():
    """`gradcam-server`, which every manifest runs, is the entry point whose parser the tests
    use; the Dockerfile's own command parses."""
    script = re.search(r'^gradcam-server = "(.*)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert script and script.group(1) == "gradcam_server.server:main"
    entrypoint, command = dockerfile_command()
    options = parse_server(entrypoint + command)
    assert (str(options.model_repository), options.host, options.port) == ("/models", "0.0.0.0",
                                                                          8001)


# -- plain Kubernetes objects --------------------------------------------------------------------


def kubernetes_valid(resource: dict, version: str) -> None:
    kubernetes_validate.validate(resource, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_overlays_validate_against_the_kubernetes_schemas(overlay, version):
    name, resources = overlay
    kinds = sorted(r["kind"] for r in resources)
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim",
                     "PodDisruptionBudget", "Service", "Service", "ServiceMonitor"]
    for resource in resources:
        if resource["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # a CRD: test_service_monitor_matches_the_operator_schema
        kubernetes_valid(resource, version)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_other_kubernetes_objects_validate(version):
    for path in (ADAPTER_RULES, KSERVE / "hpa.yaml"):
        for resource in documents(path):
            kubernetes_valid(resource, version)


def test_strict_validation_refuses_an_unknown_field(overlay):
    """The schemas are strict: a misspelt field fails (the check above can fail)."""
    deployment = copy.deepcopy(one(overlay[1], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_valid(deployment, KUBERNETES_VERSIONS[-1])


def test_render_merges_as_kustomize_does():
    base = {"containers": [{"name": "a", "args": ["1", "2"], "ports": [{"containerPort": 1}],
                            "resources": {"limits": {"cpu": "1"}}}, {"name": "b"}],
            "tolerations": [{"key": "x"}]}
    patch = {"containers": [{"name": "a", "args": ["3"], "ports": [{"containerPort": 2}],
                             "resources": {"requests": {"cpu": "1"}}}],
             "tolerations": [{"key": "y"}]}
    assert strategic_merge(base, patch) == {
        "containers": [{"name": "a", "args": ["3"],
                        "ports": [{"containerPort": 1}, {"containerPort": 2}],
                        "resources": {"limits": {"cpu": "1"}, "requests": {"cpu": "1"}}},
                       {"name": "b"}],
        "tolerations": [{"key": "y"}],
    }


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl on this machine")
@pytest.mark.parametrize("name", OVERLAYS)
def test_render_equals_kubectl_kustomize(name):
    """Where kubectl is installed (its kustomize), render() prints the same objects."""
    folder = KUSTOMIZE / "overlays" / name
    printed = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True,
                             text=True, check=True, timeout=60).stdout
    assert sorted(yaml.safe_load_all(printed), key=identity) == sorted(render(folder),
                                                                        key=identity)


# -- the server command in the Deployment ---------------------------------------------------------


def test_deployment_runs_the_image_command(overlay):
    """No `command`: the image's ENTRYPOINT runs, and the args begin with the Dockerfile's CMD
    (the command the container was built to run), the overlay's flags after it."""
    _, cmd = dockerfile_command()
    container = one(overlay[1], "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "command" not in container
    assert container["args"][:len(cmd)] == cmd
    base = documents(KUSTOMIZE / "base" / "deployment.yaml")[0]
    base_args = base["spec"]["template"]["spec"]["containers"][0]["args"]
    assert container["args"][:len(base_args)] == base_args, "the overlay keeps the base's flags"


def check_pod(pod_spec: dict, container: dict, options: ServerOptions, grpc_port_name: str):
    """Ports, probes, mounts, drain time and security of one server pod."""
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports[grpc_port_name] == options.port
    assert options.host == "0.0.0.0", "the kubelet and the Service reach the pod's IP"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": options.port}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "time to load models"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "a writable /tmp"
    security = {**pod_spec.get("securityContext", {}), **container["securityContext"]}
    assert security["runAsNonRoot"] is True
    # Numeric: the image's USER is a name, which the kubelet cannot check against runAsNonRoot.
    assert security["runAsUser"] == dockerfile_uid()
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(pre_stop[1]) + options.grace_seconds
    assert pod_spec["terminationGracePeriodSeconds"] > drain, "SIGKILL before the drain ends"


def test_deployment_ports_probes_and_mounts_follow_the_server_flags(overlay):
    name, resources = overlay
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    options = parse_server(server_argv(container))
    check_pod(pod, container, options, "grpc")
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["metrics"] == options.metrics_port
    assert options.metrics_host == "0.0.0.0", "Prometheus scrapes the pod's IP"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    models = mounts[str(options.model_repository)]
    assert models["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == models["name"])
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert one(resources, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert container["image"] == f"gradcam:{name}"


def test_overlay_devices_and_threads(overlay):
    name, resources = overlay
    pod = one(resources, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    options = parse_server(server_argv(container))
    resources_ = container["resources"]
    assert resources_["requests"]["memory"] == resources_["limits"]["memory"]
    if name == "gpu":
        assert options.device == "cuda"
        assert resources_["limits"]["nvidia.com/gpu"] == "1"
        assert resources_["requests"]["nvidia.com/gpu"] == "1"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
            pod["tolerations"])
    else:
        assert options.device == "cpu"
        assert "nvidia.com/gpu" not in resources_["limits"]
        cores = int(resources_["limits"]["cpu"])
        assert resources_["requests"]["cpu"] == resources_["limits"]["cpu"]
        # os.cpu_count() and onnxruntime see the node's cores, not the pod's limit.
        assert options.threads == cores and options.cpu_threads == cores
    assert options.cpu_threads == int(resources_["requests"]["cpu"])


def test_services_and_scraping_reach_the_server_ports(overlay):
    _, resources = overlay
    deployment = one(resources, "Deployment")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    options = parse_server(server_argv(container))
    container_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    labels = pod["metadata"]["labels"]
    services = [r for r in resources if r["kind"] == "Service"]
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert container_ports[port["targetPort"]] == port["port"]
        grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert container_ports[grpc_port["targetPort"]] == options.port
        assert grpc_port["appProtocol"] == "kubernetes.io/h2c"
    monitor = one(resources, "ServiceMonitor")
    scraped = [s for s in services
               if monitor["spec"]["selector"]["matchLabels"].items()
               <= s["metadata"]["labels"].items()]
    endpoint = monitor["spec"]["endpoints"][0]
    metrics_ports = [port for service in scraped for port in service["spec"]["ports"]
                     if port["name"] == endpoint["port"]]
    assert len(metrics_ports) == 1, "one Service port is scraped"
    assert container_ports[metrics_ports[0]["targetPort"]] == options.metrics_port
    assert endpoint["path"] == "/metrics"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(options.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    pdb = one(resources, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = one(resources, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]
    assert "replicas" not in deployment["spec"], "the HPA owns the count; apply would reset it"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == identity(deployment)


# -- scaling on queue time -----------------------------------------------------------------------


def exported_samples() -> set[str]:
    """Every sample name the server's metrics can have, each labelled metric observed once."""
    metrics = Metrics()
    metrics.queue_time.labels("m").observe(0.01)
    metrics.latency.labels("m", "kserve").observe(0.01)
    metrics.run_time.labels("m", "forward").observe(0.01)
    metrics.batch_size.labels("m", "forward").observe(1)
    return {sample.name for family in metrics.registry.collect() for sample in family.samples}


def adapter_rule(metric: str) -> dict:
    config = yaml.safe_load(documents(ADAPTER_RULES)[0]["data"]["config.yaml"])
    rules = [rule for rule in config["rules"] if rule["name"]["as"] == metric]
    assert len(rules) == 1, f"one adapter rule names {metric}"
    return rules[0]


@pytest.mark.parametrize("hpa_source", ["kustomize", "kserve"])
def test_hpa_scales_on_the_servers_queue_time(hpa_source):
    """The HPA's pods metric is served by an adapter rule built only from samples that the
    server's metrics.py exports, from its queue-time histogram, per pod."""
    if hpa_source == "kustomize":
        hpa = one(render(KUSTOMIZE / "overlays" / "cpu"), "HorizontalPodAutoscaler")
    else:
        hpa = documents(KSERVE / "hpa.yaml")[0]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    rule = adapter_rule(metric["pods"]["metric"]["name"])
    samples = exported_samples()
    queried = set(re.findall(r"gradcam_\w+", rule["seriesQuery"] + rule["metricsQuery"]))
    assert queried <= samples, f"not exported: {sorted(queried - samples)}"
    assert queried == {"gradcam_queue_duration_seconds_sum", "gradcam_queue_duration_seconds_count"}
    assert re.fullmatch(rule["name"]["matches"], rule["seriesQuery"].split("{")[0])
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "100m"}


# -- CRDs: ServiceMonitor and KServe --------------------------------------------------------------

_LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {"matchLabels": {"type": "object",
                                   "additionalProperties": {"type": "string"}},
                   "matchExpressions": {"type": "array"}},
}
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                          r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
SERVICE_MONITOR_SCHEMA = {  # monitoring.coreos.com/v1, the fields used here
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"}, "path": {"type": "string"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": _DURATION, "scrapeTimeout": _DURATION,
                        "honorLabels": {"type": "boolean"},
                    },
                }},
            },
        },
    },
}


def test_service_monitor_matches_the_operator_schema(overlay):
    monitor = one(overlay[1], "ServiceMonitor")
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    metadata = {"kind": "ConfigMap", "apiVersion": "v1", "metadata": monitor["metadata"]}
    kubernetes_valid(metadata, KUBERNETES_VERSIONS[-1])
    endpoint = monitor["spec"]["endpoints"][0]
    assert int(endpoint["scrapeTimeout"][:-1]) < int(endpoint["interval"][:-1])


# The JSON field names of KServe's API types, from the kserve 0.21.0 SDK (kserve/models/*.py,
# `attribute_map`), with their types: a KServe type (checked field by field), `k8s` (checked
# with kubernetes-validate where it sits in a Pod), or a scalar.
KSERVE_FIELDS: dict[str, dict[str, str]] = {
    "ServingRuntime": {"apiVersion": "str", "kind": "str", "metadata": "k8s",
                       "spec": "ServingRuntimeSpec", "status": "object"},
    "ServingRuntimeSpec": {
        "affinity": "k8s", "annotations": "dict", "builtInAdapter": "object",
        "containers": "k8s", "disabled": "bool", "grpcDataEndpoint": "str",
        "grpcEndpoint": "str", "hostIPC": "bool", "httpDataEndpoint": "str",
        "imagePullSecrets": "k8s", "labels": "dict", "multiModel": "bool",
        "nodeSelector": "dict", "protocolVersions": "list", "replicas": "int",
        "resourceClaims": "k8s", "schedulerName": "str", "storageHelper": "object",
        "supportedModelFormats": "list[SupportedModelFormat]", "tolerations": "k8s",
        "volumes": "k8s", "workerSpec": "object",
    },
    "SupportedModelFormat": {"autoSelect": "bool", "name": "str", "priority": "int",
                             "version": "str"},
    "InferenceService": {"apiVersion": "str", "kind": "str", "metadata": "k8s",
                         "spec": "InferenceServiceSpec", "status": "object"},
    "InferenceServiceSpec": {"canary": "object", "explainer": "object",
                             "predictor": "PredictorSpec", "tracing": "object",
                             "transformer": "object"},
    # A PredictorSpec is a PodSpec (its Kubernetes fields) plus these KServe fields:
    "PredictorSpec": {
        "annotations": "dict", "autoScaling": "object", "batcher": "object",
        "canaryTrafficPercent": "int", "containerConcurrency": "int",
        "deploymentStrategy": "object", "huggingface": "object", "labels": "dict",
        "lightgbm": "object", "logger": "object", "maxReplicas": "int", "minReplicas": "int",
        "name": "str",
        "model": "ModelSpec", "onnx": "object", "paddle": "object", "pmml": "object",
        "pytorch": "object", "scaleMetric": "str", "scaleMetricType": "str",
        "scaleTarget": "int", "serviceAccount": "str", "sklearn": "object",
        "storageContainerName": "str", "storageUris": "list", "tensorflow": "object",
        "timeout": "int", "triton": "object", "workerSpec": "object", "xgboost": "object",
    },
    # A ModelSpec is a Container (its Kubernetes fields) plus these KServe fields:
    "ModelSpec": {"confidential": "object", "modelFormat": "ModelFormat",
                  "protocolVersion": "str", "runtime": "str", "runtimeVersion": "str",
                  "storage": "object", "storageUri": "str"},
    "ModelFormat": {"name": "str", "version": "str"},
}
# The Kubernetes fields of KServe 0.21.0's PredictorSpec (its SDK's attribute_map less the
# KServe fields above): the PodSpec fields it embeds.
PREDICTOR_POD_FIELDS = {
    "activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "containers",
    "dnsConfig", "dnsPolicy", "enableServiceLinks", "ephemeralContainers", "hostAliases",
    "hostIPC", "hostNetwork", "hostPID", "hostUsers", "hostname", "hostnameOverride",
    "imagePullSecrets", "initContainers", "nodeName", "nodeSelector", "os", "overhead",
    "preemptionPolicy", "priority", "priorityClassName", "readinessGates", "resourceClaims",
    "resources", "restartPolicy", "runtimeClassName", "schedulerName", "schedulingGates",
    "schedulingGroup", "securityContext", "serviceAccountName", "setHostnameAsFQDN",
    "shareProcessNamespace", "subdomain", "terminationGracePeriodSeconds", "tolerations",
    "topologySpreadConstraints", "volumes",
}
PROTOCOL_VERSIONS = {"v1", "v2", "grpc-v1", "grpc-v2"}  # the SDK's documented values
_SCALARS = {"str": str, "int": int, "bool": bool, "dict": dict, "list": list, "object": dict}


def check_kserve(value: dict, type_name: str, where: str, pod_parts: dict) -> None:
    """Field names and scalar types of a KServe object; Kubernetes-typed parts are collected
    into `pod_parts` (a Pod's spec) for kubernetes-validate."""
    fields = KSERVE_FIELDS[type_name]
    for name, item in value.items():
        if type_name == "PredictorSpec" and name in PREDICTOR_POD_FIELDS:
            pod_parts["spec"][name] = item
            continue
        if type_name == "ModelSpec" and name not in fields:
            pod_parts["container"][name] = item  # refused there if not a Container field
            continue
        assert name in fields, f"{where}: KServe's {type_name} has no field {name!r}"
        kind = fields[name]
        if kind == "k8s" and name == "metadata":
            pod_parts["metadata"] = item
        elif kind == "k8s":
            pod_parts["spec"][name] = item
        elif kind.startswith("list[") and kind[5:-1] in KSERVE_FIELDS:
            for index, element in enumerate(item):
                check_kserve(element, kind[5:-1], f"{where}.{name}[{index}]", pod_parts)
        elif kind in KSERVE_FIELDS:
            check_kserve(item, kind, f"{where}.{name}", pod_parts)
        else:
            assert isinstance(item, _SCALARS[kind]), f"{where}.{name} is not a {kind}"


def as_pod(pod_parts: dict) -> dict:
    spec = dict(pod_parts["spec"])
    if pod_parts["container"]:
        spec.setdefault("containers", []).append({"name": "kserve-container",
                                                  **pod_parts["container"]})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": pod_parts["metadata"], "spec": spec}


def kserve_pod(resource: dict) -> dict:
    """Check `resource`'s KServe fields; return its Kubernetes parts assembled as a Pod."""
    parts: dict = {"metadata": {}, "spec": {}, "container": {}}
    check_kserve(resource, resource["kind"], resource["kind"], parts)
    return as_pod(parts)


SERVING_RUNTIME = KSERVE / "servingruntime.yaml"
INFERENCE_SERVICES = (KSERVE / "inferenceservice.yaml", KSERVE / "inferenceservice-pvc.yaml")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", [SERVING_RUNTIME, *INFERENCE_SERVICES], ids=lambda p: p.name)
def test_kserve_objects_use_kserve_fields_and_valid_kubernetes_parts(path, version):
    [resource] = documents(path)
    assert resource["apiVersion"] == {
        "ServingRuntime": "serving.kserve.io/v1alpha1",
        "InferenceService": "serving.kserve.io/v1beta1",
    }[resource["kind"]]
    kubernetes_valid(kserve_pod(resource), version)


def test_kserve_field_check_can_fail():
    [runtime] = documents(SERVING_RUNTIME)
    runtime["spec"]["protocolVersion"] = ["grpc-v2"]  # the InferenceService's spelling
    with pytest.raises(AssertionError, match="no field 'protocolVersion'"):
        kserve_pod(runtime)
    [service] = documents(INFERENCE_SERVICES[0])
    service["spec"]["predictor"]["model"]["storageURI"] = "s3://x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_valid(kserve_pod(service), KUBERNETES_VERSIONS[-1])


def kserve_container(service: dict) -> tuple[dict, dict]:
    """The predictor container KServe runs for `service`: the runtime's container merged with
    the model spec's Container fields (strategic merge; args appended, as KServe does), and
    the runtime."""
    [runtime] = documents(SERVING_RUNTIME)
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    [base] = runtime["spec"]["containers"]
    overrides = {k: v for k, v in model.items() if k not in KSERVE_FIELDS["ModelSpec"]}
    merged = strategic_merge(base, {k: v for k, v in overrides.items() if k != "args"})
    merged["args"] = [*base.get("args", []), *overrides.get("args", [])]
    return merged, runtime


@pytest.mark.parametrize("path", INFERENCE_SERVICES, ids=lambda p: p.name)
def test_kserve_predictor_runs_the_server_on_mnt_models(path):
    [service] = documents(path)
    container, runtime = kserve_container(service)
    spec = runtime["spec"]
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}
    assert model["protocolVersion"] in spec["protocolVersions"] == ["grpc-v2"]
    assert set(spec["protocolVersions"]) <= PROTOCOL_VERSIONS
    assert container["name"] == "kserve-container"
    options = parse_server(container["command"] + container["args"])
    assert str(options.model_repository) == "/mnt/models", "where KServe puts storageUri"
    assert model["storageUri"].split("://")[0] in {"s3", "gs", "pvc"}
    pod = {**service["spec"]["predictor"], "volumes": spec["volumes"]}
    pod.pop("model")
    check_pod(pod, container, options, "h2c")
    assert [port["name"] for port in container["ports"]] == ["h2c"], "KServe's gRPC port name"
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(options.metrics_port)
    assert spec["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    assert options.metrics_host == "0.0.0.0"
    assert options.device == "cuda"
    limits = container["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    annotations = service["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert annotations["serving.kserve.io/autoscalerClass"] == "external"
    hpa = documents(KSERVE / "hpa.yaml")[0]
    if path == INFERENCE_SERVICES[0]:
        assert hpa["spec"]["scaleTargetRef"]["name"] == f"{service['metadata']['name']}-predictor"
        assert hpa["spec"]["minReplicas"] == service["spec"]["predictor"]["minReplicas"]
        assert hpa["spec"]["maxReplicas"] == service["spec"]["predictor"]["maxReplicas"]


def test_kserve_image_is_the_gpu_build():
    [runtime] = documents(SERVING_RUNTIME)
    entrypoint, _ = dockerfile_command()
    [container] = runtime["spec"]["containers"]
    assert container["image"] == "gradcam:gpu"
    assert container["command"] == entrypoint[:1]


# -- the Deployment's command, run ---------------------------------------------------------------


def tiny_classifier(folder: Path) -> None:
    """conv-relu-global average pool-gemm on 3 x 8 x 8 images, 4 classes."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), "fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["features"]),
        helper.make_node("GlobalAveragePool", ["features"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                      ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    folder.mkdir(parents=True)
    onnx.save(model, folder / "model.onnx")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_deployment_command_serves_probes_and_metrics(tmp_path):
    """The CPU overlay's command line, run as a process (the model repository and the two
    ports moved to a temporary folder and free ports): the kubelet's gRPC probe (service "")
    turns SERVING, the metrics endpoint on the pod address serves the queue-time histogram the
    HPA reads once a request has queued, and SIGTERM drains and exits 0."""
    container = one(render(KUSTOMIZE / "overlays" / "cpu"), "Deployment")[
        "spec"]["template"]["spec"]["containers"][0]
    argv = server_argv(container)
    options = parse_server(argv)
    grpc_port, metrics_port = free_port(), free_port()
    moved = {str(options.model_repository): str(tmp_path / "models"),
             str(options.port): str(grpc_port), str(options.metrics_port): str(metrics_port)}
    tiny_classifier(tmp_path / "models" / "tiny")
    command = [sys.executable, "-m", "gradcam_server", *(moved.get(w, w) for w in argv[1:])]
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status, deadline = None, time.monotonic() + 60
            while status != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline and process.poll() is None, (
                    (tmp_path / "server.log").read_text())
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                except grpc.RpcError:
                    time.sleep(0.1)
            image = np.zeros((1, 3, 8, 8), np.float32)
            request = pb.ModelInferRequest(model_name="tiny")
            request.inputs.add(name="input", datatype="FP32", shape=image.shape)
            request.raw_input_contents.append(image.tobytes())
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=10) as response:
            text = response.read().decode()
        samples = {(s.name, s.labels.get("model")): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        assert samples[("gradcam_queue_duration_seconds_count", "tiny")] == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(options.grace_seconds + 10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
