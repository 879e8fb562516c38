//! Policy: a strict subset of CiliumNetworkPolicy and the compose-label shorthand, parsed into one
//! model and compiled into `POLICY` map entries.
//!
//! # API
//!
//! - [`parse_str`]`(file, text) -> Result<Vec<Policy>, PolicyErrors>` and
//!   [`parse_file`]`(path)`: every document of a YAML file; errors name file, line and field path
//!   (`db.yaml:14: spec.ingress[0].toPorts[0].rules: L7 rules are not supported`). All errors of
//!   a file are collected, not only the first. Anything outside the supported subset is an error,
//!   never ignored (only `metadata` other than `name`, `status`, and `spec.labels` are ignored:
//!   they cannot change who talks).
//!   [`parse_str_with`] / [`parse_file_with`] also reject selectors on labels the agent's
//!   `--ignore-label`s leave out of identities (the plain forms know only the built-in list).
//!   Input is bounded by [`limits`]; a parse runs on its own thread and a panic is an error.
//! - [`validate_files`]`(paths) -> Vec<PolicyError>`: `policy validate`, offline.
//! - [`compose::from_labels`]`(container, labels) -> Result<Option<Policy>, ComposeError>`: the
//!   `netpol.ingress` / `netpol.egress` shorthand of one compose container.
//! - [`sources`]: where policies come from (policy files, imports, compose labels), each with its
//!   parse, the version in force and its errors; [`sources::Sources`] gives the compiler its set.
//! - [`compile`]`(&[Policy], &Endpoints) -> Result<Compiled, CompileError>` (and
//!   [`compile_with_previous`] to keep CIDR identity numbers from the previous compile, and
//!   [`compile_stable`] to keep rule ids too, see [`rule_ids`]): per local
//!   identity the enforced directions, the `POLICY` entries, the CIDR identities for the ipcache and
//!   the rule table for events. [`Compiled::needed`] / [`Compiled::check_fits`] size the result
//!   against `MapSizes`.
//! - [`trace`]: `policy trace` / `policy matrix`, the datapath's decision for a new connection
//!   over map entries (the kernel's, or [`trace::offline`]'s for described containers).
//!
//! # Semantics (Cilium's default mode)
//!
//! A spec with a non-empty ingress (egress) section, allow or deny, makes the endpoints it selects
//! default-deny in that direction, unless it says `enableDefaultDeny: {ingress: false}`. The YAML
//! parser, as Cilium, drops the flag for a direction without rules; in the model an explicit
//! `true` enforces even without a section (the compose shorthand's empty label). Deny rules of a spec that opted out still
//! apply: the direction is then enforced with an implicit allow-all entry (rule id 0) under them.
//! See [`compile`] for the entry layout, deny folding and CIDR identities.

pub mod compile;
pub mod compose;
pub mod export;
pub mod fuzz;
mod parse;
pub mod render;
pub mod rule_ids;
pub mod sources;
pub mod suggest;
pub mod trace;
mod yaml;

#[cfg(test)]
mod incremental_tests;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

pub use compile::{
    compile, compile_stable, compile_with_previous, recompile_endpoints,
    recompile_endpoints_in_place, CapacityError, CompileError, Compiled, Enforcement, Needed,
    Recompile, Recompiled, RuleInfo, Selection, IMPLICIT_ALLOW_RULE,
};
pub use compose::ComposeError;
pub use parse::{
    parse_file, parse_file_with, parse_str, parse_str_with, read_file, read_from, validate_files,
};

use crate::{datapath::Cidr, identity::Labels};

/// Bounds on policy input, so that no file, import or request can exhaust the agent's memory,
/// stack or time. Each exceeded bound is an error naming the file and line.
pub mod limits {
    /// Bytes of one policy file or imported file.
    pub const FILE_BYTES: usize = 1 << 20;
    /// Nesting of YAML collections (a policy needs about 10).
    pub const DEPTH: usize = 64;
    /// YAML nodes of one file, every alias expansion counted again (this bounds alias bombs).
    pub const NODES: usize = 100_000;
    /// Rules (`ingress`, `egress`, `ingressDeny`, `egressDeny` items, over all specs) of one policy.
    pub const RULES: usize = 1_000;
    /// Peers (selectors, entities, CIDRs and their `except` items) of one policy.
    pub const PEERS: usize = 1_000;
    /// Ports and ICMP fields of one policy.
    pub const PORTS: usize = 1_000;
    /// Ports, or ICMP fields, of one rule (Cilium's limit).
    pub const PORTS_PER_RULE: usize = 40;
    /// One request on the control socket (a `policy import` of several files).
    pub const REQUEST_BYTES: usize = 8 << 20;
    /// Bytes of one compose shorthand label (`netpol.ingress`, `netpol.egress`).
    pub const LABEL_BYTES: usize = 16 << 10;
    /// Items (peers) of one compose shorthand label.
    pub const LABEL_ITEMS: usize = 256;
    /// Distinct CIDRs named by the shorthand labels of all containers together.
    pub const LABEL_CIDRS: usize = 1024;
    /// Peers × port blocks of the shorthand labels of all containers together (about their
    /// `POLICY` entries: half of the map's default size).
    pub const LABEL_ENTRIES: usize = 8192;
}

/// Local endpoints by identity: each label identity in use and its (filtered) labels. Several
/// containers share one entry when their labels are equal. Numbers below
/// `netpol_common::identity::FIRST_LABEL` are ignored.
pub type Endpoints = BTreeMap<u32, Labels>;

/// One policy: a CiliumNetworkPolicy document, or the compose labels of one container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub source: Source,
    pub specs: Vec<Spec>,
}

/// Where a policy came from, for errors and the rule table.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// A file (as given to the parser).
    File(String),
    /// The `netpol.*` labels of a container.
    Labels { container: String },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(file) => f.write_str(file),
            Source::Labels { container } => write!(f, "labels of {container}"),
        }
    }
}

/// One rule set (`spec`, or one item of `specs`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spec {
    pub description: Option<String>,
    pub selector: Selector,
    pub ingress: Vec<Rule>,
    pub ingress_deny: Vec<Rule>,
    pub egress: Vec<Rule>,
    pub egress_deny: Vec<Rule>,
    pub default_deny: DefaultDeny,
    /// Audit mode, from the policy's `metadata.annotations` (`netpol.io/audit: "true"`): the
    /// directions this spec enforces on the endpoints it selects report what policy would drop
    /// instead of dropping it, unless a spec without audit enforces them too (see
    /// `compile`'s module documentation).
    pub audit: bool,
}

/// `enableDefaultDeny`; `None` = Cilium's default (on when the direction has a section).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DefaultDeny {
    pub ingress: Option<bool>,
    pub egress: Option<bool>,
}

impl Spec {
    /// Whether the endpoints this spec selects are default-deny in `dir`.
    pub fn default_deny(&self, dir: netpol_common::Direction) -> bool {
        use netpol_common::Direction::*;
        let (explicit, allow, deny) = match dir {
            Ingress => (self.default_deny.ingress, &self.ingress, &self.ingress_deny),
            Egress => (self.default_deny.egress, &self.egress, &self.egress_deny),
        };
        explicit.unwrap_or(!allow.is_empty() || !deny.is_empty())
    }
}

/// One item of an ingress/egress (deny) section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub peers: Peers,
    pub l4: L4,
}

/// Whom a rule applies to. An absent peer list and an empty one differ (as in Cilium, where
/// "empty non-nil slices … should not result in any identity being selected"):
/// `{toPorts: …}` applies to every peer, `{fromEndpoints: [], toPorts: …}` to nobody.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Peers {
    /// No peer field at all: with `toPorts`/`icmps` every peer (Cilium's L4-only rule); an empty
    /// rule `{}` matches nothing.
    #[default]
    Unspecified,
    /// The peers of every peer field, OR'ed; empty (`fromEndpoints: []`) selects nobody.
    Listed(Vec<Peer>),
}

impl Peers {
    /// The listed peers (none for [`Peers::Unspecified`]).
    pub fn listed(&self) -> &[Peer] {
        match self {
            Peers::Unspecified => &[],
            Peers::Listed(p) => p,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// `fromEndpoints` / `toEndpoints` item; an empty selector is every container.
    Endpoints(Selector),
    /// `fromEntities` / `toEntities` item.
    Entity(Entity),
    /// `fromCIDR`, `fromCIDRSet` (and `to…`) item.
    Cidr(CidrRule),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Entity {
    /// Anything that is not a container or the host, including every CIDR identity.
    World,
    /// The host's own addresses.
    Host,
    /// Everything (the wildcard identity).
    All,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CidrRule {
    pub cidr: Cidr,
    /// Sub-prefixes of `cidr` that are not selected.
    pub except: Vec<Cidr>,
}

/// What a rule allows or denies at L4.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum L4 {
    /// No `toPorts` and no `icmps`: every protocol, every port, ICMP included.
    #[default]
    All,
    /// Only these (never empty).
    Only(Vec<PortRule>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PortRule {
    /// Ports `first..=last` of `proto`; `0..=0` means every port.
    Ports {
        proto: Protocol,
        first: u16,
        last: u16,
    },
    /// One ICMP (`V4`) or ICMPv6 (`V6`) message type.
    Icmp { family: IcmpFamily, icmp_type: u8 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    /// TCP, UDP and SCTP (Cilium's `ANY`, the default when `protocol` is absent).
    Any,
}

impl Protocol {
    /// The IP protocol numbers this stands for.
    pub fn numbers(self) -> &'static [u8] {
        use netpol_common::proto::{SCTP, TCP, UDP};
        match self {
            Protocol::Tcp => &[TCP],
            Protocol::Udp => &[UDP],
            Protocol::Sctp => &[SCTP],
            Protocol::Any => &[TCP, UDP, SCTP],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum IcmpFamily {
    V4,
    V6,
}

/// A label selector: every `match_labels` pair and every requirement must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Selector {
    /// Selects every container.
    pub fn all() -> Self {
        Self::default()
    }

    pub fn is_all(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator {
                    Operator::In => value.is_some_and(|v| r.values.contains(v)),
                    Operator::NotIn => value.is_none_or(|v| !r.values.contains(v)),
                    Operator::Exists => value.is_some(),
                    Operator::DoesNotExist => value.is_none(),
                }
            })
    }
}

/// One problem in a policy file, with where it is.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {}{kind}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct PolicyError {
    pub file: String,
    /// 1-based; 0 when the error concerns the whole file (it could not be read).
    pub line: usize,
    /// Field path, e.g. `spec.ingress[0].toPorts[0].rules` (empty for the document itself).
    pub path: String,
    pub kind: ErrorKind,
}

/// Every problem found in one or more files.
#[derive(Debug, thiserror::Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl std::fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    #[error("cannot read: {0}")]
    Read(#[source] std::io::Error),
    #[error("YAML syntax: {0}")]
    Syntax(String),
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("unknown field")]
    UnknownField,
    #[error("not valid in an {direction} rule (did you mean {suggestion}?)")]
    WrongDirection {
        direction: &'static str,
        suggestion: String,
    },
    #[error("duplicate key")]
    DuplicateKey,
    #[error("expected {0}")]
    Expected(&'static str),
    #[error("missing required field {0}")]
    Missing(&'static str),
    #[error("apiVersion must be cilium.io/v2, not {0:?}")]
    ApiVersion(String),
    #[error("kind must be CiliumNetworkPolicy, not {0:?}")]
    Kind(String),
    #[error("invalid policy name {0:?} (letters, digits, '-', '_', '.'; starting and ending with a letter or digit)")]
    Name(String),
    #[error("policy name {0:?} is used twice in this file")]
    DuplicateName(String),
    #[error("give either spec or specs, not both")]
    SpecAndSpecs,
    #[error("missing spec (or specs)")]
    NoSpec,
    #[error("entity {0:?} is not supported (supported: world, host, all)")]
    Entity(String),
    #[error("invalid CIDR {0:?}")]
    Cidr(String),
    #[error("except {except} is not inside {cidr}")]
    ExceptOutside { except: String, cidr: String },
    #[error("invalid port {0:?} (a number 0-65535; 0 means every port)")]
    Port(String),
    #[error("named port {0:?} is not supported (containers have no named ports); use a number")]
    NamedPort(String),
    #[error("endPort {end} is below port {port}")]
    EndPortBelow { port: u16, end: u16 },
    #[error("endPort needs a non-zero port")]
    EndPortWithoutPort,
    #[error("invalid protocol {0:?} (supported: TCP, UDP, SCTP, ANY)")]
    Protocol(String),
    #[error("invalid ICMP type {0:?} (a number 0-255 or a name such as EchoRequest)")]
    IcmpType(String),
    #[error("invalid ICMP family {0:?} (IPv4 or IPv6)")]
    IcmpFamily(String),
    #[error("icmps cannot be combined with toPorts in one rule; write two rules")]
    IcmpsWithToPorts,
    #[error("at least one item is required")]
    Empty,
    #[error("label source {0:?} is not supported: use the Docker label key, optionally prefixed any: or container:")]
    LabelSource(String),
    #[error("reserved labels select no container: use fromEntities/toEntities (world, host, all)")]
    ReservedLabel,
    #[error("empty label key")]
    EmptyLabelKey,
    #[error("invalid operator {0:?} (In, NotIn, Exists, DoesNotExist)")]
    Operator(String),
    #[error("operator {0} needs a non-empty values list")]
    ValuesRequired(&'static str),
    #[error("operator {0} takes no values")]
    ValuesForbidden(&'static str),
    #[error("the file is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("nested more than {limit} levels deep")]
    TooDeep { limit: usize },
    #[error("more than {limit} YAML nodes, counting every alias expansion")]
    TooManyNodes { limit: usize },
    #[error("more than {limit} {what} in one {scope}")]
    TooMany {
        what: &'static str,
        limit: usize,
        scope: &'static str,
    },
    #[error("YAML tag {0} is not supported (a tag can change a value's type)")]
    Tag(String),
    #[error("a null selector is not allowed: write {{}} to select every container")]
    NullSelector,
    #[error("a null list is not allowed: write [] (which selects no peer) or leave the field out")]
    NullList,
    #[error("{0:?} has a leading zero (Cilium reads it as octal): write it without")]
    LeadingZero(String),
    #[error("{first} and {second} cannot be combined in one rule (as in Cilium): write two rules")]
    MixedPeers { first: String, second: String },
    #[error("there are no namespaces on a Docker host: remove metadata.namespace")]
    Namespace,
    #[error("unknown netpol annotation (supported: netpol.io/audit)")]
    UnknownAnnotation,
    #[error("label {0:?} is left out of identities (a volatile label, or --ignore-label), so no container can match it")]
    FilteredLabel(String),
    #[error("internal error while parsing (a bug; nothing was applied): {0}")]
    Internal(String),
}
