"""Build the test bed's binaries from pinned Go modules, cached outside the clone.

Each component is built once per (version, go.mod/go.sum contents, build flags) into
`$EDGEMODEL_CACHE/bin/<component>-<version>-<hash>/`, atomically, so that a second run finds
it and starts in seconds. Nothing is downloaded but Go modules from the module proxy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgemodel_runtime.packaged import cache_root

GOMOD = Path(__file__).parent / "gomod"

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"


def _kubernetes_ldflags() -> str:
    major, minor, _ = KUBERNETES_VERSION.lstrip("v").split(".")
    variables = {
        "gitVersion": KUBERNETES_VERSION,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
    }
    flags = [f"-X k8s.io/component-base/version.{k}={v}" for k, v in variables.items()]
    flags += [f"-X k8s.io/client-go/pkg/version.{k}={v}" for k, v in variables.items()]
    return " ".join(["-s", "-w", *flags])


@dataclass(frozen=True)
class Component:
    """A set of commands built together from one Go module."""

    name: str
    version: str
    packages: tuple[str, ...]
    module_dir: Path | None = None  # a module under gomod/; None means `go install pkg@version`
    ldflags: str = "-s -w"
    env: dict[str, str] = field(default_factory=dict)
    # Source files of the modules built replaced by files of ours: the module is vendored into a scratch
    # copy of `module_dir` and built from there. Path under vendor/ ("github.com/x/y/pkg/z.go") -> ours.
    overlay: tuple[tuple[str, Path], ...] = ()

    @property
    def commands(self) -> tuple[str, ...]:
        return tuple(package.rsplit("/", 1)[-1].split("@", 1)[0] for package in self.packages)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(f"{self.version}\n{self.packages}\n{self.ldflags}\n{sorted(self.env.items())}".encode())
        if self.module_dir is not None:
            for path in sorted(self.module_dir.iterdir()):
                if path.suffix in {".mod", ".sum", ".go"}:
                    digest.update(path.name.encode() + path.read_bytes())
        for replaced, replacement in self.overlay:
            digest.update(replaced.encode() + replacement.read_bytes())
        return digest.hexdigest()[:12]

    def directory(self) -> Path:
        return cache_root() / "bin" / f"{self.name}-{self.version}-{self.fingerprint()}"


COMPONENTS = (
    Component(
        name="kubernetes",
        version=KUBERNETES_VERSION,
        packages=(
            "k8s.io/kubernetes/cmd/kube-apiserver",
            "k8s.io/kubernetes/cmd/kube-controller-manager",
            "k8s.io/kubernetes/cmd/kube-scheduler",
            "k8s.io/kubernetes/cmd/kubectl",
        ),
        module_dir=GOMOD / "kubernetes",
        ldflags=_kubernetes_ldflags(),
    ),
    Component(name="etcd", version=ETCD_VERSION, packages=("edgemodel.dev/testbed/etcd",), module_dir=GOMOD / "etcd"),
    Component(
        name="kwok",
        version=KWOK_VERSION,
        packages=(f"sigs.k8s.io/kwok/cmd/kwok@{KWOK_VERSION}",),
        ldflags=f"-s -w -X sigs.k8s.io/kwok/pkg/consts.Version={KWOK_VERSION}",
    ),
    # Helm installs the chart (charts/edgemodel); the flags are those of Helm's own Makefile for v3.22.0,
    # whose client-go v0.37 makes the default Kubernetes version for `helm template` and lint 1.37.
    Component(
        name="helm",
        version="v3.22.0",
        packages=("helm.sh/helm/v3/cmd/helm",),
        module_dir=GOMOD / "helm",
        ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=v3.22.0"
        " -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
        " -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=37"
        " -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=37",
    ),
    # kstatus (sigs.k8s.io/cli-utils v0.37.2) and Argo CD's Lua runtime (gopher-lua) read EdgeModel health.
    Component(
        name="gitops-health",
        version="v0.37.2",
        packages=("edgemodel.dev/testbed/gitops-health",),
        module_dir=GOMOD / "kstatus",
    ),
)

# The real node's commands, from the same release as the control plane; built only when a real node starts.
NODE = Component(
    name="kubernetes-node",
    version=KUBERNETES_VERSION,
    packages=("k8s.io/kubernetes/cmd/kubelet", "k8s.io/kubernetes/cmd/kube-proxy"),
    module_dir=GOMOD / "kubernetes-node",
    ldflags=_kubernetes_ldflags(),
)


# The arm64 node's commands: the same kubelet built for arm64, and containerd built for
# arm64, whose CRI plugin then takes linux/arm64 as its own platform. They run under qemu-user-static
# (binfmt_misc); cross-compiled here, with CGO off as for every build.
NODE_ARM64 = Component(
    name="kubernetes-node-arm64",
    version=KUBERNETES_VERSION,
    packages=("k8s.io/kubernetes/cmd/kubelet",),  # no kube-proxy: the amd64 node's routes Services for both
    module_dir=NODE.module_dir,
    ldflags=NODE.ldflags,
    env={"GOOS": "linux", "GOARCH": "arm64"},
)
# Two files replaced (gomod/containerd/overlay), both for running under emulation: the seccomp check asks
# the kernel through prctl, which qemu-user answers itself ("not supported"), so ours also reads the
# kernel's answer from /proc/self/status; and the default seccomp profile (arm64's) also allows the two
# amd64-only calls the emulator, an amd64 program, makes in every container.
CONTAINERD_ARM64 = Component(
    name="containerd-arm64",
    version="v1.7.35",
    packages=("github.com/containerd/containerd/cmd/containerd",),
    module_dir=GOMOD / "containerd",
    ldflags="-s -w -X github.com/containerd/containerd/version.Version=v1.7.35",
    env={"GOOS": "linux", "GOARCH": "arm64"},
    overlay=(
        (
            "github.com/containerd/containerd/pkg/seccomp/seccomp_linux.go",
            GOMOD / "containerd" / "overlay" / "seccomp_linux.go",
        ),
        (
            "github.com/containerd/containerd/contrib/seccomp/seccomp.go",
            GOMOD / "containerd" / "overlay" / "seccomp.go",
        ),
    ),
)


def _log(message: str) -> None:
    print(f"[testbed] {message}", file=sys.stderr, flush=True)


def _build(component: Component, target: Path) -> None:
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod", **component.env}
    flags = ["-trimpath", f"-ldflags={component.ldflags}"]
    if component.module_dir is None:
        command = ["go", "install", *flags, *component.packages]
        env["GOBIN"] = str(target)
        subprocess.run(command, env=env, check=True)
        return
    command = ["go", "build", *flags, "-o", f"{target}/", *component.packages]
    if not component.overlay:
        subprocess.run(command, cwd=component.module_dir, env=env, check=True)
        return
    with tempfile.TemporaryDirectory(prefix=f".{component.name}-src-", dir=target.parent) as scratch:
        module = Path(scratch) / "module"
        shutil.copytree(component.module_dir, module)
        subprocess.run(["go", "mod", "vendor"], cwd=module, env=env, check=True)
        for replaced, replacement in component.overlay:
            shutil.copyfile(replacement, module / "vendor" / replaced)
        subprocess.run(command, cwd=module, env={**env, "GOFLAGS": "-mod=vendor"}, check=True)


def ensure(component: Component) -> Path:
    """The directory holding the component's commands, building them if they are not cached."""
    directory = component.directory()
    if all((directory / command).exists() for command in component.commands):
        return directory
    _log(f"building {component.name} {component.version} with {shutil.which('go')} (cold builds take minutes) ...")
    started = time.monotonic()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{component.name}-", dir=directory.parent))
    try:
        _build(component, staging)
        shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _log(f"built {component.name} in {time.monotonic() - started:.0f}s -> {directory}")
    return directory


def ensure_all() -> dict[str, Path]:
    """Every command the test bed runs, by name, built if needed."""
    paths: dict[str, Path] = {}
    for component in COMPONENTS:
        directory = ensure(component)
        for command in component.commands:
            paths[command] = directory / command
    return paths
