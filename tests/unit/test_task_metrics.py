"""Task-level checks on labelled reference sets: class ids and masks, read from the .npz and judged. Pure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgemodel_runtime.build import report, tasks
from edgemodel_runtime.build.errors import BadInputError


def _npz(path: Path, **arrays: Any) -> Path:
    with path.open("wb") as handle:
        np.savez(handle, x=np.zeros((len(next(iter(arrays.values()))), 1, 4), np.float32), **arrays)
    return path


def _logits(rows: list[int], classes: int = 4) -> list[dict[str, np.ndarray]]:
    """One sample per id: logits [1, classes] whose arg-max is that id."""
    return [{"y": np.eye(classes, dtype=np.float32)[[i]]} for i in rows]


def test_class_ids_give_top1_accuracy_of_reference_and_engine_and_the_drop(tmp_path: Path) -> None:
    path = _npz(tmp_path / "r.npz", **{"label.y": np.array([0, 1, 2, 3], np.int64)})
    labels = tasks.load_labels(path, 4, {"y": (1, 4)}, "r.npz")
    assert labels is not None
    assert labels.outputs[0].kind == "classes"
    reference, engine = _logits([0, 1, 2, 0]), _logits([0, 1, 0, 0])  # the reference is right 3 of 4 times
    passed = tasks.evaluate(labels, reference, engine, max_drop=25.0)
    (figure,) = passed.figures
    assert (figure.metric, figure.reference, figure.engine, figure.drop) == ("top1Accuracy", 75.0, 50.0, 25.0)
    assert passed.failures == []
    failed = tasks.evaluate(labels, reference, engine, max_drop=24.9)
    assert failed.reason == "Top1AccuracyDropExceeded"
    assert "top1Accuracy 50.00% against the fp32 reference's 75.00%" in failed.failures[0]
    assert tasks.evaluate(labels, reference, engine, max_drop=None).failures == []  # reported, not bounded


@pytest.mark.parametrize("shape", [(3,), (3, 1)], ids=["[N]", "[N, 1]"])
def test_class_ids_may_keep_or_drop_the_size_1_batch_axis(shape: tuple[int, ...], tmp_path: Path) -> None:
    path = _npz(tmp_path / "r.npz", **{"label.y": np.array([2, 0, 1], np.int32).reshape(shape)})
    labels = tasks.load_labels(path, 3, {"y": (1, 4)}, "r.npz")
    assert labels is not None
    assert tasks.metric(labels.outputs[0], _logits([2, 0, 1])) == 100.0


def test_masks_give_iou_at_the_threshold_stored_beside_them(tmp_path: Path) -> None:
    mask = np.zeros((2, 1, 1, 4, 4), bool)
    mask[:, 0, 0, :2, :2] = True  # 8 pixels over the 2 samples
    path = _npz(tmp_path / "r.npz", **{"label.map": mask, "threshold.map": np.array(0.3, np.float32)})
    labels = tasks.load_labels(path, 2, {"map": (1, 1, 4, 4)}, "r.npz")
    assert labels is not None
    (label,) = labels.outputs
    assert label.kind == "mask"
    assert label.threshold == pytest.approx(0.3)
    exact = [{"map": np.where(m, 0.9, 0.1).astype(np.float32)} for m in mask]
    assert tasks.metric(label, exact) == 100.0
    bigger = [{"map": np.full((1, 1, 4, 4), 0.1, np.float32)} for _ in range(2)]
    for sample in bigger:
        sample["map"][0, 0, :2, :4] = 0.35  # above 0.3: 8 found per sample, 4 of them right
    assert tasks.metric(label, bigger) == pytest.approx(100 * 8 / 16)
    result = tasks.evaluate(labels, exact, bigger, max_drop=10)
    assert result.reason == "MaskIoUDropExceeded"


def test_masks_without_size_1_axes_and_as_0_1_integers_are_accepted(tmp_path: Path) -> None:
    path = _npz(tmp_path / "r.npz", **{"label.map": np.ones((2, 4, 4), np.uint8)})
    labels = tasks.load_labels(path, 2, {"map": (1, 1, 4, 4)}, "r.npz")
    assert labels is not None
    assert labels.outputs[0].kind == "mask"
    assert labels.outputs[0].threshold == tasks.DEFAULT_THRESHOLD


def test_a_reference_set_without_labels_has_none(tmp_path: Path) -> None:
    path = _npz(tmp_path / "r.npz", **{"expected.y": np.zeros((2, 1, 4), np.float32)})
    assert tasks.load_labels(path, 2, {"y": (1, 4)}, "r.npz") is None


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"label.z": np.zeros(3, np.int64)}, "names no output"),
        ({"label.y": np.zeros(2, np.int64)}, "first axis of N=3"),
        ({"label.y": np.zeros((3, 2), np.int64)}, "neither as class ids"),
        ({"label.y": np.zeros(3, np.float32)}, "neither as class ids"),
        ({"label.y": np.full((3, 1, 4), 2, np.int64)}, "values other than 0 and 1"),
    ],
    ids=["unknown output", "wrong count", "wrong shape", "float ids", "mask with other values"],
)
def test_labels_that_fit_no_output_are_refused_by_name(arrays: dict[str, Any], fragment: str, tmp_path: Path) -> None:
    path = _npz(tmp_path / "r.npz", **arrays)
    with pytest.raises(BadInputError, match=fragment) as raised:
        tasks.load_labels(path, 3, {"y": (1, 4)}, "r.npz")
    assert raised.value.reason == "InvalidSampleSet"


def test_an_almost_empty_mask_or_a_single_class_is_reported_as_a_reference_that_cannot_discriminate(
    tmp_path: Path,
) -> None:
    sparse = np.zeros((2, 1, 1, 40, 40), bool)
    sparse[0, 0, 0, 0, 0] = True  # 1 pixel in 3,200: what a detector finds on noise
    path = _npz(tmp_path / "r.npz", **{"label.map": sparse, "label.y": np.array([1, 1], np.int64)})
    labels = tasks.load_labels(path, 2, {"map": (1, 1, 40, 40), "y": (1, 4)}, "r.npz")
    assert labels is not None
    outputs = [{"map": np.where(m, 0.9, 0.0).astype(np.float32), "y": np.eye(4, dtype=np.float32)[[1]]} for m in sparse]
    notes = tasks.uninformative(labels, outputs)
    assert len(notes) == 2
    assert "cannot discriminate" in notes[0]
    assert "same class" in notes[1]
    warnings = report.reference_warnings({"verdict": "passed", "uninformative": {}}, notes)
    assert [w["reason"] for w in warnings] == ["ReferenceUninformative"] * 2
    dense = np.zeros((2, 1, 1, 40, 40), bool)
    dense[:, 0, 0, :10] = True
    path = _npz(tmp_path / "d.npz", **{"label.map": dense, "label.y": np.array([1, 2], np.int64)})
    labels = tasks.load_labels(path, 2, {"map": (1, 1, 40, 40), "y": (1, 4)}, "d.npz")
    assert labels is not None
    dense_outputs = [{"map": np.where(m, 0.9, 0.0).astype(np.float32), "y": np.eye(4, dtype=np.float32)[[1]]}
                     for m in dense]  # fmt: skip
    assert tasks.uninformative(labels, dense_outputs) == []


def test_an_uninformative_verdict_becomes_a_warning_naming_each_output() -> None:
    verdict = {"verdict": "uninformative", "uninformative": {"map": "near zero everywhere (|x| <= 0.001)"}}
    (warning,) = report.reference_warnings(verdict)
    assert warning["reason"] == "ReferenceUninformative"
    assert "no output (map: near zero everywhere" in warning["message"]
    assert report.reference_warnings({"verdict": "passed", "uninformative": {}}) == []
