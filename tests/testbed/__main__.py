"""`python -m tests.testbed build|up|down|demo|story`: the test bed for a person at a terminal.

`up` starts the control plane and the simulated nodes in the background (and, with `--real-node`,
this machine as a real node) and prints the KUBECONFIG line to use; `down` stops them by PID, and
also every test bed whose directory is gone (tests/testbed/orphans.py);
`demo` brings it up, installs the CRD and applies examples/, then shows what the cluster holds;
`story` is `make demo`: the operator on a real node (see tests/testbed/story.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.testbed import binaries, orphans, story
from tests.testbed.cluster import Testbed, TestbedError
from tests.testbed.images import ImageBuildError
from tests.testbed.node import NodeUnavailableError, RealNode
from tests.testbed.node_arm64 import Arm64Node

ROOT = Path(__file__).resolve().parents[2]


def up(bed: Testbed, real_node: bool = False, arm64_node: bool = False) -> int:
    """Start the test bed and, if asked, its real nodes (`arm64_node`: the amd64 one and the arm64 one).

    A start that is refused or fails leaves nothing it started running.
    """
    nodes: list[RealNode] = [RealNode(bed)] if real_node or arm64_node else []
    nodes += [Arm64Node(bed)] if arm64_node else []
    for node in nodes:
        if not node.running():
            node.check()  # refused before anything starts
    started_here = not bed.running()
    if started_here:
        seconds = bed.start()
        print(f"test bed ready in {seconds:.1f}s (logs in {bed.logs})", file=sys.stderr)
    else:
        print(f"test bed already running from {bed.directory}", file=sys.stderr)
    started: list[RealNode] = []
    try:
        for node in nodes:
            if not node.running():
                timings = node.start()
                started.append(node)
                print(f"{node.what} {node.spec.name} ready in {timings['total']:.1f}s", file=sys.stderr)
    except BaseException:
        for node in reversed(started):
            node.teardown()
        if started_here:
            bed.stop()
        raise
    print(bed.kubectl("get", "nodes", "-o", "wide", "-L", "kubernetes.io/arch,node.kubernetes.io/instance-type").stdout)
    print(f"export KUBECONFIG={bed.kubeconfig.resolve()}")
    print(f"export PATH={Path(bed.state()['binaries']['kubectl']).parent}:$PATH")
    return 0


INVALID = """apiVersion: edgeml.dev/v1alpha1
kind: EdgeModel
metadata: {name: sneaky}
spec:
  model: {uri: "file:///etc/shadow", sha256: "not-a-digest"}
  rollout: {shadow: {mirrorPercent: 150}}
"""


def _show(bed: Testbed, title: str, *args: str, stdin: str | None = None) -> None:
    print(f"\n$ kubectl {' '.join(args)}    # {title}")
    if stdin:
        print(stdin.rstrip())
    result = bed.kubectl(*args, input=stdin, check=False)
    print((result.stdout + result.stderr).rstrip())


def _demo(bed: Testbed) -> int:
    up(bed)
    _show(bed, "install the EdgeModel CRD", "apply", "--server-side", "-f", str(ROOT / "crds" / "edgemodel.yaml"))
    bed.kubectl("wait", "--for=condition=Established", "crd/edgemodels.edgeml.dev", "--timeout=60s")
    time.sleep(1)  # discovery refresh
    _show(bed, "apply the examples", "apply", "-f", str(ROOT / "examples"))
    _show(bed, "an invalid EdgeModel is refused at apply time", "apply", "-f", "-", stdin=INVALID)
    _show(bed, "the stored objects (no operator runs yet, so status is empty)", "get", "edgemodels")
    _show(
        bed,
        "the simulated edge nodes and their hardware labels",
        "get",
        "nodes",
        "-L",
        "kubernetes.io/arch,nvidia.com/gpu.product,nvidia.com/gpu.compute.major,feature.node.kubernetes.io/cpu-cpuid.AVX512VNNI",
    )
    _show(bed, "field documentation from the CRD", "explain", "edgemodel.spec.rollout")
    print(
        f"\nThe test bed keeps running: export KUBECONFIG={bed.kubeconfig.resolve()}; stop it with `make testbed-down`."
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.testbed", description=__doc__)
    parser.add_argument("command", choices=["build", "up", "down", "demo", "story"])
    parser.add_argument("--real-node", action="store_true", help="`up`: also start this machine as a real node")
    parser.add_argument(
        "--arm64-node",
        action="store_true",
        help="`up`, `story`: the real node and an arm64 node beside it, under emulation",
    )
    parser.add_argument("--dir", type=Path, default=ROOT / ".testbed", help="state directory (default .testbed)")
    args = parser.parse_args(argv)
    bed = Testbed(args.dir.resolve())
    try:
        if args.command == "build":
            for name, path in binaries.ensure_all().items():
                print(f"{name}: {path}")
            print(f"kubelet, kube-proxy: {binaries.ensure(binaries.NODE)}")
            return 0
        if args.command == "up":
            return up(bed, args.real_node, args.arm64_node)
        if args.command == "story":
            return story.main(bed.directory, args.arm64_node)
        if args.command == "down":
            if bed.state():
                bed.stop()
                print(f"test bed stopped (data and logs kept in {bed.directory})", file=sys.stderr)
            for directory in orphans.stop_all(lambda line: print(line, file=sys.stderr)):
                print(f"test bed stopped (its directory {directory} was gone)", file=sys.stderr)
            return 0
        return _demo(bed)
    except (TestbedError, NodeUnavailableError, ImageBuildError, TimeoutError) as error:
        print(f"testbed: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
