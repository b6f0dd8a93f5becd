"""kopf handlers: thin. Gather, plan (pure), apply, and write status only when it changed."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import kopf

from edgemodel_operator import metrics
from edgemodel_operator.api.resource import GROUP, PLURAL, VERSION
from edgemodel_operator.cluster import Cluster
from edgemodel_operator.reconcile import plan
from edgemodel_operator.settings import OperatorSettings

SETTINGS = OperatorSettings()
_cluster: Cluster | None = None


def _api() -> Cluster:
    global _cluster  # noqa: PLW0603 - one API client per process, made after kopf has logged in
    if _cluster is None:
        _cluster = Cluster()
    return _cluster


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = 20  # INFO and above become Events on the EdgeModel
    if SETTINGS.peering is None:
        settings.peering.standalone = True
    else:
        settings.peering.name = SETTINGS.peering
    from kubernetes import config
    from prometheus_client import start_http_server

    start_http_server(SETTINGS.metrics_port, addr=SETTINGS.metrics_host)

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


async def _reconcile(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger) -> None:
    with metrics.RECONCILE_SECONDS.time():
        try:
            await _reconcile_once(body, patch, logger)
        except Exception:
            metrics.RECONCILES.labels(outcome="error").inc()
            raise
    metrics.RECONCILES.labels(outcome="ok").inc()


async def _reconcile_once(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger) -> None:
    raw: dict[str, Any] = dict(body)
    cluster = _api()
    observed = await asyncio.to_thread(cluster.observe, raw)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = plan(observed, SETTINGS.images(), now)
    await asyncio.to_thread(cluster.apply, result)
    metrics.API_WRITES.labels(verb="create").inc(len(result.create))
    metrics.API_WRITES.labels(verb="delete").inc(len(result.delete))
    for reason, message in result.events:
        kopf.info(body, reason=reason, message=message)
    current = dict(body.get("status") or {})
    if any(current.get(key) != value for key, value in result.status.items()):  # write only what changed
        for key, value in result.status.items():
            patch.status[key] = value
        metrics.API_WRITES.labels(verb="patch_status").inc()
    logger.debug("reconciled: %d created, %d deleted", len(result.create), len(result.delete))


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def on_change(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, **_: Any) -> None:
    await _reconcile(body, patch, logger)


@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.resync_seconds, sharp=False)
async def resync(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, **_: Any) -> None:
    await _reconcile(body, patch, logger)
