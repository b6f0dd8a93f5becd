"""The server's own memory and CPU, and the node's energy where a sensor shows it, as metrics.

Refreshed when /metrics is read, labelled model and revision (one model per server process):
`edgemodel_process_resident_memory_bytes`, `edgemodel_process_cpu_seconds_total` (user + system),
`edgemodel_energy_joules_total{source, domain}` (what the node's sensor counted since the server
started: the whole domain, see `edgemodel_runtime.power`) and `edgemodel_energy_available{source}`
(1 with the source's name; 0 with source="none" when no sensor is readable, the reason being on stderr
at start). Energy per inference is then
`rate(edgemodel_energy_joules_total[5m])` over `rate(edgemodel_requests_total{outcome="ok"}[5m])`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from edgemodel_runtime.power import Meter, Unavailable
from edgemodel_runtime.serve.metrics import ServerMetrics

STATM = Path("/proc/self/statm")


def resident_bytes() -> int | None:
    """This process's resident set size now (Linux /proc); None where there is no such file."""
    try:
        return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class Resources:
    """Brings the resource metrics up to date; `refresh` is cheap (a file read and a sensor read)."""

    def __init__(self, metrics: ServerMetrics, labels: dict[str, str], meter: Meter | Unavailable) -> None:
        self._metrics, self._labels, self._meter = metrics, labels, meter
        self._lock = threading.Lock()
        self._cpu = metrics.process_cpu.labels(**labels)
        self._memory = metrics.process_memory.labels(**labels)
        self._cpu_seen = 0.0
        self._energy_seen: dict[str, float] = {}
        available = not isinstance(meter, Unavailable)
        source = meter.source if not isinstance(meter, Unavailable) else "none"
        metrics.energy_available.labels(**labels, source=source).set(1 if available else 0)
        self.refresh()

    def refresh(self) -> None:
        with self._lock:
            rss = resident_bytes()
            if rss is not None:
                self._memory.set(rss)
            used = cpu_seconds()
            self._cpu.inc(max(0.0, used - self._cpu_seen))
            self._cpu_seen = max(used, self._cpu_seen)
            if isinstance(self._meter, Unavailable):
                return
            for domain, joules in self._meter.read().items():
                seen = self._energy_seen.get(domain, 0.0)
                self._metrics.energy.labels(**self._labels, source=self._meter.source, domain=domain).inc(
                    max(0.0, joules - seen)
                )
                self._energy_seen[domain] = max(joules, seen)
