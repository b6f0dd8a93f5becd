"""What a build is asked to do: the request, its consistency checks, and what identifies its engine.

`check_request` refuses inconsistent options before any work; `options` and `builder_version` are what,
besides the model, goes into the cache key; `cached_report` finds a verified earlier build with that key.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Literal

from edgemodel_runtime.build import compare, fetch
from edgemodel_runtime.build.errors import BadInputError
from edgemodel_runtime.digests import sha256_file
from edgemodel_runtime.engines import onnxruntime_engine as ortx

Engine = Literal["onnxruntime", "tensorrt", "openvino", "auto"]
Precision = Literal["fp32", "fp16", "bf16", "int8", "auto"]
ARTIFACT_NAME = {"onnxruntime": "model.onnx", "tensorrt": "model.plan", "openvino": "model.openvino"}


@dataclass(frozen=True)
class DataFile:
    """A calibration or reference .npz: a local path, or a URI with its digest."""

    location: str
    sha256: str | None = None


@dataclass(frozen=True)
class BuildRequest:
    model: str
    sha256: str
    engine: Engine = "onnxruntime"
    precision: Precision = "fp32"
    output: Path = Path("engine")
    quantization: Literal["static", "dynamic"] | None = None
    calibration: DataFile | None = None
    calibration_method: ortx.CalibrationMethodName | None = None  # None: chosen by validation (minmax for tensorrt)
    reference: DataFile | None = None
    tolerance: compare.Tolerance | None = None
    latency_budget_ms: float | None = None
    inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    push: str | None = None
    class_key: str | None = None
    int8_min_speedup: float = 1.1
    samples: int = 8
    seed: int = 0
    graph_optimization: Literal["basic", "extended", "all"] = "extended"
    allow_local: bool = True
    benchmark_seconds: float = 2.0
    max_accuracy_drop: float | None = None  # percentage points of the task metric (reference sets with labels)
    reuse: bool = True  # False (--no-cache): build even if the output directory or the registry has the key


def builder_version(engine: Engine, precision: Precision | None = None) -> str:
    parts = [f"edgemodel-{package_version('edgemodel')}", f"onnxruntime-{ortx.version()}"]
    if engine == "tensorrt":  # (auto never picks tensorrt: see candidates)
        from edgemodel_runtime.engines import tensorrt_engine

        parts.append(f"tensorrt-{tensorrt_engine.version()}")
    if engine in ("openvino", "auto"):
        from edgemodel_runtime.engines import openvino_engine

        parts.append(f"openvino-{openvino_engine.version()}")
        if precision == "int8":
            from edgemodel_runtime.build.openvino_int8 import nncf_version

            parts.append(f"nncf-{nncf_version()}")
    return "+".join(parts)


def options(request: BuildRequest, model_identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build options that change the engine, part of the cache key (with what pins external weights)."""
    return {
        **({"modelFiles": model_identity} if model_identity else {}),
        "inputs": {k: list(v) for k, v in sorted(request.inputs.items())},
        "quantization": quantization(request),
        "calibration": request.calibration.sha256 if request.calibration else None,
        "calibrationMethod": request.calibration_method if request.precision == "int8" else None,
        "graphOptimization": request.graph_optimization,
        "int8MinSpeedup": request.int8_min_speedup if request.precision == "int8" else None,
        **({"int8Procedure": INT8_PROCEDURE} if accuracy_aware(request) else {}),
        **_int8_validation(request),
        **_auto_options(request),
    }


def _int8_validation(request: BuildRequest) -> dict[str, Any]:
    """What a fixed int8 build keeps nodes in floating point for (the accuracy-aware procedure on onnxruntime,
    NNCF's accuracy control on openvino): the validation set (the reference, else the seeded samples) and the
    tolerance; nothing for other builds. Under auto, `_auto_options` says it."""
    if not (accuracy_aware(request) or (request.engine == "openvino" and request.precision == "int8")):
        return {}
    reference = request.reference
    validation = {"reference": reference.sha256 or reference.location} if reference else {
        "samples": request.samples, "seed": request.seed}  # fmt: skip
    tolerance = {k: v for k, v in vars(request.tolerance).items() if v is not None} if request.tolerance else None
    return {"int8Validation": validation | {"tolerance": tolerance}}


def _auto_options(request: BuildRequest) -> dict[str, Any]:
    """Under auto, what decides the choice: the candidates' names, the tolerance and the reference it is judged on
    (without one, the seeded samples' count and seed).

    Timing decides too, but it is measured, not asked for: the same request on the same class reuses the choice.
    """
    if "auto" not in (request.engine, request.precision):
        return {}
    from edgemodel_runtime.build import candidates

    reference = request.reference
    return {
        "auto": {
            "candidates": [c.name for c in candidates.REGISTRY],
            "tolerance": {k: v for k, v in vars(request.tolerance).items() if v is not None}
            if request.tolerance
            else None,
            "reference": (reference.sha256 or reference.location) if reference else None,
            **({} if reference else {"samples": request.samples, "seed": request.seed}),  # seeded validation
            "calibrationMethod": request.calibration_method if request.calibration else None,
            "maxAccuracyDrop": request.max_accuracy_drop,
            "int8Procedure": INT8_PROCEDURE,
        }
    }


INT8_PROCEDURE = "accuracy-aware-1"  # build/quantize.py; a new procedure changes the cache key


def accuracy_aware(request: BuildRequest) -> bool:
    """Whether the build runs the accuracy-aware INT8 procedure (onnxruntime, static int8)."""
    return request.engine == "onnxruntime" and quantization(request) == "static"


def quantization(request: BuildRequest) -> str | None:
    if request.precision != "int8":
        return None
    return request.quantization or ("static" if request.calibration else None)


def check_request(request: BuildRequest) -> None:
    """Refuse inconsistent options before any work; raise BadInputError naming the option."""
    fetch.check_digest(request.sha256)
    fetch.parse_source(request.model, allow_local=request.allow_local)
    _check_auto(request)
    if request.precision == "bf16" and request.engine != "openvino":
        raise BadInputError("--precision bf16 is only available with --engine openvino", reason="InvalidOption")
    if request.engine == "openvino" and request.precision != "auto":
        from edgemodel_runtime.engines import openvino_engine

        openvino_engine.check_precision(request.precision)
    if request.quantization and request.precision not in ("int8", "auto"):
        raise BadInputError("--quantization applies only to --precision int8 (or auto)", reason="InvalidOption")
    if request.precision == "int8" and quantization(request) is None:
        raise BadInputError(
            "--precision int8 needs --calibration NPZ (static quantisation) or --quantization dynamic",
            reason="InvalidOption",
        )
    if quantization(request) == "static" and request.calibration is None:
        raise BadInputError("static int8 quantisation needs --calibration NPZ", reason="InvalidOption")
    if request.calibration_method and request.engine == "openvino":
        raise BadInputError(
            "--calibration-method does not apply to --engine openvino (NNCF calibrates int8 itself)",
            reason="InvalidOption",
        )
    if request.quantization == "dynamic" and request.engine != "onnxruntime":
        raise BadInputError("dynamic quantisation is only available with --engine onnxruntime", reason="InvalidOption")
    for name, data in (("calibration", request.calibration), ("reference", request.reference)):
        if data is None:
            continue
        source = fetch.parse_source(data.location, allow_local=request.allow_local)
        if source.kind != "path" and data.sha256 is None:
            raise BadInputError(f"--{name} {data.location} is a URI and needs --{name}-sha256", reason="InvalidOption")
        if data.sha256 is not None:
            fetch.check_digest(data.sha256)
    _check_numbers(request)
    if request.engine == "tensorrt":
        from edgemodel_runtime.engines import tensorrt_engine

        tensorrt_engine.require()


def _check_auto(request: BuildRequest) -> None:
    """engine auto goes with precision auto; maxAccuracyDrop needs a reference (with labels, checked on load)."""
    if request.engine == "auto" and request.precision != "auto":
        raise BadInputError(
            "--engine auto chooses the precision too: use it with --precision auto", reason="InvalidOption"
        )
    if request.max_accuracy_drop is not None and request.reference is None:
        raise BadInputError(
            "maxAccuracyDrop needs a --reference whose samples carry labels (label.<output>)", reason="InvalidOption"
        )
    if request.engine == "openvino" and request.precision == "auto":
        from edgemodel_runtime.engines import openvino_engine

        openvino_engine.check_precision("fp32")  # OpenVINO itself must be installed


def _check_numbers(request: BuildRequest) -> None:
    if not 0 <= request.int8_min_speedup <= 100:
        raise BadInputError("--int8-min-speedup must be between 0 and 100", reason="InvalidOption")
    if request.latency_budget_ms is not None and request.latency_budget_ms <= 0:
        raise BadInputError("--latency-budget-ms must be greater than 0", reason="InvalidOption")


def cached_report(request: BuildRequest, key: str) -> dict[str, Any] | None:
    """The earlier report when the output directory already holds a verified build with this key."""
    path = request.output / "report.json"
    if not path.exists():
        return None
    try:
        earlier: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    artifact = earlier.get("artifact") or {}
    if earlier.get("cacheKey") != key or earlier.get("status") not in {"built", "cached"}:
        return None
    for entry in [artifact, *artifact.get("dataFiles", [])]:
        file = request.output / Path(str(entry.get("file", ""))).name
        if not file.is_file() or sha256_file(file) != entry.get("sha256"):
            return None
    return earlier


def fetch_data(data: DataFile, work: Path, name: str, allow_local: bool) -> Path:
    target = work / f"{name}.npz"
    if data.sha256 is None:  # a local path given without a digest: record the one it has
        source = Path(data.location)
        if not source.is_file():
            raise BadInputError(f"--{name} {data.location}: no such file", reason="InvalidSampleSet")
        shutil.copyfile(source, target)
        return target
    return fetch.fetch(data.location, data.sha256, target, allow_local=allow_local)
