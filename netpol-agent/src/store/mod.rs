//! Durable state under `/var/lib/netpol/`, every write atomic: the new content goes to a temporary
//! file in the same directory, is fsynced, renamed over the old file, and the directory is fsynced.
//! A crash leaves either the old file or the new one, never half of one.
//!
//! Layout:
//! - `identities.json`: the identity allocator's state (numbers stable across restarts/reboots).
//! - `rule-ids.json`: the rule id table (`policy::rule_ids`: a rule's counters keep their number
//!   across compiles and restarts).
//! - `policies/<name>.yaml`: each imported policy, as the YAML document it was imported from.
//! - `files/<file name>`: the last valid version of each file of the policy directory, kept in
//!   force while the file itself does not parse (also across restarts).

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::{self, Write},
    path::{Path, PathBuf},
};

use serde::{de::DeserializeOwned, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: corrupt state: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("invalid policy name {0:?}: use letters, digits, '-', '_' and '.'")]
    BadName(String),
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Tests: a crash (a panic) before the `n`th durable write or removal from now (`crash_after`).
#[cfg(test)]
pub mod crash {
    use std::cell::Cell;

    thread_local!(static AFTER: Cell<Option<u32>> = const { Cell::new(None) });

    /// Panics at the `n`th step from now (0: the next one); `None`: never.
    pub fn crash_after(n: Option<u32>) {
        AFTER.with(|a| a.set(n));
    }

    pub(super) fn step() {
        AFTER.with(|a| match a.get() {
            Some(0) => {
                a.set(None);
                panic!("simulated crash");
            }
            Some(n) => a.set(Some(n - 1)),
            None => {}
        });
    }
}

/// The journal of a change of several imported policies (see [`Store::change_policies`]).
const POLICY_CHANGE: &str = "policies.pending.json";

/// Writes `data` to `path` atomically (temp file, fsync, rename, fsync of the directory). The
/// file is 0600 and a directory made for it 0700, whatever the umask (`run` started by hand
/// has the shell's, often 022): policies and identities are root's. The temporary is created
/// new (`O_EXCL`), never through what is already at its name.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    #[cfg(test)]
    crash::step();
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    // One left by an earlier process of this pid, killed mid-write.
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

/// Why what `m` describes is not root's (or this process's) alone: [`not_ours`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotOurs {
    /// Owned by this other user.
    Owner(u32),
    /// Writable by group or others, with these permission bits.
    Writable(u32),
}

impl std::fmt::Display for NotOurs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotOurs::Owner(uid) => write!(f, "owned by uid {uid}"),
            NotOurs::Writable(mode) => write!(f, "writable by other users (mode {mode:o})"),
        }
    }
}

/// Whether another user than root (or this process's) could change what `m` describes: it is
/// owned by another user, or writable by group or others (unless `sticky_ok` and it is sticky:
/// a directory such as `/tmp`, where others cannot remove or rename our entries). The one check
/// behind [`trusted_path`]'s directories, the state files and the policy files.
pub fn not_ours(m: &fs::Metadata, sticky_ok: bool) -> Option<NotOurs> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: plain libc call.
    let me = unsafe { libc::geteuid() };
    let mode = m.mode();
    if m.uid() != 0 && m.uid() != me {
        Some(NotOurs::Owner(m.uid()))
    } else if mode & 0o022 != 0 && !(sticky_ok && mode & 0o1000 != 0) {
        Some(NotOurs::Writable(mode & 0o7777))
    } else {
        None
    }
}

/// `dir` with every symlink resolved, when no user but root and this process's can replace
/// what is in it: [`trusted_path`] of a directory. Otherwise `PermissionDenied`, naming the
/// directory or link and why.
pub fn trusted_dir(dir: &Path) -> io::Result<PathBuf> {
    let real = trusted_path(dir)?;
    if !fs::metadata(&real)?.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
    }
    Ok(real)
}

/// `path` with every symlink resolved, one name at a time, when no user but root and this
/// process's can change what it names: every directory a name is looked up in (from `/` on,
/// also those a symlink leads through) and the directory it ends at are owned by root or by
/// us, and none is writable by group or others unless it is sticky (`/tmp`: others cannot
/// remove or rename our entries there); every symlink followed is owned by root or by us.
/// Checking only the resolved path would miss a link in a directory another user can write to:
/// they could point it at any file or directory root owns. What the path ends at, when not a
/// directory, is the caller's to check (on the file it opens). A missing name is `NotFound`.
pub fn trusted_path(path: &Path) -> io::Result<PathBuf> {
    use std::{ffi::OsString, os::unix::fs::MetadataExt, path::Component};
    // SAFETY: plain libc call.
    let me = unsafe { libc::geteuid() };
    let denied = |what: &Path, why: String| -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} {why}", what.display()),
        ))
    };
    let check_dir = |d: &Path, m: &fs::Metadata| match not_ours(m, true) {
        Some(why) => denied(d, format!("is {why}")),
        None => Ok(()),
    };
    // Names still to resolve, the next one last; `None` is `..`, an empty name `/`.
    let mut todo: Vec<Option<OsString>> = Vec::new();
    let push = |todo: &mut Vec<Option<OsString>>, p: &Path| {
        for c in p.components().rev() {
            match c {
                Component::RootDir => todo.push(Some(OsString::new())),
                Component::ParentDir => todo.push(None),
                Component::Normal(n) => todo.push(Some(n.to_owned())),
                Component::CurDir | Component::Prefix(_) => {}
            }
        }
    };
    push(&mut todo, &std::env::current_dir()?.join(path));
    let mut cur = PathBuf::from("/");
    let mut links = 0;
    while let Some(name) = todo.pop() {
        let Some(name) = name else {
            // `cur` holds no symlink: its parent is the one it was entered from.
            cur.pop();
            continue;
        };
        if name.is_empty() {
            cur = PathBuf::from("/");
            check_dir(&cur, &fs::metadata(&cur)?)?;
            continue;
        }
        let next = cur.join(&name);
        let m = fs::symlink_metadata(&next)?;
        if m.file_type().is_symlink() {
            if m.uid() != 0 && m.uid() != me {
                denied(
                    &next,
                    format!("is a symbolic link owned by uid {}", m.uid()),
                )?;
            }
            links += 1;
            if links > 40 {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            push(&mut todo, &fs::read_link(&next)?);
            continue;
        }
        if m.is_dir() {
            check_dir(&next, &m)?;
        } else if !todo.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        cur = next;
    }
    Ok(cur)
}

/// Whether `name` can be a file name under `policies/`.
pub fn valid_policy_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub const DEFAULT_DIR: &'static str = "/var/lib/netpol";

    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether only root (or the agent's own user) can change what the store holds: the state
    /// directory (before it exists, the nearest one above it) and its `policies/` and `files/`
    /// pass [`trusted_dir`]. Another user who could write there could plant an imported policy
    /// or a policy file's last valid version, read at the next start: `PermissionDenied`.
    pub fn check_trusted(&self) -> Result<(), StoreError> {
        let existing = self
            .dir
            .ancestors()
            .find(|p| !p.as_os_str().is_empty() && fs::symlink_metadata(p).is_ok())
            .unwrap_or(Path::new("."));
        let subs = [self.policies_dir(), self.files_dir()];
        let present = subs.iter().filter(|d| fs::symlink_metadata(d).is_ok());
        for d in std::iter::once(existing).chain(present.map(PathBuf::as_path)) {
            trusted_dir(d).map_err(|e| {
                io_err(d)(io::Error::new(
                    e.kind(),
                    format!("{e}: another user could plant policies in the agent's state; make it root's alone (chown root, chmod go-w)"),
                ))
            })?;
        }
        Ok(())
    }

    fn policies_dir(&self) -> PathBuf {
        self.dir.join("policies")
    }

    fn read_json<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let path = self.dir.join(name);
        match read_ours(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Corrupt { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }

    fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StoreError> {
        let path = self.dir.join(name);
        let data = serde_json::to_vec_pretty(value).map_err(|source| StoreError::Corrupt {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &data)
    }

    pub fn load_identities<T: DeserializeOwned>(&self) -> Result<Option<T>, StoreError> {
        self.read_json("identities.json")
    }

    pub fn save_identities<T: Serialize>(&self, state: &T) -> Result<(), StoreError> {
        self.write_json("identities.json", state)
    }

    /// The rule id table (`policy::rule_ids`).
    pub fn load_rule_ids<T: DeserializeOwned>(&self) -> Result<Option<T>, StoreError> {
        self.read_json("rule-ids.json")
    }

    pub fn save_rule_ids<T: Serialize>(&self, state: &T) -> Result<(), StoreError> {
        self.write_json("rule-ids.json", state)
    }

    /// Moves the state file `name` aside, to `<name>.<tag>` (`.1`, `.2`, … appended when that
    /// exists: an earlier one is never replaced), and returns where it went; `None` when there
    /// was no such file. For a damaged file that the agent replaces: it is kept for whoever
    /// investigates, and no later write goes over it.
    pub fn set_aside(&self, name: &str, tag: &str) -> Result<Option<PathBuf>, StoreError> {
        let from = self.dir.join(name);
        if fs::symlink_metadata(&from).is_err() {
            return Ok(None);
        }
        let to = (0u32..)
            .map(|n| match n {
                0 => self.dir.join(format!("{name}.{tag}")),
                n => self.dir.join(format!("{name}.{tag}.{n}")),
            })
            .find(|p| fs::symlink_metadata(p).is_err())
            .unwrap_or_else(|| self.dir.join(format!("{name}.{tag}")));
        fs::rename(&from, &to).map_err(io_err(&from))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))?;
        Ok(Some(to))
    }

    fn files_dir(&self) -> PathBuf {
        self.dir.join("files")
    }

    /// Every imported policy: name → the YAML document it was imported from (`Err`: why the
    /// file cannot be read as text; it is still a stored policy).
    pub fn policies(&self) -> Result<BTreeMap<String, Stored>, StoreError> {
        let mut out = BTreeMap::new();
        for (file, text) in read_texts(&self.policies_dir())? {
            if let Some(name) = file.strip_suffix(".yaml").filter(|n| valid_policy_name(n)) {
                out.insert(name.to_owned(), text);
            }
        }
        Ok(out)
    }

    /// The last valid version of each policy file: file name → text (`Err`: see
    /// [`Store::policies`]).
    pub fn file_copies(&self) -> Result<BTreeMap<String, Stored>, StoreError> {
        Ok(read_texts(&self.files_dir())?
            .into_iter()
            .filter(|(f, _)| valid_file_name(f))
            .collect())
    }

    /// Keeps `text` as the last valid version of the policy file `file_name`.
    pub fn save_file_copy(&self, file_name: &str, text: &str) -> Result<(), StoreError> {
        if !valid_file_name(file_name) {
            return Err(StoreError::BadName(file_name.to_owned()));
        }
        write_atomic(&self.files_dir().join(file_name), text.as_bytes())
    }

    /// Forgets the last valid version of `file_name` (the file was removed).
    pub fn delete_file_copy(&self, file_name: &str) -> Result<bool, StoreError> {
        if !valid_file_name(file_name) {
            return Err(StoreError::BadName(file_name.to_owned()));
        }
        remove_synced(&self.files_dir(), &self.files_dir().join(file_name))
    }

    /// Changes several imported policies as one: each name to its new text, `None` deleting
    /// it. A change of more than one file is first written whole to a journal (atomically),
    /// and removed once every file is written: a crash part way leaves the journal, which
    /// [`Store::finish_policy_change`] completes at the next start, so the store never holds
    /// half of a change (an import that moves a deny rule from one policy to another must not
    /// come back with neither).
    pub fn change_policies(
        &self,
        change: &BTreeMap<String, Option<String>>,
    ) -> Result<(), StoreError> {
        if let Some(bad) = change.keys().find(|n| !valid_policy_name(n)) {
            return Err(StoreError::BadName(bad.clone()));
        }
        let journal = self.dir.join(POLICY_CHANGE);
        // One file is written atomically by itself; a journal left by a change whose removal
        // failed is replaced, never replayed later over this change.
        let journaled = change.len() > 1 || fs::symlink_metadata(&journal).is_ok();
        if journaled {
            self.write_json(POLICY_CHANGE, change)?;
        }
        self.apply_policy_change(change)?;
        if journaled {
            remove_synced(&self.dir, &journal)?;
        }
        Ok(())
    }

    /// Whether the journal of a change of imported policies is there: a change that did not
    /// complete (see [`Store::change_policies`]).
    pub fn policy_change_pending(&self) -> bool {
        fs::symlink_metadata(self.dir.join(POLICY_CHANGE)).is_ok()
    }

    fn apply_policy_change(
        &self,
        change: &BTreeMap<String, Option<String>>,
    ) -> Result<(), StoreError> {
        for (name, text) in change {
            match text {
                Some(t) => self.save_policy(name, t)?,
                None => {
                    self.delete_policy(name)?;
                }
            }
        }
        Ok(())
    }

    /// Completes a change of imported policies that a crash interrupted (see
    /// [`Store::change_policies`]); whether there was one. A journal that does not parse is an
    /// error: it was written atomically, so it is damage, and which change it held is unknown.
    pub fn finish_policy_change(&self) -> Result<bool, StoreError> {
        let Some(change) = self.read_json::<BTreeMap<String, Option<String>>>(POLICY_CHANGE)?
        else {
            return Ok(false);
        };
        if let Some(bad) = change.keys().find(|n| !valid_policy_name(n)) {
            return Err(StoreError::BadName(bad.clone()));
        }
        self.apply_policy_change(&change)?;
        remove_synced(&self.dir, &self.dir.join(POLICY_CHANGE))?;
        Ok(true)
    }

    pub fn save_policy(&self, name: &str, yaml: &str) -> Result<(), StoreError> {
        if !valid_policy_name(name) {
            return Err(StoreError::BadName(name.to_owned()));
        }
        write_atomic(
            &self.policies_dir().join(format!("{name}.yaml")),
            yaml.as_bytes(),
        )
    }

    /// Returns whether the policy existed.
    pub fn delete_policy(&self, name: &str) -> Result<bool, StoreError> {
        if !valid_policy_name(name) {
            return Err(StoreError::BadName(name.to_owned()));
        }
        let path = self.policies_dir().join(format!("{name}.yaml"));
        remove_synced(&self.policies_dir(), &path)
    }
}

/// The bytes of state file `path`, unless another user than root (or ours) could have written
/// it: owned by another user, or writable by group or others (`PermissionDenied`). The state
/// directory itself is checked at start ([`Store::check_trusted`]); a file in it with such a
/// mode or owner (copied in, or made by hand) is not vouched for either, and is read as damaged:
/// an imported policy or a kept copy then leaves the maps as they are, a table is set aside.
fn read_ours(path: &Path) -> io::Result<Vec<u8>> {
    let Some(why) = not_ours(&fs::metadata(path)?, false) else {
        return fs::read(path);
    };
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{why}: another user could have written it"),
    ))
}

/// A file name for `files/`: one path component, not hidden.
fn valid_file_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains('/') && name != ".."
}

/// A stored text, or why its file cannot be read as one (an I/O error, not UTF-8): that file
/// is damaged, not absent, and must not be taken for no file at all.
pub type Stored = Result<String, String>;

/// Every regular file of `dir` (none if it does not exist): file name → text. A directory that
/// cannot be listed is an error: which files it holds is unknown.
fn read_texts(dir: &Path) -> Result<BTreeMap<String, Stored>, StoreError> {
    let mut out = BTreeMap::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => {
            return Err(StoreError::Io {
                path: dir.to_path_buf(),
                source: e,
            })
        }
    };
    for entry in rd {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        // Temporaries of an interrupted write_atomic.
        if name.starts_with('.') || !path.is_file() {
            continue;
        }
        let text = match read_ours(&path) {
            Ok(bytes) => String::from_utf8(bytes).map_err(|e| {
                format!(
                    "{}: not UTF-8 text (byte {}): the file is damaged",
                    path.display(),
                    e.utf8_error().valid_up_to()
                )
            }),
            Err(e) => Err(format!("{}: cannot be read: {e}", path.display())),
        };
        out.insert(name.to_owned(), text);
    }
    Ok(out)
}

/// Removes `path` and fsyncs `dir`; whether the file existed.
fn remove_synced(dir: &Path, path: &Path) -> Result<bool, StoreError> {
    #[cfg(test)]
    crash::step();
    match fs::remove_file(path) {
        Ok(()) => {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(dir))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StoreError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "netpol-store-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn policies_round_trip_and_delete() {
        let d = tmp();
        let s = Store::new(&d);
        assert!(s.policies().unwrap().is_empty());
        s.save_policy("db-ingress", "kind: CiliumNetworkPolicy\n")
            .unwrap();
        s.save_policy("web", "x: 1\n").unwrap();
        let p = s.policies().unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            p["db-ingress"].as_deref(),
            Ok("kind: CiliumNetworkPolicy\n")
        );
        assert!(s.delete_policy("web").unwrap());
        assert!(!s.delete_policy("web").unwrap());
        assert_eq!(s.policies().unwrap().len(), 1);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn file_copies_round_trip_and_delete() {
        let d = tmp();
        let s = Store::new(&d);
        assert!(s.file_copies().unwrap().is_empty());
        s.save_file_copy("db.yaml", "a: 1\n").unwrap();
        s.save_file_copy("web.yml", "b: 2\n").unwrap();
        assert_eq!(s.file_copies().unwrap()["db.yaml"].as_deref(), Ok("a: 1\n"));
        // A damaged copy is there, as damaged.
        fs::write(d.join("files/web.yml"), b"\xff\xfe").unwrap();
        let e = s.file_copies().unwrap()["web.yml"].clone().unwrap_err();
        assert!(e.contains("not UTF-8"), "{e}");
        fs::write(d.join("files/web.yml"), "b: 2\n").unwrap();
        assert!(s.delete_file_copy("web.yml").unwrap());
        assert!(!s.delete_file_copy("web.yml").unwrap());
        assert_eq!(s.file_copies().unwrap().len(), 1);
        for bad in ["../x", "a/b", "", ".hidden"] {
            assert!(
                matches!(s.save_file_copy(bad, ""), Err(StoreError::BadName(_))),
                "{bad}"
            );
        }
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn rejects_names_that_escape_the_directory() {
        let s = Store::new(tmp());
        for bad in ["../x", "a/b", "", ".hidden", "a b"] {
            assert!(
                matches!(s.save_policy(bad, ""), Err(StoreError::BadName(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn atomic_write_replaces_whole_file_and_leaves_no_temporary() {
        let d = tmp();
        let s = Store::new(&d);
        s.save_identities(&vec![1u32, 2, 3]).unwrap();
        s.save_identities(&vec![4u32]).unwrap();
        assert_eq!(s.load_identities::<Vec<u32>>().unwrap(), Some(vec![4]));
        let leftovers: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty());
        fs::remove_dir_all(&d).unwrap();
    }

    /// trusted_path resolves links one at a time: `..` after a link is taken in the directory
    /// the link led to; a link another user owns (they can replace it in a sticky directory)
    /// or in a directory others can write to is refused, whatever it leads to; a loop ends.
    #[test]
    fn trusted_path_checks_every_link_and_directory_on_the_way() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let d = tmp();
        fs::create_dir_all(d.join("a/b")).unwrap();
        fs::write(d.join("a/f.yaml"), "x").unwrap();
        symlink(d.join("a/b"), d.join("lb")).unwrap();
        let real = fs::canonicalize(d.join("a/f.yaml")).unwrap();
        assert_eq!(trusted_path(&d.join("lb/../f.yaml")).unwrap(), real);
        assert_eq!(
            trusted_dir(&d.join("lb")).unwrap(),
            real.parent().unwrap().join("b")
        );
        assert!(trusted_dir(&d.join("a/f.yaml")).is_err(), "not a directory");
        assert_eq!(
            trusted_path(&d.join("gone")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        symlink(d.join("loop"), d.join("loop")).unwrap();
        assert!(trusted_path(&d.join("loop")).is_err());
        // A sticky directory others can write to: our entries in it are trusted.
        let sticky = d.join("sticky");
        fs::create_dir(&sticky).unwrap();
        fs::set_permissions(&sticky, fs::Permissions::from_mode(0o1777)).unwrap();
        symlink(d.join("a/f.yaml"), sticky.join("l.yaml")).unwrap();
        assert_eq!(trusted_path(&sticky.join("l.yaml")).unwrap(), real);
        // SAFETY: plain libc call.
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::lchown(sticky.join("l.yaml"), Some(65534), None).unwrap();
            let e = trusted_path(&sticky.join("l.yaml")).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
            assert!(
                e.to_string().contains("symbolic link owned by uid 65534"),
                "{e}"
            );
        }
        fs::set_permissions(&sticky, fs::Permissions::from_mode(0o777)).unwrap();
        let e = trusted_path(&sticky.join("l.yaml")).unwrap_err();
        assert!(e.to_string().contains("writable by other users"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    /// What the agent writes is root's alone, whatever the umask it was started with.
    #[test]
    fn state_files_are_0600_in_0700_directories() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
        let d = tmp();
        let s = Store::new(&d);
        s.save_identities(&vec![1u32]).unwrap();
        s.save_policy("db", "x: 1\n").unwrap();
        s.save_file_copy("db.yaml", "x: 1\n").unwrap();
        assert_eq!(mode(&d), 0o700);
        for f in ["identities.json", "policies/db.yaml", "files/db.yaml"] {
            assert_eq!(mode(&d.join(f)), 0o600, "{f}");
        }
        for sub in ["policies", "files"] {
            assert_eq!(mode(&d.join(sub)), 0o700, "{sub}");
        }
        // A symlink planted at the temporary's name is not written through.
        let victim = d.join("victim");
        fs::write(&victim, "keep").unwrap();
        let tmp_name = d.join(format!(".identities.json.tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp_name).unwrap();
        s.save_identities(&vec![2u32]).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(s.load_identities::<Vec<u32>>().unwrap(), Some(vec![2]));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_file_set_aside_never_replaces_one_set_aside_before() {
        let d = tmp();
        let s = Store::new(&d);
        assert_eq!(s.set_aside("identities.json", "damaged-x").unwrap(), None);
        for (n, text) in ["one", "two", "three"].iter().enumerate() {
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("identities.json"), text).unwrap();
            let kept = s
                .set_aside("identities.json", "damaged-x")
                .unwrap()
                .unwrap();
            let want = match n {
                0 => "identities.json.damaged-x".to_owned(),
                n => format!("identities.json.damaged-x.{n}"),
            };
            assert_eq!(kept, d.join(want));
            assert!(!d.join("identities.json").exists());
        }
        assert_eq!(
            fs::read_to_string(d.join("identities.json.damaged-x")).unwrap(),
            "one"
        );
        assert_eq!(
            fs::read_to_string(d.join("identities.json.damaged-x.2")).unwrap(),
            "three"
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_policy_change_journal_is_completed_and_a_damaged_one_is_an_error() {
        let d = tmp();
        let s = Store::new(&d);
        s.save_policy("a", "old\n").unwrap();
        s.save_policy("gone", "x\n").unwrap();
        let change = BTreeMap::from([
            ("a".to_owned(), Some("new\n".to_owned())),
            ("b".to_owned(), Some("new\n".to_owned())),
            ("gone".to_owned(), None),
        ]);
        // As a crash right after the journal was written leaves it.
        s.write_json(POLICY_CHANGE, &change).unwrap();
        assert!(s.finish_policy_change().unwrap());
        let p = s.policies().unwrap();
        assert_eq!(p.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(p["a"].as_deref(), Ok("new\n"));
        assert!(!d.join(POLICY_CHANGE).exists());
        assert!(!s.finish_policy_change().unwrap());
        fs::write(d.join(POLICY_CHANGE), b"{\"a\": ").unwrap();
        assert!(matches!(
            s.finish_policy_change(),
            Err(StoreError::Corrupt { .. })
        ));
        fs::remove_dir_all(&d).unwrap();
    }

    /// A stored file that another user could have written is read as damaged, never as a
    /// policy or a table.
    #[test]
    fn a_state_file_another_user_could_write_is_damaged() {
        use std::os::unix::fs::PermissionsExt;
        let chmod =
            |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
        let d = tmp();
        let s = Store::new(&d);
        s.save_policy("db", "x: 1\n").unwrap();
        s.save_file_copy("db.yaml", "x: 1\n").unwrap();
        s.save_identities(&vec![1u32]).unwrap();
        chmod(&d.join("policies/db.yaml"), 0o666);
        chmod(&d.join("files/db.yaml"), 0o620);
        chmod(&d.join("identities.json"), 0o646);
        let e = s.policies().unwrap()["db"].clone().unwrap_err();
        assert!(e.contains("writable by other users"), "{e}");
        let e = s.file_copies().unwrap()["db.yaml"].clone().unwrap_err();
        assert!(e.contains("writable by other users"), "{e}");
        let e = s.load_identities::<Vec<u32>>().unwrap_err();
        assert!(e.to_string().contains("writable by other users"), "{e}");
        // SAFETY: plain libc call.
        if unsafe { libc::geteuid() } == 0 {
            chmod(&d.join("policies/db.yaml"), 0o600);
            std::os::unix::fs::chown(d.join("policies/db.yaml"), Some(65534), None).unwrap();
            let e = s.policies().unwrap()["db"].clone().unwrap_err();
            assert!(e.contains("owned by uid 65534"), "{e}");
        }
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn corrupt_state_is_an_error_not_an_empty_state() {
        let d = tmp();
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("identities.json"), b"{not json").unwrap();
        assert!(matches!(
            Store::new(&d).load_identities::<Vec<u32>>(),
            Err(StoreError::Corrupt { .. })
        ));
        fs::remove_dir_all(&d).unwrap();
    }
}
