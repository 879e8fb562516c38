//! Longest-prefix match as the kernel's LPM tries (`BPF_MAP_TYPE_LPM_TRIE`) do it, for user space:
//! the datapath model, `policy trace` and `policy matrix` read `POLICY` and the ipcache with these
//! functions, so that what they answer is what a lookup in the kernel returns. The differential
//! test (`tests/tests/datapath_diff.rs`) checks them against the real tries through the model.

use crate::policy::{PolicyKey, PolicyValue};

/// Longest-prefix match over `(prefix_len, key bits, value)` entries, as the kernel's LPM trie
/// does it: `bits` are the key's bytes (big-endian, as the trie compares them).
pub fn lpm<'a, V>(entries: impl Iterator<Item = (u32, &'a [u8], V)>, want: &[u8]) -> Option<V> {
    let mut best: Option<(u32, V)> = None;
    for (len, bits, v) in entries {
        if prefix_matches(bits, want, len) && best.as_ref().is_none_or(|(l, _)| len > *l) {
            best = Some((len, v));
        }
    }
    best.map(|(_, v)| v)
}

fn prefix_matches(a: &[u8], b: &[u8], len: u32) -> bool {
    let full = (len / 8) as usize;
    if a.len() < full || b.len() < full || a[..full] != b[..full] {
        return false;
    }
    let rest = len % 8;
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    a.len() > full && b.len() > full && (a[full] & mask) == (b[full] & mask)
}

/// The bytes of a [`PolicyKey`] as the trie compares them (after its 32-bit prefix length).
pub fn policy_key_bits(k: &PolicyKey) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..4].copy_from_slice(&k.local.to_ne_bytes());
    b[4..8].copy_from_slice(&k.remote.to_ne_bytes());
    b[8] = k.direction;
    b[9] = k.proto;
    b[10..12].copy_from_slice(&k.dport().to_be_bytes());
    b
}

/// Longest match of `key` among `POLICY` entries `(prefix_len, key, value)`: what
/// `POLICY.get` returns for it in the kernel.
pub fn policy<'a>(
    entries: impl IntoIterator<Item = (u32, &'a PolicyKey, PolicyValue)>,
    key: &PolicyKey,
) -> Option<PolicyValue> {
    let want = policy_key_bits(key);
    let mut best: Option<(u32, PolicyValue)> = None;
    for (len, k, v) in entries {
        let bits = policy_key_bits(k);
        if prefix_matches(&bits, &want, len) && best.as_ref().is_none_or(|(l, _)| len > *l) {
            best = Some((len, v));
        }
    }
    best.map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Direction;

    #[test]
    fn the_longest_matching_prefix_wins_whatever_the_order() {
        let e = [
            (8u32, [10u8, 0, 0, 0], 1),
            (24, [10, 1, 2, 0], 2),
            (16, [10, 1, 0, 0], 3),
        ];
        let m = |a: [u8; 4]| lpm(e.iter().map(|(l, b, v)| (*l, &b[..], *v)), &a);
        assert_eq!(m([10, 1, 2, 3]), Some(2));
        assert_eq!(m([10, 1, 3, 3]), Some(3));
        assert_eq!(m([10, 9, 3, 3]), Some(1));
        assert_eq!(m([11, 1, 2, 3]), None);
    }

    #[test]
    fn policy_keys_match_by_their_tail_prefix() {
        let k = PolicyKey::new(300, 301, Direction::Ingress, 6, 5432);
        let any_port = PolicyKey::new(300, 301, Direction::Ingress, 6, 0);
        let e = [
            (80, &any_port, PolicyValue::allow(1)),
            (96, &k, PolicyValue::deny(2)),
        ];
        assert_eq!(policy(e, &k), Some(PolicyValue::deny(2)));
        let other = PolicyKey::new(300, 301, Direction::Ingress, 6, 80);
        assert_eq!(policy(e, &other), Some(PolicyValue::allow(1)));
        let udp = PolicyKey::new(300, 301, Direction::Ingress, 17, 5432);
        assert_eq!(policy(e, &udp), None);
    }
}
