"""Single-accelerator classes: whether a class's GPUs can hold a build, a candidate and the stable
pods at once, and the same-node handoff for a class whose GPUs cannot.

A TensorRT build Job and every TensorRT serving pod ask for one `nvidia.com/gpu`. A class counts
the GPUs its schedulable nodes allocate (`status.allocatable`, in which the NVIDIA device plugin
already counts time-slicing replicas; where a node reports no allocatable at all, GPU Feature
Discovery's `nvidia.com/gpu.count` x `nvidia.com/gpu.replicas`). From that count, `fit` decides:

- *build beside stable*: the build Job can run while the stable pods keep serving;
- *side by side*: a candidate (and, once promoted, the new stable revision) can run beside the old
  stable pods, which shadowing needs.

`spec.serving.acceleratorHandoff` chooses what a class that cannot do so does:

- `Auto` (default) and `Always` (`Always` treats every GPU class as unable, e.g. a time-sliced GPU
  whose memory holds one engine only): the stable pods *yield* while the build runs and come back once
  it has finished: a Deployment is scaled to 0; a DaemonSet gives up the pod on one node only (the
  build's, `Fit.build_node`, by a node affinity), so its other nodes serve on. A class that cannot
  shadow says so at once (Event and class message `CannotShadow`, with the arithmetic) and, once
  built: with `rollout.autoPromote` it is promoted on its build's validation, the old stable pods
  yielding until the new ones are ready (one time without service: build plus start; a DaemonSet's
  pods leave every node then, by a node selector no node carries); without it the stable pods come
  back and the class waits for `edgeml.dev/promote` (then yields as for autoPromote) or
  `edgeml.dev/rollback`. A rebuild of the serving revision's own engine (see `rebuild`) yields the
  same way, and its workload comes back on the rebuilt engine.
- `Never`: the stable pods are never stopped; the build waits for a free GPU and the class stays
  Built (no candidate) until it has room, both reported at once.

Each time without service is measured, to the second: from the operator's scale-down to the first
reconcile that sees the stopped pods' workload serving again (a DaemonSet: ready on every node it
wants). `status.classes[].handoff.unservedSeconds` sums them over the attempt's handoffs, kept in its
decision record. Pure: no clock, no client.
"""

from __future__ import annotations

import datetime
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgemodel_operator.api.spec import EdgeModelSpec, EngineTarget, Serving
from edgemodel_operator.builders import LABEL_REVISION
from edgemodel_operator.classes import HardwareClass
from edgemodel_operator.records import Application, Attempt
from edgemodel_operator.rollout import APPROVE, REJECT, ClassView, Context, Step, approval
from edgemodel_operator.workloads import labels_of as _labels
from edgemodel_operator.workloads import ready_of as _ready
from edgemodel_operator.workloads import ref_of as _ref
from edgemodel_operator.workloads import rolled_out as _rolled_out
from edgemodel_operator.workloads import track_of as _track

if TYPE_CHECKING:
    from edgemodel_operator.reconcile import Observed, Plan

Obj = dict[str, Any]
GPU = "nvidia.com/gpu"
GPU_COUNT = "nvidia.com/gpu.count"  # GPU Feature Discovery: physical GPUs on the node
GPU_REPLICAS = "nvidia.com/gpu.replicas"  # GPU Feature Discovery: pods one GPU takes (time-slicing, MPS)
LABEL_YIELDED = "edgeml.dev/yielded"  # on a stable workload stopped for a handoff: how (CLASS or NODE)
CLASS = "class"  # every pod of the workload stopped: a Deployment at 0, a DaemonSet moved off every node
NODE = "node"  # a DaemonSet's pod on the build's node (`Fit.build_node`) moved off: the other nodes serve on
CANNOT_SHADOW = "CannotShadow"


@dataclass(frozen=True)
class Fit:
    """What a class's GPUs can hold at once (see the module docstring).

    `applies`: the class's pods ask for GPUs; `gpus`: GPUs allocatable on its schedulable nodes (None:
    unknown, no node says); `build_beside`, `side_by_side`: the two questions; `room`: the build (or
    the new stable pods) can run at all once the stable pods yield; `arithmetic`: the figures, for messages;
    `build_node`: in DaemonSet mode, the node whose stable pod alone gives the build its GPU.
    """

    applies: bool
    gpus: int | None = None
    build_beside: bool = True
    side_by_side: bool = True
    room: bool = True
    arithmetic: str = ""
    mode: str = "Auto"
    build_node: str | None = None

    @property
    def yields(self) -> bool:
        """The stable pods may be stopped for this class's build or promotion."""
        return self.applies and self.mode != "Never" and self.room


NO_GPU = Fit(applies=False)


def node_gpus(node: Mapping[str, Any]) -> int | None:
    """GPUs a node can give pods: its allocatable `nvidia.com/gpu` (0 when it reports allocatable
    resources without GPUs: no device plugin); without any allocatable, GPU Feature Discovery's count
    times replicas; None when neither says."""
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    labels = (node.get("metadata") or {}).get("labels") or {}
    if allocatable:
        return _count(allocatable.get(GPU, "0"))
    if GPU_COUNT in labels or GPU_REPLICAS in labels:
        count, replicas = _count(labels.get(GPU_COUNT, "1")), _count(labels.get(GPU_REPLICAS, "1"))
        return None if count is None or replicas is None else count * max(replicas, 1)
    return None


def _count(value: object) -> int | None:
    try:
        return max(0, int(str(value)))
    except ValueError:
        return None


def fit(hardware: HardwareClass, nodes: Iterable[Mapping[str, Any]], target: EngineTarget, serving: Serving) -> Fit:
    """Whether the class can hold its build and a candidate beside its stable pods (see `Fit`).

    Deployment mode with R replicas: the build beside stable needs R + 1 GPUs, a candidate beside it
    2R, counted over the class's schedulable nodes (every pod takes one GPU, so any free one will do).
    DaemonSet mode: one stable pod per node, so the build needs a node with 2, and a candidate needs 2
    on every node that holds a stable pod. A class whose GPUs no node reports is taken to fit (as
    before this check existed) unless the mode is Always.
    """
    if target.engine != "tensorrt":  # only TensorRT pods ask for a GPU (see builders)
        return NO_GPU
    names = set(hardware.schedulable)
    by_name = {
        str(n["metadata"]["name"]): node_gpus(n) for n in nodes if (n.get("metadata") or {}).get("name") in names
    }
    mode = serving.accelerator_handoff
    known = [g for g in by_name.values() if g is not None]
    build_node = None
    if not known:
        unknown = "no node of the class reports its GPUs"
        return Fit(True, None, mode != "Always", mode != "Always", True, unknown, mode)
    gpus, nodes_text = sum(known), f"{len(known)} node{'s' if len(known) != 1 else ''}"
    if serving.mode == "DaemonSet":
        serving_nodes = [g for g in known if g >= 1]
        build_beside = any(g >= 2 for g in known)
        side_by_side = bool(serving_nodes) and all(g >= 2 for g in serving_nodes)
        room = bool(serving_nodes)
        build_node = min((name for name, g in by_name.items() if g), default=None)
        least = min(known)
        arithmetic = (f"{least} {GPU} on the smallest of {nodes_text}; a node needs 2 to build or run a "
                      f"candidate beside its stable pod")  # fmt: skip
    else:
        replicas = serving.replicas_per_class or 1
        build_beside, side_by_side, room = gpus >= replicas + 1, gpus >= 2 * replicas, gpus >= 1
        pods = f"{replicas} stable pod{'s' if replicas != 1 else ''}"
        arithmetic = (f"{gpus} {GPU} on {nodes_text}; the build beside {pods} needs {replicas + 1}, "
                      f"a candidate beside them needs {2 * replicas}")  # fmt: skip
    if mode == "Always":
        build_beside = side_by_side = False
        arithmetic += "; acceleratorHandoff Always"
    return Fit(True, gpus, build_beside, side_by_side, room, arithmetic, mode, build_node)


def _why_not(fit: Fit) -> str:
    """Why a class that cannot hold two engines does not hand over."""
    return "acceleratorHandoff Never" if fit.mode == "Never" else "no GPU to hand over"


def yield_wanted(attempt: Attempt, fit: Fit, old_stable: bool, mine_rolled_out: bool) -> bool:
    """Whether the old stable pods of the class must be stopped now: for the build (Building, and it
    cannot run beside them), or for the new stable pods (Promoted, not yet rolled out, and they cannot
    run beside them)."""
    if not fit.yields or not old_stable:
        return False
    if attempt.state == "Building":
        return not fit.build_beside
    return attempt.state == "Promoted" and not mine_rolled_out and not fit.side_by_side


def unshadowable(attempt: Attempt, view: ClassView, context: Context, fit: Fit) -> tuple[Attempt, Step | None]:
    """Built -> Promoted or RolledBack in a class that cannot shadow (see the module docstring):
    a rollback annotation wins; then autoPromote, then an approval; otherwise the attempt waits."""
    if attempt.state != "Built" or not view.has_stable or view.mine == "stable" or fit.side_by_side:
        return attempt, None
    why = f"{CANNOT_SHADOW}: {fit.arithmetic}"
    rejected = approval(context.annotations, REJECT, attempt, context.application)
    if rejected:
        reason = f"rolled back by {rejected} ({why})"
        moved = attempt.moved("RolledBack", decision="Rollback", reason=reason, decided=context.now, approval=rejected)
        return moved, Step("RolledBack", f"{attempt.key}: {attempt.revision} {reason}")
    if not fit.yields:
        return attempt, None
    approved = approval(context.annotations, APPROVE, attempt, context.application)
    if not context.rollout.auto_promote and approved is None:
        return attempt, None
    reason = f"promoted on its build's validation ({why}; {'autoPromote' if approved is None else approved})"
    moved = attempt.moved("Promoted", decision="Promote", reason=reason, decided=context.now, approval=approved)
    return moved, Step("Promoted", f"{attempt.key}: {attempt.revision} {reason}")


def _seconds(start: str, end: str) -> float:
    def parse(moment: str) -> datetime.datetime:
        return datetime.datetime.fromisoformat(moment.replace("Z", "+00:00"))

    return max(0.0, (parse(end) - parse(start)).total_seconds())


def windows(
    attempt: Attempt,
    fit: Fit,
    wanted: bool,
    serving_again: bool,
    now: str,
    *,
    rollout: bool = True,
    stopping: str = "the stable pods",
) -> tuple[Attempt, list[Step]]:
    """The attempt's handoff record after this plan: `CannotShadow` noted once in a `rollout` (another
    revision serves the class: there is something to shadow); a time without
    service opened when a yield is first wanted, closed (its seconds added) once no yield is wanted
    and a serving pod of the class is ready again (`serving_again`)."""
    record: Obj = dict(attempt.handoff or {})
    steps: list[Step] = []
    if rollout and fit.applies and not fit.side_by_side and "cannotShadow" not in record:
        record["cannotShadow"] = fit.arithmetic
        what = "the stable pods yield for the build and the new revision"
        what = what if fit.yields else f"{_why_not(fit)}: the class waits until it has room"
        steps.append(Step(CANNOT_SHADOW, f"{attempt.key}: cannot run a candidate beside the stable pods "
                                         f"({fit.arithmetic}); {what}"))  # fmt: skip
    if wanted and "yielded" not in record:
        record |= {"yielded": now, "count": int(record.get("count") or 0) + 1}
        for_what = "the build" if attempt.state == "Building" else f"revision {attempt.revision}"
        steps.append(Step("StableYielded", f"{attempt.key}: {stopping} stop so that {for_what} can have the "
                                           f"GPU ({fit.arithmetic})"))  # fmt: skip
    elif not wanted and "yielded" in record and serving_again:
        unserved = _seconds(str(record.pop("yielded")), now)
        record["unservedSeconds"] = round(float(record.get("unservedSeconds") or 0.0) + unserved, 1)
        record["restored"] = now
        steps.append(Step("ServiceRestored", f"{attempt.key}: serving again after {unserved:.1f}s without a "
                                             f"ready serving pod"))  # fmt: skip
    if record == (attempt.handoff or {}):
        return attempt, steps
    return attempt.moved(attempt.state, handoff=record or None), steps


def yield_patch(workload: Obj, want: str | None, replicas: int, node: str | None = None) -> Obj | None:
    """The merge patch that stops an old stable workload as `want` says (CLASS, NODE; None: serve) or
    brings it back; None when it is as wanted. A Deployment is scaled to 0 and back to `replicas`. A
    DaemonSet's pods are moved off every node by a node selector no node carries (CLASS), or off `node`
    only by a node affinity (NODE), and back by removing them. Only a workload the handoff stopped (label
    `LABEL_YIELDED`) is ever brought back."""
    current = _labels(workload).get(LABEL_YIELDED)
    daemonset = workload.get("kind") == "DaemonSet"
    want = CLASS if want == NODE and not (daemonset and node) else want
    if current == want and (want is None or daemonset or _replicas(workload) == 0):
        return None
    label: Obj = {"metadata": {"labels": {LABEL_YIELDED: want}}}
    if daemonset:
        away = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": [node]}]}]}}}  # fmt: skip
        template = {"nodeSelector": {LABEL_YIELDED: "true" if want == CLASS else None},
                    "affinity": away if want == NODE else None}  # fmt: skip
        return _ref(workload) | {"patch": label | {"spec": {"template": {"spec": template}}}}
    return _ref(workload) | {"patch": label | {"spec": {"replicas": 0 if want else replicas}}}


def _replicas(workload: Obj) -> int:
    return int((workload.get("spec") or {}).get("replicas") or 0)


def serving_ready(workloads: Iterable[Obj]) -> bool:
    """A stable workload of the class, not stopped, whose controller has seen its current spec, serves
    again: a Deployment with a ready pod, a DaemonSet with a ready pod on every node it wants."""
    for workload in workloads:
        status = workload.get("status") or {}
        current = int(status.get("observedGeneration") or 0) >= int(workload["metadata"].get("generation") or 1)
        wanted = int(status.get("desiredNumberScheduled") or 0) if workload.get("kind") == "DaemonSet" else 1
        stopped = LABEL_YIELDED in _labels(workload)
        if _track(workload) == "stable" and not stopped and current and _ready(workload) >= max(wanted, 1):
            return True
    return False


def handoff_status(fit: Fit, attempt: Attempt | None) -> Obj | None:
    """The class entry's `handoff` (see api.status.HandoffStatus); None for a class without GPUs."""
    if not fit.applies:
        return None
    record = (attempt.handoff if attempt else None) or {}
    status: Obj = {"capacity": fit.arithmetic, "buildBesideStable": fit.build_beside, "canShadow": fit.side_by_side,
                   "mode": fit.mode}  # fmt: skip
    if fit.gpus is not None:
        status["gpus"] = fit.gpus
    if record.get("yielded"):
        status["yieldedSince"] = record["yielded"]
    if record.get("count"):
        status |= {"handoffs": int(record["count"]), "unservedSeconds": float(record.get("unservedSeconds") or 0.0)}
    return status


class HandoffSteps(ABC):
    """The planner's steps for single-accelerator classes (a mixin of `reconcile`'s planner)."""

    plan: Plan
    observed: Observed
    spec: EdgeModelSpec
    now: str
    revision: str
    annotations: dict[str, str]
    application: Application
    attempts: dict[str, Attempt]
    steps: list[Step]
    fits: dict[str, Fit]

    @abstractmethod
    def _workloads(self, hardware: HardwareClass) -> list[Obj]:
        """Provided by the planner."""

    def _handoff_decide(self, slot: tuple[HardwareClass, EngineTarget], attempt: Attempt, view: ClassView,
                        context: Context) -> Attempt:  # fmt: skip
        """The class's fit (kept for `_handoff`), and the decision of a built class that cannot shadow."""
        hardware, target = slot
        self.fits[hardware.key] = found = fit(hardware, self.observed.nodes, target, self.spec.serving)
        attempt, step = unshadowable(attempt, view, context, found)
        self.steps += [step] if step else []
        return attempt

    def _cannot_shadow(self, hardware: HardwareClass, attempt: Attempt, entry: Obj) -> Obj | None:
        """The entry of a built class that cannot shadow and waits (no candidate is started); None otherwise."""
        found = self.fits.get(hardware.key, NO_GPU)
        if found.side_by_side or attempt.state != "Built":
            return None
        rev = attempt.revision if self.application.stale.get(APPROVE) != attempt.revision else attempt.identity
        waiting = (
            f"waiting for annotation {APPROVE}={rev} (the stable pods then yield while it starts) or {REJECT}={rev}"
        )
        waiting = waiting if found.yields else f"{_why_not(found)}: waiting until the class has room"
        return entry | {"message": f"{CANNOT_SHADOW}: {found.arithmetic}; {waiting}"}

    def _handoff(self, hardware: HardwareClass, entry: Obj) -> Obj:
        """Stop or bring back the class's old stable pods, record the time without service, and show it."""
        found, attempt = self.fits.get(hardware.key, NO_GPU), self.attempts.get(hardware.key)
        if attempt is None or not found.applies:
            return entry
        workloads = self._workloads(hardware)
        others = [w for w in workloads if _track(w) == "stable" and _labels(w).get(LABEL_REVISION) != attempt.revision]
        mine = next((w for w in workloads if _labels(w).get(LABEL_REVISION) == attempt.revision), None)
        stopped = mine is not None and LABEL_YIELDED in _labels(mine)
        done = mine is not None and _track(mine) == "stable" and _rolled_out(mine) and not stopped
        # A rebuild (see `rebuild`) needs the GPU that the serving revision's own pods hold.
        rebuilding = attempt.state == "Building" and attempt.rebuild is not None
        rebuilding = rebuilding and mine is not None and _track(mine) == "stable"
        old = others + ([mine] if mine is not None and rebuilding else [])
        wanted = yield_wanted(attempt, found, bool(old), done)
        want = (NODE if attempt.state == "Building" and found.build_node else CLASS) if wanted else None
        replicas = self.spec.serving.replicas_per_class or 1
        for workload in others if not (attempt.state == "Promoted" and done) else []:  # those are being retired
            if (patch := yield_patch(workload, want, replicas, found.build_node)) is not None:
                self.plan.patch.append(patch)
        if mine is not None and (rebuilding or stopped):  # stopped for its rebuild: back once it is built
            patch = yield_patch(mine, want if rebuilding else None, replicas, found.build_node)
            self.plan.patch += [patch] if patch is not None else []
        ready = serving_ready([w for w in workloads if w is not mine or done])
        stopping = f"the stable pod on {found.build_node}" if want == NODE and old[0].get("kind") == "DaemonSet" else ""
        attempt, steps = windows(attempt, found, wanted, ready, self.now, rollout=bool(others),
                                 stopping=stopping or "the stable pods")  # fmt: skip
        self.attempts[hardware.key] = attempt
        self.steps += steps
        status = handoff_status(found, attempt)
        if entry.get("state") == "Pending" and wanted:  # the build waits for the GPU the stable pods are giving up
            entry = entry | {"state": "Building", "message": "the stable pods are stopping to give the build the GPU"}
        decided = attempt.decision is not None and CANNOT_SHADOW in (attempt.reason or "")
        if decided and not entry.get("message"):  # no shadow evidence to show: say why it was decided
            entry = entry | {"message": attempt.reason}
        return entry | ({"handoff": status} if status else {})
