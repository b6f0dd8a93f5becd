"""The operator as a real process on the test bed: builds per class, serving, failures, cleanup.

KWOK plays the nodes: build pods stay Running until the test, playing the builder, annotates them
with an exit code and the compact build report that `edgemodel build` writes to its termination log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import EXIT_CODE, MESSAGE, eventually, free_port, get
from tests.testbed.cluster import Testbed

pytestmark = pytest.mark.testbed

EDGEMODEL = str(Path(sys.executable).parent / "edgemodel")
DIGEST = "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"


class OperatorProcess:
    """`edgemodel operator` against the test bed; can be killed and started again."""

    def __init__(self, bed: Testbed, log: Path) -> None:
        self.bed, self.log = bed, log
        self.process: subprocess.Popen[bytes] | None = None
        self.health_port, self.metrics_port = free_port(), free_port()

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.bed.kubeconfig),
            "EDGEMODEL_RESYNC_SECONDS": "600",  # changes must arrive through the watches, not a periodic pass
            "EDGEMODEL_HEALTH_HOST": "127.0.0.1",
            "EDGEMODEL_HEALTH_PORT": str(self.health_port),
            "EDGEMODEL_METRICS_HOST": "127.0.0.1",
            "EDGEMODEL_METRICS_PORT": str(self.metrics_port),
            "EDGEMODEL_REGISTRY": "127.0.0.1:5000/engines",
        }
        with self.log.open("ab") as out:
            self.process = subprocess.Popen([EDGEMODEL, "operator"], env=env, stdout=out, stderr=subprocess.STDOUT)
        time.sleep(2)
        if self.process.poll() is not None:
            raise AssertionError(f"operator exited:\n{self.log.read_text()}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


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


def _apply(bed: Testbed, namespace: str, name: str, **spec: Any) -> None:
    manifest = {
        "apiVersion": "edgeml.dev/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": name},
        "spec": {"model": {"uri": "oci://registry.local:5000/models/det:v4", "sha256": DIGEST}, **spec},
    }
    bed.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))


def _report(job: str, ok: bool) -> str:
    if ok:
        return json.dumps({"v": 1, "status": "built", "exitCode": 0, "cacheKey": job, "precision": "fp32",
                           "artifact": {"reference": f"oci://127.0.0.1:5000/engines/x@sha256:{'ab' * 32}"},
                           "buildSeconds": 3.5, "metrics": {"max_abs_error": 1e-6, "cosine": 1.0},
                           "latency": {"p50_ms": 4.0, "p99_ms": 6.0}})  # fmt: skip
    return json.dumps({"v": 1, "status": "failed", "exitCode": 3, "reason": "ToleranceMissed",
                       "message": "cosine 0.91 < minCosine 0.99"})  # fmt: skip


def _finish_builds(bed: Testbed, namespace: str, failing_class_prefix: str | None = None) -> list[dict[str, Any]]:
    """Play the builder: annotate each running build pod with its exit code and report."""
    pods = eventually(
        lambda: (
            (
                items := [
                    p
                    for p in get(bed, "pods", "-n", namespace, "-l", "app.kubernetes.io/component=build")["items"]
                    if p["status"].get("phase") == "Running"
                ]
            )
            and len(items) == 4
            and items
        ),
        what="4 running build pods",
    )
    for pod in pods:
        key = pod["metadata"]["labels"]["edgeml.dev/class"]
        ok = failing_class_prefix is None or not key.startswith(failing_class_prefix)
        bed.kubectl("annotate", "pod", "-n", namespace, pod["metadata"]["name"],
                    f"{EXIT_CODE}={0 if ok else 3}", f"{MESSAGE}={_report(key, ok)}")  # fmt: skip
    return list(pods)


def test_builds_then_serves_one_engine_per_hardware_class(operator: Testbed, namespace: str) -> None:
    _apply(operator, namespace, "ocr")
    jobs = eventually(lambda: len(get(operator, "jobs", "-n", namespace)["items"]) == 4, what="4 build Jobs")
    assert jobs
    _finish_builds(operator, namespace)
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
    _apply(operator, namespace, "ocr")
    eventually(lambda: len(get(operator, "jobs", "-n", namespace)["items"]) == 4, what="4 build Jobs")
    _finish_builds(operator, namespace, failing_class_prefix="arm64-nvidia")

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
    _apply(operator, namespace, "ocr")
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
    from tests.testbed.nodes import X86_NVIDIA, build_node

    _apply(operator, namespace, "ocr")
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
    eventually(lambda: len(_jobs(operator, namespace)) == 4, what="the departed class's Job removed")


def test_an_operator_killed_mid_reconcile_restarts_without_duplicates(
    operator_process: OperatorProcess, namespace: str
) -> None:
    bed = operator_process.bed
    _apply(bed, namespace, "ocr")
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
    before = get(crd, "jobs", "-A")["items"]
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
    assert get(crd, "jobs", "-A")["items"] == before


def test_plan_refuses_a_file_without_one_edgemodel(tmp_path: Path) -> None:
    manifest = tmp_path / "empty.yaml"
    manifest.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    result = subprocess.run([EDGEMODEL, "plan", str(manifest)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "holds 0 EdgeModels" in result.stderr


def test_operator_serves_health_and_metrics(operator_process: OperatorProcess, namespace: str) -> None:
    import httpx

    bed = operator_process.bed
    _apply(bed, namespace, "ocr")
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
