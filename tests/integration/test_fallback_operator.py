"""An engine the serving pods cannot load, end to end: the pods serve the fallback, the EdgeModel says so, the
operator builds the class again, and the rebuilt engine clears the condition.

Real parts: the control plane and KWOK nodes of the test bed, the operator as a process at its default
fallback check interval, Debian's Prometheus, and real `edgemodel serve` processes. KWOK runs no containers,
so `Kubelet` below plays the kubelet for the serving pods: for each serving workload it starts `edgemodel
serve` on the artifact the workload's arguments name, with the workload's `--fallback-sha256` and the
model file in place of the `--fallback-model` URI (it plays the registry too). The first build's artifact is
a real engine truncated on disk (what a bad disk or an interrupted copy leaves); the rebuilt one is intact.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from edgemodel_runtime.build.pipeline import BuildRequest, build
from edgemodel_runtime.digests import sha256_file
from tests import onnx_models
from tests.helpers import EXIT_CODE, MESSAGE, eventually, get
from tests.integration.operators import OperatorProcess, Pool, apply_edgemodel, finish_builds, pool_targets
from tests.integration.test_serve import Server
from tests.testbed.cluster import Testbed
from tests.testbed.nodes import X86_VNNI
from tests.testbed.prometheus import Prometheus

pytestmark = pytest.mark.testbed
NAME = "fb"
FIRST = "ab" * 32  # the artifact digest finish_builds reports: served truncated
REBUILT = "cd" * 32  # the rebuild's artifact: served intact


@dataclass
class Kubelet:
    """Serving pods of one EdgeModel as real processes, restarted when their workload's arguments change."""

    bed: Testbed
    namespace: str
    prometheus: Prometheus
    engines: dict[str, Path]  # artifact digest -> engine directory
    model: Path
    directory: Path
    pods: dict[str, tuple[list[str], Server, dict[str, str]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        config.load_kube_config(str(self.bed.kubeconfig))  # type: ignore[no-untyped-call]
        self.apps: Any = client.AppsV1Api()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception as error:
                self.errors.append(repr(error))
            time.sleep(0.3)

    def _sync(self) -> None:
        raw = self.apps.list_namespaced_deployment(
            self.namespace, label_selector=f"edgeml.dev/edgemodel={NAME}", _preload_content=False
        )
        for workload in json.loads(raw.data)["items"]:
            name, labels = workload["metadata"]["name"], workload["metadata"]["labels"]
            args = workload["spec"]["template"]["spec"]["containers"][0]["args"]
            running = self.pods.get(name)
            if running is not None and running[0] == args:
                continue
            if running is not None:
                running[1].process.send_signal(signal.SIGTERM)
                running[1].process.wait(30)
            digest = args[1].rsplit("@sha256:", 1)[1]
            server = Server(self.engines[digest], NAME, "--revision", labels["edgeml.dev/revision"],
                            "--fallback-model", str(self.model),
                            "--fallback-sha256", args[args.index("--fallback-sha256") + 1],
                            log_dir=self.directory)  # fmt: skip
            target = {"namespace": self.namespace, "edgemodel": NAME, "class": labels["edgeml.dev/class"],
                      "revision": labels["edgeml.dev/revision"], "pod": f"{name}-0"}  # fmt: skip
            self.pods[name] = (args, server, target)
            self.prometheus.set_targets([(f"127.0.0.1:{s.port}", t) for _, s, t in self.pods.values()])

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)
        for _, server, _ in self.pods.values():
            server.stop()


@dataclass
class Scene:
    bed: Testbed
    namespace: str
    kubelet: Kubelet
    model: Path


@pytest.fixture(scope="module")
def scene(crd: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    directory = tmp_path_factory.mktemp("fallback-operator")
    namespace = f"fallback-{os.getpid()}"
    crd.kubectl("create", "namespace", namespace)
    pool = Pool(crd, namespace)
    pool.add(X86_VNNI)
    model = onnx_models.tiny_classifier(directory / "model.onnx", seed=5)
    build(BuildRequest(model=str(model), sha256=sha256_file(model), output=directory / "intact",
                       benchmark_seconds=0.2, samples=2))  # fmt: skip
    damaged = Path(shutil.copytree(directory / "intact", directory / "truncated"))
    engine = damaged / "model.onnx"
    engine.write_bytes(engine.read_bytes()[: engine.stat().st_size // 2])
    cache = os.environ.get("EDGEMODEL_ARTIFACT_CACHE")
    os.environ["EDGEMODEL_ARTIFACT_CACHE"] = str(directory / "cache")  # where the servers keep the fallback
    prometheus = Prometheus(directory / "prometheus").start()
    operator = OperatorProcess(crd, directory / "operator.log", settings={
        "prometheus_url": prometheus.url, "namespaces": json.dumps([namespace]),
    })  # fmt: skip
    operator.start()
    kubelet = Kubelet(crd, namespace, prometheus, {FIRST: damaged, REBUILT: directory / "intact"}, model, directory)
    yield Scene(crd, namespace, kubelet, model)
    print(f"[fallback] operator log: {directory / 'operator.log'}")
    kubelet.stop()
    operator.stop()
    prometheus.stop()
    if cache is None:
        os.environ.pop("EDGEMODEL_ARTIFACT_CACHE", None)
    else:
        os.environ["EDGEMODEL_ARTIFACT_CACHE"] = cache
    crd.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    pool.remove()


def _condition(scene: Scene, kind: str) -> dict[str, Any]:
    status = get(scene.bed, "em", NAME, "-n", scene.namespace).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def _build_pods(scene: Scene) -> list[dict[str, Any]]:
    pods = get(scene.bed, "pods", "-n", scene.namespace, "-l", "app.kubernetes.io/component=build")["items"]
    return [p for p in pods if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
            and p["spec"]["containers"][0]["args"][-1] == "--no-cache"]  # fmt: skip


def _serving(scene: Scene) -> str:
    """The artifact the pod that the kubelet runs serves."""
    return next(iter(scene.kubelet.pods.values()))[0][1] if scene.kubelet.pods else ""


def test_an_unloadable_engine_falls_back_the_edgemodel_says_so_and_the_rebuilt_engine_serves(scene: Scene) -> None:
    apply_edgemodel(scene.bed, scene.namespace, NAME, digest=sha256_file(scene.model), targets=pool_targets(
        scene.namespace))  # fmt: skip
    finish_builds(scene.bed, scene.namespace, count=1)

    # The pod serves the fallback; the operator reads it from Prometheus and says so.
    degraded = eventually(lambda: (c := _condition(scene, "Degraded")).get("status") == "True" and c,
                          timeout=120, what="Degraded=True")  # fmt: skip
    assert degraded["reason"] == "EngineFallback", degraded
    assert "DigestMismatch" in degraded["message"], degraded
    ((_, server, _),) = scene.kubelet.pods.values()
    assert json.loads(server.get(f"/v2/models/{NAME}/ready")[1])["edgemodel"]["fallbackReason"] == "DigestMismatch"
    events = scene.bed.kubectl("get", "events", "-n", scene.namespace, "-o", "json").stdout
    assert "Rebuilding" in events

    # The class is built again, without the cache; the new build reports another artifact.
    job = eventually(lambda: (pods := _build_pods(scene)) and pods[0], timeout=120, what="a build pod with --no-cache")
    jobs = get(scene.bed, "jobs", "-n", scene.namespace)["items"]
    assert [j["spec"]["template"]["spec"]["containers"][0]["args"][-1] for j in jobs] == ["--no-cache"]
    assert _condition(scene, "Degraded")["status"] == "True"  # the fallback still serves while the class builds
    report = {"v": 1, "status": "built", "exitCode": 0, "cacheKey": "k", "precision": "fp32",
              "artifact": {"reference": f"oci://127.0.0.1:5000/engines/x@sha256:{REBUILT}"}}  # fmt: skip
    scene.bed.kubectl("annotate", "pod", "-n", scene.namespace, job["metadata"]["name"], f"{EXIT_CODE}=0",
                      f"{MESSAGE}={json.dumps(report)}")  # fmt: skip

    # The workload is pointed at the rebuilt engine; its pod loads it and the condition clears.
    eventually(lambda: _serving(scene).endswith(REBUILT), timeout=120, what="the workload serves the rebuilt engine")
    eventually(lambda: _condition(scene, "Degraded").get("status") == "False", timeout=180,
               what="Degraded=False once the rebuilt engine serves")  # fmt: skip
    ((args, server, _),) = scene.kubelet.pods.values()
    assert args[1].endswith(REBUILT)
    assert "edgemodel" not in json.loads(server.get(f"/v2/models/{NAME}/ready")[1])
    assert not scene.kubelet.errors, scene.kubelet.errors
    listed = get(scene.bed, "events", "-n", scene.namespace)["items"]
    rebuilt = [e["message"] for e in listed if e["reason"] == "ServingRebuilt"]
    assert len(rebuilt) == 1, [f"{e['reason']}: {e['message']}" for e in listed]
    assert REBUILT in rebuilt[0], rebuilt
