"""`edgemodel serve ARTIFACT`: run the OIP v2 inference server on one engine."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from edgemodel_runtime.build.compare import Tolerances
from edgemodel_runtime.serve.app import InferenceServer, ServerConfig
from edgemodel_runtime.serve.model import ArtifactError, load, resolve
from edgemodel_runtime.serve.shadow import ShadowConfig
from edgemodel_runtime.serve.shadow_config import (
    ShadowConfigError,
    ShadowConfigFile,
    check_candidate_url,
    parse_agreement,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgemodel serve",
        description="Serve an engine over the Open Inference Protocol v2 (REST), with Prometheus metrics on "
        "/metrics and, given --shadow-url or --shadow-config, mirroring of live requests to a candidate revision.",
    )
    parser.add_argument(
        "artifact", help="a directory written by `edgemodel build`, a model file, or oci://...@sha256:..."
    )
    parser.add_argument("--name", default="model", help="model name in the OIP paths (default: model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--revision", help="revision reported as the model version (default: from the build report)")
    shadow = parser.add_mutually_exclusive_group()
    shadow.add_argument(
        "--shadow-url", help="base URL of the candidate server to mirror requests to, for the server's life"
    )
    shadow.add_argument(
        "--shadow-config",
        type=Path,
        metavar="PATH",
        help='JSON file {"url": ..., "mirrorPercent": ..., "candidateRevision": ...}, re-read while serving; '
        "absent, empty or {} means no mirroring",
    )
    parser.add_argument(
        "--shadow-config-interval", type=float, default=2.0, help="seconds between reads of --shadow-config (default 2)"
    )
    parser.add_argument("--candidate-revision", help="label for the candidate in metrics, with --shadow-url")
    parser.add_argument("--mirror-percent", type=float, help="share of requests mirrored, 0-100, with --shadow-url")
    parser.add_argument(
        "--agreement",
        metavar="JSON",
        help='when a mirrored request agrees, with --shadow-url: {"maxRelativeError": 0.05, "minTop1Agreement": 1, '
        '"maxAbsError": ..., "minCosine": ..., "outputs": {"NAME": {...}}} (default: the first two as shown)',
    )
    parser.add_argument("--mirror-queue", type=int, default=64, help="copies waiting for the candidate before drops")
    parser.add_argument("--max-body-bytes", type=int, default=64 << 20, help="larger requests get 413")
    parser.add_argument("--threads", type=int, help="intra-op threads of the engine (default: all cores)")
    parser.add_argument("--drain-seconds", type=float, default=30, help="how long SIGTERM waits for requests in flight")
    return parser


def _check_shadow_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the shadow options (argparse already refuses --shadow-url with --shadow-config)."""
    if args.mirror_percent is not None and not 0 <= args.mirror_percent <= 100:
        return "--mirror-percent must be within 0-100"
    if args.shadow_config is not None:
        for flag, value in (
            ("--mirror-percent", args.mirror_percent),
            ("--candidate-revision", args.candidate_revision),
            ("--agreement", args.agreement),
        ):
            if value is not None:
                return f"{flag} goes with --shadow-url; with --shadow-config the file gives it"
    if not args.shadow_config_interval > 0:
        return "--shadow-config-interval must be more than 0 seconds"
    if args.shadow_url:
        try:
            check_candidate_url(args.shadow_url)
        except ShadowConfigError as error:
            return f"--shadow-url: {error}"
    if args.agreement is not None:
        try:
            _agreement(args.agreement)
        except ShadowConfigError as error:
            return f"--agreement: {error}"
    return None


def _agreement(text: str | None) -> Tolerances:
    if text is None:
        return parse_agreement(None)
    try:
        value = json.loads(text, parse_constant=_refuse)
    except ValueError as error:
        raise ShadowConfigError(f"not valid JSON: {error}") from error
    return parse_agreement(value)


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


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
    problem = _check_shadow_arguments(args)
    if problem:
        print(f"edgemodel serve: {problem}", file=sys.stderr)
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
            mirror_percent=100.0 if args.mirror_percent is None else args.mirror_percent,
            candidate_revision=args.candidate_revision or "candidate",
            queue_size=args.mirror_queue,
            agreement=_agreement(args.agreement),
        )
    shadow_file = None
    if args.shadow_config:
        shadow_file = ShadowConfigFile(args.shadow_config, args.shadow_config_interval, args.mirror_queue)
    config = ServerConfig(
        name=args.name,
        revision=args.revision or artifact.revision or "1",
        max_body_bytes=args.max_body_bytes,
        shadow=shadow,
        shadow_file=shadow_file,
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
