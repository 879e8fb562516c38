//! Random cases: a few endpoints, their ipcache and policy, some conntrack left from before, and a
//! sequence of packets that talk about each other (replies, repeats with other TCP flags, ICMP
//! errors quoting an earlier packet, a packet between two endpoints delivered on both veths), with
//! broken headers, forged sources, extension headers and fragments mixed in.

use netpol_common::{
    ct::{CtDir, CtEntry, CtKey4, CtKey6},
    endpoint::Endpoint,
    identity,
    ipcache::RemoteInfo,
    model::{CtKey, World},
    policy::{self, PolicyKey, PolicyValue},
    proto, Direction,
};

use crate::packet::*;

/// splitmix64: small, fast, and every seed gives its own stream.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `pct` percent.
    pub fn chance(&mut self, pct: u32) -> bool {
        self.below(100) < pct as usize
    }

    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }
}

/// Which generators are on. Areas whose semantics are being changed can be switched off here
/// until the model follows them.
#[derive(Clone, Copy, Debug)]
pub struct Features {
    pub ipv6: bool,
    pub icmp_errors: bool,
    pub neighbour: bool,
    pub fragments: bool,
    pub ext_headers: bool,
    pub broken_headers: bool,
    pub forged_sources: bool,
    pub stale_conntrack: bool,
}

impl Features {
    pub const ALL: Features = Features {
        ipv6: true,
        icmp_errors: true,
        neighbour: true,
        fragments: true,
        ext_headers: true,
        broken_headers: true,
        forged_sources: true,
        stale_conntrack: true,
    };
}

/// A host with an address of each family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: &'static str,
    pub v4: [u8; 4],
    pub v6: [u8; 16],
}

const fn v6(prefix: [u8; 4], hi: u16, last: u16) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = prefix[0];
    a[1] = prefix[1];
    a[2] = prefix[2];
    a[3] = prefix[3];
    let h = hi.to_be_bytes();
    a[4] = h[0];
    a[5] = h[1];
    let l = last.to_be_bytes();
    a[14] = l[0];
    a[15] = l[1];
    a
}

const ULA: [u8; 4] = [0xfd, 0, 0, 0];
const DOC: [u8; 4] = [0x20, 0x01, 0x0d, 0xb8];

/// The address pool. The first three are the endpoints'.
pub const NODES: [Node; 12] = [
    Node {
        name: "ep0",
        v4: [10, 0, 0, 2],
        v6: v6(ULA, 0, 2),
    },
    Node {
        name: "ep1",
        v4: [10, 0, 0, 3],
        v6: v6(ULA, 0, 3),
    },
    Node {
        name: "ep2",
        v4: [10, 0, 0, 4],
        v6: v6(ULA, 0, 4),
    },
    Node {
        name: "c5",
        v4: [10, 0, 0, 5],
        v6: v6(ULA, 0, 5),
    },
    Node {
        name: "c6",
        v4: [10, 0, 0, 6],
        v6: v6(ULA, 0, 6),
    },
    Node {
        name: "departed",
        v4: [10, 0, 0, 7],
        v6: v6(ULA, 0, 7),
    },
    Node {
        name: "gateway",
        v4: [10, 0, 0, 1],
        v6: v6(ULA, 0, 1),
    },
    Node {
        name: "world",
        v4: [192, 0, 2, 10],
        v6: v6(DOC, 0, 0x10),
    },
    Node {
        name: "cidr",
        v4: [198, 51, 100, 7],
        v6: v6(DOC, 1, 7),
    },
    Node {
        name: "router",
        v4: [198, 51, 100, 1],
        v6: v6(DOC, 1, 1),
    },
    Node {
        name: "mcast",
        v4: [224, 0, 0, 251],
        v6: [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfb],
    },
    Node {
        name: "linklocal",
        v4: [169, 254, 1, 1],
        v6: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
    },
];

const GATEWAY: usize = 6;
const ROUTER: usize = 9;
const LINK_LOCAL_V6: [u8; 16] = NODES[11].v6;
const ALL_NODES_V6: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const ALL_ROUTERS_V6: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const MLDV2_V6: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x16];

fn solicited_node(a: &[u8; 16]) -> [u8; 16] {
    [
        0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, a[13], a[14], a[15],
    ]
}

const IDENTITIES: [u32; 4] = [256, 257, 258, 259];
/// In a case's ipcache and conntrack, interfaces are `veth index + 1` (0: none) or this: the
/// bridge. The runner maps them to ifindexes.
pub const BRIDGE_SLOT: u32 = 100;
const CIDR_V4: u32 = 1000;
const CIDR_V6: u32 = 1001;
const SPORTS: [u16; 6] = [40000, 40001, 5432, 53, 80, 1234];
const DPORTS: [u16; 6] = [22, 53, 80, 443, 5432, 8080];
const ECHO_IDS: [u16; 3] = [1, 2, 7];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fam {
    V4,
    V6,
}

/// One program run.
#[derive(Clone, Debug)]
pub struct Step {
    /// Index of the veth (into the case's ifindex list).
    pub veth: usize,
    pub dir: Direction,
    /// The device the packet entered the host through (`skb->ingress_ifindex`).
    pub via: Via,
    pub frame: Vec<u8>,
    /// What the generator meant to build, for the report.
    pub what: String,
}

/// Where a packet entered the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The step's own veth (every `from_container` packet).
    Own,
    /// Another endpoint's veth (bridged from that container).
    Veth(usize),
    /// The uplink (routed from outside).
    Uplink,
    /// The containers' bridge (a container's packet routed by the host, not bridged).
    Bridge,
    /// None: sent by the host's own stack (`ingress_ifindex` 0).
    Host,
}

/// A generated case: the maps' contents before the first packet, and the packets.
#[derive(Clone, Debug)]
pub struct Case {
    pub seed: u64,
    /// Endpoints keyed by *veth index* (the runner maps them to ifindexes); conntrack expiry
    /// times relative to 0 (the runner adds the time the case starts, then they are absolute).
    pub world: World,
    /// For each pre-existing conntrack entry: its expiry offset in ns from the start (may be
    /// negative: already stale).
    pub ct_offsets: Vec<i64>,
    pub steps: Vec<Step>,
}

/// The L4 part of a sent packet, so replies and repeats can be derived from it.
#[derive(Clone, Copy, Debug)]
enum L4 {
    Tcp { sport: u16, dport: u16, flags: u8 },
    Udp { sport: u16, dport: u16 },
    Sctp { sport: u16, dport: u16 },
    Echo { request: bool, id: u16 },
    Icmp { ty: u8 },
    Raw { proto: u8 },
}

/// A packet as the generator sees it.
#[derive(Clone, Copy, Debug)]
struct Pkt {
    fam: Fam,
    /// Addresses (IPv4 in the first 4 bytes).
    s: [u8; 16],
    d: [u8; 16],
    l4: L4,
    /// Where it was run: veth index and direction.
    veth: usize,
    dir: Direction,
}

fn addr(n: &Node, fam: Fam) -> [u8; 16] {
    match fam {
        Fam::V4 => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&n.v4);
            a
        }
        Fam::V6 => n.v6,
    }
}

fn a4(a: &[u8; 16]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

fn tcp_flags(rng: &mut Rng) -> u8 {
    const F: [u8; 10] = [
        TCP_SYN,
        TCP_SYN,
        TCP_SYN | TCP_ACK,
        TCP_ACK,
        TCP_ACK | 0x08,
        TCP_FIN | TCP_ACK,
        TCP_RST,
        TCP_RST | TCP_ACK,
        TCP_SYN | TCP_FIN,
        0,
    ];
    if rng.chance(5) {
        rng.byte()
    } else {
        rng.pick(&F)
    }
}

struct Gen {
    rng: Rng,
    f: Features,
    n_veths: usize,
    /// veth index → endpoint node index (`None`: unmanaged veth).
    ep_node: Vec<Option<usize>>,
    history: Vec<Pkt>,
    steps: Vec<Step>,
}

impl Case {
    /// A case for `n_veths` veths (at most 3) from `seed`.
    pub fn generate(seed: u64, n_veths: usize, f: Features) -> Case {
        assert!((1..=3).contains(&n_veths));
        let mut rng = Rng::new(seed);
        // Half the cases with conntrack's in-place reuse of entries (x86's agent), half without
        // (every other architecture's), from the seed alone: the random stream is unchanged.
        let mut world = World {
            ct_in_place: seed.is_multiple_of(2),
            ..World::default()
        };
        // Endpoints: veth i holds node i, unless it is left unmanaged.
        let n_eps = 1 + rng.below(n_veths);
        let mut ep_node = vec![None; n_veths];
        let mut ep_ids = Vec::new();
        for (i, slot) in ep_node.iter_mut().enumerate().take(n_eps) {
            let n = &NODES[i];
            let id = rng.pick(&IDENTITIES[..3]);
            let mut ep = Endpoint::new(id);
            if !f.ipv6 || rng.chance(92) {
                ep = ep.with_ipv4(n.v4);
            }
            if f.ipv6 && rng.chance(92) {
                ep = ep.with_ipv6(n.v6);
            }
            ep = ep.enforce(rng.chance(60), rng.chance(50));
            // Audit mode on some directions (it only matters on enforced ones).
            ep = ep.audit(rng.chance(20), rng.chance(20));
            world.endpoints.push((i as u32, ep));
            *slot = Some(i);
            ep_ids.push(id);
            if rng.chance(95) {
                // A container's address comes in through its veth: `veth index + 1` here (0
                // means no check), mapped to the ifindex by the runner. Sometimes the agent
                // does not know the veth.
                let info = if rng.chance(40) {
                    RemoteInfo::container(id, i as u32 + 1, 0)
                } else if rng.chance(70) {
                    RemoteInfo::container(id, i as u32 + 1, BRIDGE_SLOT)
                } else {
                    RemoteInfo::new(id)
                };
                world.ipcache4.push((32, n.v4, info));
                world.ipcache6.push((128, n.v6, info));
            }
        }
        // Other containers, the host, CIDR identities, managed subnets.
        for n in &NODES[3..5] {
            let id = rng.pick(&IDENTITIES);
            world.ipcache4.push((32, n.v4, RemoteInfo::new(id)));
            world.ipcache6.push((128, n.v6, RemoteInfo::new(id)));
        }
        world
            .ipcache4
            .push((32, NODES[GATEWAY].v4, RemoteInfo::host()));
        world
            .ipcache6
            .push((128, NODES[GATEWAY].v6, RemoteInfo::host()));
        if rng.chance(50) {
            world
                .ipcache4
                .push((24, [10, 0, 0, 0], RemoteInfo::new(identity::UNMANAGED)));
            world
                .ipcache6
                .push((64, v6(ULA, 0, 0), RemoteInfo::new(identity::UNMANAGED)));
        }
        if rng.chance(50) {
            world
                .ipcache4
                .push((24, [198, 51, 100, 0], RemoteInfo::new(CIDR_V4)));
            world
                .ipcache6
                .push((48, v6(DOC, 1, 0), RemoteInfo::new(CIDR_V6)));
        }
        // Policy.
        let remotes = [
            identity::ANY,
            identity::ANY,
            identity::ANY,
            identity::HOST,
            identity::WORLD,
            identity::UNMANAGED,
            256,
            257,
            258,
            259,
            CIDR_V4,
            CIDR_V6,
        ];
        let n_rules = rng.below(16);
        for r in 0..n_rules {
            let local = if rng.chance(90) {
                rng.pick(&ep_ids)
            } else {
                rng.pick(&IDENTITIES)
            };
            let remote = rng.pick(&remotes);
            let dir = if rng.chance(50) {
                Direction::Ingress
            } else {
                Direction::Egress
            };
            let p = rng.pick(&[
                proto::TCP,
                proto::TCP,
                proto::UDP,
                proto::SCTP,
                proto::ICMP,
                proto::ICMPV6,
                47,
            ]);
            let icmp = p == proto::ICMP || p == proto::ICMPV6;
            let port = if icmp {
                rng.pick(&[0u16, 3, 8, 128, 129, 1, 2, 13, 135])
            } else {
                rng.pick(&DPORTS)
            };
            let (key, prefix) = match rng.below(10) {
                0..=2 => (
                    PolicyKey::new(local, remote, dir, 0, 0),
                    policy::PREFIX_ANY_PROTO,
                ),
                3 | 4 => (
                    PolicyKey::new(local, remote, dir, p, 0),
                    policy::PREFIX_ANY_PORT,
                ),
                5 => {
                    let bits = 1 + rng.below(15) as u32;
                    let mask = !((1u32 << (16 - bits)) - 1) as u16;
                    (
                        PolicyKey::new(local, remote, dir, p, port & mask),
                        policy::PREFIX_ANY_PORT + bits,
                    )
                }
                _ => (
                    PolicyKey::new(local, remote, dir, p, port),
                    policy::FULL_PREFIX,
                ),
            };
            let rule = r as u32 + 1;
            let value = if rng.chance(75) {
                PolicyValue::allow(rule)
            } else {
                PolicyValue::deny(rule)
            };
            // One entry per (prefix, key), as in the trie.
            world
                .policy
                .retain(|(l, k, _)| !(*l == prefix && *k == key));
            world.policy.push((prefix, key, value));
        }
        // The compiler's one-lookup flag, where its proof holds (no wildcard deny of the same
        // local and direction overlaps the allow), on every other such allow (by rule id, so the
        // random draws stay as they were): the kernel and the model must agree with and without.
        let snapshot = world.policy.clone();
        for (len, k, v) in world.policy.iter_mut() {
            let overlapped = snapshot.iter().any(|(dl, dk, dv)| {
                dk.remote == identity::ANY
                    && dv.is_deny()
                    && dk.local == k.local
                    && dk.direction == k.direction
                    && policy::overlaps(k, *len, dk, *dl)
            });
            if v.is_allow() && k.remote != identity::ANY && !overlapped && v.rule % 2 == 0 {
                v.flags |= PolicyValue::FINAL;
            }
        }
        let mut g = Gen {
            rng,
            f,
            n_veths,
            ep_node,
            history: Vec::new(),
            steps: Vec::new(),
        };
        // Conntrack left from before: departed containers, half-closed flows, stale entries.
        let mut ct = Vec::new();
        let mut ct_offsets = Vec::new();
        if f.stale_conntrack {
            for _ in 0..g.rng.below(5) {
                let p = g.random_packet();
                let fam = p.fam;
                let (sport, dport, pr) = p.l4.ct_ports(fam);
                let cdir = if g.rng.chance(50) {
                    CtDir::Ingress
                } else {
                    CtDir::Egress
                };
                // Keyed from the side of the endpoint that sends (`Egress`) or receives the packet.
                let side = if cdir == CtDir::Egress {
                    Direction::Egress
                } else {
                    Direction::Ingress
                };
                let k = match fam {
                    Fam::V4 => CtKey::V4(CtKey4::of_packet(
                        a4(&p.s),
                        a4(&p.d),
                        sport,
                        dport,
                        pr,
                        side,
                    )),
                    Fam::V6 => CtKey::V6(CtKey6::of_packet(p.s, p.d, sport, dport, pr, side)),
                };
                // Opened from that side or, sometimes, from the other one.
                let opener = if g.rng.chance(80) {
                    cdir
                } else if cdir == CtDir::Egress {
                    CtDir::Ingress
                } else {
                    CtDir::Egress
                };
                // Some admitted by audit mode: the endpoint may audit that direction or not
                // (any more).
                let flags = g.rng.pick(&[
                    0,
                    CtEntry::SEEN_REPLY,
                    CtEntry::CLOSING,
                    CtEntry::SEEN_REPLY | CtEntry::CLOSING,
                    CtEntry::AUDIT,
                    CtEntry::AUDIT | CtEntry::SEEN_REPLY,
                ]);
                let secs: i64 = g.rng.pick(&[-100, -2, 5, 30, 3600]);
                if ct.iter().any(|(x, _)| *x == k) {
                    continue;
                }
                // Held by one of the endpoints (veth index, mapped by the runner), mostly with
                // its identity; sometimes by a departed one (another identity).
                let (veth, ep) = world.endpoints[g.rng.below(world.endpoints.len())];
                let identity = if g.rng.chance(80) {
                    ep.identity
                } else {
                    g.rng.pick(&IDENTITIES)
                };
                ct.push((
                    k,
                    CtEntry {
                        expires_ns: 0,
                        flags,
                        rule: g.rng.below(4) as u32,
                        ifindex: veth,
                        identity,
                        remote_identity: g.rng.pick(&[0, identity::WORLD, 256, 257, 258]),
                        remote_ifindex: g.rng.pick(&[0, 0, 1, 2, 3]),
                        remote_bridge: g.rng.pick(&[0, 1, BRIDGE_SLOT]),
                        dir: opener as u8,
                        ..CtEntry::default()
                    },
                ));
                ct_offsets.push(secs * 1_000_000_000);
                // Packets of those flows are likely to come.
                g.history.push(p);
            }
        }
        let n_steps = 6 + g.rng.below(30);
        while g.steps.len() < n_steps {
            g.step();
        }
        let steps = g.steps;
        world.ct = ct;
        Case {
            seed,
            world,
            ct_offsets,
            steps,
        }
    }
}

impl L4 {
    /// Conntrack's (sport, dport, proto) of this L4 header.
    fn ct_ports(&self, fam: Fam) -> (u16, u16, u8) {
        let icmp = match fam {
            Fam::V4 => proto::ICMP,
            Fam::V6 => proto::ICMPV6,
        };
        match *self {
            L4::Tcp { sport, dport, .. } => (sport, dport, proto::TCP),
            L4::Udp { sport, dport } => (sport, dport, proto::UDP),
            L4::Sctp { sport, dport } => (sport, dport, proto::SCTP),
            L4::Echo { request: true, id } => (id, 0, icmp),
            L4::Echo { request: false, id } => (0, id, icmp),
            L4::Icmp { .. } => (0, 0, icmp),
            L4::Raw { proto } => (0, 0, proto),
        }
    }

    fn reply(&self, rng: &mut Rng) -> L4 {
        match *self {
            L4::Tcp { sport, dport, .. } => L4::Tcp {
                sport: dport,
                dport: sport,
                flags: tcp_flags(rng),
            },
            L4::Udp { sport, dport } => L4::Udp {
                sport: dport,
                dport: sport,
            },
            L4::Sctp { sport, dport } => L4::Sctp {
                sport: dport,
                dport: sport,
            },
            L4::Echo { request, id } => L4::Echo {
                request: !request,
                id,
            },
            other => other,
        }
    }
}

impl Gen {
    fn ep_veths(&self) -> Vec<usize> {
        (0..self.n_veths)
            .filter(|&v| self.ep_node[v].is_some())
            .collect()
    }

    fn fam(&mut self) -> Fam {
        if self.f.ipv6 && self.rng.chance(50) {
            Fam::V6
        } else {
            Fam::V4
        }
    }

    fn node(&mut self) -> &'static Node {
        &NODES[self.rng.below(NODES.len())]
    }

    fn l4(&mut self, fam: Fam) -> L4 {
        let icmp_proto = match fam {
            Fam::V4 => proto::ICMP,
            Fam::V6 => proto::ICMPV6,
        };
        match self.rng.below(20) {
            0..=7 => L4::Tcp {
                sport: self.rng.pick(&SPORTS),
                dport: self.rng.pick(&DPORTS),
                flags: tcp_flags(&mut self.rng),
            },
            8..=11 => L4::Udp {
                sport: self.rng.pick(&SPORTS),
                dport: self.rng.pick(&DPORTS),
            },
            12 => L4::Sctp {
                sport: self.rng.pick(&SPORTS),
                dport: self.rng.pick(&DPORTS),
            },
            13..=15 => L4::Echo {
                request: self.rng.chance(75),
                id: self.rng.pick(&ECHO_IDS),
            },
            16 | 17 => {
                let ty = match fam {
                    Fam::V4 => self.rng.pick(&[13u8, 9, 10, 17, 200, 4, 5]),
                    // 134 and 136 (RA, NA): neighbour discovery with the broken headers,
                    // extension headers and fragments of this path, which `neighbour` does not
                    // make (dropped on every endpoint: lxc.rs step 3).
                    Fam::V6 => self.rng.pick(&[138u8, 139, 200, 144, 134, 136]),
                };
                L4::Icmp { ty }
            }
            18 => L4::Raw {
                proto: self.rng.pick(&[47u8, 50, 89, 0, 255]),
            },
            // The other family's ICMP number.
            _ => L4::Raw {
                proto: if icmp_proto == proto::ICMP {
                    proto::ICMPV6
                } else {
                    proto::ICMP
                },
            },
        }
    }

    /// A fresh packet on a random endpoint's veth, either way.
    fn random_packet(&mut self) -> Pkt {
        let veths = self.ep_veths();
        let mut veth = self.rng.pick(&veths);
        if self.rng.chance(3) {
            veth = self.rng.below(self.n_veths);
        }
        let node = self.ep_node[veth].map_or(&NODES[veth], |n| &NODES[n]);
        let fam = self.fam();
        let dir = if self.rng.chance(50) {
            Direction::Egress
        } else {
            Direction::Ingress
        };
        let me = addr(node, fam);
        let other = *self.node();
        let peer = addr(&other, fam);
        let forge = self.f.forged_sources && self.rng.chance(10);
        let (s, d) = match dir {
            Direction::Egress => (if forge { addr(self.node(), fam) } else { me }, peer),
            Direction::Ingress => (peer, if forge { addr(self.node(), fam) } else { me }),
        };
        let l4 = self.l4(fam);
        Pkt {
            fam,
            s,
            d,
            l4,
            veth,
            dir,
        }
    }

    fn step(&mut self) {
        let r = self.rng.below(100);
        let have = !self.history.is_empty();
        if r < 35 || !have {
            let p = self.random_packet();
            self.emit(p, "new");
            // A packet between two endpoints: also delivered on the other's veth.
            if p.dir == Direction::Egress && self.rng.chance(60) {
                if let Some(v) = (0..self.n_veths)
                    .find(|&v| self.ep_node[v].is_some_and(|n| addr(&NODES[n], p.fam) == p.d))
                {
                    let mut q = p;
                    q.veth = v;
                    q.dir = Direction::Ingress;
                    self.emit(q, "delivered");
                }
            }
        } else if r < 65 {
            let h = self.history[self.rng.below(self.history.len())];
            let mut q = h;
            q.s = h.d;
            q.d = h.s;
            q.l4 = h.l4.reply(&mut self.rng);
            q.dir = match h.dir {
                Direction::Egress => Direction::Ingress,
                Direction::Ingress => Direction::Egress,
            };
            if self.rng.chance(10) {
                // Flooded, or on the veth of the endpoint that sent it.
                q.veth = self.rng.below(self.n_veths);
            }
            self.emit(q, "reply");
        } else if r < 74 {
            let h = self.history[self.rng.below(self.history.len())];
            let mut q = h;
            if let L4::Tcp { flags, .. } = &mut q.l4 {
                *flags = tcp_flags(&mut self.rng);
            }
            self.emit(q, "again");
        } else if r < 81 && self.f.fragments {
            let h = self.history[self.rng.below(self.history.len())];
            self.fragments(h);
        } else if r < 93 && self.f.icmp_errors {
            let h = self.history[self.rng.below(self.history.len())];
            self.icmp_error(h);
        } else if r < 97 && self.f.neighbour && self.f.ipv6 {
            self.neighbour();
        } else {
            self.odd_l2();
        }
    }

    /// Builds the L3 packet of `p` (with mutations), runs it as a step and remembers it.
    fn emit(&mut self, p: Pkt, what: &str) {
        let (l4bytes, proto) = self.l4_bytes(p.fam, &p.l4);
        let mut what = format!("{what} {:?} {:?} {:?}", p.fam, p.dir, p.l4);
        let l3 = self.l3(p.fam, p.s, p.d, proto, &l4bytes, &mut what);
        self.push(p.veth, p.dir, p.fam, l3, what);
        self.history.push(p);
    }

    fn push(&mut self, veth: usize, dir: Direction, fam: Fam, l3: Vec<u8>, what: String) {
        let ethertype = match fam {
            Fam::V4 => ETH_P_IP,
            Fam::V6 => ETH_P_IPV6,
        };
        let src = match fam {
            Fam::V4 => addr(
                &Node {
                    name: "",
                    v4: [l3[12], l3[13], l3[14], l3[15]],
                    v6: [0; 16],
                },
                fam,
            ),
            Fam::V6 => l3[8..24].try_into().unwrap(),
        };
        let via = self.via(dir, fam, &src);
        self.steps.push(Step {
            veth,
            dir,
            via,
            frame: eth(ethertype, &l3),
            what,
        });
    }

    /// Where a packet from `src` enters the host: a container's packets through its veth
    /// (mostly: a forged one comes from elsewhere), the host's from its own stack (mostly:
    /// also NATed back through the own veth, or forged from elsewhere), others
    /// through the uplink.
    fn via(&mut self, dir: Direction, fam: Fam, src: &[u8; 16]) -> Via {
        if dir == Direction::Egress {
            return Via::Own;
        }
        if *src == addr(&NODES[GATEWAY], fam) {
            return match self.rng.below(10) {
                0..=5 => Via::Host,
                6 => Via::Bridge,
                7 => Via::Own,
                8 => Via::Uplink,
                _ => Via::Veth(self.rng.below(self.n_veths)),
            };
        }
        let owner = (0..self.n_veths)
            .find(|&v| self.ep_node[v].is_some_and(|n| addr(&NODES[n], fam) == *src));
        match owner {
            Some(v) if self.rng.chance(80) => Via::Veth(v),
            Some(_) if self.rng.chance(50) => Via::Bridge,
            _ if self.rng.chance(10) => Via::Veth(self.rng.below(self.n_veths)),
            _ => Via::Uplink,
        }
    }

    fn l4_bytes(&mut self, fam: Fam, l4: &L4) -> (Vec<u8>, u8) {
        let icmp_proto = match fam {
            Fam::V4 => proto::ICMP,
            Fam::V6 => proto::ICMPV6,
        };
        match *l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                let mut t = tcp(sport, dport, flags);
                if self.f.broken_headers && self.rng.chance(4) {
                    // A data offset below 5, or options.
                    t[12] = (self.rng.below(16) as u8) << 4;
                }
                (t, proto::TCP)
            }
            L4::Udp { sport, dport } => (udp(sport, dport, b"payload"), proto::UDP),
            L4::Sctp { sport, dport } => {
                let mut h = udp(sport, dport, &[0; 8]);
                h[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
                (h, proto::SCTP)
            }
            L4::Echo { request, id } => {
                let ty = match (fam, request) {
                    (Fam::V4, true) => 8,
                    (Fam::V4, false) => 0,
                    (Fam::V6, true) => 128,
                    (Fam::V6, false) => 129,
                };
                (icmp_echo(ty, id, 1), icmp_proto)
            }
            L4::Icmp { ty } => (icmp(ty, 0, [0; 4], &[0u8; 16]), icmp_proto),
            L4::Raw { proto } => {
                let n = self.rng.pick(&[0usize, 4, 8, 24]);
                let body: Vec<u8> = (0..n).map(|_| self.rng.byte()).collect();
                (body, proto)
            }
        }
    }

    /// The IP packet `s → d` with `payload` of protocol `proto`, with random extension headers,
    /// fragmentation and broken lengths.
    fn l3(
        &mut self,
        fam: Fam,
        s: [u8; 16],
        d: [u8; 16],
        proto: u8,
        payload: &[u8],
        what: &mut String,
    ) -> Vec<u8> {
        let mut p = match fam {
            Fam::V4 => {
                let mut h = Ipv4::new(a4(&s), a4(&d), proto);
                if self.f.broken_headers && self.rng.chance(5) {
                    h.ihl = self.rng.pick(&[0u8, 4, 6, 7, 15]);
                    what.push_str(&format!(" ihl={}", h.ihl));
                }
                if self.f.fragments && self.rng.chance(6) {
                    h.frag_offset = self.rng.pick(&[0u16, 0, 1, 185]);
                    h.more_fragments = self.rng.chance(50);
                    what.push_str(&format!(
                        " frag={}{}",
                        h.frag_offset,
                        if h.more_fragments { "+MF" } else { "" }
                    ));
                }
                let mut p = h.build(payload);
                if self.f.broken_headers && self.rng.chance(5) {
                    let real = p.len() as u16;
                    let tot = self
                        .rng
                        .pick(&[0u16, 19, 20, real.saturating_sub(4), real + 40]);
                    p[2..4].copy_from_slice(&tot.to_be_bytes());
                    what.push_str(&format!(" tot_len={tot}"));
                }
                p
            }
            Fam::V6 => {
                let mut next = proto;
                let mut body = payload.to_vec();
                if self.f.fragments && self.rng.chance(6) {
                    let off = self.rng.pick(&[0u16, 0, 1, 185]);
                    let more = self.rng.chance(50);
                    body = ipv6_fragment(next, off, more, &body);
                    next = 44;
                    what.push_str(&format!(" frag={off}{}", if more { "+M" } else { "" }));
                }
                if self.f.ext_headers && self.rng.chance(12) {
                    let n = 1 + self.rng.below(6);
                    for _ in 0..n {
                        let kind = self.rng.pick(&[0u8, 43, 60, 51, 44]);
                        body = if kind == 44 {
                            ipv6_fragment(next, 0, false, &body)
                        } else {
                            let len = self.rng.pick(&[0u8, 0, 1, 3]);
                            ipv6_ext(kind, next, len, &body)
                        };
                        next = kind;
                    }
                    what.push_str(&format!(" ext={n}"));
                }
                let mut p = ipv6_raw(s, d, next, 64, &body);
                if self.f.broken_headers && self.rng.chance(5) {
                    let real = (p.len() - 40) as u16;
                    let len = self.rng.pick(&[0u16, 4, real.saturating_sub(4), real + 40]);
                    p[4..6].copy_from_slice(&len.to_be_bytes());
                    what.push_str(&format!(" payload_len={len}"));
                }
                p
            }
        };
        if self.f.broken_headers && self.rng.chance(6) {
            // Cut the packet short (never inside the fixed IP header: the test run refuses that).
            let min = match fam {
                Fam::V4 => 20,
                Fam::V6 => 40,
            };
            if p.len() > min {
                let at = min + self.rng.below(p.len() - min);
                p.truncate(at);
                what.push_str(&format!(" cut={at}"));
            }
        }
        if self.f.broken_headers && self.rng.chance(8) {
            // Trailing bytes past the IP length (Ethernet pads short frames to 60 bytes).
            let n = self.rng.pick(&[1usize, 6, 20, 46]);
            let fill = self.rng.byte();
            p.extend(std::iter::repeat_n(fill, n));
            what.push_str(&format!(" pad={n}"));
        }
        if self.f.broken_headers && self.rng.chance(2) {
            p[0] = (self.rng.byte() & 0xf0) | (p[0] & 0x0f);
            what.push_str(&format!(" version={}", p[0] >> 4));
        }
        p
    }

    /// The packet `h` again (with a longer body), sent as a train of fragments: in order, out of
    /// order, or only its later fragments; the datagram ID from a small pool, so trains of
    /// different flows can collide.
    fn fragments(&mut self, h: Pkt) {
        let (mut payload, proto) = self.l4_bytes(h.fam, &h.l4);
        let hdr = payload.len();
        let extra = 8 + self.rng.below(56);
        payload.extend((0..extra).map(|_| self.rng.byte()));
        let id = self.rng.pick(&[0x1234u16, 0x4321, 7]);
        // The first piece carries the whole L4 header (mostly): a multiple of 8 bytes.
        let mut cut = if self.rng.chance(80) {
            hdr.div_ceil(8).max(1) * 8
        } else {
            8 * (1 + self.rng.below(3))
        };
        if cut >= payload.len() {
            cut = 8;
        }
        let mut pieces = vec![(0usize, payload[..cut].to_vec(), true)];
        let rest = &payload[cut..];
        if rest.len() > 16 && self.rng.chance(40) {
            let mid = 8 * (rest.len() / 16).max(1);
            pieces.push((cut, rest[..mid].to_vec(), true));
            pieces.push((cut + mid, rest[mid..].to_vec(), false));
        } else {
            pieces.push((cut, rest.to_vec(), false));
        }
        let order = self.rng.below(10);
        if order == 8 {
            pieces.reverse();
        } else if order == 9 {
            pieces.remove(0);
        }
        let icmp_like = matches!(h.l4, L4::Echo { .. } | L4::Icmp { .. });
        for (off, body, more) in pieces {
            let units = (off / 8) as u16;
            let l3 = match h.fam {
                Fam::V4 => {
                    let mut ip = Ipv4::new(a4(&h.s), a4(&h.d), proto);
                    ip.frag_offset = units;
                    ip.more_fragments = more;
                    let mut p = ip.build(&body);
                    p[4..6].copy_from_slice(&id.to_be_bytes());
                    p
                }
                Fam::V6 => {
                    let mut p =
                        ipv6_raw(h.s, h.d, 44, 64, &ipv6_fragment(proto, units, more, &body));
                    p[44..48].copy_from_slice(&u32::from(id).to_be_bytes());
                    p
                }
            };
            let what = format!(
                "fragment {off}{} id {id:#x} of {:?} {:?} {:?}{}",
                if more { "+MF" } else { "" },
                h.fam,
                h.dir,
                h.l4,
                if icmp_like { " (icmp)" } else { "" }
            );
            self.push(h.veth, h.dir, h.fam, l3, what);
        }
    }

    /// An ICMP error about the earlier packet `h`, travelling back towards its source.
    fn icmp_error(&mut self, h: Pkt) {
        let (l4bytes, proto) = self.l4_bytes(h.fam, &h.l4);
        let mut what = String::new();
        let quoted = match h.fam {
            Fam::V4 => Ipv4::new(a4(&h.s), a4(&h.d), proto).build(&l4bytes),
            Fam::V6 => ipv6_raw(h.s, h.d, proto, 64, &l4bytes),
        };
        let keep = match (h.fam, self.rng.below(4)) {
            (Fam::V4, 0) => quoted.len(),
            (Fam::V4, _) => 28,
            (Fam::V6, 0) => 44,
            _ => quoted.len(),
        };
        let quoted = &quoted[..keep.min(quoted.len())];
        let (ty, code) = match h.fam {
            Fam::V4 => self
                .rng
                .pick(&[(3u8, 4u8), (3, 3), (11, 0), (12, 0), (4, 0), (5, 1)]),
            Fam::V6 => self.rng.pick(&[(2u8, 0u8), (1, 4), (3, 0), (4, 0)]),
        };
        let icmp_proto = match h.fam {
            Fam::V4 => proto::ICMP,
            Fam::V6 => proto::ICMPV6,
        };
        let mut body = icmp(ty, code, [0, 0, 0x05, 0xdc], quoted);
        if self.rng.chance(15) {
            // A big one.
            body.extend_from_slice(&[0u8; 900]);
            what.push_str(" +900");
        }
        // Back towards the quoted packet's source: it arrives at the endpoint that sent `h`
        // (from the receiver or a router on the way), or leaves the endpoint `h` was delivered
        // to (to its source or elsewhere).
        let (dir, s, d) = match h.dir {
            Direction::Egress => {
                let from = if self.rng.chance(50) {
                    h.d
                } else {
                    addr(&NODES[self.rng.pick(&[ROUTER, 7, 8])], h.fam)
                };
                (Direction::Ingress, from, h.s)
            }
            Direction::Ingress => {
                let to = if self.rng.chance(70) {
                    h.s
                } else {
                    addr(self.node(), h.fam)
                };
                (Direction::Egress, h.d, to)
            }
        };
        let mut veth = h.veth;
        if self.rng.chance(10) {
            veth = self.rng.below(self.n_veths);
        }
        let what = format!("icmp error {ty}/{code} {dir:?} about {:?}{what}", h.l4);
        let l3 = self.l3(h.fam, s, d, icmp_proto, &body, &mut String::new());
        self.push(veth, dir, h.fam, l3, what);
    }

    /// IPv6 neighbour discovery and MLD, well-formed or not.
    fn neighbour(&mut self) {
        let veths = self.ep_veths();
        let veth = self.rng.pick(&veths);
        let me = NODES[self.ep_node[veth].unwrap()].v6;
        let ty = self
            .rng
            .pick(&[130u8, 131, 132, 133, 134, 135, 136, 137, 143]);
        let egress = self.rng.chance(50);
        let local = [me, LINK_LOCAL_V6, [0; 16], self.node().v6];
        let remote = [
            ALL_NODES_V6,
            ALL_ROUTERS_V6,
            MLDV2_V6,
            solicited_node(&me),
            me,
            self.node().v6,
        ];
        let (s, d) = if egress {
            (self.rng.pick(&local), self.rng.pick(&remote))
        } else {
            let other = self.node().v6;
            (
                self.rng.pick(&[LINK_LOCAL_V6, [0; 16], other]),
                self.rng
                    .pick(&[ALL_NODES_V6, solicited_node(&me), me, MLDV2_V6]),
            )
        };
        let mld = matches!(ty, 130..=132 | 143);
        let hop = if self.rng.chance(70) {
            if mld {
                1
            } else {
                255
            }
        } else {
            self.rng.pick(&[255u8, 1, 64])
        };
        let n = self.rng.pick(&[16usize, 20, 24, 32, 900, 1300]);
        let mut body = vec![0u8; n];
        if matches!(ty, 135..=137) || (mld && self.rng.chance(50)) {
            // The target (ND) or multicast address (MLD) the message is about.
            let other = self.node().v6;
            let target = self
                .rng
                .pick(&[me, me, LINK_LOCAL_V6, other, NODES[GATEWAY].v6]);
            body[..16].copy_from_slice(&target);
        }
        let code = if self.rng.chance(95) { 0 } else { 1 };
        let body = icmp(ty, code, [0; 4], &body);
        let (next, payload) = if self.rng.chance(30) {
            (0, ipv6_hop_by_hop_router_alert(proto::ICMPV6, &body))
        } else {
            (proto::ICMPV6, body)
        };
        let l3 = ipv6_raw(s, d, next, hop, &payload);
        let dir = if egress {
            Direction::Egress
        } else {
            Direction::Ingress
        };
        self.push(
            veth,
            dir,
            Fam::V6,
            l3,
            format!("neighbour type {ty} hop {hop} len {n} {dir:?}"),
        );
    }

    /// ARP and other ethertypes.
    fn odd_l2(&mut self) {
        let veth = self.rng.below(self.n_veths);
        let dir = if self.rng.chance(50) {
            Direction::Egress
        } else {
            Direction::Ingress
        };
        let n = *self.node();
        let (frame, what) = match self.rng.below(4) {
            0 => (arp_request(n.v4, NODES[0].v4), "arp".to_string()),
            3 => {
                // As `from_container` sees a double-tagged frame (the kernel took the outer
                // tag off): a VLAN-0 tag, then IPv4 from any node to the first.
                let et = self.rng.pick(&[0x8100u16, 0x88a8]);
                let mut inner = vec![0, 0, 0x08, 0x00];
                inner.extend(Ipv4::new(n.v4, NODES[0].v4, proto::UDP).build(&udp(1, 2, b"x")));
                (eth(et, &inner), format!("VLAN {et:#06x} around IPv4"))
            }
            1 => {
                let et = self.rng.pick(&[0x88ccu16, 0x8100, 0x88a8, 0x0842, 0x0100]);
                (eth(et, &[0u8; 46]), format!("ethertype {et:#06x}"))
            }
            _ => {
                let l3 = ipv6_raw(n.v6, NODES[0].v6, proto::TCP, 64, &tcp(1, 2, TCP_SYN));
                (eth(ETH_P_IP, &l3), "IPv6 in an IPv4 frame".to_string())
            }
        };
        let via = if dir == Direction::Egress {
            Via::Own
        } else {
            Via::Uplink
        };
        self.steps.push(Step {
            veth,
            dir,
            via,
            frame,
            what,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_case() {
        for seed in [0u64, 1, 0xdead_beef] {
            let a = Case::generate(seed, 3, Features::ALL);
            let b = Case::generate(seed, 3, Features::ALL);
            assert_eq!(a.steps.len(), b.steps.len());
            for (x, y) in a.steps.iter().zip(&b.steps) {
                assert_eq!(
                    (x.veth, x.dir, x.via, &x.frame),
                    (y.veth, y.dir, y.via, &y.frame)
                );
            }
            assert_eq!(a.world.policy, b.world.policy);
            assert_eq!(a.world.ct, b.world.ct);
        }
    }

    /// `BPF_PROG_TEST_RUN` refuses frames shorter than the Ethernet header, IPv4/IPv6 frames
    /// shorter than the fixed IP header, and frames over a page.
    #[test]
    fn frames_are_ones_the_test_run_accepts() {
        for seed in 0..300 {
            let c = Case::generate(seed, 3, Features::ALL);
            assert!(!c.steps.is_empty());
            for s in &c.steps {
                let f = &s.frame;
                assert!(
                    f.len() >= 14 && f.len() <= 3000,
                    "seed {seed}: {} bytes",
                    f.len()
                );
                let min = match u16::from_be_bytes([f[12], f[13]]) {
                    ETH_P_IP => 14 + 20,
                    ETH_P_IPV6 => 14 + 40,
                    _ => 14,
                };
                assert!(f.len() >= min, "seed {seed}: {} ({})", s.what, f.len());
                assert!(s.veth < 3);
                if s.dir == Direction::Egress {
                    assert_eq!(s.via, Via::Own);
                }
            }
        }
    }
}
