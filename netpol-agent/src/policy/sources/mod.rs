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
    /// [`Files::reload`].
    pub fn load(store: &Store, policy_dir: PathBuf) -> Result<Self, StoreError> {
        Ok(Self {
            files: Files::new(policy_dir),
            imports: Imports::load(store)?,
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
}
