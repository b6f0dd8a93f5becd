"""The node-local engine cache and prefetch, pure: pod specs (restricted Pod Security, the copy init
container, pull policy, digest pinning), the pull DaemonSet, its progress, and the planner's gate."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgemodel_operator.api.spec import EdgeModelSpec
from edgemodel_operator.api.status import EdgeModelStatus
from edgemodel_operator.builders import Images, build_deployment_for_class, build_job_for_class, revision_of
from edgemodel_operator.classes import HardwareClass, discover, engine_for
from edgemodel_operator.enginecache import (
    CACHE_DIR,
    cache_directory,
    copy_init_container,
    engine_image,
    fallback_directory,
)
from edgemodel_operator.fallbacks import Fallback
from edgemodel_operator.prefetch import build_prefetch_daemonset, is_prefetch, prefetch_name, progress
from edgemodel_operator.reconcile import Observed
from edgemodel_runtime.build import engineimage
from edgemodel_runtime.digests import sha256_file
from tests import onnx_models
from tests.unit import test_rollout
from tests.unit.test_fallbacks import T1, FallingBack, _finish_rebuild
from tests.unit.test_operator_pure import DIGEST, NODES, edgemodel

Obj = dict[str, Any]
HEX = "ab" * 32
ARTIFACT = f"oci://10.88.0.1:5000/engines/apps/ocr@sha256:{HEX}"
PARTS = ("sha256:" + "01" * 32, "sha256:" + "02" * 32)  # an engine image's part images (see engineimage)
# What the restricted Pod Security Standard allows (Kubernetes 1.33+: `image` volumes too).
ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                   "projected", "secret", "image"}  # fmt: skip


def restricted_violations(pod: Obj) -> list[str]:
    """What in a pod spec the restricted Pod Security Standard (v1.33) refuses; empty when it passes."""
    problems = [f"spec.{k}" for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            problems.append(f"volume {volume['name']}: {sorted(kinds)}")
    pod_context = pod.get("securityContext") or {}
    for container in [*(pod.get("initContainers") or []), *pod["containers"]]:
        context = container.get("securityContext") or {}
        name = container["name"]
        if context.get("privileged"):
            problems.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if (context.get("capabilities") or {}).get("drop") != ["ALL"]:
            problems.append(f"{name}: capabilities do not drop ALL")
        if set((context.get("capabilities") or {}).get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities")
        if not (context.get("runAsNonRoot") or pod_context.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot unset")
        if (context.get("runAsUser", pod_context.get("runAsUser"))) == 0:
            problems.append(f"{name}: runs as root")
        seccomp = (context.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
        if seccomp not in {"RuntimeDefault", "Localhost"}:
            problems.append(f"{name}: seccompProfile {seccomp}")
        if any(port.get("hostPort") for port in container.get("ports") or []):
            problems.append(f"{name}: hostPort")
    return problems


def _classes() -> list[HardwareClass]:
    return discover(NODES)


def _target(body: Obj, hardware: HardwareClass) -> Any:
    target = engine_for(EdgeModelSpec.model_validate(body["spec"]), hardware)
    assert target is not None
    return target


def _pods(mode: str, images: Images, artifact: str) -> list[tuple[str, Obj]]:
    """Every pod template the operator builds for every class, in serving `mode`."""
    body = edgemodel(serving={"mode": mode})
    spec = EdgeModelSpec.model_validate(body["spec"])
    pods = []
    for hardware in _classes():
        target = _target(body, hardware)
        job = build_job_for_class(body, hardware, target, revision_of(spec), images)
        workload = build_deployment_for_class(body, hardware, target, revision="r1", artifact=artifact, images=images)
        pods += [(f"build {hardware.key}", job["spec"]["template"]["spec"]),
                 (f"serve {hardware.key}", workload["spec"]["template"]["spec"])]  # fmt: skip
        pull = build_prefetch_daemonset(body, hardware, "r1", artifact, PARTS)
        if pull is not None:
            pods.append((f"pull {hardware.key}", pull["spec"]["template"]["spec"]))
    return pods


@pytest.mark.parametrize("mode", ["Deployment", "DaemonSet"])
@pytest.mark.parametrize("node_cache", [True, False])
@pytest.mark.parametrize("artifact", [ARTIFACT, "oci://r/e:tag", "/models/engine"], ids=["digest", "tag", "path"])
def test_every_pod_the_operator_builds_passes_restricted_pod_security(
    mode: str, node_cache: bool, artifact: str
) -> None:
    for what, pod in _pods(mode, Images(node_cache=node_cache), artifact):
        assert restricted_violations(pod) == [], what


def test_the_checker_refuses_what_restricted_refuses() -> None:
    """The checker above is what the first test relies on: it must see each kind of violation."""
    (_, pod), *_ = _pods("Deployment", Images(), ARTIFACT)[1:2]
    changes: list[tuple[Callable[[Obj], object], str]] = [
        (lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/var/cache"}}), "volume h"),
        (lambda p: p.update(hostNetwork=True), "spec.hostNetwork"),
        (lambda p: p["initContainers"][0]["securityContext"].update(allowPrivilegeEscalation=True), "engine:"),
        (lambda p: p["initContainers"][0].update(securityContext={}), "engine: allowPrivilegeEscalation"),
        (lambda p: p["containers"][0]["securityContext"].update(privileged=True), "serve: privileged"),
    ]
    for change, expected in changes:
        broken = copy.deepcopy(pod)
        change(broken)
        assert any(problem.startswith(expected) for problem in restricted_violations(broken)), expected


def test_a_serving_pod_copies_its_engine_from_the_image_pinned_by_the_artifact_digest() -> None:
    body = edgemodel()
    for hardware in _classes():
        workload = build_deployment_for_class(body, hardware, _target(body, hardware), revision="r1", artifact=ARTIFACT,
                                              images=Images())  # fmt: skip
        pod = workload["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        assert init["image"] == f"10.88.0.1:5000/engines/apps/ocr@sha256:{HEX}"
        assert init["imagePullPolicy"] == "IfNotPresent"  # present on the node: no registry asked
        assert init["command"][0] == f"/{engineimage.COPIER}"  # the program the engine image carries
        # The engine's copy, then the fallback model's, where the server looks for each (by digest).
        sha = body["spec"]["model"]["sha256"]
        assert init["command"][-2:] == [f"{CACHE_DIR}/{HEX[:16]}", f"{CACHE_DIR}/fallback-{sha[:16]}"]
        assert init["command"][-1] == fallback_directory(sha)
        assert {"name": "cache", "mountPath": CACHE_DIR} in init["volumeMounts"]
        serve = pod["containers"][0]
        assert serve["args"][:2] == ["serve", ARTIFACT]  # the server still names (and checks) the artifact
        assert {"name": "EDGEMODEL_ARTIFACT_CACHE", "value": CACHE_DIR} in serve["env"]
        assert serve["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert {"name": "cache", "emptyDir": {}} in pod["volumes"]


@pytest.mark.parametrize(
    "artifact", ["oci://r/e:tag", "oci://r/e", "/models/engine", "engine.onnx", f"https://h/e@sha256:{HEX}"]
)
def test_no_copy_without_an_image_pinned_by_digest(artifact: str) -> None:
    assert engine_image(artifact) is None
    assert copy_init_container(artifact, {}) is None
    body = edgemodel()
    cpu = next(c for c in _classes() if not c.has_gpu)
    workload = build_deployment_for_class(body, cpu, _target(body, cpu), revision="r1", artifact=artifact,
                                          images=Images())  # fmt: skip
    assert "initContainers" not in workload["spec"]["template"]["spec"]
    assert build_prefetch_daemonset(body, cpu, "r1", artifact) is None


def test_without_the_node_cache_serving_pods_pull_from_the_registry_as_before() -> None:
    body = edgemodel()
    cpu = next(c for c in _classes() if not c.has_gpu)
    workload = build_deployment_for_class(body, cpu, _target(body, cpu), revision="r1", artifact=ARTIFACT,
                                          images=Images(node_cache=False))  # fmt: skip
    assert "initContainers" not in workload["spec"]["template"]["spec"]


def test_the_fallback_directory_is_where_the_server_looks_for_its_fallback_model(tmp_path: Path) -> None:
    """The operator's fallback copy target and the runtime's lookup agree: a model placed where the init
    container copies it is loaded without fetching (its URI names a file that is not there), and only
    when it matches the digest the pod was given."""
    from edgemodel_runtime.serve.fallback import FallbackSource, load_fallback
    from edgemodel_runtime.serve.model import ArtifactError

    model = onnx_models.tiny_classifier(tmp_path / "m.onnx")
    sha = sha256_file(model)
    local = tmp_path / Path(fallback_directory(sha.upper())).relative_to(CACHE_DIR)
    local.mkdir()
    shutil.copyfile(model, local / "model.onnx")
    source = FallbackSource(str(tmp_path / "elsewhere" / "m.onnx"), sha)  # where it is not
    assert [t.name for t in load_fallback(source, tmp_path, 1).inputs] == ["x"]
    (local / "model.onnx").write_bytes(model.read_bytes()[:-1])  # one byte short: not this model any more
    with pytest.raises(ArtifactError) as refused:
        load_fallback(source, tmp_path, 1)
    assert "elsewhere" in str(refused.value)  # it went to fetch it instead, and could not


def test_the_cache_directory_is_where_the_server_looks_for_the_artifact(tmp_path: Path) -> None:
    """The operator's copy target and the runtime's cache lookup agree: a build directory placed where the
    init container copies it is served without any registry (the reference's host does not exist)."""
    from edgemodel_runtime.serve.model import resolve

    artifact = f"oci://registry.invalid:5000/engines/x@sha256:{HEX}"
    local = tmp_path / Path(cache_directory(artifact)).relative_to(CACHE_DIR)
    local.mkdir()
    (local / "model.onnx").write_bytes(b"not parsed by resolve")
    assert resolve(artifact, tmp_path).path == local / "model.onnx"


@pytest.mark.parametrize("kind", ["cpu", "gpu", "jetson"])
def test_the_pull_daemonset_runs_the_engine_image_on_the_classs_nodes_only(kind: str) -> None:
    body = edgemodel()
    hardware = {
        "cpu": next(c for c in _classes() if not c.has_gpu and c.accelerator == "none"),
        "gpu": next(c for c in _classes() if c.accelerator == "nvidia"),
        "jetson": next(c for c in _classes() if c.accelerator == "nvidia-orin"),
    }[kind]
    serving = build_deployment_for_class(body, hardware, _target(body, hardware), revision="r1", artifact=ARTIFACT,
                                         images=Images())["spec"]["template"]["spec"]  # fmt: skip
    pull = build_prefetch_daemonset(body, hardware, "r1", ARTIFACT)
    assert pull is not None
    assert is_prefetch(pull)
    assert pull["metadata"]["name"] == prefetch_name("ocr", "r1", hardware)
    assert len(pull["metadata"]["name"]) <= 63
    assert pull["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    template = pull["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert pull["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pod = template["spec"]
    assert pod["nodeSelector"] == serving["nodeSelector"]
    assert pod["tolerations"] == serving["tolerations"]  # the GPU taint too, on GPU classes
    (container,) = pod["containers"]
    assert container["image"] == serving["initContainers"][0]["image"]
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])  # it holds an image, not a GPU
    assert restricted_violations(pod) == []


def test_an_engine_with_part_images_is_pulled_part_by_part_before_the_engine_itself() -> None:
    body = edgemodel()
    hardware = _classes()[0]
    pull = build_prefetch_daemonset(body, hardware, "r1", ARTIFACT, PARTS)
    assert pull is not None
    pod = pull["spec"]["template"]["spec"]
    repository = ARTIFACT.removeprefix("oci://").rsplit("@", 1)[0]
    assert [(c["name"], c["image"], c["command"]) for c in pod["initContainers"]] == [
        ("part-1", f"{repository}@{PARTS[0]}", ["/busybox", "true"]),
        ("part-2", f"{repository}@{PARTS[1]}", ["/busybox", "true"]),
    ]  # in order: each part is the one before it plus a layer, so each layer is fetched once
    assert {c["imagePullPolicy"] for c in pod["initContainers"]} == {"IfNotPresent"}
    (container,) = pod["containers"]
    assert container["image"] == ARTIFACT.removeprefix("oci://")
    assert restricted_violations(pod) == []
    # Without parts, or with any part that is not a digest (a record edited by hand), the engine image is pulled
    # whole.
    bad: list[Any] = [(), (PARTS[0], "sha256:short"), (PARTS[0], "latest"), [PARTS[0], 5], [None], "sha256:" + "0" * 64]
    for parts in bad:
        whole = build_prefetch_daemonset(body, hardware, "r1", ARTIFACT, parts)
        assert whole is not None
        assert "initContainers" not in whole["spec"]["template"]["spec"], parts


def test_the_part_images_a_build_reports_reach_the_candidates_pull_daemonset(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster, first, second = _serving_with_prefetch(monkeypatch)
    cluster.parts = PARTS
    cluster.step("2026-11-26T12:01:00Z")
    cluster.finish_builds()
    cluster.step("2026-11-26T12:01:10Z")
    images = [c["image"] for c in _started(cluster, second)["spec"]["template"]["spec"]["initContainers"]]
    assert images == [f"r/e@{part}" for part in PARTS]
    record = json.dumps(cluster.records)
    assert all(part in record for part in PARTS)  # kept with the attempt's build, for every later plan
    assert "initContainers" not in _started(cluster, first)["spec"]["template"]["spec"]  # built without parts
    # Not in the status, whose schema has no such field (the API server would prune it, and every status
    # written would then differ from the one read back).
    status = EdgeModelStatus.model_validate(cluster.body["status"])
    assert "artifactParts" not in json.dumps(status.model_dump(mode="json"))


def _daemonset(desired: int, ready: int, *, observed: int = 1, created: str | None = "2026-11-26T12:00:00Z") -> Obj:
    meta: Obj = {"name": "d", "generation": 1} | ({"creationTimestamp": created} if created else {})
    status = {"desiredNumberScheduled": desired, "numberReady": ready, "observedGeneration": observed}
    return {"metadata": meta, "status": status}


@pytest.mark.parametrize(
    ("daemonset", "now", "done", "says"),
    [
        (_daemonset(2, 2), "2026-11-26T12:00:05Z", True, "engine on all 2 nodes"),
        (_daemonset(2, 1), "2026-11-26T12:00:05Z", False, "1 of 2 have it"),
        (_daemonset(0, 0), "2026-11-26T12:00:05Z", False, "0 of 0"),  # not scheduled yet
        (_daemonset(2, 2, observed=0), "2026-11-26T12:00:05Z", False, "2 of 2"),  # the controller lags
        (_daemonset(2, 1), "2026-11-26T12:10:00Z", True, "1 of 2 nodes after 600 s"),  # a node stays NotReady
        (_daemonset(2, 1, created=None), "2026-11-26T12:10:00Z", False, "1 of 2"),
    ],
    ids=["all", "some", "none scheduled", "stale status", "timed out", "no creation time"],
)
def test_prefetch_progress(daemonset: Obj, now: str, done: bool, says: str) -> None:
    result, message = progress(daemonset, now, 600)
    assert result is done
    assert says in message


class _Cluster(test_rollout.Cluster):
    """test_rollout's cluster, with pull DaemonSets observed as the operator's handlers observe them."""

    def observed(self) -> Observed:
        observed = super().observed()
        split = {"deployments": [d for d in observed.deployments if not is_prefetch(d)],
                 "prefetches": [d for d in observed.deployments if is_prefetch(d)]}  # fmt: skip
        return Observed(**(observed.__dict__ | split))

    def pulls(self) -> dict[str, Obj]:
        return {name: obj for (kind, name), obj in self.objects.items() if kind == "DaemonSet" and is_prefetch(obj)}


def _serving_with_prefetch(monkeypatch: pytest.MonkeyPatch) -> tuple[_Cluster, str, str]:
    """test_rollout's cluster with prefetch on, serving its first revision, and the spec's (second) revision."""
    monkeypatch.setattr(test_rollout, "Images", lambda: Images(prefetch=True))
    monkeypatch.setattr(test_rollout, "Cluster", _Cluster)
    cluster, first = test_rollout._serving_first_revision()
    assert isinstance(cluster, _Cluster)
    return cluster, first, revision_of(EdgeModelSpec.model_validate(cluster.body["spec"]))


def _started(cluster: _Cluster, revision: str) -> Obj:
    (pull,) = [d for name, d in cluster.pulls().items() if revision[:8] in name]
    return pull


def test_a_candidate_starts_only_once_its_engine_is_on_every_node_of_the_class(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster, first, second = _serving_with_prefetch(monkeypatch)
    assert _started(cluster, first)  # the stable revision's engine is kept on the nodes too
    cluster.step("2026-11-26T12:01:00Z")
    cluster.finish_builds()
    built = cluster.step("2026-11-26T12:01:10Z")
    assert cluster.workloads() == {first: "stable"}  # no candidate yet
    pull = _started(cluster, second)
    assert any(e.reason == "EnginePrefetch" for e in built.events)
    assert "pulling the engine" in built.status["classes"][0]["message"]

    pull["metadata"]["creationTimestamp"] = "2026-11-26T12:01:10Z"
    pull["status"] = {"desiredNumberScheduled": 2, "numberReady": 1, "observedGeneration": 1}
    waiting = cluster.step("2026-11-26T12:01:20Z")
    assert cluster.workloads() == {first: "stable"}
    assert "1 of 2 have it" in waiting.status["classes"][0]["message"]

    pull["status"]["numberReady"] = 2
    cluster.step("2026-11-26T12:01:30Z")
    assert cluster.workloads() == {first: "stable", second: "candidate"}

    # Promoted: the old stable revision goes, and its pull DaemonSet after it.
    cluster.pods_ready()
    key = cluster.body["status"]["classes"][0]["key"]
    cluster.evidence = {key: {}}
    cluster.step("2026-11-26T12:01:40Z")
    cluster.evidence = {key: {"pod-1": test_rollout._counters(200, 200, 200)}}
    cluster.step("2026-11-26T12:03:00Z")
    cluster.pods_ready()
    cluster.step("2026-11-26T12:03:10Z")
    cluster.step("2026-11-26T12:03:20Z")
    assert cluster.workloads() == {second: "stable"}
    assert [name for name in cluster.pulls() if first[:8] in name] == []
    assert _started(cluster, second)


def test_a_node_that_never_gets_the_engine_holds_the_candidate_back_only_until_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster, first, second = _serving_with_prefetch(monkeypatch)
    cluster.step("2026-11-26T12:01:00Z")
    cluster.finish_builds()
    cluster.step("2026-11-26T12:01:10Z")
    pull = _started(cluster, second)
    pull["metadata"]["creationTimestamp"] = "2026-11-26T12:01:10Z"
    pull["status"] = {"desiredNumberScheduled": 2, "numberReady": 1, "observedGeneration": 1}
    cluster.step("2026-11-26T12:11:09Z")
    assert cluster.workloads() == {first: "stable"}
    cluster.step("2026-11-26T12:11:10Z")  # 600 s, the default
    assert cluster.workloads() == {first: "stable", second: "candidate"}
    # The progress deadline (10m by default) counts from the candidate workload's creation, not from the
    # build: the time its engine spent being pulled onto the nodes does not roll it back.
    cluster.step("2026-11-26T12:11:20Z")
    assert cluster.workloads() == {first: "stable", second: "candidate"}


def test_engine_image_layers_are_deterministic_and_hold_only_plain_files(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07" * 100)
    (tmp_path / "report.json").write_text("{}")
    files = [tmp_path / "report.json", tmp_path / "model.onnx"]
    first = engineimage.engine_layer(tmp_path / "a.tar", files)
    (tmp_path / "model.onnx").touch()  # a later mtime changes nothing
    assert engineimage.engine_layer(tmp_path / "b.tar", list(reversed(files))) == first
    import tarfile

    with tarfile.open(tmp_path / "a.tar") as tar:
        members = [(m.name, m.isdir(), m.mode, m.uid) for m in tar]
    assert members == [("engine", True, 0o755, 0), ("engine/model.onnx", False, 0o444, 0),
                       ("engine/report.json", False, 0o444, 0)]  # fmt: skip
    config = json.loads(engineimage.image_config("arm64", [first]))
    assert config["architecture"] == "arm64"
    assert config["rootfs"] == {"type": "layers", "diff_ids": [first]}
    assert config["config"]["User"] == "65532:65532"
    with pytest.raises(ValueError, match="same name"):
        engineimage.engine_layer(tmp_path / "c.tar", [tmp_path / "model.onnx", tmp_path / "model.onnx"])


MIB = 1 << 20


@pytest.mark.parametrize(
    ("spec", "ends"),
    [
        ([("copier", MIB), ("fallback", 2 * MIB), ("engine", 10 * MIB)], []),  # 16 MiB at most: pulled whole
        ([("copier", MIB), ("fallback", 15 * MIB), ("engine", 15 * MIB)], [2]),  # no slices, but large layers
        ([("copier", 100), ("fallback", 10), ("fallback-slice", 16 * MIB), ("fallback-slice", 4 * MIB),
          ("engine", 10), ("engine-slice", 16 * MIB), ("engine-slice", MIB - 1)], [3, 4, 6]),
        ([("copier", 100), ("engine", 10), ("engine-slice", 16 * MIB), ("engine-slice", 16 * MIB)], [3]),
        ([("copier", 2 * MIB), ("engine", 10), ("engine-slice", 16 * MIB), ("engine-slice", MIB)], [3]),
    ],
    ids=["whole", "large layers", "small layers join the next part, the last is the image", "one part",
         "not after the copier"],
)  # fmt: skip
def test_part_images_end_after_each_large_layer_but_the_last(
    tmp_path: Path, spec: list[tuple[str, int]], ends: list[int]
) -> None:
    assert engineimage.part_ends(spec) == ends


def test_part_images_are_at_most_max_parts_evenly_spread(tmp_path: Path) -> None:
    count = 3 * engineimage.MAX_PARTS
    ends = engineimage.part_ends([("copier", 10), *[("engine-slice", MIB)] * count])
    assert len(ends) == engineimage.MAX_PARTS
    assert ends == sorted(set(ends))
    assert ends[-1] == count  # the last part ends right before the image's last layer
    assert max(b - a for a, b in itertools.pairwise([1, *ends, count + 1])) <= 3  # evenly: each part 3 at most


@pytest.mark.parametrize(
    ("size", "slices"),
    [(16 * MIB, [16 * MIB]), (16 * MIB + 1, [16 * MIB, 1]), (40 * MIB, [16 * MIB, 16 * MIB, 8 * MIB]),
     (800 * MIB, [100 * MIB] * 8), (800 * MIB + 1, [100 * MIB + 1] * 7 + [100 * MIB - 6])],
    ids=["at the limit: whole", "one byte over", "40 MiB", "800 MiB: 8 slices", "800 MiB and a byte"],
)  # fmt: skip
def test_a_file_is_cut_into_at_most_max_slices_of_at_least_the_slice_size(size: int, slices: list[int]) -> None:
    if size <= engineimage.SLICE_BYTES:
        assert slices == [size]
        return
    step = engineimage.slice_bytes(size)
    assert [min(step, size - offset) for offset in range(0, size, step)] == slices
    assert len(slices) <= engineimage.MAX_SLICES


def test_a_slice_layer_holds_its_bytes_under_slices_with_its_directories(tmp_path: Path) -> None:
    import tarfile

    data = bytes(range(256)) * (17 * MIB // 256 + 1)
    (tmp_path / "model.plan").write_bytes(data)
    layers = engineimage.engine_layers(tmp_path, [tmp_path / "model.plan"])
    assert [layer.kind for layer in layers] == ["engine", "engine-slice", "engine-slice"]
    joined = b""
    for layer in layers[1:]:
        with tarfile.open(layer.path) as tar:
            members = tar.getmembers()
            assert [(m.name, m.isdir(), m.mode) for m in members[:3]] == [
                ("slices", True, 0o755), ("slices/engine", True, 0o755), ("slices/engine/model.plan", True, 0o755)
            ]  # fmt: skip
            (member,) = members[3:]
            assert member.name == f"slices/engine/model.plan/{layers.index(layer) - 1:04d}"
            source = tar.extractfile(member)
            assert source is not None
            joined += source.read()
    assert joined == data
    with tarfile.open(layers[0].path) as tar:
        assert tar.getnames() == ["engine"]  # the large file is not in the directory's layer
    (tmp_path / "again").mkdir()
    again = engineimage.engine_layers(tmp_path / "again", [tmp_path / "model.plan"])
    assert [layer.digest for layer in again] == [layer.digest for layer in layers]


@pytest.mark.parametrize(("machine", "arch"), [("x86_64", "amd64"), ("aarch64", "arm64"), ("AMD64", "amd64")])
def test_engine_images_name_the_architecture_as_oci_does(machine: str, arch: str) -> None:
    assert engineimage.architecture(machine) == arch


def test_a_rolled_back_candidate_takes_its_pull_daemonset_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster, first, second = _serving_with_prefetch(monkeypatch)
    cluster.step("2026-11-26T12:01:00Z")
    cluster.finish_builds()
    cluster.step("2026-11-26T12:01:10Z")
    _started(cluster, second)["status"] = {"desiredNumberScheduled": 2, "numberReady": 2, "observedGeneration": 1}
    cluster.step("2026-11-26T12:01:20Z")
    cluster.pods_ready()
    key = cluster.body["status"]["classes"][0]["key"]
    cluster.evidence = {key: {}}
    cluster.step("2026-11-26T12:01:30Z")
    cluster.evidence = {key: {"pod-1": test_rollout._counters(200, 200, 100)}}  # half agree: rolled back
    cluster.step("2026-11-26T12:03:00Z")
    cluster.step("2026-11-26T12:03:10Z")
    assert cluster.body["status"]["classes"][0]["state"] == "RolledBack"
    assert cluster.workloads() == {first: "stable"}
    assert [name for name in cluster.pulls() if second[:8] in name] == []
    assert _started(cluster, first)  # the stable revision's engine stays on the nodes


def test_a_rebuilt_engine_is_the_one_the_pull_daemonset_keeps_on_the_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fallback's rebuild (see `rebuild`) serves a new artifact under the same revision: the revision's pull
    DaemonSet follows it, or it keeps the engine the pods could not load on every node and leaves the rebuilt
    one to the image garbage collection."""

    @dataclasses.dataclass
    class WithParts(_Cluster):
        parts: tuple[str, ...] = PARTS  # the first engine comes with part images; the rebuilt one without

    class Pulls(_Cluster, FallingBack):
        pass

    monkeypatch.setattr(test_rollout, "Images", lambda: Images(prefetch=True))
    monkeypatch.setattr(test_rollout, "Cluster", WithParts)
    plain, first = test_rollout._serving_first_revision()
    body = plain.body
    body["spec"]["model"]["sha256"] = DIGEST  # no second revision: the first one is rebuilt
    body["metadata"]["generation"] = 1
    cluster = Pulls(body, plain.objects, records=plain.records, versions=plain.versions, nodes=plain.nodes)
    for (kind, name), obj in cluster.objects.items():
        obj["metadata"].setdefault("uid", f"uid-{kind}-{name}")
    pull = _started(cluster, first)
    assert "a" * 64 in pull["spec"]["template"]["spec"]["containers"][0]["image"]
    assert [c["image"] for c in pull["spec"]["template"]["spec"]["initContainers"]] == [f"r/e@{p}" for p in PARTS]
    key = body["status"]["classes"][0]["key"]
    cluster.fallbacks = {key: Fallback((first,), "InvalidModel", ("pod-1",))}
    cluster.step(T1)
    cluster.objects = {k: v for k, v in cluster.objects.items() if k[0] != "Pod"}
    cluster.step(T1)
    _finish_rebuild(cluster, "b" * 64)
    served = cluster.step(T1)
    assert any(e.reason == "ServingRebuilt" for e in served.events)
    cluster.step(T1)
    pull = _started(cluster, first)
    assert "b" * 64 in pull["spec"]["template"]["spec"]["containers"][0]["image"]
    assert "initContainers" not in pull["spec"]["template"]["spec"]  # none of the old engine's parts is left
    assert cluster.step(T1).patch == []  # and then it is left alone


@pytest.mark.parametrize("count", [1, 3, 12, 17, 40])
@pytest.mark.parametrize("size", [800, 8000], ids=["medium files", "large files"])
def test_many_files_make_a_bounded_number_of_layers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int, size: int
) -> None:
    """External data kept one file per tensor can mean hundreds of files. Files up to the slice size are
    grouped into layers of at most that size together (GROUPS layers at most: larger ones when they are
    many); larger files are sliced (larger slices when they are many, and past MAX_SLICED_FILES they are
    grouped whole), so that an image stays within what container runtimes mount. Sizes scaled down: a
    1 KiB slice size."""
    monkeypatch.setattr(engineimage, "SLICE_BYTES", 1024)
    files = []
    for index in range(count):
        path = tmp_path / f"tensor-{index:03d}.bin"
        path.write_bytes(bytes([index]) * size)
        files.append(path)
    (tmp_path / "out").mkdir()
    layers = engineimage.engine_layers(tmp_path / "out", files)
    groups = [layer for layer in layers if layer.kind == "engine"]
    slices = [layer for layer in layers if layer.kind == "engine-slice"]
    assert 1 <= len(groups) <= engineimage.GROUPS + 1
    assert len(slices) <= engineimage.SLICE_LAYERS + min(count, engineimage.MAX_SLICED_FILES)
    if size < 1024 or count > engineimage.MAX_SLICED_FILES:
        assert slices == []
        budget = max(1024, -(-count * size // engineimage.GROUPS))
        for layer in groups:
            with tarfile.open(layer.path) as tar:
                assert sum(m.size for m in tar) <= budget + size, layer  # the budget, and one file more
    else:
        assert len(groups) == 1  # the directory's own layer, empty
        assert len(slices) >= count
    with tarfile.open(groups[0].path) as tar:
        assert tar.getnames()[0] == "engine"
    names = set()
    for layer in layers:
        with tarfile.open(layer.path) as tar:
            names |= {Path(m.name).parts[-1 if layer.kind == "engine" else -2] for m in tar if m.isfile()}
    assert names == {file.name for file in files}  # every file, once whole or in slices
