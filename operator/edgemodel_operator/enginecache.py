"""The node-local engine cache: serving pods take their engine from the node's container runtime. Pure.

Every engine a build pushes is also a container image (`edgemodel_runtime.build.engineimage`): one
layer with a static busybox, one with the engine's files under /engine. Its manifest digest is the
artifact digest the operator already serves by. A serving pod gets an init container that runs that
image by digest with `imagePullPolicy: IfNotPresent` and copies the engine into the pod's cache
emptyDir, where `edgemodel serve oci://...@sha256:HEX` finds it (directory HEX[:16]) without the
registry, verifying every file against the build report's digests before it loads.

So the node's containerd content store is the cache, keyed and verified by digest: it survives pod
deletion and registry outages, the kubelet's image garbage collection sizes it, and with neither the
image on the node nor the registry reachable the pod waits in `ImagePullBackOff` (the kubelet's
backoff, a one-line reason in its status and Events) instead of crash-looping. It needs no hostPath,
so every pod stays within the restricted Pod Security Standard, and no image volumes (containerd 2.1+).
"""

from __future__ import annotations

from typing import Any

CACHE_DIR = "/cache"  # the serving pod's emptyDir; EDGEMODEL_ARTIFACT_CACHE points there
INIT_CONTAINER = "engine"
COPIER = "/busybox"  # in the engine image (engineimage.COPIER)
ENGINE_DIR = "/engine"  # in the engine image (engineimage.ENGINE_DIR)
DIGEST_PREFIX = "@sha256:"
# $1: the cache directory. A copy cut short (the container killed mid-way) is never mistaken for an engine:
# files land in a staging directory that is renamed into place whole; an existing engine is kept.
COPY_SCRIPT = (
    'set -eu; target="$1"; staging="$1.partial"; '
    'if [ -d "$target" ]; then echo "engine already in $target"; exit 0; fi; '
    f'{COPIER} rm -rf "$staging"; {COPIER} mkdir -p "$staging"; '
    f'{COPIER} cp {ENGINE_DIR}/* "$staging/"; {COPIER} mv "$staging" "$target"; '
    'echo "engine copied to $target"'
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


def copy_init_container(artifact: str, security_context: dict[str, Any]) -> dict[str, Any] | None:
    """The init container that copies the engine from its image on the node into the cache emptyDir.

    None when `artifact` is not an image pinned by digest. `security_context` is the restricted one
    every container of the operator's pods gets.
    """
    image = engine_image(artifact)
    if image is None:
        return None
    return {
        "name": INIT_CONTAINER,
        "image": image,
        # Pinned by digest: present on the node means this very engine; the registry is asked only when absent.
        "imagePullPolicy": "IfNotPresent",
        "command": [COPIER, "sh", "-c", COPY_SCRIPT, "engine-copy", cache_directory(artifact)],
        "securityContext": security_context,
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "cache", "mountPath": CACHE_DIR}],
    }
