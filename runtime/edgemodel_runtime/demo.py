"""`edgemodel demo`: the whole runtime story on this machine, with a real model, in about a minute.

1. Fetch the PP-OCRv4 text recogniser shipped in the rapidocr-onnxruntime wheel (from PyPI).
2. Build and validate an FP32 engine and a calibrated INT8 engine for this machine with `edgemodel build`.
3. Serve FP32 as the stable revision and INT8 as the candidate, as two real `edgemodel serve` processes,
   the stable one mirroring every request to the candidate.
4. Send generated text-line images to the stable server, then read the shadow evidence from its metrics.
5. Decide promote or roll back with the same criteria an EdgeModel's `spec.rollout.analysis` holds.

Everything printed is measured in this run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from edgemodel_runtime import samples
from edgemodel_runtime.build.compare import DEFAULT_AGREEMENT, Tolerance, Tolerances
from edgemodel_runtime.build.pipeline import BuildRequest, DataFile, build
from edgemodel_runtime.build.tensors import save_samples
from edgemodel_runtime.packaged import OCR_REC


def _step(number: int, text: str) -> None:
    print(f"[{number}/5] {text}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


_HTTP = httpx.Client(timeout=30)


def _get(url: str) -> tuple[int, bytes]:
    response = _HTTP.get(url)
    return response.status_code, response.content


def _post(url: str, body: bytes, header_length: int) -> tuple[int, float]:
    started = time.perf_counter()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)}
    response = _HTTP.post(url, content=body, headers=headers)
    return response.status_code, time.perf_counter() - started


@contextlib.contextmanager
def _server(artifact: Path, port: int, *extra: str) -> Iterator[str]:
    command = [sys.executable, "-m", "edgemodel_runtime.cli", "serve", str(artifact), "--name", "ocr-rec"]
    command += ["--port", str(port), "--threads", "1", *extra]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        try:
            yield _wait_ready(f"http://127.0.0.1:{port}", process, log)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Any) -> str:
    deadline = time.monotonic() + 60
    while _ready(url) is False:
        if process.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            raise RuntimeError(f"server on {url} did not start: {log.read().decode(errors='replace')}")
        time.sleep(0.1)
    return url


def _ready(url: str) -> bool:
    try:
        return _get(url + "/v2/health/ready")[0] == 200
    except httpx.TransportError:
        return False


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def _by_label(text: str, name: str, label: str) -> dict[str, int]:
    """A counter's values by one label, e.g. disagreements by reason."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and f'{label}="' in line:
            value = line.split(f'{label}="', 1)[1].split('"', 1)[0]
            counts[value] = counts.get(value, 0) + int(float(line.rsplit(" ", 1)[1]))
    return counts


@dataclass(frozen=True)
class Evidence:
    requests: int
    failed: int
    compared: int
    agreed: int
    candidate_errors: int
    latency_ratio: float  # NaN when no compared request was timed
    stable_p50_ms: float
    stable_p99_ms: float
    disagreed: dict[str, int]  # compared requests that disagreed, by the first reason


@dataclass(frozen=True)
class Criteria:
    min_requests: int = 50
    min_agreement: float = 0.99
    max_latency_ratio: float = 1.5
    max_error_rate: float = 0.01


def decide(evidence: Evidence, criteria: Criteria) -> tuple[str, str]:
    """Promote or roll back: a chain of small checks, the first failing one decides."""
    agreement = evidence.agreed / evidence.compared if evidence.compared else 0.0
    error_rate = evidence.candidate_errors / max(1, evidence.compared + evidence.candidate_errors)
    # A figure that is not a finite number passes no check: NaN compares false, and says so.
    checks = [
        (evidence.compared >= criteria.min_requests, f"only {evidence.compared} mirrored requests were compared"),
        (error_rate <= criteria.max_error_rate, f"candidate error rate {error_rate:.3f} > {criteria.max_error_rate}"),
        (agreement >= criteria.min_agreement, f"agreement {agreement:.3f} < minAgreement {criteria.min_agreement}"),
        (math.isfinite(evidence.latency_ratio), "no latency ratio was measured"),
        (
            evidence.latency_ratio <= criteria.max_latency_ratio,
            f"latency ratio {evidence.latency_ratio:.2f} > maxLatencyRatio {criteria.max_latency_ratio}",
        ),
    ]
    for passed, reason in checks:
        if not passed:
            return "roll back", reason
    return "promote", (
        f"agreement {agreement:.3f} >= {criteria.min_agreement}, latency ratio {evidence.latency_ratio:.2f} <= "
        f"{criteria.max_latency_ratio}, error rate {error_rate:.3f} <= {criteria.max_error_rate}"
    )


def _traffic(stable: str, requests: int) -> tuple[list[float], int]:
    inputs = samples.line_inputs(16, 48, 320, seed=11)
    # Binary tensors both ways, as tritonclient and KServe clients send them.
    bodies = []
    for sample in inputs:
        raw = sample["x"].astype("float32").tobytes()
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [1, 3, 48, 320],
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
        ).encode()
        bodies.append((header + raw, len(header)))
    latencies, failed = [], 0
    for n in range(requests):
        body, header_length = bodies[n % len(bodies)]
        status, seconds = _post(f"{stable}/v2/models/ocr-rec/infer", body, header_length)
        latencies.append(seconds)
        failed += status != 200
        if (n + 1) % 25 == 0:
            print(f"      {n + 1}/{requests} requests sent", file=sys.stderr, flush=True)
    return sorted(latencies), failed


def _evidence(stable: str, requests: int, latencies: list[float], failed: int) -> Evidence:
    deadline = time.monotonic() + 60
    while True:
        text = _get(stable + "/metrics")[1].decode()
        names = ("compared_total", "candidate_errors_total", "dropped_total")
        settled = sum(_metric(text, f"edgemodel_shadow_{name}") for name in names)
        if settled >= requests or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    count = _metric(text, "edgemodel_shadow_latency_ratio_count")
    return Evidence(
        requests=requests,
        failed=failed,
        compared=int(_metric(text, "edgemodel_shadow_compared_total")),
        agreed=int(_metric(text, "edgemodel_shadow_agreed_total")),
        candidate_errors=int(_metric(text, "edgemodel_shadow_candidate_errors_total")),
        latency_ratio=_metric(text, "edgemodel_shadow_latency_ratio_sum") / count if count else float("nan"),
        stable_p50_ms=1000 * latencies[len(latencies) // 2],
        stable_p99_ms=1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        disagreed=_by_label(text, "edgemodel_shadow_disagreed_total", "reason"),
    )


def _table(builds: dict[str, dict[str, Any]], evidence: Evidence, decision: tuple[str, str]) -> str:
    rows = ["", "engine            precision  build s  p50 ms  p99 ms  vs fp32  max rel. error  cosine  worst sample"]
    for role, report in builds.items():
        fell_back = report.get("precision") != report.get("requestedPrecision")
        figures = report.get("fp32" if fell_back else "candidate", {}).get("comparison", {})
        latency = report.get("latency", {})
        speedup = report.get("int8Speedup")
        versus = f"{speedup:.2f}x" if speedup else "-"
        rows.append(
            f"{role:17} {report['precision']:9} {report['buildSeconds']:8.1f} {latency['p50_ms']:7.2f} "
            f"{latency['p99_ms']:7.2f} {versus:>8} {_figure(figures.get('max_relative_error'), '.3g'):>15} "
            f"{_figure(figures.get('cosine'), '.4f'):>7} {_figure(figures.get('worst_sample'), 'd'):>13}"
        )
        if fell_back:  # the build served fp32 instead of what was asked, and says why
            reason = (report.get("decision") or {}).get("reason") or "the build kept fp32"
            rows.append(f"{'':17} asked for {report.get('requestedPrecision')}, built {report['precision']}: {reason}")
        uninformative = (report.get("validation") or {}).get("uninformative")
        if uninformative:
            rows.append(f"{'':17} uninformative reference outputs, not judged: {uninformative}")
    rows.append("(vs fp32: INT8 against FP32 timed side by side in the INT8 build; other timings differ run to run)")
    agreement = evidence.agreed / evidence.compared if evidence.compared else 0.0
    rows += [
        "",
        f"stable served     {evidence.requests} requests, {evidence.failed} failed, "
        f"client p50 {evidence.stable_p50_ms:.1f} ms, p99 {evidence.stable_p99_ms:.1f} ms",
        f"shadow            {evidence.compared} compared, {evidence.agreed} agreed ({agreement:.1%}), "
        f"{evidence.candidate_errors} candidate errors, latency ratio {evidence.latency_ratio:.2f}",
        f"agreement         a request agrees within {Tolerances(DEFAULT_AGREEMENT).describe()} on every output; "
        f"disagreed by first reason: {evidence.disagreed or 'none'}",
        f"decision          {decision[0].upper()}: {decision[1]}",
    ]
    return "\n".join(rows)


def _figure(value: Any, spec: str) -> str:
    """A figure of the build report, or '-' where there is none (an uninformative output, a perfect run)."""
    return "-" if value is None else format(value, spec)


def run(requests: int, work: Path) -> dict[str, Any]:
    _step(1, f"fetch {OCR_REC.member.rsplit('/', 1)[-1]} from the {OCR_REC.package} {OCR_REC.version} wheel")
    model = OCR_REC.path()
    calibration = work / "calibration.npz"
    save_samples(calibration, samples.line_inputs(16, 48, 320, seed=1))
    reference = work / "reference.npz"
    save_samples(reference, samples.line_inputs(8, 48, 320, seed=2))

    def request(output: Path, **options: Any) -> BuildRequest:
        return BuildRequest(
            model=str(model),
            sha256=OCR_REC.sha256,
            inputs={"x": (1, 3, 48, 320)},
            reference=DataFile(str(reference)),
            benchmark_seconds=1.5,
            output=output,
            **options,
        )

    _step(2, "build and validate the FP32 engine (stable)")
    stable_report = build(request(work / "fp32", precision="fp32"))
    _step(3, "build the INT8 engine (candidate), calibrated on generated text lines")
    # The demo loosens the build's INT8 tolerance so that the shadow analysis, not the build, makes the call.
    candidate_report = build(
        request(
            work / "int8",
            precision="int8",
            calibration=DataFile(str(calibration)),
            tolerance=Tolerance(min_cosine=0.5),
        )
    )
    _step(4, "serve FP32 as stable and INT8 as candidate; stable mirrors 100% of requests")
    candidate_port, stable_port = _free_port(), _free_port()
    with _server(work / "int8", candidate_port, "--revision", "int8") as candidate:
        shadow = [
            "--revision",
            "fp32",
            "--shadow-url",
            candidate,
            "--mirror-percent",
            "100",
            "--candidate-revision",
            "int8",
        ]
        with _server(work / "fp32", stable_port, *shadow) as stable:
            _step(5, f"send {requests} generated text-line images to the stable server")
            latencies, failed = _traffic(stable, requests)
            evidence = _evidence(stable, requests, latencies, failed)
    decision = decide(evidence, Criteria(min_requests=min(50, requests)))
    builds = {"stable (FP32)": stable_report, "candidate (INT8)": candidate_report}
    print(_table(builds, evidence, decision))
    return {"evidence": evidence.__dict__, "decision": decision[0], "reason": decision[1]}


def demo_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="edgemodel demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200, help="requests to send to the stable server")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON object")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgemodel-demo-") as scratch:
        result = run(args.requests, Path(scratch))
    print(f"\ndemo finished in {time.monotonic() - started:.0f}s")
    if args.json:
        print(json.dumps(result))
    return 0
