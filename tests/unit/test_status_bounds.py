"""A bounded status: a class of 1,000 nodes and 50 failing classes still fit the CRD's schema. Pure."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from edgemodel_operator.api.status import CONDITION_MESSAGE_MAX, MESSAGE_MAX, NODE_NAMES, EdgeModelStatus
from edgemodel_operator.builders import Images
from edgemodel_operator.projection import clip, summary
from edgemodel_operator.reconcile import plan
from tests.testbed.nodes import X86_NVIDIA, X86_VNNI, build_node
from tests.unit.test_operator_pure import LATER, NOW, _observed, edgemodel, ready

Obj = dict[str, Any]
LONG = "x" * 4000 + " (the builder's full message)"  # a compact report's message may take most of 4 KiB


def fleet() -> list[Obj]:
    """1,000 nodes of one CPU class and one node each of 50 GPU classes."""
    nodes = [ready(build_node(f"edge-x86-{i:04d}", X86_VNNI)) for i in range(1000)]
    for i in range(50):
        node = ready(build_node(f"gpu-{i:02d}", X86_NVIDIA))
        node["metadata"]["labels"]["nvidia.com/gpu.product"] = f"NVIDIA-P{i:02d}"
        nodes.append(node)
    return nodes


def large_status() -> Obj:
    """The status the plan writes for `fleet()`: the CPU class built, every GPU class failed at length."""
    body = edgemodel()
    nodes = fleet()
    jobs = [o for o in plan(_observed(body, nodes=nodes), Images(), NOW).create if o["kind"] == "Job"]
    pods = []
    for job in jobs:
        gpu = "nvidia" in job["metadata"]["labels"]["edgeml.dev/class"]
        report = {"v": 1, "status": "failed" if gpu else "built", "exitCode": 3 if gpu else 0,
                  "reason": "ToleranceMissed" if gpu else None, "message": LONG if gpu else "",
                  "artifact": None if gpu else {"reference": "oci://r/e@sha256:" + "a" * 64}}  # fmt: skip
        job["status"] = {"conditions": [{"type": "Failed" if gpu else "Complete", "status": "True"}]}
        pods.append({
            "metadata": {"name": job["metadata"]["name"] + "-1", "labels": {"job-name": job["metadata"]["name"]}},
            "status": {"phase": "Failed" if gpu else "Succeeded", "containerStatuses": [
                {"state": {"terminated": {"exitCode": report["exitCode"], "message": json.dumps(report)}}}]},
        })  # fmt: skip
    status: Obj = plan(_observed(body, nodes=nodes, jobs=jobs, pods=pods), Images(), LATER).status
    return status


def test_a_class_of_1000_nodes_and_50_failing_classes_make_a_status_the_schema_accepts() -> None:
    status = large_status()
    EdgeModelStatus.model_validate(status)  # the same limits as the CRD (generated from this model)
    classes = {c["key"]: c for c in status["classes"]}
    assert len(classes) == 51
    cpu = next(c for c in classes.values() if c["key"].startswith("amd64-none"))
    assert (cpu["nodeCount"], len(cpu["nodes"])) == (1000, NODE_NAMES)
    assert cpu["nodes"] == [f"edge-x86-{i:04d}" for i in range(NODE_NAMES)]
    failed = [c for c in classes.values() if c["state"] == "Failed"]
    assert len(failed) == 50
    assert all(len(c["message"]) <= MESSAGE_MAX and c["message"].startswith("ToleranceMissed: xxx") for c in failed)
    for condition in status["conditions"]:
        assert len(condition["message"]) <= CONDITION_MESSAGE_MAX
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["message"].endswith("and 45 more classes")
    assert len(json.dumps(status)) < 100_000  # 50 classes x 1 KiB messages; whole, they took over 800 KB


def test_node_names_beyond_the_few_shown_change_nothing_in_the_status() -> None:
    """A node that comes or goes among the 1,000 changes the count only; one that flaps, nothing."""
    body = edgemodel()
    nodes = fleet()[:1000]
    first = plan(_observed(body, nodes=nodes), Images(), NOW).status
    flapping = [*nodes[:-1], ready(nodes[-1], is_ready=False)]
    assert plan(_observed(body, nodes=flapping), Images(), NOW).status == first
    fewer = plan(_observed(body, nodes=nodes[:-1]), Images(), NOW).status["classes"][0]
    assert (fewer["nodeCount"], fewer["nodes"]) == (999, first["classes"][0]["nodes"])


@given(st.lists(st.text(max_size=3000), max_size=80), st.integers(min_value=50, max_value=CONDITION_MESSAGE_MAX))
def test_a_summary_always_fits_its_limit(messages: list[str], limit: int) -> None:
    entries = [{"key": f"class-{i}", "message": m} for i, m in enumerate(messages)]
    assert len(summary(entries, limit)) <= limit


@given(st.text(max_size=3000), st.integers(min_value=1, max_value=2000))
def test_clip_keeps_short_text_and_cuts_long_text_to_the_limit(text: str, limit: int) -> None:
    cut = clip(text, limit)
    assert len(cut) <= limit
    assert cut == text if len(text) <= limit else cut.endswith("…")
