"""measure.paired_ratio: the median of per-round ratios, with both variants' latencies."""

from __future__ import annotations

import time

import pytest

from edgemodel_runtime.build import measure


def _sleeper(seconds: float) -> measure.Runner:
    def run() -> object:
        time.sleep(seconds)
        return None

    return run


def test_a_candidate_half_as_slow_is_about_twice_as_fast_and_every_call_is_counted() -> None:
    # Sleeps: durations that do not depend on how busy the CPUs are.
    calls = {"baseline": 0, "candidate": 0}

    def counted(name: str, seconds: float) -> measure.Runner:
        inner = _sleeper(seconds)

        def run() -> object:
            calls[name] += 1
            return inner()

        return run

    ratio, latency = measure.paired_ratio(
        counted("baseline", 0.004), counted("candidate", 0.002), budget_s=0.2, block=3, min_rounds=5
    )
    assert 1.5 < ratio < 2.5
    assert latency["baseline"].runs == latency["candidate"].runs >= 15
    # warm-up 3 + one untimed call per round + the timed block
    rounds = latency["baseline"].runs // 3
    assert calls == {"baseline": 3 + rounds * 4, "candidate": 3 + rounds * 4}
    assert latency["baseline"].p50_ms == pytest.approx(4.0, rel=0.5)


def test_rounds_stop_at_max_rounds_even_within_the_budget() -> None:
    ratio, latency = measure.paired_ratio(_sleeper(0), _sleeper(0), budget_s=60, block=2, max_rounds=4, min_rounds=1)
    assert latency["candidate"].runs == 8
    assert ratio > 0
