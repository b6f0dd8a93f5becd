"""Model inputs: their specs, seeded synthetic samples, and .npz sample sets.

An .npz sample set maps each input name to an array of shape [N, *input_shape] (N samples) or
exactly input_shape (one sample). Expected outputs, when present, are stored under
`expected.<output name>` with the same leading sample dimension.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgemodel_runtime.build.errors import BadInputError

Sample = dict[str, npt.NDArray[Any]]
EXPECTED_PREFIX = "expected."

_ORT_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class TensorInfo:
    """One model input: name, concrete shape, numpy dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]


def parse_shape_override(text: str) -> tuple[str, tuple[int, ...]]:
    """`NAME=1x3x480x640` to (name, shape)."""
    match = re.fullmatch(r"(\S+?)=(\d+(?:x\d+)*)", text)
    if not match:
        raise BadInputError(f"--input {text!r}: expected NAME=DIMxDIM..., e.g. x=1x3x224x224", reason="InvalidOption")
    shape = tuple(int(d) for d in match.group(2).split("x"))
    if any(d < 1 for d in shape):
        raise BadInputError(f"--input {text!r}: every dimension must be at least 1", reason="InvalidOption")
    return match.group(1), shape


def resolve_inputs(
    declared: Sequence[tuple[str, Sequence[int | str | None], str]], overrides: Mapping[str, tuple[int, ...]]
) -> list[TensorInfo]:
    """Concrete input specs from the model's declared inputs (name, dims, ORT type) and overrides.

    Dynamic dimensions without an override become 1.
    """
    names = {name for name, _, _ in declared}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise BadInputError(
            f"--input names {unknown} are not inputs of the model (it has {sorted(names)})", reason="InvalidOption"
        )
    infos = []
    for name, dims, ort_type in declared:
        if ort_type not in _ORT_TYPES:
            raise BadInputError(f"model input {name!r} has unsupported type {ort_type}", reason="UnsupportedModel")
        if name in overrides:
            shape = overrides[name]
            if len(shape) != len(dims) or any(
                isinstance(d, int) and d > 0 and d != s for d, s in zip(dims, shape, strict=True)
            ):
                raise BadInputError(
                    f"--input {name}={'x'.join(map(str, shape))} does not fit the model's shape {list(dims)}",
                    reason="InvalidOption",
                )
        else:
            shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in dims)
        infos.append(TensorInfo(name, shape, np.dtype(_ORT_TYPES[ort_type])))
    return infos


def seeded_samples(inputs: Sequence[TensorInfo], count: int, seed: int) -> list[Sample]:
    """`count` reproducible samples: floats uniform in [0, 1), integers in [0, 10), random booleans."""
    generator = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        sample: Sample = {}
        for info in inputs:
            if np.issubdtype(info.dtype, np.floating):
                sample[info.name] = np.asarray(generator.random(info.shape, dtype=np.float32), dtype=info.dtype)
            elif info.dtype == np.bool_:
                sample[info.name] = np.asarray(generator.random(info.shape) < 0.5)
            else:
                sample[info.name] = np.asarray(generator.integers(0, 10, info.shape), dtype=info.dtype)
        samples.append(sample)
    return samples


def load_samples(path: Path, inputs: Sequence[TensorInfo]) -> tuple[list[Sample], list[Sample] | None]:
    """Input samples (and expected outputs, if stored) from an .npz file, checked against the inputs."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise BadInputError(f"{path}: not a readable .npz file: {error}", reason="InvalidSampleSet") from error
    missing = [info.name for info in inputs if info.name not in arrays]
    if missing:
        raise BadInputError(f"{path}: no arrays for model inputs {missing}", reason="InvalidSampleSet")
    counts = set()
    batched: dict[str, npt.NDArray[Any]] = {}
    for info in inputs:
        array = arrays[info.name]
        if array.shape == info.shape:
            array = array[np.newaxis]
        if array.shape[1:] != info.shape:
            raise BadInputError(
                f"{path}: {info.name} has shape {list(array.shape)}; expected {list(info.shape)} "
                f"or [N, {', '.join(map(str, info.shape))}]",
                reason="InvalidSampleSet",
            )
        if array.dtype != info.dtype:
            raise BadInputError(
                f"{path}: {info.name} is {array.dtype}, the model wants {info.dtype}", reason="InvalidSampleSet"
            )
        batched[info.name] = array
        counts.add(array.shape[0])
    if len(counts) != 1 or 0 in counts:
        raise BadInputError(
            f"{path}: inputs hold different or zero sample counts {sorted(counts)}", reason="InvalidSampleSet"
        )
    count = counts.pop()
    samples = [{name: np.asarray(array[i]) for name, array in batched.items()} for i in range(count)]
    expected_keys = [key for key in arrays if key.startswith(EXPECTED_PREFIX)]
    expected = None
    if expected_keys:
        expected = [
            {key[len(EXPECTED_PREFIX) :]: np.asarray(arrays[key][i]) for key in expected_keys} for i in range(count)
        ]
    return samples, expected


def save_samples(path: Path, samples: Sequence[Sample], expected: Sequence[Sample] | None = None) -> None:
    """Write samples (and expected outputs) in the .npz layout `load_samples` reads."""
    arrays = {name: np.stack([s[name] for s in samples]) for name in samples[0]}
    if expected:
        arrays |= {EXPECTED_PREFIX + name: np.stack([e[name] for e in expected]) for name in expected[0]}
    with path.open("wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
