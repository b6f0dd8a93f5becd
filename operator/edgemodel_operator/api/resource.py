"""The EdgeModel custom resource: group, version, names and the CRD built from the models."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from edgemodel_operator.api.fields import ApiModel, cel, validations
from edgemodel_operator.api.schema import JsonSchema, structural_schema
from edgemodel_operator.api.spec import EdgeModelSpec
from edgemodel_operator.api.status import EdgeModelStatus

GROUP = "edgeml.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "EdgeModel"
PLURAL = "edgemodels"
SINGULAR = "edgemodel"
SHORT_NAMES = ["em"]

# Child objects are named <edgemodel>-<revision>-<class>; this keeps them under 63 characters.
MAX_NAME_LENGTH = 40


class EdgeModel(ApiModel):
    """An ONNX model to build into one engine per edge hardware class, validate, serve and roll out."""

    api_version: str = Field(default=API_VERSION, description="edgeml.dev/v1alpha1.")
    kind: str = Field(default=KIND, description="EdgeModel.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: EdgeModelSpec = Field(description="What to build, validate, serve and roll out.")
    status: EdgeModelStatus | None = Field(default=None, description="What the operator observed and did.")


def _root_schema() -> JsonSchema:
    return {
        "type": "object",
        "description": EdgeModel.__doc__,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "Versioned schema of this object: edgeml.dev/v1alpha1."},
            "kind": {"type": "string", "description": "Kind of this object: EdgeModel."},
            "metadata": {"type": "object"},
            "spec": structural_schema(EdgeModelSpec),
            "status": structural_schema(EdgeModelStatus),
        },
        **validations(
            cel(
                f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
                f"metadata.name must be at most {MAX_NAME_LENGTH} characters, so that the names of the Jobs "
                "and workloads made from it fit in 63",
            )
        ),
    }


def _printer_columns() -> list[dict[str, Any]]:
    return [
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Classes", "type": "string", "jsonPath": ".status.classesReady"},
        {"name": "Stable", "type": "string", "jsonPath": ".status.revisions.stable"},
        {"name": "Candidate", "type": "string", "jsonPath": ".status.revisions.candidate"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition for EdgeModel, generated from the pydantic models."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["edgemodel"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": _printer_columns(),
                    "schema": {"openAPIV3Schema": _root_schema()},
                }
            ],
        },
    }
