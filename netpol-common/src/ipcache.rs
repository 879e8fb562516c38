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
//! not attached yet).
//!
//! The host's own addresses (the host's interfaces and the Docker gateways, [`RemoteInfo::host`])
//! are checked too: the host's stack sends them (`ingress_ifindex` 0: never received), and the
//! host's masquerade of a container's own connection to a published port (Docker's hairpin NAT
//! with the userland proxy off) brings the gateway's address back to that container through its
//! own veth (`br_netfilter` bridges it back: measured on Docker 20.10 and 28, IPv4 and IPv6).
//! From anywhere else (the uplink, a bridge, another container's veth) it is forged: IPv6 has no
//! martian-source check, so without this any on-link neighbour could be `host`. Other entries
//! (`world`, `unmanaged`, CIDR identities) carry 0 and 0 (no check).
//!
//! `IPCACHE_GEN`: the ipcache's generation, a number the agent moves on around every write to
//! either trie: to an odd one before the write ([`write_begins`]), to the next even one after
//! it ([`write_ends`]), and to a new even one when it opens the datapath (an older agent that
//! ran in between wrote the tries without moving it; or an agent died in the middle of a
//! write). In an odd generation no recorded remote is current (`CtEntry::gen_current`): an
//! agent killed between its trie write and the end of it, or whose end failed, leaves the
//! generation odd, so no conntrack entry's recorded remote vouches for an address the trie
//! gave to someone else meanwhile. A conntrack entry records the generation in which its
//! remote's entry was looked up (`CtEntry::ipcache_gen`; the programs read the generation
//! before any lookup of the packet). While that is still the generation, the remote's entry is
//! the one the conntrack entry recorded, so `to_container` checks an established flow's source
//! (`Spoofed`, `CtEntry::serves`) against the recorded entry without a trie walk. Any other
//! generation, an odd one or 0 (never valid), takes the lookup as before, and the entry
//! records the new generation when the lookup finds its recorded remote unchanged. The
//! order (write, then move on; read, then look up) means a packet that reads the new
//! generation sees the new entries; one that read the old generation may use what the entry
//! recorded, which is what the trie held before the write: the state just before the change,
//! as for any packet that came a moment earlier.
//!
//! That order holds on x86 (stores become visible in program order, loads are not reordered
//! with older loads); the argument is x86's. On a weakly ordered CPU (arm64) nothing here
//! orders the agent's generation store after its trie store, or a packet's generation load
//! before its trie walk: a packet that looks its source up while the agent writes that entry
//! could record the new generation with the old entry. Its flow's packets would then be checked
//! against the old entry until the next ipcache write (or, for a departed container's address,
//! until the agent flushes that address's conntrack entries, at the end of the same
//! reconcile), either way: the old remote's interfaces and identity still vouch for that one
//! flow (more access: e.g. a newcomer with a departed container's address, routed through the
//! bridge, on the departed one's flow), or still make it spoofed (less). Closing it needs an
//! acquire load here (BPF load-acquire, Linux 6.15) and a release store by the agent (an
//! mmapped or `BPF_F_LOCK` array). Until then the agent keeps the generation at 0 on any
//! other architecture than x86 (netpol-agent's `next_ipcache_gen`): no entry matches 0, so
//! there every packet to a container looks its source up, as before the generation existed.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RemoteInfo {
    pub identity: u32,
    /// The container's host veth; 0 for anything that is not a container's own address.
    pub ifindex: u32,
    /// The bridge that veth is attached to (the veth itself when it has none); for a host
    /// address [`NO_IFINDEX`]. 0: no check.
    pub bridge_ifindex: u32,
    pub _pad: u32,
}

/// An interface index no device has (the kernel's are positive `int`s): the `bridge_ifindex` of a
/// host address, which no bridge forwards legitimately.
pub const NO_IFINDEX: u32 = u32::MAX;

/// Bits of the generation a conntrack entry records (`CtEntry::ipcache_gen`, three bytes).
pub const GEN_MASK: u32 = 0x00ff_ffff;

/// The generation an ipcache write runs in, from `g`: odd (an odd `g` is an unfinished write's,
/// and stays). Its recorded bits ([`GEN_MASK`]) are never 0.
#[inline(always)]
pub const fn write_begins(g: u32) -> u32 {
    g | 1
}

/// The generation after an ipcache write (or a start), from `g`: the next even one after `g`
/// whose recorded bits are not 0, which no conntrack entry ever matches (entries made before
/// generations existed hold 0).
#[inline(always)]
pub const fn write_ends(g: u32) -> u32 {
    let n = (g | 1).wrapping_add(1);
    if n & GEN_MASK == 0 {
        n.wrapping_add(2)
    } else {
        n
    }
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

    /// One of the host's own addresses (identity `host`): a gateway's as any other.
    pub const fn host() -> Self {
        Self {
            identity: crate::identity::HOST,
            ifindex: 0,
            bridge_ifindex: NO_IFINDEX,
            _pad: 0,
        }
    }

    /// Whether the entry names interfaces its packets must come through (a container's or a host
    /// address).
    #[inline(always)]
    pub const fn checks_interfaces(&self) -> bool {
        self.ifindex != 0 || self.bridge_ifindex != 0
    }

    /// Whether this entry decides the `Spoofed` check and `CtEntry::serves` exactly as `other`
    /// does, for every packet and conntrack entry: the same entry, or two without interfaces
    /// (whose identities neither compares).
    #[inline(always)]
    pub const fn checks_as(&self, other: &RemoteInfo) -> bool {
        (self.identity == other.identity
            && self.ifindex == other.ifindex
            && self.bridge_ifindex == other.bridge_ifindex)
            || (!self.checks_interfaces() && !other.checks_interfaces())
    }

    /// Whether a packet from this address that entered the host on `ingress_ifindex` and is
    /// delivered through host veth `own` forges it. A container's address: it came in through
    /// neither its veth nor its bridge. A host address (`ifindex` 0, `bridge_ifindex`
    /// [`NO_IFINDEX`]): it came neither from the host's stack (0) nor through `own`, which only
    /// carries what its own `from_container` let out (the endpoint's own source), so a host
    /// address there is the host's NAT of the container's own connection.
    #[inline(always)]
    pub const fn spoofed(&self, ingress_ifindex: u32, own: u32) -> bool {
        self.bridge_ifindex != 0
            && ingress_ifindex != self.ifindex
            && ingress_ifindex != self.bridge_ifindex
            && (self.ifindex != 0 || ingress_ifindex != own)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_address_must_come_from_its_veth_or_its_bridge() {
        const OWN: u32 = 20;
        let c = RemoteInfo::container(300, 11, 2);
        assert!(!c.spoofed(11, OWN));
        assert!(!c.spoofed(2, OWN));
        assert!(c.spoofed(3, OWN));
        assert!(
            c.spoofed(0, OWN),
            "the host's own stack does not send as a container"
        );
        assert!(
            c.spoofed(OWN, OWN),
            "nor does the receiving endpoint's own veth"
        );
        let no_bridge = RemoteInfo::container(300, 11, 0);
        assert!(!no_bridge.spoofed(11, OWN));
        assert!(no_bridge.spoofed(0, OWN));
        assert!(
            !RemoteInfo::new(2).spoofed(7, OWN),
            "world, unmanaged, CIDRs: no check"
        );
    }

    #[test]
    fn a_host_address_must_come_from_the_hosts_own_stack() {
        const OWN: u32 = 20;
        const UPLINK: u32 = 3;
        const BRIDGE: u32 = 9;
        const OTHER_VETH: u32 = 21;
        let host = RemoteInfo::host();
        assert_eq!(host.identity, crate::identity::HOST);
        assert!(!host.spoofed(0, OWN), "sent by the host");
        assert!(
            !host.spoofed(OWN, OWN),
            "the host's NAT of the endpoint's own connection"
        );
        for iif in [UPLINK, BRIDGE, OTHER_VETH, 1] {
            assert!(host.spoofed(iif, OWN), "a host address from {iif}");
        }
    }

    /// What lets an entry recorded in a conntrack entry stand for the ipcache's current one
    /// ([`RemoteInfo::checks_as`]): the same `Spoofed` and `CtEntry::serves` decisions for a
    /// flow admitted with any remote, from every interface.
    #[test]
    fn entries_that_check_alike_decide_alike() {
        use crate::ct::{CtDir, CtEntry};
        const OWN: u32 = 20;
        let all = [
            RemoteInfo::new(crate::identity::WORLD),
            RemoteInfo::new(crate::identity::UNMANAGED),
            RemoteInfo::new(1_000_000),
            RemoteInfo::container(300, 11, 2),
            RemoteInfo::container(301, 11, 2),
            RemoteInfo::container(300, 12, 2),
            RemoteInfo::container(300, 11, 0),
            RemoteInfo::host(),
        ];
        for a in all {
            for b in all {
                if !a.checks_as(&b) {
                    continue;
                }
                for admitted in all {
                    let e =
                        CtEntry::new(0, crate::proto::TCP, 0, OWN, 50, &admitted, CtDir::Ingress);
                    for iif in [0, 2, 3, 11, 12, OWN, NO_IFINDEX] {
                        assert_eq!(a.spoofed(iif, OWN), b.spoofed(iif, OWN), "{a:?} {b:?}");
                        assert_eq!(
                            e.serves(OWN, 50, Some((iif, &a))),
                            e.serves(OWN, 50, Some((iif, &b))),
                            "admitted with {admitted:?}, from {iif}: {a:?} as {b:?}"
                        );
                    }
                }
            }
        }
        assert!(all[0].checks_as(&all[2]));
        assert!(!all[3].checks_as(&all[4]));
        assert!(!all[3].checks_as(&all[0]));
        assert!(!all[7].checks_as(&all[0]));
    }

    #[test]
    fn a_generation_is_never_zero_in_its_recorded_bits() {
        assert_eq!(write_begins(0), 1);
        assert_eq!(write_ends(1), 2);
        assert_eq!(write_begins(2), 3);
        assert_eq!(
            write_begins(3),
            3,
            "an unfinished write's generation stays odd"
        );
        assert_eq!(write_ends(0), 2, "a start from 0");
        assert_eq!(write_ends(2), 4, "a start moves on from an even generation");
        assert_eq!(write_ends(GEN_MASK - 2), GEN_MASK - 1);
        assert_eq!(write_ends(GEN_MASK), GEN_MASK + 3);
        assert_eq!(write_ends(GEN_MASK - 1), GEN_MASK + 3);
        assert_eq!(write_ends(u32::MAX), 2);
        let mut g = 0u32;
        for _ in 0..3 * (1 << 12) {
            g = write_begins(g);
            assert!(g & 1 == 1 && g & GEN_MASK != 0, "{g:#x}");
            g = write_ends(g);
            assert!(g & 1 == 0 && g & GEN_MASK != 0, "{g:#x}");
        }
        for start in [GEN_MASK - 4, u32::MAX - 4] {
            let mut g = start;
            for _ in 0..4 {
                g = write_ends(write_begins(g));
                assert!(g & 1 == 0 && g & GEN_MASK != 0, "{start:#x}: {g:#x}");
            }
        }
    }
}
