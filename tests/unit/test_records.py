"""Decisions as records, pure: each scenario of the lost rollback, stale approvals and cumulative evidence,
played on the planner with the records applied as the apiserver would (a patch at an old resourceVersion
conflicts) and the status held back or lost wherever the scenario needs it."""

from __future__ import annotations

import dataclasses
from typing import Any

import hypothesis.strategies as st
from hypothesis import given

from edgemodel_operator.analysis import since
from edgemodel_operator.api.spec import EdgeModelSpec, Rollout
from edgemodel_operator.builders import revision_of
from edgemodel_operator.records import Application, Attempt, parse, retired
from edgemodel_operator.rollout import APPROVE, REJECT, ClassView, approval
from tests.unit.test_operator_pure import DIGEST, NODES
from tests.unit.test_rollout import Cluster, _counters, _serving_first_revision

Obj = dict[str, Any]
TWO_CLASSES = [n for n in NODES if n["metadata"]["name"] in {"edge-x86-1", "rpi5-1"}]


def _keys(cluster: Cluster) -> list[str]:
    return [e["key"] for e in cluster.body["status"]["classes"]]


def _candidates(cluster: Cluster) -> set[str]:
    return {n for (k, n), o in cluster.objects.items() if k == "Deployment" and "candidate" in str(o)}


def _attempts(cluster: Cluster, revision: str) -> dict[str, Attempt]:
    record = next(
        parse(r) for r in cluster.records.values() if r["metadata"]["labels"]["edgeml.dev/revision"] == revision
    )
    assert record is not None
    return record.attempts


def _two_classes_shadowing(**rollout: Any) -> tuple[Cluster, str, str]:
    cluster, first = _serving_first_revision(TWO_CLASSES, **rollout)
    second = revision_of(EdgeModelSpec.model_validate(cluster.body["spec"]))
    cluster.step("2026-11-26T12:01:00Z")
    cluster.finish_builds()
    cluster.step("2026-11-26T12:01:10Z")
    cluster.pods_ready()
    cluster.evidence = {key: {} for key in _keys(cluster)}
    started = cluster.step("2026-11-26T12:01:20Z")
    assert [e["state"] for e in started.status["classes"]] == ["Shadowing", "Shadowing"]
    return cluster, first, second


def test_a_rolled_back_class_stays_rolled_back_while_the_status_is_held() -> None:
    """The lost rollback: the RolledBack status is held; deleting the candidate queues the EdgeModel again, and a
    plan from the status alone ("Shadowing") recreated the candidate, again and again."""
    cluster, _first, second = _two_classes_shadowing()
    good, bad = _keys(cluster)
    cluster.evidence = {good: {"p": _counters(50, 50, 50)}, bad: {"p": _counters(200, 200, 20)}}
    rolled = cluster.step("2026-11-26T12:02:30Z", write_status=False)  # held back: the class still says Shadowing
    assert [e.reason for e in rolled.events].count("RolledBack") == 1
    assert len(_candidates(cluster)) == 1
    for tick in range(5):  # the candidate's deletion, and every analysis tick after it
        again = cluster.step(f"2026-11-26T12:02:3{tick + 1}Z", write_status=False)
        assert not [o for o in again.create if o["kind"] == "Deployment"], "the rolled-back candidate came back"
        assert "RolledBack" not in [e.reason for e in again.events]
    assert _attempts(cluster, second)[bad].state == "RolledBack"
    assert {e["key"]: e["state"] for e in again.status["classes"]}[bad] == "RolledBack"


def test_shadowing_starts_once_whether_or_not_its_status_was_written() -> None:
    cluster, _first = _serving_first_revision(TWO_CLASSES)
    cluster.step("2026-11-26T12:01:00Z")
    cluster.finish_builds()
    cluster.step("2026-11-26T12:01:10Z")
    cluster.pods_ready()
    cluster.evidence = {key: {} for key in _keys(cluster)}
    starts, started = [], set()
    for second in range(20, 30):
        result = cluster.step(f"2026-11-26T12:01:{second}Z", write_status=False)
        starts += [e for e in result.events if e.reason == "ShadowStarted"]
        started |= {e["shadow"]["started"] for e in result.status["classes"]}
    assert sorted(e.message.split(":")[0] for e in starts) == sorted(_keys(cluster))  # once per class
    assert started == {"2026-11-26T12:01:20Z"}


def test_a_record_written_from_an_old_read_conflicts() -> None:
    cluster, _first, _second = _two_classes_shadowing()
    stale = cluster.observed()
    good, bad = _keys(cluster)
    cluster.evidence = {good: {}, bad: {"p": _counters(200, 200, 20)}}
    cluster.step("2026-11-26T12:02:30Z")  # one writer records the rollback
    from edgemodel_operator.builders import Images
    from edgemodel_operator.reconcile import plan

    late = plan(dataclasses.replace(stale, evidence={good: {}, bad: {"p": _counters(200, 200, 20)}}), Images(),
                "2026-11-26T12:02:31Z")  # fmt: skip
    (write,) = late.records
    current = cluster.records[write["name"]]["metadata"]["resourceVersion"]
    assert write["patch"]["metadata"]["resourceVersion"] != current  # the apiserver answers 409: plan again


def test_rollback_beats_promote() -> None:
    """autoPromote, and the checks pass in the same plan that sees the rollback annotation: the rollback wins."""
    cluster, first, second = _two_classes_shadowing(autoPromote=True)
    cluster.body["metadata"]["annotations"] = {REJECT: second}
    cluster.evidence = {key: {"p": _counters(200, 200, 200)} for key in _keys(cluster)}
    decided = cluster.step("2026-11-26T12:03:00Z")
    assert [e["state"] for e in decided.status["classes"]] == ["RolledBack", "RolledBack"]
    assert all(a.approval == f"{REJECT}={second}" for a in _attempts(cluster, second).values())
    assert not [p for p in decided.patch if p["kind"] == "Deployment"]
    assert cluster.workloads() == {first: "stable"}


def _apply(cluster: Cluster, digest: str) -> str:
    cluster.body["spec"]["model"]["sha256"] = digest
    cluster.body["metadata"]["generation"] += 1
    return revision_of(EdgeModelSpec.model_validate(cluster.body["spec"]))


def test_an_approval_left_on_the_object_does_not_approve_the_revision_applied_again() -> None:
    """promote=<second> was set while the second revision shadowed; it failed and was rolled back. The first
    revision is applied again, then the second again: the annotation left on the object approves nothing."""
    cluster, first, second = _two_classes_shadowing(autoPromote=False)
    cluster.body["metadata"]["annotations"] = {APPROVE: second}
    cluster.evidence = {key: {"p": _counters(200, 200, 20)} for key in _keys(cluster)}
    cluster.step("2026-11-26T12:03:00Z")
    assert {a.state for a in _attempts(cluster, second).values()} == {"RolledBack"}  # approved, but failing
    assert _apply(cluster, DIGEST) == first
    cluster.evidence = {}
    assert {e["state"] for e in cluster.step("2026-11-26T12:04:00Z").status["classes"]} == {"Serving"}
    assert _apply(cluster, "0" * 64) == second  # with promote=<second> still on the object
    cluster.step("2026-11-26T12:05:00Z")
    cluster.pods_ready()
    cluster.evidence = {key: {"p": _counters(200, 200, 20)} for key in _keys(cluster)}  # the old attempt's counts
    cluster.step("2026-11-26T12:05:10Z")
    cluster.evidence = {key: {"p": _counters(400, 400, 220)} for key in _keys(cluster)}  # 200 agreeing since
    waiting = cluster.step("2026-11-26T12:07:00Z")
    assert {e["shadow"]["decision"] for e in waiting.status["classes"]} == {"AwaitingApproval"}
    identity = next(iter(_attempts(cluster, second).values())).identity
    assert identity == f"{second}@{cluster.body['metadata']['generation']}"
    assert all(identity in e["message"] for e in waiting.status["classes"])  # how to approve this attempt
    cluster.body["metadata"]["annotations"] = {APPROVE: identity}
    approved = cluster.step("2026-11-26T12:07:10Z")
    assert [e.reason for e in approved.events].count("Promoted") == 2  # one per class: one Event once merged
    assert {a.approval for a in _attempts(cluster, second).values()} == {f"{APPROVE}={identity}"}


def test_a_revision_applied_again_is_judged_on_its_new_attempt_only() -> None:
    """Its first attempt crashed (errors on the stable pods' counters for it); the second one starts from a
    baseline, so the old errors do not roll it back."""
    cluster, _first, second = _two_classes_shadowing()
    keys = _keys(cluster)
    crashed = {key: {"p": _counters(40, 0, 0, errors=40)} for key in keys}
    cluster.evidence = crashed
    cluster.step("2026-11-26T12:02:00Z")
    assert {a.state for a in _attempts(cluster, second).values()} == {"RolledBack"}
    _apply(cluster, cluster.body["spec"]["model"].get("sha256").replace("0", "2"))
    cluster.step("2026-11-26T12:03:00Z")
    cluster.finish_builds()
    cluster.step("2026-11-26T12:03:05Z")
    assert _apply(cluster, "0" * 64) == second
    cluster.step("2026-11-26T12:04:00Z")
    cluster.pods_ready()
    cluster.step("2026-11-26T12:04:10Z")
    attempts = _attempts(cluster, second)
    assert {a.state for a in attempts.values()} == {"Shadowing"}
    assert all(a.baseline == {"p": crashed[a.key]["p"]} for a in attempts.values())
    cluster.evidence = {key: {"p": _counters(240, 200, 200, errors=40)} for key in keys}  # 200 good ones since
    decided = cluster.step("2026-11-26T12:05:30Z")
    assert [e["state"] for e in decided.status["classes"]] == ["Shadowing", "Shadowing"]  # promoting
    assert {a.state for a in _attempts(cluster, second).values()} == {"Promoted"}
    assert all(a.figures["errorRate"] == 0.0 for a in _attempts(cluster, second).values())


def test_a_restarted_stable_pod_counts_from_zero_and_a_lost_one_counts_nothing() -> None:
    baseline = {"a": _counters(100, 100, 90, created=1.0), "b": _counters(50, 50, 50, created=1.0)}
    now = {"a": _counters(10, 10, 10, created=2.0), "c": _counters(5, 5, 4, created=3.0)}  # a restarted, b lost
    evidence = since(baseline, now, started=1.5)
    assert (evidence.mirrored, evidence.compared, evidence.agreed, evidence.pods) == (15, 15, 14, 2)


def test_a_pod_missing_from_the_baseline_with_older_counters_counts_nothing() -> None:
    """It could not be read when shadowing began: its counts may be an earlier attempt's."""
    evidence = since({}, {"old": _counters(500, 0, 0, errors=500, created=1.0), "new": _counters(9, 9, 9, created=3.0)},
                     started=2.0)  # fmt: skip
    assert (evidence.mirrored, evidence.errors, evidence.pods) == (9, 0, 1)


@st.composite
def _histories(draw: st.DrawFn) -> tuple[dict[str, Obj], dict[str, Obj], float]:
    """Pods counting requests, some restarting (new creation time, counters from zero) after the baseline."""
    baseline, now, truth = {}, {}, 0.0
    for pod in range(draw(st.integers(0, 4))):
        before = draw(st.integers(0, 1000))
        counted = [draw(st.integers(0, 100)) for _ in range(draw(st.integers(0, 3)))]  # segments between restarts
        if draw(st.booleans()):
            baseline[f"p{pod}"] = _counters(before, before, before, created=1.0)
        if counted:
            restarted = len(counted) > 1 or f"p{pod}" not in baseline
            kept = counted[-1]  # what counts after the last restart (or all since the baseline)
            value = kept if restarted else before + kept
            now[f"p{pod}"] = _counters(value, value, value, created=float(len(counted)))
            truth += kept
    return baseline, now, truth


@given(_histories())
def test_evidence_since_a_baseline_counts_what_happened_since(
    history: tuple[dict[str, Obj], dict[str, Obj], float],
) -> None:
    baseline, now, truth = history
    assert since(baseline, now).mirrored == truth


def test_approvals_name_one_attempt() -> None:
    attempt = Attempt("b", "c", 7, "Shadowing", "t")
    fresh, stale = Application(7), Application(7, {APPROVE: "b"})
    assert approval({APPROVE: "b"}, APPROVE, attempt, fresh) == f"{APPROVE}=b"
    assert approval({APPROVE: "b"}, APPROVE, attempt, stale) is None
    assert approval({APPROVE: "b@7"}, APPROVE, attempt, stale) == f"{APPROVE}=b@7"
    assert approval({APPROVE: "b@6"}, APPROVE, attempt, fresh) is None
    assert approval({APPROVE: "a"}, APPROVE, attempt, fresh) is None


def test_old_records_are_retired_but_never_a_serving_or_the_current_one() -> None:
    records = {f"r{i}": _record(f"r{i}", i) for i in range(15)}
    gone = {r.revision for r in retired(records, {"r0", "r14"})}
    assert gone == {"r1", "r2", "r3"}  # r4..r13: the ten most recent others


def _record(revision: str, generation: int) -> Any:
    from edgemodel_operator.records import Record

    return Record(f"m-rec-{revision}", revision, "1", {}, Application(generation), {})


def test_a_view_without_samples_never_starts_shadowing() -> None:
    from edgemodel_operator.rollout import start_shadow

    built = Attempt("b", "c", 1, "Built", "t", build={"artifactDigest": "x"})
    view = ClassView(job="Complete", outcome=None, has_stable=True, mine="candidate", mine_ready=1, samples=None)
    assert start_shadow(built, view, "t2", Rollout())[0] is built


def test_a_record_edited_by_hand_reads_as_far_as_it_can_and_is_rewritten() -> None:
    configmap = {
        "metadata": {"name": "m-rec-b", "resourceVersion": "7", "labels": {"edgeml.dev/revision": "b"}},
        "data": {
            "application": "not json",
            "class.c1": Attempt("b", "c1", 3, "RolledBack", "t").to_json(),
            "class.c2": '{"revision": "b", "unknown": 1}',  # too little to be an attempt
            "class.c3": '["a", "list"]',
        },
    }
    record = parse(configmap)
    assert record is not None
    assert record.resource_version == "7"  # a write patches it under that version: no create that conflicts
    assert record.application == Application(0)
    assert list(record.attempts) == ["c1"]
    assert parse({"metadata": {"name": "x", "labels": {}}, "data": {}}) is None


def test_the_build_outcome_is_kept_in_the_attempt_so_losing_pod_and_job_annotation_changes_nothing() -> None:
    """The record is the copy decisions read: with the build pod gone and the Job's annotation removed
    (edited by hand), the class keeps serving its build and nothing is read, patched or rebuilt."""
    cluster, first = _serving_first_revision()
    (attempt,) = _attempts(cluster, first).values()
    assert (attempt.state, attempt.build and attempt.build["artifactDigest"]) == (
        "Promoted",
        "oci://r/e@sha256:" + "a" * 64,
    )
    for kind, name in [k for k in cluster.objects if k[0] == "Pod"]:
        del cluster.objects[kind, name]
    for (kind, _), job in cluster.objects.items():
        if kind == "Job":
            job["metadata"].pop("annotations", None)
    cluster.body["spec"]["model"]["sha256"] = DIGEST  # back to the first revision: no spec change
    cluster.body["metadata"]["generation"] = 1
    result = cluster.step("2026-11-26T12:05:00Z")
    (entry,) = result.status["classes"]
    assert (entry["state"], entry["artifactDigest"]) == ("Serving", "oci://r/e@sha256:" + "a" * 64)
    assert not result.patch
    assert not result.delete
    assert not result.records
    assert not [o for o in result.create if o["kind"] in {"Job", "Deployment"}]
