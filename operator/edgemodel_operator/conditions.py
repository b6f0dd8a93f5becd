"""Status conditions following Kubernetes conventions, readable by kstatus (Flux, Argo CD).

`set_condition` keeps lastTransitionTime unless the status flips; `phase` is derived from the
conditions, never stored on its own.
"""

from __future__ import annotations

from typing import Any

Condition = dict[str, Any]

READY = "Ready"
ENGINES_BUILT = "EnginesBuilt"
VALIDATED = "Validated"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
# kstatus (Flux, cli-utils) reads an "abnormal-true" Stalled condition as Failed: set while a class
# has failed and nothing is still in progress, i.e. it will not get better without a change.
STALLED = "Stalled"
ORDER = (READY, ENGINES_BUILT, VALIDATED, PROGRESSING, DEGRADED, STALLED)


def set_condition(
    conditions: list[Condition],
    kind: str,
    status: bool,
    reason: str,
    message: str,
    *,
    generation: int,
    now: str,
) -> list[Condition]:
    """A new list with condition `kind` set; its lastTransitionTime moves only when the status flips."""
    value = "True" if status else "False"
    previous = next((c for c in conditions if c.get("type") == kind), None)
    since = previous["lastTransitionTime"] if previous and previous.get("status") == value else now
    updated = {
        "type": kind,
        "status": value,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    }
    others = [c for c in conditions if c.get("type") != kind]
    return sorted([*others, updated], key=lambda c: ORDER.index(c["type"]) if c["type"] in ORDER else len(ORDER))


def condition(conditions: list[Condition], kind: str) -> Condition | None:
    return next((c for c in conditions if c.get("type") == kind), None)


def phase(conditions: list[Condition]) -> str:
    """A one-word summary for `kubectl get`, derived from the conditions."""

    def true(kind: str) -> bool:
        found = condition(conditions, kind)
        return bool(found and found["status"] == "True")

    if true(READY):
        return "Degraded" if true(DEGRADED) else "Ready"
    if true(DEGRADED) and not true(PROGRESSING):
        return "Failed"
    if true(PROGRESSING):
        return "Progressing"
    return "Pending"
