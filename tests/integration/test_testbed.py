"""The test bed itself: real control-plane components and KWOK nodes that behave as edge nodes.

Later tests build on these behaviours (scheduling by hardware labels, Job pods finishing with a
termination message), so they are checked here on their own first.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import EXIT_CODE, MESSAGE, eventually, get
from tests.testbed import node as real_node
from tests.testbed.__main__ import up
from tests.testbed.cluster import RECORD, Testbed, _ours
from tests.testbed.cluster import TestbedError as StartError
from tests.testbed.emulation import emulation_problem
from tests.testbed.hostparts import cgroup_dirs
from tests.testbed.node_arm64 import ARM64_NODE, Arm64Node, held
from tests.testbed.nodes import CLASSES, DEFAULT_NODES, X86_NVIDIA, X86_VNNI, build_node
from tests.testbed.orphans import _processes_naming

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.testbed


def _job(name: str, node_selector: dict[str, str], annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": annotations or {}},
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": node_selector,
                    "containers": [{"name": "build", "image": "edgemodel-runtime:test", "args": ["build"]}],
                },
            },
        },
    }


def _pods_of_job(bed: Testbed, namespace: str, job: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = get(bed, "pods", "-n", namespace, "-l", f"job-name={job}")["items"]
    return items


def test_control_plane_components_report_healthy(testbed: Testbed) -> None:
    for path in ("/livez", "/readyz"):
        assert testbed.kubectl("get", "--raw", path).stdout.strip() == "ok"
    version = json.loads(testbed.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.36.3"


def test_every_simulated_node_is_ready_with_its_hardware_class_labels(testbed: Testbed) -> None:
    nodes = {n["metadata"]["name"]: n for n in get(testbed, "nodes", "-l", "type=kwok")["items"]}
    assert set(nodes) >= {name for name, _ in DEFAULT_NODES}
    for name, node_class in DEFAULT_NODES:
        node = nodes[name]
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True", f"{name} is not Ready"
        assert node["metadata"]["labels"]["kubernetes.io/arch"] == node_class.arch
        for key, value in node_class.labels.items():
            assert node["metadata"]["labels"][key] == value
        assert node["status"]["capacity"] == node_class.capacity


def test_classes_differ_in_what_decides_where_an_engine_can_run() -> None:
    signatures = {
        (
            c.arch,
            c.labels.get("nvidia.com/gpu.product"),
            c.labels.get("feature.node.kubernetes.io/cpu-cpuid.AVX512VNNI"),
        )
        for c in CLASSES
    }
    assert len(signatures) == len(CLASSES) >= 3


def test_gpu_pod_is_scheduled_only_on_a_node_with_a_gpu(testbed: Testbed, namespace: str) -> None:
    # Two nodes of this test's own pool, so that GPUs other tests hold cannot interfere.
    pool = {"testbed.edgemodel.dev/pool": namespace}
    cpu_node, gpu_node = build_node(f"{namespace}-cpu", X86_VNNI), build_node(f"{namespace}-gpu", X86_NVIDIA)
    for node in (cpu_node, gpu_node):
        node["metadata"]["labels"] |= pool
    testbed.apply_objects([cpu_node, gpu_node])
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "wants-gpu"},
        "spec": {
            "containers": [
                {"name": "serve", "image": "edgemodel-runtime:test", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
            ],
            "nodeSelector": pool,
        },
    }
    try:
        testbed.kubectl(
            "wait", "--for=condition=Ready", f"node/{namespace}-cpu", f"node/{namespace}-gpu", "--timeout=60s"
        )
        testbed.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(pod))
        running = eventually(
            lambda: (p := get(testbed, "pod", "wants-gpu", "-n", namespace))["status"].get("phase") == "Running" and p,
            what="GPU pod Running",
        )
        assert running["spec"]["nodeName"] == f"{namespace}-gpu"
        conditions = {c["type"]: c["status"] for c in running["status"]["conditions"]}
        assert conditions["Ready"] == "True"
        assert running["status"]["podIP"]
    finally:
        testbed.kubectl("delete", "pod", "wants-gpu", "-n", namespace, "--wait=false", check=False)
        testbed.kubectl("delete", "node", f"{namespace}-cpu", f"{namespace}-gpu", "--wait=false", check=False)


@pytest.mark.parametrize(
    ("exit_code", "phase", "job_condition"),
    [("0", "Succeeded", "Complete"), ("3", "Failed", "Failed")],
    ids=["succeeds", "fails"],
)
def test_job_pod_finishes_with_the_exit_code_and_termination_message_a_test_sets(
    testbed: Testbed, namespace: str, exit_code: str, phase: str, job_condition: str
) -> None:
    report = json.dumps({"version": 1, "ok": exit_code == "0", "reason": 'tolerance "minCosine" missed'})
    job = _job("build", {"kubernetes.io/arch": "arm64", "nvidia.com/gpu.present": "true"})
    testbed.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(job))
    pod = eventually(
        lambda: [p for p in _pods_of_job(testbed, namespace, "build") if p["status"].get("phase") == "Running"],
        what="build pod Running",
    )[0]
    assert pod["spec"]["nodeName"].startswith("jetson-orin-")
    # A build without a result stays Running: the operator sees a build in progress.
    time.sleep(1)
    assert get(testbed, "pod", pod["metadata"]["name"], "-n", namespace)["status"]["phase"] == "Running"

    testbed.kubectl(
        "annotate", "pod", pod["metadata"]["name"], "-n", namespace, f"{EXIT_CODE}={exit_code}", f"{MESSAGE}={report}"
    )
    finished = eventually(
        lambda: (p := get(testbed, "pod", pod["metadata"]["name"], "-n", namespace))["status"]["phase"] == phase and p,
        what=f"pod {phase}",
    )
    terminated = finished["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == int(exit_code)
    assert json.loads(terminated["message"]) == json.loads(report)
    eventually(
        lambda: any(
            c["type"] == job_condition and c["status"] == "True"
            for c in get(testbed, "job", "build", "-n", namespace)["status"].get("conditions", [])
        ),
        what=f"Job {job_condition}",
    )


def test_job_with_the_result_in_its_pod_template_finishes_on_its_own(testbed: Testbed, namespace: str) -> None:
    job = _job("quick", {"kubernetes.io/arch": "amd64"}, {EXIT_CODE: "0", MESSAGE: "built"})
    testbed.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(job))
    testbed.kubectl("wait", "-n", namespace, "--for=condition=Complete", "job/quick", "--timeout=60s")


def test_a_node_of_a_new_class_joins_and_becomes_ready(testbed: Testbed) -> None:
    node = build_node("gpu-ws-joined", X86_NVIDIA)
    node["metadata"]["labels"]["nvidia.com/gpu.product"] = "NVIDIA-L4"
    node["metadata"]["labels"]["nvidia.com/gpu.compute.minor"] = "9"
    testbed.apply_objects([node])
    try:
        testbed.kubectl("wait", "--for=condition=Ready", "node/gpu-ws-joined", "--timeout=60s")
    finally:
        testbed.kubectl("delete", "node", "gpu-ws-joined", "--wait=false")


def _listening_addresses(pid: int) -> set[str]:
    """host:port of every TCP socket `pid` listens on, read from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    addresses = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            host_hex, port_hex = local.split(":")
            raw = bytes.fromhex(host_hex)
            # /proc prints addresses as host-order 32-bit words.
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            addresses.add(f"{socket.inet_ntop(family, packed)}:{int(port_hex, 16)}")
    return addresses


def test_every_component_listens_on_loopback_only(testbed: Testbed) -> None:
    pids = testbed.state()["pids"]
    assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"}
    for name, pid in pids.items():
        addresses = _listening_addresses(pid)
        assert addresses, f"{name} listens on nothing"
        outside = {a for a in addresses if not a.startswith(("127.", "::ffff:127."))}
        assert not outside, f"{name} listens beyond loopback: {outside}"


def test_a_test_bed_whose_directory_was_deleted_is_stopped_by_the_down_command(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    bed = Testbed(clone / ".testbed")
    bed.start([build_node("orphan-0", X86_VNNI)])
    state = bed.state()
    try:
        assert (bed.run_dir / RECORD).exists()
        shutil.rmtree(clone, ignore_errors=True)  # the clone is deleted while its test bed runs
        assert not (bed.directory / "state.json").exists()
        assert all(_ours(pid, state["binaries"][name]) for name, pid in state["pids"].items())

        down = subprocess.run(
            [sys.executable, "-m", "tests.testbed", "down", "--dir", str(tmp_path / "another-clone")],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert down.returncode == 0, down.stderr
        assert f"its directory {bed.directory} was gone" in down.stderr
        assert not any(_ours(pid, state["binaries"][name]) for name, pid in state["pids"].items())
        assert not bed.run_dir.exists()
        assert not _processes_naming(bed.directory)
    finally:
        Testbed(bed.directory, state_path=bed.run_dir / RECORD).stop()
        shutil.rmtree(clone, ignore_errors=True)


@pytest.mark.parametrize(
    ("lock", "what", "arm64"),
    [("containerd.lock", "the real node", False), ("containerd-arm64.lock", "the arm64 node", True)],
    ids=["real-node", "arm64-node"],
)
def test_a_refused_real_node_start_starts_nothing_and_says_which_command_stops_the_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lock: str, what: str, arm64: bool
) -> None:
    try:
        real_node.preflight()
    except real_node.NodeUnavailableError as error:
        pytest.skip(f"no real node here: {error}")
    if arm64 and (problem := emulation_problem()):
        pytest.skip(f"no arm64 emulation here: {problem}")
    # The node's lock, held (as a real node's containerd holds it) by a test bed whose directory is gone.
    monkeypatch.setattr(real_node, "lock_directory", lambda: tmp_path / "locks")
    (tmp_path / "locks").mkdir()
    gone = tmp_path / "deleted-clone" / ".testbed"
    with (tmp_path / "locks" / lock).open("a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write(json.dumps({"testbed": str(gone)}) + "\n")
        holder.flush()
        bed = Testbed(tmp_path / "bed")
        with pytest.raises(real_node.NodeUnavailableError) as refused:
            up(bed, real_node=True, arm64_node=arm64)
    assert f"the test bed in {gone} runs {what}" in str(refused.value)
    assert "make testbed-down" in str(refused.value)
    assert not bed.running()
    assert not bed.state()
    assert not _processes_naming(bed.directory)


def test_a_test_bed_and_its_arm64_node_whose_directory_was_deleted_are_stopped_by_the_down_command(
    tmp_path: Path,
) -> None:
    """As above, with a real node: its processes, containers' cgroups, bridge and lock go as well.

    The arm64 node stands for either node here; the amd64 one is shared by other test sessions.
    """
    if problem := emulation_problem():
        pytest.skip(f"no arm64 emulation here: {problem}")
    # Short: the kubelet's unix sockets live under its root directory (at most 108 bytes a path).
    clone = Path(tempfile.mkdtemp(prefix="em-", dir="/tmp"))
    bed = Testbed(clone / ".testbed")
    bed.start([build_node("orphan-1", X86_VNNI)])
    node = Arm64Node(bed)
    try:
        node.start()
        state = bed.state()
        assert node.running()
        shutil.rmtree(clone, ignore_errors=True)
        assert not (bed.directory / "state.json").exists()

        down = subprocess.run(
            [sys.executable, "-m", "tests.testbed", "down", "--dir", str(tmp_path / "another-clone")],
            cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        assert down.returncode == 0, down.stderr
        assert f"its directory {bed.directory} was gone" in down.stderr
        assert not any(_ours(pid, state["binaries"][name]) for name, pid in state["pids"].items())
        assert not _processes_naming(bed.directory)
        assert subprocess.run(["ip", "link", "show", ARM64_NODE.bridge], capture_output=True, check=False).returncode
        assert not cgroup_dirs(ARM64_NODE.cgroup_root)
        assert not held(node.lock_path)
        assert not bed.run_dir.exists()
    finally:
        Testbed(bed.directory, state_path=bed.run_dir / RECORD).stop()
        shutil.rmtree(clone, ignore_errors=True)


def test_a_node_start_that_fails_leaves_nothing_of_the_node_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kubelet that exits at once (`/bin/false`, standing in for a kubelet that fails; the real one cannot
    be made to fail on demand) fails the start after containerd, the bridge and the lock are up: all go."""
    if problem := emulation_problem():
        pytest.skip(f"no arm64 emulation here: {problem}")
    clone = Path(tempfile.mkdtemp(prefix="em-", dir="/tmp"))
    bed = Testbed(clone / ".testbed")
    bed.start([build_node("failing-1", X86_VNNI)])
    node = Arm64Node(bed)
    real_binaries = node._binaries
    monkeypatch.setattr(node, "_binaries", lambda: real_binaries() | {"kubelet": "/bin/false"})
    try:
        with pytest.raises(StartError, match="kubelet-arm64 exited during start-up"):
            node.start()
        state = bed.state()
        assert ARM64_NODE.state_key not in state
        assert not any(name.endswith("-arm64") for name in state["pids"])
        assert not _processes_naming(node.directory)  # its containerd and kubelet name it
        assert subprocess.run(["ip", "link", "show", ARM64_NODE.bridge], capture_output=True, check=False).returncode
        assert not cgroup_dirs(ARM64_NODE.cgroup_root)
        assert not held(node.lock_path)
        assert bed.running()  # the control plane is the caller's
    finally:
        bed.stop()
        shutil.rmtree(clone, ignore_errors=True)
