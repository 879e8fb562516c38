//! Properties of issue 8 that every packet the kernel passes must have, checked on the kernel's
//! verdict alone (not through the model; the model's reason for a pass only switches some of
//! them off): the model is kept in step with the programs by the
//! same hands, so these catch a rule that both got wrong. Each reads the frame with its own
//! few lines of parsing.

use netpol_common::{
    ct::{CtKey4, CtKey6},
    endpoint::Endpoint,
    identity,
    model::{lpm, policy_lpm, CtKey, Why, World},
    policy::{self, Verdict},
    Direction,
};

/// Which properties are checked (an area whose fix has not landed yet is switched off, so that
/// main stays green; the report says which).
#[derive(Clone, Copy, Debug)]
pub struct Checks {
    /// Hole 5: from a container only its own source (IPv6 ND/MLD also link-local or `::`).
    pub own_source: bool,
    /// Hole 5: to a container only unicast addressed to it (or multicast, broadcast,
    /// link-local).
    pub own_destination: bool,
    /// Hole 4: to a container, a packet from another container's address only if it entered
    /// through that container's veth or bridge.
    pub container_source: bool,
    /// Hole 4 also where the programs pass a packet before that check, on paths that do not
    /// look at the packet's own source: a packet that fails to parse on an endpoint that
    /// enforces nothing, or a later fragment without a record in an unenforced direction
    /// (`Why::Unpoliced`, `Why::Fragment`); an ICMP error related to a flow (`Why::Related`:
    /// checked against the interface recorded for the flow's peer, not its own source); a packet
    /// of a flow whose entry recorded no interface for its peer (`Why::Conntrack`: the address
    /// was not a known container's when the flow was admitted).
    pub container_source_before_policy: bool,
    pub container_source_related: bool,
    pub container_source_conntrack: bool,
    /// To a container, a packet from a host address (identity `host`) only if the host's own
    /// stack sent it (`ingress_ifindex` 0), or it came in through the receiving endpoint's own
    /// veth (the host's NAT of its own connection): never from the uplink, a bridge or another
    /// veth.
    pub host_source: bool,
    /// Hole 3: see [`icmp_related`].
    pub icmp_error_to_peer: bool,
    /// Hole 2: no router advertisement or redirect from a container; ND with hop limit 255, MLD
    /// with hop limit 1, at most 1280 bytes; a container's NA names its own or a link-local
    /// target. (Destinations are not checked here: a solicited neighbour advertisement
    /// goes to the soliciting address, which may be global.)
    pub neighbour_rules: bool,
    /// From a container on an enforced egress, a new flow to a group or link-local destination
    /// (IPv4 multicast or 255.255.255.255, IPv6 multicast or link-local: every container on the
    /// bridge and the host receive it) only if policy allows it towards everyone (remote
    /// `ANY`) and no deny under `GROUP` (every peer's, copied by the agent) covers it, not
    /// merely because it allows `world`.
    pub group_destination: bool,
    /// A packet that passed on conntrack goes the way its kind allows: a TCP SYN-ACK and an ICMP
    /// echo reply only as a reply of their flow, an echo request only in the direction that
    /// opened it.
    pub conntrack_direction: bool,
}

impl Checks {
    pub const ALL: Checks = Checks {
        own_source: true,
        own_destination: true,
        container_source: true,
        container_source_before_policy: true,
        container_source_related: true,
        container_source_conntrack: true,
        host_source: true,
        icmp_error_to_peer: true,
        neighbour_rules: true,
        group_destination: true,
        conntrack_direction: true,
    };

    /// What the datapath on main is meant to hold today (holes 2, 3, 4 and 5 are fixed; hole 4's
    /// check comes before parsing, fragments, conntrack and policy). A property of a fix still
    /// under way, or beyond what the issue asks, is switched off here.
    pub const NOW: Checks = Checks { ..Checks::ALL };
}

fn be16(f: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*f.get(off)?, *f.get(off + 1)?]))
}

struct Ip<'a> {
    v6: bool,
    src: &'a [u8],
    dst: &'a [u8],
    /// Upper-layer protocol after at most a hop-by-hop header (enough for ND/MLD and ICMP); 255
    /// for a later IPv4 fragment (an IPv6 one keeps 44, the fragment header).
    proto: u8,
    /// Offset of the upper-layer header.
    l4: usize,
    /// IPv6 hop limit.
    hop: u8,
}

fn ip(f: &[u8]) -> Option<Ip<'_>> {
    match be16(f, 12)? {
        0x0800 => {
            let h = f.get(14..34)?;
            if h[0] >> 4 != 4 {
                return None;
            }
            let ihl = (h[0] & 15) as usize * 4;
            // A later fragment has no upper-layer header: call its protocol "none".
            let later = u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0;
            Some(Ip {
                v6: false,
                src: &h[12..16],
                dst: &h[16..20],
                proto: if later { 255 } else { h[9] },
                l4: 14 + ihl,
                hop: h[8],
            })
        }
        0x86dd => {
            let h = f.get(14..54)?;
            if h[0] >> 4 != 6 {
                return None;
            }
            let (mut proto, mut l4) = (h[6], 54);
            if proto == 0 {
                proto = *f.get(54)?;
                l4 += (*f.get(55)? as usize + 1) * 8;
            }
            Some(Ip {
                v6: true,
                src: &h[8..24],
                dst: &h[24..40],
                proto,
                l4,
                hop: h[7],
            })
        }
        _ => None,
    }
}

fn link_local6(a: &[u8]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

fn own(ep: &Endpoint, ip: &Ip) -> bool {
    if ip.v6 {
        ep.flags & Endpoint::HAS_IPV6 != 0 && ip.src == ep.ipv6
    } else {
        ep.flags & Endpoint::HAS_IPV4 != 0 && ip.src == ep.ipv4
    }
}

fn own_dst(ep: &Endpoint, ip: &Ip) -> bool {
    if ip.v6 {
        ep.flags & Endpoint::HAS_IPV6 != 0 && ip.dst == ep.ipv6
    } else {
        ep.flags & Endpoint::HAS_IPV4 != 0 && ip.dst == ep.ipv4
    }
}

/// Whether policy alone allows the ICMP message (type `ty`) `ip` from `ep` to its destination.
fn policy_allows(world: &World, ep: &Endpoint, dir: Direction, ip: &Ip, ty: Option<u8>) -> bool {
    let peer = match dir {
        Direction::Egress => ip.dst,
        Direction::Ingress => ip.src,
    };
    let remote = if dir == Direction::Egress && for_anyone(ip) {
        Some(identity::GROUP)
    } else if ip.v6 {
        lpm(
            world
                .ipcache6
                .iter()
                .map(|(l, a, id)| (*l, &a[..], id.identity)),
            peer,
        )
    } else {
        lpm(
            world
                .ipcache4
                .iter()
                .map(|(l, a, id)| (*l, &a[..], id.identity)),
            peer,
        )
    }
    .unwrap_or(identity::WORLD);
    let [a, b] = policy::lookup_keys(
        ep.identity,
        remote,
        dir,
        ip.proto,
        u16::from(ty.unwrap_or(0)),
    );
    matches!(
        policy::decide(policy_lpm(&world.policy, &a), policy_lpm(&world.policy, &b)),
        Verdict::Allow(_)
    )
}

/// Hole 3 on an enforced direction, for an ICMP message that policy alone would not let on
/// (so it passed as related to a flow): an error goes back to the quoted packet's sender from
/// the address it was sent to (to a container: quotes a packet the container sent; a port or
/// IPv4 protocol unreachable only from that packet's destination), and is at most 576 / 1280
/// bytes after the Ethernet header; IPv4 source quench (4) and redirect (5) are never related.
fn icmp_related(dir: Direction, ip: &Ip, f: &[u8]) -> Option<String> {
    let ty = *f.get(ip.l4)?;
    let code = *f.get(ip.l4 + 1)?;
    if !ip.v6 && (ty == 4 || ty == 5) {
        return Some(format!("hole 3: IPv4 ICMP type {ty} passed without policy"));
    }
    let error = if ip.v6 {
        (1..=4).contains(&ty)
    } else {
        matches!(ty, 3 | 11 | 12)
    };
    if !error {
        return None;
    }
    let cap = if ip.v6 { 1280 } else { 576 };
    if f.len() - 14 > cap {
        return Some(format!(
            "hole 3: an ICMP error of {} bytes passed",
            f.len() - 14
        ));
    }
    let q = ip.l4 + 8;
    let (qs, qd) = if ip.v6 {
        (f.get(q + 8..q + 24), f.get(q + 24..q + 40))
    } else {
        (f.get(q + 12..q + 16), f.get(q + 16..q + 20))
    };
    if qs != Some(ip.dst) {
        return Some(format!(
            "hole 3: an ICMP error {dir:?} not to the quoted packet's source"
        ));
    }
    if dir == Direction::Egress && qd != Some(ip.src) {
        return Some("hole 3: a container sent an ICMP error about a packet not sent to it".into());
    }
    let port_unreachable = if ip.v6 {
        ty == 1 && code == 4
    } else {
        ty == 3 && (code == 2 || code == 3)
    };
    if dir == Direction::Ingress && port_unreachable && qd != Some(ip.src) {
        return Some(
            "hole 3: a port unreachable from another host than the quoted destination".into(),
        );
    }
    None
}

/// Whether `a` is a group or link-local address of its family.
fn for_anyone(ip: &Ip) -> bool {
    if ip.v6 {
        ip.dst[0] == 0xff || link_local6(ip.dst)
    } else {
        ip.dst[0] & 0xf0 == 0xe0 || ip.dst.iter().all(|b| *b == 0xff)
    }
}

/// The policy port of a packet's upper-layer header: TCP, UDP, SCTP destination port, ICMP
/// type, 0 otherwise; `None` when the header is not there (an extension header or a later
/// fragment in the way).
fn policy_port(ip: &Ip, f: &[u8]) -> Option<u16> {
    match ip.proto {
        6 | 17 | 132 => be16(f, ip.l4 + 2),
        1 if !ip.v6 => f.get(ip.l4).map(|t| u16::from(*t)),
        58 if ip.v6 => f.get(ip.l4).map(|t| u16::from(*t)),
        0 | 43 | 44 | 50 | 51 | 60 | 255 => None,
        _ => Some(0),
    }
}

/// A new flow from a container to a group or link-local destination that policy does not allow
/// towards everyone (or denies under `GROUP`).
fn group_destination(world: &World, ep: &Endpoint, ip: &Ip, f: &[u8]) -> Option<String> {
    if !for_anyone(ip) {
        return None;
    }
    let port = policy_port(ip, f)?;
    let [a, b] = policy::lookup_keys(
        ep.identity,
        identity::GROUP,
        Direction::Egress,
        ip.proto,
        port,
    );
    if matches!(
        policy::decide(policy_lpm(&world.policy, &a), policy_lpm(&world.policy, &b)),
        Verdict::Allow(_)
    ) {
        return None;
    }
    Some(format!(
        "group destination: a container opened a flow to {:?} (protocol {}, port {port}) that \
         policy does not allow towards everyone",
        ip.dst, ip.proto
    ))
}

/// A packet that passed on conntrack against the way its kind goes (see
/// [`Checks::conntrack_direction`]): no live entry of its key (after the step) was opened from
/// the side that fits it.
fn conntrack_direction(world: &World, dir: Direction, ip: &Ip, f: &[u8]) -> Option<String> {
    let (sport, dport, must_reply) = match ip.proto {
        6 => {
            let flags = *f.get(ip.l4 + 13)?;
            if flags & 0x12 != 0x12 {
                return None;
            }
            (be16(f, ip.l4)?, be16(f, ip.l4 + 2)?, true)
        }
        1 | 58 => {
            let ty = *f.get(ip.l4)?;
            let id = be16(f, ip.l4 + 4)?;
            match (ip.v6, ty) {
                (false, 8) | (true, 128) => (id, 0, false),
                (false, 0) | (true, 129) => (0, id, true),
                _ => return None,
            }
        }
        _ => return None,
    };
    let k = if ip.v6 {
        CtKey::V6(CtKey6::of_packet(
            ip.src.try_into().ok()?,
            ip.dst.try_into().ok()?,
            sport,
            dport,
            ip.proto,
            dir,
        ))
    } else {
        CtKey::V4(CtKey4::of_packet(
            ip.src.try_into().ok()?,
            ip.dst.try_into().ok()?,
            sport,
            dport,
            ip.proto,
            dir,
        ))
    };
    let fits = [true, false]
        .iter()
        .filter_map(|est| world.ct_get(&k, *est))
        .any(|e| e.is_reply(dir) == must_reply);
    if fits {
        return None;
    }
    Some(format!(
        "conntrack direction: protocol {} {} passed on conntrack {dir:?} {}",
        ip.proto,
        if ip.proto == 6 { "SYN-ACK" } else { "echo" },
        if must_reply {
            "without a flow it answers"
        } else {
            "as a reply"
        }
    ))
}

/// The property a packet that the kernel passed on endpoint `ifindex` violates, if any.
pub fn violated(
    c: &Checks,
    world: &World,
    ifindex: u32,
    ingress_ifindex: u32,
    dir: Direction,
    f: &[u8],
    why: Option<Why>,
) -> Option<String> {
    let (_, ep) = world.endpoints.iter().find(|(i, _)| *i == ifindex)?;
    // Hole 5: a frame still VLAN-tagged (a second tag behind the one the kernel took off) hides
    // its addresses from both checks, and the host strips VLAN-0 tags and routes what is inside.
    if matches!(be16(f, 12), Some(0x8100 | 0x88a8))
        && ((dir == Direction::Egress && c.own_source)
            || (dir == Direction::Ingress && c.own_destination))
    {
        return Some("hole 5: a VLAN-tagged frame passed (its IP header is not checked)".into());
    }
    let ip = ip(f)?;
    let icmp = (!ip.v6 && ip.proto == 1) || (ip.v6 && ip.proto == 58);
    let ty = if icmp { f.get(ip.l4).copied() } else { None };
    let nd = ip.v6 && icmp && matches!(ty, Some(130..=137 | 143));
    if c.neighbour_rules && nd && f.len() - 14 > 1280 {
        return Some(format!(
            "hole 2: an ND/MLD message of {} bytes passed",
            f.len() - 14
        ));
    }
    // Hole 2 on an endpoint that enforces nothing too: a truncated one (the fuzz seed
    // 0x18c2fb390510d445, a cut router advertisement) is no exception.
    let claimed = be16(f, 18).map_or(0, |l| 14 + 40 + l as usize);
    if c.neighbour_rules && nd && claimed > f.len() {
        return Some(format!(
            "hole 2: a truncated ND/MLD message passed ({} of {claimed} bytes)",
            f.len()
        ));
    }
    match dir {
        Direction::Egress => {
            if c.own_source && !own(ep, &ip) {
                let nd_source = ip.v6 && (link_local6(ip.src) || ip.src.iter().all(|b| *b == 0));
                if !(nd && nd_source) {
                    return Some("hole 5: a container sent a source that is not its own".into());
                }
            }
            if c.neighbour_rules && nd {
                let t = ty.unwrap_or(0);
                if t == 134 || t == 137 {
                    return Some(format!(
                        "hole 2: a container sent ND type {t} (RA/redirect)"
                    ));
                }
                if (133..=137).contains(&t) && ip.hop != 255 {
                    return Some(format!("hole 2: ND type {t} with hop limit {}", ip.hop));
                }
                if matches!(t, 130..=132 | 143) && ip.hop != 1 {
                    return Some(format!("hole 2: MLD type {t} with hop limit {}", ip.hop));
                }
                let target = f.get(ip.l4 + 8..ip.l4 + 24);
                let mine = ep.flags & Endpoint::HAS_IPV6 != 0 && target == Some(&ep.ipv6[..]);
                if t == 136 && !mine && !target.is_some_and(link_local6) {
                    return Some("hole 2: a container advertised another address (NA)".into());
                }
            }
        }
        Direction::Ingress => {
            let checked = match why {
                Some(Why::Unpoliced | Why::Fragment) => c.container_source_before_policy,
                Some(Why::Related) => c.container_source_related,
                Some(Why::Conntrack) => c.container_source_conntrack,
                // The check comes before ND/MLD is looked at, too.
                Some(Why::Neighbour) => c.container_source_before_policy,
                _ => true,
            };
            if c.container_source && checked {
                let info = if ip.v6 {
                    world
                        .ipcache6
                        .iter()
                        .find(|(l, a, _)| *l == 128 && a[..] == *ip.src)
                        .map(|e| e.2)
                } else {
                    world
                        .ipcache4
                        .iter()
                        .find(|(l, a, _)| *l == 32 && a[..] == *ip.src)
                        .map(|e| e.2)
                };
                let host = info.is_some_and(|i| i.identity == identity::HOST);
                if host && c.host_source && ![0, ifindex].contains(&ingress_ifindex) {
                    return Some(format!(
                        "host source: a host address came in on ifindex {ingress_ifindex}"
                    ));
                }
                if let Some(i) = info {
                    if i.ifindex != 0
                        && ingress_ifindex != i.ifindex
                        && ingress_ifindex != i.bridge_ifindex
                    {
                        return Some(format!(
                            "hole 4: a container's address came in on ifindex {ingress_ifindex}, \
                             not its veth {} or bridge {}",
                            i.ifindex, i.bridge_ifindex
                        ));
                    }
                }
            }
            if c.own_destination && !own_dst(ep, &ip) {
                let group = if ip.v6 {
                    ip.dst[0] == 0xff || link_local6(ip.dst)
                } else {
                    ip.dst[0] & 0xf0 == 0xe0 || ip.dst.iter().all(|b| *b == 0xff)
                };
                if !group {
                    return Some("hole 5: unicast for another address reached a container".into());
                }
            }
            if c.neighbour_rules && nd {
                let t = ty.unwrap_or(0);
                if (133..=137).contains(&t) && ip.hop != 255 {
                    return Some(format!(
                        "hole 2: ND type {t} with hop limit {} delivered",
                        ip.hop
                    ));
                }
                if matches!(t, 130..=132 | 143) && ip.hop != 1 {
                    return Some(format!(
                        "hole 2: MLD type {t} with hop limit {} delivered",
                        ip.hop
                    ));
                }
            }
        }
    }
    if c.group_destination
        && dir == Direction::Egress
        && ep.enforces(dir)
        && why == Some(Why::Allowed)
    {
        if let Some(v) = group_destination(world, ep, &ip, f) {
            return Some(v);
        }
    }
    if c.conntrack_direction && why == Some(Why::Conntrack) {
        if let Some(v) = conntrack_direction(world, dir, &ip, f) {
            return Some(v);
        }
    }
    let icmp_proto = (!ip.v6 && ip.proto == 1) || (ip.v6 && ip.proto == 58);
    // Audit mode passes what policy would drop, by the operator's choice: that is policy's
    // decision, not a hole.
    if c.icmp_error_to_peer
        && icmp_proto
        && ep.enforces(dir)
        && why != Some(Why::Audited)
        && !policy_allows(world, ep, dir, &ip, ty)
    {
        if let Some(v) = icmp_related(dir, &ip, f) {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::*;

    const C: [u8; 4] = [10, 0, 0, 2];
    const PEER: [u8; 4] = [192, 0, 2, 10];
    const THIRD: [u8; 4] = [198, 51, 100, 7];

    fn error_from_container(to: [u8; 4], ty: u8, extra: usize) -> Vec<u8> {
        let quoted = Ipv4::new(PEER, C, 17).build(&udp(53, 40000, b""));
        let mut body = quoted;
        body.extend(vec![0; extra]);
        ipv4(C, to, 1, &icmp(ty, 3, [0; 4], &body))
    }

    fn check(f: &[u8], dir: Direction) -> Option<String> {
        icmp_related(dir, &ip(f).unwrap(), f)
    }

    #[test]
    fn icmp_errors_go_back_to_the_quoted_sender_and_are_capped() {
        assert_eq!(
            check(&error_from_container(PEER, 3, 0), Direction::Egress),
            None
        );
        assert!(check(&error_from_container(THIRD, 3, 0), Direction::Egress).is_some());
        assert!(check(&error_from_container(PEER, 3, 600), Direction::Egress).is_some());
        assert!(check(&error_from_container(PEER, 4, 0), Direction::Egress).is_some());
        // Inbound: a port unreachable about the container's packet to PEER, from PEER or not.
        let quoted = Ipv4::new(C, PEER, 17).build(&udp(40000, 53, b""));
        let from = |s| ipv4(s, C, 1, &icmp(3, 3, [0; 4], &quoted));
        assert_eq!(check(&from(PEER), Direction::Ingress), None);
        assert!(check(&from(THIRD), Direction::Ingress).is_some());
    }
}
