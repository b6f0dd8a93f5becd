"""When to write a status the planner computed: now, after a short hold, or not at all. Pure.

Every status write is an API write and a watch event for every client of the EdgeModel. What
readers act on is written at once: any change of state (a class's state, revision, decision or
ready pods, a condition's status or reason, the revisions, a new `observedGeneration`). Only a
change of figures (shadow counts and ratios, the messages that quote them) is held for `hold`
seconds, so that a class being analysed every few seconds does not rewrite the object each time.
Decisions are never held, and never kept only in the status: they are recorded first (`records`).
"""

from __future__ import annotations

from typing import Any

from edgemodel_operator import conditions as cond
from edgemodel_operator.api.schema import structural_schema
from edgemodel_operator.api.status import EdgeModelStatus

Obj = dict[str, Any]
STATUS_SCHEMA = structural_schema(EdgeModelStatus)


def with_defaults(value: Any, schema: Obj = STATUS_SCHEMA) -> Any:
    """`value` with the defaults of its CRD schema filled in, as the API server stores it.

    A status compared without them never equals the stored one (a class without `readyReplicas` is
    stored with 0), so it would be written again, unchanged, at every reconcile.
    """
    if isinstance(value, dict):
        properties: Obj = schema.get("properties") or {}
        filled = {k: with_defaults(v, properties.get(k) or {}) for k, v in value.items()}
        for name, child in properties.items():
            if name not in filled and "default" in child:
                filled[name] = with_defaults(child["default"], child)
        return filled
    if isinstance(value, list):
        return [with_defaults(item, schema.get("items") or {}) for item in value]
    return value


def changed(new: Obj, current: Obj) -> bool:
    """Whether writing `new` would change any field of `current`."""
    return any(current.get(key) != value for key, value in new.items())


FIGURES = ("requests", "agreement", "latencyRatio", "errorRate", "reason")  # of a class's shadow entry


def state_of(status: Obj) -> Obj:
    """`status` without its figures: what a hold may never delay."""
    kept = {k: v for k, v in status.items() if k not in {"conditions", "classes", "shadow"}}
    kept["conditions"] = [{k: c.get(k) for k in ("type", "status", "reason")} for c in status.get("conditions") or []]
    classes = []
    for entry in status.get("classes") or []:
        shadow = {k: v for k, v in (entry.get("shadow") or {}).items() if k not in FIGURES}
        classes.append({k: v for k, v in entry.items() if k not in {"message", "shadow"}} | {"shadow": shadow})
    kept["classes"] = classes
    return kept


def settled(status: Obj) -> bool:
    found = cond.condition(status.get("conditions", []), cond.PROGRESSING)
    return found is not None and found.get("status") == "False"


def write_delay(new: Obj, current: Obj, *, held_since: float | None, now: float, hold: float) -> float | None:
    """None: nothing to write. 0: write now. Otherwise: seconds to wait, then decide again.

    `held_since` is when this object's pending change was first held (None if none is held).
    """
    if not changed(new, current):
        return None
    if state_of(new) != state_of(current) or settled(new):
        return 0.0
    if held_since is None:
        return hold
    return max(0.0, held_since + hold - now)


def merge_patch(old: Obj, new: Obj) -> Obj:
    """A JSON merge patch (RFC 7386) that turns `old` into `new`: keys that are gone become null."""
    patch: Obj = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            nested = merge_patch(before, value)
            if nested:
                patch[key] = nested
        elif value != before:
            patch[key] = value
    return patch
