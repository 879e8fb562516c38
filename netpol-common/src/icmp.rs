//! ICMP and ICMPv6 errors: which messages are errors about a flow, and when one may be taken as
//! related to a flow of the endpoint (passing by conntrack, without a policy lookup). An error
//! that is not [`tied`] to its flow is an ordinary new ICMP message: policy decides it, with its
//! type as the port.
//!
//! The rules (shared by the per-container programs and the masquerade's translation of errors):
//! - Errors are ICMPv4 destination unreachable (3), time exceeded (11) and parameter problem
//!   (12), and ICMPv6 types 1–4. IPv4 source quench (4, deprecated by RFC 6633) and redirect (5)
//!   are not errors of a flow.
//! - Length: the packet after the Ethernet header (trailing bytes included) is at most 576
//!   bytes (IPv4; RFC 1812 4.3.2.3) or 1280 bytes (IPv6; RFC 4443 2.4), what Linux and routers
//!   send. A longer one would let a flow's peer carry any payload under cover of an error.
//! - The error is about a packet that travelled between the same two hosts, with the endpoint's
//!   address on the endpoint's side: from a container, the outer source (the container, checked
//!   by anti-spoofing) is the quoted destination and the outer destination is the quoted source
//!   (an error goes back to whoever sent the packet); to a container, the outer destination (its
//!   own address) is the quoted source.
//! - To a container, the outer source may be any address (a router on the path: unreachable,
//!   time exceeded, packet too big, parameter problem), except for the errors only the quoted
//!   packet's destination can send — IPv4 protocol (3/2) and port unreachable (3/3), ICMPv6
//!   port unreachable (1/4) — whose source must be the quoted destination. Linux conntrack and
//!   Cilium accept an error as RELATED from any source; this is stricter where the RFCs allow it
//!   (RFC 1122 3.2.2.1, RFC 4443 3.1), so a guessed tuple lets an off-path host inject only what
//!   a router could legitimately send.
//!
//! Whether the quoted packet belongs to a live flow of the endpoint is the caller's conntrack
//! lookup, after [`tied`].

/// Largest ICMPv4 error, bytes after the Ethernet header.
pub const MAX_LEN_V4: u32 = 576;
/// Largest ICMPv6 error, bytes after the Ethernet header.
pub const MAX_LEN_V6: u32 = 1280;

/// Whether an ICMPv4 type is an error about a flow.
#[inline(always)]
pub const fn v4_error(ty: u8) -> bool {
    matches!(ty, 3 | 11 | 12)
}

/// Whether an ICMPv6 type is an error about a flow.
#[inline(always)]
pub const fn v6_error(ty: u8) -> bool {
    matches!(ty, 1..=4)
}

/// Errors that only the quoted packet's destination sends.
#[inline(always)]
pub const fn from_destination_only(v6: bool, ty: u8, code: u8) -> bool {
    if v6 {
        ty == 1 && code == 4
    } else {
        ty == 3 && (code == 2 || code == 3)
    }
}

/// An ICMP error as the rules see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorMsg {
    /// The container (or, in the masquerade, the uplink address) sends it.
    pub outbound: bool,
    pub v6: bool,
    pub ty: u8,
    pub code: u8,
    /// Bytes after the Ethernet header.
    pub len: u32,
    /// The endpoint's address is on its side: the outer source of an outbound error, the outer
    /// destination of an inbound one.
    pub local: bool,
    /// Outer source == quoted destination.
    pub src_is_quoted_dst: bool,
    /// Outer destination == quoted source.
    pub dst_is_quoted_src: bool,
}

/// Whether an error may be related to the flow of its quoted packet (module documentation).
#[inline(always)]
pub const fn tied(e: &ErrorMsg) -> bool {
    let cap = if e.v6 { MAX_LEN_V6 } else { MAX_LEN_V4 };
    if e.len > cap || !e.local || !e.dst_is_quoted_src {
        return false;
    }
    if e.outbound || from_destination_only(e.v6, e.ty, e.code) {
        return e.src_is_quoted_dst;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(outbound: bool, v6: bool, ty: u8, code: u8) -> ErrorMsg {
        ErrorMsg {
            outbound,
            v6,
            ty,
            code,
            len: 100,
            local: true,
            src_is_quoted_dst: true,
            dst_is_quoted_src: true,
        }
    }

    #[test]
    fn error_types() {
        for t in [3, 11, 12] {
            assert!(v4_error(t));
        }
        for t in [0, 4, 5, 8, 9, 10, 13] {
            assert!(!v4_error(t), "{t}");
        }
        for t in 1..=4 {
            assert!(v6_error(t));
        }
        for t in [0, 5, 128, 129, 135] {
            assert!(!v6_error(t));
        }
    }

    #[test]
    fn an_error_goes_back_to_the_quoted_source_within_its_length() {
        for v6 in [false, true] {
            let (ty, code) = if v6 { (1, 4) } else { (3, 3) };
            for outbound in [false, true] {
                assert!(tied(&err(outbound, v6, ty, code)));
                let mut e = err(outbound, v6, ty, code);
                e.dst_is_quoted_src = false;
                assert!(!tied(&e), "to a third host");
                let mut e = err(outbound, v6, ty, code);
                e.local = false;
                assert!(!tied(&e), "not the endpoint's");
                let mut e = err(outbound, v6, ty, code);
                e.src_is_quoted_dst = false;
                assert!(!tied(&e), "port unreachable from a third host");
                let mut e = err(outbound, v6, ty, code);
                e.len = if v6 { 1280 } else { 576 };
                assert!(tied(&e));
                e.len += 1;
                assert!(!tied(&e), "too long");
            }
        }
    }

    #[test]
    fn routers_may_send_path_errors_to_a_container() {
        for (v6, ty, code) in [
            (false, 3, 1),
            (false, 3, 4),
            (false, 11, 0),
            (false, 12, 0),
            (true, 1, 3),
            (true, 2, 0),
            (true, 3, 0),
            (true, 4, 0),
        ] {
            let mut e = err(false, v6, ty, code);
            e.src_is_quoted_dst = false;
            assert!(tied(&e), "{e:?}");
            e.outbound = true;
            assert!(!tied(&e), "a container is not a router: {e:?}");
        }
    }
}
