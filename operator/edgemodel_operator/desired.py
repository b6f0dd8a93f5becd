"""The desired state of the children that exist: what to server-side apply, and when nothing differs. Pure.

The planner (`reconcile`) decides which children exist; this module keeps each one that exists at its
desired state, every reconcile. A serving workload's desired state is rebuilt from the EdgeModel spec
its revision was built from (annotation `edgeml.dev/spec`) with the current `spec.serving` and the
current runtime images, the artifact it serves and its track; a Service's from the current spec. Every
object the operator creates or applies carries `edgeml.dev/applied`, a hash of the whole desired
object: an object whose hash equals the desired one and that nobody else edited since our last write
(its managed fields, see `edited`) is not written at all. Build Jobs are left as they are (a Job's pod
template is immutable; a new revision gets a new Job).

A change of `spec.serving.mode` gives the workload's name to the other kind: the new workload is
created beside the old one, which is deleted once the new one has rolled out (`split_twins` keeps the
old one in the planner's view meanwhile, so the class keeps serving and reporting as before).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from edgemodel_operator.api.spec import EdgeModelSpec
from edgemodel_operator.builders import (
    ANNOTATION_SPEC,
    LABEL_CLASS,
    LABEL_REVISION,
    build_deployment_for_class,
    build_revision_service,
    build_service,
    revision_of,
)
from edgemodel_operator.buildreport import kept_outcome, serving_artifact
from edgemodel_operator.classes import HardwareClass, engine_for
from edgemodel_operator.handoff import LABEL_YIELDED
from edgemodel_operator.records import Attempt, parse
from edgemodel_operator.workloads import Event, labels_of, ref_of, rolled_out, subject, track_of

if TYPE_CHECKING:
    from edgemodel_operator.builders import Images
    from edgemodel_operator.reconcile import Observed, Plan

Obj = dict[str, Any]
FIELD_MANAGER = "edgemodel-operator"  # the field manager of every write the operator makes
LEGACY_MANAGER = "OpenAPI-Generator"  # what the API server called the operator's writes before they named one
ANNOTATION_APPLIED = "edgeml.dev/applied"  # hash of the desired object last written
EDITED = "edited"  # key of the slim copies' metadata: `edited`, computed when the watch event came
WORKLOADS = ("Deployment", "DaemonSet")


def applied_hash(obj: Obj) -> str:
    """sha256 (hex, 16 characters) of a desired object, its own `edgeml.dev/applied` annotation left out."""
    meta = dict(obj.get("metadata") or {})
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != ANNOTATION_APPLIED}
    meta = {k: v for k, v in meta.items() if k not in {"uid", "annotations"}} | {"annotations": annotations}
    text = json.dumps(obj | {"metadata": meta}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stamp(obj: Obj) -> Obj:
    """`obj` with its `edgeml.dev/applied` annotation set (a copy; `obj` is not changed)."""
    meta = dict(obj["metadata"])
    meta["annotations"] = dict(meta.get("annotations") or {}) | {ANNOTATION_APPLIED: applied_hash(obj)}
    return obj | {"metadata": meta}


def edited(obj: Obj, manager: str = FIELD_MANAGER) -> bool:
    """Whether another field manager changed the object's spec (or its scale) since `manager` last changed
    it: its managed fields name an entry of another manager (not a status writer) that owns fields under
    `spec`, at least as recent as `manager`'s latest (or of unknown time). A slim copy carries the answer
    (`metadata.edited`)."""
    meta = obj.get("metadata") or {}
    if EDITED in meta:
        return bool(meta[EDITED])
    entries = meta.get("managedFields") or []
    ours = max((str(e.get("time") or "") for e in entries if e.get("manager") == manager), default="")
    for entry in entries:
        if entry.get("manager") == manager or entry.get("subresource") not in {None, "", "scale"}:
            continue
        # An entry of the scale subresource comes without a time: it counts as the latest.
        if "f:spec" in (entry.get("fieldsV1") or {}) and (not entry.get("time") or str(entry["time"]) >= ours):
            return True
    return False


def inherited(written: Obj) -> list[Obj] | None:
    """A JSON patch that drops the managed-fields entry an operator version before this one left on an object
    it created (manager `LEGACY_MANAGER`, the client's default, as an updater of `spec`), once this version
    has applied the object (`written`: the API server's answer): while that entry co-owns a field, a later
    apply that drops the field (an old port, a removed limit) cannot remove it. None if there is none."""
    entries = (written.get("metadata") or {}).get("managedFields") or []
    if not any(e.get("manager") == FIELD_MANAGER and e.get("operation") == "Apply" for e in entries):
        return None  # never dropped before this version's apply owns the same fields
    for index, entry in enumerate(entries):
        old = entry.get("manager") == LEGACY_MANAGER and entry.get("operation") == "Update"
        if old and not entry.get("subresource") and "f:spec" in (entry.get("fieldsV1") or {}):
            path = f"/metadata/managedFields/{index}"
            return [{"op": "test", "path": f"{path}/manager", "value": LEGACY_MANAGER},
                    {"op": "test", "path": f"{path}/operation", "value": "Update"},
                    {"op": "remove", "path": path}]  # fmt: skip
    return None


def differs(desired: Obj, live: Obj) -> bool:
    """Whether `live` (as watched) needs `desired` written: its hash differs, or someone else edited it."""
    annotations = (live["metadata"].get("annotations") or {}) if live.get("metadata") else {}
    return annotations.get(ANNOTATION_APPLIED) != applied_hash(desired) or edited(live)


def split_twins(observed: Observed) -> tuple[list[Obj], list[Obj]]:
    """(workloads the planner sees, workloads it does not): of a Deployment and a DaemonSet with one name
    (a serving mode switch under way), the planner sees the old one, of the kind the spec no longer asks
    for, until it is gone; the new one is left to `converge`."""
    mode = EdgeModelSpec.model_validate(observed.body["spec"]).serving.mode
    names: dict[str, int] = {}
    for workload in observed.deployments:
        names[workload["metadata"]["name"]] = names.get(workload["metadata"]["name"], 0) + 1
    seen: list[Obj] = []
    hidden: list[Obj] = []
    for workload in observed.deployments:
        twin = names[workload["metadata"]["name"]] > 1
        (hidden if twin and workload["kind"] == mode else seen).append(workload)
    return seen, hidden


def converge(observed: Observed, plan: Plan, classes: list[HardwareClass], images: Images, hidden: list[Obj]) -> None:
    """Add to `plan` the applies (and, for a mode switch, the create or delete) that bring every existing
    serving workload and Service to its desired state; nothing for those that are there already, nor for
    those the plan already deletes or patches (converged at the next reconcile), nor a stable workload a GPU
    handoff has stopped (label `edgeml.dev/yielded`: the handoff brings it back, then it converges)."""
    body = observed.body
    busy = {subject(r) for r in plan.delete + plan.patch} | {subject(o) for o in plan.create}
    by_key = {c.key: c for c in classes}
    twins = {w["metadata"]["name"]: w for w in hidden}
    for live in observed.deployments:
        if subject(live) in busy or LABEL_YIELDED in labels_of(live):  # stopped by a GPU handoff: it brings it back
            continue
        hardware = by_key.get(labels_of(live).get(LABEL_CLASS, ""))
        artifact = artifact_of(observed, live)
        desired = desired_workload(body, live, hardware, images, artifact) if hardware and artifact else None
        if desired is None:
            continue
        if desired["kind"] == live["kind"]:
            if differs(desired, live):
                plan.apply.append(_guarded(stamp(desired), live))
                if (replaced := replaced_engine(observed, live)) is not None and replaced != artifact:
                    plan.events.append(Event("ServingRebuilt", f"{subject(live)}: serving the rebuilt {artifact} "
                                             f"in place of {replaced}", subject(live)))  # fmt: skip
            continue
        twin = twins.get(live["metadata"]["name"])  # a mode switch: the new kind first, then the old goes
        if twin is None:
            plan.create.append(stamp(desired))
            plan.events.append(Event("ModeChanged", f"{subject(live)}: starting its {desired['kind']}",
                                     subject(desired)))  # fmt: skip
        elif rolled_out(twin):
            plan.delete.append(ref_of(live))
            plan.events.append(Event("ModeChanged", f"{subject(twin)} serves: {subject(live)} removed",
                                     subject(live)))  # fmt: skip
    for found in observed.services:
        live = {"kind": "Service"} | found
        if subject(live) in busy:
            continue
        desired = desired_service(body, live, by_key)
        if desired is not None and differs(desired, live):
            plan.apply.append(_guarded(stamp(desired), live))


def _attempts_of(observed: Observed, live: Obj) -> Iterator[Attempt]:
    """The attempts of a serving workload's class in the decision records of its revision."""
    labels = labels_of(live)
    for found in observed.records:
        record = parse(found)
        attempt = record.attempts.get(labels.get(LABEL_CLASS, "")) if record else None
        if record and attempt and record.revision == labels.get(LABEL_REVISION):
            yield attempt


def replaced_engine(observed: Observed, live: Obj) -> str | None:
    """The artifact that a rebuild of the workload's class replaced (see `rebuild`), while the workload still
    serves it; None otherwise (no rebuild, or the workload serves another artifact)."""
    rebuilt = next((attempt for attempt in _attempts_of(observed, live) if attempt.rebuild), None)
    if rebuilt is None or rebuilt.rebuild is None:
        return None
    old = str(rebuilt.rebuild.get("artifactDigest"))
    return old if serving_artifact(live) == old else None


def artifact_of(observed: Observed, live: Obj) -> str | None:
    """The engine artifact a serving workload is for, as the operator knows it: its attempt's build in the
    revision's decision record, else the outcome kept on its build Job; only a workload that neither knows
    (made before records) is taken at its word (its serve argument), which a hand edit could have changed."""
    for attempt in _attempts_of(observed, live):
        if built := (attempt.build or {}).get("artifactDigest"):
            return str(built)
    job = next((j for j in observed.jobs if j["metadata"]["name"] == live["metadata"]["name"]), None)
    kept = kept_outcome(job) if job else None
    if kept and kept.get("artifact"):
        return str(kept["artifact"])
    return serving_artifact(live)


def desired_workload(body: Obj, live: Obj, hardware: HardwareClass, images: Images, artifact: str) -> Obj | None:
    """The desired state of an existing serving workload: built from the spec its revision was built from,
    with the current `spec.serving`, for `artifact` (see `artifact_of`), on its track; None where that spec
    cannot be read back, or no longer gives the workload's revision or an engine for the class."""
    revision = labels_of(live).get(LABEL_REVISION)
    text = (live["metadata"].get("annotations") or {}).get(ANNOTATION_SPEC)
    if not revision or not text:
        return None
    try:
        stored = json.loads(text)
        spec = {k: v for k, v in stored.items() if k != "serving"}
        if "serving" in body["spec"]:
            spec["serving"] = body["spec"]["serving"]
        parsed = EdgeModelSpec.model_validate(spec)
    except ValueError:  # edited by hand into something that no longer reads: left as it is
        return None
    target = engine_for(parsed, hardware)
    if target is None or revision_of(parsed) != revision:
        return None
    return build_deployment_for_class(body | {"spec": spec}, hardware, target, revision=revision,
                                      artifact=artifact, images=images, track=track_of(live))  # fmt: skip


def desired_service(body: Obj, live: Obj, classes: dict[str, HardwareClass]) -> Obj | None:
    """The desired state of an existing Service: the EdgeModel's, or a revision's of a present class."""
    labels = labels_of(live)
    if LABEL_CLASS not in labels:
        return build_service(body) if live["metadata"]["name"] == body["metadata"]["name"] else None
    hardware, revision = classes.get(labels[LABEL_CLASS]), labels.get(LABEL_REVISION)
    return build_revision_service(body, revision, hardware) if hardware and revision else None


def _guarded(desired: Obj, live: Obj) -> Obj:
    """`desired` naming the UID of the object it was planned for: a replaced object is not written."""
    uid = live["metadata"].get("uid")
    return desired | {"metadata": desired["metadata"] | ({"uid": uid} if uid else {})}
