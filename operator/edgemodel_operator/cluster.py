"""Reading and writing the cluster for one EdgeModel: the only module here that talks to the API."""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from edgemodel_operator.api.resource import GROUP, PLURAL, VERSION
from edgemodel_operator.builders import LABEL_COMPONENT, LABEL_EDGEMODEL, LABEL_TRACK
from edgemodel_operator.reconcile import Observed, Plan, subject
from edgemodel_operator.records import COMPONENT as RECORD

Obj = dict[str, Any]
COMPONENT = "edgemodel-operator"


class ConflictError(Exception):
    """A write found newer state than the plan was made from (HTTP 409): plan again from fresh reads."""


class NotActiveError(Exception):
    """This replica stopped being the active one while applying a plan: the rest is not written."""


@dataclass
class Applied:
    """What `Cluster.apply` really changed, as Event subjects ("Kind/name")."""

    recorded: set[str] = field(default_factory=set)
    created: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    patched: set[str] = field(default_factory=set)
    conflicts: int = 0  # patches refused because the object changed since it was read


class Cluster:
    """Typed-enough access to the objects an EdgeModel owns."""

    def __init__(self, api: client.ApiClient | None = None) -> None:
        self.api = api or client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def _dicts(self, result: Any, kind: str | None = None) -> list[Obj]:
        """List items as plain objects; lists leave each item's kind out, so `kind` puts it back."""
        items: list[Obj] = self.api.sanitize_for_serialization(result).get("items", [])
        return [item | {"kind": kind} for item in items] if kind else items

    def observe(self, body: Obj) -> Observed:
        namespace, name, uid = body["metadata"]["namespace"], body["metadata"]["name"], body["metadata"]["uid"]
        selector = f"{LABEL_EDGEMODEL}={name}"

        def owned(objects: list[Obj]) -> list[Obj]:
            return [o for o in objects if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences", []))]

        return Observed(
            body=body,
            nodes=self._dicts(self.core.list_node()),
            jobs=owned(self._dicts(self.batch.list_namespaced_job(namespace, label_selector=selector))),
            pods=self._dicts(
                self.core.list_namespaced_pod(namespace, label_selector=f"{selector},{LABEL_COMPONENT}=build")
            ),
            deployments=owned(
                self._dicts(self.apps.list_namespaced_deployment(namespace, label_selector=selector), "Deployment")
                + self._dicts(self.apps.list_namespaced_daemon_set(namespace, label_selector=selector), "DaemonSet")
            ),
            services=owned(
                self._dicts(self.core.list_namespaced_service(namespace, label_selector=selector), "Service")
            ),
            configmaps=owned(
                self._dicts(self.core.list_namespaced_config_map(namespace, label_selector=selector), "ConfigMap")
            ),
            records=self.records(body),
        )

    def uids(self, namespaces: list[str]) -> set[str]:
        """UIDs of every object the operator's watches index now: nodes, EdgeModels and what they own."""
        selector = LABEL_EDGEMODEL
        lists: list[Any] = [self.core.list_node()]
        scopes: list[str | None] = list(namespaces) or [None]
        for namespace in scopes:
            if namespace is None:
                lists += [
                    self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL),
                    self.batch.list_job_for_all_namespaces(label_selector=selector),
                    self.core.list_pod_for_all_namespaces(label_selector=selector),
                    self.apps.list_deployment_for_all_namespaces(label_selector=selector),
                    self.apps.list_daemon_set_for_all_namespaces(label_selector=selector),
                    self.core.list_service_for_all_namespaces(label_selector=selector),
                    self.core.list_config_map_for_all_namespaces(label_selector=selector),
                ]
                continue
            lists += [
                self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL),
                self.batch.list_namespaced_job(namespace, label_selector=selector),
                self.core.list_namespaced_pod(namespace, label_selector=selector),
                self.apps.list_namespaced_deployment(namespace, label_selector=selector),
                self.apps.list_namespaced_daemon_set(namespace, label_selector=selector),
                self.core.list_namespaced_service(namespace, label_selector=selector),
                self.core.list_namespaced_config_map(namespace, label_selector=selector),
            ]
        items: list[Obj] = []
        for result in lists:  # custom objects come as dicts, the others as client models
            items += result.get("items", []) if isinstance(result, dict) else self._dicts(result)
        return {str(i["metadata"]["uid"]) for i in items}

    def records(self, body: Obj) -> list[Obj]:
        """The EdgeModel's decision records, read from the API server (never from a cache that may lag)."""
        namespace, name, uid = body["metadata"]["namespace"], body["metadata"]["name"], body["metadata"]["uid"]
        selector = f"{LABEL_EDGEMODEL}={name},{LABEL_COMPONENT}={RECORD}"
        found = self._dicts(self.core.list_namespaced_config_map(namespace, label_selector=selector), "ConfigMap")
        return [o for o in found if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or [])]

    def record(self, plan: Plan) -> set[str]:
        """Write the plan's decision records; `ConflictError` if one changed since it was read (or was created)."""
        done: set[str] = set()
        for write in plan.records:
            try:
                if "create" in write:
                    obj = write["create"]
                    meta = obj["metadata"]
                    _drain(self.core.create_namespaced_config_map(meta["namespace"], obj, _preload_content=False))
                    done.add(subject(obj))
                else:
                    _drain(self.core.patch_namespaced_config_map(write["name"], write["namespace"], write["patch"],
                                                                 _preload_content=False))  # fmt: skip
                    done.add(f"ConfigMap/{write['name']}")
            except ApiException as error:
                if error.status in {404, 409}:  # created, changed or deleted by another writer meanwhile
                    what = subject(write.get("create") or write)
                    raise ConflictError(f"decision record {what}: {error.reason}") from None
                raise
        return done

    def apply(self, plan: Plan, active: Callable[[], bool] = lambda: True) -> Applied:
        """Write the decision records, then create what is missing (an existing object is left alone),
        delete what is retired and patch what changed. `ConflictError` when a record changed since it was
        read: nothing else is written. `NotActiveError` as soon as `active()` turns false between writes."""
        create: dict[str, Callable[..., Any]] = {
            "Job": self.batch.create_namespaced_job,
            "Deployment": self.apps.create_namespaced_deployment,
            "DaemonSet": self.apps.create_namespaced_daemon_set,
            "Service": self.core.create_namespaced_service,
            "ConfigMap": self.core.create_namespaced_config_map,
        }
        delete: dict[str, Callable[..., Any]] = {
            "Job": self.batch.delete_namespaced_job,
            "Deployment": self.apps.delete_namespaced_deployment,
            "DaemonSet": self.apps.delete_namespaced_daemon_set,
            "Service": self.core.delete_namespaced_service,
            "ConfigMap": self.core.delete_namespaced_config_map,
        }
        patch: dict[str, Callable[..., Any]] = {
            "Job": self.batch.patch_namespaced_job,  # the build outcome, kept once read
            "Deployment": self.apps.patch_namespaced_deployment,
            "DaemonSet": self.apps.patch_namespaced_daemon_set,
            "ConfigMap": self.core.patch_namespaced_config_map,
        }
        applied = Applied()
        _check(active)
        applied.recorded = self.record(plan)
        for obj in plan.create:
            _check(active)
            try:
                _drain(create[obj["kind"]](obj["metadata"]["namespace"], obj, _preload_content=False))
            except ApiException as error:
                if error.status != 409:
                    raise
            else:
                applied.created.add(subject(obj))
        for ref in plan.delete:
            _check(active)
            # With a body, the API server reads every delete option from it and none from the query: the
            # propagation policy goes in the body too, or Jobs fall back to orphaning their pods.
            options = {"propagationPolicy": "Background"} | (
                {"preconditions": {"uid": ref["uid"]}} if ref.get("uid") else {}
            )
            try:
                remove = delete[ref["kind"]]
                _drain(remove(ref["name"], ref["namespace"], body=options, _preload_content=False))
            except ApiException as error:
                if error.status not in {404, 409}:  # gone already, or replaced since it was observed
                    raise
            else:
                applied.deleted.add(subject(ref))
        for ref in plan.patch:  # a dict body goes as a (strategic) merge patch: null removes a key
            _check(active)
            try:
                _drain(patch[ref["kind"]](ref["name"], ref["namespace"], ref["patch"], _preload_content=False))
            except ApiException as error:
                if error.status != 409:  # changed since the watch showed it: planned again soon
                    raise
                applied.conflicts += 1
            else:
                applied.patched.add(subject(ref))
        return applied

    def stable_pods(self, namespace: str, edgemodel: str) -> list[Obj]:
        """Serving pods that take live traffic: where shadow evidence is counted."""
        selector = f"{LABEL_EDGEMODEL}={edgemodel},{LABEL_COMPONENT}=serve,{LABEL_TRACK}=stable"
        return self._dicts(self.core.list_namespaced_pod(namespace, label_selector=selector), "Pod")

    def patch_status(self, body: Obj, patch: Obj) -> None:
        """Merge-patch the status subresource (see `pacing.merge_patch`), only if the EdgeModel is still at the
        resourceVersion the patch was computed from: `ConflictError` otherwise."""
        meta = body["metadata"]
        guarded = {"metadata": {"resourceVersion": meta.get("resourceVersion")}, "status": patch}
        try:
            _drain(
                self.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], guarded, _preload_content=False
                )
            )
        except ApiException as error:
            if error.status == 409:
                raise ConflictError(f"EdgeModel {meta['name']}: {error.reason}") from None
            raise

    def record_event(self, body: Obj, reason: str, message: str, kind: str = "Normal") -> None:
        meta = body["metadata"]
        now = datetime.datetime.now(datetime.UTC)
        event = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "EdgeModel",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "reason": reason,
            "message": message[:1024],
            "type": kind,
            "count": 1,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": socket.gethostname()[:128],
        }
        _drain(self.core.create_namespaced_event(meta["namespace"], cast(Any, event), _preload_content=False))


def _check(active: Callable[[], bool]) -> None:
    if not active():
        raise NotActiveError("this replica is no longer the active one")


def _drain(response: Any) -> None:
    """Read a raw response and hand its connection back: writes need no decoded reply, and decoding
    each one into client model objects costs more CPU than the request itself."""
    response.read()
    response.release_conn()
