"""MLServer custom runtime for benchmarks: runs one ONNX model with onnxruntime on the CPU.

model-settings.json: "implementation": "mlserver_runtime.OnnxRuntime", "parameters": {"uri": "<model.onnx>",
"extra": {"threads": T}}. Inputs are decoded by name with NumpyCodec (shape [] gives a 0-d array); outputs keep
onnxruntime's exact shape (NumpyCodec.encode_output would turn a 1-D shape [N] into [N, 1]).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.codecs.numpy import to_datatype
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput
from mlserver.utils import get_model_uri


class OnnxRuntime(MLModel):  # type: ignore[misc]
    async def load(self) -> bool:
        extra = (self.settings.parameters.extra if self.settings.parameters else None) or {}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(extra.get("threads", 1))
        options.inter_op_num_threads = 1
        path = await get_model_uri(self.settings)
        self._session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self._output_names = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {tensor.name: NumpyCodec.decode_input(tensor) for tensor in payload.inputs}
        names = [o.name for o in payload.outputs] if payload.outputs else self._output_names
        arrays: list[np.ndarray] = self._session.run(names, feeds)
        outputs = [
            ResponseOutput(name=n, shape=list(a.shape), datatype=to_datatype(a.dtype), data=a.ravel().tolist())
            for n, a in zip(names, arrays, strict=True)
        ]
        return InferenceResponse(id=payload.id, model_name=self.name, model_version=self.version, outputs=outputs)
