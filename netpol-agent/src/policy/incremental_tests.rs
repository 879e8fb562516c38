//! [`recompile_endpoints`] against a full compile: random policies, random containers coming,
//! going and changing labels; after every change the incremental result (built on the previous
//! incremental result) must equal the full compile, field for field.

use std::collections::BTreeMap;

use super::{fuzz::Rng, *};
use crate::identity::{Labels, FIRST_CIDR};
use compile::MAX_ENTRIES;
use netpol_common::identity::FIRST_LABEL;

trait Pick {
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str;
    fn chance(&mut self, percent: usize) -> bool;
}

impl Pick for Rng {
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const KEYS: &[&str] = &["app", "tier", "env"];
const VALUES: &[&str] = &["a", "b", "c"];

fn labels(rng: &mut Rng) -> Labels {
    let mut l = Labels::new();
    for k in KEYS {
        if rng.chance(70) {
            l.insert(k.to_string(), rng.pick(VALUES).to_string());
        }
    }
    l
}

fn selector(rng: &mut Rng) -> String {
    match rng.below(5) {
        0 => "{}".into(),
        1 | 2 => format!(
            "{{matchLabels: {{{}: {}}}}}",
            rng.pick(KEYS),
            rng.pick(VALUES)
        ),
        3 => format!(
            "{{matchExpressions: [{{key: {}, operator: {}, values: [{}]}}]}}",
            rng.pick(KEYS),
            rng.pick(&["In", "NotIn"]),
            rng.pick(VALUES)
        ),
        _ => format!(
            "{{matchExpressions: [{{key: {}, operator: {}}}]}}",
            rng.pick(KEYS),
            rng.pick(&["Exists", "DoesNotExist"])
        ),
    }
}

fn rule(rng: &mut Rng, to: bool) -> String {
    let side = if to { "to" } else { "from" };
    let peers = match rng.below(8) {
        0 => String::new(),
        1 => format!("{side}Endpoints: [{{}}], "),
        2 | 3 => format!("{side}Endpoints: [{}, {}], ", selector(rng), selector(rng)),
        4 => format!("{side}Endpoints: [], "),
        5 => format!(
            "{side}Entities: [{}], ",
            rng.pick(&["world", "host", "all"])
        ),
        6 => format!(
            "{side}CIDR: [{}], ",
            rng.pick(&["10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/24"])
        ),
        _ => format!("{side}CIDRSet: [{{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}], "),
    };
    let ports = match rng.below(4) {
        0 => String::new(),
        1 => format!(
            "toPorts: [{{ports: [{{port: \"{}\", protocol: {}}}]}}]",
            rng.pick(&["22", "80", "443", "0"]),
            rng.pick(&["TCP", "UDP", "ANY"])
        ),
        2 => "toPorts: [{ports: [{port: \"1000\", endPort: 1100}]}]".into(),
        _ => "icmps: [{fields: [{type: 8}]}]".into(),
    };
    let body = format!("{peers}{ports}");
    let body = body.trim_end_matches(", ");
    format!("  - {{{body}}}\n")
}

fn policy(rng: &mut Rng, n: usize) -> String {
    let audit = if rng.chance(20) {
        ", annotations: {netpol.io/audit: \"true\"}"
    } else {
        ""
    };
    let mut s = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{n}{audit}}}\nspec:\n  endpointSelector: {}\n",
        selector(rng)
    );
    if rng.chance(25) {
        s += &format!(
            "  enableDefaultDeny: {{ingress: {}, egress: {}}}\n",
            rng.chance(50),
            rng.chance(50)
        );
    }
    for (section, to) in [
        ("ingress", false),
        ("ingressDeny", false),
        ("egress", true),
        ("egressDeny", true),
    ] {
        if rng.chance(50) {
            s += &format!("  {section}:\n");
            for _ in 0..1 + rng.below(2) {
                s += &rule(rng, to);
            }
        }
    }
    s
}

fn policies(rng: &mut Rng) -> Vec<Policy> {
    let n = 1 + rng.below(4);
    let text: Vec<String> = (0..n).map(|i| policy(rng, i)).collect();
    let text = text.join("---\n");
    match parse_str("random.yaml", &text) {
        Ok(p) => p,
        Err(e) => panic!("generated policy does not parse:\n{text}\n{e}"),
    }
}

/// The differential check: `steps` times, 1 to `changes` random changes to `eps` (containers
/// started, stopped, relabelled; with `reuse` also a freed number given to other labels; new
/// ones numbered from `next_id`), after each an incremental compile from the endpoints before
/// that must equal a full compile, both with the rule table of the compile in force (the
/// agent's way). `what` describes the run for a failure.
#[allow(clippy::too_many_arguments)]
fn differential_run(
    rng: &mut Rng,
    p: &[Policy],
    mut eps: Endpoints,
    mut next_id: u32,
    steps: usize,
    changes: usize,
    reuse: bool,
    what: &dyn Fn() -> String,
) {
    let mut inc = compile(p, &eps).expect("compile");
    for step in 0..steps {
        let before = eps.clone();
        for _ in 0..1 + rng.below(changes) {
            let ids: Vec<u32> = eps
                .range(FIRST_LABEL..FIRST_CIDR)
                .map(|(&id, _)| id)
                .collect();
            match rng.below(if reuse { 5 } else { 4 }) {
                0 | 1 => {
                    eps.insert(next_id, labels(rng));
                    next_id += 1;
                }
                2 if !ids.is_empty() => {
                    eps.remove(&ids[rng.below(ids.len())]);
                }
                // A freed number given to other labels.
                3 if reuse && !ids.is_empty() => {
                    let id = ids[rng.below(ids.len())];
                    eps.remove(&id);
                    eps.insert(id, labels(rng));
                }
                _ if !ids.is_empty() => {
                    eps.insert(ids[rng.below(ids.len())], labels(rng));
                }
                _ => {}
            }
        }
        let table = inc.rule_ids.clone().settled();
        let full = compile_stable(p, &eps, &inc.cidr_identities, &table).expect("compile");
        let prev = inc.clone();
        let undo =
            recompile_endpoints_in_place(&mut inc, p, &before, &eps, &table).expect("recompile");
        assert_eq!(
            inc,
            full,
            "{} step {step}: incremental differs from a full compile\nbefore: {before:?}\nafter: {eps:?}",
            what()
        );
        // Taken back, it is the compile it started from.
        let mut undone = inc.clone();
        undo.undo(&mut undone);
        assert_eq!(undone, prev, "{} step {step}: undo", what());
    }
}

#[test]
fn incremental_compile_equals_a_full_compile_after_random_changes() {
    let mut rng = Rng(0x5eed_0001);
    for round in 0..150 {
        let p = policies(&mut rng);
        let mut eps: Endpoints = BTreeMap::new();
        let mut next_id = FIRST_LABEL;
        for _ in 0..rng.below(6) {
            eps.insert(next_id, labels(&mut rng));
            next_id += 1;
        }
        // Reserved numbers and CIDR identities are never local identities.
        eps.insert(FIRST_CIDR + 1, labels(&mut rng));
        let what = || format!("round {round}\npolicies: {p:#?}");
        differential_run(&mut rng, &p, eps, next_id, 12, 2, false, &what);
    }
}

/// Over the entry limit, the incremental path refuses with the full compile's error (naming the
/// policy and rule where the limit is reached), as it accepts what fits.
#[test]
fn incremental_compile_refuses_what_a_full_compile_refuses() {
    let text = super::tests::big_cidr_policy(100, "{matchLabels: {app: a}}");
    let p = parse_str("big.yaml", &text).expect("parse");
    let app = |a: &str| -> Labels { [("app".to_string(), a.to_string())].into_iter().collect() };
    let mut eps: Endpoints = [(FIRST_LABEL, app("a")), (FIRST_LABEL + 1, app("b"))].into();
    let per = compile(&p, &eps).expect("compile").policy.len();
    // As many containers as fit, then one more.
    let fit = MAX_ENTRIES / per;
    assert!((2..8).contains(&fit), "{per} entries per container");
    for i in 1..fit as u32 {
        eps.insert(FIRST_LABEL + 1 + i, app("a"));
    }
    let before = eps.clone();
    let last = FIRST_LABEL + 1 + fit as u32;
    eps.insert(last, app("b"));
    let prev = compile(&p, &before).expect("compile");
    let table = rule_ids::RuleIds::default();
    let inc = recompile_endpoints(&prev, &p, &before, &eps, &table).expect("below the limit");
    let before = eps.clone();
    eps.insert(last, app("a"));
    let full = compile(&p, &eps).expect_err("over the limit");
    let e = recompile_endpoints(&inc, &p, &before, &eps, &table).expect_err("over the limit");
    assert_eq!(e.to_string(), full.to_string());
    assert!(e.to_string().contains("big ingress[0]"), "{e}");
}

/// A rule of two endpoint selectors, one with two labels (peer kinds cannot be combined in one
/// rule).
fn two_label_rule(rng: &mut Rng, to: bool) -> String {
    let side = if to { "to" } else { "from" };
    let two = format!(
        "{{matchLabels: {{{}: {}, {}: {}}}}}",
        KEYS[0],
        rng.pick(VALUES),
        KEYS[1 + rng.below(2)],
        rng.pick(VALUES)
    );
    let mut parts = vec![format!("{side}Endpoints: [{two}, {}]", selector(rng))];
    if rng.chance(50) {
        parts.push("toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]".into());
    }
    format!("  - {{{}}}\n", parts.join(", "))
}

/// A policy of several specs (`specs:`), each with its own selector, sections and rules.
fn multi_spec_policy(rng: &mut Rng, n: usize) -> String {
    let audit = if rng.chance(20) {
        ", annotations: {netpol.io/audit: \"true\"}"
    } else {
        ""
    };
    let mut s = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: m{n}{audit}}}\nspecs:\n"
    );
    for _ in 0..2 + rng.below(2) {
        s += &format!("- endpointSelector: {}\n", selector(rng));
        if rng.chance(25) {
            s += &format!(
                "  enableDefaultDeny: {{ingress: {}, egress: {}}}\n",
                rng.chance(50),
                rng.chance(50)
            );
        }
        let mut any = false;
        for (section, to) in [
            ("ingress", false),
            ("ingressDeny", false),
            ("egress", true),
            ("egressDeny", true),
        ] {
            if rng.chance(50) || (!any && section == "egressDeny") {
                any = true;
                s += &format!("  {section}:\n");
                for _ in 0..1 + rng.below(2) {
                    s += &if rng.chance(50) {
                        two_label_rule(rng, to)
                    } else {
                        rule(rng, to)
                    };
                }
            }
        }
    }
    s
}

/// The same differential check with several-spec policies, two-label peer selectors, numbers
/// freed and given to other labels, and longer runs of changes.
#[test]
fn incremental_compile_equals_a_full_compile_with_multi_spec_policies() {
    let mut rng = Rng(0x5eed_0002);
    for round in 0..40 {
        let mut text: Vec<String> = (0..1 + rng.below(3))
            .map(|i| multi_spec_policy(&mut rng, i))
            .collect();
        for i in 0..rng.below(2) {
            text.push(policy(&mut rng, i));
        }
        let text = text.join("---\n");
        let p = match parse_str("random.yaml", &text) {
            Ok(p) => p,
            Err(e) => panic!("generated policy does not parse:\n{text}\n{e}"),
        };
        let mut eps: Endpoints = BTreeMap::new();
        let mut next_id = FIRST_LABEL;
        for _ in 0..rng.below(8) {
            eps.insert(next_id, labels(&mut rng));
            next_id += 1;
        }
        let what = || format!("round {round}\n{text}");
        differential_run(&mut rng, &p, eps, next_id, 20, 3, true, &what);
    }
}
