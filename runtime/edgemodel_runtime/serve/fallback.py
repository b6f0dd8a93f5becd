"""Fallback instead of failure: serve the original model when the engine cannot be loaded.

A server given `--fallback-model URI --fallback-sha256 HEX` that cannot load its engine because the
engine itself cannot be served here (an incompatible TensorRT plan, a missing accelerator or
execution provider, a corrupt or truncated file, an OpenVINO archive the plugin cannot compile, a
digest that does not match: every `ArtifactError` with exit code 2) fetches the original ONNX model
(verified by its SHA-256), loads it on ONNX Runtime FP32 with the CPU execution provider only, and
serves that instead. The fallback is reported: one line on stderr, the gauge
`edgemodel_engine_fallback{model, revision, reason}` = 1, and an `edgemodel` field in the model's
metadata and readiness bodies (see `FallbackState.detail`). Infrastructure failures (exit code 4: the
registry or the disk) are not engine faults and fall back to nothing: the caller reports them as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgemodel_runtime.serve.model import (
    BAD_ARTIFACT,
    INFRASTRUCTURE,
    Artifact,
    ArtifactError,
    Model,
    OnnxRuntimeModel,
    load,
    resolve,
)

FALLBACK_PLATFORM = "onnxruntime_onnx"
MESSAGE_LIMIT = 512  # characters of the load failure kept in the readiness detail


@dataclass(frozen=True)
class FallbackSource:
    """Where the known-good fallback comes from: the EdgeModel's own model, pinned by digest."""

    uri: str
    sha256: str


@dataclass(frozen=True)
class FallbackState:
    """Why the server serves the fallback: the engine's load failure, as its reason word and message."""

    reason: str  # CamelCase, from the ArtifactError (e.g. InvalidModel, DigestMismatch, TensorRTUnavailable)
    message: str  # one line, at most MESSAGE_LIMIT characters
    model_sha256: str

    def detail(self) -> dict[str, str]:
        """The `edgemodel` field added to the model metadata and readiness bodies while falling back."""
        return {
            "engine": "fallback",
            "fallbackReason": self.reason,
            "fallbackMessage": self.message,
            "fallbackModel": f"sha256:{self.model_sha256}",
            "fallbackPlatform": FALLBACK_PLATFORM,
        }


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _fetch_fallback(source: FallbackSource, cache: Path) -> Path:
    """The original model in the artifact cache (fetched once, verified by digest on every start)."""
    from edgemodel_runtime.build import fetch
    from edgemodel_runtime.build.errors import BuildError
    from edgemodel_runtime.digests import sha256_file

    try:
        digest = fetch.check_digest(source.sha256)
    except BuildError as error:
        raise ArtifactError(f"--fallback-sha256: {error}", reason="InvalidFallback") from error
    path = cache / f"fallback-{digest[:16]}" / "model.onnx"
    if path.is_file() and sha256_file(path) == digest:
        _check_side_files(path)
        return path
    try:
        return fetch.fetch(source.uri, digest, path)
    except BuildError as error:
        raise ArtifactError(
            f"cannot fetch the fallback model {source.uri}: {error}",
            reason=error.reason,
            exit_code=int(error.exit_code),
        ) from error
    except OSError as error:
        raise ArtifactError(
            f"cannot keep the fallback model in {path.parent}: {error}", reason="DiskError", exit_code=INFRASTRUCTURE
        ) from error


def _check_side_files(model: Path) -> None:
    """Check the external-data files a verified fallback model reads against the digests listed beside it
    (`fallback.json`, written with the engine image's fallback layer). Raises ArtifactError (DigestMismatch)
    for a side file that is missing, unlisted or changed: the model would load with other weights."""
    from edgemodel_runtime.build import modelcheck
    from edgemodel_runtime.build.engineimage import FALLBACK_DIGESTS
    from edgemodel_runtime.build.errors import BuildError
    from edgemodel_runtime.digests import sha256_file

    try:
        locations = modelcheck.inspect(model).external_data
    except BuildError as error:
        raise ArtifactError(f"the fallback model {model}: {error}", reason=error.reason) from error
    if not locations:
        return
    listing = model.parent / FALLBACK_DIGESTS
    try:
        digests = json.loads(listing.read_text())
    except (OSError, ValueError) as error:
        raise ArtifactError(
            f"the fallback model {model} reads {len(locations)} external-data file(s), but {listing} cannot be "
            f"read to check them: {error}",
            reason="DigestMismatch",
        ) from error
    for location in locations:
        side = model.parent / location
        expected = digests.get(location) if isinstance(digests, dict) else None
        if expected is None or not side.is_file() or sha256_file(side) != expected:
            raise ArtifactError(
                f"the fallback model's external-data file {side} is missing or does not match its digest in "
                f"{listing}; not loaded",
                reason="DigestMismatch",
            )


def load_fallback(source: FallbackSource, cache: Path, threads: int | None) -> Model:
    """The original model on ONNX Runtime FP32, CPU execution provider only (what every node can run)."""
    return OnnxRuntimeModel(_fetch_fallback(source, cache), threads, cpu_only=True)


def load_engine(
    location: str, cache: Path, threads: int | None, fallback: FallbackSource | None
) -> tuple[Artifact | None, Model, FallbackState | None]:
    """The engine named by `location`, or the fallback when the engine cannot be served here.

    Returns (artifact, model, None) when the engine loaded; (artifact or None, fallback model, state)
    when it could not and the fallback did. Raises the engine's ArtifactError when there is no
    fallback, when the failure is not the engine's (exit code 4), or when the fallback cannot be
    loaded either (its message then names both failures).
    """
    artifact: Artifact | None = None
    try:
        artifact = resolve(location, cache)
        return artifact, load(artifact, threads), None
    except ArtifactError as error:
        if fallback is None or error.exit_code != BAD_ARTIFACT:
            raise
        failure = error
    try:
        model = load_fallback(fallback, cache, threads)
    except ArtifactError as error:
        raise ArtifactError(
            f"{one_line(failure)}; and the fallback could not be loaded either: {error.reason}: {one_line(error)}",
            reason=failure.reason,
            exit_code=error.exit_code if error.exit_code == INFRASTRUCTURE else failure.exit_code,
        ) from error
    message = one_line(failure)
    if len(message) > MESSAGE_LIMIT:
        message = message[: MESSAGE_LIMIT - 1] + "…"
    return artifact, model, FallbackState(failure.reason, message, fallback.sha256.lower())
