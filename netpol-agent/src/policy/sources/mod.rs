//! Where policies come from, each source with its own parse, the version in force and its
//! errors:
//!
//! - [`files`]: the files of the policy directory (`/etc/netpol/policies.d`);
//! - [`imports`]: `policy import` through the control socket, stored under the state directory;
//! - [`labels`]: the compose shorthand labels of running containers.
//!
//! [`Sources`] puts them together: [`Sources::policies_with`] is the policy set the compiler
//! gets.

pub mod files;
pub mod imports;
pub mod labels;

use std::path::PathBuf;

pub use files::Files;
pub use imports::{ImportSet, Imported, Imports};
pub use labels::{ContainerLabels, LabelPolicies};

use crate::{
    identity::LabelFilter,
    policy::Policy,
    store::{Store, StoreError},
};

#[derive(Debug)]
pub struct Sources {
    pub files: Files,
    pub imports: Imports,
    pub labels: LabelPolicies,
}

impl Sources {
    /// Imported policies from `store`; the files of `policy_dir` are read by
    /// [`Files::reload`]. Stored policies are checked against `filter`, the agent's label filter.
    pub fn load(
        store: &Store,
        policy_dir: PathBuf,
        filter: &LabelFilter,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            files: Files::load(policy_dir, store, filter)?,
            imports: Imports::load(store, filter)?,
            labels: LabelPolicies::default(),
        })
    }

    /// Every policy in force, with `imports` in place of the current imported policies.
    pub fn policies_with(&self, imports: &ImportSet) -> Vec<Policy> {
        let mut all: Vec<Policy> = imports
            .values()
            .filter_map(|i| i.policy.as_ref().ok().cloned())
            .collect();
        all.extend(self.files.policies().cloned());
        all.extend(self.labels.policies().iter().cloned());
        all
    }

    /// Every policy in force.
    pub fn policies(&self) -> Vec<Policy> {
        self.policies_with(self.imports.set())
    }

    /// Re-reads the policy directory (see [`Files::reload`]).
    pub fn reload_files(&mut self, store: &Store, filter: &LabelFilter) -> Vec<StoreError> {
        let imports = &self.imports;
        self.files
            .reload(store, filter, |name| imports.contains(name))
    }

    /// Stored policies that no longer parse, with `imports` in place of the imported policies:
    /// one line each. While there is any, the maps must be left as they are: what such a policy
    /// allowed and denied is unknown, and compiling without it could open what it protected.
    pub fn unparsable_with(&self, imports: &ImportSet) -> Vec<String> {
        let mut out: Vec<String> = imports::unparsable(imports)
            .map(|(name, e)| {
                format!(
                    "imported policy {name} no longer parses: {e} (import it again or delete it)"
                )
            })
            .collect();
        out.extend(
            self.files
                .unparsable()
                .into_iter()
                .map(|(path, e)| format!("the last valid version of {path} no longer parses: {e} (make the file valid or remove it)")),
        );
        out
    }

    pub fn unparsable(&self) -> Vec<String> {
        self.unparsable_with(self.imports.set())
    }

    /// Errors for the policies of an import whose names a policy file already uses.
    pub fn name_conflicts(&self, new: &ImportSet) -> Vec<String> {
        new.keys()
            .filter_map(|name| {
                self.files.defined_by(name).map(|(_, path)| {
                    format!(
                        "metadata.name {name:?} is already defined by {} (names are unique across files and imports)",
                        path.display()
                    )
                })
            })
            .collect()
    }
}
