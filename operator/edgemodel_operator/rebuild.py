"""Building a class's engine again when its serving pods cannot load it. Pure.

When the pods of the revision that serves a class report that they serve their fallback (see
`fallbacks`: the engine could not be loaded, e.g. after a driver, TensorRT or OpenVINO change on the
node), the attempt goes back from Promoted to Building, once per attempt: its build Job is deleted,
and once it and its pods are gone a new Job builds with `--no-cache` (the registry's engine of the same
cache key is the one the pods could not load). The pods keep serving the fallback meanwhile (on a GPU
class whose build cannot run beside them they yield to it, see `handoff`, and come back once built). When
the new build is in, the attempt is promoted again (it already serves the class) and the serving
workload's container is patched to the new artifact, which rolls its pods out.

A second failure to load the rebuilt engine does not build again: the EdgeModel stays Degraded with
reason EngineFallback, and a person decides (for example by deleting the build Job).
"""

from __future__ import annotations

import copy
from typing import Any

from edgemodel_operator.fallbacks import Fallback
from edgemodel_operator.records import Attempt
from edgemodel_operator.rollout import Step

Obj = dict[str, Any]
NO_CACHE = "--no-cache"


def rebuild_on_fallback(attempt: Attempt, fallback: Fallback | None, job: Obj | None) -> tuple[Attempt, Step | None]:
    """Promoted -> Building when the pods serving this attempt's revision fall back, unless it was rebuilt once.

    `job` is the attempt's build Job as observed (None if gone); its UID is kept in `attempt.rebuild` so
    that the old Job and its pods are told apart from the new ones.
    """
    if attempt.state != "Promoted" or fallback is None or attempt.rebuild is not None:
        return attempt, None
    if attempt.revision not in fallback.revisions or not attempt.build:
        return attempt, None
    digest = str(attempt.build.get("artifactDigest"))
    meta = (job or {}).get("metadata") or {}
    why = f"{len(fallback.pods)} serving pod(s) cannot load {digest} ({fallback.reason}) and serve the fallback"
    moved = attempt.moved(
        "Building",
        build=None,
        message=f"building again: {why}",
        rebuild={
            "artifactDigest": digest,
            "job": meta.get("uid"),
            "jobName": meta.get("name"),
            "reason": fallback.reason,
        },
    )
    return moved, Step("Rebuilding", f"{attempt.key}: {why}; building the engine again without the cache")


def replaced_build(attempt: Attempt, job: Obj | None, pods: list[Obj]) -> bool:
    """True while the build that the rebuild replaces is still around: its Job (the UID the attempt kept)
    or a pod of a Job of that name, which the new Job's outcome must not be read from."""
    if attempt.state != "Building" or attempt.rebuild is None:
        return False
    if job is not None:
        replaced = attempt.rebuild.get("job")
        return replaced is not None and job["metadata"].get("uid") == replaced
    name = attempt.rebuild.get("jobName")
    return any(((p.get("metadata") or {}).get("labels") or {}).get("job-name") == name for p in pods if name)


def without_cache(job: Obj) -> Obj:
    """The build Job with `--no-cache` added to its build container's arguments."""
    rebuilt = copy.deepcopy(job)
    container = rebuilt["spec"]["template"]["spec"]["containers"][0]
    if NO_CACHE not in container["args"]:
        container["args"] = [*container["args"], NO_CACHE]
    return rebuilt


def artifact_patch(workload: Obj, desired: Obj) -> Obj | None:
    """A patch of the serving container when the workload serves another artifact than `desired` (the
    workload built for the rebuilt engine); None when it serves that one."""
    current = list(((workload.get("spec") or {}).get("template", {}).get("spec", {}).get("containers") or [{}])[0]
                   .get("args") or [])  # fmt: skip
    wanted = desired["spec"]["template"]["spec"]["containers"][0]
    if current[1:2] == wanted["args"][1:2]:  # `serve ARTIFACT ...`: the artifact it serves
        return None
    # The whole desired container list: the same result as a JSON merge patch (lists replaced) and as a
    # strategic one (containers merged by name).
    return {
        "spec": {"template": {"spec": {"containers": copy.deepcopy(desired["spec"]["template"]["spec"]["containers"])}}}
    }
