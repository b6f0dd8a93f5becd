"""`edgemodel build` as a Python API: fetch, verify, optimise, validate, measure, publish.

`build(request)` returns the report (a dict, also written to DIR/report.json) or raises a
BuildError whose exit code says whether the input, the engine's quality, or the infrastructure
was at fault. A missed tolerance is a failed build with the numbers, never a worse engine.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgemodel_runtime.build import (
    auto,
    compare,
    engineimage,
    fetch,
    hardware,
    measure,
    modelcheck,
    modelfiles,
    quantize,
    report,
    tasks,
    tensors,
)
from edgemodel_runtime.build.errors import BadInputError, BuildError, InfrastructureError, ValidationFailedError
from edgemodel_runtime.build.request import (
    ARTIFACT_NAME,
    BuildRequest,
    DataFile,
    Engine,
    Precision,
    builder_version,
    cached_report,
    check_request,
    fetch_data,
    options,
)
from edgemodel_runtime.digests import sha256_file
from edgemodel_runtime.engines import onnxruntime_engine as ortx

__all__ = ["BuildRequest", "DataFile", "Engine", "Precision", "build", "check_request"]


def _log(message: str) -> None:
    print(f"[build] {message}", file=sys.stderr, flush=True)


class _Build:
    """The state of one build, step by step; `run` returns the report."""

    def __init__(
        self, request: BuildRequest, class_key: str, key: str, machine: hardware.Hardware, identity: dict[str, Any]
    ) -> None:
        self.request = request
        self.identity = identity
        self.external = False  # whether the model keeps weights in external-data files
        self.source: list[Path] = []  # the fetched model, then its external-data files: the image's fallback layer
        self.work = request.output / ".work"
        self.reference_path: Path | None = None  # the fetched reference .npz, if one was given
        self.labels: tasks.Labels | None = None  # its labels, for task-level checks
        self.timings: dict[str, measure.Latency] = {}  # auto: each timed candidate's latency
        self.int8: quantize.Int8Outcome | None = None  # the accuracy-aware INT8 procedure's outcome, when it ran
        self.validation_set: tuple[list[tensors.Sample], list[tensors.Sample]] = ([], [])
        self.report: dict[str, Any] = {
            "version": report.REPORT_VERSION,
            "status": "failed",
            "exitCode": 0,
            "cacheKey": key,
            "engine": request.engine,
            "requestedEngine": request.engine,
            "requestedPrecision": request.precision,
            "precision": request.precision,
            "classKey": class_key,
            "model": {"uri": request.model, "sha256": fetch.check_digest(request.sha256)},
            "options": options(request, identity),
            "versions": {
                "builder": builder_version(request.engine, request.precision),
                "python": sys.version.split()[0],
            },
            "hardware": machine.as_dict(),
        }

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        request = self.request
        self.work.mkdir(parents=True, exist_ok=True)
        _log(f"step 1/6: fetch {request.model} and verify sha256 {request.sha256[:12]}…")
        model = self._fetch_model()

        _log("step 2/6: load the fp32 reference with ONNX Runtime on CPU")
        reference_session = ortx.session(model)
        modelcheck.check_servable(ortx.declared_inputs(reference_session), ortx.declared_outputs(reference_session))
        inputs = tensors.resolve_inputs(ortx.declared_inputs(reference_session), request.inputs)
        self.report["inputs"] = [{"name": i.name, "shape": list(i.shape), "dtype": str(i.dtype)} for i in inputs]
        samples, expected = self._reference_samples(inputs)
        outputs = [name for name, _, _ in ortx.declared_outputs(reference_session)]
        tensors.check_expected_names(expected, outputs)
        if expected is None or any(set(outputs) - set(sample) for sample in expected):
            # Outputs with no expected values are validated against the fp32 reference's, never left out.
            given = expected or [{} for _ in samples]
            expected = [
                {**self._run_reference(reference_session, sample, inputs), **known}
                for sample, known in zip(samples, given, strict=True)
            ]
        self._load_labels(samples, expected)

        self.validation_set = (samples, expected)
        if auto.is_auto(request):
            _log(f"steps 3-5/6: try every candidate engine for {request.engine} {request.precision}, keep the fastest")
            final = auto.choose_engine(self, model, inputs, samples, expected)
        else:
            _log(f"step 3/6: optimise for {request.engine} {request.precision}")
            candidate = self._optimise(model, inputs)

            _log(f"step 4/6: validate against the fp32 reference on {len(samples)} samples")
            comparison = self._validate(candidate, samples, expected)

            _log("step 5/6: measure latency on this machine")
            final = self._measure_and_decide(candidate, model, samples, expected, comparison)

        self._drift_reference(final, samples, reference_session)
        self._energy(final, samples)

        _log("step 6/6: write the artifact" + (f" and push it to {request.push}" if request.push else ""))
        # The report travels with the artifact, so it must say "built" before it is written and pushed;
        # a failed push turns it back into a failed report.
        self.report["buildSeconds"] = round(time.monotonic() - started, 3)
        self.report["peakRssMb"] = round(measure.peak_rss_mb(), 1)
        self.report["status"] = "built"
        self.report["message"] = report.summary(self.report)
        self._publish(final)
        return self.report

    def _fetch_model(self) -> Path:
        request = self.request
        files = modelfiles.fetch_model(
            request.model,
            request.sha256,
            self.work / "source",
            allow_local=request.allow_local,
            expected_data=self.identity.get("externalData"),
        )
        self.external = bool(files.data)
        # Side files in sub-directories, or one named as the fallback model, cannot lie beside it in the image's
        # fallback layer: such a model's fallback is fetched from its URI by the server, as without the layer.
        if all(Path(location).name == location != engineimage.FALLBACK_MODEL for location in files.data):
            self.source = [files.path, *(files.path.parent / location for location in sorted(files.data))]
        if files.data:
            self.report["model"]["externalData"] = [{"file": f, "sha256": d} for f, d in files.data.items()]
        return files.path

    @staticmethod
    def _run_reference(session: Any, sample: tensors.Sample, inputs: list[tensors.TensorInfo]) -> tensors.Sample:
        try:
            return ortx.run(session, sample)
        except BadInputError as error:
            raise BadInputError(f"{error}{tensors.fixed_dims_hint(inputs)}", reason=error.reason) from error

    def _reference_samples(
        self, inputs: list[tensors.TensorInfo]
    ) -> tuple[list[tensors.Sample], list[tensors.Sample] | None]:
        request = self.request
        if request.reference is None:
            self.report["reference"] = {"kind": "seeded", "samples": request.samples, "seed": request.seed}
            return tensors.seeded_samples(inputs, request.samples, request.seed), None
        path = fetch_data(request.reference, self.work, "reference", request.allow_local)
        self.reference_path = path
        samples, expected = tensors.load_samples(path, inputs, request.reference.location)
        self.report["reference"] = {
            "kind": "npz",
            "uri": request.reference.location,
            "sha256": sha256_file(path),
            "samples": len(samples),
            "expectedOutputs": expected is not None,
        }
        return samples, expected

    def _load_labels(self, samples: list[tensors.Sample], expected: list[tensors.Sample]) -> None:
        """The reference set's labels (`label.<output>`), checked against the outputs the fp32 reference gives."""
        if self.reference_path is None or self.request.reference is None:
            return
        shapes = {name: tuple(np.asarray(value).shape) for name, value in expected[0].items()}
        where = self.request.reference.location
        self.labels = tasks.load_labels(self.reference_path, len(samples), shapes, where)
        if self.labels is None and self.request.max_accuracy_drop is not None:
            raise BadInputError(
                f"maxAccuracyDrop is set but the reference {where} has no labels (label.<output> arrays): "
                "there is no task metric to bound",
                reason="InvalidSampleSet",
            )
        if self.labels is not None:
            self.report["reference"]["labels"] = {label.output: label.kind for label in self.labels.outputs}

    def _optimise(
        self,
        model: Path,
        inputs: list[tensors.TensorInfo],
        engine: str | None = None,
        precision: str | None = None,
        work: Path | None = None,
    ) -> Path:
        """The engine (default: the request's) at the precision (default: the request's), built in `work`."""
        request = self.request
        engine, precision, work = engine or request.engine, precision or request.precision, work or self.work
        work.mkdir(parents=True, exist_ok=True)
        if engine == "tensorrt":
            from edgemodel_runtime.engines import tensorrt_engine

            source = model
            if precision == "int8":  # explicit quantisation: a QDQ model that TensorRT honours
                source = self._quantize_static(model, inputs, work)
            return tensorrt_engine.build_engine(source, work / "candidate.plan", precision, inputs)
        if engine == "openvino":
            from edgemodel_runtime.engines import openvino_engine

            # Every input fixed at the shape validated here: faster, and dynamic shapes in OpenVINO 2026.4 gave
            # stale outputs (one thread) or a crash on inputs the model cannot compute with.
            shapes = {info.name: info.shape for info in inputs}
            target = work / ARTIFACT_NAME["openvino"]
            if precision == "int8":
                return self._openvino_int8(model, inputs, target, shapes)
            return openvino_engine.compile_to_artifact(model, target, precision, shapes)
        return self._optimise_onnxruntime(model, inputs, precision, work)

    def _optimise_onnxruntime(self, model: Path, inputs: list[tensors.TensorInfo], precision: str, work: Path) -> Path:
        request = self.request
        optimised = ortx.optimize_graph(model, work / "fp32.onnx", request.graph_optimization, self.external)
        if precision == "fp32":
            return optimised
        if precision == "fp16":
            return ortx.convert_fp16(optimised, work / "fp16.onnx", self.external)
        if request.quantization == "dynamic" or request.calibration is None:
            return ortx.quantize_dynamic_int8(model, work / "int8.onnx", self.external)
        return self._accuracy_aware_int8(model, optimised, inputs, work)

    def _calibration(self, inputs: list[tensors.TensorInfo], method: str | None) -> list[tensors.Sample]:
        """The calibration samples, fetched and verified (recorded in the report with `method`)."""
        request = self.request
        assert request.calibration is not None  # checked by check_request
        path = fetch_data(request.calibration, self.work, "calibration", request.allow_local)
        calibration, _ = tensors.load_samples(path, inputs, request.calibration.location)
        self.report["calibration"] = {
            "uri": request.calibration.location,
            "sha256": sha256_file(path),
            "samples": len(calibration),
            "method": method,
        }
        return calibration

    def _int8_tolerance(self) -> compare.Tolerance:
        """What an int8 build keeps enough of the model in floating point for: the request's tolerance, else
        the one auto judges its candidates by, else the int8 default."""
        if self.request.tolerance is not None:
            return self.request.tolerance
        return auto.tolerance_of(self.request) if auto.is_auto(self.request) else compare.DEFAULT_TOLERANCES["int8"]

    def _openvino_int8(
        self, model: Path, inputs: list[tensors.TensorInfo], target: Path, shapes: dict[str, tuple[int, ...]]
    ) -> Path:
        """NNCF with accuracy control against the validation set (build/openvino_int8.py)."""
        from edgemodel_runtime.build import openvino_int8

        calibration = self._calibration(inputs, "nncf")
        samples, expected = self.validation_set
        tolerance = self._int8_tolerance()
        outcome = openvino_int8.build_openvino_int8(
            model, calibration, samples, expected, tolerance=tolerance, target=target, shapes=shapes, log=_log
        )
        self.report["openvinoInt8"] = outcome.as_report()
        return outcome.path

    def _accuracy_aware_int8(self, model: Path, optimised: Path, inputs: list[tensors.TensorInfo], work: Path) -> Path:
        """Speed gate, calibration chosen by validation, fewest nodes in FP32 (build/quantize.py)."""
        request = self.request
        calibration = self._calibration(inputs, request.calibration_method)
        samples, expected = self.validation_set
        tolerance = self._int8_tolerance()
        try:
            outcome = quantize.accuracy_aware_int8(
                model, calibration, samples, expected, tolerance=tolerance, work=work / "int8",
                min_speedup=request.int8_min_speedup, benchmark_seconds=request.benchmark_seconds,
                methods=[request.calibration_method] if request.calibration_method else None,
                fp32_model=optimised, log=_log,
            )  # fmt: skip
        except BadInputError as error:
            raise BadInputError(f"{error}{tensors.fixed_dims_hint(inputs)}", reason=error.reason) from error
        self.int8 = outcome
        self.report["calibration"]["method"] = outcome.calibration
        self.report["int8"] = outcome.as_report()
        if not auto.is_auto(request):  # under auto the candidate table says which precision was kept
            self.report["precision"] = outcome.precision
        return outcome.path

    def _quantize_static(self, model: Path, inputs: list[tensors.TensorInfo], work: Path | None = None) -> Path:
        request = self.request
        calibration = self._calibration(inputs, request.calibration_method or "minmax")
        try:
            return ortx.quantize_static_int8(
                model,
                (work or self.work) / "int8.onnx",
                calibration,
                request.calibration_method or "minmax",
                self.external,
            )
        except BadInputError as error:
            raise BadInputError(f"{error}{tensors.fixed_dims_hint(inputs)}", reason=error.reason) from error

    def _outputs(
        self, artifact: Path, samples: list[tensors.Sample], engine: str | None = None
    ) -> list[dict[str, Any]]:
        engine = engine or self.request.engine
        if engine == "tensorrt":
            from edgemodel_runtime.engines import tensorrt_engine

            return tensorrt_engine.run_all(artifact, samples)
        if engine == "openvino":
            from edgemodel_runtime.engines import openvino_engine

            return openvino_engine.run_all(artifact, samples)
        engine_session = ortx.session(artifact)
        return [ortx.run(engine_session, sample) for sample in samples]

    def _validate(
        self, artifact: Path, samples: list[tensors.Sample], expected: list[tensors.Sample]
    ) -> compare.Comparison:
        tolerance = self.request.tolerance or compare.DEFAULT_TOLERANCES[self.request.precision]
        self.report["tolerance"] = vars(tolerance)
        outputs = self._engine_outputs(artifact, samples)
        comparison = self._compare_outputs(expected, outputs)
        self.report["candidate"] = {"comparison": comparison.as_dict()}
        what = f"{self.request.engine} {self.request.precision} engine"
        self._judge(comparison, tolerance, what)
        if self.labels is not None:
            task = tasks.evaluate(self.labels, expected, outputs, self.request.max_accuracy_drop)
            self.report["task"] = task.as_dict()
            self._warn(self.report["validation"], expected)
            if task.failures:
                raise ValidationFailedError(
                    f"{what} failed the task-level check: " + "; ".join(task.failures), reason=task.reason
                )
        return comparison

    def _engine_outputs(
        self, artifact: Path, samples: list[tensors.Sample], engine: str | None = None
    ) -> list[dict[str, Any]]:
        try:
            return self._outputs(artifact, samples, engine)
        except (ValueError, KeyError) as error:
            raise BadInputError(
                f"engine outputs do not match the reference's: {error}", reason="OutputMismatch"
            ) from error

    @staticmethod
    def _compare_outputs(expected: list[tensors.Sample], outputs: list[dict[str, Any]]) -> compare.Comparison:
        try:
            return compare.compare(expected, outputs)
        except (ValueError, KeyError) as error:
            raise BadInputError(
                f"engine outputs do not match the reference's: {error}", reason="OutputMismatch"
            ) from error

    def _compare(
        self, artifact: Path, samples: list[tensors.Sample], expected: list[tensors.Sample], engine: str | None = None
    ) -> compare.Comparison:
        try:
            return compare.compare(expected, self._outputs(artifact, samples, engine))
        except (ValueError, KeyError) as error:
            raise BadInputError(
                f"engine outputs do not match the reference's: {error}", reason="OutputMismatch"
            ) from error

    def _judge(self, comparison: compare.Comparison, tolerance: compare.Tolerance, what: str) -> None:
        """Record the verdict in the report; raise ValidationFailedError on any miss (non-finite values first)."""
        missed = compare.failures(comparison, tolerance)
        verdict = report.validation_verdict(comparison, [m.text for m in missed])
        self.report["validation"] = verdict
        self._warn(verdict)
        if missed:
            nonfinite = any(m.label == "nonfinite" for m in missed)
            raise ValidationFailedError(
                f"{what} failed validation: " + "; ".join(m.text for m in missed),
                reason="NonFiniteOutputs" if nonfinite else "ToleranceMissed",
                details={"comparison": comparison.as_dict()},
            )

    def _warn(self, verdict: dict[str, Any], expected: list[tensors.Sample] | None = None) -> None:
        """Record (and log) a warning when the reference cannot discriminate; replaces earlier ones."""
        notes = tasks.uninformative(self.labels, expected) if self.labels is not None and expected else []
        warnings = report.reference_warnings(verdict, notes)
        self.report["warnings"] = warnings
        for warning in warnings:
            _log(f"warning: {warning['reason']}: {warning['message']}")

    def _runner(self, artifact: Path, sample: tensors.Sample, engine: str | None = None) -> measure.Runner:
        engine = engine or self.request.engine
        if engine == "tensorrt":
            from edgemodel_runtime.engines import tensorrt_engine

            return tensorrt_engine.runner(artifact, sample)
        if engine == "openvino":
            from edgemodel_runtime.engines import openvino_engine

            return openvino_engine.runner(artifact, sample)
        engine_session = ortx.session(artifact)
        names = [o.name for o in engine_session.get_outputs()]

        def run_once() -> object:
            return engine_session.run(names, sample)

        return run_once

    def _measure_and_decide(
        self,
        candidate: Path,
        model: Path,
        samples: list[tensors.Sample],
        expected: list[tensors.Sample],
        comparison: compare.Comparison,
    ) -> Path:
        request = self.request
        if self.int8 is not None:
            return self._decide_int8(self.int8, samples, expected)
        runners = {"candidate": self._runner(candidate, samples[0])}
        fp32 = self.work / "fp32.onnx"
        if request.precision == "int8" and request.engine == "onnxruntime":
            runners["fp32"] = self._runner(fp32, samples[0])
        latency = measure.measure_interleaved(runners, budget_s=request.benchmark_seconds)
        self.report["candidate"]["latency"] = latency["candidate"].as_dict()
        final = candidate
        decision = {"action": "keep", "reason": f"{request.precision} engine passed validation"}
        if "fp32" in latency:
            speedup = latency["fp32"].p50_ms / latency["candidate"].p50_ms
            self.report["fp32"] = {"latency": latency["fp32"].as_dict()}
            self.report["int8Speedup"] = round(speedup, 3)
            if speedup < request.int8_min_speedup:
                final = fp32
                self.report["precision"] = "fp32"
                fp32_comparison = self._compare(fp32, samples, expected)
                self.report["fp32"]["comparison"] = fp32_comparison.as_dict()
                fallback_tolerance = request.tolerance or compare.DEFAULT_TOLERANCES["fp32"]
                self._judge(fp32_comparison, fallback_tolerance, "fp32 fallback engine")
                decision = {
                    "action": "fallback-fp32",
                    "reason": f"int8 was {speedup:.2f}x fp32 on this class, below the {request.int8_min_speedup}x "
                    "threshold; serving the optimised fp32 engine instead",
                }
            else:
                decision["reason"] = f"int8 is {speedup:.2f}x faster than fp32 and within tolerance"
        self.report["decision"] = decision
        final_latency = latency["fp32" if final == fp32 and "fp32" in latency else "candidate"]
        self.report["latency"] = final_latency.as_dict()
        budget = request.latency_budget_ms
        if budget is not None and final_latency.p99_ms > budget:
            raise ValidationFailedError(
                f"p99 latency {final_latency.p99_ms:.2f} ms exceeds the budget of {budget} ms on this class",
                reason="LatencyBudgetMissed",
            )
        return final

    def _drift_reference(self, artifact: Path, samples: list[tensors.Sample], session: Any) -> None:
        """The report's `drift` field: summaries of what the engine outputs on the reference set (see `drift`)."""
        from edgemodel_runtime import drift

        declared = [drift.OutputSpec.from_onnxruntime(*output) for output in ortx.declared_outputs(session)]
        source = str(self.report["reference"]["kind"])
        served = self._outputs(artifact, samples, self.report["engine"]) if source == "npz" else []
        self.report["drift"] = drift.reference_summaries(declared, served, source)

    def _energy(self, artifact: Path, samples: list[tensors.Sample]) -> None:
        """The report's `energy` field: joules per inference where this node has a readable energy sensor (see
        `power`), else why not; the measurement runs the final engine for up to a second more."""
        from edgemodel_runtime import power

        seconds = min(1.0, self.request.benchmark_seconds)
        self.report["energy"] = power.energy_per_call(
            power.detect(), self._runner(artifact, samples[0], self.report["engine"]), seconds
        )

    def _decide_int8(
        self, outcome: quantize.Int8Outcome, samples: list[tensors.Sample], expected: list[tensors.Sample]
    ) -> Path:
        """The accuracy-aware procedure already timed int8 against fp32 side by side: record its decision."""
        shipped = outcome.latency["int8" if outcome.precision == "int8" else "fp32"]
        self.report["candidate"]["latency"] = outcome.latency["int8"].as_dict()
        self.report["fp32"] = {"latency": outcome.latency["fp32"].as_dict()}
        self.report["int8Speedup"] = round(outcome.speedup, 3)
        if outcome.precision == "fp32":
            self.report["fp32"]["comparison"] = self.report["candidate"]["comparison"]
        self.report["decision"] = {
            "action": "keep" if outcome.precision == "int8" else "fallback-fp32",
            "reason": outcome.reason,
        }
        self.report["latency"] = shipped.as_dict()
        budget = self.request.latency_budget_ms
        if budget is not None and shipped.p99_ms > budget:
            raise ValidationFailedError(
                f"p99 latency {shipped.p99_ms:.2f} ms exceeds the budget of {budget} ms on this class",
                reason="LatencyBudgetMissed",
            )
        return outcome.path

    def _publish(self, artifact: Path) -> None:
        request = self.request
        engine = self.report["engine"]  # the chosen one under engine auto
        name = ARTIFACT_NAME[engine]
        target = request.output / name
        if engine == "onnxruntime":
            files = ortx.save_artifact(artifact, target)
        else:
            shutil.copyfile(artifact, target)
            files = [target]
        entries = [{"file": f.name, "sha256": sha256_file(f), "size": f.stat().st_size} for f in files]
        self.report["artifact"] = {**entries[0], **({"dataFiles": entries[1:]} if len(entries) > 1 else {})}
        self._write()
        if request.push:
            from edgemodel_runtime.build import oci

            reference = oci.parse_reference(request.push)
            annotations = {oci.CACHE_KEY_ANNOTATION: self.report["cacheKey"], oci.MODEL_ANNOTATION: name}
            if self.report.get("auto"):  # so that a later cache hit can say what was chosen without pulling
                annotations[oci.AUTO_ANNOTATION] = json.dumps(auto.annotation(self.report), separators=(",", ":"))
            # As an image (engineimage): the kubelet of each node of the class can pull and keep it by digest,
            # with the original model beside the engine, which a server that cannot load the engine serves.
            pushed = [*files, request.output / "report.json"]
            image = oci.push_engine(reference, pushed, self.report["cacheKey"], annotations, self.source)
            self.report["artifact"]["reference"] = f"oci://{reference.with_digest(image.digest)}"
            if image.parts:  # pulled one after the other, a cut pull costs at most one of them (engineimage)
                self.report["artifact"]["parts"] = list(image.parts)

    def _write(self) -> None:
        self.request.output.mkdir(parents=True, exist_ok=True)
        (self.request.output / "report.json").write_text(json.dumps(self.report, indent=2, default=str) + "\n")

    def fail(self, error: BuildError) -> dict[str, Any]:
        self.report.update(
            status="failed", exitCode=int(error.exit_code), reason=error.reason, message=str(error), **error.details
        )
        self.report.pop("artifact", None)
        self._write()
        return self.report


def build(request: BuildRequest) -> dict[str, Any]:
    """Build, validate, measure and publish one engine; the report is also written to DIR/report.json.

    Raises BuildError after writing a failed report; returns the report (status `built` or
    `cached`) on success.
    """
    check_request(request)
    machine = hardware.detect()
    class_key = request.class_key or machine.class_key()
    identity = modelfiles.identity(request.model, request.sha256, allow_local=request.allow_local)
    key = report.cache_key(
        model_sha256=fetch.check_digest(request.sha256),
        engine=request.engine,
        precision=request.precision,
        class_key=class_key,
        builder_version=builder_version(request.engine, request.precision),
        options=options(request, identity),
    )
    earlier = cached_report(request, key) if request.reuse else None
    if earlier is not None:
        _log(f"cache hit: {request.output} already holds the engine for cache key {key[:16]}…; nothing to do")
        return {**earlier, "status": "cached", "message": f"cache hit for {key}; nothing rebuilt"}
    if request.push and request.reuse:
        from edgemodel_runtime.build import oci

        reference = oci.parse_reference(request.push)
        digest = oci.find_by_tag(reference, key)
        if digest is not None and not oci.is_engine_image(reference, digest):
            _log(f"{reference.with_tag(key[:16])}… was pushed before engines were images; building it again")
            digest = None
        if digest is not None:
            _log(f"cache hit: {reference.with_tag(key[:16])}… exists in the registry; nothing to do")
            found = oci.manifest_annotations(reference, digest)
            chosen = auto.from_annotations(found) if auto.is_auto(request) else {}
            parts = oci.cached_parts(reference, digest, key, found)
            return {
                "version": report.REPORT_VERSION,
                "status": "cached",
                "exitCode": 0,
                "cacheKey": key,
                "engine": request.engine,
                "precision": request.precision,
                "classKey": class_key,
                "artifact": {"reference": f"oci://{reference.with_digest(digest)}"}
                | ({"parts": parts} if parts else {}),
                "message": f"cache hit for {key}; nothing rebuilt",
                **chosen,
            }
    state = _Build(request, class_key, key, machine, identity)
    try:
        result = state.run()
    except BuildError as error:
        state.fail(error)
        raise
    except (OSError, MemoryError) as error:  # disk full, permissions, out of memory
        wrapped = InfrastructureError(f"{type(error).__name__}: {error}", reason="InfrastructureFailure")
        state.fail(wrapped)
        raise wrapped from error
    except Exception as error:  # a bug: still a report and a documented exit code, never a traceback
        wrapped = InfrastructureError(
            f"internal error ({type(error).__name__}: {error}); this is a bug in edgemodel build, "
            "please report it together with the model",
            reason="InternalError",
        )
        state.fail(wrapped)
        raise wrapped from error
    finally:
        shutil.rmtree(state.work, ignore_errors=True)
    state._write()
    return result
