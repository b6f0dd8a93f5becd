"""`edgemodel serve` as a real process: OIP v2 with real clients, bad input, draining, shadow traffic."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edgemodel_runtime import samples
from edgemodel_runtime.packaged import OCR_CLS
from tests import onnx_models
from tests.helpers import free_port

EDGEMODEL = str(Path(sys.executable).parent / "edgemodel")
OUTPUT = "save_infer_model/scale_0.tmp_1"


class Server:
    """An `edgemodel serve` process on a free loopback port."""

    def __init__(self, artifact: Path | str, name: str, *extra: str, log_dir: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (log_dir or Path(artifact).parent) / f"serve-{self.port}.log"
        command = [
            EDGEMODEL,
            "serve",
            str(artifact),
            "--name",
            name,
            "--port",
            str(self.port),
            "--threads",
            "1",
            *extra,
        ]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited: {self.log.read_text()}")
            try:
                if self.get("/v2/health/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready: {self.log.read_text()}")

    def get(self, path: str) -> tuple[int, bytes]:
        return self.request("GET", path)

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels`."""
        _, text = self.get("/metrics")
        total = 0.0
        for line in text.decode().splitlines():
            if not line.startswith(name + "{"):
                continue
            label_text, value = line[len(name) + 1 :].rsplit("} ", 1)
            if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
                total += float(value)
        return total

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


@pytest.fixture(scope="module")
def cls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("cls")
    artifact = directory / "cls.onnx"
    artifact.write_bytes(OCR_CLS.path().read_bytes())
    server = Server(artifact, "cls", "--max-body-bytes", "2000000")
    yield server
    server.stop()


def _line() -> np.ndarray:
    return np.asarray(samples.line_inputs(1, 48, 192, seed=3)[0]["x"])


def _expected(array: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(OCR_CLS.path()), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": array})[0])


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_infers_in_json_and_binary_mode(cls_server: Server, binary: bool) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{cls_server.port}")
    assert client.is_server_live()
    assert client.is_model_ready("cls")
    metadata = client.get_model_metadata("cls")
    assert metadata["inputs"][0]["name"] == "x"
    array = _line()
    tensor = httpclient.InferInput("x", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(OUTPUT, binary_data=binary)]
    result = client.infer("cls", [tensor], outputs=outputs, request_id="r-1")
    np.testing.assert_allclose(result.as_numpy(OUTPUT), _expected(array), rtol=1e-5, atol=1e-6)
    assert result.get_response()["id"] == "r-1"


def _infer_body(**overrides: Any) -> bytes:
    entry = {"name": "x", "shape": [1, 3, 48, 192], "datatype": "FP32", "data": [0.5] * (3 * 48 * 192)}
    entry.update(overrides)
    return json.dumps({"inputs": [entry]}).encode()


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/v2/models/cls/infer", _infer_body(datatype="INT64"), 400, "the model expects FP32"),
        ("/v2/models/cls/infer", _infer_body(datatype="STRING"), 400, "unsupported datatype"),
        ("/v2/models/cls/infer", _infer_body(shape=[1, 4, 48, 144]), 400, "the model expects [-1, 3, -1, -1]"),
        ("/v2/models/cls/infer", _infer_body(name="image"), 400, "is not an input of the model"),
        ("/v2/models/cls/infer", _infer_body(data=[1.0, 2.0]), 400, "its shape needs 27648"),
        ("/v2/models/cls/infer", _infer_body(data=["a"] * 27648), 400, "must hold numbers"),
        ("/v2/models/cls/infer", b'{"inputs": [', 400, "not valid JSON"),
        ("/v2/models/cls/infer", b'{"inputs": []}', 400, "non-empty list"),
        ("/v2/models/cls/infer", b"[]", 400, "must be a JSON object"),
        ("/v2/models/cls/infer", b"x" * 2_000_001, 413, "exceeds the limit"),
        ("/v2/models/other/infer", _infer_body(), 404, "unknown model 'other'"),
        ("/v2/models/cls/versions/nope/infer", _infer_body(), 404, "unknown version"),
    ],
    ids=[
        "wrong datatype",
        "unknown datatype",
        "wrong shape",
        "wrong name",
        "size does not match shape",
        "strings for floats",
        "malformed JSON",
        "no inputs",
        "not an object",
        "body over the limit",
        "unknown model",
        "unknown version",
    ],
)
def test_bad_client_input_gets_a_4xx_with_an_oip_error_body(
    cls_server: Server, path: str, body: bytes, status: int, fragment: str
) -> None:
    code, answer = cls_server.request("POST", path, body, {"Content-Type": "application/json"})
    assert code == status, answer
    assert fragment in json.loads(answer)["error"]
    assert cls_server.get("/v2/health/live")[0] == 200  # and the server is still there


def test_binary_data_that_does_not_fit_its_shape_is_refused(cls_server: Server) -> None:
    header = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 3, 48, 192], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}
    ).encode()
    code, answer = cls_server.request(
        "POST", "/v2/models/cls/infer", header + b"\0" * 8, {"Inference-Header-Content-Length": str(len(header))}
    )
    assert code == 400
    assert "needs 110592" in json.loads(answer)["error"]


def test_metrics_count_requests_by_outcome_and_time_each_phase(cls_server: Server) -> None:
    before = cls_server.metric("edgemodel_requests_total", outcome="ok")
    assert cls_server.request("POST", "/v2/models/cls/infer", _infer_body())[0] == 200
    assert cls_server.metric("edgemodel_requests_total", outcome="ok") == before + 1
    assert cls_server.metric("edgemodel_requests_total", outcome="client_error") >= 0
    for phase in ("queue", "inference", "total"):
        assert cls_server.metric("edgemodel_request_duration_seconds_count", phase=phase) >= 1
    assert cls_server.metric("edgemodel_requests_in_flight") == 0


def test_openapi_document_describes_the_endpoints(cls_server: Server) -> None:
    code, body = cls_server.get("/openapi.json")
    assert code == 200
    paths = json.loads(body)["paths"]
    assert {"/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/{name}/infer"} <= set(paths)


def test_schemathesis_finds_no_server_errors_or_schema_violations(cls_server: Server) -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", f"{cls_server.url}/openapi.json",
         "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
         "--max-examples", "30", "--workers", "1"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_sigterm_drains_requests_in_flight_and_exits_zero(tmp_path: Path) -> None:
    artifact = tmp_path / "cls.onnx"
    artifact.write_bytes(OCR_CLS.path().read_bytes())
    server = Server(artifact, "cls")
    results: list[int] = []

    def client() -> None:
        try:
            results.append(server.request("POST", "/v2/models/cls/infer", _infer_body())[0])
        except OSError:
            results.append(-1)  # refused: arrived after the listener closed

    threads = [threading.Thread(target=client) for _ in range(16)]
    for thread in threads:
        thread.start()
    time.sleep(0.05)
    server.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(60)
    assert server.process.wait(30) == 0
    assert results.count(200) >= 1
    assert set(results) <= {200, -1}, results  # every accepted request was answered in full


# ---------------------------------------------------------------- shadow traffic with real candidates


def _classifier_body(seed: int) -> bytes:
    data = np.random.default_rng(seed).normal(size=16).tolist()
    return json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": data}]}).encode()


def _shadow_run(stable_model: Path, candidate_url: str, requests: int = 40) -> tuple[Server, list[int]]:
    stable = Server(stable_model, "clf", "--shadow-url", candidate_url, "--mirror-percent", "100", "--revision", "r1")
    codes = [stable.request("POST", "/v2/models/clf/infer", _classifier_body(i))[0] for i in range(requests)]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        settled = (
            stable.metric("edgemodel_shadow_compared_total")
            + stable.metric("edgemodel_shadow_candidate_errors_total")
            + stable.metric("edgemodel_shadow_dropped_total")
        )
        if settled >= requests:
            break
        time.sleep(0.1)
    return stable, codes


def test_a_candidate_that_agrees_is_measured_as_agreeing(classifiers: dict[str, Path]) -> None:
    candidate = Server(classifiers["same"], "clf", "--revision", "r2")
    try:
        stable, codes = _shadow_run(classifiers["stable"], candidate.url)
        try:
            assert codes == [200] * 40
            compared = stable.metric("edgemodel_shadow_compared_total", stable_revision="r1")
            assert compared >= 30
            assert stable.metric("edgemodel_shadow_agreed_total") == compared
            assert stable.metric("edgemodel_shadow_latency_ratio_count") == compared
            assert candidate.metric("edgemodel_requests_total", outcome="ok") == compared
        finally:
            stable.stop()
    finally:
        candidate.stop()


def test_a_candidate_that_disagrees_is_measured_as_disagreeing(classifiers: dict[str, Path]) -> None:
    candidate = Server(classifiers["different"], "clf", "--revision", "r2")
    try:
        stable, codes = _shadow_run(classifiers["stable"], candidate.url)
        try:
            assert codes == [200] * 40
            compared = stable.metric("edgemodel_shadow_compared_total")
            assert compared >= 30
            assert stable.metric("edgemodel_shadow_agreed_total") < 0.5 * compared
        finally:
            stable.stop()
    finally:
        candidate.stop()


def test_a_candidate_that_is_down_never_fails_the_stable_path(classifiers: dict[str, Path]) -> None:
    stable, codes = _shadow_run(classifiers["stable"], f"http://127.0.0.1:{free_port()}")
    try:
        assert codes == [200] * 40
        assert stable.metric("edgemodel_shadow_candidate_errors_total", kind="connection") >= 30
        assert stable.metric("edgemodel_shadow_compared_total") == 0
    finally:
        assert stable.stop() == 0


def _serve_refusal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGEMODEL, "serve", *args, "--port", str(free_port())], capture_output=True, text=True, timeout=60, check=False
    )


def test_an_engine_that_differs_from_its_build_report_is_not_served(tmp_path: Path) -> None:
    model = onnx_models.tiny_classifier(tmp_path / "m.onnx")
    out = tmp_path / "engine"
    built = subprocess.run(
        [EDGEMODEL, "build", "--model", str(model), "--sha256", hashlib.sha256(model.read_bytes()).hexdigest(),
         "--output", str(out), "--benchmark-seconds", "0.2"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    onnx_models.tiny_classifier(out / "model.onnx", seed=9)  # swapped after the build
    result = _serve_refusal(str(out))
    assert result.returncode == 2
    assert "but the build report says" in result.stderr


def test_a_tensorrt_plan_without_tensorrt_is_a_clear_error(tmp_path: Path) -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has an NVIDIA GPU")
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not really a plan")
    result = _serve_refusal(str(plan))
    assert result.returncode == 2
    assert "engine tensorrt is unavailable here" in result.stderr


def test_a_missing_artifact_is_a_clear_error(tmp_path: Path) -> None:
    result = _serve_refusal(str(tmp_path / "nothing"))
    assert result.returncode == 2
    assert "no such file or directory" in result.stderr


def test_an_engine_pushed_by_a_build_is_served_by_digest_from_the_registry(tmp_path: Path) -> None:
    from tests.testbed.registry import Registry

    registry = Registry(tmp_path / "registry").start()
    try:
        model = onnx_models.tiny_classifier(tmp_path / "m.onnx")
        built = subprocess.run(
            [EDGEMODEL, "build", "--model", str(model), "--sha256", hashlib.sha256(model.read_bytes()).hexdigest(),
             "--output", str(tmp_path / "engine"), "--benchmark-seconds", "0.2",
             "--push", f"oci://{registry.address}/engines/clf"],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert built.returncode == 0, built.stderr
        reference = json.loads((tmp_path / "engine" / "report.json").read_text())["artifact"]["reference"]
        assert "@sha256:" in reference
        served = Server(reference, "clf", log_dir=tmp_path)
        try:
            code, body = served.request("POST", "/v2/models/clf/infer", _classifier_body(1))
            assert code == 200, body
        finally:
            served.stop()
    finally:
        registry.stop()
