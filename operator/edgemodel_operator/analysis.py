"""Shadow analysis: small pure checks over the evidence a candidate gathered, and the verdict.

The evidence is what the stable pods of one class counted while mirroring live requests to the
candidate of that class (the runtime's edgemodel_shadow_* metrics, summed over the pods, read from
Prometheus or from the pods themselves). Each check says pass, fail or wait; any failure rolls
back, any wait keeps shadowing, and only all passes promote.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from edgemodel_operator.api.fields import parse_duration
from edgemodel_operator.api.spec import Rollout

Outcome = Literal["pass", "fail", "wait"]
Decision = Literal["Pending", "Promote", "Rollback", "AwaitingApproval"]


@dataclass(frozen=True)
class Evidence:
    """Counters summed over the stable pods of one class, for one candidate revision."""

    mirrored: float = 0  # copies sent to the candidate
    compared: float = 0  # candidate answers compared with stable's
    agreed: float = 0  # ... that agreed within the agreement tolerance
    errors: float = 0  # copies the candidate failed (error status, timeout, refused connection)
    latency_ratio: float | None = None  # mean of candidate latency / stable latency per compared request
    pods: int = 0  # stable pods the figures come from
    disagreed: tuple[tuple[str, float], ...] = ()  # compared requests that disagreed, by first reason

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.mirrored if self.mirrored else None


@dataclass(frozen=True)
class Check:
    name: str
    outcome: Outcome
    detail: str


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    checks: tuple[Check, ...]

    @property
    def reason(self) -> str:
        """The checks that decided, with their figures."""
        deciding = [c for c in self.checks if c.outcome == "fail"] or [c for c in self.checks if c.outcome == "wait"]
        return "; ".join(c.detail for c in deciding or self.checks)


def _requests(evidence: Evidence, rollout: Rollout, elapsed: float) -> Check:
    need = rollout.shadow.min_requests
    done = evidence.compared + evidence.errors
    if done >= need:
        return Check("requests", "pass", f"{done:.0f} mirrored requests >= minRequests {need}")
    return Check("requests", "wait", f"{done:.0f}/{need} mirrored requests")


def _time(evidence: Evidence, rollout: Rollout, elapsed: float) -> Check:
    need = parse_duration(rollout.shadow.duration)
    if elapsed >= need:
        return Check("duration", "pass", f"shadowed {elapsed:.0f}s >= {rollout.shadow.duration}")
    return Check("duration", "wait", f"shadowed {elapsed:.0f}s of {rollout.shadow.duration}")


def _bound(name: str, label: str, value: float | None, limit: float, setting: str, *, at_least: bool) -> Check:
    """`value` against a lower (`at_least`) or upper bound; wait while there is no value yet."""
    if value is None:
        return Check(name, "wait", f"no {label} yet")
    if not math.isfinite(value):  # NaN compares false both ways: it must fail, and say why
        return Check(name, "fail", f"{label} is {value}, not a finite number")
    ok = value >= limit if at_least else value <= limit
    sign = (">=" if ok else "<") if at_least else ("<=" if ok else ">")
    shown = f"{value:.3f}" if at_least else f"{value:.2f}"
    return Check(name, "pass" if ok else "fail", f"{label} {shown} {sign} {setting} {limit}")


def _agreement(evidence: Evidence, rollout: Rollout, elapsed: float) -> Check:
    limit = rollout.analysis.min_agreement
    check = _bound("agreement", "agreement", evidence.agreement, limit, "minAgreement", at_least=True)
    if evidence.agreement is None:
        return check
    detail = f"{check.detail} (agreeing within {rollout.analysis.agreement.describe()})"
    if evidence.disagreed:
        detail += "; disagreed by first reason: " + ", ".join(f"{r} {n:.0f}" for r, n in evidence.disagreed)
    return replace(check, detail=detail)


def _latency(evidence: Evidence, rollout: Rollout, elapsed: float) -> Check:
    limit = rollout.analysis.max_latency_ratio
    return _bound("latency", "latency ratio", evidence.latency_ratio, limit, "maxLatencyRatio", at_least=False)


def _errors(evidence: Evidence, rollout: Rollout, elapsed: float) -> Check:
    limit = rollout.analysis.max_error_rate
    rate = evidence.error_rate
    if rate is None:
        return Check("errors", "wait", "no mirrored requests yet")
    if not math.isfinite(rate):
        return Check("errors", "fail", f"candidate error rate is {rate}, not a finite number")
    detail = f"candidate error rate {rate:.3f} ({evidence.errors:.0f}/{evidence.mirrored:.0f})"
    if rate <= limit:
        return Check("errors", "pass", f"{detail} <= maxErrorRate {limit}")
    # More failures than the whole budget allows at minRequests: no later success can make up for it.
    if evidence.errors > limit * rollout.shadow.min_requests:
        return Check("errors", "fail", f"{detail} > maxErrorRate {limit}")
    return Check("errors", "wait", f"{detail} > maxErrorRate {limit} so far")


CHECKS: tuple[Callable[[Evidence, Rollout, float], Check], ...] = (_requests, _time, _agreement, _latency, _errors)


def analyse(evidence: Evidence, rollout: Rollout, elapsed: float, *, approved: bool) -> Verdict:
    """The decision for one class's candidate after `elapsed` seconds of shadowing.

    Figures are only judged once enough requests and time have passed, except candidate errors,
    which fail as soon as they exceed what the error budget allows.
    """
    checks = tuple(check(evidence, rollout, elapsed) for check in CHECKS)
    outcomes = {c.name: c.outcome for c in checks}
    if outcomes["errors"] == "fail":
        return Verdict("Rollback", checks)
    if "wait" in (outcomes["requests"], outcomes["duration"]):
        return Verdict("Pending", checks)
    if "fail" in outcomes.values():
        return Verdict("Rollback", checks)
    if "wait" in outcomes.values():
        return Verdict("Pending", checks)
    return Verdict("Promote" if rollout.auto_promote or approved else "AwaitingApproval", checks)


Counters = dict[str, float]
"""One source's (stable pod's) shadow counters for one candidate: mirrored, compared, agreed, errors,
ratio_sum, ratio_count, `disagreed:<reason>` (compared requests that disagreed, by first reason), and
`created` (when the source's counters were created, in Unix seconds: a new value means the source
restarted and its counters began again at zero)."""
COUNTED = ("mirrored", "compared", "agreed", "errors", "ratio_sum", "ratio_count")
DISAGREED = "disagreed:"


def _reset(baseline: Counters, now: Counters) -> bool:
    """Whether the source's counters began again since `baseline` (a restart): another creation time,
    or any counter lower than it was."""
    if baseline.get("created") != now.get("created"):
        return True
    return any(now.get(name, 0.0) < baseline.get(name, 0.0) for name in COUNTED)


def since(baseline: dict[str, Counters], now: dict[str, Counters], started: float | None = None) -> Evidence:
    """Evidence gathered since `baseline` was taken (at `started`, Unix seconds), summed over sources.

    A source whose counters were reset since (a restarted pod) counts from zero: what it counted
    since it started belongs to this attempt. So does a source absent from the baseline whose
    counters were created after `started` (a pod started later, or one that first mirrored to this
    candidate then). One absent from the baseline whose counters are older (a pod that could not be
    read when the baseline was taken) counts nothing: its older counts cannot be told apart. A
    source that disappeared contributes nothing (its figures are lost, never double counted).
    """
    sums = dict.fromkeys(COUNTED, 0.0)
    counted = 0
    for source, counters in now.items():
        base = baseline.get(source)
        if base is None and started is not None and counters.get("created", started) < started:
            continue
        start = {} if base is None or _reset(base, counters) else base
        counted += 1
        for name in (*COUNTED, *(n for n in counters if n.startswith(DISAGREED))):
            sums[name] = sums.get(name, 0.0) + counters.get(name, 0.0) - start.get(name, 0.0)
    count = sums["ratio_count"]
    disagreed = sorted((n.removeprefix(DISAGREED), v) for n, v in sums.items() if n.startswith(DISAGREED) and v > 0)
    return Evidence(
        mirrored=sums["mirrored"],
        compared=sums["compared"],
        agreed=sums["agreed"],
        errors=sums["errors"],
        latency_ratio=sums["ratio_sum"] / count if count else None,
        pods=counted,
        disagreed=tuple(disagreed),
    )
