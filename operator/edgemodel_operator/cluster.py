"""Reading and writing the cluster for one EdgeModel: the only module here that talks to the API."""

from __future__ import annotations

import datetime
import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from edgemodel_operator.api.resource import GROUP, PLURAL, VERSION
from edgemodel_operator.builders import LABEL_COMPONENT, LABEL_EDGEMODEL, LABEL_TRACK
from edgemodel_operator.desired import FIELD_MANAGER, inherited
from edgemodel_operator.reconcile import Observed, Plan, subject
from edgemodel_operator.records import COMPONENT as RECORD
from edgemodel_operator.writes import Foreign, WriteFailure, api_message, class_of, controller_of

Obj = dict[str, Any]
LOG = logging.getLogger("edgemodel.cluster")
APPLIED_KINDS = {"Deployment", "DaemonSet", "Service"}  # kept at their desired state by server-side apply
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
    applied: set[str] = field(default_factory=set)  # server-side applied: the desired state of what exists
    conflicts: int = 0  # patches refused because the object changed since it was read
    failures: list[WriteFailure] = field(default_factory=list)  # writes refused, the rest went on
    foreign: list[Foreign] = field(default_factory=list)  # objects under our names that we do not control


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
                    _drain(self.core.create_namespaced_config_map(meta["namespace"], obj, field_manager=FIELD_MANAGER,
                                                                  _preload_content=False))  # fmt: skip
                    done.add(subject(obj))
                else:
                    _drain(self.core.patch_namespaced_config_map(write["name"], write["namespace"], write["patch"],
                                                                 field_manager=FIELD_MANAGER,
                                                                 _preload_content=False))  # fmt: skip
                    done.add(f"ConfigMap/{write['name']}")
            except ApiException as error:
                if error.status in {404, 409}:  # created, changed or deleted by another writer meanwhile
                    what = subject(write.get("create") or write)
                    raise ConflictError(f"decision record {what}: {error.reason}") from None
                raise
        return done

    def apply(self, plan: Plan, active: Callable[[], bool] = lambda: True, owner: str | None = None) -> Applied:
        """Write the decision records, then create what is missing, delete what is retired, patch what
        changed and server-side apply the desired state of what exists (field manager `FIELD_MANAGER`).

        `ConflictError` when a record changed since it was read: nothing else is written. Any other
        refused write (RBAC, quota, admission policy, server error) is kept in `Applied.failures` and the
        rest of the plan goes on; a record that cannot be written is kept there too, and then no child is
        written (the children follow the decisions recorded). An existing object under a name the plan
        creates is left alone: in `Applied.foreign` unless it is controlled by `owner` (the EdgeModel's
        UID). `NotActiveError` as soon as `active()` turns false between writes."""
        applied = Applied()
        _check(active)
        try:
            applied.recorded = self.record(plan)
        except ConflictError:
            found = self._foreign_records(plan, owner)
            if not found:
                raise
            applied.foreign += found  # a record's name is taken: nothing follows from decisions not recorded
            return applied
        except ApiException as error:
            what = subject(plan.records[0].get("create") or plan.records[0]) if plan.records else "records"
            applied.failures.append(_failure(error, "record", what, None))
            return applied
        for obj in plan.create:
            _check(active)
            self._create(obj, owner, applied)
        for ref in plan.delete:
            _check(active)
            self._delete(ref, applied)
        for ref in plan.patch:  # a dict body goes as a (strategic) merge patch: null removes a key
            _check(active)
            self._patch(ref, applied)
        for obj in plan.apply:
            _check(active)
            self._apply(obj, applied)
        return applied

    def _delete(self, ref: Obj, applied: Applied) -> None:
        # With a body, the API server reads every delete option from it and none from the query: the
        # propagation policy goes in the body too, or Jobs fall back to orphaning their pods.
        guard = {"preconditions": {"uid": ref["uid"]}} if ref.get("uid") else {}
        options = {"propagationPolicy": "Background"} | guard
        try:
            remove = self._verbs("delete")[ref["kind"]]
            _drain(remove(ref["name"], ref["namespace"], body=options, _preload_content=False))
        except ApiException as error:
            if error.status not in {404, 409}:  # gone already, or replaced since it was observed
                applied.failures.append(_failure(error, "delete", subject(ref), class_of(ref)))
        else:
            applied.deleted.add(subject(ref))

    def _patch(self, ref: Obj, applied: Applied) -> None:
        try:
            change = self._verbs("patch")[ref["kind"]]
            _drain(change(ref["name"], ref["namespace"], ref["patch"], field_manager=FIELD_MANAGER,
                          _preload_content=False))  # fmt: skip
        except ApiException as error:
            if error.status != 409:  # 409: changed since the watch showed it: planned again soon
                applied.failures.append(_failure(error, "patch", subject(ref), class_of(ref)))
            else:
                applied.conflicts += 1
        else:
            applied.patched.add(subject(ref))

    def _foreign_records(self, plan: Plan, owner: str | None) -> list[Foreign]:
        """The records `plan` creates whose name an object that `owner` does not control has taken."""
        found: list[Foreign] = []
        for write in plan.records:
            if "create" in write and owner is not None:
                meta = write["create"]["metadata"]
                items = self._dicts(self.core.list_namespaced_config_map(
                    meta["namespace"], field_selector=f"metadata.name={meta['name']}"))  # fmt: skip
                uid, who = controller_of(items[0]) if items else (owner, "")
                if uid != owner:
                    found.append(Foreign(subject(write["create"]), who))
        return found

    def _verbs(self, verb: str) -> dict[str, Callable[..., Any]]:
        apis = {"Job": (self.batch, "job"), "Deployment": (self.apps, "deployment"),
                "DaemonSet": (self.apps, "daemon_set"), "Service": (self.core, "service"),
                "ConfigMap": (self.core, "config_map")}  # fmt: skip
        return {kind: getattr(api, f"{verb}_namespaced_{name}") for kind, (api, name) in apis.items()}

    def _create(self, obj: Obj, owner: str | None, applied: Applied) -> None:
        meta = obj["metadata"]
        try:
            create = self._verbs("create")[obj["kind"]]
            response = create(meta["namespace"], obj, field_manager=FIELD_MANAGER, _preload_content=False)
            created = json.loads(response.read() or b"{}")
            response.release_conn()
        except ApiException as error:
            if error.status != 409:
                applied.failures.append(_failure(error, "create", subject(obj), class_of(obj)))
                return
            self._existing(obj, owner, applied)  # AlreadyExists: ours (the watch lags) or in the way
            return
        applied.created.add(subject(obj))
        if obj["kind"] in APPLIED_KINDS:
            self._own_as_applied(obj, created)

    def _own_as_applied(self, obj: Obj, created: Obj) -> None:
        """Make the fields a create gave us ours as an applier: a create is an update in the API server's
        field management, and fields an updater still owns are never removed by a later server-side apply
        (a changed port would be added beside the old one). A JSON patch turns the entry into an apply
        entry, as `kubectl apply --server-side` does when it takes over from client-side apply."""
        entries = (created.get("metadata") or {}).get("managedFields") or []
        index = next((i for i, e in enumerate(entries) if e.get("manager") == FIELD_MANAGER), None)
        if index is None or entries[index].get("operation") == "Apply":
            return
        path = f"/metadata/managedFields/{index}"
        ops = [{"op": "test", "path": f"{path}/manager", "value": FIELD_MANAGER},
               {"op": "replace", "path": f"{path}/operation", "value": "Apply"}]  # fmt: skip
        meta = obj["metadata"]
        try:
            change = self._verbs("patch")[obj["kind"]]
            _drain(change(meta["name"], meta["namespace"], ops, field_manager=FIELD_MANAGER,
                          _content_type="application/json-patch+json", _preload_content=False))  # fmt: skip
        except ApiException as error:  # the object serves as created; only a later removal of a field is kept
            LOG.warning("%s: fields not taken over for server-side apply: %s", subject(obj), error.reason)

    def _existing(self, obj: Obj, owner: str | None, applied: Applied) -> None:
        """Report an object found where `obj` was to be created unless `owner` controls it."""
        meta = obj["metadata"]
        try:  # a list by name, not a get: the operator's role lists and watches, it never reads one by name
            search = self._verbs("list")[obj["kind"]]
            found = self._dicts(search(meta["namespace"], field_selector=f"metadata.name={meta['name']}"))
        except ApiException as error:
            applied.failures.append(_failure(error, "create", subject(obj), class_of(obj)))
            return
        if not found:
            return  # deleted meanwhile: created again at the next reconcile
        uid, who = controller_of(found[0])
        if owner is not None and uid != owner:
            applied.foreign.append(Foreign(subject(obj), who, class_of(obj)))

    def _apply(self, obj: Obj, applied: Applied) -> None:
        """Server-side apply `obj` (which names the UID it was planned for: a replaced object is not written)."""
        meta = obj["metadata"]
        change = self._verbs("patch")[obj["kind"]]
        try:
            response = change(meta["name"], meta["namespace"], obj, field_manager=FIELD_MANAGER, force=True,
                              _content_type="application/apply-patch+yaml", _preload_content=False)  # fmt: skip
            written = json.loads(response.read() or b"{}")
            response.release_conn()
        except ApiException as error:
            replaced = error.status == 422 and "metadata.uid" in api_message(error.body, error.reason)
            if error.status == 409 or replaced:  # replaced or deleted since it was observed: planned again soon
                applied.conflicts += 1
            elif error.status != 404:
                applied.failures.append(_failure(error, "apply", subject(obj), class_of(obj)))
            return
        applied.applied.add(subject(obj))
        ops = inherited(written)  # made by an earlier version: its create entry goes, once
        if ops:
            try:
                _drain(change(meta["name"], meta["namespace"], ops, field_manager=FIELD_MANAGER,
                              _content_type="application/json-patch+json", _preload_content=False))  # fmt: skip
            except ApiException as error:  # only a later removal of a field is affected: tried at the next apply
                LOG.warning("%s: earlier version's managed fields kept: %s", subject(obj), error.reason)

    def stable_pods(self, namespace: str, edgemodel: str) -> list[Obj]:
        """Serving pods that take live traffic: where shadow evidence is counted."""
        selector = f"{LABEL_EDGEMODEL}={edgemodel},{LABEL_COMPONENT}=serve,{LABEL_TRACK}=stable"
        return self._dicts(self.core.list_namespaced_pod(namespace, label_selector=selector), "Pod")

    def serving_pods(self, namespace: str, edgemodel: str) -> list[Obj]:
        """Every serving pod of the EdgeModel, stable and candidate: where engine fallbacks are read."""
        selector = f"{LABEL_EDGEMODEL}={edgemodel},{LABEL_COMPONENT}=serve"
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


def _failure(error: ApiException, verb: str, what: str, class_key: str | None) -> WriteFailure:
    return WriteFailure(what, verb, int(error.status or 0), api_message(error.body, error.reason), class_key)


def _check(active: Callable[[], bool]) -> None:
    if not active():
        raise NotActiveError("this replica is no longer the active one")


def _drain(response: Any) -> None:
    """Read a raw response and hand its connection back: writes need no decoded reply, and decoding
    each one into client model objects costs more CPU than the request itself."""
    response.read()
    response.release_conn()
