"""Sample sets as users of ONNX Runtime's quantisation tools have them, through `edgemodel build`; and models that
fail at the shape their dynamic dimensions were fixed to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgemodel_runtime.build import tensors
from edgemodel_runtime.build.errors import ExitCode
from tests import onnx_models
from tests.integration.test_build import _expect_failure, edgemodel_build, report_of, sha256


def test_calibration_and_reference_stacked_along_the_batch_axis_are_split_into_samples(tmp_path: Path) -> None:
    model = onnx_models.tiny_classifier(tmp_path / "tiny.onnx")  # x: [batch, 16]
    rng = np.random.default_rng(0)
    calibration, reference = tmp_path / "calibration.npz", tmp_path / "reference.npz"
    np.savez(calibration, x=rng.normal(size=(16, 16)).astype(np.float32))  # 16 samples of [1, 16]
    np.savez(reference, x=rng.normal(size=(6, 16)).astype(np.float32))
    result = edgemodel_build(
        "--model", str(model), "--sha256", sha256(model), "--precision", "int8",
        "--calibration", str(calibration), "--reference", str(reference),
        "--tolerance", "maxRelativeError=0.5,minCosine=0.9", "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = report_of(tmp_path / "out")
    assert report["calibration"]["samples"] == 16
    assert report["reference"]["samples"] == 6
    assert report["inputs"] == [{"name": "x", "shape": [1, 16], "dtype": "float32"}]


def test_an_ambiguous_reference_is_refused_with_the_shapes_and_layouts(tmp_path: Path) -> None:
    model = onnx_models.tiny_classifier(tmp_path / "tiny.onnx")
    reference = tmp_path / "reference.npz"
    np.savez(reference, x=np.zeros((6, 2, 16), np.float32))
    result = edgemodel_build(
        "--model", str(model), "--sha256", sha256(model), "--reference", str(reference),
        "--output", str(tmp_path / "out"),
    )  # fmt: skip
    _expect_failure(result, ExitCode.BAD_INPUT, "InvalidSampleSet")
    assert "x [6, 2, 16] float32" in result.stderr
    assert "[N, 16] stacked along the batch axis" in result.stderr
    assert "--input x=1x16" in result.stderr


def _needs_a_multiple_of_four(path: Path) -> Path:
    """x: [batch, n] -> Reshape to [-1, 4] -> MatMul [4, 2]: fails unless n is a multiple of 4."""
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "shape"], ["r"]),
            helper.make_node("MatMul", ["r", "w"], ["y"]),
        ],
        "needs_four",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        initializer=[
            numpy_helper.from_array(np.array([-1, 4], np.int64), "shape"),
            numpy_helper.from_array(np.ones((4, 2), np.float32), "w"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_model_failing_at_its_fixed_shape_names_the_dynamic_dims_and_the_flag(tmp_path: Path) -> None:
    model = _needs_a_multiple_of_four(tmp_path / "four.onnx")
    result = edgemodel_build("--model", str(model), "--sha256", sha256(model), "--output", str(tmp_path / "out"))
    _expect_failure(result, ExitCode.BAD_INPUT, "InferenceFailed")
    assert "x dim 0 ('batch') = 1 by default, x dim 1 ('n') = 1 by default" in result.stderr
    assert "--input x=1x1" in result.stderr
    assert "spec.inputs" in result.stderr
    fixed = edgemodel_build(
        "--model", str(model), "--sha256", sha256(model), "--input", "x=1x8", "--output", str(tmp_path / "out")
    )
    assert fixed.returncode == 0, fixed.stderr


def _concatenated(path: Path) -> Path:
    """a: [N, 4] and b: [N, 2] -> Concat on axis 1 -> y: [N, 6]: one dimension N, named in both inputs."""
    graph = helper.make_graph(
        [helper.make_node("Concat", ["a", "b"], ["y"], axis=1)],
        "concatenated",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_dynamic_dimension_named_in_several_inputs_is_fixed_once_for_all(tmp_path: Path) -> None:
    model = _concatenated(tmp_path / "concat.onnx")
    result = edgemodel_build(
        "--model", str(model), "--sha256", sha256(model), "--input", "a=3x4", "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert report_of(tmp_path / "out")["inputs"] == [
        {"name": "a", "shape": [3, 4], "dtype": "float32"},
        {"name": "b", "shape": [3, 2], "dtype": "float32"},
    ]
    conflicting = edgemodel_build(
        "--model", str(model), "--sha256", sha256(model), "--input", "a=3x4", "--input", "b=2x2",
        "--output", str(tmp_path / "conflict"),
    )  # fmt: skip
    _expect_failure(conflicting, ExitCode.BAD_INPUT, "InvalidOption")
    assert "dimension 'N' is 3 in --input a=3x4 but 2 in --input b=2x2" in conflicting.stderr


@pytest.mark.parametrize("placeholder", ["?", "-1", "", None])
def test_a_placeholder_for_an_unknown_dimension_names_no_dimension(placeholder: str | None) -> None:
    """Converters write "?" (paddle2onnx: the PP-OCR models) or "-1" for unknown dimensions; each is its own."""
    declared: list[tuple[str, list[int | str | None], str]] = [
        ("x", [placeholder, 3, placeholder, placeholder], "tensor(float)"),
        ("y", [placeholder], "tensor(float)"),
    ]
    x, y = tensors.resolve_inputs(declared, {"x": (1, 3, 48, 192)})
    assert (x.shape, y.shape) == ((1, 3, 48, 192), (1,))
