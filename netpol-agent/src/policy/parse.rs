//! CiliumNetworkPolicy (strict subset) from YAML, with file:line:path errors.

use std::{collections::BTreeMap, panic::AssertUnwindSafe, path::Path};

use super::{
    limits,
    yaml::{self, Node, Value},
    CidrRule, DefaultDeny, Entity, ErrorKind, IcmpFamily, Operator, Peer, Peers, Policy,
    PolicyError, PolicyErrors, PortRule, Protocol, Requirement, Rule, Selector, Source, Spec, L4,
};
use crate::{
    datapath::Cidr,
    identity::{LabelFilter, NETPOL_LABEL_PREFIX},
};

/// Stack of the thread a parse runs on: far more than the bounded depth needs.
const PARSE_STACK: usize = 4 << 20;
/// The policy annotation that puts a policy in audit mode (`"true"`).
pub const AUDIT_ANNOTATION: &str = "netpol.io/audit";
/// Annotations under this prefix are netpol's own: unknown ones are errors.
const AUDIT_ANNOTATION_PREFIX: &str = "netpol.io/";

/// Reads and parses every document of `path`. The file name in errors is `path` as given.
pub fn parse_file(path: &Path) -> Result<Vec<Policy>, PolicyErrors> {
    parse_file_with(path, &LabelFilter::default())
}

/// [`parse_file`], with selectors checked against `filter` (see [`parse_str_with`]).
pub fn parse_file_with(path: &Path, filter: &LabelFilter) -> Result<Vec<Policy>, PolicyErrors> {
    let text = read_file(path).map_err(|e| PolicyErrors(vec![e]))?;
    parse_str_with(&path.display().to_string(), &text, filter)
}

/// Reads a policy file as UTF-8, never more than [`limits::FILE_BYTES`] of it: a larger file is
/// an error naming the line the limit falls on.
pub fn read_file(path: &Path) -> Result<String, PolicyError> {
    match std::fs::File::open(path) {
        Ok(f) => read_from(path, f),
        Err(e) => Err(PolicyError {
            file: path.display().to_string(),
            line: 0,
            path: String::new(),
            kind: ErrorKind::Read(e),
        }),
    }
}

/// [`read_file`] of a file already open (`path` names it in errors).
pub fn read_from(path: &Path, f: impl std::io::Read) -> Result<String, PolicyError> {
    use std::io::Read as _;
    let whole = |line, kind| PolicyError {
        file: path.display().to_string(),
        line,
        path: String::new(),
        kind,
    };
    let mut bytes = Vec::new();
    f.take(limits::FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| whole(0, ErrorKind::Read(e)))?;
    if bytes.len() > limits::FILE_BYTES {
        let line = bytes[..limits::FILE_BYTES]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        return Err(whole(
            line,
            ErrorKind::TooLarge {
                limit: limits::FILE_BYTES,
            },
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        whole(
            0,
            ErrorKind::Read(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                e.utf8_error(),
            )),
        )
    })
}

/// Parses every document of `text`; `file` names it in errors and in [`Source::File`].
/// Selectors are checked against the built-in list of labels left out of identities.
pub fn parse_str(file: &str, text: &str) -> Result<Vec<Policy>, PolicyErrors> {
    parse_str_with(file, text, &LabelFilter::default())
}

/// [`parse_str`], with selectors checked against `filter` (the agent's `--ignore-label`s): a
/// selector may not name a label that no identity carries.
///
/// The parse runs on a thread of its own with a known stack, and a panic in it (a bug, in
/// netpol or the YAML parser) is an error, so no input can take the daemon down.
pub fn parse_str_with(
    file: &str,
    text: &str,
    filter: &LabelFilter,
) -> Result<Vec<Policy>, PolicyErrors> {
    isolated(file, || parse_here(file, text, filter))
}

/// Runs `parse` on a thread of its own with a known stack; a panic is an [`ErrorKind::Internal`].
pub(crate) fn isolated<F>(file: &str, parse: F) -> Result<Vec<Policy>, PolicyErrors>
where
    F: FnOnce() -> Result<Vec<Policy>, PolicyErrors> + Send,
{
    let internal = |why: String| {
        Err(PolicyErrors(vec![PolicyError {
            file: file.to_owned(),
            line: 0,
            path: String::new(),
            kind: ErrorKind::Internal(why),
        }]))
    };
    std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new()
            .name("policy-parse".into())
            .stack_size(PARSE_STACK)
            .spawn_scoped(scope, || std::panic::catch_unwind(AssertUnwindSafe(parse)));
        match spawned.map(|h| h.join()) {
            Ok(Ok(Ok(result))) => result,
            Ok(Ok(Err(panic))) | Ok(Err(panic)) => internal(panic_message(&*panic)),
            Err(e) => internal(format!("cannot start the parser thread: {e}")),
        }
    })
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_owned()
    }
}

fn parse_here(file: &str, text: &str, filter: &LabelFilter) -> Result<Vec<Policy>, PolicyErrors> {
    let mut ctx = Ctx {
        file,
        filter,
        errors: Vec::new(),
        budget: Budget::default(),
    };
    let docs = match yaml::parse_documents(text) {
        Ok(docs) => docs,
        Err(e) => {
            ctx.err(e.line, "", e.kind);
            return Err(PolicyErrors(ctx.errors));
        }
    };
    let mut policies: Vec<Policy> = Vec::new();
    for doc in &docs {
        ctx.budget = Budget::default();
        if let Some(p) = ctx.document(doc) {
            if policies.iter().any(|q| q.name == p.name) {
                ctx.err(doc.line, "metadata.name", ErrorKind::DuplicateName(p.name));
            } else {
                policies.push(p);
            }
        }
    }
    if ctx.errors.is_empty() {
        Ok(policies)
    } else {
        Err(PolicyErrors(ctx.errors))
    }
}

/// `policy validate`: parses every file and returns every error (empty: all valid).
pub fn validate_files<P: AsRef<Path>>(paths: &[P]) -> Vec<PolicyError> {
    paths
        .iter()
        .filter_map(|p| parse_file(p.as_ref()).err())
        .flat_map(|e| e.0)
        .collect()
}

/// Fields that Cilium knows and netpol does not support, with why.
fn unsupported(key: &str) -> Option<&'static str> {
    Some(match key {
        "rules" => "L7 rules are not supported",
        "toFQDNs" => "DNS-based rules (toFQDNs) are not supported",
        "toServices" => "toServices is not supported (there are no Kubernetes services)",
        "toRequires" | "fromRequires" => "requirements (fromRequires/toRequires) are not supported",
        "authentication" => "authentication is not supported",
        "serverNames" => "TLS server names (SNI) are not supported",
        "originatingTLS" | "terminatingTLS" => "TLS interception is not supported",
        "listener" => "Envoy listeners are not supported",
        "nodeSelector" => "node selectors (host policies) are not supported",
        "fromNodes" | "toNodes" => "node peers are not supported",
        "fromGroups" | "toGroups" => "groups (cloud provider) are not supported",
        "cidrGroupRef" | "cidrGroupSelector" => "CIDR groups are not supported",
        "log" => "per-rule logging is not supported",
        _ => return None,
    })
}

struct Ctx<'a> {
    file: &'a str,
    filter: &'a LabelFilter,
    errors: Vec<PolicyError>,
    /// What the current policy used of its [`limits`].
    budget: Budget,
}

#[derive(Default)]
struct Budget {
    rules: usize,
    peers: usize,
    ports: usize,
}

#[derive(Clone, Copy)]
enum Spend {
    Rules,
    Peers,
    Ports,
}

/// One key of a mapping.
struct Field<'n> {
    key: &'n str,
    line: usize,
    value: &'n Node,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Ingress,
    Egress,
}

impl<'a> Ctx<'a> {
    fn err(&mut self, line: usize, path: &str, kind: ErrorKind) {
        self.errors.push(PolicyError {
            file: self.file.to_owned(),
            line,
            path: path.to_owned(),
            kind,
        });
    }

    /// Counts `n` against the current policy's limit of `what`; false (and one error, the
    /// first time) once it is exceeded.
    fn spend(&mut self, what: Spend, n: usize, line: usize, path: &str) -> bool {
        let (used, limit, name) = match what {
            Spend::Rules => (&mut self.budget.rules, limits::RULES, "rules"),
            Spend::Peers => (&mut self.budget.peers, limits::PEERS, "peers"),
            Spend::Ports => (
                &mut self.budget.ports,
                limits::PORTS,
                "ports and ICMP fields",
            ),
        };
        let before = *used;
        *used = used.saturating_add(n);
        if *used <= limit {
            return true;
        }
        if before <= limit {
            self.err(
                line,
                path,
                ErrorKind::TooMany {
                    what: name,
                    limit,
                    scope: "policy",
                },
            );
        }
        false
    }

    fn unknown(&mut self, f: &Field<'_>, path: &str) {
        let kind = match unsupported(f.key) {
            Some(why) => ErrorKind::Unsupported(why),
            None => ErrorKind::UnknownField,
        };
        self.err(f.line, &join(path, f.key), kind);
    }

    /// The keys of a mapping, checking that they are plain strings and not repeated.
    fn map<'n>(&mut self, node: &'n Node, path: &str) -> Option<Vec<Field<'n>>> {
        let Value::Map(entries) = &node.value else {
            self.err(node.line, path, ErrorKind::Expected("a mapping"));
            return None;
        };
        let mut out: Vec<Field<'n>> = Vec::with_capacity(entries.len());
        let mut ok = true;
        for (k, v) in entries {
            let Value::Scalar { text, .. } = &k.value else {
                self.err(k.line, path, ErrorKind::Expected("string keys"));
                ok = false;
                continue;
            };
            if out.iter().any(|f| f.key == text) {
                self.err(k.line, &join(path, text), ErrorKind::DuplicateKey);
                ok = false;
                continue;
            }
            out.push(Field {
                key: text,
                line: k.line,
                value: v,
            });
        }
        ok.then_some(out)
    }

    /// A sequence; a null value is an empty one.
    fn seq<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n [Node]> {
        match &node.value {
            Value::Seq(items) => Some(items),
            _ if node.is_null() => Some(&[]),
            _ => {
                self.err(node.line, path, ErrorKind::Expected("a list"));
                None
            }
        }
    }

    /// A scalar as a string; a null is the empty string.
    fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        if node.is_null() {
            return Some(String::new());
        }
        match &node.value {
            Value::Scalar { text, .. } => Some(text.clone()),
            _ => {
                self.err(node.line, path, ErrorKind::Expected("a string"));
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node, path: &str) -> Option<bool> {
        match &node.value {
            Value::Scalar { text, plain: true } => match text.as_str() {
                "true" | "True" | "TRUE" => Some(true),
                "false" | "False" | "FALSE" => Some(false),
                _ => {
                    self.err(node.line, path, ErrorKind::Expected("true or false"));
                    None
                }
            },
            _ => {
                self.err(node.line, path, ErrorKind::Expected("true or false"));
                None
            }
        }
    }

    fn document(&mut self, doc: &Node) -> Option<Policy> {
        let fields = self.map(doc, "")?;
        let before = self.errors.len();
        let (mut api, mut kind, mut meta) = (None, None, None);
        let (mut spec, mut specs) = (None, None);
        for f in &fields {
            match f.key {
                "apiVersion" => api = self.string(f.value, "apiVersion").map(|s| (s, f.line)),
                "kind" => kind = self.string(f.value, "kind").map(|s| (s, f.line)),
                "metadata" => meta = self.metadata(f.value),
                "spec" => spec = Some(f),
                "specs" => specs = Some(f),
                // Written by the cluster, never policy.
                "status" => {}
                _ => self.unknown(f, ""),
            }
        }
        match api {
            Some((a, _)) if a == "cilium.io/v2" => {}
            Some((a, line)) => self.err(line, "apiVersion", ErrorKind::ApiVersion(a)),
            None => self.err(doc.line, "", ErrorKind::Missing("apiVersion")),
        }
        match kind {
            Some((k, _)) if k == "CiliumNetworkPolicy" => {}
            Some((k, line)) => self.err(line, "kind", ErrorKind::Kind(k)),
            None => self.err(doc.line, "", ErrorKind::Missing("kind")),
        }
        if !fields.iter().any(|f| f.key == "metadata") {
            self.err(doc.line, "", ErrorKind::Missing("metadata.name"));
        }
        let mut out = Vec::new();
        match (spec, specs) {
            (Some(a), Some(_)) => self.err(a.line, "", ErrorKind::SpecAndSpecs),
            (None, None) => self.err(doc.line, "", ErrorKind::NoSpec),
            (Some(f), None) => out.extend(self.spec(f.value, "spec")),
            (None, Some(f)) => {
                if let Some(items) = self.seq(f.value, "specs") {
                    if items.is_empty() {
                        self.err(f.line, "specs", ErrorKind::Empty);
                    }
                    for (i, item) in items.iter().enumerate() {
                        out.extend(self.spec(item, &format!("specs[{i}]")));
                    }
                }
            }
        }
        if self.errors.len() > before {
            return None;
        }
        let (name, audit) = meta?;
        for s in &mut out {
            s.audit = audit;
        }
        Some(Policy {
            name,
            source: Source::File(self.file.to_owned()),
            specs: out,
        })
    }

    /// `metadata`: `name` is required, `namespace` is an error (it would suggest a scope that
    /// does not exist here); `annotations` may hold netpol's own `netpol.io/audit` (below);
    /// everything else is Kubernetes bookkeeping, ignored. Returns the name and whether the
    /// policy is in audit mode.
    fn metadata(&mut self, node: &Node) -> Option<(String, bool)> {
        let fields = self.map(node, "metadata")?;
        if let Some(f) = fields.iter().find(|f| f.key == "namespace") {
            self.err(f.line, "metadata.namespace", ErrorKind::Namespace);
        }
        let audit = match fields.iter().find(|f| f.key == "annotations") {
            Some(f) => self.annotations(f.value)?,
            None => false,
        };
        let Some(f) = fields.iter().find(|f| f.key == "name") else {
            self.err(node.line, "metadata", ErrorKind::Missing("name"));
            return None;
        };
        let name = self.string(f.value, "metadata.name")?;
        if !valid_name(&name) {
            self.err(f.line, "metadata.name", ErrorKind::Name(name));
            return None;
        }
        Some((name, audit))
    }

    /// `metadata.annotations`: string values (as Kubernetes has them). Keys under `netpol.io/`
    /// are netpol's and checked: `netpol.io/audit` is `"true"` or `"false"`, any other is an
    /// error (a typo must not pass for a setting). Other annotations change nothing, ignored.
    fn annotations(&mut self, node: &Node) -> Option<bool> {
        if node.is_null() {
            return Some(false);
        }
        let fields = self.map(node, "metadata.annotations")?;
        let mut audit = false;
        let mut ok = true;
        for f in &fields {
            if !f.key.starts_with(AUDIT_ANNOTATION_PREFIX) {
                continue;
            }
            let path = format!("metadata.annotations.{}", f.key);
            if f.key != AUDIT_ANNOTATION {
                self.err(f.line, &path, ErrorKind::UnknownAnnotation);
                ok = false;
                continue;
            }
            match &f.value.value {
                Value::Scalar { text, plain: false } if text == "true" => audit = true,
                Value::Scalar { text, plain: false } if text == "false" => {}
                _ => {
                    self.err(
                        f.line,
                        &path,
                        ErrorKind::Expected(
                            "\"true\" or \"false\" (quoted: annotations are strings)",
                        ),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(audit)
    }

    fn spec(&mut self, node: &Node, path: &str) -> Option<Spec> {
        let fields = self.map(node, path)?;
        let before = self.errors.len();
        let mut spec = Spec::default();
        let mut selector = None;
        for f in &fields {
            let p = join(path, f.key);
            match f.key {
                // A null's own line is where the next token starts: name the key's.
                "endpointSelector" if f.value.is_null() => {
                    self.err(f.line, &p, ErrorKind::NullSelector)
                }
                "endpointSelector" => selector = self.selector(f.value, &p),
                "ingress" => spec.ingress = self.rules(f.value, &p, Dir::Ingress),
                "ingressDeny" => spec.ingress_deny = self.rules(f.value, &p, Dir::Ingress),
                "egress" => spec.egress = self.rules(f.value, &p, Dir::Egress),
                "egressDeny" => spec.egress_deny = self.rules(f.value, &p, Dir::Egress),
                "enableDefaultDeny" => spec.default_deny = self.default_deny(f.value, &p),
                "description" => spec.description = self.string(f.value, &p),
                // Cilium's rule labels only name the rule.
                "labels" => {}
                _ => self.unknown(f, path),
            }
        }
        if !fields.iter().any(|f| f.key == "endpointSelector") {
            self.err(node.line, path, ErrorKind::Missing("endpointSelector"));
        }
        if self.errors.len() > before {
            return None;
        }
        // Cilium reads enableDefaultDeny only for a direction that has rules: `{egress: true}`
        // without an egress section enforces nothing.
        if spec.ingress.is_empty() && spec.ingress_deny.is_empty() {
            spec.default_deny.ingress = None;
        }
        if spec.egress.is_empty() && spec.egress_deny.is_empty() {
            spec.default_deny.egress = None;
        }
        spec.selector = selector?;
        Some(spec)
    }

    fn default_deny(&mut self, node: &Node, path: &str) -> DefaultDeny {
        let mut d = DefaultDeny::default();
        let Some(fields) = self.map(node, path) else {
            return d;
        };
        for f in &fields {
            let p = join(path, f.key);
            match f.key {
                "ingress" => d.ingress = self.boolean(f.value, &p),
                "egress" => d.egress = self.boolean(f.value, &p),
                _ => self.unknown(f, path),
            }
        }
        d
    }

    fn rules(&mut self, node: &Node, path: &str, dir: Dir) -> Vec<Rule> {
        let Some(items) = self.seq(node, path) else {
            return Vec::new();
        };
        if !self.spend(Spend::Rules, items.len(), node.line, path) {
            return Vec::new();
        }
        items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| self.rule(item, &format!("{path}[{i}]"), dir))
            .collect()
    }

    fn rule(&mut self, node: &Node, path: &str, dir: Dir) -> Option<Rule> {
        let fields = self.map(node, path)?;
        let before = self.errors.len();
        let mut peers: Option<Vec<Peer>> = None;
        // The first peer field with items, for the mixing check.
        let mut kind_with_items: Option<&str> = None;
        let mut ports: Vec<PortRule> = Vec::new();
        let (mut to_ports_line, mut icmps_line) = (None, None);
        let (this, other) = match dir {
            Dir::Ingress => ("from", "to"),
            Dir::Egress => ("to", "from"),
        };
        for f in &fields {
            let p = join(path, f.key);
            let peer_kind = f.key.strip_prefix(this);
            if let Some("Endpoints" | "Entities" | "CIDR" | "CIDRSet") = peer_kind {
                // An explicit empty list selects nobody; a null one is ambiguous.
                if f.value.is_null() {
                    self.err(f.line, &p, ErrorKind::NullList);
                    continue;
                }
                let list = peers.get_or_insert_with(Vec::new);
                let items = self.items(f.value, &p);
                if !items.is_empty() {
                    match kind_with_items {
                        Some(first) => self.err(
                            f.line,
                            &p,
                            ErrorKind::MixedPeers {
                                first: first.to_owned(),
                                second: f.key.to_owned(),
                            },
                        ),
                        None => kind_with_items = Some(f.key),
                    }
                }
                if !self.spend(Spend::Peers, items.len(), f.line, &p) {
                    continue;
                }
                for (i, item) in items {
                    let ip = format!("{p}[{i}]");
                    let peer = match peer_kind {
                        Some("Endpoints") => self.selector(item, &ip).map(Peer::Endpoints),
                        Some("Entities") => self.entity(item, &ip).map(Peer::Entity),
                        Some("CIDR") => self.cidr(item, &ip).map(|cidr| {
                            Peer::Cidr(CidrRule {
                                cidr,
                                except: Vec::new(),
                            })
                        }),
                        _ => self.cidr_set(item, &ip).map(Peer::Cidr),
                    };
                    list.extend(peer);
                }
                continue;
            }
            match f.key {
                "toPorts" => {
                    to_ports_line = Some(f.line);
                    for (i, item) in self.items(f.value, &p) {
                        ports.extend(self.port_rule(item, &format!("{p}[{i}]")));
                    }
                }
                "icmps" => {
                    icmps_line = Some(f.line);
                    for (i, item) in self.items(f.value, &p) {
                        ports.extend(self.icmp_rule(item, &format!("{p}[{i}]")));
                    }
                }
                _ => {
                    let mirrored = f.key.strip_prefix(other).filter(|rest| {
                        matches!(*rest, "Endpoints" | "Entities" | "CIDR" | "CIDRSet")
                    });
                    match mirrored {
                        Some(rest) if unsupported(f.key).is_none() => self.err(
                            f.line,
                            &p,
                            ErrorKind::WrongDirection {
                                direction: if dir == Dir::Ingress {
                                    "ingress"
                                } else {
                                    "egress"
                                },
                                suggestion: format!("{this}{rest}"),
                            },
                        ),
                        _ => self.unknown(f, path),
                    }
                }
            }
        }
        if let (Some(_), Some(line)) = (to_ports_line, icmps_line) {
            self.err(line, &join(path, "icmps"), ErrorKind::IcmpsWithToPorts);
        }
        for (what, line, key) in [
            ("ports", to_ports_line, "toPorts"),
            ("ICMP fields", icmps_line, "icmps"),
        ] {
            let Some(line) = line else { continue };
            let n = ports
                .iter()
                .filter(|p| matches!(p, PortRule::Icmp { .. }) == (key == "icmps"))
                .count();
            if n > limits::PORTS_PER_RULE {
                self.err(
                    line,
                    &join(path, key),
                    ErrorKind::TooMany {
                        what,
                        limit: limits::PORTS_PER_RULE,
                        scope: "rule",
                    },
                );
            }
        }
        if self.errors.len() > before {
            return None;
        }
        Some(Rule {
            peers: peers.map_or(Peers::Unspecified, Peers::Listed),
            l4: if ports.is_empty() {
                L4::All
            } else {
                L4::Only(ports)
            },
        })
    }

    /// The items of a list field with their index (nothing if it is not a list).
    fn items<'n>(&mut self, node: &'n Node, path: &str) -> Vec<(usize, &'n Node)> {
        self.seq(node, path)
            .map(|s| s.iter().enumerate().collect())
            .unwrap_or_default()
    }

    fn entity(&mut self, node: &Node, path: &str) -> Option<Entity> {
        let s = self.string(node, path)?;
        match s.as_str() {
            "world" => Some(Entity::World),
            "host" => Some(Entity::Host),
            "all" => Some(Entity::All),
            _ => {
                self.err(node.line, path, ErrorKind::Entity(s));
                None
            }
        }
    }

    fn cidr(&mut self, node: &Node, path: &str) -> Option<Cidr> {
        let s = self.string(node, path)?;
        match s.trim().parse::<Cidr>() {
            Ok(c) if !s.trim().is_empty() => Some(c),
            _ => {
                self.err(node.line, path, ErrorKind::Cidr(s));
                None
            }
        }
    }

    fn cidr_set(&mut self, node: &Node, path: &str) -> Option<CidrRule> {
        let fields = self.map(node, path)?;
        let before = self.errors.len();
        let mut cidr = None;
        let mut except = Vec::new();
        for f in &fields {
            let p = join(path, f.key);
            match f.key {
                "cidr" => cidr = self.cidr(f.value, &p),
                "except" => {
                    let items = self.items(f.value, &p);
                    if !self.spend(Spend::Peers, items.len(), f.line, &p) {
                        continue;
                    }
                    for (i, item) in items {
                        let ip = format!("{p}[{i}]");
                        except.extend(self.cidr(item, &ip).map(|c| (c, item.line, ip)));
                    }
                }
                _ => self.unknown(f, path),
            }
        }
        if !fields.iter().any(|f| f.key == "cidr") {
            self.err(node.line, path, ErrorKind::Missing("cidr"));
        }
        let cidr = cidr?;
        for (e, line, p) in &except {
            let inside = e.addr.is_ipv4() == cidr.addr.is_ipv4()
                && e.prefix_len >= cidr.prefix_len
                && cidr.contains(e.addr);
            if !inside {
                self.err(
                    *line,
                    p,
                    ErrorKind::ExceptOutside {
                        except: e.to_string(),
                        cidr: cidr.to_string(),
                    },
                );
            }
        }
        if self.errors.len() > before {
            return None;
        }
        Some(CidrRule {
            cidr,
            except: except.into_iter().map(|(c, _, _)| c).collect(),
        })
    }

    fn port_rule(&mut self, node: &Node, path: &str) -> Vec<PortRule> {
        let mut out = Vec::new();
        let Some(fields) = self.map(node, path) else {
            return out;
        };
        let mut seen_ports = false;
        for f in &fields {
            let p = join(path, f.key);
            match f.key {
                "ports" => {
                    seen_ports = true;
                    let items = self.items(f.value, &p);
                    if items.is_empty() {
                        self.err(f.line, &p, ErrorKind::Empty);
                    }
                    if !self.spend(Spend::Ports, items.len(), f.line, &p) {
                        continue;
                    }
                    for (i, item) in items {
                        out.extend(self.port(item, &format!("{p}[{i}]")));
                    }
                }
                _ => self.unknown(f, path),
            }
        }
        if !seen_ports {
            self.err(node.line, path, ErrorKind::Missing("ports"));
        }
        out
    }

    fn port(&mut self, node: &Node, path: &str) -> Option<PortRule> {
        let fields = self.map(node, path)?;
        let before = self.errors.len();
        let (mut port, mut end, mut proto) = (0u16, None, Protocol::Any);
        let mut end_line = node.line;
        if !fields.iter().any(|f| f.key == "port") {
            // Cilium requires it; reading it as "every port" would open more than written.
            self.err(node.line, path, ErrorKind::Missing("port"));
        }
        for f in &fields {
            let p = join(path, f.key);
            match f.key {
                "port" => port = self.port_number(f.value, &p).unwrap_or(0),
                "endPort" => {
                    end = self.port_number(f.value, &p);
                    end_line = f.line;
                }
                "protocol" => {
                    let s = self.string(f.value, &p).unwrap_or_default();
                    proto = match s.as_str() {
                        "TCP" => Protocol::Tcp,
                        "UDP" => Protocol::Udp,
                        "SCTP" => Protocol::Sctp,
                        "ANY" => Protocol::Any,
                        _ => {
                            self.err(f.value.line, &p, ErrorKind::Protocol(s));
                            Protocol::Any
                        }
                    };
                }
                _ => self.unknown(f, path),
            }
        }
        let last = match end {
            // Cilium ignores an endPort of 0.
            None | Some(0) => port,
            Some(_) if port == 0 => {
                self.err(
                    end_line,
                    &join(path, "endPort"),
                    ErrorKind::EndPortWithoutPort,
                );
                port
            }
            Some(e) if e < port => {
                self.err(
                    end_line,
                    &join(path, "endPort"),
                    ErrorKind::EndPortBelow { port, end: e },
                );
                port
            }
            Some(e) => e,
        };
        if self.errors.len() > before {
            return None;
        }
        Some(PortRule::Ports {
            proto,
            first: port,
            last,
        })
    }

    fn port_number(&mut self, node: &Node, path: &str) -> Option<u16> {
        let Value::Scalar { text, .. } = &node.value else {
            self.err(node.line, path, ErrorKind::Port(String::new()));
            return None;
        };
        let t = text.trim();
        if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
            if t.len() > 1 && t.starts_with('0') {
                self.err(node.line, path, ErrorKind::LeadingZero(text.clone()));
                return None;
            }
            if let Ok(n) = t.parse::<u16>() {
                return Some(n);
            }
        } else if !t.is_empty() && t.bytes().any(|b| b.is_ascii_alphabetic()) {
            self.err(node.line, path, ErrorKind::NamedPort(text.clone()));
            return None;
        }
        self.err(node.line, path, ErrorKind::Port(text.clone()));
        None
    }

    fn icmp_rule(&mut self, node: &Node, path: &str) -> Vec<PortRule> {
        let mut out = Vec::new();
        let Some(fields) = self.map(node, path) else {
            return out;
        };
        let mut seen = false;
        for f in &fields {
            let p = join(path, f.key);
            match f.key {
                "fields" => {
                    seen = true;
                    let items = self.items(f.value, &p);
                    if items.is_empty() {
                        self.err(f.line, &p, ErrorKind::Empty);
                    }
                    if !self.spend(Spend::Ports, items.len(), f.line, &p) {
                        continue;
                    }
                    for (i, item) in items {
                        out.extend(self.icmp_field(item, &format!("{p}[{i}]")));
                    }
                }
                _ => self.unknown(f, path),
            }
        }
        if !seen {
            self.err(node.line, path, ErrorKind::Missing("fields"));
        }
        out
    }

    fn icmp_field(&mut self, node: &Node, path: &str) -> Option<PortRule> {
        let fields = self.map(node, path)?;
        let before = self.errors.len();
        let mut family = IcmpFamily::V4;
        let mut ty: Option<(String, usize, String)> = None;
        for f in &fields {
            let p = join(path, f.key);
            match f.key {
                "family" => {
                    let s = self.string(f.value, &p).unwrap_or_default();
                    match s.as_str() {
                        "IPv4" => family = IcmpFamily::V4,
                        "IPv6" => family = IcmpFamily::V6,
                        _ => self.err(f.value.line, &p, ErrorKind::IcmpFamily(s)),
                    }
                }
                "type" => ty = self.string(f.value, &p).map(|s| (s, f.value.line, p)),
                _ => self.unknown(f, path),
            }
        }
        let Some((t, line, p)) = ty else {
            self.err(node.line, path, ErrorKind::Missing("type"));
            return None;
        };
        let tt = t.trim();
        if tt.len() > 1 && tt.starts_with('0') && tt.bytes().all(|b| b.is_ascii_digit()) {
            self.err(line, &p, ErrorKind::LeadingZero(t));
            return None;
        }
        let icmp_type = match tt.parse::<u8>() {
            Ok(n) => Some(n),
            Err(_) => icmp_type_by_name(family, tt),
        };
        let Some(icmp_type) = icmp_type else {
            self.err(line, &p, ErrorKind::IcmpType(t));
            return None;
        };
        if self.errors.len() > before {
            return None;
        }
        Some(PortRule::Icmp { family, icmp_type })
    }

    fn selector(&mut self, node: &Node, path: &str) -> Option<Selector> {
        if node.is_null() {
            // Cilium rejects a nil endpointSelector; reading it as `{}` would select everyone.
            self.err(node.line, path, ErrorKind::NullSelector);
            return None;
        }
        let fields = self.map(node, path)?;
        let before = self.errors.len();
        let mut sel = Selector::default();
        for f in &fields {
            let p = join(path, f.key);
            match f.key {
                "matchLabels" => {
                    if f.value.is_null() {
                        continue;
                    }
                    let Some(labels) = self.map(f.value, &p) else {
                        continue;
                    };
                    for l in &labels {
                        let lp = join(&p, l.key);
                        let key = self.label_key(l.key, l.line, &lp);
                        let value = self.string(l.value, &lp);
                        if let (Some(k), Some(v)) = (key, value) {
                            // `any:k` and `k` (or `container:k`) are one label: keeping either
                            // would drop the other's condition and select more.
                            if sel.match_labels.contains_key(&k) {
                                self.err(l.line, &lp, ErrorKind::DuplicateKey);
                                continue;
                            }
                            sel.match_labels.insert(k, v);
                        }
                    }
                }
                "matchExpressions" => {
                    for (i, item) in self.items(f.value, &p) {
                        let r = self.requirement(item, &format!("{p}[{i}]"));
                        sel.match_expressions.extend(r);
                    }
                }
                _ => self.unknown(f, path),
            }
        }
        (self.errors.len() == before).then_some(sel)
    }

    fn requirement(&mut self, node: &Node, path: &str) -> Option<Requirement> {
        let fields = self.map(node, path)?;
        let before = self.errors.len();
        let (mut key, mut op, mut values) = (None, None, None);
        for f in &fields {
            let p = join(path, f.key);
            match f.key {
                "key" => {
                    key = self
                        .string(f.value, &p)
                        .and_then(|k| self.label_key(&k, f.value.line, &p))
                }
                "operator" => {
                    let s = self.string(f.value, &p).unwrap_or_default();
                    op = match s.as_str() {
                        "In" => Some(Operator::In),
                        "NotIn" => Some(Operator::NotIn),
                        "Exists" => Some(Operator::Exists),
                        "DoesNotExist" => Some(Operator::DoesNotExist),
                        _ => {
                            self.err(f.value.line, &p, ErrorKind::Operator(s));
                            None
                        }
                    };
                }
                "values" => {
                    let mut v = Vec::new();
                    for (i, item) in self.items(f.value, &p) {
                        v.extend(self.string(item, &format!("{p}[{i}]")));
                    }
                    values = Some((v, f.line));
                }
                _ => self.unknown(f, path),
            }
        }
        if !fields.iter().any(|f| f.key == "key") {
            self.err(node.line, path, ErrorKind::Missing("key"));
        }
        if !fields.iter().any(|f| f.key == "operator") {
            self.err(node.line, path, ErrorKind::Missing("operator"));
        }
        let operator = op?;
        let name = match operator {
            Operator::In => "In",
            Operator::NotIn => "NotIn",
            Operator::Exists => "Exists",
            Operator::DoesNotExist => "DoesNotExist",
        };
        let (values, vline) = values.unwrap_or((Vec::new(), node.line));
        match operator {
            Operator::In | Operator::NotIn if values.is_empty() => self.err(
                vline,
                &join(path, "values"),
                ErrorKind::ValuesRequired(name),
            ),
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => self.err(
                vline,
                &join(path, "values"),
                ErrorKind::ValuesForbidden(name),
            ),
            _ => {}
        }
        if self.errors.len() > before {
            return None;
        }
        Some(Requirement {
            key: key?,
            operator,
            values,
        })
    }

    /// A selector label key, with the `any:` / `container:` source prefix stripped. A key that
    /// identities never carry is an error: a selector on it could never match (or, negated,
    /// always would).
    fn label_key(&mut self, key: &str, line: usize, path: &str) -> Option<String> {
        match strip_label_source(key) {
            // A container's own netpol.* labels are in its identity whatever the filter says.
            Ok(k) if self.filter.ignores(k) && !k.starts_with(NETPOL_LABEL_PREFIX) => {
                self.err(line, path, ErrorKind::FilteredLabel(k.to_owned()));
                None
            }
            Ok(k) => Some(k.to_owned()),
            Err(kind) => {
                self.err(line, path, kind);
                None
            }
        }
    }
}

/// Strips Cilium's `any:` / `container:` source prefix; other sources are errors.
pub(crate) fn strip_label_source(key: &str) -> Result<&str, ErrorKind> {
    let key = match key.split_once(':') {
        Some(("any" | "container", rest)) => rest,
        Some(("reserved", _)) => return Err(ErrorKind::ReservedLabel),
        Some((source, _)) => return Err(ErrorKind::LabelSource(source.to_owned())),
        None => key,
    };
    if key.is_empty() {
        return Err(ErrorKind::EmptyLabelKey);
    }
    Ok(key)
}

/// Kubernetes-style object names: also keeps them safe as file names.
fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 253
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// Cilium's ICMP type names.
fn icmp_type_by_name(family: IcmpFamily, name: &str) -> Option<u8> {
    Some(match family {
        IcmpFamily::V4 => match name {
            "EchoReply" => 0,
            "DestinationUnreachable" => 3,
            "Redirect" => 5,
            "Echo" | "EchoRequest" => 8,
            "RouterAdvertisement" => 9,
            "RouterSelection" => 10,
            "TimeExceeded" => 11,
            "ParameterProblem" => 12,
            "Timestamp" => 13,
            "TimestampReply" => 14,
            "Photuris" => 40,
            "ExtendedEchoRequest" => 42,
            "ExtendedEchoReply" => 43,
            _ => return None,
        },
        IcmpFamily::V6 => match name {
            "DestinationUnreachable" => 1,
            "PacketTooBig" => 2,
            "TimeExceeded" => 3,
            "ParameterProblem" => 4,
            "EchoRequest" => 128,
            "EchoReply" => 129,
            "MulticastListenerQuery" => 130,
            "MulticastListenerReport" => 131,
            "MulticastListenerDone" => 132,
            "RouterSolicitation" => 133,
            "RouterAdvertisement" => 134,
            "NeighborSolicitation" => 135,
            "NeighborAdvertisement" => 136,
            "RedirectMessage" => 137,
            "RouterRenumbering" => 138,
            "ICMPNodeInformationQuery" => 139,
            "ICMPNodeInformationResponse" => 140,
            "InverseNeighborDiscoverySolicitation" => 141,
            "InverseNeighborDiscoveryAdvertisement" => 142,
            "HomeAgentAddressDiscoveryRequest" => 144,
            "HomeAgentAddressDiscoveryReply" => 145,
            "MobilePrefixSolicitation" => 146,
            "MobilePrefixAdvertisement" => 147,
            "DuplicateAddressRequestCodeSuffix" => 157,
            "DuplicateAddressConfirmationCodeSuffix" => 158,
            "ExtendedEchoRequest" => 160,
            "ExtendedEchoReply" => 161,
            _ => return None,
        },
    })
}

/// Turns a label map into a selector (used by the compose shorthand).
pub(crate) fn match_labels(pairs: &[(&str, &str)]) -> Selector {
    Selector {
        match_labels: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        match_expressions: Vec::new(),
    }
}
