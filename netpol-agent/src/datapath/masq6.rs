//! IPv6 masquerade on the uplink: loads `masq6_out` / `masq6_in` from [`super::EBPF_OBJECT`],
//! attaches them to an interface, and gives typed access to `MASQ6_CONFIG`, `MASQ6_PREFIX`,
//! `SNAT6` and the `MASQ6_STATS` counters.
//!
//! Attachment follows the per-container programs ([`super::kernel`]): TCX links first in the
//! chain, pinned as `<pin dir>/masq6_{out,in}_<ifindex>`, moved first again when adopted behind
//! another program (so a foreign program that returns OK cannot skip translation); or, without
//! TCX or with `--attach netlink`, one clsact filter per direction at [`kernel::NL_PRIORITY`] and
//! [`NL_HANDLE`], recorded by the empty directory `<pin dir>/masq6_{out,in}_<ifindex>_tc`, whose
//! program a restart replaces in place and which a detach deletes.
//!
//! Its maps are pinned by name (`<pin dir>/SNAT6`, …) so a restarted agent re-adopts the live
//! translations and the pinned links keep the programs attached while no agent runs. Choosing the
//! prefixes (Docker networks that Docker does not NAT itself) is the caller's business: only
//! configured prefixes are ever translated.
//!
//! Everything here acts in the network namespace of the calling thread.

use std::{
    collections::BTreeMap,
    fs, io,
    net::Ipv6Addr,
    ops::RangeInclusive,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, PerCpuArray},
    programs::{
        links::{LinkError, PinnedLink},
        tc::{self, TcHandle},
        SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use netpol_common::{
    maps as names,
    nat::{
        self, Masq6Config, Masq6Counter, Masq6Prefix, Snat6Entry, Snat6Key, SNAT6_IN, SNAT6_OUT,
    },
    programs, proto, PIN_DIR,
};

pub use super::kernel::AttachMode;
use super::{kernel, Cidr};

/// Handle of the masquerade's clsact filters (the per-container filters use
/// [`kernel::NL_HANDLE`]); `tc filter show` prints it as `handle 0x4e51`.
pub const NL_HANDLE: TcHandle = TcHandle::new(0, 0x4e51);

/// Maps of this module that are pinned (and so survive the agent).
const PINNED: [&str; 5] = [
    names::SNAT6,
    names::MASQ6_CONFIG,
    names::MASQ6_PREFIXES,
    nat::maps::MASQ6_STATS,
    nat::maps::MASQ6_FRAG,
];

/// Maps of the object the masquerade programs never touch: created as small as the kernel
/// allows, so loading the masquerade does not allocate a second set of per-container maps.
const UNUSED: [(&str, u32); 11] = [
    (names::ENDPOINTS, 1),
    (names::IPCACHE4, 1),
    (names::IPCACHE6, 1),
    (names::POLICY, 1),
    (names::CT4, 1),
    (names::CT6, 1),
    (names::CT4_NEW, 1),
    (names::CT6_NEW, 1),
    (names::FRAG4, 1),
    (names::FRAG6, 1),
    (names::EVENTS, 4096),
];

#[derive(Debug, thiserror::Error)]
pub enum Masq6Error {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("the object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the object has no map {0}")]
    MissingMap(&'static str),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("link {path}: {source}")]
    Link { path: String, source: LinkError },
    #[error("pin {path}: {source}")]
    Pin {
        path: String,
        source: aya::pin::PinError,
    },
    #[error("attaching {name} to {ifname}: {message}")]
    Attach {
        name: &'static str,
        ifname: String,
        message: String,
    },
    #[error("interface {name}: {source}")]
    Interface { name: String, source: io::Error },
    #[error("interface {name} has link type {arphrd}, which has no known header length")]
    UnsupportedLinkType { name: String, arphrd: u16 },
    #[error("{0} is not an IPv6 prefix")]
    NotIpv6(Cidr),
    #[error("empty port range {0}-{1}")]
    EmptyPortRange(u16, u16),
    #[error("no IPv6 default route")]
    NoDefaultRoute,
    #[error("reading {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path}: unparsable line {line:?}")]
    Parse { path: String, line: String },
    #[error("teardown: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Teardown(Vec<Masq6Error>),
}

type Result<T, E = Masq6Error> = std::result::Result<T, E>;

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> Masq6Error {
    move |source| Masq6Error::Map { map, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> Masq6Error {
    move |source| Masq6Error::Program { name, source }
}

/// Where and how big.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Masq6Options {
    /// Directory under bpffs for the pinned maps and links (`netpol_common::PIN_DIR`).
    pub pin_dir: PathBuf,
    /// `max_entries` of `SNAT6` (two entries per flow). Only used when the map is created (a
    /// pinned map keeps its size).
    pub snat6_entries: u32,
    /// `max_entries` of `MASQ6_FRAG` (fragmented datagrams in flight). As `snat6_entries`.
    pub frag_entries: u32,
}

impl Default for Masq6Options {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from(PIN_DIR),
            snat6_entries: super::MapSizes::default().snat6,
            frag_entries: super::MapSizes::default().masq6_frag,
        }
    }
}

/// The translation settings (`MASQ6_CONFIG`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Masq6Settings {
    /// The uplink's global address that replaces container sources.
    pub addr: Ipv6Addr,
    /// Ports and echo identifiers handed out when a flow's own is taken. Keep it apart from the
    /// host's `net.ipv6.ip_local_port_range` if the host itself talks much to the same servers.
    pub ports: RangeInclusive<u16>,
    /// Reserve the tuples of the host's own flows through the uplink (recommended).
    pub reserve_host_ports: bool,
    /// Link-layer header length of the uplink ([`Uplink::l2_len`]).
    pub l2_len: u32,
}

impl Masq6Settings {
    /// The defaults for an uplink: ports 61000-65535 (above Linux's default ephemeral range).
    pub fn new(uplink: &Uplink, addr: Ipv6Addr) -> Self {
        Self {
            addr,
            ports: 61000..=65535,
            reserve_host_ports: true,
            l2_len: uplink.l2_len,
        }
    }
}

/// What a `MASQ6_PREFIX` entry means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PrefixKind {
    /// Sources in it are masqueraded (a container network).
    Masquerade,
    /// Traffic to it is never translated (host addresses, other local networks).
    Local,
}

impl PrefixKind {
    fn raw(self) -> u32 {
        match self {
            Self::Masquerade => Masq6Prefix::MASQUERADE,
            Self::Local => Masq6Prefix::LOCAL,
        }
    }
}

/// One translated flow, as `SNAT6` holds it (its *out* entry joined with its *in* entry), or a
/// reservation of the host's own flow.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Snat6Flow {
    pub proto: u8,
    /// The container's address and port (echo identifier); the uplink address for the host.
    pub inside: (Ipv6Addr, u16),
    /// The remote address and port (0 for echo).
    pub remote: (Ipv6Addr, u16),
    /// The address and port the remote sees.
    pub outside: (Ipv6Addr, u16),
    /// The host's own flow (a reservation, not translated).
    pub host: bool,
    pub seen_reply: bool,
    pub closing: bool,
    /// Time left before the entry may be reused; `None` once expired (the LRU still holds it).
    pub expires_in: Option<Duration>,
    /// `false` when only one of the flow's two entries is in the map (being created or evicted).
    pub complete: bool,
}

/// The interface of the default IPv6 route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uplink {
    pub name: String,
    pub ifindex: u32,
    /// Its preferred global address, if any.
    pub addr: Option<Ipv6Addr>,
    /// 14 on Ethernet, 0 on raw-IP devices.
    pub l2_len: u32,
}

/// The loaded masquerade programs and their maps.
pub struct Masq6 {
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

impl Masq6 {
    /// Loads the programs with their maps pinned under `opts.pin_dir` (re-adopting maps already
    /// pinned there), creating the directory when needed.
    pub fn load(opts: &Masq6Options) -> Result<Self> {
        fs::create_dir_all(&opts.pin_dir).map_err(|source| Masq6Error::Read {
            path: opts.pin_dir.display().to_string(),
            source,
        })?;
        let paths: Vec<(&str, PathBuf)> =
            PINNED.iter().map(|n| (*n, opts.pin_dir.join(n))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        for (name, size) in UNUSED {
            loader.map_max_entries(name, size);
        }
        let wanted = super::MapSizes {
            snat6: opts.snat6_entries,
            masq6_frag: opts.frag_entries,
            ..super::MapSizes::default()
        };
        let sizes = kernel::adopt_pinned_sizes(&opts.pin_dir, wanted, &super::MASQ6_SIZED);
        for (name, n) in sizes.of(&super::MASQ6_SIZED) {
            loader.map_max_entries(name, n);
        }
        let mut ebpf = loader.load(super::EBPF_OBJECT)?;
        for name in [programs::MASQ6_OUT, programs::MASQ6_IN] {
            prog(&mut ebpf, name)?.load().map_err(prog_err(name))?;
        }
        Ok(Self {
            ebpf,
            pin_dir: opts.pin_dir.clone(),
        })
    }

    /// Attaches `masq6_out` (egress) and `masq6_in` (ingress) to `ifname`, TCX if a probe attach
    /// succeeds, else clsact. See [`Self::attach_with`].
    pub fn attach(&mut self, ifname: &str) -> Result<AttachMode> {
        self.attach_with(ifname, None)
    }

    /// Attaches `masq6_out` (egress) and `masq6_in` (ingress) to `ifname` in `mode` (`None`:
    /// probed). What an earlier agent attached there, in either mode, gets this program without
    /// a moment untranslated: a pinned TCX link is switched in place when first in its chain and
    /// otherwise replaced by a new first one; a clsact filter of ours has its program replaced.
    pub fn attach_with(&mut self, ifname: &str, mode: Option<AttachMode>) -> Result<AttachMode> {
        let ifindex = ifindex(ifname)?;
        let mode = match mode {
            Some(m) => m,
            None => match kernel::probe_tcx(prog(&mut self.ebpf, programs::MASQ6_OUT)?) {
                Ok(()) => AttachMode::Tcx,
                Err(_) => AttachMode::Netlink,
            },
        };
        for (name, ty) in [
            (programs::MASQ6_OUT, TcAttachType::Egress),
            (programs::MASQ6_IN, TcAttachType::Ingress),
        ] {
            let aerr = |message: String| Masq6Error::Attach {
                name,
                ifname: ifname.to_owned(),
                message,
            };
            let path = link_path(&self.pin_dir, name, ifindex);
            let record = tc_record(&self.pin_dir, name, ifindex);
            let program = prog(&mut self.ebpf, name)?;
            // Both kinds, whatever the mode: an agent started with another `--attach` still
            // updates (and later detaches) what an earlier one attached.
            if path.exists() {
                kernel::tcx_adopt_pinned(program, ifname, ty, &path)
                    .map_err(|e| aerr(e.to_string()))?;
            }
            if record.exists() {
                kernel::tc_attach_fixed(program, ifname, ty, NL_HANDLE).map_err(aerr)?;
            }
            match mode {
                AttachMode::Tcx if !path.exists() => {
                    kernel::tcx_attach_first_pinned(program, ifname, ty, &path).map_err(aerr)?;
                }
                AttachMode::Netlink if !record.exists() => {
                    // A filter an older agent added at an automatic priority (found by name).
                    let _ = tc::qdisc_detach_program(ifname, ty, name);
                    kernel::tc_attach_fixed(program, ifname, ty, NL_HANDLE).map_err(aerr)?;
                    fs::create_dir_all(&record).map_err(|source| Masq6Error::Read {
                        path: record.display().to_string(),
                        source,
                    })?;
                }
                _ => {}
            }
        }
        Ok(mode)
    }

    /// Writes the translation settings and turns masquerade on.
    pub fn configure(&mut self, s: &Masq6Settings) -> Result<()> {
        let (min, max) = (*s.ports.start(), *s.ports.end());
        if min > max || min == 0 {
            return Err(Masq6Error::EmptyPortRange(min, max));
        }
        let mut flags = Masq6Config::ENABLED;
        if s.reserve_host_ports {
            flags |= Masq6Config::RESERVE_HOST_PORTS;
        }
        let cfg = Masq6Config {
            addr: s.addr.octets(),
            port_min: min,
            port_max: max,
            flags,
            l2_len: s.l2_len,
            _pad: 0,
        };
        self.config_map()?
            .set(0, cfg, 0)
            .map_err(map_err(names::MASQ6_CONFIG))
    }

    /// Turns masquerade off (packets pass untranslated; live mappings stay for a re-enable).
    pub fn disable(&mut self) -> Result<()> {
        let mut map = self.config_map()?;
        let mut cfg = map.get(&0, 0).map_err(map_err(names::MASQ6_CONFIG))?;
        cfg.flags &= !Masq6Config::ENABLED;
        map.set(0, cfg, 0).map_err(map_err(names::MASQ6_CONFIG))
    }

    /// The settings in force, `None` while disabled.
    pub fn settings(&self) -> Result<Option<Masq6Settings>> {
        let map: Array<&MapData, Masq6Config> = Array::try_from(
            self.ebpf
                .map(names::MASQ6_CONFIG)
                .ok_or(Masq6Error::MissingMap(names::MASQ6_CONFIG))?,
        )
        .map_err(map_err(names::MASQ6_CONFIG))?;
        let cfg = map.get(&0, 0).map_err(map_err(names::MASQ6_CONFIG))?;
        if cfg.flags & Masq6Config::ENABLED == 0 {
            return Ok(None);
        }
        Ok(Some(Masq6Settings {
            addr: Ipv6Addr::from(cfg.addr),
            ports: cfg.port_min..=cfg.port_max,
            reserve_host_ports: cfg.flags & Masq6Config::RESERVE_HOST_PORTS != 0,
            l2_len: cfg.l2_len,
        }))
    }

    /// Adds (or changes the kind of) a prefix.
    pub fn add_prefix(&mut self, prefix: Cidr, kind: PrefixKind) -> Result<()> {
        let key = prefix_key(prefix)?;
        self.prefix_map()?
            .insert(&key, Masq6Prefix { kind: kind.raw() }, 0)
            .map_err(map_err(names::MASQ6_PREFIXES))
    }

    /// Removes a prefix; one that is not there is not an error.
    pub fn remove_prefix(&mut self, prefix: Cidr) -> Result<()> {
        let key = prefix_key(prefix)?;
        match self.prefix_map()?.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::MASQ6_PREFIXES)(e)),
        }
    }

    /// The configured prefixes.
    pub fn prefixes(&self) -> Result<BTreeMap<Cidr, PrefixKind>> {
        let map: LpmTrie<&MapData, [u8; 16], Masq6Prefix> = LpmTrie::try_from(
            self.ebpf
                .map(names::MASQ6_PREFIXES)
                .ok_or(Masq6Error::MissingMap(names::MASQ6_PREFIXES))?,
        )
        .map_err(map_err(names::MASQ6_PREFIXES))?;
        let mut out = BTreeMap::new();
        for item in map.iter() {
            let (k, v) = item.map_err(map_err(names::MASQ6_PREFIXES))?;
            let len = u8::try_from(k.prefix_len()).unwrap_or(128);
            let cidr = Cidr::new(Ipv6Addr::from(k.data()).into(), len)
                .map_err(|_| Masq6Error::MissingMap(names::MASQ6_PREFIXES))?;
            let kind = if v.kind == Masq6Prefix::LOCAL {
                PrefixKind::Local
            } else {
                PrefixKind::Masquerade
            };
            out.insert(cidr, kind);
        }
        Ok(out)
    }

    /// Replaces the whole prefix set with `want` (adds first, then removes, so a prefix that
    /// stays is never briefly missing).
    pub fn set_prefixes(&mut self, want: &BTreeMap<Cidr, PrefixKind>) -> Result<()> {
        let have = self.prefixes()?;
        for (p, k) in want {
            if have.get(p) != Some(k) {
                self.add_prefix(*p, *k)?;
            }
        }
        for p in have.keys() {
            if !want.contains_key(p) {
                self.remove_prefix(*p)?;
            }
        }
        Ok(())
    }

    /// The translated flows and host reservations in `SNAT6`.
    pub fn flows(&self) -> Result<Vec<Snat6Flow>> {
        let map: HashMap<&MapData, Snat6Key, Snat6Entry> = HashMap::try_from(
            self.ebpf
                .map(names::SNAT6)
                .ok_or(Masq6Error::MissingMap(names::SNAT6))?,
        )
        .map_err(map_err(names::SNAT6))?;
        let mut entries = Vec::new();
        for item in map.iter() {
            entries.push(item.map_err(map_err(names::SNAT6))?);
        }
        Ok(join_flows(&entries, monotonic_ns()))
    }

    /// The `MASQ6_STATS` counters summed over CPUs, by name.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, u64>> {
        let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(nat::maps::MASQ6_STATS)
                .ok_or(Masq6Error::MissingMap(nat::maps::MASQ6_STATS))?,
        )
        .map_err(map_err(nat::maps::MASQ6_STATS))?;
        let mut out = BTreeMap::new();
        for c in Masq6Counter::ALL {
            let v = map
                .get(&(c as u32), 0)
                .map_err(map_err(nat::maps::MASQ6_STATS))?;
            out.insert(c.as_str(), v.iter().sum());
        }
        Ok(out)
    }

    /// Removes every `SNAT6` entry (live flows lose their translation).
    pub fn flush(&mut self) -> Result<()> {
        let mut map: HashMap<&mut MapData, Snat6Key, Snat6Entry> = HashMap::try_from(
            self.ebpf
                .map_mut(names::SNAT6)
                .ok_or(Masq6Error::MissingMap(names::SNAT6))?,
        )
        .map_err(map_err(names::SNAT6))?;
        let keys: Vec<Snat6Key> = map.keys().filter_map(|k| k.ok()).collect();
        for k in keys {
            let _ = map.remove(&k);
        }
        Ok(())
    }

    /// The pin directory in use.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    fn config_map(&mut self) -> Result<Array<&mut MapData, Masq6Config>> {
        Array::try_from(
            self.ebpf
                .map_mut(names::MASQ6_CONFIG)
                .ok_or(Masq6Error::MissingMap(names::MASQ6_CONFIG))?,
        )
        .map_err(map_err(names::MASQ6_CONFIG))
    }

    fn prefix_map(&mut self) -> Result<LpmTrie<&mut MapData, [u8; 16], Masq6Prefix>> {
        LpmTrie::try_from(
            self.ebpf
                .map_mut(names::MASQ6_PREFIXES)
                .ok_or(Masq6Error::MissingMap(names::MASQ6_PREFIXES))?,
        )
        .map_err(map_err(names::MASQ6_PREFIXES))
    }
}

fn prog<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .ok_or(Masq6Error::MissingProgram(name))?
        .try_into()
        .map_err(prog_err(name))
}

fn link_path(pin_dir: &Path, program: &str, ifindex: u32) -> PathBuf {
    pin_dir.join(format!("{program}_{ifindex}"))
}

/// The record of a clsact filter: an empty directory (bpffs holds no plain files).
fn tc_record(pin_dir: &Path, program: &str, ifindex: u32) -> PathBuf {
    pin_dir.join(format!("{program}_{ifindex}_tc"))
}

fn attach_type(program: &str) -> TcAttachType {
    if program == programs::MASQ6_OUT {
        TcAttachType::Egress
    } else {
        TcAttachType::Ingress
    }
}

fn prefix_key(prefix: Cidr) -> Result<Key<[u8; 16]>> {
    match prefix.addr {
        std::net::IpAddr::V6(a) => Ok(Key::new(u32::from(prefix.prefix_len), a.octets())),
        std::net::IpAddr::V4(_) => Err(Masq6Error::NotIpv6(prefix)),
    }
}

/// Detaches the masquerade from `ifname` (its pinned links, or its netlink filters). An
/// interface without them is not an error. Every failure is reported, not only the first.
pub fn detach(pin_dir: &Path, ifname: &str) -> Result<()> {
    let ifindex = ifindex(ifname)?;
    detach_ifindex(pin_dir, ifindex, Some(ifname))
}

/// Like [`detach`] for an interface known by index (which may be gone).
pub fn detach_ifindex(pin_dir: &Path, ifindex: u32, ifname: Option<&str>) -> Result<()> {
    let mut errors = Vec::new();
    for (name, ty) in [
        (programs::MASQ6_OUT, TcAttachType::Egress),
        (programs::MASQ6_IN, TcAttachType::Ingress),
    ] {
        let path = link_path(pin_dir, name, ifindex);
        if path.exists() {
            match PinnedLink::from_pin(&path) {
                // Unpinning drops the last reference: the link goes.
                Ok(link) => {
                    if let Err(source) = link.unpin() {
                        errors.push(Masq6Error::Read {
                            path: path.display().to_string(),
                            source,
                        });
                    }
                }
                Err(source) => errors.push(Masq6Error::Link {
                    path: path.display().to_string(),
                    source,
                }),
            }
        }
        // An interface known by index only is looked up; one that is gone took its filters.
        let ifname = ifname
            .map(str::to_owned)
            .or_else(|| kernel::ifname(ifindex).ok());
        let record = tc_record(pin_dir, name, ifindex);
        if let Some(ifname) = &ifname {
            if record.exists() {
                if let Err(message) = kernel::tc_remove_fixed(ifname, ty, NL_HANDLE) {
                    errors.push(Masq6Error::Attach {
                        name,
                        ifname: ifname.clone(),
                        message,
                    });
                }
            }
            // Filters an older agent added at an automatic priority (found by name).
            let _ = tc::qdisc_detach_program(ifname, ty, name);
        }
        if record.exists() {
            if let Err(source) = fs::remove_dir(&record) {
                errors.push(Masq6Error::Read {
                    path: record.display().to_string(),
                    source,
                });
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Masq6Error::Teardown(errors))
    }
}

/// The interfaces (by index) with masquerade links pinned under `pin_dir`, e.g. by an earlier
/// agent on an uplink that is no longer the one configured.
pub fn pinned_ifindexes(pin_dir: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(dir) = fs::read_dir(pin_dir) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let idx = [programs::MASQ6_OUT, programs::MASQ6_IN]
                .iter()
                .find_map(|p| {
                    let idx = name.strip_prefix(p)?.strip_prefix('_')?;
                    idx.strip_suffix("_tc").unwrap_or(idx).parse::<u32>().ok()
                });
            if let Some(idx) = idx.filter(|i| !out.contains(i)) {
                out.push(idx);
            }
        }
    }
    out.sort_unstable();
    out
}

/// Whether anything of the masquerade (maps or links) is pinned under `pin_dir`.
pub fn is_pinned(pin_dir: &Path) -> bool {
    PINNED.iter().any(|n| pin_dir.join(n).exists()) || !pinned_ifindexes(pin_dir).is_empty()
}

/// Removes the masquerade's pinned maps and any pinned links under `pin_dir` (full teardown;
/// the translations are lost). Every failure is reported, not only the first.
pub fn remove_pins(pin_dir: &Path) -> Result<()> {
    let mut errors = Vec::new();
    if let Ok(dir) = fs::read_dir(pin_dir) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name.starts_with(programs::MASQ6_OUT)
                || name.starts_with(programs::MASQ6_IN)
                || PINNED.contains(&name.as_str());
            if ours {
                // A clsact filter is not a pin: delete the filter its record stands for.
                let record = [programs::MASQ6_OUT, programs::MASQ6_IN]
                    .into_iter()
                    .find_map(|p| {
                        let rest = name.strip_prefix(p)?.strip_prefix('_')?;
                        Some((p, rest.strip_suffix("_tc")?.parse::<u32>().ok()?))
                    });
                if let Some((p, idx)) = record {
                    if let Ok(ifname) = kernel::ifname(idx) {
                        if let Err(message) =
                            kernel::tc_remove_fixed(&ifname, attach_type(p), NL_HANDLE)
                        {
                            errors.push(Masq6Error::Attach {
                                name: p,
                                ifname,
                                message,
                            });
                        }
                    }
                }
                let removed = if entry.path().is_dir() {
                    fs::remove_dir(entry.path())
                } else {
                    fs::remove_file(entry.path())
                };
                if let Err(source) = removed {
                    errors.push(Masq6Error::Read {
                        path: entry.path().display().to_string(),
                        source,
                    });
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Masq6Error::Teardown(errors))
    }
}

/// Joins the *out* and *in* entries of each flow; host reservations come out on their own.
pub fn join_flows(entries: &[(Snat6Key, Snat6Entry)], now_ns: u64) -> Vec<Snat6Flow> {
    let ins: std::collections::HashMap<Snat6Key, Snat6Entry> = entries
        .iter()
        .filter(|(k, _)| k.dir == SNAT6_IN)
        .copied()
        .collect();
    let expires = |e: &Snat6Entry| e.expires_ns.checked_sub(now_ns).map(Duration::from_nanos);
    let mut out = Vec::new();
    let mut matched = std::collections::HashSet::new();
    for (k, e) in entries.iter().filter(|(k, _)| k.dir == SNAT6_OUT) {
        let in_key = Snat6Key::new(k.daddr, e.addr, k.dport(), e.port(), k.proto, SNAT6_IN);
        let complete = ins.get(&in_key).is_some_and(|i| {
            i.addr == k.saddr && i.port() == k.sport() && i.flags & Snat6Entry::HOST == 0
        });
        if complete {
            matched.insert(in_key);
        }
        // Echo: the identifier is the source "port" of the *out* key.
        out.push(Snat6Flow {
            proto: k.proto,
            inside: (Ipv6Addr::from(k.saddr), k.sport()),
            remote: (Ipv6Addr::from(k.daddr), k.dport()),
            outside: (Ipv6Addr::from(e.addr), e.port()),
            host: false,
            seen_reply: e.flags & Snat6Entry::SEEN_REPLY != 0,
            closing: e.flags & Snat6Entry::CLOSING != 0,
            expires_in: expires(e),
            complete,
        });
    }
    for (k, e) in entries.iter().filter(|(k, _)| k.dir == SNAT6_IN) {
        if matched.contains(k) {
            continue;
        }
        let host = e.flags & Snat6Entry::HOST != 0;
        out.push(Snat6Flow {
            proto: k.proto,
            inside: (Ipv6Addr::from(e.addr), e.port()),
            remote: (Ipv6Addr::from(k.saddr), k.sport()),
            outside: (Ipv6Addr::from(k.daddr), k.dport()),
            host,
            seen_reply: e.flags & Snat6Entry::SEEN_REPLY != 0,
            closing: e.flags & Snat6Entry::CLOSING != 0,
            expires_in: expires(e),
            complete: false,
        });
    }
    out.sort_by_key(|a| (a.proto, a.inside, a.remote));
    out
}

/// A protocol number as a short name.
pub fn proto_name(p: u8) -> &'static str {
    match p {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        proto::ICMPV6 => "icmpv6",
        _ => "other",
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// The index of `ifname` in the calling thread's network namespace.
pub fn ifindex(ifname: &str) -> Result<u32> {
    let c = std::ffi::CString::new(ifname).map_err(|_| Masq6Error::Interface {
        name: ifname.to_owned(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(Masq6Error::Interface {
            name: ifname.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(idx)
}

/// The link-layer header length of `ifname`: 14 for Ethernet (and loopback), 0 for raw-IP
/// devices (WireGuard, tun, PPP).
pub fn l2_len(ifname: &str) -> Result<u32> {
    let err = |source| Masq6Error::Interface {
        name: ifname.to_owned(),
        source,
    };
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(err(io::Error::from(io::ErrorKind::InvalidInput)));
    }
    // SAFETY: plain socket call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: an all-zero ifreq is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(ifname.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: `ifr` is a valid ifreq with a NUL-terminated name; `fd` is a socket.
    let r = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut ifr) };
    let e = io::Error::last_os_error();
    // SAFETY: `fd` is ours.
    unsafe { libc::close(fd) };
    if r < 0 {
        return Err(err(e));
    }
    // SAFETY: SIOCGIFHWADDR fills the hwaddr member of the union.
    let arphrd = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_family };
    match arphrd {
        libc::ARPHRD_ETHER | libc::ARPHRD_LOOPBACK => Ok(14),
        libc::ARPHRD_NONE | libc::ARPHRD_PPP | libc::ARPHRD_TUNNEL6 | 519 /* RAWIP */ => Ok(0),
        other => Err(Masq6Error::UnsupportedLinkType {
            name: ifname.to_owned(),
            arphrd: other,
        }),
    }
}

fn read_proc(name: &str) -> Result<String> {
    // thread-self: the namespace of this thread, which may have entered another one.
    let path = format!("/proc/thread-self/net/{name}");
    fs::read_to_string(&path).map_err(|source| Masq6Error::Read { path, source })
}

/// The interface of the default IPv6 route (lowest metric), with its address and header length.
pub fn detect_uplink() -> Result<Uplink> {
    let routes = read_proc("ipv6_route")?;
    let name = default_route_dev(&routes)?.ok_or(Masq6Error::NoDefaultRoute)?;
    let addrs = read_proc("if_inet6")?;
    Ok(Uplink {
        addr: global_address_in(&addrs, &name)?,
        ifindex: ifindex(&name)?,
        l2_len: l2_len(&name)?,
        name,
    })
}

/// The preferred global address of `ifname`, if it has one.
pub fn global_address(ifname: &str) -> Result<Option<Ipv6Addr>> {
    global_address_in(&read_proc("if_inet6")?, ifname)
}

/// The device of the default route in a `/proc/net/ipv6_route` text.
pub fn default_route_dev(text: &str) -> Result<Option<String>> {
    const RTF_UP: u32 = 0x1;
    const RTF_REJECT: u32 = 0x200;
    let mut best: Option<(u32, String)> = None;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let bad = || Masq6Error::Parse {
            path: "ipv6_route".into(),
            line: line.to_owned(),
        };
        if f.len() < 10 {
            return Err(bad());
        }
        let is_default = f[0].chars().all(|c| c == '0') && f[1] == "00";
        let metric = u32::from_str_radix(f[5], 16).map_err(|_| bad())?;
        let flags = u32::from_str_radix(f[8], 16).map_err(|_| bad())?;
        if !is_default || flags & RTF_UP == 0 || flags & RTF_REJECT != 0 || f[9] == "lo" {
            continue;
        }
        if best.as_ref().is_none_or(|(m, _)| metric < *m) {
            best = Some((metric, f[9].to_owned()));
        }
    }
    Ok(best.map(|(_, d)| d))
}

/// The preferred global address of `ifname` in a `/proc/net/if_inet6` text: global scope, not
/// tentative, deprecated or failed; a permanent, non-temporary one first, a non-ULA one first.
pub fn global_address_in(text: &str, ifname: &str) -> Result<Option<Ipv6Addr>> {
    const TEMPORARY: u32 = 0x01;
    const DADFAILED: u32 = 0x08;
    const DEPRECATED: u32 = 0x20;
    const TENTATIVE: u32 = 0x40;
    const PERMANENT: u32 = 0x80;
    let mut best: Option<((bool, bool, bool), Ipv6Addr)> = None;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let bad = || Masq6Error::Parse {
            path: "if_inet6".into(),
            line: line.to_owned(),
        };
        if f.len() < 6 {
            return Err(bad());
        }
        if f[5] != ifname || f[3] != "00" {
            continue;
        }
        let flags = u32::from_str_radix(f[4], 16).map_err(|_| bad())?;
        if flags & (DADFAILED | DEPRECATED | TENTATIVE) != 0 {
            continue;
        }
        let raw = u128::from_str_radix(f[0], 16).map_err(|_| bad())?;
        let addr = Ipv6Addr::from(raw);
        let ula = addr.segments()[0] & 0xfe00 == 0xfc00;
        let rank = (!ula, flags & TEMPORARY == 0, flags & PERMANENT != 0);
        if best.as_ref().is_none_or(|(r, _)| rank > *r) {
            best = Some((rank, addr));
        }
    }
    Ok(best.map(|(_, a)| a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_default_route_with_the_lowest_metric() {
        let text = "\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 eth1
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000100 00000001 00000000 00000003 eth0
20010db8000100000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo
";
        assert_eq!(
            default_route_dev(text).ok().flatten().as_deref(),
            Some("eth0")
        );
        assert_eq!(default_route_dev("").ok().flatten(), None);
        assert!(default_route_dev("garbage").is_err());
    }

    #[test]
    fn picks_a_stable_global_address() {
        let text = "\
fe800000000000000000000000000001 02 40 20 80 eth0
fd000000000000000000000000000001 02 40 00 80 eth0
20010db8000000000000000000000009 02 40 00 01 eth0
20010db8000000000000000000000002 02 40 00 80 eth0
20010db8000000000000000000000003 02 40 00 c0 eth0
20010db8000000000000000000000004 03 40 00 80 eth1
";
        assert_eq!(
            global_address_in(text, "eth0").ok().flatten(),
            Some("2001:db8::2".parse().unwrap_or(Ipv6Addr::UNSPECIFIED))
        );
        assert_eq!(global_address_in(text, "eth2").ok().flatten(), None);
    }

    #[test]
    fn finds_pinned_links_and_maps() {
        let dir = std::env::temp_dir().join(format!("netpol-masq6-pins-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        assert!(!is_pinned(&dir), "a missing directory holds nothing");
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for f in [
            "masq6_out_12",
            "masq6_in_12",
            "masq6_in_7",
            "masq6_out_x",
            "CT6",
        ] {
            fs::write(dir.join(f), "").unwrap_or_else(|e| panic!("{f}: {e}"));
        }
        assert_eq!(pinned_ifindexes(&dir), vec![7, 12]);
        assert!(is_pinned(&dir));
        for f in ["masq6_out_12", "masq6_in_12", "masq6_in_7"] {
            let _ = fs::remove_file(dir.join(f));
        }
        assert!(!is_pinned(&dir), "policy maps are not the masquerade's");
        fs::write(dir.join(names::SNAT6), "").unwrap_or_else(|e| panic!("SNAT6: {e}"));
        assert!(is_pinned(&dir));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn joins_out_and_in_entries() {
        let c: Ipv6Addr = "fd00::2".parse().unwrap_or(Ipv6Addr::UNSPECIFIED);
        let r: Ipv6Addr = "2001:db8::1".parse().unwrap_or(Ipv6Addr::UNSPECIFIED);
        let a: Ipv6Addr = "2001:db8:1::2".parse().unwrap_or(Ipv6Addr::UNSPECIFIED);
        let out_k = Snat6Key::new(c.octets(), r.octets(), 40000, 80, proto::TCP, SNAT6_OUT);
        let out_v = Snat6Entry::new(a.octets(), 61000, Snat6Entry::SEEN_REPLY, 2_000);
        let in_k = Snat6Key::new(r.octets(), a.octets(), 80, 61000, proto::TCP, SNAT6_IN);
        let in_v = Snat6Entry::new(c.octets(), 40000, Snat6Entry::SEEN_REPLY, 2_000);
        let host_k = Snat6Key::new(r.octets(), a.octets(), 443, 50000, proto::TCP, SNAT6_IN);
        let host_v = Snat6Entry::new(a.octets(), 50000, Snat6Entry::HOST, 500);
        let flows = join_flows(&[(out_k, out_v), (in_k, in_v), (host_k, host_v)], 1_000);
        assert_eq!(flows.len(), 2);
        let f = flows.iter().find(|f| !f.host).cloned();
        let f = f.unwrap_or_else(|| panic!("no translated flow in {flows:?}"));
        assert_eq!(f.inside, (c, 40000));
        assert_eq!(f.outside, (a, 61000));
        assert_eq!(f.remote, (r, 80));
        assert!(f.complete && f.seen_reply);
        assert_eq!(f.expires_in, Some(Duration::from_nanos(1_000)));
        let h = flows.iter().find(|f| f.host).cloned();
        let h = h.unwrap_or_else(|| panic!("no host flow in {flows:?}"));
        assert_eq!(h.outside, (a, 50000));
        assert_eq!(h.expires_in, None);
    }
}
