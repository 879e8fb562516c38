//! Which IPv6 sources the host's firewall already masquerades: read from the kernel, not guessed
//! from Docker's version or configuration.
//!
//! Docker writes its IPv6 NAT as `ip6tables -t nat -A POSTROUTING -s <subnet> ! -o <bridge> -j
//! MASQUERADE` (with `ip6tables`, the default since Docker 27; `iptables-nft` stores it as an
//! nf_tables rule) or as a rule of its own nftables tables (Docker's nftables firewall backend).
//! Either way the kernel holds an nf_tables rule of the `ip6` family with a source-prefix match
//! and a `masq` (or `snat`, or iptables' `MASQUERADE` target) action. [`masqueraded_sources`]
//! dumps every `ip6` and `inet` rule over netfilter netlink (`NFT_MSG_GETRULE`) and returns the
//! source prefixes of such rules, whoever wrote them: whatever is already translated must never
//! be translated twice.
//!
//! What this cannot see is said, not guessed: rules of the legacy `ip6_tables` (the
//! `iptables-legacy` backend) are not nf_tables rules, so a loaded legacy `nat` table makes the
//! answer [`Nat6Error::Legacy`]; a masquerade rule whose source match is a set lookup rather than
//! a prefix is counted in [`Nat6Rules::unresolved`].

use std::{
    io,
    net::{IpAddr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use crate::datapath::Cidr;

const NLMSG_HDR_LEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV6: u8 = 10;
const NFGENMSG_LEN: usize = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;

const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_NFPROTO: u32 = 15;
const NFTA_NAT_TYPE: u16 = 1;
const NFT_NAT_SNAT: u32 = 0;
const NFTA_TARGET_NAME: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
/// Offset and length of the source address in the IPv6 header.
const IPV6_SADDR: (u32, u32) = (8, 16);
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
const LEGACY_TABLES: &str = "/proc/net/ip6_tables_names";

#[derive(Debug, thiserror::Error)]
pub enum Nat6Error {
    #[error("netfilter netlink socket: {0}")]
    Socket(io::Error),
    #[error("netfilter netlink send: {0}")]
    Send(io::Error),
    #[error("netfilter netlink receive: {0}")]
    Recv(io::Error),
    #[error("netfilter rule dump refused: {0}")]
    Kernel(io::Error),
    #[error("malformed netfilter message: {0}")]
    Malformed(&'static str),
    #[error(
        "a legacy ip6tables nat table is loaded (iptables-legacy), whose rules are not readable \
         here"
    )]
    Legacy,
}

/// One nf_tables rule that rewrites the source address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnatRule {
    /// `ip6 nat`, `ip6 docker-bridges`, …
    pub table: String,
    pub chain: String,
    /// The source prefix it matches.
    pub source: Cidr,
}

impl SnatRule {
    /// `ip6 nat POSTROUTING`: where the rule is, for `status`.
    pub fn place(&self) -> String {
        format!("{} {}", self.table, self.chain)
    }
}

/// What the dump found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Nat6Rules {
    pub rules: Vec<SnatRule>,
    /// Source-translating rules whose source is not a plain prefix (a set lookup, none at all).
    pub unresolved: usize,
}

impl Nat6Rules {
    /// The rule translating all of `subnet`, if any.
    pub fn covering(&self, subnet: &Cidr) -> Option<&SnatRule> {
        self.rules.iter().find(|r| contains(&r.source, subnet))
    }

    /// Rules translating a part of `subnet` (strictly smaller prefixes inside it).
    pub fn inside<'a>(&'a self, subnet: &'a Cidr) -> impl Iterator<Item = &'a SnatRule> + 'a {
        self.rules
            .iter()
            .filter(move |r| r.source.prefix_len > subnet.prefix_len && contains(subnet, &r.source))
    }
}

/// `outer` holds all of `inner` (both IPv6).
pub fn contains(outer: &Cidr, inner: &Cidr) -> bool {
    outer.addr.is_ipv6() && outer.prefix_len <= inner.prefix_len && outer.contains(inner.addr)
}

/// Dumps the host's `ip6` and `inet` nf_tables rules and returns those that translate sources;
/// [`Nat6Error::Legacy`] when a legacy `ip6_tables` nat table exists beside them.
pub fn masqueraded_sources() -> Result<Nat6Rules, Nat6Error> {
    let socket = Socket::open()?;
    let mut found = Nat6Rules::default();
    for family in [NFPROTO_IPV6, NFPROTO_INET] {
        socket.dump_rules(family, |payload| {
            match parse_rule(family, payload)? {
                Parsed::Snat(r) => found.rules.push(r),
                Parsed::Unresolved => found.unresolved += 1,
                Parsed::Other => {}
            }
            Ok(())
        })?;
    }
    let legacy = std::fs::read_to_string(LEGACY_TABLES).unwrap_or_default();
    if legacy.lines().any(|t| t.trim() == "nat") {
        return Err(Nat6Error::Legacy);
    }
    Ok(found)
}

/// What one rule is to us.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Snat(SnatRule),
    Unresolved,
    Other,
}

/// A value loaded into a register by `payload` (network header) or `meta nfproto`.
#[derive(Clone, Debug)]
enum Reg {
    Payload {
        offset: u32,
        len: u32,
        mask: Option<Vec<u8>>,
    },
    NfProto,
}

/// Reads one `NFT_MSG_NEWRULE` payload (after the netlink header).
fn parse_rule(family: u8, payload: &[u8]) -> Result<Parsed, Nat6Error> {
    let body = payload
        .get(NFGENMSG_LEN..)
        .ok_or(Nat6Error::Malformed("short nfgenmsg"))?;
    let (mut table, mut chain, mut exprs) = (String::new(), String::new(), None);
    for a in attrs(body) {
        let (ty, v) = a?;
        match ty {
            NFTA_RULE_TABLE => table = cstr(v),
            NFTA_RULE_CHAIN => chain = cstr(v),
            NFTA_RULE_EXPRESSIONS => exprs = Some(v),
            _ => {}
        }
    }
    let Some(exprs) = exprs else {
        return Ok(Parsed::Other);
    };
    let mut regs: Vec<(u32, Reg)> = Vec::new();
    let reg = |regs: &[(u32, Reg)], r: u32| regs.iter().rev().find(|(n, _)| *n == r).cloned();
    let mut source: Option<Cidr> = None;
    let mut ipv6_only = family == NFPROTO_IPV6;
    let mut saddr_lookup = false;
    let mut snat = false;
    for elem in attrs(exprs) {
        let (ty, e) = elem?;
        if ty != NFTA_LIST_ELEM {
            continue;
        }
        let (mut name, mut data) = (String::new(), &[][..]);
        for a in attrs(e) {
            let (ty, v) = a?;
            match ty {
                NFTA_EXPR_NAME => name = cstr(v),
                NFTA_EXPR_DATA => data = v,
                _ => {}
            }
        }
        let field = |want: u16| -> Result<Option<&[u8]>, Nat6Error> {
            for a in attrs(data) {
                let (ty, v) = a?;
                if ty == want {
                    return Ok(Some(v));
                }
            }
            Ok(None)
        };
        let be32 = |want: u16| -> Result<Option<u32>, Nat6Error> {
            Ok(field(want)?
                .and_then(|v| v.get(..4))
                .and_then(|v| v.try_into().ok())
                .map(u32::from_be_bytes))
        };
        match name.as_str() {
            "payload" => {
                if let (Some(dreg), Some(NFT_PAYLOAD_NETWORK_HEADER), Some(offset), Some(len)) = (
                    be32(NFTA_PAYLOAD_DREG)?,
                    be32(NFTA_PAYLOAD_BASE)?,
                    be32(NFTA_PAYLOAD_OFFSET)?,
                    be32(NFTA_PAYLOAD_LEN)?,
                ) {
                    regs.push((
                        dreg,
                        Reg::Payload {
                            offset,
                            len,
                            mask: None,
                        },
                    ));
                }
            }
            "meta" => {
                if let (Some(dreg), Some(NFT_META_NFPROTO)) =
                    (be32(NFTA_META_DREG)?, be32(NFTA_META_KEY)?)
                {
                    regs.push((dreg, Reg::NfProto));
                }
            }
            "bitwise" => {
                if let (Some(sreg), Some(dreg)) =
                    (be32(NFTA_BITWISE_SREG)?, be32(NFTA_BITWISE_DREG)?)
                {
                    if let Some((_, Reg::Payload { offset, len, .. })) = reg(&regs, sreg) {
                        let mask = field(NFTA_BITWISE_MASK)?.map(data_value).transpose()?;
                        regs.push((dreg, Reg::Payload { offset, len, mask }));
                    }
                }
            }
            "cmp" => {
                let (Some(sreg), Some(op)) = (be32(NFTA_CMP_SREG)?, be32(NFTA_CMP_OP)?) else {
                    continue;
                };
                let value = field(NFTA_CMP_DATA)?
                    .map(data_value)
                    .transpose()?
                    .unwrap_or_default();
                match reg(&regs, sreg) {
                    Some((_, Reg::NfProto)) if op == NFT_CMP_EQ => {
                        ipv6_only |= value.first() == Some(&NFPROTO_IPV6);
                    }
                    Some((_, Reg::Payload { offset, len, mask }))
                        if op == NFT_CMP_EQ && offset == IPV6_SADDR.0 =>
                    {
                        source = prefix_of(len, mask.as_deref(), &value);
                    }
                    _ => {}
                }
            }
            "lookup" => {
                if let Some(sreg) = be32(NFTA_LOOKUP_SREG)? {
                    if let Some((_, Reg::Payload { offset, .. })) = reg(&regs, sreg) {
                        saddr_lookup |= offset == IPV6_SADDR.0;
                    }
                }
            }
            "masq" => snat = true,
            "nat" => snat |= be32(NFTA_NAT_TYPE)? == Some(NFT_NAT_SNAT),
            "target" => {
                let t = field(NFTA_TARGET_NAME)?.map(cstr).unwrap_or_default();
                snat |= t == "MASQUERADE" || t == "SNAT";
            }
            _ => {}
        }
    }
    if !snat || !ipv6_only {
        return Ok(Parsed::Other);
    }
    Ok(match source {
        Some(source) if !saddr_lookup => Parsed::Snat(SnatRule {
            table: format!(
                "{} {table}",
                if family == NFPROTO_INET {
                    "inet"
                } else {
                    "ip6"
                }
            ),
            chain,
            source,
        }),
        _ => Parsed::Unresolved,
    })
}

/// The prefix a `cmp eq` of the first `len` bytes of the source address (after `mask`) means;
/// `None` for a mask that is not a prefix.
fn prefix_of(len: u32, mask: Option<&[u8]>, value: &[u8]) -> Option<Cidr> {
    let len = usize::try_from(len).ok().filter(|l| *l <= 16)?;
    let mut addr = [0u8; 16];
    addr.get_mut(..len)?.copy_from_slice(value.get(..len)?);
    let bits = match mask {
        None => len * 8,
        Some(m) => {
            let m = m.get(..len)?;
            let ones: usize = m.iter().map(|b| b.count_ones() as usize).sum();
            // Contiguous from the top: the mask equals the prefix mask of its popcount.
            let ok = m.iter().enumerate().all(|(i, b)| {
                let want = ones.saturating_sub(i * 8).min(8);
                *b == if want == 0 { 0 } else { 0xffu8 << (8 - want) }
            });
            if !ok {
                return None;
            }
            ones
        }
    };
    Cidr::new(IpAddr::V6(Ipv6Addr::from(addr)), u8::try_from(bits).ok()?).ok()
}

/// The bytes of an `NFTA_DATA_VALUE` inside a data attribute.
fn data_value(v: &[u8]) -> Result<Vec<u8>, Nat6Error> {
    for a in attrs(v) {
        let (ty, d) = a?;
        if ty == NFTA_DATA_VALUE {
            return Ok(d.to_vec());
        }
    }
    Ok(Vec::new())
}

struct Socket {
    fd: OwnedFd,
}

impl Socket {
    fn open() -> Result<Self, Nat6Error> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(Nat6Error::Socket(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: `tv` is a valid timeval for SO_RCVTIMEO and outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(Nat6Error::Socket(io::Error::last_os_error()));
        }
        Ok(Self { fd })
    }

    /// `NFT_MSG_GETRULE` dump of `family`; `on_rule` gets each `NFT_MSG_NEWRULE` payload.
    fn dump_rules(
        &self,
        family: u8,
        mut on_rule: impl FnMut(&[u8]) -> Result<(), Nat6Error>,
    ) -> Result<(), Nat6Error> {
        let seq: u32 = 1;
        let len = NLMSG_HDR_LEN + NFGENMSG_LEN;
        let ty = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE;
        let mut req = Vec::with_capacity(len);
        req.extend_from_slice(&(len as u32).to_ne_bytes());
        req.extend_from_slice(&ty.to_ne_bytes());
        req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        req.extend_from_slice(&seq.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes());
        // nfgenmsg: family, version (NFNETLINK_V0), resource id (big endian).
        req.extend_from_slice(&[family, 0, 0, 0]);
        // SAFETY: an all-zero sockaddr_nl is valid; the family is set below.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `req` and `kernel` are valid for the lengths passed.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                req.as_ptr().cast(),
                req.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(Nat6Error::Send(io::Error::last_os_error()));
        }
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Nat6Error::Recv(e));
            }
            let mut rest = buf
                .get(..n as usize)
                .ok_or(Nat6Error::Malformed("recv length"))?;
            while rest.len() >= NLMSG_HDR_LEN {
                let msg_len = read_u32(rest, 0)? as usize;
                let msg_ty = read_u16(rest, 4)?;
                let msg_seq = read_u32(rest, 8)?;
                if msg_len < NLMSG_HDR_LEN || msg_len > rest.len() {
                    return Err(Nat6Error::Malformed("message length"));
                }
                let payload = &rest[NLMSG_HDR_LEN..msg_len];
                if msg_seq == seq {
                    match msg_ty {
                        NLMSG_DONE => return Ok(()),
                        NLMSG_ERROR => {
                            let errno = read_u32(payload, 0)? as i32;
                            if errno != 0 {
                                return Err(Nat6Error::Kernel(io::Error::from_raw_os_error(
                                    -errno,
                                )));
                            }
                        }
                        t if t == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE => {
                            on_rule(payload)?
                        }
                        _ => {}
                    }
                }
                rest = rest.get(align4(msg_len)..).unwrap_or(&[]);
            }
        }
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn read_u16(b: &[u8], at: usize) -> Result<u16, Nat6Error> {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_ne_bytes)
        .ok_or(Nat6Error::Malformed("short u16"))
}

fn read_u32(b: &[u8], at: usize) -> Result<u32, Nat6Error> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or(Nat6Error::Malformed("short u32"))
}

/// Iterates over the `(type, value)` netlink attributes in `b`.
fn attrs(mut b: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), Nat6Error>> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let parsed = (|| {
            let len = read_u16(b, 0)? as usize;
            let ty = read_u16(b, 2)? & NLA_TYPE_MASK;
            let value = b
                .get(4..len)
                .ok_or(Nat6Error::Malformed("attribute length"))?;
            Ok((len, ty, value))
        })();
        match parsed {
            Ok((len, ty, value)) => {
                b = b.get(align4(len)..).unwrap_or(&[]);
                Some(Ok((ty, value)))
            }
            Err(e) => {
                b = &[];
                Some(Err(e))
            }
        }
    })
}

fn cstr(v: &[u8]) -> String {
    let end = v.iter().position(|&c| c == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One netlink attribute.
    fn attr(ty: u16, value: &[u8]) -> Vec<u8> {
        let len = 4 + value.len();
        let mut v = Vec::new();
        v.extend_from_slice(&(len as u16).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(value);
        v.resize(align4(v.len()), 0);
        v
    }
    fn nested(ty: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(ty | 0x8000, &parts.concat())
    }
    fn be(v: u32) -> Vec<u8> {
        v.to_be_bytes().to_vec()
    }
    fn s(v: &str) -> Vec<u8> {
        let mut b = v.as_bytes().to_vec();
        b.push(0);
        b
    }
    fn expr(name: &str, data: &[Vec<u8>]) -> Vec<u8> {
        nested(
            NFTA_LIST_ELEM,
            &[attr(NFTA_EXPR_NAME, &s(name)), nested(NFTA_EXPR_DATA, data)],
        )
    }
    fn payload(dreg: u32, offset: u32, len: u32) -> Vec<u8> {
        expr(
            "payload",
            &[
                attr(NFTA_PAYLOAD_DREG, &be(dreg)),
                attr(NFTA_PAYLOAD_BASE, &be(NFT_PAYLOAD_NETWORK_HEADER)),
                attr(NFTA_PAYLOAD_OFFSET, &be(offset)),
                attr(NFTA_PAYLOAD_LEN, &be(len)),
            ],
        )
    }
    fn cmp(sreg: u32, op: u32, value: &[u8]) -> Vec<u8> {
        expr(
            "cmp",
            &[
                attr(NFTA_CMP_SREG, &be(sreg)),
                attr(NFTA_CMP_OP, &be(op)),
                nested(NFTA_CMP_DATA, &[attr(NFTA_DATA_VALUE, value)]),
            ],
        )
    }
    fn rule(table: &str, chain: &str, exprs: &[Vec<u8>]) -> Vec<u8> {
        let mut v = vec![NFPROTO_IPV6, 0, 0, 0];
        v.extend(attr(NFTA_RULE_TABLE, &s(table)));
        v.extend(attr(NFTA_RULE_CHAIN, &s(chain)));
        v.extend(nested(NFTA_RULE_EXPRESSIONS, exprs));
        v
    }
    fn bytes(a: &str) -> Vec<u8> {
        a.parse::<Ipv6Addr>().unwrap().octets().to_vec()
    }
    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }
    /// `meta oifname != "br-…"`, as iptables-nft writes `! -o br-…`.
    fn oifname_neq(name: &str) -> Vec<Vec<u8>> {
        vec![
            expr(
                "meta",
                &[attr(NFTA_META_KEY, &be(7)), attr(NFTA_META_DREG, &be(1))],
            ),
            cmp(1, 1, &s(name)),
        ]
    }

    #[test]
    fn dockers_ip6tables_masquerade_rule_is_read_as_its_subnet() {
        // ip6tables -t nat -A POSTROUTING -s fd00:e6:1::/64 ! -o br-0123456789ab -j MASQUERADE,
        // as iptables-nft stores it: the first 8 bytes of the source compared, then the target.
        let mut exprs = vec![
            payload(1, 8, 8),
            cmp(1, NFT_CMP_EQ, &bytes("fd00:e6:1::")[..8]),
        ];
        exprs.extend(oifname_neq("br-0123456789ab"));
        exprs.push(expr("counter", &[]));
        for action in [
            expr("masq", &[]),
            expr("target", &[attr(NFTA_TARGET_NAME, &s("MASQUERADE"))]),
        ] {
            let mut e = exprs.clone();
            e.push(action);
            let got = parse_rule(NFPROTO_IPV6, &rule("nat", "POSTROUTING", &e)).unwrap();
            assert_eq!(
                got,
                Parsed::Snat(SnatRule {
                    table: "ip6 nat".into(),
                    chain: "POSTROUTING".into(),
                    source: cidr("fd00:e6:1::/64"),
                })
            );
        }
    }

    #[test]
    fn masked_prefixes_and_nft_snat_are_read() {
        // ip6 saddr fd00:e6:10::/60 snat to …: 8 bytes, a mask of 60 bits.
        let mut mask = vec![0xffu8; 7];
        mask.push(0xf0);
        let e = vec![
            payload(1, 8, 8),
            expr(
                "bitwise",
                &[
                    attr(NFTA_BITWISE_SREG, &be(1)),
                    attr(NFTA_BITWISE_DREG, &be(1)),
                    nested(NFTA_BITWISE_MASK, &[attr(NFTA_DATA_VALUE, &mask)]),
                ],
            ),
            cmp(1, NFT_CMP_EQ, &bytes("fd00:e6:10::")[..8]),
            expr("nat", &[attr(NFTA_NAT_TYPE, &be(NFT_NAT_SNAT))]),
        ];
        let got = parse_rule(NFPROTO_IPV6, &rule("docker-bridges", "nat-postrouting", &e));
        let Ok(Parsed::Snat(r)) = got else {
            panic!("{got:?}")
        };
        assert_eq!(r.source, cidr("fd00:e6:10::/60"));
        assert_eq!(r.place(), "ip6 docker-bridges nat-postrouting");
    }

    #[test]
    fn rules_that_do_not_translate_a_source_prefix_are_not_counted() {
        let src = || {
            vec![
                payload(1, 8, 8),
                cmp(1, NFT_CMP_EQ, &bytes("fd00:1::")[..8]),
            ]
        };
        // No translation: accept.
        let mut e = src();
        e.push(expr("immediate", &[]));
        assert_eq!(
            parse_rule(NFPROTO_IPV6, &rule("nat", "POSTROUTING", &e)).unwrap(),
            Parsed::Other
        );
        // ! -s fd00:1::/64 -j MASQUERADE: a negated source is not "these sources".
        let e = vec![
            payload(1, 8, 8),
            cmp(1, 1, &bytes("fd00:1::")[..8]),
            expr("masq", &[]),
        ];
        assert_eq!(
            parse_rule(NFPROTO_IPV6, &rule("nat", "POSTROUTING", &e)).unwrap(),
            Parsed::Unresolved
        );
        // DNAT (nat type 1) is not source NAT.
        let mut e = src();
        e.push(expr("nat", &[attr(NFTA_NAT_TYPE, &be(1))]));
        assert_eq!(
            parse_rule(NFPROTO_IPV6, &rule("nat", "DOCKER", &e)).unwrap(),
            Parsed::Other
        );
        // A destination match (offset 24) is not a source.
        let e = vec![
            payload(1, 24, 8),
            cmp(1, NFT_CMP_EQ, &bytes("fd00:1::")[..8]),
            expr("masq", &[]),
        ];
        assert_eq!(
            parse_rule(NFPROTO_IPV6, &rule("nat", "POSTROUTING", &e)).unwrap(),
            Parsed::Unresolved
        );
        // An inet rule without `meta nfproto ipv6` might be IPv4 (offset 8 is its TTL there).
        let mut e = src();
        e.push(expr("masq", &[]));
        assert_eq!(
            parse_rule(NFPROTO_INET, &rule("nat", "POSTROUTING", &e)).unwrap(),
            Parsed::Other
        );
    }

    #[test]
    fn prefixes_contain_their_subnets() {
        let rules = Nat6Rules {
            rules: vec![SnatRule {
                table: "ip6 nat".into(),
                chain: "POSTROUTING".into(),
                source: cidr("fd00:e6:1::/64"),
            }],
            unresolved: 0,
        };
        assert!(rules.covering(&cidr("fd00:e6:1::/64")).is_some());
        assert!(rules.covering(&cidr("fd00:e6:1:0:8000::/65")).is_some());
        assert!(rules.covering(&cidr("fd00:e6::/32")).is_none());
        assert_eq!(rules.inside(&cidr("fd00:e6::/32")).count(), 1);
        assert_eq!(rules.inside(&cidr("fd00:e6:1::/64")).count(), 0);
        assert!(!contains(&cidr("fd00:e6:1::/64"), &cidr("10.0.0.0/8")));
        assert!(prefix_of(8, Some(&[0xff, 0, 0xff, 0, 0, 0, 0, 0]), &[0; 8]).is_none());
    }
}
