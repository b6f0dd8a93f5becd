"""Task-level checks: an engine judged by the same metric as the original model, where the reference has labels.

A reference .npz may carry the right answers beside its inputs, stacked on a first axis of N (one per sample,
whatever layout the inputs use), under `label.<output name>`:

- class ids (integers) for a classifier output shaped [..., classes]: one id per row, the label shaped as the
  output without its last axis (a [1, classes] output takes labels [N] or [N, 1]); the metric is top-1
  accuracy, in percent;
- masks (booleans, or integers 0/1) for a segmenter's or detector's map: the label shaped as the output (size-1
  axes may be left out); the output is binarised at `threshold.<output name>` (a scalar in the file, default
  0.5) and the metric is the intersection over union with the mask, in percent, over every sample.

Both the fp32 reference's metric and the engine's are reported; `maxAccuracyDrop` bounds how many percentage
points the engine may lose against the reference (default: not bounded, only reported).
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgemodel_runtime.build.errors import BadInputError

LABEL_PREFIX = "label."
THRESHOLD_PREFIX = "threshold."
DEFAULT_THRESHOLD = 0.5
METRIC_NAMES = {"classes": "top1Accuracy", "mask": "maskIoU"}


@dataclass(frozen=True)
class Label:
    """The right answers for one output: `kind` classes or mask, one array per sample."""

    output: str
    kind: str
    values: tuple[npt.NDArray[Any], ...]
    threshold: float = DEFAULT_THRESHOLD


@dataclass(frozen=True)
class Labels:
    """Labels for some outputs of the model, one per sample of the reference set."""

    outputs: tuple[Label, ...]


@dataclass(frozen=True)
class Figure:
    """One output's task metric for the reference and the engine (percent) and whether the drop is allowed."""

    output: str
    metric: str
    reference: float
    engine: float
    drop: float  # percentage points lost by the engine (negative when it gained)
    max_drop: float | None
    passed: bool


@dataclass(frozen=True)
class TaskResult:
    """Every labelled output's figures; `candidate` is the engine's lowest metric, `failures` the sentences."""

    figures: tuple[Figure, ...] = ()
    failures: list[str] = field(default_factory=list)

    @property
    def candidate(self) -> float | None:
        return min((f.engine for f in self.figures), default=None)

    @property
    def reason(self) -> str:
        """A CamelCase reason naming the metric that missed its bound (the first one)."""
        missed = next((f for f in self.figures if not f.passed), None)
        metric = missed.metric if missed else "task metric"
        return f"{metric[0].upper()}{metric[1:]}DropExceeded"

    def as_dict(self) -> dict[str, Any]:
        return {
            "metrics": [
                {"output": f.output, "metric": f.metric, "reference": round(f.reference, 4),
                 "engine": round(f.engine, 4), "drop": round(f.drop, 4), "maxAccuracyDrop": f.max_drop,
                 "passed": f.passed}
                for f in self.figures
            ],
            "failures": list(self.failures),
        }  # fmt: skip


def _squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def load_labels(path: Path, count: int, outputs: Mapping[str, Sequence[int]], where: str) -> Labels | None:
    """The labels in a reference .npz (None when it has none), checked against the model's outputs and shapes.

    `outputs` maps each output name to the shape of one sample's output (from the fp32 reference). Raises
    BadInputError (InvalidSampleSet) for a label of an unknown output, of the wrong count, dtype or shape.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files if key.startswith((LABEL_PREFIX, THRESHOLD_PREFIX))}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise BadInputError(f"{where}: not a readable .npz file: {error}", reason="InvalidSampleSet") from error
    labels = []
    for key, array in arrays.items():
        if not key.startswith(LABEL_PREFIX):
            continue
        name = key[len(LABEL_PREFIX) :]
        if name not in outputs:
            raise BadInputError(
                f"{where}: {key} names no output of the model (its outputs: {sorted(outputs)})",
                reason="InvalidSampleSet",
            )
        if array.ndim == 0 or array.shape[0] != count:
            raise BadInputError(
                f"{where}: {key} has shape {list(array.shape)}; labels are stacked on a first axis of N={count}",
                reason="InvalidSampleSet",
            )
        labels.append(_label(where, name, array, tuple(outputs[name]), arrays.get(THRESHOLD_PREFIX + name)))
    return Labels(tuple(labels)) if labels else None


def _label(
    where: str, name: str, array: npt.NDArray[Any], shape: tuple[int, ...], threshold: npt.NDArray[Any] | None
) -> Label:
    one = array.shape[1:]
    rows = shape[:-1]
    if array.dtype.kind in "iu" and shape and shape[-1] > 1 and _squeezed(one) == _squeezed(rows):
        values = tuple(np.asarray(a).reshape(rows).astype(np.int64) for a in array)
        return Label(name, "classes", values)
    if array.dtype.kind in "biu" and _squeezed(one) == _squeezed(shape):
        if array.dtype.kind != "b" and not np.isin(array, (0, 1)).all():
            raise BadInputError(
                f"{where}: label.{name} looks like a mask (the output's shape) but holds values other than 0 and 1",
                reason="InvalidSampleSet",
            )
        level = DEFAULT_THRESHOLD if threshold is None else float(np.asarray(threshold).reshape(-1)[0])
        return Label(name, "mask", tuple(np.asarray(a, dtype=bool).reshape(shape) for a in array), level)
    raise BadInputError(
        f"{where}: label.{name} {array.dtype}{list(one)} per sample fits output {name} {list(shape)} neither as "
        f"class ids (integers shaped {list(rows)}) nor as a mask (booleans or 0/1 shaped {list(shape)})",
        reason="InvalidSampleSet",
    )


def metric(label: Label, outputs: Sequence[Mapping[str, npt.NDArray[Any]]]) -> float:
    """The task metric of `outputs` (one mapping per sample) against `label`, in percent."""
    if label.kind == "classes":
        right = rows = 0
        for truth, sample in zip(label.values, outputs, strict=True):
            predicted = np.argmax(np.asarray(sample[label.output]), axis=-1)
            right += int((predicted.reshape(truth.shape) == truth).sum())
            rows += int(truth.size)
        return 100.0 * right / rows if rows else 100.0
    inter = union = 0
    for truth, sample in zip(label.values, outputs, strict=True):
        found = np.asarray(sample[label.output]).reshape(truth.shape) > label.threshold
        inter += int((found & truth).sum())
        union += int((found | truth).sum())
    return 100.0 * inter / union if union else 100.0


SPARSE_SHARE = 0.001
"""A mask label (or the reference's binarised map) with fewer positives than this share of its values can
hardly tell a good engine from a bad one: the detector on noise marks 0.07% of pixels."""


def uninformative(labels: Labels, reference: Sequence[Mapping[str, npt.NDArray[Any]]]) -> list[str]:
    """Why labelled outputs cannot discriminate: masks (labels or the reference's map at the threshold) almost
    all empty, or class ids all the same class. Empty when each can."""
    notes = []
    for label in labels.outputs:
        if label.kind == "classes":
            if len({int(v) for values in label.values for v in values.ravel()}) < 2:
                notes.append(f"output {label.output}: every label is the same class; top-1 accuracy says little")
            continue
        truth = float(np.mean([values.mean() for values in label.values]))
        found = float(np.mean([np.asarray(s[label.output]) > label.threshold for s in reference]))
        if min(truth, found) < SPARSE_SHARE:
            notes.append(
                f"output {label.output}: {100 * truth:.3f}% of the mask and {100 * found:.3f}% of the reference's "
                f"map above {label.threshold:g} are positive; a mask this empty cannot discriminate"
            )
    return notes


def evaluate(
    labels: Labels,
    reference: Sequence[Mapping[str, npt.NDArray[Any]]],
    engine: Sequence[Mapping[str, npt.NDArray[Any]]],
    max_drop: float | None,
) -> TaskResult:
    """The reference's and the engine's metric per labelled output; a drop above `max_drop` points fails."""
    figures, failures = [], []
    for label in labels.outputs:
        before, after = metric(label, reference), metric(label, engine)
        drop = before - after
        passed = max_drop is None or drop <= max_drop + 1e-9
        name = METRIC_NAMES[label.kind]
        figures.append(Figure(label.output, name, before, after, drop, max_drop, passed))
        if not passed:
            failures.append(
                f"output {label.output}: {name} {after:.2f}% against the fp32 reference's {before:.2f}%, "
                f"a drop of {drop:.2f} points > maxAccuracyDrop {max_drop:g}"
            )
    return TaskResult(tuple(figures), failures)
