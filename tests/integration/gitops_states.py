"""EdgeModels as the operator's pure plan leaves them at each step of a rollout, and how GitOps tools read them.

Shared by the GitOps health tests (status fixtures), the chart tests (the objects a restricted namespace
must admit, live health). `evaluate` runs the test bed's gitops-health helper: kstatus from
sigs.k8s.io/cli-utils, or the Argo CD health script under gopher-lua as Argo CD runs it.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgemodel_operator.builders import Images
from edgemodel_operator.reconcile import Observed, plan
from tests.testbed import binaries

HEALTH_LUA = Path(__file__).resolve().parents[2] / "examples" / "gitops" / "argocd" / "edgemodel-health.lua"

NOW = "2026-01-01T00:00:00Z"
Obj = dict[str, Any]


@dataclass
class Step:
    """The EdgeModel with the status the operator wrote, and every object it created so far."""

    body: Obj
    created: list[Obj] = field(default_factory=list)


def _reconcile(step: Step, nodes: list[Obj], jobs: list[Obj], pods: list[Obj], deployments: list[Obj]) -> Step:
    service = [{"metadata": {"name": step.body["metadata"]["name"]}}] if step.created else []
    result = plan(Observed(step.body, nodes, jobs, pods, deployments, service), Images(), NOW)
    return Step({**step.body, "status": result.status}, step.created + result.create)


def finished(job: Obj, ok: bool) -> tuple[Obj, Obj]:
    """The Job finished, and its pod with the build report in its termination message."""
    name = job["metadata"]["name"]
    report = (
        {"v": 1, "status": "built", "exitCode": 0, "cacheKey": name,
         "artifact": {"reference": f"oci://r/e@sha256:{'ab' * 32}"}}
        if ok
        else {"v": 1, "status": "failed", "exitCode": 3, "reason": "ToleranceMissed",
              "message": "cosine 0.91 < minCosine 0.99"}
    )  # fmt: skip
    terminated = {"exitCode": report["exitCode"], "message": json.dumps(report)}
    pod = {
        "metadata": {"name": f"{name}-x", "labels": {"job-name": name}},
        "status": {
            "phase": "Succeeded" if ok else "Failed",
            "containerStatuses": [{"state": {"terminated": terminated}}],
        },
    }
    return {**job, "status": {"conditions": [{"type": "Complete" if ok else "Failed", "status": "True"}]}}, pod


def building(body: Obj, nodes: list[Obj]) -> Step:
    """Build Jobs created and running."""
    step = _reconcile(Step(body), nodes, [], [], [])
    jobs = [o for o in step.created if o["kind"] == "Job"]
    return _reconcile(step, nodes, jobs, [], [])


def after_builds(body: Obj, nodes: list[Obj], failing: int = 0) -> Step:
    """Every build finished (the first `failing` of them failed) and the serving pods are ready."""
    step = _reconcile(Step(body), nodes, [], [], [])
    jobs, pods = [], []
    for index, job in enumerate(o for o in step.created if o["kind"] == "Job"):
        done, pod = finished(job, ok=index >= failing)
        jobs.append(done)
        pods.append(pod)
    step = _reconcile(step, nodes, jobs, pods, [])
    deployments = [{**d, "status": {"readyReplicas": 1}} for d in step.created if d["kind"] == "Deployment"]
    return _reconcile(step, nodes, jobs, pods, deployments)


def gitops_health() -> Path:
    """The gitops-health helper, built from its pinned Go module on first use."""
    component = next(c for c in binaries.COMPONENTS if "gitops-health" in c.commands)
    return binaries.ensure(component) / "gitops-health"


def evaluate(how: str, obj: Obj) -> dict[str, str]:
    """{"status", "message"} from `gitops-health kstatus` or `gitops-health argocd-lua`."""
    args = ["kstatus"] if how == "kstatus" else ["argocd-lua", str(HEALTH_LUA)]
    done = subprocess.run(
        [str(gitops_health()), *args], input=json.dumps(obj), capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, str] = json.loads(done.stdout)
    return result
