//! `monitor` filters, applied in the daemon: a client gets only the events it asked for, not a
//! flood it throws away. Each kind of filter given must match (AND); several values of one kind
//! match any of them (OR). Container, compose and identity filters match either side of an
//! event: the endpoint it was seen on or its peer.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use super::api::MonitorEvent;
use crate::identity::{COMPOSE_PROJECT, COMPOSE_SERVICE};

/// `--port PORT[/PROTO]`: the destination port (ICMP: the type) and, optionally, the protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMatch {
    pub port: u16,
    /// Lower case (`tcp`, `udp`, `sctp`); `None`: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

const PROTOCOLS: &[&str] = &["tcp", "udp", "sctp", "icmp", "icmpv6"];

fn protocol(s: &str) -> Result<String, String> {
    let p = s.to_ascii_lowercase();
    if PROTOCOLS.contains(&p.as_str()) {
        Ok(p)
    } else {
        Err(format!("{s}: not a protocol ({})", PROTOCOLS.join(", ")))
    }
}

impl PortMatch {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (port, proto) = match s.split_once('/') {
            Some((p, proto)) => (p, Some(protocol(proto)?)),
            None => (s, None),
        };
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("{s}: not PORT or PORT/PROTO (5432/tcp)"))?;
        Ok(Self {
            port,
            protocol: proto,
        })
    }
}

/// What a `monitor` client asked for. Empty: everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
pub struct MonitorFilter {
    /// Only events of this container (its name, its id or an id prefix of 12 or more digits),
    /// on its veth or with it as the peer (repeatable).
    #[arg(long = "container", value_name = "NAME|ID")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<String>,
    /// Only events with a side in this compose project (repeatable).
    #[arg(long = "project", value_name = "PROJECT")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub projects: Vec<String>,
    /// Only events with a side of this compose service (with --project: of that project).
    #[arg(long = "service", value_name = "SERVICE")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// Only events with a side of this identity: its number or its name (`demo/db`, `world`).
    #[arg(long = "identity", value_name = "ID|NAME")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Only these verdicts: drop, flow, audit.
    #[arg(long = "verdict", value_name = "VERDICT", value_parser = ["drop", "flow", "audit"])]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verdicts: Vec<String>,
    /// Only this direction of the endpoint: ingress, egress.
    #[arg(long = "direction", value_name = "DIR", value_parser = ["ingress", "egress"])]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub directions: Vec<String>,
    /// Only this destination port (ICMP: the type), optionally of one protocol: 5432/tcp.
    #[arg(long = "port", value_name = "PORT[/PROTO]", value_parser = PortMatch::parse)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMatch>,
    /// Only this protocol: tcp, udp, sctp, icmp, icmpv6.
    #[arg(long = "protocol", value_name = "PROTO", value_parser = protocol)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protocols: Vec<String>,
}

/// What the filter needs to know about containers and identities (the agent).
pub trait Lookup {
    /// Whether `pattern` (a name, an id, or an id prefix of at least 12 digits) names a container
    /// whose host veth is `ifindex` or that has the address `addr`.
    fn container_is(&self, pattern: &str, ifindex: Option<u32>, addr: Option<IpAddr>) -> bool;
    fn identity_labels(&self, id: u32) -> Option<&BTreeMap<String, String>>;
}

/// Whether `pattern` names the container `(id, name)`.
pub fn names_container(pattern: &str, id: &str, name: &str) -> bool {
    let pattern = pattern.strip_prefix('/').unwrap_or(pattern);
    pattern == name || pattern == id || (pattern.len() >= 12 && id.starts_with(pattern))
}

impl MonitorFilter {
    /// Checks the values that the CLI's parsers check, for a request from elsewhere.
    pub fn validate(&self) -> Result<(), String> {
        for v in &self.verdicts {
            if !["drop", "flow", "audit"].contains(&v.as_str()) {
                return Err(format!("verdict {v}: not drop, flow or audit"));
            }
        }
        for d in &self.directions {
            if !["ingress", "egress"].contains(&d.as_str()) {
                return Err(format!("direction {d}: not ingress or egress"));
            }
        }
        for p in self
            .protocols
            .iter()
            .chain(self.ports.iter().filter_map(|p| p.protocol.as_ref()))
        {
            protocol(p)?;
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    pub fn matches(&self, e: &MonitorEvent, lookup: &dyn Lookup) -> bool {
        if !self.verdicts.is_empty() && !self.verdicts.contains(&e.kind) {
            return false;
        }
        if !self.directions.is_empty() && !self.directions.contains(&e.direction) {
            return false;
        }
        let proto = e.protocol.to_ascii_lowercase();
        if !self.protocols.is_empty() && !self.protocols.contains(&proto) {
            return false;
        }
        if !self.ports.is_empty()
            && !self
                .ports
                .iter()
                .any(|p| p.port == e.dport && p.protocol.as_ref().is_none_or(|want| *want == proto))
        {
            return false;
        }
        let src: Option<IpAddr> = e.src.parse().ok();
        let dst: Option<IpAddr> = e.dst.parse().ok();
        if !self.containers.is_empty()
            && !self.containers.iter().any(|c| {
                lookup.container_is(c, Some(e.ifindex), None)
                    || lookup.container_is(c, None, src)
                    || lookup.container_is(c, None, dst)
            })
        {
            return false;
        }
        let sides = [
            (e.src_identity, e.src_name.as_str()),
            (e.dst_identity, e.dst_name.as_str()),
        ];
        if !self.identities.is_empty()
            && !sides.iter().any(|(id, name)| {
                self.identities
                    .iter()
                    .any(|want| want == name || want.parse::<u32>().ok() == Some(*id))
            })
        {
            return false;
        }
        if !self.projects.is_empty() || !self.services.is_empty() {
            let compose_side = |id: u32| {
                let Some(labels) = lookup.identity_labels(id) else {
                    return false;
                };
                let is = |key: &str, wanted: &[String]| {
                    wanted.is_empty() || labels.get(key).is_some_and(|v| wanted.contains(v))
                };
                is(COMPOSE_PROJECT, &self.projects) && is(COMPOSE_SERVICE, &self.services)
            };
            if !compose_side(e.src_identity) && !compose_side(e.dst_identity) {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct World {
        labels: BTreeMap<u32, BTreeMap<String, String>>,
    }

    const DB_ID: &str = "dbdbdbdbdbdbdbdbdbdbdbdbdbdbdbdbdbdbdbdbdbdbdbdbdbdbdbdbdbdbdbdb";

    impl Lookup for World {
        fn container_is(&self, p: &str, ifindex: Option<u32>, addr: Option<IpAddr>) -> bool {
            // One container: demo_db_1 on veth 7 at 10.0.0.2.
            names_container(p, DB_ID, "demo_db_1")
                && (ifindex == Some(7) || addr == Some("10.0.0.2".parse().unwrap()))
        }
        fn identity_labels(&self, id: u32) -> Option<&BTreeMap<String, String>> {
            self.labels.get(&id)
        }
    }

    fn world() -> World {
        let compose = |p: &str, s: &str| {
            BTreeMap::from([
                (COMPOSE_PROJECT.to_owned(), p.to_owned()),
                (COMPOSE_SERVICE.to_owned(), s.to_owned()),
            ])
        };
        World {
            labels: BTreeMap::from([
                (256, compose("demo", "db")),
                (257, compose("demo", "app1")),
                (258, compose("other", "db")),
            ]),
        }
    }

    /// demo/app1 (10.0.0.3) -> demo/db (10.0.0.2):5432/TCP, dropped on db's veth (7).
    fn drop_at_db() -> MonitorEvent {
        MonitorEvent {
            kind: "drop".into(),
            reason: Some("policy-denied".into()),
            ifindex: 7,
            direction: "ingress".into(),
            protocol: "TCP".into(),
            src: "10.0.0.3".into(),
            dst: "10.0.0.2".into(),
            sport: 40000,
            dport: 5432,
            src_identity: 257,
            dst_identity: 256,
            src_name: "demo/app1".into(),
            dst_name: "demo/db".into(),
            endpoint: "demo_db_1".into(),
            ..MonitorEvent::default()
        }
    }

    fn f(args: &[&str]) -> MonitorFilter {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            f: MonitorFilter,
        }
        let mut argv = vec!["monitor"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .f
    }

    #[test]
    fn each_filter_kind_narrows_and_values_widen() {
        let w = world();
        let e = drop_at_db();
        let yes = |args: &[&str]| assert!(f(args).matches(&e, &w), "{args:?} should match");
        let no = |args: &[&str]| assert!(!f(args).matches(&e, &w), "{args:?} should not match");
        yes(&[]);
        yes(&["--verdict", "drop"]);
        yes(&["--verdict", "flow", "--verdict", "drop"]);
        no(&["--verdict", "audit"]);
        yes(&["--direction", "ingress"]);
        no(&["--direction", "egress"]);
        yes(&["--port", "5432/tcp"]);
        yes(&["--port", "5432"]);
        no(&["--port", "5432/udp"]);
        no(&["--port", "80/tcp"]);
        yes(&["--protocol", "TCP"]);
        no(&["--protocol", "udp"]);
        yes(&["--container", "demo_db_1"]);
        yes(&["--container", &DB_ID[..12]]);
        yes(&["--container", DB_ID]);
        no(&["--container", &DB_ID[..6]]);
        no(&["--container", "demo_app2_1"]);
        yes(&["--identity", "demo/app1"]);
        yes(&["--identity", "256"]);
        no(&["--identity", "world"]);
        yes(&["--project", "demo"]);
        no(&["--project", "other"]);
        yes(&["--service", "app1"]);
        yes(&["--project", "demo", "--service", "db"]);
        // other/db is not a side: project and service must hold for one side.
        no(&["--project", "other", "--service", "db"]);
        no(&["--project", "other", "--service", "app1"]);
        // Kinds combine with AND.
        yes(&["--verdict", "drop", "--port", "5432/tcp", "--service", "db"]);
        no(&[
            "--verdict",
            "drop",
            "--port",
            "5432/tcp",
            "--direction",
            "egress",
        ]);
    }

    #[test]
    fn the_peer_container_matches_by_address() {
        let w = world();
        let mut e = drop_at_db();
        // The same flow seen on the client's veth (its egress).
        e.ifindex = 9;
        e.direction = "egress".into();
        assert!(f(&["--container", "demo_db_1"]).matches(&e, &w));
        e.dst = "10.0.0.9".into();
        assert!(!f(&["--container", "demo_db_1"]).matches(&e, &w));
    }

    #[test]
    fn bad_values_are_refused() {
        use clap::Parser;
        #[derive(clap::Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            f: MonitorFilter,
        }
        for bad in [
            &["--port", "5432/tcpx"][..],
            &["--port", "70000"],
            &["--verdict", "deny"],
            &["--direction", "in"],
            &["--protocol", "gre"],
        ] {
            let mut argv = vec!["monitor"];
            argv.extend_from_slice(bad);
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?} accepted");
        }
        let sent = MonitorFilter {
            verdicts: vec!["deny".into()],
            ..MonitorFilter::default()
        };
        assert!(sent.validate().is_err());
        assert!(f(&["--port", "53/udp", "--verdict", "audit"])
            .validate()
            .is_ok());
    }

    #[test]
    fn an_old_clients_request_has_no_filter() {
        let req: super::super::api::Request =
            serde_json::from_str(r#"{"cmd":"monitor"}"#).expect("parses");
        assert_eq!(
            req,
            super::super::api::Request::Monitor {
                filter: MonitorFilter::default()
            }
        );
    }
}
