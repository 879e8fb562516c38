//! `monitor`: reads `EVENTS` from the ring buffer and streams them, labelled with container and
//! identity names, to every connected client, and records flows for `policy suggest`
//! ([`super::flows`]). Flow events are switched on in the datapath while at least one client
//! listens, and while flows are recorded (`run --record-flows`).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use aya::maps::{MapData, RingBuf};
use netpol_common::{event::FlowEvent, maps, proto, Direction, DropReason};
use tokio::{
    io::unix::AsyncFd,
    io::AsyncWriteExt,
    net::unix::OwnedWriteHalf,
    sync::{broadcast, Mutex},
};
use tracing::warn;

use super::{
    api::MonitorEvent,
    flows::{self, FlowTable, FLOW_TABLE_ENTRIES},
    state::Agent,
};
use crate::datapath::kernel::KernelDatapath;

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("EVENTS map missing from the object")]
    Missing,
    #[error("EVENTS: {0}")]
    Map(#[from] aya::maps::MapError),
}

pub fn take_ring(dp: &mut KernelDatapath) -> Result<RingBuf<MapData>, MonitorError> {
    let map = dp
        .ebpf_mut()
        .take_map(maps::EVENTS)
        .ok_or(MonitorError::Missing)?;
    Ok(RingBuf::try_from(map)?)
}

/// Events a slow `monitor` client may fall behind by before it misses some.
const MONITOR_BUFFER: usize = 4096;

#[derive(Clone)]
pub struct Monitor {
    /// To the clients of `monitor`, only while one listens: the channel's ring is allocated
    /// whole (4096 events, 350 KB), and an agent nobody watches should not keep it.
    tx: Arc<std::sync::Mutex<Option<broadcast::Sender<FlowEvent>>>>,
    listeners: Arc<AtomicUsize>,
    agent: Arc<Mutex<Agent>>,
    flows: Arc<std::sync::Mutex<FlowTable>>,
    /// Where waiting flows are checked (set by [`Monitor::spawn_reader`]).
    ct: Arc<std::sync::OnceLock<Arc<crate::datapath::stats::PinnedCt>>>,
}

fn proto_name(p: u8) -> String {
    match p {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        proto::SCTP => "SCTP".into(),
        proto::ICMP => "ICMP".into(),
        proto::ICMPV6 => "ICMPv6".into(),
        n => n.to_string(),
    }
}

fn addr(family: u8, a: [u8; 16]) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(a))
    }
}

impl Monitor {
    pub fn new(agent: Arc<Mutex<Agent>>) -> Self {
        Self {
            tx: Arc::default(),
            listeners: Arc::new(AtomicUsize::new(0)),
            agent,
            flows: Arc::new(std::sync::Mutex::new(FlowTable::new(
                FLOW_TABLE_ENTRIES,
                flows::now(),
            ))),
            ct: Arc::new(std::sync::OnceLock::new()),
        }
    }

    /// Checks the flows waiting for their answer now (before a suggestion).
    pub async fn check_flows(&self) {
        if let Some(ct) = self.ct.get() {
            if let Err(e) = flows::check_once(&self.flows, ct).await {
                warn!(error = %e, "policy suggest: conntrack cannot be read");
            }
        }
    }

    /// `run --record-flows`: flow events stay on whether or not a client listens.
    pub async fn record_flows(&self) {
        if let Ok(mut t) = self.flows.lock() {
            t.always = true;
        }
        self.agent.lock().await.set_trace_flows(true);
    }

    fn recording(&self) -> bool {
        self.flows.lock().is_ok_and(|t| t.always)
    }

    pub fn with_flows<T>(&self, f: impl FnOnce(&FlowTable) -> T) -> T {
        let t = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        f(&t)
    }

    /// Reads `EVENTS`; flows wait for their answer in `ct` (see [`flows`]).
    pub fn spawn_reader(&self, ring: RingBuf<MapData>, ct: crate::datapath::stats::PinnedCt) {
        let tx = self.tx.clone();
        let table = self.flows.clone();
        flows::spawn_sampler(self.flows.clone(), self.agent.clone());
        let ct = Arc::new(ct);
        let _ = self.ct.set(ct.clone());
        flows::spawn_checker(self.flows.clone(), ct);
        tokio::spawn(async move {
            // The ring buffer owns its map fd for as long as the AsyncFd lives.
            #[allow(deprecated)]
            let fd = AsyncFd::new(ring);
            let mut fd = match fd {
                Ok(fd) => fd,
                Err(e) => {
                    warn!(error = %e, "monitor: cannot poll EVENTS");
                    return;
                }
            };
            loop {
                let mut guard = match fd.readable_mut().await {
                    Ok(g) => g,
                    Err(e) => {
                        warn!(error = %e, "monitor: polling EVENTS");
                        return;
                    }
                };
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if item.len() >= size_of::<FlowEvent>() {
                        // SAFETY: FlowEvent is plain old data; the length was checked.
                        let ev: FlowEvent =
                            unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                        if let Ok(mut t) = table.lock() {
                            t.record(&ev, flows::now());
                        }
                        if let Some(tx) = tx.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                            let _ = tx.send(ev);
                        }
                    }
                }
                guard.clear_ready();
            }
        });
    }

    async fn describe(&self, e: &FlowEvent) -> MonitorEvent {
        let a = self.agent.lock().await;
        let endpoint = a
            .names
            .get(&e.ifindex)
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| format!("if{}", e.ifindex));
        let dir = match Direction::from_u8(e.direction) {
            Some(Direction::Ingress) => Direction::Ingress,
            _ => Direction::Egress,
        };
        let dropped = e.kind == FlowEvent::KIND_DROP || e.kind == FlowEvent::KIND_AUDIT;
        let reason = DropReason::from_u8(e.reason);
        let info = if e.rule == 0 {
            None
        } else {
            a.rule_info(e.rule)
        };
        let local = match dir {
            Direction::Ingress => e.dst_identity,
            Direction::Egress => e.src_identity,
        };
        // A default deny has no rule: its cause is the policies that put the local identity's
        // direction into default deny.
        let default_deny_by = if dropped && reason == Some(DropReason::PolicyDenied) {
            a.default_deny_by(local, dir)
        } else {
            Vec::new()
        };
        // A flow no rule decided, in a direction policy does not enforce.
        let not_enforced =
            e.kind == FlowEvent::KIND_FLOW && e.rule == 0 && a.enforces(local, dir) == Some(false);
        MonitorEvent {
            kind: match e.kind {
                FlowEvent::KIND_DROP => "drop".into(),
                FlowEvent::KIND_AUDIT => "audit".into(),
                _ => "flow".into(),
            },
            reason: dropped.then(|| reason.map_or(e.reason.to_string(), |r| r.as_str().to_owned())),
            ifindex: e.ifindex,
            direction: match dir {
                Direction::Ingress => "ingress".into(),
                Direction::Egress => "egress".into(),
            },
            protocol: proto_name(e.proto),
            src: addr(e.family, e.saddr).to_string(),
            dst: addr(e.family, e.daddr).to_string(),
            sport: e.sport,
            dport: e.dport,
            src_identity: e.src_identity,
            dst_identity: e.dst_identity,
            src_name: a.identity_name(e.src_identity),
            dst_name: a.identity_name(e.dst_identity),
            endpoint,
            rule: info.as_ref().map(|r| r.to_string()),
            policy: info.as_ref().map(|r| r.policy.clone()),
            section: info.map(|r| r.section),
            default_deny_by,
            not_enforced,
        }
    }

    /// Streams events to one client until it goes away.
    pub async fn stream(
        &self,
        mut w: OwnedWriteHalf,
        filter: super::monitor_filter::MonitorFilter,
    ) -> std::io::Result<()> {
        let mut rx = self
            .tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| broadcast::channel(MONITOR_BUFFER).0)
            .subscribe();
        if self.listeners.fetch_add(1, Ordering::SeqCst) == 0 {
            self.agent.lock().await.set_trace_flows(true);
        }
        let result = async {
            loop {
                let ev = match rx.recv().await {
                    Ok(ev) => ev,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        warn!(missed = n, "monitor client too slow");
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                };
                let m = self.describe(&ev).await;
                if !filter.is_empty() && !filter.matches(&m, &*self.agent.lock().await) {
                    continue;
                }
                let mut line = serde_json::to_vec(&m).unwrap_or_default();
                line.push(b'\n');
                w.write_all(&line).await?;
            }
        }
        .await;
        drop(rx);
        {
            // The last client gone: the ring goes with it (subscribing happens under this lock).
            let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
            if tx.as_ref().is_some_and(|t| t.receiver_count() == 0) {
                *tx = None;
            }
        }
        if self.listeners.fetch_sub(1, Ordering::SeqCst) == 1 && !self.recording() {
            self.agent.lock().await.set_trace_flows(false);
        }
        result
    }
}
