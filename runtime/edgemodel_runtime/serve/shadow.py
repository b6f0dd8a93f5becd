"""Shadow mirroring inside the stable server: copy sampled requests to a candidate, off the request path.

The client is answered first. A copy goes into a bounded queue (dropped and counted when full);
workers send it to the candidate, compare the candidate's outputs with stable's, and record
agreement, latency ratio and errors. A candidate that is down, slow or wrong can only cost queue
slots, never a client request.

What is compared is what the client was answered: the outputs it asked for (all of them when it
named none), matched by name. The copy asks the candidate for every output it has, as binary data
whatever the client chose, so that values arrive exactly (JSON cannot carry NaN or infinities) and
an output the candidate lacks shows as missing rather than as a refused request; of its answer, the
outputs the client asked for are compared. A candidate that lacks one of them, answers one stable
does not have (when the client named none), or holds one of another shape or datatype disagrees,
with a reason, as do values outside the agreement tolerance (edgemodel_runtime.build.compare).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy.typing as npt
import orjson

from edgemodel_runtime.build.compare import DEFAULT_AGREEMENT, Tolerances, agreement
from edgemodel_runtime.serve import codec, protocol
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
    # When a mirrored request agrees: every compared output within these limits (spec.rollout.analysis.agreement).
    agreement: Tolerances = field(default_factory=lambda: Tolerances(DEFAULT_AGREEMENT))


@dataclass(frozen=True)
class _Copy:
    body: bytes
    headers: dict[str, str]
    stable_outputs: dict[str, npt.NDArray[Any]]
    stable_seconds: float
    requested: tuple[str, ...] | None


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
        self,
        body: bytes,
        headers: dict[str, str],
        stable_outputs: dict[str, npt.NDArray[Any]],
        stable_seconds: float,
        requested: Sequence[str] | None = None,
    ) -> None:
        """Maybe copy a served request; never blocks and never raises.

        `stable_outputs` are every output stable computed; `requested` the names the client asked for
        (None: all), which are the ones stable answered and the candidate will answer.
        """
        if self._random.random() * 100 >= self.config.mirror_percent:
            return
        answered = (
            stable_outputs if requested is None else {n: stable_outputs[n] for n in requested if n in stable_outputs}
        )
        try:
            names = None if requested is None else tuple(requested)
            self._queue.put_nowait(_Copy(body, headers, answered, stable_seconds, names))
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
        body, headers = every_output_in_binary(item.body, item.headers)
        started = time.perf_counter()
        try:
            response = await self._client.post(f"/v2/models/{self.model_name}/infer", content=body, headers=headers)
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
        if item.requested is not None:
            outputs = {name: outputs[name] for name in item.requested if name in outputs}
        # Off the event loop: comparing large outputs is numpy work that would hold up client requests.
        comparison, missed = await asyncio.to_thread(agreement, item.stable_outputs, outputs, self.config.agreement)
        labels = self.labels
        self.metrics.shadow_compared.labels(**labels).inc()
        if missed:
            self.metrics.shadow_disagreed.labels(**labels, reason=missed[0].label).inc()
        else:
            self.metrics.shadow_agreed.labels(**labels).inc()
        candidate_seconds = inference_seconds(response.headers.get(INFERENCE_TIME_HEADER), round_trip)
        if item.stable_seconds > 0:
            self.metrics.shadow_latency_ratio.labels(**labels).observe(candidate_seconds / item.stable_seconds)
        if comparison is not None:
            errors = [o.max_abs_error for o in comparison.outputs if o.max_abs_error is not None]
            if errors:
                self.metrics.shadow_max_abs_error.labels(**labels).observe(max(errors))
            if comparison.cosine is not None:
                self.metrics.shadow_cosine.labels(**labels).observe(comparison.cosine)

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


def inference_seconds(header: str | None, round_trip: float) -> float:
    """The candidate's own inference time from its header, or the round trip when absent or not a time."""
    try:
        seconds = float(header) if header is not None else round_trip
    except ValueError:
        return round_trip
    return seconds if math.isfinite(seconds) and seconds >= 0 else round_trip


def every_output_in_binary(body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    """The same request asking for every output as binary data, without the model it names (unchanged
    if it cannot be read).

    Binary outputs carry every value exactly, where JSON cannot carry NaN or infinities; asking for
    all outputs lets an output the candidate lacks show as missing instead of a refused request. The
    body's model_name and model_version name stable's model and version, which the candidate would
    refuse as another version; the copy's URL names the model.
    """
    length = headers.get(protocol.BINARY_HEADER)
    try:
        cut = int(length) if length is not None else len(body)
        encode: Callable[[Any], bytes] = orjson.dumps
        try:
            document = orjson.loads(body[:cut])
        except orjson.JSONDecodeError:  # NaN or Infinity tokens, which orjson would also write back as null
            document, encode = codec.loads(body[:cut], "request"), _dumps_with_tokens
        if not isinstance(document, dict) or not 0 <= cut <= len(body):
            return body, headers
        parameters = document.get("parameters") or {}
        document["parameters"] = {**parameters, "binary_data_output": True}
        document.pop("outputs", None)
        # The body may name stable's version (KServe's clients send model_name and model_version); the
        # candidate serves another, and the copy's URL already names the model.
        document.pop("model_name", None)
        document.pop("model_version", None)
        header = encode(document)
    except (ValueError, TypeError, AttributeError, protocol.ProtocolError):
        return body, headers
    return header + body[cut:], {**headers, protocol.BINARY_HEADER: str(len(header))}


def _dumps_with_tokens(document: Any) -> bytes:
    """JSON with NaN, Infinity and -Infinity as those tokens; floats as their shortest round-trip decimal, which
    the candidate reads back to the same double that stable read (codec.loads reads numbers as doubles)."""
    return json.dumps(document, allow_nan=True, separators=(",", ":")).encode()
