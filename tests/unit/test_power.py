"""Energy sensors: where the node has none (this machine), the answer is why, never a number; where it has one,
readings are read as the kernel lays them out. No sensor exists here, so the layouts are written into a
temporary directory as the kernel documents them (powercap, the Jetson INA3221 drivers): that tests the
reading and arithmetic, and no reading is ever made up for the product (`detect` looks at the real /sys)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgemodel_runtime import power


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_this_node_answers_with_a_meter_or_with_why_not() -> None:
    found = power.detect()
    if isinstance(found, power.Unavailable):
        for source in ("RAPL", "INA3221", "NVML" if "pynvml" not in found.reason else "pynvml"):
            assert source in found.reason, found.reason
        assert power.energy_per_call(found, lambda: pytest.fail("no sensor: nothing is run"), 1.0) == {
            "available": False,
            "reason": found.reason,
        }
    else:
        first = found.read()
        assert all(value >= 0 for value in first.values())
        assert all(b >= a for a, b in zip(first.values(), found.read().values(), strict=True))


def test_an_empty_sysfs_has_no_sensor(tmp_path: Path) -> None:
    found = power.detect(tmp_path)
    assert isinstance(found, power.Unavailable)
    assert "no RAPL powercap zones" in found.reason
    assert "no Jetson INA3221 power rails" in found.reason


def test_rapl_packages_are_read_in_joules_across_the_counters_wrap(tmp_path: Path) -> None:
    zone = tmp_path / "sys/class/powercap/intel-rapl:0"
    _write(zone / "name", "package-0")
    _write(zone / "energy_uj", "999000000")
    _write(zone / "max_energy_range_uj", "1000000000")
    _write(tmp_path / "sys/class/powercap/intel-rapl:0:0/energy_uj", "5")  # a sub-zone (core): inside package-0
    meter = power.detect(tmp_path)
    assert isinstance(meter, power.RaplMeter)
    _write(zone / "energy_uj", "1000000")  # wrapped: 1,000 J range, so 999 J -> 1 J is +2 J
    assert meter.read() == {"package-0-0": pytest.approx(2.0)}
    _write(zone / "energy_uj", "3500000")
    assert meter.read() == {"package-0-0": pytest.approx(4.5)}


def test_a_rapl_file_that_is_no_number_is_no_sensor(tmp_path: Path) -> None:
    _write(tmp_path / "sys/class/powercap/intel-rapl:0/energy_uj", "not a number")
    found = power.detect(tmp_path)
    assert isinstance(found, power.Unavailable)
    assert "cannot be read" in found.reason


@pytest.mark.parametrize("layout", ["l4t-32-iio", "l4t-35-hwmon"])
def test_jetson_rails_are_integrated_from_power(tmp_path: Path, layout: str) -> None:
    if layout == "l4t-32-iio":
        device = tmp_path / "sys/bus/i2c/drivers/ina3221x/1-0040/iio:device0"
        _write(device / "rail_name_0", "VDD_IN")
        _write(device / "in_power0_input", "5000")  # mW
    else:
        hwmon = tmp_path / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
        _write(hwmon / "in1_label", "VDD_IN")
        _write(hwmon / "in1_input", "5000")  # mV
        _write(hwmon / "curr1_input", "1000")  # mA: 5 W
    rails = power._ina_rails(tmp_path)
    assert [name for name, _ in rails] == ["VDD_IN"]
    times = iter([0.0, 2.0, 3.0])
    meter = power.InaMeter(rails, clock=lambda: next(times), sample=False)
    assert meter.read() == {"VDD_IN": pytest.approx(10.0)}  # 5 W for 2 s
    assert meter.read() == {"VDD_IN": pytest.approx(15.0)}
