"""Model inputs: their specs, seeded synthetic samples, and .npz sample sets.

An .npz sample set maps each input name to an array in one of three layouts, where S is the input's
shape once dynamic dimensions are fixed (to 1, or by `--input`):

- one sample: exactly S;
- samples stacked on a new first axis: [N, *S];
- samples stacked along the batch axis: [N, *S[1:]], when the model's first dimension is dynamic
  (or 1) and fixed to 1, as ONNX Runtime's quantisation tools take calibration data; each sample is
  then [1, *S[1:]];
- one key per sample, `<input>_0` ... `<input>_<N-1>` (numpy's `arr_0` ... from
  `np.savez(path, *samples)` for a model with one input), each S (or S without its size-1 batch axis);
  used when no key is named after an input.

All inputs use the same layout and hold the same N. Expected outputs, when present, are stored under
`expected.<output name>` in the same layout as the inputs (`expected.<output>_<i>` for per-sample
keys). Anything else is refused with the shapes found and the layouts accepted.
"""

from __future__ import annotations

import math
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


def _input_dtype(name: str, ort_type: str) -> np.dtype[Any]:
    """The numpy dtype of an input the server carries and the build can synthesise samples for."""
    from edgemodel_runtime.build.modelcheck import carried_types
    from edgemodel_runtime.serve.protocol import DATATYPES

    datatype = carried_types().get(ort_type)
    if datatype is None:
        raise BadInputError(f"model input {name!r} has unsupported type {ort_type}", reason="UnsupportedModel")
    dtype = DATATYPES[datatype]
    if dtype == np.dtype(object):
        raise BadInputError(
            f"model input {name!r} is {ort_type}: the build cannot synthesise or validate such inputs",
            reason="UnsupportedModel",
        )
    return dtype


@dataclass(frozen=True)
class TensorInfo:
    """One model input: name, concrete shape, numpy dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    declared: tuple[int | str | None, ...] | None = None  # the model's dims; None when not known
    overridden: bool = False  # whether --input fixed the shape

    def dynamic_axes(self) -> list[int]:
        """Axes the model leaves dynamic (a symbolic name, None, or a negative number; 0 is a static size)."""
        if self.declared is None:
            return []
        return [axis for axis, dim in enumerate(self.declared) if not (isinstance(dim, int) and dim >= 0)]

    def batch_splittable(self) -> bool:
        """Whether samples may be stacked along the first axis: it is dynamic or 1, and fixed to 1."""
        if not self.shape or self.shape[0] != 1:
            return False
        return self.declared is None or 0 in self.dynamic_axes() or self.declared[0] == 1


MAX_INPUT_BYTES = 1 << 30  # one input of one sample; a larger declared shape is refused, not allocated


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

    A dynamic dimension the model names (a dim_param such as "batch"; not a placeholder such as "?") is one
    dimension wherever it appears:
    fixed by --input in one input, it takes that value in every input that names it (two different values
    are refused). Dynamic dimensions fixed neither way become 1.
    """
    names = {name for name, _, _ in declared}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise BadInputError(
            f"--input names {unknown} are not inputs of the model (it has {sorted(names)})", reason="InvalidOption"
        )
    named = _named_dims(declared, overrides)
    infos = []
    for name, dims, ort_type in declared:
        dtype = _input_dtype(name, ort_type)
        if name in overrides:
            shape = overrides[name]
            if len(shape) != len(dims) or any(
                isinstance(d, int) and d >= 0 and d != s for d, s in zip(dims, shape, strict=True)
            ):
                raise BadInputError(
                    f"--input {name}={'x'.join(map(str, shape))} does not fit the model's shape {list(dims)}",
                    reason="InvalidOption",
                )
        else:
            shape = tuple(d if isinstance(d, int) and d >= 0 else named.get(d, (1, ""))[0] for d in dims)
        fixed_by_flag = name in overrides or any(d in named for d in dims)
        info = TensorInfo(name, shape, dtype, tuple(dims), fixed_by_flag)
        size = math.prod(shape) * info.dtype.itemsize
        if size > MAX_INPUT_BYTES:
            raise BadInputError(
                f"input {name!r} at shape {list(shape)} takes {size} bytes per sample, more than the "
                f"{MAX_INPUT_BYTES} the build allocates; fix its dynamic dimensions with --input "
                f"(spec.inputs) to a realistic size{fixed_dims_hint([info])}",
                reason="InputTooLarge",
            )
        infos.append(info)
    return infos


IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]*")  # a dim_param that names a dimension


def _named_dims(
    declared: Sequence[tuple[str, Sequence[int | str | None], str]], overrides: Mapping[str, tuple[int, ...]]
) -> dict[int | str | None, tuple[int, str]]:
    """Named dynamic dimensions fixed by --input: name -> (value, the flag that fixed it)."""
    named: dict[int | str | None, tuple[int, str]] = {}
    for name, dims, _ in declared:
        shape = overrides.get(name)
        if shape is None or len(shape) != len(dims):
            continue  # not fixed here, or refused by resolve_inputs for its rank
        flag = f"--input {name}={'x'.join(map(str, shape))}"
        for dim, value in zip(dims, shape, strict=True):
            if not isinstance(dim, str) or not IDENTIFIER.fullmatch(dim):
                continue  # unnamed, or a converter's placeholder for "unknown" ("?", "-1"): not one dimension
            if dim in named and named[dim][0] != value:
                raise BadInputError(
                    f"dimension {dim!r} is {named[dim][0]} in {named[dim][1]} but {value} in {flag}: the model "
                    "names it in more than one place, so they must agree",
                    reason="InvalidOption",
                )
            named.setdefault(dim, (value, flag))
    return named


def fixed_dims_hint(inputs: Sequence[TensorInfo]) -> str:
    """A sentence naming the dynamic dimensions and the values they were fixed to ("" when none)."""
    parts = []
    for info in inputs:
        for axis in info.dynamic_axes():
            dim = info.declared[axis] if info.declared is not None else None
            label = f" ({dim!r})" if isinstance(dim, str) and dim else ""
            how = "by --input" if info.overridden else "by default"
            parts.append(f"{info.name} dim {axis}{label} = {info.shape[axis]} {how}")
    if not parts:
        return ""
    flags = " ".join(f"--input {i.name}={'x'.join(map(str, i.shape))}" for i in inputs if i.dynamic_axes())
    return (
        f"; the model's dynamic dimensions were fixed to {', '.join(parts)}: if the model needs other sizes, "
        f"fix them with --input NAME=DIMxDIM (now {flags}), or spec.inputs in the EdgeModel"
    )


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


Layout = str  # "one", "stacked" or "batched"


def _layout(array: npt.NDArray[Any], info: TensorInfo) -> tuple[Layout, int] | None:
    """How an array holds samples of `info`, and how many; None when it fits no accepted layout."""
    if array.shape == info.shape:
        return "one", 1
    if array.ndim == len(info.shape) + 1 and array.shape[1:] == info.shape:
        return "stacked", array.shape[0]
    if info.batch_splittable() and array.ndim == len(info.shape) and array.shape[1:] == info.shape[1:]:
        return "batched", array.shape[0]
    return None


def _accepted(info: TensorInfo) -> str:
    shape = list(info.shape)
    text = f"{info.name}: one sample {shape} or [N, {', '.join(map(str, shape))}] stacked on a new first axis"
    if info.batch_splittable():
        text += f" or [N, {', '.join(map(str, shape[1:]))}] stacked along the batch axis"
    return text + f" or one key per sample {info.name}_0, {info.name}_1, ... each {shape}"


_PER_SAMPLE = re.compile(r"^(?P<name>.+)_(?P<index>\d+)$")
_FOUND_SHOWN = 12  # keys listed in a refusal; a set with thousands of per-sample keys would drown the message


def _refuse(
    path: Path, problem: str, arrays: Mapping[str, npt.NDArray[Any]], inputs: Sequence[TensorInfo]
) -> BadInputError:
    found = ", ".join(f"{key} {list(value.shape)} {value.dtype}" for key, value in list(arrays.items())[:_FOUND_SHOWN])
    if len(arrays) > _FOUND_SHOWN:
        found += f" and {len(arrays) - _FOUND_SHOWN} more"
    accepted = "; ".join(_accepted(info) for info in inputs)
    return BadInputError(
        f"{path}: {problem}. Found: {found or 'no arrays'}. Accepted layouts, one for all inputs, with the same "
        f"N: {accepted}{fixed_dims_hint(inputs)}",
        reason="InvalidSampleSet",
    )


def _take(array: npt.NDArray[Any], layout: Layout, index: int) -> npt.NDArray[Any]:
    if layout == "one":
        return np.asarray(array)
    if layout == "stacked":
        return np.asarray(array[index])
    return np.asarray(array[index : index + 1])


def load_samples(
    path: Path, inputs: Sequence[TensorInfo], label: str | None = None
) -> tuple[list[Sample], list[Sample] | None]:
    """Input samples (and expected outputs, if stored) from an .npz file in one of the module's layouts.

    `label` names the file in messages (the user's URI or path rather than a scratch copy). Raises
    BadInputError (`InvalidSampleSet`) naming the shapes found and the layouts accepted.
    """
    where = Path(label) if label else path
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise BadInputError(f"{where}: not a readable .npz file: {error}", reason="InvalidSampleSet") from error
    if not any(info.name in arrays for info in inputs):
        return _load_per_sample(where, arrays, inputs)
    missing = [info.name for info in inputs if info.name not in arrays]
    if missing:
        raise _refuse(where, f"no arrays for model inputs {missing}", arrays, inputs)
    layouts: dict[str, tuple[Layout, int]] = {}
    for info in inputs:
        array = arrays[info.name]
        if array.dtype != info.dtype:
            raise _refuse(where, f"{info.name} is {array.dtype}, the model wants {info.dtype}", arrays, inputs)
        found = _layout(array, info)
        if found is None:
            raise _refuse(where, f"{info.name} has shape {list(array.shape)}, which fits no layout", arrays, inputs)
        layouts[info.name] = found
    kinds = {layout for layout, _ in layouts.values()} - {"one"}
    counts = {count for _, count in layouts.values()}
    if counts == {0}:
        raise _refuse(where, "the inputs hold no samples", arrays, inputs)
    if len(kinds) > 1 or len(counts) != 1:
        described = ", ".join(f"{name} {layout} N={count}" for name, (layout, count) in layouts.items())
        raise _refuse(where, f"inputs disagree on layout or sample count ({described})", arrays, inputs)
    layout, count = kinds.pop() if kinds else "one", counts.pop()
    samples = [{info.name: _take(arrays[info.name], layouts[info.name][0], i) for info in inputs} for i in range(count)]
    expected_keys = [key for key in arrays if key.startswith(EXPECTED_PREFIX)]
    expected = None
    if expected_keys:
        short = [
            key for key in expected_keys if layout != "one" and (arrays[key].ndim == 0 or arrays[key].shape[0] != count)
        ]
        if short:
            raise _refuse(
                where, f"expected outputs {short} do not hold the {count} samples of the inputs", arrays, inputs
            )
        expected = [
            {key[len(EXPECTED_PREFIX) :]: _take(arrays[key], layout, i) for key in expected_keys} for i in range(count)
        ]
    return samples, expected


def _indexed(arrays: Mapping[str, npt.NDArray[Any]], name: str) -> dict[int, str]:
    """Keys `<name>_<index>`, by index."""
    found = {}
    for key in arrays:
        match = _PER_SAMPLE.match(key)
        if match and match.group("name") == name:
            found[int(match.group("index"))] = key
    return found


def _load_per_sample(
    where: Path, arrays: Mapping[str, npt.NDArray[Any]], inputs: Sequence[TensorInfo]
) -> tuple[list[Sample], list[Sample] | None]:
    """One key per sample and input, `<input>_<i>` (numpy's `arr_<i>` from np.savez(path, *samples) for a
    model with one input); expected outputs as `expected.<output>_<i>`."""
    keys = {info.name: _indexed(arrays, info.name) for info in inputs}
    if len(inputs) == 1 and not keys[inputs[0].name]:
        keys[inputs[0].name] = _indexed(arrays, "arr")
    missing = [name for name, indexed in keys.items() if not indexed]
    if missing:
        raise _refuse(where, f"no arrays for model inputs {missing}", arrays, inputs)
    count = len(next(iter(keys.values())))
    if any(sorted(indexed) != list(range(count)) for indexed in keys.values()):
        numbered = ", ".join(f"{name} {sorted(indexed)[:8]}" for name, indexed in keys.items())
        raise _refuse(
            where, f"per-sample keys must be numbered 0..N-1 for every input (found {numbered})", arrays, inputs
        )
    samples: list[Sample] = [{} for _ in range(count)]
    for info in inputs:
        for index, key in keys[info.name].items():
            array = arrays[key]
            if array.dtype != info.dtype:
                raise _refuse(where, f"{key} is {array.dtype}, the model wants {info.dtype}", arrays, inputs)
            if info.batch_splittable() and array.shape == info.shape[1:]:
                array = array[np.newaxis]
            if array.shape != info.shape:
                raise _refuse(where, f"{key} has shape {list(array.shape)}, not one sample", arrays, inputs)
            samples[index][info.name] = np.asarray(array)
    expected_keys = [key for key in arrays if key.startswith(EXPECTED_PREFIX)]
    if not expected_keys:
        return samples, None
    outputs: dict[str, dict[int, str]] = {}
    for key in expected_keys:
        match = _PER_SAMPLE.match(key[len(EXPECTED_PREFIX) :])
        if match is None:
            raise _refuse(where, f"{key} is not numbered like the per-sample inputs", arrays, inputs)
        outputs.setdefault(match.group("name"), {})[int(match.group("index"))] = key
    if any(sorted(indexed) != list(range(count)) for indexed in outputs.values()):
        raise _refuse(where, f"expected outputs do not hold the {count} samples of the inputs", arrays, inputs)
    expected = [{name: np.asarray(arrays[indexed[i]]) for name, indexed in outputs.items()} for i in range(count)]
    return samples, expected


def save_samples(path: Path, samples: Sequence[Sample], expected: Sequence[Sample] | None = None) -> None:
    """Write samples (and expected outputs) in the .npz layout `load_samples` reads."""
    arrays = {name: np.stack([s[name] for s in samples]) for name in samples[0]}
    if expected:
        arrays |= {EXPECTED_PREFIX + name: np.stack([e[name] for e in expected]) for name in expected[0]}
    with path.open("wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]


def check_expected_names(expected: Sequence[Sample] | None, outputs: Sequence[str]) -> None:
    """Refuse expected outputs stored under a name the model has no output of (InvalidSampleSet)."""
    unknown = sorted({name for sample in expected or [] for name in sample} - set(outputs))
    if unknown:
        raise BadInputError(
            f"--reference: expected outputs {unknown} name no output of the model (its outputs: {sorted(outputs)}); "
            f"store them as {EXPECTED_PREFIX}<output name>",
            reason="InvalidSampleSet",
        )
