#!/usr/bin/env bash
# The README test command: installs what is missing (scripts/setup.sh), then runs every test tier
# and ends with one line, "N passed, N failed", summed over all test binaries.
#
#   sudo scripts/test.sh            all tiers
#   sudo scripts/test.sh FILTER     only tests whose name contains FILTER (passed to libtest)
#
# Tiers: 1 unit tests (no privileges); 2 BPF program tests (BPF_PROG_TEST_RUN); 3 network-namespace
# tests; 4 end-to-end tests against a private dockerd (tests/tests/*.rs). Tiers 2-4 need root and
# skip without it, except under CI=true, where a skipped tier fails.
#
# Unit and doc tests run in parallel; integration tests (tests/tests/*.rs and any crate's tests/)
# run one at a time in each binary (NETPOL_TEST_THREADS, default 1), since they share the host's
# namespaces, bpffs and dockerd. When stdin is not a terminal the run is bounded by
# NETPOL_TEST_TIMEOUT seconds (default 1680). NETPOL_TEST_STOP_DOCKER=1 stops the host's own Docker
# service for the run (with systemd) and starts it again afterwards.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"
cd "$root"

filter=()
[ $# -gt 0 ] && filter=("$@")

"$here/setup.sh"
ensure_cargo
# Builds go to the workspace's own target/ (CARGO_TARGET_DIR from the environment is ignored).
unset CARGO_TARGET_DIR

ci=false
case "${CI:-}" in true|1) ci=true ;; esac
if ! is_root; then
    $ci && die "CI=true: the privileged test tiers need root (run as root or with sudo)"
    warn "not root: the program, namespace and Docker tests will skip; run 'sudo scripts/test.sh'"
fi

# The Docker tests start their own dockerd, which must not share the host with another one.
restart_docker=false
foreign_dockerd() {
    local p cmd
    for p in /proc/[0-9]*; do
        [ "$(cat "$p/comm" 2>/dev/null)" = dockerd ] || continue
        cmd="$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null || true)"
        case "$cmd" in
            *"/run/netpol-tests/"*) continue ;;   # a harness leftover: the harness reaps it
            *"--iptables=false"*) continue ;;     # leaves iptables alone: can share the host
        esac
        printf 'pid %s: %s\n' "${p#/proc/}" "$cmd"
        return 0
    done
    return 1
}
if is_root && other="$(foreign_dockerd)"; then
    if [ "${NETPOL_TEST_STOP_DOCKER:-}" = 1 ] && [ -d /run/systemd/system ]; then
        log "stopping the host's Docker service for the test run"
        systemctl stop docker.socket docker.service
        restart_docker=true
    else
        die "a dockerd is running ($other).
The Docker end-to-end tests start a private dockerd, which would rewrite that one's iptables
chains and bridges. Stop it first (systemctl stop docker.socket docker), or run with
NETPOL_TEST_STOP_DOCKER=1 to have this script stop it and start it again afterwards."
    fi
fi

out="$(mktemp -t netpol-test.XXXXXX)"
finish() {
    rm -f "$out"
    if $restart_docker; then
        log "starting the host's Docker service again"
        systemctl start docker.socket docker.service || warn "could not start docker again"
    fi
}
trap finish EXIT

deadline=$(( $(date +%s) + ${NETPOL_TEST_TIMEOUT:-1680} ))
# Runs one cargo invocation, its output shown and kept for the summary; returns its status.
run_cargo() {
    local status=0 left
    log "cargo $*"
    if [ -t 0 ]; then
        cargo "$@" 2>&1 | tee -a "$out" || status=$?
    else
        left=$(( deadline - $(date +%s) ))
        [ "$left" -gt 0 ] || { echo "error: NETPOL_TEST_TIMEOUT reached" | tee -a "$out"; return 124; }
        timeout --kill-after=30 "$left" cargo "$@" 2>&1 | tee -a "$out" || status=$?
        [ "$status" -ne 124 ] || echo "error: NETPOL_TEST_TIMEOUT reached: tests stopped" | tee -a "$out"
    fi
    return "$status"
}

pkgs=(--workspace --exclude netpol-ebpf)   # netpol-ebpf is built for the BPF target by build.rs
# netpol-agent/build.rs appends a line here each time it actually compiles the eBPF programs.
bpf_log=target/bpf/compiles.log
# Lines in that log; 0 while it does not exist (a fresh clone: no bare `cat | wc` under pipefail).
bpf_log_lines() { if [ -f "$bpf_log" ]; then wc -l <"$bpf_log"; else echo 0; fi; }
bpf_compiles_before=$(bpf_log_lines)
start=$(date +%s)
failed_steps=()
run_cargo test "${pkgs[@]}" --no-fail-fast --lib --bins -- "${filter[@]}" \
    || failed_steps+=("unit tests")
run_cargo test "${pkgs[@]}" --no-fail-fast --doc -- "${filter[@]}" \
    || failed_steps+=("doc tests")
run_cargo test "${pkgs[@]}" --no-fail-fast --test '*' -- \
    --test-threads="${NETPOL_TEST_THREADS:-1}" "${filter[@]}" \
    || failed_steps+=("integration tests")

# The summary and the checks below read the output once without colour codes.
sed -i 's/\x1b\[[0-9;]*m//g' "$out"

# Sums libtest's "test result:" lines. A test binary that crashed (a signal, an abort) prints
# none: cargo's "error: test failed" lines without a matching "test result: FAILED" count as one
# failure each.
read -r passed failed < <(awk '
    /^test result:/ {
        for (i = 2; i <= NF; i++) {
            if ($i ~ /^passed;?$/) p += $(i - 1)
            if ($i ~ /^failed;?$/) f += $(i - 1)
        }
        if ($3 == "FAILED.") r++
    }
    /^error: test failed, to rerun pass/ { e++ }
    END { if (e > r) f += e - r; print p + 0, f + 0 }' "$out")

# A quiet, single build: the eBPF programs are compiled at most once in a run (one shared target
# dir for every feature set and profile of netpol-agent), and the build script forwards only
# compiler diagnostics as warnings, never the nested cargo's progress lines.
bpf_compiles=$(( $(bpf_log_lines) - bpf_compiles_before ))
if [ "$bpf_compiles" -gt 1 ]; then
    echo "error: the eBPF programs were compiled $bpf_compiles times in this run (once expected):"
    tail -n "$bpf_compiles" "$bpf_log"
    failed_steps+=("single eBPF build")
fi
noise=$(grep -cE '^warning: netpol-agent@[^:]*: +(Compiling|Finished|Fresh|Blocking|Updating|Downloading|Downloaded|Locking|Adding) ' "$out" || true)
if [ "$noise" -gt 0 ]; then
    echo "error: the build forwarded $noise progress lines of the eBPF build as warnings"
    failed_steps+=("quiet build")
fi

echo
echo "test run took $(( $(date +%s) - start )) s"
echo "eBPF programs compiled $bpf_compiles time(s) in this run"
if [ "${#failed_steps[@]}" -gt 0 ]; then
    echo "FAILED: ${failed_steps[*]} (cargo's errors are above; a build error runs no tests)"
fi
echo "$passed passed, $failed failed"
[ "${#failed_steps[@]}" -eq 0 ] && [ "$failed" -eq 0 ]
