"""How GitOps tools read an EdgeModel's health: Argo CD's Lua check and kstatus (Flux, kpt).

The EdgeModels here carry the status the operator's own pure `plan` writes at each step of a
rollout (building, serving, one class failed, a spec change not yet observed), so the checks are
run on what the operator really reports. Both evaluators are the real libraries: gopher-lua as
Argo CD runs a custom check, and sigs.k8s.io/cli-utils' kstatus, in the test bed's gitops-health
helper. The live counterpart, on the test bed with the operator running, is in test_chart.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration import gitops_states as states
from tests.integration.gitops_states import HEALTH_LUA, evaluate
from tests.testbed.nodes import default_nodes

ROOT = Path(__file__).resolve().parents[2]
DIGEST = "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"
Obj = dict[str, Any]


# ---------------------------------------------------------------- the operator's status at each step


def _nodes() -> list[Obj]:
    nodes = default_nodes()
    for node in nodes:
        node["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    return nodes


def _new() -> Obj:
    return {
        "apiVersion": "edgeml.dev/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": "ocr", "namespace": "models", "uid": "u-1", "generation": 1},
        "spec": {"model": {"uri": "oci://registry.local:5000/models/det:v4", "sha256": DIGEST}},
    }


def building() -> Obj:
    return states.building(_new(), _nodes()).body


def _after_builds(failing: int) -> Obj:
    return states.after_builds(_new(), _nodes(), failing).body


def serving() -> Obj:
    return _after_builds(failing=0)


def one_class_failed() -> Obj:
    return _after_builds(failing=1)


def every_class_failed() -> Obj:
    return _after_builds(failing=len(serving()["status"]["classes"]))


def spec_changed() -> Obj:
    body = copy.deepcopy(serving())
    body["metadata"]["generation"] = 2
    body["spec"]["inputs"] = [{"name": "x", "shape": [1, 3, 480, 640], "dtype": "float32"}]
    return body


STEPS: dict[str, Callable[[], Obj]] = {
    "building": building,
    "serving": serving,
    "one class failed": one_class_failed,
    "every class failed": every_class_failed,
    "spec changed, not yet observed": spec_changed,
}


def test_the_steps_are_the_states_they_claim() -> None:
    assert building()["status"]["phase"] == "Progressing"
    assert serving()["status"]["phase"] == "Ready"
    assert one_class_failed()["status"]["classesReady"] == "3/4"
    assert every_class_failed()["status"]["phase"] == "Failed"
    changed = spec_changed()
    assert changed["status"]["observedGeneration"] < changed["metadata"]["generation"]


# ---------------------------------------------------------------- Argo CD


@pytest.mark.parametrize(
    ("step", "health", "says"),
    [
        ("building", "Progressing", "NotReady"),
        ("serving", "Healthy", "4/4 classes serving"),
        ("one class failed", "Degraded", "ClassFailed"),
        ("every class failed", "Degraded", "ClassFailed"),
        ("spec changed, not yet observed", "Progressing", "generation 2"),
    ],
)
def test_argocd_health_of_an_edgemodel(step: str, health: str, says: str) -> None:
    result = evaluate("argocd-lua", STEPS[step]())
    assert result["status"] == health, result
    assert says in result["message"]


def test_argocd_health_before_the_operator_wrote_any_status_is_progressing() -> None:
    assert evaluate("argocd-lua", _new())["status"] == "Progressing"


def test_argocd_health_reads_a_failed_build_reason_without_degraded() -> None:
    body = building()
    for condition in body["status"]["conditions"]:
        if condition["type"] == "EnginesBuilt":
            condition |= {"status": "False", "reason": "BuildFailed", "message": "arm64: ToleranceMissed"}
        if condition["type"] == "Degraded":
            condition["status"] = "False"
    result = evaluate("argocd-lua", body)
    assert result == {"status": "Degraded", "message": result["message"]}
    assert "BuildFailed: arm64: ToleranceMissed" in result["message"]


def test_argocd_health_is_progressing_while_ready_speaks_of_an_older_generation() -> None:
    body = serving()
    body["metadata"]["generation"] = 3
    body["status"]["observedGeneration"] = 3  # status written, but Ready still speaks of generation 1
    assert evaluate("argocd-lua", body)["status"] == "Progressing"


def test_the_health_check_in_the_argocd_cm_snippet_is_the_tested_script() -> None:
    snippet = yaml.safe_load((ROOT / "examples" / "gitops" / "argocd" / "argocd-cm.yaml").read_text())
    key = "resource.customizations.health.edgeml.dev_EdgeModel"
    assert snippet["data"][key].strip() == HEALTH_LUA.read_text().strip()


# ---------------------------------------------------------------- kstatus (Flux, kpt)


@pytest.mark.parametrize(
    ("step", "status"),
    [
        ("building", "InProgress"),
        ("serving", "Current"),
        ("spec changed, not yet observed", "InProgress"),
    ],
)
def test_kstatus_of_an_edgemodel(step: str, status: str) -> None:
    assert evaluate("kstatus", STEPS[step]())["status"] == status


@pytest.mark.parametrize("step", ["one class failed", "every class failed"])
def test_kstatus_reports_a_failed_build_as_failed(step: str) -> None:
    assert evaluate("kstatus", STEPS[step]())["status"] == "Failed"


# ---------------------------------------------------------------- serving pods that fell back


def serving_its_fallback() -> Obj:
    """Every class serves, and the pods of the first class report they serve the fallback (their engine did not
    load): the status the operator's plan writes then."""
    import dataclasses

    from edgemodel_operator.builders import Images
    from edgemodel_operator.fallbacks import Fallback
    from edgemodel_operator.reconcile import Observed, plan

    body, nodes = _new(), _nodes()
    first = states._reconcile(states.Step(body), nodes, [], [], [])
    jobs, pods = zip(*(states.finished(j, ok=True) for j in first.created if j["kind"] == "Job"), strict=True)
    second = states._reconcile(first, nodes, list(jobs), list(pods), [])
    deployments = [{**d, "status": {"readyReplicas": 1}} for d in second.created if d["kind"] == "Deployment"]
    observed = Observed(second.body, nodes, list(jobs), list(pods), deployments, [{"metadata": {"name": "ocr"}}])
    key = serving()["status"]["classes"][0]["key"]
    revision = deployments[0]["metadata"]["labels"]["edgeml.dev/revision"]
    fallbacks = {key: Fallback((revision,), "InvalidModel", ("ocr-pod-1",))}
    result = plan(dataclasses.replace(observed, fallbacks=fallbacks), Images(), states.NOW)
    return {**second.body, "status": result.status}


def test_an_edgemodel_serving_its_fallback_is_degraded_for_argocd_and_current_for_kstatus() -> None:
    body = serving_its_fallback()
    degraded = next(c for c in body["status"]["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "EngineFallback")
    assert body["status"]["phase"] == "Degraded"
    result = evaluate("argocd-lua", body)
    assert result["status"] == "Degraded", result
    assert "EngineFallback" in result["message"] or "fallback" in result["message"], result
    # kstatus has no degraded state: the EdgeModel serves (Ready) and nothing is stalled, so it is Current.
    assert evaluate("kstatus", body)["status"] == "Current"
