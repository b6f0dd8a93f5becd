"""spec.rollout.analysis.agreement from the EdgeModel to the stable servers, the evidence and the Events;
a build's validation verdict in the class status."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemodel_operator.analysis import Evidence, analyse
from edgemodel_operator.api.spec import Analysis, EdgeModelSpec, Rollout
from edgemodel_runtime.build.compare import DEFAULT_AGREEMENT, Tolerance, Tolerances
from edgemodel_runtime.serve.shadow import every_output_in_binary, inference_seconds
from edgemodel_runtime.serve.shadow_config import ShadowConfigError, parse_agreement, parse_shadow_config
from tests.unit.test_operator_pure import DIGEST
from tests.unit.test_rollout import Cluster, _counters, _serving_first_revision, _shadowing

Obj = dict[str, Any]


def _shadow_entry(cluster: Cluster) -> Obj:
    (value,) = cluster.objects["ConfigMap", "ocr-shadow"]["data"].values()
    entry: Obj = json.loads(value)
    return entry


def test_the_documented_defaults_are_the_runtime_defaults() -> None:
    agreement = Analysis().agreement
    assert agreement.runtime_config() == {"maxRelativeError": 0.05, "minTop1Agreement": 1.0}
    assert parse_agreement(agreement.runtime_config()) == Tolerances(DEFAULT_AGREEMENT) == parse_agreement(None)


@pytest.mark.parametrize(
    ("given", "default"),
    [
        ({}, DEFAULT_AGREEMENT),
        ({"outputs": {"boxes": {"maxAbsError": 2}}}, DEFAULT_AGREEMENT),
        ({"minCosine": 0.99}, replace(DEFAULT_AGREEMENT, min_cosine=0.99)),
        ({"maxAbsError": 1e-3}, replace(DEFAULT_AGREEMENT, max_abs_error=1e-3)),
        ({"minTop1Agreement": 0}, replace(DEFAULT_AGREEMENT, min_top1_agreement=0.0)),
        ({"maxRelativeError": 1e6, "minTop1Agreement": 1}, replace(DEFAULT_AGREEMENT, max_relative_error=1e6)),
    ],
)
def test_a_limit_the_server_is_not_given_keeps_its_default_as_in_the_spec(given: Obj, default: Tolerance) -> None:
    """--agreement and the shadow file read absent limits as spec.rollout.analysis.agreement defaults them:
    setting one limit (or only per-output ones) must not drop the others to "no limits"."""
    parsed = parse_agreement(given)
    assert parsed.default == default
    if "outputs" not in given:  # the spec lists per-output limits; the server's file keys them by name
        assert (
            parse_agreement(Analysis.model_validate({"agreement": given}).agreement.runtime_config()).default == default
        )
    assert all(tolerance == default.merged(tolerance) for _, tolerance in parsed.outputs)


@pytest.mark.parametrize(
    "content",
    [
        b'{"url": "http://c:8080", "url": "http://d:8080"}',
        b'{"url": "http://c:8080", "agreement": {"minCosine": 0.9, "minCosine": 0.99}}',
        b'{"url": "http://c:8080", "agreement": {"outputs": {"y": {"maxAbsError": 1}, "y": {"maxAbsError": 2}}}}',
    ],
    ids=["url", "limit", "output"],
)
def test_a_shadow_file_giving_a_key_twice_is_refused_not_read_as_its_last_value(content: bytes) -> None:
    with pytest.raises(ShadowConfigError, match="appears twice"):
        parse_shadow_config(content)


def test_the_default_agreement_reaches_the_stable_servers_and_the_shadow_started_event() -> None:
    cluster, _ = _serving_first_revision()
    _, started = _shadowing(cluster)
    entry = _shadow_entry(cluster)
    assert entry["agreement"] == {"maxRelativeError": 0.05, "minTop1Agreement": 1.0}
    config = parse_shadow_config(json.dumps(entry).encode())
    assert config is not None
    assert config.agreement == Tolerances(DEFAULT_AGREEMENT)
    (event,) = [e for e in started.events if e.reason == "ShadowStarted"]
    assert "a request agrees within maxRelativeError 0.05, minTop1Agreement 1" in event.message


def test_a_user_defined_agreement_with_per_output_limits_is_what_the_servers_apply() -> None:
    agreement = {
        "maxRelativeError": 0.1,
        "minCosine": 0.99,
        "outputs": [{"name": "boxes", "maxAbsError": 2.0}, {"name": "scores", "minTop1Agreement": 0}],
    }
    cluster, _ = _serving_first_revision(analysis={"agreement": agreement})
    _shadowing(cluster)
    config = parse_shadow_config(json.dumps(_shadow_entry(cluster)).encode())
    assert config is not None
    default = Tolerance(max_relative_error=0.1, min_cosine=0.99, min_top1_agreement=1.0)
    assert config.agreement == Tolerances(
        default,
        (
            ("boxes", Tolerance(max_abs_error=2.0, max_relative_error=0.1, min_cosine=0.99, min_top1_agreement=1.0)),
            ("scores", Tolerance(max_relative_error=0.1, min_cosine=0.99, min_top1_agreement=0.0)),
        ),
    )


def test_the_agreement_appears_in_the_evidence_and_the_rollback_event() -> None:
    cluster, _ = _serving_first_revision(analysis={"agreement": {"maxRelativeError": 0.2}})
    _shadowing(cluster)
    key = cluster.body["status"]["classes"][0]["key"]
    cluster.evidence = {key: {"stable-pod": _counters(200, 200, 20)}}
    rolled = cluster.step("2026-11-26T12:02:30Z")
    within = "agreeing within maxRelativeError 0.2, minTop1Agreement 1"
    assert within in rolled.status["classes"][0]["shadow"]["reason"]
    (event,) = [e for e in rolled.events if e.reason == "RolledBack"]
    assert within in event.message


@pytest.mark.parametrize(
    ("agreement", "fragment"),
    [
        ({"maxRelativeError": 0}, "within (0, 1e+06]"),
        ({"maxRelativeError": -1}, "within (0, 1e+06]"),
        ({"minTop1Agreement": 1.5}, "within [0, 1]"),
        ({"minCosine": -2}, "within [-1, 1]"),
        ({"maxAbsError": "0.1"}, "must be a number"),
        ({"maxAbsError": True}, "must be a number"),
        ({"maxRelErr": 0.1}, "unknown key(s) maxRelErr"),
        ({"outputs": [{"name": "y"}]}, "agreement.outputs must be a JSON object"),
        ({"outputs": {"y": {"minCosine": 7}}}, "agreement.outputs['y'].minCosine must be within [-1, 1]"),
        ([0.05], "agreement must be a JSON object"),
    ],
)
def test_an_invalid_agreement_in_the_shadow_configuration_is_refused_with_its_reason(
    agreement: Any, fragment: str
) -> None:
    content = json.dumps({"url": "http://candidate:8080", "agreement": agreement}).encode()
    with pytest.raises(ShadowConfigError) as caught:
        parse_shadow_config(content)
    assert fragment in str(caught.value)


def test_non_finite_limits_cannot_reach_a_server() -> None:
    content = b'{"url": "http://candidate:8080", "agreement": {"maxRelativeError": NaN}}'
    with pytest.raises(ShadowConfigError, match="NaN is not JSON"):
        parse_shadow_config(content)


@pytest.mark.parametrize(
    "agreement",
    [{"maxRelativeError": 0}, {"minTop1Agreement": 1.5}, {"minCosine": -1.5}, {"maxAbsError": 0}],
)
def test_out_of_range_limits_are_refused_by_the_api_types(agreement: Obj) -> None:
    spec = {"model": {"uri": "oci://r/m:v1", "sha256": DIGEST}, "rollout": {"analysis": {"agreement": agreement}}}
    with pytest.raises(ValueError, match="agreement"):
        EdgeModelSpec.model_validate(spec)


def _finish_builds_with(cluster: Cluster, compact: Obj) -> None:
    cluster.finish_builds()
    for (kind, _), pod in cluster.objects.items():
        if kind == "Pod":
            pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = json.dumps(compact)


def test_an_uninformative_validation_shows_in_the_class_status() -> None:
    body: Obj = {
        "apiVersion": "edgeml.dev/v1alpha1",
        "kind": "EdgeModel",
        "metadata": {"name": "ocr", "namespace": "apps", "uid": "u-1", "generation": 1},
        "spec": {"model": {"uri": "oci://registry.local/m:v1", "sha256": DIGEST}},
    }
    cluster = Cluster(body)
    cluster.step("2026-11-26T12:00:00Z")
    compact = {
        "v": 1, "status": "built", "exitCode": 0, "cacheKey": "k", "precision": "fp32",
        "artifact": {"reference": "oci://r/e@sha256:" + "a" * 64},
        "metrics": {"max_abs_error": None, "cosine": None, "worst_sample": None, "nonfinite": 0, "samples": 8},
        "validation": {"verdict": "uninformative", "uninformative": ["sigmoid_0.tmp_0"]},
    }  # fmt: skip
    _finish_builds_with(cluster, compact)
    entry = cluster.step("2026-11-26T12:00:10Z").status["classes"][0]
    assert entry["metrics"] == {"validation": "uninformative", "uninformativeOutputs": ["sigmoid_0.tmp_0"]}


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
LIMIT_KEYS = st.sampled_from(["maxAbsError", "maxRelativeError", "minCosine", "minTop1Agreement", "outputs", "x"])


@settings(max_examples=300, deadline=None)
@given(agreement=JSON | st.dictionaries(LIMIT_KEYS, JSON | st.floats(), max_size=5))
def test_any_agreement_content_is_applied_or_refused_with_a_reason_never_a_crash(agreement: Any) -> None:
    content = json.dumps({"url": "http://candidate:8080", "agreement": agreement}).encode()
    try:
        config = parse_shadow_config(content)
    except ShadowConfigError as error:
        refusal = str(error)
        assert refusal.startswith(("agreement", "not valid JSON")), refusal  # names what it refused
        return
    assert config is not None
    for _, tolerance in ((None, config.agreement.default), *config.agreement.outputs):
        for limit in (tolerance.max_abs_error, tolerance.max_relative_error, tolerance.min_cosine):
            assert limit is None or math.isfinite(limit)


@pytest.mark.parametrize(
    ("evidence", "says"),
    [
        (Evidence(mirrored=200, compared=200, agreed=200, latency_ratio=math.nan), "latency ratio is nan"),
        (Evidence(mirrored=200, compared=200, agreed=200, latency_ratio=math.inf), "latency ratio is inf"),
        (Evidence(mirrored=math.nan, compared=200, agreed=200, latency_ratio=1.0), "error rate is nan"),
        (Evidence(mirrored=200, compared=200, agreed=math.nan, latency_ratio=1.0), "agreement is nan"),
    ],
)
def test_evidence_that_is_not_a_finite_number_rolls_back_instead_of_passing_or_waiting(
    evidence: Evidence, says: str
) -> None:
    rollout = Rollout.model_validate({"shadow": {"minRequests": 100, "duration": "60s"}})
    verdict = analyse(evidence, rollout, 61, approved=False)
    assert verdict.decision == "Rollback"
    assert says in verdict.reason


@pytest.mark.parametrize("header", ["nan", "inf", "-1", "abc", None])
def test_a_candidate_inference_time_that_is_not_a_time_falls_back_to_the_round_trip(header: str | None) -> None:
    assert inference_seconds(header, 0.25) == 0.25


def test_the_mirrored_copy_asks_for_every_output_in_binary_and_keeps_the_binary_inputs() -> None:
    header = json.dumps({"inputs": [{"name": "x", "parameters": {"binary_data_size": 4}}],
                         "outputs": [{"name": "probs", "parameters": {"binary_data": False}}]}).encode()  # fmt: skip
    body, headers = every_output_in_binary(header + b"\0\0\0\0", {"inference-header-content-length": str(len(header))})
    length = int(headers["inference-header-content-length"])
    document = json.loads(body[:length])
    assert "outputs" not in document
    assert document["parameters"] == {"binary_data_output": True}
    assert body[length:] == b"\0\0\0\0"


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats(width=32) | st.floats() | st.integers(-(2**64), 2**64), min_size=1, max_size=8))
def test_the_copy_carries_every_json_number_as_stable_read_it_nan_and_infinity_included(values: list[Any]) -> None:
    from edgemodel_runtime.serve import codec

    document = {"model_version": "r1", "inputs": [{"name": "x", "data": values}], "outputs": [{"name": "y"}]}
    body, headers = every_output_in_binary(json.dumps(document, allow_nan=True).encode(), {})
    copy = codec.loads(body[: int(headers["inference-header-content-length"])], "copy")
    assert set(copy) == {"inputs", "parameters"}
    read = copy["inputs"][0]["data"]
    assert [repr(v) for v in read] == [repr(v) for v in codec.loads(json.dumps(values).encode(), "original")]


def test_a_copy_that_cannot_be_read_is_sent_unchanged() -> None:
    assert every_output_in_binary(b"\x1f\x8b gzip", {}) == (b"\x1f\x8b gzip", {})


def test_disagreements_by_reason_are_summed_over_pods_and_quoted_in_the_verdict() -> None:
    from edgemodel_operator.evidence import summed

    def sample(name: str, pod: str, value: float, **labels: str) -> tuple[str, dict[str, str], float]:
        return name, {"class": "c1", "candidate_revision": "r2", "pod": pod, **labels}, value

    samples = [
        sample("edgemodel_shadow_mirrored_total", "a", 100),
        sample("edgemodel_shadow_mirrored_total", "b", 100),
        sample("edgemodel_shadow_compared_total", "a", 100),
        sample("edgemodel_shadow_compared_total", "b", 100),
        sample("edgemodel_shadow_agreed_total", "a", 90),
        sample("edgemodel_shadow_agreed_total", "b", 80),
        sample("edgemodel_shadow_disagreed_total", "a", 10, reason="missing_output"),
        sample("edgemodel_shadow_disagreed_total", "b", 15, reason="nonfinite"),
        sample("edgemodel_shadow_disagreed_total", "b", 5, reason="missing_output"),
        # a candidate this class no longer shadows: not counted
        ("edgemodel_shadow_disagreed_total", {"class": "c1", "candidate_revision": "r1", "reason": "top1"}, 99),
    ]
    evidence = summed(samples, {"c1": "r2"})["c1"]
    assert evidence.disagreed == (("missing_output", 15.0), ("nonfinite", 15.0))
    rollout = Rollout.model_validate({"shadow": {"minRequests": 100, "duration": "60s"}})
    verdict = analyse(replace(evidence, latency_ratio=1.0), rollout, 61, approved=False)
    assert verdict.decision == "Rollback"
    assert "disagreed by first reason: missing_output 15, nonfinite 15" in verdict.reason
