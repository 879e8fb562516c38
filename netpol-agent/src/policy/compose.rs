//! The compose shorthand: `netpol.ingress` / `netpol.egress` labels on a compose service.
//!
//! Grammar (MISSION.md): a comma-separated list of `PEER[:PORT[-PORT]][/tcp|/udp|/sctp|/any]`.
//! PEER is a service of the same compose project, `world`, `host`, `all`, or a CIDR (with its
//! `/len`; bare addresses are not accepted, an IPv6 address would be ambiguous with the port).
//! A port without protocol is TCP; a protocol without port is every port of it; neither is every
//! port and ICMP. A present label (even empty) makes that direction default-deny. Empty items
//! (`a, , b` or a trailing comma) are skipped. The names `world`, `host` and `all` always mean
//! the entities, never a service. Any other `netpol.*` label is an error (a typo must not leave a
//! container open).
//!
//! The result is one [`Policy`] named `compose:<project>/<service>` whose selectors use
//! `com.docker.compose.project` + `com.docker.compose.service`.

use super::{
    limits, parse::match_labels, CidrRule, DefaultDeny, Entity, Peer, Peers, Policy, PortRule,
    Protocol, Rule, Source, Spec, L4,
};
use crate::{
    datapath::Cidr,
    identity::{Labels, COMPOSE_PROJECT, COMPOSE_SERVICE},
};

/// Label holding the ingress shorthand.
pub const INGRESS_LABEL: &str = "netpol.ingress";
/// Label holding the egress shorthand.
pub const EGRESS_LABEL: &str = "netpol.egress";
/// Label that puts the container in audit mode (`"true"`): the label source handles it; it
/// holds no rules.
pub const AUDIT_LABEL: &str = "netpol.audit";

#[derive(Debug, thiserror::Error)]
#[error("container {container}: label {label}: {kind}")]
pub struct ComposeError {
    pub container: String,
    pub label: String,
    pub kind: ComposeErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum ComposeErrorKind {
    #[error("unknown netpol label (supported: netpol.ingress, netpol.egress, netpol.audit)")]
    UnknownLabel,
    #[error("the container is not part of a compose service (no {0} label)")]
    NotCompose(&'static str),
    #[error("{item:?}: invalid peer {peer:?} (a service name, world, host, all, or a CIDR such as 10.0.0.0/8)")]
    Peer { item: String, peer: String },
    #[error("{item:?}: {addr} is an address, not a service: write {addr}/{len} for it")]
    BareAddress {
        item: String,
        addr: std::net::IpAddr,
        len: u8,
    },
    #[error("{item:?}: invalid port {port:?} (1-65535, or a range such as 8000-8080)")]
    Port { item: String, port: String },
    #[error("{item:?}: invalid protocol {proto:?} (tcp, udp, sctp, any)")]
    Protocol { item: String, proto: String },
    #[error("{len} bytes, more than a label may hold ({limit})")]
    TooLong { len: usize, limit: usize },
    #[error("{count} items, more than a label may hold ({limit})")]
    TooMany { count: usize, limit: usize },
}

/// The policy expressed by `container`'s `netpol.*` labels (`None` if it has none). `labels` are
/// the container's Docker labels (unfiltered). Every item is checked; the first error is
/// returned.
pub fn from_labels(container: &str, labels: &Labels) -> Result<Option<Policy>, ComposeError> {
    let err = |label: &str, kind| ComposeError {
        container: container.to_owned(),
        label: label.to_owned(),
        kind,
    };
    for key in labels.keys() {
        if key.starts_with("netpol.")
            && key != INGRESS_LABEL
            && key != EGRESS_LABEL
            && key != AUDIT_LABEL
        {
            return Err(err(key, ComposeErrorKind::UnknownLabel));
        }
    }
    let ingress = labels.get(INGRESS_LABEL);
    let egress = labels.get(EGRESS_LABEL);
    if ingress.is_none() && egress.is_none() {
        return Ok(None);
    }
    let first_label = if ingress.is_some() {
        INGRESS_LABEL
    } else {
        EGRESS_LABEL
    };
    let project = labels
        .get(COMPOSE_PROJECT)
        .ok_or_else(|| err(first_label, ComposeErrorKind::NotCompose(COMPOSE_PROJECT)))?;
    let service = labels
        .get(COMPOSE_SERVICE)
        .ok_or_else(|| err(first_label, ComposeErrorKind::NotCompose(COMPOSE_SERVICE)))?;

    let mut spec = Spec {
        description: Some(format!(
            "netpol labels of compose service {project}/{service}"
        )),
        selector: match_labels(&[(COMPOSE_PROJECT, project), (COMPOSE_SERVICE, service)]),
        default_deny: DefaultDeny {
            ingress: ingress.map(|_| true),
            egress: egress.map(|_| true),
        },
        ..Spec::default()
    };
    if let Some(v) = ingress {
        spec.ingress = parse_list(project, v).map_err(|k| err(INGRESS_LABEL, k))?;
    }
    if let Some(v) = egress {
        spec.egress = parse_list(project, v).map_err(|k| err(EGRESS_LABEL, k))?;
    }
    Ok(Some(Policy {
        name: format!("compose:{project}/{service}"),
        source: Source::Labels {
            container: container.to_owned(),
        },
        specs: vec![spec],
    }))
}

/// Bounded like a policy file (see [`super::limits`]): a container's label must not be able to
/// make every compile slow, or too large for the maps, which would hold up every other policy
/// change.
fn parse_list(project: &str, value: &str) -> Result<Vec<Rule>, ComposeErrorKind> {
    if value.len() > limits::LABEL_BYTES {
        return Err(ComposeErrorKind::TooLong {
            len: value.len(),
            limit: limits::LABEL_BYTES,
        });
    }
    let count = value.split(',').filter(|i| !i.trim().is_empty()).count();
    if count > limits::LABEL_ITEMS {
        return Err(ComposeErrorKind::TooMany {
            count,
            limit: limits::LABEL_ITEMS,
        });
    }
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| parse_item(project, item))
        .collect()
}

fn parse_item(project: &str, item: &str) -> Result<Rule, ComposeErrorKind> {
    // Protocol suffix first: a CIDR's `/len` is never a protocol name.
    let (rest, proto) = match item.rsplit_once('/') {
        Some((rest, p)) if p.chars().all(|c| c.is_ascii_alphabetic()) => {
            let proto = match p.to_ascii_lowercase().as_str() {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                "sctp" => Protocol::Sctp,
                "any" => Protocol::Any,
                _ => {
                    return Err(ComposeErrorKind::Protocol {
                        item: item.to_owned(),
                        proto: p.to_owned(),
                    })
                }
            };
            (rest, Some(proto))
        }
        _ => (item, None),
    };
    // A bare address (`10.0.0.5:5432`) would otherwise read as a service named `10.0.0.5`.
    let bare = [rest.rsplit_once(':').map(|(p, _)| p), Some(rest)]
        .into_iter()
        .flatten()
        .find_map(|t| t.trim().parse::<std::net::IpAddr>().ok());
    if let Some(addr) = bare {
        return Err(ComposeErrorKind::BareAddress {
            item: item.to_owned(),
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        });
    }
    // Then the port: after the last ':' when what precedes it is a valid peer.
    let (peer_text, ports) = match rest.rsplit_once(':') {
        Some((p, port)) if parse_peer(project, p).is_some() => {
            let range = parse_ports(port).ok_or_else(|| ComposeErrorKind::Port {
                item: item.to_owned(),
                port: port.to_owned(),
            })?;
            (p, Some(range))
        }
        _ => (rest, None),
    };
    let peer = parse_peer(project, peer_text).ok_or_else(|| ComposeErrorKind::Peer {
        item: item.to_owned(),
        peer: peer_text.to_owned(),
    })?;
    let l4 = match (ports, proto) {
        (None, None) => L4::All,
        (Some((first, last)), proto) => L4::Only(vec![PortRule::Ports {
            proto: proto.unwrap_or(Protocol::Tcp),
            first,
            last,
        }]),
        (None, Some(proto)) => L4::Only(vec![PortRule::Ports {
            proto,
            first: 0,
            last: 0,
        }]),
    };
    Ok(Rule {
        peers: Peers::Listed(vec![peer]),
        l4,
    })
}

fn parse_peer(project: &str, text: &str) -> Option<Peer> {
    let text = text.trim();
    match text {
        "world" => return Some(Peer::Entity(Entity::World)),
        "host" => return Some(Peer::Entity(Entity::Host)),
        "all" => return Some(Peer::Entity(Entity::All)),
        _ => {}
    }
    if text.contains('/') {
        let cidr: Cidr = text.parse().ok()?;
        return Some(Peer::Cidr(CidrRule {
            cidr,
            except: Vec::new(),
        }));
    }
    let valid_service = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    valid_service.then(|| {
        Peer::Endpoints(match_labels(&[
            (COMPOSE_PROJECT, project),
            (COMPOSE_SERVICE, text),
        ]))
    })
}

fn parse_ports(text: &str) -> Option<(u16, u16)> {
    let num = |s: &str| -> Option<u16> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse::<u16>().ok().filter(|&n| n != 0)
    };
    match text.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (num(a)?, num(b)?);
            (a <= b).then_some((a, b))
        }
        None => num(text).map(|p| (p, p)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Selector;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn compose(service: &str, extra: &[(&str, &str)]) -> Labels {
        let mut l = labels(&[(COMPOSE_PROJECT, "shop"), (COMPOSE_SERVICE, service)]);
        l.extend(labels(extra));
        l
    }

    fn svc(name: &str) -> Peer {
        Peer::Endpoints(match_labels(&[
            (COMPOSE_PROJECT, "shop"),
            (COMPOSE_SERVICE, name),
        ]))
    }

    fn only_rules(l: &Labels) -> (Vec<Rule>, Vec<Rule>) {
        let p = from_labels("c", l).unwrap().unwrap();
        (p.specs[0].ingress.clone(), p.specs[0].egress.clone())
    }

    #[test]
    fn no_labels_no_policy() {
        assert!(from_labels("c", &compose("db", &[])).unwrap().is_none());
    }

    #[test]
    fn grammar() {
        let l = compose(
            "db",
            &[(
                "netpol.ingress",
                "app1:5432/tcp, app2:5432, world:80, host, all:53/udp, 10.0.0.0/8:8000-8080/any, \
                 2001:db8::/32:443, 192.168.0.0/16, world/udp,",
            )],
        );
        let (ingress, egress) = only_rules(&l);
        assert!(egress.is_empty());
        let tcp = |first, last| {
            L4::Only(vec![PortRule::Ports {
                proto: Protocol::Tcp,
                first,
                last,
            }])
        };
        let expect = vec![
            Rule {
                peers: Peers::Listed(vec![svc("app1")]),
                l4: tcp(5432, 5432),
            },
            Rule {
                peers: Peers::Listed(vec![svc("app2")]),
                l4: tcp(5432, 5432),
            },
            Rule {
                peers: Peers::Listed(vec![Peer::Entity(Entity::World)]),
                l4: tcp(80, 80),
            },
            Rule {
                peers: Peers::Listed(vec![Peer::Entity(Entity::Host)]),
                l4: L4::All,
            },
            Rule {
                peers: Peers::Listed(vec![Peer::Entity(Entity::All)]),
                l4: L4::Only(vec![PortRule::Ports {
                    proto: Protocol::Udp,
                    first: 53,
                    last: 53,
                }]),
            },
            Rule {
                peers: Peers::Listed(vec![Peer::Cidr(CidrRule {
                    cidr: "10.0.0.0/8".parse().unwrap(),
                    except: vec![],
                })]),
                l4: L4::Only(vec![PortRule::Ports {
                    proto: Protocol::Any,
                    first: 8000,
                    last: 8080,
                }]),
            },
            Rule {
                peers: Peers::Listed(vec![Peer::Cidr(CidrRule {
                    cidr: "2001:db8::/32".parse().unwrap(),
                    except: vec![],
                })]),
                l4: tcp(443, 443),
            },
            Rule {
                peers: Peers::Listed(vec![Peer::Cidr(CidrRule {
                    cidr: "192.168.0.0/16".parse().unwrap(),
                    except: vec![],
                })]),
                l4: L4::All,
            },
            Rule {
                peers: Peers::Listed(vec![Peer::Entity(Entity::World)]),
                l4: L4::Only(vec![PortRule::Ports {
                    proto: Protocol::Udp,
                    first: 0,
                    last: 0,
                }]),
            },
        ];
        assert_eq!(ingress, expect);
    }

    #[test]
    fn policy_is_scoped_to_the_project_and_default_deny() {
        let p = from_labels("shop-db-1", &compose("db", &[("netpol.egress", "")]))
            .unwrap()
            .unwrap();
        assert_eq!(p.name, "compose:shop/db");
        assert_eq!(p.source.to_string(), "labels of shop-db-1");
        let s = &p.specs[0];
        assert_eq!(
            s.selector,
            match_labels(&[(COMPOSE_PROJECT, "shop"), (COMPOSE_SERVICE, "db")])
        );
        assert_ne!(s.selector, Selector::all());
        assert!(s.egress.is_empty());
        assert!(s.default_deny(netpol_common::Direction::Egress));
        assert!(!s.default_deny(netpol_common::Direction::Ingress));
    }

    #[test]
    fn errors_name_container_and_label() {
        let cases = [
            (
                compose("db", &[("netpol.ingress", "app1:99999")]),
                "netpol.ingress",
                "invalid port",
            ),
            (
                compose("db", &[("netpol.ingress", "app1:0")]),
                "netpol.ingress",
                "invalid port",
            ),
            (
                compose("db", &[("netpol.egress", "app1:10-5")]),
                "netpol.egress",
                "invalid port",
            ),
            (
                compose("db", &[("netpol.egress", "app1:80/icmp")]),
                "netpol.egress",
                "invalid protocol",
            ),
            (
                compose("db", &[("netpol.egress", "app 1:80")]),
                "netpol.egress",
                "invalid peer",
            ),
            (
                compose("db", &[("netpol.egress", "10.0.0.0/33")]),
                "netpol.egress",
                "invalid peer",
            ),
            (
                compose("db", &[("netpol.egress", "10.0.0.5:5432")]),
                "netpol.egress",
                "\"10.0.0.5:5432\": 10.0.0.5 is an address, not a service: write 10.0.0.5/32 for it",
            ),
            (
                compose("db", &[("netpol.egress", "10.0.0.5")]),
                "netpol.egress",
                "write 10.0.0.5/32",
            ),
            (
                compose("db", &[("netpol.egress", "fd00::5/tcp")]),
                "netpol.egress",
                "write fd00::5/128",
            ),
            (
                compose("db", &[("netpol.egress", "app1:http")]),
                "netpol.egress",
                "invalid port",
            ),
            (
                compose("db", &[("netpol.ingres", "app1")]),
                "netpol.ingres",
                "unknown netpol label",
            ),
            (
                labels(&[("netpol.ingress", "app1")]),
                "netpol.ingress",
                "not part of a compose service",
            ),
        ];
        for (l, label, what) in cases {
            let e = from_labels("shop-db-1", &l).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("container shop-db-1: label {label}: ")),
                "{msg}"
            );
            assert!(msg.contains(what), "{msg}");
        }
    }
}
