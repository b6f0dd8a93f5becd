"""The real nodes: build Jobs and serving pods run as containers on two architectures, and a rollout
decides per class on real pods.

Real parts: the test bed's control plane; its real node (kubelet, kube-proxy, containerd, runc, CNI
bridge) and its arm64 node beside it (its own kubelet and containerd built for arm64, run under
qemu-user-static: tests/testbed/node_arm64.py), each running the runtime image built for its own
architecture from images/runtime-cpu/Dockerfile; Debian's docker-registry on the node's address holding
the models and the engines; the operator as a process. Nothing plays a kubelet here: one EdgeModel selects
both real classes, `edgemodel build` runs in one Job per architecture and reports through its
termination message, `edgemodel serve` runs in each class's pods, stable pods mirror to their class's
candidate Service through kube-proxy, and the operator decides per class from the stable pods' /metrics.
A client loop sends live requests to the EdgeModel's Service (its cluster IP, routed to both classes'
pods) all along.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgemodel_runtime.build import oci
from edgemodel_runtime.digests import sha256_file
from tests import onnx_models
from tests.helpers import LiveRequests, eventually, get, post_json
from tests.integration.operators import OperatorProcess
from tests.testbed.cluster import Testbed
from tests.testbed.node import AMD64, LABEL, NODE_IP, TOLERATION, NodeSpec, RealNode, trust_registry
from tests.testbed.node_arm64 import ARM64_NODE, Arm64Node
from tests.testbed.registry import Registry

pytestmark = pytest.mark.testbed
NAME = "clf"
PORT = 8080
MIN_REQUESTS, MIN_AGREEMENT = 30, 0.99
ROLLOUT = {
    "shadow": {"mirrorPercent": 100, "minRequests": MIN_REQUESTS, "duration": "3s"},
    # Agreement and errors decide here; containers on two shared cores, one class emulated, are timed too
    # unevenly for latency.
    "analysis": {"minAgreement": MIN_AGREEMENT, "maxLatencyRatio": 50, "maxErrorRate": 0.05},
}
NODES: dict[str, NodeSpec] = {"amd64": AMD64, "arm64": ARM64_NODE}
# The test bed's setting for emulation: an arm64 build and an arm64 server's start take tens of seconds.
TIMEOUT = 600
CLEANUP = 240  # old pods and Jobs going: no emulated program has to start for it (and pytest's limit is 600 s a test)


def _input(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(1, 16)).astype(np.float32)


def _body(seed: int) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                   "data": _input(seed).ravel().tolist()}]}).encode()  # fmt: skip


@dataclass
class Scene:
    bed: Testbed
    namespace: str
    registry: Registry
    images: dict[str, str]
    models: dict[str, Path]
    uris: dict[str, str] = field(default_factory=dict)
    clients: LiveRequests | None = None


@pytest.fixture(scope="module")
def scene(
    crd: Testbed, tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch
) -> Iterator[Scene]:
    directory = tmp_path_factory.mktemp("real-node")
    namespace = f"real-{os.getpid()}"
    # Undone in the reverse order, each step even when an earlier one fails: the live clients, the operator, the
    # namespace (while the kubelets still run, so that their pods finish and nothing stays Terminating), the
    # registry, the arm64 node, the amd64 node (its kube-proxy routes Services for both, its sysctls serve both).
    with contextlib.ExitStack() as undo:
        for node in (RealNode(crd), Arm64Node(crd)):
            timings = node.start()  # a start that fails leaves nothing of its node running
            undo.callback(node.teardown)
            print(f"[{node.spec.name}] started: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
        registry = Registry(directory / "registry", host=NODE_IP)
        registry.start()
        undo.callback(registry.stop)
        trust_registry(crd, registry.address)  # the kubelets pull the engines, which are images too
        # The test pushes the models over plain HTTP, as the pods pull them.
        monkeypatch_module.setenv("EDGEMODEL_INSECURE_REGISTRIES", registry.address)
        stable = onnx_models.tiny_classifier(directory / "a.onnx", seed=0)
        again = onnx.load(str(stable))
        again.doc_string = "re-exported: the same graph and weights, another digest"
        onnx.save(again, str(directory / "a-again.onnx"))
        models = {"a": stable, "a-again": directory / "a-again.onnx",
                  "b": onnx_models.tiny_classifier(directory / "b.onnx", seed=7)}  # fmt: skip
        crd.kubectl("create", "namespace", namespace)
        undo.callback(crd.kubectl, "delete", "namespace", namespace, "--ignore-not-found", "--timeout=120s",
                      check=False, timeout=150)  # fmt: skip
        crd.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
        scene = Scene(crd, namespace, registry, crd.state()["images"], models)
        for case, path in models.items():
            digest = oci.push(oci.parse_reference(f"{registry.address}/models/{NAME}"), [path], case, {})
            scene.uris[case] = f"oci://{registry.address}/models/{NAME}@{digest}"
        operator = OperatorProcess(crd, directory / "operator.log", settings={
            "image_cpu": scene.images["runtime-cpu"], "registry": f"{registry.address}/engines",
            "registry_insecure": "true", "analysis_seconds": "1",
            "namespaces": json.dumps([namespace]),
        })  # fmt: skip
        operator.start()
        undo.callback(operator.stop)
        undo.callback(_stop_clients, scene)
        yield scene


def _stop_clients(scene: Scene) -> None:
    if scene.clients is not None:
        scene.clients.stop.set()
        scene.clients.join(10)
        print(f"[real nodes] {scene.clients.sent} live requests, {len(scene.clients.failed)} failed "
              f"{scene.clients.failed[:3]}")  # fmt: skip


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _apply(scene: Scene, case: str) -> None:
    edgemodel = {
        "apiVersion": "edgeml.dev/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": NAME, "namespace": scene.namespace},
        "spec": {
            "model": {"uri": scene.uris[case], "sha256": sha256_file(scene.models[case])},
            "inputs": [{"name": "x", "shape": [1, 16], "dtype": "float32"}],
            # Both real nodes carry the label: one class per architecture.
            "targets": {"nodeSelector": {LABEL: "true"}, "tolerations": [TOLERATION]},
            "serving": {"port": PORT},
            "rollout": ROLLOUT,
        },
    }
    scene.bed.apply_objects([edgemodel])


def _classes(scene: Scene) -> dict[str, dict[str, Any]]:
    """The EdgeModel's class entries by architecture (the first part of a class key)."""
    status = get(scene.bed, "em", NAME, "-n", scene.namespace).get("status") or {}
    return {entry.get("key", "").split("-", 1)[0]: entry for entry in status.get("classes") or []}


def _each(scene: Scene, check: Callable[[dict[str, Any]], bool]) -> dict[str, dict[str, Any]] | None:
    """The class entries when there is one per real node's architecture and `check` holds for each."""
    entries = _classes(scene)
    return entries if set(entries) == set(NODES) and all(check(e) for e in entries.values()) else None


def _pods(scene: Scene, component: str) -> list[dict[str, Any]]:
    listed = get(scene.bed, "pods", "-n", scene.namespace, "-l", f"app.kubernetes.io/component={component}")
    items: list[dict[str, Any]] = listed["items"]
    return items


def _on(pods: list[dict[str, Any]], arch: str) -> list[dict[str, Any]]:
    return [pod for pod in pods if pod["spec"].get("nodeName") == NODES[arch].name]


def _diagnosis(scene: Scene) -> str:
    pods = scene.bed.kubectl("get", "pods", "-n", scene.namespace, "-o", "wide", check=False).stdout
    events = scene.bed.kubectl("get", "events", "-n", scene.namespace, check=False).stdout
    return f"classes: {_classes(scene)}\npods:\n{pods}\nevents:\n{events[-3000:]}"


def _wait(scene: Scene, check: Any, what: str, timeout: float = TIMEOUT) -> Any:
    try:
        return eventually(check, timeout=timeout, what=what, interval=1)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{_diagnosis(scene)}") from error


def _expected(model: Path, seed: int) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    outputs: list[np.ndarray] = session.run(None, {"x": _input(seed)})
    return outputs[0]


def _answers_as_onnx_runtime(url: str, model: Path, seed: int) -> None:
    """The server at `url` answers what ONNX Runtime here computes (arm64 kernels differ in the last digits)."""
    status, reply = post_json(f"{url}/v2/models/{NAME}/infer", _body(seed), 60)
    assert status == 200, reply
    expected = _expected(model, seed)
    answer = np.array(reply["outputs"][0]["data"]).reshape(expected.shape)
    np.testing.assert_allclose(answer, expected, rtol=1e-4, atol=1e-5)


def test_a_real_build_job_and_real_serving_pods_on_each_architecture(scene: Scene) -> None:
    _apply(scene, "a")
    entries = _wait(scene, lambda: _each(scene, lambda e: e.get("state") == "Serving"), "both classes serving")
    builds, serving = _pods(scene, "build"), _pods(scene, "serve")
    for arch, spec in NODES.items():
        # One build Job per architecture ran in a container of the runtime image built for it, on its node,
        # validated the engine there and reported through its termination message.
        succeeded = [p for p in _on(builds, arch) if p["status"].get("phase") == "Succeeded"]
        assert len(succeeded) == 1, _diagnosis(scene)
        build = succeeded[0]
        assert build["spec"]["containers"][0]["image"] == scene.images["runtime-cpu"]
        terminated = build["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 0, terminated
        report = json.loads(terminated["message"])
        assert report["status"] == "built", report
        assert report["classKey"] == entries[arch]["key"], (report, entries[arch])
        assert report["artifact"]["reference"].startswith(f"oci://{scene.registry.address}/engines/"), report
        # The full report travels with the engine: the build detected its node's architecture and validated there.
        pulled = {path.name: path for path in oci.pull_files(report["artifact"]["reference"])}
        full = json.loads(pulled["report.json"].read_text())
        assert full["hardware"]["arch"] == arch, full["hardware"]
        assert full["validation"]["verdict"] == "passed", full["validation"]
        metrics = entries[arch].get("metrics") or {}
        assert metrics.get("validation") == "passed", entries[arch]
        assert metrics.get("latencyP50Ms"), entries[arch]
        emulated = " (under emulation: qemu-user-static)" if arch == "arm64" else ""
        print(f"[real nodes] {entries[arch]['key']}{emulated}: build {entries[arch].get('buildSeconds')} s, "
              f"cosine {metrics.get('cosine')}, top-1 {metrics.get('top1Agreement')}, "
              f"p50 {metrics.get('latencyP50Ms')} ms, p99 {metrics.get('latencyP99Ms')} ms")  # fmt: skip
        # Each class's engine serves from a pod of its node, with an address of that node's pod network.
        assert len(_on(serving, arch)) == 1, _diagnosis(scene)
        pod = _on(serving, arch)[0]
        assert pod["status"]["podIP"].startswith(spec.pod_cidr.rsplit(".", 1)[0] + "."), pod["status"]
        _answers_as_onnx_runtime(f"http://{pod['status']['podIP']}:{PORT}", scene.models["a"], 1)
    assert len(serving) == len(NODES), _diagnosis(scene)
    # The EdgeModel's Service answers through kube-proxy, from either class's pod.
    service = get(scene.bed, "service", NAME, "-n", scene.namespace)
    url = f"http://{service['spec']['clusterIP']}:{PORT}"
    for seed in range(1, 5):
        _answers_as_onnx_runtime(url, scene.models["a"], seed)
    scene.bed.kubectl("wait", "-n", scene.namespace, "--for=condition=Ready", f"em/{NAME}", "--timeout=60s")
    scene.clients = LiveRequests(f"{url}/v2/models/{NAME}/infer", _body, pause=0.03)
    scene.clients.start()
    eventually(lambda: scene.clients is not None and scene.clients.served > 20, what="live requests served")


def _decide(scene: Scene, case: str) -> dict[str, dict[str, Any]]:
    """Apply `case` and wait for a fresh decision in every class; the class entries by architecture."""
    generation = get(scene.bed, "em", NAME, "-n", scene.namespace)["metadata"]["generation"]
    # The evidence each stable revision was promoted on.
    earlier = {arch: (entry.get("shadow") or {}).get("revision") for arch, entry in _classes(scene).items()}
    _apply(scene, case)
    _wait(scene, lambda: get(scene.bed, "em", NAME, "-n", scene.namespace)["status"]["observedGeneration"] > generation,
          "the new generation observed")  # fmt: skip

    def decided(arch: str, entry: dict[str, Any]) -> bool:
        shadow = entry.get("shadow") or {}
        fresh = shadow.get("revision") not in {None, earlier.get(arch)}
        return fresh and shadow.get("decision") in {"Promote", "Rollback"}

    def decisions() -> dict[str, dict[str, Any]] | None:
        entries = _classes(scene)
        return entries if set(entries) == set(NODES) and all(decided(a, e) for a, e in entries.items()) else None

    entries: dict[str, dict[str, Any]] = _wait(scene, decisions, f"a decision on {case} in every class")
    for arch, entry in entries.items():
        shadow = entry["shadow"]
        figures = {k: shadow.get(k) for k in ("requests", "agreement", "latencyRatio", "errorRate")}
        print(f"[real nodes] {case} on {arch}: {shadow['decision']}, {figures}: {shadow.get('reason')}")
    return entries


def _no_failed_requests(scene: Scene) -> None:
    assert scene.clients is not None
    assert scene.clients.sent > 0
    assert not scene.clients.failed, scene.clients.failed[:5]


def _events(scene: Scene) -> list[tuple[str, str]]:
    listed = get(scene.bed, "events", "-n", scene.namespace, "--field-selector", f"involvedObject.name={NAME}")
    return [(event.get("reason", ""), event.get("message", "")) for event in listed["items"]]


def _one_stable_pod_per_class(scene: Scene) -> dict[str, dict[str, Any]] | None:
    serving = _pods(scene, "serve")
    per_arch = {arch: _on(serving, arch) for arch in NODES}
    if len(serving) != len(NODES) or any(len(pods) != 1 for pods in per_arch.values()):
        return None
    return {arch: pods[0] for arch, pods in per_arch.items()}


def test_an_agreeing_candidate_is_shadowed_on_real_pods_and_promoted_in_each_class(scene: Scene) -> None:
    before = {arch: entry["revision"] for arch, entry in _classes(scene).items()}
    decided = _decide(scene, "a-again")
    for entry in decided.values():
        assert entry["shadow"]["decision"] == "Promote", entry
        assert entry["shadow"]["agreement"] == 1.0  # same architecture on both sides of each class's shadow
        assert entry["shadow"]["requests"] >= MIN_REQUESTS  # mirrored by the class's stable pod, in its /metrics
    scene.bed.kubectl("wait", "-n", scene.namespace, "--for=condition=Ready", f"em/{NAME}", "--timeout=300s")
    stable = _wait(scene, lambda: _one_stable_pod_per_class(scene), "the old stable pods gone", CLEANUP)
    for arch, pod in stable.items():
        assert pod["metadata"]["labels"]["edgeml.dev/track"] == "stable"
        assert pod["metadata"]["labels"]["edgeml.dev/revision"] != before[arch]
    _wait(scene, lambda: len(_pods(scene, "build")) == len(NODES), "the old revision's build pods gone with their Jobs",
          CLEANUP)  # fmt: skip
    assert {NODES[arch].name for arch in NODES} == {p["spec"]["nodeName"] for p in _pods(scene, "build")}
    events = _events(scene)
    for entry in decided.values():
        for reason in ("CandidateStarted", "ShadowStarted", "Promoted"):
            assert any(r == reason and m.startswith(f"{entry['key']}:") for r, m in events), (reason, events)
    _no_failed_requests(scene)


def test_a_disagreeing_candidate_is_rolled_back_on_real_pods_in_each_class(scene: Scene) -> None:
    stable = {arch: entry["revision"] for arch, entry in _classes(scene).items()}
    decided = _decide(scene, "b")
    for arch, entry in decided.items():
        assert entry["state"] == "RolledBack", entry
        assert entry["shadow"]["agreement"] < MIN_AGREEMENT
        assert entry["revision"] == stable[arch]
    serving = _wait(scene, lambda: _one_stable_pod_per_class(scene), "the candidates' pods gone", CLEANUP)
    for arch, pod in serving.items():
        assert pod["metadata"]["labels"]["edgeml.dev/revision"] == stable[arch]
    events = _events(scene)
    for entry in decided.values():
        assert any(r == "RolledBack" and m.startswith(f"{entry['key']}:") for r, m in events), events
    _no_failed_requests(scene)


def _uids(scene: Scene, kind: str, revisions: set[str] | None = None) -> dict[str, str]:
    """Names and UIDs of `kind` in the scene's namespace (only those of `revisions`, if given)."""
    items = get(scene.bed, kind, "-n", scene.namespace)["items"]
    return {
        item["metadata"]["name"]: item["metadata"]["uid"]
        for item in items
        if revisions is None or item["metadata"].get("labels", {}).get("edgeml.dev/revision") in revisions
    }


def _schedulable(scene: Scene, arch: str, value: bool) -> Callable[[], Any]:
    def check() -> Any:
        entry = _classes(scene).get(arch) or {}
        return entry.get("schedulable") is value and entry.get("state") not in {None, "Absent"} and entry

    return check


def test_a_class_whose_only_node_is_cordoned_or_deleted_and_added_again_keeps_serving_and_builds_nothing(
    scene: Scene,
) -> None:
    """Presence is not schedulability: cordon, uncordon, and the Node deleted and added again (as a node that is
    re-provisioned under its name) leave every Job, Deployment and Service of the class in place, start no
    build, and fail no live request. The Node comes back within the pod garbage collector's 40 s quarantine,
    so the kubelet's pods are not deleted by the cluster either."""
    name = NODES["amd64"].name
    _wait(scene, lambda: _one_stable_pod_per_class(scene), "one stable pod per class", timeout=120)
    stable = {entry["revision"] for entry in _classes(scene).values()}
    kept = {kind: _uids(scene, kind) for kind in ("deployments", "services")}
    kept["jobs"] = _uids(scene, "jobs", stable)
    builds = sum(1 for reason, _ in _events(scene) if reason == "BuildStarted")
    scene.bed.kubectl("cordon", name)
    _wait(scene, _schedulable(scene, "amd64", False), "the cordoned class reported unschedulable", timeout=60)
    scene.bed.kubectl("uncordon", name)
    _wait(scene, _schedulable(scene, "amd64", True), "the class schedulable again", timeout=60)

    node = get(scene.bed, "node", name)
    node["metadata"] = {k: node["metadata"][k] for k in ("name", "labels", "annotations") if k in node["metadata"]}
    node.pop("status", None)
    scene.bed.kubectl("delete", "node", name, "--wait=true")
    scene.bed.apply_objects([node])  # the kubelet reports on it again at its next status update
    _wait(scene, lambda: _node_ready(scene, name), "the node Ready again", timeout=120)
    _wait(scene, _schedulable(scene, "amd64", True), "the class serving on its node again", timeout=120)
    _wait(scene, lambda: _one_stable_pod_per_class(scene), "one stable pod per class", timeout=120)

    after = {kind: _uids(scene, kind) for kind in ("deployments", "services")}
    after["jobs"] = _uids(scene, "jobs", stable)
    assert after == kept  # nothing deleted, nothing recreated
    assert sum(1 for reason, _ in _events(scene) if reason == "BuildStarted") == builds  # no rebuild
    _no_failed_requests(scene)


def _node_ready(scene: Scene, name: str) -> bool:
    found = scene.bed.kubectl("get", "node", name, "-o", "json", check=False)
    if found.returncode != 0:
        return False
    conditions = json.loads(found.stdout).get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
