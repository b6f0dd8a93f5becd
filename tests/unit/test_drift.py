"""Output summaries and the drift score: the pure parts (sliding window, PSI, bins, kinds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemodel_runtime import drift
from edgemodel_runtime.serve.drift import Window


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 12),
    bins=st.integers(1, 6),
    batches=st.lists(st.lists(st.integers(-1, 7), max_size=20), max_size=12),
)
def test_the_window_counts_exactly_the_last_rows(size: int, bins: int, batches: list[list[int]]) -> None:
    window = Window(size, bins)
    seen: list[int] = []
    for batch in batches:
        window.add(np.asarray(batch, dtype=np.int64))
        seen += [b for b in batch if 0 <= b < bins]  # rows outside the bins are not counted
        last = seen[-size:]
        assert window.rows == len(last)
        assert window.counts.tolist() == np.bincount(np.asarray(last, dtype=np.int64), minlength=bins).tolist()


def test_psi_is_zero_for_the_same_distribution_and_grows_with_the_shift() -> None:
    reference = [0.1] * 10
    assert drift.psi(reference, reference) == 0
    slight = [0.12, 0.08] * 5
    strong = [0.5, 0.5] + [0.0] * 8
    assert 0 < drift.psi(slight, reference) < 0.1 < drift.psi(strong, reference)


@pytest.mark.parametrize(
    ("served", "reference"),
    [([1.0, 0.0], [0.0, 1.0]), ([0.0, 0.0], [0.5, 0.5]), ([0.0] * 32, [0.0] * 32)],
)
def test_empty_bins_give_a_finite_score_by_the_documented_epsilon(served: list[float], reference: list[float]) -> None:
    score = drift.psi(served, reference)
    assert math.isfinite(score)
    p = np.maximum(served, drift.EPSILON)
    q = np.maximum(reference, drift.EPSILON)
    assert score == pytest.approx(float(np.sum((p - q) * np.log(p / q))))


@pytest.mark.parametrize(
    ("shape", "datatype", "kind"),
    [
        ((-1, 10), "FP32", "classifier"),
        ((1, 2), "FP16", "classifier"),
        ((-1, -1), "FP64", "classifier"),
        ((-1, 1), "FP32", "values"),
        ((1, 1, 480, 640), "FP32", "values"),
        ((), "FP32", "values"),
        ((-1, 10), "INT64", None),
        ((-1,), "BOOL", None),
        ((-1,), "BYTES", None),
    ],
)
def test_the_kind_of_an_output_follows_its_shape_and_datatype(shape: tuple[int, ...], datatype: str, kind: str) -> None:
    assert drift.kind_of(shape, datatype) == kind


def test_logits_and_probabilities_give_the_same_confidence() -> None:
    logits = np.random.default_rng(0).normal(size=(64, 5))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    top1_logits, predicted_logits, _ = drift.classify(logits)
    top1_probabilities, predicted_probabilities, _ = drift.classify(probabilities)
    np.testing.assert_allclose(top1_logits, top1_probabilities, rtol=1e-9)
    assert predicted_logits.tolist() == predicted_probabilities.tolist()


@pytest.mark.parametrize("special", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_still_count_in_a_bin(special: float) -> None:
    rows = np.array([[0.0, 1.0, special], [2.0, 1.0, 0.0]])
    top1, predicted, classes = drift.classify(rows)
    assert classes == 3
    assert np.isfinite(top1).all()
    assert drift.confidence_bins(top1).tolist()[1] in range(10)
    assert predicted.tolist()[1] == 0


@pytest.mark.parametrize("classes", [2, 32, 33, 1000])
def test_class_bins_stay_bounded_and_cover_every_class(classes: int) -> None:
    labels = drift.class_bin_labels(classes)
    assert len(labels) == min(classes, drift.MAX_CLASS_BINS)
    bins = drift.class_bin(np.arange(classes, dtype=np.int64), classes)
    assert bins.min() == 0
    assert bins.max() == len(labels) - 1
    for index, label in enumerate(labels):  # each label names exactly the classes in its bin
        members = np.flatnonzero(bins == index)
        assert label == (str(members[0]) if classes <= drift.MAX_CLASS_BINS else f"{members[0]}-{members[-1]}")


def test_a_seeded_reference_describes_no_distribution() -> None:
    outputs = [drift.OutputSpec("y", (-1, 3), "FP32")]
    summary = drift.reference_summaries(outputs, [{"y": np.ones((1, 3))}], "seeded")
    assert summary["available"] is False
    assert "seeded" in summary["reason"]


def test_a_value_reference_puts_about_a_tenth_in_each_bin() -> None:
    values = np.random.default_rng(1).normal(size=(500, 1))
    summary = drift.reference_summaries([drift.OutputSpec("y", (-1, 1), "FP32")], [{"y": values}], "npz")
    value = summary["outputs"]["y"]["value"]
    assert len(value["edges"]) == 9
    assert value["proportions"] == pytest.approx([0.1] * 10, abs=0.01)
