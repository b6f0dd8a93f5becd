"""The operator as a real process on the test bed: builds per class, serving, failures, cleanup.

KWOK plays the nodes: build pods stay Running until the test, playing the builder, annotates them
with an exit code and the compact build report that `edgemodel build` writes to its termination log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import eventually, get
from tests.integration.operators import (
    EDGEMODEL,
    OperatorProcess,
    Pool,
    apply_edgemodel,
    finish_builds,
    pool_targets,
)
from tests.testbed.cluster import Testbed
from tests.testbed.nodes import ARM64_CPU, X86_NVIDIA, X86_VNNI, build_node

pytestmark = pytest.mark.testbed


@pytest.fixture(scope="module")
def operator_process(crd: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    running = OperatorProcess(crd, tmp_path_factory.mktemp("operator") / "operator.log")
    running.start()
    yield running
    running.stop()
    print(f"[operator] log: {running.log}", file=sys.stderr)


@pytest.fixture
def operator(operator_process: OperatorProcess) -> Testbed:
    return operator_process.bed


def test_builds_then_serves_one_engine_per_hardware_class(operator: Testbed, namespace: str) -> None:
    apply_edgemodel(operator, namespace, "ocr")
    jobs = eventually(lambda: len(get(operator, "jobs", "-n", namespace)["items"]) == 4, what="4 build Jobs")
    assert jobs
    finish_builds(operator, namespace)
    operator.kubectl("wait", "-n", namespace, "--for=condition=Ready", "em/ocr", "--timeout=120s")
    em = get(operator, "em", "ocr", "-n", namespace)
    status = em["status"]
    assert status["phase"] == "Ready"
    assert status["classesReady"] == "4/4"
    assert {c["state"] for c in status["classes"]} == {"Serving"}
    assert {c["engine"] for c in status["classes"]} == {"onnxruntime", "tensorrt"}
    assert status["observedGeneration"] == em["metadata"]["generation"]
    deployments = get(operator, "deployments", "-n", namespace)["items"]
    assert len(deployments) == 4
    selectors = [d["spec"]["template"]["spec"]["nodeSelector"] for d in deployments]
    assert sum("nvidia.com/gpu.product" in s for s in selectors) == 2
    assert get(operator, "service", "ocr", "-n", namespace)["spec"]["ports"][0]["port"] == 8080
    columns = operator.kubectl("get", "em", "ocr", "-n", namespace).stdout.splitlines()[1].split()
    assert columns[1:4] == ["True", "Ready", "4/4"]


def test_a_failed_build_fails_its_class_only_with_the_reports_reason(operator: Testbed, namespace: str) -> None:
    apply_edgemodel(operator, namespace, "ocr")
    eventually(lambda: len(get(operator, "jobs", "-n", namespace)["items"]) == 4, what="4 build Jobs")
    finish_builds(operator, namespace, failing_class_prefix="arm64-nvidia")

    def degraded() -> Any:
        status = get(operator, "em", "ocr", "-n", namespace).get("status", {})
        conditions = {c["type"]: c for c in status.get("conditions", [])}
        return conditions.get("Degraded", {}).get("status") == "True" and status.get("classesReady") == "3/4" and status

    status = eventually(degraded, what="Degraded with 3 of 4 classes serving")
    failed = [c for c in status["classes"] if c["state"] == "Failed"]
    assert len(failed) == 1
    assert "ToleranceMissed" in failed[0]["message"]
    assert len(get(operator, "deployments", "-n", namespace)["items"]) == 3
    events = operator.kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=ocr").stdout
    assert "BuildStarted" in events


def test_deleting_the_edgemodel_removes_what_it_created(operator: Testbed, namespace: str) -> None:
    apply_edgemodel(operator, namespace, "ocr")
    eventually(lambda: len(get(operator, "jobs", "-n", namespace)["items"]) == 4, what="4 build Jobs")
    operator.kubectl("delete", "em", "ocr", "-n", namespace, "--wait=true", "--timeout=60s")
    eventually(
        lambda: (
            not get(operator, "jobs", "-n", namespace)["items"]
            and not get(operator, "services", "-n", namespace)["items"]
        ),
        what="owned objects garbage-collected",
    )


def _jobs(bed: Testbed, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = get(bed, "jobs", "-n", namespace)["items"]
    return items


def test_a_node_of_a_new_class_triggers_exactly_one_new_build(operator: Testbed, namespace: str) -> None:
    apply_edgemodel(operator, namespace, "ocr")
    eventually(lambda: len(_jobs(operator, namespace)) == 4, what="4 build Jobs")
    node = build_node("gpu-l4-1", X86_NVIDIA)
    node["metadata"]["labels"] |= {"nvidia.com/gpu.product": "NVIDIA-L4", "nvidia.com/gpu.compute.minor": "9"}
    operator.apply_objects([node])
    try:
        eventually(lambda: len(_jobs(operator, namespace)) == 5, what="a fifth build Job")
        time.sleep(3)  # several resyncs later, still exactly one new build
        jobs = _jobs(operator, namespace)
        assert len(jobs) == 5
        new = [
            j
            for j in jobs
            if j["spec"]["template"]["spec"]["nodeSelector"].get("nvidia.com/gpu.product") == "NVIDIA-L4"
        ]
        assert len(new) == 1
    finally:
        operator.kubectl("delete", "node", "gpu-l4-1", "--wait=false")

    def absent() -> Any:
        classes = get(operator, "em", "ocr", "-n", namespace).get("status", {}).get("classes") or []
        return [c for c in classes if c["state"] == "Absent"]

    (entry,) = eventually(absent, what="the departed class Absent")
    assert entry["nodeCount"] == 0
    assert len(_jobs(operator, namespace)) == 5  # kept for the grace period (10 minutes by default)


def test_an_operator_killed_mid_reconcile_restarts_without_duplicates(
    operator_process: OperatorProcess, namespace: str
) -> None:
    bed = operator_process.bed
    apply_edgemodel(bed, namespace, "ocr")
    time.sleep(0.5)
    operator_process.kill()
    operator_process.start()
    eventually(lambda: len(_jobs(bed, namespace)) == 4, what="4 build Jobs")
    time.sleep(3)
    assert len(_jobs(bed, namespace)) == 4
    assert len(get(bed, "services", "-n", namespace)["items"]) == 1


def test_plan_prints_what_would_be_created_and_changes_nothing(crd: Testbed, tmp_path: Path) -> None:
    manifest = tmp_path / "em.yaml"
    manifest.write_text((Path(__file__).resolve().parents[2] / "examples" / "ocr-detector.yaml").read_text())
    mine = ("jobs", "-A", "-l", "edgeml.dev/edgemodel=ocr-detector")  # other tests' Jobs may come and go meanwhile
    before = get(crd, *mine)["items"]
    result = subprocess.run(
        [EDGEMODEL, "plan", str(manifest)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "KUBECONFIG": str(crd.kubeconfig)},
    )
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0]
    classes = int(header.split()[1])
    assert header.endswith(")")
    assert "hardware classes" in header
    assert classes >= 4
    objects = list(yaml.safe_load_all(result.stdout))
    assert [o["kind"] for o in objects].count("Job") == classes
    assert [o["kind"] for o in objects].count("Service") == 1
    assert get(crd, *mine)["items"] == before


def test_plan_refuses_a_file_without_one_edgemodel(tmp_path: Path) -> None:
    manifest = tmp_path / "empty.yaml"
    manifest.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    result = subprocess.run([EDGEMODEL, "plan", str(manifest)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "holds 0 EdgeModels" in result.stderr


def test_operator_serves_health_and_metrics(operator_process: OperatorProcess, namespace: str) -> None:
    import httpx

    bed = operator_process.bed
    apply_edgemodel(bed, namespace, "ocr")
    eventually(lambda: len(get(bed, "jobs", "-n", namespace)["items"]) == 4, what="4 build Jobs")
    health = httpx.get(f"http://127.0.0.1:{operator_process.health_port}/healthz", timeout=10)
    assert health.status_code == 200
    text = httpx.get(f"http://127.0.0.1:{operator_process.metrics_port}/metrics", timeout=10).text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith("edgemodel_")
    }
    assert values['edgemodel_operator_reconciles_total{outcome="ok"}'] >= 1
    assert values['edgemodel_operator_api_writes_total{verb="create"}'] >= 5
    assert values["edgemodel_operator_reconcile_duration_seconds_count"] >= 1


@pytest.fixture
def pool(operator: Testbed, namespace: str) -> Iterator[Callable[..., dict[str, Any]]]:
    nodes = Pool(operator, namespace)
    yield nodes.add
    nodes.remove()


def _serving(bed: Testbed, namespace: str) -> dict[str, int]:
    """Ready serving replicas per revision."""
    ready: dict[str, int] = {}
    for item in get(bed, "deployments", "-n", namespace)["items"]:
        revision = item["metadata"]["labels"]["edgeml.dev/revision"]
        ready[revision] = ready.get(revision, 0) + int(item.get("status", {}).get("readyReplicas") or 0)
    return ready


def test_a_spec_change_is_built_and_shadowed_while_the_old_revision_keeps_serving(
    operator: Testbed, namespace: str, pool: Callable[..., dict[str, Any]]
) -> None:
    """KWOK pods serve nothing, so no evidence arrives and the candidates stay in shadow until a
    person rolls them back; deciding on evidence is test_rollout.py's, with real servers."""
    pool(X86_VNNI)
    pool(ARM64_CPU)
    apply_edgemodel(operator, namespace, "ocr", targets=pool_targets(namespace))
    finish_builds(operator, namespace, count=2)
    operator.kubectl("wait", "-n", namespace, "--for=condition=Ready", "em/ocr", "--timeout=60s")
    status = get(operator, "em", "ocr", "-n", namespace)["status"]
    first = status["revisions"]["stable"]
    assert all(c["nodes"][0].startswith(namespace) for c in status["classes"])

    apply_edgemodel(operator, namespace, "ocr", targets=pool_targets(namespace), digest="0" * 64)
    status = eventually(
        lambda: (
            (s := get(operator, "em", "ocr", "-n", namespace).get("status", {})).get("observedGeneration") == 2 and s
        ),
        what="generation 2 observed",
    )
    second = status["revisions"]["candidate"]
    assert second != first
    assert status["revisions"]["stable"] == first  # the old revision is still what serves
    finish_builds(operator, namespace, count=2)

    def shadowing() -> Any:
        found = get(operator, "em", "ocr", "-n", namespace)["status"]
        return {c["state"] for c in found["classes"]} == {"Shadowing"} and found

    status = eventually(shadowing, what="both classes shadowing the new revision")
    assert {c["revision"] for c in status["classes"]} == {first}
    assert {c["shadow"]["revision"] for c in status["classes"]} == {second}
    assert status["phase"] == "Progressing"
    assert _serving(operator, namespace) == {first: 2, second: 2}
    labels = [d["metadata"]["labels"] for d in get(operator, "deployments", "-n", namespace)["items"]]
    tracks = {lab["edgeml.dev/track"] for lab in labels if lab["edgeml.dev/revision"] == second}
    assert tracks == {"candidate"}  # the EdgeModel's Service selects track=stable: no live traffic
    mirror = get(operator, "configmap", "ocr-shadow", "-n", namespace)["data"]
    assert len(mirror) == 2
    assert all(key.startswith(first) and json.loads(v)["candidateRevision"] == second for key, v in mirror.items())

    operator.kubectl("annotate", "em", "ocr", "-n", namespace, f"edgeml.dev/rollback={second}")
    eventually(lambda: _serving(operator, namespace) == {first: 2}, what="the candidates removed")

    def rolled_back() -> Any:  # the deletions and the status are two writes: the status may land just after
        found = get(operator, "em", "ocr", "-n", namespace)["status"]
        return {c["state"] for c in found["classes"]} == {"RolledBack"} and found

    status = eventually(rolled_back, what="both classes rolled back in the status")
    assert status["phase"] == "Failed"  # Stalled: the spec asks for a revision that was refused
    assert get(operator, "configmap", "ocr-shadow", "-n", namespace).get("data", {}) == {}


def test_a_build_no_node_can_take_is_reported_and_starts_once_one_can(
    operator: Testbed, namespace: str, pool: Callable[..., dict[str, Any]]
) -> None:
    node = pool(X86_NVIDIA, **{"nvidia.com/gpu": "1"})
    blocker = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "holds-the-gpu", "namespace": namespace},
        "spec": {
            "nodeName": node["metadata"]["name"],
            "containers": [{"name": "c", "image": "busybox", "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
            "tolerations": [{"operator": "Exists"}],
        },
    }
    operator.apply_objects([blocker])
    apply_edgemodel(operator, namespace, "ocr", targets=pool_targets(namespace))

    def pending() -> Any:
        status = get(operator, "em", "ocr", "-n", namespace).get("status", {})
        classes = status.get("classes") or [{}]
        return classes[0].get("state") == "Pending" and status

    status = eventually(pending, what="the class reported Pending")
    assert "nvidia.com/gpu" in status["classes"][0]["message"]
    built = next(c for c in status["conditions"] if c["type"] == "EnginesBuilt")
    assert (built["status"], built["reason"]) == ("False", "Unschedulable")
    assert status["phase"] == "Progressing"

    operator.kubectl("delete", "pod", "holds-the-gpu", "-n", namespace, "--grace-period=0", "--force")
    eventually(
        lambda: get(operator, "em", "ocr", "-n", namespace)["status"]["classes"][0]["state"] == "Building",
        what="the build scheduled once the GPU is free",
    )
    finish_builds(operator, namespace, count=1)
    operator.kubectl("wait", "-n", namespace, "--for=condition=Ready", "em/ocr", "--timeout=60s")
