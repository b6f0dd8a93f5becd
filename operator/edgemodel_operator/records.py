"""Decision records: what the operator decided, per attempt, on ConfigMaps the EdgeModel owns. Pure.

One record ConfigMap per revision of an EdgeModel (`<edgemodel>-rec-<revision>`), labelled
app.kubernetes.io/component=record, holds:

- `spec`: the EdgeModel spec the revision was made from (JSON);
- `application`: the generation at which the revision was last applied, and the approval annotations
  already on the object then (JSON, see `Application`): a revision applied again after another one
  was applied starts new attempts, and those annotations are stale for them;
- `class.<class key>`: the class's latest attempt (JSON, see `Attempt`).

An attempt is one revision on one class in one application: when it started, the build's outcome
(kept once read: losing a build pod changes nothing), when shadowing began and the evidence baseline
taken then, the decision with its reason, figures and approval. Records are read from the API
server before each plan and written with the resourceVersion they were read at, so two writers
(a replica that has not yet noticed it lost leadership, a reconcile that planned from a stale view)
cannot both record a decision: the second write conflicts and its plan is dropped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from edgemodel_operator.builders import LABEL_COMPONENT, LABEL_EDGEMODEL, LABEL_REVISION, MANAGED_BY, owner_reference

Obj = dict[str, Any]
COMPONENT = "record"
CLASS_PREFIX = "class."
KEEP_RECORDS = 10  # records of revisions that serve nowhere, kept for re-application checks and history
State = Literal["Building", "Failed", "Built", "Shadowing", "Promoted", "RolledBack"]


@dataclass(frozen=True)
class Attempt:
    """One revision on one hardware class, in one application of that revision.

    `started`, `shadowStarted` and `decided` are RFC 3339 times; `baseline` maps each source (pod) to
    its shadow counters when shadowing began (see `analysis.since`); `figures` are the shadow figures
    the decision was made on; `approval` is the annotation (name=value) that decided, if one did;
    `handoff` is what a single-accelerator class's handoff measured (see `handoff.windows`).
    The deadline and retry fields (`built` to `timed_out`, see `rollout`) and `rebuild` are newer: older
    records without them read as None.
    """

    revision: str
    key: str
    application: int
    state: State
    started: str
    build: Obj | None = None  # engine, precision, cacheKey, artifactDigest, buildSeconds, metrics
    message: str | None = None  # why a build failed
    shadow_started: str | None = None
    baseline: dict[str, dict[str, float]] | None = None
    decision: Literal["Promote", "Rollback"] | None = None
    reason: str | None = None
    decided: str | None = None
    figures: Obj = field(default_factory=dict)
    approval: str | None = None
    handoff: Obj | None = None  # cannotShadow, yielded, count, unservedSeconds, restored
    # Set when the class's pods could not load the built engine and it is built again (see `rebuild`):
    # {"artifactDigest": the engine replaced, "job": UID of its build Job, "reason": the load failure}.
    rebuild: Obj | None = None
    built: str | None = None  # when the built attempt's workload was there (the progress deadline counts from it)
    retries: int | None = None  # automatic retries of an infrastructure failure taken (see rollout.retry_build)
    retry_at: str | None = None  # when the next automatic retry of a failed build is due
    retry_request: str | None = None  # the value of edgeml.dev/retry-build last honoured (or present at the start)
    replaced_job: str | None = None  # UID of the failed Job a retry replaces: deleted, never read again
    timed_out: str | None = None  # when the shadow reached its timeout (onTimeout Hold keeps shadowing)

    @property
    def identity(self) -> str:
        """How a person names this attempt in an approval annotation: `<revision>@<generation>`."""
        return f"{self.revision}@{self.application}"

    def to_json(self) -> str:
        """The attempt as stored: camelCase keys, as Kubernetes objects spell them; empty fields left out."""
        return json.dumps({_camel(k): v for k, v in asdict(self).items() if v not in (None, {})}, sort_keys=True)

    def moved(self, state: State, **changes: Any) -> Attempt:
        return replace(self, state=state, **changes)


@dataclass(frozen=True)
class Application:
    """When a revision was last applied, and the approval annotation values already present then."""

    generation: int
    stale: dict[str, str] = field(default_factory=dict)  # annotation name -> value


@dataclass(frozen=True)
class Record:
    """One revision's record as read from (or to be written to) its ConfigMap."""

    name: str
    revision: str
    resource_version: str | None
    spec: Obj
    application: Application
    attempts: dict[str, Attempt]  # by class key

    def data(self) -> dict[str, str]:
        data = {
            "spec": json.dumps(self.spec, sort_keys=True),
            "application": json.dumps(asdict(self.application), sort_keys=True),
        }
        return data | {CLASS_PREFIX + key: attempt.to_json() for key, attempt in self.attempts.items()}


def record_name(edgemodel: str, revision: str) -> str:
    """<edgemodel>-rec-<revision>: at most 40 + 5 + 10 characters."""
    return f"{edgemodel}-rec-{revision}"


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


_FIELDS = {_camel(name): name for name in Attempt.__dataclass_fields__}


def _attempt(text: str) -> Attempt | None:
    try:
        fields = json.loads(text)
        return Attempt(**{_FIELDS[k]: v for k, v in fields.items() if k in _FIELDS})
    except (AttributeError, TypeError, ValueError):
        return None


def parse(configmap: Obj) -> Record | None:
    """A record from its ConfigMap; None if it names no revision. Parts that cannot be read (edited by
    hand, or written by another version) read as absent, so the next write replaces them."""
    meta = configmap.get("metadata") or {}
    data: dict[str, str] = configmap.get("data") or {}
    revision = (meta.get("labels") or {}).get(LABEL_REVISION)
    if not revision:
        return None
    try:
        application = Application(**json.loads(data["application"]))
    except (KeyError, TypeError, ValueError):
        application = Application(0)
    try:
        spec = json.loads(data.get("spec") or "{}")
    except ValueError:
        spec = {}
    attempts = {
        key.removeprefix(CLASS_PREFIX): attempt
        for key, value in data.items()
        if key.startswith(CLASS_PREFIX) and (attempt := _attempt(value)) is not None
    }
    return Record(meta["name"], revision, meta.get("resourceVersion"), spec, application, attempts)


def current_application(records: dict[str, Record], revision: str, generation: int, annotations: dict[str, str],
                        approval_keys: tuple[str, ...]) -> Application:  # fmt: skip
    """The application of `revision` that the EdgeModel at `generation` is in.

    The same as recorded, unless another revision was applied after it (a later application
    generation on another record): then this is a new application, whose attempts start afresh,
    and the approval annotations on the object now are stale for it.
    """
    record = records.get(revision)
    if record is None:
        return Application(generation)
    applied = record.application.generation
    later = any(r.application.generation > applied for r in records.values() if r.revision != revision)
    if not later:
        return record.application
    return Application(generation, {k: annotations[k] for k in approval_keys if k in annotations})


def build_record_configmap(body: Obj, record: Record) -> Obj:
    """The ConfigMap that holds `record` for the EdgeModel `body`."""
    name = body["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": record.name,
            "namespace": body["metadata"]["namespace"],
            "labels": {
                **MANAGED_BY,
                LABEL_EDGEMODEL: name,
                LABEL_REVISION: record.revision,
                LABEL_COMPONENT: COMPONENT,
            },
            "ownerReferences": [owner_reference(body)],
        },
        "data": record.data(),
    }


def record_write(body: Obj, before: Record | None, after: Record) -> Obj | None:
    """The write that turns `before` into `after`: a create, a merge patch guarded by the resourceVersion
    `before` was read at, or None when nothing changed."""
    if before is None:
        return {"kind": "ConfigMap", "create": build_record_configmap(body, after)}
    old, new = before.data(), after.data()
    changed = {k: v for k, v in new.items() if old.get(k) != v}
    if not changed:
        return None
    return {
        "kind": "ConfigMap",
        "name": after.name,
        "namespace": body["metadata"]["namespace"],
        "patch": {"metadata": {"resourceVersion": before.resource_version}, "data": changed},
    }


def retired(records: dict[str, Record], keep: set[str]) -> list[Record]:
    """Records to delete: beyond the `KEEP_RECORDS` most recently applied, except those in `keep`."""
    ordered = sorted(records.values(), key=lambda r: r.application.generation, reverse=True)
    old = [r for r in ordered if r.revision not in keep]
    return old[KEEP_RECORDS:]
