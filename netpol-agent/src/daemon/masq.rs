//! The agent's side of IPv6 masquerade: which prefixes, which uplink, and the `status` line.
//!
//! By default (`--masq6 auto`) the masqueraded prefixes are the IPv6 subnets of Docker bridge
//! networks that Docker does not NAT itself; where Docker already masquerades a subnet (its
//! ip6tables support), netpol leaves it alone and says so: never translate twice. Every Docker
//! IPv6 subnet and the host's own IPv6 addresses are `Local` (never translated as destinations).
//! `--masq6-prefix` replaces the automatic choice. The uplink is `--masq6-uplink` or the interface
//! of the default IPv6 route, and its global address is the one containers get.
//!
//! The programs, links and `SNAT6` are pinned, so they outlive the agent; what a new agent finds
//! pinned is brought in line with its own configuration, never left translating behind a status
//! that says otherwise: `--masq6 off` removes it, `auto` with nothing to masquerade keeps only
//! `Local` prefixes, and links on an interface that is no longer the uplink are removed.

use std::{collections::BTreeMap, net::IpAddr, ops::RangeInclusive, path::PathBuf};

use clap::ValueEnum;
use tracing::{info, warn};

use crate::{
    datapath::{
        masq6::{self, Masq6, Masq6Options, Masq6Settings, PrefixKind, Uplink},
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

/// The prefixes to masquerade and to leave local, and notes for `status`.
pub fn choose_prefixes(
    explicit: &[Cidr],
    networks: &[&Network],
    host_addrs: &[IpAddr],
) -> (BTreeMap<Cidr, PrefixKind>, Vec<String>) {
    let mut want = BTreeMap::new();
    let mut notes = Vec::new();
    for n in networks.iter().filter(|n| n.is_bridge()) {
        for s in n.subnets.iter().filter(|s| s.addr.is_ipv6()) {
            want.insert(*s, PrefixKind::Local);
            if !explicit.is_empty() {
                continue;
            }
            if n.docker_nats_ipv6 {
                notes.push(format!(
                    "{} ({s}): Docker NATs it itself, left alone",
                    n.name
                ));
            } else {
                want.insert(*s, PrefixKind::Masquerade);
            }
        }
    }
    for p in explicit.iter().filter(|p| p.addr.is_ipv6()) {
        want.insert(*p, PrefixKind::Masquerade);
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
        let (want, notes) = choose_prefixes(&self.cfg.prefixes, networks, host_addrs);
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
                m.attach(&uplink.name)?;
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

    fn net(name: &str, subnet: &str, docker_nats: bool) -> Network {
        Network {
            id: name.into(),
            name: name.into(),
            driver: "bridge".into(),
            bridge: None,
            subnets: vec![subnet.parse().unwrap(), "172.20.0.0/16".parse().unwrap()],
            gateways: vec![],
            enable_ipv6: true,
            docker_nats_ipv6: docker_nats,
        }
    }

    #[test]
    fn masquerades_only_what_docker_does_not_nat() {
        let a = net("a", "fd00:1::/64", false);
        let b = net("b", "fd00:2::/64", true);
        let (want, notes) = choose_prefixes(&[], &[&a, &b], &["2001:db8::1".parse().unwrap()]);
        assert_eq!(
            want[&"fd00:1::/64".parse().unwrap()],
            PrefixKind::Masquerade
        );
        assert_eq!(want[&"fd00:2::/64".parse().unwrap()], PrefixKind::Local);
        assert_eq!(want[&"2001:db8::1/128".parse().unwrap()], PrefixKind::Local);
        assert!(!want.contains_key(&"172.20.0.0/16".parse().unwrap()));
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("fd00:2::/64"));
    }

    #[test]
    fn explicit_prefixes_replace_the_automatic_choice() {
        let a = net("a", "fd00:1::/64", false);
        let (want, _) = choose_prefixes(&["fd00:9::/64".parse().unwrap()], &[&a], &[]);
        assert_eq!(
            want[&"fd00:9::/64".parse().unwrap()],
            PrefixKind::Masquerade
        );
        assert_eq!(want[&"fd00:1::/64".parse().unwrap()], PrefixKind::Local);
    }

    #[test]
    fn port_ranges() {
        assert_eq!(parse_ports("61000-65535").unwrap(), 61000..=65535);
        assert!(parse_ports("0-10").is_err());
        assert!(parse_ports("10-9").is_err());
        assert!(parse_ports("10").is_err());
    }
}
