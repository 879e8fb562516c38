//! Counters beside `DROPS`: per-rule flow counters (`RULE_STATS`), audits (`AUDITS`, by the
//! reason a drop would have had) and the `EVENTS` rate limit (`EVENT_STATS`).

use crate::Direction;

/// Key of `RULE_STATS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleStatsKey {
    /// The rule that decided (the agent's rule table), 0 for the default deny or the implicit
    /// allow of an opted-out direction.
    pub rule: u32,
    /// The local (policed) endpoint's identity.
    pub identity: u32,
    /// [`Direction`] as `u8`.
    pub direction: u8,
    pub _pad: [u8; 3],
}

impl RuleStatsKey {
    #[inline(always)]
    pub const fn new(rule: u32, identity: u32, direction: Direction) -> Self {
        Self {
            rule,
            identity,
            direction: direction as u8,
            _pad: [0; 3],
        }
    }
}

/// Value of `RULE_STATS` (per CPU): new flows the rule decided, by outcome.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleStats {
    /// New flows the rule allowed.
    pub allowed: u64,
    /// New flows dropped by the rule (a deny rule, or rule 0: the default deny).
    pub denied: u64,
    /// New flows the rule would have dropped, let through by audit mode.
    pub audited: u64,
}

/// The single per-CPU value of `EVENT_STATS`: a rate limit for `EVENTS` (a generic cell rate
/// algorithm, which is a token bucket: [`EventStats::admit`]) and what it kept out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventStats {
    /// The theoretical arrival time of the next event (`bpf_ktime_get_ns()` clock).
    pub tat_ns: u64,
    /// Events not written because of the rate limit, by kind: drops, new flows, audits.
    pub suppressed_drops: u64,
    pub suppressed_flows: u64,
    pub suppressed_audits: u64,
    /// Events the ring buffer had no room for (no reader, or one too slow).
    pub ring_full: u64,
}

const SEC: u64 = 1_000_000_000;

impl EventStats {
    /// Whether an event at `now` fits `rate` events per second with a burst of as many (one
    /// second's worth); if it does, it is charged. Counters are the caller's.
    #[inline(always)]
    pub fn admit(&mut self, now: u64, rate: u32) -> bool {
        let interval = SEC / if rate == 0 { 1 } else { rate as u64 };
        let tat = if self.tat_ns > now { self.tat_ns } else { now };
        // Up to a second's worth of events ahead of the clock.
        if tat - now + interval > SEC {
            return false;
        }
        self.tat_ns = tat + interval;
        true
    }

    /// Counts an event of `kind` (`FlowEvent::KIND_*`) that the limit kept out.
    #[inline(always)]
    pub fn suppress(&mut self, kind: u8) {
        match kind {
            crate::event::FlowEvent::KIND_DROP => self.suppressed_drops += 1,
            crate::event::FlowEvent::KIND_AUDIT => self.suppressed_audits += 1,
            _ => self.suppressed_flows += 1,
        }
    }

    /// Every suppressed event.
    pub const fn suppressed(&self) -> u64 {
        self.suppressed_drops + self.suppressed_flows + self.suppressed_audits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_one_seconds_worth_then_the_rate() {
        let mut s = EventStats::default();
        let t0 = 5 * SEC;
        let n = (0..100).filter(|_| s.admit(t0, 10)).count();
        assert_eq!(n, 10, "a burst of the rate, all at once");
        assert!(
            !s.admit(t0 + SEC / 20, 10),
            "half an interval later: still full"
        );
        assert!(s.admit(t0 + SEC / 10, 10), "one interval later: one more");
        assert!(!s.admit(t0 + SEC / 10, 10));
        // After a quiet second the whole burst is back, not more.
        let later = t0 + 3 * SEC;
        assert_eq!((0..100).filter(|_| s.admit(later, 10)).count(), 10);
    }

    #[test]
    fn steady_rate_passes_and_counters_split_by_kind() {
        let mut s = EventStats::default();
        let mut passed = 0;
        // 2 events per interval for 10 s: half pass once the burst is spent.
        for i in 0..2000u64 {
            if s.admit(SEC + i * SEC / 200, 100) {
                passed += 1;
            } else {
                s.suppress(crate::event::FlowEvent::KIND_DROP);
            }
        }
        assert!((1000..=1100).contains(&passed), "{passed}");
        assert_eq!(s.suppressed_drops, 2000 - passed);
        s.suppress(crate::event::FlowEvent::KIND_AUDIT);
        s.suppress(crate::event::FlowEvent::KIND_FLOW);
        assert_eq!(s.suppressed(), 2000 - passed + 2);
    }

    #[test]
    fn a_rate_of_zero_is_one_per_second_never_a_division_by_zero() {
        let mut s = EventStats::default();
        assert!(s.admit(SEC, 0));
        assert!(!s.admit(SEC, 0));
    }
}
