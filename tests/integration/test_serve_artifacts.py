"""Every way fetching or loading an engine can fail is one line with a reason and a documented exit code,
from `edgemodel serve` as a process: 2 for an artifact that cannot be served as it is, 4 when the registry or
the disk failed. Side files of an engine (artifact.dataFiles) are verified like the engine itself."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgemodel_runtime.build import oci
from edgemodel_runtime.build.pipeline import BuildRequest, build
from edgemodel_runtime.engines import onnxruntime_engine as ortx
from tests import onnx_models
from tests.helpers import free_port
from tests.integration.test_build import sha256
from tests.integration.test_build_external_data import external_model
from tests.integration.test_serve import EDGEMODEL, Server
from tests.testbed.registry import Registry


def serve(artifact: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [EDGEMODEL, "serve", artifact, "--port", str(free_port())],
        capture_output=True, text=True, timeout=120, check=False, env={**os.environ, **(env or {})},
    )  # fmt: skip


def refused(result: subprocess.CompletedProcess[str], code: int, reason: str, *phrases: str) -> None:
    """Exit `code`, and a last line on stderr naming `reason` (and each phrase); no traceback. Lines before it
    may only be the registry client's retries."""
    *before, last = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert all(line.startswith("registry ") and "retrying" in line for line in before), result.stderr
    assert last.startswith(f"edgemodel serve: {reason}: "), last
    for phrase in phrases:
        assert phrase in last, last


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two built engines: one in one file, one whose weights stay beside it (artifact.dataFiles)."""
    root = tmp_path_factory.mktemp("engines")
    plain = onnx_models.tiny_classifier(root / "plain.onnx")
    build(BuildRequest(model=str(plain), sha256=sha256(plain), output=root / "plain", benchmark_seconds=0.2, samples=2))
    # Only weights over 2 GiB keep a side file; a lower limit takes the same path on a tiny model.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ortx, "EMBED_LIMIT", 1024)
        model = external_model(root / "src")
        build(
            BuildRequest(model=str(model), sha256=sha256(model), output=root / "big", benchmark_seconds=0.2, samples=2)
        )
    assert json.loads((root / "big" / "report.json").read_text())["artifact"]["dataFiles"]
    return {"plain": root / "plain", "big": root / "big"}


@pytest.fixture
def big(engines: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of the engine with a side file, to damage."""
    return Path(shutil.copytree(engines["big"], tmp_path / "big"))


def test_an_engine_with_verified_side_files_is_served(engines: dict[str, Path]) -> None:
    server = Server(engines["big"], "m", log_dir=engines["big"].parent)
    try:
        assert server.get("/v2/models/m/ready")[0] == 200
    finally:
        assert server.stop() == 0


def test_a_side_file_that_differs_from_the_build_report_is_refused(big: Path) -> None:
    data = big / "model.onnx.data"
    data.write_bytes(b"\0" * data.stat().st_size)  # same size, other weights
    refused(serve(str(big)), 2, "DigestMismatch", "model.onnx.data has sha256", "but the build report says")


def test_a_missing_side_file_is_refused(big: Path) -> None:
    (big / "model.onnx.data").unlink()
    refused(serve(str(big)), 2, "InvalidArtifact", "model.onnx.data is missing")


def test_a_side_file_the_build_report_does_not_list_is_refused(big: Path) -> None:
    report = json.loads((big / "report.json").read_text())
    del report["artifact"]["dataFiles"]  # the model still reads model.onnx.data, now unverified
    (big / "report.json").write_text(json.dumps(report))
    refused(serve(str(big)), 2, "InvalidArtifact", "model.onnx.data", "does not list")


@pytest.mark.parametrize(
    ("damage", "reason", "phrase"),
    [
        (lambda d: (d / "report.json").write_text("{not json"), "InvalidArtifact", "is not valid JSON"),
        (lambda d: (d / "report.json").write_text("[1, 2]"), "InvalidArtifact", "describes no built engine"),
        (lambda d: (d / "report.json").write_text('{"status": "failed"}'), "InvalidArtifact", "status 'failed'"),
        (lambda d: (d / "model.onnx").unlink(), "InvalidArtifact", "model.onnx is missing"),
        (lambda d: (d / "model.onnx").write_bytes(b"x"), "DigestMismatch", "but the build report says"),
        (lambda d: (d / "report.json").unlink() or (d / "model.onnx").write_bytes(b"x"), "InvalidModel", "onnxruntime"),
        (lambda d: [p.unlink() for p in d.iterdir()], "InvalidArtifact", "holds neither report.json nor model"),
    ],
    ids=["report not json", "report not an object", "failed build", "engine missing", "engine tampered",
         "not a model", "empty directory"],
)  # fmt: skip
def test_a_local_artifact_that_cannot_be_served_is_refused_with_its_reason(
    engines: dict[str, Path], tmp_path: Path, damage: object, reason: str, phrase: str
) -> None:
    directory = Path(shutil.copytree(engines["plain"], tmp_path / "engine"))
    damage(directory)  # type: ignore[operator]
    refused(serve(str(directory)), 2, reason, phrase)


def test_a_missing_location_and_an_unpinned_reference_are_refused(tmp_path: Path) -> None:
    refused(serve(str(tmp_path / "nothing")), 2, "ArtifactNotFound", "no such file or directory")
    refused(serve("oci://127.0.0.1:5000/engines/clf:latest"), 2, "UnpinnedArtifact", "by digest")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    running = Registry(tmp_path_factory.mktemp("registry")).start()
    yield running
    running.stop()


def _push(registry: Registry, engine: Path, repository: str) -> str:
    reference = oci.parse_reference(f"{registry.address}/{repository}:v1")
    files = [p for p in sorted(engine.iterdir()) if p.is_file()]
    return f"oci://{reference.with_digest(oci.push(reference, files, 'v1', {}))}"


def test_an_unreachable_registry_is_an_infrastructure_failure(tmp_path: Path) -> None:
    location = f"oci://127.0.0.1:{free_port()}/engines/clf@sha256:{'0' * 64}"  # nothing listens there
    env = {"EDGEMODEL_ARTIFACT_CACHE": str(tmp_path / "cache")}
    refused(serve(location, env), 4, "RegistryError", "registry unreachable")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing half-pulled


def test_a_digest_the_registry_does_not_hold_is_a_registry_error(registry: Registry, tmp_path: Path) -> None:
    location = f"oci://{registry.address}/engines/none@sha256:{'1' * 64}"
    refused(serve(location, {"EDGEMODEL_ARTIFACT_CACHE": str(tmp_path)}), 4, "RegistryError", "HTTP 404")


def test_a_layer_whose_bytes_differ_from_its_digest_is_refused(
    registry: Registry, engines: dict[str, Path], tmp_path: Path
) -> None:
    location = _push(registry, engines["big"], "engines/tampered")
    # The registry cannot be asked to serve wrong bytes, so its stored blob is overwritten (a fault, on purpose).
    blob = sha256(engines["big"] / "model.onnx.data")
    stored = next(registry.directory.rglob(f"blobs/sha256/{blob[:2]}/{blob}/data"))
    stored.write_bytes(b"\0" * stored.stat().st_size)
    cache = tmp_path / "cache"
    refused(serve(location, {"EDGEMODEL_ARTIFACT_CACHE": str(cache)}), 2, "DigestMismatch", "model.onnx.data")
    assert not cache.exists() or not any(cache.iterdir())  # a failed pull leaves no cache entry behind


def test_an_artifact_that_holds_no_engine_is_refused(registry: Registry, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("no engine here")
    location = _push(registry, tmp_path, "engines/notes")
    result = serve(location, {"EDGEMODEL_ARTIFACT_CACHE": str(tmp_path / "cache")})
    refused(result, 2, "InvalidArtifact", "holds neither report.json nor model")


def test_an_artifact_cache_that_cannot_be_written_is_an_infrastructure_failure(
    registry: Registry, engines: dict[str, Path], tmp_path: Path
) -> None:
    location = _push(registry, engines["plain"], "engines/plain")
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache directory should be")
    refused(serve(location, {"EDGEMODEL_ARTIFACT_CACHE": str(blocked)}), 4, "DiskError", "artifact cache")
    server = Server(location, "m", log_dir=tmp_path)  # with a usable cache, the same artifact serves
    try:
        assert server.get("/v2/models/m/ready")[0] == 200
    finally:
        assert server.stop() == 0
