"""Debian's Prometheus as a real metrics store on 127.0.0.1, scraping targets the tests register.

Targets come from a file_sd file that `set_targets` rewrites (by rename, so Prometheus never reads
half a file); Prometheus picks changes up while it runs, within about 5 s (its discovery manager
passes target changes on at most that often, a fixed interval in 2.42). Target labels work as the chart's
PodMonitor relabelling makes them: they are attached to every scraped series, and a scraped label
of the same name is kept as `exported_<name>` (honor_labels is false), so the serving pods'
`revision` label reads as `exported_revision` next to the target's `revision`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import free_port

PROMETHEUS_BINARY = "prometheus"
SCRAPE_INTERVAL = "1s"


class PrometheusError(RuntimeError):
    """Prometheus is missing, did not start, or refused a query."""


@dataclass(frozen=True)
class Sample:
    """One element of an instant query's result."""

    labels: dict[str, str]
    value: float


@dataclass
class Prometheus:
    """One Prometheus process with its configuration, targets file and TSDB under `directory`."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory / "prometheus.log"

    @property
    def targets_file(self) -> Path:
        return self.directory / "targets.json"

    def log_tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return f"(no log at {self.log})"
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {self.log} (last {len(text)} lines)\n" + "\n".join(text)

    def start(self, timeout: float = 60) -> Prometheus:
        binary = shutil.which(PROMETHEUS_BINARY)
        if binary is None:
            raise PrometheusError("prometheus is not installed (apt-get install prometheus)")
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.targets_file.exists():
            self.set_targets([])
        config = self.directory / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML; no YAML writer needed
                {
                    "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL},
                    "scrape_configs": [
                        {
                            "job_name": "edgemodel",
                            # fsnotify sees the rename at once; the refresh is the fallback.
                            "file_sd_configs": [{"files": [str(self.targets_file)], "refresh_interval": "1s"}],
                        }
                    ],
                },
                indent=2,
            )
        )
        command = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise PrometheusError(f"prometheus exited with {code} during start-up:\n{self.log_tail()}")
            if self._ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise PrometheusError(f"prometheus was not ready on {self.url} after {timeout:.0f}s:\n{self.log_tail()}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:  # refused while starting, 503 while the TSDB opens
            return False

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM to our process (Prometheus flushes its head block), SIGKILL if it lingers."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def set_targets(self, targets: Iterable[tuple[str, Mapping[str, str]]]) -> None:
        """Scrape exactly these `(host:port, labels)` targets from now on."""
        groups = [{"targets": [address], "labels": dict(labels)} for address, labels in targets]
        staged = self.directory / ".targets.json.tmp"  # outside the file_sd pattern, so never read half-written
        staged.write_text(json.dumps(groups, indent=2))
        staged.replace(self.targets_file)

    def _api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as error:  # 400 and 422 carry the reason in the API's error body
            body = json.loads(error.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[Sample]:
        """An instant query's result: one Sample per series of a vector, one without labels for a scalar."""
        data = self._api("query", query=promql)
        kind, result = data["resultType"], data["result"]
        if kind == "vector":
            return [Sample(dict(item["metric"]), float(item["value"][1])) for item in result]
        if kind == "scalar":
            return [Sample({}, float(result[1]))]
        raise PrometheusError(f"{promql!r} gives a {kind}; query() handles vectors and scalars")

    def value(self, promql: str) -> float | None:
        """The single value `promql` gives now, None if it gives nothing (for example, not scraped yet)."""
        samples = self.query(promql)
        if len(samples) > 1:
            raise PrometheusError(f"{promql!r} gives {len(samples)} series; aggregate it to one")
        return samples[0].value if samples else None

    def targets(self) -> list[dict[str, Any]]:
        """The active targets as /api/v1/targets reports them (labels, health, lastError, ...)."""
        return list(self._api("targets", state="active")["activeTargets"])

    def wait_until_up(self, address: str, timeout: float = 30) -> dict[str, Any]:
        """The target `host:port` once Prometheus has scraped it successfully."""
        deadline = time.monotonic() + timeout
        seen: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            seen = next((t for t in self.targets() if t["labels"].get("instance") == address), None)
            if seen is not None and seen["health"] == "up":
                return seen
            time.sleep(0.2)
        state = "not discovered" if seen is None else f"{seen['health']}, last error {seen['lastError']!r}"
        raise PrometheusError(f"target {address} not up after {timeout:.0f}s ({state}):\n{self.log_tail()}")
