"""The one model interface the server uses, and where its engine comes from.

An artifact is a directory written by `edgemodel build` (report.json + model.onnx,
model.plan or model.openvino), a single model file, or `oci://registry/repo@sha256:...`. Files listed in a
report are verified against the report's digest before anything loads them.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from edgemodel_runtime.digests import sha256_file
from edgemodel_runtime.serve.protocol import NUMPY_TO_DATATYPE, TensorMetadata


class ArtifactError(Exception):
    """The artifact cannot be served: missing, tampered with, or of an unknown kind."""


class Model(Protocol):
    """What the server needs from an engine."""

    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    platform: str

    def predict(self, inputs: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]: ...

    def warm_up(self) -> None: ...


_ORT_DATATYPES = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL",
}


def zeros_like_inputs(specs: list[TensorMetadata]) -> dict[str, npt.NDArray[Any]]:
    """Zeros for every input, dynamic dimensions set to 1."""
    dtypes = {name: dtype for dtype, name in NUMPY_TO_DATATYPE.items()}
    return {s.name: np.zeros([d if d > 0 else 1 for d in s.shape], dtype=dtypes[s.datatype]) for s in specs}


def _dims(shape: list[Any]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else -1 for d in shape)


class OnnxRuntimeModel:
    """An ONNX model on ONNX Runtime, with the best execution provider this machine has."""

    platform = "onnxruntime_onnx"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        preferred = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        providers = [p for p in preferred if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as error:
            raise ArtifactError(f"{path}: onnxruntime cannot load it: {error}") from error
        self.inputs = [self._metadata(i) for i in self.session.get_inputs()]
        self.outputs = [self._metadata(o) for o in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    @staticmethod
    def _metadata(node: Any) -> TensorMetadata:
        if node.type not in _ORT_DATATYPES:
            raise ArtifactError(f"tensor {node.name!r} has type {node.type}, which this server does not carry")
        return TensorMetadata(node.name, _ORT_DATATYPES[node.type], _dims(node.shape))

    def predict(self, inputs: dict[str, npt.NDArray[Any]]) -> dict[str, npt.NDArray[Any]]:
        values = self.session.run(self._output_names, inputs)
        return dict(zip(self._output_names, values, strict=True))

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


def _from_directory(directory: Path) -> Artifact:
    report_path = directory / "report.json"
    if not report_path.is_file():
        candidates = [p for p in ("model.onnx", "model.plan", "model.openvino") if (directory / p).is_file()]
        if not candidates:
            raise ArtifactError(f"{directory} holds neither report.json nor model.onnx/model.plan/model.openvino")
        return Artifact(directory / candidates[0], {})
    try:
        report: dict[str, Any] = json.loads(report_path.read_text())
    except ValueError as error:
        raise ArtifactError(f"{report_path} is not valid JSON: {error}") from error
    artifact = report.get("artifact") or {}
    if report.get("status") not in {"built", "cached"} or "file" not in artifact:
        raise ArtifactError(f"{report_path} describes no built engine (status {report.get('status')!r})")
    path = directory / Path(str(artifact["file"])).name
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    actual = sha256_file(path)
    if actual != artifact.get("sha256"):
        raise ArtifactError(f"{path} has sha256 {actual}, but the build report says {artifact.get('sha256')}")
    return Artifact(path, report)


def resolve(location: str, cache: Path) -> Artifact:
    """Find, fetch if needed, and verify the artifact named on the command line."""
    if location.startswith("oci://"):
        from edgemodel_runtime.build import oci

        if "@sha256:" not in location:
            raise ArtifactError(f"{location}: serve engines by digest (oci://registry/repo@sha256:...)")
        target = cache / location.rsplit("@sha256:", 1)[1][:16]
        if not target.exists():
            files = oci.pull_files(location)
            target.mkdir(parents=True)
            for file in files:
                shutil.move(str(file), target / file.name)
        return _from_directory(target)
    path = Path(location)
    if path.is_dir():
        return _from_directory(path)
    if path.is_file():
        return Artifact(path, {})
    raise ArtifactError(f"{location}: no such file or directory")


class TensorRTModel:
    """A serialized TensorRT engine (model.plan), run through polygraphy on this node's GPU."""

    platform = "tensorrt_plan"

    def __init__(self, path: Path) -> None:
        from edgemodel_runtime.build.errors import BuildError
        from edgemodel_runtime.engines import tensorrt_engine

        try:
            tensorrt_engine.require()
        except BuildError as error:
            raise ArtifactError(str(error)) from error
        import tensorrt as trt

        self._runner = tensorrt_engine.open_runner(path)
        engine = self._runner.engine
        inputs: list[TensorMetadata] = []
        outputs: list[TensorMetadata] = []
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            spec = TensorMetadata(name, NUMPY_TO_DATATYPE[dtype], _dims(list(engine.get_tensor_shape(name))))
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
            raise ArtifactError(str(error)) from error
        except RuntimeError as error:  # the plugin refuses a damaged blob
            raise ArtifactError(f"{path}: OpenVINO cannot load it: {error}") from error
        self.inputs = [self._metadata(port) for port in compiled.inputs]
        self.outputs = [self._metadata(port) for port in compiled.outputs]
        self._requests = openvino_engine.Requests(compiled)

    @staticmethod
    def _metadata(port: Any) -> TensorMetadata:
        name = str(port.get_any_name())
        dtype = np.dtype(port.get_element_type().to_dtype())
        if dtype not in NUMPY_TO_DATATYPE:
            raise ArtifactError(f"tensor {name!r} has type {dtype}, which this server does not carry")
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
