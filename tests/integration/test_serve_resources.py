"""Resource and power figures from `edgemodel build` and `edgemodel serve` as they run: the server's memory and
CPU per model, and energy where the node has a readable sensor; where it has none (as this machine: no
powercap in /sys, no Jetson rails, no NVML), the report and the metrics say "not available" with the reason,
and no number."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from edgemodel_runtime import power
from edgemodel_runtime.build.pipeline import BuildRequest, build
from tests import onnx_models
from tests.integration.test_build import sha256
from tests.integration.test_serve import Server


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resources")
    model = onnx_models.tiny_classifier(root / "model.onnx", seed=4)
    build(
        BuildRequest(model=str(model), sha256=sha256(model), output=root / "engine", benchmark_seconds=0.2, samples=2)
    )
    return root / "engine"


def _metric(text: str, name: str) -> list[tuple[str, float]]:
    return [(labels, float(value)) for labels, value in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M)]


def test_the_build_report_gives_energy_per_inference_or_why_not(engine: Path) -> None:
    energy = json.loads((engine / "report.json").read_text())["energy"]
    found = power.detect()
    if isinstance(found, power.Unavailable):
        assert energy == {"available": False, "reason": found.reason}
    else:
        assert energy["available"] is True
        assert energy["source"] == found.source
        assert energy["calls"] > 0
        assert energy["joulesPerInference"] > 0


def test_the_server_exports_its_memory_and_cpu_and_the_energy_it_can_read(engine: Path, tmp_path: Path) -> None:
    server = Server(engine, "m", log_dir=tmp_path)
    try:
        before = server.get("/metrics")[1].decode()
        x = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
        body = {"inputs": [{"name": "x", "shape": [64, 16], "datatype": "FP32", "data": x.ravel().tolist()}]}
        for _ in range(200):
            assert server.request("POST", "/v2/models/m/infer", json.dumps(body).encode())[0] == 200
        after = server.get("/metrics")[1].decode()
    finally:
        assert server.stop() == 0
    ((labels, rss),) = _metric(after, "edgemodel_process_resident_memory_bytes")
    assert 'model="m"' in labels
    assert 20e6 < rss < 4e9  # the Python process with ONNX Runtime and the model loaded
    ((_, cpu_before),) = _metric(before, "edgemodel_process_cpu_seconds_total")
    ((_, cpu_after),) = _metric(after, "edgemodel_process_cpu_seconds_total")
    assert cpu_after > cpu_before > 0
    ((labels, available),) = _metric(after, "edgemodel_energy_available")
    found = power.detect()
    if isinstance(found, power.Unavailable):
        assert 'source="none"' in labels
        assert available == 0
        assert _metric(after, "edgemodel_energy_joules_total") == []
        assert f"energy per inference not available: {found.reason}" in server.log.read_text()
    else:
        assert f'source="{found.source}"' in labels
        assert available == 1
        assert sum(v for _, v in _metric(after, "edgemodel_energy_joules_total")) > 0
