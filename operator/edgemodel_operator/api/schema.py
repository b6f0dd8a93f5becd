"""Turn pydantic models into a Kubernetes structural OpenAPI v3 schema.

Pydantic emits JSON Schema 2020-12 with `$ref`s, `anyOf` for optionals and numeric
`exclusiveMinimum`; a CRD needs one inlined tree in OpenAPI v3.0 terms, where every node has
a type and `exclusiveMinimum` is a flag. This module does that translation and nothing else.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

JsonSchema = dict[str, Any]

# JSON Schema keywords that carry over unchanged into a CRD schema.
_KEPT = {
    "type",
    "format",
    "description",
    "enum",
    "pattern",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "minimum",
    "maximum",
    "required",
    "default",
    "nullable",
    "anyOf",
}


class SchemaError(ValueError):
    """The models cannot be expressed as a structural schema (for example, a field lacks a description)."""


def structural_schema(model: type[BaseModel]) -> JsonSchema:
    """The structural OpenAPI v3 schema of `model`, with camelCase property names."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    definitions = raw.pop("$defs", {})
    return _convert(raw, definitions, path=model.__name__)


def _resolve(node: JsonSchema, definitions: dict[str, JsonSchema]) -> JsonSchema:
    """Inline a `$ref`, keeping keywords written beside it (a description, a default)."""
    if "$ref" not in node:
        return node
    name = node["$ref"].rsplit("/", 1)[-1]
    return {**definitions[name], **{k: v for k, v in node.items() if k != "$ref"}}


def _unwrap_optional(node: JsonSchema) -> JsonSchema:
    """`X | None` becomes X: absence, not null, is how a CRD says a field is unset."""
    options = node.get("anyOf")
    if not options:
        return node
    non_null = [option for option in options if option.get("type") != "null"]
    if len(non_null) == len(options) or len(non_null) != 1:
        return node
    outer = {k: v for k, v in node.items() if k != "anyOf"}
    if outer.get("default", ...) is None:
        del outer["default"]
    return {**non_null[0], **outer}


def _convert(node: JsonSchema, definitions: dict[str, JsonSchema], path: str) -> JsonSchema:
    node = _resolve(_unwrap_optional(_resolve(node, definitions)), definitions)
    if "const" in node:
        node = {**{k: v for k, v in node.items() if k != "const"}, "enum": [node["const"]]}
    out = _keywords(node)
    if node.get("type") == "object" or "properties" in node:
        out.update(_convert_object(node, definitions, path))
    if node.get("type") == "array":
        out["items"] = _convert(node["items"], definitions, f"{path}[]")
    _check_structural(out, path)
    return out


def _keywords(node: JsonSchema) -> JsonSchema:
    """The keywords of one node that a CRD understands, with numeric bounds in OpenAPI v3.0 form."""
    out: JsonSchema = {}
    for key, value in node.items():
        if key in _KEPT or key.startswith("x-kubernetes-"):
            out[key] = value
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
    return out


def _convert_object(node: JsonSchema, definitions: dict[str, JsonSchema], path: str) -> JsonSchema:
    out: JsonSchema = {"type": "object"}
    properties: JsonSchema = {}
    for name, child in node.get("properties", {}).items():
        converted = _convert(child, definitions, f"{path}.{name}")
        if "description" not in converted:
            raise SchemaError(f"{path}.{name} has no description")
        if converted.get("type") == "object" and "default" in converted:
            # Let the API server fill nested defaults from an empty object.
            converted["default"] = {}
        properties[name] = converted
    if properties:
        out["properties"] = properties
    additional = node.get("additionalProperties")
    if isinstance(additional, dict):
        out["additionalProperties"] = _convert(additional, definitions, f"{path}[*]")
    if "required" in node:
        out["required"] = sorted(node["required"])
    return out


def _check_structural(out: JsonSchema, path: str) -> None:
    int_or_string = bool(out.get("x-kubernetes-int-or-string"))
    if "anyOf" in out and not int_or_string:
        raise SchemaError(f"{path} is a union; a structural schema needs one type")
    if "type" not in out and not int_or_string:
        raise SchemaError(f"{path} has no type")
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        raise SchemaError(f"{path} is an object without properties")
