"""What the state of this revision's attempt on a class asks of that class's serving workloads.

A mixin of the planner (`reconcile`): create the candidate or the promoted workload, promote a
candidate by its track label, retire the old stable one once the new one has rolled out, and keep the
shadow ConfigMap's entry of a class that shadows. Each method returns the class's status entry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgemodel_operator.analysis import Verdict
from edgemodel_operator.api.spec import EdgeModelSpec, EngineTarget
from edgemodel_operator.builders import (
    LABEL_REVISION,
    LABEL_TRACK,
    Images,
    build_deployment_for_class,
    build_revision_service,
    build_shadow_entry,
    shadow_key,
)
from edgemodel_operator.classes import HardwareClass
from edgemodel_operator.records import Application, Attempt
from edgemodel_operator.rollout import APPROVE, REJECT
from edgemodel_operator.workloads import labels_of as _labels
from edgemodel_operator.workloads import ready_of as _ready
from edgemodel_operator.workloads import ref_of as _ref
from edgemodel_operator.workloads import rolled_out as _rolled_out
from edgemodel_operator.workloads import track_of as _track

if TYPE_CHECKING:
    from edgemodel_operator.reconcile import Observed, Plan

Obj = dict[str, Any]


@dataclass
class Slot:
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


class ServingSteps(ABC):
    """The planner's steps for serving workloads; the planner provides the attributes declared here."""

    body: Obj
    images: Images
    revision: str
    spec: EdgeModelSpec
    application: Application
    observed: Observed
    plan: Plan
    shadow_data: dict[str, str]  # the shadow ConfigMap's desired content
    keep: dict[str, set[str]]  # names still wanted, by kind ("Job", "Workload", "Service")

    @abstractmethod
    def _event(self, reason: str, message: str, obj: Obj | None = None) -> None:
        """Provided by the planner."""

    @abstractmethod
    def _engine_on_nodes(self, slot: Slot) -> str | None:
        """Provided by the planner (`prefetch`): None once the revision's engine is on the class's nodes, else
        why the candidate waits."""

    def _with_stable(self, entry: Obj, stable: list[Obj]) -> Obj:
        """Name the revision that keeps serving this class while the current one is not there yet."""
        if stable:
            entry["revision"] = _labels(stable[0])[LABEL_REVISION]
            entry["readyReplicas"] = sum(_ready(w) for w in stable)
        return entry

    def _create_workload(self, slot: Slot, track: str) -> None:
        hardware, artifact = slot.hardware, slot.artifact
        workload = build_deployment_for_class(self.body, hardware, slot.target, revision=self.revision,
                                              artifact=artifact, images=self.images, track=track)  # fmt: skip
        self.plan.create.append(workload)
        if track == "candidate":
            self.plan.create.append(build_revision_service(self.body, self.revision, hardware))
            self._event("CandidateStarted", f"{hardware.key}: candidate {self.revision} from {artifact}", workload)
        else:
            self._event("ServingStarted", f"serving {hardware.key} from {artifact}", workload)

    def _promoted(self, slot: Slot, entry: Obj) -> Obj:
        """Promoted: this revision serves the class on track stable; the old stable goes once it has rolled out."""
        attempt, mine, stable = slot.attempt, slot.mine, slot.stable
        shadow = {"shadow": shadow_of(attempt)} if attempt.shadow_started else {}
        self._engine_on_nodes(slot)  # the stable revision's engine stays on every node of the class
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

    def _candidate(self, slot: Slot, entry: Obj, verdict: Verdict | None, live: Obj) -> Obj:
        """Built or Shadowing: the candidate runs beside the stable revision; while shadowing, mirrored to."""
        hardware, attempt, mine, stable = slot.hardware, slot.attempt, slot.mine, slot.stable
        if mine is None:
            pulling = self._engine_on_nodes(slot)  # the engine on every node first: promotion needs no registry
            if pulling is not None:
                return self._with_stable(entry | {"state": "Built", "message": pulling}, stable)
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
            self.shadow_data[shadow_key(stable_revision, hardware)] = build_shadow_entry(
                self.body, self.revision, hardware, cluster_ip
            )
        self.plan.analysing = True
        shadow = shadow_of(attempt, live)
        if verdict is None:
            return self._with_stable(entry | {"shadow": shadow, "message": "no shadow evidence readable now"}, stable)
        shadow |= {"decision": verdict.decision, "reason": verdict.reason}
        rev = self.revision if self.application.stale.get(APPROVE) != self.revision else attempt.identity
        waiting = {"AwaitingApproval": f"passed; waiting for annotation {APPROVE}={rev}",
                   "Rollback": f"failed; waiting for annotation {REJECT}={rev}"}  # fmt: skip
        return self._with_stable(entry | {"shadow": shadow, "message": waiting.get(verdict.decision, verdict.reason)},
                                 stable)  # fmt: skip

    def _want(self, name: str, *kinds: str) -> None:
        for kind in kinds:
            self.keep[kind].add(name)

    def _drop(self, name: str, *kinds: str) -> None:
        for kind in kinds:
            self.keep[kind].discard(name)


def shadow_of(attempt: Attempt, live: Obj | None = None) -> Obj:
    """The status's shadow figures of an attempt: `live` ones while it shadows, the recorded ones once decided."""
    shadow: Obj = {"revision": attempt.revision, "started": attempt.shadow_started}
    shadow |= live if live is not None else attempt.figures
    if attempt.decision is not None and attempt.state in {"Promoted", "RolledBack"}:
        shadow |= {"decision": attempt.decision, "reason": attempt.reason}
    return {k: v for k, v in shadow.items() if v is not None}
