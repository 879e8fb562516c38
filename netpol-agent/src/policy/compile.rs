//! Policies + endpoints → `POLICY` entries, enforced directions, CIDR identities, rule table.
//!
//! # Entries
//! For every local label identity selected by a spec and every rule of that spec, one entry per
//! (remote identity, L4 key), keyed as `netpol_common::policy` lays out:
//! - a rule without `toPorts`/`icmps`: prefix 72 (every protocol and port, ICMP included);
//! - a port of 0 (or no port): prefix 80 for the protocol; a port range: the aligned blocks of
//!   `port_range_blocks` (prefix 80 + n); a single port: prefix 96;
//! - `protocol: ANY` (Cilium's default when absent) = TCP, UDP and SCTP (not ICMP);
//! - ICMP / ICMPv6: protocol 1 / 58, the type in the port field, prefix 96.
//!
//! Remote identities: `fromEndpoints` items select label identities of [`Endpoints`]
//! (`[{}]` = every container, never host, world or unmanaged); `world` = WORLD plus every CIDR
//! identity; `host` = HOST; `all` = ANY (the wildcard); a rule with ports but no peer field = ANY;
//! an explicitly empty peer list (`fromEndpoints: []`) = nothing; an empty rule `{}` = nothing
//! (it only makes the direction default-deny).
//!
//! When two rules give the same key, deny beats allow, then the lower rule id is kept.
//!
//! # Rule ids
//! Every rule gets the id [`super::rule_ids`] gives it: the same rule keeps its number across
//! compiles (other policies, specs or rules added, edited or removed around it) and restarts
//! ([`compile_stable`] with the last result's [`Compiled::rule_ids`]); a new or edited rule gets a
//! number never used before. Ids are allocated in compile order (policies by name and source,
//! specs, ingress then egress, allow then deny sections, rules), so a compile from an empty table
//! numbers the rules 1, 2, 3, … in that order.
//!
//! # Deny folding
//! The kernel takes the longest match per (local, remote, direction) in two lookups (remote, then
//! ANY) and a deny from either wins. Within one (local, remote, direction) a longer allow would
//! hide a shorter deny, so every allow entry covered by a deny entry of the same (local, remote,
//! direction) becomes a deny, **carrying the rule id of the most specific covering deny** (so a
//! drop event names the deny rule that caused it). A deny under ANY against an allow under a
//! specific remote needs no folding: the two lookups see both.
//!
//! # Group destinations
//! Every egress deny of a specific remote is also written under the reserved remote `GROUP`
//! ([`group_denies`]): the datapath decides a container's packet to a group or link-local
//! address (every container and the host receive it) under `GROUP` and `ANY`, so only an allow
//! for everyone lets it out, and a deny of any peer still stops it.
//!
//! # Final allows
//! After folding, an allow of a specific remote that no deny under ANY of the same (local,
//! direction) overlaps ([`overlaps`](netpol_common::policy::overlaps): some packet matches both)
//! is flagged [`PolicyValue::FINAL`]: the kernel then decides it with the first lookup alone, since
//! the wildcard lookup can only find an allow or nothing for the packets it matches. An allow
//! that such a deny overlaps is not flagged and takes both lookups ([`mark_final`]).
//!
//! # CIDR identities
//! Every prefix of a CIDR rule or `except` in any policy (whether or not it selects a local
//! endpoint) gets an identity from [`FIRST_CIDR`] upward, in prefix order, so one prefix set always
//! gives the same numbers; [`compile_with_previous`] keeps the numbers of prefixes that were
//! already allocated and gives new prefixes the lowest number `previous` does not have (not the
//! number of a prefix that is gone: the maps hold it while the change is written; the agent's
//! first compile takes `previous` from the maps). The ipcache resolves an address
//! to its most specific prefix only, so a CIDR selector selects every CIDR identity whose prefix
//! lies within it and not within one of its `except` prefixes (as Cilium's CIDR labels do).
//! A CIDR selects its own address family only: `0.0.0.0/0` and `::/0` are ordinary prefixes with
//! identities of their own (Cilium's `world-ipv4` / `world-ipv6`), so `0.0.0.0/0` never selects an
//! IPv6 address and `::/0` never an IPv4 one; only the `world` entity (WORLD, the ipcache's miss
//! value, plus every CIDR identity) covers both families. CIDR rules do not select containers or
//! the host: their own ipcache entries are more specific.
//!
//! # Enforcement
//! A direction is enforced for a local identity when a selecting spec is default-deny there
//! ([`Spec::default_deny`]). If only specs that opted out (`enableDefaultDeny: false`) select it
//! and they carry deny rules, the direction is enforced too, with an implicit allow-all entry
//! (remote ANY, prefix 72, rule [`IMPLICIT_ALLOW_RULE`]) under the denies, so the denies apply and
//! everything else passes. Entries of a direction that is not enforced are dropped.
//!
//! # Causes and audit mode
//! [`Compiled::default_deny_of`] names, for every (local identity, direction) that is default
//! deny, the policies that made it so (for drop events without a rule). A direction is in audit
//! mode ([`Compiled::audit`]) when every spec that enforces it there (default deny or deny
//! rules) is an audit spec ([`Spec::audit`]): an audit policy never weakens a direction that an
//! enforcing policy also protects. The agent adds the audit of container labels and `run
//! --audit` on top.

use std::collections::{BTreeMap, BTreeSet};

use netpol_common::{
    identity::{ANY, FIRST_LABEL, GROUP, HOST, WORLD},
    policy::{
        overlaps, port_range_blocks, PolicyKey, PolicyValue, FULL_PREFIX, PREFIX_ANY_PORT,
        PREFIX_ANY_PROTO,
    },
    proto, Direction,
};

use super::{
    rule_ids::{Allocator, RuleIds, RuleKey},
    Endpoints, Entity, IcmpFamily, Peer, Peers, Policy, PortRule, Rule, Spec, L4,
};
use crate::{
    datapath::{Cidr, MapSizes, PolicyEntryKey},
    identity::FIRST_CIDR,
};

/// Rule id of the implicit allow-all entry under deny rules of an opted-out direction (and of
/// traffic that no rule decided, in events).
pub const IMPLICIT_ALLOW_RULE: u32 = 0;

/// Which directions of a local identity are checked against policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Enforcement {
    pub ingress: bool,
    pub egress: bool,
}

impl Enforcement {
    fn set(&mut self, dir: Direction, on: bool) {
        match dir {
            Direction::Ingress => self.ingress = on,
            Direction::Egress => self.egress = on,
        }
    }

    pub fn get(&self, dir: Direction) -> bool {
        match dir {
            Direction::Ingress => self.ingress,
            Direction::Egress => self.egress,
        }
    }
}

/// Where a rule id comes from, for events and `monitor`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInfo {
    pub policy: String,
    /// `ingress[0]`, `egressDeny[1]`, or `specs[1].ingress[0]` for a policy with several specs.
    pub section: String,
    /// The file, or `labels of <container>`.
    pub source: String,
}

impl std::fmt::Display for RuleInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ({})", self.policy, self.section, self.source)
    }
}

/// The compiler's output. Everything is ordered, so equal inputs give equal outputs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Every local label identity of the input, with its enforced directions.
    pub enforcement: BTreeMap<u32, Enforcement>,
    pub policy: BTreeMap<PolicyEntryKey, PolicyValue>,
    /// Ipcache entries for CIDR rules.
    pub cidr_identities: BTreeMap<Cidr, u32>,
    /// Rule id (from 1) → origin.
    pub rules: BTreeMap<u32, RuleInfo>,
    /// (local identity, direction) → the policies that select it with rules or
    /// `enableDefaultDeny` in that direction, in compile order: why a direction is enforced
    /// (`policy trace`, drop causes).
    pub selections: BTreeMap<(u32, Direction), Vec<Selection>>,
    /// Local identities whose directions are in audit mode by policy annotation.
    pub audit: BTreeMap<u32, Enforcement>,
    /// The rule id table of this result: give it to the next compile ([`compile_stable`]).
    pub rule_ids: RuleIds,
    /// Local identity → the entries its rules made before they were merged and checked against
    /// [`MAX_ENTRIES`] (what the limit counts), so that [`recompile_endpoints`] refuses exactly
    /// what a full compile refuses.
    raw_entries: BTreeMap<u32, usize>,
}

/// A policy that selects a local identity in one direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    pub policy: String,
    /// The spec makes the direction default deny; otherwise it only brings deny rules (it
    /// opted out with `enableDefaultDeny: false`).
    pub default_deny: bool,
}

/// Map entries a [`Compiled`] needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needed {
    pub policy: usize,
    pub ipcache4: usize,
    pub ipcache6: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("map {map} would need {needed} entries but holds {max}: the change was not applied")]
pub struct CapacityError {
    pub map: &'static str,
    pub needed: usize,
    pub max: u32,
}

/// More `POLICY` entries than this stop a compile: 32 times the default map size, and bounded
/// memory (about 25 MB) whatever the policies multiply out to (rules × peers × port blocks ×
/// selected containers).
pub const MAX_ENTRIES: usize = 1 << 19;

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("too many CIDR prefixes in policies ({0}) for the CIDR identity range")]
    TooManyCidrs(usize),
    #[error("the policies need more than {MAX_ENTRIES} POLICY entries (at {policy} {section}): nothing was applied")]
    TooManyEntries { policy: String, section: String },
    #[error("no rule id is free (at {policy} {section}): nothing was applied")]
    TooManyRules { policy: String, section: String },
}

impl Compiled {
    /// Entries the result needs (ipcache: only the CIDR entries).
    pub fn needed(&self) -> Needed {
        let v4 = self
            .cidr_identities
            .keys()
            .filter(|c| c.addr.is_ipv4())
            .count();
        Needed {
            policy: self.policy.len(),
            ipcache4: v4,
            ipcache6: self.cidr_identities.len() - v4,
        }
    }

    /// Whether the result fits `sizes`, with `other_ipcache4` / `other_ipcache6` entries the
    /// caller adds (container, host and network addresses).
    pub fn check_fits(
        &self,
        sizes: &MapSizes,
        other_ipcache4: usize,
        other_ipcache6: usize,
    ) -> Result<(), CapacityError> {
        let n = self.needed();
        for (map, needed, max) in [
            (netpol_common::maps::POLICY, n.policy, sizes.policy),
            (
                netpol_common::maps::IPCACHE4,
                n.ipcache4 + other_ipcache4,
                sizes.ipcache4,
            ),
            (
                netpol_common::maps::IPCACHE6,
                n.ipcache6 + other_ipcache6,
                sizes.ipcache6,
            ),
        ] {
            if needed > max as usize {
                return Err(CapacityError { map, needed, max });
            }
        }
        Ok(())
    }

    /// Enforced directions of `identity` (none if unknown).
    pub fn enforcement_of(&self, identity: u32) -> Enforcement {
        self.enforcement.get(&identity).copied().unwrap_or_default()
    }

    /// Directions of `identity` in audit mode by policy annotation (none if unknown).
    pub fn audit_of(&self, identity: u32) -> Enforcement {
        self.audit.get(&identity).copied().unwrap_or_default()
    }

    /// The policies that make `identity`'s `dir` default deny (empty if none), in compile
    /// order: the cause of a drop without a rule.
    pub fn default_deny_of(&self, identity: u32, dir: Direction) -> Vec<&str> {
        self.selections
            .get(&(identity, dir))
            .map(|v| {
                v.iter()
                    .filter(|s| s.default_deny)
                    .map(|s| s.policy.as_str())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The prefix of a CIDR identity, for display.
    pub fn cidr_of(&self, identity: u32) -> Option<Cidr> {
        self.cidr_identities
            .iter()
            .find(|(_, &id)| id == identity)
            .map(|(c, _)| *c)
    }
}

/// Compiles with fresh CIDR identity numbers. See the module documentation.
pub fn compile(policies: &[Policy], endpoints: &Endpoints) -> Result<Compiled, CompileError> {
    compile_with_previous(policies, endpoints, &BTreeMap::new())
}

/// Compiles, keeping the CIDR identities of `previous` (the last result's `cidr_identities`) for
/// prefixes that are still used; rule ids from an empty table.
pub fn compile_with_previous(
    policies: &[Policy],
    endpoints: &Endpoints,
    previous: &BTreeMap<Cidr, u32>,
) -> Result<Compiled, CompileError> {
    compile_stable(policies, endpoints, previous, &RuleIds::default())
}

/// Compiles, keeping the CIDR identities of `previous` for prefixes that are still used and the
/// ids of `rule_ids` (the last result's [`Compiled::rule_ids`], or the persisted table) for rules
/// that are still there.
pub fn compile_stable(
    policies: &[Policy],
    endpoints: &Endpoints,
    previous: &BTreeMap<Cidr, u32>,
    rule_ids: &RuleIds,
) -> Result<Compiled, CompileError> {
    compile_locals(policies, endpoints, previous, rule_ids, None)
}

/// `compile_stable(policies, endpoints, &prev.cidr_identities, rule_ids)`, computed from `prev`,
/// the result of compiling the same `policies` with the same `rule_ids` for `prev_endpoints`: only the local identities whose
/// part of the result can differ are compiled again (a container of a new identity starting
/// among 500: its own entries, not 10,000).
///
/// Everything a compile produces for a local identity (its entries, enforced and audited
/// directions, selections, its count towards [`MAX_ENTRIES`]) depends on the policies, its own
/// labels and the label identities its rules' endpoint selectors pick out; rule ids and CIDR
/// identities depend on the policies only. So an identity that came or went changes its own part
/// and the part of every local identity selected by a spec with an endpoint selector that matches
/// it (or its labels changed: both old and new labels count).
///
/// The caller must pass the very policies `prev` was compiled from: with other policies the result
/// is wrong (the agent compiles in full whenever a policy source changed).
pub fn recompile_endpoints(
    prev: &Compiled,
    policies: &[Policy],
    prev_endpoints: &Endpoints,
    endpoints: &Endpoints,
    rule_ids: &RuleIds,
) -> Result<Compiled, CompileError> {
    let mut c = prev.clone();
    recompile_endpoints_in_place(&mut c, policies, prev_endpoints, endpoints, rule_ids)?;
    Ok(c)
}

/// What [`recompile_endpoints_in_place`] changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recompiled {
    /// Only the part of these local identities (their entries, enforcement, selections,
    /// audit), and the rule table and CIDR identities: every `policy` entry of another local
    /// identity is as before.
    Locals(BTreeSet<u32>),
    /// Compiled in full (the entry limit was reached): anything may differ.
    Full,
}

/// A [`recompile_endpoints_in_place`] done, and how to take it back.
#[derive(Debug)]
pub struct Recompile {
    pub changed: Recompiled,
    undo: Undo,
}

// `Locals` is the common case, moved once: boxing it would allocate on every event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Undo {
    Nothing,
    /// The former part of the recompiled local identities, and the former tables.
    Locals {
        enforcement: Vec<(u32, Enforcement)>,
        policy: Vec<(PolicyEntryKey, PolicyValue)>,
        selections: Vec<((u32, Direction), Vec<Selection>)>,
        audit: Vec<(u32, Enforcement)>,
        raw_entries: Vec<(u32, usize)>,
        rules: BTreeMap<u32, RuleInfo>,
        rule_ids: RuleIds,
        cidr_identities: BTreeMap<Cidr, u32>,
    },
    Whole(Box<Compiled>),
}

impl Recompile {
    /// Makes `c` (the compile this recompiled) what it was before.
    pub fn undo(self, c: &mut Compiled) {
        match self.undo {
            Undo::Nothing => {}
            Undo::Whole(old) => *c = *old,
            Undo::Locals {
                enforcement,
                policy,
                selections,
                audit,
                raw_entries,
                rules,
                rule_ids,
                cidr_identities,
            } => {
                let Recompiled::Locals(dirty) = &self.changed else {
                    return;
                };
                remove_locals(c, dirty);
                c.enforcement.extend(enforcement);
                c.policy.extend(policy);
                c.selections.extend(selections);
                c.audit.extend(audit);
                c.raw_entries.extend(raw_entries);
                c.rules = rules;
                c.rule_ids = rule_ids;
                c.cidr_identities = cidr_identities;
            }
        }
    }
}

/// Takes the part of the local identities `dirty` out of `c`.
fn remove_locals(c: &mut Compiled, dirty: &BTreeSet<u32>) -> Undo {
    fn take<K: Ord + Clone, V>(m: &mut BTreeMap<K, V>, keys: Vec<K>) -> Vec<(K, V)> {
        keys.into_iter()
            .filter_map(|k| m.remove(&k).map(|v| (k, v)))
            .collect()
    }
    let mut policy = Vec::new();
    for &local in dirty {
        let keys: Vec<PolicyEntryKey> = PolicyEntryKey::entries_of(&c.policy, local)
            .map(|(k, _)| *k)
            .collect();
        policy.extend(take(&mut c.policy, keys));
    }
    let of = |l: &u32| dirty.contains(l);
    let enforcement = c.enforcement.keys().filter(|l| of(l)).copied().collect();
    let selections = c
        .selections
        .keys()
        .filter(|(l, _)| of(l))
        .copied()
        .collect();
    let audit = c.audit.keys().filter(|l| of(l)).copied().collect();
    let raw_entries = c.raw_entries.keys().filter(|l| of(l)).copied().collect();
    Undo::Locals {
        enforcement: take(&mut c.enforcement, enforcement),
        policy,
        selections: take(&mut c.selections, selections),
        audit: take(&mut c.audit, audit),
        raw_entries: take(&mut c.raw_entries, raw_entries),
        rules: BTreeMap::new(),
        rule_ids: RuleIds::default(),
        cidr_identities: BTreeMap::new(),
    }
}

/// [`recompile_endpoints`] on `c` itself, without copying it: on success `c` is the compile for
/// `endpoints`, and the result says which local identities' part changed and can take it back
/// ([`Recompile::undo`]); on an error `c` is left as it was.
pub fn recompile_endpoints_in_place(
    c: &mut Compiled,
    policies: &[Policy],
    prev_endpoints: &Endpoints,
    endpoints: &Endpoints,
    rule_ids: &RuleIds,
) -> Result<Recompile, CompileError> {
    let labelled = |e| -> BTreeMap<u32, &crate::identity::Labels> {
        Endpoints::range(e, FIRST_LABEL..FIRST_CIDR)
            .map(|(&id, l)| (id, l))
            .collect()
    };
    let (old, new) = (labelled(prev_endpoints), labelled(endpoints));
    // Identities that came, went or changed labels, with every label set they had.
    let mut changed: Vec<(u32, &crate::identity::Labels)> = Vec::new();
    for (id, l) in &old {
        if new.get(id) != Some(l) {
            changed.push((*id, *l));
        }
    }
    for (id, l) in &new {
        if old.get(id) != Some(l) {
            changed.push((*id, *l));
        }
    }
    if changed.is_empty() {
        return Ok(Recompile {
            changed: Recompiled::Locals(BTreeSet::new()),
            undo: Undo::Nothing,
        });
    }
    let mut dirty: BTreeSet<u32> = changed.iter().map(|(id, _)| *id).collect();
    for policy in policies {
        for spec in &policy.specs {
            let picks_a_changed_one = [
                &spec.ingress,
                &spec.ingress_deny,
                &spec.egress,
                &spec.egress_deny,
            ]
            .into_iter()
            .flatten()
            .flat_map(|r| r.peers.listed())
            .any(|peer| match peer {
                Peer::Endpoints(sel) => changed.iter().any(|(_, l)| sel.matches(l)),
                _ => false,
            });
            if picks_a_changed_one {
                dirty.extend(
                    new.iter()
                        .filter(|(_, l)| spec.selector.matches(l))
                        .map(|(id, _)| *id),
                );
            }
        }
    }
    let full = |c: &mut Compiled| -> Result<Recompile, CompileError> {
        let new = compile_locals(policies, endpoints, &c.cidr_identities, rule_ids, None)?;
        Ok(Recompile {
            changed: Recompiled::Full,
            undo: Undo::Whole(Box::new(std::mem::replace(c, new))),
        })
    };
    let part = match compile_locals(
        policies,
        endpoints,
        &c.cidr_identities,
        rule_ids,
        Some(&dirty),
    ) {
        // Over the limit already: the full compile names the policy and rule where the limit
        // is reached.
        Err(CompileError::TooManyEntries { .. }) => return full(c),
        r => r?,
    };
    // The count towards the limit after the merge, checked before anything changes.
    let kept: usize = c
        .raw_entries
        .iter()
        .filter(|(l, _)| !dirty.contains(l))
        .map(|(_, n)| n)
        .sum();
    if kept + part.raw_entries.values().sum::<usize>() > MAX_ENTRIES {
        return full(c);
    }
    let mut undo = remove_locals(c, &dirty);
    c.enforcement.extend(part.enforcement);
    c.policy.extend(part.policy);
    c.selections.extend(part.selections);
    c.audit.extend(part.audit);
    c.raw_entries.extend(part.raw_entries);
    if let Undo::Locals {
        rules,
        rule_ids,
        cidr_identities,
        ..
    } = &mut undo
    {
        *rules = std::mem::replace(&mut c.rules, part.rules);
        *rule_ids = std::mem::replace(&mut c.rule_ids, part.rule_ids);
        *cidr_identities = std::mem::replace(&mut c.cidr_identities, part.cidr_identities);
    }
    Ok(Recompile {
        changed: Recompiled::Locals(dirty),
        undo,
    })
}

/// The compile, of every local label identity of `endpoints` or only of those in `only`
/// (remotes are always picked among all of them).
fn compile_locals(
    policies: &[Policy],
    endpoints: &Endpoints,
    previous: &BTreeMap<Cidr, u32>,
    rule_ids: &RuleIds,
    only: Option<&BTreeSet<u32>>,
) -> Result<Compiled, CompileError> {
    let mut order: Vec<&Policy> = policies.iter().collect();
    order.sort_by(|a, b| (&a.name, &a.source).cmp(&(&b.name, &b.source)));

    let cidr_identities = allocate_cidrs(&order, previous)?;
    let labelled: Vec<(u32, &crate::identity::Labels)> = endpoints
        .iter()
        .filter(|(&id, _)| (FIRST_LABEL..FIRST_CIDR).contains(&id))
        .map(|(&id, l)| (id, l))
        .collect();

    let compiled_here = |id: u32| only.is_none_or(|o| o.contains(&id));
    let mut c = Compiled {
        enforcement: labelled
            .iter()
            .filter(|&&(id, _)| compiled_here(id))
            .map(|&(id, _)| (id, Enforcement::default()))
            .collect(),
        cidr_identities,
        ..Compiled::default()
    };
    // (local, direction) → (default deny, has a deny entry)
    let mut state: BTreeMap<(u32, Direction), (bool, bool)> = BTreeMap::new();
    // (local, direction) → a spec without audit enforces it.
    let mut enforcing: BTreeMap<(u32, Direction), bool> = BTreeMap::new();
    // Entries of audit policies, merged once it is known where they audit (below).
    let mut audit_entries: Vec<(PolicyEntryKey, PolicyValue)> = Vec::new();
    let mut audit_default_deny: Vec<(u32, Direction)> = Vec::new();
    let mut audit_has_deny: Vec<(u32, Direction)> = Vec::new();
    let mut ids = Allocator::new(rule_ids);
    for policy in order {
        let several = policy.specs.len() > 1;
        for (si, spec) in policy.specs.iter().enumerate() {
            let prefix = if several {
                format!("specs[{si}].")
            } else {
                String::new()
            };
            let locals: Vec<u32> = labelled
                .iter()
                .filter(|&&(id, l)| compiled_here(id) && spec.selector.matches(l))
                .map(|&(id, _)| id)
                .collect();
            for dir in [Direction::Ingress, Direction::Egress] {
                let default_deny = spec.default_deny(dir);
                if default_deny {
                    for &l in &locals {
                        if spec.audit {
                            audit_default_deny.push((l, dir));
                        } else {
                            state.entry((l, dir)).or_default().0 = true;
                        }
                        *enforcing.entry((l, dir)).or_default() |= !spec.audit;
                    }
                }
                let has_rules = sections(spec, dir).iter().any(|(_, r, _)| !r.is_empty());
                if default_deny || has_rules {
                    for &l in &locals {
                        let sel = c.selections.entry((l, dir)).or_default();
                        if !sel
                            .iter()
                            .any(|s| s.policy == policy.name && s.default_deny)
                        {
                            sel.retain(|s| s.policy != policy.name);
                            sel.push(Selection {
                                policy: policy.name.clone(),
                                default_deny,
                            });
                        }
                    }
                }
                for (name, rules, deny) in sections(spec, dir) {
                    for (ri, rule) in rules.iter().enumerate() {
                        let Some(id) = ids.id(RuleKey::new(policy, &spec.selector, name, rule, 0))
                        else {
                            return Err(CompileError::TooManyRules {
                                policy: policy.name.clone(),
                                section: format!("{prefix}{name}[{ri}]"),
                            });
                        };
                        c.rules.insert(
                            id,
                            RuleInfo {
                                policy: policy.name.clone(),
                                section: format!("{prefix}{name}[{ri}]"),
                                source: policy.source.to_string(),
                            },
                        );
                        if locals.is_empty() {
                            continue;
                        }
                        let remotes = remotes(rule, &labelled, &c.cidr_identities);
                        if remotes.is_empty() {
                            continue;
                        }
                        let value = if deny {
                            PolicyValue::deny(id)
                        } else {
                            PolicyValue::allow(id)
                        };
                        let l4 = l4_keys(&rule.l4);
                        for &l in &locals {
                            if deny {
                                if spec.audit {
                                    audit_has_deny.push((l, dir));
                                } else {
                                    state.entry((l, dir)).or_default().1 = true;
                                }
                                *enforcing.entry((l, dir)).or_default() |= !spec.audit;
                            }
                            for &r in &remotes {
                                for &(p, port, len) in &l4 {
                                    let key = entry_key(l, r, dir, p, port, len);
                                    if spec.audit {
                                        audit_entries.push((key, value));
                                        *c.raw_entries.entry(l).or_default() += 1;
                                    } else if merge(&mut c.policy, key, value) {
                                        *c.raw_entries.entry(l).or_default() += 1;
                                    }
                                }
                                if c.policy.len() + audit_entries.len() > MAX_ENTRIES {
                                    return Err(CompileError::TooManyEntries {
                                        policy: policy.name.clone(),
                                        section: format!("{prefix}{name}[{ri}]"),
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    // An audit policy's rules apply only where it audits: in a direction that an enforcing policy
    // also covers (strict), they are left out, so an audit policy never opens what an enforcing
    // one denies (its allows would pass unreported) and never adds real drops there either.
    let enforced_strictly = |l: u32, dir: Direction| enforcing.get(&(l, dir)) == Some(&true);
    for (key, value) in audit_entries {
        let dir = Direction::from_u8(key.key.direction).unwrap_or(Direction::Ingress);
        if !enforced_strictly(key.key.local, dir) {
            merge(&mut c.policy, key, value);
        }
    }
    for (l, dir) in audit_default_deny {
        if !enforced_strictly(l, dir) {
            state.entry((l, dir)).or_default().0 = true;
        }
    }
    for (l, dir) in audit_has_deny {
        if !enforced_strictly(l, dir) {
            state.entry((l, dir)).or_default().1 = true;
        }
    }
    for ((l, dir), (default_deny, has_deny)) in state {
        if default_deny || has_deny {
            if let Some(e) = c.enforcement.get_mut(&l) {
                e.set(dir, true);
            }
        }
        if !default_deny && has_deny {
            c.policy
                .entry(entry_key(l, ANY, dir, 0, 0, PREFIX_ANY_PROTO))
                .or_insert(PolicyValue::allow(IMPLICIT_ALLOW_RULE));
        }
    }
    for ((l, dir), strict) in enforcing {
        let on = !strict && c.enforcement_of(l).get(dir);
        if on {
            c.audit.entry(l).or_default().set(dir, true);
        }
    }
    let enforcement = c.enforcement.clone();
    c.policy.retain(|k, _| {
        let dir = Direction::from_u8(k.key.direction).unwrap_or(Direction::Ingress);
        enforcement.get(&k.key.local).is_some_and(|e| e.get(dir))
    });
    fold_denies(&mut c.policy);
    group_denies(&mut c.policy);
    mark_final(&mut c.policy);
    c.rule_ids = ids.finish();
    Ok(c)
}

fn sections(spec: &Spec, dir: Direction) -> [(&'static str, &[Rule], bool); 2] {
    match dir {
        Direction::Ingress => [
            ("ingress", &spec.ingress, false),
            ("ingressDeny", &spec.ingress_deny, true),
        ],
        Direction::Egress => [
            ("egress", &spec.egress, false),
            ("egressDeny", &spec.egress_deny, true),
        ],
    }
}

fn entry_key(
    local: u32,
    remote: u32,
    dir: Direction,
    p: u8,
    port: u16,
    len: u32,
) -> PolicyEntryKey {
    PolicyEntryKey {
        key: PolicyKey::new(local, remote, dir, p, port),
        prefix_len: len,
    }
}

/// Deny beats allow; with equal actions the lower rule id is kept. Whether the key is new.
fn merge(
    map: &mut BTreeMap<PolicyEntryKey, PolicyValue>,
    key: PolicyEntryKey,
    v: PolicyValue,
) -> bool {
    match map.get_mut(&key) {
        None => {
            map.insert(key, v);
            true
        }
        Some(old) => {
            let replace = (v.is_deny() && !old.is_deny())
                || (v.is_deny() == old.is_deny() && v.rule < old.rule);
            if replace {
                *old = v;
            }
            false
        }
    }
}

/// `inner` lies within `outer`.
fn within(inner: &Cidr, outer: &Cidr) -> bool {
    inner.addr.is_ipv4() == outer.addr.is_ipv4()
        && inner.prefix_len >= outer.prefix_len
        && outer.contains(inner.addr)
}

fn allocate_cidrs(
    policies: &[&Policy],
    previous: &BTreeMap<Cidr, u32>,
) -> Result<BTreeMap<Cidr, u32>, CompileError> {
    let mut prefixes = BTreeSet::new();
    for p in policies {
        for s in &p.specs {
            let all = [&s.ingress, &s.ingress_deny, &s.egress, &s.egress_deny];
            for rule in all.into_iter().flatten() {
                for peer in rule.peers.listed() {
                    if let Peer::Cidr(c) = peer {
                        prefixes.insert(c.cidr);
                        prefixes.extend(c.except.iter().copied());
                    }
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    // Every number of `previous` is taken, also a prefix's that is gone: the maps hold it until
    // the reconcile's last step (stale POLICY entries go after the ipcache's new ones), so a new
    // prefix with it would have the old one's allowances in between.
    let mut used: BTreeSet<u32> = previous
        .values()
        .copied()
        .filter(|&id| id >= FIRST_CIDR)
        .collect();
    let mut kept = BTreeSet::new();
    for p in &prefixes {
        if let Some(&id) = previous.get(p) {
            if id >= FIRST_CIDR && kept.insert(id) {
                out.insert(*p, id);
            }
        }
    }
    let mut next = FIRST_CIDR;
    for p in &prefixes {
        if out.contains_key(p) {
            continue;
        }
        while used.contains(&next) {
            next = next
                .checked_add(1)
                .ok_or(CompileError::TooManyCidrs(prefixes.len()))?;
        }
        used.insert(next);
        out.insert(*p, next);
    }
    Ok(out)
}

/// The remote identities a rule's peers select.
fn remotes(
    rule: &Rule,
    labelled: &[(u32, &crate::identity::Labels)],
    cidrs: &BTreeMap<Cidr, u32>,
) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    let peers = match &rule.peers {
        Peers::Unspecified => {
            // Cilium: an L4-only rule applies to every peer; an empty rule selects nothing.
            if rule.l4 != L4::All {
                out.insert(ANY);
            }
            return out;
        }
        // Empty (`fromEndpoints: []`): nobody.
        Peers::Listed(peers) => peers,
    };
    for peer in peers {
        match peer {
            Peer::Endpoints(sel) => out.extend(
                labelled
                    .iter()
                    .filter(|(_, l)| sel.matches(l))
                    .map(|&(id, _)| id),
            ),
            Peer::Entity(Entity::All) => {
                out.insert(ANY);
            }
            Peer::Entity(Entity::Host) => {
                out.insert(HOST);
            }
            Peer::Entity(Entity::World) => {
                out.insert(WORLD);
                out.extend(cidrs.values().copied());
            }
            Peer::Cidr(c) => {
                out.extend(
                    cidrs
                        .iter()
                        .filter(|(p, _)| within(p, &c.cidr))
                        .filter(|(p, _)| !c.except.iter().any(|e| within(p, e)))
                        .map(|(_, &id)| id),
                );
            }
        }
    }
    out
}

/// (protocol, port, prefix length) of each key a rule's L4 part needs.
fn l4_keys(l4: &L4) -> Vec<(u8, u16, u32)> {
    let items = match l4 {
        L4::All => return vec![(0, 0, PREFIX_ANY_PROTO)],
        L4::Only(items) => items,
    };
    let mut out = BTreeSet::new();
    for item in items {
        match *item {
            PortRule::Ports { proto, first, last } => {
                for &p in proto.numbers() {
                    if first == 0 {
                        out.insert((p, 0, PREFIX_ANY_PORT));
                    } else {
                        for b in port_range_blocks(first, last) {
                            out.insert((p, b.port, b.prefix_len()));
                        }
                    }
                }
            }
            PortRule::Icmp { family, icmp_type } => {
                let p = match family {
                    IcmpFamily::V4 => proto::ICMP,
                    IcmpFamily::V6 => proto::ICMPV6,
                };
                out.insert((p, u16::from(icmp_type), FULL_PREFIX));
            }
        }
    }
    out.into_iter().collect()
}

/// The protocol+port part of a key below the 72 fixed bits, as a 24-bit number and its length.
fn tail(k: &PolicyEntryKey) -> (u32, u32) {
    (
        (u32::from(k.key.proto) << 16) | u32::from(k.key.dport()),
        k.prefix_len.saturating_sub(PREFIX_ANY_PROTO).min(24),
    )
}

/// (local, remote, direction) → each deny's (tail, tail length, rule).
type DeniesByGroup = BTreeMap<(u32, u32, u8), Vec<(u32, u32, u32)>>;

/// Turns every allow covered by a deny of the same (local, remote, direction) into that deny.
fn fold_denies(map: &mut BTreeMap<PolicyEntryKey, PolicyValue>) {
    let mut denies: DeniesByGroup = BTreeMap::new();
    for (k, v) in map.iter() {
        if v.is_deny() {
            let (t, len) = tail(k);
            denies
                .entry((k.key.local, k.key.remote, k.key.direction))
                .or_default()
                .push((t, len, v.rule));
        }
    }
    for (k, v) in map.iter_mut() {
        if v.is_deny() {
            continue;
        }
        let Some(ds) = denies.get(&(k.key.local, k.key.remote, k.key.direction)) else {
            continue;
        };
        let (t, len) = tail(k);
        let covering = ds
            .iter()
            .filter(|&&(dt, dlen, _)| dlen <= len && ((dt ^ t) >> (24 - dlen)) == 0)
            .max_by_key(|&&(_, dlen, _)| dlen);
        if let Some(&(_, _, rule)) = covering {
            *v = PolicyValue::deny(rule);
        }
    }
}

/// Copies every egress deny of a specific remote under [`GROUP`] (keeping the lower rule id
/// where two meet). A container's packet to a group or link-local address reaches every
/// container on the bridge and the host: the datapath decides it under `GROUP` (these denies)
/// and the wildcard `ANY` (the allows for everyone), so a deny of any one peer still wins over
/// an allow for everyone, as it would for a packet sent to that peer.
fn group_denies(map: &mut BTreeMap<PolicyEntryKey, PolicyValue>) {
    let copies: Vec<(PolicyEntryKey, PolicyValue)> = map
        .iter()
        .filter(|(k, v)| {
            v.is_deny()
                && k.key.direction == Direction::Egress as u8
                && k.key.remote != ANY
                && k.key.remote != GROUP
        })
        .map(|(k, v)| {
            let key = PolicyKey::new(
                k.key.local,
                GROUP,
                Direction::Egress,
                k.key.proto,
                k.key.dport(),
            );
            (
                PolicyEntryKey {
                    key,
                    prefix_len: k.prefix_len,
                },
                *v,
            )
        })
        .collect();
    for (k, v) in copies {
        merge(map, k, v);
    }
}

/// Flags [`PolicyValue::FINAL`] every allow of a specific remote that no deny under ANY of the
/// same (local, direction) overlaps, and clears it everywhere else (see the module documentation).
pub fn mark_final(map: &mut BTreeMap<PolicyEntryKey, PolicyValue>) {
    // (local, direction) → its wildcard denies.
    let mut wildcard_denies: BTreeMap<(u32, u8), Vec<PolicyEntryKey>> = BTreeMap::new();
    for (k, v) in map.iter() {
        if k.key.remote == ANY && v.is_deny() {
            wildcard_denies
                .entry((k.key.local, k.key.direction))
                .or_default()
                .push(*k);
        }
    }
    for (k, v) in map.iter_mut() {
        let covered = || {
            wildcard_denies
                .get(&(k.key.local, k.key.direction))
                .is_some_and(|ds| {
                    ds.iter()
                        .any(|d| overlaps(&k.key, k.prefix_len, &d.key, d.prefix_len))
                })
        };
        if v.is_allow() && k.key.remote != ANY && !covered() {
            v.flags |= PolicyValue::FINAL;
        } else {
            v.flags &= !PolicyValue::FINAL;
        }
    }
}
