"""Command-line arguments shared by the peer servers (run as scripts from this folder)."""

from __future__ import annotations

import argparse


def parse_args(description: str, host_help: str = "address to listen on") -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="path of the .onnx file")
    parser.add_argument("--name", required=True, help="model name in /v2/models/{name}")
    parser.add_argument("--port", type=int, required=True, help="HTTP port")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--host", default="127.0.0.1", help=host_help)
    return parser.parse_args()
