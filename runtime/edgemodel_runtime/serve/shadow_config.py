"""Shadow configuration from a file that changes while the server runs.

In a cluster the file is a key of a ConfigMap volume, which the kubelet updates by writing a new
directory and swapping the `..data` symlink. So the file is read by path at every poll: an open
handle or an inotify watch would keep following the old directory. Polling a small file every
couple of seconds costs nothing next to inference.

The file holds `{"url": "http://candidate:8080", "mirrorPercent": 100, "candidateRevision": "abc",
"agreement": {...}}`, where the optional `agreement` decides when a mirrored request agrees:
`{"maxRelativeError": 0.05, "minTop1Agreement": 1, "maxAbsError": ..., "minCosine": ...,
"outputs": {"NAME": {<the same limits>}}}` (unset limits are unchecked; an output's entry overrides
the limits it sets; without `agreement`, maxRelativeError 0.05 and minTop1Agreement 1).
An absent file, an empty one or `{}` means no mirroring. Content that does not parse or validate is
reported (log line, `edgemodel_shadow_config_reloads_total{result="invalid"}` and
`edgemodel_shadow_config_last_reload_successful` 0) and the previous configuration stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgemodel_runtime.build.compare import DEFAULT_AGREEMENT, Tolerance, Tolerances
from edgemodel_runtime.serve.metrics import ServerMetrics
from edgemodel_runtime.serve.shadow import ShadowConfig

KEYS = ("url", "mirrorPercent", "candidateRevision", "agreement")
# Agreement limits: JSON key, Tolerance field, smallest and largest value allowed.
LIMITS = {
    "maxAbsError": ("max_abs_error", 0.0, 1e30),
    "maxRelativeError": ("max_relative_error", 0.0, 1e6),
    "minCosine": ("min_cosine", -1.0, 1.0),
    "minTop1Agreement": ("min_top1_agreement", 0.0, 1.0),
}


class ShadowConfigError(ValueError):
    """The content of a shadow configuration is not one the server can apply."""


@dataclass(frozen=True)
class ShadowConfigFile:
    path: Path
    interval_s: float = 2.0
    queue_size: int = 64  # applies to every configuration the file gives


def check_candidate_url(url: str) -> str:
    """`url` if it is an http(s) URL with a host, else ShadowConfigError."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a port that is not a number
    except ValueError as error:
        raise ShadowConfigError(f"url {url!r} is not a valid URL: {error}") from error
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ShadowConfigError(f"url {url!r} must be http:// or https:// with a host")
    if parts.query or parts.fragment:
        raise ShadowConfigError(f"url {url!r} must not have a query or fragment (it is the candidate's base URL)")
    return url


def parse_shadow_config(content: bytes, queue_size: int = 64) -> ShadowConfig | None:
    """The configuration `content` describes: None for no mirroring, else a ShadowConfig."""
    if not content.strip():
        return None
    try:
        document = json.loads(content, parse_constant=_refuse_constant, object_pairs_hook=unique_keys)
    except (ValueError, UnicodeDecodeError) as error:
        raise ShadowConfigError(f"not valid JSON: {error}") from error
    if not isinstance(document, dict):
        raise ShadowConfigError(f"must be a JSON object, not {type(document).__name__}")
    if not document:
        return None
    unknown = sorted(set(document) - set(KEYS))
    if unknown:
        raise ShadowConfigError(f"unknown key(s) {', '.join(unknown)}; expected {', '.join(KEYS)}")
    url = document.get("url")
    if not isinstance(url, str):
        raise ShadowConfigError("url is required and must be a string")
    percent = document.get("mirrorPercent", 100)
    if isinstance(percent, bool) or not isinstance(percent, int | float):
        raise ShadowConfigError(f"mirrorPercent must be a number, not {json.dumps(percent)}")
    if not 0 < percent <= 100:
        raise ShadowConfigError(f"mirrorPercent must be within (0, 100], not {percent}")
    revision = document.get("candidateRevision", "candidate")
    if not isinstance(revision, str) or not revision:
        raise ShadowConfigError(f"candidateRevision must be a non-empty string, not {json.dumps(revision)}")
    return ShadowConfig(
        url=check_candidate_url(url),
        mirror_percent=float(percent),
        candidate_revision=revision,
        queue_size=queue_size,
        agreement=parse_agreement(document.get("agreement")),
    )


def _limits(value: Any, where: str, extra: tuple[str, ...] = ()) -> Tolerance:
    if not isinstance(value, dict):
        raise ShadowConfigError(f"{where} must be a JSON object, not {json.dumps(value)}")
    unknown = sorted(set(value) - set(LIMITS) - set(extra))
    if unknown:
        raise ShadowConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; expected {', '.join(LIMITS)}")
    limits: dict[str, float] = {}
    for key, (name, low, high) in LIMITS.items():
        number = value.get(key)
        if number is None:
            continue
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ShadowConfigError(f"{where}.{key} must be a number, not {json.dumps(number)}")
        exclusive = key.startswith("max")  # an error limit of 0 would refuse every float difference
        if not (low < number <= high if exclusive else low <= number <= high):
            bounds = f"({low:g}, {high:g}]" if exclusive else f"[{low:g}, {high:g}]"
            raise ShadowConfigError(f"{where}.{key} must be within {bounds}, not {number}")
        limits[name] = float(number)
    return Tolerance(**limits)


def parse_agreement(value: Any) -> Tolerances:
    """The agreement tolerances an `agreement` object describes; ShadowConfigError if invalid.

    A limit it does not set keeps its default (DEFAULT_AGREEMENT: maxRelativeError 0.05, minTop1Agreement 1),
    as spec.rollout.analysis.agreement defaults each field; minTop1Agreement 0 leaves top-1 unchecked.
    """
    if value is None:
        return Tolerances(DEFAULT_AGREEMENT)
    default = DEFAULT_AGREEMENT.merged(_limits(value, "agreement", extra=("outputs",)))
    outputs = value.get("outputs") or {}
    if not isinstance(outputs, dict):
        raise ShadowConfigError("agreement.outputs must be a JSON object of output name -> limits")
    per_output = tuple(
        (name, default.merged(_limits(limits, f"agreement.outputs[{name!r}]")))
        for name, limits in sorted(outputs.items())
    )
    return Tolerances(default, per_output)


def unknown_outputs(tolerances: Tolerances, outputs: Collection[str]) -> str | None:
    """What is wrong with per-output limits naming outputs the model lacks (their limits would apply to
    nothing), or None when every name is one of `outputs`."""
    unknown = sorted(name for name, _ in tolerances.outputs if name not in outputs)
    if not unknown:
        return None
    return f"agreement.outputs {unknown} are not outputs of the model ({sorted(outputs)})"


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict; ValueError for a key given twice (JSON parsers keep either one)."""
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise ValueError(f"key {key!r} appears twice")
        document[key] = value
    return document


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def describe(config: ShadowConfig | None) -> str:
    if config is None:
        return "no mirroring"
    return (
        f"mirroring {config.mirror_percent:g}% to {config.url} as candidate {config.candidate_revision}, "
        f"agreeing within {config.agreement.describe()}"
    )


def _log(message: str) -> None:
    print(f"edgemodel serve: {message}", file=sys.stderr, flush=True)


def _read(path: Path) -> bytes | None:
    """The file's content now, or None if there is no file (by path: follows the kubelet's symlink swap)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


_UNREAD = object()


class ShadowConfigWatcher:
    """Polls a shadow configuration file and hands each new valid configuration to `apply`."""

    def __init__(
        self,
        source: ShadowConfigFile,
        apply: Callable[[ShadowConfig | None], Awaitable[None]],
        metrics: ServerMetrics,
        model_name: str,
        outputs: Collection[str] = (),
    ) -> None:
        """`outputs`: the model's output names, against which per-output agreement limits are checked."""
        self.source = source
        self.outputs = frozenset(outputs)
        self.applied: ShadowConfig | None = None
        self._apply = apply
        self._seen: object = _UNREAD  # the last content read (bytes, None for absent) or the last read error
        self._result = {
            r: metrics.shadow_config_reloads.labels(model=model_name, result=r) for r in ("applied", "invalid")
        }
        self._successful = metrics.shadow_config_successful.labels(model=model_name)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Apply the file as it is now, then keep polling in the background."""
        await self.poll()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.source.interval_s)
            try:
                await self.poll()
            except Exception as error:  # the watcher must outlive any surprise; the server keeps serving
                self._invalid(f"{type(error).__name__}: {error}")

    async def poll(self) -> None:
        """Read the file once; apply its configuration if the content changed and is valid."""
        path = self.source.path
        try:
            content = await asyncio.to_thread(_read, path)
        except OSError as error:
            problem = f"cannot be read: {error}"
            if self._seen != problem:  # report each distinct problem once, not at every poll
                self._seen = problem
                self._invalid(problem)
            return
        if content == self._seen:
            return
        self._seen = content
        try:
            config = parse_shadow_config(content or b"", self.source.queue_size)
        except ShadowConfigError as error:
            self._invalid(str(error))
            return
        unknown = unknown_outputs(config.agreement, self.outputs) if config is not None and self.outputs else None
        if unknown:  # applied all the same: the rest of the configuration is valid, and stops nothing
            _log(f"shadow config {path}: {unknown}: their limits apply to nothing")
        if config != self.applied:
            await self._apply(config)
            self.applied = config
            _log(f"shadow config {path}: now {describe(config)}")
        self._result["applied"].inc()
        self._successful.set(1)

    def _invalid(self, problem: str) -> None:
        self._result["invalid"].inc()
        self._successful.set(0)
        _log(
            f"shadow config {self.source.path} is invalid and was not applied ({problem}); "
            f"keeping the previous configuration: {describe(self.applied)}"
        )
