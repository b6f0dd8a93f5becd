"""Why a candidate's pods are not Ready, in words a person can act on. Pure.

Read from candidate serving pods as `controller.slim_serving_pod` keeps them: the PodScheduled
condition, and per container (the engine copy's init container too) its waiting reason and message, its
current and last termination (reason, exit code) and restart count. The first problem found wins, in the
order a person should fix them: a pod no node can take (the scheduler's message), an image that cannot
be pulled (with the image), a container that dies (CrashLoopBackOff with the last termination's reason
and exit code; OOMKilled said as such), then any other waiting reason (e.g. CreateContainerConfigError;
not PodInitializing, which only waits for the init containers).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Obj = dict[str, Any]
IMAGE_PULL = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
# Waiting reasons of a container that is on its way: PodInitializing while an init container (the engine
# copy) runs; that one's own status says what, if anything, is wrong.
WAITING_NORMALLY = frozenset({"ContainerCreating", "PodInitializing"})
MESSAGE_LIMIT = 300  # characters of a kubelet's or scheduler's message kept in a reason


def _clip(text: object) -> str:
    words = " ".join(str(text or "").split())
    return words if len(words) <= MESSAGE_LIMIT else words[: MESSAGE_LIMIT - 1] + "…"


def unschedulable(pod: Obj) -> str | None:
    """`Unschedulable: <the scheduler's message>` when the pod's PodScheduled condition is False."""
    for item in (pod.get("status") or {}).get("conditions") or []:
        if item.get("type") == "PodScheduled" and item.get("status") == "False":
            return (
                f"{item.get('reason') or 'Unschedulable'}: {_clip(item.get('message') or 'no node can take the pod')}"
            )
    return None


def _exit(terminated: Obj) -> str:
    return f"{terminated.get('reason') or 'Error'}, exit code {terminated.get('exitCode')}"


def container_problem(container: Obj) -> tuple[int, str] | None:
    """(rank, words) for one container status: lower ranks are told first; None when nothing is wrong."""
    state, last = container.get("state") or {}, container.get("lastState") or {}
    waiting, terminated = state.get("waiting") or {}, state.get("terminated") or {}
    last_terminated = last.get("terminated") or {}
    reason = waiting.get("reason")
    if reason in IMAGE_PULL:
        why = f": {_clip(waiting['message'])}" if waiting.get("message") else ""
        return 1, f"{reason}: image {container.get('image') or '?'} cannot be pulled{why}"
    if "OOMKilled" in {terminated.get("reason"), last_terminated.get("reason")}:
        restarts = container.get("restartCount") or 0
        return 2, f"OOMKilled: container {container.get('name')} ran out of memory (restarted {restarts} times)"
    if reason == "CrashLoopBackOff":
        died = f"last exit: {_exit(last_terminated)}" if last_terminated else "it keeps exiting"
        restarts = container.get("restartCount") or 0
        return 3, f"CrashLoopBackOff: container {container.get('name')} {died}, restarted {restarts} times"
    if terminated and terminated.get("exitCode") not in (None, 0):
        return 3, f"Terminated: container {container.get('name')} exited: {_exit(terminated)}"
    if reason and reason not in WAITING_NORMALLY:
        why = f": {_clip(waiting['message'])}" if waiting.get("message") else ""
        return 4, f"{reason}{why}"
    return None


def pod_problem(pods: Iterable[Obj]) -> str | None:
    """The most actionable reason the given pods are not Ready, or None when they show none (yet)."""
    found: list[tuple[int, str]] = []
    for pod in pods:
        if (pending := unschedulable(pod)) is not None:
            found.append((0, pending))
        status = pod.get("status") or {}
        for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
            if (problem := container_problem(container)) is not None:
                found.append(problem)
    return min(found)[1] if found else None
