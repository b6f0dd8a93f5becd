"""What the server serves, summarised per output as Prometheus metrics, and its drift from the build's reference.

See `edgemodel_runtime.drift` for the kinds of output, the summaries and the score. Per summarised
output (at most `drift.MAX_OUTPUTS`), labelled model, revision, output:

- `edgemodel_output_top1_confidence` (histogram, buckets 0.1 ... 1.0) and
  `edgemodel_output_predicted_class_total{class}` (at most 32 class labels) for classifiers;
- `edgemodel_output_value_bin_total{bin}` for other float outputs, `bin` being the bin's upper edge
  (the reference's deciles, `+Inf` for the last), only when the build report has a reference summary;
- `edgemodel_output_reference_proportion{summary, bin}`: the reference's proportions, beside them;
- `edgemodel_output_drift_psi{summary}` (computed when /metrics is read): PSI of the last `window` served
  rows against the reference,
  once the window holds at least `min(window, MIN_SCORED_ROWS)` rows and the reference at least
  `drift.MIN_REFERENCE_ROWS`; `edgemodel_output_drift_window_rows{summary}`: rows in the window.

Inputs and outputs never leave the process: only these counts do.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edgemodel_runtime import drift
from edgemodel_runtime.serve.metrics import ServerMetrics
from edgemodel_runtime.serve.protocol import TensorMetadata

DEFAULT_WINDOW = 1000  # served rows each drift score looks back on
MIN_SCORED_ROWS = 100
SMALL_BATCH = 16


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
    """One summary of one output: its window, reference proportions (None: nothing to score against)."""

    window: Window
    reference: list[float] | None
    labels: dict[str, str]
    score: Any = None  # the PSI gauge child, created once there is a score (no 0 before any row)
    rows: Any = None  # the window-rows gauge child


@dataclass
class _Output:
    spec: TensorMetadata
    kind: str
    summaries: dict[str, _Summary] = field(default_factory=dict)
    classes: int = 0
    edges: list[float] = field(default_factory=list)
    confidence: Any = None
    predicted: list[Any] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)


class DriftTracker:
    """Summarises every served output; `observe` is called with each response's outputs (any thread)."""

    def __init__(
        self,
        outputs: list[TensorMetadata],
        reference: dict[str, Any] | None,
        metrics: ServerMetrics,
        labels: dict[str, str],
        window: int = DEFAULT_WINDOW,
    ) -> None:
        self._lock = threading.Lock()
        self._metrics, self._labels, self._window = metrics, labels, window
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
        labels = {**self._labels, "output": spec.name}
        if kind == "classifier":
            output.confidence = self._metrics.output_top1_confidence.labels(**labels)
            classes = int(usable["classes"]) if usable else (spec.shape[1] if spec.shape[1] > 0 else 0)
            if classes:
                self._classes(output, classes, usable, scored)
            return output
        if usable is None:
            return output  # no reference deciles: no bins to count values in
        output.edges = [float(e) for e in usable["value"]["edges"]]
        names = [f"{e:.6g}" for e in output.edges] + ["+Inf"]
        output.values = [self._metrics.output_value_bins.labels(**labels, bin=name) for name in names]
        self._summary(output, "value", names, usable["value"]["proportions"], scored)
        return output

    def _classes(self, output: _Output, classes: int, usable: dict[str, Any] | None, scored: bool) -> None:
        labels = {**self._labels, "output": output.spec.name}
        output.classes = classes
        names = drift.class_bin_labels(classes)
        output.predicted = [self._metrics.output_predicted.labels(**labels, **{"class": name}) for name in names]
        confidence_names = [f"{e:.1f}" for e in drift.CONFIDENCE_EDGES[1:]]
        self._summary(output, "confidence", confidence_names,
                      usable["confidence"]["proportions"] if usable else None, scored)  # fmt: skip
        self._summary(output, "predicted", names, usable["predicted"]["proportions"] if usable else None, scored)

    def _summary(
        self, output: _Output, name: str, bins: list[str], reference: list[float] | None, scored: bool
    ) -> None:
        labels = {**self._labels, "output": output.spec.name, "summary": name}
        usable = reference if scored and reference is not None and len(reference) == len(bins) else None
        summary = _Summary(Window(self._window, len(bins)), usable, labels)
        if usable is not None:
            for bin_name, value in zip(bins, usable, strict=True):
                self._metrics.output_reference.labels(**labels, bin=bin_name).set(value)
            summary.rows = self._metrics.output_drift_rows.labels(**labels)
        output.summaries[name] = summary

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
                self._classes(output, classes, None, False)
            if classes != output.classes:
                return
            for value in top1.tolist():
                output.confidence.observe(value)
            for index in predicted.tolist():
                output.predicted[index].inc()
            self._add(output.summaries["confidence"], drift.confidence_bins(top1))
            self._add(output.summaries["predicted"], predicted)
            return
        if not output.edges:
            return
        bins = drift.value_bins(drift.sample_values(array), output.edges)
        for index, count in enumerate(np.bincount(bins, minlength=len(output.values))):
            if count:
                output.values[index].inc(int(count))
        self._add(output.summaries["value"], bins)

    def _add(self, summary: _Summary, bins: npt.NDArray[np.int64]) -> None:
        summary.window.add(bins)

    def refresh(self) -> None:
        """Bring the drift scores and window sizes up to date (when /metrics is read, not per response)."""
        with self._lock:
            for output in self._outputs.values():
                for summary in output.summaries.values():
                    if summary.reference is None:
                        continue
                    summary.rows.set(summary.window.rows)
                    if summary.window.rows >= min(summary.window.size, MIN_SCORED_ROWS):
                        if summary.score is None:
                            summary.score = self._metrics.output_drift.labels(**summary.labels)
                        summary.score.set(drift.psi(summary.window.proportions(), summary.reference))
