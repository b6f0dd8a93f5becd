"""Peer server for benchmarks: one ONNX model on KServe's Python ModelServer (Open Inference Protocol v2 REST).

Run with the interpreter of a venv that has kserve, onnxruntime and numpy:

    python kserve_server.py --model PATH --name NAME --port N --threads T

One uvicorn worker, gRPC off, REST bound to --host (127.0.0.1 by default). KServe 0.21 hard-codes
host="0.0.0.0" in its RESTServer, so this script swaps in a subclass that rewrites the uvicorn host.
KServe also parses sys.argv when it is imported, so the script imports it only after clearing sys.argv.
Per-request log lines (KServe latency and trace lines, uvicorn access log) are off so they do not skew timings.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import numpy as np
import onnxruntime as ort
from peer_args import parse_args  # this folder, first on sys.path when run as a script


def make_session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def serve(args: argparse.Namespace) -> None:
    sys.argv = sys.argv[:1]  # kserve.model_server runs parse_known_args() on import
    import kserve
    from kserve import model_server
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
    from kserve.protocol.rest.server import RESTServer
    from kserve.utils.numpy_codec import from_np_dtype
    from kserve.utils.utils import generate_uuid

    class LoopbackRESTServer(RESTServer):  # type: ignore[misc]
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.config.host = args.host

    model_server.RESTServer = LoopbackRESTServer

    class OnnxModel(kserve.Model):  # type: ignore[misc]
        def __init__(self, name: str, path: str, threads: int) -> None:
            super().__init__(name)
            self.path, self.threads = path, threads
            self.session: ort.InferenceSession | None = None

        def load(self) -> bool:
            self.session = make_session(self.path, self.threads)
            self.ready = True
            return True

        def predict(
            self, payload: InferRequest, headers: dict[str, str] | None = None, response_headers: Any = None
        ) -> InferResponse:
            assert self.session is not None
            if not isinstance(payload, InferRequest):
                raise TypeError("only v2 requests (POST /v2/models/{name}/infer) are served")
            feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
            names = [o.name for o in self.session.get_outputs()]
            arrays: list[np.ndarray] = self.session.run(names, feeds)
            outputs = [
                InferOutput(name=n, shape=list(a.shape), datatype=from_np_dtype(a.dtype), data=a)
                for n, a in zip(names, arrays, strict=True)
            ]
            return InferResponse(
                response_id=payload.id or generate_uuid(),
                model_name=self.name,
                infer_outputs=outputs,
                use_binary_outputs=payload.use_binary_outputs,
                requested_outputs=payload.request_outputs,
            )

    model = OnnxModel(args.name, args.model, args.threads)
    model.load()
    server = kserve.ModelServer(http_port=args.port, workers=1, enable_grpc=False, enable_latency_logging=False)
    for noisy in ("uvicorn.access", "kserve.trace"):  # one or two log lines per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    server.start([model])


if __name__ == "__main__":
    serve(parse_args(__doc__.splitlines()[0]))
