"""Simulated edge nodes of several hardware classes, managed by KWOK.

Labels follow what the real labelling agents write on such machines: `kubernetes.io/arch`,
Node Feature Discovery's `feature.node.kubernetes.io/cpu-cpuid.*`, and GPU Feature Discovery's
`nvidia.com/gpu.*`. Capacity includes `nvidia.com/gpu` where the class has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
TESTBED_LABEL = "testbed.edgemodel.dev/simulated"


@dataclass(frozen=True)
class NodeClass:
    """A kind of edge machine: the labels and capacity every node of it carries."""

    name: str
    arch: str
    labels: dict[str, str]
    capacity: dict[str, str]
    node_info: dict[str, str] = field(default_factory=dict)


_CPU = {"cpu": "8", "memory": "16Gi", "pods": "110", "ephemeral-storage": "100Gi"}

X86_VNNI = NodeClass(
    name="x86-vnni",
    arch="amd64",
    labels={
        "feature.node.kubernetes.io/cpu-model.vendor_id": "Intel",
        "feature.node.kubernetes.io/cpu-cpuid.AVX2": "true",
        "feature.node.kubernetes.io/cpu-cpuid.AVX512F": "true",
        "feature.node.kubernetes.io/cpu-cpuid.AVX512VNNI": "true",
        "node.kubernetes.io/instance-type": "edge-x86-vnni",
    },
    capacity=_CPU,
)

X86_NVIDIA = NodeClass(
    name="x86-nvidia-a2",
    arch="amd64",
    labels={
        "feature.node.kubernetes.io/cpu-model.vendor_id": "AMD",
        "feature.node.kubernetes.io/cpu-cpuid.AVX2": "true",
        "feature.node.kubernetes.io/pci-10de.present": "true",
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": "NVIDIA-A2",
        "nvidia.com/gpu.family": "ampere",
        "nvidia.com/gpu.compute.major": "8",
        "nvidia.com/gpu.compute.minor": "6",
        "nvidia.com/gpu.count": "2",
        "nvidia.com/gpu.memory": "15356",
        "nvidia.com/cuda.driver.major": "580",
        "nvidia.com/cuda.runtime.major": "13",
        "node.kubernetes.io/instance-type": "edge-gpu-workstation",
    },
    capacity={**_CPU, "cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "2"},
)

JETSON_ORIN = NodeClass(
    name="jetson-orin",
    arch="arm64",
    labels={
        "feature.node.kubernetes.io/cpu-cpuid.ASIMD": "true",
        "feature.node.kubernetes.io/cpu-cpuid.ASIMDDP": "true",
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": "Orin-nvgpu",
        "nvidia.com/gpu.family": "ampere",
        "nvidia.com/gpu.compute.major": "8",
        "nvidia.com/gpu.compute.minor": "7",
        "nvidia.com/gpu.count": "1",
        # The device plugin shares the integrated GPU by time-slicing, as is usual on Jetson.
        "nvidia.com/gpu.replicas": "4",
        "nvidia.com/gpu.sharing-strategy": "time-slicing",
        "nvidia.com/jetson.module": "jetson-agx-orin-64gb",
        "node.kubernetes.io/instance-type": "jetson-agx-orin",
    },
    capacity={**_CPU, "cpu": "12", "memory": "61Gi", "nvidia.com/gpu": "4"},
    node_info={"osImage": "Ubuntu 22.04.5 LTS (L4T R36.4.3)"},
)

# A Jetson as it ships: one integrated GPU, no time-slicing, so one pod at a time may hold it. Not among
# the default nodes (other tests count those classes): tests add it to a pool of their own.
JETSON_XAVIER_NX = NodeClass(
    name="jetson-xavier-nx",
    arch="arm64",
    labels={
        "feature.node.kubernetes.io/cpu-cpuid.ASIMD": "true",
        "feature.node.kubernetes.io/cpu-cpuid.ASIMDDP": "true",
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": "Xavier-nvgpu",
        "nvidia.com/gpu.family": "volta",
        "nvidia.com/gpu.compute.major": "7",
        "nvidia.com/gpu.compute.minor": "2",
        "nvidia.com/gpu.count": "1",
        "nvidia.com/jetson.module": "jetson-xavier-nx",
        "node.kubernetes.io/instance-type": "jetson-xavier-nx",
    },
    capacity={**_CPU, "cpu": "6", "memory": "8Gi", "nvidia.com/gpu": "1"},
    node_info={"osImage": "Ubuntu 20.04.6 LTS (L4T R35.6.0)"},
)

ARM64_CPU = NodeClass(
    name="arm64-cpu",
    arch="arm64",
    labels={
        "feature.node.kubernetes.io/cpu-cpuid.ASIMD": "true",
        "feature.node.kubernetes.io/cpu-cpuid.ASIMDDP": "true",
        "node.kubernetes.io/instance-type": "raspberry-pi-5",
    },
    capacity={**_CPU, "cpu": "4", "memory": "8Gi"},
)

CLASSES = (X86_VNNI, X86_NVIDIA, JETSON_ORIN, ARM64_CPU)

# Two nodes of each class but the workstation: a class is a set of interchangeable nodes.
DEFAULT_NODES = (
    ("edge-x86-1", X86_VNNI),
    ("edge-x86-2", X86_VNNI),
    ("gpu-ws-1", X86_NVIDIA),
    ("jetson-orin-1", JETSON_ORIN),
    ("jetson-orin-2", JETSON_ORIN),
    ("rpi5-1", ARM64_CPU),
)


def build_node(name: str, node_class: NodeClass) -> dict[str, Any]:
    """A Node object that KWOK will manage and keep Ready."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_ANNOTATION: "fake"},
            "labels": {
                "kubernetes.io/arch": node_class.arch,
                "kubernetes.io/os": "linux",
                "kubernetes.io/hostname": name,
                "type": "kwok",
                TESTBED_LABEL: "true",
                **node_class.labels,
            },
        },
        "spec": {},
        "status": {
            "allocatable": dict(node_class.capacity),
            "capacity": dict(node_class.capacity),
            "nodeInfo": {
                "architecture": node_class.arch,
                "operatingSystem": "linux",
                "kubeletVersion": "fake",
                "kubeProxyVersion": "fake",
                "osImage": "Debian GNU/Linux 12 (bookworm)",
                **node_class.node_info,
            },
        },
    }


def default_nodes() -> list[dict[str, Any]]:
    """The simulated nodes every test bed starts with."""
    return [build_node(name, node_class) for name, node_class in DEFAULT_NODES]
