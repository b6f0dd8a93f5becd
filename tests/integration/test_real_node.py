"""The real node: build Jobs and serving pods run as containers, and a rollout decides on real pods.

Real parts: the test bed's control plane, its real node (kubelet, kube-proxy, containerd, runc,
CNI bridge) running the runtime image built from images/runtime-cpu/Dockerfile, Debian's
docker-registry on the node's address holding the models and the engines, and the operator as a
process. Nothing plays a kubelet here: `edgemodel build` runs in the Job's container and reports
through its termination message, `edgemodel serve` runs in the Deployment's pods, stable pods mirror
to the candidate's Service through kube-proxy, and the operator reads the evidence from the stable
pods' /metrics. A client loop sends live requests to the EdgeModel's Service (its cluster IP) all along.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
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
from tests.testbed.node import LABEL, NODE_IP, NODE_NAME, POD_CIDR, TOLERATION, RealNode
from tests.testbed.registry import Registry

pytestmark = pytest.mark.testbed
NAME = "clf"
PORT = 8080
MIN_REQUESTS, MIN_AGREEMENT = 30, 0.99
ROLLOUT = {
    "shadow": {"mirrorPercent": 100, "minRequests": MIN_REQUESTS, "duration": "3s"},
    # Agreement and errors decide here; two containers on two shared cores are timed too unevenly for latency.
    "analysis": {"minAgreement": MIN_AGREEMENT, "maxLatencyRatio": 50, "maxErrorRate": 0.05},
}


def _body(seed: int) -> bytes:
    data = np.random.default_rng(seed).normal(size=(1, 16)).astype(np.float32)
    return json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                   "data": data.ravel().tolist()}]}).encode()  # fmt: skip


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
    node = RealNode(crd)
    registry = Registry(directory / "registry", host=NODE_IP)
    namespace = f"real-{os.getpid()}"
    operator: OperatorProcess | None = None
    scene: Scene | None = None
    try:
        timings = node.start()
        print(f"[real node] started: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
        registry.start()
        # The test pushes the models over plain HTTP, as the pods pull them.
        monkeypatch_module.setenv("EDGEMODEL_INSECURE_REGISTRIES", registry.address)
        stable = onnx_models.tiny_classifier(directory / "a.onnx", seed=0)
        again = onnx.load(str(stable))
        again.doc_string = "re-exported: the same graph and weights, another digest"
        onnx.save(again, str(directory / "a-again.onnx"))
        models = {"a": stable, "a-again": directory / "a-again.onnx",
                  "b": onnx_models.tiny_classifier(directory / "b.onnx", seed=7)}  # fmt: skip
        crd.kubectl("create", "namespace", namespace)
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
        yield scene
    finally:
        if scene is not None and scene.clients is not None:
            scene.clients.stop.set()
            scene.clients.join(10)
            print(f"[real node] {scene.clients.sent} live requests, {len(scene.clients.failed)} failed "
                  f"{scene.clients.failed[:3]}")  # fmt: skip
        if operator is not None:
            operator.stop()
        # The namespace goes while the kubelet still runs, so that its pods finish and nothing stays Terminating.
        crd.kubectl("delete", "namespace", namespace, "--ignore-not-found", "--timeout=90s", check=False)
        registry.stop()
        node.teardown()


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
            "targets": {"nodeSelector": {LABEL: "true"}, "tolerations": [TOLERATION]},
            "serving": {"port": PORT},
            "rollout": ROLLOUT,
        },
    }
    scene.bed.apply_objects([edgemodel])


def _class(scene: Scene) -> dict[str, Any]:
    status = get(scene.bed, "em", NAME, "-n", scene.namespace).get("status") or {}
    classes: list[dict[str, Any]] = status.get("classes") or [{}]
    return classes[0]


def _pods(scene: Scene, component: str) -> list[dict[str, Any]]:
    listed = get(scene.bed, "pods", "-n", scene.namespace, "-l", f"app.kubernetes.io/component={component}")
    items: list[dict[str, Any]] = listed["items"]
    return items


def _diagnosis(scene: Scene) -> str:
    pods = scene.bed.kubectl("get", "pods", "-n", scene.namespace, "-o", "wide", check=False).stdout
    events = scene.bed.kubectl("get", "events", "-n", scene.namespace, check=False).stdout
    return f"class: {_class(scene)}\npods:\n{pods}\nevents:\n{events[-3000:]}"


def _wait(scene: Scene, check: Any, what: str, timeout: float = 240) -> Any:
    try:
        return eventually(check, timeout=timeout, what=what, interval=1)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{_diagnosis(scene)}") from error


def test_a_real_build_job_and_real_serving_pods(scene: Scene) -> None:
    _apply(scene, "a")
    _wait(scene, lambda: _class(scene).get("state") == "Serving", "the first revision serving")
    # The build ran in a container of the runtime image and reported through its termination message.
    builds = _pods(scene, "build")
    assert builds, _diagnosis(scene)
    build = next((p for p in builds if p["status"].get("phase") == "Succeeded"), builds[0])
    assert build["spec"]["nodeName"] == NODE_NAME
    assert build["spec"]["containers"][0]["image"] == scene.images["runtime-cpu"]
    terminated = build["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0, terminated
    report = json.loads(terminated["message"])
    assert report["status"] == "built", report
    assert report["artifact"]["reference"].startswith(f"oci://{scene.registry.address}/engines/"), report
    # The engine serves from a real pod with an address of the node's pod network.
    (serving,) = _pods(scene, "serve")
    assert serving["spec"]["nodeName"] == NODE_NAME
    assert serving["status"]["podIP"].startswith(POD_CIDR.rsplit(".", 1)[0] + "."), serving["status"]
    # The EdgeModel's Service answers through kube-proxy with what ONNX Runtime computes for the model.
    service = get(scene.bed, "service", NAME, "-n", scene.namespace)
    url = f"http://{service['spec']['clusterIP']}:{PORT}"
    status, reply = post_json(f"{url}/v2/models/{NAME}/infer", _body(1))
    assert status == 200, reply
    session = ort.InferenceSession(str(scene.models["a"]), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": np.random.default_rng(1).normal(size=(1, 16)).astype(np.float32)})[0]
    np.testing.assert_allclose(np.array(reply["outputs"][0]["data"]).reshape(expected.shape), expected, rtol=1e-4)
    scene.bed.kubectl("wait", "-n", scene.namespace, "--for=condition=Ready", f"em/{NAME}", "--timeout=60s")
    scene.clients = LiveRequests(f"{url}/v2/models/{NAME}/infer", _body, pause=0.03)
    scene.clients.start()
    eventually(lambda: scene.clients is not None and scene.clients.served > 20, what="live requests served")


def _decide(scene: Scene, case: str) -> dict[str, Any]:
    generation = get(scene.bed, "em", NAME, "-n", scene.namespace)["metadata"]["generation"]
    earlier = _class(scene).get("shadow", {}).get("revision")  # the evidence the stable revision was promoted on
    _apply(scene, case)
    _wait(scene, lambda: get(scene.bed, "em", NAME, "-n", scene.namespace)["status"]["observedGeneration"] > generation,
          "the new generation observed")  # fmt: skip

    def decision() -> dict[str, Any] | None:
        entry = _class(scene)
        shadow = entry.get("shadow") or {}
        fresh = shadow.get("revision") not in {None, earlier}
        return entry if fresh and shadow.get("decision") in {"Promote", "Rollback"} else None

    decided: dict[str, Any] = _wait(scene, decision, f"a decision on {case}")
    shadow = decided["shadow"]
    figures = {k: shadow.get(k) for k in ("requests", "agreement", "latencyRatio", "errorRate")}
    print(f"[real node] {case}: {shadow['decision']}, {figures}: {shadow.get('reason')}")
    return decided


def _no_failed_requests(scene: Scene) -> None:
    assert scene.clients is not None
    assert scene.clients.sent > 0
    assert not scene.clients.failed, scene.clients.failed[:5]


def test_an_agreeing_candidate_is_shadowed_on_real_pods_and_promoted(scene: Scene) -> None:
    before = _class(scene)["revision"]
    decided = _decide(scene, "a-again")
    assert decided["shadow"]["decision"] == "Promote", decided
    assert decided["shadow"]["agreement"] == 1.0
    assert decided["shadow"]["requests"] >= MIN_REQUESTS  # mirrored by the stable pod, counted in its /metrics
    scene.bed.kubectl("wait", "-n", scene.namespace, "--for=condition=Ready", f"em/{NAME}", "--timeout=120s")
    _wait(scene, lambda: len(_pods(scene, "serve")) == 1, "the old stable pod gone")
    (serving,) = _pods(scene, "serve")
    assert serving["metadata"]["labels"]["edgeml.dev/track"] == "stable"
    assert serving["metadata"]["labels"]["edgeml.dev/revision"] != before
    _wait(scene, lambda: len(_pods(scene, "build")) == 1, "the old revision's build pod gone with its Job")
    events = scene.bed.kubectl("get", "events", "-n", scene.namespace, "--field-selector",
                               f"involvedObject.name={NAME}").stdout  # fmt: skip
    for reason in ("CandidateStarted", "ShadowStarted", "Promoted"):
        assert reason in events, events
    _no_failed_requests(scene)


def test_a_disagreeing_candidate_is_rolled_back_on_real_pods(scene: Scene) -> None:
    stable = _class(scene)["revision"]
    decided = _decide(scene, "b")
    assert decided["state"] == "RolledBack", decided
    assert decided["shadow"]["agreement"] < MIN_AGREEMENT
    assert decided["revision"] == stable
    _wait(scene, lambda: len(_pods(scene, "serve")) == 1, "the candidate's pod gone")
    assert _pods(scene, "serve")[0]["metadata"]["labels"]["edgeml.dev/revision"] == stable
    _no_failed_requests(scene)
