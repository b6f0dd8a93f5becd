"""What `precision: auto` and `engine: auto` choose from, and the choice itself.

A candidate is a name, an engine and a precision, a predicate that says whether it applies to this
request on this machine (`applies(request, facts) -> None`, or why not), and a builder that turns the
fp32 model into the candidate's artifact. The build tries every candidate that applies, validates each
against the fp32 ONNX Runtime reference, times the ones that pass side by side in one run, and keeps
the fastest (`choose`, pure). The registry's order is the order of preference: when two candidates
are within `TIE_FRACTION` of each other's median latency, the earlier one (more faithful, simpler to
serve) is kept, so that noise never trades fp32 for a lower precision that is not really faster.

New candidates (an accuracy-aware INT8 recipe, OpenVINO INT8 through NNCF) plug in as entries of
`REGISTRY`: a builder that returns an artifact the engine's `run_all`/`runner` can load.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemodel_runtime.build import compare, tensors
from edgemodel_runtime.build.errors import ValidationFailedError

if TYPE_CHECKING:
    from edgemodel_runtime.build.request import BuildRequest

AUTO = "auto"
TIE_FRACTION = 0.03
"""Candidates whose median latencies differ by less than this share count as equally fast."""

AUTO_TOLERANCE = compare.Tolerance(min_cosine=0.999, min_top1_agreement=0.99)
"""What every candidate of `precision: auto` must meet without spec.validation.tolerance, whatever its
precision: cosine 0.999 to fp32 on every sample, the same top-1 class on 99% of rows. No bound on single
values: a probability map's few pixels at text edges move by half their range in bf16 while the map (and
the mask it gives) stays the same; bound them with a tolerance, or the task metric with labels."""


@dataclass(frozen=True)
class Facts:
    """What the machine offers candidates: read once by the build (impure), passed to the pure predicates."""

    has_gpu: bool
    openvino: tuple[str, ...] | None  # OpenVINO's CPU OPTIMIZATION_CAPABILITIES; None when it is not installed
    tensorrt: bool  # whether the tensorrt package can be imported


@dataclass(frozen=True)
class Context:
    """What a candidate's builder gets: the request, the fetched fp32 model, its inputs and a scratch folder.

    `standard(engine, precision)` builds the engine the way a fixed `--engine/--precision` build does;
    `calibration()` loads the calibration samples (fetched and verified once); `samples`/`expected` are the
    reference inputs and the fp32 outputs every candidate is validated on; `tolerance` is what it must meet.
    """

    request: BuildRequest
    model: Path
    inputs: Sequence[tensors.TensorInfo]
    work: Path
    external: bool
    samples: Sequence[tensors.Sample]
    expected: Sequence[tensors.Sample]
    tolerance: compare.Tolerance
    standard: Callable[[str, str], Path]
    calibration: Callable[[], list[tensors.Sample]]


Applies = Callable[["BuildRequest", Facts], str | None]
Builder = Callable[[Context], Path]


@dataclass(frozen=True)
class Candidate:
    """One engine x precision (x recipe) that auto may choose."""

    name: str
    engine: str
    precision: str
    applies: Applies
    build: Builder


def _wants(request: BuildRequest, engine: str) -> str | None:
    if request.engine not in (AUTO, engine):
        return f"engine {request.engine} was asked for"
    return None


def _cpu(engine: str) -> Applies:
    def applies(request: BuildRequest, facts: Facts) -> str | None:
        return _wants(request, engine)

    return applies


def _openvino(precision: str, capability: str) -> Applies:
    def applies(request: BuildRequest, facts: Facts) -> str | None:
        if (why := _wants(request, "openvino")) is not None:
            return why
        if facts.openvino is None:
            return "the openvino package is not installed in this runtime"
        if capability not in facts.openvino:
            return f"this CPU lacks {capability} (OpenVINO capabilities: {', '.join(facts.openvino) or 'none'})"
        return None

    return applies


def _ort_int8(request: BuildRequest, facts: Facts) -> str | None:
    if (why := _wants(request, "onnxruntime")) is not None:
        return why
    if request.calibration is None and request.quantization != "dynamic":
        return "no calibration data (set calibration, or quantization dynamic)"
    return None


def _openvino_int8(request: BuildRequest, facts: Facts) -> str | None:
    if (why := _openvino("int8", "INT8")(request, facts)) is not None:
        return why
    if request.calibration is None:
        return "no calibration data (NNCF calibrates int8 on it)"
    return None


def _tensorrt(precision: str) -> Applies:
    def applies(request: BuildRequest, facts: Facts) -> str | None:
        if request.engine != "tensorrt":  # never chosen by engine auto: its Job holds no GPU
            return f"engine {request.engine} was asked for"
        if not facts.has_gpu:
            return "no NVIDIA GPU on this node"
        if precision == "int8" and request.calibration is None:
            return "no calibration data for int8"
        return None

    return applies


def _standard(engine: str, precision: str) -> Builder:
    def build(context: Context) -> Path:
        return context.standard(engine, precision)

    return build


REGISTRY: tuple[Candidate, ...] = (
    Candidate("onnxruntime-fp32", "onnxruntime", "fp32", _cpu("onnxruntime"), _standard("onnxruntime", "fp32")),
    Candidate("openvino-fp32", "openvino", "fp32", _openvino("fp32", "FP32"), _standard("openvino", "fp32")),
    Candidate("openvino-bf16", "openvino", "bf16", _openvino("bf16", "BF16"), _standard("openvino", "bf16")),
    Candidate("onnxruntime-int8", "onnxruntime", "int8", _ort_int8, _standard("onnxruntime", "int8")),
    # OpenVINO INT8 through NNCF's accuracy control (build/openvino_int8.py); ONNX Runtime int8 above runs
    # the accuracy-aware procedure (build/quantize.py) when calibration data is given.
    Candidate("openvino-int8", "openvino", "int8", _openvino_int8, _standard("openvino", "int8")),
    Candidate("tensorrt-fp16", "tensorrt", "fp16", _tensorrt("fp16"), _standard("tensorrt", "fp16")),
    Candidate("tensorrt-int8", "tensorrt", "int8", _tensorrt("int8"), _standard("tensorrt", "int8")),
)


def applicable(
    request: BuildRequest, facts: Facts, registry: Sequence[Candidate] = REGISTRY
) -> tuple[list[Candidate], dict[str, str]]:
    """The candidates that apply (in the registry's order), and why each of the others does not."""
    chosen, skipped = [], {}
    for candidate in registry:
        if request.precision not in (AUTO, candidate.precision):
            skipped[candidate.name] = f"precision {request.precision} was asked for"
        elif (why := candidate.applies(request, facts)) is not None:
            skipped[candidate.name] = why
        else:
            chosen.append(candidate)
    return chosen, skipped


@dataclass(frozen=True)
class Row:
    """One candidate's line in the table: its figures against the reference and its timing.

    `passed` is False when it missed a tolerance (`failures` says which) or could not be built (`error`);
    `p50_ms` and `speedup` (ONNX Runtime fp32's median over this one's, same run) are None unless it passed.
    """

    name: str
    engine: str
    precision: str
    passed: bool
    cosine: float | None = None
    max_relative_error: float | None = None
    top1_agreement: float | None = None
    task_metric: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    speedup: float | None = None
    failures: tuple[str, ...] = ()
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def choose(rows: Sequence[Row], tie: float = TIE_FRACTION) -> Row:
    """The fastest row that passed (rows in the registry's order; ties within `tie` go to the earlier row).

    Raises ValidationFailedError (exit 3, reason NoCandidatePassed) with every row when none passed or none
    was timed.
    """
    timed = [r for r in rows if r.passed and r.p50_ms is not None]
    if not timed:
        why = "; ".join(f"{r.name}: {r.error or '; '.join(r.failures) or 'not timed'}" for r in rows)
        raise ValidationFailedError(
            f"no candidate engine passed validation ({why or 'no candidate applies to this class'})",
            reason="NoCandidatePassed",
            details={"auto": {"chosen": None, "candidates": [r.as_dict() for r in rows]}},
        )
    fastest = min(r.p50_ms or 0.0 for r in timed)
    return next(r for r in timed if (r.p50_ms or 0.0) <= fastest * (1 + tie))


def describe(chosen: Row, rows: Sequence[Row]) -> str:
    """Why `chosen` won, in one sentence with the figures (for the report's decision and the Event)."""
    speed = f"{chosen.speedup:.2f}x ONNX Runtime fp32" if chosen.speedup is not None else "timed"
    cosine = f", cosine {chosen.cosine:.6f}" if chosen.cosine is not None else ""
    lost = [r for r in rows if r is not chosen]
    failed = [r.name for r in lost if not r.passed]
    slower = [r.name for r in lost if r.passed]
    passed = sum(1 for r in rows if r.passed)
    parts = [f"chose {chosen.engine} {chosen.precision}: {speed}{cosine}, the fastest of {passed} that passed"]
    if slower:
        parts.append(f"slower or tied: {', '.join(slower)}")
    if failed:
        parts.append(f"failed: {', '.join(failed)}")
    return "; ".join(parts)
