"""The host side of a real node: its cgroups, network namespaces, iptables chains, mounts and shims.

Functions of tests/testbed/node.py that touch this machine rather than the cluster; each names
exactly what it touches (a cgroup root, a bridge, a socket), so that two nodes of one machine never
touch each other's.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from tests.testbed.node import NodeSpec

CGROUP = Path("/sys/fs/cgroup")
KUBELET_CHAINS = ("KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT", "KUBE-FIREWALL")


def network_teardown(state: dict[str, Any], spec: NodeSpec, kubelet_chains: bool = True) -> None:
    """The pods' network namespaces, kube-proxy's and the kubelet's iptables chains, the bridge, the sysctls."""
    for name in netns():  # the pods' sandboxes: containerd names them cni-<uuid>
        if name.startswith("cni-") and not netns_in_use(name):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
    kube_proxy = state.get("binaries", {}).get(spec.process("kube-proxy"))
    if kube_proxy and Path(kube_proxy).exists():
        subprocess.run([kube_proxy, "--cleanup"], capture_output=True, check=False)
    for table in ("filter", "nat", "mangle") if kubelet_chains else ():  # the kubelet's chains, with their jumps
        for chain in KUBELET_CHAINS:
            for parent in ("INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"):
                while iptables("-t", table, "-D", parent, "-j", chain):
                    pass
            iptables("-t", table, "-F", chain)
            iptables("-t", table, "-X", chain)
    subprocess.run(["ip", "link", "delete", spec.bridge], capture_output=True, check=False)
    for path, value in (state[spec.state_key].get("sysctls") or {}).items():
        if value is not None:
            Path(path).write_text(value)


def write_kubeconfig(path: Path, port: int, ca: Path, cert: Path, key: Path) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "testbed", "cluster": {"server": f"https://127.0.0.1:{port}", "certificate-authority": str(ca)}}
        ],
        "users": [{"name": "node", "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "node", "context": {"cluster": "testbed", "user": "node"}}],
        "current-context": "node",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)


def iptables(*args: str) -> bool:
    return subprocess.run(["iptables", *args], capture_output=True, check=False).returncode == 0


def read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def netns_in_use(name: str) -> bool:
    """Whether a process still lives in the network namespace /run/netns/<name>."""
    try:
        target = os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return False
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.stat(entry / "ns" / "net").st_ino == target:
                    return True
            except OSError:
                continue
    return False


def netns() -> set[str]:
    directory = Path("/run/netns")
    return {p.name for p in directory.iterdir()} if directory.exists() else set()


def cgroup_v2() -> bool:
    return (CGROUP / "cgroup.controllers").exists()


def cgroup_dirs(root: str) -> list[Path]:
    """The node's cgroup root: one directory on cgroup v2, one per hierarchy on v1."""
    if cgroup_v2():
        found = [CGROUP / root.lstrip("/")]
    else:
        found = [p / root.lstrip("/") for p in CGROUP.iterdir() if p.is_dir()] if CGROUP.exists() else []
    return [path for path in found if path.is_dir()]


def make_cgroups(root: str) -> None:
    """The kubelet's cgroup root (it must exist): on v2 one directory with the controllers pods need
    delegated to it; on v1 one per hierarchy, where cpuset needs its CPUs and memory nodes."""
    base = CGROUP
    if cgroup_v2():
        available = set((base / "cgroup.controllers").read_text().split())
        wanted = [c for c in ("cpuset", "cpu", "io", "memory", "hugetlb", "pids") if c in available]
        (base / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))
        (base / root.lstrip("/")).mkdir(exist_ok=True)
        return
    for subsystem in sorted(p for p in base.iterdir() if p.is_dir() and p.name != "unified"):
        path = subsystem / root.lstrip("/")
        path.mkdir(exist_ok=True)
        for name in ("cpuset.cpus", "cpuset.mems"):
            if (path / name).exists() and not (path / name).read_text().strip():
                (path / name).write_text((subsystem / name).read_text())


def kill_cgroup(root: str) -> None:
    """SIGKILL every process in the node's cgroups (pods' containers and sandboxes), until none is left."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pids = {
            int(pid)
            for directory in cgroup_dirs(root)
            for procs in directory.rglob("cgroup.procs")
            for pid in procs.read_text().split()
        }
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        time.sleep(0.2)


def remove_cgroups(root: str) -> None:
    for directory in cgroup_dirs(root):
        for child in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                child.rmdir()
        with contextlib.suppress(OSError):
            directory.rmdir()


def kill_shims(socket: str) -> None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if command and command[0].endswith(b"containerd-shim-runc-v2") and socket.encode() in command:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), 9)


def mounts_under(directories: tuple[Path, ...]) -> list[str]:
    """Mount points below any of `directories`, deepest first."""
    prefixes = tuple(f"{d}/" for d in directories)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefixes):
            points.append(point)
    return sorted(points, key=lambda p: -p.count("/"))
