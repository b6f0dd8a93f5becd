"""Benchmark the CPU engines `edgemodel build` can produce against ONNX Runtime FP32, in one run.

For each real model shipped in a PyPI package: ONNX Runtime FP32 (the reference), a second ONNX
Runtime FP32 session as a control row (its ratio to the first shows the noise of the method),
OpenVINO FP32 with the model's dynamic shapes, and OpenVINO FP32 and BF16 (where the CPU has BF16)
with the input shape fixed, built by the same code as `edgemodel build --engine openvino`.

Two engines in one process on few cores disturb each other (ONNX Runtime's spinning thread pool,
OpenVINO's pinned workers), and alternating single calls measures that fight rather than the
engines. So each round gives every variant a block of calls, the first call after each switch is
discarded, and the order alternates between rounds. Accuracy is measured on held-out synthetic
text pages and lines (dark glyph blocks on a light page, from edgemodel_runtime.samples; no font
renderer is installed), against ONNX Runtime FP32; for the detector also the agreement of the text
mask binarised at PP-OCR's threshold of 0.3. Prints a Markdown table and, as its last line, one
JSON object with every figure.

    .venv/bin/python bench/engines.py [--seconds 3] [--models ppocr-det-v4,ppocr-cls-v2]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402

from edgemodel_runtime import samples  # noqa: E402
from edgemodel_runtime.build import compare, hardware  # noqa: E402
from edgemodel_runtime.engines import onnxruntime_engine as ortx  # noqa: E402
from edgemodel_runtime.engines import openvino_engine as ovx  # noqa: E402
from edgemodel_runtime.packaged import OCR_CLS, OCR_DET, OCR_REC, PackagedModel  # noqa: E402

Inputs = Callable[..., list[dict[str, Any]]]
MODELS: dict[str, tuple[PackagedModel, tuple[int, ...], Inputs]] = {
    OCR_DET.name: (OCR_DET, (1, 3, 480, 640), functools.partial(samples.detector_inputs, height=480, width=640)),
    OCR_CLS.name: (OCR_CLS, (1, 3, 48, 192), functools.partial(samples.line_inputs, height=48, width=192)),
    OCR_REC.name: (OCR_REC, (1, 3, 48, 320), functools.partial(samples.line_inputs, height=48, width=320)),
}
MASK_THRESHOLD = 0.3  # PP-OCR's detector binarises its probability map here
BLOCK = 5


def _variants(model: Path, shape: tuple[int, ...], work: Path) -> dict[str, Callable[[dict[str, Any]], Any]]:
    """Each variant as a function from one sample to its outputs (a list of arrays)."""
    reference, control = ortx.session(model), ortx.session(model)
    names = [o.name for o in reference.get_outputs()]
    made: dict[str, Callable[[dict[str, Any]], Any]] = {
        "onnxruntime-fp32": functools.partial(reference.run, names),
        "onnxruntime-fp32 (control)": functools.partial(control.run, names),
    }
    builds = {"openvino-fp32-dynamic": ("fp32", {}), "openvino-fp32": ("fp32", {"x": shape})}
    if "BF16" in ovx.capabilities():
        builds["openvino-bf16"] = ("bf16", {"x": shape})
    for name, (precision, shapes) in builds.items():
        artifact = ovx.compile_to_artifact(model, work / f"{name}.openvino", precision, shapes)
        request = ovx.load(artifact).create_infer_request()
        made[name] = functools.partial(lambda r, sample: [np.array(v) for v in r.infer(sample).values()], request)
    return made


def _time(
    variants: dict[str, Callable[[dict[str, Any]], Any]], sample: dict[str, Any], seconds: float
) -> dict[str, Any]:
    """Per-variant median ms over blocks; each switch's first call discarded, order alternating by round."""
    timings: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    deadline = time.perf_counter() + seconds * len(variants)
    rounds = 0
    while rounds < 4 or time.perf_counter() < deadline:
        for name in order if rounds % 2 == 0 else reversed(order):
            run = variants[name]
            run(sample)  # the first call after a switch pays for the other engine's threads and caches
            for _ in range(BLOCK):
                started = time.perf_counter()
                run(sample)
                timings[name].append(time.perf_counter() - started)
        rounds += 1
    return {name: {"p50_ms": 1000 * statistics.median(v), "runs": len(v)} for name, v in timings.items()}


def _mask_agreement(reference: list[dict[str, Any]], candidate: list[dict[str, Any]]) -> float:
    same = total = 0
    for ref, cand in zip(reference, candidate, strict=True):
        for name in ref:
            a, b = ref[name] > MASK_THRESHOLD, cand[name] > MASK_THRESHOLD
            same += int(np.sum(a == b))
            total += a.size
    return same / total


def bench_model(name: str, seconds: float) -> dict[str, Any]:
    model, shape, make_inputs = MODELS[name]
    held_out = make_inputs(8, seed=2)
    with tempfile.TemporaryDirectory() as scratch:
        variants = _variants(model.path(), shape, Path(scratch))
        outputs = {k: [{str(i): v for i, v in enumerate(run(s))} for s in held_out] for k, run in variants.items()}
        latency = _time(variants, held_out[0], seconds)
    base = latency["onnxruntime-fp32"]["p50_ms"]
    results = {}
    for variant, figures in latency.items():
        accuracy = compare.compare(outputs["onnxruntime-fp32"], outputs[variant])
        row = {
            "p50_ms": round(figures["p50_ms"], 3),
            "runs": figures["runs"],
            "speedup_vs_onnxruntime_fp32": round(base / figures["p50_ms"], 3),
            "max_abs_error": accuracy.max_abs_error,
            "max_relative_error": None
            if accuracy.max_relative_error is None
            else round(accuracy.max_relative_error, 6),
            "cosine": None if accuracy.cosine is None else round(accuracy.cosine, 6),
            # what a build would decide at this precision's default tolerance
            "within_default_tolerance": not compare.failures(
                accuracy, compare.DEFAULT_TOLERANCES["bf16" if "bf16" in variant else "fp32"]
            ),
        }
        if name == OCR_DET.name:
            row["mask_agreement"] = round(_mask_agreement(outputs["onnxruntime-fp32"], outputs[variant]), 6)
            row["reference_mask_share"] = round(
                float(np.mean([np.mean(o["0"] > MASK_THRESHOLD) for o in outputs["onnxruntime-fp32"]])), 6
            )
        results[variant] = row
    return {"model": name, "input": list(shape), "variants": results}


def _table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | variant | p50 ms | vs ORT fp32 | max rel. error | cosine | mask agreement | default tolerance |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        for variant, f in result["variants"].items():
            mask = f.get("mask_agreement")
            error = "uninformative" if f["max_relative_error"] is None else f"{f['max_relative_error']:.2g}"
            lines.append(
                f"| {result['model']} | {variant} | {f['p50_ms']:.2f} | {f['speedup_vs_onnxruntime_fp32']:.2f}x | "
                f"{error} | {f['cosine']} | {'' if mask is None else f'{100 * mask:.3f}%'} | "
                f"{'passes' if f['within_default_tolerance'] else 'misses'} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing budget per variant")
    parser.add_argument(
        "--models", default=f"{OCR_DET.name},{OCR_CLS.name}", help="comma-separated subset of " + ", ".join(MODELS)
    )
    args = parser.parse_args()
    results = []
    for name in args.models.split(","):
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        results.append(bench_model(name, args.seconds))
    machine = hardware.detect()
    print(_table(results))
    summary = {
        "benchmark": "engines",
        "onnxruntime": ort.__version__,
        "openvino": ovx.version(),
        "machine": {"arch": machine.arch, "cpu": machine.cpu_model, "flags": machine.cpu_flags, "cores": machine.cores},
        "python": platform.python_version(),
        "results": results,
    }
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
