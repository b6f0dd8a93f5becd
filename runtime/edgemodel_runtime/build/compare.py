"""Compare outputs value by value: an engine against its fp32 reference (build), a candidate against stable (shadow).

One module for both, so that "faithful" means the same thing at build time and while shadowing.

Value semantics, per output, position by position:

- Floating-point outputs: a NaN, +inf or -inf is equal only to the same non-finite value at the same
  position (NaN == NaN, +inf == +inf). A non-finite value where the other side has a finite one, or another
  non-finite value, is a *non-finite mismatch*: always a failure, whatever the tolerances. Error figures
  (absolute, relative, cosine) are computed over the positions where both sides are finite, so a NaN can never
  vanish into a maximum. float16 values that overflowed to inf are non-finite like any other.
- Integer, boolean and string outputs are compared exactly, element by element: any differing element is a
  failure, and their figure is the share of equal elements (`equal_share`). String elements (ONNX string
  tensors, OIP BYTES) compare as bytes, str taken as its UTF-8 encoding, so an engine's str and the wire's
  bytes are equal when they hold the same text; an empty string and embedded NULs are values like any other.
- Shapes must be equal, and both sides must be floating point, or both integer, or both boolean, or both
  strings.
- Top-1 (outputs shaped [..., classes] with more than one class): a row agrees when the candidate's arg-max is
  the reference's, or names a class that the reference scores equal to its maximum (ties and flat rows cannot
  discriminate); NaN ranks highest, as in numpy's argmax, and rows with a non-finite mismatch disagree.
- Relative errors are absolute differences divided by the output's scale: max(range, largest magnitude) of the
  reference's finite values over every sample compared.

A reference output that cannot discriminate (near zero everywhere, near constant, without finite values, or one
value everywhere for outputs compared exactly) is
*uninformative*: its figures are reported but decide nothing, because on such outputs every metric is noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from edgemodel_runtime.build.values import (
    Difference,
    IncomparableError,
    check_comparable,
    difference,
    exact_uninformative,
    kind_of,
    scale_of,
    uninformative,
)

__all__ = [
    "DEFAULT_AGREEMENT",
    "DEFAULT_TOLERANCES",
    "Comparison",
    "IncomparableError",
    "Miss",
    "OutputFigures",
    "SampleFigures",
    "Tolerance",
    "Tolerances",
    "agreement",
    "compare",
    "failures",
]

Outputs = Mapping[str, npt.NDArray[Any]]


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
class OutputFigures:
    """One output over every sample: the worst figures, and whether its reference can discriminate."""

    name: str
    dtype: str
    values: int  # elements compared, over all samples
    max_abs_error: float | None  # None for outputs compared exactly (integer, boolean, string)
    max_relative_error: float | None
    cosine: float | None  # smallest over the samples
    top1_agreement: float | None  # share of rows over all samples
    nonfinite: int
    nonfinite_candidate: int
    exact_mismatches: int | None
    worst_sample: int | None
    uninformative: str | None  # why the reference cannot discriminate, or None
    equal_share: float | None = None  # outputs compared exactly: share of equal elements (None when empty)


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


def _output(name: str, references: list[npt.NDArray[Any]], diffs: list[Difference]) -> OutputFigures:
    kind = kind_of(references[0])
    floating = kind == "float"
    top1 = [d.top1 for d in diffs if d.top1 is not None]
    rows = sum(total for _, total in top1)
    worst = _worst_index([(d.nonfinite + (d.exact_mismatches or 0), d.max_relative_error or 0.0) for d in diffs])
    values = sum(int(r.size) for r in references)
    mismatches = None if floating else sum(d.exact_mismatches or 0 for d in diffs)
    return OutputFigures(
        name=name,
        dtype="string" if kind == "string" else str(references[0].dtype),
        values=values,
        max_abs_error=_worst([d.max_abs_error for d in diffs]),
        max_relative_error=_worst([d.max_relative_error for d in diffs]),
        cosine=_worst([d.cosine for d in diffs], smallest=True),
        top1_agreement=sum(agree for agree, _ in top1) / rows if rows else None,
        nonfinite=sum(d.nonfinite for d in diffs),
        nonfinite_candidate=sum(d.nonfinite_candidate for d in diffs),
        exact_mismatches=mismatches,
        worst_sample=worst,
        uninformative=uninformative(references) if floating else exact_uninformative(references),
        equal_share=(values - mismatches) / values if mismatches is not None and values else None,
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
    as is any output that cannot be compared value by value, and one of another datatype (FP16 for FP32,
    INT32 for INT64) even where its values are equal: a client reads the datatype the server answers.
    """
    missed = [Miss(n, "missing_output", f"output {n}: missing from the candidate's answer")
              for n in sorted(set(stable) - set(candidate))]  # fmt: skip
    missed += [
        Miss(n, "extra_output", f"output {n}: not in stable's answer") for n in sorted(set(candidate) - set(stable))
    ]
    common = [name for name in stable if name in candidate]
    try:
        for name in common:
            ours, theirs = np.asarray(stable[name]), np.asarray(candidate[name])
            check_comparable(name, ours, theirs)
            if ours.dtype != theirs.dtype and kind_of(ours) != "string":  # str or bytes: both BYTES on the wire
                # Equal values in another datatype are still another answer: clients read the wire's type.
                raise IncomparableError(
                    f"output {name}: datatype {theirs.dtype} differs from stable's {ours.dtype}", "datatype"
                )
    except IncomparableError as error:
        return None, [*missed, Miss(name, error.reason, str(error))]
    if not common:
        return None, missed
    comparison = compare([{n: stable[n] for n in common}], [{n: candidate[n] for n in common}])
    return comparison, missed + failures(comparison, tolerances, judge_uninformative=True)
