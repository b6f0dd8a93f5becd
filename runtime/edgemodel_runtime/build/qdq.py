"""Graph surgery on QDQ models: which nodes are quantised, and a copy with chosen nodes computing in FP32.

ONNX Runtime's QDQ quantiser puts QuantizeLinear -> DequantizeLinear pairs on the activations a quantised node
reads and writes, and DequantizeLinear on its integer weights (`<weight>_quantized`, with `<weight>_scale` and
`<weight>_zero_point`). Taking a node's input pairs out (and its output pair, where only float nodes read it)
leaves a graph in which ONNX Runtime runs that node in FP32, without calibrating again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["OP_TYPES", "keep_fp32", "quantized_nodes"]

OP_TYPES = ("Conv", "MatMul", "Gemm")  # Gemm: a MatMul with bias, as pre-processing fuses MatMul + Add


def quantized_nodes(model: Any) -> list[str]:
    """Names of the `OP_TYPES` nodes of a QDQ ModelProto's main graph that read at least one dequantised input
    (nodes inside If/Loop bodies are not candidates: they stay as quantised)."""
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type in OP_TYPES and any(i in dequantized for i in n.input)]


def _dequantize(model: Any, node: Any) -> npt.NDArray[np.float32]:
    """The float values a DequantizeLinear node of initializers produces."""
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    data = values[node.input[0]].astype(np.float64)
    scale = values[node.input[1]].astype(np.float64)
    zero = values[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else np.zeros(1)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * data.ndim
        shape[axis % data.ndim] = scale.size
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((data - zero) * scale).astype(np.float32)


def keep_fp32(quantized: Any, nodes: Sequence[str], originals: Mapping[str, Any]) -> Any:
    """A copy of the QDQ ModelProto `quantized` in which `nodes` compute in FP32.

    Each such node reads its activations from before their QuantizeLinear and its weights as the fp32 model's
    initializers (`originals`: name -> TensorProto; the quantiser names a weight's integers `<name>_quantized`),
    or, failing that, as their dequantised values. Its output's Q/DQ pair is bypassed when no other quantised node
    reads it. Q/DQ nodes and initializers left unused are removed. Raises KeyError for an unknown node name.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    graph = model.graph
    by_name = {n.name: n for n in graph.node}
    missing = [name for name in nodes if name not in by_name]
    if missing:
        raise KeyError(f"no node named {', '.join(missing)}")
    producer = {o: n for n in graph.node for o in n.output}
    initializers = {i.name for i in graph.initializer}
    still_quantized = set(quantized_nodes(model)) - set(nodes)
    for name in nodes:
        node = by_name[name]
        for index, tensor in enumerate(node.input):
            dq = producer.get(tensor)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            source = dq.input[0]
            if source in initializers:
                original = source.removesuffix("_quantized")
                restored = f"{original}_fp32"
                if restored not in initializers:
                    if original in originals:
                        array = numpy_helper.to_array(originals[original])
                    else:
                        array = _dequantize(model, dq)
                    graph.initializer.append(numpy_helper.from_array(array, restored))
                    initializers.add(restored)
                node.input[index] = restored
            elif source in producer and producer[source].op_type == "QuantizeLinear":
                node.input[index] = producer[source].input[0]
        for index, tensor in enumerate(node.output):
            _bypass_output(model, node, index, tensor, still_quantized)
    _prune(model)
    _drop_stray_pairs(model)
    _prune(model)
    return model


def _drop_stray_pairs(model: Any) -> None:
    """Bypass activation Q -> DQ pairs that no longer serve a quantised node, until none is left.

    A pair serves when a quantised node writes its input, reads its output, or when a node reading its output
    writes a tensor that is quantised again (DQ -> Resize -> Q, which ONNX Runtime runs in int8). Once the nodes
    around it compute in fp32, a pair only adds rounding error: ONNX Runtime's quantiser also puts pairs around
    operators it quantises along (Resize, Concat), and those stay behind when the Conv they fed is kept in fp32.
    """
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    while True:
        quantized = set(quantized_nodes(model))
        producer = {o: n for n in graph.node for o in n.output}
        readers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
        outputs = {o.name for o in graph.output}
        changed = False
        for q in [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in initializers]:
            dqs = readers.get(q.output[0], [])
            if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear" or dqs[0].output[0] in outputs:
                continue
            source, dq_out = producer.get(q.input[0]), dqs[0].output[0]
            consumers = readers.get(dq_out, [])
            requantized = any(
                r.op_type == "QuantizeLinear" for c in consumers for o in c.output for r in readers.get(o, [])
            )
            if (source is not None and source.name in quantized) or requantized:
                continue
            if any(c.name in quantized for c in consumers):
                continue
            for consumer in consumers:
                for position, name in enumerate(consumer.input):
                    if name == dq_out:
                        consumer.input[position] = q.input[0]
            changed = True
        if not changed:
            return
        _prune(model)


def _bypass_output(model: Any, node: Any, index: int, tensor: str, still_quantized: set[str]) -> None:
    """Take the Q -> DQ pair after `node`'s output out, when only float nodes or graph outputs read it."""
    graph = model.graph
    readers = [n for n in graph.node if tensor in n.input]
    if len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
        return
    q = readers[0]
    dqs = [n for n in graph.node if q.output[0] in n.input]
    if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear":
        return
    dq_out = dqs[0].output[0]
    consumers = [n for n in graph.node if dq_out in n.input]
    if any(n.name in still_quantized for n in consumers):
        return  # the pair quantises a quantised node's input: it stays
    if dq_out in {o.name for o in graph.output}:
        node.output[index] = dq_out  # the node now writes the graph output itself
        graph.node.remove(q)
        graph.node.remove(dqs[0])
        return
    for consumer in consumers:
        for position, name in enumerate(consumer.input):
            if name == dq_out:
                consumer.input[position] = tensor


def _read_names(graph: Any) -> set[str]:
    """Every name the graph's nodes read, those of nested subgraphs (If, Loop, Scan bodies) included: a body may
    read an outer-scope tensor or initializer."""
    read = set()
    for node in graph.node:
        read.update(node.input)
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                read |= _read_names(body)
    return read


def _prune(model: Any) -> None:
    """Remove Q/DQ nodes whose outputs nothing reads, then initializers nothing reads."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        read = _read_names(graph) | outputs
        dead = [
            n
            for n in graph.node
            if n.op_type in {"QuantizeLinear", "DequantizeLinear"} and not any(o in read for o in n.output)
        ]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = _read_names(graph)
    for initializer in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(initializer)
