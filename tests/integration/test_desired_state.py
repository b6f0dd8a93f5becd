"""Children kept at their desired state on the test bed, at the operator's default settings: serving changes
and hand edits converge by server-side apply, a steady state writes nothing, objects under our names that
the EdgeModel does not control are reported and left alone, and a write the API server refuses (a real
ResourceQuota) is reported on its class while the other class and the status are still written.

KWOK plays the nodes and makes every pod Ready; the test plays the builder (see `operators`).
"""

from __future__ import annotations

import copy
import json
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import yaml
from kubernetes import client, config

from edgemodel_operator.api.spec import EdgeModelSpec
from edgemodel_operator.builders import LABEL_COMPONENT, build_service, revision_of
from edgemodel_operator.prefetch import COMPONENT as PREFETCH
from edgemodel_operator.records import record_name
from edgemodel_operator.writes import Foreign, WriteFailure, report
from tests.helpers import eventually, get
from tests.integration.gitops_states import evaluate
from tests.integration.operators import DIGEST, OperatorProcess, Pool, apply_edgemodel, finish_builds, pool_targets
from tests.integration.test_gitops import serving as gitops_serving
from tests.testbed.cluster import Testbed
from tests.testbed.nodes import ARM64_CPU, X86_VNNI

pytestmark = pytest.mark.testbed
MODEL = {"uri": "oci://registry.local:5000/models/det:v4", "sha256": DIGEST}


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


@pytest.fixture
def pool(operator: Testbed, namespace: str) -> Iterator[Callable[..., dict[str, Any]]]:
    nodes = Pool(operator, namespace)
    yield nodes.add
    nodes.remove()


def _serving(bed: Testbed, namespace: str, **serving: Any) -> None:
    apply_edgemodel(bed, namespace, "ocr", targets=pool_targets(namespace), serving=serving)


def _status(bed: Testbed, namespace: str) -> dict[str, Any]:
    return dict(get(bed, "em", "ocr", "-n", namespace).get("status") or {})


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def _ready(bed: Testbed, namespace: str) -> dict[str, Any]:
    """The EdgeModel serving every class, as the status of its current generation says."""

    def ready() -> Any:
        em = get(bed, "em", "ocr", "-n", namespace)
        status = em.get("status") or {}
        current = status.get("observedGeneration") == em["metadata"]["generation"]
        return current and _condition(status, "Ready").get("status") == "True" and status

    return dict(eventually(ready, what="the EdgeModel Ready at its generation"))


def _one(bed: Testbed, namespace: str, kind: str, *flags: str) -> dict[str, Any]:
    items = get(bed, kind, "-n", namespace, "-l", "app.kubernetes.io/component=serve", *flags)["items"]
    assert len(items) == 1, [i["metadata"]["name"] for i in items]
    return dict(items[0])


def _writes(process: OperatorProcess) -> dict[str, float]:
    """The operator's own count of API writes, by verb (metric edgemodel_operator_api_writes_total)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{process.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("edgemodel_operator_api_writes_total{"):
            verb = line.split('verb="', 1)[1].split('"', 1)[0]
            found[verb] = float(line.rsplit(" ", 1)[1])
    return found


def _events(bed: Testbed, namespace: str, reason: str) -> list[dict[str, Any]]:
    items = get(bed, "events", "-n", namespace, "--field-selector", f"reason={reason}")["items"]
    return [e for e in items if e["involvedObject"]["kind"] == "EdgeModel" and e["type"] == "Warning"]


def test_serving_changes_converge_and_roll_without_taking_ready_pods_away(
    operator: Testbed, namespace: str, pool: Callable[..., dict[str, Any]]
) -> None:
    pool(X86_VNNI)
    _serving(operator, namespace, replicasPerClass=1)
    finish_builds(operator, namespace, count=1)
    _ready(operator, namespace)
    before = _one(operator, namespace, "deployments", "--show-managed-fields")
    assert before["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    entries = before["metadata"]["managedFields"]
    owners = {(m["manager"], m["operation"]) for m in entries if m["manager"] != "kube-controller-manager"}
    assert owners == {("edgemodel-operator", "Apply")}  # what the create set is ours to change and remove

    resources = {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}
    _serving(operator, namespace, replicasPerClass=2, resources=resources, port=9090)

    def converged() -> Any:
        deployment = _one(operator, namespace, "deployments")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        status = deployment.get("status") or {}
        done = (
            deployment["spec"]["replicas"] == 2
            and container["ports"] == [{"name": "http", "containerPort": 9090, "protocol": "TCP"}]
            and container["args"][container["args"].index("--port") + 1] == "9090"
            and container["resources"] == resources
            and status.get("readyReplicas") == 2
            and status.get("updatedReplicas") == 2
            and status.get("replicas") == 2
        )
        assert int(status.get("readyReplicas") or 0) >= 1, status  # never below what served before the change
        return done and deployment

    after = eventually(converged, what="the Deployment at the new serving settings, rolled out")
    assert after["metadata"]["uid"] == before["metadata"]["uid"]  # changed in place, not replaced
    service = get(operator, "service", "ocr", "-n", namespace)
    assert [p["port"] for p in service["spec"]["ports"]] == [9090]
    _ready(operator, namespace)


def test_hand_edits_are_reverted_and_a_steady_state_writes_nothing(
    operator_process: OperatorProcess, operator: Testbed, namespace: str, pool: Callable[..., dict[str, Any]]
) -> None:
    pool(X86_VNNI)
    _serving(operator, namespace, replicasPerClass=1)
    finish_builds(operator, namespace, count=1)
    _ready(operator, namespace)
    time.sleep(3)  # the writes that led to Ready have settled
    deployment, service = _one(operator, namespace, "deployments"), get(operator, "service", "ocr", "-n", namespace)
    writes = _writes(operator_process)
    for poke in range(3):  # each change of the EdgeModel's metadata is a reconcile; none has anything to write
        operator.kubectl("annotate", "em", "ocr", "-n", namespace, f"example.com/poke={poke}", "--overwrite")
        time.sleep(2)
    assert (
        _one(operator, namespace, "deployments")["metadata"]["resourceVersion"]
        == deployment["metadata"]["resourceVersion"]
    )
    assert (
        get(operator, "service", "ocr", "-n", namespace)["metadata"]["resourceVersion"]
        == service["metadata"]["resourceVersion"]
    )
    later = _writes(operator_process)
    assert {v: later.get(v, 0) - writes.get(v, 0) for v in ("apply", "create", "patch", "delete")} == dict.fromkeys(
        ("apply", "create", "patch", "delete"), 0
    )

    name = deployment["metadata"]["name"]
    operator.kubectl("scale", "deployment", name, "-n", namespace, "--replicas=3")
    eventually(lambda: _one(operator, namespace, "deployments")["spec"]["replicas"] == 1, what="replicas reverted to 1")
    edit = [{"op": "replace", "path": "/spec/template/spec/containers/0/args", "value": ["serve", "elsewhere"]}]
    operator.kubectl("patch", "deployment", name, "-n", namespace, "--type=json", "-p", json.dumps(edit))
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    eventually(
        lambda: _one(operator, namespace, "deployments")["spec"]["template"]["spec"]["containers"][0]["args"] == args,
        what="args reverted",
    )
    # Live traffic sent to candidates by hand: the Service's selector goes back to the stable track.
    edit = [{"op": "replace", "path": "/spec/selector/edgeml.dev~1track", "value": "candidate"}]
    operator.kubectl("patch", "service", "ocr", "-n", namespace, "--type=json", "-p", json.dumps(edit))
    eventually(
        lambda: get(operator, "service", "ocr", "-n", namespace)["spec"]["selector"]["edgeml.dev/track"] == "stable",
        what="the Service's selector reverted",
    )


def test_a_serving_mode_switch_starts_the_new_workload_before_the_old_one_goes(
    operator: Testbed, namespace: str, pool: Callable[..., dict[str, Any]]
) -> None:
    pool(X86_VNNI)
    _serving(operator, namespace)
    finish_builds(operator, namespace, count=1)
    _ready(operator, namespace)
    name = _one(operator, namespace, "deployments")["metadata"]["name"]

    serving = ("-l", f"{LABEL_COMPONENT}!={PREFETCH}")  # not the DaemonSets that pull engines onto the nodes

    def ready_pods(first: str, then: str) -> int:
        """Ready pods of the `first` kind's workloads, then of the `then` kind's, read one after the other.
        Read the old kind first: if it has gone meanwhile, the new one was ready before it went and still is
        when it is read (in the other order, a new workload read just before it was ready and an old one read
        just after it went would add up to none, though a pod served throughout)."""
        ready = 0
        for kind in (first, then):
            for item in get(operator, kind, "-n", namespace, *serving)["items"]:
                status = item.get("status") or {}
                ready += int(status.get("readyReplicas") or status.get("numberReady") or 0)
        return ready

    for mode, new, old in (("DaemonSet", "daemonsets", "deployments"), ("Deployment", "deployments", "daemonsets")):
        _serving(operator, namespace, mode=mode)

        def switched(new: str = new, old: str = old) -> bool:
            assert ready_pods(old, new) >= 1  # something serves at every moment of the switch
            names = [i["metadata"]["name"] for i in get(operator, new, "-n", namespace, *serving)["items"]]
            return names == [name] and not get(operator, old, "-n", namespace, *serving)["items"]

        eventually(switched, what=f"serving by a {mode} only")
        _ready(operator, namespace)
    assert _events(operator, namespace, "ModeChanged") == []  # Normal Events, not warnings
    assert len(get(operator, "events", "-n", namespace, "--field-selector", "reason=ModeChanged")["items"]) >= 2


def test_objects_under_our_names_that_the_edgemodel_does_not_control_are_reported_and_left_alone(
    operator: Testbed, namespace: str, pool: Callable[..., dict[str, Any]]
) -> None:
    pool(X86_VNNI)
    spec = {"model": MODEL, "targets": pool_targets(namespace)}
    record = record_name("ocr", revision_of(EdgeModelSpec.model_validate(spec)))
    foreign: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": record, "namespace": namespace},
         "data": {"owner": "someone else"}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ocr", "namespace": namespace},
         "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}},
    ]  # fmt: skip
    operator.apply_objects(foreign)
    versions = {o["kind"]: get(operator, o["kind"].lower(), o["metadata"]["name"], "-n", namespace) for o in foreign}
    apply_edgemodel(operator, namespace, "ocr", targets=pool_targets(namespace))

    def conflict() -> Any:
        ready = _condition(_status(operator, namespace), "Ready")
        return ready.get("reason") == "Conflict" and ready

    ready = eventually(conflict, what="Ready False with reason Conflict")
    assert ready["status"] == "False"
    assert f"ConfigMap/{record}" in ready["message"]
    assert _condition(_status(operator, namespace), "Stalled")["status"] == "True"
    assert not get(operator, "jobs", "-n", namespace)["items"]  # nothing follows from a decision not recorded
    eventually(lambda: _events(operator, namespace, "Conflict"), what="a Warning Event")

    operator.kubectl("delete", "configmap", record, "-n", namespace)  # the record's name is free: the rest goes on
    finish_builds(operator, namespace, count=1)

    def service_conflict() -> Any:
        ready = _condition(_status(operator, namespace), "Ready")
        return "Service/ocr" in ready.get("message", "") and ready

    ready = eventually(service_conflict, what="the Service reported in the way")
    assert ready["reason"] == "Conflict"
    deployment = eventually(lambda: get(operator, "deployments", "-n", namespace)["items"], what="the Deployment")
    name = deployment[0]["metadata"]["name"]
    service = get(operator, "service", "ocr", "-n", namespace)
    assert service["metadata"]["resourceVersion"] == versions["Service"]["metadata"]["resourceVersion"]
    assert "ownerReferences" not in service["metadata"]

    # A Deployment of someone else's under the name of the class's next workload (a second revision's).
    apply_edgemodel(operator, namespace, "ocr", targets=pool_targets(namespace), digest="0" * 64)
    job = eventually(lambda: [j for j in get(operator, "jobs", "-n", namespace)["items"]
                              if j["metadata"]["name"] != name], what="the second revision's Job")[0]  # fmt: skip
    other = {"apiVersion": "apps/v1", "kind": "Deployment",
             "metadata": {"name": job["metadata"]["name"], "namespace": namespace},
             "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "web"}},
                      "template": {"metadata": {"labels": {"app": "web"}},
                                   "spec": {"containers": [{"name": "web", "image": "web:1"}]}}}}  # fmt: skip
    operator.apply_objects([other])
    seen = get(operator, "deployment", job["metadata"]["name"], "-n", namespace)
    finish_builds(operator, namespace, count=1)

    def on_class() -> Any:
        classes = _status(operator, namespace).get("classes") or [{}]
        errors = classes[0].get("writeErrors") or []
        return [e for e in errors if e["object"] == f"Deployment/{job['metadata']['name']}"]

    error = eventually(on_class, what="the Deployment in the way reported on its class")[0]
    assert (error["code"], error["verb"]) == (409, "create")
    assert (
        get(operator, "deployment", job["metadata"]["name"], "-n", namespace)["metadata"]["resourceVersion"]
        == (seen["metadata"]["resourceVersion"])
    )
    assert (
        get(
            operator,
            "configmap",
            record,
            "-n",
            namespace,
        )["metadata"]["ownerReferences"][0]["kind"]
        == "EdgeModel"
    )


def test_a_refused_write_is_reported_on_its_class_and_the_other_class_and_the_status_are_still_written(
    operator: Testbed, namespace: str, pool: Callable[..., dict[str, Any]]
) -> None:
    pool(X86_VNNI)
    pool(ARM64_CPU)
    quota = {"apiVersion": "v1", "kind": "ResourceQuota",
             "metadata": {"name": "one-deployment", "namespace": namespace},
             "spec": {"hard": {"count/deployments.apps": "1"}}}  # fmt: skip
    operator.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(quota))
    eventually(lambda: get(operator, "resourcequota", "one-deployment", "-n", namespace).get("status", {}).get("hard"),
               what="the quota in force")  # fmt: skip
    apply_edgemodel(operator, namespace, "ocr", targets=pool_targets(namespace))
    finish_builds(operator, namespace, count=2)

    def refused() -> Any:
        status = _status(operator, namespace)
        failing = [c for c in status.get("classes") or [] if c.get("writeErrors")]
        serving = [c for c in status.get("classes") or [] if c.get("state") == "Serving"]
        return len(failing) == 1 and len(serving) == 1 and status

    status = eventually(refused, what="one class serving, the other with its refused write")
    error = next(c for c in status["classes"] if c.get("writeErrors"))["writeErrors"][0]
    assert (error["verb"], error["code"]) == ("create", 403)
    assert error["object"].startswith("Deployment/")
    assert "exceeded quota" in error["message"]
    assert len(get(operator, "deployments", "-n", namespace)["items"]) == 1
    ready = _condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "WriteFailed")
    assert _condition(status, "Degraded")["reason"] == "WriteFailed"
    assert status["observedGeneration"] == 1
    events = eventually(lambda: _events(operator, namespace, "WriteFailed"), what="a Warning Event")
    assert "exceeded quota" in events[0]["message"]

    operator.kubectl("delete", "resourcequota", "one-deployment", "-n", namespace)
    status = _ready(operator, namespace)  # retried without any change of the EdgeModel
    assert not [c for c in status["classes"] if c.get("writeErrors")]
    assert len(get(operator, "deployments", "-n", namespace)["items"]) == 2


def test_an_update_an_admission_policy_denies_is_reported_on_its_class_while_the_other_class_converges(
    operator: Testbed, namespace: str, pool: Callable[..., dict[str, Any]]
) -> None:
    pool(X86_VNNI)
    pool(ARM64_CPU)
    _serving(operator, namespace, replicasPerClass=1)
    finish_builds(operator, namespace, count=2)
    _ready(operator, namespace)
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": f"{namespace}-one-arm64-pod"},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": ["apps"],
                        "apiVersions": ["v1"],
                        "operations": ["UPDATE"],
                        "resources": ["deployments"],
                    }
                ],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            },
            "validations": [
                {
                    "expression": "object.spec.replicas <= 1 || "
                    "!object.metadata.labels['edgeml.dev/class'].startsWith('arm64')",
                    "message": "arm64 serving stays at one pod",
                }
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": f"{namespace}-one-arm64-pod"},
        "spec": {"policyName": f"{namespace}-one-arm64-pod", "validationActions": ["Deny"]},
    }
    operator.apply_objects([policy, binding])
    try:
        time.sleep(3)  # the API server picks up new policies from its informer
        _serving(operator, namespace, replicasPerClass=2)

        def reported() -> Any:
            status = _status(operator, namespace)
            failing = [c for c in status.get("classes") or [] if c.get("writeErrors")]
            return status.get("observedGeneration") == 2 and failing and status

        status = eventually(reported, what="the arm64 class reporting the denied apply")
        entry = next(c for c in status["classes"] if c.get("writeErrors"))
        assert entry["key"].startswith("arm64")
        error = entry["writeErrors"][0]
        assert error["verb"] == "apply"
        assert error["code"] in {403, 422}
        assert "arm64 serving stays at one pod" in error["message"]
        replicas = {
            d["metadata"]["labels"]["edgeml.dev/class"].split("-")[0]: d["spec"]["replicas"]
            for d in get(operator, "deployments", "-n", namespace)["items"]
        }
        eventually(
            lambda: (
                {
                    d["metadata"]["labels"]["edgeml.dev/class"].split("-")[0]: d["spec"]["replicas"]
                    for d in get(operator, "deployments", "-n", namespace)["items"]
                }
                == {"amd64": 2, "arm64": 1}
            ),
            what="the other class at two pods",
        )
        assert replicas["arm64"] == 1
        assert _condition(status, "Ready")["reason"] == "WriteFailed"
    finally:
        operator.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy",
                         f"{namespace}-one-arm64-pod", check=False)  # fmt: skip


@pytest.mark.parametrize(
    ("reported", "kstatus", "argocd"),
    [
        ("conflict", "Failed", "Degraded"),  # Stalled: only a person can move what is in the way
        ("refused", "InProgress", "Degraded"),  # tried again every 15 s
    ],
)
def test_gitops_tools_read_a_conflict_as_failed_and_a_refused_write_as_not_done(
    reported: str, kstatus: str, argocd: str
) -> None:
    body = copy.deepcopy(gitops_serving())
    key = body["status"]["classes"][0]["key"]
    failures = [WriteFailure("Deployment/ocr-1", "create", 403, "exceeded quota", key)] if reported == "refused" else []
    foreign = [Foreign("Service/ocr", "no controller")] if reported == "conflict" else []
    body["status"] = report(body["status"], failures, foreign, generation=1, now="2026-01-01T00:00:01Z")
    read = evaluate("kstatus", body)
    assert read["status"] == kstatus
    assert ("Service/ocr" if foreign else "exceeded quota") in read["message"]
    assert evaluate("argocd-lua", body)["status"] == argocd


def test_a_service_an_earlier_version_created_loses_an_old_port_once_this_version_has_applied_it(
    operator_process: OperatorProcess, operator: Testbed, namespace: str, pool: Callable[..., dict[str, Any]]
) -> None:
    """The earlier version created children with the client's default field manager (an update); this one
    takes them over at its first apply, so that a port change leaves one port, not both."""
    pool(X86_VNNI)
    operator_process.kill()
    try:
        _serving(operator, namespace)
        body = get(operator, "em", "ocr", "-n", namespace)
        config.load_kube_config(str(operator.kubeconfig))  # type: ignore[no-untyped-call]
        with client.ApiClient() as api:  # as the earlier version wrote it: no field manager named
            client.CoreV1Api(api).create_namespaced_service(namespace, cast(Any, build_service(body)))
    finally:
        operator_process.start()
    finish_builds(operator, namespace, count=1)
    _ready(operator, namespace)
    _serving(operator, namespace, port=9090)

    def one_port() -> Any:
        service = get(operator, "service", "ocr", "-n", namespace, "--show-managed-fields")
        return [p["port"] for p in service["spec"]["ports"]] == [9090] and service

    service = eventually(one_port, what="the Service with the new port only")
    assert "OpenAPI-Generator" not in {m["manager"] for m in service["metadata"]["managedFields"]}
    _ready(operator, namespace)
