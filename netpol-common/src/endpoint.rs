//! `ENDPOINTS`: host-side veth ifindex → the container behind it.

/// Value of `ENDPOINTS`, keyed by the host veth's ifindex (`u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub identity: u32,
    /// Bit set of `Endpoint::*` flags.
    pub flags: u32,
    /// The container's IPv4 address on this network, network order (valid with `HAS_IPV4`).
    pub ipv4: [u8; 4],
    /// The container's IPv6 address on this network (valid with `HAS_IPV6`).
    pub ipv6: [u8; 16],
}

impl Endpoint {
    /// Packets delivered to the container are checked against policy.
    pub const ENFORCE_INGRESS: u32 = 1 << 0;
    /// Packets sent by the container are checked against policy.
    pub const ENFORCE_EGRESS: u32 = 1 << 1;
    pub const HAS_IPV4: u32 = 1 << 2;
    pub const HAS_IPV6: u32 = 1 << 3;
    /// Audit mode for the container's ingress / egress: a new flow that policy would drop
    /// (`PolicyDenied`, `PolicyDeny`) passes, is tracked, reported (`FlowEvent::KIND_AUDIT`) and
    /// counted (`AUDITS`). Only those two reasons: anti-spoofing, malformed packets, ND,
    /// fragments, VLAN tags and packets for another address are dropped as always. Meaningless
    /// without the matching `ENFORCE_*` bit.
    pub const AUDIT_INGRESS: u32 = 1 << 4;
    pub const AUDIT_EGRESS: u32 = 1 << 5;

    pub const fn new(identity: u32) -> Self {
        Self {
            identity,
            flags: 0,
            ipv4: [0; 4],
            ipv6: [0; 16],
        }
    }

    pub const fn with_ipv4(mut self, addr: [u8; 4]) -> Self {
        self.ipv4 = addr;
        self.flags |= Self::HAS_IPV4;
        self
    }

    pub const fn with_ipv6(mut self, addr: [u8; 16]) -> Self {
        self.ipv6 = addr;
        self.flags |= Self::HAS_IPV6;
        self
    }

    pub const fn enforce(mut self, ingress: bool, egress: bool) -> Self {
        self.flags &= !(Self::ENFORCE_INGRESS | Self::ENFORCE_EGRESS);
        if ingress {
            self.flags |= Self::ENFORCE_INGRESS;
        }
        if egress {
            self.flags |= Self::ENFORCE_EGRESS;
        }
        self
    }

    #[inline(always)]
    pub const fn enforces(&self, dir: crate::Direction) -> bool {
        let bit = match dir {
            crate::Direction::Ingress => Self::ENFORCE_INGRESS,
            crate::Direction::Egress => Self::ENFORCE_EGRESS,
        };
        self.flags & bit != 0
    }

    pub const fn audit(mut self, ingress: bool, egress: bool) -> Self {
        self.flags &= !(Self::AUDIT_INGRESS | Self::AUDIT_EGRESS);
        if ingress {
            self.flags |= Self::AUDIT_INGRESS;
        }
        if egress {
            self.flags |= Self::AUDIT_EGRESS;
        }
        self
    }

    /// Whether policy drops in `dir` are only reported (audit mode).
    #[inline(always)]
    pub const fn audits(&self, dir: crate::Direction) -> bool {
        let bit = match dir {
            crate::Direction::Ingress => Self::AUDIT_INGRESS,
            crate::Direction::Egress => Self::AUDIT_EGRESS,
        };
        self.flags & bit != 0
    }

    #[inline(always)]
    pub const fn enforces_any(&self) -> bool {
        self.flags & (Self::ENFORCE_INGRESS | Self::ENFORCE_EGRESS) != 0
    }
}
