"""Classes that blink keep what serves them: the operator as a real process at its default settings.

The only node of a class is cordoned, tainted, made NotReady, deleted and added again; through all
of it the class's Deployment, build Job and Services stay the same objects and no build starts
again. One test retires an absent class with a short grace period; its twin at the default grace
(10 minutes) is the delete/re-add test, which checks that nothing is deleted.
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import eventually, get
from tests.integration.operators import OperatorProcess, Pool, apply_edgemodel, finish_builds, pool_targets
from tests.testbed.cluster import Testbed
from tests.testbed.nodes import KWOK_ANNOTATION, X86_VNNI

pytestmark = pytest.mark.testbed
Obj = dict[str, Any]


@pytest.fixture
def operator(crd: Testbed, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[OperatorProcess]:
    """An operator at its default settings, or with the settings a test passes by indirect parametrisation."""
    running = OperatorProcess(crd, tmp_path / "operator.log", settings=getattr(request, "param", None))
    running.start()
    yield running
    running.stop()
    print(f"[operator] log: {running.log}", file=sys.stderr)


@pytest.fixture
def serving(operator: OperatorProcess, namespace: str) -> Iterator[tuple[Testbed, Obj]]:
    """One single-node class of this test's own pool, built and serving; the test bed and the node object."""
    bed = operator.bed
    nodes = Pool(bed, namespace)
    node = nodes.add(X86_VNNI)
    apply_edgemodel(bed, namespace, "ocr", targets=pool_targets(namespace))
    finish_builds(bed, namespace, count=1)
    bed.kubectl("wait", "-n", namespace, "--for=condition=Ready", "em/ocr", "--timeout=90s")
    yield bed, node
    nodes.remove()


def _objects(bed: Testbed, namespace: str) -> dict[str, str]:
    """Kind/name -> uid of every Deployment, Job and Service in the namespace."""
    found = {}
    for kind in ("deployments", "jobs", "services"):
        for item in get(bed, kind, "-n", namespace)["items"]:
            found[f"{kind}/{item['metadata']['name']}"] = item["metadata"]["uid"]
    return found


def _entry(bed: Testbed, namespace: str) -> Obj:
    classes = get(bed, "em", "ocr", "-n", namespace).get("status", {}).get("classes") or [{}]
    entry: Obj = classes[0]
    return entry


def _condition(bed: Testbed, node: str, kind: str, status: str, reason: str) -> None:
    """Set one condition of a node's status, as its kubelet would report it."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    condition = {"type": kind, "status": status, "reason": reason, "message": f"{kind} {status} (test)",
                 "lastHeartbeatTime": now, "lastTransitionTime": now}  # fmt: skip
    bed.kubectl("patch", "node", node, "--subresource=status", "--type=strategic",
                "-p", json.dumps({"status": {"conditions": [condition]}}))  # fmt: skip


def _until(bed: Testbed, namespace: str, check: Callable[[Obj], bool], what: str, timeout: float = 30) -> Obj:
    entry: Obj = eventually(lambda: (e := _entry(bed, namespace)) and check(e) and e, timeout=timeout, what=what)
    return entry


def test_cordon_taints_notready_and_a_lost_build_pod_delete_nothing_and_rebuild_nothing(
    serving: tuple[Testbed, Obj], namespace: str
) -> None:
    bed, node = serving
    name = node["metadata"]["name"]
    before = _objects(bed, namespace)
    assert sum(k.startswith("jobs/") for k in before) == 1
    assert sum(k.startswith("deployments/") for k in before) == 1

    bed.kubectl("cordon", name)  # seen at once through the node watch: resync is 600 s in these tests
    _until(bed, namespace, lambda e: e.get("schedulable") is False, "the class unschedulable")
    bed.kubectl("uncordon", name)
    _until(bed, namespace, lambda e: e.get("schedulable") is True, "the class schedulable again")

    # DiskPressure: the node lifecycle controller taints the node from its condition (and removes a
    # disk-pressure taint set by hand at once), so the condition is what changes here.
    _condition(bed, name, "DiskPressure", "True", "KubeletHasDiskPressure")
    _until(bed, namespace, lambda e: e.get("schedulable") is False, "unschedulable under DiskPressure")
    _condition(bed, name, "DiskPressure", "False", "KubeletHasNoDiskPressure")
    _until(bed, namespace, lambda e: e.get("schedulable") is True, "DiskPressure over")
    taint = "example.com/maintenance=now:NoExecute"  # evicts the serving pod: the Deployment stays, and waits
    bed.kubectl("taint", "node", name, taint)
    _until(bed, namespace, lambda e: e.get("schedulable") is False, "unschedulable under a NoExecute taint")
    bed.kubectl("taint", "node", name, "example.com/maintenance-")
    _until(bed, namespace, lambda e: e.get("schedulable") is True, "the NoExecute taint removed", timeout=60)

    # NotReady: the node's agent stops (KWOK lets go of it) after reporting NotReady, as a kubelet would.
    bed.kubectl("annotate", "node", name, f"{KWOK_ANNOTATION}-")
    _condition(bed, name, "Ready", "False", "KubeletNotReady")
    entry = _until(bed, namespace, lambda e: e.get("schedulable") is False, "the class unschedulable when NotReady")
    assert entry["nodeCount"] == 1
    bed.kubectl("annotate", "node", name, f"{KWOK_ANNOTATION}=fake")
    _until(bed, namespace, lambda e: e.get("schedulable") is True, "the node Ready again", timeout=60)

    # The finished build's pod is lost (garbage-collected): its outcome was kept on the Job.
    bed.kubectl("delete", "pods", "-n", namespace, "-l", "app.kubernetes.io/component=build", "--wait=true")
    time.sleep(3)
    entry = _until(bed, namespace, lambda e: e.get("state") == "Serving", "the class still serving", timeout=60)
    assert entry.get("artifactDigest")
    assert _objects(bed, namespace) == before
    events = bed.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=ocr").stdout
    assert "Removed" not in events
    assert events.count("BuildStarted") == 1


def test_a_node_deleted_and_added_again_finds_its_class_as_it_was(
    serving: tuple[Testbed, Obj], operator: OperatorProcess, namespace: str
) -> None:
    """At the default grace (10 minutes): the class turns Absent, nothing is deleted, nothing rebuilt;
    an operator restarted meanwhile keeps counting from the same absentSince."""
    bed, node = serving
    before = _objects(bed, namespace)
    bed.kubectl("delete", "node", node["metadata"]["name"], "--wait=true")
    entry = _until(bed, namespace, lambda e: e.get("state") == "Absent", "the class Absent")
    assert (entry["lastState"], entry["nodeCount"]) == ("Serving", 0)
    assert entry["absentSince"]
    time.sleep(2)
    operator.kill()
    operator.start()
    time.sleep(3)  # the restarted operator has listed everything and reconciled
    assert _entry(bed, namespace)["absentSince"] == entry["absentSince"]
    assert _objects(bed, namespace) == before
    bed.apply_objects([node])  # the same node (name, labels, taint of the pool) comes back
    _until(bed, namespace, lambda e: e.get("state") == "Serving", "the class serving again", timeout=90)
    assert _objects(bed, namespace) == before
    events = bed.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=ocr").stdout
    assert "Removed" not in events
    assert events.count("BuildStarted") == 1


@pytest.mark.parametrize("operator", [{"absent_class_grace_seconds": "4"}], indirect=True, ids=["grace 4s"])
def test_with_a_short_grace_an_absent_class_is_retired_after_it(serving: tuple[Testbed, Obj], namespace: str) -> None:
    """The same path as the test above with a 4 s grace: once it is over, what served the class goes."""
    bed, node = serving
    bed.kubectl("delete", "node", node["metadata"]["name"], "--wait=true")
    entry = _until(bed, namespace, lambda e: e.get("state") == "Absent", "the class Absent")
    since = datetime.datetime.fromisoformat(entry["absentSince"])
    eventually(lambda: not get(bed, "deployments", "-n", namespace)["items"], timeout=60, what="the Deployment deleted")
    assert datetime.datetime.now(datetime.UTC) >= since + datetime.timedelta(seconds=4)
    eventually(lambda: not get(bed, "jobs", "-n", namespace)["items"], timeout=30, what="the Job deleted")
    status = get(bed, "em", "ocr", "-n", namespace)["status"]
    assert status["classes"] == []
