"""The EdgeModel's status, projected from the per-class entries the planner decided. Pure.

Bounded whatever the fleet: a class entry names at most `NODE_NAMES` of its nodes (and counts
them all), every message is cut to the CRD's maxLength, and a condition that summarises failing
classes lists a few and counts the rest. So a class of 1,000 nodes, or 50 classes failing with
4 KiB build messages, still make a status the API server accepts, and a node that comes or goes
rewrites an EdgeModel only when it changes the count (or the few names) of its class.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from edgemodel_operator import conditions as cond
from edgemodel_operator.api.status import CONDITION_MESSAGE_MAX, MESSAGE_MAX, NODE_NAMES
from edgemodel_operator.classes import HardwareClass

Obj = dict[str, Any]
LISTED = 5  # failing classes named in a condition's message; the rest are counted
BUILT = {"Built", "Serving", "Shadowing", "RolledBack"}


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def class_entry(
    hardware: HardwareClass, engine: str | None, precision: str | None, state: str, message: str | None
) -> Obj:
    """A class's status entry: its nodes counted (a few named), whether any can take pods now."""
    entry: Obj = {
        "key": hardware.key,
        "nodeCount": len(hardware.nodes),
        "nodes": list(hardware.nodes[:NODE_NAMES]),
        "schedulable": bool(hardware.schedulable),
        "state": state,
    }
    if engine:
        entry |= {"engine": engine, "precision": precision}
    if message:
        entry["message"] = message
    return entry


def absent_entry(previous: Obj | None, key: str, *, since: str, retire_at: str, ready: int) -> Obj:
    """The entry of a class no node has had since `since`: what it knew is kept, so that it is not
    new if it comes back (its revision, build, shadow evidence, and `lastState`, e.g. RolledBack)."""
    before = dict(previous or {})
    last = before.get("lastState") if before.get("state") == "Absent" else before.get("state")
    entry = {k: v for k, v in before.items() if k not in {"schedulable", "message", "lastState"}}
    entry |= {
        "key": key,
        "nodeCount": 0,
        "nodes": [],
        "state": "Absent",
        "absentSince": since,
        "readyReplicas": ready,
        "message": f"no node with this class's labels since {since}; what serves it is kept until {retire_at}",
    }
    if last:
        entry["lastState"] = last
    return entry


def bounded(entry: Obj) -> Obj:
    """`entry` within the CRD's limits: at most NODE_NAMES node names, messages cut to MESSAGE_MAX."""
    entry = dict(entry)
    entry["nodes"] = list(entry.get("nodes") or [])[:NODE_NAMES]
    if entry.get("message"):
        entry["message"] = clip(str(entry["message"]), MESSAGE_MAX)
    shadow = entry.get("shadow")
    if isinstance(shadow, dict) and shadow.get("reason"):
        entry["shadow"] = shadow | {"reason": clip(str(shadow["reason"]), MESSAGE_MAX)}
    return entry


def summary(entries: Iterable[Obj], limit: int = CONDITION_MESSAGE_MAX) -> str:
    """`key: message` for the first LISTED entries, then how many more, within `limit` characters."""
    items = list(entries)
    each = max(40, (limit - 40) // LISTED - 2)
    text = "; ".join(clip(f"{e['key']}: {e.get('message')}", each) for e in items[:LISTED])
    if len(items) > LISTED:
        text += f"; and {len(items) - LISTED} more classes"
    return clip(text, limit)


def project(
    old: Obj, entries: list[Obj], *, generation: int, revision: str, serving: set[str], now: str
) -> Obj:  # fmt: skip
    """The status: conditions, revisions and bounded class entries, from the entries and the old status.

    `serving` names the revisions whose stable workloads exist; `now` (RFC 3339) stamps conditions
    that flip. Absent classes are listed but counted nowhere: no node of theirs can serve or fail.
    """
    entries = sorted((bounded(e) for e in entries), key=lambda e: str(e["key"]))
    present = [e for e in entries if e["state"] != "Absent"]
    states = [e["state"] for e in present]
    total = len(present)
    built = sum(s in BUILT for s in states)
    failed = [e for e in present if e["state"] == "Failed"]
    rolled_back = [e for e in present if e["state"] == "RolledBack"]
    pending = [e for e in present if e["state"] == "Pending"]
    serving_count = states.count("Serving")
    building = states.count("Building") + states.count("Pending") + states.count("Shadowing")
    absent = len(entries) - total
    conditions: list[Obj] = list(old.get("conditions", []))

    def put(kind: str, status: bool, reason: str, message: str) -> None:
        nonlocal conditions
        conditions = cond.set_condition(
            conditions, kind, status, reason, clip(message, CONDITION_MESSAGE_MAX), generation=generation, now=now
        )

    if total == 0:
        put(cond.ENGINES_BUILT, False, "NoNodes", "no Ready node matches spec.targets")
    elif failed:
        put(cond.ENGINES_BUILT, False, "BuildFailed", summary(failed))
    elif pending:
        put(cond.ENGINES_BUILT, False, "Unschedulable", summary(pending))
    else:
        put(cond.ENGINES_BUILT, built == total, "Built" if built == total else "Building", f"{built}/{total} built")
    put(cond.VALIDATED, built > 0 and not failed, "Validated" if built and not failed else "NotValidated",
        f"{built}/{total} engines passed validation")  # fmt: skip
    ready = total > 0 and serving_count == total
    away = f" ({absent} absent)" if absent else ""
    put(
        cond.READY, ready, "Serving" if ready else "NotReady", f"{serving_count}/{total} classes serve {revision}{away}"
    )
    progressing = building > 0 or (built > serving_count + len(rolled_back))
    shadowing = states.count("Shadowing")
    unshadowable = [  # a rollout (another revision serves the class) on GPUs that cannot hold a candidate beside it
        e
        for e in present
        if e["state"] != "Serving"
        and e.get("revision") not in {None, revision}
        and e.get("handoff", {}).get("canShadow") is False
    ]
    if progressing and unshadowable:  # see `handoff`: said at once, with the arithmetic
        put(cond.PROGRESSING, True, "CannotShadow", summary({"key": e["key"], "message": e["handoff"].get("capacity")}
                                                           for e in unshadowable))  # fmt: skip
    else:
        put(cond.PROGRESSING, progressing, "Reconciling" if progressing else "Stable",
            f"{building - shadowing} building, {shadowing} shadowing")  # fmt: skip
    bad = failed + rolled_back
    reason = "RolledBack" if rolled_back else "ClassFailed"
    put(cond.DEGRADED, bool(bad), reason if bad else "AsExpected", summary(bad) if bad else "every class as expected")
    stalled = bool(bad) and not progressing
    put(cond.STALLED, stalled, reason if stalled else "AsExpected",
        f"{len(bad)} classes need a spec change: {summary(bad)}" if stalled else "nothing is stuck")  # fmt: skip
    return {
        "observedGeneration": generation,
        "phase": cond.phase(conditions),
        "conditions": conditions,
        "revisions": revisions(old, ready, revision, serving),
        "classesReady": f"{serving_count}/{total}",
        "classes": entries,
    }


def revisions(old: Obj, ready: bool, revision: str, serving: set[str]) -> Obj:
    """The revision serving now (stable) and the one on its way (candidate)."""
    if ready:
        return {"stable": revision}
    stable = (old.get("revisions") or {}).get("stable")
    if stable and stable != revision and stable in serving:
        return {"stable": stable, "candidate": revision}
    return {"candidate": revision}
