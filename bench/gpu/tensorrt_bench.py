"""TensorRT FP16/INT8 engines built by `edgemodel build`, timed against ONNX Runtime's CUDA EP.

Run through bench/gpu/tensorrt.sh on a machine with an NVIDIA GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edgemodel_runtime import samples  # noqa: E402
from edgemodel_runtime.build import hardware, measure  # noqa: E402
from edgemodel_runtime.build.tensors import save_samples  # noqa: E402
from edgemodel_runtime.engines import tensorrt_engine  # noqa: E402
from edgemodel_runtime.packaged import OCR_CLS, OCR_DET, OCR_REC, PackagedModel  # noqa: E402

Inputs = Callable[..., list[dict[str, Any]]]
MODELS: list[tuple[PackagedModel, Inputs, str]] = [
    (OCR_DET, functools.partial(samples.detector_inputs, height=480, width=640), "x=1x3x480x640"),
    (OCR_REC, functools.partial(samples.line_inputs, height=48, width=320), "x=1x3x48x320"),
    (OCR_CLS, functools.partial(samples.line_inputs, height=48, width=192), "x=1x3x48x192"),
]


def _build(
    model: PackagedModel, precision: str, *, shape: str, work: Path, calibration: Path, reference: Path
) -> dict[str, Any]:
    out = work / f"{model.name}-{precision}"
    command = [
        sys.executable, "-m", "edgemodel_runtime.cli", "build", "--model", str(model.path()), "--sha256", model.sha256,
        "--engine", "tensorrt", "--precision", precision, "--input", shape, "--reference", str(reference),
        "--output", str(out), "--tolerance", "maxRelativeError=0.5",
    ]  # fmt: skip
    if precision == "int8":
        command += ["--calibration", str(calibration)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    report_path = out / "report.json"
    report: dict[str, Any] = json.loads(report_path.read_text()) if report_path.exists() else {}
    report["exit"] = result.returncode
    report["stderrTail"] = result.stderr[-600:]
    report["engineFile"] = str(out / "model.plan")
    return report


def _ort_cuda(model: Path, sample: dict[str, Any]) -> measure.Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return functools.partial(session.run, names, sample)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    results = []
    for model, make_inputs, shape in MODELS:
        print(f"{model.name}: building TensorRT fp16 and int8 engines ...", file=sys.stderr, flush=True)
        calibration, reference = args.work / f"{model.name}-cal.npz", args.work / f"{model.name}-ref.npz"
        save_samples(calibration, make_inputs(32, seed=1))
        held_out = make_inputs(8, seed=2)
        save_samples(reference, held_out)
        builds = {
            p: _build(model, p, shape=shape, work=args.work, calibration=calibration, reference=reference)
            for p in ("fp16", "int8")
        }
        runners: dict[str, measure.Runner] = {"ort-cuda-fp32": _ort_cuda(model.path(), held_out[0])}
        for precision, report in builds.items():
            if report["exit"] == 0:
                runners[f"tensorrt-{precision}"] = tensorrt_engine.runner(Path(report["engineFile"]), held_out[0])
        latency = measure.measure_interleaved(runners, warmup=10, budget_s=args.seconds)
        base = latency["ort-cuda-fp32"].p50_ms
        results.append(
            {
                "model": model.name,
                "builds": {
                    p: {k: r.get(k) for k in ("exit", "status", "reason", "message", "buildSeconds", "candidate")}
                    for p, r in builds.items()
                },
                "latency": {k: v.as_dict() for k, v in latency.items()},
                "speedupVsOrtCuda": {k: round(base / v.p50_ms, 3) for k, v in latency.items()},
            }
        )
        for name, figures in latency.items():
            print(
                f"{model.name:16} {name:16} p50 {figures.p50_ms:8.3f} ms  p99 {figures.p99_ms:8.3f} ms", file=sys.stderr
            )
    machine = hardware.detect()
    summary = {
        "benchmark": "tensorrt",
        "gpu": machine.gpu_name,
        "computeCapability": machine.gpu_compute_capability,
        "tensorrt": tensorrt_engine.version(),
        "results": results,
    }
    print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
