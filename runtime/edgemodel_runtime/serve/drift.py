"""What the server serves, summarised per output as Prometheus metrics, and its drift from the build's reference.

See `edgemodel_runtime.drift` for the kinds of output, the summaries and the score. Per summarised
output (at most `drift.MAX_OUTPUTS`), labelled model, revision, output:

- `edgemodel_output_top1_confidence` (histogram, buckets 0.1 ... 1.0) and
  `edgemodel_output_predicted_class_total{class}` (at most 32 class labels) for classifiers;
- `edgemodel_output_value_bin_total{bin}` for other float outputs, `bin` being the bin's upper edge
  (the reference's deciles, `+Inf` for the last), only when the build report has a reference summary;
- `edgemodel_output_reference_proportion{summary, bin}`: the reference's proportions, beside them;
- `edgemodel_output_drift_psi{summary}`: PSI of the last `window` served rows against the reference,
  once the window holds at least `min(window, MIN_SCORED_ROWS)` rows and the reference at least
  `drift.MIN_REFERENCE_ROWS`; `edgemodel_output_drift_window_rows{summary}`: rows in the window.

A response only adds to arrays of counts (a few array operations, in the inference worker thread);
the metric families are made from them when /metrics is read (`OutputSummaries.collect`). Inputs
and outputs never leave the process: only these counts do.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from edgemodel_runtime import drift
from edgemodel_runtime.serve.protocol import TensorMetadata

DEFAULT_WINDOW = 1000  # served rows each drift score looks back on
MIN_SCORED_ROWS = 100
SMALL_BATCH = 16
CONFIDENCE_LABELS = [f"{e:.1f}" for e in drift.CONFIDENCE_EDGES[1:]]


class Window:
    """Counts per bin of the last `size` rows (a ring buffer of bin indices)."""

    def __init__(self, size: int, bins: int) -> None:
        self.size, self.bins = size, bins
        self._ring = np.zeros(size, dtype=np.int64)
        self._next, self.rows = 0, 0
        self.counts = np.zeros(bins, dtype=np.int64)

    def add(self, values: npt.NDArray[np.int64]) -> None:
        values = values[(values >= 0) & (values < self.bins)]
        if len(values) <= SMALL_BATCH:  # a response of a few rows: plain Python beats array calls
            for value in values.tolist():
                if self.rows == self.size:
                    self.counts[self._ring[self._next]] -= 1
                else:
                    self.rows += 1
                self._ring[self._next] = value
                self.counts[value] += 1
                self._next = (self._next + 1) % self.size
            return
        if len(values) >= self.size:
            self._ring[:] = values[-self.size :]
            self._next, self.rows = 0, self.size
            self.counts = np.bincount(self._ring, minlength=self.bins)
            return
        slots = (self._next + np.arange(len(values))) % self.size
        # The ring fills from slot 0, so the slots holding a row are exactly those below `rows`.
        replaced = slots[slots < self.rows]
        self.counts -= np.bincount(self._ring[replaced], minlength=self.bins)
        self._ring[slots] = values
        self.counts += np.bincount(values, minlength=self.bins)
        self._next = int((self._next + len(values)) % self.size)
        self.rows = min(self.size, self.rows + len(values))

    def proportions(self) -> list[float]:
        return [float(c) / max(self.rows, 1) for c in self.counts]


@dataclass
class _Summary:
    """One summary of one output: bin labels, the window, reference proportions (None: nothing to score)."""

    bins: list[str]
    window: Window
    reference: list[float] | None


@dataclass
class _Output:
    spec: TensorMetadata
    kind: str
    summaries: dict[str, _Summary] = field(default_factory=dict)
    classes: int = 0
    edges: list[float] = field(default_factory=list)
    served: dict[str, npt.NDArray[np.int64]] = field(default_factory=dict)  # summary -> rows served per bin
    top1_sum: float = 0.0


class DriftTracker:
    """Summarises every served output of one model; `observe` is called with each response's outputs."""

    def __init__(
        self,
        outputs: list[TensorMetadata],
        reference: dict[str, Any] | None,
        labels: dict[str, str],
        window: int = DEFAULT_WINDOW,
    ) -> None:
        self._lock = threading.Lock()
        self._labels, self._window = labels, window
        self._warned = False
        summaries = (reference or {}).get("outputs") if (reference or {}).get("available") else None
        self._outputs: dict[str, _Output] = {}
        for spec in outputs[: drift.MAX_OUTPUTS]:
            kind = drift.kind_of(spec.shape, spec.datatype)
            if kind is not None:
                self._outputs[spec.name] = self._start(spec, kind, (summaries or {}).get(spec.name))

    def _start(self, spec: TensorMetadata, kind: str, reference: dict[str, Any] | None) -> _Output:
        output = _Output(spec, kind)
        usable = reference if reference and reference.get("kind") == kind else None
        scored = usable is not None and int(usable.get("rows", 0)) >= drift.MIN_REFERENCE_ROWS
        if kind == "classifier":
            classes = int(usable["classes"]) if usable else (spec.shape[1] if spec.shape[1] > 0 else 0)
            if classes:
                self._classes(output, classes, usable if scored else None)
            return output
        if usable is None:
            return output  # no reference deciles: no bins to count values in
        output.edges = [float(e) for e in usable["value"]["edges"]]
        names = [f"{e:.6g}" for e in output.edges] + ["+Inf"]
        self._summary(output, "value", names, usable["value"]["proportions"] if scored else None)
        return output

    def _classes(self, output: _Output, classes: int, reference: dict[str, Any] | None) -> None:
        output.classes = classes
        self._summary(output, "confidence", CONFIDENCE_LABELS,
                      reference["confidence"]["proportions"] if reference else None)  # fmt: skip
        self._summary(output, "predicted", drift.class_bin_labels(classes),
                      reference["predicted"]["proportions"] if reference else None)  # fmt: skip

    def _summary(self, output: _Output, name: str, bins: list[str], reference: list[float] | None) -> None:
        usable = reference if reference is not None and len(reference) == len(bins) else None
        output.summaries[name] = _Summary(bins, Window(self._window, len(bins)), usable)
        output.served[name] = np.zeros(len(bins), dtype=np.int64)

    def observe(self, outputs: dict[str, npt.NDArray[Any]]) -> None:
        """Count one response's outputs; never raises (a summary must not fail a request)."""
        try:
            with self._lock:
                for name, output in self._outputs.items():
                    if name in outputs:
                        self._observe(output, np.asarray(outputs[name]))
        except Exception as error:  # reported once; the request goes on
            if not self._warned:
                self._warned = True
                print(f"edgemodel serve: drift summaries stopped counting: {error!r}", file=sys.stderr, flush=True)

    def _observe(self, output: _Output, array: npt.NDArray[Any]) -> None:
        if output.kind == "classifier":
            if array.ndim != 2 or not array.size:
                return
            top1, predicted, classes = drift.classify(array)
            if not output.classes:
                self._classes(output, classes, None)
            if classes != output.classes:
                return
            output.top1_sum += float(top1.sum())
            self._count(output, "confidence", drift.confidence_bins(top1))
            self._count(output, "predicted", predicted)
        elif output.edges:
            self._count(output, "value", drift.value_bins(drift.sample_values(array), output.edges))

    @staticmethod
    def _count(output: _Output, name: str, bins: npt.NDArray[np.int64]) -> None:
        served = output.served[name]
        if len(bins) <= SMALL_BATCH:
            for value in bins.tolist():
                served[value] += 1
        else:
            served += np.bincount(bins, minlength=len(served))[: len(served)]
        output.summaries[name].window.add(bins)

    def export(self, families: dict[str, Any]) -> None:
        """Add this model's samples to the metric families (see `OutputSummaries.collect`)."""
        with self._lock:
            for name, output in self._outputs.items():
                labels = [self._labels["model"], self._labels["revision"], name]
                self._export(output, labels, families)

    def _export(self, output: _Output, labels: list[str], families: dict[str, Any]) -> None:
        if "confidence" in output.summaries:
            counts = np.cumsum(output.served["confidence"]).tolist()
            buckets = [(le, float(n)) for le, n in zip(CONFIDENCE_LABELS[:-1], counts[:-1], strict=True)]
            families["confidence"].add_metric(labels, [*buckets, ("+Inf", float(counts[-1]))], output.top1_sum)
        for summary_name, family in (("predicted", "predicted"), ("value", "values")):
            if summary_name in output.summaries:
                for label, count in zip(output.summaries[summary_name].bins, output.served[summary_name].tolist(),
                                        strict=True):  # fmt: skip
                    families[family].add_metric([*labels, label], float(count))
        for summary_name, summary in output.summaries.items():
            if summary.reference is None:
                continue
            for label, share in zip(summary.bins, summary.reference, strict=True):
                families["reference"].add_metric([*labels, summary_name, label], share)
            families["rows"].add_metric([*labels, summary_name], float(summary.window.rows))
            if summary.window.rows >= min(summary.window.size, MIN_SCORED_ROWS):
                families["psi"].add_metric([*labels, summary_name], drift.psi(summary.window.proportions(),
                                                                               summary.reference))  # fmt: skip


class OutputSummaries:
    """The metric families of every DriftTracker added, made when the registry is collected (a Collector)."""

    def __init__(self) -> None:
        self._trackers: list[DriftTracker] = []

    def add(self, tracker: DriftTracker) -> None:
        self._trackers.append(tracker)

    def collect(self) -> Iterator[Metric]:
        output = ["model", "revision", "output"]
        families: dict[str, Any] = {
            "confidence": HistogramMetricFamily(
                "edgemodel_output_top1_confidence",
                "Top-1 probability of each row a classifier-like output served (softmax of logits).",
                labels=output,
            ),
            "predicted": CounterMetricFamily(
                "edgemodel_output_predicted_class",
                "Rows served per predicted class (arg-max) of a classifier-like output; at most 32 class labels, "
                "classes grouped into ranges beyond that.",
                labels=[*output, "class"],
            ),
            "values": CounterMetricFamily(
                "edgemodel_output_value_bin",
                "Elements served per value bin of a regression-like output; `bin` is the bin's upper edge (the "
                "build reference's deciles, +Inf for the last).",
                labels=[*output, "bin"],
            ),
            "reference": GaugeMetricFamily(
                "edgemodel_output_reference_proportion",
                "Proportion of the build's reference outputs in each bin of a summary (confidence, predicted, value).",
                labels=[*output, "summary", "bin"],
            ),
            "psi": GaugeMetricFamily(
                "edgemodel_output_drift_psi",
                "Population stability index of the last served rows against the build's reference, per output and "
                "summary (below 0.1: no shift; above 0.25: a significant one).",
                labels=[*output, "summary"],
            ),
            "rows": GaugeMetricFamily(
                "edgemodel_output_drift_window_rows",
                "Served rows in the window the drift score is computed over.",
                labels=[*output, "summary"],
            ),
        }
        for tracker in list(self._trackers):
            tracker.export(families)
        yield from families.values()
