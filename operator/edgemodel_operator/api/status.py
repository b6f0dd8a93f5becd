"""The observed state of an EdgeModel (`status`), written only by the operator."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from edgemodel_operator.api.fields import ApiModel

MESSAGE_MAX = 1024
"""Longest message of a class (and reason of its shadow evidence), in characters; the operator cuts longer ones."""
CONDITION_MESSAGE_MAX = 4096
"""Longest condition message the operator writes (the schema allows 32768, as Kubernetes does)."""
NODE_NAMES = 5
"""Nodes a class entry names; `nodeCount` counts them all."""

ClassState = Literal["Pending", "Building", "Built", "Failed", "Serving", "Shadowing", "RolledBack", "Absent"]
"""Where a class is in the rollout; Absent: no node with its labels exists (see `absentSince`)."""

ConditionType = Literal["Ready", "EnginesBuilt", "Validated", "Progressing", "Degraded", "Stalled"]
"""The condition types the operator sets; Ready is the one kstatus, Flux and Argo CD read."""


class Condition(ApiModel):
    """One aspect of the object's state, following Kubernetes API conventions."""

    type: str = Field(max_length=316, description="Ready, EnginesBuilt, Validated, Progressing, Degraded or Stalled.")
    status: Literal["True", "False", "Unknown"] = Field(description="Whether the condition holds.")
    reason: str = Field(
        max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", description="CamelCase cause."
    )
    message: str = Field(default="", max_length=32768, description="Human-readable details.")
    observed_generation: int = Field(ge=0, description="The metadata.generation this condition was computed from.")
    last_transition_time: datetime = Field(description="When the status last changed.")


class Revisions(ApiModel):
    """Which revisions of the spec are serving."""

    stable: str | None = Field(default=None, description="Revision answering client requests.")
    candidate: str | None = Field(default=None, description="Revision being built or shadowed, if any.")


class EngineMetrics(ApiModel):
    """Validation and latency figures measured by a build on its hardware class."""

    max_abs_error: float | None = Field(default=None, description="Largest absolute difference from the reference.")
    max_relative_error: float | None = Field(
        default=None, description="Largest difference relative to the reference's range."
    )
    cosine: float | None = Field(default=None, description="Smallest cosine similarity to the reference.")
    top1_agreement: float | None = Field(default=None, description="Share of samples with the same arg-max class.")
    worst_sample: int | None = Field(
        default=None, ge=0, description="Index of the reference sample with the largest error (0-based)."
    )
    validation: Literal["passed", "uninformative"] | None = Field(
        default=None,
        description="Validation's verdict: passed, or uninformative when no output's reference values could "
        "discriminate (near zero, near constant or not finite), so that the figures decided nothing.",
    )
    uninformative_outputs: list[str] | None = Field(
        default=None,
        max_length=8,
        description="Outputs whose reference values cannot discriminate; validation did not judge their figures "
        "(build report.json says why for each).",
    )
    latency_p50_ms: float | None = Field(default=None, description="Median latency of one inference.")
    latency_p99_ms: float | None = Field(default=None, description="99th percentile latency of one inference.")


class ShadowStatus(ApiModel):
    """Evidence gathered while a candidate receives mirrored traffic."""

    revision: str | None = Field(default=None, description="The candidate revision this evidence is about.")
    started: str | None = Field(
        default=None, description="When mirroring to this candidate started (RFC 3339); `duration` counts from here."
    )
    requests: int = Field(default=0, ge=0, description="Mirrored requests compared so far.")
    agreement: float | None = Field(default=None, description="Share of mirrored requests whose outputs agreed.")
    latency_ratio: float | None = Field(default=None, description="Candidate latency divided by stable latency.")
    error_rate: float | None = Field(default=None, description="Share of mirrored requests that failed.")
    decision: Literal["Pending", "Promote", "Rollback", "AwaitingApproval"] | None = Field(
        default=None, description="What the analysis concluded."
    )
    reason: str | None = Field(
        default=None, max_length=MESSAGE_MAX, description="Why, with the figures that decided it."
    )


class HandoffStatus(ApiModel):
    """How a GPU class's allocatable GPUs fit a rollout, and what its same-node handoffs cost."""

    mode: Literal["Auto", "Always", "Never"] = Field(default="Auto", description="spec.serving.acceleratorHandoff.")
    gpus: int | None = Field(
        default=None,
        ge=0,
        description="nvidia.com/gpu allocatable on the class's schedulable nodes (time-slicing replicas count).",
    )
    capacity: str | None = Field(
        default=None,
        max_length=MESSAGE_MAX,
        description="The arithmetic: GPUs found, GPUs the build and a candidate beside the stable pods need.",
    )
    build_beside_stable: bool | None = Field(
        default=None, description="Whether the build can run while the stable pods serve; if not, they yield."
    )
    can_shadow: bool | None = Field(
        default=None,
        description="Whether a candidate can run beside the stable pods; if not, the class is not shadowed "
        "(reason CannotShadow) and follows spec.serving.acceleratorHandoff.",
    )
    yielded_since: str | None = Field(
        default=None, description="When the stable pods were stopped for the handoff under way (RFC 3339)."
    )
    handoffs: int | None = Field(default=None, ge=0, description="Times this rollout stopped the stable pods.")
    unserved_seconds: float | None = Field(
        default=None,
        ge=0,
        description="Seconds this rollout's finished handoffs left the class without a ready serving pod (a "
        "DaemonSet that gave up one node: that node without its pod): from the scale-down to the first reconcile "
        "that saw the stopped pods' place served again, to the second, summed.",
    )


class CandidateSummary(ApiModel):
    """One engine that `precision: auto` tried on the class: how fast and how close to fp32 it was."""

    engine: str | None = Field(default=None, max_length=32, description="Engine of the candidate.")
    precision: str | None = Field(default=None, max_length=16, description="Precision of the candidate.")
    speedup: float | None = Field(
        default=None, description="ONNX Runtime fp32's median latency over this one's, timed in the same run."
    )
    cosine: float | None = Field(default=None, description="Smallest cosine similarity to the fp32 reference.")
    passed: bool = Field(default=False, description="Whether it met the tolerance (and the task metric bound).")


class WriteError(ApiModel):
    """A write of one of the class's objects that the API server refused, or an object under one of its
    names that this EdgeModel does not control (code 409, verb create); retried on every reconcile."""

    object: str = Field(max_length=320, description="The object, as Kind/name.")
    verb: Literal["create", "apply", "patch", "delete", "record"] = Field(description="The write that failed.")
    code: int = Field(ge=0, le=599, description="The HTTP status of the answer (0: none came).")
    message: str = Field(max_length=MESSAGE_MAX, description="The API server's message, e.g. the quota exceeded.")


class ClassStatus(ApiModel):
    """State of one hardware class."""

    key: str = Field(max_length=63, description="Stable identifier of the hardware class.")
    node_count: int = Field(
        default=0, ge=0, description="Nodes with this class's labels (cordoned, NotReady and tainted included)."
    )
    nodes: list[str] = Field(
        default_factory=list, max_length=NODE_NAMES, description=f"Up to {NODE_NAMES} of this class's nodes, by name."
    )
    schedulable: bool | None = Field(
        default=None,
        description="Whether a node of this class can take new pods now (Ready, not cordoned, taints tolerated); "
        "what runs keeps running either way.",
    )
    engine: str | None = Field(default=None, description="Engine built for this class.")
    precision: str | None = Field(default=None, description="Precision of the engine (after any fallback).")
    cache_key: str | None = Field(default=None, description="Hash that identifies the build; same key, same engine.")
    artifact_digest: str | None = Field(default=None, description="Digest of the published engine artifact.")
    build_seconds: float | None = Field(default=None, description="How long the build took.")
    metrics: EngineMetrics | None = Field(default=None, description="Validation and latency figures.")
    chosen: str | None = Field(
        default=None,
        max_length=64,
        description="With precision or engine auto: the candidate the build kept (e.g. openvino-bf16).",
    )
    candidates: list[CandidateSummary] | None = Field(
        default=None, max_length=16, description="With precision or engine auto: every candidate tried, in order."
    )
    revision: str | None = Field(
        default=None, description="The revision serving this class's live traffic (its stable revision)."
    )
    ready_replicas: int = Field(default=0, ge=0, description="Serving pods of this class that are ready.")
    state: ClassState = Field(default="Pending", description="Where this class is in the rollout.")
    message: str | None = Field(
        default=None, max_length=MESSAGE_MAX, description="Details of the current state, e.g. why a build failed."
    )
    absent_since: str | None = Field(
        default=None,
        description="Absent classes: since when no node has had this class's labels (RFC 3339); what serves the "
        "class is deleted once that lasts EDGEMODEL_ABSENT_CLASS_GRACE_SECONDS.",
    )
    last_state: ClassState | None = Field(
        default=None, description="Absent classes: the state the class was in when its last node went."
    )
    shadow: ShadowStatus | None = Field(default=None, description="Shadow evidence for this class's candidate.")
    handoff: HandoffStatus | None = Field(
        default=None, description="GPU classes: whether build, candidate and stable fit at once, and handoff figures."
    )
    write_errors: list[WriteError] | None = Field(
        default=None,
        max_length=4,
        description="Writes of this class's objects that failed at the last reconcile (RBAC, quota, admission "
        "policy, server errors) and objects in the way; the other classes' writes went ahead.",
    )


class EdgeModelStatus(ApiModel):
    """What the operator observed and did."""

    observed_generation: int | None = Field(default=None, description="The generation last reconciled.")
    phase: str | None = Field(default=None, description="Summary derived from the conditions, for display only.")
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description="Ready, EnginesBuilt, Validated, Progressing, Degraded and Stalled (kstatus reads it as Failed).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    revisions: Revisions | None = Field(default=None, description="Stable and candidate revisions.")
    classes_ready: str | None = Field(default=None, description="Ready classes out of all classes, e.g. 2/3.")
    classes: list[ClassStatus] = Field(default_factory=list, description="One entry per hardware class.")
    shadow: ShadowStatus | None = Field(default=None, description="Shadow evidence summed over all classes.")
