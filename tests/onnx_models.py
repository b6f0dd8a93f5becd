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


def tiny_convnet(path: Path, seed: int = 0, size: int = 32) -> Path:
    """x[1, 3, size, size] -> 3 x (Conv 3x3 -> Relu) -> GlobalAveragePool -> Flatten -> MatMul -> logits[1, 10].

    Small enough that INT8's quantise/dequantise work outweighs its cheaper arithmetic on a CPU.
    """
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    previous = "x"
    for index, (cin, cout) in enumerate([(3, 8), (8, 8), (8, 8)]):
        weight = numpy_helper.from_array(
            (rng.normal(size=(cout, cin, 3, 3)) * 0.3).astype(np.float32), f"conv{index}_w"
        )
        bias = numpy_helper.from_array(rng.normal(size=(cout,)).astype(np.float32), f"conv{index}_b")
        initializers += [weight, bias]
        nodes.append(
            helper.make_node(
                "Conv", [previous, weight.name, bias.name], [f"c{index}"], name=f"conv{index}", pads=[1, 1, 1, 1]
            )
        )
        nodes.append(helper.make_node("Relu", [f"c{index}"], [f"r{index}"], name=f"relu{index}"))
        previous = f"r{index}"
    initializers.append(numpy_helper.from_array(rng.normal(size=(8, 10)).astype(np.float32), "fc_w"))
    nodes += [
        helper.make_node("GlobalAveragePool", [previous], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "fc_w"], ["logits"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_convnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        initializer=initializers,
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def wide_classifier(path: Path, seed: int = 0, hidden: int = 1 << 17, classes: int = 10) -> Path:
    """x[1, 16] -> Gemm -> Relu -> MatMul -> logits[1, classes], `hidden` units wide: (16 + 1 + classes) * hidden
    float32 weights (13.5 MiB at the default), so that its engine takes a while to download."""
    rng = np.random.default_rng(seed)
    scale = np.float32(1 / np.sqrt(hidden))
    w1 = numpy_helper.from_array(rng.normal(size=(16, hidden)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.normal(size=(hidden,)).astype(np.float32), "b1")
    w2 = numpy_helper.from_array((rng.normal(size=(hidden, classes)) * scale).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["logits"]),
        ],
        "wide_classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=[w1, b1, w2],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
