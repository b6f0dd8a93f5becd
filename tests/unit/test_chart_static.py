"""What can be checked of the chart, the images and their workflow without a cluster or a registry."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client import CollectorRegistry
from prometheus_client.registry import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "edgemodel"
IMAGES = ROOT / "images"
DOCKERFILES = sorted(IMAGES.glob("*/Dockerfile"))
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
# NGC and ghcr.io release tags are not rebuilt; the images workflow records the digests it built from
# (provenance). Docker Hub tags such as python:3.12-slim are rebuilt often, so those carry a digest.
TAG_ONLY_REGISTRIES = ("nvcr.io/", "ghcr.io/")
DEBIAN_RELEASES = ("bookworm", "trixie")
WORKFLOW = ROOT / ".github" / "workflows" / "images.yml"


@pytest.mark.parametrize("crd", sorted((ROOT / "crds").glob("*.yaml")), ids=lambda p: p.name)
def test_the_chart_ships_each_crd_byte_identical_to_crds(crd: Path) -> None:
    copy = CHART / "crds" / crd.name
    assert copy.exists(), f"the chart lacks {crd.name}: copy crds/{crd.name} to charts/edgemodel/crds/"
    assert copy.read_bytes() == crd.read_bytes(), f"charts/edgemodel/crds/{crd.name} differs from crds/{crd.name}"


def test_the_chart_ships_no_crd_that_crds_lacks() -> None:
    assert {p.name for p in (CHART / "crds").glob("*")} == {p.name for p in (ROOT / "crds").glob("*.yaml")}


def _base_images(dockerfile: Path) -> list[str]:
    """Every FROM image of a Dockerfile with ARG defaults substituted; earlier stages are left out."""
    defaults: dict[str, str] = {}
    stages: set[str] = set()
    images = []
    for line in dockerfile.read_text().splitlines():
        if match := re.match(r"ARG (\w+)=(\S+)$", line):
            defaults.setdefault(match.group(1), match.group(2))
        elif match := re.match(r"FROM (?:--platform=\S+ )?(\S+)(?: AS (\S+))?$", line):
            image = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], match.group(1))
            if image not in stages:
                images.append(image)
            if match.group(2):
                stages.add(match.group(2))
    return images


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_every_base_image_is_pinned(dockerfile: Path) -> None:
    images = _base_images(dockerfile)
    assert images
    for image in images:
        name = DIGEST.sub("", image)
        repository, _, tag = name.rpartition(":")
        assert repository, f"{image}: no tag"
        assert "/" not in tag, f"{image}: no tag"
        assert re.search(r"\d", tag) or tag.split("-")[0] in DEBIAN_RELEASES, f"{image}: the tag names no release"
        if not name.startswith(TAG_ONLY_REGISTRIES) and not DIGEST.search(image):
            # A Docker Hub base named by tag alone is pinned by digest when the release is built.
            assert f"BASE_IMAGE={name}@${{digest}}" in WORKFLOW.read_text(), f"{image}: no digest in the build"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_every_image_runs_edgemodel_as_a_numeric_non_root_user(dockerfile: Path) -> None:
    final_stage = dockerfile.read_text().rsplit("\nFROM ", 1)[1]
    users = re.findall(r"^USER (\S+)$", final_stage, re.MULTILINE)
    assert users, "the final stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), f"USER {users[-1]} is not numeric"
    assert int(uid) > 0, "USER is root"
    assert gid.isdigit(), f"USER {users[-1]} names no numeric group"
    assert int(gid) > 0, "the group is root's"
    assert re.search(r'^ENTRYPOINT \["edgemodel"\]$', final_stage, re.MULTILINE)


def _lock(name: str) -> dict[str, str]:
    """package -> version, after checking that every entry is pinned exactly and carries hashes."""
    pinned = {}
    for entry in re.split(r"\n(?=[a-z0-9])", (IMAGES / "requirements" / f"{name}.txt").read_text().split("\n\n", 1)[1]):
        requirement, *hashes = [part.strip(" \\") for part in entry.strip().splitlines()]
        package, _, version = requirement.partition("==")
        assert re.fullmatch(r"[\w.+!-]+", version), f"{name}.txt: {requirement!r} is not pinned"
        assert hashes, f"{name}.txt: {requirement!r} has no hash"
        assert all(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", h) for h in hashes), requirement
        pinned[str(canonicalize_name(package))] = version
    return pinned


@pytest.mark.parametrize(
    ("lock", "selected"),
    [
        ("runtime", None),
        ("runtime-cpu", None),
        ("operator", {"kopf", "kubernetes", "pydantic", "pydantic-settings", "prometheus-client", "pyyaml"}),
    ],
)
def test_each_lock_pins_the_projects_dependencies_within_their_ranges(lock: str, selected: set[str] | None) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = _lock(lock)
    for requirement in map(Requirement, project["dependencies"]):
        name = str(canonicalize_name(requirement.name))
        if selected is None or name in selected:
            assert name in pinned, f"{lock}.txt lacks {name}: run `python images/lock.py`"
            assert requirement.specifier.contains(pinned[name]), f"{lock}.txt: {name}=={pinned[name]} vs {requirement}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_images_install_python_packages_only_from_hashed_locks(dockerfile: Path) -> None:
    text = dockerfile.read_text().replace("\\\n", " ")
    installs = [line for line in text.splitlines() if re.search(r"\b(pip|uv pip) install\b", line)]
    assert installs
    for line in installs:
        for command in re.findall(r"(?:pip|uv pip) install[^&;]*", line):
            if "-r " in command:
                assert "--require-hashes" in command, command
                assert "--no-deps" in command, command
            else:  # the wheel just built, or the TensorRT wheel given with its sha256
                assert "--no-deps" in command, command
                assert re.search(r"/wheels/\*\.whl|#sha256=", command), command
    for lock in re.findall(r"images/requirements/([\w-]+)\.txt", text):
        _lock(lock)


def test_the_workflow_builds_every_image_for_its_platforms() -> None:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "images.yml").read_text())
    matrix = {item["image"]: item["platforms"] for item in workflow["jobs"]["build"]["strategy"]["matrix"]["include"]}
    assert set(matrix) == {dockerfile.parent.name for dockerfile in DOCKERFILES}
    assert matrix["operator"] == matrix["runtime-cpu"] == "linux/amd64,linux/arm64"
    assert matrix["runtime-cuda"] == "linux/amd64"
    assert matrix["runtime-jetson"] == "linux/arm64"


def _series_names() -> set[str]:
    """Every series name the operator and the inference server export, as PromQL sees them."""
    import edgemodel_operator.metrics  # noqa: F401 - registers the operator's metrics in the default registry
    from edgemodel_runtime.serve import metrics as serve_metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set()
    registries: list[CollectorRegistry] = [REGISTRY, serve_metrics.create().registry]
    for registry in registries:
        for family in registry.collect():
            if family.name.startswith("edgemodel_"):
                names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


def _queries() -> dict[str, str]:
    dashboard: dict[str, Any] = json.loads((CHART / "files" / "edgemodel-dashboard.json").read_text())
    queries = {
        f"panel {panel['title']!r} query {target['refId']}": target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    }
    rules = (CHART / "templates" / "prometheusrule.yaml").read_text()
    queries |= {
        f"alert {name}": expr for name, expr in re.findall(r"alert: (\w+)\n\s+expr: >-?\n((?:\s{12}.*\n)+)", rules)
    }
    return queries


def test_the_dashboard_and_the_alerts_query_only_metrics_that_exist() -> None:
    exported = _series_names()
    queries = _queries()
    assert len([q for q in queries if q.startswith("alert")]) >= 4
    for where, expr in queries.items():
        used = set(re.findall(r"edgemodel_[a-z0-9_]+", expr))
        assert used, f"{where} queries no edgemodel metric"
        assert used <= exported, f"{where} queries {sorted(used - exported)}, which nothing exports"


def test_the_dashboard_shows_every_metric_family() -> None:
    used = " ".join(_queries().values())
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in _series_names()}
    missing = sorted(
        family for family in families if not re.search(rf"\b{family}(_total|_bucket|_sum|_count)?\b", used)
    )
    assert not missing, f"no panel or alert shows {missing}"
