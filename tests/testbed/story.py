"""`make demo`: the operator's story on this machine, with real nodes and simulated edge classes.

1. The test bed: a real control plane, KWOK nodes for the classes this machine lacks (Jetson, GPU
   workstations, ARM), one real node (kubelet, containerd, runc) for the class it has, and (by
   default in `make demo`) an arm64 node beside it under emulation.
2. The EdgeModel CRD, a registry on the node's address holding a real model (the PP-OCR text
   direction classifier shipped in the rapidocr-onnxruntime wheel), and the operator.
3. An EdgeModel for the real nodes' classes: a build Job per class really builds and validates the
   engine on its node, a pod per class really serves it, and live requests reach them through the
   EdgeModel's Service.
4. Revision 2, the same model re-exported: shadowed on real pods, agreement measured, promoted.
5. Revision 3, a retrain gone wrong: shadowed, disagreement measured, rolled back, while revision 2
   keeps serving.

`kubectl get em` and the EdgeModel's Events are shown at each step. The test bed and its node keep
running afterwards (the operator and the registry stop with the demo); `make testbed-down` stops them.

With `--arm64-node` (`make demo`'s default; `make demo ARM64_NODE=0` leaves it out) an arm64 node runs
beside the real node, under emulation (tests/testbed/node_arm64.py): the same EdgeModel then has two
real classes, amd64 and arm64, each with its own build Job, engine validated on its own architecture,
serving pods, shadow and decision; each class's build seconds, validation and latency are printed, the
arm64 class's labelled as measured under emulation.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgemodel_runtime.build import oci
from edgemodel_runtime.digests import sha256_file
from edgemodel_runtime.packaged import OCR_CLS
from tests.helpers import LiveRequests
from tests.integration.operators import OperatorProcess
from tests.testbed.cluster import Testbed
from tests.testbed.node import LABEL, NODE_IP, TOLERATION, RealNode, trust_registry
from tests.testbed.node_arm64 import Arm64Node
from tests.testbed.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
NAME, NAMESPACE, PORT = "text-direction", "edge-demo", 9000
SHAPE = (1, 3, 48, 192)
ROLLOUT = {
    "shadow": {"mirrorPercent": 100, "minRequests": 40, "duration": "5s"},
    "analysis": {"minAgreement": 0.99, "maxLatencyRatio": 20, "maxErrorRate": 0.05},
}
VALIDATION = {"cosine": "cosine", "top1Agreement": "top-1 agreement", "maxAbsError": "max abs error"}


def _say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def _show(bed: Testbed, *args: str) -> None:
    print(f"$ kubectl {' '.join(args)}")
    result = bed.kubectl(*args, check=False)
    print((result.stdout + result.stderr).rstrip(), flush=True)


def _models(directory: Path) -> dict[str, Path]:
    """Revision 1: the shipped model; 2: the same graph re-exported; 3: a bias that flips its answers."""
    original = OCR_CLS.path()
    again = onnx.load(str(original))
    again.doc_string = "re-exported: the same graph and weights"
    onnx.save(again, str(directory / "cls-reexported.onnx"))
    wrong = onnx.load(str(original))
    for node in wrong.graph.node:
        if node.op_type == "Constant" and node.output[0] == "fc_0.b_0":
            bias = numpy_helper.to_array(node.attribute[0].t).copy()
            bias[-1] += 4.0  # every line now reads as upside down
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(bias, node.attribute[0].t.name))
    wrong.doc_string = "a retrain gone wrong"
    onnx.save(wrong, str(directory / "cls-retrained.onnx"))
    return {"v1": original, "v2": directory / "cls-reexported.onnx", "v3": directory / "cls-retrained.onnx"}


def _image(seed: int) -> bytes:
    """One request: a random text-line-sized image."""
    data = np.random.default_rng(seed).uniform(-1, 1, size=SHAPE).astype(np.float32).round(3)
    return json.dumps({"inputs": [{"name": "x", "shape": list(SHAPE), "datatype": "FP32",
                                   "data": data.ravel().tolist()}]}).encode()  # fmt: skip


def _edgemodel(uri: str, sha256: str) -> dict[str, Any]:
    return {
        "apiVersion": "edgeml.dev/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "spec": {
            "model": {"uri": uri, "sha256": sha256},
            "inputs": [{"name": "x", "shape": list(SHAPE), "dtype": "float32"}],
            "targets": {"nodeSelector": {LABEL: "true"}, "tolerations": [TOLERATION]},
            "serving": {"port": PORT},
            "rollout": ROLLOUT,
        },
    }


def _status(bed: Testbed) -> dict[str, Any]:
    result = bed.kubectl("get", "em", NAME, "-n", NAMESPACE, "-o", "json", check=False)
    return dict(json.loads(result.stdout).get("status") or {}) if result.returncode == 0 else {}


def _follow(bed: Testbed, done: Any, classes: int = 1) -> list[dict[str, Any]]:
    """Print `kubectl get em` whenever it changes, until `done(class status)` holds for each of `classes`.

    Waits 600 s, 900 s with the arm64 class: its builds and its servers' start run under emulation.
    """
    timeout = 600 if classes == 1 else 900
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        line = bed.kubectl("get", "em", NAME, "-n", NAMESPACE, "--no-headers", check=False).stdout.strip()
        entries = list(_status(bed).get("classes") or [])
        state = line + "".join(f"\n      {e.get('key', '-')}: {e.get('state', '-')}: {e.get('message', '')}"
                               for e in entries)  # fmt: skip
        unaged = state.replace(line, " ".join(line.split()[:-1]), 1)  # AGE, the last column, changes every second
        if unaged != last:
            print(f"  {time.strftime('%H:%M:%S')}  {state}", flush=True)
            last = unaged
        if len(entries) >= classes and all(done(entry) for entry in entries):
            return entries
        time.sleep(1)
    raise TimeoutError(f"{NAME} did not get there in {timeout:.0f}s; see `kubectl describe em {NAME} -n {NAMESPACE}`")


def _number(value: Any) -> str:
    """A figure as printed: floats to four significant digits, anything else (None: not reported) as is."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _emulated(entry: dict[str, Any]) -> str:
    return " (arm64 under emulation: qemu-user-static)" if entry.get("key", "").startswith("arm64") else ""


def figures(entry: dict[str, Any]) -> str:
    """One class's build seconds, validation and latency, as its status reports them (pure).

    The arm64 class's are labelled as measured under emulation (they say nothing of a real arm64 board).
    """
    metrics = entry.get("metrics") or {}
    validation = ", ".join(
        f"{label} {_number(metrics[key])}" for key, label in VALIDATION.items() if metrics.get(key) is not None
    )
    verdict = metrics.get("validation") or "-"
    return (f"{entry.get('key')}{_emulated(entry)}: build {_number(entry.get('buildSeconds'))} s; validation "
            f"{verdict}{f' ({validation})' if validation else ''}; latency p50 {_number(metrics.get('latencyP50Ms'))} "
            f"ms, p99 {_number(metrics.get('latencyP99Ms'))} ms")  # fmt: skip


def shadow_figures(entry: dict[str, Any]) -> str:
    """One class's shadow evidence and decision (pure); the arm64 class's latency ratio is emulated."""
    shadow = entry.get("shadow") or {}
    return (f"{entry.get('key')}{_emulated(entry)}: {shadow.get('decision')}: {shadow.get('requests')} mirrored "
            f"requests, agreement {_number(shadow.get('agreement'))}, latency ratio "
            f"{_number(shadow.get('latencyRatio'))}, error rate {_number(shadow.get('errorRate'))}")  # fmt: skip


def _figures(entries: list[dict[str, Any]]) -> None:
    for entry in entries:
        print(f"  {figures(entry)}", flush=True)


def _cluster(directory: Path, arm64: bool) -> Testbed:
    bed = Testbed(directory)
    _say("1. the test bed: a real control plane, simulated edge classes, and this machine as a real node"
         + (" beside an arm64 node under emulation" if arm64 else ""))  # fmt: skip
    nodes = [RealNode(bed), *([Arm64Node(bed)] if arm64 else [])]
    for node in nodes:
        if not node.running():
            node.check()  # a refused start starts nothing
    started_here = not bed.running()
    if started_here:
        print(f"control plane and KWOK nodes up in {bed.start():.1f}s")
    started: list[RealNode] = []
    try:
        for node in nodes:
            if not node.running():
                timings = node.start(lambda m: print(f"  {m}", flush=True))
                started.append(node)
                print(f"{node.what} {node.spec.name} up in {timings['total']:.1f}s")
    except BaseException:
        for node in reversed(started):
            node.teardown()
        if started_here:
            bed.stop()
        raise
    _show(bed, "get", "nodes", "-L", f"kubernetes.io/arch,nvidia.com/gpu.product,{LABEL}")
    _show(bed, "apply", "--server-side", "-f", str(ROOT / "crds" / "edgemodel.yaml"))
    bed.kubectl("wait", "--for=condition=Established", "crd/edgemodels.edgeml.dev", "--timeout=60s")
    # A fresh namespace: an earlier run's EdgeModel would start this story at its end.
    bed.kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=true", "--timeout=120s")
    bed.kubectl("create", "namespace", NAMESPACE)
    bed.kubectl("label", "--overwrite", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted")
    return bed


def _operator(bed: Testbed, work: Path, registry: Registry) -> OperatorProcess:
    operator = OperatorProcess(bed, work / "operator.log", settings={
        "image_cpu": bed.state()["images"]["runtime-cpu"], "registry": f"{registry.address}/engines",
        "registry_insecure": "true", "namespaces": json.dumps([NAMESPACE]), "analysis_seconds": "1",
    })  # fmt: skip
    operator.start()
    print(f"  operator running (log: {work / 'operator.log'})")
    return operator


def _revisions(
    bed: Testbed, uris: dict[str, str], models: dict[str, Path], traffic: list[LiveRequests], classes: int
) -> None:
    _say("3. revision 1: a build Job per class builds and validates the engine on its node, pods serve it")
    bed.apply_objects([_edgemodel(uris["v1"], sha256_file(models["v1"]))])
    _figures(_follow(bed, lambda e: e.get("state") == "Serving", classes))
    _show(bed, "get", "jobs,pods", "-n", NAMESPACE, "-o", "wide")
    _show(bed, "logs", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=build", "--tail=12")
    _show(bed, "get", "em", NAME, "-n", NAMESPACE, "-o", "jsonpath={range .status.classes[*]}{@}{'\\n'}{end}")
    service = json.loads(bed.kubectl("get", "service", NAME, "-n", NAMESPACE, "-o", "json").stdout)
    url = f"http://{service['spec']['clusterIP']}:{PORT}"
    traffic.append(LiveRequests(f"{url}/v2/models/{NAME}/infer", _image, pause=0.05))
    traffic[0].start()
    print(f"  live traffic: text-line images to {url} (the EdgeModel's Service)")

    _say("4. revision 2, the same model re-exported: shadowed on real pods, then promoted")
    bed.apply_objects([_edgemodel(uris["v2"], sha256_file(models["v2"]))])
    for entry in _follow(bed, lambda e: (e.get("shadow") or {}).get("decision") in {"Promote", "Rollback"}, classes):
        print(f"  {shadow_figures(entry)}")
    _follow(bed, lambda e: e.get("state") == "Serving" and not _status(bed).get("revisions", {}).get("candidate"),
            classes)  # fmt: skip
    _show(bed, "get", "events", "-n", NAMESPACE, "--field-selector", f"involvedObject.name={NAME}")

    _say("5. revision 3, a retrain gone wrong: shadowed, measured, rolled back; revision 2 keeps serving")
    bed.apply_objects([_edgemodel(uris["v3"], sha256_file(models["v3"]))])
    for entry in _follow(bed, lambda e: e.get("state") == "RolledBack", classes):
        print(f"  {shadow_figures(entry)}")
    _show(bed, "get", "events", "-n", NAMESPACE, "--field-selector", f"involvedObject.name={NAME}")
    _show(bed, "get", "pods", "-n", NAMESPACE, "-o", "wide")
    _show(bed, "get", "em", "-n", NAMESPACE)
    print("  Ready False and phase Failed: the revision the spec asks for (3) was refused on evidence, and")
    print("  revision 2 keeps serving; kstatus and Argo CD read it as Failed until the spec changes.")


def main(directory: Path, arm64: bool = False) -> int:
    started = time.monotonic()
    bed = _cluster(directory, arm64)
    _say("2. a registry on the node's address with three revisions of a real model, and the operator")
    work = directory / "demo"
    work.mkdir(exist_ok=True)
    # A fresh registry, as the namespace is: an earlier run's engines would turn this run's builds into cache hits,
    # which report no build seconds, validation or latency.
    shutil.rmtree(work / "registry", ignore_errors=True)
    registry = Registry(work / "registry", host=NODE_IP)
    operator: OperatorProcess | None = None
    traffic: list[LiveRequests] = []
    try:
        registry.start()
        trust_registry(bed, registry.address)  # the kubelets pull the engines, which are images too
        os.environ["EDGEMODEL_INSECURE_REGISTRIES"] = registry.address
        uris, models = {}, _models(work)
        for revision, path in models.items():
            digest = oci.push(oci.parse_reference(f"{registry.address}/models/ppocr-cls"), [path], revision, {})
            uris[revision] = f"oci://{registry.address}/models/ppocr-cls@{digest}"
            print(f"  {revision}: {uris[revision]}  sha256 {sha256_file(path)[:16]}…")
        operator = _operator(bed, work, registry)
        _revisions(bed, uris, models, traffic, 2 if arm64 else 1)
    finally:
        for running in traffic:
            running.stop.set()
            running.join(15)
            print(f"\nlive requests: {running.sent} sent, {len(running.failed)} failed")
        if operator is not None:
            operator.stop()
        registry.stop()
    nodes = "its real nodes keep" if arm64 else "its real node keeps"
    print(f"\ndemo finished in {time.monotonic() - started:.0f}s. The test bed and {nodes} running:")
    print(f"  export KUBECONFIG={bed.kubeconfig}; stop them with `make testbed-down`.")
    return 0
