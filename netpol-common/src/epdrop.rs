//! `EP_DROPS`: per-CPU drop counters by endpoint (host veth), reason and direction, for the
//! agent's metrics (`netpol_endpoint_drops_total`). Exact, unlike `EVENTS`, which is meant for
//! people and may be rate limited; the global `DROPS` array stays the total by reason.
//!
//! A key is created on an endpoint's first drop of a kind; the agent removes an endpoint's keys
//! when it removes the endpoint. A full map counts nothing new (the `DROPS` totals still do);
//! its size is [`PER_ENDPOINT`] keys per `ENDPOINTS` slot.

/// `max_entries` of `EP_DROPS` per entry of `ENDPOINTS`.
pub const PER_ENDPOINT: u32 = 8;

/// What `kind` counts.
pub const KIND_DROP: u8 = 1;
/// A flow that audit mode let through, by the reason a drop would have had.
pub const KIND_AUDIT: u8 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EpDropKey {
    /// The endpoint's host veth.
    pub ifindex: u32,
    /// [`crate::DropReason`].
    pub reason: u8,
    /// [`crate::Direction`] of the endpoint.
    pub direction: u8,
    /// [`KIND_DROP`] or [`KIND_AUDIT`] (audit mode's would-be drops).
    pub kind: u8,
    pub _pad: u8,
}

impl EpDropKey {
    #[inline(always)]
    pub const fn new(ifindex: u32, reason: u8, direction: u8, kind: u8) -> Self {
        Self {
            ifindex,
            reason,
            direction,
            kind,
            _pad: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_has_no_implicit_padding() {
        assert_eq!(size_of::<EpDropKey>(), 8);
    }
}
