"""Serving pods that fall back: how the operator reads them, the Degraded condition it sets, and the one
rebuild it starts (pure: the planner on objects as the API server would hold them)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from edgemodel_operator import conditions as cond
from edgemodel_operator.api.spec import EdgeModelSpec
from edgemodel_operator.builders import Images, revision_of
from edgemodel_operator.classes import discover
from edgemodel_operator.desired import converge
from edgemodel_operator.fallbacks import ENGINE_FALLBACK, Fallback, degrade_on_fallback, from_samples
from edgemodel_operator.reconcile import Observed, Plan, plan
from edgemodel_operator.records import parse
from edgemodel_operator.rollout import FALLBACK_REASON
from tests.unit.test_operator_pure import DIGEST
from tests.unit.test_rollout import T0, Cluster, _counters, _serving_first_revision, _shadowing

Obj = dict[str, Any]
T1 = "2026-11-26T13:00:00Z"


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        ([], {}),
        ([({"class": "a", "revision": "r1", "reason": "", "pod": "p"}, 0.0)], {}),  # serving its engine
        ([({"revision": "r1", "reason": "InvalidModel", "pod": "p"}, 1.0)], {}),  # no class label: not ours
        (
            [({"class": "a", "revision": "r1", "reason": "InvalidModel", "pod": "p2"}, 1.0),
             ({"class": "a", "revision": "r1", "reason": "DigestMismatch", "pod": "p1"}, 1.0),
             ({"class": "b", "revision": "r1", "reason": "", "pod": "p3"}, 0.0)],
            {"a": Fallback(("r1",), "DigestMismatch,InvalidModel", ("p1", "p2"))},
        ),
        (
            [({"class": "a", "revision": "r2", "reason": "InvalidModel", "pod": "p2"}, 1.0),  # stable and candidate
             ({"class": "a", "revision": "r1", "reason": "InvalidModel", "pod": "p1"}, 1.0)],
            {"a": Fallback(("r1", "r2"), "InvalidModel", ("p1", "p2"))},
        ),
        ([({"class": "a", "revision": "r1", "instance": "10.0.0.1:8080"}, 1.0)],
         {"a": Fallback(("r1",), "Unknown", ("10.0.0.1:8080",))}),
    ],
)  # fmt: skip
def test_fallbacks_are_read_from_the_gauge_at_one(samples: list[tuple[dict[str, str], float]], expected: Obj) -> None:
    assert from_samples(samples) == expected
    assert from_samples(list(reversed(samples))) == expected  # the order samples come in changes nothing


def _status(ready: bool, degraded: tuple[bool, str] | None = None) -> Obj:
    conditions = cond.set_condition([], cond.READY, ready, "Serving", "1/1", generation=1, now=T0)
    if degraded:
        conditions = cond.set_condition(conditions, cond.DEGRADED, degraded[0], degraded[1], "m", generation=1, now=T0)
    return {"conditions": conditions, "phase": cond.phase(conditions)}


FALLBACK = {"cpu": Fallback(("r1",), "InvalidModel", ("pod-1",))}


def test_without_fallbacks_the_status_is_unchanged() -> None:
    status = _status(True, (False, "AsExpected"))
    assert degrade_on_fallback(status, {}, generation=1, now=T1) is status


@pytest.mark.parametrize(
    ("before", "reason", "phase"),
    [
        (_status(True), ENGINE_FALLBACK, "Degraded"),
        (_status(True, (False, "AsExpected")), ENGINE_FALLBACK, "Degraded"),
        (_status(True, (True, "RolledBack")), "RolledBack", "Degraded"),  # the other reason stays first
        (_status(False, (True, "ClassFailed")), "ClassFailed", "Failed"),
        (_status(False), ENGINE_FALLBACK, "Failed"),
    ],
)
def test_a_fallback_makes_the_edgemodel_degraded_with_the_reason(before: Obj, reason: str, phase: str) -> None:
    after = degrade_on_fallback(before, FALLBACK, generation=1, now=T1)
    degraded = cond.condition(after["conditions"], cond.DEGRADED)
    assert degraded is not None
    assert (degraded["status"], degraded["reason"], after["phase"]) == ("True", reason, phase)
    assert "cpu: 1 pod(s) of r1 serve the fallback (engine not loaded: InvalidModel)" in degraded["message"]
    was = cond.condition(before["conditions"], cond.DEGRADED)
    assert degraded["lastTransitionTime"] == (T0 if was and was["status"] == "True" else T1)


@dataclasses.dataclass
class FallingBack(Cluster):
    """The test cluster, with the fallbacks the serving pods report."""

    fallbacks: dict[str, Fallback] = dataclasses.field(default_factory=dict)

    def observed(self) -> Observed:
        return dataclasses.replace(super().observed(), fallbacks=self.fallbacks)

    def step(self, now: str, *, write_status: bool = True) -> Plan:
        """As the test cluster's, and every object created gets a UID, as the API server gives it."""
        result = super().step(now, write_status=write_status)
        for (kind, name), obj in self.objects.items():
            obj["metadata"].setdefault("uid", f"uid-{kind}-{name}-{self.versions}")
        return result


def _serving() -> tuple[FallingBack, str, str]:
    cluster, revision = _serving_first_revision()
    body = cluster.body
    body["spec"]["model"]["sha256"] = DIGEST  # undo the spec change `_serving_first_revision` leaves for others
    body["metadata"]["generation"] = 1
    falling = FallingBack(body, cluster.objects, records=cluster.records, versions=cluster.versions,
                          nodes=cluster.nodes)  # fmt: skip
    for (kind, name), obj in falling.objects.items():
        obj["metadata"].setdefault("uid", f"uid-{kind}-{name}")
    key = body["status"]["classes"][0]["key"]
    return falling, revision, key


def _attempt(cluster: Cluster, revision: str, key: str) -> Any:
    record = next(r for r in map(parse, cluster.records.values()) if r is not None and r.revision == revision)
    return record.attempts[key]


def _finish_rebuild(cluster: Cluster, digest: str) -> None:
    report = {"v": 1, "status": "built", "exitCode": 0, "cacheKey": "k",
              "artifact": {"reference": f"oci://r/e@sha256:{digest}"}}  # fmt: skip
    for (kind, name), job in list(cluster.objects.items()):
        if kind == "Job" and not job.get("status"):
            job["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
            cluster.objects["Pod", name] = {
                "metadata": {"name": f"{name}-y", "labels": {"job-name": name}},
                "status": {"phase": "Succeeded",
                           "containerStatuses": [{"state": {"terminated": {"exitCode": 0,
                                                                           "message": json.dumps(report)}}}]},
            }  # fmt: skip


def _degraded(result: Plan) -> Obj:
    found = cond.condition(result.status["conditions"], cond.DEGRADED)
    assert found is not None
    return found


def test_a_class_whose_pods_fall_back_is_built_again_once_without_the_cache_then_served_from_the_new_engine() -> None:
    cluster, revision, key = _serving()
    workload = next(o for (kind, _), o in cluster.objects.items() if kind == "Deployment")
    args = workload["spec"]["template"]["spec"]["containers"][0]["args"]
    old = args[1]
    assert args[args.index("--fallback-sha256") + 1] == cluster.body["spec"]["model"]["sha256"]
    assert args[args.index("--fallback-model") + 1] == cluster.body["spec"]["model"]["uri"]

    # The pods report the fallback: Degraded, the attempt goes back to Building, the old Job is deleted.
    cluster.fallbacks = {key: Fallback((revision,), "InvalidModel", ("pod-1",))}
    result = cluster.step(T1)
    assert (_degraded(result)["status"], _degraded(result)["reason"]) == ("True", ENGINE_FALLBACK)
    assert result.status["phase"] == "Progressing"  # a build runs for the class, as for a new revision
    assert [e.reason for e in result.events if e.reason == "Rebuilding"] == ["Rebuilding"]
    attempt = _attempt(cluster, revision, key)
    assert attempt.state == "Building"
    assert attempt.rebuild["reason"] == "InvalidModel"
    assert attempt.rebuild["artifactDigest"] == old
    assert [r["kind"] for r in result.delete] == ["Job"]
    assert not [o for o in result.create if o["kind"] == "Job"]  # not while the old one is around
    assert ("Deployment", workload["metadata"]["name"]) in cluster.objects  # the fallback keeps serving

    # The old build pod is still there (garbage collection takes a moment): nothing is built yet.
    again = cluster.step(T1)
    assert not [o for o in again.create if o["kind"] == "Job"]
    cluster.objects = {k: v for k, v in cluster.objects.items() if k[0] != "Pod"}
    built = cluster.step(T1)
    jobs = [o for o in built.create if o["kind"] == "Job"]
    assert len(jobs) == 1
    assert jobs[0]["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "--no-cache"

    # The new engine is in: promoted again and the workload patched to serve it.
    new = "b" * 64
    _finish_rebuild(cluster, new)
    served = cluster.step(T1)
    assert _attempt(cluster, revision, key).state == "Promoted"
    patches = [p for p in served.patch if p["kind"] == "Deployment"]
    assert len(patches) == 1
    args = cluster.objects["Deployment", workload["metadata"]["name"]]["spec"]["template"]["spec"]["containers"][0]
    assert new in args["args"][1] or args["args"][1].endswith(new)
    assert any(e.reason == "ServingRebuilt" for e in served.events)

    # Still falling back after the rebuild: Degraded stays, nothing is built a second time.
    cluster.pods_ready()
    still = cluster.step(T1)
    assert _degraded(still)["status"] == "True"
    assert not [o for o in still.create if o["kind"] == "Job"]
    assert not still.delete
    assert _attempt(cluster, revision, key).state == "Promoted"

    # The new pods load the engine: Degraded clears.
    cluster.fallbacks = {}
    healthy = cluster.step(T1)
    assert _degraded(healthy)["status"] == "False"
    assert healthy.status["phase"] == "Ready"


def test_a_rebuilt_engine_that_reaches_the_workload_by_its_desired_state_is_announced_once() -> None:
    """The record may hold the rebuilt engine before the workload serves it (the two are written by different
    reconciles): the desired state then points the workload at it, with the same Event ServingRebuilt as the
    planner's own patch; a workload serving the rebuilt engine, or one never rebuilt, gets none."""
    cluster, revision, key = _serving()
    workload = next(o for (kind, _), o in cluster.objects.items() if kind == "Deployment")
    old = workload["spec"]["template"]["spec"]["containers"][0]["args"][1]
    cluster.fallbacks = {key: Fallback((revision,), "DigestMismatch", ("pod-1",))}
    cluster.step(T1)
    cluster.objects = {k: v for k, v in cluster.objects.items() if k[0] != "Pod"}
    cluster.step(T1)
    _finish_rebuild(cluster, "b" * 64)
    cluster.step(T1)
    live = cluster.objects["Deployment", workload["metadata"]["name"]]
    new = live["spec"]["template"]["spec"]["containers"][0]["args"][1]
    assert new != old
    live["spec"]["template"]["spec"]["containers"][0]["args"][1] = old  # the pods still on the failed engine

    def announced(deployment: Obj) -> list[str]:
        result = Plan()
        observed = dataclasses.replace(cluster.observed(), deployments=[deployment])
        converge(observed, result, [discover(cluster.nodes)[0]], Images(), [])
        applied = [a["spec"]["template"]["spec"]["containers"][0]["args"][1] for a in result.apply]
        assert applied in ([], [new])
        return [e.message for e in result.events if e.reason == "ServingRebuilt"]

    (message,) = announced(live)
    assert new in message
    assert old in message
    live["spec"]["template"]["spec"]["containers"][0]["args"][1] = new
    assert announced(live) == []


def test_a_fallback_of_another_revision_than_the_serving_one_starts_no_rebuild() -> None:
    cluster, revision, key = _serving()
    cluster.fallbacks = {key: Fallback(("someother",), "InvalidModel", ("pod-1",))}
    result = cluster.step(T1)
    assert _degraded(result)["status"] == "True"  # what the pods report is shown
    assert _attempt(cluster, revision, key).state == "Promoted"
    assert not result.delete


def test_the_plan_without_fallbacks_is_the_plan_it_was() -> None:
    cluster, _, _ = _serving()
    observed = cluster.observed()
    assert plan(observed, Images(), T1) == plan(dataclasses.replace(observed, fallbacks={}), Images(), T1)


def test_the_condition_names_five_classes_and_counts_the_rest() -> None:
    many = {f"class-{i:04d}": Fallback(("r1",), "InvalidModel" * 50, tuple(f"p{j}" for j in range(100)))
            for i in range(1000)}  # fmt: skip
    after = degrade_on_fallback(_status(True), many, generation=1, now=T1)
    message = cond.condition(after["conditions"], cond.DEGRADED)["message"]  # type: ignore[index]
    assert message.count("serve the fallback") == 5
    assert message.endswith("and 995 more classes")
    assert len(message) < 4096


# ---------------------------------------------------------------- a candidate whose own pods fall back


def _candidate_cluster() -> tuple[FallingBack, str, str, str]:
    """A cluster serving its first revision, with a second revision's spec applied (not yet planned)."""
    cluster, first = _serving_first_revision()
    falling = FallingBack(cluster.body, cluster.objects, records=cluster.records, versions=cluster.versions,
                          nodes=cluster.nodes)  # fmt: skip
    second = revision_of(EdgeModelSpec.model_validate(cluster.body["spec"]))
    return falling, first, second, cluster.body["status"]["classes"][0]["key"]


@pytest.mark.parametrize("when", ["starting", "shadowing"])
def test_a_candidate_whose_pods_serve_the_fallback_is_rolled_back_not_judged_on_the_fallbacks_answers(
    when: str,
) -> None:
    cluster, first, second, key = _candidate_cluster()
    if when == "shadowing":
        _shadowing(cluster)
    else:
        cluster.step("2026-11-26T12:01:00Z")
        cluster.finish_builds()
        cluster.step("2026-11-26T12:01:10Z")
        assert cluster.workloads() == {first: "stable", second: "candidate"}
    # The fallback agrees with stable on everything: evidence from it would pass any analysis.
    cluster.evidence = {key: {"pod-1": _counters(200, 200, 200)}}
    cluster.fallbacks = {key: Fallback((second,), "InvalidModel", ("pod-c",))}
    result = cluster.step("2026-11-26T12:03:00Z")
    entry = result.status["classes"][0]
    assert entry["state"] == "RolledBack"
    assert entry["message"].startswith(f"{FALLBACK_REASON}: its pods cannot load the engine")
    assert "InvalidModel" in entry["message"]
    assert not any(e.reason == "Promoted" for e in result.events)
    assert any(e.reason == "RolledBack" and FALLBACK_REASON in e.message for e in result.events)
    cluster.step("2026-11-26T12:03:10Z")
    assert cluster.workloads() == {first: "stable"}  # the stable revision serves on


def test_the_stable_revisions_fallback_does_not_roll_a_candidate_back() -> None:
    cluster, first, second, key = _candidate_cluster()
    _shadowing(cluster)
    cluster.fallbacks = {key: Fallback((first,), "InvalidModel", ("pod-s",))}
    result = cluster.step("2026-11-26T12:01:30Z")
    assert result.status["classes"][0]["state"] == "Shadowing"
    assert cluster.workloads() == {first: "stable", second: "candidate"}
