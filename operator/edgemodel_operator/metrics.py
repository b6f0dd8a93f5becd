"""Operator metrics: reconciles by outcome, their duration, and the API writes they made."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RECONCILES = Counter("edgemodel_operator_reconciles", "EdgeModel reconciles, by outcome (ok, error).", ["outcome"])
RECONCILE_SECONDS = Histogram(
    "edgemodel_operator_reconcile_duration_seconds",
    "Time to gather, plan and apply one EdgeModel.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
API_WRITES = Counter(
    "edgemodel_operator_api_writes", "Objects the operator created, deleted or patched, by verb.", ["verb"]
)
EVIDENCE_ERRORS = Counter(
    "edgemodel_operator_evidence_errors", "Times shadow evidence could not be read (Prometheus or pod scrapes)."
)
DECISIONS = Counter(
    "edgemodel_operator_rollout_decisions", "Rollout decisions carried out, per class, by decision.", ["decision"]
)
