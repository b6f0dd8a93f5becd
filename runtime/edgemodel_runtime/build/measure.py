"""Latency and throughput of a model on this machine, measured the same way for every variant."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

Runner = Callable[[], object]


@dataclass(frozen=True)
class Latency:
    """Milliseconds per inference, one stream, after warm-up."""

    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput_per_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def summarize(samples_s: Sequence[float]) -> Latency:
    ordered = sorted(samples_s)
    total = sum(ordered)
    return Latency(
        runs=len(ordered),
        p50_ms=1000 * _percentile(ordered, 0.50),
        p90_ms=1000 * _percentile(ordered, 0.90),
        p99_ms=1000 * _percentile(ordered, 0.99),
        mean_ms=1000 * statistics.fmean(ordered),
        throughput_per_s=len(ordered) / total if total > 0 else 0.0,
    )


def measure_interleaved(
    runners: dict[str, Runner],
    *,
    warmup: int = 3,
    min_runs: int = 20,
    budget_s: float = 3.0,
    max_runs: int = 2000,
    block: int = 5,
) -> dict[str, Latency]:
    """Time several variants in alternating rounds so that machine noise hits them alike.

    Each round gives every variant a block of runs after one untimed run: alternating single
    calls would have each model evict the other's weights from the caches and wake the other's
    idle thread pool, measuring the alternation rather than the models. The order of the variants is
    reversed every other round, so that none always runs right after the same other one.
    """
    for run in runners.values():
        for _ in range(warmup):
            run()
    timings: dict[str, list[float]] = {name: [] for name in runners}
    deadline = time.perf_counter() + budget_s * len(runners)
    order = list(runners.items())
    while True:
        for name, run in order:
            run()
            for _ in range(block):
                started = time.perf_counter()
                run()
                timings[name].append(time.perf_counter() - started)
        order.reverse()  # alternate which variant runs first, so neither always follows the other
        runs = len(next(iter(timings.values())))
        if runs >= max_runs or (runs >= min_runs and time.perf_counter() >= deadline):
            break
    return {name: summarize(values) for name, values in timings.items()}


def paired_ratio(
    baseline: Runner,
    candidate: Runner,
    *,
    warmup: int = 3,
    block: int = 5,
    min_rounds: int = 8,
    max_rounds: int = 400,
    budget_s: float = 2.0,
) -> tuple[float, dict[str, Latency]]:
    """How many times faster `candidate` is than `baseline` (> 1: faster), and both latencies (`baseline`,
    `candidate`).

    Each round times a block of each (the first call after a switch untimed, the order alternating), and the
    ratio is the median over rounds of baseline's block median / candidate's: load from other processes that
    changes between rounds hits both sides of a round alike and cancels out, where a ratio of overall medians
    would carry it.
    """
    runners = {"baseline": baseline, "candidate": candidate}
    for run in runners.values():
        for _ in range(warmup):
            run()
    timings: dict[str, list[float]] = {name: [] for name in runners}
    ratios: list[float] = []
    order = list(runners.items())
    deadline = time.perf_counter() + budget_s * 2
    while True:
        medians = {}
        for name, run in order:
            run()
            times = []
            for _ in range(block):
                started = time.perf_counter()
                run()
                times.append(time.perf_counter() - started)
            timings[name] += times
            medians[name] = statistics.median(times)
        ratios.append(medians["baseline"] / medians["candidate"] if medians["candidate"] > 0 else 1.0)
        order.reverse()
        if len(ratios) >= max_rounds or (len(ratios) >= min_rounds and time.perf_counter() >= deadline):
            break
    return statistics.median(ratios), {name: summarize(values) for name, values in timings.items()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
