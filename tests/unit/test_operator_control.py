"""The reconciler's control rules: status pacing, merge patches, the work queue, peering, slim objects."""

from __future__ import annotations

import asyncio
import copy
import datetime
from typing import Any

import pytest

from edgemodel_operator import pacing
from edgemodel_operator.builders import Images
from edgemodel_operator.controller import slim_edgemodel, slim_job, slim_node, slim_pod, slim_service, slim_workload
from edgemodel_operator.reconcile import plan
from edgemodel_operator.workqueue import WorkQueue
from tests.unit.test_operator_pure import NOW, _finished, _observed, edgemodel

Obj = dict[str, Any]


def _status(generation: int, progressing: bool, classes: str = "0/4", state: str = "Shadowing",
            requests: int = 0) -> Obj:  # fmt: skip
    shadow = {"revision": "b", "started": "2026-11-26T12:00:00Z", "requests": requests, "decision": "Pending",
              "reason": f"{requests}/100 mirrored requests"}  # fmt: skip
    return {
        "observedGeneration": generation,
        "classesReady": classes,
        "conditions": [{"type": "Progressing", "status": "True" if progressing else "False", "message": "m"}],
        "classes": [{"key": "c", "state": state, "message": shadow["reason"], "shadow": shadow}],
    }


@pytest.mark.parametrize(
    ("new", "current", "held_since", "expected"),
    [
        (_status(1, True), _status(1, True), None, None),  # nothing changed
        (_status(2, True), _status(1, False), None, 0.0),  # a new generation is written at once
        (_status(1, False, "4/4"), _status(1, True), None, 0.0),  # settled: at once
        (_status(1, True, "2/4"), _status(1, True), None, 0.0),  # a class more ready: a state change, at once
        (_status(1, True, state="RolledBack"), _status(1, True), None, 0.0),  # a decision: at once, never held
        (_status(1, True, requests=7), _status(1, True), None, 5.0),  # only figures changed: held
        (_status(1, True, requests=7), _status(1, True), 98.0, 3.0),  # held 2 s ago: 3 s to go
        (_status(1, True, requests=7), _status(1, True), 90.0, 0.0),  # held long enough: written
    ],
    ids=["unchanged", "new generation", "settled", "class ready", "decision", "figures", "held", "hold over"],
)
def test_status_writes_hold_back_only_figures(
    new: Obj, current: Obj, held_since: float | None, expected: float | None
) -> None:
    assert pacing.write_delay(new, current, held_since=held_since, now=100.0, hold=5.0) == expected


def test_merge_patch_removes_what_is_gone_and_keeps_what_is_equal() -> None:
    old = {"phase": "Progressing", "revisions": {"candidate": "a", "stable": "s"}, "classes": [1, 2], "same": 1}
    new = {"phase": "Ready", "revisions": {"stable": "a"}, "classes": [1], "same": 1}
    patch = pacing.merge_patch(old, new)
    assert patch == {"phase": "Ready", "revisions": {"candidate": None, "stable": "a"}, "classes": [1]}

    def apply(target: Obj, change: Obj) -> Obj:  # RFC 7386, as the apiserver applies it
        result = copy.deepcopy(target)
        for key, value in change.items():
            if value is None:
                result.pop(key, None)
            elif isinstance(value, dict) and isinstance(result.get(key), dict):
                result[key] = apply(result[key], value)
            else:
                result[key] = value
        return result

    assert apply(old, patch) == new


def test_work_queue_hands_out_each_key_once_and_requeues_one_changed_while_active() -> None:
    async def scenario() -> list[str]:
        queue: WorkQueue[str] = WorkQueue()
        seen = []
        for key in ("a", "b", "a", "a"):
            queue.add(key)
        assert len(queue) == 2
        first = await queue.get()
        queue.add(first)  # changed while a worker has it: not handed to a second worker
        second = await queue.get()
        seen += [first, second]
        assert len(queue) == 0
        queue.done(first)  # ... but queued again once the first worker is done
        seen.append(await queue.get())
        queue.add_after("c", 0.05)
        queue.add_after("c", 10)  # the earlier delay wins
        seen.append(await asyncio.wait_for(queue.get(), 2))
        queue.add_after("d", 0.05)
        queue.forget("d")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(queue.get(), 0.2)
        return seen

    assert asyncio.run(scenario()) == ["a", "b", "a", "c"]


def _peer(priority: int, seconds_ago: float, now: datetime.datetime, lifetime: int = 60) -> Obj:
    seen = now - datetime.timedelta(seconds=seconds_ago)
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}


@pytest.mark.parametrize(
    ("others", "expected"),
    [
        ({}, True),
        ({"b": (50, 1)}, True),  # a lower priority stands by
        ({"b": (200, 1)}, False),  # a higher priority acts
        ({"b": (200, 120)}, True),  # ... unless its record expired
    ],
    ids=["alone", "lower peer", "higher peer", "higher peer dead"],
)
def test_the_live_replica_with_the_highest_priority_acts(
    others: dict[str, tuple[int, float]], expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEMODEL_PEERING", "edgemodel")
    monkeypatch.setenv("EDGEMODEL_PEERING_PRIORITY", "100")
    from edgemodel_operator.handlers import Peering
    from edgemodel_operator.settings import OperatorSettings

    now = datetime.datetime.now(datetime.UTC)
    peering = Peering(OperatorSettings())
    assert peering.active is False  # stands by until it has read the record
    peers = {"a": _peer(100, 1, now)} | {k: _peer(p, ago, now) for k, (p, ago) in others.items()}
    assert peering.decide(peers, now) is expected
    assert peering.decide({k: v for k, v in peers.items() if k != "a"}, now) is False  # not registered yet


def test_the_planner_reads_nothing_the_slim_copies_drop() -> None:
    """Plans from the slim copies the watches keep equal plans from the full objects, at every step."""
    body = edgemodel()
    body["metadata"] |= {"managedFields": [{"manager": "kubectl"}], "annotations": {"note": "x" * 1000}}
    jobs = [o for o in plan(_observed(body), Images(), NOW).create if o["kind"] == "Job"]
    ok = {
        "v": 1,
        "status": "built",
        "exitCode": 0,
        "cacheKey": "k",
        "artifact": {"reference": "oci://r/e@sha256:" + "a" * 64},
    }
    finished = [_finished(j, ok) for j in jobs]
    full_jobs = [j | {"metadata": j["metadata"] | {"managedFields": [{"x": 1}]}} for j, _ in finished]
    pods = [p | {"spec": {"containers": [{"name": "build"}]}} for _, p in finished]
    served = plan(_observed(body, jobs=full_jobs, pods=pods), Images(), NOW).create
    workloads = [
        o | {"status": {"readyReplicas": 1, "observedGeneration": 1}} for o in served if o["kind"] == "Deployment"
    ]
    services = [o for o in served if o["kind"] == "Service"]
    full = _observed(body, jobs=full_jobs, pods=pods, deployments=workloads, services=services)
    slimmed = _observed(
        slim_edgemodel(body), jobs=[slim_job(j) for j in full_jobs], pods=[slim_pod(p) for p in pods],
        nodes=[slim_node(n) for n in full.nodes], deployments=[slim_workload(w) for w in workloads],
        services=[slim_service(s) for s in services],
    )  # fmt: skip
    assert plan(slimmed, Images(), NOW) == plan(full, Images(), NOW)
    assert plan(full, Images(), NOW).status["phase"] == "Ready"  # the comparison covered serving, too
    assert "managedFields" not in slim_job(full_jobs[0])["metadata"]
    assert "spec" not in slim_pod(pods[0])
    template = slim_workload(workloads[0])["spec"]["template"]  # of the pod template, only what names the artifact
    assert template == {
        "spec": {"containers": [{"args": workloads[0]["spec"]["template"]["spec"]["containers"][0]["args"]}]}
    }


def test_a_build_no_node_can_take_is_reported_pending_with_the_schedulers_reason() -> None:
    body = edgemodel()
    jobs = [o for o in plan(_observed(body), Images(), NOW).create if o["kind"] == "Job"]
    waiting = {
        "metadata": {"name": jobs[0]["metadata"]["name"] + "-x", "labels": {"job-name": jobs[0]["metadata"]["name"]}},
        "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                   "reason": "Unschedulable", "message": "0/6 nodes are available: 1 Insufficient nvidia.com/gpu."}]},
    }  # fmt: skip
    status = plan(_observed(body, jobs=jobs, pods=[waiting]), Images(), NOW).status
    pending = [c for c in status["classes"] if c["state"] == "Pending"]
    assert len(pending) == 1
    assert "Insufficient nvidia.com/gpu" in pending[0]["message"]
    built = next(c for c in status["conditions"] if c["type"] == "EnginesBuilt")
    assert built["reason"] == "Unschedulable"
    assert status["phase"] == "Progressing"


def test_the_readme_documents_every_operator_setting() -> None:
    from pathlib import Path

    from edgemodel_operator.settings import OperatorSettings

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [f"EDGEMODEL_{name.upper()}" for name in OperatorSettings.model_fields
               if f"`EDGEMODEL_{name.upper()}`" not in readme]  # fmt: skip
    assert not missing, f"README.md's settings table lacks {missing}"


def test_a_replica_taking_over_forgets_objects_deleted_while_it_stood_by() -> None:
    from edgemodel_operator.controller import phantoms

    indexed = [{"metadata": {"uid": uid}} for uid in ("kept", "deleted-meanwhile", "added-during-the-list")]
    assert phantoms(indexed, live={"kept", "new"}, seen={"added-during-the-list"}) == {"deleted-meanwhile"}
    assert phantoms([{"metadata": {}}], live=set(), seen=set()) == set()  # nothing without a UID is dropped


def test_a_replica_that_stops_being_active_writes_nothing_more() -> None:
    """`Cluster.apply` checks before every write; the client points at a closed port, so any write that
    was still attempted would fail with a connection error instead of NotActiveError."""
    from kubernetes import client

    from edgemodel_operator.cluster import Cluster, NotActiveError
    from edgemodel_operator.reconcile import Plan

    configuration = client.Configuration()
    configuration.host = "http://127.0.0.1:9"  # discard: nothing answers
    configuration.retries = 0
    cluster = Cluster(client.ApiClient(configuration))
    result = Plan(create=[{"kind": "Job", "metadata": {"name": "j", "namespace": "n"}}])
    with pytest.raises(NotActiveError):
        cluster.apply(result, active=lambda: False)
    answers = iter([True, False])  # active when the plan starts, not any more before its first create
    with pytest.raises(NotActiveError):
        cluster.apply(result, active=lambda: next(answers))


def test_a_status_stored_with_the_schemas_defaults_is_not_written_again() -> None:
    """The API server fills the CRD's defaults in (readyReplicas 0, state Pending, shadow requests 0, condition
    message ""): compared with them filled in, the planned status equals the stored one and nothing is written."""
    result = plan(_observed(edgemodel()), Images(), NOW)
    planned = result.status
    stored = pacing.with_defaults(copy.deepcopy(planned))
    assert any("readyReplicas" not in entry for entry in planned["classes"])  # the case that rewrote forever
    assert pacing.write_delay(planned, stored, held_since=None, now=0.0, hold=30.0) == 0.0
    assert pacing.write_delay(pacing.with_defaults(planned), stored, held_since=None, now=0.0, hold=30.0) is None
    assert pacing.with_defaults({"classes": [{"shadow": {}}], "conditions": [{}]}) == {
        "classes": [{"shadow": {"requests": 0}, "nodeCount": 0, "readyReplicas": 0, "state": "Pending"}],
        "conditions": [{"message": ""}],
    }
