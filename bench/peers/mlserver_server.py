"""Peer server for benchmarks: one ONNX model on MLServer (Open Inference Protocol v2 REST).

Run with the interpreter of a venv that has mlserver, onnxruntime and numpy:

    python mlserver_server.py --model PATH --name NAME --port N --threads T

Writes settings.json and NAME/model-settings.json into a temporary folder and runs `mlserver start <folder>` in this
process (MLServer's own CLI entry point, so SIGTERM reaches MLServer directly and the folder is removed on exit).
REST and gRPC listen on --host (127.0.0.1 by default). MLServer 1.7 always starts its gRPC server, so it gets a
free port; the metrics server is off (metrics_endpoint null); parallel_workers 0 keeps inference in this process.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
from pathlib import Path

from peer_args import parse_args  # this folder, first on sys.path when run as a script


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def write_settings(folder: Path, args: argparse.Namespace) -> None:
    settings = {
        "host": args.host,
        "http_port": args.port,
        "grpc_port": free_port(args.host),
        "metrics_endpoint": None,
        "metrics_dir": str(folder / ".metrics"),
        "environments_dir": str(folder / ".envs"),
        "parallel_workers": 0,
        "debug": False,  # no uvicorn access log
    }
    model_settings = {
        "name": args.name,
        "implementation": "mlserver_runtime.OnnxRuntime",
        "parameters": {"uri": str(Path(args.model).resolve()), "extra": {"threads": args.threads}},
    }
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    (folder / args.name).mkdir()  # MLServer warns when the model's folder name differs from its name
    (folder / args.name / "model-settings.json").write_text(json.dumps(model_settings, indent=2))


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "address to listen on (REST and gRPC)")
    with tempfile.TemporaryDirectory(prefix="mlserver-peer-") as tmp:
        write_settings(Path(tmp), args)
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # so "mlserver_runtime" imports
        sys.argv = ["mlserver", "start", tmp]
        from mlserver.cli import main as mlserver_main

        mlserver_main()  # click exits with SystemExit; the with block still removes the folder


if __name__ == "__main__":
    main()
