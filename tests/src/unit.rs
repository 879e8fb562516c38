//! The systemd unit (`packaging/netpol-agent.service`) read the way systemd reads its sandboxing
//! directives, so tests can run the agent with exactly the privileges the unit leaves it and
//! check that it needs no more: the capability bounding set, and the system calls its
//! `SystemCallFilter=` lines allow (expanded with `systemd-analyze syscall-filter`).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

/// `packaging/netpol-agent.service` of this checkout.
pub fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/netpol-agent.service")
}

/// The values of every `NAME=` line of the unit's `[Service]` section, in order.
pub fn directive(name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(unit_path())
        .unwrap_or_else(|e| panic!("read {}: {e}", unit_path().display()));
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line.to_owned();
        } else if section == "[Service]" {
            if let Some(v) = line.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
                out.push(v.trim().to_owned());
            }
        }
    }
    out
}

/// The unit's `CapabilityBoundingSet=`, as `setpriv` names them (`bpf`, `net_admin`, …).
pub fn capabilities() -> Vec<String> {
    let caps: Vec<String> = directive("CapabilityBoundingSet")
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .map(|c| {
            c.strip_prefix("CAP_")
                .unwrap_or_else(|| panic!("CapabilityBoundingSet: {c} is not a CAP_ name"))
                .to_ascii_lowercase()
        })
        .collect();
    assert!(!caps.is_empty(), "the unit has no CapabilityBoundingSet=");
    caps
}

/// A command prefix that runs a program with only the unit's capabilities and
/// `NoNewPrivileges=` (`setpriv` execs it: same pid).
pub fn setpriv_prefix() -> Vec<String> {
    let bounding = format!(
        "-all,{}",
        capabilities()
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut p = vec![
        "setpriv".to_owned(),
        "--bounding-set".to_owned(),
        bounding,
        "--inh-caps".to_owned(),
        "-all".to_owned(),
    ];
    if directive("NoNewPrivileges").iter().any(|v| v == "yes") {
        p.push("--no-new-privs".to_owned());
    }
    p.push("--".to_owned());
    p
}

/// The system calls of a `systemd-analyze syscall-filter` set (`@system-service`) or one name,
/// groups expanded recursively.
fn expand(set: &str, out: &mut BTreeSet<String>) {
    if !set.starts_with('@') {
        out.insert(set.to_owned());
        return;
    }
    let o = Command::new("systemd-analyze")
        .args(["syscall-filter", set])
        .output()
        .unwrap_or_else(|e| panic!("systemd-analyze syscall-filter {set}: {e}"));
    assert!(
        o.status.success(),
        "systemd-analyze syscall-filter {set}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for line in String::from_utf8_lossy(&o.stdout).lines().skip(1) {
        let item = line.trim();
        if item.is_empty() || item.starts_with('#') {
            continue;
        }
        expand(item, out);
    }
}

/// What the unit's `SystemCallFilter=` lines let through: the first (allow) line's sets, minus
/// those of the `~` lines, plus what systemd always allows (see systemd.exec(5)).
pub fn allowed_syscalls() -> BTreeSet<String> {
    let lines = directive("SystemCallFilter");
    let mut allowed = BTreeSet::new();
    let mut saw_allow = false;
    for l in &lines {
        if let Some(deny) = l.strip_prefix('~') {
            let mut d = BTreeSet::new();
            for s in deny.split_whitespace() {
                expand(s, &mut d);
            }
            allowed.retain(|s| !d.contains(s));
        } else {
            saw_allow = true;
            for s in l.split_whitespace() {
                expand(s, &mut allowed);
            }
        }
    }
    assert!(saw_allow, "the unit has no SystemCallFilter= allow list");
    for s in [
        "execve",
        "exit",
        "exit_group",
        "getrlimit",
        "rt_sigreturn",
        "sigreturn",
    ] {
        allowed.insert(s.to_owned());
    }
    allowed
}

/// The system calls in an `strace -f -o FILE` log made after the first `execve` of a path
/// ending in `program` (what the program itself called, not its wrapper).
pub fn traced_syscalls(log: &str, program: &str) -> BTreeSet<String> {
    let marker = format!("{program}\"");
    let mut started = false;
    let mut out = BTreeSet::new();
    for line in log.lines() {
        // "1234  name(args…) = 0", "1234  <... name resumed>…", "1234  +++ exited …"
        let rest = line
            .trim_start()
            .split_once(char::is_whitespace)
            .map_or(line, |(_, r)| r)
            .trim_start();
        if !started {
            started = rest.starts_with("execve(") && rest.contains(&marker);
            continue;
        }
        if let Some(r) = rest.strip_prefix("<... ") {
            if let Some(name) = r.split_whitespace().next() {
                out.insert(name.to_owned());
            }
            continue;
        }
        let Some((name, _)) = rest.split_once('(') else {
            continue;
        };
        if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(name.to_owned());
        }
    }
    out
}

/// `systemd-analyze security --offline=true` of the unit: its overall exposure (0 safest, 10
/// worst), or `None` when systemd-analyze is not installed.
pub fn exposure() -> Option<f64> {
    let o = match Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit_path())
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("systemd-analyze security: {e}"),
    };
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "systemd-analyze security printed no exposure level:\n{text}{}",
                String::from_utf8_lossy(&o.stderr)
            )
        });
    let score = line
        .rsplit_once(':')
        .and_then(|(_, r)| r.split_whitespace().next())
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no score in {line:?}"));
    Some(score)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strace_log_counts_only_what_the_program_called() {
        let log = "\
100   prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) = 0
100   execve(\"/usr/bin/netpol-agent\", [\"netpol-agent\", \"run\"], 0x7ff /* 3 vars */) = 0
100   bpf(BPF_MAP_CREATE, {map_type=BPF_MAP_TYPE_HASH}, 72) = 3
101   futex(0x7f, FUTEX_WAIT_PRIVATE, 0, NULL <unfinished ...>
100   clone3({flags=CLONE_VM}, 88) = 101
101   <... futex resumed>) = 0
101   --- SIGTERM {si_signo=SIGTERM} ---
101   +++ killed by SIGTERM +++
";
        let seen = traced_syscalls(log, "netpol-agent");
        let want: BTreeSet<String> = ["bpf", "clone3", "futex"].map(String::from).into();
        assert_eq!(seen, want);
    }

    /// The bar: `systemd-analyze security` rates the unit 4 or better ("OK").
    #[test]
    fn systemd_analyze_rates_the_unit_at_most_4() {
        let Some(score) = exposure() else {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(
                !ci,
                "systemd-analyze is not installed (scripts/setup.sh installs it)"
            );
            eprintln!("SKIPPED: systemd-analyze is not installed");
            return;
        };
        assert!(
            score <= 4.0,
            "systemd-analyze security rates {} {score} (> 4)",
            unit_path().display()
        );
    }

    #[test]
    fn unit_keeps_a_small_bounding_set() {
        let caps = capabilities();
        assert!(caps.contains(&"bpf".to_owned()), "{caps:?}");
        assert!(
            !caps.iter().any(|c| c == "sys_module" || c == "sys_rawio"),
            "{caps:?}"
        );
    }
}
