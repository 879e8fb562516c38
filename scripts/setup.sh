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

# Docker 28 for the tests: the version they were written against, pinned. The harness
# (tests/src/docker.rs, DOCKER28_*) looks for it in the same directory.
DOCKER28_VERSION=28.5.2
CONTAINERD28_VERSION=2.1.9
DOCKER28_DIR="${NETPOL_DOCKER28_DIR:-/var/cache/netpol/docker-$DOCKER28_VERSION}"
DOCKER28_SUITE="deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main"

# The Debian version of PACKAGE whose upstream version is UPSTREAM (e.g. 28.5.2+dfsg4-5 for
# 28.5.2), from the private lists; empty when the suite has none.
docker28_pick() {
    local apt_opts=("${@:3}")
    apt-cache "${apt_opts[@]}" madison "$1" 2>/dev/null \
        | awk -v up="$2" -F' *[|] *' '{ v = $2; u = v; sub(/^[0-9]+:/, "", u); sub(/[+~-].*/, "", u)
                                       if (u == up) { print v; exit } }'
}

install_docker28() {
    local dir="$DOCKER28_DIR" stamp="$DOCKER28_DIR/VERSIONS"
    if [ -x "$dir/root/usr/sbin/dockerd" ] && [ -f "$stamp" ] \
        && grep -qx "docker $DOCKER28_VERSION" "$stamp" \
        && grep -qx "containerd $CONTAINERD28_VERSION" "$stamp"; then
        return 0
    fi
    is_root || die "installing Docker $DOCKER28_VERSION into $dir needs root (run this script as root or with sudo)"
    [ -r /usr/share/keyrings/debian-archive-keyring.gpg ] \
        || die "Docker $DOCKER28_VERSION: /usr/share/keyrings/debian-archive-keyring.gpg is missing (apt-get install debian-archive-keyring)"
    command -v runc >/dev/null 2>&1 || die "Docker $DOCKER28_VERSION runs with the system's runc, which is not installed"
    log "installing Docker $DOCKER28_VERSION for the tests into $dir (Debian unstable's packages, about 60 MB)"
    local tmp
    tmp="$(mktemp -d "$(dirname "$dir")/.docker28.XXXXXX" 2>/dev/null)" \
        || { mkdir -p "$(dirname "$dir")" && tmp="$(mktemp -d "$(dirname "$dir")/.docker28.XXXXXX")"; } \
        || die "cannot create a directory beside $dir"
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" EXIT
    mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/debs" "$tmp/root"
    printf '%s\n' "$DOCKER28_SUITE" >"$tmp/sources.list"
    local apt_opts=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o Dir::Etc::SourceParts=/dev/null
                    -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache"
                    -o APT::Sandbox::User=root)
    apt-get -q "${apt_opts[@]}" update >"$tmp/update.log" 2>&1 \
        || die "Docker $DOCKER28_VERSION: apt-get update of Debian unstable failed:
$(tail -5 "$tmp/update.log")"
    local docker_v cli_v containerd_v
    docker_v="$(docker28_pick docker.io "$DOCKER28_VERSION" "${apt_opts[@]}")"
    cli_v="$(docker28_pick docker-cli "$DOCKER28_VERSION" "${apt_opts[@]}")"
    containerd_v="$(docker28_pick containerd "$CONTAINERD28_VERSION" "${apt_opts[@]}")"
    if [ -z "$docker_v" ] || [ -z "$cli_v" ] || [ -z "$containerd_v" ]; then
        die "Debian unstable no longer has docker.io/docker-cli $DOCKER28_VERSION and containerd $CONTAINERD28_VERSION (it has: $(apt-cache "${apt_opts[@]}" madison docker.io docker-cli containerd 2>/dev/null | awk -F' *[|] *' '{printf "%s %s; ", $1, $2}'))
The tests are pinned to those versions: test the new ones, then update DOCKER28_VERSION in scripts/setup.sh and tests/src/docker.rs."
    fi
    (cd "$tmp/debs" && apt-get -q "${apt_opts[@]}" download \
        "docker.io=$docker_v" "docker-cli=$cli_v" "containerd=$containerd_v") >"$tmp/download.log" 2>&1 \
        || die "Docker $DOCKER28_VERSION: apt-get download failed:
$(tail -5 "$tmp/download.log")"
    local deb
    for deb in "$tmp"/debs/*.deb; do
        dpkg-deb -x "$deb" "$tmp/root" || die "dpkg-deb -x $deb failed"
    done
    local b
    for b in usr/sbin/dockerd usr/sbin/docker-proxy usr/bin/docker usr/bin/containerd usr/bin/containerd-shim-runc-v2; do
        [ -x "$tmp/root/$b" ] || die "Docker $DOCKER28_VERSION: $b is not in the unpacked packages"
    done
    "$tmp/root/usr/sbin/dockerd" --version | grep -q "version $DOCKER28_VERSION" \
        || die "Docker $DOCKER28_VERSION: the unpacked dockerd does not run here: $("$tmp/root/usr/sbin/dockerd" --version 2>&1 | head -3)"
    printf 'docker %s\ncontainerd %s\n# debs: docker.io=%s docker-cli=%s containerd=%s\n' \
        "$DOCKER28_VERSION" "$CONTAINERD28_VERSION" "$docker_v" "$cli_v" "$containerd_v" >"$tmp/VERSIONS"
    mkdir -p "$tmp/final"
    mv "$tmp/root" "$tmp/VERSIONS" "$tmp/final/"
    rm -rf "$dir"
    mv "$tmp/final" "$dir"
    rm -rf "$tmp"
    trap - EXIT
    log "Docker $DOCKER28_VERSION is in $dir"
}

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
    pkgs+=(lintian)   # cargo xtask dist checks the .deb with it (the package test runs dist)
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

# 3b. cargo-deb, which makes the .deb (cargo xtask dist, scripts/install.sh), pinned.
CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -qw "$CARGO_DEB_VERSION"; then
    log "installing cargo-deb $CARGO_DEB_VERSION (about two minutes)"
    cargo install --locked cargo-deb --version "$CARGO_DEB_VERSION"
fi

# 4. Docker 28 for the end-to-end tests, beside the system's Docker (20.10 on bookworm), which
#    it leaves alone: Debian's unstable packages, fetched through a private sources list and
#    unpacked into a cache directory. The tests run its dockerd with the system's runc.
if ! $build_only; then
    install_docker28
fi

# 4b. promtool, which the metrics test lints the agent's output with (tests/src/metrics.rs looks
#     for it here): Debian's prometheus package, unpacked rather than installed, since
#     installing it would also start a Prometheus server.
PROMTOOL_DIR="${NETPOL_PROMTOOL_DIR:-/var/cache/netpol/prometheus}"
if ! $build_only && ! "$PROMTOOL_DIR/usr/bin/promtool" --version >/dev/null 2>&1; then
    log "unpacking promtool (Debian's prometheus package) into $PROMTOOL_DIR"
    ptmp="$(mktemp -d)"
    pdl() { (cd "$ptmp" && as_root apt-get -q -o APT::Sandbox::User=root download prometheus) >/dev/null 2>&1; }
    pdl || { as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q && pdl; } \
        || die "promtool: apt-get download prometheus failed"
    as_root mkdir -p "$PROMTOOL_DIR"
    as_root dpkg-deb -x "$ptmp"/prometheus_*.deb "$PROMTOOL_DIR" || die "promtool: dpkg-deb -x failed"
    rm -rf "$ptmp"
    "$PROMTOOL_DIR/usr/bin/promtool" --version >/dev/null 2>&1 || die "promtool was unpacked but does not run"
fi

# 5. The BPF filesystem, where the agent pins its maps and links. Shared propagation lets the
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
