"""`edgemodel build --engine auto --precision auto` and task-level checks, as real processes on real models.

The PP-OCR direction classifier (a real model, about 1 ms a call) with its input shape fixed is built with
every CPU candidate that applies here; the tiny classifier made on the spot carries labels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgemodel_runtime import samples
from edgemodel_runtime.build.errors import ExitCode
from edgemodel_runtime.build.tensors import save_samples
from edgemodel_runtime.engines import openvino_engine
from edgemodel_runtime.packaged import OCR_CLS
from tests import onnx_models
from tests.integration.test_build import edgemodel_build, registry, report_of, sha256
from tests.testbed.registry import Registry

SHAPE = (1, 3, 48, 192)
CLS = ("--model", str(OCR_CLS.path()), "--sha256", OCR_CLS.sha256, "--input", "x=" + "x".join(map(str, SHAPE)))
HAS_BF16 = "BF16" in openvino_engine.capabilities()
__all__ = ["registry"]  # the registry fixture, shared with test_build


def _lines(path: Path, count: int, expected: list[dict[str, Any]] | None = None) -> Path:
    save_samples(path, samples.line_inputs(count, SHAPE[2], SHAPE[3], seed=5), expected)
    return path


def test_auto_keeps_the_fastest_candidate_that_passes_and_reports_the_whole_table(tmp_path: Path) -> None:
    output, log = tmp_path / "engine", tmp_path / "termination-log"
    reference = _lines(tmp_path / "lines.npz", 4)
    args = (*CLS, "--engine", "auto", "--precision", "auto", "--reference", str(reference), "--output", str(output))
    result = edgemodel_build(*args, "--termination-log", str(log))
    assert result.returncode == 0, result.stderr
    built = report_of(output)
    rows = {row["name"]: row for row in built["auto"]["candidates"]}
    expected = ["onnxruntime-fp32", "openvino-fp32", *(["openvino-bf16"] if HAS_BF16 else [])]
    assert list(rows) == expected
    assert "onnxruntime-int8" in built["auto"]["skipped"]  # no calibration data was given
    for row in rows.values():  # every candidate was validated against the fp32 reference on every sample
        assert row["cosine"] is not None
        assert row["passed"] is (not row["failures"])
    passed = [r for r in rows.values() if r["passed"]]
    assert rows["onnxruntime-fp32"]["passed"]
    assert rows["onnxruntime-fp32"]["speedup"] == 1.0  # the baseline is itself
    chosen = rows[built["auto"]["chosen"]]
    assert chosen["passed"]
    assert chosen["p50_ms"] <= 1.03 * min(r["p50_ms"] for r in passed)
    assert (built["engine"], built["precision"]) == (chosen["engine"], chosen["precision"])
    assert (built["requestedEngine"], built["requestedPrecision"]) == ("auto", "auto")
    assert built["artifact"]["file"] == {"onnxruntime": "model.onnx", "openvino": "model.openvino"}[chosen["engine"]]
    assert sha256(output / built["artifact"]["file"]) == built["artifact"]["sha256"]
    assert built["decision"]["reason"].startswith(f"chose {chosen['engine']} {chosen['precision']}")
    compact = json.loads(log.read_text())
    assert compact["chosen"] == chosen["name"]
    assert [(c["engine"], c["precision"], c["passed"]) for c in compact["candidates"]] == [
        (r["engine"], r["precision"], r["passed"]) for r in rows.values()
    ]
    artifact_mtime = (output / built["artifact"]["file"]).stat().st_mtime_ns
    again = edgemodel_build(*args)  # the class builds once: the key covers the choice
    assert again.returncode == 0, again.stderr
    assert "cache hit" in again.stderr
    assert "steps 3-5/6" not in again.stderr
    assert (output / built["artifact"]["file"]).stat().st_mtime_ns == artifact_mtime


def test_when_no_candidate_meets_the_tolerance_the_build_fails_with_exit_3_and_the_table(tmp_path: Path) -> None:
    lines = samples.line_inputs(3, SHAPE[2], SHAPE[3], seed=5)
    session = ort.InferenceSession(str(OCR_CLS.path()))
    # Expected outputs no engine gives: the classifier's answers with its two classes swapped.
    name = session.get_outputs()[0].name
    wrong = [{name: session.run(None, s)[0][:, ::-1].copy()} for s in lines]
    reference = _lines(tmp_path / "swapped.npz", 3, wrong)
    output = tmp_path / "engine"
    result = edgemodel_build(*CLS, "--engine", "auto", "--precision", "auto", "--reference", str(reference),
                             "--output", str(output))  # fmt: skip
    assert result.returncode == ExitCode.VALIDATION_FAILED, result.stderr
    failed = report_of(output)
    assert failed["reason"] == "NoCandidatePassed"
    rows = failed["auto"]["candidates"]
    assert rows
    assert not [r for r in rows if r["passed"]]
    assert all(r["failures"] for r in rows)
    assert "artifact" not in failed
    assert not list(output.glob("model.*"))


# ---------------------------------------------------------------- task-level checks on labelled references


def _boundary_inputs(model: Path, count: int, seed: int) -> list[np.ndarray]:
    """Inputs a hair's breadth from where the classifier's answer changes: lower precision flips some of them."""
    session = ort.InferenceSession(str(model))

    def top(x: np.ndarray) -> int:
        return int(session.run(None, {"x": x.astype(np.float32)})[0].argmax())

    rng = np.random.default_rng(seed)
    found: list[np.ndarray] = []
    while len(found) < count:
        a, b = rng.normal(size=(1, 16)), rng.normal(size=(1, 16))
        if top(a) == top(b):
            continue
        low, high = 0.0, 1.0
        for _ in range(40):
            middle = (low + high) / 2
            low, high = (middle, high) if top(a + middle * (b - a)) == top(a) else (low, middle)
        found.append((a + low * (b - a)).astype(np.float32))
    return found


def _labelled(path: Path, model: Path, inputs: list[np.ndarray], wrong: int) -> tuple[Path, list[int]]:
    """A reference set whose labels are the fp32 answers, `wrong` of them changed: the reference is not perfect."""
    session = ort.InferenceSession(str(model))
    labels = [int(session.run(None, {"x": x})[0].argmax()) for x in inputs]
    for i in range(wrong):
        labels[i] = (labels[i] + 1) % 10
    with path.open("wb") as handle:
        np.savez(handle, x=np.stack(inputs), **{"label.logits": np.array(labels, np.int64)})  # type: ignore[arg-type]
    return path, labels


def test_a_labelled_reference_reports_both_accuracies_and_passes_within_max_accuracy_drop(tmp_path: Path) -> None:
    model = onnx_models.tiny_classifier(tmp_path / "tiny.onnx")
    inputs = [x.astype(np.float32) for x in np.random.default_rng(1).normal(size=(8, 1, 16))]
    reference, _ = _labelled(tmp_path / "labelled.npz", model, inputs, wrong=2)
    output = tmp_path / "engine"
    result = edgemodel_build("--model", str(model), "--sha256", sha256(model), "--reference", str(reference),
                             "--tolerance", "maxAccuracyDrop=0", "--output", str(output))  # fmt: skip
    assert result.returncode == 0, result.stderr
    built = report_of(output)
    assert built["reference"]["labels"] == {"logits": "classes"}
    (metric,) = built["task"]["metrics"]
    assert metric == {"output": "logits", "metric": "top1Accuracy", "reference": 75.0, "engine": 75.0,
                      "drop": 0.0, "maxAccuracyDrop": 0.0, "passed": True}  # fmt: skip


def test_an_engine_that_loses_accuracy_on_labels_fails_with_exit_3_naming_the_metric(tmp_path: Path) -> None:
    model = onnx_models.tiny_classifier(tmp_path / "tiny.onnx")
    reference, _ = _labelled(tmp_path / "edge.npz", model, _boundary_inputs(model, 16, seed=3), wrong=0)
    output = tmp_path / "engine"
    common = ("--model", str(model), "--sha256", sha256(model), "--reference", str(reference), "--precision", "fp16")
    result = edgemodel_build(*common, "--tolerance", "maxAccuracyDrop=5", "--output", str(output))
    assert result.returncode == ExitCode.VALIDATION_FAILED, result.stderr
    failed = report_of(output)
    assert failed["reason"] == "Top1AccuracyDropExceeded"
    assert "top1Accuracy" in failed["message"]
    (metric,) = failed["task"]["metrics"]
    assert metric["reference"] == 100.0
    assert metric["drop"] > 5
    assert not metric["passed"]
    # The same engine passes once the bound allows what it loses; the figures are the same.
    loose = edgemodel_build(*common, "--tolerance", f"maxAccuracyDrop={metric['drop'] + 1:.4f}",
                            "--output", str(tmp_path / "loose"))  # fmt: skip
    assert loose.returncode == 0, loose.stderr
    assert report_of(tmp_path / "loose")["task"]["metrics"][0]["engine"] == metric["engine"]


def test_under_auto_a_candidate_that_loses_accuracy_on_labels_is_not_chosen(tmp_path: Path) -> None:
    model = onnx_models.tiny_classifier(tmp_path / "tiny.onnx")
    reference, _ = _labelled(tmp_path / "edge.npz", model, _boundary_inputs(model, 16, seed=3), wrong=0)
    output = tmp_path / "engine"
    result = edgemodel_build("--model", str(model), "--sha256", sha256(model), "--reference", str(reference),
                             "--engine", "onnxruntime", "--precision", "auto", "--quantization", "dynamic",
                             "--tolerance", "minCosine=0.9,maxAccuracyDrop=0", "--output", str(output))  # fmt: skip
    assert result.returncode == 0, result.stderr
    built = report_of(output)
    rows = {r["name"]: r for r in built["auto"]["candidates"]}
    assert set(rows) == {"onnxruntime-fp32", "onnxruntime-int8"}
    assert rows["onnxruntime-fp32"]["task_metric"] == 100.0
    assert not rows["onnxruntime-int8"]["passed"]
    assert any("top1Accuracy" in f for f in rows["onnxruntime-int8"]["failures"])
    assert rows["onnxruntime-int8"]["p50_ms"] is None  # only candidates that pass are timed
    assert built["auto"]["chosen"] == "onnxruntime-fp32"
    assert built["task"]["metrics"][0]["engine"] == 100.0


def test_a_registry_cache_hit_of_an_auto_build_still_says_what_was_chosen(registry: Registry, tmp_path: Path) -> None:
    reference = _lines(tmp_path / "lines.npz", 3)
    args = (*CLS, "--engine", "auto", "--precision", "auto", "--reference", str(reference),
            "--push", f"oci://{registry.address}/engines/cls-auto")  # fmt: skip
    first = edgemodel_build(*args, "--output", str(tmp_path / "first"))
    assert first.returncode == 0, first.stderr
    built = report_of(tmp_path / "first")
    # A fresh node of the same class, with an empty output directory: nothing is built or measured again.
    log = tmp_path / "termination-log"
    second = edgemodel_build(*args, "--output", str(tmp_path / "second"), "--report", str(tmp_path / "second.json"),
                             "--termination-log", str(log))  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert "cache hit" in second.stderr
    cached = json.loads((tmp_path / "second.json").read_text())
    assert cached["status"] == "cached"
    assert (cached["engine"], cached["precision"]) == (built["engine"], built["precision"])
    assert cached["auto"]["chosen"] == built["auto"]["chosen"]
    compact = json.loads(log.read_text())
    assert compact["chosen"] == built["auto"]["chosen"]
    assert [c["engine"] for c in compact["candidates"]] == [r["engine"] for r in built["auto"]["candidates"]]
