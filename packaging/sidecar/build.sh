#!/usr/bin/env bash
# Builds the netpol-agent sidecar image without pulling anything: a rootfs holding only the
# agent binary and the shared libraries `ldd` lists for it, imported with `docker import`
# (the equivalent of `FROM scratch` + COPY, with no Dockerfile and no builder).
#
#   packaging/sidecar/build.sh [IMAGE]        default IMAGE: netpol-agent:latest
#
# The binary is target/release/netpol-agent (built with `cargo build --release` first, honouring
# CARGO_TARGET_DIR), or NETPOL_AGENT_BIN=/path/to/netpol-agent. DOCKER_HOST is honoured.
# Run it with packaging/sidecar/docker-compose.yml.
set -euo pipefail

image="${1:-netpol-agent:latest}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

bin="${NETPOL_AGENT_BIN:-}"
if [ -z "$bin" ]; then
    (cd "$root" && cargo build --release -p netpol-agent --bin netpol-agent)
    bin="${CARGO_TARGET_DIR:-$root/target}/release/netpol-agent"
fi
[ -x "$bin" ] || { echo "build.sh: $bin is not an executable" >&2; exit 1; }
command -v docker >/dev/null || { echo "build.sh: docker CLI not found" >&2; exit 1; }

rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT

copy() { # copy SRC to the same path in the rootfs
    mkdir -p "$rootfs$(dirname "$1")"
    cp -L "$1" "$rootfs$1"
}

install -D -m 0755 "$bin" "$rootfs/usr/bin/netpol-agent"
# "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)";
# a static binary prints "not a dynamic executable" (or "statically linked") and needs none.
if ldd "$bin" >/dev/null 2>&1; then
    ldd "$bin" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) { print $i; break } }' |
        while read -r lib; do copy "$lib"; done
fi
# Mount points the agent uses (bind mounts create them anyway; bpffs needs /sys/fs/bpf, which
# the container's sysfs provides) and a /tmp.
mkdir -p "$rootfs/run/netpol" "$rootfs/var/lib/netpol" "$rootfs/etc/netpol/policies.d" "$rootfs/tmp"
chmod 1777 "$rootfs/tmp"

version="$("$bin" --version 2>/dev/null | awk '{print $2}')"
tar -C "$rootfs" --numeric-owner --owner=0 --group=0 -c . |
    docker import \
        -c 'ENTRYPOINT ["/usr/bin/netpol-agent"]' \
        -c 'CMD ["run"]' \
        -c "LABEL org.opencontainers.image.title=netpol-agent org.opencontainers.image.version=${version:-unknown}" \
        -m "netpol-agent sidecar (packaging/sidecar/build.sh)" \
        - "$image" >/dev/null
echo "built $image ($(du -sh "$rootfs" | cut -f1) rootfs)"
