#!/usr/bin/env bash
# Builds the netpol-agent sidecar image without pulling anything and without a Docker daemon: a
# rootfs holding only the agent binary (stripped) and the shared libraries `ldd` lists for it,
# written as one layer of an image archive in `docker save` format (the equivalent of
# `FROM scratch` + COPY, with no Dockerfile and no builder). Docker 20.10 and later load it.
#
#   packaging/sidecar/build.sh [IMAGE...]          write the archive, `docker load -i` it
#   packaging/sidecar/build.sh --tarball FILE [IMAGE...]   only write the archive (no Docker needed;
#                                                  gzip-compressed when FILE ends in .gz)
#
# IMAGE (the image's name; several give it several tags) defaults to netpol-agent:latest. The
# binary is target/release/netpol-agent (built with `cargo build --release` first, honouring
# CARGO_TARGET_DIR), or NETPOL_AGENT_BIN=/path/to/it.
# DOCKER_HOST is honoured. `cargo xtask dist` writes the archive beside the .deb. Run the image
# with packaging/sidecar/docker-compose.yml.
set -euo pipefail

tarball=""
if [ "${1:-}" = --tarball ]; then
    tarball="${2:?--tarball needs a file name}"
    shift 2
fi
# One or more names (tags) for the image.
[ $# -gt 0 ] || set -- netpol-agent:latest
image="$1"
tags=""
for t in "$@"; do
    # An archive's RepoTags need a tag: NAME means NAME:latest, as for docker build.
    case "${t##*/}" in *:*) ;; *) t="$t:latest" ;; esac
    tags="$tags\"$t\","
done
tags="${tags%,}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

bin="${NETPOL_AGENT_BIN:-}"
if [ -z "$bin" ]; then
    (cd "$root" && cargo build --release -p netpol-agent --bin netpol-agent)
    bin="${CARGO_TARGET_DIR:-$root/target}/release/netpol-agent"
fi
[ -x "$bin" ] || { echo "build.sh: $bin is not an executable" >&2; exit 1; }
[ -n "$tarball" ] || command -v docker >/dev/null || { echo "build.sh: docker CLI not found" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
mkdir -p "$rootfs"

copy() { # copy SRC to the same path in the rootfs
    mkdir -p "$rootfs$(dirname "$1")"
    cp -L "$1" "$rootfs$1"
}

install -D -m 0755 "$bin" "$rootfs/usr/bin/netpol-agent"
if command -v strip >/dev/null 2>&1; then
    strip "$rootfs/usr/bin/netpol-agent"
fi
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
version="${version:-unknown}"
case "$(uname -m)" in
    x86_64) arch=amd64 ;;
    aarch64) arch=arm64 ;;
    *) arch="$(uname -m)" ;;
esac

# The archive: manifest.json, the image config (named by its sha256) and one layer.tar, in a
# fixed order with fixed times and owners, so the same binary gives the same archive.
out="$work/image"
mkdir -p "$out/layer"
tar -C "$rootfs" --sort=name --mtime=@0 --numeric-owner --owner=0 --group=0 -cf "$out/layer/layer.tar" .
diff_id="$(sha256sum "$out/layer/layer.tar" | cut -d' ' -f1)"
mv "$out/layer" "$out/$diff_id"
printf '{"architecture":"%s","os":"linux","created":"1970-01-01T00:00:00Z","config":{"Entrypoint":["/usr/bin/netpol-agent"],"Cmd":["run"],"Labels":{"org.opencontainers.image.title":"netpol-agent","org.opencontainers.image.version":"%s"}},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"1970-01-01T00:00:00Z","created_by":"packaging/sidecar/build.sh","comment":"netpol-agent sidecar"}]}' \
    "$arch" "$version" "$diff_id" >"$out/config.json"
config_id="$(sha256sum "$out/config.json" | cut -d' ' -f1)"
mv "$out/config.json" "$out/$config_id.json"
printf '[{"Config":"%s.json","RepoTags":[%s],"Layers":["%s/layer.tar"]}]' \
    "$config_id" "$tags" "$diff_id" >"$out/manifest.json"
# Compressed with gzip (-n: no name or time in the header) when the name ends in .gz; what this
# script loads itself is compressed too, so the format users get is the one the tests load.
archive="${tarball:-$work/image.tar.gz}"
tar -C "$out" --sort=name --mtime=@0 --numeric-owner --owner=0 --group=0 -cf "$out.tar" \
    manifest.json "$config_id.json" "$diff_id"
case "$archive" in
    *.gz) gzip -n -c "$out.tar" >"$archive.tmp" ;;
    *) cp "$out.tar" "$archive.tmp" ;;
esac
mv -f "$archive.tmp" "$archive"

if [ -n "$tarball" ]; then
    echo "wrote $tarball ($*, $(du -h "$tarball" | cut -f1)): docker load -i $tarball"
else
    docker load -i "$archive" >/dev/null
    echo "built $image ($(du -sh "$rootfs" | cut -f1) rootfs)"
fi
