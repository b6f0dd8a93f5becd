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
from tests.integration.operators import OperatorProcess, Pool, apply_edgemodel, finish_builds, pool_targets
from tests.testbed.cluster import Testbed
from tests.testbed.nodes import ARM64_CPU, X86_VNNI

pytestmark = pytest.mark.testbed
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def processes(crd: Testbed, tmp_path: Path) -> Iterator[list[OperatorProcess]]:
    started: list[OperatorProcess] = []
    yield started
    for process in started:
        process.stop()


@pytest.fixture
def pool(crd: Testbed, namespace: str) -> Iterator[Pool]:
    """Two CPU classes of this test's own: two builds per EdgeModel, no GPU other tests may hold."""
    nodes = Pool(crd, namespace)
    nodes.add(X86_VNNI)
    nodes.add(ARM64_CPU)
    yield nodes
    nodes.remove()


def _start(bed: Testbed, processes: list[OperatorProcess], tmp_path: Path, **settings: str) -> OperatorProcess:
    process = OperatorProcess(bed, tmp_path / f"operator-{len(processes)}.log", settings=settings)
    process.start()
    processes.append(process)
    return process


def test_the_operator_converges_after_the_apiserver_restarts(
    crd: Testbed, namespace: str, processes: list[OperatorProcess], tmp_path: Path, pool: Pool
) -> None:
    operator = _start(crd, processes, tmp_path)
    apply_edgemodel(crd, namespace, "ocr", targets=pool_targets(namespace))
    eventually(lambda: len(get(crd, "jobs", "-n", namespace)["items"]) == 2, what="2 build Jobs")
    seconds = crd.restart("kube-apiserver", down_seconds=3)
    assert operator.process is not None
    assert operator.process.poll() is None, "the operator exited during the outage"
    finish_builds(crd, namespace, count=2)  # they finish after the restart: only re-established watches see it
    crd.kubectl("wait", "-n", namespace, "--for=condition=Ready", "em/ocr", "--timeout=120s")
    assert len(get(crd, "jobs", "-n", namespace)["items"]) == 2
    assert len(get(crd, "deployments", "-n", namespace)["items"]) == 2
    print(f"apiserver back in {seconds:.1f}s")


def test_two_peered_replicas_act_once_and_the_standby_takes_over(
    crd: Testbed, namespace: str, processes: list[OperatorProcess], tmp_path: Path, pool: Pool
) -> None:
    crd.kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "kopf-peering.yaml"))
    crd.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev", "--timeout=60s")
    peering = f"edgemodel-{namespace}"
    crd.apply_objects([{"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": peering}}])
    settings = {"peering": peering, "peering_lifetime_seconds": "8", "peering_check_seconds": "1"}
    low = _start(crd, processes, tmp_path, peering_priority="10", **settings)
    high = _start(crd, processes, tmp_path, peering_priority="20", **settings)
    eventually(lambda: "standing by" in low.log.read_text(), what="the lower-priority replica standing by")

    apply_edgemodel(crd, namespace, "ocr", targets=pool_targets(namespace))
    eventually(lambda: len(get(crd, "jobs", "-n", namespace)["items"]) == 2, what="2 build Jobs")
    time.sleep(3)
    assert len(get(crd, "jobs", "-n", namespace)["items"]) == 2
    events = get(crd, "events", "-n", namespace, "--field-selector", "reason=BuildStarted")["items"]
    assert len(events) == 1  # one replica acted: one Event for the step (naming both classes), not two

    high.kill()
    started = time.monotonic()
    apply_edgemodel(crd, namespace, "second", targets=pool_targets(namespace))
    eventually(
        lambda: len(get(crd, "jobs", "-n", namespace, "-l", "edgeml.dev/edgemodel=second")["items"]) == 2,
        timeout=60,
        what="the standby replica building the EdgeModel applied after the active one died",
    )
    print(f"standby took over in {time.monotonic() - started:.1f}s (peering lifetime 8s)")
    finish_builds(crd, namespace, count=4)
    crd.kubectl("wait", "-n", namespace, "--for=condition=Ready", "em/ocr", "em/second", "--timeout=60s")


def test_a_replica_taking_over_forgets_what_was_deleted_while_it_stood_by(
    crd: Testbed, namespace: str, processes: list[OperatorProcess], tmp_path: Path, pool: Pool
) -> None:
    """The standby's watches are paused, so its indexes still hold what was deleted meanwhile: an EdgeModel
    deleted while the other replica acted, and a build Job deleted after that replica died (before the
    standby took over). Acting on those phantoms, it would write for an object that is gone and never
    rebuild the Job it believes exists."""
    crd.kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "kopf-peering.yaml"))
    crd.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev", "--timeout=60s")
    peering = f"edgemodel-{namespace}"
    crd.apply_objects([{"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": peering}}])
    settings = {"peering": peering, "peering_lifetime_seconds": "8", "peering_check_seconds": "1"}
    low = _start(crd, processes, tmp_path, peering_priority="10", **settings)
    eventually(lambda: "this replica is active" in low.log.read_text(), what="the only replica active")
    for name in ("gone", "kept"):
        apply_edgemodel(crd, namespace, name, targets=pool_targets(namespace))
    eventually(lambda: len(get(crd, "jobs", "-n", namespace)["items"]) == 4, what="4 build Jobs")
    high = _start(crd, processes, tmp_path, peering_priority="20", **settings)
    eventually(lambda: "standing by" in low.log.read_text(), what="the lower-priority replica standing by")
    crd.kubectl("delete", "em", "gone", "-n", namespace, "--wait=true", "--timeout=60s")
    eventually(lambda: len(get(crd, "jobs", "-n", namespace)["items"]) == 2, what="the deleted EdgeModel's Jobs gone")
    high.kill()
    job = get(crd, "jobs", "-n", namespace, "-l", "edgeml.dev/edgemodel=kept")["items"][0]["metadata"]
    crd.kubectl("delete", "job", job["name"], "-n", namespace, "--wait=true", "--timeout=30s")  # nobody acts now
    eventually(lambda: low.log.read_text().count("this replica is active") == 2, timeout=60, what="the takeover")
    rebuilt = eventually(
        lambda: [j for j in get(crd, "jobs", "-n", namespace)["items"] if j["metadata"]["name"] == job["name"]],
        timeout=30,
        what="the Job deleted before the takeover built again",
    )
    assert rebuilt[0]["metadata"]["uid"] != job["uid"]
    leftovers = get(crd, "configmaps,jobs", "-n", namespace, "-l", "edgeml.dev/edgemodel=gone")["items"]
    assert not leftovers, [o["metadata"]["name"] for o in leftovers]
    failed = [line for line in low.log.read_text().splitlines() if f"reconciling {namespace}/gone failed" in line]
    assert not failed, failed
