"""Pure desired-state builders: EdgeModel + hardware class -> build Job, serving Deployment, Service.

No I/O, no clock, no randomness: each function returns a plain dict that tests compare whole.
Every pod is built to the restricted Pod Security Standard.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from edgemodel_operator.api.resource import API_VERSION, KIND
from edgemodel_operator.api.spec import EdgeModelSpec, EngineTarget
from edgemodel_operator.classes import GPU_TOLERATION, HardwareClass
from edgemodel_operator.enginecache import copy_init_container

LABEL_EDGEMODEL = "edgeml.dev/edgemodel"
LABEL_REVISION = "edgeml.dev/revision"
LABEL_CLASS = "edgeml.dev/class"
LABEL_COMPONENT = "app.kubernetes.io/component"
# Which serving pods take live traffic (the EdgeModel's Service selects track=stable) and which only
# receive mirrored copies. Not part of any workload's selector, so promotion can change it.
LABEL_TRACK = "edgeml.dev/track"
# On a serving workload: the EdgeModel spec its revision was built from (JSON), so that a class that
# is new during a rollout can be given that revision first, as the other classes have it.
ANNOTATION_SPEC = "edgeml.dev/spec"
SHADOW_DIR = "/etc/edgemodel/shadow"
MANAGED_BY = {"app.kubernetes.io/managed-by": "edgemodel", "app.kubernetes.io/name": "edgemodel"}
RUN_AS_USER = 65532
PRESTOP_SECONDS = 5
PROBE_SECONDS = 5
STARTUP_SECONDS = 600  # how long a serving container may take to answer at all before it is restarted
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - inside the pod's own network namespace, reached through its Service


@dataclass(frozen=True)
class Images:
    """Runtime images per kind of class, and where build artifacts are pushed."""

    cpu: str = "ghcr.io/edgemodel/runtime-cpu:0.1.0"
    cuda: str = "ghcr.io/edgemodel/runtime-cuda:0.1.0"
    jetson: str = "ghcr.io/edgemodel/runtime-jetson:0.1.0"
    registry: str = "registry.edgemodel-system.svc:5000/engines"
    builder_version: str = "0.1.0"
    registry_insecure: bool = False  # plain HTTP to `registry`, as to an in-cluster registry without TLS
    node_cache: bool = True  # serving pods take the engine from the node's image store (see enginecache)
    # Pull each serving revision's engine onto every node of its class, a candidate's before it starts (see
    # prefetch); off here, on in the operator's settings (a planner without a cluster has no nodes to pull to).
    prefetch: bool = False
    prefetch_timeout: float = 600.0  # seconds a candidate waits for its engine on every node

    def for_class(self, hardware: HardwareClass) -> str:
        if hardware.accelerator == "nvidia-orin":
            return self.jetson
        return self.cuda if hardware.has_gpu else self.cpu

    def env(self) -> list[dict[str, str]]:
        """What the runtime in build and serving pods needs to know about the registry."""
        if not self.registry_insecure:
            return []
        host = self.registry.removeprefix("oci://").split("/", 1)[0]
        return [{"name": "EDGEMODEL_INSECURE_REGISTRIES", "value": host}]


def _hash(value: Any, length: int) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:length]


def revision_of(spec: EdgeModelSpec) -> str:
    """A hash of the spec parts that change the engines (not serving or rollout settings)."""
    relevant = spec.model_dump(by_alias=True, exclude_none=True, include={"model", "inputs", "targets", "validation"})
    return _hash(relevant, 10)


def cache_key(spec: EdgeModelSpec, target: EngineTarget, hardware: HardwareClass, images: Images) -> str:
    """sha256(model digest, engine, precision, class key, builder version, build options)."""
    options: dict[str, Any] = {
        "inputs": [i.model_dump(by_alias=True) for i in spec.inputs or []],
        "quantization": target.quantization,
        "calibration": target.calibration.sha256 if target.calibration else None,
        "calibrationMethod": target.calibration_method,
        **({"int8MinSpeedup": target.int8_min_speedup} if target.int8_min_speedup is not None else {}),
    }
    if "auto" in (target.engine, target.precision):  # what the choice is judged on decides the engine too
        validation = spec.validation
        options["auto"] = {
            "tolerance": validation.tolerance.model_dump(by_alias=True, exclude_none=True)
            if validation and validation.tolerance
            else None,
            "reference": validation.reference.sha256 if validation and validation.reference else None,
        }
    material = [spec.model.sha256, target.engine, target.precision, hardware.key, images.builder_version, options]
    return _hash(material, 64)


def child_name(edgemodel: str, revision: str, hardware: HardwareClass) -> str:
    """<edgemodel>-<revision>-<class>: at most 40 + 1 + 8 + 1 + 8 = 58 characters."""
    return f"{edgemodel}-{revision[:8]}-{hardware.key[-8:]}"


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    metadata = body["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": metadata["name"],
        "uid": metadata["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _labels(body: dict[str, Any], revision: str, hardware: HardwareClass, component: str) -> dict[str, str]:
    return {
        **MANAGED_BY,
        LABEL_COMPONENT: component,
        LABEL_EDGEMODEL: body["metadata"]["name"],
        LABEL_REVISION: revision,
        LABEL_CLASS: hardware.key,
    }


RESTRICTED_POD = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS_USER,
    "runAsGroup": RUN_AS_USER,
    "fsGroup": RUN_AS_USER,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _build_args(spec: EdgeModelSpec, target: EngineTarget, hardware: HardwareClass, push: str) -> list[str]:
    args = ["build", "--model", spec.model.uri, "--sha256", spec.model.sha256, "--engine", target.engine,
            "--precision", target.precision, "--class-key", hardware.key, "--output", "/work/engine",
            "--push", push, "--termination-log", "/dev/termination-log"]  # fmt: skip
    for tensor in spec.inputs or []:
        args += ["--input", f"{tensor.name}={'x'.join(map(str, tensor.shape))}"]
    if target.quantization:
        args += ["--quantization", target.quantization]
    if target.calibration:
        args += ["--calibration", target.calibration.uri, "--calibration-sha256", target.calibration.sha256]
    if target.calibration_method:
        args += ["--calibration-method", target.calibration_method]
    if target.int8_min_speedup is not None:
        args += ["--int8-min-speedup", repr(target.int8_min_speedup)]
    validation = spec.validation
    if validation and validation.reference:
        args += ["--reference", validation.reference.uri, "--reference-sha256", validation.reference.sha256]
    tolerance = validation.tolerance if validation else None
    if tolerance:
        limits = tolerance.model_dump(by_alias=True, exclude_none=True)
        if limits:
            args += ["--tolerance", ",".join(f"{k}={v}" for k, v in sorted(limits.items()))]
    if validation and validation.latency_budget:
        args += ["--latency-budget-ms", str(validation.latency_budget.p99_ms)]
    return args


def tolerations_for(spec: EdgeModelSpec, hardware: HardwareClass) -> list[dict[str, Any]]:
    """spec.targets.tolerations, plus the NVIDIA GPU taint on GPU classes."""
    chosen = spec.targets.tolerations if spec.targets and spec.targets.tolerations else []
    listed = [t.model_dump(exclude_none=True) for t in chosen]
    return [*listed, GPU_TOLERATION] if hardware.has_gpu else listed


def _node_selector(spec: EdgeModelSpec, hardware: HardwareClass) -> dict[str, str]:
    """The class's labels, plus spec.targets.nodeSelector: pods stay on the nodes the user chose."""
    chosen = dict(spec.targets.node_selector or {}) if spec.targets else {}
    return chosen | dict(hardware.node_selector)


def build_job_for_class(
    body: dict[str, Any], hardware: HardwareClass, target: EngineTarget, revision: str, images: Images
) -> dict[str, Any]:
    """The Job that builds, validates and publishes the engine of one class for one revision."""
    spec = EdgeModelSpec.model_validate(body["spec"])
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    labels = _labels(body, revision, hardware, "build")
    resources: dict[str, Any] = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}
    if target.engine == "tensorrt":
        resources["limits"]["nvidia.com/gpu"] = "1"
    push = f"oci://{images.registry}/{namespace}/{name}"
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": child_name(name, revision, hardware),
            "namespace": namespace,
            "labels": labels,
            "annotations": {"edgeml.dev/cache-key": cache_key(spec, target, hardware, images)},
            "ownerReferences": [owner_reference(body)],
        },
        "spec": {
            "backoffLimit": 2,
            "activeDeadlineSeconds": 3600,
            # Bad input (2) and a failed validation (3) will fail again: only infrastructure errors retry.
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": "build", "operator": "In", "values": [2, 3]},
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": _node_selector(spec, hardware),
                    "tolerations": tolerations_for(spec, hardware),
                    "securityContext": RESTRICTED_POD,
                    "automountServiceAccountToken": False,
                    "containers": [
                        {
                            "name": "build",
                            "image": images.for_class(hardware),
                            "args": _build_args(spec, target, hardware, push),
                            "env": images.env(),
                            "securityContext": RESTRICTED_CONTAINER,
                            "resources": resources,
                            "terminationMessagePolicy": "File",
                            "volumeMounts": [
                                {"name": "work", "mountPath": "/work"},
                                {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - an emptyDir, private to the pod
                            ],
                        }
                    ],
                    "volumes": [{"name": "work", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }


def shadow_configmap_name(edgemodel: str) -> str:
    return f"{edgemodel}-shadow"


def shadow_key(revision: str, hardware: HardwareClass) -> str:
    """The shadow ConfigMap key that pods of `revision` on `hardware` read their mirroring from."""
    return f"{revision}-{hardware.key}.json"


def candidate_url(body: dict[str, Any], revision: str, hardware: HardwareClass, cluster_ip: str | None = None) -> str:
    """In-cluster URL of one revision's pods of one class: its own Service, by cluster IP where known.

    The cluster IP keeps mirroring independent of cluster DNS (an edge cluster may run without one);
    a Service's cluster IP never changes while it exists.
    """
    spec = EdgeModelSpec.model_validate(body["spec"])
    name = child_name(body["metadata"]["name"], revision, hardware)
    if cluster_ip and cluster_ip != "None":
        host = f"[{cluster_ip}]" if ":" in cluster_ip else cluster_ip  # an IPv6 cluster IP in a URL
    else:
        host = f"{name}.{body['metadata']['namespace']}.svc"
    return f"http://{host}:{spec.serving.port}"


def build_shadow_entry(body: dict[str, Any], revision: str, hardware: HardwareClass, cluster_ip: str | None) -> str:
    """The shadow ConfigMap value that makes stable pods of `hardware` mirror to candidate `revision`.

    JSON of {url, mirrorPercent, candidateRevision, agreement}, as `edgemodel serve --shadow-config` reads it.
    """
    spec = EdgeModelSpec.model_validate(body["spec"])
    entry = {
        "url": candidate_url(body, revision, hardware, cluster_ip),
        "mirrorPercent": spec.rollout.shadow.mirror_percent,
        "candidateRevision": revision,
        "agreement": spec.rollout.analysis.agreement.runtime_config(),
    }
    return json.dumps(entry, sort_keys=True)


def build_deployment_for_class(
    body: dict[str, Any],
    hardware: HardwareClass,
    target: EngineTarget,
    *,
    revision: str,
    artifact: str,
    images: Images,
    track: str = "stable",
) -> dict[str, Any]:
    """The Deployment (or DaemonSet, in that serving mode) serving one class's engine by digest.

    Its pods read their mirroring from the EdgeModel's shadow ConfigMap (key `shadow_key`), which
    the operator fills while a candidate of the class is shadowed: no restart to start or stop.
    """
    spec = EdgeModelSpec.model_validate(body["spec"])
    name = body["metadata"]["name"]
    labels = {**_labels(body, revision, hardware, "serve"), LABEL_TRACK: track}
    serving = spec.serving
    port = serving.port
    resources = serving.resources.model_dump(exclude_none=True) if serving.resources else {}
    if target.engine == "tensorrt":
        resources.setdefault("limits", {})["nvidia.com/gpu"] = "1"
    probe = {"httpGet": {"port": port}, "periodSeconds": PROBE_SECONDS}
    container = {
        "name": "serve",
        "image": images.for_class(hardware),
        "args": [
            "serve",
            artifact,
            "--name",
            name,
            "--host",
            ALL_INTERFACES,
            "--port",
            str(port),
            "--revision",
            revision,
            "--shadow-config",
            f"{SHADOW_DIR}/{shadow_key(revision, hardware)}",
            # The original model, pinned by digest: served on ONNX Runtime FP32 (CPU) if the engine cannot load.
            "--fallback-model",
            spec.model.uri,
            "--fallback-sha256",
            spec.model.sha256,
        ],
        "env": [{"name": "EDGEMODEL_ARTIFACT_CACHE", "value": "/cache"}, *images.env()],
        "ports": [{"name": "http", "containerPort": port}],
        "readinessProbe": {**probe, "httpGet": {"path": "/v2/health/ready", "port": port}},
        "livenessProbe": {**probe, "httpGet": {"path": "/v2/health/live", "port": port}, "failureThreshold": 6},
        # Loading a large engine (or pulling one again, or fetching the fallback) may take minutes: liveness
        # is checked only once the server has answered, for up to STARTUP_SECONDS.
        "startupProbe": {
            **probe,
            "httpGet": {"path": "/v2/health/live", "port": port},
            "failureThreshold": STARTUP_SECONDS // PROBE_SECONDS,
        },
        "securityContext": RESTRICTED_CONTAINER,
        "resources": resources,
        "terminationMessagePolicy": "FallbackToLogsOnError",  # the server's one-line refusal, when it exits
        # A deleted pod leaves its Service's endpoints a moment after it is told to stop: it keeps
        # serving that long, so that no client (and no mirror) is sent to a closed port.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SECONDS}}},
        "volumeMounts": [
            {"name": "cache", "mountPath": "/cache"},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - an emptyDir
            {"name": "shadow", "mountPath": SHADOW_DIR, "readOnly": True},
        ],
    }
    daemonset = serving.mode == "DaemonSet"
    workload_spec: dict[str, Any] = (
        {"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}}
        if daemonset
        else {
            "replicas": serving.replicas_per_class or 1,
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        }
    )
    shadow_volume = {"name": "shadow", "configMap": {"name": shadow_configmap_name(name), "optional": True}}
    copier = copy_init_container(artifact, RESTRICTED_CONTAINER, spec.model.sha256) if images.node_cache else None
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet" if daemonset else "Deployment",
        "metadata": {
            "name": child_name(name, revision, hardware),
            "namespace": body["metadata"]["namespace"],
            "labels": labels,
            "annotations": {ANNOTATION_SPEC: json.dumps(body["spec"], sort_keys=True, separators=(",", ":"))},
            "ownerReferences": [owner_reference(body)],
        },
        "spec": {
            **workload_spec,
            "selector": {"matchLabels": {LABEL_EDGEMODEL: name, LABEL_REVISION: revision, LABEL_CLASS: hardware.key}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": _node_selector(spec, hardware),
                    "tolerations": tolerations_for(spec, hardware),
                    "securityContext": RESTRICTED_POD,
                    "automountServiceAccountToken": False,
                    **({"initContainers": [copier]} if copier else {}),
                    "containers": [container],
                    "volumes": [{"name": "cache", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}, shadow_volume],
                },
            },
        },
    }


def _service(body: dict[str, Any], name: str, labels: dict[str, str], selector: dict[str, str]) -> dict[str, Any]:
    spec = EdgeModelSpec.model_validate(body["spec"])
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": body["metadata"]["namespace"],
            "labels": labels,
            "ownerReferences": [owner_reference(body)],
        },
        "spec": {
            "selector": selector,
            "ports": [{"name": "http", "port": spec.serving.port, "targetPort": "http"}],
        },
    }


def build_revision_service(body: dict[str, Any], revision: str, hardware: HardwareClass) -> dict[str, Any]:
    """A Service for one revision's pods of one class: where stable pods mirror a candidate's copies."""
    name = body["metadata"]["name"]
    selector = {LABEL_EDGEMODEL: name, LABEL_REVISION: revision, LABEL_CLASS: hardware.key, LABEL_COMPONENT: "serve"}
    return _service(body, child_name(name, revision, hardware), _labels(body, revision, hardware, "serve"), selector)


def build_shadow_configmap(body: dict[str, Any], data: dict[str, str]) -> dict[str, Any]:
    """The EdgeModel's shadow ConfigMap: one key per stable (revision, class) that mirrors now."""
    name = body["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": shadow_configmap_name(name),
            "namespace": body["metadata"]["namespace"],
            "labels": {**MANAGED_BY, LABEL_EDGEMODEL: name, LABEL_COMPONENT: "shadow"},
            "ownerReferences": [owner_reference(body)],
        },
        "data": dict(data),
    }


def build_service(body: dict[str, Any]) -> dict[str, Any]:
    """One Service per EdgeModel, across every class's stable serving pods."""
    name = body["metadata"]["name"]
    selector = {LABEL_EDGEMODEL: name, LABEL_COMPONENT: "serve", LABEL_TRACK: "stable"}
    return _service(body, name, {**MANAGED_BY, LABEL_EDGEMODEL: name}, selector)
