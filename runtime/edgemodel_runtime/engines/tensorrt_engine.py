"""TensorRT: build a serialized engine from ONNX for the GPU of this node, and run it.

Needs the `tensorrt` and `polygraphy` packages (`pip install 'edgemodel[tensorrt]'`) and an
NVIDIA GPU. Without them every entry point raises InfrastructureError with reason
EngineUnavailable: a build never falls back to another engine silently.

INT8 uses explicit quantisation: the model is first turned into a QDQ model with ONNX Runtime's
calibrated static quantisation, then TensorRT builds it with INT8 (and FP16 for the rest) enabled.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgemodel_runtime.build.errors import BadInputError, InfrastructureError
from edgemodel_runtime.build.tensors import Sample, TensorInfo

WORKSPACE_BYTES = 2 << 30


def _unavailable(why: str) -> InfrastructureError:
    return InfrastructureError(
        f"engine tensorrt is unavailable here: {why}. It needs an NVIDIA GPU and the tensorrt and polygraphy "
        "packages (pip install 'edgemodel[tensorrt]'); edgemodel never falls back to another engine silently",
        reason="EngineUnavailable",
    )


def _gpu_visible() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0 and "GPU" in result.stdout


def require() -> None:
    """Raise EngineUnavailable unless TensorRT and a GPU are present."""
    try:
        import polygraphy  # noqa: F401
        import tensorrt  # noqa: F401
    except ImportError as error:
        raise _unavailable(f"the {error.name} package is not installed") from error
    if not _gpu_visible():
        raise _unavailable("no NVIDIA GPU is visible (nvidia-smi lists none)")


def version() -> str:
    try:
        import tensorrt as trt
    except ImportError:
        return "absent"
    return str(trt.__version__)


def _timing_cache_path() -> Path:
    from edgemodel_runtime.packaged import cache_root

    return cache_root() / "tensorrt" / f"timing-{version()}.cache"


def build_engine(model: Path, target: Path, precision: str, inputs: Sequence[TensorInfo]) -> Path:
    """Serialize a TensorRT engine for `model` with fixed-shape optimisation profiles."""
    require()
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.read_bytes(), str(model)):  # the path finds external-data files next to it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BadInputError(f"TensorRT cannot parse the model: {errors}", reason="UnsupportedOperator")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision in {"fp16", "int8"}:
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    for info in inputs:
        profile.set_shape(info.name, info.shape, info.shape, info.shape)
    config.add_optimization_profile(profile)
    cache_path = _timing_cache_path()
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BadInputError(
            "TensorRT could not build an engine for this model (see the log above)", reason="BuildFailed"
        )
    target.write_bytes(bytes(serialized))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return target


def open_runner(engine: Path) -> Any:
    """An activated polygraphy runner for a serialized engine (call `deactivate` when done)."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    runner = TrtRunner(EngineFromBytes(engine.read_bytes()))
    runner.activate()
    return runner


def run_all(engine: Path, samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """Outputs for each sample, copied to host memory."""
    require()
    runner = open_runner(engine)
    try:
        return [{k: np.array(v) for k, v in runner.infer(feed_dict=sample).items()} for sample in samples]
    finally:
        runner.deactivate()


def runner(engine: Path, sample: Sample) -> Callable[[], object]:
    """A function that runs one inference, for timing."""
    require()
    active = open_runner(engine)

    def run_once() -> object:
        return active.infer(feed_dict=sample)

    return run_once
