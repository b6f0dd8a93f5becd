"""Engines on the node before they are needed: a candidate's engine is pulled onto every node of its class
before the candidate serves, so that its pods, and the promoted stable ones, start without the registry.

Per (revision, class) the operator runs a DaemonSet `<child name>-pull` on the class's nodes (its
selector and tolerations, as the serving pods'). Its one container runs the engine image by digest
(`imagePullPolicy: IfNotPresent`, see `enginecache`) and sleeps: the kubelet pulls the engine onto each
node (a pull cut short fails, and the kubelet retries it with backoff, 10 s doubling to 5 min; its Events
on the pod show each attempt), and while the revision serves, the running container keeps the kubelet's
image garbage collection off the engine. containerd 1.6 starts an attempt over from its first byte and
keeps nothing of it (docs/install.md "Interrupted pulls"), but keeps every image pulled whole: so an
engine image with part images (one over 16 MiB, see `edgemodel_runtime.build.engineimage`) is pulled
part by part first, one init container each, and a cut costs one part. The DaemonSet goes with the
revision's serving workload.

The candidate's workload is created once every scheduled pull pod is ready, or once the wait is over
(`Images.prefetch_timeout`, seconds from the DaemonSet's creation): a node that stays NotReady must not
hold a rollout back for ever; the class's status message says how many nodes have the engine. When the
revision comes to serve another artifact (a rebuild after its pods fell back, see `rebuild`), the
DaemonSet is patched to pull and keep that one.
"""

from __future__ import annotations

import datetime
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from edgemodel_operator.api.spec import EdgeModelSpec
from edgemodel_operator.builders import (
    LABEL_CLASS,
    LABEL_COMPONENT,
    LABEL_REVISION,
    RESTRICTED_CONTAINER,
    RESTRICTED_POD,
    Images,
    _labels,
    _node_selector,
    child_name,
    owner_reference,
    tolerations_for,
)
from edgemodel_operator.classes import HardwareClass
from edgemodel_operator.desired import ANNOTATION_APPLIED, applied_hash
from edgemodel_operator.enginecache import COPIER, engine_image
from edgemodel_operator.workloads import labels_of as _labels_of
from edgemodel_operator.workloads import ref_of as _ref

if TYPE_CHECKING:
    from edgemodel_operator.reconcile import Observed, Plan
    from edgemodel_operator.records import Attempt
    from edgemodel_operator.serving import Slot

Obj = dict[str, Any]
COMPONENT = "prefetch"
SUFFIX = "-pull"
SLEEP_SECONDS = "2147483647"  # the pull pod's container only has to exist: the image stays in use


def prefetch_name(edgemodel: str, revision: str, hardware: HardwareClass) -> str:
    """`<child name>-pull`: at most 58 + 5 = 63 characters."""
    return child_name(edgemodel, revision, hardware) + SUFFIX


def part_images(artifact: str, parts: Sequence[str]) -> list[str]:
    """The image references of an engine image's parts (manifest digests in its repository, from the build's
    outcome; see `edgemodel_runtime.build.engineimage`), in pull order; none unless every one is a well-formed
    `sha256:` digest and the artifact an image pinned by digest."""
    image = engine_image(artifact)
    digest = re.compile(r"sha256:[0-9a-f]{64}")
    if (
        image is None
        or not isinstance(parts, list | tuple)
        or not all(isinstance(part, str) and digest.fullmatch(part) for part in parts)
    ):
        return []
    repository = image.rsplit("@", 1)[0]
    return [f"{repository}@{part}" for part in parts]


def build_prefetch_daemonset(
    body: Obj, hardware: HardwareClass, revision: str, artifact: str, parts: Sequence[str] = ()
) -> Obj | None:
    """The DaemonSet that pulls one revision's engine image onto every node of `hardware` and keeps it there.

    With `parts` (the engine image's part images, see `part_images`), its pods first pull each part, one
    init container each, in order: a node keeps each part it pulled whole, so a pull cut short costs one
    part, and `kubectl get pods` shows how far each node is (`Init:2/5`). None when the artifact is no
    image pinned by digest (then nothing can be pulled ahead).
    """
    image = engine_image(artifact)
    if image is None:
        return None
    spec = EdgeModelSpec.model_validate(body["spec"])
    name = body["metadata"]["name"]
    labels = _labels(body, revision, hardware, COMPONENT)
    selector = {k: labels[k] for k in ("edgeml.dev/edgemodel", LABEL_REVISION, LABEL_CLASS, LABEL_COMPONENT)}
    container = {
        "name": "engine",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": [COPIER, "sleep", SLEEP_SECONDS],
        "securityContext": RESTRICTED_CONTAINER,
        "resources": {"requests": {"cpu": "1m", "memory": "4Mi"}, "limits": {"cpu": "10m", "memory": "16Mi"}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    # Each part holds the copier and a prefix of the engine image's layers: running it is the pull's end.
    pulls = [
        container | {"name": f"part-{number}", "image": reference, "command": [COPIER, "true"]}
        for number, reference in enumerate(part_images(artifact, parts), start=1)
    ]
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": prefetch_name(name, revision, hardware),
            "namespace": body["metadata"]["namespace"],
            "labels": labels,
            "ownerReferences": [owner_reference(body)],
        },
        "spec": {
            "selector": {"matchLabels": selector},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "100%"}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": _node_selector(spec, hardware),
                    "tolerations": tolerations_for(spec, hardware),
                    "securityContext": RESTRICTED_POD,
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 1,  # sleep ignores SIGTERM as PID 1; nothing to drain
                    **({"initContainers": pulls} if pulls else {}),
                    "containers": [container],
                },
            },
        },
    }


def retarget_patch(daemonset: Obj) -> Obj:
    """The strategic merge patch that turns an existing pull DaemonSet into `daemonset` (its pod template and
    applied hash), leaving none of the old pod's init containers behind: such a patch merges them by name,
    so the list is marked to be replaced whole, or removed when empty (an artifact with fewer parts, or none)."""
    template = daemonset["spec"]["template"]
    spec = template["spec"]
    pulls = spec.get("initContainers") or []
    whole = template | {"spec": spec | {"initContainers": [*pulls, {"$patch": "replace"}] if pulls else None}}
    return {"metadata": {"annotations": {ANNOTATION_APPLIED: applied_hash(daemonset)}}, "spec": {"template": whole}}


def is_prefetch(workload: Obj) -> bool:
    """Whether an observed DaemonSet is a pull DaemonSet (not a serving workload)."""
    return _labels_of(workload).get(LABEL_COMPONENT) == COMPONENT


def _seconds_since(moment: str | None, now: str) -> float:
    if not moment:
        return 0.0
    parse = datetime.datetime.fromisoformat
    return (parse(now.replace("Z", "+00:00")) - parse(moment.replace("Z", "+00:00"))).total_seconds()


def progress(daemonset: Obj, now: str, timeout: float) -> tuple[bool, str]:
    """(whether the candidate may start, a status message) for an observed pull DaemonSet at `now`.

    Done when the controller has seen the current spec and every scheduled pod is ready (at least one),
    or when `timeout` seconds have passed since the DaemonSet was created.
    """
    status = daemonset.get("status") or {}
    current = int(status.get("observedGeneration") or 0) >= int(daemonset["metadata"].get("generation") or 1)
    desired, ready = int(status.get("desiredNumberScheduled") or 0), int(status.get("numberReady") or 0)
    if current and desired > 0 and ready >= desired:
        return True, f"engine on all {desired} nodes of the class"
    waited = _seconds_since(daemonset["metadata"].get("creationTimestamp"), now)
    if waited >= timeout:
        return True, f"engine on {ready} of {desired} nodes after {timeout:g} s; the candidate starts anyway"
    return False, f"pulling the engine onto the class's nodes: {ready} of {desired} have it"


class PrefetchSteps(ABC):
    """The planner's prefetch steps (a mixin of the planner in `reconcile`)."""

    body: Obj
    images: Images
    revision: str
    now: str
    observed: Observed
    plan: Plan
    attempts: dict[str, Attempt]  # this revision's attempts after this plan, by class key

    @abstractmethod
    def _event(self, reason: str, message: str, obj: Obj | None = None) -> None:
        """Provided by the planner."""

    def _engine_on_nodes(self, slot: Slot) -> str | None:
        """None when the candidate of `slot` may start; else why it waits (its engine not yet on the nodes)."""
        if not (self.images.node_cache and self.images.prefetch):
            return None
        name = prefetch_name(self.body["metadata"]["name"], self.revision, slot.hardware)
        found = next((d for d in self.observed.prefetches if d["metadata"]["name"] == name), None)
        parts = (slot.attempt.build or {}).get("artifactParts") or []
        daemonset = build_prefetch_daemonset(self.body, slot.hardware, self.revision, slot.artifact, parts)
        if found is None:
            if daemonset is None:
                return None
            self.plan.create.append(daemonset)
            self._event("EnginePrefetch", f"{slot.hardware.key}: pulling {slot.artifact} onto the class's nodes",
                        daemonset)  # fmt: skip
            return "pulling the engine onto the class's nodes"
        written = (found["metadata"].get("annotations") or {}).get(ANNOTATION_APPLIED)
        if daemonset is not None and written is not None and written != applied_hash(daemonset):
            # The revision serves another artifact (a rebuild, see `rebuild`): pull that one and keep it.
            self.plan.patch.append(_ref(found | {"kind": "DaemonSet"}) | {"patch": retarget_patch(daemonset)})
            self._event("EnginePrefetch", f"{slot.hardware.key}: pulling {slot.artifact} onto the class's nodes",
                        found)  # fmt: skip
            return "pulling the engine onto the class's nodes"
        done, message = progress(found, self.now, self.images.prefetch_timeout)
        return None if done else message

    def _retire_prefetches(self) -> None:
        """Delete the pull DaemonSets whose (revision, class) has no serving workload, unless it is the current
        revision's on its way to serving (not rolled back)."""

        def key(obj: Obj) -> tuple[str, str]:
            labels = _labels_of(obj)
            return labels.get(LABEL_REVISION, ""), labels.get(LABEL_CLASS, "")

        serving = {key(w) for w in self.observed.deployments}
        for daemonset in self.observed.prefetches:
            revision, hardware = key(daemonset)
            attempt = self.attempts.get(hardware)
            coming = revision == self.revision and (attempt is None or attempt.state != "RolledBack")
            if (revision, hardware) not in serving and not coming:
                self.plan.delete.append(_ref(daemonset | {"kind": "DaemonSet"}))
