# Shared helpers of the netpol scripts. Source it; do not run it.
# shellcheck shell=bash

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# Runs a command as root: directly when we are root, through sudo otherwise.
as_root() {
    if is_root; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "'$*' needs root, and sudo is not installed: run this script as root"
    fi
}

# Puts cargo and rustup on PATH. Under `sudo`, root often has no toolchain of its own while the
# invoking user has one in ~/.cargo: use that one (its CARGO_HOME and RUSTUP_HOME).
ensure_cargo() {
    if command -v cargo >/dev/null 2>&1 && command -v rustup >/dev/null 2>&1; then
        return 0
    fi
    if [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
        export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
        return 0
    fi
    if [ -n "${SUDO_USER:-}" ]; then
        local user_home
        user_home="$(getent passwd "$SUDO_USER" | cut -d: -f6)"
        if [ -n "$user_home" ] && [ -x "$user_home/.cargo/bin/cargo" ]; then
            log "using $SUDO_USER's Rust toolchain in $user_home/.cargo"
            export CARGO_HOME="$user_home/.cargo"
            export RUSTUP_HOME="${RUSTUP_HOME:-$user_home/.rustup}"
            export PATH="$CARGO_HOME/bin:$PATH"
            return 0
        fi
    fi
    die "cargo/rustup not found: install Rust with rustup first (a stable toolchain)"
}

# The LLVM major version rustc was built with; bpf-linker must link against the same one.
rustc_llvm_major() {
    local v
    v="$(rustc +stable -vV | sed -n 's/^LLVM version: \([0-9][0-9]*\).*/\1/p')"
    [ -n "$v" ] || die "cannot read the LLVM version from 'rustc +stable -vV'"
    printf '%s\n' "$v"
}
