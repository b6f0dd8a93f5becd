"""`edgemodel demo`'s decision: no figure that is not a number can promote a candidate."""

from __future__ import annotations

import math

import pytest

from edgemodel_runtime.demo import Criteria, Evidence, decide


def _evidence(**changes: float) -> Evidence:
    figures = {"compared": 100, "agreed": 100, "candidate_errors": 0, "latency_ratio": 1.0}
    figures |= changes
    return Evidence(requests=100, failed=0, compared=int(figures["compared"]), agreed=int(figures["agreed"]),
                    candidate_errors=int(figures["candidate_errors"]), latency_ratio=figures["latency_ratio"],
                    stable_p50_ms=1.0, stable_p99_ms=2.0, disagreed={})  # fmt: skip


def test_a_candidate_within_every_criterion_is_promoted() -> None:
    assert decide(_evidence(), Criteria())[0] == "promote"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"latency_ratio": math.nan}, "no latency ratio was measured"),
        ({"latency_ratio": math.inf}, "no latency ratio was measured"),
        ({"agreed": 90}, "agreement 0.900 < minAgreement 0.99"),
        ({"compared": 0, "agreed": 0}, "only 0 mirrored requests were compared"),
    ],
)
def test_missing_or_non_finite_evidence_rolls_back_with_its_reason(changes: dict[str, float], reason: str) -> None:
    assert decide(_evidence(**changes), Criteria()) == ("roll back", reason)


def test_the_table_says_when_the_int8_build_fell_back_to_fp32() -> None:
    from edgemodel_runtime.demo import _table

    figures = {"comparison": {"max_relative_error": 0.0, "cosine": 1.0, "worst_sample": 0}}
    report = {"precision": "fp32", "requestedPrecision": "int8", "buildSeconds": 1.0, "int8Speedup": 1.06,
              "latency": {"p50_ms": 1.0, "p99_ms": 2.0}, "fp32": figures, "candidate": figures,
              "decision": {"reason": "int8 was 1.06x fp32 on this class, below the 1.1x threshold"}}  # fmt: skip
    kept = report | {"precision": "int8", "decision": {"reason": "int8 is 1.5x faster"}}
    text = _table({"candidate (INT8)": report, "other": kept}, _evidence(), ("promote", "ok"))
    assert "asked for int8, built fp32: int8 was 1.06x fp32 on this class, below the 1.1x threshold" in text
    assert text.count("asked for") == 1
