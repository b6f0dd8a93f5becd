"""Drift on the device, with `edgemodel build` and `edgemodel serve` as they run: the build summarises its
engine's outputs on the reference set into the report; the server exports what it serves beside those
summaries and scores each output's drift (PSI). Served inputs from the reference's distribution keep the
score flat; inputs shifted away from it move it. A classifier (logits) and a regressor (one value per row)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from edgemodel_runtime.build.pipeline import BuildRequest, DataFile, build
from tests import onnx_models
from tests.integration.test_build import sha256
from tests.integration.test_serve import Server

REFERENCE_ROWS = 1000
OUTPUTS = {"classifier": 10, "regressor": 1}  # classes of tiny_classifier: its logits, or one value per row


@pytest.fixture(scope="module", params=list(OUTPUTS))
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(kind, an engine built with a reference set of inputs drawn as production's are: N(0, 1))."""
    root = tmp_path_factory.mktemp(f"drift-{request.param}")
    model = onnx_models.tiny_classifier(root / "model.onnx", seed=11, classes=OUTPUTS[request.param])
    reference = root / "reference.npz"
    np.savez(reference, x=np.random.default_rng(1).normal(size=(REFERENCE_ROWS, 16)).astype(np.float32))
    build(BuildRequest(model=str(model), sha256=sha256(model), output=root / "engine", benchmark_seconds=0.2,
                       reference=DataFile(str(reference), sha256(reference))))  # fmt: skip
    return request.param, root / "engine"


def _send(server: Server, x: np.ndarray) -> None:
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    status, reply = server.request("POST", "/v2/models/m/infer", json.dumps(body).encode(),
                                   {"content-type": "application/json"})  # fmt: skip
    assert status == 200, reply


def _serve_rows(server: Server, rows: int, rng: np.random.Generator, shift: float = 0.0, scale: float = 1.0) -> None:
    for _ in range(rows // 50):
        _send(server, (rng.normal(size=(50, 16)) * scale + shift).astype(np.float32))


def _scores(server: Server) -> dict[str, float]:
    text = server.get("/metrics")[1].decode()
    return {
        match["summary"]: float(match["value"])
        for match in re.finditer(r'edgemodel_output_drift_psi\{[^}]*summary="(?P<summary>\w+)"[^}]*\} (?P<value>\S+)',
                                 text)
    }  # fmt: skip


def test_the_build_report_keeps_the_reference_summaries(engine: tuple[str, Path]) -> None:
    kind, directory = engine
    report = json.loads((directory / "report.json").read_text())["drift"]
    assert report["available"] is True
    summary = report["outputs"]["logits"]
    if kind == "classifier":
        assert summary["kind"] == "classifier"
        assert summary["rows"] == REFERENCE_ROWS
        assert sum(summary["confidence"]["proportions"]) == pytest.approx(1)
        assert sum(summary["predicted"]["proportions"]) == pytest.approx(1)
        assert summary["predicted"]["labels"] == [str(i) for i in range(10)]
    else:
        assert summary["kind"] == "values"
        assert len(summary["value"]["edges"]) == 9
        assert summary["value"]["proportions"] == pytest.approx([0.1] * 10, abs=0.01)


def test_drift_stays_flat_on_the_reference_distribution_and_moves_when_inputs_shift(
    engine: tuple[str, Path], tmp_path: Path
) -> None:
    kind, directory = engine
    server = Server(directory, "m", log_dir=tmp_path)  # the default window: the last 1,000 rows
    rng = np.random.default_rng(2)  # other draws than the reference's, from the same distribution
    try:
        assert _scores(server) == {}  # nothing served yet: no score
        _serve_rows(server, 500, rng)
        flat_half = _scores(server)
        _serve_rows(server, 1000, rng)
        flat = _scores(server)
        summaries = {"classifier": {"confidence", "predicted"}, "regressor": {"value"}}[kind]
        assert set(flat) == set(flat_half) == summaries
        print(f"[drift] {kind}: PSI after 500 rows {flat_half}, after 1500 {flat}")
        assert max(flat.values()) < 0.1, flat
        assert max(flat_half.values()) < 0.1, flat_half

        _serve_rows(server, 1000, rng, shift=2.0, scale=3.0)  # the inputs move away from the reference's
        shifted = _scores(server)
        print(f"[drift] {kind}: PSI after 1000 shifted rows {shifted}")
        assert max(shifted.values()) > 0.25, shifted
        assert all(shifted[s] > 2 * flat[s] for s in summaries), (flat, shifted)

        text = server.get("/metrics")[1].decode()
        assert re.search(r"edgemodel_output_drift_window_rows\{[^}]*\} 1000\.0", text)
        assert "edgemodel_output_reference_proportion{" in text
        if kind == "classifier":
            served = sum(float(v) for v in re.findall(r"edgemodel_output_predicted_class_total\{[^}]*\} (\S+)", text))
            assert served == 2500
            assert 'edgemodel_output_top1_confidence_count{model="m",output="logits"' in text
        else:
            served = sum(float(v) for v in re.findall(r"edgemodel_output_value_bin_total\{[^}]*\} (\S+)", text))
            assert served == 2500
    finally:
        assert server.stop() == 0


def test_without_a_reference_set_the_server_counts_but_scores_nothing(tmp_path: Path) -> None:
    model = onnx_models.tiny_classifier(tmp_path / "model.onnx", seed=11)
    build(BuildRequest(model=str(model), sha256=sha256(model), output=tmp_path / "engine", benchmark_seconds=0.2,
                       samples=2))  # fmt: skip
    report = json.loads((tmp_path / "engine" / "report.json").read_text())["drift"]
    assert report["available"] is False
    server = Server(tmp_path / "engine", "m", log_dir=tmp_path)
    try:
        _serve_rows(server, 200, np.random.default_rng(3))
        text = server.get("/metrics")[1].decode()
        assert _scores(server) == {}
        assert "edgemodel_output_reference_proportion{" not in text
        assert re.search(r"edgemodel_output_top1_confidence_count\{[^}]*\} 200\.0", text)
    finally:
        assert server.stop() == 0
