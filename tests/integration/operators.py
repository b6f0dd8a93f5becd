"""The operator as a real process, and the parts of a test that play the user and the builder.

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
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import EXIT_CODE, MESSAGE, eventually, free_port, get
from tests.testbed.cluster import Testbed
from tests.testbed.nodes import NodeClass, build_node

EDGEMODEL = str(Path(sys.executable).parent / "edgemodel")
DIGEST = "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"


class OperatorProcess:
    """`edgemodel operator` against the test bed; can be killed and started again."""

    def __init__(
        self, bed: Testbed, log: Path, kubeconfig: Path | None = None, settings: dict[str, str] | None = None
    ) -> None:
        """`settings` become EDGEMODEL_* variables; `kubeconfig` replaces the test bed's admin credentials."""
        self.bed, self.log, self.settings = bed, log, settings or {}
        self.kubeconfig = kubeconfig or bed.kubeconfig
        self.process: subprocess.Popen[bytes] | None = None
        self.health_port, self.metrics_port = free_port(), free_port()

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "EDGEMODEL_RESYNC_SECONDS": "600",  # changes must arrive through the watches, not a periodic pass
            "EDGEMODEL_HEALTH_HOST": "127.0.0.1",
            "EDGEMODEL_HEALTH_PORT": str(self.health_port),
            "EDGEMODEL_METRICS_HOST": "127.0.0.1",
            "EDGEMODEL_METRICS_PORT": str(self.metrics_port),
            "EDGEMODEL_REGISTRY": "127.0.0.1:5000/engines",
            **{f"EDGEMODEL_{k.upper()}": v for k, v in self.settings.items()},
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


def apply_edgemodel(bed: Testbed, namespace: str, name: str, digest: str = DIGEST, **spec: Any) -> None:
    """`kubectl apply` an EdgeModel; `digest` names the model (a new one makes a new revision)."""
    manifest = {
        "apiVersion": "edgeml.dev/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": name},
        "spec": {"model": {"uri": "oci://registry.local:5000/models/det:v4", "sha256": digest}, **spec},
    }
    bed.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))


def build_report(job: str, ok: bool) -> str:
    if ok:
        return json.dumps({"v": 1, "status": "built", "exitCode": 0, "cacheKey": job, "precision": "fp32",
                           "artifact": {"reference": f"oci://127.0.0.1:5000/engines/x@sha256:{'ab' * 32}"},
                           "buildSeconds": 3.5, "metrics": {"max_abs_error": 1e-6, "cosine": 1.0},
                           "latency": {"p50_ms": 4.0, "p99_ms": 6.0}})  # fmt: skip
    return json.dumps({"v": 1, "status": "failed", "exitCode": 3, "reason": "ToleranceMissed",
                       "message": "cosine 0.91 < minCosine 0.99"})  # fmt: skip


def finish_builds(
    bed: Testbed, namespace: str, failing_class_prefix: str | None = None, count: int = 4
) -> list[dict[str, Any]]:
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
            and len(items) == count
            and items
        ),
        what=f"{count} running build pods",
    )
    for pod in pods:
        key = pod["metadata"]["labels"]["edgeml.dev/class"]
        ok = failing_class_prefix is None or not key.startswith(failing_class_prefix)
        bed.kubectl("annotate", "pod", "-n", namespace, pod["metadata"]["name"],
                    f"{EXIT_CODE}={0 if ok else 3}", f"{MESSAGE}={build_report(key, ok)}")  # fmt: skip
    return list(pods)


POOL = "testbed.edgemodel.dev/pool"


class Pool:
    """Nodes of one test's own, tainted pool: only an EdgeModel that selects and tolerates it (`pool_targets`)
    uses them, so what other tests still hold (GPUs, pods in namespaces being deleted) cannot interfere."""

    def __init__(self, bed: Testbed, name: str) -> None:
        self.bed, self.name, self.nodes = bed, name, list[str]()

    def add(self, node_class: NodeClass, **capacity: str) -> dict[str, Any]:
        node = build_node(f"{self.name}-{node_class.name}-{len(self.nodes)}", node_class)
        node["metadata"]["labels"][POOL] = self.name
        node["spec"]["taints"] = [{"key": POOL, "value": self.name, "effect": "NoSchedule"}]
        for field in ("capacity", "allocatable"):
            node["status"][field] |= capacity
        self.bed.apply_objects([node])
        self.nodes.append(node["metadata"]["name"])
        return node

    def remove(self) -> None:
        for name in self.nodes:
            self.bed.kubectl("delete", "node", name, "--wait=false", check=False)


def pool_targets(name: str) -> dict[str, Any]:
    """spec.targets for an EdgeModel on pool `name`."""
    return {
        "nodeSelector": {POOL: name},
        "tolerations": [{"key": POOL, "operator": "Equal", "value": name, "effect": "NoSchedule"}],
    }
