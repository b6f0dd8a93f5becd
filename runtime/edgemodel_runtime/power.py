"""Energy readings where the node exposes them; never simulated.

Sources, tried in this order (`detect`):

- `rapl`: Linux powercap, the package domains `/sys/class/powercap/intel-rapl:<N>/energy_uj`
  (microjoules, wrapping at `max_energy_range_uj`; AMD CPUs expose the same interface). Readable only
  by root since Linux 5.10 (CVE-2020-8694), and only where /sys shows it (not in most VMs).
- `ina3221`: the NVIDIA Jetson power monitor's rails, under `/sys/bus/i2c/drivers/ina3221x/*/iio:device*/`
  (`rail_name_<i>`, `in_power<i>_input` in mW; L4T 32) or `/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/`
  (`in<i>_label`, `in<i>_input` in mV and `curr<i>_input` in mA; L4T 35 and later). These give power,
  not energy: a sampler thread integrates it (trapezoids, every SAMPLE_SECONDS).
- `nvml`: NVIDIA GPUs' total energy since the driver loaded (`nvmlDeviceGetTotalEnergyConsumption`,
  millijoules; Volta and later), only if the `pynvml` module (package nvidia-ml-py) is installed.

Every figure is the whole domain's (a CPU package, a power rail, a GPU), not the process's share: energy
per inference computed from it is an upper bound that includes whatever else the domain ran meanwhile.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

SAMPLE_SECONDS = 0.05


class Meter(Protocol):
    source: str

    def read(self) -> dict[str, float]:
        """Joules counted per domain since the meter was made (monotonic)."""
        ...


@dataclass(frozen=True)
class Unavailable:
    """Why no energy reading: one sentence per source tried."""

    reason: str


class RaplMeter:
    source = "rapl"

    def __init__(self, zones: list[tuple[str, Path, int]]) -> None:
        """`zones`: (domain name, energy_uj file, max_energy_range_uj) per package."""
        self._zones = zones
        self._lock = threading.Lock()
        self._last = {name: _read_int(path) for name, path, _ in zones}
        self._total = dict.fromkeys(self._last, 0.0)

    def read(self) -> dict[str, float]:
        with self._lock:
            for name, path, wrap in self._zones:
                raw = _read_int(path)
                delta = raw - self._last[name]
                self._total[name] += (delta if delta >= 0 else delta + wrap) / 1e6
                self._last[name] = raw
            return dict(self._total)


class InaMeter:
    source = "ina3221"

    def __init__(
        self, rails: list[tuple[str, Callable[[], float]]], clock: Callable[[], float] = time.monotonic, *,
        sample: bool = True,
    ) -> None:  # fmt: skip
        """`rails`: (rail name, a function reading its power in watts); `sample`: integrate every
        SAMPLE_SECONDS in a thread (else only at each `read`)."""
        self._rails, self._clock = rails, clock
        self._lock = threading.Lock()
        self._total = {name: 0.0 for name, _ in rails}
        self._last = (clock(), {name: power() for name, power in rails})
        if sample:
            threading.Thread(target=self._sample, name="ina3221-sampler", daemon=True).start()

    def _sample(self) -> None:
        while True:
            time.sleep(SAMPLE_SECONDS)
            self.read()

    def read(self) -> dict[str, float]:
        with self._lock:
            now, powers = self._clock(), {name: power() for name, power in self._rails}
            then, before = self._last
            for name, watts in powers.items():
                self._total[name] += (watts + before[name]) / 2 * (now - then)
            self._last = (now, powers)
            return dict(self._total)


class NvmlMeter:
    source = "nvml"

    def __init__(self, nvml: Any, handles: list[tuple[str, Any]]) -> None:
        self._nvml, self._handles = nvml, handles
        self._start = {name: nvml.nvmlDeviceGetTotalEnergyConsumption(h) for name, h in handles}

    def read(self) -> dict[str, float]:
        return {
            name: (self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) - self._start[name]) / 1e3
            for name, h in self._handles
        }


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def _rapl(root: Path) -> RaplMeter | str:
    base = root / "sys/class/powercap"
    zones = sorted(p for p in base.glob("intel-rapl:*") if re.fullmatch(r"intel-rapl:\d+", p.name))
    if not zones:
        return f"no RAPL powercap zones under {base}"
    found = []
    for zone in zones:
        try:
            name = (zone / "name").read_text().strip() if (zone / "name").exists() else zone.name
            _read_int(zone / "energy_uj")
            wrap = _read_int(zone / "max_energy_range_uj") if (zone / "max_energy_range_uj").exists() else 2**32
        except PermissionError:
            return f"{zone / 'energy_uj'} is not readable by this process (root only since Linux 5.10)"
        except (OSError, ValueError) as error:
            return f"{zone / 'energy_uj'} cannot be read: {error}"
        found.append((f"{name}-{zone.name.rsplit(':', 1)[1]}" if name.startswith("package") else name,
                      zone / "energy_uj", wrap))  # fmt: skip
    return RaplMeter(found)


def _scaled(first: Path, second: Path | None, divisor: float) -> Callable[[], float]:
    """Watts from one file (mW: divisor 1e3) or the product of two (mV x mA: divisor 1e6)."""

    def watts() -> float:
        return _read_int(first) * (_read_int(second) if second is not None else 1) / divisor

    return watts


def _ina_rails(root: Path) -> list[tuple[str, Callable[[], float]]]:
    rails: list[tuple[str, Callable[[], float]]] = []
    for device in sorted((root / "sys/bus/i2c/drivers/ina3221x").glob("*/iio:device*")):  # L4T 32: mW
        for power in sorted(device.glob("in_power*_input")):
            index = power.name.removeprefix("in_power").removesuffix("_input")
            label = device / f"rail_name_{index}"
            name = label.read_text().strip() if label.exists() else f"{device.parent.name}-{index}"
            rails.append((name, _scaled(power, None, 1e3)))
    for hwmon in sorted((root / "sys/bus/i2c/drivers/ina3221").glob("*/hwmon/hwmon*")):  # L4T 35+: mV x mA
        for volts in sorted(hwmon.glob("in*_input")):
            index = volts.name.removeprefix("in").removesuffix("_input")
            current = hwmon / f"curr{index}_input"
            if not current.exists():
                continue
            label = hwmon / f"in{index}_label"
            name = label.read_text().strip() if label.exists() else f"{hwmon.name}-{index}"
            rails.append((name, _scaled(volts, current, 1e6)))
    return rails


def _ina(root: Path) -> InaMeter | str:
    rails = _ina_rails(root)
    if not rails:
        return "no Jetson INA3221 power rails under /sys/bus/i2c/drivers/ina3221x or ina3221"
    try:
        for _, power in rails:
            power()
    except (OSError, ValueError) as error:
        return f"the INA3221 rails cannot be read: {error}"
    return InaMeter(rails)


def _nvml() -> NvmlMeter | str:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return "pynvml (nvidia-ml-py) is not installed, so NVIDIA GPU energy is not read"
    try:
        pynvml.nvmlInit()
        handles = [(f"gpu{i}", pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(pynvml.nvmlDeviceGetCount())]
        if not handles:
            return "NVML finds no GPU"
        return NvmlMeter(pynvml, handles)
    except Exception as error:  # pynvml raises NVMLError subclasses (no driver, unsupported GPU)
        return f"NVML gives no energy reading: {error}"


def detect(root: Path = Path("/")) -> Meter | Unavailable:
    """The first energy source this node exposes and this process can read, else why there is none.

    `root` is where /sys is looked for (a test points it at a directory laid out as sysfs).
    """
    reasons = []
    for found in (_rapl(root), _ina(root)):
        if not isinstance(found, str):
            return found
        reasons.append(found)
    nvml = _nvml() if root == Path("/") else "NVML is only read on the real root"
    if not isinstance(nvml, str):
        return nvml
    return Unavailable("; ".join([*reasons, nvml]))


def energy_per_call(meter: Meter | Unavailable, run_once: Callable[[], object], seconds: float) -> dict[str, Any]:
    """Joules per call of `run_once`, called for about `seconds`, as the build report's `energy` field.

    Returns {"available": False, "reason"} without a meter (and does not call `run_once`).
    """
    if isinstance(meter, Unavailable):
        return {"available": False, "reason": meter.reason}
    before, started, calls = meter.read(), time.monotonic(), 0
    while calls == 0 or time.monotonic() - started < seconds:
        run_once()
        calls += 1
    after, elapsed = meter.read(), time.monotonic() - started
    domains = {name: after[name] - before.get(name, 0.0) for name in after}
    total = sum(domains.values())
    return {
        "available": True,
        "source": meter.source,
        "calls": calls,
        "seconds": round(elapsed, 3),
        "joulesPerInference": total / calls,
        "watts": round(total / elapsed, 3) if elapsed > 0 else None,
        "domains": {name: round(joules, 6) for name, joules in domains.items()},
        "note": "whole-domain energy while the engine ran: an upper bound that includes anything else it ran",
    }
