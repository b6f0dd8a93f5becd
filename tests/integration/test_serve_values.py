"""Value and shape fidelity through a real `edgemodel serve` process, tritonclient as the reference client.

One Identity model carries every datatype the server carries, each at four declared shapes (a
scalar, three dynamic dimensions, a fixed shape with a zero-size dimension, eight dynamic
dimensions). Hypothesis draws the values (NaN, infinities, -0.0, subnormals, integer extremes
beyond 2**53, empty and non-ASCII strings among them), the shapes within each declaration, and for
every tensor whether it travels as JSON or as binary data, in the request and in the response.
Each example is checked as tritonclient reads it and as the shadow mirror's decoder reads it.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

from edgemodel_runtime.build.compare import DEFAULT_AGREEMENT, Tolerances, agreement
from edgemodel_runtime.serve import protocol
from tests.integration.test_serve import EDGEMODEL, Server

_ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}
# Declared shapes: None for a dynamic dimension (named per tensor, so that tensors are independent).
_SHAPES: dict[str, list[int | None]] = {
    "scalar": [],
    "dynamic": [None, None, None],
    "zero": [2, 0, 3],
    "many": [None] * 8,
}


def _declared(name: str, dims: list[int | None]) -> list[int | str]:
    return [d if d is not None else f"{name}_{i}" for i, d in enumerate(dims)]


def identity_model(path: Path, datatypes: list[str]) -> Path:
    """An ONNX model whose output out_<t> is its input <t>, for t = <datatype>_<shape kind>."""
    inputs, outputs, nodes = [], [], []
    for datatype in datatypes:
        for kind, dims in _SHAPES.items():
            name = f"{datatype.lower()}_{kind}"
            declared = _declared(name, dims)
            inputs.append(helper.make_tensor_value_info(name, _ONNX_TYPES[datatype], declared))
            outputs.append(helper.make_tensor_value_info(f"out_{name}", _ONNX_TYPES[datatype], declared))
            nodes.append(helper.make_node("Identity", [name], [f"out_{name}"]))
    model = helper.make_model(
        helper.make_graph(nodes, "identity", inputs, outputs), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


DATATYPES = sorted(protocol.carried_datatypes())
TENSORS = [(f"{d.lower()}_{k}", d, k) for d in DATATYPES for k in _SHAPES]


@pytest.fixture(scope="module")
def identity_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("identity")
    server = Server(identity_model(directory / "identity.onnx", DATATYPES), "identity")
    yield server
    server.stop()


def test_every_carried_datatype_is_exercised() -> None:
    assert set(DATATYPES) == set(_ONNX_TYPES), "a datatype the server carries has no model here"
    assert "BF16" not in DATATYPES  # refused on purpose: ONNX Runtime's Python API cannot exchange it


def test_metadata_declares_every_shape_as_the_model_does(identity_server: Server) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{identity_server.port}")
    metadata = client.get_model_metadata("identity")
    expected = {"scalar": [], "dynamic": [-1, -1, -1], "zero": [2, 0, 3], "many": [-1] * 8}
    for section, prefix in (("inputs", ""), ("outputs", "out_")):
        found = {t["name"]: (t["datatype"], t["shape"]) for t in metadata[section]}
        assert found == {f"{prefix}{name}": (datatype, expected[kind]) for name, datatype, kind in TENSORS}


# ---------------------------------------------------------------- values

_FLOAT_SPECIALS = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0]


def _elements(datatype: str) -> st.SearchStrategy[Any]:
    dtype = protocol.DATATYPES[datatype]
    if datatype == "BYTES":
        return st.sampled_from([b"", b"\x00", "é".encode(), "\U0001f600".encode()]) | st.text(max_size=6).map(
            str.encode
        )
    if dtype.kind == "f":
        info = np.finfo(dtype)
        specials = [*_FLOAT_SPECIALS, float(info.max), float(info.min), float(info.smallest_subnormal)]
        specials += [float(info.smallest_normal), -float(info.smallest_subnormal)]
        return st.sampled_from(specials) | hnp.from_dtype(dtype)
    if dtype.kind in "iu":
        bounds = np.iinfo(dtype)
        return st.sampled_from([int(bounds.min), int(bounds.max), 0, 2**53 + 1 if bounds.max > 2**53 else 1]) | (
            hnp.from_dtype(dtype)
        )
    return hnp.from_dtype(dtype)


def _shape(kind: str) -> st.SearchStrategy[tuple[int, ...]]:
    if kind == "dynamic":
        return st.tuples(*[st.integers(0, 3)] * 3)
    if kind == "many":
        return st.tuples(*[st.integers(1, 2)] * 8)
    return st.just(tuple(d or 0 for d in _SHAPES[kind]))


@st.composite
def _array(draw: st.DrawFn, datatype: str, kind: str) -> np.ndarray[Any, Any]:
    shape = draw(_shape(kind))
    dtype = protocol.DATATYPES[datatype]
    count = int(np.prod(shape))
    values = draw(st.lists(_elements(datatype), min_size=count, max_size=count))
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = values
        return array.reshape(shape)
    return np.array(values, dtype=dtype).reshape(shape)


@st.composite
def _requests(draw: st.DrawFn) -> tuple[dict[str, tuple[np.ndarray[Any, Any], bool]], dict[str, bool] | None]:
    """Arrays with a binary flag per input, and the requested outputs with theirs (None: all, binary)."""
    inputs = {name: (draw(_array(d, k)), draw(st.booleans())) for name, d, k in TENSORS}
    if draw(st.booleans()):
        return inputs, None
    names = draw(st.lists(st.sampled_from([f"out_{n}" for n, _, _ in TENSORS]), min_size=1, unique=True))
    return inputs, {name: draw(st.booleans()) for name in names}


def _as_bytes(array: np.ndarray[Any, Any]) -> list[bytes]:
    return [v.encode() if isinstance(v, str) else bytes(v) for v in array.ravel()]


def _assert_same(sent: np.ndarray[Any, Any], got: np.ndarray[Any, Any], bitwise: bool, what: str) -> None:
    """Exactly the same values; a NaN that crossed JSON is a NaN (JSON carries no NaN payload)."""
    assert got.shape == sent.shape, what
    if sent.dtype == object:
        assert _as_bytes(got) == _as_bytes(sent), what
        return
    assert got.dtype == sent.dtype, what
    if sent.dtype.kind == "f" and not bitwise:
        nan = np.isnan(sent)
        np.testing.assert_array_equal(np.isnan(got), nan, err_msg=what)
        sent, got = sent[~nan], got[~nan]
    assert got.tobytes() == sent.tobytes(), f"{what}: sent {sent!r}, got {got!r}"


def _infer_inputs(arrays: dict[str, tuple[np.ndarray[Any, Any], bool]]) -> list[Any]:
    import tritonclient.http as httpclient

    tensors = []
    for name, datatype, _ in TENSORS:
        array, binary = arrays[name]
        tensor = httpclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        tensors.append(tensor)
    return tensors


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=_requests())
def test_every_value_and_shape_round_trips_exactly_through_json_and_binary(
    identity_server: Server, request: tuple[dict[str, tuple[np.ndarray[Any, Any], bool]], dict[str, bool] | None]
) -> None:
    import tritonclient.http as httpclient

    arrays, wanted = request
    inputs = _infer_inputs(arrays)
    outputs = None if wanted is None else [httpclient.InferRequestedOutput(n, binary_data=b) for n, b in wanted.items()]
    client = httpclient.InferenceServerClient(f"127.0.0.1:{identity_server.port}")
    result = client.infer("identity", inputs, outputs=outputs)
    names = [f"out_{n}" for n, _, _ in TENSORS] if wanted is None else list(wanted)
    assert [o["name"] for o in result.get_response()["outputs"]] == names
    # The same request's raw response, as the shadow mirror decodes it.
    body, header_length = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    raw = urllib.request.Request(
        f"{identity_server.url}/v2/models/identity/infer",
        data=body,
        headers={"Inference-Header-Content-Length": str(header_length)} if header_length else {},
    )
    with urllib.request.urlopen(raw, timeout=30) as response:
        decoded = protocol.decode_response(response.read(), response.headers.get(protocol.BINARY_HEADER))
    assert list(decoded) == names
    for name in names:
        sent, sent_binary = arrays[name.removeprefix("out_")]
        bitwise = sent_binary and (wanted is None or wanted[name])
        _assert_same(sent, result.as_numpy(name), bitwise, f"{name} (tritonclient)")
        _assert_same(sent, decoded[name], bitwise, f"{name} (decode_response)")
    # ... and the shadow comparison finds that answer equal to what was sent, whatever the datatype and values.
    sent_outputs = {name: arrays[name.removeprefix("out_")][0] for name in names}
    assert agreement(sent_outputs, decoded, Tolerances(DEFAULT_AGREEMENT))[1] == []


# ---------------------------------------------------------------- what JSON cannot carry


def _one(datatype: str, array: np.ndarray[Any, Any], binary_in: bool) -> list[Any]:
    """Inputs for every tensor of the model: `array` for the BYTES dynamic one, zeros elsewhere."""
    arrays = {}
    for name, d, kind in TENSORS:
        shape = tuple(0 if dim is None else dim for dim in _SHAPES[kind]) if kind != "scalar" else ()
        filler = np.zeros(shape, dtype=protocol.DATATYPES[d]) if d != "BYTES" else np.full(shape, b"", dtype=object)
        arrays[name] = (filler, binary_in)
    arrays[f"{datatype.lower()}_dynamic"] = (array, binary_in)
    return _infer_inputs(arrays)


def test_bytes_that_are_not_utf8_are_refused_clearly_by_an_onnx_string_model(identity_server: Server) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(f"127.0.0.1:{identity_server.port}")
    array = np.array([b"ok", b"\xff\xfe"], dtype=object).reshape(1, 1, 2)
    with pytest.raises(InferenceServerException) as refused:
        client.infer("identity", _one("BYTES", array, binary_in=True))
    assert refused.value.status() == "400"
    assert "element 1 is not UTF-8 text" in refused.value.message()
    assert identity_server.get("/v2/health/live")[0] == 200


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ([1.0, 1e39], "outside the range of FP32"),
        ([1, True], "must hold numbers"),
        ([1.0, "NaN"], "must hold numbers"),
    ],
)
def test_json_values_a_float_tensor_cannot_hold_are_refused(
    identity_server: Server, data: list[Any], fragment: str
) -> None:
    import tritonclient.http as httpclient

    inputs = _one("FP32", np.zeros((1, 1, 2), np.float32), binary_in=False)
    body, _ = httpclient.InferenceServerClient.generate_request_body(inputs)
    document = json.loads(body)
    entry = next(t for t in document["inputs"] if t["name"] == "fp32_dynamic")
    entry["data"] = data
    code, answer = identity_server.request("POST", "/v2/models/identity/infer", json.dumps(document).encode())
    assert code == 400, answer
    assert fragment in json.loads(answer)["error"]


@pytest.mark.parametrize(
    ("element", "dims", "fragment"),
    [
        (TensorProto.BFLOAT16, [2], "type tensor(bfloat16), which this server does not carry"),
        (TensorProto.FLOAT, None, "input 'x' declares no shape (any rank)"),
    ],
    ids=["bfloat16", "unknown rank"],
)
def test_a_model_the_server_cannot_carry_is_refused_at_start_with_the_reason(
    tmp_path: Path, element: int, dims: list[int] | None, fragment: str
) -> None:
    import subprocess

    from tests.helpers import free_port

    x = helper.make_tensor_value_info("x", element, dims)
    y = helper.make_tensor_value_info("y", element, dims)
    model = helper.make_model(
        helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 9
    onnx.save(model, tmp_path / "model.onnx")
    result = subprocess.run(
        [EDGEMODEL, "serve", str(tmp_path / "model.onnx"), "--port", str(free_port())],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
