//! Imported policies: `policy import` through the control socket, each stored as the YAML
//! document it came from under the state directory (`/var/lib/netpol/policies/<name>.yaml`).
//!
//! A stored policy that no longer parses (an upgrade made it invalid) is kept, as an error: what
//! it allowed and denied cannot be known any more, so the agent leaves the maps as they are
//! until it is imported again or deleted (see [`super::Sources::unparsable`]).

use std::collections::BTreeMap;

use tracing::error;

use crate::{
    identity::LabelFilter,
    policy::{self, Policy},
    store::{valid_policy_name, Store, StoreError},
};

/// One imported policy: the document it was imported from, and what it parses to now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Imported {
    pub text: String,
    /// `Err` when the stored document no longer parses (an upgrade made it invalid).
    pub policy: Result<Policy, String>,
}

/// Imported policies by name.
pub type ImportSet = BTreeMap<String, Imported>;

#[derive(Debug, Default)]
pub struct Imports {
    policies: ImportSet,
}

impl Imports {
    /// The policies stored in `store`. One that no longer parses is kept (as an error).
    /// Selectors are checked against `filter`, the agent's label filter: a stored policy that
    /// selects by a label a new `--ignore-label` leaves out of identities would select nothing
    /// and silently open what it protected, so it does not parse either (the agent says so and
    /// fails closed).
    pub fn load(store: &Store, filter: &LabelFilter) -> Result<Self, StoreError> {
        if store.finish_policy_change()? {
            tracing::warn!("completed a change of imported policies that a crash interrupted");
        }
        let mut policies = ImportSet::new();
        for (name, stored) in store.policies()? {
            let parsed = stored.as_ref().map_err(Clone::clone).and_then(|text| {
                let ps = policy::parse_str_with(&format!("imported policy {name}"), text, filter)
                    .map_err(|e| e.to_string())?;
                the_one(&name, ps)
            });
            let text = stored.unwrap_or_default();
            match parsed {
                Ok(p) => {
                    policies.insert(
                        p.name.clone(),
                        Imported {
                            text,
                            policy: Ok(p),
                        },
                    );
                }
                Err(e) => {
                    // Kept: dropping it would open what it protected.
                    error!(policy = %name, error = %e, "stored policy no longer parses; the maps are left as they are until it is imported again or deleted");
                    policies.insert(
                        name,
                        Imported {
                            text,
                            policy: Err(e),
                        },
                    );
                }
            }
        }
        Ok(Self { policies })
    }

    pub fn set(&self) -> &ImportSet {
        &self.policies
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.policies.contains_key(name)
    }

    /// Stored policies that no longer parse: name → error.
    pub fn unparsable(&self) -> impl Iterator<Item = (&str, &str)> {
        unparsable(&self.policies)
    }

    /// Replaces the set (after [`persist`] succeeded and the maps took it).
    pub fn replace(&mut self, set: ImportSet) {
        self.policies = set;
    }
}

/// The policy stored as `name`: the import stores each policy alone, in a file of its name, so
/// a file that parses to no policy (emptied), to several, or to another name was damaged, and
/// what it held cannot be known.
fn the_one(name: &str, mut ps: Vec<Policy>) -> Result<Policy, String> {
    match ps.len() {
        1 if ps[0].name == name => Ok(ps.remove(0)),
        0 => Err(format!(
            "the stored file {name}.yaml holds no policy: it was damaged"
        )),
        _ => Err(format!(
            "the stored file {name}.yaml holds {} instead of policy {name}: it was damaged",
            ps.iter()
                .map(|p| format!("policy {}", p.name))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The policies of `set` that no longer parse: name → error.
pub fn unparsable(set: &ImportSet) -> impl Iterator<Item = (&str, &str)> {
    set.iter()
        .filter_map(|(n, i)| i.policy.as_ref().err().map(|e| (n.as_str(), e.as_str())))
}

/// The policies that `policy import` of `files` ((path, text) as the CLI read them) adds: every
/// document of every file must parse (selectors checked against `filter`, the agent's label
/// filter) and carry a storable, unique name; otherwise every error.
pub fn parse_import<'a>(
    files: impl IntoIterator<Item = (&'a str, &'a str)>,
    filter: &LabelFilter,
) -> Result<ImportSet, Vec<String>> {
    let mut errors = Vec::new();
    let mut new = ImportSet::new();
    for (path, text) in files {
        if let Err(e) = policy::parse_str_with(path, text, filter) {
            errors.push(e.to_string());
            continue;
        }
        for doc in documents(text) {
            match policy::parse_str_with(path, &doc, filter) {
                Ok(ps) => {
                    for p in ps {
                        if !valid_policy_name(&p.name) {
                            errors.push(format!(
                                "{}: metadata.name {:?}: use letters, digits, '-', '_' and '.'",
                                path, p.name
                            ));
                        } else if new.contains_key(&p.name) {
                            errors.push(format!(
                                "{}: metadata.name {:?} appears twice",
                                path, p.name
                            ));
                        } else {
                            new.insert(
                                p.name.clone(),
                                Imported {
                                    text: doc.clone(),
                                    policy: Ok(p),
                                },
                            );
                        }
                    }
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
    }
    if errors.is_empty() {
        Ok(new)
    } else {
        Err(errors)
    }
}

/// Writes the difference between `old` and `new` to the store: new and changed documents are
/// saved, removed ones deleted. On failure what was written is undone (best effort).
pub fn persist(store: &Store, old: &ImportSet, new: &ImportSet) -> Result<(), StoreError> {
    let mut change: BTreeMap<String, Option<String>> = new
        .iter()
        .filter(|(name, p)| old.get(*name).map(|o| &o.text) != Some(&p.text))
        .map(|(name, p)| (name.clone(), Some(p.text.clone())))
        .collect();
    change.extend(
        old.keys()
            .filter(|n| !new.contains_key(*n))
            .map(|n| (n.clone(), None)),
    );
    // Whole or not at all, also across a crash (see `Store::change_policies`).
    let result = whole(store, change, new).and_then(|c| store.change_policies(&c));
    if result.is_err() {
        restore(store, old, new);
    }
    result
}

/// `change`, or when the journal of an earlier change is still there (one that failed part way
/// and whose undo failed too: the store may hold half of it, which the running agent does not
/// have), the change that makes the store hold all of `target`: replacing that journal with
/// `change` alone would keep the half for good, and a restart would bring it back (a policy
/// the agent never dropped gone, or one it never took in force). Damaged stored files that
/// `target` keeps are left as they are.
fn whole(
    store: &Store,
    mut change: BTreeMap<String, Option<String>>,
    target: &ImportSet,
) -> Result<BTreeMap<String, Option<String>>, StoreError> {
    if !store.policy_change_pending() {
        return Ok(change);
    }
    for (name, p) in target.iter().filter(|(_, p)| p.policy.is_ok()) {
        change.insert(name.clone(), Some(p.text.clone()));
    }
    for name in store.policies()?.into_keys() {
        if !target.contains_key(&name) {
            change.insert(name, None);
        }
    }
    Ok(change)
}

/// Puts `old` back in the store after `new` was (perhaps partly) persisted.
pub fn restore(store: &Store, old: &ImportSet, new: &ImportSet) {
    // Only what `persist` may have written over: a damaged stored file left alone stays as it
    // is (its text here may not be what the file holds).
    let mut change: BTreeMap<String, Option<String>> = old
        .iter()
        .filter(|(n, p)| new.get(*n) != Some(*p))
        .map(|(n, p)| (n.clone(), Some(p.text.clone())))
        .collect();
    change.extend(
        new.keys()
            .filter(|n| !old.contains_key(*n))
            .map(|n| (n.clone(), None)),
    );
    if let Err(e) = whole(store, change, old).and_then(|c| store.change_policies(&c)) {
        error!(error = %e, "putting the imported policies back after a failed change");
    }
}

/// Splits a multi-document YAML text into documents (`---` lines), keeping each one's text.
fn documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line == "---" || line.starts_with("--- ") {
            docs.push(String::new());
            continue;
        }
        if let Some(d) = docs.last_mut() {
            d.push_str(line);
            d.push('\n');
        }
    }
    docs.into_iter()
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::documents;

    #[test]
    fn splits_yaml_documents() {
        let d = documents("a: 1\n---\nb: 2\n--- \n# only a comment\n---\nc: 3\n");
        assert_eq!(
            d,
            vec![
                "a: 1\n".to_owned(),
                "b: 2\n".to_owned(),
                "c: 3\n".to_owned()
            ]
        );
    }
}
