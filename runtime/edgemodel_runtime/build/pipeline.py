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

from edgemodel_runtime.build import compare, fetch, hardware, measure, modelcheck, modelfiles, report, tensors
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
    quantization,
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
        self.work = request.output / ".work"
        self.report: dict[str, Any] = {
            "version": report.REPORT_VERSION,
            "status": "failed",
            "exitCode": 0,
            "cacheKey": key,
            "engine": request.engine,
            "requestedPrecision": request.precision,
            "precision": request.precision,
            "classKey": class_key,
            "model": {"uri": request.model, "sha256": fetch.check_digest(request.sha256)},
            "options": options(request, identity),
            "versions": {"builder": builder_version(request.engine), "python": sys.version.split()[0]},
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

        _log(f"step 3/6: optimise for {request.engine} {request.precision}")
        candidate = self._optimise(model, inputs)

        _log(f"step 4/6: validate against the fp32 reference on {len(samples)} samples")
        comparison = self._validate(candidate, samples, expected)

        _log("step 5/6: measure latency on this machine")
        final = self._measure_and_decide(candidate, model, samples, expected, comparison)

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
        samples, expected = tensors.load_samples(path, inputs, request.reference.location)
        self.report["reference"] = {
            "kind": "npz",
            "uri": request.reference.location,
            "sha256": sha256_file(path),
            "samples": len(samples),
            "expectedOutputs": expected is not None,
        }
        return samples, expected

    def _optimise(self, model: Path, inputs: list[tensors.TensorInfo]) -> Path:
        request = self.request
        if request.engine == "tensorrt":
            from edgemodel_runtime.engines import tensorrt_engine

            source = model
            if request.precision == "int8":  # explicit quantisation: a QDQ model that TensorRT honours
                source = self._quantize_static(model, inputs)
            return tensorrt_engine.build_engine(source, self.work / "candidate.plan", request.precision, inputs)
        if request.engine == "openvino":
            from edgemodel_runtime.engines import openvino_engine

            # Every input fixed at the shape validated here: faster, and dynamic shapes in OpenVINO 2026.4 gave
            # stale outputs (one thread) or a crash on inputs the model cannot compute with.
            shapes = {info.name: info.shape for info in inputs}
            target = self.work / ARTIFACT_NAME["openvino"]
            return openvino_engine.compile_to_artifact(model, target, request.precision, shapes)
        optimised = ortx.optimize_graph(model, self.work / "fp32.onnx", request.graph_optimization, self.external)
        if request.precision == "fp32":
            return optimised
        if request.precision == "fp16":
            return ortx.convert_fp16(optimised, self.work / "fp16.onnx", self.external)
        if quantization(request) == "dynamic":
            return ortx.quantize_dynamic_int8(model, self.work / "int8.onnx", self.external)
        return self._quantize_static(model, inputs)

    def _quantize_static(self, model: Path, inputs: list[tensors.TensorInfo]) -> Path:
        request = self.request
        assert request.calibration is not None  # checked by check_request
        path = fetch_data(request.calibration, self.work, "calibration", request.allow_local)
        calibration, _ = tensors.load_samples(path, inputs, request.calibration.location)
        self.report["calibration"] = {
            "uri": request.calibration.location,
            "sha256": sha256_file(path),
            "samples": len(calibration),
            "method": request.calibration_method,
        }
        try:
            return ortx.quantize_static_int8(
                model, self.work / "int8.onnx", calibration, request.calibration_method, self.external
            )
        except BadInputError as error:
            raise BadInputError(f"{error}{tensors.fixed_dims_hint(inputs)}", reason=error.reason) from error

    def _outputs(self, artifact: Path, samples: list[tensors.Sample]) -> list[dict[str, Any]]:
        if self.request.engine == "tensorrt":
            from edgemodel_runtime.engines import tensorrt_engine

            return tensorrt_engine.run_all(artifact, samples)
        if self.request.engine == "openvino":
            from edgemodel_runtime.engines import openvino_engine

            return openvino_engine.run_all(artifact, samples)
        engine_session = ortx.session(artifact)
        return [ortx.run(engine_session, sample) for sample in samples]

    def _validate(
        self, artifact: Path, samples: list[tensors.Sample], expected: list[tensors.Sample]
    ) -> compare.Comparison:
        tolerance = self.request.tolerance or compare.DEFAULT_TOLERANCES[self.request.precision]
        self.report["tolerance"] = vars(tolerance)
        comparison = self._compare(artifact, samples, expected)
        self.report["candidate"] = {"comparison": comparison.as_dict()}
        self._judge(comparison, tolerance, f"{self.request.engine} {self.request.precision} engine")
        return comparison

    def _compare(
        self, artifact: Path, samples: list[tensors.Sample], expected: list[tensors.Sample]
    ) -> compare.Comparison:
        try:
            return compare.compare(expected, self._outputs(artifact, samples))
        except (ValueError, KeyError) as error:
            raise BadInputError(
                f"engine outputs do not match the reference's: {error}", reason="OutputMismatch"
            ) from error

    def _judge(self, comparison: compare.Comparison, tolerance: compare.Tolerance, what: str) -> None:
        """Record the verdict in the report; raise ValidationFailedError on any miss (non-finite values first)."""
        missed = compare.failures(comparison, tolerance)
        verdict = report.validation_verdict(comparison, [m.text for m in missed])
        self.report["validation"] = verdict
        if verdict["uninformative"]:
            _log(
                "the reference cannot discriminate: "
                + "; ".join(f"{k} {v}" for k, v in verdict["uninformative"].items())
            )
        if missed:
            nonfinite = any(m.label == "nonfinite" for m in missed)
            raise ValidationFailedError(
                f"{what} failed validation: " + "; ".join(m.text for m in missed),
                reason="NonFiniteOutputs" if nonfinite else "ToleranceMissed",
                details={"comparison": comparison.as_dict()},
            )

    def _runner(self, artifact: Path, sample: tensors.Sample) -> measure.Runner:
        if self.request.engine == "tensorrt":
            from edgemodel_runtime.engines import tensorrt_engine

            return tensorrt_engine.runner(artifact, sample)
        if self.request.engine == "openvino":
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

    def _publish(self, artifact: Path) -> None:
        request = self.request
        name = ARTIFACT_NAME[request.engine]
        target = request.output / name
        if request.engine == "onnxruntime":
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
            # As an image (engineimage): the kubelet of each node of the class can pull and keep it by digest.
            pushed = [*files, request.output / "report.json"]
            digest = oci.push_engine(reference, pushed, self.report["cacheKey"], annotations)
            self.report["artifact"]["reference"] = f"oci://{reference.with_digest(digest)}"

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
        builder_version=builder_version(request.engine),
        options=options(request, identity),
    )
    earlier = cached_report(request, key)
    if earlier is not None:
        _log(f"cache hit: {request.output} already holds the engine for cache key {key[:16]}…; nothing to do")
        return {**earlier, "status": "cached", "message": f"cache hit for {key}; nothing rebuilt"}
    if request.push:
        from edgemodel_runtime.build import oci

        reference = oci.parse_reference(request.push)
        digest = oci.find_by_tag(reference, key)
        if digest is not None and not oci.is_engine_image(reference, digest):
            _log(f"{reference.with_tag(key[:16])}… was pushed before engines were images; building it again")
            digest = None
        if digest is not None:
            _log(f"cache hit: {reference.with_tag(key[:16])}… exists in the registry; nothing to do")
            return {
                "version": report.REPORT_VERSION,
                "status": "cached",
                "exitCode": 0,
                "cacheKey": key,
                "engine": request.engine,
                "precision": request.precision,
                "classKey": class_key,
                "artifact": {"reference": f"oci://{reference.with_digest(digest)}"},
                "message": f"cache hit for {key}; nothing rebuilt",
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
