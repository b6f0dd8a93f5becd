"""ruff, mypy --strict and the import-linter layer contracts, run as part of the tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

CHECKS = {
    "ruff check": [str(BIN / "ruff"), "check", "--output-format", "concise", "."],
    "ruff format": [str(BIN / "ruff"), "format", "--check", "."],
    "mypy --strict": [str(BIN / "mypy")],
    "import-linter": [str(BIN / "lint-imports")],
}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_static_check_passes(name: str) -> None:
    result = subprocess.run(CHECKS[name], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
