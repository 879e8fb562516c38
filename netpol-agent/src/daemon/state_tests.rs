//! The agent against the fake datapath: policy sources in, map state out, and connectivity read
//! from the maps the way the kernel decides (ipcache LPM, two policy lookups, `decide`).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use netpol_common::{
    identity::WORLD,
    policy::{decide, lookup_keys, PolicyKey, PolicyValue, Verdict},
    proto::TCP,
    Direction::{self, Egress, Ingress},
};

use super::Agent;
use crate::policy::sources::labels::identity_labels;
use crate::{
    datapath::{fake::FakeDatapath, Cidr, MapSizes, MapState, PolicyEntryKey},
    docker::{Attachment, Container, DockerEvent, LinkEvent, LinkInfo, Network, NetworkMode},
    identity::LabelFilter,
    store::Store,
};

/// A private state directory and policy directory, removed on drop.
pub(super) struct Dirs {
    root: PathBuf,
}

impl Dirs {
    pub(super) fn new(tag: &str) -> Self {
        let root = std::env::temp_dir().join(format!("netpol-agent-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("policies.d")).expect("policy dir");
        Self { root }
    }

    pub(super) fn state(&self) -> PathBuf {
        self.root.join("state")
    }

    pub(super) fn policy_dir(&self) -> PathBuf {
        self.root.join("policies.d")
    }

    /// Writes a policy file with a modification time of its own (two writes within one clock
    /// tick would otherwise look alike).
    pub(super) fn write_policy(&self, name: &str, text: &str) {
        static TICK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let path = self.policy_dir().join(name);
        std::fs::write(&path, text).expect("write policy");
        let t = SystemTime::UNIX_EPOCH
            + Duration::from_secs(1_700_000_000)
            + Duration::from_millis(TICK.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(t))
            .expect("set mtime");
    }

    pub(super) fn remove_policy(&self, name: &str) {
        std::fs::remove_file(self.policy_dir().join(name)).expect("remove policy");
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

pub(super) fn agent_on(dirs: &Dirs, dp: FakeDatapath) -> Agent {
    started(dirs, dp, "agent")
}

/// [`agent_on`], naming `what` when the agent refuses to start.
fn started(dirs: &Dirs, dp: FakeDatapath, what: &str) -> Agent {
    let mut a = Agent::new(
        Box::new(dp),
        Store::new(dirs.state()),
        LabelFilter::default(),
        dirs.policy_dir(),
    )
    .unwrap_or_else(|e| panic!("{what}: the agent refused to start: {e}"));
    a.reload_policy_dir();
    a
}

pub(super) fn agent(dirs: &Dirs) -> Agent {
    agent_on(dirs, FakeDatapath::new(MapSizes::default()))
}

pub(super) fn network() -> Network {
    Network {
        id: "net".into(),
        name: "shop_default".into(),
        driver: "bridge".into(),
        bridge: Some("br-net".into()),
        subnets: vec!["172.20.0.0/16".parse().unwrap()],
        gateways: vec!["172.20.0.1".parse().unwrap()],
        enable_ipv6: false,
        masquerade: true,
        gateway_mode_ipv6: None,
    }
}

/// Container number `n` (address 172.20.0.n, host veth 100 + n) with these labels.
pub(super) fn container(n: u8, name: &str, labels: &[(&str, &str)]) -> Container {
    Container {
        id: format!("{n:064x}"),
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        networks: vec![Attachment {
            network_id: "net".into(),
            network_name: "shop_default".into(),
            driver: Some("bridge".into()),
            ipv4: Some(Ipv4Addr::new(172, 20, 0, n)),
            ipv6: None,
            mac: None,
            host_veth: Some(100 + u32::from(n)),
            enforceable: Ok(()),
        }],
        sandbox_key: None,
        running: true,
        network_mode: NetworkMode::Network("shop_default".into()),
        image_netpol_labels: Ok(BTreeMap::new()),
    }
}

/// A compose container of project `shop`.
pub(super) fn service(n: u8, service: &str, extra: &[(&str, &str)]) -> Container {
    let mut labels = vec![
        ("com.docker.compose.project", "shop"),
        ("com.docker.compose.service", service),
    ];
    labels.extend_from_slice(extra);
    container(n, &format!("shop-{service}-1"), &labels)
}

pub(super) fn snapshot(a: &mut Agent, containers: &[&Container]) {
    a.on_docker(DockerEvent::Snapshot {
        containers: containers.iter().map(|c| (*c).clone()).collect(),
        networks: vec![network()],
    });
}

pub(super) fn maps(a: &Agent) -> MapState {
    a.dp.current().expect("fake state")
}

fn lpm(map: &BTreeMap<PolicyEntryKey, PolicyValue>, key: &PolicyKey) -> Option<PolicyValue> {
    let bits = |k: &PolicyKey| -> u128 {
        (u128::from(k.local) << 64)
            | (u128::from(k.remote) << 32)
            | (u128::from(k.direction) << 24)
            | (u128::from(k.proto) << 16)
            | u128::from(k.dport())
    };
    let want = bits(key);
    map.iter()
        .filter(|(k, _)| {
            let shift = 96 - k.prefix_len;
            (bits(&k.key) >> shift) == (want >> shift)
        })
        .max_by_key(|(k, _)| k.prefix_len)
        .map(|(_, v)| *v)
}

fn identity_of(m: &MapState, ip: IpAddr) -> u32 {
    m.ipcache
        .iter()
        .filter(|(c, _)| Cidr::contains(c, ip))
        .max_by_key(|(c, _)| c.prefix_len)
        .map_or(WORLD, |(_, v)| v.identity)
}

fn addr(c: &Container) -> IpAddr {
    IpAddr::V4(c.networks[0].ipv4.expect("ipv4"))
}

fn ifindex(c: &Container) -> u32 {
    c.networks[0].host_veth.expect("veth")
}

/// Whether the datapath lets a new flow of `local`'s endpoint with `remote` pass in `dir`.
fn passes(m: &MapState, local: &Container, remote: &Container, dir: Direction, port: u16) -> bool {
    let Some(ep) = m.endpoints.get(&ifindex(local)) else {
        return true;
    };
    if !ep.enforces(dir) {
        return true;
    }
    let [k1, k2] = lookup_keys(ep.identity, identity_of(m, addr(remote)), dir, TCP, port);
    matches!(
        decide(lpm(&m.policy, &k1), lpm(&m.policy, &k2)),
        Verdict::Allow(_)
    )
}

/// The maps a reconcile from `before` to `after` passes through: the new ipcache and endpoints
/// with the old POLICY entries beside the new ones, and that with the old endpoints too.
fn reconcile_windows(before: &MapState, after: &MapState) -> [MapState; 2] {
    let mut window = after.clone();
    window.policy.extend(before.policy.clone());
    let mut old_eps = window.clone();
    old_eps.endpoints.extend(before.endpoints.clone());
    [window, old_eps]
}

/// Whether a TCP connection from `from` to `to`:`port` gets through (egress of `from`, ingress
/// of `to`).
pub(super) fn connects(a: &Agent, from: &Container, to: &Container, port: u16) -> bool {
    let m = maps(a);
    passes(&m, from, to, Egress, port) && passes(&m, to, from, Ingress, port)
}

pub(super) fn db_accepts(peer: &str, protocol: &str) -> String {
    format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: db
spec:
  endpointSelector:
    matchLabels:
      com.docker.compose.service: db
  ingress:
    - fromEndpoints:
        - matchLabels:
            com.docker.compose.service: {peer}
      toPorts:
        - ports: [{{ port: "5432", protocol: {protocol} }}]
"#
    )
}

fn import(a: &mut Agent, name: &str, text: &str) -> Result<Vec<String>, super::AgentError> {
    a.import(&[crate::daemon::api::SourceFile {
        path: name.into(),
        text: text.into(),
    }])
}

fn status_str(a: &Agent) -> String {
    a.status().to_string()
}

fn path_in(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

// ---------------------------------------------------------------------------------------------
// Item 1: a broken policy file keeps its last valid version; a stored one that no longer parses
// leaves the maps alone.

#[test]
fn a_policy_file_edited_into_an_invalid_state_keeps_its_last_valid_version() {
    let dirs = Dirs::new("file-last-valid");
    let (db, app1, app2) = (
        service(2, "db", &[]),
        service(3, "app1", &[]),
        service(4, "app2", &[]),
    );
    dirs.write_policy("db.yaml", &db_accepts("app1", "TCP"));
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db, &app1, &app2]);
    assert!(connects(&a, &app1, &db, 5432));
    assert!(!connects(&a, &app2, &db, 5432));

    // Broken: the valid version stays in force, and both status and `policy get` say so.
    dirs.write_policy("db.yaml", &db_accepts("app1", "TPC"));
    assert!(a.policy_dir_changed());
    a.reload_policy_dir();
    a.sync_logged("test");
    assert!(
        connects(&a, &app1, &db, 5432),
        "the last valid version applies"
    );
    assert!(!connects(&a, &app2, &db, 5432), "db must not become open");
    let file = path_in(&dirs.policy_dir(), "db.yaml");
    let status = a.status();
    let rejected = status["policy_files_rejected"][&file]
        .as_str()
        .unwrap_or_default();
    assert!(
        rejected.contains("TPC") && rejected.contains("last valid version stays in force"),
        "{status}"
    );
    let rows = a.policy_rows(Some("db")).expect("db is listed");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].source, file);
    assert!(rows[0].text.contains("protocol: TCP"), "the text in force");
    assert!(
        rows[0].error.as_deref().unwrap_or_default().contains("TPC"),
        "{:?}",
        rows[0]
    );

    // An agent restart (empty maps: a reboot) with the file still broken: the kept version.
    drop(a);
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db, &app1, &app2]);
    assert!(connects(&a, &app1, &db, 5432));
    assert!(
        !connects(&a, &app2, &db, 5432),
        "db must not be open after a restart"
    );
    assert!(status_str(&a).contains("last valid version stays in force"));

    // A valid edit replaces it.
    dirs.write_policy("db.yaml", &db_accepts("app2", "TCP"));
    a.reload_policy_dir();
    a.sync_logged("test");
    assert!(!connects(&a, &app1, &db, 5432));
    assert!(connects(&a, &app2, &db, 5432));
    assert_eq!(a.status()["policy_files_rejected"], serde_json::json!({}));
    assert!(a.policy_rows(Some("db")).expect("db")[0].error.is_none());

    // Removing the file is an intended edit: its policy goes, also for the next agent.
    dirs.remove_policy("db.yaml");
    assert!(a.policy_dir_changed());
    a.reload_policy_dir();
    a.sync_logged("test");
    assert!(connects(&a, &app1, &db, 5432) && connects(&a, &app2, &db, 5432));
    drop(a);
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db, &app1, &app2]);
    assert!(connects(&a, &app1, &db, 5432) && connects(&a, &app2, &db, 5432));
    assert!(a.policy_rows(Some("db")).is_err());
}

/// Replaces policy file `name` by what `make` puts at its path.
fn replace_policy(dirs: &Dirs, name: &str, make: impl FnOnce(&Path)) {
    let path = dirs.policy_dir().join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir(&path).expect("rmdir"),
        Ok(_) => std::fs::remove_file(&path).expect("rm"),
        Err(_) => {}
    }
    make(&path);
}

/// A name in the policy directory that is not a regular file (any more) — a symlink to
/// nothing (its target on a file system not mounted yet at boot), a directory, a FIFO — is a
/// rejected file, not a removed one: its last valid version stays in force, also across a
/// restart, and reading it never blocks. Only the name gone removes its policies.
#[test]
fn a_policy_file_that_is_no_regular_file_keeps_its_last_valid_version() {
    let dirs = Dirs::new("file-not-regular");
    let (db, app1, app2) = (
        service(2, "db", &[]),
        service(3, "app1", &[]),
        service(4, "app2", &[]),
    );
    dirs.write_policy("db.yaml", &db_accepts("app1", "TCP"));
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db, &app1, &app2]);
    assert!(connects(&a, &app1, &db, 5432) && !connects(&a, &app2, &db, 5432));
    let file = path_in(&dirs.policy_dir(), "db.yaml");
    let gone = dirs.policy_dir().join("../not-mounted/db.yaml");
    let fifo = |p: &Path| {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    };
    let cases: [(&str, Box<dyn Fn(&Path)>); 3] = [
        (
            "a symbolic link to nothing",
            Box::new(|p: &Path| std::os::unix::fs::symlink(&gone, p).expect("symlink")),
        ),
        (
            "a directory",
            Box::new(|p: &Path| std::fs::create_dir(p).expect("mkdir")),
        ),
        ("a FIFO", Box::new(fifo)),
    ];
    for (what, make) in &cases {
        replace_policy(&dirs, "db.yaml", make);
        a.reload_policy_dir();
        a.sync_logged("test");
        assert!(
            connects(&a, &app1, &db, 5432) && !connects(&a, &app2, &db, 5432),
            "{what}: db's policy was dropped"
        );
        let status = a.status();
        let rejected = status["policy_files_rejected"][&file]
            .as_str()
            .unwrap_or_default();
        assert!(
            rejected.contains(what) && rejected.contains("last valid version stays in force"),
            "{what}: {status}"
        );
        drop(a);
        a = agent(&dirs);
        snapshot(&mut a, &[&db, &app1, &app2]);
        assert!(
            connects(&a, &app1, &db, 5432) && !connects(&a, &app2, &db, 5432),
            "{what}: db's policy was dropped across a restart"
        );
    }
    // A symlink to a valid file is read; the name gone removes the policy.
    let elsewhere = dirs.policy_dir().join("../db-elsewhere.yaml");
    std::fs::write(&elsewhere, db_accepts("app2", "TCP")).expect("write");
    replace_policy(&dirs, "db.yaml", |p| {
        std::os::unix::fs::symlink(&elsewhere, p).expect("symlink")
    });
    a.reload_policy_dir();
    a.sync_logged("test");
    assert!(connects(&a, &app2, &db, 5432) && !connects(&a, &app1, &db, 5432));
    replace_policy(&dirs, "db.yaml", |_| {});
    a.reload_policy_dir();
    a.sync_logged("test");
    assert!(connects(&a, &app1, &db, 5432) && connects(&a, &app2, &db, 5432));
}

/// A policy file that another user can write (writable by group or others, owned by another
/// user, or in a directory another user can write to) could open every container: it is not
/// read, like an invalid file (its last valid version stays in force), and a policy directory
/// another user can write to is read no more, removals included, until only root can.
#[test]
fn a_policy_file_another_user_can_write_is_not_read() {
    use std::os::unix::fs::PermissionsExt;
    let dirs = Dirs::new("file-untrusted");
    let (db, app1, app2) = (
        service(2, "db", &[]),
        service(3, "app1", &[]),
        service(4, "app2", &[]),
    );
    let chmod = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    let file = dirs.policy_dir().join("db.yaml");
    let rejected = |a: &Agent, path: &Path| {
        a.status()["policy_files_rejected"][&path.display().to_string()]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    // Never read while world-writable: applies nothing.
    dirs.write_policy("db.yaml", &db_accepts("app1", "TCP"));
    chmod(&file, 0o666);
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db, &app1, &app2]);
    assert!(connects(&a, &app2, &db, 5432));
    assert!(rejected(&a, &file).contains("writable by other users"));
    chmod(&file, 0o644);
    assert!(a.policy_dir_changed());
    a.reload_policy_dir();
    a.sync_logged("test");
    assert!(connects(&a, &app1, &db, 5432) && !connects(&a, &app2, &db, 5432));

    // An edit that opens db, in a group-writable file: not read.
    dirs.write_policy("db.yaml", &db_accepts("app2", "TCP"));
    chmod(&file, 0o664);
    a.reload_policy_dir();
    a.sync_logged("test");
    assert!(
        connects(&a, &app1, &db, 5432) && !connects(&a, &app2, &db, 5432),
        "a group-writable file's edit applied"
    );
    assert!(rejected(&a, &file).contains("last valid version stays in force"));
    // SAFETY: plain libc call.
    if unsafe { libc::geteuid() } == 0 {
        chmod(&file, 0o644);
        std::os::unix::fs::chown(&file, Some(65534), None).expect("chown");
        a.reload_policy_dir();
        a.sync_logged("test");
        assert!(
            !connects(&a, &app2, &db, 5432),
            "another user's file applied"
        );
        assert!(rejected(&a, &file).contains("owned by uid 65534"));
        std::os::unix::fs::chown(&file, Some(0), None).expect("chown");
    }
    chmod(&file, 0o644);
    dirs.write_policy("db.yaml", &db_accepts("app1", "TCP"));
    a.reload_policy_dir();
    a.sync_logged("test");
    assert!(connects(&a, &app1, &db, 5432) && !connects(&a, &app2, &db, 5432));

    // A symlink to a file in a directory others can write to.
    let open_dir = dirs.policy_dir().join("../open");
    std::fs::create_dir(&open_dir).expect("mkdir");
    chmod(&open_dir, 0o777);
    std::fs::write(
        open_dir.join("web.yaml"),
        db_accepts("app2", "TCP").replace("name: db", "name: web"),
    )
    .expect("write");
    std::os::unix::fs::symlink(
        open_dir.join("web.yaml"),
        dirs.policy_dir().join("web.yaml"),
    )
    .expect("symlink");
    a.reload_policy_dir();
    a.sync_logged("test");
    assert!(
        !connects(&a, &app2, &db, 5432),
        "a file in a world-writable directory applied"
    );
    assert!(rejected(&a, &dirs.policy_dir().join("web.yaml")).contains("writable by other users"));
    std::fs::remove_file(dirs.policy_dir().join("web.yaml")).expect("rm");

    // The policy directory itself: nothing in it is read, a removal neither.
    chmod(&dirs.policy_dir(), 0o777);
    assert!(a.policy_dir_changed());
    dirs.remove_policy("db.yaml");
    a.reload_policy_dir();
    a.sync_logged("test");
    assert!(
        connects(&a, &app1, &db, 5432) && !connects(&a, &app2, &db, 5432),
        "a removal in a world-writable directory applied"
    );
    assert!(rejected(&a, &dirs.policy_dir()).contains("writable by other users"));
    chmod(&dirs.policy_dir(), 0o755);
    assert!(a.policy_dir_changed());
    a.reload_policy_dir();
    a.sync_logged("test");
    assert!(
        connects(&a, &app2, &db, 5432),
        "the removal applies once trusted"
    );
    assert_eq!(a.status()["policy_files_rejected"], serde_json::json!({}));
}

/// A policy file reached through a symbolic link that lies in a directory another user can
/// write to is not read, although the file it ends at is root's in a directory only root can
/// write to: that user could point the link at any file root owns (an older, more open
/// version; another policy), or at any directory. Its last valid version stays in force.
#[test]
fn a_policy_file_reached_through_a_link_another_user_can_replace_is_not_read() {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let dirs = Dirs::new("file-link-untrusted");
    let (db, app1, app2) = (
        service(2, "db", &[]),
        service(3, "app1", &[]),
        service(4, "app2", &[]),
    );
    dirs.write_policy("db.yaml", &db_accepts("app1", "TCP"));
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db, &app1, &app2]);
    assert!(connects(&a, &app1, &db, 5432) && !connects(&a, &app2, &db, 5432));
    // Root's: a release directory with a version that opens db to app2.
    let release = dirs.policy_dir().join("../release");
    std::fs::create_dir(&release).expect("mkdir");
    std::fs::write(release.join("db.yaml"), db_accepts("app2", "TCP")).expect("write");
    // A directory others can write to (not sticky), holding the links.
    let open = dirs.policy_dir().join("../open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    symlink(release.join("db.yaml"), open.join("current.yaml")).expect("symlink");
    symlink(&release, open.join("current")).expect("symlink");
    let file = dirs.policy_dir().join("db.yaml");
    for (what, target) in [
        ("a link to a file", open.join("current.yaml")),
        ("a link to a directory", open.join("current/db.yaml")),
    ] {
        std::fs::remove_file(&file).expect("rm");
        symlink(&target, &file).expect("symlink");
        a.reload_policy_dir();
        a.sync_logged("test");
        assert!(
            connects(&a, &app1, &db, 5432) && !connects(&a, &app2, &db, 5432),
            "{what} in a directory others can write to was followed"
        );
        let status = a.status();
        let rejected = status["policy_files_rejected"][&file.display().to_string()]
            .as_str()
            .unwrap_or_default();
        assert!(
            rejected.contains("writable by other users")
                && rejected.contains("last valid version stays in force"),
            "{what}: {status}"
        );
    }
    // Once only root can write there, the link is followed.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    a.reload_policy_dir();
    a.sync_logged("test");
    assert!(connects(&a, &app2, &db, 5432) && !connects(&a, &app1, &db, 5432));
}

/// A state directory another user can write to (or its `policies/` or `files/`) could hold a
/// policy they planted, read at start as an imported policy or a file's last valid version:
/// the agent does not start on it (the pinned maps keep enforcing what they hold), and says
/// which directory and why.
#[test]
fn the_agent_does_not_start_on_a_state_directory_another_user_can_write() {
    use std::os::unix::fs::PermissionsExt;
    let chmod = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    let dirs = Dirs::new("state-untrusted");
    let db = service(2, "db", &[]);
    {
        let mut a = agent(&dirs);
        import(&mut a, "db.yaml", &db_accepts("app1", "TCP")).expect("import");
        snapshot(&mut a, &[&db]);
    }
    for sub in ["", "policies"] {
        let d = dirs.state().join(sub);
        chmod(&d, 0o777);
        let e = Agent::new(
            Box::new(FakeDatapath::new(MapSizes::default())),
            Store::new(dirs.state()),
            LabelFilter::default(),
            dirs.policy_dir(),
        )
        .err()
        .unwrap_or_else(|| panic!("started on a world-writable {}", d.display()))
        .to_string();
        assert!(e.contains("writable by other users"), "{e}");
        chmod(&d, 0o700);
    }
    // A state directory that does not exist yet, under one another user can write to.
    let open = dirs.policy_dir().join("../open");
    std::fs::create_dir(&open).expect("mkdir");
    chmod(&open, 0o777);
    assert!(Agent::new(
        Box::new(FakeDatapath::new(MapSizes::default())),
        Store::new(open.join("state")),
        LabelFilter::default(),
        dirs.policy_dir(),
    )
    .is_err());
    let a = agent(&dirs);
    assert!(a.policy_rows(Some("db")).is_ok());
}

/// A policy directory that is a symbolic link to nothing (its file system not mounted yet at
/// boot) is not an empty directory: every file's last valid version stays in force, also
/// across a restart, as for a file that is such a link.
#[test]
fn a_policy_directory_that_is_a_link_to_nothing_removes_no_policy() {
    let dirs = Dirs::new("dir-link-to-nothing");
    let (db, app1, app2) = (
        service(2, "db", &[]),
        service(3, "app1", &[]),
        service(4, "app2", &[]),
    );
    let root = dirs.policy_dir().parent().expect("root").to_owned();
    let real = root.join("policies.real");
    std::fs::rename(dirs.policy_dir(), &real).expect("mv");
    std::os::unix::fs::symlink(&real, dirs.policy_dir()).expect("symlink");
    dirs.write_policy("db.yaml", &db_accepts("app1", "TCP"));
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db, &app1, &app2]);
    assert!(connects(&a, &app1, &db, 5432) && !connects(&a, &app2, &db, 5432));
    std::fs::remove_file(dirs.policy_dir()).expect("rm");
    std::os::unix::fs::symlink(root.join("not-mounted"), dirs.policy_dir()).expect("symlink");
    assert!(a.policy_dir_changed());
    a.reload_policy_dir();
    a.sync_logged("test");
    assert!(
        connects(&a, &app1, &db, 5432) && !connects(&a, &app2, &db, 5432),
        "db's policy was dropped"
    );
    let status = a.status();
    assert!(
        status["policy_files_rejected"][&dirs.policy_dir().display().to_string()]
            .as_str()
            .unwrap_or_default()
            .contains("symbolic link to nothing"),
        "{status}"
    );
    drop(a);
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db, &app1, &app2]);
    assert!(
        connects(&a, &app1, &db, 5432) && !connects(&a, &app2, &db, 5432),
        "db's policy was dropped across a restart"
    );
    // Mounted again: read as usual.
    std::fs::remove_file(dirs.policy_dir()).expect("rm");
    std::os::unix::fs::symlink(&real, dirs.policy_dir()).expect("symlink");
    dirs.write_policy("db.yaml", &db_accepts("app2", "TCP"));
    assert!(a.policy_dir_changed());
    a.reload_policy_dir();
    a.sync_logged("test");
    assert!(connects(&a, &app2, &db, 5432) && !connects(&a, &app1, &db, 5432));
    assert_eq!(a.status()["policy_files_rejected"], serde_json::json!({}));
}

#[test]
fn a_policy_file_that_was_never_valid_is_rejected_and_applies_nothing() {
    let dirs = Dirs::new("file-never-valid");
    let (db, app1) = (service(2, "db", &[]), service(3, "app1", &[]));
    dirs.write_policy("db.yaml", &db_accepts("app1", "TPC"));
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db, &app1]);
    assert!(connects(&a, &app1, &db, 5432));
    let status = status_str(&a);
    assert!(
        status.contains("TPC") && status.contains("none of its policies apply"),
        "{status}"
    );
}

#[test]
fn a_stored_policy_that_no_longer_parses_leaves_the_maps_as_they_are() {
    let dirs = Dirs::new("import-unparsable");
    let (db, app1, app2) = (
        service(2, "db", &[]),
        service(3, "app1", &[]),
        service(4, "app2", &[]),
    );
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db, &app1, &app2]);
    import(&mut a, "db.yaml", &db_accepts("app1", "TCP")).expect("import");
    assert!(!connects(&a, &app2, &db, 5432));
    let before = maps(&a);
    let links = a.dp.attached().expect("links");

    // An upgrade that no longer understands the stored document (simulated by breaking it).
    let stored = dirs.state().join("policies/db.yaml");
    let text = std::fs::read_to_string(&stored).expect("stored policy");
    std::fs::write(&stored, text.replace("TCP", "TPC")).expect("break it");
    drop(a);
    let mut dp = FakeDatapath::new(MapSizes::default());
    dp.state = before.clone();
    dp.links = links.into_iter().collect();
    let mut a = agent_on(&dirs, dp);
    let app3 = service(5, "app3", &[]);
    snapshot(&mut a, &[&db, &app1, &app2, &app3]);
    // The policy entries stay exactly as they were, and so do the containers that were there;
    // app3, whose identity the maps never had, is default deny both ways (its policy is unknown).
    let now = maps(&a);
    assert_eq!(
        now.policy, before.policy,
        "policy entries left as they were"
    );
    for c in [&db, &app1, &app2] {
        assert_eq!(
            now.endpoints.get(&ifindex(c)),
            before.endpoints.get(&ifindex(c))
        );
    }
    let ep3 = now.endpoints.get(&ifindex(&app3)).expect("app3 attached");
    assert!(ep3.enforces(Ingress) && ep3.enforces(Egress), "{ep3:?}");
    assert!(!connects(&a, &app3, &db, 5432) && !connects(&a, &app1, &app3, 80));
    let before = now;
    let status = a.status();
    assert!(
        status["policies_unparsable"][0]
            .as_str()
            .unwrap_or_default()
            .contains("imported policy db no longer parses"),
        "{status}"
    );
    assert!(
        status["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("left as they are"),
        "{status}"
    );
    let rows = a.policy_rows(Some("db")).expect("still listed");
    assert!(rows[0].error.as_deref().unwrap_or_default().contains("TPC"));
    assert!(
        std::fs::read_to_string(&stored)
            .expect("still stored")
            .contains("TPC"),
        "never dropped"
    );

    // Other imports are refused while it stands; importing it again (fixed) applies everything.
    let err = import(
        &mut a,
        "web.yaml",
        &db_accepts("app3", "TCP").replace("name: db", "name: web"),
    )
    .expect_err("refused");
    assert!(err.to_string().contains("left as they are"), "{err}");
    assert_eq!(maps(&a), before);
    import(&mut a, "db.yaml", &db_accepts("app2", "TCP")).expect("re-import");
    assert!(a.status()["policies_unparsable"]
        .as_array()
        .is_some_and(Vec::is_empty));
    assert!(connects(&a, &app2, &db, 5432));
    assert!(!connects(&a, &app1, &db, 5432));
    assert!(!connects(&a, &app3, &db, 5432));
}

#[test]
fn a_kept_file_version_that_no_longer_parses_leaves_the_maps_as_they_are() {
    let dirs = Dirs::new("file-copy-unparsable");
    let (db, app1, app2) = (
        service(2, "db", &[]),
        service(3, "app1", &[]),
        service(4, "app2", &[]),
    );
    dirs.write_policy("db.yaml", &db_accepts("app1", "TCP"));
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db, &app1, &app2]);
    let before = maps(&a);
    let links = a.dp.attached().expect("links");
    drop(a);
    // The file broken, and its kept copy unreadable to this version (an upgrade).
    dirs.write_policy("db.yaml", &db_accepts("app1", "TPC"));
    let copy = dirs.state().join("files/db.yaml");
    let text = std::fs::read_to_string(&copy).expect("kept copy");
    std::fs::write(&copy, text.replace("TCP", "TQP")).expect("break the copy");
    let mut dp = FakeDatapath::new(MapSizes::default());
    dp.state = before.clone();
    dp.links = links.into_iter().collect();
    let mut a = agent_on(&dirs, dp);
    snapshot(&mut a, &[&db, &app1, &app2]);
    assert_eq!(maps(&a), before, "the maps are left as they were");
    let status = status_str(&a);
    assert!(
        status.contains("make the file valid or remove it"),
        "{status}"
    );

    // A valid file ends it.
    dirs.write_policy("db.yaml", &db_accepts("app2", "TCP"));
    a.reload_policy_dir();
    a.sync_logged("test");
    assert!(connects(&a, &app2, &db, 5432));
    assert!(!connects(&a, &app1, &db, 5432));
    assert!(a.status()["policies_unparsable"]
        .as_array()
        .is_some_and(Vec::is_empty));
}

/// A stored policy damaged on disk (emptied, garbage, not UTF-8, another policy's document in
/// its file) is never dropped, which would open what it protected, and never stops the agent:
/// it is a stored policy that no longer parses, the maps are left as they are and `status`
/// says which one. The same for a policy file's kept last valid version (but for another
/// policy's document in it: that is a valid version).
#[test]
fn a_damaged_stored_policy_is_never_dropped_nor_stops_the_agent() {
    let (db, app1, app2) = (
        service(2, "db", &[]),
        service(3, "app1", &[]),
        service(4, "app2", &[]),
    );
    let other = db_accepts("app2", "TCP").replace("name: db", "name: web");
    let two = format!("{}---\n{other}", db_accepts("app1", "TCP"));
    let damages: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("comments only", b"# nothing here\n".to_vec()),
        (
            "not UTF-8",
            b"apiVersion: cilium.io/v2\n\xff\xfe\n".to_vec(),
        ),
        ("another policy's document", other.clone().into_bytes()),
        ("two policies", two.into_bytes()),
        // Valid, but another user could have written it (4074fa5): not vouched for.
        (
            "db open to app2, writable by others",
            db_accepts("app2", "TCP").into_bytes(),
        ),
    ];
    for (kept, path) in [(false, "policies/db.yaml"), (true, "files/db.yaml")] {
        for (what, bytes) in &damages {
            // A policy file may hold any policies: a kept copy that parses is a valid version.
            if kept && what.contains("polic") {
                continue;
            }
            let what = format!("{path} {what}");
            let dirs = Dirs::new("stored-damaged");
            let mut a = agent(&dirs);
            snapshot(&mut a, &[&db, &app1, &app2]);
            if kept {
                dirs.write_policy("db.yaml", &db_accepts("app1", "TCP"));
                a.reload_policy_dir();
                a.sync_logged("test");
            } else {
                import(&mut a, "db.yaml", &db_accepts("app1", "TCP")).expect("import");
            }
            assert!(connects(&a, &app1, &db, 5432) && !connects(&a, &app2, &db, 5432));
            let before = maps(&a);
            let links = a.dp.attached().expect("links");
            drop(a);
            if kept {
                // The file itself broken too: only its kept version can say what it was.
                dirs.write_policy("db.yaml", &db_accepts("app1", "TPC"));
            }
            let stored = dirs.state().join(path);
            std::fs::write(&stored, bytes).expect("damage");
            if what.contains("writable by others") {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&stored, std::fs::Permissions::from_mode(0o666))
                    .expect("chmod");
            }
            let mut dp = FakeDatapath::new(MapSizes::default());
            dp.state = before.clone();
            dp.links = links.into_iter().collect();
            let mut a = started(&dirs, dp, &what);
            snapshot(&mut a, &[&db, &app1, &app2]);
            assert!(
                !connects(&a, &app2, &db, 5432),
                "{what}: db lost its protection"
            );
            assert!(
                connects(&a, &app1, &db, 5432),
                "{what}: app1 lost its allowance"
            );
            assert_eq!(maps(&a).policy, before.policy, "{what}: maps changed");
            let status = a.status();
            let unparsable = status["policies_unparsable"].to_string();
            assert!(unparsable.contains("db"), "{what}: {status}");
            assert_eq!(&std::fs::read(&stored).expect("kept"), bytes, "{what}");
        }
    }
}

/// A policy file without policies (empty, comments only) is valid and keeps no copy, so that a
/// kept copy without policies is always a damaged one; across restarts it stays valid.
#[test]
fn a_policy_file_without_policies_keeps_no_copy() {
    let dirs = Dirs::new("empty-file-no-copy");
    let db = service(2, "db", &[]);
    dirs.write_policy("db.yaml", &db_accepts("app1", "TCP"));
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db]);
    let copy = dirs.state().join("files/db.yaml");
    assert!(copy.exists());
    dirs.write_policy("db.yaml", "# emptied on purpose\n");
    a.reload_policy_dir();
    a.sync_logged("test");
    assert!(!copy.exists(), "a version without policies keeps nothing");
    drop(a);
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db]);
    let status = a.status();
    assert_eq!(
        status["policies_unparsable"],
        serde_json::json!([]),
        "{status}"
    );
    assert_eq!(
        status["policy_files_rejected"],
        serde_json::json!({}),
        "{status}"
    );
}

#[test]
fn policy_names_are_unique_across_files_and_imports() {
    let dirs = Dirs::new("unique-names");
    let (db, app1, app2) = (
        service(2, "db", &[]),
        service(3, "app1", &[]),
        service(4, "app2", &[]),
    );
    dirs.write_policy("db.yaml", &db_accepts("app1", "TCP"));
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db, &app1, &app2]);

    // An import of a name a file defines is an error, and changes nothing.
    let err = import(&mut a, "other.yaml", &db_accepts("app2", "TCP")).expect_err("taken");
    assert!(err.to_string().contains("already defined by"), "{err}");
    assert!(!connects(&a, &app2, &db, 5432));
    assert!(!dirs.state().join("policies/db.yaml").exists());

    // A file with a name that is imported is rejected; the import stays the only one.
    let web = db_accepts("app1", "TCP").replace("name: db", "name: web");
    import(&mut a, "web.yaml", &web).expect("import web");
    dirs.write_policy("web.yaml", &web);
    a.reload_policy_dir();
    a.sync_logged("test");
    let rows: Vec<_> = a
        .policy_rows(Some("web"))
        .expect("web")
        .into_iter()
        .filter(|r| r.error.is_none())
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].source, "imported");
    assert!(status_str(&a).contains("already an imported policy"));

    // Deleting the import frees the name: the file applies, and `policy delete` of it is an
    // error (it is a file).
    a.delete(&["web".to_owned()], false).expect("delete");
    let rows = a.policy_rows(Some("web")).expect("web from the file");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].source, path_in(&dirs.policy_dir(), "web.yaml"));
    assert!(rows[0].error.is_none(), "{rows:?}");
    assert!(a.delete(&["web".to_owned()], false).is_err());
}

/// Policy `name`: db accepting app1 on TCP `port`.
fn named_policy(name: &str, port: u16) -> String {
    db_accepts("app1", "TCP")
        .replace("name: db", &format!("name: {name}"))
        .replace("5432", &port.to_string())
}

/// `policy delete a b` and `-f` (names): every name must exist, else nothing changes.
/// An import of several policies is whole or nothing also when the agent dies part way through
/// writing it (here: before each durable write or removal in turn): the restarted agent has
/// either every old version or every new one, never the new `a` beside the old `b`.
#[test]
fn an_import_cut_short_by_a_crash_is_whole_or_nothing_after_a_restart() {
    let dirs = Dirs::new("import-crash");
    let policy = named_policy;
    let texts = |a: &Agent| -> Vec<String> {
        ["a", "b"]
            .iter()
            .map(|n| a.policy_rows(Some(n)).expect("listed")[0].text.clone())
            .collect()
    };
    let mut a = agent(&dirs);
    import(&mut a, "a.yaml", &policy("a", 1)).expect("import a");
    import(&mut a, "b.yaml", &policy("b", 1)).expect("import b");
    let old = texts(&a);
    let both = format!("{}---\n{}", policy("a", 2), policy("b", 2));
    let mut crashed = 0;
    for n in 0.. {
        crate::store::crash::crash_after(Some(n));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            import(&mut a, "both.yaml", &both)
        }));
        crate::store::crash::crash_after(None);
        if r.is_ok() {
            break;
        }
        crashed += 1;
        drop(a);
        a = agent(&dirs);
        let now = texts(&a);
        assert!(
            now == old || now == [policy("a", 2), policy("b", 2)],
            "crash before step {n}: half an import: {now:?}"
        );
        // Back to the old versions for the next round.
        import(&mut a, "a.yaml", &policy("a", 1)).expect("import a");
        import(&mut a, "b.yaml", &policy("b", 1)).expect("import b");
    }
    assert!(crashed >= 3, "the import took {crashed} steps");
}

/// `policy delete --all` cut short by a crash (before each durable step in turn): the
/// restarted agent has every policy or none, never some of them.
#[test]
fn a_delete_all_cut_short_by_a_crash_is_whole_or_nothing_after_a_restart() {
    let dirs = Dirs::new("delete-all-crash");
    let names = |a: &Agent| -> Vec<String> {
        a.policy_rows(None)
            .expect("rows")
            .into_iter()
            .map(|r| r.name)
            .collect()
    };
    let mut a = agent(&dirs);
    for n in ["a", "b", "c"] {
        import(&mut a, &format!("{n}.yaml"), &named_policy(n, 1)).expect("import");
    }
    let all = names(&a);
    assert_eq!(all.len(), 3, "{all:?}");
    let mut crashed = 0;
    for n in 0.. {
        crate::store::crash::crash_after(Some(n));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| a.delete(&[], true)));
        crate::store::crash::crash_after(None);
        if r.is_ok() {
            assert!(names(&a).is_empty());
            break;
        }
        crashed += 1;
        drop(a);
        a = agent(&dirs);
        let now = names(&a);
        assert!(
            now == all || now.is_empty(),
            "crash before step {n}: half a delete: {now:?}"
        );
        for n in ["a", "b", "c"] {
            import(&mut a, &format!("{n}.yaml"), &named_policy(n, 1)).expect("import");
        }
    }
    assert!(crashed >= 4, "the delete took {crashed} steps");
}

/// A change that failed part way and whose undo failed too (here: a directory in the way of
/// `b`'s file) leaves its journal. A later change of one policy must not replace that journal
/// and so keep the half state for good: the restarted agent would come back with `b` gone (a
/// protection lost) although the running one never dropped it.
#[test]
fn a_failed_import_that_could_not_be_undone_is_not_kept_half_by_the_next_change() {
    let dirs = Dirs::new("import-stale-journal");
    let policy = named_policy;
    let mut a = agent(&dirs);
    import(&mut a, "a.yaml", &policy("a", 1)).expect("import a");
    import(&mut a, "b.yaml", &policy("b", 1)).expect("import b");
    let blocker = dirs.state().join("policies/b.yaml");
    std::fs::remove_file(&blocker).expect("b's file");
    std::fs::create_dir(&blocker).expect("in the way");
    let both = format!("{}---\n{}", policy("a", 2), policy("b", 2));
    import(&mut a, "both.yaml", &both).expect_err("b cannot be written");
    std::fs::remove_dir(&blocker).expect("out of the way again");
    import(&mut a, "c.yaml", &policy("c", 1)).expect("import c");
    drop(a);
    let a = agent(&dirs);
    for (n, port) in [("a", 1), ("b", 1), ("c", 1)] {
        let rows = a.policy_rows(Some(n));
        assert!(
            rows.as_ref().is_ok_and(|r| r[0].text == policy(n, port)),
            "{n} after a restart: {rows:?}"
        );
    }
}

#[test]
fn delete_several_names_whole_or_nothing() {
    use super::{Agent, AgentError, SourceFile};
    use crate::{
        datapath::{fake::FakeDatapath, MapSizes},
        identity::LabelFilter,
        store::Store,
    };
    let dir = std::env::temp_dir().join(format!("netpol-delete-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::new(dir.join("state"));
    let dp = Box::new(FakeDatapath::new(MapSizes::default()));
    let mut a = Agent::new(dp, store, LabelFilter::default(), dir.join("policies.d")).unwrap();
    let doc = |n: &str| {
        format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {n}}}\nspec: {{endpointSelector: {{}}, ingress: [{{}}]}}\n")
    };
    let text = ["a", "b", "c"].map(doc).join("---\n");
    a.import(&[SourceFile {
        path: "abc.yaml".into(),
        text,
    }])
    .unwrap();
    let names = |a: &Agent| -> Vec<String> {
        a.policy_rows(None)
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect()
    };
    let stored = || -> Vec<String> {
        Store::new(dir.join("state"))
            .policies()
            .unwrap()
            .into_keys()
            .collect()
    };
    let e = a
        .delete(&["a".into(), "nope".into(), "zzz".into()], false)
        .unwrap_err();
    assert!(
        matches!(&e, AgentError::NotFound(n) if n == "nope, zzz"),
        "{e}"
    );
    assert_eq!(names(&a), ["a", "b", "c"], "nothing deleted");
    assert_eq!(stored(), ["a", "b", "c"]);
    assert_eq!(
        a.delete(&["c".into(), "a".into(), "a".into()], false)
            .unwrap(),
        ["a", "c"]
    );
    assert_eq!(names(&a), ["b"]);
    assert_eq!(stored(), ["b"]);
    assert!(a.delete(&[], false).is_err());
    assert_eq!(a.delete(&[], true).unwrap(), ["b"]);
    assert!(stored().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Item 2: a broken netpol label makes the direction it names default deny.

fn up(a: &mut Agent, c: &Container) {
    a.on_docker(DockerEvent::ContainerUp(c.clone()));
}

fn endpoint_state(a: &mut Agent, c: &Container) -> String {
    a.endpoint_rows()
        .into_iter()
        .find(|r| r.name == c.name)
        .map(|r| r.state)
        .unwrap_or_default()
}

#[test]
fn a_broken_netpol_label_makes_its_direction_default_deny() {
    let dirs = Dirs::new("broken-label");
    let (app1, app2) = (service(3, "app1", &[]), service(4, "app2", &[]));
    let db = service(2, "db", &[("netpol.ingress", "app1:5432/tpc")]);
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db, &app1, &app2]);
    assert!(!connects(&a, &app1, &db, 5432), "nothing is allowed in");
    assert!(!connects(&a, &app2, &db, 5432));
    assert!(connects(&a, &db, &app1, 8080), "egress is not touched");
    let state = endpoint_state(&mut a, &db);
    assert!(
        state.contains("ingress default deny") && state.contains("tpc"),
        "{state}"
    );
    let status = a.status();
    assert!(
        status["label_errors"][&db.name]
            .as_str()
            .unwrap_or_default()
            .contains("netpol.ingress"),
        "{status}"
    );

    // Fixed: the label applies as written.
    let fixed = service(2, "db", &[("netpol.ingress", "app1:5432/tcp")]);
    up(&mut a, &fixed);
    assert!(connects(&a, &app1, &fixed, 5432));
    assert!(!connects(&a, &app2, &fixed, 5432));
    assert_eq!(a.status()["label_errors"], serde_json::json!({}));

    // A broken egress label: egress denied, a valid ingress label beside it still applies.
    let db = service(
        2,
        "db",
        &[
            ("netpol.ingress", "app1:5432/tcp"),
            ("netpol.egress", "app1:99999"),
        ],
    );
    up(&mut a, &db);
    assert!(!connects(&a, &db, &app1, 8080) && !connects(&a, &db, &app2, 8080));
    assert!(connects(&a, &app1, &db, 5432));
    assert!(!connects(&a, &app2, &db, 5432));
    assert!(endpoint_state(&mut a, &db).contains("egress default deny"));
}

/// db, open to app1, is closed to it by an edit of db.yaml: the edit is not held up.
fn db_closes_to_app1(a: &mut Agent, dirs: &Dirs, app1: &Container, db: &Container) {
    assert!(connects(a, app1, db, 5432));
    dirs.write_policy("db.yaml", &db_accepts("nobody", "TCP"));
    a.reload_policy_dir();
    a.sync_logged("test");
    assert!(
        !connects(a, app1, db, 5432),
        "db's edit was held up: {}",
        a.status()["last_error"]
    );
}

/// A shorthand label is bounded like a policy file: one of thousands of CIDRs (each an ipcache
/// entry, and compile time growing with their square) made every compile take minutes and not
/// fit the maps, so every other policy change was refused (db could not be closed). Over the
/// limit it is an error: its direction default deny, and the rest applies as usual.
#[test]
fn a_huge_netpol_label_is_an_error_and_holds_up_no_other_change() {
    let dirs = Dirs::new("label-huge");
    let (db, app1) = (service(2, "db", &[]), service(3, "app1", &[]));
    dirs.write_policy("db.yaml", &db_accepts("app1", "TCP"));
    let mut a = agent(&dirs);
    let cidrs = |n: usize| -> String {
        (0..n)
            .map(|i| format!("10.{}.{}.0/24:{}", i / 256, i % 256, 1 + i))
            .collect::<Vec<_>>()
            .join(",")
    };
    let huge = cidrs(crate::policy::limits::LABEL_ITEMS + 1);
    let evil = service(
        5,
        "evil",
        &[("netpol.ingress", huge.as_str()), ("netpol.egress", "")],
    );
    let t = std::time::Instant::now();
    snapshot(&mut a, &[&db, &app1, &evil]);
    db_closes_to_app1(&mut a, &dirs, &app1, &db);
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    let state = endpoint_state(&mut a, &evil);
    assert!(
        state.contains("ingress and egress default deny") || state.contains("ingress default deny"),
        "{state}"
    );
    assert!(state.contains("more than a label may hold"), "{state}");
    assert!(
        !connects(&a, &app1, &evil, 1),
        "the broken label's direction is default deny"
    );
    let long = "world:1,".repeat(crate::policy::limits::LABEL_BYTES / 8 + 1);
    let evil = service(5, "evil", &[("netpol.ingress", long.as_str())]);
    up(&mut a, &evil);
    assert!(endpoint_state(&mut a, &evil).contains("bytes, more than a label may hold"));

    // At the limit: applies.
    let most = cidrs(crate::policy::limits::LABEL_ITEMS);
    let big = service(5, "evil", &[("netpol.ingress", most.as_str())]);
    let t = std::time::Instant::now();
    up(&mut a, &big);
    eprintln!("a label at the limit: {:?}", t.elapsed());
    assert!(
        a.status()["label_errors"]
            .as_object()
            .is_some_and(|e| e.is_empty()),
        "{}",
        a.status()
    );
}

#[test]
fn an_unknown_netpol_label_makes_both_directions_default_deny() {
    let dirs = Dirs::new("unknown-label");
    let (app1, app2) = (service(3, "app1", &[]), service(4, "app2", &[]));
    let db = service(2, "db", &[("netpol.ingres", "app1:5432")]);
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db, &app1, &app2]);
    assert!(!connects(&a, &app1, &db, 5432));
    assert!(!connects(&a, &db, &app1, 8080));
    assert!(connects(&a, &app1, &app2, 8080), "others are not touched");
    let state = endpoint_state(&mut a, &db);
    assert!(
        state.contains("ingress and egress default deny") && state.contains("netpol.ingres"),
        "{state}"
    );
}

#[test]
fn netpol_labels_on_a_container_outside_compose_deny_what_they_name() {
    let dirs = Dirs::new("label-no-compose");
    let app1 = service(3, "app1", &[]);
    let plain = container(6, "plain", &[("netpol.ingress", "world:80")]);
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&plain, &app1]);
    assert!(!connects(&a, &app1, &plain, 80));
    assert!(connects(&a, &plain, &app1, 8080));
    assert!(endpoint_state(&mut a, &plain).contains("not part of a compose service"));
}

// ---------------------------------------------------------------------------------------------
// Item 3: a label opens only its own container; image labels are never policy.

#[test]
fn a_label_policy_cannot_widen_another_containers_policy() {
    let dirs = Dirs::new("label-widen");
    let (app1, app2) = (service(3, "app1", &[]), service(4, "app2", &[]));
    // The real db, protected by a policy file; and one with its labels plus netpol.ingress=all.
    let db = service(2, "db", &[]);
    let rogue = service(5, "db", &[("netpol.ingress", "all")]);
    dirs.write_policy("db.yaml", &db_accepts("app1", "TCP"));
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db, &app1, &app2, &rogue]);
    assert!(connects(&a, &app1, &db, 5432));
    assert!(
        !connects(&a, &app2, &db, 5432),
        "the rogue label opened the real db"
    );
    assert!(
        connects(&a, &app2, &rogue, 5432),
        "a label opens its own container"
    );

    // The same with the real db protected by its own label.
    let db = service(2, "db", &[("netpol.ingress", "app1:5432")]);
    dirs.remove_policy("db.yaml");
    a.reload_policy_dir();
    up(&mut a, &db);
    assert!(connects(&a, &app1, &db, 5432));
    assert!(!connects(&a, &app2, &db, 5432));
    assert!(!connects(&a, &app2, &db, 8080));

    // Same ingress label, one more (egress) label: still only its own container.
    let rogue = service(
        5,
        "db",
        &[("netpol.ingress", "app1:5432"), ("netpol.egress", "all")],
    );
    let db = service(
        2,
        "db",
        &[
            ("netpol.ingress", "app1:5432"),
            ("netpol.egress", "app1:8080"),
        ],
    );
    up(&mut a, &rogue);
    up(&mut a, &db);
    assert!(connects(&a, &db, &app1, 8080));
    assert!(
        !connects(&a, &db, &app2, 8080),
        "the rogue's egress=all reached the real db"
    );
    assert!(connects(&a, &rogue, &app2, 8080));
}

#[test]
fn netpol_labels_from_the_image_are_never_policy() {
    let dirs = Dirs::new("image-labels");
    let (app1, app2) = (service(3, "app1", &[]), service(4, "app2", &[]));
    let image = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let mut db = service(
        2,
        "db",
        &[("netpol.ingress", "all"), ("netpol.egress", "all")],
    );
    db.image_netpol_labels = Ok(image(&[
        ("netpol.ingress", "all"),
        ("netpol.egress", "all"),
    ]));
    dirs.write_policy("db.yaml", &db_accepts("app1", "TCP"));
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db, &app1, &app2]);
    assert!(connects(&a, &app1, &db, 5432));
    assert!(
        !connects(&a, &app2, &db, 5432),
        "the image's label opened db"
    );
    let state = endpoint_state(&mut a, &db);
    assert!(
        state.contains("not applied: the image has the same label and value"),
        "{state}"
    );
    assert!(a.status()["label_warnings"][&db.name]
        .as_str()
        .unwrap_or_default()
        .contains("netpol.ingress"));
    assert!(
        !connects(&a, &db, &app1, 8080),
        "the image's netpol.egress: all opened db's egress"
    );
    // In the identity (the deny selects by them): db does not share the plain db's number.
    let plain = service(2, "db", &[]);
    assert_ne!(
        identity_labels(&LabelFilter::default(), &super::labels_of(&db)),
        identity_labels(&LabelFilter::default(), &super::labels_of(&plain)),
    );

    // A value set on the container (differing from the image's) is its own: it applies.
    let mut db = service(2, "db", &[("netpol.ingress", "app2:5432")]);
    db.image_netpol_labels = Ok(image(&[("netpol.ingress", "all")]));
    dirs.remove_policy("db.yaml");
    a.reload_policy_dir();
    up(&mut a, &db);
    assert!(connects(&a, &app2, &db, 5432));
    assert!(!connects(&a, &app1, &db, 5432));

    // The image could not be inspected: the labels are not applied, and the directions they
    // name are default deny.
    let mut db = service(2, "db", &[("netpol.ingress", "all")]);
    db.image_netpol_labels = Err("Docker API inspect image: timeout".into());
    up(&mut a, &db);
    assert!(!connects(&a, &app1, &db, 5432) && !connects(&a, &app2, &db, 5432));
    assert!(connects(&a, &db, &app1, 8080));
    let state = endpoint_state(&mut a, &db);
    assert!(
        state.contains("ingress default deny") && state.contains("could not be inspected"),
        "{state}"
    );
}

/// A service that sets the very label its image carries (README: "set the label on the service
/// to use it") cannot be told from one that inherits it: that label must not leave the service
/// unrestricted, as ignoring it would. It allows nothing and makes its direction default deny.
#[test]
fn a_netpol_label_equal_to_the_images_is_default_deny_not_ignored() {
    let dirs = Dirs::new("image-label-equal");
    let (app1, app2) = (service(3, "app1", &[]), service(4, "app2", &[]));
    let mut db = service(2, "db", &[("netpol.ingress", "app1:5432")]);
    db.image_netpol_labels = Ok(BTreeMap::from([(
        "netpol.ingress".to_owned(),
        "app1:5432".to_owned(),
    )]));
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db, &app1, &app2]);
    assert!(
        !connects(&a, &app2, &db, 5432),
        "a label equal to the image's left db open to app2"
    );
    assert!(
        !connects(&a, &app1, &db, 5432),
        "a label that may be the image's allowed app1"
    );
    assert!(connects(&a, &db, &app1, 8080), "egress is not named: open");
    let state = endpoint_state(&mut a, &db);
    assert!(
        state.contains("ingress default deny") && state.contains("differs from the image's"),
        "{state}"
    );
    // Another value than the image's (another spacing) is the container's own: it applies.
    let mut own = service(2, "db", &[("netpol.ingress", "app1:5432 ")]);
    own.image_netpol_labels = db.image_netpol_labels.clone();
    up(&mut a, &own);
    assert!(connects(&a, &app1, &own, 5432) && !connects(&a, &app2, &own, 5432));
}

fn link(ifindex: u32, name: &str, kind: &str, master: Option<u32>) -> LinkInfo {
    LinkInfo {
        ifindex,
        name: name.to_owned(),
        mac: None,
        link: None,
        kind: Some(kind.to_owned()),
        master,
        link_netnsid: None,
    }
}

/// Issue 8 hole 6: a veth that joins a Docker bridge is policed from the kernel's link event on,
/// closed (no address: everything it sends is dropped as spoofed; nothing is let in) until
/// Docker identifies its container; veths elsewhere are never touched.
#[test]
fn a_veth_joining_a_docker_bridge_is_closed_until_docker_identifies_it() {
    use netpol_common::{endpoint::Endpoint, identity::UNMANAGED};
    let dirs = Dirs::new("provisional");
    let mut a = agent(&dirs);
    snapshot(&mut a, &[]);
    a.on_link(LinkEvent::Snapshot(vec![
        link(1, "lo", "", None),
        link(5, "br-net", "bridge", None),
        link(6, "br-other", "bridge", None),
    ]));
    // A veth on a bridge Docker does not know, and one on no bridge: never touched.
    a.on_link(LinkEvent::Changed(link(20, "vethx", "veth", Some(6))));
    a.on_link(LinkEvent::Changed(link(21, "vethy", "veth", None)));
    assert!(a.dp.attached().unwrap().is_empty());
    // A port joins Docker's bridge: policed at once, closed.
    let web = container(2, "web", &[("app", "web")]);
    let veth = ifindex(&web);
    a.on_link(LinkEvent::Changed(link(veth, "veth2", "veth", Some(5))));
    let closed = Endpoint::new(UNMANAGED).enforce(true, true);
    assert_eq!(a.dp.attached().unwrap(), vec![veth]);
    assert_eq!(maps(&a).endpoints[&veth], closed);
    // Docker reports the container: its real endpoint replaces the provisional one.
    a.on_docker(DockerEvent::ContainerUp(web.clone()));
    let ep = maps(&a).endpoints[&veth];
    assert_ne!(ep.identity, UNMANAGED);
    assert_eq!(ep.ipv4, [172, 20, 0, 2]);
    assert_eq!(a.dp.attached().unwrap(), vec![veth]);
    // The container goes while its veth is still there: closed again; the veth goes: detached.
    a.on_docker(DockerEvent::ContainerDown { id: web.id.clone() });
    assert_eq!(maps(&a).endpoints[&veth], closed);
    a.on_link(LinkEvent::Removed(veth));
    assert!(a.dp.attached().unwrap().is_empty());
    assert!(maps(&a).endpoints.is_empty());
}

/// `container` moved to a new address and veth, as a restart or recreate does.
fn restarted(c: &Container, n: u8) -> Container {
    let mut c = c.clone();
    c.id = format!("{n:064x}");
    c.networks[0].ipv4 = Some(Ipv4Addr::new(172, 20, 0, n));
    c.networks[0].host_veth = Some(100 + u32::from(n));
    c
}

#[test]
fn a_container_started_while_frozen_is_never_more_open_than_before() {
    let dirs = Dirs::new("frozen-restart");
    let (db, app1, app2) = (
        service(2, "db", &[]),
        service(3, "app1", &[]),
        service(4, "app2", &[]),
    );
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db, &app1, &app2]);
    import(&mut a, "db.yaml", &db_accepts("app1", "TCP")).expect("import");
    assert!(connects(&a, &app1, &db, 5432));
    assert!(!connects(&a, &app2, &db, 5432));
    let before = maps(&a);
    let links = a.dp.attached().expect("links");
    let stored = dirs.state().join("policies/db.yaml");
    let text = std::fs::read_to_string(&stored).expect("stored policy");
    std::fs::write(&stored, text.replace("TCP", "TPC")).expect("break it");
    drop(a);
    let mut dp = FakeDatapath::new(MapSizes::default());
    dp.state = before.clone();
    dp.links = links.into_iter().collect();
    let mut a = agent_on(&dirs, dp);
    snapshot(&mut a, &[&db, &app1, &app2]);
    assert_eq!(
        maps(&a).policy,
        before.policy,
        "policy entries stay as they are"
    );

    // db and app1 restarted while frozen (new addresses, new veths): db keeps its protection,
    // app1 its allowance.
    let (db2, app1b) = (restarted(&db, 12), restarted(&app1, 13));
    a.on_docker(DockerEvent::ContainerDown { id: db.id.clone() });
    up(&mut a, &db2);
    a.on_docker(DockerEvent::ContainerDown {
        id: app1.id.clone(),
    });
    up(&mut a, &app1b);
    assert!(!connects(&a, &app2, &db2, 5432), "restarted db unprotected");
    assert!(connects(&a, &app1b, &db2, 5432), "restarted app1 cut off");
    assert_eq!(maps(&a).policy, before.policy);
    // A container with an identity the old maps never saw: its policy is unknown, so it gets
    // none of the old allowances and is default deny both ways.
    let evil = service(20, "evil", &[]);
    up(&mut a, &evil);
    assert!(!connects(&a, &evil, &app2, 80), "unknown identity egress");
    assert!(!connects(&a, &app2, &evil, 80), "unknown identity ingress");
    assert!(!connects(&a, &evil, &db2, 5432));
    for c in [&evil, &db2] {
        let state = endpoint_state(&mut a, c);
        assert!(state.starts_with("enforced"), "{}: {state}", c.name);
    }
    // A new container given db's old address is not db.
    let squatter = restarted(&service(30, "squat", &[]), 2);
    up(&mut a, &squatter);
    assert_ne!(
        identity_of(&maps(&a), addr(&squatter)),
        identity_of(&before, addr(&db))
    );
    assert!(status_str(&a).contains("left as they are"));
}

#[test]
fn a_policy_moved_to_another_file_stays_in_force() {
    let dirs = Dirs::new("file-move");
    let (db, app1, app2) = (
        service(2, "db", &[]),
        service(3, "app1", &[]),
        service(4, "app2", &[]),
    );
    let web = db_accepts("app1", "TCP")
        .replace("name: db", "name: web")
        .replace("service: db", "service: web");
    let other = web.replace("name: web", "name: other");
    let db_policy = db_accepts("app1", "TCP");
    dirs.write_policy("a.yaml", &web);
    dirs.write_policy("b.yaml", &db_policy);
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db, &app1, &app2]);
    assert!(!connects(&a, &app2, &db, 5432));

    // Both files edited at once: db moves from b.yaml to a.yaml (read first).
    dirs.write_policy("a.yaml", &format!("{web}---\n{db_policy}"));
    dirs.write_policy("b.yaml", &other);
    a.reload_policy_dir();
    a.sync_logged("test");
    assert!(!connects(&a, &app2, &db, 5432), "db open after the move");
    assert!(connects(&a, &app1, &db, 5432));
    assert_eq!(a.status()["policy_files_rejected"], serde_json::json!({}));

    // One after the other: added to b.yaml first (a duplicate: rejected, a.yaml keeps it), then
    // removed from a.yaml; the next read accepts b.yaml.
    dirs.write_policy("b.yaml", &format!("{other}---\n{db_policy}"));
    a.reload_policy_dir();
    a.sync_logged("test");
    assert!(!connects(&a, &app2, &db, 5432));
    dirs.write_policy("a.yaml", &web);
    a.reload_policy_dir();
    a.sync_logged("test");
    assert!(
        !connects(&a, &app2, &db, 5432),
        "db open after the second move"
    );
    assert_eq!(a.status()["policy_files_rejected"], serde_json::json!({}));
    assert!(a.policy_rows(Some("db")).expect("db")[0]
        .source
        .ends_with("b.yaml"));
}

/// A stored policy that selects by a label a later `--ignore-label` leaves out of identities
/// selected nothing after the restart, silently: db ran unrestricted. It no longer parses now,
/// so the agent says so and fails closed.
#[test]
fn a_stored_policy_on_a_label_ignored_since_fails_closed() {
    let dirs = Dirs::new("ignore-since");
    let db = service(2, "db", &[("team", "db")]);
    let app2 = service(4, "app2", &[]);
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db, &app2]);
    let p = db_accepts("app1", "TCP").replace("com.docker.compose.service: db", "team: db");
    import(&mut a, "db.yaml", &p).expect("import");
    dirs.write_policy("web.yaml", &p.replace("name: db", "name: web"));
    a.reload_policy_dir();
    a.sync_logged("test");
    assert!(!connects(&a, &app2, &db, 5432));
    let (before, links) = (maps(&a), a.dp.attached().expect("links"));
    drop(a);
    let mut dp = FakeDatapath::new(MapSizes::default());
    dp.state = before;
    dp.links = links.into_iter().collect();
    let mut a = Agent::new(
        Box::new(dp),
        Store::new(dirs.state()),
        LabelFilter::checked(["team"]).expect("filter"),
        dirs.policy_dir(),
    )
    .expect("agent");
    a.reload_policy_dir();
    snapshot(&mut a, &[&db, &app2]);
    assert!(
        !connects(&a, &app2, &db, 5432),
        "db opened by --ignore-label"
    );
    let status = status_str(&a);
    assert!(
        status.contains("imported policy db no longer parses") && status.contains("team"),
        "{status}"
    );
    assert!(status.contains("web.yaml no longer parses"), "{status}");
}

/// Audit mode is switched on only by the operator: the container's own `netpol.audit` label,
/// a policy annotation, or `run --audit`; never by an image's label, nor by one the agent cannot
/// tell from an image's. It marks only enforced directions, and policy stays computed as usual.
#[test]
fn audit_mode_comes_from_the_containers_own_label_or_the_host_flag_never_the_image() {
    let dirs = Dirs::new("audit-label");
    let app1 = service(3, "app1", &[]);
    let audits = |a: &Agent, c: &Container| {
        let ep = maps(a).endpoints[&ifindex(c)];
        (
            ep.enforces(Direction::Ingress),
            ep.audits(Direction::Ingress),
            ep.audits(Direction::Egress),
        )
    };
    let own = service(
        2,
        "db",
        &[("netpol.ingress", "app1:5432"), ("netpol.audit", "true")],
    );
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&own, &app1]);
    // Enforced and audited in the direction the label enforces; egress is not enforced.
    assert_eq!(audits(&a, &own), (true, true, false));
    assert!(connects(&a, &app1, &own, 5432), "policy computed as usual");
    assert!(a.status()["label_errors"].as_object().unwrap().is_empty());

    // The same label from the image: not applied (warned), the container is enforced.
    let image = BTreeMap::from([("netpol.audit".to_owned(), "true".to_owned())]);
    let mut inherited = service(
        2,
        "db",
        &[("netpol.ingress", "app1:5432"), ("netpol.audit", "true")],
    );
    inherited.image_netpol_labels = Ok(image);
    up(&mut a, &inherited);
    assert_eq!(audits(&a, &inherited), (true, false, false));
    assert!(endpoint_state(&mut a, &inherited)
        .contains("netpol.audit not applied: the image has the same label"));

    // The image could not be inspected: not applied either (and no direction is closed for it
    // alone: egress stays open).
    let mut unverified = service(
        2,
        "db",
        &[("netpol.ingress", "app1:5432"), ("netpol.audit", "true")],
    );
    unverified.image_netpol_labels = Err("Docker API inspect image: timeout".into());
    up(&mut a, &unverified);
    let (_, ing, eg) = audits(&a, &unverified);
    assert!(!ing && !eg);
    assert!(connects(&a, &unverified, &app1, 8080));

    // A value that is not "true" or "false" is an error and leaves the container enforced.
    let typo = service(
        2,
        "db",
        &[("netpol.ingress", "app1:5432"), ("netpol.audit", "yes")],
    );
    up(&mut a, &typo);
    assert_eq!(audits(&a, &typo), (true, false, false));
    assert!(a.status()["label_errors"][&typo.name]
        .as_str()
        .unwrap_or_default()
        .contains("netpol.audit"));

    // run --audit: every enforced direction of every container.
    let plain = service(2, "db", &[("netpol.ingress", "app1:5432")]);
    a.set_audit_all(true);
    up(&mut a, &plain);
    assert_eq!(audits(&a, &plain), (true, true, false));
    assert_eq!(
        audits(&a, &app1),
        (false, false, false),
        "nothing enforced, nothing audited"
    );
    assert_eq!(a.status()["audit_all"], true);
}

/// A burst of Docker events applied in one reconcile enforces what one reconcile per event does,
/// a container that came and went within the burst included (identity numbers may differ: the
/// one that went never needed one).
#[test]
fn a_batch_of_docker_events_gives_the_maps_of_one_reconcile_each() {
    let db = service(2, "db", &[("netpol.ingress", "app1:5432/tcp")]);
    let (app1, app2, gone) = (
        service(3, "app1", &[]),
        service(4, "app2", &[]),
        service(5, "gone", &[("netpol.ingress", "app1:80/tcp")]),
    );
    let events = || {
        vec![
            DockerEvent::ContainerUp(db.clone()),
            DockerEvent::ContainerUp(app1.clone()),
            DockerEvent::ContainerUp(gone.clone()),
            DockerEvent::ContainerUp(app2.clone()),
            DockerEvent::ContainerDown {
                id: gone.id.clone(),
            },
        ]
    };
    let (d1, d2) = (Dirs::new("batch-one"), Dirs::new("batch-all"));
    let (mut one, mut all) = (agent(&d1), agent(&d2));
    snapshot(&mut one, &[]);
    snapshot(&mut all, &[]);
    for ev in events() {
        one.on_docker(ev);
    }
    all.on_docker_batch(events());
    let flags = |a: &Agent| -> Vec<(u32, u32)> {
        maps(a)
            .endpoints
            .iter()
            .map(|(i, e)| (*i, e.flags))
            .collect()
    };
    assert_eq!(flags(&all), flags(&one));
    assert_eq!(maps(&all).policy.len(), maps(&one).policy.len());
    for a in [&all, &one] {
        assert!(connects(a, &app1, &db, 5432));
        assert!(!connects(a, &app2, &db, 5432), "db stays protected");
    }
    assert!(
        !maps(&all).endpoints.contains_key(&ifindex(&gone)),
        "the container that went is not enforced as present"
    );
}

/// Issue 10: a rule's counters keep naming it when a policy is added before its own, an edited
/// rule starts from zero and the counters of the rule it replaced are removed, and a restart
/// from the state directory (or without the table) keeps every counter on its own rule.
#[test]
fn rule_counters_keep_naming_their_rule_across_edits_and_restarts() {
    use netpol_common::stats::{RuleStats, RuleStatsKey};
    let dirs = Dirs::new("rule-ids");
    let (db, app1) = (service(2, "db", &[]), service(3, "app1", &[]));
    let dp = FakeDatapath::new(MapSizes::default());
    let stats = dp.rule_stats.clone();
    let mut a = agent_on(&dirs, dp);
    snapshot(&mut a, &[&db, &app1]);
    import(&mut a, "db.yaml", &db_accepts("app1", "TCP")).expect("import");
    // The rule of `policy`/`section` that the POLICY entries carry, named as metrics name it.
    let rule = |a: &Agent, policy: &str, section: &str| -> u32 {
        let names = a.metrics_view().rules;
        let ids: std::collections::BTreeSet<u32> =
            maps(a).policy.values().map(|v| v.rule).collect();
        let found: Vec<u32> = ids
            .into_iter()
            .filter(|id| {
                names
                    .get(id)
                    .is_some_and(|r| r.policy == policy && r.section == section)
            })
            .collect();
        assert_eq!(found.len(), 1, "{policy} {section}: {found:?} in {names:?}");
        found[0]
    };
    let db_rule = rule(&a, "db", "ingress[0]");
    let db_id = maps(&a).endpoints[&ifindex(&db)].identity;
    let count = |rule: u32, id: u32| {
        stats.lock().unwrap().insert(
            RuleStatsKey::new(rule, id, Ingress),
            RuleStats {
                allowed: 7,
                ..RuleStats::default()
            },
        );
    };
    // What the kernel counted for db's rule.
    count(db_rule, db_id);

    // A policy named before "db" (compile order is by name): numbers given afresh would shift.
    let first = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: aaa}\nspec:\n  endpointSelector: {matchLabels: {com.docker.compose.service: app1}}\n  ingress: [{fromEntities: [host]}]\n";
    import(&mut a, "aaa.yaml", first).expect("import");
    assert_eq!(
        rule(&a, "db", "ingress[0]"),
        db_rule,
        "db's rule kept its id"
    );
    let aaa_rule = rule(&a, "aaa", "ingress[0]");
    assert_ne!(aaa_rule, db_rule);
    assert_eq!(
        stats
            .lock()
            .unwrap()
            .get(&RuleStatsKey::new(db_rule, db_id, Ingress)),
        Some(&RuleStats {
            allowed: 7,
            ..RuleStats::default()
        }),
        "db's counter stays, and still names db"
    );
    let app1_id = maps(&a).endpoints[&ifindex(&app1)].identity;
    count(aaa_rule, app1_id);

    // db's rule edited: a new rule, and the old one's counter goes with it.
    import(&mut a, "db.yaml", &db_accepts("app1", "UDP")).expect("import");
    let edited = rule(&a, "db", "ingress[0]");
    assert!(edited > aaa_rule, "an edit is a new number: {edited}");
    let keys: Vec<u32> = stats.lock().unwrap().keys().map(|k| k.rule).collect();
    assert_eq!(
        keys,
        [aaa_rule],
        "only the counters of rules in force remain"
    );

    // A restart from the state directory: the same ids.
    let before = maps(&a);
    drop(a);
    let restart = |stats: &std::sync::Arc<std::sync::Mutex<crate::datapath::RuleCounters>>| {
        let mut dp = FakeDatapath::new(MapSizes::default());
        dp.state = before.clone();
        dp.rule_stats = stats.clone();
        let mut a = agent_on(&dirs, dp);
        snapshot(&mut a, &[&db, &app1]);
        a
    };
    let a = restart(&stats);
    assert_eq!(rule(&a, "db", "ingress[0]"), edited);
    assert_eq!(rule(&a, "aaa", "ingress[0]"), aaa_rule);
    assert_eq!(stats.lock().unwrap().len(), 1, "the counter survived");
    drop(a);

    // Without the table (lost): new numbers above every one in the maps, and the old counters
    // go, so that none of them is read as another rule's.
    std::fs::remove_file(dirs.state().join("rule-ids.json")).expect("the table was saved");
    let a = restart(&stats);
    let (d, f) = (rule(&a, "db", "ingress[0]"), rule(&a, "aaa", "ingress[0]"));
    assert!(d > edited && f > edited, "{d} {f} above {edited}");
    assert!(stats.lock().unwrap().is_empty());
}

/// Identities are written after the maps (in `run` by a background task): an agent killed in
/// between leaves maps that use a number `identities.json` does not have. The next agent must
/// not give that number to other labels: its reconcile writes the ipcache first and removes
/// stale `POLICY` entries last, so in between a container with the reused number would have the
/// allowances of the one that held it (a new flow then, and its conntrack entry, would outlive
/// the reconcile).
#[test]
fn a_number_in_the_maps_is_not_given_to_other_labels_after_a_lost_identity_write() {
    let dirs = Dirs::new("lost-identities");
    let (db, app1) = (service(2, "db", &[]), service(9, "app1", &[]));
    let evil = service(5, "evil", &[]);
    let mut a = agent_on(&dirs, FakeDatapath::new(MapSizes::default()));
    snapshot(&mut a, &[&db]);
    import(&mut a, "db.yaml", &db_accepts("app1", "TCP")).expect("import");
    let ids = dirs.state().join("identities.json");
    let written = std::fs::read(&ids).expect("identities saved");
    // app1 starts; its identity reaches the maps, the write of identities.json is lost.
    snapshot(&mut a, &[&db, &app1]);
    assert!(connects(&a, &app1, &db, 5432));
    let before = maps(&a);
    let app1_id = before.endpoints[&ifindex(&app1)].identity;
    drop(a);
    std::fs::write(&ids, &written).expect("the lost write");

    let mut dp = FakeDatapath::new(MapSizes::default());
    dp.state = before.clone();
    let mut a = agent_on(&dirs, dp);
    // evil's container sorts before app1's: it is identified first.
    snapshot(&mut a, &[&evil, &db, &app1]);
    let after = maps(&a);
    let evil_id = after.endpoints[&ifindex(&evil)].identity;
    assert_ne!(evil_id, app1_id, "evil got the number app1 had in the maps");
    // The reconcile's window: new ipcache, old POLICY entries.
    let mut window = after.clone();
    window.policy = before.policy.clone();
    assert!(
        !passes(&window, &db, &evil, Ingress, 5432),
        "while the reconcile runs, evil reaches db:5432 with app1's allowance"
    );
    assert!(connects(&a, &app1, &db, 5432), "app1 still reaches db");
    assert!(!connects(&a, &evil, &db, 5432));
}

/// A state file's damages that any reader must survive: `good` emptied, cut in half, garbage,
/// JSON of another shape.
fn damaged_json(good: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("empty", Vec::new()),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("garbage", b"\x00\xff{not json".to_vec()),
        ("not a table", b"[1, 2, 3]".to_vec()),
    ]
}

/// The contents of the copies of state file `name` that the agent set aside as damaged.
fn kept_aside(dirs: &Dirs, name: &str) -> Vec<Vec<u8>> {
    std::fs::read_dir(dirs.state())
        .expect("state dir")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{name}.damaged-"))
        })
        .map(|e| std::fs::read(e.path()).expect("kept copy"))
        .collect()
}

/// Every label identity number in the maps (`ENDPOINTS`, the ipcache, `POLICY`).
fn label_numbers(m: &MapState) -> std::collections::BTreeSet<u32> {
    let label =
        |id: &u32| (netpol_common::identity::FIRST_LABEL..crate::identity::FIRST_CIDR).contains(id);
    m.endpoints
        .values()
        .map(|e| e.identity)
        .chain(m.ipcache.values().map(|v| v.identity))
        .chain(m.policy.keys().flat_map(|k| [k.key.local, k.key.remote]))
        .filter(label)
        .collect()
}

/// A damaged, truncated or hostile `identities.json` never stops the agent (under systemd that
/// was a restart loop in which new containers got no enforcement) and never gives a label set a
/// number the maps hold for another: the file is kept aside under a name of its own, every
/// label set gets a number above those in the maps, each container keeps its policy, and at
/// no point of the reconcile does a container reach more than before.
#[test]
fn a_damaged_identity_table_never_stops_the_agent_nor_hands_out_a_number_in_the_maps() {
    let (db, app1, app2) = (
        service(2, "db", &[]),
        service(3, "app1", &[]),
        service(4, "app2", &[]),
    );
    let evil = service(5, "evil", &[]);
    let set = |svc: &str| {
        format!(
            r#"{{"com.docker.compose.project": "shop", "com.docker.compose.service": "{svc}"}}"#
        )
    };
    // Written by the first agent of each case, so the numbers are the ones the maps hold.
    let setup = |dirs: &Dirs| -> (MapState, BTreeMap<String, u32>, Vec<u8>) {
        let mut a = agent(dirs);
        snapshot(&mut a, &[&db, &app1, &app2]);
        import(&mut a, "db.yaml", &db_accepts("app1", "TCP")).expect("import");
        assert!(connects(&a, &app1, &db, 5432) && !connects(&a, &app2, &db, 5432));
        let m = maps(&a);
        let ids = [&db, &app1, &app2]
            .iter()
            .map(|c| (c.name.clone(), m.endpoints[&ifindex(c)].identity))
            .collect();
        let good = std::fs::read(dirs.state().join("identities.json")).expect("saved");
        (m, ids, good)
    };
    let probe = Dirs::new("ids-damaged-probe");
    let (_, ids, good) = setup(&probe);
    drop(probe);
    let app1_id = ids["shop-app1-1"];
    let mut cases = damaged_json(&good);
    let table = |entries: &[(String, String)]| -> Vec<u8> {
        let entries: Vec<String> = entries.iter().map(|(n, l)| format!("{n:?}: {l}")).collect();
        format!(r#"{{"identities": {{{}}}}}"#, entries.join(", ")).into_bytes()
    };
    let one = |n: &str, l: String| table(&[(n.to_owned(), l)]);
    let app1_n = app1_id.to_string();
    cases.extend([
        (
            "identities not a map",
            br#"{"next": 300, "identities": [1]}"#.to_vec(),
        ),
        ("null", b"null".to_vec()),
        // Another file's shape would be an empty table, and written over.
        (
            "the rule id table",
            br#"{"next": 9, "rules": [{"id": 4, "policy": "a", "selector": "{}", "section": "ingress", "rule": "x"}]}"#.to_vec(),
        ),
        (
            "the table one level down",
            format!(r#"{{"state": {}}}"#, String::from_utf8_lossy(&good)).into_bytes(),
        ),
        // JSON keeps the last of two equal keys: evil would get app1's number.
        (
            "duplicate numbers",
            table(&[(app1_n.clone(), set("app1")), (app1_n.clone(), set("evil"))]),
        ),
        (
            "duplicate label key",
            one(
                &app1_n,
                set("app1").replace('}', r#", "com.docker.compose.service": "evil"}"#),
            ),
        ),
        (
            "two numbers for one label set",
            table(&[
                (app1_n.clone(), set("app1")),
                ((app1_id + 1).to_string(), set("app1")),
            ]),
        ),
        ("reserved number (host)", one("1", set("evil"))),
        ("reserved number (any)", one("0", set("evil"))),
        ("below the label range", one("255", set("evil"))),
        (
            "a CIDR identity",
            one(&crate::identity::FIRST_CIDR.to_string(), set("evil")),
        ),
        ("a negative number", one("-1", set("evil"))),
        // Could have been written by another user: not vouched for (4074fa5).
        ("a good table others can write", good.clone()),
    ]);
    for (what, bytes) in cases {
        let dirs = Dirs::new("ids-damaged");
        let (before, ids, _) = setup(&dirs);
        let file = dirs.state().join("identities.json");
        std::fs::write(&file, &bytes).expect("damage");
        if what.contains("others can write") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        }
        let mut dp = FakeDatapath::new(MapSizes::default());
        dp.state = before.clone();
        let mut a = started(&dirs, dp, what);
        // Nothing lost: the damaged file is kept, byte for byte, under a name that says why.
        assert_eq!(
            kept_aside(&dirs, "identities.json"),
            std::slice::from_ref(&bytes),
            "{what}"
        );
        // (Containers go by id: evil is identified last; every new number is above the maps'.)
        snapshot(&mut a, &[&evil, &db, &app1, &app2]);
        let after = maps(&a);
        let held = label_numbers(&before);
        for c in [&evil, &db, &app1, &app2] {
            let id = after.endpoints[&ifindex(c)].identity;
            assert!(
                ids.get(&c.name) == Some(&id) || !held.contains(&id),
                "{what}: {} got {id}, a number the maps hold for other labels ({ids:?})",
                c.name
            );
        }
        assert!(
            connects(&a, &app1, &db, 5432),
            "{what}: app1 lost its allowance"
        );
        assert!(!connects(&a, &app2, &db, 5432), "{what}: app2 reaches db");
        assert!(!connects(&a, &evil, &db, 5432), "{what}: evil reaches db");
        for m in &reconcile_windows(&before, &after) {
            for c in [&evil, &app2] {
                assert!(
                    !passes(m, &db, c, Ingress, 5432),
                    "{what}: {} reaches db mid-reconcile",
                    c.name
                );
            }
        }
        // The rebuilt table is saved and taken back by the next start: numbers stay.
        drop(a);
        let mut dp = FakeDatapath::new(MapSizes::default());
        dp.state = after.clone();
        let mut b = agent_on(&dirs, dp);
        snapshot(&mut b, &[&evil, &db, &app1, &app2]);
        assert_eq!(
            maps(&b).endpoints,
            after.endpoints,
            "{what}: numbers moved again"
        );
    }
}

/// The floor of numbers above those in the maps has nowhere to go once the maps hold the last
/// label number (the counter wrapped around: a long-lived host whose containers carry a label of
/// their own each, or a table whose `next` is near the top). A new label set must still never get
/// a number the maps hold for another one: not after a damaged table (a new one starts), not
/// after a lost write of a wrapped table. Here db got the last number, app1 and app2 the first
/// ones after the wrap; evil, identified first at the next start, must not get app1's.
#[test]
fn a_wrapped_counter_never_hands_out_a_number_in_the_maps() {
    let (db, app1, app2) = (
        service(3, "db", &[]),
        service(4, "app1", &[]),
        service(6, "app2", &[]),
    );
    // Container 2: identified first (containers go by id).
    let evil = service(2, "evil", &[]);
    let last = crate::identity::LAST_LABEL;
    for what in ["damaged table", "lost write"] {
        let dirs = Dirs::new("ids-wrapped");
        std::fs::create_dir_all(dirs.state()).expect("state dir");
        let file = dirs.state().join("identities.json");
        std::fs::write(&file, format!(r#"{{"next": {last}, "identities": {{}}}}"#)).expect("table");
        let mut a = agent(&dirs);
        snapshot(&mut a, &[&db]);
        import(&mut a, "db.yaml", &db_accepts("app1", "TCP")).expect("import");
        let db_only = std::fs::read(&file).expect("saved");
        snapshot(&mut a, &[&db, &app1, &app2]);
        let before = maps(&a);
        assert_eq!(before.endpoints[&ifindex(&db)].identity, last);
        let app1_id = before.endpoints[&ifindex(&app1)].identity;
        assert!(connects(&a, &app1, &db, 5432) && !connects(&a, &app2, &db, 5432));
        drop(a);
        match what {
            "damaged table" => std::fs::write(&file, b"{\"identities\": {\"2").expect("damage"),
            _ => std::fs::write(&file, &db_only).expect("the lost write"),
        }

        let mut dp = FakeDatapath::new(MapSizes::default());
        dp.state = before.clone();
        let mut a = agent_on(&dirs, dp);
        snapshot(&mut a, &[&evil, &db, &app1, &app2]);
        let after = maps(&a);
        let held = label_numbers(&before);
        for c in [&evil, &db, &app1, &app2] {
            let (old, id) = (
                before.endpoints.get(&ifindex(c)).map(|e| e.identity),
                after.endpoints[&ifindex(c)].identity,
            );
            assert!(
                old == Some(id) || !held.contains(&id),
                "{what}: {} got {id}, a number the maps hold for other labels (app1 had {app1_id}; {held:?})",
                c.name
            );
        }
        for m in &reconcile_windows(&before, &after) {
            for c in [&evil, &app2] {
                assert!(
                    !passes(m, &db, c, Ingress, 5432),
                    "{what}: {} reaches db mid-reconcile",
                    c.name
                );
            }
        }
        assert!(
            connects(&a, &app1, &db, 5432),
            "{what}: app1 lost its allowance"
        );
        assert!(!connects(&a, &evil, &db, 5432), "{what}: evil reaches db");
    }
}

/// A CIDR prefix never gets the number another prefix has in the maps: the reconcile writes
/// the ipcache first and removes stale `POLICY` entries last, so in between addresses of the new
/// prefix would have the old one's allowances (and a flow opened then outlives the reconcile:
/// conntrack compares no CIDR identity). Here one change replaces db's allowed prefix and
/// brings app2's prefix, which sorts first.
#[test]
fn a_cidr_number_in_the_maps_is_not_given_to_another_prefix() {
    let dirs = Dirs::new("cidr-renumber");
    let (db, app2) = (service(2, "db", &[]), service(4, "app2", &[]));
    let egress = |name: &str, svc: &str, cidr: &str| crate::daemon::api::SourceFile {
        path: format!("{name}.yaml"),
        text: format!(
            r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: {name}
spec:
  endpointSelector:
    matchLabels:
      com.docker.compose.service: {svc}
  egress:
    - toCIDR: ["{cidr}"]
      toPorts:
        - ports: [{{ port: "443", protocol: TCP }}]
"#
        ),
    };
    let reaches = |m: &MapState, ip: &str| {
        let ep = m.endpoints[&ifindex(&db)];
        let remote = identity_of(m, ip.parse().unwrap());
        let [k1, k2] = lookup_keys(ep.identity, remote, Egress, TCP, 443);
        matches!(
            decide(lpm(&m.policy, &k1), lpm(&m.policy, &k2)),
            Verdict::Allow(_)
        )
    };
    let first = |dirs: &Dirs| {
        let mut a = agent(dirs);
        snapshot(&mut a, &[&db, &app2]);
        a.import(&[egress("db-out", "db", "10.1.0.0/16")])
            .expect("import");
        let before = maps(&a);
        assert!(reaches(&before, "10.1.0.7") && !reaches(&before, "10.0.5.7"));
        (a, before)
    };
    let change = [
        egress("db-out", "db", "10.2.0.0/16"),
        egress("app2-out", "app2", "10.0.5.0/24"),
    ];
    let check = |what: &str, before: &MapState, after: &MapState| {
        assert!(
            reaches(after, "10.2.0.7") && !reaches(after, "10.0.5.7"),
            "{what}"
        );
        let [window, _] = reconcile_windows(before, after);
        assert!(
            !reaches(&window, "10.0.5.7"),
            "{what}: while the reconcile runs, db reaches app2's prefix with its old prefix's number"
        );
    };
    let (mut a, before) = first(&dirs);
    a.import(&change).expect("import");
    check("live", &before, &maps(&a));

    // The same change made while the agent was stopped (the stored policies edited), and the
    // next agent starts with the maps of the last one.
    drop(a);
    let dirs = Dirs::new("cidr-renumber-restart");
    let (a, before) = first(&dirs);
    drop(a);
    let store = Store::new(dirs.state());
    for f in &change {
        let name = f.path.trim_end_matches(".yaml");
        store
            .save_policy(name, &f.text)
            .expect("edit the stored policy");
    }
    let mut dp = FakeDatapath::new(MapSizes::default());
    dp.state = before.clone();
    let mut a = agent_on(&dirs, dp);
    snapshot(&mut a, &[&db, &app2]);
    check("after a restart", &before, &maps(&a));
}

/// A damaged `identities.json` while a stored policy no longer parses (the maps are left as
/// they are): the containers' new numbers are ones the maps never had, so they are default
/// deny both ways, never more open than before (and less: until the policy is fixed).
#[test]
fn a_damaged_identity_table_while_frozen_is_never_more_open() {
    let dirs = Dirs::new("ids-damaged-frozen");
    let (db, app1, app2) = (
        service(2, "db", &[]),
        service(3, "app1", &[]),
        service(4, "app2", &[]),
    );
    let evil = service(5, "evil", &[]);
    let mut a = agent(&dirs);
    snapshot(&mut a, &[&db, &app1, &app2]);
    import(&mut a, "db.yaml", &db_accepts("app1", "TCP")).expect("import");
    let before = maps(&a);
    let links = a.dp.attached().expect("links");
    drop(a);
    let stored = dirs.state().join("policies/db.yaml");
    let text = std::fs::read_to_string(&stored).expect("stored policy");
    std::fs::write(&stored, text.replace("TCP", "TPC")).expect("break it");
    std::fs::write(dirs.state().join("identities.json"), b"{").expect("damage");
    let mut dp = FakeDatapath::new(MapSizes::default());
    dp.state = before.clone();
    dp.links = links.into_iter().collect();
    let mut a = started(&dirs, dp, "frozen");
    snapshot(&mut a, &[&db, &app1, &app2, &evil]);
    assert_eq!(
        maps(&a).policy,
        before.policy,
        "policy entries left as they are"
    );
    // The price: app1 loses its allowance too, until the stored policy is fixed.
    for (from, to) in [
        (&app2, &db),
        (&evil, &db),
        (&evil, &app1),
        (&app1, &evil),
        (&app1, &db),
    ] {
        assert!(
            !connects(&a, from, to, 5432),
            "{} reaches {}",
            from.name,
            to.name
        );
    }
    let status = a.status();
    assert!(
        status["state_recovered"]
            .to_string()
            .contains("identities.json"),
        "{status}"
    );
}

/// A damaged `identities.json` when the maps cannot be read: which numbers the kernel holds is
/// unknown, so no number can be given safely; the agent says so and does not start, and leaves
/// the file where it is.
#[test]
fn a_damaged_identity_table_with_unreadable_maps_is_a_clear_error() {
    let dirs = Dirs::new("ids-damaged-unreadable");
    std::fs::create_dir_all(dirs.state()).expect("state dir");
    let file = dirs.state().join("identities.json");
    std::fs::write(&file, b"{not json").expect("damage");
    let mut dp = FakeDatapath::new(MapSizes::default());
    dp.fail_reads = true;
    let e = Agent::new(
        Box::new(dp),
        Store::new(dirs.state()),
        LabelFilter::default(),
        dirs.policy_dir(),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(
        e.contains("identities.json is damaged") && e.contains("the maps cannot be read"),
        "{e}"
    );
    assert_eq!(std::fs::read(&file).expect("left in place"), b"{not json");
}

/// A damaged, truncated or hostile `rule-ids.json` never stops the agent nor makes a counter of
/// the maps name another rule: the agent starts, enforces as before, and a rule whose number
/// the table cannot vouch for gets one above every number in the maps (or, once the range is
/// said to be used up, a number whose old counters are removed first).
#[test]
fn a_damaged_rule_id_table_never_stops_the_agent_nor_misnames_a_counter() {
    use netpol_common::stats::{RuleStats, RuleStatsKey};
    let dirs = Dirs::new("rule-ids-damaged");
    let (db, app1) = (service(2, "db", &[]), service(3, "app1", &[]));
    let dp = FakeDatapath::new(MapSizes::default());
    let stats = dp.rule_stats.clone();
    let mut a = agent_on(&dirs, dp);
    snapshot(&mut a, &[&db, &app1]);
    import(&mut a, "db.yaml", &db_accepts("app1", "TCP")).expect("import");
    let db_rule = |a: &Agent| -> u32 {
        let ids: std::collections::BTreeSet<u32> =
            maps(a).policy.values().map(|v| v.rule).collect();
        assert_eq!(ids.len(), 1, "{ids:?}");
        let id = *ids.iter().next().expect("one rule");
        let names = a.metrics_view().rules;
        assert!(
            names.get(&id).is_some_and(|r| r.policy == "db"),
            "{id} in {names:?}"
        );
        id
    };
    let first = db_rule(&a);
    let db_id = maps(&a).endpoints[&ifindex(&db)].identity;
    // What the kernel counted for db's rule under `rule`, its number in the maps.
    let counted_under = |rule: u32| {
        let mut s = stats.lock().unwrap();
        s.clear();
        s.insert(
            RuleStatsKey::new(rule, db_id, Ingress),
            RuleStats {
                allowed: 7,
                ..RuleStats::default()
            },
        );
    };
    let before = maps(&a);
    drop(a);
    let table = dirs.state().join("rule-ids.json");
    let good = std::fs::read(&table).expect("the table was saved");
    let mut cases = damaged_json(&good);
    cases.extend([
        (
            "duplicate ids",
            br#"{"next": 9, "rules": [{"id": 4, "policy": "a", "selector": "{}", "section": "ingress", "rule": "x"}, {"id": 4, "policy": "b", "selector": "{}", "section": "ingress", "rule": "x"}]}"#.to_vec(),
        ),
        (
            "id 0",
            br#"{"next": 9, "rules": [{"id": 0, "policy": "a", "selector": "{}", "section": "ingress", "rule": "x"}]}"#.to_vec(),
        ),
        ("range used up", br#"{"next": 4294967295, "rules": []}"#.to_vec()),
        (
            "the last id",
            br#"{"next": 1, "rules": [{"id": 4294967295, "policy": "a", "selector": "{}", "section": "ingress", "rule": "x"}]}"#.to_vec(),
        ),
        ("next 0", br#"{"next": 0, "rules": []}"#.to_vec()),
    ]);
    for (what, bytes) in cases {
        std::fs::write(&table, &bytes).expect("write");
        counted_under(first);
        let mut dp = FakeDatapath::new(MapSizes::default());
        dp.state = before.clone();
        dp.rule_stats = stats.clone();
        let mut a = agent_on(&dirs, dp);
        // A table that does not load is kept aside, not written over.
        let unloadable = !matches!(what, "range used up" | "the last id" | "next 0");
        let kept = kept_aside(&dirs, "rule-ids.json").contains(&bytes);
        assert_eq!(kept, unloadable, "{what}: kept aside");
        snapshot(&mut a, &[&db, &app1]);
        let m = maps(&a);
        assert_eq!(m.endpoints, before.endpoints, "{what}: enforcement changed");
        let strip = |m: &MapState| -> Vec<PolicyEntryKey> { m.policy.keys().copied().collect() };
        assert_eq!(strip(&m), strip(&before), "{what}: other entries");
        let now = db_rule(&a);
        let counters: Vec<(u32, u64)> = stats
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.rule, v.allowed))
            .collect();
        // The old counter survives only under its own rule's number.
        for (rule, _) in &counters {
            assert_eq!(
                *rule, now,
                "{what}: a counter of rule {rule} left beside {now}"
            );
        }
        if now == first {
            assert!(
                counters.is_empty(),
                "{what}: db's number {now} came from a table that cannot vouch for it, yet its old counter {counters:?} stayed"
            );
        }
        drop(a);
    }

    // db's own rule at the top of the range, in the table and in the maps (an agent ran with
    // such a table): renumbered, its counters under the old number go, and later rules get
    // growing numbers again, none given out a second time.
    let top = u32::MAX;
    let text = String::from_utf8(good).expect("utf-8");
    let wild = text.replace(&format!("\"id\": {first}"), &format!("\"id\": {top}"));
    assert_ne!(wild, text);
    std::fs::write(&table, wild).expect("write");
    let mut dp = FakeDatapath::new(MapSizes::default());
    dp.state = before.clone();
    for v in dp.state.policy.values_mut() {
        v.rule = top;
    }
    counted_under(top);
    dp.rule_stats = stats.clone();
    let mut a = agent_on(&dirs, dp);
    snapshot(&mut a, &[&db, &app1]);
    let now = db_rule(&a);
    assert!(now < top && now > first, "db's rule renumbered: {now}");
    assert!(
        stats.lock().unwrap().is_empty(),
        "the old number's counters go"
    );
    assert!(connects(&a, &app1, &db, 5432));
    let mut last = now;
    for n in 0..3 {
        let name = format!("web{n}");
        import(
            &mut a,
            &format!("{name}.yaml"),
            &db_accepts("app1", "UDP").replace("name: db", &format!("name: {name}")),
        )
        .expect("import");
        let rules = a.metrics_view().rules;
        let id = rules
            .iter()
            .find(|(_, r)| r.policy == name)
            .map(|(id, _)| *id)
            .expect("web's rule");
        assert_eq!(
            id,
            last + 1,
            "{name}: a growing number, not one given out again"
        );
        last = id;
    }
}

/// Containers coming and going one Docker event at a time (each reconcile compiles only the
/// identities the change concerns) leave exactly the maps that an agent compiling everything
/// from scratch writes for the same containers, with selectors between services.
#[test]
fn incremental_compiles_write_the_maps_of_a_full_compile() {
    let dirs = Dirs::new("incremental");
    dirs.write_policy(
        "shop.yaml",
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: shop}
spec:
  endpointSelector: {matchLabels: {com.docker.compose.project: shop}}
  ingress:
  - fromEndpoints: [{matchLabels: {tier: front}}]
    toPorts: [{ports: [{port: "80"}]}]
  egressDeny:
  - toEndpoints: [{matchLabels: {tier: back}}]
    toPorts: [{ports: [{port: "22"}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db}
spec:
  endpointSelector: {matchLabels: {tier: back}}
  ingress:
  - fromEndpoints: [{matchLabels: {com.docker.compose.service: app1}}]
    toPorts: [{ports: [{port: "5432"}]}]
"#,
    );
    let mut a = agent(&dirs);
    snapshot(&mut a, &[]);
    let db = service(2, "db", &[("tier", "back")]);
    let app1 = service(3, "app1", &[("tier", "front")]);
    let app2 = service(4, "app2", &[("tier", "front")]);
    let app1b = restarted(&app1, 5);
    let cache = service(6, "cache", &[("tier", "back")]);
    let db2 = restarted(&db, 7);
    let up = |c: &Container| DockerEvent::ContainerUp(c.clone());
    let down = |c: &Container| DockerEvent::ContainerDown { id: c.id.clone() };
    let steps = [
        up(&db),
        up(&app1),
        up(&app2),
        up(&app1b),
        up(&cache),
        down(&app1),
        down(&db),
        up(&db2),
        down(&app1b),
        down(&cache),
    ];
    for (i, ev) in steps.into_iter().enumerate() {
        a.on_docker(ev);
        // A fresh agent on the same state (the same identity numbers) compiles in full.
        let running: Vec<Container> = a.containers.values().cloned().collect();
        let mut fresh = agent_on(&dirs, FakeDatapath::new(MapSizes::default()));
        snapshot(&mut fresh, &running.iter().collect::<Vec<_>>());
        assert_eq!(maps(&a), maps(&fresh), "step {i}");
        assert_eq!(a.compiled, fresh.compiled, "step {i}");
    }
    let m = maps(&a);
    assert!(
        passes(&m, &db2, &app2, Ingress, 80),
        "the restarted db takes the front"
    );
    assert!(
        !passes(&m, &db2, &app2, Ingress, 5432),
        "and app1 only on 5432"
    );
}

/// A container start among many compares only the policy entries of the identities it
/// concerns with the maps (its own: no other policy selects it as a peer), and so does its
/// stop; the maps are a full sync's.
#[test]
fn a_container_start_compares_only_the_policy_entries_it_concerns() {
    let dirs = Dirs::new("scoped-start");
    dirs.write_policy(
        "bench.yaml",
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bench}\nspec:\n  endpointSelector: {matchLabels: {com.docker.compose.project: shop}}\n  ingress:\n  - fromEntities: [host]\n    toPorts: [{ports: [{port: \"80\"}, {port: \"81\"}, {port: \"82\"}, {port: \"83\"}, {port: \"84\"}]}]\n",
    );
    let mut a = agent(&dirs);
    let running: Vec<Container> = (2..42).map(|n| service(n, &format!("s{n}"), &[])).collect();
    snapshot(&mut a, &running.iter().collect::<Vec<_>>());
    // Each port for TCP, UDP and SCTP.
    assert_eq!(maps(&a).policy.len(), 40 * 15);
    let new = service(50, "new", &[]);
    for (i, ev) in [
        DockerEvent::ContainerUp(new.clone()),
        DockerEvent::ContainerDown { id: new.id.clone() },
    ]
    .into_iter()
    .enumerate()
    {
        a.on_docker(ev);
        assert!(a.last_error.is_none(), "{:?}", a.last_error);
        assert_eq!(a.reconciler.compared_policy(), 15, "step {i}");
        let running: Vec<Container> = a.containers.values().cloned().collect();
        let mut fresh = agent_on(&dirs, FakeDatapath::new(MapSizes::default()));
        snapshot(&mut fresh, &running.iter().collect::<Vec<_>>());
        assert_eq!(maps(&a), maps(&fresh), "step {i}");
        assert_eq!(a.compiled, fresh.compiled, "step {i}");
    }
}

/// Random Docker events (starts, restarts on new veths, label changes, stops, bursts, veths
/// that join the bridge before Docker reports their container, writes that fail) on an agent
/// that compiles and compares only what each event changed leave, after every step, the maps
/// and compile of an agent that compiles and reconciles everything from scratch for the same
/// containers. A failed event-scoped write falls back to a full reconcile at once.
#[test]
fn event_scoped_syncs_write_the_maps_of_a_full_sync_after_random_events() {
    use crate::policy::fuzz::Rng;
    let dirs = Dirs::new("scoped-random");
    dirs.write_policy(
        "p.yaml",
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {tier: front}}]
    toPorts: [{ports: [{port: "80"}, {port: "8080", protocol: TCP}]}]
  - fromEntities: [host]
  egress:
  - toEndpoints: [{matchLabels: {tier: back}}]
    toPorts: [{ports: [{port: "5432"}]}]
  - toCIDR: [10.0.0.0/8]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: back}
spec:
  endpointSelector: {matchLabels: {tier: back}}
  ingress:
  - fromEndpoints: [{matchExpressions: [{key: app, operator: In, values: [web, api]}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {env: test}}]
    toPorts: [{ports: [{port: "22"}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: tests, annotations: {netpol.io/audit: "true"}}
spec:
  endpointSelector: {matchExpressions: [{key: env, operator: Exists}]}
  egress:
  - toEndpoints: [{matchExpressions: [{key: app, operator: NotIn, values: [db]}]}]
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"#,
    );
    let dp = FakeDatapath::new(MapSizes::default());
    let fail = dp.fail_after_shared.clone();
    let mut a = agent_on(&dirs, dp);
    let bridge = 5;
    a.on_link(LinkEvent::Snapshot(vec![
        link(1, "lo", "", None),
        link(bridge, "br-net", "bridge", None),
    ]));
    snapshot(&mut a, &[]);
    let mut rng = Rng(0x5c0b_ed02);
    let labels = |rng: &mut Rng| -> Vec<(&'static str, &'static str)> {
        let mut l = Vec::new();
        for (k, vs) in [
            ("app", &["web", "api", "db"][..]),
            ("tier", &["front", "back"][..]),
            ("env", &["test", "prod"][..]),
        ] {
            if rng.below(3) > 0 {
                l.push((k, vs[rng.below(vs.len())]));
            }
        }
        l
    };
    let mut absorbed = 0;
    for step in 0..200 {
        let running: Vec<Container> = a.containers.values().cloned().collect();
        let n_events = if rng.below(5) == 0 {
            2 + rng.below(3)
        } else {
            1
        };
        let mut events = Vec::new();
        for _ in 0..n_events {
            let free = (2..60u8).find(|n| {
                let n = *n as usize + rng.below(58);
                let n = (2 + n % 58) as u8;
                !running.iter().any(|c| ifindex(c) == 100 + u32::from(n))
            });
            match (rng.below(4), running.get(rng.below(running.len().max(1)))) {
                (0, Some(c)) => events.push(DockerEvent::ContainerDown { id: c.id.clone() }),
                (1, Some(c)) => {
                    // New labels, same container.
                    let mut c = c.clone();
                    c.labels = labels(&mut rng)
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect();
                    events.push(DockerEvent::ContainerUp(c));
                }
                _ => {
                    if let Some(n) = free {
                        let c = container(n, &format!("c{step}-{n}"), &labels(&mut rng));
                        if rng.below(2) == 0 {
                            a.on_link(LinkEvent::Changed(link(
                                ifindex(&c),
                                &format!("veth{n}"),
                                "veth",
                                Some(bridge),
                            )));
                        }
                        events.push(DockerEvent::ContainerUp(c));
                    }
                }
            }
        }
        let injected = rng.below(6) == 0;
        if injected {
            *fail.lock().unwrap() = Some(rng.below(4));
        }
        a.on_docker_batch(events);
        let consumed = fail.lock().unwrap().take().is_none();
        // A veth of a container that went, now and then.
        if rng.below(3) == 0 {
            let gone: Vec<u32> = a
                .host_links
                .values()
                .filter(|l| l.kind.as_deref() == Some("veth"))
                .map(|l| l.ifindex)
                .filter(|i| !a.containers.values().any(|c| ifindex(c) == *i))
                .collect();
            if let Some(i) = gone.first() {
                a.on_link(LinkEvent::Removed(*i));
            }
        }
        assert!(a.last_error.is_none(), "step {step}: {:?}", a.last_error);
        if injected && consumed {
            absorbed += 1;
        }
        let running: Vec<Container> = a.containers.values().cloned().collect();
        let mut fresh = agent_on(&dirs, FakeDatapath::new(MapSizes::default()));
        fresh.on_link(LinkEvent::Snapshot(
            a.host_links.values().cloned().collect(),
        ));
        snapshot(&mut fresh, &running.iter().collect::<Vec<_>>());
        assert_eq!(maps(&a), maps(&fresh), "step {step}");
        assert_eq!(
            a.dp.attached().unwrap(),
            fresh.dp.attached().unwrap(),
            "step {step}"
        );
        assert_eq!(a.compiled, fresh.compiled, "step {step}");
        assert_eq!(
            a.reconciler.last().map(|(m, _)| m),
            Some(&maps(&a)),
            "step {step}: the state recorded as written is the datapath's"
        );
    }
    assert!(
        a.scoped_syncs > 100,
        "{} event-scoped syncs",
        a.scoped_syncs
    );
    assert!(
        absorbed > 5,
        "{absorbed} failed writes absorbed by the full fallback"
    );
}

/// With background saves (`run`), identities allocated by Docker events reach the disk, the
/// latest state last: after a flush (shutdown) and every background write, the file holds the
/// allocator's final state.
#[test]
fn background_saves_persist_every_identity() {
    let dirs = Dirs::new("background-saves");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let state = rt.block_on(async {
        let mut a = agent(&dirs);
        a.set_background_saves(true);
        snapshot(&mut a, &[]);
        for n in 2..40 {
            a.on_docker(DockerEvent::ContainerUp(service(n, &format!("s{n}"), &[])));
        }
        a.save().expect("save");
        a.ids.state()
    });
    // Dropping the runtime waits for the writes still queued.
    drop(rt);
    assert_eq!(state.identities.len(), 38);
    let stored = Store::new(dirs.state())
        .load_identities::<crate::identity::AllocatorState>()
        .expect("read");
    assert_eq!(stored, Some(state));
}

/// Not a test: where the time of one container start goes with 500 containers and 10,000 policy
/// entries (`cargo test --release -p netpol-agent --lib -- --ignored --nocapture scale_profile`).
#[test]
#[ignore]
fn scale_profile() {
    let dirs = Dirs::new("scale-profile");
    let ports: Vec<String> = std::iter::once(80)
        .chain(1000..1019)
        .map(|p| format!("{{port: \"{p}\", protocol: TCP}}"))
        .collect();
    dirs.write_policy(
        "bench.yaml",
        &format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: bench}}\nspec:\n  endpointSelector: {{matchLabels: {{com.docker.compose.project: bench}}}}\n  ingress:\n  - fromEntities: [host]\n    toPorts: [{{ports: [{}]}}]\n",
            ports.join(", ")
        ),
    );
    let _ = tracing_subscriber::fmt()
        .with_env_filter("netpol_agent::daemon=debug")
        .try_init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let mut a = agent_on(&dirs, FakeDatapath::new(MapSizes::default()));
    a.set_background_saves(true);
    let mut net = network();
    net.subnets = vec!["172.20.0.0/16".parse().unwrap()];
    let box_n = |n: u16| -> Container {
        let mut c = container(2, &format!("bench-{n}"), &[]);
        c.id = format!("{n:064x}");
        c.labels = [
            ("com.docker.compose.project", "bench".to_string()),
            ("com.docker.compose.service", format!("s{n}")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        c.networks[0].ipv4 = Some(Ipv4Addr::new(
            172,
            20,
            (n / 200) as u8 + 1,
            (n % 200) as u8 + 2,
        ));
        c.networks[0].host_veth = Some(1000 + u32::from(n));
        c
    };
    a.on_docker(DockerEvent::Snapshot {
        containers: (0..499).map(box_n).collect(),
        networks: vec![net],
    });
    let mut times = Vec::new();
    for round in 0..20u16 {
        let c = box_n(499 + round);
        let t = std::time::Instant::now();
        a.on_docker(DockerEvent::ContainerUp(c.clone()));
        let up = t.elapsed();
        let t = std::time::Instant::now();
        a.on_docker(DockerEvent::ContainerDown { id: c.id.clone() });
        times.push((up, t.elapsed()));
    }
    println!("policy entries {}", maps(&a).policy.len());
    for (up, down) in &times {
        println!(
            "up {:.2} ms, down {:.2} ms",
            up.as_secs_f64() * 1e3,
            down.as_secs_f64() * 1e3
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Host addresses in the ipcache.

/// A macvlan network on the host's LAN (198.18.0.0/24, router 198.18.0.1).
fn macvlan_lan() -> Network {
    Network {
        id: "lan".into(),
        name: "lan".into(),
        driver: "macvlan".into(),
        bridge: None,
        subnets: vec!["198.18.0.0/24".parse().unwrap()],
        gateways: vec!["198.18.0.1".parse().unwrap()],
        ..network()
    }
}

/// A bridge network's gateway is the host's (and checked as such: only the host's stack sends
/// it); a macvlan network's gateway is a router on the LAN, not the host: `world`, or the
/// datapath would give that router `host` rights (and drop its routed packets as forged).
#[test]
fn only_a_bridge_networks_gateway_is_a_host_address() {
    let dirs = Dirs::new("host-gateways");
    let mut a = agent(&dirs);
    let lan = macvlan_lan();
    a.on_docker(DockerEvent::Snapshot {
        containers: vec![service(2, "db", &[])],
        networks: vec![network(), lan],
    });
    let m = maps(&a);
    let entry = |ip: &str| m.ipcache.get(&Cidr::host(ip.parse().unwrap())).copied();
    assert_eq!(
        entry("172.20.0.1"),
        Some(netpol_common::ipcache::RemoteInfo::host())
    );
    assert_eq!(
        entry("198.18.0.1"),
        None,
        "the LAN's router is not the host"
    );
    assert_eq!(identity_of(&m, "198.18.0.1".parse().unwrap()), WORLD);
}

/// The host takes a subnet-directed broadcast of any of its addresses (also one routed to it
/// from a container through the gateway) and, while it forwards, an IPv6 subnet-router anycast
/// as sent to itself: those are group addresses (decided under `GROUP`: only what a rule for
/// everyone allows and no deny of a peer, the host included, covers), not the `world`, a CIDR
/// or the bridge subnet's `unmanaged` that their prefixes would make them.
#[test]
fn the_hosts_broadcast_and_anycast_addresses_are_group_addresses() {
    let dirs = Dirs::new("host-groups");
    let mut a = agent(&dirs);
    let v6 = Network {
        id: "v6".into(),
        name: "v6".into(),
        bridge: Some("br-v6".into()),
        subnets: vec!["fd00:1::/64".parse().unwrap()],
        gateways: vec!["fd00:1::1".parse().unwrap()],
        enable_ipv6: true,
        ..network()
    };
    let lan = macvlan_lan();
    let db = service(2, "db", &[]);
    let db_addr = addr(&db);
    a.on_docker(DockerEvent::Snapshot {
        containers: vec![db],
        networks: vec![network(), v6, lan],
    });
    let m = maps(&a);
    let id = |ip: &str| identity_of(&m, ip.parse().unwrap());
    for group in ["172.20.255.255", "192.0.2.255", "2001:db8::", "fd00:1::"] {
        assert_eq!(id(group), netpol_common::identity::GROUP, "{group}");
    }
    assert_eq!(
        id("172.20.0.0"),
        netpol_common::identity::UNMANAGED,
        "no broadcast"
    );
    assert_eq!(id("172.20.0.1"), netpol_common::identity::HOST);
    assert_eq!(id("192.0.2.1"), netpol_common::identity::HOST);
    assert_eq!(id("198.18.0.255"), WORLD, "the host has no address there");
    assert!(identity_of(&m, db_addr) >= netpol_common::identity::FIRST_LABEL);
}

/// Labels each within their own limit but on many containers (here 18 of 256 CIDRs each)
/// filled IPCACHE4, and every other policy change was refused: db could not be closed. The
/// labels of all containers name at most `LABEL_CIDRS` CIDRs in all, taken by container name;
/// a direction beyond is an error (default deny) and the rest applies.
#[test]
fn many_labels_each_within_the_limit_hold_up_no_other_change() {
    let dirs = Dirs::new("labels-many");
    let (db, app1) = (service(2, "db", &[]), service(3, "app1", &[]));
    dirs.write_policy("db.yaml", &db_accepts("app1", "TCP"));
    let mut a = agent(&dirs);
    let n = crate::policy::limits::LABEL_ITEMS;
    let labels: Vec<String> = (0..18)
        .map(|k| {
            (0..n)
                .map(|i| format!("10.{k}.{i}.0/24:80"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let evils: Vec<Container> = labels
        .iter()
        .enumerate()
        .map(|(k, l)| {
            service(
                10 + k as u8,
                &format!("evil{k:02}"),
                &[("netpol.ingress", l.as_str())],
            )
        })
        .collect();
    let mut all: Vec<&Container> = vec![&db, &app1];
    all.extend(evils.iter());
    snapshot(&mut a, &all);
    db_closes_to_app1(&mut a, &dirs, &app1, &db);
    let fit = crate::policy::limits::LABEL_CIDRS / n;
    let errors = a.status()["label_errors"].clone();
    for (k, evil) in evils.iter().enumerate() {
        let state = endpoint_state(&mut a, evil);
        assert_eq!(
            state.contains("ingress default deny"),
            k >= fit,
            "evil{k}: {state}"
        );
    }
    assert!(
        errors.to_string().contains("more than 1024 CIDRs"),
        "{errors}"
    );
}

/// The same with port ranges: 9 containers each with 256 `world:` items of disjoint port ranges
/// (each several aligned blocks) needed 18,360 `POLICY` entries of 16,384, and db's edit was
/// held up. Labels of all containers hold at most `LABEL_ENTRIES` peer-port blocks in all.
#[test]
fn many_labels_of_port_ranges_hold_up_no_other_change() {
    let dirs = Dirs::new("labels-ranges");
    let (db, app1) = (service(2, "db", &[]), service(3, "app1", &[]));
    dirs.write_policy("db.yaml", &db_accepts("app1", "TCP"));
    let mut a = agent(&dirs);
    let n = crate::policy::limits::LABEL_ITEMS as u16;
    let label: String = (0..n)
        .map(|i| format!("world:{}-{}", 3 + i * 255, 253 + i * 255))
        .collect::<Vec<_>>()
        .join(",");
    let evils: Vec<Container> = (0..9)
        .map(|k| {
            service(
                10 + k as u8,
                &format!("evil{k:02}"),
                &[("netpol.ingress", label.as_str())],
            )
        })
        .collect();
    let mut all: Vec<&Container> = vec![&db, &app1];
    all.extend(evils.iter());
    snapshot(&mut a, &all);
    db_closes_to_app1(&mut a, &dirs, &app1, &db);
    let first = endpoint_state(&mut a, &evils[0]);
    assert!(!first.contains("default deny"), "{first}");
    let last = endpoint_state(&mut a, &evils[8]);
    assert!(
        last.contains("ingress default deny") && last.contains("peer-port blocks"),
        "{last}"
    );
}

/// The same through a service peer: one label of 256 `tgt:` items (about 2,000 port blocks)
/// compiles once per identity of tgt; 12 tgt containers with different labels needed 24,480
/// `POLICY` entries. A peer costs once per running container it selects.
#[test]
fn a_label_on_a_service_of_many_identities_holds_up_no_other_change() {
    let dirs = Dirs::new("labels-svc");
    let (db, app1) = (service(2, "db", &[]), service(3, "app1", &[]));
    dirs.write_policy("db.yaml", &db_accepts("app1", "TCP"));
    let mut a = agent(&dirs);
    let n = crate::policy::limits::LABEL_ITEMS as u16;
    let label: String = (0..n)
        .map(|i| format!("tgt:{}-{}", 3 + i * 255, 253 + i * 255))
        .collect::<Vec<_>>()
        .join(",");
    let evil = service(9, "evil", &[("netpol.ingress", label.as_str())]);
    let vals: Vec<String> = (0..12).map(|k| k.to_string()).collect();
    let tgts: Vec<Container> = (0..12)
        .map(|k| {
            let mut c = service(20 + k as u8, "tgt", &[("x", vals[k].as_str())]);
            c.name = format!("tgt{k}");
            c
        })
        .collect();
    let mut all: Vec<&Container> = vec![&db, &app1, &evil];
    all.extend(tgts.iter());
    snapshot(&mut a, &all);
    db_closes_to_app1(&mut a, &dirs, &app1, &db);
    let state = endpoint_state(&mut a, &evil);
    assert!(
        state.contains("ingress default deny") && state.contains("peer-port blocks"),
        "{state}"
    );
}
