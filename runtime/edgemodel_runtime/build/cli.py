"""`edgemodel build`: the command-line face of edgemodel_runtime.build.pipeline."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from edgemodel_runtime.build import compare, report, tensors
from edgemodel_runtime.build.errors import BadInputError, BuildError, ExitCode, InfrastructureError
from edgemodel_runtime.build.pipeline import BuildRequest, DataFile, build

_TOLERANCE_KEYS = {
    "maxAbsError": "max_abs_error",
    "maxRelativeError": "max_relative_error",
    "minCosine": "min_cosine",
    "minTop1Agreement": "min_top1_agreement",
    "maxAccuracyDrop": "max_accuracy_drop",  # percentage points of the task metric; not a closeness limit
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgemodel build",
        description="Fetch an ONNX model, verify its digest, build an engine for this machine's hardware class, "
        "validate it against fp32 ONNX Runtime on CPU, measure it, and write (and optionally push) the artifact.",
        epilog="Exit codes: 0 built or cached, 2 bad input, 3 validation failed, 4 infrastructure failure "
        "(or an internal error). Every failure writes report.json and --termination-log with a reason.",
    )
    parser.add_argument("--model", required=True, help="https:// or oci:// URI, or a local path")
    parser.add_argument("--sha256", required=True, help="SHA-256 of the model file (64 hex characters)")
    parser.add_argument(
        "--engine",
        choices=["onnxruntime", "tensorrt", "openvino", "auto"],
        default="onnxruntime",
        help="auto (with --precision auto): try every CPU engine that applies, keep the fastest that passes",
    )
    parser.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16", "int8", "auto"],
        default="fp32",
        help="auto: try every precision the engine offers here, keep the fastest that passes",
    )
    parser.add_argument("--quantization", choices=["static", "dynamic"], help="int8 mode (default static)")
    parser.add_argument("--calibration", metavar="NPZ", help="calibration samples for static int8 (path or URI)")
    parser.add_argument("--calibration-sha256", metavar="HEX", help="digest of --calibration (required for URIs)")
    parser.add_argument(
        "--calibration-method",
        choices=["minmax", "entropy", "percentile"],
        help="static int8 calibration (default: onnxruntime chooses by validation, tensorrt uses minmax)",
    )
    parser.add_argument("--reference", metavar="NPZ", help="realistic inputs (+ expected outputs) to validate on")
    parser.add_argument("--reference-sha256", metavar="HEX", help="digest of --reference (required for URIs)")
    parser.add_argument(
        "--tolerance",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help=f"limits against the reference; keys: {', '.join(_TOLERANCE_KEYS)} (default: by precision)",
    )
    parser.add_argument("--latency-budget-ms", type=float, help="fail when p99 latency on this machine is higher")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=DIMxDIM", help="fix an input's shape")
    parser.add_argument("--output", type=Path, default=Path("engine"), help="directory for the artifact and report")
    parser.add_argument("--push", metavar="oci://REGISTRY/REPO", help="push artifact and report, tagged by cache key")
    parser.add_argument("--class-key", help="hardware class key (default: derived from this machine)")
    parser.add_argument("--int8-min-speedup", type=float, default=1.1, help="below this, fall back to fp32")
    parser.add_argument("--samples", type=int, default=8, help="seeded validation samples without --reference")
    parser.add_argument("--benchmark-seconds", type=float, default=2.0, help="time spent measuring each variant")
    parser.add_argument("--report", type=Path, help="also write the full report here")
    parser.add_argument("--termination-log", type=Path, help="write the compact report (< 4 KiB) here")
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="build even when --output or the --push registry already holds an engine of this cache key (which is "
        "then replaced): what the operator asks for when a node cannot load the engine it has",
    )
    return parser


def _tolerance(items: Sequence[str]) -> tuple[compare.Tolerance | None, float | None]:
    """The closeness limits, and maxAccuracyDrop (percentage points) when given."""
    if not items:
        return None, None
    values: dict[str, float] = {}
    given: dict[str, str] = {}
    for item in ",".join(items).split(","):
        key, _, raw = item.partition("=")
        if key not in _TOLERANCE_KEYS:
            raise BadInputError(
                f"--tolerance {item!r}: unknown key; use {', '.join(_TOLERANCE_KEYS)}", reason="InvalidOption"
            )
        try:
            value = float(raw)
        except ValueError as error:
            raise BadInputError(f"--tolerance {item!r}: {raw!r} is not a number", reason="InvalidOption") from error
        drop = key == "maxAccuracyDrop"
        low, high = (0.0, 100.0) if drop else (0.0, 1.0 if key.startswith("min") else math.inf)
        if not math.isfinite(value) or value < low or (value == low and not drop) or value > high:
            bounds = "in [0, 100] (percentage points)" if drop else "in (0, 1]" if key.startswith("min") else "> 0"
            raise BadInputError(
                f"--tolerance {item!r}: out of range; {key} must be a number {bounds}", reason="InvalidOption"
            )
        if key in given:
            raise BadInputError(f"--tolerance gives {key} twice ({given[key]}, then {raw})", reason="InvalidOption")
        given[key] = raw
        values[_TOLERANCE_KEYS[key]] = value
    max_drop = values.pop("max_accuracy_drop", None)
    return (compare.Tolerance(**values) if values else None), max_drop


def _request(args: argparse.Namespace) -> BuildRequest:
    overrides = dict(tensors.parse_shape_override(text) for text in args.input)
    tolerance, max_accuracy_drop = _tolerance(args.tolerance)
    return BuildRequest(
        model=args.model,
        sha256=args.sha256,
        engine=args.engine,
        precision=args.precision,
        output=args.output,
        quantization=args.quantization,
        calibration=DataFile(args.calibration, args.calibration_sha256) if args.calibration else None,
        calibration_method=args.calibration_method,
        reference=DataFile(args.reference, args.reference_sha256) if args.reference else None,
        tolerance=tolerance,
        max_accuracy_drop=max_accuracy_drop,
        latency_budget_ms=args.latency_budget_ms,
        inputs=overrides,
        push=args.push,
        class_key=args.class_key,
        int8_min_speedup=args.int8_min_speedup,
        samples=args.samples,
        benchmark_seconds=args.benchmark_seconds,
        reuse=not args.no_cache,
    )


def _emit(result: dict[str, object], args: argparse.Namespace) -> None:
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.termination_log:
        args.termination_log.write_text(report.compact(result))


def build_command(argv: Sequence[str]) -> int:
    """`edgemodel build ...`: returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        try:
            result = build(_request(args))
        except BuildError:
            raise
        except (OSError, MemoryError) as error:  # disk full, permissions, out of memory
            raise InfrastructureError(f"{type(error).__name__}: {error}", reason="InfrastructureFailure") from error
        except Exception as error:  # a bug before the build started: still a reason and exit 4, no traceback
            raise InfrastructureError(
                f"internal error ({type(error).__name__}: {error}); this is a bug in edgemodel build",
                reason="InternalError",
            ) from error
    except BuildError as error:
        print(f"edgemodel build: {error.reason}: {error}", file=sys.stderr)
        failed_path = args.output / "report.json"
        failed = (
            json.loads(failed_path.read_text())
            if failed_path.exists()
            else {"version": report.REPORT_VERSION, "status": "failed", "cacheKey": None}
        )
        failed.update(status="failed", exitCode=int(error.exit_code), reason=error.reason, message=str(error))
        _emit(failed, args)
        return int(error.exit_code)
    _emit(result, args)
    print(result.get("message", ""))
    return int(ExitCode.OK)
