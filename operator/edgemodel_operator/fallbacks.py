"""Serving pods that fell back: read from their `edgemodel_engine_fallback` gauge, turned into a Degraded condition.

A server that cannot load its engine serves the original model on ONNX Runtime FP32 instead and sets
`edgemodel_engine_fallback{model, revision, reason}` to 1 (see the runtime's `serve.fallback`). The
operator reads that gauge where it reads shadow evidence: from Prometheus when one is configured
(series labelled namespace, edgemodel, class, pod as the chart's PodMonitor labels them), else from
each serving pod's /metrics. This needs no permission beyond the ones the operator has (list pods, or
Prometheus's HTTP API) and none at all in the serving pods: they write nothing to the API server.

The fallbacks seen are observations, not decisions: the condition says what the pods report now.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from edgemodel_operator import conditions as cond
from edgemodel_operator.api.status import CONDITION_MESSAGE_MAX

LOG = logging.getLogger("edgemodel.fallbacks")
Obj = dict[str, Any]
METRIC = "edgemodel_engine_fallback"
SCRAPES_AT_ONCE = 8
ENGINE_FALLBACK = "EngineFallback"  # the Degraded condition's reason while some class serves its fallback


@dataclass(frozen=True)
class Fallback:
    """One class's serving pods that fell back: the revisions they serve, why, and which pods (each sorted)."""

    revisions: tuple[str, ...]
    reason: str
    pods: tuple[str, ...]


def from_samples(samples: Iterable[tuple[Mapping[str, str], float]]) -> dict[str, Fallback]:
    """Class key -> Fallback from (labels, value) samples of the gauge; only samples at 1 count. Several
    reasons in one class are joined in sorted order, so the same samples always give the same result."""
    found: dict[str, tuple[set[str], set[str], set[str]]] = {}
    for labels, value in samples:
        key = labels.get("class", "")
        if value < 1 or not key:
            continue
        revisions, reasons, pods = found.setdefault(key, (set(), set(), set()))
        revisions.add(labels.get("revision", ""))
        reasons.add(labels.get("reason") or "Unknown")
        pods.add(labels.get("pod") or labels.get("instance") or "")
    return {key: Fallback(tuple(sorted(v)), ",".join(sorted(r)), tuple(sorted(p))) for key, (v, r, p) in found.items()}


def from_prometheus(url: str, namespace: str, edgemodel: str, timeout: float = 10.0) -> dict[str, Fallback]:
    """One instant query for the EdgeModel's fallback gauges. Raises httpx.HTTPError or RuntimeError."""
    query = f'{METRIC}{{namespace="{namespace}",edgemodel="{edgemodel}"}} == 1'
    reply = httpx.get(f"{url.rstrip('/')}/api/v1/query", params={"query": query}, timeout=timeout)
    reply.raise_for_status()
    body = reply.json()
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {query}: {body.get('error')}")
    return from_samples((item["metric"], float(item["value"][1])) for item in body["data"]["result"])


def from_pods(pods: list[Obj], timeout: float = 2.0) -> dict[str, Fallback]:
    """Reads /metrics of every serving pod with an IP, several at a time; a pod that cannot be read is left
    out this time."""
    wanted = [p for p in pods if (p["metadata"].get("labels") or {}).get("edgeml.dev/class")
              and (p.get("status") or {}).get("podIP")]  # fmt: skip
    if not wanted:
        return {}
    with ThreadPoolExecutor(max_workers=min(SCRAPES_AT_ONCE, len(wanted))) as pool:
        found = list(pool.map(lambda pod: _scrape(pod, timeout), wanted))
    return from_samples(sample for samples in found for sample in samples)


def _scrape(pod: Obj, timeout: float) -> list[tuple[Mapping[str, str], float]]:
    key = pod["metadata"]["labels"]["edgeml.dev/class"]
    url = f"http://{pod['status']['podIP']}:{_port(pod)}/metrics"
    try:
        text = httpx.get(url, timeout=timeout).text
    except httpx.HTTPError as error:
        LOG.debug("cannot scrape %s (%s): %s", pod["metadata"]["name"], url, error)
        return []
    return [
        ({**sample.labels, "class": key, "pod": pod["metadata"]["name"]}, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == METRIC
    ]


def _port(pod: Obj) -> int:
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == "http":
                return int(port["containerPort"])
    return 8080


LISTED = 5  # classes named in the condition; the rest are counted (as `projection.summary` does)


def describe(fallbacks: Mapping[str, Fallback]) -> str:
    """One line naming the first LISTED classes that fall back (their revisions, reason and pod count), and
    counting the others, so that the condition stays bounded however many classes fall back."""
    items = sorted(fallbacks.items())
    text = "; ".join(
        f"{key}: {len(f.pods)} pod(s) of {', '.join(f.revisions)} serve the fallback (engine not loaded: {f.reason})"
        for key, f in items[:LISTED]
    )
    return text + (f"; and {len(items) - LISTED} more classes" if len(items) > LISTED else "")


def degrade_on_fallback(status: Obj, fallbacks: Mapping[str, Fallback], *, generation: int, now: str) -> Obj:
    """The status with Degraded=True (reason EngineFallback) when some class serves its fallback.

    Degraded set for another reason (a failed class, a rollback) keeps its reason; the fallbacks are
    added to its message. Without fallbacks the status is returned unchanged. `phase` is derived again.
    """
    if not fallbacks:
        return status
    conditions = list(status.get("conditions") or [])
    current = cond.condition(conditions, cond.DEGRADED)
    message = f"serving the fallback: {describe(fallbacks)}"
    if current is not None and current.get("status") == "True" and current.get("reason") != ENGINE_FALLBACK:
        reason, message = str(current["reason"]), f"{current.get('message')}; {message}"
    else:
        reason = ENGINE_FALLBACK
    clipped = message if len(message) <= CONDITION_MESSAGE_MAX else message[: CONDITION_MESSAGE_MAX - 1] + "…"
    conditions = cond.set_condition(conditions, cond.DEGRADED, True, reason, clipped, generation=generation, now=now)
    return status | {"conditions": conditions, "phase": cond.phase(conditions)}
