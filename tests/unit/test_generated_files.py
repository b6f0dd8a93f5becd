"""The committed CRD and field reference are exactly what the API models generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edgemodel_operator.api.generate import outputs, render_crd

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted(outputs(ROOT)), ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_file_matches_what_the_models_generate(path: Path) -> None:
    expected = outputs(ROOT)[path]
    assert path.exists(), f"{path} is missing: run `make generate`"
    assert path.read_text() == expected, f"{path} is out of date: run `make generate` and commit the result"


def _walk(node: dict[str, object], path: str) -> list[tuple[str, dict[str, object]]]:
    found = [(path, node)]
    properties = node.get("properties")
    if isinstance(properties, dict):
        for name, child in properties.items():
            found += _walk(child, f"{path}.{name}")
    items = node.get("items")
    if isinstance(items, dict):
        found += _walk(items, f"{path}[]")
    return found


def _crd_schema() -> dict[str, object]:
    crd = yaml.safe_load(render_crd())
    schema: dict[str, object] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_every_spec_and_status_field_has_a_description() -> None:
    schema = _crd_schema()
    properties = schema["properties"]
    assert isinstance(properties, dict)
    for section in ("spec", "status"):
        for path, node in _walk(properties[section], section):
            if path.endswith("[]"):
                continue
            assert node.get("description"), f"{path} has no description"


def test_every_string_and_list_in_spec_is_bounded_so_cel_costs_stay_within_budget() -> None:
    properties = _crd_schema()["properties"]
    assert isinstance(properties, dict)
    for path, node in _walk(properties["spec"], "spec"):
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node, f"{path} is an unbounded string"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path} is an unbounded list"


def test_crd_names_printer_columns_and_status_subresource() -> None:
    crd = yaml.safe_load(render_crd())
    version = crd["spec"]["versions"][0]
    assert crd["metadata"]["name"] == "edgemodels.edgeml.dev"
    assert crd["spec"]["names"]["shortNames"] == ["em"]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Ready",
        "Phase",
        "Classes",
        "Stable",
        "Candidate",
        "Age",
    ]
