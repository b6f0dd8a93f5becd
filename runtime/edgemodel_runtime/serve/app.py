"""The inference server as a plain ASGI application: OIP v2 REST, metrics, shadow mirror.

No web framework: the request path is one dictionary lookup, one body read, one parse, one
inference in a worker thread and one encode, which is what keeps the server's own overhead small
next to the model's. Errors become OIP error bodies in one place (`_error_response`).
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from importlib.metadata import version as package_version
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edgemodel_runtime.power import Meter, Unavailable
from edgemodel_runtime.serve import protocol, transport
from edgemodel_runtime.serve.drift import DEFAULT_WINDOW, DriftTracker
from edgemodel_runtime.serve.fallback import FallbackState
from edgemodel_runtime.serve.metrics import ServerMetrics, create
from edgemodel_runtime.serve.model import Model
from edgemodel_runtime.serve.openapi import openapi_document
from edgemodel_runtime.serve.resources import Resources
from edgemodel_runtime.serve.shadow import INFERENCE_TIME_HEADER, ShadowConfig, ShadowMirror
from edgemodel_runtime.serve.shadow_config import ShadowConfigFile, ShadowConfigWatcher

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# How long a mirror that a new shadow configuration replaced may take to send the copies it holds.
RETIRE_SECONDS = 5.0

NOT_LOOKED_FOR = Unavailable("no energy sensor was looked for")
_MODEL_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<rest>/ready|/infer)?$")


@dataclass(frozen=True)
class ServerConfig:
    name: str
    revision: str = "stable"
    max_body_bytes: int = 64 << 20
    max_concurrency: int = 1
    shadow: ShadowConfig | None = None  # fixed for the server's life (--shadow-url)
    shadow_file: ShadowConfigFile | None = None  # re-read while serving (--shadow-config)
    fallback: FallbackState | None = None  # set when the engine could not load and the fallback serves
    drift_reference: dict[str, Any] | None = None  # the build report's `drift` field (see edgemodel_runtime.drift)
    drift_window: int = DEFAULT_WINDOW  # served rows each drift score looks back on
    energy: Meter | Unavailable = NOT_LOOKED_FOR  # see edgemodel_runtime.power


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class InferenceServer:
    """ASGI callable serving one model."""

    def __init__(self, model: Model, config: ServerConfig, metrics: ServerMetrics | None = None) -> None:
        self.model = model
        self.config = config
        self.metrics = metrics or create()
        self.ready = False
        self.draining = False
        self._engine = asyncio.Semaphore(config.max_concurrency)
        self.shadow: ShadowMirror | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._watcher: ShadowConfigWatcher | None = None
        self._openapi = orjson.dumps(openapi_document(config.name))
        # While the fallback serves, the model's metadata and readiness bodies carry one extra field,
        # `edgemodel` (see fallback.FallbackState.detail); OIP clients ignore fields they do not know.
        self._detail = {"edgemodel": config.fallback.detail()} if config.fallback else {}
        self._metadata = orjson.dumps(
            {
                "name": config.name,
                "versions": [config.revision],
                "platform": model.platform,
                "inputs": [spec.as_dict() for spec in model.inputs],
                "outputs": [spec.as_dict() for spec in model.outputs],
            }
            | self._detail
        )
        self._labels = {"model": config.name, "revision": config.revision}
        reason = config.fallback.reason if config.fallback else ""
        self.metrics.engine_fallback.labels(**self._labels, reason=reason).set(1 if config.fallback else 0)
        self.drift = DriftTracker(model.outputs, config.drift_reference, self._labels, config.drift_window)
        self.metrics.outputs.add(self.drift)
        self.resources = Resources(self.metrics, self._labels, config.energy)
        self._static_routes = self._build_static_routes()
        # Labelled children resolved once: a label lookup per request costs more than the observation.
        metrics = self.metrics
        self._in_flight = metrics.in_flight.labels(model=config.name)
        self._phase = {p: metrics.latency.labels(**self._labels, phase=p) for p in ("queue", "inference", "total")}
        self._outcome = {
            o: metrics.requests.labels(**self._labels, outcome=o) for o in ("ok", "client_error", "server_error")
        }

    # ---------------------------------------------------------------- lifecycle

    async def startup(self) -> None:
        await asyncio.to_thread(self.model.warm_up)
        if self.config.shadow is not None:
            await self.set_shadow(self.config.shadow)
        if self.config.shadow_file is not None:
            self._watcher = ShadowConfigWatcher(
                self.config.shadow_file, self.set_shadow, self.metrics, self.config.name,
                [output.name for output in self.model.outputs],
            )  # fmt: skip
            await self._watcher.start()
        self.ready = True

    async def shutdown(self) -> None:
        self.ready = False
        self.draining = True
        if self._watcher is not None:
            await self._watcher.stop()
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        if self.shadow is not None:
            await self.shadow.stop()

    async def set_shadow(self, config: ShadowConfig | None) -> None:
        """Mirror to `config` from the next request on (None: stop mirroring).

        The new mirror starts before requests switch to it, and the old one finishes its queue in
        the background, so no request waits for the change and no mirrored copy is lost to it
        unless the old candidate is too slow to take it.
        """
        mirror = None
        if config is not None:
            mirror = ShadowMirror(config, self.config.name, self.config.revision, self.metrics)
            await mirror.start()
        old, self.shadow = self.shadow, mirror
        if old is not None:
            task = asyncio.create_task(self._retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, mirror: ShadowMirror) -> None:
        abandoned = await mirror.retire(RETIRE_SECONDS)
        if abandoned:
            print(
                f"edgemodel serve: {abandoned} copies for candidate {mirror.config.candidate_revision} were not sent "
                f"within {RETIRE_SECONDS:g}s of its mirror being replaced",
                file=sys.stderr,
                flush=True,
            )

    # ---------------------------------------------------------------- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            status, body, headers = await self._route(scope, receive)
        except _HttpError as error:
            status, body, headers = _error_response(error.status, str(error))
        except protocol.ProtocolError as error:
            status, body, headers = _error_response(error.status, str(error))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as error:
                    await send({"type": "lifespan.startup.failed", "message": str(error)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _route(self, scope: Scope, receive: Receive) -> tuple[int, bytes, dict[str, str]]:
        path, method = scope["path"], scope["method"]
        if scope.get("query_string"):
            query = scope["query_string"].decode("latin-1")
            raise _HttpError(400, f"query parameters are not supported by this server (got {query!r})")
        static = self._static_routes.get(path)
        if static is not None:
            _allow(method, "GET")
            return static()
        match = _MODEL_PATH.match(path)
        unsupported = transport.unsupported_endpoint(path)
        if match is None or (unsupported and match["name"] != self.config.name):  # /v2/models/stats
            raise _HttpError(404, unsupported or f"no such endpoint: {path}")
        self._check_model(match["name"], match["version"])
        if match["rest"] == "/infer":
            _allow(method, "POST")
            return await self._infer(scope, receive, match["version"])
        _allow(method, "GET")
        return self._model_readiness() if match["rest"] == "/ready" else _json(200, self._metadata)

    def _build_static_routes(self) -> dict[str, Callable[[], tuple[int, bytes, dict[str, str]]]]:
        return {
            "/v2/health/live": lambda: _json(200, b'{"live":true}'),
            "/v2/health/ready": self._readiness,
            "/v2": lambda: _json(200, self._server_metadata()),
            "/metrics": self._metrics_page,
            "/openapi.json": lambda: _json(200, self._openapi),
        }

    def _metrics_page(self) -> tuple[int, bytes, dict[str, str]]:
        self.resources.refresh()
        return 200, generate_latest(self.metrics.registry), {"content-type": CONTENT_TYPE_LATEST}

    def _readiness(self) -> tuple[int, bytes, dict[str, str]]:
        return _json(200 if self.ready else 400, b'{"ready":%s}' % (b"true" if self.ready else b"false"))

    def _model_readiness(self) -> tuple[int, bytes, dict[str, str]]:
        """OIP model readiness: {"name", "ready"}, and the fallback detail while the fallback serves."""
        body = {"name": self.config.name, "ready": self.ready} | self._detail
        return _json(200 if self.ready else 400, orjson.dumps(body))

    def _server_metadata(self) -> bytes:
        return orjson.dumps(
            {"name": "edgemodel", "version": package_version("edgemodel"), "extensions": ["binary_tensor_data"]}
        )

    def _check_model(self, name: str, version: str | None) -> None:
        if name != self.config.name:
            raise _HttpError(404, f"unknown model {name!r}; this server serves {self.config.name!r}")
        if version is not None and version != self.config.revision:
            raise _HttpError(404, f"unknown version {version!r} of {name!r}; available: {self.config.revision!r}")

    async def _read_body(self, receive: Receive) -> bytes:
        """The request body, refused with 413 beyond the limit.

        An oversized body is still read to its end (and discarded, up to a bound) so that the client
        gets the 413 instead of a connection reset halfway through its upload.
        """
        limit = self.config.max_body_bytes
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _HttpError(400, "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            else:
                chunks = []
            if not message.get("more_body") or size > 4 * limit + (1 << 20):
                break
        if size > limit:
            raise _HttpError(413, f"request body of {size} bytes exceeds the limit of {limit}")
        return b"".join(chunks)

    def _predict(self, inputs: dict[str, Any]) -> dict[str, Any]:
        try:
            outputs = self.model.predict(inputs)
        except protocol.ProtocolError:
            raise
        except Exception as error:
            # ONNX Runtime reports inputs it cannot compute with (for example, dimensions too small
            # for a convolution) as INVALID_ARGUMENT or FAIL: the client's input, hence 400.
            text = str(error)
            if "INVALID_ARGUMENT" in text or "FAIL" in text or "Invalid" in type(error).__name__:
                raise protocol.ProtocolError(f"the model cannot run on this input: {text}") from error
            raise _HttpError(500, f"inference failed: {text}") from error
        self.drift.observe(outputs)  # counts only, in this worker thread: off the event loop
        return outputs

    async def _infer(self, scope: Scope, receive: Receive, version: str | None) -> tuple[int, bytes, dict[str, str]]:
        if not self.ready:
            raise _HttpError(503, "model is not ready")
        started = time.perf_counter()
        gauge = self._in_flight
        gauge.inc()
        outcome = "server_error"
        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            body = transport.decompress(
                await self._read_body(receive), headers.get("content-encoding"), self.config.max_body_bytes
            )
            request = protocol.parse_request(
                body,
                headers.get(protocol.BINARY_HEADER),
                self.model.inputs,
                self.model.outputs,
                (self.config.name, version or self.config.revision),
            )
            await _wait_for(self._engine, request.timeout_us)
            try:
                queued = time.perf_counter()
                outputs = await asyncio.to_thread(self._predict, request.inputs)
                inferred = time.perf_counter()
            finally:
                self._engine.release()
            response, response_headers = protocol.encode_response(
                self.config.name, self.config.revision, request, outputs
            )
            coding = transport.response_encoding(headers.get("accept-encoding"))
            if coding is not None:
                response = transport.compress(response, coding)
                response_headers["content-encoding"] = coding
            inference_seconds = inferred - queued
            response_headers[INFERENCE_TIME_HEADER] = f"{inference_seconds:.6f}"
            self._phase["queue"].observe(queued - started)
            self._phase["inference"].observe(inference_seconds)
            self._phase["total"].observe(time.perf_counter() - started)
            outcome = "ok"
            if self.shadow is not None:
                self.shadow.offer(body, _forwarded(headers), outputs, inference_seconds, request.requested_outputs)
            return 200, response, response_headers
        except (protocol.ProtocolError, _HttpError) as error:
            outcome = "client_error" if getattr(error, "status", 400) < 500 else "server_error"
            raise
        finally:
            gauge.dec()
            self._outcome[outcome].inc()


async def _wait_for(semaphore: asyncio.Semaphore, timeout_us: int | None) -> None:
    """Acquire `semaphore`, within `timeout_us` microseconds when set (0: no bound, as Triton)."""
    if not timeout_us:
        await semaphore.acquire()
        return
    try:
        await asyncio.wait_for(semaphore.acquire(), timeout_us / 1e6)
    except TimeoutError as error:
        raise _HttpError(
            503, f"the request waited longer than its timeout of {timeout_us} microseconds for the engine"
        ) from error


def _forwarded(headers: dict[str, str]) -> dict[str, str]:
    keep = ("content-type", protocol.BINARY_HEADER)
    return {k: v for k, v in headers.items() if k in keep}


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise _HttpError(405, f"method {method} not allowed; use {allowed}")


def _json(status: int, body: bytes) -> tuple[int, bytes, dict[str, str]]:
    return status, body, {"content-type": "application/json"}


def _error_response(status: int, message: str) -> tuple[int, bytes, dict[str, str]]:
    """The single place where failures become OIP error bodies."""
    return _json(status, orjson.dumps({"error": message}))
