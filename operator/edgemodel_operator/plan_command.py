"""`edgemodel plan FILE`: what the operator would create for a manifest against the current cluster.

Reads the nodes (and nothing else) from the cluster of the current kubeconfig, runs the same pure
plan the operator runs for a new EdgeModel, and prints the objects as YAML. Changes nothing.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from edgemodel_operator.api.resource import KIND
from edgemodel_operator.api.spec import EdgeModelSpec
from edgemodel_operator.reconcile import Observed, plan
from edgemodel_operator.settings import OperatorSettings


def _manifest(path: Path) -> dict[str, Any]:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    models = [d for d in documents if d.get("kind") == KIND]
    if len(models) != 1:
        raise ValueError(f"{path} holds {len(models)} EdgeModels; expected exactly one")
    body: dict[str, Any] = models[0]
    EdgeModelSpec.model_validate(body.get("spec") or {})
    metadata = body.setdefault("metadata", {})
    metadata.setdefault("namespace", "default")
    metadata.setdefault("uid", "00000000-0000-0000-0000-000000000000")
    metadata.setdefault("generation", 1)
    return body


def plan_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgemodel plan", description=__doc__)
    parser.add_argument("file", type=Path, help="a manifest with one EdgeModel")
    args = parser.parse_args(argv)
    try:
        body = _manifest(args.file)
    except (OSError, ValueError, yaml.YAMLError, ValidationError) as error:
        print(f"edgemodel plan: {error}", file=sys.stderr)
        return 2
    from kubernetes import client, config

    config.load_kube_config()
    api = client.ApiClient()
    nodes = api.sanitize_for_serialization(client.CoreV1Api(api).list_node()).get("items", [])
    observed = Observed(body=body, nodes=nodes, jobs=[], pods=[], deployments=[], services=[])
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = plan(observed, OperatorSettings().images(), now)
    classes = result.status["classes"]
    print(f"# {len(classes)} hardware classes: " + ", ".join(f"{c['key']} ({c['nodeCount']} nodes)" for c in classes))
    sys.stdout.write(yaml.safe_dump_all(result.create, sort_keys=False))
    return 0
