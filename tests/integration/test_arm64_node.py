"""The arm64 node: real pods of arm64 images, under emulation, on this amd64 machine.

Real parts: the test bed's control plane; its arm64 node, whose kubelet and containerd are built for
arm64 from the pinned releases and run by qemu-user-static through binfmt_misc (containerd's CRI
plugin takes linux/arm64 as its platform), with Debian's runc and CNI plugins; the runtime image built
for arm64 from images/runtime-cpu/Dockerfile; a registry on the arm64 node's address; the operator as
a process. An EdgeModel for the arm64 class: its build Job builds and validates the engine on arm64,
and a pod of the arm64 node serves it.

The amd64 real node is not needed here (the machine's one amd64 node is shared by other test
sessions); pods are reached by their addresses, since Services are routed by the amd64 node's
kube-proxy (see tests/testbed/node_arm64.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edgemodel_runtime.build import oci
from edgemodel_runtime.digests import sha256_file
from tests import onnx_models
from tests.helpers import eventually, get, post_json
from tests.integration.operators import OperatorProcess
from tests.testbed.cluster import Testbed
from tests.testbed.node import LABEL, TOLERATION
from tests.testbed.node_arm64 import ARM64_NODE, Arm64Node
from tests.testbed.registry import Registry

pytestmark = pytest.mark.testbed
NAME = "clf"
PORT = 8080
# Under emulation a build takes tens of seconds and a server a while to load: the test bed's settings.
TIMEOUT = 600


@dataclass
class Scene:
    bed: Testbed
    namespace: str
    registry: Registry
    images: dict[str, str]
    model: Path
    timings: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def scene(
    crd: Testbed, tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch
) -> Iterator[Scene]:
    directory = tmp_path_factory.mktemp("arm64-node")
    arm64 = Arm64Node(crd)
    registry = Registry(directory / "registry", host=ARM64_NODE.node_ip)
    namespace = f"arm64-{os.getpid()}"
    try:
        timings = arm64.start()
        print(f"[arm64 node] started: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
        registry.start()
        monkeypatch_module.setenv("EDGEMODEL_INSECURE_REGISTRIES", registry.address)
        crd.kubectl("create", "namespace", namespace)
        yield Scene(crd, namespace, registry, crd.state()["images"],
                    onnx_models.tiny_classifier(directory / "a.onnx", seed=0), timings)  # fmt: skip
    finally:
        crd.kubectl("delete", "namespace", namespace, "--ignore-not-found", "--timeout=120s", check=False)
        registry.stop()
        arm64.teardown()


def _node(scene: Scene) -> dict[str, Any]:
    node: dict[str, Any] = get(scene.bed, "node", ARM64_NODE.name)
    return node


def test_the_arm64_node_is_registered_by_its_own_arm64_kubelet(scene: Scene) -> None:
    node = _node(scene)
    info = node["status"]["nodeInfo"]
    assert info["architecture"] == "arm64"  # reported by the kubelet from the architecture it was built for
    assert node["metadata"]["labels"]["kubernetes.io/arch"] == "arm64"
    assert info["containerRuntimeVersion"] == "containerd://1.7.35"
    assert info["kubeletVersion"] == "v1.36.3"
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == ARM64_NODE.node_ip
    labels = node["metadata"]["labels"]
    assert labels["feature.node.kubernetes.io/cpu-cpuid.ASIMD"] == "true"
    assert not any(key.endswith(".AVX2") for key in labels)
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
    assert ready == "True"


def _pod(name: str, image: str, command: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"kubernetes.io/arch": "arm64", LABEL: "true"},
            "tolerations": [TOLERATION],
            "containers": [{"name": "main", "image": image, "command": command}],
        },
    }


def test_a_pod_of_the_arm64_runtime_image_runs_onnx_runtime_on_arm64(scene: Scene) -> None:
    script = (
        "import json, platform, onnxruntime as ort\n"
        "print(json.dumps({'machine': platform.machine(), 'providers': ort.get_available_providers(),"
        " 'cpuinfo': open('/proc/cpuinfo').read().count('CPU implementer')}))"
    )
    pod = _pod("probe", scene.images["runtime-cpu"], ["python3", "-c", script])
    scene.bed.apply_objects([pod | {"metadata": {"name": "probe", "namespace": scene.namespace}}])
    eventually(
        lambda: get(scene.bed, "pod", "probe", "-n", scene.namespace)["status"].get("phase") in {"Succeeded", "Failed"},
        timeout=TIMEOUT, what="the probe pod finished", interval=2,
    )  # fmt: skip
    finished = get(scene.bed, "pod", "probe", "-n", scene.namespace)
    logs = scene.bed.kubectl("logs", "probe", "-n", scene.namespace).stdout
    assert finished["status"]["phase"] == "Succeeded", (finished["status"], logs)
    assert finished["spec"]["nodeName"] == ARM64_NODE.name
    reported = json.loads(logs.strip().splitlines()[-1])
    assert reported["machine"] == "aarch64"
    assert "CPUExecutionProvider" in reported["providers"]
    assert reported["cpuinfo"] == os.cpu_count()  # the arm64 /proc/cpuinfo the node binds, one entry per CPU


def _class_entries(scene: Scene) -> dict[str, dict[str, Any]]:
    status = get(scene.bed, "em", NAME, "-n", scene.namespace).get("status") or {}
    return {entry.get("key", ""): entry for entry in status.get("classes") or []}


def _serving(scene: Scene) -> dict[str, dict[str, Any]] | None:
    entries = _class_entries(scene)
    return entries if entries and all(c.get("state") == "Serving" for c in entries.values()) else None


def test_an_edgemodel_for_the_arm64_class_is_built_validated_and_served_on_arm64(scene: Scene) -> None:
    digest = oci.push(oci.parse_reference(f"{scene.registry.address}/models/{NAME}"), [scene.model], "a", {})
    operator = OperatorProcess(scene.bed, scene.model.parent / "operator.log", settings={
        "image_cpu": scene.images["runtime-cpu"], "registry": f"{scene.registry.address}/engines",
        "registry_insecure": "true", "analysis_seconds": "1",
        "namespaces": json.dumps([scene.namespace]),
    })  # fmt: skip
    operator.start()
    try:
        scene.bed.apply_objects([{
            "apiVersion": "edgeml.dev/v1alpha1", "kind": "EdgeModel",
            "metadata": {"name": NAME, "namespace": scene.namespace},
            "spec": {
                "model": {"uri": f"oci://{scene.registry.address}/models/{NAME}@{digest}",
                          "sha256": sha256_file(scene.model)},
                "inputs": [{"name": "x", "shape": [1, 16], "dtype": "float32"}],
                "targets": {"nodeSelector": {LABEL: "true", "kubernetes.io/arch": "arm64"},
                            "tolerations": [TOLERATION]},
                "serving": {"port": PORT},
            },
        }])  # fmt: skip
        entries = eventually(lambda: _serving(scene), timeout=TIMEOUT, what="the arm64 class serving", interval=2)
    finally:
        operator.stop()
    assert [key.split("-", 1)[0] for key in entries] == ["arm64"], entries
    builds = get(scene.bed, "pods", "-n", scene.namespace, "-l", "app.kubernetes.io/component=build")["items"]
    (build,) = [p for p in builds if p["status"].get("phase") == "Succeeded"]
    assert build["spec"]["nodeName"] == ARM64_NODE.name
    terminated = build["status"]["containerStatuses"][0]["state"]["terminated"]
    report = json.loads(terminated["message"])
    assert report["status"] == "built", report
    print(f"[arm64 node] build report: {json.dumps(report)[:800]}")
    for key, entry in entries.items():  # build seconds, validation and latency, all measured under emulation
        print(f"[arm64 node] {key}: build {entry.get('buildSeconds')}s, metrics {json.dumps(entry.get('metrics'))}")
        assert entry.get("metrics"), entry
    serving = get(scene.bed, "pods", "-n", scene.namespace, "-l", "app.kubernetes.io/component=serve")["items"]
    (arm64_pod,) = [p for p in serving if p["spec"]["nodeName"] == ARM64_NODE.name]
    assert arm64_pod["status"]["podIP"].startswith("10.89.0."), arm64_pod["status"]
    data = np.random.default_rng(1).normal(size=(1, 16)).astype(np.float32)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                   "data": data.ravel().tolist()}]}).encode()  # fmt: skip
    status, reply = post_json(f"http://{arm64_pod['status']['podIP']}:{PORT}/v2/models/{NAME}/infer", body, 60)
    assert status == 200, reply
    session = ort.InferenceSession(str(scene.model), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": data})[0]
    np.testing.assert_allclose(np.array(reply["outputs"][0]["data"]).reshape(expected.shape), expected, rtol=1e-4,
                               atol=1e-5)  # fmt: skip
