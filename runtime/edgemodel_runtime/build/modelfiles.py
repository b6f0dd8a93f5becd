"""A model file and the external-data files that hold its weights, fetched and verified together.

ONNX keeps weights outside the .onnx file (`onnx.save_model(..., save_as_external_data=True)`,
required above 2 GiB) in side files named, relative to the model, by each tensor's `location`.
How each side file is verified before anything reads it:

- local path: the .onnx must match `--sha256`; each side file next to it is hashed when the build
  starts (the digests go into the cache key and the report) and checked again after it is copied.
- `oci://` artifact: the .onnx must match `--sha256`; every other file must match its layer digest,
  and the manifest must match the digest in the reference. A model with side files must therefore be
  referenced by digest (`oci://registry/repo@sha256:...`), which pins every layer; a tag could be moved
  to other weights behind an unchanged .onnx.
- `https://`: one URI names one file, so side files cannot be fetched or verified; refused with a
  message saying what to do instead.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemodel_runtime.build import fetch, modelcheck
from edgemodel_runtime.build.errors import BadInputError
from edgemodel_runtime.digests import sha256_file

HTTPS_MODEL_NAME = "model.onnx"


@dataclass(frozen=True)
class ModelFiles:
    """A verified model at `path`, its side files next to it, and their SHA-256 by location."""

    path: Path
    facts: modelcheck.ModelFacts
    data: dict[str, str]


def identity(uri: str, sha256: str, *, allow_local: bool) -> dict[str, Any]:
    """What pins a model's weights beyond its own digest, for the cache key (no network access).

    `{"artifact": "sha256:..."}` for an OCI reference by digest, `{"externalData": {location: sha256}}`
    for a local model with side files, `{}` otherwise. A local model that does not match its digest or
    does not parse gives `{}`: the build's fetch step then refuses it with the reason.
    """
    source = fetch.parse_source(uri, allow_local=allow_local)
    if source.kind == "oci":
        from edgemodel_runtime.build import oci

        digest = oci.parse_reference(source.location).digest
        return {"artifact": digest} if digest else {}
    if source.kind != "path":
        return {}
    path = Path(source.location)
    try:
        if not path.is_file() or sha256_file(path) != fetch.check_digest(sha256):
            return {}
        locations = modelcheck.inspect(path).external_data
    except (BadInputError, OSError):
        return {}
    data = {loc: sha256_file(path.parent / loc) if (path.parent / loc).is_file() else "missing" for loc in locations}
    return {"externalData": data} if data else {}


def fetch_model(
    uri: str, sha256: str, directory: Path, *, allow_local: bool, expected_data: dict[str, str] | None = None
) -> ModelFiles:
    """Fetch the model (and its side files) into `directory`, verifying every file before it is parsed.

    `expected_data` are side-file digests taken earlier (see `identity`); a local file that changed
    since is refused. Raises BadInputError: DigestMismatch, InvalidModel, ExternalDataMissing,
    ExternalDataOverHttps, UnpinnedArtifact, InvalidArtifact; InfrastructureError on network faults.
    """
    source = fetch.parse_source(uri, allow_local=allow_local)
    directory.mkdir(parents=True, exist_ok=True)
    if source.kind == "oci":
        return _from_oci(source.location, sha256, directory)
    name = Path(source.location).name if source.kind == "path" else HTTPS_MODEL_NAME
    target = fetch.fetch(uri, sha256, directory / name, allow_local=allow_local)
    facts = modelcheck.inspect(target)
    _check_locations(facts, target.name)
    if not facts.external_data:
        return ModelFiles(target, facts, {})
    if source.kind == "https":
        raise BadInputError(
            f"{uri} keeps its weights in {len(facts.external_data)} external-data file(s) "
            f"({', '.join(facts.external_data)}), which an https:// URI to the one .onnx file cannot fetch or "
            "verify. Push the model and its data files as one OCI artifact (`oras push REGISTRY/REPO:TAG "
            f"{name} {' '.join(facts.external_data)}`) and build from oci://REGISTRY/REPO@sha256:<manifest digest>, "
            "or re-save the model with its weights inside (onnx.save_model(model, path), under 2 GiB)",
            reason="ExternalDataOverHttps",
        )
    base = Path(source.location).parent
    data = {}
    for location in facts.external_data:
        origin = base / location
        if not origin.is_file():
            raise _missing(name, location, f"{origin} does not exist; keep the data files next to the model")
        data[location] = _copy_verified(origin, directory / location, (expected_data or {}).get(location))
    return ModelFiles(target, facts, data)


def _check_locations(facts: modelcheck.ModelFacts, model_name: str) -> None:
    if model_name in facts.external_data:
        raise BadInputError(f"{model_name} names itself as its external data", reason="InvalidModel")


def _missing(model: str, location: str, why: str) -> BadInputError:
    return BadInputError(f"{model} keeps weights in {location!r}, but {why}", reason="ExternalDataMissing")


def _copy_verified(origin: Path, target: Path, expected: str | None) -> str:
    digest = sha256_file(origin)
    if expected is not None and digest != expected:
        raise BadInputError(
            f"{origin} changed while the build ran (sha256 {expected}, now {digest}); not used",
            reason="DigestMismatch",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(origin, target)
    copied = sha256_file(target)
    if copied != digest:
        raise BadInputError(
            f"{origin}: the copy differs from the file (sha256 {copied} != {digest})", reason="DigestMismatch"
        )
    return digest


def _select_model(files: dict[str, Path], annotations: dict[str, str], reference: str) -> str:
    from edgemodel_runtime.build import oci

    named = annotations.get(oci.MODEL_ANNOTATION)
    if named is not None:
        if named not in files:
            raise BadInputError(
                f"oci://{reference}: annotation {oci.MODEL_ANNOTATION}={named!r} names no file of the artifact "
                f"(it holds {sorted(files)})",
                reason="InvalidArtifact",
            )
        return named
    candidates = list(files) if len(files) == 1 else [f for f in files if f.endswith(".onnx")]
    if len(candidates) != 1:
        raise BadInputError(
            f"oci://{reference} holds {sorted(files)}: cannot tell which is the model; push exactly one .onnx "
            f"file, or annotate the manifest with {oci.MODEL_ANNOTATION}=<file>",
            reason="InvalidArtifact",
        )
    return candidates[0]


def _from_oci(reference: str, sha256: str, directory: Path) -> ModelFiles:
    from edgemodel_runtime.build import oci

    pulled = oci.pull_artifact(reference)
    try:
        files = {path.relative_to(pulled.directory).as_posix(): path for path in pulled.files}
        name = _select_model(files, pulled.annotations, reference)
        fetch.verify_digest(sha256_file(files[name]), fetch.check_digest(sha256), f"oci://{reference} {name}")
        facts = modelcheck.inspect(files[name])
        _check_locations(facts, name)
        if facts.external_data and oci.parse_reference(reference).digest is None:
            raise BadInputError(
                f"oci://{reference}: the model keeps weights in {', '.join(facts.external_data)}; reference the "
                "artifact by its manifest digest (oci://REGISTRY/REPO@sha256:...) so that every data file is pinned, "
                "not only the .onnx that --sha256 covers",
                reason="UnpinnedArtifact",
            )
        missing = [location for location in facts.external_data if location not in files]
        if missing:
            raise _missing(name, missing[0], f"the artifact holds only {sorted(files)}")
        data = {}
        for relative in [name, *facts.external_data]:
            target = directory / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(files[relative]), target)
            if relative != name:
                data[relative] = sha256_file(target)
        return ModelFiles(directory / name, facts, data)
    finally:
        shutil.rmtree(pulled.directory, ignore_errors=True)
