"""Benchmark the ONNX Runtime variants `edgemodel build` can produce, per real model, on this machine.

For each model shipped in a PyPI package: FP32 as loaded, offline-optimised FP32, FP16, INT8
dynamic and INT8 static (calibrated on realistic synthetic inputs), timed in interleaved rounds
in one run, with accuracy against FP32 on held-out realistic inputs; then what `edgemodel build
--engine auto --precision auto` chooses for the same model on the same inputs (every candidate engine
validated and timed side by side against ONNX Runtime fp32 in its own run). Prints two Markdown tables
and, as its last line, one JSON object with every figure.

    .venv/bin/python bench/build.py [--seconds 3] [--models ppocr-det-v4,...]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from edgemodel_runtime import samples  # noqa: E402
from edgemodel_runtime.build import compare, hardware, measure  # noqa: E402
from edgemodel_runtime.build.errors import BuildError  # noqa: E402
from edgemodel_runtime.build.pipeline import BuildRequest, DataFile, build  # noqa: E402
from edgemodel_runtime.build.tensors import save_samples  # noqa: E402
from edgemodel_runtime.engines import onnxruntime_engine as ortx  # noqa: E402
from edgemodel_runtime.packaged import OCR_CLS, OCR_DET, OCR_REC, SILERO_VAD, PackagedModel  # noqa: E402

Inputs = Callable[..., list[dict[str, Any]]]
MODELS: dict[str, tuple[PackagedModel, Inputs]] = {
    OCR_DET.name: (OCR_DET, functools.partial(samples.detector_inputs, height=480, width=640)),
    OCR_REC.name: (OCR_REC, functools.partial(samples.line_inputs, height=48, width=320)),
    OCR_CLS.name: (OCR_CLS, functools.partial(samples.line_inputs, height=48, width=192, upside_down=0.5)),
    SILERO_VAD.name: (SILERO_VAD, samples.vad_inputs),
}
VARIANTS = ("fp32", "fp32-optimised", "fp16", "int8-dynamic", "int8-static")


def _variants(model: Path, work: Path, calibration: list[dict[str, Any]]) -> dict[str, Path | str]:
    """Each variant's model file, or the error that prevented it."""
    made: dict[str, Path | str] = {"fp32": model}
    steps: dict[str, Callable[[], Path]] = {
        "fp32-optimised": lambda: ortx.optimize_graph(model, work / "opt.onnx"),
        "fp16": lambda: ortx.convert_fp16(work / "opt.onnx", work / "fp16.onnx"),
        "int8-dynamic": lambda: ortx.quantize_dynamic_int8(model, work / "dyn.onnx"),
        "int8-static": lambda: ortx.quantize_static_int8(model, work / "static.onnx", calibration),
    }
    for name, step in steps.items():
        try:
            made[name] = step()
        except BuildError as error:
            made[name] = f"{error.reason}: {str(error)[:160]}"
    return made


MASK_THRESHOLD = 0.3  # PP-OCR's detector binarises its map here
MAX_MASK_IOU_DROP = 0.1  # percentage points: the detector's mask must stay 99.9% the same


def _reference(path: Path, model: PackagedModel, held_out: list[dict[str, Any]]) -> float | None:
    """The held-out inputs as a reference set; for the detector with its fp32 text mask as labels (so the
    build checks mask IoU against fp32 within MAX_MASK_IOU_DROP). Returns the maxAccuracyDrop to ask for."""
    save_samples(path, held_out)
    if model is not OCR_DET:
        return None
    session = ortx.session(model.path())
    maps = [next(iter(ortx.run(session, sample).values())) for sample in held_out]
    name = session.get_outputs()[0].name
    arrays = dict(np.load(path))
    arrays |= {f"label.{name}": np.stack([m > MASK_THRESHOLD for m in maps]), f"threshold.{name}": np.float32(0.3)}
    with path.open("wb") as handle:
        np.savez(handle, **arrays)
    return MAX_MASK_IOU_DROP


def bench_auto(
    model: PackagedModel, calibration: list[dict[str, Any]], held_out: list[dict[str, Any]], seconds: float
) -> dict[str, Any]:
    """What the build's auto mode chooses on the held-out inputs (calibration given, so int8 is tried too)."""
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        save_samples(work / "calibration.npz", calibration)
        max_drop = _reference(work / "reference.npz", model, held_out)
        main_input = "input" if "input" in held_out[0] else "x"
        request = BuildRequest(
            model=str(model.path()),
            sha256=model.sha256,
            engine="auto",
            precision="auto",
            output=work / "engine",
            calibration=DataFile(str(work / "calibration.npz")),
            reference=DataFile(str(work / "reference.npz")),
            inputs={main_input: tuple(held_out[0][main_input].shape)},
            benchmark_seconds=seconds,
            max_accuracy_drop=max_drop,
        )
        try:
            built = build(request)
        except BuildError as error:
            failed = json.loads((work / "engine" / "report.json").read_text())
            return {"error": f"{error.reason}: {str(error)[:200]}", "candidates": failed.get("auto", {})}
    auto = built["auto"]
    chosen = next(r for r in auto["candidates"] if r["name"] == auto["chosen"])
    return {
        "chosen": auto["chosen"],
        "speedup_vs_onnxruntime_fp32": _rounded(chosen["speedup"], 3),
        "p50_ms": _rounded(chosen["p50_ms"], 3),
        "cosine": _rounded(chosen["cosine"], 6),
        "task": built.get("task"),
        "candidates": auto["candidates"],
        "skipped": auto["skipped"],
        "warnings": [w["message"] for w in built.get("warnings", [])],
    }


def bench_model(name: str, seconds: float) -> dict[str, Any]:
    model, make_inputs = MODELS[name]
    calibration, held_out = make_inputs(16, seed=1), make_inputs(8, seed=2)
    with tempfile.TemporaryDirectory() as scratch:
        variants = _variants(model.path(), Path(scratch), calibration)
        sessions = {k: ortx.session(v) for k, v in variants.items() if isinstance(v, Path)}
        reference = [ortx.run(sessions["fp32"], s) for s in held_out]
        accuracy = {
            k: compare.compare(reference, [ortx.run(s, x) for x in held_out]).as_dict() for k, s in sessions.items()
        }
        runners: dict[str, measure.Runner] = {
            k: functools.partial(ortx.run, s, held_out[0]) for k, s in sessions.items()
        }
        latency = measure.measure_interleaved(runners, warmup=5, budget_s=seconds)
    auto = bench_auto(model, calibration, held_out, seconds)
    base = latency["fp32"].p50_ms
    return {
        "model": name,
        "input": {k: list(v.shape) for k, v in held_out[0].items()},
        "variants": {
            k: {
                "p50_ms": round(latency[k].p50_ms, 3),
                "p99_ms": round(latency[k].p99_ms, 3),
                "speedup_vs_fp32": round(base / latency[k].p50_ms, 3),
                "max_abs_error": accuracy[k]["max_abs_error"],
                "max_relative_error": _rounded(accuracy[k]["max_relative_error"], 5),
                "cosine": None if accuracy[k]["cosine"] is None else round(accuracy[k]["cosine"], 6),
                "top1_agreement": accuracy[k]["top1_agreement"],
            }
            if k in latency
            else {"error": variants[k]}
            for k in VARIANTS
        },
        "auto": auto,
    }


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _shown(value: float | None) -> str:
    """A relative error, or why there is none: every output's reference is uninformative on these inputs."""
    return "uninformative" if value is None else f"{value:.2g}"


def _table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | variant | p50 ms | p99 ms | speed vs fp32 | max rel. error | cosine | top-1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        for variant, figures in result["variants"].items():
            if "error" in figures:
                lines.append(f"| {result['model']} | {variant} | failed: {figures['error']} | | | | | |")
                continue
            top1 = "" if figures["top1_agreement"] is None else f"{figures['top1_agreement']:.3f}"
            lines.append(
                f"| {result['model']} | {variant} | {figures['p50_ms']:.2f} | {figures['p99_ms']:.2f} | "
                f"{figures['speedup_vs_fp32']:.2f}x | {_shown(figures['max_relative_error'])} | "
                f"{figures['cosine']} | {top1} |"
            )
    return "\n".join(lines)


def _auto_table(results: list[dict[str, Any]]) -> str:
    """Per model: what auto chose, and every candidate it tried (speedup vs ONNX Runtime fp32, cosine, verdict)."""
    lines = [
        "| model | auto chose | speed vs ORT fp32 | cosine | candidates: speed, cosine, verdict | warnings |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        auto = result["auto"]
        rows = auto["candidates"] if isinstance(auto["candidates"], list) else auto["candidates"].get("candidates", [])
        tried = "; ".join(
            f"{r['name']} "
            + (f"{r['speedup']:.2f}x " if r.get("speedup") else "")
            + (f"{r['cosine']:.6f} " if r.get("cosine") is not None else "")
            + (f"mask IoU {r['task_metric']:.2f}% " if r.get("task_metric") is not None else "")
            + ("pass" if r["passed"] else "fail")
            for r in rows
        )
        if "error" in auto:
            lines.append(f"| {result['model']} | failed: {auto['error']} | | | {tried} | |")
            continue
        warned = "; ".join(auto["warnings"]) or ""
        lines.append(
            f"| {result['model']} | {auto['chosen']} | {auto['speedup_vs_onnxruntime_fp32']:.2f}x | "
            f"{auto['cosine']} | {tried} | {warned} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing budget per variant")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    args = parser.parse_args()
    results = []
    for name in args.models.split(","):
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        results.append(bench_model(name, args.seconds))
    machine = hardware.detect()
    print(_table(results))
    print()
    print(_auto_table(results))
    summary = {
        "benchmark": "build",
        "onnxruntime": ort.__version__,
        "machine": {"arch": machine.arch, "cpu": machine.cpu_model, "flags": machine.cpu_flags, "cores": machine.cores},
        "python": platform.python_version(),
        "results": results,
    }
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
