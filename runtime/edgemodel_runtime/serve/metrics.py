"""Prometheus metrics of the inference server and its shadow mirror.

Names follow Prometheus conventions (base units, `_total` for counters, `_seconds` for time).
Agreement is exported as two counters (compared, agreed) so that PromQL can take the ratio over
any window: sum(rate(edgemodel_shadow_agreed_total[5m])) / sum(rate(edgemodel_shadow_compared_total[5m])).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edgemodel_runtime.serve.drift import OutputSummaries

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RATIO_BUCKETS = (0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
ERROR_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass
class ServerMetrics:
    """Every metric the server exports, registered in its own registry."""

    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    in_flight: Gauge
    shadow_mirrored: Counter
    shadow_dropped: Counter
    shadow_compared: Counter
    shadow_agreed: Counter
    shadow_disagreed: Counter
    shadow_errors: Counter
    shadow_latency_ratio: Histogram
    shadow_max_abs_error: Histogram
    shadow_cosine: Histogram
    shadow_config_reloads: Counter
    shadow_config_successful: Gauge
    engine_fallback: Gauge
    outputs: OutputSummaries  # the output summaries and drift scores (a collector; see serve.drift)
    process_memory: Gauge
    process_cpu: Counter
    energy: Counter
    energy_available: Gauge


def create() -> ServerMetrics:
    registry = CollectorRegistry()
    outputs = OutputSummaries()
    registry.register(outputs)
    shadow_labels = ("model", "stable_revision", "candidate_revision")
    return ServerMetrics(
        registry=registry,
        outputs=outputs,
        requests=Counter(
            "edgemodel_requests",
            "Inference requests, by outcome (ok, client_error, server_error).",
            ("model", "revision", "outcome"),
            registry=registry,
        ),
        latency=Histogram(
            "edgemodel_request_duration_seconds",
            "Time per inference request, by phase: queue (waiting for the engine), inference, total.",
            ("model", "revision", "phase"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        in_flight=Gauge(
            "edgemodel_requests_in_flight", "Inference requests being served now.", ("model",), registry=registry
        ),
        shadow_mirrored=Counter(
            "edgemodel_shadow_mirrored", "Requests copied to the candidate.", shadow_labels, registry=registry
        ),
        shadow_dropped=Counter(
            "edgemodel_shadow_dropped",
            "Copies dropped because the mirror queue was full.",
            shadow_labels,
            registry=registry,
        ),
        shadow_compared=Counter(
            "edgemodel_shadow_compared",
            "Mirrored requests whose candidate outputs were compared with stable's.",
            shadow_labels,
            registry=registry,
        ),
        shadow_agreed=Counter(
            "edgemodel_shadow_agreed",
            "Compared requests whose outputs agreed within the agreement tolerance.",
            shadow_labels,
            registry=registry,
        ),
        shadow_disagreed=Counter(
            "edgemodel_shadow_disagreed",
            "Compared requests whose outputs disagreed, by the first reason: missing_output, extra_output, shape, "
            "datatype, nonfinite, exact, abs_error, relative_error, cosine, top1.",
            (*shadow_labels, "reason"),
            registry=registry,
        ),
        shadow_errors=Counter(
            "edgemodel_shadow_candidate_errors",
            "Mirrored requests the candidate failed (connection, timeout, HTTP error, bad response).",
            (*shadow_labels, "kind"),
            registry=registry,
        ),
        shadow_latency_ratio=Histogram(
            "edgemodel_shadow_latency_ratio",
            "Candidate round-trip time divided by stable's inference time for the same request.",
            shadow_labels,
            buckets=RATIO_BUCKETS,
            registry=registry,
        ),
        shadow_max_abs_error=Histogram(
            "edgemodel_shadow_max_abs_error",
            "Largest absolute difference between candidate and stable outputs per request.",
            shadow_labels,
            buckets=ERROR_BUCKETS,
            registry=registry,
        ),
        shadow_cosine=Histogram(
            "edgemodel_shadow_cosine_similarity",
            "Cosine similarity of candidate and stable outputs per request.",
            shadow_labels,
            buckets=(0.5, 0.9, 0.99, 0.999, 0.9999, 1.0),
            registry=registry,
        ),
        shadow_config_reloads=Counter(
            "edgemodel_shadow_config_reloads",
            "Changes of the --shadow-config file seen, by result (applied, invalid: previous configuration kept).",
            ("model", "result"),
            registry=registry,
        ),
        shadow_config_successful=Gauge(
            "edgemodel_shadow_config_last_reload_successful",
            "1 if the --shadow-config file's current content is in effect, 0 if it was refused.",
            ("model",),
            registry=registry,
        ),
        engine_fallback=Gauge(
            "edgemodel_engine_fallback",
            "1 while the server serves the fallback (the original model on ONNX Runtime FP32, CPU) because its "
            "engine could not be loaded, with the load failure's reason (e.g. InvalidModel, DigestMismatch); "
            '0 with reason="" while it serves its engine.',
            ("model", "revision", "reason"),
            registry=registry,
        ),
        process_memory=Gauge(
            "edgemodel_process_resident_memory_bytes",
            "Resident memory of the server process serving the model (engine included).",
            ("model", "revision"),
            registry=registry,
        ),
        process_cpu=Counter(
            "edgemodel_process_cpu_seconds",
            "CPU time (user + system) the server process serving the model has used.",
            ("model", "revision"),
            registry=registry,
        ),
        energy=Counter(
            "edgemodel_energy_joules",
            "Energy the node's sensor counted while the server ran, per domain (a CPU package for rapl, a power "
            "rail for ina3221, a GPU for nvml): the whole domain's, not this process's share.",
            ("model", "revision", "source", "domain"),
            registry=registry,
        ),
        energy_available=Gauge(
            "edgemodel_energy_available",
            "Whether an energy sensor is read (1, source rapl, ina3221 or nvml) or none is readable "
            '(0, source="none").',
            ("model", "revision", "source"),
            registry=registry,
        ),
    )
