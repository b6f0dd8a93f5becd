"""Reading the objects an EdgeModel owns: labels, tracks, readiness, and how Events name them. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgemodel_operator.builders import LABEL_TRACK

Obj = dict[str, Any]


@dataclass(frozen=True)
class Event:
    """A step worth an Event on the EdgeModel; `subject` ("Kind/name") ties it to one write."""

    reason: str
    message: str
    subject: str | None = None


def labels_of(obj: Obj) -> dict[str, str]:
    labels: dict[str, str] = obj["metadata"].get("labels") or {}
    return labels


def track_of(workload: Obj) -> str:
    return labels_of(workload).get(LABEL_TRACK, "stable")


def ready_of(workload: Obj) -> int:
    status = workload.get("status") or {}
    return int(status.get("readyReplicas") or status.get("numberReady") or 0)


def rolled_out(workload: Obj) -> bool:
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


def ref_of(obj: Obj) -> Obj:
    """Kind, name and namespace of an observed object, and its UID: a delete by this reference removes
    that object only, never one created since under the same name."""
    meta = obj["metadata"]
    ref = {"kind": obj["kind"], "name": meta["name"], "namespace": meta["namespace"]}
    return ref | ({"uid": meta["uid"]} if meta.get("uid") else {})


def subject(obj: Obj) -> str:
    """How an Event names the object a create or delete is about."""
    return f"{obj['kind']}/{obj['metadata']['name'] if 'metadata' in obj else obj['name']}"
