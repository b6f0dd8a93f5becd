"""Hardware classes: which distinct kinds of node an EdgeModel's engines must be built for.

Pure functions from Node objects and an EdgeModel spec to classes. A class is the part of a
node's labels that decides whether an engine can run there (architecture, accelerator, GPU
product and compute capability, CPU features that change kernels); nodes that agree on all of
them share one engine. Each class gets a stable, label-safe key.

Presence is not schedulability: a class exists while any node with its labels exists, whether
cordoned, NotReady or tainted. A class is *new* only once one of its nodes can take the EdgeModel's
pods; it *leaves* only after no node with its labels has existed for a grace period (`presence`).
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgemodel_operator.api.spec import EdgeModelSpec, EngineTarget, HardwareMatch

ARCH = "kubernetes.io/arch"
GPU_PRESENT = "nvidia.com/gpu.present"
GPU_PRODUCT = "nvidia.com/gpu.product"
# The NVIDIA GPU Operator taints GPU nodes so that only pods asking for GPUs land there.
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
COMPUTE_MAJOR = "nvidia.com/gpu.compute.major"
COMPUTE_MINOR = "nvidia.com/gpu.compute.minor"
JETSON_MODULE = "nvidia.com/jetson.module"
CPUID_PREFIX = "feature.node.kubernetes.io/cpu-cpuid."
# CPU features that change which kernels an engine uses; others (SSE4, AES...) do not split classes.
KERNEL_FEATURES = ("AVX2", "AVX512F", "AVX512VNNI", "AVX512BF16", "AMXINT8", "AMXBF16", "ASIMDDP", "SVE", "I8MM")

Node = Mapping[str, Any]


@dataclass(frozen=True)
class HardwareClass:
    """One kind of node and the nodes of that kind."""

    key: str
    arch: str
    accelerator: str  # "none", or "nvidia" / "nvidia-orin" for GPUs
    gpu_product: str | None
    compute_capability: str | None
    cpu_features: tuple[str, ...]
    node_selector: dict[str, str]
    nodes: tuple[str, ...] = field(default=())  # every node with the class's labels, by name, sorted
    schedulable: tuple[str, ...] = field(default=())  # those Ready, not cordoned, whose taints the pods tolerate

    @property
    def has_gpu(self) -> bool:
        return self.accelerator != "none"


def _labels(node: Node) -> Mapping[str, str]:
    labels: Mapping[str, str] = node.get("metadata", {}).get("labels", {}) or {}
    return labels


def _ready_and_schedulable(node: Node) -> bool:
    if node.get("spec", {}).get("unschedulable"):
        return False
    conditions = node.get("status", {}).get("conditions", []) or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _signature(labels: Mapping[str, str]) -> tuple[str, str, str | None, str | None, tuple[str, ...]]:
    arch = labels.get(ARCH, "amd64")
    gpu = labels.get(GPU_PRESENT) == "true" or GPU_PRODUCT in labels
    accelerator = "none"
    if gpu:
        accelerator = (
            "nvidia-orin" if "orin" in labels.get(JETSON_MODULE, labels.get(GPU_PRODUCT, "")).lower() else "nvidia"
        )
    capability = None
    if gpu and COMPUTE_MAJOR in labels:
        capability = f"{labels[COMPUTE_MAJOR]}.{labels.get(COMPUTE_MINOR, '0')}"
    features = tuple(f for f in KERNEL_FEATURES if labels.get(CPUID_PREFIX + f) == "true")
    return arch, accelerator, labels.get(GPU_PRODUCT) if gpu else None, capability, features


def class_key(
    arch: str, accelerator: str, gpu_product: str | None, capability: str | None, features: Sequence[str]
) -> str:
    """Readable prefix plus a hash of everything: at most 40 characters, valid as a label value."""
    material = "|".join([arch, accelerator, gpu_product or "", capability or "", ",".join(features)])
    digest = hashlib.sha256(material.encode()).hexdigest()[:8]
    readable = f"{arch}-{accelerator}" + (f"-sm{capability.replace('.', '')}" if capability else "")
    return f"{readable[:31]}-{digest}"


def _selector(labels: Mapping[str, str], features: Sequence[str], gpu: bool) -> dict[str, str]:
    """Node labels that pin a workload to exactly this class."""
    keys = [ARCH, *(CPUID_PREFIX + f for f in features)]
    if gpu:
        keys += [GPU_PRODUCT, COMPUTE_MAJOR, COMPUTE_MINOR]
    return {k: labels[k] for k in keys if k in labels}


def tolerated(taint: Mapping[str, Any], tolerations: Iterable[Mapping[str, Any]]) -> bool:
    """Whether one of `tolerations` (Pod API shape) tolerates `taint`, by the scheduler's rules."""
    for toleration in tolerations:
        if toleration.get("effect") not in (None, taint.get("effect")):
            continue
        if toleration.get("key") is None and toleration.get("operator") == "Exists":
            return True
        if toleration.get("key") != taint.get("key"):
            continue
        if toleration.get("operator") == "Exists" or toleration.get("value") == taint.get("value"):
            return True
    return False


def _repelled(node: Node, tolerations: Sequence[Mapping[str, Any]]) -> bool:
    """A NoSchedule/NoExecute taint that neither `tolerations` nor, on a GPU node, the GPU toleration covers."""
    gpu = _signature(_labels(node))[1] != "none"
    allowed = [*tolerations, *([GPU_TOLERATION] if gpu else [])]
    return any(
        taint.get("effect") in {"NoSchedule", "NoExecute"} and not tolerated(taint, allowed)
        for taint in node.get("spec", {}).get("taints", []) or []
    )


def discover(
    nodes: Iterable[Node],
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] = (),
) -> list[HardwareClass]:
    """Every distinct class among the nodes that carry all of `node_selector`'s labels, ready or not.

    Each class lists all its nodes and, in `schedulable`, those that can take the pods now: Ready,
    not cordoned, and with no NoSchedule/NoExecute taint that `tolerations` leaves untolerated.
    """
    grouped: dict[tuple[Any, ...], list[tuple[str, Mapping[str, str], bool]]] = {}
    for node in nodes:
        labels = _labels(node)
        if any(labels.get(k) != v for k, v in (node_selector or {}).items()):
            continue
        usable = _ready_and_schedulable(node) and not _repelled(node, tolerations)
        grouped.setdefault(_signature(labels), []).append((node["metadata"]["name"], labels, usable))
    classes = []
    for (arch, accelerator, product, capability, features), members in grouped.items():
        members.sort(key=lambda member: (not member[2], member[0]))  # a usable node's labels pin the class
        classes.append(
            HardwareClass(
                key=class_key(arch, accelerator, product, capability, features),
                arch=arch,
                accelerator=accelerator,
                gpu_product=product,
                compute_capability=capability,
                cpu_features=features,
                node_selector=_selector(members[0][1], features, accelerator != "none"),
                nodes=tuple(sorted(name for name, _, _ in members)),
                schedulable=tuple(sorted(name for name, _, usable in members if usable)),
            )
        )
    return sorted(classes, key=lambda c: c.key)


def _matches(match: HardwareMatch, hardware: HardwareClass) -> bool:
    accelerator_ok = (
        match.accelerator is None
        or match.accelerator == hardware.accelerator
        or (match.accelerator == "nvidia" and hardware.accelerator.startswith("nvidia"))
    )
    checks = (
        match.arch is None or match.arch == hardware.arch,
        accelerator_ok,
        match.gpu_product is None or match.gpu_product == hardware.gpu_product,
        match.compute_capability is None or match.compute_capability == hardware.compute_capability,
        not match.cpu_features or set(match.cpu_features) <= set(hardware.cpu_features),
    )
    return all(checks)


def default_engine(hardware: HardwareClass) -> EngineTarget:
    """Without `spec.targets.engines`: TensorRT fp16 on NVIDIA classes, ONNX Runtime fp32 elsewhere."""
    if hardware.has_gpu:
        return EngineTarget(match=HardwareMatch(), engine="tensorrt", precision="fp16")
    return EngineTarget(match=HardwareMatch(), engine="onnxruntime", precision="fp32")


def engine_for(spec: EdgeModelSpec, hardware: HardwareClass) -> EngineTarget | None:
    """The first engine entry whose match fits the class; None when entries exist and none fits."""
    engines = spec.targets.engines if spec.targets else None
    if not engines:
        return default_engine(hardware)
    return next((entry for entry in engines if _matches(entry.match, hardware)), None)


@dataclass(frozen=True)
class Presence:
    """Which classes an EdgeModel has now, from the classes found and those it already knew."""

    classes: list[HardwareClass]  # with a node: known ones, and new ones that can take pods
    absent: dict[str, tuple[str, str]]  # key -> (absent since, retired at), RFC 3339: within the grace period
    retired: frozenset[str]  # without a node for longer than the grace period: what serves them goes
    wake_after: float | None  # seconds until the next absent class is due to retire


def _parse(moment: str) -> datetime.datetime | None:
    try:
        parsed = datetime.datetime.fromisoformat(moment.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def _format(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def presence(
    found: Sequence[HardwareClass], known: Mapping[str, str | None], *, now: str, grace_seconds: float
) -> Presence:
    """Present, absent and retired classes at `now` (RFC 3339).

    `found` is what `discover` sees; `known` maps each class the EdgeModel already has to since when
    it has been absent (None: it had a node when last seen). A known class stays while any node
    with its labels exists, however unschedulable; without one it is absent from `now` (or its
    recorded time) and retired once that has lasted `grace_seconds`. An unknown class becomes one
    only when a node of it can take the pods. A recorded time that cannot be read counts from `now`.
    """
    clock = _parse(now)
    if clock is None:
        raise ValueError(f"now is not an RFC 3339 time: {now!r}")
    present = {c.key for c in found}
    classes = [c for c in found if c.key in known or c.schedulable]
    absent: dict[str, tuple[str, str]] = {}
    retired: set[str] = set()
    waits: list[float] = []
    for key, recorded in known.items():
        if key in present:
            continue
        since = _parse(recorded or "") or clock
        since = min(since, clock)  # a time in the future (clock skew, a hand edit) counts from now
        end = since + datetime.timedelta(seconds=grace_seconds)
        left = (end - clock).total_seconds()
        if left <= 0:
            retired.add(key)
        else:
            absent[key] = (_format(since), _format(end))
            waits.append(left)
    return Presence(classes, absent, frozenset(retired), min(waits) if waits else None)


class ClassCache:
    """`discover` results, computed once per node set and EdgeModel targets rather than per reconcile.

    `version` names the node set: whoever passes it promises that the same version always comes with
    the same nodes as far as classes go (labels, cordon, taints, readiness, allocatable), and that any
    change of those brings a new version (the operator's node watch counts them). `None` computes
    afresh. Results of older versions are dropped as soon as a newer one is asked for.
    """

    def __init__(self) -> None:
        self._version: object = None
        self._found: dict[tuple[Any, ...], list[HardwareClass]] = {}
        self.computed = 0  # how many times `discover` ran (for tests and benchmarks)

    def discover(
        self,
        version: object,
        nodes: Iterable[Node],
        node_selector: Mapping[str, str] | None = None,
        tolerations: Sequence[Mapping[str, Any]] = (),
    ) -> list[HardwareClass]:
        """As `discover`; the same list contents for the same version, selector and tolerations."""
        if version is None:
            self.computed += 1
            return discover(nodes, node_selector, tolerations)
        if version != self._version:
            self._version, self._found = version, {}
        key = (tuple(sorted((node_selector or {}).items())), repr(sorted(repr(sorted(t.items())) for t in tolerations)))
        found = self._found.get(key)
        if found is None:
            self.computed += 1
            found = self._found[key] = discover(nodes, node_selector, tolerations)
        return list(found)


CLASSES = ClassCache()
"""The operator's one cache (see `ClassCache`)."""
