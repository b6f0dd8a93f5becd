"""Deadlines and requests in the rollout, pure: the progress deadline with the pods' reason, the shadow timeout
and its policies, the rollback annotation in every state after the build, and build retries (automatic after an
infrastructure failure, and on request). Played on the planner at the default settings unless a test says
otherwise, with records applied as the apiserver would (see `tests.unit.test_rollout.Cluster`)."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgemodel_operator.api.spec import EdgeModelSpec, Rollout
from edgemodel_operator.builders import revision_of
from edgemodel_operator.controller import slim_serving_pod
from edgemodel_operator.progress import pod_problem
from edgemodel_operator.reconcile import Observed, Plan
from edgemodel_operator.records import Application, Attempt, parse
from edgemodel_operator.rollout import (
    REJECT,
    REJECTABLE,
    RETRY,
    RETRY_FIRST_SECONDS,
    RETRY_LIMIT,
    WARNINGS,
    ClassView,
    Context,
    advance,
    due_in,
    span,
    timeout_seconds,
)
from tests.unit.test_rollout import Cluster, _counters, _serving_first_revision

Obj = dict[str, Any]
T0 = "2026-11-26T12:00:00Z"
BUILT = "2026-11-26T12:01:00Z"  # the candidate's build is read (see `_candidate_built`)


@dataclass
class PodCluster(Cluster):
    """`Cluster` with candidate serving pods (as `controller.slim_serving_pod` keeps them) and object UIDs."""

    serving_pods: list[Obj] = field(default_factory=list)
    made: int = 0

    def observed(self) -> Observed:
        return dataclasses.replace(super().observed(), serving_pods=[slim_serving_pod(p) for p in self.serving_pods])

    def step(self, now: str, *, write_status: bool = True) -> Plan:
        result = super().step(now, write_status=write_status)
        for obj in self.objects.values():
            if "uid" not in obj.setdefault("metadata", {}):
                self.made += 1
                obj["metadata"]["uid"] = f"uid-{self.made}"
        return result


def _cluster(**rollout: Any) -> tuple[PodCluster, str, str]:
    """The first revision serving one class, a second one applied (not yet reconciled)."""
    plain, first = _serving_first_revision(**rollout)
    cluster = PodCluster(plain.body, plain.objects, plain.evidence, plain.records, plain.versions, plain.nodes)
    cluster.step("2026-11-26T12:00:30Z")  # builds the second revision: a Job, with a UID from now on
    second = revision_of(EdgeModelSpec.model_validate(cluster.body["spec"]))
    return cluster, first, second


def _candidate_built(cluster: PodCluster) -> Plan:
    cluster.finish_builds()
    return cluster.step(BUILT)


def _key(cluster: Cluster) -> str:
    return str(cluster.body["status"]["classes"][0]["key"])


def _entry(result: Plan) -> Obj:
    return dict(result.status["classes"][0])


def _pod(revision: str, key: str, **status: Any) -> Obj:
    """A candidate serving pod as the API server holds it, with the kubelet's or the scheduler's status."""
    labels = {"edgeml.dev/edgemodel": "ocr", "edgeml.dev/revision": revision, "edgeml.dev/class": key,
              "edgeml.dev/track": "candidate", "app.kubernetes.io/component": "serve"}  # fmt: skip
    return {"metadata": {"name": f"ocr-{revision[:8]}-x", "uid": "p-1", "labels": labels}, "status": status}


def _container(state: Obj, last: Obj | None = None, restarts: int = 0) -> Obj:
    return {"name": "serve", "image": "127.0.0.1:5000/edgemodel-runtime:9.9", "ready": False, "started": False,
            "restartCount": restarts, "state": state, "lastState": last or {}}  # fmt: skip


UNSCHEDULABLE = {
    "phase": "Pending",
    "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": "0/7 nodes are available: 7 Insufficient cpu. preemption: 0/7 nodes are available."}],
}  # fmt: skip
IMAGE_PULL = {
    "phase": "Pending",
    "containerStatuses": [_container({"waiting": {"reason": "ImagePullBackOff",
                                                  "message": 'Back-off pulling image "127.0.0.1:5000/x:9.9"'}})],
}  # fmt: skip
ERR_IMAGE_PULL = {
    "phase": "Pending",
    "containerStatuses": [_container({"waiting": {"reason": "ErrImagePull", "message": "not found"}})],
}
CRASH_LOOP = {
    "phase": "Running",
    "containerStatuses": [
        _container({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
                   {"terminated": {"reason": "Error", "exitCode": 3, "message": "engine rejected"}}, restarts=4)
    ],
}  # fmt: skip
OOM = {
    "phase": "Running",
    "containerStatuses": [
        _container({"waiting": {"reason": "CrashLoopBackOff"}},
                   {"terminated": {"reason": "OOMKilled", "exitCode": 137}}, restarts=2)
    ],
}  # fmt: skip
CONFIG_ERROR = {
    "phase": "Pending",
    "containerStatuses": [_container({"waiting": {"reason": "CreateContainerConfigError",
                                                  "message": 'secret "s" not found'}})],
}  # fmt: skip
INVALID_IMAGE = {"phase": "Pending", "containerStatuses": [_container({"waiting": {"reason": "InvalidImageName"}})]}
OOM_NOW = {
    "phase": "Running",
    "containerStatuses": [_container({"terminated": {"reason": "OOMKilled", "exitCode": 137}})],
}
EXITED_NOW = {"phase": "Running", "containerStatuses": [_container({"terminated": {"reason": "Error", "exitCode": 2}})]}
CREATING = {"phase": "Pending", "containerStatuses": [_container({"waiting": {"reason": "ContainerCreating"}})]}
RUNNING = {"phase": "Running", "containerStatuses": [_container({"running": {"startedAt": BUILT}})]}


@pytest.mark.parametrize(
    ("status", "says"),
    [
        (UNSCHEDULABLE, "Unschedulable: 0/7 nodes are available: 7 Insufficient cpu."),
        (IMAGE_PULL, "ImagePullBackOff: image 127.0.0.1:5000/edgemodel-runtime:9.9 cannot be pulled: Back-off"),
        (ERR_IMAGE_PULL, "ErrImagePull: image 127.0.0.1:5000/edgemodel-runtime:9.9 cannot be pulled: not found"),
        (CRASH_LOOP, "CrashLoopBackOff: container serve last exit: Error, exit code 3, restarted 4 times"),
        (OOM, "OOMKilled: container serve ran out of memory (restarted 2 times)"),
        (CONFIG_ERROR, 'CreateContainerConfigError: secret "s" not found'),
        (INVALID_IMAGE, "InvalidImageName: image 127.0.0.1:5000/edgemodel-runtime:9.9 cannot be pulled"),
        (OOM_NOW, "OOMKilled: container serve ran out of memory (restarted 0 times)"),
        (EXITED_NOW, "Terminated: container serve exited: Error, exit code 2"),
        (CREATING, None),
        (RUNNING, None),
    ],
    ids=[
        "unschedulable",
        "image pull back-off",
        "image pull error",
        "crash loop",
        "oom",
        "config",
        "invalid image",
        "oom now",
        "exited now",
        "creating",
        "ok",
    ],
)
def test_a_pods_problem_is_read_from_what_the_watch_keeps_of_it(status: Obj, says: str | None) -> None:
    pod = slim_serving_pod(_pod("r" * 10, "k", **status))
    problem = pod_problem([pod])
    assert problem == says if says is None else problem is not None and problem.startswith(says), problem


def test_the_problem_a_person_fixes_first_is_told_first() -> None:
    pods = [slim_serving_pod(_pod("r", "k", **s)) for s in (CRASH_LOOP, IMAGE_PULL, UNSCHEDULABLE, CONFIG_ERROR)]
    assert str(pod_problem(pods)).startswith("Unschedulable")
    assert str(pod_problem(pods[:2])).startswith("ImagePullBackOff")
    assert str(pod_problem([pods[0], pods[3]])).startswith("CrashLoopBackOff")


@given(st.text(max_size=2000))
def test_any_kubelet_message_makes_a_bounded_reason(message: str) -> None:
    status = {"containerStatuses": [_container({"waiting": {"reason": "ErrImagePull", "message": message}})]}
    assert len(str(pod_problem([slim_serving_pod(_pod("r", "k", **status))]))) < 500


# ---------------------------------------------------------------- the progress deadline, at its default (10m)


@pytest.mark.parametrize(
    ("status", "says"),
    [
        (IMAGE_PULL, "ImagePullBackOff: image 127.0.0.1:5000/edgemodel-runtime:9.9 cannot be pulled"),
        (CRASH_LOOP, "CrashLoopBackOff: container serve last exit: Error, exit code 3"),
        (OOM, "OOMKilled"),
        (UNSCHEDULABLE, "Unschedulable: 0/7 nodes are available: 7 Insufficient cpu."),
        (None, "no candidate pod is Ready"),
    ],
    ids=["image pull", "crash loop", "oom", "unschedulable", "no pod at all"],
)
def test_a_candidate_not_ready_within_the_default_deadline_is_rolled_back_with_its_pods_reason(
    status: Obj | None, says: str
) -> None:
    cluster, first, second = _cluster()
    assert Rollout().progress_deadline == "10m"
    started = _candidate_built(cluster)
    assert cluster.workloads() == {first: "stable", second: "candidate"}
    key = _key(cluster)
    if status is not None:
        cluster.serving_pods = [_pod(second, key, **status)]
    assert started.wake_after is None  # no deadline before the workload is there: its watch event plans again
    seen = cluster.step("2026-11-26T12:01:05Z")
    assert seen.wake_after == 595.0  # counted from the workload's creation: the planner looks again then
    waiting = cluster.step("2026-11-26T12:10:59Z")
    assert _entry(waiting)["state"] == "Built"
    assert waiting.wake_after == 1.0
    rolled = cluster.step("2026-11-26T12:11:00Z")
    entry = _entry(rolled)
    assert entry["state"] == "RolledBack"
    assert entry["message"].startswith(says)
    assert entry["message"].endswith("not Ready within progressDeadline 10m")
    assert cluster.workloads() == {first: "stable"}  # the candidate is removed; stable serves on
    degraded = next(c for c in rolled.status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "RolledBack")
    assert says in degraded["message"]
    (event,) = [e for e in rolled.events if e.reason == "RolledBack"]
    assert says in event.message
    assert event.reason in WARNINGS
    assert not cluster.step("2026-11-26T12:30:00Z").create  # decided: nothing is made again


def test_a_candidate_with_a_ready_pod_is_not_held_to_the_deadline() -> None:
    cluster, _first, second = _cluster()
    _candidate_built(cluster)
    cluster.pods_ready()  # ready, but its evidence cannot be read (a monitoring outage): that is no pod problem
    cluster.serving_pods = [_pod(second, _key(cluster), **RUNNING)]
    later = cluster.step("2026-11-26T13:00:00Z")
    assert _entry(later)["state"] == "Built"
    assert later.wake_after is None


def test_the_deadline_counts_from_the_candidate_workloads_creation_and_survives_a_lost_status() -> None:
    cluster, _first, second = _cluster(progressDeadline="90s")
    _candidate_built(cluster)
    cluster.step("2026-11-26T12:01:05Z")  # the candidate workload made at BUILT is seen
    attempt = next(iter(parse(next(r for r in cluster.records.values() if second in r["metadata"]["name"]))
                        .attempts.values()))  # type: ignore[union-attr]  # fmt: skip
    assert attempt.built == BUILT
    cluster.body["status"] = {}  # the status is lost: the record still says when the build was there
    assert _entry(cluster.step("2026-11-26T12:02:29Z"))["state"] == "Built"
    assert _entry(cluster.step("2026-11-26T12:02:30Z"))["message"].endswith("within progressDeadline 90s")


# ---------------------------------------------------------------- the rollback annotation, in every state


def _to_state(situation: str) -> PodCluster:
    """A cluster whose candidate is in `situation` (one of rollout.REJECTABLE)."""
    rollout: Obj = {}
    if situation == "awaiting approval":
        rollout = {"autoPromote": False}
    if situation == "failed, awaiting a person":
        rollout = {"autoRollback": False}
    if situation == "shadow timed out, held":
        rollout = {"shadow": {"minRequests": 100, "duration": "60s", "timeout": "2m", "onTimeout": "Hold"}}
    cluster, _first, _second = _cluster(**rollout)
    cluster.finish_builds()
    if situation == "candidate starting":
        return cluster  # built; the next plan would make the candidate
    cluster.step(BUILT)
    if situation == "waiting for candidate pods":
        return cluster
    cluster.pods_ready()
    if situation == "waiting for shadow evidence to be readable":
        return cluster
    key = _key(cluster)
    cluster.evidence = {key: {}}
    cluster.step("2026-11-26T12:01:20Z")
    evidence = {"awaiting approval": _counters(200, 200, 200), "failed, awaiting a person": _counters(200, 200, 20),
                "shadowing": _counters(10, 10, 10), "shadow timed out, held": _counters(12, 12, 12)}  # fmt: skip
    cluster.evidence = {key: {"pod-1": evidence[situation]}}
    return cluster


@pytest.mark.parametrize("situation", REJECTABLE)
def test_the_rollback_annotation_works_in_every_state_after_the_build(situation: str) -> None:
    cluster = _to_state(situation)
    if situation != "candidate starting":  # that one is annotated as its build is read: no candidate yet
        before = cluster.step("2026-11-26T12:03:30Z")
        assert _entry(before)["state"] in {"Built", "Shadowing"}, _entry(before)
        assert (_entry(before)["state"] == "Shadowing") == (situation in REJECTABLE[3:])
    if situation == "shadow timed out, held":
        assert _entry(before)["message"].startswith("ShadowTimeout: 12 of 100 requests in 2m10s; held")
    second = revision_of(EdgeModelSpec.model_validate(cluster.body["spec"]))
    cluster.body["metadata"]["annotations"] = {REJECT: second}
    rolled = cluster.step("2026-11-26T12:03:40Z")
    entry = _entry(rolled)
    assert entry["state"] == "RolledBack", entry
    assert f"rolled back by {REJECT}={second}" in entry["message"]
    assert set(cluster.workloads().values()) == {"stable"}
    assert not any(k == "Service" and second[:8] in n for k, n in cluster.objects)
    assert [e.reason for e in rolled.events].count("RolledBack") == 1
    if situation == "candidate starting":
        assert not [c for c in rolled.create if c["kind"] in {"Deployment", "Service"}]  # never made


def test_the_rollback_annotation_does_not_touch_a_first_revision_or_a_build() -> None:
    cluster, _first, second = _cluster()
    cluster.body["metadata"]["annotations"] = {REJECT: second}
    building = cluster.step("2026-11-26T12:00:40Z")
    assert _entry(building)["state"] == "Building"  # nothing to roll back yet: the build goes on


# ---------------------------------------------------------------- the shadow timeout


def _shadowing(**shadow: Any) -> PodCluster:
    cluster, _first, _second = _cluster(shadow={"minRequests": 100, "duration": "60s"} | shadow)
    _candidate_built(cluster)
    cluster.pods_ready()
    cluster.evidence = {_key(cluster): {}}
    assert _entry(cluster.step("2026-11-26T12:01:20Z"))["state"] == "Shadowing"
    cluster.evidence = {_key(cluster): {"pod-1": _counters(12, 12, 12)}}
    return cluster


def test_a_shadow_without_a_decision_times_out_at_the_default_and_is_rolled_back() -> None:
    assert timeout_seconds(Rollout()) == 3600
    assert timeout_seconds(Rollout.model_validate({"shadow": {"duration": "45m"}})) == 5400
    cluster = _shadowing()
    assert _entry(cluster.step("2026-11-26T13:01:19Z"))["state"] == "Shadowing"
    rolled = cluster.step("2026-11-26T13:01:20Z")
    entry = _entry(rolled)
    assert entry["state"] == "RolledBack"
    assert entry["message"] == "ShadowTimeout: 12 of 100 requests in 1h; onTimeout Rollback"
    assert entry["shadow"]["requests"] == 12
    assert set(cluster.workloads().values()) == {"stable"}


def test_on_timeout_promote_promotes_what_has_not_failed() -> None:
    cluster = _shadowing(timeout="10m", onTimeout="Promote")
    promoted = cluster.step("2026-11-26T12:11:20Z")
    assert _entry(promoted)["shadow"]["decision"] == "Promote"
    assert "ShadowTimeout: 12 of 100 requests in 10m; onTimeout Promote" in _entry(promoted)["shadow"]["reason"]
    assert set(cluster.workloads().values()) == {"stable"}
    assert len(cluster.workloads()) == 2


def test_on_timeout_promote_rolls_back_what_fails() -> None:
    cluster, _first, _second = _cluster(
        shadow={"minRequests": 100, "duration": "60s", "timeout": "10m", "onTimeout": "Promote"}, autoRollback=False
    )
    _candidate_built(cluster)
    cluster.pods_ready()
    cluster.evidence = {_key(cluster): {}}
    cluster.step("2026-11-26T12:01:20Z")
    cluster.evidence = {_key(cluster): {"pod-1": _counters(200, 200, 20)}}
    assert _entry(cluster.step("2026-11-26T12:05:00Z"))["state"] == "Shadowing"  # failed; waits for a person
    entry = _entry(cluster.step("2026-11-26T12:11:20Z"))
    assert entry["state"] == "RolledBack"
    assert "onTimeout Promote, but" in entry["message"]
    assert "agreement 0.100 <" in entry["message"]


def test_on_timeout_hold_keeps_shadowing_and_says_so_once() -> None:
    cluster = _shadowing(timeout="10m", onTimeout="Hold")
    held = cluster.step("2026-11-26T12:11:20Z")
    assert _entry(held)["state"] == "Shadowing"
    assert _entry(held)["message"].startswith("ShadowTimeout: 12 of 100 requests in 10m; held until a person sets")
    assert [e.reason for e in held.events] == ["ShadowTimeout"]
    assert "ShadowTimeout" in WARNINGS
    later = cluster.step("2026-11-26T12:30:00Z")
    assert not later.events
    assert _entry(later)["state"] == "Shadowing"


def test_a_timeout_shorter_than_the_duration_is_refused_by_the_crd() -> None:
    import yaml

    from edgemodel_operator.api.generate import render_crd

    shadow = yaml.safe_load(render_crd())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["rollout"]
    rules = shadow["properties"]["shadow"]["x-kubernetes-validations"]
    assert any("duration(self.timeout) >= duration(self.duration)" in r["rule"] for r in rules)


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (45, "45s"), (1800, "30m"), (3900, "1h5m"), (3601, "1h1s")])
def test_spans_read_as_people_write_them(seconds: float, text: str) -> None:
    assert span(seconds) == text


# ---------------------------------------------------------------- build retries


def _fail_builds(cluster: PodCluster, exit_code: int) -> None:
    """Play the build Job failing with `exit_code` and its report (4: infrastructure; 2, 3: the model)."""
    reasons = {2: "BadInput", 3: "ToleranceMissed", 4: "InfrastructureFailure"}
    report = {"v": 1, "status": "failed", "exitCode": exit_code, "reason": reasons[exit_code],
              "message": f"exit {exit_code}"}  # fmt: skip
    for (kind, name), job in list(cluster.objects.items()):
        if kind == "Job" and not job.get("status"):
            job["status"] = {"conditions": [{"type": "Failed", "status": "True"}]}
            owner = [{"uid": job["metadata"]["uid"], "kind": "Job"}]
            cluster.objects["Pod", f"{name}-{job['metadata']['uid']}"] = {
                "metadata": {"name": f"{name}-x", "labels": {"job-name": name}, "ownerReferences": owner},
                "status": {"phase": "Failed", "containerStatuses": [
                    {"state": {"terminated": {"exitCode": exit_code, "message": json.dumps(report)}}}]},
            }  # fmt: skip


def _job(cluster: PodCluster, revision: str) -> Obj | None:
    return next((o for (k, n), o in cluster.objects.items() if k == "Job" and revision[:8] in n), None)


def _at(seconds: float) -> str:
    return f"2026-11-26T{12 + int(seconds // 3600):02d}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}Z"


def test_an_infrastructure_failure_is_retried_with_backoff_up_to_the_limit() -> None:
    cluster, _first, second = _cluster()
    now = 60.0
    delays = []
    for retry in range(RETRY_LIMIT + 1):
        _fail_builds(cluster, 4)
        failed = cluster.step(_at(now))
        entry = _entry(failed)
        assert entry["state"] == "Failed"
        if retry == RETRY_LIMIT:
            assert f"{RETRY_LIMIT} automatic retries spent: set {RETRY}" in entry["message"]
            assert failed.wake_after is None
            assert not cluster.step(_at(now + 7200)).delete  # no more retries
            break
        assert f"retry {retry + 1} of {RETRY_LIMIT} at" in entry["message"]
        delay = failed.wake_after
        assert delay is not None
        delays.append(delay)
        assert not cluster.step(_at(now + delay - 1)).delete  # not yet
        old = _job(cluster, second)
        assert old is not None
        retried = cluster.step(_at(now + delay))
        assert [e.reason for e in retried.events] == ["BuildRetried"]
        assert [d["name"] for d in retried.delete] == [old["metadata"]["name"]]  # the failed Job goes first
        assert not any(c["kind"] == "Job" for c in retried.create)
        cluster.objects = {k: v for k, v in cluster.objects.items() if v is not old}  # the Job is gone
        rebuilt = cluster.step(_at(now + delay + 1))
        assert [c["kind"] for c in rebuilt.create] == ["Job"]
        assert _entry(rebuilt)["state"] == "Building"
        now += delay + 10
    assert delays == [30.0, 60.0, 120.0, 240.0, 480.0]


@pytest.mark.parametrize("exit_code", [2, 3])
def test_a_model_or_validation_failure_is_not_retried(exit_code: int) -> None:
    cluster, _first, _second = _cluster()
    _fail_builds(cluster, exit_code)
    failed = cluster.step("2026-11-26T12:01:00Z")
    assert _entry(failed)["state"] == "Failed"
    assert "retry" not in _entry(failed)["message"]
    assert failed.wake_after is None
    assert not cluster.step("2026-11-26T14:00:00Z").delete


def test_a_failed_build_is_retried_once_per_new_value_of_the_retry_annotation() -> None:
    cluster, _first, second = _cluster()
    cluster.body["metadata"]["annotations"] = {RETRY: "left-over"}  # present before the build failed: asks nothing
    _fail_builds(cluster, 3)
    assert not cluster.step("2026-11-26T12:01:00Z").delete
    for value, at in (("1", 2), ("2", 5)):
        cluster.body["metadata"]["annotations"] = {RETRY: value}
        old = _job(cluster, second)
        assert old is not None
        retried = cluster.step(f"2026-11-26T12:0{at}:00Z")
        assert [e.message for e in retried.events if e.reason == "BuildRetried"] == [
            f"{_key(cluster)}: building {second} again, as {RETRY}={value} asks"
        ]
        cluster.objects = {k: v for k, v in cluster.objects.items() if v is not old}
        assert [c["kind"] for c in cluster.step(f"2026-11-26T12:0{at}:10Z").create] == ["Job"]
        _fail_builds(cluster, 3)  # fails again (its own pod: the old Job's is never read for it)
        assert _entry(cluster.step(f"2026-11-26T12:0{at}:20Z"))["state"] == "Failed"
        assert not cluster.step(f"2026-11-26T12:0{at + 1}:00Z").delete  # the same value: no second retry


def test_the_retry_count_lives_in_the_record() -> None:
    cluster, _first, second = _cluster()
    _fail_builds(cluster, 4)
    cluster.step("2026-11-26T12:01:00Z")
    cluster.body["status"] = copy.deepcopy({})  # a restart, a new leader: only the record and the cluster remain
    cluster.step("2026-11-26T12:01:30Z")
    record = parse(next(r for r in cluster.records.values() if second in r["metadata"]["name"]))
    assert record is not None
    (attempt,) = record.attempts.values()
    assert (attempt.state, attempt.retries) == ("Building", 1)


@given(st.lists(st.sampled_from([2, 3, 4]), min_size=1, max_size=12), st.integers(0, 3))
def test_automatic_retries_follow_infrastructure_failures_only_and_stop_at_the_limit(
    exits: list[int], requests: int
) -> None:
    """Any sequence of build failures, with retry requests among them: an automatic retry follows an exit 4
    only, after RETRY_FIRST_SECONDS doubling per retry taken, never more than RETRY_LIMIT of them."""
    application = Application(1)
    attempt = Attempt("r", "k", 1, "Building", T0)
    now, automatic, asked = 0.0, 0, 0
    for number, code in enumerate(exits):
        view = ClassView("Failed", {"status": "failed", "reason": "X", "exitCode": code}, True, None, 0, None,
                         job_uid=f"j{number}")  # fmt: skip
        context = Context(Rollout(), {}, application, _at(now))
        attempt, _steps, _ = advance(attempt, view, context)
        assert attempt.state == "Failed"
        view = dataclasses.replace(view, outcome=None)  # the planner reads an outcome only while Building
        due = due_in(attempt, view, context)
        assert (due is not None) == (code == 4 and automatic < RETRY_LIMIT)
        if due is not None:
            assert due == RETRY_FIRST_SECONDS * 2**automatic
            now += due
            attempt, steps, _ = advance(attempt, view, Context(Rollout(), {}, application, _at(now)))
            automatic += 1
        elif asked < requests:  # a person asks instead
            asked += 1
            annotations = {RETRY: f"try-{asked}"}
            attempt, steps, _ = advance(attempt, view, Context(Rollout(), annotations, application, _at(now)))
        else:
            break
        assert attempt.state == "Building"
        assert attempt.replaced_job == f"j{number}"
        assert [s.reason for s in steps] == ["BuildRetried"]
        now += 60
    assert (attempt.retries or 0) == automatic <= RETRY_LIMIT


ENGINE_IMAGE = "127.0.0.1:5000/engines/ocr@sha256:" + "e" * 64
INITIALIZING = _container({"waiting": {"reason": "PodInitializing"}})


def _init(state: Obj, last: Obj | None = None, restarts: int = 0) -> Obj:
    """The engine copy's init container status (see `enginecache.copy_init_container`)."""
    return _container(state, last, restarts) | {"name": "engine", "image": ENGINE_IMAGE}


@pytest.mark.parametrize(
    ("init", "says"),
    [
        (_init({"waiting": {"reason": "ErrImagePull", "message": "manifest unknown"}}),
         f"ErrImagePull: image {ENGINE_IMAGE} cannot be pulled: manifest unknown"),
        (_init({"waiting": {"reason": "ImagePullBackOff"}}),
         f"ImagePullBackOff: image {ENGINE_IMAGE} cannot be pulled"),
        (_init({"waiting": {"reason": "CrashLoopBackOff"}}, {"terminated": {"reason": "Error", "exitCode": 1}}, 3),
         "CrashLoopBackOff: container engine last exit: Error, exit code 1, restarted 3 times"),
        (_init({"terminated": {"reason": "OOMKilled", "exitCode": 137}}),
         "OOMKilled: container engine ran out of memory"),
        (_init({"running": {"startedAt": BUILT}}), None),  # copying: nothing wrong yet
        (_init({"terminated": {"reason": "Completed", "exitCode": 0}}), None),
    ],
    ids=["engine image error", "engine image back-off", "copy crash loop", "copy oom", "copying", "copied"],
)  # fmt: skip
def test_a_problem_of_the_engine_copy_init_container_is_the_pods_reason(init: Obj, says: str | None) -> None:
    """Serving pods copy their engine in an init container: while it cannot run, the serving container only
    waits in PodInitializing, which is no reason a person can act on."""
    pod = slim_serving_pod(_pod("r", "k", phase="Pending", initContainerStatuses=[init],
                                containerStatuses=[INITIALIZING]))  # fmt: skip
    problem = pod_problem([pod])
    assert problem == says if says is None else problem is not None and problem.startswith(says), problem
