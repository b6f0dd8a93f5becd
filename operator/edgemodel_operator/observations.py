"""Shadow evidence off the reconcile path: a poller gathers it, a store keeps the latest observation.

The reconcile never waits on Prometheus or a pod. It tells the poller which candidate each class of an
EdgeModel wants counters for (`EvidencePoller.want`, from `reconcile.evidence_wanted`) and reads the
latest observation from the store (`ObservationStore.fresh`): only one gathered for that very candidate
and no older than the maximum age counts; anything else is left out, which the rollout reads as "no
evidence now" (wait), never as zero requests or zero disagreements. The poller gathers for each wanted
EdgeModel every `interval` seconds, at most `concurrency` at once, each within `deadline` seconds (an
unreachable Prometheus or pod costs the poller a slot for that long, and nothing else); each fresh
observation queues its EdgeModel, so a decision follows as soon as the evidence allows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from edgemodel_operator import metrics
from edgemodel_operator.analysis import Counters

LOG = logging.getLogger("edgemodel.evidence")
Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, EdgeModel name)
Samples = dict[str, dict[str, Counters]]


class Source(Protocol):
    """Where counters come from (`evidence.PrometheusSource`, `evidence.ScrapeSource`)."""

    needs_pods: bool

    async def gather(
        self, namespace: str, edgemodel: str, candidates: Mapping[str, str], pods: list[Obj]
    ) -> Samples: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Observation:
    """One class's counters, by source, for one candidate revision, and when they were read."""

    revision: str
    samples: dict[str, Counters]
    taken: float  # time.monotonic() seconds

    def age(self, now: float) -> float:
        return now - self.taken


class ObservationStore:
    """The latest observation per (EdgeModel, class), in memory; lost on restart (the poller reads again)."""

    def __init__(self, max_age: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age, self._clock = max_age, clock
        self._latest: dict[Key, dict[str, Observation]] = {}

    def put(self, key: Key, candidates: Mapping[str, str], samples: Samples, taken: float) -> None:
        """Keep what was read at `taken` for each class of `candidates` that `samples` has."""
        latest = self._latest.setdefault(key, {})
        for class_key, revision in candidates.items():
            if class_key in samples:
                latest[class_key] = Observation(revision, samples[class_key], taken)

    def fresh(self, key: Key, candidates: Mapping[str, str]) -> Samples:
        """Counters by class for the classes of `candidates` whose latest observation is of the same
        candidate and at most `max_age` seconds old; other classes are missing (no evidence now)."""
        now = self._clock()
        found: Samples = {}
        for class_key, revision in candidates.items():
            seen = self._latest.get(key, {}).get(class_key)
            if seen is not None and seen.revision == revision and seen.age(now) <= self.max_age:
                found[class_key] = seen.samples
        return found

    def forget(self, key: Key) -> None:
        self._latest.pop(key, None)


class EvidencePoller:
    """Gathers shadow counters for the EdgeModels that want them (see the module docstring).

    `pods(namespace, edgemodel)` lists the stable serving pods (a blocking API call, run on the poller's
    own threads, never the reconcile's) when the source scrapes pods; `notify(key)` is called after each
    fresh observation. `interval`, `deadline`: seconds; `concurrency`: gathers in flight at most;
    `active()`: whether this replica acts (one standing by gathers nothing).
    """

    def __init__(
        self,
        source: Source,
        store: ObservationStore,
        *,
        pods: Callable[[str, str], list[Obj]],
        notify: Callable[[Key], None],
        interval: float,
        deadline: float,
        concurrency: int,
        active: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source, self.store, self._pods, self._notify, self._active = source, store, pods, notify, active
        self.interval, self.deadline, self._clock = interval, deadline, clock
        self._slots = asyncio.Semaphore(concurrency)
        self._threads = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="evidence")
        self._wanted: dict[Key, dict[str, str]] = {}
        self._due: dict[Key, float] = {}
        self._running: dict[Key, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def want(self, key: Key, candidates: Mapping[str, str]) -> None:
        """Gather for `key`'s `candidates` (class key -> candidate revision) from now on; empty: stop.
        A new or changed set is gathered at once."""
        wanted = dict(candidates)
        if not wanted:
            self._wanted.pop(key, None)
            self._due.pop(key, None)
            self.store.forget(key)
            return
        if self._wanted.get(key) != wanted:
            self._wanted[key] = wanted
            self._due[key] = self._clock()
            self._wake.set()

    def wanted(self) -> dict[Key, dict[str, str]]:
        return dict(self._wanted)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="evidence-poller")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.source.aclose()
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        while True:
            self._wake.clear()  # before looking: a `want` from now on wakes the wait below
            now = self._clock()
            for key, due in list(self._due.items()):
                if due <= now and key not in self._running:
                    self._running[key] = asyncio.create_task(self._poll(key), name=f"evidence-{key[0]}/{key[1]}")
            waiting = [due - now for key, due in self._due.items() if key not in self._running]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, min(waiting, default=self.interval)))

    async def _poll(self, key: Key) -> None:
        candidates = self._wanted.get(key, {})
        try:
            async with self._slots:
                if candidates and self._active():  # a replica standing by gathers nothing
                    await self._gather(key, candidates)
        finally:
            self._running.pop(key, None)
            if key in self._wanted:
                self._due[key] = self._clock() + self.interval
            self._wake.set()

    async def _gather(self, key: Key, candidates: dict[str, str]) -> None:
        namespace, name = key
        started = self._clock()
        try:
            async with asyncio.timeout(self.deadline):
                pods: list[Obj] = []
                if self.source.needs_pods:
                    loop = asyncio.get_running_loop()
                    pods = await loop.run_in_executor(self._threads, self._pods, namespace, name)
                samples = await self.source.gather(namespace, name, candidates, pods)
        except Exception as error:  # a monitoring outage delays decisions, it never makes them
            why = (
                "no answer within the deadline"
                if isinstance(error, TimeoutError)
                else str(error) or type(error).__name__
            )
            LOG.warning("no shadow evidence for %s/%s: %s", namespace, name, why)
            metrics.EVIDENCE_ERRORS.inc()
            return
        finally:
            metrics.EVIDENCE_SECONDS.observe(self._clock() - started)
        if self._wanted.get(key) == candidates:  # still what the EdgeModel wants
            self.store.put(key, candidates, samples, started)
            self._notify(key)
