"""Decisions that survive the status being held back: the operator as a process at its default settings.

Real parts: the control plane and KWOK nodes of the test bed (two CPU classes of this module's own pool),
the operator process with every setting at its default (the status hold of 30 s included) but the
namespace it watches and the Prometheus it reads, and Debian's Prometheus. KWOK runs no containers, so
the stable pods' shadow counters come from `StablePods`, one exporter per class that plays what the
stable pods of that class would export (the runtime's metric names and labels), registered as a
Prometheus target with the labels the chart's PodMonitor gives a serving pod. The real mirroring path
is tested in test_rollout.py.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from tests.helpers import eventually, free_port, get
from tests.integration.operators import OperatorProcess, Pool, apply_edgemodel, finish_builds, pool_targets
from tests.testbed.cluster import Testbed
from tests.testbed.nodes import ARM64_CPU, X86_VNNI
from tests.testbed.prometheus import Prometheus

pytestmark = pytest.mark.testbed
NAME = "dec"
FIRST, SECOND = "a" * 64, "b" * 64
# The failing class crosses the error budget at once; the other never reaches minRequests: it shadows on.
ROLLOUT = {"shadow": {"minRequests": 100000, "duration": "1s"}, "analysis": {"maxErrorRate": 0.01}}


class StablePods:
    """What the stable pods of one class export while they mirror to a candidate (see the module docstring)."""

    def __init__(self, key: str, edgemodel: str = NAME) -> None:
        self.key, self.edgemodel, self.port = key, edgemodel, free_port()
        self.registry = CollectorRegistry()
        labels = ("model", "stable_revision", "candidate_revision")
        self.counters = {
            name: Counter(f"edgemodel_shadow_{name}", name, labels, registry=self.registry)
            for name in ("mirrored", "compared", "agreed", "candidate_errors")
        }
        self.ratio = Histogram("edgemodel_shadow_latency_ratio", "ratio", labels, registry=self.registry)
        self.server, _thread = start_http_server(self.port, addr="127.0.0.1", registry=self.registry)

    def count(self, candidate: str, *, agreed: int = 0, errors: int = 0) -> None:
        labels = {"model": self.edgemodel, "stable_revision": "s", "candidate_revision": candidate}
        self.counters["mirrored"].labels(**labels).inc(agreed + errors)
        self.counters["compared"].labels(**labels).inc(agreed)
        self.counters["agreed"].labels(**labels).inc(agreed)
        self.counters["candidate_errors"].labels(**labels).inc(errors)
        for _ in range(agreed):
            self.ratio.labels(**labels).observe(1.0)

    def target(self, namespace: str) -> tuple[str, dict[str, str]]:
        labels = {
            "namespace": namespace,
            "edgemodel": self.edgemodel,
            "class": self.key,
            "pod": f"stable-{self.key[-8:]}",
        }
        return f"127.0.0.1:{self.port}", labels


@dataclass
class Scene:
    bed: Testbed
    namespace: str
    prometheus: Prometheus
    keys: list[str]
    pods: dict[str, StablePods]


@pytest.fixture(scope="module")
def scene(crd: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    directory = tmp_path_factory.mktemp("decisions")
    namespace = f"decisions-{os.getpid()}"
    crd.kubectl("create", "namespace", namespace)
    pool = Pool(crd, namespace)
    pool.add(X86_VNNI)
    pool.add(ARM64_CPU)
    prometheus = Prometheus(directory / "prometheus").start()
    operator = OperatorProcess(crd, directory / "operator.log", settings={
        "prometheus_url": prometheus.url, "namespaces": json.dumps([namespace]),
    })  # fmt: skip
    operator.start()
    apply_edgemodel(crd, namespace, NAME, digest=FIRST, targets=pool_targets(namespace), rollout=ROLLOUT)
    jobs = finish_builds(crd, namespace, count=2)
    keys = sorted(job["metadata"]["labels"]["edgeml.dev/class"] for job in jobs)
    crd.kubectl("wait", "-n", namespace, "--for=condition=Ready", f"em/{NAME}", "--timeout=60s")
    pods = {key: StablePods(key) for key in keys}
    prometheus.set_targets(p.target(namespace) for p in pods.values())
    for address, _labels in (p.target(namespace) for p in pods.values()):
        prometheus.wait_until_up(address)
    yield Scene(crd, namespace, prometheus, keys, pods)
    operator.stop()
    prometheus.stop()
    for exporter in pods.values():
        exporter.server.shutdown()
    crd.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    pool.remove()


def _events(scene: Scene, reason: str, key: str) -> list[dict[str, Any]]:
    items = get(scene.bed, "events", "-n", scene.namespace, "--field-selector", f"reason={reason}")["items"]
    return [e for e in items if key in e["message"]]


def _classes(scene: Scene) -> dict[str, dict[str, Any]]:
    status = get(scene.bed, "em", NAME, "-n", scene.namespace).get("status") or {}
    return {entry["key"]: entry for entry in status.get("classes") or []}


def _candidates(scene: Scene, key: str) -> list[str]:
    selector = f"edgeml.dev/edgemodel={NAME},edgeml.dev/class={key},edgeml.dev/track=candidate"
    return [
        d["metadata"]["name"] for d in get(scene.bed, "deployments", "-n", scene.namespace, "-l", selector)["items"]
    ]


def test_a_rollback_is_kept_while_another_class_shadows_on(scene: Scene) -> None:
    """One class rolls back while the other shadows on, so the status is not settled and, at the default
    hold, figures wait up to 30 s: the rollback must neither wait with them nor be undone."""
    failing, shadowing = scene.keys
    apply_edgemodel(scene.bed, scene.namespace, NAME, digest=SECOND, targets=pool_targets(scene.namespace),
                    rollout=ROLLOUT)  # fmt: skip
    (build, _) = finish_builds(scene.bed, scene.namespace, count=2)
    candidate = build["metadata"]["labels"]["edgeml.dev/revision"]
    eventually(lambda: all(_events(scene, "ShadowStarted", key) for key in scene.keys), what="both classes shadowing")
    scene.pods[failing].count(candidate, errors=5000)
    scene.pods[shadowing].count(candidate, agreed=10)
    eventually(lambda: _events(scene, "RolledBack", failing), what="the failing class rolled back")
    decided = time.monotonic()
    shown = eventually(lambda: _classes(scene)[failing]["state"] == "RolledBack" and time.monotonic() - decided,
                       timeout=30, what="RolledBack in the status")  # fmt: skip
    assert shown < 10, f"a decision waited {shown:.0f}s for the status hold"
    seen: list[str] = []
    while time.monotonic() - decided < 15:  # the candidate's deletion and several analysis ticks
        seen += _candidates(scene, failing)
        time.sleep(0.5)
    assert not seen, f"the rolled-back candidate came back: {sorted(set(seen))}"
    assert _candidates(scene, shadowing), "the other class's candidate shadows on"
    assert _classes(scene)[shadowing]["state"] == "Shadowing"
    for reason, key in (("RolledBack", failing), ("CandidateStarted", failing), ("ShadowStarted", failing),
                        ("ShadowStarted", shadowing)):  # fmt: skip
        assert len(_events(scene, reason, key)) == 1, (reason, key, _events(scene, reason, key))
    started = {_classes(scene)[key]["shadow"]["started"] for key in scene.keys}
    time.sleep(6)  # another analysis tick at the default interval
    assert {_classes(scene)[key]["shadow"]["started"] for key in scene.keys} == started


def test_records_name_the_attempt_and_its_decision(scene: Scene) -> None:
    failing, _ = scene.keys
    selector = f"edgeml.dev/edgemodel={NAME},app.kubernetes.io/component=record"
    records = get(scene.bed, "configmaps", "-n", scene.namespace, "-l", selector)["items"]
    by_revision = {r["metadata"]["labels"]["edgeml.dev/revision"]: r for r in records}
    candidate = get(scene.bed, "em", NAME, "-n", scene.namespace)["status"]["revisions"]["candidate"]
    attempt = json.loads(by_revision[candidate]["data"][f"class.{failing}"])
    assert attempt["state"] == "RolledBack"
    assert attempt["decision"] == "Rollback"
    assert "error rate" in attempt["reason"]
    assert "baseline" not in attempt  # empty: nothing counted for this candidate before it shadowed
    assert attempt["shadowStarted"] <= attempt["decided"]
    assert json.loads(by_revision[candidate]["data"]["spec"])["model"]["sha256"] == SECOND


def _attempts(scene: Scene, revision: str) -> dict[str, dict[str, Any]]:
    selector = f"edgeml.dev/edgemodel={NAME},edgeml.dev/revision={revision},app.kubernetes.io/component=record"
    items = get(scene.bed, "configmaps", "-n", scene.namespace, "-l", selector)["items"]
    data: dict[str, str] = items[0]["data"] if items else {}
    return {k.removeprefix("class."): json.loads(v) for k, v in data.items() if k.startswith("class.")}


def test_a_revision_applied_again_is_judged_on_its_new_attempt_and_a_left_approval_approves_nothing(
    scene: Scene,
) -> None:
    """The second revision failed on one class (5000 candidate errors counted by its stable pods) and
    shadows on the other; someone approves it. The first revision is applied again, then the second
    again, without autoPromote: its new attempt must neither be rolled back on the old errors nor be
    promoted by the approval left on the object; an approval naming the new attempt promotes it."""
    failing, _ = scene.keys
    second = _candidate_revision(scene)
    scene.bed.kubectl("annotate", "em", NAME, "-n", scene.namespace, f"edgeml.dev/promote={second}", "--overwrite")
    apply_edgemodel(scene.bed, scene.namespace, NAME, digest=FIRST, targets=pool_targets(scene.namespace),
                    rollout=ROLLOUT)  # fmt: skip
    eventually(lambda: {c["state"] for c in _classes(scene).values()} == {"Serving"}, what="the first revision again")
    again = {"shadow": {"minRequests": 100, "duration": "1s"}, "analysis": {"maxErrorRate": 0.01}, "autoPromote": False}
    apply_edgemodel(scene.bed, scene.namespace, NAME, digest=SECOND, targets=pool_targets(scene.namespace),
                    rollout=again)  # fmt: skip
    generation = get(scene.bed, "em", NAME, "-n", scene.namespace)["metadata"]["generation"]
    eventually(lambda: {a["state"] for a in _attempts(scene, second).values()} == {"Shadowing"}
               and {a["application"] for a in _attempts(scene, second).values()} == {generation},
               what="the second revision shadowing again, with no new build")  # fmt: skip
    assert not get(scene.bed, "jobs", "-n", scene.namespace, "-l", f"edgeml.dev/revision={second}")["items"]
    for key in scene.keys:
        scene.pods[key].count(second, agreed=200)
    waiting = eventually(
        lambda: (
            {k: c["shadow"].get("decision") for k, c in _classes(scene).items()}
            == dict.fromkeys(scene.keys, "AwaitingApproval")
            and _classes(scene)
        ),
        what="both classes passed and waiting for an approval",
    )
    identity = f"{second}@{generation}"
    assert all(identity in entry["message"] for entry in waiting.values()), waiting
    assert _attempts(scene, second)[failing]["baseline"], "the old attempt's counts are the new one's baseline"
    scene.bed.kubectl("annotate", "em", NAME, "-n", scene.namespace, f"edgeml.dev/promote={identity}", "--overwrite")
    eventually(lambda: {(c["state"], c.get("revision")) for c in _classes(scene).values()} == {("Serving", second)},
               what="both classes promoted")  # fmt: skip
    assert {a["approval"] for a in _attempts(scene, second).values()} == {f"edgeml.dev/promote={identity}"}


def _candidate_revision(scene: Scene) -> str:
    revisions = get(scene.bed, "em", NAME, "-n", scene.namespace)["status"]["revisions"]
    return str(revisions.get("candidate"))
