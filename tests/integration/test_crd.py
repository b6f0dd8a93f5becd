"""The EdgeModel CRD on a real API server: it installs, examples apply, bad input is refused."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.testbed.cluster import Testbed

pytestmark = pytest.mark.testbed

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
DIGEST = "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"

Manifest = dict[str, Any]


def valid_manifest(name: str = "valid") -> Manifest:
    return {
        "apiVersion": "edgeml.dev/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "oci://registry.local:5000/models/det:v4", "sha256": DIGEST},
            "inputs": [{"name": "x", "shape": [1, 3, 480, 640], "dtype": "float32"}],
            "targets": {
                "engines": [
                    {"match": {"arch": "amd64"}, "engine": "onnxruntime", "precision": "fp32"},
                    {"match": {"accelerator": "nvidia"}, "engine": "tensorrt", "precision": "fp16"},
                ]
            },
            "validation": {"tolerance": {"maxAbsError": 0.01, "minCosine": 0.99}, "latencyBudget": {"p99Ms": 50}},
            "rollout": {"shadow": {"mirrorPercent": 50, "minRequests": 10, "duration": "1m"}},
        },
    }


def _set(path: str, value: Any) -> Callable[[Manifest], None]:
    """A mutation that sets a dotted path (list indexes as numbers) to a value, or deletes it for ..."""

    def mutate(manifest: Manifest) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node: Any = manifest
        for part in parents:
            node = node[part]
        if value is ...:
            del node[last]
        else:
            node[last] = value

    return mutate


def _engine(**fields: Any) -> Callable[[Manifest], None]:
    return _set("spec.targets.engines.0", {"match": {"arch": "amd64"}, "engine": "onnxruntime", **fields})


# (test id, mutation of a valid manifest, field named in the error, fragment of the message)
INVALID: list[tuple[str, Callable[[Manifest], None], str, str]] = [
    ("model is missing", _set("spec.model", ...), "spec.model", "Required value"),
    ("digest is missing", _set("spec.model.sha256", ...), "spec.model.sha256", "Required value"),
    ("digest is too short", _set("spec.model.sha256", "abc123"), "spec.model.sha256", "at least 64"),
    ("digest is not lowercase hex", _set("spec.model.sha256", DIGEST.upper()), "spec.model.sha256", "should match"),
    ("uri is plain http", _set("spec.model.uri", "http://models.local/m.onnx"), "spec.model.uri", "https:// or oci://"),
    ("uri is file://", _set("spec.model.uri", "file:///etc/passwd"), "spec.model.uri", "file:// and local paths"),
    ("uri is a bare path", _set("spec.model.uri", "/models/det.onnx"), "spec.model.uri", "https:// or oci://"),
    ("uri has a .. segment", _set("spec.model.uri", "https://h/models/../secret"), "spec.model.uri", "'..'"),
    ("uri has an encoded .. segment", _set("spec.model.uri", "https://h/a/%2e%2e/b"), "spec.model.uri", "'..'"),
    ("uri ends in ..", _set("spec.model.uri", "oci://registry/repo/.."), "spec.model.uri", "'..'"),
    ("uri embeds credentials", _set("spec.model.uri", "https://u:p@h/m.onnx"), "spec.model.uri", "credentials"),
    (
        "calibration uri is file://",
        _engine(precision="int8", calibration={"uri": "file:///tmp/c.npz", "sha256": DIGEST}),
        "spec.targets.engines[0].calibration.uri",
        "file://",
    ),
    (
        "reference uri has a .. segment",
        _set("spec.validation.reference", {"uri": "https://h/../r.npz", "sha256": DIGEST}),
        "spec.validation.reference.uri",
        "'..'",
    ),
    ("engine is unknown", _engine(engine="tvm"), "spec.targets.engines[0].engine", "Unsupported value"),
    (
        "openvino on a GPU accelerator",
        _set("spec.targets.engines.1", {"match": {"accelerator": "nvidia"}, "engine": "openvino"}),
        "spec.targets.engines[1].engine",
        "engine openvino runs on the CPU",
    ),
    (
        "openvino on a GPU product",
        _set("spec.targets.engines.1", {"match": {"gpuProduct": "NVIDIA-A2"}, "engine": "openvino"}),
        "spec.targets.engines[1].engine",
        "engine openvino runs on the CPU",
    ),
    (
        "openvino on a compute capability",
        _set("spec.targets.engines.1", {"match": {"computeCapability": "8.7"}, "engine": "openvino"}),
        "spec.targets.engines[1].engine",
        "engine openvino runs on the CPU",
    ),
    ("bf16 on onnxruntime", _engine(precision="bf16"), "spec.targets.engines[0].precision", "only available with"),
    (
        "bf16 on tensorrt",
        _set("spec.targets.engines.1.precision", "bf16"),
        "spec.targets.engines[1].precision",
        "only available with engine openvino",
    ),
    (
        "dynamic int8 on openvino",
        _engine(engine="openvino", precision="int8", quantization="dynamic"),
        "spec.targets.engines[0].quantization",
        "only available with engine onnxruntime",
    ),
    ("precision is unknown", _engine(precision="int4"), "spec.targets.engines[0].precision", "Unsupported value"),
    (
        "engine auto on a GPU accelerator",
        _set("spec.targets.engines.1", {"match": {"accelerator": "nvidia"}, "engine": "auto", "precision": "auto"}),
        "spec.targets.engines[1].engine",
        "engine auto chooses among the CPU engines",
    ),
    (
        "engine auto on a compute capability",
        _set("spec.targets.engines.1", {"match": {"computeCapability": "8.7"}, "engine": "auto", "precision": "auto"}),
        "spec.targets.engines[1].engine",
        "engine auto chooses among the CPU engines",
    ),
    (
        "engine auto with a fixed precision",
        _engine(engine="auto"),
        "spec.targets.engines[0].precision",
        "precision auto",
    ),
    (
        "maxAccuracyDrop without a reference",
        _set("spec.validation.tolerance", {"maxAccuracyDrop": 1}),
        "spec.validation.tolerance.maxAccuracyDrop",
        "needs a reference with labels",
    ),
    (
        "maxAccuracyDrop above 100 points",
        _set(
            "spec.validation",
            {"reference": {"uri": "https://h/r.npz", "sha256": DIGEST}, "tolerance": {"maxAccuracyDrop": 101}},
        ),
        "spec.validation.tolerance.maxAccuracyDrop",
        "less than or equal to 100",
    ),
    (
        "int8MinSpeedup on fp32",
        _engine(int8MinSpeedup=1.2),
        "spec.targets.engines[0].int8MinSpeedup",
        "applies only to engine onnxruntime with precision int8",
    ),
    (
        "int8MinSpeedup on openvino",
        _engine(
            engine="openvino",
            precision="int8",
            calibration={"uri": "https://h/c.npz", "sha256": DIGEST},
            int8MinSpeedup=1.2,
        ),
        "spec.targets.engines[0].int8MinSpeedup",
        "applies only to engine onnxruntime with precision int8",
    ),
    (
        "calibrationMethod on openvino",
        _engine(
            engine="openvino",
            precision="int8",
            calibration={"uri": "https://h/c.npz", "sha256": DIGEST},
            calibrationMethod="entropy",
        ),
        "spec.targets.engines[0].calibrationMethod",
        "does not apply to engine openvino",
    ),
    (
        "negative int8MinSpeedup",
        _engine(precision="int8", quantization="dynamic", int8MinSpeedup=-1),
        "int8MinSpeedup",
        "greater than or equal to 0",
    ),
    (
        "static int8 without calibration",
        _engine(precision="int8"),
        "spec.targets.engines[0].calibration",
        "needs calibration data",
    ),
    (
        "dynamic int8 on tensorrt",
        _set(
            "spec.targets.engines.1",
            {"match": {"accelerator": "nvidia"}, "engine": "tensorrt", "precision": "int8", "quantization": "dynamic"},
        ),
        "spec.targets.engines[1].quantization",
        "only available with engine onnxruntime",
    ),
    (
        "quantization on fp16",
        _engine(precision="fp16", quantization="dynamic"),
        "spec.targets.engines[0].quantization",
        "applies only to precision int8",
    ),
    (
        "tensorrt on CPU-only classes",
        _set("spec.targets.engines.1.match", {"accelerator": "none"}),
        "spec.targets.engines[1].engine",
        "needs an NVIDIA accelerator",
    ),
    (
        "two engine entries with the same match",
        _set("spec.targets.engines.1.match", {"arch": "amd64"}),
        "spec.targets.engines",
        "same match",
    ),
    ("engines list is empty", _set("spec.targets.engines", []), "spec.targets.engines", "at least 1"),
    ("zero max abs error", _set("spec.validation.tolerance.maxAbsError", 0), "maxAbsError", "greater than 0"),
    ("negative max abs error", _set("spec.validation.tolerance.maxAbsError", -1), "maxAbsError", "greater than 0"),
    ("cosine above 1", _set("spec.validation.tolerance.minCosine", 1.5), "minCosine", "less than or equal to 1"),
    ("zero latency budget", _set("spec.validation.latencyBudget.p99Ms", 0), "p99Ms", "greater than 0"),
    ("agreement above 1", _set("spec.rollout.analysis", {"minAgreement": 1.2}), "minAgreement", "less than or equal"),
    ("error rate above 1", _set("spec.rollout.analysis", {"maxErrorRate": 2}), "maxErrorRate", "less than or equal"),
    ("zero latency ratio", _set("spec.rollout.analysis", {"maxLatencyRatio": 0}), "maxLatencyRatio", "greater than"),
    (
        "zero agreement relative error",
        _set("spec.rollout.analysis", {"agreement": {"maxRelativeError": 0}}),
        "maxRelativeError",
        "greater than 0",
    ),
    (
        "agreement top-1 above 1",
        _set("spec.rollout.analysis", {"agreement": {"minTop1Agreement": 1.5}}),
        "minTop1Agreement",
        "less than or equal to 1",
    ),
    (
        "agreement cosine below -1",
        _set("spec.rollout.analysis", {"agreement": {"minCosine": -2}}),
        "minCosine",
        "greater than or equal to -1",
    ),
    (
        "agreement output entry without a limit",
        _set("spec.rollout.analysis", {"agreement": {"outputs": [{"name": "boxes"}]}}),
        "spec.rollout.analysis.agreement.outputs[0]",
        "must set at least one of",
    ),
    (
        "agreement output named twice",
        _set("spec.rollout.analysis", {"agreement": {"outputs": [{"name": "y", "minCosine": 0.9}] * 2}}),
        "spec.rollout.analysis.agreement.outputs[1]",
        "Duplicate value",
    ),
    ("mirror percent above 100", _set("spec.rollout.shadow.mirrorPercent", 101), "mirrorPercent", "less than or equal"),
    ("negative mirror percent", _set("spec.rollout.shadow.mirrorPercent", -5), "mirrorPercent", "greater than 0"),
    ("zero mirror percent", _set("spec.rollout.shadow.mirrorPercent", 0), "mirrorPercent", "greater than 0"),
    ("zero min requests", _set("spec.rollout.shadow.minRequests", 0), "minRequests", "greater than or equal to 1"),
    ("zero shadow duration", _set("spec.rollout.shadow.duration", "0s"), "spec.rollout.shadow.duration", "positive"),
    ("shadow duration in words", _set("spec.rollout.shadow.duration", "5 minutes"), "duration", "should match"),
    (
        "shadow timeout shorter than its duration",
        _set("spec.rollout.shadow", {"duration": "10m", "timeout": "5m"}),
        "spec.rollout.shadow.timeout",
        "timeout must be at least duration",
    ),
    ("zero shadow timeout", _set("spec.rollout.shadow.timeout", "0s"), "spec.rollout.shadow.timeout", "positive"),
    ("unknown timeout policy", _set("spec.rollout.shadow.onTimeout", "Wait"), "onTimeout", "Unsupported value"),
    ("zero progress deadline", _set("spec.rollout.progressDeadline", "0s"), "progressDeadline", "positive"),
    ("progress deadline in words", _set("spec.rollout.progressDeadline", "ten minutes"), "progressDeadline", "match"),
    (
        "duplicate input names",
        _set("spec.inputs", [{"name": "x", "shape": [1], "dtype": "float32"}] * 2),
        "spec.inputs[1]",
        "Duplicate value",
    ),
    ("zero dimension", _set("spec.inputs.0.shape", [1, 0, 4]), "spec.inputs[0].shape[1]", "greater than or equal"),
    ("unknown dtype", _set("spec.inputs.0.dtype", "float8"), "spec.inputs[0].dtype", "Unsupported value"),
    ("privileged port", _set("spec.serving", {"port": 80}), "spec.serving.port", "greater than or equal to 1024"),
    ("zero replicas", _set("spec.serving", {"replicasPerClass": 0}), "spec.serving.replicasPerClass", "greater"),
    (
        "replicas with DaemonSet mode",
        _set("spec.serving", {"mode": "DaemonSet", "replicasPerClass": 2}),
        "spec.serving.replicasPerClass",
        "does not apply to mode DaemonSet",
    ),
    ("unknown serving mode", _set("spec.serving", {"mode": "StatefulSet"}), "spec.serving.mode", "Unsupported"),
    (
        "unknown accelerator handoff",
        _set("spec.serving", {"acceleratorHandoff": "Sometimes"}),
        "spec.serving.acceleratorHandoff",
        "Unsupported",
    ),
    ("bad resource quantity", _set("spec.serving", {"resources": {"limits": {"cpu": "lots"}}}), "cpu", "should match"),
    (
        "compute capability not x.y",
        _set("spec.targets.engines.1.match.computeCapability", "sm87"),
        "computeCapa",
        "match",
    ),
    ("unknown field", _set("spec.modle", {"uri": "https://h/m"}), "spec.modle", "unknown field"),
    ("name too long for child objects", _set("metadata.name", "a" * 41), "metadata.name", "at most 40 characters"),
]


@pytest.mark.parametrize(("mutate", "field", "fragment"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_edgemodel_is_refused_at_apply_with_a_message_naming_the_field(
    crd: Testbed, namespace: str, mutate: Callable[[Manifest], None], field: str, fragment: str
) -> None:
    manifest = copy.deepcopy(valid_manifest())
    mutate(manifest)
    result = crd.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest), check=False)
    assert result.returncode != 0, f"accepted: {result.stdout}"
    assert field in result.stderr, result.stderr
    assert fragment in result.stderr, result.stderr
    assert crd.kubectl("get", "em", "-n", namespace, "-o", "name").stdout == ""


def test_the_valid_base_manifest_is_accepted_and_defaults_are_filled(crd: Testbed, namespace: str) -> None:
    crd.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(valid_manifest()))
    stored = json.loads(crd.kubectl("get", "em", "valid", "-n", namespace, "-o", "json").stdout)
    assert stored["spec"]["serving"] == {"mode": "Deployment", "port": 8080, "acceleratorHandoff": "Auto"}
    assert stored["spec"]["rollout"]["analysis"] == {
        "minAgreement": 0.99,
        "maxLatencyRatio": 1.5,
        "maxErrorRate": 0.01,
        "agreement": {"maxRelativeError": 0.05, "minTop1Agreement": 1.0},
    }
    assert stored["spec"]["rollout"]["autoPromote"] is True
    assert stored["spec"]["rollout"]["progressDeadline"] == "10m"
    assert stored["spec"]["rollout"]["shadow"]["onTimeout"] == "Rollback"
    assert "timeout" not in stored["spec"]["rollout"]["shadow"]  # unset: 1h, or twice the duration when longer


@pytest.mark.parametrize(
    "entry",
    [
        {"match": {"arch": "amd64"}, "engine": "openvino"},
        {"match": {"arch": "amd64", "accelerator": "none"}, "engine": "openvino", "precision": "bf16"},
        {"match": {"arch": "arm64", "cpuFeatures": ["ASIMDHP"]}, "engine": "openvino", "precision": "fp16"},
        {
            "match": {"arch": "amd64"},
            "engine": "openvino",
            "precision": "int8",
            "calibration": {"uri": "https://h/c.npz", "sha256": DIGEST},
        },
    ],
    ids=["fp32", "bf16 on CPU-only classes", "fp16 on CPUs with half precision", "int8 with calibration data"],
)
def test_openvino_on_cpu_classes_is_accepted(crd: Testbed, namespace: str, entry: dict[str, Any]) -> None:
    manifest = valid_manifest("openvino")
    manifest["spec"]["targets"]["engines"][0] = entry
    crd.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))
    stored = json.loads(crd.kubectl("get", "em", "openvino", "-n", namespace, "-o", "json").stdout)
    assert stored["spec"]["targets"]["engines"][0]["engine"] == "openvino"
    crd.kubectl("delete", "em", "openvino", "-n", namespace)


@pytest.mark.parametrize(
    "entry",
    [
        {"match": {"accelerator": "none"}, "engine": "auto", "precision": "auto"},
        {"match": {"arch": "amd64"}, "engine": "onnxruntime", "precision": "auto", "quantization": "dynamic"},
        {"match": {"accelerator": "nvidia"}, "engine": "tensorrt", "precision": "auto"},
    ],
    ids=["engine auto on CPU-only classes", "onnxruntime precision auto", "tensorrt precision auto"],
)
def test_auto_entries_and_max_accuracy_drop_are_accepted(crd: Testbed, namespace: str, entry: dict[str, Any]) -> None:
    manifest = valid_manifest("auto")
    manifest["spec"]["targets"]["engines"][0] = entry
    manifest["spec"]["targets"]["engines"][1]["match"] = {"accelerator": "nvidia-orin"}
    manifest["spec"]["validation"]["reference"] = {"uri": "https://h/r.npz", "sha256": DIGEST}
    manifest["spec"]["validation"]["tolerance"]["maxAccuracyDrop"] = 0.5
    crd.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))
    stored = json.loads(crd.kubectl("get", "em", "auto", "-n", namespace, "-o", "json").stdout)
    assert stored["spec"]["targets"]["engines"][0]["precision"] == "auto"
    assert stored["spec"]["validation"]["tolerance"]["maxAccuracyDrop"] == 0.5
    crd.kubectl("delete", "em", "auto", "-n", namespace)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_every_example_applies_cleanly(crd: Testbed, namespace: str, example: Path) -> None:
    result = crd.kubectl("apply", "-n", namespace, "-f", str(example))
    assert "created" in result.stdout
    assert result.stderr == "", result.stderr
    name = yaml.safe_load(example.read_text())["metadata"]["name"]
    assert crd.kubectl("get", "edgemodel", name, "-n", namespace, "-o", "name").stdout.strip() == (
        f"edgemodel.edgeml.dev/{name}"
    )


def test_kubectl_explain_shows_the_field_docs(crd: Testbed) -> None:
    result = crd.kubectl("explain", "edgemodel.spec.rollout")
    assert "How a new revision is shadowed and promoted." in result.stdout
    for field in ("shadow", "analysis", "autoPromote", "autoRollback"):
        assert field in result.stdout
    deep = crd.kubectl("explain", "em.spec.rollout.analysis.minAgreement").stdout
    assert "Smallest share of mirrored requests" in deep


def test_printer_columns_show_in_kubectl_get(crd: Testbed, namespace: str) -> None:
    crd.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(valid_manifest("columns")))
    header = crd.kubectl("get", "em", "-n", namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "READY", "PHASE", "CLASSES", "STABLE", "CANDIDATE", "AGE"]


def test_status_is_a_subresource_that_spec_writes_cannot_touch(crd: Testbed, namespace: str) -> None:
    manifest = valid_manifest("status")
    manifest["status"] = {"phase": "Ready"}
    crd.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))
    stored = json.loads(crd.kubectl("get", "em", "status", "-n", namespace, "-o", "json").stdout)
    assert "status" not in stored or stored["status"].get("phase") != "Ready"


def test_the_api_server_accepts_the_status_of_a_1000_node_class_and_50_failing_classes(
    crd: Testbed, namespace: str, tmp_path: Path
) -> None:
    """The bounded status the plan writes (tests/unit/test_status_bounds.py) passes the CRD's schema;
    the same status with one condition message as long as an unbounded summary's is refused."""
    from tests.unit.test_status_bounds import large_status

    status = large_status()
    crd.apply_objects([{**valid_manifest("large"), "metadata": {"name": "large", "namespace": namespace}}])

    def patch(body: dict[str, Any]) -> Any:
        path = tmp_path / "patch.json"
        path.write_text(json.dumps({"status": body}))
        return crd.kubectl("patch", "em", "large", "-n", namespace, "--subresource=status", "--type=merge",
                           "--patch-file", str(path), check=False)  # fmt: skip

    unbounded = copy.deepcopy(status)
    unbounded["conditions"][0]["message"] = "x" * 40_000
    refused = patch(unbounded)
    assert refused.returncode != 0
    assert "32768" in refused.stderr
    accepted = patch(status)
    assert accepted.returncode == 0, accepted.stderr
    stored = json.loads(crd.kubectl("get", "em", "large", "-n", namespace, "-o", "json").stdout)["status"]
    assert len(stored["classes"]) == 51
    assert max(c["nodeCount"] for c in stored["classes"]) == 1000
    assert {c["type"] for c in stored["conditions"]} == {c["type"] for c in status["conditions"]}


def test_the_api_server_keeps_the_chosen_engine_and_the_table_of_an_auto_class(
    crd: Testbed, namespace: str, tmp_path: Path
) -> None:
    """The status of a class whose engine auto chose (tests/unit/test_auto_choice.py) is stored whole: a field
    missing from the CRD's schema would be pruned silently."""
    from tests.unit.test_auto_choice import auto_status

    status, _ = auto_status()
    crd.apply_objects([{**valid_manifest("chosen"), "metadata": {"name": "chosen", "namespace": namespace}}])
    path = tmp_path / "patch.json"
    path.write_text(json.dumps({"status": status}))
    crd.kubectl("patch", "em", "chosen", "-n", namespace, "--subresource=status", "--type=merge",
                "--patch-file", str(path))  # fmt: skip
    stored = json.loads(crd.kubectl("get", "em", "chosen", "-n", namespace, "-o", "json").stdout)["status"]
    (entry,) = stored["classes"]
    assert entry["chosen"] == "openvino-bf16"
    assert entry["candidates"] == status["classes"][0]["candidates"]
