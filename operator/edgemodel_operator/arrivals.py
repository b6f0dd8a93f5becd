"""Classes that come and go: what the planner does for a class without nodes, and for a class that
is new while the EdgeModel's stable revision is not the spec's.

A mixin of the planner (`reconcile`), beside `serving.ServingSteps`. Presence itself is decided by
`classes.presence` (pure); here its outcome becomes objects kept or created and status entries:

- an absent class (no node with its labels, within the grace) keeps every object it has and starts
  nothing; its attempt in the decision record is left as it was, so when a node comes back the class
  resumes where it stood (a rolled-back revision stays rolled back, a shadow keeps its start);
- a class new during a rollout first builds and serves the EdgeModel's stable revision, from the spec
  kept in that revision's record (or, for workloads made before records, in the `edgeml.dev/spec`
  annotation of its serving workload); the spec's revision then comes as a candidate, through shadow.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from edgemodel_operator.api.spec import EdgeModelSpec
from edgemodel_operator.builders import (
    ANNOTATION_SPEC,
    LABEL_CLASS,
    LABEL_REVISION,
    Images,
    build_deployment_for_class,
    build_job_for_class,
    child_name,
    revision_of,
)
from edgemodel_operator.classes import HardwareClass, engine_for
from edgemodel_operator.projection import absent_entry, class_entry
from edgemodel_operator.records import Record
from edgemodel_operator.workloads import labels_of as _labels
from edgemodel_operator.workloads import ready_of as _ready
from edgemodel_operator.workloads import track_of as _track

if TYPE_CHECKING:
    from edgemodel_operator.reconcile import Observed, Plan

Obj = dict[str, Any]


class ArrivalSteps(ABC):
    """The planner's steps for absent and newly arrived classes; the planner provides what is declared here."""

    body: Obj
    name: str
    images: Images
    revision: str
    observed: Observed
    plan: Plan
    records: dict[str, Record]
    previous: dict[str, Obj]  # the status's class entries, by key, as the API server holds them
    jobs: dict[str, Obj]

    @abstractmethod
    def _event(self, reason: str, message: str, obj: Obj | None = None) -> None:
        """Provided by the planner."""

    @abstractmethod
    def _want(self, name: str, *kinds: str) -> None:
        """Provided by the planner."""

    @abstractmethod
    def _workloads(self, hardware: HardwareClass) -> list[Obj]:
        """Provided by the planner."""

    @abstractmethod
    def _outcome(self, job: Obj, workloads: list[Obj]) -> Obj | None:
        """Provided by the planner."""

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
        """A class without nodes, within its grace period: everything it has is kept, nothing is started,
        its attempt is not advanced. Its entry keeps what the status knew; where the status had no entry
        (never written), `lastState` comes from the class's attempt in the record."""
        stable = []
        for kind, objects in (("Workload", self.observed.deployments), ("Job", self.observed.jobs),
                              ("Service", self.observed.services)):  # fmt: skip
            for obj in objects:
                if _labels(obj).get(LABEL_CLASS) == key:
                    self._want(obj["metadata"]["name"], kind)
                    stable += [obj] if kind == "Workload" and _track(obj) == "stable" else []
        ready = sum(_ready(w) for w in stable)
        previous = self.previous.get(key)
        record = self.records.get(self.revision)
        attempt = record.attempts.get(key) if record else None
        if previous is None and attempt is not None:
            previous = {"key": key, "state": attempt.state}
        return absent_entry(previous, key, since=since, retire_at=retire_at, ready=ready)

    def _stable_first(self, hardware: HardwareClass) -> Obj | None:
        """A class with nothing serving it while the EdgeModel's stable revision is not the spec's (a
        rollout, or a rolled-back candidate): build and serve that stable revision first; the spec's
        revision then comes as a candidate, through shadow. None where there is no such revision (or
        it has no engine for this class)."""
        found = self._stable_source()
        if found is None or any(_track(w) == "stable" for w in self._workloads(hardware)):
            return None
        revision, body = found
        target = engine_for(EdgeModelSpec.model_validate(body["spec"]), hardware)
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
        outcome = self._outcome(job, [])
        if outcome is None:
            return entry
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
        """The EdgeModel's stable revision, when it is not the spec's, and an EdgeModel body with its spec:
        the spec kept in the revision's record, else the one annotated on its stable workloads."""
        stable = ((self.body.get("status") or {}).get("revisions") or {}).get("stable")
        if not stable or stable == self.revision:
            return None
        texts = [json.dumps(r.spec) for r in self.records.values() if r.revision == stable and r.spec]
        for workload in self.observed.deployments:
            text = (workload["metadata"].get("annotations") or {}).get(ANNOTATION_SPEC)
            if _labels(workload).get(LABEL_REVISION) == stable and _track(workload) == "stable" and text:
                texts.append(text)
        for text in texts:
            try:
                spec = json.loads(text)
                if revision_of(EdgeModelSpec.model_validate(spec)) == stable:
                    return stable, {**self.body, "spec": spec}
            except ValueError:  # a spec that no longer reads (e.g. edited by hand): try the next copy
                continue
        return None
