//! Label sets → stable security identity numbers.
//!
//! - [`LabelFilter`] keeps a container's security-relevant labels: all Docker labels minus a
//!   built-in list of volatile ones ([`BUILTIN_IGNORED`]) and any extra configured patterns
//!   (an exact key, or a prefix ending in `*`).
//! - [`IdentityAllocator`] gives equal label sets one number. Its [`AllocatorState`] is what the
//!   store persists; [`IdentityAllocator::load`] takes it back, so numbers survive restarts.
//!   Numbers are never handed out twice while the state still names them: the allocator counts
//!   upwards and only wraps around (to the lowest number not in the state) once the label range
//!   is used up.
//! - [`display_name`] names an identity for tables and the monitor.
//!
//! Reserved numbers come from `netpol_common::identity` (0 any, 1 host, 2 world, 3 unmanaged);
//! label identities use `FIRST_LABEL..FIRST_CIDR`, and the policy compiler's CIDR identities
//! start at [`FIRST_CIDR`].

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

pub use netpol_common::identity::FIRST_CIDR;
use netpol_common::identity::{reserved_name, FIRST_LABEL};
use serde::{Deserialize, Serialize};

/// A label set: Docker label key → value, ordered so that equal sets compare and hash equal.
pub type Labels = BTreeMap<String, String>;

/// Last number a label identity can get.
pub const LAST_LABEL: u32 = FIRST_CIDR - 1;

/// Compose label with the project name.
pub const COMPOSE_PROJECT: &str = "com.docker.compose.project";
/// Compose label with the service name.
pub const COMPOSE_SERVICE: &str = "com.docker.compose.service";

/// Labels the compose shorthand's selectors use: they must stay part of identities.
pub const SHORTHAND_LABELS: &[&str] = &[COMPOSE_PROJECT, COMPOSE_SERVICE];

/// Prefix of the labels that carry policy (the compose shorthand, `netpol.ingress` /
/// `netpol.egress`).
pub const NETPOL_LABEL_PREFIX: &str = "netpol.";

/// The `netpol.*` labels among `labels`.
pub fn netpol_labels(labels: &Labels) -> Labels {
    labels
        .iter()
        .filter(|(k, _)| k.starts_with(NETPOL_LABEL_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Labels that never take part in an identity: they change with every deploy, rebuild or
/// replica without changing what the container is. `*` at the end matches any suffix.
///
/// `netpol.*` labels are not filtered here: a container's own ones are part of its identity, so
/// that the policy of its labels selects only containers with the same labels, and those its
/// image brought are not (`policy::sources::labels::identity_labels` decides).
pub const BUILTIN_IGNORED: &[&str] = &[
    "com.docker.compose.config-hash",
    "com.docker.compose.container-number",
    "com.docker.compose.version",
    "com.docker.compose.oneoff",
    "com.docker.compose.depends_on",
    "com.docker.compose.image",
    "com.docker.compose.replace",
    "com.docker.compose.project.config_files",
    "com.docker.compose.project.working_dir",
    "com.docker.compose.project.environment_file",
    "com.docker.compose.slug",
    "com.docker.desktop.*",
    "desktop.docker.io/*",
    "org.opencontainers.image.*",
    "org.label-schema.*",
    "io.buildah.version",
    "com.redhat.build-host",
    "build-date",
    "vcs-ref",
    "maintainer",
];

/// One ignore pattern: an exact key, or a prefix (`foo.*` matches every key starting `foo.`).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn parse(p: &str) -> Self {
        match p.strip_suffix('*') {
            Some(prefix) => Pattern::Prefix(prefix.to_owned()),
            None => Pattern::Exact(p.to_owned()),
        }
    }

    fn matches(&self, key: &str) -> bool {
        match self {
            Pattern::Exact(k) => k == key,
            Pattern::Prefix(p) => key.starts_with(p.as_str()),
        }
    }
}

/// Picks the security-relevant labels out of a container's Docker labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelFilter {
    ignored: Vec<Pattern>,
}

impl Default for LabelFilter {
    fn default() -> Self {
        Self::new(std::iter::empty::<&str>())
    }
}

impl LabelFilter {
    /// The built-in list plus `extra` patterns (exact keys, or prefixes ending in `*`).
    pub fn new<I, S>(extra: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut ignored: Vec<Pattern> = BUILTIN_IGNORED.iter().map(|p| Pattern::parse(p)).collect();
        ignored.extend(extra.into_iter().map(|p| Pattern::parse(p.as_ref().trim())));
        Self { ignored }
    }

    /// [`LabelFilter::new`] for the agent's `--ignore-label`s, refusing a pattern that would
    /// remove a label the compose shorthand selects on ([`SHORTHAND_LABELS`]): every label
    /// policy would then select nothing, and its container would run unrestricted.
    pub fn checked<I, S>(extra: I) -> Result<Self, IdentityError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let extra: Vec<String> = extra.into_iter().map(|p| p.as_ref().to_owned()).collect();
        for p in &extra {
            let pattern = Pattern::parse(p.trim());
            if let Some(label) = SHORTHAND_LABELS.iter().find(|l| pattern.matches(l)) {
                return Err(IdentityError::IgnoresShorthandLabel {
                    pattern: p.clone(),
                    label,
                });
            }
        }
        Ok(Self::new(extra))
    }

    /// Whether `key` is left out of identities.
    pub fn ignores(&self, key: &str) -> bool {
        self.ignored.iter().any(|p| p.matches(key))
    }

    /// The labels that make up the identity.
    pub fn filter(&self, labels: &Labels) -> Labels {
        labels
            .iter()
            .filter(|(k, _)| !self.ignores(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("persisted identity {0} is outside the label range {FIRST_LABEL}..={LAST_LABEL}")]
    OutOfRange(u32),
    #[error("persisted identities {first} and {second} have the same labels")]
    DuplicateLabels { first: u32, second: u32 },
    #[error("every label identity number ({FIRST_LABEL}..={LAST_LABEL}) is in use")]
    Exhausted,
    #[error("--ignore-label {pattern:?} would leave {label} out of identities, and the compose shorthand (netpol.* labels) selects containers by it: no label policy could match")]
    IgnoresShorthandLabel {
        pattern: String,
        label: &'static str,
    },
}

/// The allocator's persisted form. A field it does not know makes it another file (another
/// table's, a wrapped or future form): an error, so that the agent keeps it aside instead of
/// taking it for an empty table and writing over it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AllocatorState {
    /// The next number to try (0 or absent: [`FIRST_LABEL`]).
    pub next: u32,
    /// Every identity handed out and not released. A number or a label key given twice is an
    /// error, not the last one's (JSON parsers keep that): one of the two holders would
    /// silently get the other's number.
    #[serde(deserialize_with = "unique_identities")]
    pub identities: BTreeMap<u32, Labels>,
}

/// A JSON object into a map, refusing a key given twice.
struct UniqueMap<K, V>(BTreeMap<K, V>);

impl<'de, K, V> Deserialize<'de> for UniqueMap<K, V>
where
    K: Deserialize<'de> + Ord + std::fmt::Debug,
    V: Deserialize<'de>,
{
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<K, V>(std::marker::PhantomData<(K, V)>);
        impl<'de, K, V> serde::de::Visitor<'de> for Visit<K, V>
        where
            K: Deserialize<'de> + Ord + std::fmt::Debug,
            V: Deserialize<'de>,
        {
            type Value = UniqueMap<K, V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map without repeated keys")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = m.next_entry::<K, V>()? {
                    if out.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!("{k:?} appears twice")));
                    }
                    out.insert(k, v);
                }
                Ok(UniqueMap(out))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

fn unique_identities<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<u32, Labels>, D::Error> {
    let m = UniqueMap::<u32, UniqueMap<String, String>>::deserialize(d)?;
    Ok(m.0.into_iter().map(|(id, l)| (id, l.0)).collect())
}

/// Equal label sets → one identity, stable across restarts through [`AllocatorState`].
#[derive(Clone, Debug, Default)]
pub struct IdentityAllocator {
    next: u32,
    /// Both maps hold the same label sets (one allocation each, shared: a host with many
    /// compose services has as many label sets).
    by_id: BTreeMap<u32, Arc<Labels>>,
    by_labels: BTreeMap<Arc<Labels>, u32>,
    /// Numbers never handed out to a new label set ([`IdentityAllocator::avoid`]); not persisted.
    avoided: BTreeSet<u32>,
}

impl IdentityAllocator {
    /// An empty allocator (first identity [`FIRST_LABEL`]).
    pub fn new() -> Self {
        Self {
            next: FIRST_LABEL,
            ..Self::default()
        }
    }

    /// Takes back persisted state, refusing numbers outside the label range and two numbers for
    /// one label set.
    pub fn load(state: AllocatorState) -> Result<Self, IdentityError> {
        let mut a = Self::new();
        for (id, labels) in state.identities {
            if !(FIRST_LABEL..=LAST_LABEL).contains(&id) {
                return Err(IdentityError::OutOfRange(id));
            }
            if let Some(&first) = a.by_labels.get(&labels) {
                return Err(IdentityError::DuplicateLabels { first, second: id });
            }
            let labels = Arc::new(labels);
            a.by_labels.insert(labels.clone(), id);
            a.by_id.insert(id, labels);
        }
        let after_last = a
            .by_id
            .keys()
            .next_back()
            .map_or(FIRST_LABEL, |&l| l.saturating_add(1));
        a.next = if (FIRST_LABEL..=LAST_LABEL).contains(&state.next) {
            state.next.max(after_last)
        } else {
            after_last
        };
        Ok(a)
    }

    /// The state to persist.
    pub fn state(&self) -> AllocatorState {
        AllocatorState {
            next: self.next,
            identities: self
                .by_id
                .iter()
                .map(|(&id, l)| (id, Labels::clone(l)))
                .collect(),
        }
    }

    /// The identity of `labels` (already filtered by a [`LabelFilter`]), allocating one if the set
    /// is new. Returns the number and whether it was newly allocated (the state changed).
    pub fn allocate(&mut self, labels: &Labels) -> Result<(u32, bool), IdentityError> {
        if let Some(&id) = self.by_labels.get(labels) {
            return Ok((id, false));
        }
        let id = self.free_number()?;
        self.next = id.saturating_add(1);
        let labels = Arc::new(labels.clone());
        self.by_labels.insert(labels.clone(), id);
        self.by_id.insert(id, labels);
        Ok((id, true))
    }

    fn free_number(&self) -> Result<u32, IdentityError> {
        let start = if (FIRST_LABEL..=LAST_LABEL).contains(&self.next) {
            self.next
        } else {
            FIRST_LABEL
        };
        (start..=LAST_LABEL)
            .chain(FIRST_LABEL..start)
            .find(|n| !self.by_id.contains_key(n) && !self.avoided.contains(n))
            .ok_or(IdentityError::Exhausted)
    }

    /// Never hands out `numbers` to a new label set (a label set the table already gives one of
    /// them keeps it): the label identities the maps hold at start, which the table may not
    /// vouch for (lost, damaged, or a write lost after the maps). [`Self::raise_next`] keeps new
    /// numbers above them as long as there is room above; once the counter wraps around (the
    /// maps hold the last label number) this is what keeps them from being given out again.
    pub fn avoid(&mut self, numbers: impl IntoIterator<Item = u32>) {
        self.avoided.extend(numbers);
    }

    /// Makes `floor` and the numbers above it the ones new label sets get first (never lowers
    /// the next number; a floor outside the label range changes nothing). Whether it moved.
    pub fn raise_next(&mut self, floor: u32) -> bool {
        if (FIRST_LABEL..=LAST_LABEL).contains(&floor) && floor > self.next {
            self.next = floor;
            return true;
        }
        false
    }

    /// The identity of `labels`, if allocated.
    pub fn lookup(&self, labels: &Labels) -> Option<u32> {
        self.by_labels.get(labels).copied()
    }

    /// The labels of identity `id`, if it is a label identity in use.
    pub fn labels(&self, id: u32) -> Option<&Labels> {
        self.by_id.get(&id).map(|l| &**l)
    }

    /// Forgets `id`. Its number is not handed out again until the counter wraps around.
    pub fn release(&mut self, id: u32) -> Option<Labels> {
        let labels = self.by_id.remove(&id)?;
        self.by_labels.remove(&labels);
        Some(Arc::try_unwrap(labels).unwrap_or_else(|shared| Labels::clone(&shared)))
    }

    /// Releases every identity for which `in_use` is false; returns the released numbers.
    pub fn retain(&mut self, mut in_use: impl FnMut(u32) -> bool) -> Vec<u32> {
        let gone: Vec<u32> = self
            .by_id
            .keys()
            .copied()
            .filter(|&id| !in_use(id))
            .collect();
        for &id in &gone {
            self.release(id);
        }
        gone
    }

    /// Every allocated identity with its labels, by number.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Labels)> {
        self.by_id.iter().map(|(&id, l)| (id, &**l))
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// Longest label list shown by [`display_name`] before it is cut.
const DISPLAY_MAX: usize = 48;

/// A short name for an identity: the reserved name, `project/service` for a compose container,
/// else `key=value,…` (cut at about 48 characters), else `id:<n>`. `labels` are the identity's
/// labels when it is a label identity.
pub fn display_name(id: u32, labels: Option<&Labels>) -> String {
    if let Some(name) = reserved_name(id) {
        return name.to_owned();
    }
    let Some(labels) = labels else {
        return format!("id:{id}");
    };
    if let Some(service) = labels.get(COMPOSE_SERVICE) {
        return match labels.get(COMPOSE_PROJECT) {
            Some(project) => format!("{project}/{service}"),
            None => service.clone(),
        };
    }
    if labels.is_empty() {
        return format!("id:{id}");
    }
    let mut out = String::new();
    for (k, v) in labels {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(k);
        if !v.is_empty() {
            out.push('=');
            out.push_str(v);
        }
        if out.chars().count() > DISPLAY_MAX {
            let cut: String = out.chars().take(DISPLAY_MAX).collect();
            return format!("{cut}…");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn volatile_labels_are_filtered_out() {
        let f = LabelFilter::default();
        let l = labels(&[
            ("com.docker.compose.project", "shop"),
            ("com.docker.compose.service", "db"),
            ("com.docker.compose.config-hash", "abc"),
            ("com.docker.compose.container-number", "1"),
            ("com.docker.compose.version", "2.20"),
            ("com.docker.compose.oneoff", "False"),
            ("com.docker.compose.depends_on", ""),
            ("com.docker.compose.image", "sha256:1"),
            ("com.docker.compose.replace", "x"),
            ("com.docker.compose.project.config_files", "/a.yml"),
            ("com.docker.compose.project.working_dir", "/a"),
            ("org.opencontainers.image.version", "1.2"),
            ("org.opencontainers.image.source", "x"),
            ("netpol.ingress", "app1:5432"),
            ("tier", "data"),
        ]);
        assert_eq!(
            f.filter(&l),
            labels(&[
                ("com.docker.compose.project", "shop"),
                ("com.docker.compose.service", "db"),
                ("netpol.ingress", "app1:5432"),
                ("tier", "data"),
            ]),
            "netpol.* labels are kept (policy::sources::labels decides which count)"
        );
    }

    #[test]
    fn ignore_patterns_may_not_remove_the_shorthand_labels() {
        for bad in [
            "com.docker.compose.service",
            "com.docker.compose.project",
            "com.docker.compose.*",
            "com.docker.*",
            "*",
            " com.docker.compose.project ",
        ] {
            let e = LabelFilter::checked(["team", bad]).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!(
                    "--ignore-label {bad:?} would leave com.docker.compose."
                )),
                "{e}"
            );
        }
        let f =
            LabelFilter::checked(["team", "com.docker.compose.project.extra", "build.*"]).unwrap();
        assert!(f.ignores("team") && f.ignores("build.id"));
        assert!(!f.ignores(COMPOSE_PROJECT) && !f.ignores(COMPOSE_SERVICE));
    }

    #[test]
    fn extra_patterns_exact_and_prefix() {
        let f = LabelFilter::new(["build.*", "commit"]);
        assert!(f.ignores("build.id"));
        assert!(f.ignores("commit"));
        assert!(!f.ignores("commits"));
        assert!(!f.ignores("tier"));
        assert!(f.ignores("com.docker.compose.config-hash"), "builtins stay");
    }

    #[test]
    fn equal_sets_share_an_identity_and_numbers_start_at_first_label() {
        let mut a = IdentityAllocator::new();
        let db = labels(&[("app", "db")]);
        let web = labels(&[("app", "web")]);
        assert_eq!(a.allocate(&db).unwrap(), (FIRST_LABEL, true));
        assert_eq!(a.allocate(&web).unwrap(), (FIRST_LABEL + 1, true));
        assert_eq!(a.allocate(&db).unwrap(), (FIRST_LABEL, false));
        assert_eq!(a.lookup(&web), Some(FIRST_LABEL + 1));
        assert_eq!(a.labels(FIRST_LABEL), Some(&db));
    }

    #[test]
    fn numbers_survive_a_restart_through_serialized_state() {
        let mut a = IdentityAllocator::new();
        let db = labels(&[("app", "db")]);
        let web = labels(&[("app", "web")]);
        a.allocate(&db).unwrap();
        a.allocate(&web).unwrap();
        let json = serde_json::to_string(&a.state()).unwrap();
        let state: AllocatorState = serde_json::from_str(&json).unwrap();
        let mut b = IdentityAllocator::load(state).unwrap();
        assert_eq!(b.allocate(&web).unwrap(), (FIRST_LABEL + 1, false));
        assert_eq!(
            b.allocate(&labels(&[("app", "x")])).unwrap().0,
            FIRST_LABEL + 2
        );
    }

    #[test]
    fn released_numbers_are_not_reused_for_another_set() {
        let mut a = IdentityAllocator::new();
        let (first, _) = a.allocate(&labels(&[("app", "a")])).unwrap();
        a.release(first);
        let (second, _) = a.allocate(&labels(&[("app", "b")])).unwrap();
        assert_ne!(first, second);
        // The same holds after a restart from a state without the released number.
        let mut b = IdentityAllocator::load(a.state()).unwrap();
        let (third, _) = b.allocate(&labels(&[("app", "c")])).unwrap();
        assert!(third > second);
    }

    #[test]
    fn wraps_around_only_to_free_numbers() {
        let mut state = AllocatorState {
            next: LAST_LABEL,
            ..Default::default()
        };
        state.identities.insert(FIRST_LABEL, labels(&[("a", "")]));
        state.identities.insert(LAST_LABEL, labels(&[("z", "")]));
        let mut a = IdentityAllocator::load(state).unwrap();
        let (id, _) = a.allocate(&labels(&[("n", "")])).unwrap();
        assert_eq!(id, FIRST_LABEL + 1);
    }

    #[test]
    fn bad_persisted_state_is_refused() {
        let mut s = AllocatorState::default();
        s.identities.insert(5, labels(&[("a", "")]));
        assert!(matches!(
            IdentityAllocator::load(s),
            Err(IdentityError::OutOfRange(5))
        ));
        let mut s = AllocatorState::default();
        s.identities.insert(300, labels(&[("a", "")]));
        s.identities.insert(301, labels(&[("a", "")]));
        assert!(matches!(
            IdentityAllocator::load(s),
            Err(IdentityError::DuplicateLabels {
                first: 300,
                second: 301
            })
        ));
    }

    #[test]
    fn a_number_or_label_key_given_twice_does_not_parse() {
        for bad in [
            r#"{"identities": {"300": {"app": "db"}, "300": {"app": "evil"}}}"#,
            r#"{"identities": {"300": {"app": "db", "app": "evil"}}}"#,
        ] {
            let e = serde_json::from_str::<AllocatorState>(bad).unwrap_err();
            assert!(e.to_string().contains("appears twice"), "{bad}: {e}");
        }
        let ok: AllocatorState =
            serde_json::from_str(r#"{"next": 302, "identities": {"300": {"app": "db"}, "301": {"app": "web", "tier": ""}}}"#)
                .unwrap();
        assert_eq!(ok.identities[&301], labels(&[("app", "web"), ("tier", "")]));
        assert_eq!(
            serde_json::from_str::<AllocatorState>(&serde_json::to_string(&ok).unwrap()).unwrap(),
            ok
        );
    }

    #[test]
    fn avoided_numbers_are_never_handed_out_also_after_the_wrap() {
        let mut a = IdentityAllocator::load(AllocatorState {
            next: LAST_LABEL,
            identities: BTreeMap::new(),
        })
        .unwrap();
        a.avoid([LAST_LABEL, FIRST_LABEL, FIRST_LABEL + 2]);
        assert!(!a.raise_next(LAST_LABEL + 1), "no room above");
        let got: Vec<u32> = (0..3)
            .map(|n| a.allocate(&labels(&[("n", &n.to_string())])).unwrap().0)
            .collect();
        assert_eq!(got, [FIRST_LABEL + 1, FIRST_LABEL + 3, FIRST_LABEL + 4]);
    }

    #[test]
    fn retain_releases_unused() {
        let mut a = IdentityAllocator::new();
        let (x, _) = a.allocate(&labels(&[("a", "")])).unwrap();
        let (y, _) = a.allocate(&labels(&[("b", "")])).unwrap();
        assert_eq!(a.retain(|id| id == y), vec![x]);
        assert_eq!(a.len(), 1);
    }

    #[test]
    fn display_names() {
        assert_eq!(display_name(1, None), "host");
        assert_eq!(display_name(2, None), "world");
        let db = labels(&[
            ("com.docker.compose.project", "shop"),
            ("com.docker.compose.service", "db"),
        ]);
        assert_eq!(display_name(300, Some(&db)), "shop/db");
        assert_eq!(
            display_name(300, Some(&labels(&[("app", "web"), ("tier", "")]))),
            "app=web,tier"
        );
        let long = labels(&[("a", &"x".repeat(100))]);
        assert!(display_name(300, Some(&long)).ends_with('…'));
        assert_eq!(display_name(999, None), "id:999");
    }
}
