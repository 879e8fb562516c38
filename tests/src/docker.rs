//! Tier-4 harness: a private `dockerd` for end-to-end tests, and images built without pulls.
//!
//! ```no_run
//! use netpol_tests::docker::{DockerDaemon, DockerVersion};
//! if !netpol_tests::require_root("my_e2e_test") {
//!     return;
//! }
//! let docker = DockerDaemon::start_version(DockerVersion::Docker28);
//! docker.build_busybox_image("netpol-test/busybox");
//! let out = docker.docker_ok(&["run", "--rm", "netpol-test/busybox", "echo", "hi"]);
//! assert_eq!(out, "hi");
//! // Dropping `docker` stops the daemon and removes what it left on the host.
//! ```
//!
//! The daemon keeps everything of its own under a fresh directory (`--data-root`, `--exec-root`,
//! pid file, socket, log) but, like any dockerd, it shares the host's network stack: it creates
//! `docker0` and `br-*` bridges, iptables chains (`DOCKER*`, NAT rules) and sets the FORWARD
//! policy to DROP. Plain dockerd leaves all of that behind when it stops, which breaks later
//! bridged tests, so [`DockerDaemon`]'s `Drop` stops it by its pid and removes those leftovers.
//!
//! # Two Docker versions
//! [`DockerVersion::Docker20`] is the system's dockerd (Debian bookworm's 20.10);
//! [`DockerVersion::Docker28`] is Docker 28.5.2, which `scripts/setup.sh` unpacks into
//! [`docker28_dir`] (Debian unstable's packages; run with the system's runc). Every Docker
//! end-to-end test runs on both: write it as `fn name(version: DockerVersion)` without
//! `#[test]` and list it in the file's one [`docker_tests!`](crate::docker_tests) invocation,
//! which makes the tests `docker20::name` and `docker28::name`:
//!
//! ```no_run
//! use netpol_tests::docker::{DaemonConfig, DockerDaemon, DockerVersion};
//!
//! fn published_port_works(version: DockerVersion) {
//!     if !netpol_tests::require_root(&version.test_name("published_port_works")) {
//!         return;
//!     }
//!     let docker = DockerDaemon::start_with(DaemonConfig { version, ..Default::default() });
//!     // … `if version == DockerVersion::Docker28 { … }` where the two differ
//! }
//!
//! netpol_tests::docker_tests!(published_port_works);
//! ```
//!
//! A test that only makes sense on one version is a plain `#[test]` whose name ends in
//! `_docker20` or `_docker28`. [`DockerDaemon::command`] puts the daemon's own CLI first in
//! `PATH`, so `docker` there is the matching client.
//!
//! Only one harness daemon runs at a time on a host: [`DockerDaemon::start`] takes an exclusive
//! `flock` on [`LOCK_PATH`] (blocking) and holds it until the daemon is dropped, so tests in one
//! binary, and separate test binaries, take turns. A daemon left behind by a killed test process
//! is found (by its paths) and stopped at the next start. A dockerd that is not the harness's
//! (say the host's own Docker service) makes [`DockerDaemon::start`] panic: a second daemon would
//! rewrite the first one's iptables chains.

use std::{
    ffi::CString,
    fs,
    io::{Read as _, Write as _},
    os::unix::{fs::PermissionsExt as _, io::AsRawFd as _, net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

/// The lock that serialises harness daemons on one host.
pub const LOCK_PATH: &str = "/run/netpol-tests-docker.lock";
/// Parent of each daemon's exec root, socket, pid file and log (kept short: unix socket paths
/// under it must stay below 108 bytes).
pub const RUN_PREFIX: &str = "/run/netpol-tests";
/// Parent of each daemon's data root (images, containers).
pub const DATA_PREFIX: &str = "/var/lib/netpol-tests";
/// Cgroup parent of the harness's containers, so leftovers of a killed run can be found.
const CGROUP_PARENT: &str = "netpol-tests";
/// Docker 28's version, as `scripts/setup.sh` pins it (`DOCKER28_VERSION` there).
pub const DOCKER28_VERSION: &str = "28.5.2";
/// Where `scripts/setup.sh` unpacks Docker 28 unless `NETPOL_DOCKER28_DIR` says otherwise.
pub const DOCKER28_DEFAULT_DIR: &str = "/var/cache/netpol/docker-28.5.2";

/// The IPv6 subnet of `docker0` when [`DaemonConfig::ipv6`] is set.
pub const FIXED_CIDR_V6: &str = "fd00:dead::/64";

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

/// Sysctls dockerd changes; their values are put back when the daemon is dropped.
const SYSCTLS: &[&str] = &[
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
    "/proc/sys/net/ipv6/conf/default/forwarding",
    "/proc/sys/net/bridge/bridge-nf-call-iptables",
    "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
];

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// Which dockerd a test runs against; see the module documentation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DockerVersion {
    /// The system's `dockerd` from `PATH` (Debian bookworm's 20.10 on the machines tested).
    #[default]
    Docker20,
    /// Docker [`DOCKER28_VERSION`] from [`docker28_dir`], with its own containerd and
    /// docker-proxy and the system's runc.
    Docker28,
}

impl DockerVersion {
    /// Both, in the order the tests run.
    pub const ALL: [DockerVersion; 2] = [DockerVersion::Docker20, DockerVersion::Docker28];

    /// `docker20` / `docker28`: the suffix of test names.
    pub fn name(self) -> &'static str {
        match self {
            DockerVersion::Docker20 => "docker20",
            DockerVersion::Docker28 => "docker28",
        }
    }

    /// `test` with the version, for messages and `require_root`: `name::docker28`.
    pub fn test_name(self, test: &str) -> String {
        format!("{test}::{}", self.name())
    }

    /// The directories to put first in `PATH` (none for the system's Docker).
    pub fn bin_dirs(self) -> Vec<PathBuf> {
        match self {
            DockerVersion::Docker20 => Vec::new(),
            DockerVersion::Docker28 => {
                let root = docker28_dir().join("root");
                vec![root.join("usr/sbin"), root.join("usr/bin")]
            }
        }
    }

    /// `PATH` for this version's `dockerd`, `docker`, `containerd` and `docker-proxy`.
    pub fn path_env(self) -> std::ffi::OsString {
        let current =
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
        let mut dirs = self.bin_dirs();
        dirs.extend(std::env::split_paths(&current));
        std::env::join_paths(dirs).unwrap_or(current)
    }

    /// Panics with what to do when this version is not installed.
    fn check_installed(self) {
        if self == DockerVersion::Docker28 {
            let dir = docker28_dir();
            let stamp = fs::read_to_string(dir.join("VERSIONS")).unwrap_or_default();
            assert!(
                dir.join("root/usr/sbin/dockerd").is_file()
                    && stamp
                        .lines()
                        .any(|l| l == format!("docker {DOCKER28_VERSION}")),
                "Docker {DOCKER28_VERSION} is not installed in {}: run scripts/setup.sh (it \
                 unpacks Debian unstable's docker.io there; NETPOL_DOCKER28_DIR overrides the \
                 directory)",
                dir.display()
            );
        }
    }
}

/// Where Docker 28 is unpacked: `NETPOL_DOCKER28_DIR`, or [`DOCKER28_DEFAULT_DIR`].
pub fn docker28_dir() -> PathBuf {
    std::env::var_os("NETPOL_DOCKER28_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DOCKER28_DEFAULT_DIR))
}

/// Runs each named `fn NAME(version: DockerVersion)` once per Docker version, as the tests
/// `docker20::NAME` and `docker28::NAME`. One invocation per test file, listing every such
/// function (see the [`docker`](crate::docker) module documentation).
#[macro_export]
macro_rules! docker_tests {
    ($($name:ident),+ $(,)?) => {
        /// The Docker end-to-end tests of this file on the system's Docker (20.10).
        mod docker20 {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::docker::DockerVersion::Docker20)
                }
            )+
        }
        /// The Docker end-to-end tests of this file on Docker 28.
        mod docker28 {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::docker::DockerVersion::Docker28)
                }
            )+
        }
    };
}

/// How to start the daemon. `DaemonConfig::default()` is what [`DockerDaemon::start`] uses.
#[derive(Clone, Debug, Default)]
pub struct DaemonConfig {
    /// Which Docker; the system's by default.
    pub version: DockerVersion,
    /// `--userland-proxy=false` (Docker's default and the harness's is `true`): published ports
    /// are then reached through DNAT only, also from the host itself.
    pub no_userland_proxy: bool,
    /// IPv6 on the default bridge: `--ipv6 --fixed-cidr-v6 fd00:dead::/64` ([`FIXED_CIDR_V6`]).
    /// Docker 20.10 does not NAT IPv6 (`--ip6tables` is experimental there and left off);
    /// Docker 28 does (`--ip6tables` is on by default there: `--ip6tables=false` turns it off).
    pub ipv6: bool,
    /// Further dockerd arguments, e.g. `--live-restore`.
    pub extra_args: Vec<String>,
    /// How long dockerd may take to answer `_ping` after a start or restart (default
    /// 60 s); a daemon restoring hundreds of containers needs minutes.
    pub ready_timeout: Option<Duration>,
}

/// A private dockerd, stopped and cleaned up on drop. See the module documentation.
pub struct DockerDaemon {
    config: DaemonConfig,
    run_dir: PathBuf,
    data_root: PathBuf,
    child: Option<Child>,
    sysctls: Vec<(&'static str, String)>,
    nft_tables_before: Option<Vec<String>>,
    bridges_before: Vec<String>,
    // Dropped last, after the cleanup in `Drop::drop`.
    _lock: fs::File,
}

impl DockerDaemon {
    /// Starts a daemon with the default configuration; panics with the daemon's log when it
    /// does not answer `_ping` within a minute. Needs root (check with
    /// [`crate::require_root`] first).
    pub fn start() -> Self {
        Self::start_with(DaemonConfig::default())
    }

    /// Starts a daemon of `version` with otherwise default configuration.
    pub fn start_version(version: DockerVersion) -> Self {
        Self::start_with(DaemonConfig {
            version,
            ..Default::default()
        })
    }

    /// Starts a daemon with `config`. See [`DockerDaemon::start`].
    pub fn start_with(config: DaemonConfig) -> Self {
        // SAFETY: geteuid has no preconditions.
        assert!(
            unsafe { libc::geteuid() } == 0,
            "DockerDaemon needs root: call netpol_tests::require_root first"
        );
        config.version.check_installed();
        for tool in ["dockerd", "docker", "ip", "iptables"] {
            assert!(
                in_path(tool),
                "`{tool}` not found in PATH: run scripts/setup.sh"
            );
        }
        let lock = take_lock();
        reap_stale();
        let others = foreign_dockerds();
        if let Some(p) = others
            .iter()
            .find(|p| !p.cmdline.contains("--iptables=false"))
        {
            panic!(
                "another dockerd is running (pid {}: {}). The Docker end-to-end tests start their \
                 own daemon, and two daemons managing iptables rewrite each other's chains: stop \
                 it first (e.g. `systemctl stop docker.socket docker`)",
                p.pid,
                p.cmdline.trim()
            );
        }
        if others.is_empty() {
            // No daemon at all: Docker bridges and chains still present are an earlier one's,
            // and iptables-nft tables left empty by that cleanup do nothing: remove them too.
            let errors = cleanup_network(&[], Some(&[]));
            assert!(
                errors.is_empty(),
                "cannot remove the network leftovers of an earlier dockerd:\n{}",
                errors.join("\n")
            );
        } else {
            for p in &others {
                eprintln!(
                    "note: dockerd pid {} (--iptables=false) also runs; its bridges are left alone",
                    p.pid
                );
            }
        }
        let bridges_before = host_bridges()
            .into_iter()
            .filter(|b| is_docker_bridge(b))
            .collect();

        let id = format!(
            "d{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let run_dir = Path::new(RUN_PREFIX).join(&id);
        let data_root = Path::new(DATA_PREFIX).join(&id);
        for dir in [&run_dir, &data_root] {
            fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        }
        // An empty config file: the host's /etc/docker/daemon.json must not leak in (its
        // `hosts` or `data-root` would even conflict with our flags).
        fs::write(run_dir.join("daemon.json"), "{}\n").expect("write daemon.json");

        let mut daemon = DockerDaemon {
            config,
            run_dir,
            data_root,
            child: None,
            sysctls: SYSCTLS
                .iter()
                .filter_map(|p| Some((*p, fs::read_to_string(p).ok()?.trim().to_owned())))
                .collect(),
            nft_tables_before: nft_tables(),
            bridges_before,
            _lock: lock,
        };
        daemon.spawn();
        daemon
    }

    /// The daemon's unix socket.
    pub fn socket_path(&self) -> PathBuf {
        self.run_dir.join("docker.sock")
    }

    /// The value for `DOCKER_HOST`: `unix://<socket>`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket_path().display())
    }

    /// Which Docker this is.
    pub fn version(&self) -> DockerVersion {
        self.config.version
    }

    /// How it was started.
    pub fn config(&self) -> &DaemonConfig {
        &self.config
    }

    /// `PATH` with this daemon's own binaries first (its `docker` CLI).
    pub fn path_env(&self) -> std::ffi::OsString {
        self.config.version.path_env()
    }

    /// The dockerd process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The daemon's data root (`--data-root`).
    pub fn data_root(&self) -> &Path {
        &self.data_root
    }

    /// What the daemon has logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.run_dir.join("dockerd.log")).unwrap_or_default()
    }

    /// A command with `DOCKER_HOST` pointing at this daemon (and the CLI's config kept out of
    /// the user's home), for `docker`, `docker-compose` or the agent under test.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("DOCKER_HOST", self.host())
            .env("PATH", self.path_env())
            .env("DOCKER_CONFIG", self.run_dir.join("cli"))
            .env_remove("DOCKER_CONTEXT")
            .env_remove("DOCKER_TLS_VERIFY")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the `docker` CLI against this daemon.
    pub fn docker(&self, args: &[&str]) -> Output {
        let mut cmd = self.command("docker");
        cmd.args(args);
        output_of(&mut cmd)
    }

    /// Runs the `docker` CLI; panics with its stderr unless it succeeds. Returns stdout, trimmed.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        expect_success("docker", args, &out)
    }

    /// Runs `docker-compose` (or `docker compose` where only the plugin exists) in
    /// `project_dir` against this daemon.
    pub fn compose(&self, project_dir: &Path, args: &[&str]) -> Output {
        let mut cmd = if in_path("docker-compose") {
            self.command("docker-compose")
        } else {
            let mut c = self.command("docker");
            c.arg("compose");
            c
        };
        cmd.current_dir(project_dir).args(args);
        output_of(&mut cmd)
    }

    /// Runs [`DockerDaemon::compose`]; panics with its stderr unless it succeeds. Returns
    /// stdout, trimmed.
    pub fn compose_ok(&self, project_dir: &Path, args: &[&str]) -> String {
        let out = self.compose(project_dir, args);
        expect_success("docker-compose", args, &out)
    }

    /// `docker inspect -f FORMAT OBJECT`, trimmed.
    pub fn inspect(&self, object: &str, format: &str) -> String {
        self.docker_ok(&["inspect", "-f", format, object])
    }

    /// Stops the daemon (SIGTERM by pid; containers without live-restore are stopped with it)
    /// and starts it again on the same data, as a host's Docker service restart does. The
    /// bridges and iptables chains stay in between, as they do for a real restart. A container
    /// whose process ignores SIGTERM (`sleep`, busybox `httpd`) holds the stop for its stop
    /// timeout: start such containers with `--stop-timeout 1`.
    pub fn restart(&mut self) {
        if let Err(e) = self.stop_process() {
            panic!("restart: {e}");
        }
        self.spawn();
    }

    /// Starts an image builder: busybox plus the files and binaries added to it.
    pub fn image(&self, name: &str) -> ImageBuilder<'_> {
        ImageBuilder {
            daemon: self,
            name: name.to_owned(),
            binaries: Vec::new(),
            files: Vec::new(),
        }
    }

    /// Imports `name`: a rootfs with the host's busybox and its applets (`sh`, `nc`, `httpd`,
    /// `wget`, `ping`, `ip`, …), `CMD ["/bin/sh"]`. Takes a fraction of a second.
    pub fn build_busybox_image(&self, name: &str) {
        self.image(name).build();
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.run_dir.join("dockerd.log"))
            .expect("open dockerd.log");
        let log2 = log.try_clone().expect("dup dockerd.log");
        let r = &self.run_dir;
        let version = self.config.version;
        let dockerd = version
            .bin_dirs()
            .iter()
            .map(|d| d.join("dockerd"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("dockerd"));
        let mut cmd = Command::new(dockerd);
        cmd.arg("--config-file")
            .arg(r.join("daemon.json"))
            .arg("--data-root")
            .arg(&self.data_root)
            .arg("--exec-root")
            .arg(r.join("exec"))
            .arg("--pidfile")
            .arg(r.join("docker.pid"))
            .arg("--host")
            .arg(self.host())
            .arg(if self.config.no_userland_proxy {
                "--userland-proxy=false"
            } else {
                "--userland-proxy=true"
            })
            .args([
                "--iptables=true",
                "--shutdown-timeout=2",
                "--containerd-namespace=netpol-tests",
                "--containerd-plugins-namespace=netpol-tests-plugins",
            ])
            .arg(format!("--cgroup-parent=/{CGROUP_PARENT}"));
        if self.config.ipv6 {
            cmd.args(["--ipv6", "--fixed-cidr-v6", FIXED_CIDR_V6]);
        }
        // Docker 28's own docker-proxy (its arguments differ from 20.10's), and its containerd
        // through PATH; runc is the system's.
        for dir in version.bin_dirs() {
            if dir.join("docker-proxy").is_file() {
                cmd.arg("--userland-proxy-path")
                    .arg(dir.join("docker-proxy"));
            }
        }
        cmd.args(&self.config.extra_args)
            .env("PATH", version.path_env())
            .env_remove("DOCKER_HOST")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn dockerd: {e}"));
        self.child = Some(child);

        let ready_timeout = self.config.ready_timeout.unwrap_or(READY_TIMEOUT);
        let deadline = Instant::now() + ready_timeout;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "dockerd exited with {status} before answering; its log:\n{}",
                    self.log()
                );
            }
            if ping(&self.socket_path()) {
                return;
            }
            if Instant::now() > deadline {
                let _ = self.stop_process();
                panic!(
                    "dockerd did not answer _ping within {ready_timeout:?}; its log:\n{}",
                    self.log()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// `docker rm -f -v` of every container, bounded by `timeout` in case the daemon hangs.
    fn remove_all_containers(&self) -> Option<String> {
        let mut ps = self.command("timeout");
        ps.args(["30", "docker", "ps", "-a", "-q"]);
        let ids = match run(&mut ps) {
            Ok(ids) => ids,
            Err(e) => return Some(e),
        };
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if ids.is_empty() {
            return None;
        }
        let mut rm = self.command("timeout");
        rm.args(["60", "docker", "rm", "-f", "-v"]).args(&ids);
        run(&mut rm).err()
    }

    /// SIGTERM to our dockerd, wait for it (SIGKILL after a deadline).
    fn stop_process(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id() as libc::pid_t;
        // SAFETY: `pid` is our own child, not yet reaped, so the pid cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "dockerd (pid {pid}) ignored SIGTERM for {STOP_TIMEOUT:?} and was killed"
                    ));
                }
                Err(e) => return Err(format!("wait for dockerd (pid {pid}): {e}")),
            }
        }
    }

    fn teardown(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.child.is_some() {
            // dockerd's shutdown gives each container its stop timeout (10 s by default) to
            // react to SIGTERM; test containers (`sleep`, `nc`) do not, so remove them first.
            errors.extend(self.remove_all_containers());
        }
        if let Err(e) = self.stop_process() {
            errors.push(e);
        }
        let prefixes = [self.run_dir.clone(), self.data_root.clone()];
        errors.extend(kill_processes_under(&prefixes));
        errors.extend(kill_cgroup_leftovers());
        errors.extend(remove_dirs(&prefixes));
        errors.extend(cleanup_network(
            &self.bridges_before,
            self.nft_tables_before.as_deref(),
        ));
        for (path, value) in &self.sysctls {
            match fs::read_to_string(path) {
                Ok(now) if now.trim() == value => {}
                _ => {
                    if let Err(e) = fs::write(path, value) {
                        errors.push(format!("restore {path} to {value}: {e}"));
                    }
                }
            }
        }
        errors
    }
}

impl Drop for DockerDaemon {
    fn drop(&mut self) {
        let errors = self.teardown();
        if errors.is_empty() {
            return;
        }
        let msg = format!("DockerDaemon cleanup failed:\n  {}", errors.join("\n  "));
        if thread::panicking() {
            eprintln!("{msg}");
        } else {
            panic!("{msg}");
        }
    }
}

/// Builds an image from busybox plus host files; see [`DockerDaemon::image`].
pub struct ImageBuilder<'a> {
    daemon: &'a DockerDaemon,
    name: String,
    binaries: Vec<PathBuf>,
    files: Vec<(PathBuf, PathBuf)>,
}

impl ImageBuilder<'_> {
    /// Adds a host executable at the same path, with the shared libraries `ldd` lists for it
    /// (so Debian's dynamically linked tools such as `/usr/bin/iperf3` run in the image).
    pub fn binary(mut self, host_path: impl Into<PathBuf>) -> Self {
        self.binaries.push(host_path.into());
        self
    }

    /// Adds a host file at `image_path` (absolute, inside the image).
    pub fn file(mut self, host_path: impl Into<PathBuf>, image_path: impl Into<PathBuf>) -> Self {
        self.files.push((host_path.into(), image_path.into()));
        self
    }

    /// Writes the rootfs and `docker import`s it as the builder's name.
    pub fn build(self) {
        let rootfs = self
            .daemon
            .run_dir
            .join("images")
            .join(self.name.replace(['/', ':'], "_"));
        let _ = fs::remove_dir_all(&rootfs);
        for dir in [
            "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "root", "var",
        ] {
            fs::create_dir_all(rootfs.join(dir)).expect("create rootfs dir");
        }
        fs::create_dir_all(rootfs.join("tmp")).expect("create rootfs /tmp");
        fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777))
            .expect("chmod /tmp");
        fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        )
        .expect("write /etc/passwd");
        fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")
            .expect("write /etc/group");

        let busybox = which("busybox").expect("busybox not found: run scripts/setup.sh");
        copy_binary(&busybox, &rootfs, Path::new("/bin/busybox"));
        let applets = run_ok(Command::new(&busybox).arg("--list-full"));
        for applet in applets.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let link = rootfs.join(applet);
            if link.symlink_metadata().is_ok() {
                continue;
            }
            if let Some(parent) = link.parent() {
                fs::create_dir_all(parent).expect("create applet dir");
            }
            std::os::unix::fs::symlink("/bin/busybox", &link)
                .unwrap_or_else(|e| panic!("symlink {}: {e}", link.display()));
        }
        for bin in &self.binaries {
            copy_binary(bin, &rootfs, bin);
        }
        for (src, dst) in &self.files {
            copy_file(src, &rootfs.join(dst.strip_prefix("/").unwrap_or(dst)));
        }

        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .args(["--numeric-owner", "-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn tar");
        let tar_out = tar.stdout.take().expect("tar stdout");
        let import = self
            .daemon
            .command("docker")
            .args(["import", "-c", r#"CMD ["/bin/sh"]"#, "-", &self.name])
            .stdin(tar_out)
            .output()
            .expect("spawn docker import");
        let tar_status = tar.wait().expect("wait for tar");
        assert!(
            tar_status.success(),
            "tar of {} failed: {tar_status}",
            rootfs.display()
        );
        expect_success("docker", &["import", &self.name], &import);
        let _ = fs::remove_dir_all(&rootfs);
    }
}

/// Copies `src` to `rootfs/dst` and, for a dynamic executable, the libraries `ldd` names, each
/// at its own path.
fn copy_binary(src: &Path, rootfs: &Path, dst: &Path) {
    copy_file(src, &rootfs.join(dst.strip_prefix("/").unwrap_or(dst)));
    let Ok(out) = Command::new("ldd").arg(src).output() else {
        return;
    };
    if !out.status.success() {
        return; // "not a dynamic executable"
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(lib) = path.filter(|p| p.starts_with('/')) {
            let lib = Path::new(lib);
            let target = rootfs.join(lib.strip_prefix("/").unwrap_or(lib));
            if !target.exists() {
                copy_file(lib, &target);
            }
        }
    }
}

fn copy_file(src: &Path, dst: &Path) {
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
    }
    if dst.symlink_metadata().is_ok() {
        let _ = fs::remove_file(dst);
    }
    fs::copy(src, dst)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), dst.display()));
}

/// `GET /_ping` on the socket: true on `200 OK`.
fn ping(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.lines().next().is_some_and(|l| l.contains(" 200 "))
}

/// Takes the harness lock, waiting (and saying so) while another test holds it; panics after
/// `NETPOL_DOCKER_LOCK_TIMEOUT` seconds (default 900) rather than hang, e.g. when a test asks for
/// a second daemon while its binary holds one for all its tests.
fn take_lock() -> fs::File {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_PATH)
        .unwrap_or_else(|e| panic!("open {LOCK_PATH}: {e}"));
    let timeout = std::env::var("NETPOL_DOCKER_LOCK_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(900), Duration::from_secs);
    let deadline = Instant::now() + timeout;
    let mut said = false;
    loop {
        // SAFETY: the descriptor is open and owned by `file`.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return file;
        }
        let e = std::io::Error::last_os_error();
        assert!(
            e.raw_os_error() == Some(libc::EWOULDBLOCK),
            "flock {LOCK_PATH}: {e}"
        );
        assert!(
            Instant::now() < deadline,
            "{LOCK_PATH} still held after {timeout:?}: another DockerDaemon is alive (in this \
             test binary, or another test process)"
        );
        if !said {
            eprintln!("waiting for {LOCK_PATH}: another test runs a dockerd");
            said = true;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// With the lock held no harness daemon is in use, so anything still running from our paths was
/// left by a killed test process: stop it and remove its directories.
fn reap_stale() {
    let prefixes = [PathBuf::from(RUN_PREFIX), PathBuf::from(DATA_PREFIX)];
    let mut errors = kill_processes_under(&prefixes);
    errors.extend(kill_cgroup_leftovers());
    for prefix in &prefixes {
        let Ok(entries) = fs::read_dir(prefix) else {
            continue;
        };
        let stale: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        errors.extend(remove_dirs(&stale));
    }
    assert!(
        errors.is_empty(),
        "cannot remove what an earlier test run left:\n{}",
        errors.join("\n")
    );
}

struct ProcInfo {
    pid: libc::pid_t,
    comm: String,
    cmdline: String,
}

fn processes() -> Vec<ProcInfo> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: libc::pid_t = e.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(e.path().join("stat")).ok()?;
            // A zombie has exited; it only waits for its parent.
            if stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            {
                return None;
            }
            let comm = fs::read_to_string(e.path().join("comm"))
                .ok()?
                .trim()
                .to_owned();
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            Some(ProcInfo { pid, comm, cmdline })
        })
        .collect()
}

/// Running dockerds that are not the harness's (called after [`reap_stale`]).
fn foreign_dockerds() -> Vec<ProcInfo> {
    processes()
        .into_iter()
        .filter(|p| p.comm == "dockerd")
        .collect()
}

/// SIGTERM, then SIGKILL, every process whose command line names a path under `prefixes`
/// (a harness dockerd, its containerd, containerd shims).
fn kill_processes_under(prefixes: &[PathBuf]) -> Vec<String> {
    let me = std::process::id() as libc::pid_t;
    let matching = || -> Vec<libc::pid_t> {
        processes()
            .into_iter()
            .filter(|p| {
                p.pid != me
                    && prefixes
                        .iter()
                        .any(|pre| p.cmdline.contains(&format!("{}/", pre.display())))
            })
            .map(|p| p.pid)
            .collect()
    };
    for (signal, wait) in [
        (libc::SIGTERM, STOP_TIMEOUT),
        (libc::SIGKILL, Duration::from_secs(10)),
    ] {
        let pids = matching();
        if pids.is_empty() {
            return Vec::new();
        }
        for pid in &pids {
            eprintln!("stopping process {pid} left by an earlier dockerd");
            // SAFETY: plain kill(2); the pid was just read from /proc with our path in its
            // command line.
            unsafe { libc::kill(*pid, signal) };
        }
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline && !matching().is_empty() {
            thread::sleep(POLL);
        }
    }
    let left = matching();
    if left.is_empty() {
        Vec::new()
    } else {
        vec![format!("processes still running after SIGKILL: {left:?}")]
    }
}

/// Kills processes left in the harness's container cgroups and removes those cgroups.
fn kill_cgroup_leftovers() -> Vec<String> {
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup").join(CGROUP_PARENT)];
    if let Ok(entries) = fs::read_dir("/sys/fs/cgroup") {
        roots.extend(entries.flatten().map(|e| e.path().join(CGROUP_PARENT)));
    }
    let mut dirs = Vec::new();
    for root in roots.iter().filter(|r| r.is_dir()) {
        collect_dirs(root, &mut dirs);
    }
    if dirs.is_empty() {
        return Vec::new();
    }
    for dir in &dirs {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs
            .lines()
            .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
        {
            eprintln!("killing process {pid} left in {}", dir.display());
            // SAFETY: plain kill(2) of a process in the harness's own container cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    // Deepest first; a cgroup can be removed once its killed processes are gone.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut errors = Vec::new();
    for dir in &dirs {
        loop {
            match fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(_) if Instant::now() < deadline => thread::sleep(POLL),
                Err(e) => {
                    errors.push(format!("remove cgroup {}: {e}", dir.display()));
                    break;
                }
            }
        }
    }
    errors
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_owned());
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

/// Unmounts whatever is mounted under each directory (overlay layers, shm, netns files), then
/// removes it.
fn remove_dirs(dirs: &[PathBuf]) -> Vec<String> {
    let mut errors = Vec::new();
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mount_path(m)))
        .filter(|m| dirs.iter().any(|d| m.starts_with(d)))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts.dedup();
    for m in mounts {
        let Ok(c) = CString::new(m.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: `c` is a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOENT) {
                errors.push(format!("umount {}: {e}", m.display()));
            }
        }
    }
    for d in dirs {
        match fs::remove_dir_all(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("remove {}: {e}", d.display())),
        }
    }
    errors
}

/// Mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `docker0`, and `br-` followed by 12 hex digits (a user-defined network's bridge).
pub fn is_docker_bridge(name: &str) -> bool {
    name == "docker0"
        || name
            .strip_prefix("br-")
            .is_some_and(|id| id.len() == 12 && id.bytes().all(|c| c.is_ascii_hexdigit()))
}

/// Names of the host's bridges.
pub fn host_bridges() -> Vec<String> {
    let out = run_ok(Command::new("ip").args(["-o", "link", "show", "type", "bridge"]));
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect()
}

/// The policy of iptables' FORWARD chain (`ACCEPT`, `DROP`).
pub fn forward_policy(iptables: &str) -> String {
    let out = run_ok(Command::new(iptables).args(["-w", "-t", "filter", "-S", "FORWARD"]));
    out.lines()
        .find_map(|l| l.strip_prefix("-P FORWARD "))
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// Chains named `DOCKER*` in `table`, for checks that a daemon left none.
pub fn docker_chains(iptables: &str, table: &str) -> Vec<String> {
    let Ok(out) = run(Command::new(iptables).args(["-w", "-t", table, "-S"])) else {
        return Vec::new();
    };
    out.lines()
        .filter_map(|l| l.strip_prefix("-N "))
        .filter(|c| c.starts_with("DOCKER"))
        .map(str::to_owned)
        .collect()
}

/// Removes what dockerd leaves on the host's network: `docker0`/`br-*` bridges (except those in
/// `keep_bridges`), rules in the built-in chains that belong to Docker, the `DOCKER*` chains,
/// FORWARD policy DROP, and (with iptables-nft) the nft tables that were not there before and are
/// now empty.
fn cleanup_network(keep_bridges: &[String], nft_tables_before: Option<&[String]>) -> Vec<String> {
    let mut errors = Vec::new();
    match run(Command::new("ip").args(["-o", "link", "show", "type", "bridge"])) {
        Ok(out) => {
            for name in out
                .lines()
                .filter_map(|l| l.split(": ").nth(1))
                .map(|n| n.split('@').next().unwrap_or(n))
                .filter(|n| is_docker_bridge(n) && !keep_bridges.iter().any(|k| k == n))
            {
                if let Err(e) = run(Command::new("ip").args(["link", "del", name])) {
                    errors.push(e);
                }
            }
        }
        Err(e) => errors.push(e),
    }
    for iptables in ["iptables", "ip6tables"] {
        if !in_path(iptables) {
            continue;
        }
        // Docker 28 also writes `raw` (it drops packets to container addresses arriving from
        // elsewhere than their bridge).
        for table in ["filter", "nat", "raw"] {
            cleanup_table(iptables, table, &mut errors);
        }
        if forward_policy(iptables) != "ACCEPT" {
            if let Err(e) =
                run(Command::new(iptables).args(["-w", "-t", "filter", "-P", "FORWARD", "ACCEPT"]))
            {
                errors.push(e);
            }
        }
    }
    if let Some(before) = nft_tables_before {
        let nft_backend =
            run(Command::new("iptables").arg("-V")).is_ok_and(|v| v.contains("nf_tables"));
        for (iptables, family) in [("iptables", "ip"), ("ip6tables", "ip6")] {
            for table in ["filter", "nat", "raw"] {
                let name = format!("{family} {table}");
                if !nft_backend
                    || before.contains(&name)
                    || !nft_tables().unwrap_or_default().contains(&name)
                {
                    continue;
                }
                let Ok(rules) = run(Command::new(iptables).args(["-w", "-t", table, "-S"])) else {
                    continue;
                };
                let empty = rules
                    .lines()
                    .all(|l| l.starts_with("-P ") && l.ends_with(" ACCEPT"));
                if empty {
                    if let Err(e) =
                        run(Command::new("nft").args(["delete", "table", family, table]))
                    {
                        errors.push(e);
                    }
                }
            }
        }
        // Docker's own nftables tables (its nftables firewall backend, Docker 29 on: `ip
        // docker-bridges`, `ip6 docker-bridges`) that were not there before.
        for t in nft_tables().unwrap_or_default() {
            let Some((family, name)) = t.split_once(' ') else {
                continue;
            };
            if name.starts_with("docker") && !before.contains(&t) {
                if let Err(e) = run(Command::new("nft").args(["delete", "table", family, name])) {
                    errors.push(e);
                }
            }
        }
    }
    errors
}

fn cleanup_table(iptables: &str, table: &str, errors: &mut Vec<String>) {
    let Ok(rules) = run(Command::new(iptables).args(["-w", "-t", table, "-S"])) else {
        return; // no such table (or no IPv6 support): nothing of Docker's in it
    };
    let chains: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.strip_prefix("-N "))
        .filter(|c| c.starts_with("DOCKER"))
        .collect();
    for line in rules.lines() {
        let Some(rule) = line.strip_prefix("-A ") else {
            continue;
        };
        let args = split_args(rule);
        let Some(chain) = args.first() else {
            continue;
        };
        if chains.contains(&chain.as_str()) || !is_docker_rule(&args) {
            continue;
        }
        let mut cmd = Command::new(iptables);
        cmd.args(["-w", "-t", table, "-D"]).args(&args);
        if let Err(e) = run(&mut cmd) {
            errors.push(e);
        }
    }
    for op in ["-F", "-X"] {
        for chain in &chains {
            if let Err(e) = run(Command::new(iptables).args(["-w", "-t", table, op, chain])) {
                errors.push(e);
            }
        }
    }
}

/// A rule in a built-in chain that Docker added: a jump to a `DOCKER*` chain, a match on a
/// Docker bridge, or a hairpin masquerade of a published port (`-s X -d X … -j MASQUERADE`).
fn is_docker_rule(args: &[String]) -> bool {
    let value_of = |flag: &str| {
        args.windows(2)
            .find(|w| w[0] == flag)
            .map(|w| w[1].as_str())
    };
    let jumps_to_docker = ["-j", "-g"]
        .iter()
        .any(|f| value_of(f).is_some_and(|t| t.starts_with("DOCKER")));
    let on_bridge = args.iter().any(|a| is_docker_bridge(a));
    let hairpin = value_of("-j") == Some("MASQUERADE")
        && value_of("-s").is_some()
        && value_of("-s") == value_of("-d");
    jumps_to_docker || on_bridge || hairpin
}

/// Splits an `iptables -S` rule into arguments (double quotes group, as iptables prints them).
fn split_args(s: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut in_arg = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_arg = true;
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_arg {
                    args.push(std::mem::take(&mut cur));
                    in_arg = false;
                }
            }
            c => {
                cur.push(c);
                in_arg = true;
            }
        }
    }
    if in_arg {
        args.push(cur);
    }
    args
}

/// `nft list tables` as "family name" strings; `None` without nft.
fn nft_tables() -> Option<Vec<String>> {
    if !in_path("nft") {
        return None;
    }
    let out = run(Command::new("nft").args(["list", "tables"])).ok()?;
    Some(
        out.lines()
            .filter_map(|l| l.strip_prefix("table "))
            .map(|t| t.trim().to_owned())
            .collect(),
    )
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn in_path(program: &str) -> bool {
    which(program).is_some()
}

fn output_of(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()))
}

fn expect_success(program: &str, args: &[&str], out: &Output) -> String {
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs a command to completion: stdout on success, a message with stderr otherwise.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("spawn {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let args: Vec<_> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        Err(format!(
            "`{} {}` failed ({}): {}",
            cmd.get_program().to_string_lossy(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn run_ok(cmd: &mut Command) -> String {
    run(cmd).unwrap_or_else(|e| panic!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_bridges_are_recognised() {
        assert!(is_docker_bridge("docker0"));
        assert!(is_docker_bridge("br-0123456789ab"));
        assert!(!is_docker_bridge("br-lan"));
        assert!(!is_docker_bridge("npbr0"));
    }

    #[test]
    fn docker_rules_are_recognised() {
        let rule = |s: &str| is_docker_rule(&split_args(s));
        assert!(rule("FORWARD -j DOCKER-USER"));
        assert!(rule(
            "FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        ));
        assert!(rule(
            "POSTROUTING -s 172.18.0.0/16 ! -o br-0123456789ab -j MASQUERADE"
        ));
        assert!(rule("PREROUTING -m addrtype --dst-type LOCAL -j DOCKER"));
        assert!(rule(
            "POSTROUTING -s 172.17.0.2/32 -d 172.17.0.2/32 -p tcp -m tcp --dport 80 -j MASQUERADE"
        ));
        assert!(!rule("FORWARD -i eth0 -j ACCEPT"));
        assert!(!rule("POSTROUTING -s 10.0.0.0/8 -o eth0 -j MASQUERADE"));
    }

    #[test]
    fn quoted_arguments_stay_whole() {
        assert_eq!(
            split_args(r#"INPUT -m comment --comment "a b" -j ACCEPT"#),
            ["INPUT", "-m", "comment", "--comment", "a b", "-j", "ACCEPT"]
        );
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/run/a\040b"), "/run/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
    }
}
