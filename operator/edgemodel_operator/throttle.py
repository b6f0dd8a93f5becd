"""A client-side budget for the operator's writes to the API server, as client-go's QPS and burst.

A token bucket: `burst` writes may go at once, then `qps` a second. Every request but reads (GET, HEAD,
OPTIONS; watches are kopf's, on their own client) takes a token first, waiting in its calling thread
(writes run on worker threads, never on the event loop) until one is free. A fleet-wide change (a
node joining, an operator restart) then reaches the API server as a steady stream, not a spike that
API Priority and Fairness would answer with 429s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client

from edgemodel_operator import metrics

READS = frozenset({"GET", "HEAD", "OPTIONS"})


class Budget:
    """Tokens for `qps` writes a second with bursts of `burst` (thread-safe)."""

    def __init__(
        self,
        qps: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if qps <= 0 or burst < 1:
            raise ValueError(f"need qps > 0 and burst >= 1, not {qps} and {burst}")
        self.qps, self.burst, self._clock, self._sleep = qps, burst, clock, sleep
        self._tokens, self._at = float(burst), clock()
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take a token; seconds to wait before using it (0: at once)."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.qps)
            self._at = now
            self._tokens -= 1.0
            return 0.0 if self._tokens >= 0 else -self._tokens / self.qps

    def take(self) -> float:
        """Wait for a token; the seconds waited."""
        wait = self.reserve()
        if wait > 0:
            self._sleep(wait)
        return wait


class BudgetedApiClient(client.ApiClient):
    """An `ApiClient` whose writes wait for `budget` (see the module docstring)."""

    def __init__(self, budget: Budget, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.budget = budget

    def call_api(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if method.upper() not in READS:
            waited = self.budget.take()
            if waited > 0:
                metrics.API_THROTTLED_SECONDS.inc(waited)
        return super().call_api(method, url, *args, **kwargs)
