"""The arm64 node: real pods of arm64 images, under emulation, on this amd64 machine.

Real parts: the test bed's control plane; its arm64 node, whose kubelet and containerd are built for
arm64 from the pinned releases and run by qemu-user-static through binfmt_misc (containerd's CRI
plugin takes linux/arm64 as its platform), with Debian's runc and CNI plugins; the runtime image built
for arm64 from images/runtime-cpu/Dockerfile, whose ONNX Runtime runs in a pod of the arm64 node.

The amd64 real node is not needed here (the machine's one amd64 node is shared by other test
sessions); pods are reached by their addresses, since Services are routed by the amd64 node's
kube-proxy (see tests/testbed/node_arm64.py). An EdgeModel's arm64 class (its build Job, validation
on arm64, serving pods, shadow and decision) runs in tests/integration/test_real_node.py, beside the
amd64 class of the same EdgeModel.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.helpers import eventually, get
from tests.testbed.cluster import Testbed
from tests.testbed.node import LABEL, TOLERATION
from tests.testbed.node_arm64 import ARM64_NODE, Arm64Node

pytestmark = pytest.mark.testbed
# Under emulation a pod's programs start slowly: the test bed's setting.
TIMEOUT = 600


@dataclass
class Scene:
    bed: Testbed
    namespace: str
    images: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def scene(crd: Testbed) -> Iterator[Scene]:
    arm64 = Arm64Node(crd)
    namespace = f"arm64-{os.getpid()}"
    try:
        timings = arm64.start()
        print(f"[arm64 node] started: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
        crd.kubectl("create", "namespace", namespace)
        yield Scene(crd, namespace, crd.state()["images"], timings)
    finally:
        try:
            crd.kubectl("delete", "namespace", namespace, "--ignore-not-found", "--timeout=120s", check=False,
                        timeout=150)  # fmt: skip
        finally:
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
