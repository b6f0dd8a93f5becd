"""Reusable field types of the EdgeModel API, with their OpenAPI constraints and CEL rules.

Every constraint the API server can check lives here, so that a bad manifest is refused at
`kubectl apply` with a message that names the field, before the operator ever sees it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """One `x-kubernetes-validations` entry: a CEL rule and the message shown when it fails."""
    entry = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    return entry


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    """The schema extra that attaches CEL rules to a model or a field."""
    return {"x-kubernetes-validations": list(rules)}


class ApiModel(BaseModel):
    """Base of every API object: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )


URI_RULES = validations(
    cel(
        "self.startsWith('https://') || self.startsWith('oci://')",
        "must be an https:// or oci:// URI (file:// and local paths are not allowed in a cluster resource)",
    ),
    cel(r"!self.matches(r'(^|/)(\.|%2[eE]){2}(/|\?|#|$)')", "must not contain '..' path segments"),
    cel("!self.matches('^[a-z]+://[^/]*@')", "must not embed credentials (use a pull secret instead)"),
    cel(r"!self.matches(r'[\s\\]')", "must not contain whitespace or backslashes"),
)

Uri = Annotated[
    str,
    Field(min_length=9, max_length=2048, json_schema_extra=URI_RULES),
]
"""An https:// or oci:// URI without credentials, whitespace or `..` segments."""

Sha256 = Annotated[str, Field(pattern=r"^[a-f0-9]{64}$", min_length=64, max_length=64)]
"""A SHA-256 digest as 64 lowercase hexadecimal characters."""

Fraction = Annotated[float, Field(gt=0, le=1)]
"""A number in (0, 1]."""

Rate = Annotated[float, Field(ge=0, le=1)]
"""A number in [0, 1]."""

PositiveNumber = Annotated[float, Field(gt=0)]
"""A number greater than zero."""

Duration = Annotated[
    str,
    Field(
        pattern=r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$",
        max_length=32,
        json_schema_extra=validations(
            cel("duration(self) > duration('0s')", "must be a positive duration, such as 30s or 5m"),
            cel("duration(self) <= duration('168h')", "must be at most 168h"),
        ),
    ),
]
"""A Go duration such as `30s`, `5m` or `1h30m`."""

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_DURATION_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a Go duration of the `Duration` pattern, e.g. `1h30m` -> 5400.0."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(number) * _DURATION_UNIT[unit] for number, unit in parts)


_NUMBER = r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
_QUANTITY_PATTERN = rf"^(\+|-)?{_NUMBER}(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?{_NUMBER}))?$"

Quantity = Annotated[
    int | str,
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": _QUANTITY_PATTERN,
        }
    ),
]
"""A Kubernetes resource quantity such as `500m`, `2` or `1Gi`."""
