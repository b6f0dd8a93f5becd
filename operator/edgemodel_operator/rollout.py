"""The rollout of one revision on one hardware class: named states and small pure transitions.

An attempt (see `records.Attempt`) moves

    Building -> Built -> Shadowing -> Promoted
        |         |           `-----> RolledBack
        v         `-> Promoted (nothing to shadow: the class's first revision, or it already serves)
      Failed -> Building (only when its Job is gone: deleting a failed Job asks for a new build)

Each transition is a function from (attempt, what the cluster shows for the class) to the next
attempt, or the same one when its condition does not hold. `advance` runs them in order, so one
reconcile can take several steps; every step it took is returned as an Event to record once the
new attempt is written. Nothing here reads a clock or the cluster: `now` and the observations are
arguments.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass

from edgemodel_operator.analysis import Counters, Evidence, Verdict, analyse, since
from edgemodel_operator.api.spec import Rollout
from edgemodel_operator.buildreport import LOST, chosen_message
from edgemodel_operator.records import Application, Attempt

APPROVE = "edgeml.dev/promote"  # annotation: the candidate revision a person approves for promotion
REJECT = "edgeml.dev/rollback"  # annotation: the candidate revision a person rolls back
APPROVALS = (APPROVE, REJECT)


@dataclass(frozen=True)
class ClassView:
    """What the cluster shows for one class, as far as the attempt's transitions need it.

    `job`: the build Job's state (None: no Job); `outcome`: the finished build's outcome (see
    `buildreport.read_outcome`; None: not finished, or not read because the attempt is past it);
    `has_stable`: some revision serves the class's live traffic; `mine`: the track of this revision's
    workload (None: no workload); `mine_ready`: its ready pods; `samples`: shadow counters per source
    for this candidate (None: they could not be read this time).
    """

    job: str | None  # "Active", "Complete", "Failed"
    outcome: dict[str, object] | None
    has_stable: bool
    mine: str | None  # "stable", "candidate"
    mine_ready: int
    samples: Mapping[str, Counters] | None


@dataclass(frozen=True)
class Context:
    """What a decision reads besides the attempt and the class: the rollout settings, the EdgeModel's
    annotations, the application the attempt belongs to, and the time (RFC 3339)."""

    rollout: Rollout
    annotations: Mapping[str, str]
    application: Application
    now: str


@dataclass(frozen=True)
class Step:
    """A transition taken: an Event reason and message."""

    reason: str
    message: str


def new_attempt(revision: str, key: str, application: Application, now: str, previous: Attempt | None) -> Attempt:
    """The first attempt of a revision on a class in this application. An earlier application's build of
    the same revision is reused (same revision, same engine): only its evidence and decision start afresh."""
    if previous is not None and previous.build is not None:
        return Attempt(revision, key, application.generation, "Built", now, build=previous.build)
    return Attempt(revision, key, application.generation, "Building", now)


def build_finished(attempt: Attempt, view: ClassView) -> tuple[Attempt, Step | None]:
    """Building -> Built (the outcome kept in the attempt) or Failed, once the Job has finished and its
    outcome is read (see `buildreport.read_outcome`). A report lost before it was read moves nothing:
    the pod may still show up in a late watch event (the status says `ReportLost` meanwhile)."""
    outcome = view.outcome
    if attempt.state != "Building" or view.job not in {"Complete", "Failed"} or outcome is None:
        return attempt, None
    if outcome.get("reason") == LOST:
        return attempt, None
    if view.job == "Failed" or outcome.get("status") not in {"built", "cached"}:
        reason = outcome.get("reason") or "BuildFailed"
        message = f"{reason}: {outcome.get('message') or 'the build Job failed without a report'}"
        return attempt.moved("Failed", message=message), Step("BuildFailed", f"{attempt.key}: {message}")
    artifact = outcome.get("artifact")
    if not artifact:
        message = "the build report names no artifact"
        return attempt.moved("Failed", message=message), Step("BuildFailed", f"{attempt.key}: {message}")
    build = {
        "engine": outcome.get("engine") if outcome.get("chosen") else None,  # auto: the engine it chose
        "chosen": outcome.get("chosen"),
        "candidates": outcome.get("candidates"),
        "precision": outcome.get("precision"),
        "cacheKey": outcome.get("cacheKey"),
        "artifactDigest": artifact,
        "buildSeconds": outcome.get("buildSeconds"),
        "metrics": outcome.get("metrics"),  # see buildreport.outcome_of: figures, worstSample, validation
    }
    built = attempt.moved("Built", build={k: v for k, v in build.items() if v not in (None, {}, [])})
    chose = chosen_message(outcome)
    return built, Step("EngineChosen", f"{attempt.key}: {chose}") if chose else None


def build_again(attempt: Attempt, view: ClassView) -> tuple[Attempt, Step | None]:
    """Failed -> Building when the failed Job is gone (someone deleted it to build again)."""
    if attempt.state != "Failed" or view.job is not None:
        return attempt, None
    return attempt.moved("Building", message=None), None


def serve_unshadowed(attempt: Attempt, view: ClassView, now: str) -> tuple[Attempt, Step | None]:
    """Built -> Promoted when there is nothing to shadow: no revision serves the class yet, or this
    revision already serves it (applied again after another one was rolled back)."""
    if attempt.state != "Built" or (view.has_stable and view.mine != "stable"):
        return attempt, None
    why = "the class's first revision: nothing to shadow" if not view.has_stable else "it already serves the class"
    return attempt.moved("Promoted", decision="Promote", reason=why, decided=now), None


def start_shadow(attempt: Attempt, view: ClassView, now: str, rollout: Rollout) -> tuple[Attempt, Step | None]:
    """Built -> Shadowing once the candidate is ready and its counters can be read for the baseline."""
    if attempt.state != "Built" or view.mine != "candidate" or not view.mine_ready or view.samples is None:
        return attempt, None
    baseline = {source: dict(counters) for source, counters in view.samples.items()}
    moved = attempt.moved("Shadowing", shadow_started=now, baseline=baseline)
    mirrored = f"mirroring {rollout.shadow.mirror_percent:g}% of requests to {attempt.revision}"
    within = f"a request agrees within {rollout.analysis.agreement.describe()}"
    return moved, Step("ShadowStarted", f"{attempt.key}: {mirrored}; {within}")


def approval(annotations: Mapping[str, str], name: str, attempt: Attempt, application: Application) -> str | None:
    """The annotation `name`=value that names this attempt, if any.

    `<revision>@<generation>` always names it; a bare `<revision>` does unless the same value was on the
    object when this application began (left over from an earlier attempt of the revision: stale).
    """
    value = annotations.get(name)
    if value == attempt.identity or (value == attempt.revision and application.stale.get(name) != value):
        return f"{name}={value}"
    return None


def evidence_of(attempt: Attempt, view: ClassView) -> Evidence | None:
    """The attempt's evidence: its sources' counters since its baseline; None when unreadable now."""
    if view.samples is None:
        return None
    started = _epoch(attempt.shadow_started) if attempt.shadow_started else None
    return since(attempt.baseline or {}, dict(view.samples), started)


def decide(attempt: Attempt, view: ClassView, context: Context) -> tuple[Attempt, Step | None, Verdict | None]:
    """Shadowing -> RolledBack or Promoted on the attempt's evidence. A rollback (annotation, or a
    failed analysis with autoRollback) wins over a promotion decided at the same time."""
    if attempt.state != "Shadowing":
        return attempt, None, None
    rollout, annotations, application, now = context.rollout, context.annotations, context.application, context.now
    evidence = evidence_of(attempt, view)
    rejected = approval(annotations, REJECT, attempt, application)
    if evidence is None and rejected is None:
        return attempt, None, None  # no evidence now: wait (a monitoring outage delays decisions)
    verdict = analyse(evidence or Evidence(), rollout, seconds_between(attempt.shadow_started or now, now),
                      approved=approval(annotations, APPROVE, attempt, application) is not None)  # fmt: skip
    figures = shadow_figures(evidence or Evidence())
    if rejected or (verdict.decision == "Rollback" and rollout.auto_rollback):
        why = f"rolled back by {rejected}" if rejected else verdict.reason
        moved = attempt.moved("RolledBack", decision="Rollback", reason=why, decided=now, figures=figures,
                              approval=rejected)  # fmt: skip
        return moved, Step("RolledBack", f"{attempt.key}: {attempt.revision} rolled back: {why}"), verdict
    if verdict.decision == "Promote":
        approved = None if rollout.auto_promote else approval(annotations, APPROVE, attempt, application)
        moved = attempt.moved("Promoted", decision="Promote", reason=verdict.reason, decided=now, figures=figures,
                              approval=approved)  # fmt: skip
        return moved, Step("Promoted", f"{attempt.key}: {attempt.revision} promoted: {verdict.reason}"), verdict
    return attempt, None, verdict


def shadow_figures(evidence: Evidence) -> dict[str, object]:
    """The figures shown (and recorded with a decision) for some evidence."""
    figures = {
        "requests": int(evidence.compared + evidence.errors),
        "agreement": None if evidence.agreement is None else round(evidence.agreement, 4),
        "latencyRatio": None if evidence.latency_ratio is None else round(evidence.latency_ratio, 3),
        "errorRate": None if evidence.error_rate is None else round(evidence.error_rate, 4),
    }
    return {k: v for k, v in figures.items() if v is not None}


def _epoch(moment: str) -> float:
    return datetime.datetime.fromisoformat(moment.replace("Z", "+00:00")).timestamp()


def seconds_between(start: str, end: str) -> float:
    return _epoch(end) - _epoch(start)


def advance(attempt: Attempt, view: ClassView, context: Context) -> tuple[Attempt, list[Step], Verdict | None]:
    """Every transition whose condition holds, in order; the steps taken and the latest verdict."""
    steps: list[Step] = []
    for transition in (build_again, build_finished):
        attempt, step = transition(attempt, view)
        steps += [step] if step else []
    attempt, step = serve_unshadowed(attempt, view, context.now)
    steps += [step] if step else []
    attempt, step = start_shadow(attempt, view, context.now, context.rollout)
    steps += [step] if step else []
    attempt, step, verdict = decide(attempt, view, context)
    steps += [step] if step else []
    return attempt, steps, verdict
