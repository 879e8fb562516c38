//! Tier 4: end to end, with a private dockerd, real containers brought up by docker-compose,
//! and the real `netpol-agent` binary (see `netpol_tests::agent` for how it is found).
//!
//! Each test proves a behaviour of MISSION.md with connections made from inside the containers'
//! network namespaces (`netpol_tests::probe`): allowed connections are retried until they
//! succeed (the agent may still be applying a change), denied ones must time out (a reset would
//! mean the SYN got through). Every wait polls a condition; nothing sleeps in the hope that
//! something has happened.
//!
//! Every test runs on both Docker versions (`docker20::NAME`, `docker28::NAME`; see
//! `netpol_tests::docker_tests!`). The tests of this file share one dockerd per version (started
//! by the first test that needs it, replaced when a test needs the other version, stopped and
//! cleaned up when the test process exits) and run one at a time. Each starts its own agent (own pins,
//! state, socket) and removes its compose projects, whatever happens.

use std::{
    ffi::OsString,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Mutex, MutexGuard, Once,
    },
    thread,
    time::{Duration, Instant},
};

use netpol_tests::{
    agent::{agent_binary, Agent, AgentOptions},
    docker::{DockerDaemon, DockerVersion},
    metrics,
    probe::{self, assert_all, Check, Client, Expect, Outcome, OutsideNs},
};

const IMAGE: &str = "netpol-test/busybox";
const PROJECT: &str = "npe2e";
const WEB_PORT: u16 = 18081;

// ---------------------------------------------------------------------------------------------
// The shared dockerd.

static SHARED: Mutex<Option<DockerDaemon>> = Mutex::new(None);

extern "C" fn stop_shared_daemon() {
    let daemon = SHARED.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(d) = daemon {
        // A panic must not unwind out of an atexit handler.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(d))).is_err() {
            eprintln!("e2e_docker: cleaning up the shared dockerd failed (see above)");
        }
    }
}

/// The shared daemon of `version`, started on first use, with the test image; holding the guard
/// runs the tests one at a time. A daemon of the other version, or one that a failed test left
/// unusable, is replaced.
fn docker(version: DockerVersion) -> MutexGuard<'static, Option<DockerDaemon>> {
    docker_with(version, false)
}

/// [`docker`], with `--userland-proxy=false` when `no_userland_proxy`.
fn docker_with(
    version: DockerVersion,
    no_userland_proxy: bool,
) -> MutexGuard<'static, Option<DockerDaemon>> {
    static AT_EXIT: Once = Once::new();
    AT_EXIT.call_once(|| {
        // SAFETY: registers a plain extern "C" function; runs when the test process exits.
        unsafe { libc::atexit(stop_shared_daemon) };
    });
    let mut guard = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    let healthy = guard.as_ref().is_some_and(|d| {
        d.version() == version
            && d.config().no_userland_proxy == no_userland_proxy
            && d.pid().is_some()
            && d.docker(&["version"]).status.success()
    });
    if !healthy {
        drop(guard.take());
        let d = DockerDaemon::start_with(netpol_tests::docker::DaemonConfig {
            version,
            no_userland_proxy,
            ..Default::default()
        });
        d.build_busybox_image(IMAGE);
        *guard = Some(d);
    }
    guard
}

// ---------------------------------------------------------------------------------------------
// Compose projects and containers.

fn e2e_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e")
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

fn ok(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// How to reach one daemon from the CLI: its socket, and `PATH` with its own `docker` first.
#[derive(Clone)]
struct Cli {
    host: String,
    path: OsString,
}

impl Cli {
    fn of(docker: &DockerDaemon) -> Self {
        Cli {
            host: docker.host(),
            path: docker.path_env(),
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("DOCKER_HOST", &self.host).env("PATH", &self.path);
        cmd
    }
}

/// A compose project brought up from a file of `tests/e2e/`; `down` on drop.
struct Project {
    cli: Cli,
    file: PathBuf,
    name: String,
}

impl Project {
    fn up(docker: &DockerDaemon, file: &str) -> Self {
        Self::up_as(docker, file, PROJECT)
    }

    /// [`Project::up`] as compose project `name`.
    fn up_as(docker: &DockerDaemon, file: &str, name: &str) -> Self {
        let p = Project {
            cli: Cli::of(docker),
            file: e2e_dir().join(file),
            name: name.to_owned(),
        };
        p.compose(&["down", "--remove-orphans", "--timeout", "1"]);
        p.compose_ok(&["up", "-d"]);
        p
    }

    fn compose(&self, args: &[&str]) -> Output {
        let mut cmd = self.cli.command("docker-compose");
        cmd.arg("-f")
            .arg(&self.file)
            .args(["-p", &self.name])
            .args(args);
        run(&mut cmd)
    }

    fn compose_ok(&self, args: &[&str]) -> String {
        ok(
            &format!("docker-compose {}", args.join(" ")),
            self.compose(args),
        )
    }

    fn docker(&self, args: &[&str]) -> Output {
        let mut cmd = self.cli.command("docker");
        cmd.args(args);
        run(&mut cmd)
    }

    fn docker_ok(&self, args: &[&str]) -> String {
        ok(&format!("docker {}", args.join(" ")), self.docker(args))
    }

    fn container_name(&self, service: &str) -> String {
        format!("{}_{service}_1", self.name)
    }

    fn container(&self, service: &str) -> Container {
        Container::inspect(&self.cli, &self.container_name(service))
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let out = self.compose(&["down", "--remove-orphans", "--timeout", "1"]);
        if !out.status.success() {
            eprintln!(
                "docker-compose down of {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// A running container: what the probes need.
#[derive(Clone, Debug)]
struct Container {
    name: String,
    id: String,
    netns: PathBuf,
    ipv4: IpAddr,
    ipv6: Option<IpAddr>,
}

impl Container {
    fn inspect(cli: &Cli, name: &str) -> Self {
        let mut cmd = cli.command("docker");
        cmd.args([
            "inspect",
            "-f",
            "{{.Id}} {{.State.Pid}}{{range .NetworkSettings.Networks}} {{.IPAddress}} {{.GlobalIPv6Address}}{{end}}",
            name,
        ]);
        let out = ok(&format!("docker inspect {name}"), run(&mut cmd));
        let f: Vec<&str> = out.split_whitespace().collect();
        assert!(f.len() >= 3 && f[1] != "0", "{name} is not running: {out}");
        Container {
            name: name.to_owned(),
            id: f[0].to_owned(),
            netns: PathBuf::from(format!("/proc/{}/ns/net", f[1])),
            ipv4: f[2]
                .parse()
                .unwrap_or_else(|e| panic!("{name}: IPv4 {:?}: {e}", f[2])),
            ipv6: f.get(3).and_then(|a| a.parse().ok()),
        }
    }

    fn client(&self) -> Client {
        Client::netns(&self.name, &self.netns)
    }

    fn addrs(&self) -> Vec<IpAddr> {
        std::iter::once(self.ipv4).chain(self.ipv6).collect()
    }
}

fn check(from: Client, to: &Container, addr: IpAddr, port: u16, expect: Expect) -> Check {
    Check {
        from,
        to_name: to.name.clone(),
        to: SocketAddr::new(addr, port),
        expect,
        http: false,
    }
}

/// The MISSION.md scenario, over IPv4 and IPv6: app1 -> db and app2 -> db on 5432 allowed;
/// app1 <-> app2 denied both ways (their port 8080 is open to the host only); db -> app1
/// denied; the host reaches app1:8080 but not db:5432 (the host is policed like any peer).
fn scenario_checks(p: &Project) -> Vec<Check> {
    let (db, app1, app2) = (p.container("db"), p.container("app1"), p.container("app2"));
    assert!(db.ipv6.is_some(), "db has no IPv6 address: {db:?}");
    let mut checks = Vec::new();
    for family in 0..2 {
        let pick = |c: &Container| c.addrs()[family];
        use Expect::{Allowed, Denied};
        checks.extend([
            check(app1.client(), &db, pick(&db), 5432, Allowed),
            check(app2.client(), &db, pick(&db), 5432, Allowed),
            check(app1.client(), &app2, pick(&app2), 8080, Denied),
            check(app2.client(), &app1, pick(&app1), 8080, Denied),
            check(db.client(), &app1, pick(&app1), 8080, Denied),
            check(Client::host(), &app1, pick(&app1), 8080, Allowed),
            check(Client::host(), &db, pick(&db), 5432, Denied),
        ]);
    }
    checks
}

/// The ids of the scenario's containers, for [`Agent::wait_enforced`].
fn scenario_containers(p: &Project) -> Vec<Container> {
    ["db", "app1", "app2"]
        .iter()
        .map(|s| p.container(s))
        .collect()
}

fn wait_enforced(agent: &Agent, containers: &[Container]) {
    let ids: Vec<&str> = containers.iter().map(|c| c.id.as_str()).collect();
    agent.wait_enforced(&ids);
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    eprintln!("[{:>6.2}s] {what}", t.elapsed().as_secs_f64());
    r
}

// ---------------------------------------------------------------------------------------------
// Tests.

/// The MISSION.md scenario with compose labels; the monitor names the dropped flow, and the
/// metrics endpoint counts the drops by container (its output passes `promtool check metrics`).
/// `monitor --json` with filters (`--service app1 --verdict drop --port 8080/tcp`,
/// `--container db --verdict flow`) reports exactly the unfiltered monitor's events that match.
fn compose_labels_protect_the_database_scenario(version: DockerVersion) {
    if !netpol_tests::require_root(
        &version.test_name("compose_labels_protect_the_database_scenario"),
    ) {
        return;
    }
    let mut guard = docker(version);
    let docker = guard.as_mut().expect("daemon");
    let project = timed("compose up", || Project::up(docker, "compose-labels.yml"));
    let agent = timed("agent start", || {
        Agent::start_with(
            docker,
            AgentOptions {
                metrics: true,
                ..AgentOptions::default()
            },
        )
    });
    timed("enforced", || {
        wait_enforced(&agent, &scenario_containers(&project))
    });
    timed("scenario checks", || {
        assert_all("labels scenario", &scenario_checks(&project))
    });
    let app1_denied = |scrape: &str| {
        metrics::sum(
            scrape,
            "netpol_endpoint_drops_total",
            &[
                ("container", project.container("app1").name.as_str()),
                ("identity", "npe2e/app1"),
                ("direction", "ingress"),
                ("reason", "policy-denied"),
            ],
        )
    };
    // New flows that db's label policy allowed (app1 and app2 -> db:5432).
    let db_allowed = |scrape: &str| {
        metrics::sum(
            scrape,
            "netpol_policy_flows_total",
            &[
                ("policy", "compose:npe2e/db"),
                ("rule", "ingress[0]"),
                ("identity", "npe2e/db"),
                ("direction", "ingress"),
                ("verdict", "allowed"),
            ],
        )
    };
    let before = timed("scrape", || agent.scrape());
    metrics::promtool_check(&before);
    assert!(
        app1_denied(&before) > 0.0,
        "the scenario's denied connections to app1 are not counted on app1:\n{before}"
    );
    assert!(
        db_allowed(&before) > 0.0,
        "the scenario's allowed connections to db are not counted on db's policy:\n{before}"
    );
    assert!(
        metrics::sum(
            &before,
            "netpol_drops_total",
            &[("reason", "policy-denied")]
        ) >= app1_denied(&before),
        "the per-reason total is below one endpoint's count:\n{before}"
    );
    assert!(
        metrics::sum(&before, "netpol_map_entries", &[("map", "ENDPOINTS")]) >= 3.0,
        "ENDPOINTS holds the three containers:\n{before}"
    );
    assert!(metrics::sum(&before, "netpol_reconcile_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(metrics::sum(&before, "netpol_docker_connected", &[]), 1.0);

    // `monitor --json`, unfiltered and with filters (the daemon applies them): each filtered
    // monitor reports exactly the unfiltered one's events that match its filter.
    let (db, app1, app2) = (
        project.container("db"),
        project.container("app1"),
        project.container("app2"),
    );
    let all = MonitorStream::start(&agent, &[]);
    let app1_drops_8080 = MonitorStream::start(
        &agent,
        &[
            "--service",
            "app1",
            "--verdict",
            "drop",
            "--port",
            "8080/tcp",
        ],
    );
    let db_flows = MonitorStream::start(&agent, &["--container", &db.name, "--verdict", "flow"]);
    let is_app1_drop_8080 = |e: &serde_json::Value| {
        e["kind"] == "drop"
            && e["dport"] == 8080
            && e["protocol"] == "TCP"
            && (e["src_name"] == "npe2e/app1" || e["dst_name"] == "npe2e/app1")
    };
    let db_addrs: Vec<String> = db.addrs().iter().map(|a| a.to_string()).collect();
    let is_db_flow = |e: &serde_json::Value| {
        e["kind"] == "flow"
            && (e["endpoint"] == db.name.as_str()
                || db_addrs
                    .iter()
                    .any(|a| e["src"] == a.as_str() || e["dst"] == a.as_str()))
    };
    // Until every monitor is subscribed (has had an event): over IPv6, so that the IPv4
    // connections below are all made while all three listen.
    let v6 = |c: &Container| c.ipv6.expect("IPv6 address");
    let deadline = Instant::now() + Duration::from_secs(15);
    while all.count(|_| true) == 0
        || app1_drops_8080.count(|_| true) == 0
        || db_flows.count(|_| true) == 0
    {
        assert!(
            Instant::now() < deadline,
            "monitors silent after 15 s: all {:?}, filtered {:?} / {:?}",
            all.events(),
            app1_drops_8080.events(),
            db_flows.events()
        );
        assert_eq!(
            probe::connect_from(
                Some(&app2.netns),
                SocketAddr::new(v6(&app1), 8080),
                probe::DENY_TIMEOUT
            ),
            Outcome::Timeout
        );
        assert_eq!(
            probe::connect_from(
                Some(&app1.netns),
                SocketAddr::new(v6(&db), 5432),
                probe::ALLOW_DEADLINE
            ),
            Outcome::Open
        );
    }
    // IPv4: drops and flows that match either filter, one or the other, or neither.
    use Expect::{Allowed, Denied};
    let v4_checks = [
        check(app2.client(), &app1, app1.ipv4, 8080, Denied), // app1 drop 8080
        check(db.client(), &app1, app1.ipv4, 8080, Denied),   // app1 drop 8080
        check(app1.client(), &app2, app2.ipv4, 8080, Denied), // app1 drop 8080 (app1 sends)
        check(app2.client(), &app1, app1.ipv4, 9999, Denied), // another port
        check(Client::host(), &db, db.ipv4, 5432, Denied),    // a drop at db
        check(app1.client(), &db, db.ipv4, 5432, Allowed),    // db flow
        check(app2.client(), &db, db.ipv4, 5432, Allowed),    // db flow
        check(Client::host(), &app1, app1.ipv4, 8080, Allowed), // app1 flow
    ];
    timed("monitor filter traffic", || {
        assert_all("monitor filter traffic", &v4_checks)
    });
    let is_v4 = |e: &serde_json::Value| {
        e["dst"]
            .as_str()
            .is_some_and(|d| d.parse::<std::net::Ipv4Addr>().is_ok())
    };
    let src_of = |c: &Check| -> Option<String> {
        [&db, &app1, &app2]
            .iter()
            .find(|x| x.name == c.from.name)
            .map(|x| x.ipv4.to_string())
    };
    let reported = |c: &Check, e: &serde_json::Value| {
        e["dst"] == c.to.ip().to_string().as_str()
            && e["dport"] == c.to.port()
            && e["kind"]
                == if matches!(c.expect, Denied) {
                    "drop"
                } else {
                    "flow"
                }
            && match src_of(c) {
                Some(src) => e["src"] == src.as_str(),
                None => e["src_name"] == "host",
            }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let missing: Vec<String> = v4_checks
            .iter()
            .filter(|c| all.count(|e| reported(c, e)) == 0)
            .map(|c| c.to_string())
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "unfiltered monitor --json has no event of {missing:?}: {:?}",
            all.events()
        );
        thread::sleep(Duration::from_millis(50));
    }
    let unmatched = all.count(|e| is_v4(e) && !is_app1_drop_8080(e) && !is_db_flow(e));
    assert!(
        all.count(|e| is_v4(e) && is_app1_drop_8080(e)) >= 3
            && all.count(|e| is_v4(e) && is_db_flow(e)) >= 2
            && unmatched >= 3,
        "the traffic gave each filter something to keep and something to leave out: {:?}",
        all.events()
    );
    for (filtered, keep, what) in [
        (
            &app1_drops_8080,
            &is_app1_drop_8080 as &dyn Fn(&serde_json::Value) -> bool,
            "--service app1 --verdict drop --port 8080/tcp",
        ),
        (&db_flows, &is_db_flow, "--container db --verdict flow"),
    ] {
        let wrong: Vec<_> = filtered.events().into_iter().filter(|e| !keep(e)).collect();
        assert!(
            wrong.is_empty(),
            "monitor {what} reported events that do not match: {wrong:?}"
        );
        let want = MonitorStream::keys(all.events().iter().filter(|e| is_v4(e) && keep(e)));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = MonitorStream::keys(filtered.events().iter().filter(|e| is_v4(e)));
            if got == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "monitor {what}: not exactly the matching events of the unfiltered monitor\n\
                 missing: {:?}\nextra: {:?}",
                want.difference(&got).collect::<Vec<_>>(),
                got.difference(&want).collect::<Vec<_>>()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
    // The SYN that app1's ingress drops left app2 through its unenforced egress: a flow that
    // says so; one that db's policy allowed names its rule instead.
    let events = all.events();
    let leaving_app2 = events
        .iter()
        .find(|e| {
            e["kind"] == "flow"
                && e["endpoint"] == app2.name.as_str()
                && e["dst"] == app1.ipv4.to_string().as_str()
                && e["dport"] == 8080
        })
        .unwrap_or_else(|| panic!("no flow of app2 -> app1:8080 on app2's egress: {events:?}"));
    assert_eq!(leaving_app2["not_enforced"], true, "{leaving_app2}");
    let into_db = events
        .iter()
        .find(|e| e["kind"] == "flow" && e["endpoint"] == db.name.as_str() && e["dport"] == 5432)
        .unwrap_or_else(|| panic!("no flow into db:5432: {events:?}"));
    assert!(
        into_db.get("not_enforced").is_none() && into_db["policy"] == "compose:npe2e/db",
        "{into_db}"
    );
    let found = all
        .events()
        .into_iter()
        .find(|e| {
            e["kind"] == "drop" && e["dst"] == app1.ipv4.to_string().as_str() && e["dport"] == 8080
        })
        .expect("a drop of a connection to app1:8080");
    drop((all, app1_drops_8080, db_flows));
    // One more allowed connection, app1 -> db:5432.
    let app1_to_db = || {
        assert_eq!(
            probe::connect_from(
                Some(&app1.netns),
                SocketAddr::new(db.ipv4, 5432),
                probe::ALLOW_DEADLINE
            ),
            Outcome::Open
        )
    };
    app1_to_db();
    // The monitor's denied connections went up app1's counter (counters, not events: exact),
    // the allowed one db's policy's.
    let after = agent.scrape();
    metrics::promtool_check(&after);
    assert!(
        db_allowed(&after) > db_allowed(&before),
        "db's policy's allowed-flow count did not go up ({} -> {}):\n{after}",
        db_allowed(&before),
        db_allowed(&after)
    );
    assert!(
        app1_denied(&after) > app1_denied(&before),
        "app1's policy-denied count did not go up ({} -> {}):\n{after}",
        app1_denied(&before),
        app1_denied(&after)
    );
    let text = found.to_string();
    assert!(
        text.contains("app1") && text.contains("app2"),
        "the drop is not labelled with the containers' names: {text}"
    );

    // A policy compiled before db's (by name), selecting nobody: rule ids numbered afresh would
    // shift, and db's counter would then be shown as this policy's rule while db's rule starts
    // again from zero. With stable ids db's counter goes on counting under db's policy.
    let first = agent.state_dir().join("../aaa-first.yaml");
    std::fs::write(
        &first,
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: aaa-first\nspec:\n  endpointSelector: { matchLabels: { netpol-test: nobody } }\n  ingress: [{ fromEntities: [host] }]\n",
    )
    .expect("write the policy");
    agent.cli_ok(&["policy", "import", first.to_str().expect("utf-8 path")]);
    app1_to_db();
    let edited = agent.scrape();
    assert_eq!(
        db_allowed(&edited),
        db_allowed(&after) + 1.0,
        "db's policy's allowed-flow count did not go on by one after a policy was added before it:\n{edited}"
    );
    assert_eq!(
        metrics::sum(
            &edited,
            "netpol_policy_flows_total",
            &[("policy", "aaa-first")]
        ),
        0.0,
        "a policy that selects nobody has counted flows:\n{edited}"
    );
}

/// The systemd unit's least privilege holds up: the agent, run with only the unit's capability
/// bounding set and `NoNewPrivileges` (`setpriv`, as systemd would), enforces the scenario, and
/// every system call it makes (traced with `strace`, from its start to its stop) is one the
/// unit's `SystemCallFilter=` allows — a call outside it would kill the service under systemd.
fn agent_with_only_the_units_privileges_enforces_the_scenario(version: DockerVersion) {
    if !netpol_tests::require_root(
        &version.test_name("agent_with_only_the_units_privileges_enforces_the_scenario"),
    ) {
        return;
    }
    use netpol_tests::unit;
    let mut guard = docker(version);
    let docker = guard.as_mut().expect("daemon");
    let project = Project::up(docker, "compose-labels.yml");
    let trace = std::env::temp_dir().join(format!("netpol-unit-strace-{}", std::process::id()));
    let _rm = Cleanup(|| {
        let _ = std::fs::remove_file(&trace);
    });
    // `strace -D`: the tracer is a detached grandchild, so the agent stays the harness's child
    // (stopped by its pid) and strace ends with it.
    let mut wrapper: Vec<String> = ["strace", "-D", "-f", "-q", "-o"].map(String::from).into();
    wrapper.push(trace.to_str().expect("utf-8").to_owned());
    wrapper.extend(unit::setpriv_prefix());
    let mut agent = Agent::start_with(
        docker,
        AgentOptions {
            wrapper,
            ..AgentOptions::default()
        },
    );
    wait_enforced(&agent, &scenario_containers(&project));
    assert_all("with the unit's privileges", &scenario_checks(&project));
    let pid = agent.pid().expect("agent runs");
    agent.stop();
    // strace writes the agent's exit last, once it has seen it: wait for that line
    // ("617   +++ exited with 0 +++": strace pads short pids).
    let pid = pid.to_string();
    let is_end = |l: &str| {
        let mut f = l.split_whitespace();
        f.next() == Some(pid.as_str()) && f.next() == Some("+++")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let log = loop {
        let log = std::fs::read_to_string(&trace).unwrap_or_default();
        if log.lines().any(is_end) {
            break log;
        }
        assert!(
            Instant::now() < deadline,
            "strace did not record the exit of pid {pid}; the log ends with:\n{}",
            log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
        );
        thread::sleep(Duration::from_millis(50));
    };
    let seen = unit::traced_syscalls(&log, "netpol-agent");
    assert!(
        seen.contains("bpf"),
        "the strace log holds no bpf() call of the agent: {seen:?}"
    );
    let allowed = unit::allowed_syscalls();
    let outside: Vec<&String> = seen.difference(&allowed).collect();
    assert!(
        outside.is_empty(),
        "the agent made system calls that the unit's SystemCallFilter= does not allow: {outside:?}"
    );
}

/// The same scenario with a CiliumNetworkPolicy file instead of labels: imported through the
/// CLI, then deleted (everything open again), then dropped into the policy directory.
fn cilium_policy_file_protects_the_database_scenario(version: DockerVersion) {
    if !netpol_tests::require_root(
        &version.test_name("cilium_policy_file_protects_the_database_scenario"),
    ) {
        return;
    }
    let mut guard = docker(version);
    let docker = guard.as_mut().expect("daemon");
    let project = Project::up(docker, "compose-plain.yml");
    let agent = Agent::start(docker);
    let (app1, app2) = (project.container("app1"), project.container("app2"));
    // No policy selects anything yet: app1 and app2 reach each other.
    let open = || {
        assert_all(
            "no policy",
            &[
                check(app1.client(), &app2, app2.ipv4, 8080, Expect::Allowed),
                check(
                    app2.client(),
                    &app1,
                    app1.ipv6.expect("ipv6"),
                    8080,
                    Expect::Allowed,
                ),
            ],
        )
    };
    open();

    let file = e2e_dir().join("policy-scenario.yaml");
    let file = file.to_str().expect("utf-8 path");
    timed("policy import", || {
        agent.cli_ok(&["policy", "import", file])
    });
    wait_enforced(&agent, &scenario_containers(&project));
    timed("scenario checks (imported)", || {
        assert_all("imported CiliumNetworkPolicy", &scenario_checks(&project))
    });

    agent.cli_ok(&["policy", "delete", "--all"]);
    open();

    std::fs::copy(file, agent.policy_dir().join("scenario.yaml")).expect("copy policy file");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = agent.cli_ok(&["policy", "get", "-o", "json"]);
        if got.contains("\"db\"") && got.contains("\"apps\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "policy dir not loaded after 10 s: {got}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    wait_enforced(&agent, &scenario_containers(&project));
    timed("scenario checks (policy dir)", || {
        assert_all(
            "CiliumNetworkPolicy from the policy directory",
            &scenario_checks(&project),
        )
    });
}

/// A published port: `world` (a client namespace routed to the host, through iptables DNAT)
/// and `host` (localhost through docker-proxy) reach web:80; a container on web's network that
/// no rule allows is refused.
fn published_port_reaches_world_and_host_but_not_other_containers(version: DockerVersion) {
    if !netpol_tests::require_root(
        &version.test_name("published_port_reaches_world_and_host_but_not_other_containers"),
    ) {
        return;
    }
    let mut guard = docker(version);
    let docker = guard.as_mut().expect("daemon");
    let project = Project::up(docker, "compose-web.yml");
    let agent = Agent::start(docker);
    let web = project.container("web");
    let client = project.container("client");
    wait_enforced(&agent, std::slice::from_ref(&web));
    let outside = OutsideNs::create(7);
    let http = |from: Client, name: &str, to: SocketAddr, expect| Check {
        from,
        to_name: name.to_owned(),
        to,
        expect,
        http: true,
    };
    let published = |ip: IpAddr| SocketAddr::new(ip, WEB_PORT);
    let mut checks = vec![
        http(
            outside.client(),
            "web via DNAT",
            published(outside.host_addr.into()),
            Expect::Allowed,
        ),
        http(
            Client::host(),
            "web via docker-proxy",
            published("127.0.0.1".parse().unwrap()),
            Expect::Allowed,
        ),
    ];
    for addr in web.addrs() {
        checks.push(http(
            client.client(),
            "web",
            SocketAddr::new(addr, 80),
            Expect::Denied,
        ));
    }
    // web:8081 is published too, but no rule opens it: refused through DNAT and through the
    // proxy alike (the proxy accepts, then cannot reach the container).
    let closed = |ip: IpAddr| SocketAddr::new(ip, WEB_PORT + 1);
    checks.push(http(
        outside.client(),
        "web:8081 via DNAT",
        closed(outside.host_addr.into()),
        Expect::Denied,
    ));
    checks.push(http(
        Client::host(),
        "web:8081 via docker-proxy",
        closed("127.0.0.1".parse().unwrap()),
        Expect::Denied,
    ));
    timed("published port checks", || {
        assert_all("published port", &checks)
    });
}

/// How a client of a published port arrives at the container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arrives {
    /// With its own address (DNAT): `world`.
    World,
    /// From the host's or the bridge gateway's address (docker-proxy, or DNAT plus masquerade
    /// without the proxy): `host`.
    Host,
    /// Not at all (nothing forwards it).
    Nowhere,
}

/// Who a published-port client is, per Docker version and userland-proxy setting, as README's
/// host/world section states it: web:80 is open to `world` only and web:81 to `host` only, so
/// the port that answers says which one a client is.
fn published_port_clients(version: DockerVersion, no_userland_proxy: bool) {
    let mut guard = docker_with(version, no_userland_proxy);
    let docker = guard.as_mut().expect("daemon");
    let project = Project::up(docker, "compose-ports.yml");
    let agent = Agent::start(docker);
    let web = project.container("web");
    wait_enforced(&agent, std::slice::from_ref(&web));
    let outside = OutsideNs::create(8);
    let proxy = !no_userland_proxy;
    use Arrives::{Host, Nowhere, World};
    let v28 = version == DockerVersion::Docker28;
    let cases: Vec<(Client, &str, IpAddr, Arrives)> = vec![
        (
            Client::host(),
            "127.0.0.1",
            "127.0.0.1".parse().unwrap(),
            Host,
        ),
        (
            Client::host(),
            "[::1]",
            "::1".parse().unwrap(),
            if proxy { Host } else { Nowhere },
        ),
        (
            outside.client(),
            "the host's IPv4 address",
            outside.host_addr.into(),
            World,
        ),
        (
            outside.client(),
            "the host's IPv6 address",
            outside.host_addr6.into(),
            match (v28, proxy) {
                (true, _) => World,
                (false, true) => Host,
                (false, false) => Nowhere,
            },
        ),
    ];
    // web itself through its network's gateway: the proxy's connection, or without it Docker's
    // hairpin masquerade to the gateway, which comes back through web's own veth (the one way a
    // host address may arrive other than from the host's own stack). Docker 20.10 forwards
    // nothing for IPv6 without the proxy.
    let gateways = project.docker_ok(&[
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Gateway}} {{end}}",
        &format!("{PROJECT}_front"),
    ]);
    let mut cases = cases;
    // The IPv6 subnet is configured without a gateway: Docker takes its first address.
    let v6_gateway = "fd00:6e70:3::1".to_owned();
    for g in gateways.split_whitespace().chain([v6_gateway.as_str()]) {
        let g: IpAddr = g.parse().expect("a gateway address");
        let arrives = if g.is_ipv6() && !v28 && !proxy {
            Nowhere
        } else {
            Host
        };
        cases.push((web.client(), "web's own gateway", g, arrives));
    }
    assert_eq!(cases.len(), 6, "front's IPv4 gateway: {gateways}");
    let mut checks = Vec::new();
    for (from, what, ip, arrives) in cases {
        for (port, opens) in [(18083, World), (18084, Host)] {
            checks.push(Check {
                from: from.clone(),
                to_name: format!("web:{port} via {what} {ip} (arrives as {arrives:?})"),
                to: SocketAddr::new(ip, port),
                expect: if arrives == opens {
                    Expect::Allowed
                } else {
                    Expect::Denied
                },
                http: true,
            });
        }
    }
    timed("published port identities", || {
        assert_all(
            &format!(
                "published ports on {} with userland-proxy={proxy}",
                version.name()
            ),
            &checks,
        )
    });
}

fn published_port_clients_are_world_or_host_as_documented(version: DockerVersion) {
    if !netpol_tests::require_root(
        &version.test_name("published_port_clients_are_world_or_host_as_documented"),
    ) {
        return;
    }
    published_port_clients(version, false);
}

/// The same without the userland proxy (`"userland-proxy": false`, common in production).
/// Named to run after the others, so the shared daemon is restarted once.
fn without_userland_proxy_published_port_clients_are_world_or_host(version: DockerVersion) {
    if !netpol_tests::require_root(
        &version.test_name("without_userland_proxy_published_port_clients_are_world_or_host"),
    ) {
        return;
    }
    published_port_clients(version, true);
}

/// Docker 28: an IPv6-only network (`--ipv4=false`; its containers have no IPv4 address) is
/// enforced like the others. Open before the policy; with it, `client` reaches `db:5432` and
/// `other` does not, and neither does the host.
#[test]
fn docker28_ipv6_only_network_is_enforced() {
    if !netpol_tests::require_root("docker28_ipv6_only_network_is_enforced") {
        return;
    }
    let mut guard = docker(DockerVersion::Docker28);
    let docker = guard.as_mut().expect("daemon");
    let net = "npe2e-v6only";
    let names = ["npv6-db", "npv6-client", "npv6-other"];
    let cleanup = || {
        for n in names {
            let _ = docker.docker(&["rm", "-f", n]);
        }
        let _ = docker.docker(&["network", "rm", net]);
    };
    cleanup();
    docker.docker_ok(&[
        "network",
        "create",
        "--ipv6",
        "--ipv4=false",
        "--subnet",
        "fd00:6e70:4::/64",
        net,
    ]);
    let _cleanup = Cleanup(cleanup);
    let mut ns = Vec::new();
    for n in names {
        let label = format!("app={n}");
        let cmd: &[&str] = if n == "npv6-db" {
            &["nc", "-ll", "-p", "5432", "-e", "/bin/cat"]
        } else {
            &["sleep", "3600"]
        };
        let mut args = vec![
            "run",
            "-d",
            "--name",
            n,
            "--network",
            net,
            "--stop-timeout",
            "1",
            "--label",
            &label,
            IMAGE,
        ];
        args.extend_from_slice(cmd);
        let id = docker.docker_ok(&args);
        let info = docker.inspect(
            n,
            "{{.State.Pid}} {{range .NetworkSettings.Networks}}{{.IPAddress}}|{{.GlobalIPv6Address}}{{end}}",
        );
        let (pid, addrs) = info.split_once(' ').expect("pid and addresses");
        let (v4, v6) = addrs.split_once('|').expect("addresses");
        assert!(
            v4.is_empty(),
            "{n} has an IPv4 address on an IPv6-only network: {v4}"
        );
        let v6: IpAddr = v6
            .parse()
            .unwrap_or_else(|e| panic!("{n}: IPv6 {v6:?}: {e}"));
        ns.push((id, PathBuf::from(format!("/proc/{pid}/ns/net")), v6));
    }
    let db = SocketAddr::new(ns[0].2, 5432);
    let check = |from: usize, expect| Check {
        from: Client::netns(names[from], &ns[from].1),
        to_name: names[0].to_owned(),
        to: db,
        expect,
        http: false,
    };
    let agent = Agent::start(docker);
    assert_all(
        "IPv6-only, no policy",
        &[check(1, Expect::Allowed), check(2, Expect::Allowed)],
    );
    let file = e2e_dir().join("policy-ipv6-only.yaml");
    agent.cli_ok(&["policy", "import", file.to_str().expect("utf-8")]);
    // db is the one a policy selects (the others are attached but restrict nothing).
    agent.wait_enforced(&[ns[0].0.as_str()]);
    assert_all(
        "IPv6-only network with a policy",
        &[
            check(1, Expect::Allowed),
            check(2, Expect::Denied),
            Check {
                from: Client::host(),
                to_name: names[0].to_owned(),
                to: db,
                expect: Expect::Denied,
                http: false,
            },
        ],
    );
    let rows = agent.endpoints();
    let db_row = rows
        .iter()
        .find(|r| r["name"].as_str().is_some_and(|n| n.contains("npv6-db")))
        .unwrap_or_else(|| panic!("npv6-db not listed: {rows:?}"));
    eprintln!("endpoint: {db_row}");
}

/// What a probe loop saw: attempts per phase, and every violation.
#[derive(Default)]
struct ProbeLog {
    attempts: Vec<AtomicUsize>,
    violations: Mutex<Vec<String>>,
}

/// Connections in a loop (one thread per check) until `stop`: every attempt of an allowed check
/// must connect, every attempt of a denied one must time out. `phase` says which phase's
/// counter an attempt goes to.
fn probe_loops<'s>(
    s: &'s thread::Scope<'s, '_>,
    checks: &'s [Check],
    phase: &'s AtomicUsize,
    stop: &'s AtomicBool,
    log: &'s ProbeLog,
) {
    let n = checks.len();
    for (i, c) in checks.iter().enumerate() {
        s.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let p = phase.load(Ordering::Relaxed);
                let t = Instant::now();
                let (timeout, fine): (_, fn(&Outcome) -> bool) = match c.expect {
                    Expect::Allowed => (Duration::from_secs(2), |o| *o == Outcome::Open),
                    Expect::Denied => (probe::DENY_TIMEOUT, |o| *o == Outcome::Timeout),
                };
                let out = c.attempt(timeout);
                if !fine(&out) {
                    log.violations
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(format!(
                            "phase {p}: {c}: got {out:?} after {:?}",
                            t.elapsed()
                        ));
                }
                log.attempts[p * n + i].fetch_add(1, Ordering::Relaxed);
                if c.expect == Expect::Allowed {
                    thread::sleep(Duration::from_millis(20));
                }
            }
        });
    }
}

/// Waits until every check has made `n` attempts in `phase`.
fn wait_attempts(log: &ProbeLog, checks: usize, phase: usize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts: Vec<usize> = (0..checks)
            .map(|i| log.attempts[phase * checks + i].load(Ordering::Relaxed))
            .collect();
        if counts.iter().all(|c| *c >= n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "probes stalled in phase {phase}: {counts:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// `kill -9` of the agent and a restart: connections made throughout (allowed and denied, IPv4
/// and IPv6), plus one established connection carrying data, see no change at all.
fn agent_kill9_and_restart_keep_enforcing(version: DockerVersion) {
    if !netpol_tests::require_root(&version.test_name("agent_kill9_and_restart_keep_enforcing")) {
        return;
    }
    let mut guard = docker(version);
    let docker = guard.as_mut().expect("daemon");
    let project = Project::up(docker, "compose-labels.yml");
    let mut agent = Agent::start(docker);
    let containers = scenario_containers(&project);
    wait_enforced(&agent, &containers);
    let (db, app1, app2) = (&containers[0], &containers[1], &containers[2]);
    let v6 = |c: &Container| c.ipv6.expect("ipv6");
    let checks = vec![
        check(app1.client(), db, db.ipv4, 5432, Expect::Allowed),
        check(app2.client(), db, v6(db), 5432, Expect::Allowed),
        check(Client::host(), app1, app1.ipv4, 8080, Expect::Allowed),
        check(app1.client(), app2, app2.ipv4, 8080, Expect::Denied),
        check(app2.client(), app1, v6(app1), 8080, Expect::Denied),
        check(Client::host(), db, db.ipv4, 5432, Expect::Denied),
    ];
    assert_all("before", &checks);

    // An established app1 -> db connection (db echoes) that must survive it all.
    let echo = {
        use std::io::{BufRead as _, BufReader, Write as _};
        let stream = probe::in_netns(&app1.netns, || {
            std::net::TcpStream::connect_timeout(
                &SocketAddr::new(db.ipv4, 5432),
                Duration::from_secs(2),
            )
        })
        .expect("established connection app1 -> db");
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut writer = stream;
        move |round: usize| -> Result<(), String> {
            let msg = format!("ping {round}\n");
            writer
                .write_all(msg.as_bytes())
                .map_err(|e| format!("send: {e}"))?;
            let mut line = String::new();
            reader
                .read_line(&mut line)
                .map_err(|e| format!("receive: {e}"))?;
            if line == msg {
                Ok(())
            } else {
                Err(format!("echo {line:?} instead of {msg:?}"))
            }
        }
    };
    let mut echo = echo;

    let log = ProbeLog {
        attempts: (0..3 * checks.len()).map(|_| AtomicUsize::new(0)).collect(),
        ..Default::default()
    };
    let phase = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let pin_dir = agent.pin_dir().to_owned();
    let mut round = 0;
    let mut echo_round = |what: &str| {
        round += 1;
        if let Err(e) = echo(round) {
            panic!("the established app1 -> db connection broke {what}: {e}");
        }
    };
    thread::scope(|s| {
        probe_loops(s, &checks, &phase, &stop, &log);
        let n = checks.len();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_attempts(&log, n, 0, 3);
            echo_round("before the kill");

            let killed = Instant::now();
            agent.kill9();
            phase.store(1, Ordering::Relaxed);
            assert!(pin_dir.exists(), "pins gone after kill -9");
            wait_attempts(&log, n, 1, 3);
            echo_round("while the agent was down");
            eprintln!("agent down for {:?} with probes running", killed.elapsed());

            timed("agent restart", || agent.restart());
            wait_enforced(&agent, &containers);
            phase.store(2, Ordering::Relaxed);
            wait_attempts(&log, n, 2, 3);
            echo_round("after the restart");
        }));
        stop.store(true, Ordering::Relaxed);
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    });
    let violations = log
        .violations
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    let counts: Vec<usize> = log
        .attempts
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .collect();
    eprintln!("attempts per phase and check: {counts:?}");
    assert!(
        violations.is_empty(),
        "{} violation(s) across kill -9 and restart:\n  {}\nagent log:\n{}",
        violations.len(),
        violations.join("\n  "),
        agent.log_tail(40)
    );
}

/// dockerd restarted (containers stop with it), then the containers recreated with new
/// addresses: the policy follows them by identity.
fn dockerd_restart_and_new_addresses_keep_policy(version: DockerVersion) {
    if !netpol_tests::require_root(
        &version.test_name("dockerd_restart_and_new_addresses_keep_policy"),
    ) {
        return;
    }
    let mut guard = docker(version);
    let docker = guard.as_mut().expect("daemon");
    let project = Project::up(docker, "compose-labels.yml");
    let agent = Agent::start(docker);
    let before = scenario_containers(&project);
    wait_enforced(&agent, &before);
    assert_all("before the dockerd restart", &scenario_checks(&project));

    timed("dockerd restart", || docker.restart());
    // A container outside the project takes an address first, so the project's containers get
    // new ones; it is not allowed to reach db either.
    let network = format!("{PROJECT}_backend");
    let _ = project.docker(&["rm", "-f", "npe2e-filler"]);
    project.docker_ok(&[
        "run",
        "-d",
        "--name",
        "npe2e-filler",
        "--network",
        &network,
        IMAGE,
        "sleep",
        "3600",
    ]);
    let _filler = Cleanup(|| {
        let _ = project.docker(&["rm", "-f", "npe2e-filler"]);
    });
    // New containers (and so new addresses): removed and created again. (docker-compose 1.29's
    // `up --force-recreate` fails against Docker 25 and later: their image inspect has no
    // `ContainerConfig`.)
    timed("compose rm + up (recreated)", || {
        project.compose_ok(&["rm", "--stop", "--force"]);
        project.compose_ok(&["up", "-d"])
    });
    let after = scenario_containers(&project);
    let moved: Vec<String> = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b.addrs() != a.addrs())
        .map(|(b, a)| format!("{}: {:?} -> {:?}", b.name, b.addrs(), a.addrs()))
        .collect();
    assert!(
        !moved.is_empty(),
        "no container got a new address: {after:?}"
    );
    eprintln!("new addresses: {moved:?}");
    timed("enforced after recreate", || wait_enforced(&agent, &after));
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(status) = agent.docker_connected() {
        assert!(
            Instant::now() < deadline,
            "agent not connected to the restarted dockerd: {status}\nlog:\n{}",
            agent.log_tail(30)
        );
        thread::sleep(Duration::from_millis(50));
    }
    let filler = Container::inspect(&Cli::of(docker), "npe2e-filler");
    let db = &after[0];
    let mut checks = scenario_checks(&project);
    checks.push(check(filler.client(), db, db.ipv4, 5432, Expect::Denied));
    assert_all("after the dockerd restart and recreate", &checks);
}

/// The propagation of the mount `path` is on (`findmnt -no PROPAGATION -T`) — "shared",
/// "private", …, or "" when findmnt fails.
fn findmnt_propagation(path: &Path) -> String {
    Command::new("findmnt")
        .args(["-no", "PROPAGATION", "-T"])
        .arg(path)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// A child process (of ours) killed by its pid on drop.
struct ChildGuard(std::process::Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `netpol-agent monitor [--json] ARGS` client; its lines are collected as they come.
struct MonitorStream {
    _child: ChildGuard,
    lines: std::sync::Arc<Mutex<Vec<String>>>,
}

impl MonitorStream {
    /// `monitor --json ARGS`.
    fn start(agent: &Agent, args: &[&str]) -> Self {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        Self::start_text(agent, &a)
    }

    /// `monitor ARGS`.
    fn start_text(agent: &Agent, args: &[&str]) -> Self {
        let mut child = ChildGuard(
            Command::new(agent_binary())
                .arg("--socket")
                .arg(agent.socket())
                .arg("monitor")
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn monitor"),
        );
        let stdout = child.0.stdout.take().expect("monitor stdout");
        let lines = std::sync::Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        MonitorStream {
            _child: child,
            lines,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The lines of `monitor --json` as JSON.
    fn events(&self) -> Vec<serde_json::Value> {
        self.lines()
            .iter()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("monitor --json printed {l:?}: {e}"))
            })
            .collect()
    }

    fn count(&self, f: impl Fn(&serde_json::Value) -> bool) -> usize {
        self.events().iter().filter(|e| f(e)).count()
    }

    /// Distinct events (a retransmitted SYN's drop repeats its event).
    fn keys<'a>(
        events: impl Iterator<Item = &'a serde_json::Value>,
    ) -> std::collections::BTreeSet<String> {
        events.map(|e| e.to_string()).collect()
    }
}

/// Runs a closure on drop.
struct Cleanup<F: FnMut()>(F);
impl<F: FnMut()> Drop for Cleanup<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// The identities of the scenario's services, by compose service name.
fn scenario_identities(agent: &Agent) -> Vec<(String, u64)> {
    let rows = agent.cli_json(&["identity", "list"]);
    let mut out: Vec<(String, u64)> = rows
        .as_array()
        .expect("identity list: an array")
        .iter()
        .filter_map(|r| {
            let service = r["labels"]["com.docker.compose.service"].as_str()?;
            (r["labels"]["com.docker.compose.project"] == PROJECT)
                .then(|| (service.to_owned(), r["id"].as_u64().unwrap_or(0)))
        })
        .collect();
    out.sort();
    out
}

/// A reboot, simulated: the agent killed, every pin (and with them the programs and links)
/// removed, dockerd restarted (the containers stop), the agent started again. The imported
/// policy comes back from the state directory, with the same identity numbers, and a probe
/// running from the moment the containers come back never reaches a protected port.
fn reboot_restores_policy_from_disk_before_containers_are_reachable(version: DockerVersion) {
    if !netpol_tests::require_root(
        &version.test_name("reboot_restores_policy_from_disk_before_containers_are_reachable"),
    ) {
        return;
    }
    let mut guard = docker(version);
    let docker = guard.as_mut().expect("daemon");
    let project = Project::up(docker, "compose-plain.yml");
    let mut agent = Agent::start(docker);
    let file = e2e_dir().join("policy-scenario.yaml");
    agent.cli_ok(&["policy", "import", file.to_str().expect("utf-8")]);
    wait_enforced(&agent, &scenario_containers(&project));
    assert_all("before the reboot", &scenario_checks(&project));
    let identities = scenario_identities(&agent);
    assert_eq!(identities.len(), 3, "identities: {identities:?}");

    // "Power off": no agent, no pins, no programs. Without them app2 reaches app1 again,
    // which shows the programs are really gone.
    agent.kill9();
    agent.remove_pins().expect("remove pins");
    let (app1, app2) = (project.container("app1"), project.container("app2"));
    assert_all(
        "pins removed",
        &[check(
            app2.client(),
            &app1,
            app1.ipv4,
            8080,
            Expect::Allowed,
        )],
    );
    timed("dockerd restart", || docker.restart());
    timed("agent start", || {
        agent.spawn_again();
        agent.wait_ready();
    });

    // Probe app2 -> app1 and the host -> db from the first moment both ends run again.
    let stop = AtomicBool::new(false);
    let attempts = AtomicUsize::new(0);
    let violations = Mutex::new(Vec::<String>::new());
    let cli = Cli::of(docker);
    thread::scope(|s| {
        s.spawn(|| {
            let running = |name: &str| -> Option<Container> {
                let out = cli
                    .command("docker")
                    .args([
                        "inspect",
                        "-f",
                        "{{.State.Pid}} {{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                        name,
                    ])
                    .output()
                    .ok()?;
                let text = String::from_utf8_lossy(&out.stdout);
                let f: Vec<&str> = text.split_whitespace().collect();
                (f.len() == 2 && f[0] != "0").then(|| Container::inspect(&cli, name))
            };
            let (app1, app2, db) = loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let all = (
                    running(&project.container_name("app1")),
                    running(&project.container_name("app2")),
                    running(&project.container_name("db")),
                );
                if let (Some(a), Some(b), Some(c)) = all {
                    break (a, b, c);
                }
            };
            let checks = [
                check(app2.client(), &app1, app1.ipv4, 8080, Expect::Denied),
                check(Client::host(), &db, db.ipv4, 5432, Expect::Denied),
            ];
            while !stop.load(Ordering::Relaxed) {
                for c in &checks {
                    match c.attempt(probe::DENY_TIMEOUT) {
                        // Not up yet (no address, no route): nothing got through.
                        Outcome::Timeout | Outcome::Error(_) => {}
                        other => violations
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(format!("{c}: got {other:?}")),
                    }
                    attempts.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            timed("containers back", || project.compose_ok(&["up", "-d"]));
            wait_enforced(&agent, &scenario_containers(&project));
            let deadline = Instant::now() + Duration::from_secs(20);
            while attempts.load(Ordering::Relaxed) < 6 {
                assert!(Instant::now() < deadline, "the boot probe made no attempts");
                thread::sleep(Duration::from_millis(20));
            }
        }));
        stop.store(true, Ordering::Relaxed);
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
    });
    let violations = violations.into_inner().unwrap_or_else(|e| e.into_inner());
    assert!(
        violations.is_empty(),
        "reachable before the policy was back:\n  {}\nagent log:\n{}",
        violations.join("\n  "),
        agent.log_tail(40)
    );
    assert_all("after the reboot", &scenario_checks(&project));
    assert_eq!(
        scenario_identities(&agent),
        identities,
        "identity numbers changed across the reboot"
    );
}

/// Bad input: each file is refused by `policy import` and by `policy validate` (offline) with
/// an error naming the file and the line or field (or the full map), nothing changes, and the
/// connectivity stays exactly as it was. A bad file in the policy directory is reported by
/// `status` and changes nothing either.
fn bad_policies_are_refused_and_change_nothing(version: DockerVersion) {
    if !netpol_tests::require_root(
        &version.test_name("bad_policies_are_refused_and_change_nothing"),
    ) {
        return;
    }
    let mut guard = docker(version);
    let docker = guard.as_mut().expect("daemon");
    let project = Project::up(docker, "compose-plain.yml");
    let agent = Agent::start_with(
        docker,
        AgentOptions {
            extra_args: vec!["--policy-entries".into(), "8".into()],
            ..AgentOptions::default()
        },
    );
    let good = e2e_dir().join("policy-scenario.yaml");
    agent.cli_ok(&["policy", "import", good.to_str().expect("utf-8")]);
    wait_enforced(&agent, &scenario_containers(&project));
    let checks = scenario_checks(&project);
    assert_all("the good policy", &checks);
    let policies = agent.cli_ok(&["policy", "get", "-o", "json"]);

    // (file, what the error must name)
    let cases: &[(&str, &[&str])] = &[
        ("malformed.yaml", &["malformed.yaml:8:"]),
        (
            "unsupported-field.yaml",
            &["unsupported-field.yaml:10:", "toFQDNs"],
        ),
        (
            "unknown-entity.yaml",
            &["unknown-entity.yaml:10:", "cluster-mesh"],
        ),
        ("too-large.yaml", &["POLICY"]),
    ];
    for (name, needles) in cases {
        let path = e2e_dir().join("bad").join(name);
        let path = path.to_str().expect("utf-8");
        let mut runs = vec![("import", agent.cli(&["policy", "import", path]))];
        if *name != "too-large.yaml" {
            // Offline: no agent needed.
            let out = Command::new(agent_binary())
                .args([
                    "--socket",
                    "/nonexistent/agent.sock",
                    "policy",
                    "validate",
                    path,
                ])
                .output()
                .expect("spawn validate");
            runs.push(("validate", out));
        }
        for (what, out) in runs {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "policy {what} {name} succeeded:\n{stderr}"
            );
            for n in *needles {
                assert!(
                    stderr.contains(n),
                    "policy {what} {name}: the error does not name {n:?}:\n{stderr}"
                );
            }
            eprintln!("policy {what} {name}: {}", stderr.trim());
        }
        assert_eq!(
            agent.cli_ok(&["policy", "get", "-o", "json"]),
            policies,
            "policies changed after refusing {name}"
        );
    }
    assert_all("after the refused policies", &checks);

    // A bad file dropped into the policy directory: reported, and nothing changes.
    std::fs::copy(
        e2e_dir().join("bad/unsupported-field.yaml"),
        agent.policy_dir().join("unsupported-field.yaml"),
    )
    .expect("copy");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = agent.cli_ok(&["status", "-o", "json"]);
        if status.contains("unsupported-field.yaml") {
            eprintln!("status with a bad policy file: {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status does not report the bad policy file:\n{status}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let get = agent.cli_json(&["policy", "get"]);
    let in_force: Vec<&serde_json::Value> = get
        .as_array()
        .expect("policy get: an array")
        .iter()
        .filter(|r| r.get("error").is_none())
        .collect();
    let before: serde_json::Value = serde_json::from_str(&policies).expect("policies json");
    assert_eq!(
        serde_json::Value::from(in_force.into_iter().cloned().collect::<Vec<_>>()),
        before,
        "the policies in force changed with a bad file in the policy directory"
    );
    assert!(
        get.as_array().into_iter().flatten().any(|r| r["source"]
            .as_str()
            .is_some_and(|s| s.ends_with("unsupported-field.yaml"))
            && r["error"].as_str().is_some_and(|e| e.contains("toFQDNs"))),
        "policy get does not name the rejected file: {get}"
    );
    assert_all("with a bad file in the policy directory", &checks);
}

/// Waits until `status` says whether `file` of the policy directory is rejected (`rejected`) or
/// not; returns the status.
fn wait_file_rejected(agent: &Agent, file: &str, rejected: bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = agent.cli_json(&["status"]);
        let is = status["policy_files_rejected"]
            .as_object()
            .is_some_and(|m| m.keys().any(|k| k.ends_with(file)));
        if is == rejected {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "status does not say {file} is {}rejected:\n{status}",
            if rejected { "" } else { "no longer " }
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// A policy file edited into an invalid state keeps its last valid version in force, also
/// across a reboot of the agent (killed, pins removed, started again with the file still
/// broken), and across a restart with a damaged `identities.json`; a valid edit then replaces
/// it.
fn a_broken_policy_file_keeps_its_last_valid_version_across_restarts(version: DockerVersion) {
    if !netpol_tests::require_root(
        &version.test_name("a_broken_policy_file_keeps_its_last_valid_version_across_restarts"),
    ) {
        return;
    }
    let mut guard = docker(version);
    let docker = guard.as_mut().expect("daemon");
    let project = Project::up(docker, "compose-plain.yml");
    let mut agent = Agent::start(docker);
    let good = std::fs::read_to_string(e2e_dir().join("policy-scenario.yaml")).expect("read");
    let file = agent.policy_dir().join("scenario.yaml");
    std::fs::write(&file, &good).expect("write policy file");
    wait_enforced(&agent, &scenario_containers(&project));
    let checks = scenario_checks(&project);
    assert_all("the valid file", &checks);

    // One typo: TCP -> TPC in db's rule.
    std::fs::write(&file, good.replacen("protocol: TCP", "protocol: TPC", 1)).expect("break");
    let status = wait_file_rejected(&agent, "scenario.yaml", true);
    eprintln!(
        "status with the broken file: {}",
        status["policy_files_rejected"]
    );
    let get = agent.cli_ok(&["policy", "get"]);
    assert!(
        get.contains("TPC") && get.contains("last valid version"),
        "{get}"
    );
    assert_all("the broken file (its last valid version)", &checks);

    // A reboot of the agent with the file still broken: the kept version is applied again.
    agent.kill9();
    agent.remove_pins().expect("remove pins");
    agent.restart();
    wait_enforced(&agent, &scenario_containers(&project));
    wait_file_rejected(&agent, "scenario.yaml", true);
    assert_all("after a reboot with the broken file", &checks);

    // A damaged identity table as well (the pins kept): the agent starts, keeps the file
    // aside, and gives every container a new number above the old ones, with its policy.
    let before = scenario_identities(&agent);
    agent.kill9();
    let table = agent.state_dir().join("identities.json");
    std::fs::write(&table, b"{\"identities\": {\"256\": {").expect("damage identities.json");
    agent.restart();
    wait_enforced(&agent, &scenario_containers(&project));
    assert_all("after a restart with a damaged identities.json", &checks);
    let after = scenario_identities(&agent);
    let highest = before.iter().map(|(_, id)| *id).max().unwrap_or(0);
    assert!(
        after.len() == before.len() && after.iter().all(|(_, id)| *id > highest),
        "new numbers above the old ones: {before:?} -> {after:?}"
    );
    let status = agent.cli_json(&["status"]);
    let recovered = status["state_recovered"].to_string();
    assert!(recovered.contains("identities.json.damaged-"), "{status}");
    let kept: Vec<_> = std::fs::read_dir(agent.state_dir())
        .expect("state dir")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("identities.json.damaged-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "the damaged file kept aside");

    // A valid edit replaces it: db accepts app1 only.
    let app1_only = good.replacen(
        "        - matchLabels:\n            com.docker.compose.project: npe2e\n            com.docker.compose.service: app2\n",
        "",
        1,
    );
    assert_ne!(app1_only, good, "the edit must change the file");
    std::fs::write(&file, &app1_only).expect("edit");
    wait_file_rejected(&agent, "scenario.yaml", false);
    let (db, app1, app2) = (
        project.container("db"),
        project.container("app1"),
        project.container("app2"),
    );
    assert_all(
        "after the valid edit",
        &[
            check(app1.client(), &db, db.ipv4, 5432, Expect::Allowed),
            check(app2.client(), &db, db.ipv4, 5432, Expect::Denied),
            check(Client::host(), &app1, app1.ipv4, 8080, Expect::Allowed),
            check(app2.client(), &app1, app1.ipv4, 8080, Expect::Denied),
        ],
    );
}

/// `docker run` options for the compose snippet's `cap_add: [..]` and `security_opt: [..]`
/// (packaging/sidecar/docker-compose.yml), which must not ask for `privileged`.
fn sidecar_privileges() -> Vec<String> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/sidecar/docker-compose.yml");
    let text = std::fs::read_to_string(&path).expect("read the sidecar compose file");
    let list = |key: &str| -> Vec<String> {
        let line = text
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("{}: no {key} line", path.display()));
        line.trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .split(',')
            .map(|v| v.trim().trim_matches('"').to_owned())
            .filter(|v| !v.is_empty())
            .collect()
    };
    assert!(
        !text
            .lines()
            .any(|l| l.trim_start().starts_with("privileged:")),
        "the sidecar compose file asks for privileged"
    );
    let mut args = Vec::new();
    for cap in list("cap_add:") {
        args.extend(["--cap-add".to_owned(), cap]);
    }
    for opt in list("security_opt:") {
        // compose's "apparmor:unconfined" is `docker run`'s "apparmor=unconfined"
        args.extend(["--security-opt".to_owned(), opt.replacen(':', "=", 1)]);
    }
    args
}

/// The sidecar image (packaging/sidecar/build.sh, from scratch) runs the agent in a container
/// and enforces the scenario, with the compose snippet's capabilities (no `--privileged`).
fn sidecar_image_enforces_the_scenario(version: DockerVersion) {
    if !netpol_tests::require_root(&version.test_name("sidecar_image_enforces_the_scenario")) {
        return;
    }
    let mut guard = docker(version);
    let docker = guard.as_mut().expect("daemon");
    let image = "netpol-test/sidecar";
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/sidecar/build.sh");
    let out = docker
        .command("bash")
        .arg(&script)
        .arg(image)
        .env("NETPOL_AGENT_BIN", agent_binary())
        .output()
        .expect("spawn build.sh");
    ok("packaging/sidecar/build.sh", out);

    // The compose snippet mounts /var/run/docker/netns (SandboxKey paths); the harness's
    // daemon keeps them under its own exec root.
    let netns_dir = docker
        .socket_path()
        .parent()
        .expect("run dir")
        .join("exec/netns");
    let netns_vol = format!("{0}:{0}:rslave", netns_dir.display());
    // `:rslave` needs a shared (or slave) source mount. On a systemd host `/` is shared; here
    // it is private, so make the directory a shared mount of its own, unmounted at the end.
    // Done before any container of this test exists, so every netns file is mounted on top.
    std::fs::create_dir_all(&netns_dir).expect("create netns dir");
    let d = netns_dir.to_str().expect("utf-8").to_owned();
    let bound = !findmnt_propagation(&netns_dir).contains("shared");
    if bound {
        for args in [vec!["--bind", &d, &d], vec!["--make-shared", &d]] {
            let mut cmd = Command::new("mount");
            cmd.args(&args);
            ok(&format!("mount {}", args.join(" ")), run(&mut cmd));
        }
    }
    let _unbind = Cleanup(|| {
        if bound {
            let _ = Command::new("umount").args(["-l", &d]).output();
        }
    });
    let project = Project::up(docker, "compose-labels.yml");
    let id = std::process::id();
    let dir = PathBuf::from(format!("{}/sidecar-{id}", netpol_tests::agent::RUN_PREFIX));
    let pin_dir = format!("{}sidecar-{id}", netpol_tests::agent::PIN_PREFIX);
    let name = "npe2e-sidecar";
    let _ = project.docker(&["rm", "-f", name]);
    let _cleanup = Cleanup(|| {
        let _ = project.docker(&["rm", "-f", name]);
        let _ = std::fs::remove_dir_all(&pin_dir);
        let _ = std::fs::remove_dir_all(&dir);
    });
    for d in ["state", "policies", "run"] {
        std::fs::create_dir_all(dir.join(d)).expect("create sidecar dir");
    }
    let vol = |host: PathBuf, inside: &str| format!("{}:{inside}", host.display());
    let (sock, state, policies, run_vol) = (
        vol(docker.socket_path(), "/var/run/docker.sock"),
        vol(dir.join("state"), "/var/lib/netpol"),
        vol(dir.join("policies"), "/etc/netpol/policies.d"),
        vol(dir.join("run"), "/run/netpol"),
    );
    let mut args: Vec<String> = [
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        "--pid",
        "host",
    ]
    .map(String::from)
    .into();
    // The compose snippet's cap_add and security_opt, not --privileged (which these VMs refuse).
    args.extend(sidecar_privileges());
    for v in [
        sock.as_str(),
        "/sys/fs/bpf:/sys/fs/bpf:rshared",
        &netns_vol,
        &state,
        &policies,
        &run_vol,
    ] {
        args.extend(["-v".to_owned(), v.to_owned()]);
    }
    args.extend([image, "run", "--pin-dir", &pin_dir].map(String::from));
    project.docker_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let cli = netpol_tests::agent::AgentCli::new(dir.join("run/agent.sock"), None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(last) = cli.docker_connected() {
        let logs = project.docker(&["logs", "--tail", "30", name]);
        assert!(
            Instant::now() < deadline,
            "the sidecar's agent is not ready: {last}\nits log:\n{}{}",
            String::from_utf8_lossy(&logs.stdout),
            String::from_utf8_lossy(&logs.stderr)
        );
        thread::sleep(Duration::from_millis(100));
    }
    let ids: Vec<String> = scenario_containers(&project)
        .into_iter()
        .map(|c| c.id)
        .collect();
    cli.wait_enforced(&ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert_all("sidecar", &scenario_checks(&project));
    // The sidecar itself (host network) is listed, as not enforceable, not silently skipped.
    let rows = cli.endpoints();
    assert!(
        rows.iter()
            .any(|r| r["name"].as_str().is_some_and(|n| n.contains(name))
                && r["state"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("not enforceable"))),
        "the host-network sidecar is not listed as not enforceable: {rows:?}"
    );
}

/// Issue 7, items 4 and 5 with real containers, over IPv4 and IPv6:
/// - an explicitly empty peer list (`fromEndpoints: []`) opens db's port to nobody, while the
///   rule beside it still lets app1 in;
/// - `toCIDRSet: [{cidr: 0.0.0.0/0}]` opens IPv4 egress only (app1 reaches an outside server
///   over IPv4, not IPv6), and `egressDeny: [{toCIDR: ["::/0"]}]` blocks IPv6 only (app2 still
///   reaches it over IPv4).
///
/// Then `policy delete -f` removes what the file defined, and everything is open again.
fn empty_peer_lists_and_cidr_families_fail_closed(version: DockerVersion) {
    if !netpol_tests::require_root(
        &version.test_name("empty_peer_lists_and_cidr_families_fail_closed"),
    ) {
        return;
    }
    const OUT_PORT: u16 = 18443;
    let mut guard = docker(version);
    let docker = guard.as_mut().expect("daemon");
    let project = Project::up(docker, "compose-plain.yml");
    let agent = Agent::start(docker);
    let (db, app1, app2) = (
        project.container("db"),
        project.container("app1"),
        project.container("app2"),
    );
    let db6 = db.ipv6.expect("db has IPv6");
    // A server outside Docker on both families: world for the containers.
    let outside = OutsideNs::create(9);
    let out6 = IpAddr::V6(outside.add_ipv6());
    let out4 = IpAddr::V4(outside.addr);
    let forwarding = "/proc/sys/net/ipv6/conf/all/forwarding";
    let old_forwarding = std::fs::read_to_string(forwarding).expect("read forwarding");
    let _restore = Cleanup(|| {
        let _ = std::fs::write(forwarding, old_forwarding.trim());
    });
    std::fs::write(forwarding, "1").expect("IPv6 forwarding");
    let _listener = probe::in_netns(&outside.path(), || {
        std::net::TcpListener::bind(("::", OUT_PORT)).expect("listen in the outside namespace")
    });
    let to_out = |c: &Container, addr: IpAddr, expect| Check {
        from: c.client(),
        to_name: "outside".into(),
        to: SocketAddr::new(addr, OUT_PORT),
        expect,
        http: false,
    };
    use Expect::{Allowed, Denied};
    // Without policy everything is reachable: the denials below are the policy's.
    let open = || {
        assert_all(
            "no policy",
            &[
                check(app2.client(), &db, db.ipv4, 5432, Allowed),
                check(app2.client(), &db, db6, 5432, Allowed),
                to_out(&app1, out4, Allowed),
                to_out(&app1, out6, Allowed),
                to_out(&app2, out4, Allowed),
                to_out(&app2, out6, Allowed),
            ],
        )
    };
    open();

    let sel = |service: &str| {
        format!("{{matchLabels: {{com.docker.compose.project: {PROJECT}, com.docker.compose.service: {service}}}}}")
    };
    let port = |p: u16| format!("[{{ports: [{{port: \"{p}\", protocol: TCP}}]}}]");
    let policy = format!(
        "apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: db-empty-list}}
spec:
  endpointSelector: {db}
  ingress:
  - fromEndpoints: []
    toPorts: {p5432}
  - fromEndpoints: [{app1}]
    toPorts: {p5432}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: app1-world-ipv4}}
spec:
  endpointSelector: {app1}
  egress:
  - toCIDRSet: [{{cidr: 0.0.0.0/0, except: [192.0.2.0/24]}}]
  - toEndpoints: [{db}]
    toPorts: {p5432}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: app2-no-ipv6}}
spec:
  endpointSelector: {app2}
  egress:
  - toEntities: [world]
  - toEndpoints: [{db}]
  egressDeny:
  - toCIDR: [\"::/0\"]
",
        db = sel("db"),
        app1 = sel("app1"),
        app2 = sel("app2"),
        p5432 = port(5432),
    );
    let file = std::env::temp_dir().join(format!("netpol-fail-closed-{}.yaml", std::process::id()));
    let _rm = Cleanup(|| {
        let _ = std::fs::remove_file(&file);
    });
    std::fs::write(&file, policy).expect("write policy");
    let file = file.to_str().expect("utf-8").to_owned();
    agent.cli_ok(&["policy", "import", &file]);
    wait_enforced(&agent, &[db.clone(), app1.clone(), app2.clone()]);
    let mut checks = Vec::new();
    for addr in [db.ipv4, db6] {
        checks.extend([
            // The rule beside the empty list still lets app1 in...
            check(app1.client(), &db, addr, 5432, Allowed),
            // ...and `fromEndpoints: []` lets nobody else in.
            check(app2.client(), &db, addr, 5432, Denied),
            check(Client::host(), &db, addr, 5432, Denied),
        ]);
    }
    checks.extend([
        // 0.0.0.0/0 is IPv4 only.
        to_out(&app1, out4, Allowed),
        to_out(&app1, out6, Denied),
        // ::/0 is IPv6 only.
        to_out(&app2, out4, Allowed),
        to_out(&app2, out6, Denied),
    ]);
    timed("empty lists and CIDR families", || {
        assert_all("fail closed", &checks)
    });

    // Whole or nothing: one unknown name, and nothing is deleted.
    let out = agent.cli(&["policy", "delete", "db-empty-list", "no-such-policy"]);
    assert!(!out.status.success(), "deleting an unknown name succeeded");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-policy"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_all(
        "after a refused delete",
        &[
            check(app2.client(), &db, db.ipv4, 5432, Denied),
            to_out(&app1, out6, Denied),
        ],
    );
    // `policy delete -f`: the policies the file defines.
    let deleted = agent.cli_ok(&["policy", "delete", "-f", &file]);
    for name in ["db-empty-list", "app1-world-ipv4", "app2-no-ipv6"] {
        assert!(deleted.contains(&format!("deleted {name}")), "{deleted}");
    }
    open();
}

/// Imports `name`: the test image's filesystem with `LABEL`s of its own (`docker import -c`).
fn build_labelled_image(docker: &DockerDaemon, name: &str, labels: &str) {
    let cid = docker.docker_ok(&["create", IMAGE]).trim().to_owned();
    let mut export = docker
        .command("docker")
        .args(["export", &cid])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn docker export");
    let tar = export.stdout.take().expect("export stdout");
    let import = docker
        .command("docker")
        .args(["import", "-c", r#"CMD ["/bin/sh"]"#, "-c"])
        .arg(format!("LABEL {labels}"))
        .args(["-", name])
        .stdin(tar)
        .output()
        .expect("spawn docker import");
    let exported = export.wait().expect("wait for docker export");
    docker.docker(&["rm", &cid]);
    assert!(exported.success(), "docker export failed");
    ok(&format!("docker import {name}"), import);
}

/// Waits until `endpoint list` shows container `id` attached with its policy applied (state
/// `enforced`, notes allowed after it); returns its state.
fn wait_enforced_with_notes(agent: &Agent, id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = agent.endpoints();
        if let Some(state) = rows
            .iter()
            .filter(|r| r["container"].as_str().is_some_and(|c| id.starts_with(c)))
            .find_map(|r| r["state"].as_str().filter(|s| s.starts_with("enforced")))
        {
            return state.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "{id} not enforced after 20 s: {rows:?}\nagent log:\n{}",
            agent.log_tail(30)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// No `netpol.*` label opens more than its own container, and a broken one opens nothing:
/// db accepts app1 only (a policy file); a container started with db's compose labels and
/// `netpol.ingress=all` opens only itself; a container from an image with
/// `LABEL netpol.ingress=all netpol.egress=all` and db's labels is held by db's policy (the
/// image's labels allow nothing, with a warning); a container with `netpol.ingress:
/// "app1:5432/tpc"` accepts nothing, and its egress stays open.
fn netpol_labels_never_open_more_than_their_own_container(version: DockerVersion) {
    if !netpol_tests::require_root(
        &version.test_name("netpol_labels_never_open_more_than_their_own_container"),
    ) {
        return;
    }
    let mut guard = docker(version);
    let docker = guard.as_mut().expect("daemon");
    let project = Project::up(docker, "compose-plain.yml");
    let agent = Agent::start(docker);
    let scenario = std::fs::read_to_string(e2e_dir().join("policy-scenario.yaml")).expect("read");
    let app1_only = scenario.replacen(
        "        - matchLabels:\n            com.docker.compose.project: npe2e\n            com.docker.compose.service: app2\n",
        "",
        1,
    );
    assert_ne!(app1_only, scenario);
    std::fs::write(agent.policy_dir().join("db.yaml"), &app1_only).expect("policy file");
    build_labelled_image(
        docker,
        "netpol-test/open",
        "netpol.ingress=all netpol.egress=all",
    );

    let names = ["npe2e-rogue", "npe2e-imgdb", "npe2e-broken"];
    let _rm = Cleanup(|| {
        for n in names {
            project.docker(&["rm", "-f", n]);
        }
    });
    let net = format!("{PROJECT}_backend");
    let run = |name: &str, image: &str, labels: &[&str]| -> Container {
        let mut args = vec!["run", "-d", "--name", name, "--network", &net];
        for l in labels {
            args.extend(["--label", l]);
        }
        args.extend([image, "nc", "-ll", "-p", "5432", "-e", "/bin/cat"]);
        project.docker_ok(&args);
        Container::inspect(&project.cli, name)
    };
    let db_labels = [
        "com.docker.compose.project=npe2e",
        "com.docker.compose.service=db",
    ];
    let rogue = run(
        names[0],
        IMAGE,
        &[db_labels[0], db_labels[1], "netpol.ingress=all"],
    );
    let imgdb = run(names[1], "netpol-test/open", &db_labels);
    let broken = run(
        names[2],
        IMAGE,
        &[
            "com.docker.compose.project=npe2e",
            "com.docker.compose.service=cache",
            "netpol.ingress=app1:5432/tpc",
        ],
    );
    wait_enforced(&agent, &scenario_containers(&project));
    wait_enforced(&agent, std::slice::from_ref(&rogue));
    let img_state = wait_enforced_with_notes(&agent, &imgdb.id);
    let broken_state = wait_enforced_with_notes(&agent, &broken.id);
    eprintln!("imgdb: {img_state}\nbroken: {broken_state}");
    assert!(
        img_state.contains("not applied: the image has the same label"),
        "{img_state}"
    );
    assert!(
        broken_state.contains("ingress default deny") && broken_state.contains("tpc"),
        "{broken_state}"
    );
    let status = agent.cli_json(&["status"]);
    assert!(
        status["label_errors"][names[2]].is_string()
            && status["label_warnings"][names[1]].is_string(),
        "{status}"
    );

    let (db, app1, app2) = (
        project.container("db"),
        project.container("app1"),
        project.container("app2"),
    );
    use Expect::{Allowed, Denied};
    let checks = [
        check(app1.client(), &db, db.ipv4, 5432, Allowed),
        check(app2.client(), &db, db.ipv4, 5432, Denied),
        check(app2.client(), &rogue, rogue.ipv4, 5432, Allowed),
        check(app1.client(), &imgdb, imgdb.ipv4, 5432, Allowed),
        check(app2.client(), &imgdb, imgdb.ipv4, 5432, Denied),
        check(app1.client(), &broken, broken.ipv4, 5432, Denied),
        check(app2.client(), &broken, broken.ipv4, 5432, Denied),
        check(broken.client(), &rogue, rogue.ipv4, 5432, Allowed),
    ];
    assert_all("labels that must not open anything", &checks);
}

/// Issue 10, from observed traffic to policy: a compose project runs in audit mode under a
/// default-deny policy (`netpol.io/audit`), so its traffic passes and is recorded as audited
/// would-be drops; `policy suggest` turns that into policies; with the audit policy gone and the
/// suggestion imported (enforcing), the same traffic passes while what was never seen (another
/// port of db, another pair, the host to db) is denied. The suggestion also exports for
/// Kubernetes.
fn suggested_policy_allows_what_was_seen_and_denies_the_rest(version: DockerVersion) {
    if !netpol_tests::require_root(
        &version.test_name("suggested_policy_allows_what_was_seen_and_denies_the_rest"),
    ) {
        return;
    }
    let mut guard = docker(version);
    let docker = guard.as_mut().expect("daemon");
    let project = Project::up(docker, "compose-plain.yml");
    let agent = Agent::start(docker);
    let audit = agent.state_dir().join("../deny-all-audit.yaml");
    std::fs::write(
        &audit,
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: deny-all\n  annotations: {{ netpol.io/audit: \"true\" }}\nspec:\n  endpointSelector: {{ matchLabels: {{ com.docker.compose.project: {PROJECT} }} }}\n  ingress: [{{}}]\n  egress: [{{}}]\n"
        ),
    )
    .expect("write the audit policy");
    agent.cli_ok(&["policy", "import", audit.to_str().expect("utf-8 path")]);
    let (db, app1, app2) = (
        project.container("db"),
        project.container("app1"),
        project.container("app2"),
    );
    // A second port on db, never used while recording.
    project.docker_ok(&[
        "exec", "-d", &db.name, "nc", "-ll", "-p", "5433", "-e", "/bin/cat",
    ]);
    wait_enforced(&agent, &[db.clone(), app1.clone(), app2.clone()]);
    use Expect::{Allowed, Denied};
    let seen = [
        check(app1.client(), &db, db.ipv4, 5432, Allowed),
        check(Client::host(), &app1, app1.ipv4, 8080, Allowed),
    ];
    assert_all("traffic in audit mode", &seen);
    assert_all(
        "db:5433 listens",
        &[check(db.client(), &db, db.ipv4, 5433, Allowed)],
    );
    // app2 scans db's ports where nothing listens: audit mode lets the SYNs through, db's
    // kernel answers each with an RST. Unanswered, they must not become suggested ports.
    const SCANNED: std::ops::RangeInclusive<u16> = 7001..=7010;
    for port in SCANNED {
        assert_eq!(
            probe::connect_from(
                Some(&app2.netns),
                SocketAddr::new(db.ipv4, port),
                probe::ALLOW_DEADLINE
            ),
            Outcome::Refused,
            "db:{port} is closed"
        );
    }

    // The events reach the recorder asynchronously, and wait there for their answer: poll until
    // both flows are in and the scan is counted as left out.
    let left_out = |s: &str| -> u64 {
        s.lines()
            .filter(|l| l.contains("got no answer"))
            .find_map(|l| l.strip_prefix("# left out: "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let suggested = loop {
        let s = agent.cli_ok(&["policy", "suggest", "--project", PROJECT]);
        if s.contains("port: \"5432\"")
            && s.contains("port: \"8080\"")
            && left_out(&s) >= SCANNED.len() as u64
        {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "flows not recorded after 10 s:\n{s}"
        );
        thread::sleep(Duration::from_millis(100));
    };
    eprintln!("$ netpol-agent policy suggest --project {PROJECT}\n{suggested}");
    // Recorded as audits (no `--record-flows`): every event of the window is one, at least
    // one per flow and side that policy would have dropped.
    let counts: Vec<u64> = suggested
        .split_once(" flow classes (")
        .and_then(|(_, rest)| rest.split_once(" audited"))
        .map(|(head, _)| {
            head.split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        matches!(counts[..], [events, audited] if events == audited && events >= 3),
        "{counts:?}: {suggested}"
    );
    assert!(
        suggested.contains("no events were suppressed"),
        "{suggested}"
    );
    // Only server ports: no client's ephemeral port, no flow that was not seen, no scanned port
    // (nor app2 -> db at all: only its scan went there).
    assert_eq!(suggested.matches("port: \"").count(), 3, "{suggested}");
    for port in SCANNED {
        assert!(
            !suggested.contains(&format!("\"{port}\"")),
            "scanned port {port} suggested:\n{suggested}"
        );
    }
    let labels = agent.cli_ok(&["policy", "suggest", "--project", PROJECT, "-o", "labels"]);
    eprintln!("$ netpol-agent policy suggest --project {PROJECT} -o labels\n{labels}");
    for want in [
        "netpol.egress: \"db:5432/tcp\"",
        "netpol.ingress: \"host:8080/tcp\"",
    ] {
        assert!(labels.contains(want), "{want}:\n{labels}");
    }

    let file = agent.state_dir().join("../suggested.yaml");
    std::fs::write(&file, &suggested).expect("write the suggestion");
    agent.cli_ok(&["policy", "delete", "deny-all"]);
    agent.cli_ok(&["policy", "import", file.to_str().expect("utf-8 path")]);
    wait_enforced(&agent, &[db.clone(), app1.clone(), app2.clone()]);
    let (db6, app16) = (db.ipv6.expect("ipv6"), app1.ipv6.expect("ipv6"));
    assert_all(
        "suggested policy",
        &[
            check(app1.client(), &db, db.ipv4, 5432, Allowed),
            check(app1.client(), &db, db6, 5432, Allowed),
            check(Client::host(), &app1, app1.ipv4, 8080, Allowed),
            check(Client::host(), &app1, app16, 8080, Allowed),
            check(app1.client(), &db, db.ipv4, 5433, Denied),
            check(app2.client(), &db, db.ipv4, 5432, Denied),
            check(Client::host(), &db, db.ipv4, 5432, Denied),
            check(app2.client(), &app1, app1.ipv4, 8080, Denied),
            check(db.client(), &app1, app1.ipv4, 8080, Denied),
        ],
    );

    let k8s = agent.cli_ok(&["policy", "export", "--namespace", "shop"]);
    eprintln!("$ netpol-agent policy export --namespace shop\n{k8s}");
    for want in [
        "name: \"npe2e-db\"",
        "namespace: \"shop\"",
        "app.kubernetes.io/name: \"app1\"",
    ] {
        assert!(k8s.contains(want), "{want}:\n{k8s}");
    }
}

/// `policy matrix -o json` against real connections: every cell between the scenario's
/// containers, the host and the world is probed (IPv4: the service's listener and a closed port,
/// port 9), and what the matrix allows connects (or is refused by the peer: the SYN got there)
/// while what it denies times out. `policy trace` agrees with the matrix, names the deny rule,
/// and takes addresses (IPv6 too).
fn trace_and_matrix_agree_with_real_connections(version: DockerVersion) {
    if !netpol_tests::require_root(
        &version.test_name("trace_and_matrix_agree_with_real_connections"),
    ) {
        return;
    }
    const LISTEN: u16 = 18444;
    let mut guard = docker(version);
    let docker = guard.as_mut().expect("daemon");
    let project = Project::up(docker, "compose-plain.yml");
    let agent = Agent::start(docker);
    let containers = scenario_containers(&project);
    for f in ["policy-scenario.yaml", "policy-trace.yaml"] {
        let f = e2e_dir().join(f);
        agent.cli_ok(&["policy", "import", f.to_str().expect("utf-8")]);
    }
    wait_enforced(&agent, &containers);
    let (db, app1, app2) = (&containers[0], &containers[1], &containers[2]);

    // The world: a namespace outside Docker with a listener; the host: a listener here, reached
    // at the network's gateway.
    let outside = OutsideNs::create(10);
    let _world = probe::in_netns(&outside.path(), || {
        std::net::TcpListener::bind(("0.0.0.0", LISTEN)).expect("listen in the outside namespace")
    });
    let _host = std::net::TcpListener::bind(("0.0.0.0", LISTEN)).expect("listen on the host");
    let gateway: IpAddr = project
        .docker_ok(&[
            "network",
            "inspect",
            "-f",
            "{{range .IPAM.Config}}{{.Gateway}} {{end}}",
            &format!("{PROJECT}_backend"),
        ])
        .split_whitespace()
        .find_map(|a| a.parse::<std::net::Ipv4Addr>().ok())
        .map(IpAddr::V4)
        .expect("an IPv4 gateway");

    let m = agent.cli_json(&["policy", "matrix", "--project", PROJECT]);
    let cell = |from: &str, to: &str| -> &serde_json::Value {
        m["cells"]
            .as_array()
            .expect("cells")
            .iter()
            .find(|c| c["from"] == from && c["to"] == to)
            .unwrap_or_else(|| panic!("no cell {from} -> {to}: {m}"))
    };
    // What the scenario means (so that the probes below cannot agree with an empty matrix).
    for (from, to, text) in [
        ("app1", "db", "5432/tcp"),
        ("app2", "db", "-"),
        ("db", "app1", "-"),
        ("app1", "app2", "-"),
        ("host", "app1", "8080/tcp"),
        ("host", "db", "-"),
        ("app1", "world", "-"),
        ("app1", "host", "*"),
        ("app2", "world", "*"),
    ] {
        assert_eq!(cell(from, to)["text"], text, "{from} -> {to}: {m}");
    }
    let allows = |c: &serde_json::Value, port: u16| {
        c["ports"]["tcp"]
            .as_array()
            .expect("tcp ranges")
            .iter()
            .any(|r| r[0].as_u64() <= Some(port.into()) && Some(u64::from(port)) <= r[1].as_u64())
    };
    struct Probe {
        what: String,
        from: Option<PathBuf>,
        to: SocketAddr,
        allowed: bool,
    }
    let by_service = [
        ("db", db, 5432u16),
        ("app1", app1, 8080),
        ("app2", app2, 8080),
    ];
    let sources: Vec<(&str, Option<PathBuf>)> = by_service
        .iter()
        .map(|(s, c, _)| (*s, Some(c.netns.clone())))
        .chain([("host", None)])
        .collect();
    let mut probes = Vec::new();
    for (from, netns) in &sources {
        let mut targets: Vec<(&str, SocketAddr)> = Vec::new();
        for (to, c, port) in &by_service {
            // A container's connection to itself never crosses its veth.
            if to != from {
                targets.push((to, SocketAddr::new(c.ipv4, *port)));
                targets.push((to, SocketAddr::new(c.ipv4, 9)));
            }
        }
        if *from != "host" {
            targets.push(("host", SocketAddr::new(gateway, LISTEN)));
            targets.push(("world", SocketAddr::new(IpAddr::V4(outside.addr), LISTEN)));
        }
        for (to, addr) in targets {
            let c = cell(from, to);
            assert_eq!(
                c["to_addr"].as_str(),
                (to != "host" && to != "world")
                    .then(|| addr.ip().to_string())
                    .as_deref(),
                "{c}"
            );
            probes.push(Probe {
                what: format!("{from} -> {to} {addr} (matrix: {})", c["text"]),
                from: netns.clone(),
                to: addr,
                allowed: allows(c, addr.port()),
            });
        }
    }
    assert_eq!(probes.len(), 3 * (4 + 2) + 6);
    // Probes of one listener one after the other (nc's backlog is small), listeners at once.
    let mut groups: Vec<Vec<&Probe>> = Vec::new();
    for p in &probes {
        match groups.iter_mut().find(|g| g[0].to == p.to) {
            Some(g) => g.push(p),
            None => groups.push(vec![p]),
        }
    }
    let run = |p: &Probe| -> Option<String> {
        if !p.allowed {
            return match probe::connect_from(p.from.as_deref(), p.to, probe::DENY_TIMEOUT) {
                Outcome::Timeout => None,
                other => Some(format!("{}: denied, but {other:?}", p.what)),
            };
        }
        let deadline = Instant::now() + probe::ALLOW_DEADLINE;
        loop {
            match probe::connect_from(p.from.as_deref(), p.to, Duration::from_secs(2)) {
                Outcome::Open | Outcome::Refused => return None,
                other if Instant::now() > deadline => {
                    return Some(format!("{}: allowed, but {other:?}", p.what))
                }
                _ => thread::sleep(Duration::from_millis(50)),
            }
        }
    };
    let errors: Vec<String> = timed("matrix probes", || {
        thread::scope(|s| {
            let hs: Vec<_> = groups
                .iter()
                .map(|g| s.spawn(move || g.iter().filter_map(|p| run(p)).collect::<Vec<_>>()))
                .collect();
            hs.into_iter()
                .flat_map(|h| h.join().expect("probe thread"))
                .collect()
        })
    });
    assert!(
        errors.is_empty(),
        "matrix vs connections:\n  {}\n{m}",
        errors.join("\n  ")
    );

    // trace agrees with the matrix, and says why.
    let t = agent.cli_json(&["policy", "trace", "npe2e/app2", "npe2e/db:5432"]);
    assert_eq!(t["verdict"], "denied", "{t}");
    assert_eq!(t["ingress"]["outcome"], "denied", "{t}");
    assert!(
        t["ingress"]["rule_name"]
            .as_str()
            .is_some_and(|r| r.starts_with("trace-deny ingressDeny[0]")),
        "{t}"
    );
    let t = agent.cli_json(&["policy", "trace", "app1", "db:5432"]);
    assert_eq!(t["verdict"], "allowed", "{t}");
    assert!(
        t["egress"]["rule_name"]
            .as_str()
            .is_some_and(|r| r.starts_with("app1-egress egress[0]")),
        "{t}"
    );
    assert!(
        t["ingress"]["rule_name"]
            .as_str()
            .is_some_and(|r| r.starts_with("db ingress[0]")),
        "{t}"
    );
    let text = agent.cli_ok(&["policy", "trace", &app1.name, "world:443"]);
    assert!(
        text.contains(": DENIED") && text.contains("default deny because app1-egress selects it"),
        "{text}"
    );
    // Addresses, IPv6 included, with a real connection each.
    let (db6, app16) = (db.ipv6.expect("db IPv6"), app1.ipv6.expect("app1 IPv6"));
    let t = agent.cli_json(&[
        "policy",
        "trace",
        &app16.to_string(),
        &format!("[{db6}]:5432"),
    ]);
    assert_eq!(
        (&t["from"], &t["to"], &t["verdict"]),
        (&"npe2e/app1".into(), &"npe2e/db".into(), &"allowed".into()),
        "{t}"
    );
    let t = agent.cli_json(&["policy", "trace", "host", &format!("{}:5432", db.ipv4)]);
    assert_eq!(t["verdict"], "denied", "{t}");
    let t = agent.cli_json(&["policy", "trace", "app2", &format!("[{db6}]:5432")]);
    assert_eq!(t["verdict"], "denied", "{t}");
    assert_all(
        "trace by address",
        &[
            check(app1.client(), db, db6, 5432, Expect::Allowed),
            check(app2.client(), db, db6, 5432, Expect::Denied),
            check(Client::host(), db, db.ipv4, 5432, Expect::Denied),
        ],
    );
}

/// Audit mode (issue 10): with the scenario's policies annotated `netpol.io/audit: "true"`,
/// every connection of the matrix succeeds, and each one that the policy would drop is reported
/// by `monitor --json` as an audit with its cause (policy-denied, and the policy whose default
/// deny it is). The same policies without the annotation then enforce the same matrix: those
/// connections fail, the allowed ones still connect; a connection that audit mode let through
/// and is still open passes nothing more either way (also when the container sends first, through
/// its unenforced egress), while an allowed one opened during audit mode goes on.
fn audit_mode_reports_what_it_would_drop_then_enforcing_drops_it(version: DockerVersion) {
    if !netpol_tests::require_root(
        &version.test_name("audit_mode_reports_what_it_would_drop_then_enforcing_drops_it"),
    ) {
        return;
    }
    let mut guard = docker(version);
    let docker = guard.as_mut().expect("daemon");
    let project = Project::up(docker, "compose-plain.yml");
    let agent = Agent::start(docker);
    let text = std::fs::read_to_string(e2e_dir().join("policy-scenario.yaml")).expect("policy");
    let audited = text.replace(
        "metadata:\n",
        "metadata:\n  annotations:\n    netpol.io/audit: \"true\"\n",
    );
    let file = agent.state_dir().join("audit-scenario.yaml");
    std::fs::write(&file, audited).expect("write the audit policy");
    let file = file.to_str().expect("utf-8 path").to_owned();

    let mut monitor = ChildGuard(
        Command::new(agent_binary())
            .arg("--socket")
            .arg(agent.socket())
            .args(["monitor", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn monitor"),
    );
    let stdout = monitor.0.stdout.take().expect("monitor stdout");
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(v) = serde_json::from_str(&line) {
                if tx.send(v).is_err() {
                    break;
                }
            }
        }
    });

    agent.cli_ok(&["policy", "import", &file]);
    wait_enforced(&agent, &scenario_containers(&project));
    let eps = agent.endpoints();
    assert!(
        eps.iter().any(|e| e["ingress_enforced"] == true),
        "the audit policy is computed as usual (enforced): {eps:?}"
    );
    let enforcing = scenario_checks(&project);
    let would_drop: Vec<&Check> = enforcing
        .iter()
        .filter(|c| matches!(c.expect, Expect::Denied))
        .collect();
    assert!(!would_drop.is_empty());
    let all_connect: Vec<Check> = enforcing
        .iter()
        .cloned()
        .map(|mut c| {
            c.expect = Expect::Allowed;
            c
        })
        .collect();
    timed("audit mode: every connection succeeds", || {
        assert_all("audit mode", &all_connect)
    });
    // Each would-be drop was reported, with its cause. (The monitor may still be catching up.)
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen: Vec<serde_json::Value> = Vec::new();
    let missing = loop {
        seen.extend(rx.try_iter().filter(|e| e["kind"] == "audit"));
        let missing: Vec<String> = would_drop
            .iter()
            .filter(|c| {
                !seen.iter().any(|e| {
                    e["dst"] == c.to.ip().to_string()
                        && e["dport"] == c.to.port()
                        && e["reason"] == "policy-denied"
                        && e["default_deny_by"]
                            .as_array()
                            .is_some_and(|by| !by.is_empty())
                })
            })
            .map(|c| c.to_string())
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert!(
        missing.is_empty(),
        "audit events missing for {missing:?}; seen: {seen:?}"
    );
    let host_to_db = seen
        .iter()
        .find(|e| e["dport"] == 5432 && e["src_name"] == "host")
        .expect("an audit of host -> db:5432");
    assert_eq!(host_to_db["default_deny_by"], serde_json::json!(["db"]));
    let status = agent.cli_json(&["status"]);
    assert!(
        status["audits"]["policy-denied"].as_u64().unwrap_or(0) >= would_drop.len() as u64,
        "{status}"
    );
    drop(monitor);

    // Connections open while audit mode ends: host -> app2:18445, which app2's policy denies
    // (the server is this test, in app2's namespace, so it can send first later), and host ->
    // app1:8080, which it allows.
    use std::io::{Read as _, Write as _};
    let containers = scenario_containers(&project);
    let (app1, app2) = (&containers[1], &containers[2]);
    let listener = probe::in_netns(&app2.netns, || {
        std::net::TcpListener::bind(("0.0.0.0", 18445)).expect("listen in app2's namespace")
    });
    let connect = |to: SocketAddr| {
        std::net::TcpStream::connect_timeout(&to, probe::ALLOW_DEADLINE)
            .unwrap_or_else(|e| panic!("host -> {to} in audit mode: {e}"))
    };
    let mut client = connect(SocketAddr::new(app2.ipv4, 18445));
    let (mut server, _) = listener.accept().expect("accept in app2's namespace");
    let mut allowed = connect(SocketAddr::new(app1.ipv4, 8080));
    // Whether `msg` written to `from` arrives at `to` (the echo server: `from` itself).
    let arrives = |from: &mut std::net::TcpStream, to: &mut std::net::TcpStream, msg: &[u8]| {
        from.write_all(msg).expect("write");
        to.set_read_timeout(Some(probe::DENY_TIMEOUT))
            .expect("timeout");
        let mut buf = vec![0; msg.len()];
        to.read_exact(&mut buf).is_ok() && buf == msg
    };
    assert!(
        arrives(&mut client, &mut server, b"audited"),
        "audit mode: host -> app2"
    );
    assert!(
        arrives(&mut server, &mut client, b"answer"),
        "audit mode: app2 -> host"
    );
    let mut echo = allowed.try_clone().expect("clone");
    assert!(
        arrives(&mut allowed, &mut echo, b"allowed"),
        "host -> app1 echo"
    );

    // Leaving audit mode: the same policies, enforcing.
    agent.cli_ok(&[
        "policy",
        "import",
        e2e_dir().join("policy-scenario.yaml").to_str().unwrap(),
    ]);
    timed("enforcing again: the same matrix", || {
        assert_all("audit mode left", &enforcing)
    });
    // The connection audit mode let through is over both ways: app2 sending first through
    // its unenforced egress does not open it again for the host's packets. The allowed one
    // goes on.
    assert!(
        !arrives(&mut server, &mut client, b"late answer"),
        "app2 -> host after audit mode"
    );
    assert!(
        !arrives(&mut client, &mut server, b"late data"),
        "host -> app2 after audit mode"
    );
    assert!(
        arrives(&mut allowed, &mut echo, b"still allowed"),
        "host -> app1 after audit mode"
    );
}

netpol_tests::docker_tests!(
    compose_labels_protect_the_database_scenario,
    published_port_clients_are_world_or_host_as_documented,
    without_userland_proxy_published_port_clients_are_world_or_host,
    a_broken_policy_file_keeps_its_last_valid_version_across_restarts,
    agent_with_only_the_units_privileges_enforces_the_scenario,
    cilium_policy_file_protects_the_database_scenario,
    published_port_reaches_world_and_host_but_not_other_containers,
    agent_kill9_and_restart_keep_enforcing,
    dockerd_restart_and_new_addresses_keep_policy,
    reboot_restores_policy_from_disk_before_containers_are_reachable,
    bad_policies_are_refused_and_change_nothing,
    sidecar_image_enforces_the_scenario,
    empty_peer_lists_and_cidr_families_fail_closed,
    netpol_labels_never_open_more_than_their_own_container,
    suggested_policy_allows_what_was_seen_and_denies_the_rest,
    trace_and_matrix_agree_with_real_connections,
    audit_mode_reports_what_it_would_drop_then_enforcing_drops_it,
);

// ---------------------------------------------------------------------------------------------
// README's example outputs.

/// Prints README's example outputs; not a check (`#[ignore]`d, run by hand under the docker
/// lock with `--ignored --nocapture readme_examples`). README's two-apps example
/// (`tests/e2e/demo/docker-compose.yml`, project `demo`, Docker 28), an agent with
/// `--record-flows` and metrics, real connections, then each command as README shows it, with
/// its real output; also written to `target/readme-examples.txt`.
#[test]
#[ignore = "prints README's example outputs; run by hand"]
fn readme_examples() {
    if !netpol_tests::require_root("readme_examples") {
        return;
    }
    let mut guard = docker(DockerVersion::Docker28);
    let docker = guard.as_mut().expect("daemon");
    let project = Project::up_as(docker, "demo/docker-compose.yml", "demo");
    let agent = Agent::start_with(
        docker,
        AgentOptions {
            metrics: true,
            extra_args: vec!["--record-flows".into()],
            ..AgentOptions::default()
        },
    );
    let (db, app1, app2) = (
        project.container("db"),
        project.container("app1"),
        project.container("app2"),
    );
    wait_enforced(&agent, &[db.clone(), app1.clone(), app2.clone()]);
    let mut out = String::new();
    let mut show = |cmd: &str, text: &str| {
        out.push_str(&format!("$ {cmd}\n{text}"));
        if !text.ends_with('\n') {
            out.push('\n');
        }
        out.push('\n');
    };

    let text = MonitorStream::start_text(&agent, &[]);
    let json = MonitorStream::start(&agent, &[]);
    let db_drops = MonitorStream::start_text(
        &agent,
        &["--service", "db", "--verdict", "drop", "--port", "5432/tcp"],
    );
    // Until the monitors listen (an event each).
    let deadline = Instant::now() + Duration::from_secs(15);
    while text.lines().is_empty() || json.lines().is_empty() || db_drops.lines().is_empty() {
        assert!(Instant::now() < deadline, "monitors silent");
        let _ = probe::connect_from(None, SocketAddr::new(db.ipv4, 5432), probe::DENY_TIMEOUT);
    }
    let (text_0, json_0, db_drops_0) = (
        text.lines().len(),
        json.lines().len(),
        db_drops.lines().len(),
    );
    use Expect::{Allowed, Denied};
    let checks = [
        check(app1.client(), &db, db.ipv4, 5432, Allowed),
        check(app2.client(), &db, db.ipv4, 5432, Allowed),
        check(app2.client(), &app1, app1.ipv4, 8080, Denied),
        check(app1.client(), &app2, app2.ipv4, 8080, Denied),
        check(Client::host(), &app1, app1.ipv4, 8080, Allowed),
        check(Client::host(), &db, db.ipv4, 5432, Denied),
    ];
    assert_all("README traffic", &checks);
    // Every connection has been made; their events may still be on their way (ring, agent,
    // client). Wait for each check's own first line, not just any line naming its
    // destination: app2 -> app1:8080's lines also end in `-> app1:8080 (`, so waiting for that
    // alone let the host -> app1:8080 FLOW, the last connection made, miss the printout in
    // about half the runs. Then the other two monitors, which see the same events.
    let own_line = |c: &Check, l: &str| {
        let to = format!("-> {} (", c.to);
        if c.from.name == "host" {
            l.contains(&format!("(host) {to}"))
        } else {
            l.contains(&to) && l.contains(&format!(" on {} egress", c.from.name))
        }
    };
    let text_lines = wait_lines(&text, text_0, "monitor", |lines| {
        checks.iter().all(|c| lines.iter().any(|l| own_line(c, l)))
    });
    let json_lines = wait_lines(&json, json_0, "monitor --json", |lines| {
        lines.len() >= text_lines.len()
    });
    let host_to_db = format!("(host) -> {}:5432 (", db.ipv4);
    let db_drop_lines = wait_lines(&db_drops, db_drops_0, "monitor --service db", |lines| {
        lines.iter().any(|l| l.contains(&host_to_db))
    });
    show("sudo netpol-agent monitor", &text_lines.join("\n"));
    show("sudo netpol-agent monitor --json", &json_lines.join("\n"));
    show(
        "sudo netpol-agent monitor --service db --verdict drop --port 5432/tcp",
        &db_drop_lines.join("\n"),
    );
    drop((text, json, db_drops));

    for args in [
        &["policy", "trace", "app1", "db:5432"][..],
        &["policy", "trace", "app2", "app1:8080"],
        &["policy", "trace", "host", "db:5432"],
        &["policy", "trace", "app2", "db"],
        &["policy", "matrix", "--project", "demo"],
        &["policy", "matrix", "--project", "demo", "-o", "dot"],
        &["policy", "matrix", "--project", "demo", "-o", "json"],
    ] {
        show(
            &format!("sudo netpol-agent {}", args.join(" ")),
            &agent.cli_ok(args),
        );
    }
    let offline = ok(
        "offline trace",
        run(Command::new(agent_binary()).current_dir(e2e_dir()).args([
            "policy",
            "trace",
            "--offline",
            "--compose",
            "demo/docker-compose.yml",
            "app2",
            "app1:8080",
        ])),
    );
    show(
        "netpol-agent policy trace --offline --compose demo/docker-compose.yml app2 app1:8080",
        &offline,
    );
    let scrape = ok(
        "curl",
        run(Command::new("curl").args([
            "-s",
            "--unix-socket",
            agent.metrics_socket().to_str().expect("utf-8 path"),
            "http://localhost/metrics",
        ])),
    );
    show(
        "curl -s --unix-socket /run/netpol/metrics.sock http://localhost/metrics",
        &scrape,
    );
    let refused = ok(
        "curl",
        run(Command::new("curl").args([
            "-s",
            "-H",
            "Host: evil.example",
            "--unix-socket",
            agent.metrics_socket().to_str().expect("utf-8 path"),
            "http://localhost/metrics",
        ])),
    );
    show(
        "curl -s -H 'Host: evil.example' --unix-socket /run/netpol/metrics.sock http://localhost/metrics",
        &refused,
    );
    let suggestion = agent.cli_ok(&["policy", "suggest", "--project", "demo"]);
    show(
        "sudo netpol-agent policy suggest --project demo",
        &suggestion,
    );
    show(
        "sudo netpol-agent policy suggest --project demo -o labels",
        &agent.cli_ok(&["policy", "suggest", "--project", "demo", "-o", "labels"]),
    );
    show(
        "sudo netpol-agent policy export --namespace shop",
        &agent.cli_ok(&["policy", "export", "--namespace", "shop"]),
    );
    let file = agent.state_dir().join("../demo.yaml");
    std::fs::write(&file, &suggestion).expect("write the suggestion");
    agent.cli_ok(&["policy", "import", file.to_str().expect("utf-8 path")]);
    show(
        "sudo netpol-agent policy export --namespace shop demo-db",
        &agent.cli_ok(&["policy", "export", "--namespace", "shop", "demo-db"]),
    );

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/readme-examples.txt");
    std::fs::write(&path, &out).expect("write readme-examples.txt");
    println!("{out}");
    eprintln!("written to {}", path.display());
}

/// The lines of `m` from line `from` on, once `done` holds for them (within 15 s).
fn wait_lines(
    m: &MonitorStream,
    from: usize,
    what: &str,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let lines = m.lines()[from..].to_vec();
        if done(&lines) {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: lines missing: {lines:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// The Debian package's lifecycle, on this machine (one test, Docker 20.10 only: it is about the
// package, not Docker).

/// Where the package test points the installed agent (through its own `/etc/netpol/agent.conf`):
/// never the real `/sys/fs/bpf/netpol`.
fn package_pin_dir() -> PathBuf {
    PathBuf::from(format!(
        "{}package-{}",
        netpol_tests::agent::PIN_PREFIX,
        std::process::id()
    ))
}

/// Stops the installed agent the test started and purges the package, whatever happened: the
/// machine is left as before (no package, no /etc/netpol, /var/lib/netpol or pins).
struct InstalledPackage {
    agent: Option<std::process::Child>,
    log: PathBuf,
}

impl InstalledPackage {
    /// Starts `/usr/sbin/netpol-agent run` (no systemd here: as the service would, with no
    /// flags, so everything comes from agent.conf) and waits until it is connected to Docker.
    fn start_agent(&mut self, cli: &netpol_tests::agent::AgentCli) {
        assert!(self.agent.is_none(), "installed agent already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the package agent's log");
        let child = Command::new("/usr/sbin/netpol-agent")
            .arg("run")
            .env_remove("NETPOL_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn /usr/sbin/netpol-agent run");
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(e) = cli.docker_connected() {
            assert!(
                Instant::now() < deadline,
                "the installed agent is not ready: {e}\n{}",
                cli.log_tail(30)
            );
            if let Some(status) = self
                .agent
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.agent = None;
                panic!(
                    "the installed agent exited ({status}):\n{}",
                    cli.log_tail(30)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM by pid and wait, as `systemctl stop` would.
    fn stop_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            // SAFETY: our own unreaped child: its pid cannot have been reused.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && !matches!(child.try_wait(), Ok(Some(_))) {
                thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for InstalledPackage {
    fn drop(&mut self) {
        self.stop_agent();
        let mut errors = Vec::new();
        let installed = Command::new("dpkg-query")
            .args(["-W", "-f=${db:Status-Status}", "netpol-agent"])
            .output()
            .map(|o| !o.stdout.is_empty() && o.stdout != b"not-installed")
            .unwrap_or(false);
        if installed {
            match Command::new("dpkg")
                .args(["--purge", "netpol-agent"])
                .env("NETPOL_PIN_DIR", package_pin_dir())
                .output()
            {
                Ok(o) if o.status.success() => {}
                Ok(o) => errors.push(format!(
                    "dpkg --purge netpol-agent: {}",
                    String::from_utf8_lossy(&o.stderr)
                )),
                Err(e) => errors.push(format!("dpkg --purge: {e}")),
            }
        }
        for dir in [
            package_pin_dir(),
            "/etc/netpol".into(),
            "/var/lib/netpol".into(),
        ] {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    errors.push(format!("remove {}: {e}", dir.display()));
                }
            }
        }
        let _ = std::fs::remove_file("/run/netpol/agent.sock");
        if !errors.is_empty() && !thread::panicking() {
            panic!("package test cleanup: {}", errors.join("; "));
        }
    }
}

fn dpkg(args: &[&str], deb: Option<&Path>) -> String {
    let mut cmd = Command::new("dpkg");
    cmd.args(args).args(deb);
    let out = run(&mut cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "dpkg {args:?} failed:\n{text}");
    text
}

/// `cargo xtask dist` of the test build's agent (no release build in the suite), as version
/// `version`, into `out`; returns the .deb.
fn dist(out: &Path, version: &str, lintian: bool) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args([
            "run",
            "-q",
            "-p",
            "xtask",
            "--",
            "dist",
            "--fast",
            "--no-image",
        ])
        .arg("--binary")
        .arg(agent_binary())
        .arg("--out")
        .arg(out)
        .args(["--deb-version", version]);
    if !lintian {
        cmd.arg("--no-lintian");
    }
    let printed = ok("cargo xtask dist", run(&mut cmd));
    eprintln!("{printed}");
    let deb = out.join(format!("netpol-agent_{version}_amd64.deb"));
    assert!(deb.is_file(), "{} missing:\n{printed}", deb.display());
    deb
}

/// Installs the package built by `cargo xtask dist`, runs its agent (from its agent.conf),
/// upgrades to a newer package while enforcement is probed without a pause, then `dpkg -r`
/// (policies, settings and state kept; programs detached, containers reachable as without
/// netpol) and `dpkg --purge` (nothing left).
#[test]
fn package_install_upgrade_remove_and_purge() {
    if !netpol_tests::require_root("package_install_upgrade_remove_and_purge") {
        return;
    }
    let installed_before = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", "netpol-agent"])
        .output()
        .map(|o| o.stdout == b"installed")
        .unwrap_or(false);
    if installed_before
        || Path::new("/etc/netpol").exists()
        || Path::new("/var/lib/netpol").exists()
    {
        let msg = "package_install_upgrade_remove_and_purge: netpol-agent is installed here (or \
                   /etc/netpol or /var/lib/netpol exist); this test installs and purges the \
                   package, so it does not run on such a machine (dpkg --purge netpol-agent first)";
        assert!(
            !matches!(std::env::var("CI").as_deref(), Ok("true" | "1")),
            "{msg}"
        );
        eprintln!("SKIPPED: {msg}");
        return;
    }
    let work = PathBuf::from(format!(
        "{}/package-{}",
        netpol_tests::agent::RUN_PREFIX,
        std::process::id()
    ));
    std::fs::create_dir_all(&work).expect("create the work dir");
    let _work = Cleanup(|| {
        let _ = std::fs::remove_dir_all(&work);
    });
    let deb1 = timed("cargo xtask dist 0.1.0-1 (lintian)", || {
        dist(&work, "0.1.0-1", true)
    });
    let deb2 = timed("cargo xtask dist 0.1.0-2", || dist(&work, "0.1.0-2", false));

    let mut guard = docker(DockerVersion::Docker20);
    let docker = guard.as_mut().expect("daemon");
    let project = Project::up(docker, "compose-labels.yml");
    let mut pkg = InstalledPackage {
        agent: None,
        log: work.join("agent.log"),
    };
    let cli = netpol_tests::agent::AgentCli::new("/run/netpol/agent.sock", Some(pkg.log.clone()));

    // Install; the package's directories and files.
    let out = timed("dpkg -i 0.1.0-1", || dpkg(&["-i"], Some(&deb1)));
    assert!(
        out.contains("systemd is not running here"),
        "postinst says the service was not started:\n{out}"
    );
    for (path, mode) in [
        ("/usr/sbin/netpol-agent", 0o755),
        ("/etc/netpol/agent.conf", 0o644),
        ("/etc/netpol/policies.d", 0o755),
        ("/var/lib/netpol", 0o700),
        ("/usr/lib/systemd/system/netpol-agent.service", 0o644),
    ] {
        use std::os::unix::fs::PermissionsExt as _;
        let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(m.permissions().mode() & 0o7777, mode, "{path}");
    }
    let conffiles = ok(
        "dpkg-query conffiles",
        run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "netpol-agent"])),
    );
    assert!(conffiles.contains("/etc/netpol/agent.conf"), "{conffiles}");

    // Local settings (kept by the upgrade: a conffile), a policy file and an imported policy
    // (kept by dpkg -r).
    let conf_lines = format!(
        "\n# package test\nNETPOL_PIN_DIR={}\nNETPOL_DOCKER_SOCKET={}\nNETPOL_POLICY_POLL_MS=200\n",
        package_pin_dir().display(),
        docker.socket_path().display()
    );
    let mut conf = std::fs::read_to_string("/etc/netpol/agent.conf").expect("read agent.conf");
    conf.push_str(&conf_lines);
    std::fs::write("/etc/netpol/agent.conf", &conf).expect("write agent.conf");
    let keep = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: keep\n\
                spec:\n  endpointSelector:\n    matchLabels:\n      netpol-test: nobody\n  ingress:\n    - {}\n";
    std::fs::write("/etc/netpol/policies.d/keep.yaml", keep).expect("write a policy file");

    pkg.start_agent(&cli);
    let imported = work.join("imported.yaml");
    std::fs::write(&imported, keep.replace("name: keep", "name: imported")).expect("write");
    cli.cli_ok(&["policy", "import", imported.to_str().expect("utf-8")]);
    let containers = scenario_containers(&project);
    let ids: Vec<&str> = containers.iter().map(|c| c.id.as_str()).collect();
    cli.wait_enforced(&ids);
    let checks = scenario_checks(&project);
    assert_all("installed 0.1.0-1", &checks);

    // Upgrade while the agent runs, then restart it on the new binary (what the package's
    // postinst does through systemd), probing a denied and an allowed pair all the while.
    let pair: Vec<Check> = checks
        .iter()
        .filter(|c| c.to.is_ipv4())
        .filter(|c| {
            (c.to_name.ends_with("_app2_1") && c.from.name.ends_with("_app1_1"))
                || (c.to_name.ends_with("_db_1") && c.from.name.ends_with("_app1_1"))
        })
        .cloned()
        .collect();
    assert_eq!(
        pair.len(),
        2,
        "app1 -> app2 (denied) and app1 -> db (allowed)"
    );
    let stop = AtomicBool::new(false);
    let rounds = AtomicUsize::new(0);
    let violations = thread::scope(|s| {
        let prober = s.spawn(|| {
            let mut bad = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for c in &pair {
                    let out = match c.expect {
                        Expect::Denied => c.attempt(probe::DENY_TIMEOUT),
                        Expect::Allowed => c.attempt(Duration::from_secs(2)),
                    };
                    let fine = match c.expect {
                        Expect::Denied => matches!(out, Outcome::Timeout | Outcome::NoReply),
                        Expect::Allowed => out == Outcome::Open,
                    };
                    if !fine {
                        bad.push(format!("{c}: {out:?}"));
                    }
                }
                rounds.fetch_add(1, Ordering::Relaxed);
            }
            bad
        });
        let wait_round = || {
            let r = rounds.load(Ordering::Relaxed);
            let deadline = Instant::now() + Duration::from_secs(20);
            while rounds.load(Ordering::Relaxed) < r + 1 && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        };
        wait_round();
        let out = timed("dpkg -i 0.1.0-2 (agent running)", || {
            dpkg(&["-i"], Some(&deb2))
        });
        assert!(out.contains("restart it to run this version"), "{out}");
        wait_round();
        timed("agent restart on the new binary", || {
            pkg.stop_agent();
            pkg.start_agent(&cli);
            cli.wait_enforced(&ids);
        });
        wait_round();
        stop.store(true, Ordering::Relaxed);
        prober.join().expect("prober")
    });
    assert!(
        violations.is_empty(),
        "enforcement broke during the upgrade: {violations:?}"
    );
    assert!(rounds.load(Ordering::Relaxed) >= 3, "probed throughout");
    let version = ok(
        "dpkg-query",
        run(Command::new("dpkg-query").args(["-W", "-f=${Version}", "netpol-agent"])),
    );
    assert_eq!(version, "0.1.0-2");
    let conf_after = std::fs::read_to_string("/etc/netpol/agent.conf").expect("agent.conf");
    assert!(
        conf_after.contains(&conf_lines),
        "the upgrade kept the local settings:\n{conf_after}"
    );
    assert_all("upgraded to 0.1.0-2", &checks);

    // dpkg -r: the service stops (here: the test stops the agent, as systemd would), prerm
    // tears down; policies, settings and state stay.
    pkg.stop_agent();
    let out = timed("dpkg -r", || dpkg(&["-r", "netpol-agent"], None));
    assert!(
        out.contains("detached ") && out.contains("removed the pins"),
        "prerm ran teardown:\n{out}"
    );
    assert!(
        !package_pin_dir().exists(),
        "dpkg -r removed the pins:\n{out}"
    );
    assert!(!Path::new("/usr/sbin/netpol-agent").exists());
    for kept in [
        "/etc/netpol/agent.conf",
        "/etc/netpol/policies.d/keep.yaml",
        "/var/lib/netpol/policies",
    ] {
        assert!(Path::new(kept).exists(), "dpkg -r kept {kept}");
    }
    // Not enforced any more: what was denied connects, as without netpol.
    let reachable: Vec<Check> = checks
        .iter()
        .map(|c| Check {
            expect: Expect::Allowed,
            ..c.clone()
        })
        .collect();
    assert_all("after dpkg -r (nothing enforced)", &reachable);

    let out = timed("dpkg --purge", || dpkg(&["--purge", "netpol-agent"], None));
    for gone in ["/etc/netpol", "/var/lib/netpol"] {
        assert!(
            !Path::new(gone).exists(),
            "dpkg --purge removed {gone}:\n{out}"
        );
    }
    assert!(!package_pin_dir().exists());
}
