"""The comparison that build validation and shadow agreement share: value semantics, worst case, uninformative refs.

Property-based over dtypes, shapes and special values (NaN, +inf, -inf in either side, at the same or other
positions), with table tests for each sibling named in the value semantics.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgemodel_runtime.build import compare
from edgemodel_runtime.build.report import validation_verdict

FLOATS = st.sampled_from([np.float16, np.float32, np.float64])
EXACT = st.sampled_from([np.bool_, np.int8, np.uint8, np.int32, np.int64, np.uint64])
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
SPECIAL = st.sampled_from([np.nan, np.inf, -np.inf])


def _float_arrays(allow_special: bool = True) -> st.SearchStrategy[np.ndarray]:
    return FLOATS.flatmap(
        lambda dtype: hnp.arrays(
            dtype, SHAPES, elements=st.floats(-1e3, 1e3, width=16) | (SPECIAL if allow_special else st.nothing())
        )
    )


def _one(array: np.ndarray, name: str = "y") -> list[dict[str, np.ndarray]]:
    return [{name: array}]


def _json_safe(comparison: compare.Comparison) -> None:
    json.dumps(comparison.as_dict(), allow_nan=False)  # raises on NaN or infinity anywhere in the figures


@settings(max_examples=150, deadline=None)
@given(array=_float_arrays() | EXACT.flatmap(lambda dtype: hnp.arrays(dtype, SHAPES)))
def test_any_output_equals_itself_whatever_its_special_values(array: np.ndarray) -> None:
    comparison = compare.compare(_one(array), _one(array.copy()))
    assert compare.failures(comparison, compare.Tolerance(max_abs_error=1e-12, min_cosine=0.999999)) == []
    assert comparison.nonfinite == 0
    assert comparison.worst_sample is None
    _json_safe(comparison)
    stable, _ = compare.agreement({"y": array}, {"y": array.copy()}, compare.Tolerances(compare.DEFAULT_AGREEMENT))
    assert _ == []
    assert stable is not None


@settings(max_examples=150, deadline=None)
@given(
    reference=_float_arrays(allow_special=False).filter(lambda a: a.size > 0),
    data=st.data(),
)
def test_a_non_finite_value_where_the_reference_is_finite_always_fails_and_is_counted(
    reference: np.ndarray, data: st.DataObject
) -> None:
    flat = reference.ravel()
    positions = data.draw(st.sets(st.integers(0, flat.size - 1), min_size=1, max_size=flat.size))
    candidate = flat.copy()
    for position in positions:
        candidate[position] = data.draw(SPECIAL)
    comparison = compare.compare(_one(reference), _one(candidate.reshape(reference.shape)))
    missed = compare.failures(comparison, compare.Tolerance())  # no limits at all: still a failure
    assert [m.label for m in missed] == ["nonfinite"]
    assert missed[0].output == "y"
    assert f"{len(positions)} of {reference.size} values non-finite" in missed[0].text
    assert comparison.outputs[0].nonfinite_candidate == len(positions)
    assert comparison.worst_sample == 0
    _json_safe(comparison)
    _, disagreements = compare.agreement(
        {"y": reference}, {"y": candidate.reshape(reference.shape)}, compare.Tolerances(compare.Tolerance())
    )
    assert [m.label for m in disagreements] == ["nonfinite"]


@settings(max_examples=150, deadline=None)
@given(reference=_float_arrays().filter(lambda a: a.size > 0), candidate_seed=st.integers(0, 2**32 - 1))
def test_non_finite_mismatches_are_counted_symmetrically_by_position(
    reference: np.ndarray, candidate_seed: int
) -> None:
    """Reference-only, candidate-only, different specials at one position: each such position counts once."""
    rng = np.random.default_rng(candidate_seed)
    candidate = reference.copy()
    mask = rng.random(reference.shape) < 0.3
    specials = np.array([np.nan, np.inf, -np.inf, 1.0])[rng.integers(0, 4, reference.shape)]
    candidate[mask] = specials[mask].astype(reference.dtype)
    ref64, cand64 = reference.astype(np.float64), candidate.astype(np.float64)
    same = (ref64 == cand64) | (np.isnan(ref64) & np.isnan(cand64))
    expected = int(np.sum(~same & ~(np.isfinite(ref64) & np.isfinite(cand64))))
    comparison = compare.compare(_one(reference), _one(candidate))
    assert comparison.nonfinite == expected
    assert comparison.nonfinite == compare.compare(_one(candidate), _one(reference)).nonfinite
    assert ("nonfinite" in {m.label for m in compare.failures(comparison, compare.Tolerance())}) == (expected > 0)
    _json_safe(comparison)


@settings(max_examples=150, deadline=None)
@given(
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6),
    dtype=FLOATS,
    data=st.data(),
)
def test_figures_are_always_numbers_in_range_whatever_the_values(shape: tuple[int, ...], dtype: Any,
                                                                 data: st.DataObject) -> None:  # fmt: skip
    """Cosine, top-1 and errors with NaN or infinities anywhere: never NaN, cosine in [-1, 1], top-1 in [0, 1]."""
    elements = st.floats(-1e4, 1e4, width=16) | SPECIAL
    reference = data.draw(hnp.arrays(dtype, shape, elements=elements))
    candidate = data.draw(hnp.arrays(dtype, shape, elements=elements))
    comparison = compare.compare(_one(reference), _one(candidate))
    _json_safe(comparison)
    every: list[compare.OutputFigures | compare.SampleFigures] = [*comparison.outputs, *comparison.per_sample]
    for figures in every:
        assert figures.cosine is None or -1.0 <= figures.cosine <= 1.0
        assert figures.top1_agreement is None or 0.0 <= figures.top1_agreement <= 1.0
        assert figures.max_abs_error is None or figures.max_abs_error >= 0.0


@pytest.mark.parametrize(
    ("reference", "candidate", "nonfinite"),
    [
        ([1.0, np.nan, 3.0], [1.0, np.nan, 3.0], 0),  # NaN at the same position in both
        ([1.0, np.inf, -np.inf], [1.0, np.inf, -np.inf], 0),  # matching infinities
        ([1.0, np.nan, 3.0], [1.0, 2.0, 3.0], 1),  # NaN in the reference only
        ([1.0, 2.0, 3.0], [1.0, np.nan, 3.0], 1),  # NaN in the candidate only
        ([np.nan, 2.0, 3.0], [1.0, np.nan, 3.0], 2),  # NaN in both, at different positions
        ([1.0, np.inf, 3.0], [1.0, -np.inf, 3.0], 1),  # infinities of opposite sign
        ([1.0, np.inf, 3.0], [1.0, np.nan, 3.0], 1),  # inf against NaN
        ([np.nan] * 3, [np.nan] * 3, 0),  # all NaN in both
        ([1.0, 2.0, 3.0], [np.nan] * 3, 3),  # all NaN in the candidate
    ],
    ids=[
        "nan-same",
        "inf-same",
        "nan-ref-only",
        "nan-cand-only",
        "nan-other-position",
        "inf-sign",
        "inf-vs-nan",
        "all-nan-both",
        "all-nan-candidate",
    ],
)
def test_each_non_finite_sibling(reference: list[float], candidate: list[float], nonfinite: int) -> None:
    comparison = compare.compare(_one(np.array(reference, np.float32)), _one(np.array(candidate, np.float32)))
    assert comparison.nonfinite == nonfinite
    assert bool(compare.failures(comparison, compare.Tolerance())) == (nonfinite > 0)
    _json_safe(comparison)


def test_an_all_nan_candidate_reports_no_error_figure_that_looks_like_a_pass() -> None:
    comparison = compare.compare(_one(np.linspace(0, 1, 10)), _one(np.full(10, np.nan)))
    assert comparison.max_abs_error is None  # not 0: no position could be compared
    assert comparison.outputs[0].max_abs_error is None


def test_float16_overflow_to_infinity_is_a_non_finite_mismatch() -> None:
    reference = np.array([[70000.0, 1.0, -70000.0]], np.float32)
    with np.errstate(over="ignore"):
        candidate = reference.astype(np.float16)  # +inf, 1, -inf
    missed = compare.failures(compare.compare(_one(reference), _one(candidate)), compare.Tolerance())
    assert [m.text for m in missed] == [
        "output y: 2 of 3 values non-finite where the other side is not (2 NaN/inf where the reference is finite)"
    ]


@pytest.mark.parametrize("dtype", [np.int8, np.int64, np.uint64, np.bool_])
def test_integer_and_boolean_outputs_are_compared_exactly(dtype: Any) -> None:
    reference = np.array([[0, 1, 1, 0]], dtype)
    candidate = reference.copy()
    candidate[0, 1] = 0
    comparison = compare.compare(_one(reference), _one(candidate))
    missed = compare.failures(comparison, compare.Tolerance(max_abs_error=100, max_relative_error=100))
    assert [m.label for m in missed] == ["exact"]
    assert "1 of 4" in missed[0].text
    assert comparison.outputs[0].max_abs_error is None


def test_uint64_values_beyond_float_precision_are_still_compared_exactly() -> None:
    reference = np.array([2**64 - 1, 2**63], np.uint64)
    candidate = np.array([2**64 - 2, 2**63], np.uint64)  # equal as float64, different as integers
    assert compare.compare(_one(reference), _one(candidate)).outputs[0].exact_mismatches == 1


def test_integers_of_different_widths_and_signs_are_compared_by_value() -> None:
    reference = np.array([2**63, 3], np.uint64)
    assert compare.compare(_one(reference), _one(np.array([2**63 - 1, 3], np.int64))).outputs[0].exact_mismatches == 1
    same = compare.compare(_one(np.array([1, -2], np.int8)), _one(np.array([1, -2], np.int64)))
    assert compare.failures(same, compare.Tolerance()) == []


def test_empty_tensors_are_equal_and_decide_nothing() -> None:
    empty = np.zeros((0, 4), np.float32)
    comparison = compare.compare(_one(empty), _one(empty.copy()))
    assert compare.failures(comparison, compare.Tolerance(max_abs_error=1e-9)) == []
    assert comparison.outputs[0].uninformative is None
    _json_safe(comparison)


NUMERIC = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
           np.float16, np.float32, np.float64]  # fmt: skip


@pytest.mark.parametrize("theirs", NUMERIC, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("ours", NUMERIC, ids=lambda t: np.dtype(t).name)
def test_a_candidate_answering_another_datatype_disagrees_even_with_equal_values(ours: type, theirs: type) -> None:
    values = np.array([[0, 1, 1]])
    _, missed = compare.agreement({"y": values.astype(ours)}, {"y": values.astype(theirs)}, compare.Tolerances())
    assert [m.label for m in missed] == ([] if ours is theirs else ["datatype"])


def test_strings_agree_as_str_or_bytes_the_engine_and_the_wire_both_being_bytes_tensors() -> None:
    engine = np.array(["a", "", "b\x00c"], dtype=object)
    wire = np.array([b"a", b"", b"b\x00c"], dtype=object)
    assert compare.agreement({"y": engine}, {"y": wire}, compare.Tolerances())[1] == []


@pytest.mark.parametrize(
    ("candidate", "reason"),
    [(np.zeros((2, 3), np.float32), "shape"), (np.zeros((1, 3), np.int64), "datatype")],
)
def test_outputs_that_cannot_be_compared_value_by_value_are_refused(candidate: np.ndarray, reason: str) -> None:
    with pytest.raises(compare.IncomparableError) as caught:
        compare.compare(_one(np.zeros((1, 3), np.float32)), _one(candidate))
    assert caught.value.reason == reason
    _, missed = compare.agreement({"y": np.zeros((1, 3), np.float32)}, {"y": candidate}, compare.Tolerances())
    assert [m.label for m in missed] == [reason]


def test_top1_rows_with_nan_disagree_and_ties_agree() -> None:
    reference = np.array([[[0.1, 0.9, 0.0], [0.5, 0.5, 0.0], [0.2, 0.7, 0.1], [0.3, 0.3, 0.3]]], np.float32)
    candidate = np.array([[[0.1, 0.9, 0.0], [0.5, 0.6, 0.0], [np.nan, 0.7, 0.1], [0.1, 0.1, 0.9]]], np.float32)
    comparison = compare.compare(_one(reference), _one(candidate))
    # row 0 same arg-max, row 1 a tie in the reference, row 2 a NaN mismatch, row 3 a flat reference row
    assert comparison.top1_agreement == 0.75
    assert comparison.cosine is not None
    assert np.isfinite(comparison.cosine)


def test_top1_with_the_same_nan_in_both_agrees() -> None:
    row = np.array([[0.1, np.nan, 0.3]], np.float32)
    assert compare.compare(_one(row), _one(row.copy())).top1_agreement == 1.0


def test_tolerances_apply_to_every_sample_and_the_worst_sample_is_named() -> None:
    rng = np.random.default_rng(0)
    reference = [{"y": rng.normal(size=(1, 10)).astype(np.float32)} for _ in range(20)]
    candidate = [{"y": sample["y"] + np.float32(1e-4)} for sample in reference]
    candidate[13] = {"y": reference[13]["y"] + np.float32(0.5)}  # one bad sample; the average is still small
    comparison = compare.compare(reference, candidate)
    assert comparison.worst_sample == 13
    assert comparison.per_sample[13].max_abs_error == pytest.approx(0.5, rel=1e-3)
    assert comparison.per_sample[0].max_abs_error == pytest.approx(1e-4, rel=1e-2)
    missed = compare.failures(comparison, compare.Tolerance(max_abs_error=0.01))
    assert [m.text for m in missed] == ["output y: max abs error 0.5 > maxAbsError 0.01 (worst: sample 13)"]
    verdict = validation_verdict(comparison, [m.text for m in missed])
    assert (verdict["verdict"], verdict["worstSample"]) == ("failed", 13)


@pytest.mark.parametrize(
    ("reference", "why"),
    [
        (np.abs(np.random.default_rng(1).normal(0, 1e-5, (1, 1, 32, 32))), "near zero everywhere"),
        (np.full((1, 64), 5.0) + np.random.default_rng(2).normal(0, 1e-6, (1, 64)), "near constant"),
        (np.full((1, 8), np.nan), "no finite reference values"),
    ],
    ids=["detector-map-on-noise", "near-constant", "all-nan"],
)
def test_a_reference_that_cannot_discriminate_is_reported_as_uninformative(reference: np.ndarray, why: str) -> None:
    reference = reference.astype(np.float32)
    noisy = reference * np.float32(0.5)  # a 50% error: would fail any tolerance if it were judged
    comparison = compare.compare(_one(reference), _one(noisy))
    assert comparison.outputs[0].uninformative is not None
    assert why in comparison.outputs[0].uninformative
    assert not comparison.informative
    assert comparison.max_relative_error is None
    assert comparison.cosine is None
    assert compare.failures(comparison, compare.DEFAULT_TOLERANCES["int8"]) == []
    assert validation_verdict(comparison, [])["verdict"] == "uninformative"


def test_a_non_finite_value_fails_even_on_an_uninformative_output() -> None:
    reference = np.zeros((1, 16), np.float32)
    candidate = reference.copy()
    candidate[0, 3] = np.nan
    missed = compare.failures(compare.compare(_one(reference), _one(candidate)), compare.Tolerance())
    assert [m.label for m in missed] == ["nonfinite"]


def test_uninformative_outputs_do_not_hide_informative_ones() -> None:
    reference = [{"map": np.zeros((1, 16), np.float32), "logits": np.array([[0.0, 1.0, 2.0]], np.float32)}]
    candidate = [{"map": np.zeros((1, 16), np.float32), "logits": np.array([[0.0, 1.0, 1.0]], np.float32)}]
    comparison = compare.compare(reference, candidate)
    assert comparison.informative
    assert [m.output for m in compare.failures(comparison, compare.Tolerance(max_relative_error=0.1))] == ["logits"]
    assert validation_verdict(comparison, [])["uninformative"] == {"map": "near zero everywhere "
                                                                   "(largest magnitude 0 <= 0.001)"}  # fmt: skip


def test_relative_error_is_measured_against_the_reference_scale() -> None:
    reference = _one(np.array([[0.0, 10.0]], np.float32))
    candidate = _one(np.array([[0.5, 10.0]], np.float32))
    assert compare.compare(reference, candidate).max_relative_error == pytest.approx(0.05)


def test_agreement_compares_outputs_by_name_and_labels_missing_and_extra_ones() -> None:
    stable = {"a": np.ones((1, 3), np.float32), "b": np.ones(2, np.float32)}
    candidate = {"a": np.ones((1, 3), np.float32), "c": np.ones(1, np.float32)}
    _, missed = compare.agreement(stable, candidate, compare.Tolerances(compare.DEFAULT_AGREEMENT))
    assert [(m.output, m.label) for m in missed] == [("b", "missing_output"), ("c", "extra_output")]


def test_agreement_uses_per_output_tolerances() -> None:
    stable = {"boxes": np.array([[0.0, 10.0]], np.float32), "scores": np.array([[0.0, 1.0]], np.float32)}
    candidate = {"boxes": np.array([[0.8, 10.0]], np.float32), "scores": np.array([[0.0, 1.0]], np.float32)}
    strict = compare.Tolerances(compare.DEFAULT_AGREEMENT)
    loose = compare.Tolerances(
        compare.DEFAULT_AGREEMENT,
        (("boxes", compare.DEFAULT_AGREEMENT.merged(compare.Tolerance(max_relative_error=0.1))),),
    )
    assert [m.label for m in compare.agreement(stable, candidate, strict)[1]] == ["relative_error"]
    assert compare.agreement(stable, candidate, loose)[1] == []


def test_the_compact_report_carries_the_verdict_and_the_worst_sample_within_4_kib() -> None:
    from edgemodel_runtime.build.report import TERMINATION_LIMIT, compact

    rng = np.random.default_rng(3)
    names = [f"output_{i:02d}_with_a_long_name" for i in range(20)]
    reference = [{n: rng.normal(size=(1, 16)).astype(np.float32) for n in names} for _ in range(300)]
    candidate = [{n: a + np.float32(1e-3) for n, a in sample.items()} for sample in reference]
    comparison = compare.compare(reference, candidate)
    full = {
        "version": 1, "status": "built", "exitCode": 0, "cacheKey": "k" * 64, "precision": "fp32",
        "requestedPrecision": "fp32", "message": "built",
        "candidate": {"comparison": comparison.as_dict()},
        "validation": validation_verdict(comparison, []),
    }  # fmt: skip
    text = compact(full)
    assert len(text.encode()) <= TERMINATION_LIMIT
    parsed = json.loads(text)
    assert parsed["metrics"]["worst_sample"] == comparison.worst_sample
    assert parsed["metrics"]["samples"] == 300
    assert parsed["validation"]["verdict"] == "passed"


# ------------------------------------------------------------------ string outputs (ONNX strings, OIP BYTES)

TEXT = st.binary(max_size=6) | st.text(max_size=4).map(lambda t: t.encode())  # empty, NULs, non-UTF-8 bytes


def _strings(values: list[bytes], shape: tuple[int, ...], *, as_str: bool = False) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = [v.decode("utf-8", "surrogateescape") if as_str else v for v in values]
    return array.reshape(shape)


@st.composite
def _string_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    """A string output, a candidate with some elements changed, and how many differ."""
    shape = draw(SHAPES)
    size = int(np.prod(shape))
    values = draw(st.lists(TEXT, min_size=size, max_size=size))
    changed = draw(st.lists(st.booleans(), min_size=size, max_size=size))
    other = [v + b"\x00" if flip else v for v, flip in zip(values, changed, strict=True)]  # a trailing NUL counts
    return _strings(values, shape), _strings(other, shape), sum(changed)


@settings(max_examples=150, deadline=None)
@given(pair=_string_pairs())
def test_string_outputs_are_compared_exactly_element_by_element(pair: tuple[np.ndarray, np.ndarray, int]) -> None:
    reference, candidate, differing = pair
    same = compare.compare(_one(reference), _one(reference.copy()))
    assert [m.label for m in compare.failures(same, compare.Tolerance())] == []
    assert compare.agreement({"y": reference}, {"y": reference.copy()}, compare.Tolerances())[1] == []
    comparison = compare.compare(_one(reference), _one(candidate))
    figures = comparison.outputs[0]
    assert (figures.dtype, figures.exact_mismatches, figures.values) == ("string", differing, reference.size)
    assert figures.equal_share == ((reference.size - differing) / reference.size if reference.size else None)
    assert figures.max_abs_error is None
    assert figures.cosine is None
    labels = [m.label for m in compare.failures(comparison, compare.Tolerance(max_relative_error=1e-9))]
    assert labels == (["exact"] if differing else [])
    missed = compare.agreement({"y": reference}, {"y": candidate}, compare.Tolerances(compare.DEFAULT_AGREEMENT))[1]
    assert [m.label for m in missed] == (["exact"] if differing else [])
    _json_safe(comparison)


def test_strings_from_the_engine_equal_bytes_from_the_wire_and_numpy_text_arrays() -> None:
    words = ["cat", "", "naïve", "a\x00b"]
    engine = _strings([w.encode() for w in words], (2, 2), as_str=True)  # ONNX Runtime hands out str
    wire = _strings([w.encode() for w in words], (2, 2))  # the OIP codec hands out bytes
    for reference, candidate in [(engine, wire), (wire, engine), (np.array(words).reshape(2, 2), wire)]:
        comparison = compare.compare(_one(reference), _one(candidate))
        assert comparison.outputs[0].exact_mismatches == 0
        assert comparison.outputs[0].equal_share == 1.0
    changed = wire.copy()
    changed[1, 0] = b"naive"
    missed = compare.failures(compare.compare(_one(engine), _one(changed)), compare.Tolerance())
    assert [m.text for m in missed] == ["output y: 1 of 4 string values differ (compared exactly)"]


@pytest.mark.parametrize(
    "candidate",
    [np.zeros((1, 2), np.int64), np.zeros((1, 2), np.float32), np.array([[b"a", 1]], dtype=object)],
    ids=["integers", "floats", "mixed objects"],
)
def test_strings_against_anything_else_are_a_datatype_mismatch(candidate: np.ndarray) -> None:
    reference = _strings([b"a", b"b"], (1, 2))
    with pytest.raises(compare.IncomparableError) as caught:
        compare.compare(_one(reference), _one(candidate))
    assert caught.value.reason == "datatype"
    assert [m.label for m in compare.agreement({"y": reference}, {"y": candidate}, compare.Tolerances())[1]] == [
        "datatype"
    ]


def test_a_string_output_with_one_value_everywhere_is_uninformative_and_nul_suffixes_are_values() -> None:
    constant = _strings([b"same"] * 4, (4,))
    assert compare.compare(_one(constant), _one(constant.copy())).outputs[0].uninformative == (
        "constant (every value is b'same')"
    )
    varied = _strings([b"a", b"a\x00"], (2,))  # numpy's own bytes type would drop the trailing NUL
    assert compare.compare(_one(varied), _one(varied.copy())).outputs[0].uninformative is None
    mixed = compare.compare(_one(varied), _one(_strings([b"a", b"a"], (2,))))
    assert mixed.outputs[0].exact_mismatches == 1


def test_a_range_wider_than_float64_still_gives_relative_errors() -> None:
    top = np.finfo(np.float64).max
    reference = np.array([[-top, top]], np.float64)
    candidate = np.array([[-top, top * 0.9]], np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning escapes either
        comparison = compare.compare(_one(reference), _one(candidate))
    assert comparison.max_relative_error == pytest.approx(0.1 * top / top)
    missed = compare.agreement({"y": reference}, {"y": candidate}, compare.Tolerances(compare.DEFAULT_AGREEMENT))[1]
    assert [m.label for m in missed] == ["relative_error"]
    _json_safe(comparison)


@settings(max_examples=200, deadline=None)
@given(
    array=hnp.arrays(
        st.sampled_from([np.float16, np.float32, np.float64]),
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=64),
        elements={"allow_nan": True, "allow_infinity": True},
    )
)
def test_identical_answers_agree_at_the_strictest_limits_whatever_the_rounding(array: np.ndarray) -> None:
    """minCosine 1 and minTop1Agreement 1 are valid limits: an answer equal to stable's must meet them, though a
    cosine summed in floating point can land a rounding below 1."""
    strictest = compare.Tolerances(compare.Tolerance(min_cosine=1.0, min_top1_agreement=1.0, max_abs_error=1e-30))
    comparison, missed = compare.agreement({"y": array}, {"y": array.copy()}, strictest)
    assert missed == []
    assert comparison is not None
    assert comparison.cosine in (None, 1.0)
