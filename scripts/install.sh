#!/usr/bin/env bash
# Installs netpol through its Debian package and runs the agent:
#
#   sudo scripts/install.sh                 build the .deb from this checkout, install it
#   sudo scripts/install.sh FILE.deb        install that package (built elsewhere: no toolchain)
#
# Without a FILE, it installs the build dependencies first (scripts/setup.sh --build: rustup's
# stable toolchain with rust-src, LLVM for bpf-linker, cargo-deb) and builds the package with
# `cargo xtask dist --no-image --no-lintian` (incremental: seconds when nothing changed). The
# package holds /usr/sbin/netpol-agent, the netpol-agent systemd service, /etc/netpol/agent.conf
# (settings, kept across upgrades), /etc/netpol/policies.d/ and /var/lib/netpol/.
#
# Where systemd runs, the package enables and (re)starts the service. Where it does not, this
# script starts `netpol-agent run` in the background itself (log: /var/log/netpol-agent.log, pid:
# /run/netpol/agent.pid), replacing the agent it started before. Either way it ends with the agent
# answering. Running it again upgrades in place: the pinned programs keep enforcing while the
# agent restarts.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"

is_root || die "installing a system service needs root: sudo scripts/install.sh"

deb="${1:-}"
if [ -n "$deb" ]; then
    [ -f "$deb" ] || die "$deb: no such file"
    deb="$(cd "$(dirname "$deb")" && pwd)/$(basename "$deb")"
else
    cd "$root"
    "$here/setup.sh" --build
    ensure_cargo
    log "building the netpol-agent package (release build, then cargo-deb)"
    out="${CARGO_TARGET_DIR:-$root/target}/dist"
    rm -f "$out"/netpol-agent_*.deb
    cargo xtask dist --no-image --no-lintian --out "$out"
    deb="$(ls -t "$out"/netpol-agent_*.deb 2>/dev/null | head -n 1)"
    [ -n "$deb" ] || die "cargo xtask dist wrote no package into $out"
fi

# What the former, package-less install left behind: the unit in /etc/systemd/system would hide
# the package's, the binary in /usr/local/bin would come first on PATH.
if [ -f /etc/systemd/system/netpol-agent.service ] && ! dpkg -S /etc/systemd/system/netpol-agent.service >/dev/null 2>&1; then
    log "removing the unit of the former install (/etc/systemd/system/netpol-agent.service)"
    rm -f /etc/systemd/system/netpol-agent.service
    [ -d /run/systemd/system ] && systemctl daemon-reload
fi
if [ -f /usr/local/bin/netpol-agent ]; then
    log "removing the binary of the former install (/usr/local/bin/netpol-agent)"
    rm -f /usr/local/bin/netpol-agent
fi

log "installing $deb"
dpkg -i "$deb"

sock=/run/netpol/agent.sock
answers() { /usr/sbin/netpol-agent status >/dev/null 2>&1; }

if [ -d /run/systemd/system ]; then
    systemctl is-active --quiet netpol-agent.service || systemctl start netpol-agent.service
else
    # No systemd: run the agent ourselves, as the service would.
    pidfile=/run/netpol/agent.pid
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    if [ -n "$pid" ] && readlink "/proc/$pid/exe" 2>/dev/null | grep -q '/netpol-agent'; then
        log "stopping the agent this script started before (pid $pid); its pins keep enforcing"
        kill -TERM "$pid"
        for _ in $(seq 100); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
        [ ! -d "/proc/$pid" ] || die "the agent (pid $pid) did not stop within 10 s"
    elif answers; then
        die "an agent that this script did not start answers on $sock: restart it yourself to run the new version"
    fi
    install -d -m 0700 /run/netpol
    log "starting /usr/sbin/netpol-agent run (systemd is not running here; log: /var/log/netpol-agent.log)"
    setsid /usr/sbin/netpol-agent run </dev/null >>/var/log/netpol-agent.log 2>&1 &
    echo $! >"$pidfile"
fi

for _ in $(seq 300); do
    answers && break
    sleep 0.1
done
if ! answers; then
    if [ -d /run/systemd/system ]; then
        journalctl -u netpol-agent.service -n 30 --no-pager >&2 || true
    else
        tail -n 30 /var/log/netpol-agent.log >&2 || true
    fi
    die "the agent does not answer on $sock within 30 s (its log is above)"
fi
log "netpol-agent $(dpkg-query -W -f='${Version}' netpol-agent) is running: netpol-agent status"
