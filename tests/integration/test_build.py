"""`edgemodel build` as a real process on real models, with a real registry and a real HTTPS server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from edgemodel_runtime import samples
from edgemodel_runtime.build.errors import ExitCode
from edgemodel_runtime.build.tensors import save_samples
from edgemodel_runtime.packaged import OCR_CLS, OCR_DET, OCR_REC, SILERO_VAD, PackagedModel
from tests import onnx_models
from tests.testbed.faults import CuttingProxy
from tests.testbed.https import HttpsFileServer
from tests.testbed.pki import write_pki
from tests.testbed.registry import Registry

EDGEMODEL = str(Path(sys.executable).parent / "edgemodel")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edgemodel_build(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGEMODEL, "build", "--samples", "4", "--benchmark-seconds", "0.3", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, **(env or {})},
    )


def report_of(directory: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((directory / "report.json").read_text())
    return loaded


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    running = Registry(tmp_path_factory.mktemp("registry")).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HttpsFileServer, Path, Path]]:
    """An HTTPS server, the directory it serves, and the CA bundle that trusts it."""
    root = tmp_path_factory.mktemp("www")
    pki = write_pki(tmp_path_factory.mktemp("pki"))
    with HttpsFileServer(root, pki) as server:
        yield server, root, pki.ca_cert


def _reference_npz(model: PackagedModel, directory: Path) -> tuple[Path, list[str]]:
    """Realistic reference inputs for each packaged model, and the --input flags that fix its shapes."""
    path = directory / f"{model.name}-reference.npz"
    if model is OCR_DET:
        save_samples(path, samples.detector_inputs(3, 320, 320))
        return path, ["--input", "x=1x3x320x320"]
    if model is SILERO_VAD:
        save_samples(path, samples.vad_inputs(4))
        return path, ["--input", "input=1x576"]
    width = 192 if model is OCR_CLS else 320
    save_samples(path, samples.line_inputs(4, 48, width))
    return path, ["--input", f"x=1x3x48x{width}"]


@pytest.mark.parametrize("model", [OCR_DET, OCR_REC, OCR_CLS, SILERO_VAD], ids=lambda m: m.name)
def test_fp32_engine_is_built_validated_and_reported_for_each_packaged_model(
    model: PackagedModel, tmp_path: Path
) -> None:
    reference, shapes = _reference_npz(model, tmp_path)
    out, termination = tmp_path / "engine", tmp_path / "termination-log"
    result = edgemodel_build(
        "--model", str(model.path()), "--sha256", model.sha256, "--reference", str(reference),
        "--output", str(out), "--termination-log", str(termination), *shapes,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "step 6/6" in result.stderr  # progress is shown

    report = report_of(out)
    assert report["status"] == "built"
    assert report["model"]["sha256"] == model.sha256
    assert len(report["cacheKey"]) == 64
    assert report["reference"]["kind"] == "npz"
    assert report["candidate"]["comparison"]["max_relative_error"] < 1e-3
    assert report["latency"]["p50_ms"] > 0
    assert report["latency"]["p99_ms"] >= report["latency"]["p50_ms"]
    assert report["peakRssMb"] > 0
    assert report["hardware"]["arch"] in {"amd64", "arm64"}
    assert ort.__version__ in report["versions"]["builder"]
    assert report["artifact"]["sha256"] == sha256(out / "model.onnx")
    ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])

    compact = termination.read_bytes()
    assert len(compact) <= 4096
    assert json.loads(compact)["cacheKey"] == report["cacheKey"]


def test_second_build_with_the_same_cache_key_is_a_noop_that_says_so(tmp_path: Path) -> None:
    model = onnx_models.tiny_classifier(tmp_path / "tiny.onnx")
    args = ["--model", str(model), "--sha256", sha256(model), "--output", str(tmp_path / "out")]
    first = edgemodel_build(*args)
    assert first.returncode == 0, first.stderr
    built = report_of(tmp_path / "out")
    artifact_mtime = (tmp_path / "out" / "model.onnx").stat().st_mtime_ns

    second = edgemodel_build(*args)
    assert second.returncode == 0, second.stderr
    assert "cache hit" in second.stderr
    assert "nothing rebuilt" in second.stdout
    assert (tmp_path / "out" / "model.onnx").stat().st_mtime_ns == artifact_mtime
    assert report_of(tmp_path / "out")["cacheKey"] == built["cacheKey"]

    other = edgemodel_build(*args, "--precision", "fp16")
    assert other.returncode == 0, other.stderr
    assert "cache hit" not in other.stderr
    assert report_of(tmp_path / "out")["cacheKey"] != built["cacheKey"]


def test_fp16_engine_keeps_float32_inputs_and_outputs(tmp_path: Path) -> None:
    reference, shapes = _reference_npz(OCR_CLS, tmp_path)
    out = tmp_path / "out"
    result = edgemodel_build(
        "--model", str(OCR_CLS.path()), "--sha256", OCR_CLS.sha256, "--precision", "fp16",
        "--reference", str(reference), "--output", str(out), *shapes,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    engine = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.type for i in engine.get_inputs()] == ["tensor(float)"]
    assert [o.type for o in engine.get_outputs()] == ["tensor(float)"]
    assert report_of(out)["precision"] == "fp16"


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_int8_records_its_speedup_over_fp32_and_the_decision_that_follows(mode: str, tmp_path: Path) -> None:
    calibration = tmp_path / "calibration.npz"
    save_samples(calibration, samples.line_inputs(16, 48, 192, seed=7))
    reference, shapes = _reference_npz(OCR_CLS, tmp_path)
    quantization = ["--calibration", str(calibration)] if mode == "static" else ["--quantization", "dynamic"]
    out = tmp_path / "out"
    result = edgemodel_build(
        "--model", str(OCR_CLS.path()), "--sha256", OCR_CLS.sha256, "--precision", "int8", *quantization,
        "--reference", str(reference), "--tolerance", "maxRelativeError=0.5,minCosine=0.5",
        "--output", str(out), *shapes,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = report_of(out)
    speedup = report["int8Speedup"]
    if mode == "static":  # the accuracy-aware procedure's paired ratio (median of per-round ratios)
        assert speedup == report["int8"]["speedup"]
    else:  # int8Speedup is rounded to 3 decimals: within 1% or that rounding, whichever is larger
        assert speedup == pytest.approx(
            report["fp32"]["latency"]["p50_ms"] / report["candidate"]["latency"]["p50_ms"], rel=1e-2, abs=6e-4
        )
    if speedup < 1.1:
        assert report["decision"]["action"] == "fallback-fp32"
        assert report["precision"] == "fp32"
        # static int8 runs the accuracy-aware procedure (build/quantize.py), which words its own decision
        threshold = "below int8MinSpeedup 1.1" if mode == "static" else "below the 1.1x threshold"
        assert threshold in report["decision"]["reason"]
    else:
        assert report["decision"]["action"] == "keep"
        assert report["precision"] == "int8"


# ---------------------------------------------------------------- bad input, one test each


def _expect_failure(result: subprocess.CompletedProcess[str], code: ExitCode, reason: str) -> None:
    assert result.returncode == int(code), f"exit {result.returncode}:\n{result.stderr}"
    assert f"edgemodel build: {reason}:" in result.stderr, result.stderr


def test_wrong_digest_is_refused_and_leaves_nothing_behind(tmp_path: Path) -> None:
    model = onnx_models.tiny_classifier(tmp_path / "tiny.onnx")
    result = edgemodel_build("--model", str(model), "--sha256", "0" * 64, "--output", str(tmp_path / "out"))
    _expect_failure(result, ExitCode.BAD_INPUT, "DigestMismatch")
    assert f"got {sha256(model)}" in result.stderr
    assert not (tmp_path / "out" / "model.onnx").exists()
    assert report_of(tmp_path / "out")["reason"] == "DigestMismatch"


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_onnx_with_a_matching_digest_is_refused_as_invalid(damage: str, tmp_path: Path) -> None:
    original = OCR_CLS.path().read_bytes()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(original[: len(original) // 2] if damage == "truncated" else os.urandom(4096))
    result = edgemodel_build("--model", str(broken), "--sha256", sha256(broken), "--output", str(tmp_path / "out"))
    _expect_failure(result, ExitCode.BAD_INPUT, "InvalidModel")


def test_an_operator_the_engine_cannot_run_is_refused_by_name(tmp_path: Path) -> None:
    model = onnx_models.unsupported_operator(tmp_path / "custom.onnx")
    result = edgemodel_build("--model", str(model), "--sha256", sha256(model), "--output", str(tmp_path / "out"))
    _expect_failure(result, ExitCode.BAD_INPUT, "UnsupportedOperator")
    assert "FancyNorm" in result.stderr


def test_a_missed_tolerance_fails_the_build_with_the_numbers(tmp_path: Path) -> None:
    reference, shapes = _reference_npz(OCR_CLS, tmp_path)
    result = edgemodel_build(
        "--model", str(OCR_CLS.path()), "--sha256", OCR_CLS.sha256, "--precision", "fp16",
        "--reference", str(reference), "--tolerance", "maxAbsError=1e-9", "--output", str(tmp_path / "out"), *shapes,
    )  # fmt: skip
    _expect_failure(result, ExitCode.VALIDATION_FAILED, "ToleranceMissed")
    assert "max abs error" in result.stderr
    assert "> maxAbsError 1e-09" in result.stderr
    report = report_of(tmp_path / "out")
    assert report["status"] == "failed"
    assert report["comparison"]["max_abs_error"] > 1e-9
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_a_missed_latency_budget_fails_the_build(tmp_path: Path) -> None:
    model = onnx_models.tiny_classifier(tmp_path / "tiny.onnx")
    result = edgemodel_build(
        "--model", str(model), "--sha256", sha256(model), "--latency-budget-ms", "0.000001",
        "--output", str(tmp_path / "out"),
    )  # fmt: skip
    _expect_failure(result, ExitCode.VALIDATION_FAILED, "LatencyBudgetMissed")


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("file:///etc/passwd", "file:// URIs are refused"),
        ("http://127.0.0.1:9/model.onnx", "unsupported scheme 'http'"),
        ("https://127.0.0.1/models/../secret.onnx", "'..' path segments"),
        ("https://user:secret@127.0.0.1/m.onnx", "credentials"),
    ],
)
def test_unsafe_uris_are_refused_before_any_download(uri: str, fragment: str, tmp_path: Path) -> None:
    result = edgemodel_build("--model", uri, "--sha256", "a" * 64, "--output", str(tmp_path / "out"))
    _expect_failure(result, ExitCode.BAD_INPUT, "InvalidURI")
    assert fragment in result.stderr


def test_static_int8_without_calibration_is_refused(tmp_path: Path) -> None:
    model = onnx_models.tiny_classifier(tmp_path / "tiny.onnx")
    result = edgemodel_build("--model", str(model), "--sha256", sha256(model), "--precision", "int8")
    _expect_failure(result, ExitCode.BAD_INPUT, "InvalidOption")
    assert "--calibration" in result.stderr


def test_tensorrt_without_a_gpu_is_a_clear_error_not_a_fallback(tmp_path: Path) -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has an NVIDIA GPU; bench/gpu/tensorrt.sh covers it")
    model = onnx_models.tiny_classifier(tmp_path / "tiny.onnx")
    out = tmp_path / "out"
    result = edgemodel_build(
        "--model", str(model), "--sha256", sha256(model), "--engine", "tensorrt", "--output", str(out)
    )
    _expect_failure(result, ExitCode.INFRASTRUCTURE, "EngineUnavailable")
    assert "never falls back" in result.stderr
    assert not (out / "model.onnx").exists()


# ---------------------------------------------------------------- https and oci


def test_https_download_follows_https_redirects_and_verifies(
    https: tuple[HttpsFileServer, Path, Path], tmp_path: Path
) -> None:
    server, root, ca = https
    model = onnx_models.tiny_classifier(root / "tiny.onnx")
    result = edgemodel_build(
        "--model", server.url("redirect", "tiny.onnx"), "--sha256", sha256(model), "--output", str(tmp_path / "out"),
        env={"EDGEMODEL_CA_BUNDLE": str(ca)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "download https://" in result.stderr


def test_a_redirect_to_plain_http_is_refused(https: tuple[HttpsFileServer, Path, Path], tmp_path: Path) -> None:
    server, root, ca = https
    model = onnx_models.tiny_classifier(root / "tiny2.onnx")
    result = edgemodel_build(
        "--model", server.url("redirect-http", "tiny2.onnx"), "--sha256", sha256(model),
        "--output", str(tmp_path / "out"), env={"EDGEMODEL_CA_BUNDLE": str(ca)},
    )  # fmt: skip
    _expect_failure(result, ExitCode.BAD_INPUT, "InsecureRedirect")


def test_a_download_cut_short_is_an_infrastructure_failure(
    https: tuple[HttpsFileServer, Path, Path], tmp_path: Path
) -> None:
    server, root, ca = https
    shutil.copyfile(OCR_CLS.path(), root / "cls.onnx")
    result = edgemodel_build(
        "--model", server.url("truncated", "cls.onnx"), "--sha256", OCR_CLS.sha256,
        "--output", str(tmp_path / "out"), env={"EDGEMODEL_CA_BUNDLE": str(ca)},
    )  # fmt: skip
    _expect_failure(result, ExitCode.INFRASTRUCTURE, "DownloadFailed")
    assert not list((tmp_path / "out").glob(".work/*.onnx"))


def test_oci_model_in_and_engine_out_by_digest_with_the_registry_as_cache(registry: Registry, tmp_path: Path) -> None:
    from edgemodel_runtime.build import oci

    source = oci.parse_reference(f"{registry.address}/models/cls:v2")
    oci.push(source, [OCR_CLS.path()], "v2", {})
    reference, shapes = _reference_npz(OCR_CLS, tmp_path)
    args = [
        "--model", f"oci://{source}", "--sha256", OCR_CLS.sha256, "--reference", str(reference), *shapes,
        "--push", f"oci://{registry.address}/engines/cls",
    ]  # fmt: skip
    first = edgemodel_build(*args, "--output", str(tmp_path / "first"))
    assert first.returncode == 0, first.stderr
    report = report_of(tmp_path / "first")
    pushed = report["artifact"]["reference"]
    assert pushed.startswith(f"oci://{registry.address}/engines/cls@sha256:")

    pulled = {path.name: path for path in oci.pull_files(pushed)}
    assert set(pulled) == {"model.onnx", "report.json"}
    assert sha256(pulled["model.onnx"]) == report["artifact"]["sha256"]
    manifest_digest = oci.find_by_tag(oci.parse_reference(f"{registry.address}/engines/cls"), report["cacheKey"])
    assert pushed.endswith(str(manifest_digest))

    # A fresh machine with an empty output directory finds the engine in the registry.
    second = edgemodel_build(*args, "--output", str(tmp_path / "second"), "--report", str(tmp_path / "second.json"))
    assert second.returncode == 0, second.stderr
    assert "cache hit" in second.stderr
    cached = json.loads((tmp_path / "second.json").read_text())
    assert cached["status"] == "cached"
    assert cached["artifact"]["reference"] == pushed


def test_registry_down_mid_push_is_an_infrastructure_failure(registry: Registry, tmp_path: Path) -> None:
    # The registry cannot be told to die halfway through an upload, so a proxy in front of the real
    # one cuts the connection after the first 64 KiB of the push (an injected fault, on purpose).
    with CuttingProxy(registry.address, cut_after_bytes=64 * 1024) as proxy:
        result = edgemodel_build(
            "--model", str(OCR_REC.path()), "--sha256", OCR_REC.sha256, "--input", "x=1x3x48x320",
            "--push", f"oci://{proxy.address}/engines/rec", "--output", str(tmp_path / "out"),
            env={"EDGEMODEL_REGISTRY_ATTEMPTS": "2"},
        )  # fmt: skip
    _expect_failure(result, ExitCode.INFRASTRUCTURE, "RegistryError")
    assert "attempt 1 of 2" in result.stderr
    assert report_of(tmp_path / "out")["status"] == "failed"
