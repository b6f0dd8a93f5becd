#!/usr/bin/env bash
# Debian packages the test bed runs for real, installed only where missing (needs root for apt):
#   docker-registry, prometheus      the OCI registry and the metrics store the tests use
#   containerd, runc, CNI plugins,   the real node's container runtime and pod network
#   iptables, conntrack
#   buildah, debootstrap             the images, built from images/*/Dockerfile without a registry
#   gcc, libc6-dev                   the pause image's static binary (tests/testbed/pause/pause.c)
set -euo pipefail

declare -A wanted=(
  [make]=make [docker-registry]=docker-registry [prometheus]=prometheus
  [containerd]=containerd [runc]=runc [/usr/lib/cni/bridge]=containernetworking-plugins
  [iptables]=iptables [conntrack]=conntrack [buildah]=buildah [debootstrap]=debootstrap [gcc]=gcc
)
missing=()
for command in "${!wanted[@]}"; do
  if [[ $command == /* ]]; then [[ -e $command ]] || missing+=("${wanted[$command]}")
  else command -v "$command" >/dev/null || missing+=("${wanted[$command]}"); fi
done
dpkg-query -W -f='${Status}' libc6-dev 2>/dev/null | grep -q "ok installed" || missing+=(libc6-dev)
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
