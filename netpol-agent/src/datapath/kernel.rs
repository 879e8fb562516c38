//! The aya-backed [`Datapath`]: loads the object once, pins every map and link under the pin
//! directory, and on a restart re-adopts them.
//!
//! Adoption: maps are opened from their pins (`EbpfLoader::map_pin_path`: an existing pin is reused,
//! a missing one is created and pinned), so their contents survive. The programs are loaded again
//! (a newer agent may bring newer code) and every pinned TCX link is switched to the new program
//! with `bpf_link_update`, which replaces the program atomically: there is no moment in which the
//! interface runs without a program. Pinned links keep the programs attached while no agent runs.
//!
//! Layout under the pin directory: `<MAP NAME>` for every map, `links/<ifindex>_from` and
//! `links/<ifindex>_to` for the two links of a managed veth.

use std::{
    ffi::CStr,
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, MapData, MapError, PerCpuArray,
    },
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink, TcAttachOptions},
        LinkOrder, SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use netpol_common::{
    endpoint::Endpoint,
    ipcache::RemoteInfo,
    maps,
    policy::{PolicyKey, PolicyValue},
    programs, Config, DropReason,
};
use tracing::{debug, info, warn};

use super::{Cidr, Datapath, DatapathError, DropCounters, MapSizes, MapState, PolicyEntryKey};

/// How the programs are attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX links (Linux ≥ 6.6), pinned: survive the agent, replaced atomically on restart.
    Tcx,
    /// clsact + cls_bpf filters through netlink: for older kernels. Filters outlive the agent on
    /// their own; a restart re-attaches the new program over them.
    Netlink,
}

pub struct KernelDatapath {
    bpf: Ebpf,
    pin_dir: PathBuf,
    sizes: MapSizes,
    mode: AttachMode,
    /// Whether the maps were found pinned (an adoption) rather than created.
    adopted: bool,
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| match &source {
        MapError::SyscallError(e)
            if matches!(
                e.io_error.raw_os_error(),
                Some(libc::E2BIG) | Some(libc::ENOSPC) | Some(libc::ENOMEM)
            ) =>
        {
            DatapathError::MapFull { map, max: 0 }
        }
        _ => DatapathError::Map { map, source },
    }
}

fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Mounts bpffs at `/sys/fs/bpf` when nothing is mounted there (these machines boot without it).
pub fn ensure_bpffs() -> Result<(), DatapathError> {
    let target = Path::new("/sys/fs/bpf");
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    if mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let _src = f.next();
        f.next() == Some("/sys/fs/bpf") && f.next() == Some("bpf")
    }) {
        return Ok(());
    }
    fs::create_dir_all(target)?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpffs".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(DatapathError::Bpffs(format!(
            "mount bpf on /sys/fs/bpf: {}",
            io::Error::last_os_error()
        )));
    }
    info!("mounted bpffs on /sys/fs/bpf");
    Ok(())
}

fn ifname(ifindex: u32) -> Result<String, DatapathError> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(DatapathError::NoSuchInterface(ifindex));
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    let name = unsafe { CStr::from_ptr(buf.as_ptr().cast()) };
    Ok(name.to_string_lossy().into_owned())
}

impl KernelDatapath {
    /// Loads the programs and opens (or creates and pins) every map under `pin_dir`, then switches
    /// every pinned link to the freshly loaded programs.
    pub fn open(pin_dir: impl AsRef<Path>, sizes: MapSizes) -> Result<Self, DatapathError> {
        let pin_dir = pin_dir.as_ref().to_path_buf();
        if pin_dir.starts_with("/sys/fs/bpf") {
            ensure_bpffs()?;
        }
        fs::create_dir_all(pin_dir.join("links"))?;
        let adopted = pin_dir.join(maps::POLICY).exists();
        let pins: Vec<(&'static str, PathBuf)> =
            maps::ALL.iter().map(|m| (*m, pin_dir.join(m))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        loader
            .map_max_entries(maps::ENDPOINTS, sizes.endpoints)
            .map_max_entries(maps::IPCACHE4, sizes.ipcache4)
            .map_max_entries(maps::IPCACHE6, sizes.ipcache6)
            .map_max_entries(maps::POLICY, sizes.policy)
            .map_max_entries(maps::CT4, sizes.ct4)
            .map_max_entries(maps::CT6, sizes.ct6)
            .map_max_entries(maps::SNAT6, sizes.snat6);
        let mut bpf = loader
            .load(super::EBPF_OBJECT)
            .map_err(|e| DatapathError::Load(e.to_string()))?;
        for name in [programs::FROM_CONTAINER, programs::TO_CONTAINER] {
            let prog: &mut SchedClassifier = bpf
                .program_mut(name)
                .ok_or_else(|| {
                    DatapathError::Load(format!("program {name} missing from the object"))
                })?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| DatapathError::Load(e.to_string()))?;
            prog.load()
                .map_err(|e| DatapathError::Load(format!("{name}: {e}")))?;
        }
        let tcx = aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
        let mode = if tcx {
            AttachMode::Tcx
        } else {
            AttachMode::Netlink
        };
        let mut dp = Self {
            bpf,
            pin_dir,
            sizes,
            mode,
            adopted,
        };
        dp.adopt_links()?;
        info!(pin_dir = %dp.pin_dir.display(), adopted, ?mode, "datapath ready");
        Ok(dp)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Whether pinned maps were found and reused.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    /// Gives other parts of the agent (masquerade, monitor) the loaded object.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.bpf
    }

    fn link_path(&self, ifindex: u32, prog: &str) -> PathBuf {
        let side = if prog == programs::FROM_CONTAINER {
            "from"
        } else {
            "to"
        };
        self.pin_dir.join("links").join(format!("{ifindex}_{side}"))
    }

    fn prog(&mut self, name: &str) -> Result<&mut SchedClassifier, DatapathError> {
        self.bpf
            .program_mut(name)
            .ok_or_else(|| DatapathError::Load(format!("program {name} missing")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| DatapathError::Load(e.to_string()))
    }

    /// Points every pinned link at the newly loaded programs; removes pins of links whose
    /// interface is gone.
    fn adopt_links(&mut self) -> Result<(), DatapathError> {
        if self.mode != AttachMode::Tcx {
            return Ok(());
        }
        for ifindex in self.attached()? {
            for name in [programs::FROM_CONTAINER, programs::TO_CONTAINER] {
                let path = self.link_path(ifindex, name);
                if !path.exists() {
                    continue;
                }
                match self.update_link(&path, name) {
                    Ok(()) => debug!(ifindex, name, "adopted pinned link"),
                    Err(e) => {
                        warn!(ifindex, name, error = %e, "pinned link could not be adopted; removing it");
                        let _ = fs::remove_file(&path);
                    }
                }
            }
        }
        Ok(())
    }

    fn update_link(&mut self, path: &Path, name: &str) -> Result<(), DatapathError> {
        let perr = |m: String| DatapathError::Pin {
            path: path.display().to_string(),
            message: m,
        };
        let pinned = PinnedLink::from_pin(path).map_err(|e| perr(e.to_string()))?;
        let link: SchedClassifierLink = FdLink::from(pinned)
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| perr(e.to_string()))?;
        let prog = self.prog(name)?;
        let id = prog.attach_to_link(link).map_err(|e| perr(e.to_string()))?;
        // The pin keeps the link; our handle can go.
        let owned = prog.take_link(id).map_err(|e| perr(e.to_string()))?;
        drop(FdLink::try_from(owned).map_err(|e| perr(e.to_string()))?);
        Ok(())
    }

    fn attach_one(
        &mut self,
        ifindex: u32,
        ifname: &str,
        name: &'static str,
    ) -> Result<(), DatapathError> {
        let path = self.link_path(ifindex, name);
        let attach_type = if name == programs::FROM_CONTAINER {
            TcAttachType::Ingress
        } else {
            TcAttachType::Egress
        };
        let aerr = |m: String| DatapathError::Attach {
            ifindex,
            message: m,
        };
        match self.mode {
            AttachMode::Tcx => {
                if path.exists() {
                    return Ok(());
                }
                let prog = self.prog(name)?;
                let id = prog
                    .attach_with_options(
                        ifname,
                        attach_type,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(|e| aerr(format!("{name}: {e}")))?;
                let link = prog.take_link(id).map_err(|e| aerr(e.to_string()))?;
                let fd: FdLink = link
                    .try_into()
                    .map_err(|e: aya::programs::links::LinkError| aerr(e.to_string()))?;
                fd.pin(&path).map_err(|e| DatapathError::Pin {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
            }
            AttachMode::Netlink => {
                // "Exclusivity flag on" means the qdisc is already there.
                let _ = tc::qdisc_add_clsact(ifname);
                let prog = self.prog(name)?;
                let id = prog
                    .attach_with_options(
                        ifname,
                        attach_type,
                        TcAttachOptions::Netlink(tc::NlOptions::default()),
                    )
                    .map_err(|e| aerr(format!("{name}: {e}")))?;
                // Keep the filter when this process exits.
                std::mem::forget(prog.take_link(id).map_err(|e| aerr(e.to_string()))?);
            }
        }
        Ok(())
    }

    fn endpoints(&mut self) -> Result<HashMap<&mut MapData, u32, Endpoint>, DatapathError> {
        let m = self
            .bpf
            .map_mut(maps::ENDPOINTS)
            .ok_or_else(|| DatapathError::Load("ENDPOINTS missing".into()))?;
        HashMap::try_from(m).map_err(map_err(maps::ENDPOINTS))
    }

    fn map_ref(&self, name: &'static str) -> Result<&aya::maps::Map, DatapathError> {
        self.bpf
            .map(name)
            .ok_or_else(|| DatapathError::Load(format!("{name} missing")))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DatapathError> {
        self.bpf
            .map_mut(name)
            .ok_or_else(|| DatapathError::Load(format!("{name} missing")))
    }

    fn full(&self, e: DatapathError, map: &'static str, max: u32) -> DatapathError {
        match e {
            DatapathError::MapFull { .. } => DatapathError::MapFull { map, max },
            e => e,
        }
    }

    /// Removes every pin (maps and links) under `pin_dir`: programs detach when their last link
    /// goes. Used for uninstalling and by tests that simulate a reboot.
    pub fn remove_pins(pin_dir: impl AsRef<Path>) -> Result<(), DatapathError> {
        let pin_dir = pin_dir.as_ref();
        if !pin_dir.exists() {
            return Ok(());
        }
        let mut errors = Vec::new();
        if let Ok(rd) = fs::read_dir(pin_dir.join("links")) {
            for e in rd.flatten() {
                if let Err(err) = fs::remove_file(e.path()) {
                    errors.push(format!("{}: {err}", e.path().display()));
                }
            }
        }
        for e in fs::read_dir(pin_dir)?.flatten() {
            let p = e.path();
            let r = if p.is_dir() {
                fs::remove_dir(&p)
            } else {
                fs::remove_file(&p)
            };
            if let Err(err) = r {
                errors.push(format!("{}: {err}", p.display()));
            }
        }
        if let Err(err) = fs::remove_dir(pin_dir) {
            errors.push(format!("{}: {err}", pin_dir.display()));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(DatapathError::Pin {
                path: pin_dir.display().to_string(),
                message: errors.join("; "),
            })
        }
    }
}

fn v4(addr: IpAddr) -> Option<[u8; 4]> {
    match addr {
        IpAddr::V4(a) => Some(a.octets()),
        IpAddr::V6(_) => None,
    }
}

fn v6(addr: IpAddr) -> Option<[u8; 16]> {
    match addr {
        IpAddr::V6(a) => Some(a.octets()),
        IpAddr::V4(_) => None,
    }
}

impl Datapath for KernelDatapath {
    fn sizes(&self) -> MapSizes {
        self.sizes
    }

    fn upsert_endpoint(&mut self, ifindex: u32, ep: Endpoint) -> Result<(), DatapathError> {
        let max = self.sizes.endpoints;
        let r = self
            .endpoints()?
            .insert(ifindex, ep, 0)
            .map_err(map_err(maps::ENDPOINTS));
        r.map_err(|e| self.full(e, maps::ENDPOINTS, max))
    }

    fn delete_endpoint(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        match self.endpoints()?.remove(&ifindex) {
            Err(e) if !is_not_found(&e) => Err(map_err(maps::ENDPOINTS)(e)),
            _ => Ok(()),
        }
    }

    fn upsert_ipcache(&mut self, cidr: Cidr, identity: u32) -> Result<(), DatapathError> {
        let value = RemoteInfo::new(identity);
        let r = if let Some(a) = v4(cidr.addr) {
            let mut m: LpmTrie<_, [u8; 4], RemoteInfo> =
                LpmTrie::try_from(self.map_mut(maps::IPCACHE4)?)
                    .map_err(map_err(maps::IPCACHE4))?;
            m.insert(&Key::new(u32::from(cidr.prefix_len), a), value, 0)
                .map_err(map_err(maps::IPCACHE4))
        } else if let Some(a) = v6(cidr.addr) {
            let mut m: LpmTrie<_, [u8; 16], RemoteInfo> =
                LpmTrie::try_from(self.map_mut(maps::IPCACHE6)?)
                    .map_err(map_err(maps::IPCACHE6))?;
            m.insert(&Key::new(u32::from(cidr.prefix_len), a), value, 0)
                .map_err(map_err(maps::IPCACHE6))
        } else {
            Ok(())
        };
        let (name, max) = if cidr.addr.is_ipv4() {
            (maps::IPCACHE4, self.sizes.ipcache4)
        } else {
            (maps::IPCACHE6, self.sizes.ipcache6)
        };
        r.map_err(|e| self.full(e, name, max))
    }

    fn delete_ipcache(&mut self, cidr: Cidr) -> Result<(), DatapathError> {
        let r = if let Some(a) = v4(cidr.addr) {
            let mut m: LpmTrie<_, [u8; 4], RemoteInfo> =
                LpmTrie::try_from(self.map_mut(maps::IPCACHE4)?)
                    .map_err(map_err(maps::IPCACHE4))?;
            m.remove(&Key::new(u32::from(cidr.prefix_len), a))
        } else if let Some(a) = v6(cidr.addr) {
            let mut m: LpmTrie<_, [u8; 16], RemoteInfo> =
                LpmTrie::try_from(self.map_mut(maps::IPCACHE6)?)
                    .map_err(map_err(maps::IPCACHE6))?;
            m.remove(&Key::new(u32::from(cidr.prefix_len), a))
        } else {
            Ok(())
        };
        match r {
            Err(e) if !is_not_found(&e) => Err(map_err(maps::IPCACHE4)(e)),
            _ => Ok(()),
        }
    }

    fn upsert_policy(
        &mut self,
        key: PolicyEntryKey,
        value: PolicyValue,
    ) -> Result<(), DatapathError> {
        let max = self.sizes.policy;
        let mut m: LpmTrie<_, PolicyKey, PolicyValue> =
            LpmTrie::try_from(self.map_mut(maps::POLICY)?).map_err(map_err(maps::POLICY))?;
        let r = m
            .insert(&Key::new(key.prefix_len, key.key), value, 0)
            .map_err(map_err(maps::POLICY));
        r.map_err(|e| self.full(e, maps::POLICY, max))
    }

    fn delete_policy(&mut self, key: PolicyEntryKey) -> Result<(), DatapathError> {
        let mut m: LpmTrie<_, PolicyKey, PolicyValue> =
            LpmTrie::try_from(self.map_mut(maps::POLICY)?).map_err(map_err(maps::POLICY))?;
        match m.remove(&Key::new(key.prefix_len, key.key)) {
            Err(e) if !is_not_found(&e) => Err(map_err(maps::POLICY)(e)),
            _ => Ok(()),
        }
    }

    fn attach(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        let name = ifname(ifindex)?;
        // Ingress side first: a container's egress is policed before anything is delivered to it.
        self.attach_one(ifindex, &name, programs::FROM_CONTAINER)?;
        self.attach_one(ifindex, &name, programs::TO_CONTAINER)
    }

    fn detach(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        let mut errors = Vec::new();
        for name in [programs::FROM_CONTAINER, programs::TO_CONTAINER] {
            let path = self.link_path(ifindex, name);
            if !path.exists() {
                continue;
            }
            // Dropping the last reference (the pin, then our fd) destroys the TCX link.
            match PinnedLink::from_pin(&path) {
                Ok(p) => {
                    if let Err(e) = p.unpin() {
                        errors.push(format!("{}: {e}", path.display()));
                    }
                }
                Err(e) => {
                    errors.push(format!("{}: {e}", path.display()));
                    let _ = fs::remove_file(&path);
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(DatapathError::Attach {
                ifindex,
                message: errors.join("; "),
            })
        }
    }

    fn attached(&self) -> Result<Vec<u32>, DatapathError> {
        let mut out: Vec<u32> = fs::read_dir(self.pin_dir.join("links"))?
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.split('_').next())
                    .and_then(|n| n.parse().ok())
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    fn current(&self) -> Result<MapState, DatapathError> {
        let mut state = MapState::default();
        let eps: HashMap<_, u32, Endpoint> =
            HashMap::try_from(self.map_ref(maps::ENDPOINTS)?).map_err(map_err(maps::ENDPOINTS))?;
        for item in eps.iter() {
            let (k, v) = item.map_err(map_err(maps::ENDPOINTS))?;
            state.endpoints.insert(k, v);
        }
        let c4: LpmTrie<_, [u8; 4], RemoteInfo> =
            LpmTrie::try_from(self.map_ref(maps::IPCACHE4)?).map_err(map_err(maps::IPCACHE4))?;
        for item in c4.iter() {
            let (k, v) = item.map_err(map_err(maps::IPCACHE4))?;
            let cidr = Cidr {
                addr: IpAddr::from(k.data()),
                prefix_len: k.prefix_len() as u8,
            };
            state.ipcache.insert(cidr, v.identity);
        }
        let c6: LpmTrie<_, [u8; 16], RemoteInfo> =
            LpmTrie::try_from(self.map_ref(maps::IPCACHE6)?).map_err(map_err(maps::IPCACHE6))?;
        for item in c6.iter() {
            let (k, v) = item.map_err(map_err(maps::IPCACHE6))?;
            let cidr = Cidr {
                addr: IpAddr::from(k.data()),
                prefix_len: k.prefix_len() as u8,
            };
            state.ipcache.insert(cidr, v.identity);
        }
        let pol: LpmTrie<_, PolicyKey, PolicyValue> =
            LpmTrie::try_from(self.map_ref(maps::POLICY)?).map_err(map_err(maps::POLICY))?;
        for item in pol.iter() {
            let (k, v) = item.map_err(map_err(maps::POLICY))?;
            state.policy.insert(
                PolicyEntryKey {
                    key: k.data(),
                    prefix_len: k.prefix_len(),
                },
                v,
            );
        }
        Ok(state)
    }

    fn drop_counters(&self) -> Result<DropCounters, DatapathError> {
        let arr: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map_ref(maps::DROPS)?).map_err(map_err(maps::DROPS))?;
        let mut out = DropCounters::new();
        for r in DropReason::ALL {
            let values = arr.get(&(r as u32), 0).map_err(map_err(maps::DROPS))?;
            out.insert(r as u8, values.iter().sum());
        }
        Ok(out)
    }

    fn set_trace_flows(&mut self, on: bool) -> Result<(), DatapathError> {
        let mut arr: Array<_, Config> =
            Array::try_from(self.map_mut(maps::CONFIG)?).map_err(map_err(maps::CONFIG))?;
        let mut cfg = arr.get(&0, 0).map_err(map_err(maps::CONFIG))?;
        if on {
            cfg.flags |= Config::TRACE_FLOWS;
        } else {
            cfg.flags &= !Config::TRACE_FLOWS;
        }
        arr.set(0, cfg, 0).map_err(map_err(maps::CONFIG))
    }
}
