//! Address classes the datapath's anti-spoofing and addressing rules use (plain functions, so the
//! kernel and a reference model of the verdict share them).
//!
//! Only prefixes and constant patterns are tested here: whether an address *is* the endpoint's
//! own is a word compare in the programs (`lxc.rs`), passed in where a rule needs it.

/// IPv4 multicast (224.0.0.0/4) or the limited broadcast 255.255.255.255: `to_container` lets
/// these go on to policy; any other IPv4 destination must be the endpoint's own address.
/// A subnet-directed broadcast (e.g. 10.0.0.255 on 10.0.0.0/24) is unicast here: the endpoint
/// does not know its prefix length, and Docker containers do not use it, so it is dropped
/// (`NotForEndpoint`).
#[inline(always)]
pub const fn v4_group(a: &[u8; 4]) -> bool {
    a[0] & 0xf0 == 0xe0 || (a[0] & a[1] & a[2] & a[3]) == 0xff
}

/// fe80::/10.
#[inline(always)]
pub const fn v6_link_local(a: &[u8; 16]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

/// ff00::/8.
#[inline(always)]
pub const fn v6_multicast(a: &[u8; 16]) -> bool {
    a[0] == 0xff
}

/// ff02::/16: link-scope multicast (all-nodes, all-routers, solicited-node, MLDv2 routers, …).
#[inline(always)]
pub const fn v6_link_multicast(a: &[u8; 16]) -> bool {
    a[0] == 0xff && a[1] == 0x02
}

/// ff02::1:ff00:0/104, a solicited-node multicast address.
#[inline(always)]
pub const fn v6_solicited_node(a: &[u8; 16]) -> bool {
    a[0] == 0xff
        && a[1] == 0x02
        && (a[2] | a[3] | a[4] | a[5] | a[6] | a[7] | a[8] | a[9] | a[10]) == 0
        && a[11] == 1
        && a[12] == 0xff
}

/// `::`.
#[inline(always)]
pub const fn v6_unspecified(a: &[u8; 16]) -> bool {
    (a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7])
        | (a[8] | a[9] | a[10] | a[11] | a[12] | a[13] | a[14] | a[15])
        == 0
}

/// `to_container`: an IPv6 destination that is not the endpoint's own address is accepted only
/// when it is multicast or link-local (the endpoint's link-local address is not known to the
/// datapath); anything else is dropped (`NotForEndpoint`).
#[inline(always)]
pub const fn v6_for_anyone(a: &[u8; 16]) -> bool {
    v6_multicast(a) || v6_link_local(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v6(s: &str) -> [u8; 16] {
        s.parse::<core::net::Ipv6Addr>().unwrap().octets()
    }

    #[test]
    fn classes() {
        assert!(v4_group(&[224, 0, 0, 251]));
        assert!(v4_group(&[239, 255, 255, 250]));
        assert!(v4_group(&[255, 255, 255, 255]));
        assert!(!v4_group(&[10, 0, 0, 255]));
        assert!(!v4_group(&[240, 0, 0, 1]));
        assert!(v6_link_local(&v6("fe80::1")));
        assert!(v6_link_local(&v6("febf::1")));
        assert!(!v6_link_local(&v6("fec0::1")));
        assert!(v6_multicast(&v6("ff0e::1")));
        assert!(v6_link_multicast(&v6("ff02::16")));
        assert!(!v6_link_multicast(&v6("ff05::2")));
        assert!(v6_solicited_node(&v6("ff02::1:ff00:3")));
        assert!(v6_solicited_node(&v6("ff02::1:ffab:cdef")));
        assert!(!v6_solicited_node(&v6("ff02::1")));
        assert!(!v6_solicited_node(&v6("ff02::2:ff00:3")));
        assert!(!v6_solicited_node(&v6("ff02:0:0:1::1:ff00:3")));
        assert!(v6_unspecified(&v6("::")));
        assert!(!v6_unspecified(&v6("::1")));
        assert!(!v6_unspecified(&v6("8000::")));
        assert!(v6_for_anyone(&v6("fe80::2")) && v6_for_anyone(&v6("ff02::1")));
        assert!(!v6_for_anyone(&v6("fd00::2")));
    }
}
