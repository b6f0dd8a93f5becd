"""Compare an engine's outputs with the fp32 reference, and check them against tolerances.

Metrics are chosen not to flip between "perfect" and "broken" on near-zero outputs: errors are
reported both absolute and relative to the reference's range, and cosine similarity is left
undefined (None) where the reference is (near) constant, instead of reporting noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Outputs = Mapping[str, npt.NDArray[Any]]

_FLAT = 1e-6  # below this range the reference is considered constant


@dataclass(frozen=True)
class Comparison:
    """Worst-case figures over all samples and outputs."""

    samples: int
    max_abs_error: float
    max_relative_error: float
    cosine: float | None  # smallest cosine similarity; None where undefined
    top1_agreement: float | None  # share of positions with the same arg-max; None for non-classifier outputs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Tolerance:
    """Limits; None means unchecked."""

    max_abs_error: float | None = None
    max_relative_error: float | None = None
    min_cosine: float | None = None
    min_top1_agreement: float | None = None


DEFAULT_TOLERANCES = {
    "fp32": Tolerance(max_relative_error=1e-3, min_cosine=0.9999),
    "fp16": Tolerance(max_relative_error=2e-2, min_cosine=0.999),
    # bf16 keeps 8 significant bits (fp16 keeps 11): about 8x fp16's rounding error, same cosine bound.
    "bf16": Tolerance(max_relative_error=0.1, min_cosine=0.999),
    "int8": Tolerance(max_relative_error=0.15, min_cosine=0.97, min_top1_agreement=0.9),
}


def _classifier_like(array: npt.NDArray[Any]) -> bool:
    return array.ndim >= 2 and array.shape[-1] > 1 and np.issubdtype(array.dtype, np.floating)


def compare(reference: Sequence[Outputs], candidate: Sequence[Outputs]) -> Comparison:
    """Worst-case error figures of `candidate` against `reference`, sample by sample."""
    max_abs = max_rel = 0.0
    cosines: list[float] = []
    agree = positions = 0
    for ref_sample, cand_sample in zip(reference, candidate, strict=True):
        for name, ref in ref_sample.items():
            cand = np.asarray(cand_sample[name])
            if cand.shape != ref.shape:
                raise ValueError(f"output {name}: shape {list(cand.shape)} differs from reference {list(ref.shape)}")
            ref64, cand64 = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
            if ref64.size == 0:
                continue
            diff = float(np.max(np.abs(ref64 - cand64)))
            span = float(np.max(ref64) - np.min(ref64))
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / max(span, _FLAT, float(np.max(np.abs(ref64)))))
            if span > _FLAT:
                norms = float(np.linalg.norm(ref64) * np.linalg.norm(cand64))
                cosines.append(float(np.dot(ref64, cand64) / norms) if norms > 0 else 0.0)
            if _classifier_like(ref):
                same = np.argmax(ref, axis=-1) == np.argmax(cand, axis=-1)
                agree += int(np.sum(same))
                positions += same.size
    return Comparison(
        samples=len(reference),
        max_abs_error=max_abs,
        max_relative_error=max_rel,
        cosine=min(cosines) if cosines else None,
        top1_agreement=agree / positions if positions else None,
    )


def failures(comparison: Comparison, tolerance: Tolerance) -> list[str]:
    """Each missed tolerance as a sentence with the numbers; empty when all pass."""
    missed = []
    if tolerance.max_abs_error is not None and comparison.max_abs_error > tolerance.max_abs_error:
        missed.append(f"max abs error {comparison.max_abs_error:.3g} > maxAbsError {tolerance.max_abs_error:.3g}")
    if tolerance.max_relative_error is not None and comparison.max_relative_error > tolerance.max_relative_error:
        missed.append(
            f"max relative error {comparison.max_relative_error:.3g} > maxRelativeError "
            f"{tolerance.max_relative_error:.3g}"
        )
    if tolerance.min_cosine is not None and comparison.cosine is not None and comparison.cosine < tolerance.min_cosine:
        missed.append(f"cosine {comparison.cosine:.6f} < minCosine {tolerance.min_cosine}")
    agreement = comparison.top1_agreement
    if tolerance.min_top1_agreement is not None and agreement is not None and agreement < tolerance.min_top1_agreement:
        missed.append(f"top-1 agreement {agreement:.4f} < minTop1Agreement {tolerance.min_top1_agreement}")
    if math.isnan(comparison.max_abs_error):
        missed.append("outputs contain NaN")
    return missed
