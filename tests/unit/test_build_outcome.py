"""A build's outcome: from the pod that decided the Job, validated, kept once read. Pure, no cluster."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemodel_operator.builders import Images
from edgemodel_operator.buildreport import OUTCOME, keep_patch, parse_report, read_outcome
from edgemodel_operator.reconcile import plan
from tests.unit.test_operator_pure import LATER, NODES, NOW, _observed, edgemodel

Obj = dict[str, Any]
ARTIFACT = "oci://r/e@sha256:" + "a" * 64
BUILT = {"v": 1, "status": "built", "exitCode": 0, "cacheKey": "k1", "precision": "fp32",
         "artifact": {"reference": ARTIFACT}, "buildSeconds": 3.5, "latency": {"p50_ms": 4.0, "p99_ms": 6.0},
         "metrics": {"max_abs_error": 1e-6, "cosine": 1.0, "samples": 8}}  # fmt: skip
REGISTRY_DOWN = {"v": 1, "status": "failed", "exitCode": 4, "reason": "PushFailed", "message": "registry: 503"}
TOLERANCE = {"v": 1, "status": "failed", "exitCode": 3, "reason": "ToleranceMissed", "message": "cosine 0.91 < 0.99"}
CPU_ONLY = [n for n in NODES if n["metadata"]["name"].startswith("edge-x86")]


def _job(name: str = "ocr-r1-x", state: str | None = "Complete", annotations: Obj | None = None) -> Obj:
    job: Obj = {"kind": "Job", "metadata": {"name": name, "namespace": "apps", "annotations": annotations or {}}}
    job["status"] = {"conditions": [{"type": state, "status": "True"}] if state else []}
    return job


def _pod(job: str, n: int, report: Obj | str | None, *, exit_code: int, finished: str) -> Obj:
    message = report if isinstance(report, str) or report is None else json.dumps(report)
    terminated = {"exitCode": exit_code, "finishedAt": finished, "startedAt": finished}
    if message is not None:
        terminated["message"] = message
    return {
        "kind": "Pod",
        "metadata": {"name": f"{job}-{n}", "labels": {"job-name": job}, "creationTimestamp": finished},
        "status": {"phase": "Succeeded" if exit_code == 0 else "Failed",
                   "containerStatuses": [{"state": {"terminated": terminated}}]},
    }  # fmt: skip


def test_a_retry_that_succeeded_after_a_registry_failure_is_built() -> None:
    job = _job()
    pods = [_pod("ocr-r1-x", 1, REGISTRY_DOWN, exit_code=4, finished="2026-11-26T12:00:00Z"),
            _pod("ocr-r1-x", 2, BUILT, exit_code=0, finished="2026-11-26T12:01:00Z")]  # fmt: skip
    for order in (pods, list(reversed(pods))):
        outcome, new = read_outcome(job, order, job_succeeded=True)
        assert (outcome["status"], outcome["artifact"], new) == ("built", ARTIFACT, True)


def test_a_failed_job_reports_its_newest_failed_pod() -> None:
    pods = [_pod("ocr-r1-x", 1, REGISTRY_DOWN, exit_code=4, finished="2026-11-26T12:00:00Z"),
            _pod("ocr-r1-x", 2, TOLERANCE, exit_code=3, finished="2026-11-26T12:02:00Z"),
            _pod("ocr-r1-x", 3, REGISTRY_DOWN, exit_code=4, finished="2026-11-26T12:01:00Z")]  # fmt: skip
    outcome, _ = read_outcome(_job(state="Failed"), pods, job_succeeded=False)
    assert (outcome["reason"], outcome["exitCode"]) == ("ToleranceMissed", 3)


def test_pods_of_other_jobs_are_never_read() -> None:
    other = _pod("ocr-r2-x", 1, TOLERANCE, exit_code=3, finished="2026-11-26T12:09:00Z")
    mine = _pod("ocr-r1-x", 1, BUILT, exit_code=0, finished="2026-11-26T12:00:00Z")
    assert read_outcome(_job(), [other, mine], job_succeeded=True)[0]["status"] == "built"


@pytest.mark.parametrize(
    ("message", "says"),
    [
        ("not json at all", "not JSON"),
        ("", "succeeded without a report"),
        ("[1, 2, 3]", "not an object (a list)"),
        ('"built"', "not an object (a str)"),
        ("null", "not an object (a NoneType)"),
        ("42", "not an object (a int)"),
        ("{}", "v: Field required"),
        ('{"v": 1, "exitCode": 0}', "status: Field required"),
        ('{"v": 1, "status": "done", "exitCode": 0}', "status: Input should be"),
        ('{"v": 2, "status": "built", "exitCode": 0}', "v: Input should be 1"),
        ('{"v": 1, "status": "built", "exitCode": "zero"}', "exitCode"),
        ('{"v": 1, "status": "built", "exitCode": 0, "artifact": "oci://x"}', "artifact"),
        ('{"v": 1, "status": "built", "exitCode": 0, "artifact": {"reference": [7]}}', "artifact.reference"),
        ('{"v": 1, "status": "built", "exitCode": 0, "metrics": [1]}', "metrics"),
        ('{"v": 1, "status": "built", "exitCode": 0, "buildSeconds": "slow"}', "buildSeconds"),
    ],
    ids=["text", "empty", "list", "string", "null", "number", "empty object", "no status", "unknown status",
         "other version", "exit code text", "artifact text", "reference number", "metrics list", "seconds text"],
)  # fmt: skip
def test_an_unreadable_report_fails_its_class_with_a_clear_reason(message: str, says: str) -> None:
    outcome, new = read_outcome(_job(), [_pod("ocr-r1-x", 1, message, exit_code=0, finished=NOW)], job_succeeded=True)
    assert (outcome["status"], outcome["reason"], new) == ("failed", "UnreadableReport", True)
    assert says in outcome["message"]


def test_non_finite_figures_are_dropped_not_written() -> None:
    text = json.dumps(BUILT | {"buildSeconds": float("nan"), "metrics": {"cosine": float("inf")}})
    report = parse_report(text)
    assert not isinstance(report, str)
    assert (report.build_seconds, report.metrics and report.metrics.cosine) == (None, None)


def test_a_kept_outcome_wins_and_survives_the_pod() -> None:
    kept = read_outcome(_job(), [_pod("ocr-r1-x", 1, BUILT, exit_code=0, finished=NOW)], job_succeeded=True)[0]
    annotated = _job(annotations=keep_patch(kept)["metadata"]["annotations"])
    assert read_outcome(annotated, [], job_succeeded=True) == (kept, False)
    lost, new = read_outcome(_job(), [], job_succeeded=True)
    assert (lost["status"], lost["reason"], new) == ("failed", "ReportLost", False)  # not kept: a pod may still come


def _serving_cluster() -> tuple[Obj, Obj, Obj, Obj]:
    """One CPU class, built and serving: the EdgeModel, its Job, its build pod and its Deployment."""
    body = edgemodel()
    job = next(o for o in plan(_observed(body, nodes=CPU_ONLY), Images(), NOW).create if o["kind"] == "Job")
    job["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    pod = _pod(job["metadata"]["name"], 1, BUILT, exit_code=0, finished=NOW)
    first = plan(_observed(body, nodes=CPU_ONLY, jobs=[job], pods=[pod]), Images(), LATER)
    deployment = next(o for o in first.create if o["kind"] == "Deployment")
    deployment["status"] = {"readyReplicas": 1}
    return body, job, pod, deployment


def test_the_plan_keeps_a_new_outcome_on_its_job_once() -> None:
    body, job, pod, deployment = _serving_cluster()
    result = plan(_observed(body, nodes=CPU_ONLY, jobs=[job], pods=[pod], deployments=[deployment]), Images(), LATER)
    patches = [p for p in result.patch if p["kind"] == "Job"]
    assert [p["name"] for p in patches] == [job["metadata"]["name"]]
    kept = json.loads(patches[0]["patch"]["metadata"]["annotations"][OUTCOME])
    assert (kept["status"], kept["artifact"]) == ("built", ARTIFACT)
    job["metadata"]["annotations"] = patches[0]["patch"]["metadata"]["annotations"]
    again = plan(_observed(body, nodes=CPU_ONLY, jobs=[job], pods=[pod], deployments=[deployment]), Images(), LATER)
    assert not [p for p in again.patch if p["kind"] == "Job"]


def test_a_serving_class_whose_build_pod_is_gone_keeps_serving() -> None:
    body, job, pod, deployment = _serving_cluster()
    first = plan(_observed(body, nodes=CPU_ONLY, jobs=[job], pods=[pod], deployments=[deployment]), Images(), LATER)
    job["metadata"]["annotations"] = next(p for p in first.patch if p["kind"] == "Job")["patch"]["metadata"][
        "annotations"
    ]
    result = plan(_observed(body, nodes=CPU_ONLY, jobs=[job], pods=[], deployments=[deployment]), Images(), LATER)
    (entry,) = result.status["classes"]
    assert entry["state"] == "Serving"
    assert entry["artifactDigest"] == ARTIFACT
    assert not result.delete


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
            max_leaves=20,
        ).map(json.dumps),
        st.fixed_dictionaries(
            {"v": st.sampled_from([1, 2, "1"]), "status": st.sampled_from(["built", "cached", "failed", 3]),
             "exitCode": st.one_of(st.integers(), st.text(max_size=3))},
            optional={"artifact": st.one_of(st.none(), st.text(max_size=5), st.fixed_dictionaries(
                {"reference": st.one_of(st.text(max_size=30), st.integers())})),
                "metrics": st.one_of(st.none(), st.dictionaries(st.sampled_from(["cosine", "max_abs_error"]),
                                                                 st.one_of(st.floats(), st.text(max_size=3))))},
        ).map(json.dumps),
    ),
    st.booleans(),
)  # fmt: skip
def test_no_termination_message_can_wedge_the_plan(message: str, succeeded: bool) -> None:
    body = edgemodel()
    job = copy.deepcopy(next(o for o in plan(_observed(body, nodes=CPU_ONLY), Images(), NOW).create
                             if o["kind"] == "Job"))  # fmt: skip
    job["status"] = {"conditions": [{"type": "Complete" if succeeded else "Failed", "status": "True"}]}
    pod = _pod(job["metadata"]["name"], 1, message, exit_code=0 if succeeded else 3, finished=NOW)
    result = plan(_observed(body, nodes=CPU_ONLY, jobs=[job], pods=[pod]), Images(), LATER)
    (entry,) = result.status["classes"]
    assert entry["state"] in {"Built", "Failed"}
    json.dumps(result.status, allow_nan=False)  # what the API server must accept


def test_the_plan_serves_a_build_whose_retry_succeeded() -> None:
    body = edgemodel()
    job = next(o for o in plan(_observed(body, nodes=CPU_ONLY), Images(), NOW).create if o["kind"] == "Job")
    job["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    name = job["metadata"]["name"]
    pods = [_pod(name, 1, REGISTRY_DOWN, exit_code=4, finished=NOW), _pod(name, 2, BUILT, exit_code=0, finished=LATER)]
    result = plan(_observed(body, nodes=CPU_ONLY, jobs=[job], pods=pods), Images(), LATER)
    assert [e["state"] for e in result.status["classes"]] == ["Built"]
    assert "Deployment" in [o["kind"] for o in result.create]


def _runtime_report(**fields: Any) -> str:
    """A termination message as `edgemodel build` writes it (the runtime's own `compact`)."""
    from edgemodel_runtime.build import report as runtime_report

    full = {"version": 1, "status": "built", "exitCode": 0, "message": "", "cacheKey": "k" * 64,
            "engine": "onnxruntime", "precision": "fp32", "classKey": "amd64-none-ed73af2f", "buildSeconds": 12.5,
            "artifact": {"file": "model.onnx", "sha256": "ab" * 32, "size": 1234, "reference": ARTIFACT},
            "candidate": {"comparison": {"samples": 8, "max_abs_error": 1e-5, "max_relative_error": 1e-4,
                                         "cosine": 0.99999, "top1_agreement": None},
                          "latency": {"p50_ms": 4.2, "p99_ms": 6.1, "mean_ms": 4.4}},
            "decision": {"chosen": "fp32", "tried": ["fp32"]}} | fields  # fmt: skip
    return runtime_report.compact(full)


@pytest.mark.parametrize(
    ("fields", "status", "reason"),
    [
        ({}, "built", None),
        ({"status": "cached", "message": "cache hit for k; nothing rebuilt"}, "cached", None),
        ({"status": "failed", "exitCode": 3, "reason": "ToleranceMissed", "message": "x" * 20000}, "failed",
         "ToleranceMissed"),
        ({"status": "failed", "exitCode": 4, "reason": "PushFailed", "artifact": None, "candidate": None}, "failed",
         "PushFailed"),
    ],
    ids=["built", "cached", "failed, message cut to fit", "failed before validation"],
)  # fmt: skip
def test_every_report_the_runtime_writes_is_readable(fields: Obj, status: str, reason: str | None) -> None:
    text = _runtime_report(**fields)
    exit_code = int(json.loads(text)["exitCode"])
    outcome, _ = read_outcome(_job(), [_pod("ocr-r1-x", 1, text, exit_code=exit_code, finished=NOW)],
                              job_succeeded=exit_code == 0)  # fmt: skip
    assert (outcome["status"], outcome.get("reason")) == (status, reason)
    if status != "failed":
        assert (outcome["artifact"], outcome["metrics"]["cosine"]) == (ARTIFACT, 0.99999)


def test_a_build_that_pushed_nothing_names_no_artifact_and_fails_its_class_as_such() -> None:
    text = _runtime_report(artifact={"file": "model.onnx", "sha256": "ab" * 32, "size": 1234})
    outcome, _ = read_outcome(_job(), [_pod("ocr-r1-x", 1, text, exit_code=0, finished=NOW)], job_succeeded=True)
    assert (outcome["status"], outcome.get("artifact")) == ("built", None)  # the plan says "names no artifact"


def test_a_report_lost_before_it_was_read_does_not_fail_a_class_that_serves_that_build() -> None:
    """The pod went (node lost, garbage-collected) while no operator ran, and nothing was kept on the Job
    (say, Jobs made by an older operator): what already serves the revision names its artifact."""
    body, job, _pod_gone, deployment = _serving_cluster()
    result = plan(_observed(body, nodes=CPU_ONLY, jobs=[job], pods=[], deployments=[deployment]), Images(), LATER)
    (entry,) = result.status["classes"]
    assert (entry["state"], entry["artifactDigest"]) == ("Serving", ARTIFACT)
    assert not result.delete
    (kept,) = [p for p in result.patch if p["kind"] == "Job"]
    assert json.loads(kept["patch"]["metadata"]["annotations"][OUTCOME])["artifact"] == ARTIFACT


def test_a_report_lost_with_nothing_serving_it_fails_the_class_as_lost() -> None:
    body, job, _pod_gone, _ = _serving_cluster()
    result = plan(_observed(body, nodes=CPU_ONLY, jobs=[job], pods=[]), Images(), LATER)
    (entry,) = result.status["classes"]
    assert entry["state"] == "Failed"
    assert entry["message"].startswith("ReportLost: ")
    assert not [p for p in result.patch if p["kind"] == "Job"]  # not kept: the pod may still show up
