//! The flow recorder behind `policy suggest`: a fixed-size table of the flows the datapath
//! reported (new flows it allowed, `FLOW`, and would-be drops it let through in audit mode,
//! `AUDIT`), one entry per (opener identity, answering identity, protocol, server port) with
//! counts and first/last seen times. It is filled from the `EVENTS` ring buffer by the monitor's
//! reader, whether or not a monitor client listens.
//!
//! Bounded: at most [`FLOW_TABLE_ENTRIES`] entries (about 60 bytes each) and
//! [`WINDOW_MINUTES`] per-minute counters; a flow class that does not fit is not recorded and
//! counted as missed, so a flood of new flow classes (random ports) costs no memory, and the
//! suggestion says it is incomplete. Drops are never recorded: they are not traffic to allow.
//!
//! When flow events come: audit events always (rate limited by the datapath like drops); `FLOW`
//! events only while `TRACE_FLOWS` is on: while a monitor client listens, with `run
//! --record-flows`, and while any endpoint is in audit mode.

use std::collections::{HashMap, VecDeque};

use netpol_common::event::FlowEvent;

use super::state::Agent;
use crate::policy::{
    render,
    suggest::{self, FlowKey, FlowStats, Party, SuggestFormat},
};

/// Flow classes the table holds.
pub const FLOW_TABLE_ENTRIES: usize = 4096;
/// How often the datapath's lost-event counters are read.
pub const SAMPLE_SECS: u64 = 10;
/// Minutes of missed/suppressed counts kept (a day).
pub const WINDOW_MINUTES: usize = 1440;

/// One minute's losses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Minute {
    /// Unix minute.
    at: u64,
    /// Flow classes not recorded: the table was full.
    missed: u64,
    /// Events the datapath's rate limit suppressed.
    suppressed: u64,
}

#[derive(Debug)]
pub struct FlowTable {
    cap: usize,
    flows: HashMap<FlowKey, FlowStats>,
    minutes: VecDeque<Minute>,
    /// The datapath's suppressed-events counter at the last sample.
    suppressed_seen: Option<u64>,
    /// When the table started recording (unix seconds).
    pub started: u64,
    /// `run --record-flows`: `TRACE_FLOWS` stays on.
    pub always: bool,
}

/// What the table saw in a window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Window {
    pub flows: Vec<(FlowKey, FlowStats)>,
    pub missed: u64,
    pub suppressed: u64,
}

impl FlowTable {
    pub fn new(cap: usize, now: u64) -> Self {
        Self {
            cap,
            flows: HashMap::with_capacity(cap.min(1024)),
            minutes: VecDeque::new(),
            suppressed_seen: None,
            started: now,
            always: false,
        }
    }

    fn minute(&mut self, now: u64) -> &mut Minute {
        let at = now / 60;
        if self.minutes.back().is_none_or(|m| m.at != at) {
            if self.minutes.len() == WINDOW_MINUTES {
                self.minutes.pop_front();
            }
            self.minutes.push_back(Minute {
                at,
                ..Minute::default()
            });
        }
        // Just pushed or already there.
        let last = self.minutes.len() - 1;
        &mut self.minutes[last]
    }

    /// Records one event (flows and audits; anything else is ignored).
    pub fn record(&mut self, ev: &FlowEvent, now: u64) {
        let audit = ev.kind == FlowEvent::KIND_AUDIT;
        if ev.kind != FlowEvent::KIND_FLOW && !audit {
            return;
        }
        let key = FlowKey {
            src: ev.src_identity,
            dst: ev.dst_identity,
            proto: ev.proto,
            dport: ev.dport,
        };
        let full = self.flows.len() >= self.cap;
        match self.flows.get_mut(&key) {
            Some(s) => {
                s.count += 1;
                s.audited += u64::from(audit);
                s.last_seen = now;
            }
            None if full => self.minute(now).missed += 1,
            None => {
                self.flows.insert(
                    key,
                    FlowStats {
                        count: 1,
                        audited: u64::from(audit),
                        first_seen: now,
                        last_seen: now,
                    },
                );
            }
        }
    }

    /// Takes a sample of the datapath's counters of flow and audit events it could not report
    /// (rate limited, or the ring buffer was full).
    pub fn note_lost(&mut self, stats: &netpol_common::stats::EventStats, now: u64) {
        let total = stats
            .suppressed_flows
            .saturating_add(stats.suppressed_audits)
            .saturating_add(stats.ring_full);
        self.note_suppressed(total, now);
    }

    /// Takes a sample of the datapath's (monotonic) suppressed-events counter.
    pub fn note_suppressed(&mut self, total: u64, now: u64) {
        let delta = match self.suppressed_seen {
            // A counter that went down (maps re-created) starts again.
            Some(prev) if total >= prev => total - prev,
            Some(_) => total,
            None => 0,
        };
        self.suppressed_seen = Some(total);
        if delta > 0 {
            self.minute(now).suppressed += delta;
        }
    }

    /// The flow classes last seen at or after `since` (unix seconds), and the losses of the
    /// minutes from `since`'s on.
    pub fn window(&self, since: u64) -> Window {
        let mut flows: Vec<(FlowKey, FlowStats)> = self
            .flows
            .iter()
            .filter(|(_, s)| s.last_seen >= since)
            .map(|(k, s)| (*k, *s))
            .collect();
        flows.sort_by_key(|(k, _)| *k);
        let (mut missed, mut suppressed) = (0, 0);
        for m in self.minutes.iter().filter(|m| m.at >= since / 60) {
            missed += m.missed;
            suppressed += m.suppressed;
        }
        Window {
            flows,
            missed,
            suppressed,
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }
}

/// Samples the datapath's lost-event counters every [`SAMPLE_SECS`], so that a suggestion can
/// say whether events were lost in its window.
pub fn spawn_sampler(
    table: std::sync::Arc<std::sync::Mutex<FlowTable>>,
    agent: std::sync::Arc<tokio::sync::Mutex<Agent>>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(SAMPLE_SECS));
        loop {
            tick.tick().await;
            let stats = agent.lock().await.event_stats();
            if let (Some(s), Ok(mut t)) = (stats, table.lock()) {
                t.note_lost(&s, now());
            }
        }
    });
}

/// `policy suggest`: the suggestion for the flows of the last `since_secs` (all recorded when
/// `None`), with a header of comments saying what it is made of and what it lacks.
pub fn answer(
    agent: &Agent,
    table: &FlowTable,
    project: Option<&str>,
    since_secs: Option<u64>,
    format: SuggestFormat,
) -> String {
    let now = now();
    let since = since_secs.map_or(0, |s| now.saturating_sub(s));
    let mut w = table.window(since);
    // Events lost since the last sample count too.
    if let (Some(s), Some(seen)) = (agent.event_stats(), table.suppressed_seen) {
        let total = s
            .suppressed_flows
            .saturating_add(s.suppressed_audits)
            .saturating_add(s.ring_full);
        w.suppressed += total.saturating_sub(seen);
    }
    let locals = agent.local_identities();
    let party = |id| Party::of(id, agent.labels_of_identity(id));
    let s = suggest::suggest(&w.flows, &locals, &party, project);
    let mut head = String::new();
    let events: u64 = w.flows.iter().map(|(_, s)| s.count).sum();
    let audited: u64 = w.flows.iter().map(|(_, s)| s.audited).sum();
    let from = since.max(table.started);
    head.push_str(&format!(
        "# suggested by netpol-agent from {} flow classes ({events} events, {audited} of them audited would-be drops) seen {} to {}{}\n",
        w.flows.len(),
        utc(from),
        utc(now),
        project.map_or(String::new(), |p| format!(", project {p}")),
    ));
    if !table.always {
        head.push_str("# without `run --record-flows`, flows that policy allowed are recorded only while `monitor` runs: keep the policies that allow traffic now beside this suggestion\n");
    }
    if w.suppressed > 0 {
        head.push_str(&format!(
            "# INCOMPLETE: {} flow or audit events were not reported in this window (the datapath's event rate limit, or a full ring buffer): flows may be missing\n",
            w.suppressed
        ));
    } else {
        head.push_str("# no events were suppressed in this window\n");
    }
    if w.missed > 0 {
        head.push_str(&format!(
            "# INCOMPLETE: {} new flow classes were not recorded (the table holds {} and was full)\n",
            w.missed, table.cap
        ));
    }
    for n in &s.notes {
        head.push_str(&format!("# left out: {n}\n"));
    }
    let body = match format {
        SuggestFormat::Yaml => render::to_yaml(&s.policies, None),
        SuggestFormat::Labels => s.labels,
    };
    head + &body
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netpol_common::proto;

    fn ev(kind: u8, src: u32, dst: u32, dport: u16) -> FlowEvent {
        FlowEvent {
            kind,
            proto: proto::TCP,
            src_identity: src,
            dst_identity: dst,
            sport: 40000 + dport,
            dport,
            ..FlowEvent::default()
        }
    }

    #[test]
    fn flows_and_audits_are_counted_per_class_drops_never() {
        let mut t = FlowTable::new(16, 1000);
        t.record(&ev(FlowEvent::KIND_FLOW, 300, 301, 5432), 1000);
        t.record(&ev(FlowEvent::KIND_AUDIT, 300, 301, 5432), 1010);
        t.record(&ev(FlowEvent::KIND_DROP, 300, 301, 22), 1010);
        t.record(&ev(FlowEvent::KIND_AUDIT, 1, 301, 80), 1020);
        let w = t.window(0);
        assert_eq!(w.flows.len(), 2);
        let (k, s) = w.flows[1];
        assert_eq!(
            (k.src, k.dst, k.proto, k.dport),
            (300, 301, proto::TCP, 5432)
        );
        assert_eq!(
            s,
            FlowStats {
                count: 2,
                audited: 1,
                first_seen: 1000,
                last_seen: 1010
            }
        );
        // The window keeps classes last seen in it.
        assert_eq!(t.window(1015).flows.len(), 1);
    }

    #[test]
    fn a_flood_of_new_classes_costs_no_memory_and_is_reported() {
        let mut t = FlowTable::new(64, 6000);
        for port in 1..=10_000u16 {
            t.record(&ev(FlowEvent::KIND_AUDIT, 2, 301, port), 6000);
        }
        assert_eq!(t.len(), 64);
        // Known classes still count.
        t.record(&ev(FlowEvent::KIND_AUDIT, 2, 301, 1), 6001);
        let w = t.window(6000);
        assert_eq!(w.missed, 10_000 - 64);
        assert_eq!(
            w.flows
                .iter()
                .find(|(k, _)| k.dport == 1)
                .map(|(_, s)| s.count),
            Some(2)
        );
        // Minutes are bounded too.
        for m in 0..(WINDOW_MINUTES as u64 + 10) {
            t.record(&ev(FlowEvent::KIND_AUDIT, 2, 301, 9999), 6000 + m * 60);
        }
        assert_eq!(t.minutes.len(), WINDOW_MINUTES);
    }

    #[test]
    fn suppressed_events_are_counted_in_their_minute() {
        let mut t = FlowTable::new(8, 0);
        t.note_suppressed(100, 60);
        t.note_suppressed(130, 125);
        t.note_suppressed(150, 250);
        assert_eq!(t.window(0).suppressed, 50);
        assert_eq!(t.window(240).suppressed, 20);
        assert_eq!(t.window(300).suppressed, 0);
    }

    #[test]
    fn utc_formats_unix_time() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_796_125_901), "2026-12-01T11:51:41Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
    }
}
