"""The reconciler: workers take EdgeModel keys from a queue, plan from the watched objects, write.

Children, nodes and the EdgeModel come from in-memory indexes that the watch streams keep current;
the decision records (see `records`) are read from the API server at each reconcile, so a decision
is never planned from a view older than the last one recorded. Writes go through `Cluster`: records
first, guarded by the resourceVersion they were read at (a conflict drops the plan and plans again),
then children, Events and the status (guarded by the EdgeModel's resourceVersion). Nothing private
overrides what the cluster shows: there is no copy of written statuses or decisions here. Nothing
is stored on the EdgeModel but its status: no annotations, no finalizers, so deleting one never
waits for the operator.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from edgemodel_operator import fallbacks, metrics, pacing, writes
from edgemodel_operator.builders import ANNOTATION_SPEC, Images
from edgemodel_operator.buildreport import CACHE_KEY, OUTCOME
from edgemodel_operator.cluster import Applied, Cluster, ConflictError, NotActiveError
from edgemodel_operator.desired import ANNOTATION_APPLIED, EDITED, edited
from edgemodel_operator.evidence import PrometheusSource, ScrapeSource
from edgemodel_operator.observations import EvidencePoller, ObservationStore
from edgemodel_operator.reconcile import Observed, Plan, evidence_wanted, plan
from edgemodel_operator.rollout import WARNINGS
from edgemodel_operator.workqueue import WorkQueue

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, EdgeModel name)

LOG = logging.getLogger("edgemodel.controller")
_META = ("name", "namespace", "uid", "generation", "labels", "deletionTimestamp", "resourceVersion",
         "creationTimestamp")  # fmt: skip
CONFLICT_RETRY_SECONDS = 0.5  # a write met newer state: plan again once the watches have caught up
WRITE_RETRY_SECONDS = 15.0  # a write was refused, or an object is in the way: try again this much later
WATCH_LAG_SECONDS = 2.0  # look again if the watch event of our own status write has not come by then
KEPT_ANNOTATIONS = {ANNOTATION_SPEC, ANNOTATION_APPLIED}


def _meta(obj: Obj) -> Obj:
    """Fresh copies of the metadata fields the planner reads (nothing kept alive from the watch event)."""
    meta = obj.get("metadata") or {}
    kept: Obj = {k: copy.deepcopy(meta[k]) for k in _META if k in meta}
    kept["ownerReferences"] = [{"uid": r.get("uid")} for r in meta.get("ownerReferences") or []]
    return kept


def _pick(source: Obj | None, keys: Iterable[str]) -> Obj:
    return {k: copy.deepcopy(source[k]) for k in keys if source and k in source}


def slim_edgemodel(obj: Obj) -> Obj:
    annotations = {k: v for k, v in (obj["metadata"].get("annotations") or {}).items() if k.startswith("edgeml.dev/")}
    return {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": _meta(obj) | {"annotations": annotations},
        "spec": copy.deepcopy(obj.get("spec") or {}),
        "status": copy.deepcopy(obj.get("status") or {}),
    }


def slim_workload(obj: Obj) -> Obj:
    """A Deployment or DaemonSet: its labels, the spec its revision was built from, replicas, rollout progress."""
    counts = ("replicas", "readyReplicas", "updatedReplicas", "observedGeneration", "numberReady",
              "desiredNumberScheduled", "updatedNumberScheduled")  # fmt: skip
    annotations = {k: v for k, v in (obj["metadata"].get("annotations") or {}).items() if k in KEPT_ANNOTATIONS}
    containers = ((obj.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or [{}]
    template = {"spec": {"containers": [{"args": list(containers[0].get("args") or [])}]}}  # names the artifact
    return {"kind": obj.get("kind"), "metadata": _meta(obj) | {"annotations": annotations, EDITED: edited(obj)},
            "spec": _pick(obj.get("spec"), ["replicas"]) | {"template": template},
            "status": _pick(obj.get("status"), counts)}  # fmt: skip


def slim_service(obj: Obj) -> Obj:
    annotations = {k: v for k, v in (obj["metadata"].get("annotations") or {}).items() if k == ANNOTATION_APPLIED}
    meta = _meta(obj) | {"annotations": annotations, EDITED: edited(obj)}
    return {"kind": "Service", "metadata": meta, "spec": _pick(obj.get("spec"), ["clusterIP"])}


def slim_configmap(obj: Obj) -> Obj:
    return {"kind": "ConfigMap", "metadata": _meta(obj), "data": dict(obj.get("data") or {})}


def slim_node(obj: Obj) -> Obj:
    status = obj.get("status") or {}
    meta = obj["metadata"]
    return {
        "metadata": {"name": meta["name"], "uid": meta.get("uid"), "labels": dict(meta.get("labels") or {})},
        "spec": {k: v for k, v in (obj.get("spec") or {}).items() if k in {"unschedulable", "taints"}},
        "status": {
            "conditions": [c for c in status.get("conditions") or [] if c.get("type") == "Ready"],
            "allocatable": dict(status.get("allocatable") or {}),
        },
    }


def node_fingerprint(node: Obj) -> tuple[Any, ...]:
    """What about a node can change the hardware classes or their schedulability: labels, cordon,
    taints, readiness, allocatable resources. Heartbeats change none of them, so they queue nothing."""
    ready = [c.get("status") for c in node["status"]["conditions"]]
    taints = sorted(
        (t.get("key") or "", t.get("value") or "", t.get("effect") or "") for t in node["spec"].get("taints") or []
    )
    allocatable = sorted((node["status"].get("allocatable") or {}).items())
    return (sorted(node["metadata"]["labels"].items()), bool(node["spec"].get("unschedulable")), taints, ready,
            allocatable)  # fmt: skip


def slim_job(obj: Obj) -> Obj:
    """A build Job: whether it finished, how, and the outcome the operator kept on it."""
    conditions = [_pick(c, ("type", "status")) for c in (obj.get("status") or {}).get("conditions") or []]
    annotations = {k: v for k, v in (obj["metadata"].get("annotations") or {}).items() if k in {OUTCOME, CACHE_KEY}}
    return {"kind": "Job", "metadata": _meta(obj) | {"annotations": annotations}, "status": {"conditions": conditions}}


def slim_pod(obj: Obj) -> Obj:
    """A build pod: its phase, why it waits for a node, and the report in its termination message, timed."""
    status = obj.get("status") or {}
    fields = ("exitCode", "message", "reason", "startedAt", "finishedAt")
    terminated = [
        {"state": {"terminated": _pick((c.get("state") or {}).get("terminated"), fields)}}
        for c in status.get("containerStatuses") or []
        if (c.get("state") or {}).get("terminated")
    ]
    conditions = [_pick(c, ("type", "status", "reason", "message")) for c in status.get("conditions") or []
                  if c.get("type") == "PodScheduled"]  # fmt: skip
    kept = {"phase": status.get("phase"), "startTime": status.get("startTime"), "conditions": conditions,
            "containerStatuses": terminated}  # fmt: skip
    created = {"creationTimestamp": obj["metadata"].get("creationTimestamp")}
    return {"kind": "Pod", "metadata": _meta(obj) | created, "status": kept}


def slim_serving_pod(obj: Obj) -> Obj:
    """A candidate serving pod: why it waits for a node, and per container (init containers too) why it is
    not running (waiting reason and message, current and last termination's reason and exit code,
    restarts). See `progress`."""
    status = obj.get("status") or {}
    conditions = [_pick(c, ("type", "status", "reason", "message")) for c in status.get("conditions") or []
                  if c.get("type") == "PodScheduled"]  # fmt: skip
    containers = [_slim_container(c) for c in status.get("containerStatuses") or []]
    init = [_slim_container(c) for c in status.get("initContainerStatuses") or []]  # the engine copy
    return {
        "kind": "Pod",
        "metadata": _meta(obj),
        "status": {"conditions": conditions, "containerStatuses": containers}
        | ({"initContainerStatuses": init} if init else {}),
    }


def _slim_container(container: Obj) -> Obj:
    state, last = container.get("state") or {}, container.get("lastState") or {}
    ended = ("reason", "exitCode")
    kept = {
        "state": {"waiting": _pick(state.get("waiting"), ("reason", "message")),
                  "terminated": _pick(state.get("terminated"), ended)},
        "lastState": {"terminated": _pick(last.get("terminated"), ended)},
    }  # fmt: skip
    return _pick(container, ("name", "image", "restartCount")) | kept


def phantoms(indexed: Iterable[Obj], live: set[str], seen: set[str]) -> set[str]:
    """UIDs of indexed objects that no longer exist: absent from a fresh list (`live`) and from every watch
    event since that list began (`seen`: what the watches added meanwhile is no phantom). A replica's
    indexes keep such objects when they were deleted while its watches were paused (standing by)."""
    uids = {str(o["metadata"].get("uid")) for o in indexed if o["metadata"].get("uid")}
    return uids - live - seen


def owned_by(uid: str, objects: Iterable[Obj]) -> list[Obj]:
    return [o for o in objects if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences", []) or [])]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Controller:
    """Queue, workers and the write rules; `read` turns a key into what the watches observed."""

    def __init__(
        self,
        *,
        cluster: Callable[[], Cluster],
        images: Images,
        workers: int,
        hold_seconds: float,
        evidence: PrometheusSource | ScrapeSource | None = None,
        analysis_seconds: float = 5.0,
        active: Callable[[], bool] = lambda: True,
        absent_grace: float = 600.0,
        fallback_check_seconds: float = 30.0,
        evidence_max_age: float = 30.0,
        evidence_deadline: float = 15.0,
        evidence_concurrency: int = 8,
    ) -> None:
        self.queue: WorkQueue[Key] = WorkQueue()
        self._cluster, self._images, self._workers, self._hold = cluster, images, workers, hold_seconds
        self._active = active
        # A shadowed class is planned again as each fresh observation comes (the poller queues it); this
        # wake-up is for when none comes (evidence unreachable), so that time-based steps still happen.
        self._analysis_seconds = max(analysis_seconds, evidence_max_age)
        # Shadow counters are gathered by their own poller and read here as observations: a reconcile
        # never waits on Prometheus or a pod (see `observations`).
        self.observations = ObservationStore(max_age=evidence_max_age)
        self._evidence = evidence or ScrapeSource()
        self._evidence_deadline = evidence_deadline
        self.poller = EvidencePoller(
            self._evidence,
            self.observations,
            pods=lambda namespace, name: self._cluster().stable_pods(namespace, name),
            notify=self.queue.add,
            interval=analysis_seconds,  # the poller's, not self._analysis_seconds
            deadline=evidence_deadline,
            concurrency=evidence_concurrency,
            active=active,
        )
        self._absent_grace = absent_grace
        self._fallback_check = fallback_check_seconds
        # When each EdgeModel's serving pods were last asked whether they fall back, and what they said: an
        # observation reused for `fallback_check_seconds`, asked beside the reconciles (never waited for by
        # one). It decides nothing on its own (see `rebuild`).
        self._fallbacks_read: dict[Key, tuple[float, dict[str, fallbacks.Fallback]]] = {}
        self._fallbacks_asking: set[Key] = set()
        self._asking: set[asyncio.Task[None]] = set()
        self._held: dict[Key, float] = {}
        # The EdgeModel's resourceVersion each last status write was made against: until the watch shows a
        # newer one, another write would only conflict. It delays a write, it never decides one.
        self._wrote_at: dict[Key, str] = {}
        self._failures: dict[Key, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.read: Callable[[Key], Observed | None] = lambda _key: None

    def start(self, read: Callable[[Key], Observed | None]) -> None:
        self.read = read
        self._tasks = [asyncio.create_task(self._work(), name=f"reconciler-{i}") for i in range(self._workers)]
        self.poller.start()

    async def stop(self) -> None:
        for task in [*self._tasks, *self._asking]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._asking, return_exceptions=True)
        await self.poller.stop()

    async def _work(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                if self._active():
                    await self._reconcile_counted(key)
            finally:
                self.queue.done(key)

    async def _reconcile_counted(self, key: Key) -> None:
        with metrics.RECONCILE_SECONDS.time():
            try:
                await self.reconcile(key)
            except Exception:
                failures = self._failures.get(key, 0) + 1
                self._failures[key] = failures
                delay = min(60.0, 0.5 * 2**failures)
                LOG.exception("reconciling %s/%s failed (attempt %d); retrying in %.1fs", *key, failures, delay)
                metrics.RECONCILES.labels(outcome="error").inc()
                self.queue.retry(key, delay)
                return
        self._failures.pop(key, None)
        metrics.RECONCILES.labels(outcome="ok").inc()

    async def reconcile(self, key: Key) -> None:
        observed = self.read(key)
        if observed is None or observed.body["metadata"].get("deletionTimestamp"):
            self._held.pop(key, None)
            self._wrote_at.pop(key, None)
            self._fallbacks_read.pop(key, None)
            self.poller.want(key, {})
            self.queue.forget(key)
            return  # ownerReferences let the garbage collector remove what it owned
        body = observed.body
        cluster = self._cluster()
        observed = dataclasses.replace(observed, records=await asyncio.to_thread(cluster.records, body))
        candidates = evidence_wanted(observed)
        self.poller.want(key, candidates)
        if candidates:  # the latest fresh observation of each class's candidate; none: wait for one
            observed = dataclasses.replace(observed, evidence=self.observations.fresh(key, candidates))
        observed, serving = self._with_fallbacks(cluster, key, observed)
        result = plan(observed, self._images, _now(), absent_grace=self._absent_grace)
        try:
            done = await asyncio.to_thread(cluster.apply, result, self._active, body["metadata"]["uid"])
        except ConflictError as error:
            LOG.info("%s/%s: %s; planning again", *key, error)
            self.queue.add_after(key, CONFLICT_RETRY_SECONDS)
            return
        except NotActiveError:
            return
        metrics.API_WRITES.labels(verb="create").inc(len(done.created) + len(done.recorded))
        metrics.API_WRITES.labels(verb="delete").inc(len(done.deleted))
        metrics.API_WRITES.labels(verb="patch").inc(len(done.patched))
        metrics.API_WRITES.labels(verb="apply").inc(len(done.applied))
        # An Event tied to a write is sent once that write happened, whichever kind it was.
        applied = done.created | done.deleted | done.recorded | done.patched | done.applied
        steps: dict[str, list[str]] = {}  # one Event per kind of step, naming every class it concerns
        for event in result.events:
            if event.subject is None or event.subject in applied:
                steps.setdefault(event.reason, []).append(event.message)
                if event.reason in {"Promoted", "RolledBack"}:
                    metrics.DECISIONS.labels(decision=event.reason).inc()
        for reason, messages in steps.items():
            kind = "Warning" if reason in WARNINGS else "Normal"
            await asyncio.to_thread(cluster.record_event, body, reason, "; ".join(messages), kind)
        metrics.API_WRITES.labels(verb="event").inc(len(steps))
        status = await self._report(cluster, body, result.status, done)
        await self._write_status(key, body, dict(body.get("status") or {}), pacing.with_defaults(status))
        self._again(key, result, done, serving)

    def _again(self, key: Key, result: Plan, done: Applied, serving: bool) -> None:
        """Plan `key` again later where nothing watched will change: refused writes, conflicts, shadow
        analysis, an absent class's retirement, and fallbacks of serving pods."""
        if done.failures or done.foreign:  # a quota or policy may change, or what is in the way go: unwatched
            self.queue.add_after(key, WRITE_RETRY_SECONDS)
        if done.conflicts:
            self.queue.add_after(key, CONFLICT_RETRY_SECONDS)
        elif result.analysing:
            self.queue.add_after(key, self._analysis_seconds)
        if result.wake_after is not None:  # an absent class is due to retire (a second late: past its time)
            self.queue.add_after(key, result.wake_after + 1.0)
        if serving:
            self.queue.add_after(key, self._fallback_check)

    async def _report(self, cluster: Cluster, body: Obj, status: Obj, done: Applied) -> Obj:
        """The planned status with refused writes and objects in the way on their class and the conditions;
        a Warning Event for each one the status did not show yet."""
        generation = int(body["metadata"].get("generation", 1))
        reported = writes.report(status, done.failures, done.foreign, generation=generation, now=_now())
        for reason, message in writes.news(dict(body.get("status") or {}), done.failures, done.foreign):
            await asyncio.to_thread(cluster.record_event, body, reason, message, "Warning")
            metrics.API_WRITES.labels(verb="event").inc()
        return reported

    def _with_fallbacks(self, cluster: Cluster, key: Key, observed: Observed) -> tuple[Observed, bool]:
        """`observed` with the fallbacks its serving pods reported when last asked, and whether it has ready
        serving pods at all (then it is planned again in `fallback_check_seconds`: a pod that falls back
        changes no watched object). Asking is never waited for here: it runs beside the reconciles, within
        the evidence deadline, and queues the EdgeModel when its answer differs from the last one."""
        serving = any(w.get("status", {}).get("readyReplicas") or w.get("status", {}).get("numberReady")
                      for w in observed.deployments)  # fmt: skip
        if not serving:
            return observed, False
        read = self._fallbacks_read.get(key)
        due = read is None or time.monotonic() - read[0] >= self._fallback_check
        if due and key not in self._fallbacks_asking:
            self._fallbacks_asking.add(key)
            task = asyncio.create_task(self._ask_fallbacks(cluster, key, read[1] if read else {}))
            self._asking.add(task)
            task.add_done_callback(self._asking.discard)
        return dataclasses.replace(observed, fallbacks=read[1] if read else {}), True

    async def _ask_fallbacks(self, cluster: Cluster, key: Key, before: dict[str, fallbacks.Fallback]) -> None:
        try:
            found = await asyncio.wait_for(self._fallbacks(cluster, key), timeout=self._evidence_deadline)
        except TimeoutError:
            LOG.warning("reading the engine fallbacks of %s/%s passed its deadline", *key)
            metrics.EVIDENCE_ERRORS.inc()
            found = {}
        finally:
            self._fallbacks_asking.discard(key)
        self._fallbacks_read[key] = (time.monotonic(), found)
        if found != before:
            self.queue.add(key)

    async def _fallbacks(self, cluster: Cluster, key: Key) -> dict[str, fallbacks.Fallback]:
        """Classes whose stable serving pods serve their fallback; none if that cannot be read now."""
        namespace, name = key
        try:
            if isinstance(self._evidence, PrometheusSource):
                url, timeout = self._evidence.url, self._evidence.timeout
                return await asyncio.to_thread(fallbacks.from_prometheus, url, namespace, name, timeout)
            pods = await asyncio.to_thread(cluster.serving_pods, namespace, name)  # a candidate's too
            return await asyncio.to_thread(fallbacks.from_pods, pods, self._evidence.timeout)
        except Exception as error:  # a monitoring outage hides a fallback for a while; it changes no decision
            LOG.warning("cannot read the engine fallbacks of %s/%s: %s", namespace, name, error)
            metrics.EVIDENCE_ERRORS.inc()
            return {}

    async def _write_status(self, key: Key, body: Obj, current: Obj, status: Obj) -> None:
        now = time.monotonic()
        delay = pacing.write_delay(status, current, held_since=self._held.get(key), now=now, hold=self._hold)
        if delay is None:
            self._held.pop(key, None)
            return
        if delay > 0:
            self._held.setdefault(key, now)
            self.queue.add_after(key, delay)
            return
        version = body["metadata"].get("resourceVersion")
        if not self._active():
            return
        if version is not None and self._wrote_at.get(key) == version:
            self.queue.add_after(key, WATCH_LAG_SECONDS)  # our last write is not in the watch yet
            return
        try:
            await asyncio.to_thread(self._cluster().patch_status, body, pacing.merge_patch(current, status))
        except ConflictError as error:  # the watch has not shown our last write yet, or someone else wrote
            LOG.debug("%s/%s: %s; writing the status again later", *key, error)
            self.queue.add_after(key, CONFLICT_RETRY_SECONDS)
            return
        metrics.API_WRITES.labels(verb="patch_status").inc()
        self._held.pop(key, None)
        if version is not None:
            self._wrote_at[key] = version
