//! Parse + compile tests: verdicts are checked through a reference LPM and netpol-common's
//! `decide`, the way the kernel looks them up.

use std::{collections::BTreeMap, net::IpAddr};

use netpol_common::{
    identity::{ANY, HOST, UNMANAGED, WORLD},
    policy::{decide, lookup, lookup_keys, PolicyValue, Verdict},
    proto::{ICMP, ICMPV6, SCTP, TCP, UDP},
    Direction::{self, Egress, Ingress},
};

use super::*;
use crate::{
    datapath::{Cidr, MapSizes, PolicyEntryKey},
    identity::{Labels, COMPOSE_PROJECT, COMPOSE_SERVICE, FIRST_CIDR},
};

const DB: u32 = 300;
const APP1: u32 = 301;
const APP2: u32 = 302;
const OTHER: u32 = 303;

fn svc(project: &str, service: &str) -> Labels {
    [(COMPOSE_PROJECT, project), (COMPOSE_SERVICE, service)]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn shop() -> Endpoints {
    let mut e = Endpoints::new();
    e.insert(DB, svc("shop", "db"));
    e.insert(APP1, svc("shop", "app1"));
    e.insert(APP2, svc("shop", "app2"));
    e.insert(OTHER, svc("blog", "web"));
    e
}

fn parse(text: &str) -> Vec<Policy> {
    match parse_str("test.yaml", text) {
        Ok(p) => p,
        Err(e) => panic!("parse failed:\n{e}"),
    }
}

fn compiled(text: &str) -> Compiled {
    compile(&parse(text), &shop()).expect("compile")
}

/// The kernel's LPM over the `POLICY` entries.
fn lpm(
    map: &BTreeMap<PolicyEntryKey, PolicyValue>,
    key: &netpol_common::policy::PolicyKey,
) -> Option<PolicyValue> {
    let bits = |k: &netpol_common::policy::PolicyKey| -> u128 {
        (u128::from(k.local) << 64)
            | (u128::from(k.remote) << 32)
            | (u128::from(k.direction) << 24)
            | (u128::from(k.proto) << 16)
            | u128::from(k.dport())
    };
    let want = bits(key);
    map.iter()
        .filter(|(k, _)| {
            let shift = 96 - k.prefix_len;
            (bits(&k.key) >> shift) == (want >> shift)
        })
        .max_by_key(|(k, _)| k.prefix_len)
        .map(|(_, v)| *v)
}

/// The verdict of both lookups. The kernel's `lookup`, which skips the wildcard lookup after a
/// deny or a `FINAL` allow, must give the same one: every compile test checks the flags.
fn verdict(c: &Compiled, local: u32, remote: u32, dir: Direction, p: u8, port: u16) -> Verdict {
    let [a, b] = lookup_keys(local, remote, dir, p, port);
    let both = decide(lpm(&c.policy, &a), lpm(&c.policy, &b));
    let fast = lookup(local, remote, dir, p, port, |k| lpm(&c.policy, k));
    assert_eq!(
        fast, both,
        "the one-lookup fast path changed the verdict of {local} <- {remote} {dir:?} {p}/{port}"
    );
    both
}

/// What the datapath does with a new flow.
fn passes(c: &Compiled, local: u32, remote: u32, dir: Direction, p: u8, port: u16) -> bool {
    if !c.enforcement_of(local).get(dir) {
        return true;
    }
    matches!(verdict(c, local, remote, dir, p, port), Verdict::Allow(_))
}

/// A connection from `src` to `dst` (both local containers) passes egress of `src` and ingress
/// of `dst`.
fn connects(c: &Compiled, src: u32, dst: u32, p: u8, port: u16) -> bool {
    passes(c, src, dst, Egress, p, port) && passes(c, dst, src, Ingress, p, port)
}

/// The ipcache view of an address outside containers and host: its most specific CIDR identity,
/// else world.
fn resolve(c: &Compiled, ip: &str) -> u32 {
    let ip: IpAddr = ip.parse().unwrap();
    c.cidr_identities
        .iter()
        .filter(|(p, _)| p.contains(ip))
        .max_by_key(|(p, _)| p.prefix_len)
        .map_or(WORLD, |(_, &id)| id)
}

fn entries_without_rules(c: &Compiled) -> BTreeMap<PolicyEntryKey, bool> {
    c.policy.iter().map(|(k, v)| (*k, v.is_deny())).collect()
}

const MISSION_CNP: &str = r#"
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
    - matchLabels: {com.docker.compose.project: shop, com.docker.compose.service: app1}
    toPorts:
    - ports: [{port: "5432", protocol: TCP}]
  - fromEndpoints:
    - matchLabels: {com.docker.compose.project: shop, com.docker.compose.service: app2}
    toPorts:
    - ports: [{port: "5432", protocol: TCP}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: apps
specs:
- endpointSelector:
    matchLabels: {com.docker.compose.project: shop, com.docker.compose.service: app1}
  egress:
  - toEndpoints:
    - matchLabels: {any:com.docker.compose.project: shop, container:com.docker.compose.service: db}
    toPorts:
    - ports: [{port: 5432, protocol: TCP}]
- endpointSelector:
    matchExpressions:
    - {key: com.docker.compose.service, operator: In, values: [app2]}
    - {key: com.docker.compose.project, operator: In, values: [shop]}
  egress:
  - toEndpoints:
    - matchLabels: {com.docker.compose.project: shop, com.docker.compose.service: db}
    toPorts:
    - ports: [{port: "5432", protocol: TCP}]
"#;

fn mission_labels() -> Vec<Policy> {
    let with = |service: &str, label: &str, value: &str| {
        let mut l = svc("shop", service);
        l.insert(label.to_owned(), value.to_owned());
        compose::from_labels(&format!("shop-{service}-1"), &l)
            .unwrap()
            .unwrap()
    };
    vec![
        with("db", "netpol.ingress", "app1:5432/tcp, app2:5432/tcp"),
        with("app1", "netpol.egress", "db:5432"),
        with("app2", "netpol.egress", "db:5432/tcp"),
    ]
}

#[test]
fn mission_scenario_as_cnp() {
    let c = compiled(MISSION_CNP);
    assert!(connects(&c, APP1, DB, TCP, 5432));
    assert!(connects(&c, APP2, DB, TCP, 5432));
    assert!(!connects(&c, APP1, DB, TCP, 5433));
    assert!(!connects(&c, APP1, DB, UDP, 5432));
    assert!(!connects(&c, APP1, APP2, TCP, 8080), "app1 → app2 denied");
    assert!(!connects(&c, APP2, APP1, TCP, 8080), "app2 → app1 denied");
    assert!(
        !connects(&c, OTHER, DB, TCP, 5432),
        "another project cannot reach db"
    );
    assert!(!passes(&c, DB, WORLD, Ingress, TCP, 5432));
    assert!(
        passes(&c, DB, WORLD, Egress, TCP, 443),
        "db egress not restricted"
    );
    assert_eq!(c.enforcement_of(OTHER), Enforcement::default());
    assert_eq!(
        c.enforcement_of(DB),
        Enforcement {
            ingress: true,
            egress: false
        }
    );
}

#[test]
fn mission_scenario_labels_and_cnp_give_the_same_entries() {
    let cnp = compiled(MISSION_CNP);
    let labels = compile(&mission_labels(), &shop()).unwrap();
    assert_eq!(entries_without_rules(&cnp), entries_without_rules(&labels));
    assert_eq!(cnp.enforcement, labels.enforcement);
    assert_eq!(labels.policy.len(), 4);
    let db_rule = labels.policy.values().find(|v| v.rule != 0).unwrap().rule;
    assert!(labels.rules[&db_rule].source.starts_with("labels of shop-"));
}

#[test]
fn rule_without_ports_allows_every_port_and_icmp() {
    let c = compiled(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {com.docker.compose.service: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {com.docker.compose.service: app1}}]
"#,
    );
    assert_eq!(c.policy.len(), 1);
    let (k, v) = c.policy.iter().next().unwrap();
    assert_eq!(k.prefix_len, 72);
    assert_eq!(v.rule, 1);
    for (p, port) in [
        (TCP, 1),
        (UDP, 53),
        (SCTP, 9),
        (ICMP, 8),
        (ICMPV6, 128),
        (47, 0),
    ] {
        assert!(passes(&c, DB, APP1, Ingress, p, port), "proto {p}");
    }
    assert!(!passes(&c, DB, APP2, Ingress, TCP, 1));
    assert_eq!(c.rules[&1].section, "ingress[0]");
    assert_eq!(c.rules[&1].source, "test.yaml");
}

#[test]
fn protocol_defaults_to_any_and_port_zero_is_every_port() {
    let c = compiled(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {com.docker.compose.service: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {com.docker.compose.service: app1}}]
    toPorts: [{ports: [{port: "53"}]}]
  - fromEndpoints: [{matchLabels: {com.docker.compose.service: app2}}]
    toPorts: [{ports: [{port: "0", protocol: UDP}]}]
"#,
    );
    for p in [TCP, UDP, SCTP] {
        assert!(passes(&c, DB, APP1, Ingress, p, 53));
    }
    assert!(!passes(&c, DB, APP1, Ingress, ICMP, 8), "ANY is not ICMP");
    assert!(passes(&c, DB, APP2, Ingress, UDP, 1));
    assert!(passes(&c, DB, APP2, Ingress, UDP, 65535));
    assert!(!passes(&c, DB, APP2, Ingress, TCP, 1));
    let prefixes: Vec<u32> = c.policy.keys().map(|k| k.prefix_len).collect();
    assert_eq!(prefixes, [96, 96, 96, 80]);
}

#[test]
fn port_ranges_use_blocks() {
    let c = compiled(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {com.docker.compose.service: db}}
  ingress:
  - toPorts: [{ports: [{port: "1024", endPort: 65535, protocol: TCP}]}]
"#,
    );
    assert_eq!(c.policy.len(), 6);
    assert!(c.policy.keys().all(|k| k.key.remote == ANY));
    assert!(!passes(&c, DB, WORLD, Ingress, TCP, 1023));
    assert!(passes(&c, DB, WORLD, Ingress, TCP, 1024));
    assert!(passes(&c, DB, APP1, Ingress, TCP, 40000));
    assert!(passes(&c, DB, HOST, Ingress, TCP, 65535));
    assert!(!passes(&c, DB, WORLD, Ingress, UDP, 2000));
}

#[test]
fn icmp_types_by_number_and_name() {
    let c = compiled(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {com.docker.compose.service: db}}
  ingress:
  - fromEntities: [world]
    icmps:
    - fields:
      - type: 8
      - {type: EchoRequest, family: IPv6}
      - {type: TimeExceeded}
"#,
    );
    assert!(passes(&c, DB, WORLD, Ingress, ICMP, 8));
    assert!(passes(&c, DB, WORLD, Ingress, ICMP, 11));
    assert!(!passes(&c, DB, WORLD, Ingress, ICMP, 0));
    assert!(passes(&c, DB, WORLD, Ingress, ICMPV6, 128));
    assert!(!passes(&c, DB, WORLD, Ingress, ICMPV6, 8));
    assert!(!passes(&c, DB, WORLD, Ingress, TCP, 8));
    assert!(c.policy.keys().all(|k| k.prefix_len == 96));
}

#[test]
fn entities() {
    let c = compiled(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {com.docker.compose.service: db}}
  ingress:
  - fromEntities: [host]
    toPorts: [{ports: [{port: "22", protocol: TCP}]}]
  - fromEntities: [world]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - fromEntities: [all]
    toPorts: [{ports: [{port: "53", protocol: UDP}]}]
  - fromEndpoints: [{}]
    toPorts: [{ports: [{port: "9000", protocol: TCP}]}]
  egress:
  - toCIDR: [192.0.2.0/24]
"#,
    );
    assert!(passes(&c, DB, HOST, Ingress, TCP, 22));
    assert!(!passes(&c, DB, WORLD, Ingress, TCP, 22));
    assert!(passes(&c, DB, WORLD, Ingress, TCP, 80));
    let cidr_id = resolve(&c, "192.0.2.1");
    assert!(cidr_id >= FIRST_CIDR);
    assert!(
        passes(&c, DB, cidr_id, Ingress, TCP, 80),
        "world includes CIDR identities"
    );
    assert!(!passes(&c, DB, HOST, Ingress, TCP, 80));
    assert!(!passes(&c, DB, APP1, Ingress, TCP, 80));
    for r in [HOST, WORLD, UNMANAGED, APP1, cidr_id] {
        assert!(passes(&c, DB, r, Ingress, UDP, 53), "all: {r}");
    }
    for r in [APP1, APP2, OTHER, DB] {
        assert!(
            passes(&c, DB, r, Ingress, TCP, 9000),
            "every container: {r}"
        );
    }
    for r in [HOST, WORLD, UNMANAGED, cidr_id] {
        assert!(
            !passes(&c, DB, r, Ingress, TCP, 9000),
            "not a container: {r}"
        );
    }
}

#[test]
fn cidr_rules_with_except_follow_the_most_specific_prefix() {
    let c = compiled(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {com.docker.compose.service: db}}
  egress:
  - toCIDRSet:
    - cidr: 10.0.0.0/8
      except: [10.1.0.0/16]
    - cidr: 2001:db8::/32
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: q}
spec:
  endpointSelector: {matchLabels: {com.docker.compose.service: app1}}
  egress:
  - toCIDR: [10.1.2.0/24, 10.2.0.0/16, 172.16.0.0/12]
  - toCIDRSet:
    - cidr: 0.0.0.0/0
      except: [10.0.0.0/8]
"#,
    );
    let ok = |ip: &str| passes(&c, DB, resolve(&c, ip), Egress, TCP, 443);
    assert!(ok("10.5.5.5"));
    assert!(!ok("10.1.9.9"), "except");
    assert!(!ok("10.1.2.3"), "a more specific prefix inside the except");
    assert!(ok("10.2.3.4"), "a more specific prefix inside the selector");
    assert!(!ok("172.16.0.1"));
    assert!(!ok("8.8.8.8"));
    assert!(ok("2001:db8::1"));
    assert!(!ok("2001:db9::1"));
    // 0.0.0.0/0 except 10/8 for app1: world, minus everything in 10/8.
    let ok1 = |ip: &str| passes(&c, APP1, resolve(&c, ip), Egress, TCP, 443);
    assert!(ok1("8.8.8.8"));
    assert!(ok1("172.16.0.1"));
    assert!(!ok1("10.5.5.5"));
    assert!(
        !ok1("10.2.3.4") || ok1("10.2.3.4"),
        "10.2/16 is allowed by the toCIDR rule"
    );
    assert!(ok1("10.2.3.4"));
    assert!(!ok1("10.3.0.1"));
    assert!(!ok1("2001:db8::1"), "0.0.0.0/0 is IPv4 only");
    // One identity per prefix (0.0.0.0/0 included: world-ipv4), in order, from FIRST_CIDR.
    let ids: Vec<(String, u32)> = c
        .cidr_identities
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    assert_eq!(ids.len(), 7);
    assert_eq!(ids[0], ("0.0.0.0/0".to_owned(), FIRST_CIDR));
    let mut nums: Vec<u32> = ids.iter().map(|(_, v)| *v).collect();
    nums.sort();
    assert_eq!(nums, (FIRST_CIDR..FIRST_CIDR + 7).collect::<Vec<_>>());
    assert_eq!(c.needed().ipcache4, 6);
    assert_eq!(c.needed().ipcache6, 1);
}

#[test]
fn cidr_identities_are_stable() {
    let a = compiled(MISSION_CNP_WITH_CIDRS);
    let b = compiled(MISSION_CNP_WITH_CIDRS);
    assert_eq!(a, b);
    // Keep previous numbers: drop one prefix, add another.
    let fewer = MISSION_CNP_WITH_CIDRS.replace("10.0.0.0/8, ", "");
    let c = compile_with_previous(&parse(&fewer), &shop(), &a.cidr_identities).unwrap();
    let v4: Cidr = "192.0.2.0/24".parse().unwrap();
    assert_eq!(c.cidr_identities[&v4], a.cidr_identities[&v4]);
    let more = MISSION_CNP_WITH_CIDRS.replace("10.0.0.0/8", "10.0.0.0/8, 1.0.0.0/8");
    let d = compile_with_previous(&parse(&more), &shop(), &a.cidr_identities).unwrap();
    for (k, v) in &a.cidr_identities {
        assert_eq!(d.cidr_identities[k], *v);
    }
}

const MISSION_CNP_WITH_CIDRS: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {}
  egress:
  - toCIDR: [10.0.0.0/8, 192.0.2.0/24]
"#;

#[test]
fn empty_rule_makes_default_deny() {
    let c = compiled(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {com.docker.compose.service: db}}
  ingress: [{}]
"#,
    );
    assert!(c.policy.is_empty());
    assert!(c.enforcement_of(DB).ingress);
    assert!(!c.enforcement_of(DB).egress);
    assert!(!passes(&c, DB, APP1, Ingress, TCP, 5432));
    // An empty list is no section (as in Cilium).
    let c = compiled(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {}
  ingress: []
"#,
    );
    assert!(!c.enforcement_of(DB).ingress);
}

#[test]
fn enable_default_deny_opt_out() {
    // Opted out, allow rules only: nothing is enforced.
    let c = compiled(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {com.docker.compose.service: db}}
  enableDefaultDeny: {ingress: false}
  ingress:
  - fromEndpoints: [{matchLabels: {com.docker.compose.service: app1}}]
"#,
    );
    assert_eq!(c.enforcement_of(DB), Enforcement::default());
    assert!(c.policy.is_empty());
    // Opted out with a deny: only the deny applies.
    let c = compiled(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {com.docker.compose.service: db}}
  enableDefaultDeny: {ingress: false, egress: false}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {com.docker.compose.service: app1}}]
    toPorts: [{ports: [{port: "22", protocol: TCP}]}]
"#,
    );
    assert!(c.enforcement_of(DB).ingress);
    assert!(!passes(&c, DB, APP1, Ingress, TCP, 22));
    assert!(passes(&c, DB, APP1, Ingress, TCP, 23));
    assert!(passes(&c, DB, APP2, Ingress, TCP, 22));
    assert!(passes(&c, DB, WORLD, Ingress, UDP, 22));
    assert_eq!(
        verdict(&c, DB, WORLD, Ingress, TCP, 1),
        Verdict::Allow(IMPLICIT_ALLOW_RULE)
    );
    // Another policy that does not opt out makes it default-deny again.
    let mut both = parse(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {com.docker.compose.service: db}}
  enableDefaultDeny: {ingress: false}
  ingress:
  - fromEndpoints: [{matchLabels: {com.docker.compose.service: app1}}]
"#,
    );
    both.extend(parse(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: q}
spec:
  endpointSelector: {matchLabels: {com.docker.compose.service: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {com.docker.compose.service: app2}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"#,
    ));
    let c = compile(&both, &shop()).unwrap();
    assert!(c.enforcement_of(DB).ingress);
    assert!(
        passes(&c, DB, APP1, Ingress, TCP, 22),
        "the opted-out policy's allow still counts"
    );
    assert!(passes(&c, DB, APP2, Ingress, TCP, 80));
    assert!(!passes(&c, DB, APP2, Ingress, TCP, 22));
    assert!(!passes(&c, DB, WORLD, Ingress, TCP, 80));
}

/// Cilium reads `enableDefaultDeny` only for a direction that has rules.
#[test]
fn enable_default_deny_without_a_section_enforces_nothing() {
    let c = compiled(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {}
  enableDefaultDeny: {egress: true, ingress: true}
  ingress:
  - fromEndpoints: [{matchLabels: {com.docker.compose.service: app1}}]
"#,
    );
    assert!(!c.enforcement_of(DB).egress, "no egress section");
    assert!(passes(&c, DB, WORLD, Egress, TCP, 443));
    assert!(c.enforcement_of(DB).ingress);
    assert!(passes(&c, DB, APP1, Ingress, TCP, 1));
    assert!(!passes(&c, DB, APP2, Ingress, TCP, 1));
    // The model still lets generated policies (the compose shorthand) deny a direction outright.
    let spec = Spec {
        default_deny: DefaultDeny {
            ingress: None,
            egress: Some(true),
        },
        ..Spec::default()
    };
    assert!(spec.default_deny(Egress));
}

#[test]
fn deny_wins_and_is_folded_into_longer_allows() {
    let c = compiled(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {com.docker.compose.service: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {com.docker.compose.service: app1}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}, {port: "1000", endPort: 1999, protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {com.docker.compose.service: app2}}]
  - fromEntities: [all]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {com.docker.compose.service: app1}}]
    toPorts: [{ports: [{port: "0", protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {com.docker.compose.service: app2}}]
    toPorts: [{ports: [{port: "1024", endPort: 2047, protocol: UDP}]}]
  - fromEntities: [world]
  - toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
    fromEndpoints: [{matchLabels: {com.docker.compose.service: app2}}]
"#,
    );
    // Rules: ingress[0]=1, [1]=2, [2]=3, ingressDeny[0]=4, [1]=5, [2]=6, [3]=7.
    assert_eq!(c.rules[&4].section, "ingressDeny[0]");
    // app1: the deny on all TCP covers the exact and range allows, which become that deny.
    assert_eq!(verdict(&c, DB, APP1, Ingress, TCP, 5432), Verdict::Deny(4));
    assert_eq!(verdict(&c, DB, APP1, Ingress, TCP, 1500), Verdict::Deny(4));
    assert_eq!(verdict(&c, DB, APP1, Ingress, UDP, 5432), Verdict::NoMatch);
    let folded = c
        .policy
        .iter()
        .filter(|(k, _)| k.key.remote == APP1 && k.prefix_len > 80)
        .collect::<Vec<_>>();
    assert!(!folded.is_empty());
    assert!(folded.iter().all(|(_, v)| v.is_deny() && v.rule == 4));
    // app2: all allowed, minus UDP 1024-2047, minus TCP 8080 although `all` allows 8080.
    assert_eq!(verdict(&c, DB, APP2, Ingress, TCP, 5432), Verdict::Allow(2));
    assert_eq!(verdict(&c, DB, APP2, Ingress, UDP, 1500), Verdict::Deny(5));
    assert_eq!(verdict(&c, DB, APP2, Ingress, UDP, 2048), Verdict::Allow(2));
    assert_eq!(verdict(&c, DB, APP2, Ingress, TCP, 8080), Verdict::Deny(7));
    // world: denied everything, even 8080 allowed to all (deny across the two lookups).
    assert_eq!(verdict(&c, DB, WORLD, Ingress, TCP, 8080), Verdict::Deny(6));
    assert_eq!(verdict(&c, DB, HOST, Ingress, TCP, 8080), Verdict::Allow(3));
}

#[test]
fn deny_under_any_beats_a_specific_allow() {
    let c = compiled(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {com.docker.compose.service: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {com.docker.compose.service: app1}}]
    toPorts: [{ports: [{port: "22", protocol: TCP}]}]
  - toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  ingressDeny:
  - fromEntities: [all]
    toPorts: [{ports: [{port: "22", protocol: TCP}]}]
  - toPorts: [{ports: [{port: "0", protocol: TCP}]}]
    fromEndpoints: [{matchLabels: {com.docker.compose.service: app2}}]
"#,
    );
    assert_eq!(verdict(&c, DB, APP1, Ingress, TCP, 22), Verdict::Deny(3));
    assert_eq!(verdict(&c, DB, APP1, Ingress, TCP, 80), Verdict::Allow(2));
    assert_eq!(verdict(&c, DB, APP2, Ingress, TCP, 80), Verdict::Deny(4));
}

#[test]
fn egress_to_host_world_and_wildcard_from_labels() {
    let mut l = svc("shop", "app1");
    l.insert(
        "netpol.egress".into(),
        "db:5432, world:443, host:53/udp".into(),
    );
    l.insert("netpol.ingress".into(), "".into());
    let p = compose::from_labels("shop-app1-1", &l).unwrap().unwrap();
    let c = compile(&[p], &shop()).unwrap();
    assert_eq!(
        c.enforcement_of(APP1),
        Enforcement {
            ingress: true,
            egress: true
        }
    );
    assert!(passes(&c, APP1, DB, Egress, TCP, 5432));
    assert!(!passes(&c, APP1, DB, Egress, UDP, 5432));
    assert!(passes(&c, APP1, WORLD, Egress, TCP, 443));
    assert!(!passes(&c, APP1, HOST, Egress, TCP, 443));
    assert!(passes(&c, APP1, HOST, Egress, UDP, 53));
    assert!(!passes(&c, APP1, DB, Ingress, TCP, 1));
    assert!(!passes(&c, APP1, OTHER, Egress, TCP, 5432));
}

#[test]
fn output_is_deterministic_and_independent_of_policy_order() {
    let mut ps = parse(MISSION_CNP);
    let a = compile(&ps, &shop()).unwrap();
    ps.reverse();
    let b = compile(&ps, &shop()).unwrap();
    assert_eq!(a, b);
}

#[test]
fn capacity_check() {
    let c = compiled(MISSION_CNP);
    let mut sizes = MapSizes::default();
    assert!(c.check_fits(&sizes, 10, 10).is_ok());
    sizes.policy = 3;
    let e = c.check_fits(&sizes, 0, 0).unwrap_err();
    assert_eq!(e.map, "POLICY");
    assert_eq!(e.needed, 4);
    sizes = MapSizes::default();
    let e = c
        .check_fits(&sizes, sizes.ipcache4 as usize + 1, 0)
        .unwrap_err();
    assert_eq!(e.map, netpol_common::maps::IPCACHE4);
}

#[test]
fn rule_table_names_sections_and_sources() {
    let c = compiled(MISSION_CNP);
    let sections: Vec<(String, String)> = c
        .rules
        .values()
        .map(|r| (r.policy.clone(), r.section.clone()))
        .collect();
    assert_eq!(
        sections,
        [
            ("apps".to_owned(), "specs[0].egress[0]".to_owned()),
            ("apps".to_owned(), "specs[1].egress[0]".to_owned()),
            ("db".to_owned(), "ingress[0]".to_owned()),
            ("db".to_owned(), "ingress[1]".to_owned()),
        ]
    );
    assert_eq!(c.rules[&3].to_string(), "db ingress[0] (test.yaml)");
}

#[test]
fn selectors() {
    let mut e = shop();
    let mut l = svc("shop", "cache");
    l.insert("tier".into(), "data".into());
    e.insert(304, l);
    let c = compile(
        &parse(
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector:
    matchExpressions:
    - {key: tier, operator: Exists}
  ingress:
  - fromEndpoints:
    - matchExpressions:
      - {key: com.docker.compose.service, operator: NotIn, values: [app1, db]}
      - {key: tier, operator: DoesNotExist}
"#,
        ),
        &e,
    )
    .unwrap();
    assert!(c.enforcement_of(304).ingress);
    assert!(!c.enforcement_of(DB).ingress);
    let remotes: Vec<u32> = c.policy.keys().map(|k| k.key.remote).collect();
    assert_eq!(remotes, [APP2, OTHER]);
}

/// Every rejected construct, with the line and path of the error.
#[test]
fn rejected_fields_name_file_line_and_path() {
    let head = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\nspec:\n  endpointSelector: {}\n";
    let cases: &[(&str, &str)] = &[
        (
            "  ingress:\n  - toPorts:\n    - ports: [{port: \"80\"}]\n      rules:\n        http: [{}]\n",
            "test.yaml:10: spec.ingress[0].toPorts[0].rules: L7 rules are not supported",
        ),
        (
            "  egress:\n  - toFQDNs: [{matchName: example.com}]\n",
            "test.yaml:8: spec.egress[0].toFQDNs: DNS-based rules (toFQDNs) are not supported",
        ),
        (
            "  egress:\n  - toServices: [{k8sService: {serviceName: x}}]\n",
            "test.yaml:8: spec.egress[0].toServices: toServices is not supported",
        ),
        (
            "  egress:\n  - toRequires: [{}]\n",
            "test.yaml:8: spec.egress[0].toRequires: requirements",
        ),
        (
            "  ingress:\n  - fromRequires: [{}]\n",
            "test.yaml:8: spec.ingress[0].fromRequires: requirements",
        ),
        (
            "  ingress:\n  - fromEndpoints: [{}]\n    authentication: {mode: required}\n",
            "test.yaml:9: spec.ingress[0].authentication: authentication is not supported",
        ),
        (
            "  egress:\n  - toPorts:\n    - ports: [{port: \"443\"}]\n      serverNames: [a.example]\n",
            "test.yaml:10: spec.egress[0].toPorts[0].serverNames: TLS server names",
        ),
        (
            "  egress:\n  - toPorts:\n    - ports: [{port: \"443\"}]\n      originatingTLS: {}\n",
            "test.yaml:10: spec.egress[0].toPorts[0].originatingTLS: TLS interception",
        ),
        (
            "  egress:\n  - toPorts:\n    - ports: [{port: \"443\"}]\n      listener: {}\n",
            "test.yaml:10: spec.egress[0].toPorts[0].listener: Envoy listeners",
        ),
        ("  nodeSelector: {}\n", "test.yaml:7: spec.nodeSelector: node selectors"),
        (
            "  egress:\n  - toGroups: [{aws: {}}]\n",
            "test.yaml:8: spec.egress[0].toGroups: groups",
        ),
        (
            "  ingress:\n  - fromNodes: [{}]\n",
            "test.yaml:8: spec.ingress[0].fromNodes: node peers",
        ),
        ("  bogus: 1\n", "test.yaml:7: spec.bogus: unknown field"),
        (
            "  ingress:\n  - fromEndpoints: [{}]\n    toPort: []\n",
            "test.yaml:9: spec.ingress[0].toPort: unknown field",
        ),
        (
            "  ingress:\n  - toEndpoints: [{}]\n",
            "test.yaml:8: spec.ingress[0].toEndpoints: not valid in an ingress rule (did you mean fromEndpoints?)",
        ),
        (
            "  egress:\n  - toEntities: [cluster]\n",
            "test.yaml:8: spec.egress[0].toEntities[0]: entity \"cluster\" is not supported (supported: world, host, all)",
        ),
        (
            "  egress:\n  - toCIDR: [10.0.0.0/33]\n",
            "test.yaml:8: spec.egress[0].toCIDR[0]: invalid CIDR \"10.0.0.0/33\"",
        ),
        (
            "  egress:\n  - toCIDRSet:\n    - cidr: 10.0.0.0/8\n      except: [192.168.0.0/16]\n",
            "test.yaml:10: spec.egress[0].toCIDRSet[0].except[0]: except 192.168.0.0/16 is not inside 10.0.0.0/8",
        ),
        (
            "  egress:\n  - toCIDRSet:\n    - cidrGroupRef: x\n",
            "test.yaml:9: spec.egress[0].toCIDRSet[0].cidrGroupRef: CIDR groups",
        ),
        (
            "  egress:\n  - toPorts:\n    - ports:\n      - port: http\n",
            "test.yaml:10: spec.egress[0].toPorts[0].ports[0].port: named port \"http\" is not supported",
        ),
        (
            "  egress:\n  - toPorts:\n    - ports:\n      - port: \"70000\"\n",
            "test.yaml:10: spec.egress[0].toPorts[0].ports[0].port: invalid port \"70000\"",
        ),
        (
            "  egress:\n  - toPorts:\n    - ports:\n      - {port: \"80\", protocol: ICMP}\n",
            "test.yaml:10: spec.egress[0].toPorts[0].ports[0].protocol: invalid protocol \"ICMP\"",
        ),
        (
            "  egress:\n  - toPorts:\n    - ports:\n      - port: \"80\"\n        endPort: 79\n",
            "test.yaml:11: spec.egress[0].toPorts[0].ports[0].endPort: endPort 79 is below port 80",
        ),
        (
            "  egress:\n  - toPorts:\n    - ports: []\n",
            "test.yaml:9: spec.egress[0].toPorts[0].ports: at least one item is required",
        ),
        (
            "  egress:\n  - icmps:\n    - fields:\n      - type: Bogus\n",
            "test.yaml:10: spec.egress[0].icmps[0].fields[0].type: invalid ICMP type \"Bogus\"",
        ),
        (
            "  egress:\n  - icmps:\n    - fields:\n      - {type: 8, family: IPv5}\n",
            "test.yaml:10: spec.egress[0].icmps[0].fields[0].family: invalid ICMP family \"IPv5\"",
        ),
        (
            "  egress:\n  - icmps: [{fields: [{type: 8}]}]\n    toPorts: [{ports: [{port: \"80\"}]}]\n",
            "test.yaml:8: spec.egress[0].icmps: icmps cannot be combined with toPorts",
        ),
        (
            "  ingress:\n  - fromEndpoints:\n    - matchLabels: {k8s:app: x}\n",
            "test.yaml:9: spec.ingress[0].fromEndpoints[0].matchLabels.k8s:app: label source \"k8s\" is not supported",
        ),
        (
            "  ingress:\n  - fromEndpoints:\n    - matchLabels: {reserved:host: \"\"}\n",
            "test.yaml:9: spec.ingress[0].fromEndpoints[0].matchLabels.reserved:host: reserved labels",
        ),
        (
            "  ingress:\n  - fromEndpoints:\n    - matchExpressions:\n      - {key: a, operator: Gt, values: [\"1\"]}\n",
            "test.yaml:10: spec.ingress[0].fromEndpoints[0].matchExpressions[0].operator: invalid operator \"Gt\"",
        ),
        (
            "  ingress:\n  - fromEndpoints:\n    - matchExpressions:\n      - {key: a, operator: In}\n",
            "test.yaml:10: spec.ingress[0].fromEndpoints[0].matchExpressions[0].values: operator In needs a non-empty values list",
        ),
        (
            "  ingress:\n  - fromEndpoints:\n    - matchExpressions:\n      - {key: a, operator: Exists, values: [b]}\n",
            "test.yaml:10: spec.ingress[0].fromEndpoints[0].matchExpressions[0].values: operator Exists takes no values",
        ),
        (
            "  enableDefaultDeny: {ingress: maybe}\n",
            "test.yaml:7: spec.enableDefaultDeny.ingress: expected true or false",
        ),
        (
            "  enableDefaultDeny: {sideways: true}\n",
            "test.yaml:7: spec.enableDefaultDeny.sideways: unknown field",
        ),
        ("  ingress: {}\n", "test.yaml:7: spec.ingress: expected a list"),
        ("  ingress: []\n  ingress: []\n", "test.yaml:8: spec.ingress: duplicate key"),
    ];
    let mut wrong = Vec::new();
    for (tail, want) in cases {
        let text = format!("{head}{tail}");
        let err = parse_str("test.yaml", &text).expect_err(want).to_string();
        if !err.starts_with(want) {
            wrong.push(format!("want {want}\n got {err}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn document_level_errors() {
    let cases: &[(&str, &str)] = &[
        (
            "apiVersion: cilium.io/v1\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec: {endpointSelector: {}}\n",
            "test.yaml:1: apiVersion: apiVersion must be cilium.io/v2",
        ),
        (
            "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: p}\nspec: {endpointSelector: {}}\n",
            "test.yaml:2: kind: kind must be CiliumNetworkPolicy, not \"CiliumClusterwideNetworkPolicy\"",
        ),
        (
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {labels: {a: b}}\nspec: {endpointSelector: {}}\n",
            "test.yaml:3: metadata: missing required field name",
        ),
        (
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: ../etc}\nspec: {endpointSelector: {}}\n",
            "test.yaml:3: metadata.name: invalid policy name",
        ),
        (
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  ingress: [{}]\n",
            "test.yaml:5: spec: missing required field endpointSelector",
        ),
        (
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n",
            "test.yaml:1: missing spec (or specs)",
        ),
        (
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec: {endpointSelector: {}}\nspecs: []\n",
            "test.yaml:4: give either spec or specs, not both",
        ),
        (
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec: {endpointSelector: {}}\nextra: 1\n",
            "test.yaml:5: extra: unknown field",
        ),
        (
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {matchLabels: {a: [b}\n",
            "test.yaml:5: YAML syntax",
        ),
        (
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec: {endpointSelector: {}}\n---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec: {endpointSelector: {}}\n",
            "test.yaml:6: metadata.name: policy name \"p\" is used twice",
        ),
        ("- a\n- b\n", "test.yaml:1: expected a mapping"),
    ];
    for (text, want) in cases {
        let err = parse_str("test.yaml", text).expect_err(want).to_string();
        assert!(err.starts_with(want), "want {want}\n got {err}");
    }
}

#[test]
fn all_errors_are_reported() {
    let text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  egress:\n  - toFQDNs: []\n  - toEntities: [cluster]\n---\nkind: Nope\n";
    let errs = parse_str("f.yaml", text).unwrap_err();
    assert_eq!(errs.0.len(), 6, "{errs}");
    assert_eq!(errs.0[0].line, 7);
    assert_eq!(errs.0[1].line, 8);
    let dir = std::env::temp_dir().join(format!("netpol-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    let good = dir.join("good.yaml");
    std::fs::write(&bad, text).unwrap();
    std::fs::write(&good, MISSION_CNP).unwrap();
    let errs = validate_files(&[good.clone(), bad.clone(), dir.join("missing.yaml")]);
    assert_eq!(errs.len(), 7);
    assert!(errs[0]
        .to_string()
        .starts_with(&format!("{}:7: ", bad.display())));
    assert!(matches!(errs[6].kind, ErrorKind::Read(_)));
    assert_eq!(parse_file(&good).unwrap().len(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn accepted_forms() {
    let p = parse(
        r#"# comment
---
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: web
  labels: {team: a}
  annotations: {x: y}
spec:
  description: "web"
  endpointSelector:
    matchLabels:
      any:app: web
  ingress:
  - fromEntities: [world, host]
    toPorts:
    - ports:
      - port: 80
      - {port: "8000", endPort: 8080, protocol: TCP}
      - {port: "53", protocol: UDP}
      - {port: "9", protocol: SCTP}
      - {port: "7", protocol: ANY}
  - fromCIDR: [192.0.2.1]
  egressDeny:
  - toCIDRSet: [{cidr: "::/0", except: ["fd00::/8"]}]
---
"#,
    );
    assert_eq!(p.len(), 1);
    let s = &p[0].specs[0];
    assert_eq!(
        s.selector.match_labels.get("app").map(String::as_str),
        Some("web")
    );
    assert_eq!(s.description.as_deref(), Some("web"));
    let Peer::Cidr(c) = &s.ingress[1].peers.listed()[0] else {
        panic!("cidr expected")
    };
    assert_eq!(c.cidr.prefix_len, 32);
    let L4::Only(ports) = &s.ingress[0].l4 else {
        panic!("ports expected")
    };
    assert_eq!(ports.len(), 5);
    assert_eq!(
        ports[1],
        PortRule::Ports {
            proto: Protocol::Tcp,
            first: 8000,
            last: 8080
        }
    );
    assert!(s.default_deny(Egress));
}

#[test]
fn reserved_numbers_in_endpoints_are_not_containers() {
    let mut e = shop();
    e.insert(UNMANAGED, Labels::new());
    let c = compile(
        &parse(
            r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {}
  egress:
  - toEndpoints: [{}]
    icmps: [{fields: [{type: 8}]}]
  - icmps: [{fields: [{type: 0}]}]
"#,
        ),
        &e,
    )
    .unwrap();
    assert!(!c.enforcement.contains_key(&UNMANAGED));
    assert!(!passes(&c, DB, UNMANAGED, Egress, ICMP, 8));
    assert!(passes(&c, DB, APP1, Egress, ICMP, 8));
    assert!(
        passes(&c, DB, UNMANAGED, Egress, ICMP, 0),
        "ICMP-only rule without peer: all"
    );
    assert!(passes(&c, DB, WORLD, Egress, ICMP, 0));
}

const HEAD_DB: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {matchLabels: {com.docker.compose.service: db}}\n";

/// Issue 7, item 4: `fromEndpoints: []` (and every other peer list) selects nobody, as in Cilium;
/// only a rule with no peer field at all applies to every peer.
#[test]
fn explicitly_empty_peer_lists_select_nobody() {
    let cidr_doc = |extra: &str| {
        format!("{HEAD_DB}{extra}---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: cidrs}}\nspec:\n  endpointSelector: {{matchLabels: {{com.docker.compose.service: app2}}}}\n  egress: [{{toCIDR: [192.0.2.0/24, \"2001:db8::/32\"]}}]\n")
    };
    for (dir, field) in [
        ("ingress", "fromEndpoints"),
        ("ingress", "fromEntities"),
        ("ingress", "fromCIDR"),
        ("ingress", "fromCIDRSet"),
        ("egress", "toEndpoints"),
        ("egress", "toEntities"),
        ("egress", "toCIDR"),
        ("egress", "toCIDRSet"),
    ] {
        let c = compiled(&cidr_doc(&format!(
            "  {dir}:\n  - {field}: []\n    toPorts: [{{ports: [{{port: \"80\", protocol: TCP}}]}}]\n"
        )));
        let d = if dir == "ingress" { Ingress } else { Egress };
        assert!(c.enforcement_of(DB).get(d), "{field}: the section is there");
        for remote in [
            ANY,
            WORLD,
            HOST,
            UNMANAGED,
            APP1,
            resolve(&c, "192.0.2.1"),
            resolve(&c, "2001:db8::1"),
        ] {
            assert!(
                !passes(&c, DB, remote, d, TCP, 80),
                "{field}: [] let {remote} in"
            );
        }
        assert!(
            !c.policy.keys().any(|k| k.key.local == DB),
            "{field}: no entry at all"
        );
    }
    // An empty list beside a non-empty one of another kind: only the other one counts.
    let c = compiled(&format!(
        "{HEAD_DB}  ingress:\n  - fromEndpoints: []\n    fromEntities: [host]\n    toPorts: [{{ports: [{{port: \"80\", protocol: TCP}}]}}]\n"
    ));
    assert!(passes(&c, DB, HOST, Ingress, TCP, 80));
    assert!(!passes(&c, DB, WORLD, Ingress, TCP, 80));
    assert!(!passes(&c, DB, APP1, Ingress, TCP, 80));
    // No peer field: every peer (Cilium's L4-only rule).
    let c = compiled(&format!(
        "{HEAD_DB}  ingress:\n  - toPorts: [{{ports: [{{port: \"80\", protocol: TCP}}]}}]\n"
    ));
    assert!(passes(&c, DB, WORLD, Ingress, TCP, 80));
    assert!(passes(&c, DB, APP1, Ingress, TCP, 80));
    assert!(!passes(&c, DB, APP1, Ingress, TCP, 81));
    // The parse keeps the difference.
    let p = parse(&format!(
        "{HEAD_DB}  ingress:\n  - fromCIDR: []\n  - {{}}\n"
    ));
    assert_eq!(p[0].specs[0].ingress[0].peers, Peers::Listed(vec![]));
    assert_eq!(p[0].specs[0].ingress[1].peers, Peers::Unspecified);
}

/// Issue 7, item 5: an IPv4 CIDR applies to IPv4 only and an IPv6 CIDR to IPv6 only;
/// `0.0.0.0/0` is Cilium's world-ipv4, `::/0` world-ipv6. The `world` entity is both.
#[test]
fn cidrs_apply_to_their_own_address_family() {
    let c = compiled(&format!(
        "{HEAD_DB}  egress:\n  - toCIDRSet: [{{cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}]\n"
    ));
    let ok = |c: &Compiled, ip: &str| passes(c, DB, resolve(c, ip), Egress, TCP, 443);
    assert!(ok(&c, "8.8.8.8"));
    assert!(!ok(&c, "10.1.2.3"), "except");
    for v6 in ["2001:db8::1", "::1", "fd00::1"] {
        assert!(!ok(&c, v6), "0.0.0.0/0 opened IPv6 {v6}");
    }
    let world4: Cidr = "0.0.0.0/0".parse().unwrap();
    assert!(c.cidr_identities[&world4] >= FIRST_CIDR);

    let c = compiled(&format!(
        "{HEAD_DB}  egress:\n  - toEntities: [world]\n  egressDeny:\n  - toCIDR: [\"::/0\"]\n"
    ));
    assert!(ok(&c, "8.8.8.8"), "::/0 blocked IPv4");
    assert!(ok(&c, "10.1.2.3"), "::/0 blocked IPv4");
    assert!(!ok(&c, "2001:db8::1"));
    assert!(!ok(&c, "fd00::1"));

    let c = compiled(&format!(
        "{HEAD_DB}  egress:\n  - toCIDR: [\"::/0\"]\n    toPorts: [{{ports: [{{port: \"443\"}}]}}]\n"
    ));
    assert!(ok(&c, "2001:db8::1"));
    assert!(!ok(&c, "8.8.8.8"), "::/0 opened IPv4");
    assert!(
        !passes(&c, DB, WORLD, Egress, TCP, 443),
        "IPv4 misses the ipcache: world"
    );

    // The world entity is both families, the /0 identities included.
    let mut both = parse(&format!("{HEAD_DB}  egress:\n  - toEntities: [world]\n"));
    both.extend(parse(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: q}\nspec:\n  endpointSelector: {matchLabels: {com.docker.compose.service: app1}}\n  egress: [{toCIDR: [0.0.0.0/0, \"::/0\"]}]\n",
    ));
    let c = compile(&both, &shop()).unwrap();
    for ip in ["8.8.8.8", "2001:db8::1"] {
        assert!(ok(&c, ip), "world: {ip}");
    }
    assert!(passes(&c, DB, WORLD, Egress, TCP, 443));
    assert!(!passes(&c, DB, HOST, Egress, TCP, 443));
}

/// Issue 7, item 6: inputs that grew past 4 GB or overflowed the stack are errors with a line,
/// quickly.
#[test]
fn hostile_yaml_is_an_error_with_a_line_in_bounded_time() {
    // 8 levels of 10 aliases: 10^8 nodes if expanded.
    let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..8 {
        let p = i - 1;
        bomb.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    assert!(bomb.len() < 1024);
    // 100,000 nested block sequences: "- - - … x".
    let deep_block = format!("{}x\n", "- ".repeat(100_000));
    let deep_flow = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_map: String = (0..100).map(|i| format!("{}a:\n", " ".repeat(i))).collect();
    let big = format!("{HEAD_DB}#{}\n", "x".repeat(limits::FILE_BYTES));
    let mut wide = String::from("k: [");
    for _ in 0..limits::NODES {
        wide.push_str("1,");
    }
    wide.push_str("]\n");
    let cases: [(&str, &str, &str); 6] = [
        (&bomb, "counting every alias expansion", "test.yaml:"),
        (
            &deep_block,
            "nested more than 64 levels deep",
            "test.yaml:1:",
        ),
        (
            &deep_flow,
            "nested more than 64 levels deep",
            "test.yaml:1:",
        ),
        (
            &deep_map,
            "nested more than 64 levels deep",
            "test.yaml:65:",
        ),
        (&big, "larger than 1048576 bytes", "test.yaml:6:"),
        (&wide, "more than 100000 YAML nodes", "test.yaml:1:"),
    ];
    for (text, what, at) in cases {
        let t = std::time::Instant::now();
        let e = parse_str("test.yaml", text).expect_err(what).to_string();
        let took = t.elapsed();
        assert!(
            e.contains(what) && e.starts_with(at),
            "want {at} … {what}, got {e}"
        );
        // A guard against unbounded work (an unchecked bomb runs for minutes and gigabytes),
        // not a speed target: the issue's 1 s / 50 MB bar is checked against the binary
        // (tests/policy_input.rs); unit tests share two cores with everything else.
        assert!(
            took < std::time::Duration::from_secs(10),
            "{what}: {took:?}"
        );
    }
    let e = parse_str("test.yaml", &bomb).unwrap_err();
    assert!(e.0[0].line >= 5, "the line where the limit is crossed: {e}");
}

#[test]
fn rules_peers_and_ports_per_policy_are_limited() {
    let many = |n: usize, item: &str| vec![item; n].join(", ");
    let cases = [
        (
            format!("{HEAD_DB}  ingress: [{}]\n", many(limits::RULES + 1, "{}")),
            "test.yaml:6: spec.ingress: more than 1000 rules in one policy",
        ),
        (
            format!(
                "{HEAD_DB}  ingress: [{}]\n  egress: [{}]\n",
                many(limits::RULES, "{}"),
                many(1, "{}")
            ),
            "test.yaml:7: spec.egress: more than 1000 rules in one policy",
        ),
        (
            format!(
                "{HEAD_DB}  ingress:\n  - fromEntities: [{}]\n",
                many(limits::PEERS + 1, "world")
            ),
            "test.yaml:7: spec.ingress[0].fromEntities: more than 1000 peers in one policy",
        ),
        (
            format!(
                "{HEAD_DB}  egress:\n  - toCIDRSet: [{{cidr: 10.0.0.0/8, except: [{}]}}]\n",
                many(limits::PEERS, "10.1.0.0/16")
            ),
            "test.yaml:7: spec.egress[0].toCIDRSet[0].except: more than 1000 peers in one policy",
        ),
        (
            format!(
                "{HEAD_DB}  ingress: [{}]\n",
                many(26, &format!("{{toPorts: [{{ports: [{}]}}]}}", many(40, "{port: \"1\"}")))
            ),
            "test.yaml:6: spec.ingress[25].toPorts[0].ports: more than 1000 ports and ICMP fields in one policy",
        ),
    ];
    for (text, want) in cases {
        let e = parse_str("test.yaml", &text).expect_err(want).to_string();
        assert!(e.starts_with(want), "want {want}\n got {e}");
        assert_eq!(e.lines().count(), 1, "one error per limit: {e}");
    }
    // At the limits: valid.
    parse(&format!(
        "{HEAD_DB}  ingress: [{}]\n",
        many(limits::RULES, "{}")
    ));
    parse(&format!(
        "{HEAD_DB}  ingress:\n  - fromEntities: [{}]\n",
        many(limits::PEERS, "world")
    ));
}

/// Policy `big`, selecting with `selector`: one ingress rule from `cidrs` /24 networks to 40
/// port ranges of 1,499 ports each, which multiply out into many `POLICY` entries per
/// selected container.
pub(super) fn big_cidr_policy(cidrs: usize, selector: &str) -> String {
    let cidrs: Vec<String> = (0..cidrs)
        .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
        .collect();
    let ranges: Vec<String> = (0..40)
        .map(|i| {
            format!(
                "{{port: \"{}\", endPort: {}}}",
                i * 1500 + 1,
                i * 1500 + 1499
            )
        })
        .collect();
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: big}}\nspec:\n  endpointSelector: {selector}\n  ingress:\n  - fromCIDR: [{}]\n    toPorts: [{{ports: [{}]}}]\n",
        cidrs.join(", "),
        ranges.join(", ")
    )
}

/// A compile that would multiply out past [`MAX_ENTRIES`] stops with an error instead of
/// growing without bound.
#[test]
fn compile_stops_at_max_entries() {
    let text = big_cidr_policy(limits::PEERS, "{}");
    let t = std::time::Instant::now();
    let e = match compile(&parse(&text), &shop()) {
        Ok(c) => panic!("compiled to {} entries", c.policy.len()),
        Err(e) => e,
    };
    assert!(matches!(e, CompileError::TooManyEntries { .. }), "{e}");
    assert!(e.to_string().contains("big ingress[0]"), "{e}");
    // A guard against expanding every entry before checking the limit, not a speed target.
    let took = t.elapsed();
    assert!(took < std::time::Duration::from_secs(60), "{took:?}");
}

/// Issue 7, "stricter validation, as Cilium does": each an error naming file, line and field.
#[test]
fn stricter_validation_as_cilium() {
    let head = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\nspec:\n  endpointSelector: {}\n";
    let ports41 = vec!["{port: \"1\"}"; 41].join(", ");
    let icmps41 = vec!["{type: 8}"; 41].join(", ");
    let cases: Vec<(String, &str)> = vec![
        (
            "  ingress:\n  - fromEndpoints: [~]\n".into(),
            "test.yaml:8: spec.ingress[0].fromEndpoints[0]: a null selector is not allowed",
        ),
        (
            "  ingress:\n  - fromEndpoints: [null, {}]\n".into(),
            "test.yaml:8: spec.ingress[0].fromEndpoints[0]: a null selector",
        ),
        (
            "  ingress:\n  - fromEndpoints:\n    toPorts: [{ports: [{port: \"80\"}]}]\n".into(),
            "test.yaml:8: spec.ingress[0].fromEndpoints: a null list is not allowed",
        ),
        (
            "  egress:\n  - toCIDR: ~\n".into(),
            "test.yaml:8: spec.egress[0].toCIDR: a null list",
        ),
        (
            "  ingress:\n  - toPorts: [{ports: [{protocol: TCP}]}]\n".into(),
            "test.yaml:8: spec.ingress[0].toPorts[0].ports[0]: missing required field port",
        ),
        (
            "  ingress:\n  - toPorts:\n    - ports:\n      - port: \"0443\"\n".into(),
            "test.yaml:10: spec.ingress[0].toPorts[0].ports[0].port: \"0443\" has a leading zero",
        ),
        (
            "  ingress:\n  - toPorts:\n    - ports:\n      - {port: \"80\", endPort: 090}\n".into(),
            "test.yaml:10: spec.ingress[0].toPorts[0].ports[0].endPort: \"090\" has a leading zero",
        ),
        (
            "  ingress:\n  - icmps: [{fields: [{type: \"08\"}]}]\n".into(),
            "test.yaml:8: spec.ingress[0].icmps[0].fields[0].type: \"08\" has a leading zero",
        ),
        (
            format!("  ingress:\n  - toPorts: [{{ports: [{ports41}]}}]\n"),
            "test.yaml:8: spec.ingress[0].toPorts: more than 40 ports in one rule",
        ),
        (
            format!("  ingress:\n  - toPorts:\n    - ports: [{{port: \"1\"}}]\n    - ports: [{ports41}]\n"),
            "test.yaml:8: spec.ingress[0].toPorts: more than 40 ports in one rule",
        ),
        (
            format!("  egress:\n  - icmps: [{{fields: [{icmps41}]}}]\n"),
            "test.yaml:8: spec.egress[0].icmps: more than 40 ICMP fields in one rule",
        ),
        (
            "  ingress:\n  - fromEndpoints: [{}]\n    fromEntities: [world]\n".into(),
            "test.yaml:9: spec.ingress[0].fromEntities: fromEndpoints and fromEntities cannot be combined in one rule",
        ),
        (
            "  ingress:\n  - fromEndpoints: [{}]\n    fromCIDR: [10.0.0.0/8]\n".into(),
            "test.yaml:9: spec.ingress[0].fromCIDR: fromEndpoints and fromCIDR cannot be combined",
        ),
        (
            "  egress:\n  - toCIDRSet: [{cidr: 10.0.0.0/8}]\n    toEndpoints: [{}]\n".into(),
            "test.yaml:9: spec.egress[0].toEndpoints: toCIDRSet and toEndpoints cannot be combined",
        ),
        (
            "  egress:\n  - toCIDR: [10.0.0.0/8]\n    toCIDRSet: [{cidr: 10.0.0.0/8}]\n".into(),
            "test.yaml:9: spec.egress[0].toCIDRSet: toCIDR and toCIDRSet cannot be combined",
        ),
        (
            "  enableDefaultDeny: {ingress: !!str false}\n  ingress: [{}]\n".into(),
            "test.yaml:7: YAML tag !!str is not supported",
        ),
        (
            "  ingress:\n  - toPorts: [{ports: [{port: !!int \"80\"}]}]\n".into(),
            "test.yaml:8: YAML tag !!int is not supported",
        ),
        (
            "  ingress:\n  - fromEndpoints:\n    - matchLabels: {com.docker.compose.config-hash: abc}\n".into(),
            "test.yaml:9: spec.ingress[0].fromEndpoints[0].matchLabels.com.docker.compose.config-hash: label \"com.docker.compose.config-hash\" is left out of identities",
        ),
        (
            "  ingress:\n  - fromEndpoints:\n    - matchExpressions: [{key: any:org.opencontainers.image.title, operator: DoesNotExist}]\n".into(),
            "test.yaml:9: spec.ingress[0].fromEndpoints[0].matchExpressions[0].key: label \"org.opencontainers.image.title\" is left out",
        ),
    ];
    let mut wrong = Vec::new();
    for (tail, want) in &cases {
        let text = format!("{head}{tail}");
        match parse_str("test.yaml", &text) {
            Ok(_) => wrong.push(format!("want {want}\n got no error")),
            Err(e) if !e.to_string().starts_with(want) => {
                wrong.push(format!("want {want}\n got {e}"))
            }
            Err(_) => {}
        }
    }
    let docs: &[(&str, &str)] = &[
        (
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector:\n  ingress: [{}]\n",
            "test.yaml:5: spec.endpointSelector: a null selector is not allowed: write {} to select every container",
        ),
        (
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec: {endpointSelector: ~, ingress: [{}]}\n",
            "test.yaml:4: spec.endpointSelector: a null selector",
        ),
        (
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\n  namespace: default\nspec: {endpointSelector: {}}\n",
            "test.yaml:5: metadata.namespace: there are no namespaces on a Docker host",
        ),
        (
            "apiVersion: !!str cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec: {endpointSelector: {}}\n",
            "test.yaml:1: YAML tag !!str",
        ),
        (
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec: !!map {endpointSelector: {}}\n",
            "test.yaml:4: YAML tag !!map",
        ),
    ];
    for (text, want) in docs {
        match parse_str("test.yaml", text) {
            Ok(_) => wrong.push(format!("want {want}\n got no error")),
            Err(e) if !e.to_string().starts_with(want) => {
                wrong.push(format!("want {want}\n got {e}"))
            }
            Err(_) => {}
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The agent's `--ignore-label` patterns make selectors on those labels errors too.
#[test]
fn selectors_on_ignored_labels_are_errors() {
    let text =
        format!("{HEAD_DB}  ingress:\n  - fromEndpoints: [{{matchLabels: {{tier: front}}}}]\n");
    parse(&text);
    let filter = crate::identity::LabelFilter::new(["tier"]);
    let e = parse_str_with("test.yaml", &text, &filter)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("test.yaml:7: spec.ingress[0].fromEndpoints[0].matchLabels.tier: label \"tier\" is left out of identities"),
        "{e}"
    );
    let sel = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {matchLabels: {build.id: \"7\"}}\n  ingress: [{}]\n";
    let e = parse_str_with(
        "test.yaml",
        sel,
        &crate::identity::LabelFilter::new(["build.*"]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with(
            "test.yaml:5: spec.endpointSelector.matchLabels.build.id: label \"build.id\""
        ),
        "{e}"
    );
    // A container's own netpol.* labels stay in its identity whatever --ignore-label says.
    let netpol = format!(
        "{HEAD_DB}  ingress:\n  - fromEndpoints: [{{matchLabels: {{netpol.ingress: \"\"}}}}]\n"
    );
    parse_str_with(
        "test.yaml",
        &netpol,
        &crate::identity::LabelFilter::new(["netpol.*"]),
    )
    .expect("netpol.* selectors");
}

/// A panic inside the parser is an error, not a dead daemon.
#[test]
fn a_panic_while_parsing_is_an_error() {
    let r = super::parse::isolated("test.yaml", || -> Result<Vec<Policy>, PolicyErrors> {
        panic!("boom")
    });
    let e = r.unwrap_err();
    assert!(
        matches!(&e.0[0].kind, ErrorKind::Internal(m) if m == "boom"),
        "{e}"
    );
    assert!(e
        .to_string()
        .starts_with("test.yaml:0: internal error while parsing"));
}

/// `any:k`, `container:k` and `k` name one label: two of them in one `matchLabels` are a
/// duplicate key, not the last one winning (that dropped the other's condition: a peer selector
/// `{any:service: app1, service: app2}`, which selects nobody, let app2 in).
#[test]
fn a_label_key_with_and_without_its_source_prefix_is_a_duplicate() {
    for keys in [
        (
            "any:com.docker.compose.service",
            "com.docker.compose.service",
        ),
        (
            "container:com.docker.compose.service",
            "any:com.docker.compose.service",
        ),
    ] {
        let peer = format!(
            "{HEAD_DB}  ingress:\n  - fromEndpoints: [{{matchLabels: {{{}: app1, {}: app2}}}}]\n",
            keys.0, keys.1
        );
        let e = parse_str("t.yaml", &peer).expect_err("peer").to_string();
        assert!(
            e.contains(&format!("matchLabels.{}: duplicate key", keys.1)),
            "{e}"
        );
        let sel = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p}}\nspec:\n  endpointSelector: {{matchLabels: {{{}: db, {}: app1}}}}\n  ingress: [{{}}]\n",
            keys.0, keys.1
        );
        assert!(parse_str("t.yaml", &sel).is_err(), "endpointSelector");
    }
}

const AUDIT_DB: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: db-audit
  annotations:
    netpol.io/audit: "true"
    kubectl.kubernetes.io/last-applied-configuration: "{}"
spec:
  endpointSelector: { matchLabels: { com.docker.compose.service: db } }
  ingress:
    - fromEndpoints: [{ matchLabels: { com.docker.compose.service: app1 } }]
      toPorts: [{ ports: [{ port: "5432", protocol: TCP }] }]
"#;

const ENFORCE_DB: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: db-strict
spec:
  endpointSelector: { matchLabels: { com.docker.compose.service: db } }
  ingress:
    - {}
"#;

#[test]
fn audit_annotation_audits_only_what_no_enforcing_policy_covers() {
    let c = compiled(AUDIT_DB);
    // Computed as usual: enforced, the allow is there, app2 would be denied...
    assert!(c.enforcement_of(DB).ingress);
    assert!(passes(&c, DB, APP1, Ingress, TCP, 5432));
    assert!(!passes(&c, DB, APP2, Ingress, TCP, 5432));
    // ...but db's ingress is audited, and the cause of a default deny is named.
    assert_eq!(
        c.audit_of(DB),
        Enforcement {
            ingress: true,
            egress: false
        }
    );
    assert_eq!(c.default_deny_of(DB, Ingress), ["db-audit"]);
    assert!(c.default_deny_of(DB, Egress).is_empty());
    assert_eq!(c.audit_of(APP1), Enforcement::default());
    // An enforcing policy on the same direction wins: fail closed.
    let both = compile(&[parse(AUDIT_DB), parse(ENFORCE_DB)].concat(), &shop()).unwrap();
    assert_eq!(both.audit_of(DB), Enforcement::default());
    assert_eq!(both.default_deny_of(DB, Ingress), ["db-audit", "db-strict"]);
    // ...and the audit policy's allow does not open what the enforcing one denies (it would pass
    // unreported): in an enforced direction only enforcing policies' rules apply.
    assert!(!passes(&both, DB, APP1, Ingress, TCP, 5432));
    let wide = AUDIT_DB
        .replace("db-audit", "db-audit-world")
        .replace("ingress:", "ingress:\n    - fromEntities: [world]");
    let open = compile(&[parse(&wide), parse(ENFORCE_DB)].concat(), &shop()).unwrap();
    assert_eq!(open.audit_of(DB), Enforcement::default());
    assert!(!passes(
        &open,
        DB,
        netpol_common::identity::WORLD,
        Ingress,
        TCP,
        5432
    ));
    // Nor does its default deny add real drops where an enforcing deny-only policy keeps the
    // rest allowed.
    let deny_only = ENFORCE_DB.replace("db-strict", "db-no-app2").replace(
        "  ingress:\n    - {}",
        "  enableDefaultDeny: { ingress: false }\n  ingressDeny:\n    - fromEndpoints: [{ matchLabels: { com.docker.compose.service: app2 } }]",
    );
    let mixed = compile(&[parse(AUDIT_DB), parse(&deny_only)].concat(), &shop()).unwrap();
    assert_eq!(mixed.audit_of(DB), Enforcement::default());
    assert!(!passes(&mixed, DB, APP2, Ingress, TCP, 5432));
    assert!(passes(
        &mixed,
        DB,
        netpol_common::identity::WORLD,
        Ingress,
        TCP,
        80
    ));
    // Alone, the audit policy's rules are in force where it audits.
    let alone = compiled(&wide);
    assert!(alone.audit_of(DB).ingress);
    assert!(passes(
        &alone,
        DB,
        netpol_common::identity::WORLD,
        Ingress,
        TCP,
        5432
    ));
}

#[test]
fn audit_annotation_is_strict_where_it_is_ours() {
    for (text, want) in [
        ("netpol.io/audit: \"false\"", Ok(false)),
        ("netpol.io/audit: \"true\"", Ok(true)),
        ("other.io/x: anything", Ok(false)),
        (
            "netpol.io/audit: true",
            Err("metadata.annotations.netpol.io/audit"),
        ),
        (
            "netpol.io/audit: \"yes\"",
            Err("metadata.annotations.netpol.io/audit"),
        ),
        (
            "netpol.io/adit: \"true\"",
            Err("metadata.annotations.netpol.io/adit"),
        ),
    ] {
        let doc = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\n  annotations:\n    {text}\nspec:\n  endpointSelector: {{}}\n  ingress: [{{}}]\n"
        );
        match (parse_str("a.yaml", &doc), want) {
            (Ok(p), Ok(audit)) => assert_eq!(p[0].specs[0].audit, audit, "{text}"),
            (Err(e), Err(path)) => {
                let e = e.to_string();
                assert!(e.contains(path) && e.contains("a.yaml:6"), "{text}: {e}");
            }
            (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn an_allow_is_final_only_when_no_wildcard_deny_overlaps_it() {
    let c = compiled(
        r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {com.docker.compose.service: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {com.docker.compose.service: app1}}]
    toPorts: [{ports: [{port: "5432", protocol: TCP}, {port: "6000", endPort: 6100, protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {com.docker.compose.service: app2}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {com.docker.compose.service: app2}}]
  ingressDeny:
  - toPorts: [{ports: [{port: "5432", protocol: TCP}, {port: "6050", protocol: TCP}]}]
  egress:
  - toEntities: [world]
"#,
    );
    let flag = |remote: u32, dir: Direction, proto: u8, port: u16, len: u32| {
        let k = PolicyEntryKey {
            key: netpol_common::policy::PolicyKey::new(DB, remote, dir, proto, port),
            prefix_len: len,
        };
        let v = c.policy.get(&k).unwrap_or_else(|| panic!("no entry {k:?}"));
        assert!(v.is_allow(), "{k:?}");
        v.is_final()
    };
    // The wildcard deny of 5432 overlaps app1's 5432 and the 6050 deny one block of 6000-6100,
    // and app2's every-port allow: those take both lookups (and are denied there).
    assert!(!flag(APP1, Ingress, TCP, 5432, 96));
    let blocks: Vec<_> = netpol_common::policy::port_range_blocks(6000, 6100).collect();
    for b in &blocks {
        let fin = flag(APP1, Ingress, TCP, b.port, b.prefix_len());
        assert_eq!(fin, !b.contains(6050), "{b:?}");
    }
    assert!(!flag(APP2, Ingress, 0, 0, 72));
    assert_eq!(verdict(&c, DB, APP1, Ingress, TCP, 5432), Verdict::Deny(4));
    assert_eq!(verdict(&c, DB, APP1, Ingress, TCP, 6050), Verdict::Deny(4));
    assert_eq!(verdict(&c, DB, APP2, Ingress, TCP, 5432), Verdict::Deny(4));
    // The other blocks, app2's 8080 and egress (no wildcard deny there) decide alone.
    assert!(flag(APP2, Ingress, TCP, 8080, 96));
    assert!(flag(WORLD, Egress, 0, 0, 72));
    assert_eq!(verdict(&c, DB, APP1, Ingress, TCP, 6051), Verdict::Allow(1));
    assert_eq!(verdict(&c, DB, APP2, Ingress, TCP, 8080), Verdict::Allow(2));
    // Denies and wildcard entries never carry the flag.
    assert!(c
        .policy
        .iter()
        .filter(|(k, v)| v.is_deny() || k.key.remote == ANY)
        .all(|(_, v)| v.flags & PolicyValue::FINAL == 0));
}
