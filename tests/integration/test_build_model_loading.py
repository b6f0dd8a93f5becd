"""The model-loading path of `edgemodel build`: every model is built, or refused with a documented exit code,
a reason, a report and a termination message; never a traceback. Models the server cannot carry are refused
at build time, judged against the server's own datatype table."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from edgemodel_runtime.build import modelcheck
from edgemodel_runtime.build.errors import BuildError, ExitCode
from edgemodel_runtime.build.pipeline import BuildRequest, build
from edgemodel_runtime.serve.protocol import DATATYPES, MAX_DIMS
from tests import onnx_models
from tests.integration.test_build import _expect_failure, edgemodel_build, report_of, sha256

IRIS = Path(onnxruntime.__file__).parent / "datasets" / "logreg_iris.onnx"
ELEMENT_TYPES = [name for name in TensorProto.DataType.keys() if name != "UNDEFINED"]  # noqa: SIM118
OPSET = [helper.make_opsetid("", 21)]


def carried(element_type: str) -> bool:
    """Whether the server's datatype table (serve.protocol.DATATYPES) has a numpy dtype for this ONNX type."""
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(TensorProto.DataType.Value(element_type)))
    except (KeyError, TypeError):
        return False
    return dtype in set(DATATYPES.values())


def build_in_process(model: bytes, directory: Path) -> dict[str, Any] | BuildError:
    """Build from bytes; the report, or the BuildError raised (anything else fails the test)."""
    path = directory / "model.onnx"
    path.write_bytes(model)
    request = BuildRequest(
        model=str(path), sha256=sha256(path), output=directory / "out", samples=2, benchmark_seconds=0.05
    )
    try:
        return build(request)
    except BuildError as error:
        return error


def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], opsets: list[Any] | None = None) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    serialised: bytes = helper.make_model(graph, opset_imports=opsets or OPSET).SerializeToString()
    return serialised


def cast_output(element_type: str) -> bytes:
    """x: float[1, 4] -> Cast -> y of the element type."""
    to = TensorProto.DataType.Value(element_type)
    return _model(
        [helper.make_node("Cast", ["x"], ["y"], to=to)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", to, [1, 4])],
    )


def cast_input(element_type: str) -> bytes:
    """x of the element type [1, 4] -> Cast -> y: float."""
    return _model(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        [helper.make_tensor_value_info("x", TensorProto.DataType.Value(element_type), [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )


def _refused(outcome: dict[str, Any] | BuildError, reason: str) -> BuildError:
    assert isinstance(outcome, BuildError), f"built, expected {reason}"
    assert outcome.reason == reason, str(outcome)
    assert outcome.exit_code == ExitCode.BAD_INPUT
    return outcome


@pytest.mark.parametrize("element_type", ELEMENT_TYPES)
@pytest.mark.parametrize("side", ["input", "output"])
def test_every_element_type_is_built_if_the_server_carries_it_and_refused_by_name_if_not(
    side: str, element_type: str, tmp_path: Path
) -> None:
    model = cast_output(element_type) if side == "output" else cast_input(element_type)
    outcome = build_in_process(model, tmp_path)
    if carried(element_type) and (side == "output" or element_type != "STRING"):  # no synthetic strings
        assert not isinstance(outcome, BuildError), str(outcome)
        assert outcome["status"] == "built"
    else:
        error = _refused(outcome, "UnsupportedModel")
        assert f"{side} {'y' if side == 'output' else 'x'!r}" in str(error)
        if not carried(element_type):
            assert "FP32" in str(error)  # the message lists what the server does carry
        assert report_of(tmp_path / "out")["reason"] == "UnsupportedModel"


@pytest.mark.parametrize(
    ("datatype", "dtype", "ort_type"),
    [
        ("BYTES", np.dtype(object), "tensor(string)"),
        ("BF16", np.dtype(helper.tensor_dtype_to_np_dtype(16)), "tensor(bfloat16)"),
    ],
)
def test_the_check_follows_the_servers_datatype_table_as_it_changes(
    datatype: str, dtype: np.dtype[Any], ort_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    interface = [("y", [1, 4], ort_type)]
    monkeypatch.delitem(DATATYPES, datatype, raising=False)  # a server that does not carry the type
    with pytest.raises(BuildError, match="cannot be served"):
        modelcheck.check_servable([], interface)
    monkeypatch.setitem(DATATYPES, datatype, dtype)  # ... and one that does
    modelcheck.check_servable([], interface)
    assert modelcheck.carried_types()[ort_type] == datatype


def _typed(name: str, type_proto: Any) -> Any:
    return helper.make_value_info(name, type_proto)


NOT_TENSORS = {
    "sequence": helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [1, 4])),
    "map": helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])),
    "optional": helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [1, 4])),
    "sparse": helper.make_sparse_tensor_type_proto(TensorProto.FLOAT, [1, 4]),
}


@pytest.mark.parametrize("kind", list(NOT_TENSORS))
@pytest.mark.parametrize("side", ["input", "output"])
def test_values_that_are_not_tensors_are_refused_on_either_side(side: str, kind: str, tmp_path: Path) -> None:
    tensor = helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4])
    odd = _typed("odd", NOT_TENSORS[kind])
    node = helper.make_node("Identity", ["t" if side == "output" else "odd"], ["odd" if side == "output" else "t"])
    model = _model([node], [tensor] if side == "output" else [odd], [odd] if side == "output" else [tensor])
    error = _refused(build_in_process(model, tmp_path), "UnsupportedModel")
    assert f"{side} 'odd'" in str(error)
    assert "not a tensor" in str(error) or "sparse" in str(error)


def test_a_sequence_output_left_for_onnxruntime_to_infer_is_refused_too(tmp_path: Path) -> None:
    model = _model(
        [helper.make_node("SequenceConstruct", ["x"], ["s"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_empty_tensor_value_info("s")],  # no declared type: only the loaded session knows it
    )
    error = _refused(build_in_process(model, tmp_path), "UnsupportedModel")
    assert "output 's' is a sequence (seq(tensor(float)))" in str(error)


def test_more_dimensions_than_the_protocol_takes_are_refused(tmp_path: Path) -> None:
    model = _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1] * (MAX_DIMS + 1))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1] * (MAX_DIMS + 1))],
    )
    error = _refused(build_in_process(model, tmp_path), "UnsupportedModel")
    assert f"{MAX_DIMS + 1} dimensions" in str(error)


# ------------------------------------------------------------------ malformed files


def _relu(x_shape: list[Any] | None, name: str = "x") -> bytes:
    return _model(
        [helper.make_node("Relu", [name], ["y"])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x_shape)],
    )


def _non_utf8_name() -> bytes:
    placeholder = "n" * 8
    return _relu([1, 4], placeholder).replace(placeholder.encode(), b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8")


def _tiny() -> bytes:
    with tempfile.TemporaryDirectory() as scratch:
        return onnx_models.tiny_classifier(Path(scratch) / "tiny.onnx").read_bytes()


MALFORMED: dict[str, tuple[Any, str | None]] = {
    "empty file": (lambda: b"", "InvalidModel"),
    "truncated": (lambda: IRIS.read_bytes()[: IRIS.stat().st_size // 2], "InvalidModel"),
    "random bytes": (lambda: np.random.default_rng(0).bytes(4096), "InvalidModel"),
    "a TensorProto": (
        lambda: onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w").SerializeToString(),
        "InvalidModel",
    ),
    "a GraphProto": (lambda: onnx.load_from_string(_tiny()).graph.SerializeToString(), "InvalidModel"),  # noqa: PLW0108
    "a model with no graph": (
        lambda: onnx.ModelProto(ir_version=10, opset_import=OPSET).SerializeToString(),
        "InvalidModel",
    ),
    "a graph with zero outputs": (
        lambda: _model([], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])], []),
        "InvalidModel",
    ),
    "an opset from the future": (
        lambda: _model(
            [helper.make_node("Relu", ["x"], ["y"])],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
            [helper.make_opsetid("", 99)],
        ),
        "InvalidModel",
    ),
    "a huge declared dimension": (lambda: _relu([2**40, 16]), "InputTooLarge"),
    "non-UTF-8 names": (_non_utf8_name, "InvalidModel"),
    "an input with no shape": (lambda: _relu(None), "UnsupportedModel"),  # as serve refuses it
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_models_are_refused_with_a_reason_in_process(case: str, tmp_path: Path) -> None:
    make, reason = MALFORMED[case]
    outcome = build_in_process(make(), tmp_path)
    if reason is None:
        assert not isinstance(outcome, BuildError), str(outcome)
    else:
        _refused(outcome, reason)
        assert report_of(tmp_path / "out")["reason"] == reason


@pytest.mark.parametrize(
    "case", ["truncated", "a GraphProto", "a graph with zero outputs", "a huge declared dimension"]
)
def test_malformed_models_through_the_cli_exit_2_with_report_and_termination_message(case: str, tmp_path: Path) -> None:
    make, reason = MALFORMED[case]
    assert reason is not None
    model = tmp_path / "model.onnx"
    model.write_bytes(make())
    termination = tmp_path / "termination-log"
    result = edgemodel_build(
        "--model", str(model), "--sha256", sha256(model), "--output", str(tmp_path / "out"),
        "--termination-log", str(termination),
    )  # fmt: skip
    _expect_failure(result, ExitCode.BAD_INPUT, reason)
    assert "Traceback" not in result.stderr
    assert report_of(tmp_path / "out")["reason"] == reason
    assert json.loads(termination.read_text())["reason"] == reason


def test_the_iris_classifier_in_the_onnxruntime_wheel_is_refused_not_crashed(tmp_path: Path) -> None:
    termination = tmp_path / "termination-log"
    result = edgemodel_build(
        "--model", str(IRIS), "--sha256", sha256(IRIS), "--output", str(tmp_path / "out"),
        "--termination-log", str(termination),
    )  # fmt: skip
    _expect_failure(result, ExitCode.BAD_INPUT, "UnsupportedModel")
    assert "Traceback" not in result.stderr
    assert "output 'probabilities' is a sequence (seq(map(int64,tensor(float))))" in result.stderr
    compact = json.loads(termination.read_text())
    assert (compact["exitCode"], compact["reason"]) == (2, "UnsupportedModel")
    assert report_of(tmp_path / "out")["status"] == "failed"


# ------------------------------------------------------------------ fuzz

SEEDS = [IRIS.read_bytes(), _tiny(), cast_output("STRING"), _relu(["batch", 4])]


@st.composite
def mutated_models(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
        position = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "truncate":
            del data[position:]
        elif action == "flip" and data:
            data[position] ^= draw(st.integers(1, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif data:
            del data[position : position + draw(st.integers(1, 16))]
    return bytes(data)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=mutated_models())
def test_fuzz_no_model_file_crashes_the_build_or_exits_undocumented(model: bytes) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        outcome = build_in_process(model, Path(scratch))
        if isinstance(outcome, BuildError):
            assert outcome.exit_code in {ExitCode.BAD_INPUT, ExitCode.VALIDATION_FAILED, ExitCode.INFRASTRUCTURE}
            assert outcome.reason not in {"InternalError", "InfrastructureFailure"}, str(outcome)
            assert json.loads((Path(scratch) / "out" / "report.json").read_text())["reason"] == outcome.reason
        else:
            assert outcome["status"] == "built"


def _with_location(location: str) -> bytes:
    """The tiny classifier with its first weight said to live in external data at `location`."""
    model = onnx.load_from_string(_tiny())
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        tensor.external_data.add(key=key, value=value)
    serialised: bytes = model.SerializeToString()
    return serialised


@settings(max_examples=60, deadline=None)
@given(location=st.text(max_size=300) | st.sampled_from(["", ".", "..", "/", "a/../../b", "a\0b", "x" * 300]))
def test_fuzz_external_data_locations_are_refused_never_crash(location: str) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        outcome = build_in_process(_with_location(location), Path(scratch))
        assert isinstance(outcome, BuildError), "a weight that does not exist cannot build"
        assert outcome.exit_code == ExitCode.BAD_INPUT, str(outcome)
        assert outcome.reason in {"InvalidModel", "ExternalDataMissing"}, str(outcome)


def test_a_bug_in_the_build_still_ends_in_exit_4_with_a_report_and_no_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A bug cannot be produced on demand by a real input (the fuzz target holds that none does), so one is
    # injected into the loading step, on purpose.
    from edgemodel_runtime.build.cli import build_command
    from edgemodel_runtime.engines import onnxruntime_engine

    def broken(*_: object, **__: object) -> None:
        raise ZeroDivisionError("injected")

    monkeypatch.setattr(onnxruntime_engine, "session", broken)
    model = tmp_path / "model.onnx"
    model.write_bytes(_tiny())
    termination = tmp_path / "termination-log"
    code = build_command(
        ["--model", str(model), "--sha256", sha256(model), "--output", str(tmp_path / "out"),
         "--termination-log", str(termination)]
    )  # fmt: skip
    assert code == ExitCode.INFRASTRUCTURE
    assert "edgemodel build: InternalError: internal error (ZeroDivisionError: injected)" in capsys.readouterr().err
    assert report_of(tmp_path / "out")["reason"] == "InternalError"
    assert json.loads(termination.read_text())["reason"] == "InternalError"


@pytest.mark.parametrize(
    "shape",
    [None, [], [0, 3], [2, 0], ["n", 0], [1, 3], ["n", 3]],
    ids=["unknown rank", "scalar", "static zero", "trailing zero", "dynamic and zero", "static", "dynamic"],
)
def test_the_build_refuses_exactly_the_input_shapes_that_serve_refuses(shape: list[Any] | None, tmp_path: Path) -> None:
    """A build that succeeds for a model serve then refuses is a Job that succeeds and pods that crash-loop; a
    static zero-size dimension is a shape like any other (serve keeps it), not a dynamic one fixed to 1."""
    from edgemodel_runtime.serve.model import ArtifactError, load, resolve

    outcome = build_in_process(_relu(shape), tmp_path)
    refusal = None
    try:
        load(resolve(str(tmp_path / "model.onnx"), tmp_path / "cache"), threads=1)
    except ArtifactError as error:
        refusal = error.reason
    if refusal is not None:
        assert refusal == "UnsupportedModel"
        _refused(outcome, "UnsupportedModel")
        return
    assert isinstance(outcome, dict), f"serve takes this model, the build refused it: {outcome}"
    (built,) = outcome["inputs"]
    assert built["shape"] == [1 if isinstance(d, str) else d for d in shape or []]
