//! `FRAG4` / `FRAG6`: what the first fragment of a fragmented datagram said about its L4 header,
//! so the fragments after it, which carry no L4 header, can be decided as packets of the same
//! flow (Cilium's `IPV4_FRAG_DATAGRAMS` / `cilium_ipv6_frag_datagrams`). LRU hashes, keyed by
//! what identifies a datagram in reassembly (RFC 791, RFC 8200): source, destination, IP
//! identification (IPv4: 16 bits; IPv6: the fragment header's 32 bits) and protocol (IPv6: the
//! fragment header's next header).
//!
//! The per-container programs apply these rules (documented for the reference model too):
//! - A **first fragment** (offset 0, more-fragments set) is parsed and decided like an
//!   unfragmented packet. When it passes — allowed by policy, part of an established flow, or on
//!   a direction that is not enforced — its L4 view ([`FragL4`]) is recorded under its key,
//!   replacing any older record. A first fragment that is dropped records nothing. ICMP errors and
//!   neighbour discovery / MLD are never recorded (their fragments are not legitimate).
//! - A **later fragment** (offset ≠ 0) with a record is decided as a packet of that flow with the
//!   recorded ports (or ICMP type and identifier) and no TCP flags: conntrack, then policy, as for
//!   any packet. Without a record it is dropped (`DropReason::Fragment`) on an enforced
//!   direction and passes on one that is not. A later fragment that arrives before its first
//!   fragment (out of order) therefore is dropped on an enforced direction: fail closed, as in
//!   Cilium; the sender's retransmission (TCP) or the application (UDP) recovers.
//! - Records are shared by all endpoints (the same datagram leaves one container and enters
//!   another); they only supply ports, never a verdict. They are not removed when the datagram
//!   is complete: the LRU evicts them, and the next first fragment with the same key replaces
//!   them.
//!
//! The masquerade keeps its own records (`MASQ6_FRAG`, [`Masq6Frag`]): the address written into
//! the first fragment of a translated datagram, written into the later ones too.

/// Key of `FRAG4`.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Frag4Key {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// Network order.
    id: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}

impl Frag4Key {
    #[inline(always)]
    pub const fn new(saddr: [u8; 4], daddr: [u8; 4], id: u16, proto: u8) -> Self {
        Self {
            saddr,
            daddr,
            id: id.to_be_bytes(),
            proto,
            _pad: 0,
        }
    }

    pub const fn id(&self) -> u16 {
        u16::from_be_bytes(self.id)
    }
}

/// Key of `FRAG6` and `MASQ6_FRAG`.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Frag6Key {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Network order.
    id: [u8; 4],
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl Frag6Key {
    #[inline(always)]
    pub const fn new(saddr: [u8; 16], daddr: [u8; 16], id: u32, proto: u8) -> Self {
        Self {
            saddr,
            daddr,
            id: id.to_be_bytes(),
            proto,
            _pad: [0; 3],
        }
    }

    pub const fn id(&self) -> u32 {
        u32::from_be_bytes(self.id)
    }
}

/// Value of `FRAG4` / `FRAG6`: the L4 view of the datagram's first fragment, as conntrack and
/// policy see it (echo: the identifier is the source port of a request, the destination port of
/// a reply).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragL4 {
    /// Network order.
    sport: [u8; 2],
    dport: [u8; 2],
    /// One of `FragL4::PORTS`, …
    pub kind: u8,
    /// The ICMP type (the policy "port" of ICMP), 0 for other protocols.
    pub icmp_type: u8,
    pub _pad: [u8; 2],
}

impl FragL4 {
    /// TCP, UDP, SCTP.
    pub const PORTS: u8 = 1;
    pub const ECHO_REQUEST: u8 = 2;
    pub const ECHO_REPLY: u8 = 3;
    /// An ICMP message that is neither echo nor an error.
    pub const ICMP_OTHER: u8 = 4;
    /// Another protocol (no ports).
    pub const OTHER: u8 = 5;

    #[inline(always)]
    pub const fn new(kind: u8, sport: u16, dport: u16, icmp_type: u8) -> Self {
        Self {
            sport: sport.to_be_bytes(),
            dport: dport.to_be_bytes(),
            kind,
            icmp_type,
            _pad: [0; 2],
        }
    }

    #[inline(always)]
    pub const fn sport(&self) -> u16 {
        u16::from_be_bytes(self.sport)
    }

    #[inline(always)]
    pub const fn dport(&self) -> u16 {
        u16::from_be_bytes(self.dport)
    }
}

/// Value of `MASQ6_FRAG`: the address the masquerade wrote into the first fragment of a
/// datagram, to be written into its later fragments (source on the way out, destination on the
/// way in; only the address: the port and the L4 checksum are in the first fragment alone).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Masq6Frag {
    pub addr: [u8; 16],
    /// `nat::SNAT6_OUT` (write `addr` as source) or `nat::SNAT6_IN` (as destination).
    pub dir: u8,
    pub _pad: [u8; 3],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Frag4Key>(), 4 + 4 + 2 + 1 + 1);
        assert_eq!(size_of::<Frag6Key>(), 16 + 16 + 4 + 1 + 3);
        assert_eq!(size_of::<FragL4>(), 8);
        assert_eq!(size_of::<Masq6Frag>(), 20);
    }

    #[test]
    fn fields_are_network_order() {
        let k = Frag6Key::new([1; 16], [2; 16], 0xdead_beef, 17);
        assert_eq!(k.id(), 0xdead_beef);
        assert_eq!(k.id, [0xde, 0xad, 0xbe, 0xef]);
        let k = Frag4Key::new([1; 4], [2; 4], 0x1234, 17);
        assert_eq!((k.id(), k.id), (0x1234, [0x12, 0x34]));
        let v = FragL4::new(FragL4::PORTS, 5000, 53, 0);
        assert_eq!((v.sport(), v.dport(), v.sport), (5000, 53, [0x13, 0x88]));
    }
}
