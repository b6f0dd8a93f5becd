"""The reconcile decision for one EdgeModel: observed objects in, a plan of writes out.

Pure: the handler gathers (nodes, owned Jobs, their pods, owned Deployments), calls `plan`, and
applies the result. The same observations always give the same plan, whatever order the events
that led to them arrived in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from edgemodel_operator import conditions as cond
from edgemodel_operator.api.spec import EdgeModelSpec, EngineTarget
from edgemodel_operator.builders import (
    LABEL_CLASS,
    LABEL_REVISION,
    Images,
    build_deployment_for_class,
    build_job_for_class,
    build_service,
    child_name,
    revision_of,
)
from edgemodel_operator.classes import HardwareClass, discover, engine_for

Obj = dict[str, Any]


@dataclass(frozen=True)
class Observed:
    body: Obj
    nodes: list[Obj]
    jobs: list[Obj]
    pods: list[Obj]
    deployments: list[Obj]
    services: list[Obj]


@dataclass(frozen=True)
class Event:
    """A step worth an Event on the EdgeModel; `subject` ("Kind/name") ties it to one create or delete."""

    reason: str
    message: str
    subject: str | None = None


@dataclass
class Plan:
    create: list[Obj] = field(default_factory=list)
    delete: list[Obj] = field(default_factory=list)  # objects to delete (kind, name, namespace)
    status: Obj = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)


def subject(obj: Obj) -> str:
    """How an Event names the object a create or delete is about."""
    return f"{obj['kind']}/{obj['metadata']['name'] if 'metadata' in obj else obj['name']}"


def build_report(job: Obj, pods: list[Obj]) -> Obj | None:
    """The compact build report a finished build pod left in its termination message."""
    name = job["metadata"]["name"]
    for pod in pods:
        if pod["metadata"].get("labels", {}).get("job-name") != name:
            continue
        for status in pod.get("status", {}).get("containerStatuses", []) or []:
            message = (status.get("state", {}).get("terminated") or {}).get("message")
            if message:
                try:
                    report: Obj = json.loads(message)
                except ValueError:
                    return {"status": "failed", "reason": "UnreadableReport", "message": message[:200]}
                return report
    return None


def _unschedulable(job: Obj, pods: list[Obj]) -> str | None:
    """The scheduler's reason when the build pod of `job` waits for a node it cannot get (e.g. no free GPU)."""
    name = job["metadata"]["name"]
    for pod in pods:
        if pod["metadata"].get("labels", {}).get("job-name") != name or pod.get("status", {}).get("phase") != "Pending":
            continue
        for item in pod["status"].get("conditions", []) or []:
            if item.get("type") == "PodScheduled" and item.get("status") == "False":
                return str(item.get("message") or item.get("reason") or "unschedulable")
    return None


def _job_state(job: Obj) -> str:
    for item in job.get("status", {}).get("conditions", []) or []:
        if item.get("status") == "True" and item.get("type") in {"Complete", "Failed"}:
            return str(item["type"])
    return "Active"


def _class_status(
    hardware: HardwareClass, engine: str | None, precision: str | None, state: str, message: str | None
) -> Obj:
    entry: Obj = {"key": hardware.key, "nodes": list(hardware.nodes), "state": state}
    if engine:
        entry |= {"engine": engine, "precision": precision}
    if message:
        entry["message"] = message
    return entry


class _Planner:
    def __init__(self, observed: Observed, images: Images, now: str) -> None:
        self.observed, self.images, self.now = observed, images, now
        self.body = observed.body
        self.spec = EdgeModelSpec.model_validate(self.body["spec"])
        self.revision = revision_of(self.spec)
        self.plan = Plan()
        self.jobs = {j["metadata"]["name"]: j for j in observed.jobs}
        self.deployments = {d["metadata"]["name"]: d for d in observed.deployments}

    def run(self) -> Plan:
        targets = self.spec.targets
        selector = targets.node_selector if targets else None
        tolerations = [t.model_dump(exclude_none=True) for t in (targets.tolerations or [])] if targets else []
        classes = discover(self.observed.nodes, selector, tolerations)
        entries = [self._class(hardware) for hardware in classes]
        self._retire_old(classes, entries)
        if not self.observed.services:
            self.plan.create.append(build_service(self.body))
        self.plan.status = self._status(classes, entries)
        return self.plan

    def _class(self, hardware: HardwareClass) -> Obj:
        target = engine_for(self.spec, hardware)
        if target is None:
            return _class_status(hardware, None, None, "Failed", "no entry of spec.targets.engines matches this class")
        name = child_name(self.body["metadata"]["name"], self.revision, hardware)
        job = self.jobs.get(name)
        if job is None:
            job = build_job_for_class(self.body, hardware, target, self.revision, self.images)
            self.plan.create.append(job)
            self._event("BuildStarted", f"building {target.engine} {target.precision} for {hardware.key}", job)
            return _class_status(hardware, target.engine, target.precision, "Building", None)
        state = _job_state(job)
        if state == "Active":
            waiting = _unschedulable(job, self.observed.pods)
            if waiting:
                return _class_status(
                    hardware, target.engine, target.precision, "Pending", f"no node can take the build yet: {waiting}"
                )
            return _class_status(hardware, target.engine, target.precision, "Building", None)
        report = build_report(job, self.observed.pods) or {}
        if state == "Failed" or report.get("status") not in {"built", "cached"}:
            reason = report.get("reason") or "BuildFailed"
            message = f"{reason}: {report.get('message') or 'the build Job failed without a report'}"
            return _class_status(hardware, target.engine, target.precision, "Failed", message)
        return self._built(hardware, target, name, report)

    def _built(self, hardware: HardwareClass, target: EngineTarget, name: str, report: Obj) -> Obj:
        entry = _class_status(hardware, target.engine, report.get("precision", target.precision), "Built", None)
        artifact = (report.get("artifact") or {}).get("reference")
        entry |= {
            "cacheKey": report.get("cacheKey"),
            "artifactDigest": artifact,
            "buildSeconds": report.get("buildSeconds"),
        }
        if report.get("metrics") or report.get("latency"):
            entry["metrics"] = _metrics(report)
        if not artifact:
            return entry | {"state": "Failed", "message": "the build report names no artifact"}
        deployment = self.deployments.get(name)
        if deployment is None:
            deployment = build_deployment_for_class(
                self.body, hardware, target, revision=self.revision, artifact=artifact, images=self.images
            )
            self.plan.create.append(deployment)
            self._event("ServingStarted", f"serving {hardware.key} from {artifact}", deployment)
            return entry
        ready = int(deployment.get("status", {}).get("readyReplicas") or 0)
        return entry | {"readyReplicas": ready, "state": "Serving" if ready > 0 else "Built"}

    def _retire_old(self, classes: list[HardwareClass], entries: list[Obj]) -> None:
        """Remove workloads of classes that left, and old revisions once the new one serves that class."""
        current = {c.key for c in classes}
        serving = {e["key"] for e in entries if e["state"] == "Serving"}
        for kind, objects in (("Deployment", self.observed.deployments), ("Job", self.observed.jobs)):
            for obj in objects:
                labels = obj["metadata"].get("labels", {})
                key, revision = labels.get(LABEL_CLASS), labels.get(LABEL_REVISION)
                gone = key not in current
                superseded = revision != self.revision and key in serving
                if gone or superseded:
                    ref = {"kind": kind, **{k: obj["metadata"][k] for k in ("name", "namespace")}}
                    self.plan.delete.append(ref)
                    why = "its hardware class left" if gone else f"revision {self.revision} serves it now"
                    self._event("Removed", f"{kind} {obj['metadata']['name']}: {why}", ref)

    def _event(self, reason: str, message: str, obj: Obj) -> None:
        self.plan.events.append(Event(reason, message, subject(obj)))

    def _status(self, classes: list[HardwareClass], entries: list[Obj]) -> Obj:
        generation = int(self.body["metadata"].get("generation", 1))
        old: Obj = self.body.get("status") or {}
        states = [e["state"] for e in entries]
        total = len(entries)
        built = sum(s in {"Built", "Serving"} for s in states)
        failed = [e for e in entries if e["state"] == "Failed"]
        serving = states.count("Serving")
        building = states.count("Building") + states.count("Pending")
        pending = [e for e in entries if e["state"] == "Pending"]
        conditions: list[Obj] = list(old.get("conditions", []))

        def put(kind: str, status: bool, reason: str, message: str) -> None:
            nonlocal conditions
            conditions = cond.set_condition(
                conditions, kind, status, reason, message, generation=generation, now=self.now
            )

        if total == 0:
            put(cond.ENGINES_BUILT, False, "NoNodes", "no Ready node matches spec.targets")
        elif failed:
            put(cond.ENGINES_BUILT, False, "BuildFailed", "; ".join(f"{e['key']}: {e.get('message')}" for e in failed))
        elif pending:
            put(cond.ENGINES_BUILT, False, "Unschedulable", "; ".join(f"{e['key']}: {e['message']}" for e in pending))
        else:
            put(cond.ENGINES_BUILT, built == total, "Built" if built == total else "Building", f"{built}/{total} built")
        put(cond.VALIDATED, built > 0 and not failed, "Validated" if built and not failed else "NotValidated",
            f"{built}/{total} engines passed validation")  # fmt: skip
        ready = total > 0 and serving == total
        put(cond.READY, ready, "Serving" if ready else "NotReady", f"{serving}/{total} classes serving")
        progressing = building > 0 or (built > serving)
        put(cond.PROGRESSING, progressing, "Reconciling" if progressing else "Stable", f"{building} building")
        put(cond.DEGRADED, bool(failed), "ClassFailed" if failed else "AsExpected", f"{len(failed)} classes failed")
        stalled = bool(failed) and not progressing
        put(cond.STALLED, stalled, "ClassFailed" if stalled else "AsExpected",
            f"{len(failed)} classes failed; a spec change is needed" if stalled else "nothing is stuck")  # fmt: skip
        return {
            "observedGeneration": generation,
            "phase": cond.phase(conditions),
            "conditions": conditions,
            "revisions": self._revisions(old, ready),
            "classesReady": f"{serving}/{total}",
            "classes": entries,
        }

    def _revisions(self, old: Obj, ready: bool) -> Obj:
        """The revision serving now (stable) and the one on its way (candidate)."""
        if ready:
            return {"stable": self.revision}
        stable = (old.get("revisions") or {}).get("stable")
        serving = {d["metadata"].get("labels", {}).get(LABEL_REVISION) for d in self.observed.deployments}
        if stable and stable != self.revision and stable in serving:
            return {"stable": stable, "candidate": self.revision}
        return {"candidate": self.revision}


def _metrics(report: Obj) -> Obj:
    metrics = report.get("metrics") or {}
    latency = report.get("latency") or {}
    figures = {
        "maxAbsError": metrics.get("max_abs_error"),
        "maxRelativeError": metrics.get("max_relative_error"),
        "cosine": metrics.get("cosine"),
        "top1Agreement": metrics.get("top1_agreement"),
        "latencyP50Ms": latency.get("p50_ms"),
        "latencyP99Ms": latency.get("p99_ms"),
    }
    return {k: v for k, v in figures.items() if v is not None}


def plan(observed: Observed, images: Images, now: str) -> Plan:
    """What to create, delete and report for one EdgeModel."""
    return _Planner(observed, images, now).run()
