"""Open Inference Protocol v2 (REST): parse requests into tensors and encode responses.

Pure functions over bytes and numpy arrays; tensor values cross through `codec`. Every problem
with a client's request raises ProtocolError with a 4xx status and a message naming the field,
never anything else, so the server can answer 400 instead of failing (the fuzz tests hold it to
that). Every field and parameter a standard client can send is either honoured or refused with a
message naming it: nothing is silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy.typing as npt
import orjson

from edgemodel_runtime.serve import codec
from edgemodel_runtime.serve.codec import (
    DATATYPES,
    NUMPY_TO_DATATYPE,
    ORT_TYPES,
    ProtocolError,
    carried_datatypes,
)

__all__ = [
    "BINARY_HEADER",
    "DATATYPES",
    "MAX_DIMS",
    "NUMPY_TO_DATATYPE",
    "ORT_TYPES",
    "InferenceRequest",
    "ProtocolError",
    "TensorMetadata",
    "carried_datatypes",
    "decode_response",
    "encode_response",
    "parse_request",
]

BINARY_HEADER = "inference-header-content-length"
MAX_DIMS = 64  # numpy's limit

_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_SHARED_MEMORY_REFUSAL = (
    "the shared memory extension is not supported by this server; send the tensor's data in JSON "
    "or as binary data after the JSON header"
)
_REQUEST_PARAMETERS = ("binary_data_output", "timeout", "priority (0)", "sequence_id (0)")


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
    """A parsed request: input arrays by name, how the client wants outputs, and its time bound.

    `timeout_us`: the most microseconds the request may wait for the engine (request parameter
    `timeout`, as tritonclient sets it); None for no bound.
    """

    inputs: dict[str, npt.NDArray[Any]]
    id: str | None = None
    requested_outputs: list[str] | None = None
    binary_outputs: set[str] = field(default_factory=set)
    parameters: dict[str, Any] = field(default_factory=dict)
    timeout_us: int | None = None


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be a JSON object")
    return value


def _parameters(value: Any, where: str) -> dict[str, Any]:
    """A `parameters` object; absent or null means none."""
    return {} if value is None else _object(value, where)


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_DIMS:
        raise ProtocolError(f"{where}.shape must be a list of at most {MAX_DIMS} integers")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in value):
        raise ProtocolError(f"{where}.shape must hold non-negative integers")
    return tuple(value)


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_tensor_parameters(parameters: dict[str, Any], where: str, known: tuple[str, ...]) -> None:
    if any(key in parameters for key in _SHARED_MEMORY):
        raise ProtocolError(f"{where} names a shared memory region: {_SHARED_MEMORY_REFUSAL}")
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise ProtocolError(f"{where}.parameters {unknown} are not supported; this server understands {list(known)}")


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
        raise ProtocolError(
            f"input {name!r} has unsupported datatype {datatype!r}; this server carries {sorted(DATATYPES)}"
        )
    if datatype != expected[name].datatype:
        raise ProtocolError(f"input {name!r} has datatype {datatype}; the model expects {expected[name].datatype}")
    shape = _shape(entry.get("shape"), f"input {name!r}")
    _check_shape(name, shape, expected[name])
    where = f"input {name!r}"
    parameters = _parameters(entry.get("parameters"), f"{where}.parameters")
    _check_tensor_parameters(parameters, where, ("binary_data_size",))
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in entry:
            raise ProtocolError(f"{where} has neither data nor parameters.binary_data_size")
        return name, codec.from_json(entry["data"], datatype, shape, where), offset
    if "data" in entry:
        raise ProtocolError(f"{where} has both data and binary_data_size; send one")
    if not _is_int(size) or size < 0 or offset + size > len(binary):
        raise ProtocolError(f"{where}: binary_data_size {size!r} does not fit the binary body")
    array = codec.from_binary(memoryview(binary)[offset : offset + size], datatype, shape, where)
    return name, array, offset + size


def _check_request_parameters(parameters: dict[str, Any]) -> int | None:
    """Validate the request's parameters; the timeout in microseconds, if one was set."""
    if "binary_data_output" in parameters and not isinstance(parameters["binary_data_output"], bool):
        raise ProtocolError("request.parameters.binary_data_output must be true or false")
    timeout = parameters.get("timeout")
    if timeout is not None and (not _is_int(timeout) or timeout < 0):
        raise ProtocolError("request.parameters.timeout must be a non-negative integer (microseconds)")
    priority = parameters.get("priority", 0)
    if priority != 0 or isinstance(priority, bool):
        raise ProtocolError(
            f"request.parameters.priority {priority!r} is not supported: this server has one queue and serves "
            "requests in arrival order (priority 0)"
        )
    sequence = {key: parameters[key] for key in ("sequence_id", "sequence_start", "sequence_end") if key in parameters}
    if sequence.get("sequence_id", 0) not in (0, "") or sequence.get("sequence_start") or sequence.get("sequence_end"):
        raise ProtocolError(
            f"the sequence extension is not supported ({sequence}): this server serves stateless models, "
            "each request on its own"
        )
    known = ("binary_data_output", "timeout", "priority", "sequence_id", "sequence_start", "sequence_end")
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise ProtocolError(
            f"request.parameters {unknown} are not supported; this server understands {list(_REQUEST_PARAMETERS)}"
        )
    return timeout


_REQUEST_FIELDS = ("id", "inputs", "outputs", "parameters", "model_name", "model_version")


def _check_request_fields(request: Mapping[str, Any], model: tuple[str, str | None] | None) -> None:
    """Unknown top-level fields are refused; model_name and model_version (KServe's client sends
    them) must name the model the URL names."""
    unknown = sorted(set(request) - set(_REQUEST_FIELDS))
    if unknown:
        raise ProtocolError(f"request fields {unknown} are not part of the protocol; known: {list(_REQUEST_FIELDS)}")
    if model is None:
        return
    for key, served in zip(("model_name", "model_version"), model, strict=True):
        value = request.get(key)
        if value is not None and served is not None and value != served:
            raise ProtocolError(f"request.{key} {value!r} does not match the model this URL names ({served!r})")


def parse_request(
    body: bytes,
    header_length: str | None,
    inputs: Sequence[TensorMetadata],
    outputs: Sequence[TensorMetadata],
    model: tuple[str, str | None] | None = None,
) -> InferenceRequest:
    """Parse an infer request (its body already decompressed) against the model's inputs and outputs.

    `model`: the (name, version) the request's URL names, which request.model_name and
    request.model_version must match when present.
    """
    header, binary = _split(body, header_length)
    request = _object(codec.loads(header, "request body"), "request")
    _check_request_fields(request, model)
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
    request_parameters = _parameters(request.get("parameters"), "request.parameters")
    timeout = _check_request_parameters(request_parameters)
    names, binary_outputs = _requested_outputs(request, outputs, request_parameters.get("binary_data_output", False))
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("request.id must be a string")
    return InferenceRequest(parsed, request_id, names, binary_outputs, request_parameters, timeout)


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
        if name in names:
            raise ProtocolError(f"output {name!r} is requested twice")
        names.append(name)
        parameters = _parameters(entry.get("parameters"), f"outputs[{index}].parameters")
        if "classification" in parameters:
            raise ProtocolError(
                f"output {name!r}: the classification extension (class_count) is not supported; "
                "request the output itself and take its top classes on the client"
            )
        _check_tensor_parameters(parameters, f"output {name!r}", ("binary_data",))
        wants_binary = parameters.get("binary_data", binary_default)
        if not isinstance(wants_binary, bool):
            raise ProtocolError(f"output {name!r}: parameters.binary_data must be true or false")
        if wants_binary:
            binary.add(name)
    return names or None, binary if names else (set(known) if binary_default else set())


def encode_response(
    model_name: str,
    model_version: str | None,
    request: InferenceRequest,
    outputs: Mapping[str, npt.NDArray[Any]],
) -> tuple[bytes, dict[str, str]]:
    """The response body and the headers it needs (binary outputs follow the JSON header).

    JSON data is written by `codec.to_json` (NaN and infinities as the tokens Triton writes);
    an output JSON cannot carry (BYTES that are not UTF-8) raises ProtocolError naming it.
    """
    names = request.requested_outputs or list(outputs)
    entries: list[bytes] = []
    chunks: list[bytes] = []
    for name in names:
        array = outputs[name]
        datatype = NUMPY_TO_DATATYPE.get(array.dtype)
        if datatype is None:
            raise ProtocolError(f"output {name!r} has type {array.dtype}, which OIP cannot carry", status=500)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if name in request.binary_outputs:
            raw = codec.to_binary(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
            entries.append(orjson.dumps(entry))
        else:
            entries.append(orjson.dumps(entry)[:-1] + b',"data":' + codec.to_json(array, f"output {name!r}") + b"}")
    document: dict[str, Any] = {"model_name": model_name}
    if model_version:
        document["model_version"] = model_version
    if request.id is not None:
        document["id"] = request.id
    header = orjson.dumps(document)[:-1] + b',"outputs":[' + b",".join(entries) + b"]}"
    if not chunks:
        return header, {"content-type": "application/json"}
    return header + b"".join(chunks), {
        "content-type": "application/octet-stream",
        BINARY_HEADER: str(len(header)),
    }


def decode_response(body: bytes, header_length: str | None) -> dict[str, npt.NDArray[Any]]:
    """Output arrays of an infer response (JSON or binary), as another OIP server sent it.

    Values arrive exactly as `encode_response` wrote them; BYTES elements as `bytes`. An output named
    twice, or binary data no output claims, is refused (ProtocolError) rather than read one way.
    """
    header, binary = _split(body, header_length)
    document = _object(codec.loads(header, "response"), "response")
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
        if name in arrays:
            raise ProtocolError(f"output {name!r} appears twice")
        shape = _shape(entry.get("shape"), f"output {name!r}")
        size = _parameters(entry.get("parameters"), f"output {name!r}.parameters").get("binary_data_size")
        if size is None:
            arrays[name] = codec.from_json(entry.get("data"), datatype, shape, f"output {name!r}")
            continue
        if not _is_int(size) or size < 0 or offset + size > len(binary):
            raise ProtocolError(f"output {name!r}: binary_data_size {size!r} does not fit")
        data = memoryview(binary)[offset : offset + size]
        arrays[name] = codec.from_binary(data, datatype, shape, f"output {name!r}")
        offset += size
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data are not claimed by any output")
    return arrays
