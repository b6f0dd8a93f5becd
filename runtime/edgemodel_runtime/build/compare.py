"""Compare outputs value by value: an engine against its fp32 reference (build), a candidate against stable (shadow).

One module for both, so that "faithful" means the same thing at build time and while shadowing.

Value semantics, per output, position by position:

- Floating-point outputs: a NaN, +inf or -inf is equal only to the same non-finite value at the same
  position (NaN == NaN, +inf == +inf). A non-finite value where the other side has a finite one, or another
  non-finite value, is a *non-finite mismatch*: always a failure, whatever the tolerances. Error figures
  (absolute, relative, cosine) are computed over the positions where both sides are finite, so a NaN can never
  vanish into a maximum. float16 values that overflowed to inf are non-finite like any other.
- Integer and boolean outputs are compared exactly: any differing element is a failure.
- Shapes must be equal, and both sides must be floating point, or both integer, or both boolean.
- Top-1 (outputs shaped [..., classes] with more than one class): a row agrees when the candidate's arg-max is
  the reference's, or names a class that the reference scores equal to its maximum (ties and flat rows cannot
  discriminate); NaN ranks highest, as in numpy's argmax, and rows with a non-finite mismatch disagree.
- Relative errors are absolute differences divided by the output's scale: max(range, largest magnitude) of the
  reference's finite values over every sample compared.

A reference output that cannot discriminate (near zero everywhere, near constant, or without finite values) is
*uninformative*: its figures are reported but decide nothing, because on such outputs every metric is noise.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

Outputs = Mapping[str, npt.NDArray[Any]]

FLAT = 1e-6  # an absolute range below this is constant
NEAR_CONSTANT = 1e-4  # a range below this share of the largest magnitude is (near) constant
NEAR_ZERO = 1e-3  # outputs whose every value stays within this of zero are near zero everywhere


class IncomparableError(ValueError):
    """Two outputs that cannot be compared value by value; `reason` is a label (shape, datatype)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Tolerance:
    """Limits on one output's figures; None means unchecked."""

    max_abs_error: float | None = None
    max_relative_error: float | None = None
    min_cosine: float | None = None
    min_top1_agreement: float | None = None

    def merged(self, override: Tolerance) -> Tolerance:
        """This tolerance with the limits `override` sets taking precedence."""
        return replace(self, **{k: v for k, v in asdict(override).items() if v is not None})

    def describe(self) -> str:
        parts = [
            f"{label} {value:g}"
            for label, value in (
                ("maxAbsError", self.max_abs_error),
                ("maxRelativeError", self.max_relative_error),
                ("minCosine", self.min_cosine),
                ("minTop1Agreement", self.min_top1_agreement),
            )
            if value is not None
        ]
        return ", ".join(parts) or "no limits"


@dataclass(frozen=True)
class Tolerances:
    """A default tolerance and overrides for named outputs."""

    default: Tolerance = field(default_factory=Tolerance)
    outputs: tuple[tuple[str, Tolerance], ...] = ()  # (output name, complete tolerance), sorted by name

    def of(self, name: str) -> Tolerance:
        return dict(self.outputs).get(name, self.default)

    def describe(self) -> str:
        text = self.default.describe()
        for name, tolerance in self.outputs:
            text += f"; output {name}: {tolerance.describe()}"
        return text


DEFAULT_TOLERANCES = {
    "fp32": Tolerance(max_relative_error=1e-3, min_cosine=0.9999),
    "fp16": Tolerance(max_relative_error=2e-2, min_cosine=0.999),
    # bf16 keeps 8 significant bits (fp16 keeps 11): about 8x fp16's rounding error, same cosine bound.
    "bf16": Tolerance(max_relative_error=0.1, min_cosine=0.999),
    "int8": Tolerance(max_relative_error=0.15, min_cosine=0.97, min_top1_agreement=0.9),
}
DEFAULT_AGREEMENT = Tolerance(max_relative_error=0.05, min_top1_agreement=1.0)
"""When a mirrored request agrees, unless spec.rollout.analysis.agreement says otherwise."""


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


def _kind(dtype: np.dtype[Any]) -> str:
    return {"b": "bool", "i": "integer", "u": "integer", "f": "float"}.get(dtype.kind, dtype.kind)


def check_comparable(name: str, reference: npt.NDArray[Any], candidate: npt.NDArray[Any]) -> None:
    """Raise IncomparableError unless the two arrays have one shape and one kind of element."""
    if candidate.shape != reference.shape:
        raise IncomparableError(
            f"output {name}: shape {list(candidate.shape)} differs from reference {list(reference.shape)}", "shape"
        )
    if _kind(candidate.dtype) != _kind(reference.dtype) or _kind(reference.dtype) not in {"bool", "integer", "float"}:
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
    return (high - low, magnitude) if high >= low else (0.0, 0.0)


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
    span, magnitude = float(r.max() - r.min()), float(np.abs(r).max())
    cosine = None
    if span > max(FLAT, NEAR_CONSTANT * magnitude):
        unit = max(magnitude, float(np.abs(c).max()))  # scaled first, so that huge values cannot overflow
        r, c = r / unit, c / unit
        norms = float(np.linalg.norm(r) * np.linalg.norm(c))
        cosine = float(np.clip(np.dot(r, c) / norms, -1.0, 1.0)) if norms > 0 else 0.0
    relative = _bounded(max_abs / max(scale, FLAT))
    return replace(figures, max_abs_error=max_abs, max_relative_error=relative, cosine=cosine, top1=top1)


def _bounded(value: float) -> float:
    """A figure that JSON can carry: an overflowed difference becomes the largest float."""
    return value if math.isfinite(value) else sys.float_info.max


@dataclass(frozen=True)
class OutputFigures:
    """One output over every sample: the worst figures, and whether its reference can discriminate."""

    name: str
    dtype: str
    values: int  # elements compared, over all samples
    max_abs_error: float | None  # None for integer and boolean outputs
    max_relative_error: float | None
    cosine: float | None  # smallest over the samples
    top1_agreement: float | None  # share of rows over all samples
    nonfinite: int
    nonfinite_candidate: int
    exact_mismatches: int | None
    worst_sample: int | None
    uninformative: str | None  # why the reference cannot discriminate, or None


@dataclass(frozen=True)
class SampleFigures:
    """One sample over its informative outputs (mismatch counts over every output)."""

    index: int
    max_abs_error: float | None
    max_relative_error: float | None
    cosine: float | None
    top1_agreement: float | None
    nonfinite: int
    exact_mismatches: int


@dataclass(frozen=True)
class Comparison:
    """Candidate against reference, sample by sample and output by output; headline figures are worst cases
    over the informative outputs (None where no output is informative)."""

    samples: int
    max_abs_error: float | None
    max_relative_error: float | None
    cosine: float | None
    top1_agreement: float | None
    nonfinite: int = 0
    worst_sample: int | None = None
    outputs: tuple[OutputFigures, ...] = ()
    per_sample: tuple[SampleFigures, ...] = ()

    @property
    def informative(self) -> bool:
        """Whether any output's reference can discriminate (vacuously true without outputs)."""
        return not self.outputs or any(o.uninformative is None for o in self.outputs)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"informative": self.informative}


def _worst(values: Sequence[float | None], *, smallest: bool = False) -> float | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return min(present) if smallest else max(present)


def _worst_index(ranks: Sequence[tuple[int, float]]) -> int | None:
    """The first sample with the most mismatches, then the largest relative error; None when all are perfect."""
    if not ranks or max(ranks) == (0, 0.0):
        return None
    return ranks.index(max(ranks))


def _exact_uninformative(references: Sequence[npt.NDArray[Any]]) -> str | None:
    flat = np.concatenate([np.ravel(a) for a in references]) if references else np.empty(0)
    if flat.size > 1 and bool(np.all(flat == flat[0])):
        return f"constant (every value is {flat[0].item()!r})"
    return None


def _output(name: str, references: list[npt.NDArray[Any]], diffs: list[Difference]) -> OutputFigures:
    floating = references[0].dtype.kind == "f"
    top1 = [d.top1 for d in diffs if d.top1 is not None]
    rows = sum(total for _, total in top1)
    worst = _worst_index([(d.nonfinite + (d.exact_mismatches or 0), d.max_relative_error or 0.0) for d in diffs])
    return OutputFigures(
        name=name,
        dtype=str(references[0].dtype),
        values=sum(int(r.size) for r in references),
        max_abs_error=_worst([d.max_abs_error for d in diffs]),
        max_relative_error=_worst([d.max_relative_error for d in diffs]),
        cosine=_worst([d.cosine for d in diffs], smallest=True),
        top1_agreement=sum(agree for agree, _ in top1) / rows if rows else None,
        nonfinite=sum(d.nonfinite for d in diffs),
        nonfinite_candidate=sum(d.nonfinite_candidate for d in diffs),
        exact_mismatches=None if floating else sum(d.exact_mismatches or 0 for d in diffs),
        worst_sample=worst,
        uninformative=uninformative(references) if floating else _exact_uninformative(references),
    )


def _sample(index: int, diffs: Mapping[str, Difference], informative: set[str]) -> SampleFigures:
    judged = [d for name, d in diffs.items() if name in informative and d.exact_mismatches is None]
    top1 = [d.top1 for d in judged if d.top1 is not None]
    rows = sum(total for _, total in top1)
    return SampleFigures(
        index=index,
        max_abs_error=_worst([d.max_abs_error for d in judged]),
        max_relative_error=_worst([d.max_relative_error for d in judged]),
        cosine=_worst([d.cosine for d in judged], smallest=True),
        top1_agreement=sum(agree for agree, _ in top1) / rows if rows else None,
        nonfinite=sum(d.nonfinite for d in diffs.values()),
        exact_mismatches=sum(d.exact_mismatches or 0 for d in diffs.values()),
    )


def compare(reference: Sequence[Outputs], candidate: Sequence[Outputs]) -> Comparison:
    """Figures of `candidate` against `reference`, sample by sample (same number of samples, same output names).

    Raises IncomparableError when an output differs in shape or kind of element, KeyError when the
    candidate lacks an output of the reference.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(candidate)} candidate samples for {len(reference)} reference samples")
    names = list(reference[0]) if reference else []
    per_output: dict[str, list[Difference]] = {}
    outputs = []
    for name in names:
        refs = [np.asarray(sample[name]) for sample in reference]
        cands = [np.asarray(sample[name]) for sample in candidate]
        for ref, cand in zip(refs, cands, strict=True):
            check_comparable(name, ref, cand)
        span, magnitude = scale_of(refs) if refs[0].dtype.kind == "f" else (0.0, 0.0)
        per_output[name] = [difference(r, c, max(span, magnitude)) for r, c in zip(refs, cands, strict=True)]
        outputs.append(_output(name, refs, per_output[name]))
    informative = {o.name for o in outputs if o.uninformative is None}
    samples = tuple(
        _sample(i, {name: diffs[i] for name, diffs in per_output.items()}, informative) for i in range(len(reference))
    )
    judged = [o for o in outputs if o.name in informative and o.exact_mismatches is None]
    top1 = [(o.top1_agreement, o.values) for o in judged if o.top1_agreement is not None]
    return Comparison(
        samples=len(reference),
        max_abs_error=_worst([o.max_abs_error for o in judged]),
        max_relative_error=_worst([o.max_relative_error for o in judged]),
        cosine=_worst([o.cosine for o in judged], smallest=True),
        top1_agreement=min(share for share, _ in top1) if top1 else None,
        nonfinite=sum(o.nonfinite for o in outputs),
        worst_sample=_worst_index([(s.nonfinite + s.exact_mismatches, s.max_relative_error or 0.0) for s in samples]),
        outputs=tuple(outputs),
        per_sample=samples,
    )


@dataclass(frozen=True)
class Miss:
    """One reason a comparison fails: the output, a label (for metrics) and a sentence with the numbers."""

    output: str
    label: str
    text: str


def _limits(figures: OutputFigures, tolerance: Tolerance) -> list[Miss]:
    name, missed = figures.name, []
    checks = (
        ("abs_error", figures.max_abs_error, tolerance.max_abs_error, False, "max abs error", "maxAbsError"),
        ("relative_error", figures.max_relative_error, tolerance.max_relative_error, False, "max relative error",
         "maxRelativeError"),
        ("cosine", figures.cosine, tolerance.min_cosine, True, "cosine", "minCosine"),
        ("top1", figures.top1_agreement, tolerance.min_top1_agreement, True, "top-1 agreement", "minTop1Agreement"),
    )  # fmt: skip
    for label, value, limit, at_least, what, setting in checks:
        if value is None or limit is None or (value >= limit if at_least else value <= limit):
            continue
        shown = f"{value:.6f}" if label == "cosine" else f"{value:.4f}" if label == "top1" else f"{value:.3g}"
        sign = "<" if at_least else ">"
        sample = f" (worst: sample {figures.worst_sample})" if figures.worst_sample is not None else ""
        missed.append(Miss(name, label, f"output {name}: {what} {shown} {sign} {setting} {limit:g}{sample}"))
    return missed


def failures(
    comparison: Comparison, tolerance: Tolerance | Tolerances, *, judge_uninformative: bool = False
) -> list[Miss]:
    """Every reason the comparison fails; empty when it passes.

    Non-finite mismatches and differing integer or boolean values always fail. Tolerances apply to the
    worst sample of each output, and only to informative outputs unless `judge_uninformative`.
    """
    tolerances = tolerance if isinstance(tolerance, Tolerances) else Tolerances(tolerance)
    missed = []
    for figures in comparison.outputs:
        name = figures.name
        if figures.nonfinite:
            only = figures.nonfinite_candidate
            text = f"output {name}: {figures.nonfinite} of {figures.values} values non-finite where the other side "
            text += f"is not ({only} NaN/inf where the reference is finite)"
            missed.append(Miss(name, "nonfinite", text))
        if figures.exact_mismatches:
            text = f"output {name}: {figures.exact_mismatches} of {figures.values} {figures.dtype} values differ"
            missed.append(Miss(name, "exact", text + " (compared exactly)"))
        if figures.uninformative is None or judge_uninformative:
            missed += _limits(figures, tolerances.of(name))
    return missed


def agreement(stable: Outputs, candidate: Outputs, tolerances: Tolerances) -> tuple[Comparison | None, list[Miss]]:
    """Whether a candidate's answer to one request agrees with stable's: the figures and every reason it does not.

    Outputs are matched by name; one missing from the candidate's answer or added to it is a disagreement,
    as is any output that cannot be compared value by value.
    """
    missed = [Miss(n, "missing_output", f"output {n}: missing from the candidate's answer")
              for n in sorted(set(stable) - set(candidate))]  # fmt: skip
    missed += [
        Miss(n, "extra_output", f"output {n}: not in stable's answer") for n in sorted(set(candidate) - set(stable))
    ]
    common = [name for name in stable if name in candidate]
    try:
        for name in common:
            check_comparable(name, np.asarray(stable[name]), np.asarray(candidate[name]))
    except IncomparableError as error:
        return None, [*missed, Miss(name, error.reason, str(error))]
    if not common:
        return None, missed
    comparison = compare([{n: stable[n] for n in common}], [{n: candidate[n] for n in common}])
    return comparison, missed + failures(comparison, tolerances, judge_uninformative=True)
