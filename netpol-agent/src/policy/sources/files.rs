//! Policy files: `*.yaml` / `*.yml` in the policy directory (`/etc/netpol/policies.d`), re-read
//! when the directory changes.
//!
//! A file edited into an invalid state keeps its last valid version in force, and is reported as
//! rejected (with the error) until a valid edit replaces it: a typo must not drop the policy it
//! breaks, since that would open what it protected. The last valid version of each file is kept
//! in the store (`files/<file name>`, written atomically), so it also holds across an agent
//! restart. Removing a file is an intended edit: its policies stop applying and its copy goes.
//! A policy name already used by an imported policy or by another file makes the file invalid
//! (names are unique across sources). A stored copy that no longer parses (after an upgrade) is
//! kept as such: see [`Files::unparsable`].
//!
//! A file is read only when no user but root (or the agent's own user) can have written it: a
//! file owned by another user or writable by group or others, or in a directory another user
//! can write to (there or further up, also every directory a symlink on the way lies in, see
//! [`crate::store::trusted_path`]), is rejected like an invalid one (its last valid version
//! stays in force): whoever can write it could open every container. So is a name that is not
//! a regular file (a directory, a FIFO, a symlink to nothing: a mount not there yet): only a
//! name gone from the directory removes its policies. A policy directory another user can
//! write to is read no more (nothing in it changes what is in force: a file removed there may
//! be an attacker's doing), nor one behind a symlink to nothing.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::SystemTime,
};

use tracing::{error, info};

use crate::{
    identity::LabelFilter,
    policy::{self, Policy},
    store::{Store, StoreError},
};

/// One file of the policy directory.
#[derive(Clone, Debug)]
pub struct PolicyFile {
    pub path: PathBuf,
    /// Modification time and size of the version last read; `None` while the file is known
    /// only from its stored copy.
    modified: Option<Stamp>,
    /// The version in force: the last valid one.
    pub in_force: Option<Version>,
    /// Why the file as it is on disk is rejected.
    pub error: Option<String>,
}

/// What tells a file's versions apart without reading it: modification time and size, and its
/// owner and mode (which decide whether it is read at all).
type Stamp = (Option<SystemTime>, u64, u32, u32);

/// A version of a policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub text: String,
    /// `Err` when a stored copy no longer parses.
    pub policies: Result<Vec<Policy>, String>,
}

/// The policy directory and what its files gave.
#[derive(Debug)]
pub struct Files {
    dir: PathBuf,
    /// By file name.
    files: BTreeMap<String, PolicyFile>,
    /// Why the directory itself is not trusted (another user can write to it); nothing of it
    /// is read meanwhile.
    dir_error: Option<String>,
}

impl Files {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: BTreeMap::new(),
            dir_error: None,
        }
    }

    /// The last valid versions kept in `store`; [`Files::reload`] then reads the directory.
    /// Kept versions are checked against `filter`, the agent's label filter (see
    /// [`super::Imports::load`]).
    pub fn load(dir: PathBuf, store: &Store, filter: &LabelFilter) -> Result<Self, StoreError> {
        let mut files = BTreeMap::new();
        for (name, stored) in store.file_copies()? {
            let path = dir.join(&name);
            // A version that holds no policy is never kept (see `read_one`): such a copy was
            // damaged, and what the file held cannot be known.
            let policies =
                stored.as_ref().map_err(Clone::clone).and_then(
                    |text| match policy::parse_str_with(&path.display().to_string(), text, filter) {
                        Ok(ps) if ps.is_empty() => Err(format!(
                            "the kept copy {} holds no policy: it was damaged",
                            store.dir().join("files").join(&name).display()
                        )),
                        Ok(ps) => Ok(ps),
                        Err(e) => Err(e.to_string()),
                    },
                );
            let text = stored.unwrap_or_default();
            if let Err(e) = &policies {
                error!(file = %path.display(), error = %e, "the stored last valid version of this policy file no longer parses");
            }
            files.insert(
                name,
                PolicyFile {
                    path,
                    modified: None,
                    in_force: Some(Version { text, policies }),
                    error: None,
                },
            );
        }
        Ok(Self {
            dir,
            files,
            dir_error: None,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory's policy files: file name → (path, stamp). `None` when the directory
    /// exists but cannot be read (then nothing changes); a missing directory is empty.
    fn listing(&self) -> Option<BTreeMap<String, (PathBuf, Stamp)>> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(BTreeMap::new()),
            Err(e) => {
                error!(dir = %self.dir.display(), error = %e, "cannot read the policy directory; its policies stay as they are");
                return None;
            }
        };
        let mut out = BTreeMap::new();
        for e in rd.flatten() {
            let p = e.path();
            let is_yaml = p.extension().is_some_and(|x| x == "yaml" || x == "yml");
            let Some(name) = p.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            // Whatever its type: a name that is not a regular file (any more) is a rejected
            // file, not a removed one (see `read_trusted`).
            if is_yaml && !name.starts_with('.') {
                let meta = std::fs::metadata(&p).ok();
                use std::os::unix::fs::MetadataExt;
                let stamp = (
                    meta.as_ref().and_then(|m| m.modified().ok()),
                    meta.as_ref().map_or(0, |m| m.len()),
                    meta.as_ref().map_or(0, |m| m.uid()),
                    meta.as_ref().map_or(0, |m| m.mode()),
                );
                out.insert(name, (p, stamp));
            }
        }
        Some(out)
    }

    /// Why the policy directory is not trusted now (`None`: it is, or does not exist). A
    /// symlink on its path that leads nowhere (a file system not mounted yet) is no empty
    /// directory: nothing in force changes, as for a file that is such a link.
    fn untrusted(&self) -> Option<String> {
        if !self.dir.exists() {
            let link = self
                .dir
                .ancestors()
                .find(|p| std::fs::symlink_metadata(p).is_ok())
                .filter(|p| std::fs::metadata(p).is_err())?;
            return Some(format!(
                "{}: cannot be read: {} is a symbolic link to nothing; nothing in it changes until it leads to the directory (remove the files there to remove their policies)",
                self.dir.display(),
                link.display()
            ));
        }
        crate::store::trusted_dir(&self.dir).err().map(|e| {
            format!(
                "{}: {e}: another user could change its policies; nothing in it is read until only root can write there",
                self.dir.display()
            )
        })
    }

    /// Whether a file was added, removed or modified since the last [`Files::reload`].
    pub fn changed(&self) -> bool {
        let untrusted = self.untrusted();
        if untrusted.is_some() || self.dir_error.is_some() {
            return untrusted != self.dir_error;
        }
        let Some(now) = self.listing() else {
            return false;
        };
        now.len() != self.files.len()
            || now
                .iter()
                .any(|(n, (_, m))| self.files.get(n).is_none_or(|f| f.modified != Some(*m)))
    }

    /// Re-reads the directory: new and modified files, and files rejected before (a name they
    /// wanted may be free now). `imported` says whether a policy name is taken by an imported
    /// policy. Returns the store errors (a valid version that could not be kept on disk still
    /// applies: the file itself is there).
    pub fn reload(
        &mut self,
        store: &Store,
        filter: &LabelFilter,
        imported: impl Fn(&str) -> bool,
    ) -> Vec<StoreError> {
        let mut store_errors = Vec::new();
        self.dir_error = self.untrusted();
        if let Some(e) = &self.dir_error {
            error!(error = %e, "policy directory not trusted; its policies stay as they are");
            for f in self.files.values_mut() {
                f.error = Some(e.clone());
            }
            return store_errors;
        }
        let Some(listing) = self.listing() else {
            return store_errors;
        };
        let gone: Vec<String> = self
            .files
            .keys()
            .filter(|n| !listing.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(f) = self.files.remove(&name) {
                info!(file = %f.path.display(), "policy file removed; its policies no longer apply");
            }
            if let Err(e) = store.delete_file_copy(&name) {
                store_errors.push(e);
            }
        }
        let mut changed = false;
        for (name, (path, stamp)) in &listing {
            if let Some(f) = self.files.get(name) {
                if f.modified == Some(*stamp) && f.error.is_none() {
                    continue;
                }
            }
            changed |= self.read_one(
                name,
                path,
                *stamp,
                store,
                filter,
                &imported,
                &mut store_errors,
            );
        }
        // A file rejected because another file's version in force used one of its names, which
        // that file gave up in this same pass (a policy moved between files): read it again, or
        // the policy would apply nowhere until the next change.
        for _ in 0..listing.len() {
            if !changed {
                break;
            }
            changed = false;
            for (name, (path, stamp)) in &listing {
                if self.files.get(name).is_some_and(|f| f.error.is_some()) {
                    changed |= self.read_one(
                        name,
                        path,
                        *stamp,
                        store,
                        filter,
                        &imported,
                        &mut store_errors,
                    );
                }
            }
        }
        store_errors
    }

    /// Reads file `name` and makes its version in force the file as it is, when valid. Returns
    /// whether the version in force changed.
    #[allow(clippy::too_many_arguments)]
    fn read_one(
        &mut self,
        name: &str,
        path: &Path,
        stamp: Stamp,
        store: &Store,
        filter: &LabelFilter,
        imported: &impl Fn(&str) -> bool,
        store_errors: &mut Vec<StoreError>,
    ) -> bool {
        let before = self.files.get(name).and_then(|f| f.in_force.clone());
        let file = path.display().to_string();
        // Bounded read of a file only root can have written; selectors checked against the
        // agent's label filter.
        let parsed = read_trusted(path).and_then(|text| {
            policy::parse_str_with(&file, &text, filter)
                .map(|policies| (text, policies))
                .map_err(|e| e.to_string())
        });
        let parsed = parsed.and_then(|(text, policies)| {
            self.check_names(name, &file, &policies, imported)?;
            Ok((text, policies))
        });
        let f = self.files.entry(name.to_owned()).or_insert(PolicyFile {
            path: path.to_owned(),
            modified: None,
            in_force: None,
            error: None,
        });
        f.modified = Some(stamp);
        match parsed {
            Ok((text, policies)) => {
                if f.in_force.as_ref().map(|v| &v.text) != Some(&text) {
                    // A version without policies keeps nothing in force: no copy (one that
                    // holds no policy is a damaged one).
                    let kept = if policies.is_empty() {
                        store.delete_file_copy(name).map(drop)
                    } else {
                        store.save_file_copy(name, &text)
                    };
                    if let Err(e) = kept {
                        error!(file = %file, error = %e, "keeping the last valid version of a policy file");
                        store_errors.push(e);
                    }
                }
                if f.error.take().is_some() {
                    info!(file = %file, "policy file accepted again");
                }
                f.in_force = Some(Version {
                    text,
                    policies: Ok(policies),
                });
            }
            Err(e) => {
                if f.error.as_ref() != Some(&e) {
                    if f.in_force.is_some() {
                        error!(file = %file, error = %e, "policy file rejected; its last valid version stays in force");
                    } else {
                        error!(file = %file, error = %e, "policy file rejected; it has no valid version, none of its policies apply");
                    }
                }
                f.error = Some(e);
            }
        }
        self.files.get(name).and_then(|f| f.in_force.clone()) != before
    }

    /// An error if a policy of file `name` uses a name that an imported policy or another
    /// file's version in force uses.
    fn check_names(
        &self,
        name: &str,
        file: &str,
        policies: &[Policy],
        imported: &impl Fn(&str) -> bool,
    ) -> Result<(), String> {
        let mut errors = Vec::new();
        for p in policies {
            if imported(&p.name) {
                errors.push(format!(
                    "{file}: metadata.name {:?} is already an imported policy (names are unique across files and imports)",
                    p.name
                ));
            } else if let Some((_, other)) = self.defined_by(&p.name).filter(|o| o.0 != name) {
                errors.push(format!(
                    "{file}: metadata.name {:?} is already defined by {} (names are unique across files and imports)",
                    p.name,
                    other.display()
                ));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("\n"))
        }
    }

    /// The file (name, path) whose version in force defines policy `policy`.
    pub fn defined_by(&self, policy: &str) -> Option<(&str, &Path)> {
        self.files.iter().find_map(|(n, f)| {
            let ps = f.in_force.as_ref()?.policies.as_ref().ok()?;
            ps.iter()
                .any(|p| p.name == policy)
                .then_some((n.as_str(), f.path.as_path()))
        })
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
            .filter_map(|v| v.policies.as_ref().ok())
            .flatten()
    }

    /// Files rejected as they are on disk: path → the error, and what is in force instead (the
    /// directory itself when it is not trusted).
    pub fn rejected(&self) -> BTreeMap<String, String> {
        let dir = self.dir_error.as_ref().map(|e| {
            (
                self.dir.display().to_string(),
                format!("{e} (the last valid version of each of its files stays in force)"),
            )
        });
        self.files
            .values()
            .filter_map(|f| {
                let e = f.error.as_ref()?;
                let instead = match &f.in_force {
                    Some(_) => "its last valid version stays in force",
                    None => "it has no valid version: none of its policies apply",
                };
                Some((f.path.display().to_string(), format!("{e} ({instead})")))
            })
            .chain(dir)
            .collect()
    }

    /// Files whose version in force is a stored copy that no longer parses (and that the file
    /// on disk does not replace): path → error.
    pub fn unparsable(&self) -> BTreeMap<String, String> {
        self.files
            .values()
            .filter_map(|f| {
                let e = f.in_force.as_ref()?.policies.as_ref().err()?;
                Some((f.path.display().to_string(), e.clone()))
            })
            .collect()
    }
}

/// The text of policy file `path`, when only root (or the agent's own user) can have written
/// it: a regular file (after symlinks), owned by root or us, not writable by group or others,
/// in a directory that no other user can write to ([`crate::store::trusted_dir`]). Opened
/// without blocking (a FIFO put there never hangs the agent) and checked on the open file, so
/// a swap after the check is read as what it is.
fn read_trusted(path: &Path) -> Result<String, String> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let shown = path.display();
    let real = crate::store::trusted_path(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            return format!("{shown}: not read: {e}: another user could change the file there");
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => format!(
                "{shown}: cannot be read: a symbolic link to nothing ({e}); remove the link to remove its policies"
            ),
            _ => format!("{shown}: cannot be read: {e}"),
        }
    })?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(&real)
        .map_err(|e| format!("{shown}: cannot be read: {e}"))?;
    let m = f
        .metadata()
        .map_err(|e| format!("{shown}: cannot be read: {e}"))?;
    let ft = m.file_type();
    if !ft.is_file() {
        let kind = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "a device"
        };
        return Err(format!(
            "{shown}: not a regular file ({kind}); remove it to remove its policies"
        ));
    }
    match crate::store::not_ours(&m, false) {
        Some(why @ crate::store::NotOurs::Owner(_)) => {
            return Err(format!(
                "{shown}: not read: {why}, not root: that user could open every container with it (chown root)"
            ))
        }
        Some(why) => {
            return Err(format!(
                "{shown}: not read: {why}: they could open every container with it (chmod go-w)"
            ))
        }
        None => {}
    }
    policy::read_from(path, f).map_err(|e| e.to_string())
}
