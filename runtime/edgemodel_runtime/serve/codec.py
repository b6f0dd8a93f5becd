"""Tensor values of the Open Inference Protocol v2: datatypes, JSON data and binary data, both ways.

Pure functions over numpy arrays. Every value a datatype can hold crosses exactly:

- Integers travel as JSON integers of any size (never through floats), so INT64/UINT64 beyond 2**53
  arrive as sent.
- Floats travel as the shortest decimal that reads back to the same value; NaN, Infinity and
  -Infinity, which JSON numbers cannot express, travel as the bare tokens `NaN`, `Infinity` and
  `-Infinity`, as Triton writes them and tritonclient (rapidjson) reads them. Binary data carries
  every bit pattern as is.
- BYTES elements are byte strings (numpy object arrays of `bytes`): JSON strings (UTF-8) or, in
  binary, each element as a 4-byte little-endian length and its bytes (Triton's layout).

BF16 is not carried: ONNX Runtime's Python API cannot exchange it with numpy, so the build refuses
models that use it (see `carried_datatypes`).

Every problem with a client's data raises ProtocolError (400) naming the tensor.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

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
    "BYTES": np.dtype(object),
}
NUMPY_TO_DATATYPE = {dtype: name for name, dtype in DATATYPES.items()}

# ONNX Runtime's type strings for the tensors it exchanges with numpy, by OIP datatype.
ORT_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
_LENGTH = struct.Struct("<I")


class ProtocolError(Exception):
    """A request the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def carried_datatypes() -> frozenset[str]:
    """The OIP datatypes this server carries in requests and responses (JSON and binary alike)."""
    return frozenset(DATATYPES)


# ---------------------------------------------------------------- JSON documents


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text} is too large for a double")
    return value


def loads(text: bytes, what: str) -> Any:
    """Parse a JSON document; the tokens NaN, Infinity and -Infinity are read as those floats.

    orjson first (fast); a document it refuses is parsed again by the standard library, which
    accepts the non-finite tokens that Triton and tritonclient write. Numbers too large for a
    double are refused, as rapidjson refuses them.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:  # its message, not orjson's, which would point at the first NaN or Infinity token
        return json.loads(text, parse_float=_finite_float)
    except RecursionError as error:
        raise ProtocolError(f"{what} is not valid JSON: nested too deeply") from error
    except ValueError as error:
        raise ProtocolError(f"{what} is not valid JSON: {error}") from error


# ---------------------------------------------------------------- JSON data


def _elements(data: Any, count: int, where: str) -> npt.NDArray[Any]:
    """Nested JSON lists as one flat object array, refused unless regular and of `count` elements."""
    if not isinstance(data, list):
        raise ProtocolError(f"{where}.data must be a list")
    try:
        parsed = np.array(data, dtype=object)
    except (ValueError, TypeError) as error:
        raise ProtocolError(f"{where}.data is not a regular array: {error}") from error
    flat = parsed.ravel()
    if any(isinstance(item, list | dict) for item in flat):
        raise ProtocolError(f"{where}.data is not a regular array: its nesting is ragged")
    if flat.size != count:
        raise ProtocolError(f"{where}.data holds {flat.size} elements; its shape needs {count}")
    return flat


def _strings_from_json(data: Any, count: int, where: str) -> npt.NDArray[Any]:
    flat = _elements(data, count, where)
    out = np.empty(count, dtype=object)
    for index, item in enumerate(flat):
        if not isinstance(item, str):
            raise ProtocolError(f"{where}.data must hold strings for datatype BYTES (element {index})")
        try:
            out[index] = item.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ProtocolError(f"{where}.data element {index} is not valid Unicode: {error}") from error
    return out


_JSON_TYPES: dict[str, tuple[set[type], str]] = {
    "b": ({bool}, "booleans"),
    "i": ({int}, "integers"),
    "u": ({int}, "integers"),
    "f": ({int, float}, "numbers"),
}


def _leaves(data: list[Any], depth: int) -> list[Any]:
    """The elements of a regular nested list `depth` levels deep, row-major."""
    for _ in range(depth - 1):
        data = list(itertools.chain.from_iterable(data))
    return data


def from_json(data: Any, datatype: str, shape: tuple[int, ...], where: str) -> npt.NDArray[Any]:
    """JSON `data` (flat or nested, row-major) as an array of `datatype` and `shape`.

    Refused: ragged nesting, a count that does not match the shape, strings for numbers, booleans
    for numbers, numbers for booleans, fractions for integers, integers outside the type's range,
    finite numbers that overflow the float type, and anything but strings for BYTES. Integers
    never pass through floats, so INT64 and UINT64 arrive exactly.
    """
    count = math.prod(shape)
    if datatype == "BYTES":
        return _strings_from_json(data, count, where).reshape(shape)
    dtype = DATATYPES[datatype]
    if not isinstance(data, list):
        raise ProtocolError(f"{where}.data must be a list")
    try:  # the fast path: numpy reads regular numbers in one pass
        parsed: npt.NDArray[Any] | None = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        parsed = None
    if parsed is None or parsed.dtype.kind not in "biuf":
        parsed, values = None, list(_elements(data, count, where))  # ragged, strings, or integers beyond int64
    elif parsed.size != count:
        raise ProtocolError(f"{where}.data holds {parsed.size} elements; its shape needs {count}")
    else:
        values = _leaves(data, parsed.ndim)
    allowed, wanted = _JSON_TYPES[dtype.kind]
    if not set(map(type, values)) <= allowed:
        raise ProtocolError(f"{where}.data must hold {wanted} for datatype {datatype}")
    if count == 0:
        return _empty(shape, dtype, where)
    return _convert(parsed, values, dtype, where).reshape(shape)


def _convert(parsed: npt.NDArray[Any] | None, values: list[Any], dtype: np.dtype[Any], where: str) -> npt.NDArray[Any]:
    """Checked JSON numbers (numpy's reading of them, when it has one) as a flat array of `dtype`."""
    datatype = NUMPY_TO_DATATYPE[dtype]
    if dtype.kind in "iu":
        if parsed is not None and parsed.dtype.kind in "iu":
            bounds = np.iinfo(dtype)
            if parsed.min() < bounds.min or parsed.max() > bounds.max:
                raise ProtocolError(f"{where}.data holds integers outside the range of {datatype}")
            return parsed.astype(dtype).ravel()
        try:  # a mix numpy would read as floats: exactly, from the Python integers
            return np.array(values, dtype=dtype)
        except OverflowError as error:
            raise ProtocolError(f"{where}.data holds integers outside the range of {datatype}") from error
    if dtype.kind == "b":
        return np.array(values, dtype=dtype)
    try:
        wide = parsed.astype(np.float64, copy=False).ravel() if parsed is not None else np.array(values, np.float64)
    except OverflowError as error:
        raise ProtocolError(f"{where}.data holds numbers outside the range of {datatype}") from error
    with np.errstate(over="ignore"):
        array = wide.astype(dtype, copy=False)
    if not np.isfinite(array).all() and (np.isinf(array) & np.isfinite(wide)).any():
        raise ProtocolError(f"{where}.data holds finite numbers outside the range of {datatype}")
    return array


def _float_text(flat: npt.NDArray[Any]) -> bytes:
    """A flat float array as a JSON list: shortest round-trip decimals, NaN/Infinity as tokens."""
    wide = flat.astype(np.float32) if flat.dtype == np.float16 else flat  # orjson has no float16
    text = orjson.dumps(wide, option=orjson.OPT_SERIALIZE_NUMPY)
    finite = np.isfinite(flat)
    if finite.all():
        return text
    items = text[1:-1].split(b",")  # orjson writes null for every non-finite element
    for index in np.flatnonzero(~finite):
        value = flat[index]
        items[index] = b"NaN" if np.isnan(value) else b"Infinity" if value > 0 else b"-Infinity"
    return b"[" + b",".join(items) + b"]"


def to_json(array: npt.NDArray[Any], where: str) -> bytes:
    """The JSON text of an array's `data` (flat, row-major).

    BYTES elements must be UTF-8 text to be JSON strings; others are refused (400), naming the
    element, so that the client asks for that tensor as binary data instead.
    """
    flat = np.ascontiguousarray(array).ravel()
    if flat.dtype.kind == "f":
        return _float_text(flat)
    if flat.dtype == object:
        texts = []
        for index, item in enumerate(flat):
            try:
                texts.append(item if isinstance(item, str) else bytes(item).decode("utf-8"))
            except UnicodeDecodeError as error:
                raise ProtocolError(
                    f"{where} element {index} is not UTF-8 text, which JSON cannot carry; "
                    "request it as binary data (binary_data: true)"
                ) from error
        return orjson.dumps(texts)
    return orjson.dumps(flat, option=orjson.OPT_SERIALIZE_NUMPY)


# ---------------------------------------------------------------- binary data


def _empty(shape: tuple[int, ...], dtype: np.dtype[Any], where: str) -> npt.NDArray[Any]:
    try:
        return np.full(shape, b"", dtype=object) if dtype.kind == "O" else np.empty(shape, dtype=dtype)
    except ValueError as error:
        raise ProtocolError(f"{where}: shape {list(shape)} is too large: {error}") from error


def _strings_from_binary(raw: memoryview, count: int, where: str) -> npt.NDArray[Any]:
    out = np.empty(count, dtype=object)
    offset = 0
    for index in range(count):
        if offset + 4 > len(raw):
            raise ProtocolError(f"{where}: binary BYTES data ends before element {index} of {count}")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ProtocolError(f"{where}: BYTES element {index} claims {length} bytes past the end of its data")
        out[index] = bytes(raw[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise ProtocolError(f"{where}: {len(raw) - offset} bytes of BYTES data follow its {count} elements")
    return out


def from_binary(raw: bytes | memoryview, datatype: str, shape: tuple[int, ...], where: str) -> npt.NDArray[Any]:
    """Binary tensor data (exactly this tensor's bytes) as an array of `datatype` and `shape`.

    Fixed-size types are little-endian, row-major, `itemsize` bytes per element; BOOL is one byte,
    0 or 1. BYTES is a 4-byte little-endian length before each element.
    """
    view = memoryview(raw)
    count = math.prod(shape)
    if datatype == "BYTES":
        return _strings_from_binary(view, count, where).reshape(shape)
    dtype = DATATYPES[datatype]
    if len(view) != count * dtype.itemsize:
        raise ProtocolError(
            f"{where}: {len(view)} bytes of binary data, but shape {list(shape)} of {datatype} "
            f"needs {count * dtype.itemsize}"
        )
    if count == 0:
        return _empty(shape, dtype, where)
    if dtype.kind == "b" and (np.frombuffer(view, dtype=np.uint8) > 1).any():
        raise ProtocolError(f"{where}: binary BOOL data must hold bytes 0 or 1")
    return np.frombuffer(view, dtype=dtype).reshape(shape)


def to_binary(array: npt.NDArray[Any]) -> bytes:
    """An array's binary tensor data (the inverse of `from_binary`)."""
    if array.dtype != object:
        return np.ascontiguousarray(array).tobytes()
    parts = []
    for item in np.ascontiguousarray(array).ravel():
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts += [_LENGTH.pack(len(data)), data]
    return b"".join(parts)
