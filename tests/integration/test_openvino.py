"""The openvino engine on a real model: `edgemodel build` and `edgemodel serve` as real processes.

The PP-OCR direction classifier is built with its input shape fixed, validated against fp32 ONNX
Runtime by the build, and then served: the server's answers must match ONNX Runtime within the
precision's tolerance, which also shows that the served model runs at the precision it was built
for (an OpenVINO blob imported without its precision runs at the CPU's default, bf16 where the CPU
has it, and misses the fp32 tolerance by four orders of magnitude).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edgemodel_runtime import samples
from edgemodel_runtime.build import compare
from edgemodel_runtime.build.errors import ExitCode
from edgemodel_runtime.engines import openvino_engine
from edgemodel_runtime.packaged import OCR_CLS
from tests import onnx_models
from tests.helpers import free_port
from tests.integration.test_build import edgemodel_build, report_of
from tests.integration.test_serve import EDGEMODEL, OUTPUT, Server

SHAPE = (1, 3, 48, 192)
CLS = ("--model", str(OCR_CLS.path()), "--sha256", OCR_CLS.sha256, "--input", "x=" + "x".join(map(str, SHAPE)))
HAS_BF16 = "BF16" in openvino_engine.capabilities()


def _build(output: Path, precision: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return edgemodel_build(*CLS, "--engine", "openvino", "--precision", precision, "--output", str(output), *extra)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The classifier built by openvino at fp32, and at bf16 where this CPU has it."""
    engines = {}
    for precision in ("fp32", "bf16") if HAS_BF16 else ("fp32",):
        output = tmp_path_factory.mktemp(f"openvino-{precision}")
        result = _build(output, precision)
        assert result.returncode == 0, result.stderr
        engines[precision] = output
    return engines


def _lines(count: int) -> list[np.ndarray]:
    return [np.asarray(s["x"]) for s in samples.line_inputs(count, SHAPE[2], SHAPE[3], seed=11)]


def _ort(arrays: list[np.ndarray]) -> list[dict[str, Any]]:
    session = ort.InferenceSession(str(OCR_CLS.path()), providers=["CPUExecutionProvider"])
    return [{OUTPUT: np.asarray(session.run(None, {"x": a})[0])} for a in arrays]


def _infer(server: Server, array: np.ndarray, model: str = "cls") -> tuple[int, dict[str, Any]]:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(array.shape), "data": array.ravel().tolist()}]}
    status, raw = server.request(
        "POST", f"/v2/models/{model}/infer", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    answer: dict[str, Any] = json.loads(raw)
    return status, answer


def test_the_build_validates_reports_and_caches_an_openvino_engine(built: dict[str, Path]) -> None:
    report = report_of(built["fp32"])
    assert report["status"] == "built"
    assert report["engine"] == "openvino"
    assert report["precision"] == "fp32"
    assert report["artifact"]["file"] == "model.openvino"
    assert f"openvino-{openvino_engine.version()}" in report["versions"]["builder"]
    assert report["options"]["inputs"] == {"x": list(SHAPE)}
    assert report["validation"]["verdict"] == "passed", report["validation"]
    assert report["candidate"]["comparison"]["max_relative_error"] < 1e-3
    assert report["latency"]["p50_ms"] > 0
    config, _ = openvino_engine.read_config(built["fp32"] / "model.openvino")
    assert (config.precision, config.inference_precision, config.shapes) == ("fp32", "f32", {"x": list(SHAPE)})
    again = _build(built["fp32"], "fp32")
    assert again.returncode == 0, again.stderr
    assert report_of(built["fp32"])["status"] in {"built", "cached"}
    assert "cache hit" in again.stdout


def test_the_cache_key_differs_by_engine_and_precision(built: dict[str, Path], tmp_path: Path) -> None:
    onnxruntime = tmp_path / "ort"
    result = edgemodel_build(*CLS, "--output", str(onnxruntime))
    assert result.returncode == 0, result.stderr
    keys = {report_of(directory)["cacheKey"] for directory in [onnxruntime, *built.values()]}
    assert len(keys) == 1 + len(built)


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no BF16 in OpenVINO's OPTIMIZATION_CAPABILITIES")
def test_bf16_is_built_within_its_tolerance_and_differs_from_fp32(built: dict[str, Path]) -> None:
    report = report_of(built["bf16"])
    assert report["precision"] == "bf16"
    assert report["validation"]["verdict"] == "passed", report["validation"]
    assert report["candidate"]["comparison"]["max_abs_error"] > 1e-4  # really bf16: fp32 stays within 1e-5 here


def test_a_precision_this_cpu_lacks_is_refused_with_exit_code_2(tmp_path: Path) -> None:
    lacking = [p for p, (_, need) in openvino_engine.PRECISIONS.items() if need not in openvino_engine.capabilities()]
    if not lacking:
        pytest.skip("this CPU has every precision the openvino engine builds")
    result = _build(tmp_path / "out", lacking[0])
    assert result.returncode == ExitCode.BAD_INPUT, result.stderr
    assert "PrecisionUnsupportedByHardware" in result.stderr
    assert "OPTIMIZATION_CAPABILITIES" in result.stderr
    assert not (tmp_path / "out" / "model.openvino").exists()


@pytest.mark.parametrize(
    ("engine", "precision", "says"),
    [
        ("openvino", "int8", "needs --calibration NPZ"),
        ("onnxruntime", "bf16", "bf16 is only available with --engine openvino"),
    ],
)
def test_combinations_the_engines_do_not_build_are_refused(
    engine: str, precision: str, says: str, tmp_path: Path
) -> None:
    extra = ["--quantization", "dynamic"] if precision == "int8" and engine == "onnxruntime" else []
    result = edgemodel_build(*CLS, "--engine", engine, "--precision", precision, "--output", str(tmp_path), *extra)
    assert result.returncode == ExitCode.BAD_INPUT
    assert says in result.stderr


def test_an_operator_openvino_cannot_convert_is_refused_by_name(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("Det", ["x"], ["y"])],  # ONNX Runtime runs it; OpenVINO 2026.4 has no conversion
        "determinant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    model = tmp_path / "det.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    result = edgemodel_build(
        "--model", str(model), "--sha256", digest, "--engine", "openvino", "--output", str(tmp_path / "out")
    )
    assert result.returncode == ExitCode.BAD_INPUT, result.stderr
    assert "UnsupportedOperator" in result.stderr
    assert "no conversion for the operators Det" in result.stderr
    assert report_of(tmp_path / "out")["reason"] == "UnsupportedOperator"


@pytest.fixture(scope="module")
def servers(built: dict[str, Path]) -> Iterator[dict[str, Server]]:
    running = {precision: Server(directory, "cls", log_dir=directory.parent) for precision, directory in built.items()}
    yield running
    for server in running.values():
        assert server.stop() == 0


def test_the_server_answers_within_tolerance_of_onnxruntime(servers: dict[str, Server]) -> None:
    arrays = _lines(6)
    expected = _ort(arrays)
    for precision, server in servers.items():
        status, metadata = server.get("/v2/models/cls")
        described = json.loads(metadata)
        assert status == 200
        assert described["platform"] == "openvino"
        assert described["inputs"] == [{"name": "x", "datatype": "FP32", "shape": list(SHAPE)}]
        answers = []
        for array in arrays:
            status, answer = _infer(server, array)
            assert status == 200, answer
            (output,) = answer["outputs"]
            answers.append({output["name"]: np.asarray(output["data"], np.float32).reshape(output["shape"])})
        figures = compare.compare(expected, answers)
        assert compare.failures(figures, compare.DEFAULT_TOLERANCES[precision]) == [], (precision, figures)
        if precision == "fp32":
            assert figures.max_abs_error is not None
            assert figures.max_abs_error < 1e-5  # an import at the CPU's default precision would miss this


def test_concurrent_requests_each_get_their_own_answer(servers: dict[str, Server]) -> None:
    arrays = _lines(16)
    expected = _ort(arrays)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda array: _infer(servers["fp32"], array), arrays * 2))
    for index, (status, answer) in enumerate(answers):
        assert status == 200, answer
        served = np.asarray(answer["outputs"][0]["data"], np.float32)
        np.testing.assert_allclose(served, expected[index % len(arrays)][OUTPUT].ravel(), atol=1e-5)


def test_a_request_of_another_shape_than_the_fixed_one_is_a_400(servers: dict[str, Server]) -> None:
    status, answer = _infer(servers["fp32"], np.zeros((1, 3, 48, 100), np.float32))
    assert status == 400
    assert "expects [1, 3, 48, 192]" in answer["error"]


@pytest.mark.parametrize(
    ("fixed", "shape"), [((), [1, 16]), (("--input", "x=4x16"), [4, 16])], ids=["default", "input"]
)
def test_dynamic_dimensions_are_fixed_at_the_validated_shape(
    fixed: tuple[str, ...], shape: list[int], tmp_path: Path
) -> None:
    model = onnx_models.tiny_classifier(tmp_path / "tiny.onnx")  # input x: [batch, 16]
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    result = edgemodel_build(
        "--model", str(model), "--sha256", digest, "--engine", "openvino", "--output", str(tmp_path / "engine"), *fixed
    )
    assert result.returncode == 0, result.stderr
    config, _ = openvino_engine.read_config(tmp_path / "engine" / "model.openvino")
    assert config.shapes == {"x": shape}
    server = Server(tmp_path / "engine", "tiny", log_dir=tmp_path)
    try:
        described = json.loads(server.get("/v2/models/tiny")[1])
        assert described["inputs"][0]["shape"] == shape
        batch = np.random.default_rng(3).random(shape, dtype=np.float32)
        status, answer = _infer(server, batch, "tiny")
        assert status == 200, answer
        served = np.asarray(answer["outputs"][0]["data"], np.float32).reshape(answer["outputs"][0]["shape"])
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(served, session.run(None, {"x": batch})[0], rtol=1e-5, atol=1e-6)
        status, answer = _infer(server, np.zeros([shape[0] + 1, 16], np.float32), "tiny")
        assert status == 400, answer
    finally:
        assert server.stop() == 0


def _serve(artifact: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGEMODEL, "serve", str(artifact), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _rewrite(source: Path, target: Path, **config: Any) -> Path:
    """A copy of a model.openvino archive with fields of its config.json replaced."""
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members["config.json"] = json.dumps({**json.loads(members["config.json"]), **config}).encode()
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return target


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        ("version", "was compiled by OpenVINO 2020.1.0, but this runtime has"),
        ("blob", "OpenVINO cannot load it"),
        ("not-a-zip", "is not an edgemodel OpenVINO artifact"),
    ],
)
def test_an_artifact_this_runtime_cannot_load_is_refused_clearly(
    damage: str, says: str, built: dict[str, Path], tmp_path: Path
) -> None:
    source, target = built["fp32"] / "model.openvino", tmp_path / "model.openvino"
    if damage == "version":
        _rewrite(source, target, openvino="2020.1.0")
    elif damage == "blob":
        with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as copy:
            copy.writestr("config.json", archive.read("config.json"))
            copy.writestr("compiled.blob", archive.read("compiled.blob")[:4096])
    else:
        target.write_bytes(b"not an archive")
    result = _serve(target)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.stderr


def _convnet_build(tmp_path: Path, tolerance: str) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    """The tiny convnet built by openvino int8 (NNCF, accuracy control) with `tolerance`: (model, output, result)."""
    from edgemodel_runtime.build.tensors import save_samples

    model = onnx_models.tiny_convnet(tmp_path / "convnet.onnx")
    rng = np.random.default_rng(3)
    calibration, reference = tmp_path / "calibration.npz", tmp_path / "reference.npz"
    save_samples(calibration, [{"x": rng.normal(size=(1, 3, 32, 32)).astype(np.float32)} for _ in range(4)])
    save_samples(reference, [{"x": rng.normal(size=(1, 3, 32, 32)).astype(np.float32)} for _ in range(4)])
    output = tmp_path / "out"
    result = edgemodel_build(
        "--model", str(model), "--sha256", hashlib.sha256(model.read_bytes()).hexdigest(), "--engine", "openvino",
        "--precision", "int8", "--calibration", str(calibration), "--reference", str(reference),
        "--tolerance", tolerance, "--output", str(output),
    )  # fmt: skip
    return model, output, result


STRICT_INT8 = "minCosine=0.99999,maxRelativeError=0.005"


def test_int8_is_quantised_by_nncf_within_the_tolerance_and_served(tmp_path: Path) -> None:
    model, output, result = _convnet_build(tmp_path, STRICT_INT8)
    assert result.returncode == 0, result.stderr
    report = report_of(output)
    assert (report["engine"], report["precision"], report["validation"]["verdict"]) == ("openvino", "int8", "passed")
    assert report["openvinoInt8"]["met"] is True
    assert 0 < report["openvinoInt8"]["maxDrop"] <= 1
    assert "+nncf-" in report["versions"]["builder"]
    log = report["openvinoInt8"]["nncfLog"]
    assert any(line.startswith("Metric of quantized model") for line in log), log
    config, _ = openvino_engine.read_config(output / "model.openvino")
    assert (config.precision, config.inference_precision) == ("int8", "f32")
    arrays = [np.random.default_rng(9).normal(size=(1, 3, 32, 32)).astype(np.float32) for _ in range(4)]
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    expected = [{"logits": np.asarray(session.run(None, {"x": a})[0])} for a in arrays]
    server = Server(output, "convnet", log_dir=tmp_path)
    try:
        answers = []
        for array in arrays:
            status, answer = _infer(server, array, model="convnet")
            assert status == 200, answer
            (served,) = answer["outputs"]
            answers.append({"logits": np.asarray(served["data"], np.float32).reshape(served["shape"])})
    finally:
        assert server.stop() == 0
    figures = compare.compare(expected, answers)
    assert figures.max_abs_error is not None
    assert figures.max_abs_error > 1e-4  # quantised: not the fp32 model's answers
    assert compare.failures(figures, compare.Tolerance(min_cosine=0.9999, max_relative_error=0.02)) == []


def test_int8_that_cannot_meet_the_tolerance_exits_3_with_nncf_figures(tmp_path: Path) -> None:
    _, output, result = _convnet_build(tmp_path, "minCosine=0.9999999,maxRelativeError=1e-7")
    assert result.returncode == ExitCode.VALIDATION_FAILED, result.stderr
    report = report_of(output)
    assert report["reason"] == "ToleranceMissed"
    assert report["openvinoInt8"]["met"] is False
    assert not (output / "model.openvino").exists()
