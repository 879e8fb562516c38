//! Policy files: `*.yaml` / `*.yml` in the policy directory (`/etc/netpol/policies.d`), re-read
//! when the directory changes.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::SystemTime,
};

use tracing::error;

use crate::policy::{self, Policy};

/// One file of the policy directory.
#[derive(Clone, Debug)]
pub struct PolicyFile {
    pub path: PathBuf,
    /// Modification time of the version last read.
    modified: Option<SystemTime>,
    /// The version in force: its text and policies.
    pub in_force: Option<Version>,
    /// Why the file as it is on disk is rejected.
    pub error: Option<String>,
}

/// A version of a policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub text: String,
    pub policies: Vec<Policy>,
}

/// The policy directory and what its files gave.
#[derive(Debug)]
pub struct Files {
    dir: PathBuf,
    /// By file name.
    files: BTreeMap<String, PolicyFile>,
}

impl Files {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: BTreeMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory's policy files: file name → (path, modification time).
    fn listing(&self) -> BTreeMap<String, (PathBuf, Option<SystemTime>)> {
        let mut out = BTreeMap::new();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let p = e.path();
                let is_yaml = p.extension().is_some_and(|x| x == "yaml" || x == "yml");
                let Some(name) = p.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                    continue;
                };
                if is_yaml && p.is_file() {
                    let modified = e.metadata().ok().and_then(|m| m.modified().ok());
                    out.insert(name, (p, modified));
                }
            }
        }
        out
    }

    /// Whether a file was added, removed or modified since the last [`Files::reload`].
    pub fn changed(&self) -> bool {
        let now = self.listing();
        now.len() != self.files.len()
            || now
                .iter()
                .any(|(n, (_, m))| self.files.get(n).is_none_or(|f| f.modified != *m))
    }

    /// Re-reads the directory. A file that does not parse keeps no policy in force and is
    /// reported in `status`.
    pub fn reload(&mut self) {
        let mut files = BTreeMap::new();
        for (name, (path, modified)) in self.listing() {
            let file = path.display().to_string();
            let (in_force, error) = match std::fs::read_to_string(&path) {
                Ok(text) => match policy::parse_str(&file, &text) {
                    Ok(policies) => (Some(Version { text, policies }), None),
                    Err(e) => (None, Some(e.to_string())),
                },
                Err(e) => (None, Some(format!("{file}:0: cannot read: {e}"))),
            };
            if let Some(e) = &error {
                error!(file = %path.display(), error = %e, "policy file rejected");
            }
            files.insert(
                name,
                PolicyFile {
                    path,
                    modified,
                    in_force,
                    error,
                },
            );
        }
        self.files = files;
    }

    pub fn iter(&self) -> impl Iterator<Item = &PolicyFile> {
        self.files.values()
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The policies in force.
    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.files
            .values()
            .filter_map(|f| f.in_force.as_ref())
            .flat_map(|v| v.policies.iter())
    }

    /// Files rejected as they are on disk: path → error.
    pub fn rejected(&self) -> BTreeMap<String, String> {
        self.files
            .values()
            .filter_map(|f| {
                f.error
                    .as_ref()
                    .map(|e| (f.path.display().to_string(), e.clone()))
            })
            .collect()
    }
}
