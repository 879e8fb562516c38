//! The agent's world: containers and networks from Docker, policies from disk, the socket and
//! labels, identities; and how it becomes the desired map state.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
};

use netpol_common::{endpoint::Endpoint, identity as reserved, ipcache::RemoteInfo, Direction};
use tracing::{error, info, warn};

use super::api::{EndpointRow, IdentityRow, PolicyRow, SourceFile};
use crate::{
    datapath::{Cidr, Datapath},
    docker::{Container, DockerEvent, LinkEvent, LinkInfo, Network},
    identity::{display_name, netpol_labels, IdentityAllocator, LabelFilter, Labels},
    policy::{
        self,
        rule_ids::RuleIds,
        sources::{imports, labels::identity_labels, ContainerLabels, ImportSet, Sources},
        Compiled, Endpoints, Enforcement, Policy,
    },
    reconcile::{self, Desired},
    store::Store,
};

/// The tag a damaged state file is set aside with ([`Store::set_aside`]): `damaged-` and the
/// time, UTC.
fn damaged_tag() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("damaged-{}", super::flows::utc(secs))
}

/// Sets the damaged state file `name` aside and says so (`why`: what is wrong with it; `then`:
/// what the agent does instead). The line for `status`, or the error when it cannot be moved:
/// the agent would write over it.
fn set_aside(store: &Store, name: &str, why: &str, then: &str) -> Result<String, AgentError> {
    let path = store.dir().join(name);
    match store.set_aside(name, &damaged_tag()) {
        Ok(kept) => {
            let kept = kept.map_or("(gone)".to_owned(), |k| k.display().to_string());
            warn!(file = %path.display(), kept_as = %kept, error = %why, "{name} is damaged: kept aside; {then}");
            Ok(format!(
                "{} was damaged ({why}): kept as {kept}; {then}",
                path.display()
            ))
        }
        Err(e) => Err(AgentError::Invalid(format!(
            "{} is damaged ({why}) and cannot be set aside ({e}); the agent does not write over it: move it away",
            path.display()
        ))),
    }
}

/// The persisted rule id table, its next number raised above every rule id in the maps
/// (`POLICY` values, `RULE_STATS` keys): a table that is stale, lost or unreadable never hands
/// out a number the kernel still counts under; ids at the top of the range are renumbered
/// ([`RuleIds::load`]). An unreadable table is set aside, logged and
/// replaced (rule ids only name counters and events; enforcement does not depend on them); the
/// second value then says so, for `status`.
fn load_rule_ids(
    store: &Store,
    dp: &dyn Datapath,
) -> Result<(RuleIds, Option<String>), AgentError> {
    let mut in_maps = Vec::new();
    match dp.current() {
        Ok(cur) => in_maps.extend(cur.policy.values().map(|v| v.rule)),
        Err(e) => warn!(error = %e, "reading POLICY for the rule ids in use"),
    }
    match dp.rule_counters() {
        Ok(c) => in_maps.extend(c.keys().map(|k| k.rule)),
        Err(e) => warn!(error = %e, "reading RULE_STATS for the rule ids in use"),
    }
    let fresh = || {
        let empty = policy::rule_ids::RuleIdsState {
            next: 0,
            rules: Vec::new(),
        };
        RuleIds::load(empty, in_maps.iter().copied()).unwrap_or_default()
    };
    let why = match store.load_rule_ids::<policy::rule_ids::RuleIdsState>() {
        Ok(Some(state)) => match RuleIds::load(state, in_maps.iter().copied()) {
            Ok(t) => return Ok((t, None)),
            Err(e) => e.to_string(),
        },
        Ok(None) => return Ok((fresh(), None)),
        Err(e) => e.to_string(),
    };
    let note = set_aside(
        store,
        "rule-ids.json",
        &why,
        "rules get new ids, their counters start again",
    )?;
    Ok((fresh(), Some(note)))
}

/// The persisted identity table, its next number raised above the label identities in the maps
/// and those numbers never handed out to other labels ([`identities_in_maps`]). A table that
/// cannot be read or vouched for (not JSON, not a table, a number or label key given twice, a
/// number outside the label range, two numbers for one label set) is set aside and replaced by
/// an empty one whose numbers start above every label identity in the maps: no label set can
/// get a number the kernel holds for another, each container gets a new number with its own
/// policy. Without the maps' numbers that cannot be promised, and the agent does not start.
/// The second value says whether the table must be saved, the third what was recovered.
fn load_identities(
    store: &Store,
    dp: &dyn Datapath,
) -> Result<(IdentityAllocator, bool, Option<String>), AgentError> {
    let loaded = match store.load_identities() {
        Ok(None) => Ok(IdentityAllocator::new()),
        Ok(Some(state)) => IdentityAllocator::load(state).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let why = match loaded {
        Ok(mut ids) => {
            let held = identities_in_maps(dp).unwrap_or_else(|e| {
                warn!(error = %e, "reading the maps for the identities in use");
                Default::default()
            });
            let moved = ids.raise_next(floor_above(&held));
            ids.avoid(held);
            return Ok((ids, moved, None));
        }
        Err(why) => why,
    };
    let held = identities_in_maps(dp).map_err(|e| {
        AgentError::Invalid(format!(
            "{} is damaged ({why}), and the maps cannot be read for the identity numbers in use ({e}): new numbers could be ones the kernel holds for other containers",
            store.dir().join("identities.json").display()
        ))
    })?;
    let note = set_aside(
        store,
        "identities.json",
        &why,
        "every container gets a new identity number above those in the maps, with its own policy",
    )?;
    let mut ids = IdentityAllocator::new();
    ids.raise_next(floor_above(&held));
    ids.avoid(held);
    Ok((ids, true, Some(note)))
}

/// Every label identity in the maps (`ENDPOINTS`, the ipcache, `POLICY`'s locals and remotes).
/// Identities are written after the maps (in `run` by a background task), so an agent killed in
/// between leaves numbers in the maps that `identities.json` lacks (and a damaged table vouches
/// for none); given to other labels, a container would have, until the reconcile removes the
/// stale `POLICY` entries (last, after the ipcache), the allowances of the one that held the
/// number. New label sets start above them ([`floor_above`]) and never get one of them, also
/// once the counter has wrapped around ([`IdentityAllocator::avoid`]).
fn identities_in_maps(
    dp: &dyn Datapath,
) -> Result<std::collections::BTreeSet<u32>, crate::datapath::DatapathError> {
    let label = |id: &u32| (reserved::FIRST_LABEL..crate::identity::FIRST_CIDR).contains(id);
    let cur = dp.current()?;
    Ok(cur
        .endpoints
        .values()
        .map(|e| e.identity)
        .chain(cur.ipcache.values().map(|v| v.identity))
        .chain(cur.policy.keys().flat_map(|k| [k.key.local, k.key.remote]))
        .filter(label)
        .collect())
}

/// One more than the highest of `held`, 0 when none.
fn floor_above(held: &std::collections::BTreeSet<u32>) -> u32 {
    held.last().map_or(0, |m| m.saturating_add(1))
}

/// The CIDR identities in the ipcache (prefix → number). A restarted agent compiles them again
/// from the policies alone: a prefix that came or went while it was stopped would shift the
/// numbers of the others, and a prefix with the number another has in the maps would have that
/// one's allowances until the reconcile removes the stale `POLICY` entries (a flow opened then
/// outlives it: conntrack compares no CIDR identity). Unreadable maps: none (logged).
fn cidrs_in_maps(dp: &dyn Datapath) -> BTreeMap<Cidr, u32> {
    match dp.current() {
        Ok(cur) => cur
            .ipcache
            .iter()
            .filter(|(_, v)| v.identity >= crate::identity::FIRST_CIDR)
            .map(|(c, v)| (*c, v.identity))
            .collect(),
        Err(e) => {
            warn!(error = %e, "reading the maps for the CIDR identities in use");
            BTreeMap::new()
        }
    }
}

/// What the label source reads of a container.
fn labels_of(c: &Container) -> ContainerLabels<'_> {
    ContainerLabels {
        name: &c.name,
        labels: &c.labels,
        image: c.image_netpol_labels.as_ref().map_err(String::as_str),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Compile(#[from] policy::CompileError),
    #[error(transparent)]
    Reconcile(#[from] reconcile::ReconcileError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Trace(#[from] crate::policy::trace::TraceError),
    #[error("no imported policy named {0} (nothing was changed)")]
    NotFound(String),
    #[error("a stored policy no longer parses, so the maps are left as they are (each container is enforced as its identity was; one of an identity they do not know is default deny both ways): {}", .0.join("; "))]
    Frozen(Vec<String>),
}

/// Where the policy entries of a desired state are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BasePolicy {
    /// The compile's (`Agent::compiled`).
    Compiled,
    /// The desired state's own policy map (frozen: the maps' entries as they were).
    Own,
}

/// The policy entries for [`Agent::reconcile_base`].
#[derive(Clone, Copy)]
enum PolicyOf<'a> {
    Compiled(&'a Compiled),
    Own,
}

impl PolicyOf<'_> {
    fn source(&self) -> BasePolicy {
        match self {
            PolicyOf::Compiled(_) => BasePolicy::Compiled,
            PolicyOf::Own => BasePolicy::Own,
        }
    }
}

/// Identity writes of [`Agent::save_soon`] in flight.
#[derive(Clone, Debug, Default)]
struct BackgroundSaves {
    /// The generation of the state last written; held while writing, so that writes never go
    /// back in time.
    written: Arc<Mutex<u64>>,
    /// A background write failed: the next save writes again.
    failed: Arc<AtomicBool>,
}

impl BackgroundSaves {
    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.written.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub struct Agent {
    dp: Box<dyn Datapath>,
    store: Store,
    filter: LabelFilter,
    ids: IdentityAllocator,
    ids_dirty: bool,
    /// `Some` in `run`: see [`Self::save_soon`].
    background_saves: Option<BackgroundSaves>,
    /// Identity states handed to a write so far.
    save_generation: u64,
    /// Policy files, imported policies and compose labels.
    sources: Sources,
    containers: BTreeMap<String, Container>,
    networks: BTreeMap<String, Network>,
    host_addrs: Vec<IpAddr>,
    /// The host's subnet-directed broadcasts and subnet-router anycasts
    /// ([`crate::docker::host_address_sets`]).
    host_groups: Vec<IpAddr>,
    /// Docker has answered at least once since start: until then the maps are left alone.
    docker_synced: bool,
    docker_status: String,
    compiled: Option<Compiled>,
    /// The CIDR identities of the maps at start: the first compile keeps them for the prefixes
    /// still in policy and gives no new prefix one of them ([`cidrs_in_maps`]).
    cidrs_at_start: BTreeMap<Cidr, u32>,
    /// The policies and endpoints `compiled` was compiled from: when only the endpoints changed
    /// since, only what they change is compiled again ([`policy::recompile_endpoints`]).
    compiled_from: Option<(Vec<Policy>, Endpoints)>,
    reconciler: reconcile::Reconciler,
    masq: Option<super::masq::Masq>,
    /// While frozen (a stored policy no longer parses): the enforced directions of every
    /// identity the maps have had an endpoint of since the freeze began (see
    /// [`Agent::sync_frozen`]).
    frozen: Option<BTreeMap<u32, Enforcement>>,
    last_error: Option<String>,
    /// ifindex → (container name, identity), for the monitor.
    pub names: BTreeMap<u32, (String, u32)>,
    /// `run --audit`: every endpoint's enforced directions are in audit mode.
    audit_all: bool,
    /// The host namespace's links, from the kernel's link events.
    host_links: BTreeMap<u32, LinkInfo>,
    /// The last desired state built from Docker's world, without provisional endpoints: a link
    /// event re-reconciles against it without recompiling policy. Its policy map is empty unless
    /// it is [`BasePolicy::Own`] (frozen); otherwise the policy entries are `compiled`'s.
    last_base: Option<(Desired, BasePolicy)>,
    /// The policy source the maps hold, as of the last successful reconcile (`None` after a
    /// failed one): only when they hold `compiled`'s entries may a reconcile compare just the
    /// entries a recompile changed.
    written_policy: Option<BasePolicy>,
    /// Syncs that took the event-scoped path (unit tests check it is taken).
    #[cfg(test)]
    scoped_syncs: usize,
    /// Durations for `run --metrics`.
    metrics: crate::metrics::Metrics,
    /// The rule ids of the policies in force (persisted), and whether they changed since the
    /// last save.
    rule_ids: RuleIds,
    rule_ids_dirty: bool,
    /// `RULE_STATS` holds counters of the rules in force only (checked once after start, then
    /// whenever rules go).
    rule_stats_clean: bool,
    /// Damaged state files set aside at start, and what the agent did instead (`status`).
    recovered: Vec<String>,
}

impl Agent {
    pub fn new(
        dp: Box<dyn Datapath>,
        store: Store,
        filter: LabelFilter,
        policy_dir: PathBuf,
    ) -> Result<Self, AgentError> {
        // Nothing is read from a store another user could have written to.
        store.check_trusted()?;
        let (ids, ids_dirty, ids_note) = load_identities(&store, dp.as_ref())?;
        let sources = Sources::load(&store, policy_dir, &filter)?;
        let (rule_ids, rule_ids_note) = load_rule_ids(&store, dp.as_ref())?;
        let cidrs_at_start = cidrs_in_maps(dp.as_ref());
        info!(
            identities = ids.len(),
            policies = sources.imports.len(),
            "state restored"
        );
        Ok(Self {
            dp,
            store,
            filter,
            ids,
            ids_dirty,
            background_saves: None,
            save_generation: 0,
            sources,
            containers: BTreeMap::new(),
            networks: BTreeMap::new(),
            host_addrs: Vec::new(),
            host_groups: Vec::new(),
            docker_synced: false,
            docker_status: "connecting".into(),
            compiled: None,
            cidrs_at_start,
            compiled_from: None,
            reconciler: reconcile::Reconciler::new(),
            masq: None,
            frozen: None,
            last_error: None,
            names: BTreeMap::new(),
            audit_all: false,
            host_links: BTreeMap::new(),
            last_base: None,
            written_policy: None,
            #[cfg(test)]
            scoped_syncs: 0,
            metrics: crate::metrics::Metrics::default(),
            rule_ids,
            rule_ids_dirty: false,
            rule_stats_clean: false,
            recovered: ids_note.into_iter().chain(rule_ids_note).collect(),
        })
    }

    pub fn set_metrics(&mut self, metrics: crate::metrics::Metrics) {
        self.metrics = metrics;
    }

    /// The endpoint names and Docker's state, for one metrics scrape.
    pub fn metrics_view(&self) -> crate::metrics::AgentView {
        crate::metrics::AgentView {
            endpoints: self
                .names
                .iter()
                .map(|(&ifindex, (container, id))| {
                    (
                        ifindex,
                        crate::metrics::EndpointName {
                            container: container.clone(),
                            identity: self.identity_name(*id),
                        },
                    )
                })
                .collect(),
            rules: self
                .compiled
                .as_ref()
                .map(|c| {
                    c.rules
                        .iter()
                        .map(|(&id, r)| {
                            (
                                id,
                                crate::metrics::RuleName {
                                    policy: r.policy.clone(),
                                    section: r.section.clone(),
                                },
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            identities: self
                .ids
                .iter()
                .map(|(id, labels)| (id, display_name(id, Some(labels))))
                .chain(
                    [reserved::HOST, reserved::WORLD, reserved::UNMANAGED]
                        .map(|id| (id, display_name(id, None))),
                )
                .collect(),
            docker_connected: self.docker_synced && self.docker_status.starts_with("connected"),
        }
    }

    /// `run --audit`: every container's enforced directions report what policy would drop
    /// instead of dropping it (set before the first sync).
    pub fn set_audit_all(&mut self, on: bool) {
        self.audit_all = on;
    }

    pub fn set_masq(&mut self, masq: super::masq::Masq) {
        self.masq = Some(masq);
    }

    fn sync_masq(&mut self) {
        if let Some(m) = self.masq.as_mut() {
            let nets: Vec<&Network> = self.networks.values().collect();
            m.sync(&nets, &self.host_addrs);
        }
    }

    /// `run`: identities allocated by a Docker event are written to disk by a blocking task (see
    /// [`Self::save_soon`]) instead of on the thread that handles the next events.
    pub fn set_background_saves(&mut self, on: bool) {
        self.background_saves = on.then(BackgroundSaves::default);
    }

    /// Writes the identities now if they changed since the last write (a background write not
    /// finished yet included).
    pub fn save(&mut self) -> Result<(), AgentError> {
        match self.background_saves.clone() {
            None => {
                if self.ids_dirty {
                    self.store.save_identities(&self.ids.state())?;
                    self.ids_dirty = false;
                }
            }
            Some(b) => {
                b.failed.store(false, Ordering::SeqCst);
                let mut written = b.lock();
                if self.ids_dirty || *written < self.save_generation {
                    self.save_generation += 1;
                    if let Err(e) = self.store.save_identities(&self.ids.state()) {
                        b.failed.store(true, Ordering::SeqCst);
                        return Err(e.into());
                    }
                    *written = self.save_generation;
                    self.ids_dirty = false;
                }
            }
        }
        self.save_rule_ids();
        Ok(())
    }

    fn save_rule_ids(&mut self) {
        if self.rule_ids_dirty {
            // Counters' names only: a failure is logged, never a reason to stop enforcing (a
            // table lost this way is made safe at start, from the ids in the maps).
            match self.store.save_rule_ids(&self.rule_ids.state()) {
                Ok(()) => self.rule_ids_dirty = false,
                Err(e) => warn!(error = %e, "saving the rule id table"),
            }
        }
    }

    /// Before the maps get a compile's entries: numbers it gives out again (only once the id
    /// range is used up) start from zero counters.
    fn prepare_rule_ids(&mut self, compiled: &Compiled) {
        let reused = compiled.rule_ids.reused();
        if reused.is_empty() {
            return;
        }
        if let Err(e) = self.dp.prune_rule_counters(&|r| !reused.contains(&r)) {
            warn!(error = %e, "zeroing the counters of reused rule ids");
        }
    }

    /// A compile is in force: its rule table becomes the agent's, and the counters of rules that
    /// are gone are removed (their numbers are never given out again).
    fn commit_rule_ids(&mut self, compiled: &Compiled) {
        let mut table = compiled.rule_ids.clone().settled();
        table.raise_next(self.rule_ids.next());
        let kept = table.ids();
        let removed = self.rule_ids.ids().difference(&kept).next().is_some();
        if table != self.rule_ids {
            self.rule_ids = table;
            self.rule_ids_dirty = true;
        }
        if removed || !self.rule_stats_clean {
            match self.dp.prune_rule_counters(&|r| kept.contains(&r)) {
                Ok(n) => {
                    if n > 0 {
                        info!(entries = n, "removed the counters of rules that are gone");
                    }
                    self.rule_stats_clean = true;
                }
                Err(e) => {
                    warn!(error = %e, "removing the counters of rules that are gone");
                    self.rule_stats_clean = false;
                }
            }
        }
    }

    /// [`Self::save`], or with background saves a blocking task that writes the identities as
    /// they are now: two fsyncs of a file that grows with the identities take tens of ms on a
    /// busy disk, and every Docker event would wait for them. The maps are written before
    /// either (as before), and the write only makes the numbers survive a restart. A newer
    /// state is never overwritten by an older one; a failed write is logged and retried with
    /// the next change and at shutdown. (The rule id table, which changes with policies, not
    /// with containers, is written as by [`Self::save`].)
    fn save_soon(&mut self) -> Result<(), AgentError> {
        let Some(b) = self.background_saves.clone() else {
            return self.save();
        };
        self.save_rule_ids();
        if !self.ids_dirty && !b.failed.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        self.save_generation += 1;
        let generation = self.save_generation;
        let state = self.ids.state();
        let store = self.store.clone();
        self.ids_dirty = false;
        tokio::task::spawn_blocking(move || {
            let mut written = b.lock();
            if *written >= generation {
                return;
            }
            match store.save_identities(&state) {
                Ok(()) => *written = generation,
                Err(e) => {
                    error!(error = %e, "saving identities failed; retried with the next change and at shutdown");
                    b.failed.store(true, Ordering::SeqCst);
                }
            }
        });
        Ok(())
    }

    pub fn policy_dir_changed(&self) -> bool {
        self.sources.files.changed()
    }

    /// Re-reads the policy directory.
    pub fn reload_policy_dir(&mut self) {
        let errors = self.sources.reload_files(&self.store, &self.filter);
        if !errors.is_empty() {
            let msg: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
            self.last_error = Some(msg.join("; "));
        }
    }

    /// Recomputes the policies of the running containers' labels.
    fn refresh_labels(&mut self) {
        self.sources.labels.update(
            self.containers
                .values()
                .filter(|c| c.running)
                .map(labels_of),
        );
    }

    /// The identity of every running container (by container id), allocated when new, and
    /// every such identity's labels: one pass, nothing cloned but the labels.
    fn running_identities(&mut self) -> Result<(BTreeMap<String, u32>, Endpoints), AgentError> {
        let (mut ids, mut endpoints) = (BTreeMap::new(), Endpoints::new());
        for c in self.containers.values().filter(|c| c.running) {
            let labels = identity_labels(&self.filter, &labels_of(c));
            let (id, new) = self.ids.allocate(&labels)?;
            self.ids_dirty |= new;
            ids.insert(c.id.clone(), id);
            endpoints.insert(id, labels);
        }
        Ok((ids, endpoints))
    }

    /// Builds the desired state from the world and the given policies (its policy map left
    /// empty: the entries are the compile's), the compile, and the endpoints the policies were
    /// compiled for.
    fn desired(
        &mut self,
        policies: &[Policy],
    ) -> Result<(Desired, Compiled, Endpoints), AgentError> {
        let (container_ids, endpoints) = self.running_identities()?;
        let previous = self.compiled.as_ref().map_or_else(
            || self.cidrs_at_start.clone(),
            |c| c.cidr_identities.clone(),
        );
        let t0 = std::time::Instant::now();
        let (compiled, incremental) = match (&self.compiled, &self.compiled_from) {
            (Some(prev), Some((prev_policies, prev_endpoints)))
                if prev_policies.as_slice() == policies =>
            {
                let c = policy::recompile_endpoints(
                    prev,
                    policies,
                    prev_endpoints,
                    &endpoints,
                    &self.rule_ids,
                )?;
                (c, true)
            }
            _ => (
                policy::compile_stable(policies, &endpoints, &previous, &self.rule_ids)?,
                false,
            ),
        };
        tracing::debug!(
            compile_ms = t0.elapsed().as_secs_f64() * 1e3,
            incremental,
            entries = compiled.policy.len(),
            "compiled"
        );
        // Whatever becomes of this compile, its new numbers are never handed out again: a failed
        // reconcile may have written some of them.
        self.rule_ids.raise_next(compiled.rule_ids.next());
        let d = self.world_of(&container_ids, &compiled)?;
        Ok((d, compiled, endpoints))
    }

    /// [`Self::world`] with the enforced and audited directions of `compiled` (and of `run
    /// --audit`, and of the containers' audit labels).
    fn world_of(
        &mut self,
        container_ids: &BTreeMap<String, u32>,
        compiled: &Compiled,
    ) -> Result<Desired, AgentError> {
        let audit_all = self.audit_all;
        let labels = &self.sources.labels;
        let label_audit: std::collections::BTreeSet<String> = self
            .containers
            .values()
            .filter(|c| c.running && labels.audited(&c.name))
            .map(|c| c.name.clone())
            .collect();
        self.world(
            container_ids,
            &compiled.cidr_identities,
            |id| compiled.enforcement.get(&id).copied().unwrap_or_default(),
            |id, name| {
                if audit_all || label_audit.contains(name) {
                    Enforcement {
                        ingress: true,
                        egress: true,
                    }
                } else {
                    compiled.audit_of(id)
                }
            },
        )
    }

    /// The desired ipcache, endpoints and attachments of the running containers (the policy map
    /// left empty), with these CIDR identities and each identity's enforced directions.
    fn world(
        &mut self,
        container_ids: &BTreeMap<String, u32>,
        cidr_identities: &BTreeMap<Cidr, u32>,
        enforcement_of: impl Fn(u32) -> Enforcement,
        audit_of: impl Fn(u32, &str) -> Enforcement,
    ) -> Result<Desired, AgentError> {
        let mut d = Desired::default();
        // Subnets of managed networks: a container not identified yet is `unmanaged`, not `world`.
        for n in self.networks.values().filter(|n| n.is_bridge()) {
            for s in &n.subnets {
                d.maps
                    .ipcache
                    .insert(*s, RemoteInfo::new(reserved::UNMANAGED));
            }
        }
        for (cidr, id) in cidr_identities {
            d.maps.ipcache.entry(*cidr).or_insert(RemoteInfo::new(*id));
        }
        // The host's addresses, bridge networks' gateways included (a macvlan or ipvlan
        // network's gateway is a router outside): sent by the host's own stack (or NATed back
        // to a container through its own veth); from anywhere else the datapath drops them.
        for n in self.networks.values().filter(|n| n.is_bridge()) {
            for g in &n.gateways {
                d.maps.ipcache.insert(Cidr::host(*g), RemoteInfo::host());
            }
        }
        for a in &self.host_addrs {
            d.maps.ipcache.insert(Cidr::host(*a), RemoteInfo::host());
        }
        // A subnet-directed broadcast (172.17.255.255 on the default bridge, 192.0.2.255 of the
        // host's LAN address) or IPv6 subnet-router anycast (`prefix::`, while the host forwards)
        // is taken by the host as sent to itself (also routed to it through the gateway), and a
        // bridge's broadcast by the containers on it that no program polices yet: a group
        // address (`reserved::GROUP`, like 255.255.255.255), not the `world`, the CIDR or the
        // `unmanaged` subnet its prefix would give it. A container's own address below wins
        // (Docker hands out neither).
        let subnet_groups = self
            .networks
            .values()
            .filter(|n| n.is_bridge())
            .flat_map(|n| &n.subnets)
            .filter_map(|s| crate::docker::group_address(s.addr, s.prefix_len));
        for a in self.host_groups.iter().copied().chain(subnet_groups) {
            if !self.host_addrs.contains(&a) {
                d.maps
                    .ipcache
                    .insert(Cidr::host(a), RemoteInfo::new(reserved::GROUP));
            }
        }
        self.names.clear();
        // One lookup per network, not per container (each is a syscall).
        let bridges: BTreeMap<&str, u32> = self
            .networks
            .keys()
            .map(|n| (n.as_str(), self.bridge_ifindex(n)))
            .collect();
        for c in self.containers.values().filter(|c| c.running) {
            let Some(&id) = container_ids.get(&c.id) else {
                continue;
            };
            let enf = enforcement_of(id);
            let aud = audit_of(id, &c.name);
            for a in &c.networks {
                // A container's address names the interfaces its packets arrive through, so
                // that the datapath drops the address forged from anywhere else.
                let info = match a.host_veth {
                    Some(veth) => RemoteInfo::container(
                        id,
                        veth,
                        bridges.get(a.network_id.as_str()).copied().unwrap_or(0),
                    ),
                    None => RemoteInfo::new(id),
                };
                for addr in a.addresses() {
                    d.maps.ipcache.insert(Cidr::host(addr), info);
                }
                if let (Ok(()), Some(ifindex)) = (&a.enforceable, a.host_veth) {
                    let mut ep = Endpoint::new(id)
                        .enforce(enf.ingress, enf.egress)
                        .audit(enf.ingress && aud.ingress, enf.egress && aud.egress);
                    if let Some(v4) = a.ipv4 {
                        ep = ep.with_ipv4(v4.octets());
                    }
                    if let Some(v6) = a.ipv6 {
                        ep = ep.with_ipv6(v6.octets());
                    }
                    d.maps.endpoints.insert(ifindex, ep);
                    d.attached.insert(ifindex);
                    self.names.insert(ifindex, (c.name.clone(), id));
                }
            }
        }
        Ok(d)
    }

    /// While a stored policy no longer parses, what it allowed and denied is unknown, so the
    /// policy entries and CIDR identities stay exactly as they are; but containers still come
    /// and go, and none may end up more open than before: each running container is enforced
    /// as its identity was in the maps (a restarted db keeps its protection, a restarted app its
    /// allowances), one whose identity the maps do not know is default deny both ways, and
    /// addresses follow their containers (a new holder of an address never inherits the
    /// identity of its previous holder).
    fn sync_frozen(&mut self) -> Result<usize, AgentError> {
        let cur = self.reconciler.current(self.dp.as_mut())?;
        // Remembered for the whole freeze: a container that stops and starts again (a new
        // veth) is enforced as before, not as an identity never seen.
        let known = self.frozen.get_or_insert_with(BTreeMap::new);
        for ep in cur.endpoints.values() {
            known.entry(ep.identity).or_insert(Enforcement {
                ingress: ep.enforces(Direction::Ingress),
                egress: ep.enforces(Direction::Egress),
            });
        }
        let known = known.clone();
        let cidrs: BTreeMap<Cidr, u32> = cur
            .ipcache
            .iter()
            .filter(|(_, v)| v.identity >= reserved::FIRST_CIDR)
            .map(|(c, v)| (*c, v.identity))
            .collect();
        // Audit mode while frozen: only the host-wide `run --audit` (the policies' annotations
        // and the labels are what cannot be read now).
        let all = Enforcement {
            ingress: self.audit_all,
            egress: self.audit_all,
        };
        let (container_ids, _) = self.running_identities()?;
        let mut d = self.world(
            &container_ids,
            &cidrs,
            |id| {
                known.get(&id).copied().unwrap_or(Enforcement {
                    ingress: true,
                    egress: true,
                })
            },
            |_, _| all,
        )?;
        d.maps.policy = cur.policy;
        let n = self.reconcile_base(d, PolicyOf::Own, None)?;
        self.save_soon()?;
        Ok(n)
    }

    /// The ifindex of the Linux bridge of network `id` (0 when unknown: then only the container's
    /// veth is accepted as the way in for its address).
    fn bridge_ifindex(&self, network_id: &str) -> u32 {
        let Some(name) = self
            .networks
            .get(network_id)
            .and_then(|n| n.bridge.as_deref())
        else {
            return 0;
        };
        let Ok(c) = std::ffi::CString::new(name) else {
            return 0;
        };
        // SAFETY: a valid NUL-terminated string.
        unsafe { libc::if_nametoindex(c.as_ptr()) }
    }

    /// Recomputes the desired state and reconciles the maps. Does nothing until Docker answered.
    pub fn sync(&mut self) -> Result<usize, AgentError> {
        if !self.docker_synced {
            return Ok(0);
        }
        let unparsable = self.sources.unparsable();
        if !unparsable.is_empty() {
            let n = self.sync_frozen()?;
            if n > 0 {
                info!(operations = n, "frozen maps follow the containers");
            }
            return Err(AgentError::Frozen(unparsable));
        }
        let t0 = std::time::Instant::now();
        self.refresh_labels();
        let policies = self.sources.policies();
        let t_labels = t0.elapsed();
        let (n, scoped, t_desired, t_reconcile) = match self.sync_scoped(policies) {
            Ok((n, desired, reconcile)) => {
                (n, true, t_labels + desired, t_labels + desired + reconcile)
            }
            Err(policies) => {
                let (desired, compiled, endpoints) = self.desired(&policies)?;
                let t_desired = t0.elapsed();
                self.prepare_rule_ids(&compiled);
                let n = self.reconcile_base(desired, PolicyOf::Compiled(&compiled), None)?;
                self.commit_rule_ids(&compiled);
                let t_reconcile = t0.elapsed();
                self.compiled = Some(compiled);
                self.compiled_from = Some((policies, endpoints));
                (n, false, t_desired, t_reconcile)
            }
        };
        self.frozen = None;
        #[cfg(test)]
        {
            self.scoped_syncs += usize::from(scoped);
        }
        self.save_soon()?;
        tracing::debug!(
            labels_ms = t_labels.as_secs_f64() * 1e3,
            desired_ms = (t_desired - t_labels).as_secs_f64() * 1e3,
            reconcile_ms = (t_reconcile - t_desired).as_secs_f64() * 1e3,
            total_ms = t0.elapsed().as_secs_f64() * 1e3,
            operations = n,
            scoped,
            "synced"
        );
        Ok(n)
    }

    /// The sync of Docker events while the policies are the ones the maps hold (the last
    /// compile's): only the local identities the changed containers concern are compiled again,
    /// in the compile itself ([`policy::recompile_endpoints_in_place`]), and only their policy
    /// entries are compared with the maps; nothing the size of the policy is copied or walked.
    /// The result is the full sync's (unit tests compare the two). Returns the operations and the
    /// time to build the desired state and to reconcile; `Err(policies)` when it does not apply
    /// or anything failed, with the compile as it was before: the caller then syncs in full (a
    /// failed reconcile has undone its writes and made the next one read the maps).
    fn sync_scoped(
        &mut self,
        policies: Vec<Policy>,
    ) -> Result<(usize, std::time::Duration, std::time::Duration), Vec<Policy>> {
        if self.written_policy != Some(BasePolicy::Compiled) {
            return Err(policies);
        }
        if !matches!(&self.compiled_from, Some((p, _)) if *p == policies) {
            return Err(policies);
        }
        let t0 = std::time::Instant::now();
        let (container_ids, endpoints) = match self.running_identities() {
            Ok(r) => r,
            Err(_) => return Err(policies),
        };
        let (Some(mut compiled), Some((_, prev_endpoints))) =
            (self.compiled.take(), self.compiled_from.as_ref())
        else {
            return Err(policies);
        };
        let recompile = match policy::recompile_endpoints_in_place(
            &mut compiled,
            &policies,
            prev_endpoints,
            &endpoints,
            &self.rule_ids,
        ) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "in-place recompile failed; compiling in full");
                self.compiled = Some(compiled);
                return Err(policies);
            }
        };
        tracing::debug!(
            compile_ms = t0.elapsed().as_secs_f64() * 1e3,
            incremental = true,
            recompiled = ?recompile.changed,
            entries = compiled.policy.len(),
            "compiled"
        );
        // As in `desired`: these numbers are never handed out again.
        self.rule_ids.raise_next(compiled.rule_ids.next());
        let base = match self.world_of(&container_ids, &compiled) {
            Ok(b) => b,
            Err(_) => {
                recompile.undo(&mut compiled);
                self.compiled = Some(compiled);
                return Err(policies);
            }
        };
        let t_desired = t0.elapsed();
        self.prepare_rule_ids(&compiled);
        let scope = match &recompile.changed {
            policy::Recompiled::Locals(dirty) => Some(dirty),
            policy::Recompiled::Full => None,
        };
        match self.reconcile_base(base, PolicyOf::Compiled(&compiled), scope) {
            Ok(n) => {
                self.commit_rule_ids(&compiled);
                self.compiled = Some(compiled);
                self.compiled_from = Some((policies, endpoints));
                Ok((n, t_desired, t0.elapsed() - t_desired))
            }
            Err(e) => {
                warn!(error = %e, "reconciling what the Docker events changed failed; reconciling in full");
                recompile.undo(&mut compiled);
                self.compiled = Some(compiled);
                Err(policies)
            }
        }
    }

    /// Reconciles `base` (the desired state from Docker's world) with `policy`'s entries plus the
    /// provisional endpoints, and remembers `base` for link events. With `scope`, only the
    /// policy entries of those local identities are compared with the maps, provided the maps
    /// hold the same policy source as before (else all are).
    fn reconcile_base(
        &mut self,
        base: Desired,
        policy: PolicyOf<'_>,
        scope: Option<&std::collections::BTreeSet<u32>>,
    ) -> Result<usize, AgentError> {
        let source = policy.source();
        let scope = match scope {
            Some(locals) if self.written_policy == Some(source) => {
                reconcile::PolicyScope::Locals(locals)
            }
            _ => reconcile::PolicyScope::All,
        };
        let (endpoints, attached) = self.with_provisional(&base);
        let want = reconcile::Want {
            ipcache: &base.maps.ipcache,
            endpoints: &endpoints,
            policy: match policy {
                PolicyOf::Own => &base.maps.policy,
                PolicyOf::Compiled(c) => &c.policy,
            },
            attached: &attached,
        };
        let started = std::time::Instant::now();
        let n = self
            .reconciler
            .reconcile_scoped(self.dp.as_mut(), want, scope);
        self.metrics.observe_reconcile(started.elapsed());
        drop((endpoints, attached));
        match n {
            Ok(n) => {
                self.written_policy = Some(source);
                self.last_base = Some((base, source));
                Ok(n)
            }
            Err(e) => {
                self.written_policy = None;
                Err(e.into())
            }
        }
    }

    /// The ifindexes of the Linux bridges of the bridge networks Docker reported.
    fn docker_bridges(&self) -> std::collections::BTreeSet<u32> {
        let names: std::collections::BTreeSet<&str> = self
            .networks
            .values()
            .filter(|n| n.is_bridge())
            .filter_map(|n| n.bridge.as_deref())
            .collect();
        self.host_links
            .values()
            .filter(|l| l.kind.as_deref() == Some("bridge") && names.contains(l.name.as_str()))
            .map(|l| l.ifindex)
            .collect()
    }

    /// Veths that are ports of a Docker bridge but not (yet) a known container's endpoint: a
    /// container that is starting, whose host veth the kernel reported before Docker did. Only
    /// veths whose master is the bridge of a network Docker reported are ever picked.
    fn provisional_veths(&self, claimed: &BTreeMap<u32, Endpoint>) -> Vec<u32> {
        if !self.docker_synced {
            return Vec::new();
        }
        let bridges = self.docker_bridges();
        self.host_links
            .values()
            .filter(|l| l.kind.as_deref() == Some("veth"))
            .filter(|l| l.master.is_some_and(|m| bridges.contains(&m)))
            .filter(|l| !claimed.contains_key(&l.ifindex))
            .map(|l| l.ifindex)
            .collect()
    }

    /// The endpoints and attachments of `d` plus a provisional endpoint on every unclaimed veth
    /// of a Docker bridge: identity `unmanaged`, both directions enforced and no address, so
    /// everything it sends is dropped as spoofed and nothing reaches it, until Docker identifies
    /// the container and its real endpoint replaces this one. Fails closed: a veth that is never
    /// claimed stays closed.
    fn with_provisional<'a>(
        &mut self,
        d: &'a Desired,
    ) -> (
        Cow<'a, BTreeMap<u32, Endpoint>>,
        Cow<'a, std::collections::BTreeSet<u32>>,
    ) {
        let veths = self.provisional_veths(&d.maps.endpoints);
        if veths.is_empty() {
            return (Cow::Borrowed(&d.maps.endpoints), Cow::Borrowed(&d.attached));
        }
        let (mut endpoints, mut attached) = (d.maps.endpoints.clone(), d.attached.clone());
        for ifindex in veths {
            endpoints.insert(
                ifindex,
                Endpoint::new(reserved::UNMANAGED).enforce(true, true),
            );
            attached.insert(ifindex);
            self.names
                .insert(ifindex, ("(new container)".to_owned(), reserved::UNMANAGED));
        }
        (Cow::Owned(endpoints), Cow::Owned(attached))
    }

    /// Link events from the host namespace. A veth that joins a Docker bridge is policed at once
    /// (see [`Self::with_provisional`]), without waiting for Docker's start event.
    pub fn on_link(&mut self, ev: LinkEvent) {
        let before = self
            .last_base
            .as_ref()
            .map(|(b, _)| self.provisional_veths(&b.maps.endpoints));
        match ev {
            LinkEvent::Snapshot(links) => {
                self.host_links = links.into_iter().map(|l| (l.ifindex, l)).collect();
            }
            LinkEvent::Changed(l) => {
                self.host_links.insert(l.ifindex, l);
            }
            LinkEvent::Removed(ifindex) => {
                self.host_links.remove(&ifindex);
            }
        }
        // A copy: kept if the reconcile fails. Without policy entries but when frozen.
        let Some((base, source)) = self.last_base.clone() else {
            return;
        };
        let after = self.provisional_veths(&base.maps.endpoints);
        if before.as_ref() == Some(&after) {
            return;
        }
        // The policy is the one last reconciled: none of its entries is compared again.
        let compiled = self.compiled.take();
        let policy = match (source, &compiled) {
            (BasePolicy::Compiled, Some(c)) => PolicyOf::Compiled(c),
            // Fails closed: without a compile no entry allows anything.
            _ => PolicyOf::Own,
        };
        let unchanged = std::collections::BTreeSet::new();
        let result = self.reconcile_base(base, policy, Some(&unchanged));
        self.compiled = compiled;
        match result {
            Ok(n) => {
                if n > 0 {
                    info!(veths = ?after, operations = n, "new veths on Docker bridges policed (provisional)");
                }
            }
            Err(e) => {
                error!(error = %e, "policing a new veth failed; the previous state stays in force");
                self.last_error = Some(e.to_string());
            }
        }
    }

    pub fn sync_logged(&mut self, why: &str) {
        match self.sync() {
            Ok(n) => {
                self.last_error = None;
                if n > 0 {
                    info!(why, operations = n, "maps reconciled");
                }
            }
            Err(e) => {
                error!(why, error = %e, "reconcile failed; the previous state stays in force");
                self.last_error = Some(e.to_string());
            }
        }
    }

    pub fn on_docker(&mut self, ev: DockerEvent) {
        self.on_docker_batch(vec![ev]);
    }

    /// Applies Docker events that queued up, then reconciles once: the same end state as one
    /// reconcile per event, without recompiling every policy for each event of a burst (500
    /// containers starting). Meanwhile nothing is more open than before: a new container's veth
    /// is closed from the kernel's link event on, and a container that went is removed in the
    /// same reconcile.
    pub fn on_docker_batch(&mut self, events: Vec<DockerEvent>) {
        let mut why: Vec<String> = Vec::new();
        let mut masq = false;
        let mut times = Vec::new();
        let n_events = events.len();
        let mut queue: std::collections::VecDeque<DockerEvent> = events.into();
        while let Some(ev) = queue.pop_front() {
            match ev {
                DockerEvent::At { time, event } => {
                    times.push(time);
                    queue.push_front(*event);
                }
                DockerEvent::Snapshot {
                    containers,
                    networks,
                } => {
                    self.containers = containers.into_iter().map(|c| (c.id.clone(), c)).collect();
                    self.networks = networks.into_iter().map(|n| (n.id.clone(), n)).collect();
                    (self.host_addrs, self.host_groups) = host_address_sets().unwrap_or_else(|e| {
                        warn!(error = %e, "listing host addresses");
                        (Vec::new(), Vec::new())
                    });
                    self.docker_synced = true;
                    self.docker_status =
                        format!("connected ({} containers)", self.containers.len());
                    why.push("docker snapshot".into());
                    masq = true;
                }
                DockerEvent::ContainerUp(c) => {
                    why.push(format!("container {} up", c.name));
                    self.containers.insert(c.id.clone(), c);
                }
                DockerEvent::ContainerDown { id } => {
                    if let Some(c) = self.containers.remove(&id) {
                        why.push(format!("container {} down", c.name));
                    }
                }
                DockerEvent::NetworksChanged(networks) => {
                    self.networks = networks.into_iter().map(|n| (n.id.clone(), n)).collect();
                    why.push("networks changed".into());
                    masq = true;
                }
                DockerEvent::Disconnected(reason) => {
                    warn!(%reason, "Docker unreachable; enforcement continues with the last state");
                    self.docker_status = format!("unreachable: {reason}");
                }
            }
        }
        if !why.is_empty() {
            let why = if why.len() > 3 {
                format!(
                    "{} and {} more Docker events",
                    why[..3].join(", "),
                    why.len() - 3
                )
            } else {
                why.join(", ")
            };
            self.sync_logged(&why);
        }
        if masq {
            self.sync_masq();
        }
        for t in &times {
            self.metrics.observe_docker_lag(*t);
        }
        let now = std::time::SystemTime::now();
        let lags: Vec<u64> = times
            .iter()
            .map(|t| now.duration_since(*t).unwrap_or_default().as_millis() as u64)
            .collect();
        tracing::debug!(events = n_events, ?lags, "Docker events applied");
    }

    /// `policy import`: every document of every file must parse, the result must compile and fit,
    /// and then it is applied and persisted; otherwise nothing changes.
    pub fn import(&mut self, files: &[SourceFile]) -> Result<Vec<String>, AgentError> {
        let new = imports::parse_import(
            files.iter().map(|f| (f.path.as_str(), f.text.as_str())),
            &self.filter,
        )
        .map_err(|errors| AgentError::Invalid(errors.join("\n")))?;
        let conflicts = self.sources.name_conflicts(&new);
        if !conflicts.is_empty() {
            return Err(AgentError::Invalid(conflicts.join("\n")));
        }
        let mut candidate = self.sources.imports.set().clone();
        for (k, v) in &new {
            candidate.insert(k.clone(), v.clone());
        }
        self.apply_imported(candidate)?;
        Ok(new.into_keys().collect())
    }

    /// Compiles, checks, applies and persists a new set of imported policies, or changes nothing.
    fn apply_imported(&mut self, candidate: ImportSet) -> Result<(), AgentError> {
        let unparsable = self.sources.unparsable_with(&candidate);
        if !unparsable.is_empty() {
            return Err(AgentError::Frozen(unparsable));
        }
        self.refresh_labels();
        let policies = self.sources.policies_with(&candidate);
        let (desired, compiled, endpoints) = self.desired(&policies)?;
        let sizes = self.dp.sizes();
        let (eps, attached) = self.with_provisional(&desired);
        reconcile::check_fit(
            reconcile::Want {
                ipcache: &desired.maps.ipcache,
                endpoints: &eps,
                policy: &compiled.policy,
                attached: &attached,
            },
            &sizes,
        )?;
        drop((eps, attached));
        // Persist first; undo the files if the maps cannot be written.
        let old = self.sources.imports.set().clone();
        imports::persist(&self.store, &old, &candidate)?;
        if self.docker_synced {
            self.prepare_rule_ids(&compiled);
            if let Err(e) = self.reconcile_base(desired, PolicyOf::Compiled(&compiled), None) {
                imports::restore(&self.store, &old, &candidate);
                return Err(e);
            }
            self.commit_rule_ids(&compiled);
            self.compiled = Some(compiled);
            self.compiled_from = Some((policies, endpoints));
            self.frozen = None;
        }
        self.sources.imports.replace(candidate);
        self.save()?;
        Ok(())
    }

    /// `policy delete NAME…` / `--all`: every name must be an imported policy, else nothing
    /// changes.
    pub fn delete(&mut self, names: &[String], all: bool) -> Result<Vec<String>, AgentError> {
        let mut candidate = self.sources.imports.set().clone();
        let removed: Vec<String> = if all {
            std::mem::take(&mut candidate).into_keys().collect()
        } else {
            let missing: Vec<&str> = names
                .iter()
                .filter(|n| !candidate.contains_key(*n))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() || names.is_empty() {
                return Err(AgentError::NotFound(missing.join(", ")));
            }
            for n in names {
                candidate.remove(n);
            }
            let mut removed = names.to_vec();
            removed.sort();
            removed.dedup();
            removed
        };
        self.apply_imported(candidate)?;
        // A policy file rejected because it used a name that is free now.
        if self.policy_dir_has_rejected() {
            self.reload_policy_dir();
            self.sync_logged("imported policy deleted");
        }
        Ok(removed)
    }

    fn policy_dir_has_rejected(&self) -> bool {
        !self.sources.files.rejected().is_empty()
    }

    pub fn policy_rows(&self, name: Option<&str>) -> Result<Vec<PolicyRow>, AgentError> {
        let mut rows: Vec<PolicyRow> = self
            .sources
            .imports
            .set()
            .iter()
            .map(|(n, i)| PolicyRow {
                name: n.clone(),
                source: "imported".into(),
                text: i.text.clone(),
                error: i
                    .policy
                    .as_ref()
                    .err()
                    .map(|e| format!("no longer parses: {e} (the maps are left as they are)")),
            })
            .collect();
        for f in self.sources.files.iter() {
            let source = f.path.display().to_string();
            let error = f.error.as_ref().map(|e| match &f.in_force {
                Some(_) => format!("rejected: {e} (its last valid version stays in force)"),
                None => format!("rejected: {e} (no valid version: none of its policies apply)"),
            });
            match f.in_force.as_ref().map(|v| (&v.text, &v.policies)) {
                Some((text, Ok(policies))) => {
                    for p in policies {
                        rows.push(PolicyRow {
                            name: p.name.clone(),
                            source: source.clone(),
                            text: text.clone(),
                            error: error.clone(),
                        });
                    }
                }
                Some((text, Err(e))) => rows.push(PolicyRow {
                    name: "-".into(),
                    source,
                    text: text.clone(),
                    error: Some(format!(
                        "its last valid version no longer parses: {e} (the maps are left as they are)"
                    )),
                }),
                None => rows.push(PolicyRow {
                    name: "-".into(),
                    source,
                    text: String::new(),
                    error,
                }),
            }
        }
        for c in self.containers.values().filter(|c| c.running) {
            let labels: Vec<String> = netpol_labels(&c.labels)
                .iter()
                .map(|(k, v)| format!("{k}: {v:?}\n"))
                .collect();
            if !labels.is_empty() {
                rows.push(PolicyRow {
                    name: c.name.clone(),
                    source: format!("labels of {}", c.name),
                    text: labels.concat(),
                    error: self
                        .sources
                        .labels
                        .notes()
                        .get(&c.name)
                        .map(|n| n.summary()),
                });
            }
        }
        if let Some(n) = name {
            rows.retain(|r| r.name == n);
            if rows.is_empty() {
                return Err(AgentError::NotFound(n.to_owned()));
            }
        }
        Ok(rows)
    }

    pub fn endpoint_rows(&mut self) -> Vec<EndpointRow> {
        let mut rows = Vec::new();
        let containers: Vec<Container> = self.containers.values().cloned().collect();
        for c in &containers {
            let id = self
                .ids
                .lookup(&identity_labels(&self.filter, &labels_of(c)));
            let labels = id.and_then(|i| self.ids.labels(i));
            let identity_name = id.map(|i| display_name(i, labels)).unwrap_or_default();
            // While frozen, what the maps enforce (see `sync_frozen`), not the last compile.
            let enf = id
                .and_then(|i| match &self.frozen {
                    Some(known) => Some(known.get(&i).copied().unwrap_or(Enforcement {
                        ingress: true,
                        egress: true,
                    })),
                    None => self
                        .compiled
                        .as_ref()
                        .and_then(|cp| cp.enforcement.get(&i).copied()),
                })
                .unwrap_or_default();
            let base = EndpointRow {
                container: c.short_id().to_owned(),
                name: c.name.clone(),
                identity: id,
                identity_name,
                ..EndpointRow::default()
            };
            if c.networks.is_empty() {
                let state = match c.enforceable() {
                    Ok(()) => "no network".to_owned(),
                    Err(e) => format!("not enforceable: {e}"),
                };
                rows.push(EndpointRow {
                    network: format!("{:?}", c.network_mode),
                    state,
                    ..base
                });
                continue;
            }
            for a in &c.networks {
                let mut r = EndpointRow {
                    network: a.network_name.clone(),
                    ifindex: a.host_veth,
                    ipv4: a.ipv4.map(|x| x.to_string()),
                    ipv6: a.ipv6.map(|x| x.to_string()),
                    ..base.clone()
                };
                r.state = match (&a.enforceable, a.host_veth) {
                    (Err(e), _) => format!("not enforceable: {e}"),
                    (Ok(()), None) => "not enforceable: host veth not found (retrying)".into(),
                    (Ok(()), Some(_)) => {
                        r.ingress_enforced = enf.ingress;
                        r.egress_enforced = enf.egress;
                        if enf.ingress || enf.egress {
                            "enforced".into()
                        } else {
                            "unrestricted (no policy selects it)".into()
                        }
                    }
                };
                if let Some(n) = self.sources.labels.notes().get(&c.name) {
                    r.state = format!("{} (netpol labels: {})", r.state, n.summary());
                }
                rows.push(r);
            }
        }
        rows
    }

    pub fn identity_rows(&self) -> Vec<IdentityRow> {
        let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
        for c in self.containers.values().filter(|c| c.running) {
            if let Some(id) = self
                .ids
                .lookup(&identity_labels(&self.filter, &labels_of(c)))
            {
                *counts.entry(id).or_default() += 1;
            }
        }
        let mut rows: Vec<IdentityRow> = [reserved::HOST, reserved::WORLD, reserved::UNMANAGED]
            .iter()
            .map(|&id| IdentityRow {
                id,
                name: display_name(id, None),
                labels: Labels::new(),
                containers: 0,
            })
            .collect();
        for (id, labels) in self.ids.iter() {
            rows.push(IdentityRow {
                id,
                name: display_name(id, Some(labels)),
                labels: labels.clone(),
                containers: counts.get(&id).copied().unwrap_or(0),
            });
        }
        if let Some(cp) = &self.compiled {
            for (cidr, id) in &cp.cidr_identities {
                rows.push(IdentityRow {
                    id: *id,
                    name: format!("cidr:{cidr}"),
                    labels: Labels::new(),
                    containers: 0,
                });
            }
        }
        rows
    }

    pub fn status(&self) -> serde_json::Value {
        let drops = self.dp.drop_counters().unwrap_or_default();
        let drops: BTreeMap<String, u64> = drops
            .into_iter()
            .map(|(r, n)| {
                (
                    netpol_common::DropReason::from_u8(r)
                        .map_or(r.to_string(), |d| d.as_str().to_owned()),
                    n,
                )
            })
            .collect();
        let audits: BTreeMap<String, u64> = self
            .dp
            .audit_counters()
            .unwrap_or_default()
            .into_iter()
            .map(|(r, n)| {
                (
                    netpol_common::DropReason::from_u8(r)
                        .map_or(r.to_string(), |d| d.as_str().to_owned()),
                    n,
                )
            })
            .collect();
        let ev = self.dp.event_stats().unwrap_or_default();
        let rejected = self.sources.files.rejected();
        let attached = self.dp.attached().map(|a| a.len()).unwrap_or(0);
        serde_json::json!({
            "agent": "running",
            "docker": self.docker_status,
            "endpoints_attached": attached,
            "containers": self.containers.values().filter(|c| c.running).count(),
            "identities": self.ids.len(),
            "policies_imported": self.sources.imports.len(),
            "policy_files": self.sources.files.len(),
            "policy_files_rejected": rejected,
            "policies_unparsable": self.sources.unparsable(),
            "label_errors": self.sources.labels.errors(),
            "label_warnings": self.sources.labels.warnings(),
            "policy_entries": self.compiled.as_ref().map_or(0, |c| c.policy.len()),
            "map_sizes": self.dp.sizes(),
            "drops": drops,
            "audit_all": self.audit_all,
            "audits": audits,
            "events_suppressed": {
                "drops": ev.suppressed_drops,
                "flows": ev.suppressed_flows,
                "audits": ev.suppressed_audits,
                "ring_full": ev.ring_full,
            },
            "masq6": self.masq.as_ref().map_or("off", |m| m.status()),
            "masq6_flows": self.masq.as_ref().map_or(0, |m| m.flows()),
            "last_error": self.last_error,
            "state_recovered": self.recovered,
        })
    }

    /// The label identities of the running containers, with their labels.
    pub fn local_identities(&self) -> BTreeMap<u32, Labels> {
        let ids = self
            .compiled
            .iter()
            .flat_map(|c| c.enforcement.keys().copied());
        ids.chain(self.names.values().map(|(_, id)| *id))
            .filter_map(|id| self.ids.labels(id).map(|l| (id, l.clone())))
            .collect()
    }

    /// The datapath's event counters (rate limit, full ring buffer), if it can read them.
    pub fn event_stats(&self) -> Option<netpol_common::stats::EventStats> {
        self.dp.event_stats().ok()
    }

    pub fn labels_of_identity(&self, id: u32) -> Option<&Labels> {
        self.ids.labels(id)
    }

    /// Every policy in force (imports, files, compose labels).
    pub fn policies_in_force(&self) -> Vec<Policy> {
        self.sources.policies()
    }

    pub fn identity_name(&self, id: u32) -> String {
        display_name(id, self.ids.labels(id))
    }

    /// Where rule `rule` comes from (the last compile's rule table).
    pub fn rule_info(&self, rule: u32) -> Option<policy::RuleInfo> {
        self.compiled
            .as_ref()
            .and_then(|c| c.rules.get(&rule))
            .cloned()
    }

    /// The policies that make `identity`'s `dir` default deny (the last compile).
    pub fn default_deny_by(&self, identity: u32, dir: Direction) -> Vec<String> {
        self.compiled
            .as_ref()
            .map(|c| {
                c.default_deny_of(identity, dir)
                    .into_iter()
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether policy enforces `identity`'s `dir` (the last compile; `None` before one).
    pub fn enforces(&self, identity: u32, dir: Direction) -> Option<bool> {
        self.compiled.as_ref().map(|c| {
            let e = c.enforcement_of(identity);
            match dir {
                Direction::Ingress => e.ingress,
                Direction::Egress => e.egress,
            }
        })
    }

    pub fn rule_name(&self, rule: u32) -> Option<String> {
        self.compiled
            .as_ref()
            .and_then(|c| c.rules.get(&rule))
            .map(|r| r.to_string())
    }

    pub fn set_trace_flows(&mut self, on: bool) {
        if let Err(e) = self.dp.set_trace_flows(on) {
            warn!(error = %e, "switching flow tracing");
        }
    }
}

#[path = "state_trace.rs"]
mod trace;

impl super::monitor_filter::Lookup for Agent {
    fn container_is(&self, pattern: &str, ifindex: Option<u32>, addr: Option<IpAddr>) -> bool {
        self.containers.values().any(|c| {
            super::monitor_filter::names_container(pattern, &c.id, &c.name)
                && c.networks.iter().any(|a| {
                    ifindex.is_some_and(|i| a.host_veth == Some(i))
                        || addr.is_some_and(|ip| a.addresses().any(|x| x == ip))
                })
        })
    }

    fn identity_labels(&self, id: u32) -> Option<&BTreeMap<String, String>> {
        self.ids.labels(id)
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;

/// The host's own addresses, and its broadcast and subnet-router anycast addresses, read at
/// each Docker snapshot ([`crate::docker::host_address_sets`]).
#[cfg(not(test))]
fn host_address_sets() -> anyhow::Result<(Vec<IpAddr>, Vec<IpAddr>)> {
    Ok(crate::docker::host_address_sets()?)
}

/// Unit tests read a fixed set instead: the real host's addresses change under them (other
/// tests' and processes' veths come and go with their fe80:: addresses), so two agents compared
/// map by map could see different ones. The group addresses are those of 192.0.2.1/24 and
/// 2001:db8::1/64.
#[cfg(test)]
fn host_address_sets() -> anyhow::Result<(Vec<IpAddr>, Vec<IpAddr>)> {
    let parse =
        |a: &[&str]| -> Vec<IpAddr> { a.iter().map(|a| a.parse().expect("address")).collect() };
    Ok((
        parse(&["127.0.0.1", "::1", "192.0.2.1", "2001:db8::1", "fe80::1"]),
        parse(&["192.0.2.255", "2001:db8::"]),
    ))
}
