"""The `edgemodel` command dispatches to runtime and operator subcommands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edgemodel_operator.api.generate import render_crd, render_reference

EDGEMODEL = str(Path(sys.executable).parent / "edgemodel")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGEMODEL, *args], capture_output=True, text=True, timeout=60, check=False)


def test_crd_command_prints_the_generated_crd() -> None:
    result = _run("crd")
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_crd()


def test_reference_command_prints_the_field_reference() -> None:
    result = _run("reference")
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_reference()


def test_help_lists_commands_from_both_layers() -> None:
    result = _run("--help")
    assert result.returncode == 0
    for command in ("crd", "reference", "version"):
        assert f"  {command}\n" in result.stdout


def test_unknown_command_is_refused_with_usage() -> None:
    result = _run("frobnicate")
    assert result.returncode == 2
    assert "unknown command 'frobnicate'" in result.stderr
    assert "usage: edgemodel" in result.stderr


def test_no_command_prints_usage_and_fails() -> None:
    result = _run()
    assert result.returncode == 2
    assert "usage: edgemodel" in result.stdout
