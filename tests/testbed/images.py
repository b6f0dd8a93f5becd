"""Build the project's images here, from no registry, as OCI archives that containerd imports.

    python -m tests.testbed.images     # build what is missing, print each image and its archive

- The base: `FROM ${BASE_IMAGE}` in images/operator and images/runtime-cpu names
  `debian:bookworm-slim`. It is made here with `debootstrap --variant=minbase bookworm` from
  Debian's mirror, slimmed as the official slim images are (no docs, man pages or translations, no
  apt lists), and stored in buildah's storage under that very name, so the Dockerfiles build
  unchanged and nothing is pulled (`--pull=never`).
- The operator and CPU runtime images: `buildah bud` of their Dockerfiles, context the repository
  root, with their `Dockerfile.dockerignore`; apt and PyPI are reached while building. Named
  `localhost/edgemodel/<image>:<key>`.
- The pause image: `tests/testbed/pause/pause.c`, static, in an image of its own made from scratch,
  named `registry.k8s.io/pause:3.10` as kubelet expects its sandbox image.

For the arm64 node (`ensure_images(arch="arm64")`): the same base made with `debootstrap
--arch=arm64` (its packages' scripts run under qemu-user-static through binfmt_misc), a manifest
list naming both bases (`localhost/edgemodel/debian-bookworm-slim:<key>`) passed as the Dockerfiles'
`BASE_IMAGE`, so that `buildah bud --platform linux/arm64` builds the same Dockerfiles unchanged (the
`--platform=$BUILDPLATFORM` wheel stage on the amd64 base, reusing the amd64 build's layers; the rest
on the arm64 base, emulated), and the pause image cross-compiled with `aarch64-linux-gnu-gcc`
(Debian `gcc-aarch64-linux-gnu`, `libc6-dev-arm64-cross`). Their archives carry the names the amd64
ones do, as a multi-arch tag does: each node imports the archives of its own architecture.

Each image is keyed by everything it is built from (Dockerfile, ignore file, the files its COPY
lines name, the base's recipe); its archive is `$EDGEMODEL_CACHE/images/<image>-<key>.tar`,
written atomically, and a second run that finds every archive returns at once. buildah's storage
(`$EDGEMODEL_CACHE/buildah/storage`) keeps the base and the layers, so after a source change only
the layers from the first changed COPY on are built again. Building needs root, buildah and
debootstrap (Debian packages `buildah`, `debootstrap`; `gcc` and `libc6-dev` for the pause image).
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgemodel_runtime.packaged import cache_root
from tests.testbed.emulation import ARM64, emulation_problem

ROOT = Path(__file__).resolve().parents[2]
PAUSE_SOURCE = Path(__file__).resolve().parent / "pause" / "pause.c"

SUITE = "bookworm"
VARIANT = "minbase"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
# What `FROM debian:bookworm-slim` resolves to; the second name records which recipe made it.
BASE_NAME = "docker.io/library/debian:bookworm-slim"
BASE_RECIPE_NAME = "localhost/edgemodel/base"
PAUSE_NAME = "registry.k8s.io/pause:3.10"
PAUSE_CFLAGS = ("-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror")
DOCKERFILES = {"operator": ROOT / "images" / "operator", "runtime-cpu": ROOT / "images" / "runtime-cpu"}

# As the official slim images are configured (debuerreotype's --slimify and its apt settings): dpkg
# leaves out docs (but copyrights), man pages, info and translations; apt keeps no caches and fetches
# no translations. The sources are those of debian:bookworm-slim, so that images get security updates.
BASE_FILES = {
    "etc/dpkg/dpkg.cfg.d/docker": """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
""",
    "etc/apt/apt.conf.d/docker-clean": """\
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
""",  # noqa: E501 - apt's own syntax, one statement a line
    "etc/apt/apt.conf.d/docker-no-languages": 'Acquire::Languages "none";\n',
    "etc/apt/apt.conf.d/docker-gzip-indexes": 'Acquire::GzipIndexes "true";\n',
    "etc/apt/apt.conf.d/docker-autoremove-suggests": 'Apt::AutoRemove::SuggestsImportant "false";\n',
    "etc/apt/sources.list.d/debian.sources": f"""\
Types: deb
URIs: {MIRROR}
Suites: {SUITE} {SUITE}-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: {SECURITY_MIRROR}
Suites: {SUITE}-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
""",
}
# Removed from the debootstrapped tree (directories keep their subdirectories, not their files).
BASE_REMOVE = (
    "etc/apt/sources.list",  # replaced by debian.sources
    "etc/resolv.conf",  # the build host's; runtimes mount their own
    "usr/share/info",
    "usr/share/linda",
    "usr/share/lintian/overrides",
    "usr/share/locale",
    "usr/share/man",
    "usr/share/groff",
    "var/lib/apt/lists",
    "var/cache/apt",
    "var/cache/ldconfig",
    "var/log",
)
BASE_CONFIG = ("--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "--cmd", '["bash"]')


@dataclass(frozen=True)
class BuiltImage:
    """An image built here: the reference containerd knows it by, its OCI archive, its input key.

    `local` is its name in buildah's storage where that differs from `name` (the arm64 images, whose
    archives carry the amd64 images' names as a multi-arch tag does).
    """

    name: str
    archive: Path
    key: str
    arch: str = "amd64"
    local: str = ""

    @property
    def stored(self) -> str:
        return self.local or self.name


class ImageBuildError(RuntimeError):
    """A step of building an image failed; the message names the step and ends with its output."""


def _digest(*parts: bytes) -> str:
    """sha256 over the parts, each length-prefixed so that no two lists of parts hash alike."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def base_key() -> str:
    """Suite, variant, mirrors and this module's recipe for the base (its files and its code)."""
    recipe = json.dumps(
        {"suite": SUITE, "variant": VARIANT, "mirror": MIRROR, "security": SECURITY_MIRROR, "files": BASE_FILES,
         "remove": BASE_REMOVE, "config": BASE_CONFIG, "name": BASE_NAME,
         "code": [inspect.getsource(f) for f in (_debootstrap, _slim, _tar_rootfs, _import_base)]},
        sort_keys=True,
    )  # fmt: skip
    return _digest(recipe.encode())[:12]


def pause_key() -> str:
    return _digest(PAUSE_SOURCE.read_bytes(), " ".join(PAUSE_CFLAGS).encode(), PAUSE_NAME.encode(),
                   inspect.getsource(_build_pause).encode())[:12]  # fmt: skip


def _copied_sources(dockerfile: Path) -> list[Path]:
    """The build-context paths a Dockerfile's COPY and ADD lines name (not those copied from a stage)."""
    sources: list[Path] = []
    for line in dockerfile.read_text().replace("\\\n", " ").splitlines():
        words = line.split()
        if not words or words[0].upper() not in {"COPY", "ADD"}:
            continue
        arguments = words[1:]
        if any(word.startswith("--from=") for word in arguments):
            continue
        paths = [word for word in arguments if not word.startswith("--")][:-1]
        sources += [ROOT / path for path in paths]
    return sources


def _source_files(path: Path) -> Iterator[Path]:
    """Regular source files under `path`: no bytecode, caches or egg-info."""
    if path.is_file():
        yield path
        return
    for file in sorted(path.rglob("*")):
        parts = file.relative_to(ROOT).parts
        if any(part == "__pycache__" or part.endswith(".egg-info") for part in parts):
            continue
        if file.suffix in {".pyc", ".pyo"} or not file.is_file() or file.is_symlink():
            continue
        yield file


def image_key(image: str) -> str:
    """Dockerfile, its .dockerignore, every file its COPY lines bring in, and the base's key."""
    directory = DOCKERFILES[image]
    dockerfile = directory / "Dockerfile"
    files = [dockerfile, directory / "Dockerfile.dockerignore"]
    sources = _copied_sources(dockerfile)
    if not sources:
        raise ImageBuildError(f"{dockerfile} copies nothing from the build context")
    for source in sources:
        if not source.exists():
            raise ImageBuildError(f"{dockerfile} copies {source.relative_to(ROOT)}, which does not exist")
        files += _source_files(source)
    parts = [base_key().encode()]
    for file in files:
        parts += [str(file.relative_to(ROOT)).encode(), file.read_bytes()]
    return _digest(*parts)[:12]


def _directory() -> Path:
    return cache_root() / "images"


def planned_images(arch: str = "amd64") -> dict[str, BuiltImage]:
    """The images ensure_images makes for `arch`, with their names, keys and archive paths (nothing is built)."""
    if arch == ARM64:
        return _planned_arm64()
    if arch != "amd64":
        raise ImageBuildError(f"no images for {arch!r} here (amd64 or arm64)")
    directory = _directory()
    keys = {"pause": pause_key(), **{image: image_key(image) for image in DOCKERFILES}}
    names = {"pause": PAUSE_NAME, **{image: f"localhost/edgemodel/{image}:{keys[image]}" for image in DOCKERFILES}}
    return {image: BuiltImage(names[image], directory / f"{image}-{keys[image]}.tar", keys[image]) for image in keys}


# ---------------------------------------------------------------------------------------------- buildah


@dataclass(frozen=True)
class Buildah:
    """buildah with this cache's storage: `--root`, `--runroot` and `--storage-driver` on every call."""

    root: Path
    runroot: Path
    driver: str

    @classmethod
    def for_cache(cls, log: Callable[[str], None] = print) -> Buildah:
        """The storage under the cache: overlay, or vfs (slower, larger) where overlay cannot mount here."""
        base = cache_root() / "buildah"
        overlay = cls(base / "storage", _runroot(base / "storage"), "overlay")
        failure = overlay._probe()
        if failure is None:
            return overlay
        log(f"buildah's overlay storage does not work here ({failure}); using vfs in {base / 'storage-vfs'}")
        vfs = cls(base / "storage-vfs", _runroot(base / "storage-vfs"), "vfs")
        failure = vfs._probe()
        if failure is not None:
            raise ImageBuildError(f"buildah cannot use its storage in {base}: {failure}")
        return vfs

    def command(self, *args: str) -> list[str]:
        return ["buildah", "--root", str(self.root), "--runroot", str(self.runroot),
                "--storage-driver", self.driver, *args]  # fmt: skip

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.command(*args), capture_output=True, text=True, check=False)
        if check and done.returncode != 0:
            raise ImageBuildError(f"buildah {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return done

    def image_id(self, name: str) -> str | None:
        done = self("inspect", "--type", "image", "--format", "{{.FromImageID}}", name, check=False)
        if done.returncode != 0:
            return None
        return done.stdout.strip() or None

    def _probe(self) -> str | None:
        """None if a container of this storage can be created and mounted, else why not."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.runroot.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            return str(error)
        done = self("from", "--quiet", "scratch", check=False)
        if done.returncode != 0:
            return done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        container = done.stdout.strip()
        try:
            mounted = self("mount", container, check=False)
            if mounted.returncode != 0:
                return mounted.stderr.strip() or f"exit {mounted.returncode}"
            return None
        finally:
            self("rm", container, check=False)


def _runroot(storage: Path) -> Path:
    """buildah's state (locks, mounts) for one storage: under /run when writable, else the temp directory."""
    tag = hashlib.sha256(str(storage).encode()).hexdigest()[:12]
    if os.access("/run", os.W_OK):
        return Path("/run") / "edgemodel-buildah" / tag
    return Path(tempfile.gettempdir()) / f"edgemodel-buildah-{os.getuid()}-{tag}"


STEP = re.compile(r"(\[\d+/\d+\] )?STEP \d+/\d+: ")


def _run_logged(command: list[str], logfile: Path, what: str, log: Callable[[str], None]) -> None:
    """Run a long step with its whole output in `logfile`; its `STEP` lines go to `log` as they come."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with logfile.open("w") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        assert process.stdout is not None
        for line in process.stdout:
            out.write(line)
            if STEP.match(line):
                log(f"  {what}: {line.strip()[:150]}")
        returncode = process.wait()
    if returncode != 0:
        tail = "".join(logfile.read_text().splitlines(keepends=True)[-40:])
        raise ImageBuildError(f"{what} failed ({returncode}); whole log in {logfile}:\n{tail}")


# ------------------------------------------------------------------------------------------------ base


def _debootstrap(target: Path, logfile: Path, log: Callable[[str], None]) -> None:
    command = ["debootstrap", f"--variant={VARIANT}", SUITE, str(target), MIRROR]
    _run_logged(command, logfile, "debootstrap", log)


def _slim(rootfs: Path) -> None:
    for relative, text in BASE_FILES.items():
        path = rootfs / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for relative in BASE_REMOVE:
        path = rootfs / relative
        if path.is_dir() and not path.is_symlink():
            # Files only: apt and dpkg expect their directories (e.g. /var/cache/apt/archives/partial).
            for child in path.rglob("*"):
                if child.is_symlink() or not child.is_dir():
                    child.unlink()
        elif path.exists() or path.is_symlink():
            path.unlink()
    # /usr/share/doc: only the copyright files stay, as dpkg's path-include keeps them from now on.
    for path in sorted((rootfs / "usr" / "share" / "doc").rglob("*"), reverse=True):
        if path.is_symlink() or path.is_file():
            if path.name != "copyright":
                path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    for leftover in ("var/cache/debconf/config.dat-old", "var/cache/debconf/templates.dat-old",
                     "var/lib/dpkg/status-old", "var/lib/dpkg/diversions-old"):  # fmt: skip
        (rootfs / leftover).unlink(missing_ok=True)
    (rootfs / "etc" / "hostname").write_text("")
    (rootfs / "etc" / "machine-id").unlink(missing_ok=True)


def _tar_rootfs(rootfs: Path, archive: Path) -> None:
    """The tree as one layer: numeric owners, no device nodes (runtimes provide /dev)."""
    command = ["tar", "--numeric-owner", "--xattrs", "--sort=name", "-C", str(rootfs),
               "--exclude=./dev/*", "--exclude=./proc/*", "--exclude=./sys/*", "-cf", str(archive), "."]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ImageBuildError(f"tar of {rootfs} failed: {done.stderr[-2000:]}")


def _import_base(buildah: Buildah, rootfs_tar: Path, key: str) -> None:
    container = buildah("from", "--quiet", "scratch").stdout.strip()
    try:
        buildah("add", "--quiet", container, str(rootfs_tar), "/")
        buildah("config", *BASE_CONFIG, container)
        buildah("commit", "--quiet", "--rm", container, BASE_NAME)
    except BaseException:
        buildah("rm", container, check=False)
        raise
    buildah("tag", BASE_NAME, f"{BASE_RECIPE_NAME}:{key}")
    for name in buildah("images", "--format", "{{.Name}}:{{.Tag}}").stdout.split():
        if name.startswith(f"{BASE_RECIPE_NAME}:") and name != f"{BASE_RECIPE_NAME}:{key}":
            buildah("rmi", name, check=False)  # an older recipe's base; the layers built on it stay cached


def _ensure_base(buildah: Buildah, log: Callable[[str], None]) -> float:
    """The base in buildah's storage under BASE_NAME, made from its cached rootfs tar or by debootstrap."""
    key = base_key()
    current = buildah.image_id(BASE_NAME)
    if current is not None and current == buildah.image_id(f"{BASE_RECIPE_NAME}:{key}"):
        return 0.0
    started = time.monotonic()
    directory = _directory()
    rootfs_tar = directory / f"debian-{SUITE}-{VARIANT}-{key}.rootfs.tar"
    if not rootfs_tar.exists():
        if os.geteuid() != 0:
            raise ImageBuildError("debootstrap needs root: run as root, or with a cache that holds the base")
        log(f"building base image (debootstrap {SUITE}, {VARIANT}, {MIRROR}) ...")
        with tempfile.TemporaryDirectory(prefix=".base-", dir=directory) as scratch:
            rootfs = Path(scratch) / "rootfs"
            _debootstrap(rootfs, directory / "logs" / f"base-{key}.log", log)
            _slim(rootfs)
            partial = Path(scratch) / "rootfs.tar"
            _tar_rootfs(rootfs, partial)
            partial.rename(rootfs_tar)
        for stale in directory.glob(f"debian-{SUITE}-{VARIANT}-*.rootfs.tar"):
            if stale != rootfs_tar:
                stale.unlink()
    else:
        log(f"importing base image from {rootfs_tar.name} ...")
    _import_base(buildah, rootfs_tar, key)
    seconds = time.monotonic() - started
    log(f"base image {BASE_NAME} ({SUITE}, {rootfs_tar.stat().st_size / 1e6:.0f} MB) ready in {seconds:.0f}s")
    return seconds


# ---------------------------------------------------------------------------------------------- images


def _export(buildah: Buildah, name: str, archive: Path, local: str = "") -> None:
    """`buildah push` to an OCI archive whose index names the image (`org.opencontainers.image.ref.name`,
    which `ctr images import` takes as the image's name); written beside `archive`, then renamed.
    `local`: the image's name in buildah's storage, where it is not `name`."""
    with tempfile.TemporaryDirectory(prefix=".export-", dir=archive.parent) as scratch:
        partial = Path(scratch) / archive.name
        buildah("push", "--quiet", local or name, f"oci-archive:{partial}:{name}")
        partial.rename(archive)


def _build_pause(buildah: Buildah, image: BuiltImage, scratch: Path) -> None:
    binary = scratch / "pause"
    done = subprocess.run(["gcc", *PAUSE_CFLAGS, "-o", str(binary), str(PAUSE_SOURCE)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise ImageBuildError(f"gcc {PAUSE_SOURCE.name} failed (needs gcc and libc6-dev):\n{done.stderr[-2000:]}")
    binary.chmod(0o755)
    container = buildah("from", "--quiet", "scratch").stdout.strip()
    try:
        buildah("copy", "--quiet", container, str(binary), "/pause")
        buildah("config", "--entrypoint", '["/pause"]', "--user", "65535:65535", "--workingdir", "/",
                "--label", f"dev.edgemodel.testbed.key={image.key}", container)  # fmt: skip
        buildah("commit", "--quiet", "--rm", container, image.name)
    except BaseException:
        buildah("rm", container, check=False)
        raise


LOCAL_CAS = Path("/usr/local/share/ca-certificates")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def _bud_flags(scratch: Path) -> list[str]:
    """`buildah bud` flags that hold for every image built here."""
    flags = ["--isolation", "chroot", "--network", "host", "--layers", "--pull=never", "--format", "oci"]
    # Where this machine trusts a CA of its own (a TLS-inspecting proxy's, added to
    # /usr/local/share/ca-certificates), pip in the build must trust it to reach PyPI, and the image's
    # ca-certificates does not hold it. The bundle is mounted for RUN steps only, over /mnt, which the
    # base already has, so no trace of it stays; /etc/pip.conf, naming it, stays as an empty file (buildah
    # leaves the mount points it creates, as it does /etc/hosts and /etc/resolv.conf).
    if HOST_CA_BUNDLE.is_file() and any(LOCAL_CAS.rglob("*.crt")):
        (scratch / "ca").mkdir()
        shutil.copyfile(HOST_CA_BUNDLE, scratch / "ca" / "ca-certificates.crt")
        pip_conf = scratch / "pip.conf"
        pip_conf.write_text("[global]\ncert = /mnt/ca-certificates.crt\n")
        flags += ["--volume", f"{scratch / 'ca'}:/mnt:ro", "--volume", f"{pip_conf}:/etc/pip.conf:ro"]
    return flags


def _build_dockerfile(
    buildah: Buildah, image: str, built: BuiltImage, scratch: Path, log: Callable[[str], None]
) -> None:
    directory = DOCKERFILES[image]
    platform_flags = [] if built.arch == "amd64" else [
        "--platform", f"linux/{built.arch}", "--build-arg", f"BASE_IMAGE={MULTIARCH_BASE}:{arm64_base_key()}"
    ]  # fmt: skip
    command = buildah.command(
        "bud", *_bud_flags(scratch), *platform_flags, "-f", str(directory / "Dockerfile"),
        "--ignorefile", str(directory / "Dockerfile.dockerignore"), "-t", built.stored, str(ROOT),
    )  # fmt: skip
    label = _label(image, built)
    _run_logged(command, _directory() / "logs" / f"{label}-{built.key}.log", label, log)


def _label(image: str, built: BuiltImage) -> str:
    """The image's name in file names and logs: `runtime-cpu`, `runtime-cpu-arm64`."""
    return image if built.arch == "amd64" else f"{image}-{built.arch}"


def _forget_older(buildah: Buildah, image: str, built: BuiltImage) -> None:
    """Older archives and logs of this image, and its older tags in buildah's storage (layers stay cached)."""
    directory = _directory()
    image = _label(image, built)
    for stale in [*directory.glob(f"{image}-*.tar"), *(directory / "logs").glob(f"{image}-*.log")]:
        if built.key not in stale.name and re.fullmatch(rf"{re.escape(image)}-[0-9a-f]{{12}}\.(tar|log)", stale.name):
            stale.unlink()
    repository = built.stored.rsplit(":", 1)[0]
    listed = buildah("images", "--format", "{{.Name}}:{{.Tag}}", check=False).stdout.split()
    for name in listed:
        if name.rsplit(":", 1)[0] == repository and name != built.stored:
            buildah("rmi", name, check=False)


# ----------------------------------------------------------------------------------------------- arm64

MULTIARCH_BASE = "localhost/edgemodel/debian-bookworm-slim"  # a manifest list: the amd64 and arm64 bases
ARM64_BASE = "localhost/edgemodel/base-arm64"
CROSS_CC = "aarch64-linux-gnu-gcc"


def arm64_base_key() -> str:
    """The amd64 base's key (the same recipe) and the arm64 steps' code."""
    code = [inspect.getsource(f) for f in (_debootstrap_arm64, _import_arm64_base)]
    return _digest(base_key().encode(), json.dumps(code).encode())[:12]


def _planned_arm64() -> dict[str, BuiltImage]:
    directory, base = _directory(), arm64_base_key()
    amd64 = planned_images("amd64")
    pause = _digest(pause_key().encode(), CROSS_CC.encode(), inspect.getsource(_build_pause_arm64).encode())[:12]
    keys = {"pause": pause, **{image: _digest(image_key(image).encode(), base.encode())[:12] for image in DOCKERFILES}}
    return {
        image: BuiltImage(
            amd64[image].name,
            directory / f"{image}-{ARM64}-{key}.tar",
            key,
            ARM64,
            f"localhost/edgemodel/{image}-{ARM64}:{key}",
        )
        for image, key in keys.items()
    }


def _debootstrap_arm64(target: Path, logfile: Path, log: Callable[[str], None]) -> None:
    # One stage: debootstrap runs the arm64 packages' scripts itself, through binfmt_misc.
    command = ["debootstrap", f"--arch={ARM64}", f"--variant={VARIANT}", SUITE, str(target), MIRROR]
    _run_logged(command, logfile, "debootstrap arm64", log)


def _import_arm64_base(buildah: Buildah, rootfs_tar: Path, key: str) -> None:
    container = buildah("from", "--quiet", "scratch").stdout.strip()
    try:
        buildah("add", "--quiet", container, str(rootfs_tar), "/")
        buildah("config", *BASE_CONFIG, "--os", "linux", "--arch", ARM64, container)
        buildah("commit", "--quiet", "--rm", container, f"{ARM64_BASE}:{key}")
    except BaseException:
        buildah("rm", container, check=False)
        raise


def _ensure_arm64_base(buildah: Buildah, log: Callable[[str], None]) -> float:
    """The arm64 base (debootstrap --arch=arm64, slimmed as the amd64 one), and the manifest list naming
    both bases that the Dockerfiles' BASE_IMAGE is set to; returns the seconds it took."""
    key = arm64_base_key()
    started = time.monotonic()
    if buildah.image_id(f"{ARM64_BASE}:{key}") is None:
        directory = _directory()
        rootfs_tar = directory / f"debian-{ARM64}-{SUITE}-{VARIANT}-{key}.rootfs.tar"
        if not rootfs_tar.exists():
            log(f"building the arm64 base image (debootstrap --arch={ARM64} {SUITE}, under emulation) ...")
            with tempfile.TemporaryDirectory(prefix=".base-arm64-", dir=directory) as scratch:
                rootfs = Path(scratch) / "rootfs"
                _debootstrap_arm64(rootfs, directory / "logs" / f"base-{ARM64}-{key}.log", log)
                _slim(rootfs)
                partial = Path(scratch) / "rootfs.tar"
                _tar_rootfs(rootfs, partial)
                partial.rename(rootfs_tar)
            for stale in directory.glob(f"debian-{ARM64}-{SUITE}-{VARIANT}-*.rootfs.tar"):
                if stale != rootfs_tar:
                    stale.unlink()
        _import_arm64_base(buildah, rootfs_tar, key)
    # Made afresh each time: it names the amd64 base as it is now.
    manifest = f"{MULTIARCH_BASE}:{key}"
    buildah("manifest", "rm", manifest, check=False)
    buildah("manifest", "create", manifest)
    buildah("manifest", "add", manifest, f"containers-storage:{BASE_NAME}")
    buildah("manifest", "add", manifest, f"containers-storage:{ARM64_BASE}:{key}")
    seconds = time.monotonic() - started
    log(f"arm64 base and manifest list {manifest} ready in {seconds:.0f}s")
    return seconds


def _build_pause_arm64(buildah: Buildah, image: BuiltImage, scratch: Path) -> None:
    binary = scratch / "pause"
    done = subprocess.run([CROSS_CC, *PAUSE_CFLAGS, "-o", str(binary), str(PAUSE_SOURCE)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise ImageBuildError(f"{CROSS_CC} {PAUSE_SOURCE.name} failed:\n{done.stderr[-2000:]}")
    binary.chmod(0o755)
    container = buildah("from", "--quiet", "scratch").stdout.strip()
    try:
        buildah("copy", "--quiet", container, str(binary), "/pause")
        buildah("config", "--entrypoint", '["/pause"]', "--user", "65535:65535", "--workingdir", "/",
                "--os", "linux", "--arch", ARM64, "--label", f"dev.edgemodel.testbed.key={image.key}",
                container)  # fmt: skip
        buildah("commit", "--quiet", "--rm", container, image.stored)
    except BaseException:
        buildah("rm", container, check=False)
        raise


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _missing_tools(arch: str = "amd64") -> list[str]:
    tools = ("buildah", "debootstrap", "gcc", "tar") + ((CROSS_CC,) if arch == ARM64 else ())
    return [tool for tool in tools if shutil.which(tool) is None]


def _build_one(buildah: Buildah, name: str, image: BuiltImage, log: Callable[[str], None]) -> None:
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=_directory()) as scratch:
        if name == "pause" and image.arch == ARM64:
            _build_pause_arm64(buildah, image, Path(scratch))
        elif name == "pause":
            _build_pause(buildah, image, Path(scratch))
        else:
            _build_dockerfile(buildah, name, image, Path(scratch), log)
        _export(buildah, image.name, image.archive, image.local)


def ensure_images(
    log: Callable[[str], None] = print,
    *,
    timings: dict[str, float] | None = None,
    arch: str = "amd64",
    only: Collection[str] | None = None,
) -> dict[str, BuiltImage]:
    """The pause, operator and runtime-cpu images for `arch` (amd64, arm64) as OCI archives, built if
    their archives are missing (`only`: just these of them).

    `timings`, if given, receives the seconds each built image took ("base" too when it was made).
    """
    planned = {name: image for name, image in planned_images(arch).items() if only is None or name in only}
    if all(image.archive.exists() for image in planned.values()):
        return planned
    if arch == ARM64 and (problem := emulation_problem()):
        raise ImageBuildError(f"arm64 images are built under emulation: {problem}")
    if missing := _missing_tools(arch):
        raise ImageBuildError(f"building images needs {', '.join(missing)} (Debian: apt-get install buildah "
                              "debootstrap gcc libc6-dev; for arm64 also gcc-aarch64-linux-gnu "
                              "libc6-dev-arm64-cross qemu-user-static binfmt-support)")  # fmt: skip
    directory = _directory()
    if ":" in str(directory):
        raise ImageBuildError(f"{directory}: an oci-archive path cannot hold ':'")
    with _locked(directory / ".lock"):
        todo = {name: image for name, image in planned.items() if not image.archive.exists()}
        if not todo:  # another process built them while this one waited
            return planned
        buildah = Buildah.for_cache(log)
        if set(todo) & set(DOCKERFILES):
            seconds = _ensure_base(buildah, log)
            if timings is not None and seconds:
                timings["base"] = seconds
            if arch == ARM64:
                seconds = _ensure_arm64_base(buildah, log)
                if timings is not None and seconds:
                    timings["base-arm64"] = seconds
        for name, image in todo.items():
            started = time.monotonic()
            log(f"building {name} image {image.name} for {arch} ...")
            _build_one(buildah, name, image, log)
            _forget_older(buildah, name, image)
            seconds = time.monotonic() - started
            if timings is not None:
                timings[name] = seconds
            log(f"built {name} in {seconds:.0f}s: {image.archive} ({image.archive.stat().st_size / 1e6:.1f} MB)")
    return planned


def run_in_image(image: BuiltImage, *command: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `command` in a new container of a built image, as the image's user (`buildah run`, chroot
    isolation); the image is taken from its archive if buildah's storage lacks it."""
    buildah = Buildah.for_cache(lambda _: None)
    if buildah.image_id(image.name) is None:
        buildah("pull", "--quiet", f"oci-archive:{image.archive}")
    container = buildah("from", "--quiet", "--pull=never", image.name).stdout.strip()
    try:
        return subprocess.run(
            buildah.command("run", "--isolation", "chroot", container, "--", *command),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    finally:
        buildah("rm", container, check=False)


def main(argv: list[str] | None = None) -> int:
    arch = (argv if argv is not None else sys.argv[1:]) or ["amd64"]
    if arch[0] not in {"amd64", ARM64} or arch[1:] not in ([], ["--if-emulated"]):
        print("usage: python -m tests.testbed.images [amd64|arm64 [--if-emulated]]", file=sys.stderr)
        return 2
    if arch[1:] == ["--if-emulated"] and (problem := emulation_problem()) is not None:
        print(f"[images] no arm64 images: arm64 programs do not run here: {problem}", file=sys.stderr)
        return 0
    started = time.monotonic()
    timings: dict[str, float] = {}
    try:
        built = ensure_images(lambda line: print(f"[images] {line}", file=sys.stderr, flush=True), timings=timings,
                              arch=arch[0])  # fmt: skip
    except ImageBuildError as error:
        print(f"[images] {error}", file=sys.stderr)
        return 1
    for base in ("base", "base-arm64"):
        if base in timings:
            print(f"{base:12} {BASE_NAME:48} {timings[base]:6.1f}s")
    for name, image in built.items():
        size = image.archive.stat().st_size / 1e6
        print(f"{name:12} {image.name:48} {timings.get(name, 0.0):6.1f}s  {image.archive} ({size:.1f} MB)")
    print(f"images ready in {time.monotonic() - started:.1f}s ({arch[0]}, built on {platform.machine()}; 0.0s: cached)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
