"""Pure parts of `edgemodel build`: URI checks, cache keys, compact reports (comparisons: test_compare.py)."""

from __future__ import annotations

import json

import pytest

from edgemodel_runtime.build import report, tensors
from edgemodel_runtime.build.errors import BadInputError, ExitCode
from edgemodel_runtime.build.fetch import check_digest, parse_source

DIGEST = "ab" * 32


@pytest.mark.parametrize(
    ("uri", "allow_local", "kind"),
    [
        ("https://models.example/det.onnx", False, "https"),
        ("HTTPS://models.example/det.onnx", False, "https"),
        ("oci://127.0.0.1:5000/models/det:v4", False, "oci"),
        ("models/det.onnx", True, "path"),
        ("/abs/det.onnx", True, "path"),
    ],
)
def test_accepted_sources(uri: str, allow_local: bool, kind: str) -> None:
    assert parse_source(uri, allow_local=allow_local).kind == kind


@pytest.mark.parametrize(
    ("uri", "allow_local", "fragment"),
    [
        ("file:///etc/passwd", True, "file:// URIs are refused"),
        ("http://models.example/m.onnx", True, "unsupported scheme"),
        ("ftp://models.example/m.onnx", True, "unsupported scheme"),
        ("models/det.onnx", False, "expected an https:// or oci:// URI"),
        ("https://h/a/../b", True, "'..'"),
        ("https://h/a/%2E%2e/b", True, "'..'"),
        ("../outside.onnx", True, "'..'"),
        ("oci://registry/repo/..", True, "'..'"),
        ("https://u:p@h/m.onnx", True, "credentials"),
        ("https://h/m .onnx", True, "whitespace"),
        ("C:\\models\\m.onnx", True, "backslashes"),
    ],
)
def test_refused_sources_name_the_problem(uri: str, allow_local: bool, fragment: str) -> None:
    with pytest.raises(BadInputError) as caught:
        parse_source(uri, allow_local=allow_local)
    assert fragment in str(caught.value)
    assert caught.value.exit_code == ExitCode.BAD_INPUT


@pytest.mark.parametrize("digest", ["AB" * 32, "sha256:" + "ab" * 32])
def test_digests_are_normalised(digest: str) -> None:
    assert check_digest(digest) == DIGEST


@pytest.mark.parametrize("digest", ["", "ab" * 31, "zz" * 32, "ab" * 33])
def test_malformed_digests_are_refused(digest: str) -> None:
    with pytest.raises(BadInputError, match="not a SHA-256 digest"):
        check_digest(digest)


def test_cache_key_changes_with_every_input_and_only_then() -> None:
    base = {
        "model_sha256": DIGEST,
        "engine": "onnxruntime",
        "precision": "fp32",
        "class_key": "amd64-avx2",
        "builder_version": "edgemodel-0.1.0+onnxruntime-1.32.0",
        "options": {"inputs": {"x": [1, 3]}},
    }
    key = report.cache_key(**base)  # type: ignore[arg-type]
    assert key == report.cache_key(**base)  # type: ignore[arg-type]
    for field, other in [
        ("model_sha256", "cd" * 32),
        ("engine", "tensorrt"),
        ("precision", "int8"),
        ("class_key", "arm64"),
        ("builder_version", "edgemodel-0.2.0"),
        ("options", {"inputs": {"x": [1, 4]}}),
    ]:
        assert report.cache_key(**{**base, field: other}) != key, field  # type: ignore[arg-type]


def test_the_compact_report_names_the_part_images_and_gives_them_up_before_the_artifact() -> None:
    parts = [f"sha256:{n:064x}" for n in range(16)]
    full = {
        "version": 1, "status": "built", "exitCode": 0, "message": "built " + "x" * 3000, "cacheKey": DIGEST,
        "artifact": {"reference": f"oci://r/e@sha256:{DIGEST}", "parts": parts},
    }  # fmt: skip
    kept = json.loads(report.compact(full))
    assert kept["artifact"]["parts"] == parts  # the message is cut first
    assert kept["message"].startswith("built x")
    assert kept["message"].endswith("…")
    small = json.loads(report.compact(full, limit=1000))  # 16 digests alone are 1.2 KB
    assert small["artifact"] == {"reference": f"oci://r/e@sha256:{DIGEST}"}
    assert small["status"] == "built"


@pytest.mark.parametrize("parts", [None, 5, [None, "sha256:x"], {"a": 1}])
def test_malformed_part_images_cost_the_parts_not_the_build(parts: object) -> None:
    from edgemodel_operator.buildreport import outcome_of, parse_report

    text = json.dumps({"v": 1, "status": "built", "exitCode": 0, "cacheKey": DIGEST,
                       "artifact": {"reference": f"oci://r/e@sha256:{DIGEST}", "parts": parts}})  # fmt: skip
    outcome = outcome_of(parse_report(text), job_succeeded=True)
    assert outcome["status"] == "built"
    assert outcome["artifact"] == f"oci://r/e@sha256:{DIGEST}"
    assert outcome.get("artifactParts") == (["sha256:x"] if isinstance(parts, list) else None)


def test_compact_report_fits_the_termination_message_limit_even_with_a_huge_message() -> None:
    full = {
        "version": 1,
        "status": "failed",
        "exitCode": 3,
        "reason": "ToleranceMissed",
        "message": "x" * 20000,
        "cacheKey": DIGEST,
        "candidate": {"comparison": {"cosine": 0.5}, "latency": {"p50_ms": 1.0, "p99_ms": 2.0}},
    }
    text = report.compact(full)
    assert len(text.encode()) <= report.TERMINATION_LIMIT
    parsed = json.loads(text)
    assert parsed["reason"] == "ToleranceMissed"
    assert parsed["cacheKey"] == DIGEST
    assert parsed["message"].startswith("xxx")


@pytest.mark.parametrize(
    ("text", "expected"), [("x=1x3x224x224", ("x", (1, 3, 224, 224))), ("input.1=8", ("input.1", (8,)))]
)
def test_shape_overrides_parse(text: str, expected: tuple[str, tuple[int, ...]]) -> None:
    assert tensors.parse_shape_override(text) == expected


@pytest.mark.parametrize("text", ["x", "x=", "x=1x0", "x=ax3", "=1x3"])
def test_bad_shape_overrides_are_refused(text: str) -> None:
    with pytest.raises(BadInputError, match="--input"):
        tensors.parse_shape_override(text)


def test_dynamic_dims_become_one_unless_fixed_and_fixed_dims_must_fit() -> None:
    declared = [("x", [None, 3, "h", "w"], "tensor(float)")]
    infos = tensors.resolve_inputs(declared, {})
    assert infos[0].shape == (1, 3, 1, 1)
    assert tensors.resolve_inputs(declared, {"x": (2, 3, 8, 8)})[0].shape == (2, 3, 8, 8)
    with pytest.raises(BadInputError, match="does not fit"):
        tensors.resolve_inputs(declared, {"x": (1, 4, 8, 8)})
    with pytest.raises(BadInputError, match="not inputs of the model"):
        tensors.resolve_inputs(declared, {"y": (1,)})
