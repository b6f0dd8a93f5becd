"""The rollout of one revision on one hardware class: named states and small pure transitions.

An attempt (see `records.Attempt`) moves

    Building -> Built -> Shadowing -> Promoted
        |         |           `-----> RolledBack
        v         `-> Promoted (nothing to shadow: the class's first revision, or it already serves)
      Failed -> Building (when its Job is gone: deleting a failed Job asks for a new build; when an
                          infrastructure failure's backoff is over; on edgeml.dev/retry-build)

Deadlines and requests that end a state early (see `reject_candidate`, `progress_deadline`,
`shadow_timeout`, `schedule_retry`, `retry_build`):

- Built -> RolledBack when no candidate pod is Ready within `spec.rollout.progressDeadline` of its
  workload's creation (the reason is what the pods show, see `progress.pod_problem`), or on
  edgeml.dev/rollback.
- Shadowing -> RolledBack / Promoted / (held) once `spec.rollout.shadow.timeout` passes without a
  decision, by `spec.rollout.shadow.onTimeout`; the reason is `ShadowTimeout` with the figures so far.
- Failed (exit 4, infrastructure) -> Building after RETRY_FIRST_SECONDS, doubling, at most RETRY_LIMIT
  times; the count lives in the attempt's record, so a restart or a new leader continues it.

The rollback annotation is honoured in every state after the build (`REJECTABLE`); a promotion
already decided, and the class's first revision (nothing to roll back to), are past it.

Each transition is a function from (attempt, what the cluster shows for the class) to the next
attempt, or the same one when its condition does not hold. `advance` runs them in order, so one
reconcile can take several steps; every step it took is returned as an Event to record once the
new attempt is written. Nothing here reads a clock or the cluster: `now` and the observations are
arguments.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, replace

from edgemodel_operator.analysis import Counters, Evidence, Verdict, analyse, since
from edgemodel_operator.api.fields import parse_duration
from edgemodel_operator.api.spec import Rollout
from edgemodel_operator.buildreport import LOST, chosen_message
from edgemodel_operator.records import Application, Attempt

APPROVE = "edgeml.dev/promote"  # annotation: the candidate revision a person approves for promotion
REJECT = "edgeml.dev/rollback"  # annotation: the candidate revision a person rolls back
APPROVALS = (APPROVE, REJECT)
RETRY = "edgeml.dev/retry-build"  # annotation: a new value builds a Failed attempt again, once per value
RETRY_FIRST_SECONDS = 30.0  # the first automatic retry of an infrastructure failure; each next one doubles
RETRY_LIMIT = 5  # automatic retries of one attempt
INFRASTRUCTURE = 4  # the build's exit code when something around it failed (see runtime build/errors.py)
SHADOW_TIMEOUT_SECONDS = 3600.0  # shadow.timeout when unset, unless twice shadow.duration is longer
WARNINGS = frozenset({"BuildFailed", "RolledBack", "ShadowTimeout"})  # Event reasons posted as type Warning
FALLBACK_REASON = "EngineFallback"  # a candidate whose pods serve the fallback (see `reject_fallback`)
# The situations after the build in which edgeml.dev/rollback takes effect, as the status message says them.
REJECTABLE = (
    "candidate starting",  # Built, no candidate workload yet
    "waiting for candidate pods",  # Built, the workload has no Ready pod
    "waiting for shadow evidence to be readable",  # Built, a pod is Ready
    "shadowing",  # Shadowing, the evidence does not decide yet (or cannot be read)
    "awaiting approval",  # Shadowing, passed, autoPromote false
    "failed, awaiting a person",  # Shadowing, failed, autoRollback false
    "shadow timed out, held",  # Shadowing, onTimeout Hold
)


@dataclass(frozen=True)
class ClassView:
    """What the cluster shows for one class, as far as the attempt's transitions need it.

    `job`: the build Job's state (None: no Job); `outcome`: the finished build's outcome (see
    `buildreport.read_outcome`; None: not finished, or not read because the attempt is past it);
    `has_stable`: some revision serves the class's live traffic; `mine`: the track of this revision's
    workload (None: no workload); `mine_ready`: its ready pods; `samples`: shadow counters per source
    for this candidate (None: they could not be read this time).
    """

    job: str | None  # "Active", "Complete", "Failed", "Replaced"
    outcome: dict[str, object] | None
    has_stable: bool
    mine: str | None  # "stable", "candidate"
    mine_ready: int
    samples: Mapping[str, Counters] | None
    job_uid: str | None = None  # the build Job's UID
    problem: str | None = None  # why this revision's candidate pods are not Ready (see `progress.pod_problem`)
    mine_since: str | None = None  # when this revision's workload was created (RFC 3339)
    fallback: str | None = None  # why this revision's pods of the class serve their fallback (see `fallbacks`)


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
        "artifactParts": outcome.get("artifactParts"),  # see prefetch: pulled one by one before the engine
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
    return attempt.moved("Building", message=None, retry_at=None), None


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


def span(seconds: float) -> str:
    """A duration as people write it: 45s, 30m, 1h5m."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "") + (f"{secs}s" if secs else "")
    return text or "0s"


def _after(moment: str, seconds: float) -> str:
    at = datetime.datetime.fromtimestamp(_epoch(moment) + seconds, datetime.UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def stamp_built(attempt: Attempt, view: ClassView, now: str) -> Attempt:
    """Note when the attempt was first seen Built with its workload there: the progress deadline counts from
    then. A candidate whose workload is not made yet (its engine still being pulled onto the class's nodes,
    see `prefetch`; a GPU class that cannot hold it beside the stable pods, see `handoff`) is not late."""
    if attempt.state != "Built" or attempt.built is not None:
        return attempt
    if view.mine is None and view.has_stable:
        return attempt
    return replace(attempt, built=view.mine_since or now)


def _is_candidate(attempt: Attempt, view: ClassView) -> bool:
    """A built attempt that will run beside the stable revision (not the first one, not the one serving)."""
    return attempt.state == "Built" and view.has_stable and view.mine != "stable"


def reject_candidate(attempt: Attempt, view: ClassView, context: Context) -> tuple[Attempt, Step | None]:
    """Built -> RolledBack on edgeml.dev/rollback before the candidate shadows: starting, waiting for its
    pods, or waiting for its evidence. (While it shadows, `decide` honours the annotation.)"""
    if not _is_candidate(attempt, view):
        return attempt, None
    rejected = approval(context.annotations, REJECT, attempt, context.application)
    if rejected is None:
        return attempt, None
    why = f"rolled back by {rejected} before shadowing"
    moved = attempt.moved("RolledBack", decision="Rollback", reason=why, decided=context.now, approval=rejected)
    return moved, Step("RolledBack", f"{attempt.key}: {attempt.revision} {why}")


def reject_fallback(attempt: Attempt, view: ClassView, context: Context) -> tuple[Attempt, Step | None]:
    """Built or Shadowing -> RolledBack when the candidate's own pods could not load its engine and serve the
    fallback (the original model on ONNX Runtime fp32): what they answer is the fallback's, which agrees with
    the stable revision whatever the engine is worth, so no evidence from them may promote it."""
    if view.fallback is None or not (_is_candidate(attempt, view) or attempt.state == "Shadowing"):
        return attempt, None
    why = (f"{FALLBACK_REASON}: its pods cannot load the engine and serve the fallback ({view.fallback}); "
           "their answers would judge the fallback, not the engine")  # fmt: skip
    moved = attempt.moved("RolledBack", decision="Rollback", reason=why, decided=context.now)
    return moved, Step("RolledBack", f"{attempt.key}: {attempt.revision} rolled back: {why}")


def deadline_seconds(rollout: Rollout) -> float:
    return parse_duration(rollout.progress_deadline)


def progress_deadline(attempt: Attempt, view: ClassView, context: Context) -> tuple[Attempt, Step | None]:
    """Built -> RolledBack when no candidate pod is Ready `progressDeadline` after its workload was there;
    the reason says what the pods show (`view.problem`), else that none became Ready."""
    if not _is_candidate(attempt, view) or view.mine_ready or attempt.built is None:
        return attempt, None
    deadline = context.rollout.progress_deadline
    if seconds_between(attempt.built, context.now) < deadline_seconds(context.rollout):
        return attempt, None
    problem = view.problem or ("no candidate pod is Ready" if view.mine else "the candidate workload was never made")
    why = f"{problem}; not Ready within progressDeadline {deadline}"
    moved = attempt.moved("RolledBack", decision="Rollback", reason=why, decided=context.now)
    return moved, Step("RolledBack", f"{attempt.key}: {attempt.revision} rolled back: {why}")


def timeout_seconds(rollout: Rollout) -> float:
    """shadow.timeout in seconds; unset: SHADOW_TIMEOUT_SECONDS, or twice shadow.duration when longer."""
    shadow = rollout.shadow
    if shadow.timeout is not None:
        return parse_duration(shadow.timeout)
    return max(SHADOW_TIMEOUT_SECONDS, 2 * parse_duration(shadow.duration))


def shadow_timeout(
    attempt: Attempt, view: ClassView, context: Context, verdict: Verdict | None
) -> tuple[Attempt, Step | None]:
    """Shadowing past shadow.timeout without a decision -> what shadow.onTimeout says (once):
    Rollback: RolledBack; Promote: Promoted unless the evidence so far fails the analysis (then
    RolledBack); Hold: still Shadowing, `timed_out` noted, until a person decides."""
    if attempt.state != "Shadowing" or attempt.timed_out is not None:
        return attempt, None
    rollout, now = context.rollout, context.now
    elapsed = seconds_between(attempt.shadow_started or now, now)
    if elapsed < timeout_seconds(rollout):
        return attempt, None
    evidence = evidence_of(attempt, view)
    figures = shadow_figures(evidence or Evidence())
    counted = f"{figures.get('requests', 0)} of {rollout.shadow.min_requests} requests in {span(elapsed)}"
    text = f"ShadowTimeout: {counted}" + ("" if evidence is not None else " (no evidence readable now)")
    policy = rollout.shadow.on_timeout
    if policy == "Hold":
        why = f"{text}; held until a person sets {APPROVE} or {REJECT}"
        return attempt.moved("Shadowing", timed_out=now, reason=why), Step(
            "ShadowTimeout", f"{attempt.key}: {attempt.revision} {why}"
        )
    failing = verdict is not None and verdict.decision == "Rollback"
    if policy == "Promote" and not failing:
        why = f"{text}; onTimeout Promote"
        moved = attempt.moved("Promoted", decision="Promote", reason=why, decided=now, figures=figures, timed_out=now)
        return moved, Step("Promoted", f"{attempt.key}: {attempt.revision} promoted: {why}")
    why = f"{text}; onTimeout {policy}" + ("" if policy == "Rollback" else f", but {verdict.reason if verdict else ''}")
    moved = attempt.moved("RolledBack", decision="Rollback", reason=why, decided=now, figures=figures, timed_out=now)
    return moved, Step("RolledBack", f"{attempt.key}: {attempt.revision} rolled back: {why}")


def schedule_retry(attempt: Attempt, view: ClassView, now: str) -> tuple[Attempt, Step | None]:
    """A build that just failed with exit 4 (infrastructure) gets a retry time: RETRY_FIRST_SECONDS after
    the failure, doubling with each retry taken, while fewer than RETRY_LIMIT were. Bad input (2) and a
    failed validation (3) would fail again: they wait for a person."""
    outcome = view.outcome or {}
    if attempt.state != "Failed" or attempt.retry_at is not None or outcome.get("exitCode") != INFRASTRUCTURE:
        return attempt, None
    taken = attempt.retries or 0
    if taken >= RETRY_LIMIT:
        why = f"{attempt.message}; {RETRY_LIMIT} automatic retries spent: set {RETRY} to build again"
        return attempt.moved("Failed", message=why), None
    at = _after(now, RETRY_FIRST_SECONDS * 2**taken)
    return attempt.moved(
        "Failed", retry_at=at, message=f"{attempt.message}; retry {taken + 1} of {RETRY_LIMIT} at {at}"
    ), None


def retry_build(attempt: Attempt, view: ClassView, context: Context) -> tuple[Attempt, Step | None]:
    """Failed -> Building again: on a new value of edgeml.dev/retry-build (one retry per value), or once
    the automatic retry's time has come. The failed Job is noted as replaced (the planner deletes it
    and builds anew once it is gone)."""
    if attempt.state != "Failed":
        return attempt, None
    requested = context.annotations.get(RETRY)
    replaced = view.job_uid if view.job is not None else None
    if requested and requested != attempt.retry_request:
        moved = attempt.moved("Building", message=None, retry_at=None, retry_request=requested, replaced_job=replaced)
        return moved, Step(
            "BuildRetried", f"{attempt.key}: building {attempt.revision} again, as {RETRY}={requested} asks"
        )
    if attempt.retry_at is None or _epoch(context.now) < _epoch(attempt.retry_at):
        return attempt, None
    taken = (attempt.retries or 0) + 1
    moved = attempt.moved("Building", message=None, retry_at=None, retries=taken, replaced_job=replaced)
    return moved, Step("BuildRetried", f"{attempt.key}: building {attempt.revision} again after an "
                                       f"infrastructure failure (retry {taken} of {RETRY_LIMIT})")  # fmt: skip


def due_in(attempt: Attempt, view: ClassView, context: Context) -> float | None:
    """Seconds until a deadline of this attempt passes with nothing else happening (a progress deadline
    or an automatic retry), so the planner looks again then; None when no such deadline waits."""
    if attempt.state == "Failed" and attempt.retry_at is not None:
        return max(0.0, _epoch(attempt.retry_at) - _epoch(context.now))
    if _is_candidate(attempt, view) and not view.mine_ready and attempt.built is not None:
        passed = seconds_between(attempt.built, context.now)
        return max(0.0, deadline_seconds(context.rollout) - passed)
    return None


def advance(attempt: Attempt, view: ClassView, context: Context) -> tuple[Attempt, list[Step], Verdict | None]:
    """Every transition whose condition holds, in order; the steps taken and the latest verdict."""
    steps: list[Step] = []

    def took(pair: tuple[Attempt, Step | None]) -> Attempt:
        steps.extend([pair[1]] if pair[1] else [])
        return pair[0]

    attempt = took(retry_build(attempt, view, context))
    for transition in (build_again, build_finished):
        attempt = took(transition(attempt, view))
    attempt = took(schedule_retry(attempt, view, context.now))
    attempt = stamp_built(attempt, view, context.now)
    attempt = took(serve_unshadowed(attempt, view, context.now))
    attempt = took(reject_candidate(attempt, view, context))
    attempt = took(progress_deadline(attempt, view, context))
    attempt = took(start_shadow(attempt, view, context.now, context.rollout))
    attempt = took(reject_fallback(attempt, view, context))
    attempt, step, verdict = decide(attempt, view, context)
    steps += [step] if step else []
    attempt = took(shadow_timeout(attempt, view, context, verdict))
    return attempt, steps, verdict
