"""The node-local engine cache: serving pods take their engine from the node's container runtime. Pure.

Every engine a build pushes is also a container image (`edgemodel_runtime.build.engineimage`): one layer
with a static busybox, one with the engine's files under /engine, and one with the original model under
/fallback (files over 16 MiB in slices of their own layers, under /slices, joined again here). Its
manifest digest is the artifact digest the operator already serves by. A serving pod gets an init
container that runs that image by digest with `imagePullPolicy: IfNotPresent` and copies the engine into
the pod's cache emptyDir, where `edgemodel serve oci://...@sha256:HEX` finds it (directory HEX[:16])
without the registry, verifying every file against the build report's digests before it loads; and the
model to /cache/fallback-<model digest[:16]>, where the server finds its fallback (checked against the
model's digest) if the engine cannot be loaded.

So the node's containerd content store is the cache, keyed and verified by digest: it survives pod
deletion and registry outages, the kubelet's image garbage collection sizes it, and with neither the
image on the node nor the registry reachable the pod waits in `ImagePullBackOff` (the kubelet's backoff,
a one-line reason in its status and Events) instead of crash-looping. It needs no hostPath, so every pod
stays within the restricted Pod Security Standard, and no image volumes (containerd 2.1+).
"""

from __future__ import annotations

from typing import Any

CACHE_DIR = "/cache"  # the serving pod's emptyDir; EDGEMODEL_ARTIFACT_CACHE points there
INIT_CONTAINER = "engine"
COPIER = "/busybox"  # in the engine image (engineimage.COPIER)
ENGINE_DIR = "/engine"  # in the engine image (engineimage.ENGINE_DIR)
FALLBACK_DIR = "/fallback"  # in the engine image (engineimage.FALLBACK_DIR), when the build put the model there
DIGEST_PREFIX = "@sha256:"
SLICES_DIR = "/slices"  # in the engine image (engineimage.SLICES_DIR): /slices/<engine|fallback>/<name>/<NNNN>
# $1: the engine's cache directory; $2: the fallback model's (or empty). A copy cut short (the container
# killed mid-way, the disk full) is never mistaken for a whole one: files land in a staging directory that
# is renamed into place whole; an existing copy is kept. A file the image holds in slices (a large one, see
# engineimage) is joined from them, in order, in the staging directory. The engine must be copied; the
# fallback model is copied if it can be (a pod whose fallback copy failed still serves its engine, and
# fetches its fallback only if it needs one). The server verifies every file by digest before it loads it.
COPY_SCRIPT = (
    "set -eu; "
    'join() { for s in "$1"/*; do if [ -d "$s" ]; then '
    f'{COPIER} cat "$s"/* > "$2/${{s##*/}}" || return 1; fi; done; }}; '
    'copy() { if [ -d "$2" ]; then echo "$3 already in $2"; return 0; fi; '
    f'{COPIER} rm -rf "$2.partial" && {COPIER} mkdir -p "$2.partial" && '
    f'{COPIER} cp "$1"/* "$2.partial/" && join "$4" "$2.partial" && '
    f'{COPIER} mv "$2.partial" "$2" && echo "$3 copied to $2"; }}; '
    f'copy {ENGINE_DIR} "$1" engine {SLICES_DIR}{ENGINE_DIR}; '
    f'if [ -n "${{2:-}}" ] && [ -d {FALLBACK_DIR} ]; then '
    f'copy {FALLBACK_DIR} "$2" "fallback model" {SLICES_DIR}{FALLBACK_DIR} || {{ {COPIER} rm -rf "$2.partial"; '
    'echo "fallback model not copied to $2: the server fetches it if it needs it"; }; fi'
)


def engine_image(artifact: str) -> str | None:
    """The image reference of an engine artifact `oci://host/repo@sha256:HEX` (host/repo@sha256:HEX);
    None for anything not pinned by digest (a path, a tag), which the server fetches itself."""
    if not artifact.startswith("oci://") or DIGEST_PREFIX not in artifact:
        return None
    return artifact.removeprefix("oci://")


def cache_directory(artifact: str) -> str:
    """Where `edgemodel serve` looks for the artifact in its cache: /cache/<first 16 hex digits of the digest>."""
    return f"{CACHE_DIR}/{artifact.rsplit(DIGEST_PREFIX, 1)[1][:16]}"


def fallback_directory(model_sha256: str) -> str:
    """Where `edgemodel serve --fallback-sha256 HEX` looks for its fallback model before it fetches it:
    /cache/fallback-<first 16 hex digits> (the runtime's `serve.fallback`)."""
    return f"{CACHE_DIR}/fallback-{model_sha256.lower()[:16]}"


def copy_init_container(
    artifact: str, security_context: dict[str, Any], fallback_sha256: str | None = None
) -> dict[str, Any] | None:
    """The init container that copies the engine from its image on the node into the cache emptyDir.

    With `fallback_sha256` (the EdgeModel's model digest) it also copies the original model the image
    carries (its fallback layer) to where the server finds its fallback, so that an engine the server
    cannot load falls back without the registry. None when `artifact` is not an image pinned by digest.
    `security_context` is the restricted one every container of the operator's pods gets.
    """
    image = engine_image(artifact)
    if image is None:
        return None
    fallback = fallback_directory(fallback_sha256) if fallback_sha256 else ""
    return {
        "name": INIT_CONTAINER,
        "image": image,
        # Pinned by digest: present on the node means this very engine; the registry is asked only when absent.
        "imagePullPolicy": "IfNotPresent",
        "command": [COPIER, "sh", "-c", COPY_SCRIPT, "engine-copy", cache_directory(artifact), fallback],
        "securityContext": security_context,
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "128Mi"}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "cache", "mountPath": CACHE_DIR}],
    }
