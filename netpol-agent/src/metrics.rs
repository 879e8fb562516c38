//! The agent's Prometheus metrics (`run --metrics ADDR`): what they are called, what they
//! count, and how one scrape is encoded. The kernel's counters are read at scrape time (see
//! `datapath::stats`); durations are observed as they happen into the histograms of
//! [`Metrics`]. Serving them is `daemon::metrics_server`'s.
//!
//! Names follow Prometheus' conventions: a `netpol_` prefix, `_total` on counters (added by the
//! encoder), the unit in the name (`_seconds`), base units only. Labels are bounded: `reason`
//! and `direction` by the drop reasons and two directions, `map` by the map list, and the
//! endpoint labels (`container`, `identity`) by the endpoints the agent has in `ENDPOINTS`
//! (the `EP_DROPS` map holds at most 8 keys per `ENDPOINTS` slot, and an endpoint's keys go
//! with it).

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime},
};

use netpol_common::{epdrop, Direction, DropReason};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::{Registry, Unit},
};

use crate::datapath::stats::KernelStats;

/// `Content-Type` of the Prometheus text format (version 0.0.4), served by default.
pub const CONTENT_TYPE_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// `Content-Type` of OpenMetrics, served to a scraper whose `Accept` asks for it.
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the agent observes as it works: shared by the agent (which records) and the server
/// (which encodes). Cloning shares the same histograms.
#[derive(Clone, Debug)]
pub struct Metrics {
    reconcile: Histogram,
    docker_lag: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            // 100 µs … 6.6 s.
            reconcile: Histogram::new(exponential_buckets(0.0001, 4.0, 9)),
            // 1 ms … 65 s.
            docker_lag: Histogram::new(exponential_buckets(0.001, 4.0, 9)),
        }
    }
}

impl Metrics {
    /// One reconcile of the maps with the desired state (diff and writes).
    pub fn observe_reconcile(&self, d: Duration) {
        self.reconcile.observe(d.as_secs_f64());
    }

    /// A Docker event that happened at `at` (Docker's clock, the same host's) has been handled.
    pub fn observe_docker_lag(&self, at: SystemTime) {
        let lag = SystemTime::now()
            .duration_since(at)
            .unwrap_or(Duration::ZERO);
        self.docker_lag.observe(lag.as_secs_f64());
    }
}

/// An endpoint as the metrics name it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointName {
    /// The container's name.
    pub container: String,
    /// The identity's display name (`project/service` for compose containers).
    pub identity: String,
}

/// A rule as the metrics name it: its policy and section (`ingress[0]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleName {
    pub policy: String,
    pub section: String,
}

/// What the agent knows at scrape time, taken under its lock.
#[derive(Clone, Debug, Default)]
pub struct AgentView {
    /// Host veth ifindex → endpoint.
    pub endpoints: BTreeMap<u32, EndpointName>,
    /// Rule id (the compiled rule table in force) → rule.
    pub rules: BTreeMap<u32, RuleName>,
    /// Identity number → display name.
    pub identities: BTreeMap<u32, String>,
    pub docker_connected: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    container: String,
    identity: String,
    direction: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    policy: String,
    rule: String,
    identity: String,
    direction: String,
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

/// The `reason` label of a drop reason number: its stable name, or the number for one this
/// agent does not know (a newer datapath's).
pub fn reason_label(r: u8) -> String {
    DropReason::from_u8(r).map_or_else(|| r.to_string(), |d| d.as_str().to_owned())
}

/// The `direction` label.
pub fn direction_label(d: u8) -> &'static str {
    match Direction::from_u8(d) {
        Some(Direction::Ingress) => "ingress",
        Some(Direction::Egress) => "egress",
        None => "unknown",
    }
}

/// The registry of one scrape: the agent's histograms and the kernel's counters as they are now.
/// `kernel` is `None` when the maps could not be read (only the agent's own metrics then).
pub fn registry(metrics: &Metrics, view: &AgentView, kernel: Option<&KernelStats>) -> Registry {
    let mut reg = Registry::with_prefix("netpol");

    let build: Family<BuildLabels, Gauge> = Family::default();
    build
        .get_or_create(&BuildLabels {
            version: env!("CARGO_PKG_VERSION").to_owned(),
        })
        .set(1);
    reg.register("build_info", "The agent's version (always 1)", build);

    let docker: Gauge = Gauge::default();
    docker.set(i64::from(view.docker_connected));
    reg.register(
        "docker_connected",
        "1 while the agent is connected to Docker's API and event stream, 0 otherwise",
        docker,
    );

    reg.register_with_unit(
        "reconcile_duration",
        "Time to bring the BPF maps to the desired state (diff and writes), per reconcile",
        Unit::Seconds,
        metrics.reconcile.clone(),
    );
    reg.register_with_unit(
        "docker_event_lag",
        "Time from a Docker event (its timestamp) until the agent has applied it",
        Unit::Seconds,
        metrics.docker_lag.clone(),
    );

    let Some(k) = kernel else {
        return reg;
    };

    let drops: Family<ReasonLabels, Counter> = Family::default();
    for (&r, &n) in &k.drops {
        drops
            .get_or_create(&ReasonLabels {
                reason: reason_label(r),
            })
            .inc_by(n);
    }
    reg.register(
        "drops",
        "Packets dropped, by drop reason, on every endpoint since the datapath was loaded (DROPS)",
        drops,
    );

    let audits: Family<ReasonLabels, Counter> = Family::default();
    for (&r, &n) in &k.audits {
        audits
            .get_or_create(&ReasonLabels {
                reason: reason_label(r),
            })
            .inc_by(n);
    }
    reg.register(
        "audits",
        "New flows audit mode let through that policy would have dropped, by the drop reason they would have had (AUDITS)",
        audits,
    );

    let ep_drops: Family<EndpointLabels, Counter> = Family::default();
    let ep_audits: Family<EndpointLabels, Counter> = Family::default();
    for (key, &n) in &k.ep_drops {
        let family = match key.kind {
            epdrop::KIND_DROP => &ep_drops,
            epdrop::KIND_AUDIT => &ep_audits,
            _ => continue,
        };
        // A key of an endpoint the agent does not name (one that went a moment ago, or a
        // veth not claimed yet) is still counted, under its interface.
        let name = view.endpoints.get(&key.ifindex);
        let labels = EndpointLabels {
            container: name.map_or_else(|| format!("if{}", key.ifindex), |e| e.container.clone()),
            identity: name.map_or_else(String::new, |e| e.identity.clone()),
            direction: direction_label(key.direction).to_owned(),
            reason: reason_label(key.reason),
        };
        // Two interfaces without a name cannot collide (the ifindex is in the label); two keys
        // of one endpoint differ in direction or reason.
        family.get_or_create(&labels).inc_by(n);
    }
    reg.register(
        "endpoint_drops",
        "Packets dropped, by endpoint (container and identity), direction and drop reason (EP_DROPS)",
        ep_drops,
    );
    reg.register(
        "endpoint_audits",
        "New flows audit mode let through, by endpoint, direction and the drop reason they would have had (EP_DROPS)",
        ep_audits,
    );

    let flows: Family<RuleLabels, Counter> = Family::default();
    for (key, v) in &k.rules {
        for (verdict, n) in [
            ("allowed", v.allowed),
            ("denied", v.denied),
            ("audited", v.audited),
        ] {
            if n == 0 {
                continue;
            }
            let (policy, rule) = match (key.rule, view.rules.get(&key.rule)) {
                (0, _) if verdict == "allowed" => (String::new(), "default-allow".to_owned()),
                (0, _) => (String::new(), "default-deny".to_owned()),
                (_, Some(r)) => (r.policy.clone(), r.section.clone()),
                // A rule of a table that is no longer in force.
                (_, None) => (String::new(), "unknown".to_owned()),
            };
            flows
                .get_or_create(&RuleLabels {
                    policy,
                    rule,
                    identity: view
                        .identities
                        .get(&key.identity)
                        .cloned()
                        .unwrap_or_else(|| format!("id:{}", key.identity)),
                    direction: direction_label(key.direction).to_owned(),
                    verdict: verdict.to_owned(),
                })
                .inc_by(n);
        }
    }
    reg.register(
        "policy_flows",
        "New flows decided by policy, by the policy and rule that decided (rule default-deny / default-allow: no rule matched), the local identity, direction and verdict (allowed, denied, audited; RULE_STATS)",
        flows,
    );

    let suppressed: Family<KindLabels, Counter> = Family::default();
    for (kind, n) in [
        ("drop", k.events.suppressed_drops),
        ("flow", k.events.suppressed_flows),
        ("audit", k.events.suppressed_audits),
    ] {
        suppressed
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc_by(n);
    }
    reg.register(
        "events_suppressed",
        "Monitor events the per-CPU rate limit kept out, by kind (the counters above still count them; EVENT_STATS)",
        suppressed,
    );
    let lost: Counter = Counter::default();
    lost.inc_by(k.events.ring_full);
    reg.register(
        "events_lost",
        "Monitor events the EVENTS ring buffer had no room for (no reader, or one too slow)",
        lost,
    );

    let entries: Family<MapLabels, Gauge> = Family::default();
    let max: Family<MapLabels, Gauge> = Family::default();
    for f in &k.fill {
        let l = MapLabels {
            map: f.map.to_owned(),
        };
        entries
            .get_or_create(&l)
            .set(i64::try_from(f.entries).unwrap_or(i64::MAX));
        max.get_or_create(&l)
            .set(i64::try_from(f.max_entries).unwrap_or(i64::MAX));
    }
    reg.register("map_entries", "Entries in a BPF map now", entries);
    reg.register(
        "map_max_entries",
        "Capacity of a BPF map (max_entries)",
        max,
    );
    reg
}

/// Encodes one scrape: the Prometheus text format, or OpenMetrics (`openmetrics`).
pub fn encode(reg: &Registry, openmetrics: bool) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, reg)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, reg)
    };
    out
}

/// Whether an `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

#[cfg(test)]
mod tests {
    use netpol_common::{
        epdrop::EpDropKey,
        stats::{RuleStats, RuleStatsKey},
    };

    use super::*;
    use crate::datapath::stats::Fill;

    fn kernel() -> KernelStats {
        let mut k = KernelStats::default();
        for r in DropReason::ALL {
            k.drops.insert(r as u8, 0);
        }
        k.drops.insert(DropReason::PolicyDenied as u8, 7);
        k.ep_drops.insert(
            EpDropKey::new(
                12,
                DropReason::PolicyDenied as u8,
                Direction::Ingress as u8,
                epdrop::KIND_DROP,
            ),
            5,
        );
        k.ep_drops.insert(
            EpDropKey::new(
                99,
                DropReason::Spoofed as u8,
                Direction::Egress as u8,
                epdrop::KIND_DROP,
            ),
            2,
        );
        k.audits.insert(DropReason::PolicyDenied as u8, 4);
        k.ep_drops.insert(
            EpDropKey::new(
                12,
                DropReason::PolicyDenied as u8,
                Direction::Egress as u8,
                epdrop::KIND_AUDIT,
            ),
            4,
        );
        k.rules.insert(
            RuleStatsKey::new(3, 300, Direction::Ingress),
            RuleStats {
                allowed: 9,
                ..RuleStats::default()
            },
        );
        k.rules.insert(
            RuleStatsKey::new(0, 300, Direction::Ingress),
            RuleStats {
                denied: 2,
                audited: 1,
                ..RuleStats::default()
            },
        );
        k.events.suppressed_drops = 11;
        k.events.ring_full = 1;
        k.fill.push(Fill {
            map: "POLICY",
            entries: 3,
            max_entries: 16384,
        });
        k
    }

    fn view() -> AgentView {
        AgentView {
            endpoints: BTreeMap::from([(
                12,
                EndpointName {
                    container: "demo_db_1".into(),
                    identity: "demo/db".into(),
                },
            )]),
            rules: BTreeMap::from([(
                3,
                RuleName {
                    policy: "compose:demo/db".into(),
                    section: "ingress[0]".into(),
                },
            )]),
            identities: BTreeMap::from([(300, "demo/db".to_owned())]),
            docker_connected: true,
        }
    }

    fn text() -> String {
        let m = Metrics::default();
        m.observe_reconcile(Duration::from_millis(3));
        m.observe_docker_lag(SystemTime::now() - Duration::from_millis(20));
        encode(&registry(&m, &view(), Some(&kernel())), false)
    }

    /// Every sample line: (name, labels, value).
    fn samples(text: &str) -> Vec<(String, String, f64)> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').expect("sample line");
                let (name, labels) = match series.split_once('{') {
                    Some((n, rest)) => (n, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                (
                    name.to_owned(),
                    labels.to_owned(),
                    value.parse().expect("value"),
                )
            })
            .collect()
    }

    #[test]
    fn names_follow_the_prometheus_conventions() {
        let t = text();
        let mut types = BTreeMap::new();
        for l in t.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').unwrap();
                types.insert(name.to_owned(), ty.to_owned());
            }
        }
        for (name, ty) in &types {
            assert!(name.starts_with("netpol_"), "{name}: netpol_ prefix");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}: snake case"
            );
            match ty.as_str() {
                "counter" => assert!(name.ends_with("_total"), "counter {name} ends in _total"),
                _ => assert!(
                    !name.ends_with("_total"),
                    "{ty} {name} must not end in _total"
                ),
            }
            if ty == "histogram" {
                assert!(name.ends_with("_seconds"), "{name}: the unit in the name");
            }
            assert!(
                t.contains(&format!("# HELP {name} ")),
                "{name} has help text"
            );
        }
        for want in [
            "netpol_build_info",
            "netpol_docker_connected",
            "netpol_drops_total",
            "netpol_endpoint_drops_total",
            "netpol_audits_total",
            "netpol_endpoint_audits_total",
            "netpol_policy_flows_total",
            "netpol_events_suppressed_total",
            "netpol_events_lost_total",
            "netpol_map_entries",
            "netpol_map_max_entries",
            "netpol_reconcile_duration_seconds",
            "netpol_docker_event_lag_seconds",
        ] {
            assert!(types.contains_key(want), "{want} missing from:\n{t}");
        }
        // Every sample belongs to a declared family (histograms: _bucket, _sum, _count).
        for (name, _, _) in samples(&t) {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| types.get(*f).map(String::as_str) == Some("histogram"))
                })
                .unwrap_or(&name);
            assert!(
                types.contains_key(family),
                "sample {name} of no declared family"
            );
        }
    }

    #[test]
    fn kernel_counters_are_labelled_by_endpoint_reason_and_direction() {
        let s = samples(&text());
        let find = |name: &str, labels: &str| {
            s.iter()
                .find(|(n, l, _)| n == name && l == labels)
                .map(|(_, _, v)| *v)
                .unwrap_or_else(|| panic!("no {name}{{{labels}}} in {s:?}"))
        };
        assert_eq!(
            find(
                "netpol_endpoint_drops_total",
                r#"container="demo_db_1",identity="demo/db",direction="ingress",reason="policy-denied""#
            ),
            5.0
        );
        // An interface the agent does not name is still counted, under its ifindex.
        assert_eq!(
            find(
                "netpol_endpoint_drops_total",
                r#"container="if99",identity="",direction="egress",reason="spoofed-source""#
            ),
            2.0
        );
        assert_eq!(find("netpol_drops_total", r#"reason="policy-denied""#), 7.0);
        assert_eq!(
            find("netpol_audits_total", r#"reason="policy-denied""#),
            4.0
        );
        assert_eq!(
            find(
                "netpol_endpoint_audits_total",
                r#"container="demo_db_1",identity="demo/db",direction="egress",reason="policy-denied""#
            ),
            4.0
        );
        assert_eq!(
            find(
                "netpol_policy_flows_total",
                r#"policy="compose:demo/db",rule="ingress[0]",identity="demo/db",direction="ingress",verdict="allowed""#
            ),
            9.0
        );
        assert_eq!(
            find(
                "netpol_policy_flows_total",
                r#"policy="",rule="default-deny",identity="demo/db",direction="ingress",verdict="denied""#
            ),
            2.0
        );
        assert_eq!(
            find(
                "netpol_policy_flows_total",
                r#"policy="",rule="default-deny",identity="demo/db",direction="ingress",verdict="audited""#
            ),
            1.0
        );
        assert_eq!(
            find("netpol_events_suppressed_total", r#"kind="drop""#),
            11.0
        );
        assert_eq!(
            find("netpol_events_suppressed_total", r#"kind="flow""#),
            0.0
        );
        assert_eq!(find("netpol_events_lost_total", ""), 1.0);
        assert_eq!(find("netpol_drops_total", r#"reason="malformed""#), 0.0);
        assert_eq!(find("netpol_map_entries", r#"map="POLICY""#), 3.0);
        assert_eq!(find("netpol_map_max_entries", r#"map="POLICY""#), 16384.0);
        assert_eq!(find("netpol_docker_connected", ""), 1.0);
        assert_eq!(
            find(
                "netpol_build_info",
                &format!(r#"version="{}""#, env!("CARGO_PKG_VERSION"))
            ),
            1.0
        );
        assert_eq!(find("netpol_reconcile_duration_seconds_count", ""), 1.0);
        assert_eq!(find("netpol_docker_event_lag_seconds_count", ""), 1.0);
        let lag = find("netpol_docker_event_lag_seconds_sum", "");
        assert!((0.02..5.0).contains(&lag), "lag {lag}");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut v = view();
        v.endpoints.get_mut(&12).unwrap().identity = "a\"b\\c\nd".into();
        let t = encode(&registry(&Metrics::default(), &v, Some(&kernel())), false);
        assert!(
            t.contains(r#"identity="a\"b\\c\nd""#),
            "quotes, backslashes and newlines escaped:\n{t}"
        );
    }

    #[test]
    fn without_the_kernel_only_the_agent_metrics() {
        let t = encode(&registry(&Metrics::default(), &view(), None), false);
        assert!(t.contains("netpol_build_info"));
        assert!(!t.contains("netpol_drops_total"));
    }

    #[test]
    fn openmetrics_on_request() {
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(None));
        let t = encode(
            &registry(&Metrics::default(), &view(), Some(&kernel())),
            true,
        );
        assert!(t.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
        assert!(t.contains("# TYPE netpol_drops counter"));
    }
}
