"""Accuracy-aware INT8 for ONNX Runtime (build/quantize.py, build/qdq.py) on real ONNX models and real sessions.

The models are tiny real convnets (tests/onnx_models.py), so that every step runs in seconds; the packaged
real models run in bench/int8.py. Nothing is mocked: timings, calibrations and sessions are ONNX Runtime's own.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgemodel_runtime import samples
from edgemodel_runtime.build import compare, quantize
from edgemodel_runtime.build.errors import ExitCode
from edgemodel_runtime.build.qdq import keep_fp32, quantized_nodes
from edgemodel_runtime.build.tensors import save_samples
from edgemodel_runtime.digests import sha256_file
from edgemodel_runtime.engines import onnxruntime_engine as ortx
from edgemodel_runtime.packaged import OCR_DET, SILERO_VAD
from tests import onnx_models

EDGEMODEL = str(Path(sys.executable).parent / "edgemodel")


def _inputs(count: int, seed: int, size: int = 32) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(1, 3, size, size)).astype(np.float32)} for _ in range(count)]


def _skewed(count: int, seed: int) -> list[dict[str, Any]]:
    """Mostly small positive values with a few large outliers: where minmax and entropy ranges must differ."""
    rng = np.random.default_rng(seed)
    made = []
    for _ in range(count):
        x = rng.exponential(0.1, size=(1, 3, 32, 32)).astype(np.float32)
        x.flat[rng.integers(0, x.size, 3)] = 50.0
        made.append({"x": x})
    return made


@pytest.fixture(scope="module")
def convnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return onnx_models.tiny_convnet(tmp_path_factory.mktemp("convnet") / "convnet.onnx")


@pytest.fixture(scope="module")
def quantized(convnet: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The convnet quantised (minmax), and the prepared fp32 model's initializers."""
    work = tmp_path_factory.mktemp("quantized")
    prepared = quantize._prepare(convnet, work)
    ranges = quantize.calibration_ranges(prepared, _inputs(4, 1), "minmax", work)
    path = quantize._quantize(prepared, work / "int8.onnx", ranges, "minmax")
    originals = {i.name: i for i in onnx.load(str(prepared)).graph.initializer}
    return onnx.load(str(path)), originals


def _reads_dequantized(model: onnx.ModelProto, name: str) -> bool:
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    node = next(n for n in model.graph.node if n.name == name)
    return any(i in dequantized for i in node.input)


def test_keeping_any_set_of_nodes_in_fp32_leaves_a_valid_graph_with_exactly_those_nodes_unquantised(
    quantized: tuple[onnx.ModelProto, dict[str, Any]], convnet: Path, tmp_path: Path
) -> None:
    model, originals = quantized
    names = quantized_nodes(model)
    assert sorted(names) == ["conv0", "conv1", "conv2", "fc"]
    reference = ortx.session(convnet)
    samples = _inputs(2, 5)
    for size in range(1, len(names) + 1):
        for kept in itertools.combinations(names, size):
            surgery = keep_fp32(model, kept, originals)
            onnx.checker.check_model(surgery, full_check=True)
            assert set(quantized_nodes(surgery)) == set(names) - set(kept), kept
            for name in kept:
                assert not _reads_dequantized(surgery, name)
                node = next(n for n in surgery.graph.node if n.name == name)
                weights = {i.name: numpy_helper.to_array(i) for i in surgery.graph.initializer}
                original = numpy_helper.to_array(originals[f"{name}_w"])
                assert np.array_equal(weights[node.input[1]], original), f"{name} does not use its fp32 weights"
            path = tmp_path / "surgery.onnx"
            onnx.save(surgery, str(path))
            outputs = [ortx.run(ortx.session(path), s) for s in samples]
            assert [set(o) for o in outputs] == [{"logits"}] * len(samples)
    # Every node in fp32: no Q/DQ is left, and the graph computes what the fp32 model computes.
    everything = keep_fp32(model, names, originals)
    assert not [n for n in everything.graph.node if n.op_type in {"QuantizeLinear", "DequantizeLinear"}]
    onnx.save(everything, str(tmp_path / "all.onnx"))
    session = ortx.session(tmp_path / "all.onnx")
    for sample in samples:
        np.testing.assert_allclose(
            ortx.run(session, sample)["logits"], ortx.run(reference, sample)["logits"], rtol=1e-5, atol=1e-5
        )


def test_keeping_an_unknown_node_is_refused(quantized: tuple[onnx.ModelProto, dict[str, Any]]) -> None:
    model, originals = quantized
    with pytest.raises(KeyError, match="no-such-node"):
        keep_fp32(model, ["no-such-node"], originals)


def test_entropy_ranges_differ_from_minmax_on_a_skewed_distribution(convnet: Path, tmp_path: Path) -> None:
    prepared = quantize._prepare(convnet, tmp_path)
    calibration = _skewed(4, 0)
    ranges = {m: quantize.calibration_ranges(prepared, calibration, m, tmp_path) for m in quantize.CALIBRATION_METHODS}
    x_high = {m: float(np.asarray(r["x"].range_value[1]).max()) for m, r in ranges.items()}
    assert x_high["minmax"] == pytest.approx(50.0)
    # The KL search clips the rare outliers: a far narrower range than the maximum.
    assert x_high["entropy"] < 0.5 * x_high["minmax"], x_high
    differing = [
        name
        for name in ranges["minmax"].data
        if not np.allclose(ranges["minmax"][name].range_value, ranges["entropy"][name].range_value)
    ]
    assert len(differing) >= 2, differing


def _expected(model: Path, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    session = ortx.session(model)
    return [ortx.run(session, s) for s in samples]


def test_the_speed_gate_ships_fp32_when_int8_is_slower_at_the_default_threshold(convnet: Path, tmp_path: Path) -> None:
    """On a convnet this small, INT8's Q/DQ work costs more than it saves (measured, not assumed)."""
    validation = _inputs(4, 2)
    outcome = quantize.accuracy_aware_int8(
        convnet, _inputs(4, 1), validation, _expected(convnet, validation),
        tolerance=compare.DEFAULT_TOLERANCES["int8"], work=tmp_path,
    )  # fmt: skip
    assert outcome.speedup < 1.1, outcome.speedup
    assert (outcome.precision, outcome.action, outcome.met) == ("fp32", "speed-gate-fp32", True)
    assert outcome.latency["fp32"].runs == outcome.latency["int8"].runs >= 40
    assert "below int8MinSpeedup 1.1" in outcome.reason
    assert not quantized_nodes(onnx.load(str(outcome.path)))
    assert outcome.as_report()["shipped"] == "fp32"


STRICT = compare.Tolerance(min_cosine=0.99999, max_relative_error=0.005)


def test_the_fewest_most_harmful_nodes_stay_fp32_until_the_tolerance_is_met(convnet: Path, tmp_path: Path) -> None:
    """int8MinSpeedup 0 accepts any speed (INT8 is slower on this convnet): the search itself is under test."""
    validation = _inputs(6, 2)
    expected = _expected(convnet, validation)
    outcome = quantize.accuracy_aware_int8(
        convnet, _inputs(6, 1), validation, expected, tolerance=STRICT, work=tmp_path, min_speedup=0.0
    )
    report = outcome.as_report()
    assert (outcome.precision, outcome.action, outcome.met) == ("int8", "int8", True), outcome.reason
    # Every calibration was tried and the one using least of the tolerance was chosen.
    loads = {c["method"]: c["toleranceLoad"] for c in report["calibrations"]}
    assert set(loads) == set(quantize.CALIBRATION_METHODS)
    assert loads[outcome.calibration] == min(loads.values())
    assert all(load > 1 for load in loads.values()), "fully quantised, the convnet must miss STRICT"
    kept = [n["node"] for n in outcome.fp32_nodes]
    assert 0 < len(kept) < report["quantizedNodes"]
    assert [n["effect"] for n in outcome.fp32_nodes] == sorted((n["effect"] for n in outcome.fp32_nodes), reverse=True)
    shipped = onnx.load(str(outcome.path))
    onnx.checker.check_model(shipped)
    assert set(quantized_nodes(shipped)) == {"conv0", "conv1", "conv2", "fc"} - set(kept)
    figures = compare.compare(expected, [ortx.run(ortx.session(outcome.path), s) for s in validation])
    assert not compare.failures(figures, STRICT)
    # One node fewer (the same ranking) misses the tolerance: the search kept the fewest.
    chosen = onnx.load(str(tmp_path / f"int8-{outcome.calibration}.onnx"))
    originals = {i.name: i for i in onnx.load(str(tmp_path / "prepared.onnx")).graph.initializer}
    fewer = tmp_path / "fewer.onnx"
    onnx.save(keep_fp32(chosen, kept[:-1], originals), str(fewer))
    figures = compare.compare(expected, [ortx.run(ortx.session(fewer), s) for s in validation])
    assert compare.failures(figures, STRICT)


def test_a_tolerance_int8_cannot_meet_is_reported_unmet(convnet: Path, tmp_path: Path) -> None:
    validation = _inputs(4, 2)
    impossible = compare.Tolerance(min_cosine=0.9999999, max_relative_error=1e-7)
    outcome = quantize.accuracy_aware_int8(
        convnet, _inputs(4, 1), validation, _expected(convnet, validation),
        tolerance=impossible, work=tmp_path, min_speedup=0.0,
    )  # fmt: skip
    assert (outcome.precision, outcome.action, outcome.met) == ("int8", "tolerance-unmet", False)
    assert compare.failures(outcome.comparison, impossible)


def _build(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGEMODEL, "build", "--benchmark-seconds", "0.5", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture
def npz(convnet: Path, tmp_path: Path) -> tuple[Path, Path]:
    calibration, reference = tmp_path / "calibration.npz", tmp_path / "reference.npz"
    save_samples(calibration, _inputs(4, 1))
    save_samples(reference, _inputs(4, 2))
    return calibration, reference


def test_build_ships_fp32_and_says_why_when_int8_is_slower(
    convnet: Path, npz: tuple[Path, Path], tmp_path: Path
) -> None:
    calibration, reference = npz
    out = tmp_path / "out"
    result = _build(
        "--model", str(convnet), "--sha256", sha256_file(convnet), "--precision", "int8",
        "--calibration", str(calibration), "--reference", str(reference), "--output", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["requestedPrecision"], report["precision"]) == ("int8", "fp32")
    assert report["decision"]["action"] == "fallback-fp32"
    assert report["int8"]["action"] == "speed-gate-fp32"
    assert report["int8Speedup"] < 1.1
    assert report["options"]["int8Procedure"] == "accuracy-aware-1"
    assert "below int8MinSpeedup 1.1" in report["message"]


def test_build_exits_3_when_int8_cannot_meet_the_tolerance(
    convnet: Path, npz: tuple[Path, Path], tmp_path: Path
) -> None:
    calibration, reference = npz
    out = tmp_path / "out"
    result = _build(
        "--model", str(convnet), "--sha256", sha256_file(convnet), "--precision", "int8",
        "--calibration", str(calibration), "--reference", str(reference), "--output", str(out),
        "--int8-min-speedup", "0", "--tolerance", "minCosine=0.9999999,maxRelativeError=1e-7",
    )  # fmt: skip
    assert result.returncode == int(ExitCode.VALIDATION_FAILED), result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["reason"] == "ToleranceMissed"
    assert report["int8"]["action"] == "tolerance-unmet"
    assert report["int8"]["calibration"] in quantize.CALIBRATION_METHODS


def test_build_lists_the_nodes_kept_in_fp32_and_their_effect(
    convnet: Path, npz: tuple[Path, Path], tmp_path: Path
) -> None:
    calibration, reference = npz
    out = tmp_path / "out"
    result = _build(
        "--model", str(convnet), "--sha256", sha256_file(convnet), "--precision", "int8",
        "--calibration", str(calibration), "--reference", str(reference), "--output", str(out),
        "--int8-min-speedup", "0", "--tolerance", "minCosine=0.99999,maxRelativeError=0.005",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["precision"] == "int8"
    nodes = report["int8"]["fp32Nodes"]
    assert nodes
    assert all({"node", "opType", "effect", "meanEffect"} <= set(n) for n in nodes)
    assert f"{len(nodes)} of 4 nodes kept in fp32" in report["message"]
    shipped = onnx.load(str(out / "model.onnx"))
    assert set(quantized_nodes(shipped)) == {"conv0", "conv1", "conv2", "fc"} - {n["node"] for n in nodes}


def test_surgery_keeps_what_control_flow_bodies_read_from_the_main_graph(tmp_path: Path) -> None:
    """silero VAD's If bodies read main-graph tensors that no main-graph node reads: pruning must keep them."""
    model = SILERO_VAD.path()
    prepared = quantize._prepare(model, tmp_path)
    calibration = samples.vad_inputs(2, seed=1)
    ranges = quantize.calibration_ranges(prepared, calibration, "minmax", tmp_path)
    quantized = onnx.load(str(quantize._quantize(prepared, tmp_path / "int8.onnx", ranges, "minmax")))
    originals = {i.name: i for i in onnx.load(str(prepared)).graph.initializer}
    names = quantized_nodes(quantized)
    assert names
    for kept in ([names[0]], [names[-1]], names):
        surgery = keep_fp32(quantized, kept, originals)
        path = tmp_path / "surgery.onnx"
        onnx.save(surgery, str(path))
        outputs = ortx.run(ortx.session(path), calibration[0])
        assert all(np.isfinite(v).all() for v in outputs.values())


def test_with_every_node_in_fp32_the_detector_has_no_quantisation_left_and_computes_fp32(tmp_path: Path) -> None:
    """ONNX Runtime also puts Q/DQ pairs around operators it quantises along (Resize): they go with the nodes
    they served, or a model with every Conv in fp32 would still round."""
    model = OCR_DET.path()
    prepared = quantize._prepare(model, tmp_path)
    inputs = samples.detector_inputs(2, height=96, width=128, seed=1)
    ranges = quantize.calibration_ranges(prepared, inputs[:1], "minmax", tmp_path)
    quantized = onnx.load(str(quantize._quantize(prepared, tmp_path / "int8.onnx", ranges, "minmax")))
    originals = {i.name: i for i in onnx.load(str(prepared)).graph.initializer}
    names = quantized_nodes(quantized)
    everything = keep_fp32(quantized, names, originals)
    assert not [n.name for n in everything.graph.node if n.op_type in {"QuantizeLinear", "DequantizeLinear"}]
    onnx.save(everything, str(tmp_path / "all.onnx"))
    reference = _expected(model, inputs)
    figures = compare.compare(reference, [ortx.run(ortx.session(tmp_path / "all.onnx"), s) for s in inputs])
    assert figures.max_abs_error is not None
    assert figures.max_abs_error < 1e-4
    half = keep_fp32(quantized, names[: len(names) // 2], originals)
    onnx.checker.check_model(half)
    assert set(quantized_nodes(half)) == set(names[len(names) // 2 :])


def test_static_int8_outside_the_procedure_gets_the_same_entropy_ranges(convnet: Path, tmp_path: Path) -> None:
    """The TensorRT int8 path and any forced method quantise through `quantize_static_int8`: its entropy
    calibration clips the outliers too (every float tensor calibrated, not only Conv/MatMul ones)."""
    from onnx import numpy_helper as helper_arrays

    calibration = _skewed(4, 0)
    scales = {}
    for method in ("minmax", "entropy"):
        path = ortx.quantize_static_int8(convnet, tmp_path / f"{method}.onnx", calibration, method)
        initializers = {i.name: helper_arrays.to_array(i) for i in onnx.load(str(path)).graph.initializer}
        scales[method] = float(initializers["x_scale"])
    assert scales["entropy"] < 0.5 * scales["minmax"], scales
