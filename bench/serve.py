"""Benchmark `edgemodel serve` against KServe's ModelServer, MLServer and in-process ONNX Runtime.

The same model (silero VAD, shipped in the silero-vad wheel; ~0.4 ms per inference, so server
overhead shows) is served by each server with one intra-op thread, and loaded with `wrk` over
loopback at concurrency 1 and 8 with the same JSON request. In-process onnxruntime is the floor.
edgemodel's stable p99 is also measured with 0% and 100% of requests mirrored to a candidate.
All ratios come from this one run. The last line printed is one JSON object with every figure.

Peers run from their own virtual environments under $EDGEMODEL_CACHE/bench (created on first
use from PyPI); `wrk` comes from Debian (apt-get install wrk).

    .venv/bin/python bench/serve.py [--seconds 8] [--skip-peers]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from edgemodel_runtime import samples  # noqa: E402
from edgemodel_runtime.build import measure  # noqa: E402
from edgemodel_runtime.packaged import SILERO_VAD, cache_root  # noqa: E402

PEERS = {
    "kserve": (["kserve==0.21.0", "onnxruntime", "numpy"], ROOT / "bench" / "peers" / "kserve_server.py"),
    "mlserver": (["mlserver==1.7.1", "onnxruntime", "numpy"], ROOT / "bench" / "peers" / "mlserver_server.py"),
}
NAME = "vad"


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _request_body() -> bytes:
    sample = samples.vad_inputs(1, seed=5)[0]
    inputs = [
        {
            "name": "input",
            "shape": list(sample["input"].shape),
            "datatype": "FP32",
            "data": sample["input"].ravel().tolist(),
        },
        {"name": "state", "shape": [2, 1, 128], "datatype": "FP32", "data": sample["state"].ravel().tolist()},
        {"name": "sr", "shape": [], "datatype": "INT64", "data": [16000]},
    ]
    return json.dumps({"inputs": inputs}).encode()


def _peer_python(peer: str) -> Path:
    packages, _ = PEERS[peer]
    venv = cache_root() / "bench" / f"venv-{peer}"
    python = venv / "bin" / "python"
    if not python.exists():
        _log(f"creating {venv} with {' '.join(packages)} (first run only)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *packages], check=True)
    return python


@contextlib.contextmanager
def _server(command: list[str], port: int) -> Iterator[str]:
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/v2/models/{NAME}/ready", timeout=2).status_code == 200:
                        break
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"{command[:3]} did not become ready:\n{log.read().decode()[-3000:]}")
                time.sleep(0.2)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def _wrk(url: str, body: bytes, connections: int, seconds: float) -> dict[str, float]:
    """p50/p99 latency (ms) and requests per second from one wrk run."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = {json.dumps(body.decode())}\n"
            "done = function(summary, latency, requests)\n"
            '  io.write(string.format("P50 %f\\nP99 %f\\nERRORS %d\\n", latency:percentile(50), '
            "latency:percentile(99), summary.errors.status + summary.errors.connect + summary.errors.read))\n"
            "end\n"
        )
    output = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "-s", script.name, f"{url}/v2/models/{NAME}/infer"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    Path(script.name).unlink()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = float(re.search(r"P50 ([\d.]+)", output).group(1)) / 1000  # type: ignore[union-attr]
    p99 = float(re.search(r"P99 ([\d.]+)", output).group(1)) / 1000  # type: ignore[union-attr]
    errors = int(re.search(r"ERRORS (\d+)", output).group(1))  # type: ignore[union-attr]
    return {"p50_ms": round(p50, 3), "p99_ms": round(p99, 3), "rps": round(rps, 1), "errors": errors}


def _in_process(model: Path, seconds: float) -> dict[str, float]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    sample = samples.vad_inputs(1, seed=5)[0]
    latency = measure.measure_interleaved({"ort": lambda: session.run(None, sample)}, warmup=50, budget_s=seconds)
    figures = latency["ort"]
    return {
        "p50_ms": round(figures.p50_ms, 4),
        "p99_ms": round(figures.p99_ms, 4),
        "rps": round(figures.throughput_per_s, 1),
    }


def _check_answer(url: str, body: bytes, reference: np.ndarray) -> None:
    answer = httpx.post(f"{url}/v2/models/{NAME}/infer", content=body, headers={"Content-Type": "application/json"})
    answer.raise_for_status()
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    np.testing.assert_allclose(np.asarray(outputs["output"]["data"]).ravel(), reference.ravel(), rtol=1e-4, atol=1e-5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each wrk run")
    parser.add_argument("--skip-peers", action="store_true", help="only edgemodel and in-process")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("bench/serve.py needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    model = SILERO_VAD.path()
    body = _request_body()
    reference = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(
        ["output"], samples.vad_inputs(1, seed=5)[0]
    )[0]
    results: dict[str, Any] = {"in-process": {"c1": _in_process(model, args.seconds)}}
    commands = {
        "edgemodel": [
            str(Path(sys.executable).parent / "edgemodel"),
            "serve",
            str(model),
            "--name",
            NAME,
            "--threads",
            "1",
        ]
    }
    if not args.skip_peers:
        for peer, (_, script) in PEERS.items():
            commands[peer] = [
                str(_peer_python(peer)),
                str(script),
                "--model",
                str(model),
                "--name",
                NAME,
                "--threads",
                "1",
            ]
    for server, command in commands.items():
        port = _free_port()
        flag = ["--port", str(port)]
        _log(f"{server}: starting")
        with _server(command + flag, port) as url:
            _check_answer(url, body, reference)
            results[server] = {f"c{c}": _wrk(url, body, c, args.seconds) for c in (1, 8)}
            _log(f"{server}: {results[server]}")
    _log("edgemodel with a shadow candidate: 0% and 100% mirrored")
    candidate_port = _free_port()
    with _server(commands["edgemodel"] + ["--port", str(candidate_port)], candidate_port) as candidate:
        for percent in (0, 100):
            port = _free_port()
            shadow = ["--port", str(port), "--shadow-url", candidate, "--mirror-percent", str(percent)]
            with _server(commands["edgemodel"] + shadow, port) as url:
                results[f"edgemodel-mirror-{percent}"] = {"c1": _wrk(url, body, 1, args.seconds)}
    summary = _summary(results)
    _print_table(results, summary)
    print(json.dumps({"benchmark": "serve", "model": SILERO_VAD.name, "results": results, "ratios": summary}))
    return 0


def _summary(results: dict[str, Any]) -> dict[str, float | None]:
    edge = results["edgemodel"]
    ratios: dict[str, float | None] = {
        "p50_vs_in_process_c1": round(edge["c1"]["p50_ms"] / results["in-process"]["c1"]["p50_ms"], 2),
        "mirror_p99_increase": round(
            results["edgemodel-mirror-100"]["c1"]["p99_ms"] / results["edgemodel-mirror-0"]["c1"]["p99_ms"] - 1, 3
        ),
    }
    for peer in PEERS:
        for c in ("c1", "c8"):
            ratios[f"throughput_vs_{peer}_{c}"] = (
                round(edge[c]["rps"] / results[peer][c]["rps"], 2) if peer in results else None
            )
    return ratios


def _print_table(results: dict[str, Any], summary: dict[str, float | None]) -> None:
    print("| server | concurrency | p50 ms | p99 ms | requests/s |")
    print("| --- | --- | --- | --- | --- |")
    for server, runs in results.items():
        for c, figures in runs.items():
            print(f"| {server} | {c[1:]} | {figures['p50_ms']} | {figures['p99_ms']} | {figures['rps']} |")
    print()
    for key, value in summary.items():
        print(f"- {key}: {value}")


if __name__ == "__main__":
    raise SystemExit(main())
