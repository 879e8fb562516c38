//! Domain types for containers and networks, and their mapping from Docker's inspect data.
//!
//! Mapping never fails on odd input from Docker: a field that does not parse is logged and left
//! out, and an attachment that cannot be enforced says why ([`NotEnforceable`]).

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    str::FromStr,
};

use bollard::models::{ContainerInspectResponse, EndpointSettings, Network as BollardNetwork};
use serde::{Deserialize, Serialize};

use crate::datapath::Cidr;

/// Compose's label naming the project of a container.
pub const COMPOSE_PROJECT_LABEL: &str = "com.docker.compose.project";
/// Compose's label naming the service of a container.
pub const COMPOSE_SERVICE_LABEL: &str = "com.docker.compose.service";
/// Network option naming the Linux bridge of a `bridge` network.
pub const BRIDGE_NAME_OPTION: &str = "com.docker.network.bridge.name";
/// Network option switching Docker's masquerade (NAT) of the network's subnets.
pub const MASQUERADE_OPTION: &str = "com.docker.network.bridge.enable_ip_masquerade";
/// Network option (Docker ≥ 28) selecting `nat` or `routed` mode for IPv6.
pub const GATEWAY_MODE_IPV6_OPTION: &str = "com.docker.network.bridge.gateway_mode_ipv6";

/// A 48-bit Ethernet address, shown and serialised as `02:42:ac:11:00:02`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// A string that is not six colon-separated hex octets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}")]
pub struct InvalidMac(pub String);

impl FromStr for MacAddr {
    type Err = InvalidMac;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(|| InvalidMac(s.to_owned()))?;
            if part.len() != 2 {
                return Err(InvalidMac(s.to_owned()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| InvalidMac(s.to_owned()))?;
        }
        if parts.next().is_some() {
            return Err(InvalidMac(s.to_owned()));
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How a container's network namespace was set up (`HostConfig.NetworkMode`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode", content = "target")]
pub enum NetworkMode {
    /// `default` or `bridge`: Docker's default bridge network.
    Default,
    /// `host`: the host's own network namespace.
    Host,
    /// `none`: only a loopback interface.
    None,
    /// `container:<id>`: shares another container's network namespace.
    Container(String),
    /// A user-defined network, by name or id.
    Network(String),
}

impl NetworkMode {
    pub fn parse(mode: &str) -> Self {
        match mode {
            "" | "default" | "bridge" => NetworkMode::Default,
            "host" => NetworkMode::Host,
            "none" => NetworkMode::None,
            other => match other.strip_prefix("container:") {
                Some(target) => NetworkMode::Container(target.to_owned()),
                None => NetworkMode::Network(other.to_owned()),
            },
        }
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetworkMode::Default => f.write_str("default"),
            NetworkMode::Host => f.write_str("host"),
            NetworkMode::None => f.write_str("none"),
            NetworkMode::Container(c) => write!(f, "container:{c}"),
            NetworkMode::Network(n) => f.write_str(n),
        }
    }
}

/// Why netpol cannot enforce policy on a container or one of its attachments. Shown by
/// `endpoint list`; such a container is never silently skipped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum NotEnforceable {
    #[error("uses the host's network namespace (network mode host): no veth to police")]
    HostNetwork,
    #[error("has no network (network mode none)")]
    NoNetwork,
    #[error("shares the network namespace of container {target}: police that container instead")]
    SharedNamespace { target: String },
    #[error("network driver {driver} bypasses the host bridge: only bridge networks are enforced")]
    UnsupportedDriver { driver: String },
    #[error("network {network} is unknown to Docker's network list")]
    UnknownNetwork { network: String },
    #[error("container is not running")]
    NotRunning,
    #[error("host-side veth not found: {detail}")]
    VethNotFound { detail: String },
}

/// One network attachment (an endpoint) of a container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub network_id: String,
    pub network_name: String,
    /// The network's driver (`bridge`, `host`, `null`, `macvlan`, …); `None` if the network is
    /// not (or no longer) in Docker's network list.
    pub driver: Option<String>,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub mac: Option<MacAddr>,
    /// The ifindex, in the host namespace, of the host end of this attachment's veth pair.
    pub host_veth: Option<u32>,
    pub enforceable: Result<(), NotEnforceable>,
}

impl Attachment {
    /// The container's addresses on this network.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.ipv6.map(IpAddr::V6))
    }
}

/// A container as the rest of the agent sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    /// Full 64-hex-digit id.
    pub id: String,
    /// Name without Docker's leading `/`.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub networks: Vec<Attachment>,
    /// Path of the container's network namespace (`NetworkSettings.SandboxKey`).
    pub sandbox_key: Option<PathBuf>,
    pub running: bool,
    pub network_mode: NetworkMode,
    /// The `netpol.*` labels of the container's image (its own `Config.Labels`), or why the
    /// image could not be inspected. Docker merges an image's labels into its containers', so
    /// a container label with the same key and value as here came from the image, not from
    /// whoever started the container.
    pub image_netpol_labels: Result<BTreeMap<String, String>, String>,
}

impl Container {
    pub fn compose_project(&self) -> Option<&str> {
        self.labels.get(COMPOSE_PROJECT_LABEL).map(String::as_str)
    }

    pub fn compose_service(&self) -> Option<&str> {
        self.labels.get(COMPOSE_SERVICE_LABEL).map(String::as_str)
    }

    /// The 12-digit id Docker shows.
    pub fn short_id(&self) -> &str {
        self.id.get(..12).unwrap_or(&self.id)
    }

    /// Whether the container as a whole can be policed: `Ok` if at least one attachment is
    /// enforceable; otherwise the reason of the container's mode or of its first attachment.
    pub fn enforceable(&self) -> Result<(), NotEnforceable> {
        if !self.running {
            return Err(NotEnforceable::NotRunning);
        }
        if let NetworkMode::Container(target) = &self.network_mode {
            return Err(NotEnforceable::SharedNamespace {
                target: target.clone(),
            });
        }
        if self.networks.iter().any(|a| a.enforceable.is_ok()) {
            return Ok(());
        }
        match self
            .networks
            .iter()
            .find_map(|a| a.enforceable.clone().err())
        {
            Some(reason) => Err(reason),
            None => match self.network_mode {
                NetworkMode::Host => Err(NotEnforceable::HostNetwork),
                _ => Err(NotEnforceable::NoNetwork),
            },
        }
    }
}

/// A Docker network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub id: String,
    pub name: String,
    pub driver: String,
    /// The Linux bridge of a `bridge` network: the `com.docker.network.bridge.name` option, or
    /// `br-<id[..12]>` (`docker0` for the default network).
    pub bridge: Option<String>,
    #[serde(with = "cidr_list")]
    pub subnets: Vec<Cidr>,
    pub gateways: Vec<IpAddr>,
    pub enable_ipv6: bool,
    /// The network's `enable_ip_masquerade` option (`true` when absent): `false` means its
    /// owner wants its addresses routed, not translated, by Docker or by netpol.
    pub masquerade: bool,
    /// The network's `gateway_mode_ipv6` option (Docker ≥ 28: `nat`, `nat-unprotected`,
    /// `routed`, `isolated`); `None` when absent (`nat`).
    pub gateway_mode_ipv6: Option<String>,
}

impl Network {
    pub fn is_bridge(&self) -> bool {
        self.driver == "bridge"
    }
}

/// Serde for `Vec<Cidr>` as strings (`Cidr` lives in `datapath` without serde).
mod cidr_list {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::datapath::Cidr;

    pub fn serialize<S: Serializer>(v: &[Cidr], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|c| c.to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Cidr>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|s| s.parse().map_err(serde::de::Error::custom))
            .collect()
    }
}

/// Maps a network from Docker's network list. Whether Docker NATs it is not decided here (nor
/// from Docker's version): the masquerade reads the host's NAT rules (`daemon::nat6`).
pub fn network_from_docker(n: &BollardNetwork) -> Option<Network> {
    let id = n.id.clone().filter(|s| !s.is_empty())?;
    let name = n.name.clone().unwrap_or_default();
    let driver = n.driver.clone().unwrap_or_default();
    let empty = HashMap::new();
    let options = n.options.as_ref().unwrap_or(&empty);
    let bridge = (driver == "bridge").then(|| bridge_name(&id, &name, options));
    let mut subnets = Vec::new();
    let mut gateways = Vec::new();
    for cfg in n
        .ipam
        .as_ref()
        .and_then(|i| i.config.as_ref())
        .into_iter()
        .flatten()
    {
        if let Some(s) = cfg.subnet.as_deref().filter(|s| !s.is_empty()) {
            match s.parse::<Cidr>() {
                Ok(c) => subnets.push(c),
                Err(e) => {
                    tracing::warn!(network = %name, subnet = s, error = %e, "ignoring subnet")
                }
            }
        }
        if let Some(g) = cfg.gateway.as_deref().filter(|s| !s.is_empty()) {
            // Docker sometimes reports the gateway with its prefix length.
            let addr = g.split('/').next().unwrap_or(g);
            match addr.parse::<IpAddr>() {
                Ok(a) => gateways.push(a),
                Err(e) => {
                    tracing::warn!(network = %name, gateway = g, error = %e, "ignoring gateway")
                }
            }
        }
    }
    let enable_ipv6 = n.enable_ipv6.unwrap_or(false);
    let masquerade = options
        .get(MASQUERADE_OPTION)
        .map(|v| v != "false")
        .unwrap_or(true);
    let gateway_mode_ipv6 = options
        .get(GATEWAY_MODE_IPV6_OPTION)
        .filter(|v| !v.is_empty())
        .cloned();
    Some(Network {
        id,
        name,
        driver,
        bridge,
        subnets,
        gateways,
        enable_ipv6,
        masquerade,
        gateway_mode_ipv6,
    })
}

fn bridge_name(id: &str, name: &str, options: &HashMap<String, String>) -> String {
    if let Some(b) = options.get(BRIDGE_NAME_OPTION).filter(|b| !b.is_empty()) {
        return b.clone();
    }
    if name == "bridge" {
        return "docker0".to_owned();
    }
    format!("br-{}", id.get(..12).unwrap_or(id))
}

/// Host veths discovered for one container, by attachment: the value is the host ifindex, or why
/// it could not be found.
pub type VethLookup = BTreeMap<String, Result<u32, String>>;

/// Maps `docker inspect` output to a [`Container`]. `networks` is Docker's network list by id;
/// `veths` maps network ids to discovered host veths. `None` when the inspect data has no id.
pub fn container_from_inspect(
    c: &ContainerInspectResponse,
    networks: &BTreeMap<String, Network>,
    veths: &VethLookup,
) -> Option<Container> {
    let id = c.id.clone().filter(|s| !s.is_empty())?;
    let name = c
        .name
        .as_deref()
        .unwrap_or_default()
        .trim_start_matches('/')
        .to_owned();
    let labels: BTreeMap<String, String> = c
        .config
        .as_ref()
        .and_then(|cfg| cfg.labels.as_ref())
        .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let running = c.state.as_ref().and_then(|s| s.running).unwrap_or(false);
    let network_mode = NetworkMode::parse(
        c.host_config
            .as_ref()
            .and_then(|h| h.network_mode.as_deref())
            .unwrap_or_default(),
    );
    let settings = c.network_settings.as_ref();
    let sandbox_key = settings
        .and_then(|s| s.sandbox_key.as_deref())
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);
    let mut attachments: Vec<Attachment> = settings
        .and_then(|s| s.networks.as_ref())
        .into_iter()
        .flatten()
        .map(|(net_name, ep)| attachment(net_name, ep, networks, veths, running, &network_mode))
        .collect();
    attachments.sort_by(|a, b| a.network_name.cmp(&b.network_name));
    Some(Container {
        id,
        name,
        labels,
        networks: attachments,
        sandbox_key,
        running,
        network_mode,
        image_netpol_labels: Err("the image was not inspected".to_owned()),
    })
}

/// The id of the image a container was created from (`Image` of its inspect data).
pub fn image_id(c: &ContainerInspectResponse) -> Option<&str> {
    c.image.as_deref().filter(|s| !s.is_empty())
}

fn attachment(
    net_name: &str,
    ep: &EndpointSettings,
    networks: &BTreeMap<String, Network>,
    veths: &VethLookup,
    running: bool,
    mode: &NetworkMode,
) -> Attachment {
    let network_id = ep.network_id.clone().unwrap_or_default();
    let network = networks
        .get(&network_id)
        .or_else(|| networks.values().find(|n| n.name == net_name));
    let network_id = network.map(|n| n.id.clone()).unwrap_or(network_id);
    let driver = network.map(|n| n.driver.clone());
    let ipv4 = parse_opt::<Ipv4Addr>(ep.ip_address.as_deref(), "IPv4 address", net_name);
    let ipv6 = parse_opt::<Ipv6Addr>(ep.global_ipv6_address.as_deref(), "IPv6 address", net_name);
    let mac = parse_opt::<MacAddr>(ep.mac_address.as_deref(), "MAC address", net_name);
    let veth = veths.get(&network_id);
    let host_veth = veth.and_then(|v| v.as_ref().ok().copied());
    let enforceable = match (mode, driver.as_deref()) {
        (NetworkMode::Host, _) | (_, Some("host")) => Err(NotEnforceable::HostNetwork),
        (NetworkMode::None, _) | (_, Some("null")) => Err(NotEnforceable::NoNetwork),
        (NetworkMode::Container(target), _) => Err(NotEnforceable::SharedNamespace {
            target: target.clone(),
        }),
        (_, None) => Err(NotEnforceable::UnknownNetwork {
            network: net_name.to_owned(),
        }),
        (_, Some("bridge")) if !running => Err(NotEnforceable::NotRunning),
        (_, Some("bridge")) => match veth {
            Some(Ok(_)) => Ok(()),
            Some(Err(detail)) => Err(NotEnforceable::VethNotFound {
                detail: detail.clone(),
            }),
            None => Err(NotEnforceable::VethNotFound {
                detail: "not looked up".to_owned(),
            }),
        },
        (_, Some(other)) => Err(NotEnforceable::UnsupportedDriver {
            driver: other.to_owned(),
        }),
    };
    Attachment {
        network_id,
        network_name: net_name.to_owned(),
        driver,
        ipv4,
        ipv6,
        mac,
        host_veth,
        enforceable,
    }
}

fn parse_opt<T: FromStr>(s: Option<&str>, what: &str, network: &str) -> Option<T>
where
    T::Err: fmt::Display,
{
    let s = s.filter(|s| !s.is_empty())?;
    match s.parse() {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(network, value = s, error = %e, "ignoring unparsable {what}");
            None
        }
    }
}
