//! `policy trace` / `policy matrix` over compiled fixtures: the answers, their explanations, and
//! that the matrix and a trace of every port agree.

use super::*;
use crate::identity::{LabelFilter, Labels, COMPOSE_PROJECT, COMPOSE_SERVICE};

fn container(project: &str, service: &str, extra: &[(&str, &str)]) -> OfflineContainer {
    let mut labels: Labels = [(COMPOSE_PROJECT, project), (COMPOSE_SERVICE, service)]
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    labels.insert("com.docker.compose.container-number".into(), "1".into());
    OfflineContainer {
        name: format!("{project}-{service}-1"),
        labels,
        addr: None,
    }
}

/// MISSION's two apps and a database, in project `shop`, and `web` of project `blog`.
fn shop() -> Vec<OfflineContainer> {
    vec![
        container("shop", "db", &[]),
        container("shop", "app1", &[]),
        container("shop", "app2", &[]),
        container("blog", "web", &[]),
    ]
}

fn world(policies: &str, containers: &[OfflineContainer]) -> World {
    let policies = match crate::policy::parse_str("test.yaml", policies) {
        Ok(p) => p,
        Err(e) => panic!("parse failed:\n{e}"),
    };
    offline(&policies, containers, &LabelFilter::default())
        .expect("offline world")
        .0
}

fn trace(w: &World, from: &str, to: &str) -> Trace {
    let (to, l4) = parse_target(to).expect("target");
    w.trace(&PeerRef::parse(from), &to, l4.expect("a port"))
        .unwrap_or_else(|e| panic!("trace {from} {to:?}: {e}"))
}

fn allowed(w: &World, from: &str, to: &str) -> bool {
    trace(w, from, to).allowed()
}

const DB_POLICY: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: db-ingress
spec:
  endpointSelector:
    matchLabels:
      com.docker.compose.service: db
  ingress:
    - fromEndpoints:
        - matchExpressions:
            - { key: com.docker.compose.service, operator: In, values: [app1, app2] }
      toPorts:
        - ports: [{ port: "5432", protocol: TCP }]
  ingressDeny:
    - fromEndpoints:
        - matchLabels: { com.docker.compose.service: app2 }
      toPorts:
        - ports: [{ port: "5432", protocol: TCP }]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: app1-ingress
spec:
  endpointSelector:
    matchLabels:
      com.docker.compose.service: app1
  ingress:
    - fromEntities: [world, host]
      toPorts:
        - ports: [{ port: "8080", protocol: TCP }]
"#;

#[test]
fn both_halves_are_reported_and_name_the_deciding_rule() {
    let w = world(DB_POLICY, &shop());
    let t = trace(&w, "app1", "db:5432");
    assert!(t.allowed(), "{}", t.render());
    assert_eq!(t.egress.outcome, Outcome::NotEnforced);
    assert_eq!(t.ingress.outcome, Outcome::Allowed);
    assert_eq!(
        t.ingress.rule_name.as_deref(),
        Some("db-ingress ingress[0] (test.yaml)")
    );
    assert_eq!(
        t.ingress.why,
        "ingress of shop/db: selected by db-ingress (default deny); allowed by db-ingress ingress[0] (test.yaml)"
    );
    assert_eq!(
        t.egress.why,
        "egress of shop/app1: not enforced (no policy selects it for egress)"
    );
    assert_eq!((t.from.as_str(), t.to.as_str()), ("shop/app1", "shop/db"));
    assert_eq!(t.from_addr.as_deref(), Some("192.0.2.11"));

    // Another port: the default deny, and who caused it.
    let t = trace(&w, "shop/app1", "shop/db:5433");
    assert!(!t.allowed());
    assert_eq!(t.ingress.outcome, Outcome::Denied);
    assert_eq!(t.ingress.rule, None);
    assert_eq!(
        t.ingress.why,
        "ingress of shop/db: default deny because db-ingress selects it; no rule allows shop/app1 on 5433/tcp"
    );
    assert!(!allowed(&w, "app1", "db:5432/udp"));
}

#[test]
fn a_deny_rule_wins_and_is_named() {
    let w = world(DB_POLICY, &shop());
    let t = trace(&w, "app2", "db:5432");
    assert!(!t.allowed());
    assert_eq!(t.ingress.outcome, Outcome::Denied);
    assert_eq!(
        t.ingress.rule_name.as_deref(),
        Some("db-ingress ingressDeny[0] (test.yaml)")
    );
    assert!(
        t.ingress
            .why
            .contains("denied by db-ingress ingressDeny[0]"),
        "{}",
        t.ingress.why
    );
    assert!(t.render().contains("DENIED"), "{}", t.render());
}

#[test]
fn host_and_world_are_peers_policed_only_on_the_container_side() {
    let w = world(DB_POLICY, &shop());
    assert!(allowed(&w, "world", "app1:8080"));
    assert!(allowed(&w, "host", "app1:8080"));
    assert!(!allowed(&w, "world", "app1:8081"));
    assert!(!allowed(&w, "app2", "app1:8080"));
    assert!(!allowed(&w, "host", "db:5432"));
    let t = trace(&w, "world", "db:5432");
    assert_eq!(t.egress.outcome, Outcome::NotPoliced);
    assert_eq!(
        t.egress.why,
        "egress of world: not policed by netpol (no endpoint)"
    );
    assert!(
        t.ingress.why.contains("no rule allows world on 5432/tcp"),
        "{}",
        t.ingress.why
    );
    // Nothing selects app2's or web's egress: they reach the host and the world.
    assert!(allowed(&w, "app2", "host:22"));
    assert!(allowed(&w, "blog/web", "world:443"));
}

#[test]
fn default_deny_off_leaves_only_the_deny_rules() {
    let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: no-smtp
spec:
  endpointSelector:
    matchLabels: { com.docker.compose.service: app1 }
  enableDefaultDeny: { egress: false }
  egressDeny:
    - toEntities: [world]
      toPorts:
        - ports: [{ port: "25", protocol: TCP }]
"#;
    let w = world(text, &shop());
    let t = trace(&w, "app1", "world:25");
    assert!(!t.allowed());
    assert!(
        t.egress.why.contains("denied by no-smtp egressDeny[0]"),
        "{}",
        t.egress.why
    );
    let t = trace(&w, "app1", "world:443");
    assert!(t.allowed(), "{}", t.render());
    assert_eq!(t.egress.rule, Some(IMPLICIT_ALLOW_RULE));
    assert_eq!(
        t.egress.selected_by,
        ["no-smtp (deny rules only, enableDefaultDeny: false)"]
    );
    assert!(
        t.egress.why.contains("implicit allow-all"),
        "{}",
        t.egress.why
    );
    // The deny names world: a container is not world.
    assert!(allowed(&w, "app1", "db:25"));
}

#[test]
fn cidr_peers_resolve_addresses_by_the_longest_prefix() {
    let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: app1-egress
spec:
  endpointSelector:
    matchLabels: { com.docker.compose.service: app1 }
  egress:
    - toCIDRSet:
        - cidr: 10.0.0.0/8
          except: [10.1.0.0/16]
      toPorts:
        - ports: [{ port: "443", protocol: TCP }]
"#;
    let w = world(text, &shop());
    assert!(allowed(&w, "app1", "10.2.3.4:443"));
    assert!(!allowed(&w, "app1", "10.1.2.3:443"));
    assert!(!allowed(&w, "app1", "10.2.3.4:80"));
    assert!(!allowed(&w, "app1", "192.168.1.1:443"));
    assert!(!allowed(&w, "app1", "world:443"));
    let t = trace(&w, "app1", "10.1.2.3:443");
    assert_eq!(t.to, "10.1.2.3 (cidr:10.1.0.0/16)");
    assert!(t
        .egress
        .why
        .contains("no rule allows 10.1.2.3 (cidr:10.1.0.0/16) on 443/tcp"));
    let t = trace(&w, "app1", "192.168.1.1:443");
    assert_eq!(t.to, "192.168.1.1 (world)");
    // An address of a container is that container.
    let t = trace(&w, "192.0.2.11", "192.0.2.10:5432");
    assert_eq!((t.from.as_str(), t.to.as_str()), ("shop/app1", "shop/db"));
    assert!(!t.allowed(), "egress of app1 is enforced");
    assert!(
        allowed(&w, "192.0.2.12", "192.0.2.10:5432"),
        "app2 is not restricted"
    );
}

#[test]
fn group_addresses_need_a_rule_for_everyone() {
    let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: app1-egress
spec:
  endpointSelector:
    matchLabels: { com.docker.compose.service: app1 }
  egress:
    - toEntities: [world]
    - toPorts:
        - ports: [{ port: "5353", protocol: TCP }]
"#;
    let w = world(text, &shop());
    assert!(allowed(&w, "app1", "192.168.1.1:443"));
    for group in ["255.255.255.255", "224.0.0.1", "239.1.2.3"] {
        assert!(!allowed(&w, "app1", &format!("{group}:443")), "{group}");
        assert!(allowed(&w, "app1", &format!("{group}:5353")), "{group}");
    }
    // Everything but db: a deny of one peer stops what the group would carry to it too.
    let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: app1-egress
spec:
  endpointSelector:
    matchLabels: { com.docker.compose.service: app1 }
  enableDefaultDeny: { egress: false }
  egressDeny:
    - toEndpoints:
        - matchLabels: { com.docker.compose.service: db }
      toPorts:
        - ports: [{ port: "5432", protocol: TCP }]
"#;
    let w = world(text, &shop());
    assert!(allowed(&w, "app1", "224.0.0.1:443"));
    assert!(allowed(&w, "app1", "app2:5432"));
    assert!(!allowed(&w, "app1", "db:5432"));
    let t = trace(&w, "app1", "224.0.0.1:5432");
    assert!(!t.allowed(), "{}", t.render());
}

const RANGES: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: db-ranges
spec:
  endpointSelector:
    matchLabels: { com.docker.compose.service: db }
  ingress:
    - fromEndpoints:
        - matchLabels: { com.docker.compose.service: app1 }
      toPorts:
        - ports:
            - { port: "1000", endPort: 2000, protocol: TCP }
            - { port: "53", protocol: UDP }
    - fromEndpoints:
        - matchLabels: { com.docker.compose.service: app2 }
      icmps:
        - fields: [{ type: 8 }]
    - fromEntities: [host]
  ingressDeny:
    - fromEndpoints:
        - matchLabels: { com.docker.compose.service: app1 }
      toPorts:
        - ports: [{ port: "1500", protocol: TCP }]
"#;

#[test]
fn port_ranges_folded_denies_and_icmp() {
    let w = world(RANGES, &shop());
    assert!(allowed(&w, "app1", "db:1000"));
    assert!(allowed(&w, "app1", "db:1499"));
    assert!(!allowed(&w, "app1", "db:1500"));
    assert!(allowed(&w, "app1", "db:2000"));
    assert!(!allowed(&w, "app1", "db:2001"));
    assert!(allowed(&w, "app1", "db:53/udp"));
    assert!(!allowed(&w, "app1", "db:icmp"));
    assert!(allowed(&w, "app2", "db:icmp"));
    assert!(allowed(&w, "app2", "db:8/icmp"));
    assert!(!allowed(&w, "app2", "db:13/icmp"));
    assert!(!allowed(&w, "app2", "db:1000"));
    let t = trace(&w, "app2", "db:icmp");
    assert_eq!((t.protocol.as_str(), t.port), ("icmp", 8));

    let m = w.matrix(Some("shop")).expect("matrix");
    let cell = |f: &str, t: &str| m.get(f, t).expect("cell").text.clone();
    assert_eq!(cell("app1", "db"), "1000-1499,1501-2000/tcp 53/udp");
    assert_eq!(cell("app2", "db"), "icmp");
    assert_eq!(
        cell("host", "db"),
        "*",
        "a rule without toPorts allows everything"
    );
    assert_eq!(cell("world", "db"), "-");
    assert_eq!(cell("db", "app1"), "*");
    let all = trace_all_text(&w, "app1", "db");
    assert_eq!(all, "1000-1499,1501-2000/tcp 53/udp");
}

fn trace_all_text(w: &World, from: &str, to: &str) -> String {
    w.trace_all(&PeerRef::parse(from), &PeerRef::parse(to))
        .expect("trace")
        .text
}

#[test]
fn matrix_cells_agree_with_a_trace_of_each_port() {
    for text in [DB_POLICY, RANGES] {
        let w = world(text, &shop());
        let m = w.matrix(None).expect("matrix");
        assert_eq!(
            m.peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            [
                "blog/web",
                "shop/app1",
                "shop/app2",
                "shop/db",
                "host",
                "world"
            ]
        );
        assert_eq!(m.cells.len(), 36);
        let peer = |p: &MatrixPeer| match p.name.as_str() {
            "host" => PeerRef::Host,
            "world" => PeerRef::World,
            _ => PeerRef::Name(p.containers[0].clone()),
        };
        for (i, f) in m.peers.iter().enumerate() {
            for (j, t) in m.peers.iter().enumerate() {
                let cell = &m.cells[i * m.peers.len() + j];
                assert_eq!(
                    (cell.from.as_str(), cell.to.as_str()),
                    (f.name.as_str(), t.name.as_str())
                );
                for proto in [proto::TCP, proto::UDP, proto::SCTP] {
                    for port in [
                        0, 1, 53, 999, 1000, 1499, 1500, 1501, 2000, 2001, 5432, 8080, 65535,
                    ] {
                        let tr = w
                            .trace(&peer(f), &peer(t), L4Query::Port { proto, port })
                            .expect("trace");
                        assert_eq!(
                            tr.allowed(),
                            cell.ports.contains(proto, port),
                            "{} -> {} {port}/{proto}: matrix {:?}, trace {}",
                            f.name,
                            t.name,
                            cell.text,
                            tr.render()
                        );
                    }
                }
                let tr = w
                    .trace(&peer(f), &peer(t), L4Query::Icmp { icmp_type: None })
                    .expect("trace");
                assert_eq!(
                    tr.allowed(),
                    cell.ports.icmp,
                    "{} -> {} icmp",
                    f.name,
                    t.name
                );
            }
        }
    }
}

#[test]
fn matrix_renders_as_a_table_json_and_dot() {
    let w = world(DB_POLICY, &shop());
    let m = w.matrix(Some("shop")).expect("matrix");
    let (header, rows) = m.render_table();
    assert_eq!(
        header,
        ["FROM \\ TO", "app1", "app2", "db", "host", "world"]
    );
    assert_eq!(rows[0], ["app1", "-", "*", "5432/tcp", "*", "*"]);
    assert_eq!(rows[1], ["app2", "-", "*", "-", "*", "*"]);
    assert_eq!(rows[3], ["host", "8080/tcp", "*", "-", "*", "*"]);
    let json = serde_json::to_value(&m).expect("json");
    assert_eq!(json["cells"][2]["text"], "5432/tcp");
    assert_eq!(
        json["cells"][2]["ports"]["tcp"],
        serde_json::json!([[5432, 5432]])
    );
    let back: Matrix = serde_json::from_value(json).expect("round trip");
    assert_eq!(back, m);
    let dot = m.render_dot();
    assert!(dot.starts_with("digraph netpol {"), "{dot}");
    assert!(
        dot.contains("  \"app1\" -> \"db\" [label=\"5432/tcp\"];"),
        "{dot}"
    );
    assert!(!dot.contains("\"app2\" -> \"db\""), "{dot}");
    assert!(dot.contains("\"world\" [shape=ellipse];"), "{dot}");
    assert!(!dot.contains("\"host\" -> \"world\""), "{dot}");
}

#[test]
fn names_resolve_to_containers_services_and_addresses() {
    let mut cs = shop();
    cs.push(container("blog", "db", &[]));
    let w = world(DB_POLICY, &cs);
    assert!(matches!(
        w.trace(
            &PeerRef::parse("db"),
            &PeerRef::Host,
            L4Query::Port { proto: 6, port: 1 }
        ),
        Err(TraceError::Ambiguous { .. })
    ));
    assert_eq!(trace(&w, "shop-app1-1", "shop/db:5432").from, "shop/app1");
    let id = w.containers[1].id[..12].to_owned();
    assert_eq!(trace(&w, &id, "shop/db:5432").from, "shop/app1");
    assert_eq!(
        w.trace(
            &PeerRef::parse("nosuch"),
            &PeerRef::Host,
            L4Query::Icmp { icmp_type: None }
        ),
        Err(TraceError::NotFound("nosuch".into()))
    );
    assert_eq!(parse_target("db"), Ok((PeerRef::Name("db".into()), None)));
    assert_eq!(
        parse_target("[fd00::2]:80/udp"),
        Ok((
            PeerRef::Addr("fd00::2".parse().unwrap()),
            Some(L4Query::Port {
                proto: 17,
                port: 80
            })
        ))
    );
    assert_eq!(
        parse_target("fd00::2"),
        Ok((PeerRef::Addr("fd00::2".parse().unwrap()), None))
    );
    assert_eq!(
        parse_target("10.0.0.1:icmp"),
        Ok((
            PeerRef::Addr("10.0.0.1".parse().unwrap()),
            Some(L4Query::Icmp { icmp_type: None })
        ))
    );
    assert!(matches!(
        parse_target("db:http"),
        Err(TraceError::BadPort(_))
    ));
    assert!(matches!(
        parse_target("db:80/gre"),
        Err(TraceError::BadPort(_))
    ));
}

#[test]
fn compose_labels_are_compiled_offline_as_the_agent_does() {
    let cs = vec![
        container(
            "demo",
            "db",
            &[("netpol.ingress", "app1:5432/tcp, app2:5432/tcp")],
        ),
        container(
            "demo",
            "app1",
            &[("netpol.ingress", "world:8080, host:8080")],
        ),
        container("demo", "app2", &[("netpol.ingress", "")]),
    ];
    let (w, notes) = offline(&[], &cs, &LabelFilter::default()).expect("offline");
    assert!(notes.is_empty(), "{notes:?}");
    let m = w.matrix(Some("demo")).expect("matrix");
    let (_, rows) = m.render_table();
    assert_eq!(rows[0], ["app1", "-", "-", "5432/tcp", "*", "*"]);
    assert_eq!(rows[1], ["app2", "-", "-", "5432/tcp", "*", "*"]);
    assert_eq!(rows[2], ["db", "-", "-", "-", "*", "*"]);
    assert_eq!(rows[3], ["host", "8080/tcp", "-", "-", "*", "*"]);
    let t = trace(&w, "app2", "app1:8080");
    assert!(
        t.ingress
            .why
            .starts_with("ingress of demo/app1: default deny because compose:"),
        "{}",
        t.ingress.why
    );
    // A broken label denies its direction, and says so.
    let cs = vec![
        container("demo", "db", &[("netpol.ingress", "app1:5432/tpc")]),
        container("demo", "app1", &[]),
    ];
    let (w, notes) = offline(&[], &cs, &LabelFilter::default()).expect("offline");
    assert!(notes["demo-db-1"].contains("tpc"), "{notes:?}");
    assert!(!allowed(&w, "app1", "db:5432"));
}

#[test]
fn an_ipv6_only_peer_is_traced_over_ipv6() {
    let mut cs = shop();
    cs[0].addr = Some("fd00::10".parse().unwrap());
    cs[1].addr = Some("fd00::11".parse().unwrap());
    let w = world(RANGES, &cs);
    let t = trace(&w, "app1", "db:1000");
    assert_eq!(t.to_addr.as_deref(), Some("fd00::10"));
    assert!(t.allowed());
    let t = trace(&w, "app1", "db:icmp");
    assert_eq!((t.protocol.as_str(), t.port), ("icmpv6", 128));
    // app2 has only IPv4: no way to db.
    assert!(matches!(
        w.trace(
            &PeerRef::parse("app2"),
            &PeerRef::parse("db"),
            L4Query::Icmp { icmp_type: None }
        ),
        Err(TraceError::NoCommonFamily { .. })
    ));
    let m = w.matrix(Some("shop")).expect("matrix");
    assert_eq!(m.get("app2", "db").expect("cell").text, "-");
}

#[test]
fn audit_mode_passes_what_policy_denies_and_says_so() {
    let mut w = world(DB_POLICY, &shop());
    let db = w.containers[0].attachments[0].ifindex.expect("veth");
    let ep = w.maps.endpoints[&db];
    w.maps.endpoints.insert(db, ep.audit(true, false));
    let t = trace(&w, "app2", "db:5432");
    assert_eq!(t.verdict, "audited");
    assert!(t.allowed());
    assert_eq!(t.ingress.outcome, Outcome::Audited);
    assert!(
        t.ingress
            .why
            .contains("denied by db-ingress ingressDeny[0]"),
        "{}",
        t.ingress.why
    );
    assert!(t
        .ingress
        .why
        .ends_with("audit mode: it passes and is reported as AUDIT"));
    assert_eq!(trace(&w, "app1", "db:5432").verdict, "allowed");
    let m = w.matrix(Some("shop")).expect("matrix");
    let cell = m.get("app1", "db").expect("cell");
    assert!(cell.audit);
    assert_eq!(cell.text, "5432/tcp (audit)");
    assert_eq!(m.get("app1", "app2").expect("cell").text, "*");
}
