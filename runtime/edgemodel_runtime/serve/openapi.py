"""The OpenAPI document the server publishes at /openapi.json (OIP v2 REST, as served here)."""

from __future__ import annotations

from typing import Any

from edgemodel_runtime.serve.protocol import DATATYPES, MAX_DIMS


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_response(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


_ERROR = _json_response("The request was refused; `error` says why.", "Error")


def _schemas() -> dict[str, Any]:
    datatype = {"type": "string", "enum": sorted(DATATYPES)}
    shape = {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": MAX_DIMS}

    def tensor(binary_size: dict[str, Any], data: str) -> dict[str, Any]:
        """A tensor in a request or response: JSON data, or the size of its binary data."""
        return {
            "type": "object",
            "required": ["name", "shape", "datatype"],
            "properties": {
                "name": {"type": "string"},
                "shape": shape,
                "datatype": datatype,
                "parameters": {"type": "object", "properties": {"binary_data_size": binary_size}},
                "data": {
                    "type": "array",
                    "description": data + " Numbers (NaN, Infinity, -Infinity as bare tokens, as Triton writes "
                    "them), booleans for BOOL, UTF-8 strings for BYTES.",
                },
            },
        }

    tensor_metadata = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": datatype,
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    }
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "Live": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
        "Ready": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}},
        "ServerMetadata": {
            "type": "object",
            "required": ["name", "version", "extensions"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "extensions": {"type": "array", "items": {"type": "string"}},
            },
        },
        "TensorMetadata": tensor_metadata,
        "ModelMetadata": {
            "type": "object",
            "required": ["name", "platform", "inputs", "outputs"],
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": _ref("TensorMetadata")},
                "outputs": {"type": "array", "items": _ref("TensorMetadata")},
            },
        },
        "RequestInput": tensor({"type": "integer", "minimum": 0}, "Row-major elements, flat or nested."),
        "RequestOutput": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}},
            },
        },
        "InferenceRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": {
                    "type": "object",
                    "description": "Other parameters are refused with 400 naming them.",
                    "properties": {
                        "binary_data_output": {"type": "boolean"},
                        "timeout": {
                            "type": "integer",
                            "minimum": 0,
                            "description": "Most microseconds to wait for the engine (0: no bound); 503 beyond.",
                        },
                        "priority": {"type": "integer", "enum": [0]},
                        "sequence_id": {"type": "integer", "enum": [0]},
                    },
                },
                "inputs": {"type": "array", "items": _ref("RequestInput"), "minItems": 1},
                "outputs": {"type": "array", "items": _ref("RequestOutput")},
            },
        },
        "ResponseOutput": tensor({"type": "integer"}, "Row-major elements, flat."),
        "InferenceResponse": {
            "type": "object",
            "required": ["model_name", "outputs"],
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "outputs": {"type": "array", "items": _ref("ResponseOutput")},
            },
        },
    }


def openapi_document(model_name: str) -> dict[str, Any]:
    """OpenAPI 3.0 for every endpoint this server answers."""
    name_parameter = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "example": model_name},
    }
    version_parameter = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
    not_found = {"404": _ERROR}

    def get(
        summary: str, ok: dict[str, Any], extra: dict[str, Any] | None = None, params: list[Any] | None = None
    ) -> dict[str, Any]:
        operation = {"summary": summary, "responses": {"200": ok, **(extra or {})}}
        if params:
            operation["parameters"] = params
        return {"get": operation}

    ready = _json_response("Ready", "Ready")
    not_ready = {"400": _json_response("Not ready", "Ready")}
    infer = {
        "post": {
            "summary": "Run an inference (JSON tensors, or the binary tensor data extension)",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("InferenceRequest")}}},
            "responses": {
                "200": {
                    "description": "Outputs; binary outputs follow the JSON header when requested",
                    "content": {
                        "application/json": {"schema": _ref("InferenceResponse")},
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                "400": _ERROR,
                "404": _ERROR,
                "413": _ERROR,
                "415": _ERROR,
                "503": _ERROR,
            },
        }
    }
    model_paths: dict[str, Any] = {}
    for prefix, params in (
        ("/v2/models/{name}", [name_parameter]),
        ("/v2/models/{name}/versions/{version}", [name_parameter, version_parameter]),
    ):
        model_paths[prefix] = get("Model metadata", _json_response("Metadata", "ModelMetadata"), not_found, params)
        model_paths[f"{prefix}/ready"] = get("Model readiness", ready, {**not_ready, **not_found}, params)
        model_paths[f"{prefix}/infer"] = {"post": {**infer["post"], "parameters": params}}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "edgemodel inference server (Open Inference Protocol v2)",
            "version": "2",
            "description": f"Serves the model {model_name!r}.",
        },
        "paths": {
            "/v2/health/live": get("Liveness", _json_response("Live", "Live")),
            "/v2/health/ready": get("Readiness: the model is loaded and warmed", ready, not_ready),
            "/v2": get("Server metadata", _json_response("Metadata", "ServerMetadata")),
            **model_paths,
            "/metrics": get(
                "Prometheus metrics",
                {"description": "Text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}},
            ),
        },
        "components": {"schemas": _schemas()},
    }
