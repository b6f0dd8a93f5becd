"""Translation of pydantic models into a structural OpenAPI v3 schema."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, Field

from edgemodel_operator.api.schema import SchemaError, structural_schema


class Leaf(BaseModel):
    """A leaf."""

    size: int = Field(gt=0, le=10, description="Size.")


class Tree(BaseModel):
    """A tree."""

    leaf: Leaf | None = Field(default=None, description="Optional leaf.")
    leaves: list[Leaf] = Field(default_factory=list, max_length=3, description="Leaves.")
    colour: Literal["red", "green"] = Field(default="red", description="Colour.")
    labels: dict[str, str] | None = Field(default=None, description="Labels.")
    ratio: Annotated[float, Field(ge=0, lt=1)] = Field(default=0, description="Ratio.")


def test_optional_model_becomes_the_inlined_object_without_null() -> None:
    leaf = structural_schema(Tree)["properties"]["leaf"]
    assert leaf["type"] == "object"
    assert leaf["description"] == "Optional leaf."
    assert "default" not in leaf
    assert "anyOf" not in leaf


def test_exclusive_bounds_become_openapi_v3_flags() -> None:
    schema = structural_schema(Tree)
    size = schema["properties"]["leaves"]["items"]["properties"]["size"]
    assert size == {"type": "integer", "minimum": 0, "exclusiveMinimum": True, "maximum": 10, "description": "Size."}
    ratio = schema["properties"]["ratio"]
    assert (ratio["minimum"], ratio["maximum"], ratio["exclusiveMaximum"]) == (0, 1, True)


def test_literals_become_enums_and_maps_keep_their_value_type() -> None:
    properties = structural_schema(Tree)["properties"]
    assert properties["colour"]["enum"] == ["red", "green"]
    assert properties["colour"]["default"] == "red"
    assert properties["labels"]["additionalProperties"] == {"type": "string"}


def test_list_bounds_are_kept() -> None:
    assert structural_schema(Tree)["properties"]["leaves"]["maxItems"] == 3


class Undocumented(BaseModel):
    """Missing a field description."""

    name: str


class Union(BaseModel):
    """A field that is one of two types."""

    value: int | str = Field(description="Either.")


@pytest.mark.parametrize(
    ("model", "message"),
    [(Undocumented, "Undocumented.name has no description"), (Union, "Union.value is a union")],
)
def test_models_that_cannot_be_a_structural_schema_are_refused(model: type[BaseModel], message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        structural_schema(model)
