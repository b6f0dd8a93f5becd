"""The operator at scale: evidence as observations, the evidence poller's deadlines, class caching,
the work queue's metrics and coalescing, and the API write budget."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from edgemodel_operator.api.spec import EdgeModelSpec
from edgemodel_operator.builders import revision_of
from edgemodel_operator.classes import ClassCache, discover
from edgemodel_operator.evidence import PrometheusSource, ScrapeSource
from edgemodel_operator.observations import EvidencePoller, ObservationStore
from edgemodel_operator.throttle import Budget
from edgemodel_operator.workqueue import WorkQueue
from tests.unit.test_operator_pure import NODES

KEY = ("ns", "em")
COUNTERS = {"pod-a": {"mirrored": 10.0, "compared": 10.0, "agreed": 10.0}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("taken_ago", "stored_for", "asked_for", "found"),
    [
        (None, "r2", "r2", False),  # no observation yet
        (5.0, "r2", "r2", True),  # fresh
        (30.0, "r2", "r2", True),  # exactly the maximum age
        (30.5, "r2", "r2", False),  # too old
        (1.0, "r1", "r2", False),  # another candidate's counters
    ],
    ids=["missing", "fresh", "at max age", "stale", "other candidate"],
)
def test_only_a_fresh_observation_of_the_same_candidate_is_evidence(
    taken_ago: float | None, stored_for: str, asked_for: str, found: bool
) -> None:
    clock = Clock()
    store = ObservationStore(max_age=30.0, clock=clock)
    if taken_ago is not None:
        store.put(KEY, {"c": stored_for}, {"c": COUNTERS}, taken=clock.now - taken_ago)
    fresh = store.fresh(KEY, {"c": asked_for})
    assert fresh == ({"c": COUNTERS} if found else {})  # a missing class reads as "no evidence now": wait


def test_a_forgotten_edgemodel_has_no_evidence() -> None:
    store = ObservationStore(max_age=30.0)
    store.put(KEY, {"c": "r"}, {"c": COUNTERS}, taken=time.monotonic())
    store.forget(KEY)
    assert store.fresh(KEY, {"c": "r"}) == {}


def _blackhole() -> tuple[socket.socket, str]:
    """A real listening socket that accepts connections (the kernel does) and never answers."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    return listener, f"http://127.0.0.1:{listener.getsockname()[1]}"


def _metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_a_hung_prometheus_costs_the_poller_its_deadline_and_the_event_loop_nothing() -> None:
    """A deadline shortened for speed; the integration test test_evidence_off_path runs the defaults."""
    listener, url = _blackhole()

    async def scenario() -> tuple[float, list[float]]:
        notified: list[tuple[str, str]] = []
        store = ObservationStore(max_age=30.0)
        poller = EvidencePoller(PrometheusSource(url), store, pods=lambda _n, _e: [], notify=notified.append,
                                interval=0.2, deadline=1.0, concurrency=2)  # fmt: skip
        poller.start()
        for i in range(5):
            poller.want(("ns", f"em-{i}"), {"c": "r"})
        lags = []  # how late the event loop runs a 50 ms sleep meanwhile
        for _ in range(30):
            started = time.monotonic()
            await asyncio.sleep(0.05)
            lags.append(time.monotonic() - started - 0.05)
        errors = _metric("edgemodel_operator_evidence_errors_total")
        await poller.stop()
        assert notified == []  # nothing observed: nothing queued, and nothing in the store
        assert all(store.fresh(("ns", f"em-{i}"), {"c": "r"}) == {} for i in range(5))
        return errors, lags

    before = _metric("edgemodel_operator_evidence_errors_total")
    try:
        errors, lags = asyncio.run(scenario())
    finally:
        listener.close()
    assert errors - before >= 2  # gatherings ended by the deadline, counted
    assert max(lags) < 0.8  # below the deadline: no gathering ever held the loop while it waited


def test_scrapes_of_pods_that_do_not_answer_end_at_their_timeout_together() -> None:
    listener, url = _blackhole()
    port = int(url.rsplit(":", 1)[1])
    pods = [
        {"metadata": {"name": f"p{i}", "labels": {"edgeml.dev/class": "c"}}, "status": {"podIP": "127.0.0.1"},
         "spec": {"containers": [{"ports": [{"name": "http", "containerPort": port}]}]}}
        for i in range(6)
    ]  # fmt: skip

    async def scenario() -> Any:
        source = ScrapeSource(timeout=0.3)
        try:
            return await source.gather("ns", "em", {"c": "r"}, pods)
        finally:
            await source.aclose()

    started = time.monotonic()
    try:
        found = asyncio.run(scenario())
    finally:
        listener.close()
    assert found == {"c": {}}  # every pod left out this time: no counts at all, not zero counts
    assert time.monotonic() - started < 6 * 0.3  # at once, not one after the other


def test_classes_are_computed_once_per_node_set_version_and_targets() -> None:
    cache = ClassCache()
    first = cache.discover(1, NODES)
    assert first == discover(NODES)
    assert cache.discover(1, NODES) == first
    assert cache.computed == 1
    selector = {"kubernetes.io/arch": "arm64"}
    assert cache.discover(1, NODES, selector) == discover(NODES, selector)
    assert cache.computed == 2  # other targets: computed for them
    fewer = NODES[:1]
    assert cache.discover(2, fewer) == discover(fewer)  # a new node set: computed again
    assert cache.discover(None, NODES) == discover(NODES)
    assert cache.computed == 4


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=30))
def test_a_burst_of_events_within_the_coalescing_window_queues_one_reconcile(keys: list[str]) -> None:
    async def scenario() -> list[str]:
        queue: WorkQueue[str] = WorkQueue(name="test-burst")
        for key in keys:
            queue.add_after(key, 0.05)
        await asyncio.sleep(0.1)
        taken = []
        while len(queue):
            taken.append(await queue.get())
        return taken

    assert sorted(asyncio.run(scenario())) == sorted(set(keys))


def test_the_work_queue_exports_controller_runtimes_metrics() -> None:
    labels = {"name": "test-metrics"}

    def value(name: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    async def scenario() -> None:
        queue: WorkQueue[str] = WorkQueue(name="test-metrics")
        queue.add("a")
        queue.add("a")
        queue.add("b")
        assert value("workqueue_depth") == 2
        key = await queue.get()
        await asyncio.sleep(0.02)
        queue.done(key)
        queue.retry("a", 0.01)
        assert value("workqueue_depth") == 1

    asyncio.run(scenario())
    assert value("workqueue_adds_total") == 3
    assert value("workqueue_retries_total") == 1
    assert value("workqueue_queue_duration_seconds_count") == 1
    assert value("workqueue_work_duration_seconds_count") == 1
    assert value("workqueue_work_duration_seconds_sum") >= 0.02


def test_the_write_budget_allows_a_burst_then_its_rate() -> None:
    clock = Clock()
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    budget = Budget(qps=10, burst=3, clock=clock, sleep=sleep)
    waits = [budget.take() for _ in range(5)]
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert waits[3:] == pytest.approx([0.1, 0.1])
    clock.now += 10  # idle: the bucket refills to the burst, no more
    assert [budget.take() for _ in range(4)] == pytest.approx([0.0, 0.0, 0.0, 0.1])
    with pytest.raises(ValueError, match="qps"):
        Budget(qps=0, burst=1)


def test_the_planner_decides_nothing_on_missing_or_stale_observations_and_at_once_on_a_fresh_one() -> None:
    """Observations as the controller reads them (`ObservationStore.fresh`) drive the rollout of test_rollout."""
    from tests.unit.test_rollout import _counters, _serving_first_revision

    cluster, _ = _serving_first_revision()
    cluster.step("2026-11-26T12:01:00Z")
    cluster.finish_builds()
    cluster.step("2026-11-26T12:01:10Z")
    cluster.pods_ready()
    key = cluster.body["status"]["classes"][0]["key"]
    revision = revision_of(EdgeModelSpec.model_validate(cluster.body["spec"]))  # the candidate
    clock = Clock()
    store = ObservationStore(max_age=30.0, clock=clock)

    cluster.evidence = store.fresh(KEY, {key: revision})  # no observation yet: no baseline, no shadow
    assert cluster.step("2026-11-26T12:01:20Z").status["classes"][0]["state"] == "Built"
    store.put(KEY, {key: revision}, {key: {}}, taken=clock.now)
    cluster.evidence = store.fresh(KEY, {key: revision})
    assert cluster.step("2026-11-26T12:01:21Z").status["classes"][0]["state"] == "Shadowing"

    store.put(KEY, {key: revision}, {key: {"pod-1": _counters(200, 200, 20)}}, taken=clock.now)  # disagreeing
    clock.now += 31  # ... but too old by the time it is read
    cluster.evidence = store.fresh(KEY, {key: revision})
    waiting = cluster.step("2026-11-26T12:02:30Z")
    assert waiting.status["classes"][0]["state"] == "Shadowing"  # not zero disagreements, not a decision
    assert not waiting.delete

    store.put(KEY, {key: revision}, {key: {"pod-1": _counters(200, 200, 20)}}, taken=clock.now)
    cluster.evidence = store.fresh(KEY, {key: revision})
    assert cluster.step("2026-11-26T12:02:31Z").status["classes"][0]["state"] == "RolledBack"


def test_the_operator_registers_no_handler_that_would_read_the_diff_base_it_leaves_empty() -> None:
    import kopf

    from edgemodel_operator.handlers import NoDiffBase, only_events_and_indexes

    assert only_events_and_indexes(kopf.get_default_registry())
    body = kopf.Body({"metadata": {"name": "n", "labels": {"a": "b"}}, "spec": {"x": [1, 2]}})
    assert NoDiffBase().build(body=body) == {}
