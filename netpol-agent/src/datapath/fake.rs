//! An in-memory [`Datapath`] for tests of everything above the kernel.

use std::{collections::BTreeSet, net::IpAddr};

use netpol_common::{endpoint::Endpoint, ipcache::RemoteInfo, policy::PolicyValue};

use super::{
    Cidr, Datapath, DatapathError, DropCounters, MapSizes, MapState, PolicyEntryKey, RuleCounters,
};

#[derive(Debug, Default)]
pub struct FakeDatapath {
    pub state: MapState,
    pub links: BTreeSet<u32>,
    pub sizes: MapSizes,
    pub trace_flows: bool,
    /// Number of write operations performed (upserts, deletes, attach, detach).
    pub writes: usize,
    /// When set, the write after the next n writes fails, once (to test whole-or-nothing application).
    pub fail_after: Option<usize>,
    /// Every `flush_ct` call, in order.
    pub flushed: Vec<BTreeSet<IpAddr>>,
    /// `RULE_STATS`, shared with the test that made the datapath.
    pub rule_stats: std::sync::Arc<std::sync::Mutex<RuleCounters>>,
    /// When set, reading the maps ([`Datapath::current`]) fails.
    pub fail_reads: bool,
    /// As `fail_after`, set by the test that made the datapath after it moved into an agent.
    pub fail_after_shared: std::sync::Arc<std::sync::Mutex<Option<usize>>>,
}

impl FakeDatapath {
    pub fn new(sizes: MapSizes) -> Self {
        Self {
            sizes,
            ..Self::default()
        }
    }

    fn write(&mut self) -> Result<(), DatapathError> {
        self.writes += 1;
        let mut shared = self
            .fail_after_shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = shared.as_mut() {
            if *n == 0 {
                *shared = None;
                return Err(DatapathError::Io(std::io::Error::other("injected failure")));
            }
            *n -= 1;
        }
        drop(shared);
        if let Some(n) = self.fail_after.as_mut() {
            if *n == 0 {
                self.fail_after = None;
                return Err(DatapathError::Io(std::io::Error::other("injected failure")));
            }
            *n -= 1;
        }
        Ok(())
    }

    fn check_room(len: usize, max: u32, map: &'static str) -> Result<(), DatapathError> {
        if len >= max as usize {
            return Err(DatapathError::MapFull { map, max });
        }
        Ok(())
    }
}

impl Datapath for FakeDatapath {
    fn sizes(&self) -> MapSizes {
        self.sizes
    }

    fn upsert_endpoint(&mut self, ifindex: u32, ep: Endpoint) -> Result<(), DatapathError> {
        self.write()?;
        if !self.state.endpoints.contains_key(&ifindex) {
            Self::check_room(
                self.state.endpoints.len(),
                self.sizes.endpoints,
                "ENDPOINTS",
            )?;
        }
        self.state.endpoints.insert(ifindex, ep);
        Ok(())
    }

    fn delete_endpoint(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        self.write()?;
        self.state.endpoints.remove(&ifindex);
        Ok(())
    }

    fn upsert_ipcache(&mut self, cidr: Cidr, info: RemoteInfo) -> Result<(), DatapathError> {
        self.write()?;
        if !self.state.ipcache.contains_key(&cidr) {
            let (n, max, map) = if cidr.addr.is_ipv4() {
                (
                    self.state
                        .ipcache
                        .keys()
                        .filter(|c| c.addr.is_ipv4())
                        .count(),
                    self.sizes.ipcache4,
                    netpol_common::maps::IPCACHE4,
                )
            } else {
                (
                    self.state
                        .ipcache
                        .keys()
                        .filter(|c| c.addr.is_ipv6())
                        .count(),
                    self.sizes.ipcache6,
                    netpol_common::maps::IPCACHE6,
                )
            };
            Self::check_room(n, max, map)?;
        }
        self.state.ipcache.insert(cidr, info);
        Ok(())
    }

    fn delete_ipcache(&mut self, cidr: Cidr) -> Result<(), DatapathError> {
        self.write()?;
        self.state.ipcache.remove(&cidr);
        Ok(())
    }

    fn upsert_policy(
        &mut self,
        key: PolicyEntryKey,
        value: PolicyValue,
    ) -> Result<(), DatapathError> {
        self.write()?;
        if !self.state.policy.contains_key(&key) {
            Self::check_room(self.state.policy.len(), self.sizes.policy, "POLICY")?;
        }
        self.state.policy.insert(key, value);
        Ok(())
    }

    fn delete_policy(&mut self, key: PolicyEntryKey) -> Result<(), DatapathError> {
        self.write()?;
        self.state.policy.remove(&key);
        Ok(())
    }

    fn attach(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        self.write()?;
        self.links.insert(ifindex);
        Ok(())
    }

    fn detach(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        self.write()?;
        self.links.remove(&ifindex);
        Ok(())
    }

    fn attached(&self) -> Result<Vec<u32>, DatapathError> {
        Ok(self.links.iter().copied().collect())
    }

    fn flush_ct(&mut self, addrs: &BTreeSet<IpAddr>) -> Result<usize, DatapathError> {
        self.write()?;
        self.flushed.push(addrs.clone());
        Ok(0)
    }

    fn current(&self) -> Result<MapState, DatapathError> {
        if self.fail_reads {
            return Err(DatapathError::Io(std::io::Error::other(
                "injected read failure",
            )));
        }
        Ok(self.state.clone())
    }

    fn drop_counters(&self) -> Result<DropCounters, DatapathError> {
        Ok(DropCounters::new())
    }

    fn set_trace_flows(&mut self, on: bool) -> Result<(), DatapathError> {
        self.trace_flows = on;
        Ok(())
    }

    fn rule_counters(&self) -> Result<RuleCounters, DatapathError> {
        Ok(self
            .rule_stats
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default())
    }

    fn prune_rule_counters(&mut self, keep: &dyn Fn(u32) -> bool) -> Result<usize, DatapathError> {
        let mut m = self
            .rule_stats
            .lock()
            .map_err(|_| DatapathError::Io(std::io::Error::other("poisoned")))?;
        let before = m.len();
        m.retain(|k, _| k.rule == 0 || keep(k.rule));
        Ok(before - m.len())
    }

    fn set_event_rate(&mut self, _rate: u32) -> Result<(), DatapathError> {
        Ok(())
    }
}
