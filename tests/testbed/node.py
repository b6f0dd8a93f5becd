"""One real node beside the simulated ones: kubelet, kube-proxy, containerd, runc and CNI on this machine.

The hardware class this machine really has runs for real; the classes it lacks stay simulated by KWOK.

- kubelet and kube-proxy come from the control plane's pinned Kubernetes release (`binaries.NODE`);
  containerd, runc, the CNI plugins and iptables from Debian.
- Images come from no registry: `images.ensure_images` builds a Debian base with debootstrap, the
  project's own Dockerfiles with buildah, and a pause image, and the node imports their OCI archives.
- Pods get addresses from the CNI bridge plugin on a bridge of their own (`POD_CIDR`), whose
  gateway is also the node's address; kube-proxy (iptables mode) routes Service cluster IPs to them.
- The node is labelled as Node Feature Discovery would label it, from this CPU's flags, and
  tainted `edgeml.dev/real-node=true:NoSchedule`, so only workloads that ask for it land there.
- cgroups: on a cgroup v1 host (such as this build machine, whose layout is hybrid) kubelet 1.35+
  runs only with `failCgroupV1: false`; on a cgroup v2 host the node's cgroup root is one directory.

containerd's root (its images and snapshots) is kept under the cache directory, so a second start
imports nothing and takes seconds; everything else lives in the test bed's directory and its run
directory (`Testbed.run_dir`). The node's lock (`node_lock()`) names the test bed that holds it, so a
start that is refused says which command stops that test bed, even one whose directory is gone.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edgemodel_runtime.packaged import cache_root
from tests.testbed import binaries
from tests.testbed.cluster import Testbed, _alive, _free_port, _ours, _terminate
from tests.testbed.cluster import _log as _testbed_log
from tests.testbed.hostparts import (
    kill_cgroup,
    kill_shims,
    make_cgroups,
    mounts_under,
    network_teardown,
    read,
    remove_cgroups,
    write_kubeconfig,
)
from tests.testbed.pki import write_client_cert

NODE_NAME = "edge-real-0"
BRIDGE = "emnode0"
POD_CIDR = "10.88.0.0/24"
NODE_IP = "10.88.0.1"  # the bridge's address: the node's address and the pods' gateway
TAINT = {"key": "edgeml.dev/real-node", "value": "true", "effect": "NoSchedule"}
TOLERATION = {"key": "edgeml.dev/real-node", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
LABEL = "edgeml.dev/real-node"
CGROUP_ROOT = "/edgemodel-testbed"
CNI_BIN = Path("/usr/lib/cni")
SYSCTLS = {"/proc/sys/net/ipv4/ip_forward": "1", "/proc/sys/net/bridge/bridge-nf-call-iptables": "1"}
COMMANDS = ("containerd", "runc", "ctr", "iptables")
PAUSE = "registry.k8s.io/pause:3.10"

# /proc/cpuinfo flags -> Node Feature Discovery's cpuid label names (the ones that change kernels, and a few more).
CPUID_NAMES = {
    "avx": "AVX",
    "avx2": "AVX2",
    "fma": "FMA3",
    "f16c": "F16C",
    "avx_vnni": "AVXVNNI",
    "avx512f": "AVX512F",
    "avx512bw": "AVX512BW",
    "avx512vl": "AVX512VL",
    "avx512_vnni": "AVX512VNNI",
    "avx512_bf16": "AVX512BF16",
    "amx_int8": "AMXINT8",
    "amx_bf16": "AMXBF16",
    "asimd": "ASIMD",
    "asimdhp": "ASIMDHP",
    "asimddp": "ASIMDDP",
    "sve": "SVE",
    "i8mm": "I8MM",
}
ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}


@dataclass(frozen=True)
class NodeSpec:
    """What makes one real node of this machine distinct from another: its name, pod network, cgroup
    root, and the suffix of its processes' names, of its state key, directories and lock."""

    name: str
    arch: str
    bridge: str
    pod_cidr: str
    node_ip: str
    cgroup_root: str
    suffix: str = ""

    @property
    def state_key(self) -> str:
        return f"node{self.suffix}"

    def process(self, command: str) -> str:
        """The name a command of this node has among the test bed's PIDs: `kubelet`, `kubelet-arm64`."""
        return f"{command}{self.suffix}"


AMD64 = NodeSpec(NODE_NAME, "amd64", BRIDGE, POD_CIDR, NODE_IP, CGROUP_ROOT)


class NodeUnavailableError(RuntimeError):
    """The real node cannot run here; the message names the missing part or the failing command and its error."""


def lock_directory() -> Path:
    """Where the real nodes' locks live (one file per node of this machine)."""
    return cache_root() / "node"


def node_lock(spec: NodeSpec | None = None) -> Path:
    """A real node's lock (the amd64 node's by default): held by its containerd for as long as it runs."""
    return lock_directory() / f"containerd{(spec or AMD64).suffix}.lock"


def lock_owner(text: str) -> Path | None:
    """The state directory of the test bed a lock file's text names (None if it names none)."""
    try:
        owner = json.loads(text).get("testbed") if text.strip().startswith("{") else None
    except json.JSONDecodeError:
        owner = None
    if owner is None and text.startswith("the test bed in "):  # written by older versions
        owner = text.removeprefix("the test bed in ").strip()
    return Path(owner) if owner else None


def refusal(what: str, owner: Path | None) -> str:
    """The message that refuses to start a node another test bed runs, with the command that stops it (pure)."""
    if owner is None:
        return f"another test bed runs {what} on this machine; stop it with `make testbed-down`"
    if not (owner / "state.json").exists():
        return (f"the test bed in {owner} runs {what} on this machine and its directory is gone; "
                "stop it with `make testbed-down` (python -m tests.testbed down)")  # fmt: skip
    command = f"python -m tests.testbed down --dir {owner}"
    return f"the test bed in {owner} runs {what} on this machine; stop it with `{command}`"


def image_conflicts(state: Mapping[str, Any], state_key: str, names: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """The images (by Dockerfile name) that another node of the test bed runs under another name than `names`
    gives them, with (its name, this node's name) (pure). Names carry the key of the sources they were built
    from, so a conflict means the sources changed between the two nodes' starts: the operator's one image
    name would then be missing from one node."""
    conflicts: dict[str, tuple[str, str]] = {}
    for key, node in state.items():
        if not key.startswith("node") or key == state_key or not isinstance(node, Mapping):
            continue
        for name, theirs in (node.get("images") or {}).items():
            if name in names and names[name] != theirs:
                conflicts[name] = (theirs, names[name])
    return conflicts


def cpu_labels(cpuinfo: str, machine: str) -> dict[str, str]:
    """The labels Node Feature Discovery would put on a node with this /proc/cpuinfo (pure)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in {"flags", "Features"}:
            flags |= set(value.split())
    labels = {
        f"feature.node.kubernetes.io/cpu-cpuid.{name}": "true" for flag, name in CPUID_NAMES.items() if flag in flags
    }
    labels["kubernetes.io/arch"] = ARCHES.get(machine, machine)
    return labels


def _log(message: str) -> None:
    _testbed_log(f"real node: {message}")


def _run(*command: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise NodeUnavailableError(f"`{' '.join(command)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def preflight() -> None:
    """Raise NodeUnavailableError naming what this machine lacks for a real node."""
    if os.geteuid() != 0:
        raise NodeUnavailableError(
            "a real node needs root (kubelet, containerd and CNI manage cgroups, mounts and links)"
        )
    missing = [command for command in COMMANDS if shutil.which(command) is None]
    missing += [str(CNI_BIN / p) for p in ("bridge", "host-local", "loopback") if not (CNI_BIN / p).exists()]
    if missing:
        raise NodeUnavailableError(
            f"missing {', '.join(missing)} (apt-get install containerd runc containernetworking-plugins iptables)"
        )


def registry_hosts(bed: Testbed) -> Path:
    """Where the test bed's real nodes' containerd reads its registry hosts (`<host:port>/hosts.toml`) at each pull."""
    return bed.directory / "certs.d"


def trust_registry(bed: Testbed, address: str) -> None:
    """Let the kubelets of the test bed's real nodes pull images from the plain-HTTP registry at `address`
    (host:port), as their pods do: the engines, which are images too (operator/edgemodel_operator/enginecache.py)."""
    directory = registry_hosts(bed) / address
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts.toml").write_text(
        f'server = "http://{address}"\n\n[host."http://{address}"]\n  capabilities = ["pull", "resolve"]\n'
    )


CRI_NOT_READY = "server is not initialized yet"  # the kubelet's exit message while containerd's CRI loads


class RealNode:
    """The real node of one test bed: its files, processes and teardown (the amd64 node; see node_arm64.py)."""

    spec = AMD64
    sysctls: Mapping[str, str] = SYSCTLS
    what = "the real node"
    commands: tuple[str, ...] = ("containerd", "kubelet", "kube-proxy")
    containerd_timeout: float = 60  # seconds until containerd answers
    ready_timeout: float = 120  # seconds from the kubelet's start until the node is Ready
    kubelet_settle: float = 2  # seconds within which a kubelet that meets an uninitialized CRI service exits

    def __init__(self, bed: Testbed) -> None:
        self.bed = bed
        self.directory = bed.directory / self.spec.state_key
        self.run_dir = bed.run_dir / self.spec.state_key  # its sockets and containerd's state
        self.containerd_root = cache_root() / self.spec.state_key / "containerd"
        self.lock_path = node_lock(self.spec)

    def _binaries(self) -> dict[str, str]:
        """containerd, kubelet and kube-proxy, built (kubelet, kube-proxy) where missing."""
        paths = binaries.ensure(binaries.NODE)
        containerd = shutil.which("containerd")
        if containerd is None:
            raise NodeUnavailableError("containerd is not installed (apt-get install containerd)")
        return {"containerd": containerd, "kubelet": str(paths / "kubelet"), "kube-proxy": str(paths / "kube-proxy")}

    def _images(self, log: Callable[[str], None]) -> Mapping[str, Any]:
        from tests.testbed import images

        return images.ensure_images(log)

    def _runtime_options(self) -> str:
        """Extra TOML lines for containerd's runc runtime section (none here)."""
        return ""

    def _extra_config(self) -> str:
        """Extra TOML tables for containerd's configuration, appended to it (none here)."""
        return ""

    def _import_flags(self) -> tuple[str, ...]:
        """Extra flags of `ctr images import` (none here: containerd's own platform)."""
        return ()

    def _labels(self) -> dict[str, str]:
        """The node's labels besides those the kubelet sets itself."""
        labels = cpu_labels(Path("/proc/cpuinfo").read_text(), platform.machine()) | {LABEL: "true"}
        labels.pop("kubernetes.io/arch")  # the kubelet sets it itself
        return labels

    @property
    def socket(self) -> Path:
        return self.run_dir / "containerd.sock"

    @property
    def hosts_dir(self) -> Path:
        """containerd's registry host configuration (see `trust_registry`), shared by the test bed's nodes."""
        return registry_hosts(self.bed)

    def ctr(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return _run("ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args, check=check, timeout=timeout)

    # ------------------------------------------------------------------ start

    def check(self) -> None:
        """Raise NodeUnavailableError if the node cannot start here: a missing part, or another test bed's
        node holding the lock (the message names the command that stops it). Starts nothing."""
        preflight()
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock_path.open("a+") as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                probe.seek(0)
                owner = lock_owner(probe.read())
                if owner != self.bed.directory:
                    raise NodeUnavailableError(refusal(self.what, owner)) from None

    def start(self, log: Callable[[str], None] = _log) -> dict[str, float]:
        """Start containerd, kubelet and kube-proxy and wait for the node to be Ready; returns seconds per step.

        A start that fails leaves nothing of the node running (the control plane is the caller's).
        """
        self.check()
        timings: dict[str, float] = {}
        started = time.monotonic()
        paths = self._binaries()
        timings["binaries"] = time.monotonic() - started
        mark = time.monotonic()
        built = self._images(log)
        timings["images"] = time.monotonic() - mark
        names = {name: image.name for name, image in built.items()}
        if conflicts := image_conflicts(self.bed.state(), self.spec.state_key, names):
            listed = "; ".join(f"{name}: {theirs}, here {ours}" for name, (theirs, ours) in sorted(conflicts.items()))
            raise NodeUnavailableError(
                f"{self.what} would run other images than the test bed's other node ({listed}): the sources "
                f"changed since that node started; stop the test bed (python -m tests.testbed down --dir "
                f"{self.bed.directory}) and start it again"
            )
        self._lock()  # before anything host-wide is touched
        try:
            return self._start(paths, built, timings, started, log)
        except BaseException:
            self._lock_file.close()
            self.teardown()
            raise

    def _start(
        self, paths: dict[str, str], built: Mapping[str, Any], timings: dict[str, float], started: float,
        log: Callable[[str], None],
    ) -> dict[str, float]:  # fmt: skip
        self.teardown()  # whatever a run of this test bed that died left behind
        state = self.bed.state()
        state["binaries"] |= {self.spec.process(command): path for command, path in paths.items()}
        sysctls = {path: read(path) for path in self.sysctls}  # restored by teardown
        state[self.spec.state_key] = {"name": self.spec.name, "arch": self.spec.arch, "run_dir": str(self.run_dir),
                                      "sysctls": sysctls, "images": {n: i.name for n, i in built.items()}}  # fmt: skip
        state["images"] = state.get("images", {}) | {name: image.name for name, image in built.items()}
        self.bed._save(state)
        for directory in (self.directory, self.run_dir, self.containerd_root):
            directory.mkdir(parents=True, exist_ok=True)
        mark = time.monotonic()
        self._network()
        self._start_containerd(state)
        timings["containerd"] = time.monotonic() - mark
        mark = time.monotonic()
        self._import(built, log)
        timings["import"] = time.monotonic() - mark
        mark = time.monotonic()
        self._start_kubelet(state, Path(paths["kubelet"]))
        if "kube-proxy" in paths:
            self._start_kube_proxy(state, Path(paths["kube-proxy"]))
        self.bed._wait(self.spec.process("kubelet"), self._ready, self.ready_timeout)
        timings["kubelet"] = time.monotonic() - mark
        timings["total"] = time.monotonic() - started
        log("Ready in " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
        return timings

    def _network(self) -> None:
        for path, value in self.sysctls.items():
            try:
                Path(path).write_text(value)
            except OSError as error:
                hint = " (modprobe br_netfilter)" if "bridge" in path else ""
                raise NodeUnavailableError(f"cannot write {value} to {path}{hint}: {error}") from error
        shutil.rmtree(self.directory / "cni" / "ipam", ignore_errors=True)  # no addresses held by pods long gone
        # The bridge exists before the first pod, so the node's address (its gateway) is there from the start.
        bridge = self.spec.bridge
        if _run("ip", "link", "show", bridge, check=False).returncode != 0:
            _run("ip", "link", "add", bridge, "type", "bridge")
        _run("ip", "addr", "replace", f"{self.spec.node_ip}/24", "dev", bridge)
        _run("ip", "link", "set", bridge, "up")
        net = self.directory / "cni" / "net.d"
        net.mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "1.0.0",
            "name": "edgemodel-testbed",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": True,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.spec.pod_cidr, "gateway": self.spec.node_ip}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.directory / "cni" / "ipam"),
                    },
                },
            ],
        }
        (net / "10-edgemodel.conflist").write_text(json.dumps(conflist, indent=2))

    def _lock(self) -> None:
        """One real node per machine: it owns a bridge, a cgroup root and containerd's store.

        The lock is passed on to containerd, so it is held exactly as long as that containerd runs.
        """
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = self.lock_path.open("a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            owner = lock_owner(self._lock_file.read())
            self._lock_file.close()
            raise NodeUnavailableError(refusal(self.what, owner)) from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(json.dumps({"testbed": str(self.bed.directory), "run_dir": str(self.run_dir)}) + "\n")
        self._lock_file.flush()

    def _start_containerd(self, state: dict[str, Any]) -> None:
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = "{self.containerd_root}"
state = "{self.run_dir / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.socket}"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.directory / "opt"}"
[{cri}]
  sandbox_image = "{PAUSE}"
  enable_selinux = false
  restrict_oom_score_adj = true
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
  discard_unpacked_layers = false
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
{self._runtime_options()}[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
[{cri}.registry]
  config_path = "{self.hosts_dir}"
[{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{self.directory / "cni" / "net.d"}"
  max_conf_num = 1
{self._extra_config()}"""
        path = self.directory / "containerd.toml"
        path.write_text(config)
        name = self.spec.process("containerd")
        command = [state["binaries"][name], "--config", str(path)]
        self.bed._spawn(state, name, command, pass_fds=[self._lock_file.fileno()])
        self._lock_file.close()  # containerd holds the lock from here on
        self.bed._wait(name, lambda: self.ctr("version", check=False).returncode == 0, self.containerd_timeout)

    def _import(self, built: Mapping[str, Any], log: Callable[[str], None]) -> None:
        # Containers of an earlier run (killed, never removed) and images no Dockerfile makes any more.
        for container in self.ctr("containers", "ls", "--quiet").stdout.split():
            self.ctr("tasks", "delete", "--force", container, check=False)
            self.ctr("containers", "delete", container, check=False)
        wanted = {image.name for image in built.values()}
        present = set(self.ctr("images", "ls", "--quiet").stdout.split())
        stale = sorted(name for name in present - wanted if name.startswith("localhost/edgemodel/"))
        if stale:
            self.ctr("images", "rm", *stale, check=False)
        # Which build each name was imported from, where the name does not say (the pause image keeps the
        # name the kubelet expects; the arm64 images carry the amd64 images' names).
        record = self.containerd_root / "imported.json"
        imported: dict[str, str] = json.loads(record.read_text()) if record.exists() else {}
        for image in built.values():
            current = image.key in image.name or imported.get(image.name) == image.key
            if current and image.name in present:
                continue
            log(f"importing {image.name} ({image.archive.stat().st_size / 1e6:.0f} MB) into containerd ...")
            mark = time.monotonic()
            # --no-unpack would leave the first pod to unpack; unpacking here keeps pod starts quick.
            self.ctr("images", "import", "--snapshotter", "overlayfs", *self._import_flags(), str(image.archive))
            imported[image.name] = image.key
            record.write_text(json.dumps(imported, indent=2))
            log(f"imported {image.name} in {time.monotonic() - mark:.1f}s")
        missing = {image.name for image in built.values()} - set(self.ctr("images", "ls", "--quiet").stdout.split())
        if missing:
            raise NodeUnavailableError(f"containerd does not list {sorted(missing)} after importing them")

    def _start_kubelet(self, state: dict[str, Any], kubelet: Path) -> None:
        spec = self.spec
        make_cgroups(spec.cgroup_root)
        pki = self.bed.pki
        cert, key = write_client_cert(pki, f"kubelet{spec.suffix}", f"system:node:{spec.name}", "system:nodes")
        kubeconfig = self.directory / "kubelet.kubeconfig"
        write_kubeconfig(kubeconfig, state["ports"]["apiserver"], pki.ca_cert, cert, key)
        resolv = self.directory / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\noptions ndots:1\n")  # pods resolve nothing: no cluster DNS here
        ports = state.setdefault("ports", {})
        port, healthz = spec.process("kubelet"), spec.process("kubelet-healthz")
        ports[port], ports[healthz] = _free_port(), _free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # On a cgroup v1 host (a hybrid layout, as on this build machine) kubelet 1.35+ runs only if told.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": spec.cgroup_root,
            "address": spec.node_ip,
            "port": ports[port],
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": ports[healthz],
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki.ca_cert)},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "registerWithTaints": [TAINT],
            "failSwapOn": False,
            "resolvConf": str(resolv),
            "podCIDR": spec.pod_cidr,
            "maxPods": 40,
            "serializeImagePulls": False,
            # A shared build machine's disk: evict only when it is really full.
            "evictionHard": {"memory.available": "200Mi", "nodefs.available": "2%", "imagefs.available": "2%"},
            "imageGCHighThresholdPercent": 99,
            "imageGCLowThresholdPercent": 98,
            "enableServer": True,
            "syncFrequency": "5s",
            "fileCheckFrequency": "5s",
            "nodeStatusUpdateFrequency": "5s",
        }
        path = self.directory / "kubelet.yaml"
        path.write_text(yaml.safe_dump(config))
        labels = self._labels()
        args = [str(kubelet), f"--config={path}", f"--kubeconfig={kubeconfig}", f"--hostname-override={spec.name}",
                f"--node-ip={spec.node_ip}", f"--root-dir={self.directory / 'kubelet'}",
                f"--cert-dir={self.directory / 'kubelet-pki'}",
                "--node-labels=" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())), "--v=2"]  # fmt: skip
        self._spawn_kubelet(state, args)

    def _spawn_kubelet(self, state: dict[str, Any], args: list[str]) -> None:
        """Start the kubelet; started again while it exits at once because containerd's CRI service, which
        answers only once it has loaded its state (slower with many images), is not up yet (`ctr version`,
        what _start_containerd waits for, answers before it)."""
        name = self.spec.process("kubelet")
        deadline = time.monotonic() + self.containerd_timeout
        while True:
            self.bed._spawn(state, name, args)
            pid = self.bed.state()["pids"][name]
            settled = time.monotonic() + self.kubelet_settle
            while time.monotonic() < settled and _alive(pid):
                time.sleep(0.2)
            early = not _alive(pid) and CRI_NOT_READY in self.bed.log_tail(name, 5)
            if not early or time.monotonic() > deadline:
                return  # running, or gone for another reason: the node's Ready wait reports it
            time.sleep(1)

    def _start_kube_proxy(self, state: dict[str, Any], kube_proxy: Path) -> None:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.bed.kubeconfig)},
            "mode": "iptables",
            "hostnameOverride": NODE_NAME,
            "clusterCIDR": POD_CIDR,
            "bindAddress": NODE_IP,
            "nodePortAddresses": ["primary"],
            "healthzBindAddress": f"127.0.0.1:{_free_port()}",
            "metricsBindAddress": f"127.0.0.1:{_free_port()}",
            # Zero leaves the host's conntrack sysctls as they are (no module parameters to set here).
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        }
        path = self.directory / "kube-proxy.yaml"
        path.write_text(yaml.safe_dump(config))
        self.bed._spawn(state, "kube-proxy", [str(kube_proxy), f"--config={path}", "--v=2"])

    def running(self) -> bool:
        """Whether this test bed's node runs: its containerd, kubelet and kube-proxy are alive."""
        state = self.bed.state()
        pids, binaries_ = state.get("pids", {}), state.get("binaries", {})
        names = [self.spec.process(c) for c in self.commands]
        return self.spec.state_key in state and all(n in pids and _ours(pids[n], binaries_[n]) for n in names)

    def _ready(self) -> bool:
        result = self.bed.kubectl("get", "node", self.spec.name, "-o", "json", check=False)
        if result.returncode != 0:
            return False
        conditions = json.loads(result.stdout)["status"].get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    # ------------------------------------------------------------------ stop

    def teardown(self) -> None:
        """Stop the node's processes and remove every container, mount, network namespace and rule it made."""
        state = self.bed.state()
        pids: dict[str, int] = state.get("pids", {})
        spec = self.spec
        for name in (spec.process("kube-proxy"), spec.process("kubelet")):  # nothing may restart a container
            if name in pids and _ours(pids[name], state["binaries"][name]):
                _terminate(pids[name], 15)
        kill_cgroup(spec.cgroup_root)
        containerd = spec.process("containerd")
        if containerd in pids and _ours(pids[containerd], state["binaries"][containerd]):
            _terminate(pids[containerd], 15)
        kill_shims(str(self.socket))
        for mount in mounts_under((self.run_dir, self.directory, self.containerd_root)):
            subprocess.run(["umount", "--lazy", mount], capture_output=True, check=False)
        remove_cgroups(spec.cgroup_root)
        if spec.state_key in state:
            self._network_teardown(state)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        for command in self.commands:
            pids.pop(spec.process(command), None)
        state.pop(spec.state_key, None)
        if state:
            self.bed._save(state)

    def _network_teardown(self, state: dict[str, Any]) -> None:
        network_teardown(state, self.spec)
