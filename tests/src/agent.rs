//! Tier-4 helper: the real `netpol-agent` binary as a child process with private paths.
//!
//! [`Agent::start`] runs `netpol-agent run` with its own pin directory
//! (`/sys/fs/bpf/netpol-e2e-<pid>-<n>`), state directory, policy directory and control socket
//! (under `/run/netpol-e2e/<pid>-<n>/`), pointed at a test's [`DockerDaemon`], and returns once
//! `status` answers with Docker connected. The agent is stopped by its own pid (never by name);
//! dropping the guard also removes its pins (which detaches its TCX links) and its directories.
//!
//! # Which binary
//! A test in this crate cannot use `env!("CARGO_BIN_EXE_netpol-agent")` (that only exists for the
//! binaries of the test's own package), and a binary left in `target/` may be stale. So
//! [`agent_binary`] runs `cargo build -p netpol-agent --bin netpol-agent` once per test process,
//! with the target directory and profile of the running test executable
//! (`<target>/<profile>/deps/<test>-<hash>`), and returns `<target>/<profile>/netpol-agent`.
//! When nothing changed this takes about a second; `cargo test` from a fresh clone needs
//! nothing else. `NETPOL_AGENT_BIN=/path/to/netpol-agent` skips the build (e.g. to test an
//! installed or release binary).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        OnceLock,
    },
    thread,
    time::{Duration, Instant},
};

use crate::docker::DockerDaemon;

/// Parent of each agent's run directory (state, policies, socket, log).
pub const RUN_PREFIX: &str = "/run/netpol-e2e";
/// Prefix of each agent's pin directory under `/sys/fs/bpf`.
pub const PIN_PREFIX: &str = "/sys/fs/bpf/netpol-e2e-";

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// The `netpol-agent` binary under test; see the module documentation.
pub fn agent_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("NETPOL_AGENT_BIN") {
            let bin = PathBuf::from(bin);
            assert!(
                bin.is_file(),
                "NETPOL_AGENT_BIN={} is not a file",
                bin.display()
            );
            return bin;
        }
        let exe = std::env::current_exe().expect("current_exe");
        // <target>/<profile>/deps/<test>-<hash>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .unwrap_or_else(|| panic!("unexpected test executable path {}", exe.display()))
            .to_owned();
        let target_dir = profile_dir.parent().expect("target dir").to_owned();
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("profile dir name")
            .to_owned();
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(workspace)
            .args([
                "build",
                "--quiet",
                "-p",
                "netpol-agent",
                "--bin",
                "netpol-agent",
            ])
            .arg("--target-dir")
            .arg(&target_dir);
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        eprintln!("building the agent: {cmd:?}");
        let status = cmd.status().expect("spawn cargo build");
        assert!(
            status.success(),
            "cargo build of netpol-agent failed: {status}"
        );
        let bin = profile_dir.join("netpol-agent");
        assert!(bin.is_file(), "{} missing after cargo build", bin.display());
        bin
    })
}

/// How to start an agent; `AgentOptions::default()` is what [`Agent::start`] uses.
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    /// Further arguments of `netpol-agent run`, e.g. `["--policy-entries", "8"]`.
    pub extra_args: Vec<String>,
    /// A command that runs the agent (its last argument is the agent binary's path), e.g.
    /// `["setpriv", "--bounding-set", "-all,+bpf"]`. It must exec the agent (or, like
    /// `strace -D`, leave it the direct child), so that the pid stopped at the end is the agent's.
    pub wrapper: Vec<String>,
    /// Serve metrics on a Unix socket ([`Agent::metrics_socket`], [`Agent::scrape`]).
    pub metrics: bool,
}

/// The CLI of one agent (its control socket); [`Agent`] dereferences to it, and a test of an
/// agent started some other way (the sidecar image) makes one with [`AgentCli::new`].
pub struct AgentCli {
    socket: PathBuf,
    log: Option<PathBuf>,
}

impl AgentCli {
    /// `log`: a file with the agent's stderr, quoted in failure messages.
    pub fn new(socket: impl Into<PathBuf>, log: Option<PathBuf>) -> Self {
        AgentCli {
            socket: socket.into(),
            log,
        }
    }

    /// The control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The last `n` lines of the agent's log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let Some(log) = &self.log else {
            return "(log not captured here)".into();
        };
        let log = fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// One `status -o json` attempt: `Ok(true)` once Docker is connected, `Err(answer)`
    /// otherwise.
    pub fn docker_connected(&self) -> Result<(), String> {
        let out = self.cli(&["status", "-o", "json"]);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v)
                if v["docker"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("connected")) =>
            {
                Ok(())
            }
            _ => Err(text),
        }
    }

    /// Runs the CLI (`netpol-agent --socket <ours> ARGS`).
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(agent_binary())
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("spawn netpol-agent CLI")
    }

    /// Runs the CLI and panics unless it succeeds; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "`netpol-agent {}` failed ({}):\n{}{}\nagent log:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail(30)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI with `-o json` appended and parses stdout.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.cli_ok(&a);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("`{}`: bad JSON ({e}):\n{out}", a.join(" ")))
    }

    /// `endpoint list -o json` as rows.
    pub fn endpoints(&self) -> Vec<serde_json::Value> {
        match self.cli_json(&["endpoint", "list"]) {
            serde_json::Value::Array(rows) => rows,
            other => panic!("endpoint list: expected an array, got {other}"),
        }
    }

    /// Polls `endpoint list` until every container in `ids` (full or short ids) is listed as
    /// `enforced` with an identity. Panics with the table after 20 s.
    pub fn wait_enforced(&self, ids: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let rows = self.endpoints();
            let missing: Vec<&str> = ids
                .iter()
                .copied()
                .filter(|id| {
                    !rows.iter().any(|r| {
                        r["container"].as_str().is_some_and(|c| {
                            !c.is_empty() && (id.starts_with(c) || c.starts_with(id))
                        }) && r["state"].as_str() == Some("enforced")
                            && r["identity"].is_u64()
                    })
                })
                .collect();
            if missing.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not enforced after 20 s: {missing:?}\nendpoints: {}\nagent log:\n{}",
                serde_json::to_string_pretty(&rows).unwrap_or_default(),
                self.log_tail(30)
            );
            thread::sleep(POLL);
        }
    }
}

/// A running `netpol-agent run`, stopped by pid and cleaned up on drop.
pub struct Agent {
    cli: AgentCli,
    options: AgentOptions,
    docker_socket: PathBuf,
    docker_host: String,
    run_dir: PathBuf,
    pin_dir: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// Starts an agent for `docker` and waits until it is ready (see [`Agent::wait_ready`]).
    pub fn start(docker: &DockerDaemon) -> Self {
        Self::start_with(docker, AgentOptions::default())
    }

    pub fn start_with(docker: &DockerDaemon, options: AgentOptions) -> Self {
        agent_binary(); // build it before anything is created
        let id = format!(
            "{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let run_dir = Path::new(RUN_PREFIX).join(&id);
        let pin_dir = PathBuf::from(format!("{PIN_PREFIX}{id}"));
        let _ = fs::remove_dir_all(&run_dir);
        for d in ["state", "policies"] {
            fs::create_dir_all(run_dir.join(d))
                .unwrap_or_else(|e| panic!("create {}: {e}", run_dir.join(d).display()));
        }
        let mut agent = Agent {
            cli: AgentCli::new(run_dir.join("agent.sock"), Some(run_dir.join("agent.log"))),
            options,
            docker_socket: docker.socket_path(),
            docker_host: docker.host(),
            run_dir,
            pin_dir,
            child: None,
        };
        agent.spawn();
        agent.wait_ready();
        agent
    }

    /// The policy directory (`--policy-dir`).
    pub fn policy_dir(&self) -> PathBuf {
        self.run_dir.join("policies")
    }

    /// The state directory (`--state-dir`).
    pub fn state_dir(&self) -> PathBuf {
        self.run_dir.join("state")
    }

    /// The pin directory (`--pin-dir`).
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// `run --metrics unix:…` of an agent started with [`AgentOptions::metrics`].
    pub fn metrics_socket(&self) -> PathBuf {
        self.run_dir.join("metrics.sock")
    }

    /// One scrape of the metrics endpoint (the Prometheus text format).
    pub fn scrape(&self) -> String {
        assert!(
            self.options.metrics,
            "the agent was started without metrics"
        );
        crate::metrics::scrape_unix(&self.metrics_socket())
    }

    /// The agent's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the agent has logged (stderr) so far, over all its runs.
    pub fn log(&self) -> String {
        fs::read_to_string(self.run_dir.join("agent.log")).unwrap_or_default()
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.run_dir.join("agent.log"))
            .expect("open agent.log");
        let mut cmd = match self.options.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(agent_binary());
                c
            }
            None => Command::new(agent_binary()),
        };
        cmd.arg("--socket")
            .arg(self.cli.socket())
            .arg("run")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--policy-dir")
            .arg(self.policy_dir())
            .arg("--docker-socket")
            .arg(&self.docker_socket)
            .args(["--policy-poll-ms", "200"])
            .args(&self.options.extra_args);
        if self.options.metrics {
            cmd.arg("--metrics")
                .arg(format!("unix:{}", self.metrics_socket().display()));
        }
        cmd.env("DOCKER_HOST", &self.docker_host)
            // The host's settings file (an installed package's) is not this agent's.
            .env("NETPOL_CONFIG", "/dev/null")
            .env(
                "NETPOL_LOG",
                std::env::var("NETPOL_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")));
    }

    /// Waits until `status -o json` answers and says Docker is connected; panics with the log
    /// after 30 s or when the agent exits.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "netpol-agent exited with {status} before it was ready; log:\n{}",
                    self.log()
                );
            }
            match self.cli.docker_connected() {
                Ok(()) => return,
                Err(last) => assert!(
                    Instant::now() < deadline,
                    "netpol-agent not ready within {READY_TIMEOUT:?}; last answer: {last}\nlog:\n{}",
                    self.log_tail(40)
                ),
            }
            thread::sleep(POLL);
        }
    }

    /// SIGKILL by pid (as `kill -9` would), and reap. Pins stay.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL to our own child
            let _ = child.wait();
        }
    }

    /// SIGTERM by pid and wait (SIGKILL after 10 s). Pins stay.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: our own unreaped child: the pid cannot have been reused.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                thread::sleep(POLL);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Replaces the options used by the next start ([`Agent::restart`],
    /// [`Agent::spawn_again`]), e.g. to restart with other `run` flags on the same pins.
    pub fn set_options(&mut self, options: AgentOptions) {
        self.options = options;
    }

    /// Starts the (stopped or killed) agent again with the same directories and waits until
    /// it is ready.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
        self.wait_ready();
    }

    /// Starts the agent again without waiting for it (for tests that probe from the first
    /// moment); call [`Agent::wait_ready`] afterwards.
    pub fn spawn_again(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Removes every pin of this agent (maps, programs, links): with no process holding them,
    /// links are detached and maps freed, as after a reboot. The agent must be stopped.
    pub fn remove_pins(&self) -> Result<(), String> {
        assert!(self.child.is_none(), "remove_pins with the agent running");
        match fs::remove_dir_all(&self.pin_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("remove {}: {e}", self.pin_dir.display())),
        }
    }
}

impl std::ops::Deref for Agent {
    type Target = AgentCli;
    fn deref(&self) -> &AgentCli {
        &self.cli
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        let mut errors = Vec::new();
        if let Err(e) = self.remove_pins() {
            errors.push(e);
        }
        if let Err(e) = fs::remove_dir_all(&self.run_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                errors.push(format!("remove {}: {e}", self.run_dir.display()));
            }
        }
        if errors.is_empty() {
            return;
        }
        let msg = format!("Agent cleanup failed:\n  {}", errors.join("\n  "));
        if thread::panicking() {
            eprintln!("{msg}");
        } else {
            panic!("{msg}");
        }
    }
}
