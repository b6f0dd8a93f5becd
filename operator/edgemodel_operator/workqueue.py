"""A de-duplicating work queue of EdgeModel keys, as Kubernetes controllers use.

A key is queued at most once however many events name it; a key being reconciled is not handed
to a second worker: if it is added meanwhile, it is queued again once the first worker is done.
Keys can be added after a delay (retries with back-off, held status writes, and bursts of child
events coalesced into one reconcile: `add_after` with a short delay keeps the earliest pending add).

The queue exports controller-runtime's workqueue metrics, labelled with its `name`: `workqueue_depth`,
`workqueue_adds_total`, `workqueue_queue_duration_seconds` (added to taken by a worker),
`workqueue_work_duration_seconds` (taken to done) and `workqueue_retries_total` (`retry`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from edgemodel_operator import metrics

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self, name: str = "edgemodel", clock: Callable[[], float] = time.monotonic) -> None:
        self._order: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._active: set[K] = set()
        self._dirty: set[K] = set()
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._added: dict[K, float] = {}  # when each queued key was queued
        self._started: dict[K, float] = {}  # when each active key was taken
        self._clock = clock
        self._depth = metrics.WORKQUEUE_DEPTH.labels(name=name)
        self._adds = metrics.WORKQUEUE_ADDS.labels(name=name)
        self._retries = metrics.WORKQUEUE_RETRIES.labels(name=name)
        self._waited = metrics.WORKQUEUE_QUEUE_SECONDS.labels(name=name)
        self._worked = metrics.WORKQUEUE_WORK_SECONDS.labels(name=name)

    def __len__(self) -> int:
        return len(self._queued)

    def add(self, key: K) -> None:
        self._adds.inc()
        if key in self._active:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._added[key] = self._clock()
            self._order.put_nowait(key)
            self._depth.set(len(self._queued))

    def add_after(self, key: K, delay: float) -> None:
        """Queue `key` in `delay` seconds; an earlier pending delay for it wins."""
        if delay <= 0:
            self.add(key)
            return
        if key in self._queued:
            return  # it will be reconciled before the delay is over anyway
        loop = asyncio.get_running_loop()
        timer = self._timers.get(key)
        if timer is not None and timer.when() <= loop.time() + delay:
            return
        if timer is not None:
            timer.cancel()
        self._timers[key] = loop.call_later(delay, self._fire, key)

    def retry(self, key: K, delay: float) -> None:
        """Queue `key` again in `delay` seconds after a failed reconcile (counted as a retry)."""
        self._retries.inc()
        self.add_after(key, delay)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def get(self) -> K:
        key = await self._order.get()
        self._queued.discard(key)
        now = self._clock()
        self._waited.observe(now - self._added.pop(key, now))
        self._started[key] = now
        self._active.add(key)
        self._depth.set(len(self._queued))
        return key

    def done(self, key: K) -> None:
        self._active.discard(key)
        started = self._started.pop(key, None)
        if started is not None:
            self._worked.observe(self._clock() - started)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def forget(self, key: K) -> None:
        """Drop a pending delayed add (the object is gone)."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
