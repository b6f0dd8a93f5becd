"""Build failures, one kind per exit code, so a Job's exit status says whose fault it was."""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    """Exit codes of `edgemodel build`."""

    OK = 0
    BAD_INPUT = 2  # the model, a digest, a URI or an option is wrong: retrying will not help
    VALIDATION_FAILED = 3  # the engine was built but missed a tolerance or the latency budget
    INFRASTRUCTURE = 4  # network, registry, disk, a missing engine library (retrying may help), or a bug


class BuildError(Exception):
    """Base of every build failure; `reason` is a CamelCase word the operator shows in conditions."""

    exit_code = ExitCode.INFRASTRUCTURE
    reason = "BuildFailed"

    def __init__(self, message: str, *, reason: str | None = None, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.details = details or {}


class BadInputError(BuildError):
    """The inputs cannot make an engine: bad URI, digest mismatch, unreadable model, bad option."""

    exit_code = ExitCode.BAD_INPUT
    reason = "BadInput"


class ValidationFailedError(BuildError):
    """The engine's outputs or latency missed what the spec asks for."""

    exit_code = ExitCode.VALIDATION_FAILED
    reason = "ValidationFailed"


class InfrastructureError(BuildError):
    """Something around the build failed: download, registry, disk, or an engine library is absent."""

    exit_code = ExitCode.INFRASTRUCTURE
    reason = "InfrastructureFailure"
