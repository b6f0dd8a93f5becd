"""Benchmark the operator on a fleet: N EdgeModels on KWOK nodes of 4 hardware classes.

For each N (default 100, 300 and 1000) a fresh test bed starts (real apiserver, etcd,
controller-manager, scheduler; KWOK nodes sized to hold the pods), the operator runs as a real
process, N EdgeModels are created, and the benchmark plays the builder: once every build pod runs,
it finishes them all with a build report (as `edgemodel build` would through its termination log).
Measured per N:

- seconds from the last build Job completing to the last EdgeModel Ready (goal: <= 20 s at 1000),
  and, within it, until the operator had created every Deployment;
- EdgeModel writes (PATCH/PUT of edgemodels and their status, from the apiserver's own request
  counter) per EdgeModel per generation (goal: <= 2); all operator writes per EdgeModel beside it;
- the operator's peak RSS (VmHWM; goal: <= 150 MB).

The controller-manager and scheduler run with a raised client rate limit (--kube-api-qps), as a
control plane sized for thousands of objects would. The last line printed is one JSON object.

    .venv/bin/python bench/operator.py [--counts 100 300 1000] [--workers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from kubernetes import client, config, watch  # noqa: E402

from tests.helpers import EXIT_CODE, MESSAGE, free_port  # noqa: E402
from tests.testbed.cluster import Testbed  # noqa: E402
from tests.testbed.nodes import DEFAULT_NODES, build_node  # noqa: E402

EDGEMODEL = str(Path(sys.executable).parent / "edgemodel")
NAMESPACE = "fleet"
DIGEST = "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"
REPORT = json.dumps({
    "v": 1, "status": "built", "exitCode": 0, "cacheKey": "bench", "precision": "fp32",
    "artifact": {"reference": f"oci://127.0.0.1:5000/engines/bench@sha256:{'ab' * 32}"}, "buildSeconds": 1.0,
})  # fmt: skip
GOALS = {"ready_after_builds_s": 20.0, "edgemodel_writes_per_generation": 2.0, "peak_rss_mb": 150.0}


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _nodes() -> list[dict[str, Any]]:
    """The default six nodes of four classes, with room for thousands of (simulated) pods."""
    nodes = []
    for name, node_class in DEFAULT_NODES:
        node = build_node(name, node_class)
        for field in ("capacity", "allocatable"):
            node["status"][field] |= {"pods": "10000", "cpu": "10000", "memory": "100Ti"}
            if "nvidia.com/gpu" in node["status"][field]:
                node["status"][field]["nvidia.com/gpu"] = "10000"
        nodes.append(node)
    return nodes


def _edgemodel_writes(bed: Testbed) -> int:
    """Writes to EdgeModels and their status, as counted by the apiserver itself."""
    text = bed.kubectl("get", "--raw", "/metrics").stdout
    total = 0
    for line in text.splitlines():
        ours = line.startswith("apiserver_request_total{") and 'resource="edgemodels"' in line
        if ours and re.search(r'verb="(PATCH|UPDATE|APPLY)"', line):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


class Watcher(threading.Thread):
    """Records when each object of a kind first met a condition, from a watch stream."""

    def __init__(self, list_fn: Any, done: Any) -> None:
        super().__init__(daemon=True)
        self.list_fn, self.done = list_fn, done
        self.times: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            stream = watch.Watch()  # type: ignore[no-untyped-call]
            try:
                events = stream.stream(self.list_fn, NAMESPACE, timeout_seconds=30, _request_timeout=60)  # type: ignore[no-untyped-call]
                for event in events:
                    obj = event["object"]
                    name = obj["metadata"]["name"] if isinstance(obj, dict) else obj.metadata.name
                    if name not in self.times and self.done(obj):
                        self.times[name] = time.monotonic()
                    if self.stop.is_set():
                        break
            except Exception as error:  # a dropped watch is restarted; its events are listed again
                _log(f"watch restarted: {error}")


def _job_complete(job: Any) -> bool:
    return any(c.type == "Complete" and c.status == "True" for c in (job.status.conditions or []))


def _ready(em: dict[str, Any]) -> bool:
    conditions = (em.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def run_fleet(count: int, workers: int, qps: int) -> dict[str, Any]:  # noqa: PLR0915 - one linear story
    directory = Path(tempfile.mkdtemp(prefix=f"edgemodel-bench-{count}-"))
    bed = Testbed(directory, client_qps=qps)
    _log(f"N={count}: starting a test bed in {directory}")
    bed.start(nodes=_nodes())
    operator: subprocess.Popen[bytes] | None = None
    try:
        bed.kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "edgemodel.yaml"))
        bed.kubectl("wait", "--for=condition=Established", "crd/edgemodels.edgeml.dev", "--timeout=60s")
        bed.kubectl("create", "namespace", NAMESPACE)
        config.load_kube_config(str(bed.kubeconfig))  # type: ignore[no-untyped-call]
        api = client.ApiClient()
        api.configuration.connection_pool_maxsize = 32
        core, batch, custom = client.CoreV1Api(api), client.BatchV1Api(api), client.CustomObjectsApi(api)
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
        log = (directory / "operator.log").open("wb")
        operator = subprocess.Popen([EDGEMODEL, "operator"], env=env, stdout=log, stderr=subprocess.STDOUT)
        time.sleep(3)
        writes_before = _edgemodel_writes(bed)

        jobs = Watcher(batch.list_namespaced_job, _job_complete)
        ems = Watcher(
            lambda ns, **kw: custom.list_namespaced_custom_object("edgeml.dev", "v1alpha1", ns, "edgemodels", **kw),
            _ready,
        )
        jobs.start()
        ems.start()

        started = time.monotonic()

        def create(index: int) -> None:
            body = {
                "apiVersion": "edgeml.dev/v1alpha1",
                "kind": "EdgeModel",
                "metadata": {"name": f"model-{index:04d}"},
                "spec": {"model": {"uri": "oci://registry.local:5000/models/det:v4", "sha256": DIGEST}},
            }
            custom.create_namespaced_custom_object("edgeml.dev", "v1alpha1", NAMESPACE, "edgemodels", body)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(create, range(count)))
        _log(f"N={count}: {count} EdgeModels created in {time.monotonic() - started:.1f}s")

        expected = 4 * count
        selector = "app.kubernetes.io/component=build"
        while True:
            pods = core.list_namespaced_pod(NAMESPACE, label_selector=selector).items
            running = [p for p in pods if p.status is not None and p.status.phase == "Running"]
            if len(running) == expected:
                break
            if time.monotonic() - started > 1800:
                raise RuntimeError(f"only {len(running)}/{expected} build pods running after 30 min")
            time.sleep(2)
        all_running = time.monotonic() - started
        _log(f"N={count}: {expected} build pods running {all_running:.1f}s after the first create")

        def finish(pod: Any) -> None:
            patch = {"metadata": {"annotations": {EXIT_CODE: "0", MESSAGE: REPORT}}}
            core.patch_namespaced_pod(pod.metadata.name, NAMESPACE, patch)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(finish, running))
        while len(jobs.times) < expected:
            time.sleep(0.5)
        builds_done = max(jobs.times.values())
        _log(f"N={count}: every build Job complete; waiting for Ready")
        deadline = time.monotonic() + 1800
        while len(ems.times) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(ems.times)}/{count} EdgeModels Ready 30 min after the builds")
            time.sleep(0.5)
        ready = max(ems.times.values())
        deployments = client.AppsV1Api(api).list_namespaced_deployment(NAMESPACE).items
        created = max(
            d.metadata.creation_timestamp.timestamp()
            for d in deployments
            if d.metadata and d.metadata.creation_timestamp
        )
        finished_wall = time.time() - (time.monotonic() - builds_done)
        time.sleep(3)  # writes still in flight are counted too
        edgemodel_writes = _edgemodel_writes(bed) - writes_before
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        operator_writes = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("edgemodel_operator_api_writes_total{")
        )
        jobs.stop.set()
        ems.stop.set()
        result = {
            "edgemodels": count,
            "build_pods_running_s": round(all_running, 1),
            "ready_after_builds_s": round(ready - builds_done, 1),
            "deployments_created_after_builds_s": round(max(0.0, created - finished_wall), 1),
            "edgemodel_writes_per_generation": round(edgemodel_writes / count, 2),
            "operator_writes_per_edgemodel": round(operator_writes / count, 2),
            "peak_rss_mb": round(_peak_rss_mb(operator.pid), 1),
        }
        _log(f"N={count}: {json.dumps(result)}")
        return result
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(30)
        bed.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--workers", type=int, default=4, help="operator workers (EDGEMODEL_WORKERS)")
    parser.add_argument("--qps", type=int, default=500, help="controller-manager and scheduler --kube-api-qps")
    args = parser.parse_args()
    results = [run_fleet(count, args.workers, args.qps) for count in args.counts]
    largest = results[-1]
    goals = {
        key: {"goal": limit, "measured": largest[key], "met": largest[key] <= limit} for key, limit in GOALS.items()
    }
    print(json.dumps({"machine": f"{os.cpu_count()} cores", "results": results, "goals_at_largest": goals}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
