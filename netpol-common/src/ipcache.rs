//! `IPCACHE4` / `IPCACHE6`: LPM tries from an address or prefix to a security identity.
//!
//! Keys are the LPM key of aya (`prefix_len: u32` then the address bytes in network order). The
//! agent fills them with every container address (/32, /128), the host's own addresses and Docker
//! gateways (`host`), the subnets of managed networks (`unmanaged`, so a container that is not
//! identified yet is never taken for `world`) and the CIDRs of policy rules (their own identities).
//! A miss is `world`.
//!
//! A container's own address also names the interfaces its packets arrive through: its host veth
//! (`ifindex`: bridged from it, `skb->ingress_ifindex` is the veth) and the bridge the veth is a
//! port of (`bridge_ifindex`: packets it sends through the host, e.g. to another network or via a
//! published port, enter the host's stack on that bridge). `to_container` drops a packet whose
//! source is such an address and whose ingress interface is neither ([`RemoteInfo::spoofed`]):
//! the address is forged (sent from the link, the uplink, another network or a container that is
//! not attached yet). Entries that are not a container's own address carry 0 (no check).

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RemoteInfo {
    pub identity: u32,
    /// The container's host veth; 0 for anything that is not a container's own address.
    pub ifindex: u32,
    /// The bridge that veth is attached to (the veth itself when it has none).
    pub bridge_ifindex: u32,
    pub _pad: u32,
}

/// What an ipcache lookup gives: the entry found, or on a miss `world`. The datapath and
/// `policy trace` both resolve addresses with this.
#[inline(always)]
pub const fn resolve(hit: Option<RemoteInfo>) -> RemoteInfo {
    match hit {
        Some(v) => v,
        None => RemoteInfo::new(crate::identity::WORLD),
    }
}

impl RemoteInfo {
    /// An entry that is not a container's own address: no interface check.
    pub const fn new(identity: u32) -> Self {
        Self {
            identity,
            ifindex: 0,
            bridge_ifindex: 0,
            _pad: 0,
        }
    }

    /// A container's address, reached through host veth `ifindex` on bridge `bridge_ifindex`
    /// (0: no bridge known; only the veth is accepted).
    pub const fn container(identity: u32, ifindex: u32, bridge_ifindex: u32) -> Self {
        Self {
            identity,
            ifindex,
            bridge_ifindex: if bridge_ifindex == 0 {
                ifindex
            } else {
                bridge_ifindex
            },
            _pad: 0,
        }
    }

    /// Whether a packet from this address that entered the host on `ingress_ifindex` forges it.
    #[inline(always)]
    pub const fn spoofed(&self, ingress_ifindex: u32) -> bool {
        self.ifindex != 0
            && ingress_ifindex != self.ifindex
            && ingress_ifindex != self.bridge_ifindex
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_address_must_come_from_its_veth_or_its_bridge() {
        let c = RemoteInfo::container(300, 11, 2);
        assert!(!c.spoofed(11));
        assert!(!c.spoofed(2));
        assert!(c.spoofed(3));
        assert!(
            c.spoofed(0),
            "the host's own stack does not send as a container"
        );
        let no_bridge = RemoteInfo::container(300, 11, 0);
        assert!(!no_bridge.spoofed(11));
        assert!(no_bridge.spoofed(0));
        assert!(
            !RemoteInfo::new(2).spoofed(7),
            "world, host, CIDRs: no check"
        );
    }
}
