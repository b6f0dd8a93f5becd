"""Accuracy-aware INT8 for ONNX Runtime: as fast as INT8 can be on this class, and within the tolerance.

One call, no per-model settings::

    accuracy_aware_int8(model, calibration, samples, expected, *, tolerance, work,
                        min_speedup=1.1, benchmark_seconds=2.0, methods=None, fp32_model=None,
                        log=lambda line: None) -> Int8Outcome

`model` is the ONNX model (Path), `calibration` the inputs ranges are calibrated on, `samples` the validation
inputs and `expected` the fp32 reference's outputs for them (same order), `tolerance` a `compare.Tolerance` or
`compare.Tolerances`, `work` a scratch directory. The outcome names the model to ship (`path`, an ONNX file in
`work`), its precision (`int8`, or `fp32` when INT8 does not pay), whether it meets the tolerance (`met`), its
comparison, the paired speed ratio, the calibration chosen and the nodes kept in FP32 with their measured effect;
`as_report()` gives the report's `int8` section. Raises BadInputError (exit 2) when the model cannot be
quantised; a tolerance that cannot be met is `met=False`, for the caller to turn into exit 3.

The procedure, in order:

1. Speed gate. Conv and MatMul only are quantised (Gemm too: pre-processing fuses a MatMul and its Add into
   one), as QDQ with unsigned 8-bit activations and signed 8-bit per-channel weights, calibrated with minmax,
   and timed against the fp32-optimised model in one run (`measure.paired_ratio`: blocks per model, the first
   call after a switch untimed, the order alternating, the median of per-round ratios). Below `min_speedup` the
   fp32-optimised model is shipped: it is faster and faithful. Small models lose here: the Q/DQ work
   outweighs the cheaper arithmetic.
2. Calibration. minmax, percentile (99.999th percentile) and entropy (KL divergence over a
   `ENTROPY_BINS`-bin histogram) each quantise the model; the one whose outputs use least of the tolerance on the
   validation set wins (`tolerance_load`).
3. Nodes kept in FP32. When the winner misses the tolerance, each quantised node's own error is measured: the
   model with only that node quantised, every other one computing in FP32 by graph surgery on the quantised
   model (Q/DQ pairs bypassed, weights restored from the fp32 model, so nothing is calibrated again). The
   fewest of the most harmful nodes that meet the tolerance stay FP32 (doubling, then bisection, on the
   ranking).
4. Re-time the result against fp32; below `min_speedup` ship fp32 instead.

ONNX Runtime's own `quantize_static` cannot do entropy calibration usefully: it builds the entropy calibrator with
128 histogram bins and 128 quantised bins, so the threshold search has a single candidate (the full range) and
entropy equals minmax. Ranges are therefore computed here with `create_calibrator` and an adequate histogram,
then handed to `quantize_static` as its calibration cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edgemodel_runtime.build import compare, measure
from edgemodel_runtime.build.errors import BadInputError
from edgemodel_runtime.build.qdq import OP_TYPES, keep_fp32, quantized_nodes
from edgemodel_runtime.build.tensors import Sample
from edgemodel_runtime.engines import onnxruntime_engine as ortx

__all__ = [
    "CALIBRATION_METHODS",
    "ENTROPY_BINS",
    "OP_TYPES",
    "Int8Outcome",
    "accuracy_aware_int8",
    "calibration_ranges",
    "paired_speedup",
    "tolerance_load",
]

CALIBRATION_METHODS: tuple[ortx.CalibrationMethodName, ...] = ("minmax", "percentile", "entropy")
ENTROPY_BINS = ortx.ENTROPY_BINS
Outputs = Mapping[str, npt.NDArray[Any]]


@dataclass(frozen=True)
class Int8Outcome:
    """What `accuracy_aware_int8` decided, and the evidence.

    `path`: the model to ship; `precision`: `int8` or `fp32`; `met`: whether `path` meets the tolerance;
    `comparison`: `path` against the reference; `speedup`: how many times faster int8 ran than fp32 at the last
    timing (> 1: int8 faster); `latency`: the last timing's figures by `fp32` / `int8`; `calibration`: the
    method chosen (None when the speed gate stopped before choosing); `calibrations`: each method's figures;
    `fp32_nodes`: the nodes kept in FP32, most harmful first, each with its measured effect; `action` and
    `reason`: the decision.
    """

    path: Path
    precision: Literal["int8", "fp32"]
    met: bool
    comparison: compare.Comparison
    speedup: float
    latency: dict[str, measure.Latency]
    action: Literal["int8", "speed-gate-fp32", "retime-fp32", "tolerance-unmet"]
    reason: str
    calibration: str | None = None
    calibrations: list[dict[str, Any]] = field(default_factory=list)
    fp32_nodes: list[dict[str, Any]] = field(default_factory=list)
    quantized: int = 0  # Conv/MatMul nodes quantised before any was kept in FP32

    def as_report(self) -> dict[str, Any]:
        """The build report's `int8` section (JSON-ready)."""
        return {
            "shipped": self.precision,
            "met": self.met,
            "action": self.action,
            "reason": self.reason,
            "speedup": round(self.speedup, 3),
            "latency": {name: figures.as_dict() for name, figures in self.latency.items()},
            "calibration": self.calibration,
            "calibrations": self.calibrations,
            "quantizedNodes": self.quantized,
            "fp32Nodes": self.fp32_nodes,
        }


def tolerance_load(comparison: compare.Comparison, tolerance: compare.Tolerance | compare.Tolerances) -> float:
    """How much of the tolerance the comparison uses: the largest figure / limit over the informative outputs'
    limits (0 = identical, <= 1 = within, inf = a non-finite or exact mismatch). Errors count as error / limit,
    cosine and top-1 agreement as (1 - figure) / (1 - limit)."""
    tolerances = tolerance if isinstance(tolerance, compare.Tolerances) else compare.Tolerances(tolerance)
    load = 0.0
    for figures in comparison.outputs:
        if figures.nonfinite or figures.exact_mismatches:
            return math.inf
        if figures.uninformative is not None:
            continue
        load = max(load, _figures_load(figures, tolerances.of(figures.name), over_zero=math.inf))
    return load


def mean_sample_load(comparison: compare.Comparison, tolerance: compare.Tolerance | compare.Tolerances) -> float:
    """`tolerance_load` per sample (the default tolerance, informative outputs), averaged over the samples: a
    smoother measure than the worst case, used to rank nodes whose effect on the worst case ties."""
    limit = tolerance.default if isinstance(tolerance, compare.Tolerances) else tolerance
    loads = []
    for figures in comparison.per_sample:
        loads.append(_figures_load(figures, limit, over_zero=0.0))
    return float(np.mean(loads)) if loads else 0.0


def _figures_load(figures: Any, limit: compare.Tolerance, *, over_zero: float) -> float:
    """The largest figure / limit of one output's (or one sample's) figures: errors as error / limit, cosine and
    top-1 agreement as (1 - figure) / (1 - limit); `over_zero` where a limit allows nothing and some is used."""
    load = 0.0
    for value, bound, at_least in (
        (figures.max_abs_error, limit.max_abs_error, False),
        (figures.max_relative_error, limit.max_relative_error, False),
        (figures.cosine, limit.min_cosine, True),
        (figures.top1_agreement, limit.min_top1_agreement, True),
    ):
        if value is None or bound is None:
            continue
        used, allowed = (1.0 - value, 1.0 - bound) if at_least else (value, bound)
        load = max(load, max(used, 0.0) / allowed if allowed > 0 else (0.0 if used <= 0 else over_zero))
    return load


def _figures(comparison: compare.Comparison, load: float) -> dict[str, Any]:
    return {
        "toleranceLoad": _rounded(load),
        "cosine": comparison.cosine,
        "maxRelativeError": comparison.max_relative_error,
        "top1Agreement": comparison.top1_agreement,
    }


def _rounded(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None


def calibration_ranges(
    prepared: Path, calibration: Sequence[Sample], method: ortx.CalibrationMethodName, work: Path
) -> Any:
    """ONNX Runtime `TensorsData` (tensor name -> range) for the inputs and outputs of `OP_TYPES` nodes
    (`onnxruntime_engine.calibration_ranges`: entropy with an adequate histogram)."""
    return ortx.calibration_ranges(prepared, calibration, method, work, OP_TYPES)


def _quantize(prepared: Path, target: Path, ranges: Any, method: ortx.CalibrationMethodName) -> Path:
    """QDQ, U8 activations, S8 per-channel weights, `OP_TYPES` only, from ranges computed beforehand."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    cache = target.with_suffix(".ranges.json")
    cache.unlink(missing_ok=True)
    save_tensors_data(ranges, cache)
    kinds = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}  # fmt: skip
    try:
        quantize_static(
            str(prepared),
            str(target),
            None,
            calibration_cache_path=str(cache),
            calibrate_method=kinds[method],
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(OP_TYPES),
        )
    except Exception as error:
        raise BadInputError(f"static quantisation failed: {error}", reason="QuantizationFailed") from error
    finally:
        cache.unlink(missing_ok=True)
    return target


def _prepare(model: Path, work: Path) -> Path:
    """The model as quantisation needs it (opset >= 13, shapes inferred, constants folded), every node named."""
    import onnx

    prepared = ortx.prepare_for_quantization(model, work / "int8.onnx")
    graph = onnx.load(str(prepared))
    used = {node.name for node in graph.graph.node}
    for index, node in enumerate(graph.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"
            while node.name in used:
                node.name += "_"
            used.add(node.name)
    target = work / "prepared.onnx"
    onnx.save(graph, str(target))
    return target


def paired_speedup(fp32: Path, int8: Path, sample: Sample, budget_s: float) -> tuple[float, dict[str, measure.Latency]]:
    """How many times faster int8 runs than fp32 on this machine (`measure.paired_ratio`: the median over rounds
    of per-round ratios), and both latencies (`fp32`, `int8`)."""
    ratio, latency = measure.paired_ratio(_runner(fp32, sample), _runner(int8, sample), budget_s=budget_s)
    return ratio, {"fp32": latency["baseline"], "int8": latency["candidate"]}


def _runner(path: Path, sample: Sample) -> measure.Runner:
    session = ortx.session(path)
    names = [o.name for o in session.get_outputs()]

    def run_once() -> object:
        return session.run(names, sample)

    return run_once


def _outputs(path: Path, samples: Sequence[Sample]) -> list[dict[str, npt.NDArray[Any]]]:
    session = ortx.session(path)
    return [ortx.run(session, sample) for sample in samples]


@dataclass
class _Search:
    """The state of one search: what it needs to evaluate a model against the reference."""

    samples: Sequence[Sample]
    expected: Sequence[Outputs]
    tolerance: compare.Tolerance | compare.Tolerances
    work: Path
    log: Callable[[str], None]
    evaluated: int = 0

    def evaluate(self, path: Path) -> tuple[compare.Comparison, float]:
        self.evaluated += 1
        comparison = compare.compare(self.expected, _outputs(path, self.samples))
        return comparison, tolerance_load(comparison, self.tolerance)

    def mean(self, comparison: compare.Comparison) -> float:
        return mean_sample_load(comparison, self.tolerance)

    def passes(self, comparison: compare.Comparison) -> bool:
        return not compare.failures(comparison, self.tolerance)

    def evaluate_model(self, model: Any, name: str) -> tuple[compare.Comparison, float]:
        import onnx

        path = self.work / name
        onnx.save(model, str(path))
        try:
            return self.evaluate(path)
        finally:
            path.unlink(missing_ok=True)


def _rank(search: _Search, quantized: Any, originals: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every quantised node with the error it causes alone: the model with only that node quantised (every other
    one in FP32, by surgery) against the reference. `effect` is that model's tolerance load (worst sample),
    `meanEffect` its mean per-sample load; most harmful first.

    Alone, each node's error shows however the others' errors are distributed; un-quantising one node of the
    fully quantised model instead measures little where several nodes share the worst error, each masking the
    others (PP-OCRv4 rec: no single node's removal moved the worst case).
    """
    candidates = quantized_nodes(quantized)
    search.log(f"int8: measuring the error each of {len(candidates)} quantised nodes causes alone")
    ranked = []
    for name in candidates:
        others = [other for other in candidates if other != name]
        comparison, load = search.evaluate_model(keep_fp32(quantized, others, originals), "rank.onnx")
        op_type = next(n.op_type for n in quantized.graph.node if n.name == name)
        ranked.append({"node": name, "opType": op_type, "effect": load, "meanEffect": search.mean(comparison)})
    ranked.sort(key=lambda entry: (-entry["effect"], -entry["meanEffect"]))
    return ranked


def _fewest(
    search: _Search, quantized: Any, originals: Mapping[str, Any], ranked: list[dict[str, Any]]
) -> tuple[int, compare.Comparison | None]:
    """The smallest k such that the k most harmful nodes in FP32 meet the tolerance (doubling, then bisection;
    the effect is assumed monotone in k, and the k returned is verified); (0, None) when no k < all does."""
    results: dict[int, compare.Comparison] = {}

    def ok(k: int) -> bool:
        model = keep_fp32(quantized, [entry["node"] for entry in ranked[:k]], originals)
        comparison, load = search.evaluate_model(model, f"keep-{k}.onnx")
        search.log(f"int8: the {k} most harmful nodes in fp32: tolerance load {load:.3g}")
        if search.passes(comparison):
            results[k] = comparison
            return True
        return False

    limit = len(ranked) - 1  # all of them in FP32 is not INT8 any more
    low, k = 0, 1
    while k <= limit and not ok(k):
        low, k = k, k * 2
    if k > limit:
        if limit <= low or not ok(limit):
            return 0, None
        k = limit
    high = k
    while high - low > 1:
        middle = (low + high) // 2
        if ok(middle):
            high = middle
        else:
            low = middle
    return high, results[high]


def accuracy_aware_int8(
    model: Path,
    calibration: Sequence[Sample],
    samples: Sequence[Sample],
    expected: Sequence[Outputs],
    *,
    tolerance: compare.Tolerance | compare.Tolerances,
    work: Path,
    min_speedup: float = 1.1,
    benchmark_seconds: float = 2.0,
    methods: Sequence[ortx.CalibrationMethodName] | None = None,
    fp32_model: Path | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> Int8Outcome:
    """The fastest faithful ONNX Runtime model among INT8 (accuracy-aware) and FP32; see the module docstring.

    `methods`: the calibration methods to choose from (default all of `CALIBRATION_METHODS`); `fp32_model`: the
    fp32-optimised model when the caller has it (else made here with `optimize_graph`); `log`: progress lines.
    """
    import onnx

    work.mkdir(parents=True, exist_ok=True)
    fp32 = fp32_model or ortx.optimize_graph(model, work / "fp32.onnx")
    prepared = _prepare(model, work)
    originals = {i.name: i for i in onnx.load(str(prepared)).graph.initializer}
    search = _Search(samples, expected, tolerance, work, log)
    candidates = list(methods or CALIBRATION_METHODS)
    first = "minmax" if "minmax" in candidates else candidates[0]
    ranges = calibration_ranges(prepared, calibration, first, work)
    gate = _quantize(prepared, work / f"int8-{first}.onnx", ranges, first)
    speedup, latency = paired_speedup(fp32, gate, samples[0], benchmark_seconds)
    log(f"int8 speed gate: int8 ({', '.join(OP_TYPES)} quantised) is {speedup:.2f}x fp32")
    if speedup < min_speedup:
        comparison, _ = search.evaluate(fp32)
        return Int8Outcome(
            path=fp32, precision="fp32", met=search.passes(comparison), comparison=comparison, speedup=speedup,
            latency=latency, action="speed-gate-fp32",
            reason=f"int8 ({'/'.join(OP_TYPES)} quantised) ran {speedup:.2f}x fp32 on this class, below "
            f"int8MinSpeedup {min_speedup:g}; shipping the optimised fp32 model, faster and faithful",
        )  # fmt: skip

    trials: list[tuple[float, ortx.CalibrationMethodName, Path, compare.Comparison]] = []
    for method in candidates:
        path = gate if method == first else work / f"int8-{method}.onnx"
        if method != first:
            _quantize(prepared, path, calibration_ranges(prepared, calibration, method, work), method)
        comparison, load = search.evaluate(path)
        trials.append((load, method, path, comparison))
        log(f"int8 calibration {method}: tolerance load {load:.3g}, cosine {comparison.cosine}")
    load, method, chosen, comparison = min(trials, key=lambda trial: (trial[0], candidates.index(trial[1])))
    calibrations = [{"method": m, **_figures(c, lo), "chosen": m == method} for lo, m, _, c in trials]
    quantized = onnx.load(str(chosen))
    count = len(quantized_nodes(quantized))
    fp32_nodes: list[dict[str, Any]] = []
    final = chosen
    if not search.passes(comparison):
        ranked = _rank(search, quantized, originals)
        kept, kept_comparison = _fewest(search, quantized, originals, ranked)
        if kept_comparison is None:
            return Int8Outcome(
                path=chosen, precision="int8", met=False, comparison=comparison, speedup=speedup, latency=latency,
                action="tolerance-unmet", calibration=method, calibrations=calibrations, quantized=count,
                reason=f"int8 cannot meet the tolerance with fewer than all {count} quantised nodes in fp32 "
                f"(best calibration {method}, tolerance load {load:.3g})",
            )  # fmt: skip
        fp32_nodes = [
            {"node": e["node"], "opType": e["opType"], **{k: _rounded(e[k]) for k in ("effect", "meanEffect")}}
            for e in ranked[:kept]
        ]  # fmt: skip
        final = work / "int8-kept.onnx"
        onnx.save(keep_fp32(quantized, [e["node"] for e in fp32_nodes], originals), str(final))
        comparison = kept_comparison
        log(f"int8: {kept} of {count} nodes kept in fp32 meet the tolerance")
        speedup, latency = paired_speedup(fp32, final, samples[0], benchmark_seconds)
    if speedup < min_speedup:
        fp32_comparison, _ = search.evaluate(fp32)
        return Int8Outcome(
            path=fp32, precision="fp32", met=search.passes(fp32_comparison), comparison=fp32_comparison,
            speedup=speedup, latency=latency, action="retime-fp32", calibration=method,
            calibrations=calibrations, fp32_nodes=fp32_nodes, quantized=count,
            reason=f"int8 within tolerance ({len(fp32_nodes)} of {count} nodes kept in fp32) ran {speedup:.2f}x "
            f"fp32, below int8MinSpeedup {min_speedup:g}; shipping the optimised fp32 model",
        )  # fmt: skip
    return Int8Outcome(
        path=final, precision="int8", met=True, comparison=comparison, speedup=speedup, latency=latency,
        action="int8", calibration=method, calibrations=calibrations, fp32_nodes=fp32_nodes, quantized=count,
        reason=f"int8 ({method} calibration, {len(fp32_nodes)} of {count} nodes kept in fp32) is {speedup:.2f}x "
        "fp32 and within tolerance",
    )  # fmt: skip
