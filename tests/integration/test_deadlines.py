"""Deadlines and requests on the test bed: a candidate that never becomes Ready is rolled back with its pods'
reason, a shadow that does not decide times out, the rollback annotation works before and during shadowing,
and a failed build is built again (on request, and after an infrastructure failure at the default backoff).

Real parts: the control plane and scheduler of the test bed, KWOK nodes of this module's own pool (one CPU
class), the operator process at its default settings but the namespace it watches, the Prometheus it reads
and, where a test says so, the runtime image it serves with, and Debian's Prometheus. The pod statuses of
an image that cannot be pulled and of a server that exits at start are KWOK's stages (kwok-stages.yaml),
field for field what a kubelet writes; an unschedulable candidate is the real scheduler's verdict.

The progress deadline is 30 s here (its default, 10m, is exercised by tests/unit/test_deadlines.py on the
same planner), and the shadow timeout 5 s or 30 s (its default, 1h, likewise). Evidence that cannot be
read is a Prometheus URL where nothing listens (a monitoring outage).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgemodel_operator.api.spec import EdgeModelSpec
from edgemodel_operator.builders import revision_of
from tests.helpers import EXIT_CODE, MESSAGE, eventually, free_port, get
from tests.integration.operators import OperatorProcess, Pool, apply_edgemodel, finish_builds, pool_targets
from tests.integration.test_decisions import StablePods
from tests.testbed.cluster import Testbed
from tests.testbed.nodes import X86_VNNI
from tests.testbed.prometheus import Prometheus

pytestmark = pytest.mark.testbed
NAME = "dl"
UNPULLABLE = "testbed.invalid/edgemodel-runtime:unpullable"  # see kwok-stages.yaml
EXITS = "testbed.invalid/edgemodel-runtime:exits"
FAST = {"progressDeadline": "30s"}
HUGE = {"resources": {"requests": {"cpu": "512"}}}  # more CPU than any node of the test bed has


@dataclass
class Scene:
    bed: Testbed
    namespace: str
    directory: Path
    prometheus: Prometheus
    key: str = ""
    pods: StablePods | None = None
    operator: OperatorProcess | None = None
    digests: Iterator[str] = field(default_factory=lambda: iter(f"{n:064x}" for n in range(0xD1, 0x200)))

    def run_operator(self, image: str | None = None, *, prometheus_url: str | None = None) -> None:
        """(Re)start the operator; `image`: the runtime image it serves CPU classes with (default: the usual);
        `prometheus_url`: where it reads evidence (default: the scene's Prometheus)."""
        if self.operator is not None:
            self.operator.stop()
        url = prometheus_url or self.prometheus.url
        settings = {"namespaces": json.dumps([self.namespace]), "prometheus_url": url}
        self.operator = OperatorProcess(self.bed, self.directory / "operator.log",
                                        settings=settings | ({"image_cpu": image} if image else {}))  # fmt: skip
        self.operator.start()

    def apply(self, rollout: dict[str, Any] | None = None, **spec: Any) -> str:
        """Apply a new revision (a new model digest); returns the revision."""
        digest, targets = next(self.digests), pool_targets(self.namespace)
        apply_edgemodel(self.bed, self.namespace, NAME, digest=digest, targets=targets, rollout=rollout or {}, **spec)
        model = {"uri": "oci://registry.local:5000/models/det:v4", "sha256": digest}  # as apply_edgemodel writes it
        return revision_of(EdgeModelSpec.model_validate({"model": model, "targets": targets}))

    def entry(self) -> dict[str, Any]:
        status = get(self.bed, "em", NAME, "-n", self.namespace).get("status") or {}
        return next((e for e in status.get("classes") or [] if e["key"] == self.key), {})

    def events(self, reason: str, contains: str = "") -> list[dict[str, Any]]:
        items = get(self.bed, "events", "-n", self.namespace, "--field-selector", f"reason={reason}")["items"]
        return [e for e in items if contains in e["message"]]

    def candidates(self) -> list[str]:
        selector = f"edgeml.dev/edgemodel={NAME},edgeml.dev/track=candidate"
        return [
            d["metadata"]["name"] for d in get(self.bed, "deployments", "-n", self.namespace, "-l", selector)["items"]
        ]

    def annotate(self, name: str, value: str) -> None:
        self.bed.kubectl("annotate", "em", NAME, "-n", self.namespace, f"{name}={value}", "--overwrite")

    def rolled_back(self, revision: str, fragment: str) -> dict[str, Any]:
        """Wait for the Warning Event and the status of a rollback of `revision` whose reason holds `fragment`."""
        (event,) = eventually(lambda: self.events("RolledBack", revision), timeout=120, what=f"{revision} rolled back")
        assert event["type"] == "Warning"
        assert fragment in event["message"], event["message"]
        entry = eventually(lambda: (e := self.entry()).get("state") == "RolledBack" and e, timeout=60,
                           what="RolledBack in the status")  # fmt: skip
        assert fragment in entry["message"], entry
        eventually(lambda: not self.candidates(), timeout=30, what="the candidate removed")
        return dict(entry)


@pytest.fixture(scope="module")
def scene(crd: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    directory = tmp_path_factory.mktemp("deadlines")
    namespace = f"deadlines-{os.getpid()}"
    crd.kubectl("create", "namespace", namespace)
    pool = Pool(crd, namespace)
    pool.add(X86_VNNI)
    scene = Scene(crd, namespace, directory, Prometheus(directory / "prometheus").start())
    scene.run_operator()
    scene.apply(FAST)
    (job,) = finish_builds(crd, namespace, count=1)
    scene.key = job["metadata"]["labels"]["edgeml.dev/class"]
    crd.kubectl("wait", "-n", namespace, "--for=condition=Ready", f"em/{NAME}", "--timeout=60s")
    scene.pods = StablePods(scene.key, edgemodel=NAME)
    scene.prometheus.set_targets([scene.pods.target(namespace)])
    scene.prometheus.wait_until_up(scene.pods.target(namespace)[0])
    yield scene
    if scene.operator is not None:
        scene.operator.stop()
    scene.prometheus.stop()
    scene.pods.server.shutdown()
    crd.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    pool.remove()


def _build_pod(scene: Scene, revision: str) -> None:
    selector = f"edgeml.dev/revision={revision},app.kubernetes.io/component=build"
    eventually(lambda: get(scene.bed, "pods", "-n", scene.namespace, "-l", selector)["items"], what="the build pod")


def _built_by(scene: Scene, image: str | None, rollout: dict[str, Any], **spec: Any) -> str:
    """Apply a revision, let the operator at hand start its build, then finish the build under an operator
    that serves with `image` (a release with a broken runtime image); returns the revision."""
    revision = scene.apply(rollout, **spec)
    if image is not None:
        _build_pod(scene, revision)
        scene.run_operator(image)
    finish_builds(scene.bed, scene.namespace, count=1)
    return revision


def test_an_unschedulable_candidate_is_rolled_back_with_the_schedulers_message(scene: Scene) -> None:
    revision = _built_by(scene, None, FAST, serving=HUGE)
    entry = scene.rolled_back(revision, "Unschedulable: 0/")
    assert "Insufficient cpu" in entry["message"], entry
    assert entry["message"].endswith("not Ready within progressDeadline 30s")
    status = get(scene.bed, "em", NAME, "-n", scene.namespace)["status"]
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "RolledBack")
    assert "Insufficient cpu" in degraded["message"]
    assert entry["revision"] != revision  # the stable revision serves on
    assert entry["readyReplicas"] == 1


def test_a_candidate_whose_image_cannot_be_pulled_is_rolled_back_naming_the_image(scene: Scene) -> None:
    try:
        revision = _built_by(scene, UNPULLABLE, FAST)
        entry = scene.rolled_back(revision, f"ErrImagePull: image {UNPULLABLE} cannot be pulled")
        assert "no such host" in entry["message"]
    finally:
        scene.run_operator()


def test_a_crash_looping_candidate_is_rolled_back_with_its_last_exit(scene: Scene) -> None:
    try:
        revision = _built_by(scene, EXITS, FAST)
        scene.rolled_back(revision, "CrashLoopBackOff: container serve last exit: Error, exit code 1, restarted 3")
    finally:
        scene.run_operator()


def test_the_rollback_annotation_set_during_the_build_rolls_back_before_a_candidate_is_made(scene: Scene) -> None:
    revision = scene.apply({})
    _build_pod(scene, revision)
    scene.annotate("edgeml.dev/rollback", revision)
    finish_builds(scene.bed, scene.namespace, count=1)
    scene.rolled_back(revision, f"rolled back by edgeml.dev/rollback={revision} before shadowing")
    assert not scene.events("CandidateStarted", revision)  # never made


def test_the_rollback_annotation_works_while_the_candidate_waits_for_pods(scene: Scene) -> None:
    revision = _built_by(scene, None, {}, serving=HUGE)  # the default deadline: 10m
    eventually(scene.candidates, what="the candidate")
    scene.annotate("edgeml.dev/rollback", revision)
    entry = scene.rolled_back(revision, f"rolled back by edgeml.dev/rollback={revision} before shadowing")
    assert "Unschedulable" not in entry["message"]


def _shadowing(scene: Scene, rollout: dict[str, Any]) -> str:
    revision = _built_by(scene, None, rollout)
    eventually(lambda: scene.events("ShadowStarted", revision), what=f"{revision} shadowing")
    return revision


def test_the_rollback_annotation_works_while_shadowing_and_while_awaiting_approval(scene: Scene) -> None:
    assert scene.pods is not None
    slow = {"shadow": {"minRequests": 100000, "duration": "1s"}}
    revision = _shadowing(scene, slow)
    scene.annotate("edgeml.dev/rollback", revision)
    scene.rolled_back(revision, f"rolled back by edgeml.dev/rollback={revision}")

    waiting = {"shadow": {"minRequests": 10, "duration": "1s"}, "autoPromote": False}
    revision = _shadowing(scene, waiting)
    scene.pods.count(revision, agreed=20)
    eventually(lambda: (scene.entry().get("shadow") or {}).get("decision") == "AwaitingApproval", timeout=60,
               what="awaiting approval")  # fmt: skip
    scene.annotate("edgeml.dev/rollback", revision)
    scene.rolled_back(revision, f"rolled back by edgeml.dev/rollback={revision}")


def test_the_rollback_annotation_works_while_the_evidence_cannot_be_read(scene: Scene) -> None:
    scene.run_operator(prometheus_url=f"http://127.0.0.1:{free_port()}")  # a monitoring outage: nothing listens
    try:
        revision = _built_by(scene, None, {})
        eventually(lambda: "waiting for shadow evidence to be readable" in scene.entry().get("message", ""),
                   timeout=60, what="a ready candidate waiting for evidence")  # fmt: skip
        scene.annotate("edgeml.dev/rollback", revision)
        scene.rolled_back(revision, f"rolled back by edgeml.dev/rollback={revision} before shadowing")
    finally:
        scene.run_operator()


def test_the_rollback_annotation_works_on_a_failed_candidate_and_on_a_held_timeout(scene: Scene) -> None:
    assert scene.pods is not None
    revision = _shadowing(scene, {"shadow": {"minRequests": 10, "duration": "1s"}, "autoRollback": False})
    scene.pods.count(revision, errors=50)
    eventually(lambda: "failed; waiting for annotation edgeml.dev/rollback" in scene.entry().get("message", ""),
               timeout=60, what="a failed candidate waiting for a person")  # fmt: skip
    scene.annotate("edgeml.dev/rollback", revision)
    scene.rolled_back(revision, f"rolled back by edgeml.dev/rollback={revision}")

    held = {"shadow": {"minRequests": 100000, "duration": "1s", "timeout": "5s", "onTimeout": "Hold"}}
    revision = _shadowing(scene, held)
    (event,) = eventually(lambda: scene.events("ShadowTimeout", revision), timeout=60, what="the timeout held")
    assert event["type"] == "Warning"
    assert "held until a person sets edgeml.dev/promote or edgeml.dev/rollback" in event["message"]
    assert scene.candidates()  # still shadowing
    scene.annotate("edgeml.dev/rollback", revision)
    scene.rolled_back(revision, f"rolled back by edgeml.dev/rollback={revision}")


def test_a_shadow_that_does_not_decide_times_out_by_its_policy(scene: Scene) -> None:
    assert scene.pods is not None
    revision = _shadowing(scene, {"shadow": {"minRequests": 100000, "duration": "10s", "timeout": "30s"}})
    scene.pods.count(revision, agreed=12)
    entry = scene.rolled_back(revision, "ShadowTimeout: 12 of 100000 requests in 3")
    assert entry["message"].endswith("; onTimeout Rollback")


def _fail_build(scene: Scene, revision: str, exit_code: int, pods: int = 1) -> None:
    """Play the builder failing `pods` pods of the revision's Job in turn, with `exit_code` and its report."""
    report = json.dumps({"v": 1, "status": "failed", "exitCode": exit_code,
                         "reason": {3: "ToleranceMissed", 4: "InfrastructureFailure"}[exit_code],
                         "message": f"exit {exit_code} played by the test"})  # fmt: skip
    selector = f"edgeml.dev/revision={revision},app.kubernetes.io/component=build"
    done: set[str] = set()
    for _ in range(pods):
        pod = eventually(lambda: next((p for p in get(scene.bed, "pods", "-n", scene.namespace, "-l", selector)["items"]
                                       if p["status"].get("phase") == "Running"
                                       and p["metadata"]["name"] not in done), None),
                         timeout=120, what="a running build pod")  # fmt: skip
        done.add(pod["metadata"]["name"])
        scene.bed.kubectl("annotate", "pod", "-n", scene.namespace, pod["metadata"]["name"],
                          f"{EXIT_CODE}={exit_code}", f"{MESSAGE}={report}")  # fmt: skip


def _job_uid(scene: Scene, revision: str) -> str | None:
    jobs = get(scene.bed, "jobs", "-n", scene.namespace, "-l", f"edgeml.dev/revision={revision}")["items"]
    return str(jobs[0]["metadata"]["uid"]) if jobs else None


def test_a_failed_build_is_built_again_once_per_value_of_the_retry_annotation(scene: Scene) -> None:
    scene.annotate("edgeml.dev/retry-build", "before")  # left on the object: asks nothing of a later failure
    revision = scene.apply({})
    _fail_build(scene, revision, 3)
    eventually(lambda: scene.entry().get("state") == "Failed", timeout=60, what="Failed")
    failed = _job_uid(scene, revision)
    assert "retry" not in scene.entry()["message"]  # a model or validation failure waits for a person
    scene.annotate("edgeml.dev/retry-build", "1")
    eventually(lambda: (uid := _job_uid(scene, revision)) is not None and uid != failed, what="a new build Job")
    (event,) = scene.events("BuildRetried", revision)
    assert "as edgeml.dev/retry-build=1 asks" in event["message"]
    finish_builds(scene.bed, scene.namespace, count=1)
    eventually(lambda: scene.events("ShadowStarted", revision), what="the rebuilt candidate shadowing")


def test_an_infrastructure_failure_is_built_again_after_the_default_backoff(scene: Scene) -> None:
    revision = scene.apply({})
    _fail_build(scene, revision, 4, pods=3)  # the Job's own retries (backoffLimit 2) first
    entry = eventually(lambda: (e := scene.entry()).get("state") == "Failed" and e, timeout=120, what="Failed")
    assert "retry 1 of 5 at" in entry["message"], entry
    failed = _job_uid(scene, revision)
    eventually(lambda: (uid := _job_uid(scene, revision)) is not None and uid != failed, timeout=90,
               what="a new build Job after 30 s")  # fmt: skip
    (event,) = scene.events("BuildRetried", revision)
    assert "after an infrastructure failure (retry 1 of 5)" in event["message"]
