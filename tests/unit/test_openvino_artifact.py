"""The `model.openvino` archive: what `read_config` refuses, and the precisions the engine refuses."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from edgemodel_runtime.build.errors import BadInputError, ExitCode
from edgemodel_runtime.engines import openvino_engine

GOOD = {"precision": "fp32", "inference_precision": "f32", "openvino": "2026.4.1", "shapes": {"x": [1, 3, 48, 192]}}


def _archive(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.mark.parametrize(
    "members",
    [
        {"compiled.blob": b"blob"},
        {"config.json": json.dumps(GOOD).encode()},
        {"config.json": b"{not json", "compiled.blob": b"blob"},
        {"config.json": b"[1, 2]", "compiled.blob": b"blob"},
        {"config.json": json.dumps({**GOOD, "shapes": {"x": ["a"]}}).encode(), "compiled.blob": b"blob"},
        {"config.json": json.dumps({k: v for k, v in GOOD.items() if k != "openvino"}).encode(), "compiled.blob": b""},
    ],
    ids=["no config", "no blob", "config not JSON", "config not an object", "shape not integers", "no version"],
)
def test_an_archive_missing_or_garbling_a_member_is_refused(members: dict[str, bytes], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not an edgemodel OpenVINO artifact"):
        openvino_engine.read_config(_archive(tmp_path / "model.openvino", members))


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"\x00" * 64])
def test_a_file_that_is_no_zip_archive_is_refused(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "model.openvino"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is not an edgemodel OpenVINO artifact"):
        openvino_engine.read_config(path)


@pytest.mark.parametrize("precision", ["int4", "fp64", "fp8", ""])
def test_precisions_the_engine_does_not_build_are_bad_input(precision: str) -> None:
    with pytest.raises(BadInputError) as raised:
        openvino_engine.check_precision(precision)
    assert raised.value.exit_code == ExitCode.BAD_INPUT
    assert raised.value.reason == "UnsupportedPrecision"


def test_fp32_is_always_buildable_and_the_config_round_trips(tmp_path: Path) -> None:
    openvino_engine.check_precision("fp32")  # every CPU OpenVINO supports has FP32
    config, blob = openvino_engine.read_config(
        _archive(tmp_path / "model.openvino", {"config.json": json.dumps(GOOD).encode(), "compiled.blob": b"blob"})
    )
    expected: dict[str, Any] = dict(GOOD)
    assert (config.precision, config.inference_precision, config.openvino, config.shapes, blob) == (
        *expected.values(),
        b"blob",
    )


def test_importing_the_operator_cli_server_and_engine_module_does_not_load_openvino() -> None:
    code = (
        "import sys, edgemodel_operator.main, edgemodel_runtime.cli, edgemodel_runtime.serve.model, "
        "edgemodel_runtime.build.pipeline, edgemodel_runtime.engines.openvino_engine; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'openvino'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == "[]"
