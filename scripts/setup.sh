#!/usr/bin/env bash
# Installs what building and testing netpol needs, checking first: when everything is present it
# changes nothing and takes a few seconds. Safe to run again at any time.
#
#   scripts/setup.sh           build dependencies + test tools + Docker
#   scripts/setup.sh --build   build dependencies only (used by scripts/install.sh)
#
# Needs Debian or Ubuntu, and Rust installed with rustup. Run as root, or as a user with sudo
# (only the apt and mount steps use it).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"

build_only=false
case "${1:-}" in
    "") ;;
    --build) build_only=true ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
esac

ensure_cargo

# 1. The stable toolchain with rust-src: netpol-agent/build.rs compiles the eBPF crate with it
#    (RUSTC_BOOTSTRAP=1 -Z build-std=core), so no nightly toolchain is needed.
if ! rustup run stable rustc --version >/dev/null 2>&1; then
    log "installing the stable Rust toolchain"
    rustup toolchain install stable --profile minimal
fi
sysroot="$(rustup run stable rustc --print sysroot)"
if [ ! -d "$sysroot/lib/rustlib/src/rust/library/core" ]; then
    log "adding rust-src to the stable toolchain"
    rustup component add rust-src --toolchain stable
fi

# 2. Debian packages. bpf-linker links against the LLVM that rustc itself uses.
llvm="$(rustc_llvm_major)"
pkgs=("llvm-$llvm-dev" "libpolly-$llvm-dev" zlib1g-dev libzstd-dev)
if ! $build_only; then
    pkgs+=(bpftool iperf3 sockperf iputils-ping iproute2 nftables iptables wrk netcat-openbsd
           busybox-static jq strace systemd)
    # Docker's own packages (docker-ce) conflict with docker.io: keep whichever is installed.
    command -v dockerd >/dev/null 2>&1 || pkgs+=(docker.io)
    command -v docker-compose >/dev/null 2>&1 || pkgs+=(docker-compose)
fi
command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: this script needs Debian or Ubuntu"
installed="$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${pkgs[@]}" 2>/dev/null || true)"
missing=()
for p in "${pkgs[@]}"; do
    grep -qx "$p installed" <<<"$installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# 3. bpf-linker, built against LLVM $llvm. Without llvm-$llvm's llvm-config first on PATH its build
#    finds an older LLVM and fails with "unable to find library -lLLVM".
if ! bpf-linker --version >/dev/null 2>&1; then
    log "building bpf-linker against LLVM $llvm (about a minute or two)"
    PATH="/usr/lib/llvm-$llvm/bin:$PATH" \
        cargo install bpf-linker --no-default-features --features "llvm-$llvm"
    bpf-linker --version >/dev/null || die "bpf-linker was installed but does not run"
fi

# 4. The BPF filesystem, where the agent pins its maps and links. Shared propagation lets the
#    sidecar container mount it with rshared.
if ! grep -qs '^[^ ]* /sys/fs/bpf bpf ' /proc/mounts; then
    log "mounting bpffs at /sys/fs/bpf"
    as_root mkdir -p /sys/fs/bpf
    as_root mount -t bpf bpf /sys/fs/bpf
fi
if [ "$(findmnt -n -o PROPAGATION /sys/fs/bpf 2>/dev/null || true)" != shared ]; then
    as_root mount --make-shared /sys/fs/bpf
fi

log "setup complete"
