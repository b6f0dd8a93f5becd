"""Where shadow evidence comes from: Prometheus's HTTP API, or the stable pods' /metrics directly.

Both read the runtime's counters (edgemodel_shadow_*_total and the latency-ratio histogram) as the
stable pods of one class export them, labelled with the candidate revision, and keep them per source
(pod), with the time each source's counters were created: an attempt subtracts the baseline it
recorded when its shadowing began (`analysis.since`), so counts from an earlier attempt of the same
revision, or a pod that restarted, never enter its figures. Prometheus must label each serving pod's
series with `namespace`, `edgemodel` and `class` (the chart's PodMonitor does, from the pod labels
edgeml.dev/edgemodel and edgeml.dev/class), and with `pod` or `instance`.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from edgemodel_operator.analysis import Counters, Evidence, since

LOG = logging.getLogger("edgemodel.evidence")
Obj = dict[str, Any]
FIELDS = {
    "edgemodel_shadow_mirrored_total": "mirrored",
    "edgemodel_shadow_compared_total": "compared",
    "edgemodel_shadow_agreed_total": "agreed",
    "edgemodel_shadow_candidate_errors_total": "errors",
    "edgemodel_shadow_latency_ratio_sum": "ratio_sum",
    "edgemodel_shadow_latency_ratio_count": "ratio_count",
    "edgemodel_shadow_disagreed_total": "disagreed",  # by label `reason`: kept as `disagreed:<reason>`
    # When a pod's counter for this candidate was created: a new value tells a restarted pod.
    "edgemodel_shadow_mirrored_created": "created",
}
Samples = dict[str, dict[str, Counters]]
"""Class key -> source (pod or scrape target) -> counters of the candidate that class shadows."""


def by_source(samples: Iterable[tuple[str, Mapping[str, str], float]], candidates: Mapping[str, str]) -> Samples:
    """Counters per class and source from (metric name, labels, value) samples; only the candidate each
    class shadows counts. Every class of `candidates` is in the result, without sources if none counted."""
    found: Samples = {key: {} for key in candidates}
    for name, labels, value in samples:
        field = FIELDS.get(name)
        key = labels.get("class", "")
        if field is None or key not in candidates or candidates[key] != labels.get("candidate_revision"):
            continue
        if field == "disagreed":
            field = f"disagreed:{labels.get('reason', 'unknown')}"
        source = labels.get("pod") or labels.get("instance") or ""
        counters = found[key].setdefault(source, {})
        counters[field] = counters.get(field, 0.0) + value
    return found


def summed(
    samples: Iterable[tuple[str, Mapping[str, str], float]], candidates: Mapping[str, str]
) -> dict[str, Evidence]:
    """Evidence per class over everything its sources counted (no baseline)."""
    return {key: since({}, sources) for key, sources in by_source(samples, candidates).items() if sources}


class PrometheusSource:
    """One instant query per EdgeModel for every shadow series of its shadowing classes.

    `timeout`: seconds for each phase of the request (connect, send, read). Asynchronous: a query that
    hangs holds no thread, and cancelling it (a deadline) ends it.
    """

    needs_pods = False

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout
        self._client: httpx.AsyncClient | None = None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def gather(self, namespace: str, edgemodel: str, candidates: Mapping[str, str], _pods: list[Obj]) -> Samples:
        """Counters per class and source; raises `httpx.HTTPError` or `RuntimeError` when Prometheus
        cannot be read or refuses the query."""
        names = "|".join(FIELDS)
        query = f'{{__name__=~"{names}",namespace="{namespace}",edgemodel="{edgemodel}"}}'
        self._client = self._client or httpx.AsyncClient(timeout=self.timeout)  # one, kept: its TLS setup is costly
        reply = await self._client.get(f"{self.url}/api/v1/query", params={"query": query})
        reply.raise_for_status()
        body = reply.json()
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus refused {query}: {body.get('error')}")
        samples = [
            (item["metric"].get("__name__", ""), item["metric"], float(item["value"][1]))
            for item in body["data"]["result"]
        ]
        return by_source(samples, candidates)


class ScrapeSource:
    """Reads /metrics of every ready stable serving pod of the shadowing classes, all at once, each
    within `timeout` seconds per phase; a pod that cannot be read is left out this time
    (`analysis.since` never counts a pod's older counts in a later read)."""

    needs_pods = True

    def __init__(self, timeout: float = 2.0) -> None:
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def gather(self, namespace: str, edgemodel: str, candidates: Mapping[str, str], pods: list[Obj]) -> Samples:
        """Counters per class and source (pod name) of `pods`; never raises for a pod it cannot read."""
        targets = []
        for pod in pods:
            labels = pod["metadata"].get("labels") or {}
            ip = (pod.get("status") or {}).get("podIP")
            key = labels.get("edgeml.dev/class", "")
            if key in candidates and ip:
                targets.append((pod["metadata"]["name"], key, f"http://{ip}:{_port(pod)}/metrics"))
        self._client = client = self._client or httpx.AsyncClient(timeout=self.timeout)
        texts = await asyncio.gather(*(self._read(client, name, url) for name, _key, url in targets))
        samples: list[tuple[str, Mapping[str, str], float]] = []
        for (name, key, _url), text in zip(targets, texts, strict=True):
            for family in text_string_to_metric_families(text or ""):
                for sample in family.samples:
                    samples.append((sample.name, {**sample.labels, "class": key, "pod": name}, float(sample.value)))
        return by_source(samples, candidates)

    @staticmethod
    async def _read(client: httpx.AsyncClient, name: str, url: str) -> str | None:
        try:
            return (await client.get(url)).text
        except httpx.HTTPError as error:
            LOG.warning("cannot scrape %s (%s): %s", name, url, str(error) or type(error).__name__)
            return None


def _port(pod: Obj) -> int:
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == "http":
                return int(port["containerPort"])
    return 8080


def source(prometheus_url: str | None) -> PrometheusSource | ScrapeSource:
    if prometheus_url:
        parsed = urllib.parse.urlparse(prometheus_url)
        if parsed.scheme not in {"http", "https"} or not parsed.netloc:
            raise ValueError(f"EDGEMODEL_PROMETHEUS_URL must be an http(s) URL, not {prometheus_url!r}")
        return PrometheusSource(prometheus_url)
    return ScrapeSource()
