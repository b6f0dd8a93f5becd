"""Tiny ONNX models made on the spot, for edge cases the packaged models cannot show."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_classifier(path: Path, seed: int = 0, classes: int = 10) -> Path:
    """x[1, 16] -> Gemm -> Relu -> Gemm -> logits[1, classes]."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.normal(size=(16, 32)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.normal(size=(32,)).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(size=(32, classes)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(rng.normal(size=(classes,)).astype(np.float32), "b2")
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"]),
        ],
        "tiny_classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=[w1, b1, w2, b2],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def unsupported_operator(path: Path) -> Path:
    """A valid ONNX graph whose only node is an operator no engine here implements."""
    graph = helper.make_graph(
        [helper.make_node("FancyNorm", ["x"], ["y"], domain="com.example.custom")],
        "unsupported",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example.custom", 1)]
    )
    onnx.save(model, str(path))
    return path
