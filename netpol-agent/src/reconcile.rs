//! Desired state against the maps, as a diff, applied whole or not at all.
//!
//! [`plan`] compares what the maps hold with what they should hold; [`apply`] first checks that
//! the result fits the configured map sizes (a change that does not fit is refused and nothing is
//! written), then writes in an order that never opens a window for denied traffic and never
//! breaks allowed traffic that stays allowed:
//! 1. new ipcache entries (addresses resolve to their identities before anything relies on them),
//! 2. new and changed policy entries (allows exist before enforcement starts),
//! 3. endpoints (enforcement flags, identities),
//! 4. attach to new interfaces (their endpoint entry is in place first),
//! 5. removal of stale policy entries, ipcache entries, endpoints; detach of gone interfaces;
//! 6. removal of the conntrack entries of every container address whose endpoint went or changed
//!    (identity, veth or bridge): the next holder of the address starts from policy. The
//!    datapath already refuses such entries to another endpoint (`CtEntry::serves`); this
//!    also frees them, and ends flows towards the departed address that other endpoints
//!    opened. It is not undone, and a failure is logged, not fatal: the kernel check stands.
//!
//! The conntrack entries that audit mode admitted (`CtEntry::AUDIT`) are left alone when an
//! endpoint direction leaves audit mode (its endpoint entry loses the `AUDIT_*` bit in 3; a
//! restart without `--audit` is the same diff against the pinned maps): from then on the
//! datapath decides such a flow again by policy on its next packet, either way, and keeps a
//! denied flow's entry to drop the rest of it (netpol-common `ct::revisit`). Removing the entry
//! would undo that: the next packet from the container's side, through a direction it does not
//! enforce (a retransmission is enough), would open the flow as a new one, and the peer's
//! packets would pass as its replies.
//!
//! When old and new entries together do not fit a map, stale entries of that map are removed
//! before new ones are written. If a write fails half-way, the operations already done are undone
//! (best effort, reported), so the maps go back to the old state.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use netpol_common::{endpoint::Endpoint, ipcache::RemoteInfo, policy::PolicyValue};
use tracing::{error, info, warn};

use crate::datapath::{Cidr, Datapath, DatapathError, MapSizes, MapState, PolicyEntryKey};

/// The full desired state: map contents plus the interfaces to attach to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub maps: MapState,
    pub attached: BTreeSet<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    UpsertIpcache(Cidr, RemoteInfo),
    DeleteIpcache(Cidr),
    UpsertPolicy(PolicyEntryKey, PolicyValue),
    DeletePolicy(PolicyEntryKey),
    UpsertEndpoint(u32, Endpoint),
    DeleteEndpoint(u32),
    Attach(u32),
    Detach(u32),
    FlushCt(BTreeSet<IpAddr>),
}

/// The operations that turn the current state into the desired one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    ops: Vec<Op>,
    /// What to write back for each op if it has to be undone.
    undo: Vec<Option<Op>>,
    /// Policy entries of either side compared to find the policy ops.
    compared_policy: usize,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Policy entries (current and desired) compared to make this plan.
    pub fn compared_policy(&self) -> usize {
        self.compared_policy
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("{map} would need {need} entries but holds at most {max}: change refused, nothing was written")]
    DoesNotFit {
        map: &'static str,
        need: usize,
        max: u32,
    },
    #[error("applying the change failed ({source}); {undone} of {done} operations were undone")]
    Failed {
        source: DatapathError,
        done: usize,
        undone: usize,
    },
    #[error("reading the current state: {0}")]
    Read(DatapathError),
}

/// Upserts (key, value, former value) and deletes (key, former value).
type Diff<K, V> = (Vec<(K, V, Option<V>)>, Vec<(K, V)>);

fn diff<K: Ord + Clone, V: PartialEq + Clone>(
    cur: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
) -> Diff<K, V> {
    let upserts = want
        .iter()
        .filter(|(k, v)| cur.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone(), cur.get(k).cloned()))
        .collect();
    let deletes = cur
        .iter()
        .filter(|(k, _)| !want.contains_key(*k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    (upserts, deletes)
}

/// Checks that every map can hold the desired state.
pub fn check_fit(want: Want<'_>, sizes: &MapSizes) -> Result<(), ReconcileError> {
    let v4 = want.ipcache.keys().filter(|c| c.addr.is_ipv4()).count();
    let v6 = want.ipcache.len() - v4;
    for (map, need, max) in [
        ("ENDPOINTS", want.endpoints.len(), sizes.endpoints),
        (netpol_common::maps::IPCACHE4, v4, sizes.ipcache4),
        (netpol_common::maps::IPCACHE6, v6, sizes.ipcache6),
        ("POLICY", want.policy.len(), sizes.policy),
    ] {
        if need > max as usize {
            return Err(ReconcileError::DoesNotFit { map, need, max });
        }
    }
    Ok(())
}

/// The desired state by reference: the agent keeps its parts in different places (the compile
/// owns the policy entries), and a reconcile must not copy them.
#[derive(Clone, Copy, Debug)]
pub struct Want<'a> {
    pub ipcache: &'a BTreeMap<Cidr, RemoteInfo>,
    pub endpoints: &'a BTreeMap<u32, Endpoint>,
    pub policy: &'a BTreeMap<PolicyEntryKey, PolicyValue>,
    pub attached: &'a BTreeSet<u32>,
}

impl Desired {
    pub fn want(&self) -> Want<'_> {
        Want {
            ipcache: &self.maps.ipcache,
            endpoints: &self.maps.endpoints,
            policy: &self.maps.policy,
            attached: &self.attached,
        }
    }
}

/// Which policy entries a reconcile compares: all of them, or only those of some local
/// identities (the caller vouches that no other entry differs from the state last written).
#[derive(Clone, Copy, Debug)]
pub enum PolicyScope<'a> {
    All,
    Locals(&'a BTreeSet<u32>),
}

/// [`diff`] of the policy entries in scope, in key order (the order of a full diff).
fn diff_policy(
    cur: &BTreeMap<PolicyEntryKey, PolicyValue>,
    want: &BTreeMap<PolicyEntryKey, PolicyValue>,
    scope: PolicyScope<'_>,
) -> Diff<PolicyEntryKey, PolicyValue> {
    let locals = match scope {
        PolicyScope::All => return diff(cur, want),
        PolicyScope::Locals(l) => l,
    };
    let (mut ups, mut dels) = (Vec::new(), Vec::new());
    for &local in locals {
        for (k, v) in PolicyEntryKey::entries_of(want, local) {
            let old = cur.get(k);
            if old != Some(v) {
                ups.push((*k, *v, old.copied()));
            }
        }
        for (k, v) in PolicyEntryKey::entries_of(cur, local) {
            if !want.contains_key(k) {
                dels.push((*k, *v));
            }
        }
    }
    (ups, dels)
}

/// Computes the operations from `cur` (maps and attached interfaces) to `want`.
pub fn plan(
    cur: &MapState,
    cur_attached: &BTreeSet<u32>,
    want: &Desired,
    sizes: &MapSizes,
) -> Plan {
    plan_scoped(cur, cur_attached, want.want(), PolicyScope::All, sizes)
}

/// [`plan`], comparing only the policy entries in `scope` (ipcache, endpoints and attachments,
/// which grow with the containers, not with the rules, are compared whole). The same plan as
/// [`plan`] when no entry outside `scope` differs.
pub fn plan_scoped(
    cur: &MapState,
    cur_attached: &BTreeSet<u32>,
    want: Want<'_>,
    scope: PolicyScope<'_>,
    sizes: &MapSizes,
) -> Plan {
    let mut p = Plan::default();
    let mut push = |op: Op, undo: Option<Op>| {
        p.ops.push(op);
        p.undo.push(undo);
    };
    let (ip_up, ip_del) = diff(&cur.ipcache, want.ipcache);
    let (pol_up, pol_del) = diff_policy(&cur.policy, want.policy, scope);
    let (ep_up, ep_del) = diff(&cur.endpoints, want.endpoints);
    let compared_policy = match scope {
        PolicyScope::All => cur.policy.len() + want.policy.len(),
        PolicyScope::Locals(locals) => locals
            .iter()
            .map(|&l| {
                PolicyEntryKey::entries_of(&cur.policy, l).count()
                    + PolicyEntryKey::entries_of(want.policy, l).count()
            })
            .sum(),
    };
    // Where old ∪ new would overflow a map, remove stale entries of that map first.
    let union = |cur: usize, new: usize| cur + new;
    let v4_new = ip_up
        .iter()
        .filter(|(c, _, old)| c.addr.is_ipv4() && old.is_none())
        .count();
    let v6_new = ip_up
        .iter()
        .filter(|(c, _, old)| c.addr.is_ipv6() && old.is_none())
        .count();
    let v4_cur = cur.ipcache.keys().filter(|c| c.addr.is_ipv4()).count();
    let ip_first = union(v4_cur, v4_new) > sizes.ipcache4 as usize
        || union(cur.ipcache.len() - v4_cur, v6_new) > sizes.ipcache6 as usize;
    let pol_new = pol_up.iter().filter(|(_, _, old)| old.is_none()).count();
    let pol_first = union(cur.policy.len(), pol_new) > sizes.policy as usize;
    let ep_new = ep_up.iter().filter(|(_, _, old)| old.is_none()).count();
    let ep_first = union(cur.endpoints.len(), ep_new) > sizes.endpoints as usize;

    if ip_first {
        for (c, id) in &ip_del {
            push(Op::DeleteIpcache(*c), Some(Op::UpsertIpcache(*c, *id)));
        }
    }
    for (c, id, old) in &ip_up {
        push(
            Op::UpsertIpcache(*c, *id),
            Some(old.map_or(Op::DeleteIpcache(*c), |o| Op::UpsertIpcache(*c, o))),
        );
    }
    if pol_first {
        for (k, v) in &pol_del {
            push(Op::DeletePolicy(*k), Some(Op::UpsertPolicy(*k, *v)));
        }
    }
    for (k, v, old) in &pol_up {
        push(
            Op::UpsertPolicy(*k, *v),
            Some(old.map_or(Op::DeletePolicy(*k), |o| Op::UpsertPolicy(*k, o))),
        );
    }
    if ep_first {
        for (i, e) in &ep_del {
            push(Op::DeleteEndpoint(*i), Some(Op::UpsertEndpoint(*i, *e)));
        }
    }
    for (i, e, old) in &ep_up {
        push(
            Op::UpsertEndpoint(*i, *e),
            Some(old.map_or(Op::DeleteEndpoint(*i), |o| Op::UpsertEndpoint(*i, o))),
        );
    }
    for i in want.attached.difference(cur_attached) {
        push(Op::Attach(*i), Some(Op::Detach(*i)));
    }
    if !pol_first {
        for (k, v) in &pol_del {
            push(Op::DeletePolicy(*k), Some(Op::UpsertPolicy(*k, *v)));
        }
    }
    if !ip_first {
        for (c, id) in &ip_del {
            push(Op::DeleteIpcache(*c), Some(Op::UpsertIpcache(*c, *id)));
        }
    }
    // Detach before the endpoint entry goes: a veth must never run the programs without its entry
    // in a state that would pass traffic it should not (a missing entry passes).
    for i in cur_attached.difference(want.attached) {
        // Re-attaching on undo would need the interface to still exist; detach is not undone.
        push(Op::Detach(*i), None);
    }
    if !ep_first {
        for (i, e) in &ep_del {
            push(Op::DeleteEndpoint(*i), Some(Op::UpsertEndpoint(*i, *e)));
        }
    }
    let departed = departed_addresses(&cur.ipcache, want.ipcache);
    if !departed.is_empty() {
        push(Op::FlushCt(departed), None);
    }
    p.compared_policy = compared_policy;
    p
}

/// Container addresses (ipcache entries with a veth) that are gone from `want` or whose entry
/// changed: their conntrack entries belong to an endpoint that no longer holds them.
fn departed_addresses(
    cur: &BTreeMap<Cidr, RemoteInfo>,
    want: &BTreeMap<Cidr, RemoteInfo>,
) -> BTreeSet<IpAddr> {
    cur.iter()
        .filter(|(c, v)| v.ifindex != 0 && want.get(*c) != Some(*v))
        .map(|(c, _)| c.addr)
        .collect()
}

fn run(dp: &mut dyn Datapath, op: &Op) -> Result<(), DatapathError> {
    match op {
        Op::UpsertIpcache(c, id) => dp.upsert_ipcache(*c, *id),
        Op::DeleteIpcache(c) => dp.delete_ipcache(*c),
        Op::UpsertPolicy(k, v) => dp.upsert_policy(*k, *v),
        Op::DeletePolicy(k) => dp.delete_policy(*k),
        Op::UpsertEndpoint(i, e) => dp.upsert_endpoint(*i, *e),
        Op::DeleteEndpoint(i) => dp.delete_endpoint(*i),
        Op::Attach(i) => dp.attach(*i),
        Op::Detach(i) => match dp.detach(*i) {
            Err(DatapathError::NoSuchInterface(_)) => Ok(()),
            r => r,
        },
        Op::FlushCt(addrs) => {
            match dp.flush_ct(addrs) {
                Ok(n) => {
                    info!(addresses = ?addrs, entries = n, "conntrack of departed endpoints removed")
                }
                Err(e) => {
                    error!(addresses = ?addrs, error = %e, "removing conntrack of departed endpoints failed; the datapath still refuses their entries to other endpoints")
                }
            }
            Ok(())
        }
    }
}

/// Brings the datapath to `want`: reads the current state, checks the fit, applies the diff.
/// Returns the number of operations performed.
pub fn reconcile(dp: &mut dyn Datapath, want: &Desired) -> Result<usize, ReconcileError> {
    Reconciler::new().reconcile(dp, want)
}

/// Reconciles against the state it last wrote, instead of reading every map back on each change:
/// the agent is the maps' only writer. The first call (and any call after a failure) reads the
/// kernel's state, so an adopted datapath is diffed against what it really holds.
#[derive(Debug, Default)]
pub struct Reconciler {
    last: Option<(MapState, BTreeSet<u32>)>,
    /// [`Plan::compared_policy`] of the last reconcile.
    compared_policy: usize,
}

impl Reconciler {
    pub fn new() -> Self {
        Self::default()
    }

    /// The state the maps hold: the one last written, or read from the kernel.
    pub fn current(&mut self, dp: &mut dyn Datapath) -> Result<MapState, ReconcileError> {
        match &self.last {
            Some((m, _)) => Ok(m.clone()),
            None => dp.current().map_err(ReconcileError::Read),
        }
    }

    /// Forgets the cached state: the next reconcile reads the maps.
    pub fn invalidate(&mut self) {
        self.last = None;
    }

    pub fn reconcile(
        &mut self,
        dp: &mut dyn Datapath,
        want: &Desired,
    ) -> Result<usize, ReconcileError> {
        self.reconcile_scoped(dp, want.want(), PolicyScope::All)
    }

    /// [`Self::reconcile`], comparing only the policy entries in `scope` with the state last
    /// written (see [`plan_scoped`]): the caller vouches that no other policy entry of `want`
    /// differs from the `want` of the last successful call. Without a state last written (the
    /// first call, or after a failure) every entry is compared with what the kernel holds. What
    /// was written is recorded by replaying the plan on the state last written, so nothing the
    /// size of the desired state is copied.
    pub fn reconcile_scoped(
        &mut self,
        dp: &mut dyn Datapath,
        want: Want<'_>,
        scope: PolicyScope<'_>,
    ) -> Result<usize, ReconcileError> {
        let sizes = dp.sizes();
        check_fit(want, &sizes)?;
        let (mut cur, mut attached, scope) = match self.last.take() {
            Some((cur, attached)) => (cur, attached, scope),
            None => (
                dp.current().map_err(ReconcileError::Read)?,
                dp.attached()
                    .map_err(ReconcileError::Read)?
                    .into_iter()
                    .collect(),
                PolicyScope::All,
            ),
        };
        let p = plan_scoped(&cur, &attached, want, scope, &sizes);
        self.compared_policy = p.compared_policy;
        match apply(dp, &p) {
            Ok(()) => {
                record(&mut cur, &mut attached, &p);
                self.last = Some((cur, attached));
                Ok(p.len())
            }
            Err(e) => {
                // Undo is best effort: read the truth next time.
                self.last = None;
                Err(e)
            }
        }
    }

    /// Policy entries (current and desired) the last reconcile compared.
    pub fn compared_policy(&self) -> usize {
        self.compared_policy
    }

    /// The state last written and its attached interfaces (`None` until the first success and
    /// after a failure).
    #[cfg(test)]
    pub(crate) fn last(&self) -> Option<&(MapState, BTreeSet<u32>)> {
        self.last.as_ref()
    }
}

/// What `p`, applied, made of `state` and `attached`.
fn record(state: &mut MapState, attached: &mut BTreeSet<u32>, p: &Plan) {
    for op in &p.ops {
        match op {
            Op::UpsertIpcache(c, v) => {
                state.ipcache.insert(*c, *v);
            }
            Op::DeleteIpcache(c) => {
                state.ipcache.remove(c);
            }
            Op::UpsertPolicy(k, v) => {
                state.policy.insert(*k, *v);
            }
            Op::DeletePolicy(k) => {
                state.policy.remove(k);
            }
            Op::UpsertEndpoint(i, e) => {
                state.endpoints.insert(*i, *e);
            }
            Op::DeleteEndpoint(i) => {
                state.endpoints.remove(i);
            }
            Op::Attach(i) => {
                attached.insert(*i);
            }
            Op::Detach(i) => {
                attached.remove(i);
            }
            Op::FlushCt(_) => {}
        }
    }
}

/// Applies a plan; on failure undoes what was done, newest first.
pub fn apply(dp: &mut dyn Datapath, p: &Plan) -> Result<(), ReconcileError> {
    for (n, op) in p.ops.iter().enumerate() {
        if let Err(source) = run(dp, op) {
            error!(?op, error = %source, "datapath write failed; undoing the change");
            let mut undone = 0;
            for u in p.undo[..n].iter().rev().flatten() {
                match run(dp, u) {
                    Ok(()) => undone += 1,
                    Err(e) => warn!(op = ?u, error = %e, "undo failed"),
                }
            }
            return Err(ReconcileError::Failed {
                source,
                done: n,
                undone,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use netpol_common::{identity, policy::PolicyKey, Direction};

    use super::*;
    use crate::{datapath::fake::FakeDatapath, policy::fuzz::Rng};

    fn pk(local: u32, remote: u32, port: u16) -> PolicyEntryKey {
        PolicyEntryKey {
            key: PolicyKey::new(local, remote, Direction::Ingress, 6, port),
            prefix_len: 96,
        }
    }

    fn desired(ports: &[u16]) -> Desired {
        let mut d = Desired::default();
        d.maps.endpoints.insert(
            10,
            Endpoint::new(300)
                .with_ipv4([10, 0, 0, 2])
                .enforce(true, false),
        );
        d.maps.ipcache.insert(
            "10.0.0.2".parse().unwrap(),
            RemoteInfo::container(300, 10, 2),
        );
        d.maps
            .ipcache
            .insert("10.0.0.3".parse().unwrap(), RemoteInfo::new(301));
        d.maps.ipcache.insert(
            "10.0.0.0/24".parse().unwrap(),
            RemoteInfo::new(identity::UNMANAGED),
        );
        for p in ports {
            d.maps
                .policy
                .insert(pk(300, 301, *p), PolicyValue::allow(1));
        }
        d.attached.insert(10);
        d
    }

    #[test]
    fn reconcile_reaches_the_desired_state_and_is_idempotent() {
        let mut dp = FakeDatapath::new(MapSizes::default());
        let want = desired(&[5432, 80]);
        assert!(reconcile(&mut dp, &want).unwrap() > 0);
        assert_eq!(dp.state, want.maps);
        assert_eq!(dp.links, want.attached);
        assert_eq!(reconcile(&mut dp, &want).unwrap(), 0, "nothing left to do");
        // A change touches only what changed.
        let before = dp.writes;
        let want2 = desired(&[5432]);
        assert_eq!(reconcile(&mut dp, &want2).unwrap(), 1);
        assert_eq!(dp.writes - before, 1);
        assert_eq!(dp.state, want2.maps);
    }

    /// Leaving audit mode (a policy's annotation gone, or the agent restarted without
    /// `--audit` over the pinned maps) is the endpoint write alone: the conntrack entries that
    /// audit mode admitted stay, for the datapath to decide those flows again and to drop the
    /// denied ones to their end (removing them would let such a flow open again from the
    /// container's side).
    #[test]
    fn leaving_audit_mode_writes_the_endpoint_and_keeps_its_audit_conntrack() {
        let mut dp = FakeDatapath::new(MapSizes::default());
        let mut audited = desired(&[1]);
        for e in audited.maps.endpoints.values_mut() {
            *e = e.audit(true, true);
        }
        reconcile(&mut dp, &audited).unwrap();
        let enforcing = desired(&[1]);
        let p = plan(&dp.state, &dp.links, &enforcing, &MapSizes::default());
        assert_eq!(
            p.ops,
            [Op::UpsertEndpoint(10, enforcing.maps.endpoints[&10])],
            "{:?}",
            p.ops
        );
        assert_eq!(reconcile(&mut dp, &enforcing).unwrap(), 1);
        assert!(dp.flushed.is_empty(), "no conntrack removed");
        assert_eq!(dp.state, enforcing.maps);
    }

    #[test]
    fn the_cached_reconciler_matches_the_reading_one() {
        let mut dp = FakeDatapath::new(MapSizes::default());
        let mut r = Reconciler::new();
        assert!(r.reconcile(&mut dp, &desired(&[1, 2])).unwrap() > 0);
        assert_eq!(r.reconcile(&mut dp, &desired(&[1, 2])).unwrap(), 0);
        assert_eq!(r.reconcile(&mut dp, &desired(&[2, 3])).unwrap(), 2);
        assert_eq!(dp.state, desired(&[2, 3]).maps);
        // After a failure it reads the maps again and converges.
        dp.fail_after = Some(0);
        assert!(r.reconcile(&mut dp, &desired(&[4])).is_err());
        assert_eq!(dp.state, desired(&[2, 3]).maps);
        r.reconcile(&mut dp, &desired(&[4])).unwrap();
        assert_eq!(dp.state, desired(&[4]).maps);
    }

    #[test]
    fn a_change_that_does_not_fit_is_refused_and_nothing_is_written() {
        let sizes = MapSizes {
            policy: 2,
            ..MapSizes::default()
        };
        let mut dp = FakeDatapath::new(sizes);
        reconcile(&mut dp, &desired(&[1])).unwrap();
        let before = dp.state.clone();
        let writes = dp.writes;
        let err = reconcile(&mut dp, &desired(&[1, 2, 3])).unwrap_err();
        assert!(
            matches!(
                err,
                ReconcileError::DoesNotFit {
                    map: "POLICY",
                    need: 3,
                    max: 2
                }
            ),
            "{err}"
        );
        assert_eq!(dp.state, before);
        assert_eq!(dp.writes, writes);
    }

    #[test]
    fn a_failure_half_way_is_undone() {
        let mut dp = FakeDatapath::new(MapSizes::default());
        reconcile(&mut dp, &desired(&[1])).unwrap();
        let before = dp.state.clone();
        dp.fail_after = Some(2);
        let err = reconcile(&mut dp, &desired(&[2, 3, 4, 5])).unwrap_err();
        assert!(
            matches!(
                err,
                ReconcileError::Failed {
                    done: 2,
                    undone: 2,
                    ..
                }
            ),
            "{err}"
        );
        dp.fail_after = None;
        assert_eq!(dp.state, before);
    }

    #[test]
    fn allows_are_written_before_enforcement_and_endpoint_before_attach() {
        let cur = MapState::default();
        let want = desired(&[5432]);
        let p = plan(&cur, &BTreeSet::new(), &want, &MapSizes::default());
        let pos = |f: &dyn Fn(&Op) -> bool| p.ops.iter().position(|o| f(o)).unwrap();
        let policy = pos(&|o| matches!(o, Op::UpsertPolicy(..)));
        let endpoint = pos(&|o| matches!(o, Op::UpsertEndpoint(..)));
        let attach = pos(&|o| matches!(o, Op::Attach(..)));
        let ipcache = pos(&|o| matches!(o, Op::UpsertIpcache(..)));
        assert!(
            ipcache < policy && policy < endpoint && endpoint < attach,
            "{:?}",
            p.ops
        );
    }

    #[test]
    fn conntrack_of_a_departed_or_changed_endpoint_is_removed_last() {
        let mut dp = FakeDatapath::new(MapSizes::default());
        let mut r = Reconciler::new();
        r.reconcile(&mut dp, &desired(&[1])).unwrap();
        assert!(dp.flushed.is_empty(), "nothing departed");
        let db: IpAddr = "10.0.0.2".parse().unwrap();
        // The same address, now another container (new veth, new identity).
        let mut moved = desired(&[1]);
        moved
            .maps
            .ipcache
            .insert(Cidr::host(db), RemoteInfo::container(305, 11, 2));
        let p = plan(&dp.state, &dp.links, &moved, &MapSizes::default());
        assert_eq!(p.ops.last(), Some(&Op::FlushCt([db].into())), "{:?}", p.ops);
        r.reconcile(&mut dp, &moved).unwrap();
        assert_eq!(dp.flushed, vec![BTreeSet::from([db])]);
        // The container goes: its address leaves the ipcache.
        let mut gone = moved.clone();
        gone.maps.ipcache.remove(&Cidr::host(db));
        r.reconcile(&mut dp, &gone).unwrap();
        assert_eq!(dp.flushed.len(), 2);
        // Addresses without a veth (world, CIDRs, a container not found yet) are not flushed.
        let mut other = gone.clone();
        other.maps.ipcache.remove(&"10.0.0.3".parse().unwrap());
        r.reconcile(&mut dp, &other).unwrap();
        assert_eq!(dp.flushed.len(), 2);
    }

    #[test]
    fn a_failed_conntrack_flush_does_not_fail_the_change() {
        let mut dp = FakeDatapath::new(MapSizes::default());
        reconcile(&mut dp, &desired(&[1])).unwrap();
        let mut gone = desired(&[1]);
        gone.maps.ipcache.remove(&"10.0.0.2".parse().unwrap());
        let p = plan(&dp.state, &dp.links, &gone, &MapSizes::default());
        dp.fail_after = Some(p.len() - 1);
        apply(&mut dp, &p).unwrap();
        assert_eq!(dp.state, gone.maps);
    }

    /// A random state over a few veths, addresses and local identities (the last one at the
    /// end of the number range).
    fn random_state(rng: &mut Rng) -> Desired {
        const LOCALS: [u32; 5] = [300, 301, 302, 303, u32::MAX];
        let mut d = Desired::default();
        for _ in 0..rng.below(6) {
            let ifindex = 10 + rng.below(6) as u32;
            let ep = Endpoint::new(LOCALS[rng.below(5)])
                .with_ipv4([10, 0, 0, ifindex as u8])
                .enforce(rng.below(2) == 0, rng.below(2) == 0);
            d.maps.endpoints.insert(ifindex, ep);
            if rng.below(3) > 0 {
                d.attached.insert(ifindex);
            }
        }
        for _ in 0..rng.below(6) {
            let c = Cidr::host(IpAddr::from([10, 0, 0, rng.below(8) as u8]));
            let id = LOCALS[rng.below(5)];
            let info = match rng.below(2) {
                0 => RemoteInfo::container(id, 10 + rng.below(6) as u32, 2),
                _ => RemoteInfo::new(id),
            };
            d.maps.ipcache.insert(c, info);
        }
        for &local in &LOCALS {
            for _ in 0..rng.below(6) {
                let k = pk(local, LOCALS[rng.below(5)], rng.below(4) as u16);
                let v = match rng.below(3) {
                    0 => PolicyValue::deny(rng.below(3) as u32),
                    _ => PolicyValue::allow(rng.below(3) as u32),
                };
                d.maps.policy.insert(k, v);
            }
        }
        d
    }

    /// A reconcile that compares only the policy entries of the local identities that changed
    /// (and any others) makes the full reconcile's plan, op for op, and leaves the same maps;
    /// what it records as written is what the datapath holds; after a failed write the next one
    /// reads the maps and converges, whatever its scope.
    #[test]
    fn a_reconcile_scoped_to_the_changed_locals_is_the_full_one() {
        let mut rng = Rng(0x5c0b_ed01);
        let mut failures = 0;
        for round in 0..400 {
            let cur = random_state(&mut rng);
            // The policy entries of some locals change; endpoints and addresses at random.
            let next = random_state(&mut rng);
            let mut want = cur.clone();
            let mut scope = BTreeSet::new();
            for local in [300, 301, 302, 303, u32::MAX] {
                if rng.below(3) == 0 {
                    want.maps.policy.retain(|k, _| k.key.local != local);
                    want.maps.policy.extend(
                        PolicyEntryKey::entries_of(&next.maps.policy, local).map(|(k, v)| (*k, *v)),
                    );
                    scope.insert(local);
                } else if rng.below(4) == 0 {
                    // In scope, unchanged.
                    scope.insert(local);
                }
            }
            if rng.below(2) == 0 {
                want.maps.endpoints = next.maps.endpoints.clone();
                want.attached = next.attached.clone();
            }
            if rng.below(2) == 0 {
                want.maps.ipcache = next.maps.ipcache.clone();
            }
            // Sometimes a POLICY map that holds both sides only after stale entries go first.
            let sizes = match rng.below(3) {
                0 => MapSizes {
                    policy: cur.maps.policy.len().max(want.maps.policy.len()) as u32,
                    ..MapSizes::default()
                },
                _ => MapSizes::default(),
            };
            let full = plan(&cur.maps, &cur.attached, &want, &sizes);
            let scoped = plan_scoped(
                &cur.maps,
                &cur.attached,
                want.want(),
                PolicyScope::Locals(&scope),
                &sizes,
            );
            assert_eq!(scoped.ops, full.ops, "round {round}");
            assert_eq!(scoped.undo, full.undo, "round {round}");
            let in_scope: usize = scope
                .iter()
                .map(|&l| {
                    PolicyEntryKey::entries_of(&cur.maps.policy, l).count()
                        + PolicyEntryKey::entries_of(&want.maps.policy, l).count()
                })
                .sum();
            assert_eq!(scoped.compared_policy(), in_scope, "round {round}");

            let (mut dp_full, mut dp_scoped) = (FakeDatapath::new(sizes), FakeDatapath::new(sizes));
            let (mut r_full, mut r_scoped) = (Reconciler::new(), Reconciler::new());
            r_full.reconcile(&mut dp_full, &cur).expect("full, first");
            r_scoped
                .reconcile(&mut dp_scoped, &cur)
                .expect("scoped, first");
            let mut injected = false;
            if rng.below(5) == 0 && !full.is_empty() {
                dp_scoped.fail_after = Some(rng.below(full.len()));
                let r = r_scoped.reconcile_scoped(
                    &mut dp_scoped,
                    want.want(),
                    PolicyScope::Locals(&scope),
                );
                dp_scoped.fail_after = None;
                // Either it failed (and a detach is not undone) or the flush, last, failed
                // without failing the change: the number of ops is not the full one's.
                injected = true;
                if r.is_err() {
                    failures += 1;
                    assert!(
                        r_scoped.last().is_none(),
                        "round {round}: a failure forgets"
                    );
                    assert_eq!(dp_scoped.state, cur.maps, "round {round}: undone");
                }
            }
            let n_full = r_full.reconcile(&mut dp_full, &want).expect("full");
            let n_scoped = r_scoped
                .reconcile_scoped(&mut dp_scoped, want.want(), PolicyScope::Locals(&scope))
                .expect("scoped");
            if !injected {
                assert_eq!(n_scoped, n_full, "round {round}");
            }
            assert_eq!(dp_scoped.state, want.maps, "round {round}");
            assert_eq!(dp_scoped.links, want.attached, "round {round}");
            assert_eq!(dp_full.state, dp_scoped.state, "round {round}");
            assert_eq!(
                r_scoped.last(),
                Some(&(want.maps.clone(), want.attached.clone())),
                "round {round}: records what it wrote"
            );
        }
        assert!(failures > 10, "{failures} injected failures");
    }

    #[test]
    fn stale_entries_go_after_new_ones_unless_the_map_would_overflow() {
        let mut dp = FakeDatapath::new(MapSizes {
            policy: 2,
            ..MapSizes::default()
        });
        reconcile(&mut dp, &desired(&[1, 2])).unwrap();
        // Replacing both entries: old ∪ new = 4 > 2, so stale ones are removed first.
        reconcile(&mut dp, &desired(&[3, 4])).unwrap();
        assert_eq!(dp.state, desired(&[3, 4]).maps);
        let p = plan(
            &desired(&[1]).maps,
            &[10].into(),
            &desired(&[2]),
            &MapSizes::default(),
        );
        let up = p
            .ops
            .iter()
            .position(|o| matches!(o, Op::UpsertPolicy(..)))
            .unwrap();
        let del = p
            .ops
            .iter()
            .position(|o| matches!(o, Op::DeletePolicy(..)))
            .unwrap();
        assert!(up < del);
    }
}
