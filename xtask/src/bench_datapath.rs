//! `cargo xtask bench datapath`: what the per-container programs cost, against no filter, an
//! iptables FORWARD chain of the same size and an nftables set of the same size.
//!
//! Every configuration gets its own copy of the topology (tests/src/netns.rs: a namespace playing
//! the host with a bridge, two containers `c1` and `c2`, `bridge-nf-call-iptables=1` everywhere),
//! set up once; then rounds run every measurement on every configuration, the order rotated
//! each round, and the table reports medians and ratios against no filter.
//!
//! - **netpol N**: both endpoints enforce ingress and egress; POLICY holds N entries that never
//!   match (other identities and ports) plus the 6 allows that do (c1 egress to c2 and c2 ingress
//!   from c1 on the three benchmark ports); the ipcache holds min(N, 2000) extra /32 identities.
//!   Loaded by `netpol-netns-loader` (release build), which exits before the measurements.
//! - **noop** (`--peers …,noop`): no filter, but a two-instruction SCHED_CLS program
//!   (`r0 = -1` (`TC_ACT_UNSPEC`); `exit`, loaded with raw bpf(2)) in a TCX link at each hook
//!   netpol uses: ingress (`from_container`'s) and egress (`to_container`'s) of both host-side
//!   veths. What any attached program costs before it does any work: the hook's own floor. The
//!   links are fds held by this process (closed with the setup, also on an error or Ctrl-C).
//! - **netpol-B N** (`--netpol-b-loader PATH`): netpol as another build of
//!   `netpol-netns-loader` loads it (its own embedded eBPF object; e.g. main's release binary
//!   copied to /tmp), same plan, own pin directory: an A/B of two datapath builds under real
//!   traffic in the same interleaved rounds; a line `netpol-B × netpol` follows the table.
//! - **iptables-nft N**: FORWARD jumps to a chain of N non-matching
//!   `-s A -d B -p tcp --dport P -j ACCEPT` rules, then the rules that match (c1 → c2 on the
//!   benchmark ports and the replies), then DROP; no conntrack shortcut.
//! - **nft set N**: an `inet` table whose forward chain (policy drop) accepts
//!   `ip saddr . ip daddr . tcp dport @allowed` and the replies (`ip daddr . ip saddr . tcp sport
//!   @allowed`), with the IPv6 twins on `@allowed6`; each set holds N elements that never match
//!   plus the benchmark ports. One hash lookup per packet: the strongest rule-based peer.
//!
//! Measurements: single-stream TCP throughput (`iperf3 -J`), request/response latency
//! (`sockperf ping-pong --tcp`, 64 bytes, p50 of RTT/2, with `/dev/cpu_dma_latency` held at 0 for
//! the whole run), new connections per second (`wrk -t1 -c32 -H 'Connection: close'` against
//! `netpol-bench-http`).
//!
//! The statistics pass after the rounds (`BPF_ENABLE_STATS`) reads ns per program run for
//! netpol, netpol-B and noop (noop's is the statistics' own overhead floor), and for the
//! connection-rate workload the program runs and program time per connection (wrk's completed
//! requests, one connection each).

#[allow(dead_code)]
#[path = "../../tests/src/netns.rs"]
pub(crate) mod netns;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs::File,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::stats::median;
use anyhow::{bail, ensure, Context, Result};
use netns::{
    tcp_connect, try_load_returning, try_tcx_link_first, unique_tag, wait_for, Connect,
    DatapathPlan, Family, KillOnDrop, PinDir, PlanPolicy, Topology, TCX_EGRESS, TCX_INGRESS,
};
use std::os::fd::{AsRawFd as _, OwnedFd};

const IPERF_PORT: u16 = 5201;
const SOCKPERF_PORT: u16 = 11111;
const HTTP_PORT: u16 = 8080;
pub(crate) const PORTS: [u16; 3] = [IPERF_PORT, SOCKPERF_PORT, HTTP_PORT];
const C1: u32 = 256;
const C2: u32 = 257;
const TCP: u8 = 6;

#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// Rounds per run; every configuration is measured once per round.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Consecutive runs on the same setups, each with its own table (the targets must hold in
    /// every one).
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 4)]
    pub seconds: u32,
    /// Policy entry / rule / set element counts.
    #[arg(long, value_delimiter = ',', default_value = "10,1000,10000,50000")]
    pub entries: Vec<usize>,
    /// Filters to compare with no filter (always measured): netpol, iptables, nft, noop (an
    /// empty TCX program at netpol's hooks).
    #[arg(long, value_delimiter = ',', default_value = "netpol,iptables,nft")]
    pub peers: Vec<Peer>,
    /// Also measure netpol as loaded by this other build of `netpol-netns-loader` ("netpol-B",
    /// at every entry count), interleaved with the rest: an A/B of two datapath builds.
    #[arg(long, value_name = "PATH")]
    pub netpol_b_loader: Option<PathBuf>,
    /// The entry count the targets are checked at (default: 10,000 if measured, else the
    /// largest).
    #[arg(long)]
    pub target_entries: Option<usize>,
    /// Skip the pass that reads the kernel's run-time statistics of the programs.
    #[arg(long)]
    pub no_stats: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Netpol,
    Iptables,
    Nft,
    Noop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Filter {
    None,
    Noop,
    Netpol(usize),
    NetpolB(usize),
    Nft(usize),
    Iptables(usize),
}

impl Filter {
    fn label(&self) -> String {
        match self {
            Filter::None => "none".into(),
            Filter::Noop => "noop program".into(),
            Filter::Netpol(n) => format!("netpol, {} entries", thousands(*n as f64)),
            Filter::NetpolB(n) => format!("netpol-B, {} entries", thousands(*n as f64)),
            Filter::Nft(n) => format!("nft set, {} elements", thousands(*n as f64)),
            Filter::Iptables(n) => format!("iptables-nft, {} rules", thousands(*n as f64)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Metric {
    Throughput,
    Latency,
    ConnRate,
}

const METRICS: [Metric; 3] = [Metric::Throughput, Metric::ConnRate, Metric::Latency];

/// One configuration: its topology, servers, (for netpol) pins and (for noop) programs and
/// links. Field order is drop order: servers go first, then the links, pins, the namespaces.
struct Setup {
    filter: Filter,
    _servers: Vec<KillOnDrop>,
    noop: Option<Noop>,
    pins: Option<PinDir>,
    topo: Topology,
}

/// The noop peer's programs and their TCX links (closing a link's fd detaches it; the links go
/// first).
struct Noop {
    _links: Vec<OwnedFd>,
    from: OwnedFd,
    to: OwnedFd,
}

/// Loads the noop programs and links them first at the hooks netpol attaches to
/// (`KernelDatapath::attach`: `from_container` at TCX ingress, `to_container` at TCX egress of
/// each container's host-side veth), inside the host namespace. On an error the links made so
/// far are closed.
fn attach_noop(topo: &Topology) -> Result<Noop> {
    let from = try_load_returning(-1, "noop_from").context("loading the noop program")?;
    let to = try_load_returning(-1, "noop_to").context("loading the noop program")?;
    let ifindexes: Vec<u32> = topo.containers.iter().map(|c| c.ifindex).collect();
    topo.host.run_in(move || {
        let mut links = Vec::new();
        for i in ifindexes {
            links.push(try_tcx_link_first(&from, i, TCX_INGRESS).context("TCX ingress link")?);
            links.push(try_tcx_link_first(&to, i, TCX_EGRESS).context("TCX egress link")?);
        }
        Ok(Noop {
            _links: links,
            from,
            to,
        })
    })
}

/// The id of the program behind `fd` (`BPF_OBJ_GET_INFO_BY_FD`, the first fields of
/// `bpf_prog_info`: type, id).
fn prog_id(fd: &OwnedFd) -> Result<u64> {
    let mut info = [0u32; 2];
    let mut attr = [0u8; 16];
    attr[0..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(std::mem::size_of_val(&info) as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    // SAFETY: a valid BPF_OBJ_GET_INFO_BY_FD attribute block; info outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 15, attr.as_ptr(), attr.len()) };
    ensure!(
        rc == 0,
        "BPF_OBJ_GET_INFO_BY_FD: {}",
        std::io::Error::last_os_error()
    );
    Ok(u64::from(info[1]))
}

pub(crate) fn thousands(v: f64) -> String {
    let s = format!("{:.0}", v);
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Builds the release helpers and the agent; returns the directory holding them. One cargo
/// invocation for all three (the datapath and flood benchmarks use the same one): building
/// the agent alone resolves other features, and the two builds would undo each other's
/// `netpol-agent` (its build script and the eBPF object) every time.
pub(crate) fn build_helpers() -> Result<PathBuf> {
    let root = workspace_root();
    eprintln!("building release helpers (netpol-netns-loader, netpol-bench-http, netpol-agent)…");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "-p",
            "netpol-tests",
            "--bin",
            "netpol-netns-loader",
            "--bin",
            "netpol-bench-http",
            "-p",
            "netpol-agent",
            "--bin",
            "netpol-agent",
        ])
        .status()
        .context("running cargo build")?;
    ensure!(status.success(), "building the release helpers failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release"))
}

pub(crate) fn need(tool: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    ensure!(
        found,
        "{tool} is not installed (scripts/setup.sh installs it)"
    );
    Ok(())
}

/// Removes namespaces left by an earlier run that was killed (their pid is gone).
/// Removes what an earlier run that was killed left behind (its pid is gone): namespaces
/// `npbench<pid>x…`, pin directories `/sys/fs/bpf/netpol-test-bench-npbench<pid>x…` and the flood
/// bench's agent directories `netpol-bench-flood-npbench<pid>x…` in the temp dir.
pub(crate) fn remove_stale() {
    let dead = |name: &str, prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.split('x').next())
            .is_some_and(|pid| !pid.is_empty() && !Path::new("/proc").join(pid).exists())
    };
    for e in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if dead(&name, "npbench") {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
    for (dir, prefix) in [
        (PathBuf::from("/sys/fs/bpf"), "netpol-test-bench-npbench"),
        (std::env::temp_dir(), "netpol-bench-flood-npbench"),
    ] {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead(&name, prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Catches SIGINT and SIGTERM so that a run stopped with Ctrl-C unwinds and removes what it
/// made (the measuring tools, which get the signal too, fail, and the loop checks
/// [`interrupted`]).
pub(crate) fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_interrupt as *const () as libc::sighandler_t) };
    }
}

pub(crate) fn interrupted() -> Result<()> {
    ensure!(
        !INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed),
        "interrupted"
    );
    Ok(())
}

/// Spawns `args` in `ns`, killed by the kernel if this process dies without cleaning up.
pub(crate) fn spawn_in(ns: &netns::Netns, args: &[&str]) -> Result<KillOnDrop> {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = ns.command(args[0]);
    cmd.args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    };
    let child = cmd
        .spawn()
        .with_context(|| format!("spawning {args:?} in {}", ns.name))?;
    Ok(KillOnDrop(child))
}

pub(crate) fn wait_listening(ns: &netns::Netns, port: u16) {
    let filter = format!("sport = :{port}");
    wait_for(
        &format!("a listener on port {port} in {}", ns.name),
        Duration::from_secs(10),
        || {
            let out = ns.command("ss").args(["-Hltn", &filter]).output().ok()?;
            (!out.stdout.is_empty()).then_some(())
        },
    );
}

pub(crate) fn netpol_plan(t: &Topology, n: usize) -> DatapathPlan {
    let c1 = t.container("c1");
    let c2 = t.container("c2");
    let mut p = DatapathPlan::default();
    p.container(c1, C1, true, true);
    p.container(c2, C2, true, true);
    p.ipcache.push((t.gateway(Family::V4), 32, 1));
    p.ipcache.push((t.gateway(Family::V6), 128, 1));
    for i in 0..n.min(2000) {
        let a = Ipv4Addr::new(10, 99, (i / 250) as u8, (i % 250 + 1) as u8);
        p.ipcache.push((IpAddr::V4(a), 32, 2000 + i as u32));
    }
    for (i, port) in PORTS.iter().enumerate() {
        p.policy
            .push(PlanPolicy::allow_out(C1, C2, TCP, *port, 1 + i as u32));
        p.policy
            .push(PlanPolicy::allow_in(C2, C1, TCP, *port, 4 + i as u32));
    }
    // Entries that never match: for c1, c2 and other identities, with identities nobody has.
    for i in 0..n {
        let local = match i % 3 {
            0 => C1,
            1 => C2,
            _ => 3000 + (i % 500) as u32,
        };
        let remote = 2000 + i as u32;
        let port = 1024 + (i % 60000) as u16;
        let e = if i % 2 == 0 {
            PlanPolicy::allow_in(local, remote, TCP, port, 100 + i as u32)
        } else {
            PlanPolicy::allow_out(local, remote, TCP, port, 100 + i as u32)
        };
        p.policy.push(e);
    }
    p
}

pub(crate) fn iptables_rules(t: &Topology, n: usize) -> String {
    let c1 = t.container("c1").ipv4;
    let c2 = t.container("c2").ipv4;
    let ports = PORTS.map(|p| p.to_string()).join(",");
    let mut s = String::from("*filter\n:FORWARD ACCEPT [0:0]\n:NETPOL-BENCH - [0:0]\n");
    s.push_str("-A FORWARD -j NETPOL-BENCH\n");
    for i in 0..n {
        let _ = writeln!(
            s,
            "-A NETPOL-BENCH -s 172.16.{}.{}/32 -d 172.17.{}.{}/32 -p tcp --dport {} -j ACCEPT",
            i / 250,
            i % 250 + 1,
            (i / 7) % 250,
            i % 7 + 1,
            1024 + i % 60000
        );
    }
    let _ = writeln!(
        s,
        "-A NETPOL-BENCH -s {c1}/32 -d {c2}/32 -p tcp -m multiport --dports {ports} -j ACCEPT"
    );
    let _ = writeln!(
        s,
        "-A NETPOL-BENCH -s {c2}/32 -d {c1}/32 -p tcp -m multiport --sports {ports} -j ACCEPT"
    );
    s.push_str("-A NETPOL-BENCH -j DROP\nCOMMIT\n");
    s
}

/// The nftables peer: one `inet` table, the forward chain accepting what the sets hold (and the
/// replies, by swapping the fields), dropping the rest.
fn nft_rules(t: &Topology, n: usize) -> String {
    let c1 = t.container("c1");
    let c2 = t.container("c2");
    let mut v4 = Vec::with_capacity(n + PORTS.len());
    let mut v6 = Vec::with_capacity(n + PORTS.len());
    for i in 0..n {
        let port = 1024 + i % 60000;
        v4.push(format!(
            "172.16.{}.{} . 172.17.{}.{} . {port}",
            i / 250,
            i % 250 + 1,
            (i / 7) % 250,
            i % 7 + 1
        ));
        v6.push(format!(
            "fd16::{:x} . fd17::{:x} . {port}",
            i + 1,
            i % 7 + 1
        ));
    }
    for p in PORTS {
        v4.push(format!("{} . {} . {p}", c1.ipv4, c2.ipv4));
        v6.push(format!("{} . {} . {p}", c1.ipv6, c2.ipv6));
    }
    format!(
        "table inet netpol_bench {{\n\
         \tset allowed {{ type ipv4_addr . ipv4_addr . inet_service; elements = {{ {} }} }}\n\
         \tset allowed6 {{ type ipv6_addr . ipv6_addr . inet_service; elements = {{ {} }} }}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority 0; policy drop;\n\
         \t\tip saddr . ip daddr . tcp dport @allowed accept\n\
         \t\tip daddr . ip saddr . tcp sport @allowed accept\n\
         \t\tip6 saddr . ip6 daddr . tcp dport @allowed6 accept\n\
         \t\tip6 daddr . ip6 saddr . tcp sport @allowed6 accept\n\
         \t}}\n\
         }}\n",
        v4.join(", "),
        v6.join(", ")
    )
}

/// Feeds `input` to `args` (run in `ns`) on stdin.
pub(crate) fn pipe_in(ns: &netns::Netns, args: &[&str], input: &str) -> Result<()> {
    let mut child = ns
        .command(args[0])
        .args(&args[1..])
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {args:?}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    ensure!(child.wait()?.success(), "{args:?} failed");
    Ok(())
}

/// Starts iperf3, sockperf and the HTTP server in `c2`, bound to its IPv4 address, and waits
/// for them to listen.
pub(crate) fn start_servers(
    c2: &netns::Container,
    bin: &Path,
    cpu: Option<usize>,
) -> Result<Vec<KillOnDrop>> {
    let c2ip = c2.ipv4.to_string();
    let http = format!("{c2ip}:{HTTP_PORT}");
    let http_bin = bin.join("netpol-bench-http");
    let cpu = cpu.map(|c| c.to_string());
    let spawn_in = |ns: &netns::Netns, args: &[&str]| match &cpu {
        Some(c) => {
            let mut full = vec!["taskset", "-c", c.as_str()];
            full.extend_from_slice(args);
            spawn_in(ns, &full)
        }
        None => spawn_in(ns, args),
    };
    let servers = vec![
        spawn_in(&c2.ns, &["iperf3", "-s", "-B", &c2ip, "-p", "5201"])?,
        spawn_in(
            &c2.ns,
            &["sockperf", "server", "--tcp", "-i", &c2ip, "-p", "11111"],
        )?,
        spawn_in(&c2.ns, &[http_bin.to_str().unwrap_or_default(), &http, "2"])?,
    ];
    for port in PORTS {
        wait_listening(&c2.ns, port);
    }
    Ok(servers)
}

/// Sets up `filter`'s topology; `loader_b` is netpol-B's `netpol-netns-loader`.
fn setup(filter: Filter, bin: &Path, loader_b: Option<&Path>) -> Result<Setup> {
    let tag = unique_tag("npbench");
    let topo = Topology::new(&tag, &["c1", "c2"]);
    topo.host
        .run(&["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"]);
    let c1 = topo.container("c1").clone();
    let c2 = topo.container("c2").clone();
    c1.ns
        .run(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"]);
    c2.ns.run(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"]);
    let servers = start_servers(&c2, bin, None)?;
    let mut pins = None;
    let mut noop = None;
    match filter {
        Filter::None => {}
        Filter::Noop => noop = Some(attach_noop(&topo)?),
        Filter::Netpol(n) | Filter::NetpolB(n) => {
            let loader = match filter {
                Filter::NetpolB(_) => loader_b
                    .context("netpol-B needs --netpol-b-loader")?
                    .to_path_buf(),
                _ => bin.join("netpol-netns-loader"),
            };
            let p = PinDir::unique(&format!("bench-{tag}"));
            let plan = std::env::temp_dir().join(format!("{tag}.plan"));
            std::fs::write(&plan, netpol_plan(&topo, n).to_text())?;
            let out = Command::new(&loader)
                .arg(p.path())
                .arg(&topo.host.name)
                .arg(&plan)
                .output()
                .with_context(|| format!("running {}", loader.display()))?;
            let _ = std::fs::remove_file(&plan);
            pins = Some(p);
            ensure!(
                out.status.success(),
                "{}: {}",
                loader.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Filter::Iptables(n) => {
            pipe_in(
                &topo.host,
                &["iptables-nft-restore"],
                &iptables_rules(&topo, n),
            )?;
        }
        Filter::Nft(n) => pipe_in(&topo.host, &["nft", "-f", "-"], &nft_rules(&topo, n))?,
    }
    // The filter is in the path: a port nobody allows is dropped (refused with no filter).
    let probe = SocketAddr::new(IpAddr::V4(c2.ipv4), 9);
    let r = tcp_connect(&c1.ns, probe, Duration::from_millis(300));
    let expect = if matches!(filter, Filter::None | Filter::Noop) {
        Connect::Refused
    } else {
        Connect::TimedOut
    };
    ensure!(
        r == expect,
        "{}: c1 -> c2:9 gave {r:?}, expected {expect:?}",
        filter.label()
    );
    Ok(Setup {
        filter,
        _servers: servers,
        noop,
        pins,
        topo,
    })
}

pub(crate) fn output_in(ns: &netns::Netns, args: &[&str]) -> Result<String> {
    let out = ns
        .command(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{args:?} failed ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// The number after `"key":` following `after` in iperf3's JSON.
pub(crate) fn json_number_after(json: &str, after: &str, key: &str) -> Option<f64> {
    let rest = &json[json.find(after)?..];
    let rest = &rest[rest.find(&format!("\"{key}\""))? + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn measure(s: &Setup, m: Metric, secs: u32) -> Result<f64> {
    measure_pair(&s.topo, &s.filter.label(), m, secs, None)
}

/// One measurement from `c1` to the servers in `c2` ([`start_servers`]); `cpu` pins the client
/// to one CPU (`taskset`).
pub(crate) fn measure_pair(
    topo: &Topology,
    label: &str,
    m: Metric,
    secs: u32,
    cpu: Option<usize>,
) -> Result<f64> {
    Ok(measure_counted(topo, label, m, secs, cpu)?.0)
}

/// [`measure_pair`], with the number of requests wrk completed for [`Metric::ConnRate`] (one
/// connection each).
fn measure_counted(
    topo: &Topology,
    label: &str,
    m: Metric,
    secs: u32,
    cpu: Option<usize>,
) -> Result<(f64, Option<f64>)> {
    let c1 = &topo.container("c1").ns;
    let c2ip = topo.container("c2").ipv4.to_string();
    let cpu = cpu.map(|c| c.to_string());
    let output_in = |ns: &netns::Netns, args: &[&str]| match &cpu {
        Some(c) => {
            let mut full = vec!["taskset", "-c", c.as_str()];
            full.extend_from_slice(args);
            output_in(ns, &full)
        }
        None => output_in(ns, args),
    };
    let t = secs.to_string();
    match m {
        Metric::Throughput => {
            let json = output_in(c1, &["iperf3", "-c", &c2ip, "-p", "5201", "-t", &t, "-J"])?;
            let bps = json_number_after(&json, "\"sum_received\"", "bits_per_second")
                .with_context(|| format!("no sum_received in iperf3 output: {json}"))?;
            Ok((bps / 1e9, None))
        }
        Metric::Latency => {
            let out = output_in(
                c1,
                &[
                    "sockperf",
                    "ping-pong",
                    "--tcp",
                    "-i",
                    &c2ip,
                    "-p",
                    "11111",
                    "--msg-size",
                    "64",
                    "-t",
                    &t,
                ],
            )?;
            let p50 = out
                .lines()
                .find_map(|l| {
                    l.split_once("percentile 50.000 =")
                        .and_then(|(_, v)| v.trim().parse::<f64>().ok())
                })
                .with_context(|| format!("no p50 in sockperf output: {out}"))?;
            Ok((p50, None))
        }
        Metric::ConnRate => {
            let url = format!("http://{c2ip}:{HTTP_PORT}/");
            let d = format!("{secs}s");
            let out = output_in(
                c1,
                &[
                    "wrk",
                    "-t1",
                    "-c32",
                    "-d",
                    &d,
                    "-H",
                    "Connection: close",
                    &url,
                ],
            )?;
            if let Some(l) = out.lines().find(|l| l.contains("Socket errors")) {
                eprintln!("  {label}: wrk {}", l.trim());
            }
            let rate = out
                .lines()
                .find_map(|l| {
                    l.strip_prefix("Requests/sec:")
                        .and_then(|v| v.trim().parse::<f64>().ok())
                })
                .with_context(|| format!("no Requests/sec in wrk output: {out}"))?;
            // "  123456 requests in 4.00s, 9.87MB read"
            let count = out.lines().find_map(|l| {
                let (n, _) = l.trim().split_once(" requests in ")?;
                n.parse::<f64>().ok()
            });
            Ok((rate, count))
        }
    }
}

/// Holds `/dev/cpu_dma_latency` at 0 while open: idle CPUs poll instead of sleeping, so latency
/// measures the datapath, not wake-ups.
pub(crate) fn hold_dma_latency() -> Option<File> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/cpu_dma_latency")
        .map_err(|e| eprintln!("warning: /dev/cpu_dma_latency: {e}; latency will be noisy"))
        .ok()?;
    f.write_all(&0i32.to_ne_bytes())
        .map_err(|e| eprintln!("warning: writing /dev/cpu_dma_latency: {e}"))
        .ok()?;
    Some(f)
}

pub fn run(o: Opts) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the benchmark needs root (namespaces, BPF)"
    );
    let mut tools = vec!["ip", "iperf3", "sockperf", "wrk", "ss"];
    if o.peers.contains(&Peer::Iptables) {
        tools.push("iptables-nft-restore");
    }
    if o.peers.contains(&Peer::Nft) {
        tools.push("nft");
    }
    let loader_b = match &o.netpol_b_loader {
        Some(p) => Some(
            std::fs::canonicalize(p)
                .with_context(|| format!("--netpol-b-loader {}", p.display()))?,
        ),
        None => None,
    };
    if !o.no_stats
        && (o.peers.contains(&Peer::Netpol) || o.peers.contains(&Peer::Noop) || loader_b.is_some())
    {
        tools.push("bpftool");
    }
    for tool in tools {
        need(tool)?;
    }
    ensure!(
        o.rounds > 0 && o.seconds > 0 && o.runs > 0,
        "rounds, runs and seconds must be positive"
    );
    remove_stale();
    let bin = build_helpers()?;
    catch_interrupts();

    let mut filters = vec![Filter::None];
    if o.peers.contains(&Peer::Noop) {
        filters.push(Filter::Noop);
    }
    for (wanted, make) in [
        (
            o.peers.contains(&Peer::Netpol),
            Filter::Netpol as fn(usize) -> Filter,
        ),
        (loader_b.is_some(), Filter::NetpolB),
        (o.peers.contains(&Peer::Nft), Filter::Nft),
        (o.peers.contains(&Peer::Iptables), Filter::Iptables),
    ] {
        if wanted {
            filters.extend(o.entries.iter().map(|n| make(*n)));
        }
    }
    if let Some(b) = &loader_b {
        eprintln!(
            "netpol: {}; netpol-B: {}",
            bin.join("netpol-netns-loader").display(),
            b.display()
        );
    }
    let target_n = o.target_entries.unwrap_or_else(|| {
        if o.entries.contains(&10_000) {
            10_000
        } else {
            o.entries.iter().copied().max().unwrap_or(0)
        }
    });
    let started = Instant::now();
    let mut setups = Vec::new();
    for f in &filters {
        interrupted()?;
        let t0 = Instant::now();
        setups.push(setup(*f, &bin, loader_b.as_deref())?);
        eprintln!(
            "set up: {} ({:.1} s)",
            f.label(),
            t0.elapsed().as_secs_f64()
        );
    }
    let dma = hold_dma_latency();

    let mut verdicts = Vec::new();
    let mut last = BTreeMap::new();
    for run in 0..o.runs {
        let mut results: BTreeMap<(Filter, Metric), Vec<f64>> = BTreeMap::new();
        let run_started = Instant::now();
        for round in 0..o.rounds {
            for m in METRICS {
                for k in 0..setups.len() {
                    interrupted()?;
                    let s = &setups[(k + round) % setups.len()];
                    let v = measure(s, m, o.seconds)
                        .with_context(|| format!("{} {m:?}", s.filter.label()))?;
                    eprintln!(
                        "run {}/{} round {}/{} {:<28} {m:?}: {v:.2}",
                        run + 1,
                        o.runs,
                        round + 1,
                        o.rounds,
                        s.filter.label()
                    );
                    results.entry((s.filter, m)).or_default().push(v);
                }
            }
        }
        let med: BTreeMap<(Filter, Metric), f64> = results
            .into_iter()
            .map(|(k, mut v)| (k, median(&mut v)))
            .collect();
        println!(
            "\nnetpol datapath benchmark, run {}/{}: {} rounds × {} s, medians; (×) = ratio to \
             no filter (latency: higher is worse). {} s.\n",
            run + 1,
            o.runs,
            o.rounds,
            o.seconds,
            run_started.elapsed().as_secs()
        );
        println!("{}", table(&filters, &med));
        if let Some(b) = &loader_b {
            println!("netpol-B = {}", b.display());
            for n in &o.entries {
                let r = ratios(&med, Filter::NetpolB(*n), Filter::Netpol(*n));
                println!(
                    "netpol-B × netpol at {} entries: throughput {:.2}, conn/s {:.2}, RR {:.2}",
                    thousands(*n as f64),
                    r[0],
                    r[1],
                    r[2]
                );
            }
        }
        if o.peers.contains(&Peer::Netpol) {
            let v = targets(&med, target_n, &o.peers);
            println!("{}", v.line());
            verdicts.push(v);
        }
        last = med;
    }
    drop(dma);
    if !o.no_stats {
        match program_costs(&setups, o.seconds) {
            Ok(c) if !c.is_empty() => print_costs(&c, &last),
            Ok(_) => {}
            Err(e) => eprintln!("warning: program cost pass failed: {e:#}"),
        }
    }
    drop(setups);
    if o.runs > 1 {
        println!(
            "\ntargets at {} entries, every run:",
            thousands(target_n as f64)
        );
        for (i, v) in verdicts.iter().enumerate() {
            println!("  run {}: {}", i + 1, v.line());
        }
    }
    eprintln!("took {} s", started.elapsed().as_secs());
    Ok(())
}

fn table(filters: &[Filter], med: &BTreeMap<(Filter, Metric), f64>) -> String {
    let get = |f: Filter, m: Metric| med.get(&(f, m)).copied().unwrap_or(f64::NAN);
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| filter | TCP Gbit/s (× none) | new conn/s (× none) | TCP RR p50 µs (× none) |"
    );
    let _ = writeln!(table, "|---|---|---|---|");
    let (tp0, cr0, lat0) = (
        get(Filter::None, Metric::Throughput),
        get(Filter::None, Metric::ConnRate),
        get(Filter::None, Metric::Latency),
    );
    for f in filters {
        let (tp, cr, lat) = (
            get(*f, Metric::Throughput),
            get(*f, Metric::ConnRate),
            get(*f, Metric::Latency),
        );
        if *f == Filter::None {
            let _ = writeln!(table, "| none | {tp:.2} | {} | {lat:.1} |", thousands(cr));
        } else {
            let _ = writeln!(
                table,
                "| {} | {tp:.2} ({:.2}) | {} ({:.2}) | {lat:.1} ({:.2}) |",
                f.label(),
                tp / tp0,
                thousands(cr),
                cr / cr0,
                lat / lat0
            );
        }
    }
    table
}

/// The targets at one entry count: netpol ≥ 0.95 × no filter (throughput, conn/s, and
/// request/response rate, i.e. none's latency / netpol's), ≥ the nft set on all three, ≥ 10 ×
/// iptables-nft in conn/s. `None` where a peer was not measured.
struct Verdict {
    n: usize,
    /// netpol / none: throughput, conn/s, RR rate.
    vs_none: [f64; 3],
    vs_nft: Option<[f64; 3]>,
    conn_vs_iptables: Option<f64>,
}

impl Verdict {
    fn met(&self) -> bool {
        self.vs_none.iter().all(|r| *r >= 0.95)
            && self.vs_nft.is_none_or(|r| r.iter().all(|r| *r >= 1.0))
            && self.conn_vs_iptables.is_none_or(|r| r >= 10.0)
    }

    fn line(&self) -> String {
        let f = |r: [f64; 3]| format!("throughput {:.2}, conn/s {:.2}, RR {:.2}", r[0], r[1], r[2]);
        let mut s = format!(
            "targets at {} entries: × none (≥ 0.95) {}",
            thousands(self.n as f64),
            f(self.vs_none)
        );
        if let Some(r) = self.vs_nft {
            let _ = write!(s, "; × nft set (≥ 1.00) {}", f(r));
        }
        if let Some(r) = self.conn_vs_iptables {
            let _ = write!(s, "; conn/s × iptables-nft (≥ 10) {r:.1}");
        }
        let _ = write!(s, ": {}", if self.met() { "met" } else { "NOT MET" });
        s
    }
}

/// `a` / `b` in throughput, conn/s and request/response rate. Higher is better in all three:
/// latency enters as its inverse (the request rate).
fn ratios(med: &BTreeMap<(Filter, Metric), f64>, a: Filter, b: Filter) -> [f64; 3] {
    let get = |f: Filter, m: Metric| med.get(&(f, m)).copied().unwrap_or(f64::NAN);
    [
        get(a, Metric::Throughput) / get(b, Metric::Throughput),
        get(a, Metric::ConnRate) / get(b, Metric::ConnRate),
        get(b, Metric::Latency) / get(a, Metric::Latency),
    ]
}

fn targets(med: &BTreeMap<(Filter, Metric), f64>, n: usize, peers: &[Peer]) -> Verdict {
    let get = |f: Filter, m: Metric| med.get(&(f, m)).copied().unwrap_or(f64::NAN);
    let ratios = |a: Filter, b: Filter| ratios(med, a, b);
    let np = Filter::Netpol(n);
    Verdict {
        n,
        vs_none: ratios(np, Filter::None),
        vs_nft: peers
            .contains(&Peer::Nft)
            .then(|| ratios(np, Filter::Nft(n))),
        conn_vs_iptables: peers
            .contains(&Peer::Iptables)
            .then(|| get(np, Metric::ConnRate) / get(Filter::Iptables(n), Metric::ConnRate)),
    }
}

fn print_costs(c: &[Cost], med: &BTreeMap<(Filter, Metric), f64>) {
    println!(
        "\nprogram cost per run (the kernel's BPF run-time statistics, run_time_ns / run_cnt, in a \
         separate pass after the rounds; the statistics add ~20-40 ns per run themselves: noop's \
         figure, two instructions, is that floor). Each request/response crosses 4 program runs \
         (c1 from, c2 to, c2 from, c1 to); noop's from / to are its programs at the same hooks \
         (TCX ingress / egress of the host-side veths). For ConnRate, runs and program time (from \
         + to) per connection: wrk's completed requests, one connection each.\n"
    );
    println!(
        "| filter | workload | from_container ns/run | to_container ns/run | runs | runs / \
         connection | program µs / connection |"
    );
    println!("|---|---|---|---|---|---|---|");
    for c in c.iter().filter(|c| c.filter != Filter::None) {
        let (per_conn, us_conn) = match c.conns {
            Some(n) if c.metric == Metric::ConnRate && n > 0.0 => (
                format!("{:.1}", c.runs as f64 / n),
                format!("{:.2}", c.prog_ns / n / 1e3),
            ),
            _ => (String::new(), String::new()),
        };
        println!(
            "| {} | {:?} | {:.0} | {:.0} | {} | {per_conn} | {us_conn} |",
            c.filter.label(),
            c.metric,
            c.from,
            c.to,
            thousands(c.runs as f64)
        );
    }
    // The budget: none's wall time per connection in the rounds, what each filter's rate adds
    // to it, against its program time per connection; and the CPUs' busy time per connection
    // in the statistics pass.
    let rate = |f: Filter| med.get(&(f, Metric::ConnRate)).copied();
    let cpu_per_conn = |f: Filter| {
        c.iter()
            .find(|c| c.filter == f && c.metric == Metric::ConnRate)
            .and_then(|c| c.conns.filter(|n| *n > 0.0).map(|n| c.cpu_ns / n / 1e3))
    };
    if let Some(r0) = rate(Filter::None) {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!(
            "\nper connection (ConnRate, the last run's medians): none {:.1} µs of wall time \
             ({cpus} CPUs: at most {:.1} µs of CPU)",
            1e6 / r0,
            cpus as f64 * 1e6 / r0
        );
        let cpu0 = cpu_per_conn(Filter::None);
        if let Some(cpu0) = cpu0 {
            println!(
                "CPU busy time per connection in the statistics pass (all CPUs, everything that \
                 ran, / wrk's connections; only meaningful on a quiet machine, and equal to the \
                 CPUs × wall time when the CPUs are saturated): none {cpu0:.1} µs"
            );
        }
        for c in c
            .iter()
            .filter(|c| c.metric == Metric::ConnRate && c.filter != Filter::None)
        {
            let (Some(r), Some(n)) = (rate(c.filter), c.conns) else {
                continue;
            };
            if n <= 0.0 {
                continue;
            }
            let cpu = match (cpu_per_conn(c.filter), cpu0) {
                (Some(a), Some(b)) => {
                    format!("; CPU busy {a:.1} µs per connection ({:+.1})", a - b)
                }
                _ => String::new(),
            };
            println!(
                "  {}: {:.2} × none, {:+.1} µs of wall time per connection (× {cpus} CPUs: \
                 {:+.1} µs); program time {:.2} µs per connection ({:.1} runs){cpu}",
                c.filter.label(),
                r / r0,
                1e6 / r - 1e6 / r0,
                cpus as f64 * (1e6 / r - 1e6 / r0),
                c.prog_ns / n / 1e3,
                c.runs as f64 / n
            );
        }
    }
    println!();
}

/// `bpf(BPF_ENABLE_STATS, BPF_STATS_RUN_TIME)`: run-time statistics on while the fd is open.
fn enable_bpf_stats() -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    const BPF_ENABLE_STATS: libc::c_long = 32;
    let attr = [0u32; 2]; // enable_stats.type = BPF_STATS_RUN_TIME (0)
                          // SAFETY: attr is a valid, zero-padded bpf_attr prefix of the given size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            std::mem::size_of_val(&attr) as libc::c_uint,
        )
    };
    ensure!(
        fd >= 0,
        "BPF_ENABLE_STATS: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

fn bpftool_json(args: &[&str]) -> Result<String> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("running bpftool")?;
    ensure!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Program ids at the from_container hooks, at the to_container hooks.
type HookProgs = (Vec<u64>, Vec<u64>);

/// The program ids behind a setup's hooks, (from_container side, to_container side): netpol's
/// from its pinned `links/*_from` / `*_to` (both veths run the same program: each id once),
/// noop's from its fds. `None` for the other filters.
fn stat_progs(s: &Setup) -> Result<Option<HookProgs>> {
    if let Some(noop) = &s.noop {
        return Ok(Some((vec![prog_id(&noop.from)?], vec![prog_id(&noop.to)?])));
    }
    let Some(pins) = &s.pins else {
        return Ok(None);
    };
    let (mut from, mut to) = (Vec::new(), Vec::new());
    for e in std::fs::read_dir(pins.path().join("links"))?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let side = if name.ends_with("_from") {
            &mut from
        } else if name.ends_with("_to") {
            &mut to
        } else {
            continue;
        };
        let path = e.path();
        let link = bpftool_json(&["link", "show", "pinned", path.to_str().unwrap_or_default()])?;
        let id = json_number_after(&link, "{", "prog_id").context("no prog_id")? as u64;
        if !side.contains(&id) {
            side.push(id);
        }
    }
    ensure!(
        !from.is_empty() && !to.is_empty(),
        "{}: no pinned links",
        s.filter.label()
    );
    Ok(Some((from, to)))
}

/// (run_time_ns, run_cnt) summed over the programs `ids`.
fn prog_stats(ids: &[u64]) -> Result<(f64, f64)> {
    let (mut ns, mut cnt) = (0.0, 0.0);
    for id in ids {
        let prog = bpftool_json(&["prog", "show", "id", &id.to_string()])?;
        ns += json_number_after(&prog, "{", "run_time_ns").unwrap_or(0.0);
        cnt += json_number_after(&prog, "{", "run_cnt").unwrap_or(0.0);
    }
    Ok((ns, cnt))
}

/// One setup's program cost in one workload of the statistics pass.
struct Cost {
    filter: Filter,
    metric: Metric,
    /// ns per run of the from_container / to_container side.
    from: f64,
    to: f64,
    /// Runs of both sides.
    runs: u64,
    /// Run time of both sides, ns.
    prog_ns: f64,
    /// Busy time of all CPUs during the measurement (/proc/stat: everything that ran), ns.
    cpu_ns: f64,
    /// Connections wrk completed (ConnRate).
    conns: Option<f64>,
}

/// The time all CPUs have spent not idle (user, nice, system, irq, softirq, steal) since boot,
/// ns, from /proc/stat.
fn cpu_busy_ns() -> Result<f64> {
    // [user + nice, system, irq + softirq, idle + iowait, steal] of each CPU.
    let ticks: u64 = crate::process::cpu_times()?
        .iter()
        .map(|c| c[0] + c[1] + c[2] + c[4])
        .sum();
    Ok(ticks as f64 * 1e9 / crate::process::ticks_per_second())
}

/// Average run time of the programs at the from_container and to_container hooks per packet,
/// per netpol, netpol-B and noop setup and workload.
fn program_costs(setups: &[Setup], secs: u32) -> Result<Vec<Cost>> {
    let mut out = Vec::new();
    // No filter is measured too (connections only), for its CPU time per connection.
    let progs: Vec<(&Setup, Option<HookProgs>)> = setups
        .iter()
        .filter_map(|s| match stat_progs(s) {
            Ok(None) if s.filter != Filter::None => None,
            r => Some(r.map(|p| (s, p))),
        })
        .collect::<Result<_>>()?;
    if progs.iter().all(|(_, p)| p.is_none()) {
        return Ok(out);
    }
    let _stats = enable_bpf_stats()?;
    for (s, ids) in progs {
        let (from_ids, to_ids) = ids.unwrap_or_default();
        for m in [Metric::Latency, Metric::ConnRate, Metric::Throughput] {
            if s.filter == Filter::None && m != Metric::ConnRate {
                continue;
            }
            interrupted()?;
            let f0 = prog_stats(&from_ids)?;
            let t0 = prog_stats(&to_ids)?;
            let busy0 = cpu_busy_ns()?;
            let (_, conns) = measure_counted(&s.topo, &s.filter.label(), m, secs, None)?;
            let busy1 = cpu_busy_ns()?;
            let f1 = prog_stats(&from_ids)?;
            let t1 = prog_stats(&to_ids)?;
            let per = |a: (f64, f64), b: (f64, f64)| {
                if b.1 > a.1 {
                    (b.0 - a.0) / (b.1 - a.1)
                } else {
                    f64::NAN
                }
            };
            let runs = (f1.1 - f0.1 + t1.1 - t0.1) as u64;
            if runs == 0 && s.filter != Filter::None {
                eprintln!(
                    "warning: {}: no program run during {m:?}: not attached?",
                    s.filter.label()
                );
            }
            out.push(Cost {
                filter: s.filter,
                metric: m,
                from: per(f0, f1),
                to: per(t0, t1),
                runs,
                prog_ns: f1.0 - f0.0 + t1.0 - t0.0,
                cpu_ns: busy1 - busy0,
                conns,
            });
        }
    }
    Ok(out)
}
