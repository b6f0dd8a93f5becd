"""`precision: auto` and `engine: auto`: build every candidate that applies, validate, time, keep the fastest.

Steps 3-5 of a build when the request says auto (see `candidates` for the registry and the pure choice):

1. every candidate that applies to this request on this machine is built in its own scratch folder; one that
   cannot be built is a row with its error, never the end of the build;
2. each is validated against the fp32 ONNX Runtime reference on every reference sample with the same
   tolerance (spec.validation.tolerance, else `candidates.AUTO_TOLERANCE`) and, where the reference carries
   labels, the same task metric bound; on a reference that cannot discriminate only fp32 candidates pass;
3. the candidates that pass are timed in one run with the optimised ONNX Runtime fp32 model as the
   baseline (interleaved blocks, see `measure.measure_interleaved`), and the fastest is kept.

The report gets the whole table (`auto`), and the chosen engine's figures where a fixed build puts its own.
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgemodel_runtime.build import candidates, compare, measure, oci, report, tasks, tensors
from edgemodel_runtime.build.errors import BuildError, ValidationFailedError

if TYPE_CHECKING:
    from edgemodel_runtime.build.pipeline import _Build
    from edgemodel_runtime.build.request import BuildRequest

BASELINE = "onnxruntime-fp32"


def is_auto(request: BuildRequest) -> bool:
    return candidates.AUTO in (request.engine, request.precision)


def annotation(built: dict[str, Any]) -> dict[str, Any]:
    """What an auto build's artifact carries (as the OCI annotation `oci.AUTO_ANNOTATION`): the chosen engine,
    precision and candidate, and the compact table, so that a registry cache hit reports them too."""
    compact = report.compact_auto(built.get("auto"))
    return {"engine": built["engine"], "precision": built["precision"], **compact}


def from_annotations(annotations: dict[str, str]) -> dict[str, Any]:
    """The fields of a cached report from an auto build's annotation: engine, precision and `auto`
    (chosen and candidates); empty when the artifact carries none (or an unreadable one)."""
    try:
        found = json.loads(annotations.get(oci.AUTO_ANNOTATION, "") or "null")
    except ValueError:
        return {}
    if not isinstance(found, dict) or not isinstance(found.get("engine"), str):
        return {}
    listed = found.get("candidates")
    rows: list[Any] = listed if isinstance(listed, list) else []
    return {
        "engine": found["engine"],
        "precision": found.get("precision"),
        "auto": {"chosen": found.get("chosen"), "candidates": [r for r in rows if isinstance(r, dict)]},
    }


def facts() -> candidates.Facts:
    """What this machine offers the candidates (imports OpenVINO and TensorRT if they are installed)."""
    from edgemodel_runtime.build import hardware

    openvino: tuple[str, ...] | None
    try:
        from edgemodel_runtime.engines import openvino_engine

        openvino = tuple(openvino_engine.capabilities())
    except (BuildError, ImportError, RuntimeError):
        openvino = None
    try:
        import tensorrt  # noqa: F401

        has_tensorrt = True
    except ImportError:
        has_tensorrt = False
    return candidates.Facts(has_gpu=hardware.detect().gpu_name is not None, openvino=openvino, tensorrt=has_tensorrt)


def tolerance_of(request: BuildRequest) -> compare.Tolerance:
    return request.tolerance or candidates.AUTO_TOLERANCE


def _validated(
    state: _Build,
    candidate: candidates.Candidate,
    artifact: Path,
    context: candidates.Context,
    labels: tasks.Labels | None,
) -> tuple[candidates.Row, compare.Comparison | None]:
    """The candidate's row before timing: its figures, and whether it passed the tolerance and task bound."""
    row = candidates.Row(candidate.name, candidate.engine, candidate.precision, passed=False)
    samples, expected = list(context.samples), list(context.expected)
    try:
        outputs = state._outputs(artifact, samples, candidate.engine)
        comparison = compare.compare(expected, outputs)
    except (ValueError, KeyError, BuildError) as error:
        return replace(row, error=f"{type(error).__name__}: {error}"), None
    missed = [m.text for m in compare.failures(comparison, context.tolerance)]
    if not comparison.informative and candidate.precision != "fp32":
        missed.append("the reference cannot discriminate, so a precision below fp32 cannot be judged on it")
    task = None
    if labels is not None:
        task = tasks.evaluate(labels, expected, outputs, state.request.max_accuracy_drop)
        missed += task.failures
    row = replace(
        row,
        passed=not missed,
        failures=tuple(missed),
        cosine=comparison.cosine,
        max_relative_error=comparison.max_relative_error,
        top1_agreement=comparison.top1_agreement,
        task_metric=task.candidate if task is not None else None,
    )
    return row, comparison


def choose_engine(
    state: _Build,
    model: Path,
    inputs: list[tensors.TensorInfo],
    samples: list[tensors.Sample],
    expected: list[tensors.Sample],
) -> Path:
    """Steps 3-5 for auto: the chosen artifact; the report gets `auto`, the chosen engine, its figures.

    Raises ValidationFailedError (exit 3, NoCandidatePassed, with the table) when no candidate passes, and
    LatencyBudgetMissed when the chosen one misses spec.validation.latencyBudget.
    """
    request = state.request
    tolerance = tolerance_of(request)
    state.report["tolerance"] = vars(tolerance)
    found = facts()
    chosen_from, skipped = candidates.applicable(request, found)
    state.report["auto"] = {"skipped": skipped, "chosen": None, "candidates": []}
    context = candidates.Context(
        request=request,
        model=model,
        inputs=inputs,
        work=state.work,
        external=state.external,
        samples=samples,
        expected=expected,
        tolerance=tolerance,
        standard=lambda engine, precision: state._optimise(model, inputs, engine, precision),
        calibration=lambda: state._calibration(inputs, request.calibration_method),
    )
    labels = state.labels
    rows: list[candidates.Row] = []
    built: dict[str, Path] = {}
    comparisons: dict[str, compare.Comparison] = {}
    for candidate in chosen_from:
        work = state.work / "candidates" / candidate.name
        own = replace(context, work=work, standard=functools.partial(state._optimise, model, inputs, work=work))
        try:
            artifact = candidate.build(own)
        except BuildError as error:
            rows.append(candidates.Row(candidate.name, candidate.engine, candidate.precision, passed=False,
                                       error=f"{error.reason}: {error}"))  # fmt: skip
            continue
        row, comparison = _validated(state, candidate, artifact, own, labels)
        rows.append(row)
        if comparison is not None:
            comparisons[candidate.name] = comparison
        if row.passed:
            built[candidate.name] = artifact
    rows = _timed(state, model=model, inputs=inputs, samples=samples, rows=rows, built=built)
    state.report["auto"]["candidates"] = [r.as_dict() for r in rows]
    winner = candidates.choose(rows)
    decision = candidates.describe(winner, rows)
    state.report["auto"]["chosen"] = winner.name
    state.report["engine"], state.report["precision"] = winner.engine, winner.precision
    comparison = comparisons[winner.name]
    state.report["candidate"] = {"comparison": comparison.as_dict(), "latency": state.timings[winner.name].as_dict()}
    state.report["validation"] = report.validation_verdict(comparison, [])
    state._warn(state.report["validation"], expected)
    state.report["decision"] = {"action": "auto", "reason": decision}
    state.report["latency"] = state.timings[winner.name].as_dict()
    if labels is not None:
        state.report["task"] = tasks.evaluate(
            labels, expected, state._outputs(built[winner.name], samples, winner.engine), request.max_accuracy_drop
        ).as_dict()
    budget = request.latency_budget_ms
    if budget is not None and state.timings[winner.name].p99_ms > budget:
        raise ValidationFailedError(
            f"p99 latency {state.timings[winner.name].p99_ms:.2f} ms of the fastest candidate ({winner.name}) "
            f"exceeds the budget of {budget} ms on this class",
            reason="LatencyBudgetMissed",
        )
    for name, artifact in built.items():  # free the scratch space of the losers before publishing
        if name != winner.name:
            shutil.rmtree(artifact.parent, ignore_errors=True)
    return built[winner.name]


def _timed(
    state: _Build,
    *,
    model: Path,
    inputs: list[tensors.TensorInfo],
    samples: list[tensors.Sample],
    rows: list[candidates.Row],
    built: dict[str, Path],
) -> list[candidates.Row]:
    """The rows with the passing candidates' latency and speedup over ONNX Runtime fp32, timed in one run."""
    if not built:
        return rows
    baseline = built.get(BASELINE)
    if baseline is None:
        baseline = state._optimise(model, inputs, "onnxruntime", "fp32", state.work / "baseline")
    engines = {r.name: r.engine for r in rows}
    runners: dict[str, measure.Runner] = {}
    if BASELINE not in built:
        runners["baseline"] = state._runner(baseline, samples[0], "onnxruntime")
    for name, artifact in built.items():
        runners[name] = state._runner(artifact, samples[0], engines[name])
    latency = measure.measure_interleaved(runners, budget_s=state.request.benchmark_seconds)
    state.timings = latency
    base = latency["baseline" if "baseline" in latency else BASELINE].p50_ms
    if "baseline" in latency:
        state.report["auto"]["baseline"] = {"name": BASELINE, "latency": latency["baseline"].as_dict()}
    timed = []
    for row in rows:
        figures: dict[str, Any] = {}
        if row.name in latency:
            own = latency[row.name]
            figures = {"p50_ms": own.p50_ms, "p99_ms": own.p99_ms, "speedup": base / own.p50_ms if own.p50_ms else None}
        timed.append(replace(row, **figures))
    return timed
