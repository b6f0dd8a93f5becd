"""Tensor values in-process: every datatype's every value through the encoder, both decoders and tritonclient.

Complements tests/integration/test_serve_values.py (a real server and an ONNX model) with what no
ONNX Runtime model can produce: arbitrary bytes in BYTES tensors and every float bit pattern.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgemodel_runtime.serve import codec, protocol, transport
from edgemodel_runtime.serve.app import InferenceServer, ServerConfig
from edgemodel_runtime.serve.protocol import ProtocolError, TensorMetadata

DATATYPES = sorted(protocol.carried_datatypes())
shapes = hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=3)


@st.composite
def arrays(draw: st.DrawFn, datatype: str, text_only: bool = False) -> np.ndarray[Any, Any]:
    shape = draw(shapes)
    if datatype != "BYTES":
        return draw(hnp.arrays(protocol.DATATYPES[datatype], shape))
    count = int(np.prod(shape))
    element = st.text(max_size=5).map(str.encode) if text_only else st.binary(max_size=6)
    array = np.empty(count, dtype=object)
    array[:] = draw(st.lists(element, min_size=count, max_size=count))
    return array.reshape(shape)


def _same(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any], bitwise: bool) -> None:
    assert a.shape == b.shape
    assert a.dtype == b.dtype
    if a.dtype == object:
        assert [bytes(v) for v in a.ravel()] == [v.encode() if isinstance(v, str) else bytes(v) for v in b.ravel()]
    elif a.dtype.kind == "f" and not bitwise:
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        assert a[~np.isnan(a)].tobytes() == b[~np.isnan(b)].tobytes()
    else:
        assert a.tobytes() == b.tobytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), datatype=st.sampled_from(DATATYPES), binary=st.booleans())
def test_responses_round_trip_exactly_through_the_shadow_decoder_and_tritonclient(
    data: st.DataObject, datatype: str, binary: bool
) -> None:
    from tritonclient.http import InferResult

    array = data.draw(arrays(datatype, text_only=not binary))
    request = protocol.InferenceRequest({}, binary_outputs={"y"} if binary else set())
    body, headers = protocol.encode_response("m", "1", request, {"y": array})
    length = headers.get(protocol.BINARY_HEADER)
    _same(array, protocol.decode_response(body, length)["y"], bitwise=binary)
    read = InferResult.from_response_body(body, header_length=int(length) if length else None).as_numpy("y")
    _same(array, read.astype(array.dtype) if datatype != "BYTES" else read, bitwise=binary)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), datatype=st.sampled_from(DATATYPES), binary=st.booleans())
def test_requests_tritonclient_writes_parse_to_exactly_its_arrays(
    data: st.DataObject, datatype: str, binary: bool
) -> None:
    import tritonclient.http as httpclient

    array = data.draw(arrays(datatype, text_only=not binary))
    tensor = httpclient.InferInput("x", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    body, length = httpclient.InferenceServerClient.generate_request_body([tensor])
    spec = [TensorMetadata("x", datatype, (-1,) * array.ndim)]
    parsed = protocol.parse_request(body, str(length) if length else None, spec, [TensorMetadata("y", datatype, ())])
    _same(array, parsed.inputs["x"], bitwise=binary)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"[NaN, Infinity, -Infinity, -0.0]", [float("nan"), float("inf"), float("-inf"), -0.0]),
        (b"[18446744073709551615, -9223372036854775808]", [2**64 - 1, -(2**63)]),
    ],
)
def test_json_reads_the_tokens_and_integers_triton_writes(text: bytes, expected: list[Any]) -> None:
    read = codec.loads(text, "test")
    assert [repr(v) for v in read] == [repr(v) for v in expected]


@pytest.mark.parametrize(
    ("data", "datatype", "fragment"),
    [
        ([2**64 - 1, 1], "UINT64", None),
        ([2**63 - 1, -(2**63)], "INT64", None),
        ([2**64, 1], "UINT64", "outside the range of UINT64"),
        ([-1, 1], "UINT64", "outside the range of UINT64"),
        ([1, True], "INT32", "must hold integers"),
        ([1.5, 1], "INT32", "must hold integers"),
        ([1, 0], "BOOL", "must hold booleans"),
        ([70000.0, 1], "FP16", "outside the range of FP16"),
        (["a", 1], "BYTES", "must hold strings"),
        ([["a"], ["b", "c"]], "BYTES", "not a regular array"),
    ],
)
def test_json_data_is_exact_or_refused(data: list[Any], datatype: str, fragment: str | None) -> None:
    if fragment is None:
        assert codec.from_json(data, datatype, (2,), "x").tolist() == data
        return
    with pytest.raises(ProtocolError, match=fragment):
        codec.from_json(data, datatype, (len(data),), "x")


def test_bytes_json_cannot_carry_are_refused_naming_the_element() -> None:
    array = np.array([b"ok", b"\xff"], dtype=object)
    with pytest.raises(ProtocolError, match="element 1 is not UTF-8 text, which JSON cannot carry"):
        protocol.encode_response("m", "1", protocol.InferenceRequest({}), {"y": array})


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"\x02", "must hold bytes 0 or 1"),
    ],
)
def test_binary_bool_must_be_zero_or_one(raw: bytes, fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment):
        codec.from_binary(raw, "BOOL", (1,), "x")


@pytest.mark.parametrize(
    ("raw", "count", "fragment"),
    [
        (b"\x01\x00\x00", 1, "ends before element 0"),
        (b"\x05\x00\x00\x00ab", 1, "claims 5 bytes past the end"),
        (b"\x00\x00\x00\x00\x00", 1, "1 bytes of BYTES data follow"),
    ],
)
def test_binary_bytes_that_do_not_add_up_are_refused(raw: bytes, count: int, fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment):
        codec.from_binary(raw, "BYTES", (count,), "x")


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, None),
        ("identity", None),
        ("gzip", "gzip"),
        ("br, deflate;q=0.5", "deflate"),
        ("gzip;q=0, deflate", "deflate"),
        ("*", "gzip"),
    ],
)
def test_response_encoding_follows_accept_encoding(accept: str | None, chosen: str | None) -> None:
    assert transport.response_encoding(accept) == chosen


# ---------------------------------------------------------------- timeout (a model slow on demand)


class _SlowModel:
    """An engine that takes `seconds` per inference: a real model is not slow on demand."""

    platform = "test"

    def __init__(self, seconds: float) -> None:
        self.inputs = [TensorMetadata("x", "FP32", (1,))]
        self.outputs = [TensorMetadata("y", "FP32", (1,))]
        self.seconds = seconds
        self.started = threading.Event()

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        self.started.set()
        time.sleep(self.seconds)
        return {"y": inputs["x"]}

    def warm_up(self) -> None:
        return None


def test_the_timeout_parameter_bounds_the_wait_for_the_engine() -> None:
    def body(timeout: int | None) -> dict[str, Any]:
        request: dict[str, Any] = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
        if timeout is not None:
            request["parameters"] = {"timeout": timeout}
        return request

    async def scenario() -> list[int]:
        model = _SlowModel(0.5)
        app = InferenceServer(model, ServerConfig(name="m"))
        await app.startup()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            first = asyncio.create_task(client.post("/v2/models/m/infer", json=body(None)))
            await asyncio.to_thread(model.started.wait, 5)
            bounded = await client.post("/v2/models/m/infer", json=body(1000))  # 1 ms: the engine is busy
            unbounded = asyncio.create_task(client.post("/v2/models/m/infer", json=body(0)))  # 0: no bound
            assert "timeout of 1000 microseconds" in bounded.json()["error"]
            return [(await first).status_code, bounded.status_code, (await unbounded).status_code]

    assert asyncio.run(scenario()) == [200, 503, 200]


# ---------------------------------------------------------------- fuzz: only ever a value or a ProtocolError


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64), datatype=st.sampled_from(DATATYPES), shape=shapes)
def test_fuzz_binary_data_only_ever_parses_or_refuses(raw: bytes, datatype: str, shape: tuple[int, ...]) -> None:
    try:
        array = codec.from_binary(raw, datatype, shape, "x")
    except ProtocolError as error:
        status = error.status
        assert 400 <= status < 500
        return
    assert array.shape == shape
    assert codec.to_binary(array) == raw


json_leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4)
json_data = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(data=json_data, datatype=st.sampled_from(DATATYPES), shape=shapes)
def test_fuzz_json_data_only_ever_parses_or_refuses(data: Any, datatype: str, shape: tuple[int, ...]) -> None:
    try:
        array = codec.from_json(data, datatype, shape, "x")
    except ProtocolError as error:
        status = error.status
        assert 400 <= status < 500
        return
    assert array.shape == shape
    assert array.dtype == protocol.DATATYPES[datatype]


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=128), header=st.none() | st.integers(-2, 130).map(str))
def test_fuzz_the_shadow_decoder_only_ever_decodes_or_refuses(body: bytes, header: str | None) -> None:
    try:
        protocol.decode_response(body, header)
    except ProtocolError as error:
        status = error.status
        assert 400 <= status < 500


def _answer(outputs: list[dict[str, Any]], binary: bytes = b"") -> tuple[bytes, str | None]:
    header = orjson.dumps({"model_name": "m", "outputs": outputs})
    return header + binary, (str(len(header)) if binary else None)


@pytest.mark.parametrize(
    ("outputs", "binary", "message"),
    [
        (
            [{"name": "y", "datatype": "FP32", "shape": [1], "data": [1.0]},
             {"name": "y", "datatype": "FP32", "shape": [1], "data": [2.0]}],
            b"", "output 'y' appears twice",
        ),
        (
            [{"name": "y", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}},
             {"name": "y", "datatype": "FP32", "shape": [1], "data": [2.0]}],
            np.float32(1).tobytes(), "output 'y' appears twice",
        ),
        (
            [{"name": "y", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}],
            np.array([1, 2], np.float32).tobytes(), "4 bytes of binary data are not claimed by any output",
        ),
    ],
    ids=["twice in JSON", "twice, binary then JSON", "unclaimed binary bytes"],
)  # fmt: skip
def test_an_answer_the_shadow_decoder_cannot_read_one_way_is_refused_not_half_read(
    outputs: list[dict[str, Any]], binary: bytes, message: str
) -> None:
    """Which of two values for one output would be compared, or whether the sizes are right, is a guess."""
    body, header = _answer(outputs, binary)
    with pytest.raises(ProtocolError, match=message):
        protocol.decode_response(body, header)
