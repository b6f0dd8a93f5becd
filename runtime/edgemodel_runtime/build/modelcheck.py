"""Refuse at build time what the model file is not, or what the server cannot carry.

Two checks, both raising BadInputError (exit 2) with a reason the operator can show:

- `inspect(path)`: the structure of a verified model file, read without its weights: a ModelProto
  with a graph, at least one output, names that are text, and external-data locations that stay
  inside the model's directory (`InvalidModel`).
- `check_servable(inputs, outputs)`: every input and output, as ONNX Runtime resolved it, is a
  tensor whose element type the Open Inference Protocol server carries (`UnsupportedModel`).
  The list of carried types is `serve.protocol.DATATYPES`, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edgemodel_runtime.build.errors import BadInputError
from edgemodel_runtime.serve.protocol import DATATYPES, MAX_DIMS

PROTOBUF_LIMIT = 2**31 - 1  # a serialised ModelProto cannot be larger; weights beyond it live in side files
_TENSOR = re.compile(r"^tensor\((\w+)\)$")


@dataclass(frozen=True)
class ModelFacts:
    """What the model file says about itself, read without loading weights."""

    external_data: tuple[str, ...]  # side-file locations, relative to the model file's directory


def _elem_dtype(onnx_name: str) -> np.dtype[Any] | None:
    """numpy dtype of an ONNX element type name (`float`, `bfloat16`, ...), None when numpy has none."""
    from onnx import TensorProto, helper

    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(TensorProto.DataType.Value(onnx_name.upper())))
    except (KeyError, ValueError, TypeError):
        return None


def carried_types() -> dict[str, str]:
    """ONNX Runtime tensor type strings the server carries, mapped to their OIP datatype name."""
    from onnx import TensorProto

    by_dtype = {dtype: name for name, dtype in DATATYPES.items()}
    carried = {}
    for onnx_name in TensorProto.DataType.keys():  # noqa: SIM118 - a protobuf enum, not a dict
        dtype = _elem_dtype(onnx_name)
        if dtype is not None and dtype in by_dtype:
            carried[f"tensor({onnx_name.lower()})"] = by_dtype[dtype]
    return carried


def _describe(ort_type: str) -> str:
    if ort_type.startswith("seq("):
        return f"a sequence ({ort_type}), not a tensor"
    if ort_type.startswith("map("):
        return f"a map ({ort_type}), not a tensor"
    if ort_type.startswith("optional("):
        return f"an optional value ({ort_type}), not a tensor"
    if ort_type.startswith("sparse_tensor("):
        return f"a sparse tensor ({ort_type})"
    match = _TENSOR.match(ort_type)
    if match:
        return f"a tensor of {match.group(1)}, an element type the server has no datatype for"
    return f"of type {ort_type!r}"


def check_servable(
    inputs: Sequence[tuple[str, Sequence[Any], str]], outputs: Sequence[tuple[str, Sequence[Any], str]]
) -> None:
    """Refuse a model with any input or output that `edgemodel serve` cannot carry.

    `inputs`/`outputs` are (name, dims, ONNX Runtime type string). Raises BadInputError
    (`UnsupportedModel`) naming every offending tensor and the datatypes that are carried.
    """
    carried = carried_types()
    problems = []
    for kind, tensors in (("input", inputs), ("output", outputs)):
        for name, dims, ort_type in tensors:
            if ort_type not in carried:
                problems.append(f"{kind} {name!r} is {_describe(ort_type)}")
            elif len(dims) > MAX_DIMS:
                problems.append(
                    f"{kind} {name!r} has {len(dims)} dimensions, more than the {MAX_DIMS} the server takes"
                )
    if problems:
        raise BadInputError(
            "the model cannot be served: "
            + "; ".join(problems)
            + f". The inference server carries tensors of {', '.join(sorted(set(carried.values())))} only; "
            "change the model's interface (for example export a classifier without its ZipMap, "
            "or cast the tensor) and build again",
            reason="UnsupportedModel",
            details={"unsupported": problems},
        )


def _elem_name(elem_type: int) -> str:
    from onnx import TensorProto

    try:
        return str(TensorProto.DataType.Name(elem_type)).lower()
    except ValueError:
        return f"element type {elem_type}"


def type_string(type_proto: Any) -> str | None:
    """A TypeProto in ONNX Runtime's notation (`tensor(float)`, `seq(map(int64,tensor(float)))`), None if unset."""
    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type":
        return f"tensor({_elem_name(type_proto.tensor_type.elem_type)})"
    if kind == "sparse_tensor_type":
        return f"sparse_tensor({_elem_name(type_proto.sparse_tensor_type.elem_type)})"
    if kind == "sequence_type":
        return f"seq({type_string(type_proto.sequence_type.elem_type) or '?'})"
    if kind == "optional_type":
        return f"optional({type_string(type_proto.optional_type.elem_type) or '?'})"
    if kind == "map_type":
        key = _elem_name(type_proto.map_type.key_type)
        return f"map({key},{type_string(type_proto.map_type.value_type) or '?'})"
    return None


def _declared_interface(model: Any) -> tuple[list[tuple[str, list[Any], str]], list[tuple[str, list[Any], str]]]:
    """Graph inputs (initializers excluded) and outputs whose type the file declares, as check_servable takes."""
    initializers = {tensor.name for tensor in model.graph.initializer}

    def entries(values: Any, skip: set[str]) -> list[tuple[str, list[Any], str]]:
        found = []
        for value in values:
            text = type_string(value.type)
            if value.name not in skip and text is not None:
                dims = list(value.type.tensor_type.shape.dim) if value.type.HasField("tensor_type") else []
                found.append((value.name, dims, text))
        return found

    return entries(model.graph.input, initializers), entries(model.graph.output, set())


def _refuse_shapeless_inputs(model: Any) -> None:
    """Refuse (UnsupportedModel) a tensor input that declares no shape at all, as `edgemodel serve` does:
    ONNX Runtime reports it as a scalar, and requests for it could be neither described nor checked."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    shapeless = [
        value.name
        for value in model.graph.input
        if value.name not in initializers
        and value.type.HasField("tensor_type")
        and not value.type.tensor_type.HasField("shape")
    ]
    if shapeless:
        raise BadInputError(
            f"the model cannot be served: inputs {shapeless} declare no shape (any rank), which the inference "
            "server cannot describe or check; give each one (with onnx.shape_inference, or by setting its "
            "dimensions) and build again",
            reason="UnsupportedModel",
        )


def _first_non_text(message: Any) -> bytes | None:
    """The first string field that is not UTF-8 (protobuf hands such proto2 strings over as bytes)."""
    for field, value in message.ListFields():
        if field.type not in {field.TYPE_STRING, field.TYPE_MESSAGE}:
            continue
        values = value if field.is_repeated else [value]
        for item in values:
            found = _first_non_text(item) if field.type == field.TYPE_MESSAGE else item
            if isinstance(found, bytes):
                return found
    return None


def _check_text(model: Any, model_name: str) -> None:
    """Every name, type and attribute string must be text: ONNX Runtime cannot even list them otherwise."""
    bad = _first_non_text(model)
    if bad is not None:
        raise BadInputError(
            f"{model_name}: the model holds a string that is not UTF-8 text ({bad[:40]!r}); ONNX strings are UTF-8",
            reason="InvalidModel",
        )


def _safe_location(location: str) -> bool:
    """A relative path below the model's directory that every filesystem can hold."""
    path = PurePosixPath(location)
    return (
        bool(location)
        and not any(c in location for c in "\\\0")
        and not path.is_absolute()
        and ".." not in path.parts
        and all(0 < len(part.encode()) <= 255 for part in path.parts)
        and len(location.encode()) <= 1024
    )


def _external_locations(model: Any) -> list[str]:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    locations = []
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            entries = {entry.key: entry.value for entry in tensor.external_data}
            location = entries.get("location", "")
            if not _safe_location(location):
                raise BadInputError(
                    f"tensor {tensor.name!r} keeps its data at {location!r}, outside the model's directory; "
                    "external data must be a relative path next to the model",
                    reason="InvalidModel",
                )
            if location not in locations:
                locations.append(location)
    return locations


def inspect(path: Path) -> ModelFacts:
    """Parse a verified model file's structure (not its external weights); refuse what is no model.

    Raises BadInputError (`InvalidModel`) for: a file protobuf cannot parse as an ONNX ModelProto
    (truncated, another format, non-UTF-8 names), no graph, no outputs, a file over the 2 GiB
    protobuf limit, or external data outside the model's directory; and (`UnsupportedModel`) for
    inputs or outputs the file declares with a type the server cannot carry (see `check_servable`;
    types left to inference are checked again once ONNX Runtime has loaded the model).
    """
    from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
    from onnx import ModelProto

    size = path.stat().st_size
    if size > PROTOBUF_LIMIT:
        raise BadInputError(
            f"{path.name} is {size} bytes, above the 2 GiB a single ONNX file can hold; "
            "save the weights as external data (onnx.save_model(..., save_as_external_data=True))",
            reason="InvalidModel",
        )
    model = ModelProto()
    try:
        model.ParseFromString(path.read_bytes())
    except (DecodeError, ValueError, RuntimeError) as error:
        raise BadInputError(f"{path.name} is not an ONNX model: {error}", reason="InvalidModel") from error
    if not model.HasField("graph"):
        raise BadInputError(f"{path.name} is not an ONNX model: it holds no graph", reason="InvalidModel")
    if not model.graph.output:
        raise BadInputError(
            f"{path.name}: the graph declares no outputs, so nothing could be served", reason="InvalidModel"
        )
    _check_text(model, path.name)
    check_servable(*_declared_interface(model))
    _refuse_shapeless_inputs(model)
    return ModelFacts(external_data=tuple(_external_locations(model)))
