"""`python -m tests.testbed build|up|down|demo|story`: the test bed for a person at a terminal.

`up` starts the control plane and the simulated nodes in the background (and, with `--real-node`,
this machine as a real node) and prints the KUBECONFIG line to use; `down` stops them by PID;
`demo` brings it up, installs the CRD and applies examples/, then shows what the cluster holds;
`story` is `make demo`: the operator on a real node (see tests/testbed/story.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.testbed import binaries, story
from tests.testbed.cluster import Testbed, TestbedError
from tests.testbed.images import ImageBuildError
from tests.testbed.node import NODE_NAME, NodeUnavailableError, RealNode

ROOT = Path(__file__).resolve().parents[2]


def _up(bed: Testbed, real_node: bool = False) -> int:
    if bed.running():
        print(f"test bed already running from {bed.directory}", file=sys.stderr)
    else:
        seconds = bed.start()
        print(f"test bed ready in {seconds:.1f}s (logs in {bed.logs})", file=sys.stderr)
    if real_node and not RealNode(bed).running():
        timings = RealNode(bed).start()
        print(f"real node {NODE_NAME} ready in {timings['total']:.1f}s", file=sys.stderr)
    print(bed.kubectl("get", "nodes", "-L", "kubernetes.io/arch,node.kubernetes.io/instance-type").stdout)
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
    _up(bed)
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
            return _up(bed, args.real_node)
        if args.command == "story":
            return story.main(bed.directory)
        if args.command == "down":
            bed.stop()
            print(f"test bed stopped (data and logs kept in {bed.directory})", file=sys.stderr)
            return 0
        return _demo(bed)
    except (TestbedError, NodeUnavailableError, ImageBuildError, TimeoutError) as error:
        print(f"testbed: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
