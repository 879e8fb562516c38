//! Stable rule ids: the number a rule carries in `POLICY` values, events, conntrack entries and
//! `RULE_STATS` stays the same for the same rule across compiles and agent restarts.
//!
//! A rule is known by its [`RuleKey`]: the policy's name (and, for a compose-label policy, its
//! container: every replica of a service has a policy of its own), the canonical form of its
//! spec's `endpointSelector`, its section kind (`ingress`, `ingressDeny`, `egress`,
//! `egressDeny`), the canonical form of the rule itself (peers and ports, each list sorted and
//! without repeats, so reordering a list is no edit), and which of the equal rules of that policy
//! it is (`nth`, in order). The key is the whole canonical text, not a hash of it: two rules
//! never share an id by collision. Adding a policy, a spec or a rule before another, or editing
//! or deleting one, leaves the ids of the other rules alone; an edited rule is a new rule with a
//! new id (its old counters counted something else).
//!
//! An id is never handed out twice: new rules get numbers from [`RuleIds::next`] upward, which
//! only grows (it is persisted with the table, and raised above every id found in the maps at
//! start), so counters and events of a removed rule can never be attributed to a later one. Only
//! when the 32-bit range is used up are numbers of rules removed earlier reused, lowest first,
//! and reported in [`RuleIds::reused`] so that the agent zeroes their `RULE_STATS` entries first.
//! Rule 0 is never allocated (the default deny and the implicit allow).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{Peer, Peers, Policy, Rule, Selector, Source, L4};

/// Which rule a number stands for. See the module documentation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RuleKey {
    pub policy: String,
    /// The container of a compose-label policy (`None` for policy files and imports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The canonical `endpointSelector` of the rule's spec.
    pub selector: String,
    /// `ingress`, `ingressDeny`, `egress` or `egressDeny`.
    pub section: String,
    /// The canonical rule ([`canonical_rule`]).
    pub rule: String,
    /// 0 for the first rule of the policy with this key, 1 for the next equal one, …
    #[serde(default)]
    pub nth: u32,
}

impl RuleKey {
    /// The key of rule `rule` in section `section` of a spec of `policy` selecting with
    /// `selector` (`nth`: see [`RuleKey::nth`]).
    pub fn new(policy: &Policy, selector: &Selector, section: &str, rule: &Rule, nth: u32) -> Self {
        Self {
            policy: policy.name.clone(),
            container: match &policy.source {
                Source::Labels { container } => Some(container.clone()),
                Source::File(_) => None,
            },
            selector: canonical_selector(selector),
            section: section.to_owned(),
            rule: canonical_rule(rule),
            nth,
        }
    }
}

/// The rule id table: the id of every rule in force, and the lowest number never handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleIds {
    ids: BTreeMap<RuleKey, u32>,
    next: u32,
    /// Numbers given out again in this compile (only once the range is used up): their
    /// `RULE_STATS` entries must be zeroed before they are used.
    reused: BTreeSet<u32>,
}

impl Default for RuleIds {
    fn default() -> Self {
        Self {
            ids: BTreeMap::new(),
            next: FIRST_RULE,
            reused: BTreeSet::new(),
        }
    }
}

/// The first id a rule gets (0 is the default deny / implicit allow).
pub const FIRST_RULE: u32 = 1;

/// Ids are handed out one by one from [`FIRST_RULE`]: reaching 2^31 would take two billion new
/// rules. An id from here up in a loaded table or in the maps comes from damage (see
/// [`RuleIds::load`]).
pub const TOP: u32 = 1 << 31;

/// The persisted form (`rule-ids.json` in the state directory).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RuleIdsState {
    pub next: u32,
    pub rules: Vec<RuleIdEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RuleIdEntry {
    pub id: u32,
    #[serde(flatten)]
    pub key: RuleKey,
}

#[derive(Debug, thiserror::Error)]
pub enum RuleIdsError {
    #[error("rule id {0} is out of range")]
    OutOfRange(u32),
    #[error("rule id {0} is given to two rules")]
    Duplicate(u32),
}

impl RuleIds {
    /// The table of a state file; `in_maps`: the rule ids found in the maps (`POLICY` values,
    /// `RULE_STATS` keys). The next id is raised above them, so that a stale or lost file never
    /// hands out a number the kernel still counts under.
    ///
    /// Ids at or above [`TOP`] (from a damaged or hand-edited file, or maps that an agent
    /// loading one wrote) are not taken at their word: left alone they would soon use the
    /// range up, and every later compile would give out numbers again. Their rules are
    /// renumbered above every other id of the table and the maps (their counters start
    /// again: the old number names no rule any more, so its counters are removed with the
    /// first compile), and the next id ignores them.
    pub fn load(
        state: RuleIdsState,
        in_maps: impl IntoIterator<Item = u32>,
    ) -> Result<Self, RuleIdsError> {
        let mut ids = BTreeMap::new();
        let mut seen = BTreeSet::new();
        let mut next = if state.next < TOP {
            state.next.max(FIRST_RULE)
        } else {
            FIRST_RULE
        };
        for e in state.rules {
            if e.id < FIRST_RULE {
                return Err(RuleIdsError::OutOfRange(e.id));
            }
            if !seen.insert(e.id) {
                return Err(RuleIdsError::Duplicate(e.id));
            }
            ids.insert(e.key, e.id);
        }
        for id in ids.values().copied().chain(in_maps) {
            if id < TOP {
                next = next.max(id + 1);
            }
        }
        let mut high: Vec<(u32, RuleKey)> = ids
            .iter()
            .filter(|(_, &id)| id >= TOP)
            .map(|(k, &id)| (id, k.clone()))
            .collect();
        high.sort();
        for (old, key) in high {
            tracing::warn!(policy = %key.policy, section = %key.section, old, new = next, "a rule id at the top of the range (a damaged rule-ids.json) is renumbered; its counters start again");
            ids.insert(key, next);
            next += 1;
        }
        Ok(Self {
            ids,
            next,
            reused: BTreeSet::new(),
        })
    }

    pub fn state(&self) -> RuleIdsState {
        RuleIdsState {
            next: self.next,
            rules: self
                .ids
                .iter()
                .map(|(k, &id)| RuleIdEntry { id, key: k.clone() })
                .collect(),
        }
    }

    /// The lowest number never handed out.
    pub fn next(&self) -> u32 {
        self.next
    }

    /// Makes `floor` and everything above it the numbers new rules get (never lowers it).
    pub fn raise_next(&mut self, floor: u32) {
        self.next = self.next.max(floor).max(FIRST_RULE);
    }

    pub fn get(&self, key: &RuleKey) -> Option<u32> {
        self.ids.get(key).copied()
    }

    pub fn contains_id(&self, id: u32) -> bool {
        self.ids.values().any(|&v| v == id)
    }

    /// The ids in the table.
    pub fn ids(&self) -> BTreeSet<u32> {
        self.ids.values().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Numbers given out again by the compile that made this table (see [`RuleIds`]).
    pub fn reused(&self) -> &BTreeSet<u32> {
        &self.reused
    }

    /// The table without the compile's note of reused numbers (once they are in use).
    pub fn settled(mut self) -> Self {
        self.reused.clear();
        self
    }
}

/// Builds the table of one compile from the previous one: known rules keep their ids, new ones
/// get fresh numbers, rules that are gone are left out.
pub(crate) struct Allocator<'a> {
    previous: &'a RuleIds,
    out: RuleIds,
    /// Keys seen so far without `nth`, and how often (for [`RuleKey::nth`]).
    seen: BTreeMap<RuleKey, u32>,
    used: BTreeSet<u32>,
}

impl<'a> Allocator<'a> {
    pub(crate) fn new(previous: &'a RuleIds) -> Self {
        Self {
            previous,
            out: RuleIds {
                ids: BTreeMap::new(),
                next: previous.next.max(FIRST_RULE),
                reused: BTreeSet::new(),
            },
            seen: BTreeMap::new(),
            used: BTreeSet::new(),
        }
    }

    /// The id of a rule (`key.nth` is set here), allocated if the rule is new. `None` when every
    /// 32-bit number is taken by a rule in force.
    pub(crate) fn id(&mut self, mut key: RuleKey) -> Option<u32> {
        key.nth = 0;
        let n = self.seen.entry(key.clone()).or_insert(0);
        key.nth = *n;
        *n += 1;
        if let Some(id) = self.previous.get(&key) {
            if self.used.insert(id) {
                self.out.ids.insert(key, id);
                return Some(id);
            }
        }
        let id = if self.out.next < u32::MAX {
            let id = self.out.next;
            self.out.next += 1;
            id
        } else {
            // Used up: the lowest number that no rule of this or the previous table holds.
            let held = self.previous.ids();
            let id =
                (FIRST_RULE..u32::MAX).find(|i| !self.used.contains(i) && !held.contains(i))?;
            self.out.reused.insert(id);
            id
        };
        self.used.insert(id);
        self.out.ids.insert(key, id);
        Some(id)
    }

    pub(crate) fn finish(self) -> RuleIds {
        self.out
    }
}

/// A selector in one canonical text: labels in key order, requirements and their values sorted.
pub fn canonical_selector(s: &Selector) -> String {
    let mut out = String::from("{");
    for (k, v) in &s.match_labels {
        out.push_str(&format!("{}={},", q(k), q(v)));
    }
    let mut reqs: Vec<String> = s
        .match_expressions
        .iter()
        .map(|r| {
            let mut values: Vec<String> = r.values.iter().map(|v| q(v)).collect();
            values.sort();
            values.dedup();
            format!("{} {:?} [{}]", q(&r.key), r.operator, values.join(","))
        })
        .collect();
    reqs.sort();
    reqs.dedup();
    out.push_str(&reqs.join(","));
    out.push('}');
    out
}

/// A rule in one canonical text: its peers and its ports, each sorted and without repeats.
pub fn canonical_rule(r: &Rule) -> String {
    let peers = match &r.peers {
        Peers::Unspecified => "any-peer".to_owned(),
        Peers::Listed(list) => {
            let mut items: Vec<String> = list.iter().map(canonical_peer).collect();
            items.sort();
            items.dedup();
            format!("peers[{}]", items.join(","))
        }
    };
    let l4 = match &r.l4 {
        L4::All => "all-l4".to_owned(),
        L4::Only(items) => {
            let mut items = items.clone();
            items.sort();
            items.dedup();
            let items: Vec<String> = items.iter().map(|p| format!("{p:?}")).collect();
            format!("l4[{}]", items.join(","))
        }
    };
    format!("{peers} {l4}")
}

fn canonical_peer(p: &Peer) -> String {
    match p {
        Peer::Endpoints(s) => format!("endpoints{}", canonical_selector(s)),
        Peer::Entity(e) => format!("entity:{e:?}"),
        Peer::Cidr(c) => {
            let mut except: Vec<String> = c.except.iter().map(|e| e.to_string()).collect();
            except.sort();
            except.dedup();
            format!("cidr:{} except[{}]", c.cidr, except.join(","))
        }
    }
}

/// A string quoted so that no label key or value can look like the text around it.
fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        identity::{Labels, COMPOSE_PROJECT, COMPOSE_SERVICE},
        policy::{compile_stable, parse_str, Compiled, Endpoints},
    };

    const DB: u32 = 300;
    const APP: u32 = 301;

    fn endpoints() -> Endpoints {
        let svc = |s: &str| -> Labels {
            [(COMPOSE_PROJECT, "shop"), (COMPOSE_SERVICE, s)]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        Endpoints::from([(DB, svc("db")), (APP, svc("app"))])
    }

    fn policies(text: &str) -> Vec<Policy> {
        parse_str("test.yaml", text).unwrap_or_else(|e| panic!("parse failed:\n{e}"))
    }

    fn compile_on(text: &str, previous: &RuleIds) -> Compiled {
        compile_stable(&policies(text), &endpoints(), &BTreeMap::new(), previous).expect("compile")
    }

    /// `"policy section"` → id.
    fn ids(c: &Compiled) -> BTreeMap<String, u32> {
        c.rules
            .iter()
            .map(|(&id, r)| (format!("{} {}", r.policy, r.section), id))
            .collect()
    }

    /// The rule ids the `POLICY` entries carry.
    fn entry_rules(c: &Compiled) -> BTreeSet<u32> {
        c.policy.values().map(|v| v.rule).collect()
    }

    fn doc(name: &str, rules: &str) -> String {
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: {name}\nspec:\n  endpointSelector: {{ matchLabels: {{ com.docker.compose.service: db }} }}\n{rules}"
        )
    }

    const DB_RULES: &str = "  ingress:\n  - fromEndpoints: [{ matchLabels: { com.docker.compose.service: app } }]\n    toPorts: [{ ports: [{ port: \"5432\", protocol: TCP }] }]\n  - fromEntities: [host]\n    toPorts: [{ ports: [{ port: \"9187\", protocol: TCP }] }]\n  ingressDeny:\n  - fromEntities: [world]\n";

    #[test]
    fn a_policy_added_before_another_leaves_its_rule_ids_alone() {
        let a = compile_on(&doc("db", DB_RULES), &RuleIds::default());
        assert_eq!(
            ids(&a),
            BTreeMap::from([
                ("db ingress[0]".into(), 1),
                ("db ingress[1]".into(), 2),
                ("db ingressDeny[0]".into(), 3),
            ]),
            "a fresh table numbers in compile order"
        );
        // "api" sorts before "db": with numbers given afresh, db's rules would shift by one.
        let both = format!(
            "{}---\n{}",
            doc(
                "api",
                "  ingress:\n  - fromEntities: [host]\n    toPorts: [{ ports: [{ port: \"80\" }] }]\n"
            ),
            doc("db", DB_RULES)
        );
        let b = compile_on(&both, &a.rule_ids);
        let b_ids = ids(&b);
        for (rule, id) in ids(&a) {
            assert_eq!(b_ids[&rule], id, "{rule} kept its id");
        }
        assert_eq!(b_ids["api ingress[0]"], 4, "the new rule gets a new number");
        assert!(entry_rules(&b).is_superset(&BTreeSet::from([1, 2, 3, 4])));
        // The same input and table: the same result.
        assert_eq!(compile_on(&both, &a.rule_ids), b);
    }

    #[test]
    fn an_edited_rule_gets_a_new_id_and_the_others_keep_theirs() {
        let a = compile_on(&doc("db", DB_RULES), &RuleIds::default());
        let edited = DB_RULES.replace("9187", "9188");
        let b = compile_on(&doc("db", &edited), &a.rule_ids);
        let (ai, bi) = (ids(&a), ids(&b));
        assert_eq!(bi["db ingress[0]"], ai["db ingress[0]"]);
        assert_eq!(bi["db ingressDeny[0]"], ai["db ingressDeny[0]"]);
        assert_eq!(bi["db ingress[1]"], 4, "an edit is a new rule");
        assert!(
            !b.rule_ids.contains_id(ai["db ingress[1]"]),
            "the old rule is gone"
        );
        assert!(!entry_rules(&b).contains(&ai["db ingress[1]"]));
        // Reordering a list within a rule is no edit.
        let reordered = DB_RULES.replace(
            "fromEndpoints: [{ matchLabels: { com.docker.compose.service: app } }]",
            "fromEndpoints: [{ matchLabels: { com.docker.compose.service: web } }, { matchLabels: { com.docker.compose.service: app } }]",
        );
        let c = compile_on(&doc("db", &reordered), &b.rule_ids);
        let swapped = DB_RULES.replace(
            "fromEndpoints: [{ matchLabels: { com.docker.compose.service: app } }]",
            "fromEndpoints: [{ matchLabels: { com.docker.compose.service: app } }, { matchLabels: { com.docker.compose.service: web } }]",
        );
        let d = compile_on(&doc("db", &swapped), &c.rule_ids);
        assert_eq!(ids(&c), ids(&d));
    }

    #[test]
    fn a_deleted_rule_takes_its_id_along_and_its_number_is_never_given_again() {
        let a = compile_on(&doc("db", DB_RULES), &RuleIds::default());
        let first_deleted = DB_RULES.replacen(
            "  - fromEndpoints: [{ matchLabels: { com.docker.compose.service: app } }]\n    toPorts: [{ ports: [{ port: \"5432\", protocol: TCP }] }]\n",
            "",
            1,
        );
        let b = compile_on(&doc("db", &first_deleted), &a.rule_ids);
        assert_eq!(
            ids(&b),
            BTreeMap::from([("db ingress[0]".into(), 2), ("db ingressDeny[0]".into(), 3)]),
            "the rule that moved up keeps its number under its new place"
        );
        assert_eq!(b.rule_ids.next(), 4);
        // The deleted rule comes back: it is new again (its counters were dropped).
        let c = compile_on(&doc("db", DB_RULES), &b.rule_ids);
        assert_eq!(ids(&c)["db ingress[0]"], 4);
    }

    #[test]
    fn ids_survive_a_restart_through_the_persisted_table_and_the_maps_floor() {
        let a = compile_on(&doc("db", DB_RULES), &RuleIds::default());
        let json = serde_json::to_string(&a.rule_ids.state()).expect("serialize");
        let loaded = RuleIds::load(serde_json::from_str(&json).expect("parse"), []).expect("load");
        assert_eq!(loaded, a.rule_ids);
        let b = compile_on(&doc("db", DB_RULES), &loaded);
        assert_eq!(ids(&b), ids(&a));
        // A table older than the maps (the agent died before it saved): numbers the kernel may
        // still count under are not handed out again.
        let stale = RuleIds::load(RuleIds::default().state(), [3]).expect("load");
        let c = compile_on(&doc("db", DB_RULES), &stale);
        assert_eq!(c.rule_ids.ids(), BTreeSet::from([4, 5, 6]));
        // A broken table is an error for the caller to handle.
        let mut bad = a.rule_ids.state();
        bad.rules[1].id = bad.rules[0].id;
        assert!(matches!(
            RuleIds::load(bad, []),
            Err(RuleIdsError::Duplicate(_))
        ));
    }

    #[test]
    fn specs_and_replicas_are_told_apart_by_their_selector_and_container() {
        let spec = |svc: &str| {
            format!("  - endpointSelector: {{ matchLabels: {{ com.docker.compose.service: {svc} }} }}\n    ingress: [{{ fromEntities: [host] }}]\n")
        };
        let one = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{ name: p }}\nspecs:\n{}",
            spec("db")
        );
        let two = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{ name: p }}\nspecs:\n{}{}",
            spec("app"),
            spec("db")
        );
        let a = compile_on(&one, &RuleIds::default());
        let b = compile_on(&two, &a.rule_ids);
        assert_eq!(ids(&a)["p ingress[0]"], 1);
        assert_eq!(
            ids(&b),
            BTreeMap::from([
                ("p specs[0].ingress[0]".into(), 2),
                ("p specs[1].ingress[0]".into(), 1)
            ]),
            "a spec added before keeps the other's rule"
        );

        // Two replicas of a compose service: one label policy each, same name.
        let replica = |c: &str| Policy {
            name: "compose:shop/db".into(),
            source: Source::Labels {
                container: c.into(),
            },
            specs: policies(&doc("x", DB_RULES)).remove(0).specs,
        };
        let both = [replica("shop-db-1"), replica("shop-db-2")];
        let r = compile_stable(&both, &endpoints(), &BTreeMap::new(), &RuleIds::default())
            .expect("compile");
        assert_eq!(
            r.rule_ids.len(),
            6,
            "each replica's rules have ids of their own"
        );
        let only2 = compile_stable(&both[1..], &endpoints(), &BTreeMap::new(), &r.rule_ids)
            .expect("compile");
        assert_eq!(only2.rule_ids.ids(), BTreeSet::from([4, 5, 6]));
    }

    #[test]
    fn equal_rules_of_one_policy_have_ids_of_their_own() {
        let twice = "  ingress:\n  - fromEntities: [host]\n  - fromEntities: [host]\n";
        let a = compile_on(&doc("db", twice), &RuleIds::default());
        assert_eq!(a.rule_ids.ids(), BTreeSet::from([1, 2]));
        let b = compile_on(&doc("db", twice), &a.rule_ids);
        assert_eq!(ids(&a), ids(&b));
    }

    /// A table with an id at the top of the range (a damaged or hand-edited file; or the maps
    /// of an agent that loaded one) no longer leaves the range used up for good, reusing
    /// numbers in every later compile: the rule is renumbered above every other id, and new
    /// rules get growing numbers again. Its old number names no rule, so its counters go.
    #[test]
    fn an_id_at_the_top_of_the_range_is_renumbered_and_ids_grow_again() {
        let a = compile_on(&doc("db", DB_RULES), &RuleIds::default());
        let before = ids(&a);
        for top in [u32::MAX, u32::MAX - 1, TOP] {
            let mut state = a.rule_ids.state();
            let deny = state
                .rules
                .iter_mut()
                .find(|e| e.key.section == "ingressDeny")
                .expect("deny rule");
            deny.id = top;
            // The maps of the agent that wrote it count under that number too.
            let loaded = RuleIds::load(state, [1, 2, top]).expect("load");
            assert!(!loaded.contains_id(top), "{top}: renumbered");
            assert_eq!(loaded.next(), 5, "{top}");
            let mut table = loaded;
            let mut text = doc("db", DB_RULES);
            for n in 0..3 {
                text = format!(
                    "{}---\n{text}",
                    doc(&format!("api{n}"), "  ingress:\n  - fromEntities: [host]\n")
                );
                let c = compile_on(&text, &table);
                assert!(
                    c.rule_ids.reused().is_empty(),
                    "{top}: reused {:?}",
                    c.rule_ids.reused()
                );
                let ci = ids(&c);
                assert_eq!(ci["db ingress[0]"], before["db ingress[0]"]);
                assert_eq!(ci["db ingress[1]"], before["db ingress[1]"]);
                assert_eq!(
                    ci["db ingressDeny[0]"], 4,
                    "{top}: the renumbered rule keeps its new id"
                );
                assert_eq!(
                    ci[&format!("api{n} ingress[0]")],
                    5 + n,
                    "{top}: a growing number"
                );
                table = c.rule_ids.settled();
            }
        }
        // The range said to be used up, with no rule there: numbers continue above the maps'.
        let state = RuleIdsState {
            next: u32::MAX,
            rules: Vec::new(),
        };
        let t = RuleIds::load(state, [7, u32::MAX]).expect("load");
        assert_eq!(t.next(), 8);
    }

    #[test]
    fn a_used_up_range_reuses_only_numbers_no_rule_holds_and_says_so() {
        let a = compile_on(&doc("db", DB_RULES), &RuleIds::default());
        let mut full = a.rule_ids.clone();
        full.raise_next(u32::MAX - 1);
        let more = format!(
            "{}---\n{}",
            doc(
                "api",
                "  ingress:\n  - fromEntities: [host]\n  - fromEntities: [world]\n"
            ),
            doc("db", DB_RULES)
        );
        let b = compile_on(&more, &full);
        let bi = ids(&b);
        assert_eq!(bi["api ingress[0]"], u32::MAX - 1);
        assert_eq!(bi["api ingress[1]"], 4, "the lowest number no rule holds");
        assert_eq!(b.rule_ids.reused(), &BTreeSet::from([4]));
        for (rule, id) in ids(&a) {
            assert_eq!(bi[&rule], id);
        }
    }
}
