"""Reading and writing the cluster for one EdgeModel: the only module here that talks to the API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from edgemodel_operator.builders import LABEL_COMPONENT, LABEL_EDGEMODEL
from edgemodel_operator.reconcile import Observed, Plan

Obj = dict[str, Any]


class Cluster:
    """Typed-enough access to the objects an EdgeModel owns."""

    def __init__(self, api: client.ApiClient | None = None) -> None:
        self.api = api or client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)

    def _dicts(self, result: Any) -> list[Obj]:
        items: list[Obj] = self.api.sanitize_for_serialization(result).get("items", [])
        return items

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
            deployments=owned(self._dicts(self.apps.list_namespaced_deployment(namespace, label_selector=selector))),
            services=owned(
                self._dicts(self.core.list_namespaced_service(namespace, field_selector=f"metadata.name={name}"))
            ),
        )

    def apply(self, plan: Plan) -> None:
        """Create what is missing (an existing object is left alone) and delete what is retired."""
        create: dict[str, Callable[..., Any]] = {
            "Job": self.batch.create_namespaced_job,
            "Deployment": self.apps.create_namespaced_deployment,
            "Service": self.core.create_namespaced_service,
        }
        delete: dict[str, Callable[..., Any]] = {
            "Job": self.batch.delete_namespaced_job,
            "Deployment": self.apps.delete_namespaced_deployment,
        }
        for obj in plan.create:
            try:
                create[obj["kind"]](obj["metadata"]["namespace"], obj)
            except ApiException as error:
                if error.status != 409:
                    raise
        for ref in plan.delete:
            try:
                delete[ref["kind"]](ref["name"], ref["namespace"], propagation_policy="Background")
            except ApiException as error:
                if error.status != 404:
                    raise
