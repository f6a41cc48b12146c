#!/usr/bin/env bash
# Sets up this host to run swarm-agent from a checkout. Idempotent: installs only what is
# missing (Debian packages, the venv, the compiled probes), so running it again is cheap.
#
#   sudo ./install.sh          # runtime: system packages, .venv, probes
#   sudo ./install.sh --test   # the same plus the test dependencies
#   sudo ./install.sh --mesh   # the same plus what the mesh service needs (nats-server,
#                              # python3-psycopg2 for a PostgreSQL store)
set -euo pipefail
cd "$(dirname "$0")"

with_tests=0
with_mesh=0
for arg in "$@"; do
  case "$arg" in
    --test) with_tests=1 ;;
    --mesh) with_mesh=1 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (it installs Debian packages and builds BPF probes)" >&2
  exit 2
fi

# Runtime: Debian's python3 (its python3-nftables binding is the libnftables JSON API),
# libbpf1, nftables, iproute2. Build: clang/llvm and libbpf headers for the CO-RE probes,
# bpftool to generate vmlinux.h from the kernel's BTF.
packages=(python3 python3-venv python3-nftables nftables libnftables1 libbpf1 iproute2
          python3-yaml python3-grpcio python3-protobuf python3-prometheus-client python3-cryptography
          clang llvm libbpf-dev bpftool make)
# WireGuard peer quarantine: pyroute2 for kernel WireGuard (userspace uses the UAPI socket);
# the tests run two wireguard-go nodes configured with wg.
packages+=(python3-pyroute2)
[ "$with_tests" = 1 ] && packages+=(wireguard-go wireguard-tools)
# Tests only: a real Alertmanager to notify (the tests start it themselves, on loopback).
[ "$with_tests" = 1 ] && packages+=(prometheus-alertmanager)
# Tests only: the packaging tests build the .deb and .rpm (rpmbuild) and install the .deb
# into a fresh debootstrap root.
[ "$with_tests" = 1 ] && packages+=(debootstrap rpm)
# Tests only: certificates for the mutual-TLS tests, sysctl for the lab namespaces.
[ "$with_tests" = 1 ] && packages+=(openssl procps)
# Tests only: the reverse-shell wirings (nc in a mkfifo pipeline, socat EXEC).
[ "$with_tests" = 1 ] && packages+=(netcat-openbsd socat)
# Tests only: real bulk TCP and UDP streams that must never be mitigated.
[ "$with_tests" = 1 ] && packages+=(iperf3)
# Tests only: property-based tests of the config and rules loaders (generated inputs).
[ "$with_tests" = 1 ] && packages+=(python3-hypothesis)
# The mesh service (swarm-mesh): its embedded nats-server, and the PostgreSQL driver.
[ "$with_mesh" = 1 ] && packages+=(nats-server python3-psycopg2)
# Tests only: the fleet tests start a real NATS JetStream server and a throwaway PostgreSQL
# cluster (the mesh service's production store) themselves.
[ "$with_tests" = 1 ] && packages+=(nats-server postgresql python3-psycopg2)
# Tests only: the suite runs on two workers (pytest -n 2): most integration tests wait on
# namespaces, agents and timers, not on a CPU.
[ "$with_tests" = 1 ] && packages+=(python3-pytest-xdist)
# Tests only: a static program making i386 syscalls (int 0x80), and a btrfs loop image
# (stat's device numbers differ from the kernel's there).
[ "$with_tests" = 1 ] && packages+=(gcc libc6-dev btrfs-progs)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The venv sees Debian's site-packages so `import nftables` binds the system libnftables.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import nftables' 2>/dev/null; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
extra=""
[ "$with_tests" = 1 ] && extra="[test]"
stamp=".venv/.installed${extra}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extra}"
  touch "$stamp"
fi

# The lab (swarmlab/: attack generators, namespaces, the demo) stays in the checkout, out
# of the package; the venv finds it through this path file.
purelib=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD" > "$purelib/swarmlab.pth"

make -s -C probes
echo "install.sh: ready. Run (as root): .venv/bin/swarm-agent run --config packaging/config.yaml"
