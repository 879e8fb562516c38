//! Tier 4: IPv6 masquerade end to end, with a private dockerd and the real `netpol-agent`.
//!
//! ```text
//!  container (fd00:e6:1::x) ── br-… ── host ── npm6u… ═══ veth ═══ eth0 ── "internet" namespace
//!  container (fd00:e6:2::x) ── br-…     2001:db8:e6:1::1/128 (uplink)      2001:db8:e6:2::1/64 (server)
//! ```
//!
//! The host end of the veth is the uplink given to the agent (`--masq6-uplink`); the host gets a
//! route to the internet's prefix through it and nothing else of the host's routing changes. The
//! internet namespace only has a route back to the uplink's address, so a container's ULA source
//! gets no reply unless it is masqueraded. Docker 20.10 does not NAT IPv6, nor does Docker 28 run
//! with `--ip6tables=false`, so the agent, which reads the host's NAT rules rather than Docker's
//! version, masquerades the Docker IPv6 networks on both. On Docker 28 with its defaults
//! (`docker28_gateway_modes_...`) Docker NATs `nat` and `nat-unprotected` networks itself and
//! routes `routed` ones: the agent translates none of them, and says why.
//!
//! The test proves, in order: the server is reachable from the host and a container's SYN reaches
//! it, but the container gets no connection without the agent; with the agent, TCP and ping work
//! and the server sees the uplink's address; `status` says so; a network created while the agent
//! runs is masqueraded too; after `kill -9` of the agent the pinned programs keep translating and
//! a restarted agent adopts them; restarted with `--masq6 off` it stops translating, and with
//! `auto` again it resumes; removing the agent's pins ends the translation. Everything it adds (namespace, veth, route,
//! sysctl, containers, networks, pins) is removed also when it fails.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use netpol_tests::{
    agent::{Agent, AgentOptions},
    docker::{DaemonConfig, DockerDaemon, DockerVersion},
    probe::in_netns,
    require_root,
};

const IMAGE: &str = "netpol-test/busybox";
const NET_A: &str = "npe2e6a";
const NET_B: &str = "npe2e6b";
const SUBNET_A: &str = "fd00:e6:1::/64";
const SUBNET_B: &str = "fd00:e6:2::/64";
/// The uplink's global address: what the server must see as the client.
const UPLINK_ADDR: &str = "2001:db8:e6:1::1";
const SERVER: &str = "2001:db8:e6:2::1";
const SERVER_PREFIX: &str = "2001:db8:e6:2::/64";
const PORT: u16 = 7046;
/// How long a connection that has no way back is given before it counts as failed.
const NO_REPLY_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a connection that should work may take (retried until then).
const DEADLINE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn output(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"))
}

fn must(args: &[&str]) -> String {
    let out = output(args);
    assert!(
        out.status.success(),
        "{args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

// ---------------------------------------------------------------------------------------------
// The "internet": a namespace behind a veth whose host end is the uplink.

struct Internet {
    ns: String,
    uplink: String,
    stop: Arc<AtomicBool>,
    server: Option<thread::JoinHandle<()>>,
}

impl Internet {
    fn create() -> Self {
        let pid = std::process::id();
        let mut net = Internet {
            ns: format!("npe2e6-inet-{pid}"),
            uplink: format!("npm6u{}", pid % 100_000),
            stop: Arc::new(AtomicBool::new(false)),
            server: None,
        };
        // Leftovers of a killed run with the same pid.
        net.remove_links();
        let (ns, up) = (net.ns.clone(), net.uplink.as_str());
        must(&["ip", "netns", "add", &ns]);
        for k in ["all", "default"] {
            must(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{k}.accept_dad=0"),
            ]);
        }
        must(&[
            "ip", "link", "add", up, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        // Our own interface: its sysctls go with it.
        let dad = format!("/proc/sys/net/ipv6/conf/{up}/accept_dad");
        std::fs::write(&dad, "0").unwrap_or_else(|e| panic!("write {dad}: {e}"));
        let uplink_addr = format!("{UPLINK_ADDR}/128");
        let server_addr = format!("{SERVER}/64");
        let back = format!("{UPLINK_ADDR}/128");
        must(&["ip", "-6", "addr", "add", &uplink_addr, "dev", up, "nodad"]);
        must(&["ip", "link", "set", up, "up"]);
        must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        must(&[
            "ip",
            "-n",
            &ns,
            "-6",
            "addr",
            "add",
            &server_addr,
            "dev",
            "eth0",
            "nodad",
        ]);
        must(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        // Back only to the uplink's address: un-NATed container sources have no route.
        must(&["ip", "-n", &ns, "-6", "route", "add", &back, "dev", "eth0"]);
        // The host reaches the internet's prefix through the uplink (nothing else changes).
        must(&["ip", "-6", "route", "add", SERVER_PREFIX, "dev", up]);
        net.serve();
        net
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.ns)
    }

    /// A TCP server on `[SERVER]:PORT` that writes the client's address and closes.
    fn serve(&mut self) {
        let listener = in_netns(&self.path(), || TcpListener::bind((v6(SERVER), PORT)))
            .unwrap_or_else(|e| panic!("bind [{SERVER}]:{PORT} in {}: {e}", self.ns));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("nonblocking: {e}"));
        let stop = self.stop.clone();
        self.server = Some(thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if !readable(listener.as_raw_fd(), 100) {
                    continue;
                }
                if let Ok((mut conn, peer)) = listener.accept() {
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.write_all(format!("{}\n", peer.ip()).as_bytes());
                }
            }
        }));
    }

    /// `Ip6OutNoRoutes` of the internet namespace: replies it could not route.
    fn out_no_routes(&self) -> u64 {
        let text = in_netns(&self.path(), || {
            std::fs::read_to_string("/proc/thread-self/net/snmp6")
        })
        .unwrap_or_else(|e| panic!("snmp6 of {}: {e}", self.ns));
        text.lines()
            .find_map(|l| l.strip_prefix("Ip6OutNoRoutes"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no Ip6OutNoRoutes in snmp6 of {}:\n{text}", self.ns))
    }

    fn remove_links(&self) {
        let _ = output(&[
            "ip",
            "-6",
            "route",
            "del",
            SERVER_PREFIX,
            "dev",
            &self.uplink,
        ]);
        let _ = output(&["ip", "netns", "del", &self.ns]);
        let _ = output(&["ip", "link", "del", &self.uplink]);
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.server.take() {
            let _ = h.join();
        }
        self.remove_links();
    }
}

fn readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// A sysctl set for the test and put back on drop.
struct Sysctl {
    path: &'static str,
    old: Option<String>,
}

impl Sysctl {
    fn set(path: &'static str, value: &str) -> Self {
        let now = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("read {path}: {e}"))
            .trim()
            .to_owned();
        if now == value {
            return Sysctl { path, old: None };
        }
        eprintln!("setting {path} to {value} (was {now}) for the test");
        std::fs::write(path, value).unwrap_or_else(|e| panic!("write {path}: {e}"));
        Sysctl {
            path,
            old: Some(now),
        }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Some(old) = &self.old {
            if let Err(e) = std::fs::write(self.path, old) {
                eprintln!("restore {} to {old}: {e}", self.path);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Docker networks and containers (removed on drop; the daemon's own drop removes them too).

struct Container {
    name: String,
    pid: u32,
    addr: Ipv6Addr,
}

impl Container {
    fn netns(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid))
    }
}

struct DockerNets<'a> {
    docker: &'a DockerDaemon,
    networks: Vec<String>,
    containers: Vec<String>,
}

impl<'a> DockerNets<'a> {
    fn new(docker: &'a DockerDaemon) -> Self {
        DockerNets {
            docker,
            networks: Vec::new(),
            containers: Vec::new(),
        }
    }

    fn network(&mut self, name: &str, subnet: &str) {
        self.network_with(name, subnet, &[]);
    }

    /// A network with `-o` options (`gateway_mode_ipv6=routed`, …).
    fn network_with(&mut self, name: &str, subnet: &str, options: &[&str]) {
        self.networks.push(name.to_owned());
        let mut args = vec!["network", "create", "--ipv6", "--subnet", subnet];
        for o in options {
            args.extend(["-o", o]);
        }
        args.push(name);
        self.docker.docker_ok(&args);
    }

    fn container(&mut self, name: &str, network: &str) -> Container {
        self.containers.push(name.to_owned());
        self.docker.docker_ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            network,
            "--stop-timeout",
            "1",
            IMAGE,
            "sleep",
            "3600",
        ]);
        let info = self.docker.inspect(
            name,
            "{{.State.Pid}}{{range .NetworkSettings.Networks}} {{.GlobalIPv6Address}}{{end}}",
        );
        let mut f = info.split_whitespace();
        let pid = f.next().and_then(|p| p.parse().ok());
        let addr = f.next().and_then(|a| a.parse().ok());
        match (pid, addr) {
            (Some(pid), Some(addr)) if pid > 0 => Container {
                name: name.to_owned(),
                pid,
                addr,
            },
            _ => panic!("container {name}: no pid or IPv6 address in {info:?}"),
        }
    }
}

impl Drop for DockerNets<'_> {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = self.docker.docker(&["rm", "-f", c]);
        }
        for n in &self.networks {
            let _ = self.docker.docker(&["network", "rm", n]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Probes from a container's namespace.

enum Reach {
    /// Connected; the server saw this client address.
    Seen(IpAddr),
    /// Connected but no answer line.
    NoAnswer,
    Failed(String),
}

impl std::fmt::Display for Reach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reach::Seen(a) => write!(f, "connected, the server saw {a}"),
            Reach::NoAnswer => write!(f, "connected, but the server did not answer"),
            Reach::Failed(e) => write!(f, "no connection: {e}"),
        }
    }
}

/// One TCP connection from `c` to the server, reading the address the server saw.
fn reach(c: &Container, timeout: Duration) -> Reach {
    let to = SocketAddr::from((v6(SERVER), PORT));
    in_netns(&c.netns(), move || {
        let s = match TcpStream::connect_timeout(&to, timeout) {
            Ok(s) => s,
            Err(e) => return Reach::Failed(e.to_string()),
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut line = String::new();
        match BufReader::new(s).read_line(&mut line) {
            Ok(n) if n > 0 => line.trim().parse().map_or(Reach::NoAnswer, Reach::Seen),
            _ => Reach::NoAnswer,
        }
    })
}

/// Retries [`reach`] until the server answers or [`DEADLINE`] passes; returns what it saw.
fn reach_eventually(c: &Container, agent: &Agent, what: &str) -> IpAddr {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match reach(c, Duration::from_secs(2)) {
            Reach::Seen(peer) => return peer,
            last if Instant::now() > deadline => panic!(
                "{what}: {} ({}) cannot reach [{SERVER}]:{PORT} within {DEADLINE:?}: {last}\n\
                 status: {}\nagent log:\n{}",
                c.name,
                c.addr,
                status_text(agent),
                agent.log_tail(30)
            ),
            _ => thread::sleep(POLL),
        }
    }
}

/// The container must get no connection: tried until its SYNs are seen to reach the server
/// (the internet namespace's `Ip6OutNoRoutes` grows: no route for the reply), so that a failure
/// elsewhere, such as no forwarding, does not pass for "not masqueraded".
fn assert_no_connection(c: &Container, net: &Internet, what: &str) {
    let before = net.out_no_routes();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let got = reach(c, NO_REPLY_TIMEOUT);
        assert!(
            matches!(got, Reach::Failed(_)),
            "{what}: {} ({}) reached the server: {got}",
            c.name,
            c.addr
        );
        let after = net.out_no_routes();
        if after > before {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} ({}) got no connection ({got}), but for {DEADLINE:?} none of its SYNs \
             reached the server (Ip6OutNoRoutes {before} -> {after}): the topology is broken, \
             not the masquerade missing",
            c.name,
            c.addr
        );
    }
}

/// `ping -6` from the container's namespace (iputils' ping, not the container's), retried
/// until it answers or [`DEADLINE`] passes.
fn ping_eventually(c: &Container, what: &str) {
    let net = format!("--net={}", c.netns().display());
    let deadline = Instant::now() + DEADLINE;
    loop {
        let out = output(&[
            "nsenter", &net, "ping", "-6", "-n", "-c", "1", "-W", "1", SERVER,
        ]);
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: ping from {} to {SERVER} fails:\n{}{}",
            c.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        thread::sleep(POLL);
    }
}

fn status_text(agent: &Agent) -> String {
    let out = agent.cli(&["status", "-o", "json"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `status -o json` until its `masq6` line satisfies `ok`; returns the status.
fn wait_masq6(agent: &Agent, what: &str, ok: impl Fn(&str) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = agent.cli_json(&["status"]);
        if status["masq6"].as_str().is_some_and(&ok) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: status masq6 is not as expected after {DEADLINE:?}: {}\nagent log:\n{}",
            serde_json::to_string_pretty(&status).unwrap_or_default(),
            agent.log_tail(30)
        );
        thread::sleep(POLL);
    }
}

/// The `MASQ6_STATS` counter `index` summed over CPUs (`bpftool`), 0 when it is not pinned.
fn masq6_counter(pin_dir: &Path, index: u64) -> u64 {
    let path = pin_dir.join("MASQ6_STATS");
    if !path.exists() {
        return 0;
    }
    let text = must(&[
        "bpftool",
        "-j",
        "map",
        "dump",
        "pinned",
        path.to_str().expect("utf-8"),
    ]);
    let v: serde_json::Value = serde_json::from_str(&text).expect("bpftool JSON");
    // With BTF, bpftool puts the typed entry under "formatted"; without, keys and values are
    // arrays of hex byte strings (little endian).
    let num = |x: &serde_json::Value| -> Option<u64> {
        x.as_u64().or_else(|| {
            let bytes = x.as_array()?;
            let mut n = 0u64;
            for (i, b) in bytes.iter().enumerate().take(8) {
                let b = u64::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok()?;
                n |= b << (8 * i);
            }
            Some(n)
        })
    };
    v.as_array()
        .into_iter()
        .flatten()
        .map(|e| e.get("formatted").unwrap_or(e))
        .filter(|e| num(&e["key"]) == Some(index))
        .flat_map(|e| e["values"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| num(&c["value"]))
        .sum()
}

fn pins(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn ifindex(name: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ifindex for {name}"))
}

fn docker_ipv6_network_reaches_the_internet_through_the_agents_masquerade(version: DockerVersion) {
    if !require_root(
        &version
            .test_name("docker_ipv6_network_reaches_the_internet_through_the_agents_masquerade"),
    ) {
        return;
    }
    let started = Instant::now();
    // Docker 28 without ip6tables: no IPv6 NAT of its own, as on 20.10. The agent must see
    // that from the host's rules (it used to infer "Docker NATs" from version >= 27).
    let extra_args = match version {
        DockerVersion::Docker20 => vec![],
        DockerVersion::Docker28 => vec!["--ip6tables=false".to_owned()],
    };
    let docker = DockerDaemon::start_with(DaemonConfig {
        version,
        extra_args,
        ..Default::default()
    });
    docker.build_busybox_image(IMAGE);
    let internet = Internet::create();
    let uplink = internet.uplink.clone();
    let mut nets = DockerNets::new(&docker);
    nets.network(NET_A, SUBNET_A);
    let a = nets.container("npe2e6-a", NET_A);
    // Routing between the Docker bridge and the uplink needs IPv6 forwarding. dockerd turns it
    // on itself when it sets up an IPv6 bridge network (with its default --ip-forward); the test
    // makes sure, and puts back what it changed, also on failure (the harness daemon restores
    // dockerd's change).
    let _forwarding = Sysctl::set("/proc/sys/net/ipv6/conf/all/forwarding", "1");

    // The topology works: the host (whose source on the uplink is its global address) reaches
    // the server.
    let host_seen = {
        let to = SocketAddr::from((v6(SERVER), PORT));
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("the host cannot reach the server: {e}"));
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut line = String::new();
        let _ = BufReader::new(&mut s).read_line(&mut line);
        line.trim().to_owned()
    };
    assert_eq!(
        host_seen, UPLINK_ADDR,
        "the host reaches the server from the wrong address"
    );

    // 1. No agent: the container's SYN reaches the server, the reply has no way back.
    assert_no_connection(&a, &internet, "without the agent");

    // 2. The agent masquerades the Docker IPv6 network on the uplink.
    let mut agent = Agent::start_with(
        &docker,
        AgentOptions {
            extra_args: vec!["--masq6-uplink".into(), uplink.clone()],
            ..AgentOptions::default()
        },
    );
    let status = wait_masq6(&agent, "agent started", |m| m.starts_with("on via"));
    let line = status["masq6"].as_str().unwrap_or_default();
    for want in [uplink.as_str(), UPLINK_ADDR, SUBNET_A] {
        assert!(
            line.contains(want),
            "status masq6 {line:?} does not name {want}"
        );
    }
    let seen = reach_eventually(&a, &agent, "with the agent");
    assert_eq!(
        seen,
        IpAddr::V6(v6(UPLINK_ADDR)),
        "the server saw {seen}, not the uplink's address"
    );
    ping_eventually(&a, "with the agent");
    assert!(
        masq6_counter(agent.pin_dir(), 0) > 0,
        "MASQ6_STATS counts no translated packet after a masqueraded connection"
    );
    let flows = agent.cli_json(&["status"])["masq6_flows"].as_u64();
    assert!(
        flows.is_some_and(|f| f >= 1),
        "status masq6_flows is {flows:?} after a TCP connection and a ping"
    );

    // 3. A network created while the agent runs is masqueraded too.
    nets.network(NET_B, SUBNET_B);
    wait_masq6(&agent, "network created", |m| {
        m.starts_with("on via") && m.contains(SUBNET_A) && m.contains(SUBNET_B)
    });
    let b = nets.container("npe2e6-b", NET_B);
    let seen = reach_eventually(&b, &agent, "network created while the agent runs");
    assert_eq!(
        seen,
        IpAddr::V6(v6(UPLINK_ADDR)),
        "network B: the server saw {seen}"
    );

    // 4. kill -9: the pinned programs and maps keep translating, new flows included.
    let idx = ifindex(&uplink);
    let pinned = pins(agent.pin_dir());
    for want in [
        "SNAT6".to_owned(),
        "MASQ6_CONFIG".to_owned(),
        format!("masq6_out_{idx}"),
        format!("masq6_in_{idx}"),
    ] {
        assert!(
            pinned.contains(&want),
            "{want} is not pinned in {}: {pinned:?}",
            agent.pin_dir().display()
        );
    }
    agent.kill9();
    for c in [&a, &b] {
        let seen = reach_eventually(c, &agent, "after kill -9 of the agent");
        assert_eq!(
            seen,
            IpAddr::V6(v6(UPLINK_ADDR)),
            "after kill -9: the server saw {seen}"
        );
    }
    ping_eventually(&a, "after kill -9 of the agent");

    // 5. A restarted agent adopts the pinned masquerade.
    agent.restart();
    wait_masq6(&agent, "agent restarted", |m| {
        m.starts_with("on via") && m.contains(SUBNET_A) && m.contains(SUBNET_B)
    });
    let seen = reach_eventually(&a, &agent, "after the agent restarted");
    assert_eq!(
        seen,
        IpAddr::V6(v6(UPLINK_ADDR)),
        "after restart: the server saw {seen}"
    );

    // 6. Restarted with `--masq6 off`, it stops translating (and says so), rather than leave
    // the pinned programs running behind an "off" status; back to `auto`, it translates again.
    let with = |mode: &str| AgentOptions {
        extra_args: vec![
            "--masq6".into(),
            mode.into(),
            "--masq6-uplink".into(),
            uplink.clone(),
        ],
        ..AgentOptions::default()
    };
    agent.set_options(with("off"));
    agent.restart();
    wait_masq6(&agent, "restarted with --masq6 off", |m| {
        m.starts_with("off")
    });
    assert_no_connection(&a, &internet, "with --masq6 off");
    let left: Vec<String> = pins(agent.pin_dir())
        .into_iter()
        .filter(|p| p.starts_with("masq6_") || p == "SNAT6" || p.starts_with("MASQ6_"))
        .collect();
    assert!(
        left.is_empty(),
        "--masq6 off left masquerade pins: {left:?}"
    );
    agent.set_options(with("auto"));
    agent.restart();
    wait_masq6(&agent, "restarted with --masq6 auto", |m| {
        m.starts_with("on via")
    });
    let seen = reach_eventually(&a, &agent, "back to --masq6 auto");
    assert_eq!(
        seen,
        IpAddr::V6(v6(UPLINK_ADDR)),
        "back to auto: the server saw {seen}"
    );

    // 7. Removing the agent's pins (its guard does, as a reboot would) ends the translation.
    let pin_dir = agent.pin_dir().to_owned();
    drop(agent);
    assert!(!pin_dir.exists(), "{} still exists", pin_dir.display());
    let deadline = Instant::now() + DEADLINE;
    loop {
        let before = internet.out_no_routes();
        let got = reach(&a, NO_REPLY_TIMEOUT);
        if matches!(got, Reach::Failed(_)) && internet.out_no_routes() > before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pins are gone but {} still reaches the server: {got}",
            a.name
        );
        thread::sleep(POLL);
    }

    drop(nets);
    drop(internet);
    drop(docker);
    eprintln!("e2e_masq6: {:.1} s", started.elapsed().as_secs_f64());
}

/// Docker 28 with its defaults (`ip6tables` on): a `nat` and a `nat-unprotected` network are
/// masqueraded by Docker itself and a `routed` one is routed, so the agent translates none of
/// them (never twice, and routed means routed) and `status` names each with the reason. The
/// server sees the uplink's address from the NATed ones (Docker's MASQUERADE) and the
/// container's own address from the routed one (the internet gets a route to it).
#[test]
fn docker28_gateway_modes_nat_routed_and_nat_unprotected_are_not_masqueraded_by_netpol() {
    if !require_root(
        "docker28_gateway_modes_nat_routed_and_nat_unprotected_are_not_masqueraded_by_netpol",
    ) {
        return;
    }
    let docker = DockerDaemon::start_version(DockerVersion::Docker28);
    docker.build_busybox_image(IMAGE);
    let internet = Internet::create();
    let uplink = internet.uplink.clone();
    let mut nets = DockerNets::new(&docker);
    const ROUTED: &str = "fd00:e6:3::/64";
    const UNPROTECTED: &str = "fd00:e6:4::/64";
    nets.network(NET_A, SUBNET_A);
    nets.network_with(
        "npe2e6r",
        ROUTED,
        &["com.docker.network.bridge.gateway_mode_ipv6=routed"],
    );
    nets.network_with(
        "npe2e6u",
        UNPROTECTED,
        &["com.docker.network.bridge.gateway_mode_ipv6=nat-unprotected"],
    );
    let nat = nets.container("npe2e6-nat", NET_A);
    let routed = nets.container("npe2e6-routed", "npe2e6r");
    let unprotected = nets.container("npe2e6-unprot", "npe2e6u");
    let _forwarding = Sysctl::set("/proc/sys/net/ipv6/conf/all/forwarding", "1");
    // Upstream routes the routed network to this host (the uplink's address).
    must(&[
        "ip",
        "-n",
        &internet.ns,
        "-6",
        "route",
        "add",
        ROUTED,
        "via",
        UPLINK_ADDR,
        "dev",
        "eth0",
    ]);

    let agent = Agent::start_with(
        &docker,
        AgentOptions {
            extra_args: vec!["--masq6-uplink".into(), uplink.clone()],
            ..AgentOptions::default()
        },
    );
    let status = wait_masq6(&agent, "agent started", |m| {
        m.contains(SUBNET_A) && m.contains(ROUTED) && m.contains(UNPROTECTED)
    });
    let line = status["masq6"].as_str().unwrap_or_default().to_owned();
    eprintln!("masq6: {line}");
    assert!(
        line.starts_with("off: no Docker IPv6 network needs it")
            || line.contains("no prefix to masquerade"),
        "the agent masquerades something: {line}"
    );
    for (subnet, why) in [
        (
            SUBNET_A,
            "masqueraded by the host already (ip6 nat POSTROUTING)",
        ),
        (
            UNPROTECTED,
            "masqueraded by the host already (ip6 nat POSTROUTING)",
        ),
        (ROUTED, "gateway_mode_ipv6=routed"),
    ] {
        assert!(
            line.contains(&format!("({subnet}): {why}")),
            "status does not say {subnet}: {why}: {line}"
        );
    }
    for c in [&nat, &unprotected] {
        let seen = reach_eventually(c, &agent, "Docker's own masquerade");
        assert_eq!(
            seen,
            IpAddr::V6(v6(UPLINK_ADDR)),
            "{}: the server saw {seen}, not the uplink's address",
            c.name
        );
    }
    let seen = reach_eventually(&routed, &agent, "routed");
    assert_eq!(
        seen,
        IpAddr::V6(routed.addr),
        "the routed container was translated: the server saw {seen}"
    );
    // Nothing was translated by netpol (the host's own flows, which these now look like after
    // Docker's MASQUERADE, may be reserved in SNAT6, but no packet was rewritten).
    let translated = masq6_counter(agent.pin_dir(), 0) + masq6_counter(agent.pin_dir(), 3);
    assert_eq!(translated, 0, "netpol translated packets or made mappings");
    drop(agent);
    drop(nets);
    drop(internet);
}

netpol_tests::docker_tests!(docker_ipv6_network_reaches_the_internet_through_the_agents_masquerade);
