"""Single-accelerator classes on the test bed: the operator as a process, at its default settings.

The test's own pool holds a Jetson as it ships (one GPU, no time-slicing) and a workstation with two
GPUs, so one EdgeModel has both kinds of GPU class. The real kube-scheduler counts `nvidia.com/gpu`
on the KWOK nodes: on the Jetson the new revision's build pod cannot start while the stable pod holds
the GPU, so the stable pod yields for it, the build runs, and the new revision (autoPromote, the
default) takes the GPU over; the workstation shadows its candidate beside the stable pod as before.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers import eventually, get
from tests.integration.operators import OperatorProcess, Pool, apply_edgemodel, finish_builds, pool_targets
from tests.testbed.cluster import Testbed
from tests.testbed.nodes import JETSON_XAVIER_NX, X86_NVIDIA

pytestmark = pytest.mark.testbed
NAME = "det"


@pytest.fixture(scope="module")
def operator(crd: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    running = OperatorProcess(crd, tmp_path_factory.mktemp("operator") / "operator.log")
    running.start()
    yield crd
    running.stop()
    print(f"[operator] log: {running.log}", file=sys.stderr)


@pytest.fixture
def pool(operator: Testbed, namespace: str) -> Iterator[Pool]:
    nodes = Pool(operator, namespace)
    nodes.add(JETSON_XAVIER_NX)
    nodes.add(X86_NVIDIA)  # two GPUs
    yield nodes
    nodes.remove()


def _classes(bed: Testbed, namespace: str) -> dict[str, dict[str, Any]]:
    status = get(bed, "em", NAME, "-n", namespace).get("status") or {}
    return {("jetson" if c["key"].startswith("arm64") else "workstation"): c for c in status.get("classes") or []}


def _workloads(bed: Testbed, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = get(bed, "deployments", "-n", namespace)["items"]
    return items


def _on(workload: dict[str, Any], which: str) -> bool:
    key: str = workload["metadata"]["labels"]["edgeml.dev/class"]
    return key.startswith("arm64" if which == "jetson" else "amd64")


def _events(bed: Testbed, namespace: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for event in get(bed, "events", "-n", namespace)["items"]:
        found.setdefault(event.get("reason", ""), []).append(event.get("message", ""))
    return found


def test_a_single_gpu_jetson_hands_its_gpu_over_and_a_two_gpu_class_shadows(
    operator: Testbed, namespace: str, pool: Pool
) -> None:
    apply_edgemodel(operator, namespace, NAME, targets=pool_targets(namespace))
    finish_builds(operator, namespace, count=2)
    operator.kubectl("wait", "-n", namespace, "--for=condition=Ready", f"em/{NAME}", "--timeout=90s")
    first = get(operator, "em", NAME, "-n", namespace)["status"]["revisions"]["stable"]
    classes = _classes(operator, namespace)
    assert classes["jetson"]["handoff"]["canShadow"] is False
    assert classes["jetson"]["handoff"]["gpus"] == 1
    assert classes["workstation"]["handoff"]["canShadow"] is True

    apply_edgemodel(operator, namespace, NAME, targets=pool_targets(namespace), digest="0" * 64)

    def stable_yielded() -> Any:  # said at once, not after a deadline
        jetson = _classes(operator, namespace).get("jetson", {})
        old = [w for w in _workloads(operator, namespace) if _on(w, "jetson")]
        stopped = [w for w in old if w["metadata"]["labels"].get("edgeml.dev/yielded") == "class"]
        return "yieldedSince" in jetson.get("handoff", {}) and stopped and stopped[0]["spec"]["replicas"] == 0

    eventually(stable_yielded, timeout=30, what="the Jetson's stable pod yielding for the build")
    status = get(operator, "em", NAME, "-n", namespace)["status"]
    progressing = next(c for c in status["conditions"] if c["type"] == "Progressing")
    assert progressing["reason"] == "CannotShadow"
    assert "1 nvidia.com/gpu on 1 node" in progressing["message"]
    assert "needs 2" in progressing["message"]
    events = _events(operator, namespace)
    assert any("cannot run a candidate beside the stable pods" in m for m in events.get("CannotShadow", []))
    assert events.get("StableYielded")

    # The build gets the GPU the stable pod gave up (the scheduler places it), and both builds finish.
    def jetson_build_running() -> bool:
        pods = get(operator, "pods", "-n", namespace, "-l", "app.kubernetes.io/component=build")["items"]
        running = [p for p in pods if p["status"].get("phase") == "Running" and _on(p, "jetson")]
        stable = [w for w in _workloads(operator, namespace) if _on(w, "jetson")]
        return bool(running) and not any(w["status"].get("readyReplicas") for w in stable)

    eventually(jetson_build_running, timeout=60, what="the Jetson's build running while its stable pod is stopped")
    builds = finish_builds(operator, namespace, count=2)
    assert {p["spec"]["nodeName"] for p in builds} == set(pool.nodes)
    second = get(operator, "em", NAME, "-n", namespace)["status"]["revisions"]["candidate"]
    assert second != first

    def handed_over() -> Any:
        jetson = _classes(operator, namespace).get("jetson", {})
        handoff = jetson.get("handoff", {})
        return jetson.get("state") == "Serving" and "yieldedSince" not in handoff and handoff.get("handoffs") and jetson

    jetson = eventually(handed_over, what="the new revision serving the Jetson")
    assert jetson["revision"] == second
    assert jetson["readyReplicas"] == 1
    unserved = jetson["handoff"]["unservedSeconds"]
    print(f"[handoff] the Jetson was without a ready serving pod for {unserved}s", file=sys.stderr)
    assert 0 < unserved < 120
    assert jetson["message"].startswith("promoted on its build's validation (CannotShadow: 1 nvidia.com/gpu")
    assert "autoPromote" in jetson["message"]
    events = _events(operator, namespace)
    assert any("without a ready serving pod" in m for m in events.get("ServiceRestored", []))
    jetson_workloads = [w for w in _workloads(operator, namespace) if _on(w, "jetson")]
    assert [w["metadata"]["labels"]["edgeml.dev/revision"] for w in jetson_workloads] == [second]

    _shadows_as_before(operator, namespace, first, second)


def _shadows_as_before(operator: Testbed, namespace: str, first: str, second: str) -> None:
    """The workstation's two GPUs hold the candidate beside the stable pod: the normal shadow rollout."""
    workstation = eventually(lambda: (c := _classes(operator, namespace)["workstation"])["state"] == "Shadowing" and c,
                             what="the workstation shadowing")  # fmt: skip
    assert workstation["revision"] == first
    assert "yieldedSince" not in workstation["handoff"]
    assert "handoffs" not in workstation["handoff"]
    labels = [(w["metadata"]["labels"], w["status"].get("readyReplicas")) for w in _workloads(operator, namespace)
              if _on(w, "workstation")]  # fmt: skip
    tracks = {(found["edgeml.dev/revision"], found["edgeml.dev/track"], ready) for found, ready in labels}
    assert tracks == {(first, "stable", 1), (second, "candidate", 1)}


@pytest.fixture
def jetson(operator: Testbed, namespace: str) -> Iterator[Pool]:
    nodes = Pool(operator, namespace)
    nodes.add(JETSON_XAVIER_NX)
    yield nodes
    nodes.remove()


def _stable_back_awaiting_approval(bed: Testbed, namespace: str) -> tuple[str, str]:
    """Serve a first revision on the Jetson, apply a second with autoPromote false, play its build:
    the stable pod comes back and the class waits for a person. The two revisions."""
    targets, rollout = pool_targets(namespace), {"autoPromote": False}
    apply_edgemodel(bed, namespace, NAME, targets=targets, rollout=rollout)
    finish_builds(bed, namespace, count=1)
    bed.kubectl("wait", "-n", namespace, "--for=condition=Ready", f"em/{NAME}", "--timeout=90s")
    first = get(bed, "em", NAME, "-n", namespace)["status"]["revisions"]["stable"]
    apply_edgemodel(bed, namespace, NAME, targets=targets, rollout=rollout, digest="0" * 64)
    finish_builds(bed, namespace, count=1)  # runs only once the stable pod has yielded its GPU

    def back() -> Any:
        jetson = _classes(bed, namespace).get("jetson", {})
        handoff = jetson.get("handoff", {})
        waiting = jetson.get("state") == "Built" and "yieldedSince" not in handoff and handoff.get("handoffs") == 1
        return waiting and jetson.get("readyReplicas") == 1 and jetson

    jetson = eventually(back, what="the stable pod back and the class waiting for approval")
    second = get(bed, "em", NAME, "-n", namespace)["status"]["revisions"]["candidate"]
    assert jetson["revision"] == first
    assert jetson["message"].startswith("CannotShadow: 1 nvidia.com/gpu on 1 node")
    assert f"edgeml.dev/promote={second}" in jetson["message"]
    assert jetson["handoff"]["unservedSeconds"] > 0
    assert [w["metadata"]["labels"]["edgeml.dev/revision"] for w in _workloads(bed, namespace)] == [first]
    return first, second


def test_without_auto_promote_the_stable_pod_comes_back_and_a_rollback_keeps_it(
    operator: Testbed, namespace: str, jetson: Pool
) -> None:
    first, second = _stable_back_awaiting_approval(operator, namespace)
    operator.kubectl("annotate", "em", NAME, "-n", namespace, f"edgeml.dev/rollback={second}")
    rolled_back = eventually(lambda: (c := _classes(operator, namespace)["jetson"])["state"] == "RolledBack" and c,
                             what="the class rolled back")  # fmt: skip
    assert rolled_back["revision"] == first
    assert rolled_back["readyReplicas"] == 1
    assert rolled_back["handoff"]["handoffs"] == 1


def test_without_auto_promote_an_approval_hands_the_gpu_over_again(
    operator: Testbed, namespace: str, jetson: Pool
) -> None:
    _, second = _stable_back_awaiting_approval(operator, namespace)
    before = _classes(operator, namespace)["jetson"]["handoff"]["unservedSeconds"]
    operator.kubectl("annotate", "em", NAME, "-n", namespace, f"edgeml.dev/promote={second}")

    def serving() -> Any:
        found = _classes(operator, namespace)["jetson"]
        return found["state"] == "Serving" and found.get("handoff", {}).get("handoffs") == 2 and found

    found = eventually(serving, what="the approved revision serving after a second handoff")
    assert found["revision"] == second
    assert found["handoff"]["unservedSeconds"] >= before  # to the second: KWOK starts the new pod within one
    assert f"edgeml.dev/promote={second}" in found["message"]
    assert [w["metadata"]["labels"]["edgeml.dev/revision"] for w in _workloads(operator, namespace)] == [second]


def test_a_daemonset_on_two_single_gpu_jetsons_gives_one_node_to_the_build_and_serves_on_the_other(
    operator: Testbed, namespace: str
) -> None:
    nodes = Pool(operator, namespace)
    try:
        first_node = nodes.add(JETSON_XAVIER_NX)["metadata"]["name"]
        other_node = nodes.add(JETSON_XAVIER_NX)["metadata"]["name"]
        spec: dict[str, Any] = {"targets": pool_targets(namespace), "serving": {"mode": "DaemonSet"}}
        apply_edgemodel(operator, namespace, NAME, **spec)
        finish_builds(operator, namespace, count=1)
        operator.kubectl("wait", "-n", namespace, "--for=condition=Ready", f"em/{NAME}", "--timeout=90s")
        apply_edgemodel(operator, namespace, NAME, digest="0" * 64, **spec)

        def serving_pods() -> dict[str, str]:
            pods = get(operator, "pods", "-n", namespace, "-l", "app.kubernetes.io/component=serve")["items"]
            running = [p for p in pods if p["status"].get("phase") == "Running"]
            return {p["spec"].get("nodeName", ""): p["metadata"]["labels"]["edgeml.dev/revision"] for p in running
                    if not p["metadata"].get("deletionTimestamp")}  # fmt: skip

        first = get(operator, "em", NAME, "-n", namespace)["status"]["revisions"]["stable"]

        def build_beside_the_other_node_serving() -> bool:
            pods = get(operator, "pods", "-n", namespace, "-l", "app.kubernetes.io/component=build")["items"]
            building = {p["spec"].get("nodeName") for p in pods if p["status"].get("phase") == "Running"}
            return building == {first_node} and serving_pods() == {other_node: first}

        eventually(build_beside_the_other_node_serving, what="the build on the first node, the other one serving")
        builds = finish_builds(operator, namespace, count=1)
        assert builds[0]["spec"]["nodeName"] == first_node
        events = _events(operator, namespace)
        assert any(f"the stable pod on {first_node} stop" in m for m in events.get("StableYielded", []))

        def handed_over() -> Any:
            jetson = _classes(operator, namespace).get("jetson", {})
            handoff = jetson.get("handoff", {})
            return jetson.get("state") == "Serving" and "yieldedSince" not in handoff and jetson

        jetson = eventually(handed_over, what="the new revision serving both Jetsons")
        assert jetson["revision"] != first
        assert serving_pods() == {first_node: jetson["revision"], other_node: jetson["revision"]}
        assert jetson["handoff"]["handoffs"] == 1
        assert jetson["handoff"]["unservedSeconds"] > 0
    finally:
        nodes.remove()
