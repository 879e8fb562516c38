//! `policy trace` and `policy matrix`: what the datapath would do with a new connection, asked
//! before trying.
//!
//! A connection from A to B passes A's egress (`from_container` on A's veth) and B's ingress
//! (`to_container` on B's veth). Each half is decided as the programs decide a new flow, with the
//! functions they share with user space: the remote identity is the ipcache's longest match for
//! the remote address ([`netpol_common::ipcache::resolve`]: a miss is `world`), the endpoint's
//! enforce flags say whether the direction is policed at all, and [`netpol_common::policy::lookup`]
//! looks the (local, remote, direction, protocol, port) key up in `POLICY` with the trie's
//! longest-prefix semantics ([`netpol_common::lpm`]). The entries are those of a [`World`]: the
//! maps as the agent reads them back from the kernel (`policy trace` online), or as the
//! compiler would write them for a described set of containers (`--offline`). Only the names
//! (which policy and rule, which policies select an endpoint) come from the compiler's tables.
//!
//! `host` and `world` are the reserved identities (`world`: an address the ipcache does not
//! know); netpol does not police either side of them, so only the container's half counts.
//! Conntrack is not consulted: a trace is about a new connection (replies of an allowed one
//! always pass).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use netpol_common::{
    endpoint::Endpoint,
    identity as reserved,
    ipcache::{self, RemoteInfo},
    lpm,
    policy::{self as pol, PolicyKey, PolicyValue, Verdict, PREFIX_ANY_PORT},
    proto, Direction,
};
use serde::{Deserialize, Serialize};

use super::{RuleInfo, Selection, IMPLICIT_ALLOW_RULE};
use crate::datapath::{Cidr, MapState};

/// What a trace reads: map entries, the compiler's names for them, and who is who.
#[derive(Clone, Debug, Default)]
pub struct World {
    /// `ENDPOINTS`, the ipcache and `POLICY`.
    pub maps: MapState,
    /// Rule id → where it comes from.
    pub rules: BTreeMap<u32, RuleInfo>,
    /// Why a (local identity, direction) is enforced.
    pub selections: BTreeMap<(u32, Direction), Vec<Selection>>,
    /// The running containers.
    pub containers: Vec<Member>,
    /// Display names of identities (`demo/db`, `cidr:10.0.0.0/8`).
    pub identity_names: BTreeMap<u32, String>,
}

/// A running container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Member {
    /// Docker's full id.
    pub id: String,
    pub name: String,
    pub project: Option<String>,
    pub service: Option<String>,
    pub identity: u32,
    pub attachments: Vec<Attach>,
}

/// One network of a container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attach {
    pub network: String,
    /// The host veth (the `ENDPOINTS` key).
    pub ifindex: Option<u32>,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

impl Attach {
    fn addr(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.ipv6.map(IpAddr::V6)
        } else {
            self.ipv4.map(IpAddr::V4)
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TraceError {
    #[error("no running container, compose service or address {0:?} (write a container name or id, SERVICE, PROJECT/SERVICE, host, world or an IP address)")]
    NotFound(String),
    #[error("{name:?} is ambiguous: {candidates} (write PROJECT/SERVICE or a container name)")]
    Ambiguous { name: String, candidates: String },
    #[error("bad port {0:?} (write PORT, PORT/tcp, PORT/udp, PORT/sctp, icmp or TYPE/icmp)")]
    BadPort(String),
    #[error("{from} and {to} have no address family in common")]
    NoCommonFamily { from: String, to: String },
    #[error("{0} has no address")]
    NoAddress(String),
}

/// FROM or TO as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerRef {
    Host,
    World,
    Addr(IpAddr),
    /// A container name or id, a compose service, `project/service`.
    Name(String),
}

/// What is asked for at L4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Query {
    /// TCP, UDP or SCTP to a destination port.
    Port { proto: u8, port: u16 },
    /// An ICMP (ICMPv6 over IPv6) message of this type; `None` = echo request.
    Icmp { icmp_type: Option<u8> },
}

impl PeerRef {
    pub fn parse(s: &str) -> Self {
        match s {
            "host" => PeerRef::Host,
            "world" => PeerRef::World,
            _ => match s.trim_start_matches('[').trim_end_matches(']').parse() {
                Ok(a) => PeerRef::Addr(a),
                Err(_) => PeerRef::Name(s.to_owned()),
            },
        }
    }
}

/// Parses `TO[:PORT[/PROTO]]`: `db`, `db:5432`, `db:53/udp`, `db:icmp`, `db:3/icmp`,
/// `10.0.0.2:80`, `[fd00::2]:80`, `fd00::2`.
pub fn parse_target(s: &str) -> Result<(PeerRef, Option<L4Query>), TraceError> {
    if let Some(rest) = s.strip_prefix('[') {
        let Some((addr, tail)) = rest.split_once(']') else {
            return Err(TraceError::NotFound(s.to_owned()));
        };
        let peer = PeerRef::parse(addr);
        return match tail.strip_prefix(':') {
            Some(p) => Ok((peer, Some(parse_l4(p)?))),
            None if tail.is_empty() => Ok((peer, None)),
            None => Err(TraceError::BadPort(tail.to_owned())),
        };
    }
    if s.parse::<Ipv6Addr>().is_ok() {
        return Ok((PeerRef::parse(s), None));
    }
    match s.rsplit_once(':') {
        Some((peer, p)) => Ok((PeerRef::parse(peer), Some(parse_l4(p)?))),
        None => Ok((PeerRef::parse(s), None)),
    }
}

/// `5432`, `5432/tcp`, `53/udp`, `9/sctp`, `icmp`, `3/icmp`.
pub fn parse_l4(s: &str) -> Result<L4Query, TraceError> {
    let bad = || TraceError::BadPort(s.to_owned());
    let lower = s.to_ascii_lowercase();
    if lower == "icmp" || lower == "icmpv6" {
        return Ok(L4Query::Icmp { icmp_type: None });
    }
    let (n, p) = lower.split_once('/').unwrap_or((&lower, "tcp"));
    let proto = match p {
        "tcp" => proto::TCP,
        "udp" => proto::UDP,
        "sctp" => proto::SCTP,
        "icmp" | "icmpv6" => {
            return Ok(L4Query::Icmp {
                icmp_type: Some(n.parse().map_err(|_| bad())?),
            })
        }
        _ => return Err(bad()),
    };
    Ok(L4Query::Port {
        proto,
        port: n.parse().map_err(|_| bad())?,
    })
}

fn proto_name(p: u8) -> &'static str {
    match p {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        proto::SCTP => "sctp",
        proto::ICMP => "icmp",
        proto::ICMPV6 => "icmpv6",
        _ => "ip",
    }
}

/// One side of a connection, resolved against the maps.
#[derive(Clone, Debug)]
struct Side {
    /// `demo/db`, `host`, `world`, `10.1.2.3`.
    name: String,
    addr: Option<IpAddr>,
    /// The identity the other side's program sees for it (the ipcache's answer for `addr`).
    identity: u32,
    /// Its `ENDPOINTS` entry, when it is a policed container.
    endpoint: Option<Endpoint>,
}

/// What FROM or TO resolved to.
#[derive(Clone, Copy, Debug)]
enum Resolved<'a> {
    Host,
    World,
    Addr(IpAddr),
    Member(&'a Member),
}

/// How one half (A's egress or B's ingress) decides a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// No netpol endpoint on this side (the host, the world, an unmanaged container).
    NotPoliced,
    /// The endpoint does not enforce this direction.
    NotEnforced,
    Allowed,
    Denied,
    /// Policy denies it, but the endpoint is in audit mode in this direction: it passes and is
    /// reported as AUDIT.
    Audited,
}

/// One half of a trace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Half {
    /// `egress` or `ingress`.
    pub direction: String,
    /// Whose half it is.
    pub of: String,
    pub outcome: Outcome,
    /// The deciding rule (0: the implicit allow-all under deny rules).
    pub rule: Option<u32>,
    /// The deciding rule's policy and section.
    pub rule_name: Option<String>,
    /// The policies that make this direction enforced.
    pub selected_by: Vec<String>,
    /// The explanation, one line.
    pub why: String,
}

impl Half {
    pub fn passes(&self) -> bool {
        self.outcome != Outcome::Denied
    }
}

/// `policy trace FROM TO:PORT`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    pub from: String,
    pub to: String,
    pub from_addr: Option<String>,
    pub to_addr: Option<String>,
    pub from_identity: u32,
    pub to_identity: u32,
    /// `tcp`, `udp`, `sctp`, `icmp`, `icmpv6`.
    pub protocol: String,
    /// The destination port, or the ICMP type.
    pub port: u16,
    /// `allowed`, `denied`, or `audited` (policy denies it, audit mode lets it pass).
    pub verdict: String,
    pub egress: Half,
    pub ingress: Half,
}

impl Trace {
    /// Whether the connection gets through now (allowed, or denied but audited).
    pub fn allowed(&self) -> bool {
        self.verdict != "denied"
    }

    /// The text for people.
    pub fn render(&self) -> String {
        let addr = |a: &Option<String>| a.as_ref().map_or(String::new(), |a| format!(" ({a})"));
        let what = if self.protocol.starts_with("icmp") {
            format!("{} type {}", self.protocol, self.port)
        } else {
            format!("{}/{}", self.port, self.protocol)
        };
        format!(
            "{}{} -> {}{} {what}: {}\n  {}\n  {}\n",
            self.from,
            addr(&self.from_addr),
            self.to,
            addr(&self.to_addr),
            self.verdict.to_uppercase(),
            self.egress.why,
            self.ingress.why
        )
    }
}

/// Allowed ports of one protocol: sorted, disjoint, inclusive ranges.
pub type Ranges = Vec<(u16, u16)>;

/// What a connection may use between two peers: ports by protocol, and ICMP echo.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSet {
    pub tcp: Ranges,
    pub udp: Ranges,
    pub sctp: Ranges,
    /// ICMP (ICMPv6) echo requests.
    pub icmp: bool,
}

const ALL_PORTS: (u16, u16) = (0, u16::MAX);

impl PortSet {
    pub fn all() -> Self {
        Self {
            tcp: vec![ALL_PORTS],
            udp: vec![ALL_PORTS],
            sctp: vec![ALL_PORTS],
            icmp: true,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tcp.is_empty() && self.udp.is_empty() && self.sctp.is_empty() && !self.icmp
    }

    pub fn is_all(&self) -> bool {
        *self == Self::all()
    }

    fn intersect(&self, o: &Self) -> Self {
        Self {
            tcp: intersect(&self.tcp, &o.tcp),
            udp: intersect(&self.udp, &o.udp),
            sctp: intersect(&self.sctp, &o.sctp),
            icmp: self.icmp && o.icmp,
        }
    }

    /// Whether a TCP/UDP/SCTP port or ICMP echo is in the set.
    pub fn contains(&self, proto: u8, port: u16) -> bool {
        let r = match proto {
            proto::TCP => &self.tcp,
            proto::UDP => &self.udp,
            proto::SCTP => &self.sctp,
            _ => return self.icmp,
        };
        r.iter().any(|&(a, b)| a <= port && port <= b)
    }

    /// `*` (everything), `-` (nothing), or `5432/tcp 53/udp icmp` (`*/tcp`: every TCP port).
    pub fn render(&self) -> String {
        if self.is_all() {
            return "*".into();
        }
        if self.is_empty() {
            return "-".into();
        }
        let mut parts = Vec::new();
        for (name, r) in [("tcp", &self.tcp), ("udp", &self.udp), ("sctp", &self.sctp)] {
            if r.is_empty() {
                continue;
            }
            let ports: Vec<String> = r
                .iter()
                .map(|&(a, b)| match (a, b) {
                    ALL_PORTS => "*".to_owned(),
                    (a, b) if a == b => a.to_string(),
                    (a, b) => format!("{a}-{b}"),
                })
                .collect();
            parts.push(format!("{}/{name}", ports.join(",")));
        }
        if self.icmp {
            parts.push("icmp".into());
        }
        parts.join(" ")
    }
}

fn intersect(a: &Ranges, b: &Ranges) -> Ranges {
    let mut out = Vec::new();
    for &(a0, a1) in a {
        for &(b0, b1) in b {
            let (lo, hi) = (a0.max(b0), a1.min(b1));
            if lo <= hi {
                out.push((lo, hi));
            }
        }
    }
    out.sort();
    out
}

impl World {
    fn identity_name(&self, id: u32) -> String {
        self.identity_names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| crate::identity::display_name(id, None))
    }

    fn rule_name(&self, rule: u32) -> String {
        match self.rules.get(&rule) {
            Some(r) => r.to_string(),
            None => format!("rule {rule}"),
        }
    }

    /// The ipcache's answer for `addr`: its longest matching prefix, `world` on a miss.
    fn ipcache(&self, addr: IpAddr) -> RemoteInfo {
        let octets = |a: IpAddr| match a {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        let entries: Vec<(u32, Vec<u8>, RemoteInfo)> = self
            .maps
            .ipcache
            .iter()
            .filter(|(c, _)| c.addr.is_ipv4() == addr.is_ipv4())
            .map(|(c, v)| (u32::from(c.prefix_len), octets(c.addr), *v))
            .collect();
        let want = octets(addr);
        ipcache::resolve(lpm::lpm(
            entries.iter().map(|(l, b, v)| (*l, &b[..], *v)),
            &want,
        ))
    }

    /// The endpoint that owns `addr`, as `ENDPOINTS` holds it.
    fn endpoint_of_addr(&self, addr: IpAddr) -> Option<Endpoint> {
        self.maps.endpoints.values().copied().find(|ep| match addr {
            IpAddr::V4(a) => ep.flags & Endpoint::HAS_IPV4 != 0 && ep.ipv4 == a.octets(),
            IpAddr::V6(a) => ep.flags & Endpoint::HAS_IPV6 != 0 && ep.ipv6 == a.octets(),
        })
    }

    /// The display name of a container: `project/service`, else its name.
    fn member_name(m: &Member) -> String {
        match (&m.project, &m.service) {
            (Some(p), Some(s)) => format!("{p}/{s}"),
            (None, Some(s)) => s.clone(),
            _ => m.name.clone(),
        }
    }

    fn find(&self, r: &PeerRef) -> Result<Resolved<'_>, TraceError> {
        let name = match r {
            PeerRef::Host => return Ok(Resolved::Host),
            PeerRef::World => return Ok(Resolved::World),
            PeerRef::Addr(a) => return Ok(Resolved::Addr(*a)),
            PeerRef::Name(n) => n,
        };
        let mut sorted: Vec<&Member> = self.containers.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(m) = sorted.iter().find(|m| &m.name == name) {
            return Ok(Resolved::Member(m));
        }
        let by_service: Vec<&Member> = match name.split_once('/') {
            Some((p, s)) => sorted
                .iter()
                .filter(|m| m.project.as_deref() == Some(p) && m.service.as_deref() == Some(s))
                .copied()
                .collect(),
            None => sorted
                .iter()
                .filter(|m| m.service.as_deref() == Some(name))
                .copied()
                .collect(),
        };
        let projects: BTreeSet<&Option<String>> = by_service.iter().map(|m| &m.project).collect();
        if projects.len() > 1 {
            let c: Vec<String> = by_service.iter().map(|m| Self::member_name(m)).collect();
            let c: BTreeSet<String> = c.into_iter().collect();
            return Err(TraceError::Ambiguous {
                name: name.clone(),
                candidates: c.into_iter().collect::<Vec<_>>().join(", "),
            });
        }
        if let Some(m) = by_service.first() {
            return Ok(Resolved::Member(m));
        }
        let lower = name.to_ascii_lowercase();
        if lower.len() >= 4 && lower.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hits: Vec<&Member> = sorted
                .iter()
                .filter(|m| m.id.starts_with(&lower))
                .copied()
                .collect();
            match hits.as_slice() {
                [m] => return Ok(Resolved::Member(m)),
                [] => {}
                many => {
                    return Err(TraceError::Ambiguous {
                        name: name.clone(),
                        candidates: many
                            .iter()
                            .map(|m| m.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
                }
            }
        }
        Err(TraceError::NotFound(name.clone()))
    }

    /// The attachment of `m` for family `v6`, preferring a network `other` is on too.
    fn attachment<'a>(m: &'a Member, v6: bool, other: Option<&Member>) -> Option<&'a Attach> {
        let has = |a: &&Attach| a.addr(v6).is_some();
        let shared = |a: &&Attach| {
            other.is_some_and(|o| {
                o.attachments
                    .iter()
                    .any(|b| b.network == a.network && b.addr(v6).is_some())
            })
        };
        m.attachments
            .iter()
            .filter(has)
            .find(shared)
            .or_else(|| {
                m.attachments
                    .iter()
                    .filter(has)
                    .find(|a| a.ifindex.is_some())
            })
            .or_else(|| m.attachments.iter().find(has))
    }

    fn families(m: &Member) -> (bool, bool) {
        (
            m.attachments.iter().any(|a| a.ipv4.is_some()),
            m.attachments.iter().any(|a| a.ipv6.is_some()),
        )
    }

    /// The address family of a connection between `a` and `b` (true: IPv6), IPv4 when both can.
    fn family(&self, a: &Resolved, b: &Resolved) -> Result<bool, TraceError> {
        let name = |r: &Resolved| match r {
            Resolved::Host => "host".to_owned(),
            Resolved::World => "world".to_owned(),
            Resolved::Addr(a) => a.to_string(),
            Resolved::Member(m) => m.name.clone(),
        };
        let can = |r: &Resolved| match r {
            Resolved::Host | Resolved::World => (true, true),
            Resolved::Addr(a) => (a.is_ipv4(), a.is_ipv6()),
            Resolved::Member(m) => Self::families(m),
        };
        let (a4, a6) = can(a);
        let (b4, b6) = can(b);
        if a4 && b4 {
            return Ok(false);
        }
        if a6 && b6 {
            return Ok(true);
        }
        for (r, (v4, v6)) in [(a, (a4, a6)), (b, (b4, b6))] {
            if !v4 && !v6 {
                return Err(TraceError::NoAddress(name(r)));
            }
        }
        Err(TraceError::NoCommonFamily {
            from: name(a),
            to: name(b),
        })
    }

    fn side(&self, r: &Resolved, other: &Resolved, v6: bool) -> Side {
        match r {
            Resolved::Host => Side {
                name: "host".into(),
                addr: None,
                identity: reserved::HOST,
                endpoint: None,
            },
            Resolved::World => Side {
                name: "world".into(),
                addr: None,
                identity: reserved::WORLD,
                endpoint: None,
            },
            Resolved::Addr(a) => {
                // A group or link-local address reaches everyone on the bridge: the datapath
                // decides a container's packets to it under `GROUP` (`lxc.rs`).
                let anyone = match a {
                    IpAddr::V4(a) => netpol_common::addr::v4_group(&a.octets()),
                    IpAddr::V6(a) => netpol_common::addr::v6_for_anyone(&a.octets()),
                };
                let identity = if anyone {
                    reserved::GROUP
                } else {
                    self.ipcache(*a).identity
                };
                let owner = self.containers.iter().find(|m| {
                    m.attachments
                        .iter()
                        .any(|x| x.addr(a.is_ipv6()) == Some(*a))
                });
                Side {
                    name: match owner {
                        Some(m) => Self::member_name(m),
                        None => format!("{a} ({})", self.identity_name(identity)),
                    },
                    addr: Some(*a),
                    identity,
                    endpoint: self.endpoint_of_addr(*a),
                }
            }
            Resolved::Member(m) => {
                let other = match other {
                    Resolved::Member(o) => Some(*o),
                    _ => None,
                };
                let att = Self::attachment(m, v6, other);
                let addr = att.and_then(|a| a.addr(v6));
                Side {
                    name: Self::member_name(m),
                    addr,
                    identity: addr.map_or(m.identity, |a| self.ipcache(a).identity),
                    endpoint: att
                        .and_then(|a| a.ifindex)
                        .and_then(|i| self.maps.endpoints.get(&i).copied()),
                }
            }
        }
    }

    fn sides(&self, from: &PeerRef, to: &PeerRef) -> Result<(Side, Side, bool), TraceError> {
        let a = self.find(from)?;
        let b = self.find(to)?;
        let v6 = self.family(&a, &b)?;
        Ok((self.side(&a, &b, v6), self.side(&b, &a, v6), v6))
    }

    fn selected_by(&self, identity: u32, dir: Direction) -> Vec<String> {
        self.selections
            .get(&(identity, dir))
            .map(|s| {
                s.iter()
                    .map(|s| {
                        if s.default_deny {
                            format!("{} (default deny)", s.policy)
                        } else {
                            format!("{} (deny rules only, enableDefaultDeny: false)", s.policy)
                        }
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The `POLICY` entries one endpoint's lookups can hit: its own, in `dir`, for `remote` or
    /// the wildcard.
    fn relevant(
        &self,
        local: u32,
        remote: u32,
        dir: Direction,
    ) -> Vec<(u32, PolicyKey, PolicyValue)> {
        self.maps
            .policy
            .iter()
            .filter(|(k, _)| {
                k.key.local == local
                    && k.key.direction == dir as u8
                    && (k.key.remote == remote || k.key.remote == reserved::ANY)
            })
            .map(|(k, v)| (k.prefix_len, k.key, *v))
            .collect()
    }

    /// The kernel's decision for one new flow, over `entries`.
    fn decide(
        entries: &[(u32, PolicyKey, PolicyValue)],
        local: u32,
        remote: u32,
        dir: Direction,
        proto: u8,
        port: u16,
    ) -> Verdict {
        pol::lookup(local, remote, dir, proto, port, |k| {
            lpm::policy(entries.iter().map(|(l, k, v)| (*l, k, *v)), k)
        })
    }

    /// One half of a connection: `local`'s `dir` against `remote`.
    fn half(&self, dir: Direction, local: &Side, remote: &Side, proto: u8, port: u16) -> Half {
        let dname = dir_name(dir);
        let what = if proto == proto::ICMP || proto == proto::ICMPV6 {
            format!("{} type {port}", proto_name(proto))
        } else {
            format!("{port}/{}", proto_name(proto))
        };
        let mut h = Half {
            direction: dname.into(),
            of: local.name.clone(),
            outcome: Outcome::NotPoliced,
            rule: None,
            rule_name: None,
            selected_by: Vec::new(),
            why: String::new(),
        };
        let Some(ep) = local.endpoint else {
            h.why = format!(
                "{dname} of {}: not policed by netpol (no endpoint)",
                local.name
            );
            return h;
        };
        h.selected_by = self.selected_by(ep.identity, dir);
        if !ep.enforces(dir) {
            h.outcome = Outcome::NotEnforced;
            h.why = format!(
                "{dname} of {}: not enforced (no policy selects it for {dname})",
                local.name
            );
            return h;
        }
        let sel = if h.selected_by.is_empty() {
            "enforced".to_owned()
        } else {
            format!("selected by {}", h.selected_by.join(", "))
        };
        let entries = self.relevant(ep.identity, remote.identity, dir);
        match Self::decide(&entries, ep.identity, remote.identity, dir, proto, port) {
            Verdict::Allow(IMPLICIT_ALLOW_RULE) => {
                h.outcome = Outcome::Allowed;
                h.rule = Some(IMPLICIT_ALLOW_RULE);
                h.why = format!(
                    "{dname} of {}: {sel}; no deny rule matches {} on {what}, so the implicit allow-all under the deny rules allows it",
                    local.name, remote.name
                );
            }
            Verdict::Allow(r) => {
                h.outcome = Outcome::Allowed;
                h.rule = Some(r);
                h.rule_name = Some(self.rule_name(r));
                h.why = format!(
                    "{dname} of {}: {sel}; allowed by {}",
                    local.name,
                    self.rule_name(r)
                );
            }
            Verdict::Deny(r) => {
                h.outcome = Outcome::Denied;
                h.rule = Some(r);
                h.rule_name = Some(self.rule_name(r));
                h.why = format!(
                    "{dname} of {}: {sel}; denied by {} (deny wins over allow)",
                    local.name,
                    self.rule_name(r)
                );
            }
            Verdict::NoMatch => {
                h.outcome = Outcome::Denied;
                let because = match self.selections.get(&(ep.identity, dir)) {
                    Some(s) if !s.is_empty() => {
                        let names: Vec<&str> = s.iter().map(|s| s.policy.as_str()).collect();
                        let verb = if names.len() == 1 {
                            "selects"
                        } else {
                            "select"
                        };
                        format!("default deny because {} {verb} it", names.join(", "))
                    }
                    _ => "default deny (the direction is enforced)".to_owned(),
                };
                h.why = format!(
                    "{dname} of {}: {because}; no rule allows {} on {what}",
                    local.name, remote.name
                );
            }
        }
        if h.outcome == Outcome::Denied && ep.audits(dir) {
            h.outcome = Outcome::Audited;
            h.why
                .push_str(" — audit mode: it passes and is reported as AUDIT");
        }
        h
    }

    /// `policy trace FROM TO:PORT`.
    pub fn trace(&self, from: &PeerRef, to: &PeerRef, l4: L4Query) -> Result<Trace, TraceError> {
        let (a, b, v6) = self.sides(from, to)?;
        let (proto, port) = match l4 {
            L4Query::Port { proto, port } => (proto, port),
            L4Query::Icmp { icmp_type } => {
                let (p, echo) = if v6 {
                    (proto::ICMPV6, 128)
                } else {
                    (proto::ICMP, 8)
                };
                (p, u16::from(icmp_type.unwrap_or(echo)))
            }
        };
        let egress = self.half(Direction::Egress, &a, &b, proto, port);
        let ingress = self.half(Direction::Ingress, &b, &a, proto, port);
        let verdict = if !egress.passes() || !ingress.passes() {
            "denied"
        } else if egress.outcome == Outcome::Audited || ingress.outcome == Outcome::Audited {
            "audited"
        } else {
            "allowed"
        };
        Ok(Trace {
            from: a.name,
            to: b.name,
            from_addr: a.addr.map(|x| x.to_string()),
            to_addr: b.addr.map(|x| x.to_string()),
            from_identity: a.identity,
            to_identity: b.identity,
            protocol: proto_name(proto).into(),
            port,
            verdict: verdict.into(),
            egress,
            ingress,
        })
    }

    /// What one half lets through: every port of TCP, UDP and SCTP and ICMP echo, each decided
    /// by the same lookup. Ports are split where an entry's block starts or ends, so every port
    /// of a segment has the same verdict and one lookup decides it.
    fn half_ports(&self, dir: Direction, local: &Side, remote: &Side, v6: bool) -> PortSet {
        let Some(ep) = local.endpoint else {
            return PortSet::all();
        };
        if !ep.enforces(dir) {
            return PortSet::all();
        }
        let entries = self.relevant(ep.identity, remote.identity, dir);
        let allows = |proto: u8, port: u16| {
            matches!(
                Self::decide(&entries, ep.identity, remote.identity, dir, proto, port),
                Verdict::Allow(_)
            )
        };
        let ranges = |proto: u8| -> Ranges {
            let mut cuts: BTreeSet<u32> = [0u32].into();
            // Entries below prefix 80 match every protocol and port: no cut.
            for (len, k, _) in &entries {
                if *len < PREFIX_ANY_PORT || k.proto != proto {
                    continue;
                }
                let span = 1u32 << (pol::FULL_PREFIX - (*len).min(pol::FULL_PREFIX));
                let start = u32::from(k.dport()) & !(span - 1);
                cuts.insert(start);
                cuts.insert(start + span);
            }
            let cuts: Vec<u32> = cuts.into_iter().filter(|&c| c <= 0x1_0000).collect();
            let mut out: Ranges = Vec::new();
            for (i, &c) in cuts.iter().enumerate() {
                if c > 0xffff {
                    break;
                }
                let end = cuts.get(i + 1).copied().unwrap_or(0x1_0000) - 1;
                if allows(proto, c as u16) {
                    match out.last_mut() {
                        Some(last) if u32::from(last.1) + 1 == c => last.1 = end as u16,
                        _ => out.push((c as u16, end as u16)),
                    }
                }
            }
            out
        };
        let (icmp, echo) = if v6 {
            (proto::ICMPV6, 128)
        } else {
            (proto::ICMP, 8)
        };
        PortSet {
            tcp: ranges(proto::TCP),
            udp: ranges(proto::UDP),
            sctp: ranges(proto::SCTP),
            icmp: allows(icmp, echo),
        }
    }

    /// Whether a half of `a` to `b` is enforced in audit mode.
    fn audited(a: &Side, b: &Side) -> bool {
        let on = |s: &Side, d: Direction| s.endpoint.is_some_and(|e| e.enforces(d) && e.audits(d));
        on(a, Direction::Egress) || on(b, Direction::Ingress)
    }

    /// What may go from `a` to `b`: both halves' port sets intersected.
    fn cell(&self, a: &Side, b: &Side, v6: bool) -> PortSet {
        self.half_ports(Direction::Egress, a, b, v6)
            .intersect(&self.half_ports(Direction::Ingress, b, a, v6))
    }

    /// `policy trace FROM TO` without a port: everything the pair may use.
    pub fn trace_all(&self, from: &PeerRef, to: &PeerRef) -> Result<Cell, TraceError> {
        let (a, b, v6) = self.sides(from, to)?;
        Ok(Cell {
            from: a.name.clone(),
            to: b.name.clone(),
            ports: self.cell(&a, &b, v6),
            from_addr: a.addr.map(|x| x.to_string()),
            to_addr: b.addr.map(|x| x.to_string()),
            text: String::new(),
            audit: Self::audited(&a, &b),
        }
        .rendered())
    }

    /// `policy matrix [--project P]`: every pair of the running containers (one row per
    /// compose service, or per container outside compose), the host and the world.
    pub fn matrix(&self, project: Option<&str>) -> Result<Matrix, TraceError> {
        let mut members: Vec<&Member> = self
            .containers
            .iter()
            .filter(|m| project.is_none() || m.project.as_deref() == project)
            .filter(|m| {
                m.attachments
                    .iter()
                    .any(|a| a.ipv4.is_some() || a.ipv6.is_some())
            })
            .collect();
        members.sort_by(|a, b| a.name.cmp(&b.name));
        // Group by display name; a name whose containers have different identities is split
        // into its containers.
        let mut groups: BTreeMap<String, Vec<&Member>> = BTreeMap::new();
        for m in &members {
            let name = match (project, &m.service) {
                (Some(_), Some(s)) => s.clone(),
                _ => Self::member_name(m),
            };
            groups.entry(name).or_default().push(m);
        }
        let mut rows: Vec<(MatrixPeer, PeerRef)> = Vec::new();
        for (name, ms) in groups {
            let ids: BTreeSet<u32> = ms.iter().map(|m| m.identity).collect();
            if ids.len() == 1 {
                rows.push((
                    MatrixPeer {
                        name,
                        containers: ms.iter().map(|m| m.name.clone()).collect(),
                        identity: ms[0].identity,
                    },
                    PeerRef::Name(ms[0].name.clone()),
                ));
            } else {
                for m in ms {
                    rows.push((
                        MatrixPeer {
                            name: m.name.clone(),
                            containers: vec![m.name.clone()],
                            identity: m.identity,
                        },
                        PeerRef::Name(m.name.clone()),
                    ));
                }
            }
        }
        for (name, r, id) in [
            ("host", PeerRef::Host, reserved::HOST),
            ("world", PeerRef::World, reserved::WORLD),
        ] {
            rows.push((
                MatrixPeer {
                    name: name.into(),
                    containers: Vec::new(),
                    identity: id,
                },
                r,
            ));
        }
        let mut cells = Vec::new();
        for (fp, fr) in &rows {
            for (tp, tr) in &rows {
                let cell = match self.sides(fr, tr) {
                    Ok((a, b, v6)) => Cell {
                        from: fp.name.clone(),
                        to: tp.name.clone(),
                        ports: self.cell(&a, &b, v6),
                        from_addr: a.addr.map(|x| x.to_string()),
                        to_addr: b.addr.map(|x| x.to_string()),
                        text: String::new(),
                        audit: Self::audited(&a, &b),
                    },
                    // No common address family: nothing can connect.
                    Err(TraceError::NoCommonFamily { .. }) => Cell {
                        from: fp.name.clone(),
                        to: tp.name.clone(),
                        ports: PortSet::default(),
                        from_addr: None,
                        to_addr: None,
                        text: String::new(),
                        audit: false,
                    },
                    Err(e) => return Err(e),
                };
                cells.push(cell.rendered());
            }
        }
        Ok(Matrix {
            project: project.map(str::to_owned),
            peers: rows.into_iter().map(|(p, _)| p).collect(),
            cells,
        })
    }
}

fn dir_name(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

/// One row and column of the matrix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatrixPeer {
    /// `demo/db` (`db` with `--project`), a container name, `host`, `world`.
    pub name: String,
    /// The containers of the row (the first one's addresses are used).
    pub containers: Vec<String>,
    pub identity: u32,
}

/// What may go from one peer to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cell {
    pub from: String,
    pub to: String,
    /// The addresses the cell was computed for.
    pub from_addr: Option<String>,
    pub to_addr: Option<String>,
    /// What policy allows (in audit mode more passes: see `audit`).
    pub ports: PortSet,
    /// A half is in audit mode: what policy denies passes for now (and is reported).
    #[serde(default)]
    pub audit: bool,
    /// [`PortSet::render`], with ` (audit)` when `audit`.
    pub text: String,
}

impl Cell {
    fn rendered(mut self) -> Self {
        self.text = self.ports.render();
        if self.audit && !self.ports.is_all() {
            self.text.push_str(" (audit)");
        }
        self
    }
}

/// `policy matrix`: rows are the sender (from), columns the receiver (to), in `peers` order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Matrix {
    pub project: Option<String>,
    pub peers: Vec<MatrixPeer>,
    /// Row-major: from `peers[i]` to `peers[j]` at `i * peers.len() + j`.
    pub cells: Vec<Cell>,
}

impl Matrix {
    pub fn get(&self, from: &str, to: &str) -> Option<&Cell> {
        self.cells.iter().find(|c| c.from == from && c.to == to)
    }

    /// The table for people: `FROM \ TO` in the corner.
    pub fn render_table(&self) -> (Vec<String>, Vec<Vec<String>>) {
        let mut header = vec!["FROM \\ TO".to_owned()];
        header.extend(self.peers.iter().map(|p| p.name.clone()));
        let n = self.peers.len();
        let rows = self
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut r = vec![p.name.clone()];
                r.extend((0..n).map(|j| {
                    self.cells
                        .get(i * n + j)
                        .map_or("?".to_owned(), |c| c.text.clone())
                }));
                r
            })
            .collect();
        (header, rows)
    }

    /// A Graphviz digraph: one edge per pair with a container that may connect, labelled with
    /// the ports.
    pub fn render_dot(&self) -> String {
        let q = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
        let mut out = String::from("digraph netpol {\n  rankdir=LR;\n  node [shape=box];\n");
        for p in &self.peers {
            let shape = if p.containers.is_empty() {
                " [shape=ellipse]"
            } else {
                ""
            };
            out.push_str(&format!("  {}{shape};\n", q(&p.name)));
        }
        let container = |name: &str| {
            self.peers
                .iter()
                .any(|p| p.name == name && !p.containers.is_empty())
        };
        for c in &self.cells {
            // Nothing to draw where nothing is allowed, or where no container is involved
            // (host and world among themselves: netpol polices neither).
            if c.ports.is_empty() || !(container(&c.from) || container(&c.to)) {
                continue;
            }
            out.push_str(&format!(
                "  {} -> {} [label={}];\n",
                q(&c.from),
                q(&c.to),
                q(&c.text)
            ));
        }
        out.push_str("}\n");
        out
    }
}

/// A container described for an offline trace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OfflineContainer {
    pub name: String,
    /// Its Docker labels, as `docker inspect` would show them (compose's, `netpol.*`, …).
    pub labels: crate::identity::Labels,
    /// Its address; by default one of the documentation range `192.0.2.0/24`.
    pub addr: Option<IpAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Compile(#[from] super::CompileError),
}

/// The [`World`] the agent would make of `policies` and the `netpol.*` labels of `containers`
/// (offline `policy trace` / `policy matrix`): identities from the labels as the agent derives
/// them (`filter`), the same compiler, every container on one network with a veth of its own.
/// Also returns what the labels gave besides policy (errors, warnings) by container.
pub fn offline(
    policies: &[super::Policy],
    containers: &[OfflineContainer],
    filter: &crate::identity::LabelFilter,
) -> Result<(World, BTreeMap<String, String>), OfflineError> {
    use super::sources::{labels::identity_labels, ContainerLabels, LabelPolicies};
    let no_image = crate::identity::Labels::new();
    let views: Vec<ContainerLabels> = containers
        .iter()
        .map(|c| ContainerLabels {
            name: &c.name,
            labels: &c.labels,
            image: Ok(&no_image),
        })
        .collect();
    let mut ids = crate::identity::IdentityAllocator::new();
    let mut endpoints = super::Endpoints::new();
    let mut idents = Vec::new();
    for v in &views {
        let labels = identity_labels(filter, v);
        let (id, _) = ids.allocate(&labels)?;
        endpoints.insert(id, labels.clone());
        idents.push((id, labels));
    }
    let mut from_labels = LabelPolicies::default();
    from_labels.update(views.iter().copied());
    let mut all = policies.to_vec();
    all.extend(from_labels.policies().iter().cloned());
    let compiled = super::compile(&all, &endpoints)?;
    let mut notes = from_labels.errors();
    for (c, w) in from_labels.warnings() {
        notes
            .entry(c)
            .and_modify(|n| {
                n.push_str("; ");
                n.push_str(&w);
            })
            .or_insert(w);
    }

    let mut w = World {
        rules: compiled.rules.clone(),
        selections: compiled.selections.clone(),
        ..World::default()
    };
    w.maps.policy = compiled.policy.clone();
    for (cidr, id) in &compiled.cidr_identities {
        w.maps.ipcache.insert(*cidr, RemoteInfo::new(*id));
        w.identity_names.insert(*id, format!("cidr:{cidr}"));
    }
    for (i, (c, (id, labels))) in containers.iter().zip(idents).enumerate() {
        let ifindex = 1000 + i as u32;
        let addr = c
            .addr
            .unwrap_or(IpAddr::V4(Ipv4Addr::new(192, 0, 2, (i % 240) as u8 + 10)));
        let enf = compiled.enforcement_of(id);
        let mut ep = Endpoint::new(id).enforce(enf.ingress, enf.egress);
        let mut att = Attach {
            network: "offline".into(),
            ifindex: Some(ifindex),
            ..Attach::default()
        };
        match addr {
            IpAddr::V4(a) => {
                ep = ep.with_ipv4(a.octets());
                att.ipv4 = Some(a);
            }
            IpAddr::V6(a) => {
                ep = ep.with_ipv6(a.octets());
                att.ipv6 = Some(a);
            }
        }
        w.maps.endpoints.insert(ifindex, ep);
        w.maps
            .ipcache
            .insert(Cidr::host(addr), RemoteInfo::container(id, ifindex, 0));
        w.identity_names
            .insert(id, crate::identity::display_name(id, Some(&labels)));
        w.containers.push(Member {
            id: offline_id(&c.name),
            name: c.name.clone(),
            project: labels.get(crate::identity::COMPOSE_PROJECT).cloned(),
            service: labels.get(crate::identity::COMPOSE_SERVICE).cloned(),
            identity: id,
            attachments: vec![att],
        });
    }
    Ok((w, notes))
}

/// A made-up container id for an offline container: 64 hex digits from its name (FNV-1a).
fn offline_id(name: &str) -> String {
    (0u64..4)
        .map(|seed| {
            let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
            for b in name.bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            format!("{h:016x}")
        })
        .collect()
}

/// Parses `NAME=KEY=VALUE,KEY=VALUE…` (`--container`): labels whose values hold no comma.
/// `ip=ADDRESS` among them sets the container's address instead of a label.
pub fn parse_container_arg(s: &str) -> Result<OfflineContainer, String> {
    let (name, labels) = s.split_once('=').unwrap_or((s, ""));
    if name.is_empty() {
        return Err(format!(
            "--container {s:?}: no name (write NAME=KEY=VALUE,…)"
        ));
    }
    let mut c = OfflineContainer {
        name: name.to_owned(),
        ..OfflineContainer::default()
    };
    for kv in labels.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        if k == "ip" {
            c.addr = Some(
                v.parse()
                    .map_err(|_| format!("--container {s:?}: bad address {v:?}"))?,
            );
            continue;
        }
        c.labels.insert(k.to_owned(), v.to_owned());
    }
    Ok(c)
}

#[cfg(test)]
#[path = "trace_tests.rs"]
mod tests;
