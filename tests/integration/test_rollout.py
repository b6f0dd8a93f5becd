"""The rollout end to end: the operator shadows each new revision, Prometheus measures, the operator decides.

Real parts: the control plane and KWOK nodes of the test bed, the operator as a process, Debian's
Prometheus, and real `edgemodel serve` processes serving real ONNX models. KWOK runs no containers,
so `Kubelet` below plays the kubelet (and the cluster DNS) for the serving pods of one node: for each
serving workload the operator creates it starts `edgemodel serve` with the model that revision names,
labelled as the pod would be (namespace, edgemodel, class, revision, track) for Prometheus; it
projects the shadow ConfigMap into files as a ConfigMap volume would (atomic rename), with the
candidate Service's URL resolved to that candidate's process; and it keeps the EdgeModel's Service
(the stable endpoints) current. A client loop sends live requests to the stable endpoints throughout
and counts failures.

The three cases run in order on one EdgeModel: an agreeing candidate is promoted; a disagreeing one
(a different model) is rolled back with the measured agreement in status; a crashing one is rolled back.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import pytest
from kubernetes import client, config

from edgemodel_runtime.digests import sha256_file
from tests import onnx_models
from tests.helpers import eventually, get
from tests.integration.operators import OperatorProcess, Pool, apply_edgemodel, finish_builds, pool_targets
from tests.integration.test_serve import Server, _classifier_body
from tests.testbed.cluster import Testbed
from tests.testbed.nodes import X86_VNNI
from tests.testbed.prometheus import Prometheus

pytestmark = pytest.mark.testbed
NAME = "clf"
MIN_REQUESTS, MIN_AGREEMENT, MAX_ERROR_RATE = 40, 0.99, 0.05
ROLLOUT = {
    "shadow": {"mirrorPercent": 100, "minRequests": MIN_REQUESTS, "duration": "3s"},
    # On a busy 2-core machine two single-threaded servers are timed very unevenly (ratios of 5 and more
    # were seen under load): the latency limit is loose here, and the latency check is tested in
    # tests/unit/test_rollout.py. Agreement and errors decide these cases.
    "analysis": {"minAgreement": MIN_AGREEMENT, "maxLatencyRatio": 50, "maxErrorRate": MAX_ERROR_RATE},
}


def _copy_of(model: Path, path: Path, note: str) -> Path:
    """The same graph and weights (the same answers) in a file with another digest: a new revision."""
    proto = onnx.load(str(model))
    proto.doc_string = note
    onnx.save(proto, str(path))
    return path


@dataclass
class Pod:
    server: Server
    revision: str
    key: str  # hardware class
    track: str


@dataclass
class Kubelet:
    """Runs the serving pods of one EdgeModel as real processes (see the module docstring)."""

    bed: Testbed
    namespace: str
    prometheus: Prometheus
    models: dict[str, Path]  # model digest -> ONNX file
    directory: Path
    crash: set[str] = field(default_factory=set)  # model digests whose server dies once it serves
    pods: dict[str, Pod] = field(default_factory=dict)  # by workload name
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _last_targets: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        config.load_kube_config(str(self.bed.kubeconfig))  # type: ignore[no-untyped-call]
        # Raw JSON replies (_preload_content=False): plain objects, as the operator sees them.
        self.apps: Any = client.AppsV1Api()
        self.core: Any = client.CoreV1Api()
        self.shadow = self.directory / "shadow"
        self.shadow.mkdir(parents=True)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def stable_urls(self) -> list[str]:
        """The EdgeModel's Service endpoints: ready pods on track stable."""
        return [
            p.server.url for p in list(self.pods.values()) if p.track == "stable" and p.server.process.poll() is None
        ]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception as error:
                self.errors.append(repr(error))
            time.sleep(0.3)

    def _sync(self) -> None:
        selector = f"edgeml.dev/edgemodel={NAME}"
        raw = self.apps.list_namespaced_deployment(self.namespace, label_selector=selector, _preload_content=False)
        workloads: list[dict[str, Any]] = json.loads(raw.data)["items"]
        seen = set()
        for workload in workloads:
            name, labels = workload["metadata"]["name"], workload["metadata"]["labels"]
            seen.add(name)
            if name not in self.pods:
                self._start(name, workload)
            self.pods[name].track = labels["edgeml.dev/track"]
        for name in set(self.pods) - seen:  # endpoints first, then a graceful stop, as for a deleted pod
            pod = self.pods.pop(name)
            pod.server.process.send_signal(signal.SIGTERM)
        self._targets()
        self._project()

    def _start(self, name: str, workload: dict[str, Any]) -> None:
        labels = workload["metadata"]["labels"]
        args = workload["spec"]["template"]["spec"]["containers"][0]["args"]
        revision, digest = labels["edgeml.dev/revision"], self._digest(name)
        shadow_config = Path(args[args.index("--shadow-config") + 1])
        server = Server(self.models[digest], NAME, "--revision", revision, "--shadow-config",
                        str(self.shadow / shadow_config.name), "--shadow-config-interval", "0.3",
                        log_dir=self.directory)  # fmt: skip
        self.pods[name] = Pod(server, revision, labels["edgeml.dev/class"], labels["edgeml.dev/track"])
        if digest in self.crash:
            server.process.kill()  # it was ready; now it is gone, as a crashed container before its restart

    def _digest(self, name: str) -> str:
        """The model digest the revision was built from, as its build Job (of the same name) names it."""
        job = get(self.bed, "job", name, "-n", self.namespace)
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        return str(args[args.index("--sha256") + 1])

    def _targets(self) -> None:
        targets = [
            (f"127.0.0.1:{pod.server.port}", {"namespace": self.namespace, "edgemodel": NAME, "class": pod.key,
                                              "revision": pod.revision, "track": pod.track})
            for pod in self.pods.values()
        ]  # fmt: skip
        if targets != self._last_targets:
            self.prometheus.set_targets(targets)
            self._last_targets = targets

    def _project(self) -> None:
        try:
            raw = self.core.read_namespaced_config_map(f"{NAME}-shadow", self.namespace, _preload_content=False)
            data: dict[str, str] = json.loads(raw.data).get("data") or {}
        except client.ApiException as error:
            if error.status != 404:
                raise
            data = {}
        services = {s.spec.cluster_ip: s.metadata.name for s in self.core.list_namespaced_service(self.namespace).items}
        for key, value in data.items():
            wanted = json.loads(value)
            host = wanted["url"].split("//", 1)[1].rsplit(":", 1)[0]  # the candidate Service's cluster IP
            service = services.get(host, "")
            if service in self.pods:
                wanted["url"] = self.pods[service].server.url
            target = self.shadow / key
            text = json.dumps(wanted)
            if not target.exists() or target.read_text() != text:
                staged = self.shadow / f".{key}.tmp"
                staged.write_text(text)
                staged.replace(target)
        for stale in self.shadow.glob("*.json"):
            if stale.name not in data:
                stale.unlink()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)
        for pod in self.pods.values():
            pod.server.process.send_signal(signal.SIGTERM)
            pod.server.process.wait(30)


class Clients(threading.Thread):
    """Live traffic to the stable endpoints for as long as the test runs."""

    def __init__(self, kubelet: Kubelet) -> None:
        super().__init__(daemon=True)
        self.kubelet, self.sent, self.stop = kubelet, 0, threading.Event()
        self.failed: list[str] = []

    def run(self) -> None:
        seed = 0
        while not self.stop.is_set():
            urls = self.kubelet.stable_urls()
            if not urls:
                time.sleep(0.05)
                continue
            seed += 1
            url = urls[seed % len(urls)]  # the Service spreads requests over its endpoints
            server = next((p.server for p in list(self.kubelet.pods.values()) if p.server.url == url), None)
            if server is None:
                continue
            status, body = server.request("POST", f"/v2/models/{NAME}/infer", _classifier_body(seed))
            self.sent += 1
            if status != 200:
                self.failed.append(f"{status} from {server.url}: {body[:200]!r}")
            time.sleep(0.02)


@dataclass
class Scene:
    bed: Testbed
    namespace: str
    kubelet: Kubelet
    clients: Clients
    digests: dict[str, str]  # "a", "a-again", "b", "crash" -> model digest
    decisions: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def scene(crd: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    directory = tmp_path_factory.mktemp("rollout")
    namespace = f"rollout-{os.getpid()}"
    crd.kubectl("create", "namespace", namespace)
    pool = Pool(crd, namespace)
    pool.add(X86_VNNI)  # a pool of one node: one hardware class
    model_a = onnx_models.tiny_classifier(directory / "a.onnx", seed=0)
    files = {
        "a": model_a,
        "a-again": _copy_of(model_a, directory / "a-again.onnx", "retrained, same answers"),
        "b": onnx_models.tiny_classifier(directory / "b.onnx", seed=7),  # same inputs and outputs, other answers
        "crash": _copy_of(model_a, directory / "crash.onnx", "a build whose server dies"),
    }
    digests = {case: sha256_file(path) for case, path in files.items()}
    models = {digests[case]: path for case, path in files.items()}
    prometheus = Prometheus(directory / "prometheus").start()
    operator = OperatorProcess(crd, directory / "operator.log", settings={
        "prometheus_url": prometheus.url, "analysis_seconds": "1",  # the status hold at its default
        "namespaces": json.dumps([namespace]),
    })  # fmt: skip
    operator.start()
    kubelet = Kubelet(crd, namespace, prometheus, models, directory, crash={digests["crash"]})
    clients = Clients(kubelet)
    clients.start()
    scene = Scene(crd, namespace, kubelet, clients, digests)
    yield scene
    clients.stop.set()
    clients.join(10)
    kubelet.stop()
    operator.stop()
    prometheus.stop()
    crd.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    pool.remove()
    print(f"[rollout] {clients.sent} live requests, {len(clients.failed)} failed; seconds of shadowing "
          f"before each decision: {json.dumps(scene.decisions)}")  # fmt: skip


def _apply(scene: Scene, digest: str) -> None:
    targets = pool_targets(scene.namespace)
    apply_edgemodel(scene.bed, scene.namespace, NAME, digest=digest, targets=targets, rollout=ROLLOUT)


def _class(scene: Scene) -> dict[str, Any]:
    status = get(scene.bed, "em", NAME, "-n", scene.namespace).get("status") or {}
    classes: list[dict[str, Any]] = status.get("classes") or [{}]
    return classes[0]


def _candidate(scene: Scene, digest: str, case: str) -> tuple[dict[str, Any], float]:
    """Apply a new revision, build it, and wait for the decision; returns the class status and seconds from
    the start of shadowing to the decision."""
    generation = get(scene.bed, "em", NAME, "-n", scene.namespace)["metadata"]["generation"]
    _apply(scene, digest)
    eventually(lambda: get(scene.bed, "em", NAME, "-n", scene.namespace)["status"]["observedGeneration"] > generation,
               what="the new generation observed")  # fmt: skip
    finish_builds(scene.bed, scene.namespace, count=1)
    try:
        eventually(lambda: _class(scene).get("state") == "Shadowing", timeout=60, what="shadowing started")
        decided = eventually(
            lambda: (entry := _class(scene)).get("shadow", {}).get("decision") in {"Promote", "Rollback"} and entry,
            timeout=90,
            what="a decision",
        )
    except AssertionError as error:
        shadow = scene.bed.kubectl("get", "configmap", f"{NAME}-shadow", "-n", scene.namespace, "-o", "json",
                                   check=False).stdout  # fmt: skip
        pods = {
            name: (p.revision, p.track, p.server.url, p.server.process.poll()) for name, p in scene.kubelet.pods.items()
        }
        raise AssertionError(
            f"{error}\nclass: {_class(scene)}\nkubelet errors: {scene.kubelet.errors[-3:]}\n"
            f"pods: {pods}\nshadow ConfigMap: {shadow}"
        ) from error
    shadow = decided["shadow"]
    started = datetime.datetime.fromisoformat(shadow["started"].replace("Z", "+00:00")).timestamp()
    seconds = time.time() - started
    scene.decisions[case] = round(seconds, 1)
    figures = {k: shadow.get(k) for k in ("requests", "agreement", "latencyRatio", "errorRate")}
    print(
        f"[rollout] {case}: {shadow['decision']} after {seconds:.1f}s of shadowing, {figures}: {shadow.get('reason')}"
    )
    return decided, seconds


def _no_failed_requests(scene: Scene) -> None:
    assert not scene.kubelet.errors, scene.kubelet.errors
    assert scene.clients.sent > 0
    assert not scene.clients.failed, scene.clients.failed[:5]


def test_the_first_revision_serves_without_shadowing(scene: Scene) -> None:
    _apply(scene, scene.digests["a"])
    finish_builds(scene.bed, scene.namespace, count=1)
    scene.bed.kubectl("wait", "-n", scene.namespace, "--for=condition=Ready", f"em/{NAME}", "--timeout=60s")
    eventually(lambda: scene.clients.sent > 20, what="live requests served")
    _no_failed_requests(scene)


def test_an_agreeing_candidate_is_promoted(scene: Scene) -> None:
    before = _class(scene)["revision"]
    decided, _ = _candidate(scene, scene.digests["a-again"], "agreeing")
    assert decided["shadow"]["decision"] == "Promote", decided
    assert decided["shadow"]["agreement"] == 1.0
    assert decided["shadow"]["requests"] >= MIN_REQUESTS
    scene.bed.kubectl("wait", "-n", scene.namespace, "--for=condition=Ready", f"em/{NAME}", "--timeout=60s")
    after = _class(scene)
    assert after["state"] == "Serving"
    assert after["revision"] != before
    eventually(lambda: len(scene.kubelet.pods) == 1, what="the old stable pods gone")
    events = scene.bed.kubectl("get", "events", "-n", scene.namespace, "--field-selector",
                               f"involvedObject.name={NAME}").stdout  # fmt: skip
    assert "Promoted" in events
    _no_failed_requests(scene)


def test_a_disagreeing_candidate_is_rolled_back_with_the_measured_agreement(scene: Scene) -> None:
    stable = _class(scene)["revision"]
    decided, _ = _candidate(scene, scene.digests["b"], "disagreeing")
    assert decided["state"] == "RolledBack", decided
    assert decided["shadow"]["agreement"] < MIN_AGREEMENT
    assert "agreement" in decided["message"]
    # The limits that decided each request, and why requests disagreed, as Prometheus measured them.
    assert "agreeing within maxRelativeError 0.05, minTop1Agreement 1" in decided["message"]
    assert "disagreed by first reason: " in decided["message"]
    assert decided["revision"] == stable  # the stable revision kept serving
    eventually(lambda: len(scene.kubelet.pods) == 1, what="the candidate removed")
    status = get(scene.bed, "em", NAME, "-n", scene.namespace)["status"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Degraded"]["reason"] == "RolledBack"
    assert f"{decided['shadow']['agreement']:.3f}" in conditions["Degraded"]["message"]
    _no_failed_requests(scene)


def test_a_crashing_candidate_is_rolled_back(scene: Scene) -> None:
    stable = _class(scene)["revision"]
    decided, _ = _candidate(scene, scene.digests["crash"], "crashing")
    assert decided["state"] == "RolledBack", decided
    assert decided["shadow"]["errorRate"] > MAX_ERROR_RATE
    assert "error rate" in decided["message"]
    assert decided["revision"] == stable
    _no_failed_requests(scene)
