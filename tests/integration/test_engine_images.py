"""Engines pushed as images (runtime/edgemodel_runtime/build/engineimage.py), against a real registry
(Debian's docker-registry): what `edgemodel build --push` writes, what `edgemodel serve` and the build's
cache read back, and what they refuse."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
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
from tests.testbed.linkcut import LinkCut
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
    assert kinds == ["copier", "fallback", "engine"]  # the layers up to the engine are the same for one model
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
    def hostile_layers(scratch: Path, files: list[Path]) -> list[engineimage.Layer]:
        target = scratch / "engine.tar"
        with tarfile.open(target, "w") as tar:
            info = tarfile.TarInfo(member)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = 1
                tar.addfile(info, open(files[0], "rb"))  # noqa: SIM115 - closed with the tar
            else:
                info.linkname = "/etc/passwd"
                tar.addfile(info)
        return [engineimage.Layer(target, "sha256:" + sha256(target), "engine")]

    monkeypatch.setattr(engineimage, "engine_layers", hostile_layers)
    (tmp_path / "model.onnx").write_bytes(b"x")
    reference = oci.parse_reference(f"{registry.address}/engines/hostile")
    digest = oci.push_engine(reference, [tmp_path / "model.onnx"], "bad", {}).digest
    with pytest.raises(BadInputError, match="not a plain file") as refused:
        oci.pull_artifact(reference.with_digest(digest))
    assert refused.value.reason == "InvalidArtifact"
    assert not (tmp_path.parent / "escape").exists()


def _blob(registry: Registry, repository: str, digest: str) -> bytes:
    with urllib.request.urlopen(f"http://{registry.address}/v2/{repository}/blobs/{digest}", timeout=10) as response:
        data: bytes = response.read()
    return data


def _layer(registry: Registry, repository: str, reference: str, kind: str) -> tarfile.TarFile:
    manifest = _manifest(registry, repository, reference.rsplit("@", 1)[1])
    (layer,) = [x for x in manifest["layers"] if x["annotations"][engineimage.LAYER_ANNOTATION] == kind]
    return tarfile.open(fileobj=io.BytesIO(_blob(registry, repository, layer["digest"])))


def test_the_engine_image_carries_the_original_model_as_its_fallback_layer(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEMODEL_COPIER", str(_fake_copier(tmp_path)))
    report = _build(tmp_path, registry, "withmodel")
    model = tmp_path / "withmodel.onnx"
    layer = _layer(registry, "engines/withmodel", report["artifact"]["reference"], "fallback")
    members = {m.name: m for m in layer.getmembers()}
    assert sorted(members) == ["fallback", "fallback/fallback.json", "fallback/model.onnx"]
    assert members["fallback/model.onnx"].mode == 0o444
    assert members["fallback"].isdir()
    kept = layer.extractfile(members["fallback/model.onnx"])
    assert kept is not None
    assert kept.read() == model.read_bytes()  # the model the EdgeModel names, as it is
    listing = layer.extractfile(members["fallback/fallback.json"])
    assert listing is not None
    assert json.loads(listing.read()) == {"model.onnx": sha256(model)}
    # One layer per model, whatever the engine: the same bytes give the same digest, stored once.
    first, again = (engineimage.fallback_layer(tmp_path / f"{n}.tar", model) for n in ("one", "two"))
    manifest = _manifest(registry, "engines/withmodel", report["artifact"]["reference"].rsplit("@", 1)[1])
    (stored,) = [x for x in manifest["layers"] if x["annotations"][engineimage.LAYER_ANNOTATION] == "fallback"]
    assert first == again == stored["digest"]
    for name in ("model.onnx", "fallback.json"):
        with pytest.raises(ValueError, match="beside it"):
            engineimage.fallback_layer(tmp_path / "bad.tar", model, [model.with_name(name)])


def _fake_copier(directory: Path) -> Path:
    copier = directory / "copier"
    copier.write_bytes(b"\x7fELF stands in for the static busybox of the runtime images")
    return copier


def test_a_damaged_copy_in_the_cache_is_pulled_again_and_without_the_registry_the_fallback_serves(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a serving pod meets when the node's copy of an engine image is damaged (a bad disk): the copy
    fails its digest check, so the server pulls the engine again; where the registry cannot be reached, it
    serves the original model that the image's fallback layer brought (found by digest, nothing fetched)."""
    monkeypatch.setenv("EDGEMODEL_COPIER", str(_fake_copier(tmp_path)))
    report = _build(tmp_path, registry, "damaged")
    reference, model = report["artifact"]["reference"], tmp_path / "damaged.onnx"
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEMODEL_ARTIFACT_CACHE", str(cache))
    copy = cache / reference.rsplit("@sha256:", 1)[1][:16]  # where the init container copies the engine

    def damage() -> None:
        copy.mkdir(parents=True, exist_ok=True)
        for path in oci.pull_files(reference):
            data = bytearray(path.read_bytes())
            if path.name == "model.onnx":
                data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the digest tells
            (copy / path.name).write_bytes(bytes(data))

    damage()
    server = Server(reference, "damaged", log_dir=tmp_path)
    try:
        assert "edgemodel" not in json.loads(server.get("/v2/models/damaged")[1])  # its engine, not a fallback
        assert sha256(copy / "model.onnx") == report["artifact"]["sha256"]  # pulled again, whole
    finally:
        assert server.stop() == 0
    log = server.log.read_text()
    assert "cannot be used" in log, log
    assert "pulling it again" in log, log

    shutil.rmtree(copy)
    damage()
    nowhere = reference.replace(registry.address, "127.0.0.1:9")  # the same engine, the registry out of reach
    original = f"oci://127.0.0.1:9/models/damaged@sha256:{sha256(model)}"
    kept = cache / f"fallback-{sha256(model)[:16]}"  # what the init container copies from the fallback layer
    _layer(registry, "engines/damaged", reference, "fallback").extractall(tmp_path / "layer", filter="data")
    shutil.copytree(tmp_path / "layer" / engineimage.FALLBACK_DIR, kept)
    for start in ("first", "again"):  # a server started again on the same cache (its pod's container restarted)
        server = Server(nowhere, "damaged", "--fallback-model", original, "--fallback-sha256", sha256(model),
                        log_dir=tmp_path)  # fmt: skip
        try:
            detail = json.loads(server.get("/v2/models/damaged/ready")[1])["edgemodel"]
            assert detail["engine"] == "fallback", (start, detail)
            assert detail["fallbackReason"] == "DigestMismatch", (start, detail)
            assert "pulling" in detail["fallbackMessage"], (start, detail)
            assert "127.0.0.1:9" in detail["fallbackMessage"], (start, detail)
            assert server.metric("edgemodel_engine_fallback", reason="DigestMismatch") == 1
        finally:
            assert server.stop() == 0
        assert "Traceback" not in server.log.read_text()
        assert (copy / "model.onnx").is_file(), start  # the damaged copy stays until a whole one replaces it
        assert sorted(p.name for p in cache.iterdir()) == sorted([copy.name, kept.name]), start


PUSH_AND_MEASURE = """
import sys, tracemalloc
from pathlib import Path
from edgemodel_runtime.build import engineimage, oci
reference = oci.parse_reference(sys.argv[1])
# Slices off: the engine's one layer is then over CHUNKED_ABOVE, as each slice of a file over 512 MiB is.
engineimage.SLICE_BYTES = 1 << 40
tracemalloc.start()
digest = oci.push_engine(reference, [Path(sys.argv[2])], "big", {}).digest
print(digest, tracemalloc.get_traced_memory()[1])
"""


def test_a_large_engine_is_pushed_in_chunks_with_bounded_memory(registry: Registry, tmp_path: Path) -> None:
    """An engine over oci.CHUNKED_ABOVE goes up in oci.CHUNK_BYTES chunks (counted by the link proxy in front
    of the registry: one PATCH per chunk), and the pushing process's peak of Python memory is far below the
    engine's size (ORAS's single PUT would read it whole into memory); the engine pulls back intact."""
    size = oci.CHUNKED_ABOVE + 32 * 1024 * 1024
    engine = tmp_path / "model.onnx"
    with engine.open("wb") as sink:
        for block in range(size // (1 << 20)):
            sink.write(hashlib.sha256(block.to_bytes(4, "little")).digest() * (1 << 15))
    proxy = LinkCut(registry.address).start()
    try:
        done = subprocess.run(
            [sys.executable, "-c", PUSH_AND_MEASURE, f"{proxy.address}/engines/big", str(engine)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        digest, peak = done.stdout.split()
        patches = [t for t in proxy.transfers if t.method == "PATCH"]
    finally:
        proxy.stop()
    assert len(patches) >= size // oci.CHUNK_BYTES, [(t.method, t.path) for t in proxy.transfers]
    # A few chunks at once at most (measured: about 2.6), against the whole engine read at once before.
    assert size > 4 * oci.CHUNK_BYTES
    assert int(peak) < 4 * oci.CHUNK_BYTES, f"{int(peak) >> 20} MiB of Python memory at the peak of the push"
    pulled = {p.name: p for p in oci.pull_files(f"{registry.address}/engines/big@{digest}")}
    assert sha256(pulled["model.onnx"]) == sha256(engine)


def _random_file(path: Path, mebibytes: int, seed: int) -> Path:
    """A file of `mebibytes` MiB of bytes that differ from block to block (so that no slice equals another)."""
    with path.open("wb") as sink:
        for block in range(mebibytes):
            sink.write(hashlib.sha256(f"{seed}-{block}".encode()).digest() * (1 << 15))
    return path


def test_files_over_the_slice_size_go_in_slices_with_part_images_that_are_prefixes_of_the_engine_image(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 40 MiB engine and a 20 MiB model: each file over engineimage.SLICE_BYTES goes in slices, one layer
    each after its directory's layer; each part image is the engine image's layers up to a slice (so a node
    that pulls the parts in order fetches each layer once, and keeps what it completed); the engine image
    names its parts; pulling the engine joins its slices back into the file."""
    monkeypatch.setenv("EDGEMODEL_COPIER", str(_fake_copier(tmp_path)))
    engine = _random_file(tmp_path / "model.onnx", 40, seed=1)
    model = _random_file(tmp_path / "original.onnx", 20, seed=2)
    (tmp_path / "report.json").write_text("{}\n")
    reference = oci.parse_reference(f"{registry.address}/engines/sliced")
    pushed = oci.push_engine(reference, [engine, tmp_path / "report.json"], "big", {"a": "b"}, fallback=[model])
    manifest = _manifest(registry, "engines/sliced", pushed.digest)
    layers = manifest["layers"]
    kinds = [layer["annotations"][engineimage.LAYER_ANNOTATION] for layer in layers]
    assert kinds == ["copier", "fallback", *["fallback-slice"] * 2, "engine", *["engine-slice"] * 3]
    slices = [_tar(_blob(registry, "engines/sliced", x["digest"])) for x in layers[2:]]
    files = [[m for m in layer.getmembers() if m.isfile()] for layer in slices]
    assert [[(m.name, m.size >> 20) for m in members] for members in files] == [
        [("slices/fallback/model.onnx/0000", 16)], [("slices/fallback/model.onnx/0001", 4)],
        [("engine/report.json", 0)],
        [("slices/engine/model.onnx/0000", 16)], [("slices/engine/model.onnx/0001", 16)],
        [("slices/engine/model.onnx/0002", 8)],
    ]  # fmt: skip
    joined = b"".join(_read(slices[i], files[i][0]) for i in (0, 1))
    assert joined == model.read_bytes()

    # The parts end after each layer of 1 MiB or more, but the last: the image itself.
    assert manifest["annotations"] == {"a": "b", engineimage.PARTS_ANNOTATION: ",".join(pushed.parts)}
    assert [len(_manifest(registry, "engines/sliced", part)["layers"]) for part in pushed.parts] == [3, 4, 6, 7]
    for number, part in enumerate(pushed.parts, start=1):
        image = _manifest(registry, "engines/sliced", part)
        assert image["layers"] == layers[: len(image["layers"])]
        assert image["annotations"] == {engineimage.PART_ANNOTATION: f"{number} of 4"}
        config = json.loads(_blob(registry, "engines/sliced", image["config"]["digest"]))
        assert config["rootfs"]["diff_ids"] == [x["digest"] for x in image["layers"]]
        assert config["config"]["Entrypoint"] == ["/busybox"]
    assert oci.parts_of(oci.manifest_annotations(reference, pushed.digest)) == list(pushed.parts)  # cache hits

    pulled = {path.name: path for path in oci.pull_files(reference.with_digest(pushed.digest))}
    assert set(pulled) == {"model.onnx", "report.json"}
    assert sha256(pulled["model.onnx"]) == sha256(engine)
    # The same files give the same images.
    assert oci.push_engine(reference, [engine, tmp_path / "report.json"], "big", {"a": "b"}, [model]) == pushed


def _tar(blob: bytes) -> tarfile.TarFile:
    return tarfile.open(fileobj=io.BytesIO(blob))


def _read(layer: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    source = layer.extractfile(member)
    assert source is not None
    return source.read()


@pytest.mark.parametrize("fault", ["swapped", "missing", "named twice"])
def test_slices_out_of_order_missing_or_named_twice_are_refused(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    # The writer puts slices in order, once; a registry holding them otherwise is a fault it cannot produce,
    # so the layer list is rearranged for this push (on purpose).
    real = engineimage.engine_layers

    def rearranged(scratch: Path, files: list[Path]) -> list[engineimage.Layer]:
        layers = real(scratch, files)
        if fault == "swapped":
            return [layers[0], layers[2], layers[1], *layers[3:]]
        if fault == "missing":
            return [layers[0], *layers[2:]]
        return [*layers, layers[1]]

    monkeypatch.setattr(engineimage, "engine_layers", rearranged)
    engine = _random_file(tmp_path / "model.onnx", 20, seed=3)
    reference = oci.parse_reference(f"{registry.address}/engines/rearranged")
    digest = oci.push_engine(reference, [engine], fault.replace(" ", "-"), {}).digest
    with pytest.raises(BadInputError, match=r"out of order or names model\.onnx twice") as refused:
        oci.pull_artifact(reference.with_digest(digest))
    assert refused.value.reason == "InvalidArtifact"


def _has_manifest(registry: Registry, repository: str, digest: str) -> bool:
    request = urllib.request.Request(
        f"http://{registry.address}/v2/{repository}/manifests/{digest}",
        headers={"Accept": engineimage.MANIFEST_MEDIA_TYPE},
        method="HEAD",
    )
    try:
        with urllib.request.urlopen(request, timeout=10):
            return True
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return False
        raise


def test_a_cache_hit_names_no_part_image_the_registry_has_lost(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry that lost a part image (deleted by hand, by a tag retention policy that counts the
    `-partNN` tags, or by garbage collection) still has the engine image: a build of the same inputs is a
    cache hit. The parts its report names go to the pull DaemonSet as init containers, and an init container
    whose image the registry does not have waits in ImagePullBackOff for ever, so the pull pod never runs.
    So every part a cache hit names must be in the registry (or the hit names none, or pushes them again)."""
    monkeypatch.setenv("EDGEMODEL_COPIER", str(_fake_copier(tmp_path)))
    model = onnx_models.wide_classifier(tmp_path / "wide.onnx", hidden=1 << 18)  # 27 MiB: its files go in slices
    push = f"oci://{registry.address}/engines/lostpart"

    def build_once(name: str) -> dict[str, Any]:
        request = BuildRequest(
            model=str(model), sha256=sha256(model), output=tmp_path / name, push=push, benchmark_seconds=0.2, samples=2
        )
        return build(request)

    first = build_once("first")
    parts = first["artifact"]["parts"]
    assert first["status"] == "built"
    assert len(parts) >= 2
    lost = parts[1]
    request = urllib.request.Request(f"http://{registry.address}/v2/engines/lostpart/manifests/{lost}", method="DELETE")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202
    assert not _has_manifest(registry, "engines/lostpart", lost)

    again = build_once("again")
    missing = [p for p in again["artifact"].get("parts", []) if not _has_manifest(registry, "engines/lostpart", p)]
    assert missing == [], f"the {again['status']} report names part images the registry does not have: {missing}"
    assert again["status"] == "cached"
    assert again["artifact"]["parts"] == parts  # pushed again from the engine image's layers, the same digests
