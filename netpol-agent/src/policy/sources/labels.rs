//! Compose labels: the `netpol.ingress` / `netpol.egress` shorthand of each running container
//! (see [`crate::policy::compose`]), recomputed whenever the containers change.
//!
//! Labels fail closed, and a label opens only its own container:
//!
//! - A `netpol.ingress` (`netpol.egress`) label with an error makes the container's ingress
//!   (egress) default deny, nothing allowed, until it is fixed; an unknown `netpol.*` label does
//!   so for both directions. Ignoring a broken label would leave the container open.
//! - The policy of a container's labels selects only containers with the same `netpol.*`
//!   labels: they are part of the identity ([`identity_labels`]) and the generated selector
//!   requires them (and the absence of the direction labels the container does not have). A
//!   container started with another service's compose labels and `netpol.ingress: all` opens
//!   only itself.
//! - `netpol.*` labels that may come from the image are never policy: an image author must not
//!   open a container. Docker merges an image's `Config.Labels` into its containers' labels, so a
//!   container label with the image's key and value may be the image's, or the container's own
//!   set to the same value (the two cannot be told apart); when the image cannot be inspected,
//!   none of the container's `netpol.*` labels can be told apart. Such labels allow nothing, and
//!   each direction they name is default deny (never more open than a verified label could make
//!   it): ignoring one would leave a container open that the operator restricted with it. They
//!   stay in the identity, so that the deny selects only containers that carry them.

use std::collections::BTreeMap;

use netpol_common::Direction;
use tracing::warn;

use crate::{
    identity::{
        netpol_labels, LabelFilter, Labels, COMPOSE_PROJECT, COMPOSE_SERVICE, NETPOL_LABEL_PREFIX,
    },
    policy::{
        compose::{self, AUDIT_LABEL, EGRESS_LABEL, INGRESS_LABEL},
        limits, DefaultDeny, Operator, Peer, Peers, Policy, PortRule, Protocol, Requirement,
        Selector, Source, Spec, L4,
    },
};

/// What the label source needs to know of one running container.
#[derive(Clone, Copy, Debug)]
pub struct ContainerLabels<'a> {
    pub name: &'a str,
    /// The container's Docker labels, unfiltered.
    pub labels: &'a Labels,
    /// The `netpol.*` labels of its image, or why they are unknown.
    pub image: Result<&'a Labels, &'a str>,
}

/// A container's `netpol.*` labels by where they come from.
struct Origins {
    /// Set on the container (another value than the image's): policy.
    own: Labels,
    /// Labels that may be the image's (why, and the labels): equal to the image's, or all of
    /// them when the image could not be inspected. Not applied, default deny.
    unverified: Option<(String, Labels)>,
}

impl Origins {
    fn of(c: &ContainerLabels) -> Self {
        let all = netpol_labels(c.labels);
        match c.image {
            Err(why) if !all.is_empty() => Self {
                own: Labels::new(),
                unverified: Some((format!("the image could not be inspected ({why})"), all)),
            },
            Err(_) => Self {
                own: all,
                unverified: None,
            },
            Ok(image) => {
                let (same, own): (Labels, Labels) =
                    all.into_iter().partition(|(k, v)| image.get(k) == Some(v));
                Self {
                    own,
                    unverified: (!same.is_empty()).then(|| {
                        (
                            "the image has the same label and value (Docker does not tell whether the container set it too; to apply it, set a value that differs from the image's, another order or spacing)".to_owned(),
                            same,
                        )
                    }),
                }
            }
        }
    }

    /// The `netpol.*` labels that belong to the identity: all but the image's.
    fn in_identity(&self) -> Labels {
        let mut l = self.own.clone();
        if let Some((_, u)) = &self.unverified {
            l.extend(u.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        l
    }
}

/// The labels a container's identity is made of: its security-relevant labels
/// ([`LabelFilter`]) without any `netpol.*` label, plus its `netpol.*` labels — whatever
/// `--ignore-label` says, since label policies select by them (also those that may be the
/// image's: the default deny they get selects by them).
pub fn identity_labels(filter: &LabelFilter, c: &ContainerLabels) -> Labels {
    let others: Labels = c
        .labels
        .iter()
        .filter(|(k, _)| !k.starts_with(NETPOL_LABEL_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut l = filter.filter(&others);
    l.extend(Origins::of(c).in_identity());
    l
}

/// What the labels of one container gave besides its policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Notes {
    /// Rejected labels (each makes a direction default deny).
    pub errors: Vec<String>,
    /// Ignored labels.
    pub warnings: Vec<String>,
    /// Directions made default deny by an error or by unverified labels.
    pub deny_ingress: bool,
    pub deny_egress: bool,
    /// The container's own `netpol.audit: "true"` (never the image's, never unverified): the
    /// container is in audit mode.
    pub audit: bool,
}

impl Notes {
    /// One line for `endpoint list`.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        let denied = match (self.deny_ingress, self.deny_egress) {
            (true, true) => Some("ingress and egress"),
            (true, false) => Some("ingress"),
            (false, true) => Some("egress"),
            (false, false) => None,
        };
        if let Some(d) = denied {
            parts.push(format!("{d} default deny"));
        }
        parts.extend(self.errors.iter().cloned());
        parts.extend(self.warnings.iter().cloned());
        parts.join("; ")
    }
}

/// The policies of the containers' labels, and what was wrong with them.
#[derive(Debug, Default)]
pub struct LabelPolicies {
    policies: Vec<Policy>,
    /// Container name → errors and warnings (only containers that have any).
    notes: BTreeMap<String, Notes>,
}

impl LabelPolicies {
    /// Recomputes everything from the running containers.
    ///
    /// The labels of all containers together name at most [`limits::LABEL_CIDRS`] distinct
    /// CIDRs (each an ipcache entry): labels each within their own limit but on many containers
    /// would otherwise fill the ipcache, and every later policy change would be refused. Taken
    /// by container name; a direction whose CIDRs go beyond it is an error (default deny).
    pub fn update<'a>(&mut self, containers: impl IntoIterator<Item = ContainerLabels<'a>>) {
        self.policies.clear();
        self.notes.clear();
        let containers: Vec<ContainerLabels<'a>> = containers.into_iter().collect();
        let mut computed: Vec<(&'a str, Option<Policy>, Notes)> = containers
            .iter()
            .map(|c| {
                let (policy, notes) = container_policy(c);
                (c.name, policy, notes)
            })
            .collect();
        let mut order: Vec<usize> = (0..computed.len()).collect();
        order.sort_by_key(|&i| computed[i].0);
        let mut budget = Budget {
            containers: containers.iter().map(|c| c.labels).collect(),
            ..Budget::default()
        };
        for i in order {
            let (name, policy, notes) = &mut computed[i];
            if let Some(p) = policy {
                within_budget(name, p, notes, &mut budget);
            }
        }
        for (name, policy, notes) in computed {
            for e in &notes.errors {
                warn!(container = %name, error = %e, "netpol label rejected");
            }
            for w in &notes.warnings {
                warn!(container = %name, warning = %w, "netpol label ignored");
            }
            self.policies.extend(policy);
            if notes != Notes::default() {
                self.notes.insert(name.to_owned(), notes);
            }
        }
    }

    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// Whether the running container `name` put itself in audit mode with its own
    /// `netpol.audit: "true"`.
    pub fn audited(&self, name: &str) -> bool {
        self.notes.get(name).is_some_and(|n| n.audit)
    }

    /// Container name → its notes.
    pub fn notes(&self) -> &BTreeMap<String, Notes> {
        &self.notes
    }

    /// Container name → why its labels were rejected.
    pub fn errors(&self) -> BTreeMap<String, String> {
        self.notes
            .iter()
            .filter(|(_, n)| !n.errors.is_empty())
            .map(|(c, n)| (c.clone(), n.errors.join("; ")))
            .collect()
    }

    /// Container name → which of its labels were ignored, and why.
    pub fn warnings(&self) -> BTreeMap<String, String> {
        self.notes
            .iter()
            .filter(|(_, n)| !n.warnings.is_empty())
            .map(|(c, n)| (c.clone(), n.warnings.join("; ")))
            .collect()
    }
}

fn direction_of(label: &str) -> Option<Direction> {
    match label {
        INGRESS_LABEL => Some(Direction::Ingress),
        EGRESS_LABEL => Some(Direction::Egress),
        _ => None,
    }
}

/// What the labels of the containers taken so far use of the totals all labels may use.
#[derive(Default)]
struct Budget<'a> {
    /// The running containers' labels: a peer selecting containers costs once per container it
    /// selects (at least as many as the identities it compiles to).
    containers: Vec<&'a Labels>,
    /// How many of them a selector selects (by its `Debug` text: a label names few services).
    selected: BTreeMap<String, usize>,
    cidrs: std::collections::BTreeSet<crate::datapath::Cidr>,
    /// Peers × port blocks of their rules: about the `POLICY` entries they compile to.
    entries: usize,
}

/// About the `POLICY` entries of `rules`: each peer (once per running container it selects)
/// once per aligned port block of each port rule (three protocols for `any`).
fn entry_cost(rules: &[crate::policy::Rule], budget: &mut Budget) -> usize {
    let Budget {
        containers,
        selected,
        ..
    } = budget;
    rules
        .iter()
        .map(|r| {
            let peers = match &r.peers {
                Peers::Listed(ps) => ps
                    .iter()
                    .map(|p| match p {
                        Peer::Endpoints(sel) => {
                            *selected.entry(format!("{sel:?}")).or_insert_with(|| {
                                containers.iter().filter(|l| sel.matches(l)).count().max(1)
                            })
                        }
                        _ => 1,
                    })
                    .sum(),
                _ => 1,
            };
            let ports = match &r.l4 {
                L4::All => 1,
                L4::Only(ps) => ps
                    .iter()
                    .map(|p| match p {
                        PortRule::Ports { proto, first, last } => {
                            let blocks = if *first == 0 {
                                1
                            } else {
                                netpol_common::policy::port_range_blocks(*first, *last).count()
                            };
                            blocks * if *proto == Protocol::Any { 3 } else { 1 }
                        }
                        PortRule::Icmp { .. } => 1,
                    })
                    .sum(),
            };
            peers.max(1) * ports
        })
        .sum()
}

/// Keeps each direction of `policy` (a container's labels) whose CIDRs and entries still fit
/// the totals [`limits::LABEL_CIDRS`] and [`limits::LABEL_ENTRIES`] with `budget` (those of the
/// containers before it); one beyond allows nothing and is default deny, with an error in
/// `notes`.
fn within_budget(name: &str, policy: &mut Policy, notes: &mut Notes, budget: &mut Budget) {
    for spec in &mut policy.specs {
        for dir in [Direction::Ingress, Direction::Egress] {
            let rules = match dir {
                Direction::Ingress => &spec.ingress,
                Direction::Egress => &spec.egress,
            };
            let mine: std::collections::BTreeSet<crate::datapath::Cidr> = rules
                .iter()
                .flat_map(|r| match &r.peers {
                    Peers::Listed(ps) => ps.as_slice(),
                    _ => &[],
                })
                .filter_map(|p| match p {
                    Peer::Cidr(c) => Some(c.cidr),
                    _ => None,
                })
                .collect();
            let new = mine.difference(&budget.cidrs).count();
            let cost = entry_cost(rules, budget);
            if budget.cidrs.len() + new <= limits::LABEL_CIDRS
                && budget.entries + cost <= limits::LABEL_ENTRIES
            {
                budget.cidrs.extend(mine);
                budget.entries += cost;
                continue;
            }
            let label = match dir {
                Direction::Ingress => INGRESS_LABEL,
                Direction::Egress => EGRESS_LABEL,
            };
            notes.errors.push(format!(
                "container {name}: label {label}: with the containers' labels before it (by name) it names more than {} CIDRs or {} peer-port blocks in all: {} default deny until fewer are named",
                limits::LABEL_CIDRS,
                limits::LABEL_ENTRIES,
                if dir == Direction::Ingress { "ingress" } else { "egress" },
            ));
            match dir {
                Direction::Ingress => {
                    notes.deny_ingress = true;
                    spec.ingress.clear();
                    spec.ingress_deny.clear();
                    spec.default_deny.ingress = Some(true);
                }
                Direction::Egress => {
                    notes.deny_egress = true;
                    spec.egress.clear();
                    spec.egress_deny.clear();
                    spec.default_deny.egress = Some(true);
                }
            }
        }
    }
}

/// The policy of one container's labels, and its notes.
pub fn container_policy(c: &ContainerLabels) -> (Option<Policy>, Notes) {
    let mut origins = Origins::of(c);
    let mut notes = Notes::default();
    let in_identity = origins.in_identity();
    if in_identity.is_empty() {
        return (None, notes);
    }
    // `netpol.audit` names no direction and holds no rules: only the container's own switches
    // it on (an image's is inherited, an unverified one may be the image's: neither counts).
    if let Some(v) = origins.own.remove(AUDIT_LABEL) {
        match v.as_str() {
            "true" => notes.audit = true,
            "false" => {}
            other => notes.errors.push(format!(
                "container {}: label {AUDIT_LABEL}: {other:?} is not \"true\" or \"false\": not in audit mode (policy is enforced)",
                c.name
            )),
        }
    }
    let deny = |dir: Option<Direction>, notes: &mut Notes| match dir {
        Some(Direction::Ingress) => notes.deny_ingress = true,
        Some(Direction::Egress) => notes.deny_egress = true,
        None => {
            notes.deny_ingress = true;
            notes.deny_egress = true;
        }
    };
    let mut spec = Spec {
        description: Some(format!("netpol labels of container {}", c.name)),
        selector: own_selector(c.labels, &in_identity),
        ..Spec::default()
    };
    if let Some((why, labels)) = &origins.unverified {
        for k in labels.keys().filter(|k| *k != AUDIT_LABEL) {
            deny(direction_of(k), &mut notes);
        }
        let keys: Vec<&str> = labels.keys().map(String::as_str).collect();
        notes.warnings.push(format!(
            "{} not applied: {why}, so it may be the image's (image labels are never policy)",
            keys.join(", ")
        ));
    }
    let unknown: Vec<&str> = origins
        .own
        .keys()
        .filter(|k| direction_of(k).is_none())
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        for k in &unknown {
            let e = compose::from_labels(c.name, &Labels::from([((*k).to_owned(), String::new())]))
                .err()
                .map_or_else(
                    || format!("label {k}: unknown netpol label"),
                    |e| e.to_string(),
                );
            notes.errors.push(format!(
                "{e}: ingress and egress default deny until it is removed"
            ));
        }
        deny(None, &mut notes);
    } else {
        // Each direction on its own: an error in one leaves the other as written.
        let others: Labels = c
            .labels
            .iter()
            .filter(|(k, _)| !k.starts_with(NETPOL_LABEL_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, value) in &origins.own {
            let dir = direction_of(key);
            let mut one = others.clone();
            one.insert(key.clone(), value.clone());
            match compose::from_labels(c.name, &one) {
                Ok(Some(p)) => {
                    for s in p.specs {
                        match dir {
                            Some(Direction::Ingress) => {
                                spec.ingress.extend(s.ingress);
                                spec.ingress_deny.extend(s.ingress_deny);
                            }
                            _ => {
                                spec.egress.extend(s.egress);
                                spec.egress_deny.extend(s.egress_deny);
                            }
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    notes.errors.push(format!(
                        "{e}: {} default deny until it is fixed",
                        match dir {
                            Some(Direction::Egress) => "egress",
                            _ => "ingress",
                        }
                    ));
                    deny(dir, &mut notes);
                }
            }
        }
    }
    let ingress = origins.own.contains_key(INGRESS_LABEL) || notes.deny_ingress;
    let egress = origins.own.contains_key(EGRESS_LABEL) || notes.deny_egress;
    if notes.deny_ingress {
        spec.ingress.clear();
        spec.ingress_deny.clear();
    }
    if notes.deny_egress {
        spec.egress.clear();
        spec.egress_deny.clear();
    }
    spec.default_deny = DefaultDeny {
        ingress: ingress.then_some(true),
        egress: egress.then_some(true),
    };
    let name = match (c.labels.get(COMPOSE_PROJECT), c.labels.get(COMPOSE_SERVICE)) {
        (Some(p), Some(s)) => format!("compose:{p}/{s}"),
        _ => format!("labels:{}", c.name),
    };
    let policy = Policy {
        name,
        source: Source::Labels {
            container: c.name.to_owned(),
        },
        specs: vec![spec],
    };
    (Some(policy), notes)
}

/// Selects the containers with `labels`' compose project and service (when present) and exactly
/// the `netpol.*` labels `netpol`: the direction labels it lacks must be absent too.
fn own_selector(labels: &Labels, netpol: &Labels) -> Selector {
    let mut match_labels: BTreeMap<String, String> = netpol.clone();
    for k in [COMPOSE_PROJECT, COMPOSE_SERVICE] {
        if let Some(v) = labels.get(k) {
            match_labels.insert(k.to_owned(), v.clone());
        }
    }
    let match_expressions = [INGRESS_LABEL, EGRESS_LABEL]
        .iter()
        .filter(|k| !netpol.contains_key(**k))
        .map(|k| Requirement {
            key: (*k).to_owned(),
            operator: Operator::DoesNotExist,
            values: Vec::new(),
        })
        .collect();
    Selector {
        match_labels,
        match_expressions,
    }
}
