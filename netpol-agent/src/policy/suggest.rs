//! `policy suggest`: from observed flows, policies that allow exactly what was seen.
//!
//! Input: flow classes `(opener identity, answering identity, protocol, server port)` (the
//! daemon's flow table: new flows the datapath allowed and would-be drops it audited, each only
//! once the peer answered it, so that a scan suggests nothing), the local
//! identities, and what each identity is ([`Party`]). The opener of a flow is its source, so the
//! server port is kept and the client's ephemeral port never was recorded. Output:
//!
//! - for every local container identity (of `--project` if given), one policy selecting it by
//!   compose project and service (or, outside compose, by all its labels but `netpol.*`), with
//!   an `ingress` rule per peer that opened flows to it and an `egress` rule per peer it opened
//!   flows to, listing the ports seen (consecutive ports as one range);
//! - a direction in which nothing was seen gets `[{}]`: default deny, nothing allowed (exactly
//!   what was observed);
//! - peers: other containers (by project and service, or labels), `host`, `world` (also for
//!   addresses of CIDR rules); ICMP echo as `icmps`;
//! - what cannot be written exactly (a peer the agent could not identify, a container without
//!   labels, another IP protocol without ports, for labels a peer outside the project or ICMP) is
//!   left out — never widened to something broader — and named in the notes.

use std::collections::{BTreeMap, BTreeSet};

use netpol_common::{
    identity::{FIRST_CIDR, FIRST_LABEL, HOST, UNMANAGED, WORLD},
    proto,
};
use serde::{Deserialize, Serialize};

use super::{
    render, DefaultDeny, Entity, IcmpFamily, Peer, Peers, Policy, PortRule, Protocol, Rule,
    Selector, Source, Spec, L4,
};
use crate::identity::{Labels, COMPOSE_PROJECT, COMPOSE_SERVICE, NETPOL_LABEL_PREFIX};

/// One class of observed flows: who opened them, who answered, protocol, server port (ICMP:
/// the message type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FlowKey {
    pub src: u32,
    pub dst: u32,
    pub proto: u8,
    pub dport: u16,
}

/// How often and when a [`FlowKey`] was seen (unix seconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowStats {
    /// New flows seen (allowed and audited).
    pub count: u64,
    /// Of them, audited would-be drops.
    pub audited: u64,
    pub first_seen: u64,
    pub last_seen: u64,
}

/// What an identity is, for the suggestion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Party {
    /// A label identity and its labels.
    Container(Labels),
    Host,
    /// `world`, or a CIDR rule's identity (an address outside containers and host).
    World,
    /// A container the agent had not identified, or an identity it no longer knows.
    Unknown,
}

impl Party {
    /// The party of identity `id`, given the labels of label identities.
    pub fn of(id: u32, labels: Option<&Labels>) -> Party {
        match id {
            HOST => Party::Host,
            WORLD => Party::World,
            _ if id >= FIRST_CIDR => Party::World,
            _ if id >= FIRST_LABEL => {
                labels.map_or(Party::Unknown, |l| Party::Container(l.clone()))
            }
            _ => Party::Unknown,
        }
    }
}

/// `policy suggest -o`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SuggestFormat {
    /// CiliumNetworkPolicy documents.
    #[default]
    Yaml,
    /// `netpol.ingress` / `netpol.egress` labels of compose services.
    Labels,
}

/// A peer or local endpoint, as a selector can name it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    Service {
        project: String,
        service: String,
    },
    /// Labels outside compose (`netpol.*` removed; never empty).
    Labels(Labels),
    Host,
    World,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Port {
    /// TCP, UDP or SCTP (its number) and a port.
    L4(u8, u16),
    Icmp(IcmpFamily, u8),
}

#[derive(Default)]
struct Local {
    ingress: BTreeMap<Who, BTreeSet<Port>>,
    egress: BTreeMap<Who, BTreeSet<Port>>,
}

/// The suggested policies and what could not be written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Suggestion {
    pub policies: Vec<Policy>,
    /// `-o labels`: one `services:` document per compose project.
    pub labels: String,
    pub notes: Vec<String>,
}

fn who(party: &Party) -> Result<Who, String> {
    match party {
        Party::Host => Ok(Who::Host),
        Party::World => Ok(Who::World),
        Party::Unknown => Err("a peer the agent had not identified".into()),
        Party::Container(l) => {
            if let (Some(p), Some(s)) = (l.get(COMPOSE_PROJECT), l.get(COMPOSE_SERVICE)) {
                return Ok(Who::Service {
                    project: p.clone(),
                    service: s.clone(),
                });
            }
            let own: Labels = l
                .iter()
                .filter(|(k, _)| !k.starts_with(NETPOL_LABEL_PREFIX))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if own.is_empty() {
                Err("a container without labels (no selector can name it alone)".into())
            } else {
                Ok(Who::Labels(own))
            }
        }
    }
}

fn port(k: &FlowKey) -> Option<Port> {
    match k.proto {
        proto::TCP | proto::UDP | proto::SCTP => Some(Port::L4(k.proto, k.dport)),
        proto::ICMP => Some(Port::Icmp(IcmpFamily::V4, k.dport as u8)),
        proto::ICMPV6 => Some(Port::Icmp(IcmpFamily::V6, k.dport as u8)),
        _ => None,
    }
}

fn proto_name(p: u8) -> String {
    match p {
        proto::TCP => "tcp".into(),
        proto::UDP => "udp".into(),
        proto::SCTP => "sctp".into(),
        proto::ICMP => "icmp".into(),
        proto::ICMPV6 => "icmpv6".into(),
        n => format!("protocol {n}"),
    }
}

fn describe(w: &Who) -> String {
    match w {
        Who::Service { project, service } => format!("{project}/{service}"),
        Who::Labels(l) => {
            let parts: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
            parts.join(",")
        }
        Who::Host => "host".into(),
        Who::World => "world".into(),
    }
}

/// Suggests policies for `flows`. `locals`: the local identities (running containers) and
/// their labels; `party`: what any identity is; `project`: only local endpoints of this
/// compose project get policies.
pub fn suggest(
    flows: &[(FlowKey, FlowStats)],
    locals: &BTreeMap<u32, Labels>,
    party: &dyn Fn(u32) -> Party,
    project: Option<&str>,
) -> Suggestion {
    let mut notes = BTreeSet::new();
    let in_scope = |w: &Who| match (w, project) {
        (Who::Host | Who::World, _) => false,
        (_, None) => true,
        (Who::Service { project: p, .. }, Some(want)) => p == want,
        (Who::Labels(_), Some(_)) => false,
    };
    let mut out: BTreeMap<Who, Local> = BTreeMap::new();
    for (id, labels) in locals {
        match who(&Party::Container(labels.clone())) {
            Ok(w) if in_scope(&w) => {
                out.entry(w).or_default();
            }
            Ok(_) => {}
            Err(why) => {
                if project.is_none() {
                    notes.insert(format!("identity {id}: {why}: no policy suggested"));
                }
            }
        }
    }
    for (k, _) in flows {
        let (src, dst) = (party(k.src), party(k.dst));
        let (src_w, dst_w) = (who(&src), who(&dst));
        let what = || {
            let s = src_w
                .as_ref()
                .map_or_else(|_| format!("id:{}", k.src), describe);
            let d = dst_w
                .as_ref()
                .map_or_else(|_| format!("id:{}", k.dst), describe);
            format!("{s} -> {d} {}:{}", proto_name(k.proto), k.dport)
        };
        let touches_scope = [&src_w, &dst_w]
            .iter()
            .any(|w| w.as_ref().is_ok_and(in_scope));
        if !touches_scope {
            continue;
        }
        let Some(p) = port(k) else {
            notes.insert(format!("{}: no ports to name, left out", what()));
            continue;
        };
        let (Ok(s), Ok(d)) = (&src_w, &dst_w) else {
            let why = src_w.as_ref().err().or(dst_w.as_ref().err());
            notes.insert(format!(
                "{}: {}, left out",
                what(),
                why.map_or("unknown", |s| s.as_str())
            ));
            continue;
        };
        if k.src == UNMANAGED || k.dst == UNMANAGED {
            continue;
        }
        if in_scope(s) {
            out.entry(s.clone())
                .or_default()
                .egress
                .entry(d.clone())
                .or_default()
                .insert(p);
        }
        if in_scope(d) {
            out.entry(d.clone())
                .or_default()
                .ingress
                .entry(s.clone())
                .or_default()
                .insert(p);
        }
    }
    let policies = out.iter().map(|(w, l)| local_policy(w, l)).collect();
    let labels = to_labels(&out, &mut notes);
    Suggestion {
        policies,
        labels,
        notes: notes.into_iter().collect(),
    }
}

fn selector(w: &Who) -> Selector {
    let match_labels = match w {
        Who::Service { project, service } => Labels::from([
            (COMPOSE_PROJECT.to_owned(), project.clone()),
            (COMPOSE_SERVICE.to_owned(), service.clone()),
        ]),
        Who::Labels(l) => l.clone(),
        Who::Host | Who::World => Labels::new(),
    };
    Selector {
        match_labels,
        match_expressions: Vec::new(),
    }
}

fn peer(w: &Who) -> Peer {
    match w {
        Who::Host => Peer::Entity(Entity::Host),
        Who::World => Peer::Entity(Entity::World),
        other => Peer::Endpoints(selector(other)),
    }
}

/// The port rules of a set of ports: consecutive ports of one protocol as one range.
fn port_rules(ports: &BTreeSet<Port>) -> Vec<PortRule> {
    let mut out: Vec<PortRule> = Vec::new();
    for p in ports {
        match *p {
            Port::L4(n, port) => {
                let proto = match n {
                    proto::UDP => Protocol::Udp,
                    proto::SCTP => Protocol::Sctp,
                    _ => Protocol::Tcp,
                };
                if let Some(PortRule::Ports {
                    proto: lp, last, ..
                }) = out.last_mut()
                {
                    if *lp == proto && last.checked_add(1) == Some(port) {
                        *last = port;
                        continue;
                    }
                }
                out.push(PortRule::Ports {
                    proto,
                    first: port,
                    last: port,
                });
            }
            Port::Icmp(family, icmp_type) => out.push(PortRule::Icmp { family, icmp_type }),
        }
    }
    out
}

fn rules(peers: &BTreeMap<Who, BTreeSet<Port>>) -> Vec<Rule> {
    peers
        .iter()
        .map(|(w, ports)| Rule {
            peers: Peers::Listed(vec![peer(w)]),
            l4: L4::Only(port_rules(ports)),
        })
        .collect()
}

fn policy_name(w: &Who) -> String {
    let raw = match w {
        Who::Service { project, service } => format!("{project}-{service}"),
        other => format!("suggested-{}", describe(other)),
    };
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(253);
    let name = name.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if name.is_empty() {
        "suggested".into()
    } else {
        name.to_owned()
    }
}

fn local_policy(w: &Who, l: &Local) -> Policy {
    Policy {
        name: policy_name(w),
        source: Source::File("suggested".into()),
        specs: vec![Spec {
            description: Some(format!("observed flows of {}", describe(w))),
            selector: selector(w),
            ingress: rules(&l.ingress),
            egress: rules(&l.egress),
            // Nothing seen in a direction: default deny, nothing allowed.
            default_deny: DefaultDeny {
                ingress: Some(true),
                egress: Some(true),
            },
            ..Spec::default()
        }],
    }
}

/// The compose-label form: per project, `services: NAME: labels: {netpol.ingress, netpol.egress}`.
fn to_labels(out: &BTreeMap<Who, Local>, notes: &mut BTreeSet<String>) -> String {
    let mut by_project: BTreeMap<&str, Vec<(&str, String, String)>> = BTreeMap::new();
    for (w, l) in out {
        let Who::Service { project, service } = w else {
            notes.insert(format!(
                "{}: not a compose service, no labels suggested (use -o yaml)",
                describe(w)
            ));
            continue;
        };
        let mut items = |peers: &BTreeMap<Who, BTreeSet<Port>>| -> String {
            let mut v = Vec::new();
            for (peer, ports) in peers {
                let name = match peer {
                    Who::Host => "host".to_owned(),
                    Who::World => "world".to_owned(),
                    Who::Service {
                        project: p,
                        service: s,
                    } if p == project && !matches!(s.as_str(), "world" | "host" | "all") => {
                        s.clone()
                    }
                    other => {
                        notes.insert(format!(
                            "{project}/{service}: peer {} cannot be named in a label (another project, or not compose): left out (use -o yaml)",
                            describe(other)
                        ));
                        continue;
                    }
                };
                for r in port_rules(ports) {
                    match r {
                        PortRule::Ports { proto, first, last } => {
                            let proto = match proto {
                                Protocol::Udp => "udp",
                                Protocol::Sctp => "sctp",
                                _ => "tcp",
                            };
                            if first == last {
                                v.push(format!("{name}:{first}/{proto}"));
                            } else {
                                v.push(format!("{name}:{first}-{last}/{proto}"));
                            }
                        }
                        PortRule::Icmp { .. } => {
                            notes.insert(format!(
                                "{project}/{service}: ICMP with {} cannot be written as a label (it allows every port): left out (use -o yaml)",
                                describe(peer)
                            ));
                        }
                    }
                }
            }
            v.join(", ")
        };
        let ingress = items(&l.ingress);
        let egress = items(&l.egress);
        by_project
            .entry(project)
            .or_default()
            .push((service, ingress, egress));
    }
    let mut s = String::new();
    for (i, (project, services)) in by_project.iter().enumerate() {
        if i > 0 {
            s.push_str("---\n");
        }
        s.push_str(&format!("# compose project {project}\nservices:\n"));
        for (service, ingress, egress) in services {
            s.push_str(&format!(
                "  {}:\n    labels:\n      netpol.ingress: {}\n      netpol.egress: {}\n",
                render::key(service),
                render::quote(ingress),
                render::quote(egress)
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{compile, parse_str, Endpoints};
    use netpol_common::{
        policy::{decide, lookup_keys, Verdict},
        Direction::{self, Egress, Ingress},
    };

    const DB: u32 = 300;
    const APP: u32 = 301;
    const WEB: u32 = 302;
    const OTHER: u32 = 303;

    fn svc(project: &str, service: &str) -> Labels {
        Labels::from([
            (COMPOSE_PROJECT.to_owned(), project.to_owned()),
            (COMPOSE_SERVICE.to_owned(), service.to_owned()),
        ])
    }

    fn locals() -> Endpoints {
        Endpoints::from([
            (DB, svc("shop", "db")),
            (APP, svc("shop", "app")),
            (WEB, svc("shop", "web")),
            (OTHER, svc("blog", "web")),
        ])
    }

    fn party(id: u32) -> Party {
        Party::of(id, locals().get(&id))
    }

    fn flow(src: u32, dst: u32, p: u8, dport: u16) -> (FlowKey, FlowStats) {
        (
            FlowKey {
                src,
                dst,
                proto: p,
                dport,
            },
            FlowStats {
                count: 1,
                ..FlowStats::default()
            },
        )
    }

    fn observed() -> Vec<(FlowKey, FlowStats)> {
        vec![
            flow(APP, DB, proto::TCP, 5432),
            flow(WEB, APP, proto::TCP, 8080),
            flow(WEB, APP, proto::TCP, 8081),
            flow(WORLD, WEB, proto::TCP, 80),
            flow(HOST, WEB, proto::TCP, 80),
            flow(APP, WORLD, proto::TCP, 443),
            flow(APP, FIRST_CIDR + 1, proto::UDP, 53),
            flow(APP, HOST, proto::ICMP, 8),
            flow(OTHER, DB, proto::TCP, 5432),
            flow(UNMANAGED, DB, proto::TCP, 5432),
            flow(APP, DB, 47, 0),
        ]
    }

    fn verdict(
        c: &crate::policy::Compiled,
        local: u32,
        remote: u32,
        dir: Direction,
        p: u8,
        port: u16,
    ) -> bool {
        if !c.enforcement_of(local).get(dir) {
            return true;
        }
        let lpm = |key: &netpol_common::policy::PolicyKey| {
            let bits = |k: &netpol_common::policy::PolicyKey| -> u128 {
                (u128::from(k.local) << 64)
                    | (u128::from(k.remote) << 32)
                    | (u128::from(k.direction) << 24)
                    | (u128::from(k.proto) << 16)
                    | u128::from(k.dport())
            };
            let want = bits(key);
            c.policy
                .iter()
                .filter(|(k, _)| {
                    (bits(&k.key) >> (96 - k.prefix_len)) == (want >> (96 - k.prefix_len))
                })
                .max_by_key(|(k, _)| k.prefix_len)
                .map(|(_, v)| *v)
        };
        let [a, b] = lookup_keys(local, remote, dir, p, port);
        matches!(decide(lpm(&a), lpm(&b)), Verdict::Allow(_))
    }

    /// A flow passes when the opener's egress and the answerer's ingress allow it.
    fn passes(c: &crate::policy::Compiled, src: u32, dst: u32, p: u8, port: u16) -> bool {
        let local = |id| locals().contains_key(&id);
        (!local(src) || verdict(c, src, dst, Egress, p, port))
            && (!local(dst) || verdict(c, dst, src, Ingress, p, port))
    }

    #[test]
    fn suggestion_allows_what_was_seen_and_nothing_else() {
        let s = suggest(&observed(), &locals(), &party, Some("shop"));
        let yaml = render::to_yaml(&s.policies, None);
        let parsed = match parse_str("suggested.yaml", &yaml) {
            Ok(p) => p,
            Err(e) => panic!("{e}\n{yaml}"),
        };
        assert_eq!(
            parsed.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["shop-app", "shop-db", "shop-web"]
        );
        // Consecutive ports are one range.
        assert!(
            yaml.contains("{ port: \"8080\", endPort: 8081, protocol: TCP }"),
            "{yaml}"
        );
        let c = compile(&parsed, &locals()).expect("compile");
        // Everything observed passes (CIDR identity 1 << 24 + 1 is world).
        for (k, _) in observed() {
            if k.src == UNMANAGED || k.proto == 47 {
                continue;
            }
            let dst = if k.dst >= FIRST_CIDR { WORLD } else { k.dst };
            assert!(passes(&c, k.src, dst, k.proto, k.dport), "{k:?}\n{yaml}");
        }
        // What was never seen does not: another port, another pair, the other direction, an
        // unidentified container, another protocol.
        for (src, dst, p, port) in [
            (APP, DB, proto::TCP, 5433),
            (APP, DB, proto::UDP, 5432),
            (WEB, DB, proto::TCP, 5432),
            (DB, APP, proto::TCP, 8080),
            (WORLD, APP, proto::TCP, 8080),
            (HOST, DB, proto::TCP, 5432),
            (APP, WORLD, proto::TCP, 80),
            (UNMANAGED, DB, proto::TCP, 5432),
            (APP, DB, 47, 0),
            (APP, HOST, proto::ICMP, 13),
            (DB, WORLD, proto::TCP, 443),
        ] {
            assert!(
                !passes(&c, src, dst, p, port),
                "{src} -> {dst} {p}:{port}\n{yaml}"
            );
        }
        // The other project's web opened a flow to db: db allows it, blog/web got no policy.
        assert!(passes(&c, OTHER, DB, proto::TCP, 5432));
        assert!(!c.enforcement_of(OTHER).ingress);
        assert!(
            s.notes.iter().any(|n| n.contains("protocol 47")),
            "{:?}",
            s.notes
        );
    }

    #[test]
    fn nothing_seen_is_deny_all_and_labels_say_the_same() {
        let flows = vec![
            flow(APP, DB, proto::TCP, 5432),
            flow(HOST, APP, proto::TCP, 8080),
            flow(OTHER, DB, proto::TCP, 5432),
            flow(APP, WORLD, proto::ICMP, 8),
        ];
        let s = suggest(&flows, &locals(), &party, Some("shop"));
        let web = s
            .policies
            .iter()
            .find(|p| p.name == "shop-web")
            .expect("web");
        let c = compile(&s.policies, &locals()).expect("compile");
        assert!(c.enforcement_of(WEB).ingress && c.enforcement_of(WEB).egress);
        assert!(web.specs[0].ingress.is_empty() && web.specs[0].egress.is_empty());
        assert_eq!(
            s.labels,
            "# compose project shop\nservices:\n  app:\n    labels:\n      netpol.ingress: \"host:8080/tcp\"\n      netpol.egress: \"db:5432/tcp\"\n  db:\n    labels:\n      netpol.ingress: \"app:5432/tcp\"\n      netpol.egress: \"\"\n  web:\n    labels:\n      netpol.ingress: \"\"\n      netpol.egress: \"\"\n"
        );
        assert!(
            s.notes.iter().any(|n| n.contains("blog/web")),
            "{:?}",
            s.notes
        );
        assert!(s.notes.iter().any(|n| n.contains("ICMP")), "{:?}", s.notes);
        // The label form is what the compose shorthand reads.
        let mut l = svc("shop", "db");
        l.insert("netpol.ingress".into(), "app:5432/tcp".into());
        assert!(crate::policy::compose::from_labels("db", &l).is_ok());
    }

    #[test]
    fn without_a_project_every_local_gets_a_policy() {
        let s = suggest(&observed(), &locals(), &party, None);
        let names: Vec<&str> = s.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["blog-web", "shop-app", "shop-db", "shop-web"]);
    }
}
