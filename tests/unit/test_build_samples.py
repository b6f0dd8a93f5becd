"""Sample sets (.npz) in the layouts people have: split into samples, or refused with the shapes found and the
layouts accepted."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemodel_runtime.build import tensors
from edgemodel_runtime.build.errors import BadInputError

F32 = np.float32

# x: [batch, 3, 4] with a dynamic batch; y: [1, 2] with a static batch of 1 (both fixed to 1 by default).
INPUTS = tensors.resolve_inputs([("x", ["batch", 3, 4], "tensor(float)"), ("y", [1, 2], "tensor(float)")], {})


def _arrays(x: tuple[int, ...], y: tuple[int, ...], **extra: Any) -> dict[str, Any]:
    return {"x": np.arange(np.prod(x), dtype=F32).reshape(x), "y": np.ones(y, F32), **extra}


def _load(tmp_path: Path, arrays: dict[str, Any], inputs: list[tensors.TensorInfo] = INPUTS) -> Any:
    path = tmp_path / "set.npz"
    np.savez(path, **arrays)
    return tensors.load_samples(path, inputs)


ACCEPTED = [
    ("one sample per key", _arrays((1, 3, 4), (1, 2)), 1),
    ("stacked on a new first axis", _arrays((5, 1, 3, 4), (5, 1, 2)), 5),
    ("stacked along a dynamic batch axis", _arrays((5, 3, 4), (5, 2)), 5),
    ("one sample, batch axis of size 1", _arrays((1, 3, 4), (1, 2)), 1),
    ("one sample as itself for x, stacked on a new axis for y", _arrays((1, 3, 4), (1, 1, 2)), 1),
]


@pytest.mark.parametrize(("layout", "arrays", "count"), ACCEPTED, ids=[case[0] for case in ACCEPTED])
def test_accepted_layouts_split_into_samples_of_the_fixed_shape(
    layout: str, arrays: dict[str, Any], count: int, tmp_path: Path
) -> None:
    samples, expected = _load(tmp_path, arrays)
    assert expected is None
    assert len(samples) == count
    for sample in samples:
        assert sample["x"].shape == (1, 3, 4)
        assert sample["y"].shape == (1, 2)
    flat = np.concatenate([sample["x"].ravel() for sample in samples])
    np.testing.assert_array_equal(flat, arrays["x"].ravel())  # order and values kept


def _per_sample(count: int, x: tuple[int, ...] = (1, 3, 4), y: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
    arrays: dict[str, Any] = {}
    for i in range(count):
        arrays[f"x_{i}"] = np.full(x, i, F32)
        arrays[f"y_{i}"] = np.full(y, -i, F32)
    return arrays


@pytest.mark.parametrize(
    "arrays",
    [_per_sample(12), _per_sample(12, (3, 4), (2,))],
    ids=["per-sample keys, each one sample", "per-sample keys, each without its size-1 batch axis"],
)
def test_per_sample_keys_are_samples_in_numeric_order(arrays: dict[str, Any], tmp_path: Path) -> None:
    samples, expected = _load(tmp_path, arrays)
    assert expected is None
    assert [float(s["x"].flat[0]) for s in samples] == list(range(12))  # x_10 after x_9, not after x_1
    assert all(s["x"].shape == (1, 3, 4) and s["y"].shape == (1, 2) for s in samples)


def test_numpys_positional_keys_are_per_sample_keys_for_a_one_input_model(tmp_path: Path) -> None:
    inputs = tensors.resolve_inputs([("x", ["batch", 3], "tensor(float)")], {})
    path = tmp_path / "set.npz"
    np.savez(path, *[np.full((1, 3), i, F32) for i in range(4)])  # keys arr_0 ... arr_3
    samples, _ = tensors.load_samples(path, inputs)
    assert [float(s["x"][0, 0]) for s in samples] == [0, 1, 2, 3]


def test_per_sample_expected_outputs_are_numbered_like_the_inputs(tmp_path: Path) -> None:
    arrays = _per_sample(3) | {f"expected.out_1_{i}": np.full((1, 10), i, F32) for i in range(3)}
    samples, expected = _load(tmp_path, arrays)
    assert expected is not None
    assert len(expected) == len(samples)
    assert [float(e["out_1"][0, 0]) for e in expected] == [0, 1, 2]  # an output name may itself end in _1


PER_SAMPLE_REFUSED = [
    ("a gap in the numbering", {k: v for k, v in _per_sample(3).items() if k not in {"x_1", "y_1"}}, "numbered 0..N-1"),
    ("fewer samples for one input", {k: v for k, v in _per_sample(3).items() if k != "y_2"}, "numbered 0..N-1"),
    ("a sample of the wrong shape", _per_sample(2) | {"x_1": np.zeros((2, 3, 4), F32)}, "x_1 has shape [2, 3, 4]"),
    ("a sample of the wrong dtype", _per_sample(2) | {"y_0": np.zeros((1, 2))}, "y_0 is float64"),
    ("unnumbered expected outputs", _per_sample(2) | {"expected.z": np.zeros((2, 10), F32)}, "not numbered"),
    ("expected outputs short of samples", _per_sample(2) | {"expected.z_0": np.zeros((1, 10), F32)}, "expected"),
]


@pytest.mark.parametrize(("case", "arrays", "fragment"), PER_SAMPLE_REFUSED, ids=[c[0] for c in PER_SAMPLE_REFUSED])
def test_broken_per_sample_sets_are_refused_with_what_was_found(
    case: str, arrays: dict[str, Any], fragment: str, tmp_path: Path
) -> None:
    with pytest.raises(BadInputError) as refused:
        _load(tmp_path, arrays)
    assert fragment in str(refused.value)
    assert "one key per sample x_0, x_1, ... each [1, 3, 4]" in str(refused.value)


def test_a_static_batch_of_one_is_split_like_a_dynamic_one(tmp_path: Path) -> None:
    inputs = tensors.resolve_inputs([("x", [1, 3, 4], "tensor(float)")], {})
    samples, _ = _load(tmp_path, {"x": np.zeros((7, 3, 4), F32)}, inputs)
    assert [s["x"].shape for s in samples] == [(1, 3, 4)] * 7


REFUSED = [
    ("mismatched counts across inputs", _arrays((5, 3, 4), (4, 2)), "disagree on layout or sample count"),
    ("layouts mixed across inputs", _arrays((5, 1, 3, 4), (5, 2)), "disagree on layout or sample count"),
    ("wrong rank", _arrays((3, 4), (1, 2)), "x has shape [3, 4], which fits no layout"),
    ("wrong trailing dimensions", _arrays((5, 3, 5), (5, 2)), "x has shape [5, 3, 5], which fits no layout"),
    ("wrong dtype", {"x": np.zeros((5, 3, 4)), "y": np.ones((5, 2), F32)}, "x is float64, the model wants float32"),
    ("an input missing", {"x": np.zeros((5, 3, 4), F32)}, "no arrays for model inputs ['y']"),
    ("zero samples", _arrays((0, 3, 4), (0, 2)), "the inputs hold no samples"),
    ("expected outputs short of samples", _arrays((5, 3, 4), (5, 2), **{"expected.z": np.ones((4, 1))}), "expected"),
]


@pytest.mark.parametrize(("case", "arrays", "fragment"), REFUSED, ids=[case[0] for case in REFUSED])
def test_ambiguous_or_wrong_sets_are_refused_with_shapes_found_and_layouts_accepted(
    case: str, arrays: dict[str, Any], fragment: str, tmp_path: Path
) -> None:
    with pytest.raises(BadInputError) as refused:
        _load(tmp_path, arrays)
    message = str(refused.value)
    assert refused.value.reason == "InvalidSampleSet"
    assert fragment in message
    for key, value in arrays.items():
        assert f"{key} {list(value.shape)}" in message  # the shapes found
    assert "one sample [1, 3, 4] or [N, 1, 3, 4] stacked on a new first axis or [N, 3, 4] stacked along the batch" in (
        message
    )
    assert "x dim 0 ('batch') = 1 by default" in message  # the dynamic dims and how to fix them


def test_a_batch_fixed_above_one_is_not_split_and_the_message_says_what_fits(tmp_path: Path) -> None:
    inputs = tensors.resolve_inputs([("x", ["batch", 3], "tensor(float)")], {"x": (4, 3)})
    assert len(_load(tmp_path, {"x": np.zeros((4, 3), F32)}, inputs)[0]) == 1
    with pytest.raises(BadInputError) as refused:
        _load(tmp_path, {"x": np.zeros((8, 3), F32)}, inputs)
    assert "one sample [4, 3] or [N, 4, 3] stacked on a new first axis" in str(refused.value)
    assert "along the batch" not in str(refused.value)
    assert "x dim 0 ('batch') = 4 by --input" in str(refused.value)


@pytest.mark.parametrize(
    ("inputs", "expected_shape"),
    [
        (_arrays((5, 3, 4), (5, 2), **{"expected.z": np.ones((5, 10), F32)}), (1, 10)),
        (_arrays((5, 1, 3, 4), (5, 1, 2), **{"expected.z": np.ones((5, 1, 10), F32)}), (1, 10)),
        (_arrays((1, 3, 4), (1, 2), **{"expected.z": np.ones((1, 10), F32)}), (1, 10)),
    ],
    ids=["stacked along batch", "stacked on a new axis", "one sample"],
)
def test_expected_outputs_follow_the_inputs_layout(
    inputs: dict[str, Any], expected_shape: tuple[int, ...], tmp_path: Path
) -> None:
    samples, expected = _load(tmp_path, inputs)
    assert expected is not None
    assert len(expected) == len(samples)
    assert all(e["z"].shape == expected_shape for e in expected)


def test_a_file_that_is_no_npz_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "set.npz"
    path.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(BadInputError, match=r"not a readable \.npz file"):
        tensors.load_samples(path, INPUTS)


def test_the_fixed_dims_hint_names_each_dynamic_dimension_and_the_flag_that_fixes_it() -> None:
    inputs = tensors.resolve_inputs(
        [("x", ["batch", 3, None, "width"], "tensor(float)"), ("n", [2], "tensor(int64)")], {"x": (1, 3, 48, 320)}
    )
    hint = tensors.fixed_dims_hint(inputs)
    assert "x dim 0 ('batch') = 1 by --input, x dim 2 = 48 by --input, x dim 3 ('width') = 320 by --input" in hint
    assert "--input x=1x3x48x320" in hint
    assert "spec.inputs" in hint
    assert "n dim" not in hint
    assert tensors.fixed_dims_hint(tensors.resolve_inputs([("n", [2], "tensor(int64)")], {})) == ""


def test_a_declared_shape_too_large_to_allocate_is_refused_before_allocating() -> None:
    with pytest.raises(BadInputError) as refused:
        tensors.resolve_inputs([("x", ["batch", 2**40], "tensor(float)")], {})
    assert refused.value.reason == "InputTooLarge"
    assert "--input" in str(refused.value)


def _outcome(path: Path) -> Any:
    """The samples loaded, or the BadInputError raised (anything else fails the test)."""
    try:
        return tensors.load_samples(path, INPUTS)
    except BadInputError as error:
        return error


@settings(max_examples=150, deadline=None)
@given(
    shapes=st.dictionaries(
        st.sampled_from(["x", "y", "expected.z", "other"]),
        st.tuples(st.lists(st.integers(0, 6), max_size=5), st.sampled_from(["float32", "float64", "int64", "bool"])),
    )
)
def test_fuzz_any_arrays_give_samples_of_the_fixed_shape_or_a_clear_refusal(
    shapes: dict[str, tuple[list[int], str]],
) -> None:
    arrays: dict[str, Any] = {key: np.zeros(shape, dtype) for key, (shape, dtype) in shapes.items()}
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "set.npz"
        np.savez(path, **arrays)
        outcome = _outcome(path)
    if isinstance(outcome, BadInputError):
        assert outcome.reason == "InvalidSampleSet"
        return
    samples, expected = outcome
    assert samples
    for sample in samples:
        assert sample["x"].shape == (1, 3, 4)
        assert sample["y"].shape == (1, 2)
    assert expected is None or len(expected) == len(samples)


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(0, 10_000), flip=st.integers(0, 10_000))
def test_fuzz_damaged_npz_files_are_refused_never_crash(cut: int, flip: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "set.npz"
        np.savez(path, **_arrays((5, 3, 4), (5, 2)))
        data = bytearray(path.read_bytes())
        data[flip % len(data)] ^= 0xFF
        path.write_bytes(bytes(data[: len(data) - cut % len(data)]))
        outcome = _outcome(path)
    assert not isinstance(outcome, BadInputError) or outcome.reason == "InvalidSampleSet"
