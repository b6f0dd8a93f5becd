"""Shadow mirroring inside the stable server: copy sampled requests to a candidate, off the request path.

The client is answered first. A copy goes into a bounded queue (dropped and counted when full);
workers send it to the candidate, compare the candidate's outputs with stable's, and record
agreement, latency ratio and errors. A candidate that is down, slow or wrong can only cost queue
slots, never a client request.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx
import numpy.typing as npt

from edgemodel_runtime.build.compare import compare
from edgemodel_runtime.serve import protocol
from edgemodel_runtime.serve.metrics import ServerMetrics

INFERENCE_TIME_HEADER = "x-edgemodel-inference-seconds"


@dataclass(frozen=True)
class ShadowConfig:
    url: str  # the candidate server's base URL, e.g. http://ocr-candidate:8080
    mirror_percent: float = 100.0
    candidate_revision: str = "candidate"
    queue_size: int = 64
    workers: int = 2
    timeout_s: float = 5.0
    agreement_relative_error: float = 0.05  # larger relative differences, or another top-1 class, disagree


@dataclass(frozen=True)
class _Copy:
    body: bytes
    headers: dict[str, str]
    stable_outputs: dict[str, npt.NDArray[Any]]
    stable_seconds: float


class ShadowMirror:
    """A bounded queue of request copies and the workers that replay them against the candidate."""

    def __init__(
        self,
        config: ShadowConfig,
        model_name: str,
        stable_revision: str,
        metrics: ServerMetrics,
        seed: int | None = None,
    ) -> None:
        self.config = config
        self.model_name = model_name
        self.metrics = metrics
        self.labels = {
            "model": model_name,
            "stable_revision": stable_revision,
            "candidate_revision": config.candidate_revision,
        }
        self._queue: asyncio.Queue[_Copy] = asyncio.Queue(maxsize=config.queue_size)
        self._random = random.Random(seed)  # noqa: S311 - sampling traffic, not secrets
        self._tasks: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._client = httpx.AsyncClient(base_url=self.config.url, timeout=self.config.timeout_s)
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self.config.workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is not None:
            await self._client.aclose()

    def offer(
        self, body: bytes, headers: dict[str, str], stable_outputs: dict[str, npt.NDArray[Any]], stable_seconds: float
    ) -> None:
        """Maybe copy a served request; never blocks and never raises."""
        if self._random.random() * 100 >= self.config.mirror_percent:
            return
        try:
            self._queue.put_nowait(_Copy(body, headers, stable_outputs, stable_seconds))
        except asyncio.QueueFull:
            self.metrics.shadow_dropped.labels(**self.labels).inc()
            return
        self.metrics.shadow_mirrored.labels(**self.labels).inc()

    async def _work(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                await self._replay(item)
            except Exception as error:  # a worker must survive anything the candidate does
                self._error(type(error).__name__)
            finally:
                self._queue.task_done()

    def _error(self, kind: str) -> None:
        self.metrics.shadow_errors.labels(**self.labels, kind=kind).inc()

    async def _replay(self, item: _Copy) -> None:
        assert self._client is not None
        started = time.perf_counter()
        try:
            response = await self._client.post(
                f"/v2/models/{self.model_name}/infer", content=item.body, headers=item.headers
            )
        except httpx.TimeoutException:
            self._error("timeout")
            return
        except httpx.TransportError:
            self._error("connection")
            return
        round_trip = time.perf_counter() - started
        if response.status_code != 200:
            self._error(f"http_{response.status_code}")
            return
        try:
            outputs = protocol.decode_response(response.content, response.headers.get(protocol.BINARY_HEADER))
        except protocol.ProtocolError:
            self._error("bad_response")
            return
        if set(outputs) != set(item.stable_outputs):
            self._error("output_mismatch")
            return
        try:
            figures = compare([item.stable_outputs], [outputs])
        except ValueError:
            self._error("output_mismatch")
            return
        candidate_seconds = float(response.headers.get(INFERENCE_TIME_HEADER, round_trip))
        labels = self.labels
        self.metrics.shadow_compared.labels(**labels).inc()
        agreed = figures.max_relative_error <= self.config.agreement_relative_error and figures.top1_agreement in (
            None,
            1.0,
        )
        if agreed:
            self.metrics.shadow_agreed.labels(**labels).inc()
        if item.stable_seconds > 0:
            self.metrics.shadow_latency_ratio.labels(**labels).observe(candidate_seconds / item.stable_seconds)
        self.metrics.shadow_max_abs_error.labels(**labels).observe(figures.max_abs_error)
        if figures.cosine is not None:
            self.metrics.shadow_cosine.labels(**labels).observe(figures.cosine)

    async def drain(self, timeout: float) -> None:
        """Wait until queued copies are processed (for tests and orderly shutdown)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)

    async def retire(self, timeout: float) -> int:
        """Finish the copies already queued (up to `timeout`), then stop; the number abandoned.

        For a mirror that a new configuration replaced: nothing offers to it any more, so the queue
        only shrinks. Copies still queued at the deadline are dropped unsent, so that a candidate
        that is down cannot keep an old mirror alive.
        """
        try:
            await self.drain(timeout)
        finally:
            abandoned = self._queue.qsize()
            await self.stop()
        return abandoned
