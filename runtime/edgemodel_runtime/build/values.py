"""One pair of arrays, one output of one sample: whether they can be compared, and how they differ.

The value semantics of every comparison (build validation and shadow agreement alike) live here; see
edgemodel_runtime.build.compare for what they mean and for the figures and verdicts over samples and outputs.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

FLAT = 1e-6  # an absolute range below this is constant
NEAR_CONSTANT = 1e-4  # a range below this share of the largest magnitude is (near) constant
NEAR_ZERO = 1e-3  # outputs whose every value stays within this of zero are near zero everywhere


class IncomparableError(ValueError):
    """Two outputs that cannot be compared value by value; `reason` is a label (shape, datatype)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Difference:
    """One output of one sample: how the candidate differs from the reference."""

    max_abs_error: float | None = None  # over positions where both are finite; None where there are none
    max_relative_error: float | None = None
    cosine: float | None = None  # None where the reference is (near) constant
    top1: tuple[int, int] | None = None  # (rows agreeing, rows) for classifier-like outputs
    nonfinite: int = 0  # positions whose non-finite values differ
    nonfinite_candidate: int = 0  # ... of which: NaN/inf in the candidate where the reference is finite
    exact_mismatches: int | None = None  # integer and boolean outputs: elements that differ


def kind_of(array: npt.NDArray[Any]) -> str:
    """How an array's elements compare: "float", "integer", "bool", "string" (str or bytes elements: ONNX
    string tensors, OIP BYTES), or numpy's kind letter for anything else (not comparable)."""
    kind = array.dtype.kind
    if kind in "SU" or (kind == "O" and all(isinstance(value, str | bytes) for value in array.flat)):
        return "string"
    return {"b": "bool", "i": "integer", "u": "integer", "f": "float"}.get(kind, kind)


def as_bytes(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """String elements as one representation, an object array of bytes: str is encoded as UTF-8 (as ONNX
    Runtime's str outputs are sent as BYTES), so text from the engine, the wire and a .npz compare equal."""
    encoded = [v.encode("utf-8", "surrogatepass") if isinstance(v, str) else bytes(v) for v in array.flat]
    result = np.empty(len(encoded), dtype=object)
    result[:] = encoded
    return result.reshape(array.shape)


def check_comparable(name: str, reference: npt.NDArray[Any], candidate: npt.NDArray[Any]) -> None:
    """Raise IncomparableError unless the two arrays have one shape and one kind of element."""
    if candidate.shape != reference.shape:
        raise IncomparableError(
            f"output {name}: shape {list(candidate.shape)} differs from reference {list(reference.shape)}", "shape"
        )
    kind = kind_of(reference)
    if kind_of(candidate) != kind or kind not in {"bool", "integer", "float", "string"}:
        raise IncomparableError(
            f"output {name}: datatype {candidate.dtype} cannot be compared with reference {reference.dtype}", "datatype"
        )


def scale_of(references: Sequence[npt.NDArray[Any]]) -> tuple[float, float]:
    """(range, largest magnitude) of the finite values of one output over every sample; (0, 0) if none."""
    low, high, magnitude = math.inf, -math.inf, 0.0
    for array in references:
        values = np.asarray(array, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
            magnitude = max(magnitude, float(np.abs(finite).max()))
    # A range wider than float64 (values near both its limits) is the largest float, not inf: an infinite
    # scale would make every relative error 0.
    return (_bounded(high - low), magnitude) if high >= low else (0.0, 0.0)


def uninformative(references: Sequence[npt.NDArray[Any]]) -> str | None:
    """Why a floating-point output's reference values cannot discriminate, or None when they can."""
    span, magnitude = scale_of(references)
    values = sum(int(np.size(a)) for a in references)
    if values == 0:
        return None  # empty tensors: nothing to judge, nothing to report
    if magnitude == 0.0 and span == 0.0 and not any(np.isfinite(np.asarray(a)).any() for a in references):
        return "no finite reference values"
    if magnitude <= NEAR_ZERO:
        return f"near zero everywhere (largest magnitude {magnitude:.3g} <= {NEAR_ZERO:g})"
    if span <= max(FLAT, NEAR_CONSTANT * magnitude):
        return f"near constant (range {span:.3g} at magnitude {magnitude:.3g})"
    return None


def _top1(reference: npt.NDArray[np.float64], candidate: npt.NDArray[np.float64], bad: npt.NDArray[np.bool_],
          margin: float) -> tuple[int, int]:  # fmt: skip
    chosen = np.argmax(reference, axis=-1)
    picked = np.argmax(candidate, axis=-1)
    best = np.take_along_axis(reference, chosen[..., None], axis=-1)[..., 0]
    scored = np.take_along_axis(reference, picked[..., None], axis=-1)[..., 0]
    with np.errstate(invalid="ignore"):
        agree = (chosen == picked) | (scored >= best - margin)
    agree &= ~bad.any(axis=-1)
    return int(agree.sum()), int(agree.size)


def difference(reference: npt.NDArray[Any], candidate: npt.NDArray[Any], scale: float) -> Difference:
    """How `candidate` differs from `reference` (same shape and kind, see check_comparable)."""
    if kind_of(reference) == "string":
        return Difference(exact_mismatches=int(np.count_nonzero(as_bytes(reference) != as_bytes(candidate))))
    if reference.dtype.kind != "f":
        if reference.dtype != candidate.dtype:  # int64 against uint64 would meet as float64 and lose digits
            reference, candidate = reference.astype(object), candidate.astype(object)
        return Difference(exact_mismatches=int(np.count_nonzero(reference != candidate)))
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    ref_finite, cand_finite = np.isfinite(ref), np.isfinite(cand)
    both = ref_finite & cand_finite
    same_special = (np.isnan(ref) & np.isnan(cand)) | ((ref == cand) & ~ref_finite)
    bad = ~both & ~same_special
    figures = Difference(nonfinite=int(bad.sum()), nonfinite_candidate=int((ref_finite & ~cand_finite).sum()))
    if ref.size == 0:
        return figures
    top1 = None
    if ref.ndim >= 2 and ref.shape[-1] > 1:
        top1 = _top1(ref, cand, bad, FLAT * scale)
    if not both.any():
        return replace(figures, top1=top1)
    r, c = ref[both], cand[both]
    with np.errstate(over="ignore"):
        max_abs = _bounded(float(np.max(np.abs(r - c))))
    with np.errstate(over="ignore"):  # an overflowed range is still wider than flat
        span, magnitude = float(r.max() - r.min()), float(np.abs(r).max())
    cosine = None
    if span > max(FLAT, NEAR_CONSTANT * magnitude) and max_abs == 0.0:
        cosine = 1.0  # equal values: exactly 1, where a sum in floating point can round below it (minCosine 1)
    elif span > max(FLAT, NEAR_CONSTANT * magnitude):
        unit = max(magnitude, float(np.abs(c).max()))  # scaled first, so that huge values cannot overflow
        r, c = r / unit, c / unit
        norms = float(np.linalg.norm(r) * np.linalg.norm(c))
        cosine = float(np.clip(np.dot(r, c) / norms, -1.0, 1.0)) if norms > 0 else 0.0
    relative = _bounded(max_abs / max(scale, FLAT))
    return replace(figures, max_abs_error=max_abs, max_relative_error=relative, cosine=cosine, top1=top1)


def _bounded(value: float) -> float:
    """A figure that JSON can carry: an overflowed difference becomes the largest float."""
    return value if math.isfinite(value) else sys.float_info.max


def exact_uninformative(references: Sequence[npt.NDArray[Any]]) -> str | None:
    """Why an exactly compared output (integer, boolean, string) cannot discriminate: one value everywhere."""
    if references and kind_of(references[0]) == "string":  # as Python bytes: numpy's bytes scalars drop trailing NULs
        texts = {value for array in references for value in as_bytes(array).flat}
        values = sum(int(np.size(a)) for a in references)
        return f"constant (every value is {next(iter(texts))!r})" if values > 1 and len(texts) == 1 else None
    flat = np.concatenate([np.ravel(a) for a in references]) if references else np.empty(0)
    if flat.size > 1 and bool(np.all(flat == flat[0])):
        return f"constant (every value is {flat[0].item()!r})"
    return None
