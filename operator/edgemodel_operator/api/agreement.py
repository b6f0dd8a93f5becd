"""When one mirrored request agrees: the limits of `spec.rollout.analysis.agreement`.

The operator writes them into the shadow configuration of the stable pods, whose servers compare each
mirrored answer with their own (edgemodel_runtime.build.compare holds the value semantics).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from edgemodel_operator.api.fields import ApiModel, Rate, cel, validations

OutputName = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^\S+$")]
RelativeError = Annotated[float, Field(gt=0, le=1_000_000)]
AbsoluteError = Annotated[float, Field(gt=0, le=1e30)]
Cosine = Annotated[float, Field(ge=-1, le=1)]


class OutputAgreement(ApiModel):
    """Limits for one named output, overriding those of `agreement` that it sets."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": validations(
            cel(
                "has(self.maxAbsError) || has(self.maxRelativeError) || has(self.minCosine) "
                "|| has(self.minTop1Agreement)",
                "an output entry must set at least one of maxAbsError, maxRelativeError, minCosine, minTop1Agreement",
            )
        )
    }

    name: OutputName = Field(description="Output name as the model declares it.")
    max_abs_error: AbsoluteError | None = Field(
        default=None, description="Largest allowed absolute difference of any element, in (0, 1e30]."
    )
    max_relative_error: RelativeError | None = Field(
        default=None, description="Largest allowed difference relative to stable's output scale, in (0, 1e6]."
    )
    min_cosine: Cosine | None = Field(
        default=None, description="Smallest allowed cosine similarity to stable's output, in [-1, 1]."
    )
    min_top1_agreement: Rate | None = Field(
        default=None, description="Smallest share of rows with stable's arg-max class, in [0, 1] (0: unchecked)."
    )


class Agreement(ApiModel):
    """When one mirrored request agrees: every output the client asked for within these limits.

    Compared per output, by name, between what stable and the candidate answered. Always a disagreement,
    whatever the limits: an output missing from or added to the candidate's answer, another shape or
    datatype, a NaN or infinity where stable's value differs (the same NaN or infinity at the same position
    is equal), and any differing integer or boolean element. Relative errors are measured against
    max(range, largest magnitude) of stable's output; top-1 applies to outputs shaped [..., classes].
    """

    max_relative_error: RelativeError = Field(
        default=0.05,
        description="Largest allowed difference relative to stable's output scale (max of range and largest "
        "magnitude), in (0, 1e6]; default 0.05.",
    )
    min_top1_agreement: Rate = Field(
        default=1.0,
        description="Smallest share of rows (positions of a [..., classes] output) whose arg-max class is stable's, "
        "in [0, 1]; default 1 (every row); 0 leaves it unchecked.",
    )
    max_abs_error: AbsoluteError | None = Field(
        default=None, description="Largest allowed absolute difference of any element, in (0, 1e30]; unset: unchecked."
    )
    min_cosine: Cosine | None = Field(
        default=None, description="Smallest allowed cosine similarity to stable's output, in [-1, 1]; unset: unchecked."
    )
    outputs: list[OutputAgreement] | None = Field(
        default=None,
        max_length=64,
        description="Per-output limits, overriding the ones above that they set.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )

    def runtime_config(self) -> dict[str, Any]:
        """These limits as the serving runtime's shadow configuration reads them (outputs keyed by name)."""
        config = self.model_dump(by_alias=True, exclude_none=True, exclude={"outputs"})
        overrides = {entry.name: entry.model_dump(by_alias=True, exclude_none=True, exclude={"name"})
                     for entry in self.outputs or []}  # fmt: skip
        return config | ({"outputs": overrides} if overrides else {})

    def describe(self) -> str:
        """The limits in words, for Events and status messages: `maxRelativeError 0.05, minTop1Agreement 1`."""
        config = self.runtime_config()
        outputs = config.pop("outputs", {})
        text = ", ".join(f"{key} {value:g}" for key, value in config.items())
        for name, limits in outputs.items():
            text += f"; output {name}: " + ", ".join(f"{key} {value:g}" for key, value in limits.items())
        return text
