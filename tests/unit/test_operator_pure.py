"""Hardware classes, builders and the reconcile plan: pure, table-driven, no cluster."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest

from edgemodel_operator.api.spec import EdgeModelSpec
from edgemodel_operator.builders import (
    Images,
    build_deployment_for_class,
    build_job_for_class,
    cache_key,
    candidate_url,
    revision_of,
)
from edgemodel_operator.classes import discover, engine_for
from edgemodel_operator.reconcile import Observed, plan
from tests.testbed.nodes import DEFAULT_NODES, X86_NVIDIA, build_node

DIGEST = "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"
NOW = "2026-11-26T12:00:00Z"
LATER = "2026-11-26T12:05:00Z"


def ready(node: dict[str, Any], is_ready: bool = True) -> dict[str, Any]:
    node = copy.deepcopy(node)
    node["status"]["conditions"] = [{"type": "Ready", "status": "True" if is_ready else "False"}]
    return node


NODES = [ready(build_node(name, node_class)) for name, node_class in DEFAULT_NODES]


def edgemodel(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "edgeml.dev/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": "ocr", "namespace": "apps", "uid": "u-1", "generation": 1},
        "spec": {"model": {"uri": "oci://registry.local/models/det:v4", "sha256": DIGEST}, **spec},
    }


def test_default_nodes_form_four_classes_with_stable_label_safe_keys() -> None:
    classes = discover(NODES)
    assert len(classes) == 4
    assert {c.nodes for c in classes} == {
        ("edge-x86-1", "edge-x86-2"),
        ("gpu-ws-1",),
        ("jetson-orin-1", "jetson-orin-2"),
        ("rpi5-1",),
    }
    for hardware in classes:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", hardware.key), hardware.key
        assert len(hardware.key) <= 40
    assert [c.key for c in discover(list(reversed(NODES)))] == [c.key for c in classes]


def test_not_ready_nodes_are_present_but_not_schedulable_and_nodes_outside_the_selector_are_left_out() -> None:
    nodes = [*NODES[:2], ready(NODES[2], is_ready=False)]
    assert [(c.nodes, c.schedulable) for c in discover(nodes)] == [
        (("edge-x86-1", "edge-x86-2"), ("edge-x86-1", "edge-x86-2")),
        (("gpu-ws-1",), ()),
    ]
    arm_only = discover(NODES, {"kubernetes.io/arch": "arm64"})
    assert sorted(c.accelerator for c in arm_only) == ["none", "nvidia-orin"]


def test_a_different_gpu_is_a_different_class() -> None:
    other = build_node("gpu-ws-2", X86_NVIDIA)
    other["metadata"]["labels"]["nvidia.com/gpu.compute.minor"] = "9"
    assert len(discover([*NODES, ready(other)])) == 5


@pytest.mark.parametrize(
    ("engines", "expected"),
    [
        (None, {"none": ("onnxruntime", "fp32"), "nvidia": ("tensorrt", "fp16"), "nvidia-orin": ("tensorrt", "fp16")}),
        (
            [
                {"match": {"accelerator": "nvidia-orin"}, "engine": "tensorrt", "precision": "int8", "calibration": {
                    "uri": "https://h/c.npz", "sha256": DIGEST}},
                {"match": {}, "engine": "onnxruntime", "precision": "fp16"},
            ],
            {"none": ("onnxruntime", "fp16"), "nvidia": ("onnxruntime", "fp16"), "nvidia-orin": ("tensorrt", "int8")},
        ),
    ],
    ids=["defaults", "first match wins"],
)  # fmt: skip
def test_engine_per_class(engines: Any, expected: dict[str, tuple[str, str]]) -> None:
    spec = EdgeModelSpec.model_validate(edgemodel(targets={"engines": engines} if engines else None)["spec"])
    for hardware in discover(NODES):
        target = engine_for(spec, hardware)
        assert target is not None
        assert (target.engine, target.precision) == expected[hardware.accelerator]


def test_revision_follows_what_changes_engines_only() -> None:
    base = EdgeModelSpec.model_validate(edgemodel()["spec"])
    assert revision_of(base) == revision_of(EdgeModelSpec.model_validate(edgemodel(serving={"port": 9000})["spec"]))
    changed = edgemodel()
    changed["spec"]["model"]["sha256"] = "0" * 64
    assert revision_of(base) != revision_of(EdgeModelSpec.model_validate(changed["spec"]))


def test_build_job_is_pinned_restricted_and_names_its_inputs() -> None:
    body = edgemodel(inputs=[{"name": "x", "shape": [1, 3, 480, 640], "dtype": "float32"}])
    spec = EdgeModelSpec.model_validate(body["spec"])
    gpu = next(c for c in discover(NODES) if c.accelerator == "nvidia")
    target = engine_for(spec, gpu)
    assert target is not None
    job = build_job_for_class(body, gpu, target, revision_of(spec), Images())
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert len(job["metadata"]["name"]) <= 63
    assert pod["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-A2"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert job["spec"]["activeDeadlineSeconds"] > 0
    assert job["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    args = container["args"]
    assert args[args.index("--sha256") + 1] == DIGEST
    assert args[args.index("--class-key") + 1] == gpu.key
    assert args[args.index("--input") + 1] == "x=1x3x480x640"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_an_openvino_build_job_asks_the_runtime_for_that_engine_on_the_cpu_without_a_gpu(precision: str) -> None:
    from edgemodel_runtime.build.cli import _parser, _request

    engines = [{"match": {"accelerator": "none"}, "engine": "openvino", "precision": precision}]
    body = edgemodel(inputs=[{"name": "x", "shape": [1, 3, 48, 192], "dtype": "float32"}], targets={"engines": engines})
    spec = EdgeModelSpec.model_validate(body["spec"])
    cpu = next(c for c in discover(NODES) if c.accelerator == "none")
    target = engine_for(spec, cpu)
    assert target is not None
    job = build_job_for_class(body, cpu, target, revision_of(spec), Images())
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    request = _request(_parser().parse_args(container["args"][1:]))  # what `edgemodel build` will run
    assert (request.engine, request.precision, request.inputs) == ("openvino", precision, {"x": (1, 3, 48, 192)})
    deployment = build_deployment_for_class(
        body, cpu, target, revision="r1", artifact="oci://r/x@sha256:" + "0" * 64, images=Images()
    )
    assert "nvidia.com/gpu" not in json.dumps(deployment)


@pytest.mark.parametrize(
    ("extra", "method", "min_speedup"),
    [({}, None, 1.1), ({"calibrationMethod": "entropy", "int8MinSpeedup": 0}, "entropy", 0.0),
     ({"int8MinSpeedup": 1.234567891}, None, 1.234567891)],
)  # fmt: skip
def test_an_int8_build_job_carries_the_calibration_choice_and_the_int8_speed_threshold(
    extra: dict[str, Any], method: str | None, min_speedup: float
) -> None:
    from edgemodel_runtime.build.cli import _parser, _request

    calibration = {"uri": "https://h/c.npz", "sha256": DIGEST}
    engines = [{"match": {"accelerator": "none"}, "engine": "onnxruntime", "precision": "int8",
                "calibration": calibration, **extra}]  # fmt: skip
    body = edgemodel(targets={"engines": engines})
    spec = EdgeModelSpec.model_validate(body["spec"])
    cpu = next(c for c in discover(NODES) if c.accelerator == "none")
    target = engine_for(spec, cpu)
    assert target is not None
    job = build_job_for_class(body, cpu, target, revision_of(spec), Images())
    request = _request(_parser().parse_args(job["spec"]["template"]["spec"]["containers"][0]["args"][1:]))
    assert (request.calibration_method, request.int8_min_speedup) == (method, min_speedup)
    # Another threshold may ship fp32 instead of int8: another engine, another cache key.
    other = EdgeModelSpec.model_validate(edgemodel(targets={"engines": [{**engines[0], "int8MinSpeedup": 50}]})["spec"])
    other_target = engine_for(other, cpu)
    assert other_target is not None
    assert cache_key(spec, target, cpu, Images()) != cache_key(other, other_target, cpu, Images())


def test_a_plain_http_registry_is_named_to_build_and_serving_pods_only_when_configured() -> None:
    body = edgemodel()
    spec = EdgeModelSpec.model_validate(body["spec"])
    cpu = next(c for c in discover(NODES) if not c.has_gpu)
    target = engine_for(spec, cpu)
    assert target is not None
    insecure = Images(registry="10.88.0.1:5000/engines", registry_insecure=True)
    for images, expected in (
        (Images(), []),
        (insecure, [{"name": "EDGEMODEL_INSECURE_REGISTRIES", "value": "10.88.0.1:5000"}]),
    ):
        job = build_job_for_class(body, cpu, target, revision_of(spec), images)
        assert job["spec"]["template"]["spec"]["containers"][0]["env"] == expected
        deployment = build_deployment_for_class(body, cpu, target, revision="r", artifact="oci://a@sha256:" + "0" * 64,
                                                images=images)  # fmt: skip
        env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        assert [e for e in env if e["name"] == "EDGEMODEL_INSECURE_REGISTRIES"] == expected


def test_a_candidate_is_named_by_its_cluster_ip_in_a_valid_url_for_ipv4_and_ipv6() -> None:
    body = edgemodel()
    cpu = next(c for c in discover(NODES) if not c.has_gpu)
    assert candidate_url(body, "r1", cpu, "10.96.0.7").startswith("http://10.96.0.7:")
    assert candidate_url(body, "r1", cpu, "fd00::7").startswith("http://[fd00::7]:")
    assert ".svc:" in candidate_url(body, "r1", cpu, None)  # not known yet: the Service's DNS name


def _observed(body: dict[str, Any], **objects: list[dict[str, Any]]) -> Observed:
    return Observed(
        body=body,
        nodes=objects.get("nodes", NODES),
        jobs=objects.get("jobs", []),
        pods=objects.get("pods", []),
        deployments=objects.get("deployments", []),
        services=objects.get("services", []),
    )


def _finished(job: dict[str, Any], report: dict[str, Any], ok: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    job = copy.deepcopy(job)
    job["status"] = {"conditions": [{"type": "Complete" if ok else "Failed", "status": "True"}]}
    pod = {
        "metadata": {"name": job["metadata"]["name"] + "-abc", "labels": {"job-name": job["metadata"]["name"]}},
        "status": {
            "phase": "Succeeded" if ok else "Failed",
            "containerStatuses": [
                {"state": {"terminated": {"exitCode": 0 if ok else 3, "message": json.dumps(report)}}}
            ],
        },
    }
    return job, pod


def test_first_plan_builds_every_class_and_the_service() -> None:
    result = plan(_observed(edgemodel()), Images(), NOW)
    kinds = [o["kind"] for o in result.create]
    assert kinds.count("Job") == 4
    assert kinds.count("Service") == 1
    status = result.status
    assert status["phase"] == "Progressing"
    assert status["classesReady"] == "0/4"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Progressing"]["status"] == "True"
    assert all(c["observedGeneration"] == 1 for c in conditions.values())


def test_built_classes_get_a_deployment_and_a_failed_class_degrades_without_touching_others() -> None:
    body = edgemodel()
    jobs = [o for o in plan(_observed(body), Images(), NOW).create if o["kind"] == "Job"]
    ok_report = {
        "v": 1,
        "status": "built",
        "exitCode": 0,
        "cacheKey": "k",
        "artifact": {"reference": "oci://r/e@sha256:" + "a" * 64},
    }
    bad_report = {
        "v": 1,
        "status": "failed",
        "exitCode": 3,
        "reason": "ToleranceMissed",
        "message": "cosine 0.5 < minCosine 0.99",
    }
    finished = [_finished(j, ok_report) for j in jobs[:3]] + [_finished(jobs[3], bad_report, ok=False)]
    result = plan(_observed(body, jobs=[j for j, _ in finished], pods=[p for _, p in finished]), Images(), LATER)
    deployments = [o for o in result.create if o["kind"] == "Deployment"]
    assert len(deployments) == 3
    assert all(d["spec"]["template"]["spec"]["containers"][0]["args"][1].startswith("oci://") for d in deployments)
    states = sorted(c["state"] for c in result.status["classes"])
    assert states == ["Built", "Built", "Built", "Failed"]
    conditions = {c["type"]: c for c in result.status["conditions"]}
    assert conditions["Degraded"]["status"] == "True"
    assert "ToleranceMissed" in conditions["EnginesBuilt"]["message"]
    assert not result.delete


def test_lasttransitiontime_moves_only_when_a_condition_flips() -> None:
    body = edgemodel()
    first = plan(_observed(body), Images(), NOW).status
    body["status"] = first
    again = plan(_observed(body, jobs=[o for o in plan(_observed(body), Images(), NOW).create if o["kind"] == "Job"]),
                 Images(), LATER).status  # fmt: skip
    before = {c["type"]: c["lastTransitionTime"] for c in first["conditions"]}
    after = {c["type"]: c["lastTransitionTime"] for c in again["conditions"]}
    assert before == after


def test_a_class_that_leaves_has_its_workloads_removed_after_the_grace_period() -> None:
    body = edgemodel()
    jobs = [o for o in plan(_observed(body), Images(), NOW).create if o["kind"] == "Job"]
    without_jetsons = [n for n in NODES if not n["metadata"]["name"].startswith("jetson")]
    kept = plan(_observed(body, nodes=without_jetsons, jobs=jobs), Images(), LATER)  # grace: 600 s by default
    assert not kept.delete
    assert sorted(e["state"] for e in kept.status["classes"]).count("Absent") == 1
    body["status"] = kept.status
    result = plan(_observed(body, nodes=without_jetsons, jobs=jobs), Images(), "2026-11-26T12:15:00Z")
    assert [d["name"] for d in result.delete] == [
        j["metadata"]["name"] for j in jobs if j["metadata"]["labels"]["edgeml.dev/class"].startswith("arm64-nvidia")
    ]


def test_one_class_of_each_kind_in_the_test_bed() -> None:
    kinds = {(c.arch, c.accelerator) for c in discover(NODES)}
    assert kinds == {("amd64", "none"), ("amd64", "nvidia"), ("arm64", "nvidia-orin"), ("arm64", "none")}
