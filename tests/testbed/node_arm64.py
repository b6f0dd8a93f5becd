"""An arm64 real node on this amd64 machine: its own kubelet and containerd, built for arm64, under emulation.

Each part stays the real one, built for arm64 from the pinned releases and run by qemu-user-static
through binfmt_misc (tests/testbed/emulation.py):

- the kubelet (`binaries.NODE_ARM64`, the same release as the amd64 node's) registers the Node and
  reports `kubernetes.io/arch=arm64` itself, from the architecture it was built for;
- containerd (`binaries.CONTAINERD_ARM64`): its CRI plugin takes its own build's platform,
  linux/arm64, so it imports, unpacks and runs the arm64 images (`images.ensure_images(arch="arm64")`,
  the same Dockerfiles built for arm64). It starts the containers through Debian's shim and runc,
  native amd64, and the kernel runs the containers' arm64 programs through binfmt_misc (the F flag
  keeps qemu reachable inside every container);
- the CNI bridge plugin, on a bridge and subnet of its own (`emnode1`, 10.89.0.0/24).

Beside the amd64 node, everything host-wide is distinct: bridge, subnet, node address, ports, cgroup
root, containerd's socket, state and root, and its own lock (`containerd-arm64.lock`). Two things are
shared on purpose:

- Service routing: one network namespace holds one kube-proxy's rules, and a kube-proxy, in either
  mode, removes the other mode's rules when it starts (kube-proxy's platformCleanup), so a second one
  would break the first. The arm64 node runs none: the amd64 node's kube-proxy, of the same test bed,
  routes Services for the pods of both bridges (without it, the arm64 node's pods run, and reach
  each other and the host by address only).
- The sysctls the amd64 node sets (IP forwarding, bridge netfilter), which it restores when it stops.

ONNX Runtime under qemu 7.2 crashes reading the host's x86 /proc/cpuinfo when /sys is mounted: this
node's containerd gives every container a base runtime spec that binds an arm64 /proc/cpuinfo (the
features the emulated CPU really has) over /proc/cpuinfo. It is the node's setup, as lxcfs is on
real nodes; nothing in the images or the operator knows about it.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tests.testbed import binaries
from tests.testbed.emulation import ARM64, cpuinfo_text, emulated_hwcaps, emulation_problem, features
from tests.testbed.hostparts import network_teardown
from tests.testbed.node import LABEL, NodeSpec, NodeUnavailableError, RealNode, cpu_labels

ARM64_NODE = NodeSpec(
    name="edge-arm64-0",
    arch=ARM64,
    bridge="emnode1",
    pod_cidr="10.89.0.0/24",
    node_ip="10.89.0.1",
    cgroup_root="/edgemodel-testbed-arm64",
    suffix="-arm64",
)


class Arm64Node(RealNode):
    """The arm64 node of one test bed: started after the amd64 node (`RealNode`) of the same test bed, whose
    kube-proxy routes Services for both."""

    spec = ARM64_NODE
    sysctls: Mapping[str, str] = {}  # the amd64 node's, set and restored by it
    what = "the arm64 node"
    commands = ("containerd", "kubelet")
    # Emulated Go programs start slowly: containerd's plugins load in ~10-30 s, the kubelet registers in ~1 min.
    containerd_timeout = 240
    kubelet_settle = 10  # the kubelet runs emulated: it reaches its CRI check later
    ready_timeout = 400

    def check(self) -> None:
        """Also raise when arm64 binaries cannot run here (binfmt_misc and qemu-user-static)."""
        if problem := emulation_problem():
            raise NodeUnavailableError(f"the arm64 node runs under emulation: {problem}")
        super().check()

    def start(self, log: Callable[[str], None] = print) -> dict[str, float]:
        """Start containerd and the kubelet for arm64 and wait for the node to be Ready; seconds per step."""
        if not RealNode(self.bed).running():
            log("the amd64 real node of this test bed does not run: Services will not route to or from this "
                "node's pods (its kube-proxy routes them for both nodes)")  # fmt: skip
        return super().start(log)

    def _binaries(self) -> dict[str, str]:
        kubelet = binaries.ensure(binaries.NODE_ARM64) / "kubelet"
        containerd = binaries.ensure(binaries.CONTAINERD_ARM64) / "containerd"
        return {"containerd": str(containerd), "kubelet": str(kubelet)}

    def _images(self, log: Callable[[str], None]) -> Mapping[str, Any]:
        from tests.testbed import images

        return images.ensure_images(log, arch=ARM64, only=("pause", "runtime-cpu"))  # no operator runs on it

    @property
    def cpuinfo(self) -> Path:
        return self.directory / "cpuinfo"

    def _cpuinfo(self) -> str:
        """The arm64 /proc/cpuinfo of this machine's emulated CPU, written once per start."""
        if not self.cpuinfo.exists():
            with tempfile.TemporaryDirectory(prefix=".hwcaps-", dir=self.directory) as scratch:
                try:
                    hwcap, hwcap2 = emulated_hwcaps(Path(scratch))
                except (OSError, RuntimeError) as error:  # no cross compiler, or the program did not run
                    raise NodeUnavailableError(f"cannot read the emulated CPU's features: {error}") from error
            self.cpuinfo.write_text(cpuinfo_text(features(hwcap, hwcap2), os.cpu_count() or 1))
        return self.cpuinfo.read_text()

    def _runtime_options(self) -> str:
        """containerd's base runtime spec for every container: the default spec (`ctr oci spec`) and the
        arm64 /proc/cpuinfo bound over the host's."""
        self._cpuinfo()
        spec = json.loads(self._ctr_plain("oci", "spec"))
        spec["mounts"].append({"destination": "/proc/cpuinfo", "type": "bind", "source": str(self.cpuinfo),
                               "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]})  # fmt: skip
        path = self.directory / "base-runtime-spec.json"
        path.write_text(json.dumps(spec, indent=2))
        return f'  base_runtime_spec = "{path}"\n'

    def _ctr_plain(self, *args: str) -> str:
        import subprocess

        done = subprocess.run(["ctr", *args], capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise NodeUnavailableError(f"`ctr {' '.join(args)}` failed: {done.stderr.strip()}")
        return done.stdout

    def _labels(self) -> dict[str, str]:
        labels = cpu_labels(self._cpuinfo(), "aarch64") | {LABEL: "true", "edgeml.dev/emulated": "qemu-user"}
        labels.pop("kubernetes.io/arch")  # the kubelet sets it itself
        return labels

    def _import_flags(self) -> tuple[str, ...]:
        return ("--platform", f"linux/{ARM64}")

    def _network_teardown(self, state: dict[str, Any]) -> None:
        # The kubelet's iptables chains are shared with the amd64 node's kubelet: removed only when it is gone.
        network_teardown(state, self.spec, kubelet_chains=not held(RealNode(self.bed).lock_path))


def held(lock: Path) -> bool:
    """Whether a process holds the lock file (a node's containerd does while it runs)."""
    if not lock.exists():
        return False
    with lock.open("a+") as probe:
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False
