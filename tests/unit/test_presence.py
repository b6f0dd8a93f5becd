"""Presence is not schedulability: classes that blink keep what serves them. Pure, no cluster."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from edgemodel_operator.builders import Images
from edgemodel_operator.classes import discover, presence
from edgemodel_operator.controller import node_fingerprint, slim_node
from edgemodel_operator.reconcile import Plan, plan
from tests.testbed.nodes import ARM64_CPU, X86_VNNI, build_node
from tests.unit.test_operator_pure import DIGEST, NOW, ready
from tests.unit.test_rollout import Cluster, _counters, _serving_first_revision, _shadowing

Obj = dict[str, Any]
GRACE = 600.0  # the default
AT = "2026-11-26T12:10:00Z"


def _node(name: str = "edge-x86-1") -> Obj:
    return ready(build_node(name, X86_VNNI))


def cordoned(node: Obj) -> Obj:
    node["spec"]["unschedulable"] = True
    return node


def not_ready(node: Obj) -> Obj:
    node["status"]["conditions"] = [{"type": "Ready", "status": "Unknown"}]
    return node


def disk_pressure(node: Obj) -> Obj:
    node["spec"]["taints"] = [{"key": "node.kubernetes.io/disk-pressure", "effect": "NoSchedule"}]
    return node


def unreachable(node: Obj) -> Obj:
    node["spec"]["taints"] = [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]
    return not_ready(node)


FAULTS: dict[str, Callable[[Obj], Obj]] = {
    "cordoned": cordoned,
    "NotReady": not_ready,
    "DiskPressure taint": disk_pressure,
    "unreachable (NoExecute, NotReady)": unreachable,
}


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_an_unschedulable_node_keeps_its_class_present_but_not_schedulable(fault: Callable[[Obj], Obj]) -> None:
    (found,) = discover([fault(_node())])
    assert (found.nodes, found.schedulable) == (("edge-x86-1",), ())
    (mixed,) = discover([fault(_node()), _node("edge-x86-2")])
    assert (mixed.nodes, mixed.schedulable) == (("edge-x86-1", "edge-x86-2"), ("edge-x86-2",))


def test_a_node_outside_the_selector_is_no_node_of_the_class() -> None:
    assert discover([_node()], {"kubernetes.io/arch": "arm64"}) == []


Expected = tuple[list[str], dict[str, tuple[str, str]], set[str], float | None]  # classes, absent, retired, wake
CASES: dict[str, tuple[str, dict[str, str | None], Expected]] = {
    "new schedulable": ("schedulable", {}, (["k"], {}, set(), None)),  # can take pods: a class
    "new unschedulable": ("unschedulable", {}, ([], {}, set(), None)),  # cannot: not a class yet
    "known unschedulable": ("unschedulable", {"k": None}, (["k"], {}, set(), None)),  # stays
    "returned": ("unschedulable", {"k": "2026-11-26T12:05:00Z"}, (["k"], {}, set(), None)),
    "just gone": ("none", {"k": None}, ([], {"k": (AT, "2026-11-26T12:20:00Z")}, set(), 600.0)),
    "1 s to go": ("none", {"k": "2026-11-26T12:00:01Z"},
                  ([], {"k": ("2026-11-26T12:00:01Z", "2026-11-26T12:10:01Z")}, set(), 1.0)),
    "grace over": ("none", {"k": "2026-11-26T12:00:00Z"}, ([], {}, {"k"}, None)),
    "unreadable time": ("none", {"k": "garbage"}, ([], {"k": (AT, "2026-11-26T12:20:00Z")}, set(), 600.0)),
    "time in the future": ("none", {"k": "2027-01-01T00:00:00Z"},
                           ([], {"k": (AT, "2026-11-26T12:20:00Z")}, set(), 600.0)),
}  # fmt: skip


@pytest.mark.parametrize(("found", "known", "expected"), CASES.values(), ids=CASES.keys())
def test_presence(found: str, known: dict[str, str | None], expected: Expected) -> None:
    classes, absent, retired, wake = expected
    nodes = {"schedulable": [_node()], "unschedulable": [cordoned(_node())], "none": []}[found]
    key = discover([_node()])[0].key

    def real(name: str) -> str:  # the cases name the class "k"
        return {"k": key}[name]

    seen = presence(discover(nodes), {real(k): v for k, v in known.items()}, now=AT, grace_seconds=GRACE)
    assert [c.key for c in seen.classes] == [real(k) for k in classes]
    assert seen.absent == {real(k): v for k, v in absent.items()}
    assert seen.retired == {real(k) for k in retired}
    assert seen.wake_after == wake


def test_without_a_grace_an_absent_class_retires_at_once() -> None:
    key = discover([_node()])[0].key
    assert presence([], {key: None}, now=AT, grace_seconds=0).retired == {key}


def _serving() -> Cluster:
    """One single-node CPU class serving its first revision."""
    cluster, _ = _serving_first_revision()
    cluster.body["spec"]["model"]["sha256"] = DIGEST  # no spec change: the first revision stays
    cluster.body["metadata"]["generation"] = 1
    cluster.nodes = [_node()]
    cluster.step(NOW)
    assert cluster.body["status"]["phase"] == "Ready"
    return cluster


def _quiet(result: Plan) -> None:
    assert not result.delete, result.delete
    assert not [o for o in result.create if o["kind"] in {"Job", "Deployment", "Service"}], result.create


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_a_fault_on_the_only_node_of_a_class_deletes_nothing_and_starts_nothing(fault: Callable[[Obj], Obj]) -> None:
    cluster = _serving()
    objects = set(cluster.objects)
    cluster.nodes = [fault(_node())]
    for moment in ("2026-11-26T12:01:00Z", "2026-11-26T13:00:00Z", "2026-11-30T00:00:00Z"):  # hours, days
        result = cluster.step(moment)
        _quiet(result)
        (entry,) = result.status["classes"]
        assert (entry["state"], entry["nodeCount"], entry["schedulable"]) == ("Serving", 1, False)
    cluster.nodes = [_node()]
    (entry,) = cluster.step("2026-11-30T00:01:00Z").status["classes"]
    assert (entry["state"], entry["schedulable"]) == ("Serving", True)
    assert set(cluster.objects) == objects


def test_a_deleted_node_makes_its_class_absent_and_a_returning_node_finds_everything() -> None:
    cluster = _serving()
    objects = set(cluster.objects)
    cluster.nodes = []
    gone = cluster.step("2026-11-26T12:01:00Z")
    _quiet(gone)
    (entry,) = gone.status["classes"]
    assert (entry["state"], entry["absentSince"], entry["lastState"]) == ("Absent", "2026-11-26T12:01:00Z", "Serving")
    assert entry["nodeCount"] == 0
    assert gone.wake_after == GRACE
    assert gone.status["conditions"][0]["type"] == "Ready"
    later = cluster.step("2026-11-26T12:10:59Z")  # 1 s before the grace is over
    _quiet(later)
    assert later.status["classes"][0]["absentSince"] == "2026-11-26T12:01:00Z"
    assert later.wake_after == 1.0
    cluster.nodes = [_node()]
    back = cluster.step("2026-11-26T12:11:00Z")
    _quiet(back)
    (entry,) = back.status["classes"]
    assert entry["state"] == "Serving"
    assert "absentSince" not in entry
    assert set(cluster.objects) == objects


def test_an_absent_class_is_retired_once_the_grace_is_over() -> None:
    cluster = _serving()
    cluster.nodes = []
    cluster.step("2026-11-26T12:01:00Z")
    retired = cluster.step("2026-11-26T12:11:00Z")
    assert sorted(r["kind"] for r in retired.delete) == ["Deployment", "Job"]
    assert retired.status["classes"] == []
    assert any(e.reason == "Removed" and "hardware class left" in e.message for e in retired.events)


def test_a_known_class_found_only_through_its_objects_is_kept_too() -> None:
    """The status entry was never written (held, then the operator restarted): the objects name the class."""
    cluster = _serving()
    cluster.body["status"]["classes"] = []
    cluster.nodes = [cordoned(_node())]
    _quiet(cluster.step("2026-11-26T12:01:00Z"))
    cluster.body["status"]["classes"] = []
    cluster.nodes = []
    result = cluster.step("2026-11-26T12:02:00Z")
    _quiet(result)
    assert result.status["classes"][0]["state"] == "Absent"


def test_a_class_rolled_back_then_absent_never_serves_that_revision_when_it_returns() -> None:
    cluster, first = _serving_first_revision()
    second, _ = _shadowing(cluster)
    key = cluster.body["status"]["classes"][0]["key"]
    cluster.evidence = {key: {"stable-pod": _counters(200, 200, 20)}}
    assert cluster.step("2026-11-26T12:02:30Z").status["classes"][0]["state"] == "RolledBack"
    cluster.evidence = {}
    saved = cluster.nodes
    cluster.nodes = []
    absent = cluster.step("2026-11-26T12:03:00Z").status["classes"][0]
    assert (absent["state"], absent["lastState"], absent["shadow"]["decision"]) == ("Absent", "RolledBack", "Rollback")
    cluster.nodes = saved
    back = cluster.step("2026-11-26T12:04:00Z")
    _quiet(back)
    assert back.status["classes"][0]["state"] == "RolledBack"
    assert cluster.workloads() == {first: "stable"}
    again = cluster.step("2026-11-26T12:05:00Z")
    _quiet(again)
    assert again.status["classes"][0]["state"] == "RolledBack"
    assert second not in cluster.workloads()


def test_a_class_absent_while_shadowing_resumes_its_shadow_when_it_returns() -> None:
    cluster, _ = _serving_first_revision()
    _, started = _shadowing(cluster)
    since = started.status["classes"][0]["shadow"]["started"]
    saved = cluster.nodes
    cluster.nodes = []
    _quiet(cluster.step("2026-11-26T12:01:30Z"))
    cluster.nodes = saved
    back = cluster.step("2026-11-26T12:01:40Z")
    entry = back.status["classes"][0]
    assert (entry["state"], entry["shadow"]["started"]) == ("Shadowing", since)
    assert not any(e.reason == "ShadowStarted" for e in back.events)


@pytest.mark.parametrize(
    "change",
    [
        lambda n: n["metadata"]["labels"].update({"x": "y"}),
        lambda n: n["spec"].update(unschedulable=True),
        lambda n: n["spec"].update(taints=[{"key": "node.kubernetes.io/disk-pressure", "effect": "NoSchedule"}]),
        lambda n: n["status"].update(conditions=[{"type": "Ready", "status": "False"}]),
        lambda n: n["status"].update(allocatable={"cpu": "8", "nvidia.com/gpu": "1"}),  # the device plugin registered
    ],
    ids=["label", "cordon", "taint", "NotReady", "GPUs allocatable"],
)
def test_the_node_fingerprint_sees_every_change_that_matters_at_once(change: Callable[[Obj], None]) -> None:
    node = _node()
    before = node_fingerprint(slim_node(node))
    changed = copy.deepcopy(node)
    change(changed)
    assert node_fingerprint(slim_node(changed)) != before
    heartbeat = copy.deepcopy(node)
    heartbeat["status"]["conditions"][0]["lastHeartbeatTime"] = "2026-11-26T12:00:00Z"
    assert node_fingerprint(slim_node(heartbeat)) == before


def test_a_new_class_whose_only_node_cannot_take_pods_builds_nothing_yet() -> None:
    body = {"apiVersion": "edgeml.dev/v1alpha1", "kind": "EdgeModel",
            "metadata": {"name": "ocr", "namespace": "apps", "uid": "u-1", "generation": 1},
            "spec": {"model": {"uri": "oci://registry.local/m:v1", "sha256": "d" * 64}}}  # fmt: skip
    from edgemodel_operator.reconcile import Observed

    observed = Observed(body=body, nodes=[cordoned(_node())], jobs=[], pods=[], deployments=[], services=[])
    result = plan(observed, Images(), NOW)
    assert [o["kind"] for o in result.create] == ["Service"]
    assert result.status["classes"] == []


def _tracks(cluster: Cluster, key: str) -> dict[str, str]:
    """Revision -> track of the class's serving workloads."""
    return {
        o["metadata"]["labels"]["edgeml.dev/revision"]: o["metadata"]["labels"]["edgeml.dev/track"]
        for (kind, _), o in cluster.objects.items()
        if kind == "Deployment" and o["metadata"]["labels"]["edgeml.dev/class"] == key
    }


def test_a_class_new_during_a_rollout_serves_the_stable_revision_first_then_shadows_the_candidate() -> None:
    cluster, first = _serving_first_revision()
    second, _ = _shadowing(cluster)
    cluster.nodes = [*cluster.nodes, ready(build_node("rpi5-1", ARM64_CPU))]
    (new,) = [c.key for c in discover(cluster.nodes) if c.arch == "arm64"]
    cluster.evidence[new] = {}  # its stable pods' counters are readable: shadowing can begin from a baseline
    seen: list[dict[str, str]] = []
    for moment in ("2026-11-26T12:01:30Z", "2026-11-26T12:01:40Z", "2026-11-26T12:01:50Z", "2026-11-26T12:02:00Z",
                   "2026-11-26T12:02:10Z"):  # fmt: skip
        result = cluster.step(moment)
        jobs = [o["metadata"]["labels"]["edgeml.dev/revision"] for o in result.create if o["kind"] == "Job"]
        if moment == "2026-11-26T12:01:30Z":
            assert jobs == [first]  # the EdgeModel's stable revision, from the spec kept in its record
            entry = next(e for e in result.status["classes"] if e["key"] == new)
            assert "stable revision" in entry["message"]
        cluster.finish_builds()
        cluster.pods_ready()
        seen.append(_tracks(cluster, new))
    assert {first: "stable"} in seen  # served the stable revision first ...
    assert all(tracks.get(second) != "stable" for tracks in seen)  # ... and never the candidate unshadowed
    entry = next(e for e in cluster.body["status"]["classes"] if e["key"] == new)
    assert (entry["state"], entry["revision"], entry["shadow"]["revision"]) == ("Shadowing", first, second)
    assert cluster.body["status"]["revisions"] == {"stable": first, "candidate": second}


def test_a_new_class_gets_the_stable_revision_from_its_record_when_no_workload_carries_its_spec() -> None:
    cluster, first = _serving_first_revision()
    _shadowing(cluster)
    for (kind, _), obj in cluster.objects.items():
        if kind == "Deployment":
            obj["metadata"].pop("annotations", None)  # the spec annotation gone: only the record has it
    cluster.nodes = [*cluster.nodes, ready(build_node("rpi5-1", ARM64_CPU))]
    result = cluster.step("2026-11-26T12:01:30Z")
    assert [o["metadata"]["labels"]["edgeml.dev/revision"] for o in result.create if o["kind"] == "Job"] == [first]
