"""Benchmark the operator at fleet scale, in three shapes, each on a fresh test bed.

Every shape starts a fresh test bed (real apiserver, etcd, controller-manager, scheduler; KWOK nodes
sized to hold the pods), runs the operator as a real process, and plays the builder: once the build
pods run, it finishes them with a build report (as `edgemodel build` would through its termination
log). Every shape measures:

- CPU seconds per process over the run, from /proc/<pid>/stat (user + system): the operator,
  kube-apiserver, etcd, kube-controller-manager, kube-scheduler and KWOK, and the operator's share
  of the control plane's (goal: <= 10% at 1,000 EdgeModels);
- the operator's latency from a build Job's completion to its workload written (the Deployment of
  the same (revision, class) name appearing in a watch), p50 and p99 (goal: p99 < 1 s);
- the operator's peak RSS (VmHWM; goal: <= 150 MB at 1,000 EdgeModels).

Shapes:

- `fleet` (`--counts`, default 100 300 1000): N EdgeModels over the default 6 nodes of 4 classes;
  also seconds from the last build completing to the last EdgeModel Ready, EdgeModel writes per
  generation (from the apiserver's own request counter) and operator writes per EdgeModel;
- `classes` (`--class-nodes`, default 1000): one EdgeModel over that many nodes in 20 classes;
- `flap` (`--flap-edgemodels` 50, `--flap-nodes` 100, `--flap-rounds` 3): EdgeModels Ready over
  nodes of 4 classes, then every node made NotReady (its agent stops after reporting so, as a
  kubelet's would) and Ready again, round after round: counts the workloads, Jobs and Services
  deleted and the Jobs created meanwhile (goal: none), and the reconciles and EdgeModel writes.

`--operator-path DIR` runs the operator from another source tree (DIR/operator and DIR/runtime go
first on its PYTHONPATH), e.g. an older commit unpacked with `git archive`, to compare side by side.
With BENCH_OPERATOR_PROFILE=PATH set, the operator runs under cProfile and leaves PATH.<shape-size>.
The controller-manager and scheduler run with a raised client rate limit (--kube-api-qps), as a
control plane sized for thousands of objects would. The last line printed is one JSON object.

    .venv/bin/python bench/operator.py [--shapes fleet classes flap] [--counts 100 300 1000] [--workers 4]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from kubernetes import client, config, watch  # noqa: E402

from tests.helpers import EXIT_CODE, MESSAGE, free_port  # noqa: E402
from tests.testbed.cluster import COMPONENTS, Testbed  # noqa: E402
from tests.testbed.nodes import CLASSES, DEFAULT_NODES, KWOK_ANNOTATION, NodeClass, build_node  # noqa: E402

EDGEMODEL = str(Path(sys.executable).parent / "edgemodel")
NAMESPACE = "fleet"
DIGEST = "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"
REPORT = json.dumps({
    "v": 1, "status": "built", "exitCode": 0, "cacheKey": "bench", "precision": "fp32",
    "artifact": {"reference": f"oci://127.0.0.1:5000/engines/bench@sha256:{'ab' * 32}"}, "buildSeconds": 1.0,
})  # fmt: skip
GOALS = {"ready_after_builds_s": 20.0, "edgemodel_writes_per_generation": 2.0, "peak_rss_mb": 150.0}
ROOMY = {"pods": "10000", "cpu": "10000", "memory": "100Ti"}
CPUID = "feature.node.kubernetes.io/cpu-cpuid."
TWENTY_FEATURES = ("AVX2", "AVX512F", "AVX512VNNI", "AVX512BF16", "AMXINT8")  # 5 bits: 20 of 32 subsets used
TICKS = os.sysconf("SC_CLK_TCK")


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _roomy(node: dict[str, Any]) -> dict[str, Any]:
    for name in ("capacity", "allocatable"):
        node["status"][name] |= ROOMY
        if "nvidia.com/gpu" in node["status"][name]:
            node["status"][name]["nvidia.com/gpu"] = "10000"
    return node


def default_nodes() -> list[dict[str, Any]]:
    """The default six nodes of four classes, with room for thousands of (simulated) pods."""
    return [_roomy(build_node(name, node_class)) for name, node_class in DEFAULT_NODES]


def twenty_class_nodes(count: int) -> list[dict[str, Any]]:
    """`count` amd64 nodes in 20 classes: each class a distinct set of the CPU features that split classes."""
    kinds = []
    for index in range(20):
        features = [f for bit, f in enumerate(TWENTY_FEATURES) if (index + 1) >> bit & 1]
        labels = {f"{CPUID}{f}": "true" for f in features} | {"node.kubernetes.io/instance-type": f"edge-{index}"}
        kinds.append(NodeClass(name=f"c{index:02d}", arch="amd64", labels=labels, capacity=dict(ROOMY)))
    return [_roomy(build_node(f"n{i:04d}-{kinds[i % 20].name}", kinds[i % 20])) for i in range(count)]


def four_class_nodes(count: int) -> list[dict[str, Any]]:
    return [_roomy(build_node(f"f{i:04d}", CLASSES[i % len(CLASSES)])) for i in range(count)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (/proc/<pid>/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


class Watcher(threading.Thread):
    """Calls `seen(type, object, monotonic time)` for every event of one kind in NAMESPACE."""

    def __init__(self, list_fn: Any, seen: Callable[[str, Any, float], None]) -> None:
        super().__init__(daemon=True)
        self.list_fn, self.seen = list_fn, seen
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            stream = watch.Watch()  # type: ignore[no-untyped-call]
            try:
                events = stream.stream(self.list_fn, NAMESPACE, timeout_seconds=30, _request_timeout=60)  # type: ignore[no-untyped-call]
                for event in events:
                    self.seen(event["type"], event["object"], time.monotonic())
                    if self.stop.is_set():
                        break
            except Exception as error:  # a dropped watch is restarted; its events are listed again
                _log(f"watch restarted: {error}")


def _name(obj: Any) -> str:
    return str(obj["metadata"]["name"] if isinstance(obj, dict) else obj.metadata.name)


def _job_complete(job: Any) -> bool:
    return any(c.type == "Complete" and c.status == "True" for c in (job.status.conditions or []))


def _ready(em: dict[str, Any]) -> bool:
    conditions = (em.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


@dataclass
class Recorder:
    """What the watches saw: first times per name."""

    complete: dict[str, float] = field(default_factory=dict)  # Job name -> completed
    workloads: dict[str, float] = field(default_factory=dict)  # Deployment name -> first seen
    ready: dict[str, float] = field(default_factory=dict)  # EdgeModel name -> first Ready

    def job(self, kind_type: str, job: Any, at: float) -> None:
        if _name(job) not in self.complete and _job_complete(job):
            self.complete[_name(job)] = at

    def deployment(self, kind_type: str, obj: Any, at: float) -> None:
        self.workloads.setdefault(_name(obj), at)

    def edgemodel(self, kind_type: str, obj: Any, at: float) -> None:
        if _name(obj) not in self.ready and _ready(obj):
            self.ready[_name(obj)] = at

    def build_to_workload(self) -> list[float]:
        """Seconds from each build Job's completion to its workload's first appearance."""
        return [self.workloads[n] - t for n, t in self.complete.items() if n in self.workloads]


@dataclass
class Bed:
    """A running test bed, the operator, the API clients and the watches of one shape."""

    bed: Testbed
    operator: subprocess.Popen[bytes]
    metrics_port: int
    api: Any
    recorder: Recorder
    watchers: list[Watcher]

    @property
    def core(self) -> Any:
        return client.CoreV1Api(self.api)

    @property
    def custom(self) -> Any:
        return client.CustomObjectsApi(self.api)

    def pids(self) -> dict[str, int]:
        found: dict[str, int] = {name: int(pid) for name, pid in self.bed.state()["pids"].items() if name in COMPONENTS}
        return {"operator": self.operator.pid} | found

    def cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids().items()}

    def operator_metric(self, prefix: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))

    def children(self) -> dict[str, set[str]]:
        """UIDs of the workloads, Jobs and Services in NAMESPACE now."""
        listed = {
            "Deployment": client.AppsV1Api(self.api).list_namespaced_deployment(NAMESPACE),
            "Job": client.BatchV1Api(self.api).list_namespaced_job(NAMESPACE),
            "Service": self.core.list_namespaced_service(NAMESPACE),
        }
        return {kind: {str(o.metadata.uid) for o in found.items} for kind, found in listed.items()}

    def edgemodel_writes(self) -> int:
        """Writes to EdgeModels and their status, as counted by the apiserver itself."""
        text = self.bed.kubectl("get", "--raw", "/metrics").stdout
        total = 0
        for line in text.splitlines():
            ours = line.startswith("apiserver_request_total{") and 'resource="edgemodels"' in line
            if ours and re.search(r'verb="(PATCH|UPDATE|APPLY)"', line):
                total += int(float(line.rsplit(" ", 1)[1]))
        return total

    def create_edgemodels(self, count: int) -> None:
        def create(index: int) -> None:
            body = {
                "apiVersion": "edgeml.dev/v1alpha1",
                "kind": "EdgeModel",
                "metadata": {"name": f"model-{index:04d}"},
                "spec": {"model": {"uri": "oci://registry.local:5000/models/det:v4", "sha256": DIGEST}},
            }
            self.custom.create_namespaced_custom_object("edgeml.dev", "v1alpha1", NAMESPACE, "edgemodels", body)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(create, range(count)))

    def finish_builds(self, expected: int, started: float) -> float:
        """Wait for `expected` running build pods, finish them all; seconds from `started` until they ran."""
        selector = "app.kubernetes.io/component=build"
        while True:
            pods = self.core.list_namespaced_pod(NAMESPACE, label_selector=selector).items
            running = [p for p in pods if p.status is not None and p.status.phase == "Running"]
            if len(running) == expected:
                break
            if time.monotonic() - started > 1800:
                raise RuntimeError(f"only {len(running)}/{expected} build pods running after 30 min")
            time.sleep(2)
        all_running = time.monotonic() - started

        def finish(pod: Any) -> None:
            patch = {"metadata": {"annotations": {EXIT_CODE: "0", MESSAGE: REPORT}}}
            self.core.patch_namespaced_pod(pod.metadata.name, NAMESPACE, patch)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(finish, running))
        return all_running

    def wait_ready(self, count: int, jobs: int) -> float:
        deadline = time.monotonic() + 1800
        while len(self.recorder.ready) < count or len(self.recorder.complete) < jobs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(self.recorder.ready)}/{count} EdgeModels Ready 30 min after the builds")
            time.sleep(0.5)
        return max(self.recorder.ready.values())


def _add_nodes(core: Any, nodes: list[dict[str, Any]]) -> None:
    """Create `nodes` (status included, as the test bed does) and wait until KWOK reports them all Ready."""
    if not nodes:
        return

    def create(node: dict[str, Any]) -> None:
        core.create_node({k: v for k, v in node.items() if k != "status"})
        core.patch_node_status(node["metadata"]["name"], {"status": node["status"]})

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(create, nodes))
    names = {n["metadata"]["name"] for n in nodes}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        ready = {
            n.metadata.name
            for n in core.list_node().items
            if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
        }
        if names <= ready:
            return
        time.sleep(2)
    raise RuntimeError(f"{len(names - ready)} nodes not Ready after 10 min")


@contextmanager
def test_bed(
    label: str, nodes: list[dict[str, Any]], workers: int, qps: int, operator_path: str | None
) -> Iterator[Bed]:
    directory = Path(tempfile.mkdtemp(prefix=f"edgemodel-bench-{label}-"))
    bed = Testbed(directory, client_qps=qps)
    _log(f"{label}: starting a test bed with {len(nodes)} nodes in {directory}")
    bed.start(nodes=nodes[:20])  # the rest through the API below: one kubectl apply of 1,000 nodes times out
    operator: subprocess.Popen[bytes] | None = None
    watchers: list[Watcher] = []
    try:
        bed.kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "edgemodel.yaml"))
        for _ in range(30):  # a CRD just created may have no conditions yet: kubectl wait then fails at once
            wait = ("wait", "--for=condition=Established", "crd/edgemodels.edgeml.dev", "--timeout=50s")
            if bed.kubectl(*wait, check=False).returncode == 0:
                break
            time.sleep(1)
        bed.kubectl("create", "namespace", NAMESPACE)
        config.load_kube_config(str(bed.kubeconfig))  # type: ignore[no-untyped-call]
        api = client.ApiClient()
        api.configuration.connection_pool_maxsize = 32
        _add_nodes(client.CoreV1Api(api), nodes[20:])
        metrics_port = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(bed.kubeconfig),
            "EDGEMODEL_HEALTH_HOST": "127.0.0.1",
            "EDGEMODEL_HEALTH_PORT": str(free_port()),
            "EDGEMODEL_METRICS_HOST": "127.0.0.1",
            "EDGEMODEL_METRICS_PORT": str(metrics_port),
            "EDGEMODEL_WORKERS": str(workers),
        }
        if operator_path:
            source = Path(operator_path)
            env["PYTHONPATH"] = os.pathsep.join([str(source / "operator"), str(source / "runtime")])
        log = (directory / "operator.log").open("wb")
        command = [EDGEMODEL, "operator"]
        if profile := os.environ.get("BENCH_OPERATOR_PROFILE"):  # cProfile of the operator's main thread
            command = [sys.executable, "-m", "cProfile", "-o", f"{profile}.{label}", *command]
        operator = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        time.sleep(3)
        recorder = Recorder()
        custom = client.CustomObjectsApi(api)
        watchers = [
            Watcher(client.BatchV1Api(api).list_namespaced_job, recorder.job),
            Watcher(client.AppsV1Api(api).list_namespaced_deployment, recorder.deployment),
            Watcher(
                lambda ns, **kw: custom.list_namespaced_custom_object("edgeml.dev", "v1alpha1", ns, "edgemodels", **kw),
                recorder.edgemodel,
            ),
        ]
        for watcher in watchers:
            watcher.start()
        yield Bed(bed, operator, metrics_port, api, recorder, watchers)
    finally:
        for watcher in watchers:
            watcher.stop.set()
        if operator is not None:
            operator.terminate()
            operator.wait(30)
        bed.stop()


def _figures(bench: Bed, cpu_before: dict[str, float]) -> dict[str, Any]:
    """CPU per process since `cpu_before`, the operator's share of the control plane's, latency and RSS."""
    after = bench.cpu()
    cpu = {name: round(after[name] - cpu_before.get(name, 0.0), 1) for name in after}
    control_plane = sum(v for k, v in cpu.items() if k != "operator")
    latencies = bench.recorder.build_to_workload()
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    return {
        "cpu_s": cpu,
        "operator_cpu_share_of_control_plane": round(cpu["operator"] / control_plane, 3) if control_plane else None,
        "build_to_workload_p50_s": None if p50 is None else round(p50, 3),
        "build_to_workload_p99_s": None if p99 is None else round(p99, 3),
        "peak_rss_mb": round(peak_rss_mb(bench.operator.pid), 1),
    }


def run_fleet(count: int, workers: int, qps: int, operator_path: str | None) -> dict[str, Any]:
    with test_bed(f"fleet-{count}", default_nodes(), workers, qps, operator_path) as bench:
        writes_before = bench.edgemodel_writes()
        cpu_before = bench.cpu()
        started = time.monotonic()
        bench.create_edgemodels(count)
        _log(f"fleet N={count}: created in {time.monotonic() - started:.1f}s")
        expected = 4 * count
        all_running = bench.finish_builds(expected, started)
        _log(f"fleet N={count}: {expected} build pods ran {all_running:.1f}s after the first create; finished")
        ready = bench.wait_ready(count, expected)
        builds_done = max(bench.recorder.complete.values())
        time.sleep(3)  # writes still in flight are counted too
        result = {
            "shape": "fleet",
            "edgemodels": count,
            "build_pods_running_s": round(all_running, 1),
            "ready_after_builds_s": round(ready - builds_done, 1),
            "edgemodel_writes_per_generation": round((bench.edgemodel_writes() - writes_before) / count, 2),
            "operator_writes_per_edgemodel": round(
                bench.operator_metric("edgemodel_operator_api_writes_total{") / count, 2
            ),
        } | _figures(bench, cpu_before)
        _log(json.dumps(result))
        return result


def run_classes(nodes: int, workers: int, qps: int, operator_path: str | None) -> dict[str, Any]:
    with test_bed(f"classes-{nodes}", twenty_class_nodes(nodes), workers, qps, operator_path) as bench:
        cpu_before = bench.cpu()
        started = time.monotonic()
        bench.create_edgemodels(1)
        all_running = bench.finish_builds(20, started)
        _log(f"classes {nodes} nodes: 20 build pods ran {all_running:.1f}s after the create; finished")
        ready = bench.wait_ready(1, 20)
        result = {
            "shape": "classes",
            "nodes": nodes,
            "classes": 20,
            "build_pods_running_s": round(all_running, 1),
            "ready_after_create_s": round(ready - started, 1),
        } | _figures(bench, cpu_before)
        _log(json.dumps(result))
        return result


def _set_ready(bench: Bed, name: str, ready: bool) -> None:
    """NotReady: the node's agent stops (KWOK lets go of it) after reporting NotReady; Ready: KWOK takes it back."""
    if ready:
        bench.core.patch_node(name, {"metadata": {"annotations": {KWOK_ANNOTATION: "fake"}}})
        return
    bench.core.patch_node(name, {"metadata": {"annotations": {KWOK_ANNOTATION: None}}})
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    condition = {"type": "Ready", "status": "False", "reason": "KubeletNotReady", "message": "flapping (bench)",
                 "lastHeartbeatTime": now, "lastTransitionTime": now}  # fmt: skip
    bench.core.patch_node_status(name, {"status": {"conditions": [condition]}})


def run_flap(
    count: int, nodes: int, rounds: int, *, workers: int, qps: int, operator_path: str | None
) -> dict[str, Any]:
    with test_bed(f"flap-{count}x{nodes}", four_class_nodes(nodes), workers, qps, operator_path) as bench:
        started = time.monotonic()
        bench.create_edgemodels(count)
        bench.finish_builds(4 * count, started)
        bench.wait_ready(count, 4 * count)
        time.sleep(5)  # the last status writes of the rollout
        _log(f"flap: {count} EdgeModels Ready over {nodes} nodes; flapping {rounds} rounds")
        children = bench.children()
        cpu_before = bench.cpu()
        reconciles = bench.operator_metric("edgemodel_operator_reconciles_total{")
        writes = bench.edgemodel_writes()
        names = [_name(n) for n in bench.core.list_node(label_selector="type=kwok").items]
        flap_started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            for _ in range(rounds):
                list(pool.map(lambda n: _set_ready(bench, n, False), names))
                time.sleep(5)
                list(pool.map(lambda n: _set_ready(bench, n, True), names))
                time.sleep(5)
        time.sleep(15)  # what the flaps queued, done
        after = bench.children()

        result = {
            "shape": "flap",
            "edgemodels": count,
            "nodes": nodes,
            "rounds": rounds,
            "flap_s": round(time.monotonic() - flap_started, 1),
            "deleted": {kind: len(children[kind] - after[kind]) for kind in children},
            "jobs_created": len(after["Job"] - children["Job"]),
            "reconciles": round(bench.operator_metric("edgemodel_operator_reconciles_total{") - reconciles),
            "edgemodel_writes": bench.edgemodel_writes() - writes,
        } | _figures(bench, cpu_before)
        result.pop("build_to_workload_p50_s")
        result.pop("build_to_workload_p99_s")
        _log(json.dumps(result))
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes", nargs="+", choices=["fleet", "classes", "flap"], default=["fleet", "classes", "flap"]
    )
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 300, 1000], help="fleet: EdgeModels")
    parser.add_argument("--class-nodes", type=int, default=1000, help="classes: nodes in 20 classes")
    parser.add_argument("--flap-edgemodels", type=int, default=50)
    parser.add_argument("--flap-nodes", type=int, default=100)
    parser.add_argument("--flap-rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4, help="operator workers (EDGEMODEL_WORKERS)")
    parser.add_argument("--qps", type=int, default=500, help="controller-manager and scheduler --kube-api-qps")
    parser.add_argument("--operator-path", help="run the operator from this source tree (see above)")
    args = parser.parse_args()
    results = []
    if "fleet" in args.shapes:
        results += [run_fleet(n, args.workers, args.qps, args.operator_path) for n in args.counts]
    if "classes" in args.shapes:
        results.append(run_classes(args.class_nodes, args.workers, args.qps, args.operator_path))
    if "flap" in args.shapes:
        options = {"workers": args.workers, "qps": args.qps, "operator_path": args.operator_path}
        results.append(run_flap(args.flap_edgemodels, args.flap_nodes, args.flap_rounds, **options))
    fleets = [r for r in results if r["shape"] == "fleet"]
    goals: dict[str, Any] = {}
    if fleets:
        largest = fleets[-1]
        goals = {key: {"goal": limit, "measured": largest[key], "met": largest[key] <= limit}
                 for key, limit in GOALS.items()}  # fmt: skip
        share, p99 = largest["operator_cpu_share_of_control_plane"], largest["build_to_workload_p99_s"]
        goals["operator_cpu_share_of_control_plane"] = {"goal": 0.10, "measured": share,
                                                        "met": share is not None and share <= 0.10}  # fmt: skip
        goals["build_to_workload_p99_s"] = {"goal": 1.0, "measured": p99, "met": p99 is not None and p99 < 1.0}
    for flap in (r for r in results if r["shape"] == "flap"):
        churn = sum(flap["deleted"].values()) + flap["jobs_created"]
        goals["flap_deletions_and_rebuilds"] = {"goal": 0, "measured": churn, "met": churn == 0}
    print(json.dumps({"machine": f"{os.cpu_count()} cores", "operator_path": args.operator_path or "this tree",
                      "results": results, "goals": goals}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
