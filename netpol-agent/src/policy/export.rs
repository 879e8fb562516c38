//! `policy export --namespace NS`: the policies in force as Kubernetes CiliumNetworkPolicies, for
//! the day a compose project moves to a cluster running Cilium.
//!
//! # The label mapping (README "Exporting to Kubernetes")
//!
//! - `com.docker.compose.project: P` → the policy's namespace NS. A namespaced
//!   CiliumNetworkPolicy selects endpoints of its own namespace, so the project condition becomes
//!   the namespace. The policies of one export must name at most one project (several projects in
//!   one namespace would let one project's `app` match the other's rules: an error).
//! - `com.docker.compose.service: S` → `app.kubernetes.io/name: S` (Kubernetes' recommended
//!   label; give the pods that label).
//! - `netpol.*` conditions are dropped: they only keep a container's label policy from selecting
//!   another container; in a cluster the policy object itself is the policy.
//! - Other `com.docker.compose.*` keys have no Kubernetes meaning: an error.
//! - Every other label is kept as it is (a pod label of the same key and value); a key or value
//!   Kubernetes would refuse is an error.
//! - Compose label policies (`compose:P/S`) are expanded into ordinary rules and named
//!   `S-labels`; other names are lowered to DNS subdomain names (`My_Policy` → `my-policy`).
//!   Two policies with one exported name are an error.
//!
//! Peers keep their meaning with one documented difference: a peer selector without a project
//! (`fromEndpoints: [{}]`, `role: backend`) means every container of the host here and every pod
//! of namespace NS in the cluster.

use std::collections::{BTreeMap, BTreeSet};

use super::{render, Operator, Peer, Peers, Policy, Requirement, Rule, Selector, Source, Spec};
use crate::identity::{Labels, COMPOSE_PROJECT, COMPOSE_SERVICE, NETPOL_LABEL_PREFIX};

/// The pod label a compose service becomes.
pub const POD_NAME_LABEL: &str = "app.kubernetes.io/name";

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(
        "invalid namespace {0:?} (a DNS label: lowercase letters, digits and '-', at most 63)"
    )]
    Namespace(String),
    #[error("policy {policy}: {what}")]
    Policy { policy: String, what: String },
    #[error("the policies name several compose projects ({}); export one project at a time (policy export --namespace NS NAME…)", .0.join(", "))]
    Projects(Vec<String>),
    #[error("policies {first} and {second} would both be exported as {name}")]
    NameClash {
        first: String,
        second: String,
        name: String,
    },
    #[error("no policy named {0}")]
    NotFound(String),
}

/// A container's labels as its pod's labels under the mapping above (project and `netpol.*`
/// gone, the service as [`POD_NAME_LABEL`]).
pub fn pod_labels(labels: &Labels) -> Labels {
    labels
        .iter()
        .filter(|(k, _)| k.as_str() != COMPOSE_PROJECT && !k.starts_with(NETPOL_LABEL_PREFIX))
        .map(|(k, v)| {
            let k = if k == COMPOSE_SERVICE {
                POD_NAME_LABEL
            } else {
                k.as_str()
            };
            (k.to_owned(), v.clone())
        })
        .collect()
}

/// The policies (those named in `names`, or all) as Kubernetes CiliumNetworkPolicies in
/// namespace `ns`: multi-document YAML. Label policies of several containers of one service are
/// one policy.
pub fn export(policies: &[Policy], ns: &str, names: &[String]) -> Result<String, ExportError> {
    if !dns_label(ns) {
        return Err(ExportError::Namespace(ns.to_owned()));
    }
    let mut chosen: Vec<&Policy> = Vec::new();
    for p in policies {
        // Replicas of one compose service carry one label policy each (described by container
        // name): keep the first.
        let bare = |p: &Policy| -> Vec<Spec> {
            p.specs
                .iter()
                .map(|s| Spec {
                    description: None,
                    ..s.clone()
                })
                .collect()
        };
        if chosen
            .iter()
            .any(|q| q.name == p.name && bare(q) == bare(p))
        {
            continue;
        }
        chosen.push(p);
    }
    for n in names {
        if !chosen.iter().any(|p| &p.name == n || &export_name(p) == n) {
            return Err(ExportError::NotFound(n.clone()));
        }
    }
    if !names.is_empty() {
        chosen.retain(|p| names.contains(&p.name) || names.contains(&export_name(p)));
    }
    let mut projects = BTreeSet::new();
    let mut out: Vec<Policy> = Vec::new();
    let mut by_name: BTreeMap<String, String> = BTreeMap::new();
    for p in chosen {
        let name = export_name(p);
        if let Some(first) = by_name.insert(name.clone(), p.name.clone()) {
            return Err(ExportError::NameClash {
                first,
                second: p.name.clone(),
                name,
            });
        }
        let err = |what: String| ExportError::Policy {
            policy: p.name.clone(),
            what,
        };
        let mut specs = Vec::new();
        for s in &p.specs {
            specs.push(map_spec(s, &mut projects).map_err(err)?);
        }
        out.push(Policy {
            name,
            source: p.source.clone(),
            specs,
        });
    }
    if projects.len() > 1 {
        return Err(ExportError::Projects(projects.into_iter().collect()));
    }
    Ok(render::to_yaml(&out, Some(ns)))
}

/// The exported `metadata.name` of `p`.
pub fn export_name(p: &Policy) -> String {
    let base = match (&p.source, p.name.strip_prefix("compose:")) {
        (Source::Labels { .. }, Some(ps)) => {
            let service = ps.split_once('/').map_or(ps, |(_, s)| s);
            format!("{service}-labels")
        }
        (Source::Labels { container }, None) => format!("{container}-labels"),
        _ => p.name.clone(),
    };
    dns_name(&base)
}

/// Lowercase letters, digits, '-' and '.', starting and ending alphanumeric (RFC 1123 subdomain).
fn dns_name(s: &str) -> String {
    let mapped: String = s
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' | '.' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    let trimmed = mapped.trim_matches(|c: char| c == '-' || c == '.');
    let mut name: String = trimmed.chars().take(253).collect();
    while name.ends_with(['-', '.']) {
        name.pop();
    }
    if name.is_empty() {
        "policy".into()
    } else {
        name
    }
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn map_spec(s: &Spec, projects: &mut BTreeSet<String>) -> Result<Spec, String> {
    let rules = |list: &[Rule], projects: &mut BTreeSet<String>| -> Result<Vec<Rule>, String> {
        list.iter()
            .map(|r| {
                let peers = match &r.peers {
                    Peers::Unspecified => Peers::Unspecified,
                    Peers::Listed(l) => Peers::Listed(
                        l.iter()
                            .map(|p| match p {
                                Peer::Endpoints(sel) => {
                                    map_selector(sel, projects).map(Peer::Endpoints)
                                }
                                other => Ok(other.clone()),
                            })
                            .collect::<Result<_, _>>()?,
                    ),
                };
                Ok(Rule {
                    peers,
                    l4: r.l4.clone(),
                })
            })
            .collect()
    };
    Ok(Spec {
        description: s.description.clone(),
        selector: map_selector(&s.selector, projects)?,
        ingress: rules(&s.ingress, projects)?,
        ingress_deny: rules(&s.ingress_deny, projects)?,
        egress: rules(&s.egress, projects)?,
        egress_deny: rules(&s.egress_deny, projects)?,
        default_deny: s.default_deny,
        audit: s.audit,
    })
}

fn map_key(k: &str) -> Result<Option<&str>, String> {
    if k.starts_with(NETPOL_LABEL_PREFIX) {
        return Ok(None);
    }
    if k == COMPOSE_SERVICE {
        return Ok(Some(POD_NAME_LABEL));
    }
    if k.starts_with("com.docker.compose.") {
        return Err(format!("label {k} has no Kubernetes equivalent"));
    }
    if !k8s_key(k) {
        return Err(format!(
            "label key {k:?} is not a valid Kubernetes label key"
        ));
    }
    Ok(Some(k))
}

fn map_selector(sel: &Selector, projects: &mut BTreeSet<String>) -> Result<Selector, String> {
    let mut out = Selector::default();
    for (k, v) in &sel.match_labels {
        if k == COMPOSE_PROJECT {
            projects.insert(v.clone());
            continue;
        }
        if let Some(k) = map_key(k)? {
            check_value(k, v)?;
            out.match_labels.insert(k.to_owned(), v.clone());
        }
    }
    for r in &sel.match_expressions {
        if r.key == COMPOSE_PROJECT {
            match (r.operator, r.values.as_slice()) {
                (Operator::In, [one]) => {
                    projects.insert(one.clone());
                    continue;
                }
                _ => {
                    return Err(format!(
                        "a {COMPOSE_PROJECT} condition other than one project cannot become a namespace"
                    ))
                }
            }
        }
        if let Some(k) = map_key(&r.key)? {
            for v in &r.values {
                check_value(k, v)?;
            }
            out.match_expressions.push(Requirement {
                key: k.to_owned(),
                operator: r.operator,
                values: r.values.clone(),
            });
        }
    }
    Ok(out)
}

/// `[prefix/]name`: a DNS subdomain prefix of at most 253, a name of at most 63 characters
/// (alphanumeric at both ends, `-`, `_`, `.` between).
fn k8s_key(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            })
    });
    prefix_ok && !name.is_empty() && k8s_value(name)
}

/// At most 63 characters, empty or alphanumeric at both ends with `-`, `_`, `.` between.
fn k8s_value(v: &str) -> bool {
    v.len() <= 63
        && (v.is_empty()
            || (v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                && v.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                && v.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())))
}

fn check_value(k: &str, v: &str) -> Result<(), String> {
    if k8s_value(v) {
        Ok(())
    } else {
        Err(format!(
            "label {k}: value {v:?} is not a valid Kubernetes label value"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::LabelFilter;
    use crate::policy::{
        compile, parse_str,
        sources::labels::{container_policy, identity_labels},
        sources::ContainerLabels,
        Endpoints,
    };

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const FILES: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: db
spec:
  endpointSelector:
    matchLabels:
      com.docker.compose.project: shop
      com.docker.compose.service: db
  ingress:
    - fromEndpoints:
        - matchExpressions:
            - { key: com.docker.compose.service, operator: In, values: [app1, app2] }
      toPorts:
        - ports: [{ port: "5432", protocol: TCP }, { port: "6000", endPort: 6010, protocol: UDP }]
    - fromEntities: [host]
      icmps: [{ fields: [{ type: EchoRequest }] }]
  egressDeny:
    - toCIDRSet: [{ cidr: 10.0.0.0/8, except: [10.1.0.0/16] }]
  egress:
    - toCIDR: [192.0.2.0/24]
  enableDefaultDeny: { egress: false }
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: Isolate_Apps
  annotations: { netpol.io/audit: "true", other: x }
specs:
  - endpointSelector:
      matchExpressions:
        - { key: com.docker.compose.service, operator: In, values: [app1, app2] }
    ingress: [{}]
  - endpointSelector: {}
    egress:
      - toEndpoints: [{}]
      - toEntities: [world]
        toPorts: [{ ports: [{ port: "443" }] }]
"#;

    /// Containers of project shop: (name, labels).
    fn containers() -> Vec<(&'static str, Labels)> {
        let c = |svc: &str, extra: &[(&str, &str)]| {
            let mut l = labels(&[(COMPOSE_PROJECT, "shop"), (COMPOSE_SERVICE, svc)]);
            l.extend(labels(extra));
            l
        };
        vec![
            (
                "shop-db-1",
                c("db", &[("netpol.ingress", "app1:5432/tcp, host")]),
            ),
            (
                "shop-db-2",
                c("db", &[("netpol.ingress", "app1:5432/tcp, host")]),
            ),
            (
                "shop-app1-1",
                c(
                    "app1",
                    &[
                        ("netpol.egress", "db:5432, world:443/tcp"),
                        ("tier", "front"),
                    ],
                ),
            ),
            ("shop-app2-1", c("app2", &[("netpol.ingress", "")])),
            ("shop-web-1", c("web", &[])),
        ]
    }

    fn in_force() -> (Vec<Policy>, Endpoints, Endpoints) {
        let mut policies = parse_str("files.yaml", FILES).expect("parse");
        let empty = Labels::new();
        let (mut docker, mut pods) = (Endpoints::new(), Endpoints::new());
        for (i, (name, l)) in containers().iter().enumerate() {
            let cl = ContainerLabels {
                name,
                labels: l,
                image: Ok(&empty),
            };
            policies.extend(container_policy(&cl).0);
            let id = identity_labels(&LabelFilter::default(), &cl);
            docker.insert(300 + i as u32, id.clone());
            pods.insert(300 + i as u32, pod_labels(&id));
        }
        (policies, docker, pods)
    }

    /// Entries as (key, action): rule ids are numbered in document order and may differ.
    fn entries(c: &crate::policy::Compiled) -> Vec<(crate::datapath::PolicyEntryKey, u8)> {
        c.policy.iter().map(|(k, v)| (*k, v.action)).collect()
    }

    #[test]
    fn export_reparses_and_compiles_to_the_same_entries() {
        let (policies, docker, pods) = in_force();
        let yaml = export(&policies, "shop", &[]).expect("export");
        assert_eq!(yaml.matches("namespace: \"shop\"").count(), 5, "{yaml}");
        assert!(!yaml.contains("com.docker.compose"), "{yaml}");
        assert!(
            !yaml.contains("netpol.ingress") && !yaml.contains("netpol.egress"),
            "{yaml}"
        );
        assert!(yaml.contains("app.kubernetes.io/name: \"db\""), "{yaml}");
        assert_eq!(
            yaml.matches("netpol.io/audit: \"true\"").count(),
            1,
            "{yaml}"
        );
        for name in [
            "db",
            "isolate-apps",
            "db-labels",
            "app1-labels",
            "app2-labels",
        ] {
            assert!(
                yaml.contains(&format!("name: \"{name}\"")),
                "{name}: {yaml}"
            );
        }
        // The project's own parser takes it once the namespace is gone.
        let back: String = yaml
            .lines()
            .filter(|l| !l.trim_start().starts_with("namespace:"))
            .map(|l| format!("{l}\n"))
            .collect();
        let reparsed = match parse_str("export.yaml", &back) {
            Ok(p) => p,
            Err(e) => panic!("{e}\n{back}"),
        };
        assert_eq!(reparsed.len(), 5);
        let before = compile(&policies, &docker).expect("compile");
        let after = compile(&reparsed, &pods).expect("compile export");
        assert!(!before.policy.is_empty());
        assert_eq!(entries(&before), entries(&after));
        assert_eq!(before.enforcement, after.enforcement);
        assert_eq!(before.audit, after.audit);
        assert!(!before.audit.is_empty());
        assert_eq!(before.cidr_identities, after.cidr_identities);
        // And exporting the reparsed set again gives the same text (a fixed point), but for
        // the label policies' source, which is now a file.
        let again = export(&reparsed, "shop", &[]).expect("export again");
        assert_eq!(again, yaml);
    }

    #[test]
    fn export_picks_policies_by_either_name() {
        let (policies, ..) = in_force();
        let yaml = export(
            &policies,
            "shop",
            &["compose:shop/db".into(), "Isolate_Apps".into()],
        )
        .expect("export");
        assert_eq!(
            yaml.matches("kind: CiliumNetworkPolicy").count(),
            2,
            "{yaml}"
        );
        let yaml = export(&policies, "shop", &["db-labels".into()]).expect("export");
        assert_eq!(
            yaml.matches("kind: CiliumNetworkPolicy").count(),
            1,
            "{yaml}"
        );
        assert!(matches!(
            export(&policies, "shop", &["nope".into()]),
            Err(ExportError::NotFound(_))
        ));
    }

    #[test]
    fn export_refuses_what_a_cluster_would_read_differently() {
        let one = |sel: &str| {
            parse_str(
                "x.yaml",
                &format!(
                    "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: x}}\nspec:\n  endpointSelector: {sel}\n  ingress: [{{}}]\n"
                ),
            )
            .expect("parse")
        };
        // Two projects in one namespace would merge their services.
        let mut two = one("{matchLabels: {com.docker.compose.project: a}}");
        two.extend(
            parse_str(
                "y.yaml",
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: y}\nspec:\n  endpointSelector: {matchLabels: {com.docker.compose.project: b}}\n  ingress: [{}]\n",
            )
            .expect("parse"),
        );
        assert!(matches!(
            export(&two, "ns", &[]),
            Err(ExportError::Projects(p)) if p == ["a", "b"]
        ));
        for sel in [
            "{matchExpressions: [{key: com.docker.compose.project, operator: NotIn, values: [a]}]}",
            "{matchLabels: {role: \"has space\"}}",
            "{matchLabels: {Bad_Prefix.io/x: y}}",
            "{matchLabels: {com.docker.compose.container-name: x}}",
        ] {
            let r = export(&one(sel), "ns", &[]);
            assert!(matches!(r, Err(ExportError::Policy { .. })), "{sel}: {r:?}");
        }
        assert!(matches!(
            export(&one("{}"), "Not_A_Namespace", &[]),
            Err(ExportError::Namespace(_))
        ));
        // Two names that lower to one.
        let mut clash = one("{}");
        clash.extend(
            parse_str(
                "z.yaml",
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: X}\nspec:\n  endpointSelector: {}\n  ingress: [{}]\n",
            )
            .expect("parse"),
        );
        assert!(matches!(
            export(&clash, "ns", &[]),
            Err(ExportError::NameClash { .. })
        ));
    }

    #[test]
    fn quoted_values_cannot_change_the_document() {
        let p = parse_str(
            "q.yaml",
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: q}\nspec:\n  description: \"a\\n---\\nkind: x\"\n  endpointSelector: {matchLabels: {role: db}}\n  ingress: [{}]\n",
        )
        .expect("parse");
        let yaml = export(&p, "ns", &[]).expect("export");
        assert_eq!(yaml.matches("\n---").count(), 0, "{yaml}");
    }
}
