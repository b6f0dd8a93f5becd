"""A model with a string output (ONNX string tensor, OIP BYTES) end to end, as real processes: `edgemodel build`
validates it, `edgemodel serve` answers it to tritonclient, and shadow traffic compares it exactly, so an
identical candidate agrees and one that names its classes differently disagrees (reason `exact`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.integration.test_build import edgemodel_build, report_of, sha256
from tests.integration.test_serve import Server

NAMES = ["cat", "", "naïve", "dog\x00tag", "bird", "fish"]  # the empty string and a NUL are values too


def labelled_classifier(path: Path, names: list[str]) -> Path:
    """x[1, 8] -> scores[1, 6] (FP32) and label[1] (string): the class name of the arg-max, as scikit-learn
    classifiers with string classes export it (ai.onnx.ml LabelEncoder)."""
    weights = np.random.default_rng(0).normal(size=(8, len(names))).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["scores"]),
            helper.make_node("ArgMax", ["scores"], ["index"], axis=-1, keepdims=0),
            helper.make_node(
                "LabelEncoder", ["index"], ["label"], domain="ai.onnx.ml",
                keys_int64s=list(range(len(names))), values_strings=names, default_string="?",
            ),
        ],
        path.stem,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, len(names)]),
            helper.make_tensor_value_info("label", TensorProto.STRING, [1]),
        ],
        initializer=[numpy_helper.from_array(weights, "w")],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 2)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _expected_label(x: np.ndarray, names: list[str]) -> bytes:
    weights = np.random.default_rng(0).normal(size=(8, len(names))).astype(np.float32)
    return names[int(np.argmax(x @ weights))].encode()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stable model, built and validated by `edgemodel build`."""
    directory = tmp_path_factory.mktemp("strings")
    model = labelled_classifier(directory / "model.onnx", NAMES)
    result = edgemodel_build("--model", str(model), "--sha256", sha256(model), "--output", str(directory / "engine"))
    assert result.returncode == 0, result.stderr
    return directory / "engine"


def test_a_model_with_a_string_output_builds_and_its_validation_compares_the_strings(engine: Path) -> None:
    report = report_of(engine)
    assert report["validation"]["verdict"] == "passed", report["validation"]
    label = next(o for o in report["candidate"]["comparison"]["outputs"] if o["name"] == "label")
    assert (label["dtype"], label["exact_mismatches"], label["equal_share"], label["values"]) == ("string", 0, 1.0, 4)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_the_built_engine_serves_its_string_output_to_tritonclient(engine: Path, binary: bool) -> None:
    import tritonclient.http as httpclient

    server = Server(engine, "clf", log_dir=engine.parent)
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        outputs = client.get_model_metadata("clf")["outputs"]
        assert {o["name"]: o["datatype"] for o in outputs} == {"scores": "FP32", "label": "BYTES"}
        for seed in range(6):
            x = np.random.default_rng(seed).normal(size=(1, 8)).astype(np.float32)
            tensor = httpclient.InferInput("x", [1, 8], "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            answer = client.infer("clf", [tensor], outputs=[httpclient.InferRequestedOutput("label", binary)])
            label = answer.as_numpy("label").tolist()  # tritonclient gives bytes from binary data, str from JSON
            assert [v if isinstance(v, bytes) else v.encode() for v in label] == [_expected_label(x, NAMES)]
    finally:
        assert server.stop() == 0


class Shadowed:
    """The built engine serving as stable, mirroring every request to a candidate server."""

    def __init__(self, engine: Path, candidate: Path) -> None:
        self.candidate = Server(candidate, "clf", "--revision", "r2", log_dir=engine.parent)
        try:
            self.stable = Server(engine, "clf", "--shadow-url", self.candidate.url, "--revision", "r1")
        except BaseException:
            self.candidate.stop()
            raise

    def send(self, requested: list[str] | None, binary: bool, seed: int) -> None:
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(f"127.0.0.1:{self.stable.port}")
        tensor = httpclient.InferInput("x", [1, 8], "FP32")
        tensor.set_data_from_numpy(np.random.default_rng(seed).normal(size=(1, 8)).astype(np.float32), binary)
        outputs = None if requested is None else [httpclient.InferRequestedOutput(n, binary) for n in requested]
        client.infer("clf", [tensor], outputs=outputs)

    def settled(self, sent: int) -> tuple[float, float]:
        """(compared, agreed) once every mirrored request is compared; fails on candidate errors."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            compared = self.stable.metric("edgemodel_shadow_compared_total")
            if compared + self.stable.metric("edgemodel_shadow_candidate_errors_total") >= sent:
                break
            time.sleep(0.1)
        assert self.stable.metric("edgemodel_shadow_candidate_errors_total") == 0
        return compared, self.stable.metric("edgemodel_shadow_agreed_total")

    def stop(self) -> None:
        assert self.stable.stop() == 0
        assert self.candidate.stop() == 0


REQUESTS: list[tuple[list[str] | None, bool]] = [
    (None, True), (None, False), (["label"], True), (["label"], False), (["scores"], False), (["label", "scores"], True)
]  # fmt: skip


@pytest.fixture
def renamed(engine: Path) -> Path:
    return labelled_classifier(engine.parent / "renamed.onnx", [name.upper() + "!" for name in NAMES])


@pytest.fixture
def shadowed(request: pytest.FixtureRequest, engine: Path, renamed: Path) -> Iterator[Shadowed]:
    running = Shadowed(engine, engine if request.param == "identical" else renamed)
    yield running
    running.stop()


@pytest.mark.parametrize("shadowed", ["identical"], indirect=True)
def test_an_identical_candidate_agrees_on_its_string_output(shadowed: Shadowed) -> None:
    for seed, (requested, binary) in enumerate(REQUESTS):
        shadowed.send(requested, binary, seed)
    assert shadowed.settled(len(REQUESTS)) == (len(REQUESTS), len(REQUESTS))


@pytest.mark.parametrize("shadowed", ["renamed"], indirect=True)
def test_a_candidate_whose_strings_differ_disagrees_exactly_where_the_client_asked_for_them(
    shadowed: Shadowed,
) -> None:
    for seed, (requested, binary) in enumerate(REQUESTS):
        shadowed.send(requested, binary, seed)
    # Every request but the one naming only the (identical) scores compares a label that differs.
    assert shadowed.settled(len(REQUESTS)) == (len(REQUESTS), 1)
    assert shadowed.stable.metric("edgemodel_shadow_disagreed_total", reason="exact") == len(REQUESTS) - 1
