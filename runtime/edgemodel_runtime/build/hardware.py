"""Facts about the machine a build runs on, and the hardware class key derived from them."""

from __future__ import annotations

import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# CPU flags that change which kernels ONNX Runtime picks (and so what an engine's speed means).
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "asimddp", "sve", "i8mm")

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "riscv64": "riscv64"}


@dataclass(frozen=True)
class Hardware:
    arch: str
    cpu_model: str
    cpu_flags: tuple[str, ...]
    cores: int
    gpu_name: str | None = None
    gpu_compute_capability: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def class_key(self) -> str:
        """A readable key for the class this machine belongs to, e.g. `amd64-avx2-avx512f-avx512_vnni`."""
        parts = [self.arch, *self.cpu_flags]
        if self.gpu_compute_capability:
            parts.append(f"sm{self.gpu_compute_capability.replace('.', '')}")
        return "-".join(parts)


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or "unknown", set[str]()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in {"model name", "Model", "CPU part"} and model in {"unknown", ""}:
            model = value.strip()
        elif key in {"flags", "Features"}:
            flags |= set(value.split())
    return model, flags


def _gpu() -> tuple[str | None, str | None]:
    if shutil.which("nvidia-smi") is None:
        return None, None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, None
    if not out:
        return None, None
    name, _, capability = out.splitlines()[0].partition(",")
    return name.strip(), capability.strip() or None


def detect() -> Hardware:
    """Facts about this machine."""
    import os

    model, flags = _cpuinfo()
    gpu_name, capability = _gpu()
    return Hardware(
        arch=_ARCH.get(platform.machine(), platform.machine()),
        cpu_model=model,
        cpu_flags=tuple(flag for flag in KERNEL_FLAGS if flag in flags),
        cores=os.cpu_count() or 1,
        gpu_name=gpu_name,
        gpu_compute_capability=capability,
    )
