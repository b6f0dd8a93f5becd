"""Single-accelerator classes, pure: what a class's GPUs hold at once, and the same-node handoff planned
step by step (the stable pods yield for the build, come back, the time without service is measured)."""

from __future__ import annotations

import copy
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from edgemodel_operator.api.spec import EdgeModelSpec, EngineTarget, HardwareMatch, Serving
from edgemodel_operator.builders import revision_of
from edgemodel_operator.classes import discover
from edgemodel_operator.fallbacks import Fallback
from edgemodel_operator.handoff import LABEL_YIELDED, fit, node_gpus
from edgemodel_operator.reconcile import APPROVE, REJECT, Plan
from tests.testbed.nodes import ARM64_CPU, JETSON_ORIN, JETSON_XAVIER_NX, X86_NVIDIA, NodeClass, build_node
from tests.unit.test_fallbacks import FallingBack, _finish_rebuild
from tests.unit.test_operator_pure import DIGEST, ready
from tests.unit.test_rollout import Cluster

Obj = dict[str, Any]
TRT = EngineTarget(match=HardwareMatch(), engine="tensorrt", precision="fp16")
T0, T1, T2, T3, T4 = (f"2026-11-26T12:0{m}:00Z" for m in range(5))


def node(name: str, node_class: NodeClass = X86_NVIDIA, gpus: str | None = None, **changes: Any) -> Obj:
    found = ready(build_node(name, node_class))
    if gpus is not None:
        for field in ("allocatable", "capacity"):
            found["status"][field]["nvidia.com/gpu"] = gpus
    found.update(changes)
    return found


def fit_of(nodes: list[Obj], target: EngineTarget = TRT, **serving: Any) -> Any:
    (hardware,) = discover(nodes)
    return fit(hardware, nodes, target, Serving.model_validate(serving))


# ---------------------------------------------------------------------------------------------- the decision


@pytest.mark.parametrize(
    ("gpus", "serving", "build_beside", "side_by_side", "room"),
    [
        (["1"], {}, False, False, True),  # a Jetson as it ships
        (["2"], {}, True, True, True),
        (["4"], {}, True, True, True),  # time-slicing: the device plugin allocates replicas
        (["0"], {}, False, False, False),  # no GPU to give: yielding would not help
        (["1", "2"], {}, True, True, True),  # mixed: three GPUs over the class
        (["1", "1"], {}, True, True, True),  # two single-GPU nodes: build and candidate on the other one
        (["1", "2"], {"mode": "DaemonSet"}, True, False, True),  # the 1-GPU node has no room for a candidate
        (["2", "2"], {"mode": "DaemonSet"}, True, True, True),
        (["1", "1"], {"mode": "DaemonSet"}, False, False, True),
        (["0", "2"], {"mode": "DaemonSet"}, True, True, True),  # a node without GPUs serves nothing either way
        (["2", "2"], {"replicasPerClass": 3}, True, False, True),  # 4 GPUs: 3 + build, not 3 + 3
        (["1"], {"replicasPerClass": 3}, False, False, True),  # more replicas than GPUs: some wait already
        (["4"], {"replicasPerClass": 2}, True, True, True),
    ],
)
def test_what_a_class_of_gpu_nodes_holds_at_once(
    gpus: list[str], serving: Obj, build_beside: bool, side_by_side: bool, room: bool
) -> None:
    found = fit_of([node(f"n{i}", gpus=g) for i, g in enumerate(gpus)], **serving)
    assert (found.build_beside, found.side_by_side, found.room) == (build_beside, side_by_side, room), found
    assert found.applies
    assert found.gpus == sum(int(g) for g in gpus)


def test_the_arithmetic_is_stated() -> None:
    assert fit_of([node("nx", JETSON_XAVIER_NX)]).arithmetic == CAPACITY
    text = fit_of([node("a", gpus="1"), node("b", gpus="2")], mode="DaemonSet").arithmetic
    assert text.startswith("1 nvidia.com/gpu on the smallest of 2 nodes")


def test_cpu_engines_ask_for_no_gpu_so_nothing_applies() -> None:
    for engine in ("onnxruntime", "openvino"):
        target = EngineTarget(match=HardwareMatch(), engine=engine, precision="fp32")
        assert not fit_of([node("n", gpus="1")], target).applies


def test_a_node_without_allocatable_falls_back_to_feature_discovery_labels_else_counts_as_fitting() -> None:
    bare = node("n", JETSON_XAVIER_NX)
    bare["status"].pop("allocatable")
    assert node_gpus(bare) == 1
    assert not fit_of([bare]).build_beside
    sliced = node("o", JETSON_ORIN)  # count 1, replicas 4: the device plugin's time-slicing
    sliced["status"]["allocatable"] = {}
    assert node_gpus(sliced) == 4
    unknown = copy.deepcopy(bare)
    for label in ("nvidia.com/gpu.count", "nvidia.com/gpu.replicas"):
        unknown["metadata"]["labels"].pop(label, None)
    assert node_gpus(unknown) is None
    found = fit_of([unknown])
    assert found.gpus is None
    assert found.build_beside
    assert found.side_by_side
    assert not fit_of([unknown], acceleratorHandoff="Always").side_by_side
    no_plugin = node("p", JETSON_XAVIER_NX)
    del no_plugin["status"]["allocatable"]["nvidia.com/gpu"]  # allocatable reported, no GPU: no device plugin
    assert node_gpus(no_plugin) == 0


def test_unschedulable_nodes_give_no_gpu() -> None:
    cordoned = node("a", gpus="2", spec={"unschedulable": True})
    found = fit_of([cordoned, node("b", gpus="1")])
    assert found.gpus == 1
    assert not found.build_beside


def test_always_and_never() -> None:
    always = fit_of([node("n", gpus="4")], acceleratorHandoff="Always")
    assert not always.build_beside
    assert not always.side_by_side
    assert always.yields
    never = fit_of([node("n", gpus="1")], acceleratorHandoff="Never")
    assert not never.side_by_side
    assert not never.yields


@given(st.lists(st.integers(0, 6), min_size=1, max_size=5), st.integers(1, 4), st.integers(0, 4))
def test_more_gpus_never_fit_less(gpus: list[int], replicas: int, extra: int) -> None:
    nodes = [node(f"n{i}", gpus=str(g)) for i, g in enumerate(gpus)]
    more = [node(f"n{i}", gpus=str(g + (extra if i == 0 else 0))) for i, g in enumerate(gpus)]
    small, big = fit_of(nodes, replicasPerClass=replicas), fit_of(more, replicasPerClass=replicas)
    assert small.build_beside <= big.build_beside
    assert small.side_by_side <= big.side_by_side
    assert small.side_by_side <= small.build_beside  # 2R >= R + 1


# ---------------------------------------------------------------------------------------------- the handoff


def _cluster(nodes: list[Obj], **spec: Any) -> tuple[Cluster, str]:
    """The first revision served on `nodes`; the spec then names a second one (not yet planned)."""
    body: Obj = {
        "apiVersion": "edgeml.dev/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": "ocr", "namespace": "apps", "uid": "u-1", "generation": 1},
        "spec": {"model": {"uri": "oci://registry.local/m:v1", "sha256": DIGEST}, **spec},
    }
    cluster = Cluster(body, nodes=nodes)
    steps = [cluster.step(T0)]
    cluster.finish_builds()
    steps += [cluster.step(T0), cluster.step(T0)]  # the workload made, then seen before its pod is ready
    _pods_ready(cluster)
    steps.append(cluster.step(T0))
    assert steps[-1].status["phase"] == "Ready"
    for result in steps:  # the first revision has nothing to shadow: nothing to say about shadowing
        assert not {"CannotShadow", "StableYielded"} & set(_reasons(result))
        progressing = next(c for c in result.status["conditions"] if c["type"] == "Progressing")
        assert progressing["reason"] != "CannotShadow"
    first = revision_of(EdgeModelSpec.model_validate(body["spec"]))
    body["spec"]["model"]["sha256"] = "0" * 64
    body["metadata"]["generation"] = 2
    return cluster, first


def _pods_ready(cluster: Cluster) -> None:
    """The Deployment controller caught up: as many ready pods as replicas (none while scaled to 0)."""
    for (kind, _), workload in cluster.objects.items():
        if kind == "DaemonSet":
            stopped = {"class": len(cluster.nodes), "node": 1}.get(workload["metadata"]["labels"].get(LABEL_YIELDED), 0)
            count = len(cluster.nodes) - stopped
            workload["status"] = {"desiredNumberScheduled": count, "numberReady": count,
                                  "updatedNumberScheduled": count,
                                  "observedGeneration": workload["metadata"].get("generation", 1)}  # fmt: skip
        if kind == "Deployment":
            replicas = int(workload["spec"].get("replicas", 1))
            workload["status"] = {"replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas,
                                  "observedGeneration": workload["metadata"].get("generation", 1)}  # fmt: skip


def _reasons(result: Plan) -> list[str]:
    return [event.reason for event in result.events]


def _entry(result: Plan) -> Obj:
    (entry,) = result.status["classes"]
    return dict(entry)


def _deployment(cluster: Cluster, revision: str) -> Obj:
    return next(o for (k, _), o in cluster.objects.items()
                if k == "Deployment" and o["metadata"]["labels"]["edgeml.dev/revision"] == revision)  # fmt: skip


JETSON = [node("nx-1", JETSON_XAVIER_NX)]
CAPACITY = "1 nvidia.com/gpu on 1 node; the build beside 1 stable pod needs 2, a candidate beside them needs 2"


def test_on_a_single_gpu_jetson_the_stable_pod_yields_for_the_build_and_the_new_revision_takes_over() -> None:
    cluster, first = _cluster(JETSON)
    result = cluster.step(T1)  # the new revision: its build, and the stable pod stops at once
    assert {"CannotShadow", "StableYielded", "BuildStarted"} <= set(_reasons(result))
    old = _deployment(cluster, first)
    assert old["spec"]["replicas"] == 0
    assert old["metadata"]["labels"][LABEL_YIELDED] == "class"
    entry = _entry(result)
    assert entry["handoff"] == {
        "mode": "Auto", "gpus": 1, "buildBesideStable": False, "canShadow": False, "yieldedSince": T1,
        "handoffs": 1, "unservedSeconds": 0.0,
        "capacity": CAPACITY,
    }  # fmt: skip
    (job,) = [name for (kind, name), o in cluster.objects.items() if kind == "Job" and not o.get("status")]
    unschedulable = {"type": "PodScheduled", "status": "False", "message": "0/1 nodes: Insufficient nvidia.com/gpu"}
    cluster.objects["Pod", job] = {"metadata": {"name": f"{job}-x", "labels": {"job-name": job}},
                                   "status": {"phase": "Pending", "conditions": [unschedulable]}}  # fmt: skip
    waiting = _entry(cluster.step(T1))  # the stable pod is still stopping: not reported as Unschedulable
    assert waiting["state"] == "Building"
    assert waiting["message"] == "the stable pods are stopping to give the build the GPU"
    del cluster.objects["Pod", job]
    progressing = next(c for c in result.status["conditions"] if c["type"] == "Progressing")
    assert progressing["reason"] == "CannotShadow"
    assert "needs 2" in progressing["message"]
    _pods_ready(cluster)
    cluster.finish_builds()
    result = cluster.step(T2)  # built: promoted on its validation (autoPromote), no candidate, old still stopped
    second = revision_of(EdgeModelSpec.model_validate(cluster.body["spec"]))
    assert "Promoted" in _reasons(result)
    assert "ServiceRestored" not in _reasons(result)
    assert cluster.workloads() == {first: "stable", second: "stable"}
    assert _deployment(cluster, first)["spec"]["replicas"] == 0
    _pods_ready(cluster)
    result = cluster.step(T3)  # the new revision ready: the old one goes, the time without service is stated
    assert cluster.workloads() == {second: "stable"}
    assert "ServiceRestored" in _reasons(result)
    handoff = _entry(result)["handoff"]
    assert handoff["unservedSeconds"] == 120.0
    assert "yieldedSince" not in handoff
    assert handoff["handoffs"] == 1
    assert _entry(cluster.step(T4))["state"] == "Serving"
    assert (
        _entry(cluster.step(T4))["message"]
        == f"promoted on its build's validation (CannotShadow: {CAPACITY}; autoPromote)"
    )
    assert cluster.step(T4).status["phase"] == "Ready"


def test_without_auto_promote_the_stable_pod_comes_back_and_an_approval_hands_over_again() -> None:
    cluster, first = _cluster(JETSON, rollout={"autoPromote": False})
    cluster.step(T1)
    _pods_ready(cluster)
    cluster.finish_builds()
    result = cluster.step(T2)  # built: the stable pod comes back; no candidate, the class waits for a person
    old = _deployment(cluster, first)
    assert old["spec"]["replicas"] == 1
    assert LABEL_YIELDED not in old["metadata"]["labels"]
    assert set(cluster.workloads().values()) == {"stable"}
    assert len(cluster.workloads()) == 1
    entry = _entry(result)
    assert entry["state"] == "Built"
    assert entry["message"].startswith("CannotShadow: 1 nvidia.com/gpu")
    assert APPROVE in entry["message"]
    assert REJECT in entry["message"]
    _pods_ready(cluster)
    result = cluster.step(T3)
    assert "ServiceRestored" in _reasons(result)
    assert _entry(result)["handoff"]["unservedSeconds"] == 120.0

    second = revision_of(EdgeModelSpec.model_validate(cluster.body["spec"]))
    cluster.body["metadata"]["annotations"] = {APPROVE: second}
    result = cluster.step(T3)
    assert {"Promoted", "StableYielded"} <= set(_reasons(result))
    assert _deployment(cluster, first)["spec"]["replicas"] == 0
    _pods_ready(cluster)
    result = cluster.step(T4)
    assert cluster.workloads() == {second: "stable"}
    handoff = _entry(result)["handoff"]
    assert handoff["handoffs"] == 2
    assert handoff["unservedSeconds"] == 180.0


def test_a_rollback_annotation_works_on_a_class_that_cannot_shadow() -> None:
    cluster, first = _cluster(JETSON, rollout={"autoPromote": False})
    cluster.step(T1)
    _pods_ready(cluster)
    cluster.finish_builds()
    cluster.step(T2)
    second = revision_of(EdgeModelSpec.model_validate(cluster.body["spec"]))
    cluster.body["metadata"]["annotations"] = {REJECT: second}
    result = cluster.step(T3)
    assert "RolledBack" in _reasons(result)
    assert _entry(result)["state"] == "RolledBack"
    assert cluster.workloads() == {first: "stable"}
    assert _deployment(cluster, first)["spec"]["replicas"] == 1


def test_a_failed_build_brings_the_stable_pod_back() -> None:
    cluster, first = _cluster(JETSON)
    cluster.step(T1)
    _pods_ready(cluster)
    for (kind, name), job in list(cluster.objects.items()):
        if kind == "Job" and not job.get("status"):
            job["status"] = {"conditions": [{"type": "Failed", "status": "True"}]}
            terminated = {"state": {"terminated": {"exitCode": 3, "message": "{}"}}}
            status = {"phase": "Failed", "containerStatuses": [terminated]}
            cluster.objects["Pod", name] = {"metadata": {"name": f"{name}-x", "labels": {"job-name": name}},
                                            "status": status}  # fmt: skip
    result = cluster.step(T2)
    assert _entry(result)["state"] == "Failed"
    assert _deployment(cluster, first)["spec"]["replicas"] == 1
    _pods_ready(cluster)
    assert _entry(cluster.step(T3))["handoff"]["unservedSeconds"] == 120.0


def test_a_class_with_two_gpus_shadows_as_before() -> None:
    cluster, first = _cluster([node("ws", X86_NVIDIA)])  # two GPUs
    result = cluster.step(T1)
    assert not {"CannotShadow", "StableYielded"} & set(_reasons(result))
    assert not result.patch
    assert _deployment(cluster, first)["spec"]["replicas"] == 1
    assert _entry(result)["handoff"]["canShadow"] is True
    cluster.finish_builds()
    cluster.step(T2)
    second = revision_of(EdgeModelSpec.model_validate(cluster.body["spec"]))
    assert cluster.workloads() == {first: "stable", second: "candidate"}


def test_time_slicing_replicas_shadow_as_before() -> None:
    cluster, _first = _cluster([node("orin", JETSON_ORIN)])  # one GPU, four time-slicing replicas
    assert not cluster.step(T1).patch
    cluster.finish_builds()
    cluster.step(T2)
    assert "candidate" in cluster.workloads().values()


def test_never_keeps_the_stable_pod_and_starts_no_candidate() -> None:
    cluster, first = _cluster(JETSON, serving={"acceleratorHandoff": "Never"})
    result = cluster.step(T1)
    assert "CannotShadow" in _reasons(result)
    assert "StableYielded" not in _reasons(result)
    assert _deployment(cluster, first)["spec"]["replicas"] == 1
    cluster.finish_builds()  # as if a GPU had been freed by hand
    result = cluster.step(T2)
    assert len(cluster.workloads()) == 1
    assert "acceleratorHandoff Never" in _entry(result)["message"]


def test_a_cpu_class_has_no_handoff() -> None:
    cluster, _ = _cluster([node("rpi", ARM64_CPU)])
    result = cluster.step(T1)
    assert "handoff" not in _entry(result)
    assert not result.patch


def _daemonsets(cluster: Cluster) -> dict[str, Obj]:
    return {
        o["metadata"]["labels"]["edgeml.dev/revision"]: o for (k, _), o in cluster.objects.items() if k == "DaemonSet"
    }


def _daemonsets_ready(cluster: Cluster, **ready: int) -> None:
    """Each DaemonSet (by revision) with `ready` pods ready of as many wanted (2 when not named)."""
    for revision, daemonset in _daemonsets(cluster).items():
        count = ready.get(revision, 2)
        daemonset["status"] = {"desiredNumberScheduled": count, "numberReady": count, "updatedNumberScheduled": count,
                               "observedGeneration": daemonset["metadata"].get("generation", 1)}  # fmt: skip


TWO_JETSONS = [node("nx-2", JETSON_XAVIER_NX), node("nx-1", JETSON_XAVIER_NX)]
AWAY_FROM_NX1 = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["nx-1"]}]}]}}}  # fmt: skip


@pytest.mark.parametrize("auto_promote", [True, False])
def test_in_daemonset_mode_one_node_gives_the_build_its_gpu_and_promotion_moves_every_pod(auto_promote: bool) -> None:
    cluster, first = _cluster(TWO_JETSONS, serving={"mode": "DaemonSet"}, rollout={"autoPromote": auto_promote})
    _daemonsets_ready(cluster)
    result = cluster.step(T1)  # only nx-1's stable pod stops: nx-2 serves on
    assert any(e.reason == "StableYielded" and "the stable pod on nx-1 stop" in e.message for e in result.events)
    old = _daemonsets(cluster)[first]
    assert old["metadata"]["labels"][LABEL_YIELDED] == "node"
    assert old["spec"]["template"]["spec"]["affinity"] == AWAY_FROM_NX1
    assert LABEL_YIELDED not in old["spec"]["template"]["spec"]["nodeSelector"]
    _daemonsets_ready(cluster, **{first: 1})
    cluster.finish_builds()
    result = cluster.step(T2)
    template = old["spec"]["template"]["spec"]
    if not auto_promote:  # back on both nodes; the class waits for a person
        assert "affinity" not in template
        assert LABEL_YIELDED not in template["nodeSelector"]
        assert LABEL_YIELDED not in old["metadata"]["labels"]
        _daemonsets_ready(cluster)
        assert _entry(cluster.step(T3))["handoff"]["unservedSeconds"] == 120.0
        return
    # Promoted: the new revision needs the GPU on every node, so every old pod stops until it is ready.
    assert old["metadata"]["labels"][LABEL_YIELDED] == "class"
    assert template["nodeSelector"][LABEL_YIELDED] == "true"
    assert "affinity" not in template
    second = revision_of(EdgeModelSpec.model_validate(cluster.body["spec"]))
    _daemonsets_ready(cluster, **{first: 0})
    result = cluster.step(T3)
    assert set(_daemonsets(cluster)) == {second}
    assert _entry(result)["handoff"]["unservedSeconds"] == 120.0


@settings(deadline=None)  # each example plans a whole rollout: slow on a loaded machine, never wrong for it
@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=3),
    st.integers(1, 3),
    st.sampled_from(["Auto", "Always", "Never"]),
)
def test_a_rollout_on_any_gpu_class_either_shadows_or_hands_over_and_never_both(
    gpus: list[int], replicas: int, mode: str
) -> None:
    nodes = [node(f"nx-{i}", JETSON_XAVIER_NX, gpus=str(g)) for i, g in enumerate(gpus)]
    expected = fit_of(nodes, replicasPerClass=replicas, acceleratorHandoff=mode)
    cluster, first = _cluster(nodes, serving={"replicasPerClass": replicas, "acceleratorHandoff": mode})
    second = revision_of(EdgeModelSpec.model_validate(cluster.body["spec"]))
    result = cluster.step(T1)
    stopped = _deployment(cluster, first)["spec"]["replicas"] == 0
    assert stopped == (expected.yields and not expected.build_beside)
    assert ("StableYielded" in _reasons(result)) == stopped
    assert ("CannotShadow" in _reasons(result)) == (not expected.side_by_side)
    _pods_ready(cluster)
    cluster.finish_builds()
    for moment in (T2, T3, T4):
        result = cluster.step(moment)
        _pods_ready(cluster)
        if not expected.side_by_side:
            assert "candidate" not in cluster.workloads().values()  # never a candidate that has no GPU to run on
    handoff = _entry(result).get("handoff", {})
    if expected.side_by_side:  # the normal shadow rollout: a candidate beside the stable pods, nothing stopped
        assert cluster.workloads() == {first: "stable", second: "candidate"}
        assert "handoffs" not in handoff
    elif expected.yields:  # handed over: the new revision serves alone, the time without service stated
        assert cluster.workloads() == {second: "stable"}
        assert handoff["handoffs"] == 1
        assert handoff["unservedSeconds"] == (120.0 if stopped else 60.0)  # from T1 (build) or T2 (swap) to T3
    else:  # Never, or no GPU to hand over: the stable pods keep serving, the class waits
        assert cluster.workloads() == {first: "stable"}
        assert "handoffs" not in handoff
        why = "acceleratorHandoff Never" if mode == "Never" else "no GPU to hand over"
        assert _entry(result)["message"].endswith(f"{why}: waiting until the class has room")


def test_a_rebuild_on_a_single_gpu_class_takes_the_gpu_from_its_own_stable_pod_and_gives_it_back() -> None:
    """A fallback's rebuild (see `rebuild`) needs the GPU the serving pods of the same revision hold: on a
    single-GPU class they yield for the rebuild as for a new revision's build, and come back onto the
    rebuilt engine; otherwise the build Job waits for a GPU for ever."""
    cluster, first = _cluster(JETSON)
    cluster.body["spec"]["model"]["sha256"] = DIGEST  # no new revision: the first one is rebuilt
    cluster.body["metadata"]["generation"] = 1
    falling = FallingBack(cluster.body, cluster.objects, records=cluster.records, versions=cluster.versions,
                          nodes=cluster.nodes)  # fmt: skip
    for (kind, name), obj in falling.objects.items():
        obj["metadata"].setdefault("uid", f"uid-{kind}-{name}")
    key = cluster.body["status"]["classes"][0]["key"]
    falling.fallbacks = {key: Fallback((first,), "InvalidModel", ("pod-1",))}
    result = falling.step(T1)
    assert {"Rebuilding", "StableYielded"} <= set(_reasons(result))
    assert "CannotShadow" not in _reasons(result)  # nothing to shadow: the class's only revision is rebuilt
    stable = _deployment(falling, first)
    assert stable["spec"]["replicas"] == 0
    assert stable["metadata"]["labels"][LABEL_YIELDED] == "class"
    falling.objects = {k: v for k, v in falling.objects.items() if k[0] != "Pod"}  # the old build pod is gone
    _pods_ready(falling)
    built = falling.step(T1)
    assert [o for o in built.create if o["kind"] == "Job"]
    assert _deployment(falling, first)["spec"]["replicas"] == 0  # still yielded while the build runs

    falling.fallbacks = {}  # no pod serves meanwhile
    _finish_rebuild(falling, "b" * 64)
    served = falling.step(T2)
    assert "ServingRebuilt" in _reasons(served)
    stable = _deployment(falling, first)
    assert stable["spec"]["replicas"] == 1
    assert LABEL_YIELDED not in stable["metadata"]["labels"]
    assert stable["spec"]["template"]["spec"]["containers"][0]["args"][1].endswith("b" * 64)
    _pods_ready(falling)
    restored = falling.step(T3)
    assert "ServiceRestored" in _reasons(restored)
    assert _entry(restored)["handoff"]["unservedSeconds"] == 120.0
    assert _entry(falling.step(T4))["state"] == "Serving"
