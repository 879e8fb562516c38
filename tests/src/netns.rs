//! A Docker-like bridge topology in network namespaces, for tests and benchmarks with real traffic.
//!
//! A namespace plays the host: it holds a Linux bridge (`br0`, with an IPv4 and an IPv6 ULA
//! address as the containers' gateway) and the host side of one veth pair per container. Each
//! container is a namespace of its own with `eth0`, an IPv4 and an IPv6 address and default routes
//! via the bridge. The real host's interfaces, routes and firewall are never touched, and names
//! carry a per-topology tag, so tests run in parallel.
//!
//! Everything (namespaces, and with them veths and the bridge) is removed when the [`Topology`] is
//! dropped, also while a test panics.
//!
//! This file uses only `std` and `libc`, so `xtask` can include it for the datapath benchmark.

use std::{
    fs::File,
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// A named network namespace (`/run/netns/<name>`, as `ip netns` makes them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command that runs inside this namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `args` inside the namespace; panics with its output when it fails.
    pub fn run(&self, args: &[&str]) -> Output {
        let out = self
            .command(args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("netns {}: spawning {args:?}: {e}", self.name));
        if !out.status.success() {
            panic!(
                "netns {}: {args:?} failed ({}):\n{}{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out
    }

    /// Moves the calling thread into this namespace until the guard is dropped. Sockets opened and
    /// interface names or indexes resolved meanwhile belong to this namespace; bpffs pins are
    /// global.
    pub fn enter(&self) -> NetnsGuard {
        let previous = File::open("/proc/thread-self/ns/net")
            .unwrap_or_else(|e| panic!("opening this thread's netns: {e}"));
        setns(&self.path()).unwrap_or_else(|e| panic!("setns into {}: {e}", self.name));
        NetnsGuard {
            previous: Some(previous),
        }
    }

    /// Runs `f` on a new thread inside this namespace and returns its result (panics propagate).
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn_in(f)
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Starts `f` on a new thread inside this namespace.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let path = self.path();
        let name = self.name.clone();
        std::thread::spawn(move || {
            setns(&path).unwrap_or_else(|e| panic!("setns into {name}: {e}"));
            f()
        })
    }

    /// The index of interface `ifname` in this namespace.
    pub fn ifindex(&self, ifname: &str) -> u32 {
        let ifname = ifname.to_owned();
        let ns = self.name.clone();
        self.run_in(move || {
            let c = std::ffi::CString::new(ifname.clone()).expect("interface name");
            // SAFETY: a valid NUL-terminated string.
            let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
            assert!(i != 0, "interface {ifname} not found in netns {ns}");
            i
        })
    }
}

fn setns(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: a valid namespace file descriptor; only this thread changes namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Returns the thread to the namespace it was in before [`Netns::enter`].
pub struct NetnsGuard {
    previous: Option<File>,
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Some(f) = self.previous.take() {
            // SAFETY: f is this thread's previous namespace.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 && !std::thread::panicking() {
                panic!("setns back: {}", io::Error::last_os_error());
            }
        }
    }
}

/// One container: its namespace, addresses and the host-side veth.
#[derive(Clone, Debug)]
pub struct Container {
    /// Short name (`app1`), also the host veth's name suffix.
    pub name: String,
    pub ns: Netns,
    /// Host-side veth, in the host namespace (`v-<name>`).
    pub host_veth: String,
    /// Its ifindex in the host namespace: the `ENDPOINTS` key.
    pub ifindex: u32,
    /// The ifindex of the bridge the host veth is attached to.
    pub bridge_ifindex: u32,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

impl Container {
    pub fn addr(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(self.ipv4),
            Family::V6 => IpAddr::V6(self.ipv6),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];
}

/// The bridge network: a namespace playing the host, a bridge and containers.
pub struct Topology {
    pub tag: String,
    pub host: Netns,
    pub bridge: String,
    pub gateway4: Ipv4Addr,
    pub gateway6: Ipv6Addr,
    pub containers: Vec<Container>,
    namespaces: Vec<Netns>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A tag unique to this process and call: `<prefix><pid>x<n>`.
pub fn unique_tag(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawning ip {args:?}: {e}"));
    if !out.status.success() {
        panic!(
            "ip {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

impl Topology {
    /// Builds the host namespace `<tag>-host` with `br0` (10.77.0.1/24, fd77::1/64) and one
    /// container namespace `<tag>-<name>` per name, addressed 10.77.0.(10+i) and fd77::(10+i).
    /// `tag` must be unique among topologies that exist at the same time (see [`unique_tag`]).
    pub fn new(tag: &str, names: &[&str]) -> Topology {
        let mut t = Topology {
            tag: tag.to_owned(),
            host: Netns {
                name: format!("{tag}-host"),
            },
            bridge: "br0".into(),
            gateway4: Ipv4Addr::new(10, 77, 0, 1),
            gateway6: "fd77::1".parse().expect("address"),
            containers: Vec::new(),
            namespaces: Vec::new(),
        };
        // From here on, Drop removes whatever was created, also if a step below panics.
        t.add_netns(t.host.clone());
        let h = t.host.name.clone();
        t.host
            .run(&["sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0"]);
        t.host
            .run(&["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"]);
        ip(&["-n", &h, "link", "set", "lo", "up"]);
        ip(&["-n", &h, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &h, "addr", "add", "10.77.0.1/24", "dev", "br0"]);
        ip(&["-n", &h, "addr", "add", "fd77::1/64", "dev", "br0", "nodad"]);
        ip(&["-n", &h, "link", "set", "br0", "up"]);
        let bridge_ifindex = t.host.ifindex("br0");
        for (i, name) in names.iter().enumerate() {
            let ipv4 = Ipv4Addr::new(10, 77, 0, 10 + i as u8);
            let ipv6: Ipv6Addr = format!("fd77::{:x}", 0x10 + i).parse().expect("address");
            let c = t.add_container(name, ipv4, ipv6, bridge_ifindex);
            t.containers.push(c);
        }
        t
    }

    /// Replaces container `old` by a new one, `new`: `old`'s namespace (and with it its veth)
    /// goes, and `new` gets a namespace and host veth of its own with `old`'s addresses, as
    /// Docker hands a freed address to the next container.
    pub fn replace_container(&mut self, old: &str, new: &str) -> Container {
        let pos = self
            .containers
            .iter()
            .position(|c| c.name == old)
            .unwrap_or_else(|| panic!("no container {old} in topology {}", self.tag));
        let gone = self.containers.remove(pos);
        ip(&["netns", "del", &gone.ns.name]);
        self.namespaces.retain(|n| *n != gone.ns);
        let n = self.add_container(new, gone.ipv4, gone.ipv6, gone.bridge_ifindex);
        self.containers.push(n.clone());
        n
    }

    /// A namespace outside the bridge, routed through the host like a neighbour on the uplink:
    /// `<tag>-<name>` with `eth0` 192.0.2.2/24 and 2001:db8:2::2/64 and routes to the
    /// containers' subnets via the host's end `up-<name>` (192.0.2.1/24, 2001:db8:2::1/64); the
    /// host forwards between the two. Returns the namespace and the ifindex of the host's end.
    pub fn add_outside(&mut self, name: &str) -> (Netns, u32) {
        let ns = Netns {
            name: format!("{}-{name}", self.tag),
        };
        self.add_netns(ns.clone());
        let h = self.host.name.clone();
        let up = format!("up-{name}");
        assert!(up.len() <= 15, "outside name {name} too long");
        ip(&[
            "-n", &h, "link", "add", &up, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        ip(&["-n", &h, "addr", "add", "192.0.2.1/24", "dev", &up]);
        ip(&[
            "-n",
            &h,
            "addr",
            "add",
            "2001:db8:2::1/64",
            "dev",
            &up,
            "nodad",
        ]);
        ip(&["-n", &h, "link", "set", &up, "up"]);
        self.host.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        self.host
            .run(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        // No reverse-path filter: as for IPv6, which has none, or a host with it off or loose.
        self.host
            .run(&["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"]);
        self.host
            .run(&["sysctl", "-qw", &format!("net.ipv4.conf.{up}.rp_filter=0")]);
        let c = &ns.name;
        ip(&["-n", c, "link", "set", "lo", "up"]);
        ip(&["-n", c, "addr", "add", "192.0.2.2/24", "dev", "eth0"]);
        ip(&[
            "-n",
            c,
            "addr",
            "add",
            "2001:db8:2::2/64",
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&["-n", c, "link", "set", "eth0", "up"]);
        ip(&["-n", c, "route", "add", "10.77.0.0/24", "via", "192.0.2.1"]);
        ip(&[
            "-n",
            c,
            "-6",
            "route",
            "add",
            "fd77::/64",
            "via",
            "2001:db8:2::1",
        ]);
        let ifindex = self.host.ifindex(&up);
        (ns, ifindex)
    }

    /// Makes container `name`'s namespace and its veth on `br0`, addressed `ipv4` / `ipv6`.
    fn add_container(
        &mut self,
        name: &str,
        ipv4: Ipv4Addr,
        ipv6: Ipv6Addr,
        bridge_ifindex: u32,
    ) -> Container {
        let ns = Netns {
            name: format!("{}-{name}", self.tag),
        };
        self.add_netns(ns.clone());
        let h = self.host.name.clone();
        let c = &ns.name;
        ns.run(&["sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0"]);
        ns.run(&["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"]);
        let host_veth = format!("v-{name}");
        assert!(host_veth.len() <= 15, "container name {name} too long");
        ip(&[
            "-n", &h, "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns", c,
        ]);
        ip(&["-n", &h, "link", "set", &host_veth, "master", "br0", "up"]);
        ip(&["-n", c, "link", "set", "lo", "up"]);
        ip(&["-n", c, "addr", "add", &format!("{ipv4}/24"), "dev", "eth0"]);
        ip(&[
            "-n",
            c,
            "addr",
            "add",
            &format!("{ipv6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        ip(&["-n", c, "link", "set", "eth0", "up"]);
        ip(&["-n", c, "route", "add", "default", "via", "10.77.0.1"]);
        ip(&["-n", c, "-6", "route", "add", "default", "via", "fd77::1"]);
        let ifindex = self.host.ifindex(&host_veth);
        Container {
            name: name.to_owned(),
            ns,
            host_veth,
            ifindex,
            bridge_ifindex,
            ipv4,
            ipv6,
        }
    }

    fn add_netns(&mut self, ns: Netns) {
        ip(&["netns", "add", &ns.name]);
        self.namespaces.push(ns);
    }

    pub fn container(&self, name: &str) -> &Container {
        self.containers
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no container {name} in topology {}", self.tag))
    }

    pub fn gateway(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(self.gateway4),
            Family::V6 => IpAddr::V6(self.gateway6),
        }
    }

    /// Removes every namespace; returns the failures (an empty list when all went).
    pub fn teardown(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        // Containers first, so their veths go before the bridge; the host namespace last.
        while let Some(ns) = self.namespaces.pop() {
            match Command::new("ip")
                .args(["netns", "del", &ns.name])
                .stdin(Stdio::null())
                .output()
            {
                Ok(o) if o.status.success() => {}
                Ok(o) => errors.push(format!(
                    "ip netns del {}: {}",
                    ns.name,
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                Err(e) => errors.push(format!("ip netns del {}: {e}", ns.name)),
            }
        }
        errors
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let errors = self.teardown();
        if !errors.is_empty() {
            eprintln!("topology {} teardown: {}", self.tag, errors.join("; "));
        }
    }
}

/// Outcome of a TCP connection attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Connect {
    Connected,
    /// An RST came back: reachable, but nothing listens (or a reset on purpose).
    Refused,
    /// No answer within the timeout: the SYN (or its SYN-ACK) was dropped.
    TimedOut,
    Other(String),
}

fn classify(r: io::Result<TcpStream>) -> (Connect, Option<TcpStream>) {
    match r {
        Ok(s) => (Connect::Connected, Some(s)),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => (Connect::Refused, None),
        Err(e) if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock => {
            (Connect::TimedOut, None)
        }
        Err(e) => (Connect::Other(e.to_string()), None),
    }
}

/// Connects from inside `ns` to `to`, waiting at most `timeout`, then closes the connection.
pub fn tcp_connect(ns: &Netns, to: SocketAddr, timeout: Duration) -> Connect {
    ns.run_in(move || classify(TcpStream::connect_timeout(&to, timeout)).0)
}

/// Opens a TCP connection from inside `ns` and keeps it (the socket stays in `ns`).
pub fn tcp_open(ns: &Netns, to: SocketAddr, timeout: Duration) -> Result<TcpStream, Connect> {
    ns.run_in(
        move || match classify(TcpStream::connect_timeout(&to, timeout)) {
            (_, Some(s)) => Ok(s),
            (c, None) => Err(c),
        },
    )
}

/// Sends `msg` on `s` and reads the echo back within `timeout`.
pub fn echo_roundtrip(s: &mut TcpStream, msg: &[u8], timeout: Duration) -> io::Result<()> {
    s.set_read_timeout(Some(timeout))?;
    s.write_all(msg)?;
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf)?;
    if buf != msg {
        return Err(io::Error::other(format!(
            "echo mismatch: sent {msg:?}, got {buf:?}"
        )));
    }
    Ok(())
}

/// A TCP echo server listening in a namespace (on every address, IPv4 and IPv6). Stops, and
/// closes every connection it accepted, when dropped.
pub struct EchoServer {
    pub port: u16,
    listener: TcpListener,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ns: &Netns, port: u16) -> EchoServer {
        // `[::]` with IPV6_V6ONLY off (Linux default) takes IPv4 too.
        let listener = ns.run_in(move || {
            TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
                .unwrap_or_else(|e| panic!("listen on port {port}: {e}"))
        });
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let l = listener.try_clone().expect("clone listener");
        let c = conns.clone();
        let accept = std::thread::spawn(move || {
            // Ends when `shutdown` on the listener makes accept fail.
            while let Ok((mut s, _)) = l.accept() {
                if let Ok(clone) = s.try_clone() {
                    c.lock().unwrap_or_else(|e| e.into_inner()).push(clone);
                }
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        EchoServer {
            port,
            listener,
            conns,
            accept: Some(accept),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        // SAFETY: shutting down our own listening socket wakes the blocked accept (Linux).
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        for s in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// A UDP echo server in a namespace (on every address, IPv4 and IPv6): every datagram goes back
/// whole to its sender. Stops when dropped.
pub struct UdpEchoServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEchoServer {
    pub fn start(ns: &Netns, port: u16) -> UdpEchoServer {
        let sock = ns.run_in(move || {
            UdpSocket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
                .unwrap_or_else(|e| panic!("UDP bind on port {port}: {e}"))
        });
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap_or_else(|e| panic!("UDP read timeout: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], peer);
                }
            }
        });
        UdpEchoServer {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

/// Sends one datagram holding `payload` from inside `ns` to `to` and waits up to `timeout` for
/// one to come back: its bytes, or `None` when nothing came.
pub fn udp_exchange(
    ns: &Netns,
    to: SocketAddr,
    payload: Vec<u8>,
    timeout: Duration,
) -> Option<Vec<u8>> {
    ns.run_in(move || {
        let any: SocketAddr = if to.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let s = UdpSocket::bind(any).unwrap_or_else(|e| panic!("UDP bind: {e}"));
        s.set_read_timeout(Some(timeout))
            .unwrap_or_else(|e| panic!("UDP read timeout: {e}"));
        s.send_to(&payload, to)
            .unwrap_or_else(|e| panic!("UDP send to {to}: {e}"));
        let mut buf = vec![0u8; 65536];
        let (n, _) = s.recv_from(&mut buf).ok()?;
        Some(buf[..n].to_vec())
    })
}

/// Polls `f` until it returns `Some`, or panics with `what` after `deadline`.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// A child process killed (by its pid) and reaped when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A bpffs pin directory that is removed (with everything pinned in it) when dropped: programs
/// whose last link pin goes are detached.
pub struct PinDir(pub PathBuf);

impl PinDir {
    /// `/sys/fs/bpf/netpol-test-<name>-<pid>`: never the real agent's `/sys/fs/bpf/netpol`.
    pub fn unique(name: &str) -> PinDir {
        let p = PathBuf::from(format!(
            "/sys/fs/bpf/netpol-test-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        PinDir(p)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if self.0.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.0) {
                eprintln!("removing pins {}: {e}", self.0.display());
            }
        }
    }
}

/// What a datapath loader process writes into the maps, as plain data with a line-based text
/// form, so a test or benchmark can hand it to a separate process (`netpol-netns-loader`).
///
/// ```text
/// endpoint <ifindex> <identity> <ipv4|-> <ipv6|-> <ingress 0|1> <egress 0|1>
/// ipcache <addr>/<len> <identity>
/// ifaces <addr> <veth ifindex> <bridge ifindex>   (the ipcache entry of a container's address)
///                         (an identity 1 = host /32 or /128 is a host address, as the agent
///                         writes it: from the host's stack only)
/// policy <local> <remote> <in|out> <proto> <port> <prefix_len> <allow|deny> <rule>
/// attach <ifindex>
/// detach <ifindex>        (after the attaches)
/// attach-mode <tcx|netlink>   (forces the attach mode; default: probed)
/// replace-policy          (delete POLICY entries that the plan does not hold)
/// ct <entries>            (max_entries of CT4 and CT6; the new-flow tables get a quarter)
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathPlan {
    pub endpoints: Vec<PlanEndpoint>,
    pub ipcache: Vec<(IpAddr, u8, u32)>,
    /// Container addresses: the interfaces their packets must come in through.
    pub ifaces: Vec<(IpAddr, u32, u32)>,
    pub policy: Vec<PlanPolicy>,
    pub attach: Vec<u32>,
    pub detach: Vec<u32>,
    /// `Some("tcx")` / `Some("netlink")` forces the attach mode.
    pub attach_mode: Option<String>,
    pub replace_policy: bool,
    /// `max_entries` of the conntrack maps, when not the default.
    pub ct_entries: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanEndpoint {
    pub ifindex: u32,
    pub identity: u32,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub ingress: bool,
    pub egress: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PlanPolicy {
    pub local: u32,
    pub remote: u32,
    /// `false`: ingress (to the container), `true`: egress.
    pub egress: bool,
    pub proto: u8,
    pub port: u16,
    pub prefix_len: u32,
    pub deny: bool,
    pub rule: u32,
}

impl PlanPolicy {
    /// Allows `remote` → `local` (ingress) on one protocol and port.
    pub fn allow_in(local: u32, remote: u32, proto: u8, port: u16, rule: u32) -> Self {
        PlanPolicy {
            local,
            remote,
            egress: false,
            proto,
            port,
            prefix_len: 96,
            deny: false,
            rule,
        }
    }

    /// Allows `local` → `remote` (egress) on one protocol and port.
    pub fn allow_out(local: u32, remote: u32, proto: u8, port: u16, rule: u32) -> Self {
        PlanPolicy {
            egress: true,
            ..Self::allow_in(local, remote, proto, port, rule)
        }
    }
}

impl Container {
    /// The endpoint of this container with the given identity and enforced directions.
    pub fn endpoint(&self, identity: u32, ingress: bool, egress: bool) -> PlanEndpoint {
        PlanEndpoint {
            ifindex: self.ifindex,
            identity,
            ipv4: Some(self.ipv4),
            ipv6: Some(self.ipv6),
            ingress,
            egress,
        }
    }
}

impl DatapathPlan {
    /// Adds the container as an endpoint, its /32 and /128 to the ipcache, and attaches it.
    pub fn container(&mut self, c: &Container, identity: u32, ingress: bool, egress: bool) {
        self.endpoints.push(c.endpoint(identity, ingress, egress));
        self.ipcache.push((IpAddr::V4(c.ipv4), 32, identity));
        self.ipcache.push((IpAddr::V6(c.ipv6), 128, identity));
        for a in [IpAddr::V4(c.ipv4), IpAddr::V6(c.ipv6)] {
            self.ifaces.push((a, c.ifindex, c.bridge_ifindex));
        }
        self.attach.push(c.ifindex);
    }

    /// Runs `loader` (the `netpol-netns-loader` binary, which exits when done) on this plan for
    /// topology `t`, pinning under `pins`; panics with its stderr when it fails. Returns its
    /// summary line (stdout).
    pub fn load(&self, loader: &Path, pins: &PinDir, t: &Topology) -> String {
        let name = pins
            .path()
            .file_name()
            .expect("pin dir name")
            .to_string_lossy();
        let file = std::env::temp_dir().join(format!("{name}.plan"));
        std::fs::write(&file, self.to_text()).expect("writing the plan");
        let out = Command::new(loader)
            .arg(pins.path())
            .arg(&t.host.name)
            .arg(&file)
            .output()
            .expect("spawning netpol-netns-loader");
        let _ = std::fs::remove_file(&file);
        assert!(
            out.status.success(),
            "loader failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let opt = |a: Option<String>| a.unwrap_or_else(|| "-".into());
        for e in &self.endpoints {
            let _ = writeln!(
                s,
                "endpoint {} {} {} {} {} {}",
                e.ifindex,
                e.identity,
                opt(e.ipv4.map(|a| a.to_string())),
                opt(e.ipv6.map(|a| a.to_string())),
                u8::from(e.ingress),
                u8::from(e.egress)
            );
        }
        for (a, l, id) in &self.ipcache {
            let _ = writeln!(s, "ipcache {a}/{l} {id}");
        }
        for (a, veth, bridge) in &self.ifaces {
            let _ = writeln!(s, "ifaces {a} {veth} {bridge}");
        }
        for p in &self.policy {
            let _ = writeln!(
                s,
                "policy {} {} {} {} {} {} {} {}",
                p.local,
                p.remote,
                if p.egress { "out" } else { "in" },
                p.proto,
                p.port,
                p.prefix_len,
                if p.deny { "deny" } else { "allow" },
                p.rule
            );
        }
        for i in &self.attach {
            let _ = writeln!(s, "attach {i}");
        }
        for i in &self.detach {
            let _ = writeln!(s, "detach {i}");
        }
        if let Some(m) = &self.attach_mode {
            let _ = writeln!(s, "attach-mode {m}");
        }
        if self.replace_policy {
            s.push_str("replace-policy\n");
        }
        if let Some(n) = self.ct_entries {
            let _ = writeln!(s, "ct {n}");
        }
        s
    }

    pub fn parse(text: &str) -> Result<DatapathPlan, String> {
        let mut plan = DatapathPlan::default();
        for (n, line) in text.lines().enumerate() {
            let bad = |what: &str| format!("plan line {}: {what}: {line:?}", n + 1);
            let f: Vec<&str> = line.split_whitespace().collect();
            let num = |i: usize| -> Result<u32, String> {
                f.get(i)
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| bad("bad number"))
            };
            match f.first().copied() {
                None => {}
                Some("endpoint") if f.len() == 7 => plan.endpoints.push(PlanEndpoint {
                    ifindex: num(1)?,
                    identity: num(2)?,
                    ipv4: match f[3] {
                        "-" => None,
                        a => Some(a.parse().map_err(|_| bad("bad IPv4 address"))?),
                    },
                    ipv6: match f[4] {
                        "-" => None,
                        a => Some(a.parse().map_err(|_| bad("bad IPv6 address"))?),
                    },
                    ingress: num(5)? == 1,
                    egress: num(6)? == 1,
                }),
                Some("ipcache") if f.len() == 3 => {
                    let (a, l) = f[1].split_once('/').ok_or_else(|| bad("no prefix"))?;
                    plan.ipcache.push((
                        a.parse().map_err(|_| bad("bad address"))?,
                        l.parse().map_err(|_| bad("bad prefix"))?,
                        num(2)?,
                    ));
                }
                Some("ifaces") if f.len() == 4 => plan.ifaces.push((
                    f[1].parse().map_err(|_| bad("bad address"))?,
                    num(2)?,
                    num(3)?,
                )),
                Some("policy") if f.len() == 9 => plan.policy.push(PlanPolicy {
                    local: num(1)?,
                    remote: num(2)?,
                    egress: match f[3] {
                        "in" => false,
                        "out" => true,
                        _ => return Err(bad("direction is in or out")),
                    },
                    proto: u8::try_from(num(4)?).map_err(|_| bad("proto"))?,
                    port: u16::try_from(num(5)?).map_err(|_| bad("port"))?,
                    prefix_len: num(6)?,
                    deny: match f[7] {
                        "allow" => false,
                        "deny" => true,
                        _ => return Err(bad("action is allow or deny")),
                    },
                    rule: num(8)?,
                }),
                Some("attach") if f.len() == 2 => plan.attach.push(num(1)?),
                Some("detach") if f.len() == 2 => plan.detach.push(num(1)?),
                Some("attach-mode") if f.len() == 2 => plan.attach_mode = Some(f[1].to_owned()),
                Some("replace-policy") if f.len() == 1 => plan.replace_policy = true,
                Some("ct") if f.len() == 2 => plan.ct_entries = Some(num(1)?),
                Some(_) => return Err(bad("unknown or malformed line")),
            }
        }
        Ok(plan)
    }
}

/// A SCHED_CLS program `mov r0, 0 (TC_ACT_OK); exit`, loaded with raw bpf(2): a stand-in for
/// another tool's program that passes everything and ends the TCX chain.
pub fn load_pass_all() -> std::os::fd::OwnedFd {
    try_load_returning(0, "pass_all").unwrap_or_else(|e| panic!("BPF_PROG_LOAD: {e}"))
}

/// A SCHED_CLS program of two instructions, `mov r0, verdict; exit`, loaded with raw bpf(2) and
/// named `name` (at most 15 bytes). `verdict` -1 (`TC_ACT_UNSPEC`) passes the packet on as if no
/// program ran (the benchmark's `noop` peer); 0 (`TC_ACT_OK`) accepts it and ends the TCX chain.
pub fn try_load_returning(verdict: i32, name: &str) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    if name.len() > 15 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "name too long"));
    }
    let insns: [u64; 2] = [
        // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm verdict (sign-extended)
        0xb7 | (u64::from(verdict as u32) << 32),
        // BPF_JMP | BPF_EXIT
        0x95,
    ];
    let license = c"GPL";
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&3u32.to_ne_bytes()); // BPF_PROG_TYPE_SCHED_CLS
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[48..48 + name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: a valid BPF_PROG_LOAD attribute block; the pointers outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 5, attr.as_ptr(), attr.len()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_TCX_INGRESS`, for [`tcx_link_first`].
pub const TCX_INGRESS: u32 = 46;
/// `BPF_TCX_EGRESS`, for [`tcx_link_first`].
pub const TCX_EGRESS: u32 = 47;

/// Creates a TCX link of `prog` first in the `attach_type` chain ([`TCX_INGRESS`] or
/// [`TCX_EGRESS`]) of `ifindex`, in the calling thread's namespace. Closing the returned fd
/// detaches it.
pub fn tcx_link_first(
    prog: &std::os::fd::OwnedFd,
    ifindex: u32,
    attach_type: u32,
) -> std::os::fd::OwnedFd {
    try_tcx_link_first(prog, ifindex, attach_type)
        .unwrap_or_else(|e| panic!("BPF_LINK_CREATE: {e}"))
}

/// [`tcx_link_first`], returning the error.
pub fn try_tcx_link_first(
    prog: &std::os::fd::OwnedFd,
    ifindex: u32,
    attach_type: u32,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let mut attr = [0u8; 64];
    attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    attr[8..12].copy_from_slice(&attach_type.to_ne_bytes());
    // BPF_F_BEFORE with no relative program: first.
    attr[12..16].copy_from_slice(&(1u32 << 3).to_ne_bytes());
    // SAFETY: a valid BPF_LINK_CREATE attribute block.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 28, attr.as_ptr(), attr.len()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}
