//! `POLICY`: the allow/deny map, an LPM trie.
//!
//! # Key layout and lookup order
//!
//! The trie key is `prefix_len` followed by [`PolicyKey`]: `local` identity (32 bits), `remote`
//! identity (32), `direction` (8), `proto` (8), destination port (16, network order), 96 bits in
//! all. Every entry matches `local`, `remote` and `direction` exactly; what follows is matched by
//! prefix:
//!
//! | prefix_len | matches                                  |
//! |-----------:|------------------------------------------|
//! | 72         | every protocol and port (an L3-only rule) |
//! | 80         | one protocol, every port                  |
//! | 80 + n     | one protocol, ports sharing the top n bits (a block of a port range) |
//! | 96         | one protocol, one port                    |
//!
//! A port range (`endPort`) is split into the fewest aligned power-of-two blocks
//! ([`port_range_blocks`]), so `1024-65535` takes 6 entries, not 64,512.
//! ICMP and ICMPv6 put the message type in the port field (`[0, type]`).
//!
//! A packet's verdict is decided by two trie lookups ([`decide`]): one with the remote identity,
//! one with the wildcard remote identity [`crate::identity::ANY`]. If either longest match is a
//! deny, the packet is denied; otherwise if either is an allow, it is allowed; otherwise no rule
//! matched. Because a longest match hides a shorter one, the agent folds every deny entry into the
//! more specific allow entries it covers within the same (local, remote, direction) before writing
//! the map (see the agent's policy compiler), so that deny always wins.
//!
//! The second lookup is skipped when the first one alone decides ([`lookup`]): its longest match
//! is a deny (deny wins whatever the wildcard holds), or an allow flagged
//! [`PolicyValue::FINAL`]. The compiler sets that flag on an allow of a specific remote only when
//! no wildcard deny of the same (local, direction) overlaps it ([`overlaps`]): every packet the
//! allow matches then finds, under the wildcard, an allow or nothing, and the verdict is the
//! allow's either way. An allow without the flag (a wildcard deny overlaps it, or an older agent
//! wrote it) takes both lookups, as before.

use crate::Direction;

/// Full length of the matched part of a [`PolicyKey`], in bits.
pub const FULL_PREFIX: u32 = 96;
/// Prefix that matches any protocol and port.
pub const PREFIX_ANY_PROTO: u32 = 72;
/// Prefix that matches one protocol and any port.
pub const PREFIX_ANY_PORT: u32 = 80;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub local: u32,
    pub remote: u32,
    pub direction: u8,
    pub proto: u8,
    /// Destination port, network order (ICMP: `[0, type]`).
    dport: [u8; 2],
}

impl PolicyKey {
    #[inline(always)]
    pub const fn new(local: u32, remote: u32, direction: Direction, proto: u8, dport: u16) -> Self {
        Self {
            local,
            remote,
            direction: direction as u8,
            proto,
            dport: dport.to_be_bytes(),
        }
    }

    #[inline(always)]
    pub const fn dport(&self) -> u16 {
        u16::from_be_bytes(self.dport)
    }
}

/// What a policy entry does with a matching packet.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Allow = 1,
    Deny = 2,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    /// [`Action`] as `u8`.
    pub action: u8,
    /// Bit set of `PolicyValue::*` flags.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// Which rule the entry came from (the agent's rule table), reported in events.
    pub rule: u32,
}

impl PolicyValue {
    /// On an allow of a specific remote identity: no deny under the wildcard remote of the same
    /// (local, direction) overlaps it, so when it is the first lookup's longest match the second
    /// lookup cannot change the verdict ([`lookup`] skips it). Meaningless on a deny and on a
    /// wildcard entry.
    pub const FINAL: u8 = 1 << 0;

    pub const fn allow(rule: u32) -> Self {
        Self {
            action: Action::Allow as u8,
            flags: 0,
            _pad: [0; 2],
            rule,
        }
    }

    pub const fn deny(rule: u32) -> Self {
        Self {
            action: Action::Deny as u8,
            flags: 0,
            _pad: [0; 2],
            rule,
        }
    }

    /// An allow that decides without the wildcard lookup (see [`PolicyValue::FINAL`]).
    pub const fn final_allow(rule: u32) -> Self {
        let mut v = Self::allow(rule);
        v.flags = Self::FINAL;
        v
    }

    /// Whether this is an allow flagged [`PolicyValue::FINAL`].
    #[inline(always)]
    pub const fn is_final(&self) -> bool {
        self.is_allow() && self.flags & Self::FINAL != 0
    }

    #[inline(always)]
    pub const fn is_deny(&self) -> bool {
        self.action == Action::Deny as u8
    }

    #[inline(always)]
    pub const fn is_allow(&self) -> bool {
        self.action == Action::Allow as u8
    }
}

/// The outcome of the two policy lookups for one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// An allow entry matched and no deny entry did; carries the rule.
    Allow(u32),
    /// A deny entry matched; carries the rule.
    Deny(u32),
    /// Nothing matched.
    NoMatch,
}

/// Decides a packet from the longest matches of the lookup with the remote identity and of the
/// lookup with the wildcard remote identity. Deny wins, then allow.
#[inline(always)]
pub fn decide(exact: Option<PolicyValue>, wildcard: Option<PolicyValue>) -> Verdict {
    if let Some(v) = exact {
        if v.is_deny() {
            return Verdict::Deny(v.rule);
        }
    }
    if let Some(v) = wildcard {
        if v.is_deny() {
            return Verdict::Deny(v.rule);
        }
    }
    if let Some(v) = exact {
        if v.is_allow() {
            return Verdict::Allow(v.rule);
        }
    }
    if let Some(v) = wildcard {
        if v.is_allow() {
            return Verdict::Allow(v.rule);
        }
    }
    Verdict::NoMatch
}

/// The two keys the datapath looks up for a packet, in order: with the remote identity, then with
/// the wildcard. Both carry the full prefix; the trie returns the longest stored match.
#[inline(always)]
pub const fn lookup_keys(
    local: u32,
    remote: u32,
    direction: Direction,
    proto: u8,
    dport: u16,
) -> [PolicyKey; 2] {
    [
        PolicyKey::new(local, remote, direction, proto, dport),
        PolicyKey::new(local, crate::identity::ANY, direction, proto, dport),
    ]
}

/// The policy verdict of a new flow of `local` with `remote` in `dir`: the two lookups of
/// [`lookup_keys`], each the longest stored match that `get` returns for a full-prefix key (the
/// kernel: `POLICY.get`; user space: [`crate::lpm::policy`] over the entries), decided by
/// [`decide`]. `port` is the destination port, for ICMP / ICMPv6 the message type, 0 for other
/// protocols. The datapath and `policy trace` both decide with this function.
///
/// The wildcard lookup is skipped when the first one decides alone: a deny, or an allow flagged
/// [`PolicyValue::FINAL`] (the verdict is the same as with both lookups when the flag is set as
/// the compiler sets it: see the module documentation).
#[inline(always)]
pub fn lookup(
    local: u32,
    remote: u32,
    direction: Direction,
    proto: u8,
    port: u16,
    mut get: impl FnMut(&PolicyKey) -> Option<PolicyValue>,
) -> Verdict {
    let [a, b] = lookup_keys(local, remote, direction, proto, port);
    // Plain values (a miss is action 0, neither allow nor deny), not `Option`s carried across
    // the second lookup: in BPF an `Option`'s payload is undefined when it is `None`, and the
    // verifier refuses a spill of such a register. The order is [`decide`]'s.
    let exact = get(&a).unwrap_or_default();
    if exact.is_deny() {
        return Verdict::Deny(exact.rule);
    }
    if exact.is_final() {
        return Verdict::Allow(exact.rule);
    }
    let wildcard = get(&b).unwrap_or_default();
    if wildcard.is_deny() {
        return Verdict::Deny(wildcard.rule);
    }
    if exact.is_allow() {
        return Verdict::Allow(exact.rule);
    }
    if wildcard.is_allow() {
        return Verdict::Allow(wildcard.rule);
    }
    Verdict::NoMatch
}

/// The protocol and port bits of a key below the 72 fixed bits, as a 24-bit number, and how many
/// of them an entry of `prefix_len` matches.
#[inline(always)]
const fn tail(k: &PolicyKey, prefix_len: u32) -> (u32, u32) {
    let t = ((k.proto as u32) << 16) | k.dport() as u32;
    let n = if prefix_len <= PREFIX_ANY_PROTO {
        0
    } else if prefix_len >= FULL_PREFIX {
        24
    } else {
        prefix_len - PREFIX_ANY_PROTO
    };
    (t, n)
}

/// Whether some packet can match both entries' protocol and port parts (`a` of `a_len` bits, `b`
/// of `b_len`): one's range contains the other's. Local, remote and direction are not compared.
#[inline(always)]
pub const fn overlaps(a: &PolicyKey, a_len: u32, b: &PolicyKey, b_len: u32) -> bool {
    let (ta, na) = tail(a, a_len);
    let (tb, nb) = tail(b, b_len);
    let n = if na < nb { na } else { nb };
    n == 0 || (ta ^ tb) >> (24 - n) == 0
}

/// An aligned block of ports: `port` with its low `16 - bits` bits zero; the trie prefix of the
/// entry is `PREFIX_ANY_PORT + bits`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortBlock {
    pub port: u16,
    pub bits: u8,
}

impl PortBlock {
    pub const fn prefix_len(&self) -> u32 {
        PREFIX_ANY_PORT + self.bits as u32
    }

    pub const fn first(&self) -> u16 {
        self.port
    }

    pub const fn last(&self) -> u16 {
        let span = (1u32 << (16 - self.bits as u32)) - 1;
        (self.port as u32 + span) as u16
    }

    pub const fn contains(&self, port: u16) -> bool {
        port >= self.first() && port <= self.last()
    }
}

/// Splits `first..=last` into the fewest aligned power-of-two blocks.
pub fn port_range_blocks(first: u16, last: u16) -> PortBlocks {
    PortBlocks {
        next: first as u32,
        last: last as u32,
    }
}

pub struct PortBlocks {
    next: u32,
    last: u32,
}

impl Iterator for PortBlocks {
    type Item = PortBlock;

    fn next(&mut self) -> Option<PortBlock> {
        if self.next > self.last {
            return None;
        }
        let start = self.next;
        // Largest block aligned at `start` that does not pass `last`.
        let mut size_log = if start == 0 {
            16
        } else {
            start.trailing_zeros().min(16)
        };
        while start + (1u32 << size_log) - 1 > self.last {
            size_log -= 1;
        }
        self.next = start + (1u32 << size_log);
        Some(PortBlock {
            port: start as u16,
            bits: (16 - size_log) as u8,
        })
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::identity::ANY;

    /// The kernel's longest-prefix match, as the datapath model does it.
    fn lpm(entries: &[(PolicyKey, u32, PolicyValue)], key: &PolicyKey) -> Option<PolicyValue> {
        let e: Vec<_> = entries.iter().map(|(k, len, v)| (*len, *k, *v)).collect();
        crate::model::policy_lpm(&e, key)
    }

    fn verdict(
        entries: &[(PolicyKey, u32, PolicyValue)],
        local: u32,
        remote: u32,
        proto: u8,
        port: u16,
    ) -> Verdict {
        lookup(local, remote, Direction::Ingress, proto, port, |k| {
            lpm(entries, k)
        })
    }

    const DB: u32 = 300;
    const APP1: u32 = 301;
    const APP2: u32 = 302;

    fn k(remote: u32, proto: u8, port: u16) -> PolicyKey {
        PolicyKey::new(DB, remote, Direction::Ingress, proto, port)
    }

    #[test]
    fn exact_port_allows_only_that_port_and_protocol() {
        let e = [(k(APP1, 6, 5432), FULL_PREFIX, PolicyValue::allow(1))];
        assert_eq!(verdict(&e, DB, APP1, 6, 5432), Verdict::Allow(1));
        assert_eq!(verdict(&e, DB, APP1, 6, 5433), Verdict::NoMatch);
        assert_eq!(verdict(&e, DB, APP1, 17, 5432), Verdict::NoMatch);
        assert_eq!(verdict(&e, DB, APP2, 6, 5432), Verdict::NoMatch);
        assert_eq!(verdict(&e, APP1, APP1, 6, 5432), Verdict::NoMatch);
    }

    #[test]
    fn wildcards_for_protocol_port_and_remote() {
        let any_proto = [(k(APP1, 0, 0), PREFIX_ANY_PROTO, PolicyValue::allow(2))];
        assert_eq!(verdict(&any_proto, DB, APP1, 17, 53), Verdict::Allow(2));
        assert_eq!(verdict(&any_proto, DB, APP1, 1, 8), Verdict::Allow(2));
        let any_port = [(k(APP1, 6, 0), PREFIX_ANY_PORT, PolicyValue::allow(3))];
        assert_eq!(verdict(&any_port, DB, APP1, 6, 1), Verdict::Allow(3));
        assert_eq!(verdict(&any_port, DB, APP1, 17, 1), Verdict::NoMatch);
        let any_remote = [(k(ANY, 6, 5432), FULL_PREFIX, PolicyValue::allow(4))];
        assert_eq!(verdict(&any_remote, DB, APP2, 6, 5432), Verdict::Allow(4));
        assert_eq!(verdict(&any_remote, DB, 2, 6, 5432), Verdict::Allow(4));
    }

    #[test]
    fn deny_wins_over_allow_across_the_two_lookups() {
        // Allow app1 on 5432, deny everyone on TCP.
        let e = [
            (k(APP1, 6, 5432), FULL_PREFIX, PolicyValue::allow(1)),
            (k(ANY, 6, 0), PREFIX_ANY_PORT, PolicyValue::deny(9)),
        ];
        assert_eq!(verdict(&e, DB, APP1, 6, 5432), Verdict::Deny(9));
        // Deny app1 everything, allow everyone on 5432.
        let e = [
            (k(APP1, 0, 0), PREFIX_ANY_PROTO, PolicyValue::deny(7)),
            (k(ANY, 6, 5432), FULL_PREFIX, PolicyValue::allow(1)),
        ];
        assert_eq!(verdict(&e, DB, APP1, 6, 5432), Verdict::Deny(7));
        assert_eq!(verdict(&e, DB, APP2, 6, 5432), Verdict::Allow(1));
    }

    /// The lookups `lookup` made: (verdict, how many).
    fn counted(
        entries: &[(PolicyKey, u32, PolicyValue)],
        remote: u32,
        port: u16,
    ) -> (Verdict, u32) {
        let mut n = 0;
        let v = lookup(DB, remote, Direction::Ingress, 6, port, |k| {
            n += 1;
            lpm(entries, k)
        });
        (v, n)
    }

    #[test]
    fn a_deny_or_a_final_allow_decides_with_one_lookup() {
        let exact_deny = [
            (k(APP1, 6, 5432), FULL_PREFIX, PolicyValue::deny(3)),
            (k(ANY, 6, 0), PREFIX_ANY_PORT, PolicyValue::allow(4)),
        ];
        assert_eq!(counted(&exact_deny, APP1, 5432), (Verdict::Deny(3), 1));
        let fin = [
            (k(APP1, 6, 5432), FULL_PREFIX, PolicyValue::final_allow(1)),
            (k(ANY, 6, 80), FULL_PREFIX, PolicyValue::deny(2)),
        ];
        assert_eq!(counted(&fin, APP1, 5432), (Verdict::Allow(1), 1));
        // Without the flag, the same allow takes both lookups; so does a miss.
        let plain = [(k(APP1, 6, 5432), FULL_PREFIX, PolicyValue::allow(1))];
        assert_eq!(counted(&plain, APP1, 5432), (Verdict::Allow(1), 2));
        assert_eq!(counted(&plain, APP2, 5432), (Verdict::NoMatch, 2));
        // The flag is trusted: set where a wildcard deny overlaps the allow, that deny is
        // skipped. This is why only the compiler's proof may set it (the agent's `mark_final`).
        let wrong = [
            (k(APP1, 6, 5432), FULL_PREFIX, PolicyValue::final_allow(1)),
            (k(ANY, 6, 0), PREFIX_ANY_PORT, PolicyValue::deny(2)),
        ];
        assert_eq!(counted(&wrong, APP1, 5432), (Verdict::Allow(1), 1));
        let right = [
            (k(APP1, 6, 5432), FULL_PREFIX, PolicyValue::allow(1)),
            (k(ANY, 6, 0), PREFIX_ANY_PORT, PolicyValue::deny(2)),
        ];
        assert_eq!(counted(&right, APP1, 5432), (Verdict::Deny(2), 2));
        // A flag on a deny or a wildcard entry means nothing.
        let mut d = PolicyValue::deny(5);
        d.flags = PolicyValue::FINAL;
        assert!(!d.is_final());
    }

    #[test]
    fn overlaps_is_whether_one_range_contains_the_other() {
        let e = |p: u8, port: u16| k(APP1, p, port);
        let tcp5432 = (e(6, 5432), FULL_PREFIX);
        let tcp_all = (e(6, 0), PREFIX_ANY_PORT);
        let udp_all = (e(17, 0), PREFIX_ANY_PORT);
        let all = (e(0, 0), PREFIX_ANY_PROTO);
        let ov = |a: (PolicyKey, u32), b: (PolicyKey, u32)| {
            let r = overlaps(&a.0, a.1, &b.0, b.1);
            assert_eq!(r, overlaps(&b.0, b.1, &a.0, a.1), "symmetric");
            r
        };
        assert!(ov(tcp5432, tcp5432));
        assert!(ov(tcp5432, tcp_all));
        assert!(ov(tcp5432, all));
        assert!(ov(udp_all, all));
        assert!(!ov(tcp5432, udp_all));
        assert!(!ov(tcp5432, (e(6, 5433), FULL_PREFIX)));
        assert!(!ov(tcp_all, udp_all));
        // Port blocks: 5000-5999 overlaps 5432 and 5000-5007, not 6000 or UDP 5432.
        for b in port_range_blocks(5000, 5999) {
            let blk = (e(6, b.port), b.prefix_len());
            assert_eq!(ov(blk, tcp5432), b.contains(5432), "{b:?}");
            assert!(!ov(blk, (e(6, 6000), FULL_PREFIX)));
            assert!(!ov(blk, (e(17, 5432), FULL_PREFIX)));
        }
        // Exhaustively over small blocks: overlap iff some port is in both.
        let blocks: Vec<PortBlock> = [(0u16, 7u16), (4, 5), (6, 6), (8, 15), (3, 12)]
            .iter()
            .flat_map(|&(a, b)| port_range_blocks(a, b))
            .collect();
        for x in &blocks {
            for y in &blocks {
                let both = (0..=20u16).any(|p| x.contains(p) && y.contains(p));
                assert_eq!(
                    ov(
                        (e(6, x.port), x.prefix_len()),
                        (e(6, y.port), y.prefix_len())
                    ),
                    both,
                    "{x:?} {y:?}"
                );
            }
        }
    }

    #[test]
    fn longer_prefix_wins_within_one_remote() {
        // Allow TCP 1000-1999 but a (folded) deny on 1500 exactly.
        let mut e: Vec<_> = port_range_blocks(1000, 1999)
            .map(|b| (k(APP1, 6, b.port), b.prefix_len(), PolicyValue::allow(1)))
            .collect();
        e.push((k(APP1, 6, 1500), FULL_PREFIX, PolicyValue::deny(2)));
        assert_eq!(verdict(&e, DB, APP1, 6, 1499), Verdict::Allow(1));
        assert_eq!(verdict(&e, DB, APP1, 6, 1500), Verdict::Deny(2));
        assert_eq!(verdict(&e, DB, APP1, 6, 999), Verdict::NoMatch);
        assert_eq!(verdict(&e, DB, APP1, 6, 2000), Verdict::NoMatch);
    }

    #[test]
    fn port_ranges_split_into_exact_covering_blocks() {
        for &(a, b) in &[
            (0u16, 65535u16),
            (1024, 65535),
            (80, 80),
            (1, 2),
            (5000, 5999),
            (65535, 65535),
            (0, 0),
            (3, 1027),
        ] {
            let blocks: Vec<_> = port_range_blocks(a, b).collect();
            assert!(blocks.len() <= 32, "{a}-{b}: {}", blocks.len());
            let mut expect = a as u32;
            for bl in &blocks {
                assert_eq!(bl.first() as u32, expect, "{a}-{b} blocks contiguous");
                let size = 1u32 << (16 - bl.bits);
                assert_eq!(bl.port as u32 % size, 0, "block aligned");
                expect = bl.last() as u32 + 1;
            }
            assert_eq!(expect, b as u32 + 1, "{a}-{b} covered exactly");
        }
        assert_eq!(port_range_blocks(1024, 65535).count(), 6);
        assert_eq!(
            port_range_blocks(0, 65535).collect::<Vec<_>>(),
            [PortBlock { port: 0, bits: 0 }]
        );
    }
}
