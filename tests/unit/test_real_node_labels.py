"""The real node's labels come from the CPU's flags, named as Node Feature Discovery names them."""

from __future__ import annotations

from tests.testbed.node import cpu_labels

PREFIX = "feature.node.kubernetes.io/cpu-cpuid."


def test_x86_flags_become_nfd_cpuid_labels() -> None:
    cpuinfo = (
        "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni\n\nprocessor\t: 1\nflags\t\t: avx\n"
    )
    labels = cpu_labels(cpuinfo, "x86_64")
    assert labels["kubernetes.io/arch"] == "amd64"
    assert {k.removeprefix(PREFIX) for k in labels if k.startswith(PREFIX)} == {
        "AVX", "AVX2", "FMA3", "AVX512F", "AVX512VNNI"
    }  # fmt: skip


def test_arm_features_become_nfd_cpuid_labels() -> None:
    labels = cpu_labels("processor\t: 0\nFeatures\t: fp asimd asimddp sve i8mm\n", "aarch64")
    assert labels["kubernetes.io/arch"] == "arm64"
    assert {k.removeprefix(PREFIX) for k in labels if k.startswith(PREFIX)} == {"ASIMD", "ASIMDDP", "SVE", "I8MM"}


def test_this_machine_gets_an_arch_label_and_no_invented_features() -> None:
    assert cpu_labels("", "x86_64") == {"kubernetes.io/arch": "amd64"}
