"""arm64 on this amd64 machine: qemu-user-static through binfmt_misc, and the /proc/cpuinfo its programs see.

- binfmt_misc runs every arm64 ELF binary with Debian's `qemu-aarch64-static` when its entry is
  enabled with the `F` flag (the interpreter is opened once, at registration, so it also works inside
  containers and chroots that do not hold it): `emulation_problem()` says what is missing.
- qemu 7.2 passes the host's x86 /proc/cpuinfo through to arm64 programs; ONNX Runtime's CPU
  detection (cpuinfo) then crashes when /sys is mounted, as in every container. The arm64 node binds
  `cpuinfo_text()` over /proc/cpuinfo in its containers (see tests/testbed/node_arm64.py): the
  features the emulated CPU really offers (AT_HWCAP and AT_HWCAP2 of an arm64 process), one entry per
  host CPU, as the Linux arm64 kernel formats it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ARM64 = "arm64"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
ENTRY = BINFMT / "qemu-aarch64"
SETUP = (
    "apt-get install qemu-user-static binfmt-support; mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; "
    "update-binfmts --enable qemu-aarch64"
)

# Linux arch/arm64 hwcap bits, in the order /proc/cpuinfo prints their names (AT_HWCAP, then AT_HWCAP2).
HWCAP = (
    "fp",
    "asimd",
    "evtstrm",
    "aes",
    "pmull",
    "sha1",
    "sha2",
    "crc32",
    "atomics",
    "fphp",
    "asimdhp",
    "cpuid",
    "asimdrdm",
    "jscvt",
    "fcma",
    "lrcpc",
    "dcpop",
    "sha3",
    "sm3",
    "sm4",
    "asimddp",
    "sha512",
    "sve",
    "asimdfhm",
    "dit",
    "uscat",
    "ilrcpc",
    "flagm",
    "ssbs",
    "sb",
    "paca",
    "pacg",
)
HWCAP2 = (
    "dcpodp",
    "sve2",
    "sveaes",
    "svepmull",
    "svebitperm",
    "svesha3",
    "svesm4",
    "flagm2",
    "frint",
    "svei8mm",
    "svef32mm",
    "svef64mm",
    "svebf16",
    "i8mm",
    "bf16",
    "dgh",
    "rng",
    "bti",
    "mte",
    "ecv",
    "afp",
    "rpres",
    "mte3",
    "sme",
    "sme_i16i64",
    "sme_f64f64",
    "sme_i8i32",
    "sme_f16f32",
    "sme_b16f32",
    "sme_f32f32",
    "sme_fa64",
    "wfxt",
    "ebf16",
    "sve_ebf16",
)


def emulation_problem() -> str | None:
    """None when arm64 binaries run here through binfmt_misc with the F flag, else what is missing and the fix."""
    if not ENTRY.exists():
        return f"binfmt_misc has no qemu-aarch64 entry ({SETUP})"
    text = ENTRY.read_text()
    if not text.startswith("enabled"):
        return f"the binfmt_misc entry qemu-aarch64 is disabled ({SETUP})"
    flags = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("flags:")), "")
    if "F" not in flags:
        return f"the binfmt_misc entry qemu-aarch64 lacks the F flag (flags {flags!r}); containers cannot run it"
    return None


def features(hwcap: int, hwcap2: int) -> list[str]:
    """The /proc/cpuinfo `Features` names of AT_HWCAP and AT_HWCAP2 bits (pure)."""
    names = [name for bit, name in enumerate(HWCAP) if hwcap >> bit & 1]
    return names + [name for bit, name in enumerate(HWCAP2) if hwcap2 >> bit & 1]


def cpuinfo_text(feature_names: list[str], cpus: int) -> str:
    """/proc/cpuinfo as an arm64 Linux kernel writes it, for `cpus` CPUs of a generic Armv8 part (pure).

    `CPU implementer` 0x41 (Arm) with part 0xd4f: Neoverse V2, an Armv9 part with SVE2, i8mm and bf16,
    as the emulated CPU has; ONNX Runtime's CPU detection knows it.
    """
    entry = (
        "processor\t: {i}\nBogoMIPS\t: 100.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n"
        "CPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd4f\nCPU revision\t: 1\n"
    )
    return "\n".join(entry.format(i=i, features=" ".join(feature_names)) for i in range(cpus)) + "\n"


HWCAPS_SOURCE = """#include <stdio.h>
#include <sys/auxv.h>
int main(void) { printf("%lx %lx\\n", getauxval(AT_HWCAP), getauxval(AT_HWCAP2)); return 0; }
"""


def emulated_hwcaps(scratch: Path, cc: str = "aarch64-linux-gnu-gcc") -> tuple[int, int]:
    """AT_HWCAP and AT_HWCAP2 of an arm64 process under this machine's emulation (a static arm64 program,
    cross-compiled into `scratch`, prints them)."""
    source, binary = scratch / "hwcaps.c", scratch / "hwcaps"
    source.write_text(HWCAPS_SOURCE)
    built = subprocess.run([cc, "-static", "-Os", "-o", str(binary), str(source)],
                           capture_output=True, text=True, check=False)  # fmt: skip
    if built.returncode != 0:
        raise RuntimeError(f"{cc} failed: {built.stderr[-1000:]}")
    done = subprocess.run([str(binary)], capture_output=True, text=True, timeout=30, check=False)
    words = done.stdout.split()
    if done.returncode != 0 or len(words) != 2:
        raise RuntimeError(f"{binary} under emulation: exit {done.returncode}, {done.stdout!r} {done.stderr!r}")
    return int(words[0], 16), int(words[1], 16)
