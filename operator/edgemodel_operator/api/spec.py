"""The desired state of an EdgeModel (`spec`), as pydantic models.

These classes are the single source of truth: the CRD's OpenAPI schema and the field
reference in docs/ are generated from them, and the operator parses custom objects with them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from edgemodel_operator.api.agreement import Agreement
from edgemodel_operator.api.fields import (
    ApiModel,
    Duration,
    Fraction,
    PositiveNumber,
    Quantity,
    Rate,
    Sha256,
    Uri,
    cel,
    validations,
)

Engine = Literal["onnxruntime", "tensorrt", "openvino", "auto"]
Precision = Literal["fp32", "fp16", "bf16", "int8", "auto"]
DType = Literal[
    "float32",
    "float16",
    "float64",
    "bfloat16",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
]


class ArtifactRef(ApiModel):
    """A file fetched by URI and verified against its SHA-256 digest before it is used."""

    uri: Uri = Field(description="Where to fetch the file: an https:// or oci:// URI.")
    sha256: Sha256 = Field(
        description="SHA-256 of the file's bytes, 64 lowercase hex characters. "
        "The download is refused when it does not match."
    )


class TensorSpec(ApiModel):
    """One model input with its dynamic dimensions fixed."""

    name: str = Field(
        min_length=1, max_length=256, pattern=r"^\S+$", description="Input name as it appears in the ONNX graph."
    )
    shape: list[Annotated[int, Field(ge=1, le=1_000_000)]] = Field(
        max_length=8,
        description="Concrete shape used to build, validate and benchmark the engine; every dimension is at least 1.",
    )
    dtype: DType = Field(description="Element type of the input tensor.")


class HardwareMatch(ApiModel):
    """Which hardware classes an engine entry applies to.

    Every field that is set must match; an empty match applies to every class.
    """

    arch: Literal["amd64", "arm64", "arm", "riscv64"] | None = Field(
        default=None, description="CPU architecture, as in the node label kubernetes.io/arch."
    )
    accelerator: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$",
        description="Accelerator family of the class: `none` for CPU-only nodes, `nvidia` for any NVIDIA GPU, "
        "or a specific one such as `nvidia-orin` for Jetson Orin modules.",
    )
    gpu_product: str | None = Field(
        default=None,
        max_length=128,
        description="GPU product as labelled by GPU Feature Discovery (nvidia.com/gpu.product), e.g. NVIDIA-A2.",
    )
    compute_capability: str | None = Field(
        default=None,
        pattern=r"^[0-9]+\.[0-9]+$",
        max_length=8,
        description="CUDA compute capability, e.g. `8.7`. "
        "TensorRT engines only run on the capability they were built for.",
    )
    cpu_features: list[Annotated[str, Field(max_length=64, pattern=r"^[A-Z0-9_]+$")]] | None = Field(
        default=None,
        max_length=16,
        description="CPU features the class must have, by Node Feature Discovery's cpuid names, e.g. AVX512VNNI.",
    )


class EngineTarget(ApiModel):
    """The engine and precision to build for the hardware classes that `match` selects."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.precision in ['int8', 'auto'] || !has(self.quantization)",
                "quantization applies only to precision int8 (or auto, for its int8 candidates)",
                ".quantization",
            ),
            cel(
                "self.precision != 'int8' || has(self.calibration) "
                "|| (has(self.quantization) && self.quantization == 'dynamic')",
                "int8 with static quantization needs calibration data: set calibration {uri, sha256}, "
                "or quantization: dynamic (onnxruntime only)",
                ".calibration",
            ),
            cel(
                "!has(self.quantization) || self.quantization != 'dynamic' || self.engine == 'onnxruntime'",
                "dynamic quantization is only available with engine onnxruntime",
                ".quantization",
            ),
            cel(
                "!has(self.calibrationMethod) || has(self.calibration)",
                "calibrationMethod needs calibration data",
                ".calibrationMethod",
            ),
            cel(
                "!has(self.int8MinSpeedup) || (self.precision == 'int8' && self.engine == 'onnxruntime')",
                "int8MinSpeedup applies only to engine onnxruntime with precision int8",
                ".int8MinSpeedup",
            ),
            cel(
                "!has(self.calibrationMethod) || self.engine != 'openvino'",
                "calibrationMethod does not apply to engine openvino (NNCF calibrates int8 itself)",
                ".calibrationMethod",
            ),
            cel(
                "self.engine != 'tensorrt' || !has(self.match.accelerator) || self.match.accelerator != 'none'",
                "engine tensorrt needs an NVIDIA accelerator, but this entry matches CPU-only classes",
                ".engine",
            ),
            cel(
                "self.engine != 'openvino' || ((!has(self.match.accelerator) || self.match.accelerator == 'none') "
                "&& !has(self.match.gpuProduct) && !has(self.match.computeCapability))",
                "engine openvino runs on the CPU: not for GPU matches "
                "(an accelerator other than none, gpuProduct or computeCapability)",
                ".engine",
            ),
            cel(
                "self.precision != 'bf16' || self.engine == 'openvino'",
                "precision bf16 is only available with engine openvino",
                ".precision",
            ),
            cel(
                "self.engine != 'auto' || ((!has(self.match.accelerator) || self.match.accelerator == 'none') "
                "&& !has(self.match.gpuProduct) && !has(self.match.computeCapability))",
                "engine auto chooses among the CPU engines: not for GPU matches (an accelerator other than none, "
                "gpuProduct or computeCapability); on NVIDIA classes use engine tensorrt with precision auto",
                ".engine",
            ),
            cel(
                "self.engine != 'auto' || self.precision == 'auto'",
                "engine auto chooses the precision too: set precision auto",
                ".precision",
            ),
        )
    }

    match: HardwareMatch = Field(
        description="The hardware classes this entry applies to; the first matching entry wins."
    )
    engine: Engine = Field(
        description="Engine to build: onnxruntime (any class), tensorrt (NVIDIA GPUs only), openvino (CPUs), or "
        "auto (CPU classes, with precision auto): every CPU engine that applies is tried and the fastest that "
        "passes validation is kept."
    )
    precision: Precision = Field(
        default="fp32",
        description="Numeric precision of the engine. bf16 needs engine openvino and a CPU with BF16 "
        "(e.g. AVX512_BF16 or AMX); a build on a CPU without it fails with a clear reason. int8 needs calibration "
        "data (or quantization dynamic, onnxruntime only): onnxruntime runs its accuracy-aware procedure (speed "
        "gate, calibration chosen by validation, the fewest nodes kept in fp32), openvino quantises with NNCF's "
        "accuracy control against the validation set. auto: the build tries "
        "every precision the engine offers on the class (int8 only with calibration or quantization dynamic), "
        "validates each against the fp32 reference and the tolerance, times them side by side on the class's "
        "node and keeps the fastest that passes; status.classes[].chosen and .candidates show the table.",
    )
    quantization: Literal["static", "dynamic"] | None = Field(
        default=None,
        description="For int8: static quantization calibrated on `calibration` (the default), "
        "or dynamic quantization of the weights only (onnxruntime).",
    )
    calibration: ArtifactRef | None = Field(
        default=None, description="An .npz file of representative inputs, used to calibrate static int8 quantization."
    )
    calibration_method: Literal["minmax", "entropy", "percentile"] | None = Field(
        default=None,
        description="How activation ranges are chosen from the calibration data. Unset: engine onnxruntime tries "
        "all three and keeps the one whose outputs are closest to the fp32 reference on the validation set; "
        "tensorrt uses minmax. Set: only that method.",
    )
    int8_min_speedup: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="For int8 (onnxruntime): the least speed-up over the optimised fp32 engine, as a ratio of "
        "median latencies measured side by side on the class's own node, that int8 must give; below it the build "
        "ships the fp32 engine and says so in its report. Default 1.1; 0 accepts any speed.",
    )


class Toleration(ApiModel):
    """A node taint the build and serving pods tolerate, as in a Pod's spec.tolerations."""

    key: str | None = Field(
        default=None,
        max_length=253,
        description="Taint key to match; unset with operator Exists matches every taint.",
    )
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists ignores `value`.")
    value: str | None = Field(default=None, max_length=63, description="Taint value to match with operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; unset matches every effect."
    )


class Targets(ApiModel):
    """Which nodes get engines, and which engine each hardware class gets."""

    node_selector: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        default=None,
        max_length=32,
        description="Only nodes with all of these labels are considered, and pods are kept on them. "
        "Default: every schedulable node.",
    )
    tolerations: list[Toleration] | None = Field(
        default=None,
        max_length=16,
        description="Taints the build and serving pods tolerate. A node with a NoSchedule or NoExecute taint that is "
        "not tolerated is left out of discovery (NVIDIA GPU taints are tolerated on GPU classes without this).",
    )
    engines: list[EngineTarget] | None = Field(
        default=None,
        min_length=1,
        max_length=16,
        description="Engine and precision per hardware match, first match wins. Default: onnxruntime fp32 on CPU "
        "classes and tensorrt fp16 on NVIDIA classes.",
        json_schema_extra=validations(
            cel(
                "self.all(a, self.exists_one(b, b.match == a.match))",
                "two entries have the same match; the second could never be used",
            )
        ),
    )


class Tolerance(ApiModel):
    """How far a built engine's outputs may drift from the fp32 ONNX Runtime reference."""

    max_abs_error: PositiveNumber | None = Field(
        default=None, description="Largest allowed absolute difference of any output element."
    )
    max_relative_error: PositiveNumber | None = Field(
        default=None,
        description="Largest allowed absolute difference relative to the reference output's range (max - min).",
    )
    min_cosine: Fraction | None = Field(
        default=None, description="Smallest allowed cosine similarity between engine and reference outputs, in (0, 1]."
    )
    min_top1_agreement: Fraction | None = Field(
        default=None,
        description="Smallest allowed share of samples whose arg-max class matches the reference, in (0, 1]; "
        "for classifier-like outputs.",
    )
    max_accuracy_drop: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Largest allowed drop, in percentage points, of the task metric against the fp32 reference's "
        "(top-1 accuracy for class-id labels, mask IoU for mask labels), in [0, 100]. Needs a reference whose "
        "samples carry labels (label.<output> arrays in the .npz).",
    )


class LatencyBudget(ApiModel):
    """The latency an engine must achieve on its own hardware class."""

    p99_ms: PositiveNumber = Field(description="99th percentile latency of one inference, in milliseconds.")


class Validation(ApiModel):
    """How each built engine is checked before it may serve."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "!has(self.tolerance) || !has(self.tolerance.maxAccuracyDrop) || has(self.reference)",
                "tolerance.maxAccuracyDrop needs a reference with labels",
                ".tolerance.maxAccuracyDrop",
            )
        )
    }

    reference: ArtifactRef | None = Field(
        default=None,
        description="An .npz file with realistic inputs (and optionally expected outputs). "
        "Default: seeded random inputs compared with fp32 on CPU.",
    )
    tolerance: Tolerance | None = Field(default=None, description="Accuracy limits against the reference.")
    latency_budget: LatencyBudget | None = Field(default=None, description="Latency limits on the target class.")


class Resources(ApiModel):
    """Compute resources of each serving container, as in a Pod spec."""

    requests: dict[str, Quantity] | None = Field(default=None, max_length=8, description="Resources reserved.")
    limits: dict[str, Quantity] | None = Field(default=None, max_length=8, description="Resources not to exceed.")


class Serving(ApiModel):
    """How engines are rolled out as inference pods."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.mode != 'DaemonSet' || !has(self.replicasPerClass)",
                "replicasPerClass does not apply to mode DaemonSet, which runs one pod per node",
                ".replicasPerClass",
            )
        )
    }

    mode: Literal["Deployment", "DaemonSet"] = Field(
        default="Deployment",
        description="Deployment: replicasPerClass pods per hardware class; "
        "DaemonSet: one pod on every node of a class.",
    )
    replicas_per_class: int | None = Field(
        default=None, ge=1, le=1000, description="Pods per hardware class in Deployment mode (default 1)."
    )
    resources: Resources | None = Field(default=None, description="Resources of each serving container.")
    port: int = Field(
        default=8080, ge=1024, le=65535, description="Port the inference server listens on (unprivileged: 1024-65535)."
    )
    accelerator_handoff: Literal["Auto", "Always", "Never"] = Field(
        default="Auto",
        description="What a GPU class does when its allocatable nvidia.com/gpu cannot hold the build beside the "
        "stable pods, or a candidate beside them (e.g. one Jetson GPU without time-slicing). Auto: decide from "
        "the nodes' allocatable GPUs; the stable pods yield (scaled to 0) while the build runs and come back after "
        "it, and a class that cannot shadow is promoted on its build's validation when rollout.autoPromote is "
        "true, else waits for an approval (the stable pods yield again while the new revision starts). Always: "
        "the same, treating every GPU class as unable (time-sliced GPUs too small for two engines). Never: the "
        "stable pods are never stopped; the class waits for a free GPU. CPU classes are never affected.",
    )


class Shadow(ApiModel):
    """How long and how much live traffic is mirrored to a candidate revision."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "!has(self.timeout) || duration(self.timeout) >= duration(self.duration)",
                "timeout must be at least duration: a shadow cannot time out before it may decide",
                ".timeout",
            )
        )
    }

    mirror_percent: float = Field(
        default=100,
        gt=0,
        le=100,
        description="Share of live requests copied to the candidate, in (0, 100].",
    )
    min_requests: int = Field(
        default=100, ge=1, le=100_000_000, description="Mirrored requests needed before a decision."
    )
    duration: Duration = Field(default="5m", description="Shortest time to shadow before a decision, e.g. 5m.")
    timeout: Duration | None = Field(
        default=None,
        description="Longest time to shadow without a decision, e.g. 1h; then onTimeout applies. At least "
        "duration. Default: 1h, or twice duration when that is longer.",
    )
    on_timeout: Literal["Rollback", "Promote", "Hold"] = Field(
        default="Rollback",
        description="What a shadow that reaches its timeout without a decision does: Rollback removes the "
        "candidate; Promote promotes it unless the evidence so far fails the analysis (the timeout stands in "
        "for an approval); Hold keeps shadowing until a person sets edgeml.dev/promote or edgeml.dev/rollback. "
        "The reason is ShadowTimeout with the figures gathered so far.",
    )


class Analysis(ApiModel):
    """The evidence a candidate must show during shadowing to be promoted."""

    min_agreement: Fraction = Field(
        default=0.99, description="Smallest share of mirrored requests whose outputs agree with stable, in (0, 1]."
    )
    max_latency_ratio: PositiveNumber = Field(
        default=1.5, description="Largest allowed ratio of candidate to stable latency."
    )
    max_error_rate: Rate = Field(
        default=0.01, description="Largest allowed share of mirrored requests that fail on the candidate, in [0, 1]."
    )
    agreement: Agreement = Field(
        default_factory=Agreement,
        description="When one mirrored request counts as agreeing (default: maxRelativeError 0.05 and the same top-1 "
        "class on every row).",
        json_schema_extra={"default": {}},
    )


class Rollout(ApiModel):
    """How a new revision replaces the stable one."""

    shadow: Shadow = Field(
        default_factory=Shadow, description="Shadow traffic settings.", json_schema_extra={"default": {}}
    )
    analysis: Analysis = Field(
        default_factory=Analysis, description="Promotion criteria.", json_schema_extra={"default": {}}
    )
    auto_promote: bool = Field(
        default=True,
        description="Promote a candidate that passes analysis without waiting; when false, the operator waits "
        "for an approval set on the EdgeModel.",
    )
    auto_rollback: bool = Field(
        default=True, description="Remove a candidate that fails analysis without waiting for a person."
    )
    progress_deadline: Duration = Field(
        default="10m",
        description="Longest time a built candidate's workload may take, from its creation, to have a Ready "
        "pod, e.g. 10m; past it the candidate is rolled back with the reason its pods show (image pull, crash "
        "loop with the last exit, OOMKilled, unschedulable with the scheduler's message).",
    )


class EdgeModelSpec(ApiModel):
    """What to build, validate, serve and roll out."""

    model: ArtifactRef = Field(description="The ONNX model, by URI and SHA-256 digest.")
    inputs: list[TensorSpec] | None = Field(
        default=None,
        max_length=32,
        description="Model inputs with their dynamic dimensions fixed. Default: the shapes in the model, "
        "with dynamic dimensions set to 1.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    targets: Targets | None = Field(default=None, description="Which nodes and which engines.")
    validation: Validation | None = Field(default=None, description="Checks each engine must pass.")
    serving: Serving = Field(
        default_factory=Serving, description="How engines are served.", json_schema_extra={"default": {}}
    )
    rollout: Rollout = Field(
        default_factory=Rollout,
        description="How a new revision is shadowed and promoted.",
        json_schema_extra={"default": {}},
    )
