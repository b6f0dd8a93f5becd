"""Build options of INT8 that are refused before any work, and what goes into the cache key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from edgemodel_runtime.build.errors import BadInputError, ExitCode
from edgemodel_runtime.build.request import BuildRequest, DataFile, check_request, options

DIGEST = "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"


def _request(tmp_path: Path, **changes: object) -> BuildRequest:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not checked here")
    calibration = tmp_path / "calibration.npz"
    calibration.write_bytes(b"")
    fields: dict[str, object] = {
        "model": str(model),
        "sha256": DIGEST,
        "precision": "int8",
        "calibration": DataFile(str(calibration)),
        **changes,
    }
    return BuildRequest(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("speedup", [-0.1, 100.5, math.nan, math.inf, -math.inf])
def test_an_int8_speed_threshold_outside_0_to_100_is_refused(speedup: float, tmp_path: Path) -> None:
    with pytest.raises(BadInputError) as raised:
        check_request(_request(tmp_path, int8_min_speedup=speedup))
    assert raised.value.exit_code == ExitCode.BAD_INPUT
    assert "--int8-min-speedup" in str(raised.value)


@pytest.mark.parametrize("speedup", [0.0, 1.1, 100.0])
def test_an_int8_speed_threshold_from_0_to_100_is_accepted(speedup: float, tmp_path: Path) -> None:
    check_request(_request(tmp_path, int8_min_speedup=speedup))


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_a_calibration_method_is_refused_for_openvino(method: str, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="does not apply to --engine openvino"):
        check_request(_request(tmp_path, engine="openvino", calibration_method=method))


def test_the_accuracy_aware_procedure_is_in_the_cache_key_of_static_onnxruntime_int8_only(tmp_path: Path) -> None:
    assert options(_request(tmp_path))["int8Procedure"] == "accuracy-aware-1"
    assert "int8Procedure" not in options(_request(tmp_path, calibration=None, quantization="dynamic"))
    assert "int8Procedure" not in options(_request(tmp_path, engine="openvino"))
    assert "int8Procedure" not in options(_request(tmp_path, engine="tensorrt"))
    assert "int8Procedure" not in options(_request(tmp_path, precision="fp32", calibration=None))
    chosen, forced = options(_request(tmp_path)), options(_request(tmp_path, calibration_method="entropy"))
    assert (chosen["calibrationMethod"], forced["calibrationMethod"]) == (None, "entropy")


@pytest.mark.parametrize(
    "engine",
    ["onnxruntime", "openvino"],  # the accuracy-aware procedure; NNCF's accuracy control
)
def test_what_an_int8_build_keeps_in_floating_point_for_is_in_its_cache_key(engine: str, tmp_path: Path) -> None:
    """Both int8 procedures decide what stays in fp32 on the validation set and its tolerance: another reference,
    tolerance or seeded sample set is another engine, not a cache hit on the one built for the old ones."""
    from edgemodel_runtime.build.compare import Tolerance

    base = options(_request(tmp_path, engine=engine))
    changed = [
        options(_request(tmp_path, engine=engine, tolerance=Tolerance(min_cosine=0.9))),
        options(_request(tmp_path, engine=engine, reference=DataFile("oci://r/ref:1", "b" * 64))),
        options(_request(tmp_path, engine=engine, reference=DataFile("oci://r/ref:1", "c" * 64))),
        options(_request(tmp_path, engine=engine, samples=32)),
        options(_request(tmp_path, engine=engine, seed=7)),
    ]
    assert all(o != base for o in changed)
    assert len({repr(sorted(o.items())) for o in changed}) == len(changed)
    # Builds that validate nothing into the engine keep their keys: fp32, dynamic int8 (no calibration).
    assert "int8Validation" not in options(_request(tmp_path, engine=engine, precision="fp32", calibration=None))
    assert "int8Validation" not in options(_request(tmp_path, calibration=None, quantization="dynamic"))
    assert options(_request(tmp_path, engine=engine, precision="fp32", calibration=None, samples=32)) == options(
        _request(tmp_path, engine=engine, precision="fp32", calibration=None)
    )
