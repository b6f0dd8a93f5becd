"""The EdgeModel of one 16-float input that the real-node tests apply, the requests they send it, and the
answers they expect from the model it names (tests/onnx_models.py)."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from edgemodel_runtime.digests import sha256_file
from tests.helpers import get, post_json
from tests.testbed.cluster import Testbed
from tests.testbed.node import LABEL, TOLERATION

PORT = 8080


def apply(bed: Testbed, namespace: str, name: str, uri: str, model: Path, *, rollout: dict[str, Any]) -> None:
    """Create or update the EdgeModel `name` serving `model` (pushed at `uri`) on the real node."""
    bed.apply_objects([{
        "apiVersion": "edgeml.dev/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"uri": uri, "sha256": sha256_file(model)},
            "inputs": [{"name": "x", "shape": [1, 16], "dtype": "float32"}],
            "targets": {"nodeSelector": {LABEL: "true"}, "tolerations": [TOLERATION]},
            "serving": {"port": PORT},
            "rollout": rollout,
        },
    }])  # fmt: skip


def sample(seed: int) -> np.ndarray:
    """The input of request `seed`: shape [1, 16], float32."""
    return np.random.default_rng(seed).normal(size=(1, 16)).astype(np.float32)


def body(seed: int) -> bytes:
    """The JSON body (Open Inference Protocol v2) of request `seed`."""
    return json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                   "data": sample(seed).ravel().tolist()}]}).encode()  # fmt: skip


def check_answer(url: str, name: str, model: Path, seed: int = 1, rtol: float = 1e-5) -> None:
    """Send request `seed` to the server at `url` and check its answer against `model` on ONNX Runtime."""
    status, reply = post_json(f"{url}/v2/models/{name}/infer", body(seed), 60)
    assert status == 200, reply
    expected = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": sample(seed)})[0]
    np.testing.assert_allclose(np.array(reply["outputs"][0]["data"]).reshape(expected.shape), expected, rtol=rtol)


def class_entry(bed: Testbed, namespace: str, name: str) -> dict[str, Any]:
    """The EdgeModel's first entry of `status.classes` (the real node's class), or {}."""
    status = get(bed, "em", name, "-n", namespace).get("status") or {}
    return next(iter(status.get("classes") or []), {})


def pushed_twice(address: str, name: str, stable: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """`stable` and a re-export of it (the same graph and weights, another digest: a new revision that must
    agree), pushed to the registry at `address` as models/`name`: ({case: path}, {case: oci URI})."""
    from edgemodel_runtime.build import oci

    again = onnx.load(str(stable))
    again.doc_string = "re-exported: the same graph and weights, another digest"
    onnx.save(again, str(stable.with_name(f"{stable.stem}-again.onnx")))
    models = {"a": stable, "a-again": stable.with_name(f"{stable.stem}-again.onnx")}
    uris = {}
    for case, path in models.items():
        digest = oci.push(oci.parse_reference(f"{address}/models/{name}"), [path], case, {})
        uris[case] = f"oci://{address}/models/{name}@{digest}"
    return models, uris


def start_operator(bed: Testbed, directory: Path, namespace: str, registry: str, undo: ExitStack) -> None:
    """A restricted namespace `namespace` and the operator as a process watching it, pushing engines to the
    plain-HTTP registry `registry` (host:port); both undone by `undo`."""
    from tests.integration.operators import OperatorProcess

    bed.kubectl("create", "namespace", namespace)
    undo.callback(bed.kubectl, "delete", "namespace", namespace, "--ignore-not-found", "--timeout=120s",
                  check=False, timeout=150)  # fmt: skip
    bed.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    operator = OperatorProcess(bed, directory / "operator.log", settings={
        "image_cpu": bed.state()["images"]["runtime-cpu"], "registry": f"{registry}/engines",
        "registry_insecure": "true", "analysis_seconds": "1", "namespaces": json.dumps([namespace]),
    })  # fmt: skip
    operator.start()
    undo.callback(operator.stop)


def live_pods(bed: Testbed, namespace: str, component: str) -> list[dict[str, Any]]:
    """The pods of `component` (label app.kubernetes.io/component) not being deleted."""
    listed = get(bed, "pods", "-n", namespace, "-l", f"app.kubernetes.io/component={component}")
    return [pod for pod in listed["items"] if not pod["metadata"].get("deletionTimestamp")]


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def pod_events(bed: Testbed, namespace: str, pod: str) -> list[dict[str, Any]]:
    listed = get(bed, "events", "-n", namespace, "--field-selector", f"involvedObject.name={pod}")
    items: list[dict[str, Any]] = listed["items"]
    return items
