"""kopf wiring, kept thin: indexes of what EdgeModels own, and watch events that queue them.

The watches keep in-memory indexes of EdgeModels, Nodes and the Jobs, build and candidate serving Pods,
Deployments and Services the operator labelled; any change to one of them queues its EdgeModel (a Node change that
can alter the hardware classes queues every EdgeModel and counts a new node set, for which classes
are computed once). Children's and nodes' events are coalesced (`event_coalesce_seconds`); the
children's watches carry the label selector to the API server, which filters them there (kopf's
handler `labels=` filters are applied on the client, after the event came). `Controller` workers do
the rest. These handlers keep no state on the objects: kopf writes no annotations and adds no finalizers.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Iterable, Mapping
from typing import Any, cast

import kopf

from edgemodel_operator import evidence
from edgemodel_operator.api.resource import GROUP, PLURAL, VERSION
from edgemodel_operator.builders import LABEL_COMPONENT, LABEL_EDGEMODEL, LABEL_TRACK
from edgemodel_operator.cluster import Cluster
from edgemodel_operator.controller import (
    Controller,
    Key,
    Obj,
    node_fingerprint,
    owned_by,
    phantoms,
    slim_configmap,
    slim_edgemodel,
    slim_job,
    slim_node,
    slim_pod,
    slim_service,
    slim_serving_pod,
    slim_workload,
)
from edgemodel_operator.prefetch import is_prefetch
from edgemodel_operator.reconcile import Observed
from edgemodel_operator.settings import OperatorSettings
from edgemodel_operator.throttle import Budget, BudgetedApiClient

SETTINGS = OperatorSettings()
LOG = logging.getLogger("edgemodel.operator")
OWNED = {LABEL_EDGEMODEL: kopf.PRESENT}
# Candidate serving pods only (why a candidate is not Ready, see `progress`): stable pods are not watched.
CANDIDATE_PODS: dict[str, Any] = {**OWNED, LABEL_COMPONENT: "serve", LABEL_TRACK: "candidate"}
# Kinds of the children the operator labels (LABEL_EDGEMODEL), as kopf resource selectors.
CHILDREN: list[tuple[str, str] | tuple[str, str, str]] = [
    ("batch", "v1", "jobs"),
    ("v1", "pods"),
    ("apps", "v1", "deployments"),
    ("apps", "v1", "daemonsets"),
    ("v1", "services"),
    ("v1", "configmaps"),
]
_clusters: list[Cluster] = []


def _api() -> Cluster:
    if not _clusters:  # one API client per process, made after the credentials are loaded
        _clusters.append(Cluster(BudgetedApiClient(Budget(SETTINGS.api_qps, SETTINGS.api_burst))))
    return _clusters[0]


class Peering:
    """Whether this replica is the one that acts, by kopf's rule: the highest priority among live peers.

    kopf pauses the watches of a replica that is not; this also stops that replica's queued and
    delayed work, which the watches cannot reach.
    """

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self.active = settings.peering is None

    def decide(self, peers: Mapping[str, Obj], now: datetime.datetime) -> bool:
        mine = self.settings.peering_priority
        for info in peers.values():
            seen = datetime.datetime.fromisoformat(str(info.get("lastseen", "1970-01-01T00:00:00+00:00")))
            alive = seen + datetime.timedelta(seconds=int(info.get("lifetime", 60))) > now
            if alive and int(info.get("priority", 0)) > mine:
                return False
        return any(int(info.get("priority", 0)) == mine for info in peers.values())

    async def watch(self) -> None:
        from kubernetes.client import CustomObjectsApi
        from kubernetes.client.exceptions import ApiException

        api = CustomObjectsApi(_api().api)
        name = str(self.settings.peering)
        while True:
            try:
                if self.settings.namespaces:
                    found = await asyncio.to_thread(
                        api.get_namespaced_custom_object,
                        "kopf.dev", "v1", self.settings.namespaces[0], "kopfpeerings", name,
                    )  # fmt: skip
                else:
                    found = await asyncio.to_thread(
                        api.get_cluster_custom_object, "kopf.dev", "v1", "clusterkopfpeerings", name
                    )
                active = self.decide(cast(Obj, found).get("status") or {}, datetime.datetime.now(datetime.UTC))
            except ApiException as error:
                LOG.warning("cannot read peering %s: %s", self.settings.peering, error.reason)
                active = False
            if active and not self.active:
                try:  # before it acts, a replica that stood by forgets what its paused watches missed
                    await _relist()
                except Exception as error:
                    LOG.warning("cannot re-list before taking over: %s", error)
                    active = False
            if active != self.active:
                LOG.info("peering: this replica is %s", "active" if active else "standing by")
                self.active = active
                if active:
                    _enqueue_all()
            await asyncio.sleep(self.settings.peering_check_seconds)


PEERING = Peering(SETTINGS)
CONTROLLER = Controller(
    cluster=_api,
    images=SETTINGS.images(),
    workers=SETTINGS.workers,
    hold_seconds=SETTINGS.status_hold_seconds,
    evidence=evidence.source(SETTINGS.prometheus_url),
    analysis_seconds=SETTINGS.analysis_seconds,
    fallback_check_seconds=SETTINGS.fallback_check_seconds,
    active=lambda: PEERING.active,
    absent_grace=SETTINGS.absent_class_grace_seconds,
    evidence_max_age=SETTINGS.evidence_max_age_seconds,
    evidence_deadline=SETTINGS.evidence_deadline_seconds,
    evidence_concurrency=SETTINGS.evidence_concurrency,
)
_indexes: dict[str, Any] = {}
_nodes: dict[str, tuple[Any, ...]] = {}
_phantoms: set[str] = set()  # UIDs of indexed objects known to be deleted (see `_relist`)
# The node set's version: counts the node changes that can alter hardware classes (see `node_changed`);
# the nodes as last read for it are kept, so a reconcile neither copies every node nor computes classes.
_node_set: dict[str, Any] = {"version": 0, "read": None, "nodes": []}
_seen: list[set[str]] = []  # while a re-list runs: UIDs the watches reported meanwhile


def _values(index: str, key: object) -> list[Obj]:
    store: Iterable[Obj] = _indexes[index].get(key, ())
    return [o for o in store if o["metadata"].get("uid") not in _phantoms]


def _note(uid: str | None) -> None:
    for seen in _seen:
        seen.add(str(uid))


async def _relist() -> None:
    """Compare the indexes with a fresh list: objects deleted while the watches were paused are phantoms
    that kopf's indexes keep; they are left out of every read from now on (a UID never comes back)."""
    seen: set[str] = set()
    _seen.append(seen)
    try:
        live = await asyncio.to_thread(_api().uids, SETTINGS.namespaces)
        indexed = [o for name in INDEXES for store in _indexes[name].values() for o in store]
        found = phantoms(indexed, live, seen)
    finally:
        _seen.remove(seen)
    if found:
        LOG.info("re-listed before acting: %d objects deleted while this replica stood by", len(found))
    _phantoms.update(found)
    _node_set["version"] += 1


def _read(key: Key) -> Observed | None:
    bodies = _values("edgemodels", key)
    if not bodies:
        return None
    body = bodies[0]
    uid = body["metadata"]["uid"]
    daemonsets = owned_by(uid, _values("daemonsets", key))
    version = _node_set["version"]
    if _node_set["read"] != version:
        _node_set.update(read=version, nodes=_values("nodes", None))
    return Observed(
        body=body,
        nodes=_node_set["nodes"],
        nodes_version=version,
        jobs=owned_by(uid, _values("jobs", key)),
        pods=_values("build_pods", key),
        serving_pods=_values("candidate_pods", key),
        deployments=owned_by(uid, _values("deployments", key) + [d for d in daemonsets if not is_prefetch(d)]),
        services=owned_by(uid, _values("services", key)),
        configmaps=owned_by(uid, _values("configmaps", key)),
        prefetches=[d for d in daemonsets if is_prefetch(d)],
    )


def _enqueue_all(delay: float = 0.0) -> None:
    for key in list(_indexes.get("edgemodels", {})):
        CONTROLLER.queue.add_after(key, delay)


class NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf builds a diff base for every event (a deep copy of the whole object, then cleaned), which only
    its change-detecting handlers (on.create/update/delete/resume, daemons, timers) read. This operator has
    none: its handlers are `on.event` and indexes. So every event's essence is empty, which saves the copy
    (the largest item of a profile of a fleet's rollout; about a tenth of the operator's CPU seconds
    measured without the profiler). `only_events_and_indexes` checks the premise at startup."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {})


def only_events_and_indexes(registry: Any) -> bool:
    """Whether `registry` (kopf's) holds no handler that reads the diff base (see `NoDiffBase`)."""
    return not registry._changing.get_all_handlers() and not registry._spawning.get_all_handlers()


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
    settings.posting.level = logging.WARNING
    if only_events_and_indexes(kopf.get_default_registry()):
        settings.persistence.diffbase_storage = NoDiffBase()
    if not LOG.isEnabledFor(logging.DEBUG):  # one line per watch event is too much for a fleet
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per evidence query
    # The handlers' `labels=` filters are kopf's, applied to every event the client receives; these
    # selectors are sent with the list and watch requests, so the API server filters what comes at all.
    for resource in CHILDREN:
        settings.watching.label_selectors[resource] = LABEL_EDGEMODEL
    if SETTINGS.peering is None:
        settings.peering.standalone = True
    else:
        settings.peering.name = SETTINGS.peering
        settings.peering.priority = SETTINGS.peering_priority
        settings.peering.lifetime = SETTINGS.peering_lifetime_seconds
    from kubernetes import config
    from prometheus_client import start_http_server

    start_http_server(SETTINGS.metrics_port, addr=SETTINGS.metrics_host)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    _indexes.update({name: kwargs[name] for name in INDEXES})
    CONTROLLER.start(_read)
    tasks = [asyncio.create_task(_resync(), name="resync")]
    if SETTINGS.peering is not None:
        tasks.append(asyncio.create_task(PEERING.watch(), name="peering"))
    _background.extend(tasks)


_background: list[asyncio.Task[None]] = []


async def _resync() -> None:
    """A full pass now and then, for anything a watch could have missed."""
    while True:
        await asyncio.sleep(SETTINGS.resync_seconds)
        if PEERING.active:
            _enqueue_all()


@kopf.on.cleanup()
async def shutdown(**_: Any) -> None:
    for task in _background:
        task.cancel()
    await CONTROLLER.stop()


# ------------------------------------------------------------------ indexes: what the planner reads


@kopf.index(GROUP, VERSION, PLURAL)
def edgemodels(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[Key, Obj]:
    return {(str(namespace), name): slim_edgemodel(dict(body))}


@kopf.index("v1", "nodes")
def nodes(body: kopf.Body, **_: Any) -> dict[None, Obj]:
    return {None: slim_node(dict(body))}  # one key: every node


@kopf.index("batch", "v1", "jobs", labels=OWNED)
def jobs(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> dict[Key, Obj]:
    return {(str(namespace), labels[LABEL_EDGEMODEL]): slim_job(dict(body))}


@kopf.index("v1", "pods", labels={**OWNED, LABEL_COMPONENT: "build"})
def build_pods(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> dict[Key, Obj]:
    return {(str(namespace), labels[LABEL_EDGEMODEL]): slim_pod(dict(body))}


@kopf.index("v1", "pods", labels=CANDIDATE_PODS)
def candidate_pods(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> dict[Key, Obj]:
    return {(str(namespace), labels[LABEL_EDGEMODEL]): slim_serving_pod(dict(body))}


@kopf.index("apps", "v1", "deployments", labels=OWNED)
def deployments(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> dict[Key, Obj]:
    return {(str(namespace), labels[LABEL_EDGEMODEL]): slim_workload(dict(body) | {"kind": "Deployment"})}


@kopf.index("apps", "v1", "daemonsets", labels=OWNED)
def daemonsets(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> dict[Key, Obj]:
    return {(str(namespace), labels[LABEL_EDGEMODEL]): slim_workload(dict(body) | {"kind": "DaemonSet"})}


@kopf.index("v1", "configmaps", labels=OWNED)
def configmaps(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> dict[Key, Obj]:
    return {(str(namespace), labels[LABEL_EDGEMODEL]): slim_configmap(dict(body))}


INDEXES = (
    "edgemodels",
    "nodes",
    "jobs",
    "build_pods",
    "candidate_pods",
    "deployments",
    "daemonsets",
    "services",
    "configmaps",
)


@kopf.index("v1", "services", labels=OWNED)
def services(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> dict[Key, Obj]:
    return {(str(namespace), labels[LABEL_EDGEMODEL]): slim_service(dict(body))}


# ------------------------------------------------------------------ events: what queues an EdgeModel


@kopf.on.event(GROUP, VERSION, PLURAL)
async def edgemodel_changed(namespace: str | None, name: str, uid: str | None, **_: Any) -> None:
    _note(uid)
    CONTROLLER.queue.add((str(namespace), name))


@kopf.on.event("batch", "v1", "jobs", labels=OWNED)
@kopf.on.event("v1", "pods", labels={**OWNED, LABEL_COMPONENT: "build"})
@kopf.on.event("v1", "pods", labels=CANDIDATE_PODS)
@kopf.on.event("apps", "v1", "deployments", labels=OWNED)
@kopf.on.event("apps", "v1", "daemonsets", labels=OWNED)
@kopf.on.event("v1", "services", labels=OWNED)
@kopf.on.event("v1", "configmaps", labels=OWNED)
async def owned_changed(namespace: str | None, labels: kopf.Labels, uid: str | None, **_: Any) -> None:
    _note(uid)
    CONTROLLER.queue.add_after((str(namespace), labels[LABEL_EDGEMODEL]), SETTINGS.event_coalesce_seconds)


@kopf.on.event("v1", "nodes")
async def node_changed(body: kopf.Body, name: str, type: str | None, uid: str | None, **_: Any) -> None:
    _note(uid)
    fingerprint = None if type == "DELETED" else node_fingerprint(slim_node(dict(body)))
    if _nodes.get(name) != fingerprint:
        if fingerprint is None:
            _nodes.pop(name, None)
        else:
            _nodes[name] = fingerprint
        _node_set["version"] += 1
        _enqueue_all(SETTINGS.event_coalesce_seconds)
