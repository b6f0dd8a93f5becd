"""When to write a status the planner computed: now, after a short hold, or not at all. Pure.

Every status write is an API write and a watch event for every client of the EdgeModel, so a
status that only passes through an intermediate step (builds finished, pods starting) is held for
`hold` seconds; if the object settles meanwhile, only the settled status is written. What readers
act on is never held: a new `observedGeneration` (kstatus, `kubectl wait`) and a settled status
(Progressing False: Ready, Failed or Degraded) are written at once.
"""

from __future__ import annotations

from typing import Any

from edgemodel_operator import conditions as cond

Obj = dict[str, Any]


def changed(new: Obj, current: Obj) -> bool:
    """Whether writing `new` would change any field of `current`."""
    return any(current.get(key) != value for key, value in new.items())


def settled(status: Obj) -> bool:
    found = cond.condition(status.get("conditions", []), cond.PROGRESSING)
    return found is not None and found.get("status") == "False"


def write_delay(new: Obj, current: Obj, *, held_since: float | None, now: float, hold: float) -> float | None:
    """None: nothing to write. 0: write now. Otherwise: seconds to wait, then decide again.

    `held_since` is when this object's pending change was first held (None if none is held).
    """
    if not changed(new, current):
        return None
    if new.get("observedGeneration") != current.get("observedGeneration") or settled(new):
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
