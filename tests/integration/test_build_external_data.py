"""Models whose weights live in ONNX external-data files: built from a local directory and from an OCI
artifact, every file verified, served from the result; what cannot be verified is refused with a way out."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgemodel_runtime.build import oci
from edgemodel_runtime.build.errors import BadInputError, BuildError, ExitCode
from edgemodel_runtime.build.pipeline import BuildRequest, Precision, build
from edgemodel_runtime.engines import onnxruntime_engine as ortx
from edgemodel_runtime.serve.fallback import FallbackSource, load_fallback
from edgemodel_runtime.serve.model import ArtifactError
from tests import onnx_models
from tests.integration.test_build import _expect_failure, edgemodel_build, report_of, sha256
from tests.integration.test_engine_images import _layer
from tests.integration.test_serve import Server
from tests.testbed.https import HttpsFileServer
from tests.testbed.pki import write_pki
from tests.testbed.registry import Registry

X = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16)


def external_model(directory: Path, location: str = "weights.bin", name: str = "model.onnx") -> Path:
    """The tiny classifier with every initializer in one side file, as onnx.save_model writes it."""
    directory.mkdir(parents=True, exist_ok=True)
    plain = onnx_models.tiny_classifier(directory / "plain.onnx")
    model = onnx.load(str(plain))
    plain.unlink()
    target = directory / name
    onnx.save_model(
        model,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return target


def expected_logits(model: Path) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": X})[0])


def served_logits(server: Server) -> np.ndarray:
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": X.ravel().tolist()}]})
    status, answer = server.request("POST", "/v2/models/m/infer", body.encode(), {"Content-Type": "application/json"})
    assert status == 200, answer
    return np.asarray(json.loads(answer)["outputs"][0]["data"], dtype=np.float32).reshape(1, 10)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    running = Registry(tmp_path_factory.mktemp("registry")).start()
    yield running
    running.stop()


def test_a_local_model_with_external_data_builds_and_serves(tmp_path: Path) -> None:
    model = external_model(tmp_path / "src")
    out = tmp_path / "out"
    result = edgemodel_build("--model", str(model), "--sha256", sha256(model), "--output", str(out))
    assert result.returncode == 0, result.stderr
    report = report_of(out)
    assert report["model"]["externalData"] == [{"file": "weights.bin", "sha256": sha256(model.parent / "weights.bin")}]
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json"]  # weights embedded: they fit
    server = Server(out, "m", log_dir=tmp_path)
    try:
        np.testing.assert_allclose(served_logits(server), expected_logits(model), rtol=1e-5, atol=1e-5)
    finally:
        assert server.stop() == 0


def test_changed_external_data_is_a_new_cache_key_not_a_stale_hit(tmp_path: Path) -> None:
    model = external_model(tmp_path / "src")
    args = ["--model", str(model), "--sha256", sha256(model), "--output", str(tmp_path / "out")]
    assert edgemodel_build(*args).returncode == 0
    first = report_of(tmp_path / "out")["cacheKey"]
    data = model.parent / "weights.bin"
    data.write_bytes(data.read_bytes()[:-4] + np.float32(7).tobytes())  # the .onnx and its digest are unchanged
    second = edgemodel_build(*args)
    assert second.returncode == 0, second.stderr
    assert "cache hit" not in second.stderr
    assert report_of(tmp_path / "out")["cacheKey"] != first


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_optimised_variants_of_an_external_data_model_keep_working(precision: Precision, tmp_path: Path) -> None:
    model = external_model(tmp_path / "src")
    request = BuildRequest(
        model=str(model), sha256=sha256(model), precision=precision, output=tmp_path / "out",
        quantization="dynamic" if precision == "int8" else None, benchmark_seconds=0.2, samples=2,
    )  # fmt: skip
    result = build(request)
    assert result["status"] == "built"
    assert ort.InferenceSession(str(tmp_path / "out" / "model.onnx")).run(None, {"x": X})[0].shape == (1, 10)


def test_an_artifact_too_large_for_one_file_keeps_its_weights_beside_it(tmp_path: Path) -> None:
    # Weights over 2 GiB cannot be written in one ONNX file; a lower limit exercises the same path on a tiny model.
    model = external_model(tmp_path / "src")
    files = ortx.save_artifact(model, tmp_path / "model.onnx", embed_limit=1024)
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data"]
    np.testing.assert_array_equal(expected_logits(files[0]), expected_logits(model))
    assert ortx.save_artifact(model, tmp_path / "model.onnx") == [tmp_path / "model.onnx"]
    assert not (tmp_path / "model.onnx.data").exists()  # no stale side file next to an embedded model


@pytest.mark.parametrize(
    ("damage", "reason", "fragment"),
    [
        ("missing", "ExternalDataMissing", "does not exist"),
        ("escaping", "InvalidModel", "outside the model's directory"),
        ("absolute", "InvalidModel", "outside the model's directory"),
    ],
)
def test_external_data_that_cannot_be_found_safely_is_refused(
    damage: str, reason: str, fragment: str, tmp_path: Path
) -> None:
    location = {"missing": "weights.bin", "escaping": "../secret.bin", "absolute": str(tmp_path / "abs.bin")}[damage]
    model = external_model(tmp_path / "src", "weights.bin")
    if damage == "missing":
        (model.parent / "weights.bin").unlink()
    else:
        proto = onnx.load(str(model), load_external_data=False)
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save(proto, str(model))
    result = edgemodel_build("--model", str(model), "--sha256", sha256(model), "--output", str(tmp_path / "out"))
    _expect_failure(result, ExitCode.BAD_INPUT, reason)
    assert fragment in result.stderr
    assert report_of(tmp_path / "out")["reason"] == reason


def test_an_https_uri_to_a_model_with_external_data_is_refused_with_what_to_do(tmp_path: Path) -> None:
    root = tmp_path / "www"
    model = external_model(root)
    pki = write_pki(tmp_path / "pki")
    with HttpsFileServer(root, pki) as server:
        ca = pki.ca_cert
        result = edgemodel_build(
            "--model", server.url("files", "model.onnx"), "--sha256", sha256(model), "--output", str(tmp_path / "out"),
            env={"EDGEMODEL_CA_BUNDLE": str(ca)},
        )  # fmt: skip
    _expect_failure(result, ExitCode.BAD_INPUT, "ExternalDataOverHttps")
    assert "weights.bin" in result.stderr
    assert "oras push" in result.stderr
    assert "@sha256:" in result.stderr


def test_an_oci_artifact_with_model_and_data_builds_pushes_and_serves_by_digest(
    registry: Registry, tmp_path: Path
) -> None:
    model = external_model(tmp_path / "src")
    source = oci.parse_reference(f"{registry.address}/models/ext:v1")
    manifest = oci.push(source, [model, model.parent / "weights.bin"], "v1", {})
    out = tmp_path / "out"
    result = edgemodel_build(
        "--model", f"oci://{source.with_digest(manifest)}", "--sha256", sha256(model), "--output", str(out),
        "--push", f"oci://{registry.address}/engines/ext",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = report_of(out)
    assert report["model"]["externalData"][0]["sha256"] == sha256(model.parent / "weights.bin")
    assert report["options"]["modelFiles"] == {"artifact": manifest}
    server = Server(report["artifact"]["reference"], "m", log_dir=tmp_path)
    try:
        np.testing.assert_allclose(served_logits(server), expected_logits(model), rtol=1e-5, atol=1e-5)
    finally:
        assert server.stop() == 0
    # The engine image's fallback layer holds the model with its data file beside it, as the model reads it:
    # served as the fallback from where a serving pod's init container copies it, nothing fetched.
    layer = _layer(registry, "engines/ext", report["artifact"]["reference"], "fallback")
    assert sorted(layer.getnames()) == [
        "fallback", "fallback/fallback.json", "fallback/model.onnx", "fallback/weights.bin"
    ]  # fmt: skip
    cache = tmp_path / "cache"
    layer.extractall(tmp_path / "layer", filter="data")
    shutil.copytree(tmp_path / "layer" / "fallback", cache / f"fallback-{sha256(model)[:16]}")
    pinned = FallbackSource(f"oci://127.0.0.1:9/models/ext@{manifest}", sha256(model))  # out of reach
    fallback = load_fallback(pinned, cache, 1)
    x = {fallback.inputs[0].name: np.ones([1, 16], dtype=np.float32)}
    np.testing.assert_allclose(
        next(iter(fallback.predict(x).values())),
        ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, x)[0],
        rtol=1e-6,
    )
    # Other weights beside the same model file are not served: the data file is checked against the listing.
    weights = cache / f"fallback-{sha256(model)[:16]}" / "weights.bin"
    damaged = bytearray(weights.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    weights.chmod(0o644)
    weights.write_bytes(bytes(damaged))
    with pytest.raises(ArtifactError, match=r"weights\.bin") as refused:
        load_fallback(pinned, cache, 1)
    assert refused.value.reason == "DigestMismatch"


def test_a_model_whose_data_file_is_named_as_the_fallback_model_gets_no_fallback_layer(
    registry: Registry, tmp_path: Path
) -> None:
    """The fallback layer keeps the model as model.onnx with its data files beside it under their own names;
    a model `net.onnx` whose weights are in a file called `model.onnx` cannot be laid out so, and its image
    has no fallback layer (its pods fetch the fallback from the model's URI when they need it)."""
    model = external_model(tmp_path / "src", location="model.onnx", name="net.onnx")
    report = build(
        BuildRequest(
            model=str(model), sha256=sha256(model), output=tmp_path / "out", benchmark_seconds=0.2, samples=2,
            push=f"oci://{registry.address}/engines/ext-clash",
        )
    )  # fmt: skip
    assert report["status"] == "built"
    with pytest.raises(ValueError, match="not enough values"):
        _layer(registry, "engines/ext-clash", report["artifact"]["reference"], "fallback")
    assert _layer(registry, "engines/ext-clash", report["artifact"]["reference"], "engine").getnames()


def test_an_engine_with_its_weights_beside_it_is_pushed_and_served_with_them(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only weights over 2 GiB make the engine keep a side file; a lower limit takes the same path on a tiny
    # model (the default is exercised by every other build here, which embeds).
    monkeypatch.setattr(ortx, "EMBED_LIMIT", 1024)
    model = external_model(tmp_path / "src")
    out = tmp_path / "out"
    report = build(
        BuildRequest(
            model=str(model), sha256=sha256(model), output=out, push=f"oci://{registry.address}/engines/ext-big",
            benchmark_seconds=0.2, samples=2,
        )
    )  # fmt: skip
    data = report["artifact"]["dataFiles"]
    assert data == [{"file": "model.onnx.data", "sha256": sha256(out / "model.onnx.data"), "size": data[0]["size"]}]
    pulled = {path.name: path for path in oci.pull_files(report["artifact"]["reference"])}
    assert set(pulled) == {"model.onnx", "model.onnx.data", "report.json"}
    for location in (str(out), report["artifact"]["reference"]):
        server = Server(location, "m", log_dir=tmp_path)
        try:
            np.testing.assert_allclose(served_logits(server), expected_logits(model), rtol=1e-5, atol=1e-5)
        finally:
            assert server.stop() == 0
    (out / "model.onnx.data").write_bytes(b"\0" * data[0]["size"])  # a damaged side file is no cache hit
    assert (
        build(BuildRequest(model=str(model), sha256=sha256(model), output=out, benchmark_seconds=0.2, samples=2))[
            "status"
        ]
        == "built"
    )


def test_an_oci_model_with_external_data_must_be_pinned_by_digest(registry: Registry, tmp_path: Path) -> None:
    model = external_model(tmp_path / "src")
    source = oci.parse_reference(f"{registry.address}/models/ext-tag:v1")
    oci.push(source, [model, model.parent / "weights.bin"], "v1", {})
    result = edgemodel_build("--model", f"oci://{source}", "--sha256", sha256(model), "--output", str(tmp_path / "out"))
    _expect_failure(result, ExitCode.BAD_INPUT, "UnpinnedArtifact")
    assert "weights.bin" in result.stderr


def test_an_oci_artifact_without_the_data_file_is_refused(registry: Registry, tmp_path: Path) -> None:
    model = external_model(tmp_path / "src")
    source = oci.parse_reference(f"{registry.address}/models/ext-half:v1")
    manifest = oci.push(source, [model], "v1", {})
    with pytest.raises(BadInputError, match=r"weights\.bin") as refused:
        build(BuildRequest(model=f"oci://{source.with_digest(manifest)}", sha256=sha256(model), output=tmp_path / "o"))
    assert refused.value.reason == "ExternalDataMissing"


def test_a_layer_whose_bytes_differ_from_its_digest_is_refused(registry: Registry, tmp_path: Path) -> None:
    model = external_model(tmp_path / "src")
    source = oci.parse_reference(f"{registry.address}/models/ext-bad:v1")
    manifest = oci.push(source, [model, model.parent / "weights.bin"], "v1", {})
    # The registry cannot be asked to serve wrong bytes, so its stored blob is overwritten (a fault, on purpose).
    blob = sha256(model.parent / "weights.bin")
    stored = next(registry.directory.rglob(f"blobs/sha256/{blob[:2]}/{blob}/data"))
    stored.write_bytes(b"\0" * stored.stat().st_size)
    with pytest.raises(BuildError) as refused:
        build(BuildRequest(model=f"oci://{source.with_digest(manifest)}", sha256=sha256(model), output=tmp_path / "o"))
    assert refused.value.reason == "DigestMismatch"
    assert refused.value.exit_code == ExitCode.BAD_INPUT
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
