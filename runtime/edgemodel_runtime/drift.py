"""Distribution summaries of a model's outputs, and the drift score between two of them. Pure numpy.

The build summarises what its engine outputs on the reference set (kept in the build report under
`drift`); the server summarises what it serves over a sliding window of rows and scores each summary
against the reference's with the population stability index. Only these summaries leave the
process, never inputs or outputs.

Kinds of output (decided from the declared shape and datatype):

- `classifier`: a floating-point output of rank 2, `[batch, classes]` with at least 2 classes. A row
  is one batch element. Rows that are not already probabilities (every value in [0, 1], summing to
  1 within 1e-3) go through a softmax. Two summaries: `confidence`, the top-1 probability in the ten
  bins [0, 0.1), ..., [0.9, 1.0]; and `predicted`, the arg-max class, one bin per class up to
  MAX_CLASS_BINS classes, beyond that in MAX_CLASS_BINS equal ranges of class indices.
- `values`: any other floating-point output. A row is one element (at most MAX_VALUES_PER_CALL
  per call, evenly strided). One summary, `value`: the elements in VALUE_BINS bins whose inner edges
  are the reference's deciles (so each bin holds about a tenth of the reference), merged where equal.
- Outputs of other datatypes (integers, booleans, strings) are not summarised.

Drift score: PSI = sum over bins of (p - q) * ln(p / q), with p the served proportion and q the
reference's, each raised to at least EPSILON (1e-4) first so that an empty bin contributes a large
but finite term (no renormalisation afterwards). 0 means the same distribution; by the usual rule
of thumb below 0.1 is no shift, 0.1-0.25 a moderate one and above 0.25 a significant one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

EPSILON = 1e-4
CONFIDENCE_EDGES = tuple(round(0.1 * i, 1) for i in range(11))  # 0.0, 0.1, ..., 1.0
MAX_CLASS_BINS = 32
VALUE_BINS = 10
MAX_VALUES_PER_CALL = 4096
MAX_OUTPUTS = 8  # outputs summarised per model, in declaration order (bounded metric cardinality)
MIN_REFERENCE_ROWS = 200  # fewer reference rows than this describe no distribution: no score


def kind_of(shape: Sequence[int], datatype: str) -> str | None:
    """`classifier`, `values` or None (not summarised) for an output of this declared shape and OIP datatype."""
    if datatype not in {"FP16", "FP32", "FP64"}:
        return None
    if len(shape) == 2 and (shape[1] >= 2 or shape[1] < 0):
        return "classifier"
    return "values"


def _probabilities(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Rows as probabilities: as they are when they already are, else through a softmax (per row)."""
    if np.isfinite(rows).all():  # the usual case, in few array operations (this runs on every response)
        top = rows.max(axis=1, keepdims=True)
        already = (rows.min(axis=1) >= 0) & (top[:, 0] <= 1) & (np.abs(rows.sum(axis=1) - 1) <= 1e-3)
        if already.all():
            return rows
        exp = np.exp(rows - top)
        soft = exp / exp.sum(axis=1, keepdims=True)
        return soft if not already.any() else np.where(already[:, None], rows, soft)
    finite = np.isfinite(rows).all(axis=1)
    already = finite & (rows >= 0).all(axis=1) & (rows <= 1).all(axis=1) & (np.abs(rows.sum(axis=1) - 1) <= 1e-3)
    shifted = rows - np.max(np.where(np.isfinite(rows), rows, -np.inf), axis=1, keepdims=True)
    with np.errstate(over="ignore", invalid="ignore"):
        exp = np.exp(np.nan_to_num(shifted, nan=-np.inf, neginf=-np.inf))
        soft = exp / exp.sum(axis=1, keepdims=True)
    return np.where(already[:, None], rows, np.nan_to_num(soft))


def class_bin(index: npt.NDArray[np.int64], classes: int) -> npt.NDArray[np.int64]:
    """The `predicted` bin of each class index."""
    if classes <= MAX_CLASS_BINS:
        return index
    return (index * MAX_CLASS_BINS) // classes


def class_bin_labels(classes: int) -> list[str]:
    """The label of each `predicted` bin: the class index, or the range `first-last` of a group."""
    if classes <= MAX_CLASS_BINS:
        return [str(i) for i in range(classes)]
    labels = []
    for group in range(MAX_CLASS_BINS):
        first = -(-group * classes // MAX_CLASS_BINS)
        last = -(-(group + 1) * classes // MAX_CLASS_BINS) - 1
        labels.append(f"{first}-{last}")
    return labels


def classify(array: npt.NDArray[Any]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], int]:
    """(top-1 probability per row, predicted bin per row, number of classes) of a `[batch, classes]` output."""
    classes = int(array.shape[-1]) if array.ndim == 2 else 0
    if not array.size or classes < 1:
        return np.zeros(0), np.zeros(0, np.int64), classes
    probabilities = _probabilities(np.asarray(array, dtype=np.float64))
    predicted = class_bin(probabilities.argmax(axis=1).astype(np.int64), classes)
    return probabilities.max(axis=1), predicted, classes


def confidence_bins(top1: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """The `confidence` bin of each top-1 probability: [0, 0.1) -> 0, ..., [0.9, 1.0] -> 9."""
    return np.minimum((top1 * 10).astype(np.int64), 9)  # probabilities are >= 0: truncation is the floor


def sample_values(array: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """The finite elements of an output, at most MAX_VALUES_PER_CALL of them, evenly strided."""
    flat = np.asarray(array).ravel()
    if flat.size > MAX_VALUES_PER_CALL:
        flat = flat[:: -(-flat.size // MAX_VALUES_PER_CALL)]
    values = flat.astype(np.float64)  # after the stride: a 640x480 map converts 4,096 elements, not 307,200
    return values[np.isfinite(values)]


def value_bins(values: npt.NDArray[np.float64], edges: Sequence[float]) -> npt.NDArray[np.int64]:
    """The `value` bin of each element: 0 at or below the first inner edge, len(edges) above the last."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="left").astype(np.int64)


def proportions(bins: npt.NDArray[np.int64], count: int) -> list[float]:
    total = max(len(bins), 1)
    return [float(v) / total for v in np.bincount(bins, minlength=count)[:count]]


def psi(served: Sequence[float], reference: Sequence[float]) -> float:
    """Population stability index of served proportions against reference proportions (see module doc)."""
    p = np.maximum(np.asarray(served, dtype=np.float64), EPSILON)
    q = np.maximum(np.asarray(reference, dtype=np.float64), EPSILON)
    return float(np.sum((p - q) * np.log(p / q)))


@dataclass(frozen=True)
class OutputSpec:
    """An output as declared: name, dimensions (-1 where dynamic) and OIP datatype (FP32, INT64, ...)."""

    name: str
    shape: tuple[int, ...]
    datatype: str

    @classmethod
    def from_onnxruntime(cls, name: str, dims: Sequence[int | str | None], ort_type: str) -> OutputSpec:
        """From ONNX Runtime's declaration (symbolic dimensions and `tensor(float)`-style types)."""
        datatype = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64"}.get(ort_type, "")
        return cls(name, tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims), datatype)


def reference_summaries(outputs: Sequence[OutputSpec], served: Sequence[dict[str, Any]], source: str) -> dict[str, Any]:
    """The build report's `drift` field: per output, the summaries of the engine's outputs on the reference set.

    `served`: the engine's outputs, one dict per reference sample; `source`: the reference's kind (`npz`
    for a reference set, `seeded` for generated inputs, which describe no production distribution: then
    the field says so and holds no summaries).
    """
    if source != "npz":
        return {"available": False, "reason": "no --reference set: seeded inputs describe no production distribution"}
    summaries: dict[str, Any] = {}
    for spec in outputs[:MAX_OUTPUTS]:
        kind = kind_of(spec.shape, spec.datatype)
        arrays = [np.asarray(sample[spec.name]) for sample in served if spec.name in sample]
        if kind is None or not arrays:
            continue
        if kind == "classifier":
            parts = [classify(a) for a in arrays if a.ndim == 2]
            if not parts:
                continue
            classes = parts[0][2]
            confidence = confidence_bins(np.concatenate([t for t, _, _ in parts]))
            predicted = np.concatenate([p for _, p, n in parts if n == classes])
            bins = min(classes, MAX_CLASS_BINS)
            summaries[spec.name] = {
                "kind": kind,
                "rows": len(confidence),
                "classes": classes,
                "confidence": {"edges": list(CONFIDENCE_EDGES), "proportions": proportions(confidence, 10)},
                "predicted": {"labels": class_bin_labels(classes), "proportions": proportions(predicted, bins)},
            }
        else:
            values = np.concatenate([sample_values(a) for a in arrays])
            if not values.size:
                continue
            inner = sorted({float(e) for e in np.quantile(values, np.linspace(0, 1, VALUE_BINS + 1)[1:-1])})
            summaries[spec.name] = {
                "kind": kind,
                "rows": int(values.size),
                "value": {"edges": inner, "proportions": proportions(value_bins(values, inner), len(inner) + 1)},
            }
    return {"available": True, "epsilon": EPSILON, "outputs": summaries}
