//! IPv6 neighbour discovery (RFC 4861) and MLD (RFC 2710, RFC 3810) on a container's veth:
//! the messages the datapath lets pass without policy. Everything else with these ICMPv6 types
//! is dropped as `DropReason::NeighbourDiscovery`, on enforced and unenforced endpoints alike
//! (it is anti-spoofing, not policy), and never goes on to a policy lookup. That includes a
//! message that fails to parse (truncated, its ICMPv6 header cut short: `lxc.rs` step 3), which
//! another packet's parse error would let pass on an unenforced endpoint.
//!
//! The programs classify the addresses ([`classify`]) and call [`allowed`]; a reference model of
//! the verdict can do the same. The rules, in the order [`allowed`] checks them:
//! 1. The whole packet after the Ethernet header (IPv6 header, extension headers, message and
//!    any trailing bytes) is at most [`MAX_LEN`] = 1280 bytes (the IPv6 minimum MTU: what
//!    RFC 4861 sizes redirects to; NS/NA/RS are under 100 bytes in practice), the ICMPv6
//!    code is 0, and the message (within the IPv6 payload length) holds at least its type's
//!    fixed fields ([`complete`]: a shorter one is truncated).
//! 2. ND (133–137): hop limit 255 (RFC 4861: a routed packet has a lower one). MLD (130–132,
//!    143): hop limit 1.
//! 3. Source. The unspecified address `::` only for a neighbour solicitation to a solicited-node
//!    address (duplicate address detection, RFC 4861 7.1.1), a router solicitation (6.1.1), and
//!    MLD reports and done messages (RFC 3810 5.2.13; Linux sends them before its link-local
//!    address is valid). Otherwise MLD needs a link-local source. ND from a container: its own
//!    address or link-local (`lxc.rs` rejects any other source as `Spoofed` before this);
//!    ND to a container: any unicast source (another container's veth and the host checked it),
//!    but router advertisements and redirects only from link-local (RFC 4861 6.1.2, 8.1).
//! 4. Type: no router advertisement (134) and no redirect (137) from a container. A neighbour
//!    advertisement from a container must name its own or a link-local address as target (no
//!    advertising another container's address).
//! 5. Destination. ND: link-scope multicast (ff02::/16, solicited-node included), link-local,
//!    and from a container a unicast address on this host (the ipcache says `host`,
//!    `unmanaged` or a container identity; `world` or a CIDR would leave the host: neighbour
//!    unreachability probes and solicited advertisements are unicast to neighbours, which are
//!    all on the bridge), to a container its own address. MLD: multicast (an MLDv1 report goes
//!    to the group itself, of any scope; hop limit 1 keeps it on the link), and to a container
//!    also its own or a link-local address (unicast queries).

/// Largest ND/MLD packet after the Ethernet header, extension headers included.
pub const MAX_LEN: u32 = 1280;

/// ICMPv6 types.
pub mod ty {
    pub const MLD_QUERY: u8 = 130;
    pub const MLD_REPORT: u8 = 131;
    pub const MLD_DONE: u8 = 132;
    pub const ROUTER_SOLICITATION: u8 = 133;
    pub const ROUTER_ADVERTISEMENT: u8 = 134;
    pub const NEIGHBOUR_SOLICITATION: u8 = 135;
    pub const NEIGHBOUR_ADVERTISEMENT: u8 = 136;
    pub const REDIRECT: u8 = 137;
    pub const MLD2_REPORT: u8 = 143;
}

/// The shortest message of ICMPv6 type `t`: its fixed fields, before any option or record
/// (RFC 4861 4.1–4.5: RS 8, RA 16, NS and NA 24 with the target, redirect 40 with both
/// addresses; RFC 2710 3 and RFC 3810 5.1: MLD query, report and done 24 with the multicast
/// address; RFC 3810 5.2: an MLDv2 report 8).
#[inline(always)]
pub const fn min_len(t: u8) -> u32 {
    match t {
        ty::ROUTER_ADVERTISEMENT => 16,
        ty::NEIGHBOUR_SOLICITATION
        | ty::NEIGHBOUR_ADVERTISEMENT
        | ty::MLD_QUERY
        | ty::MLD_REPORT
        | ty::MLD_DONE => 24,
        ty::REDIRECT => 40,
        _ => 8,
    }
}

/// Whether an ICMPv6 message of type `t` and `icmp_len` bytes (within the IPv6 payload length)
/// holds its type's fixed fields ([`min_len`]): rule 1's last part, which callers check before
/// [`allowed`] (a wider [`Msg`] would not fit the programs' stack).
#[inline(always)]
pub const fn complete(t: u8, icmp_len: u32) -> bool {
    icmp_len >= min_len(t)
}

/// Whether an ICMPv6 type is neighbour/router discovery or MLD (these rules apply to it).
#[inline(always)]
pub const fn is_nd_or_mld(t: u8) -> bool {
    matches!(t, 130..=137 | 143)
}

/// Facts about an address, as a bit set ([`classify`]).
pub mod class {
    /// The endpoint's own IPv6 address.
    pub const OWN: u8 = 1;
    /// fe80::/10.
    pub const LINK_LOCAL: u8 = 2;
    /// `::`.
    pub const UNSPECIFIED: u8 = 4;
    /// ff00::/8.
    pub const MULTICAST: u8 = 8;
    /// ff02::/16.
    pub const LINK_MULTICAST: u8 = 16;
    /// ff02::1:ff00:0/104.
    pub const SOLICITED_NODE: u8 = 32;
    /// Its ipcache identity is on this host ([`crate::identity::on_host`]).
    pub const ON_HOST: u8 = 64;
}

/// The class bits of `a`; `own` and `on_host` come from the caller (a word compare with the
/// endpoint's address and an ipcache lookup). `on_host` is only read for a container's ND to a
/// unicast, non-link-local destination: a caller may skip the lookup elsewhere.
#[inline(always)]
pub const fn classify(a: &[u8; 16], own: bool, on_host: bool) -> u8 {
    use crate::addr::*;
    let mut c = 0;
    if own {
        c |= class::OWN;
    }
    if v6_link_local(a) {
        c |= class::LINK_LOCAL;
    }
    if v6_unspecified(a) {
        c |= class::UNSPECIFIED;
    }
    if v6_multicast(a) {
        c |= class::MULTICAST;
    }
    if v6_link_multicast(a) {
        c |= class::LINK_MULTICAST;
    }
    if v6_solicited_node(a) {
        c |= class::SOLICITED_NODE;
    }
    if on_host {
        c |= class::ON_HOST;
    }
    c
}

/// An ND or MLD message as the rules see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msg {
    /// `from_container` (the container sends it).
    pub from_container: bool,
    pub ty: u8,
    pub code: u8,
    pub hop_limit: u8,
    /// Bytes after the Ethernet header.
    pub len: u32,
    /// [`class`] bits of the source, destination, and (neighbour advertisements from a
    /// container only; 0 otherwise) the target address.
    pub src: u8,
    pub dst: u8,
    pub target: u8,
}

/// Whether the message passes (see the module documentation for the rules).
#[inline(always)]
pub const fn allowed(m: &Msg) -> bool {
    use class::*;
    if m.len > MAX_LEN || m.code != 0 {
        return false;
    }
    let mld = matches!(
        m.ty,
        ty::MLD_QUERY | ty::MLD_REPORT | ty::MLD_DONE | ty::MLD2_REPORT
    );
    let unspec = m.src & UNSPECIFIED != 0;
    if mld {
        if m.hop_limit != 1 {
            return false;
        }
        let src_ok = m.src & LINK_LOCAL != 0 || (unspec && m.ty != ty::MLD_QUERY);
        let dst_ok =
            m.dst & MULTICAST != 0 || (!m.from_container && m.dst & (OWN | LINK_LOCAL) != 0);
        return src_ok && dst_ok;
    }
    if m.hop_limit != 255 {
        return false;
    }
    let router_msg = m.ty == ty::ROUTER_ADVERTISEMENT || m.ty == ty::REDIRECT;
    let src_ok = if unspec {
        (m.ty == ty::NEIGHBOUR_SOLICITATION && m.dst & SOLICITED_NODE != 0)
            || m.ty == ty::ROUTER_SOLICITATION
    } else if m.from_container {
        m.src & (OWN | LINK_LOCAL) != 0
    } else if router_msg {
        m.src & LINK_LOCAL != 0
    } else {
        m.src & MULTICAST == 0
    };
    if !src_ok {
        return false;
    }
    if m.from_container {
        if router_msg {
            return false;
        }
        if m.ty == ty::NEIGHBOUR_ADVERTISEMENT && m.target & (OWN | LINK_LOCAL) == 0 {
            return false;
        }
    }
    let unicast_ok = if m.from_container {
        m.dst & MULTICAST == 0 && m.dst & ON_HOST != 0
    } else {
        m.dst & OWN != 0
    };
    m.dst & (LINK_MULTICAST | LINK_LOCAL) != 0 || unicast_ok
}

#[cfg(test)]
mod tests {
    use super::{class::*, ty::*, *};

    fn msg(from_container: bool, t: u8, hop_limit: u8, src: u8, dst: u8) -> Msg {
        Msg {
            from_container,
            ty: t,
            code: 0,
            hop_limit,
            len: 86,
            src,
            dst,
            target: OWN,
        }
    }

    const SOLICITED: u8 = MULTICAST | LINK_MULTICAST | SOLICITED_NODE;
    const ALL_NODES: u8 = MULTICAST | LINK_MULTICAST;

    #[test]
    fn what_networks_need_passes() {
        for from in [true, false] {
            let own_or_peer = if from { OWN } else { ON_HOST };
            let to_unicast = if from { ON_HOST } else { OWN };
            for m in [
                msg(from, NEIGHBOUR_SOLICITATION, 255, LINK_LOCAL, SOLICITED),
                msg(from, NEIGHBOUR_SOLICITATION, 255, own_or_peer, SOLICITED),
                msg(from, NEIGHBOUR_SOLICITATION, 255, UNSPECIFIED, SOLICITED),
                msg(from, NEIGHBOUR_SOLICITATION, 255, own_or_peer, to_unicast),
                msg(from, NEIGHBOUR_ADVERTISEMENT, 255, own_or_peer, to_unicast),
                msg(from, NEIGHBOUR_ADVERTISEMENT, 255, LINK_LOCAL, ALL_NODES),
                msg(from, NEIGHBOUR_ADVERTISEMENT, 255, LINK_LOCAL, LINK_LOCAL),
                msg(from, ROUTER_SOLICITATION, 255, UNSPECIFIED, ALL_NODES),
                msg(from, MLD2_REPORT, 1, LINK_LOCAL, ALL_NODES),
                msg(from, MLD2_REPORT, 1, UNSPECIFIED, ALL_NODES),
                msg(from, MLD_REPORT, 1, LINK_LOCAL, MULTICAST),
                msg(from, MLD_QUERY, 1, LINK_LOCAL, ALL_NODES),
            ] {
                assert!(allowed(&m), "{m:?}");
            }
        }
        // Router messages to a container from a link-local router.
        assert!(allowed(&msg(
            false,
            ROUTER_ADVERTISEMENT,
            255,
            LINK_LOCAL,
            ALL_NODES
        )));
        assert!(allowed(&msg(false, REDIRECT, 255, LINK_LOCAL, OWN)));
    }

    #[test]
    fn the_rest_is_refused() {
        for from in [true, false] {
            for m in [
                // Routed (hop limit decremented) or not link-scoped.
                msg(from, NEIGHBOUR_SOLICITATION, 254, LINK_LOCAL, SOLICITED),
                msg(from, MLD2_REPORT, 2, LINK_LOCAL, ALL_NODES),
                // `::` where the RFCs do not allow it.
                msg(from, NEIGHBOUR_SOLICITATION, 255, UNSPECIFIED, ALL_NODES),
                msg(from, NEIGHBOUR_ADVERTISEMENT, 255, UNSPECIFIED, ALL_NODES),
                msg(from, MLD_QUERY, 1, UNSPECIFIED, ALL_NODES),
                // MLD from a global address.
                msg(from, MLD2_REPORT, 1, OWN | ON_HOST, ALL_NODES),
                // Off the link: global multicast for ND, unicast MLD from a container.
                msg(from, NEIGHBOUR_SOLICITATION, 255, LINK_LOCAL, MULTICAST),
                // A unicast destination that is neither ours nor on this host.
                msg(from, NEIGHBOUR_SOLICITATION, 255, LINK_LOCAL, 0),
                msg(from, NEIGHBOUR_ADVERTISEMENT, 255, LINK_LOCAL, 0),
            ] {
                assert!(!allowed(&m), "{m:?}");
            }
            // Too big, or a non-zero code.
            let mut m = msg(from, NEIGHBOUR_SOLICITATION, 255, LINK_LOCAL, SOLICITED);
            m.len = MAX_LEN + 1;
            assert!(!allowed(&m));
            m.len = MAX_LEN;
            assert!(allowed(&m));
            m.code = 1;
            assert!(!allowed(&m));
            // Shorter than its type's fixed fields: truncated.
            for t in [
                ROUTER_SOLICITATION,
                NEIGHBOUR_SOLICITATION,
                NEIGHBOUR_ADVERTISEMENT,
                MLD_REPORT,
                MLD2_REPORT,
            ] {
                let hop = if t == MLD_REPORT || t == MLD2_REPORT {
                    1
                } else {
                    255
                };
                assert!(allowed(&msg(from, t, hop, LINK_LOCAL, ALL_NODES)));
                assert!(complete(t, min_len(t)) && !complete(t, min_len(t) - 1));
            }
        }
        assert!(complete(REDIRECT, 40) && !complete(REDIRECT, 39));
        assert!(complete(ROUTER_ADVERTISEMENT, 16) && !complete(ROUTER_ADVERTISEMENT, 15));
        assert!(complete(MLD_QUERY, 24) && !complete(MLD_QUERY, 23));
        // From a container: no router messages, no other source, no foreign target, no unicast
        // MLD.
        for t in [ROUTER_ADVERTISEMENT, REDIRECT] {
            assert!(!allowed(&msg(true, t, 255, LINK_LOCAL, ALL_NODES)));
        }
        assert!(!allowed(&msg(
            true,
            NEIGHBOUR_ADVERTISEMENT,
            255,
            ON_HOST,
            ALL_NODES
        )));
        let mut na = msg(true, NEIGHBOUR_ADVERTISEMENT, 255, OWN, ALL_NODES);
        na.target = ON_HOST;
        assert!(!allowed(&na), "advertising another container's address");
        na.target = LINK_LOCAL;
        assert!(allowed(&na));
        assert!(!allowed(&msg(true, MLD_REPORT, 1, LINK_LOCAL, ON_HOST)));
        // To a container: router messages only from link-local, nothing from multicast, and
        // unicast only to its own address.
        assert!(!allowed(&msg(
            false,
            ROUTER_ADVERTISEMENT,
            255,
            ON_HOST,
            ALL_NODES
        )));
        assert!(!allowed(&msg(
            false,
            NEIGHBOUR_ADVERTISEMENT,
            255,
            MULTICAST,
            OWN
        )));
        assert!(!allowed(&msg(
            false,
            NEIGHBOUR_SOLICITATION,
            255,
            ON_HOST,
            ON_HOST
        )));
    }

    #[test]
    fn classify_sets_every_fact() {
        let solicited = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 3];
        assert_eq!(classify(&solicited, false, false), SOLICITED);
        assert_eq!(classify(&[0; 16], false, false), UNSPECIFIED);
        let mut ll = [0; 16];
        ll[0] = 0xfe;
        ll[1] = 0x80;
        assert_eq!(classify(&ll, false, false), LINK_LOCAL);
        assert_eq!(classify(&[0xfd; 16], true, true), OWN | ON_HOST);
    }
}
