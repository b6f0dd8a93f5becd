"""`edgemodel serve ARTIFACT`: run the OIP v2 inference server on one engine.

Exit codes: 0 after a drained stop (SIGTERM); 1 when the server stopped without having started; 2 for a
setting that would leave the model unreachable or an artifact that cannot be served as it is (missing,
tampered with, not a model, a tensor the server does not carry); 4 when the registry or the disk failed
(retrying may help) or on a bug. Each refusal is one line on stderr: `edgemodel serve: <message>` for a
setting, `edgemodel serve: <Reason>: <message>` for the artifact.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn
from urllib.parse import urlsplit

from edgemodel_runtime import power
from edgemodel_runtime.build.compare import Tolerances
from edgemodel_runtime.power import Meter, Unavailable
from edgemodel_runtime.serve.app import InferenceServer, ServerConfig
from edgemodel_runtime.serve.drift import DEFAULT_WINDOW
from edgemodel_runtime.serve.fallback import FallbackSource, load_engine
from edgemodel_runtime.serve.model import INFRASTRUCTURE, ArtifactError
from edgemodel_runtime.serve.shadow import ShadowConfig
from edgemodel_runtime.serve.shadow_config import (
    ShadowConfigError,
    ShadowConfigFile,
    check_candidate_url,
    parse_agreement,
    unique_keys,
    unknown_outputs,
)

# What may appear as one segment of a URL path without encoding, in every client: the model name
# and the revision are path segments of /v2/models/{name}/versions/{revision}/infer.
_PATH_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


class _Parser(argparse.ArgumentParser):
    """argparse, except that a bad option is one line on stderr and exit 2, without the usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"edgemodel serve: {message} (see edgemodel serve --help)", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    parser.add_argument(
        "--fallback-model",
        metavar="URI",
        help="the original ONNX model (https://, oci:// or a path), served on ONNX Runtime FP32 (CPU) when the "
        "engine cannot be loaded here; with --fallback-sha256",
    )
    parser.add_argument("--fallback-sha256", metavar="HEX", help="SHA-256 of --fallback-model")
    parser.add_argument(
        "--drift-window",
        type=int,
        default=DEFAULT_WINDOW,
        metavar="ROWS",
        help=f"served rows each output's drift score looks back on (default {DEFAULT_WINDOW})",
    )
    return parser


def _check_server_arguments(args: argparse.Namespace) -> str | None:
    """What would leave the server unreachable or misconfigured, before anything loads."""
    for flag, value in (("--name", args.name), ("--revision", args.revision)):
        if value is not None and not _PATH_SEGMENT.match(value):
            return (
                f"{flag} {value!r} cannot be a segment of the URL paths clients use (/v2/models/NAME/versions/"
                "REVISION/infer): use 1-255 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
    if not 1 <= args.port <= 65535:
        return f"--port {args.port} is not a TCP port clients can reach (1-65535)"
    for flag, number, least in (
        ("--max-body-bytes", args.max_body_bytes, 1),
        ("--threads", args.threads, 1),
        ("--mirror-queue", args.mirror_queue, 1),
        ("--drain-seconds", args.drain_seconds, 0),
        ("--drift-window", args.drift_window, 1),
    ):
        if number is not None and number < least:
            return f"{flag} must be at least {least} (got {number:g})"
    if (args.fallback_model is None) != (args.fallback_sha256 is None):
        return "--fallback-model and --fallback-sha256 go together: the fallback is served only if pinned by digest"
    return None


def _check_listen(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (a name that does not resolve, a port in use)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as error:
        return f"--host {host!r} is not an address of this machine: {error}"
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            return f"cannot listen on {host}:{port}: {error.strerror or error}"
    return None


def _check_shadow_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the shadow options (argparse already refuses --shadow-url with --shadow-config)."""
    if args.mirror_percent is not None and not 0 <= args.mirror_percent <= 100:
        return "--mirror-percent must be within 0-100"
    if not args.shadow_url:
        reason = "with --shadow-config the file gives it" if args.shadow_config else "without it nothing is mirrored"
        for flag, value in (
            ("--mirror-percent", args.mirror_percent),
            ("--candidate-revision", args.candidate_revision),
            ("--agreement", args.agreement),
        ):
            if value is not None:
                return f"{flag} goes with --shadow-url; {reason}"
    if not args.shadow_config_interval > 0:
        return "--shadow-config-interval must be more than 0 seconds"
    if args.agreement is not None:
        try:
            _agreement(args.agreement)
        except ShadowConfigError as error:
            return f"--agreement: {error}"
    return _check_shadow_url(args) if args.shadow_url else None


def _check_shadow_url(args: argparse.Namespace) -> str | None:
    try:
        check_candidate_url(args.shadow_url)
    except ShadowConfigError as error:
        return f"--shadow-url: {error}"
    if _is_this_server(args.shadow_url, args.host, args.port):
        return f"--shadow-url {args.shadow_url} is this server: it would mirror every request to itself"
    return None


_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "::"}  # noqa: S104 - names compared, not bound


def _is_this_server(url: str, host: str, port: int) -> bool:
    parts = urlsplit(url)
    target_port = parts.port or (443 if parts.scheme == "https" else 80)
    listening = {host} | (_LOCAL_HOSTS if host in _LOCAL_HOSTS else set())
    return target_port == port and (parts.hostname or "") in listening


def _agreement(text: str | None) -> Tolerances:
    if text is None:
        return parse_agreement(None)
    try:
        value = json.loads(text, parse_constant=_refuse, object_pairs_hook=unique_keys)
    except ValueError as error:
        raise ShadowConfigError(f"not valid JSON: {error}") from error
    return parse_agreement(value)


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _one_line(error: Exception) -> str:
    """An error's message on one line (engine libraries put newlines and their own tracebacks in theirs)."""
    return " ".join(str(error).split())


def _graceful_server() -> Any:
    """uvicorn's server, except that a drained stop on SIGTERM exits 0 instead of re-raising the signal."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    return GracefulServer


def _energy_meter() -> Meter | Unavailable:
    """This node's energy sensor (see edgemodel_runtime.power), or why there is none, said once on stderr."""
    found = power.detect()
    if isinstance(found, Unavailable):
        print(f"edgemodel serve: energy per inference not available: {found.reason}", file=sys.stderr)
    return found


def serve_command(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    problem = _check_server_arguments(args) or _check_shadow_arguments(args) or _check_listen(args.host, args.port)
    if problem:
        print(f"edgemodel serve: {problem}", file=sys.stderr)
        return 2
    cache = Path(os.environ.get("EDGEMODEL_ARTIFACT_CACHE", Path(tempfile.gettempdir()) / "edgemodel-artifacts"))
    fallback = FallbackSource(args.fallback_model, args.fallback_sha256) if args.fallback_model else None
    try:
        artifact, model, fell_back = load_engine(args.artifact, cache, args.threads, fallback)
    except ArtifactError as error:
        print(f"edgemodel serve: {error.reason}: {_one_line(error)}", file=sys.stderr)
        return error.exit_code
    except Exception as error:  # a bug: still one line and a documented exit code, never a traceback
        print(
            f"edgemodel serve: InternalError: {type(error).__name__}: {_one_line(error)}; this is a bug in "
            "edgemodel serve, please report it together with the artifact",
            file=sys.stderr,
        )
        return INFRASTRUCTURE
    if args.agreement is not None:
        problem = unknown_outputs(_agreement(args.agreement), [output.name for output in model.outputs])
        if problem:
            print(f"edgemodel serve: --agreement: {problem}", file=sys.stderr)
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
        revision=args.revision or (artifact.revision if artifact else None) or "1",
        max_body_bytes=args.max_body_bytes,
        shadow=shadow,
        shadow_file=shadow_file,
        fallback=fell_back,
        drift_reference=artifact.report.get("drift") if artifact else None,
        drift_window=args.drift_window,
        energy=_energy_meter(),
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
    if fell_back is not None:
        print(
            f"edgemodel serve: EngineFallback: the engine cannot be loaded ({fell_back.reason}: {fell_back.message}); "
            f"serving the original model sha256:{fell_back.model_sha256} on ONNX Runtime FP32 (CPU) instead",
            file=sys.stderr,
        )
    source = f"the fallback for {args.artifact}" if fell_back is not None or artifact is None else str(artifact.path)
    print(f"serving {args.name} ({config.revision}) from {source} on http://{args.host}:{args.port}", file=sys.stderr)
    server.run()
    return 0 if server.started else 1
