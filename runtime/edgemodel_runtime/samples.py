"""Realistic inputs for the packaged models: rendered text for the OCR models, speech-like audio for VAD.

Random noise (or flat blocks) make a text detector's output near zero everywhere and a voice detector's
near zero always, which hides quantisation damage: every metric on such outputs is noise. So pages and
text lines here are rendered from glyph-like pen strokes (bars, diagonals and bowls, anti-aliased, in
words and lines on slightly textured paper; the PP-OCR detector finds text on about a sixth of a page's
pixels), and audio is a voiced source (a glottal pulse train with a moving pitch) through three formant
resonators with a syllabic envelope, beside windows of silence. Only numpy is used.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

_DET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
_DET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)
VAD_RATE = 16000
VAD_WINDOW = 512
VAD_CONTEXT = 64
"""Silero VAD (v5) at 16 kHz takes each 512-sample window with the 64 samples before it: 576 samples."""

# Pen strokes in glyph-cell units: x across the cell, y down from the top of the x-height (ascenders < 0,
# descenders > 1).
_STROKES = (
    ((0.15, 0.0), (0.15, 1.0)),
    ((0.85, 0.0), (0.85, 1.0)),
    ((0.5, 0.0), (0.5, 1.0)),
    ((0.15, 0.0), (0.85, 0.0)),
    ((0.15, 0.5), (0.85, 0.5)),
    ((0.15, 1.0), (0.85, 1.0)),
    ((0.15, 1.0), (0.85, 0.0)),
    ((0.15, 0.0), (0.85, 1.0)),
    ((0.15, -0.45), (0.15, 1.0)),
    ((0.85, 0.0), (0.85, 1.4)),
    ((0.5, 0.0), (0.15, 1.0)),
    ((0.5, 0.0), (0.85, 1.0)),
)
Array = npt.NDArray[np.float32]


def _segment_distance(px: Array, py: Array, a: tuple[float, float], b: tuple[float, float]) -> Array:
    (ax, ay), (bx, by) = a, b
    dx, dy = bx - ax, by - ay
    t = np.clip(((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy), 0, 1)
    return np.hypot(px - (ax + t * dx), py - (ay + t * dy)).astype(np.float32)


def _glyph(ink: Array, rng: np.random.Generator, x: float, top: float, size: tuple[float, float, float]) -> None:
    """Draw one glyph of 2-3 strokes (and sometimes a bowl) with its cell's left edge at x, into `ink`."""
    width, height, pen = size
    rows, cols = ink.shape
    y0, y1 = max(0, int(top - 0.6 * height)), min(rows, int(top + 1.6 * height) + 1)
    x0, x1 = max(0, int(x - pen)), min(cols, int(x + width + pen) + 1)
    if y1 <= y0 or x1 <= x0:
        return
    py, px = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    distance = np.full(px.shape, np.inf, np.float32)
    for index in rng.choice(len(_STROKES), int(rng.integers(2, 4)), replace=False):
        (ax, ay), (bx, by) = _STROKES[int(index)]
        start, end = (x + ax * width, top + ay * height), (x + bx * width, top + by * height)
        distance = np.minimum(distance, _segment_distance(px, py, start, end))
    if rng.random() < 0.4:  # a bowl, as in o, a, e, b, d
        u, v = (px - x) / width, (py - top) / height
        ring = np.abs(np.hypot((u - 0.5) / 0.38, (v - 0.55) / 0.45) - 1) * min(0.38 * width, 0.45 * height)
        distance = np.minimum(distance, ring.astype(np.float32))
    coverage = np.clip(pen / 2 + 0.5 - distance, 0, 1)  # anti-aliased edge one pixel wide
    ink[y0:y1, x0:x1] = np.maximum(ink[y0:y1, x0:x1], coverage)


def _line(ink: Array, rng: np.random.Generator, top: float, span: tuple[float, float], height: float) -> None:
    """Words of 2-8 glyphs from span[0] to span[1], x-height `height` pixels, top of the x-height at `top`."""
    left, right = span
    cell = height * 0.75
    pen = max(1.0, height * rng.uniform(0.12, 0.2))
    x = left
    while x < right - cell:
        for _ in range(int(rng.integers(2, 9))):
            width = cell * rng.uniform(0.7, 1.2)
            if x + width > right:
                break
            _glyph(ink, rng, x, top, (width, height, pen))
            x += width + pen * rng.uniform(0.8, 1.6)
        x += cell * rng.uniform(0.6, 1.2)


def _paper(rng: np.random.Generator, height: int, width: int, ink: Array) -> Array:
    """Ink on slightly textured paper, values in [0, 1], shape [1, 3, H, W]."""
    paper = np.full((height, width), 0.9 + 0.06 * rng.random(), np.float32)
    paper += rng.normal(0, 0.015, (height, width)).astype(np.float32)
    gray = paper * (1 - ink * rng.uniform(0.75, 0.95))
    return np.asarray(np.clip(np.stack([gray, gray * 0.98, gray * 1.01]), 0, 1)[np.newaxis], dtype=np.float32)


def page(rng: np.random.Generator, height: int, width: int) -> Array:
    """A page of rendered text lines, values in [0, 1], shape [1, 3, H, W]."""
    ink = np.zeros((height, width), np.float32)
    x_height = max(5.0, height / rng.uniform(28, 40))
    pitch = x_height * rng.uniform(2.4, 3.2)
    top = pitch * 0.8
    while top < height - 2 * x_height:
        span = (rng.uniform(0.03, 0.12) * width, rng.uniform(0.55, 0.97) * width)
        _line(ink, rng, top, span, x_height)
        top += pitch
    return _paper(rng, height, width, ink)


def text_line(rng: np.random.Generator, height: int, width: int) -> Array:
    """One cropped line of rendered text, as the recogniser and direction classifier get it: [1, 3, H, W]."""
    ink = np.zeros((height, width), np.float32)
    x_height = height * rng.uniform(0.3, 0.42)
    top = (height - x_height) / 2 + rng.uniform(-1, 1)
    _line(ink, rng, top, (rng.uniform(1, 6), width * rng.uniform(0.6, 1.0)), x_height)
    return _paper(rng, height, width, ink)


def detector_inputs(count: int, height: int = 480, width: int = 640, seed: int = 0) -> list[dict[str, Any]]:
    """Rendered pages normalised as PP-OCR's detector expects, under its input name `x`."""
    rng = np.random.default_rng(seed)
    return [{"x": ((page(rng, height, width) - _DET_MEAN) / _DET_STD).astype(np.float32)} for _ in range(count)]


def line_inputs(
    count: int, height: int = 48, width: int = 320, seed: int = 0, upside_down: float = 0.0
) -> list[dict[str, Any]]:
    """Rendered text lines normalised to [-1, 1] for the recogniser and the direction classifier; a share
    `upside_down` of them turned by 180 degrees (what the direction classifier is there to find)."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(count):
        line = text_line(rng, height, width)
        if rng.random() < upside_down:
            line = line[:, :, ::-1, ::-1].copy()
        lines.append({"x": ((line - 0.5) / 0.5).astype(np.float32)})
    return lines


def _resonator(source: npt.NDArray[np.float64], frequency: float, bandwidth: float) -> npt.NDArray[np.float64]:
    """A two-pole resonance (one formant) applied to `source`, unit gain at its peak."""
    radius = np.exp(-np.pi * bandwidth / VAD_RATE)
    a1, a2 = 2 * radius * np.cos(2 * np.pi * frequency / VAD_RATE), -radius * radius
    out = np.zeros_like(source)
    previous = before = 0.0
    for i, value in enumerate(source):
        current = value + a1 * previous + a2 * before
        out[i], before, previous = current, previous, current
    return np.asarray(out * (1 - radius), dtype=np.float64)


def speech(rng: np.random.Generator, samples: int, lead: int = 1024) -> npt.NDArray[np.float32]:
    """`samples` of a voiced, vowel-like sound at 16 kHz, peak 0.3, with a syllabic envelope and a little noise."""
    total = samples + lead  # the resonators settle during the lead, which is cut off
    t = np.arange(total) / VAD_RATE
    pitch = rng.uniform(90, 240) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(2, 6) * t + rng.uniform(0, 6)))
    pulses = np.maximum(0, np.sin(np.cumsum(2 * np.pi * pitch / VAD_RATE))) ** 8
    source = np.diff(pulses, prepend=0) + 0.02 * rng.normal(size=total)
    formants = (
        (rng.uniform(300, 850), 80, 1.0),
        (rng.uniform(850, 2300), 100, 0.6),
        (rng.uniform(2300, 3200), 150, 0.3),
    )
    voiced = sum(gain * _resonator(source, f, bw) for f, bw, gain in formants)
    envelope = np.clip(np.sin(np.pi * (t * rng.uniform(3, 6) + rng.uniform(0, 1))), 0.15, 1)
    audio = np.asarray(voiced * envelope)[lead:]
    audio = 0.3 * audio / (np.abs(audio).max() + 1e-9) + rng.normal(0, 0.003, samples)
    return np.asarray(audio, dtype=np.float32)


def vad_inputs(count: int, seed: int = 0, silence: float = 0.25) -> list[dict[str, Any]]:
    """Windows for Silero VAD at 16 kHz: 576 samples (512 and the 64 before them), speech-like or, for a share
    `silence` of them, quiet room noise; with the model's zero state and its sample rate."""
    rng = np.random.default_rng(seed)
    length = VAD_WINDOW + VAD_CONTEXT
    windows = []
    for _ in range(count):
        quiet = rng.random() < silence
        audio = rng.normal(0, 0.003, length).astype(np.float32) if quiet else speech(rng, length)
        windows.append(
            {"input": audio[np.newaxis], "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(VAD_RATE, np.int64)}
        )
    return windows
