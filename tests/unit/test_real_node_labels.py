"""The real node's labels come from the CPU's flags, named as Node Feature Discovery names them; its lock
names the test bed holding it, and a refused start names the command that stops that test bed."""

from __future__ import annotations

from pathlib import Path

from tests.testbed.emulation import cpuinfo_text, features
from tests.testbed.node import cpu_labels, lock_owner, refusal

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


def test_a_refusal_names_the_command_that_stops_the_test_bed_holding_the_node(tmp_path: Path) -> None:
    alive = tmp_path / "alive"
    alive.mkdir()
    (alive / "state.json").write_text("{}")
    gone = tmp_path / "deleted-clone" / ".testbed"
    assert f"python -m tests.testbed down --dir {alive}" in refusal("the real node", alive)
    message = refusal("the real node", gone)
    assert "directory is gone" in message
    assert "make testbed-down" in message
    assert "make testbed-down" in refusal("the real node", None)


def test_the_lock_names_its_test_bed_in_either_format() -> None:
    assert lock_owner('{"testbed": "/a/b/.testbed", "run_dir": "/run/edgemodel-0"}\n') == Path("/a/b/.testbed")
    assert lock_owner("the test bed in /a/b/.testbed\n") == Path("/a/b/.testbed")  # older versions wrote this
    assert lock_owner("") is None
    assert lock_owner("{not json") is None


def test_the_arm64_nodes_cpuinfo_names_the_emulated_cpus_features_and_labels_follow() -> None:
    # AT_HWCAP bits 0 (fp), 1 (asimd), 20 (asimddp), 22 (sve); AT_HWCAP2 bit 13 (i8mm).
    names = features((1 << 0) | (1 << 1) | (1 << 20) | (1 << 22), 1 << 13)
    assert names == ["fp", "asimd", "asimddp", "sve", "i8mm"]
    text = cpuinfo_text(names, 3)
    assert text.count("processor\t:") == 3
    assert text.count("CPU implementer\t: 0x41") == 3
    labels = cpu_labels(text, "aarch64")
    assert {k.removeprefix(PREFIX) for k in labels if k.startswith(PREFIX)} == {"ASIMD", "ASIMDDP", "SVE", "I8MM"}
    assert features(0, 0) == []
