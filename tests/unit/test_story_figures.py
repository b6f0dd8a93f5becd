"""`make demo` prints each class's build seconds, validation and latency, and its shadow evidence; the arm64
class's figures are labelled as measured under emulation, since they say nothing of a real arm64 board."""

from __future__ import annotations

from typing import Any

import pytest

from tests.testbed.story import figures, shadow_figures

METRICS = {"cosine": 0.9999999999999998, "top1Agreement": 1, "maxAbsError": 2.01234e-7, "validation": "passed",
           "latencyP50Ms": 72.99384700036171, "latencyP99Ms": 129.8927170000752}  # fmt: skip
SHADOW = {"decision": "Promote", "requests": 40, "agreement": 1.0, "latencyRatio": 1.14, "errorRate": 0.0}


@pytest.mark.parametrize(("key", "emulated"), [("arm64-none-c63be546", True), ("amd64-none-81432068", False)])
def test_each_class_figures_name_build_validation_and_latency_and_only_arm64_is_labelled_emulated(
    key: str, emulated: bool
) -> None:
    entry: dict[str, Any] = {"key": key, "buildSeconds": 9.2, "metrics": METRICS, "shadow": SHADOW}
    line = figures(entry)
    assert line.startswith(key)
    for text in ("build 9.2 s", "validation passed", "cosine 1,", "top-1 agreement 1,", "max abs error 2.012e-07",
                 "p50 72.99 ms", "p99 129.9 ms"):  # fmt: skip
        assert text in line, line
    shadow = shadow_figures(entry)
    for text in ("Promote", "40 mirrored requests", "agreement 1,", "latency ratio 1.14", "error rate 0"):
        assert text in shadow, shadow
    assert ("under emulation" in line) is emulated
    assert ("under emulation" in shadow) is emulated


@pytest.mark.parametrize("entry", [{"key": "arm64-none-1"}, {"key": "amd64-none-2", "metrics": {}, "shadow": {}}])
def test_a_class_without_figures_yet_prints_what_it_has(entry: dict[str, Any]) -> None:
    line = figures(entry)
    assert line.startswith(entry["key"])
    assert "validation -" in line
    assert "p50 None ms" in line
    assert "0 mirrored" not in shadow_figures(entry)
    assert "None mirrored requests" in shadow_figures(entry)
