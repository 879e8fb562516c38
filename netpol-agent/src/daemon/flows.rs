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
//! Only answered flows are recorded. A new flow's event only says that a packet left or was
//! let in, not that anyone was there: a SYN scan of an audited container, or of a peer whose own
//! policy drops it, would otherwise make `policy suggest` allow every port scanned. So an event
//! first waits (at most [`PENDING_ENTRIES`] of them, for at most [`PENDING_SECS`]) until the
//! endpoint's conntrack entry of the flow, read from the pinned maps every [`CHECK_MS`], shows
//! the answer ([`evidence`]): TCP once the flow reached the established table (a SYN-ACK came
//! back and the opener completed the handshake: a port that answers with an RST, a peer that
//! never answers and a half-open scan do not count), UDP, SCTP, other protocols and ICMP echo
//! once a packet came back the other way (an ICMP error about the flow is no answer). An
//! unanswered flow is counted, not recorded, and the suggestion says how many were left out.
//!
//! When flow events come: audit events always (rate limited by the datapath like drops); `FLOW`
//! events only while `TRACE_FLOWS` is on: while a monitor client listens, with `run
//! --record-flows`, and while any endpoint is in audit mode.

use std::collections::{HashMap, VecDeque};

use netpol_common::{
    ct::{CtEntry, CtKey4, CtKey6},
    event::FlowEvent,
    proto, Direction,
};

use super::state::Agent;
use crate::{
    datapath::{CtProbe, CtProbeKey, CtSeen},
    policy::{
        render,
        suggest::{self, FlowKey, FlowStats, Party, SuggestFormat},
    },
};

/// Flow classes the table holds.
pub const FLOW_TABLE_ENTRIES: usize = 4096;
/// New flows waiting for their answer.
pub const PENDING_ENTRIES: usize = 1024;
/// How long a new flow may wait for its answer (a local handshake takes milliseconds; a SYN
/// that is retransmitted is a new event).
pub const PENDING_SECS: u64 = 10;
/// How often waiting flows are checked in conntrack.
pub const CHECK_MS: u64 = 500;
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
    /// New flows that got no answer (left out).
    unanswered: u64,
    /// New flows not checked for an answer: too many were waiting.
    unchecked: u64,
}

/// A new flow waiting for its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pending {
    key: FlowKey,
    audit: bool,
    /// When its event came (unix seconds).
    at: u64,
}

/// What a flow's conntrack entry says about its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evidence {
    Answered,
    /// Not yet: ask again.
    Waiting,
    /// Never: refused, aborted, or no entry.
    Unanswered,
}

/// Whether the flow (of IP protocol `p`) whose conntrack entry is `seen` was answered; see the
/// module documentation.
pub fn evidence(p: u8, seen: &CtSeen) -> Evidence {
    let replied = |e: &CtEntry| e.flags & CtEntry::SEEN_REPLY != 0;
    match seen {
        CtSeen::Missing => Evidence::Unanswered,
        // TCP: the handshake was completed after a reply. Others: a reply came.
        CtSeen::Established(e) if p == proto::TCP || replied(e) => Evidence::Answered,
        CtSeen::Established(_) => Evidence::Waiting,
        CtSeen::New(e) if p == proto::TCP => {
            if e.is_closing() {
                // An RST (a closed port, or a scanner's RST after the SYN-ACK) or a FIN
                // before the handshake completed.
                Evidence::Unanswered
            } else {
                Evidence::Waiting
            }
        }
        CtSeen::New(e) if replied(e) => Evidence::Answered,
        CtSeen::New(_) => Evidence::Waiting,
    }
}

/// The endpoint's conntrack entry of the flow an event reports, as the datapath keys it; `None`
/// for what conntrack does not track (ICMP other than an echo request).
pub fn probe_of(ev: &FlowEvent) -> Option<CtProbe> {
    let dir = Direction::from_u8(ev.direction)?;
    // The ports the datapath keyed the entry with (`lxc.rs`): echo requests have the identifier
    // as source port and 0 as destination port; the event carries the type in `dport`.
    let (sport, dport) = match ev.proto {
        proto::TCP | proto::UDP | proto::SCTP => (ev.sport, ev.dport),
        proto::ICMP if ev.dport == 8 => (ev.sport, 0),
        proto::ICMPV6 if ev.dport == 128 => (ev.sport, 0),
        proto::ICMP | proto::ICMPV6 => return None,
        _ => (0, 0),
    };
    let key = match ev.family {
        4 => {
            let a4 = |a: &[u8; 16]| [a[0], a[1], a[2], a[3]];
            CtProbeKey::V4(CtKey4::of_packet(
                a4(&ev.saddr),
                a4(&ev.daddr),
                sport,
                dport,
                ev.proto,
                dir,
            ))
        }
        6 => CtProbeKey::V6(CtKey6::of_packet(
            ev.saddr, ev.daddr, sport, dport, ev.proto, dir,
        )),
        _ => return None,
    };
    Some(CtProbe {
        ifindex: ev.ifindex,
        key,
    })
}

#[derive(Debug)]
pub struct FlowTable {
    cap: usize,
    flows: HashMap<FlowKey, FlowStats>,
    pending: HashMap<CtProbe, Pending>,
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
    pub unanswered: u64,
    pub unchecked: u64,
}

impl FlowTable {
    pub fn new(cap: usize, now: u64) -> Self {
        Self {
            cap,
            flows: HashMap::with_capacity(cap.min(1024)),
            pending: HashMap::new(),
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

    /// Takes one event (flows and audits; anything else is ignored): the flow waits for its
    /// answer ([`FlowTable::settle`]).
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
        let Some(probe) = probe_of(ev) else {
            self.minute(now).unanswered += 1;
            return;
        };
        if self.pending.len() >= PENDING_ENTRIES && !self.pending.contains_key(&probe) {
            self.minute(now).unchecked += 1;
            return;
        }
        // A retransmitted SYN opens the same tuple again: one flow.
        self.pending.entry(probe).or_insert(Pending {
            key,
            audit,
            at: now,
        });
    }

    /// The conntrack entries of the flows waiting for their answer.
    pub fn probes(&self) -> Vec<CtProbe> {
        self.pending.keys().copied().collect()
    }

    /// Applies what conntrack said of waiting flows (`results`: from [`FlowTable::probes`]):
    /// answered ones are recorded, unanswered ones and those that waited [`PENDING_SECS`] are
    /// counted and dropped.
    pub fn settle(&mut self, results: &[(CtProbe, CtSeen)], now: u64) {
        for (probe, seen) in results {
            let Some(p) = self.pending.get(probe).copied() else {
                continue;
            };
            match evidence(p.key.proto, seen) {
                Evidence::Answered => {
                    self.pending.remove(probe);
                    self.add(p.key, p.audit, p.at);
                }
                Evidence::Waiting if now < p.at + PENDING_SECS => {}
                Evidence::Waiting | Evidence::Unanswered => {
                    self.pending.remove(probe);
                    self.minute(p.at).unanswered += 1;
                }
            }
        }
    }

    /// Records an answered flow seen at `now`.
    fn add(&mut self, key: FlowKey, audit: bool, now: u64) {
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
        let mut w = Window {
            flows,
            ..Window::default()
        };
        for m in self.minutes.iter().filter(|m| m.at >= since / 60) {
            w.missed += m.missed;
            w.suppressed += m.suppressed;
            w.unanswered += m.unanswered;
            w.unchecked += m.unchecked;
        }
        w
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }
}

/// Checks the waiting flows in conntrack every [`CHECK_MS`] (the lookups on a blocking thread,
/// without the table's lock).
pub fn spawn_checker(
    table: std::sync::Arc<std::sync::Mutex<FlowTable>>,
    ct: std::sync::Arc<crate::datapath::stats::PinnedCt>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(CHECK_MS));
        let mut warned = false;
        loop {
            tick.tick().await;
            match check_once(&table, &ct).await {
                Err(e) if !warned => {
                    tracing::warn!(error = %e, "policy suggest: conntrack cannot be read, flows are not recorded");
                    warned = true;
                }
                _ => {}
            }
        }
    });
}

/// One check of the waiting flows in conntrack (also right before a suggestion, so that a flow
/// answered just now is in it).
pub async fn check_once(
    table: &std::sync::Arc<std::sync::Mutex<FlowTable>>,
    ct: &std::sync::Arc<crate::datapath::stats::PinnedCt>,
) -> Result<(), crate::datapath::DatapathError> {
    let probes = match table.lock() {
        Ok(t) => t.probes(),
        Err(_) => return Ok(()),
    };
    if probes.is_empty() {
        return Ok(());
    }
    let ct = ct.clone();
    let results = tokio::task::spawn_blocking(move || {
        ct.lookup_all(&probes).map(|seen| {
            probes
                .into_iter()
                .zip(seen)
                .collect::<Vec<(CtProbe, CtSeen)>>()
        })
    })
    .await
    .map_err(|e| crate::datapath::DatapathError::Io(std::io::Error::other(e.to_string())))??;
    if let Ok(mut t) = table.lock() {
        t.settle(&results, now());
    }
    Ok(())
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
    if w.unchecked > 0 {
        head.push_str(&format!(
            "# INCOMPLETE: {} new flows were not checked for an answer ({PENDING_ENTRIES} were waiting already)\n",
            w.unchecked
        ));
    }
    if !table.pending.is_empty() {
        head.push_str(&format!(
            "# {} new flows are still waiting for an answer (up to {PENDING_SECS} s): not in this suggestion yet\n",
            table.pending.len()
        ));
    }
    if w.unanswered > 0 {
        head.push_str(&format!(
            "# left out: {} new flows that got no answer (a closed port, a scan, a peer that is down or drops them): only answered flows are suggested\n",
            w.unanswered
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
            family: 4,
            direction: Direction::Ingress as u8,
            ifindex: 7,
            src_identity: src,
            dst_identity: dst,
            sport: 40000 + dport,
            dport,
            saddr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            daddr: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ..FlowEvent::default()
        }
    }

    fn entry(flags: u32) -> CtEntry {
        CtEntry {
            flags,
            ifindex: 7,
            expires_ns: 1,
            ..CtEntry::default()
        }
    }

    /// Conntrack answers every waiting flow with `seen`.
    fn settle_all(t: &mut FlowTable, seen: CtSeen, now: u64) {
        let results: Vec<(CtProbe, CtSeen)> = t.probes().into_iter().map(|p| (p, seen)).collect();
        t.settle(&results, now);
    }

    /// Records `e` as a flow that was answered.
    fn answered(t: &mut FlowTable, e: &FlowEvent, now: u64) {
        t.record(e, now);
        settle_all(t, CtSeen::Established(entry(CtEntry::SEEN_REPLY)), now);
    }

    #[test]
    fn only_flows_that_were_answered_are_recorded() {
        let mut t = FlowTable::new(64, 1000);
        // A SYN scan of 100 ports: each answered by an RST (closed) or never.
        for port in 1..=100u16 {
            t.record(&ev(FlowEvent::KIND_AUDIT, 302, 300, port), 1000);
        }
        let refused = CtSeen::New(entry(CtEntry::SEEN_REPLY | CtEntry::CLOSING));
        let results: Vec<(CtProbe, CtSeen)> = t
            .probes()
            .into_iter()
            .map(|p| {
                let port = match p.key {
                    CtProbeKey::V4(k) => k.lport(),
                    CtProbeKey::V6(_) => unreachable!(),
                };
                let silent = CtSeen::New(entry(0));
                (p, if port % 2 == 0 { refused } else { silent })
            })
            .collect();
        t.settle(&results, 1001);
        assert_eq!(t.probes().len(), 50, "silent ones wait for an answer");
        t.settle(&results, 1000 + PENDING_SECS);
        assert!(t.probes().is_empty(), "then they are given up");
        // A half-open scan of a listening port: SYN-ACK, then the scanner's RST.
        t.record(&ev(FlowEvent::KIND_AUDIT, 302, 300, 5432), 1020);
        settle_all(&mut t, refused, 1020);
        // The real connection: established.
        answered(&mut t, &ev(FlowEvent::KIND_AUDIT, 301, 300, 5432), 1030);
        let w = t.window(0);
        assert_eq!(w.flows.len(), 1, "{:?}", w.flows);
        assert_eq!((w.flows[0].0.src, w.flows[0].0.dport), (301, 5432));
        assert_eq!(w.unanswered, 101);
    }

    #[test]
    fn evidence_of_an_answer_by_protocol() {
        use Evidence::*;
        let (new, est) = (CtSeen::New, CtSeen::Established);
        let r = CtEntry::SEEN_REPLY;
        let cases = [
            (proto::TCP, CtSeen::Missing, Unanswered),
            (proto::TCP, new(entry(0)), Waiting),
            (proto::TCP, new(entry(r)), Waiting), // SYN-ACK: the ACK comes next
            (proto::TCP, new(entry(r | CtEntry::CLOSING)), Unanswered),
            (proto::TCP, new(entry(CtEntry::FIN_ORIG)), Unanswered),
            (proto::TCP, est(entry(r)), Answered),
            (proto::TCP, est(entry(r | CtEntry::CLOSING)), Answered), // a short connection
            (proto::UDP, new(entry(0)), Waiting),
            (proto::UDP, new(entry(r)), Answered),
            (proto::UDP, est(entry(r)), Answered),
            (proto::ICMP, new(entry(r)), Answered),
            (47, new(entry(0)), Waiting),
        ];
        for (p, seen, want) in cases {
            assert_eq!(evidence(p, &seen), want, "{p} {seen:?}");
        }
    }

    #[test]
    fn probes_are_the_datapaths_conntrack_keys() {
        // Ingress on the server's veth: the key is the server's side first.
        let e = ev(FlowEvent::KIND_FLOW, 301, 300, 5432);
        let p = probe_of(&e).expect("tracked");
        assert_eq!(p.ifindex, 7);
        assert_eq!(
            p.key,
            CtProbeKey::V4(CtKey4::new(
                [10, 0, 0, 2],
                [10, 0, 0, 1],
                5432,
                45432,
                proto::TCP
            ))
        );
        // Egress on the client's veth.
        let mut out = e;
        out.direction = Direction::Egress as u8;
        assert_eq!(
            probe_of(&out).map(|p| p.key),
            Some(CtProbeKey::V4(CtKey4::new(
                [10, 0, 0, 1],
                [10, 0, 0, 2],
                45432,
                5432,
                proto::TCP
            )))
        );
        // An echo request: the identifier, and 0 for the type the event carries.
        let mut ping = e;
        ping.proto = proto::ICMP;
        ping.sport = 77;
        ping.dport = 8;
        assert_eq!(
            probe_of(&ping).map(|p| p.key),
            Some(CtProbeKey::V4(CtKey4::new(
                [10, 0, 0, 2],
                [10, 0, 0, 1],
                0,
                77,
                proto::ICMP
            )))
        );
        // Other ICMP is not tracked: never answered.
        ping.dport = 13;
        assert_eq!(probe_of(&ping), None);
        let mut t = FlowTable::new(8, 0);
        t.record(&ping, 0);
        assert_eq!((t.probes().len(), t.window(0).unanswered), (0, 1));
    }

    #[test]
    fn flows_and_audits_are_counted_per_class_drops_never() {
        let mut t = FlowTable::new(16, 1000);
        answered(&mut t, &ev(FlowEvent::KIND_FLOW, 300, 301, 5432), 1000);
        answered(&mut t, &ev(FlowEvent::KIND_AUDIT, 300, 301, 5432), 1010);
        answered(&mut t, &ev(FlowEvent::KIND_DROP, 300, 301, 22), 1010);
        answered(&mut t, &ev(FlowEvent::KIND_AUDIT, 1, 301, 80), 1020);
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
            answered(&mut t, &ev(FlowEvent::KIND_AUDIT, 2, 301, port), 6000);
        }
        assert_eq!(t.len(), 64);
        // Known classes still count.
        answered(&mut t, &ev(FlowEvent::KIND_AUDIT, 2, 301, 1), 6001);
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
            answered(
                &mut t,
                &ev(FlowEvent::KIND_AUDIT, 2, 301, 9999),
                6000 + m * 60,
            );
        }
        assert_eq!(t.minutes.len(), WINDOW_MINUTES);
        // Flows waiting for their answer are bounded too.
        for port in 1..=5000u16 {
            t.record(&ev(FlowEvent::KIND_AUDIT, 3, 301, port), 7000);
        }
        assert_eq!(t.probes().len(), PENDING_ENTRIES);
        assert_eq!(t.window(7000).unchecked, 5000 - PENDING_ENTRIES as u64);
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
