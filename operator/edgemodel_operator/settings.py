"""Operator settings from the environment (prefix EDGEMODEL_), documented field by field."""

from __future__ import annotations

import secrets

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from edgemodel_operator.builders import Images


class OperatorSettings(BaseSettings):
    """How the operator runs; every field can be set as EDGEMODEL_<FIELD> (upper case)."""

    model_config = SettingsConfigDict(env_prefix="EDGEMODEL_", frozen=True)

    namespaces: list[str] = Field(default_factory=list, description="Namespaces to watch; empty means cluster-wide.")
    image_cpu: str = Field(default=Images.cpu, description="Runtime image for CPU classes.")
    image_cuda: str = Field(default=Images.cuda, description="Runtime image for x86 NVIDIA classes.")
    image_jetson: str = Field(default=Images.jetson, description="Runtime image for Jetson classes.")
    registry: str = Field(default=Images.registry, description="OCI registry and path prefix for engine artifacts.")
    registry_insecure: bool = Field(
        default=False,
        description="Reach `registry` over plain HTTP (an in-cluster registry without TLS); "
        "build and serving pods are told so.",
    )
    node_cache: bool = Field(
        default=True,
        description="Serving pods take their engine from the node's container image store: each engine is also an "
        "image, pulled by digest (IfNotPresent) by an init container that copies it into the pod, so a pod that "
        "restarts while the registry is unreachable serves from the node. Off: every serving pod pulls its engine "
        "from the registry when it starts.",
    )
    prefetch: bool = Field(
        default=True,
        description="With node_cache: pull each serving revision's engine image onto every node of its class (a "
        "DaemonSet per revision and class whose pods keep the image in use), a candidate's before the candidate "
        "starts, so that neither its pods nor the promoted ones need the registry.",
    )
    prefetch_timeout_seconds: float = Field(
        default=Images.prefetch_timeout,
        ge=0,
        description="With prefetch: how long a candidate waits, from the start of the pull, for its engine image "
        "on every node of its class before it starts anyway (a node that stays NotReady must not hold a rollout "
        "back); 0 starts candidates at once.",
    )
    builder_version: str = Field(default=Images.builder_version, description="Part of every cache key.")
    resync_seconds: float = Field(
        default=300.0,
        gt=0,
        description="How often every EdgeModel is reconciled anyway; changes to watched objects queue it at once.",
    )
    workers: int = Field(default=4, ge=1, le=64, description="EdgeModels reconciled at the same time.")
    event_coalesce_seconds: float = Field(
        default=0.15,
        ge=0,
        le=5,
        description="Events of an EdgeModel's children, and node changes, within this many seconds of the first "
        "queue one reconcile (a rollout's bursts of Job, Pod and workload events cost one plan, not one each). "
        "Changes to the EdgeModel itself are queued at once.",
    )
    api_qps: float = Field(
        default=100.0,
        gt=0,
        description="Writes per second to the API server (create, patch, delete, Events) the operator sustains at "
        "most, as client-go's QPS; reads are not counted.",
    )
    api_burst: int = Field(
        default=200, ge=1, description="Writes the operator may make at once above api_qps, as client-go's burst."
    )
    status_hold_seconds: float = Field(
        default=30.0,
        ge=0,
        description="How long an intermediate status is held before it is written; settled ones are written at once.",
    )
    absent_class_grace_seconds: float = Field(
        default=600.0,
        ge=0,
        description="How long a hardware class may have no node at all (deleted, not merely cordoned, NotReady or "
        "tainted, which never count) before its serving workload, build Job and Service are deleted.",
    )
    health_host: str = Field(default="0.0.0.0", description="Address of the liveness endpoint (/healthz).")  # noqa: S104 - in a pod
    health_port: int = Field(default=8081, description="Port of the liveness endpoint (/healthz).")
    metrics_host: str = Field(default="0.0.0.0", description="Address of the Prometheus metrics endpoint.")  # noqa: S104 - in a pod
    metrics_port: int = Field(default=8082, description="Port of the Prometheus metrics endpoint (/metrics).")
    prometheus_url: str | None = Field(
        default=None,
        description="Prometheus to read shadow evidence from (PromQL over the runtime's metrics); "
        "unset: the operator reads the stable pods' /metrics itself.",
    )
    analysis_seconds: float = Field(
        default=5.0, gt=0, description="How often a shadowed class is analysed again, and its evidence gathered again."
    )
    evidence_concurrency: int = Field(
        default=8, ge=1, le=256, description="EdgeModels whose shadow evidence is gathered at the same time at most."
    )
    evidence_deadline_seconds: float = Field(
        default=15.0,
        gt=0,
        description="Longest one EdgeModel's evidence gathering (a Prometheus query, or its pods' scrapes) may take; "
        "past it, that gathering counts as failed.",
    )
    evidence_max_age_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Oldest evidence a decision may use; older or missing evidence decides nothing (the class waits). "
        "Keep it above analysis_seconds plus evidence_deadline_seconds.",
    )
    fallback_check_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How often an EdgeModel with ready serving pods is reconciled to read whether they serve their "
        "fallback (edgemodel_engine_fallback), besides every change of their workloads.",
    )
    peering: str | None = Field(
        default=None, description="kopf peering name for more than one replica; unset means standalone."
    )
    peering_priority: int = Field(
        default_factory=lambda: secrets.randbelow(2**31 - 1) + 1,
        ge=1,
        description="This replica's peering priority; the live replica with the highest one acts, the others stand by. "
        "Random by default, so that replicas of one Deployment differ.",
    )
    peering_lifetime_seconds: int = Field(
        default=60, ge=5, description="How long a replica that stopped renewing its peering record counts as alive."
    )
    peering_check_seconds: float = Field(default=5.0, gt=0, description="How often the peering record is read.")

    def images(self) -> Images:
        return Images(
            cpu=self.image_cpu,
            cuda=self.image_cuda,
            jetson=self.image_jetson,
            registry=self.registry,
            registry_insecure=self.registry_insecure,
            node_cache=self.node_cache,
            prefetch=self.prefetch,
            prefetch_timeout=self.prefetch_timeout_seconds,
            builder_version=self.builder_version,
        )
