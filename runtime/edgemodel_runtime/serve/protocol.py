"""Open Inference Protocol v2 (REST): parse requests into tensors and encode responses.

Pure functions over bytes and numpy arrays. Every problem with a client's request raises
ProtocolError with a 4xx status and a message naming the field, never anything else, so the
server can answer 400 instead of failing (the fuzz tests hold it to that).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

BINARY_HEADER = "inference-header-content-length"

DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
NUMPY_TO_DATATYPE = {dtype: name for name, dtype in DATATYPES.items()}
MAX_DIMS = 16


class ProtocolError(Exception):
    """A request the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TensorMetadata:
    """A model input or output as OIP describes it (-1 for a dynamic dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class InferenceRequest:
    """A parsed request: input arrays by name, and how the client wants outputs."""

    inputs: dict[str, npt.NDArray[Any]]
    id: str | None = None
    requested_outputs: list[str] | None = None
    binary_outputs: set[str] = field(default_factory=set)
    parameters: dict[str, Any] = field(default_factory=dict)


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be a JSON object")
    return value


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_DIMS:
        raise ProtocolError(f"{where}.shape must be a list of at most {MAX_DIMS} integers")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in value):
        raise ProtocolError(f"{where}.shape must hold non-negative integers")
    return tuple(value)


_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}  # element kinds JSON data may have, per target kind


def _from_json(data: Any, dtype: np.dtype[Any], count: int, where: str) -> npt.NDArray[Any]:
    """JSON numbers (flat or nested) as an array of `dtype`, converted by numpy in one pass.

    Refused: ragged nesting, strings, booleans for numbers, numbers for booleans, fractions
    for integer types, and values out of the type's range.
    """
    if not isinstance(data, list):
        raise ProtocolError(f"{where}.data must be a list")
    try:
        parsed = np.asarray(data)
    except (ValueError, TypeError, OverflowError) as error:
        raise ProtocolError(f"{where}.data is not a regular array of numbers: {error}") from error
    if parsed.size != count:
        raise ProtocolError(f"{where}.data holds {parsed.size} elements; its shape needs {count}")
    if count == 0:
        return np.empty(0, dtype=dtype)
    if parsed.dtype.kind not in _KINDS[dtype.kind]:
        wanted = "booleans" if dtype.kind == "b" else "integers" if dtype.kind in "iu" else "numbers"
        raise ProtocolError(f"{where}.data must hold {wanted} for datatype {NUMPY_TO_DATATYPE[dtype]}")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if parsed.min() < info.min or parsed.max() > info.max:
            raise ProtocolError(f"{where}.data holds integers outside the range of {dtype}")
    return parsed.astype(dtype, copy=False).ravel()


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError as error:
        raise ProtocolError("Inference-Header-Content-Length must be an integer") from error
    if not 0 <= length <= len(body):
        raise ProtocolError(f"Inference-Header-Content-Length {length} exceeds the body of {len(body)} bytes")
    return body[:length], body[length:]


def _check_shape(name: str, dims: tuple[int, ...], spec: TensorMetadata) -> None:
    if len(dims) != len(spec.shape) or any(s not in {-1, d} for s, d in zip(spec.shape, dims, strict=True)):
        raise ProtocolError(f"input {name!r} has shape {list(dims)}; the model expects {list(spec.shape)} (-1: any)")


def _parse_input(
    index: int, raw: Any, expected: Mapping[str, TensorMetadata], binary: bytes, offset: int
) -> tuple[str, npt.NDArray[Any], int]:
    """One entry of `inputs`: its name, its array, and the binary offset after it."""
    entry = _object(raw, f"inputs[{index}]")
    name = entry.get("name")
    if not isinstance(name, str) or name not in expected:
        raise ProtocolError(f"inputs[{index}].name {name!r} is not an input of the model ({sorted(expected)})")
    datatype = entry.get("datatype")
    if datatype not in DATATYPES:
        raise ProtocolError(f"input {name!r} has unsupported datatype {datatype!r}")
    if datatype != expected[name].datatype:
        raise ProtocolError(f"input {name!r} has datatype {datatype}; the model expects {expected[name].datatype}")
    dtype = DATATYPES[datatype]
    shape = _shape(entry.get("shape"), f"input {name!r}")
    _check_shape(name, shape, expected[name])
    count = math.prod(shape)
    parameters = _object(entry.get("parameters", {}), f"input {name!r}.parameters")
    size = parameters.get("binary_data_size")
    if size is None:
        array = _from_json(entry.get("data"), dtype, count, f"input {name!r}").reshape(shape)
    else:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise ProtocolError(f"input {name!r}: binary_data_size {size!r} does not fit the binary body")
        if size != count * dtype.itemsize:
            raise ProtocolError(
                f"input {name!r}: {size} bytes of binary data, but shape {list(shape)} of {datatype} "
                f"needs {count * dtype.itemsize}"
            )
        array = (
            np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
            if count
            else np.empty(shape, dtype=dtype)
        )
        offset += size
    return name, array, offset


def parse_request(
    body: bytes, header_length: str | None, inputs: Sequence[TensorMetadata], outputs: Sequence[TensorMetadata]
) -> InferenceRequest:
    """Parse an infer request against the model's inputs and outputs."""
    header, binary = _split(body, header_length)
    try:
        document = orjson.loads(header)
    except orjson.JSONDecodeError as error:
        raise ProtocolError(f"request body is not valid JSON: {error}") from error
    request = _object(document, "request")
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("request.inputs must be a non-empty list")
    expected = {spec.name: spec for spec in inputs}
    parsed: dict[str, npt.NDArray[Any]] = {}
    offset = 0
    for index, raw in enumerate(raw_inputs):
        name, array, offset = _parse_input(index, raw, expected, binary, offset)
        if name in parsed:
            raise ProtocolError(f"input {name!r} appears twice")
        parsed[name] = array
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    missing = sorted(set(expected) - set(parsed))
    if missing:
        raise ProtocolError(f"inputs {missing} are missing")
    request_parameters = _object(request.get("parameters", {}), "request.parameters")
    names, binary_outputs = _requested_outputs(request, outputs, bool(request_parameters.get("binary_data_output")))
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("request.id must be a string")
    return InferenceRequest(parsed, request_id, names, binary_outputs, request_parameters)


def _requested_outputs(
    request: Mapping[str, Any], outputs: Sequence[TensorMetadata], binary_default: bool
) -> tuple[list[str] | None, set[str]]:
    known = {spec.name for spec in outputs}
    raw = request.get("outputs")
    if raw is None:
        return None, set(known) if binary_default else set()
    if not isinstance(raw, list):
        raise ProtocolError("request.outputs must be a list")
    names: list[str] = []
    binary: set[str] = set()
    for index, item in enumerate(raw):
        entry = _object(item, f"outputs[{index}]")
        name = entry.get("name")
        if not isinstance(name, str) or name not in known:
            raise ProtocolError(f"outputs[{index}].name {name!r} is not an output of the model ({sorted(known)})")
        names.append(name)
        parameters = _object(entry.get("parameters", {}), f"outputs[{index}].parameters")
        if parameters.get("binary_data", binary_default):
            binary.add(name)
    return names, binary


def encode_response(
    model_name: str,
    model_version: str | None,
    request: InferenceRequest,
    outputs: Mapping[str, npt.NDArray[Any]],
) -> tuple[bytes, dict[str, str]]:
    """The response body and the headers it needs (binary outputs follow the JSON header)."""
    names = request.requested_outputs or list(outputs)
    entries = []
    chunks: list[bytes] = []
    for name in names:
        array = np.ascontiguousarray(outputs[name])
        datatype = NUMPY_TO_DATATYPE.get(array.dtype)
        if datatype is None:
            raise ProtocolError(f"output {name!r} has type {array.dtype}, which OIP cannot carry", status=500)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if name in request.binary_outputs:
            raw = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            # orjson writes numpy arrays natively, far faster than via Python lists.
            entry["data"] = array.ravel() if array.dtype != np.float16 else array.ravel().tolist()
        entries.append(entry)
    document: dict[str, Any] = {"model_name": model_name, "outputs": entries}
    if model_version:
        document["model_version"] = model_version
    if request.id is not None:
        document["id"] = request.id
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, {"content-type": "application/json"}
    return header + b"".join(chunks), {
        "content-type": "application/octet-stream",
        BINARY_HEADER: str(len(header)),
    }


def decode_response(body: bytes, header_length: str | None) -> dict[str, npt.NDArray[Any]]:
    """Output arrays of an infer response (JSON or binary), as another OIP server sent it."""
    header, binary = _split(body, header_length)
    try:
        document = _object(orjson.loads(header), "response")
    except orjson.JSONDecodeError as error:
        raise ProtocolError(f"response is not valid JSON: {error}") from error
    raw_outputs = document.get("outputs")
    if not isinstance(raw_outputs, list):
        raise ProtocolError("response.outputs must be a list")
    arrays: dict[str, npt.NDArray[Any]] = {}
    offset = 0
    for index, raw in enumerate(raw_outputs):
        entry = _object(raw, f"outputs[{index}]")
        name, datatype = entry.get("name"), entry.get("datatype")
        if not isinstance(name, str) or datatype not in DATATYPES:
            raise ProtocolError(f"outputs[{index}] lacks a name or a supported datatype")
        dtype, shape = DATATYPES[datatype], _shape(entry.get("shape"), f"output {name!r}")
        size = _object(entry.get("parameters", {}), f"output {name!r}.parameters").get("binary_data_size")
        if size is None:
            arrays[name] = _from_json(entry.get("data"), dtype, math.prod(shape), f"output {name!r}").reshape(shape)
            continue
        if not isinstance(size, int) or size != math.prod(shape) * dtype.itemsize or offset + size > len(binary):
            raise ProtocolError(f"output {name!r}: binary_data_size {size!r} does not fit")
        arrays[name] = np.frombuffer(binary, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
        offset += size
    return arrays
