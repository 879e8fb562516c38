//! The agent's side of IPv6 masquerade: which prefixes, which uplink, and the `status` line.
//!
//! By default (`--masq6 auto`) the masqueraded prefixes are the IPv6 subnets of Docker bridge
//! networks that nothing on the host translates yet. What is translated is read from the
//! kernel's NAT rules ([`super::nat6`]: Docker's `ip6tables` MASQUERADE rules, its nftables
//! tables, anyone's source NAT), never inferred from Docker's version: a subnet, or a part of one,
//! that a rule already masquerades is left alone (never translated twice). A network whose owner
//! asked for no NAT is not masqueraded either: `gateway_mode_ipv6=routed` (routed means routed)
//! or `isolated`, or `enable_ip_masquerade=false`. When the rules cannot be read (a legacy
//! `ip6tables` nat table) nothing is masqueraded automatically. `status` names each subnet left
//! alone and why. Every Docker IPv6 subnet and the host's own IPv6 addresses are `Local` (never
//! translated as destinations). `--masq6-prefix` replaces the automatic choice, still minus what
//! a rule already translates. The uplink is `--masq6-uplink` or the interface
//! of the default IPv6 route, and its global address is the one containers get.
//!
//! The programs, links and `SNAT6` are pinned, so they outlive the agent; what a new agent finds
//! pinned is brought in line with its own configuration, never left translating behind a status
//! that says otherwise: `--masq6 off` removes it, `auto` with nothing to masquerade keeps only
//! `Local` prefixes, and links on an interface that is no longer the uplink are removed.

use std::{collections::BTreeMap, net::IpAddr, ops::RangeInclusive, path::PathBuf};

use clap::ValueEnum;
use tracing::{info, warn};

use super::nat6::{self, Nat6Rules};
use crate::{
    datapath::{
        masq6::{self, AttachMode, Masq6, Masq6Options, Masq6Settings, PrefixKind, Uplink},
        Cidr,
    },
    docker::Network,
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Masq6Mode {
    /// On when some Docker IPv6 network needs it and an uplink with a global address exists.
    #[default]
    Auto,
    /// Always try; `status` says why it cannot.
    On,
    Off,
}

pub struct MasqConfig {
    pub mode: Masq6Mode,
    pub uplink: Option<String>,
    pub prefixes: Vec<Cidr>,
    pub ports: RangeInclusive<u16>,
    pub pin_dir: PathBuf,
    pub snat6_entries: u32,
    pub frag_entries: u32,
    /// How to attach to the uplink (`None`: probe), as the per-container programs are.
    pub attach: Option<AttachMode>,
}

pub struct Masq {
    cfg: MasqConfig,
    loaded: Option<Masq6>,
    /// The uplink this agent attached to (name, ifindex).
    attached_to: Option<(String, u32)>,
    status: String,
}

/// Parses `61000-65535`.
pub fn parse_ports(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s}: expected FIRST-LAST"))?;
    let a: u16 = a
        .trim()
        .parse()
        .map_err(|_| format!("{s}: bad first port"))?;
    let b: u16 = b
        .trim()
        .parse()
        .map_err(|_| format!("{s}: bad last port"))?;
    if a == 0 || a > b {
        return Err(format!("{s}: empty range"));
    }
    Ok(a..=b)
}

/// Removes a pinned masquerade (links, netlink filters on the configured or detected uplink,
/// maps); `Ok(true)` when there was one.
fn remove_pinned(cfg: &MasqConfig) -> Result<bool, masq6::Masq6Error> {
    let pinned = masq6::is_pinned(&cfg.pin_dir);
    let uplink = cfg
        .uplink
        .clone()
        .or_else(|| masq6::detect_uplink().ok().map(|u| u.name));
    let mut errors = Vec::new();
    if let Some(name) = uplink {
        // Also clsact filters, which are not pinned; an interface that is gone has none.
        if let Err(e) = masq6::detach(&cfg.pin_dir, &name) {
            if !matches!(e, masq6::Masq6Error::Interface { .. }) {
                errors.push(e);
            }
        }
    }
    if let Err(e) = masq6::remove_pins(&cfg.pin_dir) {
        errors.push(e);
    }
    if errors.is_empty() {
        Ok(pinned)
    } else {
        Err(masq6::Masq6Error::Teardown(errors))
    }
}

/// Why netpol does not masquerade a Docker network's IPv6 subnet of its own accord; `None`: it
/// does.
fn left_alone(n: &Network, s: &Cidr, nat: &Result<Nat6Rules, String>) -> Option<String> {
    match n.gateway_mode_ipv6.as_deref() {
        Some("routed") => return Some("gateway_mode_ipv6=routed: routed, not masqueraded".into()),
        Some("isolated") => return Some("gateway_mode_ipv6=isolated: no outside access".into()),
        _ => {}
    }
    if !n.masquerade {
        return Some("enable_ip_masquerade=false: not masqueraded".into());
    }
    match nat {
        Err(e) => Some(format!(
            "cannot tell whether the host NATs it ({e}): left alone (--masq6-prefix forces it)"
        )),
        Ok(rules) => rules.covering(s).map(|r| {
            format!(
                "masqueraded by the host already ({}), left alone",
                r.place()
            )
        }),
    }
}

/// The prefixes to masquerade and to leave local, and notes for `status`. `nat` is what the
/// host's NAT rules already translate ([`nat6::masqueraded_sources`]).
pub fn choose_prefixes(
    explicit: &[Cidr],
    networks: &[&Network],
    host_addrs: &[IpAddr],
    nat: &Result<Nat6Rules, String>,
) -> (BTreeMap<Cidr, PrefixKind>, Vec<String>) {
    let mut want = BTreeMap::new();
    let mut notes = Vec::new();
    let explicit: Vec<Cidr> = explicit
        .iter()
        .filter(|p| p.addr.is_ipv6())
        .copied()
        .collect();
    let rules = nat.as_ref().ok();
    for p in &explicit {
        let covered = rules.and_then(|r| r.covering(p));
        want.insert(
            *p,
            if covered.is_some() {
                PrefixKind::Local
            } else {
                PrefixKind::Masquerade
            },
        );
        if let Some(r) = covered {
            notes.push(format!(
                "{p}: masqueraded by the host already ({}), left alone",
                r.place()
            ));
        }
    }
    for n in networks.iter().filter(|n| n.is_bridge()) {
        for s in n.subnets.iter().filter(|s| s.addr.is_ipv6()) {
            // A Docker subnet is `Local` unless it is to be masqueraded: as a longer prefix
            // than an explicit one it must say so itself.
            let kind = if explicit.is_empty() {
                match left_alone(n, s, nat) {
                    Some(why) => {
                        notes.push(format!("{} ({s}): {why}", n.name));
                        PrefixKind::Local
                    }
                    None => PrefixKind::Masquerade,
                }
            } else if explicit.iter().any(|p| nat6::contains(p, s))
                && rules.is_none_or(|r| r.covering(s).is_none())
            {
                PrefixKind::Masquerade
            } else {
                PrefixKind::Local
            };
            want.insert(*s, kind);
        }
    }
    // Parts of what is masqueraded that a rule already translates: never twice.
    if let Some(rules) = rules {
        let masq: Vec<Cidr> = want
            .iter()
            .filter(|(_, k)| **k == PrefixKind::Masquerade)
            .map(|(c, _)| *c)
            .collect();
        for p in masq {
            for r in rules.inside(&p) {
                if want.insert(r.source, PrefixKind::Local) != Some(PrefixKind::Local) {
                    notes.push(format!(
                        "{} (inside {p}): masqueraded by the host already ({}), left alone",
                        r.source,
                        r.place()
                    ));
                }
            }
        }
        if rules.unresolved > 0 {
            notes.push(format!(
                "{} IPv6 source NAT rule(s) without a source prefix not attributed",
                rules.unresolved
            ));
        }
    }
    for a in host_addrs.iter().filter(|a| a.is_ipv6()) {
        want.entry(Cidr::host(*a)).or_insert(PrefixKind::Local);
    }
    (want, notes)
}

impl Masq {
    /// With `--masq6 off`, also removes the masquerade an earlier agent left pinned (its links
    /// would otherwise go on translating).
    pub fn new(cfg: MasqConfig) -> Self {
        let status = if cfg.mode == Masq6Mode::Off {
            match remove_pinned(&cfg) {
                Ok(false) => "off (--masq6 off)".into(),
                Ok(true) => {
                    info!("masq6 off: removed the masquerade an earlier agent left pinned");
                    "off (--masq6 off); removed the masquerade left by an earlier run".into()
                }
                Err(e) => {
                    warn!(error = %e, "masq6 off: removing the pinned masquerade");
                    format!("error: --masq6 off, but the pinned masquerade stays: {e}")
                }
            }
        } else {
            "waiting for Docker".into()
        };
        Self {
            cfg,
            loaded: None,
            attached_to: None,
            status,
        }
    }

    pub fn status(&self) -> &str {
        &self.status
    }

    fn uplink(&self) -> Result<Uplink, String> {
        match &self.cfg.uplink {
            Some(name) => Ok(Uplink {
                name: name.clone(),
                ifindex: masq6::ifindex(name).map_err(|e| e.to_string())?,
                addr: masq6::global_address(name).map_err(|e| e.to_string())?,
                l2_len: masq6::l2_len(name).map_err(|e| e.to_string())?,
            }),
            None => masq6::detect_uplink().map_err(|e| e.to_string()),
        }
    }

    /// Brings the masquerade in line with the networks; never fails the caller (the outcome is
    /// in `status`).
    pub fn sync(&mut self, networks: &[&Network], host_addrs: &[IpAddr]) {
        if self.cfg.mode == Masq6Mode::Off {
            return;
        }
        let before = self.status.clone();
        self.sync_inner(networks, host_addrs);
        if self.status != before {
            info!(status = %self.status, "masq6");
        }
    }

    fn sync_inner(&mut self, networks: &[&Network], host_addrs: &[IpAddr]) {
        let nat = nat6::masqueraded_sources().map_err(|e| e.to_string());
        if let Err(e) = &nat {
            warn!(error = %e, "masq6: reading the host's IPv6 NAT rules");
        }
        let (want, notes) = choose_prefixes(&self.cfg.prefixes, networks, host_addrs, &nat);
        let masq: Vec<String> = want
            .iter()
            .filter(|(_, k)| **k == PrefixKind::Masquerade)
            .map(|(c, _)| c.to_string())
            .collect();
        let notes = if notes.is_empty() {
            String::new()
        } else {
            format!("; {}", notes.join("; "))
        };
        // Nothing to masquerade and nothing pinned: stay unloaded. Something pinned (an earlier
        // agent's masquerade) is adopted below and keeps only `Local` prefixes.
        if masq.is_empty()
            && self.loaded.is_none()
            && self.cfg.mode == Masq6Mode::Auto
            && !masq6::is_pinned(&self.cfg.pin_dir)
        {
            self.status = format!("off: no Docker IPv6 network needs it{notes}");
            return;
        }
        let uplink = match self.uplink() {
            Ok(u) => u,
            Err(e) => {
                self.status = format!("off: no uplink ({e}){notes}");
                return;
            }
        };
        let Some(addr) = uplink.addr else {
            self.status = format!(
                "off: uplink {} has no global IPv6 address{notes}",
                uplink.name
            );
            return;
        };
        if self.loaded.is_none() {
            let opts = Masq6Options {
                pin_dir: self.cfg.pin_dir.clone(),
                snat6_entries: self.cfg.snat6_entries,
                frag_entries: self.cfg.frag_entries,
            };
            match Masq6::load(&opts) {
                Ok(m) => self.loaded = Some(m),
                Err(e) => {
                    self.status = format!("error: loading: {e}");
                    warn!(error = %e, "masq6: loading");
                    return;
                }
            }
        }
        let Some(m) = self.loaded.as_mut() else {
            return;
        };
        let mut settings = Masq6Settings::new(&uplink, addr);
        settings.ports = self.cfg.ports.clone();
        let result = (|| -> Result<(), masq6::Masq6Error> {
            m.set_prefixes(&want)?;
            m.configure(&settings)?;
            let now = (uplink.name.clone(), uplink.ifindex);
            if self.attached_to.as_ref() != Some(&now) {
                if let Some((old, _)) = self.attached_to.take() {
                    // Netlink filters (old kernels) are found by name; pinned links below.
                    let _ = masq6::detach(&self.cfg.pin_dir, &old);
                }
                m.attach_with(&uplink.name, self.cfg.attach)?;
                self.attached_to = Some(now);
                info!(uplink = %uplink.name, %addr, "masq6 attached");
            }
            // Links an earlier agent pinned on another interface (the uplink changed while no
            // agent ran, or the interface was recreated) would translate to this address.
            let mut stale = Vec::new();
            for idx in masq6::pinned_ifindexes(&self.cfg.pin_dir) {
                if idx != uplink.ifindex {
                    match masq6::detach_ifindex(&self.cfg.pin_dir, idx, None) {
                        Ok(()) => info!(ifindex = idx, "masq6: detached from a former uplink"),
                        Err(e) => stale.push(e),
                    }
                }
            }
            if stale.is_empty() {
                Ok(())
            } else {
                Err(masq6::Masq6Error::Teardown(stale))
            }
        })();
        self.status = match result {
            Ok(()) if masq.is_empty() => format!(
                "idle on {} ({addr}): no prefix to masquerade{notes}",
                uplink.name
            ),
            Ok(()) => format!(
                "on via {} ({addr}): {}{notes}",
                uplink.name,
                masq.join(", ")
            ),
            Err(e) => {
                warn!(error = %e, "masq6");
                format!("error: {e}{notes}")
            }
        };
    }

    pub fn flows(&self) -> usize {
        self.loaded
            .as_ref()
            .and_then(|m| m.flows().ok())
            .map_or(0, |f| f.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::nat6::SnatRule;

    fn net(name: &str, subnet: &str) -> Network {
        Network {
            id: name.into(),
            name: name.into(),
            driver: "bridge".into(),
            bridge: None,
            subnets: vec![subnet.parse().unwrap(), "172.20.0.0/16".parse().unwrap()],
            gateways: vec![],
            enable_ipv6: true,
            masquerade: true,
            gateway_mode_ipv6: None,
        }
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    /// The host's NAT rules: each prefix masqueraded by a rule in `ip6 nat POSTROUTING`.
    fn rules(sources: &[&str]) -> Result<Nat6Rules, String> {
        Ok(Nat6Rules {
            rules: sources
                .iter()
                .map(|s| SnatRule {
                    table: "ip6 nat".into(),
                    chain: "POSTROUTING".into(),
                    source: cidr(s),
                })
                .collect(),
            unresolved: 0,
        })
    }

    #[test]
    fn masquerades_only_what_no_rule_translates_yet() {
        let a = net("a", "fd00:1::/64");
        let b = net("b", "fd00:2::/64");
        let (want, notes) = choose_prefixes(
            &[],
            &[&a, &b],
            &["2001:db8::1".parse().unwrap()],
            &rules(&["fd00:2::/64"]),
        );
        assert_eq!(want[&cidr("fd00:1::/64")], PrefixKind::Masquerade);
        assert_eq!(want[&cidr("fd00:2::/64")], PrefixKind::Local);
        assert_eq!(want[&cidr("2001:db8::1/128")], PrefixKind::Local);
        assert!(!want.contains_key(&cidr("172.20.0.0/16")));
        assert_eq!(notes.len(), 1);
        assert!(
            notes[0].contains("fd00:2::/64") && notes[0].contains("ip6 nat POSTROUTING"),
            "{notes:?}"
        );
        // The same networks where no rule NATs anything (Docker 20.10, or 28 with
        // --ip6tables=false): both masqueraded, whatever Docker's version.
        let (want, notes) = choose_prefixes(&[], &[&a, &b], &[], &rules(&[]));
        assert_eq!(want[&cidr("fd00:2::/64")], PrefixKind::Masquerade);
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[test]
    fn a_part_already_masqueraded_is_never_translated_twice() {
        let a = net("a", "fd00:1::/64");
        let (want, notes) = choose_prefixes(&[], &[&a], &[], &rules(&["fd00:1:0:0:8000::/65"]));
        assert_eq!(want[&cidr("fd00:1::/64")], PrefixKind::Masquerade);
        assert_eq!(want[&cidr("fd00:1:0:0:8000::/65")], PrefixKind::Local);
        assert!(notes[0].contains("inside fd00:1::/64"), "{notes:?}");
        // Also inside an explicit prefix.
        let (want, _) = choose_prefixes(&[cidr("fd00::/16")], &[&a], &[], &rules(&["fd00:9::/64"]));
        assert_eq!(want[&cidr("fd00::/16")], PrefixKind::Masquerade);
        assert_eq!(want[&cidr("fd00:9::/64")], PrefixKind::Local);
        assert_eq!(
            want[&cidr("fd00:1::/64")],
            PrefixKind::Masquerade,
            "a Docker subnet inside an explicit prefix is masqueraded with it"
        );
    }

    #[test]
    fn routed_isolated_and_unmasqueraded_networks_are_left_alone() {
        let mut routed = net("routed", "fd00:1::/64");
        routed.gateway_mode_ipv6 = Some("routed".into());
        let mut isolated = net("isolated", "fd00:2::/64");
        isolated.gateway_mode_ipv6 = Some("isolated".into());
        let mut nomasq = net("nomasq", "fd00:3::/64");
        nomasq.masquerade = false;
        let mut unprotected = net("unprotected", "fd00:4::/64");
        unprotected.gateway_mode_ipv6 = Some("nat-unprotected".into());
        let (want, notes) = choose_prefixes(
            &[],
            &[&routed, &isolated, &nomasq, &unprotected],
            &[],
            &rules(&[]),
        );
        for s in ["fd00:1::/64", "fd00:2::/64", "fd00:3::/64"] {
            assert_eq!(want[&cidr(s)], PrefixKind::Local, "{s}");
        }
        assert_eq!(want[&cidr("fd00:4::/64")], PrefixKind::Masquerade);
        let text = notes.join("; ");
        for want in [
            "routed (fd00:1::/64): gateway_mode_ipv6=routed",
            "isolated (fd00:2::/64): gateway_mode_ipv6=isolated",
            "nomasq (fd00:3::/64): enable_ip_masquerade=false",
        ] {
            assert!(text.contains(want), "{text}");
        }
    }

    #[test]
    fn unreadable_rules_masquerade_nothing_of_their_own_accord() {
        let a = net("a", "fd00:1::/64");
        let err = Err("a legacy ip6tables nat table is loaded".to_owned());
        let (want, notes) = choose_prefixes(&[], &[&a], &[], &err);
        assert_eq!(want[&cidr("fd00:1::/64")], PrefixKind::Local);
        assert!(notes[0].contains("cannot tell"), "{notes:?}");
        // --masq6-prefix forces it.
        let (want, _) = choose_prefixes(&[cidr("fd00:1::/64")], &[&a], &[], &err);
        assert_eq!(want[&cidr("fd00:1::/64")], PrefixKind::Masquerade);
    }

    #[test]
    fn explicit_prefixes_replace_the_automatic_choice() {
        let a = net("a", "fd00:1::/64");
        let (want, _) = choose_prefixes(&[cidr("fd00:9::/64")], &[&a], &[], &rules(&[]));
        assert_eq!(want[&cidr("fd00:9::/64")], PrefixKind::Masquerade);
        assert_eq!(want[&cidr("fd00:1::/64")], PrefixKind::Local);
    }

    #[test]
    fn port_ranges() {
        assert_eq!(parse_ports("61000-65535").unwrap(), 61000..=65535);
        assert!(parse_ports("0-10").is_err());
        assert!(parse_ports("10-9").is_err());
        assert!(parse_ports("10").is_err());
    }
}
