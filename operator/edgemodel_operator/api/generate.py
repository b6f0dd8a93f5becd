"""Render the CRD YAML and the field reference from the API models.

`python -m edgemodel_operator.api.generate` rewrites `crds/edgemodel.yaml` and
`docs/reference.md`; a unit test fails when the committed files differ from what it renders.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from edgemodel_operator.api.resource import API_VERSION, KIND, build_crd
from edgemodel_operator.api.schema import JsonSchema

HEADER = "# Generated from operator/edgemodel_operator/api by `make generate`. Do not edit.\n"


def render_crd() -> str:
    """The CRD as YAML text, exactly as committed under crds/."""
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


def _type_of(node: JsonSchema) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "quantity (integer or string)"
    kind = str(node.get("type", "any"))
    if kind == "array":
        return f"list of {_type_of(node['items'])}"
    if kind == "object" and "additionalProperties" in node:
        return f"map of string to {_type_of(node['additionalProperties'])}"
    if "enum" in node:
        return ", ".join(f"`{value}`" for value in node["enum"])
    return f"{kind} ({node['format']})" if "format" in node else kind


def _constraints(node: JsonSchema) -> list[str]:
    notes: list[str] = []
    if "minimum" in node:
        notes.append(f"{'>' if node.get('exclusiveMinimum') else '≥'} {node['minimum']}")
    if "maximum" in node:
        notes.append(f"{'<' if node.get('exclusiveMaximum') else '≤'} {node['maximum']}")
    for key, label in (
        ("minLength", "min length"),
        ("maxLength", "max length"),
        ("minItems", "min items"),
        ("maxItems", "max items"),
        ("maxProperties", "max entries"),
    ):
        if key in node:
            notes.append(f"{label} {node[key]}")
    if "pattern" in node:
        notes.append(f"pattern `{node['pattern']}`")
    if node.get("x-kubernetes-list-type") == "map":
        notes.append(f"unique by {', '.join(node['x-kubernetes-list-map-keys'])}")
    notes.extend(rule["message"] for rule in node.get("x-kubernetes-validations", []))
    return notes


def _objects(path: str, node: JsonSchema) -> Iterator[tuple[str, JsonSchema]]:
    """Every object in the schema with its dotted path, parents before children."""
    if node.get("type") == "array":
        yield from _objects(f"{path}[]", node["items"])
        return
    if "properties" not in node:
        return
    yield path, node
    for name, child in node["properties"].items():
        yield from _objects(f"{path}.{name}", child)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_reference() -> str:
    """A Markdown reference of every EdgeModel field, generated from the CRD schema."""
    root = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    lines = [
        "<!-- Generated from operator/edgemodel_operator/api by `make generate`. Do not edit. -->",
        f"# {KIND} field reference ({API_VERSION})",
        "",
        "Every field of the EdgeModel custom resource, with the checks the API server applies at",
        "`kubectl apply`. `kubectl explain edgemodel.spec --recursive` shows the same descriptions.",
        "",
    ]
    for section in ("spec", "status"):
        for path, node in _objects(section, root["properties"][section]):
            required = set(node.get("required", []))
            lines += [f"## `{path}`", "", _cell(node.get("description", "")), ""]
            lines += ["| Field | Type | Required | Default | Description |", "| --- | --- | --- | --- | --- |"]
            for name, child in node["properties"].items():
                default = f"`{json.dumps(child['default'])}`" if "default" in child else ""
                description = child.get("description", "")
                notes = _constraints(child)
                if notes:
                    description += " *" + "; ".join(notes) + ".*"
                row = [f"`{name}`", _type_of(child), "yes" if name in required else "", default, description]
                lines.append("| " + " | ".join(_cell(cell) for cell in row) + " |")
            rules = _constraints({"x-kubernetes-validations": node.get("x-kubernetes-validations", [])})
            if rules:
                lines += ["", "Rules: " + "; ".join(rules) + "."]
            lines.append("")
    return "\n".join(lines)


def outputs(root: Path) -> dict[Path, str]:
    """The generated files and their contents, relative to the repository root."""
    return {root / "crds" / "edgemodel.yaml": render_crd(), root / "docs" / "reference.md": render_reference()}


def crd_command(argv: Sequence[str]) -> int:
    """`edgemodel crd`: print the EdgeModel CRD, ready for `kubectl apply -f -`."""
    argparse.ArgumentParser(prog="edgemodel crd", description=crd_command.__doc__).parse_args(argv)
    sys.stdout.write(render_crd())
    return 0


def reference_command(argv: Sequence[str]) -> int:
    """`edgemodel reference`: print the Markdown reference of every EdgeModel field."""
    argparse.ArgumentParser(prog="edgemodel reference", description=reference_command.__doc__).parse_args(argv)
    sys.stdout.write(render_reference())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate crds/ and docs/ from the API models.")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="repository root (default: .)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is out of date")
    args = parser.parse_args(argv)
    stale: list[Path] = []
    for path, text in outputs(args.root).items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if args.check and stale:
        print("out of date (run `make generate`): " + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
