"""The one model interface the server uses, and where its engine comes from.

An artifact is a directory written by `edgemodel build` (report.json + model.onnx, model.plan
or model.openvino, and the model's side files for ONNX engines above 2 GiB), a single model
file, or `oci://registry/repo@sha256:...`. Every file a report lists is verified against the
report's digest before anything loads it, and a model may read no side file that its report
does not list.

Every failure to fetch or load an engine is an ArtifactError with a reason and an exit code:
2 when the artifact cannot be served as it is (retrying will not help), 4 when something around
it failed (the registry, the disk), as `edgemodel build`'s exit codes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from edgemodel_runtime.digests import sha256_file
from edgemodel_runtime.serve.protocol import (
    DATATYPES,
    MAX_DIMS,
    NUMPY_TO_DATATYPE,
    ORT_TYPES,
    ProtocolError,
    TensorMetadata,
)

BAD_ARTIFACT = 2  # exit code: the artifact cannot be served as it is
INFRASTRUCTURE = 4  # exit code: the registry or the disk failed; retrying may help


class ArtifactError(Exception):
    """The artifact cannot be served: missing, tampered with, or of an unknown kind; or it could not be fetched.

    `reason` is a CamelCase word (as the build's reasons), `exit_code` BAD_ARTIFACT or INFRASTRUCTURE.
    """

    def __init__(self, message: str, reason: str = "InvalidArtifact", exit_code: int = BAD_ARTIFACT) -> None:
        super().__init__(message)
        self.reason = reason
        self.exit_code = exit_code


class Model(Protocol):
    """What the server needs from an engine."""

    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    platform: str

    def predict(self, inputs: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]: ...

    def warm_up(self) -> None: ...


def zeros_like_inputs(specs: list[TensorMetadata]) -> dict[str, npt.NDArray[Any]]:
    """Zeros (empty strings for BYTES) for every input, dynamic dimensions set to 1."""
    arrays = {}
    for spec in specs:
        shape = [d if d >= 0 else 1 for d in spec.shape]
        dtype = DATATYPES[spec.datatype]
        arrays[spec.name] = np.full(shape, b"", dtype=object) if dtype.kind == "O" else np.zeros(shape, dtype=dtype)
    return arrays


def _dims(shape: list[Any]) -> tuple[int, ...]:
    """Declared dimensions; -1 for a dynamic one (a name or None), 0 kept as a zero-size dimension."""
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


def _to_onnx_runtime(name: str, array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """BYTES elements as the str ONNX Runtime takes for string tensors (it would turn bytes into "b'...'")."""
    if array.dtype != object:
        return array
    texts = np.empty(array.size, dtype=object)
    for index, value in enumerate(array.ravel()):
        try:
            texts[index] = bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            raise ProtocolError(
                f"input {name!r} element {index} is not UTF-8 text, and ONNX Runtime string tensors hold only "
                f"UTF-8 text: {error}"
            ) from error
    return texts.reshape(array.shape)


def _from_onnx_runtime(array: Any) -> npt.NDArray[Any]:
    """ONNX Runtime's string outputs (str) as BYTES elements (bytes); other arrays as they are."""
    value = np.asarray(array)
    if value.dtype != object:
        return value
    return np.array([v.encode("utf-8") for v in value.ravel()], dtype=object).reshape(value.shape)


def _refuse_unknown_rank(path: Path, names: set[str]) -> None:
    """ONNX Runtime reports an input of unknown rank as a scalar ([]); the graph says which it is.

    Raises ArtifactError for an input that declares no shape at all: requests could not be checked
    against it, and its metadata could not say what to send.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    for node in graph.input:
        if node.name in names and not node.type.tensor_type.HasField("shape"):
            raise ArtifactError(
                f"input {node.name!r} declares no shape (any rank), which this server cannot describe or check; "
                "give it one (for example with onnx.shape_inference or by setting its dimensions)",
                reason="UnsupportedModel",
            )


class OnnxRuntimeModel:
    """An ONNX model on ONNX Runtime, with the best execution provider this machine has (the CPU's only
    with `cpu_only`, as for the fallback, which must run wherever the engine could not)."""

    platform = "onnxruntime_onnx"

    def __init__(self, path: Path, threads: int | None = None, *, cpu_only: bool = False) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        preferred = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        if cpu_only:
            preferred = ["CPUExecutionProvider"]
        providers = [p for p in preferred if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as error:
            raise ArtifactError(f"{path}: onnxruntime cannot load it: {error}", reason="InvalidModel") from error
        self.inputs = [self._metadata(i) for i in self.session.get_inputs()]
        self.outputs = [self._metadata(o) for o in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]
        if any(not spec.shape for spec in self.inputs):
            _refuse_unknown_rank(path, {spec.name for spec in self.inputs if not spec.shape})

    @staticmethod
    def _metadata(node: Any) -> TensorMetadata:
        if node.type not in ORT_TYPES:
            raise ArtifactError(
                f"tensor {node.name!r} has type {node.type}, which this server does not carry "
                f"(it carries {sorted(ORT_TYPES)})",
                reason="UnsupportedModel",
            )
        if len(node.shape) > MAX_DIMS:
            raise ArtifactError(
                f"tensor {node.name!r} has {len(node.shape)} dimensions; {MAX_DIMS} is the most",
                reason="UnsupportedModel",
            )
        return TensorMetadata(node.name, ORT_TYPES[node.type], _dims(node.shape))

    def predict(self, inputs: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        """Run the model; BYTES inputs must be UTF-8 (ProtocolError otherwise), BYTES outputs come as bytes."""
        feed = {name: _to_onnx_runtime(name, array) for name, array in inputs.items()}
        values = self.session.run(self._output_names, feed)
        return {name: _from_onnx_runtime(value) for name, value in zip(self._output_names, values, strict=True)}

    def warm_up(self) -> None:
        """One inference on zeros, so the first client does not pay for it (best effort: a model whose
        dynamic dimensions reject 1 is still served)."""
        with contextlib.suppress(Exception):
            self.predict(zeros_like_inputs(self.inputs))


@dataclass(frozen=True)
class Artifact:
    """A verified engine file and what its build report said about it."""

    path: Path
    report: dict[str, Any]

    @property
    def revision(self) -> str | None:
        key = self.report.get("cacheKey")
        return str(key)[:12] if key else None


def _verified(directory: Path, entry: dict[str, Any], what: str) -> Path:
    """The file a report entry names, in `directory`, after checking its SHA-256 against the entry's."""
    path = directory / Path(str(entry.get("file", ""))).name
    if not path.is_file():
        raise ArtifactError(f"{path} is missing ({what} listed in the build report)")
    actual = sha256_file(path)
    if actual != entry.get("sha256"):
        raise ArtifactError(
            f"{path} has sha256 {actual}, but the build report says {entry.get('sha256')}; not loaded",
            reason="DigestMismatch",
        )
    return path


def _check_side_files(model: Path, verified: set[str]) -> None:
    """Refuse an ONNX model that would read a side file its build report does not list (and so verify)."""
    from edgemodel_runtime.build import modelcheck
    from edgemodel_runtime.build.errors import BuildError

    try:
        locations = modelcheck.inspect(model).external_data
    except BuildError as error:
        raise ArtifactError(f"{model}: {error}", reason=error.reason) from error
    unlisted = [location for location in locations if location not in verified]
    if unlisted:
        raise ArtifactError(
            f"{model} reads its weights from {', '.join(unlisted)}, which the build report does not list under "
            "artifact.dataFiles, so nothing could verify them; not loaded",
            reason="InvalidArtifact",
        )


def _from_directory(directory: Path) -> Artifact:
    report_path = directory / "report.json"
    if not report_path.is_file():
        candidates = [p for p in ("model.onnx", "model.plan", "model.openvino") if (directory / p).is_file()]
        if not candidates:
            raise ArtifactError(f"{directory} holds neither report.json nor model.onnx/model.plan/model.openvino")
        return Artifact(directory / candidates[0], {})
    try:
        report: dict[str, Any] = json.loads(report_path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{report_path} is not valid JSON: {error}") from error
    artifact = report.get("artifact") if isinstance(report, dict) else None
    if not isinstance(artifact, dict) or report.get("status") not in {"built", "cached"} or "file" not in artifact:
        status = report.get("status") if isinstance(report, dict) else None
        raise ArtifactError(f"{report_path} describes no built engine (status {status!r})")
    data = artifact.get("dataFiles") or []
    if not isinstance(data, list) or not all(isinstance(entry, dict) for entry in data):
        raise ArtifactError(f"{report_path}: artifact.dataFiles is not a list of files")
    path = _verified(directory, artifact, "the engine")
    side_files = {_verified(directory, entry, "a side file of the engine").name for entry in data}
    if path.suffix == ".onnx":
        _check_side_files(path, side_files)
    return Artifact(path, report)


def _from_cache(location: str, target: Path) -> Artifact:
    """The artifact kept in `target` (pulled earlier, or copied from the node's image of it); a copy that does
    not verify (a file changed, missing, or not the build's) is a cache miss, not an engine fault: the
    artifact is pulled again beside it, and only once that pull is whole does it take the copy's place (so
    that a server started again, or another one sharing the cache, still finds the copy meanwhile). If the
    pull fails, the copy's own error is raised (exit code 2: the engine cannot be served as it is here, so
    a server with a fallback serves that), its message naming both.
    """
    try:
        return _from_directory(target)
    except ArtifactError as error:
        damaged = error
    said = " ".join(str(damaged).split())
    print(f"edgemodel serve: the copy of {location} in {target} cannot be used ({said}); pulling it again",
          file=sys.stderr, flush=True)  # fmt: skip
    fresh = target.with_name(f".{target.name}-fresh-{os.getpid()}")
    shutil.rmtree(fresh, ignore_errors=True)
    try:
        _pull(location, fresh)
    except ArtifactError as error:
        raise ArtifactError(
            f"{said}; and pulling {location} again failed: {' '.join(str(error).split())}",
            reason=damaged.reason,
            exit_code=damaged.exit_code,
        ) from error
    aside = target.with_name(f".{target.name}-damaged-{os.getpid()}")
    try:
        with contextlib.suppress(FileNotFoundError):  # another server may have moved it already
            os.replace(target, aside)
        try:
            os.rename(fresh, target)
        except OSError:
            if not target.is_dir():  # another server put a fresh copy there meanwhile: that one is used
                raise
    except OSError as error:
        raise ArtifactError(
            f"cannot replace the copy of {location} in the artifact cache {target.parent}: {error}",
            reason="DiskError",
            exit_code=INFRASTRUCTURE,
        ) from error
    finally:
        shutil.rmtree(aside, ignore_errors=True)
        shutil.rmtree(fresh, ignore_errors=True)
    return _from_directory(target)


def _pull(location: str, target: Path) -> None:
    """Pull an OCI artifact into `target`, which appears whole or not at all (a failed pull leaves nothing)."""
    from edgemodel_runtime.build import oci
    from edgemodel_runtime.build.errors import BuildError

    try:
        pulled = oci.pull_artifact(location)
    except BuildError as error:
        raise ArtifactError(str(error), reason=error.reason, exit_code=int(error.exit_code)) from error
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".pulling-", dir=target.parent))
        for file in pulled.files:
            shutil.move(str(file), staging / file.name)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # another server pulled the same digest meanwhile: use theirs
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        raise ArtifactError(
            f"cannot keep {location} in the artifact cache {target.parent} (EDGEMODEL_ARTIFACT_CACHE): {error}",
            reason="DiskError",
            exit_code=INFRASTRUCTURE,
        ) from error
    finally:
        shutil.rmtree(pulled.directory, ignore_errors=True)


def resolve(location: str, cache: Path) -> Artifact:
    """Find, fetch if needed, and verify the artifact named on the command line.

    Raises ArtifactError (with a reason and an exit code) for anything that cannot be served or fetched.
    """
    if location.startswith("oci://"):
        if "@sha256:" not in location:
            raise ArtifactError(
                f"{location}: serve engines by digest (oci://registry/repo@sha256:...)", reason="UnpinnedArtifact"
            )
        target = cache / location.rsplit("@sha256:", 1)[1][:16]
        if not target.is_dir():
            _pull(location, target)
            return _from_directory(target)
        return _from_cache(location, target)
    path = Path(location)
    if path.is_dir():
        return _from_directory(path)
    if path.is_file():
        return Artifact(path, {})
    raise ArtifactError(f"{location}: no such file or directory", reason="ArtifactNotFound")


class TensorRTModel:
    """A serialized TensorRT engine (model.plan), run through polygraphy on this node's GPU."""

    platform = "tensorrt_plan"

    def __init__(self, path: Path) -> None:
        from edgemodel_runtime.build.errors import BuildError
        from edgemodel_runtime.engines import tensorrt_engine

        try:
            tensorrt_engine.require()
        except BuildError as error:
            raise ArtifactError(str(error), reason=error.reason) from error
        import tensorrt as trt

        try:
            self._runner = tensorrt_engine.open_runner(path)
        except Exception as error:  # TensorRT raises its own kinds for a plan it cannot deserialize
            raise ArtifactError(f"{path}: TensorRT cannot load it: {error}", reason="InvalidModel") from error
        engine = self._runner.engine
        inputs: list[TensorMetadata] = []
        outputs: list[TensorMetadata] = []
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            trt_type = engine.get_tensor_dtype(name)
            datatype = None
            if trt_type != getattr(trt, "bfloat16", None):  # numpy has no bfloat16: nptype cannot say
                with contextlib.suppress(TypeError, KeyError):
                    datatype = NUMPY_TO_DATATYPE.get(np.dtype(trt.nptype(trt_type)))
            if datatype is None:
                raise ArtifactError(
                    f"tensor {name!r} has type {trt_type}, which this server does not carry", reason="UnsupportedModel"
                )
            spec = TensorMetadata(name, datatype, _dims(list(engine.get_tensor_shape(name))))
            (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(spec)
        self.inputs, self.outputs = inputs, outputs

    def predict(self, inputs: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        return {name: np.array(value) for name, value in self._runner.infer(feed_dict=inputs).items()}

    def warm_up(self) -> None:
        with contextlib.suppress(Exception):
            self.predict(zeros_like_inputs(self.inputs))


class OpenVINOModel:
    """A model compiled by OpenVINO for this node's CPU (model.openvino), at the precision it was built for."""

    platform = "openvino"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        from edgemodel_runtime.build.errors import BuildError
        from edgemodel_runtime.engines import openvino_engine

        try:
            compiled = openvino_engine.load(path, threads)
        except BuildError as error:
            raise ArtifactError(str(error), reason=error.reason) from error
        except RuntimeError as error:  # the plugin refuses a damaged blob
            raise ArtifactError(f"{path}: OpenVINO cannot load it: {error}", reason="InvalidModel") from error
        self.inputs = [self._metadata(port) for port in compiled.inputs]
        self.outputs = [self._metadata(port) for port in compiled.outputs]
        self._requests = openvino_engine.Requests(compiled)

    @staticmethod
    def _metadata(port: Any) -> TensorMetadata:
        name = str(port.get_any_name())
        dtype = np.dtype(port.get_element_type().to_dtype())
        if dtype not in NUMPY_TO_DATATYPE:
            raise ArtifactError(
                f"tensor {name!r} has type {dtype}, which this server does not carry", reason="UnsupportedModel"
            )
        shape = [d.get_length() if d.is_static else -1 for d in port.get_partial_shape()]
        return TensorMetadata(name, NUMPY_TO_DATATYPE[dtype], _dims(shape))

    def predict(self, inputs: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        return self._requests.infer(inputs)

    def warm_up(self) -> None:
        with contextlib.suppress(Exception):
            self.predict(zeros_like_inputs(self.inputs))


def load(artifact: Artifact, threads: int | None = None) -> Model:
    """The engine module that fits the artifact: TensorRT for .plan files, OpenVINO for .openvino files,
    ONNX Runtime otherwise."""
    if artifact.path.suffix == ".plan":
        return TensorRTModel(artifact.path)
    if artifact.path.suffix == ".openvino":
        return OpenVINOModel(artifact.path, threads)
    return OnnxRuntimeModel(artifact.path, threads)
