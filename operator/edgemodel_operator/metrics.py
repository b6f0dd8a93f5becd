"""Operator metrics: reconciles by outcome, their duration, the API writes they made, shadow evidence
gathering, and the work queue's metrics under controller-runtime's names (`workqueue_*`, label `name`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("edgemodel_operator_reconciles", "EdgeModel reconciles, by outcome (ok, error).", ["outcome"])
RECONCILE_SECONDS = Histogram(
    "edgemodel_operator_reconcile_duration_seconds",
    "Time to gather, plan and apply one EdgeModel.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
API_WRITES = Counter(
    "edgemodel_operator_api_writes", "Objects the operator created, deleted or patched, by verb.", ["verb"]
)
API_THROTTLED_SECONDS = Counter(
    "edgemodel_operator_api_throttled_seconds",
    "Seconds API writes waited for the client-side budget (EDGEMODEL_API_QPS, EDGEMODEL_API_BURST).",
)
EVIDENCE_ERRORS = Counter(
    "edgemodel_operator_evidence_errors", "Times shadow evidence could not be read (Prometheus or pod scrapes)."
)
EVIDENCE_SECONDS = Histogram(
    "edgemodel_operator_evidence_gather_seconds",
    "Time to gather one EdgeModel's shadow evidence (off the reconcile path), failed gatherings included.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0),
)
DECISIONS = Counter(
    "edgemodel_operator_rollout_decisions", "Rollout decisions carried out, per class, by decision.", ["decision"]
)

# controller-runtime's workqueue metrics (same names, label `name`: the queue), so existing dashboards apply.
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WORKQUEUE_DEPTH = Gauge("workqueue_depth", "Keys waiting in the work queue for a worker.", ["name"])
WORKQUEUE_ADDS = Counter("workqueue_adds", "Adds to the work queue (duplicates of a queued key included).", ["name"])
WORKQUEUE_RETRIES = Counter("workqueue_retries", "Keys queued again after a failed reconcile.", ["name"])
WORKQUEUE_QUEUE_SECONDS = Histogram(
    "workqueue_queue_duration_seconds",
    "Seconds a key waited in the work queue between being queued and taken by a worker.",
    ["name"],
    buckets=_QUEUE_BUCKETS,
)
WORKQUEUE_WORK_SECONDS = Histogram(
    "workqueue_work_duration_seconds",
    "Seconds a worker spent on a key, from taking it to done.",
    ["name"],
    buckets=_QUEUE_BUCKETS,
)
