"""Start and stop a real Kubernetes control plane with KWOK-simulated edge nodes.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok run as plain processes
listening on 127.0.0.1 only. Their PIDs, ports, logs and data live in one state directory, so a
test session, or `make testbed` and `make testbed-down` in two different shells, can manage them.

A copy of the state (`testbed.json`) is also kept in the test bed's run directory,
`/run/edgemodel-<hash of the state directory>` (the temporary directory where /run is not
writable), which the real node also uses for its sockets: if the state directory is deleted while
the test bed runs, `python -m tests.testbed down` finds the test bed there and stops it
(tests/testbed/orphans.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.testbed import binaries
from tests.testbed.nodes import default_nodes
from tests.testbed.pki import Pki, write_pki

STAGES = Path(__file__).parent / "kwok-stages.yaml"
SERVICE_CIDR = "10.96.0.0/16"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
RECORD = "testbed.json"  # the copy of the state in the run directory


def run_parent() -> Path:
    """Where run directories live: /run, or the temporary directory where /run is not writable."""
    return Path("/run") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())


class TestbedError(RuntimeError):
    """A component did not start or become ready; the message names it and its log."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _log(message: str) -> None:
    print(f"[testbed] {message}", file=sys.stderr, flush=True)


@dataclass
class Testbed:
    """One control plane and its simulated nodes, described by files under `directory`."""

    __test__ = False  # not a test class, despite the name

    directory: Path
    # Client rate limit of the controller-manager and scheduler; None keeps Kubernetes' defaults.
    # Benchmarks raise it to simulate a control plane sized for thousands of objects.
    client_qps: int | None = None
    # Read and write the state here instead of `directory`: a test bed whose directory is gone is
    # known only by its record in the run directory (tests/testbed/orphans.py).
    state_path: Path | None = None

    @property
    def run_dir(self) -> Path:
        """Short-lived files of this test bed outside its directory: the record of its state, the
        real nodes' sockets (unix socket paths must stay short, hence a hash)."""
        digest = hashlib.sha256(str(self.directory).encode()).hexdigest()[:10]
        return run_parent() / f"edgemodel-{digest}"

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "kubeconfig"

    @property
    def logs(self) -> Path:
        return self.directory / "logs"

    @property
    def pki(self) -> Pki:
        return Pki(self.directory / "pki")

    @property
    def _state_file(self) -> Path:
        return self.state_path or self.directory / "state.json"

    def state(self) -> dict[str, Any]:
        """Ports, PIDs and binary paths of the running test bed ({} when none)."""
        if not self._state_file.exists():
            return {}
        loaded: dict[str, Any] = json.loads(self._state_file.read_text())
        return loaded

    def _save(self, state: dict[str, Any]) -> None:
        """Write the state to the directory and its copy to the run directory (atomically).

        A test bed known only by its record (`state_path`) writes the record while it exists.
        """
        state["directory"] = str(self.directory)
        text = json.dumps(state, indent=2)
        if self.state_path is None:
            self._state_file.write_text(text)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        elif not self.state_path.parent.is_dir():
            return
        partial = self.run_dir / f".{RECORD}.{os.getpid()}"
        partial.write_text(text)
        partial.rename(self.run_dir / RECORD)

    # ---------------------------------------------------------------- start

    def start(self, nodes: Sequence[dict[str, Any]] | None = None) -> float:
        """Build or find the binaries, start every component, register the nodes; returns seconds taken."""
        if self.running():
            raise TestbedError(
                f"a test bed already runs from {self.directory}; stop it first with "
                f"`python -m tests.testbed down --dir {self.directory}`"
            )
        self.stop()  # forget components left over from a run that died
        started = time.monotonic()
        paths = binaries.ensure_all()
        self.directory.mkdir(parents=True, exist_ok=True)
        # Each start is a new cluster: old data would not match the new certificates and keys.
        shutil.rmtree(self.directory / "etcd", ignore_errors=True)
        self.logs.mkdir(exist_ok=True)
        write_pki(self.pki.directory)
        ports = {
            name: _free_port() for name in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok")
        }
        state: dict[str, Any] = {"ports": ports, "pids": {}, "binaries": {k: str(v) for k, v in paths.items()}}
        self._save(state)
        self._write_kubeconfig(ports["apiserver"])
        try:
            self._spawn(state, "etcd", self._etcd_args(paths, ports))
            self._wait("etcd", lambda: self._http_ok(f"http://127.0.0.1:{ports['etcd']}/health"), 60)
            self._spawn(state, "kube-apiserver", self._apiserver_args(paths, ports))
            self._wait("kube-apiserver", lambda: self._api_ok("/readyz"), 120)
            self._spawn(state, "kube-controller-manager", self._controller_manager_args(paths, ports))
            self._spawn(state, "kube-scheduler", self._scheduler_args(paths, ports))
            self._spawn(state, "kwok", self._kwok_args(paths, ports))
            self._wait("kube-controller-manager", self._default_service_account_exists, 120)
            self.apply_objects(default_nodes() if nodes is None else nodes)
            self._wait("kwok", self._nodes_ready, 120)
        except BaseException:
            self.stop()
            raise
        return time.monotonic() - started

    def restart(self, name: str, down_seconds: float = 0) -> float:
        """Stop one component and start it again with the same flags and ports, as after a crash.

        Returns the seconds until it served again.
        """
        state = self.state()
        paths = {k: Path(v) for k, v in state["binaries"].items()}
        flags = {
            "kube-apiserver": self._apiserver_args,
            "kube-controller-manager": self._controller_manager_args,
            "kube-scheduler": self._scheduler_args,
            "kwok": self._kwok_args,
        }
        pid = state["pids"][name]
        if _ours(pid, state["binaries"][name]):
            _terminate(pid, 15)
        time.sleep(down_seconds)
        started = time.monotonic()
        self._spawn(state, name, flags[name](paths, state["ports"]))
        if name == "kube-apiserver":
            self._wait(name, lambda: self._api_ok("/readyz"), 120)
        return time.monotonic() - started

    def running(self) -> bool:
        """Whether any component recorded in the state directory is still alive."""
        state = self.state()
        return any(_ours(pid, state["binaries"][name]) for name, pid in state.get("pids", {}).items())

    def _spawn(self, state: dict[str, Any], name: str, args: list[str], pass_fds: Sequence[int] = ()) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            pass_fds=tuple(pass_fds),
        )
        log.close()
        state["pids"][name] = process.pid
        self._save(state)

    def _wait(self, name: str, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pid = self.state()["pids"].get(name)
        while time.monotonic() < deadline:
            if pid is not None and not _alive(pid):
                raise TestbedError(f"{name} exited during start-up:\n{self.log_tail(name)}")
            try:
                if ready():
                    return
            except (OSError, subprocess.SubprocessError):
                pass
            time.sleep(0.2)
        raise TestbedError(f"{name} was not ready after {timeout:.0f}s:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 40) -> str:
        """The last lines of a component's log, for error messages."""
        path = self.logs / f"{name}.log"
        if not path.exists():
            return f"(no log at {path})"
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {path} (last {len(text)} lines)\n" + "\n".join(text)

    # ---------------------------------------------------------------- component flags

    def _etcd_args(self, paths: dict[str, Path], ports: dict[str, int]) -> list[str]:
        client, peer = f"http://127.0.0.1:{ports['etcd']}", f"http://127.0.0.1:{ports['etcd-peer']}"
        return [
            str(paths["etcd"]),
            "--name=testbed",
            f"--data-dir={self.directory / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=testbed={peer}",
            "--listen-metrics-urls=",
            # A throwaway store: skipping fsync keeps a 2-core machine responsive.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]

    def _apiserver_args(self, paths: dict[str, Path], ports: dict[str, int]) -> list[str]:
        pki = self.pki
        issuer = "https://kubernetes.default.svc.cluster.local"
        return [
            str(paths["kube-apiserver"]),
            f"--etcd-servers=http://127.0.0.1:{ports['etcd']}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports['apiserver']}",
            f"--cert-dir={self.directory / 'apiserver-certs'}",
            f"--tls-cert-file={pki.server_cert}",
            f"--tls-private-key-file={pki.server_key}",
            f"--client-ca-file={pki.ca_cert}",
            # For logs and exec on the real node's kubelet, which trusts the test bed's CA.
            f"--kubelet-client-certificate={pki.admin_cert}",
            f"--kubelet-client-key={pki.admin_key}",
            "--kubelet-preferred-address-types=InternalIP",  # node names resolve nowhere here
            f"--service-account-key-file={pki.service_account_pub}",
            f"--service-account-signing-key-file={pki.service_account_key}",
            f"--service-account-issuer={issuer}",
            f"--api-audiences={issuer}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            # No real endpoint for the `kubernetes` Service: loopback is not a valid endpoint address.
            "--endpoint-reconciler-type=none",
            "--allow-privileged=false",
            "--profiling=false",
        ]

    def _client_component_args(self, name: str, port: int) -> list[str]:
        """Flags shared by the controller-manager and the scheduler: credentials, loopback serving, no election."""
        kubeconfig = str(self.kubeconfig)
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.directory / f'{name}-certs'}",
            "--leader-elect=false",
            "--profiling=false",
            *(
                [f"--kube-api-qps={self.client_qps}", f"--kube-api-burst={2 * self.client_qps}"]
                if self.client_qps
                else []
            ),
        ]

    def _controller_manager_args(self, paths: dict[str, Path], ports: dict[str, int]) -> list[str]:
        return [
            str(paths["kube-controller-manager"]),
            *self._client_component_args("controller-manager", ports["controller-manager"]),
            f"--root-ca-file={self.pki.ca_cert}",
            f"--service-account-private-key-file={self.pki.service_account_key}",
            f"--cluster-signing-cert-file={self.pki.ca_cert}",
            f"--cluster-signing-key-file={self.pki.ca_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
        ]

    def _scheduler_args(self, paths: dict[str, Path], ports: dict[str, int]) -> list[str]:
        return [str(paths["kube-scheduler"]), *self._client_component_args("scheduler", ports["scheduler"])]

    def _kwok_args(self, paths: dict[str, Path], ports: dict[str, int]) -> list[str]:
        return [
            str(paths["kwok"]),
            f"--kubeconfig={self.kubeconfig}",
            f"--config={STAGES}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--server-address=127.0.0.1:{ports['kwok']}",
            "--node-ip=127.0.0.1",
            # KWOK renews a Lease per node, as a kubelet does, so the node lifecycle controller keeps them Ready.
            "--node-lease-duration-seconds=40",
            "--cidr=10.244.0.0/16",
        ]

    # ---------------------------------------------------------------- talking to the cluster

    def _write_kubeconfig(self, port: int) -> None:
        pki = self.pki
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "edgemodel-testbed",
                    "cluster": {"server": f"https://127.0.0.1:{port}", "certificate-authority": str(pki.ca_cert)},
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {"client-certificate": str(pki.admin_cert), "client-key": str(pki.admin_key)},
                }
            ],
            "contexts": [{"name": "edgemodel-testbed", "context": {"cluster": "edgemodel-testbed", "user": "admin"}}],
            "current-context": "edgemodel-testbed",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))
        self.kubeconfig.chmod(0o600)

    def _http_ok(self, url: str) -> bool:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        context.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        return context

    def _api_ok(self, path: str) -> bool:
        url = f"https://127.0.0.1:{self.state()['ports']['apiserver']}{path}"
        with urllib.request.urlopen(url, timeout=2, context=self._ssl_context()) as response:
            return bool(response.status == 200)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run the test bed's kubectl against this cluster."""
        command = [self.state()["binaries"]["kubectl"], f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(command, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise TestbedError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def apply_objects(self, objects: Sequence[dict[str, Any]]) -> None:
        """`kubectl apply` a list of objects."""
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))

    def _default_service_account_exists(self) -> bool:
        return self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0

    def _nodes_ready(self) -> bool:
        listed = json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)
        items = listed["items"]
        return bool(items) and all(
            any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))
            for node in items
        )

    # ---------------------------------------------------------------- stop

    def stop(self, timeout: float = 15) -> None:
        """Stop every component by PID (newest first), then forget them; data and logs stay."""
        state = self.state()
        # The real nodes' pods' containers, mounts and links go before their processes (the arm64 node first).
        from tests.testbed.node import RealNode
        from tests.testbed.node_arm64 import Arm64Node

        for node in (Arm64Node(self), RealNode(self)):
            if node.spec.state_key in state:
                node.teardown()
                state = self.state()
        pids: dict[str, int] = state.get("pids", {})
        for name in reversed(list(pids)):
            if _ours(pids[name], state["binaries"][name]):
                _terminate(pids[name], timeout)
        if state and self.state_path is None:
            state["pids"] = {}
            self._save(state)
        # Nothing runs any more: the record goes (so does the run directory, once empty).
        (self.run_dir / RECORD).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.run_dir.rmdir()


def _ours(pid: int, binary: str) -> bool:
    """Whether `pid` is alive and still runs `binary` (PIDs are reused after a reboot).

    A binary of another architecture runs under its binfmt_misc interpreter (qemu-user-static with the
    P flag), whose command line is the interpreter, the binary's path, then the binary's own arguments.
    """
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    emulated = len(command) > 1 and Path(command[0]).name.startswith(("qemu-", "aarch64-binfmt"))
    return _alive(pid) and (command[0] == binary or (emulated and command[1] == binary))


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a process another shell started is reaped by init, maybe not at once: a zombie has exited
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _terminate(pid: int, timeout: float) -> None:
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    while _alive(pid):
        time.sleep(0.05)
