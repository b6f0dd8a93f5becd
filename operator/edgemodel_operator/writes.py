"""What went wrong with a plan's writes, and how the status and Events report it. Pure.

`Cluster.apply` writes every object of a plan it can and collects, for each write the API server
refused, a `WriteFailure` (the object, the verb, the HTTP status and the API's own message), and for
each object it found under one of our names but controlled by something else, a `Foreign`. Neither
stops the other writes. `report` puts them into the status the planner made: a failure of an object
that belongs to a hardware class (label `edgeml.dev/class`) goes into that class's entry
(`writeErrors`); every failure makes Ready False with reason `WriteFailed`, and every foreign object
makes Ready False with reason `Conflict` (and Stalled True: only a person can resolve it), naming
the objects. `news` says which of them the previous status did not show yet, for the Warning Events.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edgemodel_operator import conditions as cond
from edgemodel_operator.api.status import CONDITION_MESSAGE_MAX, MESSAGE_MAX
from edgemodel_operator.builders import LABEL_CLASS
from edgemodel_operator.projection import clip

Obj = dict[str, Any]
CONFLICT = "Conflict"
WRITE_FAILED = "WriteFailed"
LISTED = 5  # objects named in a condition's message; the rest are counted
WRITE_ERRORS = 4  # write errors kept on one class entry


@dataclass(frozen=True)
class WriteFailure:
    """A write the API server refused: `subject` is "Kind/name", `code` the HTTP status (0: no answer)."""

    subject: str
    verb: str  # create, apply, patch, delete, record
    code: int
    message: str
    class_key: str | None = None

    def describe(self) -> str:
        return f"{self.verb} {self.subject}: {self.code} {self.message}"


@dataclass(frozen=True)
class Foreign:
    """An object under one of our names that this EdgeModel does not control: reported, never written."""

    subject: str
    owner: str  # who controls it, e.g. "no controller" or "Deployment/web"
    class_key: str | None = None

    def describe(self) -> str:
        return f"{self.subject} exists and is not controlled by this EdgeModel ({self.owner}); it is left alone"


def class_of(obj: Obj) -> str | None:
    """The hardware class an object (a full object or a reference with labels) belongs to, if any."""
    labels = (obj.get("metadata") or {}).get("labels") or obj.get("labels") or {}
    key = labels.get(LABEL_CLASS)
    return str(key) if key else None


def api_message(body: str | bytes | None, reason: str | None) -> str:
    """The API server's message from an error response (a Status object), else its reason phrase."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    try:
        status = json.loads(text or "")
    except ValueError:
        status = None
    message = status.get("message") if isinstance(status, dict) else None
    return clip(str(message or reason or text or "no message"), MESSAGE_MAX - 64)


def controller_of(obj: Obj) -> tuple[str | None, str]:
    """The UID of an object's controller (None without one) and how to name it."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid"), f"controlled by {ref.get('kind')}/{ref.get('name')}"
    return None, "no controller"


def report(status: Obj, failures: list[WriteFailure], foreign: list[Foreign], *, generation: int, now: str) -> Obj:
    """`status` (as the planner projected it) with the failed writes and foreign objects reported."""
    status = dict(status)
    errors: dict[str, list[Obj]] = {}
    for failure in failures:
        if failure.class_key:
            entry = {"object": failure.subject, "verb": failure.verb, "code": failure.code}
            errors.setdefault(failure.class_key, []).append(entry | {"message": clip(failure.message, MESSAGE_MAX)})
    for item in foreign:
        if item.class_key:
            errors.setdefault(item.class_key, []).append(
                {"object": item.subject, "verb": "create", "code": 409, "message": clip(item.describe(), MESSAGE_MAX)}
            )
    status["classes"] = [
        (entry | {"writeErrors": errors[entry["key"]][:WRITE_ERRORS]}) if entry.get("key") in errors else entry
        for entry in status.get("classes") or []
    ]
    conditions: list[Obj] = list(status.get("conditions") or [])

    def put(kind: str, value: bool, reason: str, message: str) -> None:
        nonlocal conditions
        conditions = cond.set_condition(conditions, kind, value, reason, clip(message, CONDITION_MESSAGE_MAX),
                                        generation=generation, now=now)  # fmt: skip

    if foreign:
        text = _listed([f.describe() for f in foreign])
        put(cond.READY, False, CONFLICT, text)
        put(cond.STALLED, True, CONFLICT, f"rename or remove what is in the way: {text}")
    elif failures:
        put(cond.READY, False, WRITE_FAILED, _listed([f.describe() for f in failures]))
    if failures:
        put(cond.DEGRADED, True, WRITE_FAILED, _listed([f.describe() for f in failures]))
    if foreign or failures:
        status["conditions"] = conditions
        status["phase"] = cond.phase(conditions)
    return status


def news(old: Obj, failures: list[WriteFailure], foreign: list[Foreign]) -> list[tuple[str, str]]:
    """(reason, message) of a Warning Event for each failure or foreign object the old status did not show."""
    shown = json.dumps(old.get("conditions") or []) + json.dumps(
        [e.get("writeErrors") for e in old.get("classes") or []]
    )
    found = [(CONFLICT, f.describe()) for f in foreign if f.subject not in shown]
    found += [(WRITE_FAILED, f.describe()) for f in failures if f.subject not in shown]
    return found


def _listed(texts: list[str]) -> str:
    each = max(80, CONDITION_MESSAGE_MAX // LISTED - 2)
    text = "; ".join(clip(t, each) for t in texts[:LISTED])
    return text + (f"; and {len(texts) - LISTED} more" if len(texts) > LISTED else "")
