//! `cargo xtask bench masq6`: what netpol's IPv6 masquerade costs, against ip6tables MASQUERADE
//! and against plain routing (no translation).
//!
//! Each configuration gets its own copy of a small topology, every node a namespace (so neither
//! the real host's routes nor its firewall are in the measured path):
//! `c1 (fd00:42::2) ── br0 [host] up0 (2001:db8:1::2) ── srv (2001:db8:1::1)`.
//! - **routed**: srv has a route back to `fd00:42::/64`; nothing is translated.
//! - **netpol**: `masq6_out`/`masq6_in` on `up0` (loaded by `netpol-masq6-loader`, release build,
//!   which exits before the measurements; the pinned TCX links keep the programs attached).
//! - **ip6tables**: `ip6tables -t nat -A POSTROUTING -s fd00:42::/64 -o up0 -j MASQUERADE`.
//!
//! Rounds measure every configuration once each, the order rotated each round; the table gives
//! medians and ratios against ip6tables. Measurements: single-stream TCP throughput
//! (`iperf3 -J`) and new TCP connections per second (a connect loop in c1 against an accept loop
//! in srv that closes each connection at once; every connection is a new translation).

use std::{
    fmt::Write as _,
    io::Read as _,
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::stats::median;
use anyhow::{bail, ensure, Context, Result};

const PREFIX: &str = "fd00:42::/64";
const C1: &str = "fd00:42::2";
const UPLINK: &str = "2001:db8:1::2";
const SERVER: &str = "2001:db8:1::1";
const IPERF_PORT: u16 = 5201;
const ACCEPT_PORT: u16 = 8080;

#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// Rounds; every configuration is measured once per round.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 4)]
    pub seconds: u32,
    /// Concurrent connecting threads for the connection-rate measurement.
    #[arg(long, default_value_t = 8)]
    pub threads: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Routed,
    Netpol,
    Ip6tables,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Self::Routed => "routed, no translation",
            Self::Netpol => "netpol masq6 (eBPF)",
            Self::Ip6tables => "ip6tables MASQUERADE",
        }
    }
}

fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "{args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

fn enter_netns(ns: &str) -> Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("opening netns {ns}"))?;
    // SAFETY: a valid namespace fd; only the calling thread moves.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {ns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// One configuration's namespaces, servers and pins; dropping it tears everything down.
struct Setup {
    mode: Mode,
    tag: String,
    pin_dir: PathBuf,
    stop: Arc<AtomicBool>,
    iperf: Option<Child>,
}

impl Setup {
    fn ns(&self, role: &str) -> String {
        format!("{}{role}", self.tag)
    }

    fn build(mode: Mode, bin: &Path) -> Result<Self> {
        let tag = format!(
            "m6bench{}{}-",
            std::process::id() % 100_000,
            match mode {
                Mode::Routed => "r",
                Mode::Netpol => "n",
                Mode::Ip6tables => "i",
            }
        );
        let mut s = Self {
            mode,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/netpol-bench-{tag}")),
            tag,
            stop: Arc::new(AtomicBool::new(false)),
            iperf: None,
        };
        let (host, c1, srv) = (s.ns("host"), s.ns("c1"), s.ns("srv"));
        for ns in [&host, &c1, &srv] {
            sh(&["ip", "netns", "add", ns])?;
            for k in ["all", "default"] {
                sh(&[
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{k}.accept_dad=0"),
                ])?;
            }
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        sh(&[
            "ip",
            "netns",
            "exec",
            &host,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.forwarding=1",
        ])?;
        sh(&["ip", "-n", &host, "link", "add", "br0", "type", "bridge"])?;
        sh(&[
            "ip",
            "-n",
            &host,
            "addr",
            "add",
            "fd00:42::1/64",
            "dev",
            "br0",
            "nodad",
        ])?;
        sh(&["ip", "-n", &host, "link", "set", "br0", "up"])?;
        sh(&[
            "ip", "-n", &host, "link", "add", "vc1", "type", "veth", "peer", "name", "eth0",
            "netns", &c1,
        ])?;
        sh(&[
            "ip", "-n", &host, "link", "set", "vc1", "master", "br0", "up",
        ])?;
        sh(&[
            "ip",
            "-n",
            &c1,
            "addr",
            "add",
            &format!("{C1}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        sh(&["ip", "-n", &c1, "link", "set", "eth0", "up"])?;
        sh(&[
            "ip",
            "-n",
            &c1,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd00:42::1",
        ])?;
        sh(&[
            "ip", "-n", &host, "link", "add", "up0", "type", "veth", "peer", "name", "eth0",
            "netns", &srv,
        ])?;
        sh(&[
            "ip",
            "-n",
            &host,
            "addr",
            "add",
            &format!("{UPLINK}/64"),
            "dev",
            "up0",
            "nodad",
        ])?;
        sh(&["ip", "-n", &host, "link", "set", "up0", "up"])?;
        sh(&[
            "ip", "-n", &host, "-6", "route", "add", "default", "via", SERVER, "dev", "up0",
        ])?;
        sh(&[
            "ip",
            "-n",
            &srv,
            "addr",
            "add",
            &format!("{SERVER}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        sh(&["ip", "-n", &srv, "link", "set", "eth0", "up"])?;
        match mode {
            Mode::Routed => {
                sh(&[
                    "ip", "-n", &srv, "-6", "route", "add", PREFIX, "via", UPLINK,
                ])?;
            }
            Mode::Ip6tables => {
                sh(&[
                    "ip",
                    "netns",
                    "exec",
                    &host,
                    "ip6tables",
                    "-t",
                    "nat",
                    "-A",
                    "POSTROUTING",
                    "-s",
                    PREFIX,
                    "-o",
                    "up0",
                    "-j",
                    "MASQUERADE",
                ])?;
            }
            Mode::Netpol => {
                let pin = s.pin_dir.to_string_lossy().into_owned();
                sh(&[
                    &bin.join("netpol-masq6-loader").to_string_lossy(),
                    &pin,
                    &host,
                    "up0",
                    UPLINK,
                    PREFIX,
                ])?;
            }
        }
        s.iperf = Some(
            Command::new("ip")
                .args(["netns", "exec", &srv, "iperf3", "-s", "-B", SERVER, "-p"])
                .arg(IPERF_PORT.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting iperf3 -s")?,
        );
        s.accept_loop()?;
        s.wait_ready()?;
        Ok(s)
    }

    /// An accept loop in srv that closes every connection at once (srv closes first, so the
    /// TIME_WAIT states stay on the server side and c1 can reuse its ports).
    fn accept_loop(&self) -> Result<()> {
        let srv = self.ns("srv");
        let l = std::thread::scope(|sc| {
            sc.spawn(|| -> Result<TcpListener> {
                enter_netns(&srv)?;
                let l = TcpListener::bind((SERVER.parse::<Ipv6Addr>()?, ACCEPT_PORT))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("bind thread panicked"))?
        })?;
        let stop = self.stop.clone();
        std::thread::spawn(move || {
            let fd = l.as_raw_fd();
            while !stop.load(Ordering::Relaxed) {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut p, 1, 100) } <= 0 {
                    continue;
                }
                while let Ok((c, _)) = l.accept() {
                    drop(c);
                }
            }
        });
        Ok(())
    }

    /// Polls until c1 reaches both servers (neighbour discovery done, iperf3 listening).
    fn wait_ready(&self) -> Result<()> {
        let c1 = self.ns("c1");
        let deadline = Instant::now() + Duration::from_secs(15);
        let server: Ipv6Addr = SERVER.parse()?;
        std::thread::scope(|sc| {
            sc.spawn(|| -> Result<()> {
                enter_netns(&c1)?;
                loop {
                    let ok = [IPERF_PORT, ACCEPT_PORT].iter().all(|p| {
                        TcpStream::connect_timeout(
                            &SocketAddr::from((server, *p)),
                            Duration::from_millis(500),
                        )
                        .is_ok()
                    });
                    if ok {
                        return Ok(());
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "{}: servers not reachable",
                        self.mode.label()
                    );
                }
            })
            .join()
            .map_err(|_| anyhow::anyhow!("readiness thread panicked"))?
        })
    }

    fn throughput(&self, secs: u32) -> Result<f64> {
        let json = sh(&[
            "ip",
            "netns",
            "exec",
            &self.ns("c1"),
            "iperf3",
            "-c",
            SERVER,
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ])?;
        let rest = json
            .find("\"sum_received\"")
            .map(|i| &json[i..])
            .context("no sum_received in iperf3 output")?;
        let rest = &rest[rest
            .find("\"bits_per_second\"")
            .context("no bits_per_second")?
            + 17..];
        let rest = rest.trim_start().trim_start_matches(':').trim_start();
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')))
            .unwrap_or(rest.len());
        Ok(rest[..end].parse::<f64>()? / 1e9)
    }

    fn conn_rate(&self, secs: u32, threads: usize) -> Result<f64> {
        let c1 = self.ns("c1");
        let done = AtomicU64::new(0);
        let failed = AtomicU64::new(0);
        let server = SocketAddr::from((SERVER.parse::<Ipv6Addr>()?, ACCEPT_PORT));
        let start = Instant::now();
        let end = start + Duration::from_secs(u64::from(secs));
        std::thread::scope(|sc| {
            for _ in 0..threads {
                sc.spawn(|| {
                    if enter_netns(&c1).is_err() {
                        return;
                    }
                    let mut buf = [0u8; 16];
                    while Instant::now() < end {
                        match TcpStream::connect_timeout(&server, Duration::from_secs(2)) {
                            Ok(mut s) => {
                                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                                // EOF: the server closed; the connection went the whole way.
                                if matches!(s.read(&mut buf), Ok(0)) {
                                    done.fetch_add(1, Ordering::Relaxed);
                                } else {
                                    failed.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
        });
        let f = failed.load(Ordering::Relaxed);
        if f > 0 {
            eprintln!("  {}: {f} connections failed", self.mode.label());
        }
        Ok(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(mut c) = self.iperf.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for role in ["c1", "srv", "host"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(role)])
                .status();
        }
        if let Ok(rd) = std::fs::read_dir(&self.pin_dir) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.pin_dir);
    }
}

/// Builds the release loader; returns the directory holding it.
fn build_loader() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives in the workspace")?
        .to_path_buf();
    eprintln!("building netpol-masq6-loader (release)…");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "-p",
            "netpol-tests",
            "--bin",
            "netpol-masq6-loader",
        ])
        .status()
        .context("running cargo build")?;
    ensure!(status.success(), "building netpol-masq6-loader failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release"))
}

pub fn run(o: Opts) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(unsafe { libc::geteuid() } == 0, "bench masq6 needs root");
    for tool in ["ip", "ip6tables", "iperf3"] {
        ensure!(
            Command::new("which")
                .arg(tool)
                .output()
                .is_ok_and(|o| o.status.success()),
            "{tool} is not installed"
        );
    }
    let bin = build_loader()?;
    let modes = [Mode::Routed, Mode::Netpol, Mode::Ip6tables];
    let setups: Vec<Setup> = modes
        .iter()
        .map(|m| Setup::build(*m, &bin))
        .collect::<Result<_>>()?;
    let mut gbps = vec![Vec::new(); modes.len()];
    let mut cps = vec![Vec::new(); modes.len()];
    for round in 0..o.rounds {
        eprintln!("round {}/{}", round + 1, o.rounds);
        for k in 0..modes.len() {
            let i = (k + round) % modes.len();
            let s = &setups[i];
            gbps[i].push(s.throughput(o.seconds)?);
            cps[i].push(s.conn_rate(o.seconds, o.threads)?);
        }
    }
    let g: Vec<f64> = gbps.iter_mut().map(|v| median(v)).collect();
    let c: Vec<f64> = cps.iter_mut().map(|v| median(v)).collect();
    let ipt = modes
        .iter()
        .position(|m| *m == Mode::Ip6tables)
        .unwrap_or(modes.len() - 1);
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| IPv6 masquerade | TCP Gbit/s (× ip6tables) | new conn/s (× ip6tables) |"
    );
    let _ = writeln!(table, "|---|---|---|");
    for (i, m) in modes.iter().enumerate() {
        let _ = writeln!(
            table,
            "| {} | {:.2} ({:.2}) | {:.0} ({:.2}) |",
            m.label(),
            g[i],
            g[i] / g[ipt],
            c[i],
            c[i] / c[ipt]
        );
    }
    let _ = writeln!(
        table,
        "\nMedians of {} interleaved rounds, {} s each; one iperf3 stream; {} connecting threads; \
         topology: container netns → bridge → host netns → uplink veth → server netns.",
        o.rounds, o.seconds, o.threads
    );
    println!("{table}");
    drop(setups);
    Ok(())
}
