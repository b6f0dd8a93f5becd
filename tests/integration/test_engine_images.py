"""Engines pushed as images (runtime/edgemodel_runtime/build/engineimage.py), against a real registry
(Debian's docker-registry): what `edgemodel build --push` writes, what `edgemodel serve` and the build's
cache read back, and what they refuse."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgemodel_runtime.build import engineimage, oci
from edgemodel_runtime.build.errors import BadInputError
from edgemodel_runtime.build.pipeline import BuildRequest, build
from tests import onnx_models
from tests.integration.test_build import sha256
from tests.integration.test_serve import Server
from tests.testbed.registry import Registry


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    running = Registry(tmp_path_factory.mktemp("registry")).start()
    yield running
    running.stop()


def _manifest(registry: Registry, repository: str, digest: str) -> dict[str, Any]:
    import urllib.request

    request = urllib.request.Request(
        f"http://{registry.address}/v2/{repository}/manifests/{digest}",
        headers={"Accept": engineimage.MANIFEST_MEDIA_TYPE},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        manifest: dict[str, Any] = json.loads(response.read())
    return manifest


def _build(directory: Path, registry: Registry, name: str) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    model = onnx_models.tiny_classifier(directory / f"{name}.onnx")
    push = f"oci://{registry.address}/engines/{name}"
    request = BuildRequest(
        model=str(model), sha256=sha256(model), output=directory / name, push=push, benchmark_seconds=0.2, samples=2
    )
    return build(request)


def test_a_pushed_engine_is_an_image_a_node_can_run_and_serve_reads_back(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copier = tmp_path / "copier"
    copier.write_bytes(b"\x7fELF stands in for the static busybox of the runtime images")
    monkeypatch.setenv("EDGEMODEL_COPIER", str(copier))
    report = _build(tmp_path, registry, "clf")
    reference = report["artifact"]["reference"]
    digest = reference.rsplit("@", 1)[1]
    manifest = _manifest(registry, "engines/clf", digest)
    assert manifest["mediaType"] == engineimage.MANIFEST_MEDIA_TYPE
    assert manifest["config"]["mediaType"] == engineimage.CONFIG_MEDIA_TYPE
    kinds = [layer["annotations"][engineimage.LAYER_ANNOTATION] for layer in manifest["layers"]]
    assert kinds == ["copier", "engine"]
    assert {layer["mediaType"] for layer in manifest["layers"]} == {engineimage.LAYER_MEDIA_TYPE}
    assert oci.is_engine_image(oci.parse_reference(reference), digest)

    pulled = {path.name: path for path in oci.pull_files(reference)}
    assert set(pulled) == {"model.onnx", "report.json"}  # the copier is the image's, not the engine's
    assert sha256(pulled["model.onnx"]) == report["artifact"]["sha256"]

    monkeypatch.setenv("EDGEMODEL_ARTIFACT_CACHE", str(tmp_path / "cache"))
    server = Server(reference, "clf", log_dir=tmp_path)
    try:
        assert server.get("/v2/models/clf/ready")[0] == 200
    finally:
        assert server.stop() == 0


def test_an_engine_pushed_before_engines_were_images_is_built_again(registry: Registry, tmp_path: Path) -> None:
    first = _build(tmp_path, registry, "old")
    pulled = oci.pull_files(first["artifact"]["reference"])
    repository = oci.parse_reference(f"{registry.address}/engines/old")
    # The same engine under the same cache key, as earlier versions pushed it: one plain layer per file.
    earlier = oci.push(repository, pulled, first["cacheKey"], {})
    assert not oci.is_engine_image(repository, earlier)
    again = _build(tmp_path / "again", registry, "old")
    assert again["status"] == "built"  # not a cache hit: no node could run the earlier artifact
    assert oci.is_engine_image(repository, again["artifact"]["reference"].rsplit("@", 1)[1])
    cached = _build(tmp_path / "cached", registry, "old")
    assert cached["status"] == "cached"


HOSTILE = [
    ("engine/../escape", tarfile.REGTYPE), ("/engine/model.onnx", tarfile.REGTYPE), ("engine/sub/x", tarfile.REGTYPE),
    ("engine/link", tarfile.SYMTYPE), ("engine/hard", tarfile.LNKTYPE), ("engine/dev", tarfile.CHRTYPE),
    ("other/model.onnx", tarfile.REGTYPE),
]  # fmt: skip


@pytest.mark.parametrize(
    ("member", "kind"),
    HOSTILE,
    ids=["dot-dot", "absolute", "nested", "symlink", "hardlink", "device", "outside engine/"],
)
def test_an_engine_layer_with_anything_but_plain_files_in_engine_is_refused(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, member: str, kind: bytes
) -> None:
    # `edgemodel build` writes only plain files; a registry holding another kind of layer is a fault that the
    # real writer cannot produce, so the layer writer is replaced for this push (on purpose).
    def hostile_layer(target: Path, files: list[Path]) -> str:
        with tarfile.open(target, "w") as tar:
            info = tarfile.TarInfo(member)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = 1
                tar.addfile(info, open(files[0], "rb"))  # noqa: SIM115 - closed with the tar
            else:
                info.linkname = "/etc/passwd"
                tar.addfile(info)
        return "sha256:" + sha256(target)

    monkeypatch.setattr(engineimage, "engine_layer", hostile_layer)
    (tmp_path / "model.onnx").write_bytes(b"x")
    reference = oci.parse_reference(f"{registry.address}/engines/hostile")
    digest = oci.push_engine(reference, [tmp_path / "model.onnx"], "bad", {})
    with pytest.raises(BadInputError, match="not a plain file") as refused:
        oci.pull_artifact(reference.with_digest(digest))
    assert refused.value.reason == "InvalidArtifact"
    assert not (tmp_path.parent / "escape").exists()
