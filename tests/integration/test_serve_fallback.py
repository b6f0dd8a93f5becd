"""Fallback instead of failure, on `edgemodel serve` as a process: an engine the server cannot load (damaged
by truncation or corruption on disk, a TensorRT plan on a machine without TensorRT) is replaced by the original
model on ONNX Runtime FP32, which serves the same outputs; the server says so on stderr, in the gauge
edgemodel_engine_fallback{reason} and in the model's metadata and readiness bodies. Without a fallback, or
with one that cannot be loaded either, the server still refuses in one line."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgemodel_runtime.build.pipeline import BuildRequest, build
from tests import onnx_models
from tests.helpers import free_port
from tests.integration.test_build import sha256
from tests.integration.test_serve import EDGEMODEL, Server


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the original model, a directory holding its engine as `edgemodel build` wrote it)."""
    root = tmp_path_factory.mktemp("fallback")
    model = onnx_models.tiny_classifier(root / "original.onnx", seed=3)
    build(
        BuildRequest(model=str(model), sha256=sha256(model), output=root / "engine", benchmark_seconds=0.2, samples=2)
    )
    return model, root / "engine"


def _copy(engine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(engine, tmp_path / "engine"))


def _truncate(engine: Path) -> None:
    path = engine / "model.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _corrupt_with_matching_report(engine: Path) -> None:
    """Garbage where the engine was, and a report whose digest matches it: the digest check passes and the
    engine library itself refuses the file."""
    path = engine / "model.onnx"
    path.write_bytes(b"\x08\x07garbage, not a protobuf" * 64)
    report = json.loads((engine / "report.json").read_text())
    report["artifact"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (engine / "report.json").write_text(json.dumps(report))


def _plan_without_tensorrt(engine: Path, tmp_path: Path) -> Path:
    """A serialized-engine file (.plan) where TensorRT is not installed: what a node that lost its
    accelerator or its TensorRT library sees."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        plan = tmp_path / "model.plan"
        plan.write_bytes((engine / "model.onnx").read_bytes())
        return plan
    pytest.skip("TensorRT is installed here: a .plan file would load or fail for other reasons")


def _openvino_archive(model: Path, tmp_path: Path, damage: str) -> Path:
    """A real OpenVINO archive of the model, then damaged: truncated, written by another OpenVINO version
    (what a runtime upgrade leaves on a node), or with a compiled blob the plugin cannot import."""
    from edgemodel_runtime.engines import openvino_engine

    path = openvino_engine.compile_to_artifact(model, tmp_path / "model.openvino", "fp32", {"x": (1, 16)})
    if damage == "openvino-truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members[openvino_engine.CONFIG_MEMBER])
    if damage == "openvino-other-version":
        config["openvino"] = "2020.1.0-0-old"
    else:
        members[openvino_engine.BLOB_MEMBER] = b"\0not a compiled model" * 32
    members[openvino_engine.CONFIG_MEMBER] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _infer(server: Server, x: np.ndarray) -> np.ndarray:
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    status, reply = server.request("POST", "/v2/models/m/infer", json.dumps(body).encode(),
                                   {"content-type": "application/json"})  # fmt: skip
    assert status == 200, reply
    output = json.loads(reply)["outputs"][0]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


REASONS = {
    "truncated": "DigestMismatch",  # the report's digest catches it before any engine library reads it
    "corrupt": "InvalidModel",  # the digest matches; ONNX Runtime refuses the file
    "corrupt-file": "InvalidModel",  # a bare model file, no report to check it against
    "plan-without-tensorrt": None,  # TensorRT's own reason, whatever this machine's TensorRT absence is called
    "openvino-truncated": "InvalidArtifact",
    "openvino-other-version": "EngineVersionMismatch",
    "openvino-damaged-blob": "InvalidModel",
}
DAMAGES = list(REASONS)


@pytest.mark.parametrize("damage", DAMAGES)
def test_an_engine_the_server_cannot_load_falls_back_to_the_original_model(
    damage: str, built: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, engine = built
    copy = _copy(engine, tmp_path)
    expected_reason = REASONS[damage]
    artifact: Path = copy
    if damage == "truncated":
        _truncate(copy)
    elif damage == "corrupt":
        _corrupt_with_matching_report(copy)
    elif damage == "corrupt-file":
        artifact = tmp_path / "model.onnx"
        artifact.write_bytes((copy / "model.onnx").read_bytes()[:100])
    elif damage.startswith("openvino"):
        artifact = _openvino_archive(model, tmp_path, damage)
    else:
        artifact = _plan_without_tensorrt(copy, tmp_path)
    env_cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEMODEL_ARTIFACT_CACHE", str(env_cache))
    server = Server(artifact, "m", "--fallback-model", str(model), "--fallback-sha256", sha256(model), log_dir=tmp_path)
    try:
        status, body = server.get("/v2/models/m/ready")
        assert status == 200
        detail = json.loads(body)["edgemodel"]
        assert detail["engine"] == "fallback"
        assert detail["fallbackModel"] == f"sha256:{sha256(model)}"
        if expected_reason:
            assert detail["fallbackReason"] == expected_reason
        metadata = json.loads(server.get("/v2/models/m")[1])
        assert metadata["platform"] == "onnxruntime_onnx"
        assert metadata["edgemodel"] == detail
        assert server.metric("edgemodel_engine_fallback", reason=detail["fallbackReason"]) == 1
        # The fallback serves what the original model computes.
        x = np.random.default_rng(7).normal(size=(3, 16)).astype(np.float32)
        reference = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_allclose(_infer(server, x), reference, rtol=1e-5, atol=1e-5)
        assert (env_cache / f"fallback-{sha256(model)[:16]}" / "model.onnx").is_file()
    finally:
        assert server.stop() == 0
    log = server.log.read_text()
    assert "Traceback" not in log, log
    assert "edgemodel serve: EngineFallback: the engine cannot be loaded" in log, log


def test_an_engine_that_loads_serves_itself_and_says_so(built: tuple[Path, Path], tmp_path: Path) -> None:
    model, engine = built
    server = Server(engine, "m", "--fallback-model", str(model), "--fallback-sha256", sha256(model), log_dir=tmp_path)
    try:
        assert "edgemodel" not in json.loads(server.get("/v2/models/m/ready")[1])
        assert "edgemodel" not in json.loads(server.get("/v2/models/m")[1])
        assert server.metric("edgemodel_engine_fallback") == 0
        assert 'edgemodel_engine_fallback{model="m",reason="",revision=' in server.get("/metrics")[1].decode()
    finally:
        assert server.stop() == 0


def _serve(artifact: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "EDGEMODEL_ARTIFACT_CACHE": str(tmp_path / "cache")}
    return subprocess.run([EDGEMODEL, "serve", str(artifact), "--port", str(free_port()), *extra],
                          capture_output=True, text=True, timeout=120, check=False, env=env)  # fmt: skip


def test_without_a_fallback_an_unloadable_engine_is_refused_as_before(built: tuple[Path, Path], tmp_path: Path) -> None:
    _, engine = built
    copy = _copy(engine, tmp_path)
    _truncate(copy)
    result = _serve(copy, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("edgemodel serve: DigestMismatch: "), result.stderr


@pytest.mark.parametrize("fault", ["wrong-digest", "missing", "not-a-model"])
def test_a_fallback_that_cannot_be_loaded_either_is_refused_naming_both(
    fault: str, built: tuple[Path, Path], tmp_path: Path
) -> None:
    model, engine = built
    copy = _copy(engine, tmp_path)
    _truncate(copy)
    fallback, digest = model, sha256(model)
    if fault == "wrong-digest":
        digest = "0" * 64
    elif fault == "missing":
        fallback = tmp_path / "absent.onnx"
    else:
        fallback = tmp_path / "garbage.onnx"
        fallback.write_bytes(b"not a model")
        digest = sha256(fallback)
    result = _serve(copy, tmp_path, "--fallback-model", str(fallback), "--fallback-sha256", digest)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert last.startswith("edgemodel serve: DigestMismatch: "), last
    assert "the fallback could not be loaded either" in last, last


def test_fallback_options_go_together(built: tuple[Path, Path], tmp_path: Path) -> None:
    model, engine = built
    result = _serve(engine, tmp_path, "--fallback-model", str(model))
    assert result.returncode == 2
    assert "--fallback-model and --fallback-sha256 go together" in result.stderr


def _pod(server: Server, key: str) -> dict[str, object]:
    """A serving pod as the operator lists it, whose IP and port are those of `server`."""
    return {
        "metadata": {"name": f"pod-{server.port}", "labels": {"edgeml.dev/class": key}},
        "status": {"podIP": "127.0.0.1"},
        "spec": {"containers": [{"ports": [{"name": "http", "containerPort": server.port}]}]},
    }


def test_the_operator_reads_which_classes_fall_back_from_the_serving_pods_metrics(
    built: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgemodel_operator.fallbacks import Fallback, from_pods

    model, engine = built
    copy = _copy(engine, tmp_path)
    _truncate(copy)
    monkeypatch.setenv("EDGEMODEL_ARTIFACT_CACHE", str(tmp_path / "cache"))
    pin = ("--fallback-model", str(model), "--fallback-sha256", sha256(model), "--revision", "r1")
    falling, healthy = Server(copy, "m", *pin, log_dir=tmp_path), Server(engine, "m", *pin, log_dir=tmp_path)
    try:
        pods = [_pod(falling, "cpu-a"), _pod(healthy, "cpu-b")]
        assert from_pods(pods) == {"cpu-a": Fallback(("r1",), "DigestMismatch", (f"pod-{falling.port}",))}
    finally:
        assert falling.stop() == 0
        assert healthy.stop() == 0
    assert from_pods(pods) == {}  # pods that cannot be read are left out this time


@pytest.mark.parametrize("no_cache", [False, True])
def test_a_build_with_no_cache_builds_again_where_the_engine_is(
    no_cache: bool, built: tuple[Path, Path], tmp_path: Path
) -> None:
    model, engine = built
    copy = _copy(engine, tmp_path)
    report = tmp_path / "out.json"
    command = [EDGEMODEL, "build", "--model", str(model), "--sha256", sha256(model), "--output", str(copy),
               "--samples", "2", "--benchmark-seconds", "0.2", "--report", str(report)]  # fmt: skip
    result = subprocess.run([*command, *(["--no-cache"] if no_cache else [])], capture_output=True, text=True,
                            timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(report.read_text())["status"] == ("built" if no_cache else "cached")
