"""Push and pull engine artifacts to an OCI registry with ORAS, addressed by digest.

A reference is `host[:port]/repository[:tag|@sha256:...]`. Registries on loopback addresses,
and those listed in EDGEMODEL_INSECURE_REGISTRIES (comma-separated host:port), are reached over
plain HTTP, as container runtimes do for local registries; every other one needs TLS.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import ipaddress
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemodel_runtime.build import engineimage
from edgemodel_runtime.build.errors import BadInputError, InfrastructureError
from edgemodel_runtime.digests import sha256_file

ARTIFACT_TYPE = "application/vnd.edgemodel.engine.v1"
CACHE_KEY_ANNOTATION = "dev.edgemodel.cache-key"
MODEL_ANNOTATION = "dev.edgemodel.model"  # which file of a multi-file artifact is the ONNX model
AUTO_ANNOTATION = "dev.edgemodel.auto"  # precision/engine auto: the choice and the compact table, as JSON
TITLE_ANNOTATION = "org.opencontainers.image.title"


@dataclass(frozen=True)
class Reference:
    """A parsed OCI reference."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def with_tag(self, tag: str) -> str:
        return f"{self.name}:{tag}"

    def with_digest(self, digest: str) -> str:
        return f"{self.name}@{digest}"

    def __str__(self) -> str:
        if self.digest:
            return self.with_digest(self.digest)
        return self.with_tag(self.tag or "latest")


def parse_reference(text: str) -> Reference:
    """Parse `host/repo[:tag][@digest]` (an `oci://` prefix is allowed)."""
    text = text.removeprefix("oci://")
    registry, slash, remainder = text.partition("/")
    if not slash or not remainder or ("." not in registry and ":" not in registry and registry != "localhost"):
        raise BadInputError(f"{text!r} is not an OCI reference (host[:port]/repository[:tag])", reason="InvalidURI")
    digest = None
    if "@" in remainder:
        remainder, digest = remainder.split("@", 1)
    tag = None
    if ":" in remainder.rsplit("/", 1)[-1]:
        remainder, tag = remainder.rsplit(":", 1)
    return Reference(registry=registry, repository=remainder, tag=tag, digest=digest)


def _insecure(registry: str) -> bool:
    host = registry.rsplit(":", 1)[0].strip("[]")
    allowed = {entry.strip() for entry in os.environ.get("EDGEMODEL_INSECURE_REGISTRIES", "").split(",") if entry}
    if registry in allowed or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _attempts() -> int:
    try:
        return max(1, int(os.environ.get("EDGEMODEL_REGISTRY_ATTEMPTS", "4")))
    except ValueError:
        return 4


# Blobs over CHUNKED_ABOVE bytes are pushed in chunks of CHUNK_BYTES (the OCI distribution spec's chunked
# upload), so that memory stays bounded whatever the engine's size.
CHUNKED_ABOVE = 64 * 1024 * 1024
CHUNK_BYTES = 16 * 1024 * 1024
# Seconds to connect, and to wait for each read of an answer (not the whole transfer), per request.
REQUEST_TIMEOUT = (10.0, 120.0)


def _client(registry: str) -> Any:
    """An ORAS client whose requests follow our retry policy: a few attempts, short backoff, each one logged."""
    import sys
    import time
    import types

    import oras.client
    import oras.provider
    import requests

    client = oras.client.OrasClient(hostname=registry, insecure=_insecure(registry))
    single_request = oras.provider.Registry.do_request.__wrapped__  # ORAS's own retry waits minutes
    attempts = _attempts()

    def do_request(self: Any, *args: Any, **kwargs: Any) -> Any:
        for attempt in range(1, attempts + 1):
            try:
                response = single_request(self, *args, **kwargs)
                if response.status_code < 500:
                    return response
                problem: object = f"HTTP {response.status_code}"
            except requests.exceptions.RequestException as error:
                problem = error
                if attempt == attempts:
                    raise
            if attempt == attempts:
                return response
            print(f"registry {registry}: attempt {attempt} of {attempts} failed ({problem}); retrying", file=sys.stderr)
            time.sleep(min(8.0, 0.5 * 2**attempt))
        raise AssertionError("unreachable")

    client.do_request = types.MethodType(do_request, client)
    session_request = client.session.request

    def bounded(method: str, url: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", REQUEST_TIMEOUT)  # ORAS sets none: a registry that never answers hangs
        return session_request(method, url, **kwargs)

    client.session.request = bounded
    return client


@contextlib.contextmanager
def _registry_errors(action: str, reference: str) -> Iterator[None]:
    import requests

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    except requests.exceptions.RequestException as error:
        raise InfrastructureError(
            f"{action} {reference}: registry unreachable: {error}", reason="RegistryError"
        ) from error
    except ValueError as error:
        raise InfrastructureError(f"{action} {reference}: {error}", reason="RegistryError") from error


MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
)


def _safe_title(title: str) -> bool:
    parts = Path(title).parts
    return bool(title) and not any(c in title for c in "\\\0") and not Path(title).is_absolute() and ".." not in parts


def _manifest(client: Any, parsed: Reference) -> dict[str, Any]:
    """The manifest, checked against the reference's digest when it has one (registries are not trusted)."""
    container = client.get_container(str(parsed))
    response = client.do_request(
        f"{client.prefix}://{container.manifest_url()}", "GET", headers={"Accept": MANIFEST_MEDIA_TYPES}
    )
    if response.status_code != 200:
        raise InfrastructureError(f"pull {parsed}: manifest: HTTP {response.status_code}", reason="RegistryError")
    if parsed.digest is not None:
        actual = "sha256:" + hashlib.sha256(response.content).hexdigest()
        if actual != parsed.digest:
            raise BadInputError(
                f"oci://{parsed}: the registry returned a manifest with digest {actual}; the file was not used",
                reason="DigestMismatch",
            )
    try:
        manifest: dict[str, Any] = json.loads(response.content)
    except ValueError as error:
        raise InfrastructureError(f"pull {parsed}: the manifest is not JSON", reason="RegistryError") from error
    return manifest


@dataclass(frozen=True)
class Pulled:
    """An artifact's files in a new temporary directory, and its manifest's annotations."""

    directory: Path
    files: list[Path]
    annotations: dict[str, str]


def pull_files(reference: str) -> list[Path]:
    """Pull every file of an artifact into a new temporary directory (see `pull_artifact`)."""
    return pull_artifact(reference).files


def pull_artifact(reference: str) -> Pulled:
    """Pull every file of an artifact into a new temporary directory, each checked against its layer digest.

    Layers are named by their `org.opencontainers.image.title` annotation (a relative path); a layer
    without one, a directory layer, or a file whose SHA-256 differs from its layer digest is refused.
    """
    parsed = parse_reference(reference)
    outdir = Path(tempfile.mkdtemp(prefix="edgemodel-pull-"))
    files: list[Path] = []
    try:
        with _registry_errors("pull", reference):
            manifest = _pull_layers(parsed, reference, outdir, files)
    except BaseException:
        shutil.rmtree(outdir, ignore_errors=True)
        raise
    annotations = {str(k): str(v) for k, v in (manifest.get("annotations") or {}).items()}
    return Pulled(outdir, files, annotations)


def _pull_layers(parsed: Reference, reference: str, outdir: Path, files: list[Path]) -> dict[str, Any]:
    """Download each layer of the manifest into `outdir` (appending to `files`); return the manifest."""
    client = _client(parsed.registry)
    manifest = _manifest(client, parsed)
    slices: dict[str, int] = {}  # a sliced engine file's name: how many of its slices are joined so far
    for layer in manifest.get("layers", []):
        kind = (layer.get("annotations") or {}).get(engineimage.LAYER_ANNOTATION)
        if kind is not None:  # an engine pushed as an image (see engineimage): its files are in tar layers
            if kind in {engineimage.ENGINE_DIR, engineimage.ENGINE_DIR + engineimage.SLICE_KIND}:
                files += _engine_files(client, parsed, reference, layer, outdir, slices=slices)
            continue
        title = str((layer.get("annotations") or {}).get(TITLE_ANNOTATION, ""))
        digest = str(layer.get("digest", ""))
        if (
            not _safe_title(title)
            or not digest.startswith("sha256:")
            or layer.get("mediaType", "").endswith("tar+gzip")
        ):
            raise BadInputError(
                f"oci://{reference}: layer {digest or '?'} is not a plain file with a relative title "
                f"({title!r}); push files with `oras push`, one layer per file",
                reason="InvalidArtifact",
            )
        target = outdir / title
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_blob(str(parsed), digest, str(target))
        actual = "sha256:" + sha256_file(target)
        if actual != digest:
            raise BadInputError(
                f"oci://{reference}: {title} has digest {actual}, but its layer says {digest}; not used",
                reason="DigestMismatch",
            )
        files.append(target)
    return manifest


def _engine_files(
    client: Any, parsed: Reference, reference: str, layer: dict[str, Any], outdir: Path, *, slices: dict[str, int]
) -> list[Path]:
    """Download a layer of an engine image's engine files, check its digest, and unpack it into `outdir`;
    the files it adds.

    The engine layer gives regular files directly under engine/; a slice layer gives the next slice of one
    file, slices/engine/<name>/<NNNN>, which is appended to it (`slices` counts each file's slices so far).
    A link, a device, an absolute or `..` name, a slice out of order or a file named twice is refused.
    """
    digest = str(layer.get("digest", ""))
    blob = outdir / ".engine-layer.tar"
    client.download_blob(str(parsed), digest, str(blob))
    actual = "sha256:" + sha256_file(blob)
    if actual != digest:
        raise BadInputError(
            f"oci://{reference}: the engine layer has digest {actual}, but the manifest says {digest}; not used",
            reason="DigestMismatch",
        )
    files: list[Path] = []
    try:
        with tarfile.open(blob, "r:") as tar:
            for member in tar:
                if member.isdir() and _engine_directory(member.name):
                    continue
                name, index, sliced = _engine_member(member, reference)
                source = tar.extractfile(member)
                if source is None:
                    raise BadInputError(f"oci://{reference}: {member.name} cannot be read", reason="InvalidArtifact")
                target = outdir / name
                if index != slices.get(name, 0) or (index == 0 and target.exists()):
                    raise BadInputError(
                        f"oci://{reference}: {member.name} is out of order or names {name} twice; not used",
                        reason="InvalidArtifact",
                    )
                with source, target.open("ab" if index else "xb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
                if sliced:
                    slices[name] = index + 1
                files += [] if index else [target]
    except tarfile.TarError as error:
        raise BadInputError(
            f"oci://{reference}: the engine layer is not a tar: {error}", reason="InvalidArtifact"
        ) from error
    finally:
        blob.unlink(missing_ok=True)
    return files


def _engine_directory(name: str) -> bool:
    """Whether `name` is one of the directories an engine layer or an engine slice layer may hold."""
    parts = Path(name).parts
    slices = (engineimage.SLICES_DIR, engineimage.ENGINE_DIR)
    return (
        parts == (engineimage.ENGINE_DIR,)
        or parts in {slices[:1], slices}
        or (len(parts) == 3 and parts[:2] == slices and _safe_title(parts[2]))
    )


def _engine_member(member: tarfile.TarInfo, reference: str) -> tuple[str, int, bool]:
    """(file name, slice index: 0 for a whole file, whether a slice) of a regular file engine/<name> or
    slices/engine/<name>/<NNNN>; BadInputError for anything else."""
    parts = Path(member.name).parts
    if member.isfile() and len(parts) == 2 and parts[0] == engineimage.ENGINE_DIR and _safe_title(parts[1]):
        return parts[1], 0, False
    if (
        member.isfile()
        and len(parts) == 4
        and parts[:2] == (engineimage.SLICES_DIR, engineimage.ENGINE_DIR)
        and _safe_title(parts[2])
        and re.fullmatch(r"[0-9]{4}", parts[3])
    ):
        return parts[2], int(parts[3]), True
    raise BadInputError(
        f"oci://{reference}: the engine layer holds {member.name!r}, which is not a plain file "
        f"in {engineimage.ENGINE_DIR}/; not used",
        reason="InvalidArtifact",
    )


def pull_single_file(reference: str) -> Path:
    """Pull an artifact with exactly one file into a new temporary directory; return that file."""
    files = pull_files(reference)
    if len(files) != 1:
        raise BadInputError(
            f"oci://{reference} holds {len(files)} files; expected exactly one", reason="InvalidArtifact"
        )
    return Path(files[0])


def find_by_tag(reference: Reference, tag: str) -> str | None:
    """The manifest digest tagged `tag` in the repository, or None when there is none."""
    import requests

    client = _client(reference.registry)
    target = reference.with_tag(tag)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            response = client.do_request(
                f"{client.prefix}://{reference.registry}/v2/{reference.repository}/manifests/{tag}",
                "HEAD",
                headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
            )
    except requests.exceptions.RequestException as error:
        raise InfrastructureError(f"look up {target}: registry unreachable: {error}", reason="RegistryError") from error
    if response.status_code == 404:
        return None
    if response.status_code != 200:
        raise InfrastructureError(f"look up {target}: HTTP {response.status_code}", reason="RegistryError")
    digest: str = response.headers["Docker-Content-Digest"]
    return digest


def manifest_annotations(reference: Reference, digest: str) -> dict[str, str]:
    """The annotations of the manifest with `digest` in the repository (checked against the digest)."""
    parsed = Reference(reference.registry, reference.repository, digest=digest)
    with _registry_errors("read", str(parsed)):
        manifest = _manifest(_client(reference.registry), parsed)
    return {str(k): str(v) for k, v in (manifest.get("annotations") or {}).items()}


def parts_of(annotations: dict[str, str]) -> list[str]:
    """The part images' digests an engine image's annotations name (see engineimage), in pull order; only
    well-formed `sha256:` digests."""
    listed = [entry.strip() for entry in annotations.get(engineimage.PARTS_ANNOTATION, "").split(",")]
    return [entry for entry in listed if re.fullmatch(r"sha256:[0-9a-f]{64}", entry)]


def is_engine_image(reference: Reference, digest: str) -> bool:
    """Whether the manifest `digest` in the repository is an engine image (see engineimage), which nodes can pull."""
    with _registry_errors("look up", reference.with_digest(digest)):
        manifest = _manifest(_client(reference.registry), parse_reference(reference.with_digest(digest)))
    layers = manifest.get("layers") or []
    return any(engineimage.LAYER_ANNOTATION in (layer.get("annotations") or {}) for layer in layers)


def push(reference: Reference, files: Sequence[Path], tag: str, annotations: dict[str, str]) -> str:
    """Push files as one artifact tagged `tag`; return the manifest digest (`sha256:...`)."""
    target = reference.with_tag(tag)
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "config.json"
        config.write_text(json.dumps({"artifactType": ARTIFACT_TYPE, **annotations}, sort_keys=True))
        with _registry_errors("push", target):
            response = _client(reference.registry).push(
                target=target,
                files=[str(path) for path in files],  # each layer is titled with the file's base name
                manifest_config=f"{config}:{ARTIFACT_TYPE}.config+json",
                manifest_annotations=annotations,
                disable_path_validation=True,
                quiet=True,
            )
    if response.status_code not in {200, 201}:
        raise InfrastructureError(f"push {target}: HTTP {response.status_code}", reason="RegistryError")
    digest: str = response.headers["Docker-Content-Digest"]
    return digest


@dataclass(frozen=True)
class PushedEngine:
    """An engine image pushed: its manifest digest, and its part images' (see engineimage), in pull order."""

    digest: str
    parts: tuple[str, ...] = ()


def push_engine(
    reference: Reference,
    files: Sequence[Path],
    tag: str,
    annotations: dict[str, str],
    fallback: Sequence[Path] = (),
) -> PushedEngine:
    """Push an engine's files as one image tagged `tag` (see engineimage), after its part images if it is
    over engineimage.SLICE_BYTES (tagged `tag`-partNN); return their digests.

    `pull_artifact` reads it back as files; a kubelet runs it as an image. The copier layer is left out
    when this machine has no static busybox (`engineimage.find_copier`), and then there are no parts (a
    node cannot run them). `fallback`, when given, is the original model followed by its external-data
    files: they become the image's fallback layer.
    """
    target = reference.with_tag(tag)
    copier = engineimage.find_copier()
    with tempfile.TemporaryDirectory() as scratch:
        layers = engineimage.copier_layers(Path(scratch), copier)
        if fallback:  # below the engine: the layers up to it are the same for every engine of the model
            layers += engineimage.fallback_layers(Path(scratch), fallback[0], fallback[1:])
        layers += engineimage.engine_layers(Path(scratch), files)
        descriptors = [
            engineimage.descriptor(engineimage.LAYER_MEDIA_TYPE, layer.digest, layer.size, layer.kind)
            for layer in layers
        ]
        arch = engineimage.architecture()
        with _registry_errors("push", target):
            client = _client(reference.registry)
            container = client.get_container(target)
            for layer in layers:
                _upload(client, container, target, layer.path, layer.digest)
            parts = tuple(
                _push_parts(client, container, target, tag, descriptors, arch=arch) if copier is not None else []
            )
            if parts:
                annotations = {**annotations, engineimage.PARTS_ANNOTATION: ",".join(parts)}
            digest = _push_image(client, container, target, tag, descriptors, arch=arch, annotations=annotations)
    return PushedEngine(digest, parts)


def _push_parts(
    client: Any, container: Any, target: str, tag: str, descriptors: Sequence[dict[str, Any]], *, arch: str
) -> list[str]:
    """Push the part images of an image of `descriptors` (its layers, uploaded), tagged `tag`-partNN; their
    digests, in pull order (see engineimage.part_ends)."""
    ends = engineimage.part_ends([(str(d["annotations"][engineimage.LAYER_ANNOTATION]), int(d["size"]))
                                  for d in descriptors])  # fmt: skip
    return [
        _push_image(
            client,
            container,
            target,
            f"{tag}-part{number:02d}",
            descriptors[:end],
            arch=arch,
            annotations={engineimage.PART_ANNOTATION: f"{number} of {len(ends)}"},
        )
        for number, end in enumerate(ends, start=1)
    ]


def cached_parts(reference: Reference, digest: str, tag: str, annotations: dict[str, str]) -> list[str]:
    """The part images of the engine image `digest` in the repository (see engineimage), whose manifest has
    `annotations`, each one in the registry: those its annotation names, pushed again from its layers when
    the registry lost some (a tag retention policy that counts the `-partNN` tags, a garbage collection).
    Only those the engine image names, and none when they cannot all be made again (an image pushed by
    another version)."""
    listed = parts_of(annotations)
    if not listed:
        return []
    target = reference.with_digest(digest)
    with _registry_errors("look up", target):
        client = _client(reference.registry)
        missing = [part for part in listed if not _has_manifest(client, reference, part)]
        if not missing:
            return listed
        manifest = _manifest(client, parse_reference(target))
        container = client.get_container(reference.with_tag(tag))
        config = json.loads(_blob(client, reference, str(manifest["config"]["digest"])))
        descriptors = manifest.get("layers") or []
        if any(engineimage.LAYER_ANNOTATION not in (d.get("annotations") or {}) for d in descriptors):
            return []
        made = _push_parts(client, container, target, tag, descriptors, arch=str(config.get("architecture")))
    print(f"{len(missing)} of the {len(listed)} part images of {target} were missing: pushed again", file=sys.stderr)
    return listed if made == listed else []


def _has_manifest(client: Any, reference: Reference, digest: str) -> bool:
    url = f"{client.prefix}://{reference.registry}/v2/{reference.repository}/manifests/{digest}"
    response = client.do_request(url, "HEAD", headers={"Accept": MANIFEST_MEDIA_TYPES})
    if response.status_code not in {200, 404}:
        raise InfrastructureError(f"look up {reference.with_digest(digest)}: HTTP {response.status_code}",
                                  reason="RegistryError")  # fmt: skip
    return bool(response.status_code == 200)


def _blob(client: Any, reference: Reference, digest: str) -> bytes:
    """A small blob (a config), checked against its digest."""
    url = f"{client.prefix}://{reference.registry}/v2/{reference.repository}/blobs/{digest}"
    response = client.do_request(url, "GET")
    if response.status_code != 200 or "sha256:" + hashlib.sha256(response.content).hexdigest() != digest:
        raise InfrastructureError(f"read {reference.with_digest(digest)}: HTTP {response.status_code}",
                                  reason="RegistryError")  # fmt: skip
    data: bytes = response.content
    return data


def _upload(client: Any, container: Any, target: str, path: Path, digest: str) -> None:
    """Upload one blob, unless the registry has it. A large one goes up in chunks (POST, PATCH per chunk,
    PUT), so that pushing a large engine or model never holds it in memory whole, as ORAS's single PUT does."""
    size = path.stat().st_size
    entry = engineimage.descriptor(engineimage.LAYER_MEDIA_TYPE, digest, size)
    chunked = size > CHUNKED_ABOVE
    response = client.upload_blob(str(path), container, entry, do_chunked=chunked, chunk_size=CHUNK_BYTES)
    if response.status_code not in {200, 201, 202}:
        raise InfrastructureError(f"push {target}: blob: HTTP {response.status_code}", reason="RegistryError")


def _push_image(
    client: Any,
    container: Any,
    target: str,
    tag: str,
    descriptors: Sequence[dict[str, Any]],
    *,
    arch: str,
    annotations: dict[str, str],
) -> str:
    """Push the config and manifest of an image for `arch` of the layers `descriptors` (already uploaded),
    tagged `tag`; its digest."""
    config = engineimage.image_config(arch, [str(d["digest"]) for d in descriptors])
    manifest = engineimage.image_manifest(config, descriptors, annotations)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "config.json"
        path.write_bytes(config)
        _upload(client, container, target, path, "sha256:" + hashlib.sha256(config).hexdigest())
    url = f"{client.prefix}://{container.manifest_url(tag)}"
    response = client.do_request(url, "PUT", headers={"Content-Type": engineimage.MANIFEST_MEDIA_TYPE}, data=manifest)
    if response.status_code not in {200, 201}:
        raise InfrastructureError(f"push {target}: HTTP {response.status_code}", reason="RegistryError")
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    if response.headers.get("Docker-Content-Digest", digest) != digest:
        raise InfrastructureError(
            f"push {target}: the registry stored the manifest as {response.headers['Docker-Content-Digest']}, "
            f"not {digest}",
            reason="RegistryError",
        )
    return digest
