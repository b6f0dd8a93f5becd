"""`edgemodel serve ARTIFACT`: run the OIP v2 inference server on one engine."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from edgemodel_runtime.serve.app import InferenceServer, ServerConfig
from edgemodel_runtime.serve.model import ArtifactError, load, resolve
from edgemodel_runtime.serve.shadow import ShadowConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgemodel serve",
        description="Serve an engine over the Open Inference Protocol v2 (REST), with Prometheus metrics on "
        "/metrics and, given --shadow-url, mirroring of live requests to a candidate revision.",
    )
    parser.add_argument(
        "artifact", help="a directory written by `edgemodel build`, a model file, or oci://...@sha256:..."
    )
    parser.add_argument("--name", default="model", help="model name in the OIP paths (default: model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--revision", help="revision reported as the model version (default: from the build report)")
    parser.add_argument("--shadow-url", help="base URL of the candidate server to mirror requests to")
    parser.add_argument("--candidate-revision", default="candidate", help="label for the candidate in metrics")
    parser.add_argument("--mirror-percent", type=float, default=100.0, help="share of requests mirrored, 0-100")
    parser.add_argument("--mirror-queue", type=int, default=64, help="copies waiting for the candidate before drops")
    parser.add_argument("--max-body-bytes", type=int, default=64 << 20, help="larger requests get 413")
    parser.add_argument("--threads", type=int, help="intra-op threads of the engine (default: all cores)")
    parser.add_argument("--drain-seconds", type=float, default=30, help="how long SIGTERM waits for requests in flight")
    return parser


def _graceful_server() -> Any:
    """uvicorn's server, except that a drained stop on SIGTERM exits 0 instead of re-raising the signal."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    return GracefulServer


def serve_command(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    if not 0 <= args.mirror_percent <= 100:
        print("edgemodel serve: --mirror-percent must be within 0-100", file=sys.stderr)
        return 2
    cache = Path(os.environ.get("EDGEMODEL_ARTIFACT_CACHE", Path(tempfile.gettempdir()) / "edgemodel-artifacts"))
    try:
        artifact = resolve(args.artifact, cache)
        model = load(artifact, args.threads)
    except ArtifactError as error:
        print(f"edgemodel serve: {error}", file=sys.stderr)
        return 2
    shadow = None
    if args.shadow_url:
        shadow = ShadowConfig(
            url=args.shadow_url,
            mirror_percent=args.mirror_percent,
            candidate_revision=args.candidate_revision,
            queue_size=args.mirror_queue,
        )
    config = ServerConfig(
        name=args.name,
        revision=args.revision or artifact.revision or "1",
        max_body_bytes=args.max_body_bytes,
        shadow=shadow,
    )
    import uvicorn

    server = _graceful_server()(
        uvicorn.Config(
            InferenceServer(model, config),
            host=args.host,
            port=args.port,
            lifespan="on",
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=int(args.drain_seconds),
        )
    )
    print(
        f"serving {args.name} ({config.revision}) from {artifact.path} on http://{args.host}:{args.port}",
        file=sys.stderr,
    )
    server.run()
    return 0 if server.started else 1
