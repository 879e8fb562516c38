//! Tier 3: IPv6 masquerade with real traffic between network namespaces.
//!
//! ```text
//!  c1 (fd00:42::2) ─┐                                  ┌──────────── rtr ────────────┐
//!                   ├─ br0 (fd00:42::1) ── host ── up0 ─ eth0 2001:db8:1::1   eth1 ─┼─ srv 2001:db8:2::2
//!  c2 (fd00:42::3) ─┘        2001:db8:1::2 on up0      │          2001:db8:2::1, MTU 1280   │
//! ```
//!
//! Every node is a namespace of its own ("host" too), so nothing touches the real host's routes or
//! firewall. `rtr` has no route back to `fd00:42::/64`: a container reaches `srv` only through
//! the masquerade. The same scenario runs with netpol's programs on `up0` and with
//! `ip6tables -t nat -A POSTROUTING -s fd00:42::/64 -o up0 -j MASQUERADE`, and both must give
//! the same observations.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd},
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use netpol_agent::datapath::{
    masq6::{self, AttachMode, Masq6, Masq6Options, Masq6Settings, PrefixKind},
    Cidr,
};
use netpol_tests::{
    netns::{load_pass_all, tcx_link_first, TCX_EGRESS, TCX_INGRESS},
    require_root,
};

const PREFIX: &str = "fd00:42::/64";
const C1: &str = "fd00:42::2";
const C2: &str = "fd00:42::3";
const UPLINK: &str = "2001:db8:1::2";
const ROUTER: &str = "2001:db8:1::1";
const SERVER: &str = "2001:db8:2::2";
const TCP_PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;
/// Echoes every datagram whole (larger than the path's MTU: fragmented both ways).
const UDP_ECHO_PORT: u16 = 7002;

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"))
}

/// Runs a command that must succeed.
fn run(args: &[&str]) -> String {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `f` on a thread that has entered the network namespace `ns`.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(ns);
            f()
        })
        .join()
        .unwrap_or_else(|_| panic!("thread in {ns} panicked"))
    })
}

fn enter_netns(ns: &str) {
    let path = format!("/run/netns/{ns}");
    let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: a valid namespace fd; only this thread moves.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// The namespaces of one topology; dropping it deletes them (and with them every veth, the
/// bridge and the TCX links) and the test's pin directory.
struct Topology {
    tag: String,
    pin_dir: PathBuf,
    stop: Arc<AtomicBool>,
}

impl Topology {
    fn ns(&self, role: &str) -> String {
        format!("{}{role}", self.tag)
    }

    fn exec(&self, role: &str, args: &[&str]) -> std::process::Output {
        let ns = self.ns(role);
        let mut full = vec!["ip", "netns", "exec", ns.as_str()];
        full.extend_from_slice(args);
        sh(&full)
    }

    fn must(&self, role: &str, args: &[&str]) -> String {
        let ns = self.ns(role);
        let mut full = vec!["ip", "netns", "exec", ns.as_str()];
        full.extend_from_slice(args);
        run(&full)
    }

    /// `strict_checksums`: every veth computes and verifies checksums in software (no
    /// `CHECKSUM_PARTIAL` packets, no "unnecessary" marks on receive), so a wrong checksum after
    /// translation makes the receiver drop the packet instead of passing unnoticed.
    fn build(name: &str, strict_checksums: bool) -> Self {
        // Short and unique: namespace names show in `ip netns`, interface names stay inside.
        let tag = format!("m6{name}{}-", std::process::id() % 100_000);
        let t = Self {
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/netpol-test-{tag}")),
            tag,
            stop: Arc::new(AtomicBool::new(false)),
        };
        for role in ["host", "c1", "c2", "rtr", "srv"] {
            run(&["ip", "netns", "add", &t.ns(role)]);
            for k in ["all", "default"] {
                t.must(
                    role,
                    &["sysctl", "-qw", &format!("net.ipv6.conf.{k}.accept_dad=0")],
                );
            }
            t.must(role, &["ip", "link", "set", "lo", "up"]);
        }
        for role in ["host", "rtr"] {
            t.must(role, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        }
        let (host, rtr, srv) = (t.ns("host"), t.ns("rtr"), t.ns("srv"));
        run(&["ip", "-n", &host, "link", "add", "br0", "type", "bridge"]);
        run(&[
            "ip",
            "-n",
            &host,
            "addr",
            "add",
            "fd00:42::1/64",
            "dev",
            "br0",
            "nodad",
        ]);
        run(&["ip", "-n", &host, "link", "set", "br0", "up"]);
        for (role, addr) in [("c1", C1), ("c2", C2)] {
            let ns = t.ns(role);
            let veth = format!("v{role}");
            run(&[
                "ip", "-n", &host, "link", "add", &veth, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            run(&[
                "ip", "-n", &host, "link", "set", &veth, "master", "br0", "up",
            ]);
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            run(&[
                "ip",
                "-n",
                &ns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                "fd00:42::1",
            ]);
        }
        run(&[
            "ip", "-n", &host, "link", "add", "up0", "type", "veth", "peer", "name", "eth0",
            "netns", &rtr,
        ]);
        run(&[
            "ip",
            "-n",
            &host,
            "addr",
            "add",
            &format!("{UPLINK}/64"),
            "dev",
            "up0",
            "nodad",
        ]);
        run(&["ip", "-n", &host, "link", "set", "up0", "up"]);
        run(&[
            "ip", "-n", &host, "-6", "route", "add", "default", "via", ROUTER, "dev", "up0",
        ]);
        run(&[
            "ip",
            "-n",
            &rtr,
            "addr",
            "add",
            &format!("{ROUTER}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        run(&["ip", "-n", &rtr, "link", "set", "eth0", "up"]);
        // The last hop has a smaller MTU: packet-too-big comes from the router.
        run(&[
            "ip", "-n", &rtr, "link", "add", "eth1", "mtu", "1280", "type", "veth", "peer", "name",
            "eth0", "netns", &srv,
        ]);
        run(&[
            "ip",
            "-n",
            &rtr,
            "addr",
            "add",
            "2001:db8:2::1/64",
            "dev",
            "eth1",
            "nodad",
        ]);
        run(&["ip", "-n", &rtr, "link", "set", "eth1", "up"]);
        run(&["ip", "-n", &srv, "link", "set", "eth0", "mtu", "1280"]);
        run(&[
            "ip",
            "-n",
            &srv,
            "addr",
            "add",
            &format!("{SERVER}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        run(&["ip", "-n", &srv, "link", "set", "eth0", "up"]);
        run(&[
            "ip",
            "-n",
            &srv,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8:2::1",
        ]);
        if strict_checksums {
            for (role, devs) in [
                ("host", &["vc1", "vc2", "up0"][..]),
                ("c1", &["eth0"][..]),
                ("c2", &["eth0"][..]),
                ("rtr", &["eth0", "eth1"][..]),
                ("srv", &["eth0"][..]),
            ] {
                in_netns(&t.ns(role), || {
                    for dev in devs {
                        no_checksum_offload(dev);
                    }
                });
            }
        }
        t
    }

    /// Packets the kernel of `role` dropped for a bad TCP, UDP or ICMPv6 checksum.
    fn csum_errors(&self, role: &str) -> u64 {
        let mut total = 0;
        for file in ["/proc/net/snmp", "/proc/net/snmp6"] {
            let text = self.must(role, &["cat", file]);
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                // snmp6: "Icmp6InCsumErrors 0"; snmp: a header line of names, then values.
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() == 2 && f[0].ends_with("InCsumErrors") {
                    total += f[1].parse::<u64>().unwrap_or(0);
                } else if let Some(values) = lines.get(i + 1) {
                    let v: Vec<&str> = values.split_whitespace().collect();
                    if f.first() == v.first() && !f.get(1).is_some_and(|x| x.parse::<u64>().is_ok())
                    {
                        for (name, val) in f.iter().zip(v.iter()) {
                            if *name == "InCsumErrors" {
                                total += val.parse::<u64>().unwrap_or(0);
                            }
                        }
                    }
                }
            }
        }
        total
    }

    /// netpol's masquerade on `up0`, its maps pinned in this topology's own directory.
    fn netpol(&self) -> Masq6 {
        self.netpol_with(None)
    }

    /// [`Self::netpol`] attached in `mode` (`None`: probed).
    fn netpol_with(&self, mode: Option<AttachMode>) -> Masq6 {
        let opts = Masq6Options {
            pin_dir: self.pin_dir.clone(),
            snat6_entries: 4096,
            ..Masq6Options::default()
        };
        in_netns(&self.ns("host"), || {
            let uplink = masq6::detect_uplink().unwrap_or_else(|e| panic!("uplink: {e}"));
            assert_eq!(uplink.name, "up0", "the default route's interface");
            assert_eq!(uplink.addr, Some(v6(UPLINK)));
            assert_eq!(uplink.l2_len, 14);
            let mut m = Masq6::load(&opts).unwrap_or_else(|e| panic!("load: {e}"));
            m.attach_with(&uplink.name, mode)
                .unwrap_or_else(|e| panic!("attach: {e}"));
            let settings = Masq6Settings::new(&uplink, v6(UPLINK));
            m.configure(&settings)
                .unwrap_or_else(|e| panic!("configure: {e}"));
            let prefix: Cidr = PREFIX.parse().unwrap_or_else(|e| panic!("{e}"));
            m.add_prefix(prefix, PrefixKind::Masquerade)
                .unwrap_or_else(|e| panic!("prefix: {e}"));
            let local = Cidr::host(IpAddr::V6(v6(UPLINK)));
            m.add_prefix(local, PrefixKind::Local)
                .unwrap_or_else(|e| panic!("prefix: {e}"));
            m
        })
    }

    fn ip6tables(&self) {
        self.must(
            "host",
            &[
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
            ],
        );
    }

    /// A TCP server on srv: each line read is answered with "<peer> <line>"; "GET n" is answered
    /// with n bytes. A UDP server answers each datagram with "<peer>".
    fn servers(&self) {
        let (tcp, udp, echo) = in_netns(&self.ns("srv"), || {
            let t = TcpListener::bind((v6(SERVER), TCP_PORT))
                .unwrap_or_else(|e| panic!("tcp bind: {e}"));
            let u =
                UdpSocket::bind((v6(SERVER), UDP_PORT)).unwrap_or_else(|e| panic!("udp bind: {e}"));
            let e = UdpSocket::bind((v6(SERVER), UDP_ECHO_PORT))
                .unwrap_or_else(|e| panic!("udp bind: {e}"));
            (t, u, e)
        });
        let stop = self.stop.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if !readable(echo.as_raw_fd(), 100) {
                    continue;
                }
                if let Ok((n, peer)) = echo.recv_from(&mut buf) {
                    let _ = echo.send_to(&buf[..n], peer);
                }
            }
        });
        let stop = self.stop.clone();
        tcp.set_nonblocking(true)
            .unwrap_or_else(|e| panic!("nonblocking: {e}"));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if !readable(tcp.as_raw_fd(), 100) {
                    continue;
                }
                let Ok((conn, peer)) = tcp.accept() else {
                    continue;
                };
                std::thread::spawn(move || serve_tcp(conn, peer));
            }
        });
        let stop = self.stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if !readable(udp.as_raw_fd(), 100) {
                    continue;
                }
                if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(peer.to_string().as_bytes(), peer);
                }
            }
        });
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::env::var_os("MASQ6_KEEP_NETNS").is_some() {
            eprintln!("keeping namespaces {}*", self.tag);
            return;
        }
        self.stop.store(true, Ordering::Relaxed);
        // In the namespace of up0 (a clsact record names an interface by index), never the
        // host's.
        if std::path::Path::new("/run/netns")
            .join(self.ns("host"))
            .exists()
        {
            in_netns(&self.ns("host"), || {
                let _ = masq6::remove_pins(&self.pin_dir);
            });
        }
        for role in ["c1", "c2", "srv", "rtr", "host"] {
            let _ = sh(&["ip", "netns", "del", &self.ns(role)]);
        }
        let _ = std::fs::remove_dir(&self.pin_dir);
    }
}

/// Turns off receive and transmit checksum offload of `dev` (`ethtool -K dev rx off tx off`).
fn no_checksum_offload(dev: &str) {
    const ETHTOOL_SRXCSUM: u32 = 0x15;
    const ETHTOOL_STXCSUM: u32 = 0x17;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    // SAFETY: plain socket/ioctl calls on a descriptor this function owns; `ifr` points at a
    // live `EthtoolValue` for the duration of the call.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        for cmd in [ETHTOOL_SRXCSUM, ETHTOOL_STXCSUM] {
            let mut v = EthtoolValue { cmd, data: 0 };
            let mut ifr: libc::ifreq = std::mem::zeroed();
            for (d, s) in ifr.ifr_name.iter_mut().zip(dev.bytes()) {
                *d = s as libc::c_char;
            }
            ifr.ifr_ifru.ifru_data = (&mut v as *mut EthtoolValue).cast();
            let r = libc::ioctl(fd, libc::SIOCETHTOOL, &mut ifr);
            assert!(
                r >= 0,
                "ethtool {dev} {cmd:#x}: {}",
                std::io::Error::last_os_error()
            );
        }
        libc::close(fd);
    }
}

/// Waits up to `ms` for `fd` to become readable.
fn readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

fn serve_tcp(conn: TcpStream, peer: SocketAddr) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(mut w) = conn.try_clone() else { return };
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    while r.read_line(&mut line).is_ok_and(|n| n > 0) {
        let l = line.trim_end();
        let reply = if let Some(n) = l.strip_prefix("GET ") {
            let n: usize = n.parse().unwrap_or(0);
            vec![b'x'; n]
        } else {
            format!("{peer} {l}\n").into_bytes()
        };
        if w.write_all(&reply).is_err() {
            return;
        }
        line.clear();
    }
}

/// A TCP connection from the calling thread's namespace, from `[::]:sport` (0: any).
fn connect(sport: u16) -> std::io::Result<TcpStream> {
    // SAFETY: plain socket calls on a descriptor this function owns.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let s = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
        // Bounds connect() too: a SYN that is never answered fails after 3 s.
        s.set_write_timeout(Some(Duration::from_secs(3)))?;
        let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
        sa.sin6_family = libc::AF_INET6 as u16;
        sa.sin6_port = sport.to_be();
        if libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as u32,
        ) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        sa.sin6_port = TCP_PORT.to_be();
        sa.sin6_addr.s6_addr = v6(SERVER).octets();
        if libc::connect(
            fd,
            (&sa as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as u32,
        ) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(s)
    }
}

/// Sends one line and returns the server's answer line.
fn ask(s: &mut TcpStream, what: &str) -> std::io::Result<String> {
    s.write_all(format!("{what}\n").as_bytes())?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}

fn peer_of(answer: &str) -> Option<SocketAddr> {
    answer.split_whitespace().next()?.parse().ok()
}

/// What one scenario showed; both masquerades must show the same.
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    /// The address srv saw for a TCP connection, a UDP datagram (ports left out).
    tcp_peer: Option<IpAddr>,
    udp_peer: Option<IpAddr>,
    ping: bool,
    /// 1 MB downloaded over one connection.
    bulk: bool,
    /// Both containers, both from port 40000 at once, got their answers (TCP, UDP).
    same_port_tcp: bool,
    same_port_udp: bool,
    /// …and srv saw two different ports.
    same_port_distinct: bool,
    /// A 4000-byte UDP datagram, sent in 1280-byte fragments, came back whole (the server's echo
    /// in fragments too).
    large_udp: bool,
    /// `ping -t 2` got "time exceeded" from the router.
    time_exceeded: bool,
    /// `ping -s 1400 -M do` got "packet too big, mtu 1280" from the router, and the container's
    /// kernel cached the path MTU.
    packet_too_big: bool,
    pmtu_cached: bool,
}

fn scenario(t: &Topology) -> Observed {
    let c1 = t.ns("c1");
    let c2 = t.ns("c2");

    // Ping first (also settles neighbour discovery on every hop), until it answers or 10 s pass.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ping = false;
    while Instant::now() < deadline {
        if t.exec("c1", &["ping", "-6", "-c", "1", "-W", "1", SERVER])
            .status
            .success()
        {
            ping = true;
            break;
        }
    }

    let tcp_peer = in_netns(&c1, || {
        let mut s = connect(0).ok()?;
        peer_of(&ask(&mut s, "hello").ok()?).map(|p| p.ip())
    });
    let udp_peer = in_netns(&c1, || {
        let u = UdpSocket::bind("[::]:0").ok()?;
        u.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        u.send_to(b"hi", (v6(SERVER), UDP_PORT)).ok()?;
        let mut buf = [0u8; 256];
        let (n, _) = u.recv_from(&mut buf).ok()?;
        std::str::from_utf8(&buf[..n])
            .ok()?
            .parse::<SocketAddr>()
            .ok()
            .map(|p| p.ip())
    });
    let bulk = in_netns(&c1, || {
        let Ok(mut s) = connect(0) else { return false };
        const N: usize = 1 << 20;
        if s.write_all(format!("GET {N}\n").as_bytes()).is_err() {
            return false;
        }
        let mut got = 0;
        let mut buf = vec![0u8; 65536];
        while got < N {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got == N
    });

    // Two containers, same source port, same server port, both connections open at once.
    let a = in_netns(&c1, || connect(40000));
    let b = in_netns(&c2, || connect(40000));
    let (same_port_tcp, tcp_ports) = match (a, b) {
        (Ok(mut a), Ok(mut b)) => {
            let pa = ask(&mut a, "from c1").ok().and_then(|x| peer_of(&x));
            let pb = ask(&mut b, "from c2").ok().and_then(|x| peer_of(&x));
            // Both still open: ask again on each.
            let again = ask(&mut a, "again").is_ok() && ask(&mut b, "again").is_ok();
            (
                pa.is_some() && pb.is_some() && again,
                pa.zip(pb).map(|(x, y)| (x.port(), y.port())),
            )
        }
        _ => (false, None),
    };
    let udp_from = |ns: &str| {
        in_netns(ns, || {
            let u = UdpSocket::bind("[::]:40000").ok()?;
            u.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            u.send_to(b"x", (v6(SERVER), UDP_PORT)).ok()?;
            let mut buf = [0u8; 256];
            let (n, _) = u.recv_from(&mut buf).ok()?;
            std::str::from_utf8(&buf[..n])
                .ok()?
                .parse::<SocketAddr>()
                .ok()
        })
    };
    let ua = udp_from(&c1);
    let ub = udp_from(&c2);
    let same_port_udp = ua.is_some() && ub.is_some();
    let same_port_distinct = match (tcp_ports, ua.zip(ub)) {
        (Some((x, y)), Some((p, q))) => x != y && p.port() != q.port(),
        _ => false,
    };

    let large_udp = in_netns(&c1, || {
        let u = UdpSocket::bind("[::]:0").ok()?;
        // Fragment at the last hop's MTU from the start (no packet-too-big round first).
        let mtu: libc::c_int = 1280;
        // SAFETY: a valid socket and option value.
        let r = unsafe {
            libc::setsockopt(
                u.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU,
                (&mtu as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        assert_eq!(r, 0, "IPV6_MTU: {}", std::io::Error::last_os_error());
        u.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let payload: Vec<u8> = (0..4000u32).map(|i| (i % 253) as u8).collect();
        u.send_to(&payload, (v6(SERVER), UDP_ECHO_PORT)).ok()?;
        let mut buf = vec![0u8; 65536];
        let (n, _) = u.recv_from(&mut buf).ok()?;
        Some(buf[..n] == payload[..])
    }) == Some(true);

    let te = t.exec(
        "c1",
        &["ping", "-6", "-c", "1", "-W", "2", "-t", "2", SERVER],
    );
    let te_out = String::from_utf8_lossy(&te.stdout);
    let time_exceeded = te_out.contains("Time exceeded") && te_out.contains(ROUTER);

    let ptb = t.exec(
        "c2",
        &[
            "ping", "-6", "-c", "1", "-W", "2", "-s", "1400", "-M", "do", SERVER,
        ],
    );
    let ptb_out = String::from_utf8_lossy(&ptb.stdout);
    let packet_too_big = ptb_out.contains("Packet too big") && ptb_out.contains("mtu=1280");
    let route =
        String::from_utf8_lossy(&t.exec("c2", &["ip", "-6", "route", "get", SERVER]).stdout)
            .into_owned();
    let pmtu_cached = route.contains("mtu 1280");

    Observed {
        tcp_peer,
        udp_peer,
        ping,
        bulk,
        same_port_tcp,
        same_port_udp,
        same_port_distinct,
        large_udp,
        time_exceeded,
        packet_too_big,
        pmtu_cached,
    }
}

fn expected() -> Observed {
    let up = Some(IpAddr::V6(v6(UPLINK)));
    Observed {
        tcp_peer: up,
        udp_peer: up,
        ping: true,
        bulk: true,
        same_port_tcp: true,
        same_port_udp: true,
        same_port_distinct: true,
        large_udp: true,
        time_exceeded: true,
        packet_too_big: true,
        pmtu_cached: true,
    }
}

#[test]
fn containers_reach_the_internet_through_netpol_masquerade() {
    if !require_root("masq6_netns::containers_reach_the_internet_through_netpol_masquerade") {
        return;
    }
    let t = Topology::build("n", true);
    t.servers();

    // Without masquerade the server's replies have no way back.
    let direct = in_netns(&t.ns("c1"), || {
        connect(0).and_then(|mut s| ask(&mut s, "hello")).is_ok()
    });
    assert!(
        !direct,
        "reached the server without any masquerade: the topology is wrong"
    );

    let m = t.netpol();
    let seen = scenario(&t);
    assert_eq!(seen, expected());
    // Checksums are verified in software on every hop here: none may have been wrong.
    for role in ["srv", "c1", "c2"] {
        assert_eq!(
            t.csum_errors(role),
            0,
            "{role} dropped packets with bad checksums"
        );
    }

    // The programs counted their work, and the SNAT6 map dumps typed through its BTF.
    let counters = m.counters().unwrap_or_else(|e| panic!("counters: {e}"));
    assert!(
        counters["translated-out"] > 0 && counters["translated-in"] > 0,
        "{counters:?}"
    );
    assert!(counters["icmp-errors"] >= 2, "{counters:?}");
    assert!(counters["ports-rewritten"] >= 2, "{counters:?}");
    let flows = m.flows().unwrap_or_else(|e| panic!("flows: {e}"));
    assert!(
        flows
            .iter()
            .any(|f| f.inside.0 == v6(C1) && f.outside.0 == v6(UPLINK) && f.complete),
        "{flows:?}"
    );
    let pinned = t.pin_dir.join("SNAT6");
    let dump = run(&[
        "bpftool",
        "-j",
        "map",
        "dump",
        "pinned",
        &pinned.to_string_lossy(),
    ]);
    for field in [
        "\"saddr\"",
        "\"sport\"",
        "\"dir\"",
        "\"expires_ns\"",
        "\"flags\"",
    ] {
        assert!(
            dump.contains(field),
            "bpftool dump has no typed {field}: {dump}"
        );
    }

    // A restarted agent re-adopts the pinned maps and links: flows keep their translation.
    drop(m);
    let again = t.netpol();
    let after = again.flows().unwrap_or_else(|e| panic!("flows: {e}"));
    assert!(!after.is_empty(), "pinned SNAT6 not re-adopted");
    let ok = in_netns(&t.ns("c2"), || {
        connect(0)
            .and_then(|mut s| ask(&mut s, "after restart"))
            .ok()
    });
    assert!(ok.is_some_and(|a| a.starts_with(&format!("[{UPLINK}]"))));

    // Detached: the containers lose the outside again.
    in_netns(&t.ns("host"), || {
        masq6::detach(&t.pin_dir, "up0").unwrap_or_else(|e| panic!("detach: {e}"))
    });
    let direct = in_netns(&t.ns("c1"), || {
        connect(0).and_then(|mut s| ask(&mut s, "hello")).is_ok()
    });
    assert!(!direct, "still translated after detach");
}

#[test]
fn netpol_and_ip6tables_masquerade_behave_alike() {
    if !require_root("masq6_netns::netpol_and_ip6tables_masquerade_behave_alike") {
        return;
    }
    let ipt = {
        let t = Topology::build("i", false);
        t.servers();
        t.ip6tables();
        scenario(&t)
    };
    let bpf = {
        let t = Topology::build("b", false);
        t.servers();
        let _m = t.netpol();
        scenario(&t)
    };
    assert_eq!(
        ipt,
        expected(),
        "ip6tables MASQUERADE itself misbehaves in this topology"
    );
    assert_eq!(
        bpf, ipt,
        "netpol's masquerade differs from ip6tables MASQUERADE"
    );
}

/// What c1's TCP connection to srv is seen from: the uplink's address when translated; `None`
/// when it gets no answer.
fn tcp_seen_as(t: &Topology) -> Option<IpAddr> {
    in_netns(&t.ns("c1"), || {
        let mut s = connect(0).ok()?;
        peer_of(&ask(&mut s, "hello").ok()?).map(|p| p.ip())
    })
}

/// Names of the programs in `up0`'s TCX chain on `ty`'s side, in order.
fn uplink_chain(t: &Topology, ty: TcAttachType) -> Vec<String> {
    in_netns(&t.ns("host"), || {
        let (_, progs) = SchedClassifier::query_tcx("up0", ty).expect("query TCX chain");
        progs
            .iter()
            .map(|p| p.name_as_str().unwrap_or("?").to_owned())
            .collect()
    })
}

/// A program that passes everything and ends the TCX chain, put first on both sides of `up0`.
fn pass_all_first(t: &Topology) -> Vec<std::os::fd::OwnedFd> {
    let prog = load_pass_all();
    in_netns(&t.ns("host"), || {
        let idx = masq6::ifindex("up0").unwrap_or_else(|e| panic!("{e}"));
        [TCX_EGRESS, TCX_INGRESS]
            .into_iter()
            .map(|ty| tcx_link_first(&prog, idx, ty))
            .collect()
    })
}

#[test]
fn a_foreign_tcx_program_never_runs_before_the_masquerade() {
    if !require_root("masq6_netns::a_foreign_tcx_program_never_runs_before_the_masquerade") {
        return;
    }
    let t = Topology::build("o", false);
    t.servers();
    let up = Some(IpAddr::V6(v6(UPLINK)));
    // Another tool was there first.
    let early = pass_all_first(&t);
    let m = t.netpol_with(Some(AttachMode::Tcx));
    for ty in [TcAttachType::Egress, TcAttachType::Ingress] {
        let name = if ty == TcAttachType::Egress {
            "masq6_out"
        } else {
            "masq6_in"
        };
        assert_eq!(uplink_chain(&t, ty), [name, "pass_all"], "{ty:?}");
    }
    assert_eq!(
        tcp_seen_as(&t),
        up,
        "translated behind an earlier pass-all program"
    );

    // Put first while the masquerade runs, then a restart moves the masquerade first again.
    let late = pass_all_first(&t);
    assert_eq!(uplink_chain(&t, TcAttachType::Egress)[0], "pass_all");
    drop(m);
    let _again = t.netpol_with(Some(AttachMode::Tcx));
    for ty in [TcAttachType::Egress, TcAttachType::Ingress] {
        let name = if ty == TcAttachType::Egress {
            "masq6_out"
        } else {
            "masq6_in"
        };
        assert_eq!(
            uplink_chain(&t, ty),
            [name, "pass_all", "pass_all"],
            "{ty:?}: the masquerade's link moved first, the old one gone"
        );
    }
    assert_eq!(tcp_seen_as(&t), up, "translated after the restart");
    drop((early, late));
}

/// `tc filter show` lines of the bpf filters on `up0`'s `dir` side.
fn uplink_filters(t: &Topology, dir: &str) -> Vec<String> {
    String::from_utf8_lossy(
        &t.exec("host", &["tc", "filter", "show", "dev", "up0", dir])
            .stdout,
    )
    .lines()
    .filter(|l| l.contains(" bpf ") && l.contains(" handle "))
    .map(str::to_owned)
    .collect()
}

#[test]
fn clsact_masquerade_restarts_keep_one_filter_and_detach_removes_it() {
    if !require_root(
        "masq6_netns::clsact_masquerade_restarts_keep_one_filter_and_detach_removes_it",
    ) {
        return;
    }
    let t = Topology::build("c", false);
    t.servers();
    let up = Some(IpAddr::V6(v6(UPLINK)));
    for round in 0..3 {
        let m = t.netpol_with(Some(AttachMode::Netlink));
        for dir in ["ingress", "egress"] {
            let f = uplink_filters(&t, dir);
            assert_eq!(f.len(), 1, "start {round}: one filter on {dir}: {f:?}");
            assert!(
                f[0].contains("pref 1 ") && f[0].contains("handle 0x4e51 "),
                "start {round}: {f:?}"
            );
        }
        assert!(
            uplink_chain(&t, TcAttachType::Egress).is_empty(),
            "no TCX link"
        );
        assert_eq!(tcp_seen_as(&t), up, "start {round}: translated");
        drop(m);
    }
    in_netns(&t.ns("host"), || {
        masq6::detach(&t.pin_dir, "up0").unwrap_or_else(|e| panic!("detach: {e}"))
    });
    for dir in ["ingress", "egress"] {
        let f = uplink_filters(&t, dir);
        assert!(f.is_empty(), "detached: no filter left on {dir}: {f:?}");
    }
    assert_eq!(tcp_seen_as(&t), None, "still translated after detach");
    // Attached again, then uninstalled: the filters go with the pins.
    let _m = t.netpol_with(Some(AttachMode::Netlink));
    assert_eq!(uplink_filters(&t, "egress").len(), 1);
    in_netns(&t.ns("host"), || {
        masq6::remove_pins(&t.pin_dir).unwrap_or_else(|e| panic!("remove pins: {e}"))
    });
    for dir in ["ingress", "egress"] {
        let f = uplink_filters(&t, dir);
        assert!(f.is_empty(), "uninstalled: no filter left on {dir}: {f:?}");
    }
}
