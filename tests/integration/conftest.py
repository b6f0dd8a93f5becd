"""Fixtures shared by the integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import onnx_models


@pytest.fixture(scope="session")
def classifiers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three tiny classifiers with the same inputs and outputs: `same` answers as `stable` does, `different` not."""
    directory = tmp_path_factory.mktemp("classifiers")
    return {
        "stable": onnx_models.tiny_classifier(directory / "stable.onnx", seed=0),
        "same": onnx_models.tiny_classifier(directory / "same.onnx", seed=0),
        "different": onnx_models.tiny_classifier(directory / "different.onnx", seed=1),
    }
