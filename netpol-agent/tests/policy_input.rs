//! Hostile policy input against the real binary (`policy validate`, the same parser the daemon
//! runs): each is an error naming file and line, in under 1 s and 50 MB of peak memory (the
//! process's maximum resident set, from wait4), and the command line refuses what would open
//! access. No privileges needed.

use std::{
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_netpol-agent");

/// A private directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("netpol-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        Self(p)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Run {
    code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
    max_rss_kb: i64,
}

/// Runs the binary and reports its own peak memory (not the test's).
fn run(args: &[&str]) -> Run {
    let dir = TempDir::new("out");
    let (out, err) = (dir.0.join("stdout"), dir.0.join("stderr"));
    let t = Instant::now();
    // Reaped by wait4 below (for its rusage), not by Child::wait.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(BIN)
        .args(args)
        .env("NETPOL_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .expect("spawn netpol-agent");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: plain syscall on our own child; rusage is written by the kernel.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
    let took = t.elapsed();
    let st = std::process::ExitStatus::from_raw(status);
    Run {
        code: st.code(),
        signal: st.signal(),
        stdout: std::fs::read_to_string(out).unwrap_or_default(),
        stderr: std::fs::read_to_string(err).unwrap_or_default(),
        took,
        max_rss_kb: ru.ru_maxrss,
    }
}

fn bomb() -> String {
    // 8 levels of 10 aliases, under 1 KB: 10^8 nodes if expanded.
    let mut s = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..8 {
        let p = i - 1;
        s.push_str(&format!("a{i}: &a{i} ["));
        s.push_str(&vec![format!("*a{p}"); 10].join(", "));
        s.push_str("]\n");
    }
    assert!(s.len() < 1024);
    s
}

/// A 64 MB one-line file, written in pieces (never held in memory).
fn big_file(path: &Path) -> PathBuf {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    f.write_all(b"# ").unwrap();
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..64 {
        f.write_all(&chunk).unwrap();
    }
    f.write_all(b"\n").unwrap();
    path.to_owned()
}

/// This process's peak resident set (VmHWM), in KB.
fn own_peak_kb() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn hostile_files_are_errors_in_bounded_time_and_memory() {
    let dir = TempDir::new("hostile");
    let cases: Vec<(PathBuf, String)> = vec![
        (
            dir.write("bomb.yaml", &bomb()),
            ":5: more than 100000 YAML nodes".into(),
        ),
        (
            dir.write("deep.yaml", &format!("{}x\n", "- ".repeat(100_000))),
            ":1: nested more than 64 levels deep".into(),
        ),
        (
            dir.write(
                "flow.yaml",
                &format!("{}{}\n", "[".repeat(100_000), "]".repeat(100_000)),
            ),
            ":1: nested more than 64 levels deep".into(),
        ),
        (
            big_file(&dir.0.join("big.yaml")),
            ":1: the file is larger than 1048576 bytes".into(),
        ),
    ];
    // ru_maxrss of a child includes the memory of the process it was forked from (the exec
    // records the old address space's peak), so this test keeps its own small: the bound it
    // checks is then an upper bound of the agent's.
    assert!(
        own_peak_kb() < 40 * 1024,
        "the test process itself peaked at {} KB",
        own_peak_kb()
    );
    for (path, want) in &cases {
        let p = path.to_str().expect("utf-8");
        let r = run(&["policy", "validate", p]);
        assert_eq!(r.signal, None, "{p}: killed by signal: {}", r.stderr);
        assert_eq!(r.code, Some(1), "{p}: {}{}", r.stdout, r.stderr);
        assert!(
            r.stderr.starts_with(&format!("{p}{want}")),
            "{p}: want {want}, got {}",
            r.stderr
        );
        assert!(r.took < Duration::from_secs(1), "{p}: took {:?}", r.took);
        assert!(
            r.max_rss_kb < 50 * 1024,
            "{p}: peak RSS {} KB",
            r.max_rss_kb
        );
        eprintln!(
            "{}: {:?}, peak RSS {} KB",
            path.file_name().unwrap().to_string_lossy(),
            r.took,
            r.max_rss_kb
        );
    }
}

#[test]
fn ignore_label_that_removes_compose_labels_is_refused_at_startup() {
    let dir = TempDir::new("ignore");
    let pins = dir.0.join("pins");
    for pattern in ["com.docker.compose.*", "com.docker.compose.service", "*"] {
        let r = run(&[
            "run",
            "--ignore-label",
            pattern,
            "--pin-dir",
            pins.to_str().unwrap(),
            "--state-dir",
            dir.0.join("state").to_str().unwrap(),
            "--policy-dir",
            dir.0.join("policies.d").to_str().unwrap(),
        ]);
        assert_ne!(r.code, Some(0), "{pattern}");
        assert!(
            r.stderr.contains(&format!(
                "--ignore-label {pattern:?} would leave com.docker.compose."
            )),
            "{pattern}: {}",
            r.stderr
        );
        assert!(
            !Path::new(&pins).exists(),
            "nothing was set up for {pattern}"
        );
    }
}

#[test]
fn delete_by_file_checks_the_files_first() {
    let dir = TempDir::new("delete");
    let bad = dir.write("bad.yaml", "apiVersion: cilium.io/v2\nkind: Nope\n");
    let socket = dir.0.join("no-agent.sock");
    let delete_f = |file: &Path| {
        run(&[
            "--socket",
            socket.to_str().unwrap(),
            "policy",
            "delete",
            "-f",
            file.to_str().unwrap(),
        ])
    };
    let r = delete_f(&bad);
    assert_ne!(r.code, Some(0));
    assert!(
        r.stderr
            .contains("bad.yaml:2: kind: kind must be CiliumNetworkPolicy")
            && r.stderr.contains("nothing was deleted"),
        "{}",
        r.stderr
    );
    // A valid file: its names go to the agent (here: none answers).
    let good = dir.write(
        "good.yaml",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\nspec: {endpointSelector: {}}\n",
    );
    let r = delete_f(&good);
    assert!(
        r.stderr.contains("cannot reach the netpol agent"),
        "{}",
        r.stderr
    );
    // Names and -f (or --all) do not mix.
    let r = run(&["policy", "delete", "a", "--all"]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
}
