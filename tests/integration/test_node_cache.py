"""Offline operation on the real node: engines kept by the node, serving through a registry outage.

Real parts: the test bed's control plane; its real amd64 node (kubelet, containerd 1.6 from Debian, runc,
CNI, kube-proxy), whose containerd pulls from Debian's docker-registry on the node's address over plain
HTTP (tests/testbed/node.py `trust_registry`); the runtime image built from images/runtime-cpu/Dockerfile;
the operator as a process; a namespace that enforces the restricted Pod Security Standard. The registry
is stopped for real (its process ends), and the engine image is removed from the node's containerd with
`ctr images rm`, as the kubelet's image garbage collection would remove it.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgemodel_runtime.build import engineimage, oci
from edgemodel_runtime.digests import sha256_file
from tests import onnx_models
from tests.helpers import LiveRequests, eventually, get
from tests.integration import tiny_edgemodel as tiny
from tests.testbed.cluster import Testbed
from tests.testbed.node import NODE_IP, RealNode, trust_registry
from tests.testbed.registry import Registry

pytestmark = pytest.mark.testbed
NAME = "offline"
PORT = tiny.PORT
TIMEOUT = 300
ROLLOUT = {
    # Long enough a shadow that the registry can be stopped once the candidate's engine is on the node.
    "shadow": {"mirrorPercent": 100, "minRequests": 30, "duration": "40s"},
    "analysis": {"minAgreement": 0.99, "maxLatencyRatio": 50, "maxErrorRate": 0.05},
}


@dataclass
class Scene:
    bed: Testbed
    node: RealNode
    namespace: str
    registry: Registry
    models: dict[str, Path]
    uris: dict[str, str]


@pytest.fixture(scope="module")
def scene(crd: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    directory = tmp_path_factory.mktemp("node-cache")
    namespace = f"offline-{os.getpid()}"
    with contextlib.ExitStack() as undo, pytest.MonkeyPatch.context() as patch:
        node = RealNode(crd)
        node.start()
        undo.callback(node.teardown)
        registry = Registry(directory / "registry", host=NODE_IP)
        registry.start()
        undo.callback(registry.stop)
        trust_registry(crd, registry.address)
        patch.setenv("EDGEMODEL_INSECURE_REGISTRIES", registry.address)
        stable = onnx_models.tiny_classifier(directory / "a.onnx", seed=0)
        models, uris = tiny.pushed_twice(registry.address, NAME, stable)
        tiny.start_operator(crd, directory, namespace, registry.address, undo)
        yield Scene(crd, node, namespace, registry, models, uris)


def _apply(scene: Scene, case: str) -> None:
    tiny.apply(scene.bed, scene.namespace, NAME, scene.uris[case], scene.models[case], rollout=ROLLOUT)


def _answers(url: str, model: Path, seed: int = 1) -> None:
    tiny.check_answer(url, NAME, model, seed, rtol=1e-5)


def _entry(scene: Scene) -> dict[str, Any]:
    return tiny.class_entry(scene.bed, scene.namespace, NAME)


def _pods(scene: Scene) -> list[dict[str, Any]]:
    return tiny.live_pods(scene.bed, scene.namespace, "serve")


def _pod_events(scene: Scene, pod: str) -> list[dict[str, Any]]:
    return tiny.pod_events(scene.bed, scene.namespace, pod)


def _diagnosis(scene: Scene) -> str:
    pods = scene.bed.kubectl("get", "pods", "-n", scene.namespace, "-o", "wide", check=False).stdout
    events = scene.bed.kubectl("get", "events", "-n", scene.namespace, check=False).stdout
    return f"class: {_entry(scene)}\npods:\n{pods}\nevents:\n{events[-4000:]}"


def _wait(scene: Scene, check: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    try:
        return eventually(check, timeout=timeout, what=what, interval=1)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{_diagnosis(scene)}") from error


def _one_ready_pod(scene: Scene, other_than: set[str] = frozenset()) -> dict[str, Any] | None:  # type: ignore[assignment]
    pods = [p for p in _pods(scene) if p["metadata"]["uid"] not in other_than]
    return pods[0] if len(pods) == 1 and tiny.ready(pods[0]) and len(_pods(scene)) == 1 else None


def _registry_down(scene: Scene) -> None:
    scene.registry.stop()
    with pytest.raises(OSError, match="refused"):
        urllib.request.urlopen(f"http://{scene.registry.address}/v2/", timeout=2)


def test_a_serving_pod_deleted_while_the_registry_is_down_comes_back_from_the_nodes_cache(scene: Scene) -> None:
    _apply(scene, "a")
    _wait(scene, lambda: _entry(scene).get("state") == "Serving", "the class serving")
    pod = _wait(scene, lambda: _one_ready_pod(scene), "one Ready serving pod")
    artifact = _entry(scene)["artifactDigest"]
    # The engine came to the node as an image, pinned by digest, pulled only when absent.
    (init,) = pod["spec"]["initContainers"]
    assert init["image"] == artifact.removeprefix("oci://"), (init, artifact)
    assert "@sha256:" in init["image"]
    assert init["imagePullPolicy"] == "IfNotPresent"
    assert pod["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0

    _registry_down(scene)
    scene.bed.kubectl("delete", "pod", "-n", scene.namespace, pod["metadata"]["name"], "--wait=false")
    again = _wait(scene, lambda: _one_ready_pod(scene, {pod["metadata"]["uid"]}), "a new serving pod Ready")
    _answers(f"http://{again['status']['podIP']}:{PORT}", scene.models["a"])
    pulled = [e["message"] for e in _pod_events(scene, again["metadata"]["name"]) if e["reason"] == "Pulled"]
    assert any(init["image"] in m and "already present on machine" in m for m in pulled), pulled
    assert again["status"]["containerStatuses"][0]["restartCount"] == 0


def _engine_refs(scene: Scene, digest: str) -> list[str]:
    """The names the node's containerd keeps the engine image under (its manifest `digest`)."""
    listed = scene.node.ctr("images", "ls").stdout.splitlines()[1:]
    return [line.split()[0] for line in listed if digest in line.split()[2:3] or line.split()[0].endswith(digest)]


def test_with_neither_the_image_on_the_node_nor_the_registry_the_pod_waits_with_a_reason_and_backs_off(
    scene: Scene,
) -> None:
    pod = _wait(scene, lambda: _one_ready_pod(scene), "one Ready serving pod")
    image = pod["spec"]["initContainers"][0]["image"]
    digest = image.rsplit("@", 1)[1]
    refs = _engine_refs(scene, digest)
    assert refs, scene.node.ctr("images", "ls").stdout
    scene.node.ctr("images", "rm", *refs)  # what the kubelet's image garbage collection does under disk pressure
    assert not _engine_refs(scene, digest)
    scene.bed.kubectl("delete", "pod", "-n", scene.namespace, pod["metadata"]["name"], "--wait=false")

    def waiting() -> dict[str, Any] | None:
        pods = [p for p in _pods(scene) if p["metadata"]["uid"] != pod["metadata"]["uid"]]
        statuses = (pods[0].get("status", {}).get("initContainerStatuses") or []) if pods else []
        state = (statuses[0].get("state") or {}).get("waiting") or {} if statuses else {}
        return pods[0] if state.get("reason") == "ImagePullBackOff" else None

    waiter = _wait(scene, waiting, "the new pod waiting for its engine image, backing off", timeout=120)
    name = waiter["metadata"]["name"]
    state = waiter["status"]["initContainerStatuses"][0]["state"]["waiting"]
    assert image in state.get("message", ""), state
    assert "\n" not in state["message"], state
    eventually(lambda: _failed_pulls(scene, name) >= 2, timeout=120, what="a second pull attempt", interval=2)
    events = _pod_events(scene, name)
    failed = [e["message"] for e in events if e["reason"] == "Failed"]
    assert any(scene.registry.address in m and "\n" not in m and "Traceback" not in m for m in failed), failed
    assert any(e["reason"] == "BackOff" and "Back-off pulling image" in e["message"] for e in events), events
    # Nothing crash-loops: the server never started, so it neither restarted nor printed a traceback.
    serve = get(scene.bed, "pod", "-n", scene.namespace, name)["status"]["containerStatuses"][0]
    assert serve["restartCount"] == 0, serve
    assert serve["state"].get("waiting", {}).get("reason") == "PodInitializing", serve
    attempts = _failed_pulls(scene, name)
    assert attempts <= 6, f"{attempts} pull attempts: the kubelet should back off (10 s, 20 s, 40 s, ...)"

    scene.registry.start()  # the link is back: the next attempt pulls, and the pod serves
    back = _wait(scene, lambda: _one_ready_pod(scene, {pod["metadata"]["uid"]}), "the waiting pod Ready", 420)
    assert back["metadata"]["name"] == name
    _answers(f"http://{back['status']['podIP']}:{PORT}", scene.models["a"])


def _failed_pulls(scene: Scene, pod: str) -> int:
    """How many pulls of the pod's images failed (the kubelet's Events, counted as it aggregates them)."""
    events = _pod_events(scene, pod)
    return sum(int(e.get("count") or 1) for e in events if e["reason"] == "Failed" and "pull" in e["message"])


def test_a_candidate_whose_engine_is_on_the_node_is_shadowed_and_promoted_with_the_registry_down(
    scene: Scene,
) -> None:
    pod = _wait(scene, lambda: _one_ready_pod(scene), "one Ready serving pod")
    before = _entry(scene)["revision"]
    service = get(scene.bed, "service", NAME, "-n", scene.namespace)
    url = f"http://{service['spec']['clusterIP']}:{PORT}"
    clients = LiveRequests(f"{url}/v2/models/{NAME}/infer", tiny.body, pause=0.05)
    clients.start()
    try:
        _apply(scene, "a-again")

        def prefetched() -> dict[str, Any] | None:
            """The new revision's pull DaemonSet, once its pod on the node runs the engine image."""
            for pull in _pulls(scene):
                status = pull.get("status") or {}
                fresh = pull["metadata"]["labels"]["edgeml.dev/revision"] != before
                if fresh and status.get("desiredNumberScheduled") == status.get("numberReady") == 1:
                    return dict(pull)
            return None

        pull = _wait(scene, prefetched, "the candidate's engine on every node of the class")
        _registry_down(scene)
        assert pull["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] == "IfNotPresent"
        _wait(scene, lambda: (_entry(scene).get("shadow") or {}).get("decision") == "Promote", "promoted")
        promoted = _wait(
            scene,
            lambda: (
                (p := _one_ready_pod(scene, {pod["metadata"]["uid"]}))
                and p["metadata"]["labels"]["edgeml.dev/revision"] != before
                and p
            ),
            "the new stable pod alone",
        )
        _answers(f"http://{promoted['status']['podIP']}:{PORT}", scene.models["a-again"])
        pulled = [e["message"] for e in _pod_events(scene, promoted["metadata"]["name"]) if e["reason"] == "Pulled"]
        assert any("already present on machine" in m for m in pulled), pulled
        _wait(scene, lambda: not any(d["metadata"]["labels"]["edgeml.dev/revision"] == before for d in _pulls(scene)),
              "the old revision's pull DaemonSet gone with its workload")  # fmt: skip
    finally:
        clients.stop.set()
        clients.join(10)
        scene.registry.start()
    assert not clients.failed, clients.failed[:5]


def _pulls(scene: Scene) -> list[dict[str, Any]]:
    """The EdgeModel's pull DaemonSets (see operator/edgemodel_operator/prefetch.py)."""
    listed = get(scene.bed, "daemonsets", "-n", scene.namespace, "-l", "app.kubernetes.io/component=prefetch")
    items: list[dict[str, Any]] = listed["items"]
    return items


def _snapshot_copies(scene: Scene, engine: dict[str, bytes]) -> list[Path]:
    """The files of the node's unpacked engine images (containerd's overlay snapshots) that hold `engine`'s
    files (name -> bytes): what the serving pods' init container copies from."""
    snapshots = scene.node.containerd_root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
    return [
        path
        for path in snapshots.glob(f"*/fs/{engineimage.ENGINE_DIR}/*")
        if path.name in engine and path.stat().st_size == len(engine[path.name])
        and path.read_bytes() == engine[path.name]
    ]  # fmt: skip


def _ready_body(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/v2/models/{NAME}/ready", timeout=10) as response:
        body: dict[str, Any] = json.loads(response.read())
    return body


def _degraded(scene: Scene) -> dict[str, Any]:
    status = get(scene.bed, "em", NAME, "-n", scene.namespace).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == "Degraded"), {})


def test_an_engine_damaged_on_the_node_falls_back_to_the_model_the_image_carries_and_the_edgemodel_says_so(
    scene: Scene,
) -> None:
    """The node's copy of the serving engine is damaged on disk (same size, other bytes: a bad disk), and
    the registry is down: a new serving pod cannot load its engine, serves the original model that the
    engine image's fallback layer brought onto the node, and the EdgeModel is Degraded (EngineFallback).
    Once the registry is back, the operator's rebuild of the class is served, and the condition clears."""
    pod = _wait(scene, lambda: _one_ready_pod(scene), "one Ready serving pod")
    artifact = pod["spec"]["containers"][0]["args"][1]
    model = scene.models["a-again"]  # the EdgeModel's model since the promotion above
    # The engine file itself (its report is left as it is, so that the damage is what only a digest tells).
    engine = {p.name: p.read_bytes() for p in oci.pull_files(artifact.removeprefix("oci://")) if p.suffix == ".onnx"}
    copies = _snapshot_copies(scene, engine)
    assert copies, f"no unpacked copy of {artifact} under {scene.node.containerd_root}"
    originals = {path: path.read_bytes() for path in copies}
    try:
        for path in copies:
            data = bytearray(originals[path])
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
        _registry_down(scene)
        scene.bed.kubectl("delete", "pod", "-n", scene.namespace, pod["metadata"]["name"], "--wait=false")
        fallen = _wait(scene, lambda: _one_ready_pod(scene, {pod["metadata"]["uid"]}), "a new serving pod Ready")
        url = f"http://{fallen['status']['podIP']}:{PORT}"
        detail = _ready_body(url)["edgemodel"]
        assert detail["engine"] == "fallback", detail
        assert detail["fallbackReason"] == "DigestMismatch", detail
        assert detail["fallbackModel"] == f"sha256:{sha256_file(model)}", detail
        _answers(url, model)  # the original model's answers, with neither the engine nor the registry
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert any(line.startswith("edgemodel_engine_fallback{") and 'reason="DigestMismatch"' in line
                   and line.endswith(" 1.0") for line in metrics.splitlines()), metrics  # fmt: skip
        assert fallen["status"]["containerStatuses"][0]["restartCount"] == 0
        log = scene.bed.kubectl("logs", "-n", scene.namespace, fallen["metadata"]["name"], "-c", "serve").stdout
        assert "EngineFallback" in log, log
        assert "Traceback" not in log, log
        degraded = _wait(
            scene,
            lambda: (c := _degraded(scene)).get("status") == "True" and c.get("reason") == "EngineFallback" and c,
            "the EdgeModel Degraded with reason EngineFallback",
            timeout=180,
        )
        assert "DigestMismatch" in degraded["message"], degraded

        # The link is back: the operator's rebuild (Event Rebuilding) runs, and its engine (a new digest: the
        # report it carries is new) rolls the serving pods (Event ServingRebuilt), which serve it again.
        scene.registry.start()
        rebuilt = _wait(
            scene,
            lambda: (
                (p := _one_ready_pod(scene, {fallen["metadata"]["uid"]}))
                and p["spec"]["containers"][0]["args"][1] != artifact
                and p
            ),
            "a serving pod on the rebuilt engine alone",
            timeout=600,
        )
        url = f"http://{rebuilt['status']['podIP']}:{PORT}"
        assert "edgemodel" not in _ready_body(url), "still the fallback"
        _answers(url, model)
        _wait(scene, lambda: _degraded(scene).get("reason") != "EngineFallback", "the EngineFallback condition gone",
              timeout=120)  # fmt: skip
        events = get(scene.bed, "events", "-n", scene.namespace)["items"]
        reasons = {e["reason"] for e in events}
        assert {"Rebuilding", "ServingRebuilt"} <= reasons, [f"{e['reason']}: {e['message']}" for e in events]
    finally:
        for path, kept in originals.items():
            path.write_bytes(kept)
        scene.registry.start()
