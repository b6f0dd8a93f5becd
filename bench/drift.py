"""Benchmark what counting outputs for drift costs the server per response, beside the inference itself.

For a few output shapes (a [1, 10] and a [32, 10] classifier, a 640x480 map), times
`DriftTracker.observe` (what the server runs after each inference, in its worker thread) and, in
interleaved blocks, one inference of an ONNX model producing that output on ONNX Runtime with one
thread; prints microseconds per response and the ratio. The last line printed is one JSON object.

    .venv/bin/python bench/drift.py [--rounds 5] [--calls 500]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgemodel_runtime import drift  # noqa: E402
from edgemodel_runtime.serve.drift import DriftTracker  # noqa: E402
from edgemodel_runtime.serve.protocol import TensorMetadata  # noqa: E402


def _linear(path: Path, rows: int, width: int, out: list[int]) -> Path:
    """x[rows, width] -> MatMul -> reshape to `out`: a model whose output has the shape to count."""
    size = int(np.prod(out)) // rows
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(width, size)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.asarray(out, dtype=np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["y"])],
        "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)], initializer=[w, shape],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _per_call(function: Callable[[], object], calls: int) -> float:
    function()
    started = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - started) / calls * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    cases = {"classifier [1, 10]": (1, 64, [1, 10]), "classifier [32, 10]": (32, 64, [32, 10]),
             "map [1, 1, 480, 640]": (1, 16, [1, 1, 480, 640])}  # fmt: skip
    figures = {}
    with tempfile.TemporaryDirectory() as directory:
        for name, (rows, width, out) in cases.items():
            model = _linear(Path(directory) / "m.onnx", rows, width, out)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
            x = np.random.default_rng(1).normal(size=(rows, width)).astype(np.float32)
            reference = [
                {"y": session.run(None, {"x": (x * s).astype(np.float32)})[0]} for s in np.linspace(0.5, 1.5, 20)
            ]
            spec = drift.OutputSpec("y", tuple(out), "FP32")
            summary = drift.reference_summaries([spec], reference * 20, "npz")
            tracker = DriftTracker([TensorMetadata("y", "FP32", tuple(out))], summary, {"model": "m", "revision": "r"})
            output = {"y": session.run(None, {"x": x})[0]}
            run_model = functools.partial(session.run, None, {"x": x})
            count_outputs = functools.partial(tracker.observe, output)
            infer, count = [], []
            for _ in range(args.rounds):  # interleaved blocks: the same load on both
                infer.append(_per_call(run_model, args.calls))
                count.append(_per_call(count_outputs, args.calls))
            figures[name] = {"inference_us": round(statistics.median(infer), 1),
                             "drift_us": round(statistics.median(count), 1)}  # fmt: skip
            figures[name]["ratio"] = round(figures[name]["drift_us"] / figures[name]["inference_us"], 3)
    print("| output | inference (us) | drift counting (us) | ratio |\n| --- | --- | --- | --- |")
    for name, row in figures.items():
        print(f"| {name} | {row['inference_us']} | {row['drift_us']} | {row['ratio']} |")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
