"""The OIP v2 request parser and the ASGI app in-process: a fuzz target and table-driven cases."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgemodel_runtime.serve import protocol
from edgemodel_runtime.serve.app import InferenceServer, ServerConfig
from edgemodel_runtime.serve.protocol import ProtocolError, TensorMetadata

INPUTS = [TensorMetadata("x", "FP32", (-1, 4)), TensorMetadata("mask", "BOOL", (-1,))]
OUTPUTS = [TensorMetadata("y", "FP32", (-1, 2))]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=30,
)
plausible_inputs = st.fixed_dictionaries(
    {"name": st.sampled_from(["x", "mask", "other", 3])},
    optional={
        "shape": st.lists(st.integers(-2, 6), max_size=4) | json_values,
        "datatype": st.sampled_from(["FP32", "BOOL", "INT64", "BYTES", None]),
        "data": st.lists(st.floats(allow_nan=False) | st.booleans() | st.integers(), max_size=30) | json_values,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-4, 64) | json_values}),
    },
)
requests = st.fixed_dictionaries(
    {"inputs": st.lists(plausible_inputs, max_size=3) | json_values},
    optional={"outputs": json_values, "parameters": json_values, "id": json_values},
)


def _check(body: bytes, header: str | None) -> None:
    try:
        parsed = protocol.parse_request(body, header, INPUTS, OUTPUTS)
    except ProtocolError as error:
        status = error.status
        assert 400 <= status < 500, status
        return
    assert set(parsed.inputs) == {"x", "mask"}
    assert parsed.inputs["x"].dtype == np.float32
    assert parsed.inputs["x"].shape[1:] == (4,)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=requests, binary=st.binary(max_size=64), split=st.booleans())
def test_fuzz_parser_only_ever_accepts_or_refuses_with_4xx(document: Any, binary: bytes, split: bool) -> None:
    header = json.dumps(document).encode()
    _check(header + binary, str(len(header)) if split else None)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=256), header=st.none() | st.text(max_size=6))
def test_fuzz_parser_on_arbitrary_bytes(body: bytes, header: str | None) -> None:
    _check(body, header)


def test_binary_and_json_inputs_parse_to_the_same_arrays() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    mask = np.array([True, False])
    as_json = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.tolist()},
                {"name": "mask", "shape": [2], "datatype": "BOOL", "data": mask.tolist()},
            ]
        }
    ).encode()
    header = json.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": 32}},
                {"name": "mask", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}},
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    from_json = protocol.parse_request(as_json, None, INPUTS, OUTPUTS)
    from_binary = protocol.parse_request(header + x.tobytes() + mask.tobytes(), str(len(header)), INPUTS, OUTPUTS)
    for name in ("x", "mask"):
        np.testing.assert_array_equal(from_json.inputs[name], from_binary.inputs[name])
    assert from_binary.binary_outputs == {"y"}


def test_responses_round_trip_through_the_decoder() -> None:
    request = protocol.InferenceRequest({}, id="7", binary_outputs={"y"})
    outputs: dict[str, np.ndarray[Any, Any]] = {
        "y": np.array([[0.25, 0.75]], np.float32),
        "z": np.array([1, 2], np.int64),
    }
    body, headers = protocol.encode_response("m", "1", request, outputs)
    decoded = protocol.decode_response(body, headers.get(protocol.BINARY_HEADER))
    for name, array in outputs.items():
        np.testing.assert_array_equal(decoded[name], array)


class _Doubler:
    """A model for in-process tests: y = [sum(x), 2 * sum(x)] per row."""

    inputs = INPUTS
    outputs = OUTPUTS
    platform = "test"

    def predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        total = inputs["x"].sum(axis=1, keepdims=True)
        return {"y": np.concatenate([total, 2 * total], axis=1).astype(np.float32)}

    def warm_up(self) -> None:
        return None


def test_in_process_readiness_follows_startup_and_infer_works() -> None:
    async def scenario() -> None:
        app = InferenceServer(_Doubler(), ServerConfig(name="m", revision="1"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            assert (await client.get("/v2/health/ready")).status_code == 400
            body = {
                "inputs": [
                    {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
                    {"name": "mask", "shape": [1], "datatype": "BOOL", "data": [True]},
                ]
            }
            refused = await client.post("/v2/models/m/infer", json=body)
            assert refused.status_code == 503
            await app.startup()
            assert (await client.get("/v2/health/ready")).json() == {"ready": True}
            answer = await client.post("/v2/models/m/infer", json=body)
            assert answer.status_code == 200
            assert answer.json()["outputs"][0]["data"] == [10.0, 20.0]
            assert (await client.get("/v2/models/m/versions/1/ready")).status_code == 200
            assert (await client.post("/v2/health/live")).status_code == 405
            assert (await client.get("/nope")).status_code == 404
            await app.shutdown()
            assert (await client.get("/v2/health/ready")).status_code == 400

    asyncio.run(scenario())


@pytest.mark.parametrize("limit", [10, 100])
def test_in_process_body_limit(limit: int) -> None:
    async def scenario() -> int:
        app = InferenceServer(_Doubler(), ServerConfig(name="m", max_body_bytes=limit))
        await app.startup()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            return (await client.post("/v2/models/m/infer", content=b"{" + b" " * 200 + b"}")).status_code

    assert asyncio.run(scenario()) == 413
