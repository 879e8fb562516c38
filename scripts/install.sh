#!/usr/bin/env bash
# Builds netpol-agent and installs it as the `netpol-agent` systemd service:
#   sudo scripts/install.sh
#
# Installs the build dependencies first (scripts/setup.sh --build), then
#   /usr/local/bin/netpol-agent
#   /etc/systemd/system/netpol-agent.service   (from packaging/)
#   /etc/netpol/policies.d/                     policy files, read by the agent
#   /var/lib/netpol/                            the agent's state
# and enables and (re)starts the service when systemd runs. Running it again upgrades in place:
# the pinned programs keep enforcing while the agent restarts.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"
cd "$root"

is_root || die "installing a system service needs root: sudo scripts/install.sh"

"$here/setup.sh" --build
ensure_cargo

log "building netpol-agent (release)"
cargo build --release -p netpol-agent
bin="${CARGO_TARGET_DIR:-$root/target}/release/netpol-agent"
[ -x "$bin" ] || die "build finished but $bin is missing"

log "installing /usr/local/bin/netpol-agent and the netpol-agent service"
# Through a temporary name and a rename: a running agent keeps its old binary, never a half copy.
install -D -m 0755 "$bin" /usr/local/bin/.netpol-agent.new
mv -f /usr/local/bin/.netpol-agent.new /usr/local/bin/netpol-agent
install -D -m 0644 packaging/netpol-agent.service /etc/systemd/system/netpol-agent.service
install -d -m 0755 /etc/netpol /etc/netpol/policies.d
install -d -m 0700 /var/lib/netpol

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable netpol-agent.service
    systemctl restart netpol-agent.service
    log "netpol-agent is running: systemctl status netpol-agent; netpol-agent status"
else
    log "installed. systemd is not running here, so start the agent yourself, as root:"
    echo "    /usr/local/bin/netpol-agent run" >&2
fi
