"""ONNX Runtime: load and run models, and produce optimised fp32, fp16 and int8 variants offline."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edgemodel_runtime.build import modelcheck
from edgemodel_runtime.build.errors import BadInputError, InfrastructureError
from edgemodel_runtime.build.tensors import Sample

CalibrationMethodName = Literal["minmax", "entropy", "percentile"]


def session(model: Path, threads: int | None = None, optimize: bool = True) -> ort.InferenceSession:
    """A CPU inference session; refuses files that are not loadable ONNX models with the reason."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own Fail/InvalidGraph/NotImplemented kinds
        text, kind = str(error), type(error).__name__
        unsupported = "NOT_IMPLEMENTED" in text or kind == "NotImplemented" or "is not a registered function/op" in text
        reason = "UnsupportedOperator" if unsupported else "InvalidModel"
        raise BadInputError(f"{model.name}: onnxruntime cannot load it: {error}", reason=reason) from error


def declared_inputs(model_session: ort.InferenceSession) -> list[tuple[str, list[int | str | None], str]]:
    """(name, dims, ORT type string) of each input; a dim is an int, a symbolic name, or None."""
    return [(i.name, list(i.shape or []), i.type) for i in model_session.get_inputs()]


def declared_outputs(model_session: ort.InferenceSession) -> list[tuple[str, list[int | str | None], str]]:
    """(name, dims, ORT type string) of each output, as `declared_inputs`."""
    return [(o.name, list(o.shape or []), o.type) for o in model_session.get_outputs()]


def save_model(model: Any, target: Path, external: bool) -> None:
    """Save a ModelProto; with `external`, tensors over 1 KiB go to one side file `<target name>.data`."""
    import onnx

    data = target.with_name(target.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    if external:
        onnx.save_model(
            model, str(target), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name
        )
    else:
        onnx.save_model(model, str(target))


EMBED_LIMIT = modelcheck.PROTOBUF_LIMIT  # above it, an engine's weights go to a side file


def save_artifact(source: Path, target: Path, embed_limit: int | None = None) -> list[Path]:
    """Write the engine as `target`, weights inside when they fit in one ONNX file (`EMBED_LIMIT` bytes by
    default), else in `<target name>.data`. Returns the files written, the model first. A source without
    external data is copied as it is.
    """
    import onnx

    data = target.with_name(target.name + ".data")
    data.unlink(missing_ok=True)
    if not modelcheck.inspect(source).external_data:
        shutil.copyfile(source, target)
        return [target]
    model = onnx.load(str(source))  # reads the side files, relative to the source's directory
    external = model.ByteSize() > (EMBED_LIMIT if embed_limit is None else embed_limit)
    save_model(model, target, external)
    return [target, data] if external else [target]


def run(model_session: ort.InferenceSession, sample: Sample) -> dict[str, npt.NDArray[Any]]:
    """Outputs of one inference, by output name."""
    names = [o.name for o in model_session.get_outputs()]
    try:
        values = model_session.run(names, sample)
    except Exception as error:
        raise BadInputError(f"inference failed: {error}", reason="InferenceFailed") from error
    return {name: np.asarray(value) for name, value in zip(names, values, strict=True)}


def optimize_graph(source: Path, target: Path, level: str = "extended", external: bool = False) -> Path:
    """Offline graph optimisation (constant folding, fusions), saved as a new model file.

    With `external`, initializers over 1 KiB are written to `<target name>.data`, so that models whose
    weights exceed the 2 GiB a single ONNX file can hold still optimise.
    """
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = levels[level]
    options.optimized_model_filepath = str(target)
    if external:
        target.with_name(target.name + ".data").unlink(missing_ok=True)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", target.name + ".data"
        )
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise BadInputError(f"{source.name}: graph optimisation failed: {error}", reason="InvalidModel") from error
    return target


def convert_fp16(source: Path, target: Path, external: bool = False) -> Path:
    """Float16 weights and activations, keeping float32 inputs and outputs for existing clients."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))
    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    save_model(converted, target, external)
    return target


def quantize_dynamic_int8(source: Path, target: Path, external: bool = False) -> Path:
    """INT8 weights, activations quantised at run time (no calibration data needed)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    prepared = _prepare_for_quantization(source, target, external)
    try:
        quantize_dynamic(
            str(prepared),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            use_external_data_format=external,
        )
    except Exception as error:
        raise BadInputError(f"dynamic quantisation failed: {error}", reason="QuantizationFailed") from error
    finally:
        _remove_scratch(target)
    return target


def _prepare_for_quantization(source: Path, target: Path, external: bool = False) -> Path:
    """Opset 13 or later, shapes inferred and constants folded, so that weights are initializers."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_suffix(".pre.onnx")
    try:
        upgraded = _with_min_opset(source, target.with_suffix(".opset.onnx"), external=external)
        quant_pre_process(
            str(upgraded),
            str(prepared),
            skip_symbolic_shape=True,
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            external_data_location=prepared.name + ".data",
        )
    except BadInputError:
        raise
    except Exception as error:
        raise BadInputError(
            f"preparing the model for quantisation failed: {error}", reason="QuantizationFailed"
        ) from error
    return prepared


def prepare_for_quantization(source: Path, target: Path, external: bool = False) -> Path:
    """`source` as quantisation needs it (opset 13 or later, shapes inferred, constants folded), written beside
    `target` as `<target stem>.pre.onnx`; returns that path. Raises BadInputError (QuantizationFailed)."""
    return _prepare_for_quantization(source, target, external)


def _remove_scratch(target: Path) -> None:
    for suffix in (".pre.onnx", ".opset.onnx"):
        target.with_suffix(suffix).unlink(missing_ok=True)
        target.with_suffix(suffix + ".data").unlink(missing_ok=True)
    for leftover in target.parent.glob("*augmented_model*.onnx"):
        leftover.unlink(missing_ok=True)


QDQ_MIN_OPSET = 13  # per-channel DequantizeLinear (the `axis` attribute) needs opset 13


def _with_min_opset(source: Path, target: Path, minimum: int = QDQ_MIN_OPSET, external: bool = False) -> Path:
    """`source`, or a copy converted to at least `minimum` of the default ONNX domain."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(source))
    current = next((o.version for o in model.opset_import if o.domain in {"", "ai.onnx"}), minimum)
    if current >= minimum:
        return source
    try:
        save_model(version_converter.convert_version(model, minimum), target, external)
    except Exception as error:
        raise BadInputError(
            f"cannot upgrade the model from opset {current} to {minimum} for int8 quantisation: {error}",
            reason="QuantizationFailed",
        ) from error
    return target


class _Samples:
    """A CalibrationDataReader over in-memory samples."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self._iterator = iter(samples)

    def get_next(self) -> Sample | None:
        return next(self._iterator, None)


ENTROPY_BINS = 1024  # histogram bins: 1024 / 2 - 128 / 2 + 1 = 449 candidate thresholds
ENTROPY_QUANTIZED_BINS = 128


def calibration_ranges(
    prepared: Path,
    calibration: Sequence[Sample],
    method: CalibrationMethodName,
    work: Path,
    op_types: Sequence[str] | None = None,
    *,
    external: bool = False,
) -> Any:
    """ONNX Runtime `TensorsData` (tensor name -> range) of `prepared`'s tensors around `op_types` nodes (every
    float tensor when None), from the `calibration` samples.

    Entropy gets `ENTROPY_BINS` histogram bins and `ENTROPY_QUANTIZED_BINS` quantised bins: `quantize_static`
    (1.32) does not pass `num_bins` on, and with its 128 bins the KL search has one candidate threshold, the
    full range, so entropy gave minmax's ranges. Percentile: the 99.999th percentile of a 2048-bin histogram.
    Raises BadInputError (QuantizationFailed).
    """
    import contextlib
    import io

    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    methods: dict[str, tuple[Any, dict[str, Any]]] = {
        "minmax": (CalibrationMethod.MinMax, {}),
        "percentile": (CalibrationMethod.Percentile, {"percentile": 99.999, "num_bins": 2048}),
        "entropy": (
            CalibrationMethod.Entropy,
            {"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS},
        ),
    }
    kind, extra = methods[method]
    work.mkdir(parents=True, exist_ok=True)
    augmented = work / f"augmented-{method}.onnx"
    try:
        calibrator = create_calibrator(
            prepared,
            list(op_types) if op_types else None,
            augmented_model_path=str(augmented),
            calibrate_method=kind,
            use_external_data_format=external,
            extra_options=extra,
        )
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress
            calibrator.collect_data(_Samples(calibration))
            ranges = calibrator.compute_data()
    except Exception as error:
        raise BadInputError(f"{method} calibration failed: {error}", reason="QuantizationFailed") from error
    finally:
        augmented.unlink(missing_ok=True)
        augmented.with_name(augmented.name + ".data").unlink(missing_ok=True)
    return ranges


def quantize_static_int8(
    source: Path,
    target: Path,
    calibration: Sequence[Sample],
    method: CalibrationMethodName = "minmax",
    external: bool = False,
) -> Path:
    """INT8 QDQ model calibrated on representative samples.

    Settings follow what measured well on x86 with VNNI: pre-processing (shape inference and
    folding), per-channel signed weights, unsigned activations, QDQ format. Ranges come from
    `calibration_ranges` (an entropy calibration that differs from minmax).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    prepared = _prepare_for_quantization(source, target, external)
    cache = target.with_suffix(".ranges.json")
    try:
        ranges = calibration_ranges(prepared, calibration, method, target.parent, external=external)
        save_tensors_data(ranges, cache)
        quantize_static(
            str(prepared),
            str(target),
            None,
            calibration_cache_path=str(cache),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            use_external_data_format=external,
        )
    except BadInputError:
        raise
    except Exception as error:
        raise BadInputError(f"static quantisation failed: {error}", reason="QuantizationFailed") from error
    finally:
        cache.unlink(missing_ok=True)
        _remove_scratch(target)
    return target


def version() -> str:
    return str(ort.__version__)


def check_writable(directory: Path) -> None:
    if not os.access(directory, os.W_OK):
        raise InfrastructureError(f"{directory} is not writable", reason="DiskError")
