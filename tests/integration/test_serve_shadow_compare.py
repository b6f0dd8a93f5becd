"""Shadow agreement between real `edgemodel serve` processes, with tritonclient as the client.

What is compared is what the client was answered: the outputs it named (all when it named none), by name,
whether it asked for them as binary or JSON data. An identical candidate agrees on every mirrored request;
a candidate that lacks an output, adds one, or answers NaN where stable has a number disagrees, with a reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import orjson
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.integration.test_serve import Server, _serve_refusal

CLASSES = 6


def _model(path: Path, *, outputs: tuple[str, ...], nan_class: bool = False, narrow: bool = False) -> Path:
    """x[1, 8] -> logits (FP32), probs (FP32), label (INT64), positive (BOOL), features (FP32), as `outputs` names.

    With `nan_class`, the last logit is NaN (and so every probability). With `narrow`, the same values in
    narrower datatypes: logits FP16, label INT32 (what a re-export with other output types answers).
    """
    rng = np.random.default_rng(0)
    scale = np.ones(CLASSES, np.float32)
    if nan_class:
        scale[-1] = np.nan
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["raw"]),
        helper.make_node("Mul", ["raw", "scale"], ["logits32"]),
        helper.make_node("Cast", ["logits32"], ["logits"], to=TensorProto.FLOAT16 if narrow else TensorProto.FLOAT),
        helper.make_node("Softmax", ["logits32"], ["probs"], axis=-1),
        helper.make_node("ArgMax", ["raw"], ["label64"], axis=-1, keepdims=0),
        helper.make_node("Cast", ["label64"], ["label"], to=TensorProto.INT32 if narrow else TensorProto.INT64),
        helper.make_node("Greater", ["raw", "zero"], ["positive"]),
        helper.make_node("Relu", ["raw"], ["features"]),
    ]
    declared = {
        "logits": helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT16 if narrow else TensorProto.FLOAT, [1, CLASSES]
        ),
        "probs": helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, CLASSES]),
        "label": helper.make_tensor_value_info("label", TensorProto.INT32 if narrow else TensorProto.INT64, [1]),
        "positive": helper.make_tensor_value_info("positive", TensorProto.BOOL, [1, CLASSES]),
        "features": helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, CLASSES]),
    }
    initializers = {
        "w": rng.normal(size=(8, CLASSES)).astype(np.float32),
        "b": rng.normal(size=CLASSES).astype(np.float32),
        "scale": scale,
        "zero": np.zeros(1, np.float32),
    }
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [declared[name] for name in outputs],
        initializer=[numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


BASE = ("logits", "probs", "label", "positive")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("shadow-compare")
    return {
        "stable": _model(directory / "stable.onnx", outputs=BASE),
        "same": _model(directory / "same.onnx", outputs=BASE),
        "fewer": _model(directory / "fewer.onnx", outputs=("logits", "probs", "label")),
        "more": _model(directory / "more.onnx", outputs=(*BASE, "features")),
        "nan": _model(directory / "nan.onnx", outputs=BASE, nan_class=True),
        "narrow": _model(directory / "narrow.onnx", outputs=BASE, narrow=True),
    }


class Pair:
    """A candidate server and a stable one mirroring every request to it."""

    def __init__(self, stable_model: Path, candidate_model: Path) -> None:
        self.candidate = Server(candidate_model, "clf", "--revision", "r2")
        try:
            self.stable = Server(
                stable_model, "clf", "--shadow-url", self.candidate.url, "--mirror-percent", "100", "--revision", "r1"
            )
        except BaseException:
            self.candidate.stop()
            raise
        self.sent = 0

    def infer(self, requested: list[str] | None, binary: bool | list[bool]) -> None:
        """One request through tritonclient, naming `requested` outputs (None: none named), binary or JSON."""
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(f"127.0.0.1:{self.stable.port}")
        data = np.random.default_rng(self.sent).normal(size=(1, 8)).astype(np.float32)
        tensor = httpclient.InferInput("x", [1, 8], "FP32")
        tensor.set_data_from_numpy(data, binary_data=True)
        flags = binary if isinstance(binary, list) else [binary] * len(requested or [])
        outputs = None
        if requested is not None:
            outputs = [httpclient.InferRequestedOutput(n, binary_data=b) for n, b in zip(requested, flags, strict=True)]
        response = client.infer("clf", [tensor], outputs=outputs)
        answered = {o["name"] for o in response.get_response()["outputs"]}
        assert answered == set(requested or BASE), answered
        self.sent += 1

    def settled(self) -> dict[str, float]:
        """Shadow counters once every mirrored request is compared or failed."""
        deadline = time.monotonic() + 20
        while True:
            counts = {
                "mirrored": self.stable.metric("edgemodel_shadow_mirrored_total"),
                "compared": self.stable.metric("edgemodel_shadow_compared_total"),
                "agreed": self.stable.metric("edgemodel_shadow_agreed_total"),
                "errors": self.stable.metric("edgemodel_shadow_candidate_errors_total"),
            }
            if counts["compared"] + counts["errors"] >= self.sent or time.monotonic() > deadline:
                return counts
            time.sleep(0.1)

    def disagreed(self, reason: str) -> float:
        return self.stable.metric("edgemodel_shadow_disagreed_total", reason=reason)

    def stop(self) -> None:
        self.stable.stop()
        self.candidate.stop()


@pytest.fixture
def pair(request: pytest.FixtureRequest, models: dict[str, Path]) -> Iterator[Pair]:
    stable, candidate = request.param
    running = Pair(models[stable], models[candidate])
    yield running
    running.stop()


# What a client may ask for: nothing named, every output, subsets, binary, JSON, and a mix per output.
REQUESTS: list[tuple[list[str] | None, bool | list[bool]]] = [
    (None, False),
    (None, True),
    (list(BASE), True),
    (list(BASE), False),
    (["probs"], True),
    (["probs"], False),
    (["label", "positive"], [True, False]),
    (["positive", "logits"], [False, True]),
]


@pytest.mark.parametrize("pair", [("stable", "same"), ("nan", "nan")], indirect=True, ids=["finite", "nan-in-both"])
def test_an_identical_candidate_agrees_on_every_request_whatever_the_client_asked_for(pair: Pair) -> None:
    for requested, binary in REQUESTS:
        pair.infer(requested, binary)
    counts = pair.settled()
    assert counts == {"mirrored": len(REQUESTS), "compared": len(REQUESTS), "agreed": len(REQUESTS), "errors": 0}


@pytest.mark.parametrize("pair", [("stable", "fewer")], indirect=True)
def test_an_output_missing_from_the_candidate_is_a_disagreement_only_where_the_client_asked_for_it(
    pair: Pair,
) -> None:
    pair.infer(None, True)  # all outputs: the candidate lacks `positive`
    pair.infer(["positive"], False)  # named: the candidate cannot answer it
    pair.infer(["probs", "label"], True)  # not asked for: nothing is missing
    counts = pair.settled()
    assert counts == {"mirrored": 3, "compared": 3, "agreed": 1, "errors": 0}
    assert pair.disagreed("missing_output") == 2


@pytest.mark.parametrize("pair", [("stable", "more")], indirect=True)
def test_an_extra_output_is_a_disagreement_when_the_client_asked_for_all(pair: Pair) -> None:
    pair.infer(None, False)
    pair.infer(["logits"], True)
    counts = pair.settled()
    assert counts == {"mirrored": 2, "compared": 2, "agreed": 1, "errors": 0}
    assert pair.disagreed("extra_output") == 1


@pytest.mark.parametrize("pair", [("stable", "narrow")], indirect=True)
def test_an_output_of_another_datatype_is_a_disagreement_even_where_its_values_are_equal(pair: Pair) -> None:
    pair.infer(["logits"], True)  # FP16 where stable answers FP32: its values fit the tolerance
    pair.infer(["label"], False)  # INT32 where stable answers INT64: the same class
    pair.infer(["probs", "positive"], True)  # the same datatypes: agrees
    counts = pair.settled()
    assert counts == {"mirrored": 3, "compared": 3, "agreed": 1, "errors": 0}
    assert pair.disagreed("datatype") == 2


@pytest.mark.parametrize("pair", [("stable", "same")], indirect=True)
def test_a_request_naming_the_model_and_stable_version_in_its_body_is_compared_not_refused(pair: Pair) -> None:
    """KServe's clients may put model_name and model_version in the body; stable accepts its own version,
    and the copy must reach the candidate (which serves another version) without them."""
    data = np.random.default_rng(0).normal(size=8).tolist()
    for fields in ({"model_name": "clf", "model_version": "r1"}, {"model_version": "r1"}, {"model_name": "clf"}):
        body = {**fields, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": data}]}
        status, _ = pair.stable.request("POST", "/v2/models/clf/infer", orjson.dumps(body))
        assert status == 200
        pair.sent += 1
    counts = pair.settled()
    assert counts == {"mirrored": 3, "compared": 3, "agreed": 3, "errors": 0}


@pytest.mark.parametrize("pair", [("stable", "fewer")], indirect=True)
def test_a_request_with_nan_tokens_in_its_json_is_copied_as_any_other(pair: Pair) -> None:
    """JSON input data may hold NaN and Infinity (Triton's tokens, which stable reads); the copy must still ask
    for every output as binary data and leave out stable's version, or the candidate refuses it."""
    data = b"[NaN, Infinity, -Infinity, 1e-45, 0.1, -0.0, 3.4028234663852886e38, 2]"
    for fields, requested in ((b'"model_version": "r1", ', b'"probs"'), (b"", b'"positive"')):
        body = b'{%s"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8], "data": %s}], ' % (fields, data)
        body += b'"outputs": [{"name": %s}]}' % requested
        status, answer = pair.stable.request("POST", "/v2/models/clf/infer", body)
        assert status == 200, answer
        pair.sent += 1
    counts = pair.settled()
    # probs is NaN on both sides (agrees); positive is missing from the candidate (disagrees, not an error).
    assert counts == {"mirrored": 2, "compared": 2, "agreed": 1, "errors": 0}
    assert pair.disagreed("missing_output") == 1


@pytest.mark.parametrize("pair", [("stable", "nan")], indirect=True)
def test_nan_where_stable_answers_a_number_is_a_disagreement_in_binary_and_json_alike(pair: Pair) -> None:
    for requested, binary in REQUESTS:
        pair.infer(requested, binary)
    counts = pair.settled()
    # Every request asks for logits or probs, except the one naming only label and positive, which agree.
    assert counts == {"mirrored": len(REQUESTS), "compared": len(REQUESTS), "agreed": 1, "errors": 0}
    assert pair.disagreed("nonfinite") == len(REQUESTS) - 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--shadow-url", "http://127.0.0.1:9", "--agreement", '{"maxRelativeError": 0}'], "within (0, 1e+06]"),
        (["--shadow-url", "http://127.0.0.1:9", "--agreement", '{"maxRelativeError": NaN}'], "NaN is not JSON"),
        (["--shadow-url", "http://127.0.0.1:9", "--agreement", "0.05"], "must be a JSON object"),
        (["--shadow-config", "/nonexistent", "--agreement", "{}"], "--agreement goes with --shadow-url"),
        (
            ["--shadow-url", "http://127.0.0.1:9", "--agreement", '{"outputs": {"logit": {"maxAbsError": 1}}}'],
            "--agreement: agreement.outputs ['logit'] are not outputs of the model "
            "(['label', 'logits', 'positive', 'probs'])",
        ),
        (
            ["--shadow-url", "http://127.0.0.1:9", "--agreement", '{"maxRelativeError": 0.01, "maxRelativeError": 2}'],
            "--agreement: not valid JSON: key 'maxRelativeError' appears twice",
        ),
    ],
    ids=["zero limit", "nan limit", "not an object", "with a config file", "an output the model lacks", "twice"],
)
def test_an_agreement_the_server_cannot_apply_is_refused_at_start(
    models: dict[str, Path], arguments: list[str], message: str
) -> None:
    result = _serve_refusal(str(models["stable"]), *arguments)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
