//! The policy model back to CiliumNetworkPolicy YAML (multi-document), for `policy export` and
//! `policy suggest`. What it writes, [`super::parse_str`] reads back to the same model, up to
//! rules it had to split (a rule with two peer kinds, or with ports and ICMP fields, or with
//! more than [`super::limits::PORTS_PER_RULE`] of either, becomes several rules, as the parser
//! demands; the same traffic is allowed). Strings are double-quoted (JSON escaping is valid YAML),
//! so no label value can change the document's structure.

use std::fmt::Write;

use super::{
    limits::PORTS_PER_RULE, Entity, IcmpFamily, Operator, Peer, Peers, Policy, PortRule, Protocol,
    Rule, Selector, Spec, L4,
};

/// One document per policy, separated by `---`. `namespace` adds `metadata.namespace`
/// (Kubernetes); netpol's own parser rejects it.
pub fn to_yaml(policies: &[Policy], namespace: Option<&str>) -> String {
    let mut out = String::new();
    for (i, p) in policies.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        policy(&mut out, p, namespace);
    }
    out
}

/// A double-quoted YAML scalar.
pub(crate) fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// A mapping key: plain when it is a label-key-like string, else quoted.
pub(crate) fn key(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/'));
    if plain {
        s.to_owned()
    } else {
        quote(s)
    }
}

fn policy(out: &mut String, p: &Policy, namespace: Option<&str>) {
    out.push_str("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n");
    let _ = writeln!(out, "  name: {}", quote(&p.name));
    if let Some(ns) = namespace {
        let _ = writeln!(out, "  namespace: {}", quote(ns));
    }
    // Audit mode is the policy's (one annotation for every spec).
    if !p.specs.is_empty() && p.specs.iter().all(|s| s.audit) {
        let _ = writeln!(
            out,
            "  annotations:\n    {}: \"true\"",
            super::parse::AUDIT_ANNOTATION
        );
    }
    match p.specs.as_slice() {
        [one] => {
            out.push_str("spec:\n");
            spec(out, one, "  ");
        }
        many => {
            out.push_str("specs:\n");
            for s in many {
                let mut body = String::new();
                spec(&mut body, s, "    ");
                // The first line of each item carries the list dash.
                out.push_str("  - ");
                out.push_str(body.trim_start());
            }
        }
    }
}

fn spec(out: &mut String, s: &Spec, ind: &str) {
    use netpol_common::Direction::{Egress, Ingress};
    if let Some(d) = &s.description {
        let _ = writeln!(out, "{ind}description: {}", quote(d));
    }
    let _ = writeln!(out, "{ind}endpointSelector:");
    selector_body(out, &s.selector, &format!("{ind}  "), "{}");
    for (dir, name, allow, deny_name, deny) in [
        (
            Ingress,
            "ingress",
            &s.ingress,
            "ingressDeny",
            &s.ingress_deny,
        ),
        (Egress, "egress", &s.egress, "egressDeny", &s.egress_deny),
    ] {
        let rules_dir = if dir == Ingress { "from" } else { "to" };
        if !allow.is_empty() {
            rules(out, name, allow, rules_dir, ind);
        } else if deny.is_empty() && s.default_deny(dir) {
            // Default deny without rules (an empty `netpol.ingress` label): the parser drops
            // enableDefaultDeny for a direction without rules, an empty rule keeps it.
            let _ = writeln!(out, "{ind}{name}:\n{ind}  - {{}}");
        }
        if !deny.is_empty() {
            rules(out, deny_name, deny, rules_dir, ind);
        }
    }
    // An opt-out is read only for a direction with rules (as the parser does).
    let oi = s.default_deny.ingress == Some(false)
        && !(s.ingress.is_empty() && s.ingress_deny.is_empty());
    let oe =
        s.default_deny.egress == Some(false) && !(s.egress.is_empty() && s.egress_deny.is_empty());
    if oi || oe {
        let _ = writeln!(out, "{ind}enableDefaultDeny:");
        if oi {
            let _ = writeln!(out, "{ind}  ingress: false");
        }
        if oe {
            let _ = writeln!(out, "{ind}  egress: false");
        }
    }
}

/// The body of a selector at `ind`; `empty` is written (inline, after the caller's key) when it
/// selects everything.
fn selector_body(out: &mut String, s: &Selector, ind: &str, empty: &str) {
    if s.is_all() {
        // Replace the newline the caller wrote after its key.
        if out.ends_with(":\n") {
            out.pop();
            let _ = writeln!(out, " {empty}");
        } else {
            let _ = writeln!(out, "{ind}{empty}");
        }
        return;
    }
    if !s.match_labels.is_empty() {
        let _ = writeln!(out, "{ind}matchLabels:");
        for (k, v) in &s.match_labels {
            let _ = writeln!(out, "{ind}  {}: {}", key(k), quote(v));
        }
    }
    if !s.match_expressions.is_empty() {
        let _ = writeln!(out, "{ind}matchExpressions:");
        for r in &s.match_expressions {
            let op = match r.operator {
                Operator::In => "In",
                Operator::NotIn => "NotIn",
                Operator::Exists => "Exists",
                Operator::DoesNotExist => "DoesNotExist",
            };
            let _ = write!(out, "{ind}  - {{ key: {}, operator: {op}", quote(&r.key));
            if !r.values.is_empty() {
                let vals: Vec<String> = r.values.iter().map(|v| quote(v)).collect();
                let _ = write!(out, ", values: [{}]", vals.join(", "));
            }
            out.push_str(" }\n");
        }
    }
}

/// One parser-acceptable rule: its peer field (`Endpoints`, `Entities`, `CIDR`, `CIDRSet`) and
/// peers, or none; its ports or ICMP fields; whether they are ICMP fields.
type Piece<'a> = (Option<(&'static str, Vec<&'a Peer>)>, Vec<PortRule>, bool);

/// Splits a model rule into rules the parser accepts: one peer kind and one of ports / ICMP
/// fields each, at most [`PORTS_PER_RULE`] of either.
fn split(rule: &Rule) -> Vec<Piece<'_>> {
    let peer_groups: Vec<Option<(&'static str, Vec<&Peer>)>> = match &rule.peers {
        Peers::Unspecified => vec![None],
        Peers::Listed(list) if list.is_empty() => vec![Some(("Endpoints", Vec::new()))],
        Peers::Listed(list) => {
            let mut groups: Vec<(&'static str, Vec<&Peer>)> = Vec::new();
            for p in list {
                let kind = match p {
                    Peer::Endpoints(_) => "Endpoints",
                    Peer::Entity(_) => "Entities",
                    Peer::Cidr(c) if c.except.is_empty() => "CIDR",
                    Peer::Cidr(_) => "CIDRSet",
                };
                match groups.iter_mut().find(|(k, _)| *k == kind) {
                    Some((_, v)) => v.push(p),
                    None => groups.push((kind, vec![p])),
                }
            }
            groups.into_iter().map(Some).collect()
        }
    };
    // (ports, is_icmp) chunks; L4::All is one empty chunk.
    let l4_chunks: Vec<(Vec<PortRule>, bool)> = match &rule.l4 {
        L4::All => vec![(Vec::new(), false)],
        L4::Only(list) => {
            let (icmp, ports): (Vec<PortRule>, Vec<PortRule>) = list
                .iter()
                .partition(|p| matches!(p, PortRule::Icmp { .. }));
            let mut v = Vec::new();
            for c in ports.chunks(PORTS_PER_RULE) {
                v.push((c.to_vec(), false));
            }
            for c in icmp.chunks(PORTS_PER_RULE) {
                v.push((c.to_vec(), true));
            }
            v
        }
    };
    let mut out = Vec::new();
    for g in &peer_groups {
        for (ports, icmp) in &l4_chunks {
            out.push((g.clone(), ports.clone(), *icmp));
        }
    }
    out
}

fn rules(out: &mut String, section: &str, list: &[Rule], dir: &str, ind: &str) {
    let _ = writeln!(out, "{ind}{section}:");
    for r in list {
        for (peers, ports, icmp) in split(r) {
            let mut body = String::new();
            let item = format!("{ind}    ");
            if let Some((kind, peers)) = peers {
                let field = format!("{dir}{kind}");
                if peers.is_empty() {
                    let _ = writeln!(body, "{item}{field}: []");
                } else {
                    let _ = writeln!(body, "{item}{field}:");
                    for p in peers {
                        peer(&mut body, p, &format!("{item}  "));
                    }
                }
            }
            if !ports.is_empty() {
                if icmp {
                    let _ = writeln!(body, "{item}icmps:\n{item}  - fields:");
                    for p in &ports {
                        if let PortRule::Icmp { family, icmp_type } = p {
                            let fam = match family {
                                IcmpFamily::V4 => "IPv4",
                                IcmpFamily::V6 => "IPv6",
                            };
                            let _ = writeln!(
                                body,
                                "{item}      - {{ type: {icmp_type}, family: {fam} }}"
                            );
                        }
                    }
                } else {
                    let _ = writeln!(body, "{item}toPorts:\n{item}  - ports:");
                    for p in &ports {
                        if let PortRule::Ports { proto, first, last } = p {
                            let proto = match proto {
                                Protocol::Tcp => "TCP",
                                Protocol::Udp => "UDP",
                                Protocol::Sctp => "SCTP",
                                Protocol::Any => "ANY",
                            };
                            let _ = write!(body, "{item}      - {{ port: \"{first}\"");
                            if last > first {
                                let _ = write!(body, ", endPort: {last}");
                            }
                            let _ = writeln!(body, ", protocol: {proto} }}");
                        }
                    }
                }
            }
            if body.is_empty() {
                let _ = writeln!(out, "{ind}  - {{}}");
            } else {
                out.push_str(&format!("{ind}  - "));
                out.push_str(body.trim_start());
            }
        }
    }
}

fn peer(out: &mut String, p: &Peer, ind: &str) {
    match p {
        Peer::Endpoints(s) => {
            let mut body = String::new();
            selector_body(&mut body, s, &format!("{ind}  "), "{}");
            if s.is_all() {
                let _ = writeln!(out, "{ind}- {{}}");
            } else {
                out.push_str(&format!("{ind}- "));
                out.push_str(body.trim_start());
            }
        }
        Peer::Entity(e) => {
            let name = match e {
                Entity::World => "world",
                Entity::Host => "host",
                Entity::All => "all",
            };
            let _ = writeln!(out, "{ind}- {name}");
        }
        Peer::Cidr(c) if c.except.is_empty() => {
            let _ = writeln!(out, "{ind}- {}", quote(&c.cidr.to_string()));
        }
        Peer::Cidr(c) => {
            let _ = writeln!(out, "{ind}- cidr: {}", quote(&c.cidr.to_string()));
            let ex: Vec<String> = c.except.iter().map(|e| quote(&e.to_string())).collect();
            let _ = writeln!(out, "{ind}  except: [{}]", ex.join(", "));
        }
    }
}
