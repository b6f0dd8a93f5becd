"""The operator through outages: the apiserver restarting under it, and two replicas with peering.

These tests run their own operator processes (no module-wide one), so that exactly the replicas a
test starts act on its EdgeModels.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import eventually, get
from tests.integration.operators import OperatorProcess, apply_edgemodel, finish_builds
from tests.testbed.cluster import Testbed

pytestmark = pytest.mark.testbed
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def processes(crd: Testbed, tmp_path: Path) -> Iterator[list[OperatorProcess]]:
    started: list[OperatorProcess] = []
    yield started
    for process in started:
        process.stop()


def _start(bed: Testbed, processes: list[OperatorProcess], tmp_path: Path, **settings: str) -> OperatorProcess:
    process = OperatorProcess(bed, tmp_path / f"operator-{len(processes)}.log", settings=settings)
    process.start()
    processes.append(process)
    return process


def test_the_operator_converges_after_the_apiserver_restarts(
    crd: Testbed, namespace: str, processes: list[OperatorProcess], tmp_path: Path
) -> None:
    operator = _start(crd, processes, tmp_path)
    apply_edgemodel(crd, namespace, "ocr")
    eventually(lambda: len(get(crd, "jobs", "-n", namespace)["items"]) == 4, what="4 build Jobs")
    seconds = crd.restart("kube-apiserver", down_seconds=3)
    assert operator.process is not None
    assert operator.process.poll() is None, "the operator exited during the outage"
    finish_builds(crd, namespace)  # the builds finish after the restart: only re-established watches can see it
    crd.kubectl("wait", "-n", namespace, "--for=condition=Ready", "em/ocr", "--timeout=120s")
    assert len(get(crd, "jobs", "-n", namespace)["items"]) == 4
    assert len(get(crd, "deployments", "-n", namespace)["items"]) == 4
    print(f"apiserver back in {seconds:.1f}s")


def test_two_peered_replicas_act_once_and_the_standby_takes_over(
    crd: Testbed, namespace: str, processes: list[OperatorProcess], tmp_path: Path
) -> None:
    crd.kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "kopf-peering.yaml"))
    crd.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev", "--timeout=60s")
    peering = f"edgemodel-{namespace}"
    crd.apply_objects([{"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": peering}}])
    settings = {"peering": peering, "peering_lifetime_seconds": "8", "peering_check_seconds": "1"}
    low = _start(crd, processes, tmp_path, peering_priority="10", **settings)
    high = _start(crd, processes, tmp_path, peering_priority="20", **settings)
    eventually(lambda: "standing by" in low.log.read_text(), what="the lower-priority replica standing by")

    apply_edgemodel(crd, namespace, "ocr")
    eventually(lambda: len(get(crd, "jobs", "-n", namespace)["items"]) == 4, what="4 build Jobs")
    time.sleep(3)
    assert len(get(crd, "jobs", "-n", namespace)["items"]) == 4
    events = get(crd, "events", "-n", namespace, "--field-selector", "reason=BuildStarted")["items"]
    assert len(events) == 4  # one replica acted: one Event per build, not two

    high.kill()
    started = time.monotonic()
    apply_edgemodel(crd, namespace, "second")
    eventually(
        lambda: len(get(crd, "jobs", "-n", namespace, "-l", "edgeml.dev/edgemodel=second")["items"]) == 4,
        timeout=60,
        what="the standby replica building the EdgeModel applied after the active one died",
    )
    print(f"standby took over in {time.monotonic() - started:.1f}s (peering lifetime 8s)")
    finish_builds(crd, namespace, count=8)
    crd.kubectl("wait", "-n", namespace, "--for=condition=Ready", "em/ocr", "em/second", "--timeout=60s")
