"""OpenVINO on this node's CPU: compile an ONNX model at the precision asked, and run the result.

The artifact is one file, `model.openvino`: a zip archive (stored, not compressed) holding
`compiled.blob`, the compiled model as OpenVINO exports it, and `config.json` with the precision,
the OpenVINO version that compiled it and the input shapes that were fixed. The config travels with
the blob because OpenVINO's CPU plugin does not keep the inference precision in an exported model:
imported without it, a blob compiled for fp32 runs at the CPU's default precision (bf16 on CPUs
that have it). A blob only loads into the OpenVINO version that wrote it, so `load` refuses another
version by name instead of failing inside the plugin; the build's cache key covers the version.

The build fixes every input at the shape it validates (`spec.inputs` / `--input`, dynamic dimensions
not named there become 1): OpenVINO runs static shapes much faster, and with dynamic shapes OpenVINO
2026.4 answered an input the model cannot compute with (smaller than a pooling window) with the
previous call's outputs when run on one thread, or crashed, instead of an error. A static engine
serves exactly the shape it was validated at; the server refuses others with a 400.

`openvino` is imported only inside these functions, so importing this module costs nothing.
"""

from __future__ import annotations

import io
import json
import queue
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgemodel_runtime.build.errors import BadInputError, InfrastructureError
from edgemodel_runtime.build.tensors import Sample

DEVICE = "CPU"
BLOB_MEMBER = "compiled.blob"
CONFIG_MEMBER = "config.json"
# precision -> (OpenVINO's inference precision, the CPU capability it needs). An int8 model (quantised by NNCF,
# build/openvino_int8.py) computes what it did not quantise in f32.
PRECISIONS = {"fp32": ("f32", "FP32"), "bf16": ("bf16", "BF16"), "fp16": ("f16", "FP16"), "int8": ("f32", "INT8")}


def _openvino() -> Any:
    try:
        import openvino
    except ImportError as error:
        raise InfrastructureError(
            "engine openvino is unavailable here: the openvino package is not installed (pip install openvino); "
            "edgemodel never falls back to another engine silently",
            reason="EngineUnavailable",
        ) from error
    return openvino


def version() -> str:
    """OpenVINO's full version (e.g. `2026.4.1-22982-...`), or `absent`."""
    try:
        import openvino
    except ImportError:
        return "absent"
    return str(openvino.get_version())


def capabilities() -> list[str]:
    """What OpenVINO says this CPU can do (OPTIMIZATION_CAPABILITIES: FP32, BF16, FP16, INT8, ...)."""
    core = _openvino().Core()
    return [str(c) for c in core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")]


def check_precision(precision: str) -> None:
    """Refuse, with exit code 2 and the reason, a precision that OpenVINO cannot build on this CPU."""
    if precision not in PRECISIONS:
        raise BadInputError(
            f"engine openvino builds {', '.join(PRECISIONS)}, not {precision}", reason="UnsupportedPrecision"
        )
    needed = PRECISIONS[precision][1]
    found = capabilities()
    if needed not in found:
        name = _openvino().Core().get_property(DEVICE, "FULL_DEVICE_NAME")
        raise BadInputError(
            f"this CPU ({name}) cannot run {precision} in OpenVINO: its OPTIMIZATION_CAPABILITIES are "
            f"{', '.join(found)}; choose precision fp32, or target a class whose CPUs have {needed}",
            reason="PrecisionUnsupportedByHardware",
        )


@dataclass(frozen=True)
class Config:
    """What `config.json` in a `model.openvino` archive says."""

    precision: str
    inference_precision: str
    openvino: str
    shapes: dict[str, list[int]]


def _properties(inference_precision: str, threads: int | None = None) -> dict[str, Any]:
    # No pinning of worker threads to cores: a pod shares its node's cores with other pods (and its CPU quota
    # with its own threads), and pinned workers then wait for their core. On a busy 2-core machine the PP-OCR
    # classifier took 1.5-3.2 ms a call pinned, 0.36-0.51 ms unpinned.
    properties: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": inference_precision,
        "PERFORMANCE_HINT": "LATENCY",
        "ENABLE_CPU_PINNING": False,
    }
    if threads:
        properties["INFERENCE_NUM_THREADS"] = threads
    return properties


def core() -> Any:
    """An OpenVINO Core."""
    return _openvino().Core()


def compile_properties(precision: str) -> dict[str, Any]:
    """The compile properties of an engine of `precision` (fp32, bf16, fp16, int8)."""
    return _properties(PRECISIONS[precision][0])


def read_network(model: Path, shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """`model` (ONNX) as an OpenVINO model with `shapes` fixed. Raises BadInputError when OpenVINO cannot read it
    (UnsupportedOperator, InvalidModel) or fix the shapes (InvalidOption)."""
    try:
        network = core().read_model(str(model))
    except Exception as error:  # OpenVINO raises RuntimeError subclasses with the frontend's text
        text = str(error)
        missing = re.search(r"No conversion rule found for operations: ([^\n]*?)(?: To facilitate|\n|$)", text)
        if missing:
            raise BadInputError(
                f"{model.name}: OpenVINO has no conversion for the operators {missing.group(1).strip()}; "
                "build this model with engine onnxruntime",
                reason="UnsupportedOperator",
            ) from error
        raise BadInputError(f"{model.name}: OpenVINO cannot read it: {text}", reason="InvalidModel") from error
    if shapes:
        try:
            network.reshape({name: list(shape) for name, shape in shapes.items()})
        except Exception as error:
            raise BadInputError(
                f"OpenVINO cannot fix the input shapes {dict(shapes)}: {error}", reason="InvalidOption"
            ) from error
    return network


def write_artifact(compiled: Any, target: Path, precision: str, shapes: Mapping[str, tuple[int, ...]]) -> Path:
    """Export a compiled model and its config as the `model.openvino` archive `target`."""
    blob = io.BytesIO()
    compiled.export_model(blob)
    inference_precision = PRECISIONS[precision][0]
    config = Config(precision, inference_precision, version(), {k: list(v) for k, v in sorted(shapes.items())})
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(CONFIG_MEMBER, json.dumps(asdict(config), sort_keys=True))
        archive.writestr(BLOB_MEMBER, blob.getvalue())
    return target


def compile_to_artifact(model: Path, target: Path, precision: str, shapes: Mapping[str, tuple[int, ...]]) -> Path:
    """Compile `model` (ONNX) for this CPU with `shapes` fixed and write the `model.openvino` archive.

    fp32, bf16 and fp16 only: int8 is quantised by NNCF (build/openvino_int8.py). Raises BadInputError when
    OpenVINO cannot read, reshape or compile the model, or the CPU lacks the precision.
    """
    check_precision(precision)
    if precision == "int8":
        raise BadInputError(
            "openvino int8 engines are quantised with calibration data (build_openvino_int8)", reason="InvalidOption"
        )
    network = read_network(model, shapes)
    try:
        compiled = core().compile_model(network, DEVICE, compile_properties(precision))
    except Exception as error:
        raise BadInputError(f"OpenVINO cannot compile the model: {error}", reason="BuildFailed") from error
    return write_artifact(compiled, target, precision, shapes)


def read_config(artifact: Path) -> tuple[Config, bytes]:
    """The config and compiled blob of a `model.openvino` archive; ValueError when it is not one."""
    try:
        with zipfile.ZipFile(artifact) as archive:
            raw = json.loads(archive.read(CONFIG_MEMBER))
            blob = archive.read(BLOB_MEMBER)
        config = Config(
            precision=str(raw["precision"]),
            inference_precision=str(raw["inference_precision"]),
            openvino=str(raw["openvino"]),
            shapes={str(k): [int(d) for d in v] for k, v in dict(raw["shapes"]).items()},
        )
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"{artifact} is not an edgemodel OpenVINO artifact: {error}") from error
    return config, blob


def load(artifact: Path, threads: int | None = None) -> Any:
    """The compiled model of a `model.openvino` archive, at the precision it was built for.

    Raises BadInputError for a file that is no such archive, InfrastructureError (reason
    EngineVersionMismatch) when another OpenVINO version wrote it.
    """
    openvino = _openvino()
    try:
        config, blob = read_config(artifact)
    except ValueError as error:
        raise BadInputError(str(error), reason="InvalidArtifact") from error
    if config.openvino != version():
        raise InfrastructureError(
            f"{artifact.name} was compiled by OpenVINO {config.openvino}, but this runtime has {version()}: "
            "rebuild the engine with this runtime image",
            reason="EngineVersionMismatch",
        )
    properties = _properties(config.inference_precision, threads)
    return openvino.Core().import_model(io.BytesIO(blob), DEVICE, properties)


def output_names(compiled: Any) -> list[str]:
    return [str(port.get_any_name()) for port in compiled.outputs]


class Requests:
    """Infer requests of one compiled model, one per concurrent caller (a request is not thread-safe)."""

    def __init__(self, compiled: Any) -> None:
        self._compiled = compiled
        self._names = output_names(compiled)
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()

    @contextmanager
    def _request(self) -> Iterator[Any]:
        try:
            request = self._idle.get_nowait()
        except queue.Empty:
            request = self._compiled.create_infer_request()
        try:
            yield request
        finally:
            self._idle.put(request)

    def infer(self, sample: Mapping[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Outputs by name, copied out of the request's buffers."""
        with self._request() as request:
            results = request.infer(dict(sample))
            return {name: np.array(results[i]) for i, name in enumerate(self._names)}


def run_all(artifact: Path, samples: Sequence[Sample]) -> list[dict[str, npt.NDArray[Any]]]:
    """Outputs for each sample, by output name."""
    requests = Requests(load(artifact))
    try:
        return [requests.infer(sample) for sample in samples]
    except Exception as error:
        raise BadInputError(f"OpenVINO inference failed: {error}", reason="InferenceFailed") from error


def runner(artifact: Path, sample: Sample) -> Callable[[], object]:
    """A function that runs one inference, for timing."""
    request = load(artifact).create_infer_request()
    feed = dict(sample)

    def run_once() -> object:
        return request.infer(feed)

    return run_once
