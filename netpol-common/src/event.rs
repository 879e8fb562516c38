//! `EVENTS`: a ring buffer of drop and flow events, read by `netpol-agent monitor`.

/// One event. Addresses are network order; IPv4 addresses use the first 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `FlowEvent::KIND_*`.
    pub kind: u8,
    /// [`crate::DropReason`] for drops, and for audits the reason a drop would have had; 0
    /// otherwise.
    pub reason: u8,
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    /// [`crate::Direction`] as seen by the endpoint on `ifindex`.
    pub direction: u8,
    pub _pad: [u8; 3],
    /// The host veth the packet crossed.
    pub ifindex: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// The rule that decided, 0 for none: a drop or audit of `PolicyDeny` names its deny rule,
    /// one of `PolicyDenied` has 0 (the default deny of the local identity's direction: the
    /// agent knows which policies put it there); a flow names the allow rule.
    pub rule: u32,
    /// Host order. ICMP: sport = identifier (echo) and dport = type.
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

impl FlowEvent {
    pub const KIND_DROP: u8 = 1;
    /// A new flow allowed by policy (only with `Config::TRACE_FLOWS`).
    pub const KIND_FLOW: u8 = 2;
    /// A new flow that policy would have dropped (`reason`, `rule` as a drop), let through
    /// because the endpoint's direction is in audit mode (`Endpoint::AUDIT_*`). Always emitted
    /// (rate limited like drops), and counted in `AUDITS`.
    pub const KIND_AUDIT: u8 = 3;
}
