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
goes once the new one has rolled out); once rolled back, nothing but its Job (see `serving`). The
build's outcome is read from the pod that decided its Job (`buildreport`) and kept in the attempt.

Classes come from `classes.discover` and `classes.presence`: a known class stays while any node with
its labels exists; without one it is absent (kept, not advanced) until the grace is over (see
`arrivals`). The status is the bounded projection (`projection`) of the attempts and the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from edgemodel_operator.analysis import Counters
from edgemodel_operator.api.spec import EdgeModelSpec
from edgemodel_operator.arrivals import ArrivalSteps
from edgemodel_operator.builders import (
    LABEL_CLASS,
    LABEL_REVISION,
    Images,
    build_deployment_for_class,
    build_job_for_class,
    build_service,
    build_shadow_configmap,
    child_name,
    revision_of,
    shadow_configmap_name,
)
from edgemodel_operator.buildreport import LOST, keep_patch, read_outcome, recovered
from edgemodel_operator.classes import CLASSES, HardwareClass, engine_for, presence
from edgemodel_operator.desired import converge, split_twins, stamp
from edgemodel_operator.fallbacks import Fallback, degrade_on_fallback
from edgemodel_operator.handoff import Fit, HandoffSteps
from edgemodel_operator.pacing import merge_patch
from edgemodel_operator.prefetch import PrefetchSteps
from edgemodel_operator.progress import pod_problem
from edgemodel_operator.projection import class_entry, project
from edgemodel_operator.rebuild import artifact_patch, rebuild_on_fallback, replaced_build, without_cache
from edgemodel_operator.records import Attempt, Record, current_application, parse, record_name, record_write, retired
from edgemodel_operator.rollout import (
    APPROVALS,
    APPROVE,
    REJECT,
    RETRY,
    ClassView,
    Context,
    Step,
    advance,
    due_in,
    evidence_of,
    new_attempt,
    shadow_figures,
)
from edgemodel_operator.serving import ServingSteps, Slot, shadow_of
from edgemodel_operator.workloads import Event, subject
from edgemodel_operator.workloads import labels_of as _labels
from edgemodel_operator.workloads import ready_of as _ready
from edgemodel_operator.workloads import ref_of as _ref
from edgemodel_operator.workloads import track_of as _track

Obj = dict[str, Any]
NOT_SHOWN = frozenset({"artifactParts"})  # what an attempt's build keeps that its class status leaves out
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
    prefetches: list[Obj] = field(default_factory=list)  # pull DaemonSets (see `prefetch`), not serving workloads
    # Shadow counters by class key and source, for the candidate `evidence_wanted` names; a class that is
    # missing could not be read this time.
    evidence: dict[str, dict[str, Counters]] = field(default_factory=dict)
    # Classes whose serving pods report serving their fallback (see `fallbacks`), by class key.
    fallbacks: dict[str, Fallback] = field(default_factory=dict)
    serving_pods: list[Obj] = field(default_factory=list)  # candidate serving pods (controller.slim_serving_pod)
    # Names the node set: the same version always comes with the same nodes as far as classes go, so the
    # classes are computed once per version (`classes.ClassCache`); None: computed afresh.
    nodes_version: int | None = None


@dataclass
class Plan:
    records: list[Obj] = field(default_factory=list)  # record writes (see `records.record_write`), applied first
    create: list[Obj] = field(default_factory=list)
    delete: list[Obj] = field(default_factory=list)  # objects to delete (kind, name, namespace)
    patch: list[Obj] = field(default_factory=list)  # merge patches (kind, name, namespace, patch)
    apply: list[Obj] = field(default_factory=list)  # desired objects to server-side apply (see `desired`)
    status: Obj = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    analysing: bool = False  # a class is shadowed: plan again soon with fresh evidence, even without a change
    # Seconds until an absent class is due to retire, or a deadline of an attempt passes: plan again then.
    wake_after: float | None = None


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


def _owners(obj: Obj) -> set[str]:
    return {str(r.get("uid")) for r in obj["metadata"].get("ownerReferences") or [] if r.get("uid")}


def _is_of(pod: Obj, revision: str, key: str) -> bool:
    labels = pod["metadata"].get("labels") or {}
    return labels.get(LABEL_REVISION) == revision and labels.get(LABEL_CLASS) == key


def _fallback_of(fallback: Fallback | None, revision: str) -> str | None:
    """Why `revision`'s pods of a class serve their fallback; None when none of them does."""
    return fallback.reason if fallback is not None and revision in fallback.revisions else None


def _job_state(job: Obj) -> str:
    for item in job.get("status", {}).get("conditions", []) or []:
        if item.get("status") == "True" and item.get("type") in {"Complete", "Failed"}:
            return str(item["type"])
    return "Active"


class _Planner(PrefetchSteps, ServingSteps, ArrivalSteps, HandoffSteps):
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
        self.records = _records(observed)
        generation = int(self.body["metadata"].get("generation", 1))
        self.application = current_application(self.records, self.revision, generation, self.annotations, APPROVALS)
        self.attempts: dict[str, Attempt] = {}  # this revision's attempts after this plan, by class key
        self.steps: list[Step] = []
        self.fits: dict[str, Fit] = {}  # what each class's GPUs hold at once (see `handoff`)
        self.shadow_data: dict[str, str] = {}  # the shadow ConfigMap's desired content
        # Names still wanted, by kind. A (revision, class) names its Job, workload and Service alike.
        self.keep: dict[str, set[str]] = {"Job": set(), "Workload": set(), "Service": set()}
        self.classes: list[HardwareClass] = []  # the classes present, once `run` found them

    def run(self) -> Plan:
        targets = self.spec.targets
        selector = targets.node_selector if targets else None
        tolerations = [t.model_dump(exclude_none=True) for t in (targets.tolerations or [])] if targets else []
        found = CLASSES.discover(self.observed.nodes_version, self.observed.nodes, selector, tolerations)
        seen = presence(found, self._known(), now=self.now, grace_seconds=self.absent_grace)
        self.classes = list(seen.classes)
        entries = [self._handoff(h, self._stable_first(h) or self._class(h)) for h in seen.classes]
        entries += [self._absent(key, since, retire_at) for key, (since, retire_at) in sorted(seen.absent.items())]
        self._record()
        self._retire({c.key for c in seen.classes} | set(seen.absent))
        self._retire_prefetches()
        waits = [w for w in (seen.wake_after, self.plan.wake_after) if w is not None]
        self.plan.wake_after = min(waits) if waits else None
        self._shadow_configmap()
        if not any(s["metadata"]["name"] == self.name for s in self.observed.services):
            self.plan.create.append(build_service(self.body))
        serving = {_labels(d).get(LABEL_REVISION) or "" for d in self.observed.deployments if _track(d) == "stable"}
        generation = int(self.body["metadata"].get("generation", 1))
        self.plan.status = project(self.body.get("status") or {}, entries, generation=generation,
                                   revision=self.revision, serving=serving, now=self.now)  # fmt: skip
        self.plan.status = degrade_on_fallback(self.plan.status, self.observed.fallbacks, generation=generation,
                                               now=self.now)  # fmt: skip
        return self.plan

    # ------------------------------------------------------------------ decision records

    def _attempt(self, hardware: HardwareClass) -> Attempt:
        """This revision's attempt on the class in the current application; a new one if there is none."""
        record = self.records.get(self.revision)
        previous = record.attempts.get(hardware.key) if record else None
        if previous is not None and previous.application == self.application.generation:
            return previous
        fresh = new_attempt(self.revision, hardware.key, self.application, self.now, previous)
        return replace(fresh, retry_request=self.annotations.get(RETRY))  # a value already there asks nothing

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
            return class_entry(hardware, None, None, "Failed", "no entry of spec.targets.engines matches this class")
        name = child_name(self.name, self.revision, hardware)
        self._want(name, "Job")
        job = self.jobs.get(name)
        mine = next((w for w in workloads if _labels(w).get(LABEL_REVISION) == self.revision), None)
        before, held = self._rebuild(hardware, self._attempt(hardware), job)
        job = None if held else job
        uid = job["metadata"].get("uid") if job else None
        replaced = uid is not None and uid == before.replaced_job  # a failed Job a retry replaces: being deleted
        reading = job is not None and before.state == "Building" and not replaced
        outcome = self._outcome(job, workloads) if job is not None and reading else None
        view = ClassView(
            job=("Replaced" if replaced else _job_state(job)) if job else None,
            outcome=outcome,
            has_stable=bool(stable),
            mine=_track(mine) if mine else None,
            mine_ready=_ready(mine) if mine else 0,
            mine_since=mine["metadata"].get("creationTimestamp") if mine else None,
            fallback=_fallback_of(self.observed.fallbacks.get(hardware.key), self.revision),
            samples=self.observed.evidence.get(hardware.key),
            job_uid=uid,
            problem=pod_problem(p for p in self.observed.serving_pods if _is_of(p, self.revision, hardware.key)),
        )
        context = Context(self.spec.rollout, self.annotations, self.application, self.now)
        attempt, steps, verdict = advance(before, view, context)
        self.steps += steps
        attempt = self._handoff_decide((hardware, target), attempt, view, context)
        self.attempts[hardware.key] = attempt
        if (due := due_in(attempt, view, context)) is not None:  # a deadline passes with nothing else happening
            self.plan.wake_after = due if self.plan.wake_after is None else min(due, self.plan.wake_after)
        entry = class_entry(hardware, target.engine, target.precision, attempt.state, attempt.message)
        evidence = evidence_of(attempt, view) if attempt.state == "Shadowing" else None
        live = shadow_figures(evidence) if evidence is not None else {}
        if attempt.build:
            # The engine the target names, unless auto chose one (then the build says which).
            # Not the part images (kept for the pull DaemonSet, see `prefetch`): the status has no such field.
            shown = {k: v for k, v in attempt.build.items() if k not in NOT_SHOWN}
            entry |= {k: v for k, v in shown.items() if k != "engine" or attempt.build.get("chosen")}
        if attempt.state in {"Building", "Failed"}:
            if job is not None and uid is not None and attempt.state == "Building" and uid == attempt.replaced_job:
                self.plan.delete.append(_ref(job | {"kind": "Job"}))  # the new build starts once it is gone
                entry |= {"message": "building again: removing the failed build Job first"}
            elif job is None and attempt.state == "Building" and not held:
                job = build_job_for_class(self.body, hardware, target, self.revision, self.images)
                job = without_cache(job) if attempt.rebuild else job
                self.plan.create.append(job)
                self._event("BuildStarted", f"building {target.engine} {target.precision} for {hardware.key}", job)
            elif outcome is not None and outcome.get("reason") == LOST:  # shown, not recorded: the pod may come
                entry |= {"state": "Failed", "message": f"{LOST}: {outcome.get('message')}"}
            elif job is not None and (waiting := _unschedulable(job, self.observed.pods)):
                entry |= {"state": "Pending", "message": f"no node can take the build yet: {waiting}"}
            return self._with_stable(entry, stable)
        if attempt.state == "RolledBack":
            return self._with_stable(entry | {"message": attempt.reason, "shadow": shadow_of(attempt)}, stable)
        slot = Slot(hardware, target, attempt, mine, stable)
        if attempt.state == "Promoted":
            self._serve_rebuilt(slot)
            return self._promoted(slot, entry)
        if (cannot := self._cannot_shadow(hardware, attempt, entry)) is not None:  # no candidate: no room for one
            return self._with_stable(cannot, stable)
        entry = self._candidate(slot, entry, verdict, live)
        return entry | ({"message": attempt.reason} if attempt.timed_out and attempt.state == "Shadowing" else {})

    def _rebuild(self, hardware: HardwareClass, attempt: Attempt, job: Obj | None) -> tuple[Attempt, bool]:
        """The attempt once a fallback of its pods started a rebuild (see `rebuild`), and whether the build it
        replaces is still around (then deleted, and nothing new built yet)."""
        attempt, step = rebuild_on_fallback(attempt, self.observed.fallbacks.get(hardware.key), job)
        self.steps += [step] if step else []
        held = replaced_build(attempt, job, self.observed.pods)
        if held and job is not None and not job["metadata"].get("deletionTimestamp"):
            self.plan.delete.append(_ref(job | {"kind": "Job"}))
        return attempt, held

    def _serve_rebuilt(self, slot: Slot) -> None:
        """A rebuilt engine goes to the workload that serves the class (its pods roll out onto it)."""
        if slot.attempt.rebuild is None or slot.mine is None or _track(slot.mine) != "stable":
            return
        desired = build_deployment_for_class(self.body, slot.hardware, slot.target, revision=self.revision,
                                             artifact=slot.artifact, images=self.images)  # fmt: skip
        patch = artifact_patch(slot.mine, desired)
        if patch is not None:
            self.plan.patch.append(_ref(slot.mine) | {"patch": patch})
            self._event("ServingRebuilt", f"serving {slot.hardware.key} from the rebuilt {slot.artifact}", slot.mine)

    def _outcome(self, job: Obj, workloads: list[Obj]) -> Obj | None:
        """The outcome of a finished build Job (None while it runs), read from the pod that decided it,
        else recovered from a workload that serves its build. A newly read outcome is also kept on the
        Job (annotation `buildreport.OUTCOME`): the attempt's record is the copy decisions read; the
        Job's is the one a build without an attempt (a new class's stable-first build) reads again."""
        state = _job_state(job)
        if state == "Active":
            return None
        uid = job["metadata"].get("uid")  # a Job made again under the same name never reads its forerunner's pods
        pods = [p for p in self.observed.pods if not uid or uid in _owners(p) or not _owners(p)]
        outcome, newly_read = read_outcome(job, pods, job_succeeded=state == "Complete")
        found = recovered(job, workloads) if outcome.get("reason") == LOST and state == "Complete" else None
        outcome, newly_read = (found, True) if found else (outcome, newly_read)
        if newly_read:
            self.plan.patch.append(_ref(job) | {"patch": keep_patch(outcome)})
        return outcome

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
        patch: Obj = {"data": merge_patch(found.get("data") or {}, self.shadow_data)}
        if patch["data"]:  # computed from the watched copy: only if that is still the ConfigMap's version
            if found["metadata"].get("resourceVersion"):
                patch["metadata"] = {"resourceVersion": found["metadata"]["resourceVersion"]}
            self.plan.patch.append(_ref(found | {"kind": "ConfigMap"}) | {"patch": patch})

    def _event(self, reason: str, message: str, obj: Obj | None = None) -> None:
        self.plan.events.append(Event(reason, message, subject(obj) if obj is not None else None))


def plan(observed: Observed, images: Images, now: str, *, absent_grace: float = 600.0) -> Plan:
    """What to record, create, delete and report for one EdgeModel at `now` (RFC 3339).

    `absent_grace`: seconds a class may have no node at all before what serves it is deleted.
    """
    seen, hidden = split_twins(observed)  # children are kept at their desired state (see `desired`)
    planner = _Planner(replace(observed, deployments=seen), images, now, absent_grace)
    result = planner.run()
    converge(planner.observed, result, planner.classes, images, hidden)
    result.create = [stamp(o) if o["kind"] in {"Deployment", "DaemonSet", "Service"} else o for o in result.create]
    return result
