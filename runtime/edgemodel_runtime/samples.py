"""Realistic inputs for the OCR models: synthetic pages and text lines, normalised as PP-OCR does.

Random noise makes a text detector's output near zero everywhere, which hides quantisation
damage; dark strokes on a light page give it something to find.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

_DET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
_DET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)


def _page(rng: np.random.Generator, height: int, width: int) -> npt.NDArray[np.float32]:
    """A light page with lines of dark glyph-like blocks, values in [0, 1], shape [1, 3, H, W]."""
    page = np.full((height, width), 0.92, dtype=np.float32) + rng.normal(0, 0.02, (height, width)).astype(np.float32)
    line_height = max(6, height // 12)
    for top in range(line_height // 2, height - line_height, line_height * 2):
        left = int(rng.integers(2, max(3, width // 10)))
        while left < width - 8:
            glyph = int(rng.integers(3, max(4, line_height)))
            page[top : top + line_height, left : left + glyph] = rng.uniform(0.05, 0.3)
            left += glyph + int(rng.integers(1, max(2, line_height // 2)))
            if rng.random() < 0.1:
                left += line_height * 2
    rgb = np.clip(np.stack([page, page * 0.98, page * 1.01]), 0, 1)
    return rgb[np.newaxis].astype(np.float32)


def detector_inputs(count: int, height: int = 480, width: int = 640, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"x": ((_page(rng, height, width) - _DET_MEAN) / _DET_STD).astype(np.float32)} for _ in range(count)]


def line_inputs(count: int, height: int = 48, width: int = 320, seed: int = 0) -> list[dict[str, Any]]:
    """Text-line crops for the recogniser and the direction classifier, normalised to [-1, 1]."""
    rng = np.random.default_rng(seed)
    return [{"x": ((_page(rng, height, width) - 0.5) / 0.5).astype(np.float32)} for _ in range(count)]


def vad_inputs(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """512-sample windows of 16 kHz audio: a voiced harmonic tone with noise, and the model's state."""
    rng = np.random.default_rng(seed)
    t = np.arange(512, dtype=np.float32) / 16000
    samples = []
    for _ in range(count):
        pitch = rng.uniform(90, 250)
        voice = sum(np.sin(2 * np.pi * pitch * k * t) / k for k in range(1, 6))
        audio = (0.3 * voice + rng.normal(0, 0.02, 512)).astype(np.float32)[np.newaxis]
        samples.append({"input": audio, "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)})
    return samples
