"""OpenVINO INT8 through NNCF, with accuracy control against the validation set.

    build_openvino_int8(model, calibration, samples, expected, *, tolerance, target, shapes,
                        log=lambda line: None) -> OpenVinoInt8Outcome

`model` is the ONNX model (Path), `calibration` the inputs NNCF calibrates on, `samples` the validation inputs and
`expected` the fp32 ONNX Runtime reference's outputs for them (same order), `tolerance` a `compare.Tolerance` or
`compare.Tolerances`, `target` the `model.openvino` archive to write, `shapes` the input shapes to fix (name ->
dims, as `openvino_engine.compile_to_artifact`). Returns the archive's path, the comparison of the compiled INT8
model against the reference on `samples`, whether it meets the tolerance, and NNCF's figures. Raises
BadInputError when OpenVINO or NNCF cannot read, quantise or compile the model; InfrastructureError
(EngineUnavailable) when nncf is not installed.

The validation function NNCF maximises is this project's own comparison (`compare.compare`) against the fp32
reference, as `1 - tolerance_load` (`quantize.tolerance_load`: 0 = identical to the reference, 1 = at the tolerance's
edge), per sample and over the set. The fp32 OpenVINO model scores about 1, so an absolute `max_drop` of
`1 - load(fp32)` lets NNCF keep exactly as many operations in floating point as the tolerance needs: the
tolerance maps onto NNCF's drop. The non-quantised parts compute in fp32 (`INFERENCE_PRECISION_HINT` f32), never
in bf16, so that the only error is the one NNCF measured.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgemodel_runtime.build import compare
from edgemodel_runtime.build.errors import BadInputError, InfrastructureError
from edgemodel_runtime.build.quantize import tolerance_load
from edgemodel_runtime.build.tensors import Sample
from edgemodel_runtime.engines import openvino_engine

__all__ = ["OpenVinoInt8Outcome", "build_openvino_int8", "nncf_version"]

Outputs = Mapping[str, npt.NDArray[Any]]
MAX_LOG_LINES = 20


@dataclass(frozen=True)
class OpenVinoInt8Outcome:
    """The archive written, its comparison against the reference on the validation samples, whether that meets
    the tolerance, and what NNCF was asked and measured (`as_report()`: the report's `openvinoInt8` section)."""

    path: Path
    met: bool
    comparison: compare.Comparison
    max_drop: float
    fp32_metric: float
    int8_metric: float
    nncf_log: tuple[str, ...] = ()  # what NNCF's accuracy control reported (ranking, operations reverted)

    def as_report(self) -> dict[str, Any]:
        return {
            "nncf": nncf_version(),
            "metric": "1 - toleranceLoad (compare.py against the fp32 ONNX Runtime reference)",
            "maxDrop": round(self.max_drop, 4),
            "fp32Metric": round(self.fp32_metric, 4),
            "int8Metric": round(self.int8_metric, 4),
            "met": self.met,
            "nncfLog": list(self.nncf_log[-MAX_LOG_LINES:]),
        }


def nncf_version() -> str:
    """NNCF's version, or `absent`."""
    try:
        import nncf
    except ImportError:
        return "absent"
    return str(nncf.__version__)


def _nncf() -> Any:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import nncf
    except ImportError as error:
        raise InfrastructureError(
            "engine openvino precision int8 needs the nncf package (pip install nncf)", reason="EngineUnavailable"
        ) from error
    return nncf


class _Captured(logging.Handler):
    """NNCF's log lines, kept for the report instead of printed."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def _captured_log() -> Iterator[list[str]]:
    logger = logging.getLogger("nncf")
    handler, saved = _Captured(), (logger.level, logger.handlers[:], logger.propagate)
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        logger.setLevel(saved[0])
        logger.handlers, logger.propagate = saved[1], saved[2]


def _outputs(compiled: Any, samples: Iterable[Sample]) -> list[dict[str, npt.NDArray[Any]]]:
    names = openvino_engine.output_names(compiled)
    outputs = []
    for sample in samples:
        results = compiled(dict(sample))
        outputs.append({name: np.array(results[i]) for i, name in enumerate(names)})
    return outputs


def _metric_function(
    tolerance: compare.Tolerance | compare.Tolerances,
) -> Callable[[Any, Iterable[Any]], tuple[float, list[float]]]:
    """NNCF's validation_fn over (sample, expected outputs) items: 1 - tolerance load, over the set and per item."""

    def metric(compiled: Any, items: Iterable[Any]) -> tuple[float, list[float]]:
        pairs = list(items)
        outputs = _outputs(compiled, [sample for sample, _ in pairs])
        expected = [reference for _, reference in pairs]
        overall = 1.0 - min(tolerance_load(compare.compare(expected, outputs), tolerance), 1e6)
        each = [
            1.0 - min(tolerance_load(compare.compare([reference], [output]), tolerance), 1e6)
            for reference, output in zip(expected, outputs, strict=True)
        ]
        return overall, each

    return metric


def build_openvino_int8(
    model: Path,
    calibration: Sequence[Sample],
    samples: Sequence[Sample],
    expected: Sequence[Outputs],
    *,
    tolerance: compare.Tolerance | compare.Tolerances,
    target: Path,
    shapes: Mapping[str, tuple[int, ...]],
    log: Callable[[str], None] = lambda _: None,
) -> OpenVinoInt8Outcome:
    """Quantise `model` with NNCF's accuracy control and write the `model.openvino` archive; see the module."""
    nncf = _nncf()
    openvino_engine.check_precision("int8")
    network = openvino_engine.read_network(model, shapes)
    items = list(zip(samples, expected, strict=True))
    metric = _metric_function(tolerance)
    core = openvino_engine.core()
    properties = openvino_engine.compile_properties("int8")
    fp32_metric, _ = metric(core.compile_model(network, openvino_engine.DEVICE, properties), items)
    max_drop = max(fp32_metric, 0.0)  # from fp32's score down to the tolerance's edge (metric 0)
    log(f"openvino int8: NNCF with accuracy control, max drop {max_drop:.4f} of the metric 1 - tolerance load")
    try:
        with contextlib.redirect_stdout(sys.stderr), _captured_log() as lines:  # stdout carries the build's result
            quantized = nncf.quantize_with_accuracy_control(
                network,
                nncf.Dataset(list(calibration)),
                nncf.Dataset(items, lambda item: dict(item[0])),
                validation_fn=metric,
                max_drop=max_drop,
                drop_type=nncf.DropType.ABSOLUTE,
                preset=nncf.QuantizationPreset.MIXED,
                subset_size=len(calibration),
            )
    except Exception as error:  # NNCF raises its own kinds and OpenVINO's RuntimeErrors
        raise BadInputError(f"NNCF int8 quantisation failed: {error}", reason="QuantizationFailed") from error
    compiled = core.compile_model(quantized, openvino_engine.DEVICE, properties)
    comparison = compare.compare(expected, _outputs(compiled, samples))
    int8_metric = 1.0 - min(tolerance_load(comparison, tolerance), 1e6)
    openvino_engine.write_artifact(compiled, target, "int8", shapes)
    return OpenVinoInt8Outcome(
        path=target,
        met=not compare.failures(comparison, tolerance),
        comparison=comparison,
        max_drop=max_drop,
        fp32_metric=fp32_metric,
        int8_metric=int8_metric,
        nncf_log=tuple(line for line in lines if line.strip() and not line.startswith("Elapsed Time")),
    )
