"""A pull DaemonSet moved to another artifact (a rebuild, see operator/edgemodel_operator/prefetch.py), against
the test bed's real API server: the strategic merge patch it sends must leave none of the old artifact's part
images behind, though such a patch merges init containers by name."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edgemodel_operator.classes import discover
from edgemodel_operator.prefetch import build_prefetch_daemonset, retarget_patch
from tests.helpers import get
from tests.testbed.cluster import Testbed
from tests.unit.test_operator_pure import NODES, edgemodel

pytestmark = pytest.mark.testbed
REPOSITORY = "registry.example:5000/engines/apps/ocr"
FIRST, SECOND = (f"oci://{REPOSITORY}@sha256:{c * 64}" for c in "ab")
PARTS = [f"sha256:{c * 64}" for c in "123"]


def _init_images(testbed: Testbed, namespace: str, name: str) -> list[str]:
    daemonset: dict[str, Any] = get(testbed, "daemonset", name, "-n", namespace)
    return [c["image"] for c in daemonset["spec"]["template"]["spec"].get("initContainers") or []]


@pytest.mark.parametrize(
    ("before", "after"),
    [(PARTS, PARTS[2:]), (PARTS, []), ([], PARTS[:2]), (PARTS[:2], PARTS[1:])],
    ids=["fewer parts", "no parts", "parts where there were none", "other parts"],
)
def test_a_pull_daemonset_moved_to_another_artifact_pulls_that_artifacts_parts_only(
    testbed: Testbed, namespace: str, before: list[str], after: list[str]
) -> None:
    body = edgemodel()
    body["metadata"]["namespace"] = namespace
    hardware = discover(NODES)[0]
    first = build_prefetch_daemonset(body, hardware, "r1", FIRST, before)
    second = build_prefetch_daemonset(body, hardware, "r1", SECOND, after)
    assert first is not None
    assert second is not None
    first["metadata"].pop("ownerReferences")  # no EdgeModel owns it here: the garbage collector would delete it
    testbed.apply_objects([first])
    name = first["metadata"]["name"]
    assert _init_images(testbed, namespace, name) == [f"{REPOSITORY}@{part}" for part in before]
    patch = json.dumps(retarget_patch(second))
    testbed.kubectl("patch", "daemonset", name, "-n", namespace, "--type", "strategic", "-p", patch)
    assert _init_images(testbed, namespace, name) == [f"{REPOSITORY}@{part}" for part in after]
    daemonset = get(testbed, "daemonset", name, "-n", namespace)
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    assert container["image"] == SECOND.removeprefix("oci://")
