//! Connectivity probes for the end-to-end tests: TCP connects made from inside a network
//! namespace (a container's, through `/proc/<pid>/ns/net`, or a test namespace), so the
//! packets leave through the container's own veth exactly as its processes' would, without the
//! cost of `docker exec`.
//!
//! A probe's outcome tells a dropped SYN ([`Outcome::Timeout`], what policy does) from a reset
//! ([`Outcome::Refused`]: the packet got through, nobody listens): only a timeout counts as
//! denied.

use std::{
    fmt,
    fs::File,
    net::{SocketAddr, TcpStream},
    os::unix::io::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

/// How long a connection that policy denies is given before it counts as dropped.
pub const DENY_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long an allowed connection may take to be established (it is retried until then).
pub const ALLOW_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The connection was established.
    Open,
    /// A reset came back: the SYN reached the peer.
    Refused,
    /// No answer within the timeout: dropped.
    Timeout,
    /// (HTTP checks) connected, but no `200` reply within the timeout: a proxy in between
    /// accepted the connection and could not reach the server.
    NoReply,
    /// Anything else (no route, …).
    Error(String),
}

/// Runs `f` on a thread that has entered the network namespace `netns` (a path such as
/// `/proc/<pid>/ns/net` or `/run/netns/<name>`). Only that thread switches namespace.
pub fn in_netns<T: Send, F: FnOnce() -> T + Send>(netns: &Path, f: F) -> T {
    let file = File::open(netns).unwrap_or_else(|e| panic!("open {}: {e}", netns.display()));
    thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a valid namespace fd; it changes only this (scoped) thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "setns {}: {}",
                netns.display(),
                std::io::Error::last_os_error()
            );
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// One TCP connect from the current namespace.
pub fn connect(to: SocketAddr, timeout: Duration) -> Outcome {
    match TcpStream::connect_timeout(&to, timeout) {
        Ok(_) => Outcome::Open,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Outcome::Refused,
        Err(e)
            if e.kind() == std::io::ErrorKind::TimedOut
                || e.kind() == std::io::ErrorKind::WouldBlock =>
        {
            Outcome::Timeout
        }
        Err(e) => Outcome::Error(e.to_string()),
    }
}

/// `GET /` over HTTP/1.0: [`Outcome::Open`] only for a `200` reply within `timeout`.
pub fn http_get(to: SocketAddr, timeout: Duration) -> Outcome {
    use std::io::{Read as _, Write as _};
    let start = Instant::now();
    let mut s = match TcpStream::connect_timeout(&to, timeout) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Outcome::Refused,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Outcome::Timeout,
        Err(e) => return Outcome::Error(e.to_string()),
    };
    let left = timeout
        .saturating_sub(start.elapsed())
        .max(Duration::from_millis(10));
    let _ = s.set_read_timeout(Some(left));
    if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_err() {
        return Outcome::NoReply;
    }
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    if reply.lines().next().is_some_and(|l| l.contains(" 200 ")) {
        Outcome::Open
    } else {
        Outcome::NoReply
    }
}

/// One TCP connect from inside `netns` (`None`: the test process's own namespace, the host).
pub fn connect_from(netns: Option<&Path>, to: SocketAddr, timeout: Duration) -> Outcome {
    match netns {
        Some(ns) => in_netns(ns, || connect(to, timeout)),
        None => connect(to, timeout),
    }
}

/// [`http_get`] from inside `netns` (`None`: the host).
pub fn http_get_from(netns: Option<&Path>, to: SocketAddr, timeout: Duration) -> Outcome {
    match netns {
        Some(ns) => in_netns(ns, || http_get(to, timeout)),
        None => http_get(to, timeout),
    }
}

/// What a check expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Allowed,
    Denied,
}

/// Where a probe runs from: a name for messages and a namespace (`None` is the host).
#[derive(Clone, Debug)]
pub struct Client {
    pub name: String,
    pub netns: Option<PathBuf>,
}

impl Client {
    pub fn host() -> Self {
        Client {
            name: "host".into(),
            netns: None,
        }
    }

    pub fn netns(name: &str, path: impl Into<PathBuf>) -> Self {
        Client {
            name: name.into(),
            netns: Some(path.into()),
        }
    }
}

/// One expected connection.
#[derive(Clone, Debug)]
pub struct Check {
    pub from: Client,
    pub to_name: String,
    pub to: SocketAddr,
    pub expect: Expect,
    /// Check an HTTP `200` reply rather than only the TCP handshake (needed through
    /// docker-proxy, which accepts every connection itself).
    pub http: bool,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} ({}) {:?}",
            self.from.name, self.to_name, self.to, self.expect
        )
    }
}

impl Check {
    /// Runs the check: an allowed connection is retried until [`ALLOW_DEADLINE`] (the agent
    /// may still be applying a change); a denied one is tried once and must time out.
    /// Returns a description of the violation, if any.
    pub fn run(&self) -> Result<(), String> {
        match self.expect {
            Expect::Denied => match self.attempt(DENY_TIMEOUT) {
                Outcome::Timeout | Outcome::NoReply => Ok(()),
                other => Err(format!("{self}: got {other:?}")),
            },
            Expect::Allowed => {
                let deadline = Instant::now() + ALLOW_DEADLINE;
                loop {
                    let out = self.attempt(Duration::from_secs(2));
                    if out == Outcome::Open {
                        return Ok(());
                    }
                    if Instant::now() > deadline {
                        return Err(format!("{self}: got {out:?} until {ALLOW_DEADLINE:?}"));
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

impl Check {
    /// One attempt, whatever the expectation.
    pub fn attempt(&self, timeout: Duration) -> Outcome {
        if self.http {
            http_get_from(self.from.netns.as_deref(), self.to, timeout)
        } else {
            connect_from(self.from.netns.as_deref(), self.to, timeout)
        }
    }
}

/// Runs the checks and panics listing every violation. Checks of one listener (the same
/// target name and port, both address families) run one after the other, the others
/// concurrently: the test containers' `nc -ll` listens with a backlog of 2, so concurrent SYNs
/// to it can be dropped, and a dropped SYN would pass for a denied connection.
pub fn assert_all(what: &str, checks: &[Check]) {
    let mut groups: Vec<Vec<&Check>> = Vec::new();
    for c in checks {
        let same = |g: &Vec<&Check>| g[0].to_name == c.to_name && g[0].to.port() == c.to.port();
        match groups.iter_mut().find(|g| same(g)) {
            Some(g) => g.push(c),
            None => groups.push(vec![c]),
        }
    }
    let errors: Vec<String> = thread::scope(|s| {
        let handles: Vec<_> = groups
            .iter()
            .map(|g| s.spawn(move || g.iter().filter_map(|c| c.run().err()).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec!["probe thread panicked".into()])
            })
            .collect()
    });
    assert!(
        errors.is_empty(),
        "{what}: {} violation(s):\n  {}",
        errors.len(),
        errors.join("\n  ")
    );
}

/// A network namespace that is not the host and not a container: a veth pair with the host
/// (`<host_addr>/30` on the host side, `<peer>/30` inside), default route via the host. It
/// reaches published ports through iptables DNAT (not the userland proxy), so the container
/// sees its own address: policy classes it as `world`. Removed on drop.
pub struct OutsideNs {
    pub name: String,
    pub host_if: String,
    pub host_addr: std::net::Ipv4Addr,
    pub addr: std::net::Ipv4Addr,
    /// The host's IPv6 address on the link (`fd00:250:<octet>::1/64`).
    pub host_addr6: std::net::Ipv6Addr,
    /// The namespace's IPv6 address (`fd00:250:<octet>::2/64`, default route to the host).
    pub addr6: std::net::Ipv6Addr,
}

/// Runs `ip ARGS`, panicking with its error output if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("spawn ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl OutsideNs {
    /// `octet` picks the /30 `10.250.<octet>.0/30`.
    pub fn create(octet: u8) -> Self {
        let pid = std::process::id();
        let name = format!("npe2e-out-{pid}");
        let host_if = format!("npo{}", pid % 1_000_000);
        let ns = OutsideNs {
            name,
            host_if,
            host_addr: std::net::Ipv4Addr::new(10, 250, octet, 1),
            addr: std::net::Ipv4Addr::new(10, 250, octet, 2),
            host_addr6: std::net::Ipv6Addr::new(0xfd00, 0x250, octet.into(), 0, 0, 0, 0, 1),
            addr6: std::net::Ipv6Addr::new(0xfd00, 0x250, octet.into(), 0, 0, 0, 0, 2),
        };
        let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &ns.host_if])
            .output();
        let host = format!("{}/30", ns.host_addr);
        let inside = format!("{}/30", ns.addr);
        let host6 = format!("{}/64", ns.host_addr6);
        let inside6 = format!("{}/64", ns.addr6);
        let via6 = ns.host_addr6.to_string();
        let n = ns.name.as_str();
        for args in [
            vec!["netns", "add", n],
            vec![
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                n,
            ],
            vec!["addr", "add", &host, "dev", &ns.host_if],
            vec!["-6", "addr", "add", &host6, "dev", &ns.host_if, "nodad"],
            vec!["link", "set", &ns.host_if, "up"],
            vec!["-n", n, "link", "set", "lo", "up"],
            vec!["-n", n, "addr", "add", &inside, "dev", "eth0"],
            vec![
                "-n", n, "-6", "addr", "add", &inside6, "dev", "eth0", "nodad",
            ],
            vec!["-n", n, "link", "set", "eth0", "up"],
            vec![
                "-n",
                n,
                "route",
                "add",
                "default",
                "via",
                &ns.host_addr.to_string(),
            ],
            vec!["-n", n, "-6", "route", "add", "default", "via", &via6],
        ] {
            ip(&args);
        }
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// The namespace's IPv6 address ([`OutsideNs::addr6`]; `create` sets up IPv6 on the veth,
    /// with a default route via the host). Routing to it from containers needs the host's IPv6
    /// forwarding on.
    pub fn add_ipv6(&self) -> std::net::Ipv6Addr {
        self.addr6
    }

    pub fn client(&self) -> Client {
        Client::netns("outside", self.path())
    }
}

impl Drop for OutsideNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth, and with it the host's end.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}
