"""The Kubernetes manifests under deploy/k8s render, and every rendered object is a valid Kubernetes API object.

Each overlay is rendered with `kubectl kustomize` (the kustomization files keep to what kubectl 1.20's kustomize
v2.0.3 understands, checked below too) and each object is loaded strictly into the typed models of the `kubernetes`
client 37.0.2, generated from the OpenAPI document of Kubernetes release-1.37: an unknown field, a value of the wrong
type or a missing required field fails. No cluster is needed; what only a cluster checks (that a PVC's storage class
offers ReadWriteMany, that a Prometheus adapter serves the HPA's metric) is not checked here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import models

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
SECRET = "lethe-secrets"

# What kustomize v2.0.3 (kubectl 1.20) reads in a kustomization file; later fields (patches, labels, replacements,
# components) are ignored or refused there.
KUSTOMIZE_V2_FIELDS = {
    "apiVersion", "kind", "bases", "resources", "namespace", "namePrefix", "nameSuffix", "commonLabels",
    "commonAnnotations", "images", "patchesStrategicMerge", "patchesJson6902", "configMapGenerator",
    "secretGenerator", "generatorOptions", "vars", "crds", "configurations",
}


class ManifestError(ValueError):
    """A manifest that is not a valid object of its kind; the message names the field's path."""


# The strict loader: the client's own `ApiClient().deserialize` drops fields it does not know, so it would pass a
# misspelt `livenessprobe` without a word. This walks each dict against the model's `attribute_map` (JSON names) and
# `openapi_types` (type names such as "V1Container", "List[V1EnvVar]", "Dict[str, str]", "int", "object"), then builds
# the model, whose constructor checks required fields and strict types a second time.

_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "bool": (bool,), "float": (int, float),
    "datetime": (str,), "date": (str,), "bytes": (str,), "bytearray": (str,),
}
_LIST = re.compile(r"(?:List|list)\[(.+)\]")
_DICT = re.compile(r"(?:Dict\[str, (.+)\]|dict\(str, (.+)\))")


def model_class(api_version: str, kind: str) -> type:
    """`apps/v1` + `Deployment` → `V1Deployment`, `autoscaling/v2` + `HorizontalPodAutoscaler` → `V2Horizontal…`."""
    version = api_version.rsplit("/", 1)[-1]
    cls = getattr(models, version[:1].upper() + version[1:] + kind, None)
    if cls is None:
        raise ManifestError(f"no model for apiVersion {api_version!r}, kind {kind!r}")
    return cls


def load_object(obj: Any) -> Any:
    """One rendered manifest as its typed model, or a `ManifestError`."""
    if not isinstance(obj, dict) or not isinstance(obj.get("apiVersion"), str) or not isinstance(obj.get("kind"), str):
        raise ManifestError(f"not a Kubernetes object (apiVersion and kind strings): {obj!r:.80}")
    name = obj.get("metadata", {}).get("name", "?")
    return _load_model(model_class(obj["apiVersion"], obj["kind"]), obj, f"{obj['kind']}/{name}")


def _load(type_name: str, value: Any, path: str) -> Any:
    if match := _LIST.fullmatch(type_name):
        if not isinstance(value, list):
            raise ManifestError(f"{path}: expected a list, got {type(value).__name__}")
        return [_load(match[1], item, f"{path}[{i}]") for i, item in enumerate(value)]
    if match := _DICT.fullmatch(type_name):
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise ManifestError(f"{path}: expected a map with string keys, got {type(value).__name__}")
        inner = match[1] or match[2]
        return {key: _load(inner, item, f"{path}.{key}") for key, item in value.items()}
    if type_name == "object":  # IntOrString, free-form JSON: the model's own field type decides
        return value
    if type_name in _PRIMITIVES:
        if isinstance(value, bool) and type_name != "bool" or not isinstance(value, _PRIMITIVES[type_name]):
            raise ManifestError(f"{path}: expected {type_name}, got {type(value).__name__} {value!r:.40}")
        return value
    cls = getattr(models, type_name, None)
    if cls is None:
        raise ManifestError(f"{path}: the client has no type {type_name!r}")
    return _load_model(cls, value, path)


def _load_model(cls: type, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise ManifestError(f"{path}: expected an object ({cls.__name__}), got {type(value).__name__}")
    attribute_of = {json_name: attribute for attribute, json_name in cls.attribute_map.items()}
    unknown = sorted(set(value) - set(attribute_of))
    if unknown:
        raise ManifestError(f"{path}: unknown field(s) {unknown} for {cls.__name__}")
    fields = {
        attribute_of[key]: _load(cls.openapi_types[attribute_of[key]], item, f"{path}.{key}")
        for key, item in value.items()
        if item is not None  # null is how YAML writes an unset field
    }
    try:
        return cls(**fields)
    except (TypeError, ValueError) as error:  # pydantic's ValidationError is a ValueError
        raise ManifestError(f"{path}: {cls.__name__} refuses it: {error}") from error


# Rendering.

def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: these tests render deploy/k8s with `kubectl kustomize` (no cluster "
                    "needed); install it, e.g. `apt-get install kubernetes-client` (kubectl 1.20), as .ci/run does")
    return kubectl


def render(overlay: str) -> list[dict[str, Any]]:
    result = subprocess.run([_kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return obj["spec"]["template"]["spec"]["containers"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {var["name"]: var for var in container.get("env", [])}


# The loader itself: it must be able to fail.

DEPLOYMENT = {
    "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
    "spec": {
        "replicas": 1,
        "selector": {"matchLabels": {"app": "d"}},
        "template": {"metadata": {"labels": {"app": "d"}}, "spec": {"containers": [{
            "name": "c", "image": "lethe",
            "ports": [{"containerPort": 8000}],
            "livenessProbe": {"httpGet": {"path": "/health/live", "port": "http"}},
            "resources": {"limits": {"memory": "1Gi"}},
        }]}},
    },
}


def _deployment_with(edit: Any) -> dict[str, Any]:
    obj = yaml.safe_load(yaml.safe_dump(DEPLOYMENT))
    edit(obj, obj["spec"]["template"]["spec"]["containers"][0])
    return obj


def test_loader_builds_typed_models_for_a_valid_deployment() -> None:
    deployment = load_object(DEPLOYMENT)
    assert isinstance(deployment, models.V1Deployment)
    container = deployment.spec.template.spec.containers[0]
    assert isinstance(container, models.V1Container) and container.liveness_probe.http_get.port == "http"


def test_loader_refuses_an_unknown_field() -> None:
    obj = _deployment_with(lambda _, container: container.update(livenessprobe=container.pop("livenessProbe")))
    with pytest.raises(ManifestError, match=r"containers\[0\]: unknown field\(s\) \['livenessprobe'\]"):
        load_object(obj)


def test_loader_refuses_a_wrong_type() -> None:
    with pytest.raises(ManifestError, match=r"spec\.replicas: expected int, got str"):
        load_object(_deployment_with(lambda obj, _: obj["spec"].update(replicas="2")))
    with pytest.raises(ManifestError, match=r"containerPort: expected int, got bool"):
        load_object(_deployment_with(lambda _, container: container["ports"][0].update(containerPort=True)))
    with pytest.raises(ManifestError, match=r"expected a list"):
        load_object(_deployment_with(lambda _, container: container.update(args="serve")))


def test_loader_refuses_a_missing_required_field_and_an_unknown_kind() -> None:
    with pytest.raises(ManifestError, match=r"containers\[0\]: V1Container refuses it"):
        load_object(_deployment_with(lambda _, container: container.pop("name")))
    with pytest.raises(ManifestError, match="no model"):
        load_object({"apiVersion": "apps/v1", "kind": "Deploymnet", "metadata": {"name": "d"}})


def test_loader_picks_the_model_from_api_version_and_kind() -> None:
    assert model_class("autoscaling/v2", "HorizontalPodAutoscaler") is models.V2HorizontalPodAutoscaler
    assert model_class("policy/v1", "PodDisruptionBudget") is models.V1PodDisruptionBudget
    assert model_class("batch/v1", "Job") is models.V1Job
    assert model_class("v1", "PersistentVolumeClaim") is models.V1PersistentVolumeClaim


# The manifests.

def test_kustomizations_use_only_what_kustomize_v2_0_3_reads() -> None:
    files = sorted(K8S.glob("**/kustomization.yaml"))
    assert {path.parent.relative_to(K8S).as_posix() for path in files} == {"base", "overlays/cpu", "overlays/gpu"}
    for path in files:
        kustomization = yaml.safe_load(path.read_text())
        assert set(kustomization) <= KUSTOMIZE_V2_FIELDS, f"{path}: {set(kustomization) - KUSTOMIZE_V2_FIELDS}"
        for resource in kustomization.get("resources", []):  # v2 takes only files here; directories go in `bases`
            assert (path.parent / resource).is_file(), f"{path}: resource {resource} is not a file"


def test_every_rendered_object_loads_into_the_typed_models(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    kinds = sorted((obj["apiVersion"], obj["kind"]) for obj in objects)
    assert set(kinds) == {
        ("v1", "ConfigMap"), ("v1", "Service"), ("v1", "PersistentVolumeClaim"), ("apps/v1", "Deployment"),
        ("batch/v1", "Job"), ("policy/v1", "PodDisruptionBudget"), ("autoscaling/v2", "HorizontalPodAutoscaler"),
    }
    for obj in objects:
        load_object(obj)
        assert obj["metadata"]["namespace"] == "lethe"


def test_serving_is_probed_drained_and_runs_without_the_embedded_worker(
        rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    serving = one(objects, "Deployment", "lethe-serving")
    pod = serving["spec"]["template"]["spec"]
    for container in containers(serving):
        assert container["args"] == ["serve"]
        assert container["startupProbe"]["httpGet"]["path"] == "/health/live"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
        assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # engine start: minutes on CPU
        env = env_of(container)
        assert env["LETHE_EMBEDDED_WORKER"]["value"] == "false"
        drain = container["lifecycle"]["preStop"]["exec"]["command"]
        assert drain[0] == "sleep"
        # The process exits at most 20 s after LETHE_SHUTDOWN_TIMEOUT_S (README); the grace period counts preStop.
        needed = int(drain[1]) + int(env["LETHE_SHUTDOWN_TIMEOUT_S"]["value"]) + 20
        assert pod["terminationGracePeriodSeconds"] > needed
        assert container["resources"]["requests"] and container["resources"]["limits"]
    annotations = serving["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8000"


def test_pods_run_as_non_root_with_a_read_only_root_filesystem(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    workloads = [obj for obj in objects if obj["kind"] in ("Deployment", "Job")]
    assert len(workloads) == 3
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        for container in containers(workload):
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]]
            if workload["kind"] == "Deployment":
                assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_serving_and_worker_share_the_read_write_many_volumes(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    config = next(obj for obj in objects if obj["kind"] == "ConfigMap")
    assert config["data"]["LETHE_DATA_DIR"] == "/var/lib/lethe/data"
    assert config["data"]["LETHE_CACHE_DIR"] == "/var/lib/lethe/cache"
    claims = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "PersistentVolumeClaim"}
    for name in ("lethe-serving", "lethe-worker"):
        deployment = one(objects, "Deployment", name)
        pod = deployment["spec"]["template"]["spec"]
        claim_of = {volume["name"]: volume["persistentVolumeClaim"]["claimName"]
                    for volume in pod["volumes"] if "persistentVolumeClaim" in volume}
        for container in containers(deployment):
            assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
            mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
            for path in ("/var/lib/lethe/data", "/var/lib/lethe/cache"):
                assert claims[claim_of[mounts[path]]]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_secrets_are_only_referenced(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    assert not [obj for obj in objects if obj["kind"] == "Secret"]
    keys: set[str] = set()
    for workload in (obj for obj in objects if obj["kind"] in ("Deployment", "Job")):
        for container in containers(workload):
            for var in container.get("env", []):
                if "valueFrom" in var:
                    reference = var["valueFrom"]["secretKeyRef"]
                    assert reference["name"] == SECRET
                    keys.add(reference["key"])
                else:
                    assert not re.search(r"KEY|URL|PASSWORD|TOKEN", var["name"]), f"{var['name']} given in clear"
            assert env_of(container)["LETHE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "database-url"
    assert keys == {"database-url", "admin-key", "api-keys", "metrics-key"}


def test_worker_runs_the_job_lanes_and_scales_on_the_queued_jobs(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    worker = one(objects, "Deployment", "lethe-worker")
    assert containers(worker)[0]["args"] == ["worker", "--lanes", "gate,training"]
    autoscalers = [obj for obj in objects if obj["kind"] == "HorizontalPodAutoscaler"]
    assert len(autoscalers) == 1  # serving has none (deploy/k8s/README.md says why)
    hpa = autoscalers[0]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "lethe-worker"}
    [metric] = hpa["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"] == {"name": "lethe_jobs", "selector": {"matchLabels": {"status": "queued"}}}
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]


def test_migration_job_runs_lethe_migrate(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    job = one(objects, "Job", "lethe-migrate")
    [container] = containers(job)
    assert container["args"] == ["migrate"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")


def test_service_and_disruption_budget_select_the_serving_pods(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    serving_labels = one(objects, "Deployment", "lethe-serving")["spec"]["template"]["metadata"]["labels"]
    worker_labels = one(objects, "Deployment", "lethe-worker")["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return selector.items() <= labels.items()

    service = one(objects, "Service", "lethe")
    assert [(port["port"], port["targetPort"]) for port in service["spec"]["ports"]] == [(8000, "http")]
    pdb = one(objects, "PodDisruptionBudget", "lethe-serving")
    for selector in (service["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert selects(selector, serving_labels) and not selects(selector, worker_labels)


def test_overlays_pick_the_image_and_the_accelerator(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, objects = rendered
    for workload in (obj for obj in objects if obj["kind"] in ("Deployment", "Job")):
        assert {container["image"] for container in containers(workload)} == {f"lethe:{overlay}"}
    for name in ("lethe-serving", "lethe-worker"):
        deployment = one(objects, "Deployment", name)
        tolerations = deployment["spec"]["template"]["spec"].get("tolerations", [])
        for container in containers(deployment):
            resources = container["resources"]
            if overlay == "gpu":
                assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
                assert any(toleration["key"] == "nvidia.com/gpu" for toleration in tolerations)
            else:
                assert "nvidia.com/gpu" not in resources["requests"] and not tolerations
                assert resources["limits"]["cpu"]
