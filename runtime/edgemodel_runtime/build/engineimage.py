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
from pathlib import Path

from edgemodel_runtime.digests import sha256_file

ENGINE_DIR = "engine"  # where the engine's files lie in the image
FALLBACK_DIR = "fallback"  # where the original model lies in the image
FALLBACK_MODEL = "model.onnx"  # its name there (external-data files keep their own names beside it)
FALLBACK_DIGESTS = "fallback.json"  # beside it: {file name: SHA-256 hex} of the model and each side file
COPIER = "busybox"  # the copier's path in the image (`/busybox`)
LAYER_ANNOTATION = "dev.edgemodel.layer"  # `copier`, `engine` or `fallback`
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


def engine_layer(target: Path, files: Sequence[Path]) -> str:
    """The engine layer: each file as /engine/<base name>, mode 0444; its digest."""
    names = [file.name for file in files]
    if len(set(names)) != len(names):
        raise ValueError(f"two files of the engine have the same name: {sorted(names)}")
    return write_layer(target, [(f"{ENGINE_DIR}/{file.name}", file, 0o444) for file in files], ENGINE_DIR)


def fallback_layer(target: Path, model: Path, side_files: Sequence[Path] = ()) -> str:
    """The fallback layer: `model` as /fallback/model.onnx, each side file (external data) under its own
    name beside it, and /fallback/fallback.json ({file name: SHA-256 hex} of each of them, so that the
    server can check the side files too), mode 0444; its digest. Raises ValueError when a side file is
    named model.onnx or fallback.json, or two share a name."""
    names = [file.name for file in side_files]
    if {FALLBACK_MODEL, FALLBACK_DIGESTS} & set(names) or len(set(names)) != len(names):
        raise ValueError(f"the model's side files cannot be kept beside it as {FALLBACK_MODEL}: {sorted(names)}")
    digests = {FALLBACK_MODEL: sha256_file(model)} | {file.name: sha256_file(file) for file in side_files}
    listing = target.with_name(target.name + ".digests")
    listing.write_text(json.dumps(digests, sort_keys=True, separators=(",", ":")) + "\n")
    files = [(f"{FALLBACK_DIR}/{FALLBACK_MODEL}", model, 0o444), (f"{FALLBACK_DIR}/{FALLBACK_DIGESTS}", listing, 0o444)]
    files += [(f"{FALLBACK_DIR}/{file.name}", file, 0o444) for file in side_files]
    try:
        return write_layer(target, files, FALLBACK_DIR)
    finally:
        listing.unlink(missing_ok=True)


def copier_layer(target: Path, copier: Path) -> str:
    """The copier layer: `copier` as /busybox, mode 0555; its digest."""
    return write_layer(target, [(COPIER, copier, 0o555)])


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
