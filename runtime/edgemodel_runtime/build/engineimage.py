"""An engine artifact that is also a container image, so that a node's container runtime keeps it.

A pushed engine is one OCI image manifest with uncompressed tar layers:

- layer `copier` (annotation `dev.edgemodel.layer: copier`): `/busybox`, a statically linked busybox
  (Debian's busybox-static, shipped in the runtime images), the image's only program;
- layer `engine` (`dev.edgemodel.layer: engine`): `/engine/<file>` for every file of the artifact (the
  engine, its side files and report.json), read-only, owned by root;
- layer `fallback` (`dev.edgemodel.layer: fallback`), when the build names one: `/fallback/model.onnx`,
  the original model the engine was built from (and its external-data files under their own names,
  with `/fallback/fallback.json` giving every file's SHA-256), which a server that cannot load the
  engine serves instead (`edgemodel serve --fallback-model`). Its bytes are the same for every class
  built from one model, so one blob serves every engine image of that model in the registry and in a
  node's content store; it comes before the engine layer, so that the unpacked copy (keyed by the
  layers below and including it) is shared on a node too.

A file larger than SLICE_BYTES (16 MiB) is not put in its directory's layer whole: it is cut into slices
of SLICE_BYTES, or of 1/MAX_SLICES of the file when that is larger (the last one smaller), one layer
each (`engine-slice` or `fallback-slice`, the file at `/slices/<engine|fallback>/<name>/<NNNN>`), after
its directory's layers; whoever reads the image joins them in order (the serving pod's copy script,
`oci.pull_artifact`). The smaller files of a directory go together in layers of SLICE_BYTES at most
(GROUPS layers at most). An image over SLICE_BYTES comes with *parts*: every prefix of its layers that
ends after a layer of PART_MIN_BYTES or more (not the copier, and before the last; MAX_PARTS at most) is
pushed as an image of its own (`dev.edgemodel.part: K of N`), and the engine image names them in order
(`dev.edgemodel.parts`). A node that pulls the parts one after the other keeps each part it completed,
whole, and so the layers it holds: a pull cut short costs at most one part, not the whole engine
(containerd 1.6 keeps nothing of a pull that fails, docs/install.md "Interrupted pulls"). Each part is
the one before it plus what it adds, so the node unpacks each layer once.

The config names the build node's architecture and runs as user 65532. So the engine's manifest
digest is at once the artifact's address for `edgemodel serve oci://...@sha256:...` and an image that
a kubelet can pull by digest: the node's containerd then keeps it as a digest-verified node-local
cache that survives pod deletion and registry outages. Layers are written deterministically (sorted,
mtime 0, uid 0), so the same files give the same digests.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgemodel_runtime.digests import sha256_file

ENGINE_DIR = "engine"  # where the engine's files lie in the image
FALLBACK_DIR = "fallback"  # where the original model lies in the image
FALLBACK_MODEL = "model.onnx"  # its name there (external-data files keep their own names beside it)
FALLBACK_DIGESTS = "fallback.json"  # beside it: {file name: SHA-256 hex} of the model and each side file
COPIER = "busybox"  # the copier's path in the image (`/busybox`)
LAYER_ANNOTATION = "dev.edgemodel.layer"  # `copier`, `engine`, `fallback`, `engine-slice` or `fallback-slice`
SLICE_KIND = "-slice"  # a layer kind's suffix for a slice of a file of that directory
SLICES_DIR = "slices"  # /slices/<engine|fallback>/<file name>/<NNNN>: a large file's slices
SLICE_BYTES = 16 * 1024 * 1024  # files above this size go in slices
MAX_SLICES = 8  # at most this many slices per file: larger files get larger slices
SLICE_LAYERS = 16  # and their slices in one directory about this many layers at most (each file adds one)
MAX_SLICED_FILES = 16  # a directory with more large files keeps them whole in its groups
GROUPS = 8  # a directory's other files go in layers of at most SLICE_BYTES, or in GROUPS layers when more
# So an image has at most 1 + 2 * (GROUPS + 1 + SLICE_LAYERS + MAX_SLICED_FILES) = 83 layers: CRI-O and
# dockerd refuse more than 127, overlayfs stacks about 500.
PART_MIN_BYTES = 1024 * 1024  # a part image ends after each layer of at least this size
MAX_PARTS = 16  # part images per engine image at most (the build's outcome names each, in 4 KiB)
PART_ANNOTATION = "dev.edgemodel.part"  # on a part image: `K of N`
PARTS_ANNOTATION = "dev.edgemodel.parts"  # on an engine image with parts: their manifest digests, comma-separated
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
USER = "65532:65532"
DEFAULT_COPIERS = ("/bin/busybox", "/usr/bin/busybox")
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm"}


def architecture(machine: str | None = None) -> str:
    """The OCI architecture name of `machine` (default: this one), e.g. x86_64 -> amd64."""
    name = machine or platform.machine()
    return _ARCH.get(name.lower(), name.lower())


def find_copier() -> Path | None:
    """The static busybox to put in engine images: $EDGEMODEL_COPIER, else Debian's busybox-static path.

    None when there is none (an engine pushed from such a machine is pulled by `edgemodel serve` as
    usual, but a pod cannot run it as an image).
    """
    configured = os.environ.get("EDGEMODEL_COPIER")
    for candidate in (configured,) if configured else DEFAULT_COPIERS:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _info(name: str, mode: int, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode, info.size, info.mtime, info.uid, info.gid, info.uname, info.gname = mode, size, 0, 0, 0, "", ""
    return info


def write_layer(target: Path, files: Sequence[tuple[str, Path, int]], directory: str | None = None) -> str:
    """Write a deterministic tar layer of `files` (name in the layer, source, mode); return its `sha256:` digest.

    `directory`, when given, is written first as a 0755 directory entry.
    """
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar:
        if directory:
            tar.addfile(_info(directory, 0o755, directory=True))
        for name, source, mode in sorted(files):
            with source.open("rb") as handle:
                tar.addfile(_info(name, mode, source.stat().st_size), handle)
    return "sha256:" + sha256_file(target)


@dataclass(frozen=True)
class Layer:
    """A layer written to `path`: its `sha256:` digest and its kind (the layer annotation)."""

    path: Path
    digest: str
    kind: str

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def slice_bytes(size: int) -> int:
    """The slice size for a file of `size` bytes: SLICE_BYTES, or more so that there are at most MAX_SLICES."""
    return max(SLICE_BYTES, -(-size // MAX_SLICES))


def _slice_layer(target: Path, directory: str, name: str, *, index: int, source: Path, offset: int, length: int) -> str:
    """A layer holding `length` bytes of `source` from `offset` as slices/<directory>/<name>/<index:04d>."""
    parents = [SLICES_DIR, f"{SLICES_DIR}/{directory}", f"{SLICES_DIR}/{directory}/{name}"]
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar, source.open("rb") as handle:
        for parent in parents:
            tar.addfile(_info(parent, 0o755, directory=True))
        handle.seek(offset)
        tar.addfile(_info(f"{parents[-1]}/{index:04d}", 0o444, length), handle)
    return "sha256:" + sha256_file(target)


def directory_layers(scratch: Path, directory: str, files: Sequence[tuple[str, Path]]) -> list[Layer]:
    """The layer of `directory` (kind `directory`): each (name, source) of at most SLICE_BYTES as
    /<directory>/<name>, mode 0444; then each larger one, in name order, as its slices (kind
    `<directory>-slice`, see `slice_bytes`). Raises ValueError when two files share a name."""
    names = [name for name, _ in files]
    if len(set(names)) != len(names):
        raise ValueError(f"two files of the {directory} layer have the same name: {sorted(names)}")
    large = sorted((name, path) for name, path in files if path.stat().st_size > SLICE_BYTES)
    if len(large) > MAX_SLICED_FILES:  # so many large files (one per tensor?) stay whole, in the groups
        large = []
    # Larger slices when the large files are many, so that they make at most SLICE_LAYERS + len(large) layers.
    floor = -(-sum(path.stat().st_size for _, path in large) // SLICE_LAYERS)
    layers = []
    for index, group in enumerate(_groups(sorted((name, path) for name, path in files if (name, path) not in large))):
        target = scratch / f"{directory}-{index}.tar"
        whole = [(f"{directory}/{name}", path, 0o444) for name, path in group]
        layers.append(Layer(target, write_layer(target, whole, directory), directory))
    for number, (name, path) in enumerate(large):
        size = path.stat().st_size
        step = max(slice_bytes(size), floor)
        for index, offset in enumerate(range(0, size, step)):
            target = scratch / f"{directory}-{number}-{index}.tar"
            length = min(step, size - offset)
            digest = _slice_layer(target, directory, name, index=index, source=path, offset=offset, length=length)
            layers.append(Layer(target, digest, directory + SLICE_KIND))
    return layers


def _groups(files: Sequence[tuple[str, Path]]) -> list[list[tuple[str, Path]]]:
    """`files` (in order) in groups: each file in the group where it starts, counting SLICE_BYTES per group,
    or 1/GROUPS of their total when that is larger (so GROUPS groups at most, each at most that budget and
    one file more); at least one group, so that the directory has its layer."""
    budget = max(SLICE_BYTES, -(-sum(path.stat().st_size for _, path in files) // GROUPS))
    groups: dict[int, list[tuple[str, Path]]] = {0: []}
    start = 0
    for name, path in files:
        groups.setdefault(start // budget, []).append((name, path))
        start += path.stat().st_size
    return [groups[index] for index in sorted(groups)]  # group 0 may be empty; the others are not


def engine_layers(scratch: Path, files: Sequence[Path]) -> list[Layer]:
    """The engine layer (each file as /engine/<base name>, mode 0444) and the slices of its large files."""
    return directory_layers(scratch, ENGINE_DIR, [(file.name, file) for file in files])


def engine_layer(target: Path, files: Sequence[Path]) -> str:
    """The engine layer of files of at most SLICE_BYTES each, written to `target`; its digest."""
    (layer,) = engine_layers(target.parent, files)
    layer.path.replace(target)
    return layer.digest


def fallback_layers(scratch: Path, model: Path, side_files: Sequence[Path] = ()) -> list[Layer]:
    """The fallback layer: `model` as /fallback/model.onnx, each side file (external data) under its own
    name beside it, and /fallback/fallback.json ({file name: SHA-256 hex} of each of them, so that the
    server can check the side files too), mode 0444; then the slices of its large files. Raises
    ValueError when a side file is named model.onnx or fallback.json, or two share a name."""
    names = [file.name for file in side_files]
    if {FALLBACK_MODEL, FALLBACK_DIGESTS} & set(names) or len(set(names)) != len(names):
        raise ValueError(f"the model's side files cannot be kept beside it as {FALLBACK_MODEL}: {sorted(names)}")
    digests = {FALLBACK_MODEL: sha256_file(model)} | {file.name: sha256_file(file) for file in side_files}
    listing = scratch / f"{FALLBACK_DIR}.digests"
    listing.write_text(json.dumps(digests, sort_keys=True, separators=(",", ":")) + "\n")
    files = [(FALLBACK_MODEL, model), (FALLBACK_DIGESTS, listing), *((file.name, file) for file in side_files)]
    try:
        return directory_layers(scratch, FALLBACK_DIR, files)
    finally:
        listing.unlink(missing_ok=True)


def fallback_layer(target: Path, model: Path, side_files: Sequence[Path] = ()) -> str:
    """The fallback layer of a model whose files are at most SLICE_BYTES each, written to `target`; its digest."""
    (layer,) = fallback_layers(target.parent, model, side_files)
    layer.path.replace(target)
    return layer.digest


def part_ends(layers: Sequence[tuple[str, int]]) -> list[int]:
    """The number of layers in each part image, for an image's layers as (kind, size in bytes) (see the
    module's docstring): after each layer of at least PART_MIN_BYTES but the copier and the last, at most
    MAX_PARTS of them (evenly spread when there would be more); none for an image of SLICE_BYTES or less."""
    if len(layers) < 3 or sum(size for _, size in layers) <= SLICE_BYTES:  # pulled whole
        return []
    # Not after the copier: it is the same in every engine image, so a node has it from the first one.
    ends = [index + 1 for index, (kind, size) in enumerate(layers[:-1]) if size >= PART_MIN_BYTES and kind != "copier"]
    if len(ends) > MAX_PARTS:
        ends = [ends[((number + 1) * len(ends)) // MAX_PARTS - 1] for number in range(MAX_PARTS)]
    return ends


def copier_layer(target: Path, copier: Path) -> str:
    """The copier layer: `copier` as /busybox, mode 0555; its digest."""
    return write_layer(target, [(COPIER, copier, 0o555)])


def copier_layers(scratch: Path, copier: Path | None) -> list[Layer]:
    """The copier layer (kind `copier`), or none when there is no copier."""
    if copier is None:
        return []
    target = scratch / "copier.tar"
    return [Layer(target, copier_layer(target, copier), "copier")]


def image_config(arch: str, diff_ids: Sequence[str]) -> bytes:
    """The image config (JSON bytes): Linux on `arch`, user 65532, the copier as entrypoint when present."""
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {"User": USER, "WorkingDir": "/", "Entrypoint": [f"/{COPIER}"]},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
    }
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


def descriptor(media_type: str, digest: str, size: int, kind: str | None = None) -> dict[str, object]:
    """An OCI descriptor; `kind` is recorded as the layer annotation (copier, engine or fallback)."""
    entry: dict[str, object] = {"mediaType": media_type, "digest": digest, "size": size}
    if kind:
        entry["annotations"] = {LAYER_ANNOTATION: kind}
    return entry


def image_manifest(config: bytes, layers: Sequence[dict[str, object]], annotations: dict[str, str]) -> bytes:
    """The image manifest (JSON bytes) for `config` and `layers` (descriptors), with `annotations`."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": descriptor(CONFIG_MEDIA_TYPE, "sha256:" + hashlib.sha256(config).hexdigest(), len(config)),
        "layers": list(layers),
        "annotations": dict(annotations),
    }
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
