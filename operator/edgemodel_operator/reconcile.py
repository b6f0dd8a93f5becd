"""The reconcile decision for one EdgeModel: observed objects and decision records in, a plan of writes out.

Pure: the controller gathers (nodes, owned Jobs, their pods, serving workloads, Services, the
shadow ConfigMap, the decision records read from the API server, shadow counters), calls `plan`,
and applies the result: record writes first (guarded by resourceVersion), then the children, the
Events of the steps the records took, and the status. The same observations always give the same
plan, whatever order the events that led to them arrived in.

Per hardware class, the current revision's attempt (see `rollout` for its states and transitions,
`records` for where it is kept) decides what should exist: its build Job; once built, a candidate
workload (track=candidate) and its own Service, mirrored to by the class's stable pods (their key in
the shadow ConfigMap) while it shadows; once promoted, its workload on track stable (the old stable
goes once the new one has rolled out); once rolled back, nothing but its Job. The status is a
projection of the attempts and the cluster.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from edgemodel_operator import conditions as cond
from edgemodel_operator.analysis import Counters, Verdict
from edgemodel_operator.api.spec import EdgeModelSpec, EngineTarget
from edgemodel_operator.builders import (
    LABEL_CLASS,
    LABEL_REVISION,
    LABEL_TRACK,
    Images,
    build_deployment_for_class,
    build_job_for_class,
    build_revision_service,
    build_service,
    build_shadow_configmap,
    candidate_url,
    child_name,
    revision_of,
    shadow_configmap_name,
    shadow_key,
)
from edgemodel_operator.classes import HardwareClass, discover, engine_for
from edgemodel_operator.pacing import merge_patch
from edgemodel_operator.records import Attempt, Record, current_application, parse, record_name, record_write, retired
from edgemodel_operator.rollout import (
    APPROVALS,
    APPROVE,
    REJECT,
    ClassView,
    Context,
    Step,
    advance,
    evidence_of,
    new_attempt,
    shadow_figures,
)

Obj = dict[str, Any]
__all__ = ["APPROVE", "REJECT", "Event", "Observed", "Plan", "evidence_wanted", "plan", "subject"]


@dataclass(frozen=True)
class Observed:
    body: Obj
    nodes: list[Obj]
    jobs: list[Obj]
    pods: list[Obj]
    deployments: list[Obj]  # serving workloads: Deployments, or DaemonSets in that mode
    services: list[Obj]
    configmaps: list[Obj] = field(default_factory=list)
    records: list[Obj] = field(default_factory=list)  # record ConfigMaps, as read from the API server
    # Shadow counters by class key and source, for the candidate `evidence_wanted` names; a class that is
    # missing could not be read this time.
    evidence: dict[str, dict[str, Counters]] = field(default_factory=dict)


@dataclass(frozen=True)
class Event:
    """A step worth an Event on the EdgeModel; `subject` ("Kind/name") ties it to one write."""

    reason: str
    message: str
    subject: str | None = None


@dataclass
class Plan:
    records: list[Obj] = field(default_factory=list)  # record writes (see `records.record_write`), applied first
    create: list[Obj] = field(default_factory=list)
    delete: list[Obj] = field(default_factory=list)  # objects to delete (kind, name, namespace)
    patch: list[Obj] = field(default_factory=list)  # merge patches (kind, name, namespace, patch)
    status: Obj = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    analysing: bool = False  # a class is shadowed: plan again soon with fresh evidence, even without a change


def _records(observed: Observed) -> dict[str, Record]:
    found = (parse(c) for c in observed.records)
    return {r.revision: r for r in found if r is not None}


def evidence_wanted(observed: Observed) -> dict[str, str]:
    """Class key -> candidate revision, for the classes whose counters the next plan needs: those whose
    current attempt is built (the baseline is taken as shadowing begins) or shadowing."""
    spec = EdgeModelSpec.model_validate(observed.body["spec"])
    revision = revision_of(spec)
    record = _records(observed).get(revision)
    if record is None:
        return {}
    return {
        key: revision
        for key, attempt in record.attempts.items()
        if attempt.state in {"Built", "Shadowing"} and attempt.application == record.application.generation
    }


def _labels(obj: Obj) -> dict[str, str]:
    labels: dict[str, str] = obj["metadata"].get("labels") or {}
    return labels


def _track(workload: Obj) -> str:
    return _labels(workload).get(LABEL_TRACK, "stable")


def _ready(workload: Obj) -> int:
    status = workload.get("status") or {}
    return int(status.get("readyReplicas") or status.get("numberReady") or 0)


def _rolled_out(workload: Obj) -> bool:
    """Every pod runs the current template and is ready (after promotion changed the track)."""
    status = workload.get("status") or {}
    if int(status.get("observedGeneration") or 0) < int(workload["metadata"].get("generation") or 1):
        return False
    if workload["kind"] == "DaemonSet":
        desired = int(status.get("desiredNumberScheduled") or 0)
        return (
            int(status.get("updatedNumberScheduled") or 0) >= desired and int(status.get("numberReady") or 0) >= desired
        )
    wanted = int((workload.get("spec") or {}).get("replicas") or 1)
    # During the rolling update the old template's pods still count as ready: done only once they are gone.
    no_old_pods = int(status.get("replicas") or 0) <= wanted
    return (
        no_old_pods
        and int(status.get("updatedReplicas") or 0) >= wanted
        and int(status.get("readyReplicas") or 0) >= wanted
    )


def _ref(obj: Obj) -> Obj:
    return {"kind": obj["kind"], "name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"]}


def subject(obj: Obj) -> str:
    """How an Event names the object a create or delete is about."""
    return f"{obj['kind']}/{obj['metadata']['name'] if 'metadata' in obj else obj['name']}"


def build_report(job: Obj, pods: list[Obj]) -> Obj | None:
    """The compact build report a finished build pod left in its termination message."""
    name = job["metadata"]["name"]
    for pod in pods:
        if pod["metadata"].get("labels", {}).get("job-name") != name:
            continue
        for status in pod.get("status", {}).get("containerStatuses", []) or []:
            message = (status.get("state", {}).get("terminated") or {}).get("message")
            if message:
                try:
                    report: Obj = json.loads(message)
                except ValueError:
                    return {"status": "failed", "reason": "UnreadableReport", "message": message[:200]}
                return report
    return None


def _unschedulable(job: Obj, pods: list[Obj]) -> str | None:
    """The scheduler's reason when the build pod of `job` waits for a node it cannot get (e.g. no free GPU)."""
    name = job["metadata"]["name"]
    for pod in pods:
        if pod["metadata"].get("labels", {}).get("job-name") != name or pod.get("status", {}).get("phase") != "Pending":
            continue
        for item in pod["status"].get("conditions", []) or []:
            if item.get("type") == "PodScheduled" and item.get("status") == "False":
                return str(item.get("message") or item.get("reason") or "unschedulable")
    return None


def _job_state(job: Obj) -> str:
    for item in job.get("status", {}).get("conditions", []) or []:
        if item.get("status") == "True" and item.get("type") in {"Complete", "Failed"}:
            return str(item["type"])
    return "Active"


def _class_status(
    hardware: HardwareClass, engine: str | None, precision: str | None, state: str, message: str | None
) -> Obj:
    entry: Obj = {"key": hardware.key, "nodes": list(hardware.nodes), "state": state}
    if engine:
        entry |= {"engine": engine, "precision": precision}
    if message:
        entry["message"] = message
    return entry


@dataclass
class _Slot:
    """One class as the planner works on it: its engine, this revision's attempt and workload, and the
    stable workloads serving the class now."""

    hardware: HardwareClass
    target: EngineTarget
    attempt: Attempt
    mine: Obj | None
    stable: list[Obj]

    @property
    def artifact(self) -> str:
        return str((self.attempt.build or {}).get("artifactDigest"))


class _Planner:
    def __init__(self, observed: Observed, images: Images, now: str) -> None:
        self.observed, self.images, self.now = observed, images, now
        self.body = observed.body
        self.name, self.namespace = self.body["metadata"]["name"], self.body["metadata"]["namespace"]
        self.spec = EdgeModelSpec.model_validate(self.body["spec"])
        self.revision = revision_of(self.spec)
        self.plan = Plan()
        self.jobs = {j["metadata"]["name"]: j for j in observed.jobs}
        self.annotations: dict[str, str] = self.body["metadata"].get("annotations") or {}
        self.records = _records(observed)
        generation = int(self.body["metadata"].get("generation", 1))
        self.application = current_application(self.records, self.revision, generation, self.annotations, APPROVALS)
        self.attempts: dict[str, Attempt] = {}  # this revision's attempts after this plan, by class key
        self.steps: list[Step] = []
        self.shadow_data: dict[str, str] = {}  # the shadow ConfigMap's desired content
        # Names still wanted, by kind. A (revision, class) names its Job, workload and Service alike.
        self.keep: dict[str, set[str]] = {"Job": set(), "Workload": set(), "Service": set()}

    def run(self) -> Plan:
        targets = self.spec.targets
        selector = targets.node_selector if targets else None
        tolerations = [t.model_dump(exclude_none=True) for t in (targets.tolerations or [])] if targets else []
        classes = discover(self.observed.nodes, selector, tolerations)
        entries = [self._class(hardware) for hardware in classes]
        self._record()
        self._retire(classes)
        self._shadow_configmap()
        if not any(s["metadata"]["name"] == self.name for s in self.observed.services):
            self.plan.create.append(build_service(self.body))
        self.plan.status = self._status(classes, entries)
        return self.plan

    # ------------------------------------------------------------------ decision records

    def _attempt(self, hardware: HardwareClass) -> Attempt:
        """This revision's attempt on the class in the current application; a new one if there is none."""
        record = self.records.get(self.revision)
        previous = record.attempts.get(hardware.key) if record else None
        if previous is not None and previous.application == self.application.generation:
            return previous
        return new_attempt(self.revision, hardware.key, self.application, self.now, previous)

    def _record(self) -> None:
        """Write this revision's record if an attempt changed; the steps' Events go with that write."""
        before = self.records.get(self.revision)
        attempts = dict(before.attempts) if before else {}
        attempts |= self.attempts
        spec = before.spec if before else self.body["spec"]
        after = Record(record_name(self.name, self.revision), self.revision,
                       before.resource_version if before else None, spec, self.application, attempts)  # fmt: skip
        write = record_write(self.body, before, after)
        if write is not None:
            self.plan.records.append(write)
            for step in self.steps:
                self.plan.events.append(Event(step.reason, step.message, f"ConfigMap/{after.name}"))
        serving = {_labels(w).get(LABEL_REVISION, "") for w in self.observed.deployments}
        for old in retired(self.records, serving | {self.revision}):
            self.plan.delete.append({"kind": "ConfigMap", "name": old.name, "namespace": self.namespace})

    # ------------------------------------------------------------------ one class

    def _workloads(self, hardware: HardwareClass) -> list[Obj]:
        return [w for w in self.observed.deployments if _labels(w).get(LABEL_CLASS) == hardware.key]

    def _class(self, hardware: HardwareClass) -> Obj:
        workloads = self._workloads(hardware)
        stable = [w for w in workloads if _track(w) == "stable"]
        for workload in stable:  # what serves live traffic stays until something replaces it
            self._want(workload["metadata"]["name"], "Workload", "Job", "Service")
        target = engine_for(self.spec, hardware)
        if target is None:
            return _class_status(hardware, None, None, "Failed", "no entry of spec.targets.engines matches this class")
        name = child_name(self.name, self.revision, hardware)
        self._want(name, "Job")
        job = self.jobs.get(name)
        mine = next((w for w in workloads if _labels(w).get(LABEL_REVISION) == self.revision), None)
        view = ClassView(
            job=_job_state(job) if job else None,
            report=build_report(job, self.observed.pods) if job else None,
            has_stable=bool(stable),
            mine=_track(mine) if mine else None,
            mine_ready=_ready(mine) if mine else 0,
            samples=self.observed.evidence.get(hardware.key),
        )
        before = self._attempt(hardware)
        context = Context(self.spec.rollout, self.annotations, self.application, self.now)
        attempt, steps, verdict = advance(before, view, context)
        self.attempts[hardware.key] = attempt
        self.steps += steps
        entry = _class_status(hardware, target.engine, target.precision, attempt.state, attempt.message)
        evidence = evidence_of(attempt, view) if attempt.state == "Shadowing" else None
        live = shadow_figures(evidence) if evidence is not None else {}
        if attempt.build:
            entry |= {k: v for k, v in attempt.build.items() if k != "engine"}
        if attempt.state in {"Building", "Failed"}:
            if job is None and attempt.state == "Building":
                job = build_job_for_class(self.body, hardware, target, self.revision, self.images)
                self.plan.create.append(job)
                self._event("BuildStarted", f"building {target.engine} {target.precision} for {hardware.key}", job)
            elif job is not None and (waiting := _unschedulable(job, self.observed.pods)):
                entry |= {"state": "Pending", "message": f"no node can take the build yet: {waiting}"}
            return self._with_stable(entry, stable)
        if attempt.state == "RolledBack":
            return self._with_stable(entry | {"message": attempt.reason, "shadow": _shadow(attempt)}, stable)
        slot = _Slot(hardware, target, attempt, mine, stable)
        if attempt.state == "Promoted":
            return self._promoted(slot, entry)
        return self._candidate(slot, entry, verdict, live)

    def _with_stable(self, entry: Obj, stable: list[Obj]) -> Obj:
        """Name the revision that keeps serving this class while the current one is not there yet."""
        if stable:
            entry["revision"] = _labels(stable[0])[LABEL_REVISION]
            entry["readyReplicas"] = sum(_ready(w) for w in stable)
        return entry

    def _create_workload(self, slot: _Slot, track: str) -> None:
        hardware, artifact = slot.hardware, slot.artifact
        workload = build_deployment_for_class(self.body, hardware, slot.target, revision=self.revision,
                                              artifact=artifact, images=self.images, track=track)  # fmt: skip
        self.plan.create.append(workload)
        if track == "candidate":
            self.plan.create.append(build_revision_service(self.body, self.revision, hardware))
            self._event("CandidateStarted", f"{hardware.key}: candidate {self.revision} from {artifact}", workload)
        else:
            self._event("ServingStarted", f"serving {hardware.key} from {artifact}", workload)

    def _promoted(self, slot: _Slot, entry: Obj) -> Obj:
        """Promoted: this revision serves the class on track stable; the old stable goes once it has rolled out."""
        attempt, mine, stable = slot.attempt, slot.mine, slot.stable
        shadow = {"shadow": _shadow(attempt)} if attempt.shadow_started else {}
        if mine is None:
            self._create_workload(slot, "stable")
            return self._with_stable(entry | {"state": "Built"} | shadow, stable)
        name = mine["metadata"]["name"]
        self._want(name, "Workload")
        ready = _ready(mine)
        if _track(mine) != "stable":
            self._want(name, "Service")
            patch = {"metadata": {"labels": {LABEL_TRACK: "stable"}},
                     "spec": {"template": {"metadata": {"labels": {LABEL_TRACK: "stable"}}}}}  # fmt: skip
            self.plan.patch.append(_ref(mine) | {"patch": patch})
            return self._with_stable(entry | {"state": "Shadowing", "message": f"promoting: {attempt.reason}"} | shadow,
                                     stable)  # fmt: skip
        others = [w for w in stable if w is not mine]
        if others and not _rolled_out(mine):
            waiting = "promoted: waiting for every pod of the new stable revision"
            return entry | {"revision": self.revision, "readyReplicas": ready, "state": "Shadowing",
                            "message": waiting} | shadow  # fmt: skip
        for old in others:  # the new stable revision has rolled out: the old one goes
            self._drop(old["metadata"]["name"], "Workload", "Job", "Service")
        return (
            entry
            | {"revision": self.revision, "readyReplicas": ready, "state": "Serving" if ready else "Built"}
            | shadow
        )

    def _candidate(self, slot: _Slot, entry: Obj, verdict: Verdict | None, live: Obj) -> Obj:
        """Built or Shadowing: the candidate runs beside the stable revision; while shadowing, mirrored to."""
        hardware, attempt, mine, stable = slot.hardware, slot.attempt, slot.mine, slot.stable
        if mine is None:
            self._create_workload(slot, "candidate")
            return self._with_stable(entry | {"state": "Built", "message": "candidate starting"}, stable)
        name = mine["metadata"]["name"]
        self._want(name, "Workload", "Service")
        if attempt.state == "Built":
            why = "candidate starting" if not _ready(mine) else "waiting for shadow evidence to be readable"
            return self._with_stable(entry | {"message": why}, stable)
        stable_revision = _labels(stable[0])[LABEL_REVISION] if stable else ""
        service = next((s for s in self.observed.services if s["metadata"]["name"] == name), {})
        cluster_ip = (service.get("spec") or {}).get("clusterIP")
        if stable:
            self.shadow_data[shadow_key(stable_revision, hardware)] = json.dumps({
                "url": candidate_url(self.body, self.revision, hardware, cluster_ip),
                "mirrorPercent": self.spec.rollout.shadow.mirror_percent,
                "candidateRevision": self.revision,
            }, sort_keys=True)  # fmt: skip
        self.plan.analysing = True
        shadow = _shadow(attempt, live)
        if verdict is None:
            return self._with_stable(entry | {"shadow": shadow, "message": "no shadow evidence readable now"}, stable)
        shadow |= {"decision": verdict.decision, "reason": verdict.reason}
        rev = self.revision if self.application.stale.get(APPROVE) != self.revision else attempt.identity
        waiting = {"AwaitingApproval": f"passed; waiting for annotation {APPROVE}={rev}",
                   "Rollback": f"failed; waiting for annotation {REJECT}={rev}"}  # fmt: skip
        return self._with_stable(entry | {"shadow": shadow, "message": waiting.get(verdict.decision, verdict.reason)},
                                 stable)  # fmt: skip

    # ------------------------------------------------------------------ the EdgeModel's other objects

    def _retire(self, classes: list[HardwareClass]) -> None:
        """Delete every workload, revision Service and Job that no class wants any more."""
        current = {c.key for c in classes}
        for kind, objects in (("Workload", self.observed.deployments), ("Job", self.observed.jobs),
                              ("Service", self.observed.services)):  # fmt: skip
            for obj in objects:
                labels = _labels(obj)
                wanted = obj["metadata"]["name"] in self.keep[kind] and labels.get(LABEL_CLASS) in current
                if LABEL_CLASS not in labels or wanted:
                    continue
                ref = _ref(obj | {"kind": obj.get("kind") or ("Deployment" if kind == "Workload" else kind)})
                self.plan.delete.append(ref)
                gone = labels[LABEL_CLASS] not in current
                why = "its hardware class left" if gone else f"revision {labels.get(LABEL_REVISION)} is retired"
                self._event("Removed", f"{ref['kind']} {ref['name']}: {why}", ref)

    def _shadow_configmap(self) -> None:
        name = shadow_configmap_name(self.name)
        found = next((c for c in self.observed.configmaps if c["metadata"]["name"] == name), None)
        if found is None:
            if self.shadow_data:
                self.plan.create.append(build_shadow_configmap(self.body, self.shadow_data))
            return
        patch = merge_patch(found.get("data") or {}, self.shadow_data)
        if patch:
            self.plan.patch.append(_ref(found | {"kind": "ConfigMap"}) | {"patch": {"data": patch}})

    def _want(self, name: str, *kinds: str) -> None:
        for kind in kinds:
            self.keep[kind].add(name)

    def _drop(self, name: str, *kinds: str) -> None:
        for kind in kinds:
            self.keep[kind].discard(name)

    def _event(self, reason: str, message: str, obj: Obj | None = None) -> None:
        self.plan.events.append(Event(reason, message, subject(obj) if obj is not None else None))

    def _status(self, classes: list[HardwareClass], entries: list[Obj]) -> Obj:
        generation = int(self.body["metadata"].get("generation", 1))
        old: Obj = self.body.get("status") or {}
        states = [e["state"] for e in entries]
        total = len(entries)
        built = sum(s in {"Built", "Serving", "Shadowing", "RolledBack"} for s in states)
        failed = [e for e in entries if e["state"] == "Failed"]
        rolled_back = [e for e in entries if e["state"] == "RolledBack"]
        serving = states.count("Serving")
        building = states.count("Building") + states.count("Pending") + states.count("Shadowing")
        pending = [e for e in entries if e["state"] == "Pending"]
        conditions: list[Obj] = list(old.get("conditions", []))

        def put(kind: str, status: bool, reason: str, message: str) -> None:
            nonlocal conditions
            conditions = cond.set_condition(
                conditions, kind, status, reason, message, generation=generation, now=self.now
            )

        if total == 0:
            put(cond.ENGINES_BUILT, False, "NoNodes", "no Ready node matches spec.targets")
        elif failed:
            put(cond.ENGINES_BUILT, False, "BuildFailed", "; ".join(f"{e['key']}: {e.get('message')}" for e in failed))
        elif pending:
            put(cond.ENGINES_BUILT, False, "Unschedulable", "; ".join(f"{e['key']}: {e['message']}" for e in pending))
        else:
            put(cond.ENGINES_BUILT, built == total, "Built" if built == total else "Building", f"{built}/{total} built")
        put(cond.VALIDATED, built > 0 and not failed, "Validated" if built and not failed else "NotValidated",
            f"{built}/{total} engines passed validation")  # fmt: skip
        ready = total > 0 and serving == total
        put(cond.READY, ready, "Serving" if ready else "NotReady", f"{serving}/{total} classes serve {self.revision}")
        progressing = building > 0 or (built > serving + len(rolled_back))
        shadowing = states.count("Shadowing")
        put(cond.PROGRESSING, progressing, "Reconciling" if progressing else "Stable",
            f"{building - shadowing} building, {shadowing} shadowing")  # fmt: skip
        bad = failed + rolled_back
        reason = "RolledBack" if rolled_back else "ClassFailed"
        summary = "; ".join(f"{e['key']}: {e.get('message')}" for e in bad)
        put(cond.DEGRADED, bool(bad), reason if bad else "AsExpected", summary or "every class as expected")
        stalled = bool(bad) and not progressing
        put(cond.STALLED, stalled, reason if stalled else "AsExpected",
            f"{len(bad)} classes need a spec change: {summary}" if stalled else "nothing is stuck")  # fmt: skip
        return {
            "observedGeneration": generation,
            "phase": cond.phase(conditions),
            "conditions": conditions,
            "revisions": self._revisions(old, ready),
            "classesReady": f"{serving}/{total}",
            "classes": entries,
        }

    def _revisions(self, old: Obj, ready: bool) -> Obj:
        """The revision serving now (stable) and the one on its way (candidate)."""
        if ready:
            return {"stable": self.revision}
        stable = (old.get("revisions") or {}).get("stable")
        serving = {_labels(d).get(LABEL_REVISION) for d in self.observed.deployments if _track(d) == "stable"}
        if stable and stable != self.revision and stable in serving:
            return {"stable": stable, "candidate": self.revision}
        return {"candidate": self.revision}


def _shadow(attempt: Attempt, live: Obj | None = None) -> Obj:
    """The status's shadow figures of an attempt: `live` ones while it shadows, the recorded ones once decided."""
    shadow: Obj = {"revision": attempt.revision, "started": attempt.shadow_started}
    shadow |= live if live is not None else attempt.figures
    if attempt.decision is not None and attempt.state in {"Promoted", "RolledBack"}:
        shadow |= {"decision": attempt.decision, "reason": attempt.reason}
    return {k: v for k, v in shadow.items() if v is not None}


def plan(observed: Observed, images: Images, now: str) -> Plan:
    """What to record, create, delete and report for one EdgeModel."""
    return _Planner(observed, images, now).run()
