"""The Helm chart (charts/edgemodel): lint, schema, server-side validation, install, RBAC, restricted Pod Security.

Helm is built from helm.sh/helm/v3 through the Go module proxy like the test bed's other binaries.
The strongest check runs the real operator process with nothing but the chart's ServiceAccount token:
if the ClusterRoles lacked a verb the operator uses, its builds would never start.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import eventually, get
from tests.integration import gitops_states as states
from tests.integration.gitops_states import evaluate
from tests.integration.operators import OperatorProcess, apply_edgemodel, finish_builds
from tests.testbed import binaries
from tests.testbed.cluster import Testbed

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "edgemodel"
RESTRICTED = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn", "audit")}
EVERY_OPTION = [
    "--set", "replicaCount=2", "--set", "peering.enabled=true", "--set", "networkPolicy.enabled=true",
    "--set", "serviceMonitor.enabled=true", "--set", "prometheusRule.enabled=true",
    "--set", "grafanaDashboard.enabled=true", "--set", "networkPolicy.apiServerCIDRs={127.0.0.1/32}",
]  # fmt: skip
# Stand-ins for prometheus-operator's CRDs, which the test bed does not have: they make the API server
# accept the kinds, not check their fields (those are checked by rendering and by the unit tests).
MONITORING_KINDS = {
    "ServiceMonitor": "servicemonitors",
    "PodMonitor": "podmonitors",
    "PrometheusRule": "prometheusrules",
}


def _helm_binary() -> Path:
    component = next(c for c in binaries.COMPONENTS if "helm" in c.commands)
    return binaries.ensure(component) / "helm"


@pytest.fixture(scope="module")
def helm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("helm")


def helm(home: Path, *args: str, bed: Testbed | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **{f"HELM_{kind}_HOME": str(home / kind.lower()) for kind in ("CACHE", "CONFIG", "DATA")}}
    if bed is not None:
        env["KUBECONFIG"] = str(bed.kubeconfig)
    done = subprocess.run(
        [str(_helm_binary()), *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    if check:
        assert done.returncode == 0, f"helm {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def render(home: Path, namespace: str, *values: str, release: str = "em") -> list[dict[str, Any]]:
    out = helm(home, "template", release, str(CHART), "--namespace", namespace, *values).stdout
    return [d for d in yaml.safe_load_all(out) if d]


# ---------------------------------------------------------------- without a cluster


def test_lint_passes_with_the_defaults_and_with_every_option(helm_home: Path) -> None:
    helm(helm_home, "lint", "--strict", str(CHART))
    helm(helm_home, "lint", "--strict", str(CHART), *EVERY_OPTION, "--set", "watchNamespaces={a,b}")


@pytest.mark.parametrize(
    ("values", "says"),
    [
        (["--set", "imag.tag=1"], "additional properties 'imag' not allowed"),
        (["--set", "image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        (["--set", "replicaCount=2"], "/peering/enabled"),
        (["--set", "watchNamespaces={Models}"], "/watchNamespaces/0"),
        (["--set", "resyncSeconds=0"], "/resyncSeconds"),
        (["--set", "image.digest=sha256:nothex"], "/image/digest"),
        (["--set", "networkPolicy.apiServerCIDRs={kubernetes}"], "/networkPolicy/apiServerCIDRs/0"),
    ],
)
def test_bad_values_fail_lint_and_template_naming_the_field(helm_home: Path, values: list[str], says: str) -> None:
    for command in (["lint", "--strict", str(CHART)], ["template", "em", str(CHART)]):
        done = helm(helm_home, *command, *values, check=False)
        assert done.returncode != 0, f"helm {command[0]} accepted {values}"
        assert "values don't meet the specifications of the schema" in done.stdout + done.stderr
        assert says in done.stdout + done.stderr


def test_a_metrics_scrape_needs_the_metrics_service(helm_home: Path) -> None:
    values = ["--set", "serviceMonitor.enabled=true", "--set", "metrics.service.enabled=false"]
    done = helm(helm_home, "template", "em", str(CHART), *values, check=False)
    assert done.returncode != 0
    assert "serviceMonitor.enabled needs metrics.service.enabled=true" in done.stderr


def test_the_operator_deployment_is_restricted_and_configured_from_values(helm_home: Path) -> None:
    objects = render(
        helm_home,
        "ops",
        *EVERY_OPTION,
        "--set",
        "watchNamespaces={a,b}",
        "--set",
        "image.digest=" + "sha256:" + "0" * 64,
    )
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] + container["args"] == ["edgemodel", "operator"]
    assert container["image"] == "ghcr.io/edgemodel/operator@sha256:" + "0" * 64
    env = {e["name"]: e["value"] for e in container["env"]}
    assert json.loads(env["EDGEMODEL_NAMESPACES"]) == ["a", "b"]
    assert env["EDGEMODEL_PEERING"] == "edgemodel"
    assert (env["EDGEMODEL_HEALTH_PORT"], env["EDGEMODEL_METRICS_PORT"]) == ("8081", "8082")
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    kinds = sorted(o["kind"] for o in objects)
    assert kinds.count("KopfPeering") == 2
    assert kinds.count("RoleBinding") == 2
    assert "ClusterKopfPeering" not in kinds


def _rules(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for o in objects if o["kind"] in {"ClusterRole", "Role"} for rule in o["rules"]]


@pytest.mark.parametrize("namespaces", [[], ["a", "b"]], ids=["cluster-wide", "two namespaces"])
def test_rbac_names_every_verb_and_resource_and_no_wildcard(helm_home: Path, namespaces: list[str]) -> None:
    values = ["--set", "peering.enabled=true"]
    if namespaces:
        values += ["--set", f"watchNamespaces={{{','.join(namespaces)}}}"]
    for rule in _rules(render(helm_home, "ops", *values)):
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule
        assert not {"secrets", "pods/exec", "serviceaccounts"} & set(rule["resources"]), rule
        if "configmaps" in rule["resources"]:  # the shadow ConfigMap and the decision records: never `get` or `update`
            assert set(rule["verbs"]) == {"list", "watch", "create", "patch", "delete"}, rule
        assert not {"escalate", "bind", "impersonate", "update", "deletecollection"} & set(rule["verbs"]), rule


# ---------------------------------------------------------------- on the test bed


@pytest.fixture(scope="module")
def monitoring_crds(crd: Testbed) -> Testbed:
    """kopf's peering CRDs from the chart, and schema-less stand-ins for prometheus-operator's kinds."""
    crd.kubectl("apply", "--server-side", "-f", str(CHART / "crds"))
    schema = {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}
    stand_ins: list[dict[str, Any]] = [
        {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.monitoring.coreos.com"},
            "spec": {
                "group": "monitoring.coreos.com",
                "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural},
                "versions": [{"name": "v1", "served": True, "storage": True, "schema": schema}],
            },
        }
        for kind, plural in MONITORING_KINDS.items()
    ]
    crd.apply_objects(stand_ins)
    names = [f"crd/{d['metadata']['name']}" for d in stand_ins] + ["crd/clusterkopfpeerings.kopf.dev"]
    crd.kubectl("wait", "--for=condition=Established", *names, "--timeout=60s")
    eventually(lambda: crd.kubectl("get", "servicemonitors", "-A", check=False).returncode == 0, 30, "served")
    return crd


def _restricted_namespace(bed: Testbed, name: str) -> str:
    bed.apply_objects([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": RESTRICTED}}])
    return name


@pytest.fixture
def namespaces(testbed: Testbed, request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Three fresh restricted namespaces: the release's, and two for models; deleted afterwards."""
    base = f"c{os.getpid()}-{abs(hash(request.node.nodeid)) % 10**6}"
    names = [_restricted_namespace(testbed, f"{base}-{suffix}") for suffix in ("ops", "m1", "m2")]
    yield names
    testbed.kubectl("delete", "namespace", *names, "--wait=false", check=False)


def _dry_run(bed: Testbed, objects: list[dict[str, Any]]) -> None:
    done = bed.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(objects), check=False)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr


@pytest.mark.testbed
@pytest.mark.parametrize("cluster_wide", [True, False], ids=["cluster-wide", "namespaced"])
def test_every_rendered_object_passes_server_side_validation(
    monitoring_crds: Testbed, helm_home: Path, namespaces: list[str], cluster_wide: bool
) -> None:
    ops, *models = namespaces
    watch = [] if cluster_wide else ["--set", f"watchNamespaces={{{','.join(models)}}}"]
    objects = render(helm_home, ops, *EVERY_OPTION, *watch, release=ops)
    assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "NetworkPolicy", "ConfigMap"} <= {
        o["kind"] for o in objects
    }
    assert ("ClusterKopfPeering" in {o["kind"] for o in objects}) is cluster_wide
    _dry_run(monitoring_crds, objects)


@pytest.mark.testbed
def test_install_into_a_restricted_namespace_then_uninstall(
    crd: Testbed, helm_home: Path, namespaces: list[str]
) -> None:
    ops = namespaces[0]
    helm(helm_home, "install", ops, str(CHART), "--namespace", ops, "--wait", "--timeout", "90s", bed=crd)
    name = f"{ops}-edgemodel"  # the chart's full name: <release>-edgemodel
    deployment = get(crd, "deployment", name, "-n", ops)
    assert deployment["status"].get("readyReplicas") == 1
    pods = get(crd, "pods", "-n", ops, "-l", "app.kubernetes.io/component=operator")["items"]
    assert [p["status"]["phase"] for p in pods] == ["Running"]
    assert "edgemodel operator" in helm(helm_home, "status", ops, "--namespace", ops, bed=crd).stdout
    helm(helm_home, "uninstall", ops, "--namespace", ops, "--wait", "--timeout", "60s", bed=crd)
    assert crd.kubectl("get", "clusterrole", f"{name}-cluster", check=False).returncode != 0
    assert crd.kubectl("get", "deployment", name, "-n", ops, check=False).returncode != 0
    assert crd.kubectl("get", "crd", "edgemodels.edgeml.dev", check=False).returncode == 0  # Helm keeps CRDs


def _can(bed: Testbed, user: str, verb: str, resource: str, namespace: str | None) -> bool:
    where = ["-n", namespace] if namespace else []
    resource, _, subresource = resource.partition("/")
    if subresource:
        where.append(f"--subresource={subresource}")
    done = bed.kubectl("auth", "can-i", verb, resource, f"--as={user}", *where, check=False)
    assert done.stdout.strip() in {"yes", "no"}, done.stderr
    return done.stdout.strip() == "yes"


NEEDED = [
    *((verb, "nodes", None) for verb in ("list", "watch")),
    *((verb, "customresourcedefinitions.apiextensions.k8s.io", None) for verb in ("list", "watch")),
    *((verb, "edgemodels.edgeml.dev", "M") for verb in ("get", "list", "watch")),
    ("patch", "edgemodels.edgeml.dev/status", "M"),
    *((verb, "jobs.batch", "M") for verb in ("list", "watch", "create", "delete", "patch")),
    *((verb, "pods", "M") for verb in ("list", "watch")),
    *(
        (verb, resource, "M")
        for verb in ("list", "watch", "create", "delete", "patch")
        for resource in ("deployments.apps", "daemonsets.apps")
    ),
    *((verb, "services", "M") for verb in ("list", "watch", "create", "delete", "patch")),
    *((verb, "configmaps", "M") for verb in ("list", "watch", "create", "patch", "delete")),
    ("create", "events", "M"),
]
FORBIDDEN = [
    ("get", "secrets", "M"),
    ("list", "secrets", None),
    ("create", "pods", "M"),
    ("create", "pods/exec", "M"),
    ("patch", "nodes", None),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io", None),
    ("update", "deployments.apps", "M"),
    ("patch", "edgemodels.edgeml.dev", "M"),
    ("delete", "edgemodels.edgeml.dev", "M"),
    ("update", "configmaps", "M"),
    ("get", "configmaps", "kube-system"),
    ("create", "rolebindings.rbac.authorization.k8s.io", "M"),
    ("*", "*", "M"),
    ("create", "deployments.apps", "kube-system"),
]


@pytest.mark.testbed
@pytest.mark.parametrize("cluster_wide", [True, False], ids=["cluster-wide", "namespaced"])
def test_the_service_account_may_do_what_the_operator_does_and_nothing_else(
    crd: Testbed, helm_home: Path, namespaces: list[str], cluster_wide: bool
) -> None:
    ops, model, other = namespaces
    watch = [] if cluster_wide else ["--set", f"watchNamespaces={{{model}}}"]
    helm(helm_home, "install", ops, str(CHART), "--namespace", ops, *watch, bed=crd)
    try:
        user = f"system:serviceaccount:{ops}:{ops}-edgemodel"
        for verb, resource, where in NEEDED:
            assert _can(crd, user, verb, resource, model if where == "M" else where), f"cannot {verb} {resource}"
        for verb, resource, where in FORBIDDEN:
            namespace = model if where == "M" else where
            expected = cluster_wide and (verb, resource, where) == ("create", "deployments.apps", "kube-system")
            assert _can(crd, user, verb, resource, namespace) is expected, f"{verb} {resource} in {namespace}"
        # Namespaced: nothing outside the watched namespace, but the namespaces themselves can be followed.
        assert _can(crd, user, "create", "jobs.batch", other) is cluster_wide
        assert _can(crd, user, "watch", "namespaces", None) is not cluster_wide
    finally:
        helm(helm_home, "uninstall", ops, "--namespace", ops, "--wait", bed=crd)


@pytest.mark.testbed
def test_a_restricted_namespace_admits_every_object_the_operator_and_the_chart_create(
    crd: Testbed, helm_home: Path, namespaces: list[str]
) -> None:
    ops, model, _ = namespaces
    nodes = get(crd, "nodes")["items"]
    fleet = yaml.safe_load((ROOT / "examples" / "ocr-recognizer-fleet.yaml").read_text())
    body = {**fleet, "metadata": {**fleet["metadata"], "namespace": model, "uid": "u-1", "generation": 1}}
    step = states.after_builds(body, nodes)
    kinds = [o["kind"] for o in step.created]
    assert kinds.count("Job") == kinds.count("Deployment") >= 4
    _dry_run(crd, step.created)
    operator = [o for o in render(helm_home, ops, "--set", f"watchNamespaces={{{model}}}") if o["kind"] == "Deployment"]
    _dry_run(crd, operator)


def _token_kubeconfig(bed: Testbed, namespace: str, account: str, path: Path) -> Path:
    token = bed.kubectl("create", "token", account, "-n", namespace, "--duration=1h").stdout.strip()
    server = bed.kubectl("config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}").stdout
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "bed", "cluster": {"server": server, "certificate-authority": str(bed.pki.ca_cert)}}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "bed", "user": account}}],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def _edgemodel(bed: Testbed, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = get(bed, "em", name, "-n", namespace)
    return found


@pytest.mark.testbed
def test_the_operator_builds_and_serves_with_only_the_charts_service_account(
    crd: Testbed, helm_home: Path, namespaces: list[str], tmp_path: Path
) -> None:
    ops, model, _ = namespaces
    helm(helm_home, "install", ops, str(CHART), "--namespace", ops, "--set", f"watchNamespaces={{{model}}}", bed=crd)
    kubeconfig = _token_kubeconfig(crd, ops, f"{ops}-edgemodel", tmp_path / "kubeconfig")
    operator = OperatorProcess(
        crd, tmp_path / "operator.log", kubeconfig=kubeconfig, settings={"namespaces": json.dumps([model])}
    )
    operator.start()
    try:
        apply_edgemodel(crd, model, "ocr")

        def running_build_pods() -> list[dict[str, Any]]:
            pods = get(crd, "pods", "-n", model, "-l", "app.kubernetes.io/component=build")["items"]
            return [p for p in pods if p["status"].get("phase") == "Running"]

        eventually(lambda: len(running_build_pods()) == 4, what="4 admitted build pods")
        assert len(get(crd, "jobs", "-n", model)["items"]) == 4
        building = eventually(lambda: (em := _edgemodel(crd, model, "ocr")).get("status") and em, what="a status")
        assert evaluate("kstatus", building)["status"] == "InProgress"
        assert evaluate("argocd-lua", building)["status"] == "Progressing"

        finish_builds(crd, model)
        crd.kubectl("wait", "-n", model, "--for=condition=Ready", "em/ocr", "--timeout=120s", timeout=130)
        ready = _edgemodel(crd, model, "ocr")
        assert evaluate("kstatus", ready)["status"] == "Current"
        assert evaluate("argocd-lua", ready)["status"] == "Healthy"
        serving = get(crd, "pods", "-n", model, "-l", "app.kubernetes.io/component=serve")["items"]
        assert len(serving) == 4
        events = crd.kubectl("get", "events", "-n", model, "--field-selector", "involvedObject.name=ocr").stdout
        assert "BuildStarted" in events
    finally:
        operator.stop()
        helm(helm_home, "uninstall", ops, "--namespace", ops, bed=crd, check=False)
    log = operator.log.read_text()
    for refusal in ("Forbidden", "Not enough permissions", "403"):
        assert refusal not in log, f"the operator was refused something:\n{log[-4000:]}"
