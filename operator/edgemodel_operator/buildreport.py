"""A build's outcome: read once from the right pod, validated, then kept on its Job. Pure.

A build Job may leave several pods: retries after a failure (a registry outage, exit 4), and
pods that are later garbage-collected or lost with their node. The outcome comes from the pod
that decided the Job: the succeeded pod, else the newest failed one; never merely the first pod
that has a termination message. Its termination message (the compact report `edgemodel build`
writes, at most 4 KiB) is validated by `BuildReport`; anything else becomes an outcome with
reason `UnreadableReport`, so one bad message fails one class and never the whole EdgeModel.

Once read, the outcome is kept on the Job as the annotation `OUTCOME` (the operator owns the
Job): losing the pod afterwards changes nothing, and the annotation is what later reconciles read.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

Obj = dict[str, Any]
OUTCOME = "edgeml.dev/build-outcome"  # annotation on a finished build Job: its outcome, as read once
CACHE_KEY = "edgeml.dev/cache-key"  # annotation on a build Job (see builders.build_job_for_class)
UNREADABLE = "UnreadableReport"
LOST = "ReportLost"
MESSAGE_LIMIT = 1024  # characters of a report's message kept in the outcome


def _finite_or_none(value: Any) -> Any:
    """A figure that is not a finite number is no figure (JSON has no NaN; the status could not hold it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


Figure = Annotated[float | None, BeforeValidator(_finite_or_none)]


def _strings(value: Any) -> list[str]:
    """A list's strings (at most 64), else none: part images only make pulls cheaper, so a malformed list
    costs them, not the whole report."""
    return [item for item in value if isinstance(item, str)][:64] if isinstance(value, list) else []


class _Report(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=False)


class Artifact(_Report):
    """Where the engine was pushed, by digest."""

    reference: str | None = Field(default=None, max_length=2048)  # none when the build pushed nothing
    # The engine image's part images (manifest digests in its repository, in pull order), when it has slices:
    # the pull DaemonSet pulls them one after the other, so that a pull cut short costs one part (`prefetch`).
    parts: Annotated[list[str], BeforeValidator(_strings)] = Field(default_factory=list)  # checked in `prefetch`


class Comparison(_Report):
    """Validation figures against the fp32 reference (the runtime's `Comparison`)."""

    max_abs_error: Figure = None
    max_relative_error: Figure = None
    cosine: Figure = None
    top1_agreement: Figure = None
    worst_sample: int | None = Field(default=None, ge=0)


class Validation(_Report):
    """Validation's verdict and the outputs whose reference could not discriminate (names only)."""

    verdict: Literal["passed", "uninformative", "failed"] | None = None
    uninformative: list[str] = Field(default_factory=list, max_length=64)


class Latency(_Report):
    """Measured latency of one inference, in milliseconds."""

    p50_ms: Figure = None
    p99_ms: Figure = None


class Candidate(_Report):
    """One row of the table `precision: auto` writes: a candidate engine, its speedup, cosine and verdict."""

    engine: str | None = Field(default=None, max_length=32)
    precision: str | None = Field(default=None, max_length=16)
    speedup: Figure = None
    cosine: Figure = None
    passed: bool = False


class BuildReport(_Report):
    """The compact build report (version 1) a build pod writes to its termination message.

    Unknown fields are ignored (a newer builder may add some); the fields the operator reads must
    have their types: a wrong type makes the whole report unreadable.
    """

    v: Literal[1]
    status: Literal["built", "cached", "failed"]
    exit_code: int = Field(alias="exitCode")
    reason: str | None = None
    message: str | None = None
    cache_key: str | None = Field(default=None, alias="cacheKey")
    engine: str | None = None
    precision: str | None = None
    artifact: Artifact | None = None
    build_seconds: Figure = Field(default=None, alias="buildSeconds")
    metrics: Comparison | None = None
    validation: Validation | None = None
    latency: Latency | None = None
    chosen: str | None = Field(default=None, max_length=64)  # precision/engine auto: the candidate kept
    candidates: list[Candidate] = Field(default_factory=list, max_length=16)


def parse_report(text: str) -> BuildReport | str:
    """The report in a termination message, or why it cannot be read (one line, for a status message)."""
    try:
        data = json.loads(text)
    except ValueError as error:
        return f"the build report is not JSON ({error.__class__.__name__}: {error})"
    if not isinstance(data, dict):
        return f"the build report is JSON but not an object (a {type(data).__name__})"
    try:
        return BuildReport.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc']) or 'report'}: {item['msg']}" for item in error.errors()[:5]
        )
        return f"the build report does not match its schema: {problems}"


def _clip(text: str, limit: int = MESSAGE_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def outcome_of(report: BuildReport | str, *, job_succeeded: bool) -> Obj:
    """The outcome kept on the Job: `status` built/cached/failed, plus what the status shows.

    A Job that failed is a failed build whatever its report says; a report that cannot be read is a
    failed build with reason `UnreadableReport`, its problem as the message.
    """
    if isinstance(report, str):
        return {"status": "failed", "reason": UNREADABLE, "message": _clip(report)}
    if report.status == "failed":
        message = _clip(report.message or "the build failed without a message")
        return {"status": "failed", "reason": report.reason or "BuildFailed", "message": message,
                "exitCode": report.exit_code}  # fmt: skip
    if not job_succeeded:
        return {"status": "failed", "reason": "BuildFailed", "exitCode": report.exit_code,
                "message": f"the build Job failed although its report says {report.status}"}  # fmt: skip
    outcome: Obj = {"status": report.status}
    figures = {
        "cacheKey": report.cache_key,
        "precision": report.precision,
        "artifact": (report.artifact.reference or None) if report.artifact else None,
        "artifactParts": (report.artifact.parts or None) if report.artifact and report.artifact.reference else None,
        "buildSeconds": report.build_seconds,
        "metrics": _metrics(report),
        **_auto(report),
    }
    return outcome | {k: v for k, v in figures.items() if v not in (None, {})}


def _auto(report: BuildReport) -> Obj:
    """Under precision/engine auto: the engine chosen, its name, and the compact table of candidates."""
    if not report.chosen:
        return {}
    return {
        "engine": report.engine,
        "chosen": report.chosen,
        "candidates": [c.model_dump(exclude_none=True) for c in report.candidates],
    }


def chosen_message(outcome: Obj) -> str | None:
    """One line for the EngineChosen Event: what auto kept and how each candidate did; None without a choice."""
    if not outcome.get("chosen"):
        return None
    rows = []
    for row in outcome.get("candidates") or []:
        speed = f" {row['speedup']:.2f}x" if isinstance(row.get("speedup"), float) else ""
        cosine = f" cosine {row['cosine']:.6f}" if isinstance(row.get("cosine"), float) else ""
        verdict = "passed" if row.get("passed") else "failed"
        rows.append(f"{row.get('engine')} {row.get('precision')}{speed}{cosine} {verdict}")
    return f"chose {outcome['chosen']} of {len(rows)} candidates: " + "; ".join(rows)


def _metrics(report: BuildReport) -> Obj:
    comparison = report.metrics or Comparison()
    latency = report.latency or Latency()
    validation = report.validation or Validation()
    figures = {
        "maxAbsError": comparison.max_abs_error,
        "maxRelativeError": comparison.max_relative_error,
        "cosine": comparison.cosine,
        "top1Agreement": comparison.top1_agreement,
        "worstSample": comparison.worst_sample,
        "validation": validation.verdict if validation.verdict != "failed" else None,
        "uninformativeOutputs": validation.uninformative[:8] or None,
        "latencyP50Ms": latency.p50_ms,
        "latencyP99Ms": latency.p99_ms,
    }
    return {k: v for k, v in figures.items() if v is not None}


def _terminated(pod: Obj) -> Obj:
    """The build container's terminated state (the first container that has one)."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if terminated:
            return dict(terminated)
    return {}


def _succeeded(pod: Obj) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    return phase == "Succeeded" or (phase is None and _terminated(pod).get("exitCode") == 0)


def _failed(pod: Obj) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    return phase == "Failed" or (phase is None and _terminated(pod).get("exitCode") not in (None, 0))


def _recency(pod: Obj) -> tuple[str, ...]:
    """Sort key: when the pod finished (then started, then was created); RFC 3339 UTC strings order as times."""
    terminated = _terminated(pod)
    status = pod.get("status") or {}
    meta = pod.get("metadata") or {}
    return (
        str(terminated.get("finishedAt") or ""),
        str(terminated.get("startedAt") or ""),
        str(status.get("startTime") or ""),
        str(meta.get("creationTimestamp") or ""),
        str(meta.get("name") or ""),
    )


def deciding_pod(job: Obj, pods: list[Obj]) -> Obj | None:
    """The pod whose report is the Job's outcome: the succeeded one, else the newest failed one."""
    name = job["metadata"]["name"]
    mine = [p for p in pods if ((p.get("metadata") or {}).get("labels") or {}).get("job-name") == name]
    succeeded = sorted((p for p in mine if _succeeded(p)), key=_recency)
    if succeeded:
        return succeeded[-1]
    failed = sorted((p for p in mine if _failed(p)), key=_recency)
    return failed[-1] if failed else None


def kept_outcome(job: Obj) -> Obj | None:
    """The outcome kept on the Job's annotation; None if there is none (or it was tampered into nonsense)."""
    text = ((job.get("metadata") or {}).get("annotations") or {}).get(OUTCOME)
    if not text:
        return None
    try:
        kept = json.loads(text)
    except ValueError:
        return None
    if not isinstance(kept, dict) or kept.get("status") not in {"built", "cached", "failed"}:
        return None
    return kept


def read_outcome(job: Obj, pods: list[Obj], *, job_succeeded: bool) -> tuple[Obj, bool]:
    """The outcome of a finished build Job, and whether it is newly read (so: to be kept on the Job).

    The kept annotation wins; else the deciding pod's report; a finished Job with no such pod left
    (garbage-collected, or lost with its node, before its outcome was read) is a failed build with
    reason `ReportLost`, not kept (a pod may still appear in a late watch event). A deciding pod
    without a message is a failed build: `UnreadableReport` if the Job succeeded, else the
    container's termination reason (e.g. OOMKilled).
    """
    kept = kept_outcome(job)
    if kept is not None:
        return kept, False
    pod = deciding_pod(job, pods)
    if pod is None:
        return {"status": "failed", "reason": LOST, "message": "the build report was lost with its pod"}, False
    terminated = _terminated(pod)
    message = terminated.get("message")
    if not message:
        code = terminated.get("exitCode")
        if job_succeeded:
            return {
                "status": "failed",
                "reason": UNREADABLE,
                "message": "the build pod succeeded without a report",
            }, True
        why = str(terminated.get("reason") or "BuildFailed")
        return {"status": "failed", "reason": why, "message": f"the build pod exited with code {code} without a report",
                "exitCode": code}, True  # fmt: skip
    return outcome_of(parse_report(str(message)), job_succeeded=job_succeeded), True


def serving_artifact(workload: Obj) -> str | None:
    """The engine artifact a serving workload runs (`edgemodel serve ARTIFACT ...`), if it names one."""
    containers = ((((workload.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers")) or []
    args = list((containers[0] if containers else {}).get("args") or [])
    return str(args[1]) if len(args) > 1 and args[0] == "serve" else None


def recovered(job: Obj, workloads: list[Obj]) -> Obj | None:
    """The outcome of a Complete Job whose report was lost before it was read, from a workload that
    already serves its build (same revision and class: the Job's name); None if none does."""
    name = job["metadata"]["name"]
    artifacts = [serving_artifact(w) for w in workloads if w["metadata"]["name"] == name]
    artifact = next((a for a in artifacts if a), None)
    if artifact is None:
        return None
    outcome: Obj = {"status": "built", "artifact": artifact}
    key = ((job.get("metadata") or {}).get("annotations") or {}).get(CACHE_KEY)
    return outcome | ({"cacheKey": key} if key else {})


def keep_patch(outcome: Obj) -> Obj:
    """The merge patch that keeps `outcome` on its Job."""
    return {"metadata": {"annotations": {OUTCOME: json.dumps(outcome, sort_keys=True, separators=(",", ":"))}}}
