"""The images built from images/*/Dockerfile with buildah and no registry (tests/testbed/images.py).

A cold build (debootstrap, then both Dockerfiles) takes about three minutes and needs root, buildah,
debootstrap, gcc and libc6-dev, and Debian's mirror and PyPI; after it, the archives are cached and
these tests take seconds plus the containers they run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tomllib
from pathlib import Path
from typing import Any

import pytest

from edgemodel_runtime.packaged import cache_root
from tests.testbed import images
from tests.testbed.emulation import emulation_problem
from tests.testbed.images import BuiltImage, ensure_images, run_in_image

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or any(shutil.which(tool) is None for tool in ("buildah", "debootstrap", "gcc")),
    reason="building the images needs root, buildah, debootstrap and gcc (tests/testbed/system-deps.sh)",
)


@pytest.fixture(scope="module")
def built() -> dict[str, BuiltImage]:
    return ensure_images(lambda line: print(f"[images] {line}", flush=True))


class Archive:
    """An OCI image layout in a tar: its index, and each blob checked against its digest and size."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with tarfile.open(path) as tar:
            self.members = {member.name.removeprefix("./"): member for member in tar.getmembers()}
            self.layout = json.loads(self._read(tar, "oci-layout"))
            self.index = json.loads(self._read(tar, "index.json"))
            (entry,) = self.index["manifests"]
            self.entry: dict[str, Any] = entry
            self.manifest = json.loads(self._blob(tar, entry))
            self.config = json.loads(self._blob(tar, self.manifest["config"]))
            self.layers = [self._blob(tar, layer) for layer in self.manifest["layers"]]

    def _read(self, tar: tarfile.TarFile, name: str) -> bytes:
        member = self.members.get(name)
        assert member is not None, f"{self.path.name} has no {name}"
        assert member.isfile(), f"{self.path.name}: {name} is not a file"
        handle = tar.extractfile(member)
        assert handle is not None
        return handle.read()

    def _blob(self, tar: tarfile.TarFile, descriptor: dict[str, Any]) -> bytes:
        algorithm, _, digest = descriptor["digest"].partition(":")
        assert algorithm == "sha256", descriptor
        data = self._read(tar, f"blobs/sha256/{digest}")
        assert len(data) == descriptor["size"], f"{descriptor['digest']}: size {len(data)} != {descriptor['size']}"
        assert hashlib.sha256(data).hexdigest() == digest, f"{descriptor['digest']}: content does not match"
        return data


def test_ensure_images_builds_the_three_images_under_their_names(built: dict[str, BuiltImage]) -> None:
    assert set(built) == {"pause", "operator", "runtime-cpu"}
    assert built["pause"].name == "registry.k8s.io/pause:3.10"
    for name in ("operator", "runtime-cpu"):
        image = built[name]
        assert re.fullmatch(r"[0-9a-f]{12}", image.key)
        assert image.name == f"localhost/edgemodel/{name}:{image.key}"
    for image in built.values():
        assert image.archive.parent == cache_root() / "images"
        assert image.archive.name.endswith(f"-{image.key}.tar")
        assert image.archive.stat().st_size > 0


@pytest.mark.parametrize("name", ["pause", "operator", "runtime-cpu"])
def test_each_archive_is_an_oci_layout_whose_index_names_the_image(built: dict[str, BuiltImage], name: str) -> None:
    archive = Archive(built[name].archive)
    assert archive.layout == {"imageLayoutVersion": "1.0.0"}
    assert archive.index["schemaVersion"] == 2
    assert archive.entry["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert archive.entry["annotations"]["org.opencontainers.image.ref.name"] == built[name].name
    assert archive.manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert archive.config["os"] == "linux"
    assert len(archive.layers) == len(archive.config["rootfs"]["diff_ids"]) >= 1


def test_the_runtime_image_runs_edgemodel_as_65532(built: dict[str, BuiltImage]) -> None:
    config = Archive(built["runtime-cpu"].archive).config["config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["edgemodel"]
    assert "Cmd" not in config or not config["Cmd"]
    assert {"PYTHONDONTWRITEBYTECODE=1", "HOME=/tmp", "VIRTUAL_ENV=/opt/edgemodel"} <= set(config["Env"])
    assert config["Labels"]["org.opencontainers.image.title"] == "edgemodel-runtime-cpu"


def test_the_operator_image_runs_the_operator_as_65532(built: dict[str, BuiltImage]) -> None:
    config = Archive(built["operator"].archive).config["config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["edgemodel"]
    assert config["Cmd"] == ["operator"]
    assert set(config["ExposedPorts"]) == {"8081/tcp", "8082/tcp"}


def test_the_pause_image_holds_only_a_static_pause(built: dict[str, BuiltImage]) -> None:
    archive = Archive(built["pause"].archive)
    config = archive.config["config"]
    assert config["Entrypoint"] == ["/pause"]
    assert config["User"] == "65535:65535"
    (layer,) = archive.layers
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        files = [member for member in tar.getmembers() if member.isfile()]
    assert [member.name.removeprefix("./") for member in files] == ["pause"]
    assert files[0].mode & 0o111


def test_edgemodel_runs_in_the_runtime_image_on_debians_python(built: dict[str, BuiltImage]) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    script = (
        "id -u; id -g; edgemodel version; edgemodel --help >/dev/null && echo help-ok;"
        " python -c 'import sys; print(sys.version_info[0], sys.version_info[1], sys.base_prefix)';"
        ' dpkg -S "$(readlink -f /opt/edgemodel/bin/python)"; . /etc/os-release; echo "$VERSION_CODENAME"'
    )
    done = run_in_image(built["runtime-cpu"], "sh", "-c", script)
    assert done.returncode == 0, done.stderr
    uid, gid, printed_version, help_ok, python, package, codename = done.stdout.split("\n")[:7]
    assert (uid, gid) == ("65532", "65532")
    assert printed_version == version
    assert help_ok == "help-ok"
    assert python == "3 11 /usr", "the venv is not on Debian's /usr/bin/python3.11"
    assert package == "python3.11-minimal: /usr/bin/python3.11", "the interpreter is not Debian's package"
    assert codename == "bookworm"


def test_the_runtime_image_carries_a_static_busybox_for_engine_images(built: dict[str, BuiltImage]) -> None:
    """Builds put /bin/busybox into every engine image as its only program (runtime/edgemodel_runtime/build/
    engineimage.py): it must need no loader or library, since the engine image has none."""
    program = """
import struct
data = open("/bin/busybox", "rb").read()
assert data[:4] == b"\\x7fELF" and data[4] == 2, "not a 64-bit ELF"
phoff, = struct.unpack_from("<Q", data, 0x20)
size, count = struct.unpack_from("<HH", data, 0x36)
kinds = [struct.unpack_from("<I", data, phoff + i * size)[0] for i in range(count)]
print("interpreter" if 3 in kinds else "static")
"""
    done = run_in_image(built["runtime-cpu"], "python", "-c", program)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "static"
    # The serving pods' copy script (operator/edgemodel_operator/enginecache.py), with this image's paths: it
    # copies the engine whole (joining a file the image holds in slices, in order), and the fallback model
    # where the image has one and a target is named; a second run keeps what is there.
    from edgemodel_operator import enginecache

    base = "/tmp/copy"  # noqa: S108 - inside a container that is removed afterwards
    box = "/bin/busybox"
    sliced = enginecache.SLICES_DIR + enginecache.ENGINE_DIR
    script = (
        enginecache.COPY_SCRIPT.replace(enginecache.COPIER, box)
        .replace(sliced, "@SLICED@")
        .replace(enginecache.SLICES_DIR, f"{base}/slices")
        .replace(enginecache.ENGINE_DIR, f"{base}/engine")
        .replace(enginecache.FALLBACK_DIR, f"{base}/fallback")
        .replace("@SLICED@", f"{base}/slices/engine")
    )
    steps = [
        f"{box} mkdir -p {base}/engine {base}/fallback {base}/cache {base}/slices/engine/model.onnx",
        *(
            f"{box} printf {part} > {base}/slices/engine/model.onnx/{n:04d}"
            for n, part in enumerate(["en", "gi", "ne", "'\\n'"])
        ),
        f"echo {{}} > {base}/engine/report.json",
        f"echo original > {base}/fallback/model.onnx",
        f"{box} sh -c '{script}' copy {base}/cache/e {base}/cache/f",
        f"{box} sh -c '{script}' copy {base}/cache/e {base}/cache/f",
        f"{box} sh -c '{script}' copy {base}/cache/e2 ''",  # no fallback target: the engine alone
        f"{box} cat {base}/cache/e/model.onnx {base}/cache/e/report.json {base}/cache/f/model.onnx",
        f"{box} ls -a {base}/cache",
    ]
    done = run_in_image(built["runtime-cpu"], box, "sh", "-c", " && ".join(steps))
    assert done.returncode == 0, done.stderr
    e, f, e2 = (f"{base}/cache/{name}" for name in ("e", "f", "e2"))
    assert done.stdout.splitlines() == [
        f"engine copied to {e}", f"fallback model copied to {f}", f"engine already in {e}",
        f"fallback model already in {f}", f"engine copied to {e2}", "engine", "{}", "original", ".", "..", "e", "e2",
        "f",
    ]  # fmt: skip


def test_onnx_runtime_runs_a_model_in_the_runtime_image(built: dict[str, BuiltImage]) -> None:
    program = """
import numpy as np, onnx, onnxruntime as ort
from onnx import TensorProto, helper
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "double", [x], [y])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
print(session.run(None, {"x": np.array([1.5, -2.0], dtype=np.float32)})[0].tolist())
"""
    done = run_in_image(built["runtime-cpu"], "python", "-c", program)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[3.0, -4.0]"


def test_openvino_compiles_and_runs_a_model_in_the_runtime_image(built: dict[str, BuiltImage]) -> None:
    program = """
import numpy as np, openvino as ov
from onnx import TensorProto, helper
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "double", [x], [y])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
core = ov.Core()
compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU", {"ENABLE_CPU_PINNING": False})
print(np.asarray(compiled({"x": np.array([1.5, -2.0], dtype=np.float32)})[0]).tolist())
"""
    done = run_in_image(built["runtime-cpu"], "python", "-c", program)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[3.0, -4.0]"


def test_the_operator_image_runs_the_operator_command_without_the_runtime_dependencies(
    built: dict[str, BuiltImage],
) -> None:
    done = run_in_image(built["operator"], "sh", "-c", "edgemodel operator --help; python -c 'import onnxruntime'")
    assert "usage: edgemodel operator" in done.stdout, done.stderr
    assert "No module named 'onnxruntime'" in done.stderr, "the operator image should carry only its own lock"


def test_the_pause_binary_answers_in_its_image(built: dict[str, BuiltImage]) -> None:
    done = run_in_image(built["pause"], "/pause", "-v")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pause")


def test_a_second_call_takes_no_build(built: dict[str, BuiltImage]) -> None:
    stamps = {name: image.archive.stat().st_mtime_ns for name, image in built.items()}
    again = ensure_images(lambda line: pytest.fail(f"a cached call logged {line!r}"))  # nothing built
    assert again == built
    assert {name: image.archive.stat().st_mtime_ns for name, image in again.items()} == stamps


def _copied(image: str) -> set[str]:
    return {
        path.relative_to(ROOT).as_posix() for path in images._copied_sources(images.DOCKERFILES[image] / "Dockerfile")
    }


def test_each_key_covers_what_its_dockerfile_copies() -> None:
    shared = {"images/requirements/build.txt", "pyproject.toml", "README.md", "operator", "runtime"}
    assert _copied("runtime-cpu") == shared | {"images/requirements/runtime-cpu.txt"}
    assert _copied("operator") == shared | {"images/requirements/operator.txt"}


@pytest.mark.parametrize("name", ["pause", "runtime-cpu"])
def test_the_arm64_images_are_arm64_builds_of_the_same_images_under_the_same_names(
    built: dict[str, BuiltImage], name: str
) -> None:
    if problem := emulation_problem():
        pytest.skip(f"arm64 images are built under emulation: {problem}")
    arm64 = ensure_images(lambda line: print(f"[images] {line}", flush=True), arch="arm64", only=(name,))[name]
    assert arm64.name == built[name].name  # as one multi-arch tag names both
    assert arm64.key != built[name].key
    assert arm64.archive.name == f"{name}-arm64-{arm64.key}.tar"
    native, emulated = Archive(built[name].archive), Archive(arm64.archive)
    assert native.config["architecture"] == "amd64"
    assert emulated.config["architecture"] == "arm64"
    assert emulated.entry["annotations"]["org.opencontainers.image.ref.name"] == built[name].name
    assert emulated.config["config"].get("User") == native.config["config"].get("User")
    assert emulated.config["config"].get("Entrypoint") == native.config["config"].get("Entrypoint")
    # The programs in it are arm64 ELF files (e_machine 183, EM_AARCH64).
    program = "pause" if name == "pause" else "usr/bin/python3.11"
    with tarfile.open(arm64.archive) as tar:
        for layer in reversed(emulated.manifest["layers"]):
            blob = tar.extractfile(f"blobs/sha256/{layer['digest'].partition(':')[2]}")
            assert blob is not None
            with tarfile.open(fileobj=io.BytesIO(blob.read())) as files:
                member = next((m for m in files.getmembers() if m.name.removeprefix("./") == program), None)
                if member is not None and member.isfile():
                    header = files.extractfile(member)
                    assert header is not None
                    assert int.from_bytes(header.read(20)[18:20], "little") == 183, program
                    return
    raise AssertionError(f"{program} not found in {arm64.archive}")
