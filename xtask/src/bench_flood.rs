//! `cargo xtask bench flood`: does a flood at one container leave the others alone?
//!
//! The topology of `bench datapath` (tests/src/netns.rs: a namespace playing the host with a
//! bridge) with three containers, `c1`, `c2` and `victim`, and a namespace outside the bridge
//! (`out`, 192.0.2.2) routed through the host, as a client on the uplink is. `victim` is
//! deny-all; `c1` → `c2` is allowed on the benchmark ports. One configuration per protector, set
//! up once:
//!
//! - **none**, the control: no filter at all; the flood reaches `victim`, whose kernel answers
//!   the SYNs with RSTs (the UDP with rate-limited port unreachables). What the pair loses here
//!   is the platform's cost of a flood, not a protector's.
//! - **netpol**: the programs loaded by `netpol-netns-loader` (all three enforce both
//!   directions), then the real agent (release build), started inside the host namespace on the
//!   same pin directory: it adopts the pinned maps and programs and reads their drop events.
//!   Its Docker socket points at nothing, so it never reconciles (README: until Docker answers
//!   once, the maps stay as the previous agent left them) — the flood, the events and the
//!   control socket are real, the containers are namespaces.
//! - **iptables**: iptables-nft in the host namespace's FORWARD: accept `c1` ↔ `c2` on the
//!   benchmark ports, drop everything else (so `victim` is dropped there).
//!
//! Each round measures the `c1` → `c2` pair (single-stream TCP, new connections per second,
//! request/response latency: as `bench datapath`) without a flood, during a SYN flood and during a
//! UDP flood at `victim`, per protector, and reports medians and ratios to no flood. The flood is
//! one thread in `out` sending prebuilt frames on an `AF_PACKET` socket (`sendmmsg`, a new
//! source port in every packet) as fast as it can; the kernel forwards and drops each frame on
//! the sending CPU. On a 2-CPU machine the flood gets CPU 1 and the pair (clients and servers,
//! so also their softirq work) CPU 0, with and without the flood (`--no-pin` lets the scheduler
//! choose); the agent is not pinned, so the work it does for the flood's drop events competes
//! with the pair. During the netpol floods a thread asks the agent for `status` every 50 ms
//! (timeout 1 s) and the agent's CPU time and RSS are sampled.
//!
//! Where the time goes, per throughput measurement: each CPU's split from `/proc/stat`, `NET_RX`
//! softirqs per CPU, how long the iperf3 server (pinned with the pair) ran and waited runnable
//! for its CPU (`/proc/PID/schedstat`), and the host namespace's conntrack entries (the most
//! while it ran, and how many go to `victim` at its end). The host namespace tracks nothing
//! unless a rule needs conntrack; `--host-conntrack` adds Docker's MASQUERADE rule so it does, as
//! on a Docker host. `--perf DIR` records CPU 0 with `perf` during each throughput measurement.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::BufRead,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use netpol_agent::daemon::api::{self, Request};

use crate::bench_datapath::{
    self as dp,
    netns::{self, unique_tag, KillOnDrop, PinDir, Topology},
    Metric,
};
use crate::process::{cpu_ticks, rss_kib, ticks_per_second};
use crate::stats::{median, percentile};

#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// Rounds; every protector and flood is measured once per round.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 4)]
    pub seconds: u32,
    /// Protectors: none (the control: no filter, the flood reaches the victim's closed port),
    /// netpol, iptables.
    #[arg(long, value_delimiter = ',', default_value = "none,netpol,iptables")]
    pub protect: Vec<Protect>,
    /// Conntrack active in the host namespace, as on a Docker host (a MASQUERADE rule for the
    /// bridge's subnet in `nat` POSTROUTING, as Docker installs it). Without it the host
    /// namespace has no netfilter rule that needs conntrack, so it tracks nothing.
    #[arg(long)]
    pub host_conntrack: bool,
    /// Record CPU 0 with `perf record -C 0 -g` during every throughput measurement into this
    /// directory (`<protector>-<flood>-r<round>.data`; read with `perf report -i FILE --sort comm,sym`).
    #[arg(long)]
    pub perf: Option<PathBuf>,
    /// Let the scheduler place the flood and the pair (default: flood on CPU 1, pair on CPU 0).
    #[arg(long)]
    pub no_pin: bool,
}

/// Conntrack entries whose original direction goes to `dst` (the first `dst=` of a line), in a
/// `/proc/net/nf_conntrack` listing.
fn entries_to(listing: &str, dst: Ipv4Addr) -> u64 {
    let want = format!("dst={dst}");
    listing
        .lines()
        .filter(|l| l.split_whitespace().find(|w| w.starts_with("dst=")) == Some(want.as_str()))
        .count() as u64
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protect {
    None,
    Netpol,
    Iptables,
}

impl Protect {
    fn label(self) -> &'static str {
        match self {
            Protect::None => "none (control)",
            Protect::Netpol => "netpol",
            Protect::Iptables => "iptables",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Flood {
    None,
    Syn,
    Udp,
}

impl Flood {
    fn label(self) -> &'static str {
        match self {
            Flood::None => "no flood",
            Flood::Syn => "SYN flood",
            Flood::Udp => "UDP flood",
        }
    }
}

const FLOOD_CPU: usize = 1;
const PAIR_CPU: usize = 0;
const VICTIM_PORT: u16 = 80;
const METRICS: [Metric; 3] = [Metric::Throughput, Metric::ConnRate, Metric::Latency];

/// The running agent; killed (by pid) before the pins go.
struct AgentProc {
    proc: KillOnDrop,
    socket: PathBuf,
    work: PathBuf,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.proc.0.kill();
        let _ = self.proc.0.wait();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// One protector's world. Field order is drop order: servers, agent, pins, namespaces.
struct Setup {
    protect: Protect,
    servers: Vec<KillOnDrop>,
    agent: Option<AgentProc>,
    _pins: Option<PinDir>,
    out: netns::Netns,
    topo: Topology,
}

fn mac_of(ns: &netns::Netns, ifname: &str) -> Result<[u8; 6]> {
    let j = dp::output_in(ns, &["ip", "-j", "link", "show", ifname])?;
    let a = j
        .split("\"address\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .with_context(|| format!("no MAC address of {ifname} in {}", ns.name))?;
    let parts: Vec<&str> = a.split(':').collect();
    ensure!(parts.len() == 6, "bad MAC address {a}");
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16)?;
    }
    Ok(mac)
}

fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet + IPv4 + TCP SYN (or UDP with 18 bytes) frame from `src` to `dst:VICTIM_PORT`,
/// source port `sport`, checksums filled in.
fn frame(
    kind: Flood,
    macs: ([u8; 6], [u8; 6]),
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
) -> Vec<u8> {
    let (proto, l4len) = match kind {
        Flood::Udp => (17u8, 8 + 18),
        _ => (6u8, 20),
    };
    let mut f = Vec::with_capacity(14 + 20 + l4len);
    f.extend_from_slice(&macs.1);
    f.extend_from_slice(&macs.0);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + l4len) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&sport.to_be_bytes()); // identification
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut l4 = vec![0u8; l4len];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&VICTIM_PORT.to_be_bytes());
    if proto == 6 {
        l4[4..8].copy_from_slice(&(u32::from(sport) * 7919).to_be_bytes()); // sequence
        l4[12] = 5 << 4; // data offset
        l4[13] = 0x02; // SYN
        l4[14..16].copy_from_slice(&64240u16.to_be_bytes());
    } else {
        l4[4..6].copy_from_slice(&(l4len as u16).to_be_bytes());
        l4[8..].copy_from_slice(b"netpol-bench-flood");
    }
    let mut pseudo = 0u32;
    for w in [src.octets(), dst.octets()] {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
        pseudo += u32::from(u16::from_be_bytes([w[2], w[3]]));
    }
    pseudo += u32::from(proto) + l4len as u32;
    let c = checksum(&l4, pseudo);
    let at = if proto == 6 { 16 } else { 6 };
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&l4);
    f
}

fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A flood thread in `out`: runs until dropped, then reports how many frames it sent.
struct FloodThread {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    started: Instant,
    handle: Option<std::thread::JoinHandle<Result<()>>>,
}

impl FloodThread {
    fn start(
        out: &netns::Netns,
        kind: Flood,
        macs: ([u8; 6], [u8; 6]),
        dst: Ipv4Addr,
        cpu: Option<usize>,
    ) -> Result<FloodThread> {
        let ifindex = out.ifindex("eth0");
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (stop2, sent2) = (stop.clone(), sent.clone());
        let handle = out.spawn_in(move || -> Result<()> {
            if let Some(c) = cpu {
                pin_to(c);
            }
            flood_loop(kind, macs, dst, ifindex, &stop2, &sent2)
        });
        Ok(FloodThread {
            stop,
            sent,
            started: Instant::now(),
            handle: Some(handle),
        })
    }

    /// Stops the thread; returns the frames per second it sent.
    fn finish(mut self) -> Result<f64> {
        self.stop.store(true, Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64();
        if let Some(h) = self.handle.take() {
            h.join()
                .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
        }
        Ok(self.sent.load(Ordering::Relaxed) as f64 / secs)
    }
}

impl Drop for FloodThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn flood_loop(
    kind: Flood,
    macs: ([u8; 6], [u8; 6]),
    dst: Ipv4Addr,
    ifindex: u32,
    stop: &AtomicBool,
    sent: &AtomicU64,
) -> Result<()> {
    const BATCH: usize = 64;
    let src = Ipv4Addr::new(192, 0, 2, 2);
    // SAFETY: plain socket creation; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    ensure!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    let close = scopeguard(fd);
    // SAFETY: a zeroed sockaddr_ll is valid; the fields set are the ones bind and send read.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&macs.1);
    // SAFETY: sll is a valid sockaddr_ll of the given size.
    let rc = unsafe {
        libc::bind(
            fd,
            &sll as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    ensure!(
        rc == 0,
        "binding the AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    let one: libc::c_int = 1;
    // PACKET_QDISC_BYPASS (20): straight to the driver. Best effort.
    // SAFETY: a valid int option.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            20,
            &one as *const _ as *const libc::c_void,
            4,
        )
    };
    // 64 Ki frames, one per source port, built once; the loop walks through them.
    let frames: Vec<Vec<u8>> = (0..=u16::MAX)
        .map(|p| frame(kind, macs, src, dst, p.max(1024)))
        .collect();
    let mut next = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: an all-zero mmsghdr is valid; iov pointers are set below.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..BATCH {
            let f = &frames[(next + i) % frames.len()];
            iov[i].iov_base = f.as_ptr() as *mut libc::c_void;
            iov[i].iov_len = f.len();
        }
        for i in 0..BATCH {
            msgs[i].msg_hdr.msg_iov = &mut iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: msgs and iov point at live buffers for the duration of the call.
        let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) || e.raw_os_error() == Some(libc::EAGAIN) {
                continue;
            }
            bail!("sendmmsg: {e}");
        }
        next = next.wrapping_add(n as usize);
        sent.fetch_add(n as u64, Ordering::Relaxed);
    }
    drop(close);
    Ok(())
}

/// Closes `fd` when dropped.
fn scopeguard(fd: i32) -> impl Drop {
    struct Close(i32);
    impl Drop for Close {
        fn drop(&mut self) {
            // SAFETY: this guard owns the fd.
            unsafe { libc::close(self.0) };
        }
    }
    Close(fd)
}

fn start_agent(topo: &Topology, pins: &PinDir, agent_bin: &Path) -> Result<AgentProc> {
    let work = std::env::temp_dir().join(format!("netpol-bench-flood-{}", topo.tag));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("policies"))?;
    let socket = work.join("agent.sock");
    let log = std::fs::File::create(work.join("agent.log"))?;
    use std::os::unix::process::CommandExt as _;
    let mut cmd = topo.host.command(agent_bin.to_str().context("agent path")?);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    };
    let child = cmd
        .arg("--socket")
        .arg(&socket)
        .arg("run")
        .arg("--pin-dir")
        .arg(pins.path())
        .arg("--state-dir")
        .arg(work.join("state"))
        .arg("--policy-dir")
        .arg(work.join("policies"))
        // Nothing answers here: the agent keeps the maps it adopted (see the module docs).
        .arg("--docker-socket")
        .arg(work.join("no-docker.sock"))
        .arg("--masq6")
        .arg("off")
        .env("NETPOL_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .context("spawning the agent")?;
    let agent = AgentProc {
        proc: KillOnDrop(child),
        socket,
        work,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while status_ms(&agent.socket).is_err() {
        if Instant::now() > deadline {
            bail!(
                "the agent did not answer status: {}",
                std::fs::read_to_string(agent.work.join("agent.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(agent)
}

/// One `status` round trip over the control socket, in ms (1 s timeout).
fn status_ms(socket: &Path) -> Result<f64> {
    let t0 = Instant::now();
    let mut r = api::connect(socket, &Request::Status)?;
    r.get_ref().set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut line = String::new();
    r.read_line(&mut line)?;
    ensure!(
        line.contains("\"ok\"") || line.contains("data"),
        "status answered {line}"
    );
    Ok(t0.elapsed().as_secs_f64() * 1000.0)
}

fn setup(
    protect: Protect,
    bin: &Path,
    agent_bin: &Path,
    pair_cpu: Option<usize>,
    host_conntrack: bool,
) -> Result<Setup> {
    let tag = unique_tag("npbench");
    let mut topo = Topology::new(&tag, &["c1", "c2", "victim"]);
    let (out, _) = topo.add_outside("out");
    topo.host
        .run(&["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"]);
    topo.container("c1")
        .ns
        .run(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"]);
    topo.container("c2")
        .ns
        .run(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"]);
    if host_conntrack {
        // Docker's own rule: the bridge's subnet masqueraded on the way out. Any `nat` rule
        // makes the namespace's conntrack track (and confirm) every packet it forwards.
        dp::pipe_in(
            &topo.host,
            &["iptables-nft-restore"],
            "*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -s 10.77.0.0/24 ! -o br0 -j MASQUERADE\nCOMMIT\n",
        )?;
    }
    let servers = dp::start_servers(topo.container("c2"), bin, pair_cpu)?;
    let (mut pins, mut agent) = (None, None);
    match protect {
        Protect::None => {}
        Protect::Netpol => {
            let p = PinDir::unique(&format!("bench-{tag}"));
            let mut plan = dp::netpol_plan(&topo, 10);
            plan.container(topo.container("victim"), 258, true, true);
            plan.load(&bin.join("netpol-netns-loader"), &p, &topo);
            agent = Some(start_agent(&topo, &p, agent_bin)?);
            pins = Some(p);
        }
        Protect::Iptables => dp::pipe_in(
            &topo.host,
            &["iptables-nft-restore"],
            &dp::iptables_rules(&topo, 0),
        )?,
    }
    let s = Setup {
        protect,
        servers,
        agent,
        _pins: pins,
        out,
        topo,
    };
    // The protection is in place (also after the agent took the pins over): the pair talks,
    // a port nobody allows and the victim are dropped (refused: closed ports, with none).
    let c1 = &s.topo.container("c1").ns;
    let c2 = s.topo.container("c2").ipv4;
    let victim = s.topo.container("victim").ipv4;
    use netns::{tcp_connect, Connect};
    let short = Duration::from_millis(300);
    let closed = if protect == Protect::None {
        Connect::Refused
    } else {
        Connect::TimedOut
    };
    for (ns, to, want) in [
        (c1, (c2, dp::PORTS[0]), Connect::Connected),
        (c1, (c2, 9), closed.clone()),
        (&s.out, (victim, VICTIM_PORT), closed.clone()),
        (c1, (victim, VICTIM_PORT), closed),
    ] {
        let r = tcp_connect(ns, to.into(), short);
        ensure!(
            r == want,
            "{protect:?}: {} -> {}:{} gave {r:?}, expected {want:?}",
            ns.name,
            to.0,
            to.1
        );
    }
    Ok(s)
}

/// Packets the protector dropped so far: netpol's drop counters (all reasons, all CPUs), or the
/// packet counter of the iptables chain's final DROP rule; nothing without a protector.
fn dropped(s: &Setup) -> Result<Option<u64>> {
    Ok(Some(match s.protect {
        Protect::None => return Ok(None),
        Protect::Netpol => {
            let pins = s._pins.as_ref().context("netpol without pins")?;
            let out = Command::new("bpftool")
                .args(["-j", "map", "dump", "pinned"])
                .arg(pins.path().join("DROPS_V2"))
                .output()
                .context("running bpftool")?;
            ensure!(out.status.success(), "bpftool map dump DROPS_V2 failed");
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let mut total = 0;
            for e in v.as_array().context("DROPS_V2 dump")? {
                for c in e["formatted"]["values"]
                    .as_array()
                    .context("per-CPU values")?
                {
                    total += c["value"].as_u64().unwrap_or(0);
                }
            }
            total
        }
        Protect::Iptables => {
            let out = dp::output_in(
                &s.topo.host,
                &["iptables-nft", "-w", "-nvxL", "NETPOL-BENCH"],
            )?;
            let last = out
                .lines()
                .rfind(|l| l.contains("DROP"))
                .context("no DROP rule in NETPOL-BENCH")?;
            last.split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        }
    }))
}

/// `NET_RX` softirqs raised so far, per CPU (`/proc/softirqs`).
fn net_rx() -> Result<Vec<u64>> {
    parse_net_rx(&std::fs::read_to_string("/proc/softirqs")?)
}

fn parse_net_rx(s: &str) -> Result<Vec<u64>> {
    let l = s
        .lines()
        .find(|l| l.trim_start().starts_with("NET_RX:"))
        .context("no NET_RX in /proc/softirqs")?;
    Ok(l.split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect())
}

/// What the machine did during one throughput measurement: CPU 0's and CPU 1's time split (%),
/// `NET_RX` softirqs per second on each, the most conntrack entries the host namespace held, and
/// the share of the window the iperf3 server (pinned with the pair) ran and waited runnable for
/// its CPU (`/proc/PID/schedstat`).
#[derive(Clone, Copy, Default)]
struct Window {
    cpu: [[f64; 5]; 2],
    net_rx: [f64; 2],
    conntrack: Option<u64>,
    /// Entries the host namespace held for flows to the victim at the window's end.
    victim_entries: Option<u64>,
    server_run: f64,
    server_wait: f64,
}

/// A process's time on a CPU and waiting runnable for one, in ns (`/proc/PID/schedstat`).
fn schedstat(pid: u32) -> Result<(u64, u64)> {
    parse_schedstat(&std::fs::read_to_string(format!("/proc/{pid}/schedstat"))?)
}

fn parse_schedstat(s: &str) -> Result<(u64, u64)> {
    let mut f = s.split_whitespace().map(|v| v.parse::<u64>());
    match (f.next(), f.next()) {
        (Some(Ok(run)), Some(Ok(wait))) => Ok((run, wait)),
        _ => bail!("bad schedstat line: {s}"),
    }
}

/// Samples a window: `/proc/stat` and `/proc/softirqs` at both ends, and the host namespace's
/// `nf_conntrack_count` every 100 ms from a thread inside it.
struct WindowWatch {
    cpu0: Vec<[u64; 5]>,
    rx0: Vec<u64>,
    server: (u32, (u64, u64)),
    t0: Instant,
    stop: Arc<AtomicBool>,
    conntrack: std::thread::JoinHandle<(Option<u64>, Option<u64>)>,
}

impl WindowWatch {
    fn start(host: &netns::Netns, server_pid: u32, victim: Ipv4Addr) -> Result<WindowWatch> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let conntrack = host.spawn_in(move || {
            let mut max = None;
            while !stop2.load(Ordering::Relaxed) {
                // Resolved in this thread's namespace: the host namespace's own count. Absent
                // without conntrack in the kernel.
                if let Some(n) =
                    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
                        .ok()
                        .and_then(|v| v.trim().parse::<u64>().ok())
                {
                    max = Some(max.unwrap_or(0).max(n));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            // Once, at the end (a long listing): how many of them are the victim's. This
            // thread's namespace (`/proc/net` would be the main thread's).
            let victim = std::fs::read_to_string("/proc/thread-self/net/nf_conntrack")
                .ok()
                .map(|l| entries_to(&l, victim));
            (max, victim)
        });
        Ok(WindowWatch {
            cpu0: crate::process::cpu_times()?,
            rx0: net_rx()?,
            server: (server_pid, schedstat(server_pid)?),
            t0: Instant::now(),
            stop,
            conntrack,
        })
    }

    fn finish(self) -> Result<Window> {
        let (cpu1, rx1) = (crate::process::cpu_times()?, net_rx()?);
        let (run1, wait1) = schedstat(self.server.0)?;
        let secs = self.t0.elapsed().as_secs_f64();
        self.stop.store(true, Ordering::Relaxed);
        let (conntrack, victim_entries) = self
            .conntrack
            .join()
            .map_err(|_| anyhow::anyhow!("the conntrack sampler panicked"))?;
        let (run0, wait0) = self.server.1;
        let mut w = Window {
            conntrack,
            victim_entries,
            server_run: (run1 - run0) as f64 / 1e9 / secs * 100.0,
            server_wait: (wait1 - wait0) as f64 / 1e9 / secs * 100.0,
            ..Window::default()
        };
        for (c, (now, then)) in cpu1.iter().zip(&self.cpu0).take(2).enumerate() {
            let d: Vec<f64> = now
                .iter()
                .zip(then)
                .map(|(b, a)| b.saturating_sub(*a) as f64)
                .collect();
            let total: f64 = d.iter().sum::<f64>().max(1.0);
            for (pct, v) in w.cpu[c].iter_mut().zip(&d) {
                *pct = v / total * 100.0;
            }
            if let (Some(a), Some(b)) = (self.rx0.get(c), rx1.get(c)) {
                w.net_rx[c] = b.saturating_sub(*a) as f64 / secs;
            }
        }
        Ok(w)
    }
}

/// `perf record` of CPU 0 into `file` until dropped (SIGINT, so perf writes its data).
struct PerfRecord(Option<std::process::Child>);

impl PerfRecord {
    fn start(file: &Path) -> Result<PerfRecord> {
        let child = Command::new("perf")
            .args(["record", "-q", "-C", "0", "-g", "-F", "999", "-o"])
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning perf record")?;
        Ok(PerfRecord(Some(child)))
    }
}

impl Drop for PerfRecord {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let _ = c.wait();
        }
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// The agent while a flood runs: `status` every 50 ms, RSS sampled, CPU time over the window.
struct AgentWatch {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(Vec<f64>, usize, u64)>,
    pid: u32,
    ticks0: u64,
    t0: Instant,
}

#[derive(Default, Clone)]
struct AgentFigures {
    status_ms: Vec<f64>,
    failures: usize,
    rss_max_kib: u64,
    cpu_pct: Vec<f64>,
}

impl AgentWatch {
    fn start(a: &AgentProc) -> Result<AgentWatch> {
        let pid = a.proc.0.id();
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, socket) = (stop.clone(), a.socket.clone());
        let handle = std::thread::spawn(move || {
            let (mut ms, mut fails, mut rss) = (Vec::new(), 0, 0);
            while !stop2.load(Ordering::Relaxed) {
                match status_ms(&socket) {
                    Ok(v) => ms.push(v),
                    Err(_) => fails += 1,
                }
                rss = rss.max(rss_kib(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(50));
            }
            (ms, fails, rss)
        });
        Ok(AgentWatch {
            stop,
            handle,
            pid,
            ticks0: cpu_ticks(pid)?,
            t0: Instant::now(),
        })
    }

    fn finish(self, into: &mut AgentFigures) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        let hz = ticks_per_second();
        let cpu =
            (cpu_ticks(self.pid)? - self.ticks0) as f64 / hz / self.t0.elapsed().as_secs_f64()
                * 100.0;
        let (ms, fails, rss) = self
            .handle
            .join()
            .map_err(|_| anyhow::anyhow!("the status thread panicked"))?;
        into.status_ms.extend(ms);
        into.failures += fails;
        into.rss_max_kib = into.rss_max_kib.max(rss);
        into.cpu_pct.push(cpu);
        Ok(())
    }
}

pub fn run(o: Opts) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the benchmark needs root (namespaces, BPF, raw sockets)"
    );
    for tool in [
        "ip", "iperf3", "sockperf", "wrk", "ss", "taskset", "bpftool",
    ] {
        dp::need(tool)?;
    }
    if o.protect.contains(&Protect::Iptables) || o.host_conntrack {
        dp::need("iptables-nft-restore")?;
    }
    if let Some(d) = &o.perf {
        dp::need("perf")?;
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    ensure!(
        o.rounds > 0 && o.seconds > 0,
        "rounds and seconds must be positive"
    );
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let pin = !o.no_pin && cpus >= 2;
    let (flood_cpu, pair_cpu) = if pin {
        (Some(FLOOD_CPU), Some(PAIR_CPU))
    } else {
        (None, None)
    };
    dp::remove_stale();
    let bin = dp::build_helpers()?;
    let agent_bin = bin.join("netpol-agent");
    dp::catch_interrupts();

    let started = Instant::now();
    let load_before = loadavg();
    let mut setups = Vec::new();
    for p in &o.protect {
        dp::interrupted()?;
        eprintln!("setting up: {p:?}");
        setups.push(setup(*p, &bin, &agent_bin, pair_cpu, o.host_conntrack)?);
    }
    let _dma = dp::hold_dma_latency();

    let floods = [Flood::None, Flood::Syn, Flood::Udp];
    let mut results: BTreeMap<(Protect, Flood, Metric), Vec<f64>> = BTreeMap::new();
    let mut pps: BTreeMap<(Protect, Flood), Vec<f64>> = BTreeMap::new();
    let mut drops: BTreeMap<(Protect, Flood), Vec<f64>> = BTreeMap::new();
    let mut agent: BTreeMap<Flood, AgentFigures> = BTreeMap::new();
    let mut windows: BTreeMap<(Protect, Flood), Vec<Window>> = BTreeMap::new();
    for round in 0..o.rounds {
        for k in 0..setups.len() * floods.len() {
            dp::interrupted()?;
            let i = (k + round) % (setups.len() * floods.len());
            let (s, flood) = (&setups[i % setups.len()], floods[i / setups.len()]);
            let victim = s.topo.container("victim").ipv4;
            let macs = (mac_of(&s.out, "eth0")?, mac_of(&s.topo.host, "up-out")?);
            let watch = s.agent.as_ref().map(AgentWatch::start).transpose()?;
            let (drops0, t0) = (dropped(s)?.unwrap_or(0), Instant::now());
            let thread = match flood {
                Flood::None => None,
                kind => Some(FloodThread::start(&s.out, kind, macs, victim, flood_cpu)?),
            };
            // Let the flood reach its rate before measuring.
            std::thread::sleep(Duration::from_millis(300));
            for m in METRICS {
                let label = format!("{:?} {}", s.protect, flood.label());
                let throughput = m == Metric::Throughput;
                let window = throughput
                    .then(|| WindowWatch::start(&s.topo.host, s.servers[0].0.id(), victim))
                    .transpose()?;
                let perf = match (&o.perf, throughput) {
                    (Some(d), true) => Some(PerfRecord::start(&d.join(format!(
                        "{:?}-{:?}-r{}.data",
                        s.protect,
                        flood,
                        round + 1
                    )))?),
                    _ => None,
                };
                let v = dp::measure_pair(&s.topo, &label, m, o.seconds, pair_cpu)
                    .with_context(|| format!("{label} {m:?}"))?;
                drop(perf);
                if let Some(w) = window {
                    let w = w.finish()?;
                    eprintln!(
                        "  CPU 0 user/sys/irq/idle/steal % {:.0}/{:.0}/{:.0}/{:.0}/{:.0}, CPU 1 {:.0}/{:.0}/{:.0}/{:.0}/{:.0}, host conntrack max {:?} (victim's {:?}), iperf3 server ran {:.0} % waited {:.0} %",
                        w.cpu[0][0], w.cpu[0][1], w.cpu[0][2], w.cpu[0][3], w.cpu[0][4],
                        w.cpu[1][0], w.cpu[1][1], w.cpu[1][2], w.cpu[1][3], w.cpu[1][4],
                        w.conntrack, w.victim_entries, w.server_run, w.server_wait
                    );
                    windows.entry((s.protect, flood)).or_default().push(w);
                }
                eprintln!(
                    "round {}/{} {:<24} {m:?}: {v:.2}",
                    round + 1,
                    o.rounds,
                    label
                );
                results.entry((s.protect, flood, m)).or_default().push(v);
            }
            if let Some(t) = thread {
                let rate = t.finish()?;
                eprintln!("  flood: {rate:.0} frames/s sent");
                pps.entry((s.protect, flood)).or_default().push(rate);
                if let Some(d) = dropped(s)? {
                    let drop_rate = (d - drops0) as f64 / t0.elapsed().as_secs_f64();
                    eprintln!("  {drop_rate:.0}/s dropped by {:?}", s.protect);
                    drops.entry((s.protect, flood)).or_default().push(drop_rate);
                }
            }
            if let Some(w) = watch {
                w.finish(agent.entry(flood).or_default())?;
            }
        }
    }
    drop(setups);
    let load_after = loadavg();

    let med = |v: &[f64]| median(&mut v.to_vec());
    let get = |p: Protect, f: Flood, m: Metric| {
        results.get(&(p, f, m)).map(|v| med(v)).unwrap_or(f64::NAN)
    };
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| protector | flood at victim (frames/s) | pair TCP Gbit/s (× no flood) | pair new conn/s (× no flood) | pair TCP RR p50 µs (× no flood) |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|");
    let mut verdict = Vec::new();
    for p in &o.protect {
        for f in floods {
            let (tp, cr, lat) = (
                get(*p, f, Metric::Throughput),
                get(*p, f, Metric::ConnRate),
                get(*p, f, Metric::Latency),
            );
            let rate = |m: &BTreeMap<(Protect, Flood), Vec<f64>>| {
                m.get(&(*p, f))
                    .map(|v| dp::thousands(med(v)))
                    .unwrap_or_else(|| "—".into())
            };
            let rate = format!("{} sent, {} dropped", rate(&pps), rate(&drops));
            if f == Flood::None {
                let _ = writeln!(
                    table,
                    "| {} | none | {tp:.2} | {} | {lat:.1} |",
                    p.label(),
                    dp::thousands(cr)
                );
                continue;
            }
            let r = [
                tp / get(*p, Flood::None, Metric::Throughput),
                cr / get(*p, Flood::None, Metric::ConnRate),
                lat / get(*p, Flood::None, Metric::Latency),
            ];
            let _ = writeln!(
                table,
                "| {} | {} ({rate}) | {tp:.2} ({:.2}) | {} ({:.2}) | {lat:.1} ({:.2}) |",
                p.label(),
                f.label(),
                r[0],
                dp::thousands(cr),
                r[1],
                r[2]
            );
            if *p == Protect::Netpol {
                verdict.push((f, r));
            }
        }
    }
    println!(
        "\nflood isolation: {} rounds × {} s per measurement, medians; {}{}. Took {} s; load average {load_before} before, {load_after} after.\n",
        o.rounds,
        o.seconds,
        if pin {
            "flood on CPU 1, the pair on CPU 0"
        } else {
            "unpinned"
        },
        if o.host_conntrack {
            "; conntrack active in the host namespace (--host-conntrack)"
        } else {
            ""
        },
        started.elapsed().as_secs()
    );
    println!("{table}");
    println!("| during the throughput measurement | host conntrack entries: max (victim's at the end) | CPU 0 user / sys / irq+softirq / idle / steal % | CPU 1 user / sys / irq+softirq / idle / steal % | NET_RX softirqs/s CPU 0 / CPU 1 | iperf3 server on CPU / waiting for it % |");
    println!("|---|---|---|---|---|---|");
    for p in &o.protect {
        for f in floods {
            let Some(ws) = windows.get(&(*p, f)) else {
                continue;
            };
            let m = |g: &dyn Fn(&Window) -> f64| med(&ws.iter().map(g).collect::<Vec<_>>());
            let split = |c: usize| {
                (0..5)
                    .map(|i| format!("{:.0}", m(&|w| w.cpu[c][i])))
                    .collect::<Vec<_>>()
                    .join(" / ")
            };
            let ct = if ws.iter().all(|w| w.conntrack.is_none()) {
                "—".to_string()
            } else {
                format!(
                    "{} ({})",
                    dp::thousands(m(&|w| w.conntrack.unwrap_or(0) as f64)),
                    dp::thousands(m(&|w| w.victim_entries.unwrap_or(0) as f64))
                )
            };
            println!(
                "| {}, {} | {ct} | {} | {} | {} / {} | {:.0} / {:.0} |",
                p.label(),
                f.label(),
                split(0),
                split(1),
                dp::thousands(m(&|w| w.net_rx[0])),
                dp::thousands(m(&|w| w.net_rx[1])),
                m(&|w| w.server_run),
                m(&|w| w.server_wait)
            );
        }
    }
    println!();
    if !agent.is_empty() {
        println!("| agent during | status p50 ms | status p99 ms | status max ms | unanswered (1 s) | CPU % of one core (median) | RSS max MB |");
        println!("|---|---|---|---|---|---|---|");
        for (f, a) in &agent {
            let mut s = a.status_ms.clone();
            s.sort_by(f64::total_cmp);
            println!(
                "| {} | {:.2} | {:.2} | {:.2} | {} | {:.1} | {:.1} |",
                f.label(),
                percentile(&s, 0.5),
                percentile(&s, 0.99),
                s.last().copied().unwrap_or(f64::NAN),
                a.failures,
                med(&a.cpu_pct),
                a.rss_max_kib as f64 / 1024.0
            );
        }
        println!();
    }
    for (f, r) in verdict {
        let a = agent.get(&f);
        let max = a
            .and_then(|a| a.status_ms.iter().copied().reduce(f64::max))
            .unwrap_or(f64::NAN);
        let responsive = a.is_some_and(|a| a.failures == 0) && max < 100.0;
        let ok = r[0] >= 0.9 && r[1] >= 0.9 && responsive;
        // What the same flood cost the pair with no filter at all: the platform's share.
        let control = get(Protect::None, f, Metric::Throughput)
            / get(Protect::None, Flood::None, Metric::Throughput);
        println!(
            "target, netpol {}: pair throughput {:.2}, conn/s {:.2} (≥ 0.9 of no flood); status max {max:.1} ms (< 100): {}{}",
            f.label(),
            r[0],
            r[1],
            if ok { "met" } else { "NOT MET" },
            if control.is_nan() {
                String::new()
            } else {
                format!(" (with no filter the pair keeps {control:.2} of its throughput)")
            }
        );
    }
    // How much of CPU 0 the pair got: with CPU 0 to itself the server runs ~65-73 % of a window
    // (the client on the same CPU has the rest); less means other load shared CPU 0.
    let ran = |flooded: bool| {
        let v: Vec<f64> = windows
            .iter()
            .filter(|((_, f), _)| (*f != Flood::None) == flooded)
            .flat_map(|(_, ws)| ws.iter().map(|w| w.server_run))
            .collect();
        med(&v)
    };
    println!(
        "the iperf3 server ran a median {:.0} % of the no-flood and {:.0} % of the flood throughput windows (~70 % with CPU 0 to the pair alone; below that, other load on CPU 0 moves the ratios)",
        ran(false),
        ran(true)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flood_frames_have_valid_checksums() {
        let macs = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let (src, dst) = (Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(10, 77, 0, 12));
        for kind in [Flood::Syn, Flood::Udp] {
            let f = frame(kind, macs, src, dst, 4242);
            // The IPv4 header sums to 0xffff (its checksum over itself is 0).
            assert_eq!(checksum(&f[14..34], 0), 0, "{kind:?} IPv4 header");
            let l4 = &f[34..];
            let mut pseudo = 0u32;
            for w in [src.octets(), dst.octets()] {
                pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
                pseudo += u32::from(u16::from_be_bytes([w[2], w[3]]));
            }
            pseudo += u32::from(f[23]) + l4.len() as u32;
            assert_eq!(checksum(l4, pseudo), 0, "{kind:?} L4 checksum");
            assert_eq!(u16::from_be_bytes([l4[0], l4[1]]), 4242);
            assert_eq!(u16::from_be_bytes([l4[2], l4[3]]), VICTIM_PORT);
        }
        assert_eq!(frame(Flood::Syn, macs, src, dst, 1)[34 + 13], 0x02);
    }

    #[test]
    fn proc_parsers_read_the_fields_the_tables_show() {
        let stat = "cpu  10 1 20 300 4 5 6 7 0 0\ncpu0 1 2 3 40 5 6 7 8 0 0\ncpu1 9 0 8 70 0 1 2 3 0 0\nintr 1 2\n";
        // user + nice, system, irq + softirq, idle + iowait, steal; the all-CPU line is skipped.
        assert_eq!(
            crate::process::parse_cpu_times(stat).unwrap(),
            vec![[3, 3, 13, 45, 8], [9, 8, 3, 70, 3]]
        );
        let softirqs = "                    CPU0       CPU1\n          HI:          1          0\n      NET_TX:         10         20\n      NET_RX:     161361    187671\n";
        assert_eq!(parse_net_rx(softirqs).unwrap(), vec![161361, 187671]);
        assert_eq!(
            parse_schedstat("115009 1692601 2\n").unwrap(),
            (115009, 1692601)
        );
        let ct = "ipv4     2 udp      17 29 src=192.0.2.2 dst=10.77.0.12 sport=1024 dport=80 [UNREPLIED] src=10.77.0.12 dst=192.0.2.2 sport=80 dport=1024 mark=0 use=1\n\
                  ipv4     2 tcp      6 117 TIME_WAIT src=10.77.0.10 dst=10.77.0.11 sport=4000 dport=8080 src=10.77.0.11 dst=10.77.0.10 sport=8080 dport=4000 [ASSURED] mark=0 use=1\n\
                  ipv4     2 tcp      6 10 CLOSE src=10.77.0.12 dst=192.0.2.2 sport=80 dport=5 src=192.0.2.2 dst=10.77.0.12 sport=5 dport=80 mark=0 use=1\n";
        // Only the first line goes to the victim; the third is the victim's own, in reverse.
        assert_eq!(entries_to(ct, Ipv4Addr::new(10, 77, 0, 12)), 1);
    }
}
