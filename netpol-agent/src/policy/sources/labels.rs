//! Compose labels: the `netpol.ingress` / `netpol.egress` shorthand of each running container
//! (see [`crate::policy::compose`]), recomputed whenever the containers change.

use std::collections::BTreeMap;

use tracing::warn;

use crate::{
    identity::Labels,
    policy::{compose, Policy},
};

/// What the label source needs to know of one running container.
#[derive(Clone, Copy, Debug)]
pub struct ContainerLabels<'a> {
    pub name: &'a str,
    /// The container's Docker labels, unfiltered.
    pub labels: &'a Labels,
}

/// The policies of the containers' labels, and what was wrong with them.
#[derive(Debug, Default)]
pub struct LabelPolicies {
    policies: Vec<Policy>,
    /// Container name → why its labels were rejected.
    errors: BTreeMap<String, String>,
}

impl LabelPolicies {
    /// Recomputes everything from the running containers.
    pub fn update<'a>(&mut self, containers: impl IntoIterator<Item = ContainerLabels<'a>>) {
        self.policies.clear();
        self.errors.clear();
        for c in containers {
            match compose::from_labels(c.name, c.labels) {
                Ok(Some(p)) => self.policies.push(p),
                Ok(None) => {}
                Err(e) => {
                    warn!(container = %c.name, error = %e, "netpol labels rejected");
                    self.errors.insert(c.name.to_owned(), e.to_string());
                }
            }
        }
    }

    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// Container name → why its labels were rejected.
    pub fn errors(&self) -> &BTreeMap<String, String> {
        &self.errors
    }
}
