"""Benchmark the accuracy-aware INT8 procedure (build/quantize.py) on the real models, on this machine.

Per model: calibration on realistic inputs (seed 1), the procedure's choices against the validation set
(seed 2), then the shipped model against ONNX Runtime FP32 on held-out inputs (seed 3): figures, a
binarised-mask agreement for the detector, and a fresh paired timing with an FP32-vs-FP32 control row to
show the noise (speed ratios: `measure.paired_ratio`, the median of per-round ratios). Prints a Markdown
table and, as its last line, one JSON object with every figure.

    .venv/bin/python bench/int8.py [--seconds 3] [--models ppocr-det-v4,...] [--engine openvino]

With `--engine openvino`, OpenVINO INT8 through NNCF's accuracy control (build/openvino_int8.py) instead, with
the same inputs, tolerance and paired timing against ONNX Runtime FP32.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
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
from edgemodel_runtime.build import compare, hardware, measure, quantize  # noqa: E402
from edgemodel_runtime.engines import onnxruntime_engine as ortx  # noqa: E402
from edgemodel_runtime.packaged import OCR_CLS, OCR_DET, OCR_REC, SILERO_VAD, PackagedModel  # noqa: E402

Inputs = Callable[..., list[dict[str, Any]]]
# Tolerances: the detector's bounds every pixel of its probability map (10% of its range) rather than the cosine:
# samples.detector_inputs pages leave most maps near empty, where a per-sample cosine measures noise; the others
# at the int8 defaults. `--tolerance` replaces them all.
MODELS: dict[str, tuple[PackagedModel, Inputs, compare.Tolerance]] = {
    OCR_DET.name: (
        OCR_DET,
        functools.partial(samples.detector_inputs, height=480, width=640),
        compare.Tolerance(max_relative_error=0.1),
    ),
    OCR_CLS.name: (
        OCR_CLS,
        functools.partial(samples.line_inputs, height=48, width=192),
        compare.DEFAULT_TOLERANCES["int8"],
    ),
    OCR_REC.name: (
        OCR_REC,
        functools.partial(samples.line_inputs, height=48, width=320),
        compare.DEFAULT_TOLERANCES["int8"],
    ),
    SILERO_VAD.name: (SILERO_VAD, samples.vad_inputs, compare.DEFAULT_TOLERANCES["int8"]),
}
MASK_THRESHOLD = 0.3  # PP-OCR's default binarisation threshold for the detector's probability map


def _mask_agreement(reference: list[dict[str, Any]], candidate: list[dict[str, Any]]) -> float:
    """Share of pixels on the same side of the threshold, over every sample and output."""
    same = total = 0
    for ours, theirs in zip(reference, candidate, strict=True):
        for name, value in ours.items():
            same += int(np.sum((value > MASK_THRESHOLD) == (theirs[name] > MASK_THRESHOLD)))
            total += int(value.size)
    return same / total if total else 0.0


def bench_model(name: str, seconds: float, count: int, override: compare.Tolerance | None) -> dict[str, Any]:
    model, make_inputs, tolerance = MODELS[name]
    tolerance = override or tolerance
    calibration, validation, held_out = make_inputs(count, seed=1), make_inputs(count, seed=2), make_inputs(8, seed=3)
    reference_session = ortx.session(model.path())
    expected = [ortx.run(reference_session, s) for s in validation]
    reference = [ortx.run(reference_session, s) for s in held_out]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        started = time.monotonic()
        outcome = quantize.accuracy_aware_int8(
            model.path(), calibration, validation, expected, tolerance=tolerance, work=work,
            benchmark_seconds=seconds, log=lambda line: print(f"  {line}", file=sys.stderr, flush=True),
        )  # fmt: skip
        build_s = time.monotonic() - started
        print(f"  {outcome.action}: {outcome.reason}", file=sys.stderr, flush=True)
        shipped = ortx.session(outcome.path)
        outputs = [ortx.run(shipped, s) for s in held_out]
        figures = compare.compare(reference, outputs)
        fp32 = functools.partial(ortx.run, ortx.session(work / "fp32.onnx"), held_out[0])
        control = functools.partial(ortx.run, ortx.session(work / "fp32.onnx"), held_out[0])
        speed, latency = measure.paired_ratio(fp32, functools.partial(ortx.run, shipped, held_out[0]), budget_s=seconds)
        noise, _ = measure.paired_ratio(fp32, control, budget_s=seconds)
    return {
        "model": name,
        "input": {k: list(v.shape) for k, v in held_out[0].items()},
        "tolerance": tolerance.describe(),
        "buildSeconds": round(build_s, 1),
        "int8": outcome.as_report(),
        "heldOut": {
            "shipped": outcome.precision,
            "cosine": figures.cosine,
            "maxRelativeError": figures.max_relative_error,
            "top1Agreement": figures.top1_agreement,
            "maskAgreement": _mask_agreement(reference, outputs) if name == OCR_DET.name else None,
            "withinTolerance": not compare.failures(figures, tolerance),
        },
        "latency": {
            "fp32": {"p50_ms": round(latency["baseline"].p50_ms, 3)},
            "shipped": {"p50_ms": round(latency["candidate"].p50_ms, 3), "speedup_vs_fp32": round(speed, 3)},
            "fp32-control": {"speedup_vs_fp32": round(noise, 3)},
        },
    }


def bench_openvino(name: str, seconds: float, count: int, override: compare.Tolerance | None) -> dict[str, Any]:
    from edgemodel_runtime.build import openvino_int8
    from edgemodel_runtime.engines import openvino_engine

    model, make_inputs, tolerance = MODELS[name]
    tolerance = override or tolerance
    calibration, validation, held_out = make_inputs(count, seed=1), make_inputs(count, seed=2), make_inputs(8, seed=3)
    reference_session = ortx.session(model.path())
    expected = [ortx.run(reference_session, s) for s in validation]
    reference = [ortx.run(reference_session, s) for s in held_out]
    shapes = {k: tuple(v.shape) for k, v in held_out[0].items() if np.asarray(v).ndim > 0}
    with tempfile.TemporaryDirectory() as scratch:
        started = time.monotonic()
        outcome = openvino_int8.build_openvino_int8(
            model.path(), calibration, validation, expected, tolerance=tolerance,
            target=Path(scratch) / "model.openvino", shapes=shapes,
        )  # fmt: skip
        build_s = time.monotonic() - started
        outputs = openvino_engine.run_all(outcome.path, held_out)
        figures = compare.compare(reference, outputs)
        fp32 = ortx.optimize_graph(model.path(), Path(scratch) / "fp32.onnx")
        baseline = functools.partial(ortx.run, ortx.session(fp32), held_out[0])
        speed, latency = measure.paired_ratio(
            baseline, openvino_engine.runner(outcome.path, held_out[0]), budget_s=seconds
        )
    return {
        "model": name,
        "engine": "openvino int8 (NNCF accuracy control)",
        "tolerance": tolerance.describe(),
        "buildSeconds": round(build_s, 1),
        "openvinoInt8": outcome.as_report(),
        "heldOut": {
            "cosine": figures.cosine,
            "maxRelativeError": figures.max_relative_error,
            "maskAgreement": _mask_agreement(reference, outputs) if name == OCR_DET.name else None,
            "withinTolerance": not compare.failures(figures, tolerance),
        },
        "speedupVsOnnxRuntimeFp32": round(speed, 3),
        "p50_ms": {"onnxruntime-fp32": latency["baseline"].p50_ms, "openvino-int8": latency["candidate"].p50_ms},
    }


def _table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | shipped | calibration | fp32 nodes | gate/last speed | held-out speed | control | cosine | "
        "mask | build s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        int8, held = r["int8"], r["heldOut"]
        nodes = f"{len(int8['fp32Nodes'])}/{int8['quantizedNodes']}" if int8["quantizedNodes"] else "-"
        mask = "" if held["maskAgreement"] is None else f"{held['maskAgreement']:.4f}"
        cosine = "n/a" if held["cosine"] is None else f"{held['cosine']:.5f}"
        lines.append(
            f"| {r['model']} | {held['shipped']} ({int8['action']}) | {int8['calibration'] or '-'} | {nodes} | "
            f"{int8['speedup']:.2f}x | {r['latency']['shipped']['speedup_vs_fp32']:.2f}x | "
            f"{r['latency']['fp32-control']['speedup_vs_fp32']:.2f}x | {cosine} | {mask} | {r['buildSeconds']} |"
        )
    return "\n".join(lines)


def _tolerance(text: str) -> compare.Tolerance:
    keys = {"maxAbsError": "max_abs_error", "maxRelativeError": "max_relative_error", "minCosine": "min_cosine",
            "minTop1Agreement": "min_top1_agreement"}  # fmt: skip
    pairs = dict(part.split("=", 1) for part in text.split(","))
    return compare.Tolerance(**{keys[k]: float(v) for k, v in pairs.items()})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing budget per variant")
    parser.add_argument("--samples", type=int, default=8, help="calibration and validation inputs each")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    parser.add_argument("--tolerance", help="KEY=VALUE[,KEY=VALUE] as for edgemodel build, for every model")
    parser.add_argument("--engine", choices=["onnxruntime", "openvino"], default="onnxruntime")
    args = parser.parse_args()
    override = _tolerance(args.tolerance) if args.tolerance else None
    results = []
    for name in args.models.split(","):
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        bench = bench_openvino if args.engine == "openvino" else bench_model
        results.append(bench(name, args.seconds, args.samples, override))
    machine = hardware.detect()
    print(_table(results) if args.engine == "onnxruntime" else "\n".join(json.dumps(r, default=str) for r in results))
    summary = {
        "benchmark": "int8",
        "onnxruntime": ort.__version__,
        "machine": {"arch": machine.arch, "cpu": machine.cpu_model, "flags": machine.cpu_flags, "cores": machine.cores},
        "python": platform.python_version(),
        "results": results,
    }
    print(json.dumps(summary, separators=(",", ":"), default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
