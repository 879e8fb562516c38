//! `cargo xtask bench agent`: how fast the agent reacts and how little it needs, at scale.
//!
//! A private dockerd (the test harness's `DockerDaemon`, which takes the Docker test lock for its
//! lifetime) and the release agent with default map sizes on a private pin dir, state dir and
//! socket. One policy selects every container of the bench project (each container is a compose
//! service of its own, so an identity of its own) and allows ingress from `host` on `--ports`
//! TCP ports: `--containers` × `--ports` policy entries (500 × 20 = 10,000 by default).
//!
//! "Enforced" is read from the kernel, not from the agent: a watcher thread reads the pinned
//! `ENDPOINTS` map every millisecond and notes when each host veth first holds the container's
//! own endpoint (a label identity, ingress enforced, the container's address). The agent is not
//! asked while it is measured.
//!
//! - **start → enforced**: Docker's `State.StartedAt` to that moment, for every container
//!   (started `--parallel` at a time).
//! - **import → enforced**: the `policy import` round trip (the daemon answers once the maps are
//!   written), alternating two versions of a second policy (one port more for every container:
//!   500 entries in, 500 out).
//! - **dockerd restart**: every container runs with `--restart always`; dockerd is stopped (its
//!   containers with it) and started again. Measured: from dockerd answering again to every
//!   container enforced on its new veth. Throughout, the host probes a port the policy denies on
//!   every address of the bench subnet with TCP SYNs: an answer (a RST from the container's
//!   stack) would be a protected container open to a denied peer.
//! - **RSS / CPU idle** with every container running, after the last change; the RSS split into
//!   heap, thread stacks and file-backed pages (`/proc/PID/smaps`, kept as `agent.smaps`).
//! - **map memory**: `bpftool map show` `bytes_memlock` of every map the agent pinned (the
//!   masquerade's maps, not loaded on a bench without an IPv6 uplink, are created at their
//!   default sizes with `bpftool map create` and measured the same way). An LPM trie's memory
//!   grows with its entries: its "full" figure is scaled from the bytes per entry now.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{
    process::{cpu_ticks, rss_breakdown, rss_kib, ticks_per_second, RssBreakdown},
    stats::percentile,
};
use anyhow::{bail, Context, Result};
use netpol_agent::daemon::api::{call, Request, SourceFile};
use netpol_common::{endpoint::Endpoint, identity, maps};
use netpol_tests::docker::DockerDaemon;

#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// Containers (each its own compose service and identity).
    #[arg(long, default_value_t = 500)]
    pub containers: usize,
    /// TCP ports the policy allows from `host` per container (entries = containers × ports).
    #[arg(long, default_value_t = 20)]
    pub ports: usize,
    /// `docker run`s at a time while the containers are started.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Policy imports measured.
    #[arg(long, default_value_t = 50)]
    pub imports: usize,
    /// Skip the dockerd restart.
    #[arg(long)]
    pub no_restart: bool,
    /// Run dockerd with `--live-restore`: its restart leaves the containers running (same
    /// veths); measured is the agent's full resync (a new snapshot of every container).
    #[arg(long)]
    pub live_restore: bool,
}

const NET: &str = "netpol-benchnet";
const SUBNET: &str = "172.31.0.0/16";
const IMAGE: &str = "netpol-bench-box";
/// A port the policy never allows: the probe of the restart phase.
const DENIED_PORT: u16 = 81;

struct AgentProc {
    child: Child,
    pin_dir: PathBuf,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = netpol_agent::datapath::kernel::KernelDatapath::remove_pins(&self.pin_dir);
    }
}

/// Removes the bench's containers and network, also when the bench fails half-way (a panic of
/// the harness included). Holds the environment of the daemon's `docker` CLI, not the daemon,
/// so that the daemon can be restarted meanwhile.
struct Containers {
    envs: Vec<(std::ffi::OsString, Option<std::ffi::OsString>)>,
    names: Vec<String>,
}

impl Containers {
    fn new(docker: &DockerDaemon, names: &[String]) -> Self {
        let cmd = docker.command("docker");
        Self {
            envs: cmd
                .get_envs()
                .map(|(k, v)| (k.to_owned(), v.map(ToOwned::to_owned)))
                .collect(),
            names: names.to_vec(),
        }
    }

    fn docker(&self, args: &[&str]) {
        let mut cmd = Command::new("docker");
        for (k, v) in &self.envs {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        let _ = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        for chunk in self.names.chunks(100) {
            let mut args = vec!["rm", "-f"];
            args.extend(chunk.iter().map(String::as_str));
            self.docker(&args);
        }
        self.docker(&["network", "rm", NET]);
    }
}

/// Parses Docker's RFC 3339 timestamp with nanoseconds (UTC, `Z`) into seconds since the epoch.
fn parse_started_at(s: &str) -> Result<f64> {
    // 2026-11-22T21:07:26.123456789Z
    let s = s.trim().trim_end_matches('Z');
    let (date, time) = s.split_once('T').context("timestamp without T")?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse())
        .collect::<Result<_, _>>()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms
        .split(':')
        .map(|x| x.parse())
        .collect::<Result<_, _>>()?;
    if d.len() != 3 || t.len() != 3 {
        bail!("bad timestamp {s}");
    }
    // Days from civil (Howard Hinnant's algorithm).
    let (y, m, day) = (if d[1] <= 2 { d[0] - 1 } else { d[0] }, d[1], d[2]);
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2];
    let frac: f64 = format!("0.{frac}").parse().unwrap_or(0.0);
    Ok(secs as f64 + frac)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// ifindex → (address, identity, first time seen enforced).
type Seen = BTreeMap<u32, (Ipv4Addr, u32, f64)>;

/// Every host veth's endpoint as the kernel holds it, and when each (ifindex, endpoint) pair was
/// first seen enforcing a container: a thread reading the pinned `ENDPOINTS` map.
struct Watcher {
    /// ifindex → (address, identity, first time seen enforced).
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Watcher {
    fn start(pin_dir: &Path) -> Result<Self> {
        let path = pin_dir.join(maps::ENDPOINTS);
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || -> Result<()> {
            let data = aya::maps::MapData::from_pin(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            let map: aya::maps::HashMap<_, u32, Endpoint> =
                aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data))?;
            while !stop2.load(Ordering::Relaxed) {
                let t = now();
                let mut fresh = Vec::new();
                {
                    let seen = seen2.lock().expect("watcher lock");
                    for k in map.keys().flatten() {
                        if seen.contains_key(&k) {
                            continue;
                        }
                        if let Ok(ep) = map.get(&k, 0) {
                            if ep.identity >= identity::FIRST_LABEL
                                && ep.enforces(netpol_common::Direction::Ingress)
                                && ep.flags & Endpoint::HAS_IPV4 != 0
                            {
                                fresh.push((k, Ipv4Addr::from(ep.ipv4), ep.identity));
                            }
                        }
                    }
                }
                if !fresh.is_empty() {
                    let mut seen = seen2.lock().expect("watcher lock");
                    for (k, a, id) in fresh {
                        seen.insert(k, (a, id, t));
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        });
        Ok(Self {
            seen,
            stop,
            thread: Some(thread),
        })
    }

    fn snapshot(&self) -> Seen {
        self.seen.lock().expect("watcher lock").clone()
    }

    fn finish(mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => bail!("the ENDPOINTS watcher panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// TCP SYNs from the host to `DENIED_PORT` on `addrs`, round after round, until stopped. A
/// connection refused (the container's RST) or accepted means the SYN reached a container the
/// policy protects: it is recorded as a violation.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(usize, Vec<String>)>>,
}

fn syn_round(addrs: &[Ipv4Addr], wait: Duration, violations: &mut Vec<String>) {
    let mut socks: Vec<(Ipv4Addr, OwnedFd)> = Vec::new();
    for a in addrs {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            continue;
        }
        // SAFETY: fd is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: DENIED_PORT.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*a).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sa is a valid sockaddr_in of the given length.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        let err = std::io::Error::last_os_error().raw_os_error();
        if rc == 0 {
            violations.push(format!("{a}:{DENIED_PORT} accepted a connection"));
        } else if err == Some(libc::EINPROGRESS) {
            socks.push((*a, fd));
        } else if err == Some(libc::ECONNREFUSED) {
            violations.push(format!("{a}:{DENIED_PORT} answered with a RST"));
        }
    }
    let deadline = Instant::now() + wait;
    while !socks.is_empty() && Instant::now() < deadline {
        let mut pfds: Vec<libc::pollfd> = socks
            .iter()
            .map(|(_, fd)| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        let left = deadline.saturating_duration_since(Instant::now());
        // SAFETY: pfds is a valid array of pollfd.
        let n = unsafe {
            libc::poll(
                pfds.as_mut_ptr(),
                pfds.len() as libc::nfds_t,
                left.as_millis() as i32,
            )
        };
        if n <= 0 {
            break;
        }
        let mut keep = Vec::new();
        for ((a, fd), p) in socks.into_iter().zip(&pfds) {
            if p.revents == 0 {
                keep.push((a, fd));
                continue;
            }
            let mut e: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: e and len are valid for SO_ERROR.
            unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    (&mut e as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            match e {
                0 => violations.push(format!("{a}:{DENIED_PORT} accepted a connection")),
                libc::ECONNREFUSED => {
                    violations.push(format!("{a}:{DENIED_PORT} answered with a RST"))
                }
                // No neighbour (EHOSTUNREACH) and the like: nothing reached a container.
                _ => {}
            }
        }
        socks = keep;
    }
}

impl Prober {
    fn start(addrs: Vec<Ipv4Addr>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut rounds = 0;
            let mut violations = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                for chunk in addrs.chunks(200) {
                    syn_round(chunk, Duration::from_millis(150), &mut violations);
                }
                rounds += 1;
            }
            (rounds, violations)
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or((0, vec!["the prober panicked".into()]))
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn policy(ports: &[u16], name: &str) -> String {
    let list: Vec<String> = ports
        .iter()
        .map(|p| format!("{{port: \"{p}\", protocol: TCP}}"))
        .collect();
    format!(
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: {name}
spec:
  endpointSelector:
    matchLabels:
      com.docker.compose.project: bench
  ingress:
    - fromEntities: [host]
      toPorts:
        - ports: [{}]
",
        list.join(", ")
    )
}

fn import(socket: &Path, name: &str, text: String) -> Result<()> {
    call(
        socket,
        &Request::PolicyImport {
            files: vec![SourceFile {
                path: format!("{name}.yaml"),
                text,
            }],
        },
    )
    .with_context(|| format!("importing {name}"))?;
    Ok(())
}

/// Container name → the time of its last `start` event (`docker events`, seconds since the
/// epoch), from the earliest of `started` on.
fn start_events(
    docker: &DockerDaemon,
    started: impl Iterator<Item = f64>,
) -> Result<HashMap<String, f64>> {
    let since = started.fold(f64::INFINITY, f64::min) - 1.0;
    if !since.is_finite() {
        return Ok(HashMap::new());
    }
    let (since, until) = (format!("{since:.0}"), format!("{:.0}", now() + 1.0));
    let out = docker.docker_ok(&[
        "events",
        "--since",
        &since,
        "--until",
        &until,
        "--filter",
        "type=container",
        "--filter",
        "event=start",
        "--format",
        "{{.Actor.Attributes.name}} {{.TimeNano}}",
    ]);
    let mut m = HashMap::new();
    for line in out.lines() {
        if let Some((name, ns)) = line.split_once(' ') {
            let t = ns
                .trim()
                .parse::<f64>()
                .with_context(|| format!("{line:?}"))?
                / 1e9;
            m.insert(name.to_owned(), t);
        }
    }
    Ok(m)
}

/// `name → (IPv4 address, StartedAt)` of `names`, one `docker inspect` per 100.
fn inspect_all(
    docker: &DockerDaemon,
    names: &[String],
) -> Result<HashMap<String, (Ipv4Addr, f64)>> {
    let mut out = HashMap::new();
    for chunk in names.chunks(100) {
        let mut args = vec![
            "inspect",
            "-f",
            "{{.Name}} {{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}} {{.State.StartedAt}}",
        ];
        args.extend(chunk.iter().map(String::as_str));
        for line in docker.docker_ok(&args).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() != 3 {
                bail!("docker inspect: {line:?}");
            }
            let ip: Ipv4Addr = f[1]
                .parse()
                .with_context(|| format!("address in {line:?}"))?;
            out.insert(
                f[0].trim_start_matches('/').to_owned(),
                (ip, parse_started_at(f[2])?),
            );
        }
    }
    Ok(out)
}

/// One map as `bpftool map show` reports it.
struct MapMem {
    name: String,
    kind: String,
    max_entries: u64,
    bytes: u64,
    /// Bytes with every entry used (LPM tries grow with their entries; the others preallocate).
    full: u64,
    note: &'static str,
}

fn bpftool_json(args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("bpftool").args(args).output()?;
    if !out.status.success() {
        bail!(
            "bpftool {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn map_mem(path: &Path, note: &'static str) -> Result<MapMem> {
    let p = path.to_str().context("pin path")?;
    let v = bpftool_json(&["map", "show", "pinned", p, "-j"])?;
    let kind = v["type"].as_str().unwrap_or("?").to_owned();
    let max_entries = v["max_entries"].as_u64().unwrap_or(0);
    let bytes = v["bytes_memlock"].as_u64().unwrap_or(0);
    let full = if kind == "lpm_trie" {
        let n = bpftool_json(&["map", "dump", "pinned", p, "-j"])?
            .as_array()
            .map_or(0, Vec::len) as u64;
        bytes.checked_div(n).map_or(0, |per| per * max_entries)
    } else {
        bytes
    };
    Ok(MapMem {
        name: v["name"].as_str().unwrap_or("?").to_owned(),
        kind,
        max_entries,
        bytes,
        full,
        note,
    })
}

/// The agent's pinned maps, plus the masquerade's at their default sizes.
fn maps_memory(pin_dir: &Path) -> Result<Vec<MapMem>> {
    let mut out = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(pin_dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() || !p.is_dir())
        .collect();
    names.sort();
    for p in names {
        out.push(map_mem(&p, "")?);
    }
    use netpol_common::{
        frag::{Frag6Key, Masq6Frag},
        nat,
    };
    let d = netpol_agent::datapath::MapSizes::default();
    for (name, key, value, entries) in [
        (
            maps::SNAT6,
            std::mem::size_of::<nat::Snat6Key>(),
            std::mem::size_of::<nat::Snat6Entry>(),
            d.snat6,
        ),
        (
            nat::maps::MASQ6_FRAG,
            std::mem::size_of::<Frag6Key>(),
            std::mem::size_of::<Masq6Frag>(),
            d.masq6_frag,
        ),
    ] {
        if out.iter().any(|m| m.name == name) {
            continue;
        }
        let path = pin_dir.join(format!("bench_{name}"));
        let (k, v, n) = (key.to_string(), value.to_string(), entries.to_string());
        let p = path.to_str().context("pin path")?;
        let st = Command::new("bpftool")
            .args([
                "map", "create", p, "type", "lru_hash", "key", &k, "value", &v,
            ])
            .args(["entries", &n, "name", name])
            .status()?;
        if !st.success() {
            bail!("bpftool map create {name}");
        }
        let m = map_mem(&path, "masquerade, created at its default size");
        let _ = std::fs::remove_file(&path);
        out.push(m?);
    }
    Ok(out)
}

fn mb(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / (1024.0 * 1024.0))
}

pub fn run(o: Opts) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench agent needs root");
    }
    let status = Command::new("cargo")
        .args(["build", "--release", "-p", "netpol-agent"])
        .status()?;
    if !status.success() {
        bail!("building the agent failed");
    }
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let bin = PathBuf::from(target).join("release/netpol-agent");
    // Restoring hundreds of containers after a restart takes dockerd minutes on 2 cores.
    let mut docker = DockerDaemon::start_with(netpol_tests::docker::DaemonConfig {
        ready_timeout: Some(Duration::from_secs(1200)),
        extra_args: if o.live_restore {
            vec!["--live-restore".into()]
        } else {
            Vec::new()
        },
        ..Default::default()
    });
    docker.build_busybox_image(IMAGE);
    let _ = docker.docker(&["network", "rm", NET]);
    docker.docker_ok(&["network", "create", "--subnet", SUBNET, NET]);
    let names: Vec<String> = (0..o.containers).map(|i| format!("bench-{i}")).collect();
    // Declared after the daemon: dropped (containers removed) before it.
    let _containers = Containers::new(&docker, &names);
    let m = measure(&o, &bin, &docker, &names)?;
    print_report(&o, &m, None);
    if !o.no_restart {
        let r = restart_phase(&o, &mut docker, &names, &m);
        // dockerd's own account of its restart (it is removed with the daemon).
        let _ = std::fs::write(m.work.join("dockerd.log"), docker.log());
        print_restart(&o, &m, &r?);
        println!("dockerd log: {}", m.work.join("dockerd.log").display());
    }
    Ok(())
}

/// What the first phases measured; the agent and the containers still run.
struct Measured {
    start_ms: Vec<f64>,
    /// Docker's `start` event → enforced.
    event_ms: Vec<f64>,
    /// `State.StartedAt` → Docker's `start` event (dockerd's own part).
    docker_ms: Vec<f64>,
    import_ms: Vec<f64>,
    start_wall_s: f64,
    rss_kib: u64,
    rss: RssBreakdown,
    cpu_pct: f64,
    maps: Vec<MapMem>,
    policy_entries: usize,
    agent: AgentProc,
    work: PathBuf,
    socket: PathBuf,
}

fn measure(o: &Opts, bin: &Path, docker: &DockerDaemon, names: &[String]) -> Result<Measured> {
    let tag = std::process::id();
    let work = std::env::temp_dir().join(format!("netpol-bench-agent-{tag}"));
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/netpol-bench-{tag}"));
    let socket = work.join("agent.sock");
    std::fs::create_dir_all(work.join("policies"))?;
    let child = Command::new(bin)
        .arg("--socket")
        .arg(&socket)
        .arg("run")
        .arg("--pin-dir")
        .arg(&pin_dir)
        .arg("--state-dir")
        .arg(work.join("state"))
        .arg("--policy-dir")
        .arg(work.join("policies"))
        .arg("--docker-socket")
        .arg(docker.socket_path())
        .arg("--masq6")
        .arg("off")
        .env(
            "NETPOL_LOG",
            std::env::var("NETPOL_BENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stderr(Stdio::from(std::fs::File::create(work.join("agent.log"))?))
        .spawn()?;
    let agent = AgentProc { child, pin_dir };
    let pid = agent.child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = call(&socket, &Request::Status)
            .ok()
            .and_then(|v| {
                v.get("docker")
                    .and_then(|d| d.as_str())
                    .map(|d| d.starts_with("connected"))
            })
            .unwrap_or(false);
        if up {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "agent did not connect to Docker: {}",
                std::fs::read_to_string(work.join("agent.log"))?
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ports: Vec<u16> = std::iter::once(80).chain(1000..).take(o.ports).collect();
    import(&socket, "bench", policy(&ports, "bench"))?;

    // Start → enforced, `parallel` starts at a time.
    let watcher = Watcher::start(&agent.pin_dir)?;
    let t_start = Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..o.parallel.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(name) = names.get(i) else { break };
                let service = format!("com.docker.compose.service=s{i}");
                let out = docker.docker(&[
                    "run",
                    "-d",
                    "--name",
                    name,
                    "--network",
                    NET,
                    "--restart",
                    "always",
                    "--stop-timeout",
                    "1",
                    "-l",
                    "com.docker.compose.project=bench",
                    "-l",
                    &service,
                    IMAGE,
                    "sleep",
                    "1000000",
                ]);
                if !out.status.success() {
                    failures.lock().expect("lock").push(format!(
                        "docker run {name}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            });
        }
    });
    let start_wall_s = t_start.elapsed().as_secs_f64();
    if let Some(e) = failures.lock().expect("lock").first() {
        bail!("{e}");
    }
    let info = inspect_all(docker, names)?;
    let start_events = start_events(docker, info.values().map(|(_, s)| *s))?;
    let want: BTreeSet<Ipv4Addr> = info.values().map(|(a, _)| *a).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let seen = loop {
        let seen = watcher.snapshot();
        let by_addr: BTreeSet<Ipv4Addr> = seen.values().map(|(a, _, _)| *a).collect();
        if want.is_subset(&by_addr) {
            break seen;
        }
        if Instant::now() > deadline {
            bail!(
                "{} of {} containers not enforced after 60 s",
                want.difference(&by_addr).count(),
                want.len()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    watcher.finish()?;
    let enforced_at: HashMap<Ipv4Addr, f64> = seen.values().map(|(a, _, t)| (*a, *t)).collect();
    let mut by_name: Vec<(f64, &str, f64)> = info
        .iter()
        .map(|(n, (a, started))| {
            (
                ((enforced_at[a] - started) * 1000.0).max(0.0),
                n.as_str(),
                *started,
            )
        })
        .collect();
    by_name.sort_by(|a, b| b.0.total_cmp(&a.0));
    let slowest: Vec<String> = by_name
        .iter()
        .take(5)
        .map(|(ms, n, started)| format!("{n} {ms:.0} ms (started at :{:06.3})", started % 60.0))
        .collect();
    eprintln!("slowest start → enforced: {}", slowest.join(", "));
    let mut start_ms: Vec<f64> = by_name.iter().map(|(ms, _, _)| *ms).collect();
    start_ms.sort_by(f64::total_cmp);
    // The same from Docker's start event (what the agent is told), and Docker's own part.
    let (mut event_ms, mut docker_ms) = (Vec::new(), Vec::new());
    for (n, (a, started)) in &info {
        if let Some(ev) = start_events.get(n) {
            event_ms.push(((enforced_at[a] - ev) * 1000.0).max(0.0));
            docker_ms.push(((ev - started) * 1000.0).max(0.0));
        }
    }
    event_ms.sort_by(f64::total_cmp);
    docker_ms.sort_by(f64::total_cmp);

    // Import → enforced: one port more (alternating) for every container.
    let mut import_ms = Vec::new();
    for i in 0..o.imports {
        let extra = if i % 2 == 0 { 2000 } else { 2001 };
        let text = policy(&[extra], "bench-toggle");
        let t0 = Instant::now();
        import(&socket, "bench-toggle", text)?;
        import_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    import_ms.sort_by(f64::total_cmp);

    // Idle with every container running.
    std::thread::sleep(Duration::from_secs(3));
    let rss_kib = rss_kib(pid)?;
    let rss = rss_breakdown(pid)?;
    // Every mapping's share, for a closer look.
    let _ = std::fs::copy(format!("/proc/{pid}/smaps"), work.join("agent.smaps"));
    let hz = ticks_per_second();
    let c0 = cpu_ticks(pid)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    let cpu_pct = (cpu_ticks(pid)? - c0) as f64 / hz / t0.elapsed().as_secs_f64() * 100.0;
    let maps = maps_memory(&agent.pin_dir)?;
    let policy_entries = bpftool_json(&[
        "map",
        "dump",
        "pinned",
        agent.pin_dir.join(maps::POLICY).to_str().context("path")?,
        "-j",
    ])?
    .as_array()
    .map_or(0, Vec::len);
    Ok(Measured {
        start_ms,
        event_ms,
        docker_ms,
        import_ms,
        start_wall_s,
        rss_kib,
        rss,
        cpu_pct,
        maps,
        policy_entries,
        agent,
        work,
        socket,
    })
}

struct Restarted {
    /// dockerd answering again → every container enforced on its new veth.
    resync_s: f64,
    /// dockerd stop begun → every container enforced again.
    total_s: f64,
    probe_rounds: usize,
    violations: Vec<String>,
}

fn restart_phase(
    o: &Opts,
    docker: &mut DockerDaemon,
    names: &[String],
    m: &Measured,
) -> Result<Restarted> {
    let before: BTreeSet<u32> = {
        let w = Watcher::start(&m.agent.pin_dir)?;
        std::thread::sleep(Duration::from_millis(200));
        let s = w.snapshot();
        w.finish()?;
        s.keys().copied().collect()
    };
    // Every address Docker can hand out to the bench's containers, and a few more.
    let probe: Vec<Ipv4Addr> = (2..(o.containers as u32 + 50))
        .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 31, 0, 0)) + i))
        .collect();
    let watcher = Watcher::start(&m.agent.pin_dir)?;
    let prober = Prober::start(probe);
    let t_stop = Instant::now();
    if o.live_restore {
        // The containers and their veths stay: done when the agent has applied a new snapshot
        // of all of them (its status says connected again after it saw Docker go away), with
        // every endpoint still enforced.
        let docker_status = |socket: &Path| -> Option<String> {
            call(socket, &Request::Status)
                .ok()?
                .get("docker")?
                .as_str()
                .map(str::to_owned)
        };
        let socket = m.socket.clone();
        let saw_down = Arc::new(AtomicBool::new(false));
        let (saw_down2, stop) = (saw_down.clone(), Arc::new(AtomicBool::new(false)));
        let stop2 = stop.clone();
        let poll = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                if docker_status(&socket).is_some_and(|d| !d.starts_with("connected")) {
                    saw_down2.store(true, Ordering::Relaxed);
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        docker.restart();
        let t_up = Instant::now();
        let want = format!("connected ({} containers)", names.len());
        let deadline = t_up + Duration::from_secs(300);
        let t_done = loop {
            if saw_down.load(Ordering::Relaxed)
                && docker_status(&m.socket).is_some_and(|d| d == want)
            {
                break Instant::now();
            }
            if Instant::now() > deadline {
                stop.store(true, Ordering::Relaxed);
                bail!("the agent did not report {want:?} within 300 s of dockerd answering");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        stop.store(true, Ordering::Relaxed);
        let _ = poll.join();
        std::thread::sleep(Duration::from_secs(1));
        let (probe_rounds, violations) = prober.finish();
        watcher.finish()?;
        let after: BTreeSet<u32> = {
            let w = Watcher::start(&m.agent.pin_dir)?;
            std::thread::sleep(Duration::from_millis(200));
            let s = w.snapshot();
            w.finish()?;
            s.keys().copied().collect()
        };
        if !before.is_subset(&after) {
            bail!("endpoints lost their enforcement across the live restore");
        }
        return Ok(Restarted {
            resync_s: (t_done - t_up).as_secs_f64(),
            total_s: (t_done - t_stop).as_secs_f64(),
            probe_rounds,
            violations,
        });
    }
    docker.restart();
    let t_up = Instant::now();
    let deadline = t_up + Duration::from_secs(300);
    let t_done = loop {
        let s = watcher.snapshot();
        let fresh = s.keys().filter(|k| !before.contains(k)).count();
        if fresh >= names.len() {
            break Instant::now();
        }
        if Instant::now() > deadline {
            bail!(
                "after the dockerd restart only {fresh} of {} containers were enforced within 300 s",
                names.len()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Keep probing a moment after the last one.
    std::thread::sleep(Duration::from_secs(1));
    let (probe_rounds, violations) = prober.finish();
    watcher.finish()?;
    let _ = &m.socket;
    Ok(Restarted {
        resync_s: (t_done - t_up).as_secs_f64(),
        total_s: (t_done - t_stop).as_secs_f64(),
        probe_rounds,
        violations,
    })
}

fn print_restart(o: &Opts, m: &Measured, r: &Restarted) {
    let n = m.start_ms.len();
    println!();
    if o.live_restore {
        println!("| dockerd restart ({n} containers, dockerd `--live-restore`) | |");
        println!("|---|---|");
        println!(
            "| dockerd answering again → the agent's new snapshot of all {n} applied | {:.1} s |",
            r.resync_s
        );
    } else {
        println!("| dockerd restart ({n} containers, `--restart always`) | |");
        println!("|---|---|");
        println!(
            "| dockerd answering again → all {n} enforced on their new veths | {:.1} s |",
            r.resync_s
        );
    }
    println!(
        "| dockerd stop begun → all enforced again | {:.1} s |",
        r.total_s
    );
    println!(
        "| denied SYNs answered meanwhile ({} probe rounds over the subnet; target 0) | {} |",
        r.probe_rounds,
        r.violations.len()
    );
    for v in r.violations.iter().take(10) {
        println!("violation: {v}");
    }
}

fn print_report(o: &Opts, m: &Measured, _r: Option<&Restarted>) {
    let n = m.start_ms.len();
    println!();
    println!(
        "{} containers ({} `docker run`s at a time, {:.0} s for all), {} policy entries in POLICY",
        n, o.parallel, m.start_wall_s, m.policy_entries
    );
    println!();
    println!("| measure | p50 | p99 | target |");
    println!("|---|---|---|---|");
    println!(
        "| container start → enforced ({n} containers) | {:.1} ms | {:.1} ms | p99 < 100 ms |",
        percentile(&m.start_ms, 0.5),
        percentile(&m.start_ms, 0.99)
    );
    if !m.event_ms.is_empty() {
        println!(
            "| … `StartedAt` → Docker's `start` event (dockerd's own part) | {:.1} ms | {:.1} ms | |",
            percentile(&m.docker_ms, 0.5),
            percentile(&m.docker_ms, 0.99)
        );
        println!(
            "| … Docker's `start` event → enforced (the agent's part) | {:.1} ms | {:.1} ms | |",
            percentile(&m.event_ms, 0.5),
            percentile(&m.event_ms, 0.99)
        );
    }
    println!(
        "| policy import → enforced ({} imports, ±{} entries each) | {:.1} ms | {:.1} ms | p99 < 100 ms |",
        m.import_ms.len(),
        n,
        percentile(&m.import_ms, 0.5),
        percentile(&m.import_ms, 0.99)
    );
    println!(
        "| agent RSS, idle, {n} containers | {:.1} MB | | < 20 MB |",
        m.rss_kib as f64 / 1024.0
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "| … heap (anonymous) / thread stacks / file-backed (text, libraries) | {:.1} / {:.1} / {:.1} MB | | |",
        mib(m.rss.heap),
        mib(m.rss.stacks),
        mib(m.rss.file)
    );
    println!(
        "| agent CPU, idle (10 s) | {:.2} % of one core | | |",
        m.cpu_pct
    );
    println!();
    println!("| map | type | max_entries | kernel memory now | full |");
    println!("|---|---|---|---|---|");
    let (mut now_total, mut full_total) = (0, 0);
    for x in &m.maps {
        let note = if x.note.is_empty() {
            String::new()
        } else {
            format!(" ({})", x.note)
        };
        println!(
            "| {}{} | {} | {} | {} | {} |",
            x.name,
            note,
            x.kind,
            x.max_entries,
            mb(x.bytes),
            mb(x.full)
        );
        now_total += x.bytes;
        full_total += x.full;
    }
    println!(
        "| **total** | | | {} | {} (target ≤ 32 MB) |",
        mb(now_total),
        mb(full_total)
    );
    println!();
    println!("agent log: {}", m.work.join("agent.log").display());
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_docker_timestamps() {
        let t = super::parse_started_at("1970-01-02T00:00:01.5Z").unwrap();
        assert!((t - 86_401.5).abs() < 1e-6);
        let t = super::parse_started_at("2026-11-22T21:07:26.000000000Z").unwrap();
        assert!((t - 1_795_381_646.0).abs() < 1.0, "{t}");
    }

    #[test]
    fn the_bench_policy_has_one_entry_per_port() {
        let p = super::policy(&[80, 1000], "x");
        assert!(p.contains("{port: \"80\", protocol: TCP}, {port: \"1000\", protocol: TCP}"));
    }
}
