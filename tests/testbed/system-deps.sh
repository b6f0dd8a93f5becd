#!/usr/bin/env bash
# Debian packages the test bed runs for real, installed only where missing (needs root for apt):
#   docker-registry, prometheus      the OCI registry and the metrics store the tests use
#   containerd, runc, CNI plugins,   the real node's container runtime and pod network
#   iptables, conntrack
#   buildah, debootstrap             the images, built from images/*/Dockerfile without a registry
#   gcc, libc6-dev                   the pause image's static binary (tests/testbed/pause/pause.c)
#   qemu-user-static, binfmt-support the arm64 node and arm64 images, run under emulation through binfmt_misc
#   gcc-aarch64-linux-gnu,           the arm64 pause image, cross-compiled
#   libc6-dev-arm64-cross
set -euo pipefail

declare -A wanted=(
  [make]=make [docker-registry]=docker-registry [prometheus]=prometheus
  [containerd]=containerd [runc]=runc [/usr/lib/cni/bridge]=containernetworking-plugins
  [iptables]=iptables [conntrack]=conntrack [buildah]=buildah [debootstrap]=debootstrap [gcc]=gcc
  [qemu-aarch64-static]=qemu-user-static [update-binfmts]=binfmt-support [aarch64-linux-gnu-gcc]=gcc-aarch64-linux-gnu
)
missing=()
for command in "${!wanted[@]}"; do
  if [[ $command == /* ]]; then [[ -e $command ]] || missing+=("${wanted[$command]}")
  else command -v "$command" >/dev/null || missing+=("${wanted[$command]}"); fi
done
for package in libc6-dev libc6-dev-arm64-cross; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  if ((EUID != 0)); then
    echo "missing Debian packages: ${missing[*]}; as root: apt-get install ${missing[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The tests start their own registries and Prometheus servers; the packaged services must not hold
# :5000 and :9090. (The real node runs a containerd of its own, on its own socket, beside any other.)
for service in docker-registry prometheus; do
  if command -v systemctl >/dev/null && systemctl is-active --quiet "$service" 2>/dev/null; then
    systemctl disable --now "$service"
  fi
done
# arm64 binaries run through binfmt_misc: mounted, and Debian's qemu-aarch64 entry (flags PF) enabled.
if ((EUID == 0)); then
  [[ -e /proc/sys/fs/binfmt_misc/status ]] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  [[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]] || update-binfmts --enable qemu-aarch64
fi
