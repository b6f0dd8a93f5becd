"""`precision: auto` and `engine: auto`: which candidates apply, which one is kept, and how the choice travels
from the build report to the class status and an Event. Pure, no build, no cluster."""

from __future__ import annotations

import functools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgemodel_operator.api.spec import EdgeModelSpec
from edgemodel_operator.api.status import ClassStatus
from edgemodel_operator.builders import Images, cache_key
from edgemodel_operator.buildreport import outcome_of, parse_report
from edgemodel_operator.classes import discover, engine_for
from edgemodel_operator.reconcile import plan
from edgemodel_runtime.build import candidates, compare, report
from edgemodel_runtime.build.candidates import Facts, Row, applicable, choose
from edgemodel_runtime.build.cli import _tolerance
from edgemodel_runtime.build.errors import BadInputError, ExitCode, ValidationFailedError
from edgemodel_runtime.build.request import BuildRequest, DataFile, check_request, options
from tests.unit.test_operator_pure import LATER, NODES, NOW, _observed, edgemodel

DIGEST = "a" * 64
ZEN4 = Facts(has_gpu=False, openvino=("FP32", "BF16", "INT8", "BIN", "EXPORT_IMPORT"), tensorrt=False)
NO_BF16 = Facts(has_gpu=False, openvino=("FP32", "INT8"), tensorrt=False)
NO_OPENVINO = Facts(has_gpu=False, openvino=None, tensorrt=False)
GPU = Facts(has_gpu=True, openvino=None, tensorrt=True)


def _row(name: str, p50: float | None, passed: bool = True, **figures: Any) -> Row:
    engine, precision = name.rsplit("-", 1)
    return Row(name, engine, precision, passed=passed, p50_ms=p50, speedup=None if p50 is None else 10 / p50,
               **figures)  # fmt: skip


def _request(**fields: Any) -> BuildRequest:
    return BuildRequest(model="/m.onnx", sha256=DIGEST, **fields)


# ---------------------------------------------------------------- which candidates apply


@pytest.mark.parametrize(
    ("fields", "facts", "names"),
    [
        ({"engine": "auto", "precision": "auto"}, ZEN4, ["onnxruntime-fp32", "openvino-fp32", "openvino-bf16"]),
        ({"engine": "auto", "precision": "auto"}, NO_BF16, ["onnxruntime-fp32", "openvino-fp32"]),
        ({"engine": "auto", "precision": "auto"}, NO_OPENVINO, ["onnxruntime-fp32"]),
        (
            {"engine": "auto", "precision": "auto", "calibration": DataFile("/c.npz")},
            ZEN4,
            ["onnxruntime-fp32", "openvino-fp32", "openvino-bf16", "onnxruntime-int8", "openvino-int8"],
        ),
        (
            {"engine": "openvino", "precision": "auto", "calibration": DataFile("/c.npz")},
            Facts(has_gpu=False, openvino=("FP32",), tensorrt=False),
            ["openvino-fp32"],  # a CPU OpenVINO gives no INT8 capability: no int8 candidate
        ),
        (
            {"engine": "onnxruntime", "precision": "auto", "quantization": "dynamic"},
            ZEN4,
            ["onnxruntime-fp32", "onnxruntime-int8"],
        ),
        ({"engine": "openvino", "precision": "auto"}, ZEN4, ["openvino-fp32", "openvino-bf16"]),
        ({"engine": "tensorrt", "precision": "auto"}, GPU, ["tensorrt-fp16"]),
        (
            {"engine": "tensorrt", "precision": "auto", "calibration": DataFile("/c.npz")},
            GPU,
            ["tensorrt-fp16", "tensorrt-int8"],
        ),
        ({"engine": "auto", "precision": "auto"}, GPU, ["onnxruntime-fp32"]),  # engine auto never picks tensorrt
        ({"engine": "tensorrt", "precision": "auto"}, ZEN4, []),
    ],
    ids=["zen4", "no bf16", "no openvino", "with calibration", "openvino without int8",
         "onnxruntime dynamic int8", "openvino only",
         "tensorrt on a GPU", "tensorrt with calibration", "engine auto on a GPU node", "tensorrt without a GPU"],
)  # fmt: skip
def test_the_candidates_that_apply_follow_the_request_and_the_machine(
    fields: dict[str, Any], facts: Facts, names: list[str]
) -> None:
    found, skipped = applicable(_request(**fields), facts)
    assert [c.name for c in found] == names
    assert set(skipped) == {c.name for c in candidates.REGISTRY} - set(names)
    assert all(skipped.values()), "every candidate left out says why"


def test_a_candidate_left_out_for_the_cpu_says_what_the_cpu_lacks() -> None:
    _, skipped = applicable(_request(engine="auto", precision="auto"), NO_BF16)
    assert "BF16" in skipped["openvino-bf16"]
    _, skipped = applicable(_request(engine="auto", precision="auto"), NO_OPENVINO)
    assert "not installed" in skipped["openvino-fp32"]


# ---------------------------------------------------------------- the choice


def test_the_fastest_candidate_that_passed_is_chosen() -> None:
    rows = [_row("onnxruntime-fp32", 10.0), _row("openvino-fp32", 8.0), _row("openvino-bf16", 5.0)]
    assert choose(rows).name == "openvino-bf16"


def test_a_faster_candidate_that_failed_its_tolerance_is_not_chosen() -> None:
    rows = [
        _row("onnxruntime-fp32", 10.0),
        _row("openvino-fp32", 8.0),
        _row("openvino-bf16", None, passed=False, failures=("output y: cosine 0.98 < minCosine 0.999",)),
        _row("onnxruntime-int8", None, passed=False, error="BadInput: cannot quantise"),
    ]
    assert choose(rows).name == "openvino-fp32"


def test_candidates_within_the_tie_margin_go_to_the_earlier_more_faithful_one() -> None:
    rows = [_row("onnxruntime-fp32", 11.0), _row("openvino-fp32", 9.8), _row("openvino-bf16", 9.75)]
    assert choose(rows).name == "openvino-fp32"  # 9.8 is within 3% of 9.75; onnxruntime's 11.0 is not
    assert choose(rows, tie=0.0).name == "openvino-bf16"
    assert choose([_row("onnxruntime-fp32", 5.0), _row("openvino-fp32", 5.0)]).name == "onnxruntime-fp32"


def test_when_no_candidate_passes_the_build_fails_with_exit_3_and_the_whole_table() -> None:
    rows = [
        _row("onnxruntime-fp32", None, passed=False, failures=("output y: cosine 0.5 < minCosine 0.9",)),
        _row("openvino-fp32", None, passed=False, error="InfrastructureFailure: out of memory"),
    ]
    with pytest.raises(ValidationFailedError) as raised:
        choose(rows)
    error = raised.value
    assert (error.exit_code, error.reason) == (ExitCode.VALIDATION_FAILED, "NoCandidatePassed")
    assert "cosine 0.5" in str(error)
    assert "out of memory" in str(error)
    assert [r["name"] for r in error.details["auto"]["candidates"]] == ["onnxruntime-fp32", "openvino-fp32"]
    with pytest.raises(ValidationFailedError, match="no candidate applies"):
        choose([])


NAMES = [c.name for c in candidates.REGISTRY]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.floats(min_value=0.01, max_value=1000, allow_nan=False)),
        min_size=1,
        max_size=len(NAMES),
    )
)
def test_the_choice_is_never_a_failed_row_and_never_clearly_slower_than_another_that_passed(
    table: list[tuple[bool, float]],
) -> None:
    rows = [_row(NAMES[i], p50 if ok else None, passed=ok) for i, (ok, p50) in enumerate(table)]
    if not any(ok for ok, _ in table):
        with pytest.raises(ValidationFailedError):
            choose(rows)
        return
    chosen = choose(rows)
    assert chosen.passed
    fastest = min(r.p50_ms for r in rows if r.passed and r.p50_ms is not None)
    assert chosen.p50_ms is not None
    assert chosen.p50_ms <= fastest * (1 + candidates.TIE_FRACTION)
    earlier = rows[: rows.index(chosen)]
    assert not [
        r for r in earlier if r.passed and r.p50_ms is not None and r.p50_ms <= fastest * (1 + candidates.TIE_FRACTION)
    ]


def test_the_reason_names_the_choice_its_speedup_and_the_losers() -> None:
    rows = [_row("onnxruntime-fp32", 10.0, cosine=1.0), _row("openvino-bf16", 5.0, cosine=0.9998),
            _row("openvino-fp32", None, passed=False)]  # fmt: skip
    text = candidates.describe(choose(rows), rows)
    assert text.startswith("chose openvino bf16: 2.00x ONNX Runtime fp32, cosine 0.999800, the fastest of 2")
    assert "slower or tied: onnxruntime-fp32" in text
    assert "failed: openvino-fp32" in text


# ---------------------------------------------------------------- the request, the cache key, the report


def test_engine_auto_needs_precision_auto_and_max_accuracy_drop_needs_a_reference() -> None:
    with pytest.raises(BadInputError, match="precision auto"):
        check_request(_request(engine="auto", precision="fp32"))
    with pytest.raises(BadInputError, match="labels"):
        check_request(_request(max_accuracy_drop=1.0))


def test_the_cache_key_options_cover_what_the_choice_is_judged_on_and_leave_fixed_builds_alone() -> None:
    fixed = options(_request())
    assert "auto" not in fixed
    auto = _request(engine="auto", precision="auto")
    strict = _request(engine="auto", precision="auto", tolerance=compare.Tolerance(min_cosine=0.9999))
    labelled = _request(engine="auto", precision="auto", reference=DataFile("/r.npz", "b" * 64))
    keys = [json.dumps(options(r), sort_keys=True) for r in (auto, strict, labelled)]
    assert len(set(keys)) == 3
    assert options(auto)["auto"]["candidates"] == [c.name for c in candidates.REGISTRY]


def _auto_report() -> dict[str, Any]:
    rows = [_row("onnxruntime-fp32", 10.0, cosine=1.0), _row("openvino-fp32", 8.0, cosine=0.99999999),
            _row("openvino-bf16", 4.0, cosine=0.9998)]  # fmt: skip
    return {
        "version": 1, "status": "built", "exitCode": 0, "cacheKey": "k" * 64, "engine": "openvino",
        "requestedEngine": "auto", "precision": "bf16", "requestedPrecision": "auto", "classKey": "amd64-avx2",
        "artifact": {"file": "model.openvino", "sha256": DIGEST, "reference": "oci://r/e@sha256:" + DIGEST},
        "candidate": {"comparison": {"cosine": 0.9998, "max_abs_error": 0.01, "max_relative_error": 0.02},
                      "latency": {"p50_ms": 4.0, "p99_ms": 5.0}},
        "latency": {"p50_ms": 4.0, "p99_ms": 5.0},
        "validation": {"verdict": "passed", "failures": [], "uninformative": {}, "worstSample": 1},
        "decision": {"action": "auto", "reason": "chose openvino bf16"},
        "auto": {"chosen": "openvino-bf16", "candidates": [r.as_dict() for r in rows], "skipped": {}},
    }  # fmt: skip


def test_the_compact_report_carries_the_choice_and_a_compact_table_within_4_kib() -> None:
    built = _auto_report()
    assert report.summary(built).startswith("built openvino bf16 (chosen by auto from 3 candidates)")
    compact = json.loads(report.compact(built))
    assert compact["chosen"] == "openvino-bf16"
    assert compact["candidates"][2] == {"engine": "openvino", "precision": "bf16", "speedup": 2.5,
                                        "cosine": 0.9998, "passed": True}  # fmt: skip
    built["message"] = "x" * 10_000
    assert len(report.compact(built).encode()) <= report.TERMINATION_LIMIT


# ---------------------------------------------------------------- the operator's side


def test_the_outcome_of_an_auto_build_names_the_engine_chosen_and_the_table() -> None:
    parsed = parse_report(report.compact(_auto_report()))
    assert not isinstance(parsed, str)
    outcome = outcome_of(parsed, job_succeeded=True)
    assert (outcome["engine"], outcome["chosen"], outcome["precision"]) == ("openvino", "openvino-bf16", "bf16")
    assert [c["passed"] for c in outcome["candidates"]] == [True, True, True]


def auto_status() -> tuple[dict[str, Any], list[Any]]:
    """The status and Events the plan writes once an auto build of a CPU class reported its choice."""
    body = edgemodel(targets={"engines": [{"match": {"accelerator": "none"}, "engine": "auto", "precision": "auto"}]})
    cpu = [n for n in NODES if n["metadata"]["name"].startswith("edge-x86")]
    job = next(o for o in plan(_observed(body, nodes=cpu), Images(), NOW).create if o["kind"] == "Job")
    job["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    pod = {"metadata": {"name": "p", "labels": {"job-name": job["metadata"]["name"]}},
           "status": {"phase": "Succeeded", "containerStatuses": [
               {"state": {"terminated": {"exitCode": 0, "message": report.compact(_auto_report())}}}]}}  # fmt: skip
    result = plan(_observed(body, nodes=cpu, jobs=[job], pods=[pod]), Images(), LATER)
    return result.status, result.events


def test_an_auto_class_shows_the_chosen_engine_and_its_table_and_an_event_says_why() -> None:
    body = edgemodel(targets={"engines": [{"match": {"accelerator": "none"}, "engine": "auto", "precision": "auto"}]})
    cpu = [n for n in NODES if n["metadata"]["name"].startswith("edge-x86")]
    job = next(o for o in plan(_observed(body, nodes=cpu), Images(), NOW).create if o["kind"] == "Job")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--engine") + 1] == "auto"
    assert args[args.index("--precision") + 1] == "auto"
    status, events = auto_status()
    (entry,) = status["classes"]
    assert (entry["engine"], entry["precision"], entry["chosen"]) == ("openvino", "bf16", "openvino-bf16")
    assert [(c["engine"], c["precision"]) for c in entry["candidates"]] == [
        ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]  # fmt: skip
    ClassStatus.model_validate(entry)  # what the CRD's status schema accepts
    chosen = [e for e in events if e.reason == "EngineChosen"]
    assert len(chosen) == 1
    assert "chose openvino-bf16 of 3 candidates" in chosen[0].message
    assert "2.50x" in chosen[0].message


def test_the_operator_cache_key_of_an_auto_target_covers_the_tolerance_and_reference() -> None:
    hardware = discover(NODES)[0]

    def key(validation: dict[str, Any], engine: str = "auto", precision: str = "auto") -> str:
        entry = {"match": {}, "engine": engine, "precision": precision}
        spec = EdgeModelSpec.model_validate(edgemodel(targets={"engines": [entry]}, validation=validation)["spec"])
        target = engine_for(spec, hardware)
        assert target is not None
        return cache_key(spec, target, hardware, Images())

    strict, loose = {"tolerance": {"minCosine": 0.9999}}, {"tolerance": {"minCosine": 0.99}}
    assert key(strict) != key(loose)
    assert key(strict, "onnxruntime", "fp32") == key(loose, "onnxruntime", "fp32")  # a fixed build: unchanged


# ---------------------------------------------------------------- the command line


def test_max_accuracy_drop_is_a_tolerance_key_in_percentage_points() -> None:
    tolerance, drop = _tolerance(["minCosine=0.99,maxAccuracyDrop=0.5"])
    assert tolerance == compare.Tolerance(min_cosine=0.99)
    assert drop == 0.5
    assert _tolerance(["maxAccuracyDrop=0"]) == (None, 0.0)
    for bad in ("maxAccuracyDrop=-1", "maxAccuracyDrop=101", "maxAccuracyDrop=nan", "minCosine=0"):
        with pytest.raises(BadInputError, match="out of range"):
            _tolerance([bad])


def test_the_auto_registry_names_are_unique_and_each_builder_is_callable() -> None:
    names = [c.name for c in candidates.REGISTRY]
    assert len(names) == len(set(names))
    assert all(callable(c.build) and callable(c.applies) for c in candidates.REGISTRY)
    assert all(c.name == f"{c.engine}-{c.precision}" for c in candidates.REGISTRY)


def test_the_choice_travels_in_an_annotation_and_a_bad_annotation_is_no_choice() -> None:
    from edgemodel_runtime.build import auto, oci

    built = _auto_report()
    text = json.dumps(auto.annotation(built))
    restored = auto.from_annotations({oci.AUTO_ANNOTATION: text})
    assert (restored["engine"], restored["precision"], restored["auto"]["chosen"]) == ("openvino", "bf16",
                                                                                      "openvino-bf16")  # fmt: skip
    assert (
        json.loads(report.compact({**built, **restored}))["candidates"]
        == json.loads(report.compact(built))["candidates"]
    )
    for bad in ("", "not json", "[]", '{"engine": 3}', "null"):
        assert auto.from_annotations({oci.AUTO_ANNOTATION: bad}) == {}
    assert auto.from_annotations({}) == {}


def test_timing_gives_each_engine_blocks_and_alternates_the_order_every_round() -> None:
    from edgemodel_runtime.build import measure

    calls: list[str] = []
    runners: dict[str, measure.Runner] = {name: functools.partial(calls.append, name) for name in ("a", "b")}
    measure.measure_interleaved(runners, warmup=0, min_runs=10, budget_s=0.0, block=5)
    rounds = [calls[i : i + 6] for i in range(0, len(calls), 6)]
    assert rounds[0] == ["a"] * 6
    assert rounds[1] == ["b"] * 6
    assert rounds[2] == ["b"] * 6  # the order reversed: b ran last, so it runs first
    assert rounds[3] == ["a"] * 6


def test_without_a_reference_the_seeded_samples_auto_is_judged_on_are_in_the_cache_key() -> None:
    """Without a reference the candidates are validated on seeded samples: another count or seed may judge
    them otherwise, so it is another key; with a reference, they are not used and change nothing."""
    auto = options(_request(engine="auto", precision="auto"))
    assert options(_request(engine="auto", precision="auto", samples=32)) != auto
    assert options(_request(engine="auto", precision="auto", seed=7)) != auto
    referenced = {"engine": "auto", "precision": "auto", "reference": DataFile("/r.npz", "b" * 64)}
    assert options(_request(**referenced, samples=32)) == options(_request(**referenced))
