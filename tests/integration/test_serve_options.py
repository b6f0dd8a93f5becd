"""Every option a standard client can set on a request is honoured or refused with a 4xx naming it.

Table-driven over tritonclient.http's calls and options against a real `edgemodel serve` process,
then over the raw fields of the protocol (request and tensor `parameters`, as KServe's v2 clients
send them) and HTTP-level options; and the server settings that would leave the model unreachable,
refused at start with one line and a nonzero exit.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from tests import onnx_models
from tests.helpers import free_port
from tests.integration.test_serve import EDGEMODEL, Server

REVISION = "r1"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return onnx_models.tiny_classifier(tmp_path_factory.mktemp("options") / "clf.onnx")


@pytest.fixture(scope="module")
def server(model_path: Path) -> Iterator[Server]:
    served = Server(model_path, "clf", "--revision", REVISION)
    yield served
    served.stop()


X = np.random.default_rng(5).normal(size=(2, 16)).astype(np.float32)


def _expected(model_path: Path) -> np.ndarray[Any, Any]:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": X})[0])


def _client(server: Server) -> Any:
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")


def _input(binary: bool = True) -> Any:
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput("x", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X, binary_data=binary)
    return tensor


def _output(**options: Any) -> Any:
    import tritonclient.http as httpclient

    return httpclient.InferRequestedOutput("logits", **options)


def _shared_memory_input() -> Any:
    tensor = _input()
    tensor.set_shared_memory("region0", X.nbytes)
    return tensor


def _shared_memory_output() -> Any:
    output = _output()
    output.set_shared_memory("region0", 40)
    return output


# name -> (call on the client, None when honoured or (status, fragment of the error) when refused)
Call = Callable[[Any], Any]
TRITONCLIENT_OPTIONS: dict[str, tuple[Call, tuple[str, str] | None]] = {
    "request_id": (lambda c: c.infer("clf", [_input()], request_id="req-7"), None),
    "json input": (lambda c: c.infer("clf", [_input(binary=False)]), None),
    "binary_data output false": (lambda c: c.infer("clf", [_input()], outputs=[_output(binary_data=False)]), None),
    "binary_data output true": (lambda c: c.infer("clf", [_input()], outputs=[_output(binary_data=True)]), None),
    "model_version served": (lambda c: c.infer("clf", [_input()], model_version=REVISION), None),
    "timeout": (lambda c: c.infer("clf", [_input()], timeout=10_000_000), None),
    "headers": (lambda c: c.infer("clf", [_input()], headers={"X-Request-Origin": "test"}), None),
    "request gzip": (lambda c: c.infer("clf", [_input()], request_compression_algorithm="gzip"), None),
    "request deflate": (lambda c: c.infer("clf", [_input()], request_compression_algorithm="deflate"), None),
    "response gzip": (lambda c: c.infer("clf", [_input()], response_compression_algorithm="gzip"), None),
    "response deflate": (lambda c: c.infer("clf", [_input()], response_compression_algorithm="deflate"), None),
    "async_infer": (lambda c: c.async_infer("clf", [_input()]).get_result(), None),
    "model_version other": (
        lambda c: c.infer("clf", [_input()], model_version="r2"),
        ("404", "unknown version 'r2' of 'clf'; available: 'r1'"),
    ),
    "class_count": (
        lambda c: c.infer("clf", [_input()], outputs=[_output(class_count=3)]),
        ("400", "classification extension (class_count) is not supported"),
    ),
    "sequence_id": (
        lambda c: c.infer("clf", [_input()], sequence_id=7, sequence_start=True),
        ("400", "the sequence extension is not supported"),
    ),
    "sequence_id string": (
        lambda c: c.infer("clf", [_input()], sequence_id="corr-1", sequence_end=True),
        ("400", "the sequence extension is not supported"),
    ),
    "priority": (lambda c: c.infer("clf", [_input()], priority=2), ("400", "priority 2 is not supported")),
    "custom parameters": (
        lambda c: c.infer("clf", [_input()], parameters={"max_tokens": 4}),
        ("400", "request.parameters ['max_tokens'] are not supported"),
    ),
    "query_params": (
        lambda c: c.infer("clf", [_input()], query_params={"debug": "1"}),
        ("400", "query parameters are not supported by this server (got 'debug=1')"),
    ),
    "shared memory input": (
        lambda c: c.infer("clf", [_shared_memory_input()]),
        ("400", "the shared memory extension is not supported"),
    ),
    "shared memory output": (
        lambda c: c.infer("clf", [_input()], outputs=[_shared_memory_output()]),
        ("400", "the shared memory extension is not supported"),
    ),
    "register_system_shared_memory": (
        lambda c: c.register_system_shared_memory("region0", "/region0", 64),
        ("404", "shared memory extensions (system and CUDA) are not supported"),
    ),
    "get_system_shared_memory_status": (
        lambda c: c.get_system_shared_memory_status(),
        ("404", "shared memory extensions (system and CUDA) are not supported"),
    ),
    "register_cuda_shared_memory": (
        lambda c: c.register_cuda_shared_memory("region0", b"handle", 0, 64),
        ("404", "shared memory extensions (system and CUDA) are not supported"),
    ),
    "get_model_repository_index": (
        lambda c: c.get_model_repository_index(),
        ("404", "the model repository extension is not supported"),
    ),
    "load_model": (lambda c: c.load_model("clf"), ("404", "the model repository extension is not supported")),
    "unload_model": (lambda c: c.unload_model("clf"), ("404", "the model repository extension is not supported")),
    "get_model_config": (lambda c: c.get_model_config("clf"), ("404", "model configuration")),
    "get_inference_statistics": (
        lambda c: c.get_inference_statistics("clf"),
        ("404", "Prometheus metrics at /metrics"),
    ),
    "get_inference_statistics all models": (
        lambda c: c.get_inference_statistics(),
        ("404", "Prometheus metrics at /metrics"),
    ),
    "get_trace_settings": (lambda c: c.get_trace_settings(), ("404", "the trace extension is not supported")),
    "get_log_settings": (lambda c: c.get_log_settings(), ("404", "the logging extension is not supported")),
}


@pytest.mark.parametrize("option", list(TRITONCLIENT_OPTIONS))
def test_each_tritonclient_option_is_honoured_or_refused_clearly(server: Server, model_path: Path, option: str) -> None:
    from tritonclient.utils import InferenceServerException

    call, refusal = TRITONCLIENT_OPTIONS[option]
    client = _client(server)
    if refusal is None:
        result = call(client)
        np.testing.assert_allclose(result.as_numpy("logits"), _expected(model_path), rtol=1e-6, atol=1e-6)
        if option == "request_id":
            assert result.get_response()["id"] == "req-7"
        if option.startswith("binary_data output"):
            in_binary = "binary_data_size" in result.get_response()["outputs"][0].get("parameters", {})
            assert in_binary == option.endswith("true")
        return
    with pytest.raises(InferenceServerException) as refused:
        call(client)
    status, fragment = refusal
    assert refused.value.status() == status, refused.value.message()
    assert fragment in refused.value.message()


def test_server_metadata_lists_only_the_extensions_served(server: Server) -> None:
    assert _client(server).get_server_metadata()["extensions"] == ["binary_tensor_data"]


# ---------------------------------------------------------------- raw protocol fields and HTTP options


def _body(request: dict[str, Any] | None = None, tensor: dict[str, Any] | None = None) -> bytes:
    entry = {"name": "x", "shape": list(X.shape), "datatype": "FP32", "data": X.ravel().tolist(), **(tensor or {})}
    return json.dumps({"inputs": [entry], **(request or {})}).encode()


RAW_OPTIONS: dict[str, tuple[bytes, dict[str, str], int, str]] = {
    "parameters null": (_body({"parameters": None, "outputs": None}, {"parameters": None}), {}, 200, ""),
    "model_name and id (KServe's to_rest)": (_body({"model_name": "clf", "id": "5f0c"}), {}, 200, ""),
    "model_name of another model": (
        _body({"model_name": "other"}),
        {},
        400,
        "request.model_name 'other' does not match the model this URL names ('clf')",
    ),
    "model_version of another version": (
        _body({"model_version": "r9"}),
        {},
        400,
        "request.model_version 'r9' does not match",
    ),
    "unknown request field": (_body({"inputz": []}), {}, 400, "request fields ['inputz'] are not part of the protocol"),
    "request parameter content_type": (
        _body({"parameters": {"content_type": "pd"}}),
        {},
        400,
        "request.parameters ['content_type'] are not supported",
    ),
    "tensor parameter content_type": (
        _body(tensor={"parameters": {"content_type": "np"}}),
        {},
        400,
        "input 'x'.parameters ['content_type'] are not supported",
    ),
    "output parameter unknown": (
        _body({"outputs": [{"name": "logits", "parameters": {"top_k": 2}}]}),
        {},
        400,
        "output 'logits'.parameters ['top_k'] are not supported",
    ),
    "timeout negative": (_body({"parameters": {"timeout": -1}}), {}, 400, "timeout must be a non-negative integer"),
    "binary_data_output not boolean": (
        _body({"parameters": {"binary_data_output": "yes"}}),
        {},
        400,
        "binary_data_output must be true or false",
    ),
    "output requested twice": (
        _body({"outputs": [{"name": "logits"}, {"name": "logits"}]}),
        {},
        400,
        "requested twice",
    ),
    "data and binary_data_size": (
        _body(tensor={"parameters": {"binary_data_size": 0}}),
        {},
        400,
        "has both data and binary_data_size",
    ),
    "Content-Encoding br": (_body(), {"Content-Encoding": "br"}, 415, "Content-Encoding 'br' is not supported"),
    "gzip that is not gzip": (_body(), {"Content-Encoding": "gzip"}, 400, "not valid gzip data"),
    "gzip bomb": (
        gzip.compress(b" " * (65 << 20)),  # over the default limit of 64 MiB once decompressed
        {"Content-Encoding": "gzip"},
        413,
        "decompresses to more than the limit",
    ),
}


@pytest.mark.parametrize("option", list(RAW_OPTIONS))
def test_each_protocol_field_is_honoured_or_refused_clearly(server: Server, option: str) -> None:
    body, headers, status, fragment = RAW_OPTIONS[option]
    code, answer = server.request("POST", "/v2/models/clf/infer", body, headers)
    assert code == status, answer
    if status != 200:
        assert fragment in json.loads(answer)["error"]


@pytest.mark.parametrize(("coding", "decompress"), [("gzip", gzip.decompress), ("deflate", zlib.decompress)])
def test_responses_are_compressed_when_the_client_accepts_it(
    server: Server, coding: str, decompress: Callable[[bytes], bytes]
) -> None:
    request = urllib.request.Request(
        f"{server.url}/v2/models/clf/infer", data=_body(), headers={"Accept-Encoding": f"br;q=1.0, {coding}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Encoding"] == coding
        document = json.loads(decompress(response.read()))
    assert document["outputs"][0]["name"] == "logits"


# ---------------------------------------------------------------- server settings


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["--name", "team/clf"], "--name 'team/clf' cannot be a segment of the URL paths"),
        (["--name", "clf v2"], "--name 'clf v2' cannot be a segment"),
        (["--name", ".."], "--name '..' cannot be a segment"),
        (["--revision", "r?1"], "--revision 'r?1' cannot be a segment"),
        (["--port", "0"], "--port 0 is not a TCP port clients can reach"),
        (["--port", "65536"], "--port 65536 is not a TCP port clients can reach"),
        (["--port", "eighty"], "argument --port: invalid int value"),
        (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid' is not an address of this machine"),
        (["--max-body-bytes", "0"], "--max-body-bytes must be at least 1"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--mirror-percent", "50"], "--mirror-percent goes with --shadow-url"),
        (["--candidate-revision", "r2"], "--candidate-revision goes with --shadow-url"),
        (["--shadow-url", "http://a:1", "--shadow-config", "shadow.json"], "not allowed with argument"),
        (["--port", "18081", "--shadow-url", "http://localhost:18081"], "is this server: it would mirror every"),
    ],
)
def test_settings_that_leave_the_model_unreachable_are_refused_at_start(
    model_path: Path, arguments: list[str], fragment: str
) -> None:
    port = ["--port", str(free_port())] if "--port" not in arguments else []
    result = subprocess.run(
        [EDGEMODEL, "serve", str(model_path), *port, *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edgemodel serve: ")
    assert fragment in lines[0]


def test_a_port_in_use_is_refused_at_start(model_path: Path, server: Server) -> None:
    result = subprocess.run(
        [EDGEMODEL, "serve", str(model_path), "--port", str(server.port)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == f"edgemodel serve: cannot listen on 127.0.0.1:{server.port}: Address already in use"
