"""The rollout, pure: analysis checks, and the plan at each step of shadow, promote and roll back."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from edgemodel_operator.analysis import Counters, Evidence, analyse
from edgemodel_operator.api.spec import EdgeModelSpec, Rollout
from edgemodel_operator.builders import Images, revision_of
from edgemodel_operator.reconcile import APPROVE, Observed, Plan, plan
from tests.unit.test_operator_pure import DIGEST, NODES

Obj = dict[str, Any]
CPU_ONLY = [n for n in NODES if n["metadata"]["name"].startswith("edge-x86")]  # one class keeps the story short
T0 = "2026-11-26T12:00:00Z"
CREATED = 1_795_696_200.0  # 2026-11-26T12:30:00Z in Unix seconds: after every shadow start here


def _rollout(**changes: Any) -> Rollout:
    base: Obj = {"shadow": {"minRequests": 100, "duration": "60s"}, "analysis": {}}
    return Rollout.model_validate(base | changes)


@pytest.mark.parametrize(
    ("evidence", "elapsed", "decision", "says"),
    [
        (Evidence(mirrored=50, compared=50, agreed=50, latency_ratio=1.0), 120, "Pending", "50/100 mirrored"),
        (Evidence(mirrored=200, compared=200, agreed=200, latency_ratio=1.0), 10, "Pending", "shadowed 10s of 60s"),
        (Evidence(mirrored=200, compared=200, agreed=199, latency_ratio=1.1), 61, "Promote", "agreement 0.995 >="),
        (Evidence(mirrored=200, compared=200, agreed=150, latency_ratio=1.0), 61, "Rollback", "agreement 0.750 <"),
        (Evidence(mirrored=200, compared=200, agreed=200, latency_ratio=2.0), 61, "Rollback", "latency ratio 2.00 >"),
        # A candidate that crashed: more failures than the error budget allows at minRequests, before
        # either minRequests or the duration is reached.
        (Evidence(mirrored=20, compared=0, errors=20), 3, "Rollback", "candidate error rate 1.000"),
        (
            Evidence(mirrored=200, compared=199, agreed=199, errors=1, latency_ratio=1.0),
            61,
            "Promote",
            "<= maxErrorRate",
        ),
    ],
    ids=["few requests", "too soon", "agrees", "disagrees", "slow", "crashed", "one error within budget"],
)
def test_analysis(evidence: Evidence, elapsed: float, decision: str, says: str) -> None:
    verdict = analyse(evidence, _rollout(), elapsed, approved=False)
    assert verdict.decision == decision
    assert any(says in check.detail for check in verdict.checks), verdict.checks


def test_without_auto_promote_a_passing_candidate_waits_for_approval() -> None:
    good = Evidence(mirrored=200, compared=200, agreed=200, latency_ratio=1.0)
    assert analyse(good, _rollout(autoPromote=False), 61, approved=False).decision == "AwaitingApproval"
    assert analyse(good, _rollout(autoPromote=False), 61, approved=True).decision == "Promote"


@dataclass
class Cluster:
    """Objects as the apiserver and controllers would hold them after a plan is applied."""

    body: Obj
    objects: dict[tuple[str, str], Obj] = field(default_factory=dict)
    evidence: dict[str, dict[str, Counters]] = field(default_factory=dict)
    records: dict[str, Obj] = field(default_factory=dict)  # record ConfigMaps by name
    versions: int = 0
    nodes: list[Obj] = field(default_factory=lambda: list(CPU_ONLY))
    parts: tuple[str, ...] = ()  # the part images the builds report (see engineimage)

    def observed(self) -> Observed:
        kinds: dict[str, list[Obj]] = {}
        for (kind, _), obj in self.objects.items():
            kinds.setdefault(kind, []).append(obj)
        return Observed(
            body=self.body, nodes=self.nodes, jobs=kinds.get("Job", []), pods=kinds.get("Pod", []),
            deployments=kinds.get("Deployment", []) + kinds.get("DaemonSet", []),
            services=kinds.get("Service", []), configmaps=kinds.get("ConfigMap", []), evidence=self.evidence,
            records=copy.deepcopy(list(self.records.values())),
        )  # fmt: skip

    def record(self, result: Plan) -> None:
        """Apply the record writes as the apiserver would: a patch at another resourceVersion conflicts."""
        for write in result.records:
            self.versions += 1
            if "create" in write:
                obj = copy.deepcopy(write["create"])
                assert obj["metadata"]["name"] not in self.records, "conflict: the record exists"
                obj["metadata"]["resourceVersion"] = str(self.versions)
                self.records[obj["metadata"]["name"]] = obj
                continue
            target = self.records[write["name"]]
            assert write["patch"]["metadata"]["resourceVersion"] == target["metadata"]["resourceVersion"], "conflict"
            target["data"] |= write["patch"]["data"]
            target["metadata"]["resourceVersion"] = str(self.versions)

    def step(self, now: str, *, write_status: bool = True) -> Plan:
        """Plan and apply; `write_status=False` plays a status write held back (or lost)."""
        result = plan(self.observed(), Images(), now)
        self.record(result)
        for obj in result.create:  # stamped with their creation time, as the API server does
            made = copy.deepcopy(obj)
            made["metadata"].setdefault("creationTimestamp", now)
            self.objects[obj["kind"], obj["metadata"]["name"]] = made
        for ref in result.delete:
            self.objects.pop((ref["kind"], ref["name"]), None)
            self.records.pop(ref["name"], None) if ref["kind"] == "ConfigMap" else None
        for ref in result.patch:
            target = self.objects[ref["kind"], ref["name"]]
            _merge(target, ref["patch"])
            target["metadata"]["generation"] = target["metadata"].get("generation", 1) + 1
        if write_status:
            self.body["status"] = result.status
        return result

    def finish_builds(self) -> None:
        report = {
            "v": 1,
            "status": "built",
            "exitCode": 0,
            "cacheKey": "k",
            "artifact": {"reference": "oci://r/e@sha256:" + "a" * 64}
            | ({"parts": list(self.parts)} if self.parts else {}),
        }
        for (kind, name), job in list(self.objects.items()):
            if kind == "Job" and not job.get("status"):
                job["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
                self.objects["Pod", name] = {
                    "metadata": {"name": f"{name}-x", "labels": {"job-name": name}},
                    "status": {
                        "phase": "Succeeded",
                        "containerStatuses": [
                            {"state": {"terminated": {"exitCode": 0, "message": json.dumps(report)}}}
                        ],
                    },
                }

    def pods_ready(self) -> None:
        for (kind, _), workload in self.objects.items():
            if kind == "Deployment":
                generation = workload["metadata"].get("generation", 1)
                workload["status"] = {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1,
                                      "observedGeneration": generation}  # fmt: skip

    def workloads(self) -> dict[str, str]:
        """Revision -> track of every serving workload."""
        return {
            o["metadata"]["labels"]["edgeml.dev/revision"]: o["metadata"]["labels"]["edgeml.dev/track"]
            for (kind, _), o in self.objects.items()
            if kind == "Deployment"
        }


def _merge(target: Obj, patch: Obj) -> None:
    """Apply a merge patch as the API server does for the lists this operator patches: lists are replaced,
    as a strategic merge patch does only with its `$patch: replace` directive (lists of containers are
    otherwise merged by name), so a list without it must be the whole list of containers."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        elif key == "initContainers" and {"$patch": "replace"} not in value:
            merged = {c["name"]: c for c in target.get(key) or []} | {c["name"]: c for c in value}
            target[key] = copy.deepcopy(list(merged.values()))  # merged by name: what is left out stays
        else:
            target[key] = copy.deepcopy([v for v in value if v != {"$patch": "replace"}] if isinstance(value, list)
                                        else value)  # fmt: skip


def _counters(mirrored: float, compared: float, agreed: float, *, errors: float = 0, ratio: float = 1.0,
              created: float = CREATED) -> Counters:  # fmt: skip
    """One stable pod's shadow counters, as the runtime exports them; `created`: when the pod's counters
    for this candidate were created (by default after every shadow start of these tests)."""
    return {"mirrored": mirrored, "compared": compared, "agreed": agreed, "errors": errors,
            "ratio_sum": ratio * compared, "ratio_count": compared, "created": created}  # fmt: skip


def _serving_first_revision(nodes: list[Obj] = CPU_ONLY, **rollout: Any) -> tuple[Cluster, str]:
    body: Obj = {
        "apiVersion": "edgeml.dev/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": "ocr", "namespace": "apps", "uid": "u-1", "generation": 1},
        "spec": {"model": {"uri": "oci://registry.local/m:v1", "sha256": DIGEST},
                 "rollout": {"shadow": {"minRequests": 100, "duration": "60s"}} | rollout},
    }  # fmt: skip
    cluster = Cluster(body, nodes=nodes)
    cluster.step(T0)
    cluster.finish_builds()
    cluster.step(T0)
    cluster.pods_ready()
    assert cluster.step(T0).status["phase"] == "Ready"
    first = revision_of(EdgeModelSpec.model_validate(body["spec"]))
    assert cluster.workloads() == {first: "stable"}  # the first revision has nothing to shadow
    body["spec"]["model"]["sha256"] = "0" * 64
    body["metadata"]["generation"] = 2
    return cluster, first


def _shadowing(cluster: Cluster) -> tuple[str, Plan]:
    second = revision_of(EdgeModelSpec.model_validate(cluster.body["spec"]))
    cluster.step("2026-11-26T12:01:00Z")
    cluster.finish_builds()
    cluster.step("2026-11-26T12:01:10Z")
    assert set(cluster.workloads().values()) == {"stable", "candidate"}
    assert ("Service", next(n for k, n in cluster.objects if k == "Service" and second[:8] in n)) in cluster.objects
    cluster.pods_ready()
    cluster.evidence = {cluster.body["status"]["classes"][0]["key"]: {}}  # readable, nothing counted yet
    started = cluster.step("2026-11-26T12:01:20Z")
    entry = started.status["classes"][0]
    assert entry["state"] == "Shadowing"
    assert entry["shadow"]["decision"] == "Pending"
    assert started.analysing
    assert any(e.reason == "ShadowStarted" for e in started.events)
    return second, started


def test_a_new_revision_is_shadowed_then_promoted_and_the_old_stable_retired_after() -> None:
    cluster, first = _serving_first_revision()
    second, _ = _shadowing(cluster)
    configmap = cluster.objects["ConfigMap", "ocr-shadow"]
    (key, value), = configmap["data"].items()  # fmt: skip
    assert key.startswith(first)  # the stable pods of the first revision mirror ...
    assert json.loads(value)["candidateRevision"] == second  # ... to the candidate
    assert json.loads(value)["url"].startswith(f"http://ocr-{second[:8]}-")

    cluster.evidence = {cluster.body["status"]["classes"][0]["key"]: {"pod-1": _counters(200, 200, 200, ratio=1.05)}}
    promoted = cluster.step("2026-11-26T12:02:30Z")
    assert [p["patch"]["metadata"]["labels"] for p in promoted.patch if p["kind"] == "Deployment"] == [
        {"edgeml.dev/track": "stable"}
    ]
    assert cluster.workloads() == {first: "stable", second: "stable"}  # both serve until the new one rolled out
    assert cluster.objects["ConfigMap", "ocr-shadow"]["data"] == {}
    assert any(e.reason == "Promoted" for e in promoted.events)

    # Mid-rollout: the pod of the new template is not ready yet, the candidate's old pod still is.
    promoted_workload = next(o for (k, _), o in cluster.objects.items() if k == "Deployment" and second in str(o))
    generation = promoted_workload["metadata"]["generation"]
    promoted_workload["status"] = {"replicas": 2, "readyReplicas": 1, "updatedReplicas": 1,
                                   "observedGeneration": generation}  # fmt: skip
    cluster.step("2026-11-26T12:02:35Z")
    assert cluster.workloads() == {first: "stable", second: "stable"}  # the old stable still serves

    cluster.pods_ready()
    retired = cluster.step("2026-11-26T12:02:40Z")
    assert cluster.workloads() == {second: "stable"}
    assert {r["kind"] for r in retired.delete} >= {"Deployment", "Job"}
    assert retired.status["phase"] == "Ready"
    assert retired.status["revisions"] == {"stable": second}


def test_stable_pods_reach_the_candidate_by_its_service_cluster_ip_once_it_has_one() -> None:
    cluster, _ = _serving_first_revision()
    second, _ = _shadowing(cluster)
    name = next(n for k, n in cluster.objects if k == "Service" and second[:8] in n)
    cluster.objects["Service", name].setdefault("spec", {})["clusterIP"] = "10.96.7.7"
    cluster.step("2026-11-26T12:01:30Z")
    (value,) = cluster.objects["ConfigMap", "ocr-shadow"]["data"].values()
    assert json.loads(value)["url"].startswith("http://10.96.7.7:")  # no cluster DNS needed


def test_a_disagreeing_candidate_is_rolled_back_and_stays_rolled_back() -> None:
    cluster, first = _serving_first_revision()
    second, _ = _shadowing(cluster)
    key = cluster.body["status"]["classes"][0]["key"]
    cluster.evidence = {key: {"pod-1": _counters(200, 200, 20)}}
    rolled = cluster.step("2026-11-26T12:02:30Z")
    entry = rolled.status["classes"][0]
    assert entry["state"] == "RolledBack"
    assert entry["shadow"]["agreement"] == 0.1
    assert "agreement 0.100 < minAgreement" in entry["message"]
    assert cluster.workloads() == {first: "stable"}
    assert ("Job", f"ocr-{second[:8]}-{key[-8:]}") in cluster.objects  # kept: the decision is not rebuilt
    conditions = {c["type"]: c for c in rolled.status["conditions"]}
    assert (conditions["Degraded"]["reason"], conditions["Stalled"]["status"]) == ("RolledBack", "True")
    assert rolled.status["revisions"] == {"stable": first, "candidate": second}

    cluster.evidence = {}
    again = cluster.step("2026-11-26T12:05:00Z")
    assert not again.create
    assert not again.delete
    assert again.status["classes"][0]["state"] == "RolledBack"


def test_without_auto_promote_the_candidate_waits_for_the_annotation() -> None:
    cluster, _first = _serving_first_revision(autoPromote=False)
    second, _ = _shadowing(cluster)
    key = cluster.body["status"]["classes"][0]["key"]
    cluster.evidence = {key: {"pod-1": _counters(200, 200, 200)}}
    waiting = cluster.step("2026-11-26T12:02:30Z")
    assert waiting.status["classes"][0]["shadow"]["decision"] == "AwaitingApproval"
    assert APPROVE in waiting.status["classes"][0]["message"]
    assert not waiting.patch
    cluster.body["metadata"]["annotations"] = {APPROVE: second}
    approved = cluster.step("2026-11-26T12:02:40Z")
    assert sorted(p["kind"] for p in approved.patch) == ["ConfigMap", "Deployment"]  # promoted; mirroring stops


def test_daemonset_mode_serves_with_a_daemonset() -> None:
    body: Obj = {
        "apiVersion": "edgeml.dev/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": "vad", "namespace": "apps", "uid": "u-2", "generation": 1},
        "spec": {"model": {"uri": "oci://registry.local/m:v1", "sha256": DIGEST}, "serving": {"mode": "DaemonSet"}},
    }
    cluster = Cluster(body)
    cluster.step(T0)
    cluster.finish_builds()
    created = cluster.step(T0).create
    (workload,) = [o for o in created if o["kind"] in {"Deployment", "DaemonSet"}]  # fmt: skip
    assert workload["kind"] == "DaemonSet"
    assert "replicas" not in workload["spec"]
