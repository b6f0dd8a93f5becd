"""The pure parts of keeping children at their desired state and of reporting refused writes."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgemodel_operator.api.spec import EdgeModelSpec
from edgemodel_operator.api.status import EdgeModelStatus
from edgemodel_operator.builders import Images, build_deployment_for_class, build_service, revision_of
from edgemodel_operator.buildreport import OUTCOME
from edgemodel_operator.classes import HardwareClass, discover, engine_for
from edgemodel_operator.controller import slim_service, slim_workload
from edgemodel_operator.desired import (
    ANNOTATION_APPLIED,
    FIELD_MANAGER,
    applied_hash,
    converge,
    differs,
    inherited,
    split_twins,
    stamp,
)
from edgemodel_operator.reconcile import Observed, Plan, plan
from edgemodel_operator.writes import Foreign, WriteFailure, api_message, class_of, controller_of, news, report
from tests.testbed.nodes import DEFAULT_NODES, build_node

DIGEST = "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"
ARTIFACT = "oci://registry/engines@sha256:" + "a" * 64
NOW = "2026-11-29T12:00:00Z"
OURS = {"manager": FIELD_MANAGER, "operation": "Apply", "time": "2026-11-29T11:00:00Z", "fieldsV1": {"f:spec": {}}}


def _nodes() -> list[dict[str, Any]]:
    nodes = [build_node(name, node_class) for name, node_class in DEFAULT_NODES]
    for node in nodes:
        node["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    return nodes


NODES = _nodes()
CLASSES = discover(NODES, None, [])


def edgemodel(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "edgeml.dev/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": "ocr", "namespace": "apps", "uid": "u-1", "generation": 1},
        "spec": {"model": {"uri": "oci://registry.local/models/det:v4", "sha256": DIGEST}, **spec},
    }


def live_workload(body: dict[str, Any], hardware: HardwareClass, *fields: dict[str, Any]) -> dict[str, Any]:
    """What the watch keeps of a workload the operator created from `body`, with managed fields `fields`."""
    spec = EdgeModelSpec.model_validate(body["spec"])
    target = engine_for(spec, hardware)
    assert target is not None
    built = build_deployment_for_class(body, hardware, target, revision=revision_of(spec), artifact=ARTIFACT,
                                       images=Images())  # fmt: skip
    obj = copy.deepcopy(stamp(built))
    obj["metadata"] |= {"uid": "w-1", "generation": 1, "managedFields": [OURS, *fields]}
    return slim_workload(obj)


def converged(body: dict[str, Any], *workloads: dict[str, Any], services: list[dict[str, Any]] | None = None) -> Plan:
    result = Plan()
    observed = Observed(body=body, nodes=NODES, jobs=[], pods=[], deployments=list(workloads), services=services or [])
    converge(observed, result, CLASSES, Images(), [])
    return result


def test_a_workload_at_its_desired_state_is_not_written() -> None:
    body = edgemodel()
    assert converged(body, live_workload(body, CLASSES[0])).apply == []


@pytest.mark.parametrize(
    "serving",
    [
        {"replicasPerClass": 2},
        {"port": 9090},
        {"resources": {"requests": {"cpu": "250m"}, "limits": {"memory": "512Mi"}}},
    ],
    ids=["replicas", "port", "resources"],
)
def test_a_serving_change_is_applied_to_the_workload_that_exists(serving: dict[str, Any]) -> None:
    body = edgemodel()
    live = live_workload(body, CLASSES[0])
    changed = edgemodel(serving=serving)
    result = converged(changed, live)
    assert len(result.apply) == 1
    applied = result.apply[0]
    assert applied["metadata"]["uid"] == "w-1"  # a replaced object is not written
    assert applied["metadata"]["name"] == live["metadata"]["name"]
    container = applied["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][1] == ARTIFACT  # still serves what it served
    if "replicasPerClass" in serving:
        assert applied["spec"]["replicas"] == 2
    if "port" in serving:
        assert container["ports"][0]["containerPort"] == 9090
    if "resources" in serving:
        assert container["resources"] == serving["resources"]
    # The revision does not change with serving settings; once applied, nothing differs any more.
    after = live_workload(changed, CLASSES[0])
    assert after["metadata"]["labels"] == live["metadata"]["labels"]
    assert converged(changed, after).apply == []


def test_a_hand_edited_artifact_is_put_back_from_what_the_operator_recorded_not_taken_from_the_edit() -> None:
    body = edgemodel()
    live = live_workload(
        body, CLASSES[0], {"manager": "kubectl-patch", "operation": "Update", "fieldsV1": {"f:spec": {}}}
    )
    live["spec"]["template"]["spec"]["containers"][0]["args"] = ["serve", "oci://elsewhere/engine@sha256:" + "b" * 64]
    job = {"kind": "Job", "metadata": {"name": live["metadata"]["name"],
           "annotations": {OUTCOME: json.dumps({"status": "built", "artifact": ARTIFACT})}}}  # fmt: skip
    result = Plan()
    converge(Observed(body, NODES, [job], [], [live], []), result, CLASSES, Images(), [])
    assert result.apply[0]["spec"]["template"]["spec"]["containers"][0]["args"][1] == ARTIFACT


def test_a_new_runtime_image_is_applied() -> None:
    body = edgemodel()
    live = live_workload(body, CLASSES[0])
    result = Plan()
    observed = Observed(body=body, nodes=NODES, jobs=[], pods=[], deployments=[live], services=[])
    converge(observed, result, CLASSES, Images(cpu="runtime-cpu:0.2.0", cuda="runtime-cuda:0.2.0"), [])
    images = [c["image"] for o in result.apply for c in o["spec"]["template"]["spec"]["containers"]]
    assert images
    assert set(images) <= {"runtime-cpu:0.2.0", "runtime-cuda:0.2.0"}


@pytest.mark.parametrize(
    ("entry", "is_edit"),
    [
        ({"manager": "kubectl", "operation": "Update", "subresource": "scale", "fieldsV1": {"f:spec": {}}}, True),
        (
            {
                "manager": "kubectl-patch",
                "operation": "Update",
                "time": "2026-11-29T11:30:00Z",
                "fieldsV1": {"f:spec": {"f:template": {}}},
            },
            True,
        ),
        (
            {
                "manager": "kubectl-edit",
                "operation": "Update",
                "time": "2026-11-29T11:00:00Z",
                "fieldsV1": {"f:spec": {}},
            },
            True,
        ),
        ({"manager": "argocd", "operation": "Apply", "time": "2026-11-29T11:30:00Z", "fieldsV1": {"f:spec": {}}}, True),
        (
            {
                "manager": "old-editor",
                "operation": "Update",
                "time": "2026-11-29T10:00:00Z",
                "fieldsV1": {"f:spec": {}},
            },
            False,
        ),
        (
            {
                "manager": "kube-controller-manager",
                "operation": "Update",
                "subresource": "status",
                "time": "2026-11-29T11:30:00Z",
                "fieldsV1": {"f:status": {}},
            },
            False,
        ),
        (
            {
                "manager": "kube-controller-manager",
                "operation": "Update",
                "time": "2026-11-29T11:30:00Z",
                "fieldsV1": {"f:metadata": {"f:annotations": {}}},
            },
            False,
        ),
    ],
    ids=["scale", "patch", "same-second", "other-applier", "older", "status", "annotation"],
)
def test_an_edit_by_another_manager_is_reverted_and_status_or_metadata_writers_are_not(
    entry: dict[str, Any], is_edit: bool
) -> None:
    body = edgemodel()
    live = live_workload(body, CLASSES[0], entry)
    assert live["metadata"]["edited"] is is_edit
    assert len(converged(body, live).apply) == int(is_edit)


def test_the_hash_covers_the_whole_object_and_ignores_its_own_annotation_and_the_uid() -> None:
    body = edgemodel()
    service = build_service(body)
    assert applied_hash(stamp(service)) == applied_hash(service)
    assert applied_hash(service | {"metadata": service["metadata"] | {"uid": "x"}}) == applied_hash(service)
    moved = copy.deepcopy(service)
    moved["spec"]["ports"][0]["port"] = 9090
    assert applied_hash(moved) != applied_hash(service)
    extra = copy.deepcopy(service)  # a field the builders gain later (an init container, a volume) counts too
    extra["spec"]["sessionAffinity"] = "ClientIP"
    assert applied_hash(extra) != applied_hash(service)


@given(st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=4))
def test_differs_is_false_exactly_when_the_stamped_hash_matches_and_no_one_edited(labels: dict[str, str]) -> None:
    service = build_service(edgemodel())
    service["metadata"]["labels"] |= labels
    live = copy.deepcopy(stamp(service))
    live["metadata"]["managedFields"] = [OURS]
    assert not differs(service, live)
    live["metadata"]["annotations"][ANNOTATION_APPLIED] = "0" * 16
    assert differs(service, live)


def test_a_service_port_change_is_applied_and_a_foreign_edit_of_it_too() -> None:
    body = edgemodel()
    live = copy.deepcopy(stamp(build_service(body))) | {}
    live["metadata"] |= {"uid": "s-1", "managedFields": [OURS]}
    slim = slim_service(live)
    assert converged(body, services=[slim]).apply == []
    assert converged(edgemodel(serving={"port": 9090}), services=[slim]).apply[0]["spec"]["ports"][0]["port"] == 9090
    live["metadata"]["managedFields"].append(
        {"manager": "kubectl-patch", "operation": "Update", "time": "2026-11-29T11:30:00Z", "fieldsV1": {"f:spec": {}}}
    )
    assert len(converged(body, services=[slim_service(live)]).apply) == 1


def test_a_mode_switch_creates_the_other_kind_first_and_removes_the_old_once_the_new_has_rolled_out() -> None:
    body = edgemodel()
    old = live_workload(body, CLASSES[0])
    switched = edgemodel(serving={"mode": "DaemonSet"})
    first = converged(switched, old)
    assert [o["kind"] for o in first.create] == ["DaemonSet"]
    assert first.create[0]["metadata"]["name"] == old["metadata"]["name"]
    assert ANNOTATION_APPLIED in first.create[0]["metadata"]["annotations"]
    assert not first.delete

    new = copy.deepcopy(first.create[0]) | {"status": {"observedGeneration": 1, "desiredNumberScheduled": 1,
                                                       "updatedNumberScheduled": 1, "numberReady": 0}}  # fmt: skip
    new["metadata"] |= {"uid": "d-1", "generation": 1}
    observed = Observed(body=switched, nodes=NODES, jobs=[], pods=[], deployments=[old, new], services=[])
    seen, hidden = split_twins(observed)
    assert (seen, hidden) == ([old], [new])  # the planner sees what serves now
    waiting = Plan()
    converge(Observed(switched, NODES, [], [], seen, []), waiting, CLASSES, Images(), hidden)
    assert not waiting.delete
    assert not waiting.create

    new["status"]["numberReady"] = 1
    done = Plan()
    converge(Observed(switched, NODES, [], [], seen, []), done, CLASSES, Images(), hidden)
    assert [(r["kind"], r["uid"]) for r in done.delete] == [("Deployment", "w-1")]


def test_the_planner_stamps_what_it_creates_so_the_next_reconcile_writes_nothing() -> None:
    body = edgemodel()
    created = plan(Observed(body, NODES, [], [], [], []), Images(), NOW).create
    service = next(o for o in created if o["kind"] == "Service")
    assert service["metadata"]["annotations"][ANNOTATION_APPLIED] == applied_hash(service)
    assert all(
        ANNOTATION_APPLIED not in (o["metadata"].get("annotations") or {}) for o in created if o["kind"] == "Job"
    )


# ---------------------------------------------------------------- refused writes


def _status() -> dict[str, Any]:
    return plan(Observed(edgemodel(), NODES, [], [], [], []), Images(), NOW).status


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (403, 'deployments.apps "x" is forbidden: exceeded quota: one, requested: count/deployments.apps=1'),
        (403, 'deployments.apps "x" is forbidden: User "system:serviceaccount:ops:op" cannot create resource'),
        (422, "Deployment \"x\" is forbidden: ValidatingAdmissionPolicy 'no-gpu' denied request"),
        (409, 'Operation cannot be fulfilled on services "x": the object has been modified'),
        (500, "etcdserver: request timed out"),
        (503, "the server is currently unable to handle the request"),
    ],
    ids=["quota", "rbac", "policy", "conflict", "server-error", "unavailable"],
)
def test_a_refused_write_goes_on_its_class_with_the_apis_message_and_leaves_the_others(code: int, message: str) -> None:
    status = _status()
    key = status["classes"][1]["key"]
    body = json.dumps({"kind": "Status", "message": message, "code": code})
    failure = WriteFailure(f"Deployment/ocr-x-{key[-8:]}", "create", code, api_message(body, "Forbidden"), key)
    reported = report(status, [failure], [], generation=1, now=NOW)
    errors = {c["key"]: c.get("writeErrors") for c in reported["classes"]}
    assert errors[key] == [{"object": failure.subject, "verb": "create", "code": code, "message": message}]
    assert all(v is None for k, v in errors.items() if k != key)
    conditions = {c["type"]: c for c in reported["conditions"]}
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "WriteFailed")
    assert message in conditions["Degraded"]["message"]
    EdgeModelStatus.model_validate(reported)  # within the CRD's schema


def test_a_write_without_a_class_goes_on_the_conditions_only() -> None:
    failure = WriteFailure("Service/ocr", "apply", 403, "forbidden")
    reported = report(_status(), [failure], [], generation=1, now=NOW)
    assert not any(c.get("writeErrors") for c in reported["classes"])
    assert "Service/ocr" in next(c for c in reported["conditions"] if c["type"] == "Ready")["message"]


def test_an_object_in_the_way_makes_ready_false_with_reason_conflict_and_stalls() -> None:
    status = _status()
    key = status["classes"][0]["key"]
    foreign = [Foreign("Service/ocr", "no controller"), Foreign("Deployment/ocr-1", "controlled by Rollout/web", key)]
    reported = report(status, [], foreign, generation=1, now=NOW)
    conditions = {c["type"]: c for c in reported["conditions"]}
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "Conflict")
    assert "Service/ocr" in conditions["Ready"]["message"]
    assert "Deployment/ocr-1" in conditions["Ready"]["message"]
    assert (conditions["Stalled"]["status"], conditions["Stalled"]["reason"]) == ("True", "Conflict")
    entry = next(c for c in reported["classes"] if c["key"] == key)
    assert entry["writeErrors"][0]["object"] == "Deployment/ocr-1"
    EdgeModelStatus.model_validate(reported)


def test_nothing_refused_leaves_the_status_as_planned() -> None:
    status = _status()
    assert report(status, [], [], generation=1, now=NOW) == status


def test_many_failures_stay_within_the_status_limits() -> None:
    status = _status()
    key = status["classes"][0]["key"]
    failures = [WriteFailure(f"Service/s{i}", "apply", 500, "x" * 5000, key) for i in range(40)]
    reported = report(status, failures, [Foreign(f"Service/f{i}", "no controller") for i in range(40)],
                      generation=1, now=NOW)  # fmt: skip
    EdgeModelStatus.model_validate(reported)


def test_an_event_is_news_only_until_the_status_shows_it() -> None:
    failure = WriteFailure("Deployment/ocr-1", "create", 403, "exceeded quota", CLASSES[0].key)
    foreign = Foreign("Service/ocr", "no controller")
    assert [r for r, _ in news({}, [failure], [foreign])] == ["Conflict", "WriteFailed"]
    shown = report(_status(), [failure], [foreign], generation=1, now=NOW)
    assert news(shown, [failure], [foreign]) == []


@pytest.mark.parametrize(
    ("body", "reason", "expected"),
    [
        ('{"kind":"Status","message":"exceeded quota"}', "Forbidden", "exceeded quota"),
        (b'{"kind":"Status","message":"denied"}', "Forbidden", "denied"),
        ("<html>bad gateway</html>", "Bad Gateway", "Bad Gateway"),
        (None, None, "no message"),
        ("", "Internal Server Error", "Internal Server Error"),
    ],
)
def test_the_apis_message_is_read_from_its_status_body(body: Any, reason: str | None, expected: str) -> None:
    assert api_message(body, reason) == expected


def test_class_and_controller_of_objects_and_references() -> None:
    assert class_of({"metadata": {"labels": {"edgeml.dev/class": "k"}}}) == "k"
    assert class_of({"kind": "Service", "name": "ocr", "namespace": "n"}) is None
    assert controller_of({"metadata": {}}) == (None, "no controller")
    references = [{"uid": "a", "kind": "X", "name": "y"},
                  {"uid": "b", "kind": "EdgeModel", "name": "ocr", "controller": True}]  # fmt: skip
    owned = {"metadata": {"ownerReferences": references}}
    assert controller_of(owned) == ("b", "controlled by EdgeModel/ocr")


def test_an_earlier_versions_create_entry_is_dropped_only_once_this_version_has_applied() -> None:
    legacy = {"manager": "OpenAPI-Generator", "operation": "Update", "time": "2026-01-01T00:00:00Z",
              "fieldsV1": {"f:spec": {"f:ports": {}}}}  # fmt: skip
    status = {"manager": "kube-controller-manager", "operation": "Update", "subresource": "status",
              "fieldsV1": {"f:status": {}}}  # fmt: skip
    assert inherited({"metadata": {"managedFields": [legacy]}}) is None  # nobody would own the fields
    ops = inherited({"metadata": {"managedFields": [status, OURS, legacy]}})
    assert ops == [
        {"op": "test", "path": "/metadata/managedFields/2/manager", "value": "OpenAPI-Generator"},
        {"op": "test", "path": "/metadata/managedFields/2/operation", "value": "Update"},
        {"op": "remove", "path": "/metadata/managedFields/2"},
    ]
    assert inherited({"metadata": {"managedFields": [OURS, status]}}) is None
    hand = legacy | {"manager": "kubectl-edit"}  # a person's edit is theirs to keep
    assert inherited({"metadata": {"managedFields": [OURS, hand]}}) is None
