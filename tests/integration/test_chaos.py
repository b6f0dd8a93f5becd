"""A two-class rollout (one class promotes, one rolls back) with the operator killed at random instants
and the apiserver restarted once: the same final state as undisturbed, each decision made once.

Real parts as in test_decisions.py (whose `StablePods` play the stable pods' shadow counters): the
control plane and KWOK nodes, Debian's Prometheus, the operator as a process at its default settings.
A watcher thread records every Job and candidate Deployment it sees (name and UID) for the whole run.
Bounded to about two minutes: the kills are spread over the rollout's busy part (build results, candidates,
shadow start, both decisions), every 1-4 s.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import eventually, get
from tests.integration.operators import OperatorProcess, Pool, apply_edgemodel, finish_builds, pool_targets
from tests.integration.test_decisions import StablePods
from tests.testbed.cluster import Testbed
from tests.testbed.nodes import ARM64_CPU, X86_VNNI
from tests.testbed.prometheus import Prometheus

pytestmark = pytest.mark.testbed
NAME = "chaos"
FIRST, SECOND = "c" * 64, "d" * 64
ROLLOUT = {"shadow": {"minRequests": 100, "duration": "1s"}, "analysis": {"maxErrorRate": 0.01}}
KILLS = int(os.environ.get("EDGEMODEL_CHAOS_KILLS", "20"))  # at 20 random instants, as a fleet's worst day might


class Watcher(threading.Thread):
    """Every Job and Deployment of the EdgeModel seen while the test runs: name -> UIDs, and tracks."""

    def __init__(self, bed: Testbed, namespace: str) -> None:
        super().__init__(daemon=True)
        self.bed, self.namespace, self.stop = bed, namespace, threading.Event()
        self.uids: dict[tuple[str, str], set[str]] = {}
        self.candidates: dict[str, list[float]] = {}  # candidate Deployment name -> times seen

    def run(self) -> None:
        while not self.stop.is_set():
            for kind in ("jobs", "deployments"):
                result = self.bed.kubectl("get", kind, "-n", self.namespace, "-l", f"edgeml.dev/edgemodel={NAME}",
                                          "-o", "json", check=False)  # fmt: skip
                if result.returncode != 0:  # the apiserver restarting
                    continue
                for item in json.loads(result.stdout)["items"]:
                    meta = item["metadata"]
                    self.uids.setdefault((kind, meta["name"]), set()).add(meta["uid"])
                    if meta["labels"].get("edgeml.dev/track") == "candidate":
                        self.candidates.setdefault(meta["name"], []).append(time.monotonic())
            time.sleep(0.3)


def _record(bed: Testbed, namespace: str, revision: str) -> dict[str, dict[str, Any]]:
    found = get(bed, "configmaps", "-n", namespace, "-l", f"edgeml.dev/edgemodel={NAME},edgeml.dev/revision={revision}")
    items = [c for c in found["items"] if c["metadata"]["labels"].get("app.kubernetes.io/component") == "record"]
    data: dict[str, str] = items[0]["data"] if items else {}
    return {k.removeprefix("class."): json.loads(v) for k, v in data.items() if k.startswith("class.")}


def _killer(operator: OperatorProcess, stop: threading.Event, seed: int, kills: list[float]) -> None:
    chance = random.Random(seed)  # noqa: S311 - instants for a test, not secrets
    while not stop.is_set() and len(kills) < KILLS:
        time.sleep(chance.uniform(1.0, 4.0))
        operator.kill()
        kills.append(time.monotonic())
        operator.start()


def test_a_rollout_with_the_operator_killed_at_random_instants_ends_as_undisturbed(
    crd: Testbed, tmp_path: Path
) -> None:
    namespace = f"chaos-{os.getpid()}"
    crd.kubectl("create", "namespace", namespace)
    pool = Pool(crd, namespace)
    pool.add(X86_VNNI)
    pool.add(ARM64_CPU)
    prometheus = Prometheus(tmp_path / "prometheus").start()
    operator = OperatorProcess(crd, tmp_path / "operator.log", settings={
        "prometheus_url": prometheus.url, "namespaces": json.dumps([namespace]),
    })  # fmt: skip
    watcher = Watcher(crd, namespace)
    stop = threading.Event()
    kills: list[float] = []
    try:
        operator.start()
        apply_edgemodel(crd, namespace, NAME, digest=FIRST, targets=pool_targets(namespace), rollout=ROLLOUT)
        keys = sorted(j["metadata"]["labels"]["edgeml.dev/class"] for j in finish_builds(crd, namespace, count=2))
        crd.kubectl("wait", "-n", namespace, "--for=condition=Ready", f"em/{NAME}", "--timeout=60s")
        first = get(crd, "em", NAME, "-n", namespace)["status"]["revisions"]["stable"]
        failing, promoting = keys
        pods = {key: StablePods(key, NAME) for key in keys}
        prometheus.set_targets(p.target(namespace) for p in pods.values())
        for address, _ in (p.target(namespace) for p in pods.values()):
            prometheus.wait_until_up(address)
        watcher.start()
        seed = int(os.environ.get("EDGEMODEL_CHAOS_SEED", random.randrange(2**32)))  # noqa: S311
        print(f"[chaos] seed {seed}")
        killer = threading.Thread(target=_killer, args=(operator, stop, seed, kills), daemon=True)
        killer.start()

        apply_edgemodel(crd, namespace, NAME, digest=SECOND, targets=pool_targets(namespace), rollout=ROLLOUT)
        (build, _) = finish_builds(crd, namespace, count=2)
        second = build["metadata"]["labels"]["edgeml.dev/revision"]
        eventually(lambda: {a.get("state") for a in _record(crd, namespace, second).values()} == {"Shadowing"},
                   timeout=120, what="both classes shadowing")  # fmt: skip
        crd.restart("kube-apiserver", down_seconds=2)
        pods[failing].count(second, errors=5000)
        pods[promoting].count(second, agreed=200)
        eventually(lambda: {k: a.get("state") for k, a in _record(crd, namespace, second).items()}
                   == {failing: "RolledBack", promoting: "Promoted"}, timeout=120, what="both decisions")  # fmt: skip
        decided = time.monotonic()
        killer.join(120)
        stop.set()

        def final() -> Any:
            classes = {c["key"]: c for c in get(crd, "em", NAME, "-n", namespace)["status"]["classes"]}
            return {k: (c["state"], c.get("revision")) for k, c in classes.items()} == {
                failing: ("RolledBack", first), promoting: ("Serving", second)} and classes  # fmt: skip

        eventually(final, timeout=120, what="the undisturbed run's final state")
        deployments = {d["metadata"]["name"]: d["metadata"]["labels"]["edgeml.dev/track"]
                       for d in get(crd, "deployments", "-n", namespace)["items"]}  # fmt: skip
        assert sorted(deployments.values()) == ["stable", "stable"], deployments
    finally:
        stop.set()
        watcher.stop.set()
        operator.stop()
        prometheus.stop()
    _each_decision_once(crd, namespace, watcher, kills, (failing, promoting, second, decided))
    crd.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    pool.remove()


def _each_decision_once(
    bed: Testbed, namespace: str, watcher: Watcher, kills: list[float], run: tuple[str, str, str, float]
) -> None:
    """No object created twice, no rolled-back candidate recreated, no decision Event repeated."""
    failing, promoting, second, decided = run
    print(
        f"[chaos] {len(kills)} kills; the last {time.monotonic() - kills[-1]:.0f}s ago" if kills else "[chaos] no kill"
    )
    assert len(kills) == KILLS
    duplicated = {name: uids for name, uids in watcher.uids.items() if len(uids) > 1}
    assert not duplicated, f"objects created more than once: {duplicated}"
    failing_candidate = [n for n in watcher.candidates if n.endswith(failing[-8:]) and second[:8] in n]
    assert failing_candidate, watcher.candidates
    seen_after = [t for n in failing_candidate for t in watcher.candidates[n] if t > decided + 5]
    assert not seen_after, "the rolled-back candidate was recreated"
    events = get(bed, "events", "-n", namespace)["items"]
    for reason, key in (("RolledBack", failing), ("Promoted", promoting), ("ShadowStarted", failing),
                        ("ShadowStarted", promoting), ("CandidateStarted", failing)):  # fmt: skip
        found = [e for e in events if e["reason"] == reason and key in e["message"]]
        assert len(found) <= 1, (reason, key, [e["message"] for e in found])
