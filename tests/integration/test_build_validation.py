"""`edgemodel build` validation as a real process: non-finite outputs, worst samples, uninformative references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgemodel_runtime.build.errors import ExitCode
from edgemodel_runtime.build.tensors import save_samples
from tests.integration.test_build import edgemodel_build, report_of, sha256


def _model(path: Path, nodes: list[onnx.NodeProto], constants: dict[str, float]) -> Path:
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        initializer=[numpy_helper.from_array(np.array(v, np.float32), k) for k, v in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def square_root(path: Path) -> Path:
    """y = sqrt(x): NaN wherever x < 0."""
    return _model(path, [helper.make_node("Sqrt", ["x"], ["y"])], {})


def near_zero(path: Path) -> Path:
    """y = x * 1e-6: an output near zero everywhere, like a detector's map on noise."""
    return _model(path, [helper.make_node("Mul", ["x", "k"], ["y"])], {"k": 1e-6})


def test_nan_where_the_expected_outputs_are_finite_fails_validation_naming_the_output_and_the_count(
    tmp_path: Path,
) -> None:
    """Expected outputs recorded elsewhere (say, by the training framework) are finite; this engine answers NaN."""
    model = square_root(tmp_path / "sqrt.onnx")
    reference = tmp_path / "reference.npz"
    inputs = [{"x": np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)} for _ in range(2)]
    save_samples(reference, inputs, expected=[{"y": np.sqrt(np.abs(i["x"]))} for i in inputs])
    out, termination = tmp_path / "out", tmp_path / "termination-log"
    result = edgemodel_build(
        "--model", str(model), "--sha256", sha256(model), "--reference", str(reference),
        "--tolerance", "maxRelativeError=1", "--output", str(out), "--termination-log", str(termination),
    )  # fmt: skip
    assert result.returncode == int(ExitCode.VALIDATION_FAILED), result.stderr
    assert "edgemodel build: NonFiniteOutputs:" in result.stderr
    sentence = "output y: 64 of 128 values non-finite where the other side is not (64 NaN/inf where the reference"
    assert sentence in result.stderr
    report = report_of(out)
    assert report["reason"] == "NonFiniteOutputs"
    assert report["validation"]["verdict"] == "failed"
    assert report["comparison"]["nonfinite"] == 64
    assert report["comparison"]["max_relative_error"] == 0.0  # the finite half is exact; the NaN half still fails
    compact = json.loads(termination.read_text())
    assert compact["reason"] == "NonFiniteOutputs"
    assert sentence in compact["message"]
    assert not (out / "model.onnx").exists()


def test_an_all_nan_model_is_uninformative_against_itself_never_a_pass_with_error_zero(tmp_path: Path) -> None:
    model = square_root(tmp_path / "sqrt.onnx")
    reference = tmp_path / "reference.npz"
    save_samples(reference, [{"x": np.full((1, 64), -1.0, np.float32)}] * 2)  # NaN == NaN, position by position
    out = tmp_path / "out"
    result = edgemodel_build(
        "--model", str(model), "--sha256", sha256(model), "--reference", str(reference), "--output", str(out)
    )
    assert result.returncode == 0, result.stderr
    report = report_of(out)
    assert report["validation"]["verdict"] == "uninformative"
    assert report["validation"]["uninformative"] == {"y": "no finite reference values"}
    assert report["candidate"]["comparison"]["max_abs_error"] is None


def test_an_uninformative_reference_is_reported_as_such_not_as_a_pass(tmp_path: Path) -> None:
    model = near_zero(tmp_path / "near-zero.onnx")
    out, termination = tmp_path / "out", tmp_path / "termination-log"
    result = edgemodel_build(
        "--model", str(model), "--sha256", sha256(model), "--output", str(out), "--termination-log", str(termination)
    )
    assert result.returncode == 0, result.stderr
    report = report_of(out)
    assert report["validation"]["verdict"] == "uninformative"
    assert "near zero everywhere" in report["validation"]["uninformative"]["y"]
    assert report["candidate"]["comparison"]["max_abs_error"] is None  # no headline figure that looks like a pass
    assert "validation uninformative" in report["message"]
    compact = json.loads(termination.read_text())
    assert compact["validation"] == {"verdict": "uninformative", "uninformative": ["y"]}


def _reference_with_one_bad_sample(path: Path, bad: float) -> Path:
    """Five samples whose expected outputs are sqrt(x) plus 1e-5; sample 3's plus `bad` at one position."""
    rng = np.random.default_rng(5)
    inputs = [{"x": rng.uniform(0.1, 1, (1, 64)).astype(np.float32)} for _ in range(5)]
    expected = [{"y": np.sqrt(i["x"]) + np.float32(1e-5)} for i in inputs]
    expected[3]["y"][0, 7] += np.float32(bad)
    save_samples(path, inputs, expected)
    return path


def test_the_report_gives_figures_per_sample_and_names_the_worst(tmp_path: Path) -> None:
    model = square_root(tmp_path / "sqrt.onnx")
    reference = _reference_with_one_bad_sample(tmp_path / "reference.npz", bad=5e-4)
    out = tmp_path / "out"
    result = edgemodel_build(
        "--model", str(model), "--sha256", sha256(model), "--reference", str(reference), "--output", str(out)
    )
    assert result.returncode == 0, result.stderr
    report = report_of(out)
    per_sample = report["candidate"]["comparison"]["per_sample"]
    assert [s["index"] for s in per_sample] == [0, 1, 2, 3, 4]
    errors = [s["max_abs_error"] for s in per_sample]
    assert errors[3] > 10 * max(errors[:3] + errors[4:])
    assert report["validation"]["worstSample"] == 3
    assert report["candidate"]["comparison"]["max_abs_error"] == errors[3]
    assert "worst sample 3" in report["message"]


def test_a_tolerance_applies_to_every_sample_not_the_average(tmp_path: Path) -> None:
    model = square_root(tmp_path / "sqrt.onnx")
    reference = _reference_with_one_bad_sample(tmp_path / "reference.npz", bad=0.01)  # 1 value in 320
    result = edgemodel_build(
        "--model", str(model), "--sha256", sha256(model), "--reference", str(reference),
        "--tolerance", "maxAbsError=0.001", "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode == int(ExitCode.VALIDATION_FAILED), result.stderr
    assert "output y: max abs error 0.01 > maxAbsError 0.001 (worst: sample 3)" in result.stderr


def test_expected_outputs_under_a_name_the_model_has_no_output_of_are_refused_naming_both(tmp_path: Path) -> None:
    """A misspelt `expected.<output>` key, or outputs of another model: not a mismatch of the engine's outputs."""
    model = square_root(tmp_path / "sqrt.onnx")
    reference = tmp_path / "reference.npz"
    inputs = [{"x": np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 64)}]
    save_samples(reference, inputs, expected=[{"Y": np.sqrt(i["x"]), "z": i["x"]} for i in inputs])
    result = edgemodel_build(
        "--model", str(model), "--sha256", sha256(model), "--reference", str(reference),
        "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode == int(ExitCode.BAD_INPUT), result.stderr
    assert "edgemodel build: InvalidSampleSet: " in result.stderr
    assert "expected outputs ['Y', 'z'] name no output of the model (its outputs: ['y'])" in result.stderr


def test_outputs_the_expected_set_leaves_out_are_validated_against_the_fp32_reference(tmp_path: Path) -> None:
    """Expected values for one output (say, labels from training) must not leave the model's other outputs
    unvalidated."""
    graph = helper.make_graph(
        [helper.make_node("Sqrt", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["z"])],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 64]) for n in ("y", "z")],
    )
    model = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    reference = tmp_path / "reference.npz"
    inputs = [{"x": np.linspace(0.5, 1, 64, dtype=np.float32).reshape(1, 64)}, {"x": np.ones((1, 64), np.float32)}]
    save_samples(reference, inputs, expected=[{"y": np.sqrt(i["x"])} for i in inputs])
    out = tmp_path / "out"
    result = edgemodel_build(
        "--model", str(model), "--sha256", sha256(model), "--reference", str(reference), "--output", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    compared = report_of(out)["candidate"]["comparison"]["outputs"]
    assert sorted(output["name"] for output in compared) == ["y", "z"]


@pytest.mark.parametrize(
    ("tolerance", "message"),
    [
        ("maxRelativeError=1e-3,maxRelativeError=2", "--tolerance gives maxRelativeError twice (1e-3, then 2)"),
        ("maxRelativeError=1e-3 maxRelativeError=1e-3", "--tolerance gives maxRelativeError twice"),
        ("maxRelativeError=0", "'maxRelativeError=0': out of range; maxRelativeError must be a number > 0"),
        ("minCosine=1.5", "'minCosine=1.5': out of range; minCosine must be a number in (0, 1]"),
        ("maxAbsError=nan", "'maxAbsError=nan': out of range; maxAbsError must be a number > 0"),
    ],
)
def test_a_tolerance_given_twice_or_out_of_range_is_refused_saying_which_and_why(
    tmp_path: Path, tolerance: str, message: str
) -> None:
    model = square_root(tmp_path / "sqrt.onnx")
    result = edgemodel_build(
        "--model", str(model), "--sha256", sha256(model), "--output", str(tmp_path / "out"),
        *[argument for item in tolerance.split(" ") for argument in ("--tolerance", item)],
    )  # fmt: skip
    assert result.returncode == int(ExitCode.BAD_INPUT), result.stderr
    assert "edgemodel build: InvalidOption: " in result.stderr
    assert message in result.stderr
