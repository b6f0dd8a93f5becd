"""The reconcile decision for one EdgeModel: observed objects in, a plan of writes out.

Pure: the controller gathers (nodes, owned Jobs, their pods, serving workloads, Services, the
shadow ConfigMap, shadow evidence), calls `plan`, and applies the result. The same observations
always give the same plan, whatever order the events that led to them arrived in.

Per hardware class, a new revision goes: build Job -> candidate workload (track=candidate) and its
own Service -> once Ready, the class's stable pods mirror live requests to it (their key in the
shadow ConfigMap) -> analysis of the evidence -> promote (the candidate's track becomes stable; the
old stable goes once the new one has rolled out) or roll back (the candidate goes; the class keeps
its stable revision). The first revision of a class has nothing to shadow and serves at once.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from typing import Any

from edgemodel_operator.analysis import Evidence, Verdict, analyse
from edgemodel_operator.api.spec import EdgeModelSpec, EngineTarget
from edgemodel_operator.builders import (
    ANNOTATION_SPEC,
    LABEL_CLASS,
    LABEL_REVISION,
    LABEL_TRACK,
    Images,
    build_deployment_for_class,
    build_job_for_class,
    build_revision_service,
    build_service,
    build_shadow_configmap,
    build_shadow_entry,
    child_name,
    revision_of,
    shadow_configmap_name,
    shadow_key,
)
from edgemodel_operator.buildreport import LOST, keep_patch, read_outcome, recovered
from edgemodel_operator.classes import HardwareClass, discover, engine_for, presence
from edgemodel_operator.pacing import merge_patch
from edgemodel_operator.projection import absent_entry, class_entry, project

Obj = dict[str, Any]
APPROVE = "edgeml.dev/promote"  # annotation: the candidate revision a person approves for promotion
REJECT = "edgeml.dev/rollback"  # annotation: the candidate revision a person rolls back


@dataclass(frozen=True)
class Observed:
    body: Obj
    nodes: list[Obj]
    jobs: list[Obj]
    pods: list[Obj]
    deployments: list[Obj]  # serving workloads: Deployments, or DaemonSets in that mode
    services: list[Obj]
    configmaps: list[Obj] = field(default_factory=list)
    evidence: dict[str, Evidence] = field(default_factory=dict)  # by class key, for its current candidate


@dataclass(frozen=True)
class Event:
    """A step worth an Event on the EdgeModel; `subject` ("Kind/name") ties it to one create or delete."""

    reason: str
    message: str
    subject: str | None = None


@dataclass
class Plan:
    create: list[Obj] = field(default_factory=list)
    delete: list[Obj] = field(default_factory=list)  # objects to delete (kind, name, namespace)
    patch: list[Obj] = field(default_factory=list)  # merge patches (kind, name, namespace, patch)
    status: Obj = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    analysing: bool = False  # a class is shadowed: plan again soon with fresh evidence, even without a change
    wake_after: float | None = None  # seconds until an absent class is due to retire: plan again then


def shadowing(status: Obj) -> dict[str, str]:
    """Class key -> candidate revision, for the classes a status says are shadowing."""
    return {
        entry["key"]: entry["shadow"]["revision"]
        for entry in status.get("classes") or []
        if entry.get("state") == "Shadowing" and (entry.get("shadow") or {}).get("revision")
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


def _seconds_between(start: str, end: str) -> float:
    parse = datetime.datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


def _ref(obj: Obj) -> Obj:
    return {"kind": obj["kind"], "name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"]}


def subject(obj: Obj) -> str:
    """How an Event names the object a create or delete is about."""
    return f"{obj['kind']}/{obj['metadata']['name'] if 'metadata' in obj else obj['name']}"


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


class _Planner:
    def __init__(self, observed: Observed, images: Images, now: str, absent_grace: float) -> None:
        self.observed, self.images, self.now, self.absent_grace = observed, images, now, absent_grace
        self.body = observed.body
        self.name, self.namespace = self.body["metadata"]["name"], self.body["metadata"]["namespace"]
        self.spec = EdgeModelSpec.model_validate(self.body["spec"])
        self.revision = revision_of(self.spec)
        self.plan = Plan()
        self.jobs = {j["metadata"]["name"]: j for j in observed.jobs}
        self.previous = {e["key"]: e for e in (self.body.get("status") or {}).get("classes") or []}
        self.annotations: dict[str, str] = self.body["metadata"].get("annotations") or {}
        self.shadow_data: dict[str, str] = {}  # the shadow ConfigMap's desired content
        # Names still wanted, by kind. A (revision, class) names its Job, workload and Service alike.
        self.keep: dict[str, set[str]] = {"Job": set(), "Workload": set(), "Service": set()}

    def run(self) -> Plan:
        targets = self.spec.targets
        selector = targets.node_selector if targets else None
        tolerations = [t.model_dump(exclude_none=True) for t in (targets.tolerations or [])] if targets else []
        found = discover(self.observed.nodes, selector, tolerations)
        seen = presence(found, self._known(), now=self.now, grace_seconds=self.absent_grace)
        entries = [self._stable_first(hardware) or self._class(hardware) for hardware in seen.classes]
        entries += [self._absent(key, since, retire_at) for key, (since, retire_at) in sorted(seen.absent.items())]
        self._retire({c.key for c in seen.classes} | set(seen.absent))
        self.plan.wake_after = seen.wake_after
        self._shadow_configmap()
        if not any(s["metadata"]["name"] == self.name for s in self.observed.services):
            self.plan.create.append(build_service(self.body))
        serving = {_labels(d).get(LABEL_REVISION) or "" for d in self.observed.deployments if _track(d) == "stable"}
        generation = int(self.body["metadata"].get("generation", 1))
        self.plan.status = project(self.body.get("status") or {}, entries, generation=generation,
                                   revision=self.revision, serving=serving, now=self.now)  # fmt: skip
        return self.plan

    # ------------------------------------------------------------------ presence

    def _known(self) -> dict[str, str | None]:
        """Classes this EdgeModel already has (a status entry, or objects labelled with the class),
        each with since when it has been absent (None: it had a node when last seen)."""
        known: dict[str, str | None] = {key: entry.get("absentSince") for key, entry in self.previous.items()}
        for obj in (*self.observed.jobs, *self.observed.deployments, *self.observed.services):
            key = _labels(obj).get(LABEL_CLASS)
            if key and key not in known:
                known[key] = None
        return known

    def _absent(self, key: str, since: str, retire_at: str) -> Obj:
        """A class without nodes, within its grace period: everything it has is kept, nothing is started."""
        stable = []
        for kind, objects in (("Workload", self.observed.deployments), ("Job", self.observed.jobs),
                              ("Service", self.observed.services)):  # fmt: skip
            for obj in objects:
                if _labels(obj).get(LABEL_CLASS) == key:
                    self._want(obj["metadata"]["name"], kind)
                    stable += [obj] if kind == "Workload" and _track(obj) == "stable" else []
        ready = sum(_ready(w) for w in stable)
        return absent_entry(self.previous.get(key), key, since=since, retire_at=retire_at, ready=ready)

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
            return class_entry(hardware, None, None, "Failed", "no entry of spec.targets.engines matches this class")
        name = child_name(self.name, self.revision, hardware)
        self._want(name, "Job")
        job = self.jobs.get(name)
        if job is None:
            job = build_job_for_class(self.body, hardware, target, self.revision, self.images)
            self.plan.create.append(job)
            self._event("BuildStarted", f"building {target.engine} {target.precision} for {hardware.key}", job)
            return self._with_stable(class_entry(hardware, target.engine, target.precision, "Building", None), stable)
        state = _job_state(job)
        if state == "Active":
            waiting = _unschedulable(job, self.observed.pods)
            entry = class_entry(hardware, target.engine, target.precision, "Building", None)
            if waiting:
                entry |= {"state": "Pending", "message": f"no node can take the build yet: {waiting}"}
            return self._with_stable(entry, stable)
        outcome, newly_read = read_outcome(job, self.observed.pods, job_succeeded=state == "Complete")
        found = recovered(job, workloads) if outcome.get("reason") == LOST and state == "Complete" else None
        outcome, newly_read = (found, True) if found else (outcome, newly_read)
        if newly_read:  # kept on the Job: losing the pod later changes nothing
            self.plan.patch.append(_ref(job) | {"patch": keep_patch(outcome)})
        if outcome["status"] not in {"built", "cached"}:
            message = f"{outcome.get('reason')}: {outcome.get('message')}"
            return self._with_stable(class_entry(hardware, target.engine, target.precision, "Failed", message), stable)
        entry = class_entry(hardware, target.engine, outcome.get("precision", target.precision), "Built", None)
        artifact = outcome.get("artifact")
        entry |= {
            "cacheKey": outcome.get("cacheKey"),
            "artifactDigest": artifact,
            "buildSeconds": outcome.get("buildSeconds"),
        }
        if outcome.get("metrics"):
            entry["metrics"] = outcome["metrics"]
        if not artifact:
            return self._with_stable(
                entry | {"state": "Failed", "message": "the build report names no artifact"}, stable
            )
        return self._serve(hardware, target, artifact, entry, workloads=workloads, stable=stable)

    def _stable_first(self, hardware: HardwareClass) -> Obj | None:
        """A class with nothing serving it while the EdgeModel's stable revision is not the spec's (a
        rollout, or a rolled-back candidate): build and serve that stable revision first, from the spec
        kept on its workloads; the spec's revision then comes as a candidate, through shadow.
        None where there is no such revision (or it has no engine for this class)."""
        found = self._stable_source()
        if found is None or any(_track(w) == "stable" for w in self._workloads(hardware)):
            return None
        revision, body = found
        spec = EdgeModelSpec.model_validate(body["spec"])
        target = engine_for(spec, hardware)
        if target is None:
            return None
        name = child_name(self.name, revision, hardware)
        self._want(name, "Job", "Workload")
        first = f"serving the stable revision {revision} first; {self.revision} follows through shadow"
        entry = class_entry(hardware, target.engine, target.precision, "Building", first)
        job = self.jobs.get(name)
        if job is None:
            job = build_job_for_class(body, hardware, target, revision, self.images)
            self.plan.create.append(job)
            self._event("BuildStarted", f"building stable revision {revision} for new class {hardware.key}", job)
            return entry
        state = _job_state(job)
        if state == "Active":
            return entry
        outcome, newly_read = read_outcome(job, self.observed.pods, job_succeeded=state == "Complete")
        if newly_read:
            self.plan.patch.append(_ref(job) | {"patch": keep_patch(outcome)})
        artifact = outcome.get("artifact")
        if outcome["status"] not in {"built", "cached"} or not artifact:
            why = f"{outcome.get('reason')}: {outcome.get('message')}"
            return entry | {"state": "Failed", "message": f"stable revision {revision}: {why}"}
        workload = build_deployment_for_class(body, hardware, target, revision=revision, artifact=artifact,
                                              images=self.images, track="stable")  # fmt: skip
        self.plan.create.append(workload)
        self._event("ServingStarted", f"serving {hardware.key} from {artifact} (stable revision {revision})", workload)
        return entry | {"state": "Built", "artifactDigest": artifact, "cacheKey": outcome.get("cacheKey")}

    def _stable_source(self) -> tuple[str, Obj] | None:
        """The EdgeModel's stable revision, when it is not the spec's, and an EdgeModel body with its spec."""
        stable = ((self.body.get("status") or {}).get("revisions") or {}).get("stable")
        if not stable or stable == self.revision:
            return None
        for workload in self.observed.deployments:
            text = (workload["metadata"].get("annotations") or {}).get(ANNOTATION_SPEC)
            if _labels(workload).get(LABEL_REVISION) == stable and _track(workload) == "stable" and text:
                try:
                    spec = json.loads(text)
                    if revision_of(EdgeModelSpec.model_validate(spec)) == stable:
                        return stable, {**self.body, "spec": spec}
                except ValueError:  # a spec that no longer reads (e.g. edited by hand): no stable-first
                    continue
        return None

    def _with_stable(self, entry: Obj, stable: list[Obj]) -> Obj:
        """Name the revision that keeps serving this class while the current one is not there yet."""
        if stable:
            entry["revision"] = _labels(stable[0])[LABEL_REVISION]
            entry["readyReplicas"] = sum(_ready(w) for w in stable)
        return entry

    def _serve(  # noqa: PLR0911 - one return per rollout state, in order
        self, hardware: HardwareClass, target: EngineTarget, artifact: str, entry: Obj, *, workloads: list[Obj],
        stable: list[Obj],
    ) -> Obj:  # fmt: skip
        mine = next((w for w in workloads if _labels(w).get(LABEL_REVISION) == self.revision), None)
        previous = self.previous.get(hardware.key) or {}
        # Absent (no node) a while: what the class was in when its last node went.
        was = previous.get("lastState") if previous.get("state") == "Absent" else previous.get("state")
        rolled_back = was == "RolledBack" and (previous.get("shadow") or {}).get("revision") == self.revision
        if mine is None:
            if rolled_back:  # decided: this revision does not replace the stable one on this class
                why = previous.get("message") if previous.get("state") == "RolledBack" else None
                return self._with_stable(entry | {"state": "RolledBack", "shadow": previous.get("shadow"),
                                                  "message": why or f"{self.revision} was rolled back on this class"},
                                         stable)  # fmt: skip
            track = "candidate" if stable else "stable"
            workload = build_deployment_for_class(self.body, hardware, target, revision=self.revision,
                                                  artifact=artifact, images=self.images, track=track)  # fmt: skip
            self.plan.create.append(workload)
            if track == "candidate":
                self.plan.create.append(build_revision_service(self.body, self.revision, hardware))
                self._event("CandidateStarted", f"{hardware.key}: candidate {self.revision} from {artifact}", workload)
            else:
                self._event("ServingStarted", f"serving {hardware.key} from {artifact}", workload)
            return self._with_stable(entry, stable)
        self._want(mine["metadata"]["name"], "Workload")
        ready = _ready(mine)
        if _track(mine) == "stable":
            others = [w for w in stable if w is not mine]
            if others and not _rolled_out(mine):
                return entry | {"revision": self.revision, "readyReplicas": ready, "state": "Shadowing",
                                "message": "promoted: waiting for every pod of the new stable revision",
                                "shadow": previous.get("shadow")}  # fmt: skip
            for old in others:  # the new stable revision has rolled out: the old one goes
                self._drop(old["metadata"]["name"], "Workload", "Job", "Service")
            shadow = previous.get("shadow") or {}
            evidence = {"shadow": shadow} if shadow.get("revision") == self.revision else {}  # what promoted it
            return entry | {"revision": self.revision, "readyReplicas": ready,
                            "state": "Serving" if ready else "Built"} | evidence  # fmt: skip
        if rolled_back or not stable:  # a leftover candidate
            self._drop(mine["metadata"]["name"], "Workload", "Service")
            return self._with_stable(entry, stable)
        self._want(mine["metadata"]["name"], "Service")
        if not ready:
            return self._with_stable(entry | {"message": "candidate starting"}, stable)
        return self._shadow(hardware, entry, mine, stable[0], previous)

    def _shadow(self, hardware: HardwareClass, entry: Obj, candidate: Obj, stable: Obj, previous: Obj) -> Obj:
        rollout = self.spec.rollout
        stable_revision = _labels(stable)[LABEL_REVISION]
        before = previous.get("shadow") or {}
        started = before.get("started") if before.get("revision") == self.revision else None
        if started is None:
            started = self.now
            self._event("ShadowStarted", f"{hardware.key}: mirroring {rollout.shadow.mirror_percent:g}% of "
                        f"{stable_revision}'s requests to {self.revision}; a request agrees within "
                        f"{self.spec.rollout.analysis.agreement.describe()}")  # fmt: skip
        evidence = self.observed.evidence.get(hardware.key) or Evidence()
        approved = self.annotations.get(APPROVE) == self.revision
        verdict = analyse(evidence, rollout, _seconds_between(started, self.now), approved=approved)
        shadow = _shadow_status(self.revision, started, evidence, verdict)
        entry = self._with_stable(entry, [stable]) | {"state": "Shadowing", "shadow": shadow}
        rejected = self.annotations.get(REJECT) == self.revision
        if verdict.decision == "Promote":
            patch = {"metadata": {"labels": {LABEL_TRACK: "stable"}},
                     "spec": {"template": {"metadata": {"labels": {LABEL_TRACK: "stable"}}}}}  # fmt: skip
            self.plan.patch.append(_ref(candidate) | {"patch": patch})
            self._event("Promoted", f"{hardware.key}: {self.revision} replaces {stable_revision}: {verdict.reason}")
            return entry | {"message": f"promoting: {verdict.reason}"}
        if (verdict.decision == "Rollback" and rollout.auto_rollback) or rejected:
            self._drop(candidate["metadata"]["name"], "Workload", "Service")  # the Job stays: no rebuild
            why = verdict.reason if verdict.decision == "Rollback" else f"rolled back by {REJECT}"
            self._event("RolledBack", f"{hardware.key}: {self.revision} rolled back, {stable_revision} keeps "
                        f"serving: {why}")  # fmt: skip
            return entry | {"state": "RolledBack", "message": why, "shadow": shadow | {"decision": "Rollback"}}
        key = shadow_key(stable_revision, hardware)
        service = next(
            (s for s in self.observed.services if s["metadata"]["name"] == candidate["metadata"]["name"]), {}
        )
        cluster_ip = (service.get("spec") or {}).get("clusterIP")
        self.shadow_data[key] = build_shadow_entry(self.body, self.revision, hardware, cluster_ip)
        self.plan.analysing = True
        waiting = {"AwaitingApproval": f"passed; waiting for annotation {APPROVE}={self.revision}",
                   "Rollback": f"failed; waiting for annotation {REJECT}={self.revision}"}  # fmt: skip
        return entry | {"message": waiting.get(verdict.decision, verdict.reason)}

    # ------------------------------------------------------------------ the EdgeModel's other objects

    def _retire(self, current: set[str]) -> None:
        """Delete every workload, revision Service and Job that no class in `current` wants any more."""
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


def _shadow_status(revision: str, started: str, evidence: Evidence, verdict: Verdict) -> Obj:
    figures = {
        "revision": revision,
        "started": started,
        "requests": int(evidence.compared + evidence.errors),
        "agreement": None if evidence.agreement is None else round(evidence.agreement, 4),
        "latencyRatio": None if evidence.latency_ratio is None else round(evidence.latency_ratio, 3),
        "errorRate": None if evidence.error_rate is None else round(evidence.error_rate, 4),
        "decision": verdict.decision,
        "reason": verdict.reason,
    }
    return {k: v for k, v in figures.items() if v is not None}


def plan(observed: Observed, images: Images, now: str, *, absent_grace: float = 600.0) -> Plan:
    """What to create, delete and report for one EdgeModel at `now` (RFC 3339).

    `absent_grace`: seconds a class may have no node at all before what serves it is deleted.
    """
    return _Planner(observed, images, now, absent_grace).run()
